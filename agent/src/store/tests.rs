//! The queue as a whole: appends, reads, acknowledgements, evictions, damage and restarts.

use std::path::Path;
use std::time::Duration;

use super::log::record_size;
use super::queue::{Loss, NewRecord, Opened, Queue, QueueOptions, JOURNAL_FILES};
use super::unreported::Unreported;

fn opts(dir: &Path) -> QueueOptions {
    QueueOptions {
        path: dir.join("store"),
        max_disk_bytes: 64 << 20,
        max_age: Duration::from_secs(3600),
        commit_interval: Duration::from_millis(100),
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub(super) fn rec(i: u64, size: usize) -> NewRecord {
    NewRecord {
        kind: 1,
        flags: 0,
        at_ms: 1_000 + i,
        payload: vec![i as u8; size],
    }
}

fn append_n(q: &Queue, n: u64) -> std::ops::RangeInclusive<u64> {
    q.append(&(0..n).map(|i| rec(i, 10)).collect::<Vec<_>>())
        .unwrap()
        .0
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if e.file_name() != "lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn segments(store: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(store.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn appended_records_are_read_back_in_order_from_a_cursor() {
    let dir = tmp();
    let (q, opened) = Queue::open(opts(dir.path())).unwrap();
    assert_eq!(opened, Opened::Clean);
    let (range, ev) = q
        .append(&(0..10).map(|i| rec(i, 20)).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(range, 1..=10);
    assert!(ev.is_empty());
    let got = q.read_from(4, 3).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(got[0].payload, vec![3u8; 20]);
    assert_eq!(got[0].at_ms, 1_003);
}

#[test]
fn acknowledged_records_are_gone_and_sequence_numbers_survive_a_reopen() {
    let dir = tmp();
    let d = dir.path();
    {
        let (q, _) = Queue::open(opts(d)).unwrap();
        append_n(&q, 10);
        q.ack_upto(10).unwrap();
        assert_eq!(q.backlog().records, 0);
        assert_eq!(q.backlog().oldest_at_ms, None);
    }
    let (q, _) = Queue::open(opts(d)).unwrap();
    assert_eq!(q.acked(), 10);
    assert_eq!(q.backlog().records, 0);
    assert_eq!(append_n(&q, 1), 11..=11, "sequence numbers never restart");
}

#[test]
fn the_backlog_counts_survive_a_reopen() {
    let dir = tmp();
    let d = dir.path();
    {
        let (q, _) = Queue::open(opts(d)).unwrap();
        q.append(&(0..100).map(|i| rec(i, 50)).collect::<Vec<_>>())
            .unwrap();
        q.ack_upto(40).unwrap();
    }
    let (q, _) = Queue::open(opts(d)).unwrap();
    let b = q.backlog();
    assert_eq!(b.records, 60);
    assert_eq!(b.bytes, 60 * record_size(50));
    assert_eq!(b.oldest_at_ms, Some(1_040));
}

/// The wear property: with the broker acknowledging within a commit interval, the log is a
/// ring of its journal's files, nothing is allocated, and a commit syncs nothing.
#[test]
fn acknowledged_in_time_the_log_stays_in_its_journal_and_commits_sync_nothing() {
    let dir = tmp();
    let o = opts(dir.path());
    let (q, _) = Queue::open(o.clone()).unwrap();
    let per = 64;
    let mut synced = 0;
    // 40 MiB through a 1 MiB-segment journal of 3 files.
    for _ in 0..(40 << 20) / (per * record_size(200)) {
        let (range, ev) = q
            .append(&(0..per).map(|i| rec(i, 200)).collect::<Vec<_>>())
            .unwrap();
        assert!(ev.is_empty());
        q.ack_upto(*range.end()).unwrap();
        synced += q.commit().unwrap();
    }
    assert_eq!(synced, 0, "acknowledged records are never synced");
    assert!(segments(&o.path).len() <= JOURNAL_FILES);
    // Unacknowledged ones are, at the next commit.
    append_n(&q, 3);
    assert_eq!(q.commit().unwrap(), 1);
    assert_eq!(q.commit().unwrap(), 0, "once");
}

/// A power cut keeps what the last commit synced. The image after the cut is made of each
/// segment file as the commit left it (a copy taken right after its fdatasync; a file never
/// synced comes back as zeros): every record not acknowledged before the commit is in it, what
/// came after is reported lost, and no number is reused. Fails if a commit skips a file
/// holding unacknowledged records.
#[test]
fn after_a_commit_a_power_cut_keeps_every_unacknowledged_record() {
    let dir = tmp();
    let o = opts(dir.path());
    let witness = dir.path().join("synced");
    let image = dir.path().join("image");
    let n;
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        *q.witness.lock().unwrap() = Some(witness.clone());
        // Acknowledged before the commit: never synced, never needed.
        let r = append_n(&q, 200);
        q.ack_upto(*r.end()).unwrap();
        // 5 MiB unacknowledged: the journal and more files.
        let m = (5 << 20) / record_size(300);
        let recs: Vec<NewRecord> = (0..m).map(|i| rec(i, 300)).collect();
        for c in recs.chunks(500) {
            q.append(c).unwrap();
        }
        n = 200 + m;
        assert!(q.commit().unwrap() >= 5);
        // After the commit: lost in the cut.
        append_n(&q, 50);
        copy_dir(&o.path, &image);
    }
    for f in segments(&image) {
        match std::fs::read(witness.join(f.file_name().unwrap())) {
            Ok(synced) => std::fs::write(&f, synced).unwrap(),
            Err(_) => {
                let len = std::fs::metadata(&f).unwrap().len() as usize;
                std::fs::write(&f, vec![0u8; len]).unwrap();
            }
        }
    }
    std::fs::remove_dir_all(&o.path).unwrap();
    copy_dir(&image, &o.path);
    let (q, _) = Queue::open(o.clone()).unwrap();
    let got = q.read_from(201, usize::MAX).unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (201..=n).collect::<Vec<_>>()
    );
    assert_eq!(
        q.lost_at_open(),
        &[Loss {
            first_seq: n + 1,
            last_seq: n + 50,
            reason: "store_rollback"
        }],
        "what the cut took is reported"
    );
    assert_eq!(append_n(&q, 1), n + 51..=n + 51, "never reused");
}

/// Across the journal and the outage backlog: records come back in strict order, with
/// acknowledgements and reads interleaved, and the disk an outage took is given back.
#[test]
fn an_outage_backlog_reads_back_in_strict_order_and_its_files_go_once_delivered() {
    let dir = tmp();
    let o = opts(dir.path());
    let (q, _) = Queue::open(o.clone()).unwrap();
    let mut next = 1;
    let mut cursor = 1;
    let mut rng = fastrand::Rng::with_seed(9);
    for round in 0..400 {
        let n = rng.u64(1..300);
        let (range, _) = q
            .append(
                &(0..n)
                    .map(|i| rec(i, rng.usize(0..600)))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert_eq!(*range.start(), next);
        next += n;
        // The backhaul is down for the first 300 rounds, then drains.
        if round >= 300 {
            let got = q.read_from(cursor, 2_000).unwrap();
            for r in &got {
                assert_eq!(r.seq, cursor, "strict order");
                cursor += 1;
            }
            if let Some(l) = got.last() {
                q.ack_upto(l.seq).unwrap();
            }
        }
    }
    assert!(q.backlog().records > 0 || cursor == next);
    let got = q.read_from(cursor, usize::MAX).unwrap();
    for r in &got {
        assert_eq!(r.seq, cursor);
        cursor += 1;
    }
    assert_eq!(cursor, next);
    q.ack_upto(next - 1).unwrap();
    assert!(
        segments(&o.path).len() <= JOURNAL_FILES,
        "the outage's files are gone"
    );
}

#[test]
fn over_budget_the_oldest_are_evicted_reported_exactly_and_the_size_stays_within_it() {
    let dir = tmp();
    let mut o = opts(dir.path());
    o.max_disk_bytes = 16 << 20;
    let (q, _) = Queue::open(o.clone()).unwrap();
    let mut evicted = Vec::new();
    let mut appended = 0;
    let mut max_real = 0;
    for _ in 0..60 {
        let (_, ev) = q
            .append(&(0..1000).map(|i| rec(i, 1000)).collect::<Vec<_>>())
            .unwrap();
        appended += 1000;
        evicted.extend(ev);
        max_real = max_real.max(q.disk_bytes());
    }
    assert!(!evicted.is_empty());
    let mut next = 1;
    for e in &evicted {
        assert_eq!(e.reason, "size_budget");
        assert_eq!(e.first_seq, next, "{evicted:?}");
        assert_eq!(e.records, e.last_seq - e.first_seq + 1);
        assert_eq!(e.bytes, e.records * record_size(1000));
        next = e.last_seq + 1;
    }
    let gone: u64 = evicted.iter().map(|e| e.records).sum();
    assert_eq!(q.evicted_total(), gone);
    assert_eq!(q.backlog().records + gone, appended);
    assert_eq!(q.read_from(0, 1).unwrap()[0].seq, next);
    assert!(max_real <= 16 << 20, "{max_real} B for a budget of 16 MiB");
    let on_disk: u64 = segments(&o.path)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 16 << 20, "{on_disk}");
    // Delivered: the size guard comes back down.
    q.ack_upto(q.next_seq() - 1).unwrap();
    // The journal, and the small files (state, unreported numbers).
    assert!(q.disk_bytes() <= ((JOURNAL_FILES as u64) << 20) + (256 << 10));
}

fn notice(at_ms: u64) -> impl Fn(&Unreported) -> NewRecord {
    move |u| NewRecord {
        kind: 5,
        flags: 0,
        at_ms,
        payload: format!("{:?}", u.ranges).into_bytes(),
    }
}

#[test]
fn unreported_evictions_survive_a_reopen_and_are_reported_exactly_once() {
    let dir = tmp();
    let d = dir.path();
    {
        let (q, _) = Queue::open(opts(d)).unwrap();
        q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
            .unwrap();
        q.evict_expired(1_003 + 3_600_000).unwrap();
    }
    let (q, _) = Queue::open(opts(d)).unwrap();
    assert_eq!(
        q.evicted_total(),
        3,
        "store_evicted_total is kept across restarts"
    );
    let u = q.unreported_evictions();
    assert_eq!((u.ranges, u.records), (vec![(1, 3)], 3));
    assert_eq!(u.reasons, vec!["max_age".to_string()]);
    assert_eq!(q.report_evictions(notice(5_000)).unwrap(), Some(6));
    assert_eq!(q.report_evictions(notice(5_000)).unwrap(), None);
    drop(q);
    let (q, _) = Queue::open(opts(d)).unwrap();
    assert!(q.unreported_evictions().ranges.is_empty());
    let read = q.read_from(6, 1).unwrap();
    assert_eq!(
        (read[0].kind, read[0].payload.as_slice()),
        (5, &b"[(1, 3)]"[..])
    );
    assert_eq!(
        q.read_from(1, 10).unwrap()[0].seq,
        4,
        "evicted are not sent"
    );
}

#[test]
fn a_notice_evicted_before_the_broker_has_it_gives_its_ranges_back() {
    let dir = tmp();
    let d = dir.path();
    let (q, _) = Queue::open(opts(d)).unwrap();
    q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
        .unwrap();
    q.evict_expired(1_002 + 3_600_000).unwrap(); // seqs 1, 2
    assert_eq!(q.report_evictions(notice(1_002)).unwrap(), Some(6));
    // Everything up to the notice is now too old, the notice too.
    q.evict_expired(1_005 + 3_600_000).unwrap(); // 3, 4, 5 and the notice, 6
    drop(q);
    let (q, _) = Queue::open(opts(d)).unwrap();
    let u = q.unreported_evictions();
    assert_eq!(u.ranges, vec![(1, 6)], "{u:?}");
    assert_eq!(
        u.records, 4,
        "the second eviction's records; the first were reported"
    );
    assert_eq!(q.report_evictions(notice(9_999)).unwrap(), Some(7));
    q.ack_upto(7).unwrap();
    q.append(&[rec(1, 10)]).unwrap();
    q.evict_expired(1_002 + 3_600_000).unwrap();
    let u = q.unreported_evictions();
    assert_eq!(u.ranges, vec![(8, 8)], "{u:?}");
    assert!(u.in_flight.is_empty(), "{u:?}");
}

#[test]
fn records_older_than_max_age_are_evicted() {
    let dir = tmp();
    let (q, _) = Queue::open(opts(dir.path())).unwrap();
    q.append(&(0..5).map(|i| rec(i, 10)).collect::<Vec<_>>())
        .unwrap();
    // max_age is 1 h: at 1_003 + 1 h, the records from 1_000..1_002 are too old.
    let ev = q.evict_expired(1_003 + 3_600_000).unwrap().unwrap();
    assert_eq!((ev.first_seq, ev.last_seq, ev.reason), (1, 3, "max_age"));
}

/// Flipped bytes anywhere in the log's files (fixed seeds): every sound record is kept and read
/// in order, exactly the damaged ones are reported lost, and copies of damaged files are kept,
/// bounded and counted.
#[test]
fn flipped_bytes_lose_only_the_records_they_touch() {
    for seed in 0..12u64 {
        let dir = tmp();
        let o = opts(dir.path());
        let n = 20_000;
        {
            let (q, _) = Queue::open(o.clone()).unwrap();
            let recs: Vec<NewRecord> = (0..n).map(|i| rec(i, 100)).collect();
            for c in recs.chunks(1000) {
                q.append(c).unwrap();
            }
            q.ack_upto(1_000).unwrap();
            q.sync().unwrap();
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        let files = segments(&o.path);
        let flips = rng.usize(1..20);
        for _ in 0..flips {
            let f = &files[rng.usize(0..files.len())];
            let mut b = std::fs::read(f).unwrap();
            let at = rng.usize(0..b.len());
            b[at] ^= rng.u8(1..=255);
            std::fs::write(f, b).unwrap();
        }
        let (q, opened) = Queue::open(o.clone()).unwrap();
        let got = q.read_from(1_001, usize::MAX).unwrap();
        let held: std::collections::BTreeSet<u64> = got.iter().map(|r| r.seq).collect();
        assert!(
            got.windows(2).all(|w| w[0].seq < w[1].seq),
            "seed {seed}: in order"
        );
        for r in &got {
            assert_eq!(r.payload, vec![(r.seq - 1) as u8; 100], "seed {seed}");
        }
        let lost: u64 = q
            .lost_at_open()
            .iter()
            .map(|l| l.last_seq - l.first_seq + 1)
            .sum();
        assert!(
            lost <= flips as u64,
            "seed {seed}: {flips} flips cost {lost} records: {:?}",
            q.lost_at_open()
        );
        for s in 1_001..=n {
            let reported = q
                .lost_at_open()
                .iter()
                .any(|l| l.first_seq <= s && s <= l.last_seq);
            assert!(
                held.contains(&s) ^ reported,
                "seed {seed}: seq {s} held {} reported {reported}",
                held.contains(&s)
            );
        }
        if lost > 0 {
            assert!(q.lost_at_open().iter().all(|l| l.reason == "store_corrupt"));
            match &opened {
                Opened::Damaged { copies, .. } => {
                    assert!(!copies.is_empty() && copies.len() <= 2);
                    assert!(copies.iter().all(|c| c.exists()));
                }
                other => panic!("seed {seed}: {other:?}"),
            }
            let u = q.unreported_evictions();
            assert_eq!(u.records, lost);
        }
        drop(q);
        // Opened again and again: the copies stay bounded.
        for _ in 0..3 {
            let f = &files[0];
            let mut b = std::fs::read(f).unwrap();
            b[100] ^= 1;
            std::fs::write(f, b).unwrap();
            drop(Queue::open(o.clone()).unwrap());
        }
        assert!(std::fs::read_dir(o.path.join("damaged")).unwrap().count() <= 2);
    }
}

/// Flips a bit in the payload of the `index`-th record (0-based) of the first segment, records
/// of `append_n` (10-byte payloads).
fn flip_in_payload(store: &Path, index: u64) {
    let f = &segments(store)[0];
    let mut b = std::fs::read(f).unwrap();
    b[(index * record_size(10)) as usize + 35] ^= 0x10;
    std::fs::write(f, b).unwrap();
}

#[test]
fn a_record_damaged_after_opening_is_skipped_and_reported_once() {
    let dir = tmp();
    let o = opts(dir.path());
    let (q, _) = Queue::open(o.clone()).unwrap();
    append_n(&q, 10);
    q.commit().unwrap();
    flip_in_payload(&o.path, 3);
    let got: Vec<u64> = q.read_from(1, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(got, vec![1, 2, 3, 5, 6, 7, 8, 9, 10]);
    q.read_from(1, 100).unwrap();
    let u = q.unreported_evictions();
    assert_eq!((u.ranges, u.records), (vec![(4, 4)], 1));
    assert_eq!(u.reasons, vec!["store_corrupt".to_string()]);
}

#[test]
fn a_store_that_comes_back_holding_less_never_reuses_a_number_and_reports_the_loss() {
    let dir = tmp();
    let o = opts(dir.path());
    let old = dir.path().join("old");
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert_eq!(append_n(&q, 5), 1..=5);
        q.ack_upto(2).unwrap();
        q.sync().unwrap();
    }
    copy_dir(&o.path, &old);
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        assert_eq!(append_n(&q, 5), 6..=10);
    }
    std::fs::remove_dir_all(&o.path).unwrap();
    copy_dir(&old, &o.path);
    let (q, opened) = Queue::open(o.clone()).unwrap();
    assert_eq!(opened, Opened::Clean);
    assert_eq!(
        q.lost_at_open(),
        &[Loss {
            first_seq: 6,
            last_seq: 10,
            reason: "store_rollback"
        }]
    );
    assert_eq!(append_n(&q, 1), 11..=11, "never 6 again");
    let u = q.unreported_evictions();
    assert_eq!(
        (u.ranges.clone(), u.reasons.clone()),
        (vec![(6, 10)], vec!["store_rollback".to_string()])
    );
}

#[test]
fn a_deleted_store_continues_the_numbering_and_reports_what_was_not_delivered() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 8);
        q.ack_upto(5).unwrap();
    }
    std::fs::remove_dir_all(&o.path).unwrap();
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert_eq!(
        q.lost_at_open(),
        &[Loss {
            first_seq: 6,
            last_seq: 8,
            reason: "store_missing"
        }]
    );
    assert_eq!(append_n(&q, 1), 9..=9);
}

