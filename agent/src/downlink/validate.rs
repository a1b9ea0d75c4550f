//! Validation of one downlink item: what the radio may send, or the status that refuses it.
//!
//! libloragw checks nothing regulatory, so this is where frequency range, power and modulation
//! are enforced. Power goes through the board's TX gain table: the highest entry **not above**
//! the requested power minus the antenna gain; a request below the lowest entry is refused
//! (TX_POWER) rather than sent louder than asked.

use chirpstack_api::gw;

use super::scheduler::When;
use crate::radio::hal::{CodeRate, Modulation, TxGain, TxMode, TxPacket};
use crate::radio::RadioSettings;

/// What the board and region allow.
#[derive(Debug, Clone)]
pub struct TxLimits {
    pub freq_min_hz: u32,
    pub freq_max_hz: u32,
    /// Ascending rf_power.
    pub gains: Vec<TxGain>,
    pub antenna_gain_dbi: f32,
    pub rf_chain: u8,
}

impl TxLimits {
    /// The board's and the region's TX limits together.
    pub fn for_radio(radio: &RadioSettings, antenna_gain_dbi: f32) -> TxLimits {
        let (board, plan) = (radio.board, &radio.plan);
        TxLimits {
            freq_min_hz: plan.tx_freq_min_hz.max(board.tx_freq_min_hz),
            freq_max_hz: plan.tx_freq_max_hz.min(board.tx_freq_max_hz),
            gains: board.tx_gains.to_vec(),
            antenna_gain_dbi,
            rf_chain: plan.tx_radio,
        }
    }
}

/// A valid item: the packet (its timing filled in at scheduling) and when it asks to go.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub packet: TxPacket,
    pub when: Timing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// `delay` after the uplink whose counter is `context`.
    Delay {
        context: u32,
        delay_us: u32,
    },
    Immediately,
}

impl Timing {
    pub fn when(self) -> When {
        match self {
            Timing::Delay { context, delay_us } => When::At(context.wrapping_add(delay_us)),
            Timing::Immediately => When::Immediately,
        }
    }
}

/// Why an item cannot be sent, as the ack reports it, and the reason for the log.
pub type Refused = (gw::TxAckStatus, String);

fn refuse(status: gw::TxAckStatus, why: impl Into<String>) -> Refused {
    (status, why.into())
}

/// The gain entry for a requested EIRP: the highest not above `requested - antenna gain`.
pub fn gain_for(limits: &TxLimits, requested_dbm: i32) -> Option<TxGain> {
    let conducted = requested_dbm as f32 - limits.antenna_gain_dbi;
    limits
        .gains
        .iter()
        .rev()
        .find(|g| g.rf_power as f32 <= conducted)
        .copied()
}

