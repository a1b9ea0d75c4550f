//! Remote operations, measured (issue 22): how long a change takes from the centre's request to
//! running, what it costs in frames, and what the health message weighs.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench ops`
//!
//! - a rule file applied from the centre (`command/ops` `apply`), request to answer (the
//!   answer comes once the rules stage runs it), 5 times;
//! - a channel plan (`command/config`), request to answer (the radio drained, stopped, started
//!   with it), 5 times, and the `apply_ms` the agent reports;
//! - a configuration change (`apply` with `"config"`), request to `"kept"` (the agent restarts
//!   itself, its backhaul comes up, the change is kept), 3 times;
//! - frames lost across the rule applies and the channel plans at 100 frames/s of uplinks:
//!   sequence numbers missing at the centre, and `rx_dropped_total`;
//! - `state/health`: size in bytes and messages a minute on an idle gateway (stats every 30 s).

use std::time::{Duration, Instant};

use chirpstack_api::gw;
use lora_edge_e2e::lorawan::{RULES, SENSOR};
use lora_edge_e2e::*;
use prost::Message;
use serde_json::{json, Value};

fn answer(c: &Collector, id: &str, timeout: Duration) -> Option<Value> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Some(a) = c
            .on("/event/ops")
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .find(|a| a["id"] == id)
        {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn plan(version: &str, base_hz: u32) -> Vec<u8> {
    gw::GatewayConfiguration {
        gateway_id: GATEWAY_ID.into(),
        version: version.into(),
        channels: (0..8)
            .map(|i| gw::ChannelConfiguration {
                frequency: base_hz + 200_000 * i,
                modulation_config: Some(
                    gw::channel_configuration::ModulationConfig::LoraModulationConfig(
                        gw::LoraModulationConfig {
                            bandwidth: 125_000,
                            spreading_factors: (7..=12).collect(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn summary(name: &str, ms: &[f64]) {
    let mut v = ms.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<44} n={} median {:.0} ms, min {:.0}, max {:.0}",
        v.len(),
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    );
}

fn main() {
    println!("remote operations (release binary, simulated concentrator, Mosquitto on loopback)");
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let setup = AgentSetup::new(broker.port).sim("synthetic_rate_hz = 100");
    let remote = setup.dir.path().join("remote.toml");
    std::fs::write(setup.dir.path().join("rules.toml"), RULES).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
    let (agent, _dir) = setup
        .config(&format!(
            "[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"\n[ops]\nremote_config = \"{}\"\n",
            remote.display()
        ))
        .start();
    assert!(agent.wait_log("subscribed: commands will arrive", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_secs(2));
    let ops = format!("eu868/gateway/{GATEWAY_ID}/command/ops");
    let config = format!("eu868/gateway/{GATEWAY_ID}/command/config");

    let mut rules_ms = Vec::new();
    for i in 0..5 {
        let id = format!("rules-{i}");
        let text = RULES.replace("stop_at = 1.0", &format!("stop_at = 1.{}", i + 1));
        let t0 = Instant::now();
        publish(
            broker.port,
            &ops,
            serde_json::to_vec(&json!({"id": id, "op": "apply", "rules": text})).unwrap(),
        );
        let a = answer(&collector, &id, Duration::from_secs(20)).expect("rules answer");
        assert_eq!(a["ok"], true, "{a}");
        rules_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut plan_ms = Vec::new();
    let mut plan_agent_ms = Vec::new();
    for i in 0..5 {
        let id = format!("plan-{i}");
        let base = if i % 2 == 0 { 864_100_000 } else { 867_100_000 };
        let t0 = Instant::now();
        publish(broker.port, &config, plan(&id, base));
        let a = answer(&collector, &id, Duration::from_secs(60)).expect("plan answer");
        assert_eq!(a["ok"], true, "{a}");
        plan_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        plan_agent_ms.push(a["result"]["apply_ms"].as_f64().unwrap());
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (first, last, missing) = seq_gaps(&collector.all());
    let dropped = collector
        .on("/event/stats")
        .iter()
        .rev()
        .find_map(|m| {
            gw::GatewayStats::decode(m.payload.as_slice())
                .ok()?
                .metadata
                .get("rx_dropped_total")
                .cloned()
        })
        .unwrap_or_default();
    summary("rule file apply, request to answer", &rules_ms);
    summary("channel plan, request to answer", &plan_ms);
    summary("channel plan, apply_ms (agent)", &plan_agent_ms);
    println!(
        "across 5 rule applies and 5 channel plans at 100 frames/s: seq {first}..={last}, {} missing, rx_dropped_total {dropped}",
        missing.len()
    );

    let mut kept_ms = Vec::new();
    for i in 0..3 {
        let id = format!("cfg-{i}");
        let t0 = Instant::now();
        publish(
            broker.port,
            &ops,
            serde_json::to_vec(&json!({"id": id, "op": "apply",
                "config": format!("[stats]\ninterval = \"{}s\"\n", 20 + i)}))
            .unwrap(),
        );
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let kept = collector
                .on("/event/ops")
                .iter()
                .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
                .any(|a| a["id"] == id.as_str() && a["result"]["kept"] == true);
            if kept {
                break;
            }
            assert!(Instant::now() < until, "not kept\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        kept_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(1));
    }
    summary("configuration change, request to kept", &kept_ms);
    if std::env::var("OPS_BENCH_LOG").is_ok() {
        for l in agent.log().lines().filter(|l| {
            l.contains("restart")
                || l.contains("kept")
                || l.contains("applied")
                || l.contains("lora-edge version")
        }) {
            println!("  {l}");
        }
    }
    drop(agent);

    // Health on an idle gateway.
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .config("[stats]\ninterval = \"30s\"")
        .start();
    assert!(agent.wait_log("subscribed: commands will arrive", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_secs(3));
    let n0 = collector.on("/state/health").len();
    std::thread::sleep(Duration::from_secs(60));
    let health = collector.on("/state/health");
    let sizes: Vec<usize> = health.iter().map(|m| m.payload.len()).collect();
    println!(
        "state/health, idle gateway without rules: {} bytes, {} messages in 60 s",
        sizes.last().copied().unwrap_or(0),
        health.len() - n0
    );
}
