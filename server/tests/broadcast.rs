//! Pushes to every device of an app (`"audience": {"all": true}`): stored once in the app's
//! stream `all`, handed to every connected device, read from the stream by the others when
//! they connect, in standalone mode and in cluster mode.

mod support;

use pigeon_client::{Connection, DeviceState};
use serde_json::{Value, json};
use support::{Server, assert_no_push, connect, next_push, payload};

/// The state a device keeps after this connection, for its next one.
fn kept(connection: &Connection) -> DeviceState {
    let mut state = DeviceState::default();
    state.welcomed(connection.welcome());
    state
}

fn all(body: Value) -> Value {
    json!({"audience": {"all": true}, "payload": body})
}

/// The stream and offset of a push (empty and 0 for a direct one) and its payload.
fn shape(push: &pigeon_proto::device::Push) -> (String, u64, u64, Value) {
    (push.stream.clone(), push.offset, push.seq, payload(push))
}

#[tokio::test]
async fn a_push_to_all_reaches_every_device_once_online_or_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let mut online = connect(&server, "on", &DeviceState::default()).await;
    let welcome = online.welcome().streams.clone();
    assert_eq!(welcome.len(), 1);
    assert_eq!((welcome[0].stream.as_str(), welcome[0].offset), ("all", 0));
    assert!(welcome[0].recovered);
    let offline = connect(&server, "off", &DeviceState::default()).await;
    let offline_state = kept(&offline);
    offline.close().await;

    let (status, answer) = server.push(all(json!({"n": 1}))).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    assert_eq!(
        shape(&next_push(&mut online).await),
        ("all".into(), 1, 0, json!({"n": 1}))
    );
    online.ack_stream("all", 1).await.expect("ack");
    // A direct push meanwhile, and the stream's second message.
    server.push_to("off", json!({"direct": 1})).await;
    server.push(all(json!({"n": 2}))).await;
    assert_eq!(next_push(&mut online).await.offset, 2);

    // The offline device comes back: its direct push, and both of the stream's, in order
    // within each lane; and it survives a restart of the server in between.
    server.kill();
    server.restart();
    let mut back = connect(&server, "off", &offline_state).await;
    assert!(back.welcome().streams[0].recovered);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(shape(&next_push(&mut back).await));
    }
    assert_eq!(
        got,
        vec![
            (String::new(), 0, 1, json!({"direct": 1})),
            ("all".into(), 1, 0, json!({"n": 1})),
            ("all".into(), 2, 0, json!({"n": 2})),
        ]
    );
    back.ack(1).await.expect("ack");
    back.ack_stream("all", 2).await.expect("ack");
    assert_no_push(&mut back, std::time::Duration::from_millis(200)).await;

    // A device that joins the app after a message does not get it.
    let mut newcomer = connect(&server, "new", &DeviceState::default()).await;
    assert_eq!(newcomer.welcome().streams[0].offset, 2);
    assert_no_push(&mut newcomer, std::time::Duration::from_millis(200)).await;
    server.push(all(json!({"n": 3}))).await;
    assert_eq!(next_push(&mut newcomer).await.offset, 3);
}

#[tokio::test]
async fn ttl_zero_idempotency_and_bad_audiences_for_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut online = connect(&server, "on", &DeviceState::default()).await;
    let offline = connect(&server, "off", &DeviceState::default()).await;
    let offline_state = kept(&offline);
    offline.close().await;

    // TTL 0: the devices online now, never stored.
    let mut now_only = all(json!({"now": true}));
    now_only["ttl"] = json!(0);
    let (status, answer) = server.push(now_only).await;
    assert_eq!((status, &answer["targets"]["delivered"]), (202, &json!(1)));
    assert_eq!(next_push(&mut online).await.offset, 1);
    let mut back = connect(&server, "off", &offline_state).await;
    assert_no_push(&mut back, std::time::Duration::from_millis(300)).await;

    // An idempotency key: once.
    let mut keyed = all(json!({"sale": 1}));
    keyed["idempotency_key"] = json!("sale-1");
    let (_, first) = server.push(keyed.clone()).await;
    let (status, again) = server.push(keyed).await;
    assert_eq!(status, 202);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(next_push(&mut online).await.offset, 2);
    assert_eq!(next_push(&mut back).await.offset, 2);
    assert_no_push(&mut online, std::time::Duration::from_millis(200)).await;

    // `all` is everyone: nothing may be named beside it.
    let (status, answer) = server
        .push(json!({"audience": {"all": true, "uids": ["x"]}, "payload": 1}))
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (400, &json!("audience.all"))
    );
}

