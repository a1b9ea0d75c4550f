//! `command/exec`: the centre runs an allow-listed command on the gateway.
//!
//! ChirpStack's protocol (`GatewayCommandExecRequest` in, `GatewayCommandExecResponse` on
//! `event/exec`): the request names a command of the configuration's `[commands.<name>]`;
//! what runs is that entry's fixed argv, never anything the request says. The request's stdin
//! is given only to a command that allows it, and its environment variables only if each is in
//! the entry's `allow_env`; anything else is refused with why. The program runs in its own
//! process group with a cleared environment (`PATH` and the allowed variables), is killed with
//! its group at the entry's timeout, and its stdout and stderr are each cut at
//! `max_output_bytes`. Every request, run or refused, is answered through the store (the
//! centre's audit trail) and logged.
//!
//! One command runs at a time, on this stage's thread; requests wait in a short queue.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use chirpstack_api::gw;
use prost::Message;

use crate::config::{CommandConfig, Encoding};
use crate::events::{Body, Event};

/// Requests waiting for the one running (the backhaul drops beyond this, and counts).
pub const QUEUE: usize = 16;

/// The most stdin a request may carry.
pub const MAX_STDIN: usize = 64 * 1024;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Exec {
    pub commands: BTreeMap<String, CommandConfig>,
    pub gateway_id: String,
    pub encoding: Encoding,
    pub input: Receiver<Vec<u8>>,
    pub output: SyncSender<Event>,
}

impl Exec {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("exec".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        while let Ok(payload) = self.input.recv() {
            let Some(response) = self.handle(&payload) else {
                continue;
            };
            let event = Event {
                at: SystemTime::now(),
                body: Body::Exec(response),
            };
            if self.output.send(event).is_err() {
                return;
            }
        }
    }

    /// The answer to one request; None when it cannot be answered (no exec_id to answer to).
    fn handle(&self, payload: &[u8]) -> Option<gw::GatewayCommandExecResponse> {
        let request = match decode(payload, self.encoding) {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!(why = ?why, bytes = payload.len(), "command/exec: undecodable request, not answered");
                return None;
            }
        };
        let mut response = gw::GatewayCommandExecResponse {
            gateway_id: self.gateway_id.clone(),
            exec_id: request.exec_id,
            ..Default::default()
        };
        let started = Instant::now();
        match self.allowed(&request) {
            Err(why) => {
                tracing::warn!(exec_id = request.exec_id, command = ?request.command, why = ?why, "command/exec refused");
                response.error = why;
            }
            Ok(c) => {
                let out = run(c, &request);
                tracing::info!(
                    exec_id = request.exec_id,
                    command = ?request.command,
                    ms = started.elapsed().as_millis() as u64,
                    stdout_bytes = out.stdout.len(),
                    stderr_bytes = out.stderr.len(),
                    error = ?out.error,
                    "command/exec ran"
                );
                response.stdout = out.stdout;
                response.stderr = out.stderr;
                response.error = out.error;
            }
        }
        Some(response)
    }

    fn allowed(&self, r: &gw::GatewayCommandExecRequest) -> Result<&CommandConfig, String> {
        if !r.gateway_id.is_empty() && !r.gateway_id.eq_ignore_ascii_case(&self.gateway_id) {
            return Err(format!(
                "addressed to gateway {:?}, this is {}",
                r.gateway_id, self.gateway_id
            ));
        }
        let c = self.commands.get(&r.command).ok_or_else(|| {
            format!(
                "command {:?} is not allowed here (allowed: {})",
                r.command,
                if self.commands.is_empty() {
                    "none".to_string()
                } else {
                    self.commands.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            )
        })?;
        if !r.stdin.is_empty() && !c.stdin {
            return Err(format!(
                "command {:?} takes no stdin ({} bytes given)",
                r.command,
                r.stdin.len()
            ));
        }
        if r.stdin.len() > MAX_STDIN {
            return Err(format!(
                "stdin of {} bytes: at most {MAX_STDIN}",
                r.stdin.len()
            ));
        }
        let refused: Vec<&String> = r
            .environment
            .keys()
            .filter(|k| !c.allow_env.contains(k))
            .collect();
        if !refused.is_empty() {
            return Err(format!(
                "environment variable(s) {refused:?} not allowed for command {:?} (allowed: {:?})",
                r.command, c.allow_env
            ));
        }
        Ok(c)
    }
}

