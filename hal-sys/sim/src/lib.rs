//! A simulated SX1302 concentrator behind the libloragw V2.1.0 C ABI.
//!
//! This crate *is* a libloragw for machines without a radio: it exports `lgw_board_setconf`,
//! `lgw_start`, `lgw_receive`, `lgw_send`, ... with the exact C signatures and struct layouts of
//! `sx1302-hal-sys`, so the bindings, the FFI marshalling and the agent's safe wrapper run in
//! tests exactly as on a gateway. Like the real library it keeps one global concentrator.
//!
//! It is configured the way the real HAL is pointed at its SPI device: `com_path` in
//! `lgw_board_setconf` names a simulator file (TOML, see `config/simulator-demo.toml`):
//! a scenario of received frames to replay, steady synthetic traffic, the start value of the
//! 1 MHz counter (to test its wrap), injected faults, and a log of every `lgw_send`.
//!
//! It behaves like the real library where the agent can tell, failure modes included, and each
//! such behaviour is pinned by a test naming the V2.1.0 behaviour it reproduces: it reports on
//! stdout as libloragw's `printf`s do (same lines for the same events); `lgw_get_instcnt`
//! "succeeds" while the concentrator is stopped, leaving the value untouched; `lgw_start` fails
//! on a board without the STTS751 temperature sensor unless `library = "v2.1.0r9"` (ChirpStack's
//! fork, where the sensor is optional); `lgw_send` checks nothing about a packet already
//! programmed: one still scheduled or on air is replaced (the TX log's `replaced` field says
//! which). Its own
//! diagnostics (injected faults) go to stderr, prefixed `[sx1302-sim]`.
//!
//! The `unsafe` here is the C side of the ABI: pointers handed in by the caller are trusted as
//! the real library trusts them.

mod scenario;
mod toa;

use std::ffi::{c_char, c_int, CStr};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sx1302_hal_sys as sys;

pub use scenario::{parse_scenario, ScenarioFrame};
pub use toa::time_on_air_ms;

const OK: c_int = 0;
const ERR: c_int = -1;

/// The simulator file named by `com_path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Concentrator EUI returned by `lgw_get_eui` (16 hex digits).
    #[serde(default = "default_eui")]
    pub eui: String,
    #[serde(default = "default_temperature")]
    pub temperature_c: f32,
    /// Counter value at `lgw_start`; start near 2^32 to exercise the wrap.
    #[serde(default)]
    pub counter_start_us: u32,
    /// Frames to replay (CSV, see `scenario.rs`), relative to this file.
    pub scenario: Option<PathBuf>,
    /// Steady synthetic uplinks per second after the scenario (0 = none).
    #[serde(default)]
    pub synthetic_rate_hz: f64,
    /// Stop synthetic traffic after this many frames (0 = never).
    #[serde(default)]
    pub synthetic_max_frames: u64,
    #[serde(default = "default_devices")]
    pub synthetic_devices: u32,
    #[serde(default = "default_payload_size")]
    pub synthetic_payload_size: usize,
    /// Every `lgw_send` is appended here as one JSON line, relative to this file.
    pub tx_log: Option<PathBuf>,
    /// Each `lgw_start` appends the channels configured (one JSON line), relative to this file.
    pub rx_config_log: Option<PathBuf>,
    #[serde(default)]
    pub faults: Faults,
    /// Which build of sx1302_hal to imitate where they differ.
    #[serde(default)]
    pub library: Library,
    /// Whether the board has the STTS751 temperature sensor (RAK2287 and RAK5146 have none).
    #[serde(default = "yes")]
    pub temperature_sensor: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Library {
    /// Semtech's V2.1.0: `lgw_start` requires the temperature sensor.
    #[default]
    #[serde(rename = "v2.1.0")]
    Upstream,
    /// ChirpStack's V2.1.0r9: the sensor is optional (no temperature without it).
    #[serde(rename = "v2.1.0r9")]
    ChirpstackR9,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// The first N calls to `lgw_start` fail.
    #[serde(default)]
    pub start_failures: u32,
    /// `lgw_receive` returns -1 once after each of these totals of delivered frames.
    #[serde(default)]
    pub receive_error_after_frames: Vec<u64>,
    /// After this many delivered frames the link dies: `lgw_receive` returns 0 and
    /// `lgw_get_instcnt` "succeeds" with a frozen value until the next `lgw_start`.
    #[serde(default)]
    pub link_dead_after_frames: Option<u64>,
    /// The first N calls to `lgw_send` fail.
    #[serde(default)]
    pub send_failures: u32,
    /// What the SPI bus does at `lgw_start` (each prints the library's own lines).
    #[serde(default)]
    pub spi: Spi,
    /// The SX1302 answers, but the SX1250's image calibration reports an error.
    #[serde(default)]
    pub radio_calibration_error: bool,
    /// Whether the I2C device the library opens for the temperature sensor exists.
    #[serde(default = "yes")]
    pub i2c_device: bool,
    /// `lgw_start` takes this long before it succeeds or fails (real starts take seconds).
    #[serde(default)]
    pub start_delay_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// The SPI link to the concentrator as `lgw_start` finds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spi {
    #[default]
    Ok,
    /// The device file (e.g. `/dev/spidev0.0`) cannot be opened: SPI not enabled.
    NoDevice,
    /// Every read returns 0x00: nothing answers on the bus.
    #[serde(rename = "answers_0x00")]
    Answers00,
    /// Every read returns 0xFF: nothing answers on the bus (pulled-up MISO).
    #[serde(rename = "answers_0xff")]
    AnswersFf,
}

