//! The uplink stage: radio frames in, accepted uplink events out.
//!
//! Applies the CRC filters, gives the rules stage the frames it reads, and turns each frame into
//! a ChirpStack `UplinkFrame` carrying all the radio metadata, for the store. It runs on the
//! radio's thread (a [`FrameSink`]) and never waits there: while the store's queue is full it
//! holds one event and gives the radio's frames back to wait in order.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
use chirpstack_api::pbjson_types::Timestamp;

use crate::events::{Body, Event};
use crate::ops::counters::Counters;
use crate::radio::hal::{CodeRate, CrcStatus, Modulation};
use crate::radio::{FrameSink, Received};
use crate::rules;

#[derive(Debug, Clone, Copy)]
pub struct CrcFilter {
    pub forward_ok: bool,
    pub forward_invalid: bool,
    pub forward_missing: bool,
}

impl CrcFilter {
    fn forwards(&self, crc: CrcStatus) -> bool {
        match crc {
            CrcStatus::Ok => self.forward_ok,
            CrcStatus::Bad => self.forward_invalid,
            CrcStatus::Missing => self.forward_missing,
        }
    }
}

pub struct Uplinks {
    pub output: SyncSender<Event>,
    pub filter: CrcFilter,
    pub counters: Arc<Counters>,
    /// The rules stage, and the DevAddrs it reads.
    pub rules: Option<(SyncSender<rules::Input>, rules::Watch)>,
    /// Events the store's queue had no room for, sent before any other (a frame and its
    /// receipt at most).
    pub held: std::collections::VecDeque<Event>,
}

impl Uplinks {
    /// The frame's event for the store, if the filters forward it (counted and given to the
    /// rules stage either way).
    fn event(&self, r: &Received) -> Option<Event> {
        if r.packet.crc == CrcStatus::Ok {
            Counters::add(&self.counters.rx_crc_ok, 1);
            if let Some((tx, watch)) = &self.rules {
                if watch.wants(&r.packet.payload) {
                    let copy = rules::Input::Frame(rules::Frame {
                        phy: r.packet.payload.clone(),
                        received: r.handed_over,
                    });
                    // Never waits: the uplink path must not depend on the rules stage.
                    if tx.try_send(copy).is_err() {
                        Counters::add(&self.counters.rules_input_dropped, 1);
                    }
                }
            }
        }
        if !self.filter.forwards(r.packet.crc) {
            Counters::add(&self.counters.rx_filtered, 1);
            return None;
        }
        Some(Event {
            at: r.at,
            body: Body::Uplink(Box::new(uplink_frame(r))),
        })
    }
}

impl Uplinks {
    /// The frame's event, then its receipt: the writer tells the receipt once the event (or,
    /// for a frame the filters drop, what came before) is appended.
    fn events(&self, r: Received) -> impl Iterator<Item = Event> {
        let event = self.event(&r);
        let receipt = r.receipt.map(|receipt| Event {
            at: r.at,
            body: Body::Receipt(receipt),
        });
        event.into_iter().chain(receipt)
    }
}

impl FrameSink for Uplinks {
    fn ready(&mut self) -> bool {
        while let Some(e) = self.held.pop_front() {
            if let Err(TrySendError::Full(e)) = self.output.try_send(e) {
                self.held.push_front(e);
                return false;
            }
        }
        true
    }

    fn offer(&mut self, r: Received) -> Result<(), Received> {
        if !self.ready() {
            return Err(r);
        }
        for e in self.events(r) {
            if !self.held.is_empty() {
                self.held.push_back(e);
                continue;
            }
            // Disconnected: the store has closed, the agent is stopping.
            if let Err(TrySendError::Full(e)) = self.output.try_send(e) {
                self.held.push_back(e);
            }
        }
        Ok(())
    }

    fn deliver(&mut self, r: Option<Received>) {
        for e in self.held.drain(..) {
            let _ = self.output.send(e);
        }
        if let Some(r) = r {
            for e in self.events(r) {
                let _ = self.output.send(e);
            }
        }
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The frame as received. The gateway id, `uplink_id` and seq are the publisher's to fill in
/// (`events::publishable`): the store does not keep what is the same for every record.
pub fn uplink_frame(r: &Received) -> gw::UplinkFrame {
    let p = &r.packet;
    let parameters = match p.modulation {
        Modulation::Lora {
            spreading_factor,
            bandwidth_hz,
            code_rate,
        } => gw::modulation::Parameters::Lora(gw::LoraModulationInfo {
            bandwidth: bandwidth_hz,
            spreading_factor,
            code_rate: match code_rate {
                CodeRate::Cr45 => gw::CodeRate::Cr45,
                CodeRate::Cr46 => gw::CodeRate::Cr46,
                CodeRate::Cr47 => gw::CodeRate::Cr47,
                CodeRate::Cr48 => gw::CodeRate::Cr48,
                CodeRate::Undefined => gw::CodeRate::CrUndefined,
            } as i32,
            ..Default::default()
        }),
        Modulation::Fsk { datarate } => gw::modulation::Parameters::Fsk(gw::FskModulationInfo {
            datarate,
            ..Default::default()
        }),
    };
    gw::UplinkFrame {
        phy_payload: p.payload.clone(),
        tx_info: Some(gw::UplinkTxInfo {
            frequency: p.freq_hz,
            modulation: Some(gw::Modulation {
                parameters: Some(parameters),
            }),
        }),
        rx_info: Some(gw::UplinkRxInfo {
            // A packet forwarder's GPS time when it has one, as ChirpStack's forwarder does.
            gw_time: Some(timestamp(
                r.meta.as_ref().and_then(|m| m.time).unwrap_or(r.at),
            )),
            time_since_gps_epoch: r.meta.as_ref().and_then(|m| m.tmms).map(|ms| {
                chirpstack_api::pbjson_types::Duration {
                    seconds: (ms / 1000) as i64,
                    nanos: ((ms % 1000) * 1_000_000) as i32,
                }
            }),
            fine_time_since_gps_epoch: r.meta.as_ref().and_then(|m| {
                Some(chirpstack_api::pbjson_types::Duration {
                    seconds: (m.tmms? / 1000) as i64,
                    nanos: m.ftime_ns? as i32,
                })
            }),
            board: r.meta.as_ref().map_or(0, |m| m.board),
            rssi: p.rssi.round() as i32,
            snr: p.snr,
            channel: p.if_chain as u32,
            rf_chain: p.rf_chain as u32,
            context: p.count_us.to_be_bytes().to_vec(),
            crc_status: match p.crc {
                CrcStatus::Ok => gw::CrcStatus::CrcOk,
                CrcStatus::Bad => gw::CrcStatus::BadCrc,
                CrcStatus::Missing => gw::CrcStatus::NoCrc,
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}
