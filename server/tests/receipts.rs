//! A message's status (`GET /v1/messages/{id}`) through its life: recorded for its
//! targets, handed to connections and acknowledged (counted by the process holding the
//! connections and flushed to the store four times a second), waiting for an offline
//! device until it reconnects, expired, dropped (TTL 0), scheduled and cancelled; a push
//! stored once counts the devices that got it. In standalone (embedded store) and cluster
//! mode (the node counts, Redis keeps, the gateway answers); another app's id is a 404.

mod support;

use std::time::{Duration, Instant};

use pigeon_client::{Connection, DeviceState};
use pigeon_proto::push::GetMessageRequest;
use pigeon_proto::push::push_client::PushClient;
use serde_json::{Value, json};
use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, WAIT, connect, next_push};

/// Asks for a status (or the statistics) until `done` holds of it; the last one seen.
async fn status_until<F, Fut>(get: F, done: impl Fn(&Value) -> bool) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let begin = Instant::now();
    loop {
        let (status, body) = get().await;
        // A status is written within about 10 ms of the push's answer.
        let early = begin.elapsed() < Duration::from_secs(1);
        assert!(status == 200 || (status == 404 && early), "{status} {body}");
        if status == 200 && done(&body) {
            return body;
        }
        assert!(begin.elapsed() < WAIT, "status never got there: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Receives one push and acknowledges it; its message id.
async fn receive(device: &mut Connection) -> String {
    let push = next_push(device).await;
    device.ack_push(&push).await.expect("ack");
    push.message_id
}

fn counts(body: &Value) -> (u64, u64) {
    let count = |key: &str| body["counts"][key].as_u64().unwrap_or(u64::MAX);
    (count("delivered"), count("acked"))
}

/// A server stopped with SIGTERM right after a device acknowledged a push keeps what it had
/// not written yet (the push's status and counts, the statistics): it writes them before
/// its store closes.
#[tokio::test]
async fn counts_not_yet_flushed_survive_a_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let mut cy = connect(&server, "cy", &DeviceState::default()).await;
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["cy"]}, "payload": {"n": 1}}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = receive(&mut cy).await;
    cy.close().await;
    assert!(server.terminate(), "pigeon did not exit cleanly on SIGTERM");
    server.restart();
    let path = format!("/v1/messages/{id}");
    let (status, body) = server.call("GET", &path, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body), (1, 1), "{body}");
    let (status, body) = server.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 200, "{body}");
    let notification = [1, 1, 1, 1, 0];
    assert_eq!(
        stats_sums(&body),
        sums(&[
            ("realtime", [0; 5]),
            ("notification", notification),
            ("marketing", [0; 5])
        ]),
        "{body}"
    );
}

