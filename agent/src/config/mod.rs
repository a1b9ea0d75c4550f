//! The agent's configuration: one TOML format, typed here, with defaults and units in the
//! field names. `load` merges files and `--set` overrides and reports every problem with file,
//! line and field; `validate` checks what serde cannot (ranges, combinations). Configuration is
//! data: what a stage makes of its part (a board name, a TLS file, a rule file) is the stage's
//! to say, and `check.rs` asks them.
//!
//! The reference of every key is README.md § Configuration; `config/lora-edge.toml` is the
//! shipped file.

mod load;
pub mod secret;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub(crate) use load::{at, deserialize_all, find_field};
pub use load::{
    layers, load, merge, redacted, remote_config_path, ConfigError, ConfigErrors, Linked,
    StageReport, MAX_FILE_BYTES, SECRET_FIELDS,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub region: RegionConfig,
    #[serde(default)]
    pub radio: RadioConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub stats: StatsConfig,
    /// Local pump-safety rules; absent: none.
    pub rules: Option<RulesConfig>,
    /// Commands the centre may run with `command/exec`, by name; nothing else runs.
    #[serde(default)]
    pub commands: std::collections::BTreeMap<String, CommandConfig>,
    #[serde(default)]
    pub ops: OpsConfig,
    /// The files and `--set`s merged, as written (set by `load`): what the centre is shown,
    /// secrets redacted (`redacted`).
    #[serde(skip)]
    pub source: toml::Table,
}

/// One command of the `command/exec` allow-list. The centre names it; what runs is fixed here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program (an absolute path) and its arguments, exactly.
    pub argv: Vec<String>,
    /// Killed (with its process group) after this long.
    #[serde(default = "default_command_timeout", with = "duration")]
    pub timeout: Duration,
    /// stdout and stderr are each cut at this many bytes.
    #[serde(default = "default_command_output")]
    pub max_output_bytes: usize,
    /// Whether the request's stdin is given to the program (otherwise a request with stdin is
    /// refused).
    #[serde(default)]
    pub stdin: bool,
    /// Environment variables the request may set; a request setting another is refused.
    #[serde(default)]
    pub allow_env: Vec<String>,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_command_output() -> usize {
    64 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// The rule file (README § Pump-safety rules). Relative to the configuration file.
    pub file: PathBuf,
    /// Session keys of the devices the rules read; refused if others can read it.
    pub keys_file: PathBuf,
    /// Ed25519 public key (base64: the 32 raw bytes, or the DER `openssl pkey -pubout
    /// -outform DER` writes) that a rule file sent by the centre must be signed with.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl RulesConfig {
    /// The 32 bytes of `public_key`, if set.
    pub fn public_key_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine;
        let Some(text) = &self.public_key else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text.trim().trim_end_matches('='))
            .map_err(|e| format!("not base64: {e}"))?;
        match bytes.len() {
            32 => Ok(Some(bytes)),
            44 if bytes[..12] == ED25519_SPKI_PREFIX => Ok(Some(bytes[12..].to_vec())),
            n => Err(format!(
                "{n} bytes: an Ed25519 public key is 32 bytes (or their 44-byte DER form)"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// 16 hex digits; when absent see `identity.rs` (kept, else the concentrator's EUI within
    /// `eui_wait`, else derived from the machine).
    pub id: Option<String>,
    /// Without `id` at the first start: how long to wait for the concentrator's EUI before the
    /// backhaul comes up under an identity derived from the machine.
    #[serde(default = "default_eui_wait", with = "duration")]
    pub eui_wait: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: None,
            eui_wait: default_eui_wait(),
        }
    }
}

fn default_eui_wait() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Channel plan name; `eu868` is shipped.
    #[serde(default = "default_plan")]
    pub plan: String,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            plan: default_plan(),
        }
    }
}