fn default_eui() -> String {
    "0016c001ff10a235".into()
}
fn default_temperature() -> f32 {
    38.5
}
fn default_devices() -> u32 {
    16
}
fn default_payload_size() -> usize {
    24
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<SimConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("simulator file {}: {e}", path.display()))?;
        let mut cfg: SimConfig =
            toml::from_str(&text).map_err(|e| format!("simulator file {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.scenario = cfg.scenario.map(|p| base.join(p));
        cfg.tx_log = cfg.tx_log.map(|p| base.join(p));
        cfg.rx_config_log = cfg.rx_config_log.map(|p| base.join(p));
        Ok(cfg)
    }
}

/// One IF chain as `lgw_rxif_setconf` set it.
#[derive(Debug, Clone, Copy)]
struct IfConf {
    rf_chain: u8,
    offset_hz: i32,
    bandwidth: u8,
    datarate: u32,
}

#[derive(Default)]
struct Setup {
    com_path: Option<PathBuf>,
    rf_tx_enabled: [bool; 2],
    /// Centre frequencies of the radios (`lgw_rxrf_setconf`), 0 when disabled.
    rf_freq_hz: [u32; 2],
    /// The IF chains enabled (0-7 multi-SF, 8 LoRa standard, 9 FSK).
    if_conf: [Option<IfConf>; 10],
    /// ChirpStack's fork: where the temperature sensor is, if the caller said.
    i2c_path: Option<String>,
    i2c_temp_sensor_addr: Option<u8>,
}

struct Running {
    cfg: SimConfig,
    /// What the radios listen on: (frequency, IF chain, RF chain) of each enabled IF chain.
    channels: Vec<(u32, u8, u8)>,
    sensor_open: bool,
    started: Instant,
    frames: Vec<ScenarioFrame>,
    tx_log: Option<File>,
    link_dead: bool,
    frozen_counter: u32,
    /// End of the last transmission, in counter microseconds (start, end).
    tx_window: Option<(u32, u32)>,
}

#[derive(Default)]
struct Sim {
    setup: Setup,
    running: Option<Running>,
    /// Timeline state kept across restarts, like the traffic on the air.
    timeline_start: Option<Instant>,
    next_frame: usize,
    delivered: u64,
    synthetic_sent: u64,
    synthetic_fcnt: Vec<u16>,
    start_calls: u32,
    send_calls: u32,
    receive_errors_done: usize,
}

static SIM: Mutex<Option<Sim>> = Mutex::new(None);

fn with_sim<R>(f: impl FnOnce(&mut Sim) -> R) -> R {
    let mut guard = SIM.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Sim::default))
}

fn log(msg: &str) {
    eprintln!("[sx1302-sim] {msg}");
}

/// What the real library prints (its `printf`s, on stdout) for the same event.
fn print(msg: &str) {
    println!("{msg}");
    #[cfg(test)]
    PRINTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(msg.to_string());
}

/// Lines printed, for the tests that pin them.
#[cfg(test)]
static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl Running {
    fn counter(&self) -> u32 {
        if self.link_dead {
            return self.frozen_counter;
        }
        let us = self.started.elapsed().as_micros() as u64;
        self.cfg.counter_start_us.wrapping_add(us as u32)
    }

    fn counter_at(&self, at: Instant) -> u32 {
        let us = at.saturating_duration_since(self.started).as_micros() as u64;
        self.cfg.counter_start_us.wrapping_add(us as u32)
    }
}

// --- configuration -------------------------------------------------------------------------

/// # Safety
/// `conf` must point to a valid `lgw_conf_board_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_board_setconf(conf: *mut sys::lgw_conf_board_s) -> c_int {
    let Some(conf) = conf.as_ref() else {
        return ERR;
    };
    with_sim(|s| {
        if s.running.is_some() {
            log("lgw_board_setconf: concentrator is running");
            return ERR;
        }
        let raw = &conf.com_path;
        let len = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let bytes: Vec<u8> = raw[..len].iter().map(|&c| c as u8).collect();
        s.setup.com_path = Some(PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()));
        OK
    })
}

/// # Safety
/// `conf` must point to a valid `lgw_conf_rxrf_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_rxrf_setconf(rf_chain: u8, conf: *mut sys::lgw_conf_rxrf_s) -> c_int {
    let Some(conf) = conf.as_ref() else {
        return ERR;
    };
    if rf_chain as u32 >= sys::LGW_RF_CHAIN_NB {
        return ERR;
    }
    with_sim(|s| {
        if s.running.is_some() {
            return ERR;
        }
        s.setup.rf_tx_enabled[rf_chain as usize] = conf.tx_enable;
        s.setup.rf_freq_hz[rf_chain as usize] = if conf.enable { conf.freq_hz } else { 0 };
        OK
    })
}

