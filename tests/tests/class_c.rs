//! Pumps driven over LoRaWAN Class C by the agent itself, with the broker unreachable: every
//! frame the agent hands to the radio is checked here as the device would check it (MIC over
//! the full counter, DevAddr, FPort, decrypted payload), with lrwn, independently of the agent.

use std::time::{Duration, Instant};

use lora_edge_e2e::lorawan::{
    keys_class_c, level, relay_status, rules_class_c, Downlink, ACTUATOR, SENSOR, VECTOR,
};
use lora_edge_e2e::pki;
use lora_edge_e2e::*;

const ON: [u8; 4] = [0x05, 0x01, 0x00, 0x14];
const OFF: [u8; 3] = [0x03, 0x00, 0x00];

fn at(offset_ms: u64, payload: Vec<u8>) -> Frame {
    let mut f = frames_at(&[offset_ms], 1).remove(0);
    f.payload = payload;
    f
}

/// A high level, read twice (a session's first reading is believed once a second agrees): the
/// pump starts once min off (2 s from boot) has passed.
fn high_level() -> Vec<Frame> {
    vec![
        at(500, SENSOR.uplink(1, 2, &level(3000))),
        at(1000, SENSOR.uplink(2, 2, &level(3000))),
    ]
}

/// Every frame handed to the radio for the actuator's DevAddr, opened as the actuator would;
/// panics on one it would drop. (Network-server downlinks to other devices are left out.)
fn handed(dir: &std::path::Path) -> Vec<(Sent, Downlink)> {
    let mut addr = ACTUATOR.dev_addr;
    addr.reverse();
    tx_log(dir)
        .into_iter()
        .filter(|s| s.result == 0 && s.payload.get(1..5) == Some(&addr[..]))
        .map(|s| {
            let d = ACTUATOR
                .open_downlink(&s.payload, 0)
                .unwrap_or_else(|e| panic!("the actuator would drop {:02x?}: {e}", s.payload));
            (s, d)
        })
        .collect()
}

#[test]
fn the_independent_downlink_check_opens_the_published_vector() {
    // FPort 10, FCntDown 5, payload 01003C (shared doc; three implementations agree).
    let d = VECTOR;
    let phy = hex::decode("60F17DBE490005000A3FAF5E46ADEB14").unwrap();
    assert_eq!(
        d.open_downlink(&phy, 0).unwrap(),
        Downlink {
            dev_addr: [0x49, 0xBE, 0x7D, 0xF1],
            fcnt: 5,
            fport: 10,
            payload: vec![0x01, 0x00, 0x3C],
        }
    );
    // The same bytes with the counter's high bits set fail the MIC: the check is real.
    assert!(d.open_downlink(&phy, 1).unwrap_err().contains("bad MIC"));
    let mut flipped = phy.clone();
    flipped[10] ^= 1;
    assert!(d.open_downlink(&flipped, 0).is_err());
}

fn setup(proxy_port: u16, scenario: &[Frame], confirm: &str, retries: u32) -> AgentSetup {
    setup_with_keys(proxy_port, scenario, confirm, retries, &keys_class_c())
}

fn setup_with_keys(
    proxy_port: u16,
    scenario: &[Frame],
    confirm: &str,
    retries: u32,
    keys: &str,
) -> AgentSetup {
    let setup = AgentSetup::new(proxy_port).scenario(scenario);
    std::fs::write(
        setup.dir.path().join("rules.toml"),
        rules_class_c(confirm, retries),
    )
    .unwrap();
    pki::write(setup.dir.path(), "keys.toml", keys, 0o600);
    setup.config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
}

