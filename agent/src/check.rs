//! One validation for every way a configuration arrives: `lora-edge check`, `run` (and the
//! reloads to come: SIGHUP, an MQTT apply). The configuration is data and checks only its own
//! values (`config`); each stage is asked here about its part: the radio (board, channel plan,
//! backend and library variant of this build), the backhaul (TLS files, secrets), the rules
//! (rule and keys files), the exec stage (its programs), the store (its place on disk). Imports run one way: this module uses
//! config and the stages; none of them uses it.

use std::path::PathBuf;

use crate::config::{self, Config, ConfigErrors, Invalid, Linked, StageReport};

/// How far to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// What `run` refuses before it starts: values, and what this binary can drive. Files the
    /// configuration names are read by `run` at every connect and reported there, so that a
    /// certificate expiring on a running gateway stops the backhaul, never the radio.
    Run,
    /// Also every file the configuration names, read as `run` will read it, and the store's
    /// place (`lora-edge check`): notes for the operator come back with the configuration
    /// (certificate subjects and expiry dates, the rules loaded).
    Files,
}

/// The configuration of `files` and `sets` for a binary that links `linked` (`None`: any, for
/// tests of the rest), with every problem located in its file.
pub fn configuration(
    files: &[PathBuf],
    sets: &[String],
    linked: Option<Linked>,
    depth: Depth,
) -> Result<(Config, Vec<String>), ConfigErrors> {
    config::load(files, sets, linked, |cfg, values_ok| {
        let mut report = StageReport {
            invalid: crate::radio::validate::config(cfg, linked),
            ..StageReport::default()
        };
        // Files named by a configuration that is wrong already are not read: what they would
        // say may be about the wrong file.
        if depth == Depth::Files && values_ok && report.invalid.is_empty() {
            stage_files(cfg, &mut report);
        }
        report
    })
}

