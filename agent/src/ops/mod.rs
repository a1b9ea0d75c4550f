//! Operations: counters shared by the stages, the periodic statistics they feed, and the
//! liveness that feeds systemd's watchdog.

pub mod counters;
pub mod health;
pub mod stats;
