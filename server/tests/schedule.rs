//! Scheduled pushes (`send_at`): accepted with 202 and a message id, sent no earlier than
//! asked, once, by one process however many gateways run, surviving a SIGKILL of the
//! process that accepted them; cancellable until sent (then 409); bad times are 400s.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use pigeon_client::{Connection, DeviceState};
use pigeon_server::message::unix_millis;
use serde_json::{Value, json};
use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, assert_no_push, connect, next_push, payload};

/// RFC 3339 for unix ms.
fn at(unix_ms: u64) -> String {
    pigeon_server::api::rfc3339(unix_ms)
}

fn scheduled(uid: &str, n: u64, send_at_ms: u64) -> Value {
    json!({"audience": {"uids": [uid]}, "payload": {"n": n}, "send_at": at(send_at_ms), "ttl": 300})
}

/// Every push `device` gets within `quiet` of the last one, acknowledged, as (payload n,
/// unix ms received).
async fn drain(device: &mut Connection, quiet: Duration) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    while let Ok(Ok(push)) = tokio::time::timeout(quiet, device.next_push()).await {
        device.ack_push(&push).await.expect("ack");
        got.push((payload(&push)["n"].as_u64().expect("n"), unix_millis()));
    }
    got
}

#[tokio::test]
async fn scheduled_pushes_arrive_on_time_and_can_be_cancelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let send_at = unix_millis() + 1500;
    let (status, answer) = server.push(scheduled("ann", 1, send_at)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["scheduled"], true, "{answer}");
    assert_eq!(answer["send_at"], at(send_at), "{answer}");
    let sent_id = answer["message_id"].as_str().expect("id").to_owned();
    // A retried request with an idempotency key finds the push it scheduled.
    let mut keyed = scheduled("ann", 3, send_at + 100);
    keyed["idempotency_key"] = json!("promo-1");
    let (status, first) = server.push(keyed.clone()).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["scheduled"], true, "{first}");
    let (status, retried) = server.push(keyed).await;
    assert_eq!(status, 202, "{retried}");
    assert_eq!(retried["duplicate"], true, "{retried}");
    assert_eq!(retried["message_id"], first["message_id"]);
    let (status, answer) = server.push(scheduled("ann", 2, send_at + 200)).await;
    assert_eq!(status, 202, "{answer}");
    let cancelled_id = answer["message_id"].as_str().expect("id").to_owned();
    let path = format!("/v1/messages/{cancelled_id}");
    let (status, answer) = server.call("DELETE", &path, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cancelled"], true);
    let (status, answer) = server.call("DELETE", &path, None).await;
    assert_eq!(status, 404, "cancelled twice: {answer}");

    assert_no_push(&mut ann, Duration::from_millis(1000)).await;
    let push = next_push(&mut ann).await;
    let arrived = unix_millis();
    assert_eq!(payload(&push), json!({"n": 1}));
    assert_eq!(push.message_id, sent_id);
    assert!(arrived >= send_at, "arrived {} ms early", send_at - arrived);
    assert!(
        arrived < send_at + 2000,
        "arrived {} ms late",
        arrived - send_at
    );
    ann.ack_push(&push).await.expect("ack");
    // The keyed one, once.
    let push = next_push(&mut ann).await;
    assert_eq!(payload(&push), json!({"n": 3}));
    ann.ack_push(&push).await.expect("ack");
    // The cancelled one never comes.
    assert_no_push(&mut ann, Duration::from_millis(800)).await;
    let (status, answer) = server
        .call("DELETE", &format!("/v1/messages/{sent_id}"), None)
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "already_sent");
    let (status, _) = server.call("DELETE", "/v1/messages/nope", None).await;
    assert_eq!(status, 404);

    let now = unix_millis();
    for send_at in [
        json!("tomorrow"),
        json!("2020-01-01T00:00:00Z"),
        json!(at(now + 31 * 24 * 3600 * 1000)),
        json!(12),
    ] {
        let body = json!({"audience": {"uids": ["ann"]}, "payload": {}, "send_at": send_at});
        let (status, answer) = server.push(body).await;
        assert_eq!(status, 400, "{send_at}: {answer}");
        assert_eq!(answer["error"]["field"], "send_at", "{answer}");
    }
}

/// A push scheduled just before a SIGKILL is sent after the restart.
#[tokio::test]
async fn a_scheduled_push_survives_a_standalone_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let ann = connect(&server, "ann", &DeviceState::default()).await;
    let state = DeviceState {
        device_token: ann.welcome().device_token.clone(),
        ..DeviceState::default()
    };
    drop(ann);
    let send_at = unix_millis() + 1000;
    let (status, answer) = server.push(scheduled("ann", 7, send_at)).await;
    assert_eq!(status, 202, "{answer}");
    server.restart();
    let mut ann = connect(&server, "ann", &state).await;
    let got = drain(&mut ann, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, 7);
    assert!(got[0].1 >= send_at);
}

/// Two gateways: every scheduled push is sent once; one accepted by a gateway that is then
/// SIGKILLed is sent by the other.
#[tokio::test]
async fn scheduled_pushes_are_sent_once_by_one_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let mut first = GatewayProcess::start(&deployment, &[]);
    let second = GatewayProcess::start(&deployment, &[]);
    let mut device = cluster::connect(&node, "u1", &DeviceState::default()).await;
    let send_at = unix_millis() + 1500;
    for n in 0..20 {
        let gateway = if n % 2 == 0 { &first } else { &second };
        let (status, answer) = gateway.push(scheduled("u1", n, send_at)).await;
        assert_eq!(status, 202, "{answer}");
    }
    // One more, accepted by the first gateway, which dies at once.
    let (status, answer) = first.push(scheduled("u1", 20, send_at)).await;
    assert_eq!(status, 202, "{answer}");
    first.kill();
    // Cancelled through the surviving gateway: the schedule is shared.
    let (status, answer) = second.push(scheduled("u1", 21, send_at)).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["message_id"].as_str().expect("id");
    let (status, answer) = second
        .call("DELETE", &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(status, 200, "{answer}");

    let got = drain(&mut device, Duration::from_secs(3)).await;
    let mut times: HashMap<u64, usize> = HashMap::new();
    for (n, received) in &got {
        *times.entry(*n).or_default() += 1;
        assert!(
            *received >= send_at,
            "push {n} came {} ms early",
            send_at - received
        );
    }
    for n in 0..=20 {
        assert_eq!(times.get(&n), Some(&1), "push {n}: {got:?}");
    }
    assert_eq!(times.get(&21), None, "the cancelled push came: {got:?}");
}
