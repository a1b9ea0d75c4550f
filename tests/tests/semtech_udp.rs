//! The `semtech_udp` backend end to end: a packet forwarder of our own (`udp.rs`, written from
//! the protocol's text) → lora-edge → Mosquitto → a subscriber decoding with chirpstack_api;
//! downlinks back as PULL_RESP read by the emulator on its own counter.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chirpstack_api::gw;
use lora_edge_e2e::lorawan::{keys_class_c, level, relay_status, rules_class_c, ACTUATOR, SENSOR};
use lora_edge_e2e::udp::{backend_config, free_udp_port, rfc3339, Emulator, TxAnswer};
use lora_edge_e2e::*;
use prost::Message;

fn eui() -> u64 {
    u64::from_str_radix(GATEWAY_ID, 16).unwrap()
}

/// An agent on the UDP backend and its forwarder, keep-alive every 200 ms.
fn start(broker_port: u16) -> (Agent, tempfile::TempDir, Emulator) {
    start_with(AgentSetup::new(broker_port))
}

fn start_with(setup: AgentSetup) -> (Agent, tempfile::TempDir, Emulator) {
    let port = free_udp_port();
    let (agent, dir) = setup.config(&backend_config(port, eui())).start();
    let emu = Emulator::start(port, eui(), Duration::from_millis(200));
    assert!(
        bench::wait_until(patience(Duration::from_secs(20)), || emu
            .pull_acks
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0),
        "no PULL_ACK: {}",
        agent.log()
    );
    (agent, dir, emu)
}

fn payload(i: u32) -> Vec<u8> {
    // An unconfirmed data uplink's MHDR and a body that names it.
    let mut p = vec![0x40];
    p.extend(i.to_be_bytes());
    p.extend([0u8; 12]);
    p
}

fn index_of(phy: &[u8]) -> u32 {
    u32::from_be_bytes(phy[1..5].try_into().unwrap())
}

#[test]
fn a_forwarders_uplinks_reach_the_centre_with_its_metadata_and_each_push_is_acknowledged() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    let gps = SystemTime::now() - Duration::from_millis(250);
    let mut sent = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..30u32 {
        let mut rx = emu.rxpk(&payload(i), 868_100_000 + (i % 3) * 200_000, 7 + i % 6);
        if i.is_multiple_of(2) {
            rx["time"] = rfc3339(gps).into();
            rx["tmms"] = 1_400_000_000_123u64.into();
        }
        sent.push(rx.clone());
        tokens.push(emu.push(vec![rx]));
    }
    let got = collector.wait_for("/event/up", patience(Duration::from_secs(20)), |m| {
        m.len() >= 30
    });
    assert_eq!(got.len(), 30, "{}", agent.log());
    for (m, rx) in got.iter().zip(&sent) {
        let up = gw::UplinkFrame::decode(m.payload.as_slice()).unwrap();
        let i = index_of(&up.phy_payload);
        assert_eq!(up.phy_payload, payload(i), "in the order pushed");
        let tx = up.tx_info.as_ref().unwrap();
        assert_eq!(
            tx.frequency,
            (rx["freq"].as_f64().unwrap() * 1e6).round() as u32
        );
        let Some(gw::modulation::Parameters::Lora(l)) =
            tx.modulation.as_ref().and_then(|m| m.parameters.as_ref())
        else {
            panic!("LoRa expected")
        };
        assert_eq!(
            format!("SF{}BW{}", l.spreading_factor, l.bandwidth / 1000),
            rx["datr"]
        );
        let r = up.rx_info.as_ref().unwrap();
        assert_eq!((r.rssi, r.snr), (-60, 9.5));
        assert_eq!(r.gateway_id, GATEWAY_ID);
        assert_eq!(
            r.context,
            (rx["tmst"].as_u64().unwrap() as u32).to_be_bytes().to_vec(),
            "the context is the forwarder's tmst"
        );
        let t = r.gw_time.as_ref().unwrap();
        let at = UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
        if i.is_multiple_of(2) {
            assert_eq!(
                at.duration_since(UNIX_EPOCH).unwrap().as_micros(),
                gps.duration_since(UNIX_EPOCH).unwrap().as_micros(),
                "gw_time is the forwarder's GPS time"
            );
            assert_eq!(
                r.time_since_gps_epoch.as_ref().unwrap().seconds,
                1_400_000_000
            );
        } else {
            assert!(at > gps, "without GPS, the arrival time");
            assert!(r.time_since_gps_epoch.is_none());
        }
    }
    assert!(
        bench::wait_until(patience(Duration::from_secs(5)), || tokens
            .iter()
            .all(|t| emu.acked(*t))),
        "every push acknowledged"
    );
    // The radio is up in the stats (the forwarder pulls), its figures are there.
    let stats = collector.wait_for("/event/stats", patience(Duration::from_secs(5)), |m| {
        !m.is_empty()
    });
    let s = gw::GatewayStats::decode(stats.last().unwrap().payload.as_slice()).unwrap();
    assert_eq!(s.metadata["udp_rejected_json_total"], "0");
    assert!(agent.wait_log(
        "semtech_udp: the packet forwarder is up",
        Duration::from_secs(5)
    ));
    agent.sigterm();
}

