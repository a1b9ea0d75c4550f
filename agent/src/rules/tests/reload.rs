//! Reloads that change the set of pumps, sensors or keys, on the Class C bench: what a hostile
//! review found (each test failed on the first version of `Stage::reshape`/`rekey`).
use super::*;

/// P1 run by a central lease, past its min off.
fn run_p1(b: &Bench, stage: &mut Stage) {
    b.lease_p1(stage);
    for _ in 0..3 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
    }
    assert!(stage.engine.is_on(0));
}

/// A `[[pump]]` table with `actuator` (an inline table's body) and short timings.
fn pump(id: &str, actuator: &str) -> String {
    format!(
        "[[pump]]\nid = \"{id}\"\nsafe_state = \"off\"\nactuator = {{ {actuator} }}\n\
         max_run = \"2h\"\nmin_run = \"1s\"\nmin_off = \"1s\"\nmax_starts_per_hour = 60\nremote_lease_max = \"1h\"\n"
    )
}

/// A simulated relay's actuator body, recording into `file`.
fn simulated(file: &std::path::Path) -> String {
    format!(
        "kind = \"simulated\", file = {:?}",
        file.display().to_string()
    )
}

/// A GPIO relay on a chip that does not exist: it never opens.
const NO_GPIO: &str = "kind = \"gpio\", chip = \"/dev/gpiochip-none\", line = 3";

/// One device with u8 `fields` (offsets 0, 1, …), a level sensor on `field`, and pump P1 on a
/// simulated relay under its level control (start at 200, stop at 50).
fn level_rules(dev_eui: &str, fport: u8, fields: &[&str], field: &str) -> String {
    let mut s = format!(
        "version = 1\n[[device]]\ndev_eui = \"{dev_eui}\"\ndecoder = \"layout\"\nfport = {fport}\n"
    );
    for (offset, name) in fields.iter().enumerate() {
        s += &format!(
            "  [[device.field]]\n  name = \"{name}\"\n  offset = {offset}\n  type = \"u8\"\n"
        );
    }
    s += &format!(
        "[[sensor]]\nid = \"level\"\ndevice = \"{dev_eui}\"\nfield = \"{field}\"\nvalid_range = [0.0, 255.0]\nmax_age = \"10m\"\n"
    );
    s += &pump("P1", "kind = \"simulated\", file = \"r.jsonl\"");
    s + "  [pump.auto]\n  sensor = \"level\"\n  mode = \"empty\"\n  start_at = 200.0\n  stop_at = 50.0\n"
}

fn load_text(b: &Bench, text: &str) -> RuleSet {
    let f = b.dir.path().join("new-rules.toml");
    std::fs::write(&f, text).unwrap();
    file::load(&f).unwrap()
}

fn show(frames: &[(u32, bool, crate::downlink::Owned)]) -> Vec<(u32, &'static str, usize)> {
    frames
        .iter()
        .map(|(f, on, o)| (*f, if *on { "ON" } else { "OFF" }, class_c::untag(o.tag).0))
        .collect()
}

/// A reload that is refused ("nothing changed") because a second new actuator does not open,
/// after a changed Class C actuator of the running pump was opened.
#[test]
fn a_refused_reload_sends_no_frame_to_the_running_pumps_device() {
    let b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    let before = b.frames();
    eprintln!("before reload: {:?}", show(&before));
    let gpio = pump("P2", NO_GPIO);
    let text = format!(
        "{}{gpio}",
        CLASS_C_RULES.replace("refresh = \"6s\"", "refresh = \"5s\"")
    );
    let r = stage.reload(load_text(&b, &text));
    eprintln!("reload answer: {r:?}");
    assert!(r.is_err());
    assert!(stage.engine.is_on(0), "engine still thinks P1 runs");
    let during = b.frames();
    eprintln!(
        "frames handed during the REFUSED reload: {:?}",
        show(&during)
    );
    // The running actuator's next refresh.
    for _ in 0..7 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
    }
    let after = b.frames();
    eprintln!("frames after (running pump's refresh): {:?}", show(&after));
    assert!(
        during.is_empty(),
        "a refused reload handed frames to the running pump's device"
    );
}

