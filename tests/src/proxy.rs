//! A TCP proxy between the agent and the broker that injects the outages a backhaul has:
//!
//! - `Refuse`: the port is closed (connection refused) and open connections are reset;
//! - `Reset`: open connections are reset (RST) and new ones are reset as soon as they arrive;
//! - `BlackHole`: bytes vanish in both directions and nothing is closed (a silent cut: no FIN,
//!   no RST). A connection that has been black-holed stays dead afterwards, as a real one whose
//!   TCP peer gave up would.
//!
//! and, in `Pass` mode, the link a real backhaul is (`shape`): per direction a latency, a jitter
//! that keeps the byte order (as TCP would deliver it), a capacity in kbit/s with a bounded queue
//! in front of it (so a thin link pushes back on the sender, as a router's buffer does), and
//! `stall`: bytes held for a while, the connection kept. It counts the TCP connections it
//! accepted, so a test can tell one session from a connection storm.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Reset,
    BlackHole,
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Added to every byte.
    pub latency: Duration,
    /// An extra delay drawn from [0, jitter] for each chunk; never reorders bytes.
    pub jitter: Duration,
    /// Capacity; 0 is unlimited.
    pub kbit_per_s: u32,
}

impl Link {
    pub fn delay(latency_ms: u64, jitter_ms: u64) -> Link {
        Link {
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::from_millis(jitter_ms),
            kbit_per_s: 0,
        }
    }

