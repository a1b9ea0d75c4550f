//! The record log: every accepted event, in sequence order, in a few fixed-size segment files
//! written in place.
//!
//! What it guarantees:
//! - **A record written is in the page cache**: a killed process loses nothing written. A power
//!   cut loses what was not yet synced; `unsynced` tells the caller which files hold records
//!   written since their last `fdatasync`, so that only those holding unacknowledged records
//!   need one (records the broker already has need none).
//! - **Written in place, allocated ahead**: a segment file is allocated whole (`fallocate`)
//!   before a record goes into it, and acknowledged segments are reused, not deleted, as long
//!   as the log has no more than its journal's worth of files. In normal operation (the broker
//!   acknowledges within milliseconds) the log is a ring of these few files: no allocation, no
//!   file-system metadata beyond the files' times, and a full disk cannot fail an append that
//!   has room in an allocated segment.
//! - **Damage costs what it touches**: each record carries a CRC over its header and payload.
//!   Opening reads every file and keeps every record whose CRC holds, skipping exactly the
//!   damaged ones (found again by their header or by the next magic); reading checks the CRC
//!   again and skips a record damaged since. The sequence numbers skipped are the caller's to
//!   report (they are gaps in what `open` returns).
//!
//! Record: `magic (4) | crc32 (4) | seq (8) | at_ms (8) | kind (1) | flags (1) | len (4) |
//! payload (len)`, big-endian; the CRC covers every byte after itself.
//! A file's records are in increasing sequence order from offset 0; a reused file keeps its
//! old records after its new ones, which have lower numbers: the first record whose number
//! goes down ends the file's current contents.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::queue::{NewRecord, Record};

const MAGIC: [u8; 4] = *b"LEq3";
pub const RECORD_HEADER: usize = 4 + 4 + 8 + 8 + 1 + 1 + 4;
/// The largest payload a record may carry: far above any event (a LoRa frame's stored form is
/// under 1 KB, a notice a few KB), small enough that a damaged length is recognised.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// A segment file's name: `seg-<id>.log`, ids never reused within a directory's life.
fn file_name(id: u64) -> String {
    format!("seg-{id:08}.log")
}

