//! Which stored record each PUBACK acknowledges.
//!
//! rumqttc has no per-publish completion: it reports `Outgoing::Publish(pkid)` when a publish is
//! written and `Incoming::PubAck(pkid)` when the broker has it, and it handles requests in FIFO
//! order. So the n-th `Outgoing::Publish` belongs to the n-th publish submitted, and its packet
//! id then leads to the record. Everything is forgotten at reconnect (a new session), and the
//! queue resends from its watermark.

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
    pub fn written(&mut self, pkid: u16) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.state == State::Submitted)
        {
            Some(e) => {
                e.state = State::Written(pkid);
                true
            }
            None => false,
        }
    }

    /// `Incoming::PubAck(pkid)`.
    pub fn acked(&mut self, pkid: u16) -> bool {
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

    /// How long the oldest unacknowledged publish has waited.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.entries
            .iter()
            .find(|e| e.state != State::Done)
            .map(|e| now.duration_since(e.since))
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
        assert!(f.written(1) && f.written(2) && f.written(3) && f.written(4));
        assert_eq!(f.outstanding(), 4);
        // Out of order: 11 acknowledged first waits for 10.
        assert!(f.acked(3));
        assert_eq!(f.settle(), Settled::default());
        assert!(f.acked(1));
        assert_eq!(
            f.settle(),
            Settled::default(),
            "ONLINE carries no sequence number; 10 is still out"
        );
        assert!(f.acked(2));
        assert_eq!(
            f.settle(),
            Settled {
                top: Some(12),
                uplinks: 2
            },
            "10, 11 and the skipped 12"
        );
        assert!(!f.acked(2), "an id is credited once");
        assert!(f.acked(4));
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
        f.written(7);
        assert!(f.acked(7));
        f.submitted(Some(2), true, now);
        f.written(7);
        assert!(f.acked(7));
        assert_eq!(f.settle().top, Some(2));
    }
}