#[test]
fn a_kill_or_a_clean_stop_leaves_no_gap_and_reports_no_loss() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 3);
    }
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert!(q.lost_at_open().is_empty());
    assert_eq!(append_n(&q, 1), 4..=4, "killed (same boot): right after");
    q.sync().unwrap();
    drop(q);
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert_eq!(append_n(&q, 1), 5..=5, "clean stop: right after");
    assert_eq!(q.read_from(1, 10).unwrap().len(), 5);
}

#[test]
fn refused_numbers_are_reported_once_and_are_not_a_loss_at_the_next_start() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 3);
        let e = q.reject(4).unwrap();
        assert_eq!((e.first_seq, e.last_seq, e.reason), (4, 7, "rejected"));
        append_n(&q, 2);
    }
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert!(q.lost_at_open().is_empty(), "{:?}", q.lost_at_open());
    let u = q.unreported_evictions();
    assert_eq!((u.ranges, u.records), (vec![(4, 7)], 4));
    let got: Vec<u64> = q.read_from(1, 10).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(got, vec![1, 2, 3, 8, 9]);
}

#[test]
fn acknowledgements_the_store_lost_are_not_sent_again() {
    let dir = tmp();
    let o = opts(dir.path());
    let old = dir.path().join("old");
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 10);
        q.ack_upto(2).unwrap();
        q.sync().unwrap();
    }
    copy_dir(&o.path, &old);
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        q.ack_upto(8).unwrap();
    }
    std::fs::remove_dir_all(&o.path).unwrap();
    copy_dir(&old, &o.path);
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert_eq!(q.acked(), 8);
    assert_eq!(q.read_from(q.acked() + 1, 100).unwrap().len(), 2);
    assert_eq!(q.backlog().records, 2);
    assert!(q.lost_at_open().is_empty());
}

