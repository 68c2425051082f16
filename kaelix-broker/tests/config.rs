//! `kaelix-broker --check-config` and `--print-default-config`, and the
//! guide's "Configuration Validation" snippet.

use std::process::{Command, Output};

use kaelix_core::config::{ConfigValidator, MemoryStreamerConfig};

fn broker(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaelix-broker"));
    cmd.current_dir(dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kaelix-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn print_default_config_prints_the_shipped_file() {
    let out = broker(&["--print-default-config"], &[], &std::env::temp_dir());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        kaelix_core::config::DEFAULT_CONFIG_TOML
    );
}

#[test]
fn check_config_marks_where_each_value_came_from() {
    let dir = temp_dir("check");
    let file = dir.join("custom.toml");
    std::fs::write(
        &file,
        "[network]\nport = 9100\n[runtime]\ntask_queue_depth = 100\n",
    )
    .unwrap();
    let out = broker(
        &["--check-config", "--config", file.to_str().unwrap()],
        &[("KAELIX_RUNTIME_TASK_QUEUE_DEPTH", "200")],
        &dir,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("port = 9100  # file {}", file.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "task_queue_depth = 200  # environment variable KAELIX_RUNTIME_TASK_QUEUE_DEPTH"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("host = \"0.0.0.0\"  # default"), "{stdout}");
    // The output is itself a valid configuration.
    let reparsed: MemoryStreamerConfig = toml::from_str(&stdout).unwrap();
    assert_eq!(reparsed.network.port, 9100);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_lists_every_problem_and_fails() {
    let dir = temp_dir("check-bad");
    std::fs::write(
        dir.join("kaelix.toml"),
        "[network]\nmax_connections = 0\n[limits]\nmax_frame_bytes = 3\n",
    )
    .unwrap();
    let out = broker(
        &["--check-config"],
        &[("KAELIX_RUNTIME_PRIORITY_LEVELS", "0")],
        &dir,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Configuration validation failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("network.max_connections: must be at least 1 (in file kaelix.toml)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("limits.max_frame_bytes: must be between 64"),
        "{stderr}"
    );
    assert!(
        stderr.contains("runtime.priority_levels: must be 1 to 4, not 0 (in environment variable KAELIX_RUNTIME_PRIORITY_LEVELS)"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configuration_validation_from_the_guide() -> Result<(), Box<dyn std::error::Error>> {
    // Validate configuration
    let config = MemoryStreamerConfig::default();
    ConfigValidator::validate(&config)?;

    // Environment compatibility check
    let validator = ConfigValidator::new();
    let warnings = validator.validate_environment_compatibility(&config)?;

    for warning in warnings {
        println!("Warning: {}", warning);
    }

    let mut broken = MemoryStreamerConfig::default();
    broken.network.max_connections = 0;
    let err = ConfigValidator::validate(&broken).unwrap_err().to_string();
    assert!(
        err.starts_with("Configuration validation failed")
            && err.contains("network.max_connections: must be at least 1"),
        "{err}"
    );
    Ok(())
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let dir = temp_dir("precedence");
    std::fs::write(
        dir.join("kaelix.toml"),
        "[network]\nport = 9001\nmax_connections = 11\n[limits]\nmax_pending_messages = 5\n\
         [telemetry.metrics.prometheus]\nport = 9200\n[security.tls]\ncert_path = \"file.pem\"\n",
    )
    .unwrap();
    let out = broker(
        &[
            "--check-config",
            "--port",
            "9003",
            "--set",
            "limits.max_pending_messages=7",
            "--set",
            "security.tls.cert_path=flag.pem",
        ],
        &[
            ("KAELIX_NETWORK_PORT", "9002"),
            ("KAELIX_NETWORK_MAX_CONNECTIONS", "12"),
            ("KAELIX_LIMITS_MAX_PENDING_MESSAGES", "6"),
            ("KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT", "9300"),
            ("KAELIX_SECURITY_TLS_CERT_PATH", "env.pem"),
            ("KAELIX_SECURITY_TLS_KEY_PATH", "key.pem"),
        ],
        &dir,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "port = 9003  # command-line flag --port",
        "max_connections = 12  # environment variable KAELIX_NETWORK_MAX_CONNECTIONS",
        "max_pending_messages = 7  # command-line flag --set limits.max_pending_messages",
        "max_frame_bytes = 1114112  # default",
        "port = 9300  # environment variable KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT",
        "cert_path = \"flag.pem\"  # command-line flag --set security.tls.cert_path",
        "key_path = \"key.pem\"  # environment variable KAELIX_SECURITY_TLS_KEY_PATH",
    ] {
        assert!(stdout.contains(line), "{line} missing from\n{stdout}");
    }
    let bad = broker(&["--check-config", "--set", "netwrok.port=1"], &[], &dir);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("netwrok") && stderr.contains("--set netwrok.port"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tls_enabled_without_its_files_is_a_problem_and_unreadable_files_a_warning() {
    let dir = temp_dir("tls");
    let out = broker(
        &["--check-config"],
        &[("KAELIX_SECURITY_TLS_ENABLED", "true")],
        &dir,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in [
        "security.tls.cert_path: required when security.tls.enabled is true",
        "security.tls.key_path: required when security.tls.enabled is true",
    ] {
        assert!(stderr.contains(line), "{line} missing from {stderr}");
    }
    let out = broker(
        &[
            "--check-config",
            "--set",
            "security.tls.client_ca_path=missing-ca.pem",
        ],
        &[],
        &dir,
    );
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: security.tls.client_ca_path: cannot read missing-ca.pem"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_broker_refuses_to_start_with_an_unusable_certificate() {
    let dir = temp_dir("tls-start");
    std::fs::write(dir.join("cert.pem"), "not used").unwrap();
    let out = broker(
        &["--port", "0"],
        &[
            ("KAELIX_SECURITY_TLS_ENABLED", "true"),
            ("KAELIX_SECURITY_TLS_CERT_PATH", "cert.pem"),
            ("KAELIX_SECURITY_TLS_KEY_PATH", "cert.pem"),
        ],
        &dir,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TLS: cert.pem: no PEM certificate in the file"),
        "{stderr}"
    );
    assert!(stderr.contains("refusing to serve plain TCP"), "{stderr}");
    assert!(out.stdout.is_empty(), "it listened: {:?}", out.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_makes_each_plugin_with_its_config() {
    let dir = temp_dir("check-plugins");
    let good = "[[plugins]]\nname = \"size_cap\"\npattern = \"orders.>\"\n\
                [plugins.config]\nmax_bytes = 1024\n";
    std::fs::write(dir.join("kaelix.toml"), good).unwrap();
    let out = broker(&["--check-config"], &[], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");

    // An unknown plugin and a bad config table fail, naming the entry.
    let cases = [
        (
            "[[plugins]]\nname = \"no_such_plugin\"\n",
            "plugins[0].name: no plugin \"no_such_plugin\"",
        ),
        (
            "[[plugins]]\nname = \"size_cap\"\n[plugins.config]\nmax_bytse = 1024\n",
            "max_bytse",
        ),
        (
            "[[plugins]]\nname = \"header_stamp\"\n[plugins.config]\ntime_format = \"iso\"\n",
            "time_format",
        ),
    ];
    for (file, expected) in cases {
        std::fs::write(dir.join("kaelix.toml"), file).unwrap();
        let out = broker(&["--check-config"], &[], &dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
        assert!(!stderr.contains("configuration is valid"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_cluster_key_is_named() {
    let dir = temp_dir("cluster");
    let node = [
        ("KAELIX_CLUSTER_ENABLED", "true"),
        ("KAELIX_CLUSTER_NODE_ID", "1"),
        ("KAELIX_CLUSTER_ADVERTISE", "127.0.0.1:7222"),
        ("KAELIX_CLUSTER_SEEDS", "[nowhere]"),
    ];
    let out = broker(&["--check-config"], &node, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cluster.seeds[0]"), "{stderr}");
    // The broker itself does not start on it either.
    let out = broker(&[], &node, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cluster.seeds[0]"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
