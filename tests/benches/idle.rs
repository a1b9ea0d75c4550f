//! What a gateway costs while it idles: CPU of the agent at a low frame rate, per thread, with
//! the broker up (a gateway spends most of its life like this).
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench idle [-- rate:seconds ...]`
//! (default 1:120 100:30 1000:10, the cases of the comparison with ChirpStack's forwarder). Set
//! `LORA_EDGE_BIN` to measure another build. CPU = user + system ticks from /proc (10 ms
//! resolution: run long enough); the simulated concentrator runs inside the agent and is
//! counted; the broker's CPU is printed beside it.
//! `IDLE_BENCH_CONFIG` adds configuration lines (a literal `\n` between them) to compare settings.

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

/// CPU seconds the scheduler ran the process's threads (`/proc/<pid>/task/*/schedstat`):
/// nanoseconds, where the tick counts of `/proc/<pid>/stat` round each thread to 10 ms.
fn sched_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// One case: `rate` frames/s for `seconds`, a fresh broker and agent.
fn case(rate: f64, seconds: f64, threads: bool) {
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim(&format!(
            "synthetic_rate_hz = {rate}\nsynthetic_devices = 50"
        ))
        .config(&format!(
            "[stats]\ninterval = \"30s\"\n{}",
            // More settings to compare, e.g. IDLE_BENCH_CONFIG='[radio] poll_interval = "20ms"'
            // (one line per setting: `\n` in the variable).
            std::env::var("IDLE_BENCH_CONFIG")
                .unwrap_or_default()
                .replace("\\n", "\n")
        ))
        .start();
    let pid = agent.pid().unwrap();
    let bpid = broker.pid().unwrap();
    let count = || arrivals.count.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(Duration::from_secs(30), || count() > 0);
    std::thread::sleep(Duration::from_secs(2));
    let (before, s0, c0, b0, n0, t0) = (
        per_thread(pid),
        sched_seconds(pid),
        cpu_seconds(pid),
        cpu_seconds(bpid),
        count(),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (after, s1, c1, b1, n1) = (
        per_thread(pid),
        sched_seconds(pid),
        cpu_seconds(pid),
        cpu_seconds(bpid),
        count(),
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let frames = (n1 - n0).max(1) as f64;
    println!(
        "{rate:>6} frames/s for {elapsed:>4.0} s: {:>6} delivered, agent {:.3} s per 1000 frames = {:.3} % of a core (schedstat: {:.3} s, {:.3} %), peak RSS {:.1} MB; broker {:.2} s",
        n1 - n0,
        (c1 - c0) * 1000.0 / frames,
        (c1 - c0) * 100.0 / elapsed,
        (s1 - s0) * 1000.0 / frames,
        (s1 - s0) * 100.0 / elapsed,
        peak_rss(pid) as f64 / 1e6,
        b1 - b0,
    );
    if threads {
        for (name, c) in &after {
            let d = c - before.get(name).copied().unwrap_or(0.0);
            if d > 0.0 {
                println!(
                    "    thread {name:<16} {:.3} % of a core",
                    d * 100.0 / elapsed
                );
            }
        }
    }
    let _ = agent.sigterm();
}

fn main() {
    // `rate:seconds` cases after `--`; default the three of the comparison with ChirpStack's
    // forwarder.
    let cases: Vec<(f64, f64)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (r, s) = a.split_once(':')?;
            Some((r.parse().ok()?, s.parse().ok()?))
        })
        .collect();
    let cases = if cases.is_empty() {
        vec![(1.0, 120.0), (100.0, 30.0), (1000.0, 10.0)]
    } else {
        cases
    };
    println!("lora-edge at steady rates, broker up (release binary, simulated concentrator in the agent, Mosquitto on loopback)");
    for (rate, seconds) in cases {
        case(rate, seconds, rate <= 10.0);
    }
}
