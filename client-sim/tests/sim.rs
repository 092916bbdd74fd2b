//! `pigeon-sim connect` against a real standalone server (started in this process, on
//! ephemeral ports, with its own data directory).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Harness {
    running: pigeon_server::standalone::Standalone,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = pigeon_server::config::Settings::load(None, Vec::new()).expect("defaults");
    settings.data_dir = dir.path().to_owned();
    settings.listen.websocket = "127.0.0.1:0".parse().expect("addr");
    settings.listen.http = "127.0.0.1:0".parse().expect("addr");
    let running = pigeon_server::standalone::start(settings)
        .await
        .expect("standalone starts");
    Harness { running, _dir: dir }
}

impl Harness {
    async fn push(&self, uid: &str, payload: Value) -> Value {
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/push", self.running.http_addr))
            .bearer_auth(&self.running.apps[0].api_key)
            .json(&json!({"audience": {"uids": [uid]}, "payload": payload, "ttl": 60}))
            .send()
            .await
            .expect("push");
        assert_eq!(response.status().as_u16(), 202);
        response.json().await.expect("json")
    }

    fn credential(&self, uid: &str) -> String {
        let now = pigeon_server::message::unix_millis() / 1000;
        let app = &self.running.apps[0];
        pigeon_proto::credential::mint(&app.id, app.signing_key(), uid, now, 600)
    }
}

fn sim(
    harness: &Harness,
    credential: &str,
    state: &std::path::Path,
    count: u32,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_pigeon-sim"))
        .args(["connect", "--url"])
        .arg(format!("ws://{}/", harness.running.devices.websocket))
        .args(["--credential", credential, "--state"])
        .arg(state)
        .args(["--count", &count.to_string()])
        .env("PIGEON_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pigeon-sim")
}

fn lines(output: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_prints_pushes_and_resumes_from_its_state_file() {
    let harness = start().await;
    let credential = harness.credential("pat");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("pat.state");

    let first = sim(&harness, &credential, &state, 1);
    // Push until the device is bound to the uid (the simulator is connecting meanwhile).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = harness.push("pat", json!({"n": 1})).await;
        if body["targets"]["unknown"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the simulator never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = first.wait_with_output().expect("sim output");
    assert!(output.status.success());
    let printed = lines(&output);
    assert_eq!(printed.len(), 1);
    assert_eq!(printed[0]["seq"], 1);
    assert_eq!(printed[0]["payload"], json!({"n": 1}));
    assert!(
        printed[0]["message_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32)
    );

    // Offline while two more arrive; the next run resumes the same device from its state.
    harness.push("pat", json!({"n": 2})).await;
    harness.push("pat", json!({"n": 3})).await;
    let output = sim(&harness, &credential, &state, 2)
        .wait_with_output()
        .expect("sim output");
    let printed = lines(&output);
    let seqs: Vec<_> = printed.iter().map(|line| line["seq"].as_u64()).collect();
    assert_eq!(seqs, [Some(2), Some(3)]);
    assert_eq!(printed[1]["payload"], json!({"n": 3}));
}
