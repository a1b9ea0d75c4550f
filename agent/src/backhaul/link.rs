//! One MQTT connection, driven by a task of its own.
//!
//! rumqttc's `EventLoop::poll` is not cancel-safe while it connects: a `select!` that drops the
//! `poll` future during the TCP connect or before the CONNACK drops the half-made connection, and
//! the next `poll` opens another. Over a link with tens of milliseconds of latency, any timer or
//! store wake-up in that `select!` then turns into a connection storm that never gets a session.
//! So the event loop is polled here, to completion every time, and the session reads its events
//! from a channel, which is cancel-safe. The task stops after the first error: rumqttc would
//! otherwise reconnect by itself on the next `poll`, and a new connection is the session's
//! decision (after its back-off), never the event loop's.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::{Ev, LinkError, Loop};

pub struct Link {
    events: mpsc::Receiver<Result<Ev, LinkError>>,
    driver: JoinHandle<()>,
}

impl Link {
    /// Starts connecting at once (the first `poll` opens the TCP connection).
    pub fn open(mut events: Loop, capacity: usize) -> Link {
        let (tx, rx) = mpsc::channel(capacity);
        let driver = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err((queued, e)) => {
                        // Packets read in the same batch as the failure (a PUBACK refusing a
                        // publish, then the broker closing) explain it: they go first.
                        for ev in queued {
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Link { events: rx, driver }
    }

    /// The next event; an error is the last one. Cancel-safe.
    pub async fn next(&mut self) -> Result<Ev, LinkError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(LinkError::Closed),
        }
    }
}

impl Drop for Link {
    /// Closes the connection (the event loop, and its socket, go with the task).
    fn drop(&mut self) {
        self.driver.abort();
    }
}
