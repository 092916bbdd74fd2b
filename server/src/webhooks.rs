//! Receipt callbacks: what devices did with an app's messages (handed to the connection,
//! acknowledged, opened), posted in batches to the app's webhook URL by the process that
//! holds the connections (docs/webhooks.md).
//!
//! Delivery never waits for a receiver: an event goes into the app's bounded queue, or is
//! dropped (and counted) when the queue is full. One task per app takes batches from the
//! queue and posts each, signed with the app's secret, until the receiver answers 2xx or
//! the batch has had its attempts (then it is dropped and counted). A batch is posted
//! again after a failure, with the same `Pigeon-Delivery` id, so a receiver that did take
//! it but failed to answer can tell. Events still queued when the process stops are lost.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AppSettings, ReceiptKind, WebhookSettings};
use crate::log_throttle::Throttle;
use crate::message::unix_millis;

/// The longest wait between two attempts of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The webhooks of a process's apps: those that have one.
#[derive(Default)]
pub struct Webhooks {
    hooks: HashMap<Arc<str>, Arc<Hook>>,
}

/// One app's webhook: its settings, its queue and its counters.
struct Hook {
    app: Arc<str>,
    settings: WebhookSettings,
    secret: Vec<u8>,
    /// Whether each kind (in [`ReceiptKind::ALL`] order) is posted.
    wants: [bool; 3],
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
}

/// One event as posted.
#[derive(Serialize)]
struct Event {
    #[serde(rename = "type")]
    kind: ReceiptKind,
    message_id: String,
    token: Arc<str>,
    /// When it happened (Unix ms).
    at: u64,
}

/// One request's body.
#[derive(Serialize)]
struct Batch<'a> {
    app: &'a str,
    events: &'a [Event],
}

impl Webhooks {
    /// The webhooks of those of `apps` that configure one; nothing is posted until
    /// [`Webhooks::start`].
    pub fn new(apps: &[AppSettings]) -> Self {
        let hooks = apps
            .iter()
            .filter_map(|app| {
                let settings = app.webhook.clone()?;
                let wants = ReceiptKind::ALL.map(|kind| settings.events.contains(&kind));
                let hook = Hook {
                    app: Arc::from(app.id.as_str()),
                    secret: app.secret.as_bytes().to_vec(),
                    wants,
                    queue: Mutex::new(VecDeque::new()),
                    ready: Notify::new(),
                    sent: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    requests_ok: AtomicU64::new(0),
                    requests_failed: AtomicU64::new(0),
                    settings,
                };
                Some((hook.app.clone(), Arc::new(hook)))
            })
            .collect();
        Self { hooks }
    }

    /// Queues an event of `kind` for each of `messages` of `app` on the device `token`, if
    /// the app's webhook posts that kind.
    pub fn record<'a>(
        &self,
        app: &str,
        kind: ReceiptKind,
        token: &str,
        messages: impl IntoIterator<Item = &'a str>,
    ) {
        let Some(hook) = self.hooks.get(app) else {
            return;
        };
        let index = ReceiptKind::ALL.iter().position(|k| *k == kind);
        if !index.is_some_and(|index| hook.wants[index]) {
            return;
        }
        let mut messages = messages.into_iter().peekable();
        if messages.peek().is_none() {
            return;
        }
        let (token, at) = (Arc::<str>::from(token), unix_millis());
        let mut queue = hook.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut queued = false;
        for message in messages {
            if queue.len() >= hook.settings.queue {
                hook.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push_back(Event {
                kind,
                message_id: message.to_owned(),
                token: token.clone(),
                at,
            });
            queued = true;
        }
        drop(queue);
        if queued {
            hook.ready.notify_one();
        }
    }

    /// Starts posting each app's events, until `shutdown` (then what is queued is posted
    /// once more, without retries).
    pub fn start(&self, shutdown: &CancellationToken) {
        if self.hooks.is_empty() {
            return;
        }
        let client = match reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot set up the webhook client; no webhooks posted");
                return;
            }
        };
        for hook in self.hooks.values() {
            tokio::spawn(post_batches(hook.clone(), client.clone(), shutdown.clone()));
        }
    }

    /// Per app, the events posted, dropped and failed, the requests made and the queue, in
    /// Prometheus's text format (nothing when no app has a webhook).
    pub fn render(&self, out: &mut String) {
        if self.hooks.is_empty() {
            return;
        }
        let mut hooks: Vec<_> = self.hooks.values().collect();
        hooks.sort_by(|a, b| a.app.cmp(&b.app));
        type Counter = fn(&Hook) -> &AtomicU64;
        /// A counter family: its name, help, label, and each label value's counter.
        type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, Counter)]);
        let families: [Family; 2] = [
            (
                "pigeon_webhook_events_total",
                "Receipt events per app: posted (the receiver answered 2xx), dropped (the \
                 queue was full) and failed (a batch's attempts ran out).",
                "outcome",
                &[
                    ("sent", |hook| &hook.sent),
                    ("dropped", |hook| &hook.dropped),
                    ("failed", |hook| &hook.failed),
                ],
            ),
            (
                "pigeon_webhook_requests_total",
                "Webhook requests per app, by whether the receiver answered 2xx.",
                "result",
                &[
                    ("ok", |hook| &hook.requests_ok),
                    ("error", |hook| &hook.requests_failed),
                ],
            ),
        ];
        for (name, help, label, series) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for hook in &hooks {
                for (value_name, counter) in series {
                    let value = counter(hook).load(Ordering::Relaxed);
                    let app = &hook.app;
                    let _ = writeln!(
                        out,
                        "{name}{{app=\"{app}\",{label}=\"{value_name}\"}} {value}"
                    );
                }
            }
        }
        let name = "pigeon_webhook_queue";
        let _ = writeln!(
            out,
            "# HELP {name} Receipt events waiting to be posted, per app.\n# TYPE {name} gauge"
        );
        for hook in &hooks {
            let depth = hook.queue.lock().map_or(0, |queue| queue.len());
            let _ = writeln!(out, "{name}{{app=\"{}\"}} {depth}", hook.app);
        }
    }
}

