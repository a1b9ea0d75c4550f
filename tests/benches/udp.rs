//! Semtech UDP in → MQTT out: lora-edge (`radio.backend = "semtech_udp"`) and, in the same run
//! on the same emulator and broker set-up, ChirpStack's MQTT forwarder (UDP backend, QoS 1,
//! protobuf) when `FORWARDER_BIN` names its binary (built from its published source in a
//! scratch folder; not needed for anything else).
//!
//! `cargo build --release -p lora-edge && FORWARDER_BIN=/path/chirpstack-mqtt-forwarder \
//!  cargo bench -p lora-edge-e2e --bench udp`   (env `UDP_BENCH_CASES="100:30,1000:10,5000:6"`)
//!
//! Each case: a fresh Mosquitto, the peer, a QoS 1 subscriber counting `event/up`, and the
//! emulator (`udp.rs`) sending one rxpk per PUSH_DATA at the rate, paced on absolute deadlines.
//! CPU (utime + stime of the peer's process) from just before the first push until every frame
//! arrived (or the deadline), peak RSS (VmHWM), the broker's CPU over the same window. The
//! emulator and the subscriber run in this process: neither peer is charged for them. Then an
//! outage: the broker stopped, 10 s at 100 frames/s, the broker back; frames delivered after.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::udp::{backend_config, free_udp_port, Emulator};
use lora_edge_e2e::*;

const EUI: u64 = 0x0016_c001_ff10_a235;

enum Peer {
    LoraEdge,
    Forwarder(PathBuf),
}

impl Peer {
    fn name(&self) -> &'static str {
        match self {
            Peer::LoraEdge => "lora-edge",
            Peer::Forwarder(_) => "chirpstack-mqtt-forwarder",
        }
    }
}

/// A running peer: its process id, and what ends it.
enum Running {
    Agent(Agent, #[allow(dead_code)] tempfile::TempDir),
    Forwarder(Child, #[allow(dead_code)] tempfile::TempDir),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Agent(a, _) => a.pid().unwrap(),
            Running::Forwarder(c, _) => c.id(),
        }
    }

    fn stop(self) {
        match self {
            Running::Agent(mut a, _) => {
                let _ = a.sigterm();
            }
            Running::Forwarder(mut c, _) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn start(peer: &Peer, broker: &Broker, udp: u16) -> Running {
    match peer {
        Peer::LoraEdge => {
            // The shipped stats interval (the tests' setup reports every second).
            let (agent, dir) = AgentSetup::new(broker.port)
                .config(&backend_config(udp, EUI))
                .config("[stats]\ninterval = \"30s\"")
                .start();
            assert!(agent.wait_log("backhaul up", Duration::from_secs(20)));
            Running::Agent(agent, dir)
        }
        Peer::Forwarder(bin) => {
            let dir = tempfile::tempdir().unwrap();
            let cfg = dir.path().join("forwarder.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[logging]\nlevel=\"INFO\"\nlog_to_syslog=false\n\
                     [mqtt]\ntopic_prefix=\"eu868\"\njson=false\nserver=\"tcp://127.0.0.1:{}\"\n\
                     username=\"\"\npassword=\"\"\nqos=1\nclean_session=false\nclient_id=\"\"\n\
                     keep_alive_interval=\"30s\"\nreconnect_interval=\"1s\"\n\
                     [backend]\nenabled=\"semtech_udp\"\ngateway_id=\"{EUI:016x}\"\n\
                     [backend.filters]\nforward_crc_ok=true\nforward_crc_invalid=false\n\
                     forward_crc_missing=false\nlorawan_only=false\n\
                     [backend.semtech_udp]\nbind=\"127.0.0.1:{udp}\"\ntime_fallback_enabled=false\n",
                    broker.port
                ),
            )
            .unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("forwarder.log")).unwrap())
                .spawn()
                .expect("start the forwarder");
            // Its MQTT session and UDP socket come up within a second on loopback.
            std::thread::sleep(Duration::from_secs(2));
            Running::Forwarder(child, dir)
        }
    }
}

