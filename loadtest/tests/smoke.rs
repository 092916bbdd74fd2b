//! Each scenario at tiny scale, against a deployment the harness starts itself (its own
//! `redis-server`, a `pigeon node`, a `pigeon gateway`, `pigeon-sim swarm`), so that the
//! harness cannot rot. `cargo test --workspace` builds the binaries it drives.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where cargo put `pigeon-load`, and with it `pigeon` and `pigeon-sim`.
fn bin_dir() -> PathBuf {
    let load = Path::new(env!("CARGO_BIN_EXE_pigeon-load"));
    let dir = load.parent().expect("bin dir").to_owned();
    for bin in ["pigeon", "pigeon-sim"] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is not built in {}: run `cargo test --workspace` (or `cargo build --bins`)",
            dir.display()
        );
    }
    dir
}

/// Runs a scenario; its result.json.
fn run(args: &[&str]) -> serde_json::Value {
    let out = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_pigeon-load"))
        .args(args)
        .args(["--devices", "30", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run pigeon-load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pigeon-load {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("result: OK"), "{stdout}");
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html");
    assert!(html.contains("<svg") && !html.contains("<script"));
    let text = std::fs::read_to_string(out.path().join("result.json")).expect("result.json");
    let result: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(result["ok"], true, "{result}");
    assert!(!result["timeline"].as_array().expect("timeline").is_empty());
    result
}

#[test]
fn idle_reports_memory_per_connection() {
    let result = run(&["idle", "--hold", "1"]);
    let figures = &result["figures"];
    assert!(
        figures["node RSS per connection (bytes)"]
            .as_f64()
            .expect("node")
            > 0.0
    );
    assert!(figures["simulator bytes per device"].is_number());
    assert!(figures["kernel socket slab per connection, both ends (bytes)"].is_number());
    assert!(figures["connect rate (devices/s)"].as_f64().expect("rate") > 0.0);
}

#[test]
fn unicast_over_http_and_grpc_reports_latency_percentiles() {
    for api in ["http", "grpc"] {
        let result = run(&["unicast", "--rate", "100", "--duration", "1", "--api", api]);
        let latency = &result["latency"];
        assert!(
            latency["count"].as_u64().expect("count") > 50,
            "{api}: {latency}"
        );
        assert!(latency["p50"].as_u64().expect("p50") <= latency["p99"].as_u64().expect("p99"));
        assert_eq!(
            result["figures"]["pushes received"],
            result["figures"]["accepted pushes"]
        );
    }
}

#[test]
fn broadcast_reaches_every_device() {
    let result = run(&["broadcast"]);
    assert_eq!(result["figures"]["pushes received"], 30);
    assert!(result["figures"]["time to last delivery (ms, median)"].is_number());
}

#[test]
fn a_broadcast_to_a_tag_reaches_its_members_only() {
    let result = run(&["broadcast", "--tag-every", "3", "--rounds", "2"]);
    let figures = &result["figures"];
    assert_eq!(figures["tag members"], 10);
    assert_eq!(figures["pushes received"], 20);
    assert!(
        figures["Redis commands, first push to last delivery"]
            .as_u64()
            .expect("commands")
            > 0
    );
}

#[test]
fn a_standalone_broadcast_against_the_loopback_floor() {
    let result = run(&["broadcast", "--standalone", "--floor", "--rounds", "2"]);
    let figures = &result["figures"];
    assert_eq!(figures["pushes received"], 60);
    assert_eq!(figures["node processes"], 1);
    assert!(
        figures["loopback floor, deliveries per second (median)"]
            .as_f64()
            .expect("floor")
            > 0.0
    );
    assert!(
        figures["share of the floor (median of the rounds)"]
            .as_f64()
            .expect("share")
            > 0.0
    );
}

/// A second app floods while the measured one pushes, in two rounds: both phases measured
/// in each, nothing of the measured app's lost, and the flood answered.
#[test]
fn isolation_measures_the_app_alone_and_under_a_flood() {
    let result = run(&[
        "isolation",
        "--standalone",
        "--rate",
        "20",
        "--duration",
        "1",
        "--rounds",
        "2",
    ]);
    let figures = &result["figures"];
    assert_eq!(
        figures["measured pushes accepted alone / flooded"],
        "40 / 40"
    );
    let each = figures["measured p99 flooded / alone, each round"]
        .as_str()
        .expect("each round");
    assert_eq!(each.split(" / ").count(), 2, "{figures}");
    assert!(
        figures["measured p99 flooded / alone, median of the rounds"]
            .as_f64()
            .expect("median")
            > 0.0
    );
    assert!(
        figures["flood app alone: accepted pushes to all per second"]
            .as_f64()
            .expect("capacity")
            > 0.0
    );
    assert!(
        figures["measured p99 flooded / alone"]
            .as_f64()
            .expect("ratio")
            > 0.0
    );
}

/// Devices that report what they open: the node takes the reports (no device is cut off).
#[test]
fn devices_report_pushes_opened() {
    let result = run(&[
        "unicast",
        "--rate",
        "50",
        "--duration",
        "1",
        "--open-every",
        "2",
    ]);
    let figures = &result["figures"];
    let received = figures["pushes received"].as_u64().expect("received");
    let opened = figures["pushes reported opened"].as_u64().expect("opened");
    assert!(received >= 40, "{figures}");
    assert_eq!(opened, received / 2, "{figures}");
    assert_eq!(figures["unexpected disconnects"], 0, "{figures}");
}

/// Pushes scheduled for one second through two gateways, one SIGKILLed just after it:
/// every push arrives, once (the run fails on a loss or a second copy).
#[test]
fn a_scheduled_burst_survives_a_gateway_kill() {
    let result = run(&[
        "schedule-burst",
        "--pushes",
        "300",
        "--gateways",
        "2",
        "--kill-gateway",
        "--lead",
        "4",
    ]);
    let figures = &result["figures"];
    assert_eq!(figures["pushes accepted (202 scheduled)"], 300);
    assert_eq!(figures["deliveries counted by the devices"], 300);
    assert_eq!(
        figures["gateway SIGKILLed after the due second (ms)"],
        "300"
    );
}

/// The floor alone, spread over writer processes: every socket is read, in every round.
#[test]
fn the_floor_spreads_over_writer_processes() {
    let output = Command::new(env!("CARGO_BIN_EXE_pigeon-load"))
        .args(["floor", "--sockets", "301", "--per-process", "100"])
        .args(["--rounds", "2"])
        .output()
        .expect("run pigeon-load floor");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rounds: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("round"))
        .collect();
    assert_eq!(rounds.len(), 2, "{stdout}");
    for round in rounds {
        assert!(round.contains("301 sockets, 4 writer processes"), "{round}");
    }
    assert!(stdout.contains("loopback floor, median of 2"), "{stdout}");
}

#[test]
fn a_reconnect_storm_replays_every_stored_message() {
    let result = run(&["reconnect-storm", "--messages", "3"]);
    assert_eq!(result["figures"]["pushes received"], 90);
    assert!(result["figures"]["all replayed after (s)"].is_number());
}

#[test]
fn idle_over_wss_and_quic() {
    for transport in ["wss", "quic"] {
        let result = run(&["idle", "--hold", "1", "--transport", transport]);
        assert_eq!(result["figures"]["transport"], transport);
        assert!(result["figures"]["node RSS per connection (bytes)"].is_number());
    }
}

/// A running `pigeon standalone`, killed when dropped.
struct Standalone {
    child: std::process::Child,
    ws_url: String,
    http_url: String,
    _data: tempfile::TempDir,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn standalone() -> Standalone {
    use std::io::BufRead as _;
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(bin_dir().join("pigeon"))
        .arg("standalone")
        .env("PIGEON_DATA_DIR", data.path())
        .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
        .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0")
        .env("PIGEON_APPS__0__ID", "smoke")
        .env("PIGEON_APPS__0__API_KEY", "smoke-api-key-0123456789")
        .env(
            "PIGEON_APPS__0__SECRET",
            "smoke-secret-0123456789abcdef-0123456789",
        )
        .env("PIGEON_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start pigeon standalone");
    let stdout = child.stdout.take().expect("stdout");
    let (mut ws_url, mut http_url) = (None, None);
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("a line");
        if let Some(url) = line.trim().strip_prefix("device websocket: ") {
            ws_url = Some(url.trim().to_owned());
        }
        if let Some(url) = line.trim().strip_prefix("push api: ") {
            http_url = Some(url.trim().trim_end_matches("/v1/push").to_owned());
        }
        if ws_url.is_some() && http_url.is_some() {
            break;
        }
    }
    // Keep reading, as a supervisor would, so the server never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Standalone {
        child,
        ws_url: ws_url.expect("the device URL"),
        http_url: http_url.expect("the push API URL"),
        _data: data,
    }
}

#[test]
fn a_running_deployment_is_driven_by_its_urls() {
    let server = standalone();
    let deployment = [
        "--ws-url",
        server.ws_url.as_str(),
        "--http-url",
        server.http_url.as_str(),
        "--app",
        "smoke",
        "--api-key",
        "smoke-api-key-0123456789",
        "--secret",
        "smoke-secret-0123456789abcdef-0123456789",
    ];
    let broadcast = run(&[&["broadcast"][..], &deployment].concat());
    assert_eq!(broadcast["figures"]["pushes received"], 30);
    assert_eq!(broadcast["figures"]["node processes"], 1);
    let unicast = run(&[
        &["unicast", "--rate", "50", "--duration", "1"][..],
        &deployment,
    ]
    .concat());
    assert_eq!(
        unicast["figures"]["pushes received"],
        unicast["figures"]["accepted pushes"]
    );
}
