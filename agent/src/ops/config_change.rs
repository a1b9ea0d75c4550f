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

/// How long the backhaul must stay up, with the broker acknowledging what the agent publishes,
/// before a change is kept without the centre's word: a session that is refused publishes, or
/// knocked off by another client with the same id, never lasts this long.
const STABLE_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// The request's id, for the answer that says how it ended.
    pub id: Value,
    pub sha256: String,
    /// Wall clock (ms since 1970) of the deadline: used after a reboot.
    pub deadline_ms: u64,
    /// `CLOCK_BOOTTIME` (ms) of the deadline in the boot it was applied in, and that boot's id:
    /// within the same boot a clock step (NTP on a Pi without a clock) cannot move it.
    #[serde(default)]
    pub deadline_boot_ms: u64,
    #[serde(default)]
    pub boot_id: String,
    pub revert_after_s: u64,
    /// The centre must send `confirm` too (the default for changes to `mqtt.*`).
    pub confirm: bool,
    /// The centre has confirmed (before or after the restart).
    #[serde(default)]
    pub confirmed: bool,
    /// It touches the radio: kept only once the radio runs with it.
    #[serde(default)]
    pub radio: bool,
    /// Starts of the agent with this change.
    pub starts: u32,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

impl Pending {
    fn expired(&self) -> bool {
        if self.deadline_boot_ms > 0 && !self.boot_id.is_empty() && self.boot_id == boot_id() {
            boottime_ms() >= self.deadline_boot_ms
        } else {
            now_ms() >= self.deadline_ms
        }
    }

