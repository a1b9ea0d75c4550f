//! Validation of one downlink item: what the radio may send, or the status that refuses it.
//!
//! libloragw checks nothing regulatory, so this is where frequency range, power and modulation
//! are enforced. The whole occupied bandwidth (LoRa: the channel bandwidth; FSK: Carson's rule,
//! datarate + 2 × deviation) must lie inside the TX range and inside one ETSI sub-band, whose
//! duty cycle then counts it. Power: a request above the sub-band's legal EIRP is **sent at the
//! limit**, not refused (the network server asked for a link budget; the legal maximum is the
//! closest lawful answer and may still reach the device, a refusal surely would not). The EIRP,
//! less the antenna gain, then goes through the board's TX gain table: the highest entry **not
//! above** it; a request below the lowest entry is refused (TX_POWER) rather than sent louder
//! than asked.

use chirpstack_api::gw;

use super::scheduler::When;
use crate::radio::hal::{CodeRate, Modulation, TxGain, TxMode, TxPacket};
use crate::radio::region::{self, SubBand};
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

impl TxLimits {
    /// For a packet forwarder: the band's limits, and the EIRP as its `powe` (the forwarder
    /// takes off its own antenna gain and picks from its own gain table).
    pub fn for_forwarder(radio: &RadioSettings) -> TxLimits {
        let plan = &radio.plan;
        TxLimits {
            freq_min_hz: plan.tx_freq_min_hz,
            freq_max_hz: plan.tx_freq_max_hz,
            gains: (0..=30)
                .map(|dbm| TxGain {
                    rf_power: dbm,
                    dig_gain: 0,
                    pa_gain: 0,
                    dac_gain: 0,
                    mix_gain: 0,
                    offset_i: 0,
                    offset_q: 0,
                    pwr_idx: 0,
                })
                .collect(),
            antenna_gain_dbi: 0.0,
            rf_chain: plan.tx_radio,
        }
    }
}

/// A valid item: the packet (its timing filled in at scheduling) and when it asks to go.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub packet: TxPacket,
    pub when: Timing,
    /// The EIRP it will be sent at when the request was above the sub-band's limit.
    pub power_capped_to: Option<i32>,
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

