//! The end-to-end harness: the real `lora-edge` binary on the simulated concentrator, a real
//! Mosquitto started on a free port, a fault-injecting TCP proxy between them, and a collector
//! that subscribes to everything the gateway publishes.

pub mod bench;
pub mod commands;
pub mod lorawan;
pub mod pki;
pub mod proxy;
pub mod udp;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use chirpstack_api::gw;
use prost::Message;

pub use commands::*;
pub use proxy::{Dir, Link, Mode, Proxy};

pub const GATEWAY_ID: &str = "0016c001ff10a235";

/// A deadline for work that takes as long as the machine needs (not a timing assertion),
/// stretched by `LORA_EDGE_TEST_PATIENCE` (a factor; `cross/test` sets it for qemu-user, which
/// runs the agent 5 to 10 times slower).
pub fn patience(d: Duration) -> Duration {
    let factor: u32 = std::env::var("LORA_EDGE_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f| *f >= 1)
        .unwrap_or(1);
    d * factor
}

/// A port free now and never handed out before in this process: the kernel may give the same
/// ephemeral port to two quick binds in a row once the first is closed (seen: a broker told to
/// listen twice on one port).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The agent binary, built beside the test executables (the test command builds it first), or
/// `LORA_EDGE_BIN` (a cross-built one, run through binfmt_misc and qemu: `cross/bench`).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LORA_EDGE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("lora-edge");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p lora-edge`, as scripts/test does)",
        bin.display()
    );
    bin
}

pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        sleep(Duration::from_millis(20));
    }
    false
}

/// A Mosquitto of the test's own, with persistence so that a persistent subscriber's queued
/// messages survive a broker restart.
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Configuration lines after the plain listener's (more listeners, an ACL, ...).
    extra: String,
}

impl Broker {
    /// The broker's process id while it runs (benchmarks read its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn start() -> Broker {
        Broker::start_with(|_| String::new())
    }

    /// A broker whose configuration also has the lines `extra` returns, given the broker's
    /// directory (for files the lines name).
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = extra(dir.path());
        let mut b = Broker {
            port: free_port(),
            dir,
            child: None,
            extra,
        };
        b.start_again();
        b
    }

    /// The broker's log so far (everything: `log_type all`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                // `user root`: started as root, Debian's Mosquitto would switch to its own user
                // and could not write in the test's directory (0700); as another user it stays
                // that user. Seen on a pristine machine (cross/fresh-machine-test), not here.
                "user root\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nautosave_interval 1\nlog_dest file {dir}/mosquitto.log\n\
                 listener {port} 127.0.0.1\n{extra}\n",
                port = self.port,
                dir = self.dir.path().display(),
                extra = self.extra,
            ),
        )
        .expect("write mosquitto.conf");
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is not installed (scripts/test installs it)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "mosquitto did not listen on {}",
            self.port
        );
    }

    /// SIGTERM (mosquitto saves its persistent state) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

/// One message as the collector received it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub at: SystemTime,
}

