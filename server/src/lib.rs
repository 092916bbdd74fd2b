//! Pigeon's server: connection nodes, the push API, the registry and the offline stores.
//!
//! # Layout
//! Device connections:
//! - [`session`]: the device-session state machine (handshake, seq/ack window, heartbeats,
//!   replay), plain logic with time passed in.
//! - [`device`]: one device connection over any transport: admission (Hello, credential,
//!   device token), the session loop, and the transport trait.
//! - [`websocket`]: the WebSocket transport (ws and wss), its listener, and the parking lot
//!   of idle plain connections.
//! - [`quic`]: the QUIC transport and its listener.
//! - [`tls`]: certificates for wss and QUIC, and development certificates.
//! - [`connections`]: a process's table of live connections, and delivery into them (each
//!   app's shared stream in offset order, through a tag index).
//! - [`stream_keeper`]: closes gaps in an app's shared stream from the store, and notices a
//!   stream that was recreated.
//!
//! Pushes:
//! - [`push`]: the push pipeline (resolve, record, deliver, count) and its one seam, the
//!   [`push::Fanout`]: the process's own connection table, or the nodes over gRPC.
//! - [`api`]: the HTTP API (push and device routes, health and metrics routes), request
//!   validation.
//! - [`devices`]: the device API (tags, aliases, a device's registry entry), for HTTP and
//!   gRPC alike.
//! - [`message`]: a push inside Pigeon (message, per-device delivery, ids).
//! - [`intake`]: where pushes wait for the pipeline, by lane (5:2:1) and in turn per app.
//! - [`rate_limit`]: per-app and per-class rate limits (GCRA), in the process or in Redis.
//! - [`scheduler`]: sends scheduled pushes when they are due, once each.
//!
//! State:
//! - [`store`]: the [`store::Registry`] and [`store::OfflineStore`] traits and the rules both
//!   stores keep; the embedded (redb) store of standalone mode and the Redis store of
//!   cluster mode.
//!
//! Processes:
//! - [`process`]: the parts every role is composed from (listeners, device listeners and
//!   their drain, the HTTP server, start errors).
//! - [`standalone`]: `pigeon standalone`, everything in one process.
//! - [`cluster`]: `pigeon node` and `pigeon gateway` around Redis, cluster membership
//!   (leases, routes) and the gateway's fan-out to the nodes.
//! - [`config`]: settings from TOML and `PIGEON_*` variables.
//! - [`metrics`]: counters and gauges for `GET /metrics` (Prometheus text format).
//! - [`log_throttle`]: one warning a second from a call site that fails per device.
//!
//! Device credentials (JWTs) and the gRPC services are wire formats, in `pigeon-proto`.
#![forbid(unsafe_code)]

pub mod api;
pub mod caps;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod device;
pub mod device_expiry;
pub mod devices;
pub mod intake;
pub mod listener;
pub mod log_throttle;
pub mod message;
pub mod metrics;
pub mod process;
pub mod push;
pub mod quic;
pub mod rate_limit;
pub mod receipts;
pub mod scheduler;
pub mod session;
pub mod standalone;
pub mod stats;
pub mod status_writer;
pub mod store;
pub mod stream_keeper;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
pub mod websocket;
