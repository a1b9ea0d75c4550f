//! Pumps driven over LoRaWAN Class C by the agent itself: the agent owns the actuator's
//! session (keys in the keys file), builds and encrypts each ON and OFF, and hands it to the
//! downlink stage, which sends it "immediately" on the configured frequency and SF, STOPs
//! before every network-server downlink.
//!
//! - **FCntDown is never reused** (a reused counter repeats the keystream, and the device drops
//!   the frame silently: possibly a STOP). Each number is reserved in a numbering file beside
//!   the store (`<store.path>.fcntdown-<DevEUI>`, the same two-slot, fsync-before-use scheme as
//!   the store's sequence numbers) and marked issued *before* its frame leaves this module; a
//!   copy goes to the store's `state` tree, and the keys file's `fcnt_down` is a floor. So a
//!   SIGKILL continues after the last number, a power cut after the reservation (a gap), and
//!   a damaged numbering file after the store's copy.
//! - ON is the actuator's own timed command (its `lease`): `Link` sends it again every
//!   `refresh` while the rules say run, and an explicit OFF on every stop.
//! - Each command is confirmed by the actuator's status uplink (`feedback` field of its
//!   decoded frame). Not confirmed within `confirm_within`: sent again, the wait doubling; after
//!   `retries`, an alarm and the pump is in an unknown state (the engine keeps it off). Feedback
//!   that contradicts a confirmed command raises the same alarm.

use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use chirpstack_api::gw;

use super::file::ClassC;
use super::lorawan::Session;
use crate::downlink::{Handed, Input as DownInput, Owned};
use crate::store::numbering::{Found, Numbering};
use crate::store::Queue;

/// Time on air of a LoRa downlink at 125 kHz, CR 4/5, 8 preamble symbols, explicit header, no
/// CRC (Semtech AN1200.13), for the duty-cycle arithmetic of the rule file's check.
pub fn airtime(spreading_factor: u32, phy_len: usize) -> Duration {
    let us = crate::radio::airtime::lora_us(
        spreading_factor,
        125_000,
        crate::radio::hal::CodeRate::Cr45,
        8,
        false,
        true,
        phy_len,
    );
    Duration::from_micros(us.unwrap_or(0).into())
}

/// What an actuator keeps in its sub-band's duty cycle for its STOP: the OFF frame and each of
/// its re-sends.
pub fn stop_reserve(spec: &ClassC) -> Duration {
    airtime(spec.spreading_factor, spec.frame_len(&spec.off_hex)) * (spec.retries + 1)
}

/// One line per Class C actuator for `lora-edge check`: how it is driven and what its
/// refreshes cost.
pub fn describe(rules: &super::file::RuleSet) -> Vec<String> {
    rules
        .pumps
        .iter()
        .filter_map(|p| match &p.actuator {
            super::file::Actuator::LorawanClassC(c) => {
                let (air, share) = c.refresh_cost();
                let refresh = c.refresh_period();
                let worst = c.hour_cost(p.max_starts_per_hour);
                Some(format!(
                    "pump {}: LoRaWAN Class C actuator {} on {:.3} MHz SF{}, ON every {} ({} ms on air: {share:.2} % of the hour; worst hour with {} starts and every re-send {:.2} %), confirmed by its \"{}\" field within {}, {} retries; {} ms kept for its STOP; the network server must not send it downlinks",
                    p.id,
                    c.device,
                    c.frequency_hz as f64 / 1e6,
                    c.spreading_factor,
                    humantime::format_duration(refresh),
                    air.as_millis(),
                    p.max_starts_per_hour,
                    worst.share,
                    c.feedback,
                    humantime::format_duration(c.confirm_within),
                    c.retries,
                    stop_reserve(c).as_millis()
                ))
            }
            _ => None,
        })
        .collect()
}

/// The downlink frame counter of one actuator session.
pub struct FCntDown {
    numbering: Numbering,
    next: u64,
    path: PathBuf,
}

impl FCntDown {
    /// The numbering file of `dev_eui` beside the store.
    pub fn path_for(store: &Path, dev_eui: &str) -> PathBuf {
        let mut p = store.as_os_str().to_owned();
        p.push(format!(".fcntdown-{dev_eui}"));
        PathBuf::from(p)
    }