#[tokio::test]
async fn a_message_status_follows_its_life_in_standalone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let bob_state = support::offline_device(&server, "bob").await;

    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann", "bob"]}, "payload": {"n": 1}, "ttl": 300}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, id);
    let path = format!("/v1/messages/{id}");
    let get = || server.call("GET", &path, None);
    let body = status_until(get, |body| counts(body) == (1, 1)).await;
    assert_eq!(body["message_id"], id.as_str());
    assert_eq!(body["state"], "accepted");
    assert_eq!(body["class"], "notification");
    assert_eq!(body["audience"], "direct");
    assert_eq!(body["counts"]["targets"], 2, "{body}");
    assert_eq!(body["counts"]["waiting"], 1, "bob's copy waits: {body}");
    assert_eq!(body["counts"]["expired"], 0, "{body}");
    assert!(body["accepted_at"].is_string() && body["expires_at"].is_string());

    // Bob comes back: his stored copy is handed over and acknowledged.
    let mut bob = connect(&server, "bob", &bob_state).await;
    assert_eq!(receive(&mut bob).await, id);
    let body = status_until(get, |body| counts(body) == (2, 2)).await;
    assert_eq!(body["counts"]["waiting"], 0, "{body}");
    assert_eq!(body["counts"]["opened"], 0, "{body}");

    // Opened: once per device, however often, on whichever connection.
    ann.opened(&id).await.expect("opened");
    ann.opened(&id).await.expect("opened");
    let body = status_until(get, |body| body["counts"]["opened"] == 1).await;
    assert_eq!(counts(&body), (2, 2));
    let ann_state = DeviceState {
        device_token: ann.welcome().device_token.clone(),
        last_seq: 1,
        ..DeviceState::default()
    };
    drop(ann);
    let mut ann = connect(&server, "ann", &ann_state).await;
    ann.opened(&id).await.expect("opened");
    bob.opened(&id).await.expect("opened");
    bob.opened("no-such-message").await.expect("opened");
    status_until(get, |body| body["counts"]["opened"] == 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, body) = get().await;
    assert_eq!(
        body["counts"]["opened"], 2,
        "ann's second connection counted again: {body}"
    );
    let (status, _) = server
        .call("GET", "/v1/messages/no-such-message", None)
        .await;
    assert_eq!(status, 404, "an opened report makes no message");

    // A copy nobody picks up expires with its TTL.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["bob"]}, "payload": {"n": 2}, "ttl": 1}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let short = format!(
        "/v1/messages/{}",
        answer["message_id"].as_str().expect("id")
    );
    let body = status_until(|| server.call("GET", &short, None), |_| true).await;
    assert_eq!(body["state"], "accepted", "{body}");
    assert_eq!(body["counts"]["waiting"], 1, "{body}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = server.call("GET", &short, None).await;
    assert_eq!(body["state"], "expired", "{body}");
    assert_eq!(body["counts"]["expired"], 1, "{body}");
    assert_eq!(body["counts"]["waiting"], 0, "{body}");

    // TTL 0: handed to ann at once; bob, offline, never gets it.
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann", "bob"]}, "payload": {"n": 3}, "ttl": 0}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let now_id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, now_id);
    let now_path = format!("/v1/messages/{now_id}");
    let body = status_until(
        || server.call("GET", &now_path, None),
        |body| counts(body) == (1, 1),
    )
    .await;
    assert_eq!(body["state"], "expired", "{body}");
    assert_eq!(body["counts"]["dropped"], 1, "bob's copy: {body}");
    assert_eq!(body["counts"]["waiting"], 0, "{body}");

    // A push stored once: the devices that got it, no list of targets.
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"n": 4}, "ttl": 300}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let all_id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, all_id);
    let all_path = format!("/v1/messages/{all_id}");
    let body = status_until(
        || server.call("GET", &all_path, None),
        |body| counts(body) == (1, 1),
    )
    .await;
    assert_eq!(body["audience"], "shared", "{body}");
    assert_eq!(body["counts"]["targets"], Value::Null, "{body}");

    // Scheduled, then cancelled.
    let send_at = pigeon_server::api::rfc3339(pigeon_server::message::unix_millis() + 3_600_000);
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {"n": 5}, "send_at": send_at}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let later = format!(
        "/v1/messages/{}",
        answer["message_id"].as_str().expect("id")
    );
    let (status, body) = server.call("GET", &later, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "scheduled", "{body}");
    assert_eq!(body["send_at"], send_at.as_str(), "{body}");
    let (status, _) = server.call("DELETE", &later, None).await;
    assert_eq!(status, 200);
    let (_, body) = server.call("GET", &later, None).await;
    assert_eq!(body["state"], "cancelled", "{body}");

    // Scheduled, then sent: accepted, and still says when it was due.
    let due_ms = pigeon_server::message::unix_millis() + 500;
    let soon = pigeon_server::api::rfc3339(due_ms);
    let (status, answer) = server
        .push(
            json!({"audience": {"uids": ["ann"]}, "payload": {"n": 6}, "send_at": soon, "ttl": 60}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let fired_id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, fired_id);
    let fired = format!("/v1/messages/{fired_id}");
    let body = status_until(
        || server.call("GET", &fired, None),
        |body| counts(body) == (1, 1),
    )
    .await;
    assert_eq!(body["state"], "accepted", "{body}");
    assert_eq!(body["send_at"], soon.as_str(), "{body}");

    let acked = support::metric(
        &server,
        "pigeon_app_receipts_total{app=\"demo\",class=\"notification\",kind=\"acked\"}",
    )
    .await;
    assert!(acked.is_some_and(|count| count >= 5), "{acked:?}");
    let opened = support::metric(
        &server,
        "pigeon_app_receipts_total{app=\"demo\",class=\"notification\",kind=\"opened\"}",
    )
    .await;
    assert_eq!(opened, Some(2), "ann and bob, each once");

    // Every ack above was timed from its push's acceptance.
    let timed = support::metric(&server, "pigeon_delivery_latency_seconds_count").await;
    assert!(timed.is_some_and(|count| count >= 5), "{timed:?}");
    let fast = support::metric(&server, "pigeon_delivery_latency_seconds_bucket{le=\"10\"}").await;
    assert!(fast.is_some_and(|count| count >= 4), "{fast:?}");

    // Ids that are no message of the app.
    for path in [
        "/v1/messages/no-such-id",
        &format!("/v1/messages/{}", "x".repeat(300)),
    ] {
        let (status, body) = server.call("GET", path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }
}

/// A gateway stopped with SIGTERM right after a push writes the push's status before it
/// exits: another gateway answers it.
#[tokio::test]
async fn a_gateway_stopped_right_after_a_push_keeps_its_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let _node = NodeProcess::start(&deployment, &[]);
    let mut stopping = GatewayProcess::start(&deployment, &[]);
    let answer = stopping.push_to(&["nobody-yet"], json!({"n": 1})).await;
    let id = answer["message_id"].as_str().expect("id").to_owned();
    assert!(
        stopping.terminate(),
        "the gateway did not exit cleanly on SIGTERM"
    );
    let other = GatewayProcess::start(&deployment, &[]);
    let (status, body) = other.call("GET", &format!("/v1/messages/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "accepted", "{body}");
}

#[tokio::test]
async fn cluster_mode_counts_on_the_node_and_answers_on_the_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let other = [
        ("PIGEON_APPS__1__ID", "other"),
        ("PIGEON_APPS__1__API_KEY", "pk_other_app_0123456789"),
        (
            "PIGEON_APPS__1__SECRET",
            "other-app-secret-0123456789abcdef",
        ),
    ];
    let gateway = GatewayProcess::start(&deployment, &other);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;
    let bob = cluster::connect(&node, "bob", &DeviceState::default()).await;
    let bob_state = cluster::state_of(&bob, 0);
    drop(bob);

    let answer = gateway.push_to(&["ann", "bob"], json!({"n": 1})).await;
    let id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, id);
    let path = format!("/v1/messages/{id}");
    let get = || gateway.call("GET", &path, None);
    let body = status_until(get, |body| counts(body) == (1, 1)).await;
    assert_eq!(body["state"], "accepted", "{body}");
    assert_eq!(body["counts"]["targets"], 2, "{body}");
    assert_eq!(body["counts"]["waiting"], 1, "{body}");

    let mut bob = cluster::connect(&node, "bob", &bob_state).await;
    assert_eq!(receive(&mut bob).await, id);
    let body = status_until(get, |body| counts(body) == (2, 2)).await;
    assert_eq!(body["counts"]["waiting"], 0, "{body}");
    for _ in 0..2 {
        ann.opened(&id).await.expect("opened");
        bob.opened(&id).await.expect("opened");
    }
    status_until(get, |body| body["counts"]["opened"] == 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get().await.1["counts"]["opened"], 2, "each device once");

    // A broadcast: each device that got it, counted once per flush by the node.
    let (status, answer) = gateway
        .push(json!({"audience": {"all": true}, "payload": {"n": 2}, "ttl": 300}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let all_id = answer["message_id"].as_str().expect("id").to_owned();
    assert_eq!(receive(&mut ann).await, all_id);
    assert_eq!(receive(&mut bob).await, all_id);
    let all_path = format!("/v1/messages/{all_id}");
    let body = status_until(
        || gateway.call("GET", &all_path, None),
        |body| counts(body) == (2, 2),
    )
    .await;
    assert_eq!(body["audience"], "shared", "{body}");

    // The same over gRPC.
    let mut client = PushClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .expect("gRPC connect");
    let request = |id: &str| {
        cluster::with_api_key(GetMessageRequest {
            message_id: id.to_owned(),
        })
    };
    let status = client
        .get_message(request(&id))
        .await
        .expect("GetMessage")
        .into_inner();
    assert_eq!(
        (
            status.state.as_str(),
            status.audience.as_str(),
            status.targets,
            status.waiting
        ),
        ("accepted", "direct", Some(2), Some(0))
    );
    assert_eq!((status.delivered, status.acked, status.opened), (2, 2, 2));
    let shared = client
        .get_message(request(&all_id))
        .await
        .expect("GetMessage")
        .into_inner();
    assert_eq!((shared.audience.as_str(), shared.targets), ("shared", None));
    let missing = client.get_message(request("no-such-message")).await;
    assert_eq!(missing.expect_err("unknown").code(), tonic::Code::NotFound);

    // Another app does not see this app's messages.
    let (status, body) = support::call(
        &gateway.http_url,
        "pk_other_app_0123456789",
        "GET",
        &path,
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // A copy replaced by a newer push with its collapse key, counted through Redis.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let score =
        |n| json!({"audience": {"uids": ["bob"]}, "payload": {"n": n}, "collapse_key": "s"});
    let (status, answer) = gateway.push(score(1)).await;
    assert_eq!(status, 202, "{answer}");
    let replaced = format!(
        "/v1/messages/{}",
        answer["message_id"].as_str().expect("id")
    );
    let (status, answer) = gateway.push(score(2)).await;
    assert_eq!(status, 202, "{answer}");
    let body = status_until(
        || gateway.call("GET", &replaced, None),
        |body| body["counts"]["collapsed"] == 1,
    )
    .await;
    assert_eq!(body["counts"]["waiting"], 0, "{body}");
}

/// Pushes `body`, accepted; the path of its status.
async fn status_path(server: &Server, body: Value) -> String {
    let (status, answer) = server.push(body).await;
    assert_eq!(status, 202, "{answer}");
    format!(
        "/v1/messages/{}",
        answer["message_id"].as_str().expect("id")
    )
}

/// A copy a newer push put out of a device's queue is counted on the message it replaced
/// (`collapsed` for a collapse key, `dropped` for the per-device cap) and waits no more.
/// The statistics count, in the minute it expired in, each device a direct push expired for
/// before it acknowledged it.
#[tokio::test]
async fn replaced_and_expired_copies_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("PIGEON_LIMITS__MAX_STORED_PER_DEVICE", "2")]);
    let _bob = support::offline_device(&server, "bob").await;
    let to_bob = |n: u64, collapse_key: &str| json!({"audience": {"uids": ["bob"]}, "payload": {"n": n}, "collapse_key": collapse_key});
    let count = |body: &Value, name: &str| body["counts"][name].as_u64();

    let first = status_path(&server, to_bob(1, "score")).await;
    let second = status_path(&server, to_bob(2, "score")).await;
    let body = status_until(
        || server.call("GET", &first, None),
        |body| count(body, "collapsed") == Some(1),
    )
    .await;
    assert_eq!(count(&body, "waiting"), Some(0), "{body}");
    assert_eq!(count(&body, "dropped"), Some(0), "{body}");
    let (_, body) = server.call("GET", &second, None).await;
    assert_eq!(count(&body, "collapsed"), Some(0), "{body}");
    assert_eq!(count(&body, "waiting"), Some(1), "{body}");
    // Bob's queue holds two: the fourth push drops the second.
    status_path(&server, to_bob(3, "")).await;
    status_path(&server, to_bob(4, "")).await;
    let body = status_until(
        || server.call("GET", &second, None),
        |body| count(body, "dropped") == Some(1),
    )
    .await;
    assert_eq!(count(&body, "waiting"), Some(0), "{body}");
    assert_eq!(count(&body, "targets"), Some(1), "{body}");

    // Expiries, counted by the minute they happen in: early in a minute, so that it ends
    // soon after they expire.
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let _cat = support::offline_device(&server, "cat").await;
    let into_minute = pigeon_server::message::unix_millis() % 60_000;
    if into_minute > 55_000 {
        tokio::time::sleep(Duration::from_millis(60_500 - into_minute)).await;
    }
    status_path(
        &server,
        json!({"audience": {"uids": ["ann", "cat"]}, "payload": {}, "ttl": 2}),
    )
    .await;
    receive(&mut ann).await;
    let marketing =
        json!({"audience": {"uids": ["cat"]}, "payload": {}, "ttl": 2, "class": "marketing"});
    status_path(&server, marketing).await;
    let expired = |body: &Value| -> [u64; 3] {
        let points = body["points"].as_array().cloned().unwrap_or_default();
        ["realtime", "notification", "marketing"].map(|class| {
            points
                .iter()
                .map(|point| point[class]["expired"].as_u64().expect("expired"))
                .sum()
        })
    };
    let begin = Instant::now();
    loop {
        let (status, body) = server.call("GET", "/v1/stats", None).await;
        assert_eq!(status, 200, "{body}");
        // Ann acknowledged hers; bob's copies have not expired yet.
        match expired(&body) {
            [0, 1, 1] => break,
            [0, 0, 0] => {}
            other => panic!("expired {other:?}: {body}"),
        }
        assert!(begin.elapsed() < Duration::from_secs(90), "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sums over all points of `GET /v1/stats` (the last hour, by the minute): per class,
/// (pushes, targets, delivered, acked, opened).
fn stats_sums(body: &Value) -> Vec<(String, [u64; 5])> {
    let points = body["points"].as_array().expect("points");
    ["realtime", "notification", "marketing"]
        .iter()
        .map(|class| {
            let mut sums = [0; 5];
            for point in points {
                for (sum, name) in
                    sums.iter_mut()
                        .zip(["pushes", "targets", "delivered", "acked", "opened"])
                {
                    *sum += point[class][name].as_u64().expect("count");
                }
            }
            (class.to_string(), sums)
        })
        .collect()
}

/// Asks for the statistics until their sums are `expected`.
async fn stats_until<F, Fut>(get: F, expected: &[(String, [u64; 5])]) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    status_until(get, |body| stats_sums(body) == expected).await
}

fn sums(rows: &[(&str, [u64; 5])]) -> Vec<(String, [u64; 5])> {
    rows.iter()
        .map(|(class, sums)| (class.to_string(), *sums))
        .collect()
}

#[tokio::test]
async fn statistics_count_pushes_and_receipts_by_class_in_standalone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let _bob = support::offline_device(&server, "bob").await;
    for n in 0..2 {
        let (status, answer) = server
            .push(json!({"audience": {"uids": ["ann"]}, "payload": {"n": n}}))
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let first = receive(&mut ann).await;
    receive(&mut ann).await;
    ann.opened(&first).await.expect("opened");
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann", "bob"]}, "payload": {}, "class": "marketing"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    // Handed to ann, not acked; stored for bob.
    next_push(&mut ann).await;
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {}, "class": "realtime"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let push = next_push(&mut ann).await;
    ann.ack_push(&push).await.expect("ack");

    let expected = sums(&[
        ("realtime", [1, 0, 1, 1, 0]),
        ("notification", [2, 2, 2, 2, 1]),
        ("marketing", [1, 2, 1, 0, 0]),
    ]);
    let get = || server.call("GET", "/v1/stats", None);
    let body = stats_until(get, &expected).await;
    assert_eq!(body["step_seconds"], 60, "{body}");
    assert_eq!(body["points"].as_array().map(Vec::len), Some(60), "{body}");

    // A day by the hour: the same sums, in 24 points.
    let to = pigeon_server::api::rfc3339(pigeon_server::message::unix_millis() + 60_000);
    let from = pigeon_server::api::rfc3339(pigeon_server::message::unix_millis() - 86_400_000);
    let path = format!("/v1/stats?from={from}&to={to}&step=1h");
    let (status, body) = server.call("GET", &path, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["step_seconds"], 3600, "{body}");
    assert_eq!(body["points"].as_array().map(Vec::len), Some(25), "{body}");
    assert_eq!(stats_sums(&body), expected);

    for (query, field) in [
        ("step=30s", "step"),
        ("step=90s", "step"),
        ("step=soon", "step"),
        ("from=yesterday", "from"),
        ("to=2026-01-01T00:00:00Z&from=2026-01-02T00:00:00Z", "to"),
        (
            "from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&step=1m",
            "step",
        ),
        ("uids=ann", "query"),
    ] {
        let (status, body) = server
            .call("GET", &format!("/v1/stats?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
}

/// In cluster mode each gateway counts the pushes it accepts and the node what its devices
/// did; every gateway answers the same series.
#[tokio::test]
async fn statistics_are_the_same_on_every_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let first = GatewayProcess::start(&deployment, &[]);
    let second = GatewayProcess::start(&deployment, &[]);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;
    first.push_to(&["ann"], json!({"n": 1})).await;
    let id = receive(&mut ann).await;
    second.push_to(&["ann"], json!({"n": 2})).await;
    receive(&mut ann).await;
    ann.opened(&id).await.expect("opened");
    let (status, answer) = second
        .push(json!({"audience": {"all": true}, "payload": {}, "class": "marketing"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    receive(&mut ann).await;

    let expected = sums(&[
        ("realtime", [0; 5]),
        ("notification", [2, 2, 2, 2, 1]),
        ("marketing", [1, 0, 1, 1, 0]),
    ]);
    let from_first = stats_until(|| first.call("GET", "/v1/stats", None), &expected).await;
    let (status, from_second) = second.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 200, "{from_second}");
    assert_eq!(from_first["points"], from_second["points"]);

    // The same over gRPC, by the hour; a step of no whole minutes is INVALID_ARGUMENT.
    let mut client = PushClient::connect(format!("http://{}", second.grpc_addr))
        .await
        .expect("grpc");
    let stats = client
        .get_stats(cluster::with_api_key(pigeon_proto::push::GetStatsRequest {
            step_seconds: 3600,
            ..Default::default()
        }))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.step_seconds, 3600);
    let sum =
        |class: fn(&pigeon_proto::push::StatsPoint) -> Option<&pigeon_proto::push::StatsCounts>| {
            let mut sums = [0; 5];
            for counts in stats.points.iter().filter_map(class) {
                for (sum, count) in sums.iter_mut().zip([
                    counts.pushes,
                    counts.targets,
                    counts.delivered,
                    counts.acked,
                    counts.opened,
                ]) {
                    *sum += count;
                }
            }
            sums
        };
    let over_grpc = vec![
        ("realtime".to_owned(), sum(|p| p.realtime.as_ref())),
        ("notification".to_owned(), sum(|p| p.notification.as_ref())),
        ("marketing".to_owned(), sum(|p| p.marketing.as_ref())),
    ];
    assert_eq!(over_grpc, expected);
    let status = client
        .get_stats(cluster::with_api_key(pigeon_proto::push::GetStatsRequest {
            step_seconds: 90,
            ..Default::default()
        }))
        .await
        .expect_err("90 s");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("step:"), "{status:?}");
}

/// A node stopped with SIGTERM right after its device's ack adds what it still held (the
/// message's counts and the statistics, flushed every 250 ms and every second) before it
/// exits.
#[tokio::test]
async fn a_node_adds_the_counts_it_held_when_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let mut node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;
    let answer = gateway.push_to(&["ann"], json!({"n": 1})).await;
    let id = answer["message_id"].as_str().expect("id").to_owned();
    let push = next_push(&mut ann).await;
    ann.ack_push(&push).await.expect("ack");
    // Gone at once, so the drain ends within a few milliseconds of the ack: a periodic
    // flush seldom comes between them.
    node.terminate();
    drop(ann);
    assert_eq!(
        node.exited_within(Duration::from_secs(15)),
        Some(true),
        "the node did not exit cleanly on SIGTERM"
    );
    let (status, body) = gateway
        .call("GET", &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body), (1, 1), "{body}");
    // The push and its target are the gateway's to count (it adds them every second);
    // the delivery and the ack only the stopped node's last flush can have added.
    let expected = sums(&[
        ("realtime", [0; 5]),
        ("notification", [1, 1, 1, 1, 0]),
        ("marketing", [0; 5]),
    ]);
    stats_until(|| gateway.call("GET", "/v1/stats", None), &expected).await;
}

/// Counts a node could not add while Redis was down (the message's, and the statistics')
/// are added once it is back, and once only.
#[tokio::test]
async fn counts_made_while_redis_is_down_are_added_once_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;
    let answer = gateway.push_to(&["ann"], json!({"n": 1})).await;
    let id = answer["message_id"].as_str().expect("id").to_owned();
    let push = next_push(&mut ann).await;
    let path = format!("/v1/messages/{id}");
    let get = || gateway.call("GET", &path, None);
    status_until(get, |body| counts(body) == (1, 0)).await;

    redis.kill();
    // The ack is counted on the node; its flushes fail while Redis is away.
    ann.ack_push(&push).await.expect("ack");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    redis.restart();
    status_until(get, |body| counts(body) == (1, 1)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, body) = get().await;
    assert_eq!(counts(&body), (1, 1), "added once: {body}");
    // So is the statistics' (flushed once a second: at least one flush failed).
    let expected = sums(&[
        ("realtime", [0; 5]),
        ("notification", [1, 1, 1, 1, 0]),
        ("marketing", [0; 5]),
    ]);
    stats_until(|| gateway.call("GET", "/v1/stats", None), &expected).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (_, body) = gateway.call("GET", "/v1/stats", None).await;
    assert_eq!(stats_sums(&body), expected, "added once: {body}");
}
