//! The Semtech UDP protocol (version 2) on the wire: datagrams in, checked field by field;
//! answers out. Pure (no socket, no clock), so that the whole parser is fuzzed.
//!
//! Guarantees: any byte string gives a `Datagram` or a `Reject` with its cause, never a
//! panic; an accepted rxpk has physically possible values (frequency, data rate, RSSI, SNR,
//! size matching its data), so nothing downstream sees garbage; one bad rxpk in a PUSH_DATA
//! costs that rxpk only.

use std::time::SystemTime;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::radio::hal::{CodeRate, CrcStatus, Modulation, RxPacket, TxMode, TxPacket};

pub const VERSION: u8 = 2;
pub const PUSH_DATA: u8 = 0x00;
pub const PUSH_ACK: u8 = 0x01;
pub const PULL_DATA: u8 = 0x02;
pub const PULL_RESP: u8 = 0x03;
pub const PULL_ACK: u8 = 0x04;
pub const TX_ACK: u8 = 0x05;

/// rxpk per PUSH_DATA at most (lora_pkt_fwd sends up to 16 per fetch, ChirpStack's
/// concentratord bridge one).
pub const MAX_RXPK: usize = 256;
/// A LoRa PHYPayload is at most 255 bytes.
pub const MAX_PAYLOAD: usize = 255;
/// Strings in an rxpk (time, datr, codr, modu) are short; longer ones are hostile.
const MAX_STRING: usize = 64;

/// Why a datagram, or one rxpk of it, was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Shorter than its type's header.
    Truncated,
    /// Byte 0 is not protocol version 2.
    Version,
    /// A type a forwarder does not send (or an unknown one).
    UnknownType,
    /// Not JSON, or JSON of the wrong shape.
    Json,
    /// More rxpk than `MAX_RXPK`, a payload over 255 bytes, a string field over 64 bytes.
    Oversized,
    /// Values no radio produces (frequency, data rate, RSSI, SNR, CRC status, size).
    Impossible,
    /// A gateway EUI not in `radio.semtech_udp.gateway_euis`.
    UnknownEui,
}

impl Reject {
    pub const ALL: [Reject; 7] = [
        Reject::Truncated,
        Reject::Version,
        Reject::UnknownType,
        Reject::Json,
        Reject::Oversized,
        Reject::Impossible,
        Reject::UnknownEui,
    ];

    /// As in the stats' `udp_rejected_<name>_total` and the log.
    pub fn name(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::Version => "version",
            Reject::UnknownType => "unknown_type",
            Reject::Json => "json",
            Reject::Oversized => "oversized",
            Reject::Impossible => "impossible",
            Reject::UnknownEui => "unknown_eui",
        }
    }
}

pub type Refused = (Reject, String);

fn refuse<T>(r: Reject, why: impl Into<String>) -> Result<T, Refused> {
    Err((r, why.into()))
}

/// A frame as the forwarder reported it: the radio's fields, and the forwarder's timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct Rx {
    /// `count_us` is the forwarder's `tmst`.
    pub packet: RxPacket,
    /// `time`: the GPS-derived UTC time of reception (only with a GPS).
    pub time: Option<SystemTime>,
    /// `tmms`: GPS time of reception, ms since the GPS epoch.
    pub tmms: Option<u64>,
    /// `ftime`: ns since the last PPS (fine timestamp).
    pub ftime_ns: Option<u32>,
    /// `brd`: the concentrator board of a multi-board gateway.
    pub board: u32,
}

/// The forwarder's `stat` object (what it counted since its last one).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Stat {
    pub time: Option<String>,
    pub lati: Option<f64>,
    pub long: Option<f64>,
    pub alti: Option<f64>,
    #[serde(default)]
    pub rxnb: u32,
    #[serde(default)]
    pub rxok: u32,
    #[serde(default)]
    pub rxfw: u32,
    pub ackr: Option<f64>,
    #[serde(default)]
    pub dwnb: u32,
    #[serde(default)]
    pub txnb: u32,
    pub temp: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Datagram {
    PushData {
        token: u16,
        eui: u64,
        /// Each rxpk, or why it was refused.
        rxpk: Vec<Result<Rx, Refused>>,
        /// A bad `stat` costs itself only, not the frames beside it.
        stat: Option<Result<Stat, Refused>>,
    },
    PullData {
        token: u16,
        eui: u64,
    },
    TxAck {
        token: u16,
        eui: u64,
        /// `None`: sent (no JSON, `"NONE"`, or a warning only); else the forwarder's error.
        error: Option<String>,
    },
}

