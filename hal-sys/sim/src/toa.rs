//! Time on air, as `lgw_time_on_air` computes it (Semtech AN1200.13 for LoRa).

use sx1302_hal_sys as sys;

pub fn time_on_air_ms(p: &sys::lgw_pkt_tx_s) -> u32 {
    let size = p.size as f64;
    match p.modulation as u32 {
        sys::MOD_LORA => {
            let bw_hz = match p.bandwidth as u32 {
                sys::BW_125KHZ => 125_000.0,
                sys::BW_250KHZ => 250_000.0,
                sys::BW_500KHZ => 500_000.0,
                _ => return 0,
            };
            let sf = p.datarate as f64;
            if !(5.0..=12.0).contains(&sf) {
                return 0;
            }
            let cr = (p.coderate as f64).clamp(1.0, 4.0);
            let t_sym_ms = (2f64).powf(sf) / bw_hz * 1000.0;
            let de = if t_sym_ms >= 16.0 { 1.0 } else { 0.0 };
            let ih = if p.no_header { 1.0 } else { 0.0 };
            let crc = if p.no_crc { 0.0 } else { 1.0 };
            let preamble = if p.preamble < 8 {
                8.0
            } else {
                p.preamble as f64
            };
            let num = 8.0 * size - 4.0 * sf + 28.0 + 16.0 * crc - 20.0 * ih;
            let den = 4.0 * (sf - 2.0 * de);
            let n_payload = 8.0 + ((num / den).ceil() * (cr + 4.0)).max(0.0);
            let t = (preamble + 4.25 + n_payload) * t_sym_ms;
            t.ceil() as u32
        }
        sys::MOD_FSK => {
            if p.datarate == 0 {
                return 0;
            }
            let preamble = if p.preamble == 0 {
                5.0
            } else {
                p.preamble as f64
            };
            let bits = (preamble + 3.0 + 1.0 + size + if p.no_crc { 0.0 } else { 2.0 }) * 8.0;
            (bits / p.datarate as f64 * 1000.0).ceil() as u32
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(sf: u32, size: u16) -> sys::lgw_pkt_tx_s {
        sys::lgw_pkt_tx_s {
            modulation: sys::MOD_LORA as u8,
            bandwidth: sys::BW_125KHZ as u8,
            datarate: sf,
            coderate: sys::CR_LORA_4_5 as u8,
            preamble: 8,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn lora_airtime_matches_the_published_figures() {
        // Reference values from the LoRaWAN airtime calculators (EU868, 125 kHz, CR 4/5, CRC on),
        // rounded up to whole ms: a scheduler must reserve the whole airtime.
        assert_eq!(time_on_air_ms(&lora(7, 13)), 47); // 46.3 ms
        assert_eq!(time_on_air_ms(&lora(12, 13)), 1156); // 1155.07 ms, rounded up
        assert_eq!(time_on_air_ms(&lora(9, 23)), 206); // 205.8 ms
    }
}
