//! The agent against the library's real behaviour (the simulator imitates V2.1.0 and
//! ChirpStack's V2.1.0r9 where they matter): a board the library will not start, a radio that
//! goes down with downlinks queued, a shutdown with downlinks queued, and the library's own
//! output in the agent's log.

use std::time::{Duration, Instant};

use chirpstack_api::gw;
use lora_edge_e2e::*;

#[test]
fn upstream_libloragw_on_a_board_without_the_sensor_is_explained_and_downlinks_are_answered_at_once(
) {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // The harness's board is a RAK2287: no STTS751.
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("temperature_sensor = false")
        .start();
    assert!(
        agent.wait_log("has no STTS751 temperature sensor", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("libloragw: ERROR: failed to configure the temperature sensor"),
        "the library's own reason is in the agent's log, with its target:\n{log}"
    );
    assert!(log.contains("V2.1.0r9"), "the fix is named:\n{log}");

    // A downlink while the radio is down: answered at once, never queued. (Once the agent is
    // subscribed: a command published before that reaches nobody; under qemu the subscription
    // lags the connection.)
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let asked = Instant::now();
    publish(
        broker.port,
        DOWN,
        frame(5, vec![lora(869_525_000, 14, 7, immediately(), 0, b"x")]),
    );
    assert_eq!(
        ack(&collector, 5, Duration::from_secs(5)),
        vec![gw::TxAckStatus::InternalError]
    );
    assert!(asked.elapsed() < Duration::from_secs(5));

    // The failed start repeats every ~2 s: logged once, then counted, not a line each time.
    assert!(
        agent.wait_log("repeated=", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("libloragw: ERROR: failed to configure the temperature sensor")
            .count(),
        log.matches("repeated=").count() + 1,
        "{log}"
    );
    // Nothing polls the stopped library: V2.1.0 would print a line for each counter read.
    assert!(
        !log.contains("Failed to get timestamp counter value"),
        "the stopped library was polled:\n{log}"
    );
}

#[test]
fn what_the_library_writes_on_stderr_reaches_the_log_too() {
    let broker = Broker::start();
    // The simulator reports its injected faults on stderr, as libloragw's debug output goes.
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("[faults]\nstart_failures = 1")
        .start();
    assert!(
        agent.wait_log(
            "stderr: [sx1302-sim] lgw_start: injected failure 1/1",
            Duration::from_secs(10)
        ),
        "{}",
        agent.log()
    );
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
}

#[test]
fn chirpstacks_r9_starts_on_the_same_board_and_forwards_frames() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .scenario(&frames(20, 4, 0, 50.0))
        .sim("temperature_sensor = false\nlibrary = \"v2.1.0r9\"")
        .start();
    let ups = collector.wait_for("/event/up", Duration::from_secs(15), |m| m.len() >= 20);
    assert_eq!(ups.len(), 20, "{}", agent.log());
    assert!(!agent.log().contains("has no STTS751"));
}

#[test]
fn with_chirpstacks_r9_the_boards_temperature_sensor_is_located_before_lgw_start() {
    use prost::Message;
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // The fork opens the STTS751 only if told where it is; the CoreCell profile knows.
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("library = \"v2.1.0r9\"\ntemperature_c = 41.5")
        .config("[radio]\nboard = \"semtech_corecell\"")
        .start();
    let temperature = |m: &Msg| {
        gw::GatewayStats::decode(m.payload.as_slice())
            .unwrap()
            .metadata
            .get("concentrator_temperature_c")
            .cloned()
    };
    let stats = collector.wait_for("/event/stats", Duration::from_secs(15), |m| {
        m.iter().any(|m| temperature(m).is_some())
    });
    assert_eq!(
        stats.iter().find_map(temperature).as_deref(),
        Some("41.5"),
        "{}",
        agent.log()
    );
}

#[test]
fn downlinks_queued_when_the_radio_goes_down_are_answered_and_never_sent() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // One uplink, then the SPI link dies: the counter freezes until the watchdog (3 s) restarts
    // the radio.
    let (agent, dir) = AgentSetup::new(broker.port)
        .scenario(&frames(1, 1, 500, 0.0))
        .sim("[faults]\nlink_dead_after_frames = 1")
        .start();
    let ctx = first_uplink_context(&collector, Duration::from_secs(10));
    publish(
        broker.port,
        DOWN,
        frame(
            8,
            vec![lora(869_525_000, 14, 9, delay(20_000), ctx, b"late")],
        ),
    );
    assert_eq!(
        ack(&collector, 8, Duration::from_secs(15)),
        vec![gw::TxAckStatus::InternalError],
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("watchdog"), "{}", agent.log());
    assert!(
        tx_log(dir.path()).is_empty(),
        "scheduled against the old counter: never sent"
    );
}

#[test]
fn downlinks_queued_at_shutdown_are_answered() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, dir) = AgentSetup::new(broker.port)
        .scenario(&frames(1, 1, 500, 0.0))
        .start();
    let ctx = first_uplink_context(&collector, Duration::from_secs(10));
    publish(
        broker.port,
        DOWN,
        frame(
            9,
            vec![lora(869_525_000, 14, 7, delay(60_000), ctx, b"never")],
        ),
    );
    // Delivered to the agent and scheduled a minute ahead.
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.sigterm().success());
    // Said either way: the radio stops first, and a slow machine (qemu) may see it stopped
    // before the stage is told the agent is stopping.
    assert!(
        agent
            .log()
            .contains("scheduled downlink not sent downlink_id=9"),
        "{}",
        agent.log()
    );
    // The answer was stored before the agent stopped; it goes out with the next session.
    agent.start_again();
    assert_eq!(
        ack(&collector, 9, Duration::from_secs(15)),
        vec![gw::TxAckStatus::InternalError]
    );
    assert!(tx_log(dir.path()).is_empty());
}

#[test]
fn version_names_the_hal_inside() {
    let out = std::process::Command::new(agent_binary())
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && v.contains("HAL: simulated concentrator"),
        "{v}"
    );
}
