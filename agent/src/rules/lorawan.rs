//! The sessions of the devices the rules read: keys from `rules.keys_file`, the MIC checked with
//! the 32-bit frame counter rebuilt from the 16 bits on air (rollover included), replays and old
//! counters dropped, FRMPayload decrypted. LoRaWAN 1.0.x (the devices of this network), with
//! ChirpStack's `lrwn` crate for the cryptography.
//!
//! Keys are never logged nor put in a message; the keys file is refused if others can read it.

use std::collections::HashMap;
use std::path::Path;

use lrwn::{AES128Key, DevAddr, FRMPayload, MACVersion, Payload, PhyPayload};
use serde::Deserialize;

use crate::config::{at, deserialize_all, find_field, secret};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default)]
    device: Vec<RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    dev_eui: String,
    dev_addr: String,
    nwk_s_key: String,
    app_s_key: String,
    /// Next downlink frame counter the device expects (a Class C actuator's), e.g. from the
    /// network server at hand-over; the agent never goes below it.
    fcnt_down: Option<u32>,
    /// Next uplink frame counter of this session (ChirpStack's `fCntUp`): counters below it are
    /// replays. Without it and without a stored counter, the high 16 bits are searched.
    fcnt_up: Option<u32>,
}

/// One device's ABP-style session.
#[derive(Clone)]
pub struct Session {
    pub dev_eui: String,
    dev_addr: DevAddr,
    nwk_s_key: AES128Key,
    app_s_key: AES128Key,
    /// Last accepted 32-bit uplink counter of this session.
    pub last_fcnt: Option<u32>,
    /// The keys file's floor for the uplink counter (the next one expected).
    pub fcnt_up: Option<u32>,
    /// The keys file's floor for the downlink counter.
    pub fcnt_down: Option<u32>,
}

/// When no counter is known for a session, the high 16 bits of the counter are searched up to
/// this (counters below 2^24: 16.7 million frames, 318 years at one every 10 minutes). Each
/// candidate is one AES-CMAC; a frame that matches none costs them all. The search widens a
/// forger's odds against the 32-bit MIC from 2^-32 to 2^-24 per frame, for that first frame only.
pub const SEARCH_HIGH_MAX: u32 = 0xFF;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Session")
            .field("dev_eui", &self.dev_eui)
            .field("dev_addr", &self.dev_addr.to_string())
            .field("last_fcnt", &self.last_fcnt)
            .finish()
    }
}

impl Session {
    /// An unconfirmed data downlink (LoRaWAN 1.0): FRMPayload encrypted with the AppSKey, MIC
    /// with the NwkSKey, 16 bits of `fcnt_down` on air.
    pub fn downlink(&self, fcnt_down: u32, fport: u8, data: &[u8]) -> Result<Vec<u8>, String> {
        use lrwn::{FCtrl, FType, MACCommandSet, MACPayload, Major, FHDR, MHDR};
        let mut p = PhyPayload {
            mhdr: MHDR {
                f_type: FType::UnconfirmedDataDown,
                major: Major::LoRaWANR1,
            },
            payload: Payload::MACPayload(MACPayload {
                fhdr: FHDR {
                    devaddr: self.dev_addr,
                    f_ctrl: FCtrl::default(),
                    f_cnt: fcnt_down,
                    f_opts: MACCommandSet::new(vec![]),
                },
                f_port: Some(fport),
                frm_payload: Some(FRMPayload::Raw(data.to_vec())),
            }),
            mic: None,
        };
        p.encrypt_frm_payload(&self.app_s_key)
            .and_then(|_| p.set_downlink_data_mic(MACVersion::LoRaWAN1_0, 0, &self.nwk_s_key))
            .and_then(|_| p.to_vec())
            .map_err(|e| format!("building a downlink: {e}"))
    }

    /// The DevAddr, most significant byte first.
    pub fn dev_addr_bytes(&self) -> [u8; 4] {
        self.dev_addr.to_be_bytes()
    }

