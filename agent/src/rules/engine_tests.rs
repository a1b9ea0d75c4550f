//! Scenario tests, with the injected clock, for every rule; and a property test of the four
//! safety invariants over random event sequences.
//!
//! Proof that the property test can fail: `every_disabled_safety_check_is_caught` switches off
//! each safety check of the decision in turn (interlocks, lockout, latches, max run, min off,
//! starts per hour: `engine::Fault`) and requires the same random sequences to break an
//! invariant; the property test proper runs with every check on.

use std::collections::BTreeMap;

use super::*;
use crate::rules::file;

const S: u64 = 1000;
const M: u64 = 60 * S;
const T0: u64 = 1_800_000_000_000;

fn rules(latch: bool) -> RuleSet {
    rules_with(latch, false)
}

/// `short`: min run and min off of one minute, so that the starts per hour limit is what binds.
fn rules_with(latch: bool, short: bool) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    rules_in(dir.path(), &text_with(latch, short))
}

/// A rule file in `dir` (its actuator's relay file is relative to it).
fn rules_in(dir: &std::path::Path, text: &str) -> RuleSet {
    let p = dir.join("rules.toml");
    std::fs::write(&p, text).unwrap();
    file::load(&p).unwrap()
}

fn text_with(latch: bool, short: bool) -> String {
    // The file tests' valid file, with stuck detection, a wider step and the latch as asked.
    let mut text = file::tests::GOOD
        .replace("max_step = 0.5", "max_step = 1.0\nstuck_samples = 5")
        .replace(
            "reset_at = 0.60",
            if latch {
                "reset_at = 0.60\n  latch = true"
            } else {
                "reset_at = 0.60"
            },
        );
    if short {
        text = text
            .replace("min_run = \"2m\"", "min_run = \"1m\"")
            .replace("min_off = \"10m\"", "min_off = \"1m\"");
    }
    text
}

fn engine(latch: bool) -> Engine {
    Engine::new(rules(latch), T0, &BTreeMap::new())
}

fn actions(o: &Outcome) -> Vec<&'static str> {
    o.audits.iter().map(|a| a.action).collect()
}

#[test]
fn boot_is_off_with_sensors_unknown_and_min_off_running() {
    let mut e = engine(false);
    assert!(!e.is_on(0));
    assert_eq!(e.sensor_quality(0).1, Quality::Unknown);
    // A high level at once: demand, but min off runs from boot.
    let o = e.reading(0, 3.0, T0 + S);
    assert!(o.drives.is_empty());
    assert!(actions(&o).contains(&"inhibit"), "{:?}", o.audits);
    assert!(o.audits.iter().any(|a| a.reasons[0].contains("min off")));
    // After min off, the next scan starts it.
    let o = e.tick(T0 + 10 * M + S);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: true }]);
}

#[test]
fn dry_run_trips_and_resets_only_above_the_hysteresis() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    // Down in plausible steps (max_step 1.0).
    e.reading(0, 2.2, T0 + 11 * M + 20 * S);
    e.reading(0, 1.4, T0 + 11 * M + 40 * S);
    e.reading(0, 0.8, T0 + 11 * M + 50 * S);
    let o = e.reading(0, 0.35, T0 + 12 * M);
    assert!(!e.is_on(0), "dry run must stop it at once (no min run)");
    assert!(o
        .audits
        .iter()
        .any(|a| a.action == "stop" && a.reasons[0].contains("dry_run")));
    // 0.5: above the trip, below the reset: still tripped.
    e.reading(0, 0.5, T0 + 13 * M);
    e.command("P1", Command::OperatorRun, T0 + 13 * M).unwrap();
    e.tick(T0 + 30 * M);
    assert!(!e.is_on(0), "tripped until 0.60");
    let o = e.reading(0, 0.65, T0 + 31 * M);
    assert!(actions(&o).contains(&"trip_clear"));
    assert!(e.is_on(0), "operator demand after the reset");
}

