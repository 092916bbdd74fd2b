//! `pigeon standalone` as a user runs it: a real process on ephemeral ports, real
//! WebSocket devices, the real HTTP API, and a real data directory that outlives kills.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use pigeon_client::{ClientError, Connection, DeviceState};
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Registers a device of `uid` (connects once, then disconnects); returns its state.
async fn offline_device(server: &Server, uid: &str) -> DeviceState {
    let device = connect(server, uid, &DeviceState::default()).await;
    let state = state_of(&device, 0);
    device.close().await;
    state
}

/// Runs each delivery scenario over every device transport: ws, wss and QUIC.
macro_rules! over_every_transport {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Transport;

            #[tokio::test]
            async fn ws() {
                super::$scenario(Transport::Ws).await;
            }

            #[tokio::test]
            async fn wss() {
                super::$scenario(Transport::Wss).await;
            }

            #[tokio::test]
            async fn quic() {
                super::$scenario(Transport::Quic).await;
            }
        }
    )*};
}

over_every_transport!(
    online_push_reaches_a_connected_device,
    a_uid_with_several_devices_gets_the_push_on_each,
    offline_pushes_are_replayed_in_order_after_reconnect,
    more_than_a_window_of_offline_pushes_replays_completely,
    expired_messages_are_not_delivered,
    ttl_zero_reaches_only_devices_online_now,
    a_collapse_key_replaces_the_pending_message,
    acks_are_cumulative,
    a_second_connection_of_a_device_replaces_the_first,
    a_replaced_sdk_device_stops_instead_of_fighting_back,
    nothing_accepted_is_lost_when_the_server_is_killed,
    sigterm_drains_devices_with_going_away_and_keeps_everything,
    the_per_device_cap_keeps_the_newest,
    a_repeated_idempotency_key_sends_nothing_again,
);

fn state_of(connection: &Connection, last_seq: u64) -> DeviceState {
    DeviceState {
        device_token: connection.welcome().device_token.clone(),
        last_seq,
        ..DeviceState::default()
    }
}

async fn online_push_reaches_a_connected_device(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut device = connect(&server, "alice", &DeviceState::default()).await;
    assert!(!device.welcome().resumed);
    let body = server.push_to("alice", json!({"title": "hi"})).await;
    assert_eq!(body["targets"]["delivered"], 1, "{body}");
    let push = next_push(&mut device).await;
    assert_eq!(push.seq, 1);
    assert_eq!(payload(&push), json!({"title": "hi"}));
    assert_eq!(Some(push.message_id.as_str()), body["message_id"].as_str());
}

