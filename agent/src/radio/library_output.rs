//! libloragw's own output, brought into the agent's log.
//!
//! The library reports on stdout (`printf`), not through its return codes: why `lgw_start`
//! failed, each failed counter read, a line per `lgw_receive` with frames. Left alone, under
//! systemd that output arrives in 4 KiB bursts, untimestamped, out of order with the agent's
//! log. Here stdout is a pseudo-terminal (so the C library line-buffers it, as it does on a
//! terminal) read by a thread that logs each line with target `libloragw`: `ERROR…` lines at
//! error, `WARNING…` at warn, the rest (`INFO:` chatter) at debug. A line repeated is logged
//! once, then counted, with a count line at most every 10 s and when another line comes.
//! stderr is left as it is (the agent's own log goes there).

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const REPEAT_REPORT: Duration = Duration::from_secs(10);

/// Points the process's stdout at a pseudo-terminal read by a logging thread.
pub fn capture() -> std::io::Result<JoinHandle<()>> {
    let pty = nix::pty::openpty(None, None)?;
    nix::unistd::dup2_stdout(&pty.slave)?;
    drop(pty.slave);
    std::thread::Builder::new()
        .name("libloragw-out".into())
        .spawn(move || read_lines(pty.master))
}

fn read_lines(master: OwnedFd) {
    let mut lines = BufReader::new(std::fs::File::from(master));
    let mut repeats = Repeats::default();
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // EIO once every writer is gone: the process is exiting.
        match lines.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end_matches(['\n', '\r']).trim();
        if !line.is_empty() {
            repeats.line(line, Instant::now());
        }
    }
    repeats.flush();
}

#[derive(Default)]
struct Repeats {
    last: String,
    count: u64,
    reported_at: Option<Instant>,
}

impl Repeats {
    fn line(&mut self, line: &str, now: Instant) {
        if line == self.last {
            self.count += 1;
            if self
                .reported_at
                .is_none_or(|t| now.duration_since(t) >= REPEAT_REPORT)
            {
                self.flush();
                self.reported_at = Some(now);
            }
            return;
        }
        self.flush();
        self.last = line.to_string();
        self.reported_at = Some(now);
        emit(line, None);
    }

    fn flush(&mut self) {
        if self.count > 0 {
            emit(&self.last, Some(self.count));
            self.count = 0;
        }
    }
}

fn emit(line: &str, repeated: Option<u64>) {
    let level = if line.starts_with("ERROR") {
        tracing::Level::ERROR
    } else if line.starts_with("WARN") {
        tracing::Level::WARN
    } else {
        tracing::Level::DEBUG
    };
    macro_rules! at {
        ($lvl:expr) => {
            match repeated {
                Some(n) => tracing::event!(target: "libloragw", $lvl, repeated = n, "{line}"),
                None => tracing::event!(target: "libloragw", $lvl, "{line}"),
            }
        };
    }
    match level {
        tracing::Level::ERROR => at!(tracing::Level::ERROR),
        tracing::Level::WARN => at!(tracing::Level::WARN),
        _ => at!(tracing::Level::DEBUG),
    }
}
