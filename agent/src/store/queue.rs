//! The durable queue: append, read from a cursor, acknowledge up to a sequence number.
//!
//! What it guarantees (README § Store-and-forward says it for operators):
//! - An event is **accepted** once `append` returned: it is in the page cache, numbered, and
//!   survives a killed process. It is on stable storage after the next commit
//!   (`store.commit_interval`) unless the broker acknowledged it first; a power cut loses at
//!   most the last commit interval of events not yet acknowledged, reported lost at start.
//! - Numbers are never reused (module `numbering`), records are read back in number order,
//!   and every number leaves the queue acknowledged, or reported lost by range (evicted,
//!   refused, damaged).
//! - With the backhaul up, records acknowledged within a commit interval are never synced:
//!   the log (module `log`) is a ring of a few segment files rewritten in the page cache.
//!
//! The pieces: `log` (records), `numbering` (the numbers), `unreported` (losses not yet told),
//! `space` (where a segment comes from), `state` (other stages' values), `recovery` (opening).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use super::log::{record_size, Log};
use super::numbering::Numbering;
use super::space::{free_bytes, Room, Space};
use super::state::State;
use super::unreported::{Ledger, Unreported};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store at {0} is in use by another process")]
    Locked(PathBuf),
    /// `store.path` names something that is not a lora-edge store: never touched.
    #[error("store.path {0}: {1}")]
    NotAStore(PathBuf, String),
    #[error("cannot create the store directory {0}: {1}")]
    CannotCreate(PathBuf, String),
    #[error("the store directory {0} {1}")]
    NotWritable(PathBuf, String),
    #[error("the store's filesystem is full ({free} bytes free): events refused for now")]
    DiskFull { free: u64 },
}

impl StoreError {
    /// A mistake in the configuration or the installation, not a state of the store: the agent
    /// refuses to start (exit status 2) rather than retrying or moving anything.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            StoreError::NotAStore(..) | StoreError::CannotCreate(..) | StoreError::NotWritable(..)
        )
    }
}

#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub path: PathBuf,
    /// Budget for the store directory on disk.
    pub max_disk_bytes: u64,
    pub max_age: Duration,
    pub commit_interval: Duration,
}

impl QueueOptions {
    /// Segment files: 1/64 of the budget, between 1 and 64 MiB, so that a budget is a few
    /// dozen files and eviction frees a small share of it.
    pub fn segment_bytes(&self) -> u64 {
        let mib = 1 << 20;
        ((self.max_disk_bytes / 64) / mib).clamp(1, 64) * mib
    }
}

/// Files kept and reused even when empty: the journal the broker's acknowledgements keep in
/// place while the backhaul is up.
pub const JOURNAL_FILES: usize = 3;

/// What the caller appends.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub kind: u8,
    pub flags: u8,
    /// Wall-clock time the event happened (ms since the Unix epoch).
    pub at_ms: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub kind: u8,
    pub flags: u8,
    pub at_ms: u64,
    pub payload: Vec<u8>,
}

/// Records removed unsent, reported exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Eviction {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub bytes: u64,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    pub oldest_at_ms: Option<u64>,
}

/// Accepted sequence numbers the store no longer held when it was opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub first_seq: u64,
    pub last_seq: u64,
    /// `store_corrupt` (damaged records), `store_rollback` (records a power cut took),
    /// `store_missing` (the store was deleted).
    pub reason: &'static str,
}

/// How the store was found at start.
#[derive(Debug, Clone, PartialEq)]
pub enum Opened {
    Clean,
    /// Some records were damaged: the sound ones were kept, the damaged ones reported lost
    /// (`lost_at_open`), and a copy of each damaged file kept for inspection.
    Damaged {
        copies: Vec<PathBuf>,
        why: String,
    },
}

/// The queue's state, behind one lock: appends, reads and acknowledgements are page-cache
/// operations; syncs happen outside it.
pub(super) struct Inner {
    pub(super) log: Log,
    pub(super) numbering: Numbering,
    pub(super) unreported: Unreported,
    pub(super) ledger: Ledger,
    /// Changed since the file was last fsynced.
    pub(super) unreported_unsynced: bool,
    /// Changed since the file was last written (a write that failed on a full disk).
    pub(super) unreported_unsaved: bool,
    pub(super) state: State,
    pub(super) next_seq: u64,
    pub(super) acked: u64,
    pub(super) space: Space,
    /// Bytes of kept copies of damaged files (counted in the budget).
    pub(super) damaged_copies_bytes: u64,
    /// Numbers found damaged when read, already reported.
    pub(super) damaged_read: std::collections::BTreeSet<u64>,
}

