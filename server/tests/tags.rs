//! Pushes to tags (`tags`: any of, `tags_and`: all of, `tags_not`: none of): stored once in
//! the app's stream, handed to the connected devices that have the tags, read from the
//! stream (only what is for them) by the others when they connect; a device that gets a
//! tag after a push does not get that push. Standalone mode here; cluster mode at the end.

mod support;

use std::time::Duration;

use pigeon_client::{Connection, DeviceState};
use serde_json::{Value, json};
use support::{Server, assert_no_push, connect, next_push, payload};

/// A push of `body` to the audience `audience`, kept a minute.
fn to(audience: Value, body: Value) -> Value {
    json!({"audience": audience, "payload": body, "ttl": 60})
}

/// The state a device keeps after this connection, for its next one.
fn kept(connection: &Connection) -> DeviceState {
    let mut state = DeviceState::default();
    state.welcomed(connection.welcome());
    state
}

/// The next `n` pushes, as (stream, offset, seq, payload), each acknowledged.
async fn take(device: &mut Connection, n: usize) -> Vec<(String, u64, u64, Value)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let push = next_push(device).await;
        device.ack_push(&push).await.expect("ack");
        got.push((push.stream.clone(), push.offset, push.seq, payload(&push)));
    }
    got
}

fn shared(offset: u64, body: Value) -> (String, u64, u64, Value) {
    ("all".into(), offset, 0, body)
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn pushes_to_tags_reach_the_devices_with_them_online_or_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let mut bob = connect(&server, "bob", &DeviceState::default()).await;
    let mut cy = connect(&server, "cy", &DeviceState::default()).await;
    let dee = connect(&server, "dee", &DeviceState::default()).await;
    let eve = connect(&server, "eve", &DeviceState::default()).await;
    let (dee_state, eve_state) = (kept(&dee), kept(&eve));
    let token = |device: &Connection| device.welcome().device_token.clone();
    for (device, tags) in [
        (token(&ann), json!(["news", "sports"])),
        (token(&bob), json!(["sports"])),
        (token(&dee), json!(["news"])),
    ] {
        let path = format!("/v1/devices/{device}/tags");
        let (status, answer) = server.call("PUT", &path, Some(json!({"tags": tags}))).await;
        assert_eq!(status, 200, "{answer}");
    }
    dee.close().await;
    eve.close().await;

    // Any of: ann (online) and dee (offline).
    let (status, answer) = server
        .push(to(json!({"tags": ["news"]}), json!({"n": 1})))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    // All of: ann only.
    server
        .push(to(json!({"tags_and": ["sports", "news"]}), json!({"n": 2})))
        .await;
    // None of: cy, and eve and dee offline.
    server
        .push(to(json!({"tags_not": ["sports"]}), json!({"n": 3})))
        .await;
    // Kinds intersect: sports but not news is bob.
    server
        .push(to(
            json!({"tags": ["sports"], "tags_not": ["news"]}),
            json!({"n": 4}),
        ))
        .await;
    server.push_to("dee", json!({"direct": 1})).await;

    assert_eq!(
        take(&mut ann, 2).await,
        [shared(1, json!({"n": 1})), shared(2, json!({"n": 2}))]
    );
    assert_eq!(take(&mut bob, 1).await, [shared(4, json!({"n": 4}))]);
    assert_eq!(take(&mut cy, 1).await, [shared(3, json!({"n": 3}))]);
    for device in [&mut ann, &mut bob, &mut cy] {
        assert_no_push(device, QUIET).await;
    }

    // Dee comes back, after a restart of the server: what was for her, in order in each
    // lane, and nothing else.
    server.kill();
    server.restart();
    let mut dee = connect(&server, "dee", &dee_state).await;
    assert!(dee.welcome().streams[0].recovered);
    let mut got = take(&mut dee, 3).await;
    got.sort_by_key(|(stream, offset, _, _)| (stream.clone(), *offset));
    assert_eq!(
        got,
        [
            (String::new(), 0, 1, json!({"direct": 1})),
            shared(1, json!({"n": 1})),
            shared(3, json!({"n": 3})),
        ]
    );
    assert_no_push(&mut dee, QUIET).await;

    // Eve gets the tag news now: the news push before does not reach her, the one after
    // does; the push to devices without sports (before) does, as she had none.
    let eve_token = eve_state.device_token.clone();
    let (status, answer) = server
        .call(
            "POST",
            "/v1/tags/news/devices",
            Some(json!({"add": [eve_token]})),
        )
        .await;
    assert_eq!((status, &answer["added"]), (200, &json!(1)), "{answer}");
    let mut eve = connect(&server, "eve", &eve_state).await;
    assert_eq!(take(&mut eve, 1).await, [shared(3, json!({"n": 3}))]);
    assert_no_push(&mut eve, QUIET).await;
    let (_, answer) = server
        .push(to(json!({"tags": ["news"]}), json!({"n": 5})))
        .await;
    assert_eq!(answer["targets"]["delivered"], 2, "eve and dee: {answer}");
    assert_eq!(take(&mut eve, 1).await, [shared(5, json!({"n": 5}))]);
    assert_eq!(take(&mut dee, 1).await, [shared(5, json!({"n": 5}))]);
}