/// # Safety
/// `conf` must point to a valid `lgw_conf_rxif_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_rxif_setconf(if_chain: u8, conf: *mut sys::lgw_conf_rxif_s) -> c_int {
    let Some(conf) = conf.as_mut() else {
        return ERR;
    };
    if if_chain as u32 >= sys::LGW_IF_CHAIN_NB {
        return ERR;
    }
    with_sim(|s| {
        if s.running.is_some() {
            return ERR;
        }
        if conf.enable {
            if conf.rf_chain as u32 >= sys::LGW_RF_CHAIN_NB {
                return ERR;
            }
            // The real HAL writes defaults back into the caller's struct.
            if if_chain == 8 && conf.sync_word_size == 0 {
                conf.sync_word_size = 1;
            }
            s.setup.if_conf[if_chain as usize] = Some(IfConf {
                rf_chain: conf.rf_chain,
                offset_hz: conf.freq_hz,
                bandwidth: conf.bandwidth,
                datarate: conf.datarate,
            });
        } else {
            s.setup.if_conf[if_chain as usize] = None;
        }
        OK
    })
}

/// # Safety
/// `conf` must point to a valid `lgw_conf_demod_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_demod_setconf(conf: *mut sys::lgw_conf_demod_s) -> c_int {
    if conf.is_null() {
        return ERR;
    }
    OK
}

/// # Safety
/// `conf` must point to a valid `lgw_tx_gain_lut_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_txgain_setconf(
    rf_chain: u8,
    conf: *mut sys::lgw_tx_gain_lut_s,
) -> c_int {
    let Some(conf) = conf.as_ref() else {
        return ERR;
    };
    if rf_chain as u32 >= sys::LGW_RF_CHAIN_NB
        || conf.size == 0
        || conf.size as u32 > sys::TX_GAIN_LUT_SIZE_MAX
    {
        return ERR;
    }
    OK
}

/// # Safety
/// `conf` must point to a valid `lgw_conf_ftime_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_ftime_setconf(conf: *mut sys::lgw_conf_ftime_s) -> c_int {
    if conf.is_null() {
        return ERR;
    }
    OK
}

/// # Safety
/// `conf` must point to a valid `lgw_conf_sx1261_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_sx1261_setconf(conf: *mut sys::lgw_conf_sx1261_s) -> c_int {
    if conf.is_null() {
        return ERR;
    }
    OK
}

// --- life cycle ----------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn lgw_start() -> c_int {
    with_sim(|s| {
        if s.running.is_some() {
            log("lgw_start: already started");
            return ERR;
        }
        s.start_calls += 1;
        let Some(path) = s.setup.com_path.clone() else {
            log("lgw_start: no board configuration (lgw_board_setconf not called)");
            return ERR;
        };
        let cfg = match SimConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                log(&e);
                return ERR;
            }
        };
        if cfg.faults.start_delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(cfg.faults.start_delay_ms));
        }
        if s.start_calls <= cfg.faults.start_failures {
            log(&format!(
                "lgw_start: injected failure {}/{}",
                s.start_calls, cfg.faults.start_failures
            ));
            return ERR;
        }
        let told = s.setup.i2c_path.as_ref().and(s.setup.i2c_temp_sensor_addr);
        if let Err(()) = library_start_sequence(&cfg, told) {
            return ERR;
        }
        // Upstream probes for the sensor itself; the fork opens it only where it was told to.
        let sensor_open = cfg.temperature_sensor
            && (cfg.library == Library::Upstream
                || (s.setup.i2c_path.is_some() && s.setup.i2c_temp_sensor_addr.is_some()));
        let frames = match &cfg.scenario {
            Some(p) => match std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_scenario(&t))
            {
                Ok(f) => f,
                Err(e) => {
                    log(&format!("scenario {}: {e}", p.display()));
                    return ERR;
                }
            },
            None => Vec::new(),
        };
        let tx_log = match &cfg.tx_log {
            Some(p) => match OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    log(&format!("tx log {}: {e}", p.display()));
                    return ERR;
                }
            },
            None => None,
        };
        let channels: Vec<(u32, u8, u8)> = s
            .setup
            .if_conf
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = (*c)?;
                let rf = *s.setup.rf_freq_hz.get(c.rf_chain as usize)?;
                (rf != 0).then(|| ((rf as i64 + c.offset_hz as i64) as u32, i as u8, c.rf_chain))
            })
            .collect();
        if let Some(p) = &cfg.rx_config_log {
            // One line per start: what a test checks a channel plan against.
            let line = format!(
                "{{\"rf_freq_hz\":[{},{}],\"channels\":[{}]}}\n",
                s.setup.rf_freq_hz[0],
                s.setup.rf_freq_hz[1],
                s.setup
                    .if_conf
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.map(|c| (i, c)))
                    .map(|(i, c)| format!(
                        "{{\"if_chain\":{i},\"rf_chain\":{},\"freq_hz\":{},\"bandwidth\":{},\"datarate\":{}}}",
                        c.rf_chain,
                        (s.setup.rf_freq_hz[c.rf_chain as usize & 1] as i64 + c.offset_hz as i64),
                        c.bandwidth,
                        c.datarate
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if let Err(e) = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| f.write_all(line.as_bytes()))
            {
                log(&format!("rx config log {}: {e}", p.display()));
            }
        }
        if s.synthetic_fcnt.len() != cfg.synthetic_devices as usize {
            s.synthetic_fcnt = vec![0; cfg.synthetic_devices as usize];
        }
        let now = Instant::now();
        s.timeline_start.get_or_insert(now);
        s.running = Some(Running {
            cfg,
            channels,
            sensor_open,
            started: now,
            frames,
            tx_log,
            link_dead: false,
            frozen_counter: 0,
            tx_window: None,
        });
        OK
    })
}

