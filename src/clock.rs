//! Wall time for the budgets: never earlier than the latest time recorded (a Pi has
//! no real-time clock and may boot with an old time), and whether the system clock is
//! synchronised, without which no daily window may reset.

use std::path::Path;
use std::sync::Mutex;

use jiff::Timestamp;

/// systemd-timesyncd creates this once it has synchronised the clock.
const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// The seam through which the daemon reads time; tests drive their own.
pub trait Clock: Send + Sync {
    /// The system's wall time, unguarded.
    fn wall(&self) -> Timestamp;
    /// Whether the wall time can be trusted across days.
    fn synchronised(&self) -> bool;
}

/// The real system clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    /// `trust_unsynchronised_clock`: the machine keeps time from boot (an RTC with a battery).
    pub trust_unsynchronised: bool,
}

impl Clock for SystemClock {
    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }

    fn synchronised(&self) -> bool {
        self.trust_unsynchronised || Path::new(TIMESYNC_FLAG).exists() || kernel_synchronised()
    }
}

/// The kernel's own flag: `adjtimex` answers TIME_ERROR while STA_UNSYNC is set.
fn kernel_synchronised() -> bool {
    // SAFETY: ntp_adjtime with modes = 0 only reads the kernel's state into the
    // zeroed struct we own; it has no other effect.
    let state = unsafe {
        let mut timex: libc::timex = std::mem::zeroed();
        libc::ntp_adjtime(&mut timex)
    };
    state >= 0 && state != libc::TIME_ERROR
}

/// Time as the budgets see it: the wall clock, held at the latest time ever seen so it
/// never runs backwards.
pub struct GuardedClock {
    source: Box<dyn Clock>,
    latest: Mutex<Timestamp>,
}

impl GuardedClock {
    /// `latest`: the latest time recorded before (from the store), if any.
    pub fn new(source: Box<dyn Clock>, latest: Option<Timestamp>) -> Self {
        Self {
            source,
            latest: Mutex::new(latest.unwrap_or(Timestamp::UNIX_EPOCH)),
        }
    }

    /// The wall time, or the latest time seen when the wall clock is behind it.
    pub fn now(&self) -> Timestamp {
        let wall = self.source.wall();
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if wall > *latest {
            *latest = wall;
        } else if *latest - wall > jiff::SignedDuration::from_secs(1) {
            log::debug!("the wall clock is behind the latest recorded time; holding at {latest}");
        }
        *latest
    }

    pub fn synchronised(&self) -> bool {
        self.source.synchronised()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct Manual(Arc<AtomicI64>);

    impl Clock for Manual {
        fn wall(&self) -> Timestamp {
            Timestamp::from_second(self.0.load(Ordering::SeqCst)).unwrap()
        }
        fn synchronised(&self) -> bool {
            false
        }
    }

    #[test]
    fn never_runs_backwards() {
        let t = Arc::new(AtomicI64::new(2_000_000_000));
        let clock = GuardedClock::new(
            Box::new(Manual(t.clone())),
            Some(Timestamp::from_second(1_900_000_000).unwrap()),
        );
        assert_eq!(clock.now().as_second(), 2_000_000_000);
        t.store(1_000_000_000, Ordering::SeqCst);
        assert_eq!(clock.now().as_second(), 2_000_000_000);
        t.store(2_000_000_100, Ordering::SeqCst);
        assert_eq!(clock.now().as_second(), 2_000_000_100);
    }

    #[test]
    fn recorded_time_wins_over_an_old_boot_clock() {
        let t = Arc::new(AtomicI64::new(1_000));
        let clock = GuardedClock::new(
            Box::new(Manual(t)),
            Some(Timestamp::from_second(1_800_000_000).unwrap()),
        );
        assert_eq!(clock.now().as_second(), 1_800_000_000);
        assert!(!clock.synchronised());
    }
}
