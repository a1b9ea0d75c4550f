//! `command/ops`: lora-edge's own read requests from the centre, JSON in, JSON out on
//! `event/ops` (through the store, like every event: each request is audited there).
//!
//! Request: `{"id": "…", "op": "config" | "rules" | "backlog" | "health"}`. Answer:
//! `{"id", "op", "ok": true, "result": …}` or `{"id", "op", "ok": false, "error": "…"}`.
//! - `config`: the configuration as running (its files and `--set`s merged, as written; keys
//!   left out take their defaults), secrets redacted, with the files' sha256;
//! - `rules`: the rule file as running (its text and sha256; never the keys file);
//! - `backlog`: what the store holds and has lost;
//! - `health`: the current `state/health` message.
//!
//! Changing the configuration or the rules from the centre (apply, reload, roll back, confirm)
//! is not built yet: such a request is answered with an error saying so.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::counters::Counters;
use crate::events::{unix_ms, Body, Event};
use crate::store::Queue;

/// Requests waiting (the backhaul drops beyond this, and counts).
pub const QUEUE: usize = 16;

const OPS: [&str; 4] = ["config", "rules", "backlog", "health"];
const NOT_YET: [&str; 4] = ["apply", "reload", "rollback", "confirm"];

pub struct Requests {
    /// The configuration as running, secrets redacted (`config::redacted`), as JSON.
    pub config: Value,
    /// The configuration files and their sha256.
    pub config_files: Vec<(PathBuf, String)>,
    pub rules_file: Option<PathBuf>,
    pub queue: Arc<Queue>,
    pub counters: Arc<Counters>,
    pub health: watch::Receiver<Vec<u8>>,
    pub input: Receiver<Vec<u8>>,
    pub output: SyncSender<Event>,
}

impl Requests {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("ops-requests".into())
            .spawn(move || {
                while let Ok(payload) = self.input.recv() {
                    let answer = self.answer(&payload);
                    let event = Event {
                        at: SystemTime::now(),
                        body: Body::Ops(answer),
                    };
                    if self.output.send(event).is_err() {
                        return;
                    }
                }
            })
    }

    fn answer(&self, payload: &[u8]) -> Value {
        let request: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "command/ops: not JSON");
                return json!({"id": null, "op": null, "ok": false, "error": format!("not JSON: {e}")});
            }
        };
        let id = match &request["id"] {
            Value::String(s) if s.len() <= 64 => Value::String(s.clone()),
            Value::Number(n) => Value::Number(n.clone()),
            _ => Value::Null,
        };
        let op = request["op"].as_str().unwrap_or_default().to_string();
        let result = if id.is_null() {
            Err("the request needs an \"id\" (a string of at most 64 characters, or a number) to be answered by".to_string())
        } else {
            self.run(&op)
        };
        match result {
            Ok(result) => {
                tracing::info!(%id, %op, "command/ops answered");
                json!({"id": id, "op": op, "ok": true, "result": result})
            }
            Err(error) => {
                tracing::warn!(%id, %op, %error, "command/ops refused");
                json!({"id": id, "op": op, "ok": false, "error": error})
            }
        }
    }

    fn run(&self, op: &str) -> Result<Value, String> {
        match op {
            "config" => Ok(json!({
                "config": self.config,
                "files": self.config_files.iter()
                    .map(|(p, h)| json!({"path": p.display().to_string(), "sha256": h}))
                    .collect::<Vec<_>>(),
                "note": "keys left out take their defaults (README § Configuration reference)",
            })),
            "rules" => {
                let Some(path) = &self.rules_file else {
                    return Err("no rules are configured on this gateway".into());
                };
                let bytes = crate::files::read_bounded(path, crate::config::MAX_FILE_BYTES)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(json!({
                    "path": path.display().to_string(),
                    "sha256": super::state::sha256_hex(&bytes),
                    "text": String::from_utf8_lossy(&bytes),
                }))
            }
            "backlog" => {
                let b = self.queue.backlog();
                let now = unix_ms(SystemTime::now());
                Ok(json!({
                    "events": b.records,
                    "bytes": b.bytes,
                    "oldest_age_s": b.oldest_at_ms.map(|t| now.saturating_sub(t) / 1000),
                    "next_seq": self.queue.next_seq(),
                    "acknowledged_seq": self.queue.acked(),
                    "disk_bytes": self.queue.disk_bytes(),
                    "evicted_total": self.queue.evicted_total(),
                    "rejected_total": Counters::get(&self.counters.store_rejected),
                    "lost_total": Counters::get(&self.counters.store_lost),
                }))
            }
            "health" => serde_json::from_slice(&self.health.borrow())
                .map_err(|_| "no health message yet".to_string()),
            op if NOT_YET.contains(&op) => Err(format!(
                "\"{op}\" is not built in this version: configuration and rule changes from the \
                 centre are not supported yet"
            )),
            op => Err(format!("unknown op {op:?} (known: {})", OPS.join(", "))),
        }
    }
}
