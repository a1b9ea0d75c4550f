//! The `semtech_udp` backend: frames from a Semtech UDP packet forwarder (lora_pkt_fwd and its
//! kin) instead of a concentrator of ours, on the same path as radio frames.
//!
//! PUSH_DATA → its rxpk checked (`packet.rs`) → the uplink stage (rules, store, MQTT) → PUSH_ACK
//! once the store's writer has appended them: an acknowledged push is in the durable store
//! (the forwarder counts unacknowledged pushes in its `ackr`). A push seen again (same EUI,
//! token and body: a forwarder that re-sends) is acknowledged again once the first copy is
//! stored, and not stored twice. PULL_DATA → PULL_ACK, and the forwarder's address for
//! downlinks; the downlink stage hands packets over as PULL_RESP through [`Link`] and hears the
//! TX_ACKs back. `stat` → the stats. Anything else is refused, counted per cause
//! (`udp_rejected_<cause>_total`) and logged at most once a second per cause.
//!
//! The radio is "up" while the forwarder's keep-alive (PULL_DATA) comes; silent for
//! `forwarder_timeout`, it is down, with that as its cause, in the stats and the health.

pub mod packet;

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::{ForwarderMeta, Handoff, Received};
use crate::config::SemtechUdpConfig;
use crate::events::Receipt;
use crate::ops::counters::{Counters, ForwarderFigures, RadioState};
use crate::ops::health::Heartbeats;
use packet::{Datagram, Reject};

/// A PULL_RESP still waiting for its TX_ACK is forgotten after this (the downlink stage has
/// answered it long before, at `tx_ack_timeout`).
const AWAIT_FORGET: Duration = Duration::from_secs(60);
/// A quiet socket is waited on this long at a time: a datagram wakes the thread at once, this
/// only bounds how late the stop flag and the keep-alive watch are looked at (there is no
/// concentrator to poll: an idle gateway on this backend wakes twice a second).
const QUIET_WAKE: Duration = Duration::from_millis(500);

/// Pushes remembered to recognise a re-sent one.
const RECENT_PUSHES: usize = 64;

/// The settings' problems, by key, for `check`.
pub fn check(cfg: &SemtechUdpConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    match cfg.listen.parse::<SocketAddr>() {
        Err(e) => out.push((
            "radio.semtech_udp.listen",
            format!(
                "{:?} is not an address and port such as \"127.0.0.1:1700\" ({e})",
                cfg.listen
            ),
        )),
        Ok(a) if a.port() == 0 => out.push((
            "radio.semtech_udp.listen",
            "port 0 would be a port chosen at random, which the forwarder cannot know: give \
             its serv_port_up/serv_port_down (1700 by default)"
                .to_string(),
        )),
        Ok(_) => {}
    }
    match euis(cfg) {
        Ok(v) if v.len() > 1 => out.push((
            "radio.semtech_udp.gateway_euis",
            format!(
                "{} EUIs: one forwarder per agent (an uplink's context carries its counter, not \
                 which forwarder heard it, so a downlink could go to the wrong one): run an agent \
                 for each",
                v.len()
            ),
        )),
        Ok(v) if v.is_empty() => out.push((
            "radio.semtech_udp.gateway_euis",
            "empty: list the forwarder's gateway_ID (its local_conf.json), e.g. [\"0016c001ff10d3f6\"]; \
             datagrams of any other EUI are refused"
                .to_string(),
        )),
        Ok(_) => {}
        Err(e) => out.push(("radio.semtech_udp.gateway_euis", e)),
    }
    if cfg.tx_ack_timeout < Duration::from_millis(10)
        || cfg.tx_ack_timeout > Duration::from_secs(60)
    {
        out.push((
            "radio.semtech_udp.tx_ack_timeout",
            format!(
                "{} (from 10ms to 60s: the forwarder answers within milliseconds)",
                humantime::format_duration(cfg.tx_ack_timeout)
            ),
        ));
    }
    if cfg.forwarder_timeout < Duration::from_secs(5)
        || cfg.forwarder_timeout > Duration::from_secs(3600)
    {
        out.push((
            "radio.semtech_udp.forwarder_timeout",
            format!(
                "{} (from 5s to 1h, and at least 3 times the forwarder's keepalive_interval, \
                 10 s by default: one lost keep-alive must not take the radio down)",
                humantime::format_duration(cfg.forwarder_timeout)
            ),
        ));
    }
    out
}

