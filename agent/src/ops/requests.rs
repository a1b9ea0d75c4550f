//! `command/ops`: lora-edge's own read requests from the centre, JSON in, JSON out on
//! `event/ops` (through the store, like every event: each request is audited there).
//!
//! Request: `{"id": "…", "op": "config" | "rules" | "backlog" | "health"}`. Answer:
//! `{"id", "op", "ok": true, "result": …}` or `{"id", "op", "ok": false, "error": "…"}`.
//! - `config`: the configuration as running (its files and `--set`s merged, as written; keys
//!   left out take their defaults), secrets redacted, with the files' sha256;
//! - `rules`: the rule file as running (its text and sha256; never the keys file);
//! - `backlog`: what the store holds and has lost;
//! - `health`: the current `state/health` message;
//! - `reload`: the configuration and rule files on disk checked as `lora-edge check` does; the
//!   rules run in place of the running ones (`rules_change.rs`: kept pumps keep their state), other
//!   changed keys are named (they take effect at the next restart); a changed keys file gives
//!   the rules stage its sessions (a rejoined sensor heard again); a broken file changes
//!   nothing and the answer says why (SIGHUP does the same);
//! - `apply` with `"rules"` (the rule file's text, and `"signature"` when
//!   `rules.public_key` is set): checked, run, then written in place of the rule file;
//! - `rollback`: the previous rule file; with `"config": true`, the centre's configuration
//!   changes as they were before the last kept one (`config_change.rs`, provisional);
//! - `apply` with `"config"` (a TOML fragment) and `confirm`: a provisional configuration
//!   change, kept or undone by the agent (`config_change.rs`).

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

/// What the backhaul hands this stage.
pub enum OpsInput {
    /// A `command/ops` request (JSON).
    Request(Vec<u8>),
    /// A `command/config` channel plan waits in `channel_plan::PlanSlot`.
    PlanWaiting,
}

const OPS: [&str; 8] = [
    "config", "rules", "backlog", "health", "reload", "apply", "rollback", "confirm",
];

/// Reading the files on disk again (SIGHUP and `reload`), with what the process runs.
pub struct Reloader {
    pub files: Vec<PathBuf>,
    pub sets: Vec<String>,
    pub linked: Option<crate::config::Linked>,
    /// The configuration as running (`Config::source`), to tell what changed on disk.
    pub running: toml::Table,
    /// The sha256 of the keys file the rules stage runs with.
    pub keys_sha256: std::sync::Mutex<Option<String>>,
    /// Taken away at shutdown (`close`): it holds a sender of the rules stage's input, which
    /// ends when every sender is gone.
    pub rules: std::sync::Mutex<Option<super::rules_change::RulesControl>>,
}

impl Reloader {
    /// No more rule changes: the rules stage may end.
    pub fn close(&self) {
        if let Ok(mut r) = self.rules.lock() {
            *r = None;
        }
    }

    /// Runs `f` with the rules' control, if the stage runs.
    fn with_rules<T>(
        &self,
        f: impl FnOnce(&super::rules_change::RulesControl) -> Result<T, String>,
    ) -> Option<Result<T, String>> {
        let guard = self.rules.lock().ok()?;
        guard.as_ref().map(f)
    }

    pub fn reload(&self) -> Result<Value, String> {
        let (cfg, _) = crate::check::configuration(
            &crate::config::layers(&self.files, &self.sets),
            &self.sets,
            self.linked,
            crate::check::Depth::Files,
        )
        .map_err(|e| {
            format!(
                "the files on disk do not pass check; the running configuration and rules stay:\n{e}"
            )
        })?;
        let mut changed: Vec<String> = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            cfg.source.keys().chain(self.running.keys()).collect();
        for k in keys {
            if k != "rules" && cfg.source.get(k) != self.running.get(k) {
                changed.push(k.clone());
            }
        }
        if cfg.source.get("rules") != self.running.get("rules") {
            changed.push(
                "rules (its keys: which files it names, and the signing key, change at a restart; \
                 the files' contents are reloaded)"
                    .into(),
            );
        }
        let keys_now = cfg.rules.as_ref().and_then(|r| {
            crate::files::read_bounded(&r.keys_file, crate::config::MAX_FILE_BYTES)
                .ok()
                .map(|b| super::state::sha256_hex(&b))
        });
        let keys_running = self
            .keys_sha256
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default();
        // A changed keys file (a sensor rejoined): its sessions, pump states untouched. Before the
        // rules (a rule file that adds a device needs its keys), and once more after them when
        // refused (a keys file that drops a device the new rules drop too).
        let keys_changed = keys_now
            .as_ref()
            .is_some_and(|k| Some(k) != keys_running.as_ref());
        let rekey = || -> Option<Result<String, String>> {
            let r = self.with_rules(|r| r.rekey())?;
            if r.is_ok() {
                if let Ok(mut running) = self.keys_sha256.lock() {
                    running.clone_from(&keys_now);
                }
            }
            Some(r)
        };
        let mut keys = keys_changed.then(rekey).flatten();
        let rules =
            match (self.with_rules(|r| r.reload()), &cfg.rules) {
                (Some(r), _) => Some(r?),
                (None, Some(_)) => return Err(
                    "the rules stage is not running (its files did not load at start, or rules \
                     were added): a restart starts it"
                        .into(),
                ),
                (None, None) => None,
            };
        if matches!(keys, Some(Err(_))) {
            keys = rekey();
        }
        let keys = match keys {
            Some(Ok(said)) => json!({"applied": said}),
            Some(Err(why)) => {
                changed.push(format!("rules.keys_file (refused while running: {why})"));
                json!({"refused": why})
            }
            None => Value::Null,
        };
        Ok(json!({
            "rules_sha256": rules,
            "keys": keys,
            "restart_needed_for": changed,
        }))
    }
}

