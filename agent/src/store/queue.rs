//! The durable queue: append, read from a cursor, acknowledge up to a sequence number.
//!
//! One sled tree holds the records (key: sequence number, 8 bytes big-endian) and, under a key
//! that sorts after every record, the queue's metadata (next sequence, acknowledged watermark,
//! byte and record counts, evictions). Every change is one atomic `apply_batch`, so the counts
//! can never disagree with the records after a crash, and opening needs no scan.
//!
//! Durability: `append` returns after `flush()`, which hands the data to the kernel (sled's
//! `sync_file_range`), so a killed process loses nothing appended; sled's background thread
//! fsyncs every `commit_interval`, which bounds what a power cut can lose.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::numbering::{Found, Numbering};

const META_KEY: &[u8] = b"\xffmeta";
/// Evictions not yet reported to the centre (JSON of `Unreported`), changed in the same batch as
/// the records it describes.
const UNREPORTED_KEY: &[u8] = b"\xffunreported";
/// Written beside sled's files once the store holds metadata. sled recovers an unreadable log
/// as an empty database without an error; metadata missing while this file exists is how that
/// loss is noticed instead of silently starting over.
const MARKER: &str = "lora-edge-queue";
const HEADER: usize = 1 + 1 + 1 + 8;
/// 2: the body is the event's stored form (`events::Event::stored`); 1 was the published bytes.
const FORMAT: u8 = 2;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Sled(#[from] sled::Error),
    #[error("the store at {0} is in use by another process")]
    Locked(PathBuf),
    #[error("unreadable record {seq}: {why}")]
    BadRecord { seq: u64, why: String },
    /// `store.path` names something that is not a lora-edge store: never touched.
    #[error("store.path {0}: {1}")]
    NotAStore(PathBuf, String),
    #[error("cannot create the store directory {0}: {1}")]
    CannotCreate(PathBuf, String),
    #[error("the store is being reopened after a write failure")]
    Unavailable,
}

impl StoreError {
    /// A mistake in the configuration or the installation, not a state of the store: the agent
    /// refuses to start (exit status 2) rather than retrying or moving anything.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            StoreError::NotAStore(..) | StoreError::CannotCreate(..)
        )
    }
}

/// Opens sled with the queue's settings.
fn open_sled(opts: &QueueOptions) -> Result<(sled::Db, sled::Tree), StoreError> {
    let config = sled::Config::new()
        .path(&opts.path)
        // Every record is read once, right behind which it is deleted: a larger cache
        // measured no faster and only larger (BENCHMARKS.md).
        .cache_capacity(2 * 1024 * 1024)
        .flush_every_ms(Some(opts.commit_interval.as_millis().max(1) as u64));
    // A handle of this process just dropped (a reopen) releases sled's file lock a moment
    // later, from sled's own threads: wait for it briefly. Another process's lock stays.
    let until = Instant::now() + Duration::from_secs(2);
    let db = loop {
        // sled panics on some corruptions instead of returning an error.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
            Ok(Ok(db)) => break db,
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                if Instant::now() >= until {
                    return Err(StoreError::Locked(opts.path.clone()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(sled::Error::Unsupported(
                    "sled panicked while opening the store".into(),
                )
                .into())
            }
        }
    };
    let tree = db.open_tree("queue")?;
    Ok((db, tree))
}

/// Adds to `batch` the removal of every record up to `meta.acked` and counts them out of
/// `meta` (acknowledgements the agent knows of that sled's disk state may lack).
fn remove_acked(
    tree: &sled::Tree,
    meta: &mut Meta,
    batch: &mut sled::Batch,
) -> Result<(), StoreError> {
    let mut gone = 0;
    for item in tree.range(..key(meta.acked.saturating_add(1)).to_vec()) {
        let (k, v) = item?;
        batch.remove(k);
        gone += 1;
        meta.bytes = meta.bytes.saturating_sub(8 + v.len() as u64);
    }
    meta.records = meta.records.saturating_sub(gone);
    Ok(())
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Sled(sled::Error::Io(e))
}

/// Files sled itself keeps in its directory.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// Makes sure `path` is a lora-edge store, or an empty or missing directory that can become
/// one, before anything is opened, written or moved aside there.
fn prepare_dir(path: &Path) -> Result<(), StoreError> {
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
            // Ours: the marker, or only sled's files (a first start cut before the marker).
            if entries.iter().any(|n| n == MARKER) || entries.iter().all(|n| is_sled_file(n)) {
                return Ok(());
            }
            let mut shown: Vec<&str> = entries.iter().map(String::as_str).take(5).collect();
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

#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub path: PathBuf,
    /// Budget for the store directory on disk.
    pub max_disk_bytes: u64,
    pub max_age: Duration,
    pub commit_interval: Duration,
}

/// sled's size on disk, measured under steady FIFO churn (a store evicting at its budget, the
/// worst case): 2.2–2.9 × the record bytes plus a few MiB, creeping with the volume written
/// through; peak 62–95 % of the budget with the cap (limit − fixed) / factor below
/// (`store_churn`, BENCHMARKS.md).
const SLED_FIXED_BYTES: u64 = 8 << 20;
const INITIAL_AMPLIFICATION: f64 = 2.75;
/// However sled behaves, the records keep at least this share of what the formula gives.
const MAX_AMPLIFICATION: f64 = 8.0;
const RAISE_STEP: f64 = 1.15;

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

/// Evicted sequence numbers not yet reported to the centre, as sorted, merged ranges.
///
/// Kept in the store beside the records, and changed in the same atomic batch as the evictions
/// and the notices that report them, so a kill or a power cut neither loses nor repeats a
/// range. During an outage evictions are continuous and merge into one growing range. A notice
/// that is itself evicted before the broker has it gives its ranges back.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Unreported {
    pub ranges: Vec<(u64, u64)>,
    pub records: u64,
    pub bytes: u64,
    pub reasons: Vec<String>,
    /// Notices appended but not yet acknowledged: their seq and the ranges they carry.
    in_flight: BTreeMap<u64, Vec<(u64, u64)>>,
}

