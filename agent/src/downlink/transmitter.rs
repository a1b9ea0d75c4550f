//! What the downlink stage transmits through: the concentrator (`lgw_send`, which answers at
//! once) or a Semtech UDP packet forwarder (a PULL_RESP, answered later by its TX_ACK). The
//! stage's scheduling, validation and acks are the same for both.

use std::sync::Arc;

use chirpstack_api::gw;

use crate::radio::hal::{Clock, Concentrator, SendOutcome, TxPacket, TxStatus};
use crate::radio::semtech_udp::{packet, Link, Sent};

/// A packet forwarder is handed packets this long before their start: its JIT queue refuses
/// one with less than 42.5 ms to go, and the counter the agent estimates lags the
/// forwarder's by the time a frame takes to reach the agent.
pub const FORWARDER_HANDOFF_LEAD_US: u32 = 300_000;

/// What became of a hand-over.
pub enum HandedOver {
    /// Done; the status is the outcome.
    Now(gw::TxAckStatus),
    /// Handed to a forwarder: its TX_ACK with this token tells.
    Awaiting(u16),
}

pub trait Transmitter: Send + Sync {
    /// The counter now and the start it belongs to; `None` while nothing can transmit.
    fn clock(&self) -> Option<Clock>;
    /// Time on air, µs.
    fn time_on_air_us(&self, p: &TxPacket) -> Option<u32>;
    /// How long before its start a packet is handed over.
    fn handoff_lead_us(&self) -> u32;
    /// A hand-over with less lead than this cannot start on time.
    fn min_handoff_lead_us(&self) -> i64;
    /// It places "immediately" packets in time itself (a forwarder's JIT queue).
    fn places_immediate(&self) -> bool;
    /// The previous packet still holds the TX buffer.
    fn busy(&self, rf_chain: u8) -> bool;
    /// `p` timestamped at its start; `asap`: it was asked to go "immediately" (Class C).
    fn send(&self, p: &TxPacket, start: u64, asap: bool) -> HandedOver;
    /// TX_ACKs heard since the last call, as (token, status).
    fn take_acks(&self) -> Vec<(u16, gw::TxAckStatus)>;
}

/// The concentrator, through the HAL.
pub struct Hal(pub Arc<Concentrator>);

impl Transmitter for Hal {
    fn clock(&self) -> Option<Clock> {
        // The wrapper answers without calling the library while the radio is stopped.
        self.0.clock().ok()
    }

    fn time_on_air_us(&self, p: &TxPacket) -> Option<u32> {
        match self.0.time_on_air_ms(p) {
            Ok(ms) if ms > 0 => Some(ms.saturating_mul(1000)),
            _ => None,
        }
    }

    fn handoff_lead_us(&self) -> u32 {
        super::scheduler::HANDOFF_LEAD_US
    }

    fn min_handoff_lead_us(&self) -> i64 {
        // HAL start delay plus SPI.
        3_000
    }

    fn places_immediate(&self) -> bool {
        false
    }

    fn busy(&self, rf_chain: u8) -> bool {
        // V2.1.0's lgw_send checks nothing: a packet still scheduled or on air would be
        // replaced, silently.
        matches!(
            self.0.tx_status(rf_chain),
            Ok(TxStatus::Emitting | TxStatus::Scheduled)
        )
    }

    fn send(&self, p: &TxPacket, start: u64, _asap: bool) -> HandedOver {
        HandedOver::Now(match self.0.send(p, start) {
            Ok(SendOutcome::Accepted) => gw::TxAckStatus::Ok,
            Ok(SendOutcome::LbtNotAllowed) => {
                tracing::info!("downlink not sent: listen-before-talk found the channel busy");
                gw::TxAckStatus::CollisionPacket
            }
            Err(e) => {
                tracing::warn!(error = %e, "downlink hand-off failed");
                gw::TxAckStatus::InternalError
            }
        })
    }

    fn take_acks(&self) -> Vec<(u16, gw::TxAckStatus)> {
        Vec::new()
    }
}

/// A Semtech UDP packet forwarder: its JIT queue holds several packets, so it is never busy;
/// time on air is computed (`radio::airtime`).
pub struct Forwarder(pub Arc<Link>);

impl Transmitter for Forwarder {
    fn clock(&self) -> Option<Clock> {
        self.0
            .clock()
            .map(|(counter, start)| Clock { counter, start })
    }

    fn time_on_air_us(&self, p: &TxPacket) -> Option<u32> {
        crate::radio::airtime::time_on_air_us(p).filter(|us| *us > 0)
    }

    fn handoff_lead_us(&self) -> u32 {
        FORWARDER_HANDOFF_LEAD_US
    }

    fn min_handoff_lead_us(&self) -> i64 {
        // lora_pkt_fwd's JIT: TX_JIT_DELAY + start delay + margin, and a little for the way.
        45_000
    }

    fn places_immediate(&self) -> bool {
        true
    }

    fn busy(&self, _rf_chain: u8) -> bool {
        false
    }

    fn send(&self, p: &TxPacket, start: u64, asap: bool) -> HandedOver {
        // "Immediately" goes as `imme`: the forwarder's JIT queue puts it in the first free
        // slot of its own counter, which the agent only estimates.
        let immediate;
        let p = if asap {
            immediate = TxPacket {
                mode: crate::radio::hal::TxMode::Immediate,
                ..p.clone()
            };
            &immediate
        } else {
            p
        };
        match self.0.send(p, start) {
            Ok(Sent::Awaiting(token)) => HandedOver::Awaiting(token),
            Ok(Sent::Stale) => {
                tracing::warn!("downlink dropped: the packet forwarder restarted or moved since it was scheduled");
                HandedOver::Now(gw::TxAckStatus::InternalError)
            }
            Err(e) => {
                tracing::warn!(error = %e, "downlink hand-off to the packet forwarder failed");
                HandedOver::Now(gw::TxAckStatus::InternalError)
            }
        }
    }

    fn take_acks(&self) -> Vec<(u16, gw::TxAckStatus)> {
        self.0
            .take_acks()
            .into_iter()
            .map(|(token, error)| {
                let status = packet::tx_ack_status(error.as_deref());
                if let Some(e) = error {
                    tracing::info!(token, forwarder_said = %e, ?status, "the packet forwarder refused a downlink");
                }
                (token, status)
            })
            .collect()
    }
}
