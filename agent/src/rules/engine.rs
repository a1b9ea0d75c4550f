//! The pump-safety engine: a deterministic scan, PLC style, on every reading and on a 1 s tick,
//! with time injected (`now`, Unix milliseconds) so that tests run hours in milliseconds.
//!
//! Decision order for each pump, highest first:
//! lockout > interlock trip > latched trip > max run > stop / no demand (min run applies here
//! only) > start inhibits (min off, starts per hour) > start.
//! Demand: operator > central lease (absolute expiry, capped; an expired one is refused) >
//! local automatic level control.
//! Boot: every pump off (its safe state), every sensor unknown, min off running from boot.
//! Data-quality trips (unknown, stale, out of range, implausible step, stuck) clear themselves;
//! value trips latch only where the rule file says so.
//!
//! The engine does no I/O: it returns the actuator commands and the audit records of a scan,
//! and says when its durable part (latches, lockouts, start history) changed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::file::{AutoMode, RuleSet, Trip};

const HOUR_MS: u64 = 3_600_000;

/// The latch an actuator sets when its status contradicts a command it had confirmed (a motor
/// protection tripped, a local switch): the pump stays off until it is reset like an
/// interlock's latch (`reset_latch` with `"interlock": "actuator"`), not merely until the next
/// status agrees — which a stopped pump's next status always does.
pub const ACTUATOR_LATCH: &str = "actuator";

/// Safety checks a test can switch off, one at a time, to prove that the property test catches
/// each of them (`engine_tests::every_disabled_safety_check_is_caught`). Never set outside tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Fault {
    IgnoreInterlocks,
    IgnoreLockout,
    IgnoreLatches,
    NoMaxRun,
    NoMinOff,
    NoStartsPerHour,
}

#[cfg(test)]
thread_local! {
    pub(crate) static FAULT: std::cell::Cell<Option<Fault>> = const { std::cell::Cell::new(None) };
}

fn disabled(f: Fault) -> bool {
    #[cfg(test)]
    {
        FAULT.with(|c| c.get() == Some(f))
    }
    #[cfg(not(test))]
    {
        let _ = f;
        false
    }
}

/// Quality of a sensor's last reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// Nothing received since the agent started.
    Unknown,
    Good,
    Stale,
    OutOfRange,
    /// The step from the previous reading is larger than `max_step`.
    Implausible,
    /// `stuck_samples` identical readings in a row.
    Stuck,
    /// The first reading of a new session (first seen since start, rejoined, new keys) that no
    /// earlier reading of the same session agrees with yet. LoRaWAN 1.0's MIC does not cover
    /// the AppSKey: with a wrong one the payload decrypts to noise that can land inside
    /// `valid_range`. Noise is independent from frame to frame, so it almost never agrees with
    /// itself; a reading is believed once a second one agrees with it (`agreement`).
    Unconfirmed,
}

#[derive(Debug, Clone)]
struct SensorState {
    value: Option<f64>,
    quality: Quality,
    at: u64,
    same_count: u32,
    /// A new session: the next reading is believed only if it agrees with `reference`.
    awaiting: bool,
    /// What the next reading of a new session must agree with: the session's persisted last
    /// good value (after a restart), then the previous unconfirmed reading.
    reference: Option<f64>,
}

/// How close two readings of a new session must be to confirm each other: `max_step`, or
/// without one 5 % of `valid_range`'s width.
pub fn agreement(s: &super::file::Sensor) -> f64 {
    s.max_step
        .unwrap_or((s.valid_range[1] - s.valid_range[0]) * 0.05)
}

/// What an operator or the central server asks of a pump.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Local operator: run (until told otherwise), stop, or back to automatic.
    OperatorRun,
    OperatorStop,
    OperatorAuto,
    /// Central request: run (or hold stopped, `run: false`) until `expiry_ms` (Unix ms), capped
    /// at `remote_lease_max`; then local control again.
    Lease {
        expiry_ms: u64,
        run: bool,
    },
    /// Central request ended.
    LeaseEnd,
    Lockout,
    Release,
    ResetLatch {
        interlock: String,
    },
}

/// Why a command was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown pump {0:?}")]
    UnknownPump(String),
    #[error("the lease expired before it arrived (expiry {expiry_ms}, now {now_ms})")]
    LeaseExpired { expiry_ms: u64, now_ms: u64 },
    #[error("interlock {0:?} is not latched")]
    NotLatched(String),
    #[error("interlock {0:?}: the trip condition still holds; the latch stays")]
    ConditionHolds(String),
}

