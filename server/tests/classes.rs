//! Traffic classes and rate limits: a `realtime` push is never stored, a `marketing` push
//! expires within its cap, and an app's rate limits answer 429 with `Retry-After` (gRPC
//! RESOURCE_EXHAUSTED with `retry-after`), per class and in total, counting targets too,
//! shared by every gateway of a cluster.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pigeon_client::DeviceState;
use pigeon_proto::push::push_client::PushClient;
use pigeon_server::config::{AppSettings, ClusterSettings, Rate};
use pigeon_server::push::Class;
use pigeon_server::rate_limit::{RateLimiter, RedisBuckets};
use pigeon_server::store::redis::RedisConnection;
use serde_json::{Value, json};
use support::cluster::{Deployment, GatewayProcess, Redis, with_api_key};
use support::{Server, assert_no_push, connect, metric, next_push, payload};

/// A standalone server whose demo app has the rate limits `limits` (`PIGEON_APPS__0__`
/// settings without the prefix, e.g. `RATE_LIMITS__MARKETING__PUSHES_PER_SECOND`).
fn limited_server(dir: &std::path::Path, limits: &[(&str, &str)]) -> Server {
    Server::start_with_app(dir, limits)
}

#[tokio::test]
async fn realtime_is_never_stored_and_marketing_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let bob_state = support::offline_device(&server, "bob").await;
    let (status, answer) = server
        .push(
            json!({"audience": {"uids": ["ann", "bob"]}, "payload": {"n": 1}, "class": "realtime"}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    assert_eq!(answer["targets"]["dropped"], 1, "{answer}");
    assert_eq!(answer["targets"]["stored"], 0, "{answer}");
    let push = next_push(&mut ann).await;
    assert_eq!(payload(&push), json!({"n": 1}));
    ann.ack_push(&push).await.expect("ack");
    // Bob was offline: he never gets it.
    let mut bob = connect(&server, "bob", &bob_state).await;
    assert_no_push(&mut bob, Duration::from_millis(500)).await;

    // A marketing push is stored for bob, within its TTL cap.
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["bob"]}, "payload": {"n": 2}, "class": "marketing", "ttl": 60}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(payload(&next_push(&mut bob).await), json!({"n": 2}));

    for (body, field) in [
        (
            json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": "realtime", "ttl": 60}),
            "ttl",
        ),
        (
            json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": "marketing", "ttl": 30 * 24 * 3600}),
            "ttl",
        ),
        (
            json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": "bulk"}),
            "class",
        ),
        (
            json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": 3}),
            "class",
        ),
    ] {
        let (status, answer) = server.push(body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
    }
    // A realtime push may say its TTL of 0.
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": "realtime", "ttl": 0}))
        .await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = limited_server(
        dir.path(),
        &[
            ("RATE_LIMITS__MARKETING__PUSHES_PER_SECOND", "2"),
            ("RATE_LIMITS__MARKETING__TARGETS_PER_SECOND", "4"),
            ("RATE_LIMITS__MARKETING__BURST_SECONDS", "1"),
            ("RATE_LIMITS__TOTAL__PUSHES_PER_SECOND", "1000"),
        ],
    );
    let mut devices = Vec::new();
    for uid in ["d1", "d2", "d3", "d4", "d5"] {
        devices.push(connect(&server, uid, &DeviceState::default()).await);
    }
    let marketing =
        |n: u32| json!({"audience": {"uids": ["d1"]}, "payload": {"n": n}, "class": "marketing"});
    for n in 0..2 {
        let (status, answer) = server.push(marketing(n)).await;
        assert_eq!(status, 202, "{answer}");
    }
    let asked = std::time::Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/push", server.http_url))
        .bearer_auth(&server.api_key)
        .json(&marketing(2))
        .send()
        .await
        .expect("push");
    assert_eq!(response.status().as_u16(), 429);
    let answered_in = asked.elapsed();
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert_eq!(retry_after, 1);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["error"]["code"], "rate_limited", "{answer}");
    assert_eq!(answer["error"]["limit"], "marketing.pushes_per_second");
    let wait = answer["error"]["retry_after_ms"].as_u64().expect("ms");
    assert!((1..=1000).contains(&wait), "{answer}");
    // A refusal over a rate limit is answered when it may be retried (`limits.refusal_delay`,
    // 1 s, at most).
    assert!(
        answered_in >= Duration::from_millis(wait),
        "answered in {answered_in:?}, retry after {wait} ms"
    );
    // Other classes have room: only the total limits them.
    for n in 0..20 {
        let (status, answer) = server
            .push(json!({"audience": {"uids": ["d1"]}, "payload": {"n": n}}))
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    // After the wait, marketing has room again.
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let (status, answer) = server.push(marketing(3)).await;
    assert_eq!(status, 202, "{answer}");

    // Targets count: a push to all reaching five devices runs the four-a-second target
    // limit into debt, and the next marketing push waits it off.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"all": 1}, "class": "marketing"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 5, "{answer}");
    let (status, answer) = server.push(marketing(4)).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["limit"], "marketing.targets_per_second");
    assert!(
        answer["error"]["retry_after_ms"].as_u64().expect("ms") > 300,
        "five targets at four a second leave about half a second of debt: {answer}"
    );
    // Nothing accepted was lost: every device got the push to all.
    for device in &mut devices {
        loop {
            let push = next_push(device).await;
            device.ack_push(&push).await.expect("ack");
            if payload(&push) == json!({"all": 1}) {
                break;
            }
        }
    }
    let limited = metric(
        &server,
        "pigeon_app_pushes_total{app=\"demo\",class=\"marketing\",result=\"limited\"}",
    )
    .await;
    assert_eq!(limited, Some(2));
}

