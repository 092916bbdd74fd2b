//! The device API, as an app backend uses it: over HTTP against `pigeon standalone`, and
//! over gRPC against a cluster-mode gateway (its own `redis-server`, a node, a gateway).

mod support;

use pigeon_client::DeviceState;
use serde_json::{Value, json};
use support::{Server, connect, next_push, payload};

/// Calls the HTTP API with the demo app's key: the status and the JSON answer.
async fn call(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    server.call(method, path, body).await
}

#[tokio::test]
async fn tags_and_aliases_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__MAX_TAGS_PER_DEVICE", "3"),
            ("PIGEON_LIMITS__MAX_DEVICES_PER_ALIAS", "2"),
            ("PIGEON_LIMITS__MAX_TAG_BATCH", "5"),
        ],
    );
    let mut tokens = Vec::new();
    for uid in ["ann", "bob", "cy"] {
        let device = connect(&server, uid, &DeviceState::default()).await;
        tokens.push(device.welcome().device_token.clone());
        device.close().await;
    }
    let (ann, bob, cy) = (&tokens[0], &tokens[1], &tokens[2]);

    // A device, as the registry knows it.
    let (status, device) = call(&server, "GET", &format!("/v1/devices/{ann}"), None).await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(
        device,
        json!({"token": ann, "uid": "ann", "alias": null, "tags": [], "online": false})
    );
    let (status, answer) = call(&server, "GET", "/v1/devices/never-issued", None).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (404, &json!("not_found"))
    );

    // Tags of one device: sorted, each once, checked.
    let path = format!("/v1/devices/{ann}/tags");
    let (status, answer) = call(
        &server,
        "PUT",
        &path,
        Some(json!({"tags": ["sports", "news", "news"]})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tags"], json!(["news", "sports"]));
    let (status, answer) = call(
        &server,
        "PUT",
        &path,
        Some(json!({"tags": ["ok", "not ok"]})),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (400, &json!("tags[1]"))
    );
    let (status, answer) = call(
        &server,
        "PUT",
        &path,
        Some(json!({"tags": ["a", "b", "c", "d"]})),
    )
    .await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("tags")));
    let (status, _) = call(
        &server,
        "PUT",
        "/v1/devices/never-issued/tags",
        Some(json!({"tags": []})),
    )
    .await;
    assert_eq!(status, 404);

    // A tag's devices, changed in batches and paged.
    let (status, answer) = call(
        &server,
        "POST",
        "/v1/tags/news/devices",
        Some(json!({"add": [bob, cy, "never-issued"]})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"added": 2, "removed": 0, "unknown": 1, "over_limit": 0})
    );
    let mut all = [ann.clone(), bob.clone(), cy.clone()];
    all.sort();
    let (status, first) = call(&server, "GET", "/v1/tags/news/devices?limit=2", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["devices"], json!(all[..2]));
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, second) = call(
        &server,
        "GET",
        &format!("/v1/tags/news/devices?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(second["devices"], json!(all[2..]));
    assert_eq!(second["next_cursor"], Value::Null);
    let (status, answer) = call(&server, "GET", "/v1/tags/news/devices?limit=0", None).await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("limit")));
    let (status, answer) = call(&server, "GET", "/v1/tags/news%20flash/devices", None).await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("tag")));
    let too_many: Vec<String> = (0..6).map(|n| format!("t{n}")).collect();
    let (status, answer) = call(
        &server,
        "POST",
        "/v1/tags/news/devices",
        Some(json!({"add": too_many})),
    )
    .await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("add")));
    let (status, answer) = call(&server, "POST", "/v1/tags/news/devices", Some(json!({}))).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = call(
        &server,
        "POST",
        "/v1/tags/news/devices",
        Some(json!({"remove": [bob]})),
    )
    .await;
    assert_eq!((status, &answer["removed"]), (200, &json!(1)));
    let (status, answer) = call(&server, "DELETE", "/v1/tags/news", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"tag": "news", "removed": 2}));
    let (_, device) = call(&server, "GET", &format!("/v1/devices/{ann}"), None).await;
    assert_eq!(device["tags"], json!(["sports"]));

    // Aliases: a few devices each; a push to an alias reaches them.
    for token in [ann, bob] {
        let (status, answer) = call(
            &server,
            "PUT",
            &format!("/v1/devices/{token}/alias"),
            Some(json!({"alias": "family-ipad"})),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = call(
        &server,
        "PUT",
        &format!("/v1/devices/{cy}/alias"),
        Some(json!({"alias": "family-ipad"})),
    )
    .await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("alias")));
    let (status, answer) = call(
        &server,
        "PUT",
        &format!("/v1/devices/{cy}/alias"),
        Some(json!({"alias": "bad alias"})),
    )
    .await;
    assert_eq!((status, &answer["error"]["field"]), (400, &json!("alias")));
    let ann_state = DeviceState {
        device_token: ann.clone(),
        last_seq: 0,
        ..DeviceState::default()
    };
    let mut device = connect(&server, "ann", &ann_state).await;
    let (_, online) = call(&server, "GET", &format!("/v1/devices/{ann}"), None).await;
    assert_eq!(online["online"], true);
    assert_eq!(online["alias"], "family-ipad");
    let (status, answer) = call(
        &server,
        "POST",
        "/v1/push",
        Some(json!({"audience": {"aliases": ["family-ipad", "nobody"], "uids": ["ann"]}, "payload": {"n": 1}})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    // ann's device is named twice (by uid and by alias): one copy.
    assert_eq!(
        answer["targets"],
        json!({"delivered": 1, "stored": 1, "unknown": 1, "dropped": 0, "skipped": 0})
    );
    assert_eq!(payload(&next_push(&mut device).await), json!({"n": 1}));
    let (status, _) = call(&server, "DELETE", &format!("/v1/devices/{ann}/alias"), None).await;
    assert_eq!(status, 200);
    let (_, answer) = call(
        &server,
        "POST",
        "/v1/push",
        Some(json!({"audience": {"aliases": ["family-ipad"]}, "payload": {"n": 2}})),
    )
    .await;
    assert_eq!(
        answer["targets"]["stored"], 1,
        "only bob's device: {answer}"
    );
    let (status, answer) = call(
        &server,
        "POST",
        "/v1/push",
        Some(json!({"audience": {"aliases": ["no spaces"]}, "payload": 1})),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (400, &json!("audience.aliases[0]"))
    );
    let (status, _) = reqwest::Client::new()
        .get(format!("{}/v1/devices/{ann}", server.http_url))
        .send()
        .await
        .map(|response| (response.status().as_u16(), ()))
        .expect("request");
    assert_eq!(status, 401);
}

/// A user's devices, and who is online: a device counts as online while connected, not
/// after it left.
#[tokio::test]
async fn a_users_devices_and_presence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let phone = connect(&server, "ann", &DeviceState::default()).await;
    let tablet = connect(&server, "ann", &DeviceState::default()).await;
    let _bob = connect(&server, "bob", &DeviceState::default()).await;
    let mut tokens = vec![
        phone.welcome().device_token.clone(),
        tablet.welcome().device_token.clone(),
    ];
    tokens.sort();
    let (status, answer) = call(&server, "GET", "/v1/users/ann/devices", None).await;
    assert_eq!(status, 200, "{answer}");
    let listed: Vec<&str> = answer["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|device| device["token"].as_str().expect("token"))
        .collect();
    assert_eq!(listed, tokens);
    assert_eq!(answer["devices"][0]["online"], true);

    let (status, answer) = call(&server, "GET", "/v1/presence?uids=ann,bob,cy", None).await;
    assert_eq!(status, 200, "{answer}");
    let presence = answer["presence"].as_array().expect("presence");
    assert_eq!(presence.len(), 3);
    assert_eq!(presence[0]["uid"], "ann");
    assert_eq!(presence[0]["devices"].as_array().expect("devices").len(), 2);
    assert_eq!(presence[1]["online"], true);
    assert_eq!(
        presence[2],
        json!({"uid": "cy", "online": false, "devices": []})
    );

    drop(tablet);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, answer) = call(&server, "GET", "/v1/presence?uids=ann", None).await;
        let online = answer["presence"][0]["devices"]
            .as_array()
            .expect("devices")
            .len();
        if online == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tablet stayed online: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(phone);
    let (status, answer) = call(&server, "GET", "/v1/presence", None).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "uids");
    let many = vec!["u"; 101].join(",");
    let (status, answer) = call(&server, "GET", &format!("/v1/presence?uids={many}"), None).await;
    assert_eq!(status, 400, "{answer}");
}

