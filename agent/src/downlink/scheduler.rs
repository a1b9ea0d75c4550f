//! The downlink scheduler: decides when each transmission happens and keeps them apart.
//!
//! Pure logic on the concentrator's 1 MHz counter (`now` is always passed in, so tests drive
//! time): a packet reserves `[start, start + time on air)` plus margins; timing rules follow
//! Semtech's JIT queue (hand-off 40 ms ahead, too late under 42.5 ms, too early beyond 512 s,
//! Class C "immediately" at now + 80 ms or the first free gap after it); 32 packets at most are
//! queued; the EU868 duty cycle is tracked per sub-band over a sliding hour of monotonic time
//! (the counter wraps every 71.6 min, so it cannot measure an hour).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Hand-off to `lgw_send` this long before the start (`TX_JIT_DELAY`).
pub const HANDOFF_LEAD_US: u32 = 40_000;
/// A packet starting sooner than this is too late (lead + start delay + margin).
pub const MIN_LEAD_US: u32 = HANDOFF_LEAD_US + 1_500 + 1_000;
pub const MAX_LEAD_US: u32 = 512_000_000;
pub const IMMEDIATE_DELAY_US: u32 = 80_000;
/// Kept free before each transmission.
pub const GUARD_US: u32 = 1_000;
/// Kept free after each transmission: the SX1302 has one TX buffer, so the next packet can only
/// be handed off once the previous one has ended, and a hand-off needs 3 ms of lead. With 5 ms
/// the downlink thread had 2 ms to see the end, less `lgw_time_on_air`'s rounding to the ms (a
/// back-to-back SF12 pair failed TOO_LATE once; a loaded Pi has less slack): 10 ms leaves it
/// 8 ms. 15 ms was tried: at 50 tiny downlinks a second the reservations then filled the air
/// and 14 of 3000 were refused QUEUE_FULL (BENCHMARKS.md).
pub const TAIL_US: u32 = 10_000;
pub const QUEUE_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLate,
    TooEarly,
    Collision,
    QueueFull,
    DutyCycle,
}

/// When the item asks to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// At this counter value (Class A: uplink counter + delay).
    At(u32),
    /// Class C: as soon as possible.
    Immediately,
}

use crate::radio::region::sub_band;

#[derive(Debug, Clone)]
struct Reservation<T> {
    start: u32,
    airtime_us: u32,
    payload: T,
    /// What it was charged to the duty cycle, to give back if it never goes out.
    charge: Option<Charge>,
}

/// Airtime charged to a sub-band at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charge {
    band: &'static str,
    at: Instant,
    airtime: Duration,
}

/// Airtime used per sub-band over the last hour.
#[derive(Debug, Default)]
struct DutyCycle {
    /// (sub-band name, when, airtime)
    used: VecDeque<(&'static str, Instant, Duration)>,
}

const HOUR: Duration = Duration::from_secs(3600);

impl DutyCycle {
    fn expire(&mut self, now: Instant) {
        while self
            .used
            .front()
            .is_some_and(|(_, t, _)| now.duration_since(*t) >= HOUR)
        {
            self.used.pop_front();
        }
    }

    fn used(&self, band: &str) -> Duration {
        self.used
            .iter()
            .filter(|(b, _, _)| *b == band)
            .map(|(_, _, d)| *d)
            .sum()
    }
}

pub struct Scheduler<T> {
    queue: Vec<Reservation<T>>,
    duty: DutyCycle,
    enforce_duty_cycle: bool,
    /// Airtime each of the agent's own actuators keeps in its sub-band for its STOP and the
    /// STOP's re-sends (key: the actuator): only a STOP may use it, so an ON, a refresh or a
    /// network-server downlink never leaves a sub-band without room for the OFF that follows.
    stop_reserve: std::collections::BTreeMap<usize, (&'static str, Duration)>,
    /// The last transmission handed to the radio (start, airtime): no longer queued, maybe
    /// still on air; nothing may be scheduled over it.
    handed: Option<(u32, u32)>,
    /// Hand-over this long before the start (`HANDOFF_LEAD_US` for the concentrator).
    handoff_lead_us: u32,
}

/// Whether two transmissions, guard and tail included, overlap on the wrapping counter.
fn overlap(a: u32, a_air: u32, b: u32, b_air: u32) -> bool {
    let (a0, b0) = (a.wrapping_sub(GUARD_US), b.wrapping_sub(GUARD_US));
    b0.wrapping_sub(a0) < a_air + GUARD_US + TAIL_US
        || a0.wrapping_sub(b0) < b_air + GUARD_US + TAIL_US
}

/// Distance from `now` to `at` on the wrapping counter, negative when `at` is past.
pub fn lead_us(now: u32, at: u32) -> i64 {
    at.wrapping_sub(now) as i32 as i64
}

impl<T> Scheduler<T> {
    pub fn new(enforce_duty_cycle: bool) -> Scheduler<T> {
        Scheduler {
            queue: Vec::new(),
            duty: DutyCycle::default(),
            enforce_duty_cycle,
            stop_reserve: Default::default(),
            handed: None,
            handoff_lead_us: HANDOFF_LEAD_US,
        }
    }