#[test]
fn only_a_lora_edge_store_or_an_empty_place_is_opened_and_nothing_else_is_moved() {
    let dir = tmp();
    let o = opts(dir.path());
    std::fs::write(&o.path, b"precious").unwrap();
    let e = Queue::open(o.clone()).err().expect("refused");
    assert!(e.is_setup() && e.to_string().contains("is a file"), "{e}");
    assert_eq!(std::fs::read(&o.path).unwrap(), b"precious");
    assert!(super::check_path(&o.path)
        .unwrap_err()
        .contains("is a file"));
    std::fs::remove_file(&o.path).unwrap();
    std::fs::create_dir(&o.path).unwrap();
    std::fs::write(o.path.join("thesis.odt"), b"x").unwrap();
    let e = Queue::open(o.clone()).err().expect("refused");
    assert!(e.is_setup() && e.to_string().contains("thesis.odt"), "{e}");
    assert!(super::check_path(&o.path)
        .unwrap_err()
        .contains("thesis.odt"));
    assert_eq!(std::fs::read_dir(&o.path).unwrap().count(), 1);
    std::fs::remove_file(o.path.join("thesis.odt")).unwrap();
    drop(Queue::open(o.clone()).unwrap());
    assert!(o.path.join("lora-edge-queue").exists());
    assert_eq!(Queue::open(o.clone()).unwrap().1, Opened::Clean);
    assert_eq!(super::check_path(&o.path), Ok(()));
}