    pub fn thin(latency_ms: u64, kbit_per_s: u32) -> Link {
        Link {
            kbit_per_s,
            ..Link::delay(latency_ms, 0)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Agent to broker.
    Up,
    /// Broker to agent.
    Down,
}

#[derive(Debug, Default)]
struct Shaping {
    up: Link,
    down: Link,
    /// Nothing is delivered, in either direction, before this instant.
    held_until: Option<Instant>,
}

type Shared = Arc<Mutex<Shaping>>;

/// What every connection shares with the proxy.
#[derive(Clone)]
struct Ctl {
    mode: watch::Receiver<Mode>,
    /// Bumped to make every open connection reset itself.
    generation: Arc<AtomicU64>,
    swallowed: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    shaping: Shared,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    ctl: Ctl,
    runtime: Option<tokio::runtime::Runtime>,
    pub swallowed_bytes: Arc<AtomicU64>,
}

fn reset(stream: TcpStream) {
    // Linger 0 makes close send RST instead of FIN.
    let _ = stream.set_zero_linger();
    drop(stream);
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let port = crate::free_port();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let ctl = Ctl {
            mode: mode_rx,
            generation: Arc::new(AtomicU64::new(0)),
            swallowed: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(AtomicU64::new(0)),
            shaping: Shared::default(),
        };
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        runtime.spawn(accept_loop(port, upstream, ctl.clone()));
        // Wait until it listens.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < until, "proxy did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The probe that got through was a connection too: count from zero once it is accepted.
        while ctl.accepted.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < until, "proxy did not accept");
            std::thread::sleep(Duration::from_millis(5));
        }
        ctl.accepted.store(0, Ordering::SeqCst);
        Proxy {
            port,
            mode,
            swallowed_bytes: ctl.swallowed.clone(),
            ctl,
            runtime: Some(runtime),
        }
    }

    pub fn set(&self, mode: Mode) {
        if matches!(mode, Mode::Refuse | Mode::Reset) {
            self.ctl.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.mode.send_replace(mode);
    }

    /// The same link both ways (a round trip is twice its latency).
    pub fn shape(&self, link: Link) {
        self.shape_dir(Dir::Up, link);
        self.shape_dir(Dir::Down, link);
    }

    /// Applies to the bytes read from now on, in open connections too.
    pub fn shape_dir(&self, dir: Dir, link: Link) {
        let mut s = self.ctl.shaping.lock().unwrap();
        match dir {
            Dir::Up => s.up = link,
            Dir::Down => s.down = link,
        }
    }

    /// Holds every byte, both ways, for `d`; connections stay open and nothing is lost.
    pub fn stall(&self, d: Duration) {
        self.ctl.shaping.lock().unwrap().held_until = Some(Instant::now() + d);
    }

    /// TCP connections accepted since the proxy started.
    pub fn connections(&self) -> u64 {
        self.ctl.accepted.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(port: u16, upstream: SocketAddr, ctl: Ctl) {
    let mut mode = ctl.mode.clone();
    loop {
        if *mode.borrow() == Mode::Refuse {
            // No listener at all: connections are refused.
            let _ = mode.wait_for(|m| *m != Mode::Refuse).await;
            continue;
        }
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    let n = ctl.accepted.fetch_add(1, Ordering::SeqCst);
                    let current = *mode.borrow();
                    match current {
                        Mode::Reset | Mode::Refuse => reset(client),
                        _ => {
                            tokio::spawn(connection(client, upstream, ctl.clone(), n));
                        }
                    }
                }
                _ = mode.changed() => {
                    if *mode.borrow() == Mode::Refuse {
                        break;
                    }
                }
            }
        }
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, ctl: Ctl, n: u64) {
    let born = ctl.generation.load(Ordering::SeqCst);
    // Linger 0 on both sockets: when a reset is asked for, dropping them sends RST.
    let _ = client.set_zero_linger();
    let _ = client.set_nodelay(true);
    let blackholed = Arc::new(AtomicBool::new(*ctl.mode.borrow() == Mode::BlackHole));
    let server = if blackholed.load(Ordering::SeqCst) {
        None
    } else {
        TcpStream::connect(upstream).await.ok()
    };
    let (cr, cw) = client.into_split();
    let pipe = |from, to, dir, seed| {
        tokio::spawn(pipe(from, to, dir, ctl.clone(), blackholed.clone(), seed))
    };
    let (up, down) = match server {
        Some(server) => {
            let _ = server.set_zero_linger();
            let _ = server.set_nodelay(true);
            let (sr, sw) = server.into_split();
            (
                pipe(cr, Some(sw), Dir::Up, 2 * n),
                pipe(sr, Some(cw), Dir::Down, 2 * n + 1),
            )
        }
        // Black hole from the start: take the bytes, answer nothing, never close.
        None => (
            pipe(cr, None, Dir::Up, 2 * n),
            tokio::spawn(async move {
                std::future::pending::<()>().await;
                drop(cw);
            }),
        ),
    };
    let mut m = ctl.mode.clone();
    loop {
        if ctl.generation.load(Ordering::SeqCst) != born || up.is_finished() || down.is_finished() {
            up.abort();
            down.abort();
            let _ = up.await;
            let _ = down.await;
            return;
        }
        tokio::select! {
            _ = m.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// A chunk of bytes on its way, with when the proxy read it.
struct Chunk {
    bytes: Vec<u8>,
    read_at: Instant,
}

/// One direction: a reader that takes bytes as the link's queue has room, and a writer that
/// delivers each chunk when the link would (serialisation at the capacity, then latency and
/// jitter, never before an earlier chunk, and not while stalled).
async fn pipe(
    mut from: OwnedReadHalf,
    to: Option<OwnedWriteHalf>,
    dir: Dir,
    ctl: Ctl,
    blackholed: Arc<AtomicBool>,
    seed: u64,
) {
    let link = |ctl: &Ctl| {
        let s = ctl.shaping.lock().unwrap();
        match dir {
            Dir::Up => s.up,
            Dir::Down => s.down,
        }
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let has_sink = to.is_some();
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let reader = {
        let (ctl, queued) = (ctl.clone(), queued.clone());
        async move {
            let mut buf = vec![0u8; 16384];
            loop {
                let l = link(&ctl);
                // A thin link holds about a second of data in front of it (at least 4 KiB);
                // beyond that the sender's own socket fills, as behind a real router.
                let room = match l.kbit_per_s {
                    0 => usize::MAX,
                    k => (k as usize * 125).max(4096),
                };
                while queued.load(Ordering::SeqCst) >= room {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let max = if l.kbit_per_s > 0 { 512 } else { buf.len() };
                let n = match from.read(&mut buf[..max]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *ctl.mode.borrow() == Mode::BlackHole {
                    blackholed.store(true, Ordering::SeqCst);
                }
                if !has_sink || blackholed.load(Ordering::SeqCst) {
                    ctl.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                queued.fetch_add(n, Ordering::SeqCst);
                let chunk = Chunk {
                    bytes: buf[..n].to_vec(),
                    read_at: Instant::now(),
                };
                if tx.send(chunk).is_err() {
                    return;
                }
            }
        }
    };
    let writer = async move {
        let Some(mut to) = to else { return };
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut link_free = Instant::now();
        let mut last_delivery = Instant::now();
        while let Some(chunk) = rx.recv().await {
            let l = link(&ctl);
            let serialise = match l.kbit_per_s {
                0 => Duration::ZERO,
                k => Duration::from_secs_f64(chunk.bytes.len() as f64 * 8.0 / (k as f64 * 1000.0)),
            };
            link_free = link_free.max(chunk.read_at) + serialise;
            let jitter = l.jitter.mul_f64(rng.f64());
            let deliver = (link_free + l.latency + jitter).max(last_delivery);
            last_delivery = deliver;
            tokio::time::sleep_until(deliver.into()).await;
            loop {
                let held = ctl.shaping.lock().unwrap().held_until;
                match held {
                    Some(t) if t > Instant::now() => tokio::time::sleep_until(t.into()).await,
                    _ => break,
                }
            }
            queued.fetch_sub(chunk.bytes.len(), Ordering::SeqCst);
            if to.write_all(&chunk.bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