async fn a_uid_with_several_devices_gets_the_push_on_each(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut phone = connect(&server, "alice", &DeviceState::default()).await;
    let mut tablet = connect(&server, "alice", &DeviceState::default()).await;
    assert_ne!(phone.welcome().device_token, tablet.welcome().device_token);
    let body = server.push_to("alice", json!("both")).await;
    assert_eq!(body["targets"]["delivered"], 2, "{body}");
    assert_eq!(payload(&next_push(&mut phone).await), json!("both"));
    assert_eq!(payload(&next_push(&mut tablet).await), json!("both"));
    // And by token, one device only.
    let token = tablet.welcome().device_token.clone();
    let (status, body) = server
        .push(json!({"audience": {"tokens": [token]}, "payload": "tablet only"}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(payload(&next_push(&mut tablet).await), json!("tablet only"));
    assert_no_push(&mut phone, Duration::from_millis(300)).await;

    assert_eq!(metric(&server, "pigeon_connections").await, Some(2));
    assert_eq!(
        metric(&server, "pigeon_pushes_total{result=\"accepted\"}").await,
        Some(2)
    );
    assert_eq!(
        metric(&server, "pigeon_push_targets_total{state=\"delivered\"}").await,
        Some(3)
    );
}

async fn offline_pushes_are_replayed_in_order_after_reconnect(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let state = offline_device(&server, "bob").await;
    for n in 1..=5 {
        let body = server.push_to("bob", json!({"n": n})).await;
        assert_eq!(body["targets"]["stored"], 1, "{body}");
    }
    let mut device = connect(&server, "bob", &state).await;
    assert!(device.welcome().resumed);
    for n in 1..=5u64 {
        let push = next_push(&mut device).await;
        assert_eq!((push.seq, payload(&push)), (n, json!({"n": n})));
    }
    // Live pushes continue the same sequence.
    server.push_to("bob", json!({"n": 6})).await;
    assert_eq!(next_push(&mut device).await.seq, 6);
}

async fn more_than_a_window_of_offline_pushes_replays_completely(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[("PIGEON_LIMITS__ACK_WINDOW", "4")]);
    let state = offline_device(&server, "carol").await;
    for n in 1..=20 {
        server.push_to("carol", json!(n)).await;
    }
    let mut device = connect(&server, "carol", &state).await;
    for n in 1..=20u64 {
        let push = next_push(&mut device).await;
        assert_eq!(push.seq, n);
        device.ack(n).await.expect("ack");
    }
}

async fn expired_messages_are_not_delivered(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let state = offline_device(&server, "dave").await;
    let (status, _) = server
        .push(json!({"audience": {"uids": ["dave"]}, "payload": "short", "ttl": 1}))
        .await;
    assert_eq!(status, 202);
    server.push_to("dave", json!("long")).await;
    // TTL is wall-clock time: let the one-second TTL pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut device = connect(&server, "dave", &state).await;
    let push = next_push(&mut device).await;
    assert_eq!((push.seq, payload(&push)), (2, json!("long")));
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

async fn ttl_zero_reaches_only_devices_online_now(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut online = connect(&server, "erin", &DeviceState::default()).await;
    let offline_state = offline_device(&server, "frank").await;
    let (status, body) = server
        .push(json!({"audience": {"uids": ["erin", "frank"]}, "payload": "now", "ttl": 0}))
        .await;
    assert_eq!(status, 202);
    assert_eq!(body["targets"]["delivered"], 1, "{body}");
    assert_eq!(body["targets"]["dropped"], 1, "{body}");
    assert_eq!(payload(&next_push(&mut online).await), json!("now"));
    let mut offline = connect(&server, "frank", &offline_state).await;
    assert_no_push(&mut offline, Duration::from_millis(300)).await;
}

async fn a_collapse_key_replaces_the_pending_message(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let state = offline_device(&server, "gina").await;
    for (score, key) in [
        ("1-0", "score"),
        ("news", ""),
        ("2-0", "score"),
        ("3-0", "score"),
    ] {
        let mut body = json!({"audience": {"uids": ["gina"]}, "payload": score, "ttl": 60});
        if !key.is_empty() {
            body["collapse_key"] = json!(key);
        }
        assert_eq!(server.push(body).await.0, 202);
    }
    let mut device = connect(&server, "gina", &state).await;
    let first = next_push(&mut device).await;
    let second = next_push(&mut device).await;
    assert_eq!(payload(&first), json!("news"));
    assert_eq!((second.seq, payload(&second)), (4, json!("3-0")));
    assert_eq!(second.collapse_key, "score");
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

async fn acks_are_cumulative(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut device = connect(&server, "hank", &DeviceState::default()).await;
    for n in 1..=4 {
        server.push_to("hank", json!(n)).await;
    }
    for n in 1..=4u64 {
        assert_eq!(next_push(&mut device).await.seq, n);
    }
    // One ack of 3 covers 1, 2 and 3; 4 stays unacknowledged.
    device.ack(3).await.expect("ack");
    let token_state = state_of(&device, 0);
    // Ack ahead of what was sent is a protocol error, which also proves the ack was read
    // before the connection ended.
    device.ack(99).await.expect("send");
    assert_eq!(closed(&mut device).await.close_code(), Some(1002));
    // A device that lost its own state (last_seq 0) still gets only seq 4.
    let mut device = connect(&server, "hank", &token_state).await;
    assert_eq!(device.welcome().acked_seq, 3);
    assert_eq!(next_push(&mut device).await.seq, 4);
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

async fn a_second_connection_of_a_device_replaces_the_first(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut first = connect(&server, "ivy", &DeviceState::default()).await;
    let state = state_of(&first, 0);
    let mut second = connect(&server, "ivy", &state).await;
    match closed(&mut first).await {
        ClientError::Closed { code, reason } => {
            assert_eq!(code, 4003);
            assert!(reason.contains("replaced"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    server.push_to("ivy", json!("to the new one")).await;
    assert_eq!(
        payload(&next_push(&mut second).await),
        json!("to the new one")
    );
}

async fn a_replaced_sdk_device_stops_instead_of_fighting_back(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut device = pigeon_client::Device::new(
        server.device_url(),
        server.credential("uma"),
        DeviceState::default(),
    )
    .with_options(server.options());
    // Connect the SDK device by waiting for its first push.
    let deadline = std::time::Instant::now() + WAIT;
    {
        let receiving = async {
            let push = device.next().await.expect("first push");
            device.processed(&push).await;
        };
        tokio::pin!(receiving);
        loop {
            tokio::select! {
                () = &mut receiving => break,
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    assert!(std::time::Instant::now() < deadline, "SDK device never connected");
                    server.push_to("uma", json!("hello")).await;
                }
            }
        }
    }
    // The same token connects from elsewhere: the SDK gives up with 4003, no reconnect.
    let _other = connect(&server, "uma", device.state()).await;
    let error = tokio::time::timeout(WAIT, device.next())
        .await
        .expect("the SDK device did not stop in time")
        .expect_err("a replaced device must not reconnect");
    assert_eq!(error.close_code(), Some(4003));
}

async fn nothing_accepted_is_lost_when_the_server_is_killed(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_over(transport, dir.path(), &[]);
    let mut device = connect(&server, "jack", &DeviceState::default()).await;
    let state = state_of(&device, 0);
    // One delivered and acknowledged, then the device goes away.
    server.push_to("jack", json!(1)).await;
    assert_eq!(next_push(&mut device).await.seq, 1);
    device.ack(1).await.expect("ack");
    server.push_to("jack", json!(2)).await;
    assert_eq!(next_push(&mut device).await.seq, 2);
    device.close().await;
    for n in 3..=10 {
        server.push_to("jack", json!(n)).await;
    }
    server.kill();
    server.restart();
    let mut device = connect(&server, "jack", &state_of_token(&state, 1)).await;
    assert!(device.welcome().resumed);
    for n in 2..=10u64 {
        let push = next_push(&mut device).await;
        assert_eq!((push.seq, payload(&push)), (n, json!(n)));
    }
    // The uid binding survived too: a push by uid still reaches the device.
    server.push_to("jack", json!(11)).await;
    assert_eq!(next_push(&mut device).await.seq, 11);
}

fn state_of_token(state: &DeviceState, last_seq: u64) -> DeviceState {
    DeviceState {
        device_token: state.device_token.clone(),
        last_seq,
        ..DeviceState::default()
    }
}

/// A drain closes every parked connection with 1001, however the lot's own drain and the
/// close requests cross: each connection is asked to close while the lot brings every parked
/// one back to a task, and a close request taken by one of the two must not be lost to the
/// other (the connection would then stay open past the drain deadline).
#[tokio::test]
async fn sigterm_closes_every_parked_connection() {
    const DEVICES: usize = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[("PIGEON_LIMITS__DRAIN_TIMEOUT", "8s")]);
    let mut devices = Vec::with_capacity(DEVICES);
    for n in 0..DEVICES {
        devices.push(connect(&server, &format!("u{n}"), &DeviceState::default()).await);
    }
    // Idle, so parked (the tests' servers park at once).
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&server, "pigeon_parked_connections").await < Some(DEVICES as u64) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the devices were not parked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let began = std::time::Instant::now();
    assert!(server.terminate(), "pigeon did not exit cleanly on SIGTERM");
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "the drain took {:?}",
        began.elapsed()
    );
    for device in &mut devices {
        assert_eq!(closed(device).await.close_code(), Some(1001));
    }
}

/// A server stopped with SIGTERM closes its store: the next start opens the file without
/// checking all of it. A killed one leaves the file to be checked (that is what a crash
/// costs); what it held is kept either way.
#[tokio::test]
async fn sigterm_closes_the_store_and_sigkill_leaves_it_to_be_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let state = offline_device(&server, "lena").await;
    server.push_to("lena", json!(1)).await;
    assert!(server.terminate(), "pigeon did not exit cleanly on SIGTERM");
    assert!(
        !store_needs_checking(dir.path()),
        "the store was left unclosed by SIGTERM"
    );
    server.restart();
    server.push_to("lena", json!(2)).await;
    server.kill();
    assert!(
        store_needs_checking(dir.path()),
        "a store left by SIGKILL opened as if closed"
    );
    server.restart();
    let mut device = connect(&server, "lena", &state).await;
    for n in 1..=2u64 {
        let push = next_push(&mut device).await;
        assert_eq!((push.seq, payload(&push)), (n, json!(n)));
    }
}

/// Whether redb has to check (repair) the store of `dir` to open it. Opening it closes it
/// cleanly again.
fn store_needs_checking(dir: &std::path::Path) -> bool {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let checked = Arc::new(AtomicBool::new(false));
    let flag = checked.clone();
    let db = redb::Builder::new()
        .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed))
        .create(dir.join("pigeon.redb"))
        .expect("open the store");
    drop(db);
    checked.load(Ordering::Relaxed)
}

async fn sigterm_drains_devices_with_going_away_and_keeps_everything(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_over(transport, dir.path(), &[]);
    let mut device = connect(&server, "kate", &DeviceState::default()).await;
    let state = state_of(&device, 0);
    server.push_to("kate", json!("before")).await;
    assert_eq!(next_push(&mut device).await.seq, 1);
    assert!(server.terminate(), "pigeon did not exit cleanly on SIGTERM");
    assert_eq!(closed(&mut device).await.close_code(), Some(1001));
    server.restart();
    // Unacknowledged, so delivered again after the restart.
    let mut device = connect(&server, "kate", &state).await;
    assert_eq!(payload(&next_push(&mut device).await), json!("before"));
}

async fn the_per_device_cap_keeps_the_newest(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(
        transport,
        dir.path(),
        &[("PIGEON_LIMITS__MAX_STORED_PER_DEVICE", "3")],
    );
    let state = offline_device(&server, "liam").await;
    for n in 1..=6 {
        server.push_to("liam", json!(n)).await;
    }
    let mut device = connect(&server, "liam", &state).await;
    for n in 4..=6u64 {
        assert_eq!(next_push(&mut device).await.seq, n);
    }
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_push_api_rejects_bad_requests_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let good = json!({"audience": {"uids": ["x"]}, "payload": {}});

    let (status, body) = server.push_with_key(None, good.to_string()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = server
        .push_with_key(Some("wrong-key"), good.to_string())
        .await;
    assert_eq!(status, 401);

    let cases = [
        (json!({"payload": 1}), "audience"),
        (json!({"audience": {"uids": ["x"]}}), "payload"),
        (
            json!({"audience": {"uids": ["x"]}, "payload": 1, "ttl": "1h"}),
            "ttl",
        ),
        (
            json!({"audience": {"uids": ["x"]}, "payload": 1, "ttl": 99999999999u64}),
            "ttl",
        ),
        (
            json!({"audience": {"uids": ["x"]}, "payload": 1, "priority": "urgent"}),
            "priority",
        ),
        (
            json!({"audience": {"uids": [1]}, "payload": 1}),
            "audience.uids[0]",
        ),
        (json!({"audience": {}, "payload": 1}), "audience"),
        (
            json!({"audience": {"uids": ["x"]}, "payload": 1, "collapse_key": "k".repeat(200)}),
            "collapse_key",
        ),
        (
            json!({"audience": {"uids": ["x"]}, "payload": 1, "idempotency_key": ""}),
            "idempotency_key",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = server.push(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"]["field"], field, "{body} -> {answer}");
    }
    let (status, answer) = server
        .push_with_key(Some(&server.api_key), "{not json".into())
        .await;
    assert_eq!(status, 400, "{answer}");

    let big = json!({"audience": {"uids": ["x"]}, "payload": "x".repeat(5000)});
    let (status, answer) = server.push(big).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "too_large");

    let unknown = server.push(good).await;
    assert_eq!(unknown.0, 202);
    assert_eq!(unknown.1["targets"]["unknown"], 1);
}

async fn a_repeated_idempotency_key_sends_nothing_again(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(transport, dir.path(), &[]);
    let mut device = connect(&server, "mia", &DeviceState::default()).await;
    let body =
        json!({"audience": {"uids": ["mia"]}, "payload": "once", "idempotency_key": "order-7"});
    let (status, first) = server.push(body.clone()).await;
    assert_eq!(status, 202);
    let (status, again) = server.push(body).await;
    assert_eq!(status, 202);
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(next_push(&mut device).await.seq, 1);
    assert_no_push(&mut device, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn malformed_and_oversized_device_frames_close_with_a_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut garbage = raw_websocket(&server).await;
    let code = close_code_after(&mut garbage, Some(Message::Binary(vec![0xff; 16].into()))).await;
    assert_eq!(code, Some(1002));

    let mut text = raw_websocket(&server).await;
    let code = close_code_after(&mut text, Some(Message::Text("hello".into()))).await;
    assert_eq!(code, Some(1002));

    let mut huge = raw_websocket(&server).await;
    let code = close_code_after(
        &mut huge,
        Some(Message::Binary(vec![0u8; 64 * 1024].into())),
    )
    .await;
    assert_eq!(code, Some(1009));

    // A bad credential.
    let mut bad = Connection::connect(&server.ws_url, "not-a-jwt", &DeviceState::default()).await;
    match &mut bad {
        Err(ClientError::Closed { code, .. }) => assert_eq!(*code, 4001),
        other => panic!("expected 4001, got {:?}", other.as_ref().err()),
    }
    // The server is still fine.
    let mut device = connect(&server, "ned", &DeviceState::default()).await;
    server.push_to("ned", json!("still up")).await;
    assert_eq!(payload(&next_push(&mut device).await), json!("still up"));
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("PIGEON_LIMITS__HANDSHAKE_TIMEOUT", "500ms")]);
    // A WebSocket that never says Hello.
    let mut silent = raw_websocket(&server).await;
    assert_eq!(close_code_after(&mut silent, None).await, Some(4002));
    // A TCP connection that never even upgrades.
    let address = server
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches('/');
    let mut tcp = tokio::net::TcpStream::connect(address).await.expect("tcp");
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tcp, &mut buffer))
        .await
        .expect("server did not close the silent socket");
    assert!(matches!(read, Ok(0) | Err(_)));
}

