//! TLS and mutual TLS to a real Mosquitto, with certificates the tests make: a valid chain
//! forwards and survives a broker restart; every way the TLS setup can be wrong is refused with
//! its own message naming the file or host, and retried with back-off; a client certificate
//! renewed on disk is used at the next connect; a broker ACL confining the gateway to its own
//! tree lets everything work and sees no attempt outside it.

use std::path::Path;
use std::time::Duration;

use lora_edge_e2e::pki::{self, files, openssl, site, tls_config, write, Ca, Files, Validity};
use lora_edge_e2e::*;

#[test]
fn a_valid_chain_forwards_over_tls_and_loses_nothing_across_a_broker_restart() {
    let mut s = site(None);
    let collector = Collector::start(s.broker.port, "eu868");
    // 20 frames/s for 15 s: the broker restarts in the middle.
    let sent = frames(300, 8, 0, 50.0);
    let setup = AgentSetup::new(s.good).scenario(&sent);
    let f = files(setup.dir.path(), &s.ca.cert_pem, None);
    let (mut agent, _dir) = setup
        .config(&tls_config(&format!("mqtts://127.0.0.1:{}", s.good), &f))
        .start();
    agent.wait_status("forwarded", 40, Duration::from_secs(30));
    s.broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    s.broker.start_again();
    assert!(wait_port(s.good, Duration::from_secs(10)));
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(60), &agent);
    let log = agent.log();
    assert!(
        log.contains("backhaul down"),
        "the restart was not seen:\n{log}"
    );
    assert!(
        agent.is_running(),
        "the agent died across the TLS broker restart:\n{log}"
    );
}

/// One misconfigured agent: what its log must say, again and again, without a storm.
struct Case {
    name: &'static str,
    agent: Agent,
    _dir: tempfile::TempDir,
    expect: String,
}

fn case(
    name: &'static str,
    server: String,
    f: impl FnOnce(&Path) -> Files,
    expect: String,
) -> Case {
    let setup = AgentSetup::new(0);
    let files = f(setup.dir.path());
    let (agent, dir) = setup.config(&tls_config(&server, &files)).start();
    Case {
        name,
        agent,
        _dir: dir,
        expect,
    }
}

#[test]
fn each_tls_mistake_is_refused_with_its_own_message_and_retried_with_back_off() {
    let s = site(None);
    let other_ca = Ca::new("some other CA");
    let own = |ca: &Ca| ca.cert_pem.clone();
    let stranger = other_ca.client(GATEWAY_ID, Validity::Now);
    let mut cases = vec![
        case(
            "unknown CA",
            format!("mqtts://127.0.0.1:{}", s.good),
            |d| files(d, &own(&other_ca), None),
            "is not signed by the CA in".into(),
        ),
        case(
            "expired server certificate",
            format!("mqtts://127.0.0.1:{}", s.expired),
            |d| files(d, &own(&s.ca), None),
            "the certificate of 127.0.0.1 has expired: valid until 2021-01-01T00:00:00Z".into(),
        ),
        case(
            "wrong host name",
            format!("mqtts://127.0.0.1:{}", s.wrong_name),
            |d| files(d, &own(&s.ca), None),
            "is not for the name \"127.0.0.1\" but for broker.example".into(),
        ),
        case(
            "plain-text server on a TLS port",
            format!("mqtts://127.0.0.1:{}", s.broker.port),
            |d| files(d, &own(&s.ca), None),
            "closed the connection during the TLS handshake".into(),
        ),
        case(
            "client certificate of another CA",
            format!("mqtts://127.0.0.1:{}", s.mutual),
            |d| files(d, &own(&s.ca), Some(&stranger)),
            "refused the client certificate".into(),
        ),
        case(
            "no client certificate where one is required",
            format!("mqtts://127.0.0.1:{}", s.mutual),
            |d| files(d, &own(&s.ca), None),
            "requires a client certificate".into(),
        ),
    ];
    // A TLS server on a plain port: the configuration says tcp://, nothing about TLS.
    {
        let setup = AgentSetup::new(s.good);
        let (agent, dir) = setup.start();
        cases.push(Case {
            name: "TLS server on a plain port",
            agent,
            _dir: dir,
            expect: format!("if it is a TLS port, use mqtts://127.0.0.1:{}", s.good),
        });
    }
    let watch = Duration::from_secs(8);
    std::thread::sleep(watch);
    for c in &mut cases {
        let log = c.agent.log();
        let said = log.matches(c.expect.as_str()).count();
        assert!(
            said >= 2,
            "{}: expected {:?} at every attempt (seen {said} times):\n{log}",
            c.name,
            c.expect
        );
        // reconnect_min 200 ms doubling to 2 s: 6 attempts in 8 s at most; a storm is hundreds.
        let attempts = log.matches("backhaul down").count();
        assert!(
            attempts <= 8,
            "{}: {attempts} attempts in {watch:?}: no back-off\n{log}",
            c.name
        );
        assert!(c.agent.is_running(), "{}: the agent died\n{log}", c.name);
    }
}