#[derive(Debug, Clone, Default)]
struct PumpState {
    on: bool,
    on_since: u64,
    off_since: u64,
    /// Interlocks tripped now (value or data quality), with why.
    tripped: BTreeMap<String, String>,
    /// Latched value trips.
    latched: BTreeSet<String>,
    lockout: bool,
    starts: VecDeque<u64>,
    operator: Option<bool>,
    /// Central request: until when, and run or stop.
    lease_until: Option<(u64, bool)>,
    auto_demand: bool,
    /// The last inhibit reported, so that a held inhibit is audited once.
    inhibit: Option<String>,
    /// Why the pump is in its state, from the last scan.
    reasons: Vec<String>,
    /// The actuator's state is unknown (unconfirmed commands, contradicting feedback): the
    /// pump is held in its safe state until the actuator confirms it again.
    actuator_fault: Option<String>,
}

/// The durable part of a pump's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Durable {
    pub latched: BTreeSet<String>,
    pub lockout: bool,
    pub starts: Vec<u64>,
}

/// One input to a decision, as it was when the decision was made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Input {
    pub sensor: String,
    pub value: Option<f64>,
    pub quality: Quality,
    pub age_ms: Option<u64>,
}

/// An audit record: what was decided, why, and on what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Audit {
    pub at_ms: u64,
    /// Pump or sensor id.
    pub subject: String,
    /// start, stop, inhibit, trip, trip_clear, latch, latch_reset, refusal, lockout, release,
    /// lease, quality.
    pub action: &'static str,
    /// Highest-priority reason first.
    pub reasons: Vec<String>,
    pub inputs: Vec<Input>,
}

/// Drive a pump's actuator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drive {
    pub pump: usize,
    pub on: bool,
}

/// What a scan produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub drives: Vec<Drive>,
    pub audits: Vec<Audit>,
    /// Pumps whose `Durable` changed: persist them.
    pub durable_changed: Vec<usize>,
}

/// Per pump of `new`, the pump of `old` whose state it carries: the same id and the same
/// actuator.
pub fn carried_pumps(old: &RuleSet, new: &RuleSet) -> Vec<Option<usize>> {
    new.pumps
        .iter()
        .map(|p| {
            old.pumps.iter().position(|o| {
                o.id == p.id && format!("{:?}", o.actuator) == format!("{:?}", p.actuator)
            })
        })
        .collect()
}

pub struct Engine {
    rules: RuleSet,
    sensors: Vec<SensorState>,
    pumps: Vec<PumpState>,
}

impl Engine {
    /// At boot: pumps off, sensors unknown, min off running from `now`; `durable` is what was
    /// persisted per pump id (latches, lockout, start history).
    pub fn new(rules: RuleSet, now: u64, durable: &BTreeMap<String, Durable>) -> Engine {
        let sensors = rules
            .sensors
            .iter()
            .map(|_| SensorState {
                value: None,
                quality: Quality::Unknown,
                at: now,
                same_count: 0,
                awaiting: false,
                reference: None,
            })
            .collect();
        let pumps = rules
            .pumps
            .iter()
            .map(|p| {
                let d = durable.get(&p.id).cloned().unwrap_or_default();
                // A contradiction latch kept from before a restart: the actuator's state is
                // unknown until a status confirms a command (its latch cannot be reset before).
                let actuator_fault = d.latched.contains(ACTUATOR_LATCH).then(|| {
                    "the actuator latched before the agent started; no status has confirmed a command since".to_string()
                });
                PumpState {
                    off_since: now,
                    latched: d
                        .latched
                        .into_iter()
                        .filter(|l| l == ACTUATOR_LATCH || p.interlocks.iter().any(|i| &i.id == l))
                        .collect(),
                    lockout: d.lockout,
                    actuator_fault,
                    starts: d
                        .starts
                        .into_iter()
                        .filter(|t| now.saturating_sub(*t) < HOUR_MS)
                        .collect(),
                    ..Default::default()
                }
            })
            .collect();
        Engine {
            rules,
            sensors,
            pumps,
        }
    }

