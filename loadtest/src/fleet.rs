//! The simulated devices: several `pigeon-sim swarm` processes (a process holds at most
//! ~19,900 sockets), each with its share of the devices, its own source address
//! (127.0.0.2, 127.0.0.3, ...) so that ports never run short, driven over stdin and heard
//! over stdout.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use pigeon_client::swarm::{Progress, Report};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::deploy::Deployment;

/// One simulator process.
struct Swarm {
    child: Child,
    stdin: ChildStdin,
    progress: Arc<Mutex<Progress>>,
    reports: mpsc::Receiver<Report>,
    tokens: mpsc::Receiver<Vec<String>>,
}

/// Reads the simulators' latest progress lines.
#[derive(Clone)]
pub struct ProgressReader(Vec<Arc<Mutex<Progress>>>);

impl ProgressReader {
    /// The latest progress of all simulators, summed.
    pub fn read(&self) -> Progress {
        let mut total = Progress::default();
        for progress in &self.0 {
            let progress = progress.lock().unwrap_or_else(|p| p.into_inner());
            total.connected += progress.connected;
            total.received += progress.received;
            total.seq_sum += progress.seq_sum;
        }
        total
    }
}

/// Every simulator process of a run.
pub struct Fleet {
    swarms: Vec<Swarm>,
}

/// The uid of device `index`.
pub fn uid(index: usize) -> String {
    format!("u{index}")
}

/// Source addresses per simulator.
const SOURCES: usize = 4;

/// How the simulated devices behave.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// First-time connects per second, per simulator.
    pub connect_rate: u32,
    /// Keep the token of every this-many-th device (0: none).
    pub keep_tokens_every: u32,
    /// Report every this-many-th push a simulator receives as opened (0: none).
    pub open_every: u32,
}

impl Fleet {
    /// Writes each simulator's devices (uid and a fresh credential for `deployment`'s app)
    /// to `work_dir` and starts the simulators against its nodes; the devices wait for
    /// [`Fleet::connect`].
    pub async fn start(
        bin_dir: &Path,
        work_dir: &Path,
        deployment: &Deployment,
        devices: usize,
        simulators: usize,
        behaviour: &Behaviour,
    ) -> anyhow::Result<Self> {
        let Behaviour {
            connect_rate,
            keep_tokens_every,
            open_every,
        } = *behaviour;
        let (app, urls, ca) = (
            &deployment.app,
            &deployment.ws_urls,
            deployment.ca.as_deref(),
        );
        let sim = bin_dir.join("pigeon-sim");
        anyhow::ensure!(
            sim.exists(),
            "{} not found: build it (cargo build --release --bins) or pass --bin-dir",
            sim.display()
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        // Each simulator connects from its own loopback addresses, SOURCES of them, so that
        // no address runs out of source ports. The kernel picks a connection's source port
        // at connect() (the simulator binds with IP_BIND_ADDRESS_NO_PORT), preferring even
        // ports: ~14,000 of them in the default range. Once an address has used them all,
        // every connect() searches the rest one 4-tuple lookup at a time: with one address
        // per simulator, connects stalled at 945,600 (67 x 14,116) with 78% of the CPU in
        // __inet_check_established (perf). Binding without that option reserved each port
        // for every destination instead: 84% of the CPU in the bind search, at 896,000.
        let mut swarms = Vec::new();
        for index in 0..simulators {
            let mut text = String::new();
            // Device i belongs to simulator i % simulators, and connects to node i % nodes.
            for device in (index..devices).step_by(simulators) {
                let uid = uid(device);
                let key = pigeon_proto::credential::Key {
                    secret: app.secret.as_bytes(),
                    kid: None,
                };
                let credential = pigeon_proto::credential::mint(&app.id, key, &uid, now, 24 * 3600);
                text.push_str(&format!("{uid}\t{credential}\n"));
            }
            let file = work_dir.join(format!("devices-{index}.tsv"));
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
            // Each simulator's devices connect to the nodes in the same rotation as the
            // device indices, starting from its own offset.
            let rotated: Vec<String> = (0..urls.len())
                .map(|k| urls[(index + k * simulators) % urls.len()].clone())
                .collect();
            let mut command = Command::new(&sim);
            command
                .arg("swarm")
                .arg("--devices")
                .arg(&file)
                .args(["--connect-rate", &connect_rate.to_string()])
                .args(["--keep-tokens-every", &keep_tokens_every.to_string()])
                .args(["--open-every", &open_every.to_string()])
                .env("PIGEON_LOG", "warn")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            for url in &rotated {
                command.args(["--url", url]);
            }
            if let Some(ca) = ca {
                command.arg("--ca").arg(ca);
            }
            for source in 0..SOURCES {
                command.args(["--bind", &format!("127.0.{source}.{}", 2 + index % 250)]);
            }
            let mut child = command.spawn().context("starting pigeon-sim swarm")?;
            let stdin = child.stdin.take().context("no stdin")?;
            let stdout = child.stdout.take().context("no stdout")?;
            let progress = Arc::new(Mutex::new(Progress::default()));
            let (report_tx, reports) = mpsc::channel(4);
            let (tokens_tx, tokens) = mpsc::channel(1);
            let shared = progress.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    match value["type"].as_str() {
                        Some("progress") => {
                            if let Ok(progress) = serde_json::from_value(value) {
                                *shared.lock().unwrap_or_else(|p| p.into_inner()) = progress;
                            }
                        }
                        Some("report") => {
                            if let Ok(report) = serde_json::from_value(value)
                                && report_tx.send(report).await.is_err()
                            {
                                break;
                            }
                        }
                        Some("tokens") => {
                            if let Ok(list) = serde_json::from_value(value["tokens"].take())
                                && tokens_tx.send(list).await.is_err()
                            {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            });
            swarms.push(Swarm {
                child,
                stdin,
                progress,
                reports,
                tokens,
            });
        }
        Ok(Self { swarms })
    }

    async fn command(&mut self, command: &str) -> anyhow::Result<()> {
        for swarm in &mut self.swarms {
            swarm
                .stdin
                .write_all(format!("{command}\n").as_bytes())
                .await
                .context("a simulator stopped listening")?;
            swarm.stdin.flush().await?;
        }
        Ok(())
    }

    /// Tells every device to connect (or reconnect).
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        self.command("connect").await
    }

    /// Tells every device to disconnect.
    pub async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.command("disconnect").await
    }