pub struct Queue {
    pub(super) opts: QueueOptions,
    pub(super) inner: Mutex<Inner>,
    pub(super) lost_at_open: Vec<Loss>,
    pub(super) numbering_damaged: bool,
    /// Held for the queue's life: a second agent on the same store is refused.
    pub(super) _lock: nix::fcntl::Flock<File>,
    /// Where tests keep the segment files as of their last sync (`witness_synced`).
    #[cfg(test)]
    pub(super) witness: Mutex<Option<PathBuf>>,
    /// Wakes the commit thread when there is something to sync.
    pub(super) bell: super::commit::CommitBell,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

impl Queue {
    pub(super) fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepted sequence numbers that the store had lost when it was opened (reported through
    /// the eviction notices too).
    pub fn lost_at_open(&self) -> &[Loss] {
        &self.lost_at_open
    }

    /// True if the numbering file was unreadable at start: the store's own numbering was
    /// continued, which a rolled-back store may repeat.
    pub fn numbering_damaged(&self) -> bool {
        self.numbering_damaged
    }

    /// The sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.inner().next_seq
    }

    /// Everything up to here has been acknowledged and removed.
    pub fn acked(&self) -> u64 {
        self.inner().acked
    }

    pub fn evicted_total(&self) -> u64 {
        self.inner().unreported.evicted_total
    }

    /// Appends (accepted: in the page cache) and returns the sequence numbers given, after
    /// evicting the oldest records if the budget or a lasting full disk requires it. Nothing
    /// is appended if the disk has no room (`DiskFull`): the caller numbers the events lost
    /// (`reject`).
    pub fn append(
        &self,
        records: &[NewRecord],
    ) -> Result<(std::ops::RangeInclusive<u64>, Vec<Eviction>), StoreError> {
        let mut inner = self.inner();
        let evictions = self.make_room(&mut inner, records)?;
        Ok((Self::write(&mut inner, records)?, evictions))
    }

    /// Numbers and writes records the room was made for: the numbers are reserved (fsynced)
    /// before, marked issued after.
    fn write(
        g: &mut Inner,
        records: &[NewRecord],
    ) -> Result<std::ops::RangeInclusive<u64>, StoreError> {
        let first = g.next_seq;
        let top = first + records.len() as u64 - 1;
        g.numbering.reserve(top).map_err(io)?;
        g.log.append(first, records).map_err(io)?;
        g.next_seq = top + 1;
        g.numbering.issued(top).map_err(io)?;
        Ok(first..=top)
    }

    /// Makes the spare segments the records need ready: allocated, or freed by evicting the
    /// oldest records (module `space`).
    fn make_room(
        &self,
        inner: &mut Inner,
        records: &[NewRecord],
    ) -> Result<Vec<Eviction>, StoreError> {
        let sizes: Vec<u64> = records
            .iter()
            .map(|r| record_size(r.payload.len()))
            .collect();
        let mut evictions = Vec::new();
        let segment = inner.log.segment_bytes();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        while inner.log.spare_count() < inner.log.files_needed(&sizes) {
            let used = self.used(inner);
            let free = free_bytes(&self.opts.path);
            let room = inner
                .space
                .decide(used, self.opts.max_disk_bytes, segment, free);
            let room = match room {
                Room::Allocate => match inner.log.allocate(largest) {
                    Ok(()) => continue,
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => {
                        inner.space.full(free_bytes(&self.opts.path), used)
                    }
                    Err(e) => return Err(io(e)),
                },
                other => other,
            };
            match room {
                Room::Allocate => unreachable!("handled above"),
                Room::Refuse => {
                    return Err(StoreError::DiskFull {
                        free: free_bytes(&self.opts.path),
                    })
                }
                Room::Evict(reason) => match self.evict_oldest_file(inner, reason)? {
                    Some(e) => evictions.push(e),
                    None => {
                        // Nothing left to evict: the budget or the disk is smaller than what
                        // this batch needs.
                        return Err(StoreError::DiskFull {
                            free: free_bytes(&self.opts.path),
                        });
                    }
                },
            }
        }
        Ok(evictions)
    }

    /// The bytes the store's directory holds against its budget.
    fn used(&self, inner: &Inner) -> u64 {
        inner.log.allocated()
            + inner.state.disk_bytes()
            + inner.ledger.disk_bytes()
            + inner.damaged_copies_bytes
    }

