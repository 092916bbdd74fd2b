//! The connection table: a process's live device connections by token, and delivery into
//! them.
//!
//! Each live connection has a [`Connection`]: a small bounded queue of live pushes, a wake-up
//! and a close request. Delivery never waits on a device: [`ConnectionTable::deliver`] queues
//! and wakes;
//! when a connection's queue is full the push is not queued but the connection is told it
//! fell behind, and it reads what it missed from the offline store (every push is stored
//! before it is delivered). An idle connection's queue holds no allocation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use pigeon_proto::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::message::{Delivery, SharedDelivery};
use crate::store::{Route, Routes};

/// The live device connections of one process, by device token.
pub struct ConnectionTable {
    connections: DashMap<Arc<str>, Arc<Connection>>,
    next_connection_id: AtomicU64,
    queue_limit: usize,
    shutdown: CancellationToken,
    /// Connections waiting without a task (see `websocket::park`).
    parked: AtomicUsize,
    /// Places taken within the process's connection limit: one per device that has said
    /// Hello, until its connection ends (see [`ConnectionTable::reserve`]).
    reserved: AtomicUsize,
    /// The apps of the connections, each name held once.
    apps: Mutex<Vec<Arc<str>>>,
    /// The highest offset of each app's stream `all` this process has handed out.
    heads: DashMap<Arc<str>, u64>,
}

/// One live device connection, as the rest of the process sees it.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    /// The app of the device.
    app: Arc<str>,
    outbound: Mutex<Outbound>,
    /// Set when there is something to take; the connection's task clears it.
    pending: AtomicBool,
    /// The connection's task, while it waits. (One waiter per connection, so a waker slot
    /// does what a `Notify` would, in less memory and with no waiter in the task's future.)
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct Outbound {
    queue: VecDeque<Delivery>,
    shared: VecDeque<SharedDelivery>,
    fell_behind: bool,
    shared_fell_behind: bool,
    close: Option<CloseCode>,
}