/// A running Class C pump whose actuator settings change (refresh): a second actuator on the
/// device would number frames on the same downlink counter. Refused whole, the pump untouched.
#[test]
fn changed_class_c_settings_of_a_running_pump_are_refused_and_nothing_is_sent() {
    let b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    let _ = b.frames();
    let text = CLASS_C_RULES.replace("refresh = \"6s\"", "refresh = \"5s\"");
    let e = stage.reload(load_text(&b, &text)).unwrap_err();
    assert!(e.contains("second sender") && e.contains("restart"), "{e}");
    assert!(b.frames().is_empty(), "nothing sent");
    assert!(stage.engine.is_on(0));
    assert_eq!(stage.actuators.snapshot().len(), 1);
}

/// Remove the running Class C pump, then put it back (a rollback).
#[test]
fn a_class_c_pump_removed_then_restored_takes_its_own_actuator_back_and_never_reuses_a_counter() {
    let b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    let _ = b.frames();
    let relay = b.dir.path().join("p2.jsonl");
    let p2 = pump("P2", &simulated(&relay));
    let only_p2 = format!("{}{p2}", CLASS_C_RULES.split_once("[[pump]]").unwrap().0);
    stage.reload(load_text(&b, &only_p2)).unwrap();
    let mut all = show(&b.frames());
    stage.reload(load_text(&b, CLASS_C_RULES)).unwrap();
    all.extend(show(&b.frames()));
    eprintln!(
        "frames: {all:?}; registry {}",
        stage.actuators.snapshot().len()
    );
    actuator::all_off(&stage.actuators, "review");
    let last = show(&b.frames());
    eprintln!("all_off frames: {last:?}");
    all.extend(last);
    assert_eq!(
        stage.actuators.snapshot().len(),
        2,
        "P1's own actuator back, P2's retired"
    );
    let fc: Vec<u32> = all.iter().map(|x| x.0).collect();
    let mut s = fc.clone();
    s.sort();
    s.dedup();
    assert_eq!(s.len(), fc.len(), "FCntDown reused: {all:?}");
}

/// A sensor re-pointed to another field (same id, same devices): Engine::reload takes it as
/// "the same shape" and keeps the reading of the old field.
#[test]
fn a_sensor_pointed_at_another_field_does_not_keep_the_old_fields_reading() {
    let b = Bench::new();
    let rules = &level_rules("A84041000181ABCD", 3, &["a", "b"], "a");
    let keys = format!(
        "[[device]]\ndev_eui = \"a84041000181abcd\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
        hex::encode(ACTUATOR_ADDR),
        hex::encode(ACTUATOR_NWK),
        hex::encode(ACTUATOR_APP)
    );
    let mut b = b;
    let mut stage = b.stage(rules, &keys);
    // a = 250 (high), b = 10 (low), twice: believed.
    for _ in 0..2 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        b.fcnt_up += 1;
        let phy = lorawan::test_uplink(
            ACTUATOR_ADDR,
            ACTUATOR_NWK,
            ACTUATOR_APP,
            b.fcnt_up,
            3,
            &[250, 10],
        );
        stage.frame(Frame {
            phy,
            received: Instant::now(),
        });
    }
    for _ in 0..3 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
    }
    eprintln!(
        "before: {:?} on={}",
        stage.engine.sensor_quality(0),
        stage.engine.is_on(0)
    );
    let new = rules.replace("field = \"a\"", "field = \"b\"");
    let how = stage.reload(load_text(&b, &new)).unwrap();
    eprintln!("reload: {how}");
    b.clock.fetch_add(1000, Ordering::Relaxed);
    stage.tick();
    eprintln!(
        "after re-pointing to b (b is 10): {:?} on={}",
        stage.engine.sensor_quality(0),
        stage.engine.is_on(0)
    );
    assert_ne!(
        stage.engine.sensor_quality(0).0,
        Some(250.0),
        "sensor now reading field b kept field a's value"
    );
}

