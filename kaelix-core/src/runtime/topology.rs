//! The machine's shape (NUMA nodes, physical cores, processing units) and
//! where the runtime puts its workers on it.
//!
//! The default build reads Linux sysfs; with the `hwloc` feature the same
//! [`Topology`] comes from hwloc. Both are restricted to the CPUs this
//! process may run on (its affinity mask, which a container or `taskset`
//! narrows).

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

/// A set of CPUs (processing units, as the OS numbers them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CpuSet {
    cpus: Vec<usize>,
}

impl CpuSet {
    /// The set of `cpus` (sorted, duplicates removed).
    pub fn new(cpus: &[usize]) -> CpuSet {
        let mut cpus = cpus.to_vec();
        cpus.sort_unstable();
        cpus.dedup();
        CpuSet { cpus }
    }

    /// One CPU.
    pub fn single(cpu: usize) -> CpuSet {
        CpuSet { cpus: vec![cpu] }
    }

    /// Parses the kernel's list format: `0-3,8,10-11`.
    pub fn parse_list(list: &str) -> Option<CpuSet> {
        let mut cpus = Vec::new();
        for part in list.trim().split(',').filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
                    if hi < lo || hi - lo > 1 << 16 {
                        return None;
                    }
                    cpus.extend(lo..=hi);
                }
                None => cpus.push(part.parse().ok()?),
            }
        }
        Some(CpuSet::new(&cpus))
    }

    /// The CPUs, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        self.cpus.binary_search(&cpu).is_ok()
    }

    /// Number of CPUs.
    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    /// True when the set holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }
}

/// Kernel list format, ranges collapsed: `0-3,8`.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.cpus.len() {
            let start = self.cpus[i];
            let mut end = start;
            while i + 1 < self.cpus.len() && self.cpus[i + 1] == end + 1 {
                i += 1;
                end = self.cpus[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Where a [`Topology`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologySource {
    /// hwloc (the `hwloc` cargo feature).
    Hwloc,
    /// Linux sysfs: `/sys/devices/system/{node,cpu}`.
    Sysfs,
    /// Neither told anything useful (a container without sysfs, say): every
    /// allowed CPU counts as its own core on one node.
    OsCpuList,
}

impl fmt::Display for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopologySource::Hwloc => "hwloc",
            TopologySource::Sysfs => "sysfs",
            TopologySource::OsCpuList => "os-cpu-list",
        })
    }
}

/// One physical core and its processing units (more than one with SMT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// The core's number within its package, as the OS reports it.
    pub id: usize,
    /// The package (socket) it sits in.
    pub package: usize,
    /// Its processing units (OS CPU numbers), ascending.
    pub pus: Vec<usize>,
}

/// A NUMA node and its cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The node's OS number.
    pub id: usize,
    /// Its cores that this process may use, ordered by first PU.
    pub cores: Vec<Core>,
}

/// The allowed part of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Where the description came from.
    pub source: TopologySource,
    /// Nodes that hold at least one allowed core, by id.
    pub nodes: Vec<NumaNode>,
}

/// Where one worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlacement {
    /// The worker's index.
    pub worker: usize,
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// Its NUMA node.
    pub node: usize,
    /// `(package, core)` of its physical core.
    pub core: (usize, usize),
    /// True when another worker shares its physical core (more workers than
    /// cores), or its CPU (more workers than CPUs).
    pub shared: bool,
}

impl Topology {
    /// Reads the topology: hwloc with the `hwloc` feature, else sysfs, else
    /// the OS CPU list.
    pub fn detect() -> Topology {
        let allowed = allowed_cpus();
        #[cfg(feature = "hwloc")]
        match super::hwloc::read(&allowed) {
            Ok(topology) if !topology.nodes.is_empty() => return topology,
            Ok(_) => tracing::warn!("hwloc reported no usable core; trying sysfs"),
            Err(err) => tracing::warn!(error = %err, "hwloc failed; trying sysfs"),
        }
        Self::detect_sysfs(&allowed)
    }

