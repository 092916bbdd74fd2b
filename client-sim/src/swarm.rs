//! A swarm: many simulated devices in one process, for the load-test harness.
//!
//! `pigeon-sim swarm --devices FILE --url URL...` reads one device per line of FILE
//! (`uid<TAB>credential`), and each device connects to one of the URLs (round robin) from
//! one of the `--bind` addresses. It is driven by commands on stdin, one per line:
//!
//! - `connect`: connect every device (at `--connect-rate` per second the first time; at
//!   once afterwards, as a reconnect storm);
//! - `disconnect`: close every connection and stay offline;
//! - `report`: print a [`Report`] line;
//! - `tokens`: print the device tokens kept with `--keep-tokens-every` (a `tokens` line
//!   with a `tokens` array), for the harness to tag those devices;
//! - `quit`: exit.
//!
//! Every 200 ms it prints a [`Progress`] line. Both are JSON objects on stdout with a
//! `type` field. Each device checks its seqs: a push whose seq skips ahead is a gap (a lost
//! message), one at or below the last is a duplicate (dropped, as the SDK does). A push
//! whose payload carries `"t"` (Unix microseconds when the harness sent it) adds a latency
//! sample.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::{ConnectOptions, Connection, DeviceState};

/// At most this many latency samples are kept; later ones are counted but not kept.
const MAX_SAMPLES: usize = 4_000_000;

/// A progress line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Devices connected now.
    pub connected: u64,
    /// Pushes received (duplicates excluded).
    pub received: u64,
    /// Sum over devices of the highest seq received.
    pub seq_sum: u64,
}

/// A report line: everything measured since the start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Devices in this swarm.
    pub devices: u64,
    /// Devices connected now.
    pub connected: u64,
    /// Successful connects, reconnects included.
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Connections lost without being asked to.
    pub disconnects: u64,
    /// Pushes received, duplicates excluded.
    pub received: u64,
    /// Duplicates received (and dropped).
    pub duplicates: u64,
    /// Seqs skipped: messages lost.
    pub gaps: u64,
    /// Sum over devices of the highest seq received.
    pub seq_sum: u64,
    /// Unix microseconds of the first and the last push received (0: none).
    pub first_received_us: u64,
    /// See `first_received_us`.
    pub last_received_us: u64,
    /// This process's resident memory, bytes.
    pub rss_bytes: u64,
    /// Latency samples (microseconds from the harness's send to receipt).
    pub latencies_us: Vec<u32>,
    /// Samples not kept (past the cap).
    pub samples_dropped: u64,
    /// Pushes reported opened (see [`SwarmSettings::open_every`]).
    #[serde(default)]
    pub opened: u64,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    seq_sum: AtomicU64,
    first_received_us: AtomicU64,
    last_received_us: AtomicU64,
    samples_dropped: AtomicU64,
    opened: AtomicU64,
    /// Pushes taken from the connections, duplicates included (for `open_every`).
    pushes: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

impl Stats {
    fn progress(&self) -> Progress {
        Progress {
            connected: self.connected.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            seq_sum: self.seq_sum.load(Ordering::Relaxed),
        }
    }

    fn report(&self, devices: u64) -> Report {
        let latencies = self
            .latencies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        Report {
            devices,
            connected: self.connected.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            seq_sum: self.seq_sum.load(Ordering::Relaxed),
            first_received_us: self.first_received_us.load(Ordering::Relaxed),
            last_received_us: self.last_received_us.load(Ordering::Relaxed),
            rss_bytes: rss_bytes().unwrap_or(0),
            latencies_us: latencies,
            samples_dropped: self.samples_dropped.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
        }
    }

    fn record(&self, seq: u64, last_seq: &mut u64, payload: &[u8]) {
        let now = unix_micros();
        if seq <= *last_seq {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if seq > *last_seq + 1 {
            self.gaps.fetch_add(seq - *last_seq - 1, Ordering::Relaxed);
        }
        self.seq_sum.fetch_add(seq - *last_seq, Ordering::Relaxed);
        *last_seq = seq;
        self.received.fetch_add(1, Ordering::Relaxed);
        let _ =
            self.first_received_us
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_received_us.fetch_max(now, Ordering::Relaxed);
        if let Some(sent) = sent_at(payload) {
            let latency = now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
            let mut latencies = self
                .latencies
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if latencies.len() < MAX_SAMPLES {
                latencies.push(latency);
            } else {
                self.samples_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The `"t"` of a payload, when it is a JSON object that has one.
fn sent_at(payload: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Stamped {
        t: u64,
    }
    serde_json::from_slice::<Stamped>(payload)
        .ok()
        .map(|stamped| stamped.t)
}

/// Unix time in microseconds.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

/// This process's resident set size, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    rss_of("self")
}

/// The resident set size of process `pid` (`"self"` for this one), from `/proc`.
pub fn rss_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time process `pid` ("self" for this one) has used, user and system, in seconds.
pub fn cpu_seconds_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces), from the state on: utime and
    // stime are the 12th and 13th, in USER_HZ (100 on Linux).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// What the swarm's devices should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not yet told to connect.
    Waiting,
    /// Connected (the n-th time they were told to connect).
    Online(u32),
    /// Told to disconnect.
    Offline,
}

/// One simulated device: its uid and credential.
#[derive(Clone, Debug)]
pub struct SwarmDevice {
    /// The user id (for reports).
    pub uid: String,
    /// The credential it connects with.
    pub credential: String,
}

/// Reads `uid<TAB>credential` lines.
pub fn read_devices(text: &str) -> Result<Vec<SwarmDevice>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(index, line)| {
            let (uid, credential) = line
                .split_once('\t')
                .ok_or_else(|| format!("line {}: expected uid<TAB>credential", index + 1))?;
            Ok(SwarmDevice {
                uid: uid.to_owned(),
                credential: credential.trim().to_owned(),
            })
        })
        .collect()
}