    /// Opens the counter: the next number is above everything the file, the store's copy
    /// (`copy`: the last number issued) and the keys file's floor say; and a warning when the
    /// file was unreadable.
    pub fn open(
        path: &Path,
        floor: Option<u32>,
        copy: Option<u32>,
    ) -> Result<(FCntDown, Option<String>), String> {
        let (numbering, found) =
            Numbering::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (from_file, warning) = match found {
            Found::Marks(m) => (m.next_safe(), None),
            Found::Nothing => (0, None),
            Found::Damaged => (
                0,
                Some(format!(
                    "{}: both slots unreadable; continuing after the store's copy ({}) and the keys file's fcnt_down ({})",
                    path.display(),
                    copy.map_or("none".into(), |c| c.to_string()),
                    floor.map_or("none".into(), |c| c.to_string()),
                )),
            ),
        };
        let next = from_file
            .max(floor.unwrap_or(0) as u64)
            .max(copy.map_or(0, |c| c as u64 + 1));
        Ok((
            FCntDown {
                numbering,
                next,
                path: path.to_path_buf(),
            },
            warning,
        ))
    }

    /// The next counter, made durable before it is returned: reserved (fsync when a new block
    /// is needed) and marked issued (survives a killed process).
    pub fn take(&mut self) -> Result<u32, String> {
        let n = self.next;
        if n > u32::MAX as u64 {
            return Err("FCntDown exhausted (2^32 frames): the session must be renewed".into());
        }
        self.numbering
            .reserve(n)
            .and_then(|_| self.numbering.issued(n))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.next = n + 1;
        Ok(n as u32)
    }
}

/// The tag of an own downlink: which pump, which counter.
/// The tag of an own downlink: which pump, which counter, ON or OFF.
pub fn tag(pump: usize, fcnt: u32, on: bool) -> u64 {
    ((on as u64) << 63) | (((pump as u64) & 0x7FFF_FFFF) << 32) | fcnt as u64
}

pub fn untag(tag: u64) -> (usize, u32, bool) {
    (
        ((tag >> 32) & 0x7FFF_FFFF) as usize,
        tag as u32,
        tag >> 63 == 1,
    )
}

/// A Class C actuator: `set` builds, numbers and hands a frame to the downlink stage. Callable
/// from any thread (the emergency paths drive every pump off).
pub struct Actuator {
    pump: String,
    pump_index: usize,
    spec: ClassC,
    on: Vec<u8>,
    off: Vec<u8>,
    session: Session,
    fcnt: FCntDown,
    queue: Arc<Queue>,
    downlinks: SyncSender<DownInput>,
    reply: SyncSender<Handed>,
    /// Kept in the sub-band's duty cycle for the STOP and its re-sends.
    stop_reserve: Duration,
}