    /// What tells one session of a device from the next: its DevAddr and a fingerprint of its
    /// keys (never the keys). A rejoin or new keys in the keys file give another id, so the
    /// counters and readings kept for the old session do not apply to the new one.
    pub fn id(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.nwk_s_key.to_bytes());
        h.update(self.app_s_key.to_bytes());
        let digest = h.finalize();
        format!("{}-{}", self.dev_addr, hex::encode(&digest[..6]))
    }

    /// The last counter below which frames are replays: the stored one, or the keys file's
    /// floor, whichever is higher.
    fn known_last(&self) -> Option<u32> {
        let floor = self.fcnt_up.and_then(|f| f.checked_sub(1));
        match (self.last_fcnt, floor) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Loads the keys file: mode checked, every problem located, no key value in any message.
pub fn load_keys(path: &Path) -> Result<Vec<Session>, Vec<String>> {
    let bytes = secret::read(path).map_err(|e| vec![e])?;
    let text = String::from_utf8(bytes)
        .map_err(|_| vec![format!("{}: not UTF-8 text", path.display())])?;
    let locate = |field: &str| match find_field(&text, field) {
        Some(o) => format!("{}: {field}", at(path, &text, Some(o))),
        None => format!("{}: {field}", path.display()),
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The parser's message may quote the offending text: a key. Only the place is said.
        vec![format!(
            "{}: not valid TOML here",
            at(path, &text, e.span().map(|s| s.start))
        )]
    })?;
    let (raw, problems) = deserialize_all::<RawKeys>(table, |_| true);
    let mut errors: Vec<String> = problems
        .into_iter()
        .map(|(f, m)| format!("{}: {m}", locate(&f)))
        .collect();
    let Some(raw) = raw else {
        return Err(errors);
    };
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (i, d) in raw.device.iter().enumerate() {
        let f = |k: &str| locate(&format!("device.{i}.{k}"));
        let eui = d.dev_eui.to_ascii_lowercase();
        if eui.len() != 16 || hex::decode(&eui).is_err() {
            errors.push(format!(
                "{}: not 16 hexadecimal digits (a DevEUI)",
                f("dev_eui")
            ));
        } else if seen.insert(eui.clone(), i).is_some() {
            errors.push(format!(
                "{}: this device already has keys above",
                f("dev_eui")
            ));
        }
        let addr = hex::decode(&d.dev_addr)
            .ok()
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(DevAddr::from_be_bytes);
        if addr.is_none() {
            errors.push(format!(
                "{}: not 8 hexadecimal digits (a DevAddr)",
                f("dev_addr")
            ));
        }
        let key = |v: &str| -> Option<AES128Key> {
            hex::decode(v)
                .ok()
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(AES128Key::from_bytes)
        };
        let nwk = key(&d.nwk_s_key);
        let app = key(&d.app_s_key);
        for (field, k) in [("nwk_s_key", &nwk), ("app_s_key", &app)] {
            if k.is_none() {
                errors.push(format!(
                    "{}: not 32 hexadecimal digits (an AES-128 key)",
                    f(field)
                ));
            }
        }
        if let (Some(dev_addr), Some(nwk_s_key), Some(app_s_key)) = (addr, nwk, app) {
            out.push(Session {
                dev_eui: eui,
                dev_addr,
                nwk_s_key,
                app_s_key,
                last_fcnt: None,
                fcnt_up: d.fcnt_up,
                fcnt_down: d.fcnt_down,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What a frame is to the rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not an uplink of a device with keys here (most frames): ignored at no cost.
    NotOurs,
    Accepted {
        session: usize,
        fcnt: u32,
        fport: Option<u8>,
        payload: Vec<u8>,
        /// No counter was known for the session: this one was found by searching its high bits.
        searched: bool,
    },
    /// The MIC matches an already accepted (or older) counter: a replay.
    Replay {
        session: usize,
        fcnt: u32,
    },
    /// The MIC matches no counter tried: corrupted, forged, or keys that do not match the
    /// device's session. `expected`: the counter tried when one was known (else every counter
    /// of the search window was).
    BadMic {
        session: usize,
        expected: Option<u32>,
    },
    Malformed {
        session: usize,
        why: String,
    },
}

pub struct Sessions {
    pub sessions: Vec<Session>,
    by_addr: HashMap<[u8; 4], Vec<usize>>,
}

impl Sessions {
    pub fn new(sessions: Vec<Session>) -> Sessions {
        let mut by_addr: HashMap<[u8; 4], Vec<usize>> = HashMap::new();
        for (i, s) in sessions.iter().enumerate() {
            by_addr.entry(s.dev_addr.to_be_bytes()).or_default().push(i);
        }
        Sessions { sessions, by_addr }
    }

    pub fn index_of(&self, dev_eui: &str) -> Option<usize> {
        self.sessions.iter().position(|s| s.dev_eui == dev_eui)
    }

    /// Checks one PHYPayload; an accepted frame advances the session's counter.
    pub fn check(&mut self, phy: &[u8]) -> Verdict {
        // MHDR: unconfirmed (010) or confirmed (100) data up; DevAddr little-endian on air.
        let mtype = phy.first().map(|m| m >> 5);
        if !matches!(mtype, Some(2) | Some(4)) || phy.len() < 12 {
            return Verdict::NotOurs;
        }
        let addr = [phy[4], phy[3], phy[2], phy[1]];
        let Some(candidates) = self.by_addr.get(&addr).cloned() else {
            return Verdict::NotOurs;
        };
        let on_air = u16::from_le_bytes([phy[6], phy[7]]) as u32;
        // DevAddrs may collide between devices: the MIC tells which one sent it.
        let mut first_bad = None;
        for &si in &candidates {
            match self.check_session(si, phy, on_air) {
                v @ Verdict::BadMic { .. } => {
                    first_bad.get_or_insert(v);
                }
                v => return v,
            }
        }
        first_bad.unwrap_or(Verdict::BadMic {
            session: candidates[0],
            expected: None,
        })
    }

    fn check_session(&mut self, si: usize, phy: &[u8], on_air: u32) -> Verdict {
        let mut p = match PhyPayload::from_slice(phy) {
            Ok(p) => p,
            Err(e) => {
                return Verdict::Malformed {
                    session: si,
                    why: e.to_string(),
                }
            }
        };
        let key = self.sessions[si].nwk_s_key;
        let mic_ok = |p: &mut PhyPayload, fcnt: u32| -> bool {
            if let Payload::MACPayload(pl) = &mut p.payload {
                pl.fhdr.f_cnt = fcnt;
            }
            p.validate_uplink_data_mic(MACVersion::LoRaWAN1_0, 0, 0, 0, &key, &key)
                .unwrap_or(false)
        };
        let Some(last) = self.sessions[si].known_last() else {
            // Nothing known of this session's counter (first frame of a new session, no
            // `fcnt_up`): the 16 bits on air, under each high part in turn.
            for high in 0..=SEARCH_HIGH_MAX {
                let fcnt = (high << 16) | on_air;
                if mic_ok(&mut p, fcnt) {
                    return self.accept(si, p, fcnt, true);
                }
            }
            return Verdict::BadMic {
                session: si,
                expected: None,
            };
        };
        // The next counter with these 16 low bits.
        let next = {
            let c = (last & 0xFFFF_0000) | on_air;
            if c <= last {
                c.wrapping_add(0x1_0000)
            } else {
                c
            }
        };
        if next > last && mic_ok(&mut p, next) {
            return self.accept(si, p, next, false);
        }
        // The same 16 bits at or below the last accepted counter: a replay if the MIC says so.
        let old = if next > last {
            next.checked_sub(0x1_0000)
        } else {
            Some(next)
        };
        let old = old
            .or(Some((last & 0xFFFF_0000) | on_air))
            .filter(|o| *o <= last);
        if let Some(o) = old {
            if mic_ok(&mut p, o) {
                return Verdict::Replay {
                    session: si,
                    fcnt: o,
                };
            }
        }
        Verdict::BadMic {
            session: si,
            expected: (next > last).then_some(next),
        }
    }

    /// A frame whose MIC matched at `fcnt`: the session's counter advances, the payload is
    /// decrypted.
    fn accept(&mut self, si: usize, mut p: PhyPayload, fcnt: u32, searched: bool) -> Verdict {
        let s = &mut self.sessions[si];
        s.last_fcnt = Some(fcnt);
        let Payload::MACPayload(pl) = &mut p.payload else {
            return Verdict::Malformed {
                session: si,
                why: "not a data frame".into(),
            };
        };
        let fport = pl.f_port;
        let payload = match (fport, pl.frm_payload.take()) {
            (Some(port), Some(FRMPayload::Raw(data))) if port > 0 => {
                lrwn::encrypt_frm_payload(&s.app_s_key, true, &pl.fhdr.devaddr, fcnt, &data)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        Verdict::Accepted {
            session: si,
            fcnt,
            fport,
            payload,
            searched,
        }
    }
}

/// An unconfirmed uplink as the device makes it, with the full counter `fcnt` (the agent's
/// own tests; the e2e crate has an independent builder).
#[cfg(test)]
pub(crate) fn test_uplink(
    dev_addr: [u8; 4],
    nwk_s_key: [u8; 16],
    app_s_key: [u8; 16],
    fcnt: u32,
    fport: u8,
    data: &[u8],
) -> Vec<u8> {
    use lrwn::{FCtrl, FType, MACCommandSet, MACPayload, Major, FHDR, MHDR};
    let mut p = PhyPayload {
        mhdr: MHDR {
            f_type: FType::UnconfirmedDataUp,
            major: Major::LoRaWANR1,
        },
        payload: Payload::MACPayload(MACPayload {
            fhdr: FHDR {
                devaddr: DevAddr::from_be_bytes(dev_addr),
                f_ctrl: FCtrl::default(),
                f_cnt: fcnt,
                f_opts: MACCommandSet::new(vec![]),
            },
            f_port: Some(fport),
            frm_payload: Some(FRMPayload::Raw(data.to_vec())),
        }),
        mic: None,
    };
    let (nwk, app) = (
        AES128Key::from_bytes(nwk_s_key),
        AES128Key::from_bytes(app_s_key),
    );
    p.encrypt_frm_payload(&app).expect("encrypt");
    p.set_uplink_data_mic(MACVersion::LoRaWAN1_0, 0, 0, 0, &nwk, &nwk)
        .expect("mic");
    p.to_vec().expect("encode")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_downlink_builder_reproduces_the_published_vector() {
        // FPort 10, FCntDown 5, payload 01003C (three independent implementations agree).
        let s = &vector().sessions[0];
        assert_eq!(
            hex::encode_upper(s.downlink(5, 10, &[0x01, 0x00, 0x3C]).unwrap()),
            "60F17DBE490005000A3FAF5E46ADEB14"
        );
        // The counter's high bits are in the MIC, not on air.
        let high = s.downlink(5 + 65_536, 10, &[0x01, 0x00, 0x3C]).unwrap();
        assert_eq!(&high[6..8], &[0x05, 0x00]);
        assert_ne!(hex::encode_upper(high), "60F17DBE490005000A3FAF5E46ADEB14");
    }

    /// The published vector (lora-packet's README, shared doc).
    fn vector() -> Sessions {
        Sessions::new(vec![Session {
            dev_eui: "0000000000000001".into(),
            dev_addr: DevAddr::from_be_bytes([0x49, 0xBE, 0x7D, 0xF1]),
            nwk_s_key: AES128Key::from_bytes(
                hex::decode("44024241ed4ce9a68c6a8bc055233fd3")
                    .unwrap()
                    .try_into()
                    .unwrap(),
            ),
            app_s_key: AES128Key::from_bytes(
                hex::decode("ec925802ae430ca77fd3dd73cb2cc588")
                    .unwrap()
                    .try_into()
                    .unwrap(),
            ),
            last_fcnt: None,
            fcnt_up: None,
            fcnt_down: None,
        }])
    }

    fn uplink(s: &Session, fcnt: u32, data: &[u8]) -> Vec<u8> {
        test_uplink(
            s.dev_addr.to_be_bytes(),
            s.nwk_s_key.to_bytes(),
            s.app_s_key.to_bytes(),
            fcnt,
            1,
            data,
        )
    }

    #[test]
    fn a_sensor_already_past_65535_is_found_by_searching_the_high_bits() {
        let mut s = vector();
        let frame = uplink(&s.sessions[0], 70_000, b"x");
        match s.check(&frame) {
            Verdict::Accepted {
                fcnt,
                searched,
                payload,
                ..
            } => {
                assert_eq!((fcnt, searched, payload), (70_000, true, b"x".to_vec()));
            }
            v => panic!("{v:?}"),
        }
        // Known from then on: the next one is checked at one counter, no search.
        let next = uplink(&s.sessions[0], 70_001, b"y");
        assert!(matches!(
            s.check(&next),
            Verdict::Accepted {
                fcnt: 70_001,
                searched: false,
                ..
            }
        ));
        // And across the next rollover of the 16 bits on air.
        let over = uplink(&s.sessions[0], 131_073, b"z");
        assert!(matches!(
            s.check(&over),
            Verdict::Accepted { fcnt: 131_073, .. }
        ));
    }

    #[test]
    fn the_keys_files_fcnt_up_is_a_floor_and_spares_the_search() {
        let mut s = vector();
        s.sessions[0].fcnt_up = Some(200_000);
        let below = uplink(&s.sessions[0], 199_999, b"x");
        assert_eq!(
            s.check(&below),
            Verdict::Replay {
                session: 0,
                fcnt: 199_999
            }
        );
        let at = uplink(&s.sessions[0], 200_000, b"x");
        assert!(matches!(
            s.check(&at),
            Verdict::Accepted {
                fcnt: 200_000,
                searched: false,
                ..
            }
        ));
    }

    #[test]
    fn a_wrong_nwk_s_key_fails_at_every_counter_and_says_no_counter_was_known() {
        let mut s = vector();
        let mut other = s.sessions[0].clone();
        other.nwk_s_key = AES128Key::from_bytes([7; 16]);
        let frame = uplink(&other, 5, b"x");
        assert_eq!(
            s.check(&frame),
            Verdict::BadMic {
                session: 0,
                expected: None
            }
        );
        s.sessions[0].last_fcnt = Some(3);
        assert_eq!(
            s.check(&frame),
            Verdict::BadMic {
                session: 0,
                expected: Some(5)
            }
        );
    }

    #[test]
    fn a_new_devaddr_or_new_keys_is_another_session() {
        let base = vector().sessions[0].clone();
        let mut new_addr = base.clone();
        new_addr.dev_addr = DevAddr::from_be_bytes([1, 2, 3, 4]);
        let mut new_app = base.clone();
        new_app.app_s_key = AES128Key::from_bytes([9; 16]);
        assert_eq!(base.id(), vector().sessions[0].id());
        assert_ne!(base.id(), new_addr.id());
        assert_ne!(base.id(), new_app.id());
        assert!(base.id().starts_with("49be7df1-"), "{}", base.id());
    }

    const PHY: &str = "40F17DBE4900020001954378762B11FF0D";

    #[test]
    fn the_published_vector_decodes_to_test() {
        let mut s = vector();
        let v = s.check(&hex::decode(PHY).unwrap());
        assert_eq!(
            v,
            Verdict::Accepted {
                session: 0,
                fcnt: 2,
                fport: Some(1),
                payload: b"test".to_vec(),
                searched: true,
            }
        );
        // The same frame again is a replay, not a new reading.
        assert_eq!(
            s.check(&hex::decode(PHY).unwrap()),
            Verdict::Replay {
                session: 0,
                fcnt: 2
            }
        );
    }

    #[test]
    fn a_flipped_bit_fails_the_mic_and_other_devaddrs_are_not_ours() {
        let mut s = vector();
        let mut b = hex::decode(PHY).unwrap();
        b[10] ^= 1;
        assert_eq!(
            s.check(&b),
            Verdict::BadMic {
                session: 0,
                expected: None
            }
        );
        let mut other = hex::decode(PHY).unwrap();
        other[1] ^= 0xFF;
        assert_eq!(s.check(&other), Verdict::NotOurs);
        assert_eq!(s.check(&[0x40, 1, 2]), Verdict::NotOurs);
    }

    #[test]
    fn an_old_counter_below_the_last_is_refused_as_a_replay() {
        let mut s = vector();
        s.sessions[0].last_fcnt = Some(10);
        assert_eq!(
            s.check(&hex::decode(PHY).unwrap()),
            Verdict::Replay {
                session: 0,
                fcnt: 2
            }
        );
    }

    #[test]
    fn arbitrary_bytes_with_our_devaddr_never_panic() {
        let mut s = vector();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20_000 {
            let n = rng.usize(0..40);
            let mut b: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            if b.len() >= 5 {
                b[0] = 0x40;
                b[1..5].copy_from_slice(&[0xF1, 0x7D, 0xBE, 0x49]);
            }
            let _ = s.check(&b);
        }
    }
}
