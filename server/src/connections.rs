//! The connection table: a process's live device connections by token, and delivery into
//! them.
//!
//! Each live connection has a [`Connection`]: a small bounded queue of live pushes, a wake-up
//! and a close request. Delivery never waits on a device: [`ConnectionTable::deliver`] queues
//! and wakes;
//! when a connection's queue is full the push is not queued but the connection is told it
//! fell behind, and it reads what it missed from the offline store (every push is stored
//! before it is delivered). An idle connection's queue holds no allocation.
//!
//! Each app's shared stream (pushes to `all` and to tags) is handed out in offset order,
//! to the connections each entry is for ([`stream`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use pigeon_proto::CloseCode;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::message::{Delivery, Match, Message, PACE_STEP, SharedDelivery, TagFilter};
use crate::store::{DeviceTags, Route, Routes, StreamHead};

mod stream;

pub use stream::AppStream;
use stream::{Accepted, MAX_PACING, Pacing, StreamState};

/// The live device connections of one process, by device token.
pub struct ConnectionTable {
    connections: DashMap<Arc<str>, Arc<Connection>>,
    next_connection_id: AtomicU64,
    queue_limit: usize,
    shutdown: CancellationToken,
    /// Connections waiting without a task (see `websocket::park`).
    parked: AtomicUsize,
    /// Wake-ups of parked connections (a push, a frame) served without a task.
    served_parked: AtomicU64,
    /// Places taken within the process's connection limit: one per device that has said
    /// Hello, until its connection ends (see [`ConnectionTable::reserve`]).
    reserved: AtomicUsize,
    /// The apps of the connections and their streams, each held once.
    apps: Mutex<HashMap<Arc<str>, Arc<AppStream>>>,
    /// Woken when a gap opens in an app's stream (see `crate::stream_keeper`).
    gap_opened: Notify,
    /// Tag changes heard of (see [`ConnectionTable::retags`]).
    retags: AtomicU64,
    /// Woken when an app's stream starts pacing an entry (see [`ConnectionTable::run_pacing`]).
    pacing_started: Notify,
}

/// One live device connection, as the rest of the process sees it.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    /// The app of the device.
    app: Arc<AppStream>,
    outbound: Mutex<Outbound>,
    /// Set when there is something to take; the connection's task clears it.
    pending: AtomicBool,
    /// The connection's task, while it waits. (One waiter per connection, so a waker slot
    /// does what a `Notify` would, in less memory and with no waiter in the task's future.)
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct Outbound {
    /// Live pushes, direct and of the app's stream, in the order they were delivered.
    queue: VecDeque<Outgoing>,
    fell_behind: bool,
    shared_fell_behind: bool,
    close: Option<CloseCode>,
    /// The device's tags, if it ever had any (boxed: most connections have none).
    tags: Option<Box<ConnectionTags>>,
}

/// A device's tags as its connection keeps them.
#[derive(Debug, Default)]
struct ConnectionTags {
    /// Each tag and when the device got it (the offset of the app's stream), sorted by
    /// name; names are the app's one copy.
    list: TagList,
    /// The version of the list (a change with a lower one is older).
    version: u64,
}

/// A live push waiting for its connection's task.
#[derive(Clone, Debug)]
pub enum Outgoing {
    /// A direct push, with the device's seq.
    Direct(Delivery),
    /// An entry of the app's stream.
    Shared(SharedDelivery),
    /// The offset of an entry of the app's stream that skips the device (its user opted
    /// out, or had its frequency cap): passed over, as the store read passes over one, so
    /// that the device does not read it again (and it is counted skipped once).
    Skipped(u64),
}

/// What a connection's task takes from its [`Connection`] when woken.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Live pushes, direct and of the app's stream `all`, in the order they were delivered.
    pub pushes: VecDeque<Outgoing>,
    /// Whether direct pushes were dropped because the queue was full (they are in the
    /// store).
    pub fell_behind: bool,
    /// The same, for the stream `all`.
    pub shared_fell_behind: bool,
    /// A request to close the connection, with the code to close with.
    pub close: Option<CloseCode>,
}

impl Connection {
    /// This connection's id, unique within the table.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The app of the device.
    pub fn app(&self) -> &Arc<str> {
        self.app.name()
    }

    /// Whether the message at `offset` of the app's stream is for this device, or skips it.
    pub fn decide(&self, message: &Message, offset: u64) -> Match {
        match message.filter.as_deref() {
            None => Match::For,
            Some(filter) => lock(&self.outbound).decide(filter, offset),
        }
    }

