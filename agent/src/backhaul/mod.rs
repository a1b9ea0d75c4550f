//! The MQTT backhaul: one session at a time to the broker, fed from the durable queue.
//!
//! Each connection is a fresh rumqttc client and event loop (MQTT 5, clean start): nothing is
//! trusted to rumqttc across a disconnect. The event loop runs in a task of its own (`link`) and
//! is never cancelled, so a session is exactly one TCP connection, and a new one is opened only
//! after a real failure and the back-off. After the CONNACK the session publishes the retained
//! ONLINE state and then everything above the queue's acknowledged watermark, in sequence order,
//! keeping at most `mqtt.inflight` publishes (or the broker's Receive Maximum, if lower)
//! unacknowledged. A PUBACK removes its record from the store (via `Inflight`). A connection
//! error, a CONNACK that does not come within `mqtt.connect_timeout`, a PUBACK refused by the
//! broker, or no PUBACK at all for `mqtt.ack_timeout` while publishes are outstanding (a silent
//! cut) ends the session; the next one starts again from the watermark after a back-off with
//! jitter. Delivery is therefore at-least-once; duplicates are bounded by the inflight window and
//! carry the same sequence number.
//!
//! MQTT 5 is used for its Maximum Packet Size: the broker must not send this client a packet
//! larger than `MAX_INCOMING_PACKET`, so an oversized `command/down` is dropped by the broker
//! for this client instead of breaking the session (MQTT 3.1.1 has no way to say it).

mod client;
mod inflight;
mod intake;
mod link;
pub mod tls;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chirpstack_api::gw;
use tokio::sync::watch;

use crate::config::{secret, Encoding, MqttConfig, MqttProtocol};
use crate::events::{publishable, unix_ms, Kind, FLAG_JOIN_REQUEST};
use crate::ops::counters::Counters;
use crate::store::Queue;
use client::{Client, Ev, LinkError, Refusal};
use inflight::Inflight;
use intake::{Admit, Intake};
use link::Link;

/// The largest packet the broker may send us (announced in CONNECT). A `DownlinkFrame` is at
/// most a few KiB; anything larger on `command/down` is dropped by the broker for this client.
pub const MAX_INCOMING_PACKET: u32 = 256 * 1024;

/// Topics of one gateway.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, gateway_id: &str) -> Topics {
        Topics {
            base: format!("{prefix}/gateway/{gateway_id}"),
        }
    }

    pub fn under(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }
}

pub struct Backhaul {
    pub cfg: MqttConfig,
    pub gateway_id: String,
    pub join_request_max_age: Duration,
    pub queue: Arc<Queue>,
    pub appended: watch::Receiver<u64>,
    pub counters: Arc<Counters>,
    pub shutdown: watch::Receiver<bool>,
    /// `command/down` payloads and when they arrived, to the downlink stage; None once
    /// shutting down (the stage may end).
    pub downlinks: Option<SyncSender<crate::downlink::Input>>,
    /// `command/pump` payloads, to the rules stage; None: no rules here, not subscribed, or
    /// shutting down.
    pub pumps: Option<SyncSender<crate::rules::Input>>,
    /// Set at the shutdown signal: publish what the store holds until `mqtt.drain_timeout`
    /// from then, then OFFLINE.
    pub drain_until: Option<tokio::time::Instant>,
    /// `command/exec` payloads, to the exec stage; None once shutting down.
    pub exec: Option<SyncSender<Vec<u8>>>,
    /// `command/ops` payloads, to the ops requests stage; None once shutting down.
    pub ops: Option<SyncSender<crate::ops::requests::OpsInput>>,
    /// `command/config` plans waiting for the ops stage (the newest runs).
    pub plans: Arc<crate::ops::channel_plan::PlanSlot>,
    /// The latest retained `state/health` message (ops/state.rs), published at every connect
    /// and whenever it changes; empty: none yet.
    pub health: Option<watch::Receiver<Vec<u8>>>,
}

/// The tick while something is pending (a CONNACK, PUBACKs, a drain): what it watches for is
/// seconds long (`connect_timeout`, `ack_timeout`).
const BUSY_TICK: Duration = Duration::from_millis(250);
/// The tick while `mqtt.max_rate_per_s` meters the publishes: the budget refills at each.
const RATE_TICK: Duration = Duration::from_millis(50);
/// A PUBLISH's bytes besides its topic and payload, at most: fixed header (5), topic length
/// (2), packet id (2), properties (a few).
const PUBLISH_OVERHEAD: usize = 16;
const IDLE_TICK: Duration = Duration::from_secs(1);

