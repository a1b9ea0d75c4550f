//! MQTT 3.1.1 for the brokers a network runs that do not speak MQTT 5 (issue 22): RabbitMQ
//! before 3.13, whose MQTT plugin drops a version-5 CONNECT without a CONNACK, is imitated by a
//! proxy in front of Mosquitto that does the same and lets 3.1.1 through.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use lora_edge_e2e::*;

/// A listener that closes any connection whose CONNECT says protocol level 5, and passes the
/// others through to `upstream`. Returns its port.
fn mqtt311_only(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut header = vec![0u8; 1];
                if c.read_exact(&mut header).is_err() {
                    return;
                }
                let (mut len, mut mul) = (0usize, 1usize);
                loop {
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).is_err() {
                        return;
                    }
                    header.push(b[0]);
                    len += (b[0] & 0x7f) as usize * mul;
                    mul *= 128;
                    if b[0] & 0x80 == 0 {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if c.read_exact(&mut body).is_err() {
                    return;
                }
                // CONNECT's variable header: 00 04 'M' 'Q' 'T' 'T', then the level.
                if header[0] >> 4 != 1 || body.get(6) == Some(&5) {
                    return;
                }
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                if up
                    .write_all(&header)
                    .and_then(|_| up.write_all(&body))
                    .is_err()
                {
                    return;
                }
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                let _ = std::io::copy(&mut c, &mut up);
                let _ = up.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn a_broker_without_mqtt_5_is_named_and_3_1_1_carries_uplinks_commands_and_acks() {
    let broker = Broker::start();
    let collector = Collector::start(broker.port, "eu868");
    let only311 = mqtt311_only(broker.port);

    // MQTT 5 (the default) against it: the log says what to do.
    let (v5, _d5) = AgentSetup::new(only311).start();
    assert!(
        v5.wait_log(
            "does not speak MQTT 5 (RabbitMQ before 3.13, Azure IoT Hub): set mqtt.protocol = \"3.1.1\"",
            patience(Duration::from_secs(15))
        ),
        "{}",
        v5.log()
    );
    drop(v5);

    // 3.1.1: uplinks reach the centre, a downlink command arrives and its ack goes back.
    carries_everything(&collector, only311, broker.port, "3.1.1");
    assert!(
        !collector.on("/state/conn").is_empty(),
        "state/conn published over 3.1.1"
    );
}

/// An agent speaking `protocol` to the broker at `port`: its three uplinks reach `collector`,
/// it subscribes, and a downlink published at `publish_port` is sent and acknowledged.
fn carries_everything(collector: &Collector, port: u16, publish_port: u16, protocol: &str) {
    collector.clear();
    let (agent, _dir) = AgentSetup::new(port)
        .scenario(&frames(3, 1, 500, 0.0))
        .config(&format!("[mqtt]\nprotocol = \"{protocol}\""))
        .start();
    let ctx = first_uplink_context(collector, patience(Duration::from_secs(15)));
    assert!(
        agent.wait_log(
            "subscribed: commands will arrive",
            patience(Duration::from_secs(10))
        ),
        "{protocol}: {}",
        agent.log()
    );
    publish(
        publish_port,
        DOWN,
        frame(
            9,
            vec![lora(868_100_000, 14, 7, delay(1000), ctx, b"\x60mqtt")],
        ),
    );
    assert_eq!(
        ack(collector, 9, patience(Duration::from_secs(10))),
        vec![chirpstack_api::gw::TxAckStatus::Ok],
        "{protocol}: {}",
        agent.log()
    );
    let ups = collector.wait_for("/event/up", patience(Duration::from_secs(10)), |m| {
        m.len() >= 3
    });
    assert_eq!(ups.len(), 3, "{protocol}: {}", agent.log());
}

/// rumqttd (Bytebeam's broker, in this process) with an MQTT 3.1.1 and an MQTT 5 listener.
fn rumqttd() -> (u16, u16) {
    let (v4, v5) = (free_port(), free_port());
    let listener = |name: &str, port: u16| {
        format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 1\n\
             [{name}.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 262144\n\
             max_inflight_count = 200\ndynamic_filters = true\n"
        )
    };
    let text = format!(
        "id = 0\n[router]\nmax_connections = 100\nmax_outgoing_packet_count = 200\n\
         max_segment_size = 10485760\nmax_segment_count = 10\n[v4.1]\n{}\n[v5.1]\n{}",
        listener("v4.1", v4).replacen("name = \"v4.1\"", "name = \"v4-1\"", 1),
        listener("v5.1", v5).replacen("name = \"v5.1\"", "name = \"v5-1\"", 1),
    );
    let config: rumqttd::Config = toml::from_str(&text).expect("rumqttd config");
    let mut broker = rumqttd::Broker::new(config);
    std::thread::spawn(move || {
        let _ = broker.start();
    });
    assert!(wait_port(v4, Duration::from_secs(10)) && wait_port(v5, Duration::from_secs(10)));
    (v4, v5)
}

#[test]
fn both_protocols_carry_uplinks_commands_and_acks_through_rumqttd() {
    let (v4, v5) = rumqttd();
    let collector = Collector::start(v4, "eu868");
    carries_everything(&collector, v4, v4, "3.1.1");
    carries_everything(&collector, v5, v4, "5");
}
