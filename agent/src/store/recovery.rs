//! Opening the store: what was found, what is lost, and where the numbering continues.
//!
//! What it guarantees:
//! - Only a lora-edge store, or an empty or missing directory, is opened; nothing else under
//!   `store.path` is touched or moved.
//! - One agent per store (an exclusive lock on `<store>/lock`).
//! - Every sound record above the delivered watermark is kept, whatever damage surrounds it;
//!   every number handed out that the store no longer holds, and that was not already
//!   reported, is reported lost by range (`store_corrupt` if damage was found,
//!   `store_rollback` if a power cut took unsynced records, `store_missing` if the store was
//!   deleted); the numbering continues above every number ever handed out.
//! - A copy of each damaged file is kept in `<store>/damaged/` for inspection: the newest
//!   `DAMAGED_COPIES` only, counted in the budget.
//! - A store written by lora-edge's earlier sled format is carried over, records, numbers and
//!   state, before anything else is written.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::log::Log;
use super::numbering::{Found, Numbering};
use super::queue::{Eviction, Inner, Loss, Opened, Queue, QueueOptions, StoreError, JOURNAL_FILES};
use super::space::Space;
use super::state::State;
use super::unreported::{Ledger, Unreported};

/// Written in the store directory once it holds a store.
const MARKER: &str = "lora-edge-queue";
const MARKER_TEXT: &[u8] = b"lora-edge durable queue, format 3\n";
const DAMAGED_DIR: &str = "damaged";
const DAMAGED_COPIES: usize = 2;

/// Names a lora-edge store directory may hold (format 3), and those of format 2 (sled's).
fn is_ours(name: &str) -> bool {
    matches!(
        name,
        MARKER
            | "log"
            | "lock"
            | DAMAGED_DIR
            | "state.log"
            | "state.log.new"
            | super::unreported::FILE
    ) || is_sled_file(name)
}

fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// Makes sure `path` is a lora-edge store, or an empty or missing directory that can become
/// one, before anything is opened, written or moved there.
pub(super) fn prepare_dir(path: &Path) -> Result<(), StoreError> {
    let not_ours = |why: String| StoreError::NotAStore(path.to_path_buf(), why);
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => Err(not_ours(
            "is a file, not a directory: point store.path at a directory of its own".into(),
        )),
        Ok(_) => {
            let entries: Vec<String> = std::fs::read_dir(path)
                .map_err(|e| not_ours(format!("cannot be read: {e}")))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if entries.iter().any(|n| n == MARKER) || entries.iter().all(|n| is_ours(n)) {
                return writable(path);
            }
            let mut shown: Vec<&str> = entries
                .iter()
                .map(String::as_str)
                .filter(|n| !is_ours(n))
                .take(5)
                .collect();
            shown.sort();
            Err(not_ours(format!(
                "is a directory that holds other things ({}{}) and no lora-edge store: \
                 give the store an empty directory of its own",
                shown.join(", "),
                if entries.len() > 5 { ", …" } else { "" }
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(path)
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!(
                        "permission denied for this user (uid {}); create it as root for the \
                         user lora-edge runs as (`install -d -o <user> {}`), or set store.path \
                         to a directory this user may write",
                        nix::unistd::getuid(),
                        path.display()
                    )
                } else {
                    e.to_string()
                };
                StoreError::CannotCreate(path.to_path_buf(), hint)
            }),
        Err(e) => Err(StoreError::CannotCreate(path.to_path_buf(), e.to_string())),
    }
}

/// A store directory the agent cannot write (a read-only mount, another owner) is a setup
/// error, found before anything is opened.
fn writable(path: &Path) -> Result<(), StoreError> {
    match nix::unistd::access(path, nix::unistd::AccessFlags::W_OK) {
        Ok(()) => Ok(()),
        Err(e) => Err(StoreError::NotWritable(
            path.to_path_buf(),
            format!(
                "cannot be written by this user (uid {}): {}",
                nix::unistd::getuid(),
                if e == nix::errno::Errno::EROFS {
                    "the file system is mounted read-only".to_string()
                } else {
                    e.desc().to_string()
                }
            ),
        )),
    }
}

