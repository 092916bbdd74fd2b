//! Cluster mode end to end: a `redis-server` of the test's own (or a three-master Redis
//! Cluster), `pigeon node` and `pigeon gateway` processes, devices over WebSocket.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use pigeon_client::{ClientError, DeviceState};
use pigeon_proto::push::PushRequest;
use pigeon_proto::push::push_client::PushClient;
use serde_json::json;
use support::cluster::{
    Deployment, GatewayProcess, NodeProcess, Redis, RedisCluster, connect, state_of,
};
use support::{WAIT, assert_no_push, closed, metric_at, next_push, payload};

#[tokio::test]
async fn a_push_reaches_devices_of_one_uid_on_different_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let (one, two) = (
        NodeProcess::start(&deployment, &[]),
        NodeProcess::start(&deployment, &[]),
    );
    let gateway = GatewayProcess::start(&deployment, &[]);

    let mut phone = connect(&one, "alice", &DeviceState::default()).await;
    let mut laptop = connect(&two, "alice", &DeviceState::default()).await;
    let answer = gateway.push_to(&["alice"], json!({"n": 1})).await;
    assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
    for device in [&mut phone, &mut laptop] {
        let push = next_push(device).await;
        assert_eq!((push.seq, payload(&push)), (1, json!({"n": 1})));
        assert_eq!(push.message_id, answer["message_id"]);
    }

    // The same operation over gRPC, with the same key.
    let mut client = PushClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .expect("gRPC connect");
    let request = support::cluster::with_api_key(PushRequest {
        uids: vec!["alice".into()],
        payload_json: r#"{"n":2}"#.into(),
        ttl_seconds: Some(60),
        ..PushRequest::default()
    });
    let response = client.push(request).await.expect("gRPC push").into_inner();
    assert_eq!(response.targets.expect("counts").delivered, 2);
    for device in [&mut phone, &mut laptop] {
        let push = next_push(device).await;
        assert_eq!((push.seq, payload(&push)), (2, json!({"n": 2})));
    }

    // gRPC errors: a bad key, and a payload that is not JSON.
    let unauthenticated = client
        .push(PushRequest {
            uids: vec!["alice".into()],
            payload_json: "{}".into(),
            ..PushRequest::default()
        })
        .await
        .expect_err("no key");
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    let bad = support::cluster::with_api_key(PushRequest {
        uids: vec!["alice".into()],
        payload_json: "not json".into(),
        ..PushRequest::default()
    });
    let invalid = client.push(bad).await.expect_err("bad payload");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().contains("payload_json"), "{invalid:?}");
}

/// Collects pushes from `connection` until every id of `wanted` has arrived; returns them
/// by seq. Acks as it goes.
async fn collect_until(
    connection: &mut pigeon_client::Connection,
    wanted: &[String],
) -> BTreeMap<u64, String> {
    let mut received = BTreeMap::new();
    while !wanted
        .iter()
        .all(|id| received.values().any(|seen| seen == id))
    {
        let push = next_push(connection).await;
        connection.ack(push.seq).await.expect("ack");
        received.insert(push.seq, push.message_id);
    }
    received
}

/// Connects a fresh device for each uid to `node`; their states and connections.
async fn connect_each(
    node: &NodeProcess,
    uids: &[String],
) -> (Vec<DeviceState>, Vec<pigeon_client::Connection>) {
    let mut states = Vec::new();
    let mut connections = Vec::new();
    for uid in uids {
        let connection = connect(node, uid, &DeviceState::default()).await;
        states.push(state_of(&connection, 0));
        connections.push(connection);
    }
    (states, connections)
}

/// Pushes to all `uids` up to `rounds` times, back to back, from another task; stops at the
/// first push that is not answered 202 (from then on nothing was promised). The ids of the
/// pushes that were answered 202.
fn push_rounds(
    gateway: &GatewayProcess,
    uids: &[String],
    rounds: u32,
) -> tokio::task::JoinHandle<Vec<String>> {
    let uids = uids.to_vec();
    let http_url = gateway.http_url.clone();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut accepted = Vec::new();
        for n in 0..rounds {
            let sent = client
                .post(format!("{http_url}/v1/push"))
                .bearer_auth(support::cluster::app().api_key)
                .json(&json!({"audience": {"uids": uids}, "payload": {"n": n}, "ttl": 300}))
                .send()
                .await;
            let Ok(response) = sent else { break };
            if response.status().as_u16() != 202 {
                break;
            }
            let Ok(body) = response.json::<serde_json::Value>().await else {
                break;
            };
            accepted.push(body["message_id"].as_str().expect("id").to_owned());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        accepted
    })
}

