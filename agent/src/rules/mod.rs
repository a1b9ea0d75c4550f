//! Local pump-safety rules: the stage that reads the sensors the rule file names, straight from
//! the radio, and drives the pumps whether or not the central server can be reached.
//!
//! ```text
//! uplink stage ──copy of frames from the rule file's DevAddrs (try_send, counted)──▶ rules (thread)
//!   session check (MIC, 32-bit FCnt, replay) → decoder → engine scan (and a 1 s tick)
//!   → actuators (GPIO relay, or a Class C frame → downlink stage) → audit records → store
//!   (event/rules) and the log
//! downlink stage ──what became of each Class C frame──▶ rules (`class_c::Link`: refresh,
//!   confirmation by the actuator's status uplink, retries, alarm)
//! ```
//! The uplink stage never waits on this one; frames still go to the central server unchanged.
//! Durable state (last frame counter per device, latches, lockouts, start history) lives in the
//! store's `state` tree; "on" is never persisted: a restart starts with every pump off.

pub mod actuator;
pub mod central;
pub mod class_c;
pub mod decoder;
pub mod engine;
pub mod file;
pub mod lorawan;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::RulesConfig;
use crate::events::{unix_ms, Body, Event};
use crate::ops::counters::Counters;
use crate::store::Queue;
use engine::{Audit, Durable, Engine, Outcome};
use file::RuleSet;
use lorawan::{Sessions, Verdict};

/// The rule file and the sessions of its devices, validated together.
pub struct Loaded {
    pub rules: RuleSet,
    pub sessions: Vec<lorawan::Session>,
}

