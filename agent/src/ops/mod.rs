//! Operations: counters shared by the stages, the periodic statistics they feed, the retained
//! `state/health` message, and the liveness that feeds systemd's watchdog.

pub mod channel_plan;
pub mod config_change;
pub mod counters;
pub mod health;
pub mod requests;
pub mod restart;
pub mod rules_change;
pub mod state;
pub mod stats;
