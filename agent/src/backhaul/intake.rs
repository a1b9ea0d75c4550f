//! Admission of incoming commands: a token bucket per command topic, so that a flood on one
//! topic (a misbehaving server, a replay, an attacker with broker credentials) cannot saturate
//! the downlink stage or, later, the pump commands. What is refused is counted
//! (`commands_refused_total`) and logged at most once a second per topic, with the number.

use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    at: Instant,
    refused_unlogged: u64,
    logged_at: Option<Instant>,
}

pub struct Intake {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

/// What to do with one incoming command.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Refused; `Some(n)`: log now that `n` were refused since the last line.
    No(Option<u64>),
}

impl Intake {
    /// `rate` commands per second per topic, bursts of twice that.
    pub fn new(rate: u32) -> Intake {
        let rate = rate.max(1) as f64;
        Intake {
            rate,
            burst: 2.0 * rate,
            buckets: HashMap::new(),
        }
    }

    pub fn admit(&mut self, topic: &str, now: Instant) -> Admit {
        let (rate, burst) = (self.rate, self.burst);
        let b = self
            .buckets
            .entry(topic.to_string())
            .or_insert_with(|| Bucket {
                tokens: burst,
                at: now,
                refused_unlogged: 0,
                logged_at: None,
            });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Admit::Yes;
        }
        b.refused_unlogged += 1;
        let due = b
            .logged_at
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if due {
            b.logged_at = Some(now);
            Admit::No(Some(std::mem::take(&mut b.refused_unlogged)))
        } else {
            Admit::No(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_twice_the_rate_is_refused_and_refills_at_the_rate() {
        let mut i = Intake::new(5);
        let t0 = Instant::now();
        let admitted = (0..50)
            .filter(|_| i.admit("a/command/down", t0) == Admit::Yes)
            .count();
        assert_eq!(admitted, 10);
        // Another topic has a bucket of its own.
        assert_eq!(i.admit("a/command/pump", t0), Admit::Yes);
        // One second later: five more.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..50)
            .filter(|_| i.admit("a/command/down", t1) == Admit::Yes)
            .count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn refusals_are_reported_at_most_once_a_second_with_their_number() {
        let mut i = Intake::new(1);
        let t0 = Instant::now();
        assert_eq!(i.admit("t", t0), Admit::Yes);
        assert_eq!(i.admit("t", t0), Admit::Yes);
        assert_eq!(i.admit("t", t0), Admit::No(Some(1)));
        assert_eq!(i.admit("t", t0), Admit::No(None));
        assert_eq!(i.admit("t", t0), Admit::No(None));
        let t1 = t0 + Duration::from_millis(1100);
        assert_eq!(i.admit("t", t1), Admit::Yes);
        assert_eq!(i.admit("t", t1), Admit::No(Some(3)));
    }
}
