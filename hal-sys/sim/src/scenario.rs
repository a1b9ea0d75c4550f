//! The scenario file: one received frame a line, replayed at its time offset.
//!
//! ```text
//! # offset_ms, freq_hz, modulation, datarate, bandwidth_hz, coderate, rssi, snr, if_chain, rf_chain, crc, payload_hex
//! 0,    868100000, LORA, 7, 125000, 4/5, -57, 9.5, 0, 1, ok, 40f17dbe4900020001954378762b11ff0d
//! 1500, 868800000, FSK, 50000, 0, -, -80, 0, 9, 1, bad, 0102
//! ```
//! `datarate` is the spreading factor for LoRa and bit/s for FSK; `crc` is ok, bad or none.
//! Frames with the same offset arrive in one burst, in file order.

use sx1302_hal_sys as sys;

#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioFrame {
    pub offset_us: u64,
    pub freq_hz: u32,
    pub modulation: u8,
    pub datarate: u32,
    pub bandwidth: u8,
    pub coderate: u8,
    pub rssi: f32,
    pub snr: f32,
    pub if_chain: u8,
    pub rf_chain: u8,
    pub status: u8,
    pub payload: Vec<u8>,
    /// Filled in when the frame is delivered.
    pub count_us: u32,
}

impl ScenarioFrame {
    pub(crate) fn write_to(&self, out: &mut sys::lgw_pkt_rx_s) {
        *out = sys::lgw_pkt_rx_s::default();
        out.freq_hz = self.freq_hz;
        out.if_chain = self.if_chain;
        out.status = self.status;
        out.count_us = self.count_us;
        out.rf_chain = self.rf_chain;
        out.modem_id = self.if_chain;
        out.modulation = self.modulation;
        out.bandwidth = self.bandwidth;
        out.datarate = self.datarate;
        out.coderate = self.coderate;
        out.rssic = self.rssi;
        out.rssis = self.rssi - 1.0;
        out.snr = self.snr;
        out.crc = crc16(&self.payload);
        out.size = self.payload.len() as u16;
        out.payload[..self.payload.len()].copy_from_slice(&self.payload);
    }
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

pub fn parse_scenario(text: &str) -> Result<Vec<ScenarioFrame>, String> {
    let mut frames = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = parse_line(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        if let Some(prev) = frames.last().map(|p: &ScenarioFrame| p.offset_us) {
            if f.offset_us < prev {
                return Err(format!("line {}: offsets must not decrease", i + 1));
            }
        }
        frames.push(f);
    }
    Ok(frames)
}

fn parse_line(line: &str) -> Result<ScenarioFrame, String> {
    let c: Vec<&str> = line.split(',').map(str::trim).collect();
    if c.len() != 12 {
        return Err(format!(
            "expected 12 comma-separated fields, found {}",
            c.len()
        ));
    }
    fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
        s.parse().map_err(|_| format!("{what}: cannot parse {s:?}"))
    }
    let modulation = match c[2] {
        "LORA" => sys::MOD_LORA,
        "FSK" => sys::MOD_FSK,
        other => return Err(format!("modulation: {other:?} is not LORA or FSK")),
    } as u8;
    let bandwidth = match c[4] {
        "125000" => sys::BW_125KHZ,
        "250000" => sys::BW_250KHZ,
        "500000" => sys::BW_500KHZ,
        "0" => sys::BW_UNDEFINED,
        other => {
            return Err(format!(
                "bandwidth_hz: {other:?} is not 125000, 250000, 500000 or 0"
            ))
        }
    } as u8;
    let coderate = match c[5] {
        "4/5" => sys::CR_LORA_4_5,
        "4/6" => sys::CR_LORA_4_6,
        "4/7" => sys::CR_LORA_4_7,
        "4/8" => sys::CR_LORA_4_8,
        "-" => sys::CR_UNDEFINED,
        other => return Err(format!("coderate: {other:?}")),
    } as u8;
    let status = match c[10] {
        "ok" => sys::STAT_CRC_OK,
        "bad" => sys::STAT_CRC_BAD,
        "none" => sys::STAT_NO_CRC,
        other => return Err(format!("crc: {other:?} is not ok, bad or none")),
    } as u8;
    let hex = c[11];
    if !hex.len().is_multiple_of(2) || hex.len() > 512 {
        return Err("payload_hex: odd length or longer than 256 bytes".into());
    }
    let payload = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| "payload_hex: not hexadecimal".to_string())?;
    let offset_ms: f64 = num(c[0], "offset_ms")?;
    if !(offset_ms >= 0.0 && offset_ms.is_finite()) {
        return Err(format!(
            "offset_ms: {offset_ms} is not a time from the start"
        ));
    }
    let frame = ScenarioFrame {
        offset_us: (offset_ms * 1000.0).round() as u64,
        freq_hz: num(c[1], "freq_hz")?,
        modulation,
        datarate: num(c[3], "datarate")?,
        bandwidth,
        coderate,
        rssi: num(c[6], "rssi")?,
        snr: num(c[7], "snr")?,
        if_chain: num(c[8], "if_chain")?,
        rf_chain: num(c[9], "rf_chain")?,
        status,
        payload,
        count_us: 0,
    };
    physically_possible(&frame)?;
    Ok(frame)
}

