//! The parking lot: idle plain WebSocket connections without a task.
//!
//! A node holds far more idle connections than busy ones, and a task per connection costs
//! about 1 KiB (tokio's task cell) plus 256 bytes (the socket's registration with tokio's
//! reactor), whatever the connection is doing. A connection with nothing to do for
//! `limits.park_after` therefore leaves its task: its socket goes back to a plain file
//! descriptor, watched by the lot's own epoll instance, and its session state (the framer's
//! empty buffers, the session, the table entry) waits in the lot's slab. Three things bring
//! it back into a new task, which carries on exactly where the old one stopped:
//! - the socket is readable (a frame, or the device hung up): the epoll instance says so;
//! - the node has something for it (a push, a close request): its waker is the lot's;
//! - its session's next deadline (heartbeat, idle timeout): the lot keeps a timer per
//!   parked connection, in one ordered set, and one task waits for the earliest.
//!
//! One task per node watches the epoll instance (itself registered with tokio) and the
//! timers. A parked connection holds a token of the node's task tracker, so a drain waits
//! for it like for any connection's task.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use pigeon_proto::websocket::{Framer, Sender};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{Accepted, WebSocketTransport};
use crate::connections::ConnectionTable;
use crate::device::{self, Live};

/// Readiness events taken from the epoll instance per call.
const EVENTS_PER_WAIT: usize = 256;

/// The parked connections of one node's WebSocket listener.
pub(crate) struct Lot {
    epoll: AsyncFd<EpollFd>,
    state: Mutex<State>,
    /// A timer earlier than the one the lot's task waits for was added.
    timer_added: Notify,
    park_after: Duration,
    /// Cleared when the lot's task stops: from then on connections keep their tasks.
    watching: AtomicBool,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
    /// The connection table (which counts parked connections) and its shutdown.
    connections: Arc<ConnectionTable>,
}

#[derive(Default)]
struct State {
    /// Boxed: a slab grows by doubling, and a few hundred thousand inline entries would
    /// leave the copies of its earlier sizes behind in the heap.
    /// `None`: reserved by a connection being parked, not yet findable.
    parked: Slab<Option<Box<Parked>>>,
    /// Each parked connection's wake-up time, with its key.
    timers: BTreeSet<(Instant, u64)>,
    /// Bumped at each park, so a stale key (a waker or readiness event of a connection
    /// that already left, whose slot was reused) matches nothing.
    generation: u32,
}

/// A connection without a task.
struct Parked {
    stream: std::net::TcpStream,
    /// `None` when it held nothing (most often): a new one is the same.
    framer: Option<Box<Framer>>,
    live: Live,
    accepted: Box<Accepted>,
    wake_at: Instant,
    generation: u32,
    /// Counts as a task of the node, so a drain waits for this connection.
    _task: TaskTrackerToken,
}

/// The epoll instance, as tokio's reactor needs it: a file descriptor.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// Slot and generation of a parked connection, in one epoll event's data.
fn key(slot: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | slot as u64
}

fn split(key: u64) -> (usize, u32) {
    ((key & u64::from(u32::MAX)) as usize, (key >> 32) as u32)
}

/// The waker a parked connection's node entry holds: a push or close request brings the
/// connection back.
struct Unpark {
    lot: Weak<Lot>,
    key: u64,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        if let Some(lot) = self.lot.upgrade() {
            lot.unpark(self.key);
        }
    }
}

