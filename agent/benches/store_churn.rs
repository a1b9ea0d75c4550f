//! The store at its budget under steady churn: records appended in batches as the writer does,
//! the oldest evicted by the store's own budget, nothing drained: the store's size on disk must
//! stay within the budget however much goes through.
//!
//! `cargo bench -p lora-edge --bench store_churn [-- BUDGET_MIB ...]`; `CHURN_PASSES` (default 4)
//! sets how many budgets' worth of records go through.
//!
//! Prints, per budget: record bytes held, the store's real size (final and peak), and the ratio.

use std::time::{Duration, Instant};

use lora_edge::store::{NewRecord, Queue, QueueOptions};

/// The stored form of an uplink with a 200-byte PHYPayload is ~237 bytes (+ a 30-byte header).
const RECORD: usize = 237;
const BATCH: u64 = 40;

fn run(budget_mib: u64, passes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(QueueOptions {
        path: dir.path().join("store"),
        max_disk_bytes: budget_mib << 20,
        max_age: Duration::from_secs(86_400),
        commit_interval: Duration::from_millis(500),
    })
    .unwrap();
    let budget = budget_mib << 20;
    let through_target = passes * budget;
    let mut through = 0u64;
    let mut peak = 0u64;
    let mut evicted = 0u64;
    let mut n = 0u64;
    let started = Instant::now();
    while through < through_target {
        let records: Vec<NewRecord> = (0..BATCH)
            .map(|i| NewRecord {
                kind: 1,
                flags: 0,
                at_ms: n + i,
                payload: vec![(n + i) as u8; RECORD],
            })
            .collect();
        let (_, ev) = q.append(&records).unwrap();
        evicted += ev.iter().map(|e| e.records).sum::<u64>();
        n += BATCH;
        through += BATCH * RECORD as u64;
        peak = peak.max(q.disk_bytes());
    }
    let held = q.backlog().bytes;
    let real = q.disk_bytes();
    println!(
        "budget {budget_mib:>4} MiB: {n} records through ({} MiB, {:.0} s), {evicted} evicted; \
         held {:.1} MiB of records; real {:.1} MiB (peak {:.1} MiB = {:.0} % of budget); \
         real/held {:.2}",
        through >> 20,
        started.elapsed().as_secs_f64(),
        held as f64 / 1048576.0,
        real as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        peak as f64 * 100.0 / budget as f64,
        real as f64 / held.max(1) as f64,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; the budgets may be given after `--`.
    let budgets: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let budgets = if budgets.is_empty() {
        vec![16, 64, 256]
    } else {
        budgets
    };
    let passes: u64 = std::env::var("CHURN_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    println!("lora-edge store at its budget under churn: {RECORD}-byte records, {BATCH} per append, {passes} budgets through");
    for b in budgets {
        run(b, passes);
    }
}
