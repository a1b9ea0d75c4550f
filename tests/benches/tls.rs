//! TLS against plain text: what encryption costs the gateway.
//!
//! `cargo build --release -p lora-edge && cargo bench -p lora-edge-e2e --bench tls`
//!
//! On loopback, for plain MQTT, TLS and mutual TLS (rustls/ring, ECDSA P-256 certificates,
//! TLS 1.3), in alternation so that a change of machine load shows as a change between rounds:
//! delivered frames/s and latency at 100 frames/s and at 5000 frames/s offered, CPU seconds per
//! 1000 frames, peak RSS. Then the time from start to the CONNACK (`connect_ms`) through the
//! fault proxy at 300 ms round trip: TCP + MQTT is one round trip, TLS 1.3 adds one.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lora_edge_e2e::bench::*;
use lora_edge_e2e::pki::{files, site, tls_config, Site, Validity};
use lora_edge_e2e::*;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Plain,
    Tls,
    Mutual,
}

/// The agent's `[mqtt]` for `mode`, reaching the broker at `port` (the site's own listener for
/// the mode, or a proxy in front of it).
fn setup(site: &Site, mode: Mode, port: u16, sim: &str) -> AgentSetup {
    let s = AgentSetup::new(port).sim(sim);
    let f = match mode {
        Mode::Plain => return s.config("[mqtt]\ninflight = 256"),
        Mode::Tls => files(s.dir.path(), &site.ca.cert_pem, None),
        Mode::Mutual => files(
            s.dir.path(),
            &site.ca.cert_pem,
            Some(&site.ca.client(GATEWAY_ID, Validity::Now)),
        ),
    };
    let cfg = tls_config(&format!("mqtts://127.0.0.1:{port}"), &f);
    s.config(&cfg.replace("[mqtt]\n", "[mqtt]\ninflight = 256\n"))
}

fn listener(site: &Site, mode: Mode) -> u16 {
    match mode {
        Mode::Plain => site.broker.port,
        Mode::Tls => site.good,
        Mode::Mutual => site.mutual,
    }
}

fn throughput(site: &Site, mode: Mode, rate: f64, seconds: u64) {
    let arrivals = subscribe_uplinks(site.broker.port);
    let total = (rate * seconds as f64) as u64;
    let sim = format!(
        "synthetic_rate_hz = {rate}\nsynthetic_max_frames = {total}\nsynthetic_payload_size = 24\nsynthetic_devices = 200"
    );
    let (mut agent, _dir) = setup(site, mode, listener(site, mode), &sim).start();
    let pid = agent.pid().unwrap();
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
    let cpu0 = cpu_seconds(pid);
    let done = wait_until(Duration::from_secs(seconds * 4 + 30), || {
        arrivals.count.load(Ordering::Relaxed) >= total
    });
    let cpu = cpu_seconds(pid) - cpu0;
    let (got, fps, lat) = arrivals.delivered();
    println!(
        "{:<7} offered {rate:>5.0} fps x {seconds} s: delivered {got}/{total} {}, {fps:>6.0} fps, \
         latency ms p50 {:.2} p99 {:.2}, cpu {:.3} s/1000 frames, peak rss {:.1} MB",
        format!("{mode:?}"),
        if done { "(all)" } else { "(INCOMPLETE)" },
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        cpu / got.max(1) as f64 * 1000.0,
        peak_rss(pid) as f64 / 1e6,
    );
    let _ = agent.sigterm();
}

fn handshake(site: &Site, mode: Mode, rtt_ms: u64) -> Option<i64> {
    let proxy = Proxy::start(listener(site, mode));
    proxy.shape(Link::delay(rtt_ms / 2, 0));
    let (mut agent, _dir) = setup(site, mode, proxy.port, "").start();
    agent.wait_log("backhaul up", Duration::from_secs(30));
    let ms = log_field(&agent.log(), "backhaul up", "connect_ms");
    let _ = agent.sigterm();
    ms
}

fn main() {
    println!("lora-edge TLS benchmark (release binary, Mosquitto 2 on loopback, 2-core machine)");
    let site = site(None);
    let started = Instant::now();
    for round in 1..=2 {
        println!("round {round}");
        for mode in [Mode::Plain, Mode::Tls, Mode::Mutual] {
            throughput(&site, mode, 100.0, 20);
        }
        for mode in [Mode::Plain, Mode::Tls, Mode::Mutual] {
            throughput(&site, mode, 5000.0, 10);
        }
    }
    for mode in [Mode::Plain, Mode::Tls, Mode::Mutual] {
        let times: Vec<String> = (0..3)
            .map(|_| handshake(&site, mode, 300).map_or("?".into(), |ms| ms.to_string()))
            .collect();
        println!(
            "{:<7} start to CONNACK over a 300 ms round trip: {} ms",
            format!("{mode:?}"),
            times.join(" / ")
        );
    }
    println!("({:.0} s)", started.elapsed().as_secs_f64());
}