#[test]
fn a_dry_run_stops_the_class_c_pump_with_the_broker_down_and_an_unconfirmed_stop_raises_an_alarm() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let mut scenario = high_level();
    scenario.extend([
        // The actuator confirms it runs.
        at(4000, ACTUATOR.uplink(1, 3, &relay_status(true))),
        // Dry run: OFF at once. No status uplink confirms it.
        at(12_000, SENSOR.uplink(3, 2, &level(300))),
    ]);
    // The network server handed the session over at downlink counter 1000.
    let keys = format!("{}fcnt_down = 1000\n", keys_class_c());
    let (mut agent, dir) = setup_with_keys(proxy.port, &scenario, "1s", 2, &keys).start();
    let alarm = "ALARM: the pump's actuator is in an unknown state";
    assert!(
        agent.wait_log(alarm, Duration::from_secs(40)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("OFF not confirmed by a status uplink after 3 sends"),
        "{log}"
    );
    assert!(
        log.contains("rules: the actuator confirmed its command pump=P1 running=true"),
        "{log}"
    );
    assert!(
        !log.contains("backhaul up"),
        "the broker was meant to be down"
    );
    let frames = handed(dir.path());
    // Every frame: this device, FPort 1, SF9 at 869.525 MHz, inverted polarity, counters
    // strictly increasing.
    for (s, d) in &frames {
        assert_eq!(d.dev_addr, ACTUATOR.dev_addr);
        assert_eq!(d.fport, 1);
        assert_eq!(
            (s.freq_hz, s.datarate, s.invert_pol),
            (869_525_000, 9, true)
        );
    }
    let fcnts: Vec<u32> = frames.iter().map(|(_, d)| d.fcnt).collect();
    assert!(fcnts.windows(2).all(|w| w[0] < w[1]), "{fcnts:?}");
    assert!(fcnts[0] >= 1000, "the keys file's floor: {fcnts:?}");
    let kinds: Vec<&str> = frames
        .iter()
        .map(|(_, d)| match d.payload.as_slice() {
            p if p == ON => "on",
            p if p == OFF => "off",
            _ => panic!("unexpected payload {:02x?}", d.payload),
        })
        .collect();
    // Boot OFF (and its retries until the start), the ON and its refreshes every 5 s while the
    // pump runs, then the dry-run OFF sent three times (2 retries), and nothing else on.
    let first_on = kinds.iter().position(|k| *k == "on").expect("an ON");
    let last_on = kinds.iter().rposition(|k| *k == "on").unwrap();
    assert!(kinds[..first_on].iter().all(|k| *k == "off"), "{kinds:?}");
    assert!(
        kinds[first_on..=last_on].iter().all(|k| *k == "on"),
        "{kinds:?}"
    );
    assert!(last_on > first_on, "at least one refresh: {kinds:?}");
    assert!(kinds.len() - last_on > 3, "OFF and its retries: {kinds:?}");
    // The refreshes came well inside the actuator's 20 s lease (on the radio's own clock).
    let on_counters: Vec<u32> = frames[first_on..=last_on]
        .iter()
        .map(|(s, _)| s.count_us)
        .collect();
    assert!(
        on_counters
            .windows(2)
            .all(|w| w[1].wrapping_sub(w[0]) < 10_000_000),
        "{on_counters:?}"
    );
    agent.sigterm();
}

