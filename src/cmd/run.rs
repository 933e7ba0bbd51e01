//! `keyrelay run`: wires the subsystems together, runs until SIGTERM, and stops in
//! order: stop intake, drain, commit, `offline`, disconnect, LEDs off.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::CmdError;
use crate::clock::{GuardedClock, SystemClock};
use crate::config::Config;
use crate::health::{self, Lights};
use crate::leds;
use crate::mqtt::{self, Driver, LinkState};
use crate::relay::Relay;
use crate::rotator::{KeyState, Rotator};
use crate::service;
use crate::state::{self, Row};
use crate::store::{Loaded, Store};

/// The health topic is republished at least this often (SPEC §3: every 60 s).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(60);
/// Budgets and the latest time are written at least this often while idle.
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(30);
/// Part of the 10 s stop (SPEC §6) given to tasks in flight; the rest is for the
/// commit, the `offline` message and the LEDs. Must stay below `service::SHUTDOWN_GRACE`.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(7);
/// Time for the last publishes and the DISCONNECT to leave.
pub const DISCONNECT_LIMIT: Duration = Duration::from_secs(1);
/// How often an unusable state file is tried again.
pub const STORE_REOPEN_INTERVAL: Duration = Duration::from_secs(10);

pub async fn run(path: &Path) -> Result<ExitCode, CmdError> {
    let config = super::load_config(path)?;
    crate::logging::init(config.log_level);
    log::info!(
        "keyrelay {} starting with {}",
        env!("CARGO_PKG_VERSION"),
        path.display()
    );
    let backend = leds::open(&config.leds).map_err(|e| CmdError::Config(e.to_string()))?;

    let stop = CancellationToken::new();
    let system = TaskTracker::new();
    let (lights_tx, lights_rx) = watch::channel(Lights::all_off());
    let activity = Arc::new(tokio::sync::Notify::new());
    let led_stop = CancellationToken::new();
    leds::spawn_driver(
        backend,
        lights_rx,
        activity.clone(),
        led_stop.clone(),
        &system,
    );
    service::spawn_signal_handler(stop.clone(), &system)
        .map_err(|e| CmdError::Runtime(format!("cannot listen for signals: {e}")))?;

    let result = match open_store(&config, &stop, &lights_tx).await {
        Some((store, loaded)) => serve(config, store, loaded, stop, &lights_tx, activity).await,
        None => Ok(()),
    };
    if result.is_err() {
        leds::fatal_then_off(&lights_tx, &led_stop).await;
    }
    led_stop.cancel();
    system.close();
    if tokio::time::timeout(DISCONNECT_LIMIT, system.wait())
        .await
        .is_err()
    {
        log::warn!("some subsystems did not stop in time");
    }
    result.map(|()| ExitCode::SUCCESS)
}

/// Opens the state file. An unusable one is reported and tried again until it opens or
/// the daemon is stopped: meanwhile nothing is spent, no task is taken (they wait in
/// the broker) and red blinks.
async fn open_store(
    config: &Config,
    stop: &CancellationToken,
    lights: &watch::Sender<Lights>,
) -> Option<(Store, Loaded)> {
    let path = super::state_file(config);
    loop {
        let attempt = path.clone();
        match tokio::task::spawn_blocking(move || Store::open(&attempt)).await {
            Ok(Ok(opened)) => return Some(opened),
            Ok(Err(e)) => {
                log::error!(event = "store_unusable"; "{e}");
                service::notify_status(&format!("state file unusable: {e}"));
            }
            Err(e) => log::error!("opening the state file failed: {e}"),
        }
        lights.send_replace(health::lights(None, false, false));
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(STORE_REOPEN_INTERVAL) => {}
        }
    }
}

