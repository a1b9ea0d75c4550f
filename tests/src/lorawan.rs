//! LoRaWAN 1.0 uplinks as a real device makes them (encrypted FRMPayload, MIC), with lrwn.

use lrwn::{
    AES128Key, DevAddr, FCtrl, FRMPayload, FType, MACCommandSet, MACPayload, Major, Payload,
    PhyPayload, FHDR, MHDR,
};

pub struct Device {
    pub dev_eui: &'static str,
    pub dev_addr: [u8; 4],
    pub nwk_s_key: [u8; 16],
    pub app_s_key: [u8; 16],
}

impl Device {
    /// An unconfirmed data uplink with the full 32-bit counter `fcnt` (16 bits go on air).
    pub fn uplink(&self, fcnt: u32, fport: u8, data: &[u8]) -> Vec<u8> {
        let devaddr = DevAddr::from_be_bytes(self.dev_addr);
        let mut p = PhyPayload {
            mhdr: MHDR {
                f_type: FType::UnconfirmedDataUp,
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
        };
        let app = AES128Key::from_bytes(self.app_s_key);
        let nwk = AES128Key::from_bytes(self.nwk_s_key);
        p.encrypt_frm_payload(&app).expect("encrypt");
        p.set_uplink_data_mic(lrwn::MACVersion::LoRaWAN1_0, 0, 0, 0, &nwk, &nwk)
            .expect("mic");
        p.to_vec().expect("encode")
    }

    /// The keys file entry.
    pub fn keys_toml(&self) -> String {
        format!(
            "[[device]]\ndev_eui = \"{}\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
            self.dev_eui,
            hex::encode(self.dev_addr),
            hex::encode(self.nwk_s_key),
            hex::encode(self.app_s_key)
        )
    }
}

/// The published test vector's session (lora-packet's README, the shared doc): uplink
/// `40F17DBE4900020001954378762B11FF0D`, downlink FPort 10 FCntDown 5 `01003C` →
/// `60F17DBE490005000A3FAF5E46ADEB14`.
pub const VECTOR: Device = Device {
    dev_eui: "0000000000000001",
    dev_addr: [0x49, 0xBE, 0x7D, 0xF1],
    nwk_s_key: [
        0x44, 0x02, 0x42, 0x41, 0xed, 0x4c, 0xe9, 0xa6, 0x8c, 0x6a, 0x8b, 0xc0, 0x55, 0x23, 0x3f,
        0xd3,
    ],
    app_s_key: [
        0xec, 0x92, 0x58, 0x02, 0xae, 0x43, 0x0c, 0xa7, 0x7f, 0xd3, 0xdd, 0x73, 0xcb, 0x2c, 0xc5,
        0x88,
    ],
};

/// The wet-well level sensor of `RULES`.
pub const SENSOR: Device = Device {
    dev_eui: "70b3d57ed0001a01",
    dev_addr: [0x26, 0x01, 0x1B, 0xDA],
    nwk_s_key: [0x11; 16],
    app_s_key: [0x22; 16],
};

/// The same wet-well sensor after a rejoin: same DevEUI, a new DevAddr and new keys.
pub const SENSOR_REJOINED: Device = Device {
    dev_eui: "70b3d57ed0001a01",
    dev_addr: [0x26, 0x01, 0x77, 0x01],
    nwk_s_key: [0x55; 16],
    app_s_key: [0x66; 16],
};

impl Device {
    /// The FRMPayload of `data` sent by this device at `fcnt`, as an agent holding
    /// `wrong_app_s_key` decrypts it (LoRaWAN 1.0's MIC does not cover the AppSKey: noise).
    pub fn read_with_app_key(&self, fcnt: u32, data: &[u8], wrong_app_s_key: [u8; 16]) -> Vec<u8> {
        let devaddr = DevAddr::from_be_bytes(self.dev_addr);
        let on_air = lrwn::encrypt_frm_payload(
            &AES128Key::from_bytes(self.app_s_key),
            true,
            &devaddr,
            fcnt,
            data,
        )
        .expect("encrypt");
        lrwn::encrypt_frm_payload(
            &AES128Key::from_bytes(wrong_app_s_key),
            true,
            &devaddr,
            fcnt,
            &on_air,
        )
        .expect("decrypt")
    }
}

/// One pump under local level control with a dry-run interlock, a simulated relay, short
/// min run and min off so that tests and benchmarks see many transitions.
pub const RULES: &str = r#"version = 1

[[device]]
dev_eui = "70B3D57ED0001A01"
decoder = "layout"
fport = 2
  [[device.field]]
  name = "water_level_m"
  offset = 0
  type = "u16"
  scale = 0.001

[[sensor]]
id = "wet_well_level"
device = "70B3D57ED0001A01"
field = "water_level_m"
valid_range = [0.0, 4.0]
max_age = "10m"

[[pump]]
id = "P1"
safe_state = "off"
actuator = { kind = "simulated", file = "relay.jsonl" }
max_run = "2h"
min_run = "1s"
min_off = "2s"
max_starts_per_hour = 10
remote_lease_max = "30m"

