//! Sequence numbers that never go backwards, whatever happens to the store.
//!
//! The central side drops duplicates by (gateway id, seq): a number handed out twice makes it
//! drop a real frame. The log cannot be trusted to remember the last number: a power cut takes
//! its unsynced tail, damage takes records, and an operator may delete the directory. So the
//! numbering lives in a small file beside the store (`<store.path>.seq`), outside it:
//!
//! - `reserved`: every number up to it may have been handed out. Raised in blocks, written and
//!   **fsynced before** a number of the new block is used, so even a power cut cannot bring it
//!   back below a number in use. A new store, or one rolled back, continues above it.
//! - `issued` and `acked`: the last number the store accepted and the last the broker
//!   acknowledged. Written after each group commit and each acknowledgement **without** fsync:
//!   the page cache survives a killed process (the case that matters: a kill, then damage),
//!   only a power cut can lose the last ones. From them the agent tells, at start, exactly which
//!   accepted numbers a damaged or replaced store no longer holds: `(acked, issued]` minus what
//!   the store still has.
//!
//! At start, the numbering continues right after `issued` when the page cache it was written to
//! is known to be intact (same kernel boot, from `/proc/sys/kernel/random/boot_id`, or a clean
//! shutdown, which fsyncs), and after `reserved` otherwise (a power cut: `issued` may be stale),
//! leaving a gap of never-used numbers rather than risking a repeat.
//!
//! Two slots of 64 bytes, each with a CRC, written alternately with a generation counter: a torn
//! write leaves the other slot, which is never older than the last fsync of `reserved`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"LESQ";
const VERSION: u32 = 1;
const SLOT: u64 = 64;
/// A reservation lasts at least this long at the recent rate (one fsync per block).
const BLOCK_LIFETIME: Duration = Duration::from_secs(30);
const MIN_BLOCK: u64 = 1024;
const MAX_BLOCK: u64 = 1 << 24;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub reserved: u64,
    pub issued: u64,
    pub acked: u64,
    /// The kernel boot the marks were written in (zero: unknown).
    pub boot: [u8; 16],
}

impl Marks {
    /// The first number that can never have been handed out before.
    pub fn next_safe(&self) -> u64 {
        if self.boot != [0; 16] && self.boot == boot_id() {
            self.issued + 1
        } else {
            self.reserved + 1
        }
    }
}

/// This kernel boot's identity: what the page cache written in it is tied to.
fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = hex
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    id
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    generation: u64,
    marks: Marks,
}

impl Slot {
    fn encode(&self) -> [u8; SLOT as usize] {
        let mut b = [0u8; SLOT as usize];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        for (i, v) in [
            self.generation,
            self.marks.reserved,
            self.marks.issued,
            self.marks.acked,
        ]
        .iter()
        .enumerate()
        {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        b[40..56].copy_from_slice(&self.marks.boot);
        let crc = crc32fast::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Slot> {
        if b.len() < 60 || &b[0..4] != MAGIC || b[4..8] != VERSION.to_be_bytes() {
            return None;
        }
        if crc32fast::hash(&b[..56]).to_be_bytes() != b[56..60] {
            return None;
        }
        let v = |i: usize| u64::from_be_bytes(b[8 + i * 8..16 + i * 8].try_into().expect("8"));
        Some(Slot {
            generation: v(0),
            marks: Marks {
                reserved: v(1),
                issued: v(2),
                acked: v(3),
                boot: b[40..56].try_into().expect("16 bytes"),
            },
        })
    }
}

/// What the file said when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No file: the store's own numbering is all there is (first start, or an upgrade).
    Nothing,
    Marks(Marks),
    /// A file whose two slots are both unreadable.
    Damaged,
}

pub struct Numbering {
    file: File,
    current: Slot,
    boot: [u8; 16],
    reserved_at: Instant,
    block: u64,
}

impl Numbering {
    /// The file beside the store directory.
    /// `<store>.seq` beside the store directory, however the path is written (`store/` and
    /// `store/.` name the same directory: the file must not land inside it).
    pub fn path_for(store: &Path) -> PathBuf {
        let normal: PathBuf = store
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        let mut p = normal.into_os_string();
        p.push(".seq");
        PathBuf::from(p)
    }

    pub fn open(path: &Path) -> io::Result<(Numbering, Found)> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut buf = vec![0u8; 2 * SLOT as usize];
        let n = read_up_to(&file, &mut buf)?;
        let slots = [
            Slot::decode(&buf[..n.min(SLOT as usize)]),
            Slot::decode(&buf[SLOT as usize..n.max(SLOT as usize)]),
        ];
        let best = slots.iter().flatten().max_by_key(|s| s.generation).copied();
        let found = match best {
            Some(s) => Found::Marks(s.marks),
            None if existed && n > 0 => Found::Damaged,
            None => Found::Nothing,
        };
        let mut me = Numbering {
            file,
            boot: boot_id(),
            current: best.unwrap_or(Slot {
                generation: 0,
                marks: Marks::default(),
            }),
            reserved_at: Instant::now(),
            block: MIN_BLOCK,
        };
        if !existed {
            me.write(true)?;
            // The file's name must survive a power cut too.
            File::open(directory_of(path))?.sync_all()?;
        }
        Ok((me, found))
    }