async fn serve(
    config: Config,
    store: Store,
    loaded: Loaded,
    stop: CancellationToken,
    lights: &watch::Sender<Lights>,
    activity: Arc<tokio::sync::Notify>,
) -> Result<(), CmdError> {
    let latest = loaded
        .latest_time_ms
        .and_then(|ms| Timestamp::from_millisecond(ms).ok());
    let clock = GuardedClock::new(
        Box::new(SystemClock {
            trust_unsynchronised: config.trust_unsynchronised_clock,
        }),
        latest,
    );
    if !clock.synchronised() {
        log::warn!(event = "clock_unsynchronised"; "the system clock is not synchronised: serving, but no daily window resets until it is");
    }
    let mut rotator = Rotator::new(&config);
    let key_files = key_file_rows(&config);
    let replaced: Vec<String> = key_files
        .iter()
        .filter(|(row, identity)| {
            loaded
                .rows
                .get(row)
                .is_some_and(|before| before != identity)
        })
        .filter_map(|(row, _)| match Row::parse(row) {
            Row::KeyFile(label) => Some(label.to_owned()),
            _ => None,
        })
        .collect();
    rotator.restore(loaded.rows).map_err(|e| {
        CmdError::Runtime(format!(
            "the state file {} holds budgets that cannot be read: {e}",
            super::state_file(&config).display()
        ))
    })?;
    for label in &replaced {
        log::info!(event = "key_replaced", key = label.as_str(); "the key file of {label} changed since the last run; its state is cleared");
        rotator.reset(label);
    }
    store
        .commit(crate::store::Batch {
            rows: key_files,
            ..crate::store::Batch::default()
        })
        .await
        .map_err(|e| CmdError::Runtime(e.to_string()))?;

    let topics = mqtt::Topics::new(
        &config.mqtt.topic_prefix,
        &config.node_id,
        &config.mqtt.share_group,
    );
    let options = mqtt::daemon_options(&config.mqtt, &topics, &config.node_id)
        .map_err(|e| CmdError::Config(e.to_string()))?;
    let (client, eventloop) = mqtt::connect(options);
    let driver = Driver {
        client,
        eventloop,
        topics: topics.clone(),
    };
    let connection = Arc::new(AtomicU64::new(0));
    let link = driver.link(connection.clone());
    let socket_path = crate::control::socket_path(&config);
    let listener =
        crate::control::bind(&socket_path).map_err(|e| CmdError::Runtime(e.to_string()))?;

    let work = TaskTracker::new();
    let loops = TaskTracker::new();
    let relay = Arc::new(
        Relay::new(
            config,
            link.clone(),
            store.clone(),
            clock,
            rotator,
            stop.clone(),
            work.clone(),
        )
        .map_err(|e| CmdError::Config(e.to_string()))?,
    );
    let (tasks_tx, tasks_rx) = mpsc::channel(usize::from(mqtt::RECEIVE_MAXIMUM));
    let (link_tx, link_rx) = watch::channel(LinkState::default());
    let mqtt_stop = CancellationToken::new();
    let driver_task = loops.spawn(driver.run(connection, tasks_tx, link_tx, mqtt_stop.clone()));
    loops.spawn(relay.clone().intake(tasks_rx));
    loops.spawn(crate::control::serve(
        listener,
        relay.clone(),
        stop.clone(),
        work.clone(),
    ));
    for pending in loaded.pending {
        work.spawn(relay.clone().resume(pending));
    }
    let watch_result = watch_health(&relay, link_rx, lights, &activity, &stop).await;

    // Stop: intake has ended with `stop`; tasks in flight get the drain time, then
    // whatever is left is answered after the restart (recorded) or redelivered (not).
    service::notify_stopping();
    log::info!("stopping: {} task(s) in flight", work.len());
    work.close();
    if tokio::time::timeout(DRAIN_LIMIT, work.wait())
        .await
        .is_err()
    {
        log::warn!(
            "{} task(s) did not finish in time; they are answered after the restart",
            work.len()
        );
    }
    if let Err(e) = relay.persist(true).await {
        log::error!("could not write the final state: {e}");
    }
    if let Err(e) = relay.store.flush().await {
        log::error!("could not flush the state file: {e}");
    }
    link.publish(
        &relay.topics.availability(),
        b"offline".to_vec(),
        true,
        None,
    )
    .await;
    link.disconnect().await;
    if tokio::time::timeout(DISCONNECT_LIMIT, driver_task)
        .await
        .is_err()
    {
        mqtt_stop.cancel();
    }
    mqtt_stop.cancel();
    loops.close();
    if tokio::time::timeout(DISCONNECT_LIMIT, loops.wait())
        .await
        .is_err()
    {
        log::warn!("the broker loops did not stop in time");
    }
    lights.send_replace(Lights::all_off());
    log::info!("stopped");
    watch_result
}

