//! Configuration changes from the centre (`command/ops` `apply` with `"config"`), which can never
//! strand a gateway: a change is provisional until the gateway proves it still reaches the
//! centre with it, and undone by the agent itself otherwise.
//!
//! Files, all beside `ops.remote_config` (`remote.toml` here), written only by the agent:
//! - `remote.toml`: the centre's changes so far, read after the configuration files;
//! - `remote.toml.prev`: what it was before the last change (empty: no changes);
//! - `remote.toml.pending`: the provisional change (JSON: request id, deadline, starts);
//! - `remote.toml.reverted`: why the last change was undone, until the centre has been told.
//!
//! The order: the fragment is merged over `remote.toml` into `remote.toml.new`, which is checked
//! with every configuration file exactly as `lora-edge check` does (every error in the answer);
//! then `.prev` and `.pending` are written (synced), `.new` renamed into place, and the agent
//! restarts itself (`restart.rs`) to run it. The change is kept (`.pending` removed, the centre
//! told on `event/ops`) once the backhaul session is up with it, and, if the request asked for
//! it, the centre sent `confirm`. Not within `revert_after`, or when the agent fails to start
//! with it [`MAX_STARTS`] times: `.prev` goes back in place, the agent restarts, and once its
//! backhaul is up it says why on `event/ops` (the answer goes through the store).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::counters::Counters;
use crate::config::{self, Linked};
use crate::events::{unix_ms, Body, Event};

/// Starts with a provisional change before it is undone without waiting for its deadline: the
/// agent that keeps failing with it may not live to the deadline.
pub const MAX_STARTS: u32 = 3;

