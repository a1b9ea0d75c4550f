//! Loading: several files merged in order, then `--set section.key=value` overrides, then typed
//! deserialisation and validation. Every error names where it comes from: file, line and column
//! of the offending value (or `--set`), and the dotted field.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Backend, Config, Invalid};

/// One problem, located.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// `file:line:col`, `file`, or `--set field=value`.
    pub origin: String,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}: {}", self.origin, field, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// All problems found, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        write!(f, "{} error(s) in the configuration", self.0.len())
    }
}

impl std::error::Error for ConfigErrors {}

struct Source {
    path: PathBuf,
    text: String,
}

struct Override {
    field: String,
    raw: String,
}

/// What the binary links, which decides the radio backends it can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linked {
    Simulator,
    /// ChirpStack's V2.1.0r9 (or a library that needs no temperature sensor).
    Libloragw,
    /// Semtech's upstream V2.1.0: boards without the STTS751 never start.
    LibloragwUpstream,
}

/// The simulator file when `radio.backend` is left out on a simulator build.
pub const DEFAULT_SIMULATOR_FILE: &str = "simulator.toml";

/// A configuration file larger than this is refused before it is read: a real one is a few KiB,
/// and parsing a huge one costs seconds and gigabytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a text file of at most `MAX_FILE_BYTES`, whatever its reported size (a device such as
/// /dev/zero reports 0 and never ends).
pub fn read_capped(path: &std::path::Path) -> std::io::Result<String> {
    let bytes = crate::files::read_bounded(path, MAX_FILE_BYTES)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::other("not UTF-8 text: is this a configuration file?"))
}

/// Fields whose value is never printed, whatever is wrong with it.
pub const SECRET_FIELDS: [&str; 1] = ["mqtt.password"];

/// `table` with the value of every secret field replaced: what may be shown to the centre.
pub fn redacted(table: &toml::Table) -> toml::Table {
    fn hide(t: &mut toml::Table, path: &[&str]) {
        match path {
            [] => {}
            [last] => {
                if t.contains_key(*last) {
                    t.insert(last.to_string(), toml::Value::String("(hidden)".into()));
                }
            }
            [first, rest @ ..] => {
                if let Some(next) = t.get_mut(*first).and_then(|v| v.as_table_mut()) {
                    hide(next, rest);
                }
            }
        }
    }
    let mut t = table.clone();
    for field in SECRET_FIELDS {
        hide(&mut t, &field.split('.').collect::<Vec<_>>());
    }
    t
}

fn is_secret(field: &str) -> bool {
    SECRET_FIELDS.contains(&field)
}

/// A `--set` as it may be shown: the value of a secret field is hidden.
fn shown_set(set: &str) -> String {
    let field = set.split_once('=').map(|(f, _)| f).unwrap_or(set).trim();
    if SECRET_FIELDS.iter().any(|s| field.starts_with(s)) {
        format!("--set {field}=(hidden)")
    } else if has_userinfo(set) {
        // `scheme://user:password@host`: whatever the field, the credentials are not printed.
        format!("--set {field}=(not shown: it holds credentials)")
    } else {
        format!("--set {set}")
    }
}

/// Whether a value holds a URL with credentials (`scheme://…@host`).
fn has_userinfo(value: &str) -> bool {
    value.split("://").skip(1).any(|rest| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        authority.contains('@')
    })
}

/// What the stages say about their part of a configuration (`check.rs` asks them): problems
/// of fields (located here like the others), notes for the operator, and problems already
/// located in the files they read (`file:line:col: why`).
#[derive(Debug, Default)]
pub struct StageReport {
    pub invalid: Vec<Invalid>,
    pub notes: Vec<String>,
    pub located: Vec<String>,
}