#[test]
fn a_stale_sensor_stops_the_pump_on_the_tick_with_no_uplink_at_all() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    // No data: 25 min of max age, then the tick alone sees it.
    e.tick(T0 + 24 * M);
    assert!(e.is_on(0));
    let o = e.tick(T0 + 25 * M + S);
    assert!(!e.is_on(0));
    assert_eq!(e.sensor_quality(0).1, Quality::Stale);
    assert!(o
        .audits
        .iter()
        .any(|a| a.action == "stop" && a.reasons[0].contains("Stale")));
    // A fresh reading clears the data-quality trip by itself.
    e.reading(0, 3.0, T0 + 40 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Good);
}

#[test]
fn out_of_range_implausible_steps_and_stuck_values_are_bad_data() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.reading(0, 9.0, T0 + M);
    assert_eq!(e.sensor_quality(0).1, Quality::OutOfRange);
    // After bad data, a reading is believed once the next agrees with it.
    e.reading(0, 3.0, T0 + 2 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Unconfirmed);
    e.reading(0, 3.1, T0 + 2 * M + S);
    assert_eq!(e.sensor_quality(0).1, Quality::Good);
    e.reading(0, 1.5, T0 + 3 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Implausible);
    let mut e = engine(false);
    for i in 0..5 {
        e.reading(0, 2.0, T0 + i * M);
    }
    assert_eq!(e.sensor_quality(0).1, Quality::Stuck);
}

#[test]
fn max_run_stops_the_pump_whatever_the_demand() {
    let mut e = engine(false);
    e.command("P1", Command::OperatorRun, T0).unwrap();
    let mut t = T0 + 10 * M;
    e.reading(0, 2.0, t);
    assert!(e.is_on(0));
    let started = t;
    let mut stop = None;
    // Fresh, plausible, not stuck readings every minute for three hours.
    while t < T0 + 3 * 60 * M {
        t += M;
        let o = e.reading(0, 2.0 + (t / M % 2) as f64 * 0.01, t);
        if let Some(a) = o.audits.iter().find(|a| a.action == "stop") {
            stop.get_or_insert((t, a.reasons[0].clone()));
        }
    }
    let (at, why) = stop.expect("stopped");
    assert_eq!(at - started, 2 * 60 * M, "stopped at max run");
    assert!(why.contains("max run"), "{why}");
}

#[test]
fn min_run_holds_a_normal_stop_but_not_a_trip() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    e.command("P1", Command::OperatorStop, T0 + 11 * M + 10 * S)
        .unwrap();
    assert!(e.is_on(0), "min run 2 min holds a normal stop");
    e.tick(T0 + 13 * M + S);
    assert!(!e.is_on(0));
    // A trip within min run stops at once.
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    e.reading(0, 2.5, T0 + 11 * M + 10 * S);
    e.reading(0, 2.0, T0 + 11 * M + 20 * S);
    e.reading(0, 1.5, T0 + 11 * M + 30 * S);
    e.reading(0, 0.8, T0 + 11 * M + 40 * S);
    e.reading(0, 0.3, T0 + 11 * M + 50 * S);
    assert!(!e.is_on(0));
}

#[test]
fn starts_per_hour_inhibit_then_allow() {
    let mut e = engine(false);
    let mut starts = Vec::new();
    let mut inhibited = false;
    for minute in 0..90u64 {
        let t = T0 + minute * M;
        let o = e.reading(0, 2.0 + (minute % 2) as f64 * 0.01, t);
        if o.drives.iter().any(|d| d.on) {
            starts.push(minute);
        }
        inhibited |= o
            .audits
            .iter()
            .any(|a| a.action == "inhibit" && a.reasons[0].contains("starts in the last hour"));
        // Run 2 minutes, stop, ask again: min off (10 min) paces it at one start per 12 min.
        let on_for = starts.last().map(|s| minute - s);
        if e.is_on(0) && on_for >= Some(2) {
            e.command("P1", Command::OperatorStop, t).unwrap();
        } else if !e.is_on(0) {
            e.command("P1", Command::OperatorRun, t).unwrap();
        }
    }
    assert!(
        inhibited,
        "the fifth start within the hour was not inhibited: {starts:?}"
    );
    for w in starts.windows(5) {
        assert!(w[4] - w[0] >= 60, "five starts within an hour: {starts:?}");
    }
    assert!(
        starts.len() >= 5,
        "starts are allowed again after the hour: {starts:?}"
    );
}