/// What an SX1302 with SX1250 radios on an EU868 board (every board lora-edge knows) could
/// have received: a scenario is a recording, and the agent must never be tested on frames the
/// real radio cannot produce.
fn physically_possible(f: &ScenarioFrame) -> Result<(), String> {
    if !(863_000_000..=870_000_000).contains(&f.freq_hz) {
        return Err(format!(
            "freq_hz: {} is outside 863-870 MHz, the band of the 868 MHz boards",
            f.freq_hz
        ));
    }
    if f.if_chain as u32 >= sys::LGW_IF_CHAIN_NB {
        return Err(format!(
            "if_chain: {} (the SX1302 has IF chains 0 to {})",
            f.if_chain,
            sys::LGW_IF_CHAIN_NB - 1
        ));
    }
    if f.rf_chain as u32 >= sys::LGW_RF_CHAIN_NB {
        return Err(format!("rf_chain: {} (0 or 1)", f.rf_chain));
    }
    if f.modulation as u32 == sys::MOD_LORA {
        if !(5..=12).contains(&f.datarate) {
            return Err(format!("datarate: SF{} (LoRa is SF5 to SF12)", f.datarate));
        }
        if f.bandwidth as u32 == sys::BW_UNDEFINED || f.coderate as u32 == sys::CR_UNDEFINED {
            return Err("a LoRa frame needs a bandwidth and a code rate".into());
        }
    } else if !(500..=250_000).contains(&f.datarate) {
        return Err(format!(
            "datarate: {} bit/s (FSK is 500 to 250000)",
            f.datarate
        ));
    }
    if !(-150.0..=0.0).contains(&f.rssi) || !(-30.0..=30.0).contains(&f.snr) {
        return Err(format!(
            "rssi {} dBm / snr {} dB: outside what the radio reports (-150..0, -30..30)",
            f.rssi, f.snr
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_line_becomes_a_frame_with_every_field() {
        let f = parse_scenario(
            "# c\n12.5, 868100000, LORA, 9, 125000, 4/6, -57, 9.5, 2, 1, bad, 40aa\n",
        )
        .unwrap();
        assert_eq!(f.len(), 1);
        let f = &f[0];
        assert_eq!(f.offset_us, 12_500);
        assert_eq!(f.freq_hz, 868_100_000);
        assert_eq!(f.datarate, 9);
        assert_eq!(f.coderate, sys::CR_LORA_4_6 as u8);
        assert_eq!(f.status, sys::STAT_CRC_BAD as u8);
        assert_eq!(f.payload, vec![0x40, 0xaa]);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let err = parse_scenario(
            "0,868100000,LORA,7,125000,4/5,-57,9.5,0,1,ok,40\n0,1,XX,7,125000,4/5,0,0,0,0,ok,\n",
        )
        .unwrap_err();
        assert!(err.starts_with("line 2: modulation"), "{err}");
    }

    #[test]
    fn frames_the_real_radio_could_never_receive_are_refused_with_their_line() {
        let ok = "0,868100000,LORA,7,125000,4/5,-57,9.5,0,1,ok,40\n";
        assert!(parse_scenario(ok).is_ok());
        for (bad, why) in [
            (
                "0,433175000,LORA,7,125000,4/5,-57,9.5,0,1,ok,40",
                "freq_hz: 433175000",
            ),
            ("0,868100000,LORA,99,125000,4/5,-57,9.5,0,1,ok,40", "SF99"),
            ("0,868100000,LORA,4,125000,4/5,-57,9.5,0,1,ok,40", "SF4"),
            (
                "0,868100000,LORA,7,125000,4/5,-57,9.5,99,1,ok,40",
                "if_chain: 99",
            ),
            (
                "0,868100000,LORA,7,125000,4/5,-57,9.5,0,2,ok,40",
                "rf_chain: 2",
            ),
            (
                "0,868100000,LORA,7,0,-,-57,9.5,0,1,ok,40",
                "needs a bandwidth",
            ),
            (
                "0,868800000,FSK,5000000,0,-,-57,9.5,9,1,ok,40",
                "FSK is 500",
            ),
            ("0,868100000,LORA,7,125000,4/5,20,9.5,0,1,ok,40", "rssi 20"),
            (
                "-5,868100000,LORA,7,125000,4/5,-57,9.5,0,1,ok,40",
                "offset_ms",
            ),
        ] {
            let err = parse_scenario(&format!("{ok}{bad}\n")).unwrap_err();
            assert!(
                err.starts_with("line 2: ") && err.contains(why),
                "{bad}: {err}"
            );
        }
    }
}