/// Two gateways share each limit through Redis; the gRPC API answers RESOURCE_EXHAUSTED
/// with `retry-after`.
#[tokio::test]
async fn gateways_share_the_rate_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let limits = [
        (
            "PIGEON_APPS__0__RATE_LIMITS__TOTAL__PUSHES_PER_SECOND",
            "0.5",
        ),
        ("PIGEON_APPS__0__RATE_LIMITS__TOTAL__BURST_SECONDS", "4"),
        // Refusals answered soon, so that the bucket has not refilled by the last one.
        ("PIGEON_LIMITS__REFUSAL_DELAY", "100ms"),
    ];
    let first = GatewayProcess::start(&deployment, &limits);
    let second = GatewayProcess::start(&deployment, &limits);
    let push = json!({"audience": {"uids": ["u1"]}, "payload": {}});
    // A burst of 4 s at one push per 2 s: two pushes, whichever gateway takes them.
    let (status, answer) = first.push(push.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = second.push(push.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = first.push(push.clone()).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["limit"], "total.pushes_per_second");
    let (status, answer) = second.push(push.clone()).await;
    assert_eq!(status, 429, "{answer}");

    let mut client = PushClient::connect(format!("http://{}", second.grpc_addr))
        .await
        .expect("grpc");
    let status = client
        .push(with_api_key(pigeon_proto::push::PushRequest {
            uids: vec!["u1".into()],
            payload_json: "{}".into(),
            ..Default::default()
        }))
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let retry_after: u64 = status
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{status:?}");
    let status = client
        .push(with_api_key(pigeon_proto::push::PushRequest {
            uids: vec!["u1".into()],
            payload_json: "{}".into(),
            class: 9,
            ..Default::default()
        }))
        .await
        .expect_err("no such class");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("class:"), "{status:?}");
}

/// Script runs the test's Redis has made since its counts were reset: each run of the rate
/// limits' script reads Redis's clock once, and nothing else of Pigeon's here does.
fn limit_scripts_run(redis: &Redis) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).expect("redis-cli");
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_time:calls="))
        .map_or(0, |rest| {
            rest.split(',')
                .next()
                .unwrap_or("0")
                .parse()
                .expect("calls")
        })
}