#[test]
fn a_downlink_goes_out_as_pull_resp_in_time_and_the_forwarders_tx_ack_is_the_ack() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    emu.push(vec![emu.rxpk(&payload(1), 868_100_000, 9)]);
    let ctx = first_uplink_context(&collector, patience(Duration::from_secs(20)));
    let answers = [
        (TxAnswer::Ok, gw::TxAckStatus::Ok),
        (TxAnswer::Error("TOO_LATE".into()), gw::TxAckStatus::TooLate),
        (
            TxAnswer::Error("COLLISION_PACKET".into()),
            gw::TxAckStatus::CollisionPacket,
        ),
        // No TX_ACK: the honest answer after tx_ack_timeout.
        (TxAnswer::Silent, gw::TxAckStatus::InternalError),
    ];
    for (n, (answer, status)) in answers.into_iter().enumerate() {
        emu.set_answer(answer);
        let before = emu.pull_resps().len();
        let id = 100 + n as u32;
        // RX2 of the uplink, a few seconds on (each answer takes its turn).
        let delay_ms = 3000 + 2000 * n as u64;
        publish(
            broker.port,
            DOWN,
            frame(
                id,
                vec![lora(
                    869_525_000,
                    14,
                    9,
                    delay(delay_ms),
                    ctx,
                    &[0x60, 1, 2, 3, 4],
                )],
            ),
        );
        assert_eq!(
            ack(&collector, id, patience(Duration::from_secs(10))),
            vec![status],
            "downlink {id}: {}",
            agent.log()
        );
        let resps = emu.pull_resps();
        assert_eq!(resps.len(), before + 1, "one PULL_RESP per downlink");
        let r = resps.last().unwrap();
        assert_eq!(
            r.txpk["tmst"].as_u64().unwrap() as u32,
            ctx.wrapping_add(delay_ms as u32 * 1000)
        );
        assert_eq!(r.txpk["freq"].as_f64().unwrap(), 869.525);
        assert_eq!(r.txpk["datr"], "SF9BW125");
        assert_eq!(r.txpk["imme"], false);
        assert_eq!(r.txpk["ipol"], true);
        assert_eq!(r.payload(), vec![0x60, 1, 2, 3, 4]);
        // lora_pkt_fwd's JIT queue takes a packet 42.5 ms or more before its start.
        assert!(r.lead_us().unwrap() > 42_500, "lead {:?}", r.lead_us());
    }
    assert!(agent.log().contains("no TX_ACK from the packet forwarder"));
    // Class C "immediately" goes as imme.
    emu.set_answer(TxAnswer::Ok);
    publish(
        broker.port,
        DOWN,
        frame(
            200,
            vec![lora(869_525_000, 14, 9, immediately(), 0, &[0x60, 9])],
        ),
    );
    assert_eq!(
        ack(&collector, 200, patience(Duration::from_secs(10))),
        vec![gw::TxAckStatus::Ok]
    );
    assert_eq!(emu.pull_resps().last().unwrap().txpk["imme"], true);
    agent.sigterm();
}

