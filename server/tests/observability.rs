//! What operators watch: the Grafana dashboard in deploy/grafana (every metric its queries
//! name is one Pigeon exports, as scraped from a running standalone process with a webhook
//! and from a cluster's gateway and node after a push went through each), and traces (a
//! push's spans on the gateway and on the node, one trace, exported to a real OTLP/HTTP
//! receiver).

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pigeon_client::DeviceState;
use serde_json::{Value, json};
use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, WAIT, connect, next_push};

/// The `pigeon_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pigeon_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The series names a `/metrics` text exports (its sample lines, not its comments).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.expect("text")
}

/// Every query of every panel (and of the template variables).
fn queries(dashboard: &Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard of {} panels", panels.len());
    let mut queries = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "unbalanced: {expr}"
            );
            queries.push(expr.to_owned());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

#[tokio::test]
async fn every_dashboard_query_names_a_metric_pigeon_exports() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/pigeon.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("json");
    let queries = queries(&dashboard);
    let wanted: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(wanted.len() >= 20, "{wanted:?}");

    // Standalone, with a webhook (nothing listens there: its requests fail, and count).
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with_app(
        dir.path(),
        &[("WEBHOOK__URL", "http://127.0.0.1:9/receipts")],
    );
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["ann"]}, "payload": {}}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let push = next_push(&mut ann).await;
    ann.ack_push(&push).await.expect("ack");
    let mut seen = exported(&scrape(&format!("{}/metrics", server.http_url)).await);

    // A cluster: the gateway calls the node, both use Redis.
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut bob = cluster::connect(&node, "bob", &DeviceState::default()).await;
    gateway.push_to(&["bob"], json!({})).await;
    let push = next_push(&mut bob).await;
    bob.ack_push(&push).await.expect("ack");
    seen.extend(exported(
        &scrape(&format!("{}/metrics", gateway.http_url)).await,
    ));
    seen.extend(exported(&scrape(&node.metrics_url).await));

    let missing: Vec<_> = wanted.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics no process exports: {missing:?}"
    );
}

/// The value of the sample line `series` (name and labels, exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The embedded store times each write from its queueing to its commit, in the lane it
/// waited in: a notification's record in "normal", a marketing push's in "low", the
/// store's upkeep (admitting a device, its ack, the messages' statuses) in "high".
#[tokio::test]
async fn the_embedded_store_times_writes_by_lane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with_app(dir.path(), &[]);
    let url = format!("{}/metrics", server.http_url);
    let count = |text: &str, lane: &str| {
        sample(
            text,
            &format!("pigeon_store_write_seconds_count{{lane=\"{lane}\"}}"),
        )
    };
    let mut ann = connect(&server, "ann", &DeviceState::default()).await;
    let before = scrape(&url).await;
    assert_eq!(count(&before, "normal"), Some(0.0), "no push yet");
    assert_eq!(count(&before, "low"), Some(0.0), "no push yet");
    assert!(count(&before, "high") >= Some(1.0), "ann's admission");
    for class in ["notification", "marketing"] {
        let (status, answer) = server
            .push(json!({"audience": {"uids": ["ann"]}, "payload": {}, "class": class, "ttl": 60}))
            .await;
        assert_eq!(status, 202, "{answer}");
        let push = next_push(&mut ann).await;
        ann.ack_push(&push).await.expect("ack");
    }
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let text = scrape(&url).await;
        // The acks are written after the pushes' records, in the lane "high".
        if count(&text, "high") >= count(&before, "high").map(|n| n + 2.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the acks were not written: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        count(&after, "normal"),
        Some(1.0),
        "the notification's record"
    );
    assert_eq!(
        count(&after, "low"),
        Some(1.0),
        "the marketing push's record"
    );
    let transactions = sample(&after, "pigeon_store_transaction_seconds_count").unwrap_or(0.0);
    assert!(transactions >= 3.0, "{transactions} transactions timed");
    let waited = sample(&after, "pigeon_store_write_seconds_sum{lane=\"normal\"}").unwrap_or(0.0);
    assert!(waited > 0.0 && waited < 5.0, "the record waited {waited} s");

    // The devices' counters go to the store's counter log, folded into their records every
    // two seconds while they change.
    let deadline = Instant::now() + WAIT + Duration::from_secs(3);
    let folded = loop {
        let (status, answer) = server
            .push(json!({"audience": {"uids": ["ann"]}, "payload": {}}))
            .await;
        assert_eq!(status, 202, "{answer}");
        let push = next_push(&mut ann).await;
        ann.ack_push(&push).await.expect("ack");
        let text = scrape(&url).await;
        if sample(&text, "pigeon_store_fold_seconds_count") >= Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no fold: {text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let held = sample(&folded, "pigeon_store_counter_devices");
    assert!(
        held.is_some_and(|held| held <= 1.0),
        "{held:?} devices held"
    );
}

/// One span a collector received: its service, name, trace id, id and parent's id (hex).
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An OTLP/HTTP collector on an ephemeral port (protobuf bodies at `/v1/traces`); its
/// base URL and what it received.
async fn collector() -> (String, Arc<Mutex<Vec<ReceivedSpan>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
    let received = spans.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut received = received.lock().expect("spans");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|resource| &resource.attributes)
                        .find(|attribute| attribute.key == "service.name")
                        .and_then(|attribute| attribute.value.as_ref())
                        .and_then(|value| match &value.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(name)) => Some(name.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in resource.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                        received.push(ReceivedSpan {
                            service: service.clone(),
                            name: span.name,
                            trace: hex(&span.trace_id),
                            id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                        });
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, spans)
}

