//! The pump-safety rules end to end, with the broker unreachable the whole time: real encrypted
//! uplinks of a level sensor from the simulated concentrator drive the simulated relay; a replay,
//! a bad MIC and a frame-counter rollover behave as specified; when the backhaul comes back, the
//! audit records arrive, in order.

use std::time::Duration;

use prost::Message;

use lora_edge_e2e::commands::{ask_pump, ops_request};
use lora_edge_e2e::lorawan::{level, RULES, SENSOR, SENSOR_REJOINED, VECTOR};
use lora_edge_e2e::pki;
use lora_edge_e2e::*;

fn at(offset_ms: u64, payload: Vec<u8>) -> Frame {
    let mut f = frames_at(&[offset_ms], 1).remove(0);
    f.payload = payload;
    f
}

#[test]
fn the_lrwn_frame_builder_reproduces_the_published_vector() {
    let d = VECTOR;
    assert_eq!(
        hex::encode_upper(d.uplink(2, 1, b"test")),
        "40F17DBE4900020001954378762B11FF0D"
    );
}

#[test]
fn a_level_sensor_drives_the_relay_with_the_broker_down_and_the_audit_arrives_in_order() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let mut bad_mic = SENSOR.uplink(4, 2, &level(3000));
    let last = bad_mic.len() - 1;
    bad_mic[last] ^= 0x01;
    let second = SENSOR.uplink(3, 2, &level(300));
    let scenario = vec![
        // High level: the session's first reading, believed once a second one agrees; then
        // demand, inhibited by min off from boot, then a start on the tick.
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3010))),
        // Dry run: the relay opens at once.
        at(4000, second.clone()),
        // The same frame again: a replay, dropped.
        at(5000, second),
        // A corrupted frame: bad MIC, dropped.
        at(5500, bad_mic),
        // Counter 65535 then 65536 (0 on air): the rollover is followed.
        at(6000, SENSOR.uplink(65_535, 2, &level(3000))),
        at(9500, SENSOR.uplink(65_536, 2, &level(200))),
    ];
    let setup = AgentSetup::new(proxy.port).scenario(&scenario);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (mut agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    let transitions = || relay(dir.path());
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while transitions().len() < 5 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    // Off at start (the safe state), on, off (dry run), on (reset and demand), off (rollover
    // frame: dry run again).
    assert_eq!(
        transitions(),
        vec![false, true, false, true, false],
        "relay transitions:\n{log}"
    );
    assert!(
        log.contains("replay: frame counter 3 was already accepted"),
        "{log}"
    );
    assert!(log.contains("MIC check failed"), "{log}");
    assert!(
        !log.contains("backhaul up"),
        "the broker was meant to be unreachable"
    );
    assert_eq!(agent.status_value("forwarded"), Some(0));

    // The backhaul comes back: every audit record, in order.
    let collector = Collector::start(broker.port, "eu868");
    proxy.set(Mode::Pass);
    let audits = collector.wait_for("/event/rules", Duration::from_secs(30), |m| {
        m.iter()
            .any(|m| String::from_utf8_lossy(&m.payload).contains("frame_dropped"))
            && m.iter()
                .filter(|m| String::from_utf8_lossy(&m.payload).contains("\"stop\""))
                .count()
                >= 2
    });
    let records: Vec<serde_json::Value> = audits
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let actions: Vec<&str> = records
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    let starts = actions.iter().filter(|a| **a == "start").count();
    let stops = actions.iter().filter(|a| **a == "stop").count();
    assert_eq!((starts, stops), (2, 2), "{actions:?}");
    let first_stop = records.iter().find(|r| r["action"] == "stop").unwrap();
    assert!(
        first_stop["reasons"][0]
            .as_str()
            .unwrap()
            .contains("interlock dry_run"),
        "{first_stop}"
    );
    assert_eq!(first_stop["inputs"][0]["sensor"], "wet_well_level");
    assert_eq!(first_stop["inputs"][0]["value"], 0.3);
    assert_eq!(first_stop["rulesSha256"].as_str().unwrap().len(), 64);
    // Pump and sensor state in the stats. The backlog holds the stats of the whole outage:
    // wait for one made after the last frame.
    let after_last = |m: &Msg| {
        let s = chirpstack_api::gw::GatewayStats::decode(m.payload.as_slice()).unwrap();
        s.metadata.get("sensor_wet_well_level").map(String::as_str) == Some("Good 0.2")
    };
    let stats = collector.wait_for("/event/stats", Duration::from_secs(20), |m| {
        m.iter().any(after_last)
    });
    let newest = stats
        .iter()
        .rfind(|m| after_last(m))
        .expect("a stats record after the last frame");
    let s = chirpstack_api::gw::GatewayStats::decode(newest.payload.as_slice()).unwrap();
    assert_eq!(
        s.metadata.get("pump_P1").map(String::as_str),
        Some("off"),
        "{:?}",
        s.metadata
    );
    assert!(agent.is_running());
    // SIGTERM: the relay stays (or is driven) off.
    agent.sigterm();
    assert_eq!(transitions().last(), Some(&false));

    // A restart keeps the frame counter: the last frame replayed after it is still a replay.
    std::fs::write(
        dir.path().join("scenario.csv"),
        scenario_csv(&[at(500, SENSOR.uplink(65_536, 2, &level(200)))]),
    )
    .unwrap();
    agent.start_again();
    assert!(
        agent.wait_log(
            "replay: frame counter 65536 was already accepted",
            Duration::from_secs(15)
        ),
        "{}",
        agent.log()
    );
    agent.sigterm();
}