#[test]
fn an_outage_at_200_frames_a_second_loses_nothing_and_acknowledged_pushes_survive_a_kill() {
    let mut broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    assert!(agent.wait_log("backhaul up", patience(Duration::from_secs(20))));
    broker.stop();
    // 200 frames a second for 8 s, 4 per push, while the broker is down.
    let n = 1600u32;
    let started = Instant::now();
    let mut tokens = Vec::new();
    for i in (0..n).step_by(4) {
        let rxpk = (i..i + 4)
            .map(|j| emu.rxpk(&payload(j), 868_300_000, 7))
            .collect();
        tokens.push(emu.push(rxpk));
        let due = Duration::from_micros(u64::from(i + 4) * 5000);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    assert!(
        bench::wait_until(patience(Duration::from_secs(10)), || tokens
            .iter()
            .all(|t| emu.acked(*t))),
        "every push acknowledged during the outage: {} of {}",
        tokens.iter().filter(|t| emu.acked(**t)).count(),
        tokens.len()
    );
    // Acknowledged means stored: a kill now loses none of them.
    agent.sigkill();
    broker.start_again();
    agent.start_again();
    let got = collector.wait_for("/event/up", patience(Duration::from_secs(60)), |m| {
        m.iter()
            .map(|m| {
                index_of(
                    &gw::UplinkFrame::decode(m.payload.as_slice())
                        .unwrap()
                        .phy_payload,
                )
            })
            .collect::<HashSet<_>>()
            .len()
            >= n as usize
    });
    let seen: Vec<u32> = got
        .iter()
        .map(|m| {
            index_of(
                &gw::UplinkFrame::decode(m.payload.as_slice())
                    .unwrap()
                    .phy_payload,
            )
        })
        .collect();
    let unique: HashSet<u32> = seen.iter().copied().collect();
    let missing: Vec<u32> = (0..n).filter(|i| !unique.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "lost {} frames, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // In order: the first time each frame is seen, it is the next one.
    let mut first_seen = Vec::new();
    let mut s = HashSet::new();
    for i in seen {
        if s.insert(i) {
            first_seen.push(i);
        }
    }
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "replayed in order"
    );
    agent.sigterm();
}

#[test]
fn a_pushed_twice_push_is_stored_once_and_acknowledged_twice() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    let mut b = vec![2, 0x77, 0x01, 0];
    b.extend(eui().to_be_bytes());
    b.extend(
        serde_json::to_vec(&serde_json::json!({"rxpk": [emu.rxpk(&payload(7), 868_100_000, 7)]}))
            .unwrap(),
    );
    emu.send_raw(&b);
    assert!(emu.wait_acked(0x7701, patience(Duration::from_secs(10))));
    emu.send_raw(&b);
    assert!(bench::wait_until(patience(Duration::from_secs(5)), || emu
        .push_ack_count
        .load(std::sync::atomic::Ordering::Relaxed)
        >= 2));
    // A later frame shows the first has had all the time it needed.
    emu.push(vec![emu.rxpk(&payload(8), 868_100_000, 7)]);
    let got = collector.wait_for("/event/up", patience(Duration::from_secs(10)), |m| {
        m.len() >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let got2 = collector.on("/event/up");
    assert_eq!(got.len(), 2);
    assert_eq!(got2.len(), 2, "the re-sent push was not stored again");
    agent.sigterm();
}

/// Every kind of bad datagram: counted by cause, logged at most once a second per cause, the
/// agent unharmed, and a flood does not keep a downlink from going out in time.
#[test]
fn hostile_datagrams_are_counted_by_cause_and_a_flood_does_not_starve_downlinks() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    let push_with = |eui: u64, body: &[u8]| {
        let mut b = vec![2, 0, 1, 0];
        b.extend(eui.to_be_bytes());
        b.extend(body);
        b
    };
    let good = emu.rxpk(&payload(1), 868_100_000, 7);
    let with = |k: &str, v: serde_json::Value| {
        let mut r = good.clone();
        r[k] = v;
        serde_json::to_vec(&serde_json::json!({ "rxpk": [r] })).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", vec![2, 0]),
        ("truncated", vec![2, 0, 0, 0, 1, 2, 3]),
        ("version", {
            let mut b = push_with(eui(), b"{}");
            b[0] = 1;
            b
        }),
        ("unknown_type", {
            let mut b = push_with(eui(), b"{}");
            b[3] = 0x42;
            b
        }),
        ("json", push_with(eui(), b"{\"rxpk\":[{\"tmst\":")),
        ("json", push_with(eui(), &with("tmst", "soon".into()))),
        (
            "oversized",
            push_with(eui(), &with("data", "A".repeat(4000).into())),
        ),
        ("impossible", push_with(eui(), &with("freq", 2400.0.into()))),
        (
            "impossible",
            push_with(eui(), &with("datr", "SF42BW125".into())),
        ),
        ("impossible", push_with(eui(), &with("rssi", 90.into()))),
        (
            "unknown_eui",
            push_with(
                0x1122334455667788,
                &serde_json::to_vec(&serde_json::json!({"rxpk": [good.clone()]})).unwrap(),
            ),
        ),
    ];
    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (cause, b) in &cases {
        emu.send_raw(b);
        *expected.entry(cause).or_default() += 1;
    }
    // A flood of 20 000 bad datagrams from the pull socket (as a downlink is asked for), and
    // a downlink meanwhile.
    emu.push(vec![emu.rxpk(&payload(2), 868_100_000, 9)]);
    let ctx = first_uplink_context(&collector, patience(Duration::from_secs(20)));
    let flood = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let junk = push_with(eui(), b"not json at all");
            for _ in 0..20_000 {
                emu.send_raw_down(&junk);
            }
        });
        publish(
            broker.port,
            DOWN,
            frame(
                7,
                vec![lora(869_525_000, 14, 9, delay(2000), ctx, &[0x60, 7])],
            ),
        );
        h.join().unwrap();
        20_000u64
    });
    assert_eq!(
        ack(&collector, 7, patience(Duration::from_secs(10))),
        vec![gw::TxAckStatus::Ok],
        "{}",
        agent.log()
    );
    let r = emu.pull_resps().last().cloned().expect("a PULL_RESP");
    assert!(
        r.lead_us().unwrap() > 42_500,
        "in time despite the flood: {:?}",
        r.lead_us()
    );
    // The counts, from the stats (the flood's datagrams may be dropped by the kernel's
    // buffer: at most as many as sent, and all the single cases).
    let done = collector.wait_for("/event/stats", patience(Duration::from_secs(10)), |m| {
        m.last().is_some_and(|m| {
            let s = gw::GatewayStats::decode(m.payload.as_slice()).unwrap();
            s.metadata
                .get("udp_rejected_impossible_total")
                .map(String::as_str)
                == Some("3")
        })
    });
    let s = gw::GatewayStats::decode(done.last().unwrap().payload.as_slice()).unwrap();
    for (cause, n) in &expected {
        let got: u64 = s.metadata[&format!("udp_rejected_{cause}_total")]
            .parse()
            .unwrap();
        if *cause == "json" {
            assert!(got >= *n && got <= n + flood, "{cause}: {got}");
        } else {
            assert_eq!(got, *n, "{cause}");
        }
    }
    // At most one line a second per cause.
    let log = agent.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("datagram refused") && l.contains("cause=json"))
        .count();
    assert!(lines <= 30, "{lines} log lines for the json cause");
    assert!(agent.is_running());
    agent.sigterm();
}

