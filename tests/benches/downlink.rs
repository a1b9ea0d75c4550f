//! Downlink benchmark: 50 downlinks/s for 60 s (half Class A, 1 s after the latest uplink's
//! counter, half Class C) under 100 uplinks/s.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench downlink`
//!
//! Prints: time from MQTT delivery to the scheduling decision (measured inside the agent, from
//! its "downlink summary" line), the hand-off lead distribution and late hand-offs (from the
//! simulator's record of every lgw_send: counter at hand-off vs. the packet's start), and the
//! ack statuses. Then the same under full CPU load (one, then four busy threads per core in the
//! bench process), each time once with the radio and downlink threads at their default real-time
//! priority and once with `radio.realtime_priority = 0` (normal scheduling), to show what the
//! priority buys.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chirpstack_api::gw;
use chirpstack_api::pbjson_types;
use lora_edge_e2e::*;
use prost::Message;

fn item(timing: gw::timing::Parameters, ctx: u32, id: u32) -> gw::DownlinkFrameItem {
    gw::DownlinkFrameItem {
        phy_payload: id.to_be_bytes().to_vec(),
        tx_info: Some(gw::DownlinkTxInfo {
            frequency: 869_525_000,
            power: 14,
            modulation: Some(gw::Modulation {
                parameters: Some(gw::modulation::Parameters::Fsk(gw::FskModulationInfo {
                    frequency_deviation: 25_000,
                    datarate: 50_000,
                })),
            }),
            timing: Some(gw::Timing {
                parameters: Some(timing),
            }),
            context: ctx.to_be_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field(line: &str, key: &str) -> i64 {
    log_field(line, "downlink summary", key).unwrap_or(-1)
}

fn main() {
    println!(
        "lora-edge downlink benchmark (release binary, Mosquitto on loopback, 2-core machine)"
    );
    run("idle machine, default priority", "", 0, 60);
    for per_core in [1, 4] {
        let load = format!("{per_core} busy thread(s) per core");
        run(
            &format!("{load}, default real-time priority (20)"),
            "",
            per_core,
            30,
        );
        run(
            &format!("{load}, normal scheduling"),
            "realtime_priority = 0",
            per_core,
            30,
        );
    }
}

/// `hogs_per_core` busy threads per core (0: an idle machine).
fn run(label: &str, radio_config: &str, hogs_per_core: usize, seconds: u32) {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 100.0\nsynthetic_devices = 50")
        .config(&format!(
            "[radio]\nenforce_duty_cycle = false\n{radio_config}"
        ))
        .start();
    collector.wait_for("/event/up", Duration::from_secs(10), |m| !m.is_empty());
    let hogs = (hogs_per_core > 0).then(|| CpuHogs::start(hogs_per_core));
    let topic = format!("eu868/gateway/{GATEWAY_ID}/command/down");
    let t0 = Instant::now();
    let mut id = 0u32;
    let publisher = Publisher::connect(broker.port);
    for s in 0..seconds {
        let ups = collector.on("/event/up");
        let last = decode_uplink(&ups.last().unwrap().payload, false);
        let ctx = u32::from_be_bytes(last.rx_info.unwrap().context.try_into().unwrap());
        for i in 0..50u32 {
            id += 1;
            let timing = if i % 2 == 0 {
                // About 1 s after this command is sent: the latest uplink counter plus its offset in the second.
                let ms = 1000 + i as i32 * 20;
                gw::timing::Parameters::Delay(gw::DelayTimingInfo {
                    delay: Some(pbjson_types::Duration {
                        seconds: (ms / 1000) as i64,
                        nanos: (ms % 1000) * 1_000_000,
                    }),
                })
            } else {
                gw::timing::Parameters::Immediately(gw::ImmediatelyTimingInfo {})
            };
            let f = gw::DownlinkFrame {
                gateway_id: GATEWAY_ID.into(),
                downlink_id: id,
                items: vec![item(timing, ctx, id)],
                ..Default::default()
            };
            publisher.send(&topic, f.encode_to_vec());
            // A steady 50 a second.
            let next = t0 + Duration::from_millis(s as u64 * 1000 + (i as u64 + 1) * 20);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }
    let acks = collector.wait_for("/event/ack", Duration::from_secs(30), |m| {
        m.len() >= id as usize
    });
    drop(hogs);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for a in &acks {
        let a = gw::DownlinkTxAck::decode(a.payload.as_slice()).unwrap();
        *statuses
            .entry(format!("{:?}", a.items[0].status()))
            .or_default() += 1;
    }
    let _ = agent.sigterm();
    let log = agent.log();
    let summary = log
        .lines()
        .rev()
        .find(|l| l.contains("downlink summary"))
        .unwrap_or("")
        .to_string();
    let sent = tx_log(dir.path());
    let mut leads: Vec<i64> = sent.iter().map(Sent::lead_us).collect();
    leads.sort_unstable();
    let late = leads.iter().filter(|l| **l < 3_000).count();
    let p = |q: usize| {
        leads
            .get((leads.len().max(1) - 1) * q / 100)
            .copied()
            .unwrap_or(0)
    };
    let uplinks = collector.on("/event/up").len();
    println!("{label}:");
    println!("  {id} downlinks in {seconds} s (50/s, half Class A at +1 s, half Class C) under {uplinks} uplinks (100/s)");
    println!("  acks: {} {statuses:?}", acks.len());
    println!(
        "  MQTT delivery -> scheduling decision (agent): p50 {} us, p99 {} us, max {} us over {} commands",
        field(&summary, "to_decision_us_p50"),
        field(&summary, "to_decision_us_p99"),
        field(&summary, "to_decision_us_max"),
        field(&summary, "decided")
    );
    println!(
        "  hand-off lead before start (simulator's record of {} lgw_send): min {} us, p1 {} us, p50 {} us, p99 {} us, max {} us",
        leads.len(),
        leads.first().copied().unwrap_or(0),
        p(1),
        p(50),
        p(99),
        leads.last().copied().unwrap_or(0)
    );
    println!(
        "  late hand-offs (lead < 3 ms): {late} (agent's own count: {})",
        field(&summary, "late")
    );
}