/// What V2.1.0's `lgw_start` prints (release build, no DEBUG_*) on the way, and where it gives
/// up: `lgw_connect` (loragw_reg.c, loragw_com.c), the radio calibration and setup
/// (loragw_sx1302.c, loragw_sx1250.c), the timestamp mode (loragw_sx1302_timestamp.c) and the
/// temperature sensor probe (loragw_hal.c, addresses from loragw_stts751.h). ChirpStack's
/// V2.1.0r9 (brocaar/sx1302_hal, loragw_hal.c) opens the sensor only at the address it was
/// told (`told`), fails if the I2C device cannot be opened, and goes on without a sensor that
/// does not answer.
fn library_start_sequence(cfg: &SimConfig, told: Option<u8>) -> Result<(), ()> {
    let faults = &cfg.faults;
    // loragw_com.c lgw_com_open: printed before the device is opened; a failed open() is only
    // reported with DEBUG_SPI.
    print("Opening SPI communication interface");
    let version: u8 = match faults.spi {
        Spi::NoDevice => return Err(()),
        Spi::Answers00 => 0x00,
        Spi::AnswersFf => 0xFF,
        Spi::Ok => 0x10,
    };
    // loragw_reg.c lgw_connect: the version register, whatever it reads.
    print(&format!(
        "Note: chip version is 0x{version:02X} (v{}.{})",
        version >> 4,
        version & 0x0F
    ));
    match faults.spi {
        // sx1250_calibrate: GET_DEVICE_ERRORS reads 0x00, no error bit; then sx1250_setup's
        // GET_STATUS reads 0x00, not STANDBY_RC (lgw_start: "failed to setup radio 0").
        Spi::Answers00 => {
            print("ERROR: Failed to set SX1250_0 in STANDBY_RC mode");
            print("ERROR: failed to setup radio 0");
            return Err(());
        }
        // sx1250_calibrate: GET_DEVICE_ERRORS reads 0xFF, the image calibration error bit set;
        // sx1302_radio_calibrate and lgw_start each say so.
        Spi::AnswersFf => {
            print("ERROR: sx1250 Image Calibration Error");
            print("ERROR: radio calibration failed");
            print("ERROR: radio calibration failed");
            return Err(());
        }
        _ if faults.radio_calibration_error => {
            print("ERROR: sx1250 Image Calibration Error");
            print("ERROR: radio calibration failed");
            print("ERROR: radio calibration failed");
            return Err(());
        }
        _ => {}
    }
    // sx1302_init -> timestamp_counter_mode(false).
    print("INFO: using legacy timestamp");
    if cfg.library == Library::Upstream {
        // lgw_start: the STTS751 is probed at 0x39, 0x3B and 0x38 on I2C_DEVICE (/dev/i2c-1).
        if !faults.i2c_device {
            print("ERROR: failed to open I2C for temperature sensor on port 0x39");
            return Err(());
        }
        if !cfg.temperature_sensor {
            for port in [0x39, 0x3B, 0x38] {
                print(&format!(
                    "INFO: no temperature sensor found on port 0x{port:02X}"
                ));
            }
            print("ERROR: no temperature sensor found.");
            return Err(());
        }
        print("INFO: found temperature sensor on port 0x39");
    } else if let Some(addr) = told {
        if !faults.i2c_device {
            print(&format!(
                "ERROR: failed to open I2C for temperature sensor on port 0x{addr:02X}"
            ));
            return Err(());
        }
        if !cfg.temperature_sensor {
            print(&format!(
                "INFO: no temperature sensor found on port 0x{addr:02X}"
            ));
        }
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn lgw_stop() -> c_int {
    with_sim(|s| {
        s.running = None;
        OK
    })
}

// --- receive -------------------------------------------------------------------------------

/// # Safety
/// `pkt_data` must point to at least `max_pkt` writable `lgw_pkt_rx_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_receive(max_pkt: u8, pkt_data: *mut sys::lgw_pkt_rx_s) -> c_int {
    if pkt_data.is_null() {
        return ERR;
    }
    let out = std::slice::from_raw_parts_mut(pkt_data, max_pkt as usize);
    with_sim(|s| s.receive(out))
}

impl Sim {
    fn receive(&mut self, out: &mut [sys::lgw_pkt_rx_s]) -> c_int {
        let Some(run) = self.running.as_mut() else {
            return ERR;
        };
        let faults = &run.cfg.faults;
        if let Some(&after) = faults
            .receive_error_after_frames
            .get(self.receive_errors_done)
        {
            if self.delivered >= after {
                self.receive_errors_done += 1;
                log(&format!(
                    "lgw_receive: injected error after {} frames",
                    self.delivered
                ));
                return ERR;
            }
        }
        if run.link_dead {
            return 0;
        }
        let timeline = self.timeline_start.expect("set by lgw_start");
        let now = Instant::now();
        let mut n = 0;
        while n < out.len() {
            if let Some(dead_after) = run.cfg.faults.link_dead_after_frames {
                if self.delivered >= dead_after {
                    log(&format!(
                        "link dead after {} frames: lgw_receive now returns 0",
                        self.delivered
                    ));
                    run.frozen_counter = run.counter();
                    run.link_dead = true;
                    break;
                }
            }
            let frame = if let Some(f) = run.frames.get(self.next_frame) {
                let due = timeline + Duration::from_micros(f.offset_us);
                if due > now {
                    break;
                }
                self.next_frame += 1;
                // Off the configured channels, the radios do not hear it.
                if !run.channels.is_empty() && !run.channels.iter().any(|c| c.0 == f.freq_hz) {
                    continue;
                }
                let mut f = f.clone();
                f.count_us = run.counter_at(due.max(run.started));
                f
            } else if run.cfg.synthetic_rate_hz > 0.0
                && (run.cfg.synthetic_max_frames == 0
                    || self.synthetic_sent < run.cfg.synthetic_max_frames)
            {
                let scenario_end = run.frames.last().map(|f| f.offset_us).unwrap_or(0);
                let k = self.synthetic_sent;
                let due = timeline
                    + Duration::from_micros(scenario_end)
                    + Duration::from_secs_f64(k as f64 / run.cfg.synthetic_rate_hz);
                if due > now {
                    break;
                }
                self.synthetic_sent += 1;
                let mut f = synthetic_frame(&run.cfg, k, &mut self.synthetic_fcnt, &run.channels);
                f.count_us = run.counter_at(due.max(run.started));
                f
            } else {
                break;
            };
            frame.write_to(&mut out[n]);
            self.delivered += 1;
            n += 1;
        }
        // V2.1.0 prints "INFO: nb pkt found" only when built with DEBUG_HAL.
        n as c_int
    }
}

/// `channels`: what the radios listen on; synthetic traffic uses its multi-SF channels.
fn synthetic_frame(
    cfg: &SimConfig,
    k: u64,
    fcnt: &mut [u16],
    channels: &[(u32, u8, u8)],
) -> ScenarioFrame {
    const CHANNELS: [u32; 8] = [
        868_100_000,
        868_300_000,
        868_500_000,
        867_100_000,
        867_300_000,
        867_500_000,
        867_700_000,
        867_900_000,
    ];
    let devices = cfg.synthetic_devices.max(1);
    let dev = (k % devices as u64) as u32;
    let counter = &mut fcnt[dev as usize % fcnt.len().max(1)];
    let fc = *counter;
    *counter = counter.wrapping_add(1);
    let dev_addr = 0x2601_1000u32 + dev;
    // Unconfirmed data up: MHDR, DevAddr (LE), FCtrl, FCnt (LE), FPort, FRMPayload, MIC.
    let mut p = vec![0x40];
    p.extend_from_slice(&dev_addr.to_le_bytes());
    p.push(0x00);
    p.extend_from_slice(&fc.to_le_bytes());
    p.push(0x01);
    let body = cfg.synthetic_payload_size.saturating_sub(13).max(1);
    p.extend((0..body).map(|i| (k as usize + i) as u8));
    p.extend_from_slice(&((k as u32).wrapping_mul(2_654_435_761)).to_le_bytes());
    p.truncate(255);
    let multi: Vec<(u32, u8, u8)> = channels.iter().copied().filter(|c| c.1 < 8).collect();
    let ch = (k % 8) as usize;
    let (freq_hz, if_chain, rf_chain) = if multi.is_empty() {
        (CHANNELS[ch], ch as u8, if ch < 3 { 1 } else { 0 })
    } else {
        multi[(k as usize) % multi.len()]
    };
    ScenarioFrame {
        offset_us: 0,
        freq_hz,
        modulation: sys::MOD_LORA as u8,
        datarate: 7 + (k % 6) as u32,
        bandwidth: sys::BW_125KHZ as u8,
        coderate: sys::CR_LORA_4_5 as u8,
        rssi: -60.0 - (k % 50) as f32,
        snr: 9.5 - (k % 20) as f32,
        if_chain,
        rf_chain,
        status: sys::STAT_CRC_OK as u8,
        payload: p,
        count_us: 0,
    }
}

// --- transmit ------------------------------------------------------------------------------

/// # Safety
/// `pkt_data` must point to a valid `lgw_pkt_tx_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_send(pkt_data: *mut sys::lgw_pkt_tx_s) -> c_int {
    let Some(pkt) = pkt_data.as_mut() else {
        return ERR;
    };
    with_sim(|s| {
        s.send_calls += 1;
        let Some(run) = s.running.as_mut() else {
            print("ERROR: CONCENTRATOR IS NOT RUNNING, START IT BEFORE SENDING");
            return ERR;
        };
        let now = run.counter();
        let mut result = OK;
        if s.send_calls <= run.cfg.faults.send_failures {
            log("lgw_send: injected failure");
            result = ERR;
        } else if pkt.rf_chain as u32 >= sys::LGW_RF_CHAIN_NB
            || !s.setup.rf_tx_enabled[pkt.rf_chain as usize]
        {
            log("lgw_send: rf chain not enabled for TX");
            result = ERR;
        } else if pkt.size as usize > 255 {
            result = ERR;
        }
        // V2.1.0 checks nothing about a packet already programmed: the SX1302 has one TX
        // buffer per RF chain, so a packet still scheduled (or on air) is replaced, silently.
        let mut replaced = None;
        if result == OK {
            if let Some((start, end)) = run.tx_window {
                if now.wrapping_sub(start) < end.wrapping_sub(start)
                    || start.wrapping_sub(now) < 512_000_000 && start != now
                {
                    replaced = Some(start);
                }
            }
        }
        // The real HAL raises a too-short LoRa preamble to its minimum and writes it back.
        if pkt.modulation as u32 == sys::MOD_LORA && pkt.preamble < 8 {
            pkt.preamble = 8;
        }
        if result == OK {
            let start = if pkt.tx_mode as u32 == sys::IMMEDIATE {
                now
            } else {
                pkt.count_us
            };
            let toa_us = time_on_air_ms(pkt).saturating_mul(1000);
            run.tx_window = Some((start, start.wrapping_add(toa_us)));
        }
        if let Some(f) = run.tx_log.as_mut() {
            let payload: String = pkt.payload[..(pkt.size as usize).min(256)]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let line = format!(
                "{{\"counter_at_handoff\":{now},\"result\":{result},\"replaced\":{},\"tx_mode\":{},\"count_us\":{},\"freq_hz\":{},\"rf_chain\":{},\"rf_power\":{},\"modulation\":{},\"bandwidth\":{},\"datarate\":{},\"coderate\":{},\"invert_pol\":{},\"preamble\":{},\"no_crc\":{},\"size\":{},\"payload\":\"{payload}\"}}\n",
                replaced.map_or("null".to_string(), |r| r.to_string()),
                pkt.tx_mode, pkt.count_us, pkt.freq_hz, pkt.rf_chain, pkt.rf_power, pkt.modulation,
                pkt.bandwidth, pkt.datarate, pkt.coderate, pkt.invert_pol, pkt.preamble, pkt.no_crc, pkt.size
            );
            let _ = f.write_all(line.as_bytes());
        }
        result
    })
}