fn id_of(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

pub fn encode(seq: u64, r: &NewRecord, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&r.at_ms.to_be_bytes());
    out.push(r.kind);
    out.push(r.flags);
    out.extend_from_slice(&(r.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&r.payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

pub fn record_size(payload_len: usize) -> u64 {
    (RECORD_HEADER + payload_len) as u64
}

/// A header's fields, read without checking the CRC.
#[derive(Debug, Clone, Copy)]
struct Header {
    crc: u32,
    seq: u64,
    at_ms: u64,
    kind: u8,
    flags: u8,
    len: usize,
}

fn header(b: &[u8]) -> Option<Header> {
    if b.len() < RECORD_HEADER || b[0..4] != MAGIC {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(b[26..30].try_into().expect("4 bytes")) as usize;
    Some(Header {
        crc: u32::from_be_bytes(b[4..8].try_into().expect("4 bytes")),
        seq: u64_at(8),
        at_ms: u64_at(16),
        kind: b[24],
        flags: b[25],
        len,
    })
}

/// The record at the start of `b`, if whole and its CRC holds.
fn whole(b: &[u8]) -> Option<Header> {
    let h = header(b)?;
    let end = RECORD_HEADER.checked_add(h.len)?;
    (h.len <= MAX_PAYLOAD && end <= b.len() && crc32fast::hash(&b[8..end]) == h.crc).then_some(h)
}

/// What reading one file found.
#[derive(Debug, Default, PartialEq)]
pub struct Scanned {
    /// (seq, offset) of every sound record of the file's current contents, in order.
    pub records: Vec<(u64, u32)>,
    /// Places where a record of the current contents was damaged (its CRC or its header).
    pub damaged: u32,
}

/// Reads a file's current contents: sound records in increasing order. `plausible` bounds the
/// numbers a damaged header may carry to count as damage rather than as old contents.
pub fn scan(b: &[u8], plausible: std::ops::RangeInclusive<u64>) -> Scanned {
    let mut out = Scanned::default();
    let mut off = 0usize;
    let mut last: Option<u64> = None;
    while off + RECORD_HEADER <= b.len() {
        if let Some(h) = whole(&b[off..]) {
            if last.is_some_and(|l| h.seq <= l) {
                break; // older contents of a reused file
            }
            last = Some(h.seq);
            out.records.push((h.seq, off as u32));
            off += RECORD_HEADER + h.len;
            continue;
        }
        // Not a sound record here. A header of ours whose number fits after the last one is
        // a damaged record; anything else is the end of the contents unless a sound record of
        // a higher number follows (damage that hit the header itself).
        let after = last.map_or(*plausible.start(), |l| l + 1);
        let damaged_header = header(&b[off..])
            .map(|h| h.seq)
            .filter(|seq| *seq >= after && *seq <= *plausible.end());
        let next = next_sound(b, off + 1, after, *plausible.end());
        // Damage counts where it may have taken a number still to deliver (from the start of
        // `plausible`): damage among delivered records is old news.
        let matters = |first_unsound: u64| first_unsound >= *plausible.start();
        match (damaged_header, next) {
            (_, Some(at)) => {
                let next_seq = header(&b[at..]).expect("sound").seq;
                if next_seq > *plausible.start() {
                    out.damaged += 1;
                }
                off = at;
            }
            (Some(seq), None) => {
                if matters(seq) {
                    out.damaged += 1;
                }
                break;
            }
            (None, None) => {
                // A file is written from its start: anything there but a record or the zeros
                // of a fresh file is damage (the whole file overwritten, say).
                if off == 0 && b[..RECORD_HEADER].iter().any(|x| *x != 0) {
                    out.damaged += 1;
                }
                break;
            }
        }
    }
    out
}

/// The offset of the next sound record at or after `from` with a number in `lo..=hi`.
fn next_sound(b: &[u8], from: usize, lo: u64, hi: u64) -> Option<usize> {
    let mut at = from;
    while at + RECORD_HEADER <= b.len() {
        let rel = b[at..].windows(4).position(|w| w == MAGIC)?;
        at += rel;
        if let Some(h) = whole(&b[at..]) {
            if h.seq >= lo && h.seq <= hi {
                return Some(at);
            }
        }
        at += 1;
    }
    None
}

/// The records of one append that go into one file.
struct Chunk {
    file: u64,
    offset: u64,
    bytes: Vec<u8>,
    /// (seq, offset, size) of each record.
    index: Vec<(u64, u32, u32)>,
}

/// Consecutive records of one file.
#[derive(Debug)]
struct Run {
    file: u64,
    first_seq: u64,
    /// Offset of record `first_seq + i`.
    offsets: VecDeque<u32>,
    /// Byte size of record `first_seq + i` (kept for the backlog's byte count).
    sizes: VecDeque<u32>,
}

impl Run {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64 - 1
    }
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Allocated size.
    size: u64,
    /// Highest number written since the file was last synced (0: nothing).
    unsynced_top: u64,
}

/// Records leaving the log at its oldest end (evicted): exact range and size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub bytes: u64,
}

pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    /// Files kept (reused) even when empty: the journal.
    journal_files: usize,
    files: BTreeMap<u64, Segment>,
    /// Files holding no record, ready for reuse.
    spare: Vec<u64>,
    runs: VecDeque<Run>,
    /// The file appended to, and the offset of its next record.
    head: Option<(u64, u64)>,
    next_id: u64,
    records: u64,
    bytes: u64,
}

/// What `Log::open` found.
#[derive(Debug, Default)]
pub struct Opened {
    /// The highest number held (0: none).
    pub top: u64,
    /// Files with damaged records, and how many places.
    pub damaged: Vec<(PathBuf, u32)>,
}

impl Log {
    pub fn dir_for(store: &Path) -> PathBuf {
        store.join("log")
    }

    /// Opens the log in `dir`, keeping the sound records numbered above `done`.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        journal_files: usize,
        done: u64,
        plausible_top: u64,
    ) -> io::Result<(Log, Opened)> {
        std::fs::create_dir_all(dir)?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            segment_bytes,
            journal_files,
            files: BTreeMap::new(),
            spare: Vec::new(),
            runs: VecDeque::new(),
            head: None,
            next_id: 1,
            records: 0,
            bytes: 0,
        };
        let mut opened = Opened::default();
        let mut found: Vec<(u64, u64, u32, u32)> = Vec::new(); // (seq, file, offset, size)
        let mut ids: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| id_of(&e.file_name().to_string_lossy()))
            .collect();
        ids.sort();
        for id in ids {
            let path = dir.join(file_name(id));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let s = scan(&bytes, done.saturating_add(1)..=plausible_top.max(done + 1));
            if s.damaged > 0 {
                opened.damaged.push((path.clone(), s.damaged));
            }
            for (seq, off) in s.records {
                if seq > done {
                    let len = header(&bytes[off as usize..]).expect("scanned").len;
                    found.push((seq, id, off, record_size(len) as u32));
                }
            }
            log.files.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    path,
                    size: bytes.len() as u64,
                    unsynced_top: 0,
                },
            );
            log.next_id = log.next_id.max(id + 1);
        }
        // A number is written once, so it is in one file; a copy in two (never expected) keeps
        // the first.
        found.sort_by_key(|f| f.0);
        found.dedup_by_key(|f| f.0);
        for (seq, file, off, size) in found {
            log.push_index(file, seq, off, size);
        }
        opened.top = log.runs.back().map_or(0, Run::last_seq);
        let used: std::collections::BTreeSet<u64> = log.runs.iter().map(|r| r.file).collect();
        let unused: Vec<u64> = log
            .files
            .keys()
            .copied()
            .filter(|id| !used.contains(id))
            .collect();
        for id in unused {
            log.release(id);
        }
        Ok((log, opened))
    }

    fn push_index(&mut self, file: u64, seq: u64, off: u32, size: u32) {
        match self.runs.back_mut() {
            Some(r) if r.file == file && r.last_seq() + 1 == seq => {
                r.offsets.push_back(off);
                r.sizes.push_back(size);
            }
            _ => self.runs.push_back(Run {
                file,
                first_seq: seq,
                offsets: VecDeque::from([off]),
                sizes: VecDeque::from([size]),
            }),
        }
        self.records += 1;
        self.bytes += size as u64;
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Bytes allocated to segment files.
    pub fn allocated(&self) -> u64 {
        self.files.values().map(|s| s.size).sum()
    }

    /// Room left in the head file.
    fn head_room(&self) -> u64 {
        match self.head {
            Some((id, off)) => self.files[&id].size.saturating_sub(off),
            None => 0,
        }
    }

    /// How many more bytes than the head's room `sizes` need, in whole segments: the number
    /// of files to make ready before appending them.
    pub fn files_needed(&self, sizes: &[u64]) -> usize {
        let mut room = self.head_room();
        let mut files = 0;
        for &s in sizes {
            if s > room {
                files += 1;
                room = self.segment_bytes.max(s);
            }
            room -= s;
        }
        files
    }

    /// Allocates a new segment file of at least `size` bytes (all of it, so that writing into
    /// it cannot fail for want of space). ENOSPC leaves nothing behind.
    pub fn allocate(&mut self, size: u64) -> io::Result<()> {
        let id = self.next_id;
        let path = self.dir.join(file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let size = size.max(self.segment_bytes);
        if let Err(e) = preallocate(&file, size) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        // The file's name must survive a power cut before records in it count as synced.
        file.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.next_id += 1;
        self.files.insert(
            id,
            Segment {
                file: Arc::new(file),
                path,
                size,
                unsynced_top: 0,
            },
        );
        self.spare.push(id);
        Ok(())
    }

    /// Appends records numbered from `first`, each in the head file or the next spare. The
    /// caller has made `files_needed` spares ready; Err leaves the log as it was.
    pub fn append(&mut self, first: u64, records: &[NewRecord]) -> io::Result<()> {
        let sizes: Vec<u64> = records
            .iter()
            .map(|r| record_size(r.payload.len()))
            .collect();
        if self.files_needed(&sizes) > self.spare.len() {
            return Err(io::Error::other("no segment ready for the append"));
        }
        // Each file's share written with one call; the index changes only once all succeeded.
        let mut plan: Vec<Chunk> = Vec::new();
        let mut head = self.head;
        let mut spares = self.spare.clone();
        for (i, r) in records.iter().enumerate() {
            let size = sizes[i];
            let (id, off) = match head {
                Some((id, off)) if size <= self.files[&id].size.saturating_sub(off) => (id, off),
                _ if spares.is_empty() => {
                    return Err(io::Error::other("no segment ready for the append"));
                }
                _ => (spares.remove(0), 0),
            };
            if plan.last().is_none_or(|c| c.file != id) {
                plan.push(Chunk {
                    file: id,
                    offset: off,
                    bytes: Vec::new(),
                    index: Vec::new(),
                });
            }
            let c = plan.last_mut().expect("pushed");
            let seq = first + i as u64;
            c.index.push((seq, off as u32, size as u32));
            encode(seq, r, &mut c.bytes);
            head = Some((id, off + size));
        }
        for c in &plan {
            let seg = &self.files[&c.file];
            let end = c.offset + c.bytes.len() as u64;
            if end > seg.size {
                // Only a record larger than a segment: its file grows (and may fail).
                seg.file.set_len(end)?;
            }
            seg.file.write_all_at(&c.bytes, c.offset)?;
        }
        for Chunk {
            file: id, index, ..
        } in plan
        {
            self.spare.retain(|s| *s != id);
            let seg = self.files.get_mut(&id).expect("planned");
            seg.size = seg
                .size
                .max(index.last().map_or(0, |l| l.1 as u64 + l.2 as u64));
            seg.unsynced_top = seg.unsynced_top.max(index.last().map_or(0, |l| l.0));
            for (seq, off, size) in index {
                self.push_index(id, seq, off, size);
            }
        }
        let before = self.head.map(|h| h.0);
        self.head = head;
        if let Some(old) = before.filter(|old| Some(*old) != head.map(|h| h.0)) {
            self.release(old);
        }
        Ok(())
    }

    /// The files holding records numbered above `acked` written since their last sync, marked
    /// synced: the caller `fdatasync`s them (outside its lock). Files whose unsynced records
    /// are all acknowledged are marked synced without one.
    pub fn take_unsynced(&mut self, acked: u64) -> Vec<(PathBuf, Arc<File>)> {
        let mut out = Vec::new();
        for seg in self.files.values_mut() {
            if seg.unsynced_top > acked {
                out.push((seg.path.clone(), seg.file.clone()));
            }
            if seg.unsynced_top != 0 {
                seg.unsynced_top = 0;
            }
        }
        out
    }

    /// Whether a file holds records above `acked` not synced yet.
    pub fn has_unsynced(&self, acked: u64) -> bool {
        self.files.values().any(|seg| seg.unsynced_top > acked)
    }

    /// Every file written since its last sync, whatever it holds (a clean stop).
    pub fn take_all_unsynced(&mut self) -> Vec<(PathBuf, Arc<File>)> {
        self.take_unsynced(0)
    }

    /// The location of `seq` or of the first record above it.
    fn locate(&self, seq: u64) -> Option<(usize, usize)> {
        let ri = self.runs.partition_point(|r| r.last_seq() < seq);
        let r = self.runs.get(ri)?;
        Some((ri, seq.saturating_sub(r.first_seq) as usize))
    }

    /// Up to `max` records numbered `from` or more, oldest first, and the numbers of those
    /// found damaged (skipped).
    pub fn read_from(&self, from: u64, max: usize) -> (Vec<Record>, Vec<u64>) {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        let Some((mut ri, mut i)) = self.locate(from) else {
            return (out, damaged);
        };
        let mut buf = Vec::new();
        while out.len() < max {
            let Some(r) = self.runs.get(ri) else { break };
            if i >= r.offsets.len() {
                ri += 1;
                i = 0;
                continue;
            }
            let seq = r.first_seq + i as u64;
            let seg = &self.files[&r.file];
            buf.resize(r.sizes[i] as usize, 0);
            let sound = seg
                .file
                .read_exact_at(&mut buf, r.offsets[i] as u64)
                .ok()
                .and_then(|_| whole(&buf))
                .filter(|h| h.seq == seq);
            match sound {
                Some(h) => out.push(Record {
                    seq,
                    kind: h.kind,
                    flags: h.flags,
                    at_ms: h.at_ms,
                    payload: buf[RECORD_HEADER..RECORD_HEADER + h.len].to_vec(),
                }),
                None => damaged.push(seq),
            }
            i += 1;
        }
        (out, damaged)
    }

    /// The oldest record's time, read from its header (None if empty or unreadable).
    pub fn oldest_at_ms(&self) -> Option<u64> {
        let r = self.runs.front()?;
        let mut b = [0u8; RECORD_HEADER];
        self.files[&r.file]
            .file
            .read_exact_at(&mut b, r.offsets[0] as u64)
            .ok()?;
        header(&b).map(|h| h.at_ms)
    }

    /// True if the log holds record `seq`.
    pub fn holds(&self, seq: u64) -> bool {
        self.locate(seq)
            .is_some_and(|(ri, i)| self.runs[ri].first_seq + i as u64 == seq)
    }

    /// The numbers held, as ranges.
    pub fn runs_ranges(&self) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .map(|r| (r.first_seq, r.last_seq()))
            .collect()
    }

    /// Drops every record numbered up to `seq` (acknowledged or evicted); returns what left.
    pub fn drop_upto(&mut self, seq: u64) -> Option<Cut> {
        let mut cut: Option<Cut> = None;
        while let Some(r) = self.runs.front_mut() {
            if r.first_seq > seq {
                break;
            }
            let n = ((seq - r.first_seq + 1) as usize).min(r.offsets.len());
            let bytes: u64 = r.sizes.drain(..n).map(u64::from).sum();
            r.offsets.drain(..n);
            let c = cut.get_or_insert(Cut {
                first_seq: r.first_seq,
                last_seq: 0,
                records: 0,
                bytes: 0,
            });
            c.last_seq = r.first_seq + n as u64 - 1;
            c.records += n as u64;
            c.bytes += bytes;
            self.records -= n as u64;
            self.bytes -= bytes;
            r.first_seq += n as u64;
            if r.offsets.is_empty() {
                let file = r.file;
                self.runs.pop_front();
                self.release(file);
            }
        }
        cut
    }

    /// The records of the oldest file still holding some: the number up to which dropping
    /// frees that file.
    pub fn oldest_file_last_seq(&self) -> Option<u64> {
        let file = self.runs.front()?.file;
        self.runs
            .iter()
            .take_while(|r| r.file == file)
            .last()
            .map(Run::last_seq)
    }

    /// Records numbered up to where `keep_going(at_ms)` first says no, oldest first: the
    /// last such number (None if the oldest is to be kept). An unreadable header counts as
    /// to drop: it could never be sent.
    pub fn last_seq_while(&self, mut keep_going: impl FnMut(u64) -> bool) -> Option<u64> {
        let mut last = None;
        let mut b = [0u8; RECORD_HEADER];
        for r in &self.runs {
            let seg = &self.files[&r.file];
            for (i, off) in r.offsets.iter().enumerate() {
                let at = seg
                    .file
                    .read_exact_at(&mut b, *off as u64)
                    .ok()
                    .and_then(|_| header(&b))
                    .map(|h| h.at_ms);
                if at.is_some_and(|at| !keep_going(at)) {
                    return last;
                }
                last = Some(r.first_seq + i as u64);
            }
        }
        last
    }

    /// A file no longer holding records becomes a spare (`trim_spares` deletes the ones
    /// beyond the journal).
    fn release(&mut self, file: u64) {
        if self.runs.iter().any(|r| r.file == file) {
            return;
        }
        if self.head.is_some_and(|(id, _)| id == file) {
            // The head keeps taking records: not a spare.
            return;
        }
        if self
            .files
            .get(&file)
            .is_some_and(|s| s.size != self.segment_bytes)
        {
            // Not a segment of this budget (cut short by a kill, made for another budget, grown
            // for an oversized record): `files_needed` counts a spare as one segment, and the
            // budget counts what is allocated, so it goes.
            if let Some(seg) = self.files.remove(&file) {
                let _ = std::fs::remove_file(&seg.path);
            }
            return;
        }
        if !self.spare.contains(&file) {
            self.spare.push(file);
        }
    }

    /// Deletes the files among `paths` that hold no record (damaged old contents, already
    /// copied for inspection): their damage is not met again at the next start.
    pub fn discard_spares(&mut self, paths: &[PathBuf]) {
        let ids: Vec<u64> = self
            .spare
            .iter()
            .copied()
            .filter(|id| paths.contains(&self.files[id].path))
            .collect();
        for id in ids {
            self.spare.retain(|s| *s != id);
            if let Some(seg) = self.files.remove(&id) {
                let _ = std::fs::remove_file(&seg.path);
            }
        }
    }

    pub fn spare_count(&self) -> usize {
        self.spare.len()
    }

    /// Deletes spare files while the log has more than its journal's worth: the disk an
    /// outage took is given back once its backlog is delivered.
    pub fn trim_spares(&mut self) {
        while self.files.len() > self.journal_files {
            let Some(id) = self.spare.pop() else { break };
            if let Some(seg) = self.files.remove(&id) {
                let _ = std::fs::remove_file(&seg.path);
            }
        }
    }

    /// Like `drop_upto`, and if that empties the head, the head becomes a spare too (an
    /// eviction that needs the room).
    pub fn drop_upto_releasing_head(&mut self, seq: u64) -> Option<Cut> {
        let head = self.head.map(|h| h.0);
        let cut = self.drop_upto(seq);
        if let Some(id) = head.filter(|id| !self.runs.iter().any(|r| r.file == *id)) {
            self.head = None;
            self.release(id);
        }
        cut
    }
}