    /// Stands in for a provisional-change file that cannot be read: undone at once.
    fn unreadable() -> Pending {
        Pending {
            id: Value::Null,
            sha256: String::new(),
            deadline_ms: 0,
            deadline_boot_ms: 0,
            boot_id: String::new(),
            revert_after_s: 0,
            confirm: false,
            confirmed: false,
            radio: false,
            starts: 0,
        }
    }
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
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if written.is_err() {
        // A full disk leaves no half-written file behind.
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Written beside, synced, then renamed over `path`: a power cut leaves the old or the new
/// file, never a torn one.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = beside(path, ".tmp");
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
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
/// state. A `.prev` that is missing or not TOML (a damaged card) is not put back: the centre's
/// changes are dropped and the gateway's own files run, which are known to have run.
fn revert(remote: &Path, pending: &Pending, why: &str) -> std::io::Result<()> {
    let prev = crate::files::read_bounded(&beside(remote, ".prev"), config::MAX_FILE_BYTES)
        .ok()
        .filter(|b| std::str::from_utf8(b).is_ok_and(|t| t.parse::<toml::Table>().is_ok()));
    let why = match &prev {
        Some(_) => why.to_string(),
        None => {
            tracing::error!(file = %beside(remote, ".prev").display(), "ALARM: the previous centre changes are unreadable: all of the centre's changes are dropped, the gateway's own configuration files run");
            format!("{why}; the previous version of the centre's changes was unreadable, so all of them are dropped: the gateway's own configuration files run")
        }
    };
    // Renames and truncation need no free space: the undo works on a full disk (the store
    // shares it, and fills it while the backhaul is down).
    if prev.is_some() {
        std::fs::rename(beside(remote, ".prev"), remote)?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(remote)?
            .sync_all()?;
    }
    match std::fs::remove_file(beside(remote, ".pending")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(remote)?;
    let reverted = Reverted {
        id: pending.id.clone(),
        why,
        at_ms: now_ms(),
    };
    if let Err(e) = write_atomic(
        &beside(remote, ".reverted"),
        &serde_json::to_vec(&reverted).unwrap_or_default(),
    ) {
        // Undone all the same; only the report to the centre is lost.
        tracing::error!(error = %e, why = %reverted.why, "ALARM: a configuration change was undone but the report to the centre could not be written");
    }
    Ok(())
}

/// At start, before the configuration is read: counts this start against a provisional change,
/// and undoes one whose time is up or whose agent keeps failing.
pub fn at_start(remote: &Path) {
    let pending_path = beside(remote, ".pending");
    if !pending_path.exists() {
        return;
    }
    let (mut p, unreadable) = match read_json::<Pending>(&pending_path) {
        Some(p) => (p, false),
        None => (Pending::unreadable(), true),
    };
    p.starts += 1;
    let why = if unreadable {
        Some("the provisional-change file was unreadable (a power cut while it was written?): undone to be safe".to_string())
    } else if p.expired() {
        Some(format!("not proven within {} s", p.revert_after_s))
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
            if let Err(e) = write_atomic(&pending_path, &serde_json::to_vec(&p).unwrap_or_default())
            {
                tracing::error!(error = %e, "counting a start with a provisional configuration change");
            }
        }
    }
}

/// A start whose configuration does not load with the centre's changes although the gateway's
/// own files do (and nothing is provisional): the changes file is set aside as `.broken` so the
/// gateway runs on its own files and reaches the centre. True if it was (the caller restarts).
pub fn set_aside_unloadable(remote: &Path, errors: &str) -> bool {
    let first = errors.lines().next().unwrap_or_default();
    let reverted = Reverted {
        id: Value::Null,
        why: format!(
            "the centre's changes did not load ({first}): set aside as {}, the gateway's own configuration files run",
            beside(remote, ".broken").display()
        ),
        at_ms: now_ms(),
    };
    let done = write_atomic(
        &beside(remote, ".reverted"),
        &serde_json::to_vec(&reverted).unwrap_or_default(),
    )
    .and_then(|_| std::fs::rename(remote, beside(remote, ".broken")))
    .and_then(|_| sync_dir(remote));
    match done {
        Ok(()) => {
            tracing::error!(why = %reverted.why, "ALARM: the centre's configuration changes were set aside");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "ALARM: setting aside the centre's configuration changes failed");
            false
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
    /// A request's `confirm` (asked or not) and `revert_after_s` (or `ops.revert_after`).
    fn options(&self, request: &Value) -> Result<(Option<bool>, Duration), String> {
        let confirm_asked = match &request["confirm"] {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
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
        Ok((confirm_asked, revert_after))
    }

    /// `ops.remote_config`, or why the centre cannot change this gateway's configuration.
    fn remote_file(&self) -> Result<&Path, String> {
        self.remote.as_deref().ok_or_else(|| {
            "this gateway takes no configuration from the centre: ops.remote_config is not set \
             in its configuration file"
                .to_string()
        })
    }

    pub fn apply(&self, request: &Value) -> Result<Value, String> {
        let remote = self.remote_file()?;
        let on_disk = read_json::<Pending>(&beside(remote, ".pending"));
        if let Some(p) = self.pending().or(on_disk) {
            return Err(format!(
                "the change {} is still provisional (until it is proven or undone, at the \
                 latest {} s after it was applied): one change at a time",
                p.id, p.revert_after_s
            ));
        }
        if beside(remote, ".pending").exists() {
            return Err("a provisional change is being settled (its file is unreadable and will be undone at the next start): one change at a time".into());
        }
        // Keys the centre set earlier and now takes back (the gateway's own value, or the
        // default, applies again).
        let unset: Vec<String> = match &request["unset"] {
            Value::Null => Vec::new(),
            Value::Array(a) => a
                .iter()
                .map(|k| {
                    k.as_str()
                        .filter(|k| !k.is_empty() && k.len() <= 128)
                        .map(str::to_string)
                        .ok_or("\"unset\" must be a list of dotted keys, e.g. [\"mqtt.username\"]")
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(
                    "\"unset\" must be a list of dotted keys, e.g. [\"mqtt.username\"]".into(),
                )
            }
        };
        let text = request["config"]
            .as_str()
            .or(if unset.is_empty() { None } else { Some("") })
            .ok_or("\"config\" must be a string: a TOML fragment, e.g. \"[stats]\\ninterval = \\\"30s\\\"\"")?;
        if text.len() as u64 > config::MAX_FILE_BYTES {
            return Err("the fragment is larger than 1 MiB".into());
        }
        let (confirm_asked, revert_after) = self.options(request)?;
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
        if fragment.is_empty() && unset.is_empty() {
            return Err("the fragment changes nothing".into());
        }
        // What would let whoever can publish on `command/ops` do more than configure: run
        // programs (`commands`), replace the pump rules or the key they must be signed with
        // (`rules`), undo the undo (`ops`), or leave the backlog behind (`store.path`).
        let mut refused: Vec<String> = Vec::new();
        let touched = |key: &str| {
            fragment.contains_key(key)
                || unset
                    .iter()
                    .any(|u| u == key || u.starts_with(&format!("{key}.")))
        };
        for (key, why) in [
            ("ops", "decides how changes from the centre are taken and undone"),
            ("commands", "is what the centre may run: only the gateway's own file widens it"),
            ("rules", "names the pump rules and the key they must be signed with (rule files come with apply \"rules\")"),
        ] {
            if touched(key) {
                refused.push(format!("{key}.*: {why}"));
            }
        }
        if fragment.get("store").and_then(|s| s.get("path")).is_some()
            || unset.iter().any(|u| u == "store.path" || u == "store")
        {
            refused.push("store.path: the backlog is there".into());
        }
        // A path names a file on the gateway: from the centre, `password_file` pointed at any
        // readable file would send its first line to any server.
        let mut files = Vec::new();
        collect_file_keys(&fragment, "", &mut files);
        for key in files {
            refused.push(format!(
                "{key}: a file on the gateway is named only on the gateway"
            ));
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
        let touches = |tables: &[&str]| {
            tables.iter().any(|t| fragment.contains_key(*t))
                || unset
                    .iter()
                    .any(|u| tables.iter().any(|t| u.split('.').next() == Some(*t)))
        };
        // Where the gateway publishes (broker, prefix, credentials, identity): only the centre
        // can say it hears the gateway again, so the confirm cannot be waived.
        let reach = touches(&["mqtt", "gateway"]);
        let radio = touches(&["radio", "region"]);
        if reach && confirm_asked == Some(false) {
            return Err("a change to mqtt.* or gateway.* needs the centre's confirm (it may reach a broker or a name the centre does not read): \"confirm\": false is refused".into());
        }
        let confirm = reach || confirm_asked == Some(true);
        let current =
            crate::files::read_bounded(remote, config::MAX_FILE_BYTES).unwrap_or_default();
        let mut merged: toml::Table = String::from_utf8_lossy(&current)
            .parse()
            .map_err(|e| format!("{} is not TOML: {e}", remote.display()))?;
        config::merge(&mut merged, fragment);
        for key in &unset {
            if !remove_key(&mut merged, key) {
                return Err(format!(
                    "{key}: not set by the centre (the gateway's own files set it, or nothing \
                     does): nothing to take back"
                ));
            }
        }
        let new_text = toml::to_string(&merged).map_err(|e| e.to_string())?;
        self.provisional(
            remote,
            request,
            &current,
            new_text,
            confirm,
            radio,
            revert_after,
        )
    }

    /// `rollback` with `"config": true`: the centre's changes as they were before the last one
    /// (`remote.toml.prev`), run as a change of its own — checked, provisional, kept or undone
    /// exactly like an `apply` (a rollback that cuts the gateway off is undone too).
    pub fn rollback(&self, request: &Value) -> Result<Value, String> {
        let remote = self.remote_file()?;
        if self.pending().is_some() || beside(remote, ".pending").exists() {
            return Err("a change is still provisional: one change at a time (it is kept or undone within its revert time)".into());
        }
        let prev = beside(remote, ".prev");
        let before = crate::files::read_bounded(&prev, config::MAX_FILE_BYTES)
            .map_err(|e| format!("no earlier change to go back to ({}: {e})", prev.display()))?;
        let current =
            crate::files::read_bounded(remote, config::MAX_FILE_BYTES).unwrap_or_default();
        let parse = |b: &[u8], what: &Path| -> Result<toml::Table, String> {
            String::from_utf8_lossy(b)
                .parse()
                .map_err(|e| format!("{} is not TOML: {e}", what.display()))
        };
        let (old, now) = (parse(&before, &prev)?, parse(&current, remote)?);
        // The tables that differ say what the rollback touches, as for an apply.
        let differs = |t: &str| old.get(t) != now.get(t);
        let (confirm_asked, revert_after) = self.options(request)?;
        let reach = differs("mqtt") || differs("gateway");
        let radio = differs("radio") || differs("region");
        let confirm = reach || confirm_asked == Some(true);
        if reach && confirm_asked == Some(false) {
            return Err("a rollback that changes mqtt.* or gateway.* needs the centre's confirm: \"confirm\": false is refused".into());
        }
        let new_text = toml::to_string(&old).map_err(|e| e.to_string())?;
        self.provisional(
            remote,
            request,
            &current,
            new_text,
            confirm,
            radio,
            revert_after,
        )
    }

    /// Checks `new_text` in place of `remote` with every configuration file, writes `.prev`
    /// (`current`) and `.pending`, puts it in place and restarts the agent with it.
    #[allow(clippy::too_many_arguments)]
    fn provisional(
        &self,
        remote: &Path,
        request: &Value,
        current: &[u8],
        new_text: String,
        confirm: bool,
        radio: bool,
        revert_after: Duration,
    ) -> Result<Value, String> {
        if new_text.as_bytes() == current {
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
        files.retain(|f| f.as_path() != remote);
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
        // A backhaul change can reach a broker the centre does not read (another broker, a
        // prefix the ACL refuses): only the centre can say it hears the gateway again.
        let pending = Pending {
            id: request["id"].clone(),
            sha256: sha.clone(),
            deadline_ms: now_ms() + revert_after.as_millis() as u64,
            deadline_boot_ms: boottime_ms() + revert_after.as_millis() as u64,
            boot_id: boot_id(),
            revert_after_s: revert_after.as_secs(),
            confirm,
            confirmed: false,
            radio,
            starts: 0,
        };
        let placed = write_atomic(&beside(remote, ".prev"), current)
            .and_then(|_| {
                write_atomic(
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
        // Until the restart, this process holds it too: a second apply is refused, a confirm
        // is kept for the next run.
        if let Ok(mut g) = self.pending.lock() {
            *g = Some(pending.clone());
        }
        super::restart::request("a configuration change from the centre");
        Ok(json!({
            "sha256": sha,
            "provisional": true,
            "restarting": true,
            "revert_after_s": revert_after.as_secs(),
            "confirm_needed": confirm,
            "radio_must_run": pending.radio,
            "note": "the agent restarts with it; it is kept once the backhaul has been up with it for 10 s with its publishes acknowledged (and the radio runs, if it changed) and, when confirm_needed, the centre sent confirm; else undone; the outcome comes on event/ops with this id",
        }))
    }

    /// `confirm`: the centre keeps the provisional change it names (`"change"`: the id of its
    /// apply; kept in its file: a confirm before the restart counts after it).
    pub fn confirm(&self, request: &Value) -> Result<Value, String> {
        let (Some(remote), Some(mut p)) = (self.remote.as_deref(), self.pending()) else {
            return Err("nothing to confirm: no configuration change is provisional".into());
        };
        // Naming the change ties the confirm to whoever applied it: a stale confirm, or one
        // from whoever runs the broker the change led to, does not know it.
        if request["change"] != p.id || p.id.is_null() {
            return Err(
                "confirm must name the change it keeps: \"change\": the id of its apply".into(),
            );
        }
        self.confirmed.store(true, Ordering::Relaxed);
        p.confirmed = true;
        if let Err(e) = write_atomic(
            &beside(remote, ".pending"),
            &serde_json::to_vec(&p).unwrap_or_default(),
        ) {
            tracing::warn!(error = %e, "keeping the centre's confirmation on disk");
        }
        if let Ok(mut g) = self.pending.lock() {
            *g = Some(p.clone());
        }
        Ok(json!({"confirmed": p.id, "sha256": p.sha256}))
    }

    /// Watches the provisional change, if any: kept once the backhaul is up with it (and
    /// confirmed when asked), undone at its deadline.
    pub async fn watch(self: Arc<Self>, counters: Arc<Counters>, events: SyncSender<Event>) {
        let (Some(remote), Some(p)) = (self.remote.clone(), self.pending()) else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Since when the session has been up, and the PUBACKs counted then.
        let mut up_since: Option<(std::time::Instant, u64, u64)> = None;
        loop {
            tick.tick().await;
            let up = counters.backhaul_up.load(Ordering::Relaxed);
            let (acks, outages) = (
                Counters::get(&counters.pubacks),
                Counters::get(&counters.outages),
            );
            up_since = match up_since {
                Some((t, a, o)) if up && o == outages => Some((t, a, o)),
                _ if up => Some((std::time::Instant::now(), acks, outages)),
                _ => None,
            };
            let stable = up_since.is_some_and(|(t, a, _)| t.elapsed() >= STABLE_FOR && acks > a);
            let confirmed = !p.confirm || p.confirmed || self.confirmed.load(Ordering::Relaxed);
            let radio_ok =
                !p.radio || counters.radio_status().state == crate::ops::counters::RadioState::Up;
            if stable && confirmed && radio_ok {
                let _ = std::fs::remove_file(beside(&remote, ".pending"));
                let _ = sync_dir(&remote);
                if let Ok(mut g) = self.pending.lock() {
                    *g = None;
                }
                tracing::info!(id = %p.id, sha256 = %p.sha256, "configuration change from the centre kept");
                let how = match (p.confirm, p.radio) {
                    (true, _) => "backhaul up with it and confirmed by the centre",
                    (false, true) => {
                        "backhaul up with it, its publishes acknowledged, and the radio runs"
                    }
                    (false, false) => "backhaul up with it, its publishes acknowledged",
                };
                let answer = json!({
                    "id": p.id, "op": "apply", "ok": true,
                    "result": {"kept": true, "sha256": p.sha256, "how": how},
                });
                let _ = events.send(Event {
                    at: SystemTime::now(),
                    body: Body::Ops(answer),
                });
                return;
            }
            if p.expired() {
                let why = if !up {
                    format!(
                        "the backhaul session was not up with it within {} s",
                        p.revert_after_s
                    )
                } else if !stable {
                    format!(
                        "the backhaul did not stay up with its publishes acknowledged for {} s within {} s",
                        STABLE_FOR.as_secs(),
                        p.revert_after_s
                    )
                } else if !radio_ok {
                    format!(
                        "the radio did not run with it within {} s",
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
                        return;
                    }
                    // Tried again at the next look (a full disk frees up, a card comes back).
                    Err(e) => {
                        tracing::error!(error = %e, "ALARM: undoing a configuration change from the centre failed; trying again")
                    }
                }
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

/// The dotted keys of a fragment that name files (`…_file`, `simulator`, devices).
fn collect_file_keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => collect_file_keys(inner, &key, out),
            _ if k.ends_with("_file")
                || k == "simulator"
                || k == "spi_path"
                || k == "gpio_chip" =>
            {
                out.push(key)
            }
            _ => {}
        }
    }
}

/// Removes a dotted key (and the tables it leaves empty); false if it was not there.
fn remove_key(table: &mut toml::Table, key: &str) -> bool {
    match key.split_once('.') {
        None => table.remove(key).is_some(),
        Some((head, rest)) => {
            let Some(toml::Value::Table(inner)) = table.get_mut(head) else {
                return false;
            };
            let removed = remove_key(inner, rest);
            if inner.is_empty() {
                table.remove(head);
            }
            removed
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
            starts,
            ..Pending::unreadable()
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

    fn control(dir: &Path) -> (ConfigControl, PathBuf) {
        let base = dir.join("agent.toml");
        std::fs::write(
            &base,
            "[gateway]\nid = \"0016c001ff10a235\"\n[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\n[store]\npath = \"store\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("sim.toml"), "").unwrap();
        let remote = dir.join("remote.toml");
        let cfg: config::Config = toml::from_str(&format!(
            "[ops]\nremote_config = {:?}\n",
            remote.display().to_string()
        ))
        .unwrap();
        (
            ConfigControl::new(vec![base], vec![], Some(Linked::Simulator), &cfg),
            remote,
        )
    }

    #[test]
    fn a_second_apply_before_the_first_is_settled_is_refused_and_a_confirm_before_the_restart_counts(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (c, remote) = control(dir.path());
        let a = c
            .apply(&json!({"id": "bad-1", "op": "apply", "config": "[mqtt]\nserver = \"tcp://127.0.0.1:1\"\n"}))
            .unwrap();
        assert_eq!(
            a["confirm_needed"], true,
            "a backhaul change needs the centre's word: {a}"
        );
        let e = c
            .apply(&json!({"id": "ok-2", "op": "apply", "config": "[stats]\ninterval = \"7s\"\n"}))
            .unwrap_err();
        assert!(e.contains("still provisional"), "{e}");
        // The previous version is the one that ran, not the unproven change.
        assert_eq!(
            std::fs::read_to_string(beside(&remote, ".prev")).unwrap(),
            ""
        );
        assert!(c
            .confirm(&json!({"op": "confirm"}))
            .unwrap_err()
            .contains("must name the change"));
        c.confirm(&json!({"op": "confirm", "change": "bad-1"}))
            .unwrap();
        let p: Pending = read_json(&beside(&remote, ".pending")).unwrap();
        assert!(p.confirmed && p.id == json!("bad-1"));
        // A fresh process (the restart) refuses a new apply too, from the file.
        let (c2, _) = control(dir.path());
        assert!(c2
            .apply(&json!({"id": "ok-3", "op": "apply", "config": "[stats]\ninterval = \"8s\"\n"}))
            .unwrap_err()
            .contains("still provisional"));
    }

    /// A kept change rolled back: the centre's changes as they were before it, through the
    /// same provisional path (a rollback that touches the backhaul needs the confirm too).
    #[test]
    fn a_kept_change_is_rolled_back_as_a_provisional_change_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (c, remote) = control(dir.path());
        assert!(c
            .rollback(&json!({"id": "r0", "op": "rollback", "config": true}))
            .unwrap_err()
            .contains("no earlier change"));
        c.apply(&json!({"id": "a1", "op": "apply", "config": "[stats]\ninterval = \"7s\"\n"}))
            .unwrap();
        assert!(c
            .rollback(&json!({"id": "r1", "op": "rollback", "config": true}))
            .unwrap_err()
            .contains("still provisional"));
        // Kept (what `watch` does once proven), in a fresh process.
        std::fs::remove_file(beside(&remote, ".pending")).unwrap();
        let (c, _) = control(dir.path());
        c.apply(&json!({"id": "a2", "op": "apply", "config": "[mqtt]\nkeep_alive = \"20s\"\n"}))
            .unwrap();
        std::fs::remove_file(beside(&remote, ".pending")).unwrap();
        let (c, _) = control(dir.path());
        let with_both = std::fs::read_to_string(&remote).unwrap();
        assert!(with_both.contains("keep_alive") && with_both.contains("interval"));
        let e = c
            .rollback(&json!({"id": "r2", "op": "rollback", "config": true, "confirm": false}))
            .unwrap_err();
        assert!(e.contains("confirm"), "{e}");
        // Its options are read as an apply's.
        for bad in [json!({"revert_after_s": 5}), json!({"confirm": "yes"})] {
            let mut r = json!({"id": "r-bad", "op": "rollback", "config": true});
            r.as_object_mut()
                .unwrap()
                .extend(bad.as_object().unwrap().clone());
            assert!(c.rollback(&r).is_err(), "{r}");
        }
        let a = c
            .rollback(&json!({"id": "r3", "op": "rollback", "config": true, "revert_after_s": 60}))
            .unwrap();
        assert_eq!(a["revert_after_s"], 60, "{a}");
        assert_eq!(a["confirm_needed"], true, "it changes mqtt.*: {a}");
        let back = std::fs::read_to_string(&remote).unwrap();
        assert!(
            back.contains("interval") && !back.contains("keep_alive"),
            "{back}"
        );
        let p: Pending = read_json(&beside(&remote, ".pending")).unwrap();
        assert_eq!(p.id, json!("r3"));
        // And its own .prev is the state it replaced: undoing the rollback restores both.
        assert_eq!(
            std::fs::read_to_string(beside(&remote, ".prev")).unwrap(),
            with_both
        );
    }

    #[test]
    fn a_damaged_prev_or_pending_never_keeps_an_unproven_change_nor_bricks_the_start() {
        // `.prev` damaged: the centre's changes are dropped, not garbage put in place.
        let (_d, remote) = setup(&pending(now_ms() - 1, 0));
        std::fs::write(beside(&remote, ".prev"), "[mqtt").unwrap();
        at_start(&remote);
        assert_eq!(std::fs::read_to_string(&remote).unwrap(), "");
        let r: Reverted = read_json(&beside(&remote, ".reverted")).unwrap();
        assert!(r.why.contains("all of them are dropped"), "{}", r.why);
        // `.pending` torn by a power cut: the change is undone, not kept.
        let (_d, remote) = setup(&pending(now_ms() + 60_000, 0));
        std::fs::write(beside(&remote, ".pending"), "").unwrap();
        at_start(&remote);
        assert_eq!(std::fs::read_to_string(&remote).unwrap(), "");
        assert!(!beside(&remote, ".pending").exists());
    }

    #[test]
    fn the_centre_takes_back_a_key_it_set_and_only_such_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let (c, remote) = control(dir.path());
        std::fs::write(&remote, "[stats]\ninterval = \"7s\"\n").unwrap();
        let e = c
            .apply(&json!({"id": "u0", "op": "apply", "unset": ["mqtt.username"]}))
            .unwrap_err();
        assert!(e.contains("not set by the centre"), "{e}");
        assert!(c
            .apply(&json!({"id": "u1", "op": "apply", "unset": ["rules.public_key"]}))
            .unwrap_err()
            .contains("changed only on the gateway"));
        c.apply(&json!({"id": "u2", "op": "apply", "unset": ["stats.interval"]}))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&remote).unwrap(), "");
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