fn in_window(now: u32, start: u32, end: u32) -> bool {
    now.wrapping_sub(start) < end.wrapping_sub(start)
}

/// # Safety
/// `code` must point to a writable byte.
#[no_mangle]
pub unsafe extern "C" fn lgw_status(rf_chain: u8, select: u8, code: *mut u8) -> c_int {
    let Some(code) = code.as_mut() else {
        return ERR;
    };
    if rf_chain as u32 >= sys::LGW_RF_CHAIN_NB || select as u32 != sys::TX_STATUS {
        return ERR;
    }
    with_sim(|s| {
        let Some(run) = s.running.as_ref() else {
            *code = sys::TX_OFF as u8;
            return OK;
        };
        let now = run.counter();
        *code = match run.tx_window {
            Some((start, end)) if in_window(now, start, end) => sys::TX_EMITTING as u8,
            // A timestamped packet up to 512 s ahead is "scheduled".
            Some((start, _)) if start.wrapping_sub(now) < 512_000_000 && start != now => {
                sys::TX_SCHEDULED as u8
            }
            _ => sys::TX_FREE as u8,
        };
        OK
    })
}

#[no_mangle]
pub extern "C" fn lgw_abort_tx(_rf_chain: u8) -> c_int {
    with_sim(|s| {
        if let Some(run) = s.running.as_mut() {
            run.tx_window = None;
        }
        OK
    })
}

