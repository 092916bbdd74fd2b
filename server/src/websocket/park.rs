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
//! The commonest of these need no task: a push the session sends at once is written to the
//! socket right where it was delivered (a broadcast writes to every parked socket from the
//! thread that hands it out, as a lean writer would), and the device's ack, read when the
//! socket turns readable, is taken by the session in the lot. Only what needs the store, a
//! write that would block, or an ending brings the connection back into a task.
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
use pigeon_proto::Message as _;
use pigeon_proto::websocket::{Framer, Inbound, Sender};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{Accepted, WebSocketTransport};
use crate::connections::ConnectionTable;
use crate::device::{self, Ending, Live};

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
            lot.woken(self.key);
        }
    }
}

/// What a parked connection's wake-up or readiness came to, served in the lot.
enum InPlace {
    /// Done: it stays parked.
    Stay,
    /// It needs its task (the store, a write that would block, the device hanging up).
    Task,
    /// It ends.
    End(Ending),
}

/// What serving a parked connection in place left.
enum Served {
    /// It stays parked.
    Stayed,
    /// It left the lot, taken out in the step that served it (so that nothing else resumes
    /// it meanwhile without the ending): for a task, which ends it with the ending if any.
    Left(Box<Parked>, Option<Ending>),
}

/// The events a parked socket is watched for; one-shot, re-armed after each in-place read.
fn interest() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT
}

impl Parked {
    /// The framer, made anew if the connection held none.
    fn framer(&mut self) -> &mut Framer {
        let max_frame = self.accepted.max_frame;
        self.framer
            .get_or_insert_with(|| Box::new(Framer::new(Sender::Client, max_frame, Vec::new())))
    }

    /// Writes what the framer holds without blocking; whether it all went (anything left,
    /// or a failure, is for the task).
    fn write_now(&mut self) -> bool {
        let Some(framer) = self.framer.as_mut() else {
            return true;
        };
        let written = framer.write_now(&mut self.stream).is_ok() && !framer.has_output();
        if written && framer.is_pristine() {
            self.framer = None;
        }
        written
    }

    /// The connection table has something for it: pushes the session sends at once are
    /// written here.
    fn deliver(&mut self) -> InPlace {
        let frames = match self.live.take_inbox(&self.accepted.context) {
            Ok(frames) => frames,
            Err(ending) => return InPlace::End(ending),
        };
        if !frames.is_empty() {
            let framer = self.framer();
            for frame in &frames {
                framer.queue_message(frame.encoded_len(), |out| frame.encode_raw(out));
            }
        }
        if !self.write_now() || self.live.needs_store() {
            return InPlace::Task;
        }
        InPlace::Stay
    }