#[tokio::test]
async fn a_node_killed_mid_fan_out_loses_nothing_that_was_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let mut doomed = NodeProcess::start(&deployment, &[]);
    let survivor = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);

    let uids: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let (states, connections) = connect_each(&doomed, &uids).await;
    // Pushes go out back to back from another task while the node dies under them; every
    // one must still be answered 202.
    let pusher = push_rounds(&gateway, &uids, 60);
    tokio::time::sleep(Duration::from_millis(100)).await;
    doomed.kill();
    drop(connections);
    let accepted = tokio::time::timeout(WAIT, pusher)
        .await
        .expect("pushes finished")
        .expect("pusher");
    assert_eq!(accepted.len(), 60);

    // Each device reconnects to the other node, having processed nothing, and gets every
    // accepted message, once each, in seq order with no gap.
    for (uid, state) in uids.iter().zip(&states) {
        let mut connection = connect(&survivor, uid, state).await;
        assert!(connection.welcome().resumed);
        let received = collect_until(&mut connection, &accepted).await;
        let seqs: Vec<u64> = received.keys().copied().collect();
        assert_eq!(seqs, (1..=60).collect::<Vec<u64>>(), "{uid}: gap or extra");
        let ids: Vec<&String> = received.values().collect();
        assert_eq!(ids, accepted.iter().collect::<Vec<_>>(), "{uid}: order");
    }
}

#[tokio::test]
async fn a_device_moving_to_another_node_replaces_its_old_connection_and_keeps_its_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let (one, two) = (
        NodeProcess::start(&deployment, &[]),
        NodeProcess::start(&deployment, &[]),
    );
    let gateway = GatewayProcess::start(&deployment, &[]);

    let mut old = connect(&one, "bob", &DeviceState::default()).await;
    for n in 1..=3 {
        gateway.push_to(&["bob"], json!({"n": n})).await;
    }
    for n in 1..=3 {
        assert_eq!(next_push(&mut old).await.seq, n);
    }
    old.ack(3).await.expect("ack");
    // Two more reach the old connection but are never acknowledged.
    for n in 4..=5 {
        gateway.push_to(&["bob"], json!({"n": n})).await;
        assert_eq!(next_push(&mut old).await.seq, n);
    }

    // The device (which processed up to 3) shows up on the other node.
    let mut new = connect(&two, "bob", &state_of(&old, 3)).await;
    let error = closed(&mut old).await;
    assert_eq!(error.close_code(), Some(4003), "{error:?}");
    let answer = gateway.push_to(&["bob"], json!({"n": 6})).await;
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    let mut seqs = Vec::new();
    for _ in 4..=6 {
        let push = next_push(&mut new).await;
        seqs.push((push.seq, payload(&push)["n"].as_u64().expect("n")));
    }
    assert_eq!(seqs, [(4, 4), (5, 5), (6, 6)]);
}

#[tokio::test]
async fn a_draining_node_sends_its_devices_elsewhere_and_keeps_what_they_did_not_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let mut draining = NodeProcess::start(&deployment, &[]);
    let other = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);

    let mut device = connect(&draining, "carol", &DeviceState::default()).await;
    let state = state_of(&device, 0);
    gateway.push_to(&["carol"], json!({"n": 1})).await;
    assert_eq!(next_push(&mut device).await.seq, 1);
    // Not acknowledged. The node is told to drain.
    draining.terminate();
    let error = closed(&mut device).await;
    assert_eq!(error.close_code(), Some(1001), "{error:?}");
    match &error {
        ClientError::Closed { reason, .. } => assert!(reason.contains("reconnect"), "{reason}"),
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(
        draining.exited_within(Duration::from_secs(10)),
        Some(true),
        "the node must exit cleanly within its drain deadline"
    );

    // While the device is away, one more; then it connects to the other node.
    let answer = gateway.push_to(&["carol"], json!({"n": 2})).await;
    assert_eq!(answer["targets"]["stored"], 1, "{answer}");
    let mut device = connect(&other, "carol", &state).await;
    let first = next_push(&mut device).await;
    let second = next_push(&mut device).await;
    assert_eq!(
        [(first.seq, payload(&first)), (second.seq, payload(&second))],
        [(1, json!({"n": 1})), (2, json!({"n": 2}))]
    );
}

