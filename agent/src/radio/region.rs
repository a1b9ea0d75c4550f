//! Channel plans: which frequencies the two radios and ten IF chains listen on, and the
//! regulatory sub-bands a transmission must fit in.

/// An IF chain: offset from its radio's centre frequency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IfChannel {
    /// Multi-SF LoRa 125 kHz (IF chains 0-7).
    MultiSf { radio: u8, freq_hz: u32 },
    /// Single-SF "LoRa standard" channel (IF chain 8).
    LoraStd {
        radio: u8,
        freq_hz: u32,
        bandwidth_hz: u32,
        spreading_factor: u32,
    },
    /// FSK channel (IF chain 9).
    Fsk {
        radio: u8,
        freq_hz: u32,
        bandwidth_hz: u32,
        datarate: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPlan {
    pub name: &'static str,
    /// Centre frequencies of radio 0 and radio 1.
    pub radio_freq_hz: [u32; 2],
    pub tx_radio: u8,
    pub tx_freq_min_hz: u32,
    pub tx_freq_max_hz: u32,
    pub channels: Vec<IfChannel>,
}

/// One ETSI EN 300 220 sub-band (ERC Recommendation 70-03, annex 1, as LoRaWAN's RP002 uses it
/// for EU868): `[min, max)` Hz, its duty cycle in per mille and its maximum radiated power, as
/// EIRP (ERP + 2.15 dB, rounded down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubBand {
    pub name: &'static str,
    pub min_hz: u32,
    pub max_hz: u32,
    pub permille: u32,
    pub max_eirp_dbm: i32,
}

const fn band(
    name: &'static str,
    min_hz: u32,
    max_hz: u32,
    permille: u32,
    max_eirp_dbm: i32,
) -> SubBand {
    SubBand {
        name,
        min_hz,
        max_hz,
        permille,
        max_eirp_dbm,
    }
}

/// 25 mW ERP everywhere but 869.4-869.65 MHz (500 mW ERP).
pub const EU868_SUB_BANDS: &[SubBand] = &[
    band("863.0-865.0", 863_000_000, 865_000_000, 1, 16),
    band("865.0-868.0", 865_000_000, 868_000_000, 10, 16),
    band("868.0-868.6", 868_000_000, 868_600_000, 10, 16),
    band("868.7-869.2", 868_700_000, 869_200_000, 1, 16),
    band("869.4-869.65", 869_400_000, 869_650_000, 100, 29),
    band("869.7-870.0", 869_700_000, 870_000_000, 10, 16),
];

/// The gaps between the listed sub-bands (868.6-868.7, 869.2-869.4, 869.65-869.7 MHz) fall under
/// the general 863-870 MHz rule: 0.1 % and 25 mW ERP.
const OTHER: SubBand = band("other", 0, 0, 1, 16);

pub fn sub_band(freq_hz: u32) -> SubBand {
    EU868_SUB_BANDS
        .iter()
        .copied()
        .find(|b| freq_hz >= b.min_hz && freq_hz < b.max_hz)
        .unwrap_or(OTHER)
}

/// The sub-band holding the whole of `[low, high]` Hz (the occupied bandwidth), if one does.
pub fn sub_band_of_span(low_hz: u32, high_hz: u32) -> Option<SubBand> {
    // `[min, max)`: the top edge may touch a sub-band's upper limit.
    let crosses = |b: &SubBand| low_hz < b.max_hz && high_hz > b.min_hz;
    let named: Vec<SubBand> = EU868_SUB_BANDS.iter().copied().filter(crosses).collect();
    match named.as_slice() {
        // Wholly in a gap: the general rule.
        [] => Some(OTHER),
        [b] if low_hz >= b.min_hz && high_hz <= b.max_hz => Some(*b),
        _ => None,
    }
}

pub fn plan(name: &str) -> Option<ChannelPlan> {
    match name {
        "eu868" => Some(eu868()),
        _ => None,
    }
}

pub fn known() -> Vec<&'static str> {
    vec!["eu868"]
}

fn eu868() -> ChannelPlan {
    let multi = |radio, mhz: f64| IfChannel::MultiSf {
        radio,
        freq_hz: (mhz * 1e6).round() as u32,
    };
    ChannelPlan {
        name: "eu868",
        radio_freq_hz: [867_500_000, 868_500_000],
        tx_radio: 0,
        tx_freq_min_hz: 863_000_000,
        tx_freq_max_hz: 870_000_000,
        channels: vec![
            multi(1, 868.1),
            multi(1, 868.3),
            multi(1, 868.5),
            multi(0, 867.1),
            multi(0, 867.3),
            multi(0, 867.5),
            multi(0, 867.7),
            multi(0, 867.9),
            IfChannel::LoraStd {
                radio: 1,
                freq_hz: 868_300_000,
                bandwidth_hz: 250_000,
                spreading_factor: 7,
            },
            IfChannel::Fsk {
                radio: 1,
                freq_hz: 868_800_000,
                bandwidth_hz: 125_000,
                datarate: 50_000,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eu868_channels_sit_within_their_radios_bandwidth() {
        let p = plan("eu868").unwrap();
        assert_eq!(p.channels.len(), 10);
        for c in &p.channels {
            let (radio, f) = match *c {
                IfChannel::MultiSf { radio, freq_hz } => (radio, freq_hz),
                IfChannel::LoraStd { radio, freq_hz, .. } => (radio, freq_hz),
                IfChannel::Fsk { radio, freq_hz, .. } => (radio, freq_hz),
            };
            let off = f as i64 - p.radio_freq_hz[radio as usize] as i64;
            assert!(off.abs() <= 400_000, "{c:?} is {off} Hz from its radio");
        }
    }

    #[test]
    fn a_transmission_fits_a_sub_band_only_if_its_whole_bandwidth_does() {
        let span = |f: u32, bw: u32| sub_band_of_span(f - bw / 2, f + bw / 2).map(|b| b.name);
        assert_eq!(span(868_100_000, 125_000), Some("868.0-868.6"));
        assert_eq!(
            span(868_062_500, 125_000),
            Some("868.0-868.6"),
            "edge on the limit"
        );
        assert_eq!(
            span(868_062_499, 125_000),
            None,
            "62.5 kHz below 868.0 overhangs"
        );
        assert_eq!(span(869_525_000, 250_000), Some("869.4-869.65"));
        assert_eq!(span(869_525_000, 500_000), None);
        assert_eq!(span(868_650_000, 50_000), Some("other"));
        assert_eq!(span(868_900_000, 800_000), None, "gap, band and gap");
        assert_eq!(sub_band(869_525_000).max_eirp_dbm, 29);
        assert_eq!(sub_band(868_100_000).max_eirp_dbm, 16);
    }
}