/// Subscribes (QoS 1, persistent session) to everything under `<prefix>/gateway/`.
pub struct Collector {
    msgs: Arc<Mutex<Vec<Msg>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Collector {
    pub fn start(port: u16, prefix: &str) -> Collector {
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut o =
            rumqttc::MqttOptions::new(format!("collector-{}", free_port()), "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        // It also sees the commands, oversized ones included.
        o.set_max_packet_size(16 << 20, 1 << 20);
        let (client, mut conn) = rumqttc::Client::new(o, 1000);
        let topic = format!("{prefix}/gateway/#");
        {
            let (msgs, stop, subscribed) = (msgs.clone(), stop.clone(), subscribed.clone());
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                            if !a.session_present {
                                let _ =
                                    client.try_subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce);
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            subscribed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            msgs.lock().unwrap().push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                at: SystemTime::now(),
                            });
                        }
                        Ok(_) => {}
                        Err(_) => sleep(Duration::from_millis(100)),
                    }
                }
            });
        }
        let until = Instant::now() + Duration::from_secs(10);
        while !subscribed.load(std::sync::atomic::Ordering::Relaxed) {
            assert!(Instant::now() < until, "collector could not subscribe");
            sleep(Duration::from_millis(10));
        }
        Collector { msgs, stop }
    }

    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.msgs.lock().unwrap().clear();
    }

    pub fn on(&self, suffix: &str) -> Vec<Msg> {
        self.all()
            .into_iter()
            .filter(|m| m.topic.ends_with(suffix))
            .collect()
    }

    /// Waits until `done` holds for the messages on `suffix`, or the timeout.
    pub fn wait_for(
        &self,
        suffix: &str,
        timeout: Duration,
        done: impl Fn(&[Msg]) -> bool,
    ) -> Vec<Msg> {
        let until = Instant::now() + timeout;
        loop {
            let got = self.on(suffix);
            if done(&got) || Instant::now() >= until {
                return got;
            }
            sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Publishes one message (QoS 1) and waits for the broker's PUBACK.
pub fn publish(port: u16, topic: &str, payload: Vec<u8>) {
    publish_many(port, vec![(topic.to_string(), payload)]);
}

/// Publishes messages in order (QoS 1) and waits until the broker acknowledged them all.
pub fn publish_many(port: u16, msgs: Vec<(String, Vec<u8>)>) {
    let publisher = Publisher::connect(port);
    let n = msgs.len() as u64;
    for (topic, payload) in msgs {
        publisher.send(&topic, payload);
    }
    assert!(
        publisher.wait_acked(n, Duration::from_secs(60)),
        "the broker did not acknowledge {n} publishes"
    );
}

/// The value of ` key=` on the last log line that contains `line_has` and that key.
pub fn log_field(log: &str, line_has: &str, key: &str) -> Option<i64> {
    let needle = format!(" {key}=");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(line_has) && l.contains(&needle))?;
    let rest = line.split(&needle).nth(1)?;
    let end = rest
        .find(|c: char| c != '-' && !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A persistent QoS 1 publisher, for commands paced over time.
pub struct Publisher {
    client: rumqttc::Client,
    acked: Arc<std::sync::atomic::AtomicU64>,
}

impl Publisher {
    pub fn connect(port: u16) -> Publisher {
        let mut o =
            rumqttc::MqttOptions::new(format!("publisher-{}", free_port()), "127.0.0.1", port);
        // Large enough for the oversized commands a hostile publisher sends.
        o.set_max_packet_size(1 << 20, 8 << 20);
        o.set_inflight(200);
        let (client, mut conn) = rumqttc::Client::new(o, 1000);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        conn.eventloop.set_network_options(net);
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let a = acked.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Publisher { client, acked }
    }

    pub fn send(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .expect("publish");
    }

    pub fn wait_acked(&self, n: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            if Instant::now() > until {
                return false;
            }
            sleep(Duration::from_millis(10));
        }
        true
    }
}

/// One line of the simulator's TX log: what `lgw_send` received.
#[derive(Debug, Clone)]
pub struct Sent {
    pub counter_at_handoff: u32,
    pub result: i64,
    pub tx_mode: u64,
    pub count_us: u32,
    pub freq_hz: u32,
    pub rf_power: i64,
    pub datarate: u64,
    pub bandwidth: u64,
    pub invert_pol: bool,
    pub payload: Vec<u8>,
    /// The start counter of a packet this one replaced while it was still scheduled or on air
    /// (V2.1.0 has one TX buffer per RF chain and checks nothing): that one never went out.
    pub replaced: Option<u32>,
}

impl Sent {
    /// How long before its start the packet was handed to the radio (µs).
    pub fn lead_us(&self) -> i64 {
        self.count_us.wrapping_sub(self.counter_at_handoff) as i32 as i64
    }
}

pub fn tx_log(dir: &Path) -> Vec<Sent> {
    std::fs::read_to_string(dir.join("tx.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("tx log line is JSON");
            let n = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k} in {l}"));
            Sent {
                counter_at_handoff: n("counter_at_handoff") as u32,
                result: n("result"),
                tx_mode: n("tx_mode") as u64,
                count_us: n("count_us") as u32,
                freq_hz: n("freq_hz") as u32,
                rf_power: n("rf_power"),
                datarate: n("datarate") as u64,
                bandwidth: n("bandwidth") as u64,
                invert_pol: v["invert_pol"].as_bool().unwrap(),
                payload: hex::decode(v["payload"].as_str().unwrap()).unwrap(),
                replaced: v["replaced"].as_u64().map(|c| c as u32),
            }
        })
        .collect()
}

/// Decodes an uplink in either encoding.
pub fn decode_uplink(payload: &[u8], json: bool) -> gw::UplinkFrame {
    if json {
        serde_json::from_slice(payload).expect("uplink JSON decodes as gw::UplinkFrame")
    } else {
        gw::UplinkFrame::decode(payload).expect("uplink protobuf decodes as gw::UplinkFrame")
    }
}

pub fn seq_of(f: &gw::UplinkFrame) -> u64 {
    f.rx_info
        .as_ref()
        .and_then(|r| r.metadata.get("seq"))
        .and_then(|s| s.parse().ok())
        .expect("seq metadata")
}

/// A scenario frame the tests generate and later recognise by its payload.
#[derive(Debug, Clone)]
pub struct Frame {
    pub offset_ms: u64,
    pub freq_hz: u32,
    pub sf: u32,
    pub rssi: i32,
    pub snr: f32,
    pub if_chain: u32,
    pub rf_chain: u32,
    pub device: u32,
    pub fcnt: u16,
    pub payload: Vec<u8>,
}

/// `n` unconfirmed data uplinks from `devices` devices, `interval_ms` apart (0 = one burst).
pub fn frames(n: usize, devices: u32, start_ms: u64, interval_ms: f64) -> Vec<Frame> {
    let offsets: Vec<u64> = (0..n)
        .map(|i| start_ms + (i as f64 * interval_ms).round() as u64)
        .collect();
    frames_at(&offsets, devices)
}

/// Steady traffic at `rate_hz` for `duration_ms`, plus a burst of `burst` frames at `burst_at_ms`.
pub fn traffic_with_burst(
    rate_hz: f64,
    duration_ms: u64,
    burst: usize,
    burst_at_ms: u64,
    devices: u32,
) -> Vec<Frame> {
    let steady = (duration_ms as f64 / 1000.0 * rate_hz) as usize;
    let mut offsets: Vec<u64> = (0..steady)
        .map(|i| (i as f64 * 1000.0 / rate_hz).round() as u64)
        .collect();
    offsets.extend(std::iter::repeat_n(burst_at_ms, burst));
    offsets.sort();
    frames_at(&offsets, devices)
}

/// One frame at each offset (sorted), the devices taking turns; frame counters per device.
pub fn frames_at(offsets: &[u64], devices: u32) -> Vec<Frame> {
    const FREQS: [u32; 8] = [
        868_100_000,
        868_300_000,
        868_500_000,
        867_100_000,
        867_300_000,
        867_500_000,
        867_700_000,
        867_900_000,
    ];
    offsets
        .iter()
        .enumerate()
        .map(|(i, &offset_ms)| {
            let device = i as u32 % devices;
            let fcnt = (i as u32 / devices) as u16;
            let dev_addr = 0x2601_2000u32 + device;
            let mut p = vec![0x40];
            p.extend_from_slice(&dev_addr.to_le_bytes());
            p.push(0);
            p.extend_from_slice(&fcnt.to_le_bytes());
            p.push(1);
            p.extend_from_slice(&(i as u32).to_be_bytes());
            p.extend_from_slice(&[0xAB; 4]);
            let ch = i % 8;
            Frame {
                offset_ms,
                freq_hz: FREQS[ch],
                sf: 7 + (i % 6) as u32,
                rssi: -40 - (i % 80) as i32,
                snr: 10.25 - (i % 30) as f32,
                if_chain: ch as u32,
                rf_chain: if ch < 3 { 1 } else { 0 },
                device,
                fcnt,
                payload: p,
            }
        })
        .collect()
}

pub fn scenario_csv(frames: &[Frame]) -> String {
    let mut s = String::from("# generated by the e2e tests\n");
    for f in frames {
        s.push_str(&format!(
            "{},{},LORA,{},125000,4/5,{},{},{},{},ok,{}\n",
            f.offset_ms,
            f.freq_hz,
            f.sf,
            f.rssi,
            f.snr,
            f.if_chain,
            f.rf_chain,
            hex::encode(&f.payload)
        ));
    }
    s
}

/// A running agent in a directory of its own.
pub struct Agent {
    pub dir: PathBuf,
    child: Option<Child>,
    pub config: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// Builds the files an agent runs with.
pub struct AgentSetup {
    pub dir: tempfile::TempDir,
    pub mqtt_port: u16,
    pub json: bool,
    pub sim: String,
    pub extra_config: String,
    /// Leave `gateway.id` out: the agent must use the concentrator's EUI.
    pub id_from_eui: bool,
    /// Environment of the agent's process.
    pub env: Vec<(String, String)>,
}

impl AgentSetup {
    pub fn new(mqtt_port: u16) -> AgentSetup {
        AgentSetup {
            dir: tempfile::tempdir().expect("tempdir"),
            mqtt_port,
            json: false,
            sim: String::new(),
            extra_config: String::new(),
            id_from_eui: false,
            env: Vec::new(),
        }
    }

    pub fn scenario(mut self, frames: &[Frame]) -> Self {
        std::fs::write(self.dir.path().join("scenario.csv"), scenario_csv(frames))
            .expect("write scenario");
        self.sim.push_str("scenario = \"scenario.csv\"\n");
        self
    }

    pub fn sim(mut self, lines: &str) -> Self {
        self.sim.push_str(lines);
        self.sim.push('\n');
        self
    }

    pub fn config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self.extra_config.push('\n');
        self
    }

    pub fn json(mut self) -> Self {
        self.json = true;
        self
    }

    fn write(&self) -> PathBuf {
        let d = self.dir.path();
        let mut sim = std::fs::File::create(d.join("sim.toml")).expect("sim.toml");
        if !self.sim.contains("eui =") {
            writeln!(sim, "eui = \"{GATEWAY_ID}\"").unwrap();
        }
        write!(sim, "tx_log = \"tx.jsonl\"\n{}", self.sim).unwrap();
        let cfg = d.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "{}[radio]\nbackend = \"simulator\"\nboard = \"rak2287\"\nsimulator = \"sim.toml\"\n\
                 watchdog = \"3s\"\nrestart_backoff_max = \"2s\"\n\
                 [mqtt]\nserver = \"tcp://127.0.0.1:{}\"\nencoding = \"{}\"\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n\
                 keep_alive = \"5s\"\nack_timeout = \"10s\"\nconnect_timeout = \"10s\"\n\
                 [store]\npath = \"store\"\n[stats]\ninterval = \"1s\"\n",
                if self.id_from_eui { String::new() } else { format!("[gateway]\nid = \"{GATEWAY_ID}\"\n") },
                self.mqtt_port,
                if self.json { "json" } else { "protobuf" }
            ),
        )
        .expect("agent.toml");
        if !self.extra_config.is_empty() {
            std::fs::write(d.join("extra.toml"), &self.extra_config).expect("extra.toml");
        }
        cfg
    }

    pub fn start(self) -> (Agent, tempfile::TempDir) {
        let config = self.write();
        let mut extra = Vec::new();
        if !self.extra_config.is_empty() {
            extra.push("-c".to_string());
            extra.push(self.dir.path().join("extra.toml").display().to_string());
        }
        let mut agent = Agent {
            dir: self.dir.path().to_path_buf(),
            child: None,
            config,
            extra,
            env: self.env,
        };
        agent.start_again();
        (agent, self.dir)
    }
}

