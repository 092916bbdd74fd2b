//! An app's shared stream as one process hands it out.
//!
//! Entries of the stream (pushes to `all` and to tags) reach a process in any order: two
//! pushes accepted at once race to it, and a hand-off can be lost (a gateway that died
//! after the append, a call that timed out). The process hands them to its connections in
//! offset order, each offset once: an entry that comes before the one ahead of it waits
//! (bounded) until the gap closes, or until the stream keeper reads the gap from the store
//! (`crate::stream_keeper`). So a connection that is caught up knows that every entry
//! between two it was handed was not for it, and a device with a tag among millions of
//! devices without it costs nothing per push it is not for: only the connections an entry
//! is for are touched, found through the app's tag index.
//!
//! Each connection is registered with the offset its app's stream had been handed out to
//! at that moment (its *floor*): entries above it reach the connection from here, in
//! order; entries up to it the session reads from the store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::message::{PACE_STEP, SharedDelivery, TagFilter};

use super::Connection;

/// Entries one app's stream holds back at most while waiting for a gap to close; later
/// ones are left to the store (the keeper reads them).
const MAX_WAITING: usize = 4096;

/// Epochs of a stream remembered as replaced, so a late hand-off of an old one is ignored
/// instead of taken for a new one.
const RETIRED_EPOCHS: usize = 4;

/// Entries of one app's stream handed out over their pace at once at most; past that, an
/// entry is handed out at once. (Each holds the connections it waits for: a pointer each.)
pub(super) const MAX_PACING: usize = 16;

/// One app of the process: its name, and its stream's state.
#[derive(Debug)]
pub struct AppStream {
    name: Arc<str>,
    state: Mutex<StreamState>,
}

/// The state of an app's stream in this process.
#[derive(Debug, Default)]
pub(super) struct StreamState {
    /// The epoch the offsets are in (0: not known yet).
    pub(super) epoch: u64,
    /// Every offset up to this one has been handed out, in order.
    pub(super) through: u64,
    /// Entries that came ahead of an earlier one, by offset.
    waiting: BTreeMap<u64, SharedDelivery>,
    /// When the oldest open gap opened.
    gap_since: Option<Instant>,
    /// Epochs replaced by a newer one.
    retired: Vec<u64>,
    /// The app's connections here.
    pub(super) members: usize,
    /// The app's connections here by tag, by connection id.
    by_tag: HashMap<Arc<str>, HashMap<u64, Arc<Connection>>>,
    /// Tag names, each held once.
    names: HashSet<Arc<str>>,
    /// Entries being handed out over their pace, in offset order.
    pub(super) pacing: Vec<Pacing>,
}

/// An entry of the stream handed out in steps over its pace: to the connections here it
/// was for when it came, a share of them each [`PACE_STEP`], by connection id.
///
/// The stream is handed to each connection in offset order, so a later entry for a
/// connection still waiting for a paced one is handed the paced one first (sooner than its
/// step): pacing spreads a push's delivery, and never lets a later push overtake it.
///
/// It holds the connections still waiting, no more: those handed the entry are let go at
/// each step, and those that closed meanwhile every [`SWEEP`] (a device that reconnects
/// reads the entry from the store).
#[derive(Debug)]
pub(super) struct Pacing {
    pub(super) entry: SharedDelivery,
    /// Not handed the entry yet, by id, ascending.
    waiting: VecDeque<Arc<Connection>>,
    /// Connections it was for when it came.
    total: usize,
    /// Of those, handed the entry or gone.
    done: usize,
    start: Instant,
    pace: Duration,
    swept: Instant,
}

/// How often a paced entry lets go of the connections that closed while they waited.
const SWEEP: Duration = Duration::from_secs(10);

impl Pacing {
    /// `entry` to hand to `connections` over its pace from `start`.
    pub(super) fn new(
        entry: SharedDelivery,
        mut connections: Vec<Arc<Connection>>,
        start: Instant,
    ) -> Self {
        connections.sort_unstable_by_key(|connection| connection.id());
        let pace = Duration::from_millis(entry.message.pace_ms);
        Self {
            entry,
            total: connections.len(),
            waiting: connections.into(),
            done: 0,
            start,
            pace,
            swept: start,
        }
    }

    /// The connections whose step has come by `now`, taken out of those waiting. The first
    /// step is due at `start`.
    pub(super) fn due(&mut self, now: Instant) -> Vec<Arc<Connection>> {
        if now.saturating_duration_since(self.swept) >= SWEEP {
            // Held only here: the connection closed (the table and the tag index let go).
            let before = self.waiting.len();
            self.waiting
                .retain(|connection| Arc::strong_count(connection) > 1);
            self.done += before - self.waiting.len();
            self.swept = now;
        }
        let steps = (self.pace.as_millis() / PACE_STEP.as_millis()).max(1);
        let elapsed = now.saturating_duration_since(self.start).as_millis();
        let step = (elapsed / PACE_STEP.as_millis() + 1).min(steps);
        let due = (self.total as u128 * step / steps) as usize;
        let count = due.saturating_sub(self.done).min(self.waiting.len());
        self.done += count;
        self.waiting.drain(..count).collect()
    }

