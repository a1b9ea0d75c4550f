//! The accept stage: numbers, encodes and appends events in batches (group commit), evicts
//! what the bounds require, and wakes the backhaul.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::queue::{Eviction, NewRecord, Queue};
use crate::config::Encoding;
use crate::events::{unix_ms, Body, Event};
use crate::ops::counters::Counters;

/// Events appended in one batch at most; a batch is one flush.
const MAX_BATCH: usize = 512;

pub struct Writer {
    pub queue: Arc<Queue>,
    pub input: Receiver<Event>,
    pub encoding: Encoding,
    /// The last sequence number appended.
    pub appended: watch::Sender<u64>,
    pub counters: Arc<Counters>,
}

pub fn eviction_notice(e: &Eviction) -> Event {
    tracing::warn!(
        first_seq = e.first_seq,
        last_seq = e.last_seq,
        records = e.records,
        bytes = e.bytes,
        reason = e.reason,
        "store bound reached: oldest events evicted unsent"
    );
    Event {
        at: SystemTime::now(),
        body: Body::Notice(serde_json::json!({
            "event": "evicted",
            "reason": e.reason,
            "firstSeq": e.first_seq,
            "lastSeq": e.last_seq,
            "records": e.records,
            "bytes": e.bytes,
        })),
    }
}

impl Writer {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("store-writer".into()).spawn(move || self.run())
    }

    fn run(self) {
        let mut batch: Vec<Event> = Vec::with_capacity(MAX_BATCH);
        let mut next_age_check = Instant::now();
        let mut open = true;
        while open || !batch.is_empty() {
            if batch.is_empty() {
                match self.input.recv_timeout(Duration::from_secs(1)) {
                    Ok(e) => batch.push(e),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while batch.len() < MAX_BATCH {
                match self.input.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let mut notices = Vec::new();
            if !batch.is_empty() {
                notices.extend(self.append(std::mem::take(&mut batch)));
            }
            if Instant::now() >= next_age_check {
                next_age_check = Instant::now() + Duration::from_secs(1);
                match self.queue.evict_expired(unix_ms(SystemTime::now())) {
                    Ok(Some(e)) => notices.push(self.evicted(&e)),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "store: expiring old events"),
                }
            }
            batch.extend(notices);
        }
        if let Err(e) = self.queue.sync() {
            tracing::error!(error = %e, "store: final sync");
        }
    }

    fn evicted(&self, e: &Eviction) -> Event {
        Counters::add(&self.counters.evicted_events, e.records);
        eviction_notice(e)
    }

    /// Appends a batch; returns the notices its evictions call for.
    fn append(&self, events: Vec<Event>) -> Vec<Event> {
        let first = self.queue.next_seq();
        let uplinks = events.iter().filter(|e| matches!(e.body, Body::Uplink(_))).count() as u64;
        let records: Vec<NewRecord> = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| NewRecord {
                kind: e.kind() as u8,
                flags: e.flags(),
                at_ms: unix_ms(e.at),
                payload: e.encode(first + i as u64, self.encoding),
            })
            .collect();
        match self.queue.append(&records) {
            Ok((range, evictions)) => {
                debug_assert_eq!(*range.start(), first);
                Counters::add(&self.counters.up_accepted, uplinks);
                self.appended.send_replace(*range.end());
                evictions.iter().map(|e| self.evicted(e)).collect()
            }
            Err(e) => {
                Counters::add(&self.counters.store_rejected, records.len() as u64);
                tracing::error!(error = %e, events = records.len(), "store: events could not be accepted");
                Vec::new()
            }
        }
    }
}
