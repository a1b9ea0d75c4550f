//! Board profiles as data: GPIO lines, RF front-end figures and TX gain tables.
//!
//! GPIO numbers are BCM lines on the Pi header (`/dev/gpiochip0`). The TX gain table is the
//! Semtech reference table for SX1250 front ends in EU868; boards that ship a calibrated table of
//! their own get it here.

use super::hal::TxGain;

#[derive(Debug, Clone, PartialEq)]
pub struct BoardProfile {
    pub name: &'static str,
    pub description: &'static str,
    pub sx1302_reset: u32,
    pub power_enable: Option<u32>,
    pub sx1261_reset: Option<u32>,
    /// The STTS751 on I2C, if the board has one. Upstream V2.1.0 `lgw_start` needs it (boards
    /// without one need ChirpStack's V2.1.0r9 fork, where it is optional); the fork opens it only
    /// if told where it is, before `lgw_start`.
    pub temperature_sensor: Option<TemperatureSensor>,
    pub rssi_offset: f32,
    pub rssi_tcomp: [f32; 5],
    /// TX frequency range of the RF front end (Hz).
    pub tx_freq_min_hz: u32,
    pub tx_freq_max_hz: u32,
    pub tx_gains: &'static [TxGain],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemperatureSensor {
    pub i2c_path: &'static str,
    pub i2c_addr: u8,
}

/// Where the reference designs put their STTS751 (the first address upstream V2.1.0 probes).
const STTS751_ON_I2C1: Option<TemperatureSensor> = Some(TemperatureSensor {
    i2c_path: "/dev/i2c-1",
    i2c_addr: 0x39,
});

const fn gain(rf_power: i8, pa_gain: u8, pwr_idx: u8) -> TxGain {
    TxGain {
        rf_power,
        dig_gain: 0,
        pa_gain,
        dac_gain: 3,
        mix_gain: 5,
        offset_i: 0,
        offset_q: 0,
        pwr_idx,
    }
}

/// Semtech reference design, EU868, SX1250 radio.
const SX1250_EU868: &[TxGain] = &[
    gain(12, 0, 15),
    gain(13, 0, 16),
    gain(14, 0, 17),
    gain(15, 0, 19),
    gain(16, 0, 20),
    gain(17, 0, 22),
    gain(18, 1, 1),
    gain(19, 1, 2),
    gain(20, 1, 3),
    gain(21, 1, 4),
    gain(22, 1, 5),
    gain(23, 1, 6),
    gain(24, 1, 7),
    gain(25, 1, 9),
    gain(26, 1, 11),
    gain(27, 1, 14),
];

const TCOMP: [f32; 5] = [0.0, 0.0, 20.41, 2162.56, 0.0];

/// What the boards below share: an SX1250 front end for EU868 (Semtech reference figures).
const SX1250_EU868_BOARD: BoardProfile = BoardProfile {
    name: "",
    description: "",
    sx1302_reset: 17,
    power_enable: None,
    sx1261_reset: None,
    temperature_sensor: None,
    rssi_offset: -215.4,
    rssi_tcomp: TCOMP,
    tx_freq_min_hz: 863_000_000,
    tx_freq_max_hz: 870_000_000,
    tx_gains: SX1250_EU868,
};

static BOARDS: &[BoardProfile] = &[
    BoardProfile {
        name: "semtech_corecell",
        description: "Semtech SX1302 CoreCell reference design",
        sx1302_reset: 23,
        power_enable: Some(18),
        sx1261_reset: Some(22),
        temperature_sensor: STTS751_ON_I2C1,
        ..SX1250_EU868_BOARD
    },
    BoardProfile {
        name: "seeed_wm1302",
        description: "Seeed WM1302 (SPI)",
        power_enable: Some(18),
        sx1261_reset: Some(5),
        temperature_sensor: STTS751_ON_I2C1,
        ..SX1250_EU868_BOARD
    },
    BoardProfile {
        name: "rak2287",
        description: "RAKwireless RAK2287 (SPI)",
        ..SX1250_EU868_BOARD
    },
    BoardProfile {
        name: "rak5146",
        description: "RAKwireless RAK5146 (SX1303, SPI)",
        ..SX1250_EU868_BOARD
    },
];

pub fn profile(name: &str) -> Option<&'static BoardProfile> {
    BOARDS.iter().find(|b| b.name == name)
}

pub fn known() -> Vec<&'static str> {
    BOARDS.iter().map(|b| b.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpio_lines_are_those_of_the_board_documentation() {
        // (board, SX1302 reset, power enable, SX1261 reset, temperature sensor): docs/sx1302.md
        let table = [
            ("semtech_corecell", 23, Some(18), Some(22), true),
            ("seeed_wm1302", 17, Some(18), Some(5), true),
            ("rak2287", 17, None, None, false),
            ("rak5146", 17, None, None, false),
        ];
        for (name, reset, power, sx1261, sensor) in table {
            let b = profile(name).unwrap();
            assert_eq!(
                (
                    b.sx1302_reset,
                    b.power_enable,
                    b.sx1261_reset,
                    b.temperature_sensor.is_some()
                ),
                (reset, power, sx1261, sensor),
                "{name}"
            );
        }
        assert_eq!(known().len(), table.len());
    }

    #[test]
    fn every_gain_table_is_sorted_by_power_and_fits_the_hal() {
        for b in BOARDS {
            assert!(b.tx_gains.len() <= 16, "{}", b.name);
            assert!(
                b.tx_gains.windows(2).all(|w| w[0].rf_power < w[1].rf_power),
                "{}",
                b.name
            );
        }
    }
}
