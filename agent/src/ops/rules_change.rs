//! Changing the pump-safety rules of a running gateway: reload from disk (SIGHUP, or the
//! centre's `reload`), apply a rule file sent by the centre (`apply`, signed when
//! `rules.public_key` is set), roll back to the previous one (`rollback`).
//!
//! Every way validates with the same code as `lora-edge check` (`rules::load`: every problem
//! with its file and line), and the running stage takes the new file only if it has the same
//! shape (`Engine::reload`): pumps keep their state, latches and leases, and a changed
//! threshold takes effect at the next scan. A file that fails either way changes nothing.
//!
//! On disk, `apply` and `rollback` first write the new file as `<rule file>.new` and the
//! running one as `<rule file>.prev.new` (fsynced: a full disk stops the change here, before
//! anything runs), check the new one, have the stage run it, then rename both into place:
//! renames need no space, so the file on disk is the one running, and `.prev` is always a file
//! that ran. The rule file's directory must be writable by the service (the package's
//! /etc/lora-edge is not: README).
//!
//! With `rules.public_key`, a rule file from the centre is taken only with an Ed25519 signature
//! over `lora-edge rules\n<gateway id>\n<serial>\n` followed by the file's bytes, `serial`
//! greater than the last one taken (kept in the store): a signature binds one gateway and cannot
//! be replayed. `rollback` from the centre is then refused (it would run a file nobody signed
//! for now): the centre applies the previous file, signed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::RulesConfig;
use crate::rules::{self, Input};
use crate::store::Queue;

/// How long the rules stage may take to answer (it answers between two frames).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The store state key of the last serial a signed rule file was taken with.
const SERIAL_KEY: &str = "rules/serial";

pub struct RulesControl {
    pub cfg: RulesConfig,
    pub gateway_id: String,
    /// Ed25519 public key a rule file sent by the centre must be signed with; None: unsigned
    /// files are accepted.
    pub public_key: Option<Vec<u8>>,
    pub stage: SyncSender<Input>,
    pub queue: Arc<Queue>,
    /// The text of the rule file the stage runs (`running_text` at start).
    pub running: Mutex<Vec<u8>>,
}