impl Actuator {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        pump: &str,
        pump_index: usize,
        spec: &ClassC,
        session: Session,
        store_path: &Path,
        queue: Arc<Queue>,
        downlinks: SyncSender<DownInput>,
        reply: SyncSender<Handed>,
    ) -> Result<Actuator, String> {
        let copy = queue
            .state_get(&format!("fcntdown/{}", spec.device))
            .ok()
            .flatten()
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_be_bytes);
        let (fcnt, warning) = FCntDown::open(
            &FCntDown::path_for(store_path, &spec.device),
            session.fcnt_down,
            copy,
        )?;
        if let Some(w) = warning {
            tracing::error!(
                pump,
                "ALARM: the downlink frame counter file was damaged: {w}"
            );
        }
        let hex = |h: &str| hex::decode(h).map_err(|e| format!("pump {pump}: {e}"));
        Ok(Actuator {
            stop_reserve: stop_reserve(spec),
            pump: pump.into(),
            pump_index,
            on: hex(&spec.on_hex)?,
            off: hex(&spec.off_hex)?,
            spec: spec.clone(),
            session,
            fcnt,
            queue,
            downlinks,
            reply,
        })
    }

    fn item(&self, phy: Vec<u8>) -> gw::DownlinkFrameItem {
        gw::DownlinkFrameItem {
            phy_payload: phy,
            tx_info: Some(gw::DownlinkTxInfo {
                frequency: self.spec.frequency_hz,
                power: self.spec.power_dbm,
                modulation: Some(gw::Modulation {
                    parameters: Some(gw::modulation::Parameters::Lora(gw::LoraModulationInfo {
                        bandwidth: 125_000,
                        spreading_factor: self.spec.spreading_factor,
                        code_rate: gw::CodeRate::Cr45 as i32,
                        polarization_inversion: true,
                        preamble: 8,
                        no_crc: true,
                        ..Default::default()
                    })),
                }),
                timing: Some(gw::Timing {
                    parameters: Some(gw::timing::Parameters::Immediately(
                        gw::ImmediatelyTimingInfo {},
                    )),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl super::actuator::Actuator for Actuator {
    fn set(&mut self, on: bool, cause: Option<std::time::Instant>) -> Result<(), String> {
        // Durable (numbering file) before the frame exists.
        let fcnt = self.fcnt.take()?;
        let data = if on { &self.on } else { &self.off };
        let phy = self.session.downlink(fcnt, self.spec.fport, data)?;
        let owned = Owned {
            item: self.item(phy),
            first: !on,
            tag: tag(self.pump_index, fcnt, on),
            reply: self.reply.clone(),
            cause,
            actuator: self.pump_index,
            stop_reserve: self.stop_reserve,
        };
        let sent = self
            .downlinks
            .try_send(DownInput::Owned(Box::new(owned)))
            .map_err(|e| format!("the downlink stage did not take the frame: {e}"));
        // The fallback for a destroyed numbering file; after the hand-over, so that a STOP
        // never waits for the store (the file already holds the number).
        if let Err(e) = self.queue.state_put(
            &format!("fcntdown/{}", self.spec.device),
            &fcnt.to_be_bytes(),
        ) {
            tracing::warn!(pump = %self.pump, error = %e, "the store's copy of FCntDown was not written (the numbering file holds it)");
        }
        sent?;
        tracing::info!(pump = %self.pump, on, fcnt_down = fcnt, device = %self.spec.device, "rules: Class C command handed to the downlink stage");
        Ok(())
    }
}

/// What the link asks of the stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send ON (a refresh or a retry) or OFF.
    Send(bool),
    /// The actuator confirmed the command (running or not).
    Confirmed(bool),
    /// The pump's state is unknown: alarm, and the engine keeps it off.
    Unknown(String),
    /// The actuator reported the opposite of a command it had confirmed: alarm, and the engine
    /// keeps it off until an operator resets it.
    Contradicted(String),
    /// Known again (a status uplink agrees with the command).
    Known,
}

/// Longest wait between two sends of an unconfirmed command.
const MAX_BACKOFF_MS: u64 = 600_000;
/// A frame the downlink stage did not send is tried again this soon.
const NOT_SENT_RETRY_MS: u64 = 2_000;

/// Refreshes and confirmation of one actuator, on injected time (ms): no I/O.
#[derive(Debug, Clone)]
pub struct Link {
    refresh_ms: u64,
    /// The actuator's own timeout: it stops by itself this long after the last ON it received.
    lease_ms: u64,
    /// When an ON last reached the radio: a "stopped" status more than a lease after it is the
    /// actuator's lease ending, which the agent caused, not a contradiction.
    on_handed_at: Option<u64>,
    confirm_ms: u64,
    retries: u32,
    /// What the engine last commanded.
    want: bool,
    confirmed: bool,
    /// Sends of the current command so far.
    sends: u32,
    /// When to look for the confirmation.
    check_at: u64,
    next_refresh: Option<u64>,
    unknown: bool,
}

impl Link {
    pub fn new(spec: &ClassC) -> Link {
        Link {
            refresh_ms: spec.refresh_period().as_millis() as u64,
            lease_ms: spec.lease.as_millis() as u64,
            on_handed_at: None,
            confirm_ms: spec.confirm_within.as_millis() as u64,
            retries: spec.retries,
            want: false,
            confirmed: false,
            sends: 0,
            check_at: u64::MAX,
            next_refresh: None,
            unknown: false,
        }
    }

    pub fn is_unknown(&self) -> bool {
        self.unknown
    }

    pub fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// The engine drove the pump (the caller has sent the command once).
    pub fn commanded(&mut self, on: bool, now: u64) {
        self.want = on;
        self.confirmed = false;
        self.sends = 1;
        self.check_at = now + self.confirm_ms;
        self.next_refresh = on.then_some(now + self.refresh_ms);
    }

    /// An ON reached the radio.
    pub fn on_handed(&mut self, now: u64) {
        self.on_handed_at = Some(now);
    }

    /// The downlink stage did not send a frame (radio stopped, duty cycle, queue full):
    /// try again soon rather than at the next confirmation check.
    pub fn not_sent(&mut self, now: u64) {
        let soon = now + NOT_SENT_RETRY_MS;
        if !self.confirmed {
            self.check_at = self.check_at.min(soon);
        } else if let Some(r) = self.next_refresh.as_mut() {
            *r = (*r).min(soon);
        }
    }

    pub fn tick(&mut self, now: u64) -> Vec<Step> {
        let mut out = Vec::new();
        if self.want && self.next_refresh.is_some_and(|r| now >= r) {
            self.next_refresh = Some(now + self.refresh_ms);
            out.push(Step::Send(true));
        }
        if !self.confirmed && now >= self.check_at {
            if self.sends <= self.retries {
                self.sends += 1;
                let wait = self.confirm_ms << (self.sends - 1).min(16);
                self.check_at = now + wait.min(MAX_BACKOFF_MS);
            } else {
                if !self.unknown {
                    self.unknown = true;
                    out.push(Step::Unknown(format!(
                        "{} not confirmed by a status uplink after {} sends",
                        if self.want { "ON" } else { "OFF" },
                        self.sends
                    )));
                }
                self.check_at = now + MAX_BACKOFF_MS.min(self.confirm_ms << self.retries.min(16));
            }
            if !out.contains(&Step::Send(self.want)) {
                out.push(Step::Send(self.want));
            }
        }
        out
    }

    /// A status uplink: `running` as the actuator reports it.
    pub fn feedback(&mut self, running: bool, now: u64) -> Vec<Step> {
        let mut out = Vec::new();
        if running == self.want {
            if !self.confirmed {
                self.confirmed = true;
                self.check_at = u64::MAX;
                out.push(Step::Confirmed(running));
            }
            if self.unknown {
                self.unknown = false;
                out.push(Step::Known);
            }
        } else if self.confirmed {
            // It did what it was told, and now says otherwise: switched locally, tripped, or
            // a frame lost. Alarm, and the command again.
            self.confirmed = false;
            self.sends = 1;
            self.check_at = now + self.confirm_ms;
            self.unknown = true;
            let lease_ran_out = self.want
                && !running
                && self
                    .on_handed_at
                    .is_none_or(|t| now.saturating_sub(t) >= self.lease_ms);
            let what = format!(
                "the actuator reports {} while commanded {}",
                if running { "running" } else { "stopped" },
                if self.want { "on" } else { "off" }
            );
            out.push(if lease_ran_out {
                // No ON reached the radio for a whole lease (duty cycle, radio down): the
                // actuator stopped as it must. Unknown, not latched.
                Step::Unknown(format!(
                    "{what}: its lease ran out, no ON having reached the radio for {} s",
                    self.lease_ms / 1000
                ))
            } else {
                Step::Contradicted(what)
            });
            out.push(Step::Send(self.want));
        }
        // Otherwise: a status sent before the command took effect; the confirmation is
        // still awaited.
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClassC {
        ClassC {
            device: "a84041000181abcd".into(),
            fport: 1,
            on_hex: "0501110FA0".into(),
            off_hex: "030000".into(),
            lease: Duration::from_secs(120),
            refresh: Some(Duration::from_secs(30)),
            feedback: "relay".into(),
            confirm_within: Duration::from_secs(20),
            retries: 3,
            frequency_hz: 869_525_000,
            spreading_factor: 9,
            power_dbm: 14,
        }
    }

    #[test]
    fn airtime_matches_the_shared_docs_duty_cycle_figures() {
        // A 5-byte ON (18-byte frame) every 30 s: 0.55 % of an hour at SF9, 4.4 % at SF12.
        let share = |sf| airtime(sf, 18).as_secs_f64() * 120.0 / 3600.0 * 100.0;
        assert!((share(9) - 0.55).abs() < 0.01, "{}", share(9));
        assert!((share(12) - 4.40).abs() < 0.01, "{}", share(12));
        // Semtech's calculator: SF7, 13 bytes, no CRC: 41.2 ms.
        assert_eq!(airtime(7, 13).as_micros() / 100, 412);
    }

    #[test]
    fn fcnt_down_never_goes_back_across_reopens_a_damaged_file_and_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let path = FCntDown::path_for(&dir.path().join("store"), "a84041000181abcd");
        let (mut c, w) = FCntDown::open(&path, Some(7), None).unwrap();
        assert!(w.is_none());
        assert_eq!(c.take().unwrap(), 7);
        assert_eq!(c.take().unwrap(), 8);
        drop(c);
        // Same boot: right after the last issued.
        let (mut c, _) = FCntDown::open(&path, Some(7), None).unwrap();
        assert_eq!(c.take().unwrap(), 9);
        drop(c);
        // A higher floor from the keys file wins.
        let (mut c, _) = FCntDown::open(&path, Some(100), None).unwrap();
        assert_eq!(c.take().unwrap(), 100);
        drop(c);
        // Both slots destroyed: after the store's copy.
        std::fs::write(&path, vec![0xAB; 128]).unwrap();
        let (mut c, w) = FCntDown::open(&path, Some(7), Some(100)).unwrap();
        assert!(w.unwrap().contains("unreadable"));
        assert_eq!(c.take().unwrap(), 101);
    }

    #[test]
    fn a_confirmed_on_is_refreshed_inside_the_lease_for_an_hour_then_stopped() {
        let mut l = Link::new(&spec());
        let mut t = 0u64;
        l.commanded(true, t);
        let mut sends = vec![t];
        assert_eq!(l.feedback(true, 500), vec![Step::Confirmed(true)]);
        while t < 3_600_000 {
            t += 1000;
            for s in l.tick(t) {
                assert_eq!(s, Step::Send(true));
                sends.push(t);
            }
        }
        assert_eq!(sends.len(), 121);
        let max_gap = sends.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert_eq!(max_gap, 30_000);
        // Stopped: one OFF (sent by the caller), no ON after it.
        l.commanded(false, t);
        for _ in 0..600 {
            t += 1000;
            assert!(!l.tick(t).contains(&Step::Send(true)));
            l.feedback(false, t);
        }
    }

    #[test]
    fn an_unconfirmed_off_is_sent_again_with_back_off_then_the_state_is_unknown() {
        let mut l = Link::new(&spec());
        l.commanded(false, 0);
        let mut t = 0;
        let mut sends = vec![0];
        let mut unknown_at = None;
        while t < 1_000_000 {
            t += 1000;
            for s in l.tick(t) {
                match s {
                    Step::Send(false) => sends.push(t),
                    Step::Unknown(why) => {
                        assert!(why.contains("OFF not confirmed"), "{why}");
                        unknown_at.get_or_insert(t);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // 20 s, then 40, 80: three retries, then the alarm (and OFF keeps being sent).
        assert_eq!(&sends[..4], &[0, 20_000, 60_000, 140_000]);
        assert_eq!(unknown_at, Some(300_000));
        assert!(l.is_unknown());
        assert_eq!(
            l.feedback(false, t),
            vec![Step::Confirmed(false), Step::Known]
        );
        assert!(!l.is_unknown());
    }

    #[test]
    fn feedback_that_contradicts_a_confirmed_command_is_an_alarm_and_an_early_one_is_not() {
        let mut l = Link::new(&spec());
        l.commanded(true, 0);
        l.on_handed(40);
        // A status sent before the ON arrived: still waiting.
        assert!(l.feedback(false, 100).is_empty());
        assert_eq!(l.feedback(true, 2_000), vec![Step::Confirmed(true)]);
        let steps = l.feedback(false, 60_000);
        assert!(
            matches!(&steps[0], Step::Contradicted(w) if w.contains("reports stopped while commanded on"))
        );
        assert_eq!(steps[1], Step::Send(true));
        assert!(l.is_unknown());
    }

    #[test]
    fn an_actuator_stopped_by_its_own_lease_is_unknown_not_a_contradiction() {
        // The refreshes did not reach the radio (the duty cycle refused them): the actuator
        // stops at the end of its 120 s lease, as it must.
        let mut l = Link::new(&spec());
        l.commanded(true, 0);
        l.on_handed(40);
        assert_eq!(l.feedback(true, 2_000), vec![Step::Confirmed(true)]);
        let steps = l.feedback(false, 130_000);
        assert!(
            matches!(&steps[0], Step::Unknown(w) if w.contains("its lease ran out")),
            "{steps:?}"
        );
        assert_eq!(steps[1], Step::Send(true));
    }

    #[test]
    fn a_frame_the_radio_did_not_send_is_tried_again_within_seconds() {
        let mut l = Link::new(&spec());
        l.commanded(false, 0);
        l.not_sent(100);
        assert!(l.tick(1_000).is_empty());
        assert_eq!(l.tick(2_100), vec![Step::Send(false)]);
    }
}