#[test]
fn fcnt_down_strictly_increases_across_kills_a_deleted_store_and_a_damaged_counter_file() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    // No status uplink ever: the boot OFF is sent again and again (every 1 s, then 2 s, ...).
    let (mut agent, dir) = setup(proxy.port, &[], "1s", 10).start();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut random_ms = |lo: u64, hi: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (seed >> 33) % (hi - lo)
    };
    let counter_file = dir
        .path()
        .join(format!("store.fcntdown-{}", ACTUATOR.dev_eui));
    for round in 0..10 {
        let sent_before = handed(dir.path()).len();
        // At least one frame out in this life, then a kill at a random point (often in the
        // middle of a hand-off or a reservation).
        let until = Instant::now() + Duration::from_secs(20);
        while handed(dir.path()).len() == sent_before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(random_ms(0, 2500)));
        agent.sigkill();
        match round {
            // The store is lost (an operator deleted it): the counter file is beside it.
            3 => std::fs::remove_dir_all(dir.path().join("store")).unwrap(),
            // The counter file is destroyed: the store's copy takes over.
            6 => std::fs::write(&counter_file, vec![0x5A; 128]).unwrap(),
            _ => {}
        }
        agent.start_again();
    }
    let until = Instant::now() + Duration::from_secs(20);
    let before = handed(dir.path()).len();
    while handed(dir.path()).len() == before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.sigterm();
    let fcnts: Vec<u32> = handed(dir.path()).iter().map(|(_, d)| d.fcnt).collect();
    assert!(fcnts.len() >= 11, "{fcnts:?}\n{}", agent.log());
    assert!(
        fcnts.windows(2).all(|w| w[0] < w[1]),
        "FCntDown repeated or went back: {fcnts:?}"
    );
    assert!(
        agent
            .log()
            .contains("ALARM: the downlink frame counter file was damaged"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_pump_stop_goes_before_the_network_servers_queued_downlinks() {
    use lora_edge_e2e::commands::{ack, immediately, lora, publish_downlinks};
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let mut scenario = high_level();
    scenario.extend([
        at(4000, ACTUATOR.uplink(1, 3, &relay_status(true))),
        // Dry run, while the network server's downlinks fill the queue.
        at(12_000, SENSOR.uplink(3, 2, &level(300))),
    ]);
    let (mut agent, dir) = setup(broker.port, &scenario, "30s", 3).start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(20)),
        "{}",
        agent.log()
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !handed(dir.path()).iter().any(|(_, d)| d.payload == ON) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    // 30 Class C downlinks of the network server on the same channel, SF12, 40 bytes: about
    // 2 s on air each, a minute of queue.
    let ns: Vec<(u32, _)> = (1..=30u32)
        .map(|id| {
            (
                id,
                lora(869_525_000, 14, 12, immediately(), 0, &[id as u8; 40]),
            )
        })
        .collect();
    publish_downlinks(broker.port, ns);
    assert!(
        agent.wait_log(
            "scheduled downlink not sent: a pump STOP took its place",
            Duration::from_secs(30)
        ),
        "{}",
        agent.log()
    );
    let until = Instant::now() + Duration::from_secs(10);
    let off_at = loop {
        let sent = tx_log(dir.path());
        if let Some(i) = sent.iter().position(|s| {
            ACTUATOR
                .open_downlink(&s.payload, 0)
                .is_ok_and(|d| d.payload == OFF)
        }) {
            break i;
        }
        assert!(Instant::now() < until, "no OFF:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    // The OFF went out while network-server downlinks queued before it were still waiting:
    // some of them follow it on air.
    std::thread::sleep(Duration::from_secs(3));
    let sent = tx_log(dir.path());
    assert!(
        sent[off_at + 1..]
            .iter()
            .any(|s| s.payload.len() == 40 && s.datarate == 12),
        "network-server downlinks after the OFF: {}",
        sent.len() - off_at - 1
    );
    // The displaced one was answered as such.
    let displaced: Vec<u32> = (1..=30u32)
        .filter(|id| {
            ack(&collector, *id, Duration::from_secs(120))
                == vec![chirpstack_api::gw::TxAckStatus::CollisionPacket]
        })
        .collect();
    assert!(!displaced.is_empty());
    agent.sigterm();
}

/// The reproduction of "an ON after the alarm's OFF": lease 24 s, refresh 6 s,
/// confirmation within 2 s, 2 re-sends, the level high, no status uplink at all. After the
/// "unknown state" alarm the pump is held off: the frames on air end with OFFs only.
#[test]
fn no_on_follows_the_unknown_state_alarms_off() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let setup = setup(proxy.port, &high_level(), "2s", 2);
    std::fs::write(
        setup.dir.path().join("rules.toml"),
        rules_class_c("2s", 2).replace(
            "lease = \"20s\", refresh = \"5s\"",
            "lease = \"24s\", refresh = \"6s\"",
        ),
    )
    .unwrap();
    let (mut agent, dir) = setup.start();
    let alarm = "ALARM: the pump's actuator is in an unknown state";
    assert!(
        agent.wait_log(alarm, patience(Duration::from_secs(40))),
        "{}",
        agent.log()
    );
    // Long enough for the link's stale re-send (0.2 s after the alarm in the issue) and a
    // refresh period or two.
    std::thread::sleep(Duration::from_secs(14));
    agent.sigterm();
    let kinds: Vec<(u32, &str)> = handed(dir.path())
        .iter()
        .map(|(_, d)| {
            let k = match d.payload.as_slice() {
                p if p == ON => "on",
                p if p == OFF => "off",
                _ => panic!("unexpected payload {:02x?}", d.payload),
            };
            (d.fcnt, k)
        })
        .collect();
    let first_on = kinds
        .iter()
        .position(|(_, k)| *k == "on")
        .unwrap_or_else(|| panic!("the pump never started: {kinds:?}\n{}", agent.log()));
    let stop = first_on
        + kinds[first_on..]
            .iter()
            .position(|(_, k)| *k == "off")
            .unwrap_or_else(|| panic!("no OFF after the ON: {kinds:?}"));
    assert!(
        kinds[stop..].iter().all(|(_, k)| *k == "off"),
        "an ON after the stop: {kinds:?}"
    );
    assert!(kinds.len() > stop + 1, "the OFF is re-sent: {kinds:?}");
}

/// A tripped motor protection: the actuator confirms the ON, then reports "stopped" at every
/// status. The contradiction latches: the pump is not started again when the next "stopped"
/// status agrees with the OFF (it was, once a second, before: a restart loop on a tripped
/// pump, up to max_starts_per_hour).
#[test]
fn an_actuator_that_contradicts_its_command_holds_the_pump_off_until_reset() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    proxy.set(Mode::Refuse);
    let mut scenario = high_level();
    scenario.push(at(4000, ACTUATOR.uplink(1, 3, &relay_status(true))));
    scenario.extend((0..14).map(|k| {
        at(
            6000 + k as u64 * 1500,
            ACTUATOR.uplink(2 + k, 3, &relay_status(false)),
        )
    }));
    let (mut agent, dir) = setup(proxy.port, &scenario, "4s", 2).start();
    assert!(
        agent.wait_log(
            "reports stopped while commanded on",
            patience(Duration::from_secs(30))
        ),
        "{}",
        agent.log()
    );
    // The rest of the "stopped" statuses, and a few seconds more.
    agent.wait_status(
        "rx",
        scenario.len() as u64,
        patience(Duration::from_secs(40)),
    );
    std::thread::sleep(Duration::from_secs(3));
    agent.sigterm();
    let kinds: Vec<&str> = handed(dir.path())
        .iter()
        .map(|(_, d)| if d.payload == ON { "on" } else { "off" })
        .collect();
    let first_on = kinds.iter().position(|k| *k == "on").expect("an ON");
    let stop = first_on
        + kinds[first_on..]
            .iter()
            .position(|k| *k == "off")
            .unwrap_or_else(|| panic!("no OFF after the contradiction: {kinds:?}"));
    assert!(
        kinds[stop..].iter().all(|k| *k == "off"),
        "the pump was started again: {kinds:?}\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("actuator latched"), "{log}");
}

/// The contradiction latch across a restart: killed while the actuator is silent, the agent
/// does not know its state, so the centre's `reset_latch` is refused until a status confirms a
/// command (a reviewer reset it right after a restart and the pump started at once).
#[test]
fn the_actuator_latch_is_not_reset_after_a_restart_before_the_actuator_is_heard() {
    use lora_edge_e2e::commands::ask_pump;
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let mut scenario = high_level();
    scenario.push(at(4000, ACTUATOR.uplink(1, 3, &relay_status(true))));
    scenario.push(at(6000, ACTUATOR.uplink(2, 3, &relay_status(false))));
    let (mut agent, dir) = setup(broker.port, &scenario, "30s", 2).start();
    assert!(
        agent.wait_log("actuator latched", patience(Duration::from_secs(30))),
        "{}",
        agent.log()
    );
    let reset = serde_json::json!({"pump": "P1", "action": "reset_latch", "interlock": "actuator"});
    agent.sigkill();
    // The next life: the level is still high; the actuator says nothing at first.
    std::fs::write(
        dir.path().join("scenario.csv"),
        scenario_csv(&[
            at(500, SENSOR.uplink(3, 2, &level(3000))),
            at(1000, SENSOR.uplink(4, 2, &level(3000))),
            at(12_000, ACTUATOR.uplink(3, 3, &relay_status(false))),
        ]),
    )
    .unwrap();
    agent.start_again();
    assert!(
        agent.wait_log_count(
            "subscribed: commands will arrive",
            2,
            patience(Duration::from_secs(20))
        ) >= 2
    );
    let a = ask_pump(&broker, &collector, "r1", reset.clone());
    assert_eq!(a["outcome"], "refused", "{a}");
    let sent_before = handed(dir.path()).len();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        handed(dir.path())[sent_before..]
            .iter()
            .all(|(_, d)| d.payload != ON),
        "an ON after a refused reset"
    );
    // The actuator's status confirms the boot OFF: the reset is taken, the pump starts.
    assert!(
        agent.wait_log(
            "rules: the actuator confirmed its command pump=P1 running=false",
            patience(Duration::from_secs(30))
        ),
        "{}",
        agent.log()
    );
    let a = ask_pump(&broker, &collector, "r2", reset);
    assert_eq!(a["outcome"], "accepted", "{a}");
    let until = Instant::now() + patience(Duration::from_secs(10));
    while !handed(dir.path())[sent_before..]
        .iter()
        .any(|(_, d)| d.payload == ON)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        handed(dir.path())[sent_before..]
            .iter()
            .any(|(_, d)| d.payload == ON),
        "no ON after the reset\n{}",
        agent.log()
    );
    agent.sigterm();
}

