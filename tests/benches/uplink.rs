//! Uplink benchmark: simulated concentrator → lora-edge (release) → Mosquitto → subscriber.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench uplink`
//!
//! Prints: latency from the receive call (gw_time) to delivery at a subscriber at 100 frames/s,
//! delivered frames/s at offered rates, frames dropped, CPU seconds per 1000 frames, peak RSS.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

fn run(rate: f64, seconds: u64, payload: usize) {
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let total = (rate * seconds as f64) as u64;
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim(&format!(
            "synthetic_rate_hz = {rate}\nsynthetic_max_frames = {total}\nsynthetic_payload_size = {payload}\nsynthetic_devices = 200"
        ))
        .config("[mqtt]\ninflight = 256\n[stats]\ninterval = \"1s\"")
        .start();
    let pid = agent.pid().unwrap();
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
    let started = Instant::now();
    let cpu0 = cpu_seconds(pid);
    let done = wait_until(Duration::from_secs(seconds * 4 + 30), || {
        arrivals.count.load(Ordering::Relaxed) >= total
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let (got, delivered_rate, lat) = arrivals.delivered();
    std::thread::sleep(Duration::from_millis(1500));
    let dropped = agent.status_value("dropped").unwrap_or(0);
    println!(
        "offered {rate:>7.0} fps x {seconds:>3} s ({payload} B PHY): delivered {got:>7}/{total} {} in {elapsed:>5.1} s, \
         {delivered_rate:>7.0} fps, dropped {dropped}, latency ms p50 {:.2} p99 {:.2} max {:.2}, \
         cpu {:.3} s/1000 frames, peak rss {:.1} MB",
        if done { "(all)" } else { "(INCOMPLETE)" },
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
        cpu / got.max(1) as f64 * 1000.0,
        peak_rss(pid) as f64 / 1e6,
    );
    let _ = agent.sigterm();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    println!("lora-edge uplink benchmark (release binary, Mosquitto on loopback, 2-core machine)");
    if args.is_empty() || args.iter().any(|a| a == "latency") {
        run(100.0, 30, 24);
    }
    if args.is_empty() || args.iter().any(|a| a == "throughput") {
        for rate in [5_000.0, 10_000.0, 15_000.0, 20_000.0] {
            run(rate, 10, 24);
        }
    }
}