/// `check`'s question to this stage: can each allowed program be run by this user?
pub fn check(commands: &BTreeMap<String, CommandConfig>) -> Vec<crate::config::Invalid> {
    use nix::unistd::{access, AccessFlags};
    commands
        .iter()
        .filter_map(|(name, c)| {
            let program = c.argv.first()?;
            let why = match std::fs::metadata(program) {
                Err(e) => e.to_string(),
                Ok(m) if !m.is_file() => "not a regular file".to_string(),
                Ok(_) => match access(program.as_str(), AccessFlags::X_OK) {
                    Ok(()) => return None,
                    Err(e) => format!("not executable by this user: {e}"),
                },
            };
            Some(crate::config::Invalid::new(
                &format!("commands.{name}.argv"),
                format!("{program}: {why}"),
            ))
        })
        .collect()
}

fn decode(payload: &[u8], encoding: Encoding) -> Result<gw::GatewayCommandExecRequest, String> {
    match encoding {
        Encoding::Protobuf => {
            gw::GatewayCommandExecRequest::decode(payload).map_err(|e| e.to_string())
        }
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
    }
}

struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error: String,
}

fn run(c: &CommandConfig, r: &gw::GatewayCommandExecRequest) -> Outcome {
    let mut cmd = Command::new(&c.argv[0]);
    cmd.args(&c.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .envs(r.environment.iter())
        .stdin(if r.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: the timeout kills what it started too.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return Outcome {
                stdout: Vec::new(),
                stderr: Vec::new(),
                error: format!("cannot start {}: {e}", c.argv[0]),
            }
        }
    };
    let pid = child.id() as i32;
    let cap = c.max_output_bytes;
    let stdout = child.stdout.take().map(|s| reader(s, cap));
    let stderr = child.stderr.take().map(|s| reader(s, cap));
    if let Some(mut input) = child.stdin.take() {
        let data = r.stdin.clone();
        // A program that does not read its stdin must not block this stage.
        let _ = std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let _ = input.write_all(&data);
            });
    }
    let deadline = Instant::now() + c.timeout;
    let mut errors = Vec::new();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                errors.push(format!("timed out after {:?}: killed", c.timeout));
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                errors.push(format!("waiting for it: {e}"));
                break None;
            }
        }
    };
    // What it left running in its group (a `cmd &`) goes with it: it would hold the pipes
    // open and the answer with them. A program that left the group (setsid) escapes this;
    // its output is then cut at the deadline below.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let grace = deadline.max(Instant::now()) + OUTPUT_GRACE;
    let (out, out_total, out_open) = collect(stdout, grace);
    let (err, err_total, err_open) = collect(stderr, grace);
    if out_open || err_open {
        errors.push("its output was still open (a process it started left its group): cut".into());
    }
    if let Some(s) = status {
        if !s.success() {
            errors.push(match s.code() {
                Some(code) => format!("exit status {code}"),
                None => format!("ended by {s}"),
            });
        }
    }
    for (name, total) in [("stdout", out_total), ("stderr", err_total)] {
        if total > cap {
            errors.push(format!("{name} cut at {cap} of {total} bytes"));
        }
    }
    Outcome {
        stdout: out,
        stderr: err,
        error: errors.join("; "),
    }
}

