//! TLS to the broker: rustls with the ring provider (no OpenSSL, no C toolchain beyond ring's
//! for the Pi builds). The broker's certificate is always verified, against `mqtt.tls.ca_file`
//! or the system's roots, with its name checked against the host of `mqtt.server`; there is no
//! switch to turn that off.
//!
//! The files are read at every connect (`client_config`), so a certificate renewed on disk is
//! used at the next connect without a restart, and a broken one stops only the backhaul (the
//! radio and the store go on). `inspect` reads them the same way for `lora-edge check`, and
//! adds what a connect would only find out later: validity dates. `explain` turns what rustls
//! and rumqttc report into a line an operator can act on, naming the file or the host.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::client::LinkError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::config::{secret, Invalid, MqttConfig, Server, TlsConfig};

/// Certificates expiring within this are noted by `check` and at connect.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// A problem with a configured file, before any connection is tried.
#[derive(Debug, Clone, PartialEq)]
pub struct FileProblem {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn problem(field: &'static str, message: impl Into<String>) -> FileProblem {
    FileProblem {
        field,
        message: message.into(),
    }
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, FileProblem> {
    // A CA bundle of the system is a few hundred KiB.
    crate::files::read_bounded(path, 8 << 20)
        .map_err(|e| problem(field, format!("{}: {e}", path.display())))
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, FileProblem> {
    let pem = read_file(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(field, format!("{}: not a PEM file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(problem(
            field,
            format!(
                "{}: no certificate in it (expected PEM blocks \"BEGIN CERTIFICATE\")",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileProblem> {
    const FIELD: &str = "mqtt.tls.key_file";
    let pem = secret::read(path).map_err(|e| problem(FIELD, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        problem(
            FIELD,
            format!(
                "{}: no private key in it ({e}; expected PEM \"BEGIN PRIVATE KEY\", \
                 \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
                path.display()
            ),
        )
    })
}

fn roots(tls: &TlsConfig) -> Result<RootCertStore, FileProblem> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = read_certs("mqtt.tls.ca_file", path)?;
            let (_, bad) = roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                return Err(problem(
                    "mqtt.tls.ca_file",
                    format!(
                        "{}: none of its {bad} certificate(s) can be a trust anchor",
                        path.display()
                    ),
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(problem(
                    "mqtt.tls.ca_file",
                    "not set, and the system has no CA certificates (install the \
                     ca-certificates package, or name the broker's CA in mqtt.tls.ca_file)",
                ));
            }
        }
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration of one connect, from the files as they are now.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, FileProblem> {
    let roots = roots(tls)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certs("mqtt.tls.cert_file", cert_path)?;
            let key = read_key(key_path)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let why = match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "the key in {} does not belong to the certificate in {}",
                        key_path.display(),
                        cert_path.display()
                    ),
                    // OpenSSL 3.0's `x509 -req` without extensions makes version 1 certificates.
                    other if format!("{other:?}").contains("UnsupportedCertVersion") => format!(
                        "{} is an X.509 version 1 certificate; TLS here takes version 3 only \
                         (with openssl x509 -req, add extensions: -extfile with \
                         extendedKeyUsage=clientAuth)",
                        cert_path.display()
                    ),
                    other => format!(
                        "{} with {}: unusable: {other}",
                        cert_path.display(),
                        key_path.display()
                    ),
                };
                problem("mqtt.tls.key_file", why)
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Subject and validity of a certificate, as `check` shows them.
struct Validity {
    subject: String,
    not_before: i64,
    not_after: i64,
    not_after_text: String,
}

fn validity(der: &CertificateDer<'_>) -> Option<Validity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = cert.validity();
    Some(Validity {
        subject: cert.subject().to_string(),
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        not_after_text: date(v.not_after.timestamp().max(0) as u64),
    })
}

fn date(unix_s: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(unix_s))
        .to_string()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One certificate's dates against now: `Err` if not valid now, `Ok(note)`.
fn dated(
    field: &'static str,
    path: &Path,
    der: &CertificateDer<'_>,
) -> Result<String, FileProblem> {
    let Some(v) = validity(der) else {
        return Err(problem(
            field,
            format!("{}: a certificate that cannot be parsed", path.display()),
        ));
    };
    let now = unix_now();
    if now > v.not_after {
        return Err(problem(
            field,
            format!(
                "{}: the certificate of {} expired on {}",
                path.display(),
                v.subject,
                v.not_after_text
            ),
        ));
    }
    if now < v.not_before {
        return Err(problem(
            field,
            format!(
                "{}: the certificate of {} is not valid yet (is the clock right?)",
                path.display(),
                v.subject
            ),
        ));
    }
    let days = (v.not_after - now) / 86_400;
    let soon = if (v.not_after - now) < EXPIRY_WARNING.as_secs() as i64 {
        " — renew it soon"
    } else {
        ""
    };
    Ok(format!(
        "{field}: {} valid until {} ({days} days){soon}",
        v.subject, v.not_after_text
    ))
}

/// Everything `check` can know about the files of `mqtt` before connecting: problems (located
/// by field) and notes (subjects and expiry dates).
pub fn inspect(mqtt: &MqttConfig) -> (Vec<Invalid>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    if let Some(path) = &mqtt.password_file {
        if let Err(e) = secret::read_password(path) {
            problems.push(problem("mqtt.password_file", e));
        }
    }
    if let Some(tls) = &mqtt.tls {
        match client_config(tls) {
            Err(p) => problems.push(p),
            Ok(_) => {
                if let Some(path) = &tls.cert_file {
                    // The leaf is what the broker checks first; the rest of the chain too.
                    match read_certs("mqtt.tls.cert_file", path) {
                        Ok(chain) => {
                            for der in &chain {
                                match dated("mqtt.tls.cert_file", path, der) {
                                    Ok(n) => notes.push(n),
                                    Err(p) => problems.push(p),
                                }
                            }
                        }
                        Err(p) => problems.push(p),
                    }
                }
                if let Some(path) = &tls.ca_file {
                    if let Ok(cas) = read_certs("mqtt.tls.ca_file", path) {
                        for der in &cas {
                            match dated("mqtt.tls.ca_file", path, der) {
                                Ok(n) => notes.push(n),
                                Err(p) => problems.push(p),
                            }
                        }
                    }
                }
            }
        }
    }
    let problems = problems
        .into_iter()
        .map(|p| Invalid {
            field: p.field.to_string(),
            message: p.message,
        })
        .collect();
    (problems, notes)
}

/// When the client certificate expires (Unix seconds), if there is one and it can be read.
pub fn client_certificate_expiry(tls: &TlsConfig) -> Option<i64> {
    let path = tls.cert_file.as_ref()?;
    let chain = read_certs("mqtt.tls.cert_file", path).ok()?;
    Some(validity(chain.first()?)?.not_after)
}

/// The client certificate's expiry, if near or past: worth a line at every connect.
pub fn expiry_warning(tls: &TlsConfig) -> Option<String> {
    let path = tls.cert_file.as_ref()?;
    let chain = read_certs("mqtt.tls.cert_file", path).ok()?;
    let v = validity(chain.first()?)?;
    let left = v.not_after - unix_now();
    (left < EXPIRY_WARNING.as_secs() as i64).then(|| {
        if left < 0 {
            format!(
                "the client certificate {} expired on {}: the broker will refuse it",
                path.display(),
                v.not_after_text
            )
        } else {
            format!(
                "the client certificate {} expires on {} ({} days): renew it",
                path.display(),
                v.not_after_text,
                left / 86_400
            )
        }
    })
}

/// The errors a connection error is made of, outermost first. rumqttc's decoding error does not
/// name its I/O error as its source: it is followed by hand.
fn chain(e: &LinkError) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        out.push(err);
        source = err.source();
    }
    if let LinkError::V5(rumqttc::v5::ConnectionError::MqttState(
        rumqttc::v5::StateError::Deserialization(inner),
    )) = e
    {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner);
        while let Some(err) = source {
            out.push(err);
            source = err.source();
        }
    }
    out
}

/// The rustls error inside a connection error, wherever rumqttc wrapped it.
fn rustls_error(e: &LinkError) -> Option<&rustls::Error> {
    for err in chain(e) {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
    }
    None
}

fn is_eof(e: &LinkError) -> bool {
    for err in chain(e) {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ) {
                return true;
            }
        }
    }
    e.aborted()
}

/// What went wrong with the TLS layer (or the lack of it), in words that name the file or the
/// host; `None` when the error is not about TLS. `before_connack`: no CONNACK came on this
/// connection.
pub fn explain(
    e: &LinkError,
    server: &Server,
    tls: Option<&TlsConfig>,
    before_connack: bool,
) -> Option<String> {
    let host = &server.host;
    let Some(tls) = tls.filter(|_| server.tls) else {
        // Plain text. A TLS listener answers an MQTT CONNECT with a TLS alert or by closing.
        let garbled = e.garbled();
        return (before_connack && (garbled || is_eof(e))).then(|| {
            format!(
                "{host}:{} closed the connection or answered without MQTT before any CONNACK: \
                 if it is a TLS port, use mqtts://{host}:{} ({e})",
                server.port, server.port
            )
        });
    };
    let ca = || {
        tls.ca_file
            .as_ref()
            .map(|p| format!("the CA in {}", p.display()))
            .unwrap_or_else(|| "the system's CA certificates".into())
    };
    let Some(r) = rustls_error(e) else {
        if before_connack && is_eof(e) {
            // rumqttc reports errors of its TLS connect as `Tls`, later ones otherwise.
            return Some(if e.in_tls_connect() {
                format!(
                    "{host}:{} closed the connection during the TLS handshake: a plain-text MQTT \
                     port? (use tcp://{host}:{}) ({e})",
                    server.port, server.port
                )
            } else {
                format!(
                    "{host}:{} closed the connection after the TLS handshake, before the \
                     CONNACK: the broker may have refused this client's certificate ({e})",
                    server.port
                )
            });
        }
        return None;
    };
    use CertificateError as C;
    let cert = tls
        .cert_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Some(match r {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!(
                "the certificate of {host} is not signed by {}: unknown CA, or the broker does \
                 not send its intermediate certificate (its certificate file must hold the \
                 chain: its own, then the intermediate)",
                ca()
            ),
            C::ExpiredContext { time, not_after } => format!(
                "the certificate of {host} has expired: valid until {}, and this gateway's \
                 clock says {}",
                date(not_after.as_secs()),
                date(time.as_secs())
            ),
            C::Expired => format!("the certificate of {host} has expired"),
            C::NotValidYetContext { time, not_before } => format!(
                "the certificate of {host} is not valid yet: valid from {}, and this gateway's \
                 clock says {} (is the clock right?)",
                date(not_before.as_secs()),
                date(time.as_secs())
            ),
            C::NotValidYet => format!(
                "the certificate of {host} is not valid yet (is this gateway's clock right?)"
            ),
            C::NotValidForNameContext { presented, .. } if presented.is_empty() => format!(
                "the certificate of {host} names no host at all (no subjectAltName; TLS clients \
                 do not use the subject's CN): reissue it with subjectAltName = DNS:{host} (or \
                 IP:{host})"
            ),
            C::NotValidForNameContext { presented, .. } => format!(
                "the certificate of {host} is not for the name {host:?} but for {}: wrong host \
                 name in mqtt.server",
                presented
                    .iter()
                    // rustls gives `DnsName("broker.example")`: the name is enough.
                    .map(|p| p.split('"').nth(1).unwrap_or(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            C::NotValidForName => format!(
                "the certificate of {host} is not for the name {host:?}: wrong host name in \
                 mqtt.server"
            ),
            other if format!("{other:?}").contains("UnsupportedCertVersion") => format!(
                "the certificate of {host} is an X.509 version 1 certificate; TLS here takes \
                 version 3 only (with openssl x509 -req, add extensions: -extfile with \
                 subjectAltName)"
            ),
            other => format!("the certificate of {host} is refused: {other:?}"),
        },
        rustls::Error::InvalidMessage(m) => format!(
            "{host}:{} does not speak TLS (a plain-text MQTT port? use tcp://): {m:?}",
            server.port
        ),
        rustls::Error::AlertReceived(alert) => match (alert, tls.cert_file.is_some()) {
            (AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure, false) => {
                format!(
                    "{host} requires a client certificate: set mqtt.tls.cert_file and \
                     mqtt.tls.key_file ({alert:?})"
                )
            }
            (
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError,
                true,
            ) => format!("{host} refused the client certificate {cert} ({alert:?})"),
            _ => format!("{host} ended the TLS session: {alert:?}"),
        },
        other => format!("TLS with {host}: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = client_config(&tls).unwrap_err();
        assert_eq!(e.field, "mqtt.tls.ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        std::fs::write(&p, "hello\n").unwrap();
        let tls = TlsConfig {
            ca_file: Some(p),
            ..Default::default()
        };
        let e = client_config(&tls).unwrap_err();
        assert!(e.message.contains("no certificate in it"), "{e}");
    }
}
