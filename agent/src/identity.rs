//! The gateway's identity (its ChirpStack gateway ID) without a working radio.
//!
//! A gateway whose concentrator does not start is the one the centre most needs to see, so the
//! backhaul never waits long for the concentrator's EUI. In order:
//! 1. `gateway.id`, when configured;
//! 2. the identity this store already used (kept in the store's state): a gateway keeps its
//!    name whatever its radio does at the next boot;
//! 3. the concentrator's EUI, if the radio gives it within `gateway.eui_wait`;
//! 4. derived from the machine: the EUI-64 of the first network interface (by name) with a
//!    globally unique MAC address (`FF FE` inserted in its middle, as Semtech's packet
//!    forwarder scripts do), or, without one, from `/etc/machine-id`.
//!
//! Whatever was chosen at 3 or 4 is kept (2) from then on.

use std::path::Path;

/// The store state key of the identity in use.
pub const STATE_KEY: &str = "gateway_id";

/// How the identity was chosen, for the log and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Configured,
    Remembered,
    ConcentratorEui,
    NetworkInterface,
    MachineId,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Source::Configured => "gateway.id",
            Source::Remembered => "kept from an earlier start (store state)",
            Source::ConcentratorEui => "the concentrator's EUI",
            Source::NetworkInterface => "derived from the MAC address of a network interface",
            Source::MachineId => "derived from /etc/machine-id",
        }
    }
}

/// An identity read back from the store state, if it is one.
pub fn parse_remembered(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?.trim().to_lowercase();
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

fn from_interfaces(net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(net)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
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
    fn only_an_eui64_is_remembered() {
        assert_eq!(
            parse_remembered(b"B827EBFFFE123456"),
            Some("b827ebfffe123456".into())
        );
        assert_eq!(parse_remembered(b"b827eb"), None);
        assert_eq!(parse_remembered(&[0xff; 16]), None);
    }
}