    /// Reads sysfs, falling back to the OS CPU list when it says nothing
    /// useful.
    pub fn detect_sysfs(allowed: &CpuSet) -> Topology {
        match Self::from_sysfs(Path::new("/sys/devices/system"), allowed) {
            Ok(topology) if !topology.nodes.is_empty() => topology,
            Ok(_) => Self::from_cpu_list(allowed),
            Err(err) => {
                tracing::debug!(error = %err, "sysfs topology unreadable");
                Self::from_cpu_list(allowed)
            }
        }
    }

    /// Reads `root` laid out like `/sys/devices/system`: `node/nodeN/cpulist`
    /// (optional: without it everything is node 0) and
    /// `cpu/cpuN/topology/{core_id,physical_package_id}`.
    pub fn from_sysfs(root: &Path, allowed: &CpuSet) -> io::Result<Topology> {
        let mut node_of = std::collections::BTreeMap::new();
        if let Ok(entries) = fs::read_dir(root.join("node")) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("node"))
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                let list = fs::read_to_string(entry.path().join("cpulist"))?;
                let cpus = CpuSet::parse_list(&list).ok_or_else(|| bad(&list))?;
                for &cpu in cpus.cpus() {
                    node_of.insert(cpu, id);
                }
            }
        }
        let mut nodes: Vec<NumaNode> = Vec::new();
        for &cpu in allowed.cpus() {
            let dir = root.join(format!("cpu/cpu{cpu}/topology"));
            let read = |file: &str| -> io::Result<usize> {
                let text = fs::read_to_string(dir.join(file))?;
                text.trim().parse().map_err(|_| bad(&text))
            };
            let core_id = read("core_id")?;
            let package = read("physical_package_id")?;
            let node_id = node_of.get(&cpu).copied().unwrap_or(0);
            add_pu(&mut nodes, node_id, package, core_id, cpu);
        }
        Ok(Topology::sorted(TopologySource::Sysfs, nodes))
    }

    /// Every CPU its own core, all on node 0.
    pub fn from_cpu_list(allowed: &CpuSet) -> Topology {
        let cores = allowed
            .cpus()
            .iter()
            .map(|&cpu| Core {
                id: cpu,
                package: 0,
                pus: vec![cpu],
            })
            .collect();
        Topology {
            source: TopologySource::OsCpuList,
            nodes: vec![NumaNode { id: 0, cores }],
        }
    }

    /// Builds a topology from `(node, package, core, cpu)` rows, in any order.
    pub fn from_rows(source: TopologySource, rows: &[(usize, usize, usize, usize)]) -> Topology {
        let mut nodes = Vec::new();
        for &(node, package, core, cpu) in rows {
            add_pu(&mut nodes, node, package, core, cpu);
        }
        Topology::sorted(source, nodes)
    }

    fn sorted(source: TopologySource, mut nodes: Vec<NumaNode>) -> Topology {
        nodes.retain(|n| !n.cores.is_empty());
        nodes.sort_by_key(|n| n.id);
        for node in &mut nodes {
            for core in &mut node.cores {
                core.pus.sort_unstable();
            }
            node.cores.sort_by_key(|c| c.pus[0]);
        }
        Topology { source, nodes }
    }

    /// Physical cores in all nodes.
    pub fn core_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cores.len()).sum()
    }

    /// Processing units in all nodes.
    pub fn pu_count(&self) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| &n.cores)
            .map(|c| c.pus.len())
            .sum()
    }

    /// Where `workers` workers go:
    ///
    /// 1. one per physical core, the first PU of each, before any worker
    ///    shares a core with another (no two on SMT siblings while a core is
    ///    free);
    /// 2. with `numa_aware`, cores are taken node by node, the node with
    ///    most cores first, so that a worker count that fits one node stays
    ///    on it; without it, nodes take turns, spreading workers (and memory
    ///    bandwidth) over all of them;
    /// 3. then the second PU of each core in the same order, and so on;
    /// 4. more workers than PUs wrap around and share.
    pub fn place(&self, workers: usize, numa_aware: bool) -> Vec<WorkerPlacement> {
        let mut nodes: Vec<&NumaNode> = self.nodes.iter().collect();
        if numa_aware {
            // Stable: equal nodes keep id order.
            nodes.sort_by_key(|n| std::cmp::Reverse(n.cores.len()));
        }
        // Core visiting order for one round of PUs.
        let mut cores: Vec<(usize, &Core)> = Vec::new();
        if numa_aware {
            for node in &nodes {
                cores.extend(node.cores.iter().map(|c| (node.id, c)));
            }
        } else {
            let deepest = nodes.iter().map(|n| n.cores.len()).max().unwrap_or(0);
            for i in 0..deepest {
                for node in &nodes {
                    if let Some(core) = node.cores.get(i) {
                        cores.push((node.id, core));
                    }
                }
            }
        }
        let smt = cores.iter().map(|(_, c)| c.pus.len()).max().unwrap_or(0);
        let mut slots = Vec::new();
        for round in 0..smt {
            for &(node, core) in &cores {
                if let Some(&cpu) = core.pus.get(round) {
                    slots.push((node, core, cpu));
                }
            }
        }
        if slots.is_empty() {
            return Vec::new();
        }
        let mut placed: Vec<WorkerPlacement> = (0..workers)
            .map(|worker| {
                let (node, core, cpu) = slots[worker % slots.len()];
                WorkerPlacement {
                    worker,
                    cpu,
                    node,
                    core: (core.package, core.id),
                    shared: false,
                }
            })
            .collect();
        for i in 0..placed.len() {
            let core = placed[i].core;
            let node = placed[i].node;
            placed[i].shared = placed
                .iter()
                .enumerate()
                .any(|(j, p)| j != i && p.node == node && p.core == core);
        }
        placed
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} NUMA node(s), {} core(s), {} PU(s) (from {})",
            self.nodes.len(),
            self.core_count(),
            self.pu_count(),
            self.source
        )
    }
}