    /// Takes a new rule file in place of the running one, whatever its shape (pumps or sensors
    /// added, removed, reordered). A changed threshold takes effect at the next scan. A pump
    /// with the same id and the same actuator keeps its whole state (on/off, who asked,
    /// leases, starts, latches and trips of interlocks that still exist); a sensor with the
    /// same id reading the same device's field keeps its reading. A new pump starts off, its
    /// min off running from `now` and its durable state from `durable`, as at a start; a new
    /// sensor is unknown until it is heard. Returns, per new pump, the old index it carries
    /// (`None`: new), and the old pumps that are gone: the caller drives them to their safe
    /// state.
    pub fn reshape(
        &mut self,
        new: RuleSet,
        now: u64,
        durable: &BTreeMap<String, Durable>,
    ) -> (Vec<Option<usize>>, Vec<usize>, Vec<usize>) {
        let old = &self.rules;
        let carried = carried_pumps(old, &new);
        let removed: Vec<usize> = (0..old.pumps.len())
            .filter(|i| !carried.contains(&Some(*i)))
            .collect();
        let source = |r: &RuleSet, si: usize| {
            let c = &r.sensors[si];
            (
                c.id.clone(),
                r.devices[c.device].dev_eui.clone(),
                c.field.clone(),
            )
        };
        let sensors_carried: Vec<Option<usize>> = (0..new.sensors.len())
            .map(|si| {
                let want = source(&new, si);
                (0..old.sensors.len()).find(|oi| source(old, *oi) == want)
            })
            .collect();
        let fresh = Engine::new(new.clone(), now, durable);
        let mut old_pumps: Vec<Option<PumpState>> = std::mem::take(&mut self.pumps)
            .into_iter()
            .map(Some)
            .collect();
        let mut old_sensors: Vec<Option<SensorState>> = std::mem::take(&mut self.sensors)
            .into_iter()
            .map(Some)
            .collect();
        self.pumps = carried
            .iter()
            .zip(fresh.pumps)
            .zip(&new.pumps)
            .map(
                |((c, fresh), pump)| match c.and_then(|i| old_pumps[i].take()) {
                    Some(mut state) => {
                        let exists = |l: &String| pump.interlocks.iter().any(|i| &i.id == l);
                        state.latched.retain(|l| l == ACTUATOR_LATCH || exists(l));
                        state.tripped.retain(|l, _| exists(l));
                        state
                    }
                    None => fresh,
                },
            )
            .collect();
        self.sensors = sensors_carried
            .iter()
            .zip(fresh.sensors)
            .map(|(c, fresh)| c.and_then(|i| old_sensors[i].take()).unwrap_or(fresh))
            .collect();
        self.rules = new;
        // A new sensor's first reading is believed only once a second agrees, as at a start.
        let new_sensors: Vec<usize> = (0..sensors_carried.len())
            .filter(|si| sensors_carried[*si].is_none())
            .collect();
        for si in &new_sensors {
            self.session_started(*si, None);
        }
        (carried, removed, new_sensors)
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn durable(&self, pump: usize) -> Durable {
        let p = &self.pumps[pump];
        Durable {
            latched: p.latched.clone(),
            lockout: p.lockout,
            starts: p.starts.iter().copied().collect(),
        }
    }

    pub fn is_on(&self, pump: usize) -> bool {
        self.pumps[pump].on
    }

    /// A pump's state as the central server reads it.
    pub fn pump_state(&self, pi: usize, now: u64) -> serde_json::Value {
        let p = &self.pumps[pi];
        serde_json::json!({
            "id": self.rules.pumps[pi].id,
            "on": p.on,
            "reasons": p.reasons,
            "lockout": p.lockout,
            "latched": p.latched,
            "tripped": p.tripped,
            "lease": p.lease_until.map(|(until, run)| serde_json::json!({"untilMs": until, "run": run})),
            "startsLastHour": p.starts.iter().filter(|t| now.saturating_sub(**t) < HOUR_MS).count(),
            "actuatorFault": p.actuator_fault,
        })
    }

    /// A sensor's state as the central server reads it.
    pub fn sensor_state(&self, si: usize, now: u64) -> serde_json::Value {
        serde_json::to_value(self.input(si, now)).unwrap_or_default()
    }

    pub fn sensor_quality(&self, sensor: usize) -> (Option<f64>, Quality) {
        (self.sensors[sensor].value, self.sensors[sensor].quality)
    }

    /// The sensor's device starts a session (at agent start, or new keys): its next reading is
    /// not believed on its own. `prior`: the last good value persisted for this same session
    /// (a restart), which may serve as the reading it must agree with.
    pub fn session_started(&mut self, sensor: usize, prior: Option<f64>) {
        let cfg = &self.rules.sensors[sensor];
        let s = &mut self.sensors[sensor];
        s.awaiting = true;
        s.reference =
            prior.filter(|v| v.is_finite() && *v >= cfg.valid_range[0] && *v <= cfg.valid_range[1]);
    }

    /// A reading of `sensor`, then a scan.
    pub fn reading(&mut self, sensor: usize, value: f64, now: u64) -> Outcome {
        let mut out = Outcome::default();
        let cfg = &self.rules.sensors[sensor];
        let s = &mut self.sensors[sensor];
        let before = s.quality;
        let mut why = String::new();
        let quality = if !value.is_finite()
            || value < cfg.valid_range[0]
            || value > cfg.valid_range[1]
        {
            // Bad data puts the sensor back on probation: the next reading is believed only
            // once another agrees with it, in a row. Noise from a wrong AppSKey is out of range
            // most of the time, so a session believed by chance (two noisy readings that agree)
            // is soon doubted again; and noise between two in-range readings cannot make them
            // "agree" (a reviewer's wrong key had 0.247 and, nine noisy frames later, 0.163).
            s.awaiting = true;
            s.reference = None;
            Quality::OutOfRange
        } else if s.awaiting {
            let tolerance = agreement(cfg);
            match s.reference {
                Some(r) if (value - r).abs() <= tolerance => {
                    s.awaiting = false;
                    s.reference = None;
                    Quality::Good
                }
                reference => {
                    why = match reference {
                        Some(r) => format!(": disagrees with the reading before ({r}) by more than {tolerance}; waiting for two in a row that agree (a new session, or after bad data)"),
                        None => format!(": the first reading of a new session or after bad data; believed once the next agrees within {tolerance}"),
                    };
                    s.reference = Some(value);
                    Quality::Unconfirmed
                }
            }
        } else if matches!((cfg.max_step, s.value), (Some(step), Some(prev)) if (value - prev).abs() > step && s.quality != Quality::Unknown && now.saturating_sub(s.at) <= cfg.max_age_ms)
        {
            Quality::Implausible
        } else {
            Quality::Good
        };
        s.same_count = if s.value == Some(value) {
            s.same_count + 1
        } else {
            1
        };
        let quality = match cfg.stuck_samples {
            Some(n) if quality == Quality::Good && s.same_count >= n => Quality::Stuck,
            _ => quality,
        };
        // An out-of-range value is bad data, never clamped, and not a reference for the next
        // step either.
        if quality != Quality::OutOfRange {
            s.value = Some(value);
        }
        s.quality = quality;
        s.at = now;
        if quality != before {
            out.audits.push(Audit {
                at_ms: now,
                subject: cfg.id.clone(),
                action: "quality",
                reasons: vec![format!("{before:?} -> {quality:?} (value {value}){why}")],
                inputs: vec![self.input(sensor, now)],
            });
        }
        self.scan_into(now, &mut out);
        out
    }

    /// The 1 s tick: staleness, max run, leases expire, even when no data arrives.
    pub fn tick(&mut self, now: u64) -> Outcome {
        let mut out = Outcome::default();
        self.scan_into(now, &mut out);
        out
    }

    /// The actuator of `pump` is in an unknown state (`Some(why)`) or known again (`None`),
    /// then a scan. Unknown holds the pump off, like an interlock that clears itself.
    pub fn actuator_fault(&mut self, pump: usize, fault: Option<String>, now: u64) -> Outcome {
        let mut out = Outcome::default();
        let p = &mut self.pumps[pump];
        if p.actuator_fault != fault {
            let (action, why) = match &fault {
                Some(why) => ("trip", format!("actuator state unknown: {why}")),
                None => ("trip_clear", "actuator state confirmed again".to_string()),
            };
            out.audits.push(Audit {
                at_ms: now,
                subject: self.rules.pumps[pump].id.clone(),
                action,
                reasons: vec![why],
                inputs: vec![],
            });
            p.actuator_fault = fault;
        }
        self.scan_into(now, &mut out);
        out
    }

    /// The actuator of `pump` reported the opposite of a command it had confirmed: an unknown
    /// state (as `actuator_fault`) and the actuator latch, kept until reset.
    pub fn actuator_contradicted(&mut self, pump: usize, why: String, now: u64) -> Outcome {
        let mut out = Outcome::default();
        if self.pumps[pump].latched.insert(ACTUATOR_LATCH.into()) {
            out.durable_changed.push(pump);
            out.audits.push(Audit {
                at_ms: now,
                subject: self.rules.pumps[pump].id.clone(),
                action: "latch",
                reasons: vec![format!(
                    "actuator latched: {why}; the pump stays off until reset_latch \"{ACTUATOR_LATCH}\""
                )],
                inputs: vec![],
            });
        }
        let more = self.actuator_fault(pump, Some(why), now);
        out.drives.extend(more.drives);
        out.audits.extend(more.audits);
        out.durable_changed.extend(more.durable_changed);
        out
    }

    /// An operator's or the central server's command, then a scan.
    pub fn command(
        &mut self,
        pump_id: &str,
        cmd: Command,
        now: u64,
    ) -> Result<Outcome, (Refusal, Outcome)> {
        let mut out = Outcome::default();
        let Some(pi) = self.rules.pumps.iter().position(|p| p.id == pump_id) else {
            return Err((Refusal::UnknownPump(pump_id.into()), out));
        };
        let refused = self.apply(pi, &cmd, now, &mut out);
        if let Err(r) = refused {
            out.audits.push(Audit {
                at_ms: now,
                subject: pump_id.into(),
                action: "refusal",
                reasons: vec![format!("{cmd:?}: {r}")],
                inputs: self.pump_inputs(pi, now),
            });
            return Err((r, out));
        }
        self.scan_into(now, &mut out);
        Ok(out)
    }

    fn apply(
        &mut self,
        pi: usize,
        cmd: &Command,
        now: u64,
        out: &mut Outcome,
    ) -> Result<(), Refusal> {
        let cfg = &self.rules.pumps[pi];
        let p = &mut self.pumps[pi];
        let mut audit = |action: &'static str, reason: String| {
            out.audits.push(Audit {
                at_ms: now,
                subject: cfg.id.clone(),
                action,
                reasons: vec![reason],
                inputs: vec![],
            })
        };
        match cmd {
            Command::OperatorRun => p.operator = Some(true),
            Command::OperatorStop => p.operator = Some(false),
            Command::OperatorAuto => p.operator = None,
            Command::Lease { expiry_ms, run } => {
                if *expiry_ms <= now {
                    return Err(Refusal::LeaseExpired {
                        expiry_ms: *expiry_ms,
                        now_ms: now,
                    });
                }
                let capped = (*expiry_ms).min(now + cfg.remote_lease_max_ms);
                p.lease_until = Some((capped, *run));
                let what = if *run { "run" } else { "stop" };
                audit(
                    "lease",
                    if capped < *expiry_ms {
                        format!("central {what} until {capped} (asked {expiry_ms}, capped by remote_lease_max)")
                    } else {
                        format!("central {what} until {capped}")
                    },
                );
            }
            Command::LeaseEnd => p.lease_until = None,
            Command::Lockout => {
                p.lockout = true;
                out.durable_changed.push(pi);
                audit("lockout", "operator lockout".into());
            }
            Command::Release => {
                p.lockout = false;
                out.durable_changed.push(pi);
                audit("release", "operator released the lockout".into());
            }
            Command::ResetLatch { interlock } => {
                if !p.latched.contains(interlock) {
                    return Err(Refusal::NotLatched(interlock.clone()));
                }
                if p.tripped.contains_key(interlock)
                    || (interlock == ACTUATOR_LATCH && p.actuator_fault.is_some())
                {
                    return Err(Refusal::ConditionHolds(interlock.clone()));
                }
                p.latched.remove(interlock);
                out.durable_changed.push(pi);
                audit("latch_reset", format!("latch {interlock} reset"));
            }
        }
        Ok(())
    }