/// A gateway refuses on its own a push its own takes, or what Redis last told it, leave no
/// room for: a flood past a limit asks Redis about once per unit of the limit, from each
/// gateway. With Redis down a gateway still holds the limit for what it took.
#[tokio::test]
async fn a_gateway_refuses_what_its_floor_fills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start(dir.path());
    // Five at once, then one every 10 s: no room comes back while the test runs.
    let total = Rate {
        pushes_per_second: Some(0.1),
        targets_per_second: None,
        burst_seconds: 50.0,
    };
    let gateways = gateways_limiting(&redis, total, 3).await;
    let [first, second, third] = gateways.as_slice() else {
        unreachable!("three gateways");
    };
    redis.cli(&["CONFIG", "RESETSTAT"]).expect("redis-cli");

    let mut admitted = 0;
    for _ in 0..20 {
        if first.admit("demo", Class::Notification, 1).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "the burst, and no more");
    assert_eq!(
        limit_scripts_run(&redis),
        5,
        "the refusals never reached Redis"
    );

    // The second gateway took nothing: its first push asks Redis, which refuses it and
    // tells how full the bucket is; the next are refused without asking.
    for _ in 0..6 {
        let limited = second
            .admit("demo", Class::Notification, 1)
            .await
            .expect_err("the first gateway took the burst");
        assert_eq!(limited.limit, "total.pushes_per_second");
        assert!(limited.retry_after > Duration::from_secs(1), "{limited:?}");
    }
    assert_eq!(limit_scripts_run(&redis), 6);

    // Redis gone: the first two still refuse (what they know of the bucket); the third,
    // which knows nothing of it, lets its push through (the store would be failing too).
    redis.kill();
    assert!(first.admit("demo", Class::Notification, 1).await.is_err());
    assert!(second.admit("demo", Class::Notification, 1).await.is_err());
    assert!(third.admit("demo", Class::Notification, 1).await.is_ok());
}

/// A gateway pushing fast leases a limit's units ahead and spends them without asking
/// Redis: far fewer script runs than pushes, and two gateways together never take more
/// than the limit allows.
#[tokio::test]
async fn gateways_lease_a_limit_ahead_and_never_exceed_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    // 2,000 a second (a lease of 10 ms holds 20 at most), a burst of 0.1 s (200).
    let total = Rate {
        pushes_per_second: Some(2000.0),
        targets_per_second: None,
        burst_seconds: 0.1,
    };
    let gateways = gateways_limiting(&redis, total, 2).await;
    redis.cli(&["CONFIG", "RESETSTAT"]).expect("redis-cli");

    // One gateway alone, within the burst: every push admitted, most without Redis.
    let began = std::time::Instant::now();
    let alone = flood(&gateways[0], 150).await;
    assert_eq!(alone, 150, "within the burst");
    let runs = limit_scripts_run(&redis);
    assert!(runs < 75, "{runs} script runs for 150 pushes");

    // Both at once, far past the limit: together never more than the burst and the rate
    // allow over the time since the first push (measured after, so an upper bound).
    let (first, second) = tokio::join!(flood(&gateways[0], 3000), flood(&gateways[1], 3000));
    let elapsed = began.elapsed().as_secs_f64();
    let most = 200.0 + 2000.0 * elapsed + 1.0;
    let admitted = alone + first + second;
    assert!(
        admitted as f64 <= most,
        "{alone} + {first} + {second} admitted in {elapsed:.3} s, at most {most:.0} allowed"
    );
    assert!(
        first > 0 && second > 0,
        "each gateway got some: {first}, {second}"
    );
}

/// `count` gateways' rate limiters over `redis`, each on its own connection, for the app
/// `demo` limited to `total`.
async fn gateways_limiting(redis: &Redis, total: Rate, count: usize) -> Vec<RateLimiter> {
    let mut app = AppSettings::new("demo", "k", "s");
    app.rate_limits.total = Some(total);
    let settings = ClusterSettings {
        redis: vec![redis.url()],
        ..ClusterSettings::default()
    };
    let mut gateways = Vec::new();
    for _ in 0..count {
        let connection = RedisConnection::open(&settings).await.expect("redis");
        let buckets = Arc::new(RedisBuckets::new(connection, "test"));
        gateways.push(RateLimiter::new(std::slice::from_ref(&app), buckets));
    }
    gateways
}

/// How many of `pushes` notifications `gateway` admits, one after the other.
async fn flood(gateway: &RateLimiter, pushes: u32) -> u64 {
    let mut admitted = 0;
    for _ in 0..pushes {
        if gateway.admit("demo", Class::Notification, 1).await.is_ok() {
            admitted += 1;
        }
    }
    admitted
}

/// 4,999 uids with no device, and ann: resolving them keeps a pipeline of one place busy
/// long enough for the pushes sent after it to queue, however fast the machine.
fn slow_audience() -> Vec<String> {
    let mut uids: Vec<String> = (1..5000).map(|n| format!("nobody-{n}")).collect();
    uids.push("ann".into());
    uids
}

