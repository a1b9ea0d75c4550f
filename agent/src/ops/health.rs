//! Liveness for systemd's watchdog (`WatchdogSec=` in the unit): `WATCHDOG=1` is sent only while
//! the radio loop, the store writer and the backhaul all show progress — each stamps its
//! heartbeat as it goes round, whatever the state of the hardware or the network (a radio
//! retrying a dead board, a backhaul in its back-off are progress; a thread stuck in a call is
//! not). systemd restarts a process that stops sending it. Without `WATCHDOG_USEC` (not under
//! systemd, or no watchdog configured) this does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::counters::Counters;

/// Heartbeats of the stages the watchdog watches, in Unix milliseconds.
#[derive(Debug, Default)]
pub struct Heartbeats {
    pub radio: AtomicU64,
    pub store: AtomicU64,
    pub backhaul: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Heartbeats {
    pub fn beat(which: &AtomicU64) {
        which.store(now_ms(), Ordering::Relaxed);
    }

    /// The stages whose last heartbeat is older than `limit`.
    pub fn stalled(&self, limit: Duration) -> Vec<&'static str> {
        let now = now_ms();
        [
            ("radio", &self.radio),
            ("store", &self.store),
            ("backhaul", &self.backhaul),
        ]
        .into_iter()
        .filter(|(_, b)| now.saturating_sub(b.load(Ordering::Relaxed)) > limit.as_millis() as u64)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The watchdog's period, as libsystemd's `sd_watchdog_enabled` reads it: `WATCHDOG_USEC`,
/// for this process if `WATCHDOG_PID` says so or is not set. (The sd-notify crate also
/// requires `WATCHDOG_PID`.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// Feeds systemd's watchdog while every stage makes progress; returns at shutdown.
pub async fn feed_watchdog(counters: Arc<Counters>, mut shutdown: watch::Receiver<bool>) {
    let beats = &counters.beats;
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let timeout = Duration::from_micros(usec);
    // Each stage gets the limit to make its first beat: a stage that never beat is not stalled
    // the moment the feeder starts.
    for b in [&beats.radio, &beats.store, &beats.backhaul] {
        if b.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            Heartbeats::beat(b);
        }
    }
    // A stage is stalled when it has not beaten for half the watchdog's time.
    let limit = timeout / 2;
    let mut tick = tokio::time::interval(timeout / 4);
    let mut reported = false;
    tracing::info!(timeout = ?timeout, "systemd watchdog: fed while the radio, store and backhaul make progress");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let stalled = beats.stalled(limit);
        if stalled.is_empty() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            reported = false;
        } else if !reported {
            tracing::error!(?stalled, "ALARM: no progress: the systemd watchdog is no longer fed and will restart the agent");
            reported = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_stops_beating_is_named() {
        let h = Heartbeats::default();
        Heartbeats::beat(&h.radio);
        Heartbeats::beat(&h.store);
        assert_eq!(h.stalled(Duration::from_secs(5)), vec!["backhaul"]);
        Heartbeats::beat(&h.backhaul);
        assert!(h.stalled(Duration::from_secs(5)).is_empty());
    }
}
