//! Hostile scratch tests (not part of the product).
use lora_edge_e2e::lorawan::{level, RULES, SENSOR};
#[allow(unused_imports)]
use lora_edge_e2e::*;

const WRONG_APP: [u8; 16] = [0x23; 16];

/// Mirror of engine.rs's new-session confirmation: returns the first fcnt at which a noise
/// reading becomes Good, and the first fcnt where Good noise >= 2.5 (a start).
fn noise_walk(max: u32, real_mm: u16) -> (Option<u32>, Option<u32>, Vec<(u32, f64)>) {
    let mut awaiting = true;
    let mut reference: Option<f64> = None;
    let mut good_at = None;
    let mut in_range = vec![];
    for fcnt in 1..=max {
        let p = SENSOR.read_with_app_key(fcnt, &level(real_mm), WRONG_APP);
        let v = u16::from_be_bytes([p[0], p[1]]) as f64 * 0.001;
        if !(0.0..=4.0).contains(&v) {
            continue;
        }
        in_range.push((fcnt, v));
        if awaiting {
            match reference {
                Some(r) if (v - r).abs() <= 0.2 => {
                    awaiting = false;
                    good_at = Some(fcnt);
                }
                _ => reference = Some(v),
            }
        } else if v >= 2.5 {
            return (good_at, Some(fcnt), in_range);
        }
    }
    (good_at, None, in_range)
}

#[test]
fn noise_statistics() {
    let (good, start, inr) = noise_walk(20000, 1800);
    println!("good at {good:?}, start at {start:?}");
    println!("in range: {:?}", &inr[..inr.len().min(40)]);
    // How many consecutive-frame agreements ("twice in a row" as README says)?
    let mut strict = None;
    let mut prev: Option<f64> = None;
    for fcnt in 1..=20000u32 {
        let p = SENSOR.read_with_app_key(fcnt, &level(1800), WRONG_APP);
        let v = u16::from_be_bytes([p[0], p[1]]) as f64 * 0.001;
        let ok = (0.0..=4.0).contains(&v);
        if ok {
            if let Some(r) = prev {
                if (v - r).abs() <= 0.2 {
                    strict = Some(fcnt);
                    break;
                }
            }
        }
        prev = if ok { Some(v) } else { None };
    }
    println!("strict twice-in-a-row agreement at {strict:?}");
}

fn at(offset_ms: u64, payload: Vec<u8>) -> Frame {
    let mut f = frames_at(&[offset_ms], 1).remove(0);
    f.payload = payload;
    f
}