/// The allowed EUIs, in order; an error names the first that is not 16 hex digits or repeats.
pub fn euis(cfg: &SemtechUdpConfig) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for s in &cfg.gateway_euis {
        let t = s.trim().replace([':', '-'], "");
        let eui = (t.len() == 16)
            .then(|| u64::from_str_radix(&t, 16).ok())
            .flatten()
            .ok_or_else(|| format!("{s:?} is not a gateway EUI (16 hex digits)"))?;
        if out.contains(&eui) {
            return Err(format!("{s:?} is listed twice"));
        }
        out.push(eui);
    }
    Ok(out)
}

#[derive(Default)]
struct LinkState {
    pull_addr: Option<SocketAddr>,
    last_pull: Option<Instant>,
    first_pull: Option<Instant>,
    /// The forwarder's counter (`tmst`) at the last frame, and when it came.
    anchor: Option<(u32, Instant)>,
    /// Changes when the forwarder moves (a new address) or restarts (its counter jumps back):
    /// counter values of different generations are unrelated, like a concentrator's after a
    /// restart.
    generation: u64,
    next_token: u16,
    /// PULL_RESP tokens sent and not yet acknowledged.
    awaiting: VecDeque<(u16, Instant)>,
    /// TX_ACKs heard, for the downlink stage to take.
    acks: Vec<(u16, Option<String>)>,
}

