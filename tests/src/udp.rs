//! A Semtech UDP packet forwarder (protocol v2) as lora_pkt_fwd behaves on the wire: PUSH_DATA
//! from one socket, PULL_DATA keep-alives from another that then receives PULL_RESP and answers
//! TX_ACK. Written from the protocol's text, not from the agent: it is the judge of what the
//! agent sends (each PULL_RESP's txpk is read here, with the emulator's own counter at arrival).

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

/// A UDP port free now on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// What the emulator answers to a PULL_RESP.
#[derive(Debug, Clone, PartialEq)]
pub enum TxAnswer {
    /// TX_ACK without JSON (success).
    Ok,
    /// TX_ACK with `{"txpk_ack":{"error":…}}`.
    Error(String),
    /// No TX_ACK at all.
    Silent,
}

/// A PULL_RESP as the forwarder received it.
#[derive(Debug, Clone)]
pub struct PullResp {
    /// The emulator's 1 MHz counter when it arrived.
    pub counter: u32,
    pub token: u16,
    pub txpk: Value,
}

impl PullResp {
    /// The PHYPayload it carries.
    pub fn payload(&self) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(self.txpk["data"].as_str().unwrap_or_default())
            .expect("txpk data is base64")
    }

    /// µs between its arrival and its `tmst` (negative: too late), on the emulator's counter.
    pub fn lead_us(&self) -> Option<i64> {
        let tmst = self.txpk["tmst"].as_u64()? as u32;
        Some(tmst.wrapping_sub(self.counter) as i32 as i64)
    }
}

