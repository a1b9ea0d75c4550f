//! The downlink stage: `command/down` payloads in, transmissions and honest acks out.
//!
//! MQTT → decode → validate each item (`validate.rs`) → schedule (`scheduler.rs`) → hand-off to
//! `lgw_send` 40 ms before the start → `DownlinkTxAck` through the durable store. Items are
//! alternatives (RX1, RX2): the first that can be scheduled wins and the rest are IGNORED. The ack
//! of a scheduled item is sent after the hand-off, with its real outcome: a failed `lgw_send` or
//! a radio still emitting the previous packet is reported, not hidden behind an early OK.
//!
//! A second input carries frames the agent built itself (`Owned`: the pump-safety rules'
//! Class C actuators). They share the validation, the scheduler, the queue and the duty cycle
//! with the network server's; a pump STOP goes before every network-server downlink
//! (`Scheduler::schedule_first`), and the rules stage hears what became of each.

pub mod scheduler;
pub mod transmitter;
pub mod validate;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chirpstack_api::gw;
use prost::Message;

use crate::config::Encoding;
use crate::events::{Body, Event};
use crate::ops::counters::Counters;
use crate::radio::hal::{TxMode, TxPacket};
use scheduler::{lead_us, Refusal, Scheduler, When};
use transmitter::{HandedOver, Transmitter};
use validate::{validate, TxLimits};

/// How often a packet waiting for the TX buffer looks again (commands are taken in between).
const TX_BUSY_POLL: Duration = Duration::from_micros(500);

/// Packets whose hand-off time has come (start, packet, duty-cycle charge), in start order.
type Due = VecDeque<(u32, Pending, Option<scheduler::Charge>)>;

/// Packets handed to a packet forwarder, by PULL_RESP token, until its TX_ACK: with their
/// start, duty-cycle charge and answer deadline.
type Awaiting = HashMap<u16, (Pending, u32, Option<scheduler::Charge>, Instant)>;

enum HandOff {
    Sent,
    NotSent,
    /// The previous packet still holds the TX buffer: try again shortly.
    Busy(Pending),
    /// Handed to a packet forwarder: its TX_ACK with this token tells.
    Awaiting(u16, Pending),
}

/// What the stage takes in.
pub enum Input {
    /// A `command/down` payload, with when it arrived.
    Network(Vec<u8>, Instant),
    Owned(Box<Owned>),
    /// Look at the stop flag now (an idle stage waits up to a second otherwise).
    Wake,
}

/// A frame built by the agent, sent "immediately" (Class C).
pub struct Owned {
    /// Frequency, modulation, power and the PHYPayload, validated like the network server's.
    pub item: gw::DownlinkFrameItem,
    /// A pump STOP: goes before every network-server downlink.
    pub first: bool,
    /// Given back in the answer.
    pub tag: u64,
    pub reply: SyncSender<Handed>,
    /// When the radio handed over the frame that caused it (logged as the reaction time).
    pub cause: Option<Instant>,
    /// Which of the agent's actuators sent it, and the airtime that actuator keeps in its
    /// sub-band for its STOP and the STOP's re-sends: the duty cycle lets nothing else use it
    /// (`Scheduler::keep_for_stops`).
    pub actuator: usize,
    pub stop_reserve: Duration,
}

/// What became of an `Owned` frame: handed to the radio (with its start counter), or why not.
#[derive(Debug, Clone, PartialEq)]
pub struct Handed {
    pub tag: u64,
    pub result: Result<u32, String>,
}

enum Origin {
    Network {
        downlink_id: u32,
        statuses: Vec<gw::TxAckStatus>,
        item: usize,
    },
    Owned {
        tag: u64,
        reply: SyncSender<Handed>,
        cause: Option<Instant>,
        first: bool,
    },
}

struct Pending {
    origin: Origin,
    /// Asked to go "immediately" (Class C).
    asap: bool,
    packet: TxPacket,
    /// The concentrator start this was scheduled against: a restart resets the counter.
    radio_start: u64,
}

