//! Which stored record each PUBACK acknowledges.
//!
//! rumqttc has no per-publish completion: it reports `Outgoing::Publish(pkid)` when a publish is
//! written and `Incoming::PubAck(pkid)` when the broker has it, and it handles requests in FIFO
//! order. So the n-th `Outgoing::Publish` belongs to the n-th publish submitted, and its packet
//! id then leads to the record. Everything is forgotten at reconnect (a new session), and the
//! queue resends from its watermark.
//!
//! It also tells whether the link still makes progress (`stalled_for`): the time since the later
//! of the last PUBACK and the oldest outstanding write. On a thin link what is queued ahead
//! of a publish delays its PUBACK, but PUBACKs keep coming; on a silent cut none does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Submitted,
    Written(u16),
    Done,
}

#[derive(Debug)]
struct Entry {
    /// None for messages outside the store (the retained ONLINE state).
    seq: Option<u64>,
    uplink: bool,
    state: State,
    /// When it was submitted, then when it was written.
    since: Instant,
}

/// What `settle` released.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    /// The highest store sequence number now fully acknowledged.
    pub top: Option<u64>,
    /// Uplinks among them that the broker acknowledged.
    pub uplinks: u64,
}

#[derive(Debug, Default)]
pub struct Inflight {
    entries: VecDeque<Entry>,
    last_ack: Option<Instant>,
}

impl Inflight {
    /// A publish handed to the client, in submission order.
    pub fn submitted(&mut self, seq: Option<u64>, uplink: bool, now: Instant) {
        self.entries.push_back(Entry {
            seq,
            uplink,
            state: State::Submitted,
            since: now,
        });
    }

    /// A record that needs no publish (an expired join-request): done at once, in order.
    pub fn skipped(&mut self, seq: u64, now: Instant) {
        self.entries.push_back(Entry {
            seq: Some(seq),
            uplink: false,
            state: State::Done,
            since: now,
        });
    }

    /// `Outgoing::Publish(pkid)`: the oldest submitted publish went out with this id.
    pub fn written(&mut self, pkid: u16, now: Instant) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.state == State::Submitted)
        {
            Some(e) => {
                e.state = State::Written(pkid);
                e.since = now;
                true
            }
            None => false,
        }
    }

    /// `Incoming::PubAck(pkid)`.
    pub fn acked(&mut self, pkid: u16, now: Instant) -> bool {
        self.last_ack = Some(now);
        match self
            .entries
            .iter_mut()
            .find(|e| e.state == State::Written(pkid))
        {
            Some(e) => {
                e.state = State::Done;
                true
            }
            None => false,
        }
    }

    /// Drops the finished prefix. Records acknowledged out of order wait until everything
    /// before them is acknowledged too.
    pub fn settle(&mut self) -> Settled {
        let mut s = Settled::default();
        while self.entries.front().is_some_and(|e| e.state == State::Done) {
            let e = self.entries.pop_front().expect("front exists");
            if let Some(seq) = e.seq {
                s.top = Some(seq);
            }
            s.uplinks += e.uplink as u64;
        }
        s
    }

    /// Publishes not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.state != State::Done)
            .count()
    }

    /// How long the link has made no progress while publishes written to it await their PUBACK:
    /// since the later of the last PUBACK and the oldest outstanding write. None when nothing
    /// written is outstanding.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let oldest = self
            .entries
            .iter()
            .find(|e| matches!(e.state, State::Written(_)))?
            .since;
        let from = self.last_ack.map_or(oldest, |a| a.max(oldest));
        Some(now.saturating_duration_since(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_credit_the_record_that_was_written_with_that_packet_id() {
        let now = Instant::now();
        let mut f = Inflight::default();
        f.submitted(None, false, now); // ONLINE
        f.submitted(Some(10), true, now);
        f.submitted(Some(11), true, now);
        f.skipped(12, now);
        f.submitted(Some(13), true, now);
        assert!(f.written(1, now) && f.written(2, now) && f.written(3, now) && f.written(4, now));
        assert_eq!(f.outstanding(), 4);
        // Out of order: 11 acknowledged first waits for 10.
        assert!(f.acked(3, now));
        assert_eq!(f.settle(), Settled::default());
        assert!(f.acked(1, now));
        assert_eq!(
            f.settle(),
            Settled::default(),
            "ONLINE carries no sequence number; 10 is still out"
        );
        assert!(f.acked(2, now));
        assert_eq!(
            f.settle(),
            Settled {
                top: Some(12),
                uplinks: 2
            },
            "10, 11 and the skipped 12"
        );
        assert!(!f.acked(2, now), "an id is credited once");
        assert!(f.acked(4, now));
        assert_eq!(
            f.settle(),
            Settled {
                top: Some(13),
                uplinks: 1
            }
        );
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn a_reused_packet_id_credits_the_newer_write_only_after_the_older_ack() {
        let now = Instant::now();
        let mut f = Inflight::default();
        f.submitted(Some(1), true, now);
        f.written(7, now);
        assert!(f.acked(7, now));
        f.submitted(Some(2), true, now);
        f.written(7, now);
        assert!(f.acked(7, now));
        assert_eq!(f.settle().top, Some(2));
    }

    #[test]
    fn a_link_that_keeps_acknowledging_is_not_stalled_however_long_the_oldest_waits() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut f = Inflight::default();
        assert_eq!(f.stalled_for(s(100)), None, "nothing outstanding");
        for seq in 1..=3 {
            f.submitted(Some(seq), true, t0);
        }
        assert_eq!(
            f.stalled_for(s(50)),
            None,
            "submitted but not written: held by the client, not the link"
        );
        f.written(1, s(1));
        f.written(2, s(1));
        f.written(3, s(1));
        assert_eq!(f.stalled_for(s(11)), Some(Duration::from_secs(10)));
        // A thin link: one PUBACK every 8 s. The last write is 20 s old, yet the link moves.
        f.acked(1, s(9));
        f.settle();
        f.acked(2, s(17));
        f.settle();
        assert_eq!(f.stalled_for(s(21)), Some(Duration::from_secs(4)));
        // Then nothing more comes: a silent cut.
        assert_eq!(f.stalled_for(s(40)), Some(Duration::from_secs(23)));
        f.acked(3, s(41));
        f.settle();
        assert_eq!(f.stalled_for(s(60)), None);
    }
}
