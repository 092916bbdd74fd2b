//! Receipt callbacks: a real HTTP receiver gets the app's delivered, acked and opened
//! events in signed batches, from the standalone process and from a cluster's node; a
//! batch it fails is posted again with the same delivery id; a receiver that keeps failing
//! fills the bounded queue, whose overflow is counted while delivery goes on.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use pigeon_client::DeviceState;
use serde_json::{Value, json};
use sha2::Sha256;
use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, WAIT, connect, metric, next_push};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Request {
    delivery: String,
    signature: String,
    body: Bytes,
    /// What the receiver answered.
    status: u16,
}

#[derive(Default)]
struct Receiver {
    requests: Mutex<Vec<Request>>,
    /// The answers to the next requests; 200 once they run out.
    answers: Mutex<VecDeque<u16>>,
    /// The answer to every request past `answers`.
    otherwise: u16,
}

impl Receiver {
    /// A receiver on an ephemeral port answering `answers`, then `otherwise`; its URL.
    async fn start(answers: &[u16], otherwise: u16) -> (Arc<Self>, String) {
        let receiver = Arc::new(Self {
            answers: Mutex::new(answers.iter().copied().collect()),
            otherwise,
            ..Self::default()
        });
        let router = axum::Router::new()
            .route("/hook", axum::routing::post(take))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        (receiver, url)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests").clone()
    }

    /// The events of the requests answered 2xx.
    fn taken_events(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|request| request.status == 200)
            .flat_map(events)
            .collect()
    }
}

async fn take(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let status = receiver
        .answers
        .lock()
        .expect("answers")
        .pop_front()
        .unwrap_or(receiver.otherwise);
    receiver.requests.lock().expect("requests").push(Request {
        delivery: header("pigeon-delivery"),
        signature: header("pigeon-signature"),
        body,
        status,
    });
    StatusCode::from_u16(status).expect("status")
}

fn events(request: &Request) -> Vec<Value> {
    let body: Value = serde_json::from_slice(&request.body).expect("json body");
    body["events"].as_array().expect("events").clone()
}