/// Past its queue's room, a push is refused with 429 `overloaded` and `Retry-After`, answered
/// after `limits.refusal_delay` (1 s by default); marketing's queue is a quarter of the
/// others', so a notification still finds room; every push accepted arrives.
#[tokio::test]
async fn a_full_queue_answers_429_overloaded_after_the_refusal_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__PUSH_CONCURRENCY", "1"),
            ("PIGEON_LIMITS__PUSH_QUEUE", "8"),
            ("PIGEON_LIMITS__MAX_AUDIENCE", "5000"),
        ],
    );
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/push", server.http_url);
    let uids = slow_audience();
    let send = |n: u32, class: &str| {
        let body = json!({"audience": {"uids": &uids}, "payload": {"n": n}, "class": class});
        let request = client.post(&url).bearer_auth(&server.api_key).json(&body);
        async move {
            let sent = std::time::Instant::now();
            let response = request.send().await.expect("push");
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().expect("ascii").to_owned());
            let answer: Value = response.json().await.expect("json");
            (n, status, retry_after, answer, sent.elapsed())
        }
    };
    let marketing: Vec<_> = (0..20)
        .map(|n| tokio::spawn(send(n, "marketing")))
        .collect();
    let notification = send(100, "notification").await;
    assert_eq!(notification.1, 202, "{}", notification.3);
    let mut accepted = vec![100];
    let mut refused = 0;
    for push in marketing {
        let (n, status, retry_after, answer, took) = push.await.expect("join");
        match status {
            202 => accepted.push(n as u64),
            429 => {
                refused += 1;
                assert_eq!(answer["error"]["code"], "overloaded", "{answer}");
                assert_eq!(retry_after.as_deref(), Some("1"), "{answer}");
                assert!(took >= Duration::from_secs(1), "answered in {took:?}");
            }
            _ => panic!("{status}: {answer}"),
        }
    }
    // One in the pipeline and two waiting (a quarter of 8) at most when the others came.
    assert!(refused > 0, "none refused: {accepted:?}");
    let mut got = Vec::new();
    while got.len() < accepted.len() {
        let push = next_push(&mut ann).await;
        ann.ack_push(&push).await.expect("ack");
        got.push(payload(&push)["n"].as_u64().expect("n"));
    }
    assert_no_push(&mut ann, Duration::from_millis(300)).await;
    got.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(got, accepted, "every push accepted arrived, once");
}

/// With one push in the pipeline at a time and a backlog of low-priority pushes waiting, a
/// high-priority push goes ahead of them.
#[tokio::test]
async fn a_high_push_goes_ahead_of_a_low_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__PUSH_CONCURRENCY", "1"),
            ("PIGEON_LIMITS__MAX_AUDIENCE", "5000"),
        ],
    );
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/push", server.http_url);
    let uids = slow_audience();
    let send = |n: u32, priority: &str| {
        let body = json!({"audience": {"uids": &uids}, "payload": {"n": n}, "priority": priority});
        client
            .post(&url)
            .bearer_auth(&server.api_key)
            .json(&body)
            .send()
    };
    let lows: Vec<_> = (0..60).map(|n| tokio::spawn(send(n, "low"))).collect();
    // Wait until most of them are queued behind the one in the pipeline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&server, "pigeon_push_queue").await.unwrap_or(0) < 50 {
        assert!(tokio::time::Instant::now() < deadline, "no backlog formed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let high = send(1000, "high").await.expect("high push");
    assert_eq!(high.status().as_u16(), 202);
    let mut order = Vec::new();
    while order.len() < 61 {
        let push = next_push(&mut ann).await;
        ann.ack_push(&push).await.expect("ack");
        order.push(payload(&push)["n"].as_u64().expect("n"));
    }
    for low in lows {
        let response = low.await.expect("join").expect("low push");
        assert_eq!(response.status().as_u16(), 202);
    }
    let position = order
        .iter()
        .position(|&n| n == 1000)
        .expect("the high push came");
    let after = order.len() - 1 - position;
    assert!(
        after >= 40,
        "the high push came after {position} pushes, only {after} low ones after it: {order:?}"
    );
}