    /// Hands packets over `lead_us` before their start instead (a packet forwarder).
    pub fn with_handoff_lead(mut self, lead_us: u32) -> Scheduler<T> {
        self.handoff_lead_us = lead_us;
        self
    }

    /// Keeps `airtime` of the sub-band of `freq_hz` for the STOPs of actuator `key` (replacing
    /// what it kept before).
    pub fn keep_for_stops(&mut self, key: usize, freq_hz: u32, airtime: Duration) {
        self.stop_reserve
            .insert(key, (sub_band(freq_hz).name, airtime));
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn overlaps(&self, start: u32, airtime_us: u32) -> bool {
        self.queue
            .iter()
            .any(|r| overlap(r.start, r.airtime_us, start, airtime_us))
            || self
                .handed
                .is_some_and(|(s, a)| overlap(s, a, start, airtime_us))
    }

    /// Forgets the handed-off transmission once it has ended (before the counter could wrap
    /// onto it).
    fn expire_handed(&mut self, now: u32) {
        if self
            .handed
            .is_some_and(|(s, a)| lead_us(now, s.wrapping_add(a + TAIL_US)) < 0)
        {
            self.handed = None;
        }
    }

    /// The first start from `at` on that overlaps none of `fixed` (windows), pushing past each.
    fn first_free(at: u32, airtime_us: u32, fixed: &[(u32, u32)]) -> u32 {
        let mut at = at;
        for _ in 0..=fixed.len() {
            match fixed.iter().find(|(s, a)| overlap(*s, *a, at, airtime_us)) {
                Some((s, a)) => at = s.wrapping_add(a + TAIL_US + GUARD_US),
                None => break,
            }
        }
        at
    }

    /// Reserves a transmission; returns its start counter.
    pub fn schedule(
        &mut self,
        now: u32,
        mono_now: Instant,
        when: When,
        airtime_us: u32,
        freq_hz: u32,
        payload: T,
    ) -> Result<u32, Refusal> {
        if self.queue.len() >= QUEUE_MAX {
            return Err(Refusal::QueueFull);
        }
        self.expire_handed(now);
        let start = match when {
            When::At(at) => {
                let lead = lead_us(now, at);
                if lead < MIN_LEAD_US as i64 {
                    return Err(Refusal::TooLate);
                }
                if lead > MAX_LEAD_US as i64 {
                    return Err(Refusal::TooEarly);
                }
                if self.overlaps(at, airtime_us) {
                    return Err(Refusal::Collision);
                }
                at
            }
            When::Immediately => {
                // now + 80 ms, pushed past each reservation it would overlap.
                let fixed: Vec<(u32, u32)> = self
                    .queue
                    .iter()
                    .map(|r| (r.start, r.airtime_us))
                    .chain(self.handed)
                    .collect();
                let at = Self::first_free(now.wrapping_add(IMMEDIATE_DELAY_US), airtime_us, &fixed);
                if self.overlaps(at, airtime_us) || lead_us(now, at) > MAX_LEAD_US as i64 {
                    return Err(Refusal::Collision);
                }
                at
            }
        };
        if !self.duty_allows(mono_now, freq_hz, airtime_us, false) {
            return Err(Refusal::DutyCycle);
        }
        self.reserve(now, mono_now, start, airtime_us, freq_hz, payload);
        Ok(start)
    }

    /// Whether the sub-band of `freq_hz` has room for `airtime_us` more this hour: for a STOP,
    /// the whole allowance; for anything else, the allowance less what is kept for STOPs.
    fn duty_allows(
        &mut self,
        mono_now: Instant,
        freq_hz: u32,
        airtime_us: u32,
        stop: bool,
    ) -> bool {
        if !self.enforce_duty_cycle {
            return true;
        }
        self.duty.expire(mono_now);
        let band = sub_band(freq_hz);
        let allowed = HOUR * band.permille / 1000;
        let kept: Duration = if stop {
            Duration::ZERO
        } else {
            self.stop_reserve
                .values()
                .filter(|(b, _)| *b == band.name)
                .map(|(_, d)| *d)
                .sum()
        };
        self.duty.used(band.name) + Duration::from_micros(airtime_us as u64) + kept <= allowed
    }

    /// Charges the duty cycle (when enforced) and queues the transmission in start order.
    fn reserve(
        &mut self,
        now: u32,
        mono_now: Instant,
        start: u32,
        airtime_us: u32,
        freq_hz: u32,
        payload: T,
    ) {
        let charge = self.enforce_duty_cycle.then(|| {
            let band = sub_band(freq_hz).name;
            let at = mono_now + Duration::from_micros(lead_us(now, start).max(0) as u64);
            let airtime = Duration::from_micros(airtime_us as u64);
            self.duty.used.push_back((band, at, airtime));
            Charge { band, at, airtime }
        });
        let pos = self
            .queue
            .iter()
            .position(|r| lead_us(now, r.start) > lead_us(now, start))
            .unwrap_or(self.queue.len());
        self.queue.insert(
            pos,
            Reservation {
                start,
                airtime_us,
                payload,
                charge,
            },
        );
    }

    /// Reserves a transmission that goes before any other (a pump STOP): as soon as possible,
    /// taking the place of every `may_evict` reservation in its way, and of the latest one when
    /// the queue is full. Returns its start and the payloads it displaced (they will not go
    /// out; their airtime is given back). The duty cycle is checked first: a refusal displaces
    /// nothing.
    pub fn schedule_first(
        &mut self,
        now: u32,
        mono_now: Instant,
        airtime_us: u32,
        freq_hz: u32,
        payload: T,
        may_evict: impl Fn(&T) -> bool,
    ) -> Result<(u32, Vec<T>), Refusal> {
        if !self.duty_allows(mono_now, freq_hz, airtime_us, true) {
            return Err(Refusal::DutyCycle);
        }
        self.expire_handed(now);
        // Its place: after what is on air and other first items only.
        let fixed: Vec<(u32, u32)> = self
            .queue
            .iter()
            .filter(|r| !may_evict(&r.payload))
            .map(|r| (r.start, r.airtime_us))
            .chain(self.handed)
            .collect();
        let at = Self::first_free(now.wrapping_add(IMMEDIATE_DELAY_US), airtime_us, &fixed);
        if lead_us(now, at) > MAX_LEAD_US as i64 {
            return Err(Refusal::Collision);
        }
        let mut evicted = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let r = &self.queue[i];
            if may_evict(&r.payload) && overlap(r.start, r.airtime_us, at, airtime_us) {
                evicted.push(self.queue.remove(i));
            } else {
                i += 1;
            }
        }
        if self.queue.len() >= QUEUE_MAX {
            match self.queue.iter().rposition(|r| may_evict(&r.payload)) {
                Some(last) => evicted.push(self.queue.remove(last)),
                None => return Err(Refusal::QueueFull),
            }
        }
        let evicted: Vec<T> = evicted
            .into_iter()
            .map(|r| {
                if let Some(c) = r.charge {
                    self.refund(c);
                }
                r.payload
            })
            .collect();
        self.reserve(now, mono_now, at, airtime_us, freq_hz, payload);
        Ok((at, evicted))
    }

