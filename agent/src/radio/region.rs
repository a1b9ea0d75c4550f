//! Channel plans: which frequencies the two radios and ten IF chains listen on.

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
}