#[tokio::test]
async fn a_silent_device_is_pinged_then_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__HEARTBEAT_INTERVAL", "200ms"),
            ("PIGEON_LIMITS__IDLE_TIMEOUT", "600ms"),
        ],
    );
    // A device that answers pings stays connected past the idle timeout.
    let mut alive = connect(&server, "olga", &DeviceState::default()).await;
    assert_no_push(&mut alive, Duration::from_millis(1500)).await;
    // The device keeps reading (and answering pings) while the push request is under way:
    // on a busy machine the request alone can outlast the idle timeout.
    let (_, push) = tokio::join!(
        server.push_to("olga", json!("still here")),
        next_push(&mut alive)
    );
    assert_eq!(payload(&push), json!("still here"));

    // A device that says Hello and then nothing (no pongs) is closed with 4004.
    let mut silent = raw_websocket(&server).await;
    let hello = pigeon_proto::device::ClientFrame {
        kind: Some(pigeon_proto::device::client_frame::Kind::Hello(
            pigeon_proto::device::Hello {
                credential: server.credential("olga"),
                ..Default::default()
            },
        )),
    };
    let bytes = pigeon_proto::Message::encode_to_vec(&hello);
    silent
        .send(Message::Binary(bytes.into()))
        .await
        .expect("hello");
    assert_eq!(close_code_after(&mut silent, None).await, Some(4004));
}