impl Datagram {
    pub fn eui(&self) -> u64 {
        match self {
            Datagram::PushData { eui, .. }
            | Datagram::PullData { eui, .. }
            | Datagram::TxAck { eui, .. } => *eui,
        }
    }
}

#[derive(Deserialize)]
struct PushBody<'a> {
    #[serde(borrow, default)]
    rxpk: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    stat: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Datr {
    Lora(String),
    Fsk(f64),
}

#[derive(Deserialize)]
struct Rsig {
    #[serde(default)]
    chan: Option<u8>,
    rssic: Option<f64>,
    rssis: Option<f64>,
    lsnr: Option<f64>,
}

#[derive(Deserialize)]
struct RxpkWire {
    time: Option<String>,
    tmms: Option<u64>,
    tmst: u32,
    ftime: Option<u32>,
    freq: f64,
    chan: Option<u8>,
    rfch: u8,
    mid: Option<u8>,
    brd: Option<u32>,
    stat: i8,
    modu: String,
    datr: Datr,
    codr: Option<String>,
    rssi: Option<f64>,
    rssis: Option<f64>,
    lsnr: Option<f64>,
    foff: Option<i64>,
    size: u32,
    data: String,
    rsig: Option<Vec<Rsig>>,
}

#[derive(Deserialize)]
struct TxAckBody {
    txpk_ack: Option<TxpkAck>,
}

#[derive(Deserialize)]
struct TxpkAck {
    error: Option<String>,
}

fn header(b: &[u8], len: usize) -> Result<(u16, u64), Refused> {
    if b.len() < len {
        return refuse(
            Reject::Truncated,
            format!("{} bytes, its header needs {len}", b.len()),
        );
    }
    let token = u16::from_be_bytes([b[1], b[2]]);
    let eui = if len >= 12 {
        u64::from_be_bytes(b[4..12].try_into().expect("8 bytes"))
    } else {
        0
    };
    Ok((token, eui))
}

/// Reads one datagram from a forwarder.
pub fn parse(b: &[u8]) -> Result<Datagram, Refused> {
    if b.len() < 4 {
        return refuse(Reject::Truncated, format!("{} bytes", b.len()));
    }
    if b[0] != VERSION {
        return refuse(
            Reject::Version,
            format!(
                "protocol version {} (only {VERSION}: lora_pkt_fwd of sx1302_hal, packet_forwarder 4.x)",
                b[0]
            ),
        );
    }
    match b[3] {
        PUSH_DATA => {
            let (token, eui) = header(b, 12)?;
            let body: PushBody = serde_json::from_slice(&b[12..])
                .map_err(|e| (Reject::Json, format!("PUSH_DATA body: {e}")))?;
            let raw = body.rxpk.unwrap_or_default();
            if raw.len() > MAX_RXPK {
                return refuse(
                    Reject::Oversized,
                    format!("{} rxpk in one PUSH_DATA (at most {MAX_RXPK})", raw.len()),
                );
            }
            let rxpk = raw.into_iter().map(|r| rx(r.get())).collect();
            let stat = body.stat.map(|s| {
                serde_json::from_str::<Stat>(s.get())
                    .map_err(|e| (Reject::Json, format!("stat: {e}")))
            });
            Ok(Datagram::PushData {
                token,
                eui,
                rxpk,
                stat,
            })
        }
        PULL_DATA => {
            let (token, eui) = header(b, 12)?;
            Ok(Datagram::PullData { token, eui })
        }
        TX_ACK => {
            let (token, eui) = header(b, 12)?;
            let rest = &b[12..];
            // Some forwarders end the datagram with a NUL or spaces; no JSON at all is success.
            let trimmed: &[u8] = {
                let end = rest
                    .iter()
                    .rposition(|c| !c.is_ascii_whitespace() && *c != 0)
                    .map_or(0, |i| i + 1);
                &rest[..end]
            };
            let error = if trimmed.is_empty() {
                None
            } else {
                let body: TxAckBody = serde_json::from_slice(trimmed)
                    .map_err(|e| (Reject::Json, format!("TX_ACK body: {e}")))?;
                match body.txpk_ack.and_then(|a| a.error) {
                    Some(e) if e.len() > MAX_STRING => {
                        return refuse(Reject::Oversized, "TX_ACK error of over 64 bytes")
                    }
                    Some(e) if e != "NONE" => Some(e),
                    _ => None,
                }
            };
            Ok(Datagram::TxAck { token, eui, error })
        }
        other => refuse(
            Reject::UnknownType,
            format!("type 0x{other:02x} (a forwarder sends 0x00, 0x02, 0x05)"),
        ),
    }
}

