//! The accept stage: numbers, encodes and appends events in batches (group commit), evicts
//! what the bounds require, and wakes the backhaul.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::queue::{Eviction, NewRecord, Queue};
use crate::events::{unix_ms, Body, Event};
use crate::ops::counters::Counters;

/// Events appended in one batch at most; a batch is one flush.
const MAX_BATCH: usize = 512;

pub struct Writer {
    pub queue: Arc<Queue>,
    pub input: Receiver<Event>,
    /// The last sequence number appended.
    pub appended: watch::Sender<u64>,
    pub counters: Arc<Counters>,
}

/// Evicted sequence numbers not yet reported to the centre, as sorted, merged ranges.
///
/// During an outage evictions are continuous and merge into one growing range; a notice is
/// published only while the backhaul is up, so notices never crowd the queue. A notice that is
/// itself evicted before the broker has it gives its ranges back here, so every evicted
/// sequence number is reported (exact while the process lives; a kill loses the unsent summary,
/// not the total in `store_evicted_total`).
#[derive(Debug, Default)]
struct Unreported {
    ranges: Vec<(u64, u64)>,
    records: u64,
    bytes: u64,
    reasons: Vec<&'static str>,
    /// Notices appended but not yet acknowledged: their seq and the ranges they carry.
    in_flight: BTreeMap<u64, Vec<(u64, u64)>>,
    last_notice: Option<Instant>,
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
        if !self.reasons.contains(&e.reason) {
            self.reasons.push(e.reason);
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

    fn take_notice(&mut self) -> Option<(Event, Vec<(u64, u64)>)> {
        if self.ranges.is_empty() {
            return None;
        }
        let ranges = std::mem::take(&mut self.ranges);
        let notice = serde_json::json!({
            "event": "evicted",
            "reasons": std::mem::take(&mut self.reasons),
            "ranges": ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
            "records": std::mem::take(&mut self.records),
            "bytes": std::mem::take(&mut self.bytes),
        });
        self.last_notice = Some(Instant::now());
        Some((
            Event {
                at: SystemTime::now(),
                body: Body::Notice(notice),
            },
            ranges,
        ))
    }
}

impl Writer {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let mut batch: Vec<Event> = Vec::with_capacity(MAX_BATCH);
        let mut next_age_check = Instant::now();
        let mut open = true;
        let mut unreported = Unreported::default();
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
            if !batch.is_empty() {
                for e in self.append(std::mem::take(&mut batch)) {
                    self.evicted(&e, &mut unreported);
                }
            }
            if Instant::now() >= next_age_check {
                next_age_check = Instant::now() + Duration::from_secs(1);
                match self.queue.evict_expired(unix_ms(SystemTime::now())) {
                    Ok(Some(e)) => self.evicted(&e, &mut unreported),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "store: expiring old events"),
                }
                self.report(&mut unreported);
            }
        }
        if let Err(e) = self.queue.sync() {
            tracing::error!(error = %e, "store: final sync");
        }
    }

    fn evicted(&self, e: &Eviction, unreported: &mut Unreported) {
        Counters::add(&self.counters.evicted_events, e.records);
        tracing::warn!(
            first_seq = e.first_seq,
            last_seq = e.last_seq,
            records = e.records,
            bytes = e.bytes,
            reason = e.reason,
            "store bound reached: oldest events evicted unsent"
        );
        unreported.add(e);
    }

    /// Publishes the eviction summary while the backhaul is up, at most once a second.
    fn report(&self, unreported: &mut Unreported) {
        let acked = self.queue.acked();
        unreported.in_flight.retain(|seq, _| *seq > acked);
        if !self.counters.backhaul_up.load(Ordering::Relaxed)
            || unreported
                .last_notice
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let Some((notice, ranges)) = unreported.take_notice() else {
            return;
        };
        let first = self.queue.next_seq();
        let evictions = self.append(vec![notice]);
        if self.queue.next_seq() > first {
            unreported.in_flight.insert(first, ranges);
        } else {
            for (a, b) in ranges {
                unreported.add_range(a, b);
            }
        }
        for e in evictions {
            self.evicted(&e, unreported);
        }
    }

    /// Appends a batch; returns the evictions it caused.
    fn append(&self, events: Vec<Event>) -> Vec<Eviction> {
        let first = self.queue.next_seq();
        let uplinks = events
            .iter()
            .filter(|e| matches!(e.body, Body::Uplink(_)))
            .count() as u64;
        let records: Vec<NewRecord> = events
            .into_iter()
            .map(|e| NewRecord {
                kind: e.kind() as u8,
                flags: e.flags(),
                at_ms: unix_ms(e.at),
                payload: e.stored(),
            })
            .collect();
        match self.queue.append(&records) {
            Ok((range, evictions)) => {
                debug_assert_eq!(*range.start(), first);
                Counters::add(&self.counters.up_accepted, uplinks);
                self.appended.send_replace(*range.end());
                evictions
            }
            Err(e) => {
                Counters::add(&self.counters.store_rejected, records.len() as u64);
                tracing::error!(error = %e, events = records.len(), "store: events could not be accepted");
                Vec::new()
            }
        }
    }
}