/// A rekeyed device / a sensor added by a reload: is its first reading believed alone (no
/// probation as at a start)?
#[test]
fn a_new_sessions_first_reading_is_not_believed_alone() {
    use std::os::unix::fs::PermissionsExt;
    let rules = &level_rules("70B3D57ED0001A01", 2, &["lvl"], "lvl");
    let k = |addr: [u8; 4], nwk: [u8; 16], app: [u8; 16]| {
        format!(
            "[[device]]\ndev_eui = \"70b3d57ed0001a01\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
            hex::encode(addr), hex::encode(nwk), hex::encode(app)
        )
    };
    let mut b = Bench::new();
    let a1 = [0x26, 1, 2, 3];
    let mut stage = b.stage(rules, &k(a1, [1; 16], [2; 16]));
    // At start: the first reading is not believed alone.
    b.clock.fetch_add(2000, Ordering::Relaxed);
    let phy = lorawan::test_uplink(a1, [1; 16], [2; 16], 1, 2, &[20]);
    stage.frame(Frame {
        phy,
        received: Instant::now(),
    });
    eprintln!("start, first reading: {:?}", stage.engine.sensor_quality(0));
    let phy = lorawan::test_uplink(a1, [1; 16], [2; 16], 2, 2, &[20]);
    stage.frame(Frame {
        phy,
        received: Instant::now(),
    });
    eprintln!(
        "start, second reading: {:?}",
        stage.engine.sensor_quality(0)
    );
    // Rejoin: new keys file with new DevAddr/keys.
    let a2 = [0x26, 9, 9, 9];
    let f = b.dir.path().join("keys3.toml");
    std::fs::write(&f, k(a2, [5; 16], [6; 16])).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = stage.rekey(lorawan::load_keys(&f).unwrap()).unwrap();
    eprintln!("rekey: {said}");
    // One frame from the new session, value 230 (as a wrong AppSKey's noise would be).
    b.clock.fetch_add(1000, Ordering::Relaxed);
    let phy = lorawan::test_uplink(a2, [5; 16], [6; 16], 1, 2, &[230]);
    stage.frame(Frame {
        phy,
        received: Instant::now(),
    });
    b.clock.fetch_add(1000, Ordering::Relaxed);
    stage.tick();
    eprintln!(
        "after rekey, first reading 230: {:?}, pump on = {}",
        stage.engine.sensor_quality(0),
        stage.engine.is_on(0)
    );
    b.fcnt_up += 0;
    assert!(
        !stage.engine.is_on(0),
        "one frame of a new session started the pump"
    );
}

/// After a refused reload the running actuator's next refresh is taken by the device (its
/// counter was not used by the refused reload) and nothing is latched.
#[test]
fn after_a_refused_reload_the_running_pumps_refresh_is_taken_and_nothing_latches() {
    let mut b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    for (_, _, o) in b.frames() {
        let _ = o.reply.send(crate::downlink::Handed {
            tag: o.tag,
            result: Ok(0),
        });
    }
    while let Ok(h) = stage.handed.try_recv() {
        stage.handed(h);
    }
    b.status(&mut stage, true);
    let gpio = pump("P2", NO_GPIO);
    assert!(stage
        .reload(load_text(&b, &format!("{CLASS_C_RULES}{gpio}")))
        .is_err());
    let mut last = 2u32;
    let mut refreshes = Vec::new();
    for _ in 0..7 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
        for (f, on, o) in b.frames() {
            assert!(f > last, "FCnt {f} after {last}: a replay the device drops");
            last = f;
            refreshes.push(on);
            let _ = o.reply.send(crate::downlink::Handed {
                tag: o.tag,
                result: Ok(0),
            });
        }
        while let Ok(h) = stage.handed.try_recv() {
            stage.handed(h);
        }
    }
    assert!(
        !refreshes.is_empty() && refreshes.iter().all(|on| *on),
        "{refreshes:?}"
    );
    b.status(&mut stage, true);
    let st = stage.engine.pump_state(0, b.clock.load(Ordering::Relaxed));
    assert!(st["latched"].as_array().unwrap().is_empty(), "{st}");
    assert!(stage.engine.is_on(0));
}

