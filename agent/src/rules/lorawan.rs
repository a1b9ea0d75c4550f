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
    /// `id()`, computed once.
    id: String,
    /// Last accepted 32-bit uplink counter of this session (in this run, or kept from an
    /// earlier one).
    pub last_fcnt: Option<u32>,
    /// A frame was accepted in this run: the counter is known for sure, and a frame can only
    /// have the next one (or be a replay). Until then the device may be far from the kept
    /// counter or the keys file's `fcnt_up`, and the high bits are searched.
    verified: bool,
    /// The keys file's floor for the uplink counter (the next one expected).
    pub fcnt_up: Option<u32>,
    /// The keys file's floor for the downlink counter.
    pub fcnt_down: Option<u32>,
}

/// Until a frame confirms a session's counter in this run, the high 16 bits of the counter are
/// searched this far on each side of the known counter's (from 0 when none is known): 2^24
/// frames, 318 years at one every 10 minutes. Each candidate is one AES-CMAC; a frame that
/// matches none costs them all. The search widens a forger's odds against the 32-bit MIC from
/// 2^-32 to 2^-24 (2^-23 with a known counter) per frame, until the session's first accepted
/// frame.
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

/// An unconfirmed data frame, not yet encrypted nor signed.
fn data_frame(
    f_type: lrwn::FType,
    devaddr: DevAddr,
    fcnt: u32,
    fport: u8,
    data: &[u8],
) -> PhyPayload {
    use lrwn::{FCtrl, MACCommandSet, MACPayload, Major, FHDR, MHDR};
    PhyPayload {
        mhdr: MHDR {
            f_type,
            major: Major::LoRaWANR1,
        },
        payload: Payload::MACPayload(MACPayload {
            fhdr: FHDR {
                devaddr,
                f_ctrl: FCtrl::default(),
                f_cnt: fcnt,
                f_opts: MACCommandSet::new(vec![]),
            },
            f_port: Some(fport),
            frm_payload: Some(FRMPayload::Raw(data.to_vec())),
        }),
        mic: None,
    }
}

impl Session {
    pub fn new(
        dev_eui: String,
        dev_addr: DevAddr,
        nwk_s_key: AES128Key,
        app_s_key: AES128Key,
        fcnt_up: Option<u32>,
        fcnt_down: Option<u32>,
    ) -> Session {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(nwk_s_key.to_bytes());
        h.update(app_s_key.to_bytes());
        let id = format!("{dev_addr}-{}", hex::encode(&h.finalize()[..6]));
        Session {
            dev_eui,
            dev_addr,
            nwk_s_key,
            app_s_key,
            id,
            last_fcnt: None,
            verified: false,
            fcnt_up,
            fcnt_down,
        }
    }