/// After the deadline, how long the output may take to be read to its end.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// What a reader kept, by `until`: (bytes, total, still open). A reader past `until` is left
/// to end by itself (when the last holder of the pipe exits).
fn collect(
    reader: Option<std::sync::mpsc::Receiver<(Vec<u8>, usize)>>,
    until: Instant,
) -> (Vec<u8>, usize, bool) {
    let Some(rx) = reader else {
        return (Vec::new(), 0, false);
    };
    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        Ok((kept, total)) => (kept, total, false),
        Err(_) => (Vec::new(), 0, true),
    }
}

/// Reads a stream to its end, keeping the first `cap` bytes; sends them with the total.
fn reader(
    mut s: impl Read + Send + 'static,
    cap: usize,
) -> std::sync::mpsc::Receiver<(Vec<u8>, usize)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut total = 0usize;
        let mut buf = [0u8; 8192];
        // Read to the end (a grandchild may hold the pipe: it was killed with the group).
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    total += n;
                }
            }
        }
        let _ = tx.send((kept, total));
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(argv: &[&str]) -> CommandConfig {
        CommandConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
            max_output_bytes: 1000,
            stdin: false,
            allow_env: vec![],
        }
    }

    fn request(command: &str) -> gw::GatewayCommandExecRequest {
        gw::GatewayCommandExecRequest {
            command: command.into(),
            exec_id: 7,
            ..Default::default()
        }
    }

    #[test]
    fn the_argv_is_the_configurations_and_the_output_is_capped() {
        let mut c = entry(&[
            "/bin/sh",
            "-c",
            "printf 'x%.0s' $(seq 1 3000); echo oops >&2; exit 3",
        ]);
        c.max_output_bytes = 100;
        let out = run(&c, &request("x"));
        assert_eq!(out.stdout, vec![b'x'; 100]);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.error, "exit status 3; stdout cut at 100 of 3000 bytes");
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_what_it_started() {
        // The grandchild says who it is, then both sleep past the timeout.
        let mut c = entry(&["/bin/sh", "-c", "sleep 300 & echo $!; sleep 300"]);
        c.timeout = Duration::from_secs(1);
        let out = run(&c, &request("x"));
        assert!(out.error.starts_with("timed out after 1s"), "{}", out.error);
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // Gone, or a zombie waiting for init to reap it: not sleeping on. (A SIGKILL lands
        // asynchronously: a loaded machine may show it on its way out for a moment.)
        let alive = || {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = state
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next())
                .is_some_and(|s| s != 'Z' && s != 'X');
            alive.then_some(state)
        };
        let mut last = alive();
        for _ in 0..200 {
            if last.is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            last = alive();
        }
        assert_eq!(last, None, "the grandchild {pid} survived");
    }

    #[test]
    fn what_a_command_leaves_running_in_its_group_goes_with_it() {
        // The shell ends at once; its background sleep would hold stdout open for 300 s.
        let c = entry(&["/bin/sh", "-c", "sleep 300 & echo started"]);
        let out = run(&c, &request("x"));
        assert_eq!(
            (out.stdout.as_slice(), out.error.as_str()),
            (&b"started\n"[..], "")
        );
    }

    #[test]
    fn a_process_that_left_the_group_does_not_hold_the_answer() {
        // setsid: out of reach of the group's kill; it holds stdout for 3 s past a 1 s timeout.
        let mut c = entry(&["/bin/sh", "-c", "setsid sleep 3 & sleep 30"]);
        c.timeout = Duration::from_secs(1);
        let out = run(&c, &request("x"));
        assert!(out.error.contains("timed out after 1s"), "{}", out.error);
        assert!(out.error.contains("still open"), "{}", out.error);
    }

    #[test]
    fn only_the_allowed_environment_reaches_the_program() {
        let mut c = entry(&["/usr/bin/env"]);
        c.allow_env = vec!["GREETING".into()];
        let mut r = request("x");
        r.environment.insert("GREETING".into(), "bonjour".into());
        let out = run(&c, &r);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("GREETING=bonjour"), "{text}");
        assert!(!text.contains("HOME="), "a cleared environment: {text}");
    }
}
