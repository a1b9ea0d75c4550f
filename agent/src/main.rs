//! `lora-edge`: command line and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use lora_edge::backhaul::Backhaul;
use lora_edge::check;
use lora_edge::config::{self, Config};
use lora_edge::downlink::transmitter::{self, Transmitter};
use lora_edge::downlink::validate::TxLimits;
use lora_edge::downlink::Downlinks;
use lora_edge::events::{Body, Event};
use lora_edge::ops::counters::Counters;
use lora_edge::ops::state::{sha256_hex, HealthReporter};
use lora_edge::ops::stats::StatsReporter;
use lora_edge::radio::hal::Concentrator;
use lora_edge::radio::{Radio, RadioSettings};
use lora_edge::store::{Opened, Queue, QueueOptions, StoreError, Writer};
use lora_edge::uplink::{CrcFilter, Uplinks};

#[derive(Parser)]
#[command(
    name = "lora-edge",
    version,
    about = "LoRa concentrator gateway daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Configuration file; repeat to merge several, later ones win.
    #[arg(short = 'c', long = "config", required = true)]
    config: Vec<PathBuf>,
    /// Override one value: `--set section.key=value` (TOML value, or a bare string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(ConfigArgs),
    /// Validate the configuration and explain every error; non-zero exit status if any.
    Check(ConfigArgs),
}