/// The gain entry for an EIRP: the highest not above `eirp - antenna gain`.
pub fn gain_for(limits: &TxLimits, eirp_dbm: i32) -> Option<TxGain> {
    let conducted = eirp_dbm as f32 - limits.antenna_gain_dbi;
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
    let occupied_hz = match modulation {
        Modulation::Lora { bandwidth_hz, .. } => bandwidth_hz,
        Modulation::Fsk { datarate } => datarate + 2 * 1000 * f_dev as u32,
    };
    let band = sub_band_for(tx.frequency, occupied_hz, limits)?;
    let eirp = tx.power.min(band.max_eirp_dbm);
    let gain = gain_for(limits, eirp).ok_or_else(|| {
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
            if delay.seconds < 0 || delay.nanos < 0 {
                return Err(refuse(
                    S::TooLate,
                    format!("delay {}s {}ns is in the past", delay.seconds, delay.nanos),
                ));
            }
            if delay.seconds > 600 {
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
        power_capped_to: (eirp < tx.power).then_some(eirp),
    })
}

/// The sub-band a transmission of `occupied_hz` centred on `freq_hz` lies in, whole, within the
/// TX range; TX_FREQ otherwise.
fn sub_band_for(freq_hz: u32, occupied_hz: u32, limits: &TxLimits) -> Result<SubBand, Refused> {
    let (low, high) = (
        freq_hz.saturating_sub(occupied_hz / 2),
        freq_hz.saturating_add(occupied_hz / 2),
    );
    if low < limits.freq_min_hz || high > limits.freq_max_hz {
        return Err(refuse(
            gw::TxAckStatus::TxFreq,
            format!(
                "{freq_hz} Hz with {} kHz occupied spans {low}-{high} Hz, outside {}-{} Hz",
                occupied_hz / 1000,
                limits.freq_min_hz,
                limits.freq_max_hz
            ),
        ));
    }
    region::sub_band_of_span(low, high).ok_or_else(|| {
        refuse(
            gw::TxAckStatus::TxFreq,
            format!(
                "{freq_hz} Hz with {} kHz occupied ({low}-{high} Hz) straddles two sub-bands",
                occupied_hz / 1000
            ),
        )
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

    fn lora_item(freq: u32, power: i32, bandwidth: u32) -> gw::DownlinkFrameItem {
        gw::DownlinkFrameItem {
            phy_payload: vec![0x60; 12],
            tx_info: Some(gw::DownlinkTxInfo {
                frequency: freq,
                power,
                modulation: Some(gw::Modulation {
                    parameters: Some(gw::modulation::Parameters::Lora(gw::LoraModulationInfo {
                        bandwidth,
                        spreading_factor: 9,
                        code_rate: gw::CodeRate::Cr45 as i32,
                        ..Default::default()
                    })),
                }),
                timing: Some(gw::Timing {
                    parameters: Some(gw::timing::Parameters::Immediately(
                        gw::ImmediatelyTimingInfo {},
                    )),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn status(r: Result<Candidate, Refused>) -> Result<(i8, Option<i32>), gw::TxAckStatus> {
        r.map(|c| (c.packet.rf_power, c.power_capped_to))
            .map_err(|(s, _)| s)
    }

    #[test]
    fn power_above_the_sub_band_limit_is_sent_at_the_limit_never_above() {
        let l = limits(0.0);
        // 868.1 MHz: 25 mW ERP = 16 dBm EIRP.
        assert_eq!(
            status(validate(&lora_item(868_100_000, 16, 125_000), &l)),
            Ok((16, None))
        );
        assert_eq!(
            status(validate(&lora_item(868_100_000, 17, 125_000), &l)),
            Ok((16, Some(16)))
        );
        assert_eq!(
            status(validate(&lora_item(868_100_000, 100, 125_000), &l)),
            Ok((16, Some(16)))
        );
        // 869.525 MHz: 500 mW ERP = 29 dBm EIRP; the RAK2287 table tops at 27 dBm.
        assert_eq!(
            status(validate(&lora_item(869_525_000, 27, 125_000), &l)),
            Ok((27, None))
        );
        assert_eq!(
            status(validate(&lora_item(869_525_000, 100, 125_000), &l)),
            Ok((27, Some(29)))
        );
        // A 6 dBi antenna: 16 dBm EIRP is 10 dBm conducted, below this board's table.
        assert_eq!(
            status(validate(&lora_item(868_100_000, 30, 125_000), &limits(6.0))),
            Err(gw::TxAckStatus::TxPower)
        );
    }

    #[test]
    fn the_whole_occupied_bandwidth_must_be_inside_the_band_and_one_sub_band() {
        let l = limits(0.0);
        let at = |f, bw| status(validate(&lora_item(f, 14, bw), &l)).map(|_| ());
        assert_eq!(at(863_062_500, 125_000), Ok(()), "lower edge on 863.0 MHz");
        assert_eq!(at(863_000_000, 125_000), Err(gw::TxAckStatus::TxFreq));
        assert_eq!(at(869_937_500, 125_000), Ok(()), "upper edge on 870.0 MHz");
        assert_eq!(at(869_937_501, 125_000), Err(gw::TxAckStatus::TxFreq));
        assert_eq!(at(870_000_000, 500_000), Err(gw::TxAckStatus::TxFreq));
        assert_eq!(
            at(869_750_000, 500_000),
            Err(gw::TxAckStatus::TxFreq),
            "straddles 869.65-869.7"
        );
        assert_eq!(
            at(868_000_000, 125_000),
            Err(gw::TxAckStatus::TxFreq),
            "straddles 868.0"
        );
        assert_eq!(at(869_525_000, 250_000), Ok(()));
        assert_eq!(at(869_525_000, 500_000), Err(gw::TxAckStatus::TxFreq));
    }

    #[test]
    fn a_negative_delay_is_in_the_past_too_late_not_too_early() {
        let l = limits(0.0);
        let mut item = lora_item(868_100_000, 14, 125_000);
        let tx = item.tx_info.as_mut().unwrap();
        tx.context = vec![0, 0, 0, 1];
        let with = |seconds, nanos| {
            let mut i = item.clone();
            i.tx_info.as_mut().unwrap().timing = Some(gw::Timing {
                parameters: Some(gw::timing::Parameters::Delay(gw::DelayTimingInfo {
                    delay: Some(chirpstack_api::pbjson_types::Duration { seconds, nanos }),
                })),
            });
            status(validate(&i, &l)).map(|_| ())
        };
        assert_eq!(with(-1, 0), Err(gw::TxAckStatus::TooLate));
        assert_eq!(with(0, -1), Err(gw::TxAckStatus::TooLate));
        assert_eq!(with(1, 0), Ok(()));
        assert_eq!(with(601, 0), Err(gw::TxAckStatus::TooEarly));
    }
}
