//! The accept stage: numbers, encodes and appends events in batches (group commit), evicts
//! what the bounds require, and wakes the backhaul.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::queue::{Eviction, NewRecord, Queue};
use super::unreported::Unreported;
use crate::events::{unix_ms, Body, Event};
use crate::ops::counters::Counters;

/// Events appended in one batch at most; a batch is one flush.
const MAX_BATCH: usize = 512;

/// Evictions not logged yet. At the budget during an outage every batch evicts; one line a
/// second says the same without filling the log (and the SD card) with a line per batch. The
/// count is exact; the exact ranges are in the `evicted` notices.
#[derive(Debug, Default)]
struct EvictionLog {
    first_seq: u64,
    last_seq: u64,
    records: u64,
    bytes: u64,
    reasons: Vec<&'static str>,
}

impl EvictionLog {
    fn add(&mut self, e: &Eviction) {
        if self.records == 0 {
            self.first_seq = e.first_seq;
        }
        self.last_seq = e.last_seq;
        self.records += e.records;
        self.bytes += e.bytes;
        if !self.reasons.contains(&e.reason) {
            self.reasons.push(e.reason);
        }
    }

    fn flush(&mut self, last_error: Option<String>) {
        if self.records == 0 {
            return;
        }
        if self.reasons.contains(&"rejected") {
            tracing::error!(
                first_seq = self.first_seq,
                last_seq = self.last_seq,
                records = self.records,
                reason = self.reasons.join(","),
                error = last_error.unwrap_or_default(),
                "store: events could not be stored (reported lost to the centre)"
            );
        } else {
            tracing::warn!(
                first_seq = self.first_seq,
                last_seq = self.last_seq,
                records = self.records,
                bytes = self.bytes,
                reason = self.reasons.join(","),
                "store bound reached: oldest events evicted unsent"
            );
        }
        *self = EvictionLog::default();
    }
}

pub struct Writer {
    pub queue: Arc<Queue>,
    pub input: Receiver<Event>,
    /// The last sequence number appended.
    pub appended: watch::Sender<u64>,
    pub counters: Arc<Counters>,
    /// How often the store is committed (fdatasync of what the broker has not acknowledged).
    pub commit_interval: Duration,
}

