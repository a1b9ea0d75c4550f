//! Changing the pump-safety rules of a running gateway: reload from disk (SIGHUP, or the
//! centre's `reload`), apply a rule file sent by the centre (`apply`, signed when
//! `rules.public_key` is set), roll back to the previous one (`rollback`).
//!
//! Every way validates with the same code as `lora-edge check` (`rules::load`: every problem
//! with its file and line), and the running stage takes the new file only if it has the same
//! shape (`Engine::reload`): pumps keep their state, latches and leases, and a changed
//! threshold takes effect at the next scan. A file that fails either way changes nothing.
//!
//! On disk, `apply` writes `<rule file>.new`, checks it, has the stage run it, then keeps the
//! running file as `<rule file>.prev` and renames the new one into place (each step fsynced):
//! the file on disk is the one running. The rule file's directory must be writable by the
//! service for `apply` and `rollback` (the package's /etc/lora-edge is not: README).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

use crate::config::RulesConfig;
use crate::rules::{self, Input};

/// How long the rules stage may take to answer (it answers between two frames).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

pub struct RulesControl {
    pub cfg: RulesConfig,
    /// Ed25519 public key a rule file sent by the centre must be signed with; None: unsigned
    /// files are accepted.
    pub public_key: Option<Vec<u8>>,
    pub stage: SyncSender<Input>,
}

fn with(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl RulesControl {
    /// The rule file on disk, in place of the running one. Returns the new sha256.
    pub fn reload(&self) -> Result<String, String> {
        let loaded = rules::load(&self.cfg).map_err(|e| e.join("; "))?;
        self.run(loaded.rules)
    }

    /// A rule file's text from the centre: signature, validation, the stage, then the disk.
    pub fn apply(&self, text: &str, signature: Option<&str>) -> Result<String, String> {
        if let Some(key) = &self.public_key {
            let sig = signature.ok_or(
                "this gateway accepts only signed rule files (rules.public_key): \"signature\" \
                 (base64 Ed25519 over the file's bytes) is missing",
            )?;
            let sig = base64_decode(sig).ok_or("\"signature\" is not base64")?;
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
                .verify(text.as_bytes(), &sig)
                .map_err(|_| {
                    "the signature does not match the rule file and rules.public_key: refused"
                        .to_string()
                })?;
        }
        let new = with(&self.cfg.file, ".new");
        write_synced(&new, text.as_bytes()).map_err(|e| {
            format!(
                "{}: {e} (the rule file's directory must be writable by the service to apply a \
                 rule file from the centre)",
                new.display()
            )
        })?;
        let checked = RulesConfig {
            file: new.clone(),
            ..self.cfg.clone()
        };
        let outcome = rules::load(&checked)
            .map_err(|e| e.join("; "))
            .and_then(|loaded| self.run(loaded.rules));
        let sha = match outcome {
            Ok(sha) => sha,
            Err(why) => {
                let _ = std::fs::remove_file(&new);
                return Err(why);
            }
        };
        self.swap_in(&new)?;
        Ok(sha)
    }

    /// The previous rule file (`<rule file>.prev`) in place of the running one.
    pub fn rollback(&self) -> Result<String, String> {
        let prev = with(&self.cfg.file, ".prev");
        if !prev.is_file() {
            return Err(format!(
                "no previous rule file ({} does not exist)",
                prev.display()
            ));
        }
        let checked = RulesConfig {
            file: prev.clone(),
            ..self.cfg.clone()
        };
        let loaded = rules::load(&checked).map_err(|e| e.join("; "))?;
        let sha = self.run(loaded.rules)?;
        // The two swap places: a second rollback undoes the first.
        let tmp = with(&self.cfg.file, ".rollback");
        std::fs::copy(&prev, &tmp)
            .and_then(|_| sync_file(&tmp))
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        self.swap_in(&tmp)?;
        Ok(sha)
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

    /// `new` becomes the rule file; the one it replaces is kept as `.prev`.
    fn swap_in(&self, new: &Path) -> Result<(), String> {
        let file = &self.cfg.file;
        let prev = with(file, ".prev");
        let fail = |e: std::io::Error| {
            format!(
                "ALARM: the new rules run but could not be written as {}: {e}; the file on disk \
                 is the old one",
                file.display()
            )
        };
        if file.exists() {
            std::fs::copy(file, &prev).map_err(fail)?;
            sync_file(&prev).map_err(fail)?;
        }
        std::fs::rename(new, file).map_err(fail)?;
        if let Some(dir) = file.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
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
}
