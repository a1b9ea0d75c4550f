//! The uplink path, end to end: simulated concentrator → lora-edge → Mosquitto → a subscriber
//! that decodes every message with chirpstack_api.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
use lora_edge_e2e::*;
use prost::Message;

fn check_every_field(json: bool) {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let sent = frames(40, 5, 200, 25.0);
    let counter_start: u32 = 1_000_000;
    let mut setup = AgentSetup::new(broker.port)
        .scenario(&sent)
        .sim(&format!("counter_start_us = {counter_start}"));
    if json {
        setup = setup.json();
    }
    let before = SystemTime::now();
    let (_agent, _dir) = setup.start();

    let got = collector.wait_for("/event/up", Duration::from_secs(30), |m| {
        m.len() >= sent.len()
    });
    assert_eq!(
        got.len(),
        sent.len(),
        "every scenario frame is published once"
    );
    let after = SystemTime::now();
    let mut seqs = Vec::new();
    let mut uplink_ids = std::collections::HashSet::new();
    for (msg, f) in got.iter().zip(&sent) {
        assert_eq!(msg.topic, format!("eu868/gateway/{GATEWAY_ID}/event/up"));
        let up = decode_uplink(&msg.payload, json);
        assert_eq!(up.phy_payload, f.payload, "frames arrive in scenario order");
        let tx = up.tx_info.as_ref().expect("tx_info");
        assert_eq!(tx.frequency, f.freq_hz);
        match tx.modulation.as_ref().and_then(|m| m.parameters.as_ref()) {
            Some(gw::modulation::Parameters::Lora(l)) => {
                assert_eq!(l.spreading_factor, f.sf);
                assert_eq!(l.bandwidth, 125_000);
                assert_eq!(l.code_rate(), gw::CodeRate::Cr45);
            }
            other => panic!("LoRa modulation expected, got {other:?}"),
        }
        let rx = up.rx_info.as_ref().expect("rx_info");
        assert_eq!(rx.gateway_id, GATEWAY_ID);
        assert_eq!(rx.rssi, f.rssi);
        assert_eq!(rx.snr, f.snr);
        assert_eq!(rx.channel, f.if_chain);
        assert_eq!(rx.rf_chain, f.rf_chain);
        assert_eq!(rx.crc_status(), gw::CrcStatus::CrcOk);
        // The context is the 1 MHz counter at the frame, big-endian.
        let expected_counter = counter_start.wrapping_add((f.offset_ms * 1000) as u32);
        assert_eq!(
            rx.context,
            expected_counter.to_be_bytes().to_vec(),
            "context of frame at {} ms",
            f.offset_ms
        );
        let t = rx.gw_time.as_ref().expect("gw_time");
        let at = UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
        assert!(
            at >= before && at <= after,
            "gw_time is the wall-clock reception time"
        );
        assert!(
            rx.uplink_id != 0 && uplink_ids.insert(rx.uplink_id),
            "uplink ids are unique"
        );
        seqs.push(seq_of(&up));
    }
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequence numbers increase: {seqs:?}"
    );
}

#[test]
fn every_scenario_frame_arrives_with_all_its_metadata_in_protobuf() {
    check_every_field(false);
}

#[test]
fn every_scenario_frame_arrives_with_all_its_metadata_in_json() {
    check_every_field(true);
}

#[test]
fn frames_across_the_counter_wrap_carry_the_wrapped_counter() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // Start 300 ms before the wrap; frames every 100 ms cross it.
    let start = u32::MAX - 300_000;
    let sent = frames(8, 2, 0, 100.0);
    let (_agent, _dir) = AgentSetup::new(broker.port)
        .scenario(&sent)
        .sim(&format!("counter_start_us = {start}"))
        .start();
    let got = collector.wait_for("/event/up", Duration::from_secs(20), |m| {
        m.len() >= sent.len()
    });
    assert_eq!(got.len(), sent.len());
    let counters: Vec<u32> = got
        .iter()
        .map(|m| {
            let up = decode_uplink(&m.payload, false);
            u32::from_be_bytes(up.rx_info.unwrap().context.try_into().unwrap())
        })
        .collect();
    for (c, f) in counters.iter().zip(&sent) {
        assert_eq!(*c, start.wrapping_add((f.offset_ms * 1000) as u32));
    }
    assert!(
        counters.iter().any(|&c| c < 1_000_000),
        "some frames are past the wrap: {counters:?}"
    );
    assert!(
        counters
            .windows(2)
            .all(|w| w[1].wrapping_sub(w[0]) == 100_000),
        "wrapping distance: {counters:?}"
    );
}