fn default_plan() -> String {
    "eu868".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sx1302,
    Simulator,
    /// Frames from a Semtech UDP packet forwarder on this machine or the LAN
    /// (`radio/semtech_udp/`), not from a concentrator of ours.
    #[serde(rename = "semtech_udp")]
    SemtechUdp,
}

/// `[radio.semtech_udp]`: where the packet forwarder sends, and whom to believe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemtechUdpConfig {
    /// The address the forwarder's `server_address` / `serv_port_up` / `serv_port_down` point
    /// at (one port for both, as lora_pkt_fwd and ChirpStack's forwarder use).
    #[serde(default = "default_udp_listen")]
    pub listen: String,
    /// The forwarders' gateway EUIs (`gateway_ID` in their `local_conf.json`) whose datagrams
    /// are taken; any other EUI is refused and counted (`udp_rejected_unknown_eui_total`).
    #[serde(default)]
    pub gateway_euis: Vec<String>,
    /// A downlink handed over in a PULL_RESP without a TX_ACK within this time is answered
    /// INTERNAL_ERROR and logged as "no TX_ACK" (the forwarder may or may not have sent it).
    #[serde(default = "default_tx_ack_timeout", with = "duration")]
    pub tx_ack_timeout: Duration,
    /// No PULL_DATA (the forwarder's keep-alive, every 10 s by default) for this long: the
    /// radio is down in the stats and health, and downlinks are refused.
    #[serde(default = "default_forwarder_timeout", with = "duration")]
    pub forwarder_timeout: Duration,
}

impl Default for SemtechUdpConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_udp_listen() -> String {
    "127.0.0.1:1700".into()
}
fn default_tx_ack_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_forwarder_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RadioConfig {
    /// `radio.backend` as written; left out, the backend this binary links, so that one
    /// configuration file serves the gateway and the simulator packages.
    #[serde(rename = "backend", default)]
    pub backend_setting: Option<Backend>,
    /// The backend in force: `backend_setting`, or what the binary links (set by `load`).
    #[serde(skip)]
    pub backend: Backend,
    /// Board profile: rak2287, rak5146, seeed_wm1302, semtech_corecell.
    #[serde(default = "default_board")]
    pub board: String,
    #[serde(default = "default_spi")]
    pub spi_path: String,
    #[serde(default = "default_gpio_chip")]
    pub gpio_chip: String,
    /// Simulator file (backend = "simulator"); relative paths are relative to the config file.
    pub simulator: Option<PathBuf>,
    /// backend = "semtech_udp"
    #[serde(default)]
    pub semtech_udp: SemtechUdpConfig,
    #[serde(default = "default_poll", with = "duration")]
    pub poll_interval: Duration,
    /// The polling period after 30 ms without any frame: an idle gateway wakes less often,
    /// and the first frame after a silence waits at most this long in the concentrator.
    #[serde(default = "default_idle_poll", with = "duration")]
    pub idle_poll_interval: Duration,
    #[serde(default)]
    pub antenna_gain_dbi: f32,
    #[serde(default = "yes")]
    pub lorawan_public: bool,
    #[serde(default = "yes")]
    pub forward_crc_ok: bool,
    #[serde(default)]
    pub forward_crc_invalid: bool,
    #[serde(default)]
    pub forward_crc_missing: bool,
    /// A concentrator whose counter stops advancing for this long is restarted.
    #[serde(default = "default_watchdog", with = "duration")]
    pub watchdog: Duration,
    #[serde(default = "default_restart_max", with = "duration")]
    pub restart_backoff_max: Duration,
    /// Refuse downlinks that would exceed the EU868 sub-band duty cycle (DUTY_CYCLE_OVERFLOW).
    #[serde(default = "yes")]
    pub enforce_duty_cycle: bool,
    /// SCHED_FIFO priority (1-99) of the radio and downlink threads; 0 keeps normal scheduling.
    #[serde(default = "default_realtime_priority")]
    pub realtime_priority: u8,
}