#[test]
fn lockout_is_above_everything_and_persists() {
    let mut e = engine(false);
    e.command("P1", Command::Lockout, T0).unwrap();
    e.command("P1", Command::OperatorRun, T0).unwrap();
    e.reading(0, 3.0, T0 + 20 * M);
    e.tick(T0 + 21 * M);
    assert!(!e.is_on(0));
    let d = e.durable(0);
    assert!(d.lockout);
    // A restart keeps the lockout.
    let mut again = Engine::new(
        rules(false),
        T0 + 30 * M,
        &BTreeMap::from([("P1".to_string(), d)]),
    );
    again
        .command("P1", Command::OperatorRun, T0 + 30 * M)
        .unwrap();
    again.reading(0, 3.0, T0 + 50 * M);
    assert!(!again.is_on(0));
    again.command("P1", Command::Release, T0 + 50 * M).unwrap();
    assert!(again.is_on(0));
}

#[test]
fn a_lease_is_capped_expires_and_an_expired_one_is_refused() {
    let mut e = engine(false);
    e.reading(0, 1.5, T0); // between stop and start: no local demand
    e.tick(T0 + 11 * M);
    // Asks for 2 h; capped at 30 min.
    e.command(
        "P1",
        Command::Lease {
            expiry_ms: T0 + 11 * M + 120 * M,
            run: true,
        },
        T0 + 11 * M,
    )
    .unwrap();
    assert!(e.is_on(0));
    e.reading(0, 1.5, T0 + 20 * M);
    e.reading(0, 1.51, T0 + 40 * M);
    e.tick(T0 + 41 * M);
    assert!(!e.is_on(0), "the lease ended at 30 min");
    let r = e.command(
        "P1",
        Command::Lease {
            expiry_ms: T0,
            run: true,
        },
        T0 + 42 * M,
    );
    assert!(matches!(r, Err((Refusal::LeaseExpired { .. }, _))));
    assert!(matches!(
        e.command("P9", Command::OperatorRun, T0),
        Err((Refusal::UnknownPump(_), _))
    ));
    // A central stop holds the pump off against local demand until it expires.
    e.reading(0, 2.4, T0 + 59 * M);
    e.reading(0, 3.0, T0 + 60 * M);
    assert!(e.is_on(0));
    e.command(
        "P1",
        Command::Lease {
            expiry_ms: T0 + 75 * M,
            run: false,
        },
        T0 + 62 * M + S,
    )
    .unwrap();
    assert!(!e.is_on(0));
    e.reading(0, 3.01, T0 + 70 * M);
    assert!(!e.is_on(0), "held off by the central stop");
    e.reading(0, 3.0, T0 + 76 * M);
    assert!(
        e.is_on(0),
        "local control again after the central stop expired"
    );
}

#[test]
fn a_latch_reset_is_refused_while_the_condition_holds_and_restart_keeps_it() {
    let mut e = engine(true);
    e.reading(0, 0.3, T0);
    assert_eq!(e.durable(0).latched.len(), 1);
    let r = e.command(
        "P1",
        Command::ResetLatch {
            interlock: "dry_run".into(),
        },
        T0 + M,
    );
    assert!(matches!(r, Err((Refusal::ConditionHolds(_), _))));
    e.reading(0, 0.7, T0 + 2 * M);
    // Condition gone, latch still there: the pump stays off for local demand.
    e.reading(0, 3.0, T0 + 20 * M);
    assert!(!e.is_on(0));
    let d = e.durable(0);
    let mut again = Engine::new(
        rules(true),
        T0 + 21 * M,
        &BTreeMap::from([("P1".into(), d)]),
    );
    again.reading(0, 3.0, T0 + 40 * M);
    assert!(!again.is_on(0), "the latch survived the restart");
    again
        .command(
            "P1",
            Command::ResetLatch {
                interlock: "dry_run".into(),
            },
            T0 + 40 * M,
        )
        .unwrap();
    assert!(again.is_on(0));
}

#[test]
fn start_history_survives_a_restart() {
    let mut e = engine(false);
    e.command("P1", Command::OperatorRun, T0).unwrap();
    e.reading(0, 2.0, T0 + 10 * M);
    assert!(e.is_on(0));
    let d = e.durable(0);
    assert_eq!(d.starts, vec![T0 + 10 * M]);
    let again = Engine::new(
        rules(false),
        T0 + 20 * M,
        &BTreeMap::from([("P1".into(), d)]),
    );
    assert_eq!(again.durable(0).starts.len(), 1);
}