/// Lockout (maintenance hold) on P1, then P1 renamed (same actuator): does the hold follow?
#[test]
fn a_renamed_pump_takes_its_actuators_lockout_with_it() {
    let b = Bench::new();
    let relay = b.dir.path().join("r.jsonl");
    let rules = format!("version = 1\n{}", pump("P1", &simulated(&relay)));
    let mut stage = b.stage(&rules, "");
    let now = b.clock.load(Ordering::Relaxed);
    let out = stage
        .engine
        .command("P1", engine::Command::Lockout, now)
        .unwrap();
    stage.apply(out, None);
    let how = stage
        .reload(load_text(&b, &rules.replace("\"P1\"", "\"P1b\"")))
        .unwrap();
    eprintln!("reload: {how}");
    for _ in 0..3 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
    }
    let now = b.clock.load(Ordering::Relaxed);
    let r = stage.engine.command(
        "P1b",
        engine::Command::Lease {
            expiry_ms: now + 600_000,
            run: true,
        },
        now,
    );
    let out = match r {
        Ok(o) => o,
        Err((_, o)) => o,
    };
    stage.apply(out, None);
    eprintln!("P1b: {}", stage.engine.pump_state(0, now));
    eprintln!("relay: {}", std::fs::read_to_string(&relay).unwrap());
    assert!(
        !stage.engine.is_on(0),
        "the locked-out pump's actuator runs under its new name"
    );
}

/// A file with no pumps at all, while P1 (Class C) runs; then every pump back.
#[test]
fn a_file_without_pumps_stops_every_pump_and_keeps_their_actuators() {
    let b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    let _ = b.frames();
    let none = CLASS_C_RULES.split_once("[[pump]]").unwrap().0.to_string();
    let f = b.dir.path().join("none.toml");
    std::fs::write(&f, &none).unwrap();
    let r = file::load(&f).expect("a rule file without pumps loads");
    stage.reload(r).unwrap();
    let sent = show(&b.frames());
    assert!(sent.iter().any(|(_, what, _)| *what == "OFF"), "{sent:?}");
    for _ in 0..3 {
        b.clock.fetch_add(1000, Ordering::Relaxed);
        stage.tick();
    }
    assert!(show(&b.frames()).iter().all(|(_, what, _)| *what == "OFF"));
    assert_eq!(stage.actuators.snapshot().len(), 1);
}

/// A device + sensor + level control added by a reload (keys already in the running keys
/// file): is the new sensor's first reading believed alone?
#[test]
fn a_sensor_added_by_a_reload_is_not_believed_on_one_frame() {
    let b = Bench::new();
    let relay = b.dir.path().join("r.jsonl");
    let pump = pump("P1", &simulated(&relay));
    let keys = "[[device]]\ndev_eui = \"70b3d57ed0001a01\"\ndev_addr = \"26010203\"\nnwk_s_key = \"01010101010101010101010101010101\"\napp_s_key = \"02020202020202020202020202020202\"\n";
    let mut stage = b.stage(&format!("version = 1\n{pump}"), keys);
    let dev = "[[device]]\ndev_eui = \"70B3D57ED0001A01\"\ndecoder = \"layout\"\nfport = 2\n  [[device.field]]\n  name = \"lvl\"\n  offset = 0\n  type = \"u8\"\n\
        [[sensor]]\nid = \"level\"\ndevice = \"70B3D57ED0001A01\"\nfield = \"lvl\"\nvalid_range = [0.0, 255.0]\nmax_age = \"10m\"\n";
    let auto = "  [pump.auto]\n  sensor = \"level\"\n  mode = \"empty\"\n  start_at = 200.0\n  stop_at = 50.0\n";
    let how = stage
        .reload(load_text(&b, &format!("version = 1\n{dev}{pump}{auto}")))
        .unwrap();
    eprintln!("reload: {how}");
    b.clock.fetch_add(3000, Ordering::Relaxed);
    let phy = lorawan::test_uplink([0x26, 1, 2, 3], [1; 16], [2; 16], 1, 2, &[230]);
    stage.frame(Frame {
        phy,
        received: Instant::now(),
    });
    b.clock.fetch_add(1000, Ordering::Relaxed);
    stage.tick();
    eprintln!(
        "new sensor after one frame: {:?}, pump on = {}",
        stage.engine.sensor_quality(0),
        stage.engine.is_on(0)
    );
    assert!(
        !stage.engine.is_on(0),
        "one frame of a sensor added by a reload started the pump"
    );
}