/// Checks what `open` would refuse before it touches anything: for `lora-edge check`.
pub fn check_path(path: &Path) -> Result<(), String> {
    // The numbering file beside the store: writable if there, creatable if not.
    let seq = Numbering::path_for(path);
    let seq_ok = match std::fs::metadata(&seq) {
        Ok(m) if !m.is_file() => Err("is not a regular file".to_string()),
        Ok(_) => nix::unistd::access(&seq, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::R_OK)
            .map_err(|e| format!("cannot be written by this user (uid {}): {}", nix::unistd::getuid(), e.desc())),
        Err(_) => match seq.parent().filter(|p| p.exists()) {
            Some(dir) => writable(dir).map_err(|_| {
                format!(
                    "cannot be created: {} is not writable by this user (uid {}); create the file as root for that user (`install -o <user> -m 0600 /dev/null {}`)",
                    dir.display(),
                    nix::unistd::getuid(),
                    seq.display()
                )
            }),
            None => Ok(()),
        },
    };
    seq_ok.map_err(|why| {
        format!(
            "store.path {}: its numbering file {} {why}",
            path.display(),
            seq.display()
        )
    })?;
    match std::fs::metadata(path) {
        Ok(_) => prepare_dir(path).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // It will be created: its nearest existing ancestor must be writable.
            let mut up = path.parent();
            while let Some(p) = up {
                if p.exists() {
                    return writable(p).map_err(|_| {
                        format!(
                            "store.path {}: cannot be created: {} is not writable by this user (uid {})",
                            path.display(),
                            p.display(),
                            nix::unistd::getuid()
                        )
                    });
                }
                up = p.parent();
            }
            Ok(())
        }
        Err(e) => Err(format!("store.path {}: {e}", path.display())),
    }
}

fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>, StoreError> {
    let f = File::create(path.join("lock"))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StoreError::Locked(path.to_path_buf()))
}