  [[pump.interlock]]
  id = "dry_run"
  sensor = "wet_well_level"
  trip_below = 0.40
  reset_at = 0.60

  [pump.auto]
  sensor = "wet_well_level"
  mode = "empty"
  start_at = 2.5
  stop_at = 1.0
"#;

/// The sensor's payload: the level in millimetres, big-endian.
pub fn level(mm: u16) -> Vec<u8> {
    mm.to_be_bytes().to_vec()
}

/// The Class C pump actuator of `RULES_CLASS_C`.
pub const ACTUATOR: Device = Device {
    dev_eui: "a84041000181abcd",
    dev_addr: [0x26, 0x01, 0x2C, 0x0C],
    nwk_s_key: [0x33; 16],
    app_s_key: [0x44; 16],
};

/// A downlink as the device would check it: MIC over the full counter, FRMPayload decrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct Downlink {
    pub dev_addr: [u8; 4],
    pub fcnt: u32,
    pub fport: u8,
    pub payload: Vec<u8>,
}

impl Device {
    /// Checks an unconfirmed downlink made for this device with counter high bits `high`
    /// (the 16 low bits are on air). Err says why the device would drop it.
    pub fn open_downlink(&self, phy: &[u8], high: u32) -> Result<Downlink, String> {
        let mut p = PhyPayload::from_slice(phy).map_err(|e| e.to_string())?;
        if p.mhdr.f_type != FType::UnconfirmedDataDown {
            return Err(format!("{:?}", p.mhdr.f_type));
        }
        let (dev_addr, f_cnt) = match &mut p.payload {
            Payload::MACPayload(pl) => {
                pl.fhdr.f_cnt = (high << 16) | (pl.fhdr.f_cnt & 0xFFFF);
                (pl.fhdr.devaddr.to_be_bytes(), pl.fhdr.f_cnt)
            }
            _ => return Err("not a data frame".into()),
        };
        let nwk = AES128Key::from_bytes(self.nwk_s_key);
        if !p
            .validate_downlink_data_mic(lrwn::MACVersion::LoRaWAN1_0, 0, &nwk)
            .map_err(|e| e.to_string())?
        {
            return Err(format!("bad MIC (FCntDown {f_cnt})"));
        }
        p.decrypt_frm_payload(&AES128Key::from_bytes(self.app_s_key))
            .map_err(|e| e.to_string())?;
        let Payload::MACPayload(pl) = p.payload else {
            unreachable!()
        };
        let payload = match pl.frm_payload {
            Some(FRMPayload::Raw(b)) => b,
            other => return Err(format!("{other:?}")),
        };
        Ok(Downlink {
            dev_addr,
            fcnt: f_cnt,
            fport: pl.f_port.unwrap_or(0),
            payload,
        })
    }
}

/// The level sensor and pump of `RULES`, the pump driven by the Class C `ACTUATOR` (status
/// uplink on FPort 3, byte 0 = relay closed). `{confirm}`, `{retries}` are filled in by
/// `rules_class_c`.
pub fn rules_class_c(confirm: &str, retries: u32) -> String {
    RULES
        .replace(
            "[[sensor]]",
            "[[device]]\ndev_eui = \"A84041000181ABCD\"\ndecoder = \"layout\"\nfport = 3\n  [[device.field]]\n  name = \"relay\"\n  offset = 0\n  type = \"u8\"\n\n[[sensor]]",
        )
        .replace(
            "actuator = { kind = \"simulated\", file = \"relay.jsonl\" }",
            &format!("actuator = {{ kind = \"lorawan_class_c\", device = \"A84041000181ABCD\", fport = 1, on_hex = \"05010014\", off_hex = \"030000\", lease = \"20s\", refresh = \"5s\", feedback = \"relay\", confirm_within = \"{confirm}\", retries = {retries} }}"),
        )
}

/// Both devices' keys.
pub fn keys_class_c() -> String {
    format!("{}\n{}", SENSOR.keys_toml(), ACTUATOR.keys_toml())
}

/// The actuator's status uplink.
pub fn relay_status(running: bool) -> Vec<u8> {
    vec![running as u8]
}