#[tokio::test]
async fn the_token_cli_mints_credentials_the_server_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["token", "--app", "demo", "--uid", "pat", "--ttl", "5m"])
        .env("PIGEON_DATA_DIR", dir.path())
        .output()
        .expect("pigeon token");
    assert!(output.status.success());
    let credential = String::from_utf8(output.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let mut device = Connection::connect(&server.ws_url, &credential, &DeviceState::default())
        .await
        .expect("the minted credential is accepted");
    server.push_to("pat", json!("minted")).await;
    assert_eq!(payload(&next_push(&mut device).await), json!("minted"));

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["token", "--app", "nope", "--uid", "pat"])
        .env("PIGEON_DATA_DIR", dir.path())
        .output()
        .expect("pigeon token");
    assert!(!output.status.success());
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("pigeon.toml");
    std::fs::write(&config, "[limits]\nmax_payload_bytes = \"big\"\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .arg("standalone")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run pigeon");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.max_payload_bytes"), "{stderr}");
}

/// Whoever started the server may stop reading its stdout (a supervisor that read the
/// addresses and closed the pipe): printing the banner into a closed pipe must not stop it.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = format!("127.0.0.1:{}", cluster::free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .arg("standalone")
        .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
        .env("PIGEON_LISTEN__HTTP", &http)
        .env("PIGEON_DATA_DIR", dir.path())
        .env("PIGEON_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pigeon");
    drop(child.stdout.take());
    let metrics = format!("http://{http}/metrics");
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::get(&metrics).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The banner is written once the listeners are up; give it time to hit the pipe.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exited = child.try_wait().expect("try_wait");
    let served = reqwest::get(&metrics).await.map(|r| r.status().as_u16());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the server exited");
    assert_eq!(served.ok(), Some(200));
}