/// Publishes health on every change and at least every HEALTH_INTERVAL, keeps the LEDs
/// and systemd's STATUS in step with it, pings the watchdog, and persists the budgets
/// periodically. It is the loop that does the daemon's bookkeeping, so the watchdog
/// ping comes from here: a hung rotator lock stops the pings and systemd restarts us.
async fn watch_health(
    relay: &Arc<Relay>,
    mut link: watch::Receiver<LinkState>,
    lights: &watch::Sender<Lights>,
    activity: &Arc<tokio::sync::Notify>,
    stop: &CancellationToken,
) -> Result<(), CmdError> {
    let watchdog = service::watchdog_interval();
    let tick = watchdog.unwrap_or(HEALTH_INTERVAL).min(HEALTH_INTERVAL);
    let mut ready = false;
    let mut last_published: Option<(serde_json::Value, tokio::time::Instant)> = None;
    let mut last_persist = tokio::time::Instant::now();
    let counters = relay.stats.snapshot();
    let mut finished = counters.ok + counters.failed;
    let mut changes = relay.watch_changes();
    loop {
        let state = *link.borrow_and_update();
        let health = relay.health();
        let json = serde_json::to_value(&health).unwrap_or_default();
        let lit = health::lights(Some(health.state), state.up, relay.store_usable());
        lights.send_if_modified(|current| {
            let changed = *current != lit;
            *current = lit;
            changed
        });
        let counters = relay.stats.snapshot();
        if counters.ok + counters.failed > finished {
            finished = counters.ok + counters.failed;
            activity.notify_one();
        }
        if state.up {
            if !ready {
                ready = true;
                service::notify_ready();
                log::info!(event = "ready"; "subscribed to {} and {}", relay.topics.shared_tasks(), relay.topics.node_tasks());
            }
            let stale = last_published
                .as_ref()
                .is_none_or(|(previous, at)| *previous != json || at.elapsed() >= HEALTH_INTERVAL);
            if stale {
                relay
                    .link
                    .publish(
                        &relay.topics.health(),
                        serde_json::to_vec(&json).unwrap_or_default(),
                        true,
                        None,
                    )
                    .await;
                last_published = Some((json, tokio::time::Instant::now()));
            }
        } else {
            // Republish on the next connect: retained state may have been lost with the broker.
            last_published = None;
        }
        service::notify_status(&status_line(&health, state.up));
        service::notify_watchdog();
        if last_persist.elapsed() >= PERSIST_INTERVAL {
            last_persist = tokio::time::Instant::now();
            if let Err(e) = relay.persist(false).await {
                log::error!(event = "store_unusable"; "could not write the budgets: {e}");
            }
        }
        let until_change = relay
            .next_change()
            .map(|t| {
                Duration::try_from(t.duration_since(relay.clock.now())).unwrap_or(Duration::ZERO)
            })
            .unwrap_or(tick)
            .min(tick);
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = changes.changed() => {}
            changed = link.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(until_change.max(Duration::from_millis(50))) => {}
        }
    }
}

/// `keyfile/{label}` rows remembering each key file's identity, so that a disabled key
/// comes back when an operator replaces its file and restarts (SPEC §4). Keys from the
/// environment have no row; `keyrelay reset` brings those back.
fn key_file_rows(config: &Config) -> Vec<(String, Vec<u8>)> {
    config
        .providers
        .iter()
        .flat_map(|p| &p.keys)
        .filter_map(|k| match &k.secret_source {
            crate::config::SecretSource::File(path) => std::fs::metadata(path)
                .ok()
                .map(|m| (Row::KeyFile(&k.label).name(), state::key_file_identity(&m))),
            crate::config::SecretSource::Env(_) => None,
        })
        .collect()
}

/// The one-line summary systemd shows (`systemctl status`).
fn status_line(health: &health::Health, broker_up: bool) -> String {
    let ready = health
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Ready)
        .count();
    format!(
        "{}/{} keys ready, {} queued, broker {}",
        ready,
        health.keys.len(),
        health.queue,
        if broker_up {
            "connected"
        } else {
            "unreachable"
        }
    )
}
