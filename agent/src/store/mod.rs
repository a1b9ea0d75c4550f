//! Store-and-forward: the durable queue and the stage that appends to it.
//!
//! An event counts as accepted once the writer has appended it; it leaves the store only when
//! the backhaul has seen the broker's PUBACK for it (`Queue::ack_upto`).

pub mod numbering;
pub mod queue;
mod writer;

pub use queue::{
    Backlog, Eviction, Loss, NewRecord, Opened, Queue, QueueOptions, Record, StoreError, Unreported,
};
pub use writer::Writer;
