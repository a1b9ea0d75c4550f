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

// The raw file. Keys without a default are `Option`s: one whose value `deserialize_all` refused
// is taken out, and `validate` must tell it from a missing one (and go on checking its table).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Option<u32>,
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
    dev_eui: Option<String>,
    decoder: Option<DecoderKind>,
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
    name: Option<String>,
    offset: Option<usize>,
    #[serde(rename = "type")]
    ty: Option<FieldType>,
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
    id: Option<String>,
    device: Option<String>,
    field: Option<String>,
    valid_range: Option<[f64; 2]>,
    #[serde(default, with = "opt_duration")]
    max_age: Option<Duration>,
    max_step: Option<f64>,
    stuck_samples: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPump {
    id: Option<String>,
    safe_state: Option<String>,
    actuator: Option<Actuator>,
    #[serde(default, with = "opt_duration")]
    max_run: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    min_run: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    min_off: Option<Duration>,
    max_starts_per_hour: Option<u32>,
    #[serde(default, with = "opt_duration")]
    remote_lease_max: Option<Duration>,
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

    /// The worst hour of this actuator on air, with `max_starts` starts: the refreshes and each
    /// start's ON and each stop's OFF with all their re-sends; or, if more, an hour in an
    /// unknown state (the pump held off: only OFFs, every `confirm_within × 2^retries`, at most
    /// 10 min apart).
    pub fn hour_cost(&self, max_starts: u32) -> HourCost {
        let on = super::class_c::airtime(self.spreading_factor, self.frame_len(&self.on_hex));
        let off = super::class_c::airtime(self.spreading_factor, self.frame_len(&self.off_hex));
        let refreshes = (3600.0 / self.refresh_period().as_secs_f64()).ceil() as u32;
        let sends = max_starts * (1 + self.retries);
        let alarm_period = (self.confirm_within * 2u32.pow(self.retries.min(16)))
            .min(Duration::from_secs(600))
            .max(Duration::from_secs(1));
        let alarm_offs = (3600.0 / alarm_period.as_secs_f64()).ceil() as u32;
        let total = (on * (refreshes + sends) + off * sends).max(off * alarm_offs);
        HourCost {
            refreshes,
            sends,
            alarm_offs,
            total,
            share: total.as_secs_f64() / 3600.0 * 100.0,
        }
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

/// A Class C actuator's worst hour on air (`ClassC::hour_cost`).
#[derive(Debug, Clone, PartialEq)]
pub struct HourCost {
    pub refreshes: u32,
    /// Start ONs with their re-sends; as many stop OFFs.
    pub sends: u32,
    /// OFFs in an hour of unknown state (no refreshes nor starts then).
    pub alarm_offs: u32,
    pub total: Duration,
    /// Per cent of the hour.
    pub share: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterlock {
    id: Option<String>,
    sensor: Option<String>,
    trip_below: Option<f64>,
    trip_above: Option<f64>,
    reset_at: Option<f64>,
    #[serde(default)]
    latch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuto {
    sensor: Option<String>,
    mode: Option<AutoMode>,
    start_at: Option<f64>,
    stop_at: Option<f64>,
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
    let bytes = crate::files::read_bounded(path, crate::config::MAX_FILE_BYTES)
        .map_err(|e| RuleErrors(vec![format!("{}: {e}", path.display())]))?;
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
fn check_class_c(
    c: &ClassC,
    device: Ref,
    fields: &[Fields],
    max_starts: Option<u32>,
    err: &mut dyn FnMut(&str, String),
) {
    match device {
        Ref::Missing => err(
            "actuator.device",
            format!(
                "{:?} is not a [[device]] of this file: its status uplink confirms each command",
                c.device
            ),
        ),
        Ref::Unsure => {}
        Ref::Found(d) => {
            if let Fields::Layout(names) = &fields[d] {
                if !names.contains(&c.feedback) {
                    err(
                        "actuator.feedback",
                        format!(
                            "device {} has no field {:?} (fields: {})",
                            c.device,
                            c.feedback,
                            known(names.iter().map(String::as_str))
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
    // Each setting is checked on its own; what is derived from one out of range (the payload
    // limit of an SF, the default refresh of a lease, the airtime) is not checked again.
    let sf_ok = (7..=12).contains(&c.spreading_factor);
    if !sf_ok {
        err("actuator.spreading_factor", "must be 7 to 12".into());
    }
    let max_payload = match c.spreading_factor {
        7 | 8 => 222,
        9 => 115,
        _ => 51,
    };
    let mut on_ok = true;
    for (k, v) in [
        ("actuator.on_hex", &c.on_hex),
        ("actuator.off_hex", &c.off_hex),
    ] {
        let problem = match hex::decode(v) {
            Ok(b) if b.is_empty() || (sf_ok && b.len() > max_payload) => Some(if sf_ok {
                format!(
                    "{} bytes: SF{} carries 1 to {max_payload}",
                    b.len(),
                    c.spreading_factor
                )
            } else {
                format!("{} bytes: a command is at least 1", b.len())
            }),
            Ok(_) => None,
            Err(_) => Some(format!("{v:?} is not hexadecimal bytes")),
        };
        if let Some(problem) = problem {
            on_ok &= k != "actuator.on_hex";
            err(k, problem);
        }
    }
    let frequency_ok = (863_000_000..=870_000_000).contains(&c.frequency_hz);
    if !frequency_ok {
        err(
            "actuator.frequency_hz",
            "must be in the EU868 band (863 to 870 MHz)".into(),
        );
    }
    if !(0..=27).contains(&c.power_dbm) {
        err("actuator.power_dbm", "must be 0 to 27 dBm EIRP".into());
    }
    let lease_ok = c.lease >= Duration::from_secs(20) && c.lease <= Duration::from_secs(3600);
    if !lease_ok {
        err("actuator.lease", "must be between 20s and 1h".into());
    }
    let refresh = c.refresh_period();
    // The default refresh of a lease out of range is that lease's error; a refresh given is
    // compared with the lease only when the lease is valid.
    let refresh_ok = if c.refresh.is_none() && !lease_ok {
        false
    } else if refresh < Duration::from_secs(5) || (lease_ok && refresh > c.lease / 2) {
        err(
            if c.refresh.is_some() { "actuator.refresh" } else { "actuator.lease" },
            format!(
                "refresh every {} must be at least 5s and at most half the lease ({}): one lost ON must not stop the pump",
                humantime::format_duration(refresh),
                humantime::format_duration(c.lease / 2)
            ),
        );
        false
    } else {
        true
    };
    if c.confirm_within < Duration::from_secs(1) || c.confirm_within > Duration::from_secs(600) {
        err(
            "actuator.confirm_within",
            "must be between 1s and 10m".into(),
        );
    }
    if !(1..=10).contains(&c.retries) {
        err("actuator.retries", "must be 1 to 10".into());
    }
    if sf_ok && on_ok && frequency_ok && refresh_ok {
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
        } else if let (Some(n), true) = (max_starts, (1..=10).contains(&c.retries)) {
            // Starts, stops and every re-send too: the worst hour must fit in half the
            // allowance, or an OFF could find the sub-band spent.
            let h = c.hour_cost(n);
            if h.share > allowed / 2.0 {
                err(
                    "actuator",
                    format!(
                        "its worst hour ({} refreshes, {} ONs and {} OFFs with their re-sends for {n} starts an hour, or {} OFFs in an unknown state: {} ms) uses {:.2} % of the hour at SF{}; sub-band {} MHz allows {allowed} % and the actuator may take half of it: fewer starts or retries, a lower SF, or refresh less often",
                        h.refreshes,
                        h.sends,
                        h.sends,
                        h.alarm_offs,
                        h.total.as_millis(),
                        h.share,
                        c.spreading_factor,
                        band.name
                    ),
                );
            }
        }
    }
}

/// The semantic checks' errors, beside those of `deserialize_all`, whose fields were refused:
/// a refused field is `None` in the raw file (or absent from its array), is neither "missing"
/// nor checked again, and the checks that need its value are skipped. Every other check runs,
/// so that one mistake is one error and hides none.
struct Report<'a> {
    errors: &'a mut Vec<(String, String)>,
    refused: Vec<String>,
}

impl Report<'_> {
    fn err(&mut self, field: String, message: String) {
        self.errors.push((field, message));
    }

    /// Whether the value of `field` was refused: itself, the table holding it, or a part of it
    /// (the value then taken out whole, as `deserialize_all` does for a table short of a key).
    fn refused(&self, field: &str) -> bool {
        self.refused.iter().any(|r| {
            r == field || field.starts_with(&format!("{r}.")) || r.starts_with(&format!("{field}."))
        })
    }

    /// Whether the array `field` may be short of an entry: itself, the table holding it, or one
    /// of its elements was refused.
    fn lost_entry(&self, field: &str) -> bool {
        self.refused.iter().any(|r| {
            r == field
                || field.starts_with(&format!("{r}."))
                || r.strip_prefix(&format!("{field}."))
                    .is_some_and(|i| i.chars().all(|c| c.is_ascii_digit()))
        })
    }

    /// A key `table` must have: `None`, and said missing, when it is absent; `None`, silently,
    /// when its value was refused.
    fn need<'v, T>(&mut self, table: &str, key: &str, value: &'v Option<T>) -> Option<&'v T> {
        let field = if table == "." {
            key.to_string()
        } else {
            format!("{table}.{key}")
        };
        if value.is_none() && !self.refused(&field) {
            self.err(table.to_string(), format!("missing field `{key}`"));
        }
        value.as_ref()
    }
}

/// What a reference to another entry of the file (a sensor's device, an interlock's sensor)
/// comes to.
#[derive(Debug, Clone, Copy)]
enum Ref {
    Found(usize),
    /// No entry has that id, and every entry's id is known: an error of the reference.
    Missing,
    /// Not found, but an entry whose id was refused or is missing may be the one meant: that
    /// is its error; what needs the reference is not checked.
    Unsure,
}

fn resolve(index: &BTreeMap<String, usize>, id: &str, every_id_known: bool) -> Ref {
    match index.get(id) {
        Some(&i) => Ref::Found(i),
        None if every_id_known => Ref::Missing,
        None => Ref::Unsure,
    }
}

/// The field names of a device, for the sensors and actuators that name one.
enum Fields {
    /// A layout, every field's name known.
    Layout(Vec<String>),
    CayenneLpp,
    /// The decoder or a field's name was refused or is missing: nothing is checked against it.
    Unknown,
}

/// Whether `v` is a number within `[lo, hi]`.
fn within([lo, hi]: [f64; 2], v: f64) -> bool {
    v.is_finite() && v >= lo && v <= hi
}

/// The semantic checks. The set returned is used only when no error was found at all: where a
/// value is missing or refused (an error already), a placeholder stands in for it.
fn validate(raw: RawFile, base: &Path, errors: &mut Vec<(String, String)>) -> RuleSet {
    let refused = errors.iter().map(|(f, _)| f.clone()).collect();
    let mut r = Report { errors, refused };
    if let Some(&version) = r.need(".", "version", &raw.version) {
        if version != 1 {
            r.err(
                "version".into(),
                format!("version {version} is not known (this agent reads version 1)"),
            );
        }
    }
    let mut devices = Vec::new();
    let mut fields_of = Vec::new();
    let mut eui_index = BTreeMap::new();
    let mut every_eui_known = !r.lost_entry("device");
    for (i, d) in raw.device.iter().enumerate() {
        let t = format!("device.{i}");
        let f = |k: &str| format!("device.{i}.{k}");
        let eui = match r.need(&t, "dev_eui", &d.dev_eui) {
            None => {
                every_eui_known = false;
                String::new()
            }
            Some(given) => {
                let eui = given.to_ascii_lowercase();
                let well_formed = eui.len() == 16 && eui.chars().all(|c| c.is_ascii_hexdigit());
                if !well_formed {
                    r.err(
                        f("dev_eui"),
                        format!("{given:?} is not 16 hexadecimal digits (a DevEUI)"),
                    );
                }
                // Malformed, it still names this device for the references to it (their
                // error is this one).
                if eui_index.contains_key(&eui) {
                    if well_formed {
                        r.err(
                            f("dev_eui"),
                            format!("device {given} is already described above"),
                        );
                    }
                } else {
                    eui_index.insert(eui.clone(), i);
                }
                eui
            }
        };
        if d.fport == Some(0) {
            r.err(
                f("fport"),
                "FPort 0 carries MAC commands, not application data".into(),
            );
        }
        let kind = r.need(&t, "decoder", &d.decoder).copied();
        // Each field's own checks, whatever the decoder.
        let mut names = Vec::new();
        let mut every_name_known = !r.lost_entry(&f("field"));
        let mut layout = Vec::new();
        for (j, fl) in d.field.iter().enumerate() {
            let tf = format!("device.{i}.field.{j}");
            let ff = |k: &str| format!("{tf}.{k}");
            match r.need(&tf, "name", &fl.name) {
                None => every_name_known = false,
                Some(name) if names.contains(name) => r.err(
                    ff("name"),
                    format!("field {name:?} is already defined for this device"),
                ),
                Some(name) => names.push(name.clone()),
            }
            let offset = r.need(&tf, "offset", &fl.offset).copied();
            let ty = r.need(&tf, "type", &fl.ty).copied();
            if let Some(offset) = offset {
                // The type unknown, its smallest size: an offset beyond the payload is beyond
                // it whatever the type.
                let size = ty.map_or(1, FieldType::size);
                if offset.saturating_add(size) > 242 {
                    r.err(ff("offset"), format!("offset {offset} + {size} bytes is beyond the largest LoRaWAN payload (242 bytes)"));
                }
            }
            if !fl.scale.is_finite() || fl.scale == 0.0 {
                r.err(ff("scale"), "must be a non-zero number".into());
            }
            if !fl.add.is_finite() {
                r.err(ff("add"), "must be a number".into());
            }
            layout.push(LayoutField {
                name: fl.name.clone().unwrap_or_default(),
                offset: offset.unwrap_or(0),
                ty: ty.unwrap_or(FieldType::U8),
                endian: fl.endian,
                scale: fl.scale,
                add: fl.add,
            });
        }
        let (decoder, fields) = match kind {
            Some(DecoderKind::CayenneLpp) => {
                if !d.field.is_empty() {
                    r.err(f("field"), "Cayenne LPP names its fields itself (<type>_<channel>, e.g. temperature_3): no [[device.field]]".into());
                }
                (Decoder::CayenneLpp, Fields::CayenneLpp)
            }
            Some(DecoderKind::Layout) => {
                if d.field.is_empty() && !r.lost_entry(&f("field")) {
                    r.err(
                        f("decoder"),
                        "a layout decoder needs at least one [[device.field]]".into(),
                    );
                }
                let fields = if every_name_known {
                    Fields::Layout(names)
                } else {
                    Fields::Unknown
                };
                (Decoder::Layout(layout), fields)
            }
            None => (Decoder::CayenneLpp, Fields::Unknown),
        };
        devices.push(Device {
            dev_eui: eui,
            fport: d.fport,
            decoder,
        });
        fields_of.push(fields);
    }

    let mut sensors = Vec::new();
    // Each sensor's valid range, if it is one: the thresholds on it are checked against it.
    let mut ranges: Vec<Option<[f64; 2]>> = Vec::new();
    let mut sensor_index = BTreeMap::new();
    let mut every_sensor_id_known = !r.lost_entry("sensor");
    for (i, s) in raw.sensor.iter().enumerate() {
        let t = format!("sensor.{i}");
        let f = |k: &str| format!("sensor.{i}.{k}");
        match r.need(&t, "id", &s.id) {
            None => every_sensor_id_known = false,
            Some(id) if id.is_empty() => r.err(f("id"), "must not be empty".into()),
            Some(id) => {
                if sensor_index.insert(id.clone(), i).is_some() {
                    r.err(f("id"), format!("sensor {id:?} is already defined above"));
                }
            }
        }
        let device = match r.need(&t, "device", &s.device) {
            None => None,
            Some(dev) => match resolve(&eui_index, &dev.to_ascii_lowercase(), every_eui_known) {
                Ref::Found(d) => Some(d),
                Ref::Unsure => None,
                Ref::Missing => {
                    r.err(
                        f("device"),
                        format!(
                            "{dev:?} is not a [[device]] of this file (known: {})",
                            known(raw.device.iter().filter_map(|d| d.dev_eui.as_deref()))
                        ),
                    );
                    None
                }
            },
        };
        let field = r.need(&t, "field", &s.field);
        if let (Some(d), Some(field)) = (device, field) {
            match &fields_of[d] {
                Fields::Layout(names) => {
                    if !names.contains(field) {
                        r.err(
                            f("field"),
                            format!(
                                "device {} has no field {field:?} (its fields: {})",
                                s.device.as_deref().unwrap_or_default(),
                                known(names.iter().map(String::as_str))
                            ),
                        );
                    }
                }
                Fields::CayenneLpp => {
                    if !super::decoder::is_lpp_field(field) {
                        r.err(
                            f("field"),
                            format!(
                                "{field:?} is not a Cayenne LPP field (<type>_<channel>, e.g. temperature_3, analog_input_1)"
                            ),
                        );
                    }
                }
                Fields::Unknown => {}
            }
        }
        let range = match r.need(&t, "valid_range", &s.valid_range) {
            None => None,
            Some(&[lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => Some([lo, hi]),
            Some([lo, hi]) => {
                r.err(
                    f("valid_range"),
                    format!("[{lo}, {hi}] is not a range (low first, both numbers)"),
                );
                None
            }
        };
        if let Some(&max_age) = r.need(&t, "max_age", &s.max_age) {
            if max_age < Duration::from_secs(1) || max_age > Duration::from_secs(7 * 86_400) {
                r.err(f("max_age"), "must be between 1s and 7d".into());
            }
        }
        if let Some(step) = s.max_step {
            if !(step.is_finite() && step > 0.0) {
                r.err(f("max_step"), "must be a positive number".into());
            }
        }
        if let Some(n) = s.stuck_samples {
            if n < 2 {
                r.err(
                    f("stuck_samples"),
                    "must be at least 2 (identical readings in a row)".into(),
                );
            }
        }
        sensors.push(Sensor {
            id: s.id.clone().unwrap_or_default(),
            device: device.unwrap_or(0),
            field: field.cloned().unwrap_or_default(),
            valid_range: s.valid_range.unwrap_or_default(),
            max_age_ms: ms(s.max_age.unwrap_or_default()),
            max_step: s.max_step,
            stuck_samples: s.stuck_samples,
        });
        ranges.push(range);
    }
    // A sensor named by an interlock or level control: its index, when it is known.
    let sensor_ref = |r: &mut Report, field: String, name: &str| match resolve(
        &sensor_index,
        name,
        every_sensor_id_known,
    ) {
        Ref::Found(s) => Some(s),
        Ref::Unsure => None,
        Ref::Missing => {
            r.err(
                field,
                format!(
                    "{name:?} is not a [[sensor]] (known: {})",
                    known(sensor_index.keys().map(String::as_str))
                ),
            );
            None
        }
    };

    let mut pumps = Vec::new();
    let mut pump_ids = BTreeSet::new();
    let mut class_c_devices: BTreeMap<String, String> = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for (i, p) in raw.pump.iter().enumerate() {
        let t = format!("pump.{i}");
        let f = |k: &str| format!("pump.{i}.{k}");
        let id = r.need(&t, "id", &p.id).cloned().unwrap_or_default();
        if p.id.is_some() {
            if id.is_empty() {
                r.err(f("id"), "must not be empty".into());
            } else if !pump_ids.insert(id.clone()) {
                r.err(f("id"), format!("pump {id:?} is already defined above"));
            }
        }
        if let Some(safe_state) = r.need(&t, "safe_state", &p.safe_state) {
            if safe_state != "off" {
                r.err(
                    f("safe_state"),
                    format!("{safe_state:?}: only \"off\" is supported (a pump stops on bad data)"),
                );
            }
        }
        let actuator = match r.need(&t, "actuator", &p.actuator) {
            // A placeholder: the error is already said.
            None => Actuator::Simulated {
                file: PathBuf::new(),
            },
            Some(Actuator::Gpio {
                chip,
                line,
                active_low,
            }) => {
                if chip.as_os_str().is_empty() {
                    r.err(
                        f("actuator.chip"),
                        "must name a GPIO chip, e.g. /dev/gpiochip0".into(),
                    );
                }
                if let Some(other) = lines.insert((chip.clone(), *line), id.clone()) {
                    r.err(
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
            Some(Actuator::Simulated { file }) => Actuator::Simulated {
                file: if file.is_relative() {
                    base.join(file)
                } else {
                    file.clone()
                },
            },
            Some(Actuator::LorawanClassC(c)) => {
                let mut c = c.clone();
                c.device = c.device.to_ascii_lowercase();
                let device = resolve(&eui_index, &c.device, every_eui_known);
                let max_starts = p.max_starts_per_hour.filter(|n| (1..=60).contains(n));
                check_class_c(&c, device, &fields_of, max_starts, &mut |k, m| {
                    r.err(f(k), m)
                });
                // One session, one sender: two pumps on one actuator would share its counter.
                if let Some(other) = class_c_devices.insert(c.device.clone(), id.clone()) {
                    r.err(
                        f("actuator.device"),
                        format!("actuator {} already drives pump {other:?}", c.device),
                    );
                }
                Actuator::LorawanClassC(c)
            }
        };
        // `min_run` is compared with a valid `max_run` only.
        let max_run = match r.need(&t, "max_run", &p.max_run) {
            Some(&m) if m.is_zero() || m > Duration::from_secs(7 * 86_400) => {
                r.err(f("max_run"), "must be between 1s and 7d".into());
                None
            }
            m => m.copied(),
        };
        if let (Some(&min_run), Some(max_run)) = (r.need(&t, "min_run", &p.min_run), max_run) {
            if min_run >= max_run {
                r.err(
                    f("min_run"),
                    format!(
                        "must be shorter than max_run ({})",
                        humantime::format_duration(max_run)
                    ),
                );
            }
        }
        if let Some(&min_off) = r.need(&t, "min_off", &p.min_off) {
            if min_off > Duration::from_secs(86_400) {
                r.err(f("min_off"), "must be at most 24h".into());
            }
        }
        if let Some(n) = r.need(&t, "max_starts_per_hour", &p.max_starts_per_hour) {
            if !(1..=60).contains(n) {
                r.err(f("max_starts_per_hour"), "must be between 1 and 60".into());
            }
        }
        if let Some(&lease) = r.need(&t, "remote_lease_max", &p.remote_lease_max) {
            if lease.is_zero() || lease > Duration::from_secs(86_400) {
                r.err(f("remote_lease_max"), "must be between 1s and 24h".into());
            }
        }
        let mut interlocks = Vec::new();
        let mut il_ids = BTreeSet::new();
        for (j, il) in p.interlock.iter().enumerate() {
            let t = format!("pump.{i}.interlock.{j}");
            let fi = |k: &str| format!("pump.{i}.interlock.{j}.{k}");
            if let Some(id) = r.need(&t, "id", &il.id) {
                if !il_ids.insert(id.clone()) {
                    r.err(
                        fi("id"),
                        format!("interlock {id:?} is already defined for this pump"),
                    );
                } else if id == super::engine::ACTUATOR_LATCH {
                    r.err(
                        fi("id"),
                        format!("{id:?} is the name of the latch an actuator that contradicts its command sets: choose another"),
                    );
                }
            }
            let name = r.need(&t, "sensor", &il.sensor);
            let sensor = name.and_then(|n| sensor_ref(&mut r, fi("sensor"), n));
            let trip = match (il.trip_below, il.trip_above) {
                (Some(t), None) => Some(Trip::Below(t)),
                (None, Some(t)) => Some(Trip::Above(t)),
                (Some(_), Some(_)) => {
                    r.err(fi("trip_above"), "give trip_below or trip_above, not both (two interlocks if both are needed)".into());
                    None
                }
                (None, None) => {
                    // A threshold given but refused is not a threshold forgotten.
                    if !r.refused(&fi("trip_below")) && !r.refused(&fi("trip_above")) {
                        r.err(fi("id"), "needs trip_below or trip_above".into());
                    }
                    None
                }
            };
            let reset_at = r.need(&t, "reset_at", &il.reset_at).copied();
            // Against the sensor's range: when the sensor and its range are known.
            if let (Some(range), Some(name)) = (sensor.and_then(|s| ranges[s]), name) {
                if let Some(trip) = trip {
                    let (field, t) = match trip {
                        Trip::Below(t) => ("trip_below", t),
                        Trip::Above(t) => ("trip_above", t),
                    };
                    if !within(range, t) {
                        r.err(fi(field), format!("{t} is outside the valid range of sensor {name:?} {range:?}: it could never trip (or always would)"));
                    }
                }
                if let Some(reset_at) = reset_at {
                    if !within(range, reset_at) {
                        r.err(
                            fi("reset_at"),
                            format!(
                                "{reset_at} is outside the valid range of sensor {name:?} {range:?}"
                            ),
                        );
                    }
                }
            }
            // The hysteresis' direction needs no sensor.
            match (trip, reset_at) {
                (Some(Trip::Below(t)), Some(reset_at)) if reset_at <= t => r.err(fi("reset_at"), format!("a trip below {t} resets above it: reset_at must be greater than trip_below (hysteresis)")),
                (Some(Trip::Above(t)), Some(reset_at)) if reset_at >= t => r.err(fi("reset_at"), format!("a trip above {t} resets below it: reset_at must be less than trip_above (hysteresis)")),
                _ => {}
            }
            interlocks.push(Interlock {
                id: il.id.clone().unwrap_or_default(),
                sensor: sensor.unwrap_or(0),
                trip: trip.unwrap_or(Trip::Below(f64::NAN)),
                reset_at: reset_at.unwrap_or(f64::NAN),
                latch: il.latch,
            });
        }
        let auto = p.auto.as_ref().map(|a| {
            let t = format!("pump.{i}.auto");
            let fa = |k: &str| format!("pump.{i}.auto.{k}");
            let name = r.need(&t, "sensor", &a.sensor);
            let sensor = name.and_then(|n| sensor_ref(&mut r, fa("sensor"), n));
            let mode = r.need(&t, "mode", &a.mode).copied();
            let start_at = r.need(&t, "start_at", &a.start_at).copied();
            let stop_at = r.need(&t, "stop_at", &a.stop_at).copied();
            if let (Some(range), Some(name)) = (sensor.and_then(|s| ranges[s]), name) {
                for (k, v) in [("start_at", start_at), ("stop_at", stop_at)] {
                    if let Some(v) = v.filter(|&v| !within(range, v)) {
                        r.err(
                            fa(k),
                            format!("{v} is outside the valid range of sensor {name:?} {range:?}"),
                        );
                    }
                }
            }
            match (mode, start_at, stop_at) {
                (Some(AutoMode::Empty), Some(start), Some(stop)) if start <= stop => r.err(
                    fa("start_at"),
                    "mode \"empty\" starts on a high level: start_at must be above stop_at".into(),
                ),
                (Some(AutoMode::Fill), Some(start), Some(stop)) if start >= stop => r.err(
                    fa("start_at"),
                    "mode \"fill\" starts on a low level: start_at must be below stop_at".into(),
                ),
                _ => {}
            }
            Auto {
                sensor: sensor.unwrap_or(0),
                mode: mode.unwrap_or(AutoMode::Empty),
                start_at: start_at.unwrap_or(f64::NAN),
                stop_at: stop_at.unwrap_or(f64::NAN),
            }
        });
        pumps.push(Pump {
            id,
            actuator,
            max_run_ms: ms(p.max_run.unwrap_or_default()),
            min_run_ms: ms(p.min_run.unwrap_or_default()),
            min_off_ms: ms(p.min_off.unwrap_or_default()),
            max_starts_per_hour: p.max_starts_per_hour.unwrap_or_default(),
            remote_lease_max_ms: ms(p.remote_lease_max.unwrap_or_default()),
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
    fn an_interlock_may_not_take_the_actuator_latchs_name() {
        let e = errors(&GOOD.replace("id = \"dry_run\"", "id = \"actuator\""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("pump.0.interlock.0.id: \"actuator\" is the name of the latch"),
            "{e:?}"
        );
    }

    #[test]
    fn the_duty_cycle_check_budgets_starts_stops_and_re_sends_not_only_refreshes() {
        let with = |actuator: &str, starts: u32| {
            GOOD.replace("version = 1\n", &format!("version = 1\n{ACTUATOR}"))
                .replace(
                    "actuator = { kind = \"simulated\", file = \"relay.jsonl\" }",
                    actuator,
                )
                .replace(
                    "max_starts_per_hour = 4",
                    &format!("max_starts_per_hour = {starts}"),
                )
        };
        // SF12 in the 10 % sub-band: two refreshes an hour are 0.06 %, but 60 starts with 10
        // re-sends each of the ON and of the OFF are 660 of each.
        let sf12 = r#"actuator = { kind = "lorawan_class_c", device = "A84041000181ABCD", fport = 1, on_hex = "05010078", off_hex = "030000", lease = "1h", refresh = "30m", feedback = "relay", retries = 10, spreading_factor = 12 }"#;
        let text = with(sf12, 60);
        let e = parse(Path::new("rules.toml"), &text, text.as_bytes())
            .unwrap_err()
            .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("pump.0.actuator: its worst hour (2 refreshes, 660 ONs and 660 OFFs")
                && e[0].contains("sub-band 869.4-869.65 MHz allows 10 %"),
            "{e:?}"
        );
        // Four starts an hour with the default three re-sends fit.
        let text = with(sf12.replace("retries = 10", "retries = 3").as_str(), 4);
        let s = parse(Path::new("rules.toml"), &text, text.as_bytes()).unwrap();
        let Actuator::LorawanClassC(c) = &s.pumps[0].actuator else {
            panic!()
        };
        let h = c.hour_cost(4);
        assert_eq!((h.refreshes, h.sends, h.alarm_offs), (2, 16, 15));
        assert!(h.share < 5.0, "{h:?}");
    }

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
    fn a_class_c_setting_out_of_range_is_not_blamed_again_for_what_depends_on_it() {
        let with = |settings: &str| {
            edit(&[
                ("version = 1\n", &format!("version = 1\n{ACTUATOR}")),
                (
                    "actuator = { kind = \"simulated\", file = \"relay.jsonl\" }",
                    &format!("actuator = {{ kind = \"lorawan_class_c\", device = \"A84041000181ABCD\", fport = 1, off_hex = \"030000\", feedback = \"relay\", {settings} }}"),
                ),
            ])
        };
        let sixty_bytes = "05".repeat(60);
        for (settings, want) in [
            // The default refresh, a quarter of this lease, is not said too short as well.
            (
                r#"on_hex = "05010078", lease = "10s""#.to_string(),
                "rules.toml:31:149: pump.0.actuator.lease: must be between 20s and 1h",
            ),
            // No payload limit, and no airtime, for an SF that does not exist.
            (
                format!(r#"on_hex = "{sixty_bytes}", lease = "2m", spreading_factor = 13"#),
                "rules.toml:31:286: pump.0.actuator.spreading_factor: must be 7 to 12",
            ),
            // A refresh too frequent is not also said to overflow the duty cycle.
            (
                r#"on_hex = "05010078", lease = "20s", refresh = "1s", spreading_factor = 12"#.to_string(),
                "rules.toml:31:166: pump.0.actuator.refresh: refresh every 1s must be at least 5s and at most half the lease (10s): one lost ON must not stop the pump",
            ),
            // No duty cycle computed for a frequency outside the band.
            (
                r#"on_hex = "05010078", lease = "2m", frequency_hz = 900000000"#.to_string(),
                "rules.toml:31:170: pump.0.actuator.frequency_hz: must be in the EU868 band (863 to 870 MHz)",
            ),
        ] {
            assert_eq!(errors(&with(&settings)), [want], "{settings}");
        }
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
        // The interlock's sensor is unknown: its hysteresis is checked all the same.
        assert_eq!(
            errors(&bad),
            [
                "rules.toml:19:13: sensor.0.max_stepp: unknown field `max_stepp`, expected one of `id`, `device`, `field`, `valid_range`, `max_age`, `max_step`, `stuck_samples`",
                "rules.toml:26:11: pump.0.min_run: must be shorter than max_run (2h)",
                "rules.toml:33:12: pump.0.interlock.0.sensor: \"levle\" is not a [[sensor]] (known: level)",
                "rules.toml:35:14: pump.0.interlock.0.reset_at: a trip below 0.4 resets above it: reset_at must be greater than trip_below (hysteresis)",
                "rules.toml:40:14: pump.0.auto.start_at: mode \"empty\" starts on a high level: start_at must be above stop_at",
            ]
        );
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

    /// `GOOD` with each replacement made (each must apply).
    fn edit(replacements: &[(&str, &str)]) -> String {
        let mut text = GOOD.to_string();
        for (from, to) in replacements {
            assert!(text.contains(from), "{from:?} is not in GOOD");
            text = text.replacen(from, to, 1);
        }
        text
    }

    #[test]
    fn a_layout_type_that_does_not_exist_is_one_error_on_its_field() {
        assert_eq!(
            errors(&edit(&[("type = \"u16\"", "type = \"u17\"")])),
            [
                "rules.toml:9:10: device.0.field.0.type: unknown variant `u17`, expected one of `u8`, `i8`, `u16`, `i16`, `u32`, `i32`, `f32`"
            ]
        );
    }

    #[test]
    fn a_duration_that_does_not_parse_is_one_error_on_its_field() {
        assert_eq!(
            errors(&edit(&[("max_age = \"25m\"", "max_age = \"8 parsecs\"")])),
            [
                "rules.toml:17:11: sensor.0.max_age: \"8 parsecs\" is not a duration like \"500ms\", \"30s\" or \"2h\" (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations))"
            ]
        );
    }

    #[test]
    fn an_interlock_on_an_unknown_sensor_still_has_its_hysteresis_checked() {
        assert_eq!(
            errors(&edit(&[
                ("sensor = \"level\"\n  trip_below", "sensor = \"levle\"\n  trip_below"),
                ("reset_at = 0.60", "reset_at = 0.30"),
                ("sensor = \"level\"\n  mode", "sensor = \"lvl\"\n  mode"),
                ("start_at = 2.5", "start_at = 0.5"),
            ])),
            [
                "rules.toml:32:12: pump.0.interlock.0.sensor: \"levle\" is not a [[sensor]] (known: level)",
                "rules.toml:34:14: pump.0.interlock.0.reset_at: a trip below 0.4 resets above it: reset_at must be greater than trip_below (hysteresis)",
                "rules.toml:37:12: pump.0.auto.sensor: \"lvl\" is not a [[sensor]] (known: level)",
                "rules.toml:39:14: pump.0.auto.start_at: mode \"empty\" starts on a high level: start_at must be above stop_at",
            ]
        );
    }

    /// Replacements made in `GOOD`, and the errors the file must give, exactly.
    type Case = (
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    );

    /// One mistake, one error: a refused value is neither "missing" nor checked again, and what
    /// depends on it (a sensor on its device, a threshold on its sensor's range, `min_run` on
    /// `max_run`) is not blamed for it.
    #[test]
    fn each_mistake_is_reported_once_and_invents_no_other() {
        let cases: [Case; 11] = [
            (
                &[("valid_range = [0.0, 4.0]", "valid_range = [0.0, \"x\"]")],
                &["rules.toml:16:21: sensor.0.valid_range.1: invalid type: string \"x\", expected a number"],
            ),
            (
                &[("valid_range = [0.0, 4.0]", "valid_range = [4.0, 0.0]")],
                &["rules.toml:16:15: sensor.0.valid_range: [4, 0] is not a range (low first, both numbers)"],
            ),
            (
                &[("decoder = \"layout\"", "decoder = \"cayene\"")],
                &["rules.toml:5:11: device.0.decoder: unknown variant `cayene`, expected `layout` or `cayenne_lpp`"],
            ),
            (
                &[("dev_eui = \"70B3D57ED0001A01\"", "dev_eui = 5")],
                &["rules.toml:4:11: device.0.dev_eui: invalid type: integer `5`, expected a string"],
            ),
            (
                &[("id = \"level\"", "id = 5")],
                &["rules.toml:13:6: sensor.0.id: invalid type: integer `5`, expected a string"],
            ),
            (
                &[("name = \"water_level_m\"", "name = [\"water_level_m\"]")],
                &["rules.toml:7:10: device.0.field.0.name: invalid type: sequence, expected a string"],
            ),
            (
                &[("kind = \"simulated\"", "kind = \"relay\"")],
                &["rules.toml:23:21: pump.0.actuator.kind: unknown variant `relay`, expected one of `gpio`, `simulated`, `lorawan_class_c`"],
            ),
            (
                &[("trip_below = 0.40", "trip_below = \"low\"")],
                &["rules.toml:33:16: pump.0.interlock.0.trip_below: invalid type: string \"low\", expected a number"],
            ),
            (
                &[("max_run = \"2h\"", "max_run = \"0s\"")],
                &["rules.toml:24:11: pump.0.max_run: must be between 1s and 7d"],
            ),
            (
                &[("mode = \"empty\"", "mode = \"drain\"")],
                &["rules.toml:38:10: pump.0.auto.mode: unknown variant `drain`, expected `empty` or `fill`"],
            ),
            // Keys really missing are each named, on their table, and hide nothing either.
            (
                &[("  offset = 0\n  type = \"u16\"\n", ""), ("reset_at = 0.60", "reset_at = 0.30")],
                &[
                    "rules.toml:6:3: device.0.field.0: missing field `offset`",
                    "rules.toml:6:3: device.0.field.0: missing field `type`",
                    "rules.toml:32:14: pump.0.interlock.0.reset_at: a trip below 0.4 resets above it: reset_at must be greater than trip_below (hysteresis)",
                ],
            ),
        ];
        for (replacements, want) in cases {
            assert_eq!(errors(&edit(replacements)), want, "{replacements:?}");
        }
    }
}
