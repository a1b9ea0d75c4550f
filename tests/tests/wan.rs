//! The backhaul over a link like the gateways' real ones (VPN, public wifi, cellular): latency,
//! jitter, a thin link, stalls, a broker that never answers, oversized commands. Loopback hid a
//! defect that stopped every gateway: each of these must hold on one TCP connection, with every
//! frame delivered.

use std::time::{Duration, Instant};

use chirpstack_api::gw;
use lora_edge_e2e::*;

const DEVICES: u32 = 16;

fn assert_one_session(proxy: &Proxy, connections_before: u64, agent: &Agent) {
    let log = agent.log();
    assert_eq!(
        proxy.connections() - connections_before,
        1,
        "more than one TCP connection for one session:\n{log}"
    );
    assert!(
        !log.contains("backhaul down"),
        "the session was lost on a working link:\n{log}"
    );
}

#[test]
fn live_traffic_over_a_300_ms_round_trip_with_jitter_arrives_whole_on_one_connection() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.shape(Link::delay(150, 40));
    let collector = Collector::start(broker.port, "eu868");
    // 100 frames/s: every store append wakes the backhaul while it connects.
    let sent = frames(1500, DEVICES, 0, 10.0);
    let (agent, _dir) = AgentSetup::new(proxy.port).scenario(&sent).start();
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(90), &agent);
    assert_one_session(&proxy, 0, &agent);
}

/// A backlog accepted while the broker was unreachable (refused), then the link comes back.
fn backlog_behind(proxy: &Proxy, n: usize) -> (Vec<Frame>, Agent, tempfile::TempDir) {
    proxy.set(Mode::Refuse);
    let sent = frames(n, DEVICES, 0, 1.0);
    let (mut agent, dir) = AgentSetup::new(proxy.port).scenario(&sent).start();
    agent.wait_status("accepted", n as u64, Duration::from_secs(60));
    (sent, agent, dir)
}

#[test]
fn a_backlog_drains_through_a_thin_500_ms_link_without_reconnecting_or_false_alarms() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    let collector = Collector::start(broker.port, "eu868");
    let (sent, agent, _dir) = backlog_behind(&proxy, 3000);
    // ~480 KB of MQTT through 128 kbit/s and 500 ms of round trip: about half a minute.
    proxy.shape(Link::thin(250, 128));
    let before = proxy.connections();
    proxy.set(Mode::Pass);
    agent.wait_log("backhaul up", Duration::from_secs(30));
    let up_at = agent.log().len();
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(180), &agent);
    assert_eq!(proxy.connections() - before, 1, "{}", agent.log());
    let after_up = agent.log()[up_at..].to_string();
    assert!(
        !after_up.contains("backhaul down") && !after_up.contains("no PUBACK"),
        "the drain lost its session on a slow but working link:\n{after_up}"
    );
}

#[test]
fn a_two_second_stall_in_the_middle_of_a_drain_does_not_cost_the_session() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    let collector = Collector::start(broker.port, "eu868");
    let (sent, agent, _dir) = backlog_behind(&proxy, 3000);
    proxy.shape(Link::thin(100, 256));
    let before = proxy.connections();
    proxy.set(Mode::Pass);
    collector.wait_for("/event/up", Duration::from_secs(60), |m| m.len() >= 1000);
    let stalled_at = collector.on("/event/up").len();
    proxy.stall(Duration::from_secs(2));
    assert!(
        stalled_at < sent.len(),
        "the stall must come in the middle of the drain"
    );
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(120), &agent);
    let log = agent.log();
    let after_up = &log[log.find("backhaul up").expect("connected")..];
    assert!(!after_up.contains("backhaul down"), "{after_up}");
    assert_eq!(proxy.connections() - before, 1, "{log}");
}

#[test]
fn a_broker_that_never_sends_connack_is_logged_and_retried_on_one_connection_per_attempt() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::BlackHole);
    let sent = frames(200, DEVICES, 0, 20.0);
    let (agent, _dir) = AgentSetup::new(proxy.port)
        .scenario(&sent)
        .config("[mqtt]\nconnect_timeout = \"2s\"")
        .start();
    assert!(
        agent.wait_log_count(
            "no CONNACK within mqtt.connect_timeout",
            3,
            Duration::from_secs(30)
        ) >= 3,
        "{}",
        agent.log()
    );
    // Each attempt is one connection that ends in one logged failure (the attempt under way
    // when we look may not have failed yet). Connections are counted first, so that a failure
    // logged between the two looks cannot make a slow machine look like a storm.
    let connections = proxy.connections();
    let failures = agent.log().matches("backhaul down").count() as u64;
    assert!(
        connections == failures || connections == failures + 1,
        "{connections} connections for {failures} logged failures:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("retry_in="),
        "each failure says when the next attempt is"
    );
    // Then the link heals: everything arrives.
    let collector = Collector::start(broker.port, "eu868");
    proxy.set(Mode::Pass);
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(60), &agent);
}

#[test]
fn a_downlink_answering_an_uplink_over_a_300_ms_round_trip_goes_out_in_rx1() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.shape(Link::delay(150, 0));
    let collector = Collector::start(broker.port, "eu868");
    let up = frames(1, 1, 2000, 0.0);
    let (agent, dir) = AgentSetup::new(proxy.port).scenario(&up).start();
    // The network server side: answer the uplink as soon as it arrives, in RX1 (1 s).
    let ctx = first_uplink_context(&collector, Duration::from_secs(30));
    publish(
        broker.port,
        DOWN,
        frame(
            7,
            vec![lora(868_100_000, 14, 7, delay(1000), ctx, b"\x60rx1")],
        ),
    );
    assert_eq!(
        ack(&collector, 7, Duration::from_secs(10)),
        vec![gw::TxAckStatus::Ok],
        "{}",
        agent.log()
    );
    let sent = tx_log(dir.path());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].count_us, ctx.wrapping_add(1_000_000), "sent in RX1");
}

#[test]
fn oversized_commands_every_300_ms_do_not_cost_the_session() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    let collector = Collector::start(broker.port, "eu868");
    // 50 frames/s for 12 s.
    let sent = frames(600, DEVICES, 1000, 20.0);
    let (agent, _dir) = AgentSetup::new(proxy.port).scenario(&sent).start();
    agent.wait_log("subscribed: commands will arrive", Duration::from_secs(10));
    let publisher = Publisher::connect(broker.port);
    let huge = vec![0x5a; 2 << 20];
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(10) {
        publisher.send(DOWN, huge.clone());
        n += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        publisher.wait_acked(n, Duration::from_secs(30)),
        "the broker took the oversized commands"
    );
    assert_all_delivered(&collector, sent.len(), Duration::from_secs(60), &agent);
    assert_one_session(&proxy, 0, &agent);
    // A downlink of a normal size still goes out, on the same session.
    publish(
        broker.port,
        DOWN,
        frame(9, vec![lora(869_525_000, 14, 7, immediately(), 0, b"c")]),
    );
    assert_eq!(
        ack(&collector, 9, Duration::from_secs(10)),
        vec![gw::TxAckStatus::Ok],
        "{}",
        agent.log()
    );
    assert_one_session(&proxy, 0, &agent);
}