impl Writer {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // Without its writer the agent would run on, accepting nothing and counting
                // nothing: better to end and be restarted (what was accepted is in the page
                // cache; the panic hook has driven the pumps off).
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run())).is_err() {
                    tracing::error!("ALARM: the store writer failed (panic, logged above): the agent exits so that the service manager restarts it");
                    std::process::exit(70);
                }
            })
    }

    fn run(self) {
        // The commit (fdatasync, milliseconds to tens of them on an SD card) runs beside the
        // appends, so that frames keep being accepted while it waits for the card.
        // It waits for the writer's word (`store/commit.rs`): records not acknowledged one
        // interval after they were appended, or a changed state.
        let committer = {
            let queue = self.queue.clone();
            std::thread::Builder::new()
                .name("store-commit".into())
                .spawn(move || {
                    while queue.wait_commit() {
                        if let Err(e) = queue.commit() {
                            tracing::error!(error = %e, "store: commit (fdatasync) failed");
                        }
                    }
                })
        };
        if let Err(e) = &committer {
            tracing::error!(error = %e, "store: the commit thread could not start: nothing is synced before shutdown, a power cut may lose more than store.commit_interval");
        }
        let mut batch: Vec<Event> = Vec::with_capacity(MAX_BATCH);
        let mut next_age_check = Instant::now();
        let mut open = true;
        let mut last_notice: Option<Instant> = None;
        let mut unlogged = EvictionLog::default();
        // The store error behind the rejections of the last second, for its log line.
        let mut last_error = None;
        // True while appends fail: the first success after says so.
        let mut failing = false;
        // When to look whether what was appended is still unacknowledged (then commit).
        let mut commit_due: Option<Instant> = None;
        while open || !batch.is_empty() {
            crate::ops::health::Heartbeats::beat(&self.counters.beats.store);
            if batch.is_empty() {
                let until = commit_due.map_or(next_age_check, |d| d.min(next_age_check));
                match self
                    .input
                    .recv_timeout(until.saturating_duration_since(Instant::now()))
                {
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
                for e in self.append(std::mem::take(&mut batch), &mut last_error, &mut failing) {
                    self.evicted(&e, &mut unlogged);
                }
            }
            if Instant::now() >= next_age_check {
                next_age_check = Instant::now() + Duration::from_secs(1);
                match self.queue.evict_expired(unix_ms(SystemTime::now())) {
                    Ok(Some(e)) => self.evicted(&e, &mut unlogged),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "store: expiring old events"),
                }
                self.report(&mut last_notice);
                unlogged.flush(last_error.take());
            }
            let now = Instant::now();
            if commit_due.is_some_and(|d| now >= d) {
                commit_due = None;
                if self.queue.needs_commit() {
                    self.queue.commit_soon();
                }
            }
            if commit_due.is_none() && self.queue.needs_commit() {
                commit_due = Some(now + self.commit_interval);
            }
        }
        unlogged.flush(last_error.take());
        self.queue.close_commits();
        if let Ok(c) = committer {
            let _ = c.join();
        }
        if let Err(e) = self.queue.sync() {
            tracing::error!(error = %e, "store: final sync");
        }
    }

    fn evicted(&self, e: &Eviction, unlogged: &mut EvictionLog) {
        if e.reason != "rejected" {
            Counters::add(&self.counters.evicted_events, e.records);
        }
        unlogged.add(e);
    }

    /// Queues the summary of the evictions not reported yet, while the backhaul is up and at
    /// most once a second, so that during an outage notices never crowd the queue: the ranges
    /// merge in the store until then.
    fn report(&self, last_notice: &mut Option<Instant>) {
        if !self.counters.backhaul_up.load(Ordering::Relaxed)
            || last_notice.is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let notice = |u: &Unreported| {
            let v = serde_json::json!({
                "event": "evicted",
                "reasons": u.reasons,
                "ranges": u.ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                "records": u.records,
                "bytes": u.bytes,
            });
            let event = Event {
                at: SystemTime::now(),
                body: Body::Notice(v),
            };
            NewRecord {
                kind: event.kind() as u8,
                flags: event.flags(),
                at_ms: unix_ms(event.at),
                payload: event.stored(),
            }
        };
        match self.queue.report_evictions(notice) {
            Ok(Some(seq)) => {
                *last_notice = Some(Instant::now());
                self.appended.send_replace(seq);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "store: eviction notice not queued; retried"),
        }
    }

    /// Appends a batch; returns the evictions it caused (or, if the store refused it, the
    /// numbers it was given, reported lost, with the error in `last_error`).
    fn append(
        &self,
        events: Vec<Event>,
        last_error: &mut Option<String>,
        failing: &mut bool,
    ) -> Vec<Eviction> {
        // Receipts are told after the append, with its outcome: the events before each are in
        // this batch or an earlier one.
        let (receipts, events): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|e| matches!(e.body, Body::Receipt(_)));
        let tell = |appended: bool| {
            for r in &receipts {
                if let Body::Receipt(r) = &r.body {
                    r.tell(appended);
                }
            }
        };
        if events.is_empty() {
            tell(!*failing);
            return Vec::new();
        }
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
                let resumed = std::mem::take(failing);
                if resumed {
                    tracing::warn!("store: appends resume after a write failure");
                }
                debug_assert_eq!(*range.start(), first);
                Counters::add(&self.counters.up_accepted, uplinks);
                self.appended.send_replace(*range.end());
                // Right after a refused batch, a receipt here may also stand for events of
                // that batch: told "refused", which errs on the side of a re-send.
                tell(!resumed);
                evictions
            }
            Err(e) => {
                *failing = true;
                tell(false);
                Counters::add(&self.counters.store_rejected, records.len() as u64);
                // Numbered and reported lost like an eviction; logged with the evictions, at
                // most once a second, with the error.
                tracing::debug!(error = %e, events = records.len(), "store: events could not be accepted");
                match self.queue.reject(records.len() as u64) {
                    Some(ev) => {
                        *last_error = Some(e.to_string());
                        vec![ev]
                    }
                    None => {
                        tracing::error!(error = %e, events = records.len(), "store: events could not be accepted nor numbered");
                        Vec::new()
                    }
                }
            }
        }
    }
}