#[test]
fn mutual_tls_uses_a_certificate_renewed_on_disk_at_the_next_connect_without_a_restart() {
    let s = site(None);
    let collector = Collector::start(s.broker.port, "eu868");
    let sent = frames(50, 4, 0, 20.0);
    let setup = AgentSetup::new(s.mutual).scenario(&sent);
    // The gateway starts with a certificate the broker does not accept (expired).
    let old = s.ca.client("gw-old", Validity::Expired);
    let f = files(setup.dir.path(), &s.ca.cert_pem, Some(&old));
    let (mut agent, _dir) = setup
        .config(&tls_config(&format!("mqtts://127.0.0.1:{}", s.mutual), &f))
        .start();
    assert!(
        agent.wait_log("expired", Duration::from_secs(20)),
        "the expired client certificate was not named:\n{}",
        agent.log()
    );
    let pid = agent.pid();
    // Renewal: new certificate and key written over the old files.
    let new = s.ca.client(GATEWAY_ID, Validity::Now);
    pki::write_path(f.cert.as_ref().unwrap(), &new.cert_pem, 0o644);
    pki::write_path(f.key.as_ref().unwrap(), &new.key_pem, 0o600);
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(60), &agent);
    assert_eq!(agent.pid(), pid, "the agent was restarted");
    assert!(agent.is_running());
    // The broker saw the new certificate's identity.
    let blog = s.broker.log();
    assert!(
        blog.contains(&format!("u'{GATEWAY_ID}'")),
        "the broker did not see the renewed certificate:\n{blog}"
    );
}

/// The ACL the README gives for Mosquitto, with the user name taken from the client
/// certificate's common name (the gateway id). Anonymous clients (the tests' collector and
/// publisher, on the plain listener) may use everything.
const ACL: &str = "\
topic readwrite eu868/#
pattern write eu868/gateway/%u/event/#
pattern write eu868/gateway/%u/state/#
pattern read eu868/gateway/%u/command/#
";