    /// An unconfirmed data downlink (LoRaWAN 1.0): FRMPayload encrypted with the AppSKey, MIC
    /// with the NwkSKey, 16 bits of `fcnt_down` on air.
    pub fn downlink(&self, fcnt_down: u32, fport: u8, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut p = data_frame(
            lrwn::FType::UnconfirmedDataDown,
            self.dev_addr,
            fcnt_down,
            fport,
            data,
        );
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
    pub fn id(&self) -> &str {
        &self.id
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
            out.push(Session::new(
                eui,
                dev_addr,
                nwk_s_key,
                app_s_key,
                d.fcnt_up,
                d.fcnt_down,
            ));
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
        found: Found,
    },
    /// The MIC matches an already accepted (or older) counter: a replay.
    Replay {
        session: usize,
        fcnt: u32,
    },
    /// The MIC matches no counter tried: corrupted, forged, or keys that do not match the
    /// device's session. `expected`: the next counter, when one was known; `searched`: the
    /// lowest and highest counter of the window that was searched too, if it was.
    BadMic {
        session: usize,
        expected: Option<u32>,
        searched: Option<(u32, u32)>,
    },
    Malformed {
        session: usize,
        why: String,
    },
}

/// How an accepted frame's counter was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The next one after the session's counter.
    Next,
    /// By searching the high bits: no counter was known (`known: None`), or the frame was
    /// further above the one kept from an earlier run or the keys file's `fcnt_up` than the 16
    /// bits on air can say.
    Searched { known: Option<u32> },
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
            searched: None,
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
        let s = &self.sessions[si];
        let key = s.nwk_s_key;
        let mic_ok = |p: &mut PhyPayload, fcnt: u32| -> bool {
            if let Payload::MACPayload(pl) = &mut p.payload {
                pl.fhdr.f_cnt = fcnt;
            }
            p.validate_uplink_data_mic(MACVersion::LoRaWAN1_0, 0, 0, 0, &key, &key)
                .unwrap_or(false)
        };
        let (last, verified) = (s.known_last(), s.verified);
        let mut tried = [None, None];
        if let Some(last) = last {
            // The next counter with these 16 low bits; with a counter confirmed in this run, the
            // only one a frame can have (or the same bits at or below it: a replay).
            let c = (last & 0xFFFF_0000) | on_air;
            let next = if c <= last {
                c.wrapping_add(0x1_0000)
            } else {
                c
            };
            if next > last && mic_ok(&mut p, next) {
                return self.accept(si, p, next, Found::Next);
            }
            let old = if next > last {
                next.checked_sub(0x1_0000)
            } else {
                Some(next)
            };
            let old = old.or(Some(c)).filter(|o| *o <= last);
            if let Some(o) = old {
                if mic_ok(&mut p, o) {
                    return Verdict::Replay {
                        session: si,
                        fcnt: o,
                    };
                }
            }
            tried = [Some(next), old];
            if verified {
                return Verdict::BadMic {
                    session: si,
                    expected: (next > last).then_some(next),
                    searched: None,
                };
            }
        }
        // No counter confirmed by a frame in this run: none known, or one kept from an earlier
        // run or the keys file's `fcnt_up` that the device may be far from (more than 65 536
        // frames missed, a stale `fcnt_up`, set too high). The 16 bits on air under each high
        // part around the known one in turn.
        let base = last.map_or(0, |l| l >> 16);
        let (lo, hi) = (
            base.saturating_sub(SEARCH_HIGH_MAX),
            (base + SEARCH_HIGH_MAX).min(0xFFFF),
        );
        for high in lo..=hi {
            let fcnt = (high << 16) | on_air;
            if tried.contains(&Some(fcnt)) || !mic_ok(&mut p, fcnt) {
                continue;
            }
            return match last {
                Some(l) if fcnt <= l => Verdict::Replay { session: si, fcnt },
                known => self.accept(si, p, fcnt, Found::Searched { known }),
            };
        }
        Verdict::BadMic {
            session: si,
            expected: tried[0].filter(|n| last.is_some_and(|l| *n > l)),
            searched: Some((lo << 16, (hi << 16) | 0xFFFF)),
        }
    }

    /// A frame whose MIC matched at `fcnt`: the session's counter advances, the payload is
    /// decrypted.
    fn accept(&mut self, si: usize, mut p: PhyPayload, fcnt: u32, found: Found) -> Verdict {
        let s = &mut self.sessions[si];
        s.last_fcnt = Some(fcnt);
        s.verified = true;
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
            found,
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
    let mut p = data_frame(
        lrwn::FType::UnconfirmedDataUp,
        DevAddr::from_be_bytes(dev_addr),
        fcnt,
        fport,
        data,
    );
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

    fn key(h: &str) -> AES128Key {
        AES128Key::from_bytes(hex::decode(h).unwrap().try_into().unwrap())
    }

    /// The published vector's session (lora-packet's README, shared doc).
    fn vector_session() -> Session {
        Session::new(
            "0000000000000001".into(),
            DevAddr::from_be_bytes([0x49, 0xBE, 0x7D, 0xF1]),
            key("44024241ed4ce9a68c6a8bc055233fd3"),
            key("ec925802ae430ca77fd3dd73cb2cc588"),
            None,
            None,
        )
    }

    fn vector() -> Sessions {
        Sessions::new(vec![vector_session()])
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

    fn accepted_at(v: Verdict) -> (u32, Found) {
        match v {
            Verdict::Accepted { fcnt, found, .. } => (fcnt, found),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_sensor_already_past_65535_is_found_by_searching_the_high_bits() {
        let mut s = vector();
        let frame = uplink(&s.sessions[0], 70_000, b"x");
        match s.check(&frame) {
            Verdict::Accepted {
                fcnt,
                found,
                payload,
                ..
            } => {
                assert_eq!(
                    (fcnt, found, payload),
                    (70_000, Found::Searched { known: None }, b"x".to_vec())
                );
            }
            v => panic!("{v:?}"),
        }
        // Known from then on: the next one is checked at one counter, no search.
        let next = uplink(&s.sessions[0], 70_001, b"y");
        assert_eq!(accepted_at(s.check(&next)), (70_001, Found::Next));
        // And across the next rollover of the 16 bits on air.
        let over = uplink(&s.sessions[0], 131_073, b"z");
        assert_eq!(accepted_at(s.check(&over)), (131_073, Found::Next));
        // Once confirmed in this run, a frame more than 65 536 ahead is not searched for.
        let far = uplink(&s.sessions[0], 300_000, b"w");
        assert_eq!(
            s.check(&far),
            Verdict::BadMic {
                session: 0,
                // The next counter after 131 073 with 300 000's 16 low bits.
                expected: Some(131_072 + (300_000 & 0xFFFF)),
                searched: None
            }
        );
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
        assert_eq!(accepted_at(s.check(&at)), (200_000, Found::Next));
    }

    #[test]
    fn a_stale_fcnt_up_or_kept_counter_far_below_the_device_is_searched_past() {
        let found = |known| Found::Searched { known: Some(known) };
        // (fcnt_up, kept counter, the device's counter, the verdict)
        let cases = [
            // fcnt_up copied long ago: the device is more than 65 536 frames further.
            (Some(1_000), None, 70_000, Ok((70_000, found(999)))),
            // A counter kept from an earlier run, the gateway off for more than 65 536 frames.
            (None, Some(5), 200_000, Ok((200_000, found(5)))),
            // The window is around the known counter: past 2^24 too.
            (
                Some(20_000_000),
                None,
                20_100_000,
                Ok((20_100_000, found(19_999_999))),
            ),
            // An fcnt_up set far too high: the device's frames are found below it, replays
            // (not "bad MIC").
            (
                Some(700_000),
                None,
                70_000,
                Err(Verdict::Replay {
                    session: 0,
                    fcnt: 70_000,
                }),
            ),
            // No counter known: a device past 2^24 is outside the window, and the verdict says
            // which window was searched.
            (
                None,
                None,
                (1 << 24) + 5,
                Err(Verdict::BadMic {
                    session: 0,
                    expected: None,
                    searched: Some((0, 0xFF_FFFF)),
                }),
            ),
        ];
        for (fcnt_up, kept, device, want) in cases {
            let mut s = vector();
            s.sessions[0].fcnt_up = fcnt_up;
            s.sessions[0].last_fcnt = kept;
            let v = s.check(&uplink(&s.sessions[0], device, b"x"));
            match want {
                Ok(at) => assert_eq!(accepted_at(v), at, "{fcnt_up:?} {kept:?} {device}"),
                Err(verdict) => assert_eq!(v, verdict, "{fcnt_up:?} {kept:?} {device}"),
            }
        }
    }

    #[test]
    fn a_wrong_nwk_s_key_fails_at_every_counter_and_says_which_was_expected() {
        let mut s = vector();
        let mut other = vector_session();
        other.nwk_s_key = AES128Key::from_bytes([7; 16]);
        let frame = uplink(&other, 5, b"x");
        assert_eq!(
            s.check(&frame),
            Verdict::BadMic {
                session: 0,
                expected: None,
                searched: Some((0, 0xFF_FFFF))
            }
        );
        s.sessions[0].last_fcnt = Some(3);
        assert_eq!(
            s.check(&frame),
            Verdict::BadMic {
                session: 0,
                expected: Some(5),
                searched: Some((0, 0xFF_FFFF))
            }
        );
    }

    #[test]
    fn a_new_devaddr_or_new_keys_is_another_session() {
        let base = vector_session();
        let other = |addr: [u8; 4], app: AES128Key| {
            Session::new(
                base.dev_eui.clone(),
                DevAddr::from_be_bytes(addr),
                base.nwk_s_key,
                app,
                None,
                None,
            )
        };
        let addr = base.dev_addr.to_be_bytes();
        assert_eq!(base.id(), other(addr, base.app_s_key).id());
        assert_ne!(base.id(), other([1, 2, 3, 4], base.app_s_key).id());
        assert_ne!(base.id(), other(addr, AES128Key::from_bytes([9; 16])).id());
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
                found: Found::Searched { known: None },
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
                expected: None,
                searched: Some((0, 0xFF_FFFF))
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
        for i in 0..20_000 {
            // The first ones with the counter unknown (each searched: 256 MICs), the rest with
            // a counter confirmed in this run.
            if i == 1_000 {
                s.sessions[0].last_fcnt = Some(10);
                s.sessions[0].verified = true;
            }
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
