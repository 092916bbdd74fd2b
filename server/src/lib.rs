//! Pigeon's server: connection nodes, the push API, the registry and the offline stores.
//!
//! # Layout
//! - [`session`]: the device-session state machine (handshake, seq/ack window, heartbeats,
//!   replay), plain logic with time passed in.
//! - [`connection`]: drives one device connection over any transport with a session.
//! - [`websocket`]: the WebSocket transport (ws and wss) and its listener.
//! - [`quic`]: the QUIC transport and its listener.
//! - [`tls`]: certificates for wss and QUIC, and development certificates.
//! - [`node`]: the table of live connections and delivery into them.
//! - [`push`]: the push service: resolve the audience, store, deliver.
//! - [`api`]: the HTTP/JSON push API.
//! - [`store`]: the [`store::Registry`] and [`store::OfflineStore`] traits, and the embedded
//!   (redb) implementation of standalone mode.
//! - [`auth`]: device credentials (HS256 JWTs).
//! - [`message`]: a push inside Pigeon (message, per-device delivery, ids).
//! - [`metrics`]: counters for `GET /metrics` (Prometheus text format).
//! - [`log_throttle`]: one warning a second from a call site that fails per device.
//! - [`config`]: settings from TOML and `PIGEON_*` variables.
//! - [`standalone`]: standalone mode, all of the above in one process.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod grpc;
pub mod log_throttle;
pub mod message;
pub mod metrics;
pub mod node;
pub mod push;
pub mod quic;
pub mod session;
pub mod standalone;
pub mod store;
pub mod tls;
pub mod websocket;