/// Users who opted out of marketing, or of a category, are skipped and counted; the others
/// get the push.
#[tokio::test]
async fn opted_out_users_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let mut bob = connect(&server, "bob", &DeviceState::default()).await;
    let mut cy = connect(&server, "cy", &DeviceState::default()).await;
    for (uid, opt_out) in [
        ("bob", json!(["marketing"])),
        ("cy", json!(["category:promo", "category:promo"])),
    ] {
        let path = format!("/v1/users/{uid}/preferences");
        let (status, answer) = server
            .call("PUT", &path, Some(json!({"opt_out": opt_out})))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = server.call("GET", "/v1/users/cy/preferences", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["opt_out"], json!(["category:promo"]));
    let (_, answer) = server
        .call("GET", "/v1/users/nobody/preferences", None)
        .await;
    assert_eq!(answer["opt_out"], json!([]));

    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann", "bob", "cy"]}, "payload": {"n": 1}, "class": "marketing"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
    assert_eq!(answer["targets"]["skipped"], 1, "{answer}");
    for device in [&mut ann, &mut cy] {
        let push = next_push(device).await;
        assert_eq!(payload(&push), json!({"n": 1}));
        device.ack_push(&push).await.expect("ack");
    }
    assert_no_push(&mut bob, Duration::from_millis(300)).await;

    // By token: cy opted out of the category, bob only of marketing.
    let tokens: Vec<String> = [&ann, &bob, &cy]
        .iter()
        .map(|device| device.welcome().device_token.clone())
        .collect();
    let (status, answer) = server
        .push(json!({"audience": {"tokens": tokens}, "payload": {"n": 2}, "category": "promo"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 2, "{answer}");
    assert_eq!(answer["targets"]["skipped"], 1, "{answer}");
    for device in [&mut ann, &mut bob] {
        assert_eq!(payload(&next_push(device).await), json!({"n": 2}));
    }
    assert_no_push(&mut cy, Duration::from_millis(300)).await;

    let skipped = metric(
        &server,
        "pigeon_app_push_targets_total{app=\"demo\",class=\"marketing\",state=\"skipped\"}",
    )
    .await;
    assert_eq!(skipped, Some(1));
    let (status, answer) = server
        .call(
            "PUT",
            "/v1/users/ann/preferences",
            Some(json!({"opt_out": ["marketing", "sms"]})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "opt_out[1]");
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {}, "category": "no spaces"}))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "category");
}

/// Pushes stored once (to `all`, to tags) skip the devices of users who opted out too:
/// those devices carry a reserved tag for it, which the app neither sees nor can take off,
/// and a device the user adds later carries it from the start.
#[tokio::test]
async fn opted_out_users_skip_pushes_to_everyone_and_to_tags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let mut bob = connect(&server, "bob", &DeviceState::default()).await;
    let bob_token = bob.welcome().device_token.clone();
    let (status, answer) = server
        .call(
            "PUT",
            "/v1/users/bob/preferences",
            Some(json!({"opt_out": ["marketing", "category:promo"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // The app's own tags of bob's device: replaced by the app, the opt-out stays.
    let device = format!("/v1/devices/{bob_token}");
    let (status, _) = server
        .call(
            "PUT",
            &format!("{device}/tags"),
            Some(json!({"tags": ["fans"]})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, answer) = server.call("GET", &device, None).await;
    assert_eq!(
        answer["tags"],
        json!(["fans"]),
        "reserved tags are not shown: {answer}"
    );
    let ann_token = ann.welcome().device_token.clone();
    let (status, _) = server
        .call(
            "PUT",
            &format!("/v1/devices/{ann_token}/tags"),
            Some(json!({"tags": ["fans"]})),
        )
        .await;
    assert_eq!(status, 200);

    // Bob's connected device is skipped by the first three, and counted so.
    let pushes = [
        (
            json!({"audience": {"all": true}, "payload": {"n": 1}, "class": "marketing", "ttl": 60}),
            1,
        ),
        (
            json!({"audience": {"tags": ["fans"]}, "payload": {"n": 2}, "class": "marketing", "ttl": 60}),
            1,
        ),
        (
            json!({"audience": {"all": true}, "payload": {"n": 3}, "category": "promo", "ttl": 60}),
            1,
        ),
        (
            json!({"audience": {"all": true}, "payload": {"n": 4}, "ttl": 60}),
            0,
        ),
    ];
    for (push, skipped) in pushes {
        let (status, answer) = server.push(push).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["targets"]["skipped"], skipped, "{answer}");
        assert_eq!(answer["targets"]["delivered"], 2 - skipped, "{answer}");
    }
    let skipped = metric(
        &server,
        "pigeon_app_push_targets_total{app=\"demo\",class=\"marketing\",state=\"skipped\"}",
    )
    .await;
    assert_eq!(skipped, Some(2));
    for n in 1..=4 {
        let push = next_push(&mut ann).await;
        assert_eq!(payload(&push)["n"], n);
        ann.ack_push(&push).await.expect("ack");
    }
    // Bob gets only the plain notification.
    let push = next_push(&mut bob).await;
    assert_eq!(payload(&push)["n"], 4);
    bob.ack_push(&push).await.expect("ack");
    assert_no_push(&mut bob, Duration::from_millis(300)).await;

    // Bob's new phone carries his opt-out from its first connect.
    let mut phone = connect(&server, "bob", &DeviceState::default()).await;
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"n": 5}, "class": "marketing", "ttl": 60}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(payload(&next_push(&mut ann).await)["n"], 5);
    assert_no_push(&mut phone, Duration::from_millis(300)).await;
    let skipped_metric =
        "pigeon_app_push_targets_total{app=\"demo\",class=\"marketing\",state=\"skipped\"}";
    assert_eq!(
        metric(&server, skipped_metric).await,
        Some(4),
        "bob's two devices"
    );

    // The phone goes away, and a push to all comes meanwhile: it skips the phone when the
    // phone reads it from the store, and is counted then. The push that skipped the phone
    // while it was connected moved its place in the stream on: it is not counted again.
    let mut phone_state = DeviceState::default();
    phone_state.welcomed(phone.welcome());
    phone.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"n": 7}, "class": "marketing", "ttl": 60}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["skipped"], 1,
        "only bob's connected device: {answer}"
    );
    assert_eq!(payload(&next_push(&mut ann).await)["n"], 7);
    let mut phone = connect(&server, "bob", &phone_state).await;
    assert_no_push(&mut phone, Duration::from_millis(300)).await;
    assert_eq!(
        metric(&server, skipped_metric).await,
        Some(6),
        "bob's device at acceptance, the phone as it read the store"
    );
    // Opting back in: marketing reaches bob again.
    let (status, _) = server
        .call(
            "PUT",
            "/v1/users/bob/preferences",
            Some(json!({"opt_out": []})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"n": 6}, "class": "marketing", "ttl": 60}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(payload(&next_push(&mut phone).await)["n"], 6);
}

