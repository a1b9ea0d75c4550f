//! Helpers for the benchmarks: process figures from /proc and a light subscriber that keeps
//! only what the figures need.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
use prost::Message;

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident set size now, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// Peak resident set size, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// User + system CPU seconds used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

/// Bytes the process caused to be written to storage.
pub fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("write_bytes:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Allocated size of a directory tree (st_blocks), i.e. what it really takes on disk.
pub fn disk_usage(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                total += if m.is_dir() {
                    disk_usage(&e.path())
                } else {
                    m.blocks() * 512
                };
            }
        }
    }
    total
}

/// Samples the RSS of a process every 50 ms; `max()` is the peak since the last `reset()`.
pub struct RssSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { max, stop }
    }
    pub fn reset(&self) {
        self.max.store(0, Ordering::Relaxed);
    }
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// For each uplink: when it arrived and its reception time, in µs since the epoch.
#[derive(Default)]
pub struct Arrivals {
    pub count: AtomicU64,
    pub samples: Mutex<Vec<(u64, u64)>>,
}

impl Arrivals {
    /// Frames delivered, their rate (first to last arrival) and their latencies (reception time
    /// to arrival), in ms, sorted.
    pub fn delivered(&self) -> (u64, f64, Vec<f64>) {
        let got = self.count.load(Ordering::Relaxed);
        let samples = self.samples.lock().unwrap().clone();
        let first = samples.iter().map(|s| s.0).min().unwrap_or(0);
        let last = samples.iter().map(|s| s.0).max().unwrap_or(0);
        let fps = got as f64 / ((last - first) as f64 / 1e6).max(1e-3);
        let mut lat: Vec<f64> = samples
            .iter()
            .filter(|s| s.1 > 0)
            .map(|s| (s.0 as f64 - s.1 as f64) / 1000.0)
            .collect();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (got, fps, lat)
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A QoS 1 subscriber to `event/up` that records arrival and reception times.
pub fn subscribe_uplinks(port: u16) -> Arc<Arrivals> {
    let arrivals = Arc::new(Arrivals::default());
    let mut o =
        rumqttc::MqttOptions::new(format!("bench-{}", crate::free_port()), "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(1000);
    let (client, mut conn) = rumqttc::Client::new(o, 1000);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    let ready = Arc::new(AtomicBool::new(false));
    {
        let (a, ready) = (arrivals.clone(), ready.clone());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)))
                        if !c.session_present =>
                    {
                        let _ =
                            client.try_subscribe("+/gateway/+/event/up", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        ready.store(true, Ordering::Relaxed)
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let now = micros(SystemTime::now());
                        if let Ok(f) = gw::UplinkFrame::decode(p.payload.as_ref()) {
                            let t = f
                                .rx_info
                                .and_then(|r| r.gw_time)
                                .map(|t| t.seconds as u64 * 1_000_000 + t.nanos as u64 / 1000);
                            a.samples.lock().unwrap().push((now, t.unwrap_or(0)));
                        }
                        a.count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
    }
    let until = Instant::now() + Duration::from_secs(10);
    while !ready.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < until,
            "bench subscriber could not subscribe"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    arrivals
}

/// p-th percentile (0..=100) of a sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}