/// Waits for the spans of trace `trace` to hold a push span on the gateway and a deliver
/// span on the node; those two.
async fn trace_of(spans: &Mutex<Vec<ReceivedSpan>>, trace: &str) -> (ReceivedSpan, ReceivedSpan) {
    let begin = Instant::now();
    loop {
        {
            let spans = spans.lock().expect("spans");
            let find = |service: &str, name: &str| {
                spans
                    .iter()
                    .find(|s| s.trace == trace && s.service == service && s.name == name)
                    .cloned()
            };
            if let (Some(push), Some(deliver)) = (
                find("pigeon-gateway", "push"),
                find("pigeon-node", "deliver"),
            ) {
                return (push, deliver);
            }
            assert!(
                begin.elapsed() < WAIT,
                "trace {trace} never had both spans: {spans:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_push_is_one_trace_across_gateway_and_node() {
    let (endpoint, spans) = collector().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let tracing = [
        ("PIGEON_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let node = NodeProcess::start(&deployment, &tracing);
    let gateway = GatewayProcess::start(&deployment, &tracing);
    let mut ann = cluster::connect(&node, "ann", &DeviceState::default()).await;

    // The caller's trace: the push joins it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{}/v1/push", gateway.http_url))
        .bearer_auth(cluster::app().api_key)
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&json!({"audience": {"uids": ["ann"]}, "payload": {"n": 1}}))
        .send()
        .await
        .expect("push");
    assert_eq!(response.status().as_u16(), 202);
    next_push(&mut ann).await;
    let (push, deliver) = trace_of(&spans, trace).await;
    assert_eq!(push.parent, caller_span, "{push:?}");
    assert_eq!(
        deliver.parent, push.id,
        "the node's span is the push's child"
    );

    // No traceparent: a trace of its own, still across both processes.
    gateway.push_to(&["ann"], json!({"n": 2})).await;
    next_push(&mut ann).await;
    let begin = Instant::now();
    let other = loop {
        let found = spans
            .lock()
            .expect("spans")
            .iter()
            .find(|s| s.service == "pigeon-gateway" && s.name == "push" && s.trace != trace)
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(begin.elapsed() < WAIT, "the second push has no span");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        other.parent.is_empty() || other.parent == "0000000000000000",
        "{other:?}"
    );
    let (_, deliver) = trace_of(&spans, &other.trace).await;
    assert_eq!(deliver.parent, other.id);
}
