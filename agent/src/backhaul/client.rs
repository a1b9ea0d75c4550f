//! The MQTT client of one session, MQTT 5 or 3.1.1 (`mqtt.protocol`), seen by the session
//! through one set of events and errors: the session's logic (window, acknowledgements, drain)
//! is the same for both.
//!
//! What 3.1.1 cannot say, and what stands in for it: no Maximum Packet Size in CONNECT (rumqttc
//! refuses an incoming packet above [`super::MAX_INCOMING_PACKET`] by ending the connection, so
//! the broker must refuse oversized messages itself: `message_size_limit` in Mosquitto,
//! `max_message_size` in RabbitMQ); no reason code in PUBACK (a broker that refuses a publish
//! for an ACL or a quota either drops it and acknowledges, or closes the connection: its own
//! logs are then the only trace); no Receive Maximum (`mqtt.inflight` alone sets the window).

use rumqttc::Outgoing;

use crate::config::MqttProtocol;

/// A session's client.
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

/// The event loop the link drives.
pub enum Loop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

/// What the session acts on, whatever the protocol.
#[derive(Debug)]
pub enum Ev {
    /// The broker accepted the connection; its limits when it says them (MQTT 5).
    ConnAck {
        max_packet: Option<usize>,
        receive_max: Option<u16>,
    },
    /// A PUBLISH written to the socket.
    Written(u16),
    /// rumqttc found a packet id still in use.
    AwaitAck(u16),
    /// `refused`: the broker's reason when it did not take the message (MQTT 5 only).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    /// One entry per filter: `Some(reason)` when refused.
    SubAck {
        pkid: u16,
        refused: Vec<Option<String>>,
    },
    Publish {
        topic: Vec<u8>,
        payload: Vec<u8>,
        /// Delivered because it was retained (a command must never be: see `command`).
        retain: bool,
    },
    /// The broker's DISCONNECT (MQTT 5 carries a reason).
    Disconnect(String),
    /// Our DISCONNECT written.
    SentDisconnect,
    Other,
}

/// The options both protocols take.
pub struct Options {
    pub protocol: MqttProtocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: std::time::Duration,
    pub inflight: u16,
    pub connection_timeout_s: u64,
    pub will_topic: String,
    pub will_payload: Vec<u8>,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
}

pub fn connect(o: Options, capacity: usize) -> (Client, Loop) {
    use rumqttc::{TlsConfiguration, Transport};
    let transport = o.tls.map(|c| Transport::Tls(TlsConfiguration::Rustls(c)));
    match o.protocol {
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::LastWill;
            use rumqttc::v5::mqttbytes::QoS;
            let mut m = rumqttc::v5::MqttOptions::new(o.client_id, o.host, o.port);
            m.set_keep_alive(o.keep_alive);
            m.set_clean_start(true);
            m.set_outgoing_inflight_upper_limit(o.inflight);
            m.set_max_packet_size(Some(super::MAX_INCOMING_PACKET));
            m.set_connection_timeout(o.connection_timeout_s);
            m.set_last_will(LastWill::new(
                o.will_topic,
                o.will_payload,
                QoS::AtLeastOnce,
                true,
                None,
            ));
            if let Some(t) = transport {
                m.set_transport(t);
            }
            if let Some((u, p)) = o.credentials {
                m.set_credentials(u, p);
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(m, capacity);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
        MqttProtocol::V311 => {
            use rumqttc::{LastWill, QoS};
            let mut m = rumqttc::MqttOptions::new(o.client_id, o.host, o.port);
            m.set_keep_alive(o.keep_alive);
            m.set_clean_session(true);
            m.set_inflight(o.inflight);
            m.set_max_packet_size(super::MAX_INCOMING_PACKET as usize, 1 << 20);
            m.set_last_will(LastWill::new(
                o.will_topic,
                o.will_payload,
                QoS::AtLeastOnce,
                true,
            ));
            if let Some(t) = transport {
                m.set_transport(t);
            }
            if let Some((u, p)) = o.credentials {
                m.set_credentials(u, p);
            }
            let (c, mut l) = rumqttc::AsyncClient::new(m, capacity);
            let mut network = l.network_options();
            network.set_connection_timeout(o.connection_timeout_s);
            l.set_network_options(network);
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
    }
}

impl Client {
    /// QoS 1, without waiting.
    pub fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// One SUBSCRIBE for every filter, QoS 1.
    pub fn subscribe(&self, topics: Vec<String>) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe_many(topics.into_iter().map(|t| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(
                        t,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    )
                }))
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_subscribe_many(
                    topics
                        .into_iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t, rumqttc::QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|_| ()),
            Client::V4(c) => c.try_disconnect().map_err(|_| ()),
        };
    }
}

impl Loop {
    /// The next event, or the connection's end; with the events read in the same batch as a
    /// failure (they explain it), oldest first.
    pub async fn poll(&mut self) -> Result<Ev, (Vec<Ev>, LinkError)> {
        match self {
            Loop::V5(l) => match l.poll().await {
                Ok(e) => Ok(v5_event(e)),
                Err(e) => Err((
                    l.state.events.drain(..).map(v5_event).collect(),
                    LinkError::V5(e),
                )),
            },
            Loop::V4(l) => match l.poll().await {
                Ok(e) => Ok(v4_event(e)),
                Err(e) => Err((
                    l.state.events.drain(..).map(v4_event).collect(),
                    LinkError::V4(e),
                )),
            },
        }
    }
}

