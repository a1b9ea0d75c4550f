//! What drives a pump: a GPIO relay (gpiocdev), or a simulated relay that records every
//! transition with its time (tests, demonstrations). Behind one trait, so the stage does not
//! know which.
//!
//! The GPIO line is requested at start, de-energised, and held for the life of the process;
//! `all_off` drives every actuator to its safe state from any thread (panic hook, watchdog,
//! shutdown), without waiting on the rules stage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use gpiocdev::line::Value;

use super::file::Actuator as Spec;

pub trait Actuator: Send {
    /// Energise (`true`) or de-energise the pump's drive. `cause`: when the radio handed over
    /// the frame that led to it, if one did (a Class C frame carries it to its hand-off, where
    /// the reaction time is logged).
    fn set(&mut self, on: bool, cause: Option<std::time::Instant>) -> Result<(), String>;
}

/// A relay on one GPIO line; active = run.
pub struct GpioRelay {
    request: gpiocdev::Request,
    line: u32,
}

impl GpioRelay {
    pub fn open(chip: &Path, line: u32, active_low: bool, pump: &str) -> Result<GpioRelay, String> {
        let mut b = gpiocdev::Request::builder();
        b.on_chip(chip)
            .with_consumer(format!("lora-edge pump {pump}"))
            .with_line(line)
            .as_output(Value::Inactive);
        if active_low {
            b.as_active_low();
        }
        let request = b
            .request()
            .map_err(|e| format!("{} line {line}: {e}", chip.display()))?;
        Ok(GpioRelay { request, line })
    }
}

impl Actuator for GpioRelay {
    fn set(&mut self, on: bool, _cause: Option<std::time::Instant>) -> Result<(), String> {
        let v = if on { Value::Active } else { Value::Inactive };
        self.request
            .set_value(self.line, v)
            .map_err(|e| format!("line {}: {e}", self.line))
    }
}

/// Appends `{"at_ms":…,"pump":…,"on":…}` lines to a file (kept open: a relay is one call).
pub struct Simulated {
    path: PathBuf,
    file: std::fs::File,
    pump: String,
}

impl Simulated {
    pub fn open(path: &Path, pump: &str) -> Result<Simulated, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Simulated {
            path: path.to_path_buf(),
            file,
            pump: pump.into(),
        })
    }
}