/// Reads the rule file and the keys file; every problem, located.
pub fn load(cfg: &RulesConfig) -> Result<Loaded, Vec<String>> {
    let rules = file::load(&cfg.file).map_err(|e| e.0);
    let sessions = lorawan::load_keys(&cfg.keys_file);
    let (rules, sessions) = match (rules, sessions) {
        (Ok(r), Ok(s)) => (r, s),
        (r, s) => {
            let mut all = r.err().unwrap_or_default();
            all.extend(s.err().unwrap_or_default());
            return Err(all);
        }
    };
    let missing: Vec<String> = rules
        .devices
        .iter()
        .filter(|d| !sessions.iter().any(|s| s.dev_eui == d.dev_eui))
        .map(|d| {
            format!(
                "{}: device {} has no keys in {}",
                cfg.file.display(),
                d.dev_eui,
                cfg.keys_file.display()
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    Ok(Loaded { rules, sessions })
}

/// The DevAddrs whose frames the uplink stage copies to the rules stage.
#[derive(Debug, Clone, Default)]
pub struct Watch(HashSet<[u8; 4]>);

impl Watch {
    /// True for a data uplink from a watched DevAddr (a cheap look at the header, no crypto).
    pub fn wants(&self, phy: &[u8]) -> bool {
        matches!(phy.first().map(|m| m >> 5), Some(2) | Some(4))
            && phy.len() >= 5
            && self.0.contains(&[phy[4], phy[3], phy[2], phy[1]])
    }
}

/// A frame for the rules, with when the radio handed it over (for the reaction time).
pub struct Frame {
    pub phy: Vec<u8>,
    pub received: Instant,
}

/// What the rules stage takes in.
pub enum Input {
    Frame(Frame),
    /// A `command/pump` payload from the backhaul.
    Command(Vec<u8>),
}

/// What the Class C actuators need from the rest of the agent.
pub struct Radio {
    /// The downlink stage's input.
    pub downlinks: SyncSender<crate::downlink::Input>,
    /// `store.path`: the FCntDown files live beside it.
    pub store_path: PathBuf,
}

pub struct Stage {
    engine: Engine,
    /// Per pump: the Class C link (refresh, confirmation), for Class C actuators.
    links: Vec<Option<class_c::Link>>,
    /// What the downlink stage did with each Class C frame.
    handed: Receiver<crate::downlink::Handed>,
    sessions: Sessions,
    actuators: actuator::Shared,
    input: Receiver<Input>,
    audit: SyncSender<Event>,
    gateway_id: String,
    queue: Arc<Queue>,
    counters: Arc<Counters>,
    /// Last time the stage went round its loop (ms since `epoch`), for the watchdog.
    heartbeat: Arc<AtomicU64>,
    epoch: Instant,
    /// Per device: when a dropped frame was last audited (not more than once a minute).
    dropped_audited: BTreeMap<usize, u64>,
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// How long the stage may go without a turn of its loop before the watchdog stops the pumps.
pub const WATCHDOG: Duration = Duration::from_secs(5);

/// Drives every pump off when the stage's heartbeat (ms since `epoch`) is older than `limit`,
/// once per stall; returns when `stopping` is set.
fn watchdog(
    heartbeat: &AtomicU64,
    epoch: Instant,
    actuators: &actuator::Shared,
    stopping: &AtomicBool,
    limit: Duration,
) {
    let mut fired = false;
    while !stopping.load(Ordering::Relaxed) {
        std::thread::sleep((limit / 10).max(Duration::from_millis(10)));
        let beat = heartbeat.load(Ordering::Relaxed);
        let late =
            epoch.elapsed().as_millis() as u64 > beat.saturating_add(limit.as_millis() as u64);
        if late && !fired {
            actuator::all_off(actuators, "the rules stage stopped turning (watchdog)");
        }
        fired = late;
    }
}

impl Stage {
    /// Opens the actuators (every pump off), restores the durable state from the store.
    pub fn new(
        loaded: Loaded,
        gateway_id: String,
        input: Receiver<Input>,
        audit: SyncSender<Event>,
        queue: Arc<Queue>,
        counters: Arc<Counters>,
        radio: Radio,
    ) -> Result<(Stage, Watch, actuator::Shared), String> {
        let Loaded {
            rules,
            mut sessions,
        } = loaded;
        let (handed_tx, handed) = std::sync::mpsc::sync_channel(1024);
        let actuators = actuator::open_all(
            &rules
                .pumps
                .iter()
                .map(|p| (p.id.clone(), p.actuator.clone()))
                .collect::<Vec<_>>(),
            &mut |i, id, spec| {
                let session = sessions
                    .iter()
                    .find(|s| s.dev_eui == spec.device)
                    .cloned()
                    .ok_or_else(|| format!("device {} has no keys", spec.device))?;
                Ok(Box::new(class_c::Actuator::open(
                    id,
                    i,
                    spec,
                    session,
                    &radio.store_path,
                    queue.clone(),
                    radio.downlinks.clone(),
                    handed_tx.clone(),
                )?))
            },
        )?;
        let boot = now_ms();
        let links = rules
            .pumps
            .iter()
            .map(|p| match &p.actuator {
                file::Actuator::LorawanClassC(c) => {
                    let mut l = class_c::Link::new(c);
                    // open_all sent the boot OFF.
                    l.commanded(false, boot);
                    Some(l)
                }
                _ => None,
            })
            .collect();
        for s in &mut sessions {
            s.last_fcnt = queue
                .state_get(&format!("fcnt/{}", s.dev_eui))
                .ok()
                .flatten()
                .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                .map(u32::from_be_bytes);
        }
        let mut durable = BTreeMap::new();
        for p in &rules.pumps {
            if let Some(d) = queue
                .state_get(&format!("pump/{}", p.id))
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<Durable>(&v).ok())
            {
                durable.insert(p.id.clone(), d);
            }
        }
        let watch = Watch(
            rules
                .devices
                .iter()
                .filter_map(|d| sessions.iter().find(|s| s.dev_eui == d.dev_eui))
                .map(|s| s.dev_addr_bytes())
                .collect(),
        );
        let engine = Engine::new(rules, now_ms(), &durable);
        let stage = Stage {
            engine,
            links,
            handed,
            sessions: Sessions::new(sessions),
            actuators: actuators.clone(),
            input,
            audit,
            gateway_id,
            queue,
            counters,
            heartbeat: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            dropped_audited: BTreeMap::new(),
        };
        Ok((stage, watch, actuators))
    }

    /// Runs the stage on a thread of its own, and a watchdog that drives every pump off if the
    /// stage stops turning (stuck, or dead) while the process goes on.
    /// `realtime_priority`: SCHED_FIFO for the stage (`radio.realtime_priority`): a busy CPU
    /// must not delay a STOP.
    pub fn spawn(
        self,
        stopping: Arc<AtomicBool>,
        realtime_priority: u8,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let heartbeat = self.heartbeat.clone();
        let epoch = self.epoch;
        let actuators = self.actuators.clone();
        let stage = std::thread::Builder::new()
            .name("rules".into())
            .spawn(move || {
                crate::realtime::raise_current_thread("rules", realtime_priority);
                self.run()
            })?;
        std::thread::Builder::new()
            .name("rules-watchdog".into())
            .spawn(move || watchdog(&heartbeat, epoch, &actuators, &stopping, WATCHDOG))?;
        Ok(stage)
    }

    fn run(mut self) {
        let rules = self.engine.rules();
        tracing::info!(
            pumps = rules.pumps.len(),
            sensors = rules.sensors.len(),
            sha256 = %rules.hash,
            "rules: running; every pump off until the rules say otherwise"
        );
        self.publish_state();
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            self.heartbeat
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            match self
                .input
                .recv_timeout(next_tick.saturating_duration_since(Instant::now()))
            {
                Ok(Input::Frame(frame)) => self.frame(frame),
                Ok(Input::Command(payload)) => self.command(&payload),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(h) = self.handed.try_recv() {
                self.handed(h);
            }
            if Instant::now() >= next_tick {
                next_tick += Duration::from_secs(1);
                let now = now_ms();
                let out = self.engine.tick(now);
                self.apply(out, None);
                for pi in 0..self.links.len() {
                    if let Some(steps) = self.links[pi].as_mut().map(|l| l.tick(now)) {
                        self.link_steps(pi, steps, now);
                    }
                }
            }
        }
        actuator::all_off(&self.actuators, "the agent is stopping");
        // Ended on purpose: nothing for the watchdog to do.
        self.heartbeat.store(u64::MAX, Ordering::Relaxed);
    }

    fn frame(&mut self, frame: Frame) {
        let now = now_ms();
        match self.sessions.check(&frame.phy) {
            Verdict::NotOurs => {}
            Verdict::Accepted {
                session,
                fcnt,
                fport,
                payload,
            } => {
                let eui = self.sessions.sessions[session].dev_eui.clone();
                let Some(di) = self
                    .engine
                    .rules()
                    .devices
                    .iter()
                    .position(|d| d.dev_eui == eui)
                else {
                    return;
                };
                let device = &self.engine.rules().devices[di];
                if device.fport.is_some_and(|p| Some(p) != fport) {
                    self.persist_fcnt(&eui, fcnt);
                    return;
                }
                let decoded = device.decoder.decode(&payload);
                if let Some(e) = &decoded.error {
                    tracing::warn!(device = %eui, fcnt, error = %e, "rules: payload not decoded whole");
                }
                // A Class C actuator's status uplink confirms (or contradicts) its command.
                let feedback: Vec<(usize, bool)> = self
                    .engine
                    .rules()
                    .pumps
                    .iter()
                    .enumerate()
                    .filter_map(|(pi, p)| match &p.actuator {
                        file::Actuator::LorawanClassC(c) if c.device == eui => decoded
                            .fields
                            .iter()
                            .find(|(name, _)| *name == c.feedback)
                            .map(|(_, v)| (pi, *v != 0.0)),
                        _ => None,
                    })
                    .collect();
                for (pi, running) in feedback {
                    if let Some(steps) = self.links[pi].as_mut().map(|l| l.feedback(running, now)) {
                        self.link_steps(pi, steps, now);
                    }
                }
                let sensors: Vec<(usize, f64)> = self
                    .engine
                    .rules()
                    .sensors
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.device == di)
                    .filter_map(|(i, s)| {
                        decoded
                            .fields
                            .iter()
                            .find(|(name, _)| *name == s.field)
                            .map(|(_, v)| (i, *v))
                    })
                    .collect();
                for (i, v) in sensors {
                    let out = self.engine.reading(i, v, now);
                    self.apply(out, Some(frame.received));
                }
                // After acting: a crash in between replays one reading, never a stale action.
                self.persist_fcnt(&eui, fcnt);
            }
            Verdict::Replay { session, fcnt } => self.dropped(
                session,
                now,
                format!("replay: frame counter {fcnt} was already accepted"),
            ),
            Verdict::BadMic { session } => self.dropped(
                session,
                now,
                "MIC check failed (corrupted, forged, or wrong keys)".into(),
            ),
            Verdict::Malformed { session, why } => {
                self.dropped(session, now, format!("malformed frame: {why}"))
            }
        }
    }

    /// What the downlink stage did with a Class C frame.
    fn handed(&mut self, h: crate::downlink::Handed) {
        let (pi, fcnt) = class_c::untag(h.tag);
        let Some(id) = self.engine.rules().pumps.get(pi).map(|p| p.id.clone()) else {
            return;
        };
        match h.result {
            Ok(start) => {
                tracing::debug!(pump = %id, fcnt_down = fcnt, start, "rules: Class C frame handed to the radio")
            }
            Err(why) => {
                tracing::warn!(pump = %id, fcnt_down = fcnt, %why, "rules: Class C frame not sent; trying again");
                if let Some(l) = self.links[pi].as_mut() {
                    l.not_sent(now_ms());
                }
            }
        }
    }

    /// Carries out what a Class C link asks: sends, alarms, confirmations.
    fn link_steps(&mut self, pi: usize, steps: Vec<class_c::Step>, now: u64) {
        use class_c::Step;
        let id = self.engine.rules().pumps[pi].id.clone();
        for step in steps {
            match step {
                Step::Send(on) => self.drive(pi, on, None),
                Step::Confirmed(running) => {
                    tracing::info!(pump = %id, running, "rules: the actuator confirmed its command");
                }
                Step::Unknown(why) => {
                    tracing::error!(pump = %id, %why, "ALARM: the pump's actuator is in an unknown state; the pump is held off");
                    self.send_audit(Audit {
                        at_ms: now,
                        subject: id.clone(),
                        action: "actuator_alarm",
                        reasons: vec![why.clone()],
                        inputs: vec![],
                    });
                    let out = self.engine.actuator_fault(pi, Some(why), now);
                    self.apply(out, None);
                }
                Step::Known => {
                    let out = self.engine.actuator_fault(pi, None, now);
                    self.apply(out, None);
                }
            }
        }
    }

    /// A central request: checked, decided by the engine, answered, audited.
    fn command(&mut self, payload: &[u8]) {
        use central::Action;
        let now = now_ms();
        let req = match central::parse(payload, &self.gateway_id) {
            Ok(r) => r,
            Err(answer) => {
                tracing::warn!(request_id = %answer.request_id, reason = ?answer.reason, "rules: central request refused");
                self.send(Body::Pump(
                    serde_json::to_value(&answer).unwrap_or_default(),
                ));
                return;
            }
        };
        let pump = req.pump.clone().unwrap_or_default();
        let expiry_ms = req.expires_at.unwrap_or(0);
        let cmd = match req.action {
            Action::Run => Some(engine::Command::Lease {
                expiry_ms,
                run: true,
            }),
            Action::Stop => Some(engine::Command::Lease {
                expiry_ms,
                run: false,
            }),
            Action::Auto => Some(engine::Command::LeaseEnd),
            Action::Lockout => Some(engine::Command::Lockout),
            Action::Release => Some(engine::Command::Release),
            Action::ResetLatch => Some(engine::Command::ResetLatch {
                interlock: req.interlock.clone().unwrap_or_default(),
            }),
            Action::State => None,
        };
        let pi = self.engine.rules().pumps.iter().position(|p| p.id == pump);
        let mut refusal = None;
        if let Some(cmd) = cmd {
            match self.engine.command(&pump, cmd, now) {
                Ok(out) => self.apply(out, None),
                Err((r, out)) => {
                    refusal = Some(r.to_string());
                    self.apply(out, None);
                }
            }
        }
        // A run that the safety rules keep from running is refused with their reason, and
        // dropped: the centre must not believe the pump runs, nor find it starting later.
        if let (Action::Run, None, Some(pi)) = (req.action, &refusal, pi) {
            if !self.engine.is_on(pi) {
                let why = self.engine.pump_state(pi, now)["reasons"]
                    .get(0)
                    .and_then(|r| r.as_str())
                    .unwrap_or("not running")
                    .to_string();
                if let Ok(out) = self.engine.command(&pump, engine::Command::LeaseEnd, now) {
                    self.apply(out, None);
                }
                refusal = Some(why);
            }
        }
        let pumps = match (req.action, pi) {
            (Action::State, _) | (_, None) => (0..self.engine.rules().pumps.len())
                .map(|i| self.engine.pump_state(i, now))
                .collect(),
            (_, Some(i)) => vec![self.engine.pump_state(i, now)],
        };
        let sensors = if req.action == Action::State {
            (0..self.engine.rules().sensors.len())
                .map(|i| self.engine.sensor_state(i, now))
                .collect()
        } else {
            vec![]
        };
        let outcome = if refusal.is_some() {
            "refused"
        } else {
            "accepted"
        };
        let who = req
            .requested_by
            .clone()
            .unwrap_or_else(|| "(not said)".into());
        if req.action != Action::State {
            self.send_audit(Audit {
                at_ms: now,
                subject: pump.clone(),
                action: "command",
                reasons: vec![format!(
                    "{:?} (request {}) by {who}: {outcome}{}",
                    req.action,
                    req.request_id,
                    refusal
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )],
                inputs: vec![],
            });
        }
        let answer = central::Answer {
            request_id: req.request_id,
            pump: req.pump,
            action: Some(req.action),
            outcome,
            reason: refusal,
            requested_by: req.requested_by,
            pumps,
            sensors,
        };
        self.send(Body::Pump(
            serde_json::to_value(&answer).unwrap_or_default(),
        ));
    }

    /// An audit record or an answer, to the store. Blocking: neither is ever dropped, and the
    /// pumps were driven before.
    fn send(&self, body: Body) {
        let event = Event {
            at: SystemTime::now(),
            body,
        };
        if self.audit.send(event).is_err() {
            tracing::error!("rules: the store is gone; record not kept");
        }
    }

    fn persist_fcnt(&self, eui: &str, fcnt: u32) {
        if let Err(e) = self
            .queue
            .state_put(&format!("fcnt/{eui}"), &fcnt.to_be_bytes())
        {
            tracing::error!(device = %eui, error = %e, "rules: the frame counter could not be persisted");
        }
    }

    fn dropped(&mut self, session: usize, now: u64, why: String) {
        Counters::add(&self.counters.rules_frames_dropped, 1);
        let eui = self.sessions.sessions[session].dev_eui.clone();
        tracing::warn!(device = %eui, %why, "rules: frame dropped");
        let last = self.dropped_audited.get(&session).copied();
        if last.is_none_or(|t| now.saturating_sub(t) >= 60_000) {
            self.dropped_audited.insert(session, now);
            self.send_audit(Audit {
                at_ms: now,
                subject: eui,
                action: "frame_dropped",
                reasons: vec![why],
                inputs: vec![],
            });
        }
    }

    /// Sets a pump's actuator (an engine decision, or a Class C refresh or re-send); a failure
    /// is an alarm, an audit record, and for a Class C link a frame to send again soon.
    fn drive(&mut self, pi: usize, on: bool, cause: Option<Instant>) {
        let (id, a) = &self.actuators[pi];
        let result = a.lock().unwrap_or_else(|p| p.into_inner()).set(on, cause);
        if let Err(e) = result {
            let id = id.clone();
            tracing::error!(pump = %id, on, error = %e, "ALARM: the actuator failed");
            if let Some(l) = self.links[pi].as_mut() {
                l.not_sent(now_ms());
            }
            self.send_audit(Audit {
                at_ms: now_ms(),
                subject: id,
                action: "actuator_error",
                reasons: vec![e],
                inputs: vec![],
            });
        }
    }

    fn apply(&mut self, out: Outcome, received: Option<Instant>) {
        // Drive first: the audit can wait, the pump cannot.
        for d in &out.drives {
            if let Some(l) = self.links[d.pump].as_mut() {
                l.commanded(d.on, now_ms());
            }
            self.drive(d.pump, d.on, received);
            if let Some(r) = received {
                let us = r.elapsed().as_micros() as u64;
                let id = &self.actuators[d.pump].0;
                tracing::info!(pump = %id, on = d.on, reaction_us = us, "rules: actuator driven by a sensor frame");
            }
        }
        for pi in out
            .durable_changed
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let id = &self.engine.rules().pumps[*pi].id;
            let d = self.engine.durable(*pi);
            if let Err(e) = self.queue.state_put(
                &format!("pump/{id}"),
                &serde_json::to_vec(&d).unwrap_or_default(),
            ) {
                tracing::error!(pump = %id, error = %e, "rules: latches and start history could not be persisted");
            }
        }
        for a in out.audits {
            self.send_audit(a);
        }
        self.publish_state();
    }

    /// Pump and sensor states for the stats.
    fn publish_state(&self) {
        let Ok(mut state) = self.counters.rules_state.lock() else {
            return;
        };
        let rules = self.engine.rules();
        for (pi, p) in rules.pumps.iter().enumerate() {
            let on = if self.engine.is_on(pi) { "on" } else { "off" };
            state.insert(format!("pump_{}", p.id), on.into());
            if let Some(l) = &self.links[pi] {
                let a = if l.is_unknown() {
                    "unknown"
                } else if l.is_confirmed() {
                    "confirmed"
                } else {
                    "awaiting confirmation"
                };
                state.insert(format!("actuator_{}", p.id), a.into());
            }
        }
        for (si, s) in rules.sensors.iter().enumerate() {
            let (value, quality) = self.engine.sensor_quality(si);
            let v = value.map_or("-".to_string(), |v| v.to_string());
            state.insert(format!("sensor_{}", s.id), format!("{quality:?} {v}"));
        }
    }

    fn send_audit(&self, a: Audit) {
        tracing::info!(
            subject = %a.subject,
            action = a.action,
            reasons = %a.reasons.join("; "),
            "rules"
        );
        let mut v = serde_json::to_value(&a).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "rulesSha256".into(),
                self.engine.rules().hash.clone().into(),
            );
        }
        self.send(Body::Rules(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An actuator that records its last command.
    struct Probe(Arc<Mutex<Vec<bool>>>);

    impl actuator::Actuator for Probe {
        fn set(&mut self, on: bool, _cause: Option<Instant>) -> Result<(), String> {
            self.0.lock().unwrap().push(on);
            Ok(())
        }
    }

    #[test]
    fn the_watchdog_drives_the_pumps_off_when_the_stage_stops_turning() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let actuators: actuator::Shared = Arc::new(vec![(
            "P1".to_string(),
            Mutex::new(Box::new(Probe(seen.clone())) as Box<dyn actuator::Actuator>),
        )]);
        let heartbeat = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let t = {
            let (h, a, s) = (heartbeat.clone(), actuators.clone(), stopping.clone());
            std::thread::spawn(move || watchdog(&h, epoch, &a, &s, Duration::from_millis(200)))
        };
        // A stage that turns: nothing happens.
        for _ in 0..10 {
            heartbeat.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(seen.lock().unwrap().is_empty());
        // It stops turning: the pump is driven off, once.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(*seen.lock().unwrap(), vec![false]);
        stopping.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    #[test]
    fn all_off_reaches_an_actuator_whose_lock_was_poisoned_by_a_panic() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let actuators: actuator::Shared = Arc::new(vec![(
            "P1".to_string(),
            Mutex::new(Box::new(Probe(seen.clone())) as Box<dyn actuator::Actuator>),
        )]);
        let a = actuators.clone();
        let _ = std::thread::spawn(move || {
            let _guard = a[0].1.lock().unwrap();
            panic!("a stage panics while driving the pump");
        })
        .join();
        actuator::all_off(&actuators, "test");
        assert_eq!(*seen.lock().unwrap(), vec![false]);
    }
}