impl Unreported {
    fn add_range(&mut self, first: u64, last: u64) {
        self.ranges.push((first, last));
        self.ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for (a, b) in self.ranges.drain(..) {
            match merged.last_mut() {
                Some(m) if a <= m.1 + 1 => m.1 = m.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.ranges = merged;
    }

    fn add(&mut self, e: &Eviction) {
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

    /// Serialized for the store, without the notices the broker already has.
    fn encode(&mut self, acked: u64) -> Vec<u8> {
        self.in_flight.retain(|seq, _| *seq > acked);
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    pub oldest_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Meta {
    next_seq: u64,
    acked: u64,
    records: u64,
    bytes: u64,
    evicted: u64,
}

impl Meta {
    fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        for (i, v) in [
            self.next_seq,
            self.acked,
            self.records,
            self.bytes,
            self.evicted,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Meta> {
        if b.len() != 40 {
            return None;
        }
        let v = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Some(Meta {
            next_seq: v(0),
            acked: v(1),
            records: v(2),
            bytes: v(3),
            evicted: v(4),
        })
    }
}

/// Accepted sequence numbers the store no longer held when it was opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub first_seq: u64,
    pub last_seq: u64,
    /// `store_rollback` (sled cut its log), `store_corrupt` (moved aside), `store_missing`
    /// (deleted).
    pub reason: &'static str,
}

/// The sled database and its tree; replaced when sled has to be reopened after a write failure.
struct Engine {
    db: sled::Db,
    tree: sled::Tree,
}

struct EngineGuard<'a>(RwLockReadGuard<'a, Option<Engine>>);

impl std::ops::Deref for EngineGuard<'_> {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        self.0.as_ref().expect("checked when the guard was made")
    }
}

pub struct Queue {
    /// Locked after `meta`, `unreported` and `numbering`, never before them. None while a
    /// reopen after a write failure has not succeeded yet.
    engine: RwLock<Option<Engine>>,
    meta: Mutex<Meta>,
    /// Locked after `meta`, never before.
    numbering: Mutex<Numbering>,
    /// True if `try_open` created the store.
    created: bool,
    lost_at_open: Vec<Loss>,
    numbering_damaged: bool,
    /// Changed only while `meta` is held.
    unreported: Mutex<Unreported>,
    opts: QueueOptions,
    disk: Mutex<DiskGuard>,
}

/// Keeps the store's real size on disk within its limit. sled's size is not a function of the
/// records it holds (its log keeps freed space to reuse it, and seldom gives it back), so the
/// record bytes are capped by the measured amplification. If the real size still goes over the
/// limit, the amplification is raised by a step, and raised again only after a whole cap of
/// records has gone through since (or at once if the limit dropped: the disk is filling).
/// Cutting the records is itself a burst of writes to sled's log, which grows it for a while:
/// reacting to that growth again at once measured as a runaway (the cap fell to its floor while
/// the file kept growing), waiting for one turnover did not.
#[derive(Debug, Clone, Copy)]
struct DiskGuard {
    /// What the store may use now: its budget, or less when the filesystem is filling.
    limit: u64,
    /// Disk bytes per record byte, beyond sled's fixed part.
    amplification: f64,
    /// The limit when the amplification was last raised.
    limit_at_raise: u64,
    /// Record bytes appended since then.
    appended_since_raise: u64,
    measured: Option<Instant>,
    nearly_full_alarmed: bool,
}

impl DiskGuard {
    fn new(limit: u64) -> DiskGuard {
        DiskGuard {
            limit,
            amplification: INITIAL_AMPLIFICATION,
            limit_at_raise: u64::MAX,
            appended_since_raise: u64::MAX,
            measured: None,
            nearly_full_alarmed: false,
        }
    }

    /// Takes a measurement of the real size (against the current `limit`); returns the new
    /// amplification if it had to be raised.
    fn observe(&mut self, real: u64) -> Option<f64> {
        let turned_over = self.appended_since_raise >= self.record_cap();
        if real <= self.limit || !(turned_over || self.limit < self.limit_at_raise) {
            return None;
        }
        self.limit_at_raise = self.limit;
        self.appended_since_raise = 0;
        let amplification = (self.amplification * RAISE_STEP).min(MAX_AMPLIFICATION);
        (amplification > self.amplification).then(|| {
            self.amplification = amplification;
            amplification
        })
    }

    fn appended(&mut self, bytes: u64) {
        self.appended_since_raise = self.appended_since_raise.saturating_add(bytes);
    }

    fn record_cap(&self) -> u64 {
        (self.limit.saturating_sub(SLED_FIXED_BYTES) as f64 / self.amplification) as u64
    }
}

/// Free space left on the store's filesystem: sled is log-structured and needs room to write
/// even a deletion, so a store that fills its disk completely cannot evict anything.
/// 4 MiB: sled writes ~7 bytes per record byte while filling (BENCHMARKS.md), so at 15,000
/// frames/s this covers several measurement periods.
const DISK_RESERVE_BYTES: u64 = 4 << 20;
/// Below this much room for records (a few thousand frames), the disk is nearly full: alarm.
const NEARLY_FULL_RECORD_BYTES: u64 = 1 << 20;

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().unwrap_or([0; 8]))
}

fn stored_size(payload_len: usize) -> u64 {
    (8 + HEADER + payload_len) as u64
}

/// A stored value's timestamp, read without copying its payload; `None` if unreadable.
fn at_ms_of(v: &[u8]) -> Option<u64> {
    (v.len() >= HEADER && v[0] == FORMAT)
        .then(|| u64::from_be_bytes(v[3..11].try_into().expect("8 bytes")))
}

impl Record {
    fn decode(seq: u64, v: &[u8]) -> Result<Record, StoreError> {
        let at_ms = at_ms_of(v).ok_or_else(|| StoreError::BadRecord {
            seq,
            why: format!("{} bytes, format {:?}", v.len(), v.first()),
        })?;
        Ok(Record {
            seq,
            kind: v[1],
            flags: v[2],
            at_ms,
            payload: v[HEADER..].to_vec(),
        })
    }
}

fn encode(r: &NewRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + r.payload.len());
    v.push(FORMAT);
    v.push(r.kind);
    v.push(r.flags);
    v.extend_from_slice(&r.at_ms.to_be_bytes());
    v.extend_from_slice(&r.payload);
    v
}

/// Adds `records` and the metadata that counts them to `batch`; returns the first sequence
/// number given.
fn stage(next: &mut Meta, batch: &mut sled::Batch, records: &[NewRecord]) -> u64 {
    let first = next.next_seq;
    for r in records {
        batch.insert(&key(next.next_seq), encode(r));
        next.next_seq += 1;
        next.records += 1;
        next.bytes += stored_size(r.payload.len());
    }
    batch.insert(META_KEY, next.encode().to_vec());
    first
}

/// How the store was found at start.
#[derive(Debug, Clone, PartialEq)]
pub enum Opened {
    Clean,
    /// It could not be read; it was moved here and a fresh one created.
    MovedAside {
        to: PathBuf,
        why: String,
    },
}