// --- counters and identity -----------------------------------------------------------------

/// # Safety
/// `trig_cnt_us` must point to a writable u32.
#[no_mangle]
pub unsafe extern "C" fn lgw_get_trigcnt(trig_cnt_us: *mut u32) -> c_int {
    lgw_get_instcnt(trig_cnt_us)
}

/// # Safety
/// `inst_cnt_us` must point to a writable u32.
#[no_mangle]
pub unsafe extern "C" fn lgw_get_instcnt(inst_cnt_us: *mut u32) -> c_int {
    let Some(out) = inst_cnt_us.as_mut() else {
        return ERR;
    };
    with_sim(|s| match s.running.as_ref() {
        Some(run) => {
            // Like the real HAL, a dead link still "succeeds" (with a frozen value).
            *out = run.counter();
            OK
        }
        None => {
            // V2.1.0: the SPI read fails, the error is printed, the call "succeeds" and the
            // caller's variable keeps whatever it held.
            print("ERROR: Failed to get timestamp counter value");
            OK
        }
    })
}

/// # Safety
/// `eui` must point to a writable u64.
#[no_mangle]
pub unsafe extern "C" fn lgw_get_eui(eui: *mut u64) -> c_int {
    let Some(out) = eui.as_mut() else { return ERR };
    with_sim(|s| match s.running.as_ref() {
        Some(run) => match u64::from_str_radix(&run.cfg.eui, 16) {
            Ok(v) => {
                *out = v;
                OK
            }
            Err(_) => ERR,
        },
        None => ERR,
    })
}

/// # Safety
/// `temperature` must point to a writable f32.
#[no_mangle]
pub unsafe extern "C" fn lgw_get_temperature(temperature: *mut f32) -> c_int {
    let Some(out) = temperature.as_mut() else {
        return ERR;
    };
    with_sim(|s| match s.running.as_ref() {
        Some(run) if run.sensor_open => {
            *out = run.cfg.temperature_c;
            OK
        }
        // No sensor open (r9 not told where it is, or it did not answer): loragw_stts751.c
        // stts751_get_temperature is called with fd -1 and says so.
        Some(_) => {
            print("ERROR: invalid I2C file descriptor");
            ERR
        }
        None => ERR,
    })
}

/// ChirpStack's fork (V2.1.0r9): the I2C device of the temperature sensor.
///
/// # Safety
/// `path` must be NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn lgw_i2c_set_path(path: *const c_char) -> c_int {
    if path.is_null() {
        return ERR;
    }
    let p = CStr::from_ptr(path).to_string_lossy().into_owned();
    with_sim(|s| {
        s.setup.i2c_path = Some(p);
        OK
    })
}

