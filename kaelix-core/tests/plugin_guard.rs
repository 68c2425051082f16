//! The guard around every plugin call: panics, errors, the time budget,
//! the CPU share and the circuit breaker's cycle.

use std::time::{Duration, Instant};

use kaelix_core::plugin::{
    BreakerPolicy, BreakerState, Call, Failure, Plugin, PluginHandle, ProcessingAction,
    ResourceLimits, SecurityIsolation, StreamProcessor,
};
use kaelix_core::{Error, Message, Result, Topic};

/// Does what it is told for each message.
struct Scripted {
    behaviour: fn(&mut Message) -> Result<ProcessingAction>,
}

impl Plugin for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn version(&self) -> &str {
        "0"
    }
}

impl StreamProcessor for Scripted {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        (self.behaviour)(message)
    }
}

fn message(text: &str) -> Message {
    Message::new(Topic::new("t").unwrap(), text.to_string()).unwrap()
}

fn guarded(
    behaviour: fn(&mut Message) -> Result<ProcessingAction>,
    security: SecurityIsolation,
) -> PluginHandle {
    let handle = PluginHandle::new("p", "scripted", Box::new(Scripted { behaviour }), security);
    handle.initialize(toml::Table::new()).unwrap();
    handle
}

fn quick_breaker(threshold: u32, cooldown_ms: u64) -> SecurityIsolation {
    SecurityIsolation::new().with_breaker(BreakerPolicy {
        failure_threshold: threshold,
        cooldown: Duration::from_millis(cooldown_ms),
    })
}

#[test]
fn a_panic_is_caught_and_reported_as_a_failure() {
    let handle = guarded(|_| panic!("bad input"), SecurityIsolation::new());
    assert_eq!(
        handle.call(&mut message("x")),
        Call::Failed(Failure::Panic("bad input".into()))
    );
    assert_eq!(
        handle
            .stats()
            .panics
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn an_uninitialized_plugin_is_not_called() {
    let handle = PluginHandle::new(
        "p",
        "scripted",
        Box::new(Scripted {
            behaviour: |_| Ok(ProcessingAction::Continue),
        }),
        SecurityIsolation::new(),
    );
    assert_eq!(handle.call(&mut message("x")), Call::Off);
}

#[test]
fn failures_open_the_breaker_then_a_trial_closes_it() {
    // Fails on "fail", passes anything else.
    let handle = guarded(
        |m| {
            if &m.payload[..] == b"fail" {
                Err(Error::Runtime("refused".into()))
            } else {
                Ok(ProcessingAction::Continue)
            }
        },
        quick_breaker(3, 100),
    );
    for _ in 0..3 {
        assert!(matches!(
            handle.call(&mut message("fail")),
            Call::Failed(Failure::Error(_))
        ));
    }
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    // Off: even a good message does not reach it.
    assert_eq!(handle.call(&mut message("ok")), Call::Off);
    std::thread::sleep(Duration::from_millis(120));
    // Half-open: one trial; it fails, and the breaker opens again.
    assert!(matches!(handle.call(&mut message("fail")), Call::Failed(_)));
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    std::thread::sleep(Duration::from_millis(120));
    // The next trial succeeds: closed.
    assert_eq!(
        handle.call(&mut message("ok")),
        Call::Done(ProcessingAction::Continue)
    );
    assert_eq!(handle.breaker_state(), BreakerState::Closed);
    let t = &handle.stats().transitions;
    let n = |i: usize| t[i].load(std::sync::atomic::Ordering::Relaxed);
    // closed 1, half-open 2, open 2
    assert_eq!((n(0), n(1), n(2)), (1, 2, 2));
}

#[test]
fn calls_over_the_time_budget_count_as_failures_but_their_answer_stands() {
    let handle = guarded(
        |_| {
            std::thread::sleep(Duration::from_millis(3));
            Ok(ProcessingAction::dropped("slowly"))
        },
        quick_breaker(2, 60_000).with_time_budget(Duration::from_millis(1)),
    );
    assert_eq!(
        handle.call(&mut message("x")),
        Call::Done(ProcessingAction::dropped("slowly"))
    );
    handle.call(&mut message("x"));
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    assert_eq!(
        handle
            .stats()
            .over_budget
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_plugin_over_its_cpu_share_is_switched_off() {
    // Each call takes ~2 ms; called back to back it takes ~100% of a CPU,
    // over a limit of 10%. The budget is off: only the share counts.
    let security = SecurityIsolation::new()
        .with_time_budget(Duration::ZERO)
        .with_resource_limits(ResourceLimits {
            max_memory_mb: 0,
            max_cpu_percent: 10,
            max_file_descriptors: 0,
        });
    let handle = guarded(
        |_| {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(2) {}
            Ok(ProcessingAction::Continue)
        },
        security,
    );
    let start = Instant::now();
    while handle.breaker_state() == BreakerState::Closed {
        handle.call(&mut message("x"));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never switched off"
        );
    }
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    assert!(
        handle
            .stats()
            .over_cpu
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn a_batch_over_the_budget_makes_the_next_batch_time_each_call() {
    use std::sync::atomic::Ordering::Relaxed;
    // "slow" messages take 3 ms, others nothing; the budget is 2 ms.
    let handle = guarded(
        |message| {
            if &message.payload[..] == b"slow" {
                std::thread::sleep(Duration::from_millis(3));
            }
            Ok(ProcessingAction::Continue)
        },
        quick_breaker(3, 60_000).with_time_budget(Duration::from_millis(2)),
    );
    let run = |payloads: &[&str]| {
        let mut batch: Vec<Message> = payloads.iter().map(|p| message(p)).collect();
        let mut out = Vec::new();
        handle.call_each(batch.iter_mut().enumerate(), Instant::now(), &mut out);
        assert!(out.is_empty(), "every call answered Continue: {out:?}");
    };
    let over = || handle.stats().over_budget.load(Relaxed);

    // Quick batches are timed as a whole and judged within the budget.
    run(&["a", "b", "c"]);
    assert_eq!(over(), 0);
    // One slow call among several: the batch cannot tell which one, so it
    // blames none and the next batch is timed call by call.
    run(&["a", "slow", "b"]);
    assert_eq!(over(), 0);
    run(&["slow", "a", "slow"]);
    assert_eq!(over(), 2, "each slow call of the timed batch counts");
    // That batch had calls over the budget: the next is timed as well, and
    // three slow calls in a row open the breaker.
    run(&["slow", "slow"]);
    assert_eq!(over(), 4);
    assert_eq!(handle.breaker_state(), BreakerState::Open);
    assert_eq!(handle.stats().calls.load(Relaxed), 11);

    // A batch of one call is always judged exactly.
    let single = guarded(
        |_| {
            std::thread::sleep(Duration::from_millis(3));
            Ok(ProcessingAction::Continue)
        },
        quick_breaker(5, 60_000).with_time_budget(Duration::from_millis(2)),
    );
    let mut one = [message("x")];
    single.call_each(one.iter_mut().enumerate(), Instant::now(), &mut Vec::new());
    assert_eq!(single.stats().over_budget.load(Relaxed), 1);
}