fn stage_files(cfg: &Config, report: &mut StageReport) {
    let (problems, seen) = crate::backhaul::tls::inspect(&cfg.mqtt);
    report.invalid.extend(problems);
    report.notes.extend(seen);
    if let Some(r) = &cfg.rules {
        match crate::rules::load(r) {
            Ok(loaded) => {
                report.notes.push(format!(
                    "rules: {} pump(s), {} sensor(s), {} device(s) with keys; rule file sha256 {}",
                    loaded.rules.pumps.len(),
                    loaded.rules.sensors.len(),
                    loaded.sessions.len(),
                    loaded.rules.hash
                ));
                report
                    .notes
                    .extend(crate::rules::class_c::describe(&loaded.rules));
            }
            // Already located in the rule and keys files: said as they are.
            Err(lines) => report.located.extend(lines),
        }
    }
    report.invalid.extend(crate::exec::check(&cfg.commands));
    // The store answers for its own place: what `run` would refuse, `check` refuses.
    if let Err(why) = crate::store::check_path(&cfg.store.path) {
        report.invalid.push(Invalid::new("store.path", why));
    } else if let Err(why) = crate::store::check_room(&cfg.store.path, cfg.store.max_size_mib << 20)
    {
        report.invalid.push(Invalid::new("store.path", why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Linked, MAX_FILE_BYTES};
    use std::path::{Path, PathBuf};

    /// What `run` loads: the values, and what the stages this binary drives say about theirs.
    fn load(
        files: &[PathBuf],
        sets: &[String],
        linked: Option<Linked>,
    ) -> Result<Config, ConfigErrors> {
        configuration(files, sets, linked, Depth::Run).map(|(c, _)| c)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A directory removed when the test ends (kept in the returned guard).
    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn errors(files: &[PathBuf], sets: &[&str]) -> Vec<String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match load(files, &sets, None) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_syntax_error_names_file_line_and_column() {
        let dir = tmp();
        let d = dir.path();
        let f = write(
            d,
            "a.toml",
            "[mqtt]\nserver = \"tcp://x:1\"\nkeep_alive = \n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(&format!("{}:3:", f.display())), "{e:?}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let dir = tmp();
        let d = dir.path();
        let f = write(
            d,
            "a.toml",
            "[radio]\nbackend = \"sx1302\"\nboard = \"rak2287\"\nbaord = \"x\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with(&format!("{}:4:", f.display())), "{e:?}");
        assert!(e[0].contains("radio.baord: unknown field `baord`"), "{e:?}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_located() {
        let dir = tmp();
        let d = dir.path();
        let f = write(d, "a.toml", "[mqtt]\ninflight = \"many\"\n");
        let e = errors(std::slice::from_ref(&f), &[]);
        assert!(
            e[0].starts_with(&format!("{}:2:12: mqtt.inflight:", f.display())),
            "{e:?}"
        );
    }

    #[test]
    fn an_unknown_board_is_a_clear_error_not_a_panic() {
        let dir = tmp();
        let d = dir.path();
        let f = write(
            d,
            "a.toml",
            "[radio]\nbackend = \"sx1302\"\n\nboard = \"rak9999\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(&format!(
                "{}:4:9: radio.board: unknown board \"rak9999\"",
                f.display()
            )),
            "{e:?}"
        );
        assert!(e[0].contains("rak2287"), "lists the known boards: {e:?}");
    }

    #[test]
    fn every_semantic_error_is_reported_at_once() {
        let dir = tmp();
        let d = dir.path();
        let f = write(
            d,
            "a.toml",
            "[gateway]\nid = \"xyz\"\n[radio]\nbackend = \"sx1302\"\nboard = \"nope\"\n[mqtt]\nserver = \"mqtt.example:1883\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains(":2:6: gateway.id:"), "{e:?}");
        assert!(e[1].contains(":5:9: radio.board:"), "{e:?}");
        assert!(
            e[2].contains(":7:10: mqtt.server:") && e[2].contains("tcp://"),
            "{e:?}"
        );
    }

    #[test]
    fn the_semtech_udp_backends_settings_are_checked_with_their_lines() {
        let dir = tmp();
        let d = dir.path();
        let f = write(
            d,
            "a.toml",
            "[radio]\nbackend = \"semtech_udp\"\n[radio.semtech_udp]\nlisten = \"0.0.0.0\"\n\
             gateway_euis = [\"0016c001ff10a235\", \"nope\"]\ntx_ack_timeout = \"0s\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains(":4:10: radio.semtech_udp.listen:"), "{e:?}");
        assert!(
            e[1].contains(":5:16: radio.semtech_udp.gateway_euis:") && e[1].contains("\"nope\""),
            "{e:?}"
        );
        assert!(
            e[2].contains(":6:18: radio.semtech_udp.tx_ack_timeout:"),
            "{e:?}"
        );
        // No EUI at all: said what to list.
        let f = write(d, "b.toml", "[radio]\nbackend = \"semtech_udp\"\n");
        let e = errors(std::slice::from_ref(&f), &[]);
        assert!(e.len() == 1 && e[0].contains("gateway_ID"), "{e:?}");
        // A random port, two forwarders, a timeout one lost keep-alive would trip.
        let f = write(
            d,
            "d.toml",
            "[radio]\nbackend = \"semtech_udp\"\n[radio.semtech_udp]\nlisten = \"127.0.0.1:0\"\n\
             gateway_euis = [\"0016c001ff10a235\", \"0016c001ff10a236\"]\nforwarder_timeout = \"2s\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("port 0"), "{e:?}");
        assert!(e[1].contains("one forwarder per agent"), "{e:?}");
        assert!(e[2].contains("keepalive_interval"), "{e:?}");
        // A good one loads on any build.
        let f = write(
            d,
            "c.toml",
            "[radio]\nbackend = \"semtech_udp\"\n[radio.semtech_udp]\ngateway_euis = [\"00-16-c0-01-ff-10-a2-35\"]\n",
        );
        for linked in [Linked::Simulator, Linked::Libloragw] {
            let cfg = load(std::slice::from_ref(&f), &[], Some(linked)).unwrap();
            assert_eq!(cfg.radio.backend, Backend::SemtechUdp);
        }
    }

    #[test]
    fn a_store_budget_too_small_for_its_segments_is_refused_with_the_reason() {
        let dir = tmp();
        let d = dir.path();
        let f = write(d, "a.toml", "[store]\nmax_size_mib = 8\n");
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains(":2:16: store.max_size_mib: must be at least 16"),
            "{e:?}"
        );
        assert!(errors(&[f], &["store.max_size_mib=16"]).is_empty());
    }

    #[test]
    fn later_files_and_set_override_earlier_ones_and_errors_point_at_the_winner() {
        let dir = tmp();
        let d = dir.path();
        let sim = write(d, "sim.toml", "");
        let a = write(
            d,
            "a.toml",
            "[radio]\nbackend = \"simulator\"\nsimulator = \"sim.toml\"\n[mqtt]\ninflight = 8\n",
        );
        let b = write(d, "b.toml", "[mqtt]\ninflight = 16\nkeep_alive = \"1s\"\n");
        let e = errors(&[a.clone(), b.clone()], &[]);
        assert_eq!(
            e,
            vec![format!(
                "{}:3:14: mqtt.keep_alive: must be between 5s and 65535s (18h12m15s)",
                b.display()
            )]
        );
        let cfg = load(
            &[a.clone(), b.clone()],
            &[
                "mqtt.keep_alive=\"9s\"".into(),
                "mqtt.server=tcp://h:1".into(),
            ],
            None,
        )
        .unwrap();
        assert_eq!(cfg.mqtt.inflight, 16);
        assert_eq!(cfg.mqtt.keep_alive, std::time::Duration::from_secs(9));
        assert_eq!(cfg.mqtt.server, "tcp://h:1");
        assert_eq!(cfg.radio.simulator.as_deref(), Some(sim.as_path()));
        let e = errors(&[a], &["mqtt.inflight=0"]);
        assert_eq!(
            e,
            vec!["--set mqtt.inflight=0: mqtt.inflight: must be between 1 and 1000".to_string()]
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = errors(&[PathBuf::from("/nonexistent/lora-edge.toml")], &[]);
        assert!(e[0].starts_with("/nonexistent/lora-edge.toml: "), "{e:?}");
    }

    #[test]
    fn every_unknown_key_and_wrong_type_in_a_file_is_reported_at_once() {
        let dir = tmp();
        let f = write(
            dir.path(),
            "a.toml",
            "[mqtt]\nserevr = \"tcp://x:1\"\ninflight = \"many\"\nkeep_alive = 30\n\
             [radio]\nlorawan_public = \"yes\"\nantenna_gain_dbi = \"2\"\n[stoer]\npath = \"x\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        let want = [
            ":2:10: mqtt.serevr: unknown field `serevr`",
            ":3:12: mqtt.inflight:",
            ":4:14: mqtt.keep_alive:",
            ":6:18: radio.lorawan_public:",
            ":7:20: radio.antenna_gain_dbi:",
            ":8:1: stoer: unknown field `stoer`",
        ];
        assert_eq!(e.len(), want.len(), "{e:?}");
        for (got, w) in e.iter().zip(want) {
            assert!(got.contains(w), "in file order: {w} expected, got {e:?}");
        }
    }

    #[test]
    fn a_rejected_value_is_not_reported_again_as_its_default() {
        let dir = tmp();
        let f = write(dir.path(), "a.toml", "[mqtt]\ninflight = -3\n");
        let e = errors(&[f], &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("mqtt.inflight: invalid value: integer `-3`, expected a whole number from 1 to 1000"),
            "{e:?}"
        );
    }

    #[test]
    fn values_that_run_would_misuse_are_refused_by_check() {
        let dir = tmp();
        let f = write(dir.path(), "a.toml", "");
        let cases = [
            (
                "mqtt.ack_timeout=\"0s\"",
                "mqtt.ack_timeout: must be between 1s and 1h",
            ),
            (
                "mqtt.connect_timeout=\"0s\"",
                "mqtt.connect_timeout: must be between 1s and 1h",
            ),
            (
                "mqtt.reconnect_min=\"100000000d\"",
                "mqtt.reconnect_min: must be above 0 and not above",
            ),
            (
                "mqtt.reconnect_max=\"2h\"",
                "mqtt.reconnect_max: must be between",
            ),
            ("mqtt.server=tcp://h:1:2", "is not a host name"),
            ("mqtt.server=tcp://h:0", "port 0"),
            ("mqtt.server=tcp://[zz]:1", "not an IPv6 address"),
            ("store.path=\"\"", "store.path: must name a directory"),
            (
                "store.max_size_mib=17592186044416",
                "store.max_size_mib: must be at most 1048576",
            ),
            (
                "store.max_age=\"0s\"",
                "store.max_age: must be between 1m and 366d",
            ),
            (
                "store.join_request_max_age=\"10m\"",
                "store.join_request_max_age: must be between 1s and 60s",
            ),
            (
                "radio.idle_poll_interval=\"1ms\"",
                "radio.idle_poll_interval: must be between radio.poll_interval and 200ms",
            ),
            (
                "store.join_request_max_age=\"0s\"",
                "store.join_request_max_age: must be between 1s and 60s",
            ),
            (
                "store.max_size_mib=-1",
                "store.max_size_mib: invalid value: integer `-1`, expected a whole number from 16 to 1048576",
            ),
            (
                "mqtt.inflight=70000",
                "mqtt.inflight: invalid value: integer `70000`, expected a whole number from 1 to 1000",
            ),
            (
                "mqtt.server=\"tcp://h:99999\"",
                "mqtt.server: \"tcp://h:99999\": port 99999 is out of range (1 to 65535)",
            ),
            (
                "stats.interval=\"2h\"",
                "stats.interval: must be between 1s and 1h",
            ),
            (
                "mqtt.keep_alive=\"1d\"",
                "mqtt.keep_alive: must be between 5s and 65535s",
            ),
        ];
        for (set, want) in cases {
            let e = errors(std::slice::from_ref(&f), &[set]);
            assert!(
                e.len() == 1 && e[0].starts_with(&format!("--set {set}: ")) && e[0].contains(want),
                "{set}: {e:?}"
            );
        }
        for ok in [
            "mqtt.server=tcp://[::1]:1883",
            "mqtt.server=tcp://broker-1.example.org:8883",
        ] {
            assert!(errors(std::slice::from_ref(&f), &[ok]).is_empty(), "{ok}");
        }
    }

    #[test]
    fn a_refused_value_of_a_required_key_is_one_error_not_also_a_missing_key() {
        let dir = tmp();
        let f = write(
            dir.path(),
            "a.toml",
            "[rules]\nfile = 5\nkeys_file = \"keys.toml\"\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(
            e,
            vec![format!(
                "{}:2:8: rules.file: invalid type: integer `5`, expected path string",
                f.display()
            )]
        );
    }

    #[test]
    fn an_unknown_key_given_with_set_is_blamed_on_the_set() {
        let dir = tmp();
        let f = write(dir.path(), "a.toml", "[mqtt]\ninflight = 8\n");
        let e = errors(std::slice::from_ref(&f), &["nosuch.key=1"]);
        assert_eq!(
            e,
            vec!["--set nosuch.key=1: nosuch: unknown field `nosuch`, expected one of `gateway`, `region`, `radio`, `mqtt`, `store`, `stats`, `rules`, `commands`, `ops`".to_string()]
        );
    }

    #[test]
    fn a_duplicate_key_is_named() {
        let dir = tmp();
        let f = write(dir.path(), "a.toml", "[mqtt]\ninflight = 8\ninflight = 9\n");
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(&format!("{}:3:", f.display())) && e[0].contains("`inflight`"),
            "{e:?}"
        );
    }

    #[test]
    fn a_huge_file_is_refused_before_it_is_parsed() {
        let dir = tmp();
        let f = write(
            dir.path(),
            "a.toml",
            &"# padding\n".repeat(MAX_FILE_BYTES as usize / 10 + 1),
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("may not exceed 1048576 bytes"), "{e:?}");
    }

    #[test]
    fn without_a_backend_the_binary_runs_the_one_it_links() {
        let dir = tmp();
        let cfg = write(
            dir.path(),
            "gw.toml",
            "[radio]\nboard = \"semtech_corecell\"\n",
        );
        let on_gw = load(std::slice::from_ref(&cfg), &[], Some(Linked::Libloragw)).unwrap();
        assert_eq!(on_gw.radio.backend, Backend::Sx1302);
        // On a simulator build: the simulator file beside the configuration.
        let e = match load(std::slice::from_ref(&cfg), &[], Some(Linked::Simulator)) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        };
        assert!(
            e.len() == 1 && e[0].contains("simulator.toml does not exist"),
            "{e:?}"
        );
        write(dir.path(), "simulator.toml", "");
        let on_sim = load(std::slice::from_ref(&cfg), &[], Some(Linked::Simulator)).unwrap();
        assert_eq!(on_sim.radio.backend, Backend::Simulator);
        assert_eq!(
            on_sim.radio.simulator.as_deref(),
            Some(dir.path().join("simulator.toml").as_path())
        );
    }

    #[test]
    fn upstream_libloragw_refuses_a_board_it_can_never_start() {
        let dir = tmp();
        let rak = write(dir.path(), "rak.toml", "[radio]\nboard = \"rak5146\"\n");
        let errors = |l| match load(std::slice::from_ref(&rak), &[], Some(l)) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        };
        let e = errors(Linked::LibloragwUpstream);
        assert!(
            e.len() == 1
                && e[0].contains(":2:9: radio.board: the RAKwireless RAK5146")
                && e[0].contains("V2.1.0r9"),
            "{e:?}"
        );
        assert!(errors(Linked::Libloragw).is_empty());
        let corecell = write(
            dir.path(),
            "cc.toml",
            "[radio]\nboard = \"semtech_corecell\"\n",
        );
        assert!(load(&[corecell], &[], Some(Linked::LibloragwUpstream)).is_ok());
    }

    #[test]
    fn a_backend_the_binary_does_not_link_is_refused() {
        let dir = tmp();
        let sim = write(dir.path(), "sim.toml", "");
        let gw = write(dir.path(), "gw.toml", "[radio]\nbackend = \"sx1302\"\n");
        let simcfg = write(
            dir.path(),
            "s.toml",
            &format!("[radio]\nbackend = \"simulator\"\nsimulator = {:?}\n", sim),
        );
        let e = |f: &PathBuf, l| match load(std::slice::from_ref(f), &[], Some(l)) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        };
        let on_sim = e(&gw, Linked::Simulator);
        assert!(
            on_sim.len() == 1
                && on_sim[0].contains(":2:11: radio.backend: \"sx1302\" needs a gateway build"),
            "{on_sim:?}"
        );
        assert!(e(&gw, Linked::Libloragw).is_empty());
        assert!(e(&simcfg, Linked::Simulator).is_empty());
        let on_gw = e(&simcfg, Linked::Libloragw);
        assert!(
            on_gw.len() == 1
                && on_gw[0].contains("radio.backend: \"simulator\" is not in this build"),
            "{on_gw:?}"
        );
    }

    #[test]
    fn a_number_too_large_for_toml_names_its_field() {
        let dir = tmp();
        let f = write(
            dir.path(),
            "a.toml",
            "[store]\nmax_size_mib = 18446744073709551615\n",
        );
        let e = errors(std::slice::from_ref(&f), &[]);
        assert_eq!(
            e,
            vec![format!(
                "{}:2:16: store.max_size_mib: a whole number too large for TOML (at most 9223372036854775807)",
                f.display()
            )]
        );
    }
}
