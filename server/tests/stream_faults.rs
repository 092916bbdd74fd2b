//! Faults during pushes to an app's shared stream, in cluster mode (real `redis-server`,
//! nodes and gateways, killed with SIGKILL): a node killed during a broadcast, a gateway
//! killed with pushes in flight, and Redis losing its data (the stream's epoch changes,
//! and devices are told).

mod support;

use std::collections::HashSet;
use std::time::Duration;

use pigeon_client::{ClientError, Connection, DeviceState};
use pigeon_proto::CloseCode;
use serde_json::json;
use support::cluster::{Deployment, GatewayProcess, NodeProcess, Redis, connect};
use support::next_push;

/// A device that keeps its state as it processes pushes, as an app would.
struct Device {
    uid: String,
    connection: Connection,
    state: DeviceState,
    /// Offsets of the stream `all` processed, over all its connections, in order.
    offsets: Vec<u64>,
    /// Message ids processed.
    ids: Vec<String>,
}

impl Device {
    async fn connect(node: &NodeProcess, uid: &str) -> Self {
        let connection = connect(node, uid, &DeviceState::default()).await;
        let mut state = DeviceState::default();
        state.welcomed(connection.welcome());
        Self {
            uid: uid.to_owned(),
            connection,
            state,
            offsets: Vec::new(),
            ids: Vec::new(),
        }
    }

    /// Connects again to `node` with what it kept.
    async fn move_to(&mut self, node: &NodeProcess) {
        self.connection = connect(node, &self.uid, &self.state).await;
        self.state.welcomed(self.connection.welcome());
    }

    /// Processes pushes until it has seen offset `last`; a connection that fails ends it
    /// early (false).
    async fn process_until(&mut self, last: u64) -> bool {
        while self.state.all_offset < last {
            let push = tokio::time::timeout(support::WAIT, self.connection.next_push()).await;
            let Ok(Ok(push)) = push else { return false };
            self.offsets.push(push.offset);
            self.ids.push(push.message_id.clone());
            self.state.processed(&push);
            if self.connection.ack_push(&push).await.is_err() {
                return false;
            }
        }
        true
    }
}

fn broadcast(n: u64) -> serde_json::Value {
    json!({"audience": {"all": true}, "payload": {"n": n}, "ttl": 300})
}

/// Node two is killed in the middle of twenty broadcasts. Devices of node one get all of
/// them in order; those of node two move to node one and get every one they had not
/// processed, in order, none twice.
#[tokio::test]
async fn a_node_killed_during_a_broadcast_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let one = NodeProcess::start(&deployment, &[]);
    let mut two = NodeProcess::start(&deployment, &[]);
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut devices = Vec::new();
    for n in 0..40 {
        let node = if n % 2 == 0 { &one } else { &two };
        devices.push(Device::connect(node, &format!("d{n}")).await);
    }
    const PUSHES: u64 = 20;
    for n in 1..=PUSHES {
        if n == 8 {
            two.kill();
        }
        let (status, answer) = gateway.push(broadcast(n)).await;
        assert_eq!(status, 202, "{answer}");
    }
    for (index, device) in devices.iter_mut().enumerate() {
        if !device.process_until(PUSHES).await {
            assert_eq!(
                index % 2,
                1,
                "only devices of node two lose their connection"
            );
            device.move_to(&one).await;
            assert!(
                device.process_until(PUSHES).await,
                "{} on node one",
                device.uid
            );
        }
        let mut expected: Vec<u64> = device.offsets.clone();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(device.offsets, expected, "{}: in order, once", device.uid);
        assert_eq!(expected, (1..=PUSHES).collect::<Vec<_>>(), "{}", device.uid);
    }
}