/// A reload that adds a pump and then removes the running Class C one: the running pump is
/// not touched by the first (no frame), the second stops it (an OFF frame) and holds its
/// actuator for the emergency paths; a late answer for it is ignored.
#[test]
fn a_reload_adds_a_pump_without_a_frame_and_a_removed_class_c_pump_is_stopped() {
    let b = Bench::new();
    let mut stage = b.class_c_stage();
    run_p1(&b, &mut stage);
    assert!(b.frames().iter().any(|(_, on, _)| *on), "P1's ON");
    let relay = b.dir.path().join("p2.jsonl");
    let p2 = pump("P2", &simulated(&relay));
    let load = |text: &str| load_text(&b, text);
    let how = stage.reload(load(&format!("{CLASS_C_RULES}{p2}"))).unwrap();
    assert!(stage.engine.rules().pumps.len() == 2 && stage.engine.is_on(0));
    assert!(
        b.frames().is_empty(),
        "the running pump got no frame from the reload"
    );
    assert!(
        std::fs::read_to_string(&relay).unwrap().contains("false"),
        "P2 opened off"
    );
    assert_eq!(stage.actuators.snapshot().len(), 2);
    // P1 removed: an OFF, and its actuator kept for all_off.
    let only_p2 = format!("{}{p2}", CLASS_C_RULES.split_once("[[pump]]").unwrap().0);
    stage.reload(load(&only_p2)).unwrap();
    let sent = b.frames();
    assert!(
        sent.iter().any(|(_, on, _)| !on),
        "P1's OFF: {:?}",
        sent.iter().map(|f| f.1).collect::<Vec<_>>()
    );
    assert_eq!(stage.engine.rules().pumps[0].id, "P2");
    assert_eq!(
        stage.actuators.snapshot().len(),
        2,
        "P1's actuator held for the emergency paths"
    );
    // An answer for P1's frame arriving late goes nowhere (P2 now sits at index 0).
    stage.handed(crate::downlink::Handed {
        tag: class_c::tag(0, 7, true),
        result: Err("late".into()),
    });
    assert!(!stage.engine.is_on(0));
    assert_eq!(how.len(), 64, "the new file's sha256: {how}");
}

/// A reload adding a Class C pump and a pump whose actuator does not open is refused before
/// anything is driven: the Class C device gets no frame (opening an actuator used to send its
/// OFF at once, before the next one failed).
#[test]
fn a_refused_reload_drives_none_of_the_actuators_it_opened() {
    let b = Bench::new();
    let keys = format!(
        "[[device]]\ndev_eui = \"a84041000181abcd\"\ndev_addr = \"{}\"\nnwk_s_key = \"{}\"\napp_s_key = \"{}\"\n",
        hex::encode(ACTUATOR_ADDR),
        hex::encode(ACTUATOR_NWK),
        hex::encode(ACTUATOR_APP)
    );
    let relay = b.dir.path().join("p0.jsonl");
    let mut stage = b.stage(
        &format!("version = 1\n{}", pump("P0", &simulated(&relay))),
        &keys,
    );
    assert!(b.frames().is_empty());
    let (head, class_c_pump) = CLASS_C_RULES.split_once("[[pump]]").unwrap();
    let text = format!(
        "{head}{}[[pump]]{class_c_pump}{}",
        pump("P0", &simulated(&relay)),
        pump("P2", NO_GPIO)
    );
    let e = stage.reload(load_text(&b, &text)).unwrap_err();
    assert!(e.contains("P2"), "{e}");
    assert!(
        b.frames().is_empty(),
        "a frame went out for a refused reload"
    );
    assert_eq!(stage.engine.rules().pumps.len(), 1);
    assert_eq!(stage.actuators.snapshot().len(), 1);
}