#[tokio::test]
async fn a_push_to_all_in_cluster_mode_reaches_the_devices_of_every_node() {
    use support::cluster::{Deployment, GatewayProcess, NodeProcess, Redis};

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let one = NodeProcess::start(&deployment, &[]);
    let mut two = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut first = support::cluster::connect(&one, "first", &DeviceState::default()).await;
    let second = support::cluster::connect(&two, "second", &DeviceState::default()).await;
    let second_state = kept(&second);
    let mut second = second;

    let (status, answer) = gateway.push(all(json!({"n": 1}))).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
    for device in [&mut first, &mut second] {
        assert_eq!(
            shape(&next_push(device).await),
            ("all".into(), 1, 0, json!({"n": 1}))
        );
    }
    // Node two dies without acks; its device moves to node one and gets what it had not
    // acknowledged, then the next message live.
    drop(second);
    two.kill();
    let (status, _) = gateway.push(all(json!({"n": 2}))).await;
    assert_eq!(status, 202);
    let mut moved = support::cluster::connect(&one, "second", &second_state).await;
    let offsets: Vec<u64> = [next_push(&mut moved).await, next_push(&mut moved).await]
        .iter()
        .map(|push| push.offset)
        .collect();
    assert_eq!(offsets, [1, 2]);
    assert_eq!(next_push(&mut first).await.offset, 2);

    // A node started after those pushes gets the next one live: the gateway keeps the list
    // of nodes in memory, and Redis tells it the list changed.
    let three = NodeProcess::start(&deployment, &[]);
    let mut third = support::cluster::connect(&three, "third", &DeviceState::default()).await;
    let (status, answer) = gateway.push(all(json!({"n": 3}))).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 3, "{answer}");
    for device in [&mut first, &mut moved, &mut third] {
        assert_eq!(shape(&next_push(device).await).3, json!({"n": 3}));
    }
}

/// A node that missed a push's DeliverShared call (it was frozen when the gateway called)
/// still gets the message to its connected devices: it reads the stream's head from the
/// store every heartbeat, and a session behind it reads the stream.
#[tokio::test]
async fn a_missed_shared_delivery_reaches_connected_devices_by_their_next_heartbeat() {
    use support::cluster::{Deployment, GatewayProcess, NodeProcess, Redis};

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let heartbeat = [
        ("PIGEON_LIMITS__HEARTBEAT_INTERVAL", "1s"),
        ("PIGEON_LIMITS__IDLE_TIMEOUT", "10s"),
    ];
    let node = NodeProcess::start(&deployment, &heartbeat);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut device = support::cluster::connect(&node, "dana", &DeviceState::default()).await;
    node.signal("STOP");
    let (status, answer) = gateway.push(all(json!({"n": 1}))).await;
    node.signal("CONT");
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["delivered"], 0,
        "the node was frozen: {answer}"
    );
    let push = tokio::time::timeout(std::time::Duration::from_secs(8), next_push(&mut device))
        .await
        .expect("the message by the next heartbeats");
    assert_eq!(shape(&push), ("all".into(), 1, 0, json!({"n": 1})));
}

/// A device's place in the stream is persisted when its connection ends (and at each
/// heartbeat), not at each ack: a device that comes back without its own record of it
/// starts after what it acknowledged.
#[tokio::test]
async fn the_stream_place_is_kept_when_the_connection_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut device = connect(&server, "ann", &DeviceState::default()).await;
    let state = kept(&device);
    for n in 1..=2 {
        server.push(all(json!({"n": n}))).await;
        let push = next_push(&mut device).await;
        device.ack_push(&push).await.expect("ack");
    }
    device.close().await;
    // It kept its token and the epoch, but not the offset.
    let forgetful = DeviceState {
        all_offset: 0,
        ..state
    };
    let mut back = connect(&server, "ann", &forgetful).await;
    assert_eq!(back.welcome().streams[0].offset, 2);
    assert_no_push(&mut back, std::time::Duration::from_millis(300)).await;
}
