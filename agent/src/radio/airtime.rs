//! Time on air of a packet, computed (Semtech AN1200.13 for LoRa; preamble, sync word, length,
//! payload and CRC for FSK): for a backend whose radio is not ours to ask (`lgw_time_on_air`
//! needs the HAL).

use super::hal::{CodeRate, Modulation, TxPacket};

/// Microseconds on air, `None` for a modulation no radio sends.
pub fn time_on_air_us(p: &TxPacket) -> Option<u32> {
    match p.modulation {
        Modulation::Lora {
            spreading_factor,
            bandwidth_hz,
            code_rate,
        } => lora_us(
            spreading_factor,
            bandwidth_hz,
            code_rate,
            // 0: not given, the radio's default of 8 symbols.
            if p.preamble == 0 { 8 } else { p.preamble },
            !p.no_crc,
            !p.no_header,
            p.payload.len(),
        ),
        Modulation::Fsk { datarate } if datarate > 0 => {
            // Preamble, 3 sync bytes, the length byte, the payload and a 2-byte CRC.
            let bytes = p.preamble as f64 + 3.0 + 1.0 + p.payload.len() as f64 + 2.0;
            Some((bytes * 8.0 * 1e6 / datarate as f64).ceil() as u32)
        }
        Modulation::Fsk { .. } => None,
    }
}

/// A LoRa packet's time on air, µs (Semtech AN1200.13); `None` for a spreading factor or
/// bandwidth no radio sends.
pub fn lora_us(
    spreading_factor: u32,
    bandwidth_hz: u32,
    code_rate: CodeRate,
    preamble: u16,
    crc: bool,
    explicit_header: bool,
    len: usize,
) -> Option<u32> {
    if !(5..=12).contains(&spreading_factor) || bandwidth_hz == 0 {
        return None;
    }
    let sf = spreading_factor as f64;
    let t_sym_us = (1u64 << spreading_factor) as f64 * 1e6 / bandwidth_hz as f64;
    // Low data rate optimisation from 16 ms symbols on (SF11 and SF12 at 125 kHz).
    let de = if t_sym_us >= 16_000.0 { 2.0 } else { 0.0 };
    let cr = match code_rate {
        CodeRate::Cr46 => 2.0,
        CodeRate::Cr47 => 3.0,
        CodeRate::Cr48 => 4.0,
        CodeRate::Cr45 | CodeRate::Undefined => 1.0,
    };
    let crc = if crc { 16.0 } else { 0.0 };
    let header = if explicit_header { 0.0 } else { 20.0 };
    let n = ((8.0 * len as f64 - 4.0 * sf + 28.0 + crc - header) / (4.0 * (sf - de))).ceil();
    let symbols = preamble as f64 + 4.25 + 8.0 + (n * (cr + 4.0)).max(0.0);
    Some((symbols * t_sym_us).ceil() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::radio::hal::{CodeRate, TxMode};

    fn lora(sf: u32, len: usize) -> TxPacket {
        TxPacket {
            freq_hz: 869_525_000,
            mode: TxMode::Immediate,
            rf_chain: 0,
            rf_power: 14,
            modulation: Modulation::Lora {
                spreading_factor: sf,
                bandwidth_hz: 125_000,
                code_rate: CodeRate::Cr45,
            },
            invert_polarity: true,
            preamble: 8,
            no_crc: true,
            no_header: false,
            freq_deviation_khz: 0,
            payload: vec![0; len],
        }
    }

    #[test]
    fn agrees_with_the_formula_by_hand_and_semtechs_calculator() {
        // AN1200.13 by hand: SF12, 13 bytes, no CRC: 12.25 + 8 + 3 × 5 symbols of 32.768 ms.
        let ms = time_on_air_us(&lora(12, 13)).unwrap() as f64 / 1000.0;
        assert!((ms - 35.25 * 32.768).abs() < 0.01, "{ms}");
        // Semtech's calculator: SF7, 13 bytes, no CRC: 41.2 ms.
        assert_eq!(time_on_air_us(&lora(7, 13)).unwrap() / 100, 412);
        // A preamble left at 0 counts as the radio's 8 symbols.
        let mut p = lora(9, 20);
        let eight = time_on_air_us(&p);
        p.preamble = 0;
        assert_eq!(time_on_air_us(&p), eight);
    }
}
