//! Loading: several files merged in order, then `--set section.key=value` overrides, then typed
//! deserialisation and validation. Every error names where it comes from: file, line and column
//! of the offending value (or `--set`), and the dotted field.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Config;

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

pub fn load(files: &[PathBuf], sets: &[String]) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    let mut merged = toml::Table::new();
    for path in files {
        let text = match std::fs::read_to_string(path) {
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
                field: None,
                message: e.message().trim().to_string(),
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
                    raw: set.clone(),
                });
            }
            Err(message) => errors.push(ConfigError {
                origin: format!("--set {set}"),
                field: None,
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let locate = |field: &str| -> String {
        if let Some(o) = overrides
            .iter()
            .rev()
            .find(|o| o.field == field || field.starts_with(&format!("{}.", o.field)))
        {
            return format!("--set {}", o.raw);
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

    let mut config: Config =
        match serde_path_to_error::deserialize(toml::Value::Table(merged.clone())) {
            Ok(c) => c,
            Err(e) => {
                let field = e.path().to_string();
                // The value deserialiser appends "in `section`": the field already says it.
                let message = e
                    .inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                return Err(ConfigErrors(vec![ConfigError {
                    origin: locate(&field),
                    field: Some(field),
                    message,
                }]));
            }
        };

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
    if let Some(sim) = &config.radio.simulator {
        if sim.is_relative() {
            config.radio.simulator = Some(base_of("radio.simulator").join(sim));
        }
    }
    if config.store.path.is_relative() {
        config.store.path = base_of("store.path").join(&config.store.path);
    }

    let invalid = config.validate();
    if !invalid.is_empty() {
        return Err(ConfigErrors(
            invalid
                .into_iter()
                .map(|i| ConfigError {
                    origin: locate(&i.field),
                    field: Some(i.field),
                    message: i.message,
                })
                .collect(),
        ));
    }
    Ok(config)
}

fn merge(into: &mut toml::Table, from: toml::Table) {
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

/// Byte offset of a dotted field's value (or table) in a TOML text.
fn find_field(text: &str, field: &str) -> Option<usize> {
    if field.is_empty() {
        return None;
    }
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    for part in field.split('.') {
        let (key, value) = item.as_table_like()?.get_key_value(part)?;
        span = value.span().or_else(|| key.span());
        if let Some(t) = value.as_table() {
            // A [table] header has no value span: point at its header.
            span = span.or_else(|| t.span()).or_else(|| key.span());
        }
        item = value;
    }
    span.map(|s| s.start)
}

fn at(path: &Path, text: &str, offset: Option<usize>) -> String {
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
        match load(files, &sets) {
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
    fn a_store_budget_too_small_for_sled_is_refused_with_the_reason() {
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
                "{}:3:14: mqtt.keep_alive: must be at least 5s",
                b.display()
            )]
        );
        let cfg = load(
            &[a.clone(), b.clone()],
            &[
                "mqtt.keep_alive=\"9s\"".into(),
                "mqtt.server=tcp://h:1".into(),
            ],
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
}