    fn input(&self, sensor: usize, now: u64) -> Input {
        let s = &self.sensors[sensor];
        Input {
            sensor: self.rules.sensors[sensor].id.clone(),
            value: s.value,
            quality: s.quality,
            age_ms: (s.quality != Quality::Unknown).then(|| now.saturating_sub(s.at)),
        }
    }

    fn pump_inputs(&self, pi: usize, now: u64) -> Vec<Input> {
        let mut ids: Vec<usize> = self.rules.pumps[pi]
            .interlocks
            .iter()
            .map(|i| i.sensor)
            .chain(self.rules.pumps[pi].auto.as_ref().map(|a| a.sensor))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(|s| self.input(s, now)).collect()
    }

    fn scan_into(&mut self, now: u64, out: &mut Outcome) {
        // Staleness first: it is what a tick without data finds.
        for (i, s) in self.sensors.iter_mut().enumerate() {
            let cfg = &self.rules.sensors[i];
            if s.quality != Quality::Unknown
                && s.quality != Quality::Stale
                && now.saturating_sub(s.at) > cfg.max_age_ms
            {
                let before = s.quality;
                s.quality = Quality::Stale;
                out.audits.push(Audit {
                    at_ms: now,
                    subject: cfg.id.clone(),
                    action: "quality",
                    reasons: vec![format!(
                        "{before:?} -> Stale (no reading for {} s, max_age {} s)",
                        now.saturating_sub(s.at) / 1000,
                        cfg.max_age_ms / 1000
                    )],
                    inputs: vec![],
                });
            }
        }
        for pi in 0..self.pumps.len() {
            self.scan_pump(pi, now, out);
        }
    }

