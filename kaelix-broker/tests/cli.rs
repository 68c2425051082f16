//! The `kaelix` command-line client against the real broker.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::BrokerProcess;

/// Runs `cmd` and checks that it exits zero (showing its stderr if not).
fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kaelix(broker: &BrokerProcess) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaelix"));
    cmd.arg("--server").arg(broker.addr());
    cmd
}

#[test]
fn sub_prints_what_pub_sends_and_both_exit_zero() {
    let broker = BrokerProcess::start(&[]);
    let mut sub = kaelix(&broker)
        .args(["sub", "greetings.>", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the subscription is confirmed before publishing.
    let mut stderr = BufReader::new(sub.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("subscribed to greetings.>"), "{line:?}");

    succeed(kaelix(&broker).args(["pub", "greetings.world", "hello there"]));
    succeed(kaelix(&broker).args(["pub", "greetings.moon", "hi", "--count", "2"]));

    let status = wait(&mut sub, Duration::from_secs(20));
    assert!(status.success());
    let mut printed = String::new();
    sub.stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert_eq!(
        printed,
        "greetings.world hello there\ngreetings.moon hi\ngreetings.moon hi\n"
    );
}

#[test]
fn pub_fails_with_the_reason() {
    let broker = BrokerProcess::start(&[]);
    let out = kaelix(&broker)
        .args(["pub", "bad topic", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Topic name contains invalid characters"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kaelix"))
        .args(["--server", "127.0.0.1:1", "pub", "a", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn queue_group_members_share_the_messages() {
    let broker = BrokerProcess::start(&[]);
    let start = || {
        let mut child = kaelix(&broker)
            .args(["sub", "work", "--queue", "crew", "--count", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("subscribed"), "{line:?}");
        child
    };
    let (mut a, mut b) = (start(), start());
    let out = kaelix(&broker)
        .args(["pub", "work", "job", "--count", "4"])
        .output()
        .unwrap();
    assert!(out.status.success());
    for child in [&mut a, &mut b] {
        assert!(wait(child, Duration::from_secs(20)).success());
        let mut printed = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        assert_eq!(printed, "work job\nwork job\n");
    }
}

#[test]
fn sub_from_replays_what_the_broker_holds_with_offsets() {
    let broker = BrokerProcess::start(&[]);
    for text in ["zero", "one", "two", "three"] {
        let out = kaelix(&broker)
            .args(["pub", "history", text])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let out = kaelix(&broker)
        .args([
            "sub",
            "history",
            "--from",
            "offset:1",
            "--offsets",
            "-n",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1 history one\n2 history two\n3 history three\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("from offset:1"));

    let out = kaelix(&broker)
        .args(["sub", "history", "--from", "last:1", "-n", "1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "history three\n");

    let out = kaelix(&broker)
        .args(["sub", "history", "--from", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown start position"), "{stderr}");
    let out = kaelix(&broker)
        .args(["sub", "history", "--queue", "q", "--from", "earliest"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be combined"));
}

fn wait(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stats_prints_a_summary_and_json_with_rates() {
    let broker = BrokerProcess::start(&[]);
    let out = kaelix(&broker)
        .args(["pub", "stats.demo", "x", "--count", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let out = kaelix(&broker)
        .args(["stats", "--interval", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for part in [
        "kaelix-broker ",
        "health        ",
        "connections   1 open, 2 accepted",
        "closed        1 (client_closed 1)",
        "messages      3 published",
        "runtime       ",
    ] {
        assert!(text.contains(part), "{part:?} missing from\n{text}");
    }

    let out = kaelix(&broker)
        .args(["stats", "--json", "--interval", "0.2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["messages"]["published"], 3);
    assert_eq!(json["publishes"]["refused"]["payload-too-large"], 0);
    assert_eq!(json["connections"]["accepted"], 3);
    assert!(json["health"]["status"].is_string());
    assert_eq!(json["rates"]["over_seconds"], 0.2);
    assert_eq!(json["rates"]["published_per_second"], 0.0);
}

#[test]
fn pub_with_a_key_and_sub_with_partitions() {
    let (_dir, broker) =
        BrokerProcess::with_config("[[topics]]\npattern = \"keys.*\"\npartitions = 4\n");
    let partition = kaelix_core::PartitionId::for_key(b"alice", 4).get();
    for text in ["first", "second"] {
        succeed(kaelix(&broker).args(["pub", "keys.a", text, "--key", "alice"]));
    }
    let out = kaelix(&broker)
        .args(["pub", "keys.a", "elsewhere", "--partition"])
        .arg(((partition + 1) % 4).to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = succeed(
        kaelix(&broker)
            .args([
                "sub",
                "keys.*",
                "--from",
                "earliest",
                "--offsets",
                "-n",
                "2",
            ])
            .args(["--partitions", &partition.to_string()]),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{partition}/0 keys.a first\n{partition}/1 keys.a second\n")
    );

    let out = kaelix(&broker)
        .args(["pub", "keys.a", "x", "--partition", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keys.a has 4 partitions"), "{stderr}");
}
