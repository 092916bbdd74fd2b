//! Every TCP port of a process, bounded: the listen backlog, a cap on open connections, and
//! deadlines for peers that connect and then say nothing or dribble.
//!
//! - [`bind`]: a listener with the configured backlog (by default the kernel's maximum,
//!   `net.core.somaxconn`), so a burst of connects waits in the kernel instead of
//!   overflowing it.
//! - [`BoundedListener`]: accepts while a connection permit is free; past the cap a new
//!   connection is closed at once (it never holds a task or a buffer). Each accepted
//!   connection is a [`GuardedStream`]: it fails a read that waits longer than the idle
//!   timeout, so a peer that sends nothing (not even the HTTP/2 preface) or goes quiet is
//!   closed.
//! - [`serve_http`]: the HTTP API over such a listener: HTTP/1.1 only, the request head
//!   within `limits.http_header_timeout`, and a graceful close at shutdown. (The push route
//!   reads its body within `limits.http_body_timeout`.)
//!
//! The device port has its own limits (`websocket`, `quic`): its connections are many and
//! long-lived, and are admitted by the session's handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::log_throttle::Throttle;

/// The backlog a listener gets when the config asks for the kernel's maximum and the kernel
/// does not say what that is.
const FALLBACK_BACKLOG: u32 = 4096;

/// The kernel's largest listen backlog (`net.core.somaxconn`).
pub fn kernel_max_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(FALLBACK_BACKLOG)
}

/// Binds a TCP listener on `addr` with a listen backlog of `backlog` connections (0: the
/// kernel's maximum). Returns it with the address it is bound to.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<(TcpListener, SocketAddr)> {
    let backlog = if backlog == 0 {
        kernel_max_backlog()
    } else {
        backlog
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(backlog)?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, backlog, "listening");
    Ok((listener, bound))
}

/// A listener that holds at most a fixed number of connections, each with an idle deadline.
pub struct BoundedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl BoundedListener {
    /// Accepts on `listener`, holding at most `max_connections` at once; a connection whose
    /// peer sends nothing for `idle_timeout` while it is being read is closed.
    pub fn new(listener: TcpListener, max_connections: usize, idle_timeout: Duration) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
        }
    }

    /// The next connection within the cap. Connections past the cap are closed as they
    /// arrive; accept errors (out of file descriptors, say) are logged and waited out.
    pub async fn accept(&self) -> GuardedStream {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(
                        suppressed,
                        "at the connection limit; closing a new connection"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mut io = TimeoutStream::new(stream);
            io.set_read_timeout(Some(self.idle_timeout));
            return GuardedStream {
                io: Box::pin(io),
                _permit: permit,
            };
        }
    }
}

/// An accepted connection: it holds its place within the listener's cap until dropped, and a
/// read that waits longer than the idle timeout fails (`TimedOut`).
pub struct GuardedStream {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for GuardedStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The connections of `listener`, as a stream for a gRPC server.
pub fn incoming(
    listener: BoundedListener,
) -> impl futures_util::Stream<Item = io::Result<GuardedStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let stream = listener.accept().await;
        Some((Ok(stream), listener))
    })
}

/// Serves `router` on `listener` until `shutdown` is cancelled, on tasks of `tracker`:
/// HTTP/1.1 only (gRPC has its own port; a client speaking HTTP/2 is refused), the request
/// head within `limits.http_header_timeout`. At shutdown, connections finish their request
/// in progress and close.
pub fn serve_http(
    listener: BoundedListener,
    router: Router,
    limits: &Limits,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        .keep_alive(true);
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                stream = listener.accept() => stream,
                () = shutdown.cancelled() => break,
            };
            let service = TowerToHyperService::new(router.clone());
            let builder = builder.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = served {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
            });
        }
    });
}
