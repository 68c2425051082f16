//! A run's figures: latency histograms, the result record (`--json`), and
//! the table printed at the end.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency in nanoseconds, 1 ns to 60 s, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Merges per-subscriber histograms into one.
pub fn merge(parts: impl IntoIterator<Item = Histogram<u64>>) -> Histogram<u64> {
    let mut all = histogram();
    for part in parts {
        // Same bounds everywhere, so adding cannot fail.
        let _ = all.add(&part);
    }
    all
}

/// One run, as printed with `--json` (one object per line).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub scenario: String,
    pub target: String,
    /// Free text from `--label`, e.g. the CPU placement.
    #[serde(default)]
    pub label: String,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages received per second, all subscribers together.
    pub msgs_per_s: f64,
    /// Payload megabytes (10^6) received per second.
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Messages sent but not received (must be 0).
    pub lost: u64,
    /// Messages received more often than they should have been.
    #[serde(default)]
    pub duplicates: u64,
    pub sent: u64,
    pub received: u64,
    pub elapsed_s: f64,
    /// Broker CPU seconds per million messages received, when its pid is known.
    pub broker_cpu_s_per_m: Option<f64>,
    /// Broker resident memory at the end, when its pid is known.
    pub broker_rss_bytes: Option<u64>,
    /// Memory scenarios: subscriptions or connections made.
    pub count: Option<u64>,
    /// Memory scenarios: broker RSS growth per subscription or connection.
    pub bytes_per_item: Option<f64>,
    /// Memory scenarios: seconds until the broker confirmed all of them.
    pub register_s: Option<f64>,
}

impl RunResult {
    /// Fills the latency fields from `h` (nanoseconds).
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        self.p50_us = us(h.value_at_quantile(0.5));
        self.p90_us = us(h.value_at_quantile(0.9));
        self.p99_us = us(h.value_at_quantile(0.99));
        self.p999_us = us(h.value_at_quantile(0.999));
        self.max_us = us(h.max());
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} against {}{}\n",
            self.scenario,
            self.target,
            if self.label.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.label)
            }
        );
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<26} {v}\n"));
        if let Some(count) = self.count {
            row("items", count.to_string());
            if let Some(b) = self.bytes_per_item {
                row("broker bytes per item", format!("{b:.0}"));
            }
            if let Some(s) = self.register_s {
                row("registered in", format!("{s:.2} s"));
            }
        } else {
            row(
                "shape",
                format!(
                    "{} B, {} publisher(s) -> {} subscriber(s)",
                    self.payload_bytes, self.publishers, self.subscribers
                ),
            );
            row("messages/s (received)", format!("{:.0}", self.msgs_per_s));
            row("MB/s (payload)", format!("{:.1}", self.mb_per_s));
            row(
                "latency p50/p90/p99 us",
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    self.p50_us, self.p90_us, self.p99_us
                ),
            );
            row(
                "latency p99.9/max us",
                format!("{:.1} / {:.1}", self.p999_us, self.max_us),
            );
            row(
                "sent / received",
                format!("{} / {}", self.sent, self.received),
            );
            row(
                "lost / duplicates",
                format!("{} / {}", self.lost, self.duplicates),
            );
            if let Some(c) = self.broker_cpu_s_per_m {
                row("broker CPU s per M msgs", format!("{c:.3}"));
            }
        }
        if let Some(rss) = self.broker_rss_bytes {
            row(
                "broker RSS",
                format!("{:.1} MiB", rss as f64 / (1 << 20) as f64),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_sample() {
        let mut a = histogram();
        let mut b = histogram();
        for v in 1..=100u64 {
            a.record(v * 1000).unwrap();
            b.record(v * 2000).unwrap();
        }
        let all = merge([a, b]);
        assert_eq!(all.len(), 200);
        assert_eq!(all.max(), all.highest_equivalent(200_000));
        let mut r = RunResult::default();
        r.set_latency(&all);
        // The 100th of {1..100} and {2, 4, .. 200} µs is 67 µs.
        assert!((r.p50_us - 67.0).abs() < 0.1, "{}", r.p50_us);
    }

    #[test]
    fn json_round_trips() {
        let r = RunResult {
            scenario: "pubsub".into(),
            target: "kaelix://x:1".into(),
            msgs_per_s: 1.5,
            ..Default::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        for key in [
            "scenario",
            "target",
            "payload_bytes",
            "msgs_per_s",
            "mb_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "lost",
        ] {
            assert!(
                line.contains(&format!("\"{key}\"")),
                "{key} missing in {line}"
            );
        }
        assert_eq!(serde_json::from_str::<RunResult>(&line).unwrap(), r);
        assert!(r.table().contains("messages/s"));
    }
}
