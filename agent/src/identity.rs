//! The gateway's identity (its ChirpStack gateway ID) without a working radio.
//!
//! A gateway whose concentrator does not start is the one the centre most needs to see, so the
//! backhaul never waits long for the concentrator's EUI. In order:
//! 1. `gateway.id`, when configured;
//! 2. the concentrator's EUI, if the radio gives it within `gateway.eui_wait` (the wait ends
//!    early when the radio's first start fails); it is kept in the store's state with the
//!    machine it was seen on;
//! 3. the EUI kept at an earlier start, if it was seen on this machine (the same network
//!    interface MAC): a gateway keeps its name when its radio dies, and a copy of its SD card
//!    in another Pi does not take it;
//! 4. derived from the machine: the EUI-64 of the first network interface (by name) with a
//!    globally unique MAC address, USB modems left out (`FF FE` inserted in its middle, as
//!    Semtech's packet forwarder scripts do), or, without one, hashed from `/etc/machine-id`.
//!    Not kept: once the radio names its EUI, the next start uses it.
//! 5. with none of these (a bare container): a random locally administered EUI-64, kept in the
//!    store.

use std::path::Path;

/// The store state key of the kept concentrator EUI and the machine it was seen on.
pub const STATE_KEY: &str = "gateway_id";

/// The store state key of a random identity, for a machine with nothing to derive one from.
pub const RANDOM_KEY: &str = "gateway_id_random";

/// A random, locally administered EUI-64.
pub fn random() -> String {
    let mut b = fastrand::u64(..).to_be_bytes();
    b[0] = (b[0] | 0x02) & !0x01;
    hex::encode(b)
}

/// How the identity was chosen, for the log and the health message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Configured,
    ConcentratorEui,
    Kept,
    NetworkInterface,
    MachineId,
    /// Random, kept in the store: nothing else was there to name the gateway.
    Random,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Source::Configured => "gateway.id",
            Source::ConcentratorEui => "the concentrator's EUI",
            Source::Kept => "the concentrator's EUI seen on this machine at an earlier start",
            Source::NetworkInterface => "derived from the MAC address of a network interface",
            Source::MachineId => "derived from /etc/machine-id",
            Source::Random => {
                "random, kept in the store (nothing on this machine to derive one from)"
            }
        }
    }
}

/// The concentrator EUI kept in the store, and the machine it was seen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub eui: String,
    pub machine: Option<String>,
}

impl Kept {
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "eui={} machine={}",
            self.eui,
            self.machine.as_deref().unwrap_or("-")
        )
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Kept> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut eui = None;
        let mut machine = None;
        for part in text.split_whitespace() {
            match part.split_once('=') {
                Some(("eui", v)) => eui = eui64(v),
                Some(("machine", "-")) => {}
                Some(("machine", v)) => machine = Some(eui64(v)?),
                _ => return None,
            }
        }
        Some(Kept { eui: eui?, machine })
    }

    /// Whether this kept EUI is this machine's: only then may it name a gateway whose radio
    /// gives none (a copied store must not).
    pub fn is_of(&self, machine: Option<&str>) -> bool {
        matches!((self.machine.as_deref(), machine), (Some(a), Some(b)) if a == b)
    }
}

fn eui64(s: &str) -> Option<String> {
    let s = s.trim().to_lowercase();
    (s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit())).then_some(s)
}

/// The machine's identity: `/sys/class/net` and `/etc/machine-id` on a real system.
pub fn derived() -> Option<(String, Source)> {
    derived_from(Path::new("/sys/class/net"), Path::new("/etc/machine-id"))
}

pub fn derived_from(net: &Path, machine_id: &Path) -> Option<(String, Source)> {
    if let Some(eui) = from_interfaces(net) {
        return Some((eui, Source::NetworkInterface));
    }
    let id = std::fs::read_to_string(machine_id).ok()?;
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut b: [u8; 8] = digest[..8].try_into().ok()?;
    // A locally administered, individual EUI-64: it claims no manufacturer's prefix.
    b[0] = (b[0] | 0x02) & !0x01;
    Some((hex::encode(b), Source::MachineId))
}

/// Drivers of USB modems and phones: many share one fixed MAC address across devices.
const MODEM_DRIVERS: [&str; 8] = [
    "cdc_ether",
    "rndis_host",
    "cdc_ncm",
    "huawei_cdc_ncm",
    "qmi_wwan",
    "cdc_mbim",
    "ipheth",
    "option",
];

