//! `pigeon-sim`: acts as a Pigeon device from the command line.
//!
//! `pigeon-sim connect --url ws://127.0.0.1:7700/ --credential <jwt> --state alice.state`
//! prints every push as one JSON line on stdout (`{"seq":N,"message_id":"...","payload":...}`;
//! a push to every device of the app comes from the shared stream `all` and says so:
//! `{"seq":0,"stream":"all","offset":N,...}`) and acknowledges it. The state file keeps the
//! device token, the last processed seq and the place in the stream `all`, so a killed and
//! restarted simulator resumes the same device and gets what it missed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pigeon_client::{ConnectOptions, Device, DeviceState, swarm};
use serde_json::value::RawValue;

/// Pigeon's device simulator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect as one device and print what it receives.
    Connect {
        /// Device URL of a node: ws://127.0.0.1:7700/, wss://localhost:7700/ or
        /// quic://localhost:7701/.
        #[arg(long)]
        url: String,
        /// PEM file of the CA to trust for wss:// and quic:// (default: the system's roots).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Name to check the node's certificate against (default: the URL's host).
        #[arg(long)]
        server_name: Option<String>,
        /// Device credential (see `pigeon token`).
        #[arg(long)]
        credential: String,
        /// File keeping the device token and last processed seq across runs.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Exit after this many pushes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Simulate many devices in this process, driven by commands on stdin (for the
    /// load-test harness; see the `pigeon_client::swarm` docs).
    Swarm {
        /// File of devices, one `uid<TAB>credential` per line.
        #[arg(long)]
        devices: PathBuf,
        /// Node device URLs, used round robin.
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        /// Source addresses (e.g. 127.0.0.2), used round robin, to spread ports.
        #[arg(long = "bind")]
        binds: Vec<std::net::IpAddr>,
        /// First-time connects per second.
        #[arg(long, default_value_t = 5000)]
        connect_rate: u32,
        /// PEM file of the CA to trust for wss:// and quic://.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Keep the token of every this-many-th device, for the `tokens` command.
        #[arg(long, default_value_t = 0)]
        keep_tokens_every: u32,
        /// Report every this-many-th push received as opened by its user (0: none).
        #[arg(long, default_value_t = 0)]
        open_every: u32,
    },
}

#[derive(serde::Serialize)]
struct Line<'a> {
    seq: u64,
    /// The shared stream a push came from (`all`: every device of the app), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    /// Its offset in that stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    message_id: &'a str,
    payload: &'a RawValue,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One device is one thread's work; a swarm uses every core.
    let runtime = match &cli.command {
        Command::Connect { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Command::Swarm { .. } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("pigeon-sim: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIGEON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (url, ca, server_name, credential, state, count) = match cli.command {
        Command::Connect {
            url,
            ca,
            server_name,
            credential,
            state,
            count,
        } => (url, ca, server_name, credential, state, count),
        Command::Swarm {
            devices,
            urls,
            binds,
            connect_rate,
            ca,
            keep_tokens_every,
            open_every,
        } => {
            let settings = swarm::SwarmSettings {
                urls,
                binds,
                connect_rate,
                options: ConnectOptions {
                    ca_file: ca,
                    ..ConnectOptions::default()
                },
                keep_tokens_every,
                open_every,
            };
            return swarm(devices, settings).await;
        }
    };
    let options = ConnectOptions {
        ca_file: ca,
        server_name,
        bind: None,
    };
    match connect(url, options, credential, state, count).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pigeon-sim: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn swarm(devices: PathBuf, settings: swarm::SwarmSettings) -> ExitCode {
    let text = match std::fs::read_to_string(&devices) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("pigeon-sim: cannot read {}: {error}", devices.display());
            return ExitCode::FAILURE;
        }
    };
    let devices = match swarm::read_devices(&text) {
        Ok(devices) => devices,
        Err(error) => {
            eprintln!("pigeon-sim: {}: {error}", devices.display());
            return ExitCode::FAILURE;
        }
    };
    drop(text);
    match swarm::run(devices, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pigeon-sim: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(
    url: String,
    options: ConnectOptions,
    credential: String,
    state_path: Option<PathBuf>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let state = match &state_path {
        Some(path) => DeviceState::load(path)?,
        None => DeviceState::default(),
    };
    let mut device = Device::new(url, credential, state).with_options(options);
    let mut received = 0u64;
    let stdout = std::io::stdout();
    while count.is_none_or(|count| received < count) {
        let push = device.next().await?;
        let payload = std::str::from_utf8(&push.payload)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
        let fallback;
        let payload = match payload {
            Some(payload) => payload,
            None => {
                // Not JSON (it always is from the push API): print it as a JSON string.
                let text = String::from_utf8_lossy(&push.payload).into_owned();
                fallback = RawValue::from_string(serde_json::to_string(&text)?)?;
                &fallback
            }
        };
        let line = serde_json::to_string(&Line {
            seq: push.seq,
            stream: (!push.stream.is_empty()).then_some(push.stream.as_str()),
            offset: (!push.stream.is_empty()).then_some(push.offset),
            message_id: &push.message_id,
            payload,
        })?;
        {
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        // Processed: remember it before telling the node, so a crash in between means a
        // replay (and the duplicate is dropped by seq), never a loss.
        if let Some(path) = &state_path {
            let mut processed = device.state().clone();
            processed.processed(&push);
            processed.save(path)?;
        }
        device.processed(&push).await;
        received += 1;
    }
    Ok(())
}
