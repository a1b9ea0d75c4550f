//! The pump-safety rules under traffic: reaction time from the sensor frame leaving
//! `lgw_receive` to the actuator command, and the uplink path with and without the rules stage.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench rules`
//!
//! 60 s of 100 frames/s of other devices' uplinks, plus a level sensor every 1.2 s alternating
//! high (the pump starts) and below the dry-run threshold (it stops): with min off 1 s and 60
//! starts an hour allowed, every sensor frame drives the relay. Reaction times come from the agent's `reaction_us` log field (measured inside the
//! agent from the hand-over by `lgw_receive` to the relay call returning). Runs alternate
//! without and with rules, twice.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lora_edge_e2e::bench::*;
use lora_edge_e2e::lorawan::{level, RULES, SENSOR};
use lora_edge_e2e::*;

const SECONDS: u64 = 60;

/// Returns the reaction times (ms) of the run.
fn run(with_rules: bool) -> Vec<f64> {
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let offsets: Vec<u64> = (0..SECONDS * 100).map(|i| 500 + i * 10).collect();
    let mut scenario = frames_at(&offsets, 50);
    let sensor_frames = (SECONDS * 1000 / 1200) as u32;
    // The session's first reading is believed once a second agrees: one that the first
    // measured frame agrees with.
    let mut first = frames_at(&[305], 1).remove(0);
    first.payload = SENSOR.uplink(1, 2, &level(3000));
    scenario.push(first);
    for k in 0..sensor_frames {
        let mut f = frames_at(&[505 + k as u64 * 1200], 1).remove(0);
        let mm = if k % 2 == 0 { 3000 } else { 300 };
        f.payload = SENSOR.uplink(k + 2, 2, &level(mm));
        scenario.push(f);
    }
    scenario.sort_by_key(|f| f.offset_ms);
    let total = scenario.len() as u64;
    let mut setup = AgentSetup::new(broker.port).scenario(&scenario);
    if with_rules {
        let rules = RULES
            .replace("min_off = \"2s\"", "min_off = \"1s\"")
            .replace("max_starts_per_hour = 10", "max_starts_per_hour = 60");
        std::fs::write(setup.dir.path().join("rules.toml"), rules).unwrap();
        pki::write(setup.dir.path(), "keys.toml", &SENSOR.keys_toml(), 0o600);
        setup = setup.config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"");
    }
    let (mut agent, _dir) = setup.start();
    let pid = agent.pid().unwrap();
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
    let cpu0 = cpu_seconds(pid);
    let all = wait_until(Duration::from_secs(SECONDS * 3 + 30), || {
        arrivals.count.load(Ordering::Relaxed) >= total
    });
    let cpu = cpu_seconds(pid) - cpu0;
    let (got, _, lat) = arrivals.delivered();
    let log = agent.log();
    let mut reaction: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("actuator driven by a sensor frame"))
        .filter_map(|l| log_field(l, "actuator driven", "reaction_us"))
        .map(|us| us as f64 / 1000.0)
        .collect();
    reaction.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{:<12} uplinks {got}/{total} {}, latency ms p50 {:.2} p99 {:.2}, cpu {:.3} s/1000 frames, \
         peak rss {:.1} MB; sensor frame -> relay: {} of {sensor_frames} frames, ms p50 {:.3} p99 {:.3} max {:.3}",
        if with_rules { "with rules" } else { "no rules" },
        if all { "(all)" } else { "(INCOMPLETE)" },
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        cpu / got.max(1) as f64 * 1000.0,
        peak_rss(pid) as f64 / 1e6,
        reaction.len(),
        percentile(&reaction, 50.0),
        percentile(&reaction, 99.0),
        reaction.last().copied().unwrap_or(f64::NAN),
    );
    let _ = agent.sigterm();
    reaction
}

fn main() {
    println!("lora-edge rules benchmark (release binary, Mosquitto on loopback, 2-core machine)");
    let mut all = Vec::new();
    for _ in 0..2 {
        run(false);
        all.extend(run(true));
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "sensor frame -> relay over both runs: {} samples, ms p50 {:.3} p99 {:.3} max {:.3}",
        all.len(),
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN)
    );
}