    /// Evicts every record of the oldest file holding some, so that the file can be reused.
    fn evict_oldest_file(
        &self,
        inner: &mut Inner,
        reason: &'static str,
    ) -> Result<Option<Eviction>, StoreError> {
        let Some(last) = inner.log.oldest_file_last_seq() else {
            return Ok(None);
        };
        Ok(self.evict_upto(inner, last, reason))
    }

    /// Drops the records up to `last` unsent and counts them as reported-to-be: the numbers
    /// are written (fsynced) to the unreported file before their file can be reused.
    fn evict_upto(&self, inner: &mut Inner, last: u64, reason: &'static str) -> Option<Eviction> {
        let cut = inner.log.drop_upto_releasing_head(last)?;
        let e = Eviction {
            first_seq: cut.first_seq,
            last_seq: cut.last_seq,
            records: cut.records,
            bytes: cut.bytes,
            reason,
        };
        inner.unreported.evicted_total += cut.records;
        // Evicted records count as done: a later ack below them changes nothing.
        inner.acked = inner.acked.max(last);
        inner.unreported.add(&e);
        inner.unreported.done = inner.unreported.done.max(last);
        inner.unreported.settle(inner.acked);
        self.save_unreported(inner, true);
        Some(e)
    }

    /// Writes the unreported file; a failure (a full disk) is retried at the next commit.
    fn save_unreported(&self, inner: &mut Inner, durable: bool) {
        let g = &mut *inner;
        match g.ledger.save(&g.unreported, durable) {
            Ok(()) => {
                inner.unreported_unsaved = false;
                inner.unreported_unsynced = !durable;
            }
            Err(e) => {
                inner.unreported_unsaved = true;
                inner.unreported_unsynced = true;
                tracing::debug!(error = %e, "store: the unreported numbers were not written; retried at the next commit");
            }
        }
    }

    /// Events that could not be stored (the disk refused them): they get the next `count`
    /// numbers all the same, reported lost (`rejected`) like evictions, so that the centre
    /// learns exactly what is missing.
    pub fn reject(&self, count: u64) -> Option<Eviction> {
        if count == 0 {
            return None;
        }
        let mut inner = self.inner();
        let first = inner.next_seq;
        let last = first + count - 1;
        // Page cache and in-place writes: these work on a full disk.
        if inner
            .numbering
            .reserve(last)
            .and_then(|_| inner.numbering.issued(last))
            .is_err()
        {
            return None;
        }
        inner.next_seq = last + 1;
        let e = Eviction {
            first_seq: first,
            last_seq: last,
            records: count,
            bytes: 0,
            reason: "rejected",
        };
        inner.unreported.add(&e);
        inner.unreported.never_stored(first, last);
        self.save_unreported(&mut inner, false);
        Some(e)
    }

    /// Up to `max` records with a sequence number of `from` or more, oldest first. A record
    /// found damaged is skipped and reported lost (`store_corrupt`).
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Record>, StoreError> {
        let mut inner = self.inner();
        let (records, damaged) = inner.log.read_from(from, max);
        let mut reported = false;
        for seq in damaged {
            if inner.damaged_read.insert(seq) {
                tracing::error!(
                    seq,
                    "ALARM: a stored event is damaged (its CRC does not hold); it is reported lost"
                );
                inner.unreported.add(&Eviction {
                    first_seq: seq,
                    last_seq: seq,
                    records: 1,
                    bytes: 0,
                    reason: "store_corrupt",
                });
                reported = true;
            }
        }
        if reported {
            self.save_unreported(&mut inner, false);
        }
        Ok(records)
    }

    /// Removes every record up to `seq` included: the broker has them.
    pub fn ack_upto(&self, seq: u64) -> Result<(), StoreError> {
        let mut inner = self.inner();
        if seq <= inner.acked {
            return Ok(());
        }
        let acked = seq.min(inner.next_seq - 1);
        inner.acked = acked;
        inner.log.drop_upto(acked);
        inner.log.trim_spares();
        inner.numbering.acked(acked).map_err(io)?;
        let settled = inner.unreported.in_flight.keys().any(|s| *s <= acked)
            || inner.unreported.never_stored.iter().any(|r| r.1 <= acked);
        inner.unreported.settle(acked);
        if settled {
            self.save_unreported(&mut inner, false);
        }
        Ok(())
    }

    /// Drops records accepted before `now_ms - max_age`.
    pub fn evict_expired(&self, now_ms: u64) -> Result<Option<Eviction>, StoreError> {
        let cutoff = now_ms.saturating_sub(self.opts.max_age.as_millis() as u64);
        let mut inner = self.inner();
        let Some(last) = inner.log.last_seq_while(|at_ms| at_ms < cutoff) else {
            return Ok(None);
        };
        Ok(self.evict_upto(&mut inner, last, "max_age"))
    }