/// What the downlink stage needs of the forwarder (one per agent: `check` refuses more):
/// its counter, its address, its TX_ACKs.
pub struct Link {
    socket: Arc<UdpSocket>,
    /// The forwarder's gateway EUI: datagrams of any other are refused.
    eui: u64,
    state: Mutex<LinkState>,
    forwarder_timeout: Duration,
    /// Called when TX_ACKs arrive (wakes the downlink stage).
    waker: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// What became of a packet handed to the forwarder.
pub enum Sent {
    /// In a PULL_RESP with this token: its TX_ACK will tell.
    Awaiting(u16),
    /// The forwarder restarted or moved since it was scheduled.
    Stale,
}

impl Link {
    /// Binds the configured address (an error names it).
    pub fn bind(cfg: &SemtechUdpConfig) -> Result<Link, String> {
        let eui = *euis(cfg)?
            .first()
            .ok_or("radio.semtech_udp.gateway_euis is empty")?;
        let addr: SocketAddr = cfg
            .listen
            .parse()
            .map_err(|e| format!("radio.semtech_udp.listen {:?}: {e}", cfg.listen))?;
        let socket =
            UdpSocket::bind(addr).map_err(|e| format!("radio.semtech_udp.listen {addr}: {e}"))?;
        socket
            .set_read_timeout(Some(QUIET_WAKE))
            .map_err(|e| e.to_string())?;
        Ok(Link {
            socket: Arc::new(socket),
            eui,
            state: Mutex::new(LinkState {
                generation: 1,
                next_token: fastrand::u16(..),
                ..Default::default()
            }),
            forwarder_timeout: cfg.forwarder_timeout,
            waker: OnceLock::new(),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Who to wake when TX_ACKs arrive.
    pub fn on_tx_ack(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.waker.set(wake);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the forwarder pulled within `forwarder_timeout`.
    fn live(&self, s: &LinkState, now: Instant) -> bool {
        s.last_pull
            .is_some_and(|t| now.duration_since(t) < self.forwarder_timeout)
    }

    /// The forwarder's counter now (estimated from its last frame's `tmst`) and its
    /// generation; `None` while it is not live.
    pub fn clock(&self) -> Option<(u32, u64)> {
        let now = Instant::now();
        let s = self.lock();
        if !self.live(&s, now) {
            return None;
        }
        let counter = match s.anchor {
            Some((tmst, at)) => tmst.wrapping_add(now.duration_since(at).as_micros() as u32),
            // No frame yet: only "immediately" packets make sense, any counter does.
            None => s
                .first_pull
                .map_or(0, |t| now.duration_since(t).as_micros() as u32),
        };
        Some((counter, s.generation))
    }

    /// Sends `p` in a PULL_RESP to the forwarder, if it is live and still of `generation`.
    pub fn send(&self, p: &crate::radio::hal::TxPacket, generation: u64) -> Result<Sent, String> {
        let now = Instant::now();
        let (addr, token) = {
            let mut s = self.lock();
            if s.generation != generation {
                return Ok(Sent::Stale);
            }
            let (true, Some(addr)) = (self.live(&s, now), s.pull_addr) else {
                return Err("the packet forwarder has not pulled recently".into());
            };
            let token = s.next_token;
            s.next_token = s.next_token.wrapping_add(1);
            while s
                .awaiting
                .front()
                .is_some_and(|(_, t)| now.duration_since(*t) > AWAIT_FORGET)
            {
                s.awaiting.pop_front();
            }
            s.awaiting.push_back((token, now));
            (addr, token)
        };
        self.socket
            .send_to(&packet::pull_resp(token, p), addr)
            .map_err(|e| format!("PULL_RESP to {addr}: {e}"))?;
        Ok(Sent::Awaiting(token))
    }

    /// The TX_ACKs heard since the last call: (token, the forwarder's error if any).
    pub fn take_acks(&self) -> Vec<(u16, Option<String>)> {
        std::mem::take(&mut self.lock().acks)
    }

    /// A TX_ACK counts only from the address its PULL_RESP went to (the forwarder's pull
    /// socket), for a token sent and not yet acknowledged.
    fn tx_acked(&self, from: SocketAddr, token: u16, error: Option<String>) -> bool {
        let known = {
            let mut s = self.lock();
            if s.pull_addr != Some(from) {
                return false;
            }
            match s.awaiting.iter().position(|(t, _)| *t == token) {
                Some(i) => {
                    s.awaiting.remove(i);
                    s.acks.push((token, error));
                    true
                }
                None => false,
            }
        };
        if known {
            if let Some(w) = self.waker.get() {
                w();
            }
        }
        known
    }

    /// A PULL_DATA: remembers where the forwarder is; true when it moved or came back after
    /// falling silent (what was scheduled against its counter is stale).
    fn pulled(&self, from: SocketAddr, now: Instant) -> bool {
        let mut s = self.lock();
        let moved = !self.live(&s, now) || s.pull_addr != Some(from);
        s.pull_addr = Some(from);
        s.last_pull = Some(now);
        s.first_pull.get_or_insert(now);
        if moved {
            s.generation += 1;
        }
        moved
    }

    fn anchored(&self, tmst: u32, now: Instant) {
        let mut s = self.lock();
        // A counter far behind the estimate: the forwarder restarted (its counter too).
        if let Some((t, at)) = s.anchor {
            let expected = t.wrapping_add(now.duration_since(at).as_micros() as u32);
            if expected.wrapping_sub(tmst) as i32 > 10_000_000 {
                s.generation += 1;
            }
        }
        s.anchor = Some((tmst, now));
    }

    fn up(&self, now: Instant) -> Option<SocketAddr> {
        let s = self.lock();
        self.live(&s, now).then_some(s.pull_addr).flatten()
    }
}

/// A push seen recently: re-sent copies are acknowledged, not stored twice.
struct RecentPush {
    eui: u64,
    token: u16,
    hash: u64,
    /// `PENDING`, `STORED` or `REFUSED` by the store.
    outcome: Arc<std::sync::atomic::AtomicU8>,
}

const PENDING: u8 = 0;
const STORED: u8 = 1;
const REFUSED: u8 = 2;

/// At most one log line a second per cause of refusal.
#[derive(Default)]
struct RateLog {
    last: [Option<Instant>; Reject::ALL.len()],
    quiet: [u64; Reject::ALL.len()],
}

impl RateLog {
    fn refused(&mut self, r: Reject, why: &str, from: SocketAddr) {
        let i = Reject::ALL.iter().position(|x| *x == r).unwrap_or(0);
        if self.last[i].is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.quiet[i] += 1;
            return;
        }
        tracing::warn!(
            cause = r.name(),
            %why,
            %from,
            not_logged_since = self.quiet[i],
            "semtech_udp: datagram refused"
        );
        self.last[i] = Some(Instant::now());
        self.quiet[i] = 0;
    }
}

fn hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The backend on the radio's thread.
pub(super) struct Backend<'a> {
    pub link: Arc<Link>,
    pub counters: &'a Arc<Counters>,
    pub stop: &'a AtomicBool,
    pub eui: &'a watch::Sender<Option<u64>>,
    pub forwarder_timeout: Duration,
    /// `radio.poll_interval`: how long frames gather while datagrams stream.
    pub poll_interval: Duration,
    /// Channel plans from the centre: refused, the forwarder's plan is its own.
    pub replan: &'a std::sync::mpsc::Receiver<super::Replan>,
}

impl Backend<'_> {
    pub fn run(&self, handoff: &mut Handoff) {
        let started = Instant::now();
        if let Ok(mut f) = self.counters.forwarder.lock() {
            *f = Some(ForwarderFigures::default());
        }
        self.status(|s| s.state = RadioState::Starting);
        // The forwarder's EUI names the gateway, as a concentrator's would.
        self.eui.send_replace(Some(self.link.eui));
        tracing::info!(listen = ?self.link.local_addr(), "semtech_udp: waiting for the packet forwarder");
        let mut buf = vec![0u8; 65_536];
        let mut log = RateLog::default();
        let mut recent: VecDeque<RecentPush> = VecDeque::with_capacity(RECENT_PUSHES);
        let mut next_look = Instant::now();
        // Frames are handed on at most every `poll_interval` while datagrams keep coming, as
        // the concentrator's are: the stages behind then wake once per batch, not per
        // datagram (most of a frame's CPU at 1000 frames/s). A frame after a quiet spell goes
        // on at once; one in a stream waits `poll_interval` at most (the socket's timeout then).
        let mut next_pass = Instant::now();
        let mut busy = false;
        while !self.stop.load(Ordering::Relaxed) {
            Heartbeats::beat(&self.counters.beats.radio);
            let quiet = match self.link.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    self.datagram(&buf[..n], from, handoff, &mut log, &mut recent);
                    false
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    true
                }
                Err(e) => {
                    // ICMP port unreachable after a PULL_RESP to a forwarder that went away.
                    tracing::debug!(error = %e, "semtech_udp: receive");
                    false
                }
            };
            let now = Instant::now();
            // `!busy`: the first datagram after a quiet spell.
            if quiet || !busy || now >= next_pass {
                handoff.pass();
                next_pass = now + self.poll_interval;
            }
            // Waiting: the poll interval while frames come (what waits goes on at the next
            // timeout at the latest), QUIET_WAKE once it is quiet.
            if busy == quiet {
                busy = !quiet;
                let timeout = if busy { self.poll_interval } else { QUIET_WAKE };
                let _ = self.link.socket.set_read_timeout(Some(timeout));
            }
            while let Ok(r) = self.replan.try_recv() {
                let _ = r.reply.try_send(Err(
                    "this gateway's radio is a Semtech UDP packet forwarder (radio.backend = \
                     \"semtech_udp\"): its channel plan is the forwarder's own (global_conf.json), \
                     not the agent's to change"
                        .into(),
                ));
            }
            if now >= next_look {
                next_look = now + Duration::from_secs(1);
                self.look(now, started);
            }
        }
        tracing::info!("semtech_udp: stopped");
    }

