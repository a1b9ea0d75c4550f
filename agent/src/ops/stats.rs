//! Every `stats.interval`, and at once when the radio goes up or down or fails otherwise: a
//! `GatewayStats` event (through the store, like every event) and a log line. lora-edge's own
//! figures (radio, backlog, evictions, backhaul) go in its metadata.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chirpstack_api::gw;
use tokio::sync::watch;

use super::counters::Counters;
use crate::events::{unix_ms, Body, Event};
use crate::store::Queue;
use crate::uplink::timestamp;

pub struct StatsReporter {
    pub interval: Duration,
    pub gateway_id: String,
    pub counters: Arc<Counters>,
    pub queue: Arc<Queue>,
    pub output: SyncSender<Event>,
    pub shutdown: watch::Receiver<bool>,
}

const RADIO_REPORT_GAP: Duration = Duration::from_secs(1);

#[derive(Default, Clone, Copy)]
struct Previous {
    received: u64,
    crc_ok: u64,
    tx_received: u64,
    tx_emitted: u64,
    tx_status: [u64; 12],
}

impl StatsReporter {
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        let mut prev = Previous::default();
        let mut last_sent: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.counters.radio_changed.notified() => {
                    // A radio failing over and over changes state every few seconds: at most
                    // one extra report a second.
                    if let Some(t) = last_sent {
                        tokio::time::sleep_until(t + RADIO_REPORT_GAP).await;
                    }
                }
                _ = self.shutdown.changed() => return,
            }
            last_sent = Some(tokio::time::Instant::now());
            let (stats, next) = self.snapshot(prev);
            prev = next;
            let event = Event {
                at: SystemTime::now(),
                body: Body::Stats(Box::new(stats)),
            };
            if self.output.try_send(event).is_err() {
                tracing::warn!("stats not queued: the store is not keeping up");
            }
        }
    }

    fn snapshot(&self, prev: Previous) -> (gw::GatewayStats, Previous) {
        let c = &self.counters;
        let now = SystemTime::now();
        let received = Counters::get(&c.rx_received);
        let crc_ok = Counters::get(&c.rx_crc_ok);
        let tx_received = Counters::get(&c.tx_received);
        let tx_emitted = Counters::get(&c.tx_emitted);
        let tx_status: [u64; 12] = std::array::from_fn(|i| Counters::get(&c.tx_status[i]));
        let backlog = self.queue.backlog();
        let oldest_age_s = backlog
            .oldest_at_ms
            .map(|t| unix_ms(now).saturating_sub(t) / 1000)
            .unwrap_or(0);
        let up = c.backhaul_up.load(Ordering::Relaxed);
        let mut m: HashMap<String, String> = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("rx_total", received.to_string());
        put("rx_crc_ok_total", crc_ok.to_string());
        put(
            "rx_filtered_total",
            Counters::get(&c.rx_filtered).to_string(),
        );
        put(
            "rx_malformed_total",
            Counters::get(&c.rx_malformed).to_string(),
        );
        put("rx_dropped_total", Counters::get(&c.rx_dropped).to_string());
        put(
            "up_accepted_total",
            Counters::get(&c.up_accepted).to_string(),
        );
        put(
            "up_forwarded_total",
            Counters::get(&c.up_forwarded).to_string(),
        );
        put(
            "join_expired_total",
            Counters::get(&c.join_expired).to_string(),
        );
        put("backlog_events", backlog.records.to_string());
        put("backlog_bytes", backlog.bytes.to_string());
        put("backlog_oldest_age_s", oldest_age_s.to_string());
        put("store_disk_bytes", self.queue.disk_bytes().to_string());
        put(
            "store_evicted_total",
            self.queue.evicted_total().to_string(),
        );
        put(
            "store_rejected_total",
            Counters::get(&c.store_rejected).to_string(),
        );
        put(
            "store_unreadable_total",
            Counters::get(&c.store_unreadable).to_string(),
        );
        put("store_lost_total", Counters::get(&c.store_lost).to_string());
        put("backhaul", if up { "up" } else { "down" }.to_string());
        put(
            "backhaul_outages_total",
            Counters::get(&c.outages).to_string(),
        );
        put(
            "backhaul_last_outage_ms",
            c.last_outage_ms.load(Ordering::Relaxed).to_string(),
        );
        let radio = c.radio_status();
        put("radio", radio.state.name().to_string());
        if let Some(since) = radio.since {
            put(
                "radio_since",
                humantime::format_rfc3339_seconds(since).to_string(),
            );
        }
        put("radio_restarts_total", radio.restarts.to_string());
        if let Some(e) = &radio.last_error {
            put("radio_last_error", e.clone());
        }
        if let Some(cause) = radio.cause {
            put("radio_cause", cause.to_string());
        }
        if let Some(d) = &radio.diagnosis {
            put("radio_diagnosis", d.clone());
        }
        if let Some(eui) = radio.concentrator_eui {
            put("concentrator_eui", format!("{eui:016x}"));
        }
        put(
            "radio_starts_total",
            Counters::get(&c.radio_starts).to_string(),
        );
        put(
            "radio_failures_total",
            Counters::get(&c.radio_failures).to_string(),
        );
        put(
            "tx_received_total",
            Counters::get(&c.tx_received).to_string(),
        );
        put("tx_emitted_total", Counters::get(&c.tx_emitted).to_string());
        put("tx_dropped_total", Counters::get(&c.tx_dropped).to_string());
        put(
            "commands_refused_total",
            Counters::get(&c.commands_refused).to_string(),
        );
        put(
            "rules_input_dropped_total",
            Counters::get(&c.rules_input_dropped).to_string(),
        );
        put(
            "rules_frames_dropped_total",
            Counters::get(&c.rules_frames_dropped).to_string(),
        );
        if let Ok(state) = c.rules_state.lock() {
            for (k, v) in state.iter() {
                put(k, v.clone());
            }
        }
        if let Ok(usage) = c.duty_cycle_pct.lock() {
            for (band, pct) in usage.iter() {
                put(&format!("duty_cycle_pct_{band}"), format!("{pct:.3}"));
            }
        }
        if let Some(t) = c.temperature() {
            put("concentrator_temperature_c", format!("{t:.1}"));
        }
        let forwarder = c.forwarder.lock().ok().and_then(|f| f.clone());
        if let Some(f) = &forwarder {
            for r in crate::radio::semtech_udp::packet::Reject::ALL {
                let n = f.rejected.get(r.name()).copied().unwrap_or(0);
                put(&format!("udp_rejected_{}_total", r.name()), n.to_string());
            }
            put("udp_duplicate_pushes_total", f.duplicate_pushes.to_string());
            put("udp_tx_ack_timeouts_total", f.tx_ack_timeouts.to_string());
            put(
                "udp_unmatched_tx_acks_total",
                f.unmatched_tx_acks.to_string(),
            );
            for (k, v) in &f.stat {
                put(&format!("forwarder_{k}"), v.clone());
            }
        }
        let down = radio.state == crate::ops::counters::RadioState::Down;
        tracing::info!(
            radio = radio.state.name(),
            radio_since = radio
                .since
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            radio_restarts = radio.restarts,
            radio_cause = radio.cause,
            radio_last_error = radio.last_error.as_deref(),
            radio_diagnosis = radio.diagnosis.as_deref().filter(|_| down),
            concentrator_eui = radio.concentrator_eui.map(|e| format!("{e:016x}")),
            temperature_c = c.temperature(),
            rx = received,
            accepted = Counters::get(&c.up_accepted),
            forwarded = Counters::get(&c.up_forwarded),
            backlog = backlog.records,
            evicted = self.queue.evicted_total(),
            dropped = Counters::get(&c.rx_dropped),
            rejected = Counters::get(&c.store_rejected),
            commands_refused = Counters::get(&c.commands_refused),
            backhaul = if up { "up" } else { "down" },
            "status"
        );
        let stats =
            gw::GatewayStats {
                gateway_id: self.gateway_id.clone(),
                config_version: c
                    .config_version
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_default(),
                time: Some(timestamp(now)),
                rx_packets_received: received.saturating_sub(prev.received) as u32,
                rx_packets_received_ok: crc_ok.saturating_sub(prev.crc_ok) as u32,
                tx_packets_received: tx_received.saturating_sub(prev.tx_received) as u32,
                tx_packets_emitted: tx_emitted.saturating_sub(prev.tx_emitted) as u32,
                tx_packets_per_status: tx_status
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .filter_map(|(i, n)| {
                        let name = chirpstack_api::gw::TxAckStatus::try_from(i as i32)
                            .ok()?
                            .as_str_name()
                            .to_string();
                        Some((name, (*n - prev.tx_status[i]) as u32))
                    })
                    .collect(),
                metadata: m,
                location: forwarder.and_then(|f| f.location).map(
                    |(latitude, longitude, altitude)| chirpstack_api::common::Location {
                        latitude,
                        longitude,
                        altitude,
                        source: chirpstack_api::common::LocationSource::Gps as i32,
                        ..Default::default()
                    },
                ),
                ..Default::default()
            };
        (
            stats,
            Previous {
                received,
                crc_ok,
                tx_received,
                tx_emitted,
                tx_status,
            },
        )
    }
}
