//! The agent on the Pi's CPU, emulated: cold start to the first frame forwarded, idle RSS and
//! CPU, for a cross-built binary run through binfmt_misc and qemu-user (`cross/bench`). The
//! figures include the emulator's own cost: indicative only.
//!
//! `LORA_EDGE_BIN=target/aarch64-unknown-linux-gnu/release/lora-edge QEMU_LD_PREFIX=/usr/aarch64-linux-gnu \
//!  cargo bench -p lora-edge-e2e --bench target`

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

fn main() {
    let bin = agent_binary();
    println!("lora-edge on an emulated target: {}", bin.display());
    for run in 1..=3 {
        let broker = Broker::start();
        let arrivals = subscribe_uplinks(broker.port);
        let started = Instant::now();
        let (mut agent, _dir) = AgentSetup::new(broker.port)
            .sim("synthetic_rate_hz = 1.0\nsynthetic_devices = 4")
            .start();
        let first = wait_until(Duration::from_secs(60), || {
            arrivals.count.load(Ordering::Relaxed) > 0
        })
        .then(|| started.elapsed().as_secs_f64() * 1000.0);
        let pid = agent.pid().unwrap();
        // Idle: 1 frame/s for 30 s.
        let cpu0 = cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs(30));
        let cpu = cpu_seconds(pid) - cpu0;
        println!(
            "run {run}: start to first frame at the broker {} ms; idle (1 frame/s) cpu {:.1} % of a core, rss {:.1} MB",
            first.map_or("never".into(), |ms| format!("{ms:.0}")),
            cpu / 30.0 * 100.0,
            rss(pid) as f64 / 1e6,
        );
        let _ = agent.sigterm();
    }
}
