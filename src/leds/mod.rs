//! The lights of SPEC §5: a small backend trait with one file per way of driving them
//! (rppal, gpiochip, sysfs, file, none), `open` choosing one from `[leds]`, and the driver
//! task that shows the value `health::lights` derives, blinking included. What the lights
//! mean is decided in `health`, never here.

mod file;
mod gpiochip;
mod none;
mod rppal;
mod sysfs;

pub use file::FileLeds;
pub use gpiochip::GpiochipLeds;
pub use none::NoLeds;
pub use rppal::RppalLeds;
pub use sysfs::{SYS_CLASS_LEDS, SysfsLeds};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{LedBackendKind, LedConfig, LedPin};
use crate::health::{LightState, Lights};

/// A full on/off cycle of a blinking light: half on, half off. One blink a second reads as
/// "something is wrong" without looking like the activity flicker.
pub const BLINK_PERIOD: Duration = Duration::from_millis(1000);
/// How long the activity light stays on for one finished task, and then at least as long off,
/// so that a burst of tasks still shows as separate flashes. Much shorter than
/// [`BLINK_PERIOD`] so a pulse is never mistaken for a blinking state.
pub const ACTIVITY_BLINK: Duration = Duration::from_millis(80);
/// How long [`fatal_then_off`] blinks red before the lights go dark and the process exits:
/// long enough to be seen by someone looking at the box, short enough not to delay
/// systemd's restart noticeably.
pub const FATAL_SHOW: Duration = Duration::from_secs(3);

/// One of the four lights of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Light {
    Green,
    Amber,
    Red,
    Activity,
}

impl Light {
    /// In the order the SPEC lists them, which is also the order of the file backend's JSON.
    pub const ALL: [Light; 4] = [Light::Green, Light::Amber, Light::Red, Light::Activity];

    /// The name used in `[leds]`, the file backend's JSON and messages.
    pub fn name(self) -> &'static str {
        match self {
            Light::Green => "green",
            Light::Amber => "amber",
            Light::Red => "red",
            Light::Activity => "activity",
        }
    }

    /// What the pattern asks of this light.
    pub fn state_in(self, lights: &Lights) -> LightState {
        match self {
            Light::Green => lights.green,
            Light::Amber => lights.amber,
            Light::Red => lights.red,
            Light::Activity => lights.activity,
        }
    }

    /// Whether this light is lit in `lights` during blink phase `phase_on`.
    pub fn is_lit(self, lights: &Lights, phase_on: bool) -> bool {
        match self.state_in(lights) {
            LightState::Off => false,
            LightState::On => true,
            LightState::Blink => phase_on,
        }
    }

    fn pin(self, cfg: &LedConfig) -> Option<&LedPin> {
        match self {
            Light::Green => cfg.green.as_ref(),
            Light::Amber => cfg.amber.as_ref(),
            Light::Red => cfg.red.as_ref(),
            Light::Activity => cfg.activity.as_ref(),
        }
    }
}

/// The hint every "this backend cannot work here" error ends with, naming the others.
const OTHER_BACKENDS_HINT: &str =
    "without GPIO use backend = \"sysfs\" (/sys/class/leds), \"file\" or \"none\"";

