//! Duplicate-free retries.
//!
//! A publisher that loses its connection cannot tell whether an
//! acknowledged publish it had no answer for was routed; after it
//! reconnects it sends it again, with the same sequence number. The broker
//! remembers, per publisher id (sent in HELLO), the sequence numbers of the
//! acknowledged publishes it routed, and answers a retry of one of them
//! with PUB_ACK without routing it a second time.
//!
//! What is remembered is bounded three ways (`[dedupe]`): by time
//! (`window_ms`), by count per publisher (`max_entries`) and by the number
//! of publishers (`max_publishers`). A retry that comes after its entry was
//! forgotten is routed again: that is the documented limit of the window.
//!
//! Only publishes that ask for an acknowledgement are remembered (they are
//! the only ones a publisher retries), so fire-and-forget traffic pays
//! nothing; an acknowledged one pays one uncontended lock.

use std::collections::VecDeque;
use std::sync::Arc;

use foldhash::HashMap;
use kaelix_core::config::DedupeConfig;
use parking_lot::Mutex;

/// The HELLO property a publisher names itself with.
pub(crate) const PUBLISHER_ID: &str = kaelix_core::client::hello_keys::PUBLISHER_ID;

/// Longest publisher id taken; a longer one is ignored (no dedupe).
const MAX_ID_BYTES: usize = 128;

/// Every publisher's window.
#[derive(Debug)]
pub(crate) struct Dedupe {
    publishers: Mutex<HashMap<Box<str>, Arc<Mutex<Window>>>>,
}

/// The sequence numbers of one publisher's routed, acknowledged publishes,
/// in increasing order, each with when it was routed.
#[derive(Debug, Default)]
pub(crate) struct Window {
    routed: VecDeque<(u64, u64)>,
    /// The last time (ns) this publisher was heard from.
    used: u64,
}

impl Dedupe {
    pub(crate) fn new() -> Dedupe {
        Dedupe {
            publishers: Mutex::new(HashMap::default()),
        }
    }

    /// The window of publisher `id`, made if new; `None` when dedupe is
    /// off or the id is unusable. At `max_publishers`, the publisher unheard
    /// from longest is forgotten (a connection holding its window keeps
    /// using it).
    pub(crate) fn window(
        &self,
        id: &str,
        now_ns: u64,
        config: &DedupeConfig,
    ) -> Option<Arc<Mutex<Window>>> {
        if !config.enabled || id.is_empty() || id.len() > MAX_ID_BYTES {
            return None;
        }
        let mut publishers = self.publishers.lock();
        if let Some(window) = publishers.get(id) {
            return Some(window.clone());
        }
        if publishers.len() >= config.max_publishers.max(1) {
            let horizon = now_ns.saturating_sub(window_ns(config));
            publishers.retain(|_, w| w.lock().used >= horizon);
            if publishers.len() >= config.max_publishers.max(1) {
                let oldest = publishers
                    .iter()
                    .min_by_key(|(_, w)| w.lock().used)
                    .map(|(id, _)| id.clone());
                if let Some(oldest) = oldest {
                    publishers.remove(&oldest);
                }
            }
        }
        let window = Arc::new(Mutex::new(Window {
            routed: VecDeque::new(),
            used: now_ns,
        }));
        publishers.insert(id.into(), window.clone());
        Some(window)
    }

    /// Publishers remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.publishers.lock().len()
    }
}

fn window_ns(config: &DedupeConfig) -> u64 {
    config.window_ms.saturating_mul(1_000_000)
}

