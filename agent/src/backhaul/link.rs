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

use rumqttc::v5::{ConnectionError, Event, EventLoop};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub struct Link {
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    driver: JoinHandle<()>,
}

impl Link {
    /// Starts connecting at once (the first `poll` opens the TCP connection).
    pub fn open(mut events: EventLoop, capacity: usize) -> Link {
        let (tx, rx) = mpsc::channel(capacity);
        let driver = tokio::spawn(async move {
            loop {
                let ev = events.poll().await;
                if ev.is_err() {
                    // Packets read in the same batch as the failure (a PUBACK refusing a publish,
                    // then the broker closing) are still queued: they explain the failure.
                    while let Some(queued) = events.state.events.pop_front() {
                        if tx.send(Ok(queued)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(ev).await;
                    return;
                }
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Link { events: rx, driver }
    }

    /// The next event; an error is the last one. Cancel-safe.
    pub async fn next(&mut self) -> Result<Event, ConnectionError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(ConnectionError::RequestsDone),
        }
    }
}

impl Drop for Link {
    /// Closes the connection (the event loop, and its socket, go with the task).
    fn drop(&mut self) {
        self.driver.abort();
    }
}