/// The value of the `Pigeon-Signature` header of `body` posted at `unix_seconds`:
/// `t=<unix seconds>,v1=<hex of HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], unix_seconds: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut header = format!("t={unix_seconds},v1=");
    for byte in mac.finalize().into_bytes() {
        let _ = write!(header, "{byte:02x}");
    }
    header
}

/// Posts `hook`'s events in batches until `shutdown`.
async fn post_batches(hook: Arc<Hook>, client: reqwest::Client, shutdown: CancellationToken) {
    // Delivery ids unique across the processes posting for the app, and restarts.
    let process = rand::random::<u64>();
    let mut batches = 0u64;
    loop {
        let waiting = hook.queue.lock().map_or(0, |queue| queue.len());
        let stopping = if waiting == 0 {
            tokio::select! {
                () = hook.ready.notified() => continue,
                () = shutdown.cancelled() => return,
            }
        } else if waiting < hook.settings.batch && !shutdown.is_cancelled() {
            // Let a batch fill, unless one already waits.
            tokio::select! {
                () = tokio::time::sleep(hook.settings.linger) => false,
                () = shutdown.cancelled() => true,
            }
        } else {
            shutdown.is_cancelled()
        };
        let events: Vec<Event> = {
            let mut queue = hook.queue.lock().unwrap_or_else(|p| p.into_inner());
            let take = queue.len().min(hook.settings.batch);
            queue.drain(..take).collect()
        };
        if events.is_empty() {
            continue;
        }
        batches += 1;
        let delivery = format!("{process:016x}-{batches}");
        let attempts = if stopping { 1 } else { hook.settings.attempts };
        post(&hook, &client, &delivery, &events, attempts, &shutdown).await;
    }
}

/// Posts one batch, retrying with backoff, and counts what became of it.
async fn post(
    hook: &Hook,
    client: &reqwest::Client,
    delivery: &str,
    events: &[Event],
    attempts: u32,
    shutdown: &CancellationToken,
) {
    let body = match serde_json::to_vec(&Batch {
        app: &hook.app,
        events,
    }) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "cannot encode a webhook batch");
            return;
        }
    };
    let count = events.len() as u64;
    let mut backoff = hook.settings.backoff;
    for attempt in 1..=attempts {
        let unix_seconds = unix_millis() / 1000;
        let result = client
            .post(&hook.settings.url)
            .timeout(hook.settings.timeout)
            .header("content-type", "application/json")
            .header("pigeon-delivery", delivery)
            .header(
                "pigeon-signature",
                signature(&hook.secret, unix_seconds, &body),
            )
            .body(body.clone())
            .send()
            .await;
        let error = match result {
            Ok(response) if response.status().is_success() => {
                hook.requests_ok.fetch_add(1, Ordering::Relaxed);
                hook.sent.fetch_add(count, Ordering::Relaxed);
                return;
            }
            Ok(response) => format!("answered {}", response.status()),
            Err(error) => error.to_string(),
        };
        hook.requests_failed.fetch_add(1, Ordering::Relaxed);
        static THROTTLE: Throttle = Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(
                app = %hook.app, %error, attempt, attempts, suppressed,
                "posting receipt events to the webhook failed"
            );
        }
        if attempt == attempts {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    hook.failed.fetch_add(count, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_sign_the_time_and_the_body() {
        // HMAC-SHA256("key", "1700000000.{}"), computed with openssl:
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            signature(b"key", 1_700_000_000, b"{}"),
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    fn hook_app(events: Vec<ReceiptKind>, queue: usize) -> AppSettings {
        let mut app = AppSettings::new("a", "k".repeat(16), "s".repeat(32));
        app.webhook = Some(WebhookSettings {
            url: "http://127.0.0.1:9/".into(),
            events,
            queue,
            ..WebhookSettings::default()
        });
        app
    }

    #[test]
    fn only_the_kinds_asked_for_are_queued_and_a_full_queue_drops() {
        let webhooks = Webhooks::new(&[hook_app(vec![ReceiptKind::Acked], 3)]);
        webhooks.record("a", ReceiptKind::Delivered, "t1", ["m1"]);
        webhooks.record("other", ReceiptKind::Acked, "t1", ["m1"]);
        webhooks.record("a", ReceiptKind::Acked, "t1", ["m1", "m2"]);
        webhooks.record("a", ReceiptKind::Acked, "t2", ["m1", "m2"]);
        let hook = &webhooks.hooks["a"];
        let queue = hook.queue.lock().expect("queue");
        let queued: Vec<_> = queue
            .iter()
            .map(|event| (event.message_id.as_str(), &*event.token))
            .collect();
        assert_eq!(queued, [("m1", "t1"), ("m2", "t1"), ("m1", "t2")]);
        assert_eq!(hook.dropped.load(Ordering::Relaxed), 1);
    }
}