#[derive(Debug, thiserror::Error)]
pub enum LedError {
    /// rppal needs the Raspberry Pi OS kernel's `/dev/gpiomem` and a Pi it recognises.
    #[error(
        "rppal cannot drive GPIO here ({cause}): on kernels without /dev/gpiomem use backend = \"gpiochip\"; {OTHER_BACKENDS_HINT}"
    )]
    RppalUnavailable { cause: ::rppal::gpio::Error },
    /// The GPIO character device is missing, not a GPIO chip, or refuses the lines.
    #[error(
        "gpiochip cannot drive GPIO lines on {chip} ({cause}): on Raspberry Pi OS backend = \"rppal\" may work; {OTHER_BACKENDS_HINT}",
        chip = .chip.display()
    )]
    GpiochipUnavailable {
        chip: PathBuf,
        cause: gpiocdev::Error,
    },
    /// A light's setting does not suit the backend (a name for a GPIO backend, a number for sysfs).
    #[error("[leds] {light} = {pin}: {why}")]
    BadPin {
        light: &'static str,
        pin: String,
        why: &'static str,
    },
    /// `backend = "file"` without `path`.
    #[error("[leds] backend = \"file\" needs path = \"…\" (e.g. /run/keyrelay/leds.json)")]
    FileWithoutPath,
    /// Reading or writing a file of the sysfs or file backend.
    #[error("{action} {path}: {source}", path = .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Setting a line through the GPIO character device failed after it was opened.
    #[error("setting GPIO line {offset}: {source}")]
    GpioLine {
        offset: u32,
        #[source]
        source: gpiocdev::Error,
    },
}

impl LedError {
    /// Why the backend cannot work here, without the advice: for `auto`'s one-line warning.
    fn short_cause(&self) -> String {
        match self {
            LedError::RppalUnavailable { cause } => format!("rppal: {cause}"),
            LedError::GpiochipUnavailable { chip, cause } => {
                format!("gpiochip {}: {cause}", chip.display())
            }
            other => other.to_string(),
        }
    }

    /// Whether the backend cannot work on this machine at all (as opposed to being
    /// misconfigured): only these let `auto` move on to the next backend.
    fn is_unavailable(&self) -> bool {
        matches!(
            self,
            LedError::RppalUnavailable { .. } | LedError::GpiochipUnavailable { .. }
        )
    }
}

/// A set of named lights.
///
/// The driver calls [`apply`](Self::apply) whenever the pattern changes and, while something
/// blinks, at every half [`BLINK_PERIOD`] with the phase flipped. Hardware backends light each
/// configured light per [`Light::is_lit`]; the file backend ignores the phase and writes the
/// pattern itself (`"blink"`), so a test reading it never races the blink timer.
///
/// Calls may block (GPIO ioctls, file writes): the driver makes them off the async workers.
pub trait LedBackend: Send {
    /// The backend's name in `[leds] backend`, for logs.
    fn name(&self) -> &'static str;

    /// Shows `lights`; blinking lights are lit when `phase_on`.
    fn apply(&mut self, lights: &Lights, phase_on: bool) -> Result<(), LedError>;
}

/// The backend `[leds]` asks for. An explicit `rppal` or `gpiochip` that cannot work on this
/// machine is an error naming the other backends; `auto` tries rppal, then gpiochip, then
/// runs without lights, with a warning saying why.
pub fn open(cfg: &LedConfig) -> Result<Box<dyn LedBackend>, LedError> {
    match cfg.backend {
        LedBackendKind::Rppal => Ok(Box::new(RppalLeds::open(&line_pins(cfg)?)?)),
        LedBackendKind::Gpiochip => Ok(Box::new(GpiochipLeds::open(
            &gpiochip_path(cfg),
            &line_pins(cfg)?,
        )?)),
        LedBackendKind::Sysfs => Ok(Box::new(SysfsLeds::open(
            std::path::Path::new(SYS_CLASS_LEDS),
            &named_pins(cfg)?,
        )?)),
        LedBackendKind::File => {
            let path = cfg.path.clone().ok_or(LedError::FileWithoutPath)?;
            let lights = Light::ALL
                .into_iter()
                .filter(|l| l.pin(cfg).is_some())
                .collect();
            Ok(Box::new(FileLeds::new(path, lights)))
        }
        LedBackendKind::None => Ok(Box::new(NoLeds)),
        LedBackendKind::Auto => open_auto(cfg),
    }
}

