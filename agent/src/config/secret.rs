//! Files holding secrets (the MQTT password, TLS and LoRaWAN keys): who may read them, and
//! reading them without ever putting their content in a message.
//!
//! A secret file may be read by its owner, and by its group only when that group is the agent's
//! own (the process's effective group, or the `lora-edge` group the package creates): the
//! packages install them `0640 root:lora-edge`. Read by anyone else, it is refused, with the
//! command that fixes it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The group the packaged service runs as.
pub const SERVICE_GROUP: &str = "lora-edge";

/// Refuses a secret file others can read. `Err` is a complete sentence naming the file.
pub fn check_mode(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(format!(
            "{} is readable by every user (mode {mode:04o}): it holds a secret; \
             fix: chmod o-rwx {}",
            path.display(),
            path.display()
        ));
    }
    if mode & 0o040 != 0 && !own_group(meta.gid()) {
        return Err(format!(
            "{} is readable by group {} (mode {mode:04o}), which is not the agent's: \
             fix: chmod g-rwx {} (or chgrp {SERVICE_GROUP} {})",
            path.display(),
            group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string()),
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

fn own_group(gid: u32) -> bool {
    gid == nix::unistd::getegid().as_raw() || group_name(gid).as_deref() == Some(SERVICE_GROUP)
}

fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// Reads a secret file after `check_mode`, at most 64 KiB.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    check_mode(path)?;
    let bytes = crate::files::read_bounded(path, 64 * 1024)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > 64 * 1024 {
        return Err(format!(
            "{}: {} bytes, more than a secret file holds (64 KiB at most)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The password in a password file: its first line, without the line end.
pub fn read_password(path: &Path) -> Result<String, String> {
    let bytes = read(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{}: the password is not UTF-8 text", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!(
            "{}: the first line (the password) is empty",
            path.display()
        ));
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, mode: u32, text: &str) -> std::path::PathBuf {
        let p = dir.join("secret");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_world_readable_secret_is_refused_with_the_fix_and_without_its_content() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), 0o644, "hunter2\n");
        let e = read_password(&p).unwrap_err();
        assert!(e.contains("readable by every user (mode 0644)"), "{e}");
        assert!(e.contains(&format!("chmod o-rwx {}", p.display())), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn owner_only_and_own_group_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), 0o600, "hunter2\nignored\n");
        assert_eq!(read_password(&p).unwrap(), "hunter2");
        // The file's group is the process's own here (it created it).
        let p = file(d.path(), 0o640, "hunter2");
        assert_eq!(read_password(&p).unwrap(), "hunter2");
    }

    #[test]
    fn a_foreign_group_may_not_read() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), 0o640, "x");
        // A group that is neither the process's nor lora-edge's: only root can give it away.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let foreign = (1..65_000u32)
            .find(|g| !own_group(*g) && group_name(*g).is_some())
            .expect("some other group");
        nix::unistd::chown(&p, None, Some(nix::unistd::Gid::from_raw(foreign))).unwrap();
        let e = check_mode(&p).unwrap_err();
        assert!(e.contains("which is not the agent's"), "{e}");
        assert!(e.contains("chmod g-rwx"), "{e}");
    }

    #[test]
    fn an_empty_password_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), 0o600, "\n");
        assert!(read_password(&p).unwrap_err().contains("is empty"));
    }
}