enum SessionEnd {
    Shutdown,
    Lost(String),
}

fn conn_state(gateway_id: &str, online: bool, encoding: Encoding) -> Vec<u8> {
    let state = gw::ConnState {
        gateway_id: gateway_id.to_string(),
        state: if online {
            gw::conn_state::State::Online
        } else {
            gw::conn_state::State::Offline
        } as i32,
        ..Default::default()
    };
    match encoding {
        // proto3's JSON mapping leaves out a field at its default value, and OFFLINE is 0: a
        // person (or a script) watching the broker looks for the word.
        Encoding::Json => {
            let mut v = serde_json::to_value(&state).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.entry("state").or_insert_with(|| {
                    serde_json::Value::from(gw::conn_state::State::Offline.as_str_name())
                });
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        Encoding::Protobuf => crate::events::wire(&state, encoding),
    }
}

/// A connection error in words an operator can act on.
fn describe(e: &LinkError, cfg: &MqttConfig, before_connack: bool) -> String {
    let server = crate::config::parse_server(&cfg.server).expect("validated");
    if let Some(why) = tls::explain(e, &server, cfg.tls.as_ref(), before_connack) {
        return match cfg.protocol {
            // A broker that does not speak MQTT 5 drops the CONNECT without a word.
            MqttProtocol::V5 if before_connack && !server.tls => format!(
                "{why}; or the broker does not speak MQTT 5 (RabbitMQ before 3.13, Azure IoT \
                 Hub): set mqtt.protocol = \"3.1.1\""
            ),
            _ => why,
        };
    }
    if let Some((kind, code)) = e.refused() {
        // Mosquitto 2 answers a wrong password with NotAuthorized, others with
        // BadUserNamePassword: both point at the credentials first.
        let hint = match (kind, cfg.username.as_deref()) {
            (Refusal::Credentials, Some(user)) => format!(
                ": the username ({user:?}) or the password ({}) is wrong, or the broker does not \
                 let this user connect",
                if cfg.password_file.is_some() {
                    "mqtt.password_file"
                } else if cfg.password.is_some() {
                    "mqtt.password"
                } else {
                    "none set: mqtt.password_file"
                }
            ),
            (Refusal::Credentials, None) => ": the broker wants a username and password \
                 (mqtt.username, mqtt.password_file) or a client certificate (mqtt.tls.cert_file)"
                .to_string(),
            (Refusal::Protocol, _) => match cfg.protocol {
                MqttProtocol::V5 => ": the broker does not speak MQTT 5: set mqtt.protocol = \
                                     \"3.1.1\""
                    .to_string(),
                MqttProtocol::V311 => ": the broker does not take MQTT 3.1.1".to_string(),
            },
            (Refusal::Other, _) => String::new(),
        };
        return format!("the broker refused the connection: {code}{hint}");
    }
    if let Some(io) = e.io() {
        return format!("network: {io}");
    }
    if e.is_timeout() {
        return "no CONNACK within the connection timeout".into();
    }
    let text = e.to_string();
    if text.contains("size limit") || text.contains("PayloadSizeLimitExceeded") {
        // MQTT 3.1.1 cannot tell the broker our limit; a retained one comes at every connect.
        return format!(
            "{text}: a message larger than {} KiB came on a command topic (if it is retained it \
             comes at every connect: clear it with mosquitto_pub -r -n -t <topic>, and set the \
             broker's message size limit)",
            MAX_INCOMING_PACKET / 1024
        );
    }
    text
}

impl Backhaul {
    pub async fn run(mut self) {
        let topics = Topics::new(&self.cfg.topic_prefix, &self.gateway_id);
        let mut backoff = self.cfg.reconnect_min;
        // Outlives sessions: a reconnect does not refill it.
        let mut intake = Intake::new(self.cfg.command_rate_per_s);
        // The wait for the first session is not an outage (a clean start would count one).
        let mut outage_since: Option<Instant> = None;
        let mut first_session = true;
        tracing::info!(server = %self.cfg.server, "backhaul: connecting");
        // Sessions in a row that the broker accepted and closed within a second.
        let mut short_sessions = 0u32;
        loop {
            let connected_at = Instant::now();
            let end = self
                .session(&topics, &mut outage_since, &mut first_session, &mut intake)
                .await;
            self.counters.backhaul_up.store(false, Relaxed);
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) if self.drain_until.is_some() => {
                    tracing::warn!(%why, backlog = self.queue.backlog().records, "backhaul lost while shutting down: the rest goes at the next start");
                    return;
                }
                SessionEnd::Lost(why) => {
                    let was_up = outage_since.is_none() && !first_session;
                    if was_up {
                        outage_since = Some(Instant::now());
                    }
                    // On a slow CPU the refusal itself is often lost: the broker answers a
                    // refused publish and closes, and the next write fails before the answer
                    // is read (seen under qemu: only "Broken pipe" remained). Say the usual cause.
                    if was_up && connected_at.elapsed() < Duration::from_secs(1) {
                        short_sessions += 1;
                        if short_sessions == 3 {
                            tracing::error!(
                                "the broker accepted and then closed the session 3 times in a row within a second: usually it refuses what the gateway publishes or subscribes to (an ACL: check the broker's acl_file for this gateway's user or certificate name), or another client uses the same client id"
                            );
                        }
                    } else if was_up {
                        short_sessions = 0;
                    }
                    // A session that lived a while was healthy: start the back-off over.
                    if connected_at.elapsed() > self.cfg.reconnect_max {
                        backoff = self.cfg.reconnect_min;
                    }
                    let jitter = 0.8 + fastrand::f64() * 0.4;
                    let wait = backoff.mul_f64(jitter);
                    tracing::warn!(%why, retry_in = ?wait, backlog = self.queue.backlog().records, "backhaul down");
                    // In steps, beating: a long back-off is progress, not a stall.
                    let until = tokio::time::Instant::now() + wait;
                    while tokio::time::Instant::now() < until {
                        crate::ops::health::Heartbeats::beat(&self.counters.beats.backhaul);
                        let step =
                            (until - tokio::time::Instant::now()).min(Duration::from_secs(1));
                        tokio::select! {
                            _ = tokio::time::sleep(step) => {}
                            _ = self.shutdown.changed() => {
                                self.stop_intake();
                                return;
                            }
                        }
                    }
                    backoff = (backoff * 2).min(self.cfg.reconnect_max);
                }
            }
        }
    }

    /// The options of one connection, with the secret and TLS files as they are on disk now.
    fn options(&self, topics: &Topics, window: usize) -> Result<client::Options, String> {
        let server = crate::config::parse_server(&self.cfg.server).expect("validated");
        let client_id = self
            .cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("lora-edge-{}", self.gateway_id));
        let tls = if server.tls {
            let files = self.cfg.tls.clone().unwrap_or_default();
            let config = tls::client_config(&files).map_err(|p| p.to_string())?;
            if let Some(warning) = tls::expiry_warning(&files) {
                tracing::warn!("{warning}");
            }
            Some(config)
        } else {
            None
        };
        let credentials = match &self.cfg.username {
            Some(user) => {
                let password = match &self.cfg.password_file {
                    Some(path) => secret::read_password(path)
                        .map_err(|e| format!("mqtt.password_file: {e}"))?,
                    None => self.cfg.password.clone().unwrap_or_default(),
                };
                if !server.tls && !server.is_loopback() && !password.is_empty() {
                    tracing::warn!(host = %server.host, "the MQTT password crosses the network in plain text: use mqtts://");
                }
                Some((user.clone(), password))
            }
            None => None,
        };
        Ok(client::Options {
            protocol: self.cfg.protocol,
            client_id,
            host: server.host.clone(),
            port: server.port,
            keep_alive: self.cfg.keep_alive,
            inflight: (window as u16).saturating_add(8),
            // The session's own CONNACK deadline (`mqtt.connect_timeout`) fires first and says
            // so; rumqttc's is only a backstop.
            connection_timeout_s: self.cfg.connect_timeout.as_secs() + 5,
            will_topic: topics.under("state/conn"),
            will_payload: conn_state(&self.gateway_id, false, self.cfg.encoding),
            tls,
            credentials,
        })
    }

    async fn session(
        &mut self,
        topics: &Topics,
        outage_since: &mut Option<Instant>,
        first_session: &mut bool,
        intake: &mut Intake,
    ) -> SessionEnd {
        let mut window = self.cfg.inflight as usize;
        let options = match self.options(topics, window) {
            Ok(o) => o,
            Err(why) => return SessionEnd::Lost(why),
        };
        let (client, events) = client::connect(options, window + 16);
        tracing::debug!(server = %self.cfg.server, "backhaul: connect attempt");
        let mut link = Link::open(events, window + 16);
        let mut inflight = Inflight::default();
        let mut cursor = self.queue.acked() + 1;
        let mut connected = false;
        // The broker's Maximum Packet Size (MQTT 5 CONNACK), if it says one.
        let mut broker_max_packet: Option<usize> = None;
        let mut tokens = self.cfg.max_rate_per_s as f64;
        let mut last_refill = Instant::now();
        let started = Instant::now();
        let mut to_ack: Option<u64> = None;
        let mut store_wakes = true;
        // Often while something is pending (a CONNACK, PUBACKs, a rate budget, a drain); once a
        // second otherwise: an idle gateway wakes for its traffic, not for a timer.
        let busy_tick = if self.cfg.max_rate_per_s > 0 {
            RATE_TICK
        } else {
            BUSY_TICK
        };
        let mut next_tick = tokio::time::Instant::now() + busy_tick;

        loop {
            let mut ticked = false;
            tokio::select! {
                biased;
                _ = self.shutdown.changed(), if self.drain_until.is_none() => {
                    self.stop_intake();
                    if !connected {
                        return SessionEnd::Shutdown;
                    }
                    self.drain_until = Some(tokio::time::Instant::now() + self.cfg.drain_timeout);
                }
                ev = link.next() => match ev {
                    Ok(Ev::ConnAck { max_packet, receive_max }) => {
                        // rumqttc turns a refusing CONNACK into an error: this one accepted us.
                        connected = true;
                        broker_max_packet = max_packet;
                        if let Some(max) = receive_max {
                            if (max as usize) < window {
                                tracing::info!(receive_maximum = max, "backhaul: the broker allows fewer publishes in flight than mqtt.inflight");
                                window = max.max(1) as usize;
                            }
                        }
                        self.counters.backhaul_up.store(true, Relaxed);
                        let backlog = self.queue.backlog().records;
                        match outage_since.take() {
                            _ if std::mem::take(first_session) => {
                                tracing::info!(connect_ms = started.elapsed().as_millis() as u64, backlog, "backhaul up");
                            }
                            Some(since) => {
                                let ms = since.elapsed().as_millis() as u64;
                                Counters::add(&self.counters.outages, 1);
                                self.counters.last_outage_ms.store(ms, Relaxed);
                                tracing::info!(outage_ms = ms, connect_ms = started.elapsed().as_millis() as u64, backlog, "backhaul up");
                            }
                            None => tracing::debug!(backlog, "backhaul: session started"),
                        }
                        // One SUBSCRIBE, one SUBACK: "subscribed" means every command topic.
                        if let Err(e) = client.subscribe(self.command_topics(topics)) {
                            return SessionEnd::Lost(format!("subscribe: {e}"));
                        }
                        let online = conn_state(&self.gateway_id, true, self.cfg.encoding);
                        if client.publish(topics.under("state/conn"), true, online).is_ok() {
                            inflight.submitted(None, false, Instant::now());
                        }
                        if let Some(h) = self.health.as_mut() {
                            let latest = h.borrow_and_update().clone();
                            if !latest.is_empty() && client.publish(topics.under("state/health"), true, latest).is_ok() {
                                inflight.submitted(None, false, Instant::now());
                            }
                        }
                    }
                    Ok(Ev::Written(pkid)) => {
                        if !inflight.written(pkid, Instant::now()) {
                            return SessionEnd::Lost(format!("publish {pkid} written but none submitted"));
                        }
                    }
                    Ok(Ev::AwaitAck(pkid)) => {
                        return SessionEnd::Lost(format!("packet id {pkid} still in use; resynchronising"));
                    }
                    Ok(Ev::PubAck { pkid, refused }) => {
                        if let Some(reason) = refused {
                            // The record stays in the store: dropping it would lose a frame the
                            // broker never took. Likely an ACL or quota problem on the broker.
                            return SessionEnd::Lost(format!("the broker refused a publish: {reason}"));
                        }
                        Counters::add(&self.counters.pubacks, 1);
                        if !inflight.acked(pkid, Instant::now()) {
                            tracing::debug!(pkid, "PUBACK for no publish of this session");
                        }
                        let settled = inflight.settle();
                        Counters::add(&self.counters.up_forwarded, settled.uplinks);
                        if let Some(seq) = settled.top {
                            to_ack = Some(seq);
                        }
                    }
                    Ok(Ev::SubAck { pkid, refused }) => {
                        let names = self.command_topics(topics);
                        for (reason, topic) in refused.iter().zip(names) {
                            if let Some(reason) = reason {
                                tracing::error!(%topic, %reason, "the broker refused the subscription: these commands will not arrive");
                            }
                        }
                        // Commands published before this reach nobody (the session is clean).
                        if refused.iter().all(Option::is_none) {
                            tracing::info!(pkid, "subscribed: commands will arrive");
                        }
                    }
                    Ok(Ev::Publish { topic, payload, retain }) => {
                        if retain {
                            // A retained command comes again at every connect: an apply
                            // retained by mistake would be applied again after every undo.
                            let topic = String::from_utf8_lossy(&topic);
                            tracing::warn!(%topic, "a retained command ignored: commands must not be retained (clear it: mosquitto_pub -r -n -t <topic>)");
                        } else {
                            self.command(intake, &topic, &payload, topics);
                        }
                    }
                    Ok(Ev::Disconnect(reason)) => {
                        return SessionEnd::Lost(format!("the broker closed the session: {reason}"));
                    }
                    Ok(_) => {}
                    Err(e) => return SessionEnd::Lost(describe(&e, &self.cfg, !connected)),
                },
                changed = async { self.health.as_mut().expect("guarded").changed().await }, if connected && self.health.is_some() => {
                    match changed {
                        Ok(()) => {
                            let latest = self.health.as_mut().expect("guarded").borrow_and_update().clone();
                            if client.publish(topics.under("state/health"), true, latest).is_ok() {
                                inflight.submitted(None, false, Instant::now());
                            }
                        }
                        // The reporter has ended: its last message was published above.
                        Err(_) => self.health = None,
                    }
                }
                changed = self.appended.changed(), if store_wakes => {
                    // The writer is gone (shutting down): stop listening, the tick still runs.
                    store_wakes = changed.is_ok();
                }
                _ = tokio::time::sleep_until(next_tick) => {
                    ticked = true;
                    let busy = !connected
                        || inflight.outstanding() > 0
                        || self.cfg.max_rate_per_s > 0
                        || self.drain_until.is_some();
                    next_tick = tokio::time::Instant::now() + if busy { busy_tick } else { IDLE_TICK };
                    crate::ops::health::Heartbeats::beat(&self.counters.beats.backhaul);
                    let now = Instant::now();
                    if !connected && started.elapsed() > self.cfg.connect_timeout {
                        let hint = match self.cfg.protocol {
                            MqttProtocol::V5 => "; a broker that does not speak MQTT 5 may leave its CONNECT unanswered (then set mqtt.protocol = \"3.1.1\")",
                            MqttProtocol::V311 => "",
                        };
                        return SessionEnd::Lost(format!("no CONNACK within mqtt.connect_timeout ({:?}){hint}", self.cfg.connect_timeout));
                    }
                    if let Some(stalled) = inflight.stalled_for(now) {
                        if stalled > self.cfg.ack_timeout {
                            return SessionEnd::Lost(format!("no PUBACK for {stalled:?} with publishes outstanding: link presumed dead"));
                        }
                    }
                    if self.cfg.max_rate_per_s > 0 {
                        let rate = self.cfg.max_rate_per_s as f64;
                        tokens = (tokens + now.duration_since(last_refill).as_secs_f64() * rate).min(rate);
                        last_refill = now;
                    }
                }
            }
            // Removing acknowledged records and reading new ones are store operations: do them in
            // batches (a quarter of the window), or when the pipeline runs dry.
            let batch = (window / 4).max(1);
            let idle = inflight.outstanding() == 0;
            if let Some(seq) = to_ack {
                if idle || ticked || seq >= self.queue.acked() + batch as u64 {
                    if let Err(e) = self.queue.ack_upto(seq) {
                        tracing::error!(error = %e, "store: acknowledging");
                    }
                    to_ack = None;
                }
            }
            if let Some(until) = self.drain_until {
                // Done when the writer has ended (nothing more will be appended) and the
                // broker has everything, or when the time is up.
                let drained =
                    !store_wakes && inflight.outstanding() == 0 && cursor >= self.queue.next_seq();
                if drained || tokio::time::Instant::now() >= until {
                    if let Some(seq) = to_ack.take() {
                        let _ = self.queue.ack_upto(seq);
                    }
                    if !drained {
                        tracing::warn!(
                            unpublished = self.queue.next_seq().saturating_sub(cursor),
                            in_flight = inflight.outstanding(),
                            "shutdown: mqtt.drain_timeout reached; the rest stays in the store for the next start"
                        );
                    }
                    self.goodbye(&client, &mut link, topics).await;
                    return SessionEnd::Shutdown;
                }
            }
            if inflight.outstanding() > 0 && next_tick > tokio::time::Instant::now() + busy_tick {
                // Publishes went out while the tick idled: watch their PUBACKs closely again.
                next_tick = tokio::time::Instant::now() + busy_tick;
            }
            if connected && (idle || window.saturating_sub(inflight.outstanding()) >= batch) {
                if let Err(why) = self.fill(
                    &client,
                    topics,
                    &mut inflight,
                    &mut cursor,
                    &mut tokens,
                    window,
                    broker_max_packet,
                ) {
                    return SessionEnd::Lost(why);
                }
            }
        }
    }

    /// No more commands to the stages: their inputs close, so they can end.
    fn stop_intake(&mut self) {
        self.downlinks = None;
        self.pumps = None;
        self.exec = None;
        self.ops = None;
    }

    /// The command topics subscribed to, in one SUBSCRIBE (in this order).
    fn command_topics(&self, topics: &Topics) -> Vec<String> {
        let mut t = vec![topics.under("command/down")];
        if self.pumps.is_some() {
            t.push(topics.under("command/pump"));
        }
        if self.exec.is_some() {
            t.push(topics.under("command/exec"));
        }
        if self.ops.is_some() {
            t.push(topics.under("command/ops"));
            t.push(topics.under("command/config"));
        }
        t
    }

    /// One incoming command: admitted by the per-topic rate limit, then handed to its stage.
    fn command(&self, intake: &mut Intake, topic: &[u8], payload: &[u8], topics: &Topics) {
        let topic = String::from_utf8_lossy(topic);
        if let Admit::No(report) = intake.admit(&topic, Instant::now()) {
            Counters::add(&self.counters.commands_refused, 1);
            if let Some(n) = report {
                tracing::warn!(%topic, refused = n, rate_per_s = self.cfg.command_rate_per_s, "commands above mqtt.command_rate_per_s refused");
            }
            return;
        }
        if topic == topics.under("command/pump") {
            if let Some(pumps) = &self.pumps {
                let input = crate::rules::Input::Command(payload.to_vec());
                if pumps.try_send(input).is_err() {
                    Counters::add(&self.counters.rules_input_dropped, 1);
                    tracing::warn!("command/pump: the rules stage is saturated; request dropped");
                }
            }
        } else if topic == topics.under("command/down") {
            tracing::debug!(bytes = payload.len(), "command/down received");
            let Some(downlinks) = &self.downlinks else {
                tracing::info!("command/down while shutting down: not scheduled");
                return;
            };
            if let Err(TrySendError::Full(_)) = downlinks.try_send(crate::downlink::Input::Network(
                payload.to_vec(),
                Instant::now(),
            )) {
                Counters::add(&self.counters.tx_dropped, 1);
                tracing::warn!("command/down: the downlink stage is saturated; command dropped");
            }
        } else if topic == topics.under("command/exec") {
            let Some(exec) = &self.exec else {
                tracing::info!("command/exec while shutting down: not run");
                return;
            };
            if let Err(TrySendError::Full(_)) = exec.try_send(payload.to_vec()) {
                Counters::add(&self.counters.commands_refused, 1);
                tracing::warn!(
                    waiting = crate::exec::QUEUE,
                    "command/exec: requests are already waiting for the one running; request dropped, not answered"
                );
            }
        } else if topic == topics.under("command/ops") || topic == topics.under("command/config") {
            let Some(ops) = &self.ops else {
                tracing::info!(%topic, "command while shutting down: not answered");
                return;
            };
            let input = if topic.ends_with("/command/ops") {
                crate::ops::requests::OpsInput::Request(payload.to_vec())
            } else {
                // Kept whatever the queue: the stage looks at the slot after every input.
                self.plans.put(payload.to_vec());
                crate::ops::requests::OpsInput::PlanWaiting
            };
            let wake = matches!(input, crate::ops::requests::OpsInput::PlanWaiting);
            if let Err(TrySendError::Full(_)) = ops.try_send(input) {
                if !wake {
                    Counters::add(&self.counters.commands_refused, 1);
                    tracing::warn!(%topic, "too many requests waiting; request dropped, not answered");
                }
            }
        } else {
            tracing::debug!(%topic, "message on a topic lora-edge does not handle");
        }
    }

    /// Submits records from the cursor until the window (or the rate budget) is full.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        client: &Client,
        topics: &Topics,
        inflight: &mut Inflight,
        cursor: &mut u64,
        tokens: &mut f64,
        window: usize,
        broker_max_packet: Option<usize>,
    ) -> Result<(), String> {
        let limited = self.cfg.max_rate_per_s > 0;
        loop {
            let room = window.saturating_sub(inflight.outstanding());
            let budget = if limited {
                room.min(*tokens as usize)
            } else {
                room
            };
            if budget == 0 {
                return Ok(());
            }
            let records = self
                .queue
                .read_from(*cursor, budget)
                .map_err(|e| format!("store read: {e}"))?;
            if records.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            let now_ms = unix_ms(SystemTime::now());
            for r in records {
                *cursor = r.seq + 1;
                let Some(kind) = Kind::from_u8(r.kind) else {
                    tracing::error!(
                        seq = r.seq,
                        kind = r.kind,
                        "store: record of unknown kind skipped"
                    );
                    Counters::add(&self.counters.store_unreadable, 1);
                    inflight.skipped(r.seq, now);
                    continue;
                };
                if r.flags & FLAG_JOIN_REQUEST != 0
                    && now_ms.saturating_sub(r.at_ms) > self.join_request_max_age.as_millis() as u64
                {
                    // Its answer could never reach the device: forwarding it would only make the
                    // network server start a session the device never hears of.
                    Counters::add(&self.counters.join_expired, 1);
                    inflight.skipped(r.seq, now);
                    continue;
                }
                let payload = match publishable(
                    kind,
                    &r.payload,
                    r.at_ms,
                    r.seq,
                    &self.gateway_id,
                    self.cfg.encoding,
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(seq = r.seq, error = %e, "store: record skipped");
                        Counters::add(&self.counters.store_unreadable, 1);
                        inflight.skipped(r.seq, now);
                        continue;
                    }
                };
                let topic = topics.under(kind.topic());
                // A record the broker refuses for its size would end every session at the same
                // place, for ever: skipped, said and counted instead.
                let packet = payload.len() + topic.len() + PUBLISH_OVERHEAD;
                if let Some(max) = broker_max_packet.filter(|m| packet > *m) {
                    tracing::error!(
                        seq = r.seq,
                        kind = ?kind,
                        bytes = packet,
                        broker_max = max,
                        "ALARM: a stored event is larger than the broker accepts (its maximum packet size): skipped unsent"
                    );
                    Counters::add(&self.counters.store_unreadable, 1);
                    inflight.skipped(r.seq, now);
                    continue;
                }
                client
                    .publish(topic, false, payload)
                    .map_err(|e| format!("submit: {e}"))?;
                inflight.submitted(Some(r.seq), kind == Kind::Up, now);
                if limited {
                    *tokens -= 1.0;
                }
            }
        }
    }

    /// Retained OFFLINE, then DISCONNECT, waiting briefly for the broker.
    async fn goodbye(&self, client: &Client, link: &mut Link, topics: &Topics) {
        let offline = conn_state(&self.gateway_id, false, self.cfg.encoding);
        if client
            .publish(topics.under("state/conn"), true, offline)
            .is_err()
        {
            return;
        }
        client.disconnect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(ev) = tokio::time::timeout_at(deadline, link.next()).await {
            match ev {
                Ok(Ev::SentDisconnect) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod conn_state_tests {
    use super::*;

    #[test]
    fn json_says_offline_and_online_in_words() {
        for (online, word) in [(false, "OFFLINE"), (true, "ONLINE")] {
            let v: serde_json::Value =
                serde_json::from_slice(&conn_state("0016c001ff10a235", online, Encoding::Json))
                    .unwrap();
            assert_eq!(v["state"], word, "{v}");
            assert_eq!(v["gatewayId"], "0016c001ff10a235", "{v}");
        }
    }
}