/// ChirpStack's fork (V2.1.0r9): the I2C address of the temperature sensor.
#[no_mangle]
pub extern "C" fn lgw_i2c_set_temp_sensor_addr(addr: u8) -> c_int {
    with_sim(|s| {
        s.setup.i2c_temp_sensor_addr = Some(addr);
        OK
    })
}

static VERSION: &CStr = c"lora-edge simulated concentrator; libloragw V2.1.0 ABI";

#[no_mangle]
pub extern "C" fn lgw_version_info() -> *const c_char {
    VERSION.as_ptr()
}

/// # Safety
/// `packet` must point to a valid `lgw_pkt_tx_s`.
#[no_mangle]
pub unsafe extern "C" fn lgw_time_on_air(packet: *const sys::lgw_pkt_tx_s) -> u32 {
    match packet.as_ref() {
        Some(p) => {
            let ms = time_on_air_ms(p);
            if p.modulation as u32 == sys::MOD_LORA {
                print(&format!("INFO: LoRa packet ToA: {ms} ms"));
            }
            ms
        }
        None => {
            print("ERROR: Failed to compute time on air, wrong parameter");
            0
        }
    }
}

#[cfg(test)]
mod library_behaviour {
    //! Each test names the V2.1.0 behaviour it reproduces. They share the one global
    //! concentrator, so they run under one lock.
    use super::*;

    static SERIAL: Mutex<()> = Mutex::new(());

    fn configure(dir: &Path, sim: &str) {
        let file = dir.join("sim.toml");
        std::fs::write(&file, sim).unwrap();
        let mut board = sys::lgw_conf_board_s::default();
        let path = file.to_str().unwrap().as_bytes();
        for (d, s) in board.com_path.iter_mut().zip(path) {
            *d = *s as c_char;
        }
        lgw_stop();
        // SAFETY: a valid struct.
        assert_eq!(unsafe { lgw_board_setconf(&mut board) }, OK);
    }

