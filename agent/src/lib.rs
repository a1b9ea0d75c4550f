//! lora-edge: a LoRa concentrator gateway daemon.
//!
//! Uplink data path, one stage a module, each owning its state and talking through bounded
//! channels:
//!
//! ```text
//! radio (thread: lgw_receive) → uplink (CRC filter, UplinkFrame; rules go here)
//!   → store::Writer (number, encode, append to the log; commit) → backhaul (MQTT, PUBACK → ack)
//! ```
//! Downlink path: `backhaul` (command/down) → `downlink` (validate, schedule, hand-off to the
//! radio at the right counter) → acks through the store like every event.
//! `ops` reports statistics through the same store; `config` loads and validates everything.

pub mod backhaul;
pub mod check;
pub mod config;
pub mod downlink;
pub mod events;
pub mod exec;
pub mod files;
pub mod identity;
pub mod ops;
pub mod radio;
pub mod realtime;
pub mod rules;
pub mod store;
pub mod uplink;

// The simulated concentrator provides the `lgw_*` symbols of this build; naming the crate here
// is what makes the linker include it.
#[cfg(feature = "simulator")]
extern crate sx1302_sim;