/// The pump-safety rules on this backend: a high level read from the forwarder's frames starts
/// the Class C pump, a low one stops it; both go out through PULL_RESP, as the actuator opens
/// them.
#[test]
fn the_rules_drive_a_class_c_pump_through_the_forwarder() {
    let broker = Broker::start();
    let setup = AgentSetup::new(broker.port);
    std::fs::write(setup.dir.path().join("rules.toml"), rules_class_c("30s", 2)).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &keys_class_c(), 0o600);
    let setup = setup.config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"");
    let (mut agent, _dir, emu) = start_with(setup);
    let opened = |emu: &Emulator| -> Vec<Vec<u8>> {
        let mut addr = ACTUATOR.dev_addr;
        addr.reverse();
        emu.pull_resps()
            .iter()
            .map(|r| r.payload())
            .filter(|p| p.get(1..5) == Some(&addr[..]))
            .map(|p| {
                ACTUATOR
                    .open_downlink(&p, 0)
                    .unwrap_or_else(|e| panic!("the actuator would drop {p:02x?}: {e}"))
                    .payload
            })
            .collect()
    };
    let up = |p: Vec<u8>| {
        emu.push(vec![emu.rxpk(&p, 868_100_000, 7)]);
    };
    up(SENSOR.uplink(1, 2, &level(3000)));
    up(SENSOR.uplink(2, 2, &level(3000)));
    let on = [0x05, 0x01, 0x00, 0x14];
    assert!(
        bench::wait_until(patience(Duration::from_secs(20)), || opened(&emu)
            .iter()
            .any(|p| p == &on)),
        "an ON through PULL_RESP: {:?}\n{}",
        opened(&emu),
        agent.log()
    );
    up(ACTUATOR.uplink(1, 3, &relay_status(true)));
    up(SENSOR.uplink(3, 2, &level(300)));
    let off = [0x03, 0x00, 0x00];
    assert!(
        bench::wait_until(patience(Duration::from_secs(20)), || {
            let p = opened(&emu);
            let last_on = p.iter().rposition(|p| p == &on);
            last_on.is_some_and(|i| p[i..].iter().any(|p| p == &off))
        }),
        "the STOP through PULL_RESP: {:?}\n{}",
        opened(&emu),
        agent.log()
    );
    // Sent "immediately", as the forwarder's JIT queue places it.
    assert!(emu.pull_resps().iter().all(|r| r.txpk["imme"] == true));
    agent.sigterm();
}