    #[test]
    fn v2_1_0_lgw_get_instcnt_succeeds_while_stopped_and_leaves_the_value_untouched() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        lgw_stop();
        let mut v = 0xDEAD_BEEFu32;
        // SAFETY: a writable u32.
        assert_eq!(unsafe { lgw_get_instcnt(&mut v) }, OK, "success, as V2.1.0");
        assert_eq!(v, 0xDEAD_BEEF, "garbage: whatever the caller had");
    }

    #[test]
    fn v2_1_0_lgw_start_fails_on_a_board_without_the_temperature_sensor_and_r9_does_not() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = std::env::temp_dir().join(format!("sx1302-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        configure(&dir, "temperature_sensor = false\n");
        assert_eq!(lgw_start(), ERR, "upstream V2.1.0 needs the STTS751");
        configure(&dir, "temperature_sensor = false\nlibrary = \"v2.1.0r9\"\n");
        assert_eq!(lgw_start(), OK, "ChirpStack's fork starts without it");
        let mut t = 0f32;
        // SAFETY: a writable f32.
        assert_eq!(
            unsafe { lgw_get_temperature(&mut t) },
            ERR,
            "and has no temperature"
        );
        lgw_stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What `lgw_start` prints with this simulator file.
    fn start_prints(dir: &Path, sim: &str) -> (c_int, Vec<String>) {
        configure(dir, sim);
        PRINTED.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let code = lgw_start();
        lgw_stop();
        let printed = std::mem::take(&mut *PRINTED.lock().unwrap_or_else(|p| p.into_inner()));
        (code, printed)
    }

    #[test]
    fn v2_1_0_lgw_start_prints_what_the_library_prints_for_each_failure() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = std::env::temp_dir().join(format!("sx1302-sim-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = "Opening SPI communication interface"; // loragw_com.c lgw_com_open
        let v10 = "Note: chip version is 0x10 (v1.0)"; // loragw_reg.c lgw_connect
        let legacy = "INFO: using legacy timestamp"; // loragw_sx1302_timestamp.c
        let cases: [(&str, c_int, &[&str]); 7] = [
            // loragw_hal.c lgw_start: the STTS751 found at its first address.
            (
                "",
                OK,
                &[
                    open,
                    v10,
                    legacy,
                    "INFO: found temperature sensor on port 0x39",
                ],
            ),
            // loragw_spi.c lgw_spi_open: a failed open() says nothing without DEBUG_SPI.
            ("[faults]\nspi = \"no_device\"", ERR, &[open]),
            // loragw_sx1250.c sx1250_setup: GET_STATUS reads 0x00, not STANDBY_RC; then
            // loragw_hal.c lgw_start "failed to setup radio 0".
            (
                "[faults]\nspi = \"answers_0x00\"",
                ERR,
                &[
                    open,
                    "Note: chip version is 0x00 (v0.0)",
                    "ERROR: Failed to set SX1250_0 in STANDBY_RC mode",
                    "ERROR: failed to setup radio 0",
                ],
            ),
            // loragw_sx1250.c sx1250_calibrate: the error bit of GET_DEVICE_ERRORS set (0xFF);
            // loragw_sx1302.c sx1302_radio_calibrate and lgw_start each say so.
            (
                "[faults]\nspi = \"answers_0xff\"",
                ERR,
                &[
                    open,
                    "Note: chip version is 0xFF (v15.15)",
                    "ERROR: sx1250 Image Calibration Error",
                    "ERROR: radio calibration failed",
                    "ERROR: radio calibration failed",
                ],
            ),
            (
                "[faults]\nradio_calibration_error = true",
                ERR,
                &[
                    open,
                    v10,
                    "ERROR: sx1250 Image Calibration Error",
                    "ERROR: radio calibration failed",
                    "ERROR: radio calibration failed",
                ],
            ),
            // loragw_hal.c lgw_start: I2C_PORT_TEMP_SENSOR = {0x39, 0x3B, 0x38}
            // (loragw_stts751.h), each probed, then "no temperature sensor found.".
            (
                "temperature_sensor = false",
                ERR,
                &[
                    open,
                    v10,
                    legacy,
                    "INFO: no temperature sensor found on port 0x39",
                    "INFO: no temperature sensor found on port 0x3B",
                    "INFO: no temperature sensor found on port 0x38",
                    "ERROR: no temperature sensor found.",
                ],
            ),
            // loragw_hal.c lgw_start: i2c_linuxdev_open fails at the first address.
            (
                "[faults]\ni2c_device = false",
                ERR,
                &[
                    open,
                    v10,
                    legacy,
                    "ERROR: failed to open I2C for temperature sensor on port 0x39",
                ],
            ),
        ];
        for (sim, code, lines) in cases {
            // Upstream probes whatever it was told.
            lgw_i2c_set_temp_sensor_addr(0x39);

            assert_eq!(
                start_prints(&dir, sim),
                (code, lines.iter().map(|l| l.to_string()).collect()),
                "{sim}"
            );
        }
        // V2.1.0r9 (brocaar/sx1302_hal loragw_hal.c): the sensor only where it was told, a
        // missing one is no error, a missing I2C device is.
        let r9 = "library = \"v2.1.0r9\"\n";
        lgw_i2c_set_temp_sensor_addr(0x39);
        // SAFETY: a NUL-terminated path.
        unsafe { lgw_i2c_set_path(c"/dev/i2c-1".as_ptr()) };
        let r9_cases: [(String, c_int, &[&str]); 3] = [
            (r9.to_string(), OK, &[open, v10, legacy]),
            (
                format!("{r9}temperature_sensor = false"),
                OK,
                &[
                    open,
                    v10,
                    legacy,
                    "INFO: no temperature sensor found on port 0x39",
                ],
            ),
            (
                format!("{r9}[faults]\ni2c_device = false"),
                ERR,
                &[
                    open,
                    v10,
                    legacy,
                    "ERROR: failed to open I2C for temperature sensor on port 0x39",
                ],
            ),
        ];
        for (sim, code, lines) in r9_cases {
            assert_eq!(
                start_prints(&dir, &sim),
                (code, lines.iter().map(|l| l.to_string()).collect()),
                "{sim}"
            );
        }
        with_sim(|s| {
            s.setup.i2c_path = None;
            s.setup.i2c_temp_sensor_addr = None;
        });
        // Not told: nothing about a sensor at all.
        assert_eq!(
            start_prints(&dir, &format!("{r9}temperature_sensor = false")),
            (
                OK,
                vec![open.to_string(), v10.to_string(), legacy.to_string()]
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn v2_1_0_lgw_receive_prints_nothing_without_debug_hal() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = std::env::temp_dir().join(format!("sx1302-sim-rx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        configure(&dir, "synthetic_rate_hz = 1000.0\n");
        assert_eq!(lgw_start(), OK);
        std::thread::sleep(Duration::from_millis(20));
        PRINTED.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut rx = vec![sys::lgw_pkt_rx_s::default(); 16];
        // SAFETY: 16 writable packets.
        let n = unsafe { lgw_receive(16, rx.as_mut_ptr()) };
        assert!(n > 0);
        // loragw_hal.c lgw_receive: "INFO: nb pkt found" is a DEBUG_PRINTF.
        assert!(PRINTED.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
        lgw_stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn v2_1_0_lgw_send_refuses_while_stopped_and_replaces_a_packet_still_programmed() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = std::env::temp_dir().join(format!("sx1302-sim-tx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        configure(&dir, "");
        let mut rf = sys::lgw_conf_rxrf_s {
            enable: true,
            tx_enable: true,
            ..Default::default()
        };
        // SAFETY: valid structs.
        assert_eq!(unsafe { lgw_rxrf_setconf(0, &mut rf) }, OK);
        let mut pkt = sys::lgw_pkt_tx_s {
            freq_hz: 869_525_000,
            tx_mode: sys::IMMEDIATE as u8,
            modulation: sys::MOD_LORA as u8,
            bandwidth: sys::BW_125KHZ as u8,
            datarate: 12,
            coderate: sys::CR_LORA_4_5 as u8,
            size: 50,
            ..Default::default()
        };
        // SAFETY: a valid packet.
        assert_eq!(unsafe { lgw_send(&mut pkt) }, ERR, "not started");
        assert_eq!(lgw_start(), OK);
        // SAFETY: a valid packet.
        assert_eq!(unsafe { lgw_send(&mut pkt) }, OK);
        // SAFETY: a valid packet; SF12 takes seconds on air.
        assert_eq!(
            unsafe { lgw_send(&mut pkt) },
            OK,
            "V2.1.0 checks nothing: the packet on air is replaced (the TX log says so)"
        );
        lgw_stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