    fn scan_pump(&mut self, pi: usize, now: u64, out: &mut Outcome) {
        let inputs = self.pump_inputs(pi, now);
        let cfg = &self.rules.pumps[pi];
        // Interlocks: data quality first, then the value with hysteresis.
        for il in &cfg.interlocks {
            let s = &self.sensors[il.sensor];
            let was = self.pumps[pi].tripped.get(&il.id).cloned();
            let now_tripped: Option<String> = if s.quality != Quality::Good {
                Some(format!(
                    "sensor {} is {:?}",
                    self.rules.sensors[il.sensor].id, s.quality
                ))
            } else {
                let v = s.value.unwrap_or(f64::NAN);
                let value_trip = match il.trip {
                    Trip::Below(t) => v < t,
                    Trip::Above(t) => v > t,
                };
                let reset = match il.trip {
                    Trip::Below(_) => v >= il.reset_at,
                    Trip::Above(_) => v <= il.reset_at,
                };
                // A value trip holds until the reset threshold (hysteresis).
                let held = was.as_ref().is_some_and(|w| w.starts_with("value")) && !reset;
                (value_trip || held).then(|| match il.trip {
                    Trip::Below(t) => format!("value {v} below {t} (resets at {})", il.reset_at),
                    Trip::Above(t) => format!("value {v} above {t} (resets at {})", il.reset_at),
                })
            };
            let p = &mut self.pumps[pi];
            match (&was, &now_tripped) {
                (None, Some(why)) => {
                    out.audits.push(Audit {
                        at_ms: now,
                        subject: cfg.id.clone(),
                        action: "trip",
                        reasons: vec![format!("interlock {}: {why}", il.id)],
                        inputs: inputs.clone(),
                    });
                    if il.latch && why.starts_with("value") && p.latched.insert(il.id.clone()) {
                        out.durable_changed.push(pi);
                        out.audits.push(Audit {
                            at_ms: now,
                            subject: cfg.id.clone(),
                            action: "latch",
                            reasons: vec![format!("interlock {} latched: reset needed", il.id)],
                            inputs: inputs.clone(),
                        });
                    }
                }
                (Some(_), None) => out.audits.push(Audit {
                    at_ms: now,
                    subject: cfg.id.clone(),
                    action: "trip_clear",
                    reasons: vec![format!("interlock {} clear", il.id)],
                    inputs: inputs.clone(),
                }),
                // A data-quality trip turning into a value trip latches too.
                (Some(w), Some(why))
                    if !w.starts_with("value")
                        && why.starts_with("value")
                        && il.latch
                        && p.latched.insert(il.id.clone()) =>
                {
                    out.durable_changed.push(pi);
                }
                _ => {}
            }
            match now_tripped {
                Some(why) => {
                    p.tripped.insert(il.id.clone(), why);
                }
                None => {
                    p.tripped.remove(&il.id);
                }
            }
        }
        // Local automatic control, with its own hysteresis; unknown data is no demand.
        if let Some(auto) = &cfg.auto {
            let s = &self.sensors[auto.sensor];
            let p = &mut self.pumps[pi];
            p.auto_demand = match (s.quality, s.value) {
                (Quality::Good, Some(v)) => match auto.mode {
                    AutoMode::Empty if v >= auto.start_at => true,
                    AutoMode::Empty if v <= auto.stop_at => false,
                    AutoMode::Fill if v <= auto.start_at => true,
                    AutoMode::Fill if v >= auto.stop_at => false,
                    _ => p.auto_demand,
                },
                _ => false,
            };
        }
        let p = &mut self.pumps[pi];
        if p.lease_until.is_some_and(|(t, _)| now >= t) {
            p.lease_until = None;
            out.audits.push(Audit {
                at_ms: now,
                subject: cfg.id.clone(),
                action: "lease",
                reasons: vec!["central lease expired".into()],
                inputs: vec![],
            });
        }
        while p
            .starts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= HOUR_MS)
        {
            p.starts.pop_front();
        }