/// The invariants, checked after every step of a random sequence.
fn check_invariants(e: &Engine, history: &mut Vec<(u64, bool)>, now: u64) -> Result<(), String> {
    let p = &e.pumps[0];
    let cfg = &e.rules.pumps[0];
    if p.on && (!p.tripped.is_empty() || !p.latched.is_empty() || p.lockout) {
        return Err(format!(
            "on with tripped {:?} latched {:?} lockout {}",
            p.tripped, p.latched, p.lockout
        ));
    }
    if p.on && now.saturating_sub(p.on_since) > cfg.max_run_ms + S {
        return Err(format!("on for {} ms", now - p.on_since));
    }
    if history.last().map(|h| h.1) != Some(p.on) {
        if p.on {
            if let Some(off_at) = history.iter().rev().find(|h| !h.1).map(|h| h.0) {
                if now - off_at < cfg.min_off_ms {
                    return Err(format!("restarted {} ms after stopping", now - off_at));
                }
            }
            let starts = history
                .iter()
                .filter(|h| h.1 && now - h.0 < HOUR_MS)
                .count()
                + 1;
            if starts as u32 > cfg.max_starts_per_hour {
                return Err(format!("{starts} starts in an hour"));
            }
        }
        history.push((now, p.on));
    }
    Ok(())
}

fn random_run(seed: u64) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut e = Engine::new(
        rules_with(seed.is_multiple_of(2), seed % 4 >= 2),
        T0,
        &BTreeMap::new(),
    );
    let mut now = T0;
    // Boot counts as a stop (min off runs from boot).
    let mut history = vec![(T0, false)];
    let short = seed % 4 >= 2;
    for _ in 0..400 {
        now += rng.u64(1..(if short { 3 * M } else { 20 * M }));
        match rng.u8(0..10) {
            0..=3 => {
                let v = match rng.u8(0..10) {
                    0 => rng.f64() * 0.5,
                    1 => 5.0,
                    _ => rng.f64() * 4.0,
                };
                e.reading(0, v, now);
            }
            5 => {
                e.tick(now);
            }
            6 | 7 => {
                let cmd = match rng.u8(0..8) {
                    0 => Command::OperatorRun,
                    1 => Command::OperatorStop,
                    2 => Command::OperatorAuto,
                    3 => Command::Lease {
                        run: rng.bool(),
                        expiry_ms: now + rng.u64(0..(3 * 60 * M)),
                    },
                    4 => Command::LeaseEnd,
                    5 => Command::Lockout,
                    6 => Command::Release,
                    _ => Command::ResetLatch {
                        interlock: "dry_run".into(),
                    },
                };
                let _ = e.command("P1", cmd, now);
            }
            _ => {
                // Ticks every second for a while, as the stage does.
                for _ in 0..rng.u64(1..120) {
                    now += S;
                    e.tick(now);
                    check_invariants(&e, &mut history, now)?;
                }
            }
        }
        check_invariants(&e, &mut history, now)?;
    }
    Ok(())
}