#[test]
fn a_second_agent_on_the_same_store_is_refused() {
    let dir = tmp();
    let o = opts(dir.path());
    let (_q, _) = Queue::open(o.clone()).unwrap();
    let e = Queue::open(o.clone()).err().expect("refused");
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

#[test]
fn a_store_directory_that_cannot_be_created_is_a_setup_error_naming_it() {
    let dir = tmp();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let mut o = opts(dir.path());
    o.path = dir.path().join("file/store");
    let e = Queue::open(o).err().expect("refused");
    assert!(
        e.is_setup()
            && e.to_string()
                .starts_with("cannot create the store directory"),
        "{e}"
    );
}

/// A store of the earlier format (one sled database, format-2 values) is carried over with
/// its numbers, watermark, unreported ranges and state.
#[test]
fn a_store_of_the_earlier_sled_format_is_carried_over() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let db = sled::Config::new().path(&o.path).open().unwrap();
        let t = db.open_tree("queue").unwrap();
        for seq in [5u64, 6, 7, 9] {
            let mut v = vec![2u8, 1, 0];
            v.extend_from_slice(&(1_000 + seq).to_be_bytes());
            v.extend_from_slice(format!("frame {seq}").as_bytes());
            t.insert(seq.to_be_bytes(), v).unwrap();
        }
        let mut meta = Vec::new();
        for v in [10u64, 4, 4, 0, 7] {
            meta.extend_from_slice(&v.to_be_bytes());
        }
        t.insert(b"\xffmeta", meta).unwrap();
        t.insert(
            b"\xffunreported",
            br#"{"ranges":[[8,8]],"records":1,"bytes":0,"reasons":["rejected"],"in_flight":{}}"#
                .to_vec(),
        )
        .unwrap();
        db.open_tree("state")
            .unwrap()
            .insert("pump/p1", b"latched".to_vec())
            .unwrap();
        db.flush().unwrap();
        std::fs::write(
            o.path.join("lora-edge-queue"),
            b"lora-edge durable queue, format 2\n",
        )
        .unwrap();
    }
    let (q, opened) = Queue::open(o.clone()).unwrap();
    assert_eq!(opened, Opened::Clean);
    let got = q.read_from(1, 10).unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![5, 6, 7, 9]
    );
    assert_eq!(got[0].payload, b"frame 5");
    assert_eq!(got[0].at_ms, 1_005);
    assert_eq!(q.state_get("pump/p1").unwrap().unwrap(), b"latched");
    assert_eq!(q.unreported_evictions().ranges, vec![(8, 8)]);
    assert_eq!(q.evicted_total(), 7);
    assert_eq!(append_n(&q, 1), 10..=10);
    assert!(!o.path.join("db").exists(), "sled's files are gone");
    drop(q);
    let (q, opened) = Queue::open(o).unwrap();
    assert_eq!(opened, Opened::Clean);
    assert_eq!(q.read_from(1, 10).unwrap().len(), 5);
}

