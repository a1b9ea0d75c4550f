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
//!
//! `during` runs a library call and returns what the library printed meanwhile, once the
//! reader has logged it: the agent's line about a call (a failed start and its diagnosis)
//! comes after the library's lines, and the diagnosis is made from the library's own words.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const REPEAT_REPORT: Duration = Duration::from_secs(10);

/// Written to stdout after a call: when the reader sees it, every line the call printed (the
/// C library's stdout is line-buffered on a terminal) has been logged.
const MARK: &str = "\u{1e}lora-edge-mark ";

/// How long a call's lines may take to reach the reader: beyond it the agent goes on without
/// them rather than stall the radio.
const MARK_WAIT: Duration = Duration::from_millis(500);

/// The lines of the call in progress (`during`), and the marks the reader has seen.
#[derive(Default)]
struct Recording {
    lines: Option<Vec<String>>,
    marks_seen: u64,
}

static RECORDING: Mutex<Recording> = Mutex::new(Recording {
    lines: None,
    marks_seen: 0,
});
static MARK_SEEN: Condvar = Condvar::new();
static MARKS_SENT: Mutex<u64> = Mutex::new(0);

fn recording() -> std::sync::MutexGuard<'static, Recording> {
    RECORDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `call` and returns its result with what the library printed on stdout meanwhile, in
/// order, after the reader has logged those lines. Without `capture` (no pseudo-terminal), the
/// lines are not known: empty.
pub fn during<R>(call: impl FnOnce() -> R) -> (R, Vec<String>) {
    if LOG_OUT.get().is_none() {
        return (call(), Vec::new());
    }
    // One call recorded at a time (the HAL serialises its calls anyway).
    let mut sent = MARKS_SENT.lock().unwrap_or_else(|p| p.into_inner());
    recording().lines = Some(Vec::new());
    let result = call();
    *sent += 1;
    let mark = *sent;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{MARK}{mark}");
        let _ = out.flush();
    }
    let deadline = Instant::now() + MARK_WAIT;
    let mut r = recording();
    while r.marks_seen < mark {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::debug!("libloragw's lines for this call did not arrive in time");
            break;
        }
        r = MARK_SEEN
            .wait_timeout(r, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let lines = r.lines.take().unwrap_or_default();
    (result, lines)
}

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
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // Close-on-exec, like every descriptor here: a command the centre runs (exec.rs) must not
    // inherit the agent's log or the library's terminal (it could write lines into either).
    let original = nix::unistd::dup(std::io::stderr())?;
    fcntl(&original, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    let _ = LOG_OUT.set(std::fs::File::from(original));
    // A panic message written to fd 2 now would reach the log through a thread that may not
    // get to run before the process ends: log it directly.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(target: "panic", "{info}");
    }));
    for stream in [Stream::Stdout, Stream::Stderr] {
        let pty = nix::pty::openpty(None, None)?;
        fcntl(&pty.master, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
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

/// Points stdout and stderr back at the original stderr (before the process runs itself again:
/// the terminals' readers do not survive it).
pub fn restore_std_fds() {
    if let Some(f) = LOG_OUT.get() {
        let _ = nix::unistd::dup2_stdout(f);
        let _ = nix::unistd::dup2_stderr(f);
    }
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
        if let (Stream::Stdout, Some(n)) = (stream, line.strip_prefix(MARK.trim())) {
            // Everything printed before the mark is logged, a repeat's count too, before the
            // caller goes on.
            repeats.flush();
            let mut r = recording();
            r.marks_seen = r.marks_seen.max(n.trim().parse().unwrap_or(0));
            MARK_SEEN.notify_all();
            continue;
        }
        if !line.is_empty() {
            if let Stream::Stdout = stream {
                if let Some(lines) = recording().lines.as_mut() {
                    lines.push(line.to_string());
                }
            }
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