/// `lo..=hi` less the `taken` ranges (sorted or not).
fn subtract(lo: u64, hi: u64, taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut taken = taken.to_vec();
    taken.sort();
    let mut out = Vec::new();
    let mut at = lo;
    for (a, b) in taken {
        if b < at || a > hi {
            continue;
        }
        if a > at {
            out.push((at, a - 1));
        }
        at = at.max(b.saturating_add(1));
        if at > hi {
            return out;
        }
    }
    if at <= hi {
        out.push((at, hi));
    }
    out
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Copies damaged files into `damaged/`, keeping the newest `DAMAGED_COPIES`; returns the
/// copies made and the bytes the directory holds.
fn keep_copies(store: &Path, damaged: &[PathBuf]) -> (Vec<PathBuf>, u64) {
    let dir = store.join(DAMAGED_DIR);
    let mut copies = Vec::new();
    if !damaged.is_empty() && std::fs::create_dir_all(&dir).is_ok() {
        let stamp = unix_secs();
        for p in damaged.iter().take(DAMAGED_COPIES) {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let to = dir.join(format!("{stamp}-{}", name.unwrap_or_default()));
            if std::fs::copy(p, &to).is_ok() {
                copies.push(to);
            }
        }
    }
    let mut kept: Vec<(std::time::SystemTime, PathBuf, u64)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((m.modified().ok()?, e.path(), m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    kept.sort();
    while kept.len() > DAMAGED_COPIES {
        let (_, p, _) = kept.remove(0);
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    let bytes = kept.iter().map(|k| k.2).sum();
    (copies, bytes)
}

impl Queue {
    /// Opens the store (carrying over an earlier format), keeping every sound record and
    /// reporting what is missing. A store locked by another running agent is an error.
    pub fn open(opts: QueueOptions) -> Result<(Queue, Opened), StoreError> {
        prepare_dir(&opts.path)?;
        let lock = lock(&opts.path)?;
        let seq_path = Numbering::path_for(&opts.path);
        let (mut numbering, found) = Numbering::open(&seq_path).map_err(|e| {
            StoreError::CannotCreate(seq_path.clone(), format!("sequence numbering file: {e}"))
        })?;
        let mut damaged_files: Vec<PathBuf> = Vec::new();
        let mut why: Vec<String> = Vec::new();
        if opts.path.join("db").exists() {
            super::migrate::from_sled(&opts.path, &opts, &mut damaged_files, &mut why)?;
        }
        let marker = opts.path.join(MARKER);
        let created = !marker.exists();
        let (mut ledger, loaded) = Ledger::open(&opts.path);
        let mut ledger_damaged = false;
        let mut unreported = match loaded {
            Ok(None) if !created => {
                // A store of this format always has it: deleted, so what it said is unknown.
                why.push(format!("{}: missing", super::unreported::FILE));
                ledger_damaged = true;
                Unreported::default()
            }
            Ok(u) => u.unwrap_or_default(),
            Err(e) => {
                why.push(e);
                ledger_damaged = true;
                Unreported::default()
            }
        };
        let (marks, numbering_damaged) = match found {
            Found::Marks(m) => (Some(m), false),
            Found::Nothing => (None, false),
            Found::Damaged => (None, true),
        };
        let done = unreported.done.max(marks.map_or(0, |m| m.acked));
        let plausible_top = marks.map_or(u64::MAX, |m| m.reserved.max(m.issued));
        let (mut log, scanned) = Log::open(
            &Log::dir_for(&opts.path),
            opts.segment_bytes(),
            JOURNAL_FILES,
            done,
            plausible_top,
        )?;
        for (p, places) in &scanned.damaged {
            why.push(format!("{}: {places} damaged place(s)", p.display()));
            damaged_files.push(p.clone());
        }
        let state = State::open(&opts.path)?;
        if state.damaged() > 0 {
            why.push(format!(
                "state.log: {} damaged entr(ies) skipped (their previous values are used)",
                state.damaged()
            ));
        }
        // Notices the log no longer holds give their ranges back.
        let held: BTreeSet<u64> = unreported
            .in_flight
            .keys()
            .copied()
            .filter(|s| log.holds(*s))
            .collect();
        let gone: Vec<u64> = unreported
            .in_flight
            .keys()
            .copied()
            .filter(|s| !held.contains(s))
            .collect();
        for seq in gone {
            for (a, b) in unreported.in_flight.remove(&seq).unwrap_or_default() {
                unreported.add(&Eviction {
                    first_seq: a,
                    last_seq: b,
                    records: 0,
                    bytes: 0,
                    reason: "store_corrupt",
                });
            }
        }

        // Every number handed out above `done` is held, or accounted for, or lost.
        let issued = marks.map_or(0, |m| m.issued);
        let top = scanned.top.max(issued);
        let reason = if !damaged_files.is_empty() || ledger_damaged {
            "store_corrupt"
        } else if created {
            "store_missing"
        } else {
            "store_rollback"
        };
        let mut accounted: Vec<(u64, u64)> = unreported.never_stored.clone();
        accounted.extend(unreported.ranges.iter().copied());
        accounted.extend(unreported.in_flight.values().flatten().copied());
        accounted.extend(log.runs_ranges());
        let mut lost_at_open = Vec::new();
        if top > done {
            for (a, b) in subtract(done + 1, top, &accounted) {
                lost_at_open.push(Loss {
                    first_seq: a,
                    last_seq: b,
                    reason,
                });
            }
        }
        for l in &lost_at_open {
            unreported.add(&Eviction {
                first_seq: l.first_seq,
                last_seq: l.last_seq,
                records: l.last_seq - l.first_seq + 1,
                bytes: 0,
                reason: l.reason,
            });
        }

        // Above every number that may have been handed out.
        let next_seq = (scanned.top + 1)
            .max(done + 1)
            .max(marks.map_or(0, |m| m.next_safe()));
        let acked = done.min(next_seq - 1);
        log.drop_upto(acked);
        unreported.settle(acked);
        numbering.reserve(next_seq - 1)?;
        // On a full disk this may fail (the first time only, when the file is allocated):
        // the next commit tries again; the store opens all the same.
        let unsaved = match ledger.save(&unreported, true) {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "store: the unreported numbers could not be written yet; retried at each commit");
                true
            }
        };
        // After the unreported file: a store with the marker always has one.
        if created {
            std::fs::write(&marker, MARKER_TEXT)?;
        }

        let (copies, damaged_copies_bytes) = keep_copies(&opts.path, &damaged_files);
        log.discard_spares(&damaged_files);
        let opened = if why.is_empty() {
            Opened::Clean
        } else {
            Opened::Damaged {
                copies,
                why: why.join("; "),
            }
        };
        let q = Queue {
            bell: Default::default(),
            opts: opts.clone(),
            inner: Mutex::new(Inner {
                log,
                numbering,
                unreported,
                ledger,
                unreported_unsynced: unsaved,
                unreported_unsaved: unsaved,
                state,
                next_seq,
                acked,
                space: Space::default(),
                damaged_copies_bytes,
                damaged_read: BTreeSet::new(),
            }),
            lost_at_open,
            numbering_damaged,
            _lock: lock,
            #[cfg(test)]
            witness: Mutex::new(None),
        };
        Ok((q, opened))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_leaves_what_no_range_covers() {
        assert_eq!(subtract(1, 10, &[]), vec![(1, 10)]);
        assert_eq!(subtract(1, 10, &[(3, 4), (8, 20)]), vec![(1, 2), (5, 7)]);
        assert_eq!(subtract(5, 6, &[(1, 10)]), vec![]);
        assert_eq!(subtract(1, 3, &[(2, 2), (2, 2)]), vec![(1, 1), (3, 3)]);
    }
}