impl Lot {
    /// A lot for connections idle `park_after`, and its task on `tracker`, which ends
    /// when the node shuts down (every parked connection is brought back first).
    pub(crate) fn start(
        park_after: Duration,
        tracker: &TaskTracker,
        connections: Arc<ConnectionTable>,
    ) -> io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // `AsyncFd::new` is deprecated because an `AsRawFd` may hand out a descriptor it does
        // not own, or a different one each time; `EpollFd` owns its descriptor and always
        // returns that one, which is all `AsyncFd::register` asks (and it is `unsafe`, which
        // this crate forbids).
        #[allow(deprecated)]
        let epoll = AsyncFd::new(EpollFd(epoll))?;
        let lot = Arc::new(Self {
            epoll,
            state: Mutex::new(State::default()),
            timer_added: Notify::new(),
            park_after,
            watching: AtomicBool::new(true),
            tracker: tracker.clone(),
            runtime: tokio::runtime::Handle::current(),
            connections,
        });
        tracker.spawn(lot.clone().watch());
        Ok(lot)
    }

    /// How long a connection may be idle before it is parked; `None` when the lot takes no
    /// more (the node is draining, or the lot's task stopped).
    pub(crate) fn park_after(&self) -> Option<Duration> {
        let open =
            self.watching.load(Ordering::Acquire) && !self.connections.shutdown().is_cancelled();
        open.then_some(self.park_after)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere while holding it; the slab and the timer
        // set are each changed in single calls, so they are still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes an idle connection off its task (which ends after this).
    pub(crate) fn park(
        self: &Arc<Self>,
        transport: WebSocketTransport<TcpStream>,
        live: Live,
        accepted: Box<Accepted>,
    ) {
        let WebSocketTransport { io, framer } = transport;
        let stream = match io.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                // The socket is gone with the failed deregistration: so is the device.
                tracing::debug!(%error, "parking a connection lost its socket");
                self.tracker.spawn_on(
                    async move { device::forget(&accepted.context, &live).await },
                    &self.runtime,
                );
                return;
            }
        };
        let connection = live.connection().clone();
        let wake_at = live.wake_at();
        // The slot is reserved first, so the connection's wake-up can be handed to the lot
        // before anything can find the connection and resume it: a task resumed earlier
        // would register its own waker, and this one would then replace it.
        let (slot, generation) = {
            let mut state = self.state();
            state.generation = state.generation.wrapping_add(1);
            (state.parked.insert(None), state.generation)
        };
        let key = key(slot, generation);
        connection.hand_wake_to(&Waker::from(Arc::new(Unpark {
            lot: Arc::downgrade(self),
            key,
        })));
        let parked = Box::new(Parked {
            framer: (!framer.is_pristine()).then(|| Box::new(framer)),
            live,
            accepted,
            wake_at,
            generation,
            _task: self.tracker.token(),
            stream,
        });
        let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        let mut state = self.state();
        if let Err(error) = self
            .epoll
            .get_ref()
            .0
            .add(&parked.stream, EpollEvent::new(interest, key))
        {
            // Nothing would tell the lot the device spoke: the connection stays in its task,
            // and does not try to park again.
            let _ = state.parked.try_remove(slot);
            drop(state);
            tracing::debug!(%error, "a connection could not be parked");
            self.resume(parked, false);
            return;
        }
        if let Some(reserved) = state.parked.get_mut(slot) {
            *reserved = Some(parked);
        }
        self.connections.count_parked(true);
        let earliest = state.timers.first().is_none_or(|&(at, _)| wake_at < at);
        state.timers.insert((wake_at, key));
        drop(state);
        if earliest {
            self.timer_added.notify_one();
        }
        // Something was delivered before the wake-up was handed over (its wake reached the
        // old task, or found the slot still reserved), or the lot stopped taking
        // connections (a drain's close request may have gone the same way).
        if connection.has_pending() || self.park_after().is_none() {
            self.unpark(key);
        }
    }

    /// Brings the parked connection `key` back into a task; nothing if it already left.
    fn unpark(self: &Arc<Self>, key: u64) {
        let (slot, generation) = split(key);
        let parked = {
            let mut state = self.state();
            // An empty slot is reserved by a connection still on its way in: its `park`
            // looks at what woke it once it is in.
            let Some(Some(parked)) = state.parked.get(slot) else {
                return;
            };
            if parked.generation != generation {
                return;
            }
            let Some(Some(parked)) = state.parked.try_remove(slot) else {
                return;
            };
            self.connections.count_parked(false);
            state.timers.remove(&(parked.wake_at, key));
            parked
        };
        // Before the socket is registered with tokio again. It is in the set unless it was
        // never added (a failed park), and a failed delete leaves at worst a stale key.
        let _ = self.epoll.get_ref().0.delete(&parked.stream);
        self.resume(parked, true);
    }

    /// Runs the connection in a new task; it may park again if `may_park`.
    fn resume(self: &Arc<Self>, parked: Box<Parked>, may_park: bool) {
        let lot = self.clone();
        self.tracker.spawn_on(
            async move {
                let Parked {
                    stream,
                    framer,
                    live,
                    accepted,
                    ..
                } = *parked;
                match TcpStream::from_std(stream) {
                    Ok(io) => {
                        let framer = framer.map_or_else(
                            || Framer::new(Sender::Client, accepted.max_frame, Vec::new()),
                            |framer| *framer,
                        );
                        let transport = WebSocketTransport { io, framer };
                        let park_after = lot.park_after().filter(|_| may_park);
                        let served =
                            super::serve_parkable(transport, live, accepted, lot, park_after);
                        Box::pin(served).await;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "a parked connection's socket could not be restored");
                        device::forget(&accepted.context, &live).await;
                    }
                }
            },
            &self.runtime,
        );
    }

    /// The lot's task: brings back connections whose socket is readable or whose timer
    /// is due, until the node shuts down.
    async fn watch(self: Arc<Self>) {
        let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
        loop {
            let next = self.state().timers.first().map(|&(at, _)| at);
            let timer = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.epoll.readable() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(error) => {
                            tracing::error!(%error, "the parking lot cannot wait; parking stops");
                            break;
                        }
                    };
                    // Until the epoll instance has nothing more (which clears tokio's
                    // readiness, so the next wait is a real one).
                    loop {
                        let taken = guard.try_io(|epoll| {
                            match epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                                Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
                                Ok(taken) => Ok(taken),
                                Err(errno) => Err(errno.into()),
                            }
                        });
                        match taken {
                            Ok(Ok(taken)) => {
                                for event in &events[..taken] {
                                    self.unpark(event.data());
                                }
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "reading the parking lot's readiness failed");
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
                () = timer => {
                    let now = Instant::now();
                    let due: Vec<u64> = self
                        .state()
                        .timers
                        .range(..=(now, u64::MAX))
                        .map(|&(_, key)| key)
                        .collect();
                    for key in due {
                        self.unpark(key);
                    }
                }
                () = self.timer_added.notified() => {}
                () = self.connections.shutdown().cancelled() => break,
            }
        }
        self.watching.store(false, Ordering::Release);
        // Every parked connection goes back to a task: on shutdown, to be closed with 1001
        // (the node asks each); if the lot failed, to wait the usual way.
        let keys: Vec<u64> = self
            .state()
            .parked
            .iter()
            .filter_map(|(slot, parked)| Some(key(slot, parked.as_ref()?.generation)))
            .collect();
        for key in keys {
            self.unpark(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parked connection keeps in its box in the lot: the socket, the session, its
    /// table entry and token, the accept record's box and the timer's key (the framing
    /// only when it holds something). Beside it: the accept record, the table entry, the
    /// waker and the timer's place in the set; BENCHMARKS.md has the measured RSS. (The
    /// session's second lane, the app's stream `all`, took it from 184 to 248 bytes.)
    #[test]
    fn a_parked_connection_stays_small() {
        let size = size_of::<Parked>();
        assert!(size <= 256, "a parked connection is {size} bytes");
    }
}