pub struct Requests {
    /// The configuration as running, secrets redacted (`config::redacted`), as JSON.
    pub config: Value,
    /// The configuration files and their sha256.
    pub config_files: Vec<(PathBuf, String)>,
    pub rules_file: Option<PathBuf>,
    pub queue: Arc<Queue>,
    pub counters: Arc<Counters>,
    pub health: watch::Receiver<Vec<u8>>,
    pub reloader: Arc<Reloader>,
    /// Configuration changes from the centre (`config_change.rs`).
    pub changes: Arc<super::config_change::ConfigControl>,
    pub channel_plans: super::channel_plan::ChannelPlans,
    pub input: Receiver<OpsInput>,
    pub output: SyncSender<Event>,
}

impl Requests {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("ops-requests".into())
            .spawn(move || {
                while let Ok(input) = self.input.recv() {
                    // A bug met by one request must not end the stage: the centre would lose
                    // every remote operation until a restart nobody can ask for.
                    let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut answers = match &input {
                            OpsInput::Request(payload) => vec![self.answer(payload)],
                            OpsInput::PlanWaiting => Vec::new(),
                        };
                        // After every input: a wake-up for a plan may have been dropped on a
                        // full queue, the plan itself is never.
                        answers.extend(self.channel_plans.run_waiting());
                        answers
                    }))
                    .unwrap_or_else(|_| {
                        tracing::error!("ALARM: an ops request met a bug (logged above); answered with an error, the stage goes on");
                        vec![json!({"id": null, "op": null, "ok": false, "error": "internal error (logged on the gateway)"})]
                    });
                    for answer in answers {
                        let event = Event {
                            at: SystemTime::now(),
                            body: Body::Ops(answer),
                        };
                        if self.output.send(event).is_err() {
                            return;
                        }
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
        // Echoed in the answer: bounded, so that a huge "op" cannot make a huge answer.
        let op: String = request["op"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        let result = if id.is_null() {
            Err("the request needs an \"id\" (a string of at most 64 characters, or a number) to be answered by".to_string())
        } else {
            self.run(&op, &request)
        };
        match result {
            Ok(result) => {
                tracing::info!(%id, op = ?op, "command/ops answered");
                json!({"id": id, "op": op, "ok": true, "result": result})
            }
            Err(error) => {
                tracing::warn!(%id, op = ?op, error = ?error, "command/ops refused");
                json!({"id": id, "op": op, "ok": false, "error": error})
            }
        }
    }

    fn run(&self, op: &str, request: &Value) -> Result<Value, String> {
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
                // What runs, not what an edit left on disk (the stage may have refused it).
                let (bytes, running) = match self.reloader.with_rules(|c| Ok(c.running_text())) {
                    Some(Ok(text)) => (text, true),
                    _ => (
                        crate::files::read_bounded(path, crate::config::MAX_FILE_BYTES)
                            .map_err(|e| format!("{}: {e}", path.display()))?,
                        false,
                    ),
                };
                Ok(json!({
                    "path": path.display().to_string(),
                    "running": running,
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
            "reload" => self.reloader.reload(),
            "apply" if !request["config"].is_null() || !request["unset"].is_null() => {
                if !request["rules"].is_null() {
                    return Err("apply takes \"config\" or \"rules\", not both".into());
                }
                self.changes.apply(request)
            }
            "confirm" => self.changes.confirm(request),
            "apply" => {
                let Some(text) = request["rules"].as_str() else {
                    return Err(
                        "apply takes \"rules\" (a rule file's text) or \"config\" (a TOML \
                         fragment of the configuration)"
                            .into(),
                    );
                };
                self.reloader
                    .with_rules(|c| {
                        c.apply(
                            text,
                            request["signature"].as_str(),
                            request["serial"].as_u64(),
                        )
                    })
                    .ok_or(
                        "the rules stage is not running on this gateway (no rules configured, \
                         or their files did not load at start)",
                    )?
                    .map(|sha| json!({"rules_sha256": sha}))
            }
            "rollback" if request["config"].as_bool() == Some(true) => {
                self.changes.rollback(request)
            }
            "rollback" => self
                .reloader
                .with_rules(|c| c.rollback())
                .ok_or("the rules stage is not running on this gateway")?
                .map(|sha| json!({"rules_sha256": sha})),
            op => Err(format!("unknown op {op:?} (known: {})", OPS.join(", "))),
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::ops::channel_plan::ChannelPlans;
    use crate::ops::config_change::ConfigControl;

    /// Every request decoder of the stage, fed random and mangled requests (seeds fixed): an
    /// answer always comes, with `ok` and an `id` the centre can match, and nothing panics.
    #[test]
    fn random_and_mangled_requests_are_always_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(crate::store::QueueOptions {
            path: dir.path().join("store"),
            max_disk_bytes: 64 << 20,
            max_age: std::time::Duration::from_secs(3600),
            commit_interval: std::time::Duration::from_millis(500),
        })
        .unwrap();
        let base = dir.path().join("agent.toml");
        std::fs::write(&base, "[gateway]\nid = \"0016c001ff10a235\"\n[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\n").unwrap();
        let remote = dir.path().join("remote.toml");
        let cfg: crate::config::Config = toml::from_str(&format!(
            "[ops]\nremote_config = {:?}\n",
            remote.display().to_string()
        ))
        .unwrap();
        let (radio_tx, radio_rx) = std::sync::mpsc::sync_channel::<crate::radio::Replan>(1);
        // A radio that starts with whatever plan it is given.
        std::thread::spawn(move || {
            while let Ok(r) = radio_rx.recv() {
                let _ = r.reply.try_send(Ok(()));
            }
        });
        let (_ops_tx, ops_rx) = std::sync::mpsc::sync_channel(1);
        let (out_tx, _out_rx) = std::sync::mpsc::sync_channel(1);
        let (_h_tx, h_rx) = watch::channel(Vec::new());
        let r = Requests {
            config: json!({}),
            config_files: vec![],
            rules_file: None,
            queue: Arc::new(queue),
            counters: Arc::new(Counters::new()),
            health: h_rx,
            reloader: Arc::new(Reloader {
                files: vec![base.clone()],
                sets: vec![],
                linked: Some(crate::config::Linked::Simulator),
                running: toml::Table::new(),
                keys_sha256: Default::default(),
                rules: std::sync::Mutex::new(None),
            }),
            changes: Arc::new(ConfigControl::new(
                vec![base],
                vec![],
                Some(crate::config::Linked::Simulator),
                &cfg,
            )),
            channel_plans: ChannelPlans {
                slot: Default::default(),
                base: crate::radio::region::plan("eu868").unwrap(),
                radio: radio_tx,
                encoding: crate::config::Encoding::Protobuf,
                gateway_id: "0016c001ff10a235".into(),
                counters: Arc::new(Counters::new()),
            },
            input: ops_rx,
            output: out_tx,
        };
        let seeds = [
            r#"{"id":"a","op":"backlog"}"#,
            r#"{"id":7,"op":"apply","config":"[stats]\ninterval = \"0s\"\n"}"#,
            r#"{"id":"b","op":"apply","rules":"x","config":"y"}"#,
            r#"{"id":"c","op":"confirm"}"#,
            r#"{"id":"d","op":"apply","config":"[mqtt]\ninflight = 0\n","revert_after_s":5}"#,
            r#"{"id":[1],"op":{"x":1}}"#,
        ];
        let mut rng = fastrand::Rng::with_seed(22);
        for i in 0..3000 {
            let mut bytes = seeds[i % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.usize(0..6) {
                match rng.u8(0..4) {
                    0 if !bytes.is_empty() => {
                        let at = rng.usize(0..bytes.len());
                        bytes[at] = rng.u8(..);
                    }
                    1 if !bytes.is_empty() => bytes.truncate(rng.usize(0..bytes.len())),
                    2 => {
                        let at = rng.usize(0..=bytes.len());
                        bytes.insert(at, rng.u8(..));
                    }
                    _ => {}
                }
            }
            let a = r.answer(&bytes);
            assert!(a["ok"].is_boolean(), "{a}");
            let id_ok = match &a["id"] {
                Value::Null | Value::Number(_) => true,
                Value::String(s) => s.len() <= 64,
                _ => false,
            };
            assert!(id_ok, "{a}");
            // Random protobuf as a channel plan: refused or run, always answered.
            let mut plan_bytes = vec![0u8; rng.usize(0..64)];
            rng.fill(&mut plan_bytes);
            let p = r.channel_plans.apply(&plan_bytes);
            assert!(p["ok"].is_boolean(), "{p}");
        }
        // No mangled fragment got through (the seeds that could were all invalid).
        assert!(
            !remote.exists(),
            "a fragment that does not pass check was written"
        );
    }
}