impl Actuator for Simulated {
    fn set(&mut self, on: bool, _cause: Option<std::time::Instant>) -> Result<(), String> {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = format!(
            "{}\n",
            serde_json::json!({"at_ms": at_ms, "pump": self.pump, "on": on})
        );
        // One write: a reader never sees half a line.
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// The one place every command to a pump passes, whoever sends it (an engine decision, a Class C
/// refresh or re-send, the emergency paths): it remembers the engine's latest decision and
/// refuses an ON unless that decision is run. A state machine that still wants ON after the
/// engine said stop (a re-send scheduled before an alarm, a refresh racing a stop) can then never
/// start the pump: the invariant lives here, not in each caller.
pub struct Gate {
    /// The engine's latest decision for this pump; false at boot and after any emergency stop.
    run: bool,
    actuator: Box<dyn Actuator>,
}

/// Why a command did not reach the pump.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// An ON while the engine's decision is stop: not sent.
    #[error("ON not sent: the rules' decision for this pump is stop")]
    DecisionIsStop,
    /// The actuator itself failed (GPIO error, the downlink stage did not take the frame).
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
thread_local! {
    /// Test-only switch that removes the gate's check, to prove that the property test of
    /// `rules::tests` catches its absence. Never set outside tests.
    pub(crate) static GATE_DISABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Gate {
    pub fn new(actuator: Box<dyn Actuator>) -> Gate {
        Gate {
            run: false,
            actuator,
        }
    }

    /// The engine decided: the decision is recorded, then carried out.
    pub fn decide(&mut self, on: bool, cause: Option<std::time::Instant>) -> Result<(), Refused> {
        self.run = on;
        self.actuator.set(on, cause).map_err(Refused::Failed)
    }

    /// The current command again (a refresh, a re-send): an ON only while the decision is run.
    pub fn repeat(&mut self, on: bool) -> Result<(), Refused> {
        #[cfg(test)]
        let disabled = GATE_DISABLED.with(|g| g.get());
        #[cfg(not(test))]
        let disabled = false;
        if on && !self.run && !disabled {
            return Err(Refused::DecisionIsStop);
        }
        self.actuator.set(on, None).map_err(Refused::Failed)
    }

    /// The safe state, from any path: the decision becomes stop, so nothing turns it on again
    /// until the engine decides run.
    pub fn safe(&mut self) -> Result<(), String> {
        self.run = false;
        self.actuator.set(false, None)
    }
}

/// A pump's id and its gate.
pub type Entry = (String, Arc<Mutex<Gate>>);

/// The actuators of every pump — and of pumps a reload removed, held in their safe state for
/// the life of the process — shared with the emergency paths. The rules stage replaces the
/// list when a reload adds or removes pumps: a swap of pointers under the lock, nothing else.
#[derive(Default)]
pub struct Registry(std::sync::RwLock<Vec<Entry>>);

pub type Shared = Arc<Registry>;

impl Registry {
    pub fn new(entries: Vec<Entry>) -> Shared {
        Arc::new(Registry(std::sync::RwLock::new(entries)))
    }

    pub fn replace(&self, entries: Vec<Entry>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    /// The list now, never waiting long: a reader stuck or panicking does not block it (a
    /// poisoned lock is taken over), and a swap holds the lock for a pointer copy.
    pub(crate) fn snapshot(&self) -> Vec<Entry> {
        for _ in 0..1000 {
            match self.0.try_read() {
                Ok(g) => return g.clone(),
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner().clone(),
                Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
            }
        }
        tracing::error!("ALARM: the actuator list is being replaced and could not be read");
        Vec::new()
    }
}

/// Opens a Class C actuator: its key (stable across reloads), pump id, settings.
pub type OpenClassC<'a> =
    dyn FnMut(usize, &str, &super::file::ClassC) -> Result<Box<dyn Actuator>, String> + 'a;

/// Opens a pump's actuator, driven to its safe state (off) at once. `key`: what its Class C
/// frames are tagged with (stable across reloads).
pub fn open(key: usize, id: &str, spec: &Spec, class_c: &mut OpenClassC) -> Result<Entry, String> {
    let entry = open_unarmed(key, id, spec, class_c)?;
    entry
        .1
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .safe()
        .map_err(|e| format!("pump {id}: {e}"))?;
    Ok(entry)
}

/// Opens a pump's actuator without driving it (a GPIO line is requested de-energised; a Class
/// C actuator sends nothing yet): for a reload that may still be refused. `safe()` it once
/// every actuator of the reload has opened.
pub fn open_unarmed(
    key: usize,
    id: &str,
    spec: &Spec,
    class_c: &mut OpenClassC,
) -> Result<Entry, String> {
    let a: Box<dyn Actuator> = match spec {
        Spec::Gpio {
            chip,
            line,
            active_low,
        } => Box::new(GpioRelay::open(chip, *line, *active_low, id)?),
        Spec::Simulated { file } => Box::new(Simulated::open(file, id)?),
        Spec::LorawanClassC(c) => class_c(key, id, c).map_err(|e| format!("pump {id}: {e}"))?,
    };
    Ok((id.to_string(), Arc::new(Mutex::new(Gate::new(a)))))
}

/// Opens every pump's actuator (keys 0, 1, …), each driven to its safe state at once.
pub fn open_all(pumps: &[(String, Spec)], class_c: &mut OpenClassC) -> Result<Vec<Entry>, String> {
    pumps
        .iter()
        .enumerate()
        .map(|(i, (id, spec))| open(i, id, spec, class_c))
        .collect()
}

/// Every pump to its safe state, from any thread. A lock held by a thread that is stuck or
/// panicking is not waited for: its guard is taken over (`into_inner`) when poisoned, and
/// skipped (and said) when merely held.
pub fn all_off(actuators: &Shared, why: &str) {
    for (id, a) in actuators.snapshot().iter() {
        let guard = match a.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        match guard {
            Some(mut g) => match g.safe() {
                Ok(()) => {
                    tracing::error!(pump = %id, %why, "ALARM: pump commanded to its safe state (off)")
                }
                Err(e) => {
                    tracing::error!(pump = %id, %why, error = %e, "ALARM: could not drive the pump off")
                }
            },
            None => {
                tracing::error!(pump = %id, %why, "ALARM: the pump's actuator is busy; it could not be driven off from here")
            }
        }
    }
}
