//! The loopback floor: how fast one thread that does nothing else writes a 64-byte message
//! to each of N loopback sockets, received by another process (`pigeon-load floor-readers`,
//! one task per socket, as a simulator holds its devices). It is what the kernel allows a
//! broadcast on this machine, measured in the same run as Pigeon's broadcast so that the
//! ratio of the two holds on a noisy machine.
//!
//! Past one process's open files, `pigeon-load floor` spreads the sockets over several
//! writer processes (`pigeon-load floor-writer`, each with its readers' process), as a
//! cluster spreads devices over nodes and simulators: every writer connects and gets ready,
//! then all start at once, and the floor is the sockets over the span from the first write
//! to the last message read.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use pigeon_client::swarm::unix_micros;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpSocket;
use tokio::process::{Child, ChildStdout, Command};

/// The message each socket gets.
pub const MESSAGE: [u8; 64] = [b'x'; 64];

/// One measurement: deliveries per second of one thread writing [`MESSAGE`] to each of
/// `sockets` sockets, from its first write to the last message read.
pub async fn measure(sockets: usize) -> anyhow::Result<f64> {
    let span = Prepared::new(sockets, 0).await?.write().await?;
    Ok(span.rate(sockets))
}

/// From the first write to the last message read, in unix µs.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    start: u64,
    last: u64,
}

impl Span {
    fn rate(self, sockets: usize) -> f64 {
        let seconds = self.last.saturating_sub(self.start) as f64 / 1e6;
        sockets as f64 / seconds.max(1e-6)
    }
}

/// A writer's sockets, connected and read by a readers' process that is ready.
struct Prepared {
    accepted: Vec<StdStream>,
    readers: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Prepared {
    /// `index` picks the loopback addresses of this writer and its readers, so that a
    /// million sockets do not exhaust one address's source ports.
    async fn new(sockets: usize, index: usize) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(address(1, index), 0))?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let exe = std::env::current_exe()?;
        let mut readers = Command::new(exe)
            .args(["floor-readers", "--addr", &addr.to_string()])
            .args(["--sockets", &sockets.to_string()])
            .args(["--index", &index.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the floor's readers")?;
        let stdout = readers.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut accepted = Vec::with_capacity(sockets);
        let accepting = async {
            while accepted.len() < sockets {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                accepted.push(stream);
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(300), accepting)
            .await
            .context("the floor's readers did not connect in time")??;
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the floor's readers did not get ready")??;
        anyhow::ensure!(ready.as_deref() == Some("ready"), "readers said {ready:?}");
        Ok(Self {
            accepted,
            readers,
            lines,
        })
    }

    /// Writes the message to every socket from one thread; answers once all are read.
    async fn write(self) -> anyhow::Result<Span> {
        let Self {
            mut accepted,
            mut readers,
            mut lines,
        } = self;
        let writer = std::thread::spawn(move || {
            let start = unix_micros();
            for stream in &mut accepted {
                stream.write_all(&MESSAGE)?;
            }
            std::io::Result::Ok((start, accepted))
        });
        let done = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("the floor's readers did not finish")??
            .context("the floor's readers exited")?;
        let (start, accepted) = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        drop(accepted);
        let _ = readers.wait().await;
        let last = done
            .strip_prefix("done ")
            .and_then(|last| last.trim().parse().ok())
            .context("the readers' answer")?;
        Ok(Span { start, last })
    }
}

/// `pigeon-load floor`: the floor for `sockets` sockets, `per_process` to a writer process.
/// Answers deliveries per second and the number of writer processes.
pub async fn measure_spread(sockets: usize, per_process: usize) -> anyhow::Result<(f64, usize)> {
    let processes = sockets.div_ceil(per_process.max(1)).max(1);
    let exe = std::env::current_exe()?;
    let mut writers = Vec::with_capacity(processes);
    for index in 0..processes {
        let share = sockets / processes + usize::from(index < sockets % processes);
        let mut writer = Command::new(&exe)
            .args(["floor-writer", "--sockets", &share.to_string()])
            .args(["--index", &index.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a floor writer")?;
        let stdin = writer.stdin.take().context("no stdin")?;
        let stdout = writer.stdout.take().context("no stdout")?;
        writers.push((writer, stdin, BufReader::new(stdout).lines()));
    }
    for (_, _, lines) in &mut writers {
        let ready = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("a floor writer did not get ready")??;
        anyhow::ensure!(ready.as_deref() == Some("ready"), "a writer said {ready:?}");
    }
    for (_, stdin, _) in &mut writers {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let (mut start, mut last) = (u64::MAX, 0);
    for (mut writer, _, mut lines) in writers {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("a floor writer did not finish")??
            .context("a floor writer exited")?;
        let mut fields = line
            .strip_prefix("span ")
            .context("a writer's answer")?
            .split(' ');
        let mut field =
            || -> anyhow::Result<u64> { Ok(fields.next().context("a writer's answer")?.parse()?) };
        start = start.min(field()?);
        last = last.max(field()?);
        let _ = writer.wait().await;
    }
    Ok((Span { start, last }.rate(sockets), processes))
}

/// One writer of `pigeon-load floor` (`pigeon-load floor-writer`): gets its sockets ready,
/// says `ready`, writes on `go` (a line on stdin), and says `span <start> <last>`.
pub async fn writer(sockets: usize, index: usize) -> anyhow::Result<()> {
    let prepared = Prepared::new(sockets, index).await?;
    println!("ready");
    let mut go = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut go)
        .await?;
    anyhow::ensure!(go.trim() == "go", "expected go, got {go:?}");
    let span = prepared.write().await?;
    println!("span {} {}", span.start, span.last);
    Ok(())
}

/// The loopback address `127.<kind>.x.y` of writer `index` (kind 1) or of its readers
/// (kinds 2 and 3).
fn address(kind: u8, index: usize) -> IpAddr {
    let [_, _, x, y] = ((index / 250) as u32 * 256 + (index % 250) as u32 + 2).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, kind, x, y))
}

/// The readers' side (`pigeon-load floor-readers`): connects `sockets` sockets to `addr`,
/// says `ready`, reads one message on each, and says `done <unix µs of the last one>`.
pub async fn readers(addr: SocketAddr, sockets: usize, index: usize) -> anyhow::Result<()> {
    let mut streams = Vec::with_capacity(sockets);
    // Two source addresses: connect() prefers even source ports, ~14,000 of them per
    // address, and searches slowly once they are gone.
    for socket_index in 0..sockets {
        let socket = TcpSocket::new_v4()?;
        pigeon_client::defer_port_choice(&socket);
        let kind = 2 + (socket_index % 2) as u8;
        socket.bind(SocketAddr::new(address(kind, index), 0))?;
        streams.push(socket.connect(addr).await?);
    }
    let last = Arc::new(AtomicU64::new(0));
    let left = Arc::new(AtomicUsize::new(sockets));
    let all_read = Arc::new(tokio::sync::Notify::new());
    for mut stream in streams {
        let (last, left, all_read) = (last.clone(), left.clone(), all_read.clone());
        tokio::spawn(async move {
            let mut message = [0u8; MESSAGE.len()];
            if stream.read_exact(&mut message).await.is_ok() {
                last.fetch_max(unix_micros(), Ordering::AcqRel);
            }
            if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                all_read.notify_one();
            }
        });
    }
    println!("ready");
    all_read.notified().await;
    println!("done {}", last.load(Ordering::Acquire));
    Ok(())
}