impl Default for RadioConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_realtime_priority() -> u8 {
    20
}
fn default_board() -> String {
    "semtech_corecell".into()
}
fn default_spi() -> String {
    "/dev/spidev0.0".into()
}
fn default_gpio_chip() -> String {
    "/dev/gpiochip0".into()
}
fn default_poll() -> Duration {
    Duration::from_millis(10)
}
fn default_idle_poll() -> Duration {
    Duration::from_millis(100)
}
fn default_watchdog() -> Duration {
    Duration::from_secs(30)
}
fn default_restart_max() -> Duration {
    Duration::from_secs(60)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Protobuf,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `tcp://host:port` (plain) or `mqtts://host:port` (TLS, also `ssl://`).
    #[serde(default = "default_server")]
    pub server: String,
    pub username: Option<String>,
    /// Prefer `password_file`: a password in the configuration travels with every copy of it.
    pub password: Option<String>,
    /// First line of this file is the password; read at every connect, refused if others can
    /// read it (`secret::check_mode`). Relative to the configuration file.
    pub password_file: Option<PathBuf>,
    /// TLS settings; only with an `mqtts://` server.
    pub tls: Option<TlsConfig>,
    /// Commands accepted per topic and second (a burst of twice as many); the rest are refused
    /// and counted (`commands_refused`).
    #[serde(default = "default_command_rate")]
    pub command_rate_per_s: u32,
    /// Defaults to `lora-edge-<gateway id>`.
    pub client_id: Option<String>,
    #[serde(default = "default_plan")]
    pub topic_prefix: String,
    #[serde(default = "default_encoding")]
    pub encoding: Encoding,
    #[serde(default = "default_keep_alive", with = "duration")]
    pub keep_alive: Duration,
    /// `"5"` (default) or `"3.1.1"` for brokers without MQTT 5 (backhaul/client.rs says what
    /// 3.1.1 gives up).
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Publishes awaiting their PUBACK at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// A publish not acknowledged within this time means the link is dead (silent cut).
    #[serde(default = "default_ack_timeout", with = "duration")]
    pub ack_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_reconnect_min", with = "duration")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "duration")]
    pub reconnect_max: Duration,
    /// Messages per second at most (metered backhauls); 0 = as fast as the broker acknowledges.
    #[serde(default)]
    pub max_rate_per_s: u32,
    /// At shutdown, how long what is already queued (acks of cancelled downlinks, the last
    /// audits) may take to be published before OFFLINE.
    #[serde(default = "default_drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Files of the TLS session, read at every connect (a certificate renewed on disk is used at the
/// next connect). Relative paths are relative to the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of the CA(s) the broker's certificate must chain to; absent: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain of this gateway (mutual TLS), leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: Option<PathBuf>,
}

fn default_command_rate() -> u32 {
    100
}
fn default_server() -> String {
    "tcp://127.0.0.1:1883".into()
}
fn default_encoding() -> Encoding {
    Encoding::Protobuf
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_inflight() -> u16 {
    64
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Disk budget of the store directory, in MiB.
    #[serde(default = "default_max_size")]
    pub max_size_mib: u64,
    /// Older events are evicted (and reported) even when the budget is not reached.
    #[serde(default = "default_max_age", with = "duration")]
    pub max_age: Duration,
    /// Interval of the store's fsync: what a power cut can lose at most.
    #[serde(default = "default_commit", with = "duration")]
    pub commit_interval: Duration,
    /// Join-requests older than this when their turn comes are not forwarded (see README).
    #[serde(default = "default_join_age", with = "duration")]
    pub join_request_max_age: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_store_path() -> PathBuf {
    "/var/lib/lora-edge/store".into()
}
fn default_max_size() -> u64 {
    256
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_commit() -> Duration {
    Duration::from_millis(500)
}
fn default_join_age() -> Duration {
    Duration::from_secs(5)
}

/// The MQTT version the backhaul speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// Configuration changes from the centre (`command/ops` `apply`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// The centre's changes: a TOML file read after the configuration files (before any
    /// `--set`), written only by the agent; unset: the centre cannot change the configuration.
    pub remote_config: Option<PathBuf>,
    /// A change applied from the centre is undone by the agent itself unless its backhaul
    /// session is up with it (and the centre confirmed it, when asked to) within this time.
    #[serde(default = "default_revert_after", with = "duration")]
    pub revert_after: Duration,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            remote_config: None,
            revert_after: default_revert_after(),
        }
    }
}