#[test]
fn a_radio_that_fails_to_start_or_to_receive_is_restarted_and_frames_keep_coming() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let sent = frames(30, 3, 0, 100.0);
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .scenario(&sent)
        .sim("[faults]\nstart_failures = 2\nreceive_error_after_frames = [10, 20]")
        .start();
    let got = collector.wait_for("/event/up", Duration::from_secs(60), |m| {
        m.len() >= sent.len()
    });
    let d = delivery(&got, sent.len() as u32, false);
    assert!(
        d.missing.is_empty(),
        "missing after restarts: {:?}",
        d.missing
    );
    assert_eq!(
        agent.wait_log_count("concentrator started", 3, Duration::from_secs(20)),
        3,
        "{}",
        agent.log()
    );
    let log = agent.log();
    // (The status lines repeat the last error: count the radio's own lines.)
    assert_eq!(
        log.matches("radio down; restarting why=lgw_start failed")
            .count(),
        2,
        "two failed starts logged:\n{log}"
    );
    assert_eq!(
        log.matches("radio down; restarting why=lgw_receive failed")
            .count(),
        2,
        "two receive failures logged:\n{log}"
    );
    assert!(agent.is_running());
}

#[test]
fn a_dead_link_that_returns_nothing_trips_the_watchdog_and_the_radio_restarts() {
    let broker = Broker::start();
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 20.0\n[faults]\nlink_dead_after_frames = 20")
        .start();
    assert!(
        agent.wait_log(
            "watchdog: the concentrator counter has not moved",
            Duration::from_secs(20)
        ),
        "{}",
        agent.log()
    );
    assert!(agent.wait_log("concentrator started", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.log().matches("concentrator started").count() >= 2,
        "{}",
        agent.log()
    );
    assert!(agent.is_running());
}

#[test]
fn sighup_does_not_stop_the_agent() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 20.0")
        .start();
    collector.wait_for("/event/up", Duration::from_secs(15), |m| !m.is_empty());
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    // No rules here: the files are checked again, nothing else changes.
    assert!(
        agent.wait_log("SIGHUP: reloaded", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    let before = collector.on("/event/up").len();
    let after = collector.wait_for("/event/up", Duration::from_secs(10), |m| {
        m.len() > before + 20
    });
    assert!(after.len() > before + 20, "still forwarding after SIGHUP");
    assert!(agent.is_running());
    assert!(agent.sigterm().success());
}

#[test]
fn sigterm_publishes_offline_and_exits_zero() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 5.0")
        .start();
    let state = |m: &Msg| gw::ConnState::decode(m.payload.as_slice()).unwrap();
    // An attempt that times out after the broker took its CONNECT ends in the will (OFFLINE)
    // before the next attempt's ONLINE: wait for ONLINE rather than assume it comes first.
    let online = collector.wait_for("/state/conn", Duration::from_secs(15), |m| {
        m.iter()
            .any(|m| state(m).state() == gw::conn_state::State::Online)
    });
    let first_online = online
        .iter()
        .map(state)
        .find(|s| s.state() == gw::conn_state::State::Online);
    assert_eq!(
        first_online.expect("ONLINE published").gateway_id,
        GATEWAY_ID
    );
    let seen_before = online.len();
    let status = agent.sigterm();
    assert!(status.success(), "exit status {status:?}");
    let states = collector.wait_for("/state/conn", Duration::from_secs(5), |m| {
        m.len() > seen_before
    });
    assert_eq!(
        state(states.last().unwrap()).state(),
        gw::conn_state::State::Offline,
        "OFFLINE is the last word"
    );
    // Retained: a subscriber arriving later learns the gateway is offline.
    let late = Collector::start(broker.port, "eu868");
    let seen = late.wait_for("/state/conn", Duration::from_secs(5), |m| !m.is_empty());
    assert!(seen[0].retain);
    assert_eq!(
        gw::ConnState::decode(seen[0].payload.as_slice())
            .unwrap()
            .state(),
        gw::conn_state::State::Offline
    );
}

#[test]
fn stats_report_counts_and_the_buffer_state() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    // A board with the STTS751 (the harness's RAK2287 has none: no temperature).
    let (_agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 20.0")
        .config("[radio]\nboard = \"semtech_corecell\"")
        .start();
    let stats = collector.wait_for("/event/stats", Duration::from_secs(15), |m| m.len() >= 3);
    assert!(stats.len() >= 3);
    let decoded: Vec<gw::GatewayStats> = stats
        .iter()
        .map(|m| gw::GatewayStats::decode(m.payload.as_slice()).unwrap())
        .collect();
    let last = decoded.last().unwrap();
    assert_eq!(last.gateway_id, GATEWAY_ID);
    assert!(decoded.iter().map(|s| s.rx_packets_received).sum::<u32>() > 0);
    for key in [
        "backlog_events",
        "store_disk_bytes",
        "backhaul",
        "up_forwarded_total",
        "concentrator_temperature_c",
    ] {
        assert!(
            last.metadata.contains_key(key),
            "stats metadata has {key}: {:?}",
            last.metadata
        );
    }
    assert_eq!(last.metadata["backhaul"], "up");
    assert_eq!(last.metadata["concentrator_temperature_c"], "38.5");
    let forwarded: u64 = last.metadata["up_forwarded_total"].parse().unwrap();
    let ups = collector.on("/event/up").len() as u64;
    assert!(
        forwarded > 0 && forwarded <= ups,
        "forwarded {forwarded} counts only acknowledged uplinks ({ups} seen)"
    );
}

#[test]
fn check_explains_a_broken_config_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[radio]\nbackend = \"sx1302\"\nboard = \"rak9999\"\n\n[mqtt]\nserver = \"mqtt://x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(agent_binary())
        .arg("check")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:9: radio.board: unknown board \"rak9999\"",
            cfg.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:6:10: mqtt.server:", cfg.display())),
        "{err}"
    );
    // This test binary links the simulated concentrator: a gateway config cannot run on it.
    assert!(
        err.contains(&format!(
            "{}:2:11: radio.backend: \"sx1302\" needs a gateway build",
            cfg.display()
        )),
        "{err}"
    );
    assert!(err.contains("3 error(s)"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(dir.path().join("sim.toml"), "").unwrap();
    std::fs::write(
        &good,
        "[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\nboard = \"rak2287\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(agent_binary())
        .arg("check")
        .arg("-c")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `run` refuses a broken config the same way, without starting.
    let out = std::process::Command::new(agent_binary())
        .arg("run")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `check` refuses the store places `run` refuses, and reads no configuration without bound.
#[test]
fn check_refuses_what_run_refuses_about_the_store_and_reads_nothing_unbounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sim.toml"), "").unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\n",
    )
    .unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "precious").unwrap();
    let others = dir.path().join("others");
    std::fs::create_dir(&others).unwrap();
    std::fs::write(others.join("thesis.odt"), "x").unwrap();
    let check = |sets: &[String], config: &std::path::Path| {
        let mut c = std::process::Command::new(agent_binary());
        c.arg("check").arg("-c").arg(config);
        for s in sets {
            c.arg("--set").arg(s);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let store = |p: &std::path::Path| vec![format!("store.path=\"{}\"", p.display())];
    let (ok, err) = check(&store(&file), &good);
    assert!(!ok && err.contains("is a file, not a directory"), "{err}");
    let (ok, err) = check(&store(&others), &good);
    assert!(!ok && err.contains("thesis.odt"), "{err}");
    let (ok, err) = check(&store(&dir.path().join("fresh/store")), &good);
    assert!(ok, "a place that can be created: {err}");
    // The same refusals from `run`, before anything is touched.
    let out = std::process::Command::new(agent_binary())
        .args(["run", "-c"])
        .arg(&good)
        .arg("--set")
        .arg(&store(&file)[0])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    // A device reports a size of 0 and never ends: refused, not read forever.
    let (ok, err) = check(&[], std::path::Path::new("/dev/zero"));
    assert!(!ok && err.contains("not a regular file"), "{err}");
    let (ok, err) = check(&["store.join_request_max_age=\"0s\"".to_string()], &good);
    assert!(!ok && err.contains("between 1s and 60s"), "{err}");
}

#[test]
fn the_shipped_configs_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let check = |f: &str| {
        std::process::Command::new(agent_binary())
            .arg("check")
            .arg("-c")
            .arg(root.join(f))
            .output()
            .unwrap()
    };
    let out = check("config/demo.toml");
    assert!(
        out.status.success(),
        "demo.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway config serves both packages: without `radio.backend`, a binary runs the
    // backend it links. On this (simulator) build it wants the simulator file beside it, as
    // the lora-edge-sim package ships it.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lora-edge.toml");
    std::fs::copy(root.join("config/lora-edge.toml"), &cfg).unwrap();
    let run_check = || {
        std::process::Command::new(agent_binary())
            .arg("check")
            .arg("-c")
            .arg(&cfg)
            .arg("--set")
            .arg(format!(
                "store.path={:?}",
                dir.path().join("store").display().to_string()
            ))
            .output()
            .unwrap()
    };
    let out = run_check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("radio.simulator:")
            && err.contains("simulator.toml does not exist")
            && err.contains("1 error(s)"),
        "lora-edge.toml without its simulator file: {err}"
    );
    std::fs::write(
        dir.path().join("simulator.toml"),
        "synthetic_rate_hz = 1.0\n",
    )
    .unwrap();
    let out = run_check();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("backend Simulator"),
        "lora-edge.toml with its simulator file: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_a_configured_id_the_gateway_uses_the_concentrator_eui() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let mut setup = AgentSetup::new(broker.port)
        .scenario(&frames(3, 1, 0, 10.0))
        .sim("eui = \"00800000a0001234\"");
    setup.id_from_eui = true;
    let (_agent, _dir) = setup.start();
    let ups = collector.wait_for("/event/up", Duration::from_secs(10), |m| m.len() >= 3);
    assert_eq!(ups.len(), 3);
    for m in &ups {
        assert_eq!(m.topic, "eu868/gateway/00800000a0001234/event/up");
        assert_eq!(
            decode_uplink(&m.payload, false).rx_info.unwrap().gateway_id,
            "00800000a0001234"
        );
    }
}
