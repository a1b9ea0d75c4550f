//! The agent restarting itself (a configuration change from the centre, or its undo): the same
//! shutdown as SIGTERM (radio stopped, store drained and closed, OFFLINE said), then the process
//! replaces itself with a fresh run of the same binary and arguments. The PID stays, so systemd's
//! supervision (watchdog, notify socket) carries over; the new run reads the files again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static REQUESTED: AtomicBool = AtomicBool::new(false);

fn notify() -> &'static tokio::sync::Notify {
    static N: OnceLock<tokio::sync::Notify> = OnceLock::new();
    N.get_or_init(tokio::sync::Notify::new)
}

/// Asks for a restart: the agent shuts down as for SIGTERM, then runs again.
pub fn request(why: &str) {
    tracing::info!(why, "restart requested");
    REQUESTED.store(true, Ordering::SeqCst);
    notify().notify_one();
}

pub fn is_requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Resolves once a restart is requested.
pub async fn requested() {
    while !is_requested() {
        notify().notified().await;
    }
}

/// Runs the binary again in this process; returns only if that failed (the caller exits so
/// that the service manager restarts it).
pub fn exec_self() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    // stdout and stderr were pointed at the library's terminals: give the new run the originals.
    crate::radio::library_output::restore_std_fds();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        .map(std::ffi::OsString::from)
        .or_else(|| args.first().cloned())
        .unwrap_or_else(|| "lora-edge".into());
    std::process::Command::new(exe)
        .args(&args[1.min(args.len())..])
        .exec()
}
