//! The rule file (`rules.file`): devices and their decoders, sensors, pumps with their
//! interlocks and optional level control. Strict: unknown keys and every semantic error are
//! reported all at once, each with file:line:column and the field, as `lora-edge check` prints
//! them. The reference is README.md § Pump-safety rules; `config/rules.toml` is an example.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::Digest;

use super::decoder::{Decoder, Endian, FieldType, LayoutField};
use crate::config::duration;
use crate::config::{at, deserialize_all, find_field};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: u32,
    #[serde(default)]
    device: Vec<RawDevice>,
    #[serde(default)]
    sensor: Vec<RawSensor>,
    #[serde(default)]
    pump: Vec<RawPump>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    dev_eui: String,
    decoder: DecoderKind,
    /// Only frames on this FPort are decoded (others are ignored); any when absent.
    fport: Option<u8>,
    #[serde(default)]
    field: Vec<RawField>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DecoderKind {
    Layout,
    CayenneLpp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    offset: usize,
    #[serde(rename = "type")]
    ty: FieldType,
    #[serde(default)]
    endian: Endian,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    add: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSensor {
    id: String,
    device: String,
    field: String,
    valid_range: [f64; 2],
    #[serde(with = "duration")]
    max_age: Duration,
    max_step: Option<f64>,
    stuck_samples: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPump {
    id: String,
    safe_state: String,
    actuator: Actuator,
    #[serde(with = "duration")]
    max_run: Duration,
    #[serde(with = "duration")]
    min_run: Duration,
    #[serde(with = "duration")]
    min_off: Duration,
    max_starts_per_hour: u32,
    #[serde(with = "duration")]
    remote_lease_max: Duration,
    #[serde(default)]
    interlock: Vec<RawInterlock>,
    auto: Option<RawAuto>,
}

/// How a pump is driven.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Actuator {
    /// A relay on a GPIO line, energised to run; de-energised is the safe state.
    Gpio {
        chip: PathBuf,
        line: u32,
        #[serde(default)]
        active_low: bool,
    },
    /// A file of JSON lines recording every transition (tests and demonstrations).
    Simulated { file: PathBuf },
    /// A LoRaWAN Class C actuator whose session the agent owns (`rules/class_c.rs`).
    LorawanClassC(ClassC),
}

/// A Class C actuator: what to send, how, and how its status uplink confirms it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassC {
    /// DevEUI: a `[[device]]` of this file (its decoder reads the status uplink), with keys.
    pub device: String,
    pub fport: u8,
    /// The actuator's timed ON (it reverts to off by itself after `lease`).
    pub on_hex: String,
    pub off_hex: String,
    /// How long the actuator keeps running after an ON without a new one (its own timeout).
    #[serde(with = "duration")]
    pub lease: Duration,
    /// ON again this often while the rules say run; default a quarter of `lease`.
    #[serde(default, with = "opt_duration")]
    pub refresh: Option<Duration>,
    /// The field of the device's decoded status uplink that says whether the pump runs
    /// (non-zero: running).
    pub feedback: String,
    /// A command not confirmed by a status uplink within this is sent again (doubling).
    #[serde(default = "default_confirm_within", with = "duration")]
    pub confirm_within: Duration,
    /// Sends of a command before its pump is treated as in an unknown state (alarm).
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_class_c_frequency")]
    pub frequency_hz: u32,
    #[serde(default = "default_class_c_sf")]
    pub spreading_factor: u32,
    /// EIRP, dBm.
    #[serde(default = "default_class_c_power")]
    pub power_dbm: i32,
}

fn default_confirm_within() -> Duration {
    Duration::from_secs(30)
}
fn default_retries() -> u32 {
    3
}
/// EU868 RX2: the 869.4-869.65 MHz sub-band, 10 % duty cycle and 27 dBm.
fn default_class_c_frequency() -> u32 {
    869_525_000
}
fn default_class_c_sf() -> u32 {
    9
}
fn default_class_c_power() -> i32 {
    14
}

mod opt_duration {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        crate::config::duration::deserialize(d).map(Some)
    }
}

impl ClassC {
    /// The refresh period in use.
    pub fn refresh_period(&self) -> Duration {
        self.refresh.unwrap_or(self.lease / 4)
    }