/// The files to load: `files`, then the centre's changes (`ops.remote_config`, as the files and
/// `sets` name it) when that file exists. Read leniently: a broken file is `load`'s to report.
pub fn layers(files: &[PathBuf], sets: &[String]) -> Vec<PathBuf> {
    let mut out = files.to_vec();
    if let Some(r) = remote_config_path(files, sets) {
        if r.is_file() && !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// `ops.remote_config` as the files and `sets` name it (absolute paths only).
pub fn remote_config_path(files: &[PathBuf], sets: &[String]) -> Option<PathBuf> {
    let mut merged = toml::Table::new();
    for path in files {
        if let Some(t) = read_capped(path)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
        {
            merge(&mut merged, t);
        }
    }
    for set in sets {
        if let Ok((field, value)) = parse_set(set) {
            insert(&mut merged, &field, value);
        }
    }
    let remote = merged
        .get("ops")
        .and_then(|o| o.get("remote_config"))
        .and_then(|v| v.as_str())
        .map(PathBuf::from);
    remote.filter(|r| r.is_absolute())
}

/// Merges `files` and `sets`, checks the configuration's own values, then asks `stages` about
/// theirs (told whether the values passed, so that a stage need not read files named by a
/// broken configuration). `linked`: the build the configuration runs on, which decides the
/// radio backend when it is left out (`None`: a gateway build's default).
pub fn load(
    files: &[PathBuf],
    sets: &[String],
    linked: Option<Linked>,
    stages: impl FnOnce(&Config, bool) -> StageReport,
) -> Result<(Config, Vec<String>), ConfigErrors> {
    load_with(files, sets, linked, stages)
}

fn load_with(
    files: &[PathBuf],
    sets: &[String],
    linked: Option<Linked>,
    stages: impl FnOnce(&Config, bool) -> StageReport,
) -> Result<(Config, Vec<String>), ConfigErrors> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    let mut merged = toml::Table::new();
    for path in files {
        let text = match read_capped(path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ConfigError {
                    origin: path.display().to_string(),
                    field: None,
                    message: e.to_string(),
                });
                continue;
            }
        };
        match text.parse::<toml::Table>() {
            Ok(table) => merge(&mut merged, table),
            Err(e) => errors.push(ConfigError {
                origin: at(path, &text, e.span().map(|s| s.start)),
                field: e.span().and_then(|s| key_at(&text, s.start)),
                message: syntax_message(&text, &e),
            }),
        }
        sources.push(Source {
            path: path.clone(),
            text,
        });
    }
    let mut overrides = Vec::new();
    for set in sets {
        match parse_set(set) {
            Ok((field, value)) => {
                insert(&mut merged, &field, value);
                overrides.push(Override {
                    field,
                    raw: shown_set(set),
                });
            }
            Err(message) => errors.push(ConfigError {
                origin: shown_set(set),
                field: None,
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let locate = |field: &str| -> String {
        if let Some(o) = overrides.iter().rev().find(|o| {
            o.field == field
                || field.starts_with(&format!("{}.", o.field))
                || o.field.starts_with(&format!("{field}."))
        }) {
            return o.raw.clone();
        }
        for s in sources.iter().rev() {
            if let Some(offset) = find_field(&s.text, field) {
                return at(&s.path, &s.text, Some(offset));
            }
        }
        // A missing field: point at its table if a file has it.
        let parent = field.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        for s in sources.iter().rev() {
            if let Some(offset) = find_field(&s.text, parent) {
                return at(&s.path, &s.text, Some(offset));
            }
        }
        sources
            .last()
            .map(|s| s.path.display().to_string())
            .unwrap_or_else(|| "(defaults)".into())
    };

    // serde stops at the first problem: `deserialize_all` reports it, takes the offending key out
    // (its default applies) and goes again, so that every unknown key and every wrong type is
    // reported at once.
    let source = merged.clone();
    let (config, problems) = deserialize_all::<Config>(merged, is_secret);
    let mut typed: Vec<ConfigError> = problems
        .into_iter()
        .map(|(field, message)| ConfigError {
            origin: locate(&field),
            field: Some(field),
            message,
        })
        .collect();
    let Some(mut config) = config else {
        return Err(ConfigErrors(typed));
    };
    config.source = source;
    let reported: Vec<String> = typed.iter().filter_map(|e| e.field.clone()).collect();

    // Paths in a file are relative to that file.
    let base_of = |field: &str| -> PathBuf {
        if overrides.iter().any(|o| o.field == field) {
            return PathBuf::from(".");
        }
        sources
            .iter()
            .rev()
            .find(|s| find_field(&s.text, field).is_some())
            .and_then(|s| s.path.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    };
    config.radio.backend = match (config.radio.backend_setting, linked) {
        (Some(b), _) => b,
        (None, Some(Linked::Simulator)) => Backend::Simulator,
        (None, _) => Backend::Sx1302,
    };
    // The simulator package ships its simulator file beside the configuration.
    if config.radio.backend_setting.is_none()
        && config.radio.backend == Backend::Simulator
        && config.radio.simulator.is_none()
    {
        let dir = files
            .last()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.radio.simulator = Some(dir.join(DEFAULT_SIMULATOR_FILE));
    }
    if let Some(sim) = &config.radio.simulator {
        if sim.is_relative() {
            config.radio.simulator = Some(base_of("radio.simulator").join(sim));
        }
    }
    // An empty path stays empty for `validate` to refuse (joined, it would be the config's
    // own directory).
    if config.store.path.is_relative() && !config.store.path.as_os_str().is_empty() {
        config.store.path = base_of("store.path").join(&config.store.path);
    }

    if let Some(p) = &config.mqtt.password_file {
        if p.is_relative() {
            config.mqtt.password_file = Some(base_of("mqtt.password_file").join(p));
        }
    }
    if let Some(tls) = &mut config.mqtt.tls {
        for (field, path) in [
            ("mqtt.tls.ca_file", &mut tls.ca_file),
            ("mqtt.tls.cert_file", &mut tls.cert_file),
            ("mqtt.tls.key_file", &mut tls.key_file),
        ] {
            if let Some(p) = path {
                if p.is_relative() {
                    *p = base_of(field).join(&*p);
                }
            }
        }
    }

    if let Some(r) = &mut config.rules {
        if r.file.is_relative() {
            r.file = base_of("rules.file").join(&r.file);
        }
        if r.keys_file.is_relative() {
            r.keys_file = base_of("rules.keys_file").join(&r.keys_file);
        }
    }

    let mut invalid = config.validate();
    let report = stages(&config, invalid.is_empty() && typed.is_empty());
    invalid.extend(report.invalid);
    let notes = report.notes;
    let rule_errors = report.located;
    // A field whose value was refused above is checked as its default here: not twice.
    typed.extend(
        invalid
            .into_iter()
            .filter(|i| !reported.contains(&i.field))
            .map(|i| ConfigError {
                origin: locate(&i.field),
                field: Some(i.field),
                message: i.message,
            }),
    );
    // Already `file:line:col: field: message`.
    typed.extend(rule_errors.into_iter().map(|line| {
        let (origin, message) = line.split_once(": ").unwrap_or(("rules", line.as_str()));
        ConfigError {
            origin: origin.to_string(),
            field: None,
            message: message.to_string(),
        }
    }));
    if !typed.is_empty() {
        // In file order (files as given, then --set), line by line.
        typed.sort_by_key(|e| {
            let mut parts = e.origin.rsplitn(3, ':');
            let col = parts.next().and_then(|c| c.parse::<usize>().ok());
            let line = parts.next().and_then(|l| l.parse::<usize>().ok());
            let file = parts.next().unwrap_or(&e.origin);
            let rank = files
                .iter()
                .position(|f| f.display().to_string() == file)
                .unwrap_or(files.len());
            (rank, line.zip(col).unwrap_or((usize::MAX, 0)))
        });
        return Err(ConfigErrors(typed));
    }
    Ok((config, notes))
}

/// serde's message without the values it quotes (`integer \`5\``): for secret fields.
fn hide_values(message: &str) -> String {
    let mut out = String::new();
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first.trim_end());
    }
    // Odd parts are quoted values: dropped.
    for (i, part) in parts.enumerate() {
        if i % 2 == 1 {
            out.push_str(part);
        }
    }
    out
}

/// Removes a dotted key (numeric parts index arrays); false if it is not there (nothing more
/// can be learnt by retrying).
fn remove(table: &mut toml::Table, field: &str) -> bool {
    let mut parts: Vec<&str> = field.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut t = table;
    let mut pending_array: Option<&str> = None;
    for p in parts {
        if let Some(key) = pending_array.take() {
            let Ok(i) = p.parse::<usize>() else {
                return false;
            };
            match t
                .get_mut(key)
                .and_then(toml::Value::as_array_mut)
                .and_then(|a| a.get_mut(i))
                .and_then(toml::Value::as_table_mut)
            {
                Some(inner) => t = inner,
                None => return false,
            }
            continue;
        }
        if t.get(p).is_some_and(toml::Value::is_array) {
            pending_array = Some(p);
            continue;
        }
        match t.get_mut(p).and_then(toml::Value::as_table_mut) {
            Some(inner) => t = inner,
            None => return false,
        }
    }
    if let Some(key) = pending_array {
        // The whole element of an array: remove it from its array.
        return match (
            t.get_mut(key).and_then(toml::Value::as_array_mut),
            last.parse::<usize>(),
        ) {
            (Some(a), Ok(i)) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        };
    }
    t.remove(last).is_some()
}

/// Deserialises `table` reporting every unknown key and wrong type at once: serde stops at the
/// first, so the offending key is taken out (its default applies) and the rest tried again.
/// Fields are dotted (`pump.0.max_run`); values of fields `secret` names are not quoted.
///
/// What a removal causes is not reported: a required key taken out for its value is not also
/// "missing", nor a fixed-size array short of the element taken out; the table (or array) that
/// needs it is taken out in turn, silently. A caller that wants the rest of that table checked
/// makes such keys `Option`s and says itself which ones are missing (see `rules/file.rs`).
pub(crate) fn deserialize_all<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    secret: impl Fn(&str) -> bool,
) -> (Option<T>, Vec<(String, String)>) {
    let mut remaining = table;
    let mut problems = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        match serde_path_to_error::deserialize(toml::Value::Table(remaining.clone())) {
            Ok(v) => return (Some(v), problems),
            Err(e) => {
                let inner = e.inner().to_string();
                let mut field = dotted(&e.path().to_string());
                let in_table = |key: &str, table: &str| {
                    if table == "." || table.is_empty() {
                        key.to_string()
                    } else {
                        format!("{table}.{key}")
                    }
                };
                if let Some(key) = unknown_field(&inner) {
                    if !field.ends_with(&format!(".{key}")) && field != key {
                        field = in_table(key, &field);
                    }
                }
                let caused_here = match missing_field(&inner) {
                    Some(key) => removed.contains(&in_table(key, &field)),
                    None => removed.iter().any(|r| r.starts_with(&format!("{field}."))),
                };
                if !caused_here {
                    let message = if secret(&field) {
                        hide_values(&type_message(&inner))
                    } else {
                        with_range(&field, type_message(&inner))
                    };
                    problems.push((field.clone(), message));
                }
                if !remove(&mut remaining, &field) || problems.len() >= 100 || removed.len() >= 200
                {
                    return (None, problems);
                }
                removed.push(field);
            }
        }
    }
}