fn impossible<T>(why: impl Into<String>) -> Result<T, Refused> {
    refuse(Reject::Impossible, why)
}

/// "SF7BW125" → (7, 125 000).
fn lora_datr(s: &str) -> Option<(u32, u32)> {
    let rest = s.strip_prefix("SF")?;
    let (sf, bw) = rest.split_once("BW")?;
    let sf: u32 = sf.parse().ok()?;
    let bw: u32 = bw.parse().ok()?;
    let bw_hz = match bw {
        125 | 250 | 500 => bw * 1000,
        _ => return None,
    };
    (5..=12).contains(&sf).then_some((sf, bw_hz))
}

fn code_rate(s: Option<&str>) -> Option<CodeRate> {
    Some(match s {
        Some("4/5") => CodeRate::Cr45,
        Some("4/6") | Some("2/3") => CodeRate::Cr46,
        Some("4/7") => CodeRate::Cr47,
        Some("4/8") | Some("1/2") => CodeRate::Cr48,
        Some("OFF") | None => CodeRate::Undefined,
        Some(_) => return None,
    })
}

fn in_range(v: f64, low: f64, high: f64) -> bool {
    v.is_finite() && v >= low && v <= high
}

/// One rxpk, checked.
fn rx(json: &str) -> Result<Rx, Refused> {
    let w: RxpkWire =
        serde_json::from_str(json).map_err(|e| (Reject::Json, format!("rxpk: {e}")))?;
    for (name, s) in [
        ("time", w.time.as_deref()),
        ("modu", Some(w.modu.as_str())),
        ("codr", w.codr.as_deref()),
        (
            "datr",
            match &w.datr {
                Datr::Lora(s) => Some(s.as_str()),
                Datr::Fsk(_) => None,
            },
        ),
    ] {
        if s.is_some_and(|s| s.len() > MAX_STRING) {
            return refuse(Reject::Oversized, format!("rxpk {name} of over 64 bytes"));
        }
    }
    // Base64 of 255 bytes is 340 characters.
    if w.data.len() > 344 || w.size as usize > MAX_PAYLOAD {
        return refuse(
            Reject::Oversized,
            format!(
                "rxpk of {} bytes (a LoRa frame is at most {MAX_PAYLOAD})",
                w.size.max(w.data.len() as u32 * 3 / 4)
            ),
        );
    }
    let payload = base64::engine::general_purpose::STANDARD
        .decode(w.data.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(w.data.as_bytes()))
        .map_err(|e| (Reject::Json, format!("rxpk data is not base64: {e}")))?;
    if payload.is_empty() {
        return impossible("rxpk without data (size 0)");
    }
    if payload.len() != w.size as usize {
        return impossible(format!(
            "rxpk size {} but its data holds {} bytes",
            w.size,
            payload.len()
        ));
    }
    // What the SX1250/SX1257/SX1255 radios can tune (137-1020 MHz).
    if !in_range(w.freq, 137.0, 1020.0) {
        return impossible(format!("rxpk frequency {} MHz", w.freq));
    }
    let freq_hz = (w.freq * 1e6).round() as u32;
    let modulation = match (w.modu.as_str(), &w.datr) {
        ("LORA", Datr::Lora(d)) => {
            let Some((spreading_factor, bandwidth_hz)) = lora_datr(d) else {
                return impossible(format!("rxpk LoRa data rate {d:?}"));
            };
            let Some(code_rate) = code_rate(w.codr.as_deref()) else {
                return impossible(format!("rxpk code rate {:?}", w.codr));
            };
            Modulation::Lora {
                spreading_factor,
                bandwidth_hz,
                code_rate,
            }
        }
        ("FSK", Datr::Fsk(rate)) if in_range(*rate, 500.0, 300_000.0) => Modulation::Fsk {
            datarate: *rate as u32,
        },
        (m, _) => return impossible(format!("rxpk modulation {m:?} with this data rate")),
    };
    let crc = match w.stat {
        1 => CrcStatus::Ok,
        -1 => CrcStatus::Bad,
        0 => CrcStatus::Missing,
        s => return impossible(format!("rxpk CRC status {s}")),
    };
    if w.rfch > 1 {
        return impossible(format!("rxpk RF chain {}", w.rfch));
    }
    // IF chains 0-9 on an SX1301/SX1302; boards of a multi-board gateway, a few.
    if w.chan.is_some_and(|c| c > 9) || w.brd.is_some_and(|b| b > 255) {
        return impossible(format!("rxpk IF chain {:?} / board {:?}", w.chan, w.brd));
    }
    // SX1302 v2 forwarders put the radio figures at the top; multi-antenna SX1301 ones in rsig.
    let first = w.rsig.as_ref().and_then(|r| r.first());
    let rssi = w.rssi.or_else(|| first.and_then(|r| r.rssic));
    let Some(rssi) = rssi else {
        return impossible("rxpk without rssi");
    };
    let rssis = w
        .rssis
        .or_else(|| first.and_then(|r| r.rssis))
        .unwrap_or(rssi);
    let snr = w.lsnr.or_else(|| first.and_then(|r| r.lsnr));
    // Every LoRa frame has an SNR; FSK has none.
    let snr = match (snr, &modulation) {
        (Some(v), _) => v,
        (None, Modulation::Fsk { .. }) => 0.0,
        (None, Modulation::Lora { .. }) => return impossible("LoRa rxpk without lsnr"),
    };
    if !in_range(rssi, -200.0, 20.0) || !in_range(rssis, -200.0, 20.0) {
        return impossible(format!("rxpk RSSI {rssi} / {rssis} dBm"));
    }
    if !in_range(snr, -50.0, 50.0) {
        return impossible(format!("rxpk SNR {snr} dB"));
    }
    let foff = w.foff.unwrap_or(0);
    if foff.unsigned_abs() > 1_000_000 {
        return impossible(format!("rxpk frequency offset {foff} Hz"));
    }
    // A malformed or implausible time (outside 2000-2100) is the GPS's problem, not the
    // frame's: the frame keeps its arrival time.
    let plausible = |t: &SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| (946_684_800..4_102_444_800).contains(&d.as_secs()))
    };
    let time = w
        .time
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .filter(plausible);
    Ok(Rx {
        packet: RxPacket {
            freq_hz,
            freq_offset_hz: foff as i32,
            if_chain: w.chan.or_else(|| first.and_then(|r| r.chan)).unwrap_or(0),
            rf_chain: w.rfch,
            modem_id: w.mid.unwrap_or(0),
            crc,
            count_us: w.tmst,
            modulation,
            rssi: rssi as f32,
            rssi_signal: rssis as f32,
            snr: snr as f32,
            payload,
        },
        time,
        // GPS milliseconds up to the year 2296.
        tmms: w.tmms.filter(|t| *t < 10_000_000_000_000),
        ftime_ns: w.ftime.filter(|f| *f < 1_000_000_000),
        board: w.brd.unwrap_or(0),
    })
}