    /// The latest progress of all simulators, summed.
    pub fn progress(&self) -> Progress {
        self.progress_reader().read()
    }

    /// A reader of the simulators' progress that outlives borrows of the fleet.
    pub fn progress_reader(&self) -> ProgressReader {
        ProgressReader(
            self.swarms
                .iter()
                .map(|swarm| swarm.progress.clone())
                .collect(),
        )
    }

    /// A fresh report from every simulator.
    pub async fn reports(&mut self) -> anyhow::Result<Vec<Report>> {
        self.command("report").await?;
        let mut reports = Vec::new();
        for swarm in &mut self.swarms {
            let report = tokio::time::timeout(Duration::from_secs(30), swarm.reports.recv())
                .await
                .context("a simulator did not report in time")?
                .context("a simulator exited")?;
            reports.push(report);
        }
        Ok(reports)
    }

    /// The device tokens the simulators kept (`keep_tokens_every`).
    pub async fn tokens(&mut self) -> anyhow::Result<Vec<String>> {
        self.command("tokens").await?;
        let mut tokens = Vec::new();
        for swarm in &mut self.swarms {
            let kept = tokio::time::timeout(Duration::from_secs(30), swarm.tokens.recv())
                .await
                .context("a simulator did not list its tokens in time")?
                .context("a simulator exited")?;
            tokens.extend(kept);
        }
        Ok(tokens)
    }

    /// Pids of the simulators.
    pub fn pids(&self) -> Vec<u32> {
        self.swarms
            .iter()
            .filter_map(|swarm| swarm.child.id())
            .collect()
    }

    /// Waits until `done` holds for the summed progress, or `timeout` passes; whether it
    /// held.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.progress()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the simulators.
    pub async fn stop(mut self) {
        let _ = self.command("quit").await;
        for swarm in &mut self.swarms {
            if tokio::time::timeout(Duration::from_secs(5), swarm.child.wait())
                .await
                .is_err()
            {
                let _ = swarm.child.kill().await;
            }
        }
    }
}