    /// The radio's state from the forwarder's keep-alive.
    fn look(&self, now: Instant, started: Instant) {
        let state = self.counters.radio_status().state;
        match self.link.up(now) {
            Some(addr) if state != RadioState::Up => {
                tracing::info!(forwarder = %addr, "semtech_udp: the packet forwarder is up");
                Counters::add(&self.counters.radio_starts, 1);
                let eui = self.link.eui;
                self.status(|s| {
                    s.concentrator_eui = Some(eui);
                    s.state = RadioState::Up;
                    s.since = Some(SystemTime::now());
                    s.cause = None;
                    s.diagnosis = None;
                    s.last_error = None;
                });
            }
            None if state == RadioState::Up
                || (state == RadioState::Starting
                    && now.duration_since(started) >= self.forwarder_timeout) =>
            {
                let why = format!(
                    "no PULL_DATA from the packet forwarder for {}",
                    humantime::format_duration(self.forwarder_timeout)
                );
                tracing::error!(%why, "semtech_udp: the packet forwarder is down");
                if state == RadioState::Up {
                    Counters::add(&self.counters.radio_failures, 1);
                }
                self.status(|s| {
                    s.state = RadioState::Down;
                    s.since = Some(SystemTime::now());
                    s.last_error = Some(why);
                    s.cause = Some("forwarder_silent");
                    s.diagnosis = Some(format!(
                        "is the packet forwarder running, with server_address and serv_port_up/down \
                         pointing at {} and its gateway_ID in radio.semtech_udp.gateway_euis?",
                        self.link
                            .local_addr()
                            .map_or_else(|| "this agent".into(), |a| a.to_string())
                    ));
                });
            }
            _ => {}
        }
    }