fn open_auto(cfg: &LedConfig) -> Result<Box<dyn LedBackend>, LedError> {
    let pins = line_pins(cfg)?;
    if pins.is_empty() {
        // Nothing to light: probing GPIO would only produce a misleading warning.
        log::info!(event = "leds_none"; "no LEDs configured; running without lights");
        return Ok(Box::new(NoLeds));
    }
    let rppal_error = match RppalLeds::open(&pins) {
        Ok(b) => return Ok(Box::new(b)),
        Err(e) if e.is_unavailable() => e,
        Err(e) => return Err(e),
    };
    let chip = gpiochip_path(cfg);
    let gpiochip_error = match GpiochipLeds::open(&chip, &pins) {
        Ok(b) => {
            log::info!(
                event = "leds_backend";
                "LEDs through {} ({})", chip.display(), rppal_error.short_cause()
            );
            return Ok(Box::new(b));
        }
        Err(e) if e.is_unavailable() => e,
        Err(e) => return Err(e),
    };
    log::warn!(
        event = "leds_none";
        "no GPIO for the LEDs, running without lights ({}; {}); backend = \"none\" silences this",
        rppal_error.short_cause(),
        gpiochip_error.short_cause()
    );
    Ok(Box::new(NoLeds))
}

fn gpiochip_path(cfg: &LedConfig) -> PathBuf {
    cfg.chip
        .clone()
        .unwrap_or_else(|| PathBuf::from(gpiochip::DEFAULT_CHIP))
}

/// The configured lights as GPIO numbers (BCM pins for rppal, line offsets for gpiochip).
fn line_pins(cfg: &LedConfig) -> Result<Vec<(Light, u32)>, LedError> {
    let mut pins = Vec::new();
    for light in Light::ALL {
        match light.pin(cfg) {
            None => {}
            Some(LedPin::Line(n)) => pins.push((light, *n)),
            Some(LedPin::Name(name)) => {
                return Err(LedError::BadPin {
                    light: light.name(),
                    pin: format!("{name:?}"),
                    why: "GPIO backends take a pin or line number; names are for backend = \"sysfs\"",
                });
            }
        }
    }
    Ok(pins)
}

/// The configured lights as `/sys/class/leds` names.
fn named_pins(cfg: &LedConfig) -> Result<Vec<(Light, String)>, LedError> {
    let mut pins = Vec::new();
    for light in Light::ALL {
        match light.pin(cfg) {
            None => {}
            Some(LedPin::Name(name)) => pins.push((light, name.clone())),
            Some(LedPin::Line(n)) => {
                return Err(LedError::BadPin {
                    light: light.name(),
                    pin: n.to_string(),
                    why: "backend = \"sysfs\" takes a name under /sys/class/leds, e.g. \"ACT\"",
                });
            }
        }
    }
    Ok(pins)
}

