//! The backhaul through a WAN-like link (the fault proxy's latency, jitter-free, and capacity).
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench wan`
//!
//! For each link: time from the agent's start to the first frame at a subscriber (live traffic
//! at 20 frames/s), then the drain rate of a 2000-frame backlog accepted while the broker was
//! unreachable (from its first frame at the broker to its last), and the TCP connections the
//! proxy accepted for each (goal: 1). Then the largest
//! round trip at which a downlink answering an uplink at once still goes out in RX1 (1 s) with
//! the default settings.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chirpstack_api::gw;
use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

const BACKLOG: u64 = 2000;

fn link_run(name: &str, link: Link) {
    // Live traffic: start to first frame.
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.shape(link);
    let arrivals = subscribe_uplinks(broker.port);
    let started = Instant::now();
    let (mut agent, _dir) = AgentSetup::new(proxy.port)
        .sim("synthetic_rate_hz = 20.0\nsynthetic_max_frames = 100")
        .start();
    let first = wait_until(Duration::from_secs(60), || {
        arrivals.count.load(Ordering::Relaxed) > 0
    })
    .then(|| started.elapsed().as_secs_f64() * 1000.0);
    let live_connections = proxy.connections();
    let _ = agent.sigterm();
    drop(proxy);

    // A backlog, then the link comes back.
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let arrivals = subscribe_uplinks(broker.port);
    let (mut agent, _dir) = AgentSetup::new(proxy.port)
        .sim(&format!(
            "synthetic_rate_hz = 2000.0\nsynthetic_max_frames = {BACKLOG}"
        ))
        .start();
    agent.wait_status("accepted", BACKLOG, Duration::from_secs(60));
    proxy.shape(link);
    let before = proxy.connections();
    proxy.set(Mode::Pass);
    // From the first frame at the broker: the agent may still be in its reconnect back-off
    // when the link comes back, which says nothing about the link.
    wait_until(Duration::from_secs(60), || {
        arrivals.count.load(Ordering::Relaxed) > 0
    });
    let t0 = Instant::now();
    let all = wait_until(Duration::from_secs(300), || {
        arrivals.count.load(Ordering::Relaxed) >= BACKLOG
    });
    let secs = t0.elapsed().as_secs_f64();
    let got = arrivals.count.load(Ordering::Relaxed) - 1;
    println!(
        "{name:<28} first frame after start {:>7} ms ({} connection(s)); backlog of {BACKLOG} drained {} in {secs:>6.1} s: {:>6.0} frames/s ({} connection(s))",
        first.map_or("never".to_string(), |ms| format!("{ms:.0}")),
        live_connections,
        if all { "whole" } else { "INCOMPLETE" },
        got as f64 / secs,
        proxy.connections() - before,
    );
    let _ = agent.sigterm();
}

/// Whether a downlink sent in answer to an uplink the moment it arrives goes out in RX1.
fn rx1_at(rtt_ms: u64) -> gw::TxAckStatus {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.shape(Link::delay(rtt_ms / 2, 0));
    let collector = Collector::start(broker.port, "eu868");
    let up = frames(1, 1, 1000, 0.0);
    let (mut agent, _dir) = AgentSetup::new(proxy.port).scenario(&up).start();
    let ctx = first_uplink_context(&collector, Duration::from_secs(30));
    publish(
        broker.port,
        DOWN,
        frame(
            1,
            vec![lora(868_100_000, 14, 7, delay(1000), ctx, b"\x60rx1")],
        ),
    );
    let status = ack(&collector, 1, Duration::from_secs(15))[0];
    let _ = agent.sigterm();
    status
}

fn main() {
    println!("lora-edge WAN benchmark (release binary, Mosquitto behind the fault proxy, 2-core machine)");
    for (name, link) in [
        ("rtt 0 ms", Link::default()),
        ("rtt 100 ms", Link::delay(50, 0)),
        ("rtt 300 ms", Link::delay(150, 0)),
        ("rtt 600 ms", Link::delay(300, 0)),
        ("64 kbit/s, rtt 100 ms", Link::thin(50, 64)),
    ] {
        link_run(name, link);
    }
    for rtt in [300, 500, 700, 800, 850, 900, 1000] {
        println!(
            "downlink in answer to an uplink, rtt {rtt:>4} ms: {:?}",
            rx1_at(rtt)
        );
    }
}