    fn status(&self, change: impl FnOnce(&mut crate::ops::counters::RadioStatus)) {
        if let Ok(mut s) = self.counters.radio.lock() {
            change(&mut s);
        }
        self.counters.radio_changed.notify_one();
    }

    fn figures(&self, f: impl FnOnce(&mut ForwarderFigures)) {
        if let Ok(mut g) = self.counters.forwarder.lock() {
            if let Some(g) = g.as_mut() {
                f(g);
            }
        }
    }

    fn refused(&self, r: Reject, why: &str, from: SocketAddr, log: &mut RateLog) {
        self.figures(|f| *f.rejected.entry(r.name()).or_default() += 1);
        log.refused(r, why, from);
    }

    fn reply(&self, bytes: &[u8], to: SocketAddr) {
        if let Err(e) = self.link.socket.send_to(bytes, to) {
            tracing::debug!(error = %e, %to, "semtech_udp: answer not sent");
        }
    }

    fn datagram(
        &self,
        b: &[u8],
        from: SocketAddr,
        handoff: &mut Handoff,
        log: &mut RateLog,
        recent: &mut VecDeque<RecentPush>,
    ) {
        let arrived = (SystemTime::now(), Instant::now());
        let d = match packet::parse(b) {
            Ok(d) => d,
            Err((r, why)) => return self.refused(r, &why, from, log),
        };
        if d.eui() != self.link.eui {
            return self.refused(
                Reject::UnknownEui,
                &format!(
                    "gateway EUI {:016x} is not in radio.semtech_udp.gateway_euis",
                    d.eui()
                ),
                from,
                log,
            );
        }
        match d {
            Datagram::PullData { token, .. } => {
                self.reply(&packet::ack(packet::PULL_ACK, token), from);
                if self.link.pulled(from, arrived.1) {
                    tracing::info!(forwarder = %from, eui = format!("{:016x}", d.eui()), "semtech_udp: downlinks go to this forwarder");
                }
                if self.counters.radio_status().state != RadioState::Up {
                    self.look(arrived.1, arrived.1);
                }
            }
            Datagram::TxAck { token, error, .. } => {
                if !self.link.tx_acked(from, token, error) {
                    self.figures(|f| f.unmatched_tx_acks += 1);
                    tracing::debug!(token, %from, "semtech_udp: TX_ACK for no PULL_RESP of ours to that address (late, repeated or spoofed)");
                }
            }
            Datagram::PushData {
                token,
                eui,
                rxpk,
                stat,
            } => {
                let h = hash(&b[12..]);
                if let Some(at) = recent
                    .iter()
                    .position(|p| p.eui == eui && p.token == token && p.hash == h)
                {
                    match recent[at].outcome.load(Ordering::Acquire) {
                        // Acknowledged once the first copy is in the store; not stored twice.
                        STORED => {
                            self.figures(|f| f.duplicate_pushes += 1);
                            self.reply(&packet::ack(packet::PUSH_ACK, token), from);
                            return;
                        }
                        PENDING => {
                            self.figures(|f| f.duplicate_pushes += 1);
                            return;
                        }
                        // The store refused the first copy: this one is taken afresh.
                        _ => {
                            recent.remove(at);
                        }
                    }
                }
                match stat {
                    Some(Ok(s)) => self.stat(s),
                    Some(Err((r, why))) => self.refused(r, &why, from, log),
                    None => {}
                }
                let mut frames = Vec::with_capacity(rxpk.len());
                for r in rxpk {
                    match r {
                        Ok(rx) => frames.push(rx),
                        Err((r, why)) => {
                            Counters::add(&self.counters.rx_malformed, 1);
                            self.refused(r, &why, from, log);
                        }
                    }
                }
                if frames.is_empty() {
                    self.reply(&packet::ack(packet::PUSH_ACK, token), from);
                    return;
                }
                let outcome = Arc::new(std::sync::atomic::AtomicU8::new(PENDING));
                if recent.len() == RECENT_PUSHES {
                    recent.pop_front();
                }
                recent.push_back(RecentPush {
                    eui,
                    token,
                    hash: h,
                    outcome: outcome.clone(),
                });
                let receipt = {
                    let socket = self.link.socket.clone();
                    Receipt::new(move |appended| {
                        if appended {
                            outcome.store(STORED, Ordering::Release);
                            let _ = socket.send_to(&packet::ack(packet::PUSH_ACK, token), from);
                        } else {
                            outcome.store(REFUSED, Ordering::Release);
                        }
                    })
                };
                Counters::add(&self.counters.rx_received, frames.len() as u64);
                let last = frames.len() - 1;
                if let Some(t) = frames.iter().map(|f| f.packet.count_us).next_back() {
                    self.link.anchored(t, arrived.1);
                }
                for (n, rx) in frames.into_iter().enumerate() {
                    handoff.push(Received {
                        packet: rx.packet,
                        at: arrived.0,
                        handed_over: arrived.1,
                        meta: Some(Box::new(ForwarderMeta {
                            time: rx.time,
                            tmms: rx.tmms,
                            ftime_ns: rx.ftime_ns,
                            board: rx.board,
                        })),
                        receipt: (n == last).then(|| receipt.clone()),
                    });
                }
            }
        }
    }