fn add_pu(nodes: &mut Vec<NumaNode>, node: usize, package: usize, core: usize, cpu: usize) {
    let index = match nodes.iter().position(|n| n.id == node) {
        Some(i) => i,
        None => {
            nodes.push(NumaNode {
                id: node,
                cores: Vec::new(),
            });
            nodes.len() - 1
        }
    };
    let cores = &mut nodes[index].cores;
    match cores
        .iter_mut()
        .find(|c| c.id == core && c.package == package)
    {
        Some(c) => c.pus.push(cpu),
        None => cores.push(Core {
            id: core,
            package,
            pus: vec![cpu],
        }),
    }
}

fn bad(text: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected sysfs content {text:?}"),
    )
}

/// The CPUs this process may run on (its affinity mask), or every online
/// CPU when the mask cannot be read.
pub fn allowed_cpus() -> CpuSet {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => CpuSet::new(&ids.iter().map(|c| c.id).collect::<Vec<_>>()),
        _ => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            CpuSet::new(&(0..n).collect::<Vec<_>>())
        }
    }
}

/// Restricts the calling thread to `set`.
pub(crate) fn pin_current(set: &CpuSet) -> io::Result<()> {
    if let [cpu] = set.cpus() {
        if core_affinity::set_for_current(core_affinity::CoreId { id: *cpu }) {
            return Ok(());
        }
        return Err(io::Error::other(format!("cannot pin to CPU {cpu}")));
    }
    set_affinity(0, set)
}

/// Restricts thread `tid` (0: the calling thread) to `set`.
pub(crate) fn set_affinity(tid: i32, set: &CpuSet) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET
    // writes within it for CPUs below CPU_SETSIZE (checked), and
    // sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut mask: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in set.cpus() {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {cpu} is beyond what the OS can address"),
                ));
            }
            libc::CPU_SET(cpu, &mut mask);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mask) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
pub fn thread_affinity(tid: i32) -> io::Result<CpuSet> {
    // SAFETY: as in `set_affinity`; the kernel fills the mask.
    unsafe {
        let mut mask: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut mask) != 0 {
            return Err(io::Error::last_os_error());
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &mask))
            .collect();
        Ok(CpuSet::new(&cpus))
    }
}