fn with(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What a signature covers: the gateway, the serial, the file's bytes.
pub fn signed_message(gateway_id: &str, serial: u64, text: &[u8]) -> Vec<u8> {
    let mut m = format!("lora-edge rules\n{gateway_id}\n{serial}\n").into_bytes();
    m.extend_from_slice(text);
    m
}

impl RulesControl {
    /// The text the stage runs now.
    pub fn running_text(&self) -> Vec<u8> {
        self.running.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The rule file on disk, in place of the running one. Returns the new sha256.
    pub fn reload(&self) -> Result<String, String> {
        let text = crate::files::read_bounded(&self.cfg.file, crate::config::MAX_FILE_BYTES)
            .map_err(|e| format!("{}: {e}", self.cfg.file.display()))?;
        let loaded = rules::load(&self.cfg).map_err(|e| e.join("; "))?;
        let before = self.running_text();
        let sha = self.run(loaded.rules)?;
        // The file that ran until now stays at hand for a rollback (best effort: the new
        // rules run whatever happens to this copy).
        if before != text {
            let prev = with(&self.cfg.file, ".prev");
            let tmp = with(&self.cfg.file, ".prev.new");
            if let Err(e) = write_synced(&tmp, &before).and_then(|_| std::fs::rename(&tmp, &prev)) {
                tracing::warn!(error = %e, path = %prev.display(), "rules: the previous rule file could not be kept for a rollback");
            }
        }
        self.set_running(text);
        Ok(sha)
    }

    /// Reads the keys file again and has the stage take its sessions (`Stage::rekey`).
    pub fn rekey(&self) -> Result<String, String> {
        let sessions = rules::lorawan::load_keys(&self.cfg.keys_file).map_err(|e| e.join("; "))?;
        let (tx, rx) = sync_channel(1);
        self.stage
            .send(Input::Keys(sessions, tx))
            .map_err(|_| "the rules stage is not running".to_string())?;
        rx.recv_timeout(ANSWER_WITHIN)
            .map_err(|_| "the rules stage did not answer".to_string())?
    }

    /// A rule file's text from the centre.
    pub fn apply(
        &self,
        text: &str,
        signature: Option<&str>,
        serial: Option<u64>,
    ) -> Result<String, String> {
        let taken_serial = match &self.public_key {
            Some(key) => Some(self.verify(key, text.as_bytes(), signature, serial)?),
            None => None,
        };
        let sha = self.install(text.as_bytes())?;
        if let Some(s) = taken_serial {
            if let Err(e) = self.queue.state_put(SERIAL_KEY, s.to_string().as_bytes()) {
                tracing::error!(error = %e, "rules: the serial of the signed rule file could not be kept");
            }
        }
        Ok(sha)
    }

    /// The previous rule file (`<rule file>.prev`, one that ran) in place of the running one.
    pub fn rollback(&self) -> Result<String, String> {
        if self.public_key.is_some() {
            return Err(
                "this gateway takes only signed rule files (rules.public_key): a rollback would \
                 run a file nobody signed for now; apply the previous file, signed"
                    .into(),
            );
        }
        let prev = with(&self.cfg.file, ".prev");
        let text = std::fs::read(&prev).map_err(|e| {
            format!(
                "no previous rule file to go back to ({}: {e})",
                prev.display()
            )
        })?;
        self.install(&text)
    }

    fn verify(
        &self,
        key: &[u8],
        text: &[u8],
        signature: Option<&str>,
        serial: Option<u64>,
    ) -> Result<u64, String> {
        let sig = signature.ok_or(
            "this gateway accepts only signed rule files (rules.public_key): \"signature\" \
             (base64 Ed25519) is missing",
        )?;
        let serial = serial.ok_or(
            "a signed rule file needs \"serial\", a number greater than the last one this \
             gateway took",
        )?;
        let last: u64 = self
            .queue
            .state_get(SERIAL_KEY)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if serial <= last {
            return Err(format!(
                "serial {serial} is not greater than {last}, the last one taken: a replayed or \
                 stale rule file is refused"
            ));
        }
        let sig = base64_decode(sig).ok_or("\"signature\" is not base64")?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&signed_message(&self.gateway_id, serial, text), &sig)
            .map_err(|_| {
                "the signature does not match (gateway, serial and rule file) under \
                 rules.public_key: refused"
                    .to_string()
            })?;
        Ok(serial)
    }

    /// Writes, checks, runs, then puts in place `text`; the running file becomes `.prev`.
    fn install(&self, text: &[u8]) -> Result<String, String> {
        let file = &self.cfg.file;
        let new = with(file, ".new");
        let prev_new = with(file, ".prev.new");
        let running = self.running_text();
        let cleanup = || {
            let _ = std::fs::remove_file(&new);
            let _ = std::fs::remove_file(&prev_new);
        };
        if let Err(e) = write_synced(&new, text).and_then(|_| write_synced(&prev_new, &running)) {
            cleanup();
            return Err(format!(
                "nothing changed: {e} writing beside {} (a full disk, or a directory the service \
                 cannot write: README)",
                file.display()
            ));
        }
        let checked = RulesConfig {
            file: new.clone(),
            ..self.cfg.clone()
        };
        let sha = match rules::load(&checked)
            .map_err(|e| e.join("; "))
            .and_then(|loaded| self.run(loaded.rules))
        {
            Ok(sha) => sha,
            Err(why) => {
                cleanup();
                return Err(why);
            }
        };
        self.set_running(text.to_vec());
        // Renames take no space: only an unlikely I/O error stops them.
        let placed = std::fs::rename(&prev_new, with(file, ".prev"))
            .and_then(|_| std::fs::rename(&new, file))
            .and_then(|_| match file.parent() {
                Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            });
        if let Err(e) = placed {
            tracing::error!(error = %e, file = %file.display(), "ALARM: the new rules run but could not be put in place of the rule file; a restart would run the old one");
            return Err(format!(
                "ALARM: the new rules run (sha256 {sha}) but could not be put in place of {}: {e}",
                file.display()
            ));
        }
        Ok(sha)
    }

    fn set_running(&self, text: Vec<u8>) {
        if let Ok(mut r) = self.running.lock() {
            *r = text;
        }
    }

    /// Has the stage run `rules`; its answer.
    fn run(&self, rules: rules::file::RuleSet) -> Result<String, String> {
        let (tx, rx) = sync_channel(1);
        self.stage
            .send(Input::Reload(Box::new(rules), tx))
            .map_err(|_| "the rules stage is not running".to_string())?;
        rx.recv_timeout(ANSWER_WITHIN)
            .map_err(|_| "the rules stage did not answer".to_string())?
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Standard base64, with or without padding (as `openssl base64 -A` writes it, or not).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim().trim_end_matches('='))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_openssl_writes_it() {
        assert_eq!(base64_decode("TG9pcmU=").unwrap(), b"Loire");
        assert_eq!(base64_decode("TG9pcmU").unwrap(), b"Loire");
        assert_eq!(base64_decode("Q2hlcg==").unwrap(), b"Cher");
        assert_eq!(base64_decode("not base64!"), None);
    }

    #[test]
    fn a_signature_binds_the_gateway_and_the_serial() {
        let a = signed_message("0016c001ff10a235", 7, b"version = 1\n");
        assert_eq!(a, b"lora-edge rules\n0016c001ff10a235\n7\nversion = 1\n");
        assert_ne!(a, signed_message("0016c001ff10a236", 7, b"version = 1\n"));
        assert_ne!(a, signed_message("0016c001ff10a235", 8, b"version = 1\n"));
    }
}
