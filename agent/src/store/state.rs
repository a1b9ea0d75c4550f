//! Small durable values of the other stages (the rules' sessions and counters, latches,
//! lockouts, start history, the copies of FCntDown), in one append-only file
//! (`<store>/state.log`) read whole into memory at start.
//!
//! What it guarantees:
//! - `put` returns once the value is in the page cache: a killed process loses nothing put.
//!   The file is `fdatasync`ed at the store's next commit (`store.commit_interval`), which
//!   bounds what a power cut loses. A put costs its own bytes, not a database flush.
//! - Each entry carries a CRC: a damaged entry is skipped (the key keeps its previous value,
//!   or none), the others are read.
//! - When the file holds more than four times its live entries (and over 64 KiB), it is
//!   rewritten with the live ones beside and renamed over: a kill leaves one or the other.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const FILE: &str = "state.log";
const MAGIC: [u8; 4] = *b"LEs1";
/// magic, crc, key length (2), value length (4).
const HEADER: usize = 4 + 4 + 2 + 4;
const MAX_VALUE: usize = 1 << 20;
const COMPACT_ABOVE: u64 = 64 * 1024;

pub struct State {
    path: PathBuf,
    file: File,
    end: u64,
    values: BTreeMap<String, Vec<u8>>,
    dirty: bool,
    /// Entries found damaged when the file was read.
    damaged: u32,
}

fn entry(key: &str, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + key.len() + value.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&(key.len() as u16).to_be_bytes());
    b.extend_from_slice(&(value.len() as u32).to_be_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(value);
    let crc = crc32fast::hash(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_be_bytes());
    b
}

/// The entry at the start of `b` if sound: (key, value, size).
fn parse(b: &[u8]) -> Option<(String, Vec<u8>, usize)> {
    if b.len() < HEADER || b[0..4] != MAGIC {
        return None;
    }
    let klen = u16::from_be_bytes([b[8], b[9]]) as usize;
    let vlen = u32::from_be_bytes(b[10..14].try_into().ok()?) as usize;
    let end = HEADER + klen + vlen;
    if vlen > MAX_VALUE || end > b.len() {
        return None;
    }
    if crc32fast::hash(&b[8..end]).to_be_bytes() != b[4..8] {
        return None;
    }
    let key = String::from_utf8(b[HEADER..HEADER + klen].to_vec()).ok()?;
    Some((key, b[HEADER + klen..end].to_vec(), end))
}

impl State {
    pub fn path_for(store: &Path) -> PathBuf {
        store.join(FILE)
    }

    pub fn open(store: &Path) -> io::Result<State> {
        let path = Self::path_for(store);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let bytes = std::fs::read(&path)?;
        let mut values = BTreeMap::new();
        let mut damaged = 0;
        let mut off = 0;
        let mut end = 0;
        while off + HEADER <= bytes.len() {
            match parse(&bytes[off..]) {
                Some((k, v, n)) => {
                    values.insert(k, v);
                    off += n;
                    end = off;
                }
                None => {
                    // A damaged entry, or the end: the next sound entry, if any, goes on.
                    let next = bytes[off + 1..]
                        .windows(4)
                        .enumerate()
                        .filter(|(_, w)| *w == MAGIC)
                        .map(|(i, _)| off + 1 + i)
                        .find(|&at| parse(&bytes[at..]).is_some());
                    match next {
                        Some(at) => {
                            damaged += 1;
                            off = at;
                        }
                        None => {
                            if bytes[off..].iter().any(|b| *b != 0) {
                                damaged += 1;
                            }
                            break;
                        }
                    }
                }
            }
        }
        let mut s = State {
            path,
            file,
            end: end as u64,
            values,
            dirty: false,
            damaged,
        };
        if damaged > 0 || end < bytes.len() {
            // What follows the last sound entry is dropped: the next put goes after it. On a
            // full disk the rewrite waits: puts overwrite the tail meanwhile.
            if let Err(e) = s.compact() {
                tracing::warn!(error = %e, "store: state.log not compacted yet");
            }
        }
        Ok(s)
    }

    pub fn damaged(&self) -> u32 {
        self.damaged
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.values.get(key).cloned()
    }

    pub fn put(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        if key.len() > u16::MAX as usize || value.len() > MAX_VALUE {
            return Err(io::Error::other("state value too large"));
        }
        if self.values.get(key).is_some_and(|v| v == value) {
            return Ok(());
        }
        let e = entry(key, value);
        self.file.write_all_at(&e, self.end)?;
        self.end += e.len() as u64;
        self.values.insert(key.to_string(), value.to_vec());
        self.dirty = true;
        let live: u64 = self
            .values
            .iter()
            .map(|(k, v)| (HEADER + k.len() + v.len()) as u64)
            .sum();
        if self.end > COMPACT_ABOVE && self.end > 4 * live {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file with the live entries only.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("log.new");
        let mut f = File::create(&tmp)?;
        let mut end = 0u64;
        for (k, v) in &self.values {
            let e = entry(k, v);
            f.write_all(&e)?;
            end += e.len() as u64;
        }
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.end = end;
        self.dirty = false;
        Ok(())
    }

    /// The file to fdatasync if a put happened since the last commit.
    pub fn is_unsynced(&self) -> bool {
        self.dirty
    }

    pub fn take_unsynced(&mut self) -> Option<File> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.file.try_clone().ok()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_a_reopen_and_a_damaged_entry_costs_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = State::open(dir.path()).unwrap();
            for i in 0..50 {
                s.put(&format!("k{}", i % 10), format!("v{i}").as_bytes())
                    .unwrap();
            }
        }
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.get("k3").unwrap(), b"v43");
        assert_eq!(s.damaged(), 0);
        drop(s);
        // Flip a byte in the value of the last entry of k7 (v47).
        let path = State::path_for(dir.path());
        let mut b = std::fs::read(&path).unwrap();
        let at = b.windows(3).rposition(|w| w == b"v47").unwrap();
        b[at + 1] ^= 0x40;
        std::fs::write(&path, b).unwrap();
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(s.damaged(), 1);
        assert_eq!(s.get("k7").unwrap(), b"v37", "the previous value");
        assert_eq!(s.get("k8").unwrap(), b"v48", "the others are read");
        s.put("k7", b"new").unwrap();
        drop(s);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.get("k7").unwrap(), b"new");
        assert_eq!(s.damaged(), 0, "damage is compacted away");
    }

    #[test]
    fn the_file_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        for i in 0..20_000u32 {
            s.put("counter", &i.to_be_bytes()).unwrap();
        }
        assert!(s.disk_bytes() < 2 * COMPACT_ABOVE, "{}", s.disk_bytes());
        drop(s);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.get("counter").unwrap(), 19_999u32.to_be_bytes());
    }
}
