//! Flash wear: bytes the agent causes to be written to storage per frame, at a steady rate with
//! the broker up (the normal state: each frame written, then removed once acknowledged).
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench flash [-- 5s] [floor]`
//! (an argument sets `store.commit_interval`, the fsync period; default 500ms)
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
    let commit_interval = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--") && a != "floor")
        .unwrap_or_else(|| "500ms".into());
    println!(
        "lora-edge flash-wear benchmark (release binary, Mosquitto on loopback, broker up, store.commit_interval = {commit_interval})"
    );
    if std::env::args().any(|a| a == "floor") {
        let interval = humantime_ms(&commit_interval);
        floor(1.0, 120, interval);
        floor(10.0, 60, interval);
        floor(100.0, 30, interval);
        return;
    }
    run(1.0, 120, &commit_interval);
    let at10 = run(10.0, 60, &commit_interval);
    run(100.0, 30, &commit_interval);
    println!(
        "at 10 frames/s: {:.2} GB written per day",
        at10 * 10.0 * 86_400.0 / 1e9
    );
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