impl Agent {
    /// Replaces the simulator's settings (same gateway EUI) for the next `start_again`.
    pub fn set_simulator(&self, settings: &str) {
        std::fs::write(
            self.dir.join("sim.toml"),
            format!("eui = \"{GATEWAY_ID}\"\n{settings}"),
        )
        .expect("sim.toml");
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent.log");
        let child = Command::new(agent_binary())
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("LORA_EDGE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // A test's own RUST_LOG wins.
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lora-edge");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.log().contains(needle) {
                return true;
            }
            sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until `needle` appears at least `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> usize {
        let until = Instant::now() + timeout;
        loop {
            let c = self.log().matches(needle).count();
            if c >= n || Instant::now() >= until {
                return c;
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// The most recent value of `key=` in the agent's status lines.
    pub fn status_value(&self, key: &str) -> Option<u64> {
        log_field(&self.log(), " status", key).and_then(|v| u64::try_from(v).ok())
    }

    /// Waits until the status line reports `key` at `at_least` or more; panics with the log if
    /// it does not within `timeout` (or the agent dies).
    pub fn wait_status(&mut self, key: &str, at_least: u64, timeout: Duration) {
        let until = Instant::now() + timeout;
        while self.status_value(key).unwrap_or(0) < at_least {
            assert!(
                Instant::now() < until && self.is_running(),
                "status {key} did not reach {at_least}:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("agent running");
        signal(&c, nix::sys::signal::Signal::SIGTERM);
        wait_with_timeout(&mut c, Duration::from_secs(20))
            .expect("agent exits within 20 s of SIGTERM")
    }

    pub fn sigkill(&mut self) {
        let mut c = self.child.take().expect("agent running");
        signal(&c, nix::sys::signal::Signal::SIGKILL);
        let _ = c.wait();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

fn wait_with_timeout(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    None
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every uplink the collector holds, decoded, keyed by the frame index carried in its payload.
pub fn uplinks_by_index(
    msgs: &[Msg],
    json: bool,
) -> (Vec<(u32, gw::UplinkFrame)>, HashMap<u32, usize>) {
    let mut out = Vec::new();
    let mut count: HashMap<u32, usize> = HashMap::new();
    for m in msgs {
        let f = decode_uplink(&m.payload, json);
        let idx = u32::from_be_bytes(f.phy_payload[9..13].try_into().expect("index bytes"));
        *count.entry(idx).or_default() += 1;
        out.push((idx, f));
    }
    (out, count)
}

/// Loss, duplicates and per-device order over the uplinks received for frames `0..n`.
#[derive(Debug)]
pub struct Delivery {
    pub missing: Vec<u32>,
    pub duplicates: usize,
    /// (device, earlier fcnt, later fcnt) where a newer frame of a device arrived first.
    pub order_violations: Vec<(u32, u16, u16)>,
}

pub fn delivery(msgs: &[Msg], n: u32, json: bool) -> Delivery {
    let (ups, count) = uplinks_by_index(msgs, json);
    let missing: Vec<u32> = (0..n).filter(|i| !count.contains_key(i)).collect();
    let duplicates = count.values().map(|c| c - 1).sum();
    // Per device, first arrivals must come in frame-counter order.
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<u32, u16> = HashMap::new();
    let mut order_violations = Vec::new();
    for (idx, f) in &ups {
        if !seen.insert(*idx) {
            continue;
        }
        let device = u32::from_le_bytes(f.phy_payload[1..5].try_into().unwrap()) - 0x2601_2000;
        let fcnt = u16::from_le_bytes(f.phy_payload[6..8].try_into().unwrap());
        if let Some(&prev) = last.get(&device) {
            if fcnt < prev {
                order_violations.push((device, prev, fcnt));
            }
        }
        last.insert(device, fcnt);
    }
    Delivery {
        missing,
        duplicates,
        order_violations,
    }
}

/// Waits until the collector has all `n` uplinks, and checks that none is missing and none
/// overtook an older one; the agent's log in the message otherwise.
pub fn assert_all_delivered(collector: &Collector, n: usize, timeout: Duration, agent: &Agent) {
    let got = collector.wait_for("/event/up", timeout, |m| {
        uplinks_by_index(m, false).1.len() >= n
    });
    let d = delivery(&got, n as u32, false);
    assert!(
        d.missing.is_empty(),
        "{} of {n} frames missing: {:?}…\n{}",
        d.missing.len(),
        &d.missing[..d.missing.len().min(10)],
        agent.log()
    );
    assert!(
        d.order_violations.is_empty(),
        "a newer frame overtook an older one: {:?}",
        &d.order_violations[..d.order_violations.len().min(10)]
    );
}

/// `per_core` busy threads per core until dropped.
pub struct CpuHogs(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CpuHogs {
    pub fn start(per_core: usize) -> CpuHogs {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cores * per_core {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
        CpuHogs(stop)
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The sequence number of a stored event as the centre receives it, whatever its topic.
pub fn seq_of_msg(m: &Msg) -> Option<u64> {
    if m.topic.ends_with("/event/up") {
        return Some(seq_of(&decode_uplink(&m.payload, false)));
    }
    if m.topic.ends_with("/event/stats") {
        return gw::GatewayStats::decode(m.payload.as_slice())
            .ok()?
            .metadata
            .get("seq")?
            .parse()
            .ok();
    }
    if m.topic.contains("/event/") {
        return serde_json::from_slice::<serde_json::Value>(&m.payload).ok()?["seq"].as_u64();
    }
    None
}

/// The first and last sequence numbers among `msgs` and the numbers between them that none
/// carries (an `event/ack` takes a number it cannot show: tests that look for gaps send none).
pub fn seq_gaps(msgs: &[Msg]) -> (u64, u64, Vec<u64>) {
    let mut seqs: Vec<u64> = msgs.iter().filter_map(seq_of_msg).collect();
    seqs.sort();
    seqs.dedup();
    let (first, last) = (seqs[0], *seqs.last().unwrap());
    let missing = (first..=last)
        .filter(|s| seqs.binary_search(s).is_err())
        .collect();
    (first, last, missing)
}
