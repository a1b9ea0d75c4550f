//! Numbers the centre must hear of as lost, and the numbers below which the log holds
//! nothing to send, in one small file (`<store>/unreported`).
//!
//! What it guarantees:
//! - Written **in place** into a file allocated once (two slots, each with a generation and a
//!   CRC, written alternately): saving needs no new block, so it works on a full disk, and a
//!   torn or damaged slot leaves the other one.
//! - `fsync`ed before an evicted segment is reused (so a power cut cannot bring back evicted
//!   records that were reported lost) and at the next commit otherwise.
//! - A file whose two slots are unreadable is reported as damage at start; the recovery then
//!   reports the log's gaps lost instead of trusting a watermark it cannot read.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::queue::Eviction;

pub const FILE: &str = "unreported";
const MAGIC: [u8; 4] = *b"LEu1";
/// magic, generation (8), length (4), CRC (4).
const SLOT_HEADER: usize = 4 + 8 + 4 + 4;
const SLOT: u64 = 64 * 1024;

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
    /// Records evicted over the store's life (`store_evicted_total`), kept across restarts.
    #[serde(default)]
    pub(super) evicted_total: u64,
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

/// The file and the generation of its newest slot.
pub(super) struct Ledger {
    path: PathBuf,
    file: Option<File>,
    generation: u64,
}

fn slot_of(b: &[u8]) -> Option<(u64, Unreported)> {
    if b.len() < SLOT_HEADER || b[0..4] != MAGIC {
        return None;
    }
    let generation = u64::from_be_bytes(b[4..12].try_into().ok()?);
    let len = u32::from_be_bytes(b[12..16].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(b[16..20].try_into().ok()?);
    let body = b.get(SLOT_HEADER..SLOT_HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((generation, serde_json::from_slice(body).ok()?))
}

impl Ledger {
    pub fn path_for(store: &Path) -> PathBuf {
        store.join(FILE)
    }

    /// Opens the file: the newest sound slot (None if there is no file yet), or Err if the file
    /// exists and neither slot can be read.
    pub fn open(store: &Path) -> (Ledger, Result<Option<Unreported>, String>) {
        let path = Self::path_for(store);
        let mut ledger = Ledger {
            path: path.clone(),
            file: None,
            generation: 0,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (ledger, Ok(None)),
            Err(e) => return (ledger, Err(format!("{FILE}: {e}"))),
        };
        ledger.file = OpenOptions::new().read(true).write(true).open(&path).ok();
        let slots = [0, SLOT as usize].map(|at| bytes.get(at..).and_then(slot_of));
        let newest = slots.into_iter().flatten().max_by_key(|(g, _)| *g);
        match newest {
            Some((g, u)) => {
                ledger.generation = g;
                (ledger, Ok(Some(u)))
            }
            None => (
                ledger,
                Err(format!(
                    "{FILE}: neither copy is readable (damaged); the gaps it described are reported lost"
                )),
            ),
        }
    }

    /// Writes `u` into the older slot; with `durable`, fdatasyncs it. The file is allocated the
    /// first time (which is the only time this can fail for want of space).
    pub fn save(&mut self, u: &Unreported, durable: bool) -> io::Result<()> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)?;
            if f.metadata()?.len() < 2 * SLOT {
                use std::os::fd::AsFd;
                nix::fcntl::fallocate(
                    f.as_fd(),
                    nix::fcntl::FallocateFlags::empty(),
                    0,
                    (2 * SLOT) as i64,
                )
                .or_else(|e| match e {
                    nix::errno::Errno::EOPNOTSUPP => f.set_len(2 * SLOT).map_err(|_| e),
                    e => Err(e),
                })
                .map_err(io::Error::from)?;
            }
            self.file = Some(f);
        }
        let body = serde_json::to_vec(u).map_err(io::Error::other)?;
        if (SLOT_HEADER + body.len()) as u64 > SLOT {
            return Err(io::Error::other(format!(
                "{} bytes of unreported ranges: more than a slot holds",
                body.len()
            )));
        }
        let generation = self.generation + 1;
        let mut b = Vec::with_capacity(SLOT_HEADER + body.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&generation.to_be_bytes());
        b.extend_from_slice(&(body.len() as u32).to_be_bytes());
        b.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        b.extend_from_slice(&body);
        let file = self.file.as_ref().expect("opened above");
        file.write_all_at(&b, (generation % 2) * SLOT)?;
        if durable {
            file.sync_data()?;
        }
        self.generation = generation;
        Ok(())
    }

    pub fn disk_bytes(&self) -> u64 {
        if self.file.is_some() {
            2 * SLOT
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_falls_back_to_the_other_copy_and_both_damaged_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut l, got) = Ledger::open(dir.path());
        assert_eq!(got, Ok(None));
        let mut u = Unreported {
            done: 150,
            ..Unreported::default()
        };
        l.save(&u, true).unwrap();
        u.done = 200;
        l.save(&u, false).unwrap();
        let (_, got) = Ledger::open(dir.path());
        assert_eq!(got.unwrap().unwrap().done, 200);
        // "done":200 -> "done":300 in the newest slot: its CRC fails, the older copy is used.
        let path = Ledger::path_for(dir.path());
        let mut b = std::fs::read(&path).unwrap();
        let at = b.windows(10).position(|w| w == b"\"done\":200").unwrap();
        b[at + 7] = b'3';
        std::fs::write(&path, &b).unwrap();
        let (_, got) = Ledger::open(dir.path());
        assert_eq!(got.unwrap().unwrap().done, 150);
        let at = b.windows(10).position(|w| w == b"\"done\":150").unwrap();
        b[at + 7] = b'9';
        std::fs::write(&path, &b).unwrap();
        assert!(Ledger::open(dir.path()).1.unwrap_err().contains("damaged"));
    }
}
