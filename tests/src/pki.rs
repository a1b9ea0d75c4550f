//! Certificates made by the tests (rcgen, ECDSA P-256, PKCS#8 keys), written to files with the
//! modes the agent demands; `openssl` turns keys into the other forms operators bring.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use crate::{free_port, wait_port, Broker};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate authority of the test's own.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// When a leaf certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    /// From yesterday to in a year.
    Now,
    Expired,
    NotYet,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time_now();
        p.not_before = now - time_days(1);
        p.not_after = now + time_days(3650);
        let cert = p.self_signed(&key).expect("self-sign CA");
        let key_pem = key.serialize_pem();
        Ca {
            issuer: Issuer::new(p, key),
            cert_pem: cert.pem(),
            key_pem,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], validity: Validity) -> Leaf {
        self.leaf(
            names[0],
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate whose common name is `cn` (Mosquitto's `use_identity_as_username`).
    pub fn client(&self, cn: &str, validity: Validity) -> Leaf {
        self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, validity)
    }

    fn leaf(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let now = time_now();
        (p.not_before, p.not_after) = match validity {
            Validity::Now => (now - time_days(1), now + time_days(365)),
            Validity::Expired => (date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)),
            Validity::NotYet => (now + time_days(365), now + time_days(730)),
        };
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn time_days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

/// Writes `text` to `dir/name` with `mode`.
pub fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    write_path(&p, text, mode);
    p
}

/// Replaces the file at `path` the way a renewal tool does: a new file renamed over the old one.
pub fn write_path(path: &Path, text: &str, mode: u32) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write PEM");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename PEM");
}

/// Runs `openssl` with `args`; panics with its stderr if it fails.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is not installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker with a plain listener (the tests' own clients) and TLS listeners of every kind.
pub struct Site {
    pub broker: Broker,
    pub ca: Ca,
    /// Server certificate for 127.0.0.1 (an IP address name: a machine without /etc/hosts cannot
    /// resolve localhost), valid.
    pub good: u16,
    pub expired: u16,
    /// Certificate for another host name.
    pub wrong_name: u16,
    /// Requires a client certificate from `ca`; its common name is the MQTT user name.
    pub mutual: u16,
}

pub fn site(acl: Option<&str>) -> Site {
    let ca = Ca::new("lora-edge test CA");
    let (good, expired, wrong_name, mutual) = (free_port(), free_port(), free_port(), free_port());
    let broker = Broker::start_with(|dir| {
        write(dir, "ca.pem", &ca.cert_pem, 0o644);
        let mut conf = String::new();
        for (port, name, leaf, require) in [
            (
                good,
                "good",
                ca.server(&["127.0.0.1"], Validity::Now),
                false,
            ),
            (
                expired,
                "expired",
                ca.server(&["127.0.0.1"], Validity::Expired),
                false,
            ),
            (
                wrong_name,
                "wrong",
                ca.server(&["broker.example"], Validity::Now),
                false,
            ),
            (
                mutual,
                "mutual",
                ca.server(&["127.0.0.1"], Validity::Now),
                true,
            ),
        ] {
            write(dir, &format!("{name}.crt"), &leaf.cert_pem, 0o644);
            write(dir, &format!("{name}.key"), &leaf.key_pem, 0o600);
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/{name}.crt\n\
                 keyfile {d}/{name}.key\n",
                d = dir.display()
            ));
            if require {
                conf.push_str("require_certificate true\nuse_identity_as_username true\n");
            }
        }
        if let Some(acl) = acl {
            write(dir, "acl", acl, 0o644);
            conf.push_str(&format!("acl_file {}/acl\n", dir.display()));
        }
        conf.push_str("log_type all\n");
        conf
    });
    for port in [good, expired, wrong_name, mutual] {
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "TLS listener {port}\n{}",
            broker.log()
        );
    }
    Site {
        broker,
        ca,
        good,
        expired,
        wrong_name,
        mutual,
    }
}

/// Files of one agent's TLS setup, written into its directory.
pub struct Files {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub fn files(dir: &Path, ca_pem: &str, client: Option<&Leaf>) -> Files {
    Files {
        ca: write(dir, "ca.pem", ca_pem, 0o644),
        cert: client.map(|c| write(dir, "gateway.crt", &c.cert_pem, 0o644)),
        key: client.map(|c| write(dir, "gateway.key", &c.key_pem, 0o600)),
    }
}

pub fn tls_config(server: &str, f: &Files) -> String {
    let mut s = format!(
        "[mqtt]\nserver = \"{server}\"\n[mqtt.tls]\nca_file = {:?}\n",
        f.ca.display().to_string()
    );
    if let (Some(c), Some(k)) = (&f.cert, &f.key) {
        s.push_str(&format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            c.display().to_string(),
            k.display().to_string()
        ));
    }
    s
}
