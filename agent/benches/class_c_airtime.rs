//! Airtime and duty-cycle share of one Class C actuator's lease refreshes, per hour, as the
//! linked HAL computes time on air (`lgw_time_on_air`: the simulator implements libloragw's
//! formula) for the frames the agent actually builds, next to the rule file's own arithmetic
//! (`class_c::airtime`, used by `lora-edge check`).
//!
//! `cargo bench -p lora-edge --bench class_c_airtime`

use lora_edge::radio::hal::{CodeRate, Concentrator, Modulation, TxMode, TxPacket};
use lora_edge::rules::class_c::airtime;

fn main() {
    let hal = Concentrator::claim().expect("the HAL");
    println!("one actuator, RX2 869.525 MHz (sub-band 869.4-869.65: 10 % = 360 s an hour), BW125 CR4/5, no CRC");
    println!(
        "{:<6} {:>9} {:>13} {:>13} {:>12} {:>13} {:>13}",
        "SF", "ON bytes", "HAL ms/frame", "check ms", "refresh", "airtime s/h", "share of hour"
    );
    for payload in [4usize, 5] {
        for sf in [7u32, 8, 9, 10, 11, 12] {
            // MHDR + DevAddr + FCtrl + FCnt + FPort + payload + MIC.
            let len = 1 + 4 + 1 + 2 + 1 + payload + 4;
            let pkt = TxPacket {
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
            };
            let hal_ms = hal.time_on_air_ms(&pkt).expect("time on air");
            let ours = airtime(sf, len).as_secs_f64() * 1000.0;
            for refresh_s in [30u32, 60] {
                let per_hour = 3600 / refresh_s;
                let s = hal_ms as f64 * per_hour as f64 / 1000.0;
                println!(
                    "SF{sf:<4} {payload:>9} {hal_ms:>13} {ours:>13.1} {:>11}s {s:>13.1} {:>12.2}%",
                    refresh_s,
                    s / 3600.0 * 100.0
                );
            }
        }
    }
}
