//! Counters shared by the stages, read by the stats reporter. Plain atomics: each stage only
//! adds to its own.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// Where the radio stands, for the stats and the log's status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RadioState {
    #[default]
    Starting,
    Up,
    Down,
}

impl RadioState {
    pub fn name(self) -> &'static str {
        match self {
            RadioState::Starting => "starting",
            RadioState::Up => "up",
            RadioState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RadioStatus {
    pub state: RadioState,
    /// When the radio last went up or down (a retry while down does not move it).
    pub since: Option<SystemTime>,
    /// Start attempts after the first.
    pub restarts: u64,
    /// The last failure in the library's own words (or the agent's, for a watchdog).
    pub last_error: Option<String>,
    /// The agent's reading of it: a cause name and what to do.
    pub cause: Option<&'static str>,
    pub diagnosis: Option<String>,
    pub concentrator_eui: Option<u64>,
}

/// A packet forwarder's side (`semtech_udp` backend).
#[derive(Debug, Clone, Default)]
pub struct ForwarderFigures {
    /// Datagrams or rxpk refused, by cause (`packet::Reject::name`).
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    /// Pushes seen twice (acknowledged again, stored once).
    pub duplicate_pushes: u64,
    /// Downlinks handed over without a TX_ACK within `tx_ack_timeout`.
    pub tx_ack_timeouts: u64,
    /// TX_ACKs for no PULL_RESP of ours to that address (late, repeated, spoofed).
    pub unmatched_tx_acks: u64,
    /// The forwarder's last `stat`, in its own names (rxnb, rxok, rxfw, ackr, dwnb, txnb).
    pub stat: Vec<(&'static str, String)>,
    /// From its `stat`: latitude, longitude, altitude.
    pub location: Option<(f64, f64, f64)>,
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Frames read from the concentrator.
    pub rx_received: AtomicU64,
    pub rx_crc_ok: AtomicU64,
    /// Frames not forwarded because of the CRC filters.
    pub rx_filtered: AtomicU64,
    /// Frames the concentrator returned with impossible fields.
    pub rx_malformed: AtomicU64,
    /// Frames lost before the store accepted them (a stalled store filled the queue).
    pub rx_dropped: AtomicU64,
    /// Uplinks appended to the durable store.
    pub up_accepted: AtomicU64,
    /// Uplinks acknowledged by the broker.
    pub up_forwarded: AtomicU64,
    /// Join-requests too old to be answered when their turn came.
    pub join_expired: AtomicU64,
    /// Events the store could not take at all (disk full after eviction).
    pub store_rejected: AtomicU64,
    /// Stored records that could not be turned back into a message, skipped unsent.
    pub store_unreadable: AtomicU64,
    /// Accepted sequence numbers a damaged, replaced or deleted store no longer held.
    pub store_lost: AtomicU64,
    pub evicted_events: AtomicU64,
    pub radio_starts: AtomicU64,
    pub radio_failures: AtomicU64,
    pub radio: Mutex<RadioStatus>,
    /// Told on every change of `radio`'s state: the stats go out at once.
    pub radio_changed: tokio::sync::Notify,
    /// f32 bits; NaN when unknown.
    pub temperature_bits: AtomicU32,
    pub backhaul_up: AtomicBool,
    pub outages: AtomicU64,
    /// Length of the last finished outage.
    pub last_outage_ms: AtomicU64,
    /// Downlink commands received on `command/down`.
    pub tx_received: AtomicU64,
    /// Commands not taken because the downlink stage was saturated.
    pub tx_dropped: AtomicU64,
    /// Commands refused by the per-topic rate limit (`mqtt.command_rate_per_s`).
    pub commands_refused: AtomicU64,
    /// Packets the HAL accepted at hand-off.
    pub tx_emitted: AtomicU64,
    /// Ack statuses sent, indexed by `gw::TxAckStatus` value.
    pub tx_status: [AtomicU64; 12],
    /// Frames for the rules stage it could not take (its queue full).
    pub rules_input_dropped: AtomicU64,
    /// Frames of rule devices dropped by the session check (replay, MIC, malformed).
    pub rules_frames_dropped: AtomicU64,
    /// sha256 of the rule file the rules stage runs; None: no rules running.
    pub rules_sha256: Mutex<Option<String>>,
    /// Each pump's state in full (on, why, lockout, latches, trips, lease, starts, actuator),
    /// by pump id, for the health message.
    pub pumps: Mutex<std::collections::BTreeMap<String, serde_json::Value>>,
    /// Pump and sensor states for the stats (`pump_<id>`, `sensor_<id>`).
    pub rules_state: Mutex<std::collections::BTreeMap<String, String>>,
    /// The version of the network server's channel plan running (`command/config`); empty:
    /// the configuration's.
    pub config_version: Mutex<String>,
    /// Publishes the broker acknowledged (any topic), this process.
    pub pubacks: AtomicU64,
    /// Progress of the stages the systemd watchdog watches.
    pub beats: super::health::Heartbeats,
    /// Share of each EU868 sub-band's hourly allowance used, in per cent.
    pub duty_cycle_pct: Mutex<Vec<(&'static str, f64)>>,
    /// `Some` with the `semtech_udp` backend.
    pub forwarder: Mutex<Option<ForwarderFigures>>,
}

impl Counters {
    pub fn new() -> Counters {
        let c = Counters::default();
        c.temperature_bits
            .store(f32::NAN.to_bits(), Ordering::Relaxed);
        c
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn radio_status(&self) -> RadioStatus {
        self.radio.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn temperature(&self) -> Option<f32> {
        let t = f32::from_bits(self.temperature_bits.load(Ordering::Relaxed));
        (!t.is_nan()).then_some(t)
    }
}