/// PUSH_ACK or PULL_ACK: the token echoed.
pub fn ack(kind: u8, token: u16) -> [u8; 4] {
    let t = token.to_be_bytes();
    [VERSION, t[0], t[1], kind]
}

/// The forwarder's TX_ACK error as a ChirpStack status.
pub fn tx_ack_status(error: Option<&str>) -> chirpstack_api::gw::TxAckStatus {
    use chirpstack_api::gw::TxAckStatus as S;
    match error {
        None => S::Ok,
        Some("TOO_LATE") => S::TooLate,
        Some("TOO_EARLY") => S::TooEarly,
        Some("COLLISION_PACKET") => S::CollisionPacket,
        Some("COLLISION_BEACON") => S::CollisionBeacon,
        Some("TX_FREQ") => S::TxFreq,
        Some("TX_POWER") => S::TxPower,
        Some("GPS_UNLOCKED") => S::GpsUnlocked,
        Some(_) => S::InternalError,
    }
}

fn datr(m: &Modulation) -> serde_json::Value {
    match *m {
        Modulation::Lora {
            spreading_factor,
            bandwidth_hz,
            ..
        } => format!("SF{spreading_factor}BW{}", bandwidth_hz / 1000).into(),
        Modulation::Fsk { datarate } => datarate.into(),
    }
}

