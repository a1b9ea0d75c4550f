//! `command/config`: ChirpStack's `GatewayConfiguration` (a channel plan) from the network
//! server, decoded, checked against what the SX1302 and the region allow (every problem said),
//! and run by the radio, which reads what the concentrator holds, stops it and starts it with
//! the new plan; if it does not start, the previous plan runs again. The answer goes on
//! `event/ops` (`"op": "command/config"`, `"id"`: the configuration's version) and the version is
//! reported in `GatewayStats.config_version`, so that the network server sees which plan runs.
//!
//! Not kept across restarts: the agent starts with its configuration's plan and reports an
//! empty version, and ChirpStack sends its configuration again when the version differs.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chirpstack_api::gw;
use prost::Message;
use serde_json::{json, Value};

use super::counters::Counters;
use crate::config::Encoding;
use crate::radio::region::{self, ChannelPlan, ChannelSpec};
use crate::radio::Replan;

/// How long a start may take (calibration is seconds; a start that hangs is answered anyway).
const START_WITHIN: Duration = Duration::from_secs(60);

/// Plans received and not yet run, oldest first: the backhaul puts them here and wakes the ops
/// stage, which runs only the newest (a burst is not a queue of radio restarts) and answers
/// the others as superseded.
#[derive(Default)]
pub struct PlanSlot {
    waiting: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Plans kept waiting at most; older ones beyond are dropped unanswered (logged).
const WAITING_MAX: usize = 64;

impl PlanSlot {
    pub fn put(&self, payload: Vec<u8>) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= WAITING_MAX {
            w.remove(0);
            tracing::warn!(
                "command/config: {WAITING_MAX} plans waiting; the oldest dropped unanswered"
            );
        }
        w.push(payload);
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub struct ChannelPlans {
    pub slot: Arc<PlanSlot>,
    /// The region's plan: its band and transmit settings stay.
    pub base: ChannelPlan,
    pub radio: SyncSender<Replan>,
    pub encoding: Encoding,
    pub gateway_id: String,
    pub counters: Arc<Counters>,
}

impl ChannelPlans {
    /// Runs the newest plan waiting, answers the older ones as superseded.
    pub fn run_waiting(&self) -> Vec<Value> {
        let mut waiting = self.slot.take();
        let Some(last) = waiting.pop() else {
            return Vec::new();
        };
        let newest = self.decode(&last);
        let newest_version = newest
            .as_ref()
            .map(|g| g.version.clone())
            .unwrap_or_default();
        let mut answers: Vec<Value> = waiting
            .iter()
            .map(|p| match self.decode(p) {
                Ok(g) => json!({"id": g.version.chars().take(64).collect::<String>(), "op": "command/config", "ok": false,
                    "error": format!("superseded by version {:?} before it ran", newest_version.chars().take(64).collect::<String>())}),
                Err(e) => json!({"id": null, "op": "command/config", "ok": false, "error": e}),
            })
            .collect();
        answers.push(self.apply_decoded(newest));
        answers
    }

    /// Applies a `command/config` payload; the answer for `event/ops`.
    pub fn apply(&self, payload: &[u8]) -> Value {
        self.apply_decoded(self.decode(payload))
    }

    fn apply_decoded(&self, decoded: Result<gw::GatewayConfiguration, String>) -> Value {
        let gc = match decoded {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "command/config: undecodable, refused");
                return json!({"id": null, "op": "command/config", "ok": false, "error": e});
            }
        };
        let version: String = gc.version.chars().take(64).collect();
        let answer = |r: Result<Value, String>| match r {
            Ok(result) => {
                tracing::info!(version = ?version, "command/config: channel plan running");
                json!({"id": version, "op": "command/config", "ok": true, "result": result})
            }
            Err(error) => {
                tracing::warn!(version = ?version, error = ?error, "command/config: refused");
                json!({"id": version, "op": "command/config", "ok": false, "error": error})
            }
        };
        answer(self.run(&gc, &version))
    }

    fn run(&self, gc: &gw::GatewayConfiguration, version: &str) -> Result<Value, String> {
        if !gc.gateway_id.is_empty() && !gc.gateway_id.eq_ignore_ascii_case(&self.gateway_id) {
            return Err(format!(
                "addressed to gateway {:?}, this is {}",
                gc.gateway_id.chars().take(32).collect::<String>(),
                self.gateway_id
            ));
        }
        let specs: Vec<ChannelSpec> = gc
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| spec(c).map_err(|e| format!("channel {i}: {e}")))
            .collect::<Result<_, _>>()?;
        let plan = region::from_centre(&self.base, &specs).map_err(|e| e.join("; "))?;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let started = Instant::now();
        self.radio
            .try_send(Replan {
                plan: plan.clone(),
                reply,
            })
            .map_err(|_| "the radio is busy with another channel plan".to_string())?;
        match answer.recv_timeout(START_WITHIN) {
            Ok(Ok(())) => {
                if let Ok(mut v) = self.counters.config_version.lock() {
                    *v = version.to_string();
                }
                Ok(json!({
                    "version": version,
                    "radio_freq_hz": plan.radio_freq_hz,
                    "channels": plan.channels.len(),
                    "apply_ms": started.elapsed().as_millis() as u64,
                }))
            }
            Ok(Err(e)) => Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("the radio stopped (the agent is stopping) before it took it".into())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the radio did not take it within {} s (it is down or restarting: the plan \
                 runs at its next start if it comes)",
                START_WITHIN.as_secs()
            )),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<gw::GatewayConfiguration, String> {
        match self.encoding {
            Encoding::Protobuf => gw::GatewayConfiguration::decode(bytes).map_err(|e| {
                format!("not a protobuf GatewayConfiguration (mqtt.encoding = \"protobuf\"): {e}")
            }),
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| {
                format!("not a JSON GatewayConfiguration (mqtt.encoding = \"json\"): {e}")
            }),
        }
    }
}

fn spec(c: &gw::ChannelConfiguration) -> Result<ChannelSpec, String> {
    use gw::channel_configuration::ModulationConfig;
    // The deprecated kHz field, for network servers that still fill only it.
    let hz = |hz: u32, khz: u32| {
        if hz != 0 {
            hz
        } else {
            khz.saturating_mul(1000)
        }
    };
    match &c.modulation_config {
        Some(ModulationConfig::LoraModulationConfig(l)) => Ok(ChannelSpec::Lora {
            freq_hz: c.frequency,
            bandwidth_hz: hz(l.bandwidth, l.bandwidth_legacy),
            spreading_factors: l.spreading_factors.clone(),
        }),
        Some(ModulationConfig::FskModulationConfig(f)) => Ok(ChannelSpec::Fsk {
            freq_hz: c.frequency,
            bandwidth_hz: hz(f.bandwidth, f.bandwidth_legacy),
            datarate: f.bitrate,
        }),
        None => Err("no modulation (LoRa or FSK)".into()),
    }
}