    fn stat(&self, s: packet::Stat) {
        if let Some(t) = s
            .temp
            .filter(|t| t.is_finite() && (-60.0..=150.0).contains(t))
        {
            self.counters
                .temperature_bits
                .store((t as f32).to_bits(), Ordering::Relaxed);
        }
        self.figures(|f| {
            f.stat = vec![
                ("rxnb", s.rxnb.to_string()),
                ("rxok", s.rxok.to_string()),
                ("rxfw", s.rxfw.to_string()),
                ("dwnb", s.dwnb.to_string()),
                ("txnb", s.txnb.to_string()),
            ];
            if let Some(a) = s.ackr.filter(|a| a.is_finite()) {
                f.stat.push(("ackr", format!("{a:.1}")));
            }
            // (0, 0) is what a forwarder without a GPS fix writes.
            if let (Some(la), Some(lo)) = (s.lati, s.long) {
                if (-90.0..=90.0).contains(&la)
                    && (-180.0..=180.0).contains(&lo)
                    && (la, lo) != (0.0, 0.0)
                {
                    let alt = s.alti.filter(|a| a.is_finite()).unwrap_or(0.0);
                    f.location = Some((la, lo, alt));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(euis: &[&str]) -> Link {
        Link::bind(&SemtechUdpConfig {
            listen: "127.0.0.1:0".into(),
            gateway_euis: euis.iter().map(|e| e.to_string()).collect(),
            forwarder_timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .unwrap()
    }

    /// Downlinks are scheduled against the forwarder's counter: they go stale when it moves
    /// (restarted on another port) or comes back after falling silent, not on its keep-alives.
    #[test]
    fn the_forwarders_counter_generation_changes_only_when_it_moves_or_comes_back() {
        let l = link(&["0000000000000001"]);
        let (a, a2): (SocketAddr, SocketAddr) = (
            "127.0.0.1:4001".parse().unwrap(),
            "127.0.0.1:4002".parse().unwrap(),
        );
        let t0 = Instant::now();
        let generation = |l: &Link| l.lock().generation;
        assert!(l.pulled(a, t0), "the first pull");
        let g = generation(&l);
        for k in 1..5 {
            assert!(!l.pulled(a, t0 + Duration::from_secs(k)));
        }
        assert_eq!(
            (generation(&l), l.up(t0 + Duration::from_secs(5))),
            (g, Some(a))
        );
        assert!(l.pulled(a2, t0 + Duration::from_secs(6)), "moved");
        assert_eq!(generation(&l), g + 1);
        let later = t0 + Duration::from_secs(40);
        assert_eq!(l.up(later), None, "silent past forwarder_timeout");
        assert!(l.pulled(a2, later), "back");
        assert_eq!((generation(&l), l.up(later)), (g + 2, Some(a2)));
        // A counter far behind the estimate: it restarted on the same port.
        l.anchored(50_000_000, later);
        l.anchored(1_000, later + Duration::from_millis(10));
        assert_eq!(generation(&l), g + 3);
    }

    #[test]
    fn a_tx_ack_counts_only_for_a_pull_resp_of_ours() {
        let l = link(&["0000000000000001"]);
        let fwd: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(
            !l.tx_acked(fwd, 7, None),
            "no PULL_RESP with token 7 was sent"
        );
        l.pulled(fwd, Instant::now());
        let (_, g) = l.clock().unwrap();
        let p = crate::radio::hal::TxPacket {
            freq_hz: 869_525_000,
            mode: crate::radio::hal::TxMode::Immediate,
            rf_chain: 0,
            rf_power: 14,
            modulation: crate::radio::hal::Modulation::Lora {
                spreading_factor: 9,
                bandwidth_hz: 125_000,
                code_rate: crate::radio::hal::CodeRate::Cr45,
            },
            invert_polarity: true,
            preamble: 8,
            no_crc: true,
            no_header: false,
            freq_deviation_khz: 0,
            payload: vec![0x60],
        };
        let Ok(Sent::Awaiting(token)) = l.send(&p, g) else {
            panic!("sent")
        };
        assert!(matches!(l.send(&p, g + 1), Ok(Sent::Stale)));
        let elsewhere: SocketAddr = "127.0.0.1:10".parse().unwrap();
        assert!(
            !l.tx_acked(elsewhere, token, Some("COLLISION_PACKET".into())),
            "from another address than the PULL_RESP went to"
        );
        assert!(l.tx_acked(fwd, token, Some("TOO_LATE".into())));
        assert!(
            !l.tx_acked(fwd, token, None),
            "a repeated TX_ACK counts once"
        );
        assert_eq!(l.take_acks(), vec![(token, Some("TOO_LATE".to_string()))]);
    }
}
