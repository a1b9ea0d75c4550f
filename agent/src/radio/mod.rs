//! The radio stage: brings the concentrator up (reset, configure, start), polls `lgw_receive`,
//! and hands every frame on without ever waiting for the stages behind it.
//!
//! It runs on its own thread because HAL calls block (calibration takes seconds). A start or
//! receive failure restarts the radio with back-off; a counter that stops advancing (the HAL
//! "succeeds" on a dead SPI link) trips the watchdog and restarts it too.

pub mod boards;
pub mod hal;
pub mod library_output;
pub mod region;
mod reset;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use std::sync::mpsc::{SyncSender, TrySendError};

use tokio::sync::watch;

use crate::config::{Backend, Config};
use crate::ops::counters::Counters;
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
}

/// Without a frame this long, the radio is polled at `idle_poll_interval`.
const IDLE_AFTER: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RadioSettings {
    pub backend: Backend,
    pub board: &'static BoardProfile,
    pub plan: ChannelPlan,
    pub gpio_chip: String,
    pub com_path: String,
    pub lorawan_public: bool,
    pub poll_interval: Duration,
    pub idle_poll_interval: Duration,
    pub watchdog: Duration,
    pub restart_backoff_max: Duration,
    pub realtime_priority: u8,
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
        };
        RadioSettings {
            backend: r.backend,
            board: boards::profile(&r.board).expect("validated"),
            plan: region::plan(&cfg.region.plan).expect("validated"),
            gpio_chip: r.gpio_chip.clone(),
            com_path,
            lorawan_public: r.lorawan_public,
            poll_interval: r.poll_interval,
            idle_poll_interval: r.idle_poll_interval,
            watchdog: r.watchdog,
            restart_backoff_max: r.restart_backoff_max,
            realtime_priority: r.realtime_priority,
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
        let if_chains = plan
            .channels
            .iter()
            .map(|c| match *c {
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
            })
            .collect();
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
    Failed(String),
}

pub struct Radio {
    pub settings: RadioSettings,
    pub hal: Arc<Concentrator>,
    pub out: SyncSender<Received>,
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    /// The concentrator's EUI, published after its first start.
    pub eui: watch::Sender<Option<u64>>,
}

/// A radio that ran this long counts as healthy again: back-off starts over.
const STABLE_AFTER: Duration = Duration::from_secs(60);

impl Radio {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("radio".into())
            .spawn(move || {
                crate::realtime::raise_current_thread("radio", self.settings.realtime_priority);
                self.run()
            })
    }

    fn run(self) {
        let mut backoff = Duration::from_secs(1);
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let down = match self.bring_up() {
                Ok(_lines) => {
                    Counters::add(&self.counters.radio_starts, 1);
                    tracing::info!(version = %self.hal.version(), "concentrator started");
                    let down = self.receive_loop();
                    if let Err(e) = self.hal.stop() {
                        tracing::warn!(error = %e, "stopping the concentrator");
                    }
                    down
                }
                Err(why) => Down::Failed(why),
            };
            match down {
                Down::Stop => break,
                Down::Failed(why) => {
                    Counters::add(&self.counters.radio_failures, 1);
                    if started.elapsed() > STABLE_AFTER {
                        backoff = Duration::from_secs(1);
                    }
                    tracing::error!(%why, retry_in = ?backoff, "radio down; restarting");
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(self.settings.restart_backoff_max);
                }
            }
        }
        tracing::info!("radio stopped");
    }

    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            Heartbeats::beat(&self.counters.beats.radio);
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }

    fn bring_up(&self) -> Result<Option<reset::ResetLines>, String> {
        let lines = match self.settings.backend {
            Backend::Simulator => {
                if Concentrator::linked() != "simulator" {
                    return Err(
                        "backend \"simulator\" but this build links the real libloragw".into(),
                    );
                }
                None
            }
            Backend::Sx1302 => {
                if Concentrator::linked() != "libloragw" {
                    return Err(
                        "backend \"sx1302\" but this build links the simulated concentrator; build with \
                         LORAGW_DIR and --no-default-features (README: gateway builds)"
                            .into(),
                    );
                }
                Some(
                    reset::reset(&self.settings.gpio_chip, self.settings.board).map_err(|e| {
                        format!("board reset through {}: {e}", self.settings.gpio_chip)
                    })?,
                )
            }
        };
        self.hal
            .configure_and_start(&self.settings.setup())
            .map_err(|e| {
                let board = self.settings.board;
                match e {
                    hal::HalError::Call {
                        call: "lgw_start", ..
                    } if board.temperature_sensor.is_none() => {
                        format!(
                            "{e}; the {} has no STTS751 temperature sensor, and Semtech's \
                             upstream libloragw V2.1.0 refuses to start without one (the library's own \
                             reason is in its `libloragw` log line): build against ChirpStack's \
                             sx1302_hal V2.1.0r9, where the sensor is optional (README: building \
                             against the real libloragw)",
                            board.description
                        )
                    }
                    e => e.to_string(),
                }
            })?;
        match self.hal.eui() {
            Ok(eui) => {
                self.eui.send_replace(Some(eui));
            }
            Err(e) => tracing::warn!(error = %e, "reading the concentrator EUI"),
        }
        Ok(lines)
    }

    fn receive_loop(&self) -> Down {
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
            Heartbeats::beat(&self.counters.beats.radio);
            batch.clear();
            let (read, malformed) = match self.hal.receive(&mut batch) {
                Ok(r) => r,
                Err(e) => return Down::Failed(e.to_string()),
            };
            let at = SystemTime::now();
            let handed_over = std::time::Instant::now();
            Counters::add(&self.counters.rx_received, read as u64);
            Counters::add(&self.counters.rx_malformed, malformed as u64);
            for packet in batch.drain(..) {
                if let Err(TrySendError::Full(_)) = self.out.try_send(Received {
                    packet,
                    at,
                    handed_over,
                }) {
                    // Never wait on the stages behind: a stalled store must not stall the radio.
                    Counters::add(&self.counters.rx_dropped, 1);
                }
            }
            let now = Instant::now();
            if now >= next_check {
                next_check = now + Duration::from_secs(1);
                match self.hal.counter() {
                    Ok(c) if Some(c) != last_counter => {
                        last_counter = Some(c);
                        counter_moved_at = now;
                        // systemd's watchdog is fed by real progress of the radio, not a timer.
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                    Ok(_) => {}
                    Err(e) => return Down::Failed(e.to_string()),
                }
                if now.duration_since(counter_moved_at) > self.settings.watchdog {
                    return Down::Failed(format!(
                        "watchdog: the concentrator counter has not moved for {:?} (link lost)",
                        now.duration_since(counter_moved_at)
                    ));
                }
            }
            if now >= next_temperature {
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
