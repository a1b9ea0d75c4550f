//! Building `command/down` messages as a network server would, and reading their acks.

use std::time::Duration;

use chirpstack_api::gw;
use chirpstack_api::pbjson_types;
use prost::Message;

use crate::{Collector, Msg, GATEWAY_ID};

/// The test gateway's downlink topic.
pub const DOWN: &str = "eu868/gateway/0016c001ff10a235/command/down";

/// A LoRa downlink item (125 kHz, 4/5, inverted polarity) against the uplink counter `ctx`.
pub fn lora(
    freq: u32,
    power: i32,
    sf: u32,
    timing: gw::timing::Parameters,
    ctx: u32,
    payload: &[u8],
) -> gw::DownlinkFrameItem {
    gw::DownlinkFrameItem {
        phy_payload: payload.to_vec(),
        tx_info: Some(gw::DownlinkTxInfo {
            frequency: freq,
            power,
            modulation: Some(gw::Modulation {
                parameters: Some(gw::modulation::Parameters::Lora(gw::LoraModulationInfo {
                    bandwidth: 125_000,
                    spreading_factor: sf,
                    code_rate: gw::CodeRate::Cr45 as i32,
                    polarization_inversion: true,
                    ..Default::default()
                })),
            }),
            timing: Some(gw::Timing {
                parameters: Some(timing),
            }),
            context: ctx.to_be_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn delay(ms: u64) -> gw::timing::Parameters {
    gw::timing::Parameters::Delay(gw::DelayTimingInfo {
        delay: Some(pbjson_types::Duration {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
    })
}

pub fn immediately() -> gw::timing::Parameters {
    gw::timing::Parameters::Immediately(gw::ImmediatelyTimingInfo {})
}

pub fn frame(id: u32, items: Vec<gw::DownlinkFrameItem>) -> Vec<u8> {
    gw::DownlinkFrame {
        gateway_id: GATEWAY_ID.into(),
        downlink_id: id,
        items,
        ..Default::default()
    }
    .encode_to_vec()
}

/// The ack statuses for `id`, waiting for it.
pub fn ack(c: &Collector, id: u32, timeout: Duration) -> Vec<gw::TxAckStatus> {
    let find = |m: &[Msg]| {
        m.iter()
            .map(|m| gw::DownlinkTxAck::decode(m.payload.as_slice()).unwrap())
            .find(|a| a.downlink_id == id)
    };
    let msgs = c.wait_for("/event/ack", timeout, |m| find(m).is_some());
    let a = find(&msgs).unwrap_or_else(|| panic!("no ack for downlink {id}"));
    assert_eq!(a.gateway_id, GATEWAY_ID);
    a.items.iter().map(|i| i.status()).collect()
}

/// The concentrator counter (`context`) of the first uplink the collector receives, as a network
/// server reads it to answer in RX1/RX2.
pub fn first_uplink_context(c: &Collector, timeout: Duration) -> u32 {
    let ups = c.wait_for("/event/up", timeout, |m| !m.is_empty());
    let first = ups.first().expect("an uplink arrived");
    let f = crate::decode_uplink(&first.payload, false);
    u32::from_be_bytes(
        f.rx_info
            .expect("rx_info")
            .context
            .try_into()
            .expect("a 4-byte context"),
    )
}

/// Publishes downlinks of one item each to the test gateway, in order, and waits for the broker.
pub fn publish_downlinks(port: u16, downlinks: Vec<(u32, gw::DownlinkFrameItem)>) {
    crate::publish_many(
        port,
        downlinks
            .into_iter()
            .map(|(id, item)| (DOWN.to_string(), frame(id, vec![item])))
            .collect(),
    );
}

/// Publishes a pump request and waits for its answer on `event/pump`.
pub fn ask_pump(
    broker: &crate::Broker,
    collector: &Collector,
    id: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let mut req = body;
    req["requestId"] = id.into();
    crate::publish(
        broker.port,
        &format!("eu868/gateway/{GATEWAY_ID}/command/pump"),
        serde_json::to_vec(&req).unwrap(),
    );
    let find = |m: &[Msg]| {
        m.iter()
            .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap())
            .find(|a| a["requestId"] == id)
    };
    let msgs = collector.wait_for("/event/pump", Duration::from_secs(10), |m| {
        find(m).is_some()
    });
    find(&msgs).unwrap_or_else(|| panic!("no answer to request {id}"))
}

/// Publishes a `command/ops` request (JSON, `id` set to `id`) and returns its answer from
/// `event/ops`, as the collector received it.
pub fn ops_request(
    c: &Collector,
    port: u16,
    id: &str,
    body: serde_json::Value,
    agent: &crate::Agent,
) -> serde_json::Value {
    let mut v = body;
    v["id"] = id.into();
    crate::publish(
        port,
        &format!("eu868/gateway/{}/command/ops", crate::GATEWAY_ID),
        serde_json::to_vec(&v).unwrap(),
    );
    let until = std::time::Instant::now() + crate::patience(Duration::from_secs(15));
    loop {
        if let Some(a) = c
            .on("/event/ops")
            .iter()
            .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
            .find(|a| a["id"] == id)
        {
            return a;
        }
        assert!(
            std::time::Instant::now() < until,
            "no answer to {id}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