    /// Packets whose hand-off time has come, in start order, with their start counter and
    /// their duty-cycle charge (give it back with `refund` if the packet does not go out).
    pub fn due(&mut self, now: u32) -> Vec<(u32, T, Option<Charge>)> {
        let mut out = Vec::new();
        while self
            .queue
            .first()
            .is_some_and(|r| lead_us(now, r.start) <= self.handoff_lead_us as i64)
        {
            let r = self.queue.remove(0);
            self.handed = Some((r.start, r.airtime_us));
            out.push((r.start, r.payload, r.charge));
        }
        out
    }

    /// Everything still queued (the radio stopped, or the agent is shutting down), with the
    /// airtime it was charged given back: none of it will go out.
    pub fn cancel_all(&mut self) -> Vec<T> {
        let queue = std::mem::take(&mut self.queue);
        queue
            .into_iter()
            .map(|r| {
                if let Some(c) = r.charge {
                    self.refund(c);
                }
                r.payload
            })
            .collect()
    }

    /// Gives back the airtime of a packet that was not emitted: only what goes on air counts.
    pub fn refund(&mut self, charge: Charge) {
        if let Some(i) = self
            .duty
            .used
            .iter()
            .position(|(b, t, d)| *b == charge.band && *t == charge.at && *d == charge.airtime)
        {
            self.duty.used.remove(i);
        }
    }

