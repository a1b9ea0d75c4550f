//! Remote operations (issue 22): what the network team sees of a gateway without driving to it.

use std::time::{Duration, Instant};

use lora_edge_e2e::*;
use serde_json::Value;

/// The latest `state/health` message seen satisfying `pred`.
fn wait_health(c: &Collector, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let until = Instant::now() + patience(timeout);
    while Instant::now() < until {
        let found = c
            .on("/state/health")
            .iter()
            .rev()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .find(|v| pred(v));
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// sha256 of a file by coreutils, not by the agent's code.
fn sha256sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn health_is_retained_current_and_says_when_the_gateway_stopped() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, dir) = AgentSetup::new(broker.port)
        .scenario(&frames(5, 1, 0, 10.0))
        .start();
    let h = wait_health(&collector, Duration::from_secs(15), |v| {
        v["radio"]["state"] == "up"
    })
    .unwrap_or_else(|| panic!("no health with the radio up\n{}", agent.log()));
    assert_eq!(h["gateway_id"], GATEWAY_ID, "{h}");
    assert_eq!(h["state"], "running", "{h}");
    assert!(
        h["hal"]
            .as_str()
            .unwrap()
            .contains("simulated concentrator"),
        "{h}"
    );
    assert_eq!(h["radio"]["concentrator_eui"], GATEWAY_ID, "{h}");
    assert_eq!(h["backhaul"]["up"], true, "{h}");
    assert_eq!(h["backhaul"]["outages_total"], 0, "{h}");
    assert!(h["store"]["free_bytes"].as_u64().unwrap() > 0, "{h}");
    let files = h["config_files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{h}");
    assert_eq!(
        files[0]["sha256"].as_str().unwrap(),
        sha256sum(&dir.path().join("agent.toml")),
        "{h}"
    );
    let retained = collector
        .on("/state/health")
        .iter()
        .all(|m| m.retain || !m.topic.is_empty());
    assert!(retained);

    assert!(agent.sigterm().success(), "{}", agent.log());
    // Someone looking later (a new subscriber) reads the retained message: stopped.
    let late = Collector::start(broker.port, "eu868");
    let h = wait_health(&late, Duration::from_secs(5), |_| true)
        .unwrap_or_else(|| panic!("no retained health\n{}", agent.log()));
    assert_eq!(h["state"], "stopped", "{h}");
}

#[test]
fn health_says_at_once_why_the_radio_is_down() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("[faults]\nspi = \"answers_0xff\"")
        // Not on the stats interval: at once, on the change.
        .config("[stats]\ninterval = \"1h\"")
        .start();
    let h = wait_health(&collector, Duration::from_secs(15), |v| {
        v["radio"]["state"] == "down"
    })
    .unwrap_or_else(|| panic!("no health with the radio down\n{}", agent.log()));
    assert_eq!(h["radio"]["cause"], "spi_silent", "{h}");
    assert_eq!(
        h["radio"]["last_error"], "Note: chip version is 0xFF (v15.15)",
        "{h}"
    );
    assert!(h["radio"]["temperature_c"].is_null(), "{h}");
}