/// A gateway is killed with pushes in flight; another takes over. Every push that was
/// answered 202 reaches every device, in stream order, once; a push whose request died
/// with the gateway may or may not have been accepted, and an accepted one whose hand-off
/// to the nodes never came reaches the devices from the store (the node closes the gap).
#[tokio::test]
async fn a_gateway_killed_with_pushes_in_flight_loses_no_accepted_push() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let mut first = GatewayProcess::start(&deployment, &[]);
    let second = GatewayProcess::start(&deployment, &[]);
    let mut devices = Vec::new();
    for n in 0..10 {
        devices.push(Device::connect(&node, &format!("d{n}")).await);
    }
    let mut accepted = HashSet::new();
    // Pushes in flight on the first gateway while it is killed.
    let in_flight = {
        let url = first.http_url.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut answered = Vec::new();
            for n in 0..200u64 {
                let request = client
                    .post(format!("{url}/v1/push"))
                    .bearer_auth(support::cluster::app().api_key)
                    .json(&broadcast(n))
                    .send()
                    .await;
                let Ok(response) = request else { break };
                if response.status() != 202 {
                    break;
                }
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    break;
                };
                answered.push(body["message_id"].as_str().unwrap_or_default().to_owned());
            }
            answered
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.kill();
    accepted.extend(in_flight.await.expect("pushing task"));
    assert!(
        !accepted.is_empty(),
        "some pushes went through before the kill"
    );
    assert!(
        accepted.len() < 200,
        "the kill came while pushes were in flight"
    );
    for n in 1000..1005 {
        let (status, answer) = second.push(broadcast(n)).await;
        assert_eq!(status, 202, "{answer}");
        accepted.insert(answer["message_id"].as_str().unwrap_or_default().to_owned());
    }
    let (status, answer) = second.push(broadcast(9999)).await;
    assert_eq!(status, 202, "{answer}");
    let last_id = answer["message_id"].as_str().unwrap_or_default().to_owned();
    accepted.insert(last_id.clone());
    for device in &mut devices {
        while device.ids.last() != Some(&last_id) {
            let push = next_push(&mut device.connection).await;
            device.offsets.push(push.offset);
            device.ids.push(push.message_id.clone());
            device.connection.ack_push(&push).await.expect("ack");
        }
        let mut in_order = device.offsets.clone();
        in_order.sort_unstable();
        in_order.dedup();
        assert_eq!(device.offsets, in_order, "{}: in order, once", device.uid);
        let got: HashSet<String> = device.ids.iter().cloned().collect();
        let missing: Vec<&String> = accepted.difference(&got).collect();
        assert!(missing.is_empty(), "{} missed {missing:?}", device.uid);
    }
}

/// Redis loses its data (here: FLUSHALL). The node notices at its next look at the stream
/// and closes its devices' connections with 4005; reconnecting, each is told in its
/// Welcome that the node cannot prove it got everything (`recovered: false`), and pushes
/// after that reach it again.
#[tokio::test]
async fn devices_are_told_when_the_stream_history_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(
        &deployment,
        &[
            ("PIGEON_LIMITS__HEARTBEAT_INTERVAL", "1s"),
            ("PIGEON_LIMITS__IDLE_TIMEOUT", "10s"),
        ],
    );
    let gateway = GatewayProcess::start(&deployment, &[]);
    let mut device = Device::connect(&node, "ann").await;
    let epoch = device.state.all_epoch.clone();
    let (status, _) = gateway.push(broadcast(1)).await;
    assert_eq!(status, 202);
    assert!(device.process_until(1).await);

    redis.cli(&["FLUSHALL"]).expect("flushall");
    let error = tokio::time::timeout(support::WAIT, device.connection.next_push())
        .await
        .expect("closed by the node in time")
        .expect_err("a close, not a push");
    match error {
        ClientError::Closed { code, .. } => assert_eq!(code, CloseCode::StreamReset.code()),
        other => panic!("expected a close with 4005, got {other:?}"),
    }

    device.move_to(&node).await;
    let streams = &device.connection.welcome().streams;
    assert!(!streams[0].recovered, "{streams:?}");
    assert_ne!(streams[0].epoch, epoch, "a new epoch");
    let (status, _) = gateway.push(broadcast(2)).await;
    assert_eq!(status, 202);
    let push = next_push(&mut device.connection).await;
    assert_eq!((push.stream.as_str(), push.offset), ("all", 1));
}