/// With a frequency cap of two marketing pushes per user per hour, the third skips them
/// (counted); notifications are not capped.
#[tokio::test]
async fn a_frequency_cap_skips_users_over_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = limited_server(
        dir.path(),
        &[
            ("FREQUENCY_CAP__MARKETING", "2"),
            ("FREQUENCY_CAP__WINDOW", "1h"),
        ],
    );
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let marketing = |n: u32| json!({"audience": {"uids": ["ann", "bob"]}, "payload": {"n": n}, "class": "marketing"});
    for n in 0..2 {
        let (status, answer) = server.push(marketing(n)).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["targets"]["skipped"], 0, "{answer}");
        assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    }
    let (status, answer) = server.push(marketing(2)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["skipped"], 2, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 0, "{answer}");
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {"n": 3}}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let push = next_push(&mut ann).await;
        ann.ack_push(&push).await.expect("ack");
        got.push(payload(&push)["n"].as_u64().expect("n"));
    }
    assert_eq!(got, [0, 1, 3]);
    assert_no_push(&mut ann, Duration::from_millis(300)).await;

    // Devices named by token or alias are capped by their user: ann is over the cap by any
    // name; cy's two devices, named by alias and by token in one push, count once.
    let ann_token = ann.welcome().device_token.clone();
    let cy_phone = connect(&server, "cy", &DeviceState::default()).await;
    let cy_tablet = connect(&server, "cy", &DeviceState::default()).await;
    let alias = format!("/v1/devices/{}/alias", cy_phone.welcome().device_token);
    let (status, _) = server
        .call("PUT", &alias, Some(json!({"alias": "cy-phone"})))
        .await;
    assert_eq!(status, 200);
    let tablet = cy_tablet.welcome().device_token.clone();
    let by_name = |n: u32| {
        json!({"audience": {"tokens": [ann_token, tablet], "aliases": ["cy-phone"]},
               "payload": {"n": n}, "class": "marketing"})
    };
    for n in 4..6 {
        let (status, answer) = server.push(by_name(n)).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["targets"]["skipped"], 1, "ann only: {answer}");
        assert_eq!(
            answer["targets"]["delivered"], 2,
            "cy's two devices: {answer}"
        );
    }
    let (status, answer) = server.push(by_name(6)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["skipped"], 3,
        "cy over the cap too: {answer}"
    );
    assert_no_push(&mut ann, Duration::from_millis(200)).await;
}