/// Events waiting for the store (frames wait in the radio's hand-off before that). The channel
/// touches every slot at creation (152 bytes each): 8192 cost 1.2 MB of resident memory for a
/// queue the writer keeps near empty (it takes up to 512 per append); 2048 still holds a burst of
/// 1000 downlink answers with room to spare.
const EVENT_QUEUE: usize = 2048;
/// Downlink commands waiting for validation (a burst of 1000 must all be answered).
const DOWNLINK_QUEUE: usize = 4096;
/// Frames for the rules stage: sensors report every few minutes; a burst beyond this is counted.
const RULES_QUEUE: usize = 256;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // `--version` names the HAL inside: a gateway build and a simulator build must not be
    // mistaken for each other.
    let hal = Concentrator::describe_linked();
    let version = format!("{} (HAL: {hal})", env!("CARGO_PKG_VERSION"));
    let matches = Cli::command()
        .version(&*Box::leak(version.into_boxed_str()))
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // The original stderr even after `run` captures fd 2 (radio/library_output.rs).
        .with_writer(lora_edge::radio::library_output::LogWriter::default)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Check(args) => {
            let files = config::layers(&args.config, &args.set);
            match check::configuration(&files, &args.set, Some(linked()), check::Depth::Files) {
                Ok((cfg, notes)) => {
                    if let Some(remote) = files.get(args.config.len()) {
                        println!(
                            "note: includes the changes the centre applied, {} (ops.remote_config)",
                            remote.display()
                        );
                    }
                    for note in notes {
                        println!("{note}");
                    }
                    if cfg.mqtt.password.is_some() {
                        println!(
                        "note: mqtt.password is in the configuration; mqtt.password_file (mode \
                         0600) keeps it out of copies of this file"
                    );
                    }
                    println!(
                    "ok: gateway {}, board {}, backend {:?}, HAL {}, plan {}, mqtt {}, store {}",
                    cfg.gateway.id.as_deref().unwrap_or(
                        "(not set: kept from an earlier start, else the concentrator's EUI, else derived from this machine)"
                    ),
                    cfg.radio.board,
                    cfg.radio.backend,
                    lora_edge::radio::diagnosis::Variant::of_build().describe(),
                    cfg.region.plan,
                    cfg.mqtt.server,
                    cfg.store.path.display()
                );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            // A provisional change from the centre whose time is up is undone before the
            // configuration is read (ops/config_change.rs).
            let remote = config::remote_config_path(&args.config, &args.set);
            if let Some(r) = &remote {
                lora_edge::ops::config_change::at_start(r);
            }
            let files = config::layers(&args.config, &args.set);
            let cfg = match check::configuration(
                &files,
                &args.set,
                Some(linked()),
                check::Depth::Run,
            ) {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("{e}");
                    // The centre's changes must never keep the gateway from running: a
                    // provisional one is undone, and a kept one that no longer loads (while the
                    // gateway's own files do) is set aside.
                    let own_files_load = || {
                        check::configuration(
                            &args.config,
                            &args.set,
                            Some(linked()),
                            check::Depth::Run,
                        )
                        .is_ok()
                    };
                    if remote.as_deref().is_some_and(|r| {
                        lora_edge::ops::config_change::undo_unloadable(r, &e.to_string())
                            || (files.len() > args.config.len()
                                && own_files_load()
                                && lora_edge::ops::config_change::set_aside_unloadable(
                                    r,
                                    &e.to_string(),
                                ))
                    }) {
                        tracing::error!("the configuration change from the centre did not load: undone, running again with the previous one");
                        let e = lora_edge::ops::restart::exec_self();
                        tracing::error!(error = %e, "could not run again: exiting for the service manager to restart");
                        return ExitCode::from(75);
                    }
                    return ExitCode::from(2);
                }
            };
            // One thread for the async tasks (backhaul, stats, signals); the stages that must
            // not wait on them have their own threads. Measured: 5 MB less RSS during a drain
            // than two workers (fewer malloc arenas), and no slower (BENCHMARKS.md).
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(cfg, &args.config, &files, &args.set)) {
                Ok(()) if lora_edge::ops::restart::is_requested() => {
                    drop(runtime);
                    let e = lora_edge::ops::restart::exec_self();
                    tracing::error!(error = %e, "could not run again: exiting for the service manager to restart");
                    ExitCode::from(75)
                }
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    // A setup mistake is refused like a bad configuration.
                    match e.downcast_ref::<StoreError>() {
                        Some(s) if s.is_setup() => ExitCode::from(2),
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
    }
}

type RulesInput = Option<(
    std::sync::mpsc::SyncSender<lora_edge::rules::Input>,
    lora_edge::rules::Watch,
)>;

/// The pump-safety rules, if configured: actuators opened (every pump off), the stage and its
/// watchdog running, and a panic anywhere drives the pumps off. A rule or keys file that does
/// not load leaves the pumps unpowered and the gateway forwarding (ALARM in the log).
fn start_rules(
    cfg: &Config,
    gateway_id: &str,
    events: &std::sync::mpsc::SyncSender<Event>,
    queue: &Arc<Queue>,
    counters: &Arc<Counters>,
    stopping: &Arc<AtomicBool>,
    downlinks: &std::sync::mpsc::SyncSender<lora_edge::downlink::Input>,
) -> anyhow::Result<(RulesInput, Option<std::thread::JoinHandle<()>>)> {
    use lora_edge::rules;
    let Some(rc) = &cfg.rules else {
        return Ok((None, None));
    };
    let loaded = match rules::load(rc) {
        Ok(l) => l,
        Err(errors) => {
            for e in errors {
                tracing::error!("ALARM: rules not running, pumps not driven: {e}");
            }
            if let Ok(mut s) = counters.rules_state.lock() {
                s.insert("rules".into(), "invalid rule or keys file".into());
            }
            return Ok((None, None));
        }
    };
    let (tx, rx) = sync_channel(RULES_QUEUE);
    let (stage, watch, actuators) = match rules::Stage::new(
        loaded,
        gateway_id.to_string(),
        rx,
        events.clone(),
        queue.clone(),
        counters.clone(),
        rules::Radio {
            downlinks: downlinks.clone(),
            store_path: cfg.store.path.clone(),
        },
        rules::system_clock(),
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "ALARM: rules not running: the actuators could not be opened");
            return Ok((None, None));
        }
    };
    let previous = std::panic::take_hook();
    let on_panic = actuators.clone();
    std::panic::set_hook(Box::new(move |info| {
        rules::actuator::all_off(&on_panic, &format!("panic: {info}"));
        previous(info);
    }));
    let handle = stage.spawn(stopping.clone(), cfg.radio.realtime_priority)?;
    Ok((Some((tx, watch)), Some(handle)))
}