#[test]
fn check_names_rule_and_keys_file_mistakes_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("sim.toml"), "").unwrap();
    std::fs::write(
        d.join("rules.toml"),
        RULES.replace("reset_at = 0.60", "reset_at = 0.30").replace(
            "sensor = \"wet_well_level\"\n  mode",
            "sensor = \"wet_well\"\n  mode",
        ),
    )
    .unwrap();
    // A key others can read.
    pki::write(d, "keys.toml", &SENSOR.keys_toml(), 0o644);
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"{GATEWAY_ID}\"\n[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\n\
             [store]\npath = \"store\"\n[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(agent_binary())
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let rules = d.join("rules.toml").display().to_string();
    assert!(
        text.contains(&format!(
            "{rules}:34:14: pump.0.interlock.0.reset_at: a trip below 0.4 resets above it"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{rules}:37:12: pump.0.auto.sensor: \"wet_well\" is not a [[sensor]]"
        )),
        "{text}"
    );
    assert!(
        text.contains("keys.toml is readable by every user"),
        "{text}"
    );
    assert!(
        !text.contains(&hex::encode(SENSOR.nwk_s_key)),
        "a key was printed: {text}"
    );
    // Fixed: check passes and says what it read.
    std::fs::write(d.join("rules.toml"), RULES).unwrap();
    pki::write(d, "keys.toml", &SENSOR.keys_toml(), 0o600);
    let out = std::process::Command::new(agent_binary())
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rules: 1 pump(s), 1 sensor(s), 1 device(s) with keys"),
        "{text}"
    );
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn central_requests_are_answered_with_the_outcome_or_a_precise_refusal() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // Level 1.5 m: good data, no local demand (start at 2.5, stop at 1.0).
    let setup = AgentSetup::new(broker.port).scenario(&[
        at(300, SENSOR.uplink(1, 2, &level(1500))),
        at(400, SENSOR.uplink(2, 2, &level(1500))),
    ]);
    // Min off 4 s: long enough that a request right after a stop meets it on a loaded machine.
    std::fs::write(
        setup.dir.path().join("rules.toml"),
        RULES.replace("min_off = \"2s\"", "min_off = \"4s\""),
    )
    .unwrap();
    pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, _dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    assert!(agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)));
    // Past min off from boot, with the reading in.
    std::thread::sleep(Duration::from_millis(4500));
    let in_a_minute = unix_ms_now() + 60_000;

    let a = ask_pump(
        &broker,
        &collector,
        "s1",
        serde_json::json!({"action": "state"}),
    );
    assert_eq!(a["outcome"], "accepted", "{a}");
    assert_eq!(a["pumps"][0]["on"], false, "{a}");
    assert_eq!(a["sensors"][0]["quality"], "good", "{a}");

    let a = ask_pump(
        &broker,
        &collector,
        "r1",
        serde_json::json!({"pump": "P1", "action": "run", "expiresAt": in_a_minute, "requestedBy": "ops-anna"}),
    );
    assert_eq!(
        (a["outcome"].as_str(), a["pumps"][0]["on"].as_bool()),
        (Some("accepted"), Some(true)),
        "{a}"
    );
    assert_eq!(a["pumps"][0]["lease"]["run"], true, "{a}");
    std::thread::sleep(Duration::from_millis(1200)); // min run 1 s
    let a = ask_pump(
        &broker,
        &collector,
        "t1",
        serde_json::json!({"pump": "P1", "action": "stop", "expiresAt": in_a_minute}),
    );
    assert_eq!(
        (a["outcome"].as_str(), a["pumps"][0]["on"].as_bool()),
        (Some("accepted"), Some(false)),
        "{a}"
    );
    // Min off after the stop: a run is refused with it, and not kept for later.
    let a = ask_pump(
        &broker,
        &collector,
        "m1",
        serde_json::json!({"pump": "P1", "action": "run", "expiresAt": in_a_minute}),
    );
    assert_eq!(a["outcome"], "refused", "{a}");
    assert!(a["reason"].as_str().unwrap().contains("min off"), "{a}");
    assert!(
        a["pumps"][0]["lease"].is_null(),
        "a refused run must not linger: {a}"
    );

    // Refusals, each with its reason.
    let a = ask_pump(
        &broker,
        &collector,
        "u1",
        serde_json::json!({"pump": "P9", "action": "run", "expiresAt": in_a_minute}),
    );
    assert_eq!(a["outcome"], "refused");
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("unknown pump \"P9\""),
        "{a}"
    );
    // A lease that expired before it arrived (replayed after a reconnect).
    let a = ask_pump(
        &broker,
        &collector,
        "x1",
        serde_json::json!({"pump": "P1", "action": "run", "expiresAt": unix_ms_now() - 1000}),
    );
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("expired before it arrived"),
        "{a}"
    );
    let a = ask_pump(
        &broker,
        &collector,
        "l1",
        serde_json::json!({"pump": "P1", "action": "lockout", "requestedBy": "ops-anna"}),
    );
    assert_eq!(a["outcome"], "accepted", "{a}");
    std::thread::sleep(Duration::from_millis(4200)); // past min off: only the lockout remains
    let a = ask_pump(
        &broker,
        &collector,
        "l2",
        serde_json::json!({"pump": "P1", "action": "run", "expiresAt": in_a_minute}),
    );
    assert_eq!(a["reason"], "lockout", "{a}");
    let a = ask_pump(
        &broker,
        &collector,
        "l3",
        serde_json::json!({"pump": "P1", "action": "release"}),
    );
    assert_eq!(a["outcome"], "accepted", "{a}");
    let a = ask_pump(
        &broker,
        &collector,
        "c1",
        serde_json::json!({"pump": "P1", "action": "reset_latch", "interlock": "dry_run"}),
    );
    assert!(
        a["reason"].as_str().unwrap().contains("is not latched"),
        "{a}"
    );
    let a = ask_pump(
        &broker,
        &collector,
        "g1",
        serde_json::json!({"gatewayId": "0016c001ffffffff", "pump": "P1", "action": "state"}),
    );
    assert!(
        a["reason"].as_str().unwrap().contains("not this one"),
        "{a}"
    );
    let a = ask_pump(
        &broker,
        &collector,
        "b1",
        serde_json::json!({"pump": "P1", "action": "explode"}),
    );
    assert!(
        a["reason"].as_str().unwrap().contains("not a pump request"),
        "{a}"
    );
    // The answer says what was asked, even when it is not an action.
    assert_eq!(a["action"], "explode", "{a}");

    // Every request but an answered `state` is in the audit, with who asked; refusals before
    // the engine saw them too.
    let audits = collector.wait_for("/event/rules", Duration::from_secs(10), |m| {
        let text: Vec<String> = m
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).to_string())
            .collect();
        ["request l1", "request b1", "request g1"]
            .iter()
            .all(|r| text.iter().any(|t| t.contains(r)))
    });
    let commands: Vec<String> = audits
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap())
        .filter(|r| r["action"] == "command")
        .map(|r| r["reasons"][0].as_str().unwrap().to_string())
        .collect();
    assert!(
        commands
            .iter()
            .any(|c| c.contains("Run (request r1) by ops-anna: accepted")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains("Lockout (request l1) by ops-anna: accepted")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains("\"explode\" (request b1)") && c.contains("refused")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains("(request g1)") && c.contains("not this one")),
        "{commands:?}"
    );
}

