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