fn default_revert_after() -> Duration {
    Duration::from_secs(120)
}

/// The range of `ops.revert_after` (and of an apply's own `revert_after_s`): long enough for a
/// radio start and a TLS handshake over a slow link, short enough that a cut-off gateway is
/// back within the hour.
pub const REVERT_AFTER_MIN: Duration = Duration::from_secs(10);
pub const REVERT_AFTER_MAX: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    #[serde(default = "default_stats_interval", with = "duration")]
    pub interval: Duration,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            interval: default_stats_interval(),
        }
    }
}

fn default_stats_interval() -> Duration {
    Duration::from_secs(30)
}

/// Durations written as `"10ms"`, `"30s"`, `"2h"`.
pub(crate) mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"500ms\", \"30s\" or \"2h\" ({e})"
            ))
        })
    }
}

/// A problem serde cannot see, with the dotted path of the field it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Invalid {
    Invalid::new(field, message)
}

impl Config {
    /// Every semantic problem at once.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if let Some(id) = &self.gateway.id {
            if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push(invalid(
                    "gateway.id",
                    format!("{id:?} is not 16 hexadecimal digits (an EUI-64)"),
                ));
            }
        }
        if self.gateway.eui_wait > Duration::from_secs(120) {
            out.push(invalid(
                "gateway.eui_wait",
                "must be at most 120s: a gateway whose radio does not start must still reach \
                 the centre soon",
            ));
        }
        let r = &self.radio;
        if r.poll_interval.is_zero() || r.poll_interval > Duration::from_secs(1) {
            out.push(invalid(
                "radio.poll_interval",
                "must be between 1ms and 1s (10ms is usual)",
            ));
        } else if r.idle_poll_interval < r.poll_interval
            || r.idle_poll_interval > Duration::from_millis(200)
        {
            out.push(invalid(
                "radio.idle_poll_interval",
                "must be between radio.poll_interval and 200ms (the concentrator buffers the \
                 frames of a silence's end meanwhile)",
            ));
        }
        // The HAL extends its 27-bit counter only if polled at least every ~134 s.
        if r.watchdog < Duration::from_secs(1) || r.watchdog > Duration::from_secs(120) {
            out.push(invalid("radio.watchdog", "must be between 1s and 120s"));
        }
        if r.realtime_priority > 99 {
            out.push(invalid(
                "radio.realtime_priority",
                "must be between 0 (normal scheduling) and 99",
            ));
        }
        if !(-10.0..=30.0).contains(&r.antenna_gain_dbi) {
            out.push(invalid(
                "radio.antenna_gain_dbi",
                "must be between -10 and 30 dBi",
            ));
        }
        if let Some(r) = &self.rules {
            if let Err(why) = r.public_key_bytes() {
                out.push(invalid("rules.public_key", why));
            }
        }
        for (name, c) in &self.commands {
            let field = format!("commands.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                out.push(invalid(
                    &field,
                    "a command name is letters, digits, '-', '_' or '.'",
                ));
            }
            match c.argv.first() {
                None => out.push(invalid(&format!("{field}.argv"), "is empty")),
                Some(p) if !p.starts_with('/') => out.push(invalid(
                    &format!("{field}.argv"),
                    format!("{p:?}: the program must be an absolute path (no PATH search)"),
                )),
                _ => {}
            }
            if c.timeout < Duration::from_secs(1) || c.timeout > Duration::from_secs(600) {
                out.push(invalid(
                    &format!("{field}.timeout"),
                    "must be between 1s and 10m",
                ));
            }
            if !(1..=1 << 20).contains(&c.max_output_bytes) {
                out.push(invalid(
                    &format!("{field}.max_output_bytes"),
                    "must be between 1 and 1048576",
                ));
            }
            for v in &c.allow_env {
                if v.is_empty() || v.contains(['=', '\0']) {
                    out.push(invalid(
                        &format!("{field}.allow_env"),
                        format!("{v:?} is not a variable name"),
                    ));
                }
            }
        }
        let m = &self.mqtt;
        match parse_server(&m.server) {
            Err(e) => out.push(invalid("mqtt.server", e)),
            Ok(server) if !server.tls && m.tls.is_some() => out.push(invalid(
                "mqtt.tls",
                format!(
                    "TLS settings with a plain-text server: write mqtts://{}:{} to use them",
                    server.host_for_url(),
                    server.port
                ),
            )),
            Ok(_) => {}
        }
        if let Some(tls) = &m.tls {
            match (&tls.cert_file, &tls.key_file) {
                (Some(_), None) => out.push(invalid(
                    "mqtt.tls.cert_file",
                    "a client certificate needs its key: set mqtt.tls.key_file",
                )),
                (None, Some(_)) => out.push(invalid(
                    "mqtt.tls.key_file",
                    "a key without its certificate: set mqtt.tls.cert_file",
                )),
                _ => {}
            }
        }
        if m.password.is_some() && m.password_file.is_some() {
            out.push(invalid(
                "mqtt.password_file",
                "mqtt.password is also set: keep one (the file is better)",
            ));
        }
        if m.username.is_none() && m.password_file.is_some() {
            out.push(invalid("mqtt.password_file", "a password needs a username"));
        }
        if !(1..=10_000).contains(&m.command_rate_per_s) {
            out.push(invalid(
                "mqtt.command_rate_per_s",
                "must be between 1 and 10000",
            ));
        }
        if m.topic_prefix.is_empty()
            || m.topic_prefix.contains(['#', '+'])
            || m.topic_prefix.ends_with('/')
        {
            out.push(invalid(
                "mqtt.topic_prefix",
                "must be non-empty, without '#', '+' or a trailing '/'",
            ));
        }
        if m.username.is_none() && m.password.is_some() {
            out.push(invalid("mqtt.password", "a password needs a username"));
        }
        if !(1..=1000).contains(&m.inflight) {
            out.push(invalid("mqtt.inflight", "must be between 1 and 1000"));
        }
        // MQTT carries the keep-alive in 16 bits of seconds.
        if m.keep_alive < Duration::from_secs(5) || m.keep_alive > Duration::from_secs(65_535) {
            out.push(invalid(
                "mqtt.keep_alive",
                "must be between 5s and 65535s (18h12m15s)",
            ));
        }
        if m.drain_timeout > Duration::from_secs(60) {
            out.push(invalid(
                "mqtt.drain_timeout",
                "must be at most 60s (systemd stops the unit after 90 s)",
            ));
        }
        let hour = Duration::from_secs(3600);
        for (field, d) in [
            ("mqtt.ack_timeout", m.ack_timeout),
            ("mqtt.connect_timeout", m.connect_timeout),
        ] {
            if d < Duration::from_secs(1) || d > hour {
                out.push(invalid(field, "must be between 1s and 1h"));
            }
        }
        if m.reconnect_max.is_zero() || m.reconnect_max > hour {
            out.push(invalid("mqtt.reconnect_max", "must be between 1ms and 1h"));
        }
        if m.reconnect_min.is_zero() || m.reconnect_min > m.reconnect_max {
            out.push(invalid(
                "mqtt.reconnect_min",
                "must be above 0 and not above mqtt.reconnect_max",
            ));
        }
        let s = &self.store;
        if s.max_size_mib < 16 {
            out.push(invalid(
                "store.max_size_mib",
                "must be at least 16 (the store's journal and its outage backlog in segments of 1 MiB or more)",
            ));
        } else if s.max_size_mib > MAX_STORE_MIB {
            out.push(invalid(
                "store.max_size_mib",
                format!("must be at most {MAX_STORE_MIB} (1 TiB)"),
            ));
        }
        if s.path.as_os_str().is_empty() {
            out.push(invalid("store.path", "must name a directory"));
        }
        if s.max_age < Duration::from_secs(60) || s.max_age > Duration::from_secs(366 * 86_400) {
            out.push(invalid(
                "store.max_age",
                "must be between 1m and 366d: a shorter age evicts frames before any outage \
                 could end",
            ));
        }
        if s.join_request_max_age < Duration::from_secs(1)
            || s.join_request_max_age > Duration::from_secs(60)
        {
            out.push(invalid(
                "store.join_request_max_age",
                "must be between 1s and 60s (a JoinAccept is sent 5 or 6 s after the request; \
                 0 would drop every join-request, live ones included)",
            ));
        }
        if s.commit_interval.is_zero() || s.commit_interval > Duration::from_secs(10) {
            out.push(invalid(
                "store.commit_interval",
                "must be between 1ms and 10s",
            ));
        }
        if self.stats.interval < Duration::from_secs(1) || self.stats.interval > hour {
            out.push(invalid("stats.interval", "must be between 1s and 1h"));
        }
        if !(REVERT_AFTER_MIN..=REVERT_AFTER_MAX).contains(&self.ops.revert_after) {
            out.push(invalid("ops.revert_after", "must be between 10s and 1h"));
        }
        if let Some(p) = &self.ops.remote_config {
            if p.is_relative() || p.file_name().is_none() {
                out.push(invalid(
                    "ops.remote_config",
                    "must be an absolute path to a file (the agent writes it and files beside it)",
                ));
            }
        }
        out
    }
}