/// An agent on `RULES` (simulated relay) with the broker unreachable, `keys` as its keys file.
fn offline_agent(scenario: &[Frame], keys: &str) -> ((Broker, Proxy), Agent, tempfile::TempDir) {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let setup = AgentSetup::new(proxy.port).scenario(scenario);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(setup.dir.path(), "keys.toml", keys, 0o600);
    let (agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    ((broker, proxy), agent, dir)
}

/// The relay's transitions (`on` of each line of the simulated relay's file).
fn relay(dir: &std::path::Path) -> Vec<bool> {
    std::fs::read_to_string(dir.join("relay.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["on"] == true)
        .collect()
}

fn wait_relay(dir: &std::path::Path, n: usize, agent: &Agent) -> Vec<bool> {
    let until = std::time::Instant::now() + patience(Duration::from_secs(20));
    while relay(dir).len() < n && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = relay(dir);
    assert!(t.len() >= n, "relay {t:?}\n{}", agent.log());
    t
}

/// A sensor at frame counter 70 000 with `keys`: two high readings start the pump, and the log
/// says `how` the counter was found, with no frame dropped.
fn heard_at_70000(keys: &str, how: &str) {
    let (_broker, mut agent, dir) = offline_agent(
        &[
            at(500, SENSOR.uplink(70_000, 2, &level(3000))),
            at(1000, SENSOR.uplink(70_001, 2, &level(3000))),
        ],
        keys,
    );
    assert_eq!(wait_relay(dir.path(), 2, &agent)[..2], [false, true]);
    let log = agent.log();
    assert!(log.contains(how), "{log}");
    assert!(!log.contains("frame dropped"), "{log}");
    agent.sigterm();
}

#[test]
fn a_sensor_already_past_fcnt_65535_is_heard_with_no_counter_known() {
    // About 455 days at one frame every 10 minutes: a gateway installed later meets it there.
    heard_at_70000(
        &SENSOR.keys_toml(),
        "no frame counter was known for this session; found by searching its high bits",
    );
}

#[test]
fn a_stale_fcnt_up_far_below_the_device_does_not_silence_it() {
    // fcnt_up copied from the network server long ago: the device is 69 000 frames further.
    heard_at_70000(
        &format!("{}fcnt_up = 1000\n", SENSOR.keys_toml()),
        "fcnt_up is stale",
    );
}

#[test]
fn the_keys_files_fcnt_up_makes_older_counters_replays() {
    let keys = format!("{}fcnt_up = 70000\n", SENSOR.keys_toml());
    let (_broker, mut agent, dir) = offline_agent(
        &[
            at(500, SENSOR.uplink(69_999, 2, &level(3000))),
            at(700, SENSOR.uplink(70_000, 2, &level(3000))),
            at(1000, SENSOR.uplink(70_001, 2, &level(3000))),
        ],
        &keys,
    );
    assert_eq!(wait_relay(dir.path(), 2, &agent)[..2], [false, true]);
    assert!(
        agent.wait_log(
            "frame counter 69999 is below the keys file's fcnt_up (70000)",
            Duration::from_secs(5)
        ),
        "{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("found by searching"),
        "{}",
        agent.log()
    );
    agent.sigterm();
}

#[test]
fn a_rejoined_sensor_is_heard_at_once_with_its_new_session() {
    // First life: the old session, far into its counter.
    let (_broker, mut agent, dir) = offline_agent(
        &[
            at(500, SENSOR.uplink(40_000, 2, &level(3000))),
            at(1000, SENSOR.uplink(40_001, 2, &level(3000))),
        ],
        &SENSOR.keys_toml(),
    );
    assert_eq!(wait_relay(dir.path(), 2, &agent)[..2], [false, true]);
    agent.sigterm();
    let before = relay(dir.path()).len();
    // The device rejoined: the keys file gets its new DevAddr and keys; its counter restarts.
    pki::write(dir.path(), "keys.toml", &SENSOR_REJOINED.keys_toml(), 0o600);
    std::fs::write(
        dir.path().join("scenario.csv"),
        scenario_csv(&[
            at(500, SENSOR_REJOINED.uplink(1, 2, &level(3000))),
            at(1000, SENSOR_REJOINED.uplink(2, 2, &level(3000))),
        ]),
    )
    .unwrap();
    agent.start_again();
    let t = wait_relay(dir.path(), before + 2, &agent);
    assert_eq!(t[before..before + 2], [false, true], "{t:?}");
    let log = agent.log();
    assert!(log.contains("the keys file holds a new session"), "{log}");
    assert!(!log.contains("frame dropped"), "{log}");
    agent.sigterm();
}

#[test]
fn a_wrong_app_s_key_with_the_right_nwk_s_key_never_starts_the_pump() {
    // The true level is 1.8 m (no demand: start at 2.5). With a wrong AppSKey the agent reads
    // noise; pick a key under which the first frame reads as a high level inside the valid
    // range (the issue's 3.13 m), as an unlucky gateway would.
    let mm = level(1800);
    let decode = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]) as f64 / 1000.0;
    let reads = |k: [u8; 16]| -> Vec<f64> {
        (1..=6)
            .map(|f| decode(&SENSOR.read_with_app_key(f, &mm, k)))
            .collect()
    };
    // The agreement the agent asks of a new session's readings: 5 % of the 0-4 m range.
    let agree = |r: &[f64]| {
        r.windows(2)
            .any(|w| (0.0..=4.0).contains(&w[0]) && (w[1] - w[0]).abs() <= 0.2)
    };
    let wrong = (0u8..=255)
        .map(|k| [k; 16])
        .find(|k| {
            let r = reads(*k);
            (2.5..=4.0).contains(&r[0]) && !agree(&r)
        })
        .expect("a key whose noise reads as a high level");
    eprintln!("the agent reads {:?} (the truth: 1.8)", reads(wrong));
    let keys = SENSOR
        .keys_toml()
        .replace(&hex::encode(SENSOR.app_s_key), &hex::encode(wrong));
    // The first frame after min off (2 s from start): believed at once, it would start the pump.
    let scenario: Vec<Frame> = (1..=6)
        .map(|f| at(3300 + f as u64 * 700, SENSOR.uplink(f, 2, &mm)))
        .collect();
    let (_broker, mut agent, dir) = offline_agent(&scenario, &keys);
    // Every frame received, then a few ticks.
    agent.wait_status("rx", 6, patience(Duration::from_secs(30)));
    std::thread::sleep(Duration::from_secs(2));
    let t = relay(dir.path());
    assert_eq!(t, vec![false], "the pump started on noise\n{}", agent.log());
    // Every frame was taken (the MIC is right) and read as noise, the first as a high level.
    assert!(
        agent.log().contains("Unknown -> Unconfirmed"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("frame dropped"), "{}", agent.log());
    agent.sigterm();
}

/// The rules' sensor state as the health message says it, once it holds `needle`.
fn wait_sensor(collector: &Collector, needle: &str, agent: &Agent) {
    let until = std::time::Instant::now() + patience(Duration::from_secs(30));
    while std::time::Instant::now() < until {
        let seen = collector.on("/state/health").iter().any(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.payload)
                .map(|v| {
                    v["rules"]["sensor_wet_well_level"]
                        .as_str()
                        .unwrap_or_default()
                        .contains(needle)
                })
                .unwrap_or(false)
        });
        if seen {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the sensor never read {needle}\n{}", agent.log());
}

#[test]
fn sighup_runs_a_changed_threshold_without_touching_the_running_pump_and_a_broken_file_changes_nothing(
) {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let scenario = vec![
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3010))),
        // Falling, still above stop_at 1.0: the pump runs on.
        at(3000, SENSOR.uplink(3, 2, &level(1200))),
    ];
    // Other devices' traffic at 100 frames/s from 3 s on, through both reloads.
    let setup = AgentSetup::new(broker.port)
        .scenario(&scenario)
        .sim("synthetic_rate_hz = 100");
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    assert_eq!(wait_relay(dir.path(), 2, &agent), vec![false, true]);
    wait_sensor(&collector, "1.2", &agent);
    // The health message carries each pump's state in full.
    let health: Vec<serde_json::Value> = collector
        .on("/state/health")
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect();
    let p1 = &health.last().unwrap()["pumps"]["P1"];
    assert_eq!(p1["on"], true, "{p1}");
    assert!(
        p1["latched"].is_array() && p1["tripped"].is_object() && p1["reasons"].is_array(),
        "{p1}"
    );
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };

    // A broken file: refused, with its line; the pump runs on.
    std::fs::write(
        dir.path().join("rules.toml"),
        RULES.replace("stop_at = 1.0", "stop_at = \"high\""),
    )
    .unwrap();
    hup();
    assert!(
        agent.wait_log("SIGHUP: nothing changed", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("rules.toml:"),
        "located: {}",
        agent.log()
    );
    assert_eq!(relay(dir.path()), vec![false, true]);

    // The technician raises stop_at to 1.5: the running pump is not restarted, and the next
    // scan stops it (1.2 is below 1.5).
    std::fs::write(
        dir.path().join("rules.toml"),
        RULES.replace("stop_at = 1.0", "stop_at = 1.5"),
    )
    .unwrap();
    hup();
    assert!(
        agent.wait_log("SIGHUP: reloaded", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    assert_eq!(wait_relay(dir.path(), 3, &agent), vec![false, true, false]);
    let audits = collector.wait_for("/event/rules", Duration::from_secs(10), |m| {
        m.iter()
            .any(|m| String::from_utf8_lossy(&m.payload).contains("\"reload\""))
    });
    let reload: serde_json::Value = audits
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap())
        .find(|v| v["action"] == "reload")
        .unwrap();
    assert!(
        reload["reasons"][0]
            .as_str()
            .unwrap()
            .contains("pump states kept"),
        "{reload}"
    );
    // Nothing lost across the reloads: every number from the first to the last arrived, the
    // radio dropped nothing, and the relay moved only as the rules said (no OFF/ON glitch).
    std::thread::sleep(Duration::from_secs(2));
    let (first, last, missing) = seq_gaps(&collector.all());
    assert!(
        missing.is_empty(),
        "missing {missing:?} of {first}..={last}"
    );
    assert!(
        last - first > 300,
        "traffic through the reloads: {first}..={last}"
    );
    assert_eq!(relay(dir.path()), vec![false, true, false]);
    let stats = collector.on("/event/stats");
    let dropped = stats
        .iter()
        .rev()
        .find_map(|m| {
            use prost::Message;
            chirpstack_api::gw::GatewayStats::decode(m.payload.as_slice())
                .ok()?
                .metadata
                .get("rx_dropped_total")
                .cloned()
        })
        .unwrap();
    assert_eq!(dropped, "0");

    // A changed keys file is read again; no session changed, nothing else moves.
    let keys = std::fs::read_to_string(dir.path().join("keys.toml")).unwrap();
    pki::write(
        dir.path(),
        "keys.toml",
        &format!("# rotated\n{keys}"),
        0o600,
    );
    hup();
    assert!(
        agent.wait_log("rules: keys file reloaded", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    assert_eq!(relay(dir.path()), vec![false, true, false]);
}

/// A sensor rejoined while its pump runs: the technician puts its new session in the keys file
/// and reloads (SIGHUP). The running pump is not touched by the reload; the rejoined sensor's
/// next readings are heard and stop it. Before the reload its frames are not ours.
#[test]
fn a_rejoined_sensors_new_keys_are_heard_after_a_reload_without_touching_the_pump() {
    let scenario = vec![
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3010))),
        // Rejoined: low readings under its new session, long after the reload below.
        at(15_000, SENSOR_REJOINED.uplink(1, 2, &level(300))),
        at(15_500, SENSOR_REJOINED.uplink(2, 2, &level(310))),
    ];
    let (_broker, agent, dir) = offline_agent(&scenario, &SENSOR.keys_toml());
    assert_eq!(wait_relay(dir.path(), 2, &agent), vec![false, true]);
    pki::write(dir.path(), "keys.toml", &SENSOR_REJOINED.keys_toml(), 0o600);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(
        agent.wait_log("rules: keys file reloaded", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("70b3d57ed0001a01") || log.contains("70B3D57ED0001A01"),
        "{log}"
    );
    // The reload itself moved nothing.
    assert_eq!(relay(dir.path()), vec![false, true], "{}", agent.log());
    // The rejoined sensor's low level stops the pump.
    assert_eq!(
        wait_relay(dir.path(), 3, &agent),
        vec![false, true, false],
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("frame dropped"), "{}", agent.log());
}

/// Runs openssl (the test's own signer, not the agent's code).
fn openssl(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_rule_file_from_the_centre_runs_only_signed_for_this_gateway_and_never_twice() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let setup = AgentSetup::new(broker.port);
    let d = setup.dir.path().to_path_buf();
    openssl(
        &d,
        &["genpkey", "-algorithm", "ed25519", "-out", "signing.pem"],
    );
    openssl(
        &d,
        &[
            "pkey",
            "-in",
            "signing.pem",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "pub.der",
        ],
    );
    let public = String::from_utf8(openssl(&d, &["base64", "-A", "-in", "pub.der"])).unwrap();
    // What the centre signs: "lora-edge rules\n<gateway>\n<serial>\n" and the file's bytes.
    let sign = |gateway: &str, serial: u64, text: &str| {
        std::fs::write(
            d.join("candidate"),
            format!("lora-edge rules\n{gateway}\n{serial}\n{text}"),
        )
        .unwrap();
        openssl(
            &d,
            &[
                "pkeyutl",
                "-sign",
                "-inkey",
                "signing.pem",
                "-rawin",
                "-in",
                "candidate",
                "-out",
                "sig.bin",
            ],
        );
        String::from_utf8(openssl(&d, &["base64", "-A", "-in", "sig.bin"])).unwrap()
    };
    std::fs::write(d.join("rules.toml"), RULES).unwrap();
    pki::write(&d, "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, dir) = setup
        .config(&format!(
            "[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"\npublic_key = \"{public}\""
        ))
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let raised = RULES.replace("stop_at = 1.0", "stop_at = 1.5");
    // A new pump whose actuator cannot be opened (its relay file's directory is missing): the
    // running stage refuses the whole file.
    let other_shape = RULES
        .replace("id = \"P1\"", "id = \"P2\"")
        .replace("relay.jsonl", "missing-dir/relay.jsonl");
    let ask =
        |id: &str, body: serde_json::Value| ops_request(&collector, broker.port, id, body, &agent);
    let on_disk = || std::fs::read_to_string(dir.path().join("rules.toml")).unwrap();
    let error = |a: &serde_json::Value| a["error"].as_str().unwrap_or_default().to_string();

    // Unsigned; signed for another gateway; signed for other bytes: refused, nothing written.
    let a = ask(
        "u",
        serde_json::json!({"op": "apply", "rules": raised, "serial": 1}),
    );
    assert!(error(&a).contains("signed"), "{a}");
    let s = sign("0016c001ff10ffff", 1, &raised);
    let a = ask(
        "g2",
        serde_json::json!({"op": "apply", "rules": raised, "serial": 1, "signature": s}),
    );
    assert!(error(&a).contains("does not match"), "{a}");
    let s = sign(GATEWAY_ID, 1, &other_shape);
    let a = ask(
        "w",
        serde_json::json!({"op": "apply", "rules": raised, "serial": 1, "signature": s}),
    );
    assert!(error(&a).contains("does not match"), "{a}");
    assert_eq!(on_disk(), RULES);
    // Signed but the running stage cannot take it: refused, nothing written.
    let a = ask(
        "s",
        serde_json::json!({"op": "apply", "rules": other_shape, "serial": 1, "signature": s}),
    );
    assert!(error(&a).contains("missing-dir"), "{a}");
    assert_eq!(on_disk(), RULES);
    assert!(!dir.path().join("rules.toml.new").exists());
    // Signed, same shape: runs, then is the file on disk; the old one kept.
    let good = sign(GATEWAY_ID, 1, &raised);
    let a = ask(
        "g",
        serde_json::json!({"op": "apply", "rules": raised, "serial": 1, "signature": good}),
    );
    assert_eq!(a["ok"], true, "{a}\n{}", agent.log());
    assert_eq!(on_disk(), raised);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rules.toml.prev")).unwrap(),
        RULES
    );
    let r = ask("r", serde_json::json!({"op": "rules"}));
    assert_eq!(r["result"]["text"], raised.as_str());
    // The health message names the file that runs now.
    let sha = a["result"]["rules_sha256"].as_str().unwrap().to_string();
    let until = std::time::Instant::now() + patience(Duration::from_secs(10));
    while !collector.on("/state/health").iter().any(|m| {
        serde_json::from_slice::<serde_json::Value>(&m.payload)
            .map(|v| v["rules_sha256"] == sha.as_str())
            .unwrap_or(false)
    }) {
        assert!(
            std::time::Instant::now() < until,
            "health never named {sha}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same signed message again (captured on the broker): a replay, refused.
    let a = ask(
        "replay",
        serde_json::json!({"op": "apply", "rules": raised, "serial": 1, "signature": good}),
    );
    assert!(error(&a).contains("not greater"), "{a}");
    // An unsigned rollback on a gateway that takes only signed files: refused.
    let b = ask("b", serde_json::json!({"op": "rollback"}));
    assert!(error(&b).contains("signed"), "{b}");
    assert_eq!(on_disk(), raised);
    // The previous file, signed with the next serial: runs.
    let back = sign(GATEWAY_ID, 2, RULES);
    let a = ask(
        "g3",
        serde_json::json!({"op": "apply", "rules": RULES, "serial": 2, "signature": back}),
    );
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(on_disk(), RULES);
}

#[test]
fn without_a_key_rollback_returns_to_the_file_that_ran_before() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let setup = AgentSetup::new(broker.port);
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    assert!(agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)));
    let ask =
        |id: &str, body: serde_json::Value| ops_request(&collector, broker.port, id, body, &agent);
    let on_disk = || std::fs::read_to_string(dir.path().join("rules.toml")).unwrap();
    // A technician's edit on disk the running stage cannot take (a new pump's actuator does
    // not open), refused by the reload: it never ran.
    std::fs::write(
        dir.path().join("rules.toml"),
        RULES
            .replace("id = \"P1\"", "id = \"P2\"")
            .replace("relay.jsonl", "missing-dir/relay.jsonl"),
    )
    .unwrap();
    let r = ask("re", serde_json::json!({"op": "reload"}));
    assert!(r["error"].as_str().unwrap().contains("missing-dir"), "{r}");
    let r = ask("ru", serde_json::json!({"op": "rules"}));
    assert_eq!(
        r["result"]["text"], RULES,
        "the running file, not the edit: {r}"
    );
    // An apply keeps the file that ran (not the edit) as the previous one.
    let raised = RULES.replace("stop_at = 1.0", "stop_at = 1.5");
    let a = ask("a", serde_json::json!({"op": "apply", "rules": raised}));
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rules.toml.prev")).unwrap(),
        RULES
    );
    let b = ask("b", serde_json::json!({"op": "rollback"}));
    assert_eq!(b["ok"], true, "{b}");
    assert_eq!(on_disk(), RULES);
    let b2 = ask("b2", serde_json::json!({"op": "rollback"}));
    assert_eq!(b2["ok"], true, "{b2}");
    assert_eq!(on_disk(), raised, "a second rollback undoes the first");
}