        // The decision, highest priority first.
        let tripped = p
            .tripped
            .iter()
            .next()
            .filter(|_| !disabled(Fault::IgnoreInterlocks));
        let latched = p
            .latched
            .iter()
            .next()
            .filter(|_| !disabled(Fault::IgnoreLatches));
        let forced_off: Option<String> = if p.lockout && !disabled(Fault::IgnoreLockout) {
            Some("lockout".into())
        } else if let Some(why) = &p.actuator_fault {
            Some(format!("actuator state unknown: {why}"))
        } else if let Some((id, why)) = tripped {
            Some(format!("interlock {id}: {why}"))
        } else if let Some(id) = latched {
            Some(if id == ACTUATOR_LATCH {
                "the actuator contradicted a confirmed command: latched (reset needed)".to_string()
            } else {
                format!("interlock {id} latched (reset needed)")
            })
        } else if p.on
            && now.saturating_sub(p.on_since) >= cfg.max_run_ms
            && !disabled(Fault::NoMaxRun)
        {
            Some(format!("max run {} s reached", cfg.max_run_ms / 1000))
        } else {
            None
        };
        let (demand, source) = match (p.operator, p.lease_until, p.auto_demand) {
            (Some(run), _, _) => (run, "operator"),
            (None, Some((_, run)), _) => (run, "central lease"),
            (None, None, auto) => (auto, "local level control"),
        };
        let mut reasons = Vec::new();
        let mut inhibit_kind = None;
        let want_on = if let Some(why) = forced_off {
            reasons.push(why);
            false
        } else if !demand {
            if p.on && now.saturating_sub(p.on_since) < cfg.min_run_ms {
                reasons.push(format!(
                    "no demand from {source}, min run {} s holds",
                    cfg.min_run_ms / 1000
                ));
                true
            } else {
                reasons.push(format!("no demand from {source}"));
                false
            }
        } else if p.on {
            true
        } else if now.saturating_sub(p.off_since) < cfg.min_off_ms && !disabled(Fault::NoMinOff) {
            inhibit_kind = Some("min_off");
            reasons.push(format!(
                "demand from {source} inhibited: min off {} s ({} s left)",
                cfg.min_off_ms / 1000,
                (cfg.min_off_ms - now.saturating_sub(p.off_since)).div_ceil(1000)
            ));
            false
        } else if p.starts.len() as u32 >= cfg.max_starts_per_hour
            && !disabled(Fault::NoStartsPerHour)
        {
            inhibit_kind = Some("starts_per_hour");
            reasons.push(format!(
                "demand from {source} inhibited: {} starts in the last hour (max {})",
                p.starts.len(),
                cfg.max_starts_per_hour
            ));
            false
        } else {
            reasons.push(format!("demand from {source}"));
            true
        };
        p.reasons = reasons.clone();
        if want_on != p.on {
            p.on = want_on;
            if want_on {
                p.on_since = now;
                p.starts.push_back(now);
                out.durable_changed.push(pi);
            } else {
                p.off_since = now;
            }
            p.inhibit = None;
            out.drives.push(Drive {
                pump: pi,
                on: want_on,
            });
            out.audits.push(Audit {
                at_ms: now,
                subject: cfg.id.clone(),
                action: if want_on { "start" } else { "stop" },
                reasons,
                inputs,
            });
        } else if let Some(kind) = inhibit_kind {
            // Reported when it starts or changes kind, not at every tick.
            if p.inhibit.as_deref() != Some(kind) {
                p.inhibit = Some(kind.to_string());
                out.audits.push(Audit {
                    at_ms: now,
                    subject: cfg.id.clone(),
                    action: "inhibit",
                    reasons,
                    inputs,
                });
            }
        } else if !demand || p.on {
            p.inhibit = None;
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