/// Each of `devices` gets a push of `body` and acks it; the first arrived soon after
/// `sent` (unix ms), the last near two seconds after it, and none much later.
async fn assert_spread_over_two_seconds(
    devices: &mut [pigeon_client::Connection],
    sent: u64,
    body: Value,
) {
    let mut arrivals = Vec::new();
    for device in devices.iter_mut() {
        let push = next_push(device).await;
        assert_eq!(payload(&push), body);
        device.ack_push(&push).await.expect("ack");
        arrivals.push(pigeon_server::message::unix_millis() - sent);
    }
    arrivals.sort_unstable();
    let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1]);
    assert!(first < 500, "the first step goes at once: {arrivals:?}");
    assert!(
        last >= 1500,
        "the last step goes near the end of the pace: {arrivals:?}"
    );
    assert!(last < 4000, "within the pace: {arrivals:?}");
}

/// A push paced over two seconds reaches its twenty devices spread over that time, every
/// one of them; pacing is refused where it does not apply.
#[tokio::test]
async fn a_paced_push_is_spread_over_its_pace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut devices = Vec::new();
    let mut uids = Vec::new();
    for n in 0..20 {
        let uid = format!("p{n}");
        devices.push(connect(&server, &uid, &DeviceState::default()).await);
        uids.push(uid);
    }
    let sent = pigeon_server::message::unix_millis();
    let (status, answer) = server
        .push(json!({"audience": {"uids": uids}, "payload": {"paced": true}, "pace": 2}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["targets"]["stored"], 20, "{answer}");
    assert_spread_over_two_seconds(&mut devices, sent, json!({"paced": true})).await;
    for (body, field) in [
        (
            json!({"audience": {"uids": ["p1"]}, "payload": {}, "pace": 2, "class": "realtime"}),
            "pace",
        ),
        (
            json!({"audience": {"uids": ["p1"]}, "payload": {}, "pace": 100000}),
            "pace",
        ),
    ] {
        let (status, answer) = server.push(body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
}

/// A push to everyone paced over two seconds reaches the twenty devices online spread over
/// that time; a push after a paced one never overtakes it: a device still waiting for its
/// step is handed the paced push first.
#[tokio::test]
async fn a_paced_push_to_everyone_is_spread_and_never_overtaken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut devices = Vec::new();
    for n in 0..20 {
        devices.push(connect(&server, &format!("e{n}"), &DeviceState::default()).await);
    }
    let sent = pigeon_server::message::unix_millis();
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"paced": 1}, "pace": 2}))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["delivered"], 20,
        "handed out over the pace: {answer}"
    );
    assert_spread_over_two_seconds(&mut devices, sent, json!({"paced": 1})).await;

    // A paced push, then one at once: every device gets both, the paced one first, and
    // the second at once.
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"paced": 2}, "pace": 5}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let sent = pigeon_server::message::unix_millis();
    let (status, answer) = server
        .push(json!({"audience": {"all": true}, "payload": {"paced": 3}}))
        .await;
    assert_eq!(status, 202, "{answer}");
    for device in &mut devices {
        for expected in [2, 3] {
            let push = next_push(device).await;
            assert_eq!(payload(&push), json!({"paced": expected}));
            device.ack_push(&push).await.expect("ack");
        }
        let waited = pigeon_server::message::unix_millis() - sent;
        assert!(
            waited < 2500,
            "the later push waited for no step: {waited} ms"
        );
        assert_no_push(device, Duration::from_millis(10)).await;
    }
    // The steps of the paced push that came after: nothing more reaches a device.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for device in &mut devices {
        assert_no_push(device, Duration::from_millis(10)).await;
    }
}