#[tokio::test]
async fn the_device_api_over_grpc() {
    use pigeon_proto::push::push_client::PushClient;
    use pigeon_proto::push::{
        ChangeTagDevicesRequest, DeleteTagRequest, GetDeviceRequest, ListTagDevicesRequest,
        PushRequest, SetDeviceAliasRequest, SetDeviceTagsRequest,
    };
    use support::cluster::{Deployment, GatewayProcess, NodeProcess, Redis, with_api_key};

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut device = support::cluster::connect(&node, "dee", &DeviceState::default()).await;
    let token = device.welcome().device_token.clone();
    let mut client = PushClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .expect("connect");

    let tags = client
        .set_device_tags(with_api_key(SetDeviceTagsRequest {
            token: token.clone(),
            tags: vec!["vip".into(), "beta".into()],
        }))
        .await
        .expect("set tags")
        .into_inner();
    assert_eq!(tags.tags, ["beta", "vip"]);
    client
        .set_device_alias(with_api_key(SetDeviceAliasRequest {
            token: token.clone(),
            alias: "dee-phone".into(),
        }))
        .await
        .expect("set alias");
    let info = client
        .get_device(with_api_key(GetDeviceRequest {
            token: token.clone(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (info.uid.as_str(), info.alias.as_str(), info.online),
        ("dee", "dee-phone", true)
    );
    assert_eq!(info.tags, ["beta", "vip"]);
    let missing = client
        .get_device(with_api_key(GetDeviceRequest {
            token: "never-issued".into(),
        }))
        .await
        .expect_err("no such device");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let pushed = client
        .push(with_api_key(PushRequest {
            aliases: vec!["dee-phone".into()],
            payload_json: r#"{"via":"alias"}"#.into(),
            ..PushRequest::default()
        }))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(pushed.targets.expect("counts").delivered, 1);
    assert_eq!(
        payload(&next_push(&mut device).await),
        json!({"via": "alias"})
    );

    // Pushes to tags: stored once in the app's stream, for the devices with them.
    let pushed = client
        .push(with_api_key(PushRequest {
            tags: vec!["vip".into()],
            tags_not: vec!["muted".into()],
            payload_json: r#"{"via":"tags"}"#.into(),
            ..PushRequest::default()
        }))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(pushed.targets.expect("counts").delivered, 1);
    let push = next_push(&mut device).await;
    assert_eq!(
        (push.stream.as_str(), payload(&push)),
        ("all", json!({"via": "tags"}))
    );
    let pushed = client
        .push(with_api_key(PushRequest {
            tags_and: vec!["vip".into(), "gold".into()],
            payload_json: r#"{"via":"tags_and"}"#.into(),
            ..PushRequest::default()
        }))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(pushed.targets.expect("counts").delivered, 0);
    let mixed = client
        .push(with_api_key(PushRequest {
            tags: vec!["vip".into()],
            uids: vec!["dee".into()],
            payload_json: "1".into(),
            ..PushRequest::default()
        }))
        .await
        .expect_err("tags with uids");
    assert_eq!(mixed.code(), tonic::Code::InvalidArgument);
    assert!(
        mixed.message().starts_with("audience"),
        "{}",
        mixed.message()
    );

    let changed = client
        .change_tag_devices(with_api_key(ChangeTagDevicesRequest {
            tag: "beta".into(),
            add: vec!["never-issued".into()],
            remove: vec![token.clone()],
        }))
        .await
        .expect("change")
        .into_inner();
    assert_eq!((changed.removed, changed.unknown), (1, 1));
    let page = client
        .list_tag_devices(with_api_key(ListTagDevicesRequest {
            tag: "vip".into(),
            cursor: String::new(),
            limit: Some(10),
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.devices, std::slice::from_ref(&token));
    assert!(page.next_cursor.is_empty());
    let deleted = client
        .delete_tag(with_api_key(DeleteTagRequest { tag: "vip".into() }))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.removed, 1);
    let bad = client
        .set_device_tags(with_api_key(SetDeviceTagsRequest {
            token,
            tags: vec!["not ok".into()],
        }))
        .await
        .expect_err("a bad tag");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("tags[0]"), "{}", bad.message());
}

/// `DELETE /v1/devices/{token}`: the device's connection closes with 4009, its token, queue,
/// uid binding, tags and alias are gone (404 after), pushes to its uid, tag or alias no
/// longer name it, and connecting again with the old token registers a new device.
#[tokio::test]
async fn a_device_is_unregistered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let phone = connect(&server, "ann", &DeviceState::default()).await;
    let token = phone.welcome().device_token.clone();
    let device = format!("/v1/devices/{token}");
    let (status, _) = call(
        &server,
        "PUT",
        &format!("{device}/tags"),
        Some(json!({"tags": ["vip"]})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &server,
        "PUT",
        &format!("{device}/alias"),
        Some(json!({"alias": "ann-phone"})),
    )
    .await;
    assert_eq!(status, 200);
    // A message waits in its queue: pushed while the phone is away.
    let old_state = DeviceState {
        device_token: token.clone(),
        ..DeviceState::default()
    };
    phone.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let answer = server.push_to("ann", json!({"n": 1})).await;
    assert_eq!(answer["targets"]["stored"], 1, "{answer}");
    let mut phone = connect(&server, "ann", &old_state).await;
    assert!(phone.welcome().resumed);
    assert_eq!(payload(&next_push(&mut phone).await), json!({"n": 1}));

    let (status, answer) = call(&server, "DELETE", &device, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"token": token, "unregistered": true}));
    let error = support::closed(&mut phone).await;
    assert_eq!(error.close_code(), Some(4009), "{error}");

    let (status, answer) = call(&server, "GET", &device, None).await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = call(&server, "DELETE", &device, None).await;
    assert_eq!(status, 404, "unregistered twice: {answer}");
    for audience in [
        json!({"uids": ["ann"]}),
        json!({"aliases": ["ann-phone"]}),
        json!({"tokens": [token]}),
    ] {
        let (status, answer) = server
            .push(json!({"audience": audience, "payload": {"n": 2}, "ttl": 60}))
            .await;
        assert_eq!(status, 202, "{answer}");
        let targets = &answer["targets"];
        assert_eq!(
            targets["stored"].as_u64().unwrap_or(0) + targets["delivered"].as_u64().unwrap_or(0),
            0,
            "{audience}: {answer}"
        );
    }
    let (status, answer) = call(&server, "GET", "/v1/tags/vip/devices", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["devices"], json!([]), "{answer}");

    // The old token is no key to anything: connecting with it registers a new device,
    // whose queue is empty.
    let mut again = connect(&server, "ann", &old_state).await;
    assert!(!again.welcome().resumed);
    assert_ne!(again.welcome().device_token, token);
    support::assert_no_push(&mut again, std::time::Duration::from_millis(300)).await;
}

/// Waits until `done` holds of the answer to `GET path`.
async fn until_answer(server: &Server, path: &str, done: impl Fn(u16, &Value) -> bool) {
    let begin = std::time::Instant::now();
    loop {
        let (status, body) = call(server, "GET", path, None).await;
        if done(status, &body) {
            return;
        }
        assert!(
            begin.elapsed() < support::WAIT,
            "{path} never got there: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// With `limits.device_inactivity` at 4 s: a device that left is unregistered once it has
/// been away that long (its token resumes nothing, its uid names nothing), one connected
/// all along stays, and so does one that comes back in time.
#[tokio::test]
async fn inactive_devices_are_unregistered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("PIGEON_LIMITS__DEVICE_INACTIVITY", "4s")]);
    let gone = connect(&server, "gone", &DeviceState::default()).await;
    let gone_state = DeviceState {
        device_token: gone.welcome().device_token.clone(),
        ..DeviceState::default()
    };
    gone.close().await;
    let mut stays = connect(&server, "stays", &DeviceState::default()).await;
    let stays_token = stays.welcome().device_token.clone();
    let back = connect(&server, "back", &DeviceState::default()).await;
    let back_state = DeviceState {
        device_token: back.welcome().device_token.clone(),
        ..DeviceState::default()
    };
    back.close().await;
    // A message waits for the device that left.
    let answer = server.push_to("gone", json!({"n": 1})).await;
    assert_eq!(answer["targets"]["stored"], 1, "{answer}");
    // Back after 2.5 s: it expires 4 s after that, well after the one that left.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let back = connect(&server, "back", &back_state).await;
    assert!(back.welcome().resumed);
    back.close().await;

    let gone_path = format!("/v1/devices/{}", gone_state.device_token);
    until_answer(&server, &gone_path, |status, _| status == 404).await;
    let answer = server.push_to("gone", json!({"n": 2})).await;
    assert_eq!(answer["targets"]["unknown"], 1, "{answer}");
    let gone = connect(&server, "gone", &gone_state).await;
    assert!(!gone.welcome().resumed, "an expired token resumes nothing");
    assert_ne!(gone.welcome().device_token, gone_state.device_token);

    // Connected all along, past the inactivity: still there, and still reached.
    let (status, body) = call(&server, "GET", &format!("/v1/devices/{stays_token}"), None).await;
    assert_eq!(status, 200, "{body}");
    let answer = server.push_to("stays", json!({"n": 3})).await;
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    assert_eq!(payload(&next_push(&mut stays).await), json!({"n": 3}));
    // Back within the inactivity: still there.
    let (status, body) = call(
        &server,
        "GET",
        &format!("/v1/devices/{}", back_state.device_token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        support::metric(&server, "pigeon_devices_expired_total")
            .await
            .is_some_and(|expired| expired >= 1)
    );
}

/// In cluster mode the gateways expire devices: one that left, and one whose node was
/// SIGKILLed (its route names a dead node); one connected all along stays.
#[tokio::test]
async fn gateways_expire_inactive_devices_of_the_cluster() {
    use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let inactivity = [("PIGEON_LIMITS__DEVICE_INACTIVITY", "3s")];
    let node = NodeProcess::start(&deployment, &inactivity);
    let mut doomed = NodeProcess::start(&deployment, &inactivity);
    let gateway = GatewayProcess::start(&deployment, &inactivity);
    let gone = cluster::connect(&node, "gone", &DeviceState::default()).await;
    let gone_token = gone.welcome().device_token.clone();
    gone.close().await;
    let orphan = cluster::connect(&doomed, "orphan", &DeviceState::default()).await;
    let orphan_token = orphan.welcome().device_token.clone();
    doomed.kill();
    let mut stays = cluster::connect(&node, "stays", &DeviceState::default()).await;
    let stays_token = stays.welcome().device_token.clone();

    for token in [&gone_token, &orphan_token] {
        let path = format!("/v1/devices/{token}");
        let begin = std::time::Instant::now();
        loop {
            let (status, body) = gateway.call("GET", &path, None).await;
            if status == 404 {
                break;
            }
            assert!(
                begin.elapsed() < support::WAIT,
                "{path} never expired: {status} {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let (status, body) = gateway
        .call("GET", &format!("/v1/devices/{stays_token}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let answer = gateway
        .push_to(&["stays", "gone", "orphan"], json!({"n": 1}))
        .await;
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    assert_eq!(answer["targets"]["unknown"], 2, "{answer}");
    assert_eq!(payload(&next_push(&mut stays).await), json!({"n": 1}));
    drop(orphan);
}
