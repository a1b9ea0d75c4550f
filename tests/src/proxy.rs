//! A TCP proxy between the agent and the broker that injects the outages a backhaul has:
//!
//! - `Refuse`: the port is closed (connection refused) and open connections are reset;
//! - `Reset`: open connections are reset (RST) and new ones are reset as soon as they arrive;
//! - `BlackHole`: bytes vanish in both directions and nothing is closed (a silent cut: no FIN,
//!   no RST). A connection that has been black-holed stays dead afterwards, as a real one whose
//!   TCP peer gave up would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Reset,
    BlackHole,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Bumped to make every open connection reset itself.
    generation: Arc<AtomicU64>,
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
        let generation = Arc::new(AtomicU64::new(0));
        let swallowed = Arc::new(AtomicU64::new(0));
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        {
            let (generation, swallowed) = (generation.clone(), swallowed.clone());
            runtime.spawn(accept_loop(port, upstream, mode_rx, generation, swallowed));
        }
        // Wait until it listens.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < until, "proxy did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Proxy {
            port,
            mode,
            generation,
            runtime: Some(runtime),
            swallowed_bytes: swallowed,
        }
    }

    pub fn set(&self, mode: Mode) {
        if matches!(mode, Mode::Refuse | Mode::Reset) {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.mode.send_replace(mode);
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

async fn accept_loop(
    port: u16,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    generation: Arc<AtomicU64>,
    swallowed: Arc<AtomicU64>,
) {
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
                    let current = *mode.borrow();
                    match current {
                        Mode::Reset | Mode::Refuse => reset(client),
                        _ => {
                            tokio::spawn(connection(client, upstream, mode.clone(), generation.clone(), swallowed.clone()));
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

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    generation: Arc<AtomicU64>,
    swallowed: Arc<AtomicU64>,
) {
    let born = generation.load(Ordering::SeqCst);
    // Linger 0 on both sockets: when a reset is asked for, dropping them sends RST.
    let _ = client.set_zero_linger();
    let _ = client.set_nodelay(true);
    let blackholed = Arc::new(AtomicBool::new(*mode.borrow() == Mode::BlackHole));
    let server = if blackholed.load(Ordering::SeqCst) {
        None
    } else {
        TcpStream::connect(upstream).await.ok()
    };
    let (cr, cw) = client.into_split();
    let (up, down) = match server {
        Some(server) => {
            let _ = server.set_zero_linger();
            let _ = server.set_nodelay(true);
            let (sr, sw) = server.into_split();
            (
                tokio::spawn(pump(
                    cr,
                    Some(sw),
                    mode.clone(),
                    blackholed.clone(),
                    swallowed.clone(),
                )),
                tokio::spawn(pump(
                    sr,
                    Some(cw),
                    mode.clone(),
                    blackholed.clone(),
                    swallowed.clone(),
                )),
            )
        }
        // Black hole from the start: take the bytes, answer nothing, never close.
        None => (
            tokio::spawn(pump(
                cr,
                None,
                mode.clone(),
                blackholed.clone(),
                swallowed.clone(),
            )),
            tokio::spawn(async move {
                std::future::pending::<()>().await;
                drop(cw);
            }),
        ),
    };
    let mut m = mode.clone();
    loop {
        if generation.load(Ordering::SeqCst) != born || up.is_finished() || down.is_finished() {
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

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: Option<tokio::net::tcp::OwnedWriteHalf>,
    mode: watch::Receiver<Mode>,
    blackholed: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *mode.borrow() == Mode::BlackHole {
            blackholed.store(true, Ordering::SeqCst);
        }
        match to.as_mut() {
            Some(to) if !blackholed.load(Ordering::SeqCst) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => {
                swallowed.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}