/// Timing figures over the most recent `TIMING_SAMPLES` downlinks (bounded: the daemon runs for
/// months), logged at shutdown; the downlink benchmark reads them.
#[derive(Default)]
struct Timings {
    /// From MQTT delivery to the scheduling decision, µs.
    to_decision_us: VecDeque<u32>,
    /// Hand-off lead before the start, µs.
    lead_us: VecDeque<i64>,
    /// Hand-offs too late, since start.
    late: u64,
}

const TIMING_SAMPLES: usize = 65_536;

fn sample<T>(v: &mut VecDeque<T>, x: T) {
    if v.len() == TIMING_SAMPLES {
        v.pop_front();
    }
    v.push_back(x);
}

fn pct<T: Copy + Ord + Default>(sorted: &[T], p: usize) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[(sorted.len() - 1) * p / 100]
}

impl Timings {
    fn log(self) {
        let mut to_decision_us = Vec::from(self.to_decision_us);
        let mut lead_us = Vec::from(self.lead_us);
        to_decision_us.sort_unstable();
        lead_us.sort_unstable();
        tracing::info!(
            decided = to_decision_us.len(),
            to_decision_us_p50 = pct(&to_decision_us, 50),
            to_decision_us_p99 = pct(&to_decision_us, 99),
            to_decision_us_max = to_decision_us.last().copied().unwrap_or(0),
            handoffs = lead_us.len(),
            lead_us_min = lead_us.first().copied().unwrap_or(0),
            lead_us_p50 = pct(&lead_us, 50),
            lead_us_max = lead_us.last().copied().unwrap_or(0),
            late = self.late,
            "downlink summary"
        );
    }
}

pub struct Downlinks {
    pub input: Receiver<Input>,
    /// Set at shutdown: the stage ends (the Class C actuators keep senders of `input`).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The concentrator, or a packet forwarder (`transmitter.rs`).
    pub radio: Arc<dyn Transmitter>,
    /// A forwarder's TX_ACK not heard within this: the downlink is answered INTERNAL_ERROR.
    pub tx_ack_timeout: Duration,
    pub output: SyncSender<Event>,
    pub gateway_id: String,
    pub encoding: Encoding,
    pub limits: TxLimits,
    pub enforce_duty_cycle: bool,
    pub counters: Arc<Counters>,
    /// SCHED_FIFO priority of the stage's thread (0: normal scheduling).
    pub realtime_priority: u8,
}

fn refusal_status(r: Refusal) -> gw::TxAckStatus {
    match r {
        Refusal::TooLate => gw::TxAckStatus::TooLate,
        Refusal::TooEarly => gw::TxAckStatus::TooEarly,
        Refusal::Collision => gw::TxAckStatus::CollisionPacket,
        Refusal::QueueFull => gw::TxAckStatus::QueueFull,
        Refusal::DutyCycle => gw::TxAckStatus::DutyCycleOverflow,
    }
}