    /// How long until the next hand-off, if any.
    pub fn next_handoff_in(&self, now: u32) -> Option<Duration> {
        self.queue.first().map(|r| {
            Duration::from_micros(
                (lead_us(now, r.start) - self.handoff_lead_us as i64).max(0) as u64
            )
        })
    }

    /// Share of each sub-band's hourly allowance used, in per cent.
    pub fn duty_cycle_usage(&mut self, mono_now: Instant) -> Vec<(&'static str, f64)> {
        self.duty.expire(mono_now);
        crate::radio::region::EU868_SUB_BANDS
            .iter()
            .map(|b| {
                let allowed = (HOUR * b.permille / 1000).as_secs_f64();
                (
                    b.name,
                    self.duty.used(b.name).as_secs_f64() / allowed * 100.0,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u32 = 868_100_000;

    #[test]
    fn a_class_a_downlink_is_scheduled_at_its_counter_and_handed_off_40_ms_ahead() {
        let t = Instant::now();
        let mut s = Scheduler::new(true);
        let at = 5_000_000;
        assert_eq!(
            s.schedule(4_000_000, t, When::At(at), 50_000, F, "rx1"),
            Ok(at)
        );
        assert!(s.due(at - HANDOFF_LEAD_US - 1).is_empty());
        let due = s.due(at - HANDOFF_LEAD_US);
        assert_eq!(
            due.iter().map(|(a, p, _)| (*a, *p)).collect::<Vec<_>>(),
            vec![(at, "rx1")]
        );
    }

    #[test]
    fn a_first_item_displaces_the_downlinks_in_its_way_and_a_full_queue_makes_room() {
        let t = Instant::now();
        let now = 1_000_000;
        let mut s = Scheduler::new(false);
        // A network downlink right where "immediately" falls, and one later.
        let at = now + IMMEDIATE_DELAY_US + 10_000;
        s.schedule(now, t, When::At(at), 50_000, F, "ns-rx1")
            .unwrap();
        s.schedule(now, t, When::At(at + 2_000_000), 50_000, F, "ns-later")
            .unwrap();
        let (start, evicted) = s
            .schedule_first(now, t, 100_000, F, "stop", |p| p.starts_with("ns"))
            .unwrap();
        assert_eq!(start, now + IMMEDIATE_DELAY_US);
        assert_eq!(evicted, vec!["ns-rx1"]);
        assert_eq!(s.len(), 2);
        // Another first item is not displaced: the next one goes after it.
        let (second, evicted) = s
            .schedule_first(now, t, 100_000, F, "stop2", |p| p.starts_with("ns"))
            .unwrap();
        assert!(evicted.is_empty());
        assert!(lead_us(start, second) >= 100_000);
        // A full queue of network downlinks: the latest one makes room.
        let mut s = Scheduler::new(false);
        for i in 0..QUEUE_MAX as u32 {
            s.schedule(
                now,
                t,
                When::At(now + 10_000_000 + i * 1_000_000),
                50_000,
                F,
                "ns",
            )
            .unwrap();
        }
        assert_eq!(
            s.schedule(now, t, When::Immediately, 50_000, F, "ns"),
            Err(Refusal::QueueFull)
        );
        let (_, evicted) = s
            .schedule_first(now, t, 100_000, F, "stop", |p| p.starts_with("ns"))
            .unwrap();
        assert_eq!(evicted, vec!["ns"]);
        assert_eq!(s.len(), QUEUE_MAX);
    }

    #[test]
    fn nothing_is_scheduled_over_a_transmission_already_handed_to_the_radio() {
        let t = Instant::now();
        let now = 1_000_000;
        let mut s = Scheduler::new(false);
        // A 2 s transmission handed off: out of the queue, still on air.
        let start = now + IMMEDIATE_DELAY_US;
        s.schedule(now, t, When::Immediately, 2_000_000, F, "ns-on-air")
            .unwrap();
        assert_eq!(s.due(start - HANDOFF_LEAD_US).len(), 1);
        let later = start - HANDOFF_LEAD_US + 10_000;
        let at = s
            .schedule(later, t, When::Immediately, 100_000, F, "next")
            .unwrap();
        assert!(lead_us(start + 2_000_000, at) > 0, "after the one on air");
        assert_eq!(
            s.schedule(later, t, When::At(start + 500_000), 10_000, F, "rx1"),
            Err(Refusal::Collision)
        );
        // A first item goes right after the one on air, displacing the queued one there.
        let (first, evicted) = s
            .schedule_first(later, t, 100_000, F, "stop", |p| *p != "stop")
            .unwrap();
        assert_eq!(first, at);
        assert_eq!(evicted, vec!["next"]);
        // Once it has ended, it is forgotten.
        let after = start + 2_000_000 + TAIL_US + 1;
        s.schedule(after, t, When::At(after + 1_000_000), 10_000, F, "late")
            .unwrap();
    }

    #[test]
    fn a_first_item_refused_by_the_duty_cycle_displaces_nothing() {
        let t = Instant::now();
        let now = 1_000_000;
        let mut s = Scheduler::new(true);
        let f = 869_525_000; // 10 % sub-band: 360 s an hour
        for i in 0..4u32 {
            s.schedule(
                now,
                t,
                When::At(now + 1_000_000 + i * 3_000_000),
                2_000_000,
                f,
                "ns",
            )
            .unwrap();
        }
        // 352 s more of airtime leaves less than a STOP's worth.
        s.duty
            .used
            .push_back(("869.4-869.65", t, Duration::from_secs(352)));
        assert_eq!(
            s.schedule_first(now, t, 200_000, f, "stop", |p| *p == "ns"),
            Err(Refusal::DutyCycle)
        );
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn what_is_kept_for_stops_is_used_by_stops_only() {
        let t = Instant::now();
        let now = 1_000_000;
        let mut s = Scheduler::new(true);
        let f = 869_525_000; // 10 % sub-band: 360 s an hour
                             // An actuator keeps 1 s for its STOP and re-sends; 358.5 s are used.
        s.keep_for_stops(0, f, Duration::from_secs(1));
        s.duty
            .used
            .push_back(("869.4-869.65", t, Duration::from_millis(358_500)));
        // An ON (or a network-server downlink) of 0.6 s would eat into the STOP's room.
        assert_eq!(
            s.schedule(now, t, When::Immediately, 600_000, f, "on"),
            Err(Refusal::DutyCycle)
        );
        // The STOP has it.
        assert!(s
            .schedule_first(now, t, 600_000, f, "stop", |_| false)
            .is_ok());
        // Another sub-band keeps nothing for it.
        assert!(s
            .schedule(now, t, When::At(now + 5_000_000), 600_000, F, "ns")
            .is_ok());
    }

    #[test]
    fn too_late_and_too_early_are_refused() {
        let t = Instant::now();
        let mut s = Scheduler::<()>::new(true);
        assert_eq!(
            s.schedule(
                1_000_000,
                t,
                When::At(1_000_000 + MIN_LEAD_US - 1),
                10,
                F,
                ()
            ),
            Err(Refusal::TooLate)
        );
        assert_eq!(
            s.schedule(1_000_000, t, When::At(999_000), 10, F, ()),
            Err(Refusal::TooLate)
        );
        assert_eq!(
            s.schedule(0, t, When::At(MAX_LEAD_US + 1), 10, F, ()),
            Err(Refusal::TooEarly)
        );
        assert!(s
            .schedule(1_000_000, t, When::At(1_000_000 + MIN_LEAD_US), 10, F, ())
            .is_ok());
    }

    #[test]
    fn overlapping_transmissions_collide() {
        let t = Instant::now();
        let mut s = Scheduler::new(false);
        s.schedule(0, t, When::At(1_000_000), 100_000, F, 1)
            .unwrap();
        assert_eq!(
            s.schedule(0, t, When::At(1_050_000), 10_000, F, 2),
            Err(Refusal::Collision)
        );
        assert_eq!(
            s.schedule(0, t, When::At(950_000), 49_500, F, 3),
            Err(Refusal::Collision),
            "guard time"
        );
        assert_eq!(
            s.schedule(0, t, When::At(1_100_000 + TAIL_US), 10_000, F, 4),
            Err(Refusal::Collision),
            "inside the tail"
        );
        assert!(s
            .schedule(
                0,
                t,
                When::At(1_100_000 + TAIL_US + GUARD_US + 1),
                10_000,
                F,
                5
            )
            .is_ok());
    }

    #[test]
    fn immediately_takes_the_first_free_gap_after_80_ms() {
        let t = Instant::now();
        let mut s = Scheduler::new(false);
        assert_eq!(
            s.schedule(0, t, When::Immediately, 50_000, F, 1),
            Ok(80_000)
        );
        let second = s.schedule(0, t, When::Immediately, 50_000, F, 2).unwrap();
        assert!(second >= 80_000 + 50_000 + TAIL_US + GUARD_US, "{second}");
    }

    #[test]
    fn a_steady_stream_of_class_c_downlinks_never_fills_the_queue() {
        let t = Instant::now();
        let mut s = Scheduler::new(false);
        let mut now = 4_000_000_000u32;
        for i in 0..5_000u32 {
            assert!(
                s.schedule(now, t, When::Immediately, 3_000, 869_525_000, i)
                    .is_ok(),
                "command {i}"
            );
            now = now.wrapping_add(20_000);
            s.due(now);
            assert!(s.len() <= 5, "{} queued after command {i}", s.len());
        }
    }

    #[test]
    fn the_queue_holds_32_packets() {
        let t = Instant::now();
        let mut s = Scheduler::new(false);
        for i in 0..QUEUE_MAX as u32 {
            s.schedule(0, t, When::At(1_000_000 + i * 100_000), 10_000, F, i)
                .unwrap();
        }
        assert_eq!(
            s.schedule(0, t, When::At(9_000_000), 10_000, F, 99),
            Err(Refusal::QueueFull)
        );
    }

    #[test]
    fn scheduling_works_across_the_counter_wrap() {
        let t = Instant::now();
        let mut s = Scheduler::new(false);
        let now = u32::MAX - 500_000;
        let at = now.wrapping_add(1_000_000);
        assert!(at < now, "wrapped");
        assert_eq!(s.schedule(now, t, When::At(at), 30_000, F, "x"), Ok(at));
        assert_eq!(
            s.schedule(now, t, When::At(at.wrapping_sub(10_000)), 30_000, F, "y"),
            Err(Refusal::Collision)
        );
        assert!(s.due(now).is_empty());
        assert_eq!(s.due(at.wrapping_sub(HANDOFF_LEAD_US)).len(), 1);
    }

    #[test]
    fn the_duty_cycle_of_a_sub_band_is_enforced_over_a_sliding_hour() {
        let t = Instant::now();
        let mut s = Scheduler::new(true);
        // 1 % of an hour on 868.0-868.6 is 36 s: six transmissions of 6 s fit, a seventh not.
        for i in 0..6u32 {
            s.schedule(0, t, When::At(1_000_000 + i * 7_000_000), 6_000_000, F, i)
                .unwrap();
            s.due(u32::MAX / 2);
        }
        assert_eq!(
            s.schedule(0, t, When::At(100_000_000), 6_000_000, F, 9),
            Err(Refusal::DutyCycle)
        );
        // Another sub-band is not affected; an hour later the allowance is back.
        assert!(s
            .schedule(0, t, When::At(100_000_000), 6_000_000, 869_525_000, 10)
            .is_ok());
        s.due(u32::MAX / 2);
        let later = t + HOUR + Duration::from_secs(60);
        assert!(s
            .schedule(0, later, When::At(200_000_000), 6_000_000, F, 11)
            .is_ok());
    }

    #[test]
    fn airtime_of_a_packet_that_never_goes_out_is_given_back() {
        let t = Instant::now();
        let mut s = Scheduler::new(true);
        // 0.1 % of an hour on 868.7-869.2 MHz: 3.6 s; two packets of 2 s do not both fit.
        let f = 868_900_000;
        let (a, b) = (1_000_000, 5_000_000);
        assert!(s.schedule(0, t, When::At(a), 2_000_000, f, 1).is_ok());
        assert_eq!(
            s.schedule(0, t, When::At(b), 2_000_000, f, 2),
            Err(Refusal::DutyCycle)
        );
        // The first is due but is not emitted (the hand-off failed): its airtime comes back.
        let (_, _, charge) = s.due(a - HANDOFF_LEAD_US).pop().unwrap();
        s.refund(charge.unwrap());
        assert!(s.schedule(0, t, When::At(b), 2_000_000, f, 3).is_ok());
        // Cancelled ones too.
        assert_eq!(s.cancel_all(), vec![3]);
        assert!(s.schedule(0, t, When::At(b), 2_000_000, f, 4).is_ok());
    }
}