/// Checks the request's `Pigeon-Signature` as docs/webhooks.md tells receivers to.
fn assert_signed(request: &Request, secret: &str) {
    let (t, v1) = request
        .signature
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header: {:?}", request.signature));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(v1, expected, "signature of {request:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let t: u64 = t.parse().expect("t");
    assert!(t.abs_diff(now) < 300, "signed at {t}, now {now}");
}

/// Waits until `done` holds of the receiver.
async fn until(receiver: &Receiver, done: impl Fn(&Receiver) -> bool) {
    let begin = Instant::now();
    while !done(receiver) {
        assert!(
            begin.elapsed() < WAIT,
            "the receiver never got there: {:?}",
            receiver.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The (type, message id, token) of `events`, sorted.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    let mut summary: Vec<_> = events
        .iter()
        .map(|event| {
            assert!(event["at"].as_u64().is_some_and(|at| at > 0), "{event}");
            let field = |name: &str| event[name].as_str().expect(name).to_owned();
            (field("type"), field("message_id"), field("token"))
        })
        .collect();
    summary.sort();
    summary
}

/// A standalone server whose demo app posts its receipt events to `url`, with more of the
/// app's `PIGEON_APPS__0__` settings (`WEBHOOK__QUEUE`, ...).
fn server_with_webhook(dir: &std::path::Path, url: &str, settings: &[(&str, &str)]) -> Server {
    let mut settings = settings.to_vec();
    settings.push(("WEBHOOK__URL", url));
    Server::start_with_app(dir, &settings)
}

#[tokio::test]
async fn receipt_events_are_posted_signed_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first request fails: its batch must come again.
    let (receiver, url) = Receiver::start(&[500], 200).await;
    let server = server_with_webhook(
        dir.path(),
        &url,
        &[
            ("WEBHOOK__LINGER", "\"20ms\""),
            ("WEBHOOK__BACKOFF", "\"200ms\""),
        ],
    );
    let app = server.app();
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let token = ann.welcome().device_token.clone();

    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {"n": 1}}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["message_id"].as_str().expect("id").to_owned();
    let push = next_push(&mut ann).await;
    ann.ack_push(&push).await.expect("ack");
    ann.opened(&id).await.expect("opened");
    until(&receiver, |r| r.taken_events().len() >= 3).await;
    // Each event once among the batches the receiver took.
    let expected: Vec<_> = ["acked", "delivered", "opened"]
        .iter()
        .map(|kind| (kind.to_string(), id.clone(), token.clone()))
        .collect();
    assert_eq!(summary(&receiver.taken_events()), expected);
    let requests = receiver.requests();
    for request in &requests {
        assert_signed(request, &app.secret);
        let body: Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(body["app"], app.id.as_str(), "{body}");
    }
    // The failed batch was posted again, with its delivery id and the same events.
    let failed = &requests[0];
    assert_eq!(failed.status, 500);
    let retry = requests
        .iter()
        .skip(1)
        .find(|request| request.delivery == failed.delivery)
        .expect("the failed batch was posted again");
    assert_eq!(retry.status, 200);
    assert_eq!(summary(&events(failed)), summary(&events(retry)));
    // Every other batch has a delivery id of its own.
    let mut deliveries: Vec<_> = requests.iter().map(|r| r.delivery.clone()).collect();
    deliveries.sort();
    deliveries.dedup();
    assert_eq!(deliveries.len(), requests.len() - 1, "{requests:?}");
    assert!(
        requests.iter().all(|r| !r.delivery.is_empty()),
        "{requests:?}"
    );

    let name = |outcome: &str| {
        format!(
            "pigeon_webhook_events_total{{app=\"{}\",outcome=\"{outcome}\"}}",
            app.id
        )
    };
    let sent = receiver.taken_events().len() as u64;
    assert_eq!(metric(&server, &name("sent")).await, Some(sent));
    assert_eq!(metric(&server, &name("failed")).await, Some(0));
    assert_eq!(metric(&server, &name("dropped")).await, Some(0));
    let errors = format!(
        "pigeon_webhook_requests_total{{app=\"{}\",result=\"error\"}}",
        app.id
    );
    assert_eq!(metric(&server, &errors).await, Some(1));
}

#[tokio::test]
async fn a_failing_receiver_fills_the_queue_and_delivery_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (receiver, url) = Receiver::start(&[], 503).await;
    // Only acks are posted; five wait at most; the first batch is retried for a long time.
    let server = server_with_webhook(
        dir.path(),
        &url,
        &[
            ("WEBHOOK__EVENTS", "[\"acked\"]"),
            ("WEBHOOK__QUEUE", "5"),
            ("WEBHOOK__BATCH", "5"),
            ("WEBHOOK__LINGER", "\"10ms\""),
            ("WEBHOOK__BACKOFF", "\"1h\""),
        ],
    );
    let app = server.app();
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let pushes = 40;
    for n in 0..pushes {
        let (status, answer) = server
            .push(json!({"audience": {"uids": ["ann"]}, "payload": {"n": n}}))
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    // Every push arrives and is acked, however the receiver fares.
    for n in 0..pushes {
        let push = next_push(&mut ann).await;
        assert_eq!(support::payload(&push)["n"], n);
        ann.ack_push(&push).await.expect("ack");
    }
    let name = |outcome: &str| {
        format!(
            "pigeon_webhook_events_total{{app=\"{}\",outcome=\"{outcome}\"}}",
            app.id
        )
    };
    // At most one batch in its retries and one queue's worth are kept: the rest dropped.
    let begin = Instant::now();
    loop {
        let dropped = metric(&server, &name("dropped")).await.unwrap_or(0);
        let queued = metric(
            &server,
            &format!("pigeon_webhook_queue{{app=\"{}\"}}", app.id),
        )
        .await
        .unwrap_or(0);
        let posted: usize = receiver.requests().iter().map(|r| events(r).len()).sum();
        if dropped + queued + posted as u64 == pushes as u64 && posted > 0 {
            assert!(dropped >= pushes as u64 - 10, "{dropped} dropped");
            assert!(queued <= 5, "{queued} queued");
            break;
        }
        assert!(
            begin.elapsed() < WAIT,
            "{dropped} dropped, {queued} queued, {posted} posted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One batch, posted once: its retry waits an hour.
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        events(&requests[0])
            .iter()
            .all(|event| event["type"] == "acked"),
        "{requests:?}"
    );
    assert_eq!(metric(&server, &name("sent")).await, Some(0));
}

/// In cluster mode the node holding the device posts its events.
#[tokio::test]
async fn a_node_posts_the_events_of_its_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (receiver, url) = Receiver::start(&[], 200).await;
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let hook = [
        ("PIGEON_APPS__0__WEBHOOK__URL", url.as_str()),
        ("PIGEON_APPS__0__WEBHOOK__LINGER", "\"20ms\""),
    ];
    let node = NodeProcess::start(&deployment, &hook);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;
    let token = ann.welcome().device_token.clone();
    let answer = gateway.push_to(&["ann"], json!({"n": 1})).await;
    let id = answer["message_id"].as_str().expect("id").to_owned();
    let push = next_push(&mut ann).await;
    ann.ack_push(&push).await.expect("ack");
    until(&receiver, |r| r.taken_events().len() >= 2).await;
    let expected: Vec<_> = ["acked", "delivered"]
        .iter()
        .map(|kind| (kind.to_string(), id.clone(), token.clone()))
        .collect();
    assert_eq!(summary(&receiver.taken_events()), expected);
    for request in receiver.requests() {
        assert_signed(&request, &cluster::app().secret);
    }
}
