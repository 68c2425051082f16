//! The topology read with hwloc (the `hwloc` cargo feature).

use hwlocality::object::types::ObjectType;

use super::topology::{CpuSet, Topology, TopologySource};

/// Reads NUMA nodes, cores and PUs with hwloc, keeping the `allowed` CPUs.
pub(crate) fn read(allowed: &CpuSet) -> Result<Topology, String> {
    let topology = hwlocality::Topology::new().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for pu in topology.objects_with_type(ObjectType::PU) {
        let Some(cpu) = pu.os_index() else {
            continue;
        };
        if !allowed.contains(cpu) {
            continue;
        }
        let core = pu
            .first_ancestor_with_type(ObjectType::Core)
            .and_then(|c| c.os_index())
            .unwrap_or(cpu);
        let package = pu
            .first_ancestor_with_type(ObjectType::Package)
            .and_then(|p| p.os_index())
            .unwrap_or(0);
        let node = pu
            .nodeset()
            .and_then(|nodes| nodes.first_set())
            .map_or(0, usize::from);
        rows.push((node, package, core, cpu));
    }
    Ok(Topology::from_rows(TopologySource::Hwloc, &rows))
}

#[cfg(test)]
mod tests {
    use super::super::topology::allowed_cpus;
    use super::*;

    /// Both ways of reading this machine place workers alike.
    #[test]
    fn hwloc_and_sysfs_agree_on_placement() {
        let allowed = allowed_cpus();
        let hwloc = read(&allowed).expect("hwloc reads this machine");
        let sysfs = Topology::detect_sysfs(&allowed);
        assert_eq!(hwloc.nodes, sysfs.nodes);
        for workers in 1..=allowed.len() + 1 {
            for numa_aware in [true, false] {
                assert_eq!(
                    hwloc.place(workers, numa_aware),
                    sysfs.place(workers, numa_aware),
                    "{workers} workers, numa_aware={numa_aware}"
                );
            }
        }
    }
}
