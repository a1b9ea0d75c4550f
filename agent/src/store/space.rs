//! Where a new segment file comes from: allocated, or made by evicting the oldest records.
//!
//! What it guarantees:
//! - The store's files stay within `store.max_size_mib` (whole segments; the state file and
//!   kept copies of damaged files count too); at the budget the oldest records are evicted
//!   (`size_budget`), as a bounded buffer must.
//! - A segment is only allocated while the file system keeps `RESERVE_BYTES` free after it,
//!   room for the small files (state, unreported numbers) that must still be written.
//! - **Space taken by another process does not evict the backlog**: when the file system has
//!   no room for a segment, new events are refused (numbered and reported `rejected`) for
//!   `FULL_GRACE`; only a disk still full after that makes the store live within what it has,
//!   by evicting its oldest records (`disk_full`). Appends resume as soon as there is room,
//!   in the same process.

use std::path::Path;
use std::time::{Duration, Instant};

pub const RESERVE_BYTES: u64 = 2 << 20;
pub const FULL_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Allocate a new segment.
    Allocate,
    /// Evict the oldest segment's records and reuse it, for this reason.
    Evict(&'static str),
    /// Refuse the events: the disk is full and the grace has not run out.
    Refuse,
}

#[derive(Debug, Default)]
pub struct Space {
    full_since: Option<Instant>,
    alarmed: bool,
}

/// Bytes free for this user on the file system holding `path` (u64::MAX if unknown).
/// The smallest file system a store of `budget` bytes can work on: its journal's segments and
/// the free space it always keeps.
pub fn room_needed(budget: u64) -> u64 {
    let segment = super::QueueOptions {
        path: Default::default(),
        max_disk_bytes: budget,
        max_age: std::time::Duration::ZERO,
        commit_interval: std::time::Duration::ZERO,
    }
    .segment_bytes();
    super::queue::JOURNAL_FILES as u64 * segment + RESERVE_BYTES
}

/// Whether the file system holding `path` (or its nearest existing ancestor) can ever hold a
/// store of `budget` bytes: on a smaller one every event would be refused.
pub fn check_room(path: &Path, budget: u64) -> Result<(), String> {
    let mut at = Some(path);
    while let Some(p) = at {
        if p.exists() {
            #[allow(clippy::unnecessary_cast)]
            let total = nix::sys::statvfs::statvfs(p)
                .map(|s| s.blocks() as u64 * s.fragment_size() as u64)
                .map_err(|e| e.desc().to_string())?;
            let need = room_needed(budget);
            return if total < need {
                Err(format!(
                    "the file system of {} holds {:.1} MiB in all; a store of store.max_size_mib = {} needs at least {:.1} MiB (its journal's segments and {} MiB kept free): every event would be refused (a bigger file system, or a smaller store.max_size_mib)",
                    path.display(),
                    total as f64 / 1048576.0,
                    budget >> 20,
                    need as f64 / 1048576.0,
                    RESERVE_BYTES >> 20
                ))
            } else {
                Ok(())
            };
        }
        at = p.parent();
    }
    Ok(())
}

pub fn free_bytes(path: &Path) -> u64 {
    // The casts are needed on armhf, where both counts are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
        .unwrap_or(u64::MAX)
}

impl Space {
    /// Decides where the next segment (of `segment` bytes) comes from, for a store using
    /// `used` bytes of its `budget`, with `free` bytes free on its file system.
    pub fn decide(&mut self, used: u64, budget: u64, segment: u64, free: u64) -> Room {
        if used.saturating_add(segment) > budget {
            return Room::Evict("size_budget");
        }
        if free >= segment.saturating_add(RESERVE_BYTES) {
            if self.full_since.take().is_some() {
                tracing::info!("store: disk space is back");
            }
            self.alarmed = false;
            return Room::Allocate;
        }
        self.full(free, used)
    }

    /// The disk refused an allocation (or has no room for one).
    pub fn full(&mut self, free: u64, used: u64) -> Room {
        let since = *self.full_since.get_or_insert_with(Instant::now);
        if !self.alarmed {
            self.alarmed = true;
            tracing::error!(
                free_bytes = free,
                store_bytes = used,
                "ALARM: the store's filesystem is nearly full: new events are refused (reported `rejected`) for {} s, then the oldest are evicted (disk_full) to make room; free space on it",
                FULL_GRACE.as_secs()
            );
        }
        if since.elapsed() >= FULL_GRACE {
            Room::Evict("disk_full")
        } else {
            Room::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_refuses_for_the_grace_then_evicts_and_the_budget_evicts_at_once() {
        let mut s = Space::default();
        let mib = 1 << 20;
        assert_eq!(s.decide(10 * mib, 16 * mib, mib, 100 * mib), Room::Allocate);
        assert_eq!(
            s.decide(16 * mib, 16 * mib, mib, 100 * mib),
            Room::Evict("size_budget")
        );
        assert_eq!(s.decide(4 * mib, 16 * mib, mib, 2 * mib), Room::Refuse);
        s.full_since = Some(Instant::now() - FULL_GRACE);
        assert_eq!(
            s.decide(4 * mib, 16 * mib, mib, 2 * mib),
            Room::Evict("disk_full")
        );
        assert_eq!(s.decide(4 * mib, 16 * mib, mib, 100 * mib), Room::Allocate);
        assert_eq!(
            s.decide(4 * mib, 16 * mib, mib, 2 * mib),
            Room::Refuse,
            "space came back: a new episode starts with the grace"
        );
    }
}

#[cfg(test)]
mod room_tests {
    use super::*;

    #[test]
    fn a_small_store_needs_less_room_than_a_large_one_and_never_less_than_its_reserve() {
        let small = room_needed(16 << 20);
        let large = room_needed(256 << 20);
        assert!(small >= RESERVE_BYTES + 3 * (1 << 20), "{small}");
        assert!(large > small, "{large} {small}");
        assert_eq!(large, 3 * (4 << 20) + RESERVE_BYTES);
        assert!(check_room(Path::new("/"), 16 << 20).is_ok());
    }
}