impl Downlinks {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("downlink".into())
            .spawn(move || {
                crate::realtime::raise_current_thread("downlink", self.realtime_priority);
                self.run()
            })
    }

    fn run(self) {
        let mut sched: Scheduler<Pending> =
            Scheduler::new(self.enforce_duty_cycle).with_handoff_lead(self.radio.handoff_lead_us());
        let mut awaiting = Awaiting::new();
        let mut last_usage = Instant::now();
        let mut timings = Timings::default();
        // Packets whose hand-off time has come, waiting for the TX buffer to be free: the stage
        // keeps taking commands meanwhile (a STOP must not queue behind that wait).
        let mut due = Due::new();
        loop {
            let clock = self.radio.clock();
            if clock.is_none() && !(sched.is_empty() && due.is_empty()) {
                self.cancel_all(
                    &mut sched,
                    &mut due,
                    "the radio stopped before its hand-off",
                );
            }
            let wait = if due.is_empty() {
                // Nothing scheduled: only the stop flag to look at (`Input::Wake` comes with
                // it): an idle gateway does not wake for it.
                let cap = Duration::from_millis(if sched.is_empty() { 5000 } else { 100 });
                let answer_due = awaiting
                    .values()
                    .map(|a| a.3.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(cap);
                clock
                    .and_then(|c| sched.next_handoff_in(c.counter))
                    .unwrap_or(cap)
                    .min(cap)
                    .min(answer_due)
            } else {
                TX_BUSY_POLL
            };
            if self.stop.load(Ordering::Relaxed) {
                while let Ok(input) = self.input.try_recv() {
                    self.refuse_at_stop(input);
                }
                self.cancel_all(&mut sched, &mut due, "the agent is shutting down");
                self.settle(&mut sched, &mut awaiting, true);
                timings.log();
                return;
            }
            match self.input.recv_timeout(wait) {
                Ok(input) => {
                    self.take(&mut sched, input, &mut timings);
                    // A burst is taken in one go, still handing off on time in between.
                    for _ in 0..64 {
                        match self.input.try_recv() {
                            Ok(input) => self.take(&mut sched, input, &mut timings),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every accepted downlink gets exactly one answer, these too.
                    self.cancel_all(&mut sched, &mut due, "the agent is shutting down");
                    self.settle(&mut sched, &mut awaiting, true);
                    timings.log();
                    return;
                }
            }
            self.settle(&mut sched, &mut awaiting, false);
            if let Some(clock) = self.radio.clock() {
                due.extend(sched.due(clock.counter));
                while let Some((start, p, charge)) = due.pop_front() {
                    match self.hand_off(start, p, &mut timings) {
                        HandOff::Sent => {}
                        HandOff::NotSent => {
                            if let Some(c) = charge {
                                sched.refund(c);
                            }
                        }
                        HandOff::Busy(p) => {
                            due.push_front((start, p, charge));
                            break;
                        }
                        HandOff::Awaiting(token, p) => {
                            let deadline = Instant::now() + self.tx_ack_timeout;
                            awaiting.insert(token, (p, start, charge, deadline));
                        }
                    }
                }
            }
            if last_usage.elapsed() >= Duration::from_secs(1) {
                last_usage = Instant::now();
                let usage = sched.duty_cycle_usage(Instant::now());
                if let Ok(mut u) = self.counters.duty_cycle_pct.lock() {
                    *u = usage;
                }
            }
        }
    }

    fn take(&self, sched: &mut Scheduler<Pending>, input: Input, timings: &mut Timings) {
        match input {
            Input::Network(bytes, at) => {
                self.command(sched, &bytes);
                sample(&mut timings.to_decision_us, at.elapsed().as_micros() as u32);
            }
            Input::Owned(o) => self.owned(sched, *o),
            Input::Wake => {}
        }
    }

    fn refuse_at_stop(&self, input: Input) {
        match input {
            Input::Network(..) => self.ack(0, &[gw::TxAckStatus::InternalError]),
            Input::Owned(o) => {
                let _ = o.reply.try_send(Handed {
                    tag: o.tag,
                    result: Err("the agent is shutting down".into()),
                });
            }
            Input::Wake => {}
        }
    }

    /// A frame of the agent's own: validated like any other, then scheduled (first, for a STOP).
    fn owned(&self, sched: &mut Scheduler<Pending>, o: Owned) {
        let answer = |result: Result<u32, String>| {
            if o.reply.try_send(Handed { tag: o.tag, result }).is_err() {
                tracing::warn!(
                    tag = o.tag,
                    "the rules stage did not take a downlink's answer"
                );
            }
        };
        let Some(clock) = self.radio.clock() else {
            tracing::warn!(
                tag = o.tag,
                "own downlink not sent: the radio is not running"
            );
            return answer(Err("the radio is not running".into()));
        };
        let c = match validate(&o.item, &self.limits) {
            Ok(c) => c,
            Err((status, why)) => return answer(Err(format!("{status:?}: {why}"))),
        };
        let Some(airtime_us) = self.radio.time_on_air_us(&c.packet) else {
            return answer(Err("no time on air for this packet".into()));
        };
        let freq = c.packet.freq_hz;
        sched.keep_for_stops(o.actuator, freq, o.stop_reserve);
        let pending = Pending {
            origin: Origin::Owned {
                tag: o.tag,
                reply: o.reply.clone(),
                cause: o.cause,
                first: o.first,
            },
            asap: true,
            packet: c.packet,
            radio_start: clock.start,
        };
        let now = clock.counter;
        let scheduled = if o.first {
            sched
                .schedule_first(now, Instant::now(), airtime_us, freq, pending, |p| {
                    matches!(p.origin, Origin::Network { .. })
                })
                .map(|(start, displaced)| {
                    for p in displaced {
                        self.displaced(p);
                    }
                    start
                })
        } else {
            sched.schedule(
                now,
                Instant::now(),
                When::Immediately,
                airtime_us,
                freq,
                pending,
            )
        };
        match scheduled {
            Ok(start) => {
                tracing::debug!(
                    tag = o.tag,
                    start,
                    first = o.first,
                    "own downlink scheduled"
                )
            }
            Err(r) => answer(Err(format!("not scheduled: {r:?}"))),
        }
    }

    /// The answer for a pending item, whatever its origin.
    fn answer(&self, p: Pending, status: gw::TxAckStatus, start: u32) {
        match p.origin {
            Origin::Network {
                downlink_id,
                mut statuses,
                item,
            } => {
                statuses[item] = status;
                self.ack(downlink_id, &statuses);
            }
            Origin::Owned {
                tag,
                reply,
                cause,
                first,
            } => {
                if let (Some(c), gw::TxAckStatus::Ok) = (cause, status) {
                    let us = c.elapsed().as_micros() as u64;
                    tracing::info!(
                        tag,
                        stop = first,
                        reaction_us = us,
                        "own downlink handed to the radio after a sensor frame"
                    );
                }
                let result = if status == gw::TxAckStatus::Ok {
                    Ok(start)
                } else {
                    Err(format!("{status:?}"))
                };
                if reply.try_send(Handed { tag, result }).is_err() {
                    tracing::warn!(tag, "the rules stage did not take a downlink's answer");
                }
            }
        }
    }

    /// A network-server downlink that gave its place to a pump STOP.
    fn displaced(&self, p: Pending) {
        if let Origin::Network { downlink_id, .. } = &p.origin {
            tracing::warn!(
                downlink_id,
                "scheduled downlink not sent: a pump STOP took its place"
            );
        }
        self.answer(p, gw::TxAckStatus::CollisionPacket, 0);
    }

    fn ack(&self, downlink_id: u32, statuses: &[gw::TxAckStatus]) {
        for s in statuses {
            if let Some(c) = self.counters.tx_status.get(*s as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ack = gw::DownlinkTxAck {
            gateway_id: self.gateway_id.clone(),
            downlink_id,
            items: statuses
                .iter()
                .map(|s| gw::DownlinkTxAckItem { status: *s as i32 })
                .collect(),
            ..Default::default()
        };
        if self
            .output
            .try_send(Event {
                at: SystemTime::now(),
                body: Body::Ack(ack),
            })
            .is_err()
        {
            tracing::error!(downlink_id, "ack not queued: the store is not keeping up");
        }
    }

    /// Decodes in the configured encoding; the error says which one was expected, and when the
    /// bytes look like the other one, that the network server's encoding differs from ours.
    fn decode(&self, bytes: &[u8]) -> Result<gw::DownlinkFrame, String> {
        let looks_json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match self.encoding {
            Encoding::Protobuf => gw::DownlinkFrame::decode(bytes).map_err(|e| {
                if looks_json {
                    format!("expected protobuf (mqtt.encoding) but this looks like JSON: set the same encoding on both sides ({e})")
                } else {
                    format!("not a protobuf DownlinkFrame (mqtt.encoding = \"protobuf\"): {e}")
                }
            }),
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| {
                if looks_json {
                    format!("not a JSON DownlinkFrame (mqtt.encoding = \"json\"): {e}")
                } else {
                    format!("expected JSON (mqtt.encoding) but this is not JSON; protobuf? set the same encoding on both sides ({e})")
                }
            }),
        }
    }

    fn command(&self, sched: &mut Scheduler<Pending>, bytes: &[u8]) {
        Counters::add(&self.counters.tx_received, 1);
        let frame = match self.decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, bytes = bytes.len(), "command/down: undecodable command refused");
                self.ack(0, &[gw::TxAckStatus::InternalError]);
                return;
            }
        };
        let id = frame.downlink_id;
        if frame.items.is_empty() {
            tracing::warn!(downlink_id = id, "command/down: no items");
            self.ack(id, &[gw::TxAckStatus::InternalError]);
            return;
        }
        if !frame.gateway_id.eq_ignore_ascii_case(&self.gateway_id) {
            tracing::warn!(downlink_id = id, gateway_id = %frame.gateway_id, "command/down: for another gateway, refused");
            self.ack(id, &vec![gw::TxAckStatus::InternalError; frame.items.len()]);
            return;
        }
        let mut statuses = vec![gw::TxAckStatus::Ignored; frame.items.len()];
        let Some(clock) = self.radio.clock() else {
            tracing::warn!(
                downlink_id = id,
                "command/down: the radio is not running; refused at once"
            );
            self.ack(id, &vec![gw::TxAckStatus::InternalError; frame.items.len()]);
            return;
        };
        let (now, radio_start) = (clock.counter, clock.start);
        for (i, item) in frame.items.iter().enumerate() {
            let c = match validate(item, &self.limits) {
                Ok(c) => c,
                Err((status, why)) => {
                    tracing::info!(downlink_id = id, item = i, ?status, %why, "downlink item refused");
                    statuses[i] = status;
                    continue;
                }
            };
            let Some(airtime_us) = self.radio.time_on_air_us(&c.packet) else {
                statuses[i] = gw::TxAckStatus::InternalError;
                continue;
            };
            if let Some(eirp) = c.power_capped_to {
                tracing::info!(
                    downlink_id = id,
                    item = i,
                    requested_dbm = item.tx_info.as_ref().map_or(0, |t| t.power),
                    sent_at_dbm = eirp,
                    "downlink power above the sub-band's legal EIRP: sent at the limit"
                );
            }
            let freq = c.packet.freq_hz;
            // Earlier items keep their refusals, later ones stay IGNORED.
            let pending = Pending {
                origin: Origin::Network {
                    downlink_id: id,
                    statuses: statuses.clone(),
                    item: i,
                },
                asap: c.when == validate::Timing::Immediately,
                packet: c.packet,
                radio_start,
            };
            match sched.schedule(
                now,
                Instant::now(),
                c.when.when(),
                airtime_us,
                freq,
                pending,
            ) {
                Ok(start) => {
                    // The ack waits for the hand-off.
                    tracing::debug!(
                        downlink_id = id,
                        item = i,
                        start,
                        lead_us = lead_us(now, start),
                        "downlink scheduled"
                    );
                    return;
                }
                Err(r) => {
                    tracing::info!(downlink_id = id, item = i, refusal = ?r, "downlink item not scheduled");
                    statuses[i] = refusal_status(r);
                }
            }
        }
        self.ack(id, &statuses);
    }

    /// Hands a due packet to the radio and acks it with the outcome; or gives it back while
    /// the previous packet still holds the TX buffer and there is time.
    fn hand_off(&self, start: u32, mut p: Pending, timings: &mut Timings) -> HandOff {
        let status = match self.transmit(start, &mut p.packet, p.radio_start, p.asap, timings) {
            None => return HandOff::Busy(p),
            Some(HandedOver::Awaiting(token)) => return HandOff::Awaiting(token, p),
            Some(HandedOver::Now(status)) => status,
        };
        let sent = status == gw::TxAckStatus::Ok;
        if sent {
            Counters::add(&self.counters.tx_emitted, 1);
        }
        self.answer(p, status, start);
        if sent {
            HandOff::Sent
        } else {
            HandOff::NotSent
        }
    }

    /// Answers the packets a forwarder acknowledged, and those whose TX_ACK did not come in
    /// time (or will not be waited for: `all`, at shutdown) with INTERNAL_ERROR: the forwarder
    /// may or may not have sent them, so their airtime stays charged.
    fn settle(&self, sched: &mut Scheduler<Pending>, awaiting: &mut Awaiting, all: bool) {
        for (token, status) in self.radio.take_acks() {
            let Some((p, start, charge, _)) = awaiting.remove(&token) else {
                continue;
            };
            if status == gw::TxAckStatus::Ok {
                Counters::add(&self.counters.tx_emitted, 1);
            } else if let Some(c) = charge {
                sched.refund(c);
            }
            self.answer(p, status, start);
        }
        let now = Instant::now();
        let late: Vec<u16> = awaiting
            .iter()
            .filter(|(_, a)| all || a.3 <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            let Some((p, start, _, _)) = awaiting.remove(&token) else {
                continue;
            };
            tracing::warn!(
                token,
                timeout = ?self.tx_ack_timeout,
                shutting_down = all,
                "no TX_ACK from the packet forwarder: answered INTERNAL_ERROR (it may or may not have been sent)"
            );
            // Abandoned at shutdown is not the forwarder's silence.
            if !all {
                if let Ok(mut f) = self.counters.forwarder.lock() {
                    if let Some(f) = f.as_mut() {
                        f.tx_ack_timeouts += 1;
                    }
                }
            }
            self.answer(p, gw::TxAckStatus::InternalError, start);
        }
    }

    /// Everything scheduled or due that will not go out now: answered, its airtime given back.
    fn cancel_all(&self, sched: &mut Scheduler<Pending>, due: &mut Due, why: &str) {
        for (_, p, charge) in due.drain(..) {
            if let Some(c) = charge {
                sched.refund(c);
            }
            self.cancelled(p, why);
        }
        for p in sched.cancel_all() {
            self.cancelled(p, why);
        }
    }

    /// A scheduled packet that will not go out.
    fn cancelled(&self, p: Pending, why: &str) {
        match &p.origin {
            Origin::Network { downlink_id, .. } => {
                tracing::warn!(downlink_id, why, "scheduled downlink not sent")
            }
            Origin::Owned { tag, .. } => {
                tracing::warn!(tag, why, "scheduled own downlink not sent")
            }
        }
        self.answer(p, gw::TxAckStatus::InternalError, 0);
    }

    /// The hand-off's outcome, or `None` while the previous packet still holds the TX buffer
    /// and there is time to wait for it.
    fn transmit(
        &self,
        start: u32,
        packet: &mut TxPacket,
        radio_start: u64,
        asap: bool,
        timings: &mut Timings,
    ) -> Option<HandedOver> {
        packet.mode = TxMode::Timestamped(start);
        let now = match self.radio.clock() {
            Some(c) if c.start == radio_start => c.counter,
            Some(_) => {
                tracing::warn!(
                    "downlink dropped: the radio restarted since it was scheduled (counter reset)"
                );
                return Some(HandedOver::Now(gw::TxAckStatus::InternalError));
            }
            None => {
                tracing::warn!("downlink hand-off: the radio stopped");
                return Some(HandedOver::Now(gw::TxAckStatus::InternalError));
            }
        };
        let lead = lead_us(now, start);
        // An "immediately" packet to a forwarder goes as `imme`: its timing is the forwarder's.
        let forwarder_asap = asap && self.radio.places_immediate();
        if lead < self.radio.min_handoff_lead_us() && !forwarder_asap {
            tracing::warn!(lead_us = lead, "downlink hand-off too late");
            timings.late += 1;
            return Some(HandedOver::Now(gw::TxAckStatus::TooLate));
        }
        // Hand over only when the TX buffer is free.
        if self.radio.busy(packet.rf_chain) {
            return None;
        }
        sample(&mut timings.lead_us, lead);
        Some(self.radio.send(packet, radio_start, asap))
    }
}
