//! The radio stage: brings the concentrator up (reset, configure, start), polls `lgw_receive`,
//! and hands every frame on without ever waiting for the stages behind it.
//!
//! It runs on its own thread because HAL calls block (calibration takes seconds). A start or
//! receive failure restarts the radio with back-off; a counter that stops advancing (the HAL
//! "succeeds" on a dead SPI link) trips the watchdog and restarts it too.
//!
//! The stage behind it (a [`FrameSink`], the uplink stage) runs on this thread too, once it is
//! attached: one thread wake-up per frame fewer, which is most of a frame's CPU. Until then (it
//! needs the gateway's identity, which may wait for the concentrator's EUI), and while the
//! store's queue is full, frames wait here, up to [`WAITING_MAX`]; more are counted dropped.

pub mod airtime;
pub mod boards;
pub mod diagnosis;
pub mod hal;
pub mod library_output;
pub mod region;
mod reset;
pub mod semtech_udp;
pub mod validate;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;

use tokio::sync::watch;

use crate::config::{Backend, Config};
use crate::ops::counters::{Counters, RadioState};
use crate::ops::health::Heartbeats;
use boards::BoardProfile;
use hal::{BoardConf, Concentrator, IfChainConf, RfChainConf, RxPacket, Setup};
use region::{ChannelPlan, IfChannel};

/// A frame and the wall-clock time of the `lgw_receive` call that returned it.
#[derive(Debug, Clone)]
pub struct Received {
    pub packet: RxPacket,
    pub at: SystemTime,
    /// When `lgw_receive` returned it: the start of the rules' reaction time.
    pub handed_over: std::time::Instant,
    /// What a packet forwarder adds (`semtech_udp` backend).
    pub meta: Option<Box<ForwarderMeta>>,
    /// Told once this frame (and those before it) are in the store (`semtech_udp`: PUSH_ACK).
    pub receipt: Option<crate::events::Receipt>,
}

/// A packet forwarder's timestamps of a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwarderMeta {
    /// UTC time of reception from the forwarder's GPS.
    pub time: Option<SystemTime>,
    /// GPS time of reception, ms since the GPS epoch.
    pub tmms: Option<u64>,
    /// ns since the last PPS.
    pub ftime_ns: Option<u32>,
    pub board: u32,
}

/// Without a frame this long, the radio is polled at `idle_poll_interval`. Short: at a low
/// rate each frame would otherwise cost this many fast polls.
const IDLE_AFTER: Duration = Duration::from_millis(30);

/// Frames read but not yet taken by the stage behind, at most (a few minutes at a busy site).
pub const WAITING_MAX: usize = 8192;

/// The stage frames are handed to, run on the radio's thread: it must never wait.
pub trait FrameSink: Send {
    /// Whether it can take a frame now (what it holds from before has gone on).
    fn ready(&mut self) -> bool;
    /// Takes a frame without waiting; gives it back when it cannot take it now.
    fn offer(&mut self, r: Received) -> Result<(), Received>;
    /// Takes what it holds and the frame, waiting as long as it takes (the radio has stopped).
    fn deliver(&mut self, r: Option<Received>);
}

/// The radio's end of the hand-off: frames wait here until the sink is attached and can take
/// them, in order.
struct Handoff {
    attach: Receiver<Box<dyn FrameSink>>,
    sink: Option<Box<dyn FrameSink>>,
    waiting: VecDeque<Received>,
    counters: Arc<Counters>,
}

impl Handoff {
    fn push(&mut self, r: Received) {
        if self.waiting.len() >= WAITING_MAX {
            // Never wait on the stages behind: a stalled store must not stall the radio.
            Counters::add(&self.counters.rx_dropped, 1);
        } else {
            self.waiting.push_back(r);
        }
    }

    /// Hands on what waits, as far as the sink takes it now.
    fn pass(&mut self) {
        if self.sink.is_none() {
            self.sink = self.attach.try_recv().ok();
        }
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        if !sink.ready() {
            return;
        }
        while let Some(r) = self.waiting.pop_front() {
            if let Err(r) = sink.offer(r) {
                self.waiting.push_front(r);
                return;
            }
        }
    }