#[test]
fn property_the_four_safety_invariants_hold_over_random_sequences() {
    for seed in 0..1000 {
        if let Err(e) = random_run(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}

#[test]
fn every_disabled_safety_check_is_caught() {
    use super::{Fault, FAULT};
    for fault in [
        Fault::IgnoreInterlocks,
        Fault::IgnoreLockout,
        Fault::IgnoreLatches,
        Fault::NoMaxRun,
        Fault::NoMinOff,
        Fault::NoStartsPerHour,
    ] {
        FAULT.with(|f| f.set(Some(fault)));
        let caught = (0..1000).find(|seed| random_run(*seed).is_err());
        FAULT.with(|f| f.set(None));
        assert!(
            caught.is_some(),
            "{fault:?} disabled, and no sequence broke an invariant"
        );
    }
}

/// The engine and a Class C link together: a central lease of an hour keeps the actuator on
/// with a refresh every 30 s (well inside its 2 min lease), every ON confirmed; when the lease
/// is not renewed, the pump stops: one OFF, and no ON after it.
#[test]
fn a_central_lease_keeps_a_class_c_actuator_on_for_an_hour_and_it_stops_when_not_renewed() {
    use crate::rules::class_c::{Link, Step};
    let mut rules = rules(false);
    rules.pumps[0].auto = None;
    rules.pumps[0].remote_lease_max_ms = 2 * 60 * M;
    let spec = file::ClassC {
        device: "a84041000181abcd".into(),
        fport: 1,
        on_hex: "05010078".into(),
        off_hex: "030000".into(),
        lease: std::time::Duration::from_secs(120),
        refresh: Some(std::time::Duration::from_secs(30)),
        feedback: "relay".into(),
        confirm_within: std::time::Duration::from_secs(20),
        retries: 3,
        frequency_hz: 869_525_000,
        spreading_factor: 9,
        power_dbm: 14,
    };
    let mut e = Engine::new(rules, T0, &BTreeMap::new());
    let mut link = Link::new(&spec);
    link.commanded(false, T0);
    // (time, on) of every frame sent.
    let mut sent: Vec<(u64, bool)> = vec![(T0, false)];
    let mut t = T0 + 11 * M;
    e.reading(0, 2.0, t);
    let o = e
        .command(
            "P1",
            Command::Lease {
                expiry_ms: t + 60 * M,
                run: true,
            },
            t,
        )
        .unwrap();
    let drive = |o: &Outcome, link: &mut Link, t: u64, sent: &mut Vec<(u64, bool)>| {
        for d in &o.drives {
            link.commanded(d.on, t);
            sent.push((t, d.on));
        }
    };
    drive(&o, &mut link, t, &mut sent);
    let lease_end = t + 60 * M;
    while t < lease_end + 10 * M {
        t += S;
        // The sensor keeps reporting (max_age 25 m), not stuck (5 identical readings).
        let o = if (t - T0).is_multiple_of(10 * M) {
            e.reading(0, 2.0 + ((t - T0) / (10 * M)) as f64 / 100.0, t)
        } else {
            e.tick(t)
        };
        drive(&o, &mut link, t, &mut sent);
        for step in link.tick(t) {
            match step {
                Step::Send(on) => sent.push((t, on)),
                other => panic!("{other:?} at {}", t - T0),
            }
        }
        // The actuator's status uplink a second after each frame.
        if sent.last().is_some_and(|(at, _)| *at + S == t) {
            link.feedback(sent.last().unwrap().1, t);
        }
    }
    let ons: Vec<u64> = sent.iter().filter(|(_, on)| *on).map(|(t, _)| *t).collect();
    assert!(ons.len() >= 120, "{} ONs", ons.len());
    assert!(ons.windows(2).all(|w| w[1] - w[0] <= 30 * S));
    assert!(ons.last().unwrap() - ons[0] >= 59 * M);
    let last_on = *ons.last().unwrap();
    let offs: Vec<u64> = sent
        .iter()
        .filter(|(t, on)| !*on && *t > last_on)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(offs.len(), 1, "one OFF, confirmed: {offs:?}");
    assert!(offs[0] >= lease_end && offs[0] <= lease_end + S);
    assert!(!e.is_on(0));
}

#[test]
fn an_actuator_in_an_unknown_state_holds_the_pump_off_until_confirmed_again() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    let o = e.actuator_fault(0, Some("ON not confirmed".into()), T0 + 12 * M);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: false }]);
    assert!(o.audits[0].reasons[0].contains("actuator state unknown: ON not confirmed"));
    // Demand stays; the pump stays off while unknown.
    e.reading(0, 3.0, T0 + 30 * M);
    assert!(e.tick(T0 + 31 * M).drives.is_empty());
    let o = e.actuator_fault(0, None, T0 + 32 * M);
    assert_eq!(actions(&o)[0], "trip_clear");
    assert_eq!(o.drives, vec![Drive { pump: 0, on: true }]);
}

