//! Numbers the centre must hear of as lost, and the numbers below which the log holds
//! nothing to send, in one small file (`<store>/unreported.json`).
//!
//! What it guarantees: replaced whole (written beside, renamed over), so a kill leaves the old
//! or the new version, never a mix; `fsync`ed before an evicted segment is reused (so a power
//! cut cannot bring back evicted records that were reported lost) and at the next commit
//! otherwise. A file that cannot be read is reported as such at start, and the gaps in the log
//! are then reported lost by the recovery instead.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::queue::Eviction;

const FILE: &str = "unreported.json";

/// Evicted sequence numbers not yet reported to the centre, as sorted, merged ranges.
///
/// During an outage evictions are continuous and merge into one growing range. A notice that
/// is itself evicted before the broker has it gives its ranges back.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Unreported {
    pub ranges: Vec<(u64, u64)>,
    pub records: u64,
    pub bytes: u64,
    pub reasons: Vec<String>,
    /// Notices appended but not yet acknowledged: their seq and the ranges they carry.
    #[serde(default)]
    pub(super) in_flight: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Everything up to here was delivered or evicted: the log's older records are not sent.
    #[serde(default)]
    pub(super) done: u64,
    /// Numbers given to events the disk refused, above `done`: gaps in the log that are not
    /// damage.
    #[serde(default)]
    pub(super) never_stored: Vec<(u64, u64)>,
}

impl Unreported {
    fn add_range(&mut self, first: u64, last: u64) {
        self.ranges = merged(&self.ranges, first, last);
    }

    pub(super) fn add(&mut self, e: &Eviction) {
        self.add_range(e.first_seq, e.last_seq);
        self.records += e.records;
        self.bytes += e.bytes;
        if !self.reasons.iter().any(|r| r == e.reason) {
            self.reasons.push(e.reason.to_string());
        }
        let lost: Vec<u64> = self
            .in_flight
            .range(e.first_seq..=e.last_seq)
            .map(|(k, _)| *k)
            .collect();
        for seq in lost {
            for (a, b) in self.in_flight.remove(&seq).unwrap_or_default() {
                self.add_range(a, b);
            }
        }
    }

    pub(super) fn never_stored(&mut self, first: u64, last: u64) {
        self.never_stored = merged(&self.never_stored, first, last);
    }

    /// Forgets what the broker has: notices acknowledged, refused numbers below `acked`.
    pub(super) fn settle(&mut self, acked: u64) {
        self.done = self.done.max(acked);
        self.in_flight.retain(|seq, _| *seq > acked);
        self.never_stored.retain(|(_, b)| *b > acked);
    }

    pub fn path_for(store: &Path) -> PathBuf {
        store.join(FILE)
    }

    /// Reads the file: Ok(None) if there is none, Err if it cannot be read or parsed.
    pub(super) fn load(store: &Path) -> Result<Option<Unreported>, String> {
        match std::fs::read(Self::path_for(store)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{FILE}: {e}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{FILE}: {e}")),
        }
    }

    /// Replaces the file; with `durable`, also fsyncs it and its directory.
    pub(super) fn save(&self, store: &Path, durable: bool) -> io::Result<()> {
        let path = Self::path_for(store);
        let tmp = store.join(format!("{FILE}.new"));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
        if durable {
            f.sync_data()?;
        }
        drop(f);
        std::fs::rename(&tmp, &path)?;
        if durable {
            File::open(store)?.sync_all()?;
        }
        Ok(())
    }
}

fn merged(ranges: &[(u64, u64)], first: u64, last: u64) -> Vec<(u64, u64)> {
    let mut all = ranges.to_vec();
    all.push((first, last));
    all.sort();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match out.last_mut() {
            Some(m) if a <= m.1.saturating_add(1) => m.1 = m.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}
