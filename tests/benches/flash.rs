//! Flash wear: bytes the agent causes to be written to storage per frame, at a steady rate with
//! the broker up (the normal state: each frame written, then removed once acknowledged).
//!
//! `cargo build --release -p lora-edge && [FLASH_BEFORE=<earlier binary>] cargo bench -p lora-edge-e2e --bench flash [-- 5s] [floor|outage]`
//! (an argument ending in s sets `store.commit_interval`, the fsync period; default 500ms;
//! `outage`: 10 minutes at 10 frames/s with the broker unreachable; `FLASH_BEFORE`: each run
//! with that binary too, right before ours, for a before/after in one run)
//!
//! Block-layer bytes from `/proc/<pid>/io` (`write_bytes`), between the first frame at the
//! broker and the end of the run, at 1, 10 and 100 frames/s (24-byte PHYPayloads), and what
//! 10 frames/s means per day. SD cards wear by the page, so small commits count in full.
//!
//! Then, for the engine decision, the floor that an append-only log with the same guarantees
//! would have (`floor`): each frame's record (~120 bytes) written to the kernel at once (it
//! survives a kill), the acknowledged watermark written after each PUBACK batch, and one
//! `fdatasync` per commit interval (what a power cut may lose), measured in this process.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::*;

/// One steady run of the agent (`bin`, or the one built beside the bench): bytes written and
/// CPU per frame. With `outage`, the broker is unreachable for the whole run (frames go to the
/// outage backlog) and the count is of frames accepted, not delivered.
fn run(
    label: &str,
    bin: Option<&str>,
    rate: f64,
    seconds: u64,
    commit_interval: &str,
    outage: bool,
) -> f64 {
    match bin {
        Some(b) => std::env::set_var("LORA_EDGE_BIN", b),
        None => std::env::remove_var("LORA_EDGE_BIN"),
    }
    let broker = Broker::start();
    let proxy = lora_edge_e2e::proxy::Proxy::start(broker.port);
    let arrivals = subscribe_uplinks(broker.port);
    let setup = AgentSetup::new(proxy.port)
        .sim(&format!(
            "synthetic_rate_hz = {rate}\nsynthetic_devices = 50"
        ))
        .config(&format!(
            "[stats]\ninterval = \"30s\"\n[store]\ncommit_interval = \"{commit_interval}\""
        ));
    // The agent's log lines go to a pipe on a gateway (journald), not to a file it writes:
    // here, to a file on tmpfs, so that only the store's writes are counted.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    std::os::unix::fs::symlink(
        shm.path().join("agent.log"),
        setup.dir.path().join("agent.log"),
    )
    .unwrap();
    let (mut agent, _dir) = setup.start();
    let pid = agent.pid().unwrap();
    wait_until(Duration::from_secs(30), || {
        arrivals.count.load(Ordering::Relaxed) > 0
    });
    if outage {
        proxy.set(lora_edge_e2e::proxy::Mode::Refuse);
        std::thread::sleep(Duration::from_secs(2));
    }
    let count = |agent: &Agent| {
        if outage {
            agent.status_value("accepted").unwrap_or(0)
        } else {
            arrivals.count.load(Ordering::Relaxed)
        }
    };
    let (w0, c0, n0, t0) = (
        write_bytes(pid),
        cpu_seconds(pid),
        count(&agent),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (w1, c1, n1) = (write_bytes(pid), cpu_seconds(pid), count(&agent));
    let elapsed = t0.elapsed().as_secs_f64();
    let frames = (n1 - n0).max(1);
    let per_frame = (w1 - w0) as f64 / frames as f64;
    println!(
        "{label:<7} {}{rate:>5.0} frames/s for {elapsed:>4.0} s: {frames:>6} frames, {:>10} bytes written, {per_frame:>8.0} bytes per frame; cpu {:.3} s per 1000 frames, {:.3} % of a core",
        if outage { "outage " } else { "" },
        w1 - w0,
        (c1 - c0) * 1000.0 / frames as f64,
        (c1 - c0) * 100.0 / elapsed,
    );
    let _ = agent.sigterm();
    per_frame
}

/// An append-only log's writes at `rate` records a second: write(2) of each record and of the
/// acknowledged watermark (the broker acknowledges at once), `fdatasync` every
/// `commit_interval`. Bytes written per record, from this process's `/proc/self/io`.
fn floor(rate: f64, seconds: u64, commit_interval: Duration) -> f64 {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut log = std::fs::File::create(dir.path().join("segment-0")).unwrap();
    let mut mark = std::fs::File::create(dir.path().join("acked")).unwrap();
    let me = std::process::id();
    let w0 = write_bytes(me);
    let start = Instant::now();
    let mut last_sync = start;
    let record = [0xA5u8; 120];
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        log.write_all(&record).unwrap();
        mark.seek(SeekFrom::Start(0)).unwrap();
        mark.write_all(&n.to_be_bytes()).unwrap();
        n += 1;
        if last_sync.elapsed() >= commit_interval {
            log.sync_data().unwrap();
            mark.sync_data().unwrap();
            last_sync = Instant::now();
        }
        let next = start + Duration::from_secs_f64(n as f64 / rate);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    log.sync_data().unwrap();
    mark.sync_data().unwrap();
    let per = (write_bytes(me) - w0) as f64 / n as f64;
    println!(
        "floor: append-only log, {rate:>5.0} records/s for {seconds} s, fdatasync every {commit_interval:?}: {n} records, {per:>6.0} bytes written per record"
    );
    per
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let commit_interval = args
        .iter()
        .find(|a| a.ends_with('s') && a.as_str() != "floor")
        .cloned()
        .unwrap_or_else(|| "500ms".into());
    println!(
        "lora-edge flash-wear benchmark (release binary, Mosquitto on loopback, store.commit_interval = {commit_interval})"
    );
    if args.iter().any(|a| a == "floor") {
        let interval = humantime_ms(&commit_interval);
        floor(1.0, 120, interval);
        floor(10.0, 60, interval);
        floor(100.0, 30, interval);
        return;
    }
    // `FLASH_BEFORE=<binary>`: the same runs with an earlier build, each right before ours.
    let before = std::env::var("FLASH_BEFORE").ok();
    let binaries: Vec<(&str, Option<&str>)> = match &before {
        Some(b) => vec![("before", Some(b.as_str())), ("after", None)],
        None => vec![("", None)],
    };
    if args.iter().any(|a| a == "outage") {
        for (label, bin) in &binaries {
            run(label, *bin, 10.0, 600, &commit_interval, true);
        }
        return;
    }
    let mut at10 = Vec::new();
    for (rate, secs) in [(1.0, 120), (10.0, 60), (100.0, 30)] {
        for (label, bin) in &binaries {
            let per = run(label, *bin, rate, secs, &commit_interval, false);
            if rate == 10.0 {
                at10.push((label, per));
            }
        }
    }
    for (label, per) in at10 {
        println!(
            "{label} at 10 frames/s: {:.2} GB written per day",
            per * 10.0 * 86_400.0 / 1e9
        );
    }
}

/// "500ms" / "5s" as a Duration (the two forms the bench is given).
fn humantime_ms(s: &str) -> Duration {
    match s.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().expect("a number of ms")),
        None => Duration::from_secs(
            s.strip_suffix('s')
                .and_then(|v| v.parse().ok())
                .expect("500ms or 5s"),
        ),
    }
}
