//! The loopback floor: how fast one thread that does nothing else writes a 64-byte message
//! to each of N loopback sockets, received by another process (`pigeon-load floor-readers`,
//! one task per socket, as a simulator holds its devices). It is what the kernel allows a
//! broadcast on this machine, measured in the same run as Pigeon's broadcast so that the
//! ratio of the two holds on a noisy machine.

use std::io::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use pigeon_client::swarm::unix_micros;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Command;

/// The message each socket gets.
pub const MESSAGE: [u8; 64] = [b'x'; 64];

/// One measurement: deliveries per second of one thread writing [`MESSAGE`] to each of
/// `sockets` sockets, from its first write to the last message read.
pub async fn measure(sockets: usize) -> anyhow::Result<f64> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut readers = Command::new(exe)
        .args(["floor-readers", "--addr", &addr.to_string()])
        .args(["--sockets", &sockets.to_string()])
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
    tokio::time::timeout(Duration::from_secs(120), accepting)
        .await
        .context("the floor's readers did not connect in time")??;
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the floor's readers did not get ready")??;
    anyhow::ensure!(ready.as_deref() == Some("ready"), "readers said {ready:?}");
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
    let last: u64 = done
        .strip_prefix("done ")
        .and_then(|last| last.trim().parse().ok())
        .context("the readers' answer")?;
    let seconds = last.saturating_sub(start) as f64 / 1e6;
    Ok(sockets as f64 / seconds.max(1e-6))
}

/// The readers' side (`pigeon-load floor-readers`): connects `sockets` sockets to `addr`,
/// says `ready`, reads one message on each, and says `done <unix µs of the last one>`.
pub async fn readers(addr: &str, sockets: usize) -> anyhow::Result<()> {
    let mut streams = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let stream = TcpStream::connect(addr).await?;
        streams.push(stream);
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