    /// Ready once there is something to take (since the last time it was ready). Only the
    /// connection's own task may poll it.
    pub fn poll_woken(&self, context: &mut Context<'_>) -> Poll<()> {
        if self.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(context.waker());
        // A wake between the check and the registration would be missed without this one.
        if self.pending.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Hands this connection's wake-up to `waker`, for while the connection has no task (it
    /// is parked). Only the connection's owner may call it, never while a task of the
    /// connection polls [`Connection::poll_woken`].
    pub fn hand_wake_to(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Whether something waits to be taken (a wake that came before the wake-up was handed
    /// over went to the old waker: this is how the new owner learns of it).
    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the note that something waits (for an owner that is about to take it without
    /// waiting on [`Connection::poll_woken`]); whether there was one.
    pub fn clear_pending(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Takes everything delivered since the last take.
    pub fn take(&self) -> Inbox {
        let mut outbound = lock(&self.outbound);
        Inbox {
            // Taking the queue leaves an unallocated one behind.
            pushes: std::mem::take(&mut outbound.queue),
            fell_behind: std::mem::take(&mut outbound.fell_behind),
            shared_fell_behind: std::mem::take(&mut outbound.shared_fell_behind),
            close: outbound.close.take(),
        }
    }

    /// Asks the connection to close with `code`.
    pub fn close(&self, code: CloseCode) {
        lock(&self.outbound).close = Some(code);
        self.wake();
    }

    /// Queues a live push; returns false when the queue was full and the connection was told
    /// to catch up from the store instead.
    fn offer(&self, delivery: Delivery, limit: usize) -> bool {
        let queued = {
            let mut outbound = lock(&self.outbound);
            if outbound.queue.len() < limit {
                outbound.queue.push_back(Outgoing::Direct(delivery));
                true
            } else {
                outbound.fell_behind = true;
                false
            }
        };
        self.wake();
        queued
    }

    /// Queues a live push of a shared stream, as [`Connection::offer`] does a direct one,
    /// if it is for this device.
    fn offer_shared(&self, delivery: &SharedDelivery, limit: usize) -> HandedOut {
        let queued = {
            let mut outbound = lock(&self.outbound);
            if let Some(filter) = delivery.message.filter.as_deref() {
                match outbound.decide(filter, delivery.offset) {
                    Match::For => {}
                    Match::NotFor => return HandedOut::default(),
                    Match::Skipped => {
                        drop(outbound);
                        self.pass_over(delivery.offset, limit);
                        return HandedOut {
                            live: 0,
                            skipped: 1,
                        };
                    }
                }
            }
            if outbound.queue.len() < limit {
                outbound.queue.push_back(Outgoing::Shared(delivery.clone()));
                true
            } else {
                outbound.shared_fell_behind = true;
                false
            }
        };
        self.wake();
        HandedOut {
            live: u32::from(queued),
            skipped: 0,
        }
    }

    /// Tells the connection's session that the entry at `offset` of the app's stream
    /// skips the device, after the live pushes queued before it. Left out when the queue
    /// is full: the device may then read the entry from the store later (after a
    /// reconnect), where it is counted again.
    fn pass_over(&self, offset: u64, limit: usize) {
        {
            let mut outbound = lock(&self.outbound);
            if outbound.queue.len() >= limit {
                return;
            }
            outbound.queue.push_back(Outgoing::Skipped(offset));
        }
        self.wake();
    }
}

/// What handing out an entry of an app's shared stream did: the connections that took it
/// live, and those it skipped (their users opted out, or had their frequency cap; see
/// [`TagFilter::decide`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandedOut {
    /// Connections that took it live.
    pub live: u32,
    /// Connections it skipped.
    pub skipped: u32,
}

impl std::ops::Add for HandedOut {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            live: self.live.saturating_add(other.live),
            skipped: self.skipped.saturating_add(other.skipped),
        }
    }
}

impl Outbound {
    fn decide(&self, filter: &TagFilter, offset: u64) -> Match {
        let list = self.tag_list();
        filter.decide(offset, |name| {
            list.binary_search_by(|(have, _)| (**have).cmp(name))
                .ok()
                .map(|index| list[index].1)
        })
    }

    fn tag_list(&self) -> &[(Arc<str>, u64)] {
        self.tags.as_deref().map_or(&[], |tags| &tags.list)
    }

    fn tags_version(&self) -> u64 {
        self.tags.as_deref().map_or(0, |tags| tags.version)
    }
}

impl Inbox {
    /// The direct pushes, in order.
    pub fn deliveries(&self) -> impl Iterator<Item = &Delivery> {
        self.pushes.iter().filter_map(|push| match push {
            Outgoing::Direct(delivery) => Some(delivery),
            Outgoing::Shared(_) | Outgoing::Skipped(_) => None,
        })
    }

    /// The pushes of the app's stream, in order.
    pub fn shared(&self) -> impl Iterator<Item = &SharedDelivery> {
        self.pushes.iter().filter_map(|push| match push {
            Outgoing::Shared(delivery) => Some(delivery),
            Outgoing::Direct(_) | Outgoing::Skipped(_) => None,
        })
    }
}

/// A poisoned lock only means another thread panicked while holding it; the queue itself is
/// still consistent, so go on.
fn lock(outbound: &Mutex<Outbound>) -> std::sync::MutexGuard<'_, Outbound> {
    outbound
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What [`ConnectionTable::deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Handed to the device's live connection.
    Live,
    /// The device has a live connection, but its queue was full: it will read the push from
    /// the store.
    Lagging,
    /// The device is not connected here.
    Offline,
}

impl ConnectionTable {
    /// A table whose connections queue at most `queue_limit` live pushes each.
    pub fn new(queue_limit: usize, shutdown: CancellationToken) -> Self {
        Self {
            connections: DashMap::new(),
            next_connection_id: AtomicU64::new(1),
            queue_limit,
            shutdown,
            parked: AtomicUsize::new(0),
            served_parked: AtomicU64::new(0),
            reserved: AtomicUsize::new(0),
            apps: Mutex::new(HashMap::new()),
            gap_opened: Notify::new(),
            retags: AtomicU64::new(0),
            pacing_started: Notify::new(),
        }
    }

    /// Cancelled when the process shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Registers a new connection for `token` of `app`, with the device's tags and where
    /// the app's stream stood when the device was admitted. An older connection of the same
    /// token is asked to close with [`CloseCode::Replaced`]. Returns the connection and its
    /// floor: the offset of the app's stream up to which this table had handed out entries
    /// (the session reads those from the store; later ones come from here, in order).
    pub fn register(
        &self,
        token: &Arc<str>,
        app: &str,
        head: StreamHead,
        tags: &DeviceTags,
    ) -> (Arc<Connection>, u64) {
        let stream = self.app_stream(app);
        let mut state = stream.lock();
        if head.epoch != state.epoch && head.epoch != 0 && !state.is_retired(head.epoch) {
            // The first connection of the app here, or the store's stream was recreated
            // since the connections here were admitted: they are in an epoch that is gone.
            let recreated = state.epoch != 0;
            state.restart(head.epoch, head.head);
            if recreated {
                self.close_app(&stream, CloseCode::StreamReset);
            }
        }
        let tags = interned(&mut state, tags);
        let connection = Arc::new(Connection {
            id: self.next_connection_id.fetch_add(1, Ordering::Relaxed),
            app: stream.clone(),
            outbound: Mutex::new(Outbound {
                tags: tags.map(Box::new),
                ..Outbound::default()
            }),
            pending: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        state.index(&connection, lock(&connection.outbound).tag_list());
        state.members += 1;
        if let Some(older) = self.connections.insert(token.clone(), connection.clone()) {
            older.close(CloseCode::Replaced);
            if Arc::ptr_eq(&older.app, &stream) {
                self.forget(&older, &mut state);
            }
        }
        let floor = state.through;
        drop(state);
        // Registered after `shut_down` went through the table: close it here instead.
        if self.shutdown.is_cancelled() {
            connection.close(CloseCode::GoingAway);
        }
        (connection, floor)
    }

    /// The app `app` and its stream, created on first use.
    fn app_stream(&self, app: &str) -> Arc<AppStream> {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stream) = apps.get(app) {
            return stream.clone();
        }
        let name: Arc<str> = Arc::from(app);
        let stream = Arc::new(AppStream::new(name.clone()));
        apps.insert(name, stream.clone());
        stream
    }

    /// The apps this table knows.
    pub fn apps(&self) -> Vec<Arc<AppStream>> {
        self.apps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Takes a connection that is leaving out of its app's books (under the app's lock).
    fn forget(&self, connection: &Connection, state: &mut StreamState) {
        let tags = lock(&connection.outbound).tags.take();
        if let Some(tags) = tags {
            state.unindex(connection.id, &tags.list);
        }
        state.members = state.members.saturating_sub(1);
    }

    /// Asks every connection of `stream`'s app to close with `code` (its lock held).
    fn close_app(&self, stream: &Arc<AppStream>, code: CloseCode) {
        for entry in self.connections.iter() {
            if Arc::ptr_eq(&entry.app, stream) {
                entry.close(code);
            }
        }
    }

    /// Hands an entry of `app`'s shared stream to every connection of the app here that it
    /// is for, in offset order (an entry that overtook an earlier one waits for it); returns
    /// how many took it live now, and how many it skipped.
    pub fn deliver_shared(&self, app: &str, delivery: SharedDelivery) -> HandedOut {
        let stream = self.app_stream(app);
        let mut state = stream.lock();
        match state.accept(delivery.clone()) {
            Accepted::HandOut(entries) => entries
                .iter()
                .map(|entry| self.hand_out(&stream, &mut state, entry))
                .fold(HandedOut::default(), std::ops::Add::add),
            Accepted::Nothing { gap } => {
                if gap {
                    self.gap_opened.notify_one();
                }
                HandedOut::default()
            }
            Accepted::NewEpoch => {
                // The stream was recreated (its history lost): every device here must
                // reconnect to learn it.
                state.restart(delivery.epoch, delivery.offset.saturating_sub(1));
                self.close_app(&stream, CloseCode::StreamReset);
                HandedOut::default()
            }
        }
    }

    /// Entries of `stream` read from the store to close a gap, complete up to `complete`
    /// (see `stream::StreamState::fill`).
    pub fn fill_stream(
        &self,
        stream: &Arc<AppStream>,
        epoch: u64,
        entries: Vec<SharedDelivery>,
        complete: u64,
    ) {
        let mut state = stream.lock();
        for entry in state.fill(epoch, entries, complete) {
            self.hand_out(stream, &mut state, &entry);
        }
    }

    /// The store says `stream` is at `head`: when that is another epoch than the one here
    /// (the stream was recreated, or is gone), every connection of the app is asked to
    /// reconnect. Returns where the stream stands here: its epoch and the offset handed out
    /// to, when there is something to read from the store.
    pub fn check_stream(&self, stream: &Arc<AppStream>, head: StreamHead) -> Option<(u64, u64)> {
        let mut state = stream.lock();
        if state.members == 0 {
            return None;
        }
        if head.epoch != state.epoch {
            if head.epoch != 0 && state.is_retired(head.epoch) {
                return None;
            }
            state.restart(head.epoch, head.head);
            self.close_app(stream, CloseCode::StreamReset);
            return None;
        }
        (state.through < head.head).then_some((state.epoch, state.through))
    }

    /// Whether `stream` has had a gap open since before `before`.
    pub fn has_gap(&self, stream: &AppStream, before: Instant) -> bool {
        stream.lock().gap_open_since(before)
    }

    /// Completes when a gap opens in some app's stream.
    pub async fn gap_opened(&self) {
        self.gap_opened.notified().await;
    }

    /// Hands one entry to the connections of the app it is for (the app's lock held), or
    /// starts handing it out over its pace; returns how many connections took it now (for
    /// a paced entry how many it is for), and how many it skipped.
    fn hand_out(
        &self,
        stream: &Arc<AppStream>,
        state: &mut StreamState,
        entry: &SharedDelivery,
    ) -> HandedOut {
        if state.members == 0 {
            // No connection of the app here: nothing to look through.
            return HandedOut::default();
        }
        let candidates = entry
            .message
            .filter
            .as_deref()
            .and_then(|filter| state.candidates(filter));
        let paced = entry.message.pace_ms > 0 && state.pacing.len() < MAX_PACING;
        if !paced && state.pacing.is_empty() {
            return self.offer_to(stream, candidates, |connection| {
                connection.offer_shared(entry, self.queue_limit)
            });
        }
        let connections = candidates.unwrap_or_else(|| self.members(stream));
        if !paced {
            // Connections still waiting for a paced entry take it first.
            let mut handed = HandedOut::default();
            for connection in &connections {
                self.offer_paced_first(&state.pacing, connection);
                handed = handed + connection.offer_shared(entry, self.queue_limit);
            }
            return handed;
        }
        let mut skipped = 0u32;
        let targets: Vec<Arc<Connection>> = connections
            .into_iter()
            .filter(
                |connection| match connection.decide(&entry.message, entry.offset) {
                    Match::For => true,
                    Match::NotFor => false,
                    Match::Skipped => {
                        skipped = skipped.saturating_add(1);
                        // After the paced entries it still waits for, as a live entry.
                        self.offer_paced_first(&state.pacing, connection);
                        connection.pass_over(entry.offset, self.queue_limit);
                        false
                    }
                },
            )
            .collect();
        let count = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let mut pacing = Pacing::new(entry.clone(), targets, Instant::now());
        for connection in pacing.due(Instant::now()) {
            self.offer_paced_first(&state.pacing, &connection);
            connection.offer_shared(entry, self.queue_limit);
        }
        if !pacing.is_done() {
            state.pacing.push(pacing);
            self.pacing_started.notify_one();
        }
        HandedOut {
            live: count,
            skipped,
        }
    }

    /// Calls `offer` with each connection of `stream`'s app (or of `candidates`, when the
    /// tag index narrowed them down); returns what they did with the entry, summed.
    fn offer_to(
        &self,
        stream: &Arc<AppStream>,
        candidates: Option<Vec<Arc<Connection>>>,
        offer: impl Fn(&Connection) -> HandedOut,
    ) -> HandedOut {
        let mut handed = HandedOut::default();
        match candidates {
            Some(candidates) => {
                for connection in candidates {
                    handed = handed + offer(&connection);
                }
            }
            None => {
                for connection in self.connections.iter() {
                    // Compared by address: every connection of an app shares its one copy.
                    if Arc::ptr_eq(&connection.app, stream) {
                        handed = handed + offer(&connection);
                    }
                }
            }
        }
        handed
    }

    /// The connections of `stream`'s app here.
    fn members(&self, stream: &Arc<AppStream>) -> Vec<Arc<Connection>> {
        self.connections
            .iter()
            .filter(|connection| Arc::ptr_eq(&connection.app, stream))
            .map(|connection| connection.value().clone())
            .collect()
    }

    /// Hands `connection` each entry of `pacing` it is still waiting for, ahead of its step
    /// (a later entry is about to be handed to it).
    fn offer_paced_first(&self, pacing: &[Pacing], connection: &Connection) {
        for paced in pacing {
            if paced.waits_for(connection) {
                connection.offer_shared(&paced.entry, self.queue_limit);
            }
        }
    }

    /// Hands out the steps of paced entries that are due by `now`; returns whether an entry
    /// is still being paced.
    pub fn pace(&self, now: Instant) -> bool {
        let mut pacing = false;
        for stream in self.apps() {
            let mut guard = stream.lock();
            let state = &mut *guard;
            for index in 0..state.pacing.len() {
                let (earlier, rest) = state.pacing.split_at_mut(index);
                let current = &mut rest[0];
                let entry = current.entry.clone();
                for connection in current.due(now) {
                    self.offer_paced_first(earlier, &connection);
                    connection.offer_shared(&entry, self.queue_limit);
                }
            }
            state.pacing.retain(|paced| !paced.is_done());
            pacing |= !state.pacing.is_empty();
        }
        pacing
    }

    /// Hands out paced entries of the apps' streams step by step, until the table shuts
    /// down.
    pub async fn run_pacing(self: Arc<Self>) {
        loop {
            let busy = self.pace(Instant::now());
            tokio::select! {
                () = self.pacing_started.notified(), if !busy => {}
                () = tokio::time::sleep(PACE_STEP), if busy => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// The device `token` of `app` has these tags now: its connection here, if any, is
    /// indexed by them from now on (unless it knows a newer list).
    pub fn retag(&self, app: &str, token: &str, tags: &DeviceTags) {
        self.retags.fetch_add(1, Ordering::AcqRel);
        let Some(connection) = self.connections.get(token).map(|entry| entry.clone()) else {
            return;
        };
        if &**connection.app() != app {
            return;
        }
        let stream = connection.app.clone();
        let mut state = stream.lock();
        // Still the token's connection (not replaced while the lock was taken)?
        let current = self
            .connections
            .get(token)
            .is_some_and(|entry| Arc::ptr_eq(&entry, &connection));
        if !current {
            return;
        }
        let new = interned(&mut state, tags).unwrap_or_default();
        let old = {
            let mut outbound = lock(&connection.outbound);
            if new.version <= outbound.tags_version() {
                return;
            }
            outbound.tags.replace(Box::new(new))
        };
        if let Some(old) = old {
            state.unindex(connection.id, &old.list);
        }
        state.index(&connection, lock(&connection.outbound).tag_list());
    }

    /// A count of the tag changes this table has been told of: a device admitted before a
    /// change and registered after it reads its tags again (the change may have missed it).
    pub fn retags(&self) -> u64 {
        self.retags.load(Ordering::Acquire)
    }

    /// Shuts the table down: cancels the shutdown token (listeners stop accepting) and asks
    /// every connection, and any registered from now on, to close with 1001 (going away).
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        for entry in self.connections.iter() {
            entry.close(CloseCode::GoingAway);
        }
    }

    /// Removes the connection `id` of `token`, unless a newer one has replaced it.
    pub fn unregister(&self, token: &str, id: u64) {
        let Some(connection) = self
            .connections
            .get(token)
            .filter(|entry| entry.id == id)
            .map(|entry| entry.clone())
        else {
            return;
        };
        let stream = connection.app.clone();
        let mut state = stream.lock();
        if self
            .connections
            .remove_if(token, |_, connection| connection.id == id)
            .is_some()
        {
            self.forget(&connection, &mut state);
        }
    }

    /// Asks the connection `id` of `token` to close with `code`; false when that connection
    /// is not open here (any more).
    pub fn close_connection(&self, token: &str, id: u64, code: CloseCode) -> bool {
        let connection = self
            .connections
            .get(token)
            .filter(|entry| entry.id == id)
            .map(|entry| entry.clone());
        match connection {
            Some(connection) => {
                connection.close(code);
                true
            }
            None => false,
        }
    }

    /// Hands a live push to the device's connection, if it has one here.
    pub fn deliver(&self, token: &str, delivery: Delivery) -> Delivered {
        // Clone the handle out so no map guard is held while the connection's lock is taken.
        let Some(connection) = self.connections.get(token).map(|entry| entry.clone()) else {
            return Delivered::Offline;
        };
        if connection.offer(delivery, self.queue_limit) {
            Delivered::Live
        } else {
            Delivered::Lagging
        }
    }

    /// Whether the device has a live connection here.
    pub fn is_online(&self, token: &str) -> bool {
        self.connections.contains_key(token)
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Takes a place for a new connection if fewer than `max` are taken. Every place taken
    /// must be given back with [`ConnectionTable::release`] when that connection ends.
    pub fn reserve(&self, max: usize) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .is_ok()
    }

    /// Gives back a place taken with [`ConnectionTable::reserve`].
    pub fn release(&self) {
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                taken.checked_sub(1)
            });
    }

    /// Places taken within the connection limit.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    /// Live connections waiting without a task.
    pub fn parked_count(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Wake-ups of parked connections served without a task, so far.
    pub fn served_parked(&self) -> u64 {
        self.served_parked.load(Ordering::Relaxed)
    }

    /// Counts a wake-up of a parked connection served without a task.
    pub(crate) fn count_served_parked(&self) {
        self.served_parked.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that left its task (`true`) or got one back (`false`).
    pub(crate) fn count_parked(&self, parked: bool) {
        if parked {
            self.parked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.parked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A device's tags as a connection keeps them: each name (the app's one copy) with when the
/// device got it, sorted by name.
type TagList = Box<[(Arc<str>, u64)]>;

/// A device's tags as a connection keeps them, names interned in the app's state; `None`
/// for a device that never had any.
fn interned(state: &mut StreamState, tags: &DeviceTags) -> Option<ConnectionTags> {
    if tags.tags.is_empty() && tags.version == 0 {
        return None;
    }
    let list = tags
        .tags
        .iter()
        .map(|tag| (state.tag_name(&tag.name), tag.since))
        .collect();
    Some(ConnectionTags {
        list,
        version: tags.version,
    })
}

/// In standalone mode the connection table is where the store learns which devices are
/// connected (for TTL-0 pushes): every route is a connection of this process.
impl Routes for ConnectionTable {
    fn route(&self, token: &str) -> Option<Route> {
        self.connections.get(token).map(|connection| Route {
            node: String::new(),
            connection: connection.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::Bytes;
    use pigeon_proto::device::Priority;
    use std::time::Duration;

    fn delivery(seq: u64) -> Delivery {
        Delivery {
            seq,
            message: Arc::new(Message {
                pace_ms: 0,
                id: "m".into(),
                payload: Bytes::new(),
                priority: Priority::Normal,
                class: Default::default(),
                accepted_at_ms: 0,
                expires_at_ms: 1,
                collapse_key: String::new(),
                filter: None,
            }),
        }
    }

    /// Registers `token` of the app "demo", whose stream is at offset `head`, with `tags`
    /// (each got at offset 0).
    fn join(table: &ConnectionTable, token: &str, head: u64, tags: &[&str]) -> Arc<Connection> {
        let tags = DeviceTags {
            tags: tags
                .iter()
                .map(|name| crate::store::DeviceTag {
                    name: (*name).to_owned(),
                    since: 0,
                })
                .collect(),
            version: 1,
        };
        let head = StreamHead { epoch: 7, head };
        table.register(&Arc::from(token), "demo", head, &tags).0
    }

    fn shared(offset: u64, filter: Option<TagFilter>) -> SharedDelivery {
        SharedDelivery {
            stream: "all",
            epoch: 7,
            offset,
            message: Arc::new(Message {
                pace_ms: 0,
                id: format!("m{offset}"),
                payload: Bytes::new(),
                priority: Priority::Normal,
                class: Default::default(),
                accepted_at_ms: 0,
                expires_at_ms: 1,
                collapse_key: String::new(),
                filter: filter.map(Box::new),
            }),
        }
    }

    fn offsets(connection: &Connection) -> Vec<u64> {
        connection.take().shared().map(|d| d.offset).collect()
    }

    #[test]
    fn stream_entries_reach_the_connections_they_are_for_in_order() {
        let table = ConnectionTable::new(8, CancellationToken::new());
        let sports = join(&table, "a", 0, &["sports"]);
        let both = join(&table, "b", 0, &["news", "sports"]);
        let none = join(&table, "c", 0, &[]);
        let any = |tags: &[&str]| TagFilter {
            any: tags.iter().map(|t| (*t).to_owned()).collect(),
            ..TagFilter::default()
        };
        assert_eq!(table.deliver_shared("demo", shared(1, None)).live, 3);
        assert_eq!(
            table
                .deliver_shared("demo", shared(2, Some(any(&["news"]))))
                .live,
            1
        );
        // 4 overtook 3: nobody gets it until 3 comes.
        let not_sports = TagFilter {
            none: vec!["sports".into()],
            ..TagFilter::default()
        };
        assert_eq!(
            table
                .deliver_shared("demo", shared(4, Some(not_sports)))
                .live,
            0
        );
        // 3 reaches a and b, and releases 4, which reaches c.
        assert_eq!(
            table
                .deliver_shared("demo", shared(3, Some(any(&["news", "sports"]))))
                .live,
            3
        );
        assert_eq!(offsets(&sports), [1, 3]);
        assert_eq!(offsets(&both), [1, 2, 3]);
        assert_eq!(offsets(&none), [1, 4]);
        // A newcomer's floor is where the stream was handed out to.
        let (_, floor) = table.register(
            &Arc::from("d"),
            "demo",
            StreamHead { epoch: 7, head: 2 },
            &DeviceTags::default(),
        );
        assert_eq!(floor, 4);
    }

    #[test]
    fn a_paced_entry_is_handed_out_in_steps_and_never_overtaken() {
        let table = ConnectionTable::new(8, CancellationToken::new());
        let devices: Vec<_> = (0..10)
            .map(|index| join(&table, &format!("d{index}"), 0, &[]))
            .collect();
        let start = Instant::now();
        let mut paced = shared(1, None);
        Arc::get_mut(&mut paced.message).unwrap().pace_ms = 1_000;
        // For all ten, over ten steps of 100 ms: the first step's one device gets it now.
        assert_eq!(table.deliver_shared("demo", paced).live, 10);
        let got = |devices: &[Arc<Connection>]| -> Vec<Vec<u64>> {
            devices.iter().map(|device| offsets(device)).collect()
        };
        assert_eq!(got(&devices).iter().filter(|o| *o == &[1]).count(), 1);
        // Half way through, half of them have had it.
        assert!(table.pace(start + Duration::from_millis(450)));
        assert_eq!(got(&devices).iter().filter(|o| *o == &[1]).count(), 4);
        // A later entry for everyone: those still waiting are handed the paced one first.
        assert_eq!(table.deliver_shared("demo", shared(2, None)).live, 10);
        let offsets = got(&devices);
        assert_eq!(offsets.iter().filter(|o| *o == &[2]).count(), 5);
        assert_eq!(offsets.iter().filter(|o| *o == &[1, 2]).count(), 5);
        // Their steps come later; the sessions take those as duplicates.
        assert!(!table.pace(start + Duration::from_secs(1)));
        assert_eq!(got(&devices).iter().filter(|o| *o == &[1]).count(), 5);
        assert!(!table.pace(start + Duration::from_secs(2)));
    }

    #[test]
    fn a_paced_entry_lets_go_of_connections_that_closed() {
        let table = ConnectionTable::new(8, CancellationToken::new());
        let mut devices: Vec<_> = (0..4)
            .map(|index| join(&table, &format!("d{index}"), 0, &[]))
            .collect();
        let start = Instant::now();
        let mut paced = shared(1, None);
        Arc::get_mut(&mut paced.message).unwrap().pace_ms = 100_000;
        assert_eq!(table.deliver_shared("demo", paced).live, 4);
        let gone = devices.pop().unwrap();
        let held = Arc::downgrade(&gone);
        table.unregister("d3", gone.id());
        drop(gone);
        assert!(table.pace(start + Duration::from_secs(5)));
        assert!(held.upgrade().is_some(), "still waiting for its step");
        assert!(table.pace(start + Duration::from_secs(11)));
        assert!(held.upgrade().is_none(), "let go of once closed");
        assert!(devices.iter().all(|device| offsets(device).is_empty()));
    }

    #[test]
    fn a_retag_moves_a_connection_in_the_index_unless_it_is_older() {
        let table = ConnectionTable::new(8, CancellationToken::new());
        let device = join(&table, "a", 0, &["old"]);
        let tags = |name: &str, version| DeviceTags {
            tags: vec![crate::store::DeviceTag {
                name: name.to_owned(),
                since: 0,
            }],
            version,
        };
        table.retag("demo", "a", &tags("new", 2));
        // An older list arriving late changes nothing.
        table.retag("demo", "a", &tags("old", 1));
        let to = |tag: &str| TagFilter {
            any: vec![tag.to_owned()],
            ..TagFilter::default()
        };
        assert_eq!(
            table
                .deliver_shared("demo", shared(1, Some(to("old"))))
                .live,
            0
        );
        assert_eq!(
            table
                .deliver_shared("demo", shared(2, Some(to("new"))))
                .live,
            1
        );
        assert_eq!(offsets(&device), [2]);
        // Gone: out of the index.
        table.unregister("a", device.id());
        assert_eq!(
            table
                .deliver_shared("demo", shared(3, Some(to("new"))))
                .live,
            0
        );
    }

    #[test]
    fn a_recreated_stream_closes_the_apps_connections() {
        let table = ConnectionTable::new(8, CancellationToken::new());
        let device = join(&table, "a", 5, &[]);
        let mut reset = shared(1, None);
        reset.epoch = 9;
        assert_eq!(table.deliver_shared("demo", reset).live, 0);
        assert_eq!(device.take().close, Some(CloseCode::StreamReset));
    }

    #[test]
    fn a_full_queue_tells_the_connection_to_catch_up() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let connection = join(&table, "t", 0, &[]);
        assert_eq!(table.deliver("t", delivery(1)), Delivered::Live);
        assert_eq!(table.deliver("t", delivery(2)), Delivered::Live);
        assert_eq!(table.deliver("t", delivery(3)), Delivered::Lagging);
        assert_eq!(table.deliver("other", delivery(1)), Delivered::Offline);
        let inbox = connection.take();
        assert_eq!(
            inbox.deliveries().map(|d| d.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(inbox.fell_behind);
        assert!(!connection.take().fell_behind);
    }

    #[test]
    fn a_new_connection_replaces_the_old_one() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let old = join(&table, "t", 0, &[]);
        let new = join(&table, "t", 0, &[]);
        assert_eq!(old.take().close, Some(CloseCode::Replaced));
        // The old connection's cleanup must not remove the new one.
        table.unregister("t", old.id());
        assert!(table.is_online("t"));
        table.unregister("t", new.id());
        assert!(!table.is_online("t"));
    }

    #[test]
    fn shutting_down_closes_connections_open_and_to_come() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let open = join(&table, "open", 0, &[]);
        table.shut_down();
        assert!(table.shutdown().is_cancelled());
        assert_eq!(open.take().close, Some(CloseCode::GoingAway));
        let late = join(&table, "late", 0, &[]);
        assert_eq!(late.take().close, Some(CloseCode::GoingAway));
    }

    #[test]
    fn a_wake_before_the_wait_is_not_lost() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let connection = join(&table, "t", 0, &[]);
        let mut context = Context::from_waker(std::task::Waker::noop());
        assert_eq!(connection.poll_woken(&mut context), Poll::Pending);
        assert_eq!(table.deliver("t", delivery(1)), Delivered::Live);
        assert_eq!(connection.poll_woken(&mut context), Poll::Ready(()));
        // Taken once: quiet until the next delivery.
        assert_eq!(connection.poll_woken(&mut context), Poll::Pending);
    }
}
