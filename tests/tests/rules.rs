//! The pump-safety rules end to end, with the broker unreachable the whole time: real encrypted
//! uplinks of a level sensor from the simulated concentrator drive the simulated relay; a replay,
//! a bad MIC and a frame-counter rollover behave as specified; when the backhaul comes back, the
//! audit records arrive, in order.

use std::time::Duration;

use lora_edge_e2e::lorawan::Device;
use lora_edge_e2e::pki;
use lora_edge_e2e::*;

const SENSOR: Device = Device {
    dev_eui: "70b3d57ed0001a01",
    dev_addr: [0x26, 0x01, 0x1B, 0xDA],
    nwk_s_key: [0x11; 16],
    app_s_key: [0x22; 16],
};

const RULES: &str = r#"version = 1

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

fn level(mm: u16) -> Vec<u8> {
    mm.to_be_bytes().to_vec()
}

fn at(offset_ms: u64, payload: Vec<u8>) -> Frame {
    let mut f = frames_at(&[offset_ms], 1).remove(0);
    f.payload = payload;
    f
}

#[test]
fn the_lrwn_frame_builder_reproduces_the_published_vector() {
    let d = Device {
        dev_eui: "0000000000000001",
        dev_addr: [0x49, 0xBE, 0x7D, 0xF1],
        nwk_s_key: hex::decode("44024241ed4ce9a68c6a8bc055233fd3")
            .unwrap()
            .try_into()
            .unwrap(),
        app_s_key: hex::decode("ec925802ae430ca77fd3dd73cb2cc588")
            .unwrap()
            .try_into()
            .unwrap(),
    };
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
    let mut bad_mic = SENSOR.uplink(3, 2, &level(3000));
    let last = bad_mic.len() - 1;
    bad_mic[last] ^= 0x01;
    let second = SENSOR.uplink(2, 2, &level(300));
    let scenario = vec![
        // High level: demand, inhibited by min off from boot, then a start on the tick.
        at(500, SENSOR.uplink(1, 2, &level(3000))),
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
    let relay = dir.path().join("relay.jsonl");
    let transitions = || -> Vec<bool> {
        std::fs::read_to_string(&relay)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["on"] == true)
            .collect()
    };
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
        log.contains("replay: frame counter 2 was already accepted"),
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
    assert!(agent.is_running());
    // SIGTERM: the relay stays (or is driven) off.
    agent.sigterm();
    assert_eq!(transitions().last(), Some(&false));
}