/// A forwarder that stops pulling: the radio goes down in the stats with why, and downlinks
/// are refused at once; back when it pulls again.
#[test]
fn a_silent_forwarder_is_a_radio_down_with_its_cause() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, emu) = start(broker.port);
    assert!(agent.wait_log(
        "semtech_udp: the packet forwarder is up",
        patience(Duration::from_secs(10))
    ));
    emu.pulling
        .store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(
        agent.wait_log(
            "semtech_udp: the packet forwarder is down",
            patience(Duration::from_secs(15))
        ),
        "{}",
        agent.log()
    );
    let health = collector.wait_for("/state/health", patience(Duration::from_secs(10)), |m| {
        m.iter().any(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            v["radio"]["cause"] == "forwarder_silent"
        })
    });
    assert!(!health.is_empty());
    publish(
        broker.port,
        DOWN,
        frame(
            9,
            vec![lora(869_525_000, 14, 9, immediately(), 0, &[0x60, 9])],
        ),
    );
    assert_eq!(
        ack(&collector, 9, patience(Duration::from_secs(10))),
        vec![gw::TxAckStatus::InternalError]
    );
    emu.pulling
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        agent.wait_log_count(
            "semtech_udp: the packet forwarder is up",
            2,
            patience(Duration::from_secs(10))
        ) >= 2
    );
    agent.sigterm();
}

/// `command/config` cannot change a forwarder's channels: refused with why, at once.
#[test]
fn a_channel_plan_from_the_centre_is_refused_with_why() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, _dir, _emu) = start(broker.port);
    assert!(agent.wait_log(
        "subscribed: commands will arrive",
        patience(Duration::from_secs(15))
    ));
    let plan = gw::GatewayConfiguration {
        gateway_id: GATEWAY_ID.into(),
        version: "v9".into(),
        channels: vec![gw::ChannelConfiguration {
            frequency: 868_100_000,
            modulation_config: Some(
                gw::channel_configuration::ModulationConfig::LoraModulationConfig(
                    gw::LoraModulationConfig {
                        bandwidth: 125_000,
                        spreading_factors: vec![7, 8, 9],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }],
        ..Default::default()
    };
    publish(
        broker.port,
        &format!("eu868/gateway/{GATEWAY_ID}/command/config"),
        plan.encode_to_vec(),
    );
    let answers = collector.wait_for("/event/ops", patience(Duration::from_secs(10)), |m| {
        !m.is_empty()
    });
    let a: serde_json::Value =
        serde_json::from_slice(&answers.first().expect("an answer").payload).unwrap();
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("packet forwarder"),
        "{a}"
    );
    agent.sigterm();
}