impl Queue {
    /// Opens the store, or moves an unreadable one aside and starts fresh (never a crash loop).
    /// A store locked by another running agent is an error: it is not corrupt.
    pub fn open(opts: QueueOptions) -> Result<(Queue, Opened), StoreError> {
        prepare_dir(&opts.path)?;
        let seq_path = Numbering::path_for(&opts.path);
        let (numbering, found) = Numbering::open(&seq_path).map_err(|e| {
            StoreError::CannotCreate(seq_path.clone(), format!("sequence numbering file: {e}"))
        })?;
        let (mut q, opened) = Self::open_store(&opts, numbering)?;
        q.reconcile(found, &opened)?;
        Ok((q, opened))
    }

    fn open_store(
        opts: &QueueOptions,
        numbering: Numbering,
    ) -> Result<(Queue, Opened), StoreError> {
        // The numbering goes to whichever store opens: a cell lets both attempts take it.
        let mut numbering = Some(numbering);
        let mut take = || numbering.take().expect("used once");
        match Self::try_open(opts, &mut take) {
            Ok(q) => Ok((q, Opened::Clean)),
            Err(StoreError::Locked(p)) => Err(StoreError::Locked(p)),
            Err(e) => {
                let why = e.to_string();
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                // Two in the same second (a damaged store met again soon after) get a suffix.
                let to = (0..)
                    .map(|n| match n {
                        0 => PathBuf::from(format!("{}.corrupt-{stamp}", opts.path.display())),
                        n => PathBuf::from(format!("{}.corrupt-{stamp}-{n}", opts.path.display())),
                    })
                    .find(|p| !p.exists())
                    .expect("a free name");
                std::fs::rename(&opts.path, &to)
                    .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
                let q = Self::try_open(opts, &mut take)?;
                Ok((q, Opened::MovedAside { to, why }))
            }
        }
    }

    /// Continues the numbering above every number ever handed out, and finds the accepted
    /// numbers the store no longer holds (module `numbering`).
    fn reconcile(&mut self, found: Found, opened: &Opened) -> Result<(), StoreError> {
        let meta = *self.meta();
        let marks = match found {
            Found::Marks(m) => m,
            Found::Nothing => {
                self.numbering()
                    .reserve(meta.next_seq.saturating_sub(1))
                    .map_err(io)?;
                return Ok(());
            }
            Found::Damaged => {
                self.numbering_damaged = true;
                self.numbering()
                    .reserve(meta.next_seq.saturating_sub(1))
                    .map_err(io)?;
                return Ok(());
            }
        };
        let held_up_to = meta.next_seq - 1;
        if marks.issued > held_up_to {
            let first = held_up_to.max(marks.acked) + 1;
            if first <= marks.issued {
                let reason = match opened {
                    Opened::MovedAside { .. } => "store_corrupt",
                    Opened::Clean if self.created => "store_missing",
                    Opened::Clean => "store_rollback",
                };
                self.lost_at_open.push(Loss {
                    first_seq: first,
                    last_seq: marks.issued,
                    reason,
                });
            }
        }
        // Above every number that may have been handed out.
        let next_seq = meta.next_seq.max(marks.next_safe());
        let mut next = meta;
        next.next_seq = next_seq;
        // What the broker has (the file survives a kill; sled's last acks may not) is not sent
        // again: duplicates stay within the inflight window.
        if marks.acked > next.acked && marks.acked < next_seq {
            next.acked = marks.acked;
        }
        let e = self.engine()?;
        let mut batch = sled::Batch::default();
        remove_acked(&e.tree, &mut next, &mut batch)?;
        batch.insert(META_KEY, next.encode().to_vec());
        let mut unreported = self.unreported().clone();
        for l in &self.lost_at_open {
            unreported.add(&Eviction {
                first_seq: l.first_seq,
                last_seq: l.last_seq,
                records: l.last_seq - l.first_seq + 1,
                bytes: 0,
                reason: l.reason,
            });
        }
        batch.insert(UNREPORTED_KEY, unreported.encode(next.acked));
        e.tree.apply_batch(batch)?;
        e.db.flush()?;
        drop(e);
        *self.meta() = next;
        *self.unreported() = unreported;
        self.numbering().reserve(next_seq - 1).map_err(io)?;
        Ok(())
    }