/// Random appends, deliveries, kills, rollbacks, deletions, flipped bytes and restarts, with
/// fixed seeds. Invariants: a sequence number is never given to two different events, and
/// every number ever accepted is either delivered or reported lost (at open, or evicted).
#[test]
fn random_damage_never_reuses_a_number_and_never_loses_one_silently() {
    use std::collections::{BTreeSet, HashMap};
    for seed in [1u64, 2, 3, 4, 5, 6] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tmp();
        let o = opts(dir.path());
        let snapshot = dir.path().join("snapshot");
        let mut accepted: HashMap<u64, u64> = HashMap::new();
        let mut delivered: HashMap<u64, u64> = HashMap::new();
        let reported = std::cell::RefCell::new(BTreeSet::new());
        let mut next_id = 0u64;
        let note = |q: &Queue, accepted: &mut HashMap<u64, u64>| {
            let notice = q
                .report_evictions(|u| {
                    for (a, b) in &u.ranges {
                        reported.borrow_mut().extend(*a..=*b);
                    }
                    NewRecord {
                        kind: 2,
                        flags: 0,
                        at_ms: 1_000,
                        payload: u64::MAX.to_be_bytes().to_vec(),
                    }
                })
                .unwrap();
            if let Some(seq) = notice {
                assert!(accepted.insert(seq, u64::MAX).is_none());
            }
        };
        let (mut q, _) = Queue::open(o.clone()).unwrap();
        note(&q, &mut accepted);
        for _ in 0..150 {
            match rng.u32(0..100) {
                0..=44 => {
                    let n = rng.u64(1..400);
                    let recs: Vec<NewRecord> = (0..n)
                        .map(|i| NewRecord {
                            kind: 1,
                            flags: 0,
                            at_ms: 1_000,
                            payload: (next_id + i).to_be_bytes().repeat(rng.usize(1..40)),
                        })
                        .collect();
                    let (range, ev) = q.append(&recs).unwrap();
                    assert!(ev.is_empty());
                    for (seq, i) in range.zip(0..) {
                        assert!(
                            accepted.insert(seq, next_id + i).is_none(),
                            "seed {seed}: seq {seq} given to a second event"
                        );
                    }
                    next_id += n;
                }
                45..=74 => {
                    let got = q.read_from(q.acked() + 1, rng.usize(1..300)).unwrap();
                    for r in &got {
                        let id = u64::from_be_bytes(r.payload[..8].try_into().unwrap());
                        assert_eq!(
                            accepted.get(&r.seq),
                            Some(&id),
                            "seed {seed}: seq {} published with other content",
                            r.seq
                        );
                        delivered.insert(r.seq, id);
                    }
                    if let Some(last) = got.last() {
                        q.ack_upto(last.seq).unwrap();
                    }
                    note(&q, &mut accepted);
                }
                damage => {
                    if rng.bool() {
                        q.sync().unwrap();
                    }
                    drop(q);
                    match damage {
                        75..=82 => {}
                        83..=88 => {
                            let _ = std::fs::remove_dir_all(&snapshot);
                            copy_dir(&o.path, &snapshot);
                        }
                        89..=93 if snapshot.exists() => {
                            std::fs::remove_dir_all(&o.path).unwrap();
                            copy_dir(&snapshot, &o.path);
                        }
                        94..=96 => std::fs::remove_dir_all(&o.path).unwrap(),
                        _ => {
                            for f in segments(&o.path) {
                                let mut b = std::fs::read(&f).unwrap();
                                for _ in 0..rng.usize(0..30) {
                                    let at = rng.usize(0..b.len());
                                    b[at] ^= rng.u8(1..=255);
                                }
                                std::fs::write(&f, b).unwrap();
                            }
                        }
                    }
                    q = Queue::open(o.clone()).unwrap().0;
                    note(&q, &mut accepted);
                }
            }
        }
        for r in q.read_from(q.acked() + 1, usize::MAX).unwrap() {
            delivered.insert(r.seq, 0);
        }
        note(&q, &mut accepted);
        let reported = reported.borrow();
        for seq in accepted.keys() {
            assert!(
                delivered.contains_key(seq) || reported.contains(seq),
                "seed {seed}: seq {seq} accepted, never delivered, never reported lost"
            );
        }
    }
}

