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

/// A channel as the centre describes it (ChirpStack's `ChannelConfiguration`, decoded).
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelSpec {
    Lora {
        freq_hz: u32,
        bandwidth_hz: u32,
        spreading_factors: Vec<u32>,
    },
    Fsk {
        freq_hz: u32,
        bandwidth_hz: u32,
        datarate: u32,
    },
}

/// Half the band one SX1250 radio hears around its centre frequency (the packet forwarder's
/// reference plans put 125 kHz channels at most 400 kHz from it: 400 + 62.5).
const RADIO_HALF_SPAN_HZ: u32 = 462_500;

/// A channel plan from the centre, in `base`'s band and with its transmit settings: up to
/// eight multi-SF channels (LoRa 125 kHz, several spreading factors), one LoRa channel of one
/// spreading factor and one FSK channel, which two radios must cover. Every problem is said.
pub fn from_centre(
    base: &ChannelPlan,
    channels: &[ChannelSpec],
) -> Result<ChannelPlan, Vec<String>> {
    let mut errors = Vec::new();
    let mut multi = Vec::new();
    let mut std_ch: Option<(u32, u32, u32)> = None;
    let mut fsk: Option<(u32, u32, u32)> = None;
    let mhz = |f: u32| f as f64 / 1e6;
    for (i, c) in channels.iter().enumerate() {
        let (freq, bw) = match c {
            ChannelSpec::Lora {
                freq_hz,
                bandwidth_hz,
                ..
            }
            | ChannelSpec::Fsk {
                freq_hz,
                bandwidth_hz,
                ..
            } => (*freq_hz, *bandwidth_hz),
        };
        // In u64: a frequency near u32::MAX plus half a bandwidth must not wrap into the band.
        let (lo, hi) = (
            freq as u64 - (bw / 2).min(freq) as u64,
            freq as u64 + bw as u64 / 2,
        );
        if lo < base.tx_freq_min_hz as u64 || hi > base.tx_freq_max_hz as u64 {
            errors.push(format!(
                "channel {i}: {} MHz (bandwidth {} kHz) is outside the {} band ({}-{} MHz)",
                mhz(freq),
                bw / 1000,
                base.name,
                mhz(base.tx_freq_min_hz),
                mhz(base.tx_freq_max_hz)
            ));
            continue;
        }
        match c {
            ChannelSpec::Lora {
                spreading_factors, ..
            } => {
                if let Some(sf) = spreading_factors.iter().find(|sf| !(5..=12).contains(*sf)) {
                    errors.push(format!(
                        "channel {i}: spreading factor {sf} (the SX1302 takes 5 to 12)"
                    ));
                    continue;
                }
                match (bw, spreading_factors.len()) {
                    (_, 0) => errors.push(format!("channel {i}: LoRa without any spreading factor")),
                    (125_000, n) if n > 1 || (multi.len() < 8 && n == 1 && std_ch.is_some()) => multi.push(freq),
                    (125_000 | 250_000 | 500_000, 1) => {
                        if std_ch.is_some() {
                            errors.push(format!("channel {i}: a second single-spreading-factor LoRa channel (the SX1302 has one)"));
                        } else {
                            std_ch = Some((freq, bw, spreading_factors[0]));
                        }
                    }
                    (125_000 | 250_000 | 500_000, _) => errors.push(format!(
                        "channel {i}: LoRa {} kHz with several spreading factors (only 125 kHz channels are multi-SF)",
                        bw / 1000
                    )),
                    _ => errors.push(format!("channel {i}: LoRa bandwidth {bw} Hz (125, 250 or 500 kHz)")),
                }
            }
            ChannelSpec::Fsk { datarate, .. } => {
                if fsk.is_some() {
                    errors.push(format!(
                        "channel {i}: a second FSK channel (the SX1302 has one)"
                    ));
                } else if !(500..=250_000).contains(datarate) || !(7_800..=500_000).contains(&bw) {
                    errors.push(format!("channel {i}: FSK {datarate} bit/s, {bw} Hz (500 to 250 000 bit/s, 7.8 to 500 kHz)"));
                } else {
                    fsk = Some((freq, bw, *datarate));
                }
            }
        }
    }
    if multi.len() > 8 {
        errors.push(format!(
            "{} multi-SF channels: the SX1302 has 8",
            multi.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &multi {
        if !seen.insert(*f) {
            errors.push(format!(
                "{} MHz twice: two multi-SF channels on one frequency would report every frame twice",
                mhz(*f)
            ));
        }
    }
    if multi.is_empty() && std_ch.is_none() && fsk.is_none() && errors.is_empty() {
        errors.push("no channel: the radio would hear nothing".into());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // Every channel's band, (low edge, high edge), sorted: split between the two radios.
    let mut spans: Vec<(u32, u32)> = multi.iter().map(|f| (f - 62_500, f + 62_500)).collect();
    spans.extend(std_ch.map(|(f, bw, _)| (f - bw / 2, f + bw / 2)));
    spans.extend(fsk.map(|(f, bw, _)| (f - bw / 2, f + bw / 2)));
    spans.sort();
    let fits = |s: &[(u32, u32)]| {
        s.is_empty() || s.iter().map(|x| x.1).max().unwrap_or(0) - s[0].0 <= 2 * RADIO_HALF_SPAN_HZ
    };
    let centre = |s: &[(u32, u32)]| {
        let lo = s.first().map(|x| x.0).unwrap_or(0);
        let hi = s.iter().map(|x| x.1).max().unwrap_or(0);
        lo / 2 + hi / 2
    };
    let Some(split) = (0..=spans.len()).find(|&k| fits(&spans[..k]) && fits(&spans[k..])) else {
        return Err(vec![format!(
            "the channels span {:.3}-{:.3} MHz: two radios hearing {} kHz each cannot cover them",
            mhz(spans[0].0),
            mhz(spans.iter().map(|x| x.1).max().unwrap_or(0)),
            2 * RADIO_HALF_SPAN_HZ / 1000
        )]);
    };
    let (low, high) = spans.split_at(split);
    let c0 = if low.is_empty() {
        centre(high)
    } else {
        centre(low)
    };
    let c1 = if high.is_empty() { c0 } else { centre(high) };
    let radio_of = |lo: u32| {
        if split < spans.len() && lo >= spans[split].0 {
            1
        } else {
            0
        }
    };
    let mut out = Vec::new();
    for f in &multi {
        out.push(IfChannel::MultiSf {
            radio: radio_of(f - 62_500),
            freq_hz: *f,
        });
    }
    if let Some((f, bw, sf)) = std_ch {
        out.push(IfChannel::LoraStd {
            radio: radio_of(f - bw / 2),
            freq_hz: f,
            bandwidth_hz: bw,
            spreading_factor: sf,
        });
    }
    if let Some((f, bw, dr)) = fsk {
        out.push(IfChannel::Fsk {
            radio: radio_of(f - bw / 2),
            freq_hz: f,
            bandwidth_hz: bw,
            datarate: dr,
        });
    }
    Ok(ChannelPlan {
        radio_freq_hz: [c0, c1],
        channels: out,
        ..base.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(mhz: f64, sfs: &[u32]) -> ChannelSpec {
        ChannelSpec::Lora {
            freq_hz: (mhz * 1e6).round() as u32,
            bandwidth_hz: 125_000,
            spreading_factors: sfs.to_vec(),
        }
    }

    #[test]
    fn a_plan_from_the_centre_is_split_between_the_radios_within_their_span() {
        let base = plan("eu868").unwrap();
        let all = [7, 8, 9, 10, 11, 12];
        let chans: Vec<ChannelSpec> = [864.1, 864.3, 864.5, 864.7, 864.9, 865.1, 865.3, 865.5]
            .iter()
            .map(|f| lora(*f, &all))
            .collect();
        let p = from_centre(&base, &chans).unwrap();
        assert_eq!(p.channels.len(), 8);
        for c in &p.channels {
            let IfChannel::MultiSf { radio, freq_hz } = *c else {
                panic!()
            };
            let off = freq_hz as i64 - p.radio_freq_hz[radio as usize] as i64;
            assert!(
                off.abs() + 62_500 <= RADIO_HALF_SPAN_HZ as i64,
                "{c:?} {off} from {:?}",
                p.radio_freq_hz
            );
        }
        // The region's own plan comes back as it is, radio by radio.
        let same: Vec<ChannelSpec> = [868.1, 868.3, 868.5, 867.1, 867.3, 867.5, 867.7, 867.9]
            .iter()
            .map(|f| lora(*f, &all))
            .collect();
        assert!(from_centre(&base, &same).is_ok());
    }

    /// Random plans (seeded): refused with at least one reason, or placed so that every
    /// channel is inside the band and within its radio's span, with at most 8 multi-SF, one
    /// single-SF LoRa and one FSK channel.
    #[test]
    fn random_plans_are_refused_with_why_or_placed_within_the_radios() {
        let base = plan("eu868").unwrap();
        let mut rng = fastrand::Rng::with_seed(1302);
        let (mut placed, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let n = rng.usize(0..12);
            let chans: Vec<ChannelSpec> = (0..n)
                .map(|_| {
                    let freq_hz = 862_000_000 + rng.u32(0..9_000) * 1_000;
                    if rng.u8(0..8) == 0 {
                        ChannelSpec::Fsk {
                            freq_hz,
                            bandwidth_hz: [125_000, 50_000, 1][rng.usize(0..3)],
                            datarate: [50_000, 100, 300_000][rng.usize(0..3)],
                        }
                    } else {
                        let k = rng.usize(0..7);
                        ChannelSpec::Lora {
                            freq_hz,
                            bandwidth_hz: [125_000, 125_000, 250_000, 500_000, 62_500]
                                [rng.usize(0..5)],
                            spreading_factors: (0..k).map(|_| rng.u32(4..14)).collect(),
                        }
                    }
                })
                .collect();
            match from_centre(&base, &chans) {
                Err(e) => {
                    assert!(!e.is_empty() && e.iter().all(|e| !e.is_empty()));
                    refused += 1;
                }
                Ok(p) => {
                    placed += 1;
                    let count =
                        |f: fn(&IfChannel) -> bool| p.channels.iter().filter(|c| f(c)).count();
                    assert!(count(|c| matches!(c, IfChannel::MultiSf { .. })) <= 8);
                    assert!(count(|c| matches!(c, IfChannel::LoraStd { .. })) <= 1);
                    assert!(count(|c| matches!(c, IfChannel::Fsk { .. })) <= 1);
                    for c in &p.channels {
                        let (radio, f, bw) = match *c {
                            IfChannel::MultiSf { radio, freq_hz } => (radio, freq_hz, 125_000),
                            IfChannel::LoraStd {
                                radio,
                                freq_hz,
                                bandwidth_hz,
                                ..
                            } => (radio, freq_hz, bandwidth_hz),
                            IfChannel::Fsk {
                                radio,
                                freq_hz,
                                bandwidth_hz,
                                ..
                            } => (radio, freq_hz, bandwidth_hz),
                        };
                        let off = (f as i64 - p.radio_freq_hz[radio as usize] as i64).abs();
                        assert!(
                            off + bw as i64 / 2 <= RADIO_HALF_SPAN_HZ as i64,
                            "{c:?} in {p:?}"
                        );
                        assert!(
                            f - bw / 2 >= base.tx_freq_min_hz && f + bw / 2 <= base.tx_freq_max_hz
                        );
                    }
                }
            }
        }
        assert!(
            placed > 100 && refused > 100,
            "placed {placed}, refused {refused}"
        );
    }

    #[test]
    fn an_impossible_plan_says_every_problem() {
        let base = plan("eu868").unwrap();
        let all = [7, 8, 9, 10, 11, 12];
        let mut chans: Vec<ChannelSpec> =
            (0..9).map(|i| lora(867.1 + 0.2 * i as f64, &all)).collect();
        chans.push(lora(902.3, &all));
        chans.push(lora(868.1, &[13]));
        let e = from_centre(&base, &chans).unwrap_err();
        assert!(
            e.iter()
                .any(|e| e.contains("902.3 MHz") && e.contains("outside")),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.contains("spreading factor 13")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("9 multi-SF channels")), "{e:?}");
        let huge = ChannelSpec::Lora {
            freq_hz: u32::MAX,
            bandwidth_hz: 125_000,
            spreading_factors: vec![7, 8],
        };
        assert!(from_centre(&base, &[huge]).unwrap_err()[0].contains("outside"));
        let twice = from_centre(&base, &[lora(868.1, &all), lora(868.1, &all)]).unwrap_err();
        assert!(twice[0].contains("868.1 MHz twice"), "{twice:?}");
        let wide = vec![lora(863.5, &all), lora(865.5, &all), lora(869.5, &all)];
        let e = from_centre(&base, &wide).unwrap_err();
        assert!(e[0].contains("cannot cover them"), "{e:?}");
        assert!(from_centre(&base, &[]).is_err());
    }

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