/// What a connection's task takes from its [`Connection`] when woken.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Live direct pushes, in the order they were delivered.
    pub deliveries: VecDeque<Delivery>,
    /// Live pushes of the app's stream `all`, in the order they were delivered.
    pub shared: VecDeque<SharedDelivery>,
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
        &self.app
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

    fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Takes everything delivered since the last take.
    pub fn take(&self) -> Inbox {
        let mut outbound = lock(&self.outbound);
        Inbox {
            // Taking the queues leaves unallocated ones behind.
            deliveries: std::mem::take(&mut outbound.queue),
            shared: std::mem::take(&mut outbound.shared),
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
                outbound.queue.push_back(delivery);
                true
            } else {
                outbound.fell_behind = true;
                false
            }
        };
        self.wake();
        queued
    }

    /// Queues a live push of a shared stream, as [`Connection::offer`] does a direct one.
    fn offer_shared(&self, delivery: SharedDelivery, limit: usize) -> bool {
        let queued = {
            let mut outbound = lock(&self.outbound);
            if outbound.shared.len() < limit {
                outbound.shared.push_back(delivery);
                true
            } else {
                outbound.shared_fell_behind = true;
                false
            }
        };
        self.wake();
        queued
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
            reserved: AtomicUsize::new(0),
            apps: Mutex::new(Vec::new()),
            heads: DashMap::new(),
        }
    }

    /// Cancelled when the process shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Registers a new connection for `token`. An older connection of the same token is
    /// asked to close with [`CloseCode::Replaced`].
    pub fn register(&self, token: &Arc<str>, app: &str) -> Arc<Connection> {
        let connection = Arc::new(Connection {
            id: self.next_connection_id.fetch_add(1, Ordering::Relaxed),
            app: self.app_name(app),
            outbound: Mutex::new(Outbound::default()),
            pending: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        if let Some(older) = self.connections.insert(token.clone(), connection.clone()) {
            older.close(CloseCode::Replaced);
        }
        // Registered after `shut_down` went through the table: close it here instead.
        if self.shutdown.is_cancelled() {
            connection.close(CloseCode::GoingAway);
        }
        connection
    }

    /// The one copy of the app name `app`.
    fn app_name(&self, app: &str) -> Arc<str> {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(name) = apps.iter().find(|name| ***name == *app) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(app);
        apps.push(name.clone());
        name
    }

    /// Hands a live push of `app`'s stream `all` to every connection of that app here;
    /// returns how many took it live.
    pub fn deliver_shared(&self, app: &str, delivery: &SharedDelivery) -> u32 {
        let app = self.app_name(app);
        self.heads
            .entry(app.clone())
            .and_modify(|head| *head = (*head).max(delivery.offset))
            .or_insert(delivery.offset);
        let mut live = 0;
        for entry in self.connections.iter() {
            // Compared by address: every connection's app name is the table's one copy.
            if Arc::ptr_eq(&entry.app, &app)
                && entry.offer_shared(delivery.clone(), self.queue_limit)
            {
                live += 1;
            }
        }
        live
    }

    /// The highest offset of `app`'s stream `all` this process has handed out, or heard of
    /// (0: none).
    pub fn stream_head(&self, app: &str) -> u64 {
        self.heads.get(app).map_or(0, |head| *head)
    }

    /// Notes that `app`'s stream `all` has reached `head` (read from the store): sessions
    /// behind it read the stream at their next heartbeat.
    pub fn note_stream_head(&self, app: &str, head: u64) {
        let app = self.app_name(app);
        self.heads
            .entry(app)
            .and_modify(|known| *known = (*known).max(head))
            .or_insert(head);
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
        self.connections
            .remove_if(token, |_, connection| connection.id == id);
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

    /// Counts a connection that left its task (`true`) or got one back (`false`).
    pub(crate) fn count_parked(&self, parked: bool) {
        if parked {
            self.parked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.parked.fetch_sub(1, Ordering::Relaxed);
        }
    }
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

    fn delivery(seq: u64) -> Delivery {
        Delivery {
            seq,
            message: Arc::new(Message {
                id: "m".into(),
                payload: Bytes::new(),
                priority: Priority::Normal,
                accepted_at_ms: 0,
                expires_at_ms: 1,
                collapse_key: String::new(),
            }),
        }
    }

    #[test]
    fn a_full_queue_tells_the_connection_to_catch_up() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let connection = table.register(&Arc::from("t"), "demo");
        assert_eq!(table.deliver("t", delivery(1)), Delivered::Live);
        assert_eq!(table.deliver("t", delivery(2)), Delivered::Live);
        assert_eq!(table.deliver("t", delivery(3)), Delivered::Lagging);
        assert_eq!(table.deliver("other", delivery(1)), Delivered::Offline);
        let inbox = connection.take();
        assert_eq!(
            inbox.deliveries.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(inbox.fell_behind);
        assert!(!connection.take().fell_behind);
    }

    #[test]
    fn a_new_connection_replaces_the_old_one() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let old = table.register(&Arc::from("t"), "demo");
        let new = table.register(&Arc::from("t"), "demo");
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
        let open = table.register(&Arc::from("open"), "demo");
        table.shut_down();
        assert!(table.shutdown().is_cancelled());
        assert_eq!(open.take().close, Some(CloseCode::GoingAway));
        let late = table.register(&Arc::from("late"), "demo");
        assert_eq!(late.take().close, Some(CloseCode::GoingAway));
    }

    #[test]
    fn a_wake_before_the_wait_is_not_lost() {
        let table = ConnectionTable::new(2, CancellationToken::new());
        let connection = table.register(&Arc::from("t"), "demo");
        let mut context = Context::from_waker(std::task::Waker::noop());
        assert_eq!(connection.poll_woken(&mut context), Poll::Pending);
        assert_eq!(table.deliver("t", delivery(1)), Delivered::Live);
        assert_eq!(connection.poll_woken(&mut context), Poll::Ready(()));
        // Taken once: quiet until the next delivery.
        assert_eq!(connection.poll_woken(&mut context), Poll::Pending);
    }
}