/// Sends `n` frames at `rate` per second, one rxpk per PUSH_DATA; the frames' payloads count
/// from `first`.
fn send(emu: &Emulator, first: u32, n: u32, rate: f64) {
    let started = Instant::now();
    for i in 0..n {
        let mut p = vec![0x40];
        p.extend((first + i).to_le_bytes());
        p.extend([0u8; 19]);
        emu.push(vec![emu.rxpk(&p, 868_100_000, 7)]);
        let due = Duration::from_secs_f64(f64::from(i + 1) / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

struct Row {
    delivered: u64,
    cpu_per_1000: f64,
    peak_rss_mb: f64,
    broker_cpu: f64,
}

fn case(peer: &Peer, rate: f64, seconds: u64) -> Row {
    let broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let udp = free_udp_port();
    let running = start(peer, &broker, udp);
    let pid = running.pid();
    let emu = Emulator::start(udp, EUI, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let n = (rate * seconds as f64) as u32;
    let (cpu0, bcpu0) = (cpu_seconds(pid), cpu_seconds(broker.pid().unwrap()));
    send(&emu, 0, n, rate);
    wait_until(Duration::from_secs(30), || {
        arrivals.count.load(Ordering::Relaxed) >= u64::from(n)
    });
    let cpu = cpu_seconds(pid) - cpu0;
    let broker_cpu = cpu_seconds(broker.pid().unwrap()) - bcpu0;
    let delivered = arrivals.count.load(Ordering::Relaxed);
    let row = Row {
        delivered,
        cpu_per_1000: cpu / f64::from(n) * 1000.0,
        peak_rss_mb: peak_rss(pid) as f64 / 1e6,
        broker_cpu,
    };
    running.stop();
    row
}

/// The broker away for the 10 s of 100 frames/s: how many of the 1000 arrive after it is back.
fn outage(peer: &Peer) -> u64 {
    let mut broker = Broker::start();
    let arrivals = subscribe_uplinks(broker.port);
    let udp = free_udp_port();
    let running = start(peer, &broker, udp);
    let emu = Emulator::start(udp, EUI, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    broker.stop();
    send(&emu, 0, 1000, 100.0);
    broker.start_again();
    wait_until(Duration::from_secs(60), || {
        arrivals.count.load(Ordering::Relaxed) >= 1000
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = arrivals.count.load(Ordering::Relaxed);
    running.stop();
    got
}

fn main() {
    let cases: Vec<(f64, u64)> = std::env::var("UDP_BENCH_CASES")
        .unwrap_or_else(|_| "100:30,1000:10,5000:6".into())
        .split(',')
        .filter_map(|c| {
            let (r, s) = c.split_once(':')?;
            Some((r.parse().ok()?, s.parse().ok()?))
        })
        .collect();
    let mut peers = vec![Peer::LoraEdge];
    match std::env::var_os("FORWARDER_BIN") {
        Some(b) => peers.push(Peer::Forwarder(PathBuf::from(b))),
        None => println!("(FORWARDER_BIN not set: ChirpStack's forwarder not measured)"),
    }
    println!("Semtech UDP in -> MQTT out (release builds, Mosquitto on loopback, one rxpk per PUSH_DATA)");
    println!(
        "{:<26} {:>6} {:>4} {:>7} {:>9} {:>14} {:>12} {:>12}",
        "peer", "fps", "s", "sent", "delivered", "cpu_s/1000fr", "peakRSS_MB", "broker_cpu_s"
    );
    for (rate, seconds) in cases {
        for peer in &peers {
            let r = case(peer, rate, seconds);
            println!(
                "{:<26} {:>6.0} {:>4} {:>7} {:>9} {:>14.3} {:>12.1} {:>12.2}",
                peer.name(),
                rate,
                seconds,
                (rate * seconds as f64) as u64,
                r.delivered,
                r.cpu_per_1000,
                r.peak_rss_mb,
                r.broker_cpu
            );
        }
    }
    for peer in &peers {
        println!(
            "outage: broker stopped during 1000 frames at 100 fps: {} delivered {} of 1000",
            peer.name(),
            outage(peer)
        );
    }
}
