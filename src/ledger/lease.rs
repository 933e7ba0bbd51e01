//! Leases: budget charged ahead and persisted, so that most reservations need no
//! commit of their own and a crash never hands out budget twice.

use super::Budget;
use super::cost::{Cost, Dim};
use super::window::{Meter, View, minute_slot};

/// How far back the demand that sizes a new lease is measured.
const LEASE_DEMAND_SPAN_MS: i64 = 5_000;
/// A new lease covers this many times the demand of the last `LEASE_DEMAND_SPAN_MS`,
/// i.e. about ten seconds of steady load: under steady load a budget commits well
/// under once a second, and a quickening load doubles its lease at each commit.
const LEASE_DEMAND_FACTOR: u64 = 2;
/// How long a lease may be drawn on. The persisted snapshot counts an unused lease
/// as spent at its expiry, so it must not be drawn on after that instant; longer
/// than the demand it covers, so that a lease is not dropped half used.
pub(super) const LEASE_LIFETIME_MS: i64 = 10_000;

/// Budget charged ahead and persisted; see [`Ledger::reserve`](super::Ledger::reserve).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Lease {
    pub(super) left: Cost,
    /// Milliseconds; the lease may not be drawn on after this instant.
    pub(super) expires: i64,
    /// Its number in [`Ledger::leases_opened`](super::Ledger::leases_opened)'s count.
    pub(super) number: u64,
}

impl Budget {
    pub(super) fn lease_valid(&self, now: i64) -> bool {
        self.lease.expires >= now && !self.lease.left.is_zero()
    }

    /// A new lease for a reservation of `cost` that fits now.
    pub(super) fn new_lease(&self, cost: Cost, view: &View) -> Cost {
        let since = minute_slot(view.now.saturating_sub(LEASE_DEMAND_SPAN_MS));
        let demand = self
            .minute
            .range(since..)
            .fold(Cost::default(), |acc, (_, c)| acc.plus(*c));
        let mut size = Cost {
            requests: cost
                .requests
                .max(demand.requests.saturating_mul(LEASE_DEMAND_FACTOR)),
            tokens: cost
                .tokens
                .max(demand.tokens.saturating_mul(LEASE_DEMAND_FACTOR)),
        };
        // Never more than every window still allows (the cost itself fits: room is Now).
        for meter in Meter::ALL {
            if let Some(left) = self.left(meter, view) {
                let cap = left.max(cost.get(meter.dim()));
                match meter.dim() {
                    Dim::Requests => size.requests = size.requests.min(cap),
                    Dim::Tokens => size.tokens = size.tokens.min(cap),
                }
            }
        }
        size
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::DailyReset;
    use crate::ledger::{Ledger, Room};

    use crate::ledger::tests::*;

    #[test]
    fn a_lease_spares_commits_under_steady_load() {
        let (mut l, b) = one(limits(Some(1000), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        let first = l.reserve(&b, REQ, t0, true).expect("fits");
        assert!(first.needs_commit);
        let mut commits = 0;
        let mut tail = Vec::new();
        // Five requests a second for 20 s.
        for i in 1..100u64 {
            let r = l
                .reserve(&b, REQ, t0 + Duration::from_millis(200 * i), true)
                .expect("fits");
            commits += u32::from(r.needs_commit);
            if i >= 60 {
                tail.push(r.needs_commit);
            }
        }
        // Ramp-up doubles the lease; then about one commit per ten seconds.
        assert!(commits <= 10, "{commits} commits");
        assert!(tail.iter().filter(|c| **c).count() <= 2, "{tail:?}");
        assert!(!tail[..5].iter().all(|c| *c));
    }

    #[test]
    fn a_reservation_waits_only_for_the_lease_it_draws_on() {
        let mut l = Ledger::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("m", limits(Some(1000), None, None, None))],
            &[("k1", None), ("k2", None)],
        )]));
        let b1 = l.budget_for("k1", "m").cloned().expect("b1");
        let b2 = l.budget_for("k2", "m").cloned().expect("b2");
        let t0 = at("2026-01-01T00:00:00Z");
        // k1 under load, until its lease covers more than the request that opened it.
        let opened = (0..10)
            .map(|_| l.reserve(&b1, REQ, t0, true).expect("fits"))
            .filter(|r| r.needs_commit)
            .last()
            .expect("k1 opened a lease");
        let k1_lease = opened.lease();
        assert_eq!(k1_lease, l.leases_opened());
        // k2 opens a lease of its own, not on disk yet.
        let other = l.reserve(&b2, REQ, t0, true).expect("fits");
        assert!(other.needs_commit);
        assert!(other.lease() > k1_lease);
        // k1's next request draws on k1's lease: a snapshot taken before k2's lease
        // covers it, so it need not wait for k2's commit.
        let again = l.reserve(&b1, REQ, t0, true).expect("fits");
        assert!(!again.needs_commit);
        assert_eq!(again.lease(), k1_lease);
        assert_eq!(l.leases_opened(), other.lease());
    }

    #[test]
    fn the_lease_never_exceeds_the_window() {
        let (mut l, b) = one(limits(Some(3), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        for i in 0..3u64 {
            l.reserve(&b, REQ, t0 + Duration::from_millis(100 * i), true)
                .expect("fits");
        }
        let rows = l.snapshot_dirty();
        let mut restored = one(limits(Some(3), None, None, None), DailyReset::Rolling).0;
        restored.restore(rows).expect("restores");
        // The window is full: whatever the lease held, at most the limit is on disk.
        let t = t0 + secs(61);
        assert_eq!(restored.room(&b, REQ, t, true), Room::Now);
    }
}
