//! `rate_limit`: messages per second per topic.

use std::collections::HashMap;

use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result, Topic};

use super::{bad, integer, known_keys, Refusal};

/// Past this many topics, buckets that are full again are forgotten.
const MAX_TOPICS: usize = 65_536;

/// A token bucket per topic: `messages_per_sec`, with bursts of `burst`.
/// Over it, messages are dropped (or dead-lettered).
///
/// ```toml
/// [[plugins]]
/// name = "rate_limit"
/// pattern = "sensors.>"
/// [plugins.config]
/// messages_per_sec = 1000
/// burst = 2000             # default: messages_per_sec
/// action = "drop"          # or "dead_letter"
/// ```
///
/// Time is the broker's receive time of each message (taken once per read
/// from a connection), so a batch read at once is judged at one instant.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    refusal: Refusal,
    buckets: HashMap<Topic, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Nanoseconds since the epoch.
    at: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            rate: 0.0,
            burst: 0.0,
            refusal: Refusal::Drop,
            buckets: HashMap::new(),
        }
    }
}

impl Plugin for RateLimit {
    fn name(&self) -> &str {
        "rate_limit"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        known_keys(context, &["messages_per_sec", "burst", "action"])?;
        self.refusal = Refusal::from_config(context, Refusal::Drop)?;
        let rate = integer(context, "messages_per_sec")?
            .ok_or_else(|| bad(context, "messages_per_sec", "is required"))?;
        if rate == 0 {
            return Err(bad(context, "messages_per_sec", "must be at least 1"));
        }
        self.rate = rate as f64;
        self.burst = integer(context, "burst")?.unwrap_or(rate).max(1) as f64;
        self.buckets.clear();
        Ok(())
    }
}

impl StreamProcessor for RateLimit {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        let now = message.timestamp.as_nanos();
        if self.buckets.len() >= MAX_TOPICS && !self.buckets.contains_key(&message.topic) {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets
                .retain(|_, b| b.tokens + elapsed(b.at, now) * rate < burst);
        }
        let bucket = self.buckets.entry(message.topic.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = (bucket.tokens + elapsed(bucket.at, now) * self.rate).min(self.burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(ProcessingAction::Continue);
        }
        Ok(self.refusal.action(format!(
            "{} is over its rate of {} messages per second",
            message.topic, self.rate
        )))
    }
}

/// Seconds from `then` to `now` (zero if the clock went back).
fn elapsed(then: u64, now: u64) -> f64 {
    now.saturating_sub(then) as f64 / 1e9
}
