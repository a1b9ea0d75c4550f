//! libloragw's own output, brought into the agent's log.
//!
//! The library reports on stdout (`printf`), not through its return codes: why `lgw_start`
//! failed, each failed counter read, a line per `lgw_receive` with frames. Left alone, under
//! systemd that output arrives in 4 KiB bursts, untimestamped, out of order with the agent's
//! log. Here stdout is a pseudo-terminal (so the C library line-buffers it, as it does on a
//! terminal) read by a thread that logs each line with target `libloragw`: `ERROR…` lines at
//! error, `WARNING…` at warn, the rest (`INFO:` chatter) at debug. stderr (the library's
//! `fprintf(stderr)` debug output, and anything else written there, a panic message included)
//! goes the same way with target `stderr`, at warn or error, while the agent's own log is
//! written to the original stderr (`LogWriter`). A line repeated is logged once, then counted,
//! with a count line at most every 10 s and when another line comes.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REPEAT_REPORT: Duration = Duration::from_secs(10);

/// The process's stderr as it was before `capture`: where the agent's own log goes.
static LOG_OUT: OnceLock<std::fs::File> = OnceLock::new();

/// The agent's log output: the original stderr, whether or not fd 2 was captured since.
#[derive(Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG_OUT.get() {
            Some(mut f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match LOG_OUT.get() {
            Some(mut f) => f.flush(),
            None => std::io::stderr().flush(),
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Points the process's stdout and stderr at pseudo-terminals read by logging threads; the
/// agent's log keeps the original stderr.
pub fn capture() -> std::io::Result<()> {
    let original = nix::unistd::dup(std::io::stderr())?;
    let _ = LOG_OUT.set(std::fs::File::from(original));
    // A panic message written to fd 2 now would reach the log through a thread that may not
    // get to run before the process ends: log it directly.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(target: "panic", "{info}");
    }));
    for stream in [Stream::Stdout, Stream::Stderr] {
        let pty = nix::pty::openpty(None, None)?;
        match stream {
            Stream::Stdout => nix::unistd::dup2_stdout(&pty.slave)?,
            Stream::Stderr => nix::unistd::dup2_stderr(&pty.slave)?,
        }
        drop(pty.slave);
        std::thread::Builder::new()
            .name("libloragw-out".into())
            .spawn(move || read_lines(pty.master, stream))?;
    }
    Ok(())
}

fn read_lines(master: OwnedFd, stream: Stream) {
    let mut lines = BufReader::new(std::fs::File::from(master));
    let mut repeats = Repeats {
        stream,
        last: String::new(),
        count: 0,
        reported_at: None,
    };
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

struct Repeats {
    stream: Stream,
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
        emit(self.stream, line, None);
    }

    fn flush(&mut self) {
        if self.count > 0 {
            emit(self.stream, &self.last, Some(self.count));
            self.count = 0;
        }
    }
}

fn emit(stream: Stream, line: &str, repeated: Option<u64>) {
    let error = line.starts_with("ERROR") || line.contains("panicked");
    let level = match stream {
        _ if error => tracing::Level::ERROR,
        _ if line.starts_with("WARN") => tracing::Level::WARN,
        Stream::Stdout => tracing::Level::DEBUG,
        // Nothing is written to stderr in normal operation: worth seeing.
        Stream::Stderr => tracing::Level::WARN,
    };
    // tracing wants the target and level as constants.
    macro_rules! at {
        ($target:literal, $lvl:expr) => {
            match repeated {
                Some(n) => tracing::event!(target: $target, $lvl, repeated = n, "{line}"),
                None => tracing::event!(target: $target, $lvl, "{line}"),
            }
        };
    }
    match (stream, level) {
        (Stream::Stdout, tracing::Level::ERROR) => at!("libloragw", tracing::Level::ERROR),
        (Stream::Stdout, tracing::Level::WARN) => at!("libloragw", tracing::Level::WARN),
        (Stream::Stdout, _) => at!("libloragw", tracing::Level::DEBUG),
        (Stream::Stderr, tracing::Level::ERROR) => at!("stderr", tracing::Level::ERROR),
        (Stream::Stderr, _) => at!("stderr", tracing::Level::WARN),
    }
}
