//! The Grafana dashboard in deploy/grafana: every metric its queries name is one that
//! Pigeon exports, as scraped from a running standalone process (with a webhook) and from
//! a cluster's gateway and node after a push went through each.

mod support;

use std::collections::BTreeSet;

use pigeon_client::DeviceState;
use serde_json::{Value, json};
use support::cluster::{self as cluster, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, connect, next_push};

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
    let app = pigeon_server::standalone::demo_app(dir.path()).expect("demo app");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_APPS__0__ID", &app.id),
            ("PIGEON_APPS__0__API_KEY", &app.api_key),
            ("PIGEON_APPS__0__SECRET", &app.secret),
            (
                "PIGEON_APPS__0__WEBHOOK__URL",
                "http://127.0.0.1:9/receipts",
            ),
        ],
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
