//! The agent against the library's real behaviour (the simulator imitates V2.1.0 and
//! ChirpStack's V2.1.0r9 where they matter): a board the library will not start, a radio that
//! goes down with downlinks queued, a shutdown with downlinks queued, and the library's own
//! output in the agent's log.

use std::time::{Duration, Instant};

use chirpstack_api::gw;
use lora_edge_e2e::*;

/// Waits for a stats message of any gateway whose metadata satisfies `pred`; returns its topic's
/// gateway ID with the metadata.
fn wait_stats(
    c: &Collector,
    timeout: Duration,
    pred: impl Fn(&std::collections::HashMap<String, String>) -> bool,
) -> Option<(String, std::collections::HashMap<String, String>)> {
    use prost::Message;
    let until = Instant::now() + patience(timeout);
    while Instant::now() < until {
        for m in c.on("/event/stats") {
            let Ok(s) = gw::GatewayStats::decode(m.payload.as_slice()) else {
                continue;
            };
            if pred(&s.metadata) {
                let id = m.topic.split('/').nth(2).unwrap_or_default().to_string();
                return Some((id, s.metadata));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The index of the first line of `log` containing `needle`.
fn line_of(log: &str, needle: &str) -> Option<usize> {
    log.lines().position(|l| l.contains(needle))
}

#[test]
fn upstream_libloragw_on_a_board_without_the_sensor_is_diagnosed_from_its_own_lines_and_downlinks_are_answered_at_once(
) {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // The harness's board is a RAK2287: no STTS751.
    let mut setup = AgentSetup::new(broker.port).sim("temperature_sensor = false");
    setup
        .env
        .push(("RUST_LOG".into(), "info,libloragw=debug".into()));
    let (agent, _dir) = setup.start();
    assert!(
        agent.wait_log("radio down; restarting", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    // V2.1.0's lgw_start (loragw_hal.c): the sensor probed at its three addresses, then given
    // up; all of it logged, in the library's order, before the agent's line about it.
    let sequence = [
        "libloragw: Opening SPI communication interface",
        "libloragw: Note: chip version is 0x10 (v1.0)",
        "libloragw: INFO: no temperature sensor found on port 0x39",
        "libloragw: INFO: no temperature sensor found on port 0x3B",
        "libloragw: INFO: no temperature sensor found on port 0x38",
        "libloragw: ERROR: no temperature sensor found.",
        "radio down; restarting",
    ];
    let at: Vec<Option<usize>> = sequence.iter().map(|n| line_of(&log, n)).collect();
    assert!(
        at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]),
        "{at:?}\n{log}"
    );
    let down = &log.lines().nth(at[6].unwrap()).unwrap().to_string();
    assert!(
        down.contains("cause=\"no_temperature_sensor\"")
            && down.contains("library_said=\"ERROR: no temperature sensor found.\"")
            && down.contains("V2.1.0r9"),
        "the fix is named after the library's words:\n{down}"
    );

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

    // The centre sees it in the stats, in the library's words and the agent's.
    let (id, m) = wait_stats(&collector, Duration::from_secs(10), |m| {
        m.get("radio").map(String::as_str) == Some("down")
    })
    .unwrap_or_else(|| panic!("no stats saying the radio is down\n{}", agent.log()));
    assert_eq!(id, GATEWAY_ID);
    assert_eq!(
        m.get("radio_cause").map(String::as_str),
        Some("no_temperature_sensor"),
        "{m:?}"
    );
    assert_eq!(
        m.get("radio_last_error").map(String::as_str),
        Some("ERROR: no temperature sensor found."),
        "{m:?}"
    );
    assert!(m["radio_diagnosis"].contains("V2.1.0r9"), "{m:?}");
    assert!(m.contains_key("radio_since"), "{m:?}");
    assert!(!m.contains_key("concentrator_temperature_c"), "{m:?}");
    // A clean start is not a backhaul outage.
    assert_eq!(
        m.get("backhaul_outages_total").map(String::as_str),
        Some("0"),
        "{m:?}"
    );
    // The log's status line says it too.
    assert!(
        agent.wait_log("radio=\"down\"", Duration::from_secs(5)),
        "{}",
        agent.log()
    );

    // Nothing polls the stopped library: V2.1.0 would print a line for each counter read.
    assert!(
        !agent
            .log()
            .contains("Failed to get timestamp counter value"),
        "the stopped library was polled:\n{}",
        agent.log()
    );
}

#[test]
fn each_way_a_radio_fails_is_diagnosed_and_the_gateway_reaches_the_centre_without_a_configured_id()
{
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // (simulator faults, cause, the library's line the diagnosis quotes, words the advice has,
    // words it must not have). Sequences: V2.1.0's lgw_start, as the simulator prints them.
    let cases: [(&str, &str, &str, &str, &str); 6] = [
        (
            "[faults]\nspi = \"no_device\"",
            "no_spi_device",
            "Opening SPI communication interface",
            "SPI",
            "r9",
        ),
        (
            "[faults]\nspi = \"answers_0x00\"",
            "spi_silent",
            "Note: chip version is 0x00 (v0.0)",
            "nothing answers",
            "r9",
        ),
        (
            "[faults]\nspi = \"answers_0xff\"",
            "spi_silent",
            "Note: chip version is 0xFF (v15.15)",
            "nothing answers",
            "r9",
        ),
        (
            "[faults]\nradio_calibration_error = true",
            "radio_calibration",
            "ERROR: sx1250 Image Calibration Error",
            "calibrate",
            "r9",
        ),
        (
            "temperature_sensor = false\n[faults]\ni2c_device = false",
            "no_i2c_device",
            "ERROR: failed to open I2C for temperature sensor on port 0x39",
            "V2.1.0r9",
            "nothing answers",
        ),
        // ChirpStack's fork never asks for the sensor: its SPI failure says nothing of r9.
        (
            "temperature_sensor = false\nlibrary = \"v2.1.0r9\"\n[faults]\nspi = \"no_device\"",
            "no_spi_device",
            "Opening SPI communication interface",
            "SPI",
            "r9",
        ),
    ];
    for (faults, cause, said, has, has_not) in cases {
        let mut setup = AgentSetup::new(broker.port)
            .sim(faults)
            .config("[gateway]\neui_wait = \"1s\"");
        // As the shipped configuration: no gateway.id.
        setup.id_from_eui = true;
        let (mut agent, _dir) = setup.start();
        let found = wait_stats(&collector, Duration::from_secs(20), |m| {
            m.get("radio_cause").map(String::as_str) == Some(cause)
                && m.get("radio_last_error").map(String::as_str) == Some(said)
        });
        let Some((id, m)) = found else {
            panic!("{faults}: no stats with cause {cause}\n{}", agent.log());
        };
        assert_eq!(m.get("radio").map(String::as_str), Some("down"), "{m:?}");
        let advice = &m["radio_diagnosis"];
        assert!(
            advice.contains(has) && !advice.contains(has_not),
            "{faults}: {advice}"
        );
        // Never the concentrator's EUI: the radio never started.
        assert!(
            id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()) && id != GATEWAY_ID,
            "{id}"
        );
        assert!(!m.contains_key("concentrator_eui"), "{m:?}");
        assert!(agent.sigterm().success(), "{}", agent.log());
        collector.clear();
    }
}

#[test]
fn a_gateway_named_by_its_machine_takes_its_concentrators_eui_once_the_radio_works_and_keeps_it() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // The radio is dead from the first boot on: a name derived from the machine.
    let mut setup = AgentSetup::new(broker.port).sim("[faults]\nspi = \"no_device\"");
    setup.id_from_eui = true;
    let (mut agent, _dir) = setup.start();
    let (derived, _) = wait_stats(&collector, Duration::from_secs(30), |m| {
        m.get("radio").map(String::as_str) == Some("down")
    })
    .unwrap_or_else(|| panic!("{}", agent.log()));
    assert_ne!(derived, GATEWAY_ID);
    assert!(agent.sigterm().success());
    // The board is mended: the radio names its EUI, which names the gateway from now on, as
    // the network server knows it.
    agent.set_simulator("");
    collector.clear();
    agent.start_again();
    let (named, m) = wait_stats(&collector, Duration::from_secs(30), |m| {
        m.get("radio").map(String::as_str) == Some("up")
    })
    .unwrap_or_else(|| panic!("{}", agent.log()));
    assert_eq!(named, GATEWAY_ID, "{}", agent.log());
    assert_eq!(
        m.get("concentrator_eui").map(String::as_str),
        Some(GATEWAY_ID)
    );
    assert!(agent.sigterm().success());
    // The radio dies again: the gateway keeps the name it had on this machine.
    agent.set_simulator("[faults]\nspi = \"no_device\"");
    collector.clear();
    agent.start_again();
    let (kept, m) = wait_stats(&collector, Duration::from_secs(30), |m| {
        m.get("radio").map(String::as_str) == Some("down")
    })
    .unwrap_or_else(|| panic!("{}", agent.log()));
    assert_eq!(kept, GATEWAY_ID, "{m:?}\n{}", agent.log());
    assert!(
        agent
            .log()
            .contains("seen on this machine at an earlier start"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_downlink_during_a_slow_start_is_answered_before_the_start_ends() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // Real starts calibrate for seconds; this one takes 8 s, then fails (no SPI device), and
    // the next one takes as long.
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("[faults]\nstart_delay_ms = 8000\nspi = \"no_device\"")
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("radio down"),
        "the first start already ended: the machine is too slow for this test\n{}",
        agent.log()
    );
    let asked = Instant::now();
    publish(
        broker.port,
        DOWN,
        frame(6, vec![lora(869_525_000, 14, 7, immediately(), 0, b"x")]),
    );
    assert_eq!(
        ack(&collector, 6, Duration::from_secs(20)),
        vec![gw::TxAckStatus::InternalError]
    );
    let answered = asked.elapsed();
    // The start still runs: the answer did not wait for it (before, it waited ~8 s).
    assert!(
        !agent.log().contains("radio down"),
        "answered only after the start ended ({answered:?})\n{}",
        agent.log()
    );
    eprintln!(
        "downlink during an 8 s start answered in {} ms",
        answered.as_millis()
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
    let log = agent.log();
    assert!(!log.contains("has no STTS751"));
    // r9's lgw_get_temperature on a board without the sensor prints an ERROR line: the agent
    // does not ask.
    assert!(!log.contains("invalid I2C file descriptor"), "{log}");
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
        out.status.success() && v.contains("HAL: simulated concentrator") && v.contains("V2.1.0r9"),
        "{v}"
    );
}