fn from_interfaces(net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(net)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let driver = std::fs::read_link(net.join(&n).join("device/driver")).ok();
        if driver
            .as_ref()
            .and_then(|d| d.file_name())
            .is_some_and(|d| MODEM_DRIVERS.contains(&d.to_string_lossy().as_ref()))
        {
            return None;
        }
        let text = std::fs::read_to_string(net.join(&n).join("address")).ok()?;
        let mac: Vec<u8> = text
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<_, _>>()
            .ok()?;
        // Globally unique only: bridges, veths and randomised MACs are locally administered
        // (and may change at the next boot).
        if mac.len() != 6 || mac.iter().all(|&b| b == 0) || mac[0] & 0x03 != 0 {
            return None;
        }
        Some(format!(
            "{:02x}{:02x}{:02x}fffe{:02x}{:02x}{:02x}",
            mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(net: &Path, name: &str, mac: &str) {
        std::fs::create_dir_all(net.join(name)).unwrap();
        std::fs::write(net.join(name).join("address"), format!("{mac}\n")).unwrap();
    }

    #[test]
    fn the_first_interface_with_a_global_mac_gives_an_eui64() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("net");
        iface(&net, "lo", "00:00:00:00:00:00");
        // docker0: locally administered; wlan0 comes after eth0 by name.
        iface(&net, "docker0", "02:42:ac:11:00:02");
        iface(&net, "wlan0", "b8:27:eb:00:00:02");
        iface(&net, "eth0", "b8:27:eb:12:34:56");
        assert_eq!(
            derived_from(&net, &d.path().join("none")),
            Some(("b827ebfffe123456".into(), Source::NetworkInterface))
        );
    }

    #[test]
    fn without_a_global_mac_the_machine_id_gives_a_stable_local_eui64() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("net");
        iface(&net, "veth1", "12:34:56:78:9a:bc");
        let mid = d.path().join("machine-id");
        std::fs::write(&mid, "4f1c2ab0d0e94b0c8b5d1a7f9e2c3d4e\n").unwrap();
        let (a, source) = derived_from(&net, &mid).unwrap();
        assert_eq!(source, Source::MachineId);
        assert_eq!(a.len(), 16);
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "locally administered, individual");
        assert_eq!(derived_from(&net, &mid).unwrap().0, a, "stable");
        std::fs::write(&mid, "").unwrap();
        assert_eq!(derived_from(&net, &mid), None);
    }

    #[test]
    fn a_usb_modem_never_names_the_gateway() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("net");
        iface(&net, "usb0", "0c:5b:8f:27:9a:64");
        // As sysfs has it: device/driver, a link to the driver's directory.
        std::fs::create_dir_all(d.path().join("drivers/cdc_ether")).unwrap();
        std::fs::create_dir_all(net.join("usb0/device")).unwrap();
        std::os::unix::fs::symlink(
            d.path().join("drivers/cdc_ether"),
            net.join("usb0/device/driver"),
        )
        .unwrap();
        iface(&net, "wlan0", "b8:27:eb:00:00:02");
        assert_eq!(
            derived_from(&net, &d.path().join("none")),
            Some(("b827ebfffe000002".into(), Source::NetworkInterface))
        );
    }

    #[test]
    fn a_random_identity_is_a_local_individual_eui64() {
        let a = random();
        assert_eq!(a.len(), 16);
        assert_eq!(u8::from_str_radix(&a[..2], 16).unwrap() & 0x03, 0x02);
        assert_ne!(a, random());
    }

    #[test]
    fn a_kept_eui_names_only_the_machine_it_was_seen_on() {
        let k = Kept {
            eui: "0016c001ff10a235".into(),
            machine: Some("b827ebfffe123456".into()),
        };
        let back = Kept::decode(&k.encode()).unwrap();
        assert_eq!(back, k);
        assert!(k.is_of(Some("b827ebfffe123456")));
        assert!(!k.is_of(Some("b827ebfffe654321")), "a copied SD card");
        assert!(!k.is_of(None));
        let nowhere = Kept {
            machine: None,
            ..k.clone()
        };
        assert!(
            !nowhere.is_of(None),
            "unknown machines are not the same machine"
        );
        assert_eq!(Kept::decode(b"B827EBFFFE123456"), None, "another format");
        assert_eq!(Kept::decode(&[0xff; 16]), None);
    }
}
