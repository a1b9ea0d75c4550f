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

/// The wet-well level sensor of `RULES`.
pub const SENSOR: Device = Device {
    dev_eui: "70b3d57ed0001a01",
    dev_addr: [0x26, 0x01, 0x1B, 0xDA],
    nwk_s_key: [0x11; 16],
    app_s_key: [0x22; 16],
};

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