#[test]
fn a_broker_acl_confining_the_gateway_to_its_tree_lets_everything_work_and_sees_nothing_outside() {
    let s = site(Some(ACL));
    let collector = Collector::start(s.broker.port, "eu868");
    let sent = frames(100, 4, 0, 20.0);
    let setup = AgentSetup::new(s.mutual).scenario(&sent);
    let me = s.ca.client(GATEWAY_ID, Validity::Now);
    let f = files(setup.dir.path(), &s.ca.cert_pem, Some(&me));
    let (mut agent, _dir) = setup
        .config(&tls_config(&format!("mqtts://127.0.0.1:{}", s.mutual), &f))
        .start();
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(60), &agent);
    // Stats and the retained connection state.
    assert!(!collector
        .wait_for("/event/stats", Duration::from_secs(10), |m| !m.is_empty())
        .is_empty());
    assert!(!collector.on("/state/conn").is_empty());
    // A downlink and its acknowledgement.
    publish_downlinks(
        s.broker.port,
        vec![(4242, lora(869_525_000, 14, 9, immediately(), 0, b"acl"))],
    );
    assert_eq!(
        ack(&collector, 4242, Duration::from_secs(15)),
        vec![chirpstack_api::gw::TxAckStatus::Ok],
        "{}",
        agent.log()
    );
    let blog = s.broker.log();
    assert!(
        !blog.contains("Denied"),
        "the gateway attempted something outside its tree:\n{blog}"
    );
    // Ops requests: the central identity is answered; another gateway's identity cannot even
    // publish one (the broker's ACL), so nothing answers it.
    let central = ops_request(
        &collector,
        s.broker.port,
        "central",
        serde_json::json!({"op": "backlog"}),
        &agent,
    );
    assert_eq!(central["ok"], true, "{central}");
    let pki_dir = tempfile::tempdir().unwrap();
    let impostor = s.ca.client("0016c001ffffffff", Validity::Now);
    let ca = pki::write(pki_dir.path(), "ca.pem", &s.ca.cert_pem, 0o644);
    let crt = pki::write(pki_dir.path(), "i.crt", &impostor.cert_pem, 0o644);
    let key = pki::write(pki_dir.path(), "i.key", &impostor.key_pem, 0o600);
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &s.mutual.to_string(), "-q", "1"])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .args([
            "-t",
            &format!("eu868/gateway/{GATEWAY_ID}/command/ops"),
            "-m",
            r#"{"id":"impostor","op":"config"}"#,
        ])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !collector
            .on("/event/ops")
            .iter()
            .any(|m| String::from_utf8_lossy(&m.payload).contains("impostor")),
        "another gateway's identity was answered"
    );
    assert!(
        s.broker
            .log()
            .lines()
            .any(|l| l.contains("Denied PUBLISH") && l.contains("/command/ops")),
        "{}",
        s.broker.log()
    );
    assert!(agent.is_running());
    agent.sigterm();

    // The ACL does bite: a gateway whose certificate names another gateway may not publish
    // under this one's tree; the refusal is in its log, and what it could not publish stays
    // in its store.
    let setup = AgentSetup::new(s.mutual).scenario(&frames(5, 1, 0, 100.0));
    let impostor = s.ca.client("0016c001ffffffff", Validity::Now);
    let f = files(setup.dir.path(), &s.ca.cert_pem, Some(&impostor));
    let (mut other, _dir2) = setup
        .config(&tls_config(&format!("mqtts://127.0.0.1:{}", s.mutual), &f))
        .start();
    // The refusal, as the broker answered it; or, where the CPU is too slow to read that
    // answer before the broker closes (qemu-user), the agent's account of the pattern.
    let refused = "the broker refused a publish: NotAuthorized";
    let pattern = "the broker accepted and then closed the session 3 times in a row";
    let until = std::time::Instant::now() + patience(Duration::from_secs(20));
    while !(other.log().contains(refused) || other.log().contains(pattern)) {
        assert!(std::time::Instant::now() < until, "{}", other.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    if patience(Duration::from_secs(1)) == Duration::from_secs(1) {
        // Not emulated: the answer itself is read (rumqttc's queued events are forwarded
        // before the error that ends the session).
        assert!(
            other.wait_log(refused, Duration::from_secs(20)),
            "{}",
            other.log()
        );
    }
    // The pattern is named either way once it has repeated.
    assert!(
        other.wait_log(pattern, patience(Duration::from_secs(20))),
        "{}",
        other.log()
    );
    other.wait_status("accepted", 5, Duration::from_secs(20));
    assert_eq!(other.status_value("forwarded"), Some(0), "{}", other.log());
    assert!(other.status_value("backlog").unwrap_or(0) >= 5);
    assert!(s.broker.log().contains("Denied PUBLISH"));
}

#[test]
fn commands_beyond_the_rate_limit_are_refused_and_counted() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .config("[mqtt]\ncommand_rate_per_s = 5")
        .start();
    agent.wait_log("subscribed: commands will arrive", Duration::from_secs(20));
    // 60 commands at once: a burst of 10 passes, the rest is refused.
    publish_downlinks(
        broker.port,
        (0..60)
            .map(|i| {
                (
                    1000 + i,
                    lora(869_525_000, 14, 9, immediately(), 0, b"flood"),
                )
            })
            .collect(),
    );
    agent.wait_status("commands_refused", 1, Duration::from_secs(10));
    let acks = collector.wait_for("/event/ack", Duration::from_secs(10), |m| m.len() >= 10);
    std::thread::sleep(Duration::from_secs(2));
    let refused = agent.status_value("commands_refused").unwrap_or(0);
    let answered = collector.on("/event/ack").len() as u64;
    assert!(acks.len() >= 10);
    assert_eq!(
        refused + answered,
        60,
        "every command is either answered or counted as refused:\n{}",
        agent.log()
    );
    assert!(
        (40..=50).contains(&refused),
        "a burst of 10 (twice 5/s) and a few more as tokens refill: {refused} refused"
    );
    assert!(agent
        .log()
        .contains("commands above mqtt.command_rate_per_s refused"));
}