pub struct Emulator {
    up: UdpSocket,
    down: Arc<UdpSocket>,
    pub eui: u64,
    started: Instant,
    token: AtomicU16,
    pub pull_resps: Arc<Mutex<Vec<PullResp>>>,
    pub answer: Arc<Mutex<TxAnswer>>,
    /// PUSH_ACK tokens received.
    pub push_acks: Arc<Mutex<HashSet<u16>>>,
    pub push_ack_count: Arc<AtomicU64>,
    pub pull_acks: Arc<AtomicU64>,
    /// While false, no PULL_DATA is sent (a forwarder that went away).
    pub pulling: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn header(kind: u8, token: u16, eui: u64) -> Vec<u8> {
    let t = token.to_be_bytes();
    let mut b = vec![2, t[0], t[1], kind];
    b.extend(eui.to_be_bytes());
    b
}

impl Emulator {
    /// A forwarder sending to the agent's `port`, keep-alive every `keepalive`.
    pub fn start(port: u16, eui: u64, keepalive: Duration) -> Emulator {
        let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
        up.connect(server).unwrap();
        let down = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        down.connect(server).unwrap();
        down.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let up_reader = up.try_clone().unwrap();
        up_reader
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut e = Emulator {
            up,
            down: down.clone(),
            eui,
            started: Instant::now(),
            token: AtomicU16::new(fastrand::u16(..)),
            pull_resps: Default::default(),
            answer: Arc::new(Mutex::new(TxAnswer::Ok)),
            push_acks: Default::default(),
            push_ack_count: Default::default(),
            pull_acks: Default::default(),
            pulling: Arc::new(AtomicBool::new(true)),
            stop: Default::default(),
            threads: Vec::new(),
        };
        let (stop, acks, count) = (
            e.stop.clone(),
            e.push_acks.clone(),
            e.push_ack_count.clone(),
        );
        e.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = up_reader.recv(&mut buf) {
                    if n == 4 && buf[0] == 2 && buf[3] == 1 {
                        acks.lock()
                            .unwrap()
                            .insert(u16::from_be_bytes([buf[1], buf[2]]));
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop, resps, answer, pull_acks, pulling, started) = (
            e.stop.clone(),
            e.pull_resps.clone(),
            e.answer.clone(),
            e.pull_acks.clone(),
            e.pulling.clone(),
            e.started,
        );
        e.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut next_pull = Instant::now();
            let mut token = fastrand::u16(..);
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next_pull && pulling.load(Ordering::Relaxed) {
                    token = token.wrapping_add(1);
                    let _ = down.send(&header(2, token, eui));
                    next_pull = Instant::now() + keepalive;
                }
                let Ok(n) = down.recv(&mut buf) else {
                    continue;
                };
                let counter = started.elapsed().as_micros() as u32;
                let b = &buf[..n];
                if n < 4 || b[0] != 2 {
                    continue;
                }
                match b[3] {
                    4 => {
                        pull_acks.fetch_add(1, Ordering::Relaxed);
                    }
                    3 => {
                        let token = u16::from_be_bytes([b[1], b[2]]);
                        let v: Value = serde_json::from_slice(&b[4..]).expect("PULL_RESP JSON");
                        resps.lock().unwrap().push(PullResp {
                            counter,
                            token,
                            txpk: v["txpk"].clone(),
                        });
                        let mut ack = header(5, token, eui);
                        match answer.lock().unwrap().clone() {
                            TxAnswer::Ok => {}
                            TxAnswer::Error(e) => ack.extend(
                                serde_json::to_vec(&json!({"txpk_ack": {"error": e}})).unwrap(),
                            ),
                            TxAnswer::Silent => continue,
                        }
                        let _ = down.send(&ack);
                    }
                    _ => {}
                }
            }
        }));
        e
    }

    /// The emulator's 1 MHz counter now (`tmst`).
    pub fn counter(&self) -> u32 {
        self.started.elapsed().as_micros() as u32
    }

    /// An rxpk as lora_pkt_fwd writes it, received now on `freq_hz` at SF`sf`.
    pub fn rxpk(&self, payload: &[u8], freq_hz: u32, sf: u32) -> Value {
        use base64::Engine;
        json!({
            "jver": 1,
            "tmst": self.counter(),
            "chan": 0,
            "rfch": 0,
            "freq": freq_hz as f64 / 1e6,
            "mid": 0,
            "stat": 1,
            "modu": "LORA",
            "datr": format!("SF{sf}BW125"),
            "codr": "4/5",
            "rssis": -61,
            "lsnr": 9.5,
            "foff": -245,
            "rssi": -60,
            "size": payload.len(),
            "data": base64::engine::general_purpose::STANDARD.encode(payload),
        })
    }

    /// Sends a PUSH_DATA with these rxpk; its token.
    pub fn push(&self, rxpk: Vec<Value>) -> u16 {
        let token = self.token.fetch_add(1, Ordering::Relaxed);
        let mut b = header(0, token, self.eui);
        b.extend(serde_json::to_vec(&json!({ "rxpk": rxpk })).unwrap());
        self.up.send(&b).expect("send PUSH_DATA");
        token
    }

    /// Sends any datagram from the push socket (hostile input).
    pub fn send_raw(&self, b: &[u8]) {
        let _ = self.up.send(b);
    }

    /// Sends any datagram from the pull socket.
    pub fn send_raw_down(&self, b: &[u8]) {
        let _ = self.down.send(b);
    }

    /// A push with this token has been acknowledged.
    pub fn acked(&self, token: u16) -> bool {
        self.push_acks.lock().unwrap().contains(&token)
    }

    pub fn wait_acked(&self, token: u16, timeout: Duration) -> bool {
        crate::bench::wait_until(timeout, || self.acked(token))
    }

    pub fn pull_resps(&self) -> Vec<PullResp> {
        self.pull_resps.lock().unwrap().clone()
    }

    pub fn set_answer(&self, a: TxAnswer) {
        *self.answer.lock().unwrap() = a;
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The agent's configuration for this backend: listen on `port`, believe `eui`.
pub fn backend_config(port: u16, eui: u64) -> String {
    format!(
        "[radio]\nbackend = \"semtech_udp\"\n[radio.semtech_udp]\nlisten = \"127.0.0.1:{port}\"\n\
         gateway_euis = [\"{eui:016x}\"]\nforwarder_timeout = \"5s\"\ntx_ack_timeout = \"2s\"\n"
    )
}

/// Seconds since the Unix epoch, for a GPS `time` field.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let secs = d.as_secs() as i64;
    let dt = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        d.subsec_micros()
    )
}