/// `store.path = ".../store/"` names the same directory as without the slash: the numbering
/// file is beside it, not inside (inside, deleting the store reused numbers).
#[test]
fn a_store_path_written_with_a_trailing_slash_keeps_the_numbering_beside_it() {
    let dir = tmp();
    let mut o = opts(dir.path());
    o.path = dir.path().join("store/");
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 8);
        q.ack_upto(5).unwrap();
    }
    assert!(dir.path().join("store.seq").exists());
    std::fs::remove_dir_all(&o.path).unwrap();
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert_eq!(
        q.lost_at_open(),
        &[Loss {
            first_seq: 6,
            last_seq: 8,
            reason: "store_missing"
        }]
    );
    assert_eq!(append_n(&q, 1), 9..=9, "never reused");
}

/// A segment file cut short (a kill between its creation and its allocation, an operator's
/// truncation) is not taken for a whole spare: appends go on, nothing panics.
#[test]
fn a_segment_file_cut_short_is_not_reused_as_a_whole_one() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        let r = append_n(&q, 100);
        q.ack_upto(*r.end()).unwrap();
    }
    for f in segments(&o.path) {
        std::fs::write(&f, b"").unwrap();
    }
    std::fs::write(o.path.join("log/seg-00000099.log"), b"").unwrap();
    let (q, _) = Queue::open(o.clone()).unwrap();
    for _ in 0..20 {
        let recs: Vec<NewRecord> = (0..500).map(|i| rec(i, 200)).collect();
        q.append(&recs).unwrap();
    }
    assert_eq!(q.backlog().records, 10_000);
    assert_eq!(q.read_from(101, 1).unwrap()[0].seq, 101);
}

