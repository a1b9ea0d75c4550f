//! Remote operations (issue 22): what the network team sees of a gateway without driving to it.

use std::time::{Duration, Instant};

use lora_edge_e2e::*;
use serde_json::Value;

/// The latest `state/health` message seen satisfying `pred`.
fn wait_health(c: &Collector, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let until = Instant::now() + patience(timeout);
    while Instant::now() < until {
        let found = c
            .on("/state/health")
            .iter()
            .rev()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .find(|v| pred(v));
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// sha256 of a file by coreutils, not by the agent's code.
fn sha256sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn health_is_retained_current_and_says_when_the_gateway_stopped() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (mut agent, dir) = AgentSetup::new(broker.port)
        .scenario(&frames(5, 1, 0, 10.0))
        .start();
    let h = wait_health(&collector, Duration::from_secs(15), |v| {
        v["radio"]["state"] == "up"
    })
    .unwrap_or_else(|| panic!("no health with the radio up\n{}", agent.log()));
    assert_eq!(h["gateway_id"], GATEWAY_ID, "{h}");
    assert_eq!(h["state"], "running", "{h}");
    assert!(
        h["hal"]
            .as_str()
            .unwrap()
            .contains("simulated concentrator"),
        "{h}"
    );
    assert_eq!(h["radio"]["concentrator_eui"], GATEWAY_ID, "{h}");
    assert!(
        h["backhaul"].get("up").is_none(),
        "state/conn says that: {h}"
    );
    assert_eq!(h["backhaul"]["outages_total"], 0, "{h}");
    assert!(h["store"]["free_bytes"].as_u64().unwrap() > 0, "{h}");
    let files = h["config_files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{h}");
    assert_eq!(
        files[0]["sha256"].as_str().unwrap(),
        sha256sum(&dir.path().join("agent.toml")),
        "{h}"
    );
    // Retained: someone subscribing now (the collector above saw it live) is given it at once.
    let now_on = Collector::start(broker.port, "eu868");
    let until = Instant::now() + patience(Duration::from_secs(5));
    while !now_on.on("/state/health").iter().any(|m| m.retain) {
        assert!(
            Instant::now() < until,
            "no retained health for a new subscriber"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(agent.sigterm().success(), "{}", agent.log());
    // Someone looking later (a new subscriber) reads the retained message: stopped.
    let late = Collector::start(broker.port, "eu868");
    let h = wait_health(&late, Duration::from_secs(5), |_| true)
        .unwrap_or_else(|| panic!("no retained health\n{}", agent.log()));
    assert_eq!(h["state"], "stopped", "{h}");
}

#[test]
fn health_says_at_once_why_the_radio_is_down() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("[faults]\nspi = \"answers_0xff\"")
        // Not on the stats interval: at once, on the change.
        .config("[stats]\ninterval = \"1h\"")
        .start();
    let h = wait_health(&collector, Duration::from_secs(15), |v| {
        v["radio"]["state"] == "down"
    })
    .unwrap_or_else(|| panic!("no health with the radio down\n{}", agent.log()));
    assert_eq!(h["radio"]["cause"], "spi_silent", "{h}");
    assert_eq!(
        h["radio"]["last_error"], "Note: chip version is 0xFF (v15.15)",
        "{h}"
    );
    assert!(h["radio"]["temperature_c"].is_null(), "{h}");
}

/// The responses to `command/exec` received so far, by exec_id.
fn exec_responses(
    c: &Collector,
) -> std::collections::HashMap<u32, chirpstack_api::gw::GatewayCommandExecResponse> {
    use prost::Message;
    c.on("/event/exec")
        .iter()
        .filter_map(|m| {
            chirpstack_api::gw::GatewayCommandExecResponse::decode(m.payload.as_slice()).ok()
        })
        .map(|r| (r.exec_id, r))
        .collect()
}

#[test]
fn command_exec_runs_only_the_allow_list_and_answers_every_request() {
    use chirpstack_api::gw;
    use prost::Message;
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .config(
            "[commands.hello]\nargv = [\"/bin/echo\", \"bonjour\"]\n\
             [commands.upper]\nargv = [\"/usr/bin/tr\", \"a-z\", \"A-Z\"]\nstdin = true\n\
             [commands.env]\nargv = [\"/usr/bin/env\"]\nallow_env = [\"SITE\"]\n\
             [commands.slow]\nargv = [\"/bin/sleep\", \"60\"]\ntimeout = \"1s\"\n\
             [commands.chatty]\nargv = [\"/bin/sh\", \"-c\", \"head -c 5000 /dev/zero; exit 4\"]\nmax_output_bytes = 100\n\
             [commands.fds]\nargv = [\"/bin/ls\", \"-l\", \"/proc/self/fd\"]\n",
        )
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let topic = format!("eu868/gateway/{GATEWAY_ID}/command/exec");
    let ask = |id: u32, command: &str, stdin: &[u8], env: &[(&str, &str)]| {
        let r = gw::GatewayCommandExecRequest {
            gateway_id: GATEWAY_ID.into(),
            command: command.into(),
            exec_id: id,
            stdin: stdin.to_vec(),
            environment: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        publish(broker.port, &topic, r.encode_to_vec());
    };
    ask(1, "hello", b"", &[]);
    ask(2, "upper", b"niveau du cher\n", &[]);
    ask(3, "env", b"", &[("SITE", "chenonceau")]);
    ask(4, "env", b"", &[("LD_PRELOAD", "/tmp/evil.so")]);
    ask(5, "rm -rf /", b"", &[]);
    ask(6, "hello", b"unexpected", &[]);
    ask(7, "slow", b"", &[]);
    ask(8, "chatty", b"", &[]);
    ask(9, "fds", b"", &[]);
    publish(broker.port, &topic, b"\xff\x00 not a request".to_vec());

    let until = Instant::now() + patience(Duration::from_secs(30));
    while exec_responses(&collector).len() < 9 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = exec_responses(&collector);
    assert_eq!(r.len(), 9, "{r:?}\n{}", agent.log());
    assert!(r.values().all(|x| x.gateway_id == GATEWAY_ID));
    assert_eq!(
        (r[&1].stdout.as_slice(), r[&1].error.as_str()),
        (&b"bonjour\n"[..], "")
    );
    assert_eq!(r[&2].stdout, b"NIVEAU DU CHER\n");
    let env = String::from_utf8_lossy(&r[&3].stdout);
    assert!(
        env.contains("SITE=chenonceau") && !env.contains("HOME="),
        "{env}"
    );
    assert!(
        r[&4].error.contains("LD_PRELOAD") && r[&4].stdout.is_empty(),
        "{:?}",
        r[&4]
    );
    assert!(r[&5].error.contains("not allowed"), "{:?}", r[&5]);
    assert!(r[&6].error.contains("takes no stdin"), "{:?}", r[&6]);
    assert!(r[&7].error.starts_with("timed out after 1s"), "{:?}", r[&7]);
    assert_eq!(r[&8].stdout.len(), 100);
    assert_eq!(
        r[&8].error,
        "exit status 4; stdout cut at 100 of 5000 bytes"
    );
    // Neither the agent's log nor the library's terminal reaches the program (what the test
    // runner itself leaves open, a jobserver pipe, is no business of the agent's: systemd
    // starts it with none).
    let fds = String::from_utf8_lossy(&r[&9].stdout).to_string();
    assert!(
        fds.contains("/proc/self/fd") || fds.contains("total"),
        "{fds}"
    );
    assert!(!fds.contains("ptmx") && !fds.contains("agent.log"), "{fds}");
    let log = agent.log();
    assert!(
        log.contains("command/exec refused") && log.contains("undecodable request"),
        "{log}"
    );
}

#[test]
fn ops_requests_are_answered_with_secrets_redacted_and_every_refusal_said() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, dir) = AgentSetup::new(broker.port)
        .config("[mqtt]\nusername = \"gw\"\npassword = \"s3cret-Loire\"")
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let topic = format!("eu868/gateway/{GATEWAY_ID}/command/ops");
    for req in [
        r#"{"id":"c1","op":"config"}"#,
        r#"{"id":"r1","op":"rules"}"#,
        r#"{"id":"b1","op":"backlog"}"#,
        r#"{"id":"h1","op":"health"}"#,
        r#"{"id":"a1","op":"apply"}"#,
        r#"{"id":"u1","op":"format-the-disk"}"#,
        r#"{"op":"config"}"#,
        "not json at all",
    ] {
        publish(broker.port, &topic, req.as_bytes().to_vec());
    }
    let until = Instant::now() + patience(Duration::from_secs(20));
    let answers = loop {
        let a: Vec<Value> = collector
            .on("/event/ops")
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect();
        if a.len() >= 8 || Instant::now() > until {
            break a;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(answers.len(), 8, "{answers:?}\n{}", agent.log());
    let by = |id: &str| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer {id}: {answers:?}"))
            .clone()
    };
    let c = by("c1");
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["result"]["config"]["mqtt"]["password"], "(hidden)", "{c}");
    assert_eq!(c["result"]["config"]["mqtt"]["username"], "gw", "{c}");
    let raw: String = collector
        .on("/event/ops")
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert!(
        !raw.contains("s3cret-Loire"),
        "the password left the gateway"
    );
    let files = c["result"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "agent.toml and extra.toml: {c}");
    assert_eq!(
        files[0]["sha256"].as_str().unwrap(),
        sha256sum(&dir.path().join("agent.toml"))
    );
    assert!(by("r1")["error"].as_str().unwrap().contains("no rules"));
    let b = by("b1");
    assert_eq!(b["ok"], true, "{b}");
    assert!(b["result"]["next_seq"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(by("h1")["result"]["gateway_id"], GATEWAY_ID);
    assert!(
        by("a1")["error"].as_str().unwrap().contains("\"config\""),
        "{}",
        by("a1")
    );
    assert!(by("u1")["error"].as_str().unwrap().contains("unknown op"));
    let no_id: Vec<&Value> = answers.iter().filter(|a| a["id"].is_null()).collect();
    assert_eq!(no_id.len(), 2, "{no_id:?}");
    assert!(no_id
        .iter()
        .any(|a| a["error"].as_str().unwrap().starts_with("not JSON")));
    assert!(no_id
        .iter()
        .any(|a| a["error"].as_str().unwrap().contains("needs an \"id\"")));
    assert!(
        answers.iter().all(|a| a["seq"].as_u64().is_some()),
        "stored, numbered"
    );
}

#[test]
fn an_answer_larger_than_the_broker_takes_is_skipped_and_said_and_the_rest_flows() {
    use chirpstack_api::gw;
    use prost::Message;
    // The README advises a broker-side max_packet_size; the agent learns it from the CONNACK.
    let broker = Broker::start_with(|_| "max_packet_size 200000\n".into());
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 5.0")
        .config(
            "[commands.flood]\nargv = [\"/bin/sh\", \"-c\", \"head -c 300000 /dev/zero\"]\n\
             max_output_bytes = 1048576\n",
        )
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let r = gw::GatewayCommandExecRequest {
        command: "flood".into(),
        exec_id: 1,
        ..Default::default()
    };
    publish(
        broker.port,
        &format!("eu868/gateway/{GATEWAY_ID}/command/exec"),
        r.encode_to_vec(),
    );
    assert!(
        agent.wait_log("larger than the broker accepts", Duration::from_secs(20)),
        "{}",
        agent.log()
    );
    // The uplinks behind it still go out (before: every session ended at that record).
    let before = collector.on("/event/up").len();
    let after = collector.wait_for("/event/up", Duration::from_secs(20), |m| {
        m.len() > before + 10
    });
    assert!(after.len() > before + 10, "{}", agent.log());
    assert!(
        !agent
            .log()
            .contains("greater than the broker's maximum packet size"),
        "{}",
        agent.log()
    );
}

/// The agent's setup with `ops.remote_config` in its directory, and that path.
fn with_remote(broker: &Broker, extra: &str) -> (AgentSetup, std::path::PathBuf) {
    let setup = AgentSetup::new(broker.port);
    let remote = setup.dir.path().join("remote.toml");
    let setup = setup.config(&format!(
        "[ops]\nremote_config = \"{}\"\n{extra}",
        remote.display()
    ));
    (setup, remote)
}

fn beside(remote: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}{suffix}", remote.display()))
}

/// An answer on `event/ops` with this id satisfying `pred`, waited for.
fn answer_where(
    c: &Collector,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let until = Instant::now() + patience(timeout);
    while Instant::now() < until {
        if let Some(a) = c
            .on("/event/ops")
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .find(|a| a["id"] == id && pred(a))
        {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_configuration_change_with_errors_is_refused_whole_with_every_error_and_changes_nothing() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (setup, remote) = with_remote(&broker, "");
    // Retained by mistake before the gateway connects: never applied (it would come again
    // after every undo).
    let ops_topic = format!("eu868/gateway/{GATEWAY_ID}/command/ops");
    let retained = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-r",
        ])
        .args(["-t", &ops_topic, "-m"])
        .arg(r#"{"id":"ret","op":"apply","config":"[stats]\ninterval = \"9s\"\n"}"#)
        .status()
        .expect("mosquitto_pub");
    assert!(retained.success());
    let (agent, _dir) = setup.start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    assert!(
        agent.wait_log("a retained command ignored", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    let pid = agent.pid();
    let a = ops_request(
        &collector,
        broker.port,
        "bad3",
        serde_json::json!({"op": "apply", "config":
            "[mqtt]\ninflight = 0\nkeep_alive = \"1s\"\n[stats]\ninterval = \"0s\"\n"}),
        &agent,
    );
    assert_eq!(a["ok"], false, "{a}");
    let e = a["error"].as_str().unwrap();
    for field in ["mqtt.inflight", "mqtt.keep_alive", "stats.interval"] {
        assert!(e.contains(field), "{field} not in: {e}");
    }
    assert!(e.contains("3 error(s)"), "{e}");
    for (id, body, says) in [
        (
            "syn",
            serde_json::json!({"op": "apply", "config": "[stats]\ninterval = = 3"}),
            "fragment line 2",
        ),
        (
            "opskey",
            serde_json::json!({"op": "apply", "config": "[ops]\nrevert_after = \"1h\""}),
            "changed only on the gateway",
        ),
        (
            "nothing",
            serde_json::json!({"op": "confirm"}),
            "nothing to confirm",
        ),
        (
            "waive",
            serde_json::json!({"op": "apply", "config": "[mqtt]\nserver = \"tcp://127.0.0.1:1\"", "confirm": false}),
            "\"confirm\": false is refused",
        ),
        (
            "file",
            serde_json::json!({"op": "apply", "config": "[mqtt]\npassword_file = \"/etc/shadow\""}),
            "mqtt.password_file: a file on the gateway",
        ),
        (
            "both",
            serde_json::json!({"op": "apply", "config": "[stats]\ninterval = \"9s\"", "rules": "x"}),
            "not both",
        ),
        (
            "range",
            serde_json::json!({"op": "apply", "config": "[stats]\ninterval = \"9s\"", "revert_after_s": 5}),
            "between 10 and 3600",
        ),
    ] {
        let a = ops_request(&collector, broker.port, id, body, &agent);
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap().contains(says), "{id}: {a}");
    }
    assert!(
        !remote.exists(),
        "nothing written (the retained apply neither)"
    );
    assert!(
        !collector
            .on("/event/ops")
            .iter()
            .any(|m| String::from_utf8_lossy(&m.payload).contains("\"ret\"")),
        "the retained request was answered"
    );
    assert!(!beside(&remote, ".new").exists() && !beside(&remote, ".pending").exists());
    assert!(
        !agent.log().contains("restart requested"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.pid(), pid);
}

#[test]
fn a_change_that_cuts_the_backhaul_is_undone_by_the_agent_and_reported_when_it_is_back() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (setup, remote) = with_remote(&broker, "revert_after = \"10s\"\n");
    let (agent, _dir) = setup.sim("synthetic_rate_hz = 5").start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let dead = free_port();
    let a = ops_request(
        &collector,
        broker.port,
        "cut",
        serde_json::json!({"op": "apply", "config": format!("[mqtt]\nserver = \"tcp://127.0.0.1:{dead}\"\n")}),
        &agent,
    );
    assert_eq!(a["ok"], true, "{a}\n{}", agent.log());
    assert_eq!(a["result"]["provisional"], true, "{a}");
    assert_eq!(a["result"]["revert_after_s"], 10, "{a}");
    // Undone by itself, and said once the backhaul is back.
    let undone = answer_where(&collector, "cut", Duration::from_secs(90), |a| {
        a["ok"] == false
    });
    let undone = undone.unwrap_or_else(|| panic!("no undo reported\n{}", agent.log()));
    let e = undone["error"].as_str().unwrap();
    assert!(
        e.contains("undone") && e.contains("backhaul session was not up with it within 10 s"),
        "{e}"
    );
    let log = agent.log();
    assert!(
        log.contains(&format!("127.0.0.1:{dead}")),
        "the new server was tried:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&remote).unwrap(),
        "",
        "the previous (no changes) is back"
    );
    assert!(!beside(&remote, ".pending").exists());
    assert!(
        !beside(&remote, ".reverted").exists(),
        "reported, so removed"
    );
    // The same process throughout (it ran itself again), and uplinks flow again.
    assert!(agent.pid().is_some());
    let before = collector.on("/event/up").len();
    assert!(
        collector
            .wait_for("/event/up", Duration::from_secs(20), |m| m.len()
                > before + 5)
            .len()
            > before + 5,
        "{}",
        agent.log()
    );
}

#[test]
fn a_change_is_kept_once_the_backhaul_is_up_with_it_and_the_centre_confirmed() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (setup, remote) = with_remote(&broker, "");
    let (agent, dir) = setup.start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let a = ops_request(
        &collector,
        broker.port,
        "seven",
        serde_json::json!({"op": "apply", "config": "[stats]\ninterval = \"7s\"\n", "confirm": true, "revert_after_s": 60}),
        &agent,
    );
    assert_eq!(a["ok"], true, "{a}\n{}", agent.log());
    assert_eq!(a["result"]["confirm_needed"], true, "{a}");
    // Running again with it: its health names the centre's file with coreutils' sha256.
    let health = wait_health(&collector, Duration::from_secs(30), |h| {
        h["state"] == "running"
            && h["config_files"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["path"] == remote.display().to_string()))
    })
    .unwrap_or_else(|| panic!("no health with remote.toml\n{}", agent.log()));
    let entry = health["config_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == remote.display().to_string())
        .unwrap()
        .clone();
    assert_eq!(entry["sha256"].as_str().unwrap(), sha256sum(&remote));
    assert!(
        beside(&remote, ".pending").exists(),
        "provisional until confirmed"
    );
    let c = ops_request(
        &collector,
        broker.port,
        "ok-seven",
        serde_json::json!({"op": "confirm", "change": "seven"}),
        &agent,
    );
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["result"]["confirmed"], "seven", "{c}");
    // Kept once the backhaul has been up with it for 10 s.
    let kept = answer_where(&collector, "seven", Duration::from_secs(40), |a| {
        a["result"]["kept"] == true
    })
    .unwrap_or_else(|| panic!("not kept\n{}", agent.log()));
    assert!(
        kept["result"]["how"]
            .as_str()
            .unwrap()
            .contains("confirmed"),
        "{kept}"
    );
    assert!(!beside(&remote, ".pending").exists());
    assert!(std::fs::read_to_string(&remote).unwrap().contains("7s"));
    // `check` on the gateway reads the same files and says so.
    let out = std::process::Command::new(agent_binary())
        .args(["check", "-c"])
        .arg(dir.path().join("agent.toml"))
        .arg("-c")
        .arg(dir.path().join("extra.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("includes the changes the centre applied"),
        "{said}"
    );
    // The centre takes it back: a rollback runs the changes as they were before (none), as a
    // provisional change of its own, kept once the backhaul is up with it.
    let r = ops_request(
        &collector,
        broker.port,
        "back",
        serde_json::json!({"op": "rollback", "config": true, "revert_after_s": 60}),
        &agent,
    );
    assert_eq!(r["ok"], true, "{r}\n{}", agent.log());
    assert_eq!(r["result"]["confirm_needed"], false, "{r}");
    answer_where(&collector, "back", Duration::from_secs(40), |a| {
        a["result"]["kept"] == true
    })
    .unwrap_or_else(|| panic!("the rollback was not kept\n{}", agent.log()));
    assert!(!std::fs::read_to_string(&remote).unwrap().contains("7s"));
    assert!(std::fs::read_to_string(beside(&remote, ".prev"))
        .unwrap()
        .contains("7s"));
}

fn plan(version: &str, channels: &[(u32, Vec<u32>)]) -> Vec<u8> {
    use chirpstack_api::gw;
    use prost::Message;
    gw::GatewayConfiguration {
        gateway_id: GATEWAY_ID.into(),
        version: version.into(),
        channels: channels
            .iter()
            .map(|(f, sfs)| gw::ChannelConfiguration {
                frequency: *f,
                modulation_config: Some(
                    gw::channel_configuration::ModulationConfig::LoraModulationConfig(
                        gw::LoraModulationConfig {
                            bandwidth: 125_000,
                            spreading_factors: sfs.clone(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn a_channel_plan_from_the_network_server_runs_on_the_radio_and_a_bad_one_is_refused_with_why() {
    use chirpstack_api::gw;
    use prost::Message;
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 20\nrx_config_log = \"rx_config.jsonl\"")
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    let topic = format!("eu868/gateway/{GATEWAY_ID}/command/config");
    let starts = || {
        std::fs::read_to_string(dir.path().join("rx_config.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(starts().len(), 1);
    let all: Vec<u32> = (7..=12).collect();
    // Nine multi-SF channels, one out of the band: refused, both said, the radio untouched.
    let mut bad: Vec<(u32, Vec<u32>)> = (0..9)
        .map(|i| (867_100_000 + 200_000 * i, all.clone()))
        .collect();
    bad.push((902_300_000, all.clone()));
    publish(broker.port, &topic, plan("bad-1", &bad));
    let a = answer_where(&collector, "bad-1", Duration::from_secs(15), |_| true)
        .unwrap_or_else(|| panic!("no answer\n{}", agent.log()));
    assert_eq!(a["ok"], false, "{a}");
    let e = a["error"].as_str().unwrap();
    assert!(e.contains("902.3 MHz") && e.contains("outside"), "{e}");
    assert!(e.contains("9 multi-SF channels"), "{e}");
    assert_eq!(
        starts().len(),
        1,
        "the radio was not restarted for a refused plan"
    );

    // A good one: the radio runs it, the uplinks come on its channels, the stats name it.
    let freqs: Vec<u32> = (0..8).map(|i| 864_100_000 + 200_000 * i).collect();
    let good: Vec<(u32, Vec<u32>)> = freqs.iter().map(|f| (*f, all.clone())).collect();
    publish(broker.port, &topic, plan("v2", &good));
    let a = answer_where(&collector, "v2", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("no answer\n{}", agent.log()));
    assert_eq!(a["ok"], true, "{a}\n{}", agent.log());
    let s = starts();
    assert_eq!(s.len(), 2, "{s:?}");
    let heard: Vec<u64> = s[1]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["freq_hz"].as_u64().unwrap())
        .collect();
    for f in &freqs {
        assert!(heard.contains(&(*f as u64)), "{f} not configured: {s:?}");
    }
    let before = collector.on("/event/up").len();
    let ups = collector.wait_for("/event/up", patience(Duration::from_secs(10)), |m| {
        m.len() > before + 20
    });
    let after: Vec<u32> = ups[before..]
        .iter()
        .map(|m| decode_uplink(&m.payload, false).tx_info.unwrap().frequency)
        .collect();
    assert!(after.len() > 20, "{}", agent.log());
    assert!(
        after[after.len() - 10..].iter().all(|f| freqs.contains(f)),
        "uplinks still on the old channels: {after:?}"
    );
    let stats = collector.wait_for("/event/stats", patience(Duration::from_secs(10)), |m| {
        m.iter().any(|m| {
            gw::GatewayStats::decode(m.payload.as_slice()).is_ok_and(|s| s.config_version == "v2")
        })
    });
    let last = stats
        .iter()
        .rev()
        .filter_map(|m| gw::GatewayStats::decode(m.payload.as_slice()).ok())
        .find(|s| s.config_version == "v2")
        .unwrap_or_else(|| panic!("no stats with config_version v2\n{}", agent.log()));
    assert_eq!(
        last.metadata.get("rx_dropped_total").map(String::as_str),
        Some("0")
    );

    // A smaller plan: the concentrator hears exactly it, nothing of the previous one.
    let three: Vec<(u32, Vec<u32>)> = [867_100_000, 867_300_000, 867_500_000]
        .iter()
        .map(|f| (*f, all.clone()))
        .collect();
    publish(broker.port, &topic, plan("v3", &three));
    let a = answer_where(&collector, "v3", Duration::from_secs(30), |_| true).unwrap();
    assert_eq!(a["ok"], true, "{a}");
    let heard = |s: &[Value]| -> Vec<u64> {
        s.last().unwrap()["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["freq_hz"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        heard(&starts()),
        vec![867_100_000, 867_300_000, 867_500_000]
    );

    // A burst: the newest runs, every one is answered.
    let burst: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            let base = if i % 2 == 0 { 864_100_000 } else { 867_100_000 };
            let chans: Vec<(u32, Vec<u32>)> =
                (0..8).map(|k| (base + 200_000 * k, all.clone())).collect();
            (topic.clone(), plan(&format!("b{i}"), &chans))
        })
        .collect();
    publish_many(broker.port, burst);
    let newest = answer_where(&collector, "b11", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("the newest plan was not answered\n{}", agent.log()));
    assert_eq!(newest["ok"], true, "{newest}");
    for i in 0..11 {
        let a = answer_where(
            &collector,
            &format!("b{i}"),
            Duration::from_secs(10),
            |_| true,
        )
        .unwrap_or_else(|| panic!("b{i} not answered\n{}", agent.log()));
        assert!(
            a["ok"] == true
                || a["error"]
                    .as_str()
                    .unwrap()
                    .contains("superseded by version \"b"),
            "{a}"
        );
    }
    assert_eq!(heard(&starts())[0], 867_100_000, "the newest (b11) runs");
}

#[test]
fn a_channel_plan_applied_while_a_backlog_drains_loses_nothing() {
    let mut broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let (agent, _dir) = AgentSetup::new(broker.port)
        .sim("synthetic_rate_hz = 50")
        .start();
    assert!(
        agent.wait_log("subscribed: commands will arrive", Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    broker.stop();
    std::thread::sleep(Duration::from_secs(4));
    broker.start_again();
    let collector = {
        drop(collector);
        Collector::start(broker.port, "eu868")
    };
    assert!(
        agent.wait_log_count(
            "subscribed: commands will arrive",
            2,
            patience(Duration::from_secs(20))
        ) >= 2,
        "{}",
        agent.log()
    );
    let all: Vec<u32> = (7..=12).collect();
    let good: Vec<(u32, Vec<u32>)> = (0..8)
        .map(|i| (864_100_000 + 200_000 * i, all.clone()))
        .collect();
    publish(
        broker.port,
        &format!("eu868/gateway/{GATEWAY_ID}/command/config"),
        plan("during-drain", &good),
    );
    let a = answer_where(&collector, "during-drain", Duration::from_secs(30), |_| {
        true
    })
    .unwrap_or_else(|| panic!("no answer\n{}", agent.log()));
    assert_eq!(a["ok"], true, "{a}");
    std::thread::sleep(Duration::from_secs(2));
    // Everything from the first number the new subscriber saw to the last is there.
    let (first, last, missing) = seq_gaps(&collector.all());
    assert!(
        missing.is_empty(),
        "missing {missing:?} of {first}..={last}\n{}",
        agent.log()
    );
    assert!(last - first > 200, "a backlog drained: {first}..={last}");
}
