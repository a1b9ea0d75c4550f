//! Store-and-forward: the durable queue and the stage that appends to it.
//!
//! An event counts as accepted once the writer has appended it (it is then in the page cache:
//! a kill loses nothing; a power cut loses at most the last `store.commit_interval` of events
//! the broker had not acknowledged); it leaves the store only when the backhaul has seen the
//! broker's PUBACK for it (`Queue::ack_upto`), or reported lost by range.
//!
//! - `queue`: the interface (append, read from a cursor, acknowledge, evict, commit);
//! - `log`: the records, in a ring of segment files written in place (the journal), growing
//!   into more segments while the backhaul is down (the outage backlog);
//! - `space`: where a segment comes from (allocated, or evicted at the budget or on a full
//!   disk);
//! - `numbering`: numbers never reused; `unreported`: losses the centre has not heard of;
//! - `state`: other stages' small durable values; `commit`: when the commit thread syncs;
//! - `recovery` and `migrate`: opening, salvaging and carrying over an earlier format.

mod commit;
mod log;
mod migrate;
pub mod numbering;
pub mod queue;
mod recovery;
mod space;
mod state;
mod unreported;
mod writer;

pub use queue::{
    Backlog, Eviction, Loss, NewRecord, Opened, Queue, QueueOptions, Record, StoreError,
};
pub use recovery::check_path;
pub use space::{check_room, free_bytes};
pub use unreported::Unreported;
pub use writer::Writer;
#[cfg(test)]
mod tests;