    /// Whether `connection` is still waiting for its step.
    pub(super) fn waits_for(&self, connection: &Connection) -> bool {
        self.waiting
            .binary_search_by_key(&connection.id(), |waiting| waiting.id())
            .is_ok()
    }

    /// Whether every connection was handed the entry (or is gone).
    pub(super) fn is_done(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// What a hand-off to the stream found.
pub(super) enum Accepted {
    /// Hand these out now, in this order (the entry, and any it released).
    HandOut(Vec<SharedDelivery>),
    /// Nothing to hand out now (an old entry, or one waiting for a gap).
    Nothing {
        /// A gap opened (the keeper should look).
        gap: bool,
    },
    /// The entry is of a new epoch: the stream was recreated.
    NewEpoch,
}

impl AppStream {
    pub(super) fn new(name: Arc<str>) -> Self {
        Self {
            name,
            state: Mutex::new(StreamState::default()),
        }
    }

    /// The app's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StreamState {
    /// Takes an entry: hands it out if it is the next one, holds it if an earlier one is
    /// missing, drops it if it was handed out already.
    pub(super) fn accept(&mut self, delivery: SharedDelivery) -> Accepted {
        if delivery.epoch != self.epoch {
            if self.retired.contains(&delivery.epoch) || delivery.epoch == 0 {
                return Accepted::Nothing { gap: false };
            }
            if self.epoch != 0 {
                return Accepted::NewEpoch;
            }
            // The first entry this process hears of: the stream starts here.
            self.epoch = delivery.epoch;
            self.through = delivery.offset.saturating_sub(1);
        }
        if delivery.offset <= self.through {
            return Accepted::Nothing { gap: false };
        }
        if delivery.offset > self.through + 1 {
            if self.waiting.len() < MAX_WAITING {
                self.waiting.insert(delivery.offset, delivery);
            }
            let opened = self.gap_since.is_none();
            self.gap_since.get_or_insert_with(Instant::now);
            return Accepted::Nothing { gap: opened };
        }
        self.through = delivery.offset;
        let mut out = vec![delivery];
        out.extend(self.release());
        Accepted::HandOut(out)
    }

    /// Entries read from the store for a gap, in ascending offset, complete up to
    /// `complete` (an offset with no entry there was not stored: a TTL-0 push, or one
    /// collapsed or expired since). Returns what to hand out, in order.
    pub(super) fn fill(
        &mut self,
        epoch: u64,
        entries: Vec<SharedDelivery>,
        complete: u64,
    ) -> Vec<SharedDelivery> {
        if epoch != self.epoch {
            return Vec::new();
        }
        for entry in entries {
            if entry.offset > self.through {
                // One waiting (handed over live) is the same entry.
                self.waiting.entry(entry.offset).or_insert(entry);
            }
        }
        let mut out = Vec::new();
        while let Some(entry) = self.waiting.first_entry() {
            let offset = *entry.key();
            if offset > complete && offset != self.through + 1 {
                break;
            }
            let delivery = entry.remove();
            if offset > self.through {
                self.through = offset;
                out.push(delivery);
            }
        }
        self.through = self.through.max(complete);
        out.extend(self.release());
        out
    }

    /// The waiting entries that are next in line now.
    fn release(&mut self) -> Vec<SharedDelivery> {
        let mut out = Vec::new();
        while let Some(entry) = self.waiting.first_entry() {
            let offset = *entry.key();
            if offset <= self.through {
                entry.remove();
            } else if offset == self.through + 1 {
                self.through = offset;
                out.push(entry.remove());
            } else {
                break;
            }
        }
        if self.waiting.is_empty() {
            self.gap_since = None;
        }
        out
    }

    /// Starts the stream over in `epoch` at `head` (it was recreated, or this process
    /// learns of it for the first time): the old epoch is retired.
    pub(super) fn restart(&mut self, epoch: u64, head: u64) {
        if self.epoch != 0 && self.epoch != epoch {
            if self.retired.len() >= RETIRED_EPOCHS {
                self.retired.remove(0);
            }
            self.retired.push(self.epoch);
        }
        self.epoch = epoch;
        self.through = head;
        self.waiting.clear();
        self.gap_since = None;
        self.pacing.clear();
    }

    /// Whether a gap has been open since before `before`.
    pub(super) fn gap_open_since(&self, before: Instant) -> bool {
        self.gap_since.is_some_and(|since| since <= before)
    }

    /// Whether `epoch` was replaced here.
    pub(super) fn is_retired(&self, epoch: u64) -> bool {
        self.retired.contains(&epoch)
    }

    /// The one copy of the tag name `name`.
    pub(super) fn tag_name(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(name);
        self.names.insert(name.clone());
        name
    }

    /// Adds a connection to the index of each of its tags.
    pub(super) fn index(&mut self, connection: &Arc<Connection>, tags: &[(Arc<str>, u64)]) {
        for (name, _) in tags {
            self.by_tag
                .entry(name.clone())
                .or_default()
                .insert(connection.id(), connection.clone());
        }
    }

    /// Takes a connection out of the index of each of `tags`.
    pub(super) fn unindex(&mut self, id: u64, tags: &[(Arc<str>, u64)]) {
        for (name, _) in tags {
            if let Some(members) = self.by_tag.get_mut(name) {
                members.remove(&id);
                if members.is_empty() {
                    self.by_tag.remove(name);
                    self.names.remove(name);
                }
            }
        }
    }

    /// The connections that may be what `filter` asks for, when the index can narrow them
    /// down (`None`: any connection of the app may be): the union of the `any` tags'
    /// members, or else the members of the smallest `all` tag.
    pub(super) fn candidates(&self, filter: &TagFilter) -> Option<Vec<Arc<Connection>>> {
        if !filter.any.is_empty() {
            let lists: Vec<_> = filter
                .any
                .iter()
                .filter_map(|tag| self.by_tag.get(tag.as_str()))
                .collect();
            if let [only] = lists.as_slice() {
                return Some(only.values().cloned().collect());
            }
            let mut seen = HashSet::new();
            let union = lists
                .into_iter()
                .flat_map(|members| members.iter())
                .filter(|(id, _)| seen.insert(**id))
                .map(|(_, connection)| connection.clone())
                .collect();
            return Some(union);
        }
        if !filter.all.is_empty() {
            let mut smallest: Option<&HashMap<u64, Arc<Connection>>> = None;
            for tag in &filter.all {
                let Some(members) = self.by_tag.get(tag.as_str()) else {
                    return Some(Vec::new());
                };
                if smallest.is_none_or(|best| members.len() < best.len()) {
                    smallest = Some(members);
                }
            }
            return Some(smallest.map_or_else(Vec::new, |m| m.values().cloned().collect()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::Bytes;
    use pigeon_proto::device::Priority;

    fn entry(epoch: u64, offset: u64) -> SharedDelivery {
        SharedDelivery {
            stream: "all",
            epoch,
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
                filter: None,
            }),
        }
    }

    fn offsets(accepted: Accepted) -> Vec<u64> {
        match accepted {
            Accepted::HandOut(out) => out.iter().map(|entry| entry.offset).collect(),
            Accepted::Nothing { .. } => Vec::new(),
            Accepted::NewEpoch => vec![u64::MAX],
        }
    }

    #[test]
    fn entries_are_handed_out_in_order_once() {
        let mut state = StreamState::default();
        state.restart(7, 10);
        assert_eq!(offsets(state.accept(entry(7, 11))), [11]);
        // 13 overtook 12: it waits.
        assert!(matches!(
            state.accept(entry(7, 13)),
            Accepted::Nothing { gap: true }
        ));
        assert!(matches!(
            state.accept(entry(7, 14)),
            Accepted::Nothing { gap: false }
        ));
        assert!(state.gap_open_since(Instant::now()));
        assert_eq!(offsets(state.accept(entry(7, 12))), [12, 13, 14]);
        assert!(!state.gap_open_since(Instant::now()));
        // Again (live and from the store): nothing.
        assert!(offsets(state.accept(entry(7, 13))).is_empty());
    }

    #[test]
    fn a_fill_closes_a_gap_whose_entry_never_comes() {
        let mut state = StreamState::default();
        state.restart(7, 0);
        assert!(offsets(state.accept(entry(7, 3))).is_empty());
        // Offset 1 is in the store; 2 was a TTL-0 push whose hand-off was lost (not stored).
        let out = state.fill(7, vec![entry(7, 1)], 3);
        assert_eq!(out.iter().map(|e| e.offset).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(state.through, 3);
        // A fill of an epoch that is no longer the stream's does nothing.
        assert!(state.fill(8, vec![entry(8, 4)], 4).is_empty());
    }

    #[test]
    fn a_new_epoch_is_reported_and_an_old_one_ignored_after() {
        let mut state = StreamState::default();
        state.restart(7, 5);
        assert!(matches!(state.accept(entry(9, 1)), Accepted::NewEpoch));
        state.restart(9, 0);
        assert!(state.is_retired(7));
        assert!(offsets(state.accept(entry(7, 6))).is_empty());
        assert_eq!(offsets(state.accept(entry(9, 1))), [1]);
    }

    #[test]
    fn the_first_entry_heard_of_starts_the_stream() {
        let mut state = StreamState::default();
        assert_eq!(offsets(state.accept(entry(7, 40))), [40]);
        assert_eq!(state.epoch, 7);
    }
}