    #[cfg(test)]
    pub fn marks(&self) -> Marks {
        self.current.marks
    }

    /// Makes every number up to `upto` usable: reserves a new block (and fsyncs) if needed.
    /// Call before the numbers are given to records.
    pub fn reserve(&mut self, upto: u64) -> io::Result<()> {
        if upto <= self.current.marks.reserved {
            return Ok(());
        }
        // Size the block so that it lasts about BLOCK_LIFETIME at the rate the last one went.
        let used = self.block;
        let took = self.reserved_at.elapsed().max(Duration::from_millis(1));
        let rate_block = (used as f64 * BLOCK_LIFETIME.as_secs_f64() / took.as_secs_f64()) as u64;
        self.block = rate_block.clamp(MIN_BLOCK, MAX_BLOCK);
        self.current.marks.reserved = upto.saturating_add(self.block);
        self.reserved_at = Instant::now();
        self.write(true)
    }

    /// The store accepted every number up to `upto` (page cache only).
    pub fn issued(&mut self, upto: u64) -> io::Result<()> {
        if upto > self.current.marks.issued {
            self.current.marks.issued = upto;
            self.write(false)?;
        }
        Ok(())
    }

    /// The broker acknowledged every number up to `upto` (page cache only).
    pub fn acked(&mut self, upto: u64) -> io::Result<()> {
        if upto > self.current.marks.acked {
            self.current.marks.acked = upto;
            self.write(false)?;
        }
        Ok(())
    }

    /// At a clean shutdown, with every number up to `issued` in the store: gives back the rest
    /// of the reservation, so the next start continues without a gap. Fsynced.
    pub fn settle(&mut self, issued: u64) -> io::Result<()> {
        self.current.marks.issued = self.current.marks.issued.max(issued);
        self.current.marks.reserved = self.current.marks.issued;
        self.write(true)
    }

    fn write(&mut self, durable: bool) -> io::Result<()> {
        self.current.generation += 1;
        self.current.marks.boot = self.boot;
        let at = (self.current.generation % 2) * SLOT;
        self.file.write_all_at(&self.current.encode(), at)?;
        if durable {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The directory holding `path`: a bare file name's parent is "", which is the working directory.
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_the_reservation_is_ahead_of_every_issued_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.seq");
        let (mut n, found) = Numbering::open(&p).unwrap();
        assert_eq!(found, Found::Nothing);
        n.reserve(10).unwrap();
        assert!(n.marks().reserved >= 10 + MIN_BLOCK);
        n.issued(10).unwrap();
        n.acked(4).unwrap();
        let reserved = n.marks().reserved;
        drop(n);
        let (n, found) = Numbering::open(&p).unwrap();
        assert_eq!(
            found,
            Found::Marks(Marks {
                reserved,
                issued: 10,
                acked: 4,
                boot: boot_id(),
            })
        );
        assert_ne!(boot_id(), [0; 16], "this kernel has a boot id");
        match found {
            Found::Marks(m) => {
                assert_eq!(m.next_safe(), 11, "same boot: right after the last issued");
                let rebooted = Marks { boot: [7; 16], ..m };
                assert_eq!(
                    rebooted.next_safe(),
                    reserved + 1,
                    "after a reboot: after the reservation"
                );
            }
            _ => unreachable!(),
        }
        assert_eq!(n.marks().reserved, reserved);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_and_both_torn_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.seq");
        let (mut n, _) = Numbering::open(&p).unwrap();
        n.reserve(1).unwrap();
        let reserved = n.marks().reserved;
        n.issued(1).unwrap();
        let newest = n.current.generation;
        drop(n);
        // Tear the newest slot.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xAA; 20], (newest % 2) * SLOT + 10)
            .unwrap();
        let (_, found) = Numbering::open(&p).unwrap();
        match found {
            Found::Marks(m) => assert_eq!(m.reserved, reserved, "the older slot has it"),
            other => panic!("{other:?}"),
        }
        f.write_all_at(&[0xAA; 128], 0).unwrap();
        assert_eq!(Numbering::open(&p).unwrap().1, Found::Damaged);
    }

    #[test]
    fn blocks_grow_with_the_rate_so_that_fsyncs_stay_rare() {
        let dir = tempfile::tempdir().unwrap();
        let (mut n, _) = Numbering::open(&dir.path().join("s.seq")).unwrap();
        n.reserve(1).unwrap();
        // A fast writer: each block used up at once.
        for _ in 0..5 {
            let next = n.marks().reserved + 1;
            n.reserve(next).unwrap();
        }
        assert!(n.block > MIN_BLOCK * 100, "block {}", n.block);
        assert!(n.block <= MAX_BLOCK);
    }

    #[test]
    fn a_store_named_relative_to_the_working_directory_has_a_directory() {
        assert_eq!(directory_of(Path::new("store.seq")), Path::new("."));
        assert_eq!(directory_of(Path::new("a/store.seq")), Path::new("a"));
        assert_eq!(directory_of(Path::new("/store.seq")), Path::new("/"));
    }
}