fn transitions(dir: &std::path::Path) -> Vec<bool> {
    std::fs::read_to_string(dir.join("relay.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["on"] == true)
        .collect()
}

/// The real level is 1.8 m (inside the stop/start band: the pump must stay off). The keys file
/// holds the right NwkSKey and a wrong AppSKey. README: noise must agree with itself "twice in a
/// row" before it is believed.
#[test]
fn wrong_app_s_key_starts_the_pump() {
    let broker = Broker::start();
    let wrong = lora_edge_e2e::lorawan::Device {
        dev_eui: SENSOR.dev_eui,
        dev_addr: SENSOR.dev_addr,
        nwk_s_key: SENSOR.nwk_s_key,
        app_s_key: WRONG_APP,
    };
    let scenario: Vec<Frame> = (1..=45u32)
        .map(|n| at(500 + n as u64 * 150, SENSOR.uplink(n, 2, &level(1800))))
        .collect();
    let setup = AgentSetup::new(broker.port).scenario(&scenario);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    lora_edge_e2e::pki::write(setup.dir.path(), "keys.toml", &wrong.keys_toml(), 0o600);
    let (mut agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    std::thread::sleep(std::time::Duration::from_secs(12));
    let log = agent.log();
    let t = transitions(dir.path());
    agent.sigterm();
    for l in log
        .lines()
        .filter(|l| l.contains("quality") || l.contains("start") || l.contains("Unconfirmed"))
    {
        println!("{l}");
    }
    println!("relay transitions: {t:?}");
    assert!(
        !t.contains(&true),
        "the pump was started on noise from a wrong AppSKey"
    );
}

fn run_with_keys(keys: &str, frames: Vec<Frame>, secs: u64) -> (String, Vec<bool>) {
    let broker = Broker::start();
    let setup = AgentSetup::new(broker.port).scenario(&frames);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    lora_edge_e2e::pki::write(setup.dir.path(), "keys.toml", keys, 0o600);
    let (mut agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    std::thread::sleep(std::time::Duration::from_secs(secs));
    let log = agent.log();
    let t = transitions(dir.path());
    agent.sigterm();
    (log, t)
}

/// fcnt_up copied from the network server long ago (the device has since sent > 65536 frames).
#[test]
fn fcnt_up_too_low_by_more_than_65536() {
    let keys = format!("{}fcnt_up = 1000\n", SENSOR.keys_toml());
    let frames = (0..6u32)
        .map(|i| {
            at(
                500 + i as u64 * 300,
                SENSOR.uplink(70_000 + i, 2, &level(3000)),
            )
        })
        .collect();
    let (log, t) = run_with_keys(&keys, frames, 5);
    for l in log.lines().filter(|l| l.contains("rules")) {
        println!("{l}");
    }
    println!("relay: {t:?}");
    assert!(
        log.contains("Unconfirmed") || log.contains("Good"),
        "sensor past fcnt_up+65536 never accepted"
    );
}

/// fcnt_up set too high (typo: an extra digit).
#[test]
fn fcnt_up_too_high() {
    let keys = format!("{}fcnt_up = 700000\n", SENSOR.keys_toml());
    let frames = (0..4u32)
        .map(|i| {
            at(
                500 + i as u64 * 300,
                SENSOR.uplink(70_000 + i, 2, &level(3000)),
            )
        })
        .collect();
    let (log, t) = run_with_keys(&keys, frames, 4);
    for l in log.lines().filter(|l| l.contains("rules")) {
        println!("{l}");
    }
    println!("relay: {t:?}");
}

#[test]
fn malformed_central_requests_are_all_answered_and_audited() {
    use std::time::Duration;
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let setup =
        AgentSetup::new(broker.port).scenario(&[at(300, SENSOR.uplink(1, 2, &level(1500)))]);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    lora_edge_e2e::pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, _dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    assert!(agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)));
    let topic = format!("eu868/gateway/{GATEWAY_ID}/command/pump");
    let big = format!(
        "{{\"requestId\":\"big1\",\"pump\":\"P1\",\"action\":\"run\",\"requestedBy\":\"{}\"}}",
        "x".repeat(5000)
    );
    let reqs: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00garbage".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        br#"{"requestId": 42, "pump": "P1", "action": "run", "expiresAt": 1}"#.to_vec(),
        br#"{"requestId": "n1", "pump": "P1", "action": 5}"#.to_vec(),
        br#"{"requestId": "n2", "pump": "P1", "action": "RUN", "expiresAt": 99999999999999}"#.to_vec(),
        br#"{"requestId": "n3", "pump": "P1", "action": "run", "expiresAt": -1}"#.to_vec(),
        br#"{"requestId": "n4", "pump": "P1", "action": "run", "expiresAt": 99999999999999, "requestId": "dup"}"#.to_vec(),
        br#"{"requestId": "n5", "action": "run", "expiresAt": 99999999999999}"#.to_vec(),
        br#"{"requestId": "n6", "pump": "P1", "action": "run", "expiresAt": 99999999999999, "gatewayId": "0016C001FF10A235"}"#.to_vec(),
        br#"{"requestId": "n7", "pump": "P1", "action": "reset_latch"}"#.to_vec(),
        br#"{"requestId": "n8", "pump": "P1", "action": "state", "gatewayId": "ffff"}"#.to_vec(),
        br#"{"requestId": "n9", "pump": ["P1"], "action": "stop", "expiresAt": 99999999999999, "requestedBy": {"evil": 1}}"#.to_vec(),
        big.into_bytes(),
    ];
    let n = reqs.len();
    for r in reqs {
        publish(broker.port, &topic, r);
    }
    std::thread::sleep(Duration::from_secs(6));
    let answers = collector.on("/event/pump");
    println!("{} requests, {} answers", n, answers.len());
    for a in &answers {
        let s = String::from_utf8_lossy(&a.payload);
        println!("ANSWER {}", &s[..s.len().min(400)]);
    }
    let audits: Vec<String> = collector
        .on("/event/rules")
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).to_string())
        .filter(|s| s.contains("\"command\""))
        .collect();
    println!("{} command audits", audits.len());
    for a in &audits {
        println!("AUDIT {}", &a[..a.len().min(500)]);
    }
}

/// A Class C actuator confirms ON, then keeps reporting "stopped" (motor protection tripped,
/// or a broken relay): what does the agent do?
#[test]
fn class_c_confirms_then_contradicts_forever() {
    use lora_edge_e2e::lorawan::{keys_class_c, relay_status, rules_class_c, ACTUATOR};
    let broker = Broker::start();
    let mut scenario = vec![
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3000))),
        at(4000, ACTUATOR.uplink(1, 3, &relay_status(true))),
    ];
    for i in 0..12u32 {
        scenario.push(at(
            6000 + i as u64 * 1500,
            ACTUATOR.uplink(2 + i, 3, &relay_status(false)),
        ));
    }
    let setup = AgentSetup::new(broker.port).scenario(&scenario);
    std::fs::write(setup.dir.path().join("rules.toml"), rules_class_c("1s", 2)).unwrap();
    lora_edge_e2e::pki::write(setup.dir.path(), "keys.toml", &keys_class_c(), 0o600);
    let (mut agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    std::thread::sleep(std::time::Duration::from_secs(26));
    let log = agent.log();
    agent.sigterm();
    for l in log.lines().filter(|l| {
        l.contains("lora_edge::rules")
            && (l.contains("action=")
                || l.contains("ALARM")
                || l.contains("confirmed")
                || l.contains("not sent"))
    }) {
        println!("{}", &l[11..l.len().min(260)]);
    }
    let kinds: Vec<String> = tx_log(dir.path())
        .into_iter()
        .filter(|s| s.result == 0)
        .map(|s| {
            let d = ACTUATOR.open_downlink(&s.payload, 0).unwrap();
            format!(
                "{}:{}",
                d.fcnt,
                if d.payload.len() == 4 { "ON" } else { "off" }
            )
        })
        .collect();
    println!("downlinks: {kinds:?}");
    if kinds.is_empty() {
        println!("LOG:\n{log}");
    }
}