/// The key named by serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(k, _)| k)
}

/// The key named by serde's "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(k, _)| k)
}

/// Keys whose valid range is narrower than their type's: a wrong value names that range, not
/// the type's (validated in `Config::problems` with the same bounds).
const NARROWER: [(&str, &str); 4] = [
    ("store.max_size_mib", "a whole number from 16 to 1048576"),
    ("mqtt.inflight", "a whole number from 1 to 1000"),
    ("mqtt.command_rate_per_s", "a whole number from 1 to 10000"),
    ("mqtt.max_rate_per_s", "a whole number from 0 to 4294967295"),
];

fn with_range(field: &str, message: String) -> String {
    match NARROWER.iter().find(|(k, _)| *k == field) {
        Some((_, range)) => match message.find("expected a whole number") {
            Some(at) => format!("{}expected {range}", &message[..at]),
            None => message,
        },
        None => message,
    }
}

/// serde's message, first line, with Rust type names said as a technician would read them.
fn type_message(inner: &str) -> String {
    let first = inner.lines().next().unwrap_or_default();
    const RANGES: [(&str, &str); 10] = [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number from 0 up"),
        ("expected i8", "expected a whole number from -128 to 127"),
        (
            "expected i16",
            "expected a whole number from -32768 to 32767",
        ),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ];
    let mut out = first.to_string();
    for (rust, words) in RANGES {
        if out.ends_with(rust) {
            out = format!("{}{words}", &out[..out.len() - rust.len()]);
        }
    }
    out.replace("expected a boolean", "expected true or false")
}