/// `lora-edge check -c <dir>/agent.toml [--set ...]`: (success, stdout + stderr).
fn check(dir: &Path, toml: &str, sets: &[&str]) -> (bool, String) {
    std::fs::write(dir.join("sim.toml"), "").unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"{GATEWAY_ID}\"\n[radio]\nbackend = \"simulator\"\n\
             simulator = \"sim.toml\"\n[store]\npath = \"store\"\n{toml}"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(agent_binary());
    cmd.arg("check").arg("-c").arg(&cfg);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const MTLS: &str = "[mqtt]\nserver = \"mqtts://broker.example:8883\"\n[mqtt.tls]\n\
                    ca_file = \"ca.pem\"\ncert_file = \"gw.crt\"\nkey_file = \"gw.key\"\n";

#[test]
fn check_accepts_the_key_forms_operators_bring_and_shows_the_expiry() {
    let ca = Ca::new("check CA");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    pki::write(dir, "ca.pem", &ca.cert_pem, 0o644);
    pki::write(dir, "ca.key", &ca.key_pem, 0o600);
    let at = |name: &str| dir.join(name).display().to_string();

    // PKCS#8 EC (rcgen, step).
    let leaf = ca.client(GATEWAY_ID, Validity::Now);
    pki::write(dir, "gw.crt", &leaf.cert_pem, 0o644);
    pki::write(dir, "gw.key", &leaf.key_pem, 0o600);
    let (ok, out) = check(dir, MTLS, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("mqtt.tls.cert_file: CN={GATEWAY_ID} valid until")),
        "{out}"
    );
    assert!(
        out.contains("(364 days)") || out.contains("(365 days)"),
        "{out}"
    );

    // SEC1 EC ("BEGIN EC PRIVATE KEY", openssl ec).
    pki::openssl(&["ec", "-in", &at("gw.key"), "-out", &at("sec1.key")]);
    std::fs::set_permissions(
        dir.join("sec1.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(std::fs::read_to_string(dir.join("sec1.key"))
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    let (ok, out) = check(dir, &MTLS.replace("gw.key", "sec1.key"), &[]);
    assert!(ok, "SEC1: {out}");

    // RSA, PKCS#1 ("BEGIN RSA PRIVATE KEY", openssl genrsa -traditional), certificate signed
    // by the CA with openssl.
    pki::openssl(&["genrsa", "-traditional", "-out", &at("rsa.key"), "2048"]);
    std::fs::set_permissions(
        dir.join("rsa.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    pki::openssl(&[
        "req",
        "-new",
        "-key",
        &at("rsa.key"),
        "-subj",
        "/CN=rsa-gateway",
        "-out",
        &at("rsa.csr"),
    ]);
    let sign = |extra: &[&str]| {
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &at("rsa.csr"),
            "-CA",
            &at("ca.pem"),
            "-CAkey",
            &at("ca.key"),
            "-CAcreateserial",
            "-days",
            "20",
            "-out",
            &at("rsa.crt"),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        pki::openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    assert!(std::fs::read_to_string(dir.join("rsa.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let rsa = MTLS
        .replace("gw.key", "rsa.key")
        .replace("gw.crt", "rsa.crt");
    // OpenSSL 3.0 signs a version 1 certificate when no extension is given: named as such.
    sign(&[]);
    let (ok, out) = check(dir, &rsa, &[]);
    assert!(!ok && out.contains("X.509 version 1 certificate"), "{out}");
    std::fs::write(dir.join("ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    sign(&["-extfile", &at("ext")]);
    let (ok, out) = check(dir, &rsa, &[]);
    assert!(ok, "PKCS#1: {out}");
    // 20 days: inside the 30-day warning period.
    assert!(
        out.contains("CN=rsa-gateway valid until") && out.contains("renew it soon"),
        "{out}"
    );
    // The same key as PKCS#8.
    pki::openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        &at("rsa.key"),
        "-out",
        &at("rsa8.key"),
    ]);
    std::fs::set_permissions(
        dir.join("rsa8.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (ok, out) = check(dir, &rsa.replace("rsa.key", "rsa8.key"), &[]);
    assert!(ok, "PKCS#8 RSA: {out}");
}

#[test]
fn check_names_every_unusable_tls_file_and_secret_without_printing_secrets() {
    let ca = Ca::new("check CA");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    pki::write(dir, "ca.pem", &ca.cert_pem, 0o644);
    let leaf = ca.client(GATEWAY_ID, Validity::Now);
    let other = ca.client(GATEWAY_ID, Validity::Now);
    pki::write(dir, "gw.crt", &leaf.cert_pem, 0o644);

    // A key that belongs to another certificate.
    pki::write(dir, "gw.key", &other.key_pem, 0o600);
    let (ok, out) = check(dir, MTLS, &[]);
    assert!(!ok);
    assert!(
        out.contains("does not belong to the certificate in"),
        "{out}"
    );
    assert!(out.contains("mqtt.tls.key_file"), "{out}");

    // A key others can read: refused with the fix.
    pki::write(dir, "gw.key", &leaf.key_pem, 0o644);
    let (ok, out) = check(dir, MTLS, &[]);
    assert!(!ok);
    assert!(
        out.contains(&format!("chmod o-rwx {}", dir.join("gw.key").display())),
        "{out}"
    );
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    // An expired certificate, with its date.
    pki::write(dir, "gw.key", &leaf.key_pem, 0o600);
    let old = ca.client(GATEWAY_ID, Validity::Expired);
    pki::write(dir, "old.crt", &old.cert_pem, 0o644);
    pki::write(dir, "old.key", &old.key_pem, 0o600);
    let (ok, out) = check(dir, &MTLS.replace("gw.", "old."), &[]);
    assert!(!ok);
    assert!(out.contains("expired on 2021-01-01T00:00:00Z"), "{out}");
    assert!(
        out.contains("agent.toml:12:13: mqtt.tls.cert_file"),
        "located: {out}"
    );

    // A missing CA file; a TLS section with a plain server.
    let (ok, out) = check(dir, &MTLS.replace("ca.pem", "nowhere.pem"), &[]);
    assert!(!ok && out.contains("nowhere.pem"), "{out}");
    let (ok, out) = check(dir, &MTLS.replace("mqtts://", "tcp://"), &[]);
    assert!(
        !ok && out.contains("TLS settings with a plain-text server"),
        "{out}"
    );

    // Passwords are never printed, whatever is wrong with them.
    let (ok, out) = check(dir, "[mqtt]\nusername = \"gw\"\npassword = 5123\n", &[]);
    assert!(
        !ok && out.contains("mqtt.password") && !out.contains("5123"),
        "{out}"
    );
    let (ok, out) = check(dir, "[mqtt]\nusername = \"gw\"\n", &["mqtt.password=8123"]);
    assert!(
        !ok && out.contains("mqtt.password=(hidden)") && !out.contains("8123"),
        "{out}"
    );
    let (ok, out) = check(
        dir,
        "[mqtt]\nserver = \"mqtts://gw:s3cret@broker:8883\"\n",
        &[],
    );
    assert!(!ok && !out.contains("s3cret"), "{out}");

    // A password file others can read.
    pki::write(dir, "password", "s3cret\n", 0o604);
    let pw = "[mqtt]\nserver = \"mqtts://broker.example:8883\"\nusername = \"gw\"\npassword_file = \"password\"\n[mqtt.tls]\nca_file = \"ca.pem\"\n";
    let (ok, out) = check(dir, pw, &[]);
    assert!(
        !ok && out.contains("mqtt.password_file") && out.contains("chmod o-rwx"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "{out}");
    pki::write(dir, "password", "s3cret\n", 0o600);
    let (ok, out) = check(dir, pw, &[]);
    assert!(ok && !out.contains("s3cret"), "{out}");
}

/// Certificates operators make with openssl, and a wrong password: each failure says what to
/// do about it (issue 22's operator messages).
#[test]
fn openssl_certificates_operators_get_wrong_and_a_wrong_password_are_each_explained() {
    let ca = Ca::new("operators' CA");
    let (nosan, v1, chainless, passworded) = (free_port(), free_port(), free_port(), free_port());
    let broker = Broker::start_with(|dir| {
        let at = |n: &str| dir.join(n).display().to_string();
        write(dir, "ca.pem", &ca.cert_pem, 0o644);
        write(dir, "ca.key", &ca.key_pem, 0o600);
        let ext = |name: &str, text: &str| write(dir, name, text, 0o644).display().to_string();
        let leaf_ext = ext(
            "leaf.ext",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        );
        let nosan_ext = ext(
            "nosan.ext",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        let inter_ext = ext(
            "inter.ext",
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        );
        let req = |name: &str, cn: &str| {
            openssl(&[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &at(&format!("{name}.key")),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &at(&format!("{name}.csr")),
            ]);
        };
        let sign = |name: &str, ca: &str, ext: Option<&str>| {
            let (csr, crt, ca_crt, ca_key) = (
                at(&format!("{name}.csr")),
                at(&format!("{name}.crt")),
                at(&format!("{ca}.pem")),
                at(&format!("{ca}.key")),
            );
            let mut args = vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &crt,
            ];
            if let Some(e) = ext {
                args.extend(["-extfile", e]);
            }
            openssl(&args);
        };
        // No subjectAltName: a CN of 127.0.0.1 only.
        req("nosan", "127.0.0.1");
        sign("nosan", "ca", Some(&nosan_ext));
        // OpenSSL 3.0's `x509 -req` without extensions: version 1.
        req("v1", "127.0.0.1");
        sign("v1", "ca", None);
        // Signed by an intermediate the broker does not send.
        req("inter", "operators' intermediate");
        sign("inter", "ca", Some(&inter_ext));
        std::fs::copy(dir.join("inter.crt"), dir.join("inter.pem")).unwrap();
        req("chainless", "broker");
        sign("chainless", "inter", Some(&leaf_ext));
        req("good", "broker");
        sign("good", "ca", Some(&leaf_ext));
        let passwd = std::process::Command::new("mosquitto_passwd")
            .args(["-c", "-b", &at("passwd"), "gw", "right-one"])
            .output()
            .expect("mosquitto_passwd");
        assert!(passwd.status.success(), "{passwd:?}");
        let mut conf = String::new();
        for (port, name) in [
            (nosan, "nosan"),
            (v1, "v1"),
            (chainless, "chainless"),
            (passworded, "good"),
        ] {
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/{name}.crt\nkeyfile {d}/{name}.key\n",
                d = dir.display()
            ));
        }
        conf.push_str(&format!(
            "per_listener_settings false\nallow_anonymous true\npassword_file {}\n",
            at("passwd")
        ));
        conf.push_str("log_type all\n");
        conf
    });
    for port in [nosan, v1, chainless, passworded] {
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "listener {port}\n{}",
            broker.log()
        );
    }
    let mut cases = Vec::new();
    for (name, port, extra, expect) in [
        (
            "no subjectAltName",
            nosan,
            "",
            "names no host at all (no subjectAltName",
        ),
        ("version 1", v1, "", "X.509 version 1 certificate"),
        (
            "missing intermediate",
            chainless,
            "",
            "does not send its intermediate certificate",
        ),
        (
            "wrong password",
            passworded,
            "username = \"gw\"\npassword_file = \"pw\"\n",
            "NotAuthorized: the username (\"gw\") or the password (mqtt.password_file) is wrong",
        ),
    ] {
        let setup = AgentSetup::new(0);
        let f = files(setup.dir.path(), &ca.cert_pem, None);
        write(setup.dir.path(), "pw", "wrong-one\n", 0o600);
        let cfg = tls_config(&format!("mqtts://127.0.0.1:{port}"), &f).replacen(
            "[mqtt]\n",
            &format!("[mqtt]\n{extra}"),
            1,
        );
        let (agent, dir) = setup.config(&cfg).start();
        cases.push((name, agent, dir, expect));
    }
    for (name, agent, _dir, expect) in &cases {
        assert!(
            agent.wait_log(expect, patience(Duration::from_secs(15))),
            "{name}: expected {expect:?}\n{}",
            agent.log()
        );
    }
}