/// Allocates the whole file. Where the file system cannot (`EOPNOTSUPP`), zeros are written:
/// the blocks are taken either way.
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsFd;
    match nix::fcntl::fallocate(
        file.as_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        size as i64,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; 64 * 1024];
            let mut at = 0;
            while at < size {
                let n = zeros.len().min((size - at) as usize);
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::rec;

    fn bytes_of(records: &[(u64, NewRecord)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (seq, r) in records {
            encode(*seq, r, &mut b);
        }
        b
    }

    #[test]
    fn a_flipped_byte_loses_only_the_record_it_hits() {
        let recs: Vec<(u64, NewRecord)> = (1..=100).map(|i| (i, rec(i, 40))).collect();
        let clean = bytes_of(&recs);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..500 {
            let mut b = clean.clone();
            let at = rng.usize(0..b.len());
            b[at] ^= rng.u8(1..=255);
            let s = scan(&b, 1..=1000);
            let hit = at / (RECORD_HEADER + 40) + 1;
            let seqs: Vec<u64> = s.records.iter().map(|r| r.0).collect();
            let want: Vec<u64> = (1..=100).filter(|&i| i as usize != hit).collect();
            assert_eq!(seqs, want, "flip at {at}");
            // A last record hit in its magic or number looks like the end of the contents:
            // its loss is found as a gap (reported all the same), not as damage.
            assert!(s.damaged == 1 || hit == 100, "flip at {at}");
        }
    }

    #[test]
    fn the_older_contents_of_a_reused_file_end_its_records() {
        let old: Vec<(u64, NewRecord)> = (1..=100).map(|i| (i, rec(i, 40))).collect();
        let mut b = bytes_of(&old);
        // Reused: 30 new records (of another size) over the start.
        let new = bytes_of(&(500..530).map(|i| (i, rec(i, 25))).collect::<Vec<_>>());
        b[..new.len()].copy_from_slice(&new);
        let s = scan(&b, 500..=10_000);
        assert_eq!(
            s.records.iter().map(|r| r.0).collect::<Vec<_>>(),
            (500..530).collect::<Vec<_>>()
        );
        assert_eq!(s.damaged, 0, "old contents are not damage");
        // Zeros after the records (a fresh file) are not damage either.
        let mut z = new.clone();
        z.extend(vec![0u8; 4096]);
        assert_eq!(scan(&z, 500..=10_000).damaged, 0);
        assert_eq!(scan(&[0u8; 4096], 500..=10_000).damaged, 0);
        // A file overwritten whole is.
        assert_eq!(scan(&[0x5A; 4096], 500..=10_000).damaged, 1);
    }

    #[test]
    fn a_damaged_last_record_is_damage_not_the_end() {
        let recs: Vec<(u64, NewRecord)> = (1..=10).map(|i| (i, rec(i, 40))).collect();
        let mut b = bytes_of(&recs);
        let n = b.len();
        b[n - 3] ^= 0xFF;
        b.extend(vec![0u8; 1000]);
        let s = scan(&b, 1..=10);
        assert_eq!(s.records.len(), 9);
        assert_eq!(s.damaged, 1);
    }
}
