//! The agent under systemd (as the package runs it): READY=1 once started, WATCHDOG=1 while the
//! radio loop, the store and the backhaul make progress — a broker that cannot be reached is
//! progress too (the backhaul retrying), or every outage would restart every gateway.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use lora_edge_e2e::*;

#[test]
fn under_systemd_the_agent_is_ready_and_feeds_the_watchdog_through_a_backhaul_outage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // No broker at all on this port.
    let mut setup = AgentSetup::new(free_port());
    setup.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        // The stages beat at least once a second when idle: a watchdog of a few seconds (the
        // unit has 30 s) leaves them room; 2 s would leave none.
        ("WATCHDOG_USEC".into(), "6000000".into()),
    ];
    let (mut agent, _d) = setup.start();
    let mut messages: Vec<String> = Vec::new();
    // Six pings (nine seconds of progress at one every 1.5 s), however slowly the machine
    // starts the agent; a watchdog no longer fed never gets there.
    let until = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 512];
    while Instant::now() < until && messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 6
    {
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    let ready = messages.iter().filter(|m| m.contains("READY=1")).count();
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let log = agent.log();
    assert_eq!(ready, 1, "{messages:?}\n{log}");
    // One every 1.5 s: a quarter of the 6 s watchdog.
    assert!(
        pings >= 6,
        "{pings} watchdog pings in 30 s: {messages:?}\n{log}"
    );
    assert!(
        log.contains("backhaul down"),
        "the broker was meant to be unreachable"
    );
    assert!(!log.contains("no progress"), "{log}");
    agent.sigterm();
}
