//! Store-and-forward benchmark: N frames of ~200 bytes buffered during an outage, then the
//! broker comes back.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench store -- 100000 1000000`
//!
//! Prints per N: fill rate, drain rate, disk bytes per buffered frame (allocated size of the
//! store directory), peak RSS while filling and while draining, bytes written to disk per
//! payload byte (/proc/<pid>/io), store open time with the full backlog, and the latency of
//! live frames received during the drain.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

const PHY: usize = 200;

fn run(n: u64) {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    let arrivals = subscribe_uplinks(broker.port);
    proxy.set(Mode::Refuse);
    let (mut agent, dir) = AgentSetup::new(proxy.port)
        .sim(&format!(
            "synthetic_rate_hz = 15000\nsynthetic_max_frames = {n}\nsynthetic_payload_size = {PHY}\nsynthetic_devices = 500"
        ))
        .config("[mqtt]\ninflight = 256\n[store]\nmax_size_mib = 4096\n[stats]\ninterval = \"1s\"")
        .start();
    let pid = agent.pid().unwrap();
    let sampler = RssSampler::start(pid);
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
    let t0 = Instant::now();
    let filled = wait_until(Duration::from_secs(n / 2000 + 60), || {
        agent.status_value("rx").unwrap_or(0) >= n
    });
    // Let the store writer finish the last batches.
    wait_until(Duration::from_secs(30), || {
        agent.status_value("accepted").unwrap_or(0) >= agent.status_value("rx").unwrap_or(0)
    });
    let fill_s = t0.elapsed().as_secs_f64();
    let accepted = agent.status_value("accepted").unwrap_or(0);
    let dropped = agent.status_value("dropped").unwrap_or(0);
    let written = write_bytes(pid);
    let rss_fill = sampler.max();
    drop(sampler);
    let store = dir.path().join("store");
    let disk_full = disk_usage(&store);
    assert!(agent.sigterm().success());

    // Restart with the full backlog and live traffic at 10 frames/s; the broker is still away.
    agent.set_simulator(&format!(
        "synthetic_rate_hz = 10.0\nsynthetic_payload_size = {PHY}\n"
    ));
    agent.start_again();
    assert_eq!(
        agent.wait_log_count("store opened", 2, Duration::from_secs(60)),
        2
    );
    let log = agent.log();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!(
            "{}",
            log.lines()
                .rev()
                .find(|l| l.contains("store opened"))
                .unwrap_or("")
        );
    }
    let open_ms = log_field(&log, "store opened", "open_ms").unwrap_or(0) as u64;
    let record_bytes = log_field(&log, "store opened", "backlog_bytes").unwrap_or(0) as u64;
    let pid = agent.pid().unwrap();
    let sampler = RssSampler::start(pid);
    std::thread::sleep(Duration::from_secs(2));
    let backlog = agent.status_value("backlog").unwrap_or(0);

    let t1 = Instant::now();
    let pass_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    proxy.set(Mode::Pass);
    let drained = wait_until(Duration::from_secs(n / 1000 + 60), || {
        arrivals.count.load(Ordering::Relaxed) >= accepted
    });
    let drain_s = t1.elapsed().as_secs_f64();
    let rss_drain = sampler.max();
    std::thread::sleep(Duration::from_secs(2));
    let samples = arrivals.samples.lock().unwrap().clone();
    let mut live: Vec<f64> = samples
        .iter()
        .filter(|s| s.1 > pass_us)
        .map(|s| (s.0 as f64 - s.1 as f64) / 1000.0)
        .collect();
    live.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let disk_after = disk_usage(&store);
    let _ = agent.sigterm();

    println!(
        "N = {n} frames of {PHY} B PHYPayload ({} B stored per record on average)",
        record_bytes / backlog.max(1)
    );
    println!(
        "  fill: {accepted} accepted, {dropped} dropped {} in {fill_s:.1} s ({:.0} frames/s); peak RSS filling {:.1} MB",
        if filled { "" } else { "(INCOMPLETE)" },
        accepted as f64 / fill_s,
        rss_fill as f64 / 1e6
    );
    println!(
        "  disk: {:.1} MiB for the backlog = {:.0} B per frame = {:.2} B per record byte = {:.2} B per PHY byte; {:.1} MiB after the drain",
        disk_full as f64 / 1048576.0,
        disk_full as f64 / accepted.max(1) as f64,
        disk_full as f64 / record_bytes.max(1) as f64,
        disk_full as f64 / (accepted.max(1) * PHY as u64) as f64,
        disk_after as f64 / 1048576.0
    );
    println!(
        "  written while filling: {:.1} MiB = {:.2} B per record byte = {:.2} B per PHY byte",
        written as f64 / 1048576.0,
        written as f64 / record_bytes.max(1) as f64,
        written as f64 / (accepted.max(1) * PHY as u64) as f64
    );
    println!("  open with the full backlog ({backlog} events): {open_ms} ms");
    println!(
        "  drain: {} of {accepted} delivered {} in {drain_s:.1} s = {:.0} frames/s; peak RSS draining {:.1} MB",
        arrivals.count.load(Ordering::Relaxed),
        if drained { "" } else { "(INCOMPLETE)" },
        accepted as f64 / drain_s,
        rss_drain as f64 / 1e6
    );
    println!(
        "  live frames during the drain: {} , latency ms p50 {:.0} p99 {:.0} max {:.0}",
        live.len(),
        percentile(&live, 50.0),
        percentile(&live, 99.0),
        live.last().copied().unwrap_or(f64::NAN)
    );
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    println!("lora-edge store-and-forward benchmark (release binary, Mosquitto on loopback, 2-core machine)");
    for n in sizes {
        run(n);
    }
}
