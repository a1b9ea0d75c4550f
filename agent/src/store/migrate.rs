//! Carrying over a store written in the earlier format (format 2: one sled database in the
//! store directory), so that an upgrade loses neither the backlog nor the rules' state.
//!
//! What it guarantees: records keep their numbers, time and bytes; the acknowledged
//! watermark, the unreported losses and the state values come along. The old files are
//! deleted only once the new ones are complete and synced; a migration cut short starts over
//! at the next start. A database sled cannot open is kept in `damaged/` and its numbers are
//! reported lost by the recovery (`store_corrupt`).

use std::path::{Path, PathBuf};

use super::log::Log;
use super::queue::{NewRecord, QueueOptions, StoreError, JOURNAL_FILES};
use super::state::State;
use super::unreported::{Ledger, Unreported};

const META_KEY: &[u8] = b"\xffmeta";
const UNREPORTED_KEY: &[u8] = b"\xffunreported";
/// Format 2's record value: format (1), kind (1), flags (1), at_ms (8), payload.
const V2_HEADER: usize = 11;

fn sled_files(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    n.is_some_and(|n| {
                        matches!(n.as_str(), "conf" | "db" | "blobs") || n.starts_with("snap.")
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn remove(paths: &[PathBuf]) {
    for p in paths {
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(p);
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct V2 {
    acked: u64,
    evicted: u64,
    unreported: Option<Unreported>,
    records: Vec<(u64, NewRecord)>,
    state: Vec<(String, Vec<u8>)>,
}

fn read_v2(store: &Path) -> Result<V2, String> {
    let config = sled::Config::new().path(store).cache_capacity(2 << 20);
    let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
        .map_err(|_| "sled panicked while opening it".to_string())?
        .map_err(|e| e.to_string())?;
    let tree = db.open_tree("queue").map_err(|e| e.to_string())?;
    let meta = tree
        .get(META_KEY)
        .map_err(|e| e.to_string())?
        .ok_or("its metadata is missing")?;
    if meta.len() != 40 {
        return Err("its metadata is unreadable".into());
    }
    let acked = u64::from_be_bytes(meta[8..16].try_into().expect("8 bytes"));
    let evicted = u64::from_be_bytes(meta[32..40].try_into().expect("8 bytes"));
    let unreported = tree
        .get(UNREPORTED_KEY)
        .map_err(|e| e.to_string())?
        .and_then(|v| serde_json::from_slice(&v).ok());
    let mut records = Vec::new();
    for item in tree.range(..META_KEY.to_vec()) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let Ok(k) = <[u8; 8]>::try_from(&k[..]) else {
            continue;
        };
        let seq = u64::from_be_bytes(k);
        // An unreadable record is left out: the recovery reports its number lost.
        if seq <= acked || v.len() < V2_HEADER || v[0] != 2 {
            continue;
        }
        records.push((
            seq,
            NewRecord {
                kind: v[1],
                flags: v[2],
                at_ms: u64::from_be_bytes(v[3..11].try_into().expect("8 bytes")),
                payload: v[V2_HEADER..].to_vec(),
            },
        ));
    }
    let st = db.open_tree("state").map_err(|e| e.to_string())?;
    let mut state = Vec::new();
    for item in st.iter() {
        let (k, v) = item.map_err(|e| e.to_string())?;
        state.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
    }
    Ok(V2 {
        acked,
        evicted,
        unreported,
        records,
        state,
    })
}

/// Carries a format-2 store over; `damaged` and `why` get what could not be read.
pub(super) fn from_sled(
    store: &Path,
    opts: &QueueOptions,
    damaged: &mut Vec<PathBuf>,
    why: &mut Vec<String>,
) -> Result<(), StoreError> {
    let v2 = match read_v2(store) {
        Ok(v) => v,
        Err(e) => {
            // Kept for inspection like a damaged segment; its numbers are reported lost.
            why.push(format!("the earlier store (sled) could not be read: {e}"));
            let dir = store
                .join("damaged")
                .join(format!("sled-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            for p in &sled_files(store) {
                if let Some(n) = p.file_name() {
                    let _ = std::fs::rename(p, dir.join(n));
                }
            }
            damaged.push(dir);
            return Ok(());
        }
    };
    // A migration cut short left a partial log: start it over.
    let log_dir = Log::dir_for(store);
    let _ = std::fs::remove_dir_all(&log_dir);
    let _ = std::fs::remove_file(State::path_for(store));
    let (mut log, _) = Log::open(&log_dir, opts.segment_bytes(), JOURNAL_FILES, 0, u64::MAX)?;
    let migrate = |log: &mut Log| -> std::io::Result<()> {
        let mut i = 0;
        while i < v2.records.len() {
            // A run of consecutive numbers is one append.
            let first = v2.records[i].0;
            let mut j = i + 1;
            while j < v2.records.len() && v2.records[j].0 == v2.records[j - 1].0 + 1 {
                j += 1;
            }
            let batch: Vec<NewRecord> = v2.records[i..j].iter().map(|r| r.1.clone()).collect();
            for (ci, chunk) in batch.chunks(256).enumerate() {
                let at = first + (ci * 256) as u64;
                let sizes: Vec<u64> = chunk
                    .iter()
                    .map(|r| super::log::record_size(r.payload.len()))
                    .collect();
                while log.spare_count() < log.files_needed(&sizes) {
                    let largest = sizes.iter().copied().max().unwrap_or(0);
                    log.allocate(largest)?;
                }
                log.append(at, chunk)?;
            }
            i = j;
        }
        for (_, f) in log.take_all_unsynced() {
            f.sync_data()?;
        }
        Ok(())
    };
    migrate(&mut log)?;
    let mut state = State::open(store)?;
    for (k, v) in &v2.state {
        state.put(k, v)?;
    }
    if let Some(f) = state.take_unsynced() {
        f.sync_data()?;
    }
    let mut unreported = v2.unreported.unwrap_or_default();
    unreported.done = unreported.done.max(v2.acked);
    unreported.evicted_total = v2.evicted;
    Ledger::open(store).0.save(&unreported, true)?;
    std::fs::write(
        store.join("lora-edge-queue"),
        b"lora-edge durable queue, format 3\n",
    )?;
    // Listed again: sled writes a snapshot file when the database closes.
    remove(&sled_files(store));
    tracing::warn!(
        records = v2.records.len(),
        state_values = v2.state.len(),
        "store: carried over from the earlier format (sled); its files were removed"
    );
    Ok(())
}
