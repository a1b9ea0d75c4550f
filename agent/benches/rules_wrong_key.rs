//! What a wrong AppSKey (with the right NwkSKey: the MIC passes) does to a pump under local
//! level control: the payload decrypts to noise, and the engine decides on it.
//!
//! `cargo bench -p lora-edge --bench rules_wrong_key`
//!
//! A level sensor that really reads 1.8 m (no demand: start at 2.5 m) reports every 10 minutes
//! for 20 000 frames (139 days); the agent holds one of 16 wrong AppSKeys. Prints, per key, the
//! frame at which noise first started the pump and how many readings it stayed on, with and
//! without `max_step`. Deterministic (no clock, no randomness): the same figures every run.

use std::collections::BTreeMap;

use lora_edge::rules::engine::Engine;
use lrwn::{AES128Key, DevAddr};

const RULES: &str = r#"version = 1
[[device]]
dev_eui = "70B3D57ED0001A01"
decoder = "layout"
  [[device.field]]
  name = "water_level_m"
  offset = 0
  type = "u16"
  scale = 0.001
[[sensor]]
id = "level"
device = "70B3D57ED0001A01"
field = "water_level_m"
valid_range = [0.0, 4.0]
max_age = "25m"
MAX_STEP
[[pump]]
id = "P1"
safe_state = "off"
actuator = { kind = "simulated", file = "relay.jsonl" }
max_run = "2h"
min_run = "2m"
min_off = "10m"
max_starts_per_hour = 4
remote_lease_max = "30m"
  [[pump.interlock]]
  id = "dry_run"
  sensor = "level"
  trip_below = 0.40
  reset_at = 0.60
  [pump.auto]
  sensor = "level"
  mode = "empty"
  start_at = 2.5
  stop_at = 1.0
"#;

const FRAMES: u32 = 20_000;
const T0: u64 = 1_800_000_000_000;
const TEN_MINUTES: u64 = 600_000;

fn main() {
    println!("lora-edge: a wrong AppSKey, 16 keys, {FRAMES} readings of a real 1.8 m every 10 min");
    let dir = tempfile::tempdir().unwrap();
    for (label, step) in [("no max_step", ""), ("max_step = 0.5", "max_step = 0.5")] {
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, RULES.replace("MAX_STEP", step)).unwrap();
        let rules = lora_edge::rules::file::load(&path).unwrap();
        let addr = DevAddr::from_be_bytes([0x26, 0x01, 0x1B, 0xDA]);
        let truth = 1800u16.to_be_bytes();
        let (mut firsts, mut on) = (Vec::new(), Vec::new());
        for k in 1u8..=16 {
            let mut e = Engine::new(rules.clone(), T0, &BTreeMap::new());
            e.session_started(0, None);
            let (mut first, mut readings_on) = (None, 0);
            for f in 1..=FRAMES {
                let sent = lrwn::encrypt_frm_payload(
                    &AES128Key::from_bytes([0x22; 16]),
                    true,
                    &addr,
                    f,
                    &truth,
                )
                .unwrap();
                let read = lrwn::encrypt_frm_payload(
                    &AES128Key::from_bytes([k; 16]),
                    true,
                    &addr,
                    f,
                    &sent,
                )
                .unwrap();
                let v = u16::from_be_bytes([read[0], read[1]]) as f64 / 1000.0;
                e.reading(0, v, T0 + f as u64 * TEN_MINUTES);
                if e.is_on(0) {
                    readings_on += 1;
                    first.get_or_insert(f);
                }
            }
            firsts.push(first.map_or("never".to_string(), |f| f.to_string()));
            on.push(readings_on);
        }
        on.sort_unstable();
        println!("{label:<16} first start at reading: {}", firsts.join(" "));
        println!(
            "{label:<16} readings with the pump on, of {FRAMES}: min {} median {} max {}",
            on[0],
            on[on.len() / 2],
            on[on.len() - 1]
        );
    }
}
