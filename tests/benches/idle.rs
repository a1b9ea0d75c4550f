//! What a gateway costs while it idles: CPU of the agent at a low frame rate, per thread, with
//! the broker up (a gateway spends most of its life like this).
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench idle [-- <rate> <seconds>]`
//! (default 1 frame/s for 120 s). Set `LORA_EDGE_BIN` to measure another build. CPU = user +
//! system ticks from /proc (10 ms resolution: run long enough); the simulated concentrator
//! runs inside the agent and is counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

/// CPU seconds per thread name (threads of the same name summed).
fn per_thread(pid: u32) -> BTreeMap<String, f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += ticks / hz;
    }
    out
}

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(1.0);
    let seconds = args.get(1).copied().unwrap_or(120.0);
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim(&format!(
            "synthetic_rate_hz = {rate}\nsynthetic_devices = 50"
        ))
        .config("[stats]\ninterval = \"30s\"")
        .start();
    let pid = agent.pid().unwrap();
    wait_until(Duration::from_secs(30), || {
        arrivals.count.load(std::sync::atomic::Ordering::Relaxed) > 0
    });
    std::thread::sleep(Duration::from_secs(2));
    let (before, c0, t0) = (per_thread(pid), cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (after, c1) = (per_thread(pid), cpu_seconds(pid));
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "lora-edge idle benchmark: {rate} frames/s for {elapsed:.0} s: {:.3} % of a core ({:.2} s per 1000 frames)",
        (c1 - c0) * 100.0 / elapsed,
        (c1 - c0) * 1000.0 / (rate * elapsed)
    );
    for (name, c) in &after {
        let d = c - before.get(name).copied().unwrap_or(0.0);
        if d > 0.0 {
            println!("  thread {name:<16} {:.3} % of a core", d * 100.0 / elapsed);
        }
    }
    let _ = agent.sigterm();
}
