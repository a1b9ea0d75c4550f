//! Flash wear: bytes the agent causes to be written to storage per frame, at a steady rate with
//! the broker up (the normal state: each frame written, then removed once acknowledged).
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench flash [-- 5s]`
//! (an argument sets `store.commit_interval`, the fsync period; default 500ms)
//!
//! Block-layer bytes from `/proc/<pid>/io` (`write_bytes`), between the first frame at the
//! broker and the end of the run, at 1, 10 and 100 frames/s (24-byte PHYPayloads), and what
//! 10 frames/s means per day. SD cards wear by the page, so small commits count in full.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

fn run(rate: f64, seconds: u64, commit_interval: &str) -> f64 {
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim(&format!(
            "synthetic_rate_hz = {rate}\nsynthetic_devices = 50"
        ))
        .config(&format!(
            "[stats]\ninterval = \"30s\"\n[store]\ncommit_interval = \"{commit_interval}\""
        ))
        .start();
    let pid = agent.pid().unwrap();
    wait_until(Duration::from_secs(30), || {
        arrivals.count.load(Ordering::Relaxed) > 0
    });
    let (w0, n0, t0) = (
        write_bytes(pid),
        arrivals.count.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (w1, n1) = (write_bytes(pid), arrivals.count.load(Ordering::Relaxed));
    let frames = (n1 - n0).max(1);
    let per_frame = (w1 - w0) as f64 / frames as f64;
    println!(
        "{rate:>6.0} frames/s for {:>4.0} s: {frames:>6} frames, {:>10} bytes written, {per_frame:>8.0} bytes per frame",
        t0.elapsed().as_secs_f64(),
        w1 - w0
    );
    let _ = agent.sigterm();
    per_frame
}

fn main() {
    let commit_interval = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "500ms".into());
    println!(
        "lora-edge flash-wear benchmark (release binary, Mosquitto on loopback, broker up, store.commit_interval = {commit_interval})"
    );
    run(1.0, 120, &commit_interval);
    let at10 = run(10.0, 60, &commit_interval);
    run(100.0, 30, &commit_interval);
    println!(
        "at 10 frames/s: {:.2} GB written per day",
        at10 * 10.0 * 86_400.0 / 1e9
    );
}
