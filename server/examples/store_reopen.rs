//! How long the embedded store takes to open after the process holding it was SIGKILLed,
//! by the size of what it holds. First fill a store and keep writing to it:
//!
//! ```sh
//! cargo run --release -p pigeon-server --example store_reopen -- fill <dir> <devices> <messages>
//! ```
//!
//! It admits the devices, records the messages (each to one device, in turn, 200 bytes of
//! payload, none acknowledged), prints `filled` and the file's size, then goes on recording
//! until it is killed. Kill it with SIGKILL while it writes, then time the open:
//!
//! ```sh
//! cargo run --release -p pigeon-server --example store_reopen -- open <dir>
//! ```
//!
//! which prints how long the open took, then closes the store as a standalone server does
//! when it stops: the next open does not check the file.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use pigeon_server::config::Limits;
use pigeon_server::connections::ConnectionTable;
use pigeon_server::message::{Message, new_message_id, unix_millis};
use pigeon_server::store::embedded::EmbeddedStore;
use pigeon_server::store::{Accept, OfflineStore, Registry, Target};
use tokio_util::sync::CancellationToken;

const APP: &str = "demo";
/// Pushes recorded at once.
const IN_FLIGHT: usize = 512;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["fill", dir, devices, messages] => {
            fill(Path::new(dir), devices.parse()?, messages.parse()?).await
        }
        ["open", dir] => open(Path::new(dir)).await,
        _ => anyhow::bail!("usage: store_reopen fill <dir> <devices> <messages> | open <dir>"),
    }
}

fn store(dir: &Path) -> anyhow::Result<EmbeddedStore> {
    let routes = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
    Ok(EmbeddedStore::open(dir, &Limits::default(), routes)?)
}

async fn fill(dir: &Path, devices: usize, messages: usize) -> anyhow::Result<()> {
    let store = store(dir)?;
    let mut tokens = Vec::with_capacity(devices.max(1));
    for device in 0..devices.max(1) {
        tokens.push(
            store
                .admit_device(APP, &format!("u{device}"), "")
                .await?
                .token,
        );
    }
    let record = |n: usize| {
        let now_ms = unix_millis();
        let message = Arc::new(Message {
            pace_ms: 0,
            id: new_message_id(now_ms),
            payload: Bytes::from(vec![b'x'; 200]),
            priority: Default::default(),
            class: Default::default(),
            accepted_at_ms: now_ms,
            expires_at_ms: now_ms + 86_400_000,
            collapse_key: String::new(),
            filter: None,
        });
        store.record(Accept {
            app: APP.into(),
            message,
            targets: vec![Target {
                token: tokens[n % tokens.len()].clone(),
                store: true,
            }],
            once: None,
        })
    };
    let mut filling = futures_util::stream::iter(0..messages)
        .map(record)
        .buffer_unordered(IN_FLIGHT);
    while let Some(recorded) = filling.next().await {
        recorded?;
    }
    let size = std::fs::metadata(dir.join("pigeon.redb"))?.len();
    println!(
        "filled: {messages} messages, {:.1} MiB",
        size as f64 / 1048576.0
    );
    let mut writing = futures_util::stream::iter(messages..)
        .map(record)
        .buffer_unordered(IN_FLIGHT);
    while let Some(recorded) = writing.next().await {
        recorded?;
    }
    Ok(())
}

async fn open(dir: &Path) -> anyhow::Result<()> {
    let began = Instant::now();
    let store = store(dir)?;
    let opened = began.elapsed();
    let stored = store.stored_messages().await?;
    println!(
        "opened in {:.2} s; {stored} messages stored",
        opened.as_secs_f64()
    );
    store.close().await?;
    Ok(())
}