#[tokio::test]
async fn while_redis_is_down_pushes_get_503_and_devices_stay_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);

    let mut device = connect(&node, "dave", &DeviceState::default()).await;
    gateway.push_to(&["dave"], json!({"n": 1})).await;
    let push = next_push(&mut device).await;
    device.ack(push.seq).await.expect("ack");

    redis.kill();
    let (status, body) = gateway
        .push(json!({"audience": {"uids": ["dave"]}, "payload": {"n": "lost"}, "ttl": 300}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    // The device's connection is untouched by the outage.
    assert_no_push(&mut device, Duration::from_millis(500)).await;

    redis.restart();
    // Everything resumes without restarting anything: the same gateway accepts again and
    // the same connection receives.
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        let (status, body) = gateway
            .push(json!({"audience": {"uids": ["dave"]}, "payload": {"n": 2}, "ttl": 300}))
            .await;
        if status == 202 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let push = next_push(&mut device).await;
    assert_eq!((push.seq, payload(&push)), (2, json!({"n": 2})));
    assert_eq!(push.message_id, answer["message_id"]);
}

#[tokio::test]
async fn cluster_mode_runs_on_a_three_master_redis_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisCluster::start(dir.path());
    let deployment = Deployment::cluster(&redis);
    let (one, two) = (
        NodeProcess::start(&deployment, &[]),
        NodeProcess::start(&deployment, &[]),
    );
    let gateway = GatewayProcess::start(&deployment, &[]);

    // Enough uids and devices that their keys land on every master.
    let uids: Vec<String> = (0..12).map(|i| format!("member-{i}")).collect();
    let mut devices = Vec::new();
    for (index, uid) in uids.iter().enumerate() {
        let node = if index % 2 == 0 { &one } else { &two };
        devices.push(connect(node, uid, &DeviceState::default()).await);
    }
    let uid_refs: Vec<&str> = uids.iter().map(String::as_str).collect();
    let answer = gateway.push_to(&uid_refs, json!({"all": true})).await;
    assert_eq!(answer["targets"]["delivered"], 12, "{answer}");
    for device in &mut devices {
        let push = next_push(device).await;
        assert_eq!((push.seq, payload(&push)), (1, json!({"all": true})));
        device.ack(push.seq).await.expect("ack");
    }
    let keys_per_master: Vec<usize> = redis
        .masters
        .iter()
        .map(|master| {
            master
                .cli(&["DBSIZE"])
                .and_then(|size| size.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect();
    assert!(
        keys_per_master.iter().all(|&keys| keys > 0),
        "keys should spread over every master: {keys_per_master:?}"
    );

    // Offline replay, collapse and idempotency on the cluster too.
    let away = state_of(&devices[0], 1);
    drop(devices);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 1..=3 {
        let (status, body) = gateway
            .push(
                json!({"audience": {"uids": ["member-0"]}, "payload": {"n": n},
                        "ttl": 300, "collapse_key": "score"}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let retry = json!({"audience": {"uids": ["member-0"]}, "payload": {"n": "once"},
                       "ttl": 300, "idempotency_key": "k-1"});
    let (_, first) = gateway.push(retry.clone()).await;
    let (_, second) = gateway.push(retry).await;
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["message_id"], first["message_id"]);

    let mut device = connect(&two, "member-0", &away).await;
    let collapsed = next_push(&mut device).await;
    assert_eq!(
        payload(&collapsed),
        json!({"n": 3}),
        "only the newest of a collapse key"
    );
    let once = next_push(&mut device).await;
    assert_eq!(payload(&once), json!({"n": "once"}));
    assert!(once.seq > collapsed.seq);
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_gateway_killed_mid_fan_out_loses_nothing_it_answered_202_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let mut gateway = GatewayProcess::start(&deployment, &[]);

    let uids: Vec<String> = (0..8).map(|i| format!("reader-{i}")).collect();
    // The devices stay connected while the gateway dies.
    let (states, held) = connect_each(&node, &uids).await;
    let pusher = push_rounds(&gateway, &uids, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    gateway.kill();
    let accepted = tokio::time::timeout(WAIT, pusher)
        .await
        .expect("pusher stopped")
        .expect("pusher");
    assert!(!accepted.is_empty(), "some pushes must have been accepted");
    assert!(accepted.len() < 200, "the gateway must die mid-stream");

    drop(held);
    // Every device, reconnecting, gets every message that was answered 202, in seq order
    // with no gap (a message recorded but cut off before its 202 may come too).
    for (uid, state) in uids.iter().zip(&states) {
        let mut connection = connect(&node, uid, state).await;
        let received = collect_until(&mut connection, &accepted).await;
        let seqs: Vec<u64> = received.keys().copied().collect();
        let highest = *seqs.last().expect("some");
        assert_eq!(seqs, (1..=highest).collect::<Vec<u64>>(), "{uid}: gap");
    }
}

/// Presence in cluster mode: a device shows on the node it is connected to, moves with a
/// takeover, and is not shown online once its node was SIGKILLed and its lease ran out.
#[tokio::test]
async fn presence_follows_a_device_across_nodes_and_a_node_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let one = NodeProcess::start(&deployment, &[]);
    let mut two = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let presence = || async {
        let (status, answer) = gateway.call("GET", "/v1/presence?uids=bob", None).await;
        assert_eq!(status, 200, "{answer}");
        answer["presence"][0].clone()
    };
    let wait_for = |want: serde_json::Value| {
        let presence = &presence;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let now = presence().await;
                if now == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "presence is {now}, never {want}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let old = connect(&one, "bob", &DeviceState::default()).await;
    let token = old.welcome().device_token.clone();
    wait_for(json!({"uid": "bob", "online": true, "devices": [{"token": token, "node": one.id}]}))
        .await;
    let _new = connect(&two, "bob", &state_of(&old, 0)).await;
    wait_for(json!({"uid": "bob", "online": true, "devices": [{"token": token, "node": two.id}]}))
        .await;
    two.kill();
    // Its route outlives it in Redis; the lease (2 s here) says it is gone.
    wait_for(json!({"uid": "bob", "online": false, "devices": []})).await;
    let (status, answer) = gateway.call("GET", "/v1/users/bob/devices", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["devices"][0]["online"], false, "{answer}");
}

/// `DELETE /v1/devices/{token}` through the gateway: the node holding the device's
/// connection closes it with 4009, the device is gone from Redis (404 after), and its
/// uid names it no more.
#[tokio::test]
async fn unregistering_a_device_closes_its_connection_on_its_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut phone = connect(&node, "dee", &DeviceState::default()).await;
    let token = phone.welcome().device_token.clone();
    let path = format!("/v1/devices/{token}");
    // Routed first: the registry knows which node holds it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.call("GET", &path, None).await.1["online"] != true {
        assert!(tokio::time::Instant::now() < deadline, "never online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer) = gateway.call("DELETE", &path, None).await;
    assert_eq!(status, 200, "{answer}");
    let error = closed(&mut phone).await;
    assert_eq!(error.close_code(), Some(4009), "{error}");
    let (status, answer) = gateway.call("GET", &path, None).await;
    assert_eq!(status, 404, "{answer}");
    let answer = gateway.push_to(&["dee"], json!({"n": 1})).await;
    assert_eq!(answer["targets"]["stored"], 0, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 0, "{answer}");
    // Over gRPC: another device of dee's, unregistered; the first is NOT_FOUND now.
    let second = connect(&node, "dee", &DeviceState::default()).await;
    let second_token = second.welcome().device_token.clone();
    let mut client = PushClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .expect("gRPC connect");
    let delete = |token: &str| {
        support::cluster::with_api_key(pigeon_proto::push::DeleteDeviceRequest {
            token: token.to_owned(),
        })
    };
    let deleted = client.delete_device(delete(&second_token)).await;
    assert_eq!(
        deleted.expect("DeleteDevice").into_inner().token,
        second_token
    );
    let again = client.delete_device(delete(&token)).await;
    assert_eq!(again.expect_err("gone").code(), tonic::Code::NotFound);
}

/// A gateway keeps uids' device lists and opt-outs in memory (`cluster.registry_cache`), and
/// Redis tells it of each change: a push right after a device joins its user, or the user
/// opts out, reaches exactly whom it should.
#[tokio::test]
async fn a_gateway_s_cached_device_lists_follow_each_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut phone = connect(&node, "eve", &DeviceState::default()).await;
    let marketing = |n: u32| json!({"audience": {"uids": ["eve"]}, "payload": {"n": n}, "class": "marketing", "ttl": 60});
    let answer = gateway.push_to(&["eve"], json!({"n": 1})).await;
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    let (status, answer) = gateway.push(marketing(2)).await;
    assert_eq!(
        (status, &answer["targets"]["delivered"]),
        (202, &json!(1)),
        "{answer}"
    );
    for n in 1..=2 {
        let push = next_push(&mut phone).await;
        assert_eq!(payload(&push)["n"], n);
        phone.ack_push(&push).await.expect("ack");
    }
    // Read through the cache: Redis tracks the keys read (eve's devices and opt-outs).
    let stats = redis.cli(&["INFO", "stats"]).unwrap_or_default();
    let tracked = stats
        .lines()
        .find_map(|line| line.trim().strip_prefix("tracking_total_keys:"))
        .and_then(|keys| keys.parse::<u64>().ok());
    assert_eq!(tracked, Some(2), "{stats}");

    // A second device of eve's: the next push reaches both.
    let mut laptop = connect(&node, "eve", &DeviceState::default()).await;
    let answer = gateway.push_to(&["eve"], json!({"n": 3})).await;
    assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
    for device in [&mut phone, &mut laptop] {
        let push = next_push(device).await;
        assert_eq!(payload(&push)["n"], 3);
        device.ack_push(&push).await.expect("ack");
    }

    // Eve opts out of marketing: the next marketing push skips her (both devices).
    let (status, answer) = gateway
        .call(
            "PUT",
            "/v1/users/eve/preferences",
            Some(json!({"opt_out": ["marketing"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = gateway.push(marketing(4)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["skipped"], 1, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 0, "{answer}");
    for device in [&mut phone, &mut laptop] {
        assert_no_push(device, Duration::from_millis(300)).await;
    }

    // The gateway counts what its cache did: reads answered from memory (eve's devices for
    // the second push), reads that went to Redis (the first of each key, and each after it
    // changed), and her devices and her opt-outs each dropped once, as they changed.
    let metrics = format!("{}/metrics", gateway.http_url);
    let count = |result: &str| {
        let name = format!("pigeon_registry_cache_total{{result=\"{result}\"}}");
        let metrics = metrics.clone();
        async move { metric_at(&metrics, &name).await }
    };
    assert!(count("hit").await >= Some(1));
    assert!(
        count("miss").await >= Some(4),
        "devices twice, opt-outs twice"
    );
    assert_eq!(count("invalidated").await, Some(2));
}

/// In cluster mode too, a marketing push to everyone skips the devices of a user who opted
/// out (the gateway tags them through Redis and tells their node), including one that
/// connects afterwards (its node tags it at admission).
#[tokio::test]
async fn opted_out_users_skip_marketing_to_everyone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut ann = connect(&node, "ann", &DeviceState::default()).await;
    let mut bob = connect(&node, "bob", &DeviceState::default()).await;
    let (status, answer) = gateway
        .call(
            "PUT",
            "/v1/users/bob/preferences",
            Some(json!({"opt_out": ["marketing"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let mut tablet = connect(&node, "bob", &DeviceState::default()).await;
    for n in 1..=2 {
        let class = if n == 1 { "marketing" } else { "notification" };
        let (status, answer) = gateway
            .push(
                json!({"audience": {"all": true}, "payload": {"n": n}, "class": class, "ttl": 60}),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    for n in 1..=2 {
        assert_eq!(payload(&next_push(&mut ann).await)["n"], n);
    }
    for device in [&mut bob, &mut tablet] {
        let push = next_push(device).await;
        assert_eq!(payload(&push)["n"], 2, "marketing skipped");
        device.ack_push(&push).await.expect("ack");
    }
    assert_no_push(&mut bob, Duration::from_millis(300)).await;

    // The tablet goes away and a marketing push comes meanwhile: the gateway counts the
    // devices it skipped at acceptance (bob's), the node the tablet as it reads the store.
    let mut kept = DeviceState::default();
    kept.welcomed(tablet.welcome());
    tablet.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = gateway
        .push(json!({"audience": {"all": true}, "payload": {"n": 3}, "class": "marketing", "ttl": 60}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["skipped"], 1,
        "bob's connected device: {answer}"
    );
    assert_eq!(payload(&next_push(&mut ann).await)["n"], 3);
    let mut tablet = connect(&node, "bob", &kept).await;
    assert_no_push(&mut tablet, Duration::from_millis(300)).await;
    let skipped =
        "pigeon_app_push_targets_total{app=\"demo\",class=\"marketing\",state=\"skipped\"}";
    let gateway_url = format!("{}/metrics", gateway.http_url);
    assert_eq!(
        metric_at(&gateway_url, skipped).await,
        Some(3),
        "at acceptance"
    );
    assert_eq!(
        metric_at(&node.metrics_url, skipped).await,
        Some(1),
        "the tablet, as it read the store (the marketing push it skipped while connected \
         moved its place on)"
    );
}
