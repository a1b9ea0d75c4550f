//! Every struct layout in the bindings must equal the one measured on the real V2.1.0 headers,
//! so that a gateway build linking the real libloragw marshals exactly what the simulator does.
use core::mem::{align_of, offset_of, size_of};
use sx1302_hal_sys::*;

macro_rules! layout {
    ($out:ident; $($ty:ident { $($field:ident),* })*) => {
        $(
            $out.push((concat!(stringify!($ty), ".SIZE"), size_of::<$ty>()));
            $out.push((concat!(stringify!($ty), ".ALIGN"), align_of::<$ty>()));
            $( $out.push((concat!(stringify!($ty), ".", stringify!($field)), offset_of!($ty, $field))); )*
        )*
    };
}

fn measured_here() -> Vec<(&'static str, usize)> {
    let mut v = Vec::new();
    layout!(v;
        lgw_conf_board_s { lorawan_public, clksrc, full_duplex, com_type, com_path }
        lgw_rssi_tcomp_s { coeff_a, coeff_b, coeff_c, coeff_d, coeff_e }
        lgw_conf_rxrf_s { enable, freq_hz, rssi_offset, rssi_tcomp, type_, tx_enable, single_input_mode }
        lgw_conf_rxif_s { enable, rf_chain, freq_hz, bandwidth, datarate, sync_word_size, sync_word,
                          implicit_hdr, implicit_payload_length, implicit_crc_en, implicit_coderate }
        lgw_conf_demod_s { multisf_datarate }
        lgw_pkt_rx_s { freq_hz, freq_offset, if_chain, status, count_us, rf_chain, modem_id, modulation,
                       bandwidth, datarate, coderate, rssic, rssis, snr, snr_min, snr_max, crc, size,
                       payload, ftime_received, ftime }
        lgw_pkt_tx_s { freq_hz, tx_mode, count_us, rf_chain, rf_power, modulation, freq_offset, bandwidth,
                       datarate, coderate, invert_pol, f_dev, preamble, no_crc, no_header, size, payload }
        lgw_tx_gain_s { rf_power, dig_gain, pa_gain, dac_gain, mix_gain, offset_i, offset_q, pwr_idx }
        lgw_tx_gain_lut_s { lut, size }
        lgw_conf_ftime_s { enable, mode }
        lgw_conf_chan_lbt_s { freq_hz, bandwidth, scan_time_us, transmit_time_ms }
        lgw_conf_lbt_s { enable, rssi_target, nb_channel, channels }
        lgw_conf_sx1261_s { enable, spi_path, rssi_offset, lbt_conf }
    );
    v.push(("sizeof(lgw_radio_type_t)", size_of::<lgw_radio_type_t>()));
    v.push(("sizeof(lgw_com_type_t)", size_of::<lgw_com_type_t>()));
    v.push(("sizeof(lgw_ftime_mode_t)", size_of::<lgw_ftime_mode_t>()));
    v.push((
        "sizeof(lgw_lbt_scan_time_t)",
        size_of::<lgw_lbt_scan_time_t>(),
    ));
    v.push(("sizeof(bool)", size_of::<bool>()));
    v
}

/// Column of the table for the target the test runs on.
fn column() -> usize {
    if cfg!(target_pointer_width = "64") {
        1
    } else {
        3
    }
}

#[test]
fn every_struct_matches_the_v2_1_0_table_row_for_row() {
    let table = include_str!("libloragw-v2.1.0-layout.txt");
    let expected: Vec<(String, usize)> = table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let name = cols[0].replace(".type", ".type_");
            (name, cols[column()].parse().unwrap())
        })
        .collect();
    let here = measured_here();
    let mut mismatches = Vec::new();
    for (name, want) in &expected {
        match here.iter().find(|(n, _)| n == name) {
            Some((_, got)) if got == want => {}
            Some((_, got)) => mismatches.push(format!("{name}: table {want}, bindings {got}")),
            None => mismatches.push(format!("{name}: in the table but not checked")),
        }
    }
    // Every row checked here must come from the table, so neither side can silently shrink.
    assert_eq!(expected.len(), here.len(), "table rows vs checked rows");
    assert!(
        mismatches.is_empty(),
        "layout mismatches:\n{}",
        mismatches.join("\n")
    );
}