/// Shows the node's condition on `backend` until `cancel`, then switches every light off.
///
/// `lights` carries the pattern from [`crate::health::lights`]; each `activity.notify_one()`
/// (one per finished task) flashes the activity light once. A single timer serves both the
/// blinking and the activity flash. Every backend call runs on tokio's blocking pool, so a
/// slow GPIO or file write never holds up an async worker.
///
/// Give the driver a token of its own, cancelled after everything else has stopped, so that
/// the lights can still show the stop (and [`fatal_then_off`]) before going dark.
///
/// A backend that fails is reported once (and once more when it recovers) and the driver
/// keeps going: the lights are an indicator, and losing them must not stop tasks being
/// served.
pub fn spawn_driver(
    backend: Box<dyn LedBackend>,
    mut lights: watch::Receiver<Lights>,
    activity: Arc<Notify>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> JoinHandle<()> {
    tracker.spawn(async move {
        run_driver(backend, &mut lights, &activity, &cancel).await;
    })
}

async fn run_driver(
    backend: Box<dyn LedBackend>,
    lights: &mut watch::Receiver<Lights>,
    activity: &Notify,
    cancel: &CancellationToken,
) {
    let mut driver = Driver {
        backend,
        failing: false,
    };
    let mut schedule = Schedule::new(Instant::now());
    let mut pattern = *lights.borrow_and_update();
    let mut sender_alive = true;
    let mut shown = None;
    loop {
        let now = Instant::now();
        schedule.advance(now);
        let out = schedule.output(&pattern, now);
        if shown != Some(out) {
            let Some(next) = driver.apply(out.0, out.1).await else {
                return;
            };
            driver = next;
            shown = Some(out);
        }
        let deadline = schedule.next_deadline(&pattern, now);
        // Each branch is cancel-safe: `changed` keeps its version mark, and a `Notified`
        // dropped after `notify_one` reached it hands the permit back to the `Notify`.
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = lights.changed(), if sender_alive => match changed {
                Ok(()) => {
                    pattern = *lights.borrow_and_update();
                    // A pattern that starts blinking starts lit, at once.
                    schedule.restart_blink(Instant::now());
                }
                // The health side has gone (shutting down): keep the last pattern.
                Err(_) => sender_alive = false,
            },
            () = activity.notified() => schedule.activity(Instant::now()),
            () = sleep_until_some(deadline) => {}
        }
    }
    if driver.apply(Lights::all_off(), false).await.is_some() {
        log::debug!(event = "leds_off"; "LEDs off");
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The backend, moved into the blocking pool for each call and back.
struct Driver {
    backend: Box<dyn LedBackend>,
    /// Whether the last call failed, so a broken LED is reported once, not twice a second.
    failing: bool,
}

impl Driver {
    async fn apply(mut self, lights: Lights, phase_on: bool) -> Option<Self> {
        let joined = tokio::task::spawn_blocking(move || {
            let result = self.backend.apply(&lights, phase_on);
            (self, result)
        })
        .await;
        let (mut driver, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                log::error!(event = "leds_failed"; "the LED backend panicked; lights no longer driven: {e}");
                return None;
            }
        };
        match result {
            Err(e) if !driver.failing => {
                log::warn!(event = "leds_failed"; "{} LEDs: {e}", driver.backend.name());
                driver.failing = true;
            }
            Ok(()) if driver.failing => {
                log::info!(event = "leds_recovered"; "{} LEDs work again", driver.backend.name());
                driver.failing = false;
            }
            _ => {}
        }
        Some(driver)
    }
}

/// The driver's sense of time, free of I/O: which blink phase it is, and the activity flash.
#[derive(Debug)]
struct Schedule {
    /// When the current pattern's blinking started: phases count from here.
    blink_epoch: Instant,
    pulse: Pulse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pulse {
    Idle,
    /// Lit until `until`; `pending`: another task finished meanwhile.
    On {
        until: Instant,
        pending: bool,
    },
    /// Dark until `until` so two flashes stay apart.
    Rest {
        until: Instant,
        pending: bool,
    },
}

impl Schedule {
    fn new(now: Instant) -> Self {
        Schedule {
            blink_epoch: now,
            pulse: Pulse::Idle,
        }
    }

    fn restart_blink(&mut self, now: Instant) {
        self.blink_epoch = now;
    }

    /// One task finished.
    fn activity(&mut self, now: Instant) {
        self.pulse = match self.pulse {
            Pulse::Idle => Pulse::On {
                until: now + ACTIVITY_BLINK,
                pending: false,
            },
            Pulse::On { until, .. } => Pulse::On {
                until,
                pending: true,
            },
            Pulse::Rest { until, .. } => Pulse::Rest {
                until,
                pending: true,
            },
        };
    }

    /// Moves the flash on to where it is at `now`.
    fn advance(&mut self, now: Instant) {
        loop {
            self.pulse = match self.pulse {
                Pulse::On { until, pending } if until <= now => Pulse::Rest {
                    until: until + ACTIVITY_BLINK,
                    pending,
                },
                Pulse::Rest {
                    until,
                    pending: true,
                } if until <= now => Pulse::On {
                    until: now + ACTIVITY_BLINK,
                    pending: false,
                },
                Pulse::Rest {
                    until,
                    pending: false,
                } if until <= now => Pulse::Idle,
                _ => return,
            };
        }
    }

    fn half_period() -> Duration {
        BLINK_PERIOD / 2
    }

    fn half_periods_since_epoch(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.blink_epoch).as_nanos() / Self::half_period().as_nanos()
    }

    /// What to show at `now`: the pattern with the activity flash laid over it, and the blink
    /// phase (always `true` when nothing blinks, so phase flips then change nothing).
    fn output(&self, pattern: &Lights, now: Instant) -> (Lights, bool) {
        let mut shown = *pattern;
        if matches!(self.pulse, Pulse::On { .. }) && shown.activity == LightState::Off {
            shown.activity = LightState::On;
        }
        let phase_on =
            !shown.any_blinking() || self.half_periods_since_epoch(now).is_multiple_of(2);
        (shown, phase_on)
    }

    /// When the output next changes by itself, if ever.
    fn next_deadline(&self, pattern: &Lights, now: Instant) -> Option<Instant> {
        let pulse = match self.pulse {
            Pulse::Idle => None,
            Pulse::On { until, .. } | Pulse::Rest { until, .. } => Some(until),
        };
        let flip = pattern.any_blinking().then(|| {
            let next = self.half_periods_since_epoch(now) + 1;
            // A half period is 500 ms, so this count fits a u32 for 68 years of one pattern.
            let next = u32::try_from(next).unwrap_or(u32::MAX);
            self.blink_epoch + Self::half_period() * next
        });
        match (pulse, flip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// After a fatal error: blinks red for [`FATAL_SHOW`], then stops the driver (`driver_stop`,
/// the token given to [`spawn_driver`]), which switches every light off. Red blinking is the
/// SPEC's "the daemon cannot serve", which is what someone at the box needs to know.
pub async fn fatal_then_off(lights: &watch::Sender<Lights>, driver_stop: &CancellationToken) {
    lights.send_replace(Lights {
        red: LightState::Blink,
        ..Lights::all_off()
    });
    tokio::time::sleep(FATAL_SHOW).await;
    driver_stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthState, lights as lights_for};

    fn cfg(backend: LedBackendKind) -> LedConfig {
        LedConfig {
            backend,
            chip: None,
            green: Some(LedPin::Line(17)),
            amber: Some(LedPin::Line(27)),
            red: Some(LedPin::Line(22)),
            activity: Some(LedPin::Line(23)),
            path: None,
        }
    }

    /// Whether this machine has GPIO, in which case "fails here" cannot be tested.
    fn has_gpio() -> bool {
        std::path::Path::new("/dev/gpiomem").exists()
            || std::path::Path::new(gpiochip::DEFAULT_CHIP).exists()
    }

    fn open_err(cfg: &LedConfig) -> String {
        match open(cfg) {
            Ok(b) => panic!("{} opened on a machine without GPIO", b.name()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn explicit_rppal_without_gpio_fails_naming_the_other_backends() {
        if has_gpio() {
            eprintln!("skipped: this machine has GPIO");
            return;
        }
        let msg = open_err(&cfg(LedBackendKind::Rppal));
        assert!(msg.starts_with("rppal cannot drive GPIO here ("), "{msg}");
        for other in ["\"gpiochip\"", "\"sysfs\"", "\"file\"", "\"none\""] {
            assert!(msg.contains(other), "{msg}");
        }
    }

    #[test]
    fn explicit_gpiochip_without_gpio_fails_naming_the_other_backends() {
        if has_gpio() {
            eprintln!("skipped: this machine has GPIO");
            return;
        }
        let msg = open_err(&cfg(LedBackendKind::Gpiochip));
        assert!(
            msg.starts_with("gpiochip cannot drive GPIO lines on /dev/gpiochip0 ("),
            "{msg}"
        );
        for other in ["\"rppal\"", "\"sysfs\"", "\"file\"", "\"none\""] {
            assert!(msg.contains(other), "{msg}");
        }
        let mut elsewhere = cfg(LedBackendKind::Gpiochip);
        elsewhere.chip = Some(PathBuf::from("/dev/gpiochip7"));
        assert!(open_err(&elsewhere).contains("/dev/gpiochip7"));
    }

    #[test]
    fn auto_without_gpio_runs_without_lights() {
        if has_gpio() {
            eprintln!("skipped: this machine has GPIO");
            return;
        }
        let backend = open(&cfg(LedBackendKind::Auto)).unwrap();
        assert_eq!(backend.name(), "none");
    }

    #[test]
    fn a_name_for_a_gpio_backend_is_refused_not_skipped() {
        let mut c = cfg(LedBackendKind::Auto);
        c.green = Some(LedPin::Name("ACT".into()));
        let msg = open_err(&c);
        assert!(msg.contains("[leds] green = \"ACT\""), "{msg}");
        let mut c = cfg(LedBackendKind::Sysfs);
        c.green = Some(LedPin::Name("ACT".into()));
        let msg = open_err(&c);
        assert!(msg.contains("[leds] amber = 27"), "{msg}");
    }

    #[test]
    fn file_backend_needs_a_path() {
        assert!(open_err(&cfg(LedBackendKind::File)).contains("needs path"));
    }

    #[test]
    fn blinking_alternates_every_half_period_from_the_change() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let amber_blink = lights_for(None, false, true);
        let half = BLINK_PERIOD / 2;
        assert!(s.output(&amber_blink, t0).1);
        assert_eq!(s.next_deadline(&amber_blink, t0), Some(t0 + half));
        assert!(!s.output(&amber_blink, t0 + half).1);
        assert!(s.output(&amber_blink, t0 + half * 2).1);
        s.restart_blink(t0 + half);
        assert!(s.output(&amber_blink, t0 + half).1);
        let steady = lights_for(Some(HealthState::Healthy), true, true);
        assert_eq!(s.next_deadline(&steady, t0), None);
        assert_eq!(s.output(&steady, t0 + half * 2), (steady, true));
    }

    #[test]
    fn activity_flashes_once_per_task_and_bursts_stay_apart() {
        let t0 = Instant::now();
        let steady = lights_for(Some(HealthState::Healthy), true, true);
        let mut s = Schedule::new(t0);
        s.activity(t0);
        s.activity(t0); // a second task in the same instant
        assert_eq!(s.output(&steady, t0).0.activity, LightState::On);
        assert_eq!(s.next_deadline(&steady, t0), Some(t0 + ACTIVITY_BLINK));
        let t1 = t0 + ACTIVITY_BLINK;
        s.advance(t1);
        assert_eq!(s.output(&steady, t1).0.activity, LightState::Off);
        let t2 = t1 + ACTIVITY_BLINK;
        s.advance(t2);
        assert_eq!(
            s.output(&steady, t2).0.activity,
            LightState::On,
            "second flash"
        );
        let t3 = t2 + ACTIVITY_BLINK * 2;
        s.advance(t3);
        assert_eq!(s.output(&steady, t3).0.activity, LightState::Off);
        assert_eq!(s.next_deadline(&steady, t3), None, "idle again");
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<(Lights, bool)>>>);

    impl LedBackend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn apply(&mut self, lights: &Lights, phase_on: bool) -> Result<(), LedError> {
            self.0.lock().unwrap().push((*lights, phase_on));
            Ok(())
        }
    }

    /// Polls `path` until it holds `want`, for up to a few seconds.
    async fn wait_for_file(path: &std::path::Path, want: &str) {
        let mut last = String::new();
        for _ in 0..200 {
            last = std::fs::read_to_string(path).unwrap_or_default();
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} holds {last:?}, not {want:?}", path.display());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn driver_writes_each_pattern_and_all_off_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leds.json");
        let backend = Box::new(FileLeds::new(path.clone(), Light::ALL.to_vec()));
        let (tx, rx) = watch::channel(Lights::all_off());
        let activity = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        spawn_driver(backend, rx, activity.clone(), cancel.clone(), &tracker);
        tracker.close();

        let off = r#"{"green":"off","amber":"off","red":"off","activity":"off"}"#;
        wait_for_file(&path, off).await;
        tx.send(lights_for(Some(HealthState::Healthy), true, true))
            .unwrap();
        let healthy = r#"{"green":"on","amber":"off","red":"off","activity":"off"}"#;
        wait_for_file(&path, healthy).await;
        tx.send(lights_for(Some(HealthState::Healthy), false, true))
            .unwrap();
        wait_for_file(
            &path,
            r#"{"green":"off","amber":"blink","red":"off","activity":"off"}"#,
        )
        .await;

        cancel.cancel();
        tracker.wait().await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), off);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fatal_blinks_red_then_goes_dark() {
        let rec = Recorder::default();
        let (tx, rx) = watch::channel(lights_for(Some(HealthState::Healthy), true, true));
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        spawn_driver(
            Box::new(rec.clone()),
            rx,
            Arc::new(Notify::new()),
            stop.clone(),
            &tracker,
        );
        tracker.close();
        fatal_then_off(&tx, &stop).await;
        tracker.wait().await;
        let calls = rec.0.lock().unwrap().clone();
        let (last, rest) = calls.split_last().unwrap();
        assert_eq!(last.0, Lights::all_off());
        let red: Vec<bool> = rest
            .iter()
            .filter(|(l, _)| l.red == LightState::Blink && l.green == LightState::Off)
            .map(|(_, phase)| *phase)
            .collect();
        assert!(red.contains(&true) && red.contains(&false), "{calls:?}");
    }

    /// Polls the recorded calls until `done` holds, for up to a few seconds.
    async fn wait_for_calls(rec: &Recorder, done: impl Fn(&[(Lights, bool)]) -> bool) {
        for _ in 0..300 {
            if done(&rec.0.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("calls so far: {:?}", rec.0.lock().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_finished_task_flashes_the_activity_light_once() {
        let rec = Recorder::default();
        let healthy = lights_for(Some(HealthState::Healthy), true, true);
        let (_tx, rx) = watch::channel(healthy);
        let activity = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        spawn_driver(
            Box::new(rec.clone()),
            rx,
            activity.clone(),
            cancel.clone(),
            &tracker,
        );
        let flashes = |calls: &[(Lights, bool)]| {
            calls
                .windows(2)
                .filter(|w| w[0].0.activity == LightState::Off && w[1].0.activity == LightState::On)
                .count()
        };
        activity.notify_one();
        wait_for_calls(&rec, |c| {
            flashes(c) == 1 && c.last().is_some_and(|l| l.0.activity == LightState::Off)
        })
        .await;
        activity.notify_one();
        wait_for_calls(&rec, |c| {
            flashes(c) == 2 && c.last().is_some_and(|l| l.0.activity == LightState::Off)
        })
        .await;
        let calls = rec.0.lock().unwrap().clone();
        assert!(
            calls.iter().all(|(l, _)| l.green == LightState::On),
            "{calls:?}"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn driver_gives_hardware_both_blink_phases() {
        let rec = Recorder::default();
        let (_tx, rx) = watch::channel(lights_for(None, true, false));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        spawn_driver(
            Box::new(rec.clone()),
            rx,
            Arc::new(Notify::new()),
            cancel.clone(),
            &tracker,
        );
        tokio::time::sleep(BLINK_PERIOD * 2).await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        let calls = rec.0.lock().unwrap().clone();
        let blinking: Vec<bool> = calls
            .iter()
            .filter(|(l, _)| l.red == LightState::Blink)
            .map(|(_, p)| *p)
            .collect();
        assert!(blinking.len() >= 3, "{calls:?}");
        assert!(blinking.windows(2).all(|w| w[0] != w[1]), "{blinking:?}");
        assert_eq!(calls.last().unwrap().0, Lights::all_off());
    }
}