/// What `state/health` says about this process for its whole life.
fn health_identity(
    cfg: &Config,
    gateway_id: &str,
    files: &[PathBuf],
    sets: &[String],
) -> lora_edge::ops::state::Identity {
    // The files as they are now: what was loaded a moment ago (an edit since is not running).
    let mut all = Vec::new();
    let config_files = files
        .iter()
        .map(|f| {
            let bytes =
                lora_edge::files::read_bounded(f, config::MAX_FILE_BYTES).unwrap_or_default();
            all.extend_from_slice(&bytes);
            (f.clone(), sha256_hex(&bytes))
        })
        .collect();
    for set in sets {
        all.extend_from_slice(format!("\n--set {set}\n").as_bytes());
    }
    lora_edge::ops::state::Identity {
        gateway_id: gateway_id.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        hal: match cfg.radio.backend {
            config::Backend::SemtechUdp => format!(
                "a Semtech UDP packet forwarder (protocol 2) sending to {}",
                cfg.radio.semtech_udp.listen
            ),
            _ => Concentrator::describe_linked(),
        },
        config_files,
        config_sha256: sha256_hex(&all),
        certificate_expires: cfg
            .mqtt
            .tls
            .as_ref()
            .and_then(lora_edge::backhaul::tls::client_certificate_expiry),
    }
}

/// The gateway ID (identity.rs) and how it was chosen, or None if the agent was stopped while
/// waiting for it.
async fn choose_identity(
    cfg: &Config,
    queue: &Queue,
    counters: &Counters,
    eui_rx: &mut watch::Receiver<Option<u64>>,
) -> Option<(String, lora_edge::identity::Source)> {
    use lora_edge::identity::{self, Kept, Source};
    use lora_edge::ops::counters::RadioState;
    if let Some(id) = &cfg.gateway.id {
        return Some((id.to_lowercase(), Source::Configured));
    }
    let machine = identity::derived();
    tracing::info!(wait = ?cfg.gateway.eui_wait, "gateway.id not set: waiting for the concentrator's EUI");
    // The EUI, or the radio's first failure, or the end of the wait.
    let until = tokio::time::Instant::now() + cfg.gateway.eui_wait;
    let eui = loop {
        if let Some(eui) = *eui_rx.borrow() {
            break Some(eui);
        }
        if counters.radio_status().state == RadioState::Down || tokio::time::Instant::now() >= until
        {
            break None;
        }
        tokio::select! {
            _ = eui_rx.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = stop_signal() => return None,
        }
    };
    if let Some(eui) = eui {
        let id = format!("{eui:016x}");
        keep_eui(queue, &id, machine.as_ref().map(|(m, _)| m.as_str()));
        return Some((id, Source::ConcentratorEui));
    }
    let kept = queue
        .state_get(identity::STATE_KEY)
        .ok()
        .flatten()
        .and_then(|b| Kept::decode(&b));
    match (kept, machine) {
        (Some(k), Some((m, _))) if k.is_of(Some(&m)) => Some((k.eui, Source::Kept)),
        (kept, Some((m, source))) => {
            tracing::warn!(
                kept_elsewhere = kept.map(|k| k.eui),
                "the concentrator gave no EUI: the gateway comes up under an identity derived \
                 from this machine, until a start where the radio names its EUI (set gateway.id \
                 to choose one)"
            );
            Some((m, source))
        }
        // Nothing to tell this machine by (no global MAC, no machine-id: a bare container).
        (Some(k), None) if k.machine.is_none() => Some((k.eui, Source::Kept)),
        (_, None) => {
            let id = queue
                .state_get(identity::RANDOM_KEY)
                .ok()
                .flatten()
                .and_then(|b| Kept::decode(&b))
                .map(|k| k.eui)
                .unwrap_or_else(|| {
                    let id = identity::random();
                    let kept = Kept {
                        eui: id.clone(),
                        machine: None,
                    };
                    if let Err(e) = queue.state_put(identity::RANDOM_KEY, &kept.encode()) {
                        tracing::warn!(error = %e, "the gateway identity could not be kept in the store");
                    }
                    id
                });
            tracing::warn!(
                gateway_id = %id,
                "the concentrator gave no EUI and this machine has neither a global MAC address nor a machine-id: the gateway comes up under a random identity kept in its store (set gateway.id to choose one)"
            );
            Some((id, Source::Random))
        }
    }
}