    /// Bytes of an ON or OFF frame: MHDR + FHDR (7) + FPort + payload + MIC.
    pub fn frame_len(&self, payload: &str) -> usize {
        1 + 7 + 1 + payload.len() / 2 + 4
    }

    /// What the ON refreshes cost: one ON's time on air, and their share of the hour (%).
    pub fn refresh_cost(&self) -> (Duration, f64) {
        let air = super::class_c::airtime(self.spreading_factor, self.frame_len(&self.on_hex));
        (
            air,
            air.as_secs_f64() / self.refresh_period().as_secs_f64() * 100.0,
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterlock {
    id: String,
    sensor: String,
    trip_below: Option<f64>,
    trip_above: Option<f64>,
    reset_at: f64,
    #[serde(default)]
    latch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuto {
    sensor: String,
    mode: AutoMode,
    start_at: f64,
    stop_at: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoMode {
    /// Run when the level is high (a sump, a wet well): start at `start_at`, stop at `stop_at`.
    Empty,
    /// Run when the level is low (a tank being filled).
    Fill,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trip {
    Below(f64),
    Above(f64),
}

/// A device whose frames the rules decode.
#[derive(Debug, Clone)]
pub struct Device {
    pub dev_eui: String,
    pub fport: Option<u8>,
    pub decoder: Decoder,
}

#[derive(Debug, Clone)]
pub struct Sensor {
    pub id: String,
    /// Index into `RuleSet::devices`.
    pub device: usize,
    pub field: String,
    pub valid_range: [f64; 2],
    pub max_age_ms: u64,
    pub max_step: Option<f64>,
    pub stuck_samples: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Interlock {
    pub id: String,
    /// Index into `RuleSet::sensors`.
    pub sensor: usize,
    pub trip: Trip,
    pub reset_at: f64,
    pub latch: bool,
}

#[derive(Debug, Clone)]
pub struct Auto {
    pub sensor: usize,
    pub mode: AutoMode,
    pub start_at: f64,
    pub stop_at: f64,
}

#[derive(Debug, Clone)]
pub struct Pump {
    pub id: String,
    pub actuator: Actuator,
    pub max_run_ms: u64,
    pub min_run_ms: u64,
    pub min_off_ms: u64,
    pub max_starts_per_hour: u32,
    pub remote_lease_max_ms: u64,
    pub interlocks: Vec<Interlock>,
    pub auto: Option<Auto>,
}

/// A validated rule file, references resolved to indices.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub devices: Vec<Device>,
    pub sensors: Vec<Sensor>,
    pub pumps: Vec<Pump>,
    /// SHA-256 of the file's bytes, hex: in every audit record.
    pub hash: String,
}

/// Every problem of a rule file, each `file:line:col: field: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleErrors(pub Vec<String>);

impl std::fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        write!(f, "{} error(s) in the rule file", self.0.len())
    }
}

impl std::error::Error for RuleErrors {}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Reads and validates a rule file. Relative actuator files are relative to it.
pub fn load(path: &Path) -> Result<RuleSet, RuleErrors> {
    let bytes =
        std::fs::read(path).map_err(|e| RuleErrors(vec![format!("{}: {e}", path.display())]))?;
    if bytes.len() as u64 > crate::config::MAX_FILE_BYTES {
        return Err(RuleErrors(vec![format!(
            "{}: {} bytes: a rule file may not exceed {} bytes",
            path.display(),
            bytes.len(),
            crate::config::MAX_FILE_BYTES
        )]));
    }
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| RuleErrors(vec![format!("{}: not UTF-8 text", path.display())]))?;
    parse(path, &text, &bytes)
}

fn parse(path: &Path, text: &str, bytes: &[u8]) -> Result<RuleSet, RuleErrors> {
    let locate = |field: &str| -> String {
        let mut f = field.to_string();
        // A missing key: point at its table.
        loop {
            if let Some(o) = find_field(text, &f) {
                return format!("{}: {field}", at(path, text, Some(o)));
            }
            match f.rsplit_once('.') {
                Some((parent, _)) => f = parent.to_string(),
                None => return format!("{}: {field}", path.display()),
            }
        }
    };
    let table = match text.parse::<toml::Table>() {
        Ok(t) => t,
        Err(e) => {
            return Err(RuleErrors(vec![format!(
                "{}: {}",
                at(path, text, e.span().map(|s| s.start)),
                e.message().trim()
            )]))
        }
    };
    let (raw, problems) = deserialize_all::<RawFile>(table, |_| false);
    let mut errors: Vec<(String, String)> = problems;
    let Some(raw) = raw else {
        return Err(RuleErrors(
            errors
                .into_iter()
                .map(|(f, m)| format!("{}: {m}", locate(&f)))
                .collect(),
        ));
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let set = validate(raw, &base, &mut errors);
    if !errors.is_empty() {
        let mut out: Vec<(String, String)> =
            errors.into_iter().map(|(f, m)| (locate(&f), m)).collect();
        // File order.
        out.sort_by_key(|(loc, _)| {
            let mut parts = loc.split(':').skip(1);
            let line = parts.next().and_then(|l| l.trim().parse::<usize>().ok());
            let col = parts.next().and_then(|c| c.trim().parse::<usize>().ok());
            (line.unwrap_or(usize::MAX), col.unwrap_or(0))
        });
        return Err(RuleErrors(
            out.into_iter().map(|(l, m)| format!("{l}: {m}")).collect(),
        ));
    }
    let mut set = set;
    set.hash = hex::encode(sha2::Sha256::digest(bytes));
    Ok(set)
}

/// The Class C actuator's settings, each error on its own key. The duty-cycle arithmetic is
/// the one of `../shared/docs/pump-safety.md`: the refreshes of one actuator may use at most
/// half of its sub-band's hourly allowance, so that STOPs and the network server keep room.
fn check_class_c(c: &ClassC, devices: &[Device], err: &mut dyn FnMut(&str, String)) {
    match devices.iter().find(|d| d.dev_eui == c.device) {
        None => err(
            "actuator.device",
            format!(
                "{:?} is not a [[device]] of this file: its status uplink confirms each command",
                c.device
            ),
        ),
        Some(d) => {
            if let Decoder::Layout(fields) = &d.decoder {
                if !fields.iter().any(|f| f.name == c.feedback) {
                    err(
                        "actuator.feedback",
                        format!(
                            "device {} has no field {:?} (fields: {})",
                            c.device,
                            c.feedback,
                            known(fields.iter().map(|f| f.name.as_str()))
                        ),
                    );
                }
            }
        }
    }
    if !(1..=223).contains(&c.fport) {
        err(
            "actuator.fport",
            "must be 1 to 223 (application FPorts)".into(),
        );
    }
    let max_payload = match c.spreading_factor {
        7 | 8 => 222,
        9 => 115,
        _ => 51,
    };
    for (k, v) in [
        ("actuator.on_hex", &c.on_hex),
        ("actuator.off_hex", &c.off_hex),
    ] {
        match hex::decode(v) {
            Ok(b) if !b.is_empty() && b.len() <= max_payload => {}
            Ok(b) => err(
                k,
                format!(
                    "{} bytes: SF{} carries 1 to {max_payload}",
                    b.len(),
                    c.spreading_factor
                ),
            ),
            Err(_) => err(k, format!("{v:?} is not hexadecimal bytes")),
        }
    }
    if !(7..=12).contains(&c.spreading_factor) {
        err("actuator.spreading_factor", "must be 7 to 12".into());
    }
    if !(863_000_000..=870_000_000).contains(&c.frequency_hz) {
        err(
            "actuator.frequency_hz",
            "must be in the EU868 band (863 to 870 MHz)".into(),
        );
    }
    if !(0..=27).contains(&c.power_dbm) {
        err("actuator.power_dbm", "must be 0 to 27 dBm EIRP".into());
    }
    if c.lease < Duration::from_secs(20) || c.lease > Duration::from_secs(3600) {
        err("actuator.lease", "must be between 20s and 1h".into());
    }
    let refresh = c.refresh_period();
    if refresh < Duration::from_secs(5) || refresh > c.lease / 2 {
        err(
            if c.refresh.is_some() { "actuator.refresh" } else { "actuator.lease" },
            format!(
                "refresh every {} must be at least 5s and at most half the lease ({}): one lost ON must not stop the pump",
                humantime::format_duration(refresh),
                humantime::format_duration(c.lease / 2)
            ),
        );
    }
    if c.confirm_within < Duration::from_secs(1) || c.confirm_within > Duration::from_secs(600) {
        err(
            "actuator.confirm_within",
            "must be between 1s and 10m".into(),
        );
    }
    if !(1..=10).contains(&c.retries) {
        err("actuator.retries", "must be 1 to 10".into());
    }
    if (7..=12).contains(&c.spreading_factor) && !refresh.is_zero() {
        let band = crate::radio::region::sub_band(c.frequency_hz);
        let (air, share) = c.refresh_cost();
        let per_hour = 3600.0 / refresh.as_secs_f64();
        let allowed = band.permille as f64 / 10.0;
        if share > allowed / 2.0 {
            err(
                "actuator.refresh",
                format!(
                    "{per_hour:.0} ONs an hour of {} ms each at SF{} use {share:.2} % of the hour; sub-band {} MHz allows {allowed} %, and refreshes may take half of it: refresh less often or use a lower SF",
                    air.as_millis(),
                    c.spreading_factor,
                    band.name
                ),
            );
        }
    }
}

fn validate(raw: RawFile, base: &Path, errors: &mut Vec<(String, String)>) -> RuleSet {
    let mut err = |field: String, msg: String| errors.push((field, msg));
    if raw.version != 1 {
        err(
            "version".into(),
            format!(
                "version {} is not known (this agent reads version 1)",
                raw.version
            ),
        );
    }
    let mut devices = Vec::new();
    let mut eui_index = BTreeMap::new();
    for (i, d) in raw.device.iter().enumerate() {
        let f = |k: &str| format!("device.{i}.{k}");
        let eui = d.dev_eui.to_ascii_lowercase();
        if eui.len() != 16 || !eui.chars().all(|c| c.is_ascii_hexdigit()) {
            err(
                f("dev_eui"),
                format!("{:?} is not 16 hexadecimal digits (a DevEUI)", d.dev_eui),
            );
        } else if eui_index.insert(eui.clone(), i).is_some() {
            err(
                f("dev_eui"),
                format!("device {} is already described above", d.dev_eui),
            );
        }
        if d.fport == Some(0) {
            err(
                f("fport"),
                "FPort 0 carries MAC commands, not application data".into(),
            );
        }
        let decoder = match d.decoder {
            DecoderKind::CayenneLpp => {
                if !d.field.is_empty() {
                    err(f("field"), "Cayenne LPP names its fields itself (<type>_<channel>, e.g. temperature_3): no [[device.field]]".into());
                }
                Decoder::CayenneLpp
            }
            DecoderKind::Layout => {
                if d.field.is_empty() {
                    err(
                        f("decoder"),
                        "a layout decoder needs at least one [[device.field]]".into(),
                    );
                }
                let mut names = BTreeSet::new();
                for (j, fl) in d.field.iter().enumerate() {
                    let ff = |k: &str| format!("device.{i}.field.{j}.{k}");
                    if !names.insert(fl.name.clone()) {
                        err(
                            ff("name"),
                            format!("field {:?} is already defined for this device", fl.name),
                        );
                    }
                    if fl.offset + fl.ty.size() > 242 {
                        err(ff("offset"), format!("offset {} + {} bytes is beyond the largest LoRaWAN payload (242 bytes)", fl.offset, fl.ty.size()));
                    }
                    if !fl.scale.is_finite() || fl.scale == 0.0 {
                        err(ff("scale"), "must be a non-zero number".into());
                    }
                    if !fl.add.is_finite() {
                        err(ff("add"), "must be a number".into());
                    }
                }
                Decoder::Layout(
                    d.field
                        .iter()
                        .map(|fl| LayoutField {
                            name: fl.name.clone(),
                            offset: fl.offset,
                            ty: fl.ty,
                            endian: fl.endian,
                            scale: fl.scale,
                            add: fl.add,
                        })
                        .collect(),
                )
            }
        };
        devices.push(Device {
            dev_eui: eui,
            fport: d.fport,
            decoder,
        });
    }

    let mut sensors = Vec::new();
    let mut sensor_index = BTreeMap::new();
    for (i, s) in raw.sensor.iter().enumerate() {
        let f = |k: &str| format!("sensor.{i}.{k}");
        if s.id.is_empty() {
            err(f("id"), "must not be empty".into());
        } else if sensor_index.insert(s.id.clone(), i).is_some() {
            err(
                f("id"),
                format!("sensor {:?} is already defined above", s.id),
            );
        }
        let device = eui_index.get(&s.device.to_ascii_lowercase()).copied();
        match device {
            None => err(
                f("device"),
                format!(
                    "{:?} is not a [[device]] of this file (known: {})",
                    s.device,
                    known(raw.device.iter().map(|d| d.dev_eui.as_str()))
                ),
            ),
            Some(d) => {
                if let Decoder::Layout(fields) = &devices[d].decoder {
                    if !fields.iter().any(|fl| fl.name == s.field) {
                        err(
                            f("field"),
                            format!(
                                "device {} has no field {:?} (its fields: {})",
                                s.device,
                                s.field,
                                known(fields.iter().map(|fl| fl.name.as_str()))
                            ),
                        );
                    }
                } else if !super::decoder::is_lpp_field(&s.field) {
                    err(
                        f("field"),
                        format!(
                            "{:?} is not a Cayenne LPP field (<type>_<channel>, e.g. temperature_3, analog_input_1)",
                            s.field
                        ),
                    );
                }
            }
        }
        let [lo, hi] = s.valid_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            err(
                f("valid_range"),
                format!("[{lo}, {hi}] is not a range (low first, both numbers)"),
            );
        }
        if s.max_age < Duration::from_secs(1) || s.max_age > Duration::from_secs(7 * 86_400) {
            err(f("max_age"), "must be between 1s and 7d".into());
        }
        if let Some(step) = s.max_step {
            if !(step.is_finite() && step > 0.0) {
                err(f("max_step"), "must be a positive number".into());
            }
        }
        if let Some(n) = s.stuck_samples {
            if n < 2 {
                err(
                    f("stuck_samples"),
                    "must be at least 2 (identical readings in a row)".into(),
                );
            }
        }
        sensors.push(Sensor {
            id: s.id.clone(),
            device: device.unwrap_or(0),
            field: s.field.clone(),
            valid_range: s.valid_range,
            max_age_ms: ms(s.max_age),
            max_step: s.max_step,
            stuck_samples: s.stuck_samples,
        });
    }
    let in_range = |sensor: usize, v: f64| {
        let [lo, hi] = sensors[sensor].valid_range;
        v.is_finite() && v >= lo && v <= hi
    };

    let mut pumps = Vec::new();
    let mut pump_ids = BTreeSet::new();
    let mut class_c_devices: BTreeMap<String, String> = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for (i, p) in raw.pump.iter().enumerate() {
        let f = |k: &str| format!("pump.{i}.{k}");
        if p.id.is_empty() {
            err(f("id"), "must not be empty".into());
        } else if !pump_ids.insert(p.id.clone()) {
            err(f("id"), format!("pump {:?} is already defined above", p.id));
        }
        if p.safe_state != "off" {
            err(
                f("safe_state"),
                format!(
                    "{:?}: only \"off\" is supported (a pump stops on bad data)",
                    p.safe_state
                ),
            );
        }
        let actuator = match &p.actuator {
            Actuator::Gpio {
                chip,
                line,
                active_low,
            } => {
                if chip.as_os_str().is_empty() {
                    err(
                        f("actuator.chip"),
                        "must name a GPIO chip, e.g. /dev/gpiochip0".into(),
                    );
                }
                if let Some(other) = lines.insert((chip.clone(), *line), p.id.clone()) {
                    err(
                        f("actuator.line"),
                        format!(
                            "line {line} of {} already drives pump {other:?}",
                            chip.display()
                        ),
                    );
                }
                Actuator::Gpio {
                    chip: chip.clone(),
                    line: *line,
                    active_low: *active_low,
                }
            }
            Actuator::Simulated { file } => Actuator::Simulated {
                file: if file.is_relative() {
                    base.join(file)
                } else {
                    file.clone()
                },
            },
            Actuator::LorawanClassC(c) => {
                let mut c = c.clone();
                c.device = c.device.to_ascii_lowercase();
                check_class_c(&c, &devices, &mut |k, m| err(f(k), m));
                // One session, one sender: two pumps on one actuator would share its counter.
                if let Some(other) = class_c_devices.insert(c.device.clone(), p.id.clone()) {
                    err(
                        f("actuator.device"),
                        format!("actuator {} already drives pump {other:?}", c.device),
                    );
                }
                Actuator::LorawanClassC(c)
            }
        };
        if p.max_run.is_zero() || p.max_run > Duration::from_secs(7 * 86_400) {
            err(f("max_run"), "must be between 1s and 7d".into());
        }
        if p.min_run >= p.max_run {
            err(
                f("min_run"),
                format!(
                    "must be shorter than max_run ({})",
                    humantime::format_duration(p.max_run)
                ),
            );
        }
        if p.min_off > Duration::from_secs(86_400) {
            err(f("min_off"), "must be at most 24h".into());
        }
        if !(1..=60).contains(&p.max_starts_per_hour) {
            err(f("max_starts_per_hour"), "must be between 1 and 60".into());
        }
        if p.remote_lease_max.is_zero() || p.remote_lease_max > Duration::from_secs(86_400) {
            err(f("remote_lease_max"), "must be between 1s and 24h".into());
        }
        let mut interlocks = Vec::new();
        let mut il_ids = BTreeSet::new();
        for (j, il) in p.interlock.iter().enumerate() {
            let fi = |k: &str| format!("pump.{i}.interlock.{j}.{k}");
            if !il_ids.insert(il.id.clone()) {
                err(
                    fi("id"),
                    format!("interlock {:?} is already defined for this pump", il.id),
                );
            }
            let sensor = sensor_index.get(&il.sensor).copied();
            if sensor.is_none() {
                err(
                    fi("sensor"),
                    format!(
                        "{:?} is not a [[sensor]] (known: {})",
                        il.sensor,
                        known(sensor_index.keys().map(String::as_str))
                    ),
                );
            }
            let trip = match (il.trip_below, il.trip_above) {
                (Some(t), None) => Trip::Below(t),
                (None, Some(t)) => Trip::Above(t),
                (Some(_), Some(_)) => {
                    err(fi("trip_above"), "give trip_below or trip_above, not both (two interlocks if both are needed)".into());
                    Trip::Below(f64::NAN)
                }
                (None, None) => {
                    err(fi("id"), "needs trip_below or trip_above".into());
                    Trip::Below(f64::NAN)
                }
            };
            if let Some(s) = sensor {
                let (field, t) = match trip {
                    Trip::Below(t) => ("trip_below", t),
                    Trip::Above(t) => ("trip_above", t),
                };
                if !t.is_nan() && !in_range(s, t) {
                    err(fi(field), format!("{t} is outside the valid range of sensor {:?} {:?}: it could never trip (or always would)", il.sensor, sensors[s].valid_range));
                }
                if !in_range(s, il.reset_at) {
                    err(
                        fi("reset_at"),
                        format!(
                            "{} is outside the valid range of sensor {:?} {:?}",
                            il.reset_at, il.sensor, sensors[s].valid_range
                        ),
                    );
                }
                match trip {
                    Trip::Below(t) if il.reset_at <= t => err(fi("reset_at"), format!("a trip below {t} resets above it: reset_at must be greater than trip_below (hysteresis)")),
                    Trip::Above(t) if il.reset_at >= t => err(fi("reset_at"), format!("a trip above {t} resets below it: reset_at must be less than trip_above (hysteresis)")),
                    _ => {}
                }
            }
            interlocks.push(Interlock {
                id: il.id.clone(),
                sensor: sensor.unwrap_or(0),
                trip,
                reset_at: il.reset_at,
                latch: il.latch,
            });
        }
        let auto = p.auto.as_ref().map(|a| {
            let fa = |k: &str| format!("pump.{i}.auto.{k}");
            let sensor = sensor_index.get(&a.sensor).copied();
            match sensor {
                None => err(
                    fa("sensor"),
                    format!(
                        "{:?} is not a [[sensor]] (known: {})",
                        a.sensor,
                        known(sensor_index.keys().map(String::as_str))
                    ),
                ),
                Some(s) => {
                    for (k, v) in [("start_at", a.start_at), ("stop_at", a.stop_at)] {
                        if !in_range(s, v) {
                            err(
                                fa(k),
                                format!(
                                    "{v} is outside the valid range of sensor {:?} {:?}",
                                    a.sensor, sensors[s].valid_range
                                ),
                            );
                        }
                    }
                }
            }
            match a.mode {
                AutoMode::Empty if a.start_at <= a.stop_at => err(
                    fa("start_at"),
                    "mode \"empty\" starts on a high level: start_at must be above stop_at".into(),
                ),
                AutoMode::Fill if a.start_at >= a.stop_at => err(
                    fa("start_at"),
                    "mode \"fill\" starts on a low level: start_at must be below stop_at".into(),
                ),
                _ => {}
            }
            Auto {
                sensor: sensor.unwrap_or(0),
                mode: a.mode,
                start_at: a.start_at,
                stop_at: a.stop_at,
            }
        });
        pumps.push(Pump {
            id: p.id.clone(),
            actuator,
            max_run_ms: ms(p.max_run),
            min_run_ms: ms(p.min_run),
            min_off_ms: ms(p.min_off),
            max_starts_per_hour: p.max_starts_per_hour,
            remote_lease_max_ms: ms(p.remote_lease_max),
            interlocks,
            auto,
        });
    }
    RuleSet {
        devices,
        sensors,
        pumps,
        hash: String::new(),
    }
}

fn known<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        let p = Path::new("rules.toml");
        match parse(p, text, text.as_bytes()) {
            Ok(_) => vec![],
            Err(e) => e.0,
        }
    }

    /// A valid file: one level sensor, one pump with a dry-run interlock and level control.
    pub(crate) const GOOD: &str = r#"version = 1

[[device]]
dev_eui = "70B3D57ED0001A01"
decoder = "layout"
  [[device.field]]
  name = "water_level_m"
  offset = 0
  type = "u16"
  scale = 0.001

[[sensor]]
id = "level"
device = "70B3D57ED0001A01"
field = "water_level_m"
valid_range = [0.0, 4.0]
max_age = "25m"
max_step = 0.5

[[pump]]
id = "P1"
safe_state = "off"
actuator = { kind = "simulated", file = "relay.jsonl" }
max_run = "2h"
min_run = "2m"
min_off = "10m"
max_starts_per_hour = 4
remote_lease_max = "30m"

  [[pump.interlock]]
  id = "dry_run"
  sensor = "level"
  trip_below = 0.40
  reset_at = 0.60

  [pump.auto]
  sensor = "level"
  mode = "empty"
  start_at = 2.5
  stop_at = 1.0
"#;

    #[test]
    fn a_good_file_loads_with_references_resolved() {
        let s = parse(
            Path::new("/etc/lora-edge/rules.toml"),
            GOOD,
            GOOD.as_bytes(),
        )
        .unwrap();
        assert_eq!(s.pumps[0].interlocks[0].sensor, 0);
        assert_eq!(s.pumps[0].max_run_ms, 7_200_000);
        assert_eq!(
            s.pumps[0].actuator,
            Actuator::Simulated {
                file: "/etc/lora-edge/relay.jsonl".into()
            }
        );
        assert_eq!(s.hash.len(), 64);
    }

    const ACTUATOR: &str = r#"
[[device]]
dev_eui = "A84041000181ABCD"
decoder = "layout"
  [[device.field]]
  name = "relay"
  offset = 0
  type = "u8"
"#;

    #[test]
    fn a_class_c_actuator_loads_with_its_defaults_and_each_mistake_is_named() {
        let with = |actuator: &str| {
            GOOD.replace(
                "version = 1
",
                &format!(
                    "version = 1
{ACTUATOR}"
                ),
            )
            .replace(
                "actuator = { kind = \"simulated\", file = \"relay.jsonl\" }",
                actuator,
            )
        };
        let good = with(
            r#"actuator = { kind = "lorawan_class_c", device = "A84041000181ABCD", fport = 1, on_hex = "05010078", off_hex = "030000", lease = "2m", feedback = "relay" }"#,
        );
        let s = parse(Path::new("rules.toml"), &good, good.as_bytes()).unwrap();
        let Actuator::LorawanClassC(c) = &s.pumps[0].actuator else {
            panic!("{:?}", s.pumps[0].actuator)
        };
        assert_eq!(c.device, "a84041000181abcd");
        assert_eq!(c.refresh_period(), Duration::from_secs(30));
        assert_eq!(
            (c.spreading_factor, c.frequency_hz, c.retries),
            (9, 869_525_000, 3)
        );

        let bad = with(
            r#"actuator = { kind = "lorawan_class_c", device = "A84041000181ABCE", fport = 0, on_hex = "0501zz", off_hex = "", lease = "2m", refresh = "90s", feedback = "relais", spreading_factor = 13 }"#,
        );
        let joined = errors(&bad).join("\n");
        for want in [
            "pump.0.actuator.device: \"a84041000181abce\" is not a [[device]] of this file",
            "pump.0.actuator.fport: must be 1 to 223",
            "pump.0.actuator.on_hex: \"0501zz\" is not hexadecimal",
            "pump.0.actuator.off_hex: 0 bytes",
            "pump.0.actuator.refresh: refresh every 1m 30s must be at least 5s and at most half the lease (1m)",
            "pump.0.actuator.spreading_factor: must be 7 to 12",
        ] {
            assert!(joined.contains(want), "{want}\n{joined}");
        }
        let unknown_field = with(
            r#"actuator = { kind = "lorawan_class_c", device = "A84041000181ABCD", fport = 1, on_hex = "05", off_hex = "03", lease = "2m", feedback = "relais" }"#,
        );
        assert!(errors(&unknown_field).join("\n").contains(
            "actuator.feedback: device a84041000181abcd has no field \"relais\" (fields: relay)"
        ));
        // The duty-cycle arithmetic: SF12 every 5 s in a 1 % sub-band.
        let busy = with(
            r#"actuator = { kind = "lorawan_class_c", device = "A84041000181ABCD", fport = 1, on_hex = "05010078", off_hex = "03", lease = "20s", refresh = "5s", feedback = "relay", spreading_factor = 12, frequency_hz = 868900000 }"#,
        );
        let e = errors(&busy).join("\n");
        assert!(
            e.contains("pump.0.actuator.refresh: 720 ONs an hour of 1155 ms each at SF12 use 23.10 % of the hour; sub-band 868.7-869.2 MHz allows 0.1 %"),
            "{e}"
        );
    }

    #[test]
    fn every_semantic_error_is_reported_at_once_with_its_line() {
        let bad = GOOD
            .replace("reset_at = 0.60", "reset_at = 0.30")
            .replace("min_run = \"2m\"", "min_run = \"3h\"")
            .replace("start_at = 2.5", "start_at = 0.5")
            .replace(
                "sensor = \"level\"\n  trip_below",
                "sensor = \"levle\"\n  trip_below",
            )
            .replace("max_step = 0.5", "max_step = 0.5\nmax_stepp = 1");
        let e = errors(&bad);
        let joined = e.join("\n");
        assert!(
            joined.contains("rules.toml:19:13: sensor.0.max_stepp: unknown field"),
            "{joined}"
        );
        assert!(
            joined.contains("rules.toml:26:11: pump.0.min_run: must be shorter than max_run"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "pump.0.interlock.0.sensor: \"levle\" is not a [[sensor]] (known: level)"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("pump.0.auto.start_at: mode \"empty\" starts on a high level"),
            "{joined}"
        );
        assert_eq!(e.len(), 4, "{joined}");
    }

    #[test]
    fn hysteresis_in_the_wrong_direction_and_thresholds_outside_the_range_are_named() {
        let e = errors(&GOOD.replace("reset_at = 0.60", "reset_at = 0.30"));
        assert!(
            e[0].contains(
                "rules.toml:34:14: pump.0.interlock.0.reset_at: a trip below 0.4 resets above it"
            ),
            "{e:?}"
        );
        let e = errors(
            &GOOD
                .replace("trip_below = 0.40", "trip_below = 5.0")
                .replace("reset_at = 0.60", "reset_at = 5.5"),
        );
        assert!(
            e.iter()
                .any(|m| m.contains("trip_below: 5 is outside the valid range")),
            "{e:?}"
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rules.toml");
        let s = load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.pumps.len(), 2);
        assert_eq!(s.pumps[1].interlocks.len(), 3);
    }

    #[test]
    fn duplicates_and_unknown_devices_are_named() {
        let twice = GOOD.replace(
            "[[pump]]",
            "[[sensor]]\nid = \"level\"\ndevice = \"0000000000000001\"\nfield = \"x\"\nvalid_range = [0.0, 1.0]\nmax_age = \"1m\"\n\n[[pump]]",
        );
        let e = errors(&twice).join("\n");
        assert!(
            e.contains("sensor.1.id: sensor \"level\" is already defined above"),
            "{e}"
        );
        assert!(
            e.contains("sensor.1.device: \"0000000000000001\" is not a [[device]]"),
            "{e}"
        );
    }
}