#[test]
fn a_new_sessions_first_reading_starts_nothing_until_a_second_agrees() {
    let mut e = engine(false);
    e.session_started(0, None);
    // Past min off; a high level that a wrong AppSKey could have made out of noise.
    let o = e.reading(0, 3.13, T0 + 11 * M);
    assert!(o.drives.is_empty(), "{:?}", o.audits);
    assert_eq!(e.sensor_quality(0).1, Quality::Unconfirmed);
    assert!(o
        .audits
        .iter()
        .any(|a| a.reasons[0].contains("Unknown -> Unconfirmed")));
    // Noise does not agree with itself: 3.82 is more than max_step (1.0 here) from 3.13? No:
    // 0.69 is within it, so use values a wrong key gives, far apart.
    let o = e.reading(0, 1.2, T0 + 12 * M);
    assert!(o.drives.is_empty());
    assert_eq!(e.sensor_quality(0).1, Quality::Unconfirmed);
    let o = e.reading(0, 3.9, T0 + 13 * M);
    assert!(o.drives.is_empty());
    // Out of range is bad data, and not a reference either.
    e.reading(0, 25.6, T0 + 14 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::OutOfRange);
    // Agreement is between readings in a row: 3.5 is within max_step of 3.9, but the bad
    // reading came between them.
    let o = e.reading(0, 3.5, T0 + 15 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Unconfirmed);
    assert!(o.drives.is_empty());
    // The next one agrees with 3.5: believed.
    let o = e.reading(0, 3.6, T0 + 16 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Good);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: true }]);
}

#[test]
fn after_a_restart_the_kept_last_good_value_confirms_the_first_reading() {
    let mut e = engine(false);
    e.session_started(0, Some(3.0));
    let o = e.reading(0, 3.2, T0 + 11 * M);
    assert_eq!(e.sensor_quality(0).1, Quality::Good);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: true }]);
    // A prior that disagrees is not enough.
    let mut e = engine(false);
    e.session_started(0, Some(0.5));
    let o = e.reading(0, 3.2, T0 + 11 * M);
    assert!(o.drives.is_empty());
    assert_eq!(e.sensor_quality(0).1, Quality::Unconfirmed);
}

#[test]
fn an_unconfirmed_reading_trips_the_interlocks_it_feeds() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    // The device rejoined: its first reading of the new session is not believed, even a
    // normal one; the pump stops like on any bad data until a second one agrees.
    e.session_started(0, None);
    let o = e.reading(0, 2.9, T0 + 20 * M);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: false }]);
    assert!(o
        .audits
        .iter()
        .any(|a| a.action == "trip" && a.reasons[0].contains("Unconfirmed")));
}

#[test]
fn an_actuator_that_contradicts_its_command_latches_until_reset() {
    let mut e = engine(false);
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    // A tripped motor protection: the actuator reports stopped while commanded on.
    let o = e.actuator_contradicted(0, "reports stopped while commanded on".into(), T0 + 12 * M);
    assert_eq!(o.drives, vec![Drive { pump: 0, on: false }]);
    assert!(actions(&o).contains(&"latch"), "{:?}", o.audits);
    assert_eq!(o.durable_changed, vec![0]);
    // Its next status agrees with the OFF: the unknown state clears, the pump stays off.
    let o = e.actuator_fault(0, None, T0 + 13 * M);
    assert!(o.drives.is_empty(), "{:?}", o.audits);
    assert!(e.reading(0, 3.0, T0 + 30 * M).drives.is_empty());
    assert!(e.pump_state(0, T0 + 30 * M)["reasons"][0]
        .as_str()
        .unwrap()
        .contains("contradicted"));
    // A restart keeps the latch.
    let mut durable = BTreeMap::new();
    durable.insert("P1".to_string(), e.durable(0));
    let mut again = Engine::new(rules(false), T0 + 31 * M, &durable);
    again.reading(0, 3.0, T0 + 31 * M);
    assert!(again.tick(T0 + 45 * M).drives.is_empty());
    // Reset: refused while the actuator's state is unknown — after the restart too, until a
    // status has confirmed a command — and taken when it is known again.
    let latch = || Command::ResetLatch {
        interlock: ACTUATOR_LATCH.into(),
    };
    assert!(matches!(
        again.command("P1", latch(), T0 + 45 * M),
        Err((Refusal::ConditionHolds(_), _))
    ));
    again.actuator_fault(0, None, T0 + 45 * M + S);
    again.actuator_fault(0, Some("not confirmed".into()), T0 + 46 * M);
    assert!(matches!(
        again.command("P1", latch(), T0 + 46 * M),
        Err((Refusal::ConditionHolds(_), _))
    ));
    again.actuator_fault(0, None, T0 + 47 * M);
    let o = again.command("P1", latch(), T0 + 47 * M).unwrap();
    assert_eq!(o.drives, vec![Drive { pump: 0, on: true }]);
}