/// Damage among records already delivered is not news: reported once, not at every start.
#[test]
fn damage_reported_once_is_not_reported_again_once_delivered() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 50);
        q.sync().unwrap();
    }
    flip_in_payload(&o.path, 10);
    {
        let (q, opened) = Queue::open(o.clone()).unwrap();
        assert!(matches!(opened, Opened::Damaged { .. }));
        let last = q.read_from(1, 100).unwrap().last().unwrap().seq;
        q.ack_upto(last).unwrap();
    }
    let (_, opened) = Queue::open(o.clone()).unwrap();
    assert_eq!(opened, Opened::Clean);
}

/// On a full disk (a 16 MiB tmpfs filled by another file) the store opens with its backlog:
/// nothing it must write at open needs a new block.
#[test]
fn a_store_opens_with_its_backlog_on_a_full_disk() {
    let dir = tmp();
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&disk)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(disk.clone());
    let mut o = opts(&disk);
    o.max_disk_bytes = 16 << 20;
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 300);
        q.reject(5).unwrap();
        append_n(&q, 10);
    }
    // Fill it to the last byte.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(disk.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let mut small = vec![0u8; 4096];
        while f.write_all(&small).is_ok() {}
        small.truncate(1);
        while f.write_all(&small).is_ok() {}
    }
    let (q, _) = Queue::open(o.clone()).unwrap();
    assert!(q.lost_at_open().is_empty(), "{:?}", q.lost_at_open());
    assert_eq!(q.backlog().records, 310);
    assert_eq!(q.unreported_evictions().ranges, vec![(301, 305)]);
}