/// The calling thread's kernel id.
pub(crate) fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes, two packages, 4 cores each with 2 SMT siblings numbered
    /// the Intel way (cpu N and N+16 share a core).
    fn two_node_smt() -> Topology {
        let mut rows = Vec::new();
        for node in 0..2 {
            for core in 0..4 {
                let cpu = node * 4 + core;
                rows.push((node, node, core, cpu));
                rows.push((node, node, core, cpu + 16));
            }
        }
        Topology::from_rows(TopologySource::Sysfs, &rows)
    }

    fn cpus(p: &[WorkerPlacement]) -> Vec<usize> {
        p.iter().map(|w| w.cpu).collect()
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        let set = CpuSet::parse_list("0-3,8,10-11\n").unwrap();
        assert_eq!(set.cpus(), &[0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(set.to_string(), "0-3,8,10-11");
        assert!(CpuSet::parse_list("3-1").is_none());
        assert!(CpuSet::parse_list("a").is_none());
        assert_eq!(CpuSet::new(&[2, 0, 2]).cpus(), &[0, 2]);
    }

    #[test]
    fn numa_aware_fills_one_node_with_whole_cores_first() {
        let t = two_node_smt();
        assert_eq!(t.core_count(), 8);
        assert_eq!(t.pu_count(), 16);
        let p = t.place(4, true);
        assert_eq!(cpus(&p), vec![0, 1, 2, 3]);
        assert!(p.iter().all(|w| w.node == 0 && !w.shared));
        // Past one node: the other node's cores before any SMT sibling.
        let p = t.place(8, true);
        assert_eq!(cpus(&p), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        let p = t.place(10, true);
        assert_eq!(cpus(&p)[8..], [16, 17]);
        assert!(p[8].shared && p[0].shared && !p[2].shared);
    }

    #[test]
    fn without_numa_awareness_nodes_take_turns() {
        let p = two_node_smt().place(4, false);
        assert_eq!(cpus(&p), vec![0, 4, 1, 5]);
        assert_eq!(p.iter().map(|w| w.node).collect::<Vec<_>>(), [0, 1, 0, 1]);
    }

    #[test]
    fn the_larger_node_comes_first_and_workers_wrap_past_every_pu() {
        let rows = [
            (0, 0, 0, 0),
            (1, 0, 1, 1),
            (1, 0, 2, 2),
            (1, 0, 2, 3), // core 2 has two PUs
        ];
        let t = Topology::from_rows(TopologySource::Sysfs, &rows);
        let p = t.place(6, true);
        assert_eq!(cpus(&p), vec![1, 2, 0, 3, 1, 2]);
        assert!(p[4].shared);
    }

    #[test]
    fn sysfs_layout_is_read_and_restricted_to_allowed_cpus() {
        let root = std::env::temp_dir().join(format!("kaelix-sysfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("node/node0/cpulist", "0-1\n");
        write("node/node1/cpulist", "2-3\n");
        for (cpu, core) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
            write(
                &format!("cpu/cpu{cpu}/topology/core_id"),
                &format!("{core}\n"),
            );
            write(&format!("cpu/cpu{cpu}/topology/physical_package_id"), "0\n");
        }
        let t = Topology::from_sysfs(&root, &CpuSet::new(&[0, 1, 2, 3])).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].cores[0].pus, vec![0, 1]);
        assert_eq!(t.nodes[1].cores[0].pus, vec![2, 3]);
        let t = Topology::from_sysfs(&root, &CpuSet::new(&[1, 3])).unwrap();
        assert_eq!(cpus(&t.place(2, true)), vec![1, 3]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_fallback_makes_every_cpu_a_core() {
        let t = Topology::from_cpu_list(&CpuSet::new(&[0, 1, 2]));
        assert_eq!(t.source, TopologySource::OsCpuList);
        assert_eq!(t.core_count(), 3);
        assert_eq!(cpus(&t.place(2, true)), vec![0, 1]);
    }

    #[test]
    fn this_machine_reads_and_pins() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        let t = Topology::detect_sysfs(&allowed);
        assert_eq!(t.pu_count(), allowed.len());
        let first = allowed.cpus()[0];
        std::thread::spawn(move || {
            pin_current(&CpuSet::single(first)).unwrap();
            assert_eq!(thread_affinity(0).unwrap().cpus(), &[first]);
        })
        .join()
        .unwrap();
    }
}