impl Window {
    /// Takes `seq` for routing: true if it is new (and now remembered),
    /// false if it was routed before (a retry to acknowledge, not route).
    pub(crate) fn claim(&mut self, seq: u64, now_ns: u64, config: &DedupeConfig) -> bool {
        self.used = now_ns;
        let horizon = now_ns.saturating_sub(window_ns(config));
        while self
            .routed
            .front()
            .is_some_and(|&(_, at)| at < horizon || self.routed.len() >= config.max_entries)
        {
            self.routed.pop_front();
        }
        // Sequence numbers arrive in increasing order on one connection, so
        // this is an append but for retries.
        match self.routed.back() {
            Some(&(last, _)) if last < seq => {
                self.routed.push_back((seq, now_ns));
                true
            }
            None => {
                self.routed.push_back((seq, now_ns));
                true
            }
            Some(_) => match self.routed.binary_search_by_key(&seq, |&(s, _)| s) {
                Ok(_) => false,
                Err(at) => {
                    self.routed.insert(at, (seq, now_ns));
                    true
                }
            },
        }
    }

    /// Forgets `seq`: it was claimed but then refused, so a retry must be
    /// answered again rather than acknowledged.
    pub(crate) fn release(&mut self, seq: u64) {
        if let Ok(at) = self.routed.binary_search_by_key(&seq, |&(s, _)| s) {
            self.routed.remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window_ms: u64, max_entries: usize, max_publishers: usize) -> DedupeConfig {
        DedupeConfig {
            enabled: true,
            window_ms,
            max_entries,
            max_publishers,
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_retry_of_a_routed_publish_is_a_duplicate() {
        let c = config(1000, 100, 10);
        let mut w = Window::default();
        assert!(w.claim(5, 0, &c));
        assert!(w.claim(6, 0, &c));
        assert!(w.claim(9, 0, &c));
        assert!(!w.claim(6, MS, &c), "a retry of 6");
        assert!(!w.claim(9, MS, &c));
        // 7 was never routed (lost with the connection): routed now, once.
        assert!(w.claim(7, MS, &c));
        assert!(!w.claim(7, MS, &c));
        assert!(w.claim(10, MS, &c));
        let seqs: Vec<u64> = w.routed.iter().map(|&(s, _)| s).collect();
        assert_eq!(seqs, [5, 6, 7, 9, 10]);
    }

    #[test]
    fn a_refused_publish_is_forgotten() {
        let c = config(1000, 100, 10);
        let mut w = Window::default();
        assert!(w.claim(1, 0, &c));
        w.release(1);
        assert!(w.claim(1, 0, &c), "refused before, so answered again");
    }

    #[test]
    fn the_window_is_bounded_by_time_and_count() {
        let c = config(10, 3, 10);
        let mut w = Window::default();
        for seq in 1..=3 {
            assert!(w.claim(seq, 0, &c));
        }
        assert!(w.claim(4, 0, &c));
        assert_eq!(w.routed.len(), 3, "at most max_entries");
        assert!(w.claim(1, 0, &c), "1 was forgotten: routed again");
        // Past the time window, everything older is forgotten.
        assert!(w.claim(100, 11 * MS, &c));
        assert_eq!(w.routed.len(), 1);
        assert!(w.claim(4, 11 * MS, &c));
    }

    #[test]
    fn publishers_are_bounded_and_the_longest_unheard_goes_first() {
        let c = config(1000, 10, 2);
        let d = Dedupe::new();
        let a = d.window("a", 0, &c).unwrap();
        a.lock().claim(1, 0, &c);
        let _b = d.window("b", MS, &c).unwrap();
        // The same id gets the same window.
        assert!(!d.window("a", 2 * MS, &c).unwrap().lock().claim(1, 0, &c));
        // "a" was used at 0 (the claim above set it again at 0), "b" at 1 ms.
        let _c = d.window("c", 3 * MS, &c).unwrap();
        assert_eq!(d.len(), 2);
        assert!(d.window("a", 3 * MS, &c).unwrap().lock().claim(1, 0, &c));
        assert!(d.window("", 0, &c).is_none());
        assert!(d.window(&"x".repeat(200), 0, &c).is_none());
        let off = DedupeConfig {
            enabled: false,
            ..c
        };
        assert!(d.window("a", 0, &off).is_none());
    }
}
