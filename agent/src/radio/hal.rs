//! The safe concentrator: the only caller of `sx1302-hal-sys`.
//!
//! libloragw keeps one global concentrator and is not thread-safe, so there is one
//! `Concentrator` per process (`claim`) and every call goes through its mutex. C structs are built
//! and read here and nowhere else; callers see Rust types and `Result`s.
//!
//! `lgw_start` holds that mutex for seconds (calibration). Whether the radio runs is also kept
//! outside it, so that a downlink or a stats read arriving meanwhile is told "not started" at
//! once instead of waiting for the start to end.

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sx1302_hal_sys as sys;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum HalError {
    #[error("{call} failed (returned {code})")]
    Call { call: &'static str, code: i32 },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("the concentrator is already claimed by this process")]
    AlreadyClaimed,
    /// Refused by the wrapper without calling the library: V2.1.0 "succeeds" on some calls
    /// while the concentrator is stopped (`lgw_get_instcnt` returns garbage) and prints an error
    /// line on each.
    #[error("the concentrator is not started")]
    NotStarted,
    /// The concentrator was restarted since the caller's reference (its counter was reset).
    #[error("the concentrator was restarted")]
    Restarted,
}

/// The concentrator's counter, tied to the start it belongs to: counter values of different
/// starts are unrelated (a restart resets the counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub counter: u32,
    /// Which start of the concentrator (1, 2, …).
    pub start: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeRate {
    Undefined,
    Cr45,
    Cr46,
    Cr47,
    Cr48,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modulation {
    Lora {
        spreading_factor: u32,
        bandwidth_hz: u32,
        code_rate: CodeRate,
    },
    Fsk {
        datarate: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrcStatus {
    Ok,
    Bad,
    Missing,
}

/// A received frame as the concentrator reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct RxPacket {
    pub freq_hz: u32,
    pub freq_offset_hz: i32,
    pub if_chain: u8,
    pub rf_chain: u8,
    pub modem_id: u8,
    pub crc: CrcStatus,
    /// 1 MHz counter at the end of the frame; wraps every ~71.6 min.
    pub count_us: u32,
    pub modulation: Modulation,
    /// Channel RSSI (dBm), with the board's offset applied by the HAL.
    pub rssi: f32,
    pub rssi_signal: f32,
    pub snr: f32,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    Immediate,
    /// At this value of the 1 MHz counter.
    Timestamped(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TxPacket {
    pub freq_hz: u32,
    pub mode: TxMode,
    pub rf_chain: u8,
    pub rf_power: i8,
    pub modulation: Modulation,
    pub invert_polarity: bool,
    pub preamble: u16,
    pub no_crc: bool,
    pub no_header: bool,
    pub freq_deviation_khz: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Off,
    Free,
    Scheduled,
    Emitting,
    Unknown,
}

/// What `lgw_send` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Accepted,
    /// Listen-before-talk found the channel busy.
    LbtNotAllowed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxGain {
    pub rf_power: i8,
    pub dig_gain: u8,
    pub pa_gain: u8,
    pub dac_gain: u8,
    pub mix_gain: u8,
    pub offset_i: i8,
    pub offset_q: i8,
    pub pwr_idx: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BoardConf {
    pub lorawan_public: bool,
    pub clksrc: u8,
    pub full_duplex: bool,
    /// SPI device, or the simulator file for the simulated concentrator.
    pub com_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RfChainConf {
    pub enable: bool,
    pub freq_hz: u32,
    pub rssi_offset: f32,
    pub rssi_tcomp: [f32; 5],
    pub tx_enable: bool,
    pub single_input_mode: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IfChainConf {
    Disabled,
    MultiSf {
        rf_chain: u8,
        offset_hz: i32,
    },
    LoraStd {
        rf_chain: u8,
        offset_hz: i32,
        bandwidth_hz: u32,
        spreading_factor: u32,
    },
    Fsk {
        rf_chain: u8,
        offset_hz: i32,
        bandwidth_hz: u32,
        datarate: u32,
    },
}

/// Everything set before `lgw_start`.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub board: BoardConf,
    pub rf_chains: [RfChainConf; 2],
    pub if_chains: Vec<IfChainConf>,
    /// Gain table of the TX RF chain, ascending power.
    pub tx_rf_chain: u8,
    pub tx_gains: Vec<TxGain>,
    /// Told to a HAL that asks for it (ChirpStack's fork) before `lgw_start`.
    pub temperature_sensor: Option<super::boards::TemperatureSensor>,
}

/// Packets read from the HAL per `lgw_receive` call (ChirpStack reads 8, Semtech up to 255).
pub const RX_BATCH: usize = 32;

struct Inner {
    rx: Vec<sys::lgw_pkt_rx_s>,
    started: bool,
    /// Successful starts so far: the identity of the current one while `started`.
    starts: u64,
}

impl Inner {
    fn running(&self) -> Result<(), HalError> {
        if self.started {
            Ok(())
        } else {
            Err(HalError::NotStarted)
        }
    }
}

pub struct Concentrator {
    inner: Mutex<Inner>,
    /// The running start's identity, 0 while stopped or starting: read without the HAL lock.
    running: AtomicU64,
}

static CLAIMED: AtomicBool = AtomicBool::new(false);

fn check(call: &'static str, code: i32) -> Result<(), HalError> {
    if code == sys::LGW_HAL_SUCCESS as i32 {
        Ok(())
    } else {
        Err(HalError::Call { call, code })
    }
}

fn bandwidth_code(hz: u32) -> Result<u8, HalError> {
    Ok(match hz {
        125_000 => sys::BW_125KHZ,
        250_000 => sys::BW_250KHZ,
        500_000 => sys::BW_500KHZ,
        _ => {
            return Err(HalError::Invalid {
                what: "bandwidth",
                why: format!("{hz} Hz"),
            })
        }
    } as u8)
}

fn bandwidth_hz(code: u8) -> Option<u32> {
    match code as u32 {
        sys::BW_125KHZ => Some(125_000),
        sys::BW_250KHZ => Some(250_000),
        sys::BW_500KHZ => Some(500_000),
        _ => None,
    }
}

fn code_rate_code(cr: CodeRate) -> u8 {
    (match cr {
        CodeRate::Undefined => sys::CR_UNDEFINED,
        CodeRate::Cr45 => sys::CR_LORA_4_5,
        CodeRate::Cr46 => sys::CR_LORA_4_6,
        CodeRate::Cr47 => sys::CR_LORA_4_7,
        CodeRate::Cr48 => sys::CR_LORA_4_8,
    }) as u8
}

fn code_rate(code: u8) -> CodeRate {
    match code as u32 {
        sys::CR_LORA_4_5 => CodeRate::Cr45,
        sys::CR_LORA_4_6 => CodeRate::Cr46,
        sys::CR_LORA_4_7 => CodeRate::Cr47,
        sys::CR_LORA_4_8 => CodeRate::Cr48,
        _ => CodeRate::Undefined,
    }
}

fn copy_path(dst: &mut [core::ffi::c_char; 64], path: &str) -> Result<(), HalError> {
    let bytes = path.as_bytes();
    if bytes.len() > 63 || bytes.contains(&0) {
        return Err(HalError::Invalid {
            what: "com_path",
            why: format!("{path:?} must be at most 63 bytes"),
        });
    }
    for (d, &b) in dst.iter_mut().zip(bytes) {
        *d = b as core::ffi::c_char;
    }
    dst[bytes.len()] = 0;
    Ok(())
}

impl TryFrom<&sys::lgw_pkt_rx_s> for RxPacket {
    type Error = String;

    fn try_from(p: &sys::lgw_pkt_rx_s) -> Result<Self, String> {
        let modulation = match p.modulation as u32 {
            sys::MOD_LORA => Modulation::Lora {
                spreading_factor: p.datarate,
                bandwidth_hz: bandwidth_hz(p.bandwidth)
                    .ok_or_else(|| format!("bandwidth code {}", p.bandwidth))?,
                code_rate: code_rate(p.coderate),
            },
            sys::MOD_FSK => Modulation::Fsk {
                datarate: p.datarate,
            },
            m => return Err(format!("modulation code {m}")),
        };
        let crc = match p.status as u32 {
            sys::STAT_CRC_OK => CrcStatus::Ok,
            sys::STAT_CRC_BAD => CrcStatus::Bad,
            sys::STAT_NO_CRC => CrcStatus::Missing,
            s => return Err(format!("status code {s}")),
        };
        let size = p.size as usize;
        if size > p.payload.len() {
            return Err(format!("size {size}"));
        }
        Ok(RxPacket {
            freq_hz: p.freq_hz,
            freq_offset_hz: p.freq_offset,
            if_chain: p.if_chain,
            rf_chain: p.rf_chain,
            modem_id: p.modem_id,
            crc,
            count_us: p.count_us,
            modulation,
            rssi: p.rssic,
            rssi_signal: p.rssis,
            snr: p.snr,
            payload: p.payload[..size].to_vec(),
        })
    }
}

impl TxPacket {
    fn to_c(&self) -> Result<sys::lgw_pkt_tx_s, HalError> {
        if self.payload.len() > 255 {
            return Err(HalError::Invalid {
                what: "payload",
                why: format!("{} bytes (255 at most)", self.payload.len()),
            });
        }
        let mut c = sys::lgw_pkt_tx_s {
            freq_hz: self.freq_hz,
            rf_chain: self.rf_chain,
            rf_power: self.rf_power,
            invert_pol: self.invert_polarity,
            preamble: self.preamble,
            no_crc: self.no_crc,
            no_header: self.no_header,
            f_dev: self.freq_deviation_khz,
            size: self.payload.len() as u16,
            ..Default::default()
        };
        match self.mode {
            TxMode::Immediate => c.tx_mode = sys::IMMEDIATE as u8,
            TxMode::Timestamped(at) => {
                c.tx_mode = sys::TIMESTAMPED as u8;
                c.count_us = at;
            }
        }
        match self.modulation {
            Modulation::Lora {
                spreading_factor,
                bandwidth_hz,
                code_rate,
            } => {
                if !(5..=12).contains(&spreading_factor) {
                    return Err(HalError::Invalid {
                        what: "spreading factor",
                        why: spreading_factor.to_string(),
                    });
                }
                c.modulation = sys::MOD_LORA as u8;
                c.datarate = spreading_factor;
                c.bandwidth = bandwidth_code(bandwidth_hz)?;
                c.coderate = code_rate_code(code_rate);
            }
            Modulation::Fsk { datarate } => {
                c.modulation = sys::MOD_FSK as u8;
                c.datarate = datarate;
            }
        }
        c.payload[..self.payload.len()].copy_from_slice(&self.payload);
        Ok(c)
    }
}

impl Concentrator {
    /// The process's one concentrator.
    pub fn claim() -> Result<Arc<Concentrator>, HalError> {
        if CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(HalError::AlreadyClaimed);
        }
        Ok(Arc::new(Concentrator {
            inner: Mutex::new(Inner {
                rx: vec![sys::lgw_pkt_rx_s::default(); RX_BATCH],
                started: false,
                starts: 0,
            }),
            running: AtomicU64::new(0),
        }))
    }

    /// The HAL lock, only if the radio runs: nobody waits behind a start to be refused.
    fn lock_running(&self) -> Result<MutexGuard<'_, Inner>, HalError> {
        if self.running.load(Ordering::Acquire) == 0 {
            return Err(HalError::NotStarted);
        }
        let g = self.lock();
        g.running()?;
        Ok(g)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves no Rust invariant broken; the HAL's own state is
        // re-established by stop/start.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the `lgw_*` symbols are linked against: "libloragw" or "simulator".
    pub fn linked() -> &'static str {
        sys::LINKED
    }

    /// Which HAL this binary contains, for `--version` and the first log line:
    /// `libloragw <version> <variant> (<LORAGW_DIR>)` or `simulated concentrator (…)`, the
    /// variant naming upstream V2.1.0 or ChirpStack's V2.1.0r9.
    pub fn describe_linked() -> String {
        // SAFETY: lgw_version_info only returns a pointer to a static string; it reads no
        // state and needs no started radio.
        let p = unsafe { sys::lgw_version_info() };
        let version = if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, static (checked above).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        let variant = super::diagnosis::Variant::of_build().describe();
        match sys::LINKED {
            "simulator" => format!("{} ({version}; {variant})", sys::SOURCE),
            _ => format!("libloragw {version} {variant} (from {})", sys::SOURCE),
        }
    }

    pub fn version(&self) -> String {
        // SAFETY: lgw_version_info returns a pointer to a static NUL-terminated string.
        let p = unsafe { sys::lgw_version_info() };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated, static (checked above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Applies every setting and starts the radio (calibration takes seconds on hardware).
    pub fn configure_and_start(&self, setup: &Setup) -> Result<(), HalError> {
        let mut g = self.lock();
        if g.started {
            return Err(HalError::Invalid {
                what: "state",
                why: "configure while started".into(),
            });
        }
        let mut board = sys::lgw_conf_board_s {
            lorawan_public: setup.board.lorawan_public,
            clksrc: setup.board.clksrc,
            full_duplex: setup.board.full_duplex,
            com_type: sys::lgw_com_type_t_LGW_COM_SPI,
            ..Default::default()
        };
        copy_path(&mut board.com_path, &setup.board.com_path)?;
        // SAFETY: `board` is a valid, initialised struct that outlives the call.
        check("lgw_board_setconf", unsafe {
            sys::lgw_board_setconf(&mut board)
        })?;

        for (i, rf) in setup.rf_chains.iter().enumerate() {
            let [a, b, c, d, e] = rf.rssi_tcomp;
            let mut conf = sys::lgw_conf_rxrf_s {
                enable: rf.enable,
                freq_hz: rf.freq_hz,
                rssi_offset: rf.rssi_offset,
                rssi_tcomp: sys::lgw_rssi_tcomp_s {
                    coeff_a: a,
                    coeff_b: b,
                    coeff_c: c,
                    coeff_d: d,
                    coeff_e: e,
                },
                type_: sys::lgw_radio_type_t_LGW_RADIO_TYPE_SX1250,
                tx_enable: rf.tx_enable,
                single_input_mode: rf.single_input_mode,
            };
            // SAFETY: valid struct; i < 2 = LGW_RF_CHAIN_NB.
            check("lgw_rxrf_setconf", unsafe {
                sys::lgw_rxrf_setconf(i as u8, &mut conf)
            })?;
        }

        if setup.if_chains.len() > sys::LGW_IF_CHAIN_NB as usize {
            return Err(HalError::Invalid {
                what: "if chains",
                why: format!("{} > 10", setup.if_chains.len()),
            });
        }
        for (i, ifc) in setup.if_chains.iter().enumerate() {
            let mut conf = sys::lgw_conf_rxif_s::default();
            match *ifc {
                IfChainConf::Disabled => {}
                IfChainConf::MultiSf {
                    rf_chain,
                    offset_hz,
                } => {
                    conf.enable = true;
                    conf.rf_chain = rf_chain;
                    conf.freq_hz = offset_hz;
                }
                IfChainConf::LoraStd {
                    rf_chain,
                    offset_hz,
                    bandwidth_hz,
                    spreading_factor,
                } => {
                    conf.enable = true;
                    conf.rf_chain = rf_chain;
                    conf.freq_hz = offset_hz;
                    conf.bandwidth = bandwidth_code(bandwidth_hz)?;
                    conf.datarate = spreading_factor;
                }
                IfChainConf::Fsk {
                    rf_chain,
                    offset_hz,
                    bandwidth_hz,
                    datarate,
                } => {
                    conf.enable = true;
                    conf.rf_chain = rf_chain;
                    conf.freq_hz = offset_hz;
                    conf.bandwidth = bandwidth_code(bandwidth_hz)?;
                    conf.datarate = datarate;
                }
            }
            // SAFETY: valid struct, the HAL may write defaults back into it (hence &mut); i < 10.
            check("lgw_rxif_setconf", unsafe {
                sys::lgw_rxif_setconf(i as u8, &mut conf)
            })?;
        }

        let mut demod = sys::lgw_conf_demod_s {
            multisf_datarate: 0xff,
        };
        // SAFETY: valid struct.
        check("lgw_demod_setconf", unsafe {
            sys::lgw_demod_setconf(&mut demod)
        })?;

        if setup.tx_gains.is_empty() || setup.tx_gains.len() > sys::TX_GAIN_LUT_SIZE_MAX as usize {
            return Err(HalError::Invalid {
                what: "tx gain table",
                why: format!("{} entries", setup.tx_gains.len()),
            });
        }
        // lgw_txgain_setconf does not bounds-check the chain: we do.
        if setup.tx_rf_chain as u32 >= sys::LGW_RF_CHAIN_NB {
            return Err(HalError::Invalid {
                what: "tx rf chain",
                why: setup.tx_rf_chain.to_string(),
            });
        }
        let mut lut = sys::lgw_tx_gain_lut_s {
            size: setup.tx_gains.len() as u8,
            ..Default::default()
        };
        for (dst, g) in lut.lut.iter_mut().zip(&setup.tx_gains) {
            *dst = sys::lgw_tx_gain_s {
                rf_power: g.rf_power,
                dig_gain: g.dig_gain,
                pa_gain: g.pa_gain,
                dac_gain: g.dac_gain,
                mix_gain: g.mix_gain,
                offset_i: g.offset_i,
                offset_q: g.offset_q,
                pwr_idx: g.pwr_idx,
            };
        }
        // SAFETY: valid struct; rf chain checked above.
        check("lgw_txgain_setconf", unsafe {
            sys::lgw_txgain_setconf(setup.tx_rf_chain, &mut lut)
        })?;

        if let Some(ts) = setup.temperature_sensor {
            let path = CString::new(ts.i2c_path).map_err(|_| HalError::Invalid {
                what: "i2c path",
                why: "contains a NUL byte".into(),
            })?;
            // SAFETY: `path` is NUL-terminated and outlives the call (the HAL copies it).
            match unsafe { sys::i2c_set_temperature_sensor(path.as_ptr(), ts.i2c_addr) } {
                Some((0, 0)) => tracing::debug!(
                    i2c = ts.i2c_path,
                    addr = ts.i2c_addr,
                    "temperature sensor location given to the HAL"
                ),
                Some(codes) => {
                    tracing::warn!(?codes, "the HAL refused the temperature sensor location")
                }
                // Upstream V2.1.0 finds the sensor by itself.
                None => {}
            }
        }
        // SAFETY: no arguments; configuration done above.
        check("lgw_start", unsafe { sys::lgw_start() })?;
        g.started = true;
        g.starts += 1;
        self.running.store(g.starts, Ordering::Release);
        Ok(())
    }

    /// The current start's identity, or None while the concentrator is stopped.
    pub fn running(&self) -> Option<u64> {
        match self.running.load(Ordering::Acquire) {
            0 => None,
            start => Some(start),
        }
    }

    pub fn stop(&self) -> Result<(), HalError> {
        self.running.store(0, Ordering::Release);
        let mut g = self.lock();
        g.started = false;
        // SAFETY: no arguments; safe to call whether or not started.
        check("lgw_stop", unsafe { sys::lgw_stop() })
    }

    /// Appends the frames waiting in the concentrator to `out`; returns how many were read and
    /// how many were malformed (and dropped). A full batch means more may be waiting.
    pub fn receive(&self, out: &mut Vec<RxPacket>) -> Result<(usize, usize), HalError> {
        let mut g = self.lock_running()?;
        let n = g.rx.len().min(255) as u8;
        // SAFETY: `rx` holds `n` initialised, writable lgw_pkt_rx_s.
        let got = unsafe { sys::lgw_receive(n, g.rx.as_mut_ptr()) };
        if got < 0 || got > n as i32 {
            return Err(HalError::Call {
                call: "lgw_receive",
                code: got,
            });
        }
        let mut malformed = 0;
        for p in &g.rx[..got as usize] {
            match RxPacket::try_from(p) {
                Ok(pkt) => out.push(pkt),
                Err(why) => {
                    malformed += 1;
                    tracing::warn!(%why, "dropped a malformed frame from the concentrator");
                }
            }
        }
        Ok((got as usize, malformed))
    }

    /// Hands a packet over, only to the start its timing was computed against.
    pub fn send(&self, pkt: &TxPacket, start: u64) -> Result<SendOutcome, HalError> {
        let mut c = pkt.to_c()?;
        let g = self.lock_running()?;
        if g.starts != start {
            return Err(HalError::Restarted);
        }
        // SAFETY: `c` is a valid struct the HAL may rewrite (preamble), hence &mut.
        match unsafe { sys::lgw_send(&mut c) } {
            0 => Ok(SendOutcome::Accepted),
            1 => Ok(SendOutcome::LbtNotAllowed),
            code => Err(HalError::Call {
                call: "lgw_send",
                code,
            }),
        }
    }

    pub fn tx_status(&self, rf_chain: u8) -> Result<TxStatus, HalError> {
        let mut code = 0u8;
        let _g = self.lock_running()?;
        // SAFETY: `code` is a writable byte.
        check("lgw_status", unsafe {
            sys::lgw_status(rf_chain, sys::TX_STATUS as u8, &mut code)
        })?;
        Ok(match code as u32 {
            sys::TX_OFF => TxStatus::Off,
            sys::TX_FREE => TxStatus::Free,
            sys::TX_SCHEDULED => TxStatus::Scheduled,
            sys::TX_EMITTING => TxStatus::Emitting,
            _ => TxStatus::Unknown,
        })
    }

    /// The 1 MHz counter now.
    pub fn counter(&self) -> Result<u32, HalError> {
        self.clock().map(|c| c.counter)
    }

    /// The 1 MHz counter now, with the start it belongs to.
    pub fn clock(&self) -> Result<Clock, HalError> {
        let mut v = 0u32;
        let g = self.lock_running()?;
        // SAFETY: `v` is a writable u32.
        check("lgw_get_instcnt", unsafe { sys::lgw_get_instcnt(&mut v) })?;
        Ok(Clock {
            counter: v,
            start: g.starts,
        })
    }

    pub fn eui(&self) -> Result<u64, HalError> {
        let mut v = 0u64;
        let _g = self.lock_running()?;
        // SAFETY: `v` is a writable u64.
        check("lgw_get_eui", unsafe { sys::lgw_get_eui(&mut v) })?;
        Ok(v)
    }

    pub fn temperature(&self) -> Result<f32, HalError> {
        let mut v = 0f32;
        let _g = self.lock_running()?;
        // SAFETY: `v` is a writable f32.
        check("lgw_get_temperature", unsafe {
            sys::lgw_get_temperature(&mut v)
        })?;
        Ok(v)
    }

    /// Time on air in ms, as the HAL computes it.
    pub fn time_on_air_ms(&self, pkt: &TxPacket) -> Result<u32, HalError> {
        let c = pkt.to_c()?;
        let _g = self.lock_running()?;
        // SAFETY: `c` is a valid struct, only read.
        Ok(unsafe { sys::lgw_time_on_air(&c) })
    }
}