/// The dotted key whose value starts the line at `offset` (`[section]` headers above it
/// included), for syntax errors in a value: the parser names none.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = before[line_start..].split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let section = before[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && !l.starts_with("[[")).then(|| l.trim_matches(['[', ']']).trim())
    });
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// toml's syntax message, naming the key where it does not (a duplicate key says only "duplicate
/// key").
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_string();
    // TOML integers are 64-bit signed: the parser's words for a larger one name Rust types.
    if message.contains("value was too large") || message.contains("as i128") {
        return "a whole number too large for TOML (at most 9223372036854775807)".into();
    }
    if message.starts_with("duplicate key") && !message.contains('`') {
        if let Some(span) = e.span() {
            let key = text.get(span).unwrap_or("").trim();
            if !key.is_empty() {
                return format!("duplicate key `{key}`: it is already set above");
            }
        }
    }
    message
}

/// Tables merge key by key; any other value replaces.
pub fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn parse_set(set: &str) -> Result<(String, toml::Value), String> {
    let (field, raw) = set
        .split_once('=')
        .ok_or_else(|| "expected section.key=value".to_string())?;
    let field = field.trim();
    if field.is_empty() || field.split('.').any(|p| p.is_empty()) {
        return Err(format!("{field:?} is not a dotted key like mqtt.server"));
    }
    let raw = raw.trim();
    // A TOML value if it parses as one (numbers, booleans, quoted strings, arrays), else a string.
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((field.to_string(), value))
}

