//! Operations: counters shared by the stages and the periodic statistics they feed.

pub mod counters;
pub mod stats;