fn outgoing(o: Outgoing) -> Ev {
    match o {
        Outgoing::Publish(pkid) => Ev::Written(pkid),
        Outgoing::AwaitAck(pkid) => Ev::AwaitAck(pkid),
        Outgoing::Disconnect => Ev::SentDisconnect,
        _ => Ev::Other,
    }
}

fn v5_event(e: rumqttc::v5::Event) -> Ev {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::Event;
    match e {
        Event::Outgoing(o) => outgoing(o),
        Event::Incoming(Packet::ConnAck(ack)) => Ev::ConnAck {
            max_packet: ack
                .properties
                .as_ref()
                .and_then(|p| p.max_packet_size)
                .map(|m| m as usize),
            receive_max: ack.properties.as_ref().and_then(|p| p.receive_max),
        },
        Event::Incoming(Packet::PubAck(ack)) => Ev::PubAck {
            pkid: ack.pkid,
            refused: (!matches!(
                ack.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ))
            .then(|| format!("{:?}", ack.reason)),
        },
        Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .map(|c| (!matches!(c, SubscribeReasonCode::Success(_))).then(|| format!("{c:?}")))
                .collect(),
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish {
            topic: p.topic.to_vec(),
            payload: p.payload.to_vec(),
            retain: p.retain,
        },
        Event::Incoming(Packet::Disconnect(d)) => Ev::Disconnect(format!("{:?}", d.reason_code)),
        Event::Incoming(_) => Ev::Other,
    }
}

fn v4_event(e: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    match e {
        Event::Outgoing(o) => outgoing(o),
        Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck {
            max_packet: None,
            receive_max: None,
        },
        Event::Incoming(Packet::PubAck(ack)) => Ev::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .map(|c| (!matches!(c, SubscribeReasonCode::Success(_))).then(|| format!("{c:?}")))
                .collect(),
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish {
            topic: p.topic.into_bytes(),
            payload: p.payload.to_vec(),
            retain: p.retain,
        },
        Event::Incoming(Packet::Disconnect) => {
            Ev::Disconnect("(MQTT 3.1.1 gives no reason)".into())
        }
        Event::Incoming(_) => Ev::Other,
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum LinkError {
    V5(rumqttc::v5::ConnectionError),
    V4(rumqttc::ConnectionError),
    /// The link's task has gone.
    Closed,
}

/// What a refusing CONNACK said, in terms both protocols share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    Credentials,
    Protocol,
    Other,
}

impl LinkError {
    /// The CONNACK's refusal: its kind and the code as the broker gave it.
    pub fn refused(&self) -> Option<(Refusal, String)> {
        match self {
            LinkError::V5(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as R;
                let kind = match code {
                    R::BadUserNamePassword | R::NotAuthorized => Refusal::Credentials,
                    R::UnsupportedProtocolVersion | R::RefusedProtocolVersion => Refusal::Protocol,
                    _ => Refusal::Other,
                };
                Some((kind, format!("{code:?}")))
            }
            LinkError::V4(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                use rumqttc::ConnectReturnCode as R;
                let kind = match code {
                    R::BadUserNamePassword | R::NotAuthorized => Refusal::Credentials,
                    R::RefusedProtocolVersion => Refusal::Protocol,
                    _ => Refusal::Other,
                };
                Some((kind, format!("{code:?}")))
            }
            _ => None,
        }
    }

    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            LinkError::V5(rumqttc::v5::ConnectionError::Io(e)) => Some(e),
            LinkError::V4(rumqttc::ConnectionError::Io(e)) => Some(e),
            _ => None,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            LinkError::V5(rumqttc::v5::ConnectionError::Timeout(_))
                | LinkError::V4(rumqttc::ConnectionError::NetworkTimeout)
        )
    }

    /// Bytes that were not MQTT where a CONNACK should have been.
    pub fn garbled(&self) -> bool {
        matches!(
            self,
            LinkError::V5(
                rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::Deserialization(
                    _
                )) | rumqttc::v5::ConnectionError::NotConnAck(_)
            ) | LinkError::V4(
                rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(_))
                    | rumqttc::ConnectionError::NotConnAck(_)
            )
        )
    }

    /// An error of the TLS connect (rumqttc reports later TLS errors otherwise).
    pub fn in_tls_connect(&self) -> bool {
        matches!(
            self,
            LinkError::V5(rumqttc::v5::ConnectionError::Tls(_))
                | LinkError::V4(rumqttc::ConnectionError::Tls(_))
        )
    }

    /// rumqttc's own word for a connection the peer ended.
    pub fn aborted(&self) -> bool {
        matches!(
            self,
            LinkError::V5(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ConnectionAborted
            )) | LinkError::V4(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::ConnectionAborted
            ))
        )
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::V5(e) => e.fmt(f),
            LinkError::V4(e) => e.fmt(f),
            LinkError::Closed => f.write_str("the connection's task ended"),
        }
    }
}

impl std::error::Error for LinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkError::V5(e) => Some(e),
            LinkError::V4(e) => Some(e),
            LinkError::Closed => None,
        }
    }
}