fn insert(table: &mut toml::Table, field: &str, value: toml::Value) {
    let mut parts: Vec<&str> = field.split('.').collect();
    let last = parts.pop().expect("non-empty");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_string(), value);
}

/// Byte offset of a dotted field's value (or table) in a TOML text. A numeric part indexes an
/// array (`pump.0.interlock.1.trip_below`; serde's `pump[0]` is written so by `dotted`).
pub(crate) fn find_field(text: &str, field: &str) -> Option<usize> {
    if field.is_empty() {
        return None;
    }
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item: toml_edit::Item = doc.as_item().clone();
    let mut span = None;
    for part in field.split('.') {
        if let Ok(i) = part.parse::<usize>() {
            let next = match &item {
                toml_edit::Item::ArrayOfTables(a) => {
                    let t = a.get(i)?;
                    span = t.span().or(span);
                    toml_edit::Item::Table(t.clone())
                }
                toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                    let v = a.get(i)?;
                    span = v.span().or(span);
                    toml_edit::Item::Value(v.clone())
                }
                _ => return None,
            };
            item = next;
            continue;
        }
        let (key, value) = item.as_table_like()?.get_key_value(part)?;
        span = value.span().or_else(|| key.span());
        if let Some(t) = value.as_table() {
            // A [table] header has no value span: point at its header.
            span = span.or_else(|| t.span()).or_else(|| key.span());
        }
        let value = value.clone();
        item = value;
    }
    span.map(|s| s.start)
}

/// serde_path_to_error's `pump[0].interlock[1].id` as `pump.0.interlock.1.id`.
pub(crate) fn dotted(path: &str) -> String {
    path.replace('[', ".").replace(']', "")
}

pub(crate) fn at(path: &Path, text: &str, offset: Option<usize>) -> String {
    match offset {
        Some(o) => {
            let before = &text[..o.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("{}:{line}:{col}", path.display())
        }
        None => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_with_credentials_in_a_url_is_not_shown() {
        let shown = shown_set("mqtt.server=mqtt://gw:hunter2@127.0.0.1:1883");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.starts_with("--set mqtt.server="), "{shown}");
        assert_eq!(shown_set("stats.interval=5s"), "--set stats.interval=5s");
        assert_eq!(
            shown_set("mqtt.server=tcp://host:1883/a@b"),
            "--set mqtt.server=tcp://host:1883/a@b"
        );
    }
}