/// The relay of a second pump (`relay2.jsonl`).
fn relay2(dir: &std::path::Path) -> Vec<bool> {
    std::fs::read_to_string(dir.join("relay2.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["on"] == true)
        .collect()
}

/// Pumps added and removed by a reload (SIGHUP), the running one untouched: a new pump starts
/// off and runs when the rules say so; a removed pump goes to its safe state and stays there.
#[test]
fn a_reload_adds_and_removes_pumps_without_touching_the_one_that_runs() {
    let scenario = vec![
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3010))),
        // Still high: the new pump P2 starts once its min off (2 s from its addition) is over.
        at(12_000, SENSOR.uplink(3, 2, &level(3020))),
        at(22_000, SENSOR.uplink(4, 2, &level(3030))),
    ];
    let (_broker, mut agent, dir) = offline_agent(&scenario, &SENSOR.keys_toml());
    assert_eq!(wait_relay(dir.path(), 2, &agent), vec![false, true]);
    let hup = |agent: &Agent| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let p2 = RULES
        .split_once("[[pump]]")
        .map(|(_, p)| format!("[[pump]]{p}"))
        .unwrap()
        .replace("id = \"P1\"", "id = \"P2\"")
        .replace("relay.jsonl", "relay2.jsonl");
    // P2 added beside P1.
    std::fs::write(dir.path().join("rules.toml"), format!("{RULES}\n{p2}")).unwrap();
    hup(&agent);
    assert!(
        agent.wait_log("pump P2 added", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("pump P2 added"), "{}", agent.log());
    assert_eq!(
        relay(dir.path()),
        vec![false, true],
        "P1 untouched: {}",
        agent.log()
    );
    let until = std::time::Instant::now() + patience(Duration::from_secs(20));
    while relay2(dir.path()).len() < 2 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        relay2(dir.path()),
        vec![false, true],
        "P2 opened off, then run by the rules: {}",
        agent.log()
    );
    // P1 removed: driven off, held there; P2 runs on.
    let only_p2 = format!("{}{p2}", RULES.split_once("[[pump]]").unwrap().0);
    std::fs::write(dir.path().join("rules.toml"), only_p2).unwrap();
    hup(&agent);
    assert!(
        agent.wait_log("pump P1 removed", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    assert_eq!(relay(dir.path()), vec![false, true, false]);
    assert_eq!(relay2(dir.path()), vec![false, true], "P2 untouched");
    // The health shows only the pumps that run.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(relay(dir.path()), vec![false, true, false], "P1 stays off");
    agent.sigterm();
    assert_eq!(
        relay2(dir.path()).last(),
        Some(&false),
        "stopped at shutdown"
    );
}

/// A device dropped from both the keys file and the rule file: one reload takes both (the keys
/// are tried again after the rules), and nothing is said to need a restart.
#[test]
fn a_device_dropped_from_the_keys_and_the_rules_goes_in_one_reload() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let setup = AgentSetup::new(broker.port);
    let extra = "\n[[device]]\ndev_eui = \"0000000000000001\"\ndecoder = \"layout\"\nfport = 2\n  [[device.field]]\n  name = \"v\"\n  offset = 0\n  type = \"u8\"\n\n[[sensor]]\nid = \"vsensor\"\ndevice = \"0000000000000001\"\nfield = \"v\"\nvalid_range = [0.0, 255.0]\nmax_age = \"10m\"\n";
    let with_v = RULES.replacen("\n[[sensor]]", &format!("{extra}\n[[sensor]]"), 1);
    std::fs::write(setup.dir.path().join("rules.toml"), &with_v).unwrap();
    pki::write(
        setup.dir.path(),
        "keys.toml",
        &format!("{}\n{}", SENSOR.keys_toml(), VECTOR.keys_toml()),
        0o600,
    );
    let (agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let r = ops_request(
        &collector,
        broker.port,
        "r1",
        serde_json::json!({"op": "reload"}),
        &agent,
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["result"]["keys"]["applied"].is_string(), "{r}");
    assert_eq!(
        r["result"]["restart_needed_for"],
        serde_json::json!([]),
        "{r}"
    );
}
