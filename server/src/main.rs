//! `pigeon`: Pigeon's server binary.
//!
//! - `pigeon standalone`: a complete push server in one process.
//! - `pigeon node`, `pigeon gateway`: the two kinds of process of cluster mode.
//! - `pigeon token`: mint a device credential, as an app backend would.
//! - `pigeon cert --dev`: write a development certificate for wss and QUIC.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pigeon_server::config::{Settings, parse_duration};
use pigeon_server::process::{Running, StartError};
use pigeon_server::{cluster, message, standalone};

/// jemalloc, not the C library's allocator: a burst of pushes allocates and frees small
/// buffers on every thread, and glibc's allocator had a sixth of the process's samples; with
/// jemalloc the same burst ends in about 0.75x the time, and an idle connection costs the
/// same memory (BENCHMARKS.md, section 6, "The allocator").
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Pigeon, a self-hosted long-connection push server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a complete push server in this process, with an embedded on-disk store.
    Standalone {
        /// TOML config file (see deploy/pigeon.toml); PIGEON_* variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a connection node of cluster mode: device listeners and the internal gRPC API,
    /// with Redis as registry and store (see docs/cluster.md).
    Node {
        /// TOML config file (see deploy/pigeon.toml); PIGEON_* variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a gateway of cluster mode: the push API over HTTP and gRPC, fanning out to nodes.
    Gateway {
        /// TOML config file (see deploy/pigeon.toml); PIGEON_* variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a certificate for trying wss and QUIC locally: a development CA (ca.pem, for
    /// clients to trust) and a server certificate for localhost, 127.0.0.1 and ::1
    /// (cert.pem, key.pem).
    Cert {
        /// Required: these certificates are for development only.
        #[arg(long, required = true)]
        dev: bool,
        /// Directory to write into.
        #[arg(long, default_value = "pigeon-certs")]
        out: PathBuf,
    },
    /// Print a device credential (a JWT signed with the app's secret) for a uid.
    Token {
        /// App id.
        #[arg(long)]
        app: String,
        /// User id.
        #[arg(long)]
        uid: String,
        /// Lifetime, e.g. "15m" or "2h" (default: limits.credential_ttl).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// The same config file the server uses.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone { config } => serve(config, "standalone", |settings| {
            run(standalone::start(settings))
        }),
        Command::Node { config } => serve(config, "node", |settings| {
            run(cluster::node::start(settings))
        }),
        Command::Gateway { config } => serve(config, "gateway", |settings| {
            run(cluster::gateway::start(settings))
        }),
        Command::Cert { dev: _, out } => match pigeon_server::tls::write_dev_certificate(&out) {
            Ok(files) => {
                println!(
                    "wrote {}, {} and {}",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                );
                println!(
                    "serve with:   PIGEON_TLS__CERT={} PIGEON_TLS__KEY={} PIGEON_LISTEN__QUIC=127.0.0.1:7701",
                    files.cert.display(),
                    files.key.display()
                );
                println!(
                    "trust with:   pigeon-sim connect --ca {} ...",
                    files.ca.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("pigeon: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Token {
            app,
            uid,
            ttl,
            config,
        } => {
            let settings = match load(config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            let apps = match standalone::apps_or_demo(&settings) {
                Ok(apps) => apps,
                Err(error) => {
                    eprintln!("pigeon: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let Some(app_settings) = apps.iter().find(|candidate| candidate.id == app) else {
                eprintln!("pigeon: no app `{app}` in the config");
                return ExitCode::FAILURE;
            };
            let ttl = ttl.unwrap_or(settings.limits.credential_ttl);
            let longest = settings.limits.max_credential_lifetime;
            if ttl > longest {
                eprintln!(
                    "pigeon: --ttl {}s is longer than limits.max_credential_lifetime ({}s): nodes would refuse the credential",
                    ttl.as_secs(),
                    longest.as_secs()
                );
                return ExitCode::from(2);
            }
            let now = message::unix_millis() / 1000;
            let credential = pigeon_proto::credential::mint(
                &app_settings.id,
                app_settings.signing_key(),
                &uid,
                now,
                ttl.as_secs(),
            );
            println!("{credential}");
            ExitCode::SUCCESS
        }
    }
}

/// Loads the settings, starts logging and a runtime, and runs `server` on it.
fn serve<F: std::future::Future<Output = ExitCode>>(
    config: Option<PathBuf>,
    role: &str,
    server: impl FnOnce(Settings) -> F,
) -> ExitCode {
    let settings = match load(config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    // Kept to the end: dropped after the runtime, it flushes the last spans.
    let _telemetry = pigeon_server::telemetry::init(&settings.log, &settings.tracing, role);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pigeon: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(server(settings))
}

fn load(config: Option<PathBuf>) -> Result<Settings, ExitCode> {
    Settings::from_process(config.as_deref()).map_err(|error| {
        eprintln!("pigeon: bad configuration: {error}");
        ExitCode::from(2)
    })
}

/// Runs a process of any role: starts it, prints its banner, serves until SIGTERM or
/// SIGINT, then drains.
async fn run<R: Running>(start: impl Future<Output = Result<R, StartError>>) -> ExitCode {
    let running = match start.await {
        Ok(running) => running,
        Err(error) => {
            eprintln!("pigeon: {error}");
            return ExitCode::FAILURE;
        }
    };
    announce(&running.banner());
    tracing::info!("ready");
    wait_for_signal().await;
    if running.shutdown().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints the startup banner in one write. A server outlives whoever reads
/// its stdout: if that reader has gone (a closed pipe), the banner is lost
/// and the server keeps serving; `println!` would panic instead.
fn announce(banner: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush());
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals; stopping");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