/// Room for the STOP: network-server downlinks fill the actuator's sub-band (868.7–869.2 MHz,
/// 0.1 %: 3.6 s an hour) with frames shorter than the OFF, until the duty cycle refuses them;
/// then the level drops. The OFF still goes out, from the airtime the actuator keeps for its
/// STOPs. (Without that reserve, what is left is less than one network frame, less than the OFF:
/// the STOP would be refused.)
#[test]
fn a_stop_finds_duty_cycle_room_after_the_network_server_filled_the_sub_band() {
    use lora_edge_e2e::commands::{ack, immediately, lora, publish_downlinks};
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let mut scenario = high_level();
    // Dry run, once the sub-band is full.
    scenario.push(at(30_000, SENSOR.uplink(3, 2, &level(300))));
    let setup = AgentSetup::new(broker.port).scenario(&scenario);
    let rules = rules_class_c("10m", 1)
        .replace(
            "lease = \"20s\", refresh = \"5s\"",
            "lease = \"1h\", refresh = \"30m\", frequency_hz = 868900000, spreading_factor = 7",
        )
        .replace("max_starts_per_hour = 10", "max_starts_per_hour = 4");
    std::fs::write(setup.dir.path().join("rules.toml"), rules).unwrap();
    pki::write(setup.dir.path(), "keys.toml", &keys_class_c(), 0o600);
    let (mut agent, dir) = setup
        .config("[rules]\nfile = \"rules.toml\"\nkeys_file = \"keys.toml\"")
        .start();
    let until = Instant::now() + patience(Duration::from_secs(20));
    while !handed(dir.path()).iter().any(|(_, d)| d.payload == ON) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        handed(dir.path()).iter().any(|(_, d)| d.payload == ON),
        "the pump never started\n{}",
        agent.log()
    );
    // 10-byte SF7 frames (41 ms on air) in batches the 32-entry queue takes, until refused.
    let mut id = 1000;
    let mut refused = false;
    while !refused && id < 1200 {
        let batch: Vec<(u32, _)> = (id..id + 20)
            .map(|i| (i, lora(868_900_000, 14, 7, immediately(), 0, &[0x60; 10])))
            .collect();
        publish_downlinks(broker.port, batch);
        for i in id..id + 20 {
            let status = ack(&collector, i, patience(Duration::from_secs(10)));
            refused |= status == vec![chirpstack_api::gw::TxAckStatus::DutyCycleOverflow];
        }
        id += 20;
    }
    assert!(refused, "the sub-band never filled\n{}", agent.log());
    // The dry run's OFF.
    let until = Instant::now() + patience(Duration::from_secs(40));
    let stopped = || {
        let frames = handed(dir.path());
        let last_on = frames.iter().rposition(|(_, d)| d.payload == ON);
        last_on.is_some_and(|i| frames[i..].iter().any(|(_, d)| d.payload == OFF))
    };
    while !stopped() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    agent.sigterm();
    assert!(stopped(), "no OFF after the sub-band filled\n{log}");
    assert!(!log.contains("Class C frame not sent"), "{log}");
}