/// The value of a gauge or counter line `name` on the server's /metrics.
/// Idle connections leave their tasks for the parking lot (the test servers park at once);
/// a push brings one back, it delivers, and it parks again. The lot's other wake-ups
/// (frames, heartbeats, close requests, the drain) are what every other test here runs on.
#[tokio::test]
async fn idle_connections_wait_parked_and_pushes_bring_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut devices = Vec::new();
    for uid in ["pia", "pat", "pim"] {
        devices.push(connect(&server, uid, &DeviceState::default()).await);
    }
    await_metric(&server, "pigeon_connections", 3).await;
    await_metric(&server, "pigeon_parked_connections", 3).await;

    for round in 1..=3 {
        server.push_to("pat", json!({ "round": round })).await;
        let push = next_push(&mut devices[1]).await;
        assert_eq!(push.seq, round);
        assert_eq!(payload(&push), json!({ "round": round }));
        devices[1].ack_push(&push).await.expect("ack");
        await_metric(&server, "pigeon_parked_connections", 3).await;
    }
    assert_no_push(&mut devices[0], Duration::from_millis(200)).await;
    assert_no_push(&mut devices[2], Duration::from_millis(200)).await;
    assert_eq!(metric(&server, "pigeon_connections").await, Some(3));
    // The pushes were written, and the acks taken, by the lot: no task was needed.
    await_metric(&server, "pigeon_parked_served_total", 6).await;
    // The acks reached the store: after a reconnect nothing comes again.
    let state = pigeon_client::DeviceState {
        device_token: devices[1].welcome().device_token.clone(),
        ..DeviceState::default()
    };
    let mut again = connect(&server, "pat", &state).await;
    assert_eq!(again.welcome().acked_seq, 3);
    assert_no_push(&mut again, Duration::from_millis(200)).await;
}
