//! What the agent publishes: the event kinds, their topics, and their wire encoding.
//!
//! Every event is stamped with the store's sequence number when it is accepted, so the central
//! side can drop the duplicates that at-least-once delivery produces (`metadata["seq"]` in
//! ChirpStack messages, `"seq"` in lora-edge's own JSON notices).

use std::time::{SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
use chirpstack_api::pbjson_types::Timestamp;
use prost::Message;

use crate::config::Encoding;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Up = 1,
    Stats = 2,
    Ack = 3,
    /// lora-edge's own notices (evictions, store alarms), JSON on `event/buffer`.
    Buffer = 5,
    /// Pump-safety decisions (audit records), JSON on `event/rules`.
    Rules = 6,
    /// Answers to central pump requests, JSON on `event/pump`.
    Pump = 7,
    /// Answers to `command/exec`: ChirpStack's `GatewayCommandExecResponse` on `event/exec`.
    Exec = 8,
    /// Answers to lora-edge's own `command/ops` requests, JSON on `event/ops`.
    Ops = 9,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Up,
            2 => Kind::Stats,
            3 => Kind::Ack,
            5 => Kind::Buffer,
            6 => Kind::Rules,
            7 => Kind::Pump,
            8 => Kind::Exec,
            9 => Kind::Ops,
            _ => return None,
        })
    }

    /// Topic below `<prefix>/gateway/<id>/`.
    pub fn topic(self) -> &'static str {
        match self {
            Kind::Up => "event/up",
            Kind::Stats => "event/stats",
            Kind::Ack => "event/ack",
            Kind::Buffer => "event/buffer",
            Kind::Rules => "event/rules",
            Kind::Pump => "event/pump",
            Kind::Exec => "event/exec",
            Kind::Ops => "event/ops",
        }
    }
}

/// The record is a LoRaWAN join-request (answerable only within seconds).
pub const FLAG_JOIN_REQUEST: u8 = 0b1;

/// A ChirpStack message in the configured encoding (the proto3 JSON mapping for JSON).
pub fn wire<M: Message + serde::Serialize>(m: &M, e: Encoding) -> Vec<u8> {
    match e {
        Encoding::Protobuf => m.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(m).unwrap_or_default(),
    }
}

/// Told by the store's writer once the events sent before it are appended (`true`) or were
/// refused (`false`); never stored itself. The `semtech_udp` backend acknowledges a forwarder's
/// push with it.
#[derive(Clone)]
pub struct Receipt(std::sync::Arc<dyn Fn(bool) + Send + Sync>);

impl Receipt {
    pub fn new(f: impl Fn(bool) + Send + Sync + 'static) -> Receipt {
        Receipt(std::sync::Arc::new(f))
    }

