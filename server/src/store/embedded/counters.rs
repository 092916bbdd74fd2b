//! Devices' counters kept out of their records while pushes come.
//!
//! Every push recorded for a device raises its `highest_seq` (and `pending`), every ack
//! raises its `acked_seq`: two writes of its record a push. The `devices` table is keyed by
//! random tokens, so a transaction of a few hundred pushes rewrote most of that table's
//! leaf pages, and those copies were 70% of what the store wrote (BENCHMARKS.md section 6,
//! "What the floor writes").
//!
//! So those changes go to the `counter_log` table instead: one row a change, keyed by a
//! number that only grows, holding the device's token and all five counters. The rows of a
//! transaction land on the log's last pages. The latest counters of each device named in
//! the log are also kept in memory ([`Counters::latest`]), where the writer and the reads
//! of a device's counters take them over what its record says.
//!
//! Now and then (a [`FOLD_INTERVAL`] after the last fold, or at [`FOLD_DEVICES`] devices or
//! [`FOLD_ROWS`] rows) the writer folds the log: one transaction writes the latest counters
//! into the records, in token order, and deletes the log. The store's close folds too.
//!
//! The log is written in the transactions that change the queues, so a crash leaves the
//! two alike. Opening the store folds what a crash left: the last row of each token is that
//! device's counters at the last commit, so `highest_seq` never goes back and no seq is
//! given twice.
//!
//! A record written whole (tags, alias, admission) carries the latest counters too, since
//! the writer reads records through [`Counters::latest`]; only this module's rows change
//! the counters. A token is never given again once its device is gone, so a row left for
//! an unregistered device is dropped when folded (its record is gone).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use pigeon_proto::Message as _;
use pigeon_proto::store::DeviceRecord;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{DEVICES, Result, backend, decode_device};

/// One row a change of a device's counters: its token and [`Counts::to_array`].
pub(super) const COUNTER_LOG: TableDefinition<u64, (&str, [u64; 5])> =
    TableDefinition::new("counter_log");

/// How long after a fold the next one comes at most (once something changes).
pub(super) const FOLD_INTERVAL: Duration = Duration::from_secs(2);
/// Devices kept in memory at most before a fold: what bounds the memory this takes.
pub(super) const FOLD_DEVICES: usize = 100_000;
/// Rows in the log at most before a fold: what bounds what a start after a crash reads.
pub(super) const FOLD_ROWS: u64 = 1_000_000;

/// The counters of one device that change with its pushes and acks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub highest_seq: u64,
    pub acked_seq: u64,
    pub pending: u32,
    pub dropped: u64,
    pub collapsed: u64,
}

impl Counts {
    pub fn of(record: &DeviceRecord) -> Self {
        Self {
            highest_seq: record.highest_seq,
            acked_seq: record.acked_seq,
            pending: record.pending,
            dropped: record.dropped,
            collapsed: record.collapsed,
        }
    }

    pub fn apply(self, record: &mut DeviceRecord) {
        record.highest_seq = self.highest_seq;
        record.acked_seq = self.acked_seq;
        record.pending = self.pending;
        record.dropped = self.dropped;
        record.collapsed = self.collapsed;
    }

    pub fn to_array(self) -> [u64; 5] {
        [
            self.highest_seq,
            self.acked_seq,
            u64::from(self.pending),
            self.dropped,
            self.collapsed,
        ]
    }

    fn from_array([highest_seq, acked_seq, pending, dropped, collapsed]: [u64; 5]) -> Self {
        Self {
            highest_seq,
            acked_seq,
            pending: u32::try_from(pending).unwrap_or(u32::MAX),
            dropped,
            collapsed,
        }
    }
}

/// The latest committed counters of the devices named in the log, shared by the writer
/// (which changes them after each commit) and the reads of a device's counters.
#[derive(Default)]
pub(super) struct Counters {
    latest: Mutex<HashMap<String, Counts>>,
}

impl Counters {
    /// The latest counters of `token` when they are newer than its record.
    pub fn latest(&self, token: &str) -> Option<Counts> {
        self.lock().get(token).copied()
    }