    /// At stop: everything read is handed on (the store stays open until the radio has ended).
    fn finish(&mut self) {
        if self.sink.is_none() {
            self.sink = self.attach.try_recv().ok();
        }
        if let Some(sink) = self.sink.as_mut() {
            sink.deliver(None);
            for r in self.waiting.drain(..) {
                sink.deliver(Some(r));
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RadioSettings {
    pub backend: Backend,
    pub board: &'static BoardProfile,
    pub plan: ChannelPlan,
    pub gpio_chip: String,
    pub com_path: String,
    /// The SPI device of the board (what a diagnosis checks), whatever the backend.
    pub spi_path: String,
    pub lorawan_public: bool,
    pub poll_interval: Duration,
    pub idle_poll_interval: Duration,
    pub watchdog: Duration,
    pub restart_backoff_max: Duration,
    pub realtime_priority: u8,
    pub forwarder_timeout: Duration,
}

impl RadioSettings {
    pub fn from_config(cfg: &Config) -> RadioSettings {
        let r = &cfg.radio;
        let com_path = match r.backend {
            Backend::Sx1302 => r.spi_path.clone(),
            Backend::Simulator => r
                .simulator
                .clone()
                .unwrap_or_else(|| PathBuf::from(""))
                .display()
                .to_string(),
            Backend::SemtechUdp => r.semtech_udp.listen.clone(),
        };
        RadioSettings {
            backend: r.backend,
            board: boards::profile(&r.board).expect("validated"),
            plan: region::plan(&cfg.region.plan).expect("validated"),
            gpio_chip: r.gpio_chip.clone(),
            com_path,
            spi_path: r.spi_path.clone(),
            lorawan_public: r.lorawan_public,
            poll_interval: r.poll_interval,
            idle_poll_interval: r.idle_poll_interval,
            watchdog: r.watchdog,
            restart_backoff_max: r.restart_backoff_max,
            realtime_priority: r.realtime_priority,
            forwarder_timeout: r.semtech_udp.forwarder_timeout,
        }
    }

    pub fn setup(&self) -> Setup {
        let plan = &self.plan;
        let rf = |i: usize| RfChainConf {
            enable: true,
            freq_hz: plan.radio_freq_hz[i],
            rssi_offset: self.board.rssi_offset,
            rssi_tcomp: self.board.rssi_tcomp,
            tx_enable: i == plan.tx_radio as usize,
            single_input_mode: false,
        };
        let offset = |radio: u8, f: u32| f as i32 - plan.radio_freq_hz[radio as usize] as i32;
        // The SX1302's IF chains have fixed roles: 0-7 multi-SF, 8 the single-SF LoRa channel,
        // 9 FSK. Every chain is set, those the plan does not use disabled: a smaller plan must
        // not leave the previous one's channels listening.
        let mut if_chains = vec![IfChainConf::Disabled; 10];
        let mut next_multi = 0usize;
        for c in &plan.channels {
            let slot = match c {
                IfChannel::MultiSf { .. } => {
                    next_multi += 1;
                    next_multi - 1
                }
                IfChannel::LoraStd { .. } => 8,
                IfChannel::Fsk { .. } => 9,
            };
            if slot >= 10 || (slot < 8 && next_multi > 8) {
                continue;
            }
            if_chains[slot] = match *c {
                IfChannel::MultiSf { radio, freq_hz } => IfChainConf::MultiSf {
                    rf_chain: radio,
                    offset_hz: offset(radio, freq_hz),
                },
                IfChannel::LoraStd {
                    radio,
                    freq_hz,
                    bandwidth_hz,
                    spreading_factor,
                } => IfChainConf::LoraStd {
                    rf_chain: radio,
                    offset_hz: offset(radio, freq_hz),
                    bandwidth_hz,
                    spreading_factor,
                },
                IfChannel::Fsk {
                    radio,
                    freq_hz,
                    bandwidth_hz,
                    datarate,
                } => IfChainConf::Fsk {
                    rf_chain: radio,
                    offset_hz: offset(radio, freq_hz),
                    bandwidth_hz,
                    datarate,
                },
            };
        }
        Setup {
            board: BoardConf {
                lorawan_public: self.lorawan_public,
                clksrc: 0,
                full_duplex: false,
                com_path: self.com_path.clone(),
            },
            rf_chains: [rf(0), rf(1)],
            if_chains,
            tx_rf_chain: plan.tx_radio,
            tx_gains: self.board.tx_gains.to_vec(),
            temperature_sensor: self.board.temperature_sensor,
        }
    }
}

/// Why a running radio was taken down.
#[derive(Debug)]
enum Down {
    Stop,
    Failed(Failure),
    /// A new channel plan to start with (what the concentrator held was read first).
    Replan(Replan),
}

/// A channel plan from the centre for the radio to run; the answer says whether the
/// concentrator started with it (if not, it runs the previous plan again).
#[derive(Debug)]
pub struct Replan {
    pub plan: ChannelPlan,
    pub reply: std::sync::mpsc::SyncSender<Result<(), String>>,
}

/// A failed start or a radio that went down, with what the library said about it.
#[derive(Debug)]
struct Failure {
    error: String,
    diagnosis: Option<diagnosis::Diagnosis>,
}

impl From<String> for Failure {
    fn from(error: String) -> Failure {
        Failure {
            error,
            diagnosis: None,
        }
    }
}

pub struct Radio {
    pub settings: RadioSettings,
    pub hal: Arc<Concentrator>,
    /// The stage behind, sent once it exists (see the module's comment).
    pub attach: Receiver<Box<dyn FrameSink>>,
    /// Channel plans from the centre (`command/config`).
    pub replan: Receiver<Replan>,
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    /// The concentrator's EUI, published after its first start.
    pub eui: watch::Sender<Option<u64>>,
    /// The packet forwarder's end (`semtech_udp` backend): frames come from it, not the HAL.
    pub udp: Option<Arc<semtech_udp::Link>>,
}

/// A radio that ran this long counts as healthy again: back-off starts over.
const STABLE_AFTER: Duration = Duration::from_secs(60);

impl Radio {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("radio".into())
            .spawn(move || {
                crate::realtime::raise_current_thread("radio", self.settings.realtime_priority);
                let mut handoff = Handoff {
                    attach: self.attach,
                    sink: None,
                    waiting: VecDeque::new(),
                    counters: self.counters.clone(),
                };
                if let Some(link) = self.udp {
                    semtech_udp::Backend {
                        link,
                        counters: &self.counters,
                        stop: &self.stop,
                        eui: &self.eui,
                        forwarder_timeout: self.settings.forwarder_timeout,
                        poll_interval: self.settings.poll_interval,
                        replan: &self.replan,
                    }
                    .run(&mut handoff);
                    handoff.finish();
                    return;
                }
                let mut radio = Running {
                    settings: self.settings,
                    replan: self.replan,
                    hal: self.hal,
                    counters: self.counters,
                    stop: self.stop,
                    eui: self.eui,
                };
                radio.run(&mut handoff);
                handoff.finish();
            })
    }
}

/// The radio on its thread (what `Radio` gives it but the hand-off).
struct Running {
    settings: RadioSettings,
    replan: Receiver<Replan>,
    hal: Arc<Concentrator>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    eui: watch::Sender<Option<u64>>,
}

impl Running {
    fn run(&mut self, handoff: &mut Handoff) {
        let mut backoff = Duration::from_secs(1);
        let mut attempts = 0u64;
        // A new plan being tried: who waits for the answer, and the plan to go back to.
        let mut trying: Option<(std::sync::mpsc::SyncSender<Result<(), String>>, ChannelPlan)> =
            None;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            // A radio retrying after a failure is down until it is up: the centre must not
            // read "starting" for a board that fails every time.
            self.status(|s| {
                if s.state != RadioState::Down {
                    s.state = RadioState::Starting;
                }
                s.restarts = attempts;
            });
            attempts += 1;
            // A plan that came while the radio was down is tried at this start.
            if trying.is_none() {
                if let Ok(r) = self.replan.try_recv() {
                    let previous = std::mem::replace(&mut self.settings.plan, r.plan);
                    trying = Some((r.reply, previous));
                }
            }
            let started_up = self.bring_up();
            if let Some((reply, previous)) = trying.take() {
                match &started_up {
                    Ok(_) => {
                        tracing::info!(radio_freq_hz = ?self.settings.plan.radio_freq_hz, channels = self.settings.plan.channels.len(), "concentrator started with the centre's channel plan");
                        let _ = reply.try_send(Ok(()));
                    }
                    Err(why) => {
                        tracing::error!(why = %why.error, "the concentrator did not start with the centre's channel plan: back to the previous one");
                        let _ = reply.try_send(Err(format!(
                            "the concentrator did not start with it ({}): the previous plan runs again",
                            why.error
                        )));
                        self.settings.plan = previous;
                        continue;
                    }
                }
            }
            let down = match started_up {
                Ok(_lines) => {
                    Counters::add(&self.counters.radio_starts, 1);
                    tracing::info!(version = %self.hal.version(), "concentrator started");
                    self.status(|s| {
                        s.state = RadioState::Up;
                        s.since = Some(SystemTime::now());
                        s.cause = None;
                        s.diagnosis = None;
                    });
                    let down = self.receive_loop(handoff);
                    if let Err(e) = self.hal.stop() {
                        tracing::warn!(error = %e, "stopping the concentrator");
                    }
                    down
                }
                Err(why) => Down::Failed(why),
            };
            match down {
                Down::Stop => break,
                Down::Replan(r) => {
                    // A new plan is not a restart after a failure: not counted as one.
                    attempts = attempts.saturating_sub(1);
                    let previous = std::mem::replace(&mut self.settings.plan, r.plan);
                    trying = Some((r.reply, previous));
                }
                Down::Failed(failure) => {
                    Counters::add(&self.counters.radio_failures, 1);
                    if started.elapsed() > STABLE_AFTER {
                        backoff = Duration::from_secs(1);
                    }
                    let d = failure.diagnosis.as_ref();
                    tracing::error!(
                        why = %failure.error,
                        library_said = d.and_then(|d| d.library_said.as_deref()),
                        cause = d.map(|d| d.cause.name()),
                        diagnosis = d.map(|d| d.advice.as_str()),
                        retry_in = ?backoff,
                        "radio down; restarting"
                    );
                    self.status(|s| {
                        if s.state != RadioState::Down || s.since.is_none() {
                            s.since = Some(SystemTime::now());
                        }
                        s.state = RadioState::Down;
                        s.last_error = Some(
                            d.and_then(|d| d.library_said.clone())
                                .unwrap_or_else(|| failure.error.clone()),
                        );
                        s.cause = d.map(|d| d.cause.name());
                        s.diagnosis = d.map(|d| d.advice.clone());
                    });
                    // A temperature read before the failure is not the board's now.
                    self.counters
                        .temperature_bits
                        .store(f32::NAN.to_bits(), Ordering::Relaxed);
                    self.sleep(backoff, handoff);
                    backoff = (backoff * 2).min(self.settings.restart_backoff_max);
                }
            }
        }
        tracing::info!("radio stopped");
    }

    /// Changes the radio's status and tells the stats when its state or error changed.
    fn status(&self, change: impl FnOnce(&mut crate::ops::counters::RadioStatus)) {
        let changed = match self.counters.radio.lock() {
            Ok(mut s) => {
                let before = (s.state, s.last_error.clone());
                change(&mut s);
                before != (s.state, s.last_error.clone())
            }
            Err(_) => false,
        };
        if changed {
            self.counters.radio_changed.notify_one();
        }
    }

    fn sleep(&self, d: Duration, handoff: &mut Handoff) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            Heartbeats::beat(&self.counters.beats.radio);
            handoff.pass();
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }

    fn bring_up(&self) -> Result<Option<reset::ResetLines>, Failure> {
        let lines = match self.settings.backend {
            Backend::SemtechUdp => {
                return Err(Failure::from(
                    "backend \"semtech_udp\" has no concentrator of its own to start".to_string(),
                ))
            }
            Backend::Simulator => {
                if Concentrator::linked() != "simulator" {
                    return Err(Failure::from(
                        "backend \"simulator\" but this build links the real libloragw".to_string(),
                    ));
                }
                None
            }
            Backend::Sx1302 => {
                if Concentrator::linked() != "libloragw" {
                    return Err(Failure::from(
                        "backend \"sx1302\" but this build links the simulated concentrator; build with \
                         LORAGW_DIR and --no-default-features (README: gateway builds)"
                            .to_string(),
                    ));
                }
                Some(
                    reset::reset(&self.settings.gpio_chip, self.settings.board).map_err(|e| {
                        let error = format!("board reset through {}: {e}", self.settings.gpio_chip);
                        Failure {
                            diagnosis: Some(diagnosis::Diagnosis {
                                cause: diagnosis::Cause::BoardReset,
                                library_said: None,
                                advice: format!(
                                    "the concentrator could not be reset through {}: the service \
                                     user needs the gpio group (the package adds it); on a Pi 5 \
                                     with an early image the header's chip is /dev/gpiochip4 \
                                     (radio.gpio_chip)",
                                    self.settings.gpio_chip
                                ),
                            }),
                            error,
                        }
                    })?,
                )
            }
        };
        let setup = self.settings.setup();
        // The library says why only on stdout: its lines are logged before ours, and read.
        let (started, said) = library_output::during(|| self.hal.configure_and_start(&setup));
        if let Err(e) = started {
            let diagnosis = matches!(
                e,
                hal::HalError::Call {
                    call: "lgw_start",
                    ..
                }
            )
            .then(|| {
                diagnosis::diagnose(
                    &said,
                    diagnosis::Variant::of_build(),
                    self.settings.board,
                    &self.settings.spi_path,
                )
            });
            return Err(Failure {
                error: e.to_string(),
                diagnosis,
            });
        }
        match self.hal.eui() {
            Ok(eui) => {
                self.status(|s| s.concentrator_eui = Some(eui));
                self.eui.send_replace(Some(eui));
            }
            Err(e) => tracing::warn!(error = %e, "reading the concentrator EUI"),
        }
        Ok(lines)
    }

    /// One `lgw_receive`: what it returned is counted and handed on; how many frames it read.
    fn read_once(
        &self,
        batch: &mut Vec<RxPacket>,
        handoff: &mut Handoff,
    ) -> Result<usize, hal::HalError> {
        batch.clear();
        let (read, malformed) = self.hal.receive(batch)?;
        let (at, handed_over) = (SystemTime::now(), std::time::Instant::now());
        Counters::add(&self.counters.rx_received, read as u64);
        Counters::add(&self.counters.rx_malformed, malformed as u64);
        for packet in batch.drain(..) {
            handoff.push(Received {
                packet,
                at,
                handed_over,
                meta: None,
                receipt: None,
            });
        }
        handoff.pass();
        Ok(read)
    }

    /// Reads until the concentrator has nothing more (a few calls at most).
    fn drain(&self, handoff: &mut Handoff) {
        let mut batch = Vec::with_capacity(hal::RX_BATCH);
        for _ in 0..64 {
            if !matches!(self.read_once(&mut batch, handoff), Ok(n) if n > 0) {
                return;
            }
        }
    }

    fn receive_loop(&self, handoff: &mut Handoff) -> Down {
        let mut batch = Vec::with_capacity(64);
        let mut last_counter = self.hal.counter().ok();
        let mut counter_moved_at = Instant::now();
        let mut next_check = Instant::now() + Duration::from_secs(1);
        let mut next_temperature = Instant::now();
        let mut last_frame = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Down::Stop;
            }
            if let Ok(r) = self.replan.try_recv() {
                // What the concentrator holds is read before it stops: nothing buffered is lost.
                self.drain(handoff);
                return Down::Replan(r);
            }
            Heartbeats::beat(&self.counters.beats.radio);
            let read = match self.read_once(&mut batch, handoff) {
                Ok(r) => r,
                Err(e) => return Down::Failed(e.to_string().into()),
            };
            let now = Instant::now();
            if now >= next_check {
                next_check = now + Duration::from_secs(1);
                match self.hal.counter() {
                    Ok(c) if Some(c) != last_counter => {
                        last_counter = Some(c);
                        counter_moved_at = now;
                    }
                    Ok(_) => {}
                    Err(e) => return Down::Failed(e.to_string().into()),
                }
                if now.duration_since(counter_moved_at) > self.settings.watchdog {
                    return Down::Failed(
                        format!(
                            "watchdog: the concentrator counter has not moved for {:?} (link lost)",
                            now.duration_since(counter_moved_at)
                        )
                        .into(),
                    );
                }
            }
            // A board without the sensor has no temperature: asking ChirpStack's r9 prints an
            // ERROR line each time (its stts751_get_temperature on fd -1).
            if self.settings.board.temperature_sensor.is_some() && now >= next_temperature {
                next_temperature = now + Duration::from_secs(10);
                if let Ok(t) = self.hal.temperature() {
                    self.counters
                        .temperature_bits
                        .store(t.to_bits(), Ordering::Relaxed);
                }
            }
            // A full batch means more frames are waiting: read again at once. After 100 ms
            // without frames, poll less often: an idle gateway's CPU is mostly these wake-ups.
            if read > 0 {
                last_frame = now;
            }
            if read < hal::RX_BATCH {
                let idle = now.duration_since(last_frame) > IDLE_AFTER;
                std::thread::sleep(if idle {
                    self.settings.idle_poll_interval
                } else {
                    self.settings.poll_interval
                });
            }
        }
    }
}