/// Keeps the concentrator's EUI with the machine it was seen on, for a start without radio.
fn keep_eui(queue: &Queue, eui: &str, machine: Option<&str>) {
    let kept = lora_edge::identity::Kept {
        eui: eui.to_string(),
        machine: machine.map(str::to_string),
    };
    if let Err(e) = queue.state_put(lora_edge::identity::STATE_KEY, &kept.encode()) {
        tracing::warn!(error = %e, "the concentrator's EUI could not be kept in the store");
    }
}

/// The radio backend this binary links.
fn linked() -> config::Linked {
    use lora_edge::radio::diagnosis::Variant;
    match (Concentrator::linked(), Variant::of_build()) {
        ("simulator", _) => config::Linked::Simulator,
        (_, Variant::Upstream) => config::Linked::LibloragwUpstream,
        _ => config::Linked::Libloragw,
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Set once the stages run: what SIGHUP reloads with.
static RELOADER: std::sync::OnceLock<Arc<lora_edge::ops::requests::Reloader>> =
    std::sync::OnceLock::new();

/// SIGHUP (`systemctl reload`): the files on disk checked as `check` does; the rules run in
/// place of the running ones (pump states kept); other changes named (a restart applies them); a
/// broken file changes nothing. Before the stages run, and for its default action (ending the
/// process), it is ignored.
fn handle_hangups() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let Some(reloader) = RELOADER.get().cloned() else {
                        tracing::warn!("SIGHUP while starting: ignored");
                        continue;
                    };
                    match tokio::task::spawn_blocking(move || reloader.reload()).await {
                        Ok(Ok(done)) => tracing::info!(%done, "SIGHUP: reloaded"),
                        Ok(Err(why)) => tracing::error!("SIGHUP: nothing changed: {why}"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: the reload failed"),
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP"),
    }
}

/// `base`: the configuration files given; `files`: those and the centre's changes.
async fn run(
    cfg: Config,
    base: &[PathBuf],
    files: &[PathBuf],
    sets: &[String],
) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        hal = %Concentrator::describe_linked(),
        "lora-edge"
    );
    handle_hangups();
    // Before the first call into the library: its output goes to our log.
    if let Err(e) = lora_edge::radio::library_output::capture() {
        tracing::warn!(error = %e, "libloragw's output is not captured (no pseudo-terminal)");
    }
    let counters = Arc::new(Counters::new());
    let opening = std::time::Instant::now();
    let (queue, opened) = Queue::open(QueueOptions {
        path: cfg.store.path.clone(),
        max_disk_bytes: cfg.store.max_size_mib * 1024 * 1024,
        max_age: cfg.store.max_age,
        commit_interval: cfg.store.commit_interval,
    })
    .with_context(|| format!("opening the store at {}", cfg.store.path.display()))?;
    let backlog = queue.backlog();
    tracing::info!(
        open_ms = opening.elapsed().as_millis() as u64,
        backlog = backlog.records,
        backlog_bytes = backlog.bytes,
        "store opened"
    );
    for l in queue.lost_at_open() {
        Counters::add(&counters.store_lost, l.last_seq - l.first_seq + 1);
        tracing::error!(
            first_seq = l.first_seq,
            last_seq = l.last_seq,
            reason = l.reason,
            "ALARM: the store no longer holds these accepted events; they are reported lost to the centre"
        );
    }
    if queue.numbering_damaged() {
        tracing::error!(
            "ALARM: the sequence numbering file beside the store was unreadable; numbering continues from the store, which may repeat numbers if the store was also damaged"
        );
    }
    let queue = Arc::new(queue);
    let hal = Concentrator::claim()?;

    let stop_radio = Arc::new(AtomicBool::new(false));
    let (attach_tx, attach_rx) = sync_channel::<Box<dyn lora_edge::radio::FrameSink>>(1);
    let (replan_tx, replan_rx) = sync_channel(1);
    let plan_slot = Arc::new(lora_edge::ops::channel_plan::PlanSlot::default());
    let (event_tx, event_rx) = sync_channel::<Event>(EVENT_QUEUE);
    let (eui_tx, mut eui_rx) = watch::channel(None);
    let radio_settings = RadioSettings::from_config(&cfg);
    let udp = match cfg.radio.backend {
        lora_edge::config::Backend::SemtechUdp => Some(Arc::new(
            lora_edge::radio::semtech_udp::Link::bind(&cfg.radio.semtech_udp)
                .map_err(anyhow::Error::msg)?,
        )),
        _ => None,
    };
    let radio = Radio {
        settings: radio_settings.clone(),
        hal: hal.clone(),
        attach: attach_rx,
        replan: replan_rx,
        counters: counters.clone(),
        stop: stop_radio.clone(),
        eui: eui_tx,
        udp: udp.clone(),
    }
    .spawn()?;

    let Some((gateway_id, id_source)) = choose_identity(&cfg, &queue, &counters, &mut eui_rx).await
    else {
        stop_radio.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || radio.join()).await;
        return Ok(());
    };
    tracing::info!(gateway_id = %gateway_id, source = id_source.describe(), "gateway identity");
    if id_source != lora_edge::identity::Source::Configured {
        // The radio may name its EUI later: kept for the next start, and said now if it is not
        // the name in use.
        let (queue, machine, in_use) = (
            queue.clone(),
            lora_edge::identity::derived().map(|(m, _)| m),
            gateway_id.clone(),
        );
        let mut eui_rx = eui_rx.clone();
        tokio::spawn(async move {
            let Ok(eui) = eui_rx
                .wait_for(Option::is_some)
                .await
                .map(|e| e.unwrap_or(0))
            else {
                return;
            };
            let eui = format!("{eui:016x}");
            if eui != in_use {
                keep_eui(&queue, &eui, machine.as_deref());
                tracing::warn!(gateway_id = %in_use, concentrator_eui = %eui, "the gateway runs under an identity that is not its concentrator's EUI; the next start uses the EUI (set gateway.id to choose)");
            }
        });
    }
    tracing::info!(gateway_id = %gateway_id, store = %cfg.store.path.display(), "lora-edge starting");

    let (appended_tx, appended_rx) = watch::channel(queue.next_seq().saturating_sub(1));
    let writer = Writer {
        queue: queue.clone(),
        input: event_rx,
        appended: appended_tx,
        counters: counters.clone(),
        commit_interval: cfg.store.commit_interval,
    }
    .spawn()?;
    if let Opened::Damaged { copies, why } = &opened {
        let copies: Vec<String> = copies.iter().map(|c| c.display().to_string()).collect();
        tracing::error!(copies = ?copies, %why, "ALARM: the store was damaged: its sound records were kept and go out, the damaged ones are reported lost; a copy of each damaged file is kept for inspection");
        let lost: Vec<[u64; 2]> = queue
            .lost_at_open()
            .iter()
            .map(|l| [l.first_seq, l.last_seq])
            .collect();
        let notice = serde_json::json!({"event": "store_corrupt", "copies": copies, "error": why, "lost": lost});
        let _ = event_tx.send(Event {
            at: SystemTime::now(),
            body: Body::Notice(notice),
        });
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let stop_downlinks = Arc::new(AtomicBool::new(false));
    // Before the rules: their Class C actuators send through the downlink stage.
    let (down_tx, down_rx) = sync_channel(DOWNLINK_QUEUE);
    let wake_downlinks = down_tx.clone();
    let (rules_input, rules_stage) = start_rules(
        &cfg,
        &gateway_id,
        &event_tx,
        &queue,
        &counters,
        &stopping,
        &down_tx,
    )?;
    let pump_commands = rules_input.as_ref().map(|(tx, _)| tx.clone());
    let rules_control = match (&cfg.rules, &pump_commands) {
        (Some(rc), Some(stage)) => Some(lora_edge::ops::rules_change::RulesControl {
            cfg: rc.clone(),
            gateway_id: gateway_id.clone(),
            // Validated by check.
            public_key: rc.public_key_bytes().ok().flatten(),
            stage: stage.clone(),
            queue: queue.clone(),
            // What the stage loaded a moment ago.
            running: std::sync::Mutex::new(
                lora_edge::files::read_bounded(&rc.file, config::MAX_FILE_BYTES)
                    .unwrap_or_default(),
            ),
        }),
        _ => None,
    };
    // The uplink stage runs on the radio's thread from here on.
    let uplinks = Uplinks {
        rules: rules_input,
        output: event_tx.clone(),
        filter: CrcFilter {
            forward_ok: cfg.radio.forward_crc_ok,
            forward_invalid: cfg.radio.forward_crc_invalid,
            forward_missing: cfg.radio.forward_crc_missing,
        },
        counters: counters.clone(),
        held: Default::default(),
    };
    let _ = attach_tx.send(Box::new(uplinks));

    let (transmitter, limits): (Arc<dyn Transmitter>, TxLimits) = match &udp {
        Some(link) => {
            let wake = down_tx.clone();
            link.on_tx_ack(Box::new(move || {
                let _ = wake.try_send(lora_edge::downlink::Input::Wake);
            }));
            (
                Arc::new(transmitter::Forwarder(link.clone())),
                TxLimits::for_forwarder(&radio_settings),
            )
        }
        None => (
            Arc::new(transmitter::Hal(hal.clone())),
            TxLimits::for_radio(&radio_settings, cfg.radio.antenna_gain_dbi),
        ),
    };
    let downlinks = Downlinks {
        input: down_rx,
        stop: stop_downlinks.clone(),
        radio: transmitter,
        tx_ack_timeout: cfg.radio.semtech_udp.tx_ack_timeout,
        output: event_tx.clone(),
        gateway_id: gateway_id.clone(),
        encoding: cfg.mqtt.encoding,
        limits,
        enforce_duty_cycle: cfg.radio.enforce_duty_cycle,
        counters: counters.clone(),
        realtime_priority: cfg.radio.realtime_priority,
    }
    .spawn()?;

    let (exec_tx, exec_rx) = sync_channel(lora_edge::exec::QUEUE);
    let exec = lora_edge::exec::Exec {
        commands: cfg.commands.clone(),
        gateway_id: gateway_id.clone(),
        encoding: cfg.mqtt.encoding,
        input: exec_rx,
        output: event_tx.clone(),
    }
    .spawn()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (health_tx, health_rx) = watch::channel(Vec::new());
    let identity = health_identity(&cfg, &gateway_id, files, sets);
    let (ops_tx, ops_rx) = sync_channel(lora_edge::ops::requests::QUEUE);
    let changes = Arc::new(lora_edge::ops::config_change::ConfigControl::new(
        base.to_vec(),
        sets.to_vec(),
        Some(linked()),
        &cfg,
    ));
    changes.report_reverted(&event_tx);
    tokio::spawn(changes.clone().watch(counters.clone(), event_tx.clone()));
    let reloader = Arc::new(lora_edge::ops::requests::Reloader {
        files: base.to_vec(),
        sets: sets.to_vec(),
        linked: Some(linked()),
        running: cfg.source.clone(),
        keys_sha256: std::sync::Mutex::new(cfg.rules.as_ref().and_then(|r| {
            lora_edge::files::read_bounded(&r.keys_file, config::MAX_FILE_BYTES)
                .ok()
                .map(|b| lora_edge::ops::state::sha256_hex(&b))
        })),
        rules: std::sync::Mutex::new(rules_control),
    });
    let _ = RELOADER.set(reloader.clone());
    let ops = lora_edge::ops::requests::Requests {
        config: serde_json::to_value(config::redacted(&cfg.source)).unwrap_or_default(),
        config_files: identity.config_files.clone(),
        rules_file: cfg.rules.as_ref().map(|r| r.file.clone()),
        queue: queue.clone(),
        counters: counters.clone(),
        health: health_rx.clone(),
        reloader,
        changes,
        channel_plans: lora_edge::ops::channel_plan::ChannelPlans {
            slot: plan_slot.clone(),
            base: radio_settings.plan.clone(),
            radio: replan_tx,
            encoding: cfg.mqtt.encoding,
            gateway_id: gateway_id.clone(),
            counters: counters.clone(),
        },
        input: ops_rx,
        output: event_tx.clone(),
    }
    .spawn()?;
    let health = tokio::spawn(
        HealthReporter {
            identity,
            interval: cfg.stats.interval,
            counters: counters.clone(),
            queue: queue.clone(),
            store_path: cfg.store.path.clone(),
            output: health_tx,
            shutdown: shutdown_rx.clone(),
        }
        .run(),
    );
    let mut backhaul = tokio::spawn(
        Backhaul {
            cfg: cfg.mqtt.clone(),
            gateway_id: gateway_id.clone(),
            join_request_max_age: cfg.store.join_request_max_age,
            queue: queue.clone(),
            appended: appended_rx,
            counters: counters.clone(),
            shutdown: shutdown_rx.clone(),
            downlinks: Some(down_tx),
            pumps: pump_commands,
            drain_until: None,
            health: Some(health_rx),
            exec: Some(exec_tx),
            ops: Some(ops_tx),
            plans: plan_slot,
        }
        .run(),
    );
    let watchdog = tokio::spawn(lora_edge::ops::health::feed_watchdog(
        counters.clone(),
        shutdown_rx.clone(),
    ));
    let stats = tokio::spawn(
        StatsReporter {
            interval: cfg.stats.interval,
            gateway_id,
            counters,
            queue,
            output: event_tx,
            shutdown: shutdown_rx,
        }
        .run(),
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    tokio::select! {
        _ = stop_signal() => {}
        _ = lora_edge::ops::restart::requested() => {}
        ended = &mut backhaul => {
            // The backhaul ends only at shutdown: anything else is a panic (logged by the hook,
            // pumps driven off). Running on without it would buffer until the disk is full.
            tracing::error!(error = ?ended.err(), "ALARM: the backhaul failed: the agent exits so that the service manager restarts it");
            std::process::exit(70);
        }
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Radio first, so every frame it read is accepted before the store closes.
    stop_radio.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    tokio::task::spawn_blocking(move || {
        let _ = radio.join();
    })
    .await?;
    let _ = stats.await;
    let _ = health.await;
    let _ = watchdog.await;
    // The writer ends once every stage that sends it events has ended; meanwhile the backhaul
    // publishes what they leave (acks of cancelled downlinks, the last audits), for at most
    // `mqtt.drain_timeout`, then says OFFLINE.
    // The rule changes hold a sender of the rules stage's input: let it end.
    if let Some(r) = RELOADER.get() {
        r.close();
    }
    let stages = tokio::task::spawn_blocking(move || {
        // The uplink stage and the backhaul held its senders: the rules stage drives the pumps
        // off and ends (before the writer, which takes its last audit records).
        if let Some(r) = rules_stage {
            let _ = r.join();
        }
        // Class C actuators (held by the panic hook too) keep senders of the downlink stage's
        // input: it is told to stop instead.
        stop_downlinks.store(true, Ordering::Relaxed);
        let _ = wake_downlinks.try_send(lora_edge::downlink::Input::Wake);
        let _ = downlinks.join();
        // Its input closes when the backhaul stops taking commands; a command running ends at
        // its timeout at the latest.
        let _ = exec.join();
        let _ = ops.join();
        stopping.store(true, Ordering::Relaxed);
        let _ = writer.join();
    });
    let _ = backhaul.await;
    stages.await?;
    tracing::info!("stopped");
    Ok(())
}