/// A tag added answers once the node holding the device knows it: every push accepted after
/// that reaches the device, and after the tag is removed none does. Pushes racing the
/// changes reach it or not, but never twice and never out of order.
#[tokio::test]
async fn tag_changes_apply_to_the_pushes_after_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut device = connect(&server, "ann", &DeviceState::default()).await;
    let token = device.welcome().device_token.clone();
    let members = |change: &str| json!({ change: [token.clone()] });
    for round in 0..10 {
        let (status, _) = server
            .call("POST", "/v1/tags/live/devices", Some(members("add")))
            .await;
        assert_eq!(status, 200);
        let (_, answer) = server
            .push(to(json!({"tags": ["live"]}), json!({"round": round})))
            .await;
        assert_eq!(answer["targets"]["delivered"], 1, "round {round}: {answer}");
        let push = next_push(&mut device).await;
        assert_eq!(payload(&push), json!({"round": round}));
        device.ack_push(&push).await.expect("ack");
        let (status, _) = server
            .call("POST", "/v1/tags/live/devices", Some(members("remove")))
            .await;
        assert_eq!(status, 200);
        let (_, answer) = server
            .push(to(json!({"tags": ["live"]}), json!({"gone": round})))
            .await;
        assert_eq!(answer["targets"]["delivered"], 0, "round {round}: {answer}");
    }
    assert_no_push(&mut device, QUIET).await;

    // Racing: pushes and changes at once.
    let racing = async {
        for n in 0..40 {
            server
                .push(to(json!({"tags": ["race"]}), json!({"n": n})))
                .await;
        }
    };
    let changes = async {
        for n in 0..10 {
            let change = if n % 2 == 0 { "add" } else { "remove" };
            server
                .call("POST", "/v1/tags/race/devices", Some(members(change)))
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(racing, changes);
    let mut offsets = Vec::new();
    while let Ok(push) = tokio::time::timeout(QUIET, next_push(&mut device)).await {
        device.ack_push(&push).await.expect("ack");
        offsets.push(push.offset);
    }
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(offsets, sorted, "in order, each once");
}

#[tokio::test]
async fn shared_tag_messages_expire_collapse_and_bad_audiences_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let device = connect(&server, "ann", &DeviceState::default()).await;
    let state = kept(&device);
    let path = format!("/v1/devices/{}/tags", state.device_token);
    server
        .call("PUT", &path, Some(json!({"tags": ["scores"]})))
        .await;
    device.close().await;

    let mut short = to(json!({"tags": ["scores"]}), json!({"short": true}));
    short["ttl"] = json!(1);
    server.push(short).await;
    for score in ["1-0", "2-0"] {
        let mut push = to(json!({"tags": ["scores"]}), json!({"score": score}));
        push["collapse_key"] = json!("match");
        server.push(push).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut device = connect(&server, "ann", &state).await;
    assert_eq!(
        take(&mut device, 1).await,
        [shared(3, json!({"score": "2-0"}))]
    );
    assert_no_push(&mut device, QUIET).await;

    let bad = [
        (
            json!({"tags": ["a"], "uids": ["u"]}),
            "audience",
            "cannot be combined",
        ),
        (json!({"tags_not": ["a"], "all": true}), "audience.all", ""),
        (
            json!({"tags_and": ["ok", "not ok"]}),
            "audience.tags_and[1]",
            "",
        ),
        (
            json!({"tags": (0..21).map(|n| format!("t{n}")).collect::<Vec<_>>()}),
            "audience.tags",
            "at most 20",
        ),
        (json!({"tags": [], "tags_not": []}), "audience", ""),
    ];
    for (audience, field, says) in bad {
        let (status, answer) = server.push(to(audience.clone(), json!(1))).await;
        assert_eq!(status, 400, "{audience}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{audience}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{audience}: {answer}");
    }
}

/// Cluster mode, on a single Redis and on a three-master Redis Cluster: devices on two
/// nodes; tags set through the gateway reach the node holding each device; a tag push is
/// one call per node; a device whose node dies gets what it missed from its next node; and
/// every other audience kind (all, tags_and, an alias, a uid) on the same deployments.
#[tokio::test]
async fn pushes_to_tags_in_cluster_mode() {
    use support::cluster::{Deployment, GatewayProcess, NodeProcess, Redis, RedisCluster};

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(&dir.path().join("single"));
    let cluster = RedisCluster::start(&dir.path().join("cluster"));
    for deployment in [Deployment::single(&redis), Deployment::cluster(&cluster)] {
        let one = NodeProcess::start(&deployment, &[]);
        let mut two = NodeProcess::start(&deployment, &[]);
        let gateway = GatewayProcess::start(&deployment, &[]);
        let mut ann = support::cluster::connect(&one, "ann", &DeviceState::default()).await;
        let bob = support::cluster::connect(&two, "bob", &DeviceState::default()).await;
        let mut cy = support::cluster::connect(&two, "cy", &DeviceState::default()).await;
        let bob_state = kept(&bob);
        let mut bob = bob;
        let tokens = [&ann, &bob]
            .map(|device| device.welcome().device_token.clone())
            .to_vec();
        let (status, answer) = gateway
            .call("POST", "/v1/tags/vip/devices", Some(json!({"add": tokens})))
            .await;
        assert_eq!((status, &answer["added"]), (200, &json!(2)), "{answer}");

        let (status, answer) = gateway
            .push(to(json!({"tags": ["vip"]}), json!({"n": 1})))
            .await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
        assert_eq!(take(&mut ann, 1).await, [shared(1, json!({"n": 1}))]);
        let push = next_push(&mut bob).await;
        assert_eq!(push.offset, 1);
        let (_, answer) = gateway
            .push(to(json!({"tags_not": ["vip"]}), json!({"n": 2})))
            .await;
        assert_eq!(answer["targets"]["delivered"], 1, "cy: {answer}");
        assert_eq!(take(&mut cy, 1).await, [shared(2, json!({"n": 2}))]);

        // Bob's node dies before he acknowledged 1; another push to vip meanwhile. On node
        // one he gets both, in order, and not the push to the others.
        drop(bob);
        drop(cy);
        two.kill();
        gateway
            .push(to(json!({"tags": ["vip"]}), json!({"n": 3})))
            .await;
        assert_eq!(take(&mut ann, 1).await, [shared(3, json!({"n": 3}))]);
        let mut bob = support::cluster::connect(&one, "bob", &bob_state).await;
        assert_eq!(
            take(&mut bob, 2).await,
            [shared(1, json!({"n": 1})), shared(3, json!({"n": 3}))]
        );
        assert_no_push(&mut bob, QUIET).await;

        // Every other kind on the same deployment: all, tags_and, an alias, a uid.
        let (_, answer) = gateway
            .push(to(json!({"all": true}), json!({"n": 4})))
            .await;
        assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
        assert_eq!(take(&mut ann, 1).await, [shared(4, json!({"n": 4}))]);
        assert_eq!(take(&mut bob, 1).await, [shared(4, json!({"n": 4}))]);
        let bob_token = bob.welcome().device_token.clone();
        let (status, _) = gateway
            .call(
                "PUT",
                &format!("/v1/devices/{bob_token}/tags"),
                Some(json!({"tags": ["vip", "gold"]})),
            )
            .await;
        assert_eq!(status, 200);
        let (_, answer) = gateway
            .push(to(json!({"tags_and": ["vip", "gold"]}), json!({"n": 5})))
            .await;
        assert_eq!(answer["targets"]["delivered"], 1, "bob: {answer}");
        assert_eq!(take(&mut bob, 1).await, [shared(5, json!({"n": 5}))]);
        let (status, _) = gateway
            .call(
                "PUT",
                &format!("/v1/devices/{bob_token}/alias"),
                Some(json!({"alias": "bobs-phone"})),
            )
            .await;
        assert_eq!(status, 200);
        gateway
            .push(to(
                json!({"aliases": ["bobs-phone"]}),
                json!({"direct": "alias"}),
            ))
            .await;
        assert_eq!(
            take(&mut bob, 1).await,
            [(String::new(), 0, 1, json!({"direct": "alias"}))]
        );
        gateway
            .push(to(json!({"uids": ["ann"]}), json!({"direct": "uid"})))
            .await;
        assert_eq!(
            take(&mut ann, 1).await,
            [(String::new(), 0, 1, json!({"direct": "uid"}))]
        );
        assert_no_push(&mut ann, QUIET).await;
        assert_no_push(&mut bob, QUIET).await;

        // Paced over two seconds, the node hands a push to vip to its two devices in
        // steps: one half way, the other at the end; a push to all right after a paced one
        // reaches each device after it.
        let sent = std::time::Instant::now();
        let mut paced = to(json!({"tags": ["vip"]}), json!({"n": 6}));
        paced["pace"] = json!(2);
        let (status, answer) = gateway.push(paced).await;
        assert_eq!((status, &answer["targets"]["delivered"]), (202, &json!(2)));
        assert_no_push(&mut ann, QUIET).await;
        assert_no_push(&mut bob, QUIET).await;
        assert_eq!(take(&mut ann, 1).await, [shared(6, json!({"n": 6}))]);
        assert_eq!(take(&mut bob, 1).await, [shared(6, json!({"n": 6}))]);
        assert!(sent.elapsed() >= Duration::from_millis(900), "in steps");
        let mut paced = to(json!({"tags": ["vip"]}), json!({"n": 7}));
        paced["pace"] = json!(60);
        gateway.push(paced).await;
        gateway
            .push(to(json!({"all": true}), json!({"n": 8})))
            .await;
        for device in [&mut ann, &mut bob] {
            assert_eq!(
                take(device, 2).await,
                [shared(7, json!({"n": 7})), shared(8, json!({"n": 8}))]
            );
        }
    }
}