/// An engine on `text` in `dir` (changed versions load beside it), its pump started by a high
/// level once min off has run.
fn running_in(dir: &std::path::Path, text: &str) -> Engine {
    let mut e = Engine::new(rules_in(dir, text), T0, &BTreeMap::new());
    e.reading(0, 3.0, T0);
    e.tick(T0 + 11 * M);
    assert!(e.is_on(0));
    e
}

#[test]
fn a_reload_keeps_a_running_pump_running_and_a_new_threshold_applies_at_the_next_scan() {
    let d = tempfile::tempdir().unwrap();
    let base = text_with(false, false);
    let mut e = running_in(d.path(), &base);
    // Falling, still above the running file's stop_at 1.0: it runs on.
    e.reading(0, 2.2, T0 + 11 * M + 20 * S);
    e.reading(0, 1.4, T0 + 11 * M + 40 * S);
    let o = e.reading(0, 1.2, T0 + 11 * M + 60 * S);
    assert!(
        o.drives.is_empty() && e.is_on(0),
        "1.2 is above stop_at 1.0"
    );
    // The technician raises stop_at to 1.5.
    let (carried, removed, _) = e.reshape(
        rules_in(d.path(), &base.replace("stop_at = 1.0", "stop_at = 1.5")),
        T0 + 12 * M,
        &BTreeMap::new(),
    );
    assert_eq!((carried, removed), (vec![Some(0)], vec![]));
    assert!(e.is_on(0), "the reload itself drives nothing");
    // The next scan stops it, with the new threshold (after min run, 2 min from the start).
    let o = e.tick(T0 + 14 * M);
    assert_eq!(
        o.drives,
        vec![Drive { pump: 0, on: false }],
        "{:?}",
        o.audits
    );
}

#[test]
fn a_reload_of_another_shape_keeps_only_what_stays_the_same() {
    let d = tempfile::tempdir().unwrap();
    let base = text_with(false, false);
    for (text, pump_kept, sensor_kept) in [
        (base.replace("id = \"P1\"", "id = \"P2\""), false, true),
        (
            base.replace("relay.jsonl", "other-relay.jsonl"),
            false,
            true,
        ),
        (
            base.replace("id = \"level\"", "id = \"niveau\"")
                .replace("sensor = \"level\"", "sensor = \"niveau\""),
            true,
            false,
        ),
    ] {
        let mut e = running_in(d.path(), &base);
        let now = T0 + 12 * M;
        let (carried, removed, new_sensors) =
            e.reshape(rules_in(d.path(), &text), now, &BTreeMap::new());
        assert_eq!(carried[0].is_some(), pump_kept, "{text}");
        assert_eq!(removed.is_empty(), pump_kept);
        assert_eq!(new_sensors.is_empty(), sensor_kept);
        // A pump kept runs on; a new one starts off.
        assert_eq!(e.is_on(0), pump_kept);
        // A sensor kept keeps its reading; a new one is unknown.
        assert_eq!(e.sensor_quality(0).0.is_some(), sensor_kept);
    }
}

#[test]
fn a_reload_forgets_the_latch_of_an_interlock_that_no_longer_exists() {
    let d = tempfile::tempdir().unwrap();
    let base = text_with(true, false);
    let mut e = running_in(d.path(), &base);
    // Dry run trips and latches.
    e.reading(0, 2.2, T0 + 11 * M + 20 * S);
    e.reading(0, 1.4, T0 + 11 * M + 40 * S);
    e.reading(0, 0.8, T0 + 11 * M + 50 * S);
    e.reading(0, 0.35, T0 + 12 * M);
    assert!(e.durable(0).latched.contains("dry_run"));
    e.reshape(
        rules_in(
            d.path(),
            &base.replace("id = \"dry_run\"", "id = \"dry_run_v2\""),
        ),
        T0 + 13 * M,
        &BTreeMap::new(),
    );
    assert!(e.durable(0).latched.is_empty(), "{:?}", e.durable(0));
}