    /// The socket is readable: acks and pings are taken here; anything else (the device
    /// hanging up, a frame that needs the store) is for the task, with what was read.
    fn read(&mut self) -> InPlace {
        self.framer();
        let Some(framer) = self.framer.as_mut() else {
            return InPlace::Task;
        };
        match framer.read_now(&mut self.stream) {
            Ok(0) => return InPlace::Task,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return InPlace::Task,
        }
        loop {
            let parsed = self.framer().parse(super::decode);
            let frame = match parsed {
                Ok(Some(Inbound::Message(Ok(frame)))) => frame,
                Ok(Some(Inbound::Message(Err(error)))) => {
                    return InPlace::End(Ending::transport(error));
                }
                Ok(Some(Inbound::Handled)) => continue,
                // The task answers a Close (queued) and sees the device go; a frame that
                // cannot be parsed stays in the input for the task to refuse.
                Ok(Some(Inbound::Closed { .. })) | Err(_) => return InPlace::Task,
                Ok(None) => break,
            };
            match self.live.handle_frame_now(&self.accepted.context, frame) {
                Ok(Some(answer)) => self
                    .framer()
                    .queue_message(answer.encoded_len(), |out| answer.encode_raw(out)),
                Ok(None) => {}
                Err(ending) => return InPlace::End(ending),
            }
        }
        if !self.write_now() || self.live.needs_store() {
            return InPlace::Task;
        }
        InPlace::Stay
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
        connection.hand_wake_to(&self.waker(key));
        let parked = Box::new(Parked {
            framer: (!framer.is_pristine()).then(|| Box::new(framer)),
            live,
            accepted,
            wake_at,
            generation,
            _task: self.tracker.token(),
            stream,
        });
        let mut state = self.state();
        if let Err(error) = self
            .epoll
            .get_ref()
            .0
            .add(&parked.stream, EpollEvent::new(interest(), key))
        {
            // Nothing would tell the lot the device spoke: the connection stays in its task,
            // and does not try to park again.
            let _ = state.parked.try_remove(slot);
            drop(state);
            tracing::debug!(%error, "a connection could not be parked");
            self.resume(parked, false, None);
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

    /// The connection table woke the parked connection `key`: served here if it can be.
    fn woken(self: &Arc<Self>, key: u64) {
        let outcome = self.in_place(key, |parked| {
            let connection = parked.live.connection().clone();
            loop {
                connection.clear_pending();
                let outcome = parked.deliver();
                if !matches!(outcome, InPlace::Stay) {
                    return outcome;
                }
                // The wake took the waker: hand it over again, then look again for what came
                // in between (its wake found no waker).
                connection.hand_wake_to(&self.waker(key));
                if !connection.has_pending() {
                    return InPlace::Stay;
                }
            }
        });
        self.settle(outcome);
    }

    /// The waker that brings the parked connection `key` back.
    fn waker(self: &Arc<Self>, key: u64) -> Waker {
        Waker::from(Arc::new(Unpark {
            lot: Arc::downgrade(self),
            key,
        }))
    }

    /// The parked connection `key`'s socket is readable: served here if it can be.
    fn readable(self: &Arc<Self>, key: u64) {
        let outcome = self.in_place(key, |parked| {
            let outcome = parked.read();
            if matches!(outcome, InPlace::Stay) {
                let rearmed = self
                    .epoll
                    .get_ref()
                    .0
                    .modify(&parked.stream, &mut EpollEvent::new(interest(), key));
                if rearmed.is_err() {
                    return InPlace::Task;
                }
            }
            outcome
        });
        self.settle(outcome);
    }

    /// Runs `serve` on the parked connection `key` (if it is still here): moves its timer
    /// when its deadline moved, or takes it out of the lot, in the same step, when it needs
    /// its task or ends. (Taken out later, another wake-up, or the lot's drain, could
    /// resume it first, and an ending `serve` took from the connection, a close request,
    /// would be lost.)
    fn in_place(&self, key: u64, serve: impl FnOnce(&mut Parked) -> InPlace) -> Option<Served> {
        let (slot, generation) = split(key);
        let mut state = self.state();
        let State { parked, timers, .. } = &mut *state;
        let parked = parked.get_mut(slot)?.as_mut()?;
        if parked.generation != generation {
            return None;
        }
        let ending = match serve(parked) {
            InPlace::Stay => {
                let wake_at = parked.live.wake_at();
                let mut earliest = false;
                if wake_at != parked.wake_at {
                    timers.remove(&(parked.wake_at, key));
                    earliest = timers.first().is_none_or(|&(at, _)| wake_at < at);
                    timers.insert((wake_at, key));
                    parked.wake_at = wake_at;
                }
                drop(state);
                if earliest {
                    self.timer_added.notify_one();
                }
                return Some(Served::Stayed);
            }
            InPlace::Task => None,
            InPlace::End(ending) => Some(ending),
        };
        let parked = self.take_out(&mut state, key)?;
        drop(state);
        Some(Served::Left(parked, ending))
    }

    /// What serving a connection in place came to.
    fn settle(self: &Arc<Self>, served: Option<Served>) {
        match served {
            None => {}
            Some(Served::Stayed) => self.connections.count_served_parked(),
            Some(Served::Left(parked, ending)) => self.resume_left(parked, ending),
        }
    }

    /// Takes the parked connection `key` out of the lot; `None` if it already left.
    fn take_out(&self, state: &mut State, key: u64) -> Option<Box<Parked>> {
        let (slot, generation) = split(key);
        // An empty slot is reserved by a connection still on its way in: its `park` looks
        // at what woke it once it is in.
        let Some(Some(parked)) = state.parked.get(slot) else {
            return None;
        };
        if parked.generation != generation {
            return None;
        }
        let Some(Some(parked)) = state.parked.try_remove(slot) else {
            return None;
        };
        self.connections.count_parked(false);
        state.timers.remove(&(parked.wake_at, key));
        Some(parked)
    }

    /// Brings the parked connection `key` back into a task; nothing if it already left.
    fn unpark(self: &Arc<Self>, key: u64) {
        self.unpark_to(key, None);
    }

    /// Brings the parked connection `key` back into a task, to end it with `ending` if
    /// given; nothing if it already left.
    fn unpark_to(self: &Arc<Self>, key: u64, ending: Option<Ending>) {
        let parked = self.take_out(&mut self.state(), key);
        if let Some(parked) = parked {
            self.resume_left(parked, ending);
        }
    }

    /// Runs a connection taken out of the lot in a task again (to end with `ending`).
    fn resume_left(self: &Arc<Self>, parked: Box<Parked>, ending: Option<Ending>) {
        // Before the socket is registered with tokio again. It is in the set unless it was
        // never added (a failed park), and a failed delete leaves at worst a stale key.
        let _ = self.epoll.get_ref().0.delete(&parked.stream);
        self.resume(parked, true, ending);
    }

    /// Runs the connection in a new task; it may park again if `may_park`; it ends with
    /// `ending` if given.
    fn resume(self: &Arc<Self>, parked: Box<Parked>, may_park: bool, ending: Option<Ending>) {
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
                        let mut transport = WebSocketTransport { io, framer };
                        if let Some(ending) = ending {
                            let peer = accepted.peer;
                            device::end(&mut transport, &accepted.context, live, ending, peer)
                                .await;
                            return;
                        }
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
                                    self.readable(event.data());
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
    /// session's second lane, the app's stream `all`, took it from 184 to 248 bytes; lanes
    /// that hold their positions in flight only while there are some, 208.)
    #[test]
    fn a_parked_connection_stays_small() {
        let size = size_of::<Parked>();
        assert!(size <= 208, "a parked connection is {size} bytes");
    }
}