    fn engine(&self) -> Result<EngineGuard<'_>, StoreError> {
        let g = self.engine.read().unwrap_or_else(|p| p.into_inner());
        match *g {
            Some(_) => Ok(EngineGuard(g)),
            None => Err(StoreError::Unavailable),
        }
    }

    /// sled keeps a write failure (a full disk, ENOSPC) as a global error and refuses every
    /// later operation until the database is opened again. When that is the case this reopens
    /// it, keeping what the agent knows that sled's disk state may not (numbers given to
    /// rejected events, acknowledgements, unreported ranges). Ok(true) if it reopened.
    pub fn recover(&self) -> Result<bool, StoreError> {
        let mut meta = self.meta();
        let mut unreported = self.unreported();
        let mut slot = self.engine.write().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|e| e.db.flush().is_ok()) {
            return Ok(false);
        }
        // The old handles, and sled's lock on its files, must be gone before it opens again.
        *slot = None;
        let (db, tree) = open_sled(&self.opts)?;
        let disk =
            tree.get(META_KEY)?
                .and_then(|v| Meta::decode(&v))
                .ok_or(StoreError::BadRecord {
                    seq: 0,
                    why: "metadata missing after a reopen".into(),
                })?;
        let mut next = disk;
        next.next_seq = disk.next_seq.max(meta.next_seq);
        next.acked = disk.acked.max(meta.acked).min(next.next_seq - 1);
        next.evicted = disk.evicted.max(meta.evicted);
        let mut batch = sled::Batch::default();
        remove_acked(&tree, &mut next, &mut batch)?;
        batch.insert(META_KEY, next.encode().to_vec());
        batch.insert(UNREPORTED_KEY, unreported.encode(next.acked));
        tree.apply_batch(batch)?;
        db.flush()?;
        *meta = next;
        *slot = Some(Engine { db, tree });
        Ok(true)
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

    fn numbering(&self) -> std::sync::MutexGuard<'_, Numbering> {
        self.numbering.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_open(
        opts: &QueueOptions,
        numbering: &mut dyn FnMut() -> Numbering,
    ) -> Result<Queue, StoreError> {
        let (db, tree) = open_sled(opts)?;
        let marker = opts.path.join(MARKER);
        let mut created = false;
        let meta = match tree.get(META_KEY)? {
            Some(v) => Meta::decode(&v).ok_or_else(|| StoreError::BadRecord {
                seq: 0,
                why: "metadata".into(),
            })?,
            None if marker.exists() => {
                return Err(StoreError::BadRecord {
                    seq: 0,
                    why: "metadata lost: sled could not recover its log".into(),
                })
            }
            None => {
                let fresh = Meta {
                    next_seq: 1,
                    ..Meta::default()
                };
                tree.insert(META_KEY, fresh.encode().to_vec())?;
                db.flush()?;
                std::fs::write(&marker, b"lora-edge durable queue, format 2\n")
                    .map_err(sled::Error::Io)?;
                created = true;
                fresh
            }
        };
        // The oldest record must be readable and agree with the metadata.
        if let Some((k, v)) = tree.range(..META_KEY.to_vec()).next().transpose()? {
            let r = Record::decode(seq_of(&k), &v)?;
            if r.seq <= meta.acked || r.seq >= meta.next_seq {
                return Err(StoreError::BadRecord {
                    seq: r.seq,
                    why: "outside the metadata's range".into(),
                });
            }
        }
        let unreported = match tree.get(UNREPORTED_KEY)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::BadRecord {
                seq: 0,
                why: format!("unreported evictions: {e}"),
            })?,
            None => Unreported::default(),
        };
        Ok(Queue {
            engine: RwLock::new(Some(Engine { db, tree })),
            meta: Mutex::new(meta),
            numbering: Mutex::new(numbering()),
            created,
            lost_at_open: Vec::new(),
            numbering_damaged: false,
            unreported: Mutex::new(unreported),
            opts: opts.clone(),
            disk: Mutex::new(DiskGuard::new(opts.max_disk_bytes)),
        })
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.meta().next_seq
    }

    /// Everything up to here has been acknowledged and removed.
    pub fn acked(&self) -> u64 {
        self.meta().acked
    }

    pub fn evicted_total(&self) -> u64 {
        self.meta().evicted
    }

    /// The record bytes the store may hold now, and why that is less than asked, measured at
    /// most every 50 ms: the limit is the budget, or the store's current size plus the free
    /// space less the reserve when the filesystem is filling.
    fn record_cap(&self, incoming: u64) -> (u64, &'static str) {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        d.appended(incoming);
        let fresh = d
            .measured
            .is_some_and(|t| t.elapsed() < Duration::from_millis(50));
        if !fresh {
            // The casts are needed on armhf, where both counts are 32-bit.
            #[allow(clippy::unnecessary_cast)]
            let free = nix::sys::statvfs::statvfs(&self.opts.path)
                .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
                .unwrap_or(u64::MAX);
            let real = self.disk_bytes();
            let room = real.saturating_add(free).saturating_sub(DISK_RESERVE_BYTES);
            d.limit = self.opts.max_disk_bytes.min(room);
            d.measured = Some(Instant::now());
            // Once per episode: a store that can hold almost nothing is an operator's problem
            // to hear of before the eviction count tells it.
            let cap = d.record_cap();
            if cap < NEARLY_FULL_RECORD_BYTES && !d.nearly_full_alarmed {
                d.nearly_full_alarmed = true;
                tracing::error!(
                    free_bytes = free,
                    store_bytes = real,
                    record_budget_bytes = cap,
                    "ALARM: the store's filesystem is nearly full: the backlog can hold almost nothing and older events will be evicted (disk_full) during an outage; free space on it"
                );
            } else if cap >= 2 * NEARLY_FULL_RECORD_BYTES && d.nearly_full_alarmed {
                d.nearly_full_alarmed = false;
                tracing::info!(record_budget_bytes = cap, "store: disk space is back");
            }
            if let Some(amplification) = d.observe(real) {
                tracing::warn!(
                    real_bytes = real,
                    limit_bytes = d.limit,
                    record_bytes = self.meta().bytes,
                    amplification = format!("{amplification:.2}"),
                    "store over its disk limit: fewer records kept"
                );
            }
        }
        let reason = if d.limit < self.opts.max_disk_bytes {
            "disk_full"
        } else {
            "size_budget"
        };
        (d.record_cap(), reason)
    }

    /// Appends durably (flushed to the kernel) and returns the sequence numbers given, after
    /// evicting the oldest records if the budget requires it.
    pub fn append(
        &self,
        records: &[NewRecord],
    ) -> Result<(std::ops::RangeInclusive<u64>, Vec<Eviction>), StoreError> {
        let incoming: u64 = records.iter().map(|r| stored_size(r.payload.len())).sum();
        let mut evictions = Vec::new();
        let (cap, reason) = self.record_cap(incoming);
        let over = (self.meta().bytes + incoming).saturating_sub(cap);
        if over > 0 {
            evictions.extend(self.evict_oldest(over, reason)?);
        }
        // No retry on ENOSPC: sled cannot even log a deletion on a full disk, which is why the
        // limit above keeps headroom. What still fails is the caller's to count.
        let range = self.insert(records)?;
        Ok((range, evictions))
    }

    fn insert(&self, records: &[NewRecord]) -> Result<std::ops::RangeInclusive<u64>, StoreError> {
        let mut meta = self.meta();
        let mut next = *meta;
        let mut batch = sled::Batch::default();
        let first = stage(&mut next, &mut batch, records);
        self.commit(batch, next.next_seq - 1)?;
        *meta = next;
        Ok(first..=next.next_seq - 1)
    }

    /// Applies a batch that hands out numbers up to `top`: reserved (fsynced) before, marked
    /// issued after.
    fn commit(&self, batch: sled::Batch, top: u64) -> Result<(), StoreError> {
        let mut numbering = self.numbering();
        numbering.reserve(top).map_err(io)?;
        let e = self.engine()?;
        e.tree.apply_batch(batch)?;
        e.db.flush()?;
        numbering.issued(top).map_err(io)?;
        Ok(())
    }

    /// A small durable value of another stage (the rules' frame counters, latches, lockouts and
    /// start history): in the store's database, a tree of its own, flushed before returning.
    pub fn state_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let e = self.engine()?;
        let t = e.db.open_tree("state")?;
        t.insert(key.as_bytes(), value)?;
        t.flush()?;
        Ok(())
    }

    pub fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let e = self.engine()?;
        let t = e.db.open_tree("state")?;
        Ok(t.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Events that could not be stored (the disk refused them): they get the next `count`
    /// numbers all the same, reported lost (`rejected`) like evictions, so that the centre
    /// learns exactly what is missing. The numbers and the range are written with the next
    /// batch that succeeds (and the numbering file has them meanwhile).
    pub fn reject(&self, count: u64) -> Option<Eviction> {
        if count == 0 {
            return None;
        }
        let mut meta = self.meta();
        let first = meta.next_seq;
        let last = first + count - 1;
        {
            let mut numbering = self.numbering();
            // Page cache and in-place writes: these work on a full disk.
            if numbering
                .reserve(last)
                .and_then(|_| numbering.issued(last))
                .is_err()
            {
                return None;
            }
        }
        meta.next_seq = last + 1;
        let e = Eviction {
            first_seq: first,
            last_seq: last,
            records: count,
            bytes: 0,
            reason: "rejected",
        };
        self.unreported().add(&e);
        Some(e)
    }

    /// Up to `max` records with a sequence number of `from` or more, oldest first.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::with_capacity(max.min(1024));
        let e = self.engine()?;
        for item in e
            .tree
            .range(key(from).to_vec()..META_KEY.to_vec())
            .take(max)
        {
            let (k, v) = item?;
            out.push(Record::decode(seq_of(&k), &v)?);
        }
        Ok(out)
    }

    /// Removes every record up to `seq` included: the broker has them.
    pub fn ack_upto(&self, seq: u64) -> Result<(), StoreError> {
        let mut meta = self.meta();
        if seq <= meta.acked {
            return Ok(());
        }
        let mut next = *meta;
        let mut batch = sled::Batch::default();
        let e = self.engine()?;
        for item in e.tree.range(..key(seq.saturating_add(1)).to_vec()) {
            let (k, v) = item?;
            batch.remove(k);
            next.records = next.records.saturating_sub(1);
            next.bytes = next.bytes.saturating_sub(8 + v.len() as u64);
        }
        next.acked = seq.min(next.next_seq - 1);
        batch.insert(META_KEY, next.encode().to_vec());
        e.tree.apply_batch(batch)?;
        drop(e);
        self.numbering().acked(next.acked).map_err(io)?;
        *meta = next;
        Ok(())
    }

    /// Drops the oldest records until `at_least` bytes are freed.
    fn evict_oldest(
        &self,
        at_least: u64,
        reason: &'static str,
    ) -> Result<Option<Eviction>, StoreError> {
        self.evict_while(reason, |freed, _| freed < at_least)
    }

    /// Drops records accepted before `now_ms - max_age`.
    pub fn evict_expired(&self, now_ms: u64) -> Result<Option<Eviction>, StoreError> {
        let cutoff = now_ms.saturating_sub(self.opts.max_age.as_millis() as u64);
        self.evict_while("max_age", |_, at_ms| at_ms < cutoff)
    }

    fn evict_while(
        &self,
        reason: &'static str,
        mut more: impl FnMut(u64, u64) -> bool,
    ) -> Result<Option<Eviction>, StoreError> {
        let mut meta = self.meta();
        let mut next = *meta;
        let mut batch = sled::Batch::default();
        let mut ev = Eviction {
            first_seq: 0,
            last_seq: 0,
            records: 0,
            bytes: 0,
            reason,
        };
        let e = self.engine()?;
        for item in e.tree.range(..META_KEY.to_vec()) {
            let (k, v) = item?;
            let seq = seq_of(&k);
            // An unreadable record is evicted too: it could never be sent.
            let keep_going = at_ms_of(&v).is_none_or(|at_ms| more(ev.bytes, at_ms));
            if !keep_going {
                break;
            }
            if ev.records == 0 {
                ev.first_seq = seq;
            }
            ev.last_seq = seq;
            ev.records += 1;
            ev.bytes += 8 + v.len() as u64;
            batch.remove(k);
        }
        if ev.records == 0 {
            return Ok(None);
        }
        next.records = next.records.saturating_sub(ev.records);
        next.bytes = next.bytes.saturating_sub(ev.bytes);
        next.evicted += ev.records;
        // Evicted records count as done: a later ack below them changes nothing.
        next.acked = next.acked.max(ev.last_seq);
        batch.insert(META_KEY, next.encode().to_vec());
        let mut unreported = self.unreported();
        let mut after = unreported.clone();
        after.add(&ev);
        batch.insert(UNREPORTED_KEY, after.encode(next.acked));
        e.tree.apply_batch(batch)?;
        *meta = next;
        *unreported = after;
        Ok(Some(ev))
    }

    fn unreported(&self) -> std::sync::MutexGuard<'_, Unreported> {
        self.unreported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The evictions the centre has not been told about yet.
    #[cfg(test)]
    fn unreported_evictions(&self) -> Unreported {
        self.unreported().clone()
    }

    /// Appends the notice `make` builds for the unreported evictions, if there are any, and
    /// counts them as reported, in one atomic batch. Returns the notice's sequence number.
    pub fn report_evictions(
        &self,
        make: impl FnOnce(&Unreported) -> NewRecord,
    ) -> Result<Option<u64>, StoreError> {
        let mut meta = self.meta();
        let mut unreported = self.unreported();
        if unreported.ranges.is_empty() {
            return Ok(None);
        }
        let mut next = *meta;
        let mut batch = sled::Batch::default();
        let seq = stage(&mut next, &mut batch, &[make(&unreported)]);
        let mut after = Unreported {
            in_flight: {
                let mut f = unreported.in_flight.clone();
                f.insert(seq, unreported.ranges.clone());
                f
            },
            ..Unreported::default()
        };
        batch.insert(UNREPORTED_KEY, after.encode(next.acked));
        self.commit(batch, seq)?;
        *meta = next;
        *unreported = after;
        Ok(Some(seq))
    }

    pub fn backlog(&self) -> Backlog {
        let meta = *self.meta();
        let oldest_at_ms = self.engine().ok().and_then(|e| {
            e.tree
                .range(..META_KEY.to_vec())
                .next()
                .and_then(|r| r.ok())
                .and_then(|(_, v)| at_ms_of(&v))
        });
        Backlog {
            records: meta.records,
            bytes: meta.bytes,
            oldest_at_ms,
        }
    }

    /// The store directory's real size on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.engine()
            .map(|e| e.db.size_on_disk().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Forces everything to stable storage (used at shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.engine()?.db.flush()?;
        // Every number handed out is in the store now: the next start continues right after
        // the last one instead of after the reservation.
        let issued = self.meta().next_seq - 1;
        self.numbering().settle(issued).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> QueueOptions {
        QueueOptions {
            path: dir.join("store"),
            max_disk_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
            commit_interval: Duration::from_millis(100),
        }
    }

    /// A directory removed when the test ends (kept in the returned guard).
    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn rec(i: u64, size: usize) -> NewRecord {
        NewRecord {
            kind: 1,
            flags: 0,
            at_ms: 1_000 + i,
            payload: vec![i as u8; size],
        }
    }

    #[test]
    fn appended_records_are_read_back_in_order_from_a_cursor() {
        let dir = tmp();
        let d = dir.path();
        let (q, opened) = Queue::open(opts(d)).unwrap();
        assert_eq!(opened, Opened::Clean);
        let (range, ev) = q
            .append(&(0..10).map(|i| rec(i, 20)).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(range, 1..=10);
        assert!(ev.is_empty());
        let got = q.read_from(4, 3).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(got[0].payload, vec![3u8; 20]);
        assert_eq!(got[0].at_ms, 1_003);
    }

    #[test]
    fn acknowledged_records_are_gone_and_sequence_numbers_survive_a_reopen() {
        let dir = tmp();
        let d = dir.path();
        {
            let (q, _) = Queue::open(opts(d)).unwrap();
            q.append(&(0..10).map(|i| rec(i, 20)).collect::<Vec<_>>())
                .unwrap();
            q.ack_upto(10).unwrap();
            assert_eq!(
                q.backlog(),
                Backlog {
                    records: 0,
                    bytes: 0,
                    oldest_at_ms: None
                }
            );
        }
        let (q, _) = Queue::open(opts(d)).unwrap();
        assert_eq!(q.acked(), 10);
        let (range, _) = q.append(&[rec(99, 5)]).unwrap();
        assert_eq!(range, 11..=11, "sequence numbers never restart");
    }

    #[test]
    fn the_backlog_counts_survive_a_reopen_without_a_scan() {
        let dir = tmp();
        let d = dir.path();
        {
            let (q, _) = Queue::open(opts(d)).unwrap();
            q.append(&(0..100).map(|i| rec(i, 50)).collect::<Vec<_>>())
                .unwrap();
            q.ack_upto(40).unwrap();
        }
        let (q, _) = Queue::open(opts(d)).unwrap();
        let b = q.backlog();
        assert_eq!(b.records, 60);
        assert_eq!(b.bytes, 60 * stored_size(50));
        assert_eq!(b.oldest_at_ms, Some(1_040));
        assert_eq!(q.read_from(0, 1000).unwrap().len(), 60);
    }

    #[test]
    fn over_budget_the_oldest_are_evicted_reported_exactly_and_the_real_size_stays_within_it() {
        let dir = tmp();
        let d = dir.path();
        let mut o = opts(d);
        o.max_disk_bytes = 24 << 20;
        let (q, _) = Queue::open(o).unwrap();
        let mut appended = 0u64;
        let mut evicted: Vec<Eviction> = Vec::new();
        let mut max_real = 0;
        // Four times what the budget holds in record bytes, in batches, as the writer appends.
        for batch in 0..640u64 {
            let records: Vec<NewRecord> = (0..40).map(|i| rec(batch * 40 + i, 1000)).collect();
            let (range, ev) = q.append(&records).unwrap();
            assert_eq!(*range.start(), appended + 1);
            appended += 40;
            evicted.extend(ev);
            max_real = max_real.max(q.disk_bytes());
            // The guard measures every 50 ms; the writer's batches come at least that far apart
            // under this load.
            if batch % 20 == 0 {
                std::thread::sleep(Duration::from_millis(60));
            }
        }
        assert!(evicted.len() > 1, "{evicted:?}");
        // Contiguous from the oldest, each reported once, and the counts agree.
        let mut next = 1;
        for e in &evicted {
            assert_eq!(e.first_seq, next, "{evicted:?}");
            assert_eq!(e.records, e.last_seq - e.first_seq + 1);
            assert_eq!(e.bytes, e.records * stored_size(1000));
            next = e.last_seq + 1;
        }
        let gone: u64 = evicted.iter().map(|e| e.records).sum();
        assert_eq!(q.evicted_total(), gone);
        assert_eq!(q.backlog().records + gone, appended);
        assert_eq!(q.read_from(0, 1).unwrap()[0].seq, next);
        // sled grows by 512 KiB segments and is measured every 50 ms: allow two segments over.
        assert!(
            max_real <= (24 << 20) + (1 << 20),
            "real size reached {max_real} B for a budget of {} B",
            24 << 20
        );
    }

    #[test]
    fn a_real_size_over_the_limit_raises_the_amplification_once_per_turnover() {
        let mib = 1u64 << 20;
        let mut g = DiskGuard::new(64 * mib);
        let cap = |a: f64| (56.0 * mib as f64 / a) as u64;
        assert_eq!(g.record_cap(), cap(INITIAL_AMPLIFICATION));
        assert_eq!(g.observe(60 * mib), None, "within the limit");
        let raised = g.observe(72 * mib).unwrap();
        assert!(
            (raised - INITIAL_AMPLIFICATION * RAISE_STEP).abs() < 1e-9,
            "{raised}"
        );
        // Still over, and growing from the cut itself: no new step until a whole cap of
        // records has gone through.
        assert_eq!(g.observe(80 * mib), None);
        g.appended(g.record_cap() - 1);
        assert_eq!(g.observe(80 * mib), None);
        g.appended(1);
        assert!(g.observe(80 * mib).unwrap() > raised);
        // A filling filesystem lowers the limit: at once.
        g.limit = 40 * mib;
        assert!(g.observe(80 * mib).is_some());
        for _ in 0..40 {
            g.limit -= mib / 4;
            g.observe(80 * mib);
        }
        assert_eq!(g.amplification, MAX_AMPLIFICATION);
    }

    fn notice(at_ms: u64) -> impl FnOnce(&Unreported) -> NewRecord {
        move |u| NewRecord {
            kind: 5,
            flags: 0,
            at_ms,
            payload: format!("{:?}", u.ranges).into_bytes(),
        }
    }

    #[test]
    fn unreported_evictions_survive_a_reopen_and_are_reported_exactly_once() {
        let dir = tmp();
        let d = dir.path();
        {
            let (q, _) = Queue::open(opts(d)).unwrap();
            q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
                .unwrap();
            q.evict_expired(1_003 + 3_600_000).unwrap();
        }
        let (q, _) = Queue::open(opts(d)).unwrap();
        let u = q.unreported_evictions();
        assert_eq!((u.ranges, u.records), (vec![(1, 3)], 3));
        assert_eq!(u.reasons, vec!["max_age".to_string()]);
        let seq = q.report_evictions(notice(5_000)).unwrap();
        assert_eq!(seq, Some(6));
        assert_eq!(q.report_evictions(notice(5_000)).unwrap(), None);
        drop(q);
        let (q, _) = Queue::open(opts(d)).unwrap();
        assert!(q.unreported_evictions().ranges.is_empty());
        let read = q.read_from(6, 1).unwrap();
        assert_eq!(
            (read[0].kind, read[0].payload.as_slice()),
            (5, &b"[(1, 3)]"[..])
        );
    }

    #[test]
    fn a_notice_evicted_before_the_broker_has_it_gives_its_ranges_back() {
        let dir = tmp();
        let d = dir.path();
        let (q, _) = Queue::open(opts(d)).unwrap();
        q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
            .unwrap();
        q.evict_expired(1_002 + 3_600_000).unwrap(); // seqs 1, 2
        assert_eq!(q.report_evictions(notice(1_002)).unwrap(), Some(6));
        // Everything up to the notice is now too old, the notice too.
        q.evict_expired(1_005 + 3_600_000).unwrap(); // 3, 4, 5 and the notice, 6
        drop(q);
        let (q, _) = Queue::open(opts(d)).unwrap();
        let u = q.unreported_evictions();
        assert_eq!(u.ranges, vec![(1, 6)], "{u:?}");
        assert_eq!(
            u.records, 4,
            "the second eviction's records; the first were reported"
        );
        // Acknowledged notices are forgotten.
        assert_eq!(q.report_evictions(notice(9_999)).unwrap(), Some(7));
        q.ack_upto(7).unwrap();
        q.append(&[rec(1, 10)]).unwrap();
        q.evict_expired(1_002 + 3_600_000).unwrap();
        let u = q.unreported_evictions();
        assert_eq!(u.ranges, vec![(8, 8)], "{u:?}");
        assert!(u.in_flight.is_empty(), "{u:?}");
    }

    #[test]
    fn records_older_than_max_age_are_evicted() {
        let dir = tmp();
        let d = dir.path();
        let (q, _) = Queue::open(opts(d)).unwrap();
        q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
            .unwrap();
        // max_age is 1 h: at 1_003 + 1 h, the records from 1_000..1_002 are too old.
        let ev = q.evict_expired(1_003 + 3_600_000).unwrap().unwrap();
        assert_eq!((ev.first_seq, ev.last_seq, ev.reason), (1, 3, "max_age"));
    }

    #[test]
    fn an_unreadable_store_is_moved_aside_and_a_fresh_one_opens() {
        let dir = tmp();
        let d = dir.path();
        let o = opts(d);
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            q.append(&[rec(1, 10)]).unwrap();
        }
        let db = o.path.join("db");
        let len = std::fs::metadata(&db).unwrap().len() as usize;
        std::fs::write(&db, vec![0xA5; len.max(4096)]).unwrap();
        let (q, opened) = Queue::open(o.clone()).unwrap();
        match opened {
            Opened::MovedAside { to, .. } => assert!(to.exists()),
            other => panic!("expected the store moved aside, got {other:?}"),
        }
        // The fresh store continues the numbering, and reports what the old one held.
        assert_eq!(
            q.lost_at_open(),
            &[Loss {
                first_seq: 1,
                last_seq: 1,
                reason: "store_corrupt"
            }]
        );
        assert_eq!(q.append(&[rec(2, 10)]).unwrap().0, 2..=2);
        assert_eq!(q.unreported_evictions().ranges, vec![(1, 1)]);
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    fn append_n(q: &Queue, n: u64) -> std::ops::RangeInclusive<u64> {
        q.append(&(0..n).map(|i| rec(i, 10)).collect::<Vec<_>>())
            .unwrap()
            .0
    }

    #[test]
    fn a_store_that_comes_back_holding_less_never_reuses_a_number_and_reports_the_loss() {
        let dir = tmp();
        let o = opts(dir.path());
        let old = dir.path().join("old");
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            assert_eq!(append_n(&q, 5), 1..=5);
            q.ack_upto(2).unwrap();
            q.sync().unwrap();
        }
        // sled cutting its log at a damaged entry: the store as it was, the numbering as it is.
        copy_dir(&o.path, &old);
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            assert_eq!(append_n(&q, 5), 6..=10);
            // killed: no sync
        }
        std::fs::remove_dir_all(&o.path).unwrap();
        copy_dir(&old, &o.path);
        let (q, opened) = Queue::open(o.clone()).unwrap();
        assert_eq!(opened, Opened::Clean);
        assert_eq!(
            q.lost_at_open(),
            &[Loss {
                first_seq: 6,
                last_seq: 10,
                reason: "store_rollback"
            }]
        );
        assert_eq!(append_n(&q, 1), 11..=11, "never 6 again");
        let u = q.unreported_evictions();
        assert_eq!(
            (u.ranges.clone(), u.reasons.clone()),
            (vec![(6, 10)], vec!["store_rollback".to_string()])
        );
    }

    #[test]
    fn a_deleted_store_continues_the_numbering_and_reports_what_was_not_delivered() {
        let dir = tmp();
        let o = opts(dir.path());
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            append_n(&q, 8);
            q.ack_upto(5).unwrap();
        }
        std::fs::remove_dir_all(&o.path).unwrap();
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert_eq!(
            q.lost_at_open(),
            &[Loss {
                first_seq: 6,
                last_seq: 8,
                reason: "store_missing"
            }]
        );
        assert_eq!(append_n(&q, 1), 9..=9);
    }

    #[test]
    fn a_kill_or_a_clean_stop_leaves_no_gap_and_reports_no_loss() {
        let dir = tmp();
        let o = opts(dir.path());
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            append_n(&q, 3);
        }
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert!(q.lost_at_open().is_empty());
        assert_eq!(append_n(&q, 1), 4..=4, "killed (same boot): right after");
        q.sync().unwrap();
        drop(q);
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert_eq!(append_n(&q, 1), 5..=5, "clean stop: right after");
    }

    #[test]
    fn acknowledgements_sled_lost_are_not_sent_again() {
        let dir = tmp();
        let o = opts(dir.path());
        let old = dir.path().join("old");
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            append_n(&q, 10);
            q.ack_upto(2).unwrap();
            q.sync().unwrap();
        }
        copy_dir(&o.path, &old);
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            q.ack_upto(8).unwrap();
        }
        // The store forgot the acks of 3..8 (not flushed when the process died).
        std::fs::remove_dir_all(&o.path).unwrap();
        copy_dir(&old, &o.path);
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert_eq!(q.acked(), 8);
        assert_eq!(q.read_from(q.acked() + 1, 100).unwrap().len(), 2);
        assert_eq!(q.backlog().records, 2);
        assert!(q.lost_at_open().is_empty());
    }

    #[test]
    fn only_a_lora_edge_store_or_an_empty_place_is_opened_and_nothing_else_is_moved() {
        let dir = tmp();
        let o = opts(dir.path());
        // A regular file: refused, left where and as it was.
        std::fs::write(&o.path, b"precious").unwrap();
        let e = Queue::open(o.clone()).err().expect("refused");
        assert!(e.is_setup() && e.to_string().contains("is a file"), "{e}");
        assert_eq!(std::fs::read(&o.path).unwrap(), b"precious");
        std::fs::remove_file(&o.path).unwrap();
        // A directory of someone else's: refused, untouched.
        std::fs::create_dir(&o.path).unwrap();
        std::fs::write(o.path.join("thesis.odt"), b"x").unwrap();
        let e = Queue::open(o.clone()).err().expect("refused");
        assert!(e.is_setup() && e.to_string().contains("thesis.odt"), "{e}");
        assert_eq!(std::fs::read_dir(&o.path).unwrap().count(), 1);
        std::fs::remove_file(o.path.join("thesis.odt")).unwrap();
        // Empty: becomes a store; then it is recognised as ours.
        drop(Queue::open(o.clone()).unwrap());
        assert!(o.path.join(MARKER).exists());
        assert_eq!(Queue::open(o.clone()).unwrap().1, Opened::Clean);
    }

    #[test]
    fn a_store_directory_that_cannot_be_created_is_a_setup_error_naming_it() {
        let dir = tmp();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let mut o = opts(dir.path());
        o.path = dir.path().join("file/store");
        let e = Queue::open(o).err().expect("refused");
        assert!(
            e.is_setup()
                && e.to_string()
                    .starts_with("cannot create the store directory"),
            "{e}"
        );
    }

    /// Random appends, deliveries, kills, rollbacks, deletions, corruptions and restarts, with
    /// fixed seeds. Invariants: a sequence number is never given to two different events, and
    /// every number ever accepted is either delivered or reported lost (at open, or evicted).
    /// It fails with the numbering file ignored (numbers restart or repeat after a rollback)
    /// and with the losses at open not reported.
    #[test]
    fn random_damage_never_reuses_a_number_and_never_loses_one_silently() {
        use std::collections::{BTreeSet, HashMap};
        for seed in [1u64, 2, 3, 4] {
            let mut rng = fastrand::Rng::with_seed(seed);
            let dir = tmp();
            let o = opts(dir.path());
            let snapshot = dir.path().join("snapshot");
            let mut accepted: HashMap<u64, u64> = HashMap::new();
            let mut delivered: HashMap<u64, u64> = HashMap::new();
            let mut reported: BTreeSet<u64> = BTreeSet::new();
            let mut next_id = 0u64;
            // What reaches the centre: the notices the store builds from its unreported ranges.
            let note =
                |q: &Queue, reported: &mut BTreeSet<u64>, accepted: &mut HashMap<u64, u64>| {
                    let notice = q
                        .report_evictions(|u| {
                            for (a, b) in &u.ranges {
                                reported.extend(*a..=*b);
                            }
                            NewRecord {
                                kind: 2,
                                flags: 0,
                                at_ms: 1_000,
                                payload: u64::MAX.to_be_bytes().to_vec(),
                            }
                        })
                        .unwrap();
                    if let Some(seq) = notice {
                        assert!(accepted.insert(seq, u64::MAX).is_none());
                    }
                };
            let (mut q, _) = Queue::open(o.clone()).unwrap();
            note(&q, &mut reported, &mut accepted);
            for _ in 0..150 {
                match rng.u32(0..100) {
                    0..=44 => {
                        let n = rng.u64(1..20);
                        let recs: Vec<NewRecord> = (0..n)
                            .map(|i| NewRecord {
                                kind: 1,
                                flags: 0,
                                at_ms: 1_000,
                                payload: (next_id + i).to_be_bytes().to_vec(),
                            })
                            .collect();
                        let (range, ev) = q.append(&recs).unwrap();
                        assert!(ev.is_empty());
                        for (seq, i) in range.zip(0..) {
                            let id = next_id + i;
                            assert!(
                                accepted.insert(seq, id).is_none(),
                                "seed {seed}: seq {seq} given to a second event"
                            );
                        }
                        next_id += n;
                    }
                    45..=74 => {
                        let got = q.read_from(q.acked() + 1, rng.usize(1..30)).unwrap();
                        for r in &got {
                            let id = u64::from_be_bytes(r.payload[..8].try_into().unwrap());
                            assert_eq!(
                                accepted.get(&r.seq),
                                Some(&id),
                                "seed {seed}: seq {} published with other content",
                                r.seq
                            );
                            delivered.insert(r.seq, id);
                        }
                        if let Some(last) = got.last() {
                            q.ack_upto(last.seq).unwrap();
                        }
                    }
                    damage => {
                        let clean = rng.bool();
                        if clean {
                            q.sync().unwrap();
                        }
                        drop(q);
                        match damage {
                            75..=82 => {} // a kill or a clean restart
                            83..=88 => {
                                let _ = std::fs::remove_dir_all(&snapshot);
                                copy_dir(&o.path, &snapshot);
                            }
                            89..=93 if snapshot.exists() => {
                                std::fs::remove_dir_all(&o.path).unwrap();
                                copy_dir(&snapshot, &o.path);
                            }
                            94..=96 => std::fs::remove_dir_all(&o.path).unwrap(),
                            _ => {
                                let db = o.path.join("db");
                                if db.exists() {
                                    let len = std::fs::metadata(&db).unwrap().len() as usize;
                                    std::fs::write(&db, vec![0xA5; len.max(4096)]).unwrap();
                                }
                            }
                        }
                        q = Queue::open(o.clone()).unwrap().0;
                        note(&q, &mut reported, &mut accepted);
                    }
                }
            }
            // What the store still holds will be delivered.
            for r in q.read_from(q.acked() + 1, usize::MAX).unwrap() {
                delivered.insert(r.seq, 0);
            }
            for seq in accepted.keys() {
                assert!(
                    delivered.contains_key(seq) || reported.contains(seq),
                    "seed {seed}: seq {seq} accepted, never delivered, never reported lost"
                );
            }
        }
    }
}