fn beside(remote: &Path, suffix: &str) -> PathBuf {
    let mut s = remote.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// The request's id, for the answer that says how it ended.
    pub id: Value,
    pub sha256: String,
    pub deadline_ms: u64,
    pub revert_after_s: u64,
    /// The centre must send `confirm` too.
    pub confirm: bool,
    /// Starts of the agent with this change.
    pub starts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reverted {
    id: Value,
    why: String,
    at_ms: u64,
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // It may hold credentials (a new mqtt.password): the service's user alone reads it.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(d) => std::fs::File::open(d).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = crate::files::read_bounded(path, 64 * 1024).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Puts `.prev` back in place of `remote.toml`, says why in `.reverted`, ends the provisional
/// state.
fn revert(remote: &Path, pending: &Pending, why: &str) -> std::io::Result<()> {
    let prev = crate::files::read_bounded(&beside(remote, ".prev"), config::MAX_FILE_BYTES)
        .unwrap_or_default();
    let back = beside(remote, ".back");
    write_synced(&back, &prev)?;
    let reverted = Reverted {
        id: pending.id.clone(),
        why: why.to_string(),
        at_ms: now_ms(),
    };
    write_synced(
        &beside(remote, ".reverted"),
        &serde_json::to_vec(&reverted).unwrap_or_default(),
    )?;
    std::fs::rename(&back, remote)?;
    std::fs::remove_file(beside(remote, ".pending"))?;
    sync_dir(remote)
}

/// At start, before the configuration is read: counts this start against a provisional change,
/// and undoes one whose time is up or whose agent keeps failing.
pub fn at_start(remote: &Path) {
    let pending_path = beside(remote, ".pending");
    let Some(mut p) = read_json::<Pending>(&pending_path) else {
        if pending_path.exists() {
            tracing::error!(file = %pending_path.display(), "the provisional-change file is unreadable: removed, the change is kept");
            let _ = std::fs::remove_file(&pending_path);
        }
        return;
    };
    p.starts += 1;
    let why = if now_ms() >= p.deadline_ms {
        Some(format!(
            "not proven within {} s (the agent was not running with it at the deadline)",
            p.revert_after_s
        ))
    } else if p.starts > MAX_STARTS {
        Some(format!(
            "the agent started {} times with it without proving it",
            p.starts - 1
        ))
    } else {
        None
    };
    match why {
        Some(why) => match revert(remote, &p, &why) {
            Ok(()) => {
                tracing::warn!(why = %why, "configuration change from the centre undone at start: the previous configuration runs")
            }
            Err(e) => {
                tracing::error!(error = %e, "ALARM: undoing a configuration change from the centre failed")
            }
        },
        None => {
            if let Err(e) = write_synced(&pending_path, &serde_json::to_vec(&p).unwrap_or_default())
            {
                tracing::error!(error = %e, "counting a start with a provisional configuration change");
            }
        }
    }
}

/// A start whose configuration does not load while a change is provisional: the change is
/// undone at once. True if it was (the caller restarts).
pub fn undo_unloadable(remote: &Path, errors: &str) -> bool {
    let Some(p) = read_json::<Pending>(&beside(remote, ".pending")) else {
        return false;
    };
    let first = errors.lines().next().unwrap_or_default();
    revert(
        remote,
        &p,
        &format!("the configuration did not load with it: {first}"),
    )
    .is_ok()
}

/// What the running agent does about changes from the centre: apply, confirm, and the watch
/// over a provisional one.
pub struct ConfigControl {
    /// The configuration files as given (without the remote layer), the `--set`s, the build.
    pub files: Vec<PathBuf>,
    pub sets: Vec<String>,
    pub linked: Option<Linked>,
    /// `ops.remote_config`; None: changes are refused.
    pub remote: Option<PathBuf>,
    pub revert_after: Duration,
    /// The provisional change this process runs with, if any.
    pub pending: Mutex<Option<Pending>>,
    pub confirmed: AtomicBool,
}

impl ConfigControl {
    pub fn new(
        files: Vec<PathBuf>,
        sets: Vec<String>,
        linked: Option<Linked>,
        cfg: &config::Config,
    ) -> ConfigControl {
        let remote = cfg.ops.remote_config.clone();
        let pending = remote
            .as_deref()
            .and_then(|r| read_json::<Pending>(&beside(r, ".pending")));
        ConfigControl {
            files,
            sets,
            linked,
            remote,
            revert_after: cfg.ops.revert_after,
            pending: Mutex::new(pending),
            confirmed: AtomicBool::new(false),
        }
    }

    fn pending(&self) -> Option<Pending> {
        self.pending.lock().ok().and_then(|p| p.clone())
    }

    /// `apply` with `"config"`: a TOML fragment merged over the centre's earlier changes.
    pub fn apply(&self, request: &Value) -> Result<Value, String> {
        let Some(remote) = &self.remote else {
            return Err(
                "this gateway takes no configuration from the centre: ops.remote_config \
                        is not set in its configuration file"
                    .into(),
            );
        };
        if let Some(p) = self.pending() {
            return Err(format!(
                "the change {} is still provisional (until it is proven or undone, at the \
                 latest {} s after it was applied): one change at a time",
                p.id, p.revert_after_s
            ));
        }
        let text = request["config"]
            .as_str()
            .ok_or("\"config\" must be a string: a TOML fragment, e.g. \"[stats]\\ninterval = \\\"30s\\\"\"")?;
        if text.len() as u64 > config::MAX_FILE_BYTES {
            return Err("the fragment is larger than 1 MiB".into());
        }
        let confirm = match &request["confirm"] {
            Value::Null => false,
            Value::Bool(b) => *b,
            _ => return Err("\"confirm\" must be true or false".into()),
        };
        let revert_after = match &request["revert_after_s"] {
            Value::Null => self.revert_after,
            v => {
                let s = v
                    .as_u64()
                    .ok_or("\"revert_after_s\" must be a whole number of seconds")?;
                let d = Duration::from_secs(s);
                if !(config::REVERT_AFTER_MIN..=config::REVERT_AFTER_MAX).contains(&d) {
                    return Err("\"revert_after_s\" must be between 10 and 3600".into());
                }
                d
            }
        };
        let fragment: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (fragment line {line})")
                })
                .unwrap_or_default();
            format!("the fragment is not TOML{at}: {}", e.message())
        })?;
        if fragment.is_empty() {
            return Err("the fragment changes nothing".into());
        }
        // What would let whoever can publish on `command/ops` do more than configure: run
        // programs (`commands`), replace the pump rules or the key they must be signed with
        // (`rules`), undo the undo (`ops`), or leave the backlog behind (`store.path`).
        let mut refused: Vec<String> = Vec::new();
        for (key, why) in [
            ("ops", "decides how changes from the centre are taken and undone"),
            ("commands", "is what the centre may run: only the gateway's own file widens it"),
            ("rules", "names the pump rules and the key they must be signed with (rule files come with apply \"rules\")"),
        ] {
            if fragment.contains_key(key) {
                refused.push(format!("{key}.*: {why}"));
            }
        }
        if fragment.get("store").and_then(|s| s.get("path")).is_some() {
            refused.push("store.path: the backlog is there".into());
        }
        for set in &self.sets {
            let field = set.split_once('=').map(|(f, _)| f.trim()).unwrap_or(set);
            let mut at = Some(&fragment);
            let mut found = false;
            let parts: Vec<&str> = field.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                match at.and_then(|t| t.get(*part)) {
                    Some(toml::Value::Table(t)) if i + 1 < parts.len() => at = Some(t),
                    Some(_) => {
                        found = true;
                        break;
                    }
                    None => break,
                }
            }
            if found {
                refused.push(format!(
                    "{field}: set on the gateway's command line (--set), which wins over any file: \
                     this change would not take effect"
                ));
            }
        }
        if !refused.is_empty() {
            return Err(format!(
                "changed only on the gateway, nothing applied: {}",
                refused.join("; ")
            ));
        }
        let current =
            crate::files::read_bounded(remote, config::MAX_FILE_BYTES).unwrap_or_default();
        let mut merged: toml::Table = String::from_utf8_lossy(&current)
            .parse()
            .map_err(|e| format!("{} is not TOML: {e}", remote.display()))?;
        config::merge(&mut merged, fragment);
        let new_text = toml::to_string(&merged).map_err(|e| e.to_string())?;
        if new_text.as_bytes() == current.as_slice() {
            return Err(
                "nothing changes: the running configuration already has these values".into(),
            );
        }
        let new = beside(remote, ".new");
        write_synced(&new, new_text.as_bytes()).map_err(|e| {
            format!(
                "nothing changed: {e} writing {} (a full disk, or a directory the service cannot write)",
                new.display()
            )
        })?;
        let mut files = self.files.clone();
        files.retain(|f| f != remote);
        files.push(new.clone());
        if let Err(e) =
            crate::check::configuration(&files, &self.sets, self.linked, crate::check::Depth::Files)
        {
            let _ = std::fs::remove_file(&new);
            return Err(format!(
                "nothing changed: the configuration with this change does not pass check \
                 ({} is the merged changes):\n{e}",
                remote.display()
            ));
        }
        let sha = super::state::sha256_hex(new_text.as_bytes());
        let pending = Pending {
            id: request["id"].clone(),
            sha256: sha.clone(),
            deadline_ms: now_ms() + revert_after.as_millis() as u64,
            revert_after_s: revert_after.as_secs(),
            confirm,
            starts: 0,
        };
        let placed = write_synced(&beside(remote, ".prev"), &current)
            .and_then(|_| {
                write_synced(
                    &beside(remote, ".pending"),
                    &serde_json::to_vec(&pending).unwrap_or_default(),
                )
            })
            .and_then(|_| std::fs::rename(&new, remote))
            .and_then(|_| sync_dir(remote));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&new);
            let _ = std::fs::remove_file(beside(remote, ".pending"));
            return Err(format!(
                "nothing changed: {e} writing beside {}",
                remote.display()
            ));
        }
        tracing::warn!(id = %pending.id, sha256 = %sha, revert_after = ?revert_after, confirm, "configuration change from the centre applied: restarting with it (provisional)");
        super::restart::request("a configuration change from the centre");
        Ok(json!({
            "sha256": sha,
            "provisional": true,
            "restarting": true,
            "revert_after_s": revert_after.as_secs(),
            "confirm_needed": confirm,
            "note": "the agent restarts with it; it is kept once the backhaul session is up with it (and, if asked, confirmed), else undone; the outcome comes on event/ops with this id",
        }))
    }

    /// `confirm`: the centre keeps the provisional change.
    pub fn confirm(&self) -> Result<Value, String> {
        let Some(p) = self.pending() else {
            return Err("nothing to confirm: no configuration change is provisional".into());
        };
        self.confirmed.store(true, Ordering::Relaxed);
        Ok(json!({"confirmed": p.id, "sha256": p.sha256}))
    }

    /// Watches the provisional change, if any: kept once the backhaul is up with it (and
    /// confirmed when asked), undone at its deadline.
    pub async fn watch(self: Arc<Self>, counters: Arc<Counters>, events: SyncSender<Event>) {
        let (Some(remote), Some(p)) = (self.remote.clone(), self.pending()) else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let up = counters.backhaul_up.load(Ordering::Relaxed);
            let confirmed = !p.confirm || self.confirmed.load(Ordering::Relaxed);
            if up && confirmed {
                let _ = std::fs::remove_file(beside(&remote, ".pending"));
                let _ = sync_dir(&remote);
                if let Ok(mut g) = self.pending.lock() {
                    *g = None;
                }
                tracing::info!(id = %p.id, sha256 = %p.sha256, "configuration change from the centre kept: the backhaul session is up with it");
                let answer = json!({
                    "id": p.id, "op": "apply", "ok": true,
                    "result": {"kept": true, "sha256": p.sha256,
                               "how": if p.confirm { "backhaul session up, confirmed by the centre" } else { "backhaul session up with it" }},
                });
                let _ = events.send(Event {
                    at: SystemTime::now(),
                    body: Body::Ops(answer),
                });
                return;
            }
            if now_ms() >= p.deadline_ms {
                let why = if !up {
                    format!(
                        "the backhaul session was not up with it within {} s",
                        p.revert_after_s
                    )
                } else {
                    format!(
                        "the centre did not confirm it within {} s",
                        p.revert_after_s
                    )
                };
                match revert(&remote, &p, &why) {
                    Ok(()) => {
                        tracing::error!(id = %p.id, why = %why, "configuration change from the centre undone: restarting with the previous configuration");
                        super::restart::request("undoing a configuration change");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ALARM: undoing a configuration change from the centre failed")
                    }
                }
                return;
            }
        }
    }

    /// After an undo: the centre is told why (through the store, so once the backhaul is up).
    pub fn report_reverted(&self, events: &SyncSender<Event>) {
        let Some(remote) = &self.remote else {
            return;
        };
        let path = beside(remote, ".reverted");
        let Some(r) = read_json::<Reverted>(&path) else {
            return;
        };
        let answer = json!({
            "id": r.id, "op": "apply", "ok": false,
            "error": format!("undone: {}; the previous configuration runs again", r.why),
        });
        if events
            .send(Event {
                at: SystemTime::now(),
                body: Body::Ops(answer),
            })
            .is_ok()
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(deadline_ms: u64, starts: u32) -> Pending {
        Pending {
            id: json!("r1"),
            sha256: "x".into(),
            deadline_ms,
            revert_after_s: 60,
            confirm: false,
            starts,
        }
    }

    fn setup(p: &Pending) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote.toml");
        std::fs::write(&remote, "[stats]\ninterval = \"7s\"\n").unwrap();
        std::fs::write(beside(&remote, ".prev"), "").unwrap();
        std::fs::write(beside(&remote, ".pending"), serde_json::to_vec(p).unwrap()).unwrap();
        (dir, remote)
    }

    #[test]
    fn a_start_within_the_deadline_counts_and_keeps_the_change() {
        let (_d, remote) = setup(&pending(now_ms() + 60_000, 0));
        at_start(&remote);
        let p: Pending = read_json(&beside(&remote, ".pending")).unwrap();
        assert_eq!(p.starts, 1);
        assert!(std::fs::read_to_string(&remote).unwrap().contains("7s"));
    }

    #[test]
    fn a_start_past_the_deadline_or_too_many_starts_undoes_it() {
        for p in [
            pending(now_ms() - 1, 0),
            pending(now_ms() + 60_000, MAX_STARTS),
        ] {
            let (_d, remote) = setup(&p);
            at_start(&remote);
            assert!(!beside(&remote, ".pending").exists());
            assert_eq!(std::fs::read_to_string(&remote).unwrap(), "");
            let r: Reverted = read_json(&beside(&remote, ".reverted")).unwrap();
            assert_eq!(r.id, json!("r1"));
        }
    }

    #[test]
    fn what_would_widen_the_centres_power_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("agent.toml");
        std::fs::write(&base, "[radio]\nbackend = \"simulator\"\n").unwrap();
        let remote = dir.path().join("remote.toml");
        let cfg: config::Config = toml::from_str(&format!(
            "[ops]\nremote_config = {:?}\n",
            remote.display().to_string()
        ))
        .unwrap();
        let c = ConfigControl::new(
            vec![base],
            vec!["mqtt.inflight=5".into()],
            Some(Linked::Simulator),
            &cfg,
        );
        for (fragment, says) in [
            ("[commands.sh]\nargv = [\"/bin/sh\"]", "commands.*"),
            ("[rules]\npublic_key = \"AAAA\"", "rules.*"),
            ("[store]\npath = \"/tmp/elsewhere\"", "store.path"),
            (
                "[mqtt]\ninflight = 50",
                "mqtt.inflight: set on the gateway's command line",
            ),
            ("[ops]\nrevert_after = \"1h\"", "ops.*"),
        ] {
            let e = c
                .apply(&json!({"id": "x", "op": "apply", "config": fragment}))
                .unwrap_err();
            assert!(
                e.contains(says) && e.contains("changed only on the gateway"),
                "{e}"
            );
        }
        assert!(!remote.exists() && !beside(&remote, ".pending").exists());
    }

    #[test]
    fn fragments_merge_table_by_table() {
        let mut a: toml::Table = "[mqtt]\nserver = \"a\"\ninflight = 5\n".parse().unwrap();
        config::merge(
            &mut a,
            "[mqtt]\nserver = \"b\"\n[stats]\ninterval = \"9s\"\n"
                .parse()
                .unwrap(),
        );
        assert_eq!(a["mqtt"]["server"].as_str(), Some("b"));
        assert_eq!(a["mqtt"]["inflight"].as_integer(), Some(5));
        assert_eq!(a["stats"]["interval"].as_str(), Some("9s"));
    }
}