/// A budget lowered between two runs: the segments made for the larger one go once they hold
/// nothing, and the store comes back within the new budget.
#[test]
fn segments_of_a_larger_earlier_budget_go_once_delivered() {
    let dir = tmp();
    let mut o = opts(dir.path());
    o.max_disk_bytes = 4096 << 20;
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        let r = append_n(&q, 1000);
        q.ack_upto(*r.end()).unwrap();
    }
    o.max_disk_bytes = 16 << 20;
    let (q, _) = Queue::open(o.clone()).unwrap();
    let r = append_n(&q, 1000);
    q.ack_upto(*r.end()).unwrap();
    assert!(q.disk_bytes() <= 16 << 20, "{}", q.disk_bytes());
    assert!(segments(&o.path)
        .iter()
        .all(|p| std::fs::metadata(p).unwrap().len() == 1 << 20));
}

/// The unreported-numbers file deleted while stopped: what it said is unknown, so the gaps are
/// reported as damage, not as a power cut.
#[test]
fn a_deleted_unreported_file_is_damage() {
    let dir = tmp();
    let o = opts(dir.path());
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        append_n(&q, 10);
        q.reject(5).unwrap();
        append_n(&q, 10);
    }
    std::fs::remove_file(o.path.join("unreported")).unwrap();
    let (q, opened) = Queue::open(o.clone()).unwrap();
    assert!(matches!(opened, Opened::Damaged { .. }), "{opened:?}");
    assert_eq!(
        q.lost_at_open(),
        &[Loss {
            first_seq: 11,
            last_seq: 15,
            reason: "store_corrupt"
        }]
    );
}

/// A receipt (the `semtech_udp` backend's PUSH_ACK) is told only once the events sent before
/// it are in the store, and in their order.
#[test]
fn a_receipt_is_told_after_the_events_before_it_are_appended() {
    use crate::events::{Body, Event, Receipt};
    use std::sync::{mpsc, Arc};
    let dir = tmp();
    let (q, _) = Queue::open(opts(dir.path())).unwrap();
    let q = Arc::new(q);
    let (tx, rx) = mpsc::sync_channel(1024);
    let (appended, _) = tokio::sync::watch::channel(0);
    let writer = super::Writer {
        queue: q.clone(),
        input: rx,
        appended,
        counters: Arc::new(crate::ops::counters::Counters::new()),
        commit_interval: Duration::from_millis(100),
    }
    .spawn()
    .unwrap();
    let (told_tx, told) = mpsc::channel();
    for batch in 0..50u64 {
        for _ in 0..(batch % 7 + 1) {
            tx.send(Event {
                at: std::time::SystemTime::now(),
                body: Body::Notice(serde_json::json!({ "batch": batch })),
            })
            .unwrap();
        }
        let (q, told_tx) = (q.clone(), told_tx.clone());
        let before: u64 = (0..=batch).map(|b| b % 7 + 1).sum();
        tx.send(Event {
            at: std::time::SystemTime::now(),
            body: Body::Receipt(Receipt::new(move |ok| {
                // Everything sent before it is already in the store.
                let stored = q.read_from(1, 10_000).unwrap().len() as u64;
                told_tx.send((batch, ok, stored >= before)).unwrap();
            })),
        })
        .unwrap();
    }
    drop(tx);
    writer.join().unwrap();
    let got: Vec<(u64, bool, bool)> = told.try_iter().collect();
    assert_eq!(got.len(), 50, "each receipt told once");
    for (i, (batch, ok, stored)) in got.into_iter().enumerate() {
        assert_eq!(batch, i as u64, "in order");
        assert!(
            ok && stored,
            "receipt {batch}: appended {ok}, events before it stored {stored}"
        );
    }
    // Receipts are not records.
    assert!(q
        .read_from(1, 10_000)
        .unwrap()
        .iter()
        .all(|r| r.kind == crate::events::Kind::Buffer as u8));
    assert_eq!(
        q.read_from(1, 10_000).unwrap().len() as u64,
        (0..50u64).map(|b| b % 7 + 1).sum::<u64>()
    );
}
