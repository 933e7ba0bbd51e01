//! The process's side of systemd (SPEC §6): readiness, status and watchdog notifications,
//! and the signals that stop the daemon. It only reports and listens; what happens on
//! shutdown (stop intake, drain, commit, `offline`, LEDs off) is `relay`'s.
//!
//! Every `notify_*` function is a no-op when `NOTIFY_SOCKET` is unset, i.e. when the daemon
//! is not run by systemd with `Type=notify`.

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long tasks in flight get to finish or be handed back after SIGTERM (SPEC §6).
/// Must stay below the unit's `TimeoutStopSec=` (15 s), which also has to cover flushing the
/// store, publishing `offline` and switching the LEDs off, or systemd SIGKILLs a clean stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Tells systemd that start-up is finished (subscribed, serving).
pub fn notify_ready() {
    send(&[NotifyState::Ready], "READY");
}

/// A one-line summary shown by `systemctl status`. Line breaks would end the field early,
/// so they become spaces.
pub fn notify_status(status: &str) {
    let line = status.replace(['\n', '\r'], " ");
    send(&[NotifyState::Status(&line)], "STATUS");
}

/// Tells systemd that the daemon is shutting down, so the stop is not mistaken for a hang.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping], "STOPPING");
}

/// How often to call [`notify_watchdog`]: half of the unit's `WatchdogSec=`, as
/// `sd_watchdog_enabled(3)` recommends, so one late ping is not yet a failure. `None` when
/// systemd watches nothing (or watches another process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Tells systemd the daemon is alive. Call it from the loop that does the work, so that a
/// hang there stops the pings and systemd restarts the daemon.
pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog], "WATCHDOG");
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(state) {
        // systemd runs us but cannot be told: with Type=notify the start will time out and
        // say why in its own log, so a warning here is all that helps.
        log::warn!(event = "sd_notify_failed"; "telling systemd {what}: {e}");
    }
}

/// A signal that stops the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: systemd's stop.
    Terminate,
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
        }
    }

    /// The shell's convention for "killed by this signal", 128 + its number.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Terminate => 128 + 15,
            Signal::Interrupt => 128 + 2,
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment this is built (which must be inside a tokio
/// runtime); from then on neither kills the process by itself.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT. Cancel-safe: a signal that arrives while nobody waits is
    /// kept for the next call.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.term.recv() => Signal::Terminate,
            Some(()) = self.int.recv() => Signal::Interrupt,
            // Both streams ended: tokio's signal driver is gone with the runtime, and nothing
            // can arrive any more.
            else => std::future::pending().await,
        }
    }
}

/// Catches SIGTERM and SIGINT from now on. The first cancels `cancel`, starting the clean
/// stop; the next one exits the process at once, with 128 + the signal's number, for an
/// operator who does not want to wait for the drain. When the stop began otherwise (a failed
/// subsystem), it takes two signals: the first one only says the daemon is already stopping.
///
/// The listening task is in `tracker` until the stop begins, so that it never holds up
/// `tracker.wait()`; the watch for the forcing signal then runs outside any tracker, because
/// it has to outlive the drain it cuts short, and ends with the runtime.
pub fn spawn_signal_handler(cancel: CancellationToken, tracker: &TaskTracker) -> io::Result<()> {
    // Registered before spawning, so a signal right after this returns is already ours.
    let mut signals = Signals::new()?;
    tracker.spawn(async move {
        let mut before_exit = 1;
        tokio::select! {
            first = signals.recv() => {
                log::info!(
                    event = "shutdown";
                    "{}: stopping; tasks in flight get {} s (again to exit at once)",
                    first.name(),
                    SHUTDOWN_GRACE.as_secs()
                );
                cancel.cancel();
            }
            () = cancel.cancelled() => before_exit = 2,
        }
        tokio::spawn(async move {
            loop {
                let signal = signals.recv().await;
                before_exit -= 1;
                if before_exit == 0 {
                    log::warn!(event = "shutdown_forced"; "{}: exiting without a clean stop", signal.name());
                    log::logger().flush();
                    std::process::exit(signal.exit_code());
                }
                log::info!(event = "shutdown"; "{}: already stopping (again to exit at once)", signal.name());
            }
        });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;

    /// Runs one `#[ignore]`d test of this module in a child process with `envs`, so that
    /// environment variables and signals never touch the other tests of this binary.
    fn run_child(test: &str, envs: &[(&str, &std::ffi::OsStr)]) -> std::process::ExitStatus {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            test,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.status().unwrap()
    }

    #[test]
    fn notifications_reach_systemd_as_its_exact_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let status = run_child(
            "service::tests::child_sends_notifications",
            &[
                ("NOTIFY_SOCKET", path.as_os_str()),
                ("WATCHDOG_USEC", "30000000".as_ref()),
            ],
        );
        assert!(status.success(), "child: {status}");
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            let n = socket.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\n",
                "STATUS=healthy: 8 keys ready, queue 0 (broker up)\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
    }

    #[test]
    #[ignore = "run in a child process by notifications_reach_systemd_as_its_exact_datagrams"]
    fn child_sends_notifications() {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        // WatchdogSec=30 → ping every 15 s.
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
        notify_ready();
        notify_status("healthy: 8 keys ready, queue 0\n(broker up)");
        notify_watchdog();
        notify_stopping();
    }

    #[test]
    fn a_second_signal_exits_at_once_with_its_code() {
        let status = run_child(
            "service::tests::child_gets_two_signals",
            &[("KEYRELAY_SIGNAL_CHILD", "signal".as_ref())],
        );
        // SIGTERM stopped it, SIGINT forced the exit.
        assert_eq!(
            status.code(),
            Some(Signal::Interrupt.exit_code()),
            "{status}"
        );
    }

    #[test]
    fn a_stop_not_from_a_signal_takes_two_to_force() {
        let status = run_child(
            "service::tests::child_gets_two_signals",
            &[("KEYRELAY_SIGNAL_CHILD", "failure".as_ref())],
        );
        // A SIGTERM that forced the exit would have made it 143.
        assert_eq!(
            status.code(),
            Some(Signal::Interrupt.exit_code()),
            "{status}"
        );
    }

    #[test]
    #[ignore = "run in a child process by the two tests above"]
    fn child_gets_two_signals() {
        use nix::sys::signal::{Signal as NixSignal, raise};
        let Some(how) = std::env::var_os("KEYRELAY_SIGNAL_CHILD") else {
            return;
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let cancel = CancellationToken::new();
            let tracker = TaskTracker::new();
            spawn_signal_handler(cancel.clone(), &tracker).unwrap();
            if how == "signal" {
                raise(NixSignal::SIGTERM).unwrap();
            } else {
                cancel.cancel();
            }
            tokio::time::timeout(Duration::from_secs(10), cancel.cancelled())
                .await
                .expect("the stop begins");
            tracker.close();
            tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .expect("the tracked part ends with the stop");
            if how != "signal" {
                raise(NixSignal::SIGTERM).unwrap();
                // Both signals pending at once would reach the watcher in either order; let
                // this one be taken first.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            raise(NixSignal::SIGINT).unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        panic!("the forcing signal should have ended the process");
    }

    #[tokio::test]
    async fn a_signal_is_received_under_its_name() {
        // Raising a signal in the test process is safe once tokio's handler is registered
        // (it stays for the life of the process); the exit on a second one is tested in a child.
        let mut signals = Signals::new().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
        assert_eq!(signals.recv().await, Signal::Interrupt);
    }
}
