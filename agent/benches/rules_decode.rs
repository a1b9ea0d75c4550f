//! The cost of the rules' per-frame work: session lookup, MIC check with the 32-bit counter,
//! FRMPayload decryption, payload decoding.
//!
//! `cargo bench -p lora-edge --bench rules_decode`
//!
//! Prints nanoseconds per frame for: a frame of a device the rules do not know (DevAddr lookup
//! only), an accepted frame (MIC + decryption), a bad-MIC frame, the high-bit search of a
//! session whose counter is not known (near, at the end of the window, and a frame that fails
//! it all), a layout decode and a Cayenne LPP decode.

use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use lora_edge::rules::decoder::{Decoder, Endian, FieldType, LayoutField};
use lora_edge::rules::lorawan::{load_keys, Found, Sessions, Verdict};
use lrwn::{
    AES128Key, DevAddr, FCtrl, FRMPayload, FType, MACCommandSet, MACPayload, Major, Payload,
    PhyPayload, FHDR, MHDR,
};

const NWK: [u8; 16] = [0x11; 16];
const APP: [u8; 16] = [0x22; 16];
const ADDR: [u8; 4] = [0x26, 0x01, 0x1B, 0xDA];

fn uplink(fcnt: u32, data: &[u8]) -> Vec<u8> {
    let mut p = PhyPayload {
        mhdr: MHDR {
            f_type: FType::UnconfirmedDataUp,
            major: Major::LoRaWANR1,
        },
        payload: Payload::MACPayload(MACPayload {
            fhdr: FHDR {
                devaddr: DevAddr::from_be_bytes(ADDR),
                f_ctrl: FCtrl::default(),
                f_cnt: fcnt,
                f_opts: MACCommandSet::new(vec![]),
            },
            f_port: Some(2),
            frm_payload: Some(FRMPayload::Raw(data.to_vec())),
        }),
        mic: None,
    };
    p.encrypt_frm_payload(&AES128Key::from_bytes(APP)).unwrap();
    let k = AES128Key::from_bytes(NWK);
    p.set_uplink_data_mic(lrwn::MACVersion::LoRaWAN1_0, 0, 0, 0, &k, &k)
        .unwrap();
    p.to_vec().unwrap()
}

fn per_frame(name: &str, n: u64, mut f: impl FnMut(u64)) {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>9.0} ns/frame");
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[device]]\ndev_eui = \"70b3d57ed0001a01\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
            hex::encode(ADDR),
            hex::encode(NWK),
            hex::encode(APP)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut sessions = Sessions::new(load_keys(&keys).unwrap());
    const N: u64 = 20_000;
    let frames: Vec<Vec<u8>> = (1..=N as u32)
        .map(|f| uplink(f, &[0x09, 0xC4, 0x0C, 0xE4]))
        .collect();
    println!("lora-edge rules: per-frame cost (release, one core of the 2-core machine)");
    let mut other = frames[0].clone();
    other[1] ^= 0xFF;
    per_frame(
        "frame of another device (DevAddr lookup)",
        1_000_000,
        |_| {
            black_box(sessions.check(black_box(&other)));
        },
    );
    per_frame("accepted frame (MIC, counter, decryption)", N, |i| {
        let v = sessions.check(black_box(&frames[i as usize]));
        assert!(matches!(v, Verdict::Accepted { .. }), "{v:?}");
    });
    let mut bad = frames[0].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    per_frame("bad MIC (two MIC computations)", N, |_| {
        black_box(sessions.check(black_box(&bad)));
    });
    // No counter known for the session (a new session, no fcnt_up): the high 16 bits searched.
    let near = uplink(70_000, &[0x09, 0xC4]);
    per_frame("no counter known, found at high bits 1 (2 MICs)", N, |_| {
        sessions.sessions[0].last_fcnt = None;
        let v = sessions.check(black_box(&near));
        assert!(
            matches!(
                v,
                Verdict::Accepted {
                    found: Found::Searched { .. },
                    ..
                }
            ),
            "{v:?}"
        );
    });
    let far = uplink(0xFF_0001, &[0x09, 0xC4]);
    per_frame(
        "no counter known, found at high bits 255 (256 MICs)",
        2_000,
        |_| {
            sessions.sessions[0].last_fcnt = None;
            let v = sessions.check(black_box(&far));
            assert!(
                matches!(
                    v,
                    Verdict::Accepted {
                        found: Found::Searched { .. },
                        ..
                    }
                ),
                "{v:?}"
            );
        },
    );
    per_frame("no counter known, bad MIC (256 MICs)", 2_000, |_| {
        sessions.sessions[0].last_fcnt = None;
        black_box(sessions.check(black_box(&bad)));
    });
    // A counter kept from an earlier run (or fcnt_up), not yet confirmed in this one: a bad
    // frame is searched for on both sides of it (511 MICs).
    let mut restarted = Sessions::new(load_keys(&keys).unwrap());
    restarted.sessions[0].last_fcnt = Some(0x0080_0000);
    per_frame(
        "counter kept, not confirmed yet, bad MIC (513 MICs)",
        2_000,
        |_| {
            black_box(restarted.check(black_box(&bad)));
        },
    );
    let layout = Decoder::Layout(vec![
        LayoutField {
            name: "water_level_m".into(),
            offset: 0,
            ty: FieldType::U16,
            endian: Endian::Big,
            scale: 0.001,
            add: 0.0,
        },
        LayoutField {
            name: "battery_v".into(),
            offset: 2,
            ty: FieldType::U16,
            endian: Endian::Big,
            scale: 0.001,
            add: 0.0,
        },
    ]);
    per_frame("layout decode, 2 fields", 1_000_000, |_| {
        black_box(layout.decode(black_box(&[0x09, 0xC4, 0x0C, 0xE4])));
    });
    let lpp = hex::decode("0102012C02670110030200FA").unwrap();
    per_frame("Cayenne LPP decode, 3 values", 1_000_000, |_| {
        black_box(Decoder::CayenneLpp.decode(black_box(&lpp)));
    });
}