pub fn validate(item: &gw::DownlinkFrameItem, limits: &TxLimits) -> Result<Candidate, Refused> {
    use gw::TxAckStatus as S;
    let tx = item
        .tx_info
        .as_ref()
        .ok_or_else(|| refuse(S::InternalError, "no tx_info"))?;
    if item.phy_payload.is_empty() || item.phy_payload.len() > 255 {
        return Err(refuse(
            S::InternalError,
            format!("payload of {} bytes (1 to 255)", item.phy_payload.len()),
        ));
    }
    if tx.frequency < limits.freq_min_hz || tx.frequency > limits.freq_max_hz {
        return Err(refuse(
            S::TxFreq,
            format!(
                "{} Hz outside {}-{} Hz",
                tx.frequency, limits.freq_min_hz, limits.freq_max_hz
            ),
        ));
    }
    let gain = gain_for(limits, tx.power).ok_or_else(|| {
        refuse(
            S::TxPower,
            format!(
                "{} dBm is below the lowest power of the board ({} dBm + {} dBi antenna)",
                tx.power,
                limits.gains.first().map(|g| g.rf_power).unwrap_or(0),
                limits.antenna_gain_dbi
            ),
        )
    })?;
    let (modulation, invert_polarity, preamble, no_crc, f_dev) =
        match tx.modulation.as_ref().and_then(|m| m.parameters.as_ref()) {
            Some(gw::modulation::Parameters::Lora(l)) => {
                if !(5..=12).contains(&l.spreading_factor)
                    || ![125_000, 250_000, 500_000].contains(&l.bandwidth)
                {
                    return Err(refuse(
                        S::InternalError,
                        format!("LoRa SF{} BW{}", l.spreading_factor, l.bandwidth),
                    ));
                }
                let code_rate = match l.code_rate() {
                    gw::CodeRate::Cr45 | gw::CodeRate::CrUndefined => CodeRate::Cr45,
                    gw::CodeRate::Cr46 => CodeRate::Cr46,
                    gw::CodeRate::Cr47 => CodeRate::Cr47,
                    gw::CodeRate::Cr48 => CodeRate::Cr48,
                    other => return Err(refuse(S::InternalError, format!("code rate {other:?}"))),
                };
                let m = Modulation::Lora {
                    spreading_factor: l.spreading_factor,
                    bandwidth_hz: l.bandwidth,
                    code_rate,
                };
                (
                    m,
                    l.polarization_inversion,
                    l.preamble.min(65_535) as u16,
                    l.no_crc,
                    0u8,
                )
            }
            Some(gw::modulation::Parameters::Fsk(f)) => {
                if !(500..=250_000).contains(&f.datarate) {
                    return Err(refuse(
                        S::InternalError,
                        format!("FSK datarate {}", f.datarate),
                    ));
                }
                let f_dev = (f.frequency_deviation / 1000).min(255) as u8;
                (
                    Modulation::Fsk {
                        datarate: f.datarate,
                    },
                    false,
                    5,
                    false,
                    f_dev,
                )
            }
            _ => {
                return Err(refuse(
                    S::InternalError,
                    "modulation missing or not LoRa/FSK",
                ))
            }
        };
    let when = match tx.timing.as_ref().and_then(|t| t.parameters.as_ref()) {
        Some(gw::timing::Parameters::Immediately(_)) => Timing::Immediately,
        Some(gw::timing::Parameters::Delay(d)) => {
            let context: [u8; 4] = tx.context.as_slice().try_into().map_err(|_| {
                refuse(
                    S::InternalError,
                    format!("context of {} bytes (4 expected)", tx.context.len()),
                )
            })?;
            let delay = d
                .delay
                .as_ref()
                .ok_or_else(|| refuse(S::InternalError, "delay without a duration"))?;
            if delay.seconds < 0 || delay.nanos < 0 || delay.seconds > 600 {
                return Err(refuse(S::TooEarly, format!("delay {}s", delay.seconds)));
            }
            let delay_us = delay.seconds as u32 * 1_000_000 + delay.nanos as u32 / 1000;
            Timing::Delay {
                context: u32::from_be_bytes(context),
                delay_us,
            }
        }
        Some(gw::timing::Parameters::GpsEpoch(_)) => {
            return Err(refuse(
                S::GpsUnlocked,
                "no GPS time reference on this gateway",
            ))
        }
        None => return Err(refuse(S::InternalError, "no timing")),
    };
    Ok(Candidate {
        packet: TxPacket {
            freq_hz: tx.frequency,
            mode: TxMode::Immediate,
            rf_chain: limits.rf_chain,
            rf_power: gain.rf_power,
            modulation,
            invert_polarity,
            preamble,
            no_crc,
            no_header: false,
            freq_deviation_khz: f_dev,
            payload: item.phy_payload.clone(),
        },
        when,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::radio::boards;

    fn limits(antenna: f32) -> TxLimits {
        TxLimits {
            freq_min_hz: 863_000_000,
            freq_max_hz: 870_000_000,
            gains: boards::profile("rak2287").unwrap().tx_gains.to_vec(),
            antenna_gain_dbi: antenna,
            rf_chain: 0,
        }
    }

    #[test]
    fn power_maps_to_the_highest_entry_not_above_the_request() {
        let l = limits(0.0);
        assert_eq!(gain_for(&l, 14).unwrap().rf_power, 14);
        assert_eq!(gain_for(&l, 30).unwrap().rf_power, 27);
        assert_eq!(gain_for(&l, 12).unwrap().rf_power, 12);
        assert!(
            gain_for(&l, 11).is_none(),
            "below the table: refused, never sent louder"
        );
        // A 3 dBi antenna: 16 dBm EIRP needs 13 dBm conducted.
        assert_eq!(gain_for(&limits(3.0), 16).unwrap().rf_power, 13);
        assert_eq!(gain_for(&limits(2.5), 16).unwrap().rf_power, 13);
    }
}