/// The id of a push to report opened: every [`SwarmSettings::open_every`]-th one received.
fn to_open(shared: &Shared, stats: &Stats, message_id: String) -> Option<String> {
    let every = u64::from(shared.settings.open_every);
    let nth = stats.pushes.fetch_add(1, Ordering::Relaxed) + 1;
    (every > 0 && nth.is_multiple_of(every)).then_some(message_id)
}

/// Settings of a swarm.
#[derive(Clone, Debug)]
pub struct SwarmSettings {
    /// Node URLs, used round robin.
    pub urls: Vec<String>,
    /// Source addresses, used round robin (none: the system's choice).
    pub binds: Vec<IpAddr>,
    /// First-time connects per second.
    pub connect_rate: u32,
    /// TLS options shared by every device.
    pub options: ConnectOptions,
    /// Keep the token of every this-many-th device (0: none), for the `tokens` command.
    pub keep_tokens_every: u32,
    /// Report every this-many-th push received as opened by its user (0: none).
    pub open_every: u32,
}

/// What every device of a swarm shares.
struct Shared {
    settings: SwarmSettings,
    stats: Stats,
    /// The tokens kept (see [`SwarmSettings::keep_tokens_every`]).
    tokens: Mutex<Vec<String>>,
}

impl Shared {
    /// The URL and options device `index` connects with: URLs and source addresses are
    /// handed out round robin.
    fn target(&self, index: u32) -> (&str, ConnectOptions) {
        let settings = &self.settings;
        let index = index as usize;
        let mut options = settings.options.clone();
        if !settings.binds.is_empty() {
            options.bind = Some(settings.binds[index % settings.binds.len()]);
        }
        (&settings.urls[index % settings.urls.len()], options)
    }
}

/// Runs a swarm until `quit` or the end of stdin.
pub async fn run(devices: Vec<SwarmDevice>, settings: SwarmSettings) -> anyhow::Result<()> {
    anyhow::ensure!(!settings.urls.is_empty(), "give at least one --url");
    let count = devices.len() as u64;
    let rate = f64::from(settings.connect_rate.max(1));
    let shared = Arc::new(Shared {
        settings,
        stats: Stats::default(),
        tokens: Mutex::new(Vec::new()),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Waiting);
    for (index, device) in devices.into_iter().enumerate() {
        let first_delay = Duration::from_secs_f64(index as f64 / rate);
        tokio::spawn(simulate(
            index as u32,
            device.credential.into_boxed_str(),
            first_delay,
            shared.clone(),
            phase_rx.clone(),
        ));
    }
    let stats = &shared.stats;
    let progress = tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(200));
            loop {
                ticks.tick().await;
                print_line("progress", &shared.stats.progress());
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut connects = 0u32;
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "connect" => {
                connects += 1;
                let _ = phase_tx.send(Phase::Online(connects));
            }
            "disconnect" => {
                let _ = phase_tx.send(Phase::Offline);
            }
            "report" => print_line("report", &stats.report(count)),
            "tokens" => {
                let tokens = shared
                    .tokens
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                print_line("tokens", &serde_json::json!({ "tokens": tokens }));
            }
            "quit" => break,
            "" => {}
            other => eprintln!("pigeon-sim swarm: unknown command {other:?}"),
        }
    }
    progress.abort();
    Ok(())
}

fn print_line<T: Serialize>(kind: &str, value: &T) {
    let mut object = serde_json::to_value(value).unwrap_or_default();
    object["type"] = serde_json::Value::from(kind);
    println!("{object}");
}