    /// The evictions the centre has not been told about yet.
    #[cfg(test)]
    pub(super) fn unreported_evictions(&self) -> Unreported {
        self.inner().unreported.clone()
    }

    /// Appends the notice `make` builds for the unreported evictions, if there are any, and
    /// counts them as reported. Returns the notice's sequence number.
    pub fn report_evictions(
        &self,
        make: impl Fn(&Unreported) -> NewRecord,
    ) -> Result<Option<u64>, StoreError> {
        let mut inner = self.inner();
        if inner.unreported.ranges.is_empty() {
            return Ok(None);
        }
        // Making room for the notice may evict: then it is built again, to carry those too.
        let notice = loop {
            let notice = make(&inner.unreported);
            if self
                .make_room(&mut inner, std::slice::from_ref(&notice))?
                .is_empty()
            {
                break notice;
            }
        };
        let g = &mut *inner;
        let seq = *Self::write(g, std::slice::from_ref(&notice))?.start();
        let ranges = std::mem::take(&mut g.unreported.ranges);
        g.unreported.records = 0;
        g.unreported.bytes = 0;
        g.unreported.reasons.clear();
        g.unreported.in_flight.insert(seq, ranges);
        self.save_unreported(&mut inner, false);
        Ok(Some(seq))
    }

    pub fn backlog(&self) -> Backlog {
        let inner = self.inner();
        Backlog {
            records: inner.log.records(),
            bytes: inner.log.bytes(),
            oldest_at_ms: inner.log.oldest_at_ms(),
        }
    }

    /// The store's size on disk: its files against its budget.
    pub fn disk_bytes(&self) -> u64 {
        let inner = self.inner();
        self.used(&inner)
    }

    /// A small durable value of another stage (the rules' frame counters, latches, lockouts and
    /// start history): kept across a kill once this returns, across a power cut after the next
    /// commit (module `state`).
    pub fn state_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner().state.put(key, value).map_err(io)?;
        self.bell.ring_later();
        Ok(())
    }

    /// Whether a commit would sync anything: records the broker has not acknowledged, the
    /// state, the unreported numbers.
    pub fn needs_commit(&self) -> bool {
        let inner = self.inner();
        inner.log.has_unsynced(inner.acked)
            || inner.state.is_unsynced()
            || inner.unreported_unsynced
            || inner.unreported_unsaved
    }

    /// Has the commit thread sync now (`needs_commit` said so).
    pub fn commit_soon(&self) {
        self.bell.ring_now();
    }

    /// The commit thread's wait: true when a commit is wanted, false once `close_commits`.
    pub fn wait_commit(&self) -> bool {
        self.bell.wait(self.opts.commit_interval)
    }

    pub fn close_commits(&self) {
        self.bell.close();
    }

    pub fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner().state.get(key))
    }

    /// The periodic commit (every `store.commit_interval`): fdatasyncs the files holding
    /// records the broker has not acknowledged, the state if it changed, and the unreported
    /// numbers. Returns how many files were synced.
    pub fn commit(&self) -> Result<usize, StoreError> {
        self.sync_files(false)
    }

    /// Syncs what the commit would (`all`: every file written since its last sync, whatever
    /// it holds), outside the queue's lock.
    fn sync_files(&self, all: bool) -> Result<usize, StoreError> {
        let (files, state) = {
            let mut inner = self.inner();
            let bound = if all { 0 } else { inner.acked };
            let files = inner.log.take_unsynced(bound);
            let state = inner.state.take_unsynced();
            if all || inner.unreported_unsynced || inner.unreported_unsaved {
                self.save_unreported(&mut inner, true);
            }
            (files, state)
        };
        for (_path, f) in &files {
            f.sync_data().map_err(io)?;
            #[cfg(test)]
            self.witness_synced(_path);
        }
        if let Some(s) = &state {
            s.sync_data().map_err(io)?;
        }
        Ok(files.len() + state.is_some() as usize)
    }

    /// Tests see what a power cut would keep: a copy of each segment file as of its last sync.
    #[cfg(test)]
    fn witness_synced(&self, path: &std::path::Path) {
        if let Some(dir) = self.witness.lock().unwrap().as_ref() {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }

    /// Forces everything to stable storage (used at shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.sync_files(true)?;
        // Every number handed out is in the store now: the next start continues right after
        // the last one instead of after the reservation.
        let mut inner = self.inner();
        let issued = inner.next_seq - 1;
        inner.numbering.settle(issued).map_err(io)?;
        Ok(())
    }
}
