//! Turns `--json` lines into the medians table of docs/performance.md:
//! runs are grouped by scenario, shape and label; each figure is the median
//! over the group's runs for each target, with the Kaelix/NATS ratio.

use std::collections::BTreeMap;

use crate::results::RunResult;

/// Parses one JSON object per non-empty line.
pub fn parse_lines(text: &str) -> Result<Vec<RunResult>, String> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).map_err(|e| format!("bad result line {l:?}: {e}")))
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The column a target's figures go in; in-process runs are Kaelix's.
fn kind(target: &str) -> &str {
    match target.split("://").next().unwrap_or(target) {
        "inprocess" => "kaelix",
        other => other,
    }
}

type Metric = (&'static str, fn(&RunResult) -> Option<f64>);

fn metrics(scenario: &str) -> Vec<Metric> {
    match scenario {
        "topics" | "connections" => vec![
            ("broker bytes per item", |r| r.bytes_per_item),
            ("registration s", |r| r.register_s),
        ],
        "latency" | "inprocess" | "inprocess-task" => vec![
            ("p50 µs", |r| Some(r.p50_us)),
            ("p99 µs", |r| Some(r.p99_us)),
            ("lost", |r| Some(r.lost as f64)),
        ],
        _ => vec![
            ("msgs/s", |r| Some(r.msgs_per_s)),
            ("MB/s", |r| Some(r.mb_per_s)),
            ("p99 µs", |r| Some(r.p99_us)),
            ("broker CPU s / M msgs", |r| r.broker_cpu_s_per_m),
            ("lost", |r| Some(r.lost as f64)),
        ],
    }
}

fn shape(r: &RunResult) -> String {
    match r.count {
        Some(n) => format!("{n}"),
        None => format!("{} B, {}→{}", r.payload_bytes, r.publishers, r.subscribers),
    }
}

fn fmt(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The markdown table of medians.
pub fn markdown(runs: &[RunResult]) -> String {
    let mut groups: BTreeMap<(String, String, String), Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.scenario.clone(), shape(r), r.label.clone()))
            .or_default()
            .push(r);
    }
    let mut out = String::from(
        "| scenario | shape | placement / load | figure | Kaelix | NATS | relay | Kaelix/NATS | runs |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((scenario, shape, label), group) in &groups {
        for (name, get) in metrics(scenario) {
            let med = |k: &str| {
                let mut v: Vec<f64> = group
                    .iter()
                    .filter(|r| kind(&r.target) == k)
                    .filter_map(|r| get(r))
                    .collect();
                median(&mut v)
            };
            let (kaelix, nats, relay) = (med("kaelix"), med("nats"), med("relay"));
            if kaelix.is_none() && nats.is_none() && relay.is_none() {
                continue;
            }
            let ratio = match (kaelix, nats) {
                (Some(k), Some(n)) if n > 0.0 => format!("{:.2}", k / n),
                _ => "–".into(),
            };
            let show = |v: Option<f64>| v.map(fmt).unwrap_or_else(|| "–".into());
            let runs = group.iter().filter(|r| kind(&r.target) == "kaelix").count();
            out.push_str(&format!(
                "| {scenario} | {shape} | {label} | {name} | {} | {} | {} | {ratio} | {runs} |\n",
                show(kaelix),
                show(nats),
                show(relay)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn table_has_medians_and_ratios() {
        let run = |target: &str, rate: f64| RunResult {
            scenario: "pubsub".into(),
            target: target.into(),
            payload_bytes: 16,
            publishers: 1,
            subscribers: 1,
            msgs_per_s: rate,
            ..Default::default()
        };
        let lines: String = [
            run("kaelix://a:1", 3e6),
            run("kaelix://a:1", 4e6),
            run("kaelix://a:1", 5e6),
            run("nats://b:2", 2e6),
        ]
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
        let runs = parse_lines(&lines).unwrap();
        let table = markdown(&runs);
        assert!(
            table.contains("| pubsub | 16 B, 1→1 |  | msgs/s | 4.00 M | 2.00 M | – | 2.00 | 3 |"),
            "{table}"
        );
        assert!(parse_lines("{not json}").is_err());
    }
}