/// What a connected device does next.
enum Step {
    /// Acknowledge direct pushes up to this seq, and report the message opened (its id)
    /// when it is one to open.
    Ack(u64, Option<String>),
    /// Acknowledge the stream `all` up to this offset, and maybe report it opened.
    AckStream(u64, Option<String>),
    /// The connection was lost: reconnect.
    Lost,
    /// Told to disconnect.
    Leave,
    /// Nothing (the phase changed to one that keeps the connection).
    Stay,
}

/// First delay before retrying a failed connect; it doubles per failure up to
/// [`CONNECT_RETRY_MAX`], with full jitter.
const CONNECT_RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay before retrying a failed connect.
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(30);

/// One device: connects when told, receives and acks, checks seqs, reconnects when its
/// connection is lost, disconnects when told.
///
/// A device holds only its index, credential and session state; what all devices share
/// (URLs, TLS options, counters) is behind one `Arc`. Connecting, acking and closing run
/// in boxed futures, so the task itself is sized for waiting.
async fn simulate(
    index: u32,
    credential: Box<str>,
    first_delay: Duration,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let stats = &shared.stats;
    let mut state = DeviceState::default();
    let mut first = true;
    let mut backoff = crate::Backoff::new(CONNECT_RETRY_BASE, CONNECT_RETRY_MAX);
    loop {
        // Wait to be told to connect.
        let Ok(_) = phase
            .wait_for(|phase| matches!(phase, Phase::Online(_)))
            .await
        else {
            return;
        };
        if first {
            tokio::time::sleep(first_delay).await;
            first = false;
        }
        let connecting = Box::pin(async {
            let (url, options) = shared.target(index);
            Connection::connect_with(url, &credential, &state, &options).await
        });
        let mut connection = match connecting.await {
            Ok(connection) => connection,
            Err(error) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = index, %error, "connect failed");
                // Exponential with jitter, as the SDK's devices do: a fleet refused at
                // once (a node at its limit, a slow registry) must not come back at once
                // and again, which turns an overload into a collapse.
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        let every = shared.settings.keep_tokens_every;
        if every > 0 && index.is_multiple_of(every) && state.device_token.is_empty() {
            shared
                .tokens
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(connection.welcome().device_token.clone());
        }
        state.welcomed(connection.welcome());
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let told_to_leave = loop {
            // The select only decides; acting on it (an ack) happens after, so the push it
            // read is not kept in the task while the ack is written.
            let step = tokio::select! {
                push = connection.next_push() => match push {
                    Ok(push) if push.stream.is_empty() => {
                        stats.record(push.seq, &mut state.last_seq, &push.payload);
                        Step::Ack(push.seq, to_open(&shared, stats, push.message_id))
                    }
                    Ok(push) => {
                        stats.record(push.offset, &mut state.all_offset, &push.payload);
                        Step::AckStream(push.offset, to_open(&shared, stats, push.message_id))
                    }
                    Err(error) => {
                        tracing::debug!(device = index, %error, "connection lost");
                        Step::Lost
                    }
                },
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Offline {
                        Step::Leave
                    } else {
                        Step::Stay
                    }
                }
            };
            let opened = match &step {
                Step::Ack(_, opened) | Step::AckStream(_, opened) => opened.clone(),
                _ => None,
            };
            match step {
                Step::Ack(seq, _) => {
                    if Box::pin(connection.ack(seq)).await.is_err() {
                        break false;
                    }
                }
                Step::AckStream(offset, _) => {
                    if Box::pin(connection.ack_stream(crate::ALL, offset))
                        .await
                        .is_err()
                    {
                        break false;
                    }
                }
                Step::Lost => break false,
                Step::Leave => break true,
                Step::Stay => {}
            }
            if let Some(id) = opened {
                if Box::pin(connection.opened(&id)).await.is_err() {
                    break false;
                }
                stats.opened.fetch_add(1, Ordering::Relaxed);
            }
        };
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        if told_to_leave {
            Box::pin(connection.close()).await;
        } else {
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 400)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_checked_for_gaps_and_duplicates() {
        let stats = Stats::default();
        let mut last = 0;
        for seq in [1, 2, 2, 4, 5] {
            stats.record(seq, &mut last, b"{}");
        }
        let report = stats.report(1);
        assert_eq!((report.received, report.duplicates, report.gaps), (4, 1, 1));
        assert_eq!(report.seq_sum, 5);
    }

    #[test]
    fn a_stamped_payload_gives_a_latency_sample() {
        let stats = Stats::default();
        let mut last = 0;
        let sent = unix_micros() - 1500;
        stats.record(1, &mut last, format!(r#"{{"t":{sent},"x":1}}"#).as_bytes());
        let report = stats.report(1);
        assert_eq!(report.latencies_us.len(), 1);
        assert!(report.latencies_us[0] >= 1500);
    }

    #[test]
    fn device_lines_parse() {
        let devices = read_devices("a\tcred-a\nb\tcred-b\n").expect("valid");
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].uid, "b");
        assert!(read_devices("no tab").is_err());
    }
}
