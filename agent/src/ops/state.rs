//! `state/health`: what this gateway is doing, always current, for the network team.
//!
//! A retained JSON message under the gateway's tree, published at every connect, at once when
//! the radio, the backhaul or a pump changes state, and every `stats.interval` otherwise; at a
//! clean shutdown a last one says `"state":"stopped"`. It is not stored: an old health message
//! replayed after an outage would say nothing true. If the process dies, the retained
//! `state/conn` will (OFFLINE) says the gateway is gone: MQTT gives a session one will.
//!
//! This reporter only builds the message; the backhaul publishes the latest one (it knows
//! nothing of its content).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::counters::Counters;
use crate::events::unix_ms;
use crate::store::Queue;

/// What the process was started with, fixed for its life.
#[derive(Debug, Clone)]
pub struct Identity {
    pub gateway_id: String,
    pub version: String,
    pub hal: String,
    /// Each configuration file and the sha256 of its bytes, in the order given.
    pub config_files: Vec<(PathBuf, String)>,
    /// sha256 of the configuration as run: every file's bytes in order, then each `--set`.
    pub config_sha256: String,
    /// The client certificate's expiry, Unix seconds.
    pub certificate_expires: Option<i64>,
}

pub struct HealthReporter {
    pub identity: Identity,
    pub interval: Duration,
    pub counters: Arc<Counters>,
    pub queue: Arc<Queue>,
    pub store_path: PathBuf,
    pub output: watch::Sender<Vec<u8>>,
    pub shutdown: watch::Receiver<bool>,
}

/// How often the state is looked at for a change.
const LOOK: Duration = Duration::from_secs(1);

impl HealthReporter {
    pub async fn run(mut self) {
        let started = Instant::now();
        let mut last_key = None;
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(LOOK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.changed() => {
                    let report = self.report(started, "stopped");
                    self.output.send_replace(serde_json::to_vec(&report).unwrap_or_default());
                    return;
                }
            }
            // Looked at each second, built only when it goes out: an idle gateway pays for the
            // key (a few locks), not for the whole message and a statvfs.
            let key = self.state_key();
            if last_key.as_ref() != Some(&key) || last_sent.elapsed() >= self.interval {
                last_key = Some(key);
                last_sent = Instant::now();
                let report = self.report(started, "running");
                self.output
                    .send_replace(serde_json::to_vec(&report).unwrap_or_default());
            }
        }
    }

    /// What changes "the state" (and is published at once), as opposed to counts and ages.
    fn state_key(&self) -> String {
        let c = &self.counters;
        let radio = c.radio_status();
        let rules = c
            .rules_state
            .lock()
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        let pumps = c.pumps.lock().map(|p| format!("{p:?}")).unwrap_or_default();
        let sha = c
            .rules_sha256
            .lock()
            .map(|h| format!("{h:?}"))
            .unwrap_or_default();
        format!(
            "{}|{:?}|{:?}|{}|{rules}|{pumps}|{sha}",
            radio.state.name(),
            radio.cause,
            radio.last_error,
            Counters::get(&c.outages),
        )
    }

    fn report(&self, started: Instant, state: &str) -> Value {
        let c = &self.counters;
        let id = &self.identity;
        let now = SystemTime::now();
        let radio = c.radio_status();
        let backlog = self.queue.backlog();
        let mut status = Map::new();
        for (i, n) in c.tx_status.iter().enumerate() {
            let n = Counters::get(n);
            if n > 0 {
                if let Ok(s) = chirpstack_api::gw::TxAckStatus::try_from(i as i32) {
                    status.insert(s.as_str_name().to_string(), json!(n));
                }
            }
        }
        let duty: BTreeMap<String, f64> = c
            .duty_cycle_pct
            .lock()
            .map(|u| {
                u.iter()
                    .map(|(b, p)| (b.to_string(), (p * 1000.0).round() / 1000.0))
                    .collect()
            })
            .unwrap_or_default();
        let rules: BTreeMap<String, String> = c
            .rules_state
            .lock()
            .map(|s| s.clone().into_iter().collect())
            .unwrap_or_default();
        let unix_s = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        json!({
            "gateway_id": id.gateway_id,
            "state": state,
            "time": unix_s(now),
            "version": id.version,
            "hal": id.hal,
            "uptime_s": started.elapsed().as_secs(),
            "config_sha256": id.config_sha256,
            "config_files": id.config_files.iter().map(|(p, h)| json!({"path": p.display().to_string(), "sha256": h})).collect::<Vec<_>>(),
            // The rule file the stage runs now (a reload changes it).
            "rules_sha256": c.rules_sha256.lock().ok().and_then(|r| r.clone()),
            "radio": {
                "state": radio.state.name(),
                "since": radio.since.map(unix_s),
                "restarts": radio.restarts,
                "last_error": radio.last_error,
                "cause": radio.cause,
                "diagnosis": radio.diagnosis,
                "concentrator_eui": radio.concentrator_eui.map(|e| format!("{e:016x}")),
                "temperature_c": c.temperature(),
                // The `semtech_udp` backend: what the packet forwarder sent that was refused,
                // and its own figures.
                "forwarder": c.forwarder.lock().ok().and_then(|f| f.clone()).map(|f| json!({
                    "rejected": f.rejected,
                    "duplicate_pushes": f.duplicate_pushes,
                    "tx_ack_timeouts": f.tx_ack_timeouts,
                    "unmatched_tx_acks": f.unmatched_tx_acks,
                    "stat": f.stat.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                })),
            },
            // Whether the backhaul is up is `state/conn`'s to say: a retained "up" here would be
            // read as true while the gateway is gone, and is stale in the message sent at
            // connect.
            "backhaul": {
                "outages_total": Counters::get(&c.outages),
                "last_outage_ms": c.last_outage_ms.load(Ordering::Relaxed),
            },
            "backlog": {
                "events": backlog.records,
                "bytes": backlog.bytes,
                "oldest_age_s": backlog.oldest_at_ms.map(|t| unix_ms(now).saturating_sub(t) / 1000),
                "evicted_total": self.queue.evicted_total(),
                "rejected_total": Counters::get(&c.store_rejected),
                "lost_total": Counters::get(&c.store_lost),
            },
            "store": {
                "disk_bytes": self.queue.disk_bytes(),
                "free_bytes": crate::store::free_bytes(&self.store_path),
            },
            "downlinks": {
                "received_total": Counters::get(&c.tx_received),
                "emitted_total": Counters::get(&c.tx_emitted),
                "status": status,
            },
            // Commands of any topic refused by the rate limit or dropped by a full stage.
            "commands_refused_total": Counters::get(&c.commands_refused),
            "duty_cycle_pct": duty,
            "rules": rules,
            "pumps": c.pumps.lock().map(|p| p.clone()).unwrap_or_default(),
            "certificate_expires": id.certificate_expires.map(|t| {
                unix_s(SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
            }),
        })
    }
}

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
