//! What the agent publishes: the event kinds, their topics, and their wire encoding.
//!
//! Every event is stamped with the store's sequence number when it is accepted, so the central
//! side can drop the duplicates that at-least-once delivery produces (`metadata["seq"]` in
//! ChirpStack messages, `"seq"` in lora-edge's own JSON notices).

use std::time::{SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
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
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Up,
            2 => Kind::Stats,
            3 => Kind::Ack,
            5 => Kind::Buffer,
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

#[derive(Debug, Clone)]
pub enum Body {
    Uplink(Box<gw::UplinkFrame>),
    Stats(Box<gw::GatewayStats>),
    Ack(gw::DownlinkTxAck),
    Notice(serde_json::Value),
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

    /// The bytes to publish, stamped with `seq`.
    pub fn encode(self, seq: u64, encoding: Encoding) -> Vec<u8> {
        match self.body {
            Body::Uplink(mut f) => {
                if let Some(rx) = f.rx_info.as_mut() {
                    rx.metadata.insert("seq".into(), seq.to_string());
                }
                wire(f.as_ref(), encoding)
            }
            Body::Stats(mut s) => {
                s.metadata.insert("seq".into(), seq.to_string());
                wire(s.as_ref(), encoding)
            }
            Body::Ack(a) => wire(&a, encoding),
            Body::Notice(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("seq".into(), seq.into());
                }
                serde_json::to_vec(&v).unwrap_or_default()
            }
        }
    }
}