    pub fn tell(&self, appended: bool) {
        (self.0)(appended)
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

#[derive(Debug, Clone)]
pub enum Body {
    Uplink(Box<gw::UplinkFrame>),
    Stats(Box<gw::GatewayStats>),
    Ack(gw::DownlinkTxAck),
    Notice(serde_json::Value),
    /// A pump-safety audit record.
    Rules(serde_json::Value),
    /// An answer to a central pump request.
    Pump(serde_json::Value),
    /// The outcome of a `command/exec` request.
    Exec(gw::GatewayCommandExecResponse),
    /// An answer to a `command/ops` request.
    Ops(serde_json::Value),
    /// Not an event: the writer tells it when what came before is appended.
    Receipt(Receipt),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub body: Body,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Event {
    pub fn kind(&self) -> Kind {
        match self.body {
            Body::Uplink(_) => Kind::Up,
            Body::Stats(_) => Kind::Stats,
            Body::Ack(_) => Kind::Ack,
            Body::Notice(_) => Kind::Buffer,
            Body::Rules(_) => Kind::Rules,
            Body::Pump(_) => Kind::Pump,
            Body::Exec(_) => Kind::Exec,
            Body::Ops(_) => Kind::Ops,
            // Never stored: the writer takes receipts out before numbering.
            Body::Receipt(_) => Kind::Buffer,
        }
    }

    pub fn flags(&self) -> u8 {
        match &self.body {
            // MType 000 in the MHDR.
            Body::Uplink(f) if f.phy_payload.first().is_some_and(|m| m >> 5 == 0) => {
                FLAG_JOIN_REQUEST
            }
            _ => 0,
        }
    }

    /// The form the store keeps: compact, and without the sequence number, which the store
    /// gives and `publishable` stamps.
    pub fn stored(self) -> Vec<u8> {
        match self.body {
            Body::Uplink(f) => StoredUplink::from_frame(*f, unix_ms(self.at)).encode_to_vec(),
            Body::Stats(s) => s.encode_to_vec(),
            Body::Ack(a) => a.encode_to_vec(),
            Body::Exec(r) => r.encode_to_vec(),
            Body::Notice(v) | Body::Rules(v) | Body::Pump(v) | Body::Ops(v) => {
                serde_json::to_vec(&v).unwrap_or_default()
            }
            Body::Receipt(_) => Vec::new(),
        }
    }
}

/// A stored body that cannot be turned back into a message.
#[derive(Debug, thiserror::Error)]
#[error("stored {kind:?} event unreadable: {why}")]
pub struct Unreadable {
    pub kind: Kind,
    pub why: String,
}

/// The bytes published for a stored event: the message rebuilt in the configured encoding and
/// stamped with `seq` (`metadata["seq"]`, or `"seq"` in notices).
pub fn publishable(
    kind: Kind,
    stored: &[u8],
    at_ms: u64,
    seq: u64,
    gateway_id: &str,
    encoding: Encoding,
) -> Result<Vec<u8>, Unreadable> {
    let bad = |why: String| Unreadable { kind, why };
    Ok(match kind {
        Kind::Up => {
            let s = StoredUplink::decode(stored).map_err(|e| bad(e.to_string()))?;
            let mut f = s.into_frame(at_ms);
            if let Some(rx) = f.rx_info.as_mut() {
                rx.gateway_id = gateway_id.to_string();
                rx.uplink_id = uplink_id(seq);
                rx.metadata.insert("seq".into(), seq.to_string());
            }
            wire(&f, encoding)
        }
        Kind::Stats => {
            let mut s = gw::GatewayStats::decode(stored).map_err(|e| bad(e.to_string()))?;
            s.metadata.insert("seq".into(), seq.to_string());
            wire(&s, encoding)
        }
        Kind::Ack => {
            let a = gw::DownlinkTxAck::decode(stored).map_err(|e| bad(e.to_string()))?;
            wire(&a, encoding)
        }
        Kind::Exec => {
            let r =
                gw::GatewayCommandExecResponse::decode(stored).map_err(|e| bad(e.to_string()))?;
            wire(&r, encoding)
        }
        Kind::Buffer | Kind::Rules | Kind::Pump | Kind::Ops => {
            let mut v: serde_json::Value =
                serde_json::from_slice(stored).map_err(|e| bad(e.to_string()))?;
            let o = v
                .as_object_mut()
                .ok_or_else(|| bad("not a JSON object".into()))?;
            o.insert("seq".into(), seq.into());
            serde_json::to_vec(&v).unwrap_or_default()
        }
    })
}

/// The `uplink_id` of the uplink stored as `seq`: the same for every copy of a replayed frame,
/// never 0 (ChirpStack reads 0 as "not set").
fn uplink_id(seq: u64) -> u32 {
    (seq as u32).max(1)
}

/// An uplink as the store keeps it: the fields `uplink::uplink_frame` fills in, without the
/// gateway id (the same in every record) or the uplink id (from the seq), with the reception
/// time relative to the record's millisecond timestamp, and the bandwidth in kHz when it is
/// whole. About 40 bytes of metadata instead of the ~120 of a published `UplinkFrame`, which is
/// what keeps the store within 2.5 disk bytes per PHYPayload byte (BENCHMARKS.md). Protobuf, so
/// that a field added later stays readable.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredUplink {
    #[prost(bytes = "vec", tag = "1")]
    phy_payload: Vec<u8>,
    #[prost(fixed32, tag = "2")]
    frequency: u32,
    #[prost(uint32, tag = "3")]
    lora_bandwidth: u32,
    #[prost(uint32, tag = "4")]
    lora_spreading_factor: u32,
    #[prost(int32, tag = "5")]
    lora_code_rate: i32,
    #[prost(uint32, tag = "6")]
    fsk_datarate: u32,
    #[prost(sint32, tag = "7")]
    rssi: i32,
    #[prost(float, tag = "8")]
    snr: f32,
    #[prost(uint32, tag = "9")]
    channel: u32,
    #[prost(uint32, tag = "10")]
    rf_chain: u32,
    #[prost(bytes = "vec", tag = "11")]
    context: Vec<u8>,
    #[prost(int32, tag = "12")]
    crc_status: i32,
    /// `gw_time` less the record's millisecond timestamp, in ns; absent when there was none.
    #[prost(uint32, optional, tag = "14")]
    gw_time_ns_past_ms: Option<u32>,
    #[prost(uint32, tag = "15")]
    board: u32,
    #[prost(uint32, tag = "16")]
    antenna: u32,
    /// Instead of `lora_bandwidth` when the bandwidth is whole kHz (always, on an SX1302).
    #[prost(uint32, tag = "17")]
    lora_bandwidth_khz: u32,
    /// `gw_time` in full when it is not the record's time (a packet forwarder's GPS time).
    #[prost(sint64, optional, tag = "18")]
    gw_time_s: Option<i64>,
    #[prost(uint32, optional, tag = "19")]
    gw_time_nanos: Option<u32>,
    /// `time_since_gps_epoch` in ms (a packet forwarder's `tmms`).
    #[prost(uint64, optional, tag = "20")]
    gps_ms: Option<u64>,
    /// The fine timestamp: ns into `gps_ms`'s second.
    #[prost(uint32, optional, tag = "21")]
    fine_ns: Option<u32>,
}

impl StoredUplink {
    fn from_frame(f: gw::UplinkFrame, at_ms: u64) -> StoredUplink {
        let tx = f.tx_info.unwrap_or_default();
        let rx = f.rx_info.unwrap_or_default();
        let same_ms = rx.gw_time.as_ref().is_some_and(|t| {
            t.seconds >= 0
                && t.nanos >= 0
                && t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000 == at_ms
        });
        let (gw_time_s, gw_time_nanos) = match &rx.gw_time {
            Some(t) if !same_ms => (Some(t.seconds), Some(t.nanos.max(0) as u32)),
            _ => (None, None),
        };
        let gps_ms = rx
            .time_since_gps_epoch
            .as_ref()
            .map(|d| d.seconds.max(0) as u64 * 1000 + d.nanos.max(0) as u64 / 1_000_000);
        let fine_ns = rx
            .fine_time_since_gps_epoch
            .as_ref()
            .map(|d| d.nanos.max(0) as u32);
        let mut s = StoredUplink {
            phy_payload: f.phy_payload,
            frequency: tx.frequency,
            rssi: rx.rssi,
            snr: rx.snr,
            channel: rx.channel,
            rf_chain: rx.rf_chain,
            context: rx.context,
            crc_status: rx.crc_status,
            gw_time_ns_past_ms: rx
                .gw_time
                .filter(|_| same_ms)
                .map(|t| (t.nanos.max(0) as u32) % 1_000_000),
            gw_time_s,
            gw_time_nanos,
            gps_ms,
            fine_ns,
            board: rx.board,
            antenna: rx.antenna,
            ..Default::default()
        };
        match tx.modulation.and_then(|m| m.parameters) {
            Some(gw::modulation::Parameters::Lora(l)) => {
                if l.bandwidth % 1000 == 0 {
                    s.lora_bandwidth_khz = l.bandwidth / 1000;
                } else {
                    s.lora_bandwidth = l.bandwidth;
                }
                s.lora_spreading_factor = l.spreading_factor;
                s.lora_code_rate = l.code_rate;
            }
            Some(gw::modulation::Parameters::Fsk(m)) => s.fsk_datarate = m.datarate,
            _ => {}
        }
        s
    }

    fn into_frame(self, at_ms: u64) -> gw::UplinkFrame {
        let parameters = if self.fsk_datarate != 0 {
            Some(gw::modulation::Parameters::Fsk(gw::FskModulationInfo {
                datarate: self.fsk_datarate,
                ..Default::default()
            }))
        } else if self.lora_bandwidth != 0 || self.lora_bandwidth_khz != 0 {
            Some(gw::modulation::Parameters::Lora(gw::LoraModulationInfo {
                bandwidth: self.lora_bandwidth.max(self.lora_bandwidth_khz * 1000),
                spreading_factor: self.lora_spreading_factor,
                code_rate: self.lora_code_rate,
                ..Default::default()
            }))
        } else {
            None
        };
        let gw_time = match (self.gw_time_s, self.gw_time_nanos) {
            (Some(seconds), nanos) => Some(Timestamp {
                seconds,
                nanos: nanos.unwrap_or(0).min(999_999_999) as i32,
            }),
            _ => self.gw_time_ns_past_ms.map(|ns| Timestamp {
                seconds: (at_ms / 1000) as i64,
                nanos: ((at_ms % 1000) * 1_000_000) as i32 + ns.min(999_999) as i32,
            }),
        };
        let time_since_gps_epoch = self
            .gps_ms
            .map(|ms| chirpstack_api::pbjson_types::Duration {
                seconds: (ms / 1000) as i64,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            });
        let fine_time_since_gps_epoch = match (self.gps_ms, self.fine_ns) {
            (Some(ms), Some(ns)) => Some(chirpstack_api::pbjson_types::Duration {
                seconds: (ms / 1000) as i64,
                nanos: ns.min(999_999_999) as i32,
            }),
            _ => None,
        };
        gw::UplinkFrame {
            phy_payload: self.phy_payload,
            tx_info: Some(gw::UplinkTxInfo {
                frequency: self.frequency,
                modulation: parameters.map(|p| gw::Modulation {
                    parameters: Some(p),
                }),
            }),
            rx_info: Some(gw::UplinkRxInfo {
                gw_time,
                time_since_gps_epoch,
                fine_time_since_gps_epoch,
                rssi: self.rssi,
                snr: self.snr,
                channel: self.channel,
                rf_chain: self.rf_chain,
                board: self.board,
                antenna: self.antenna,
                context: self.context,
                crc_status: self.crc_status,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::radio::hal::{CodeRate, CrcStatus, Modulation, RxPacket};
    use crate::radio::Received;
    use std::time::Duration;

    fn received(modulation: Modulation) -> Received {
        Received {
            handed_over: std::time::Instant::now(),
            packet: RxPacket {
                freq_hz: 868_300_000,
                freq_offset_hz: -120,
                if_chain: 7,
                rf_chain: 1,
                modem_id: 7,
                crc: CrcStatus::Bad,
                count_us: 0xFFFF_FF00,
                modulation,
                rssi: -117.4,
                rssi_signal: -118.0,
                snr: -12.25,
                payload: (0..=255u8).collect(),
            },
            at: UNIX_EPOCH + Duration::new(1_795_000_123, 456_789_123),
            meta: None,
            receipt: None,
        }
    }

    fn round_trip(frame: gw::UplinkFrame, at: SystemTime, seq: u64) -> gw::UplinkFrame {
        let event = Event {
            at,
            body: Body::Uplink(Box::new(frame)),
        };
        let stored = event.stored();
        let bytes = publishable(
            Kind::Up,
            &stored,
            unix_ms(at),
            seq,
            "0016c001ff10a235",
            Encoding::Protobuf,
        )
        .unwrap();
        gw::UplinkFrame::decode(bytes.as_slice()).unwrap()
    }

    #[test]
    fn a_stored_uplink_is_published_exactly_as_built_plus_its_seq() {
        for modulation in [
            Modulation::Lora {
                spreading_factor: 12,
                bandwidth_hz: 125_000,
                code_rate: CodeRate::Cr47,
            },
            Modulation::Fsk { datarate: 50_000 },
        ] {
            let r = received(modulation);
            let built = crate::uplink::uplink_frame(&r);
            let mut expected = built.clone();
            let rx = expected.rx_info.as_mut().unwrap();
            rx.gateway_id = "0016c001ff10a235".into();
            rx.metadata.insert("seq".into(), "4242".into());
            rx.uplink_id = 4242;
            assert_eq!(round_trip(built, r.at, 4242), expected);
        }
    }

    #[test]
    fn a_packet_forwarders_gps_times_are_published_as_it_gave_them() {
        let mut r = received(Modulation::Lora {
            spreading_factor: 9,
            bandwidth_hz: 125_000,
            code_rate: CodeRate::Cr45,
        });
        r.meta = Some(Box::new(crate::radio::ForwarderMeta {
            // The GPS's time, 37 ms before the agent's.
            time: Some(r.at - Duration::from_millis(37)),
            tmms: Some(1_478_000_123_456),
            ftime_ns: Some(123_456_789),
            board: 1,
        }));
        let built = crate::uplink::uplink_frame(&r);
        let rx = built.rx_info.as_ref().unwrap();
        assert_eq!(
            rx.gw_time,
            Some(crate::uplink::timestamp(r.at - Duration::from_millis(37)))
        );
        assert_eq!(
            rx.time_since_gps_epoch.as_ref().unwrap().seconds,
            1_478_000_123
        );
        assert_eq!(
            rx.fine_time_since_gps_epoch.as_ref().unwrap().nanos,
            123_456_789
        );
        let mut expected = built.clone();
        let rx = expected.rx_info.as_mut().unwrap();
        rx.gateway_id = "0016c001ff10a235".into();
        rx.metadata.insert("seq".into(), "7".into());
        rx.uplink_id = 7;
        assert_eq!(round_trip(built, r.at, 7), expected);
    }

    #[test]
    fn the_stored_uplink_carries_at_most_forty_bytes_besides_the_phy_payload() {
        let r = received(Modulation::Lora {
            spreading_factor: 7,
            bandwidth_hz: 125_000,
            code_rate: CodeRate::Cr45,
        });
        let phy = r.packet.payload.len();
        let mut frame = crate::uplink::uplink_frame(&r);
        // What is published carries the gateway id, uplink id and seq as well.
        let rx = frame.rx_info.as_mut().unwrap();
        rx.gateway_id = "0016c001ff10a235".into();
        rx.uplink_id = 4242;
        rx.metadata.insert("seq".into(), "4242".into());
        let full = Event {
            at: r.at,
            body: Body::Uplink(Box::new(frame.clone())),
        }
        .stored()
        .len();
        let wire_len = wire(&frame, Encoding::Protobuf).len();
        assert!(full - phy <= 40, "{} bytes of metadata", full - phy);
        assert!(full < wire_len, "stored {full} B, published {wire_len} B");
    }

    #[test]
    fn stats_acks_and_notices_are_stamped_at_publication() {
        let stats = gw::GatewayStats {
            gateway_id: "0016c001ff10a235".into(),
            rx_packets_received: 9,
            ..Default::default()
        };
        let stored = Event {
            at: SystemTime::now(),
            body: Body::Stats(Box::new(stats)),
        }
        .stored();
        let json = publishable(Kind::Stats, &stored, 0, 17, "x", Encoding::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["metadata"]["seq"], "17");
        assert_eq!(v["rxPacketsReceived"], 9);

        let stored = Event {
            at: SystemTime::now(),
            body: Body::Notice(serde_json::json!({"event": "evicted", "records": 3})),
        }
        .stored();
        let out = publishable(Kind::Buffer, &stored, 0, 18, "x", Encoding::Protobuf).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["seq"].as_u64(), v["records"].as_u64()),
            (Some(18), Some(3))
        );
    }

    #[test]
    fn an_unreadable_stored_body_is_an_error_not_a_panic() {
        for kind in [Kind::Up, Kind::Stats, Kind::Ack, Kind::Buffer] {
            let err = publishable(kind, &[0xff, 0xff, 0xff], 0, 1, "x", Encoding::Protobuf);
            assert!(err.is_err(), "{kind:?}");
        }
    }
}