/// Marketing pushes to everyone count against the users' frequency cap as their devices
/// get them (each push once per user, however many of its devices got it): a user that
/// has had its cap, by pushes to everyone or by direct ones, gets no more marketing to
/// everyone in the window; notifications still reach it.
#[tokio::test]
async fn a_frequency_cap_holds_for_pushes_to_everyone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = limited_server(
        dir.path(),
        &[
            ("FREQUENCY_CAP__MARKETING", "2"),
            ("FREQUENCY_CAP__WINDOW", "1h"),
        ],
    );
    let mut ann_phone = connect(&server, "ann", &DeviceState::default()).await;
    let mut ann_tablet = connect(&server, "ann", &DeviceState::default()).await;
    let mut bob = connect(&server, "bob", &DeviceState::default()).await;
    let to_everyone = |n: u32, class: &str| json!({"audience": {"all": true}, "payload": {"n": n}, "class": class, "ttl": 600});
    // The counts are taken every second: wait for them between pushes.
    let counted = || tokio::time::sleep(Duration::from_millis(2500));
    for n in [1, 2] {
        let (status, answer) = server.push(to_everyone(n, "marketing")).await;
        assert_eq!(status, 202, "{answer}");
        for device in [&mut ann_phone, &mut ann_tablet, &mut bob] {
            let push = next_push(device).await;
            assert_eq!(payload(&push)["n"], n);
            device.ack_push(&push).await.expect("ack");
        }
        counted().await;
    }
    // Ann's two devices counted her once per push: she is at the cap, as bob is.
    let (_, answer) = server
        .push(json!({"audience": {"uids": ["ann", "bob"]}, "payload": {}, "class": "marketing"}))
        .await;
    assert_eq!(answer["targets"]["skipped"], 2, "{answer}");
    // Cy, at the cap through direct pushes, is tagged for it too.
    let mut cy = connect(&server, "cy", &DeviceState::default()).await;
    for n in [10, 11] {
        let (_, answer) = server
            .push(json!({"audience": {"uids": ["cy"]}, "payload": {"n": n}, "class": "marketing"}))
            .await;
        assert_eq!(answer["targets"]["delivered"], 1, "{answer}");
        let push = next_push(&mut cy).await;
        cy.ack_push(&push).await.expect("ack");
    }
    counted().await;
    let (status, answer) = server.push(to_everyone(3, "marketing")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["targets"]["skipped"], 4,
        "every device connected: {answer}"
    );
    let (status, answer) = server.push(to_everyone(4, "notification")).await;
    assert_eq!(status, 202, "{answer}");
    for device in [&mut ann_phone, &mut ann_tablet, &mut bob, &mut cy] {
        let push = next_push(device).await;
        assert_eq!(
            payload(&push)["n"],
            4,
            "the capped marketing push is not for them"
        );
        device.ack_push(&push).await.expect("ack");
        assert_no_push(device, Duration::from_millis(100)).await;
    }
    // A user under the cap still gets marketing to everyone.
    let mut dee = connect(&server, "dee", &DeviceState::default()).await;
    let (status, _) = server.push(to_everyone(5, "marketing")).await;
    assert_eq!(status, 202);
    let push = next_push(&mut dee).await;
    assert_eq!(payload(&push)["n"], 5);
    assert_no_push(&mut bob, Duration::from_millis(300)).await;
}

/// In cluster mode the nodes count what their devices got of marketing pushes to everyone
/// in Redis, and a user at the cap is tagged on every node that holds one of its devices.
#[tokio::test]
async fn a_frequency_cap_holds_for_pushes_to_everyone_across_nodes() {
    use support::cluster::NodeProcess;

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let cap = [
        ("PIGEON_APPS__0__FREQUENCY_CAP__MARKETING", "1"),
        ("PIGEON_APPS__0__FREQUENCY_CAP__WINDOW", "1h"),
    ];
    let one = NodeProcess::start(&deployment, &cap);
    let two = NodeProcess::start(&deployment, &cap);
    let gateway = GatewayProcess::start(&deployment, &cap);
    let mut phone = support::cluster::connect(&one, "ann", &DeviceState::default()).await;
    let mut tablet = support::cluster::connect(&two, "ann", &DeviceState::default()).await;
    let to_everyone = |n: u32, class: &str| json!({"audience": {"all": true}, "payload": {"n": n}, "class": class, "ttl": 600});
    let (status, answer) = gateway.push(to_everyone(1, "marketing")).await;
    assert_eq!(status, 202, "{answer}");
    // Only the phone acknowledges: node one counts ann, and tags her tablet on node two.
    let push = next_push(&mut phone).await;
    phone.ack_push(&push).await.expect("ack");
    let _unacked = next_push(&mut tablet).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, answer) = gateway.push(to_everyone(2, "marketing")).await;
    assert_eq!(status, 202, "{answer}");
    // Each node counts its device skipped; the gateway adds them up.
    assert_eq!(answer["targets"]["skipped"], 2, "{answer}");
    assert_eq!(answer["targets"]["delivered"], 0, "{answer}");
    gateway.push(to_everyone(3, "notification")).await;
    for device in [&mut phone, &mut tablet] {
        let push = next_push(device).await;
        assert_eq!(
            payload(&push)["n"],
            3,
            "the capped marketing push is not for ann"
        );
    }
}
