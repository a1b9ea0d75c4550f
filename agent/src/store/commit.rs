//! When the commit thread syncs. It runs only when there is something a power cut could take:
//! records the broker has not acknowledged (the writer looks, `store.commit_interval` after it
//! appended, and rings at once), or a changed state file (rung by `state_put`, synced one
//! interval later). An idle gateway, or one whose broker acknowledges within the interval, never
//! wakes it: on a gateway that idles, each wake-up is a share of its CPU.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Want {
    now: bool,
    later_since: Option<Instant>,
    closed: bool,
}

#[derive(Default)]
pub struct CommitBell {
    want: Mutex<Want>,
    cv: Condvar,
}

impl CommitBell {
    fn want(&self) -> std::sync::MutexGuard<'_, Want> {
        self.want.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit as soon as possible.
    pub fn ring_now(&self) {
        self.want().now = true;
        self.cv.notify_one();
    }

    /// Commit one interval from now (or earlier if already asked).
    pub fn ring_later(&self) {
        let mut w = self.want();
        if w.later_since.is_none() {
            w.later_since = Some(Instant::now());
            self.cv.notify_one();
        }
    }

    /// The commit thread ends after the commit it may be in.
    pub fn close(&self) {
        self.want().closed = true;
        self.cv.notify_one();
    }

    /// Waits until a commit is wanted (true) or the bell is closed (false).
    pub fn wait(&self, interval: Duration) -> bool {
        let mut w = self.want();
        loop {
            if w.closed {
                return false;
            }
            let due = w.later_since.map(|t| t + interval);
            if w.now || due.is_some_and(|d| d <= Instant::now()) {
                w.now = false;
                w.later_since = None;
                return true;
            }
            w = match due {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    self.cv
                        .wait_timeout(w, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.cv.wait(w).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rings_now_later_and_closes() {
        let bell = Arc::new(CommitBell::default());
        let b = bell.clone();
        let t = std::thread::spawn(move || {
            let mut n = 0;
            while b.wait(Duration::from_millis(50)) {
                n += 1;
            }
            n
        });
        bell.ring_now();
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        bell.ring_later();
        // Waits for the later ring to be taken: the interval has passed by then.
        while bell.want().later_since.is_some() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(start.elapsed() >= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(20));
        bell.close();
        assert_eq!(t.join().unwrap(), 2);
    }
}