    /// Runs `read` with the map held: a read transaction begun inside it sees every fold
    /// whose counters the map no longer holds.
    pub fn with_latest<T>(&self, read: impl FnOnce(&HashMap<String, Counts>) -> T) -> T {
        read(&self.lock())
    }

    /// How many devices' counters are held.
    pub fn devices(&self) -> usize {
        self.lock().len()
    }

    /// Takes in what a committed transaction staged (`None`: the device is gone).
    pub fn committed(&self, staged: HashMap<String, Option<Counts>>) {
        let mut latest = self.lock();
        for (token, counts) in staged {
            match counts {
                Some(counts) => latest.insert(token, counts),
                None => latest.remove(&token),
            };
        }
    }

    /// Writes every device's latest counters into its record and deletes the log, in
    /// `txn`; the map is emptied once `txn` commits ([`Counters::folded`]).
    pub fn fold(&self, txn: &WriteTransaction) -> Result<()> {
        let mut latest: Vec<(String, Counts)> = self
            .lock()
            .iter()
            .map(|(token, counts)| (token.clone(), *counts))
            .collect();
        latest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        fold_into(txn, &latest)
    }

    /// Forgets what a committed fold wrote into the records.
    pub fn folded(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counts>> {
        // The map is whole at every moment a holder can panic in: a poisoned lock holds
        // good counters.
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes `counts` into the records of their tokens (those still there), then deletes the
/// log.
fn fold_into(txn: &WriteTransaction, counts: &[(String, Counts)]) -> Result<()> {
    {
        let mut devices = txn.open_table(DEVICES).map_err(backend)?;
        for (token, counts) in counts {
            let record = devices.get(token.as_str()).map_err(backend)?;
            let Some(mut record) = record
                .map(|value| decode_device(value.value()))
                .transpose()?
            else {
                continue;
            };
            if Counts::of(&record) == *counts {
                continue;
            }
            counts.apply(&mut record);
            devices
                .insert(token.as_str(), record.encode_to_vec().as_slice())
                .map_err(backend)?;
        }
    }
    txn.delete_table(COUNTER_LOG).map_err(backend)?;
    txn.open_table(COUNTER_LOG).map_err(backend)?;
    Ok(())
}

/// Folds what the log holds (what a crash left) into the records, in `txn`; how many
/// devices' counters it held.
pub(super) fn fold_left(txn: &WriteTransaction) -> Result<usize> {
    let mut latest: HashMap<String, Counts> = HashMap::new();
    {
        let log = txn.open_table(COUNTER_LOG).map_err(backend)?;
        for row in log.iter().map_err(backend)? {
            let (_, value) = row.map_err(backend)?;
            let (token, counts) = value.value();
            latest.insert(token.to_owned(), Counts::from_array(counts));
        }
    }
    let mut latest: Vec<(String, Counts)> = latest.into_iter().collect();
    latest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    fold_into(txn, &latest)?;
    Ok(latest.len())
}

/// What one write transaction changed of the counters: the key of the log's next row, and
/// the counters to take into [`Counters`] once it commits.
pub(super) struct Staged {
    pub next: u64,
    pub counts: HashMap<String, Option<Counts>>,
}

impl Staged {
    pub fn new(next: u64) -> Self {
        Self {
            next,
            counts: HashMap::new(),
        }
    }

    /// The counters of `token` as this transaction left them: `Some(None)` when it removed
    /// the device.
    pub fn get(&self, token: &str) -> Option<Option<Counts>> {
        self.counts.get(token).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_through_a_row() {
        let counts = Counts {
            highest_seq: 9,
            acked_seq: 7,
            pending: 2,
            dropped: 1,
            collapsed: 3,
        };
        assert_eq!(Counts::from_array(counts.to_array()), counts);
        let mut record = DeviceRecord {
            uid: "alice".into(),
            ..DeviceRecord::default()
        };
        counts.apply(&mut record);
        assert_eq!(Counts::of(&record), counts);
        assert_eq!(record.uid, "alice");
    }
}