/// A PULL_RESP carrying `p`: `imme` for a packet to go now (Class C), else `tmst` on the
/// forwarder's counter. `powe` is the EIRP in dBm (the forwarder takes off its antenna gain).
pub fn pull_resp(token: u16, p: &TxPacket) -> Vec<u8> {
    let mut txpk = serde_json::Map::new();
    match p.mode {
        TxMode::Immediate => {
            txpk.insert("imme".into(), true.into());
        }
        TxMode::Timestamped(t) => {
            txpk.insert("imme".into(), false.into());
            txpk.insert("tmst".into(), t.into());
        }
    }
    // MHz with 6 decimals: exact to the Hz, as the forwarder reads it back.
    let mhz = format!("{}.{:06}", p.freq_hz / 1_000_000, p.freq_hz % 1_000_000);
    txpk.insert(
        "freq".into(),
        serde_json::Value::Number(mhz.parse().expect("a decimal number")),
    );
    txpk.insert("rfch".into(), p.rf_chain.into());
    txpk.insert("powe".into(), p.rf_power.into());
    match p.modulation {
        Modulation::Lora { code_rate, .. } => {
            txpk.insert("modu".into(), "LORA".into());
            txpk.insert(
                "codr".into(),
                match code_rate {
                    CodeRate::Cr46 => "4/6",
                    CodeRate::Cr47 => "4/7",
                    CodeRate::Cr48 => "4/8",
                    CodeRate::Cr45 | CodeRate::Undefined => "4/5",
                }
                .into(),
            );
            txpk.insert("ipol".into(), p.invert_polarity.into());
        }
        Modulation::Fsk { .. } => {
            txpk.insert("modu".into(), "FSK".into());
            txpk.insert(
                "fdev".into(),
                (u32::from(p.freq_deviation_khz) * 1000).into(),
            );
        }
    }
    txpk.insert("datr".into(), datr(&p.modulation));
    // 0 is "not given": left out, the forwarder uses LoRaWAN's 8 symbols (it would read 0 as
    // its minimum, 6).
    if p.preamble > 0 {
        txpk.insert("prea".into(), p.preamble.into());
    }
    txpk.insert("ncrc".into(), p.no_crc.into());
    txpk.insert("size".into(), p.payload.len().into());
    txpk.insert(
        "data".into(),
        base64::engine::general_purpose::STANDARD
            .encode(&p.payload)
            .into(),
    );
    let body = serde_json::json!({ "txpk": txpk });
    let t = token.to_be_bytes();
    let mut out = vec![VERSION, t[0], t[1], PULL_RESP];
    out.extend(serde_json::to_vec(&body).expect("JSON of plain values"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(json: &str) -> Vec<u8> {
        let mut b = vec![2, 0x12, 0x34, PUSH_DATA];
        b.extend(0x0016c001ff10d3f6u64.to_be_bytes());
        b.extend(json.as_bytes());
        b
    }

    const RXPK: &str = r#"{"time":"2013-03-31T16:21:17.528002Z","tmst":3512348611,"chan":2,"rfch":0,"freq":866.349812,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/6","rssi":-35,"lsnr":5.1,"size":32,"data":"-DS4CGaDCdG+48eJNM3Vai-zDpsR71Pn9CPA9uCON84"}"#;

    #[test]
    fn the_protocol_documents_example_is_read_whole() {
        // PROTOCOL.TXT's example, with its URL-safe base64 made standard.
        let rxpk = RXPK.replace(
            "-DS4CGaDCdG+48eJNM3Vai-zDpsR71Pn9CPA9uCON84",
            "+DS4CGaDCdG+48eJNM3Vai+zDpsR71Pn9CPA9uCON84",
        );
        let d = parse(&push(&format!(r#"{{"rxpk":[{rxpk}],"stat":{{"time":"2014-01-12 08:59:28 GMT","lati":46.24,"long":3.2523,"alti":145,"rxnb":2,"rxok":2,"rxfw":2,"ackr":100.0,"dwnb":2,"txnb":2}}}}"#))).unwrap();
        let Datagram::PushData {
            token,
            eui,
            rxpk,
            stat,
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!((token, eui), (0x1234, 0x0016c001ff10d3f6));
        let rx = rxpk[0].as_ref().unwrap();
        assert_eq!(rx.packet.freq_hz, 866_349_812);
        assert_eq!(rx.packet.count_us, 3_512_348_611);
        assert_eq!(rx.packet.payload.len(), 32);
        assert_eq!(rx.packet.if_chain, 2);
        assert_eq!(
            rx.packet.modulation,
            Modulation::Lora {
                spreading_factor: 7,
                bandwidth_hz: 125_000,
                code_rate: CodeRate::Cr46
            }
        );
        let t = rx.time.unwrap();
        assert_eq!(
            humantime::format_rfc3339_micros(t).to_string(),
            "2013-03-31T16:21:17.528002Z"
        );
        assert_eq!(stat.unwrap().unwrap().lati, Some(46.24));
    }

    #[test]
    fn each_bad_rxpk_costs_itself_only() {
        let good = RXPK.replace(
            "-DS4CGaDCdG+48eJNM3Vai-zDpsR71Pn9CPA9uCON84",
            "+DS4CGaDCdG+48eJNM3Vai+zDpsR71Pn9CPA9uCON84",
        );
        let cases = [
            (good.replace("866.349812", "2400.0"), Reject::Impossible),
            (good.replace("SF7BW125", "SF13BW125"), Reject::Impossible),
            (
                good.replace("\"size\":32", "\"size\":31"),
                Reject::Impossible,
            ),
            (good.replace("\"stat\":1", "\"stat\":7"), Reject::Impossible),
            (good.replace("-35", "35"), Reject::Impossible),
            (
                good.replace("\"tmst\":3512348611", "\"tmst\":\"x\""),
                Reject::Json,
            ),
            (good.replace("4/6", &"4".repeat(100)), Reject::Oversized),
            (
                good.replace("\"size\":32", "\"size\":0")
                    .replace("+DS4CGaDCdG+48eJNM3Vai+zDpsR71Pn9CPA9uCON84", ""),
                Reject::Impossible,
            ),
            (
                good.replace("\"chan\":2", "\"chan\":200"),
                Reject::Impossible,
            ),
            (good.replace(",\"lsnr\":5.1", ""), Reject::Impossible),
        ];
        let body = format!(
            r#"{{"rxpk":[{},{good}]}}"#,
            cases
                .iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let Datagram::PushData { rxpk, .. } = parse(&push(&body)).unwrap() else {
            panic!()
        };
        for (i, (_, why)) in cases.iter().enumerate() {
            assert_eq!(rxpk[i].as_ref().unwrap_err().0, *why, "case {i}");
        }
        assert!(rxpk.last().unwrap().is_ok());
    }

    /// What a GPS without a fix or a confused forwarder writes is left out, not published.
    #[test]
    fn implausible_times_are_dropped_and_a_bad_stat_costs_only_itself() {
        let good = RXPK.replace(
            "-DS4CGaDCdG+48eJNM3Vai-zDpsR71Pn9CPA9uCON84",
            "+DS4CGaDCdG+48eJNM3Vai+zDpsR71Pn9CPA9uCON84",
        );
        let odd = good
            .replace("2013-03-31T16:21:17.528002Z", "9999-12-31T23:59:59.999999Z")
            .replace("\"tmst\"", "\"tmms\":18446744073709551615,\"tmst\"");
        let body = format!(r#"{{"rxpk":[{odd}],"stat":{{"alti":145.5,"rxnb":-1}}}}"#);
        let Datagram::PushData { rxpk, stat, .. } = parse(&push(&body)).unwrap() else {
            panic!()
        };
        let rx = rxpk[0].as_ref().unwrap();
        assert_eq!((rx.time, rx.tmms), (None, None));
        assert_eq!(stat.unwrap().unwrap_err().0, Reject::Json);
    }

    #[test]
    fn datagrams_refused_with_their_cause() {
        assert_eq!(parse(&[2, 0]).unwrap_err().0, Reject::Truncated);
        assert_eq!(
            parse(&[2, 0, 0, PULL_DATA, 1]).unwrap_err().0,
            Reject::Truncated
        );
        assert_eq!(
            parse(&[1, 0, 0, PULL_DATA, 0, 0, 0, 0, 0, 0, 0, 0])
                .unwrap_err()
                .0,
            Reject::Version
        );
        assert_eq!(
            parse(&[2, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err().0,
            Reject::UnknownType
        );
        assert_eq!(parse(&push("{\"rxpk\":[")).unwrap_err().0, Reject::Json);
        let many = format!("{{\"rxpk\":[{}]}}", vec!["{}"; 300].join(","));
        assert_eq!(parse(&push(&many)).unwrap_err().0, Reject::Oversized);
    }

    #[test]
    fn tx_acks_of_every_forwarder_generation() {
        let mut b = vec![2, 0xab, 0xcd, TX_ACK];
        b.extend(7u64.to_be_bytes());
        assert_eq!(
            parse(&b).unwrap(),
            Datagram::TxAck {
                token: 0xabcd,
                eui: 7,
                error: None
            }
        );
        let mut none = b.clone();
        none.extend(br#"{"txpk_ack":{"error":"NONE"}}"#);
        none.push(0);
        assert!(matches!(
            parse(&none).unwrap(),
            Datagram::TxAck { error: None, .. }
        ));
        let mut warn = b.clone();
        warn.extend(br#"{"txpk_ack":{"warn":"TX_POWER","value":14}}"#);
        assert!(matches!(
            parse(&warn).unwrap(),
            Datagram::TxAck { error: None, .. }
        ));
        let mut late = b.clone();
        late.extend(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
        let Datagram::TxAck { error, .. } = parse(&late).unwrap() else {
            panic!()
        };
        assert_eq!(
            tx_ack_status(error.as_deref()),
            chirpstack_api::gw::TxAckStatus::TooLate
        );
    }

    /// A random rxpk as a forwarder could write it, with the values it holds.
    fn random_rxpk(rng: &mut fastrand::Rng) -> (String, u32, u32, Vec<u8>) {
        use base64::Engine;
        let payload: Vec<u8> = (0..rng.usize(1..=255)).map(|_| rng.u8(..)).collect();
        let freq_hz = rng.u32(863_000_000..=870_000_000);
        let tmst = rng.u32(..);
        let json = format!(
            r#"{{"tmst":{tmst},"chan":{},"rfch":{},"freq":{}.{:06},"stat":{},"modu":"LORA","datr":"SF{}BW{}","codr":"4/{}","rssi":{},"lsnr":{}.{},"size":{},"data":"{}"}}"#,
            rng.u8(0..10),
            rng.u8(0..2),
            freq_hz / 1_000_000,
            freq_hz % 1_000_000,
            [1, -1, 0][rng.usize(0..3)],
            rng.u32(5..=12),
            [125, 250, 500][rng.usize(0..3)],
            rng.u32(5..=8),
            -rng.i32(0..=140),
            rng.i32(-20..=15),
            rng.u8(0..10),
            payload.len(),
            base64::engine::general_purpose::STANDARD.encode(&payload)
        );
        (json, freq_hz, tmst, payload)
    }

    /// Property: every random rxpk reads back exactly; any mangling of a datagram (bytes
    /// flipped, cut, inserted) or random bytes give a datagram or a cause, never a panic, and
    /// what is accepted holds only possible values.
    #[test]
    fn fuzzed_datagrams_never_panic_and_accepted_values_are_possible() {
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("FUZZ_SEED={seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        for round in 0..20_000 {
            let n = rng.usize(1..4);
            let rx: Vec<_> = (0..n).map(|_| random_rxpk(&mut rng)).collect();
            let body = format!(
                r#"{{"rxpk":[{}]}}"#,
                rx.iter()
                    .map(|r| r.0.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let good = push(&body);
            let Datagram::PushData { rxpk, .. } = parse(&good).unwrap() else {
                panic!("round {round}")
            };
            for (got, (_, freq_hz, tmst, payload)) in rxpk.iter().zip(&rx) {
                let got = got
                    .as_ref()
                    .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
                assert_eq!(
                    (got.packet.freq_hz, got.packet.count_us, &got.packet.payload),
                    (*freq_hz, *tmst, payload)
                );
            }
            let mut bad = good.clone();
            match rng.u8(0..4) {
                0 => {
                    for _ in 0..rng.usize(1..8) {
                        let i = rng.usize(0..bad.len());
                        bad[i] = rng.u8(..);
                    }
                }
                1 => bad.truncate(rng.usize(0..bad.len())),
                2 => {
                    let i = rng.usize(0..bad.len());
                    bad.insert(i, rng.u8(..));
                }
                _ => bad = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
            }
            if let Ok(Datagram::PushData { rxpk, .. }) = parse(&bad) {
                for r in rxpk.into_iter().flatten() {
                    let p = &r.packet;
                    assert!((137_000_000..=1_020_000_000).contains(&p.freq_hz));
                    assert!(p.payload.len() <= MAX_PAYLOAD);
                    assert!(p.rssi.is_finite() && (-200.0..=20.0).contains(&p.rssi));
                    assert!(p.snr.is_finite() && (-50.0..=50.0).contains(&p.snr));
                    assert!(p.rf_chain <= 1);
                }
            }
        }
    }

    #[test]
    fn a_pull_resp_reads_back_as_lora_pkt_fwd_reads_it() {
        let p = TxPacket {
            freq_hz: 869_525_000,
            mode: TxMode::Timestamped(4_000_000_123),
            rf_chain: 0,
            rf_power: 27,
            modulation: Modulation::Lora {
                spreading_factor: 9,
                bandwidth_hz: 125_000,
                code_rate: CodeRate::Cr45,
            },
            invert_polarity: true,
            preamble: 8,
            no_crc: true,
            no_header: false,
            freq_deviation_khz: 0,
            payload: vec![0x60, 1, 2, 3],
        };
        let b = pull_resp(0x0102, &p);
        assert_eq!(&b[..4], &[2, 1, 2, PULL_RESP]);
        let v: serde_json::Value = serde_json::from_slice(&b[4..]).unwrap();
        let t = &v["txpk"];
        assert_eq!(t["tmst"], 4_000_000_123u64);
        assert_eq!(t["freq"].as_f64().unwrap(), 869.525);
        assert_eq!(t["datr"], "SF9BW125");
        assert_eq!(t["powe"], 27);
        assert_eq!(t["ipol"], true);
        assert_eq!(t["size"], 4);
        assert_eq!(t["data"], "YAECAw==");
        // A preamble not given is left to the forwarder (LoRaWAN's 8), not sent as 0.
        let b = pull_resp(1, &TxPacket { preamble: 0, ..p });
        let v: serde_json::Value = serde_json::from_slice(&b[4..]).unwrap();
        assert!(v["txpk"].get("prea").is_none(), "{v}");
    }
}