/// The largest store budget `check` accepts (1 TiB): beyond it the byte count overflows nowhere,
/// but no gateway has such a disk.
const MAX_STORE_MIB: u64 = 1 << 20;

/// A broker address: `tcp://` or `mqtt://` for plain text, `mqtts://` or `ssl://` for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

impl Server {
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback())
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

pub fn parse_server(s: &str) -> Result<Server, String> {
    const SCHEMES: [(&str, bool); 4] = [
        ("tcp://", false),
        ("mqtt://", false),
        ("mqtts://", true),
        ("ssl://", true),
    ];
    if s.contains('@') {
        // Not echoed: it may well hold a password.
        return Err(
            "credentials do not go in mqtt.server (the value is not shown): use \
                    mqtt.username and mqtt.password_file"
                .into(),
        );
    }
    let (rest, tls) = SCHEMES
        .iter()
        .find_map(|(scheme, tls)| s.strip_prefix(scheme).map(|r| (r, *tls)))
        .ok_or_else(|| format!("{s:?} must start with tcp:// (plain text) or mqtts:// (TLS)"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        format!(
            "{s:?} has no port ({}host:{})",
            if tls { "mqtts://" } else { "tcp://" },
            if tls { 8883 } else { 1883 }
        )
    })?;
    let port: u16 = port.parse().map_err(|_| {
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            format!("{s:?}: port {port} is out of range (1 to 65535)")
        } else {
            format!("{s:?}: port {port:?} is not a number")
        }
    })?;
    if port == 0 {
        return Err(format!("{s:?}: port 0 is not a port"));
    }
    let host = match host.strip_prefix('[') {
        // An IPv6 literal: [::1]:1883.
        Some(v6) => v6
            .strip_suffix(']')
            .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
            .ok_or_else(|| format!("{s:?}: {host:?} is not an IPv6 address in brackets"))?,
        None => host,
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if !host.contains(':')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(format!(
            "{s:?}: {host:?} is not a host name or address (expected tcp://host:port)"
        ));
    }
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!(
            "{s:?}: {host:?} is not a host name (an IPv6 address goes in brackets: tcp://[::1]:1883)"
        ));
    }
    Ok(Server {
        tls,
        host: host.to_string(),
        port,
    })
}
