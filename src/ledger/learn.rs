//! Learning from the providers: `x-ratelimit-*` headers correct what the ledger counts
//! and lower its limits; a 429 that names a limit lowers it for a while. Downward only:
//! nothing learned ever gives more than the config.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::cost::{Cost, Dim};
use super::window::{
    DAY_WINDOW_MS, DayRule, MINUTE_WINDOW_MS, Meter, View, Window, duration_ms, ms, ts,
};
use super::{Budget, BudgetId, Ledger};
use crate::provider::{RateLimitHeaders, Violation};

/// A header reset delay up to this is a per-minute limit; longer is per day.
const HEADER_MINUTE_RESET_MAX: Duration = Duration::from_secs(60);
/// A header `limit` is taken to be the configured limit it is within this factor of
/// (Groq sends the day's request limit and the minute's token limit side by side).
const LIMIT_MATCH_FACTOR: f64 = 2.0;

/// How long a limit a 429 stated stays in force. Headers restate theirs with every
/// answer, but a 429 is the only word on a limit no header reports (every Gemini
/// limit): without an end, a raised quota (a paid tier) would never be used. Learning
/// it again costs one 429 a day.
const STATED_LIMIT_LIFETIME_MS: i64 = DAY_WINDOW_MS;
/// How long a minute limit guessed from a 429 that gave no value stays in force. The
/// guess (what the ledger counts as accepted in the window) may be low, e.g. when the
/// provider refused because of someone else's use of the account, so the configured
/// limit comes back after it; learning it again costs one 429 an hour.
const COUNTED_LIMIT_LIFETIME_MS: i64 = 3_600_000;

/// Usage the provider reported that the ledger had not counted, held until the
/// provider's reset time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Correction {
    pub(super) extra: u64,
    pub(super) until: Timestamp,
}

/// Which window a pair of `x-ratelimit-*` headers describes.
fn classify(
    limit: Option<u64>,
    reset: Option<Duration>,
    minute_limit: Option<u64>,
    day_limit: Option<u64>,
) -> Option<Window> {
    if let Some(limit) = limit {
        // Matching the configured limits is the surer sign: Groq's day request budget
        // can report a reset of a few seconds when the day limit is generous.
        let distance = |configured: Option<u64>| {
            configured
                .filter(|c| *c > 0 && limit > 0)
                .map(|c| (limit as f64 / c as f64).ln().abs())
                .filter(|d| *d <= LIMIT_MATCH_FACTOR.ln())
        };
        match (distance(minute_limit), distance(day_limit)) {
            (Some(m), Some(d)) => return Some(if m <= d { Window::Minute } else { Window::Day }),
            (Some(_), None) => return Some(Window::Minute),
            (None, Some(_)) => return Some(Window::Day),
            (None, None) => {}
        }
    }
    reset.map(|r| {
        if r <= HEADER_MINUTE_RESET_MAX {
            Window::Minute
        } else {
            Window::Day
        }
    })
}

impl Budget {
    /// The limit in force: the configured one, or a smaller one the provider announced.
    pub(super) fn limit(&self, meter: Meter, now: i64) -> Option<u64> {
        match (meter.configured(&self.limits), self.learned(meter, now)) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    }

    /// The learned limit of `meter`, while it is in force.
    pub(super) fn learned(&self, meter: Meter, now: i64) -> Option<u64> {
        let i = meter.index();
        self.learned[i].filter(|_| self.learned_until[i].is_none_or(|until| until > now))
    }

    /// When the learned limit of `meter` stops being in force, if it is in force now and
    /// ever stops.
    pub(super) fn learned_expiry(&self, meter: Meter, now: i64) -> Option<i64> {
        self.learned(meter, now)
            .and(self.learned_until[meter.index()])
    }

    /// What the provider said `meter`'s limit is: below the configured limit it is in
    /// force until `until` (`None`: until the provider says otherwise); at or above it,
    /// the configured one is. The one way every learned limit is set. Returns whether
    /// anything changed.
    fn set_learned(&mut self, meter: Meter, limit: u64, until: Option<i64>) -> bool {
        let learned = match meter.configured(&self.limits) {
            Some(configured) if limit >= configured => None,
            _ => Some(limit),
        };
        let until = learned.and(until);
        let i = meter.index();
        if self.learned[i] == learned && self.learned_until[i] == until {
            return false;
        }
        self.learned[i] = learned;
        self.learned_until[i] = until;
        self.dirty = true;
        true
    }

    pub(super) fn correction(&self, meter: Meter, now: i64) -> Option<Correction> {
        self.corrections[meter.index()].filter(|c| ms(c.until) > now)
    }

    /// What the provider has accepted in `dim` in the minute window, as far as the
    /// ledger knows: what it counts, less the requests still in flight (charged at
    /// their estimates, and not known to be accepted).
    fn accepted_in_minute(&self, dim: Dim, view: &View) -> u64 {
        let in_flight = self
            .open
            .values()
            .filter(|(_, m, _)| self.minute_live(*m, view))
            .map(|(c, _, _)| c.get(dim))
            .fold(0, u64::saturating_add);
        self.used(Meter::of(Window::Minute, dim), view)
            .saturating_sub(in_flight)
    }
}

impl Ledger {
    /// Corrects the budget from a response's `x-ratelimit-*` headers, downward only: a
    /// `remaining` below the ledger's idea raises the count until the header's reset; a
    /// `limit` below the configured one replaces it (until a later header says
    /// otherwise, never above the config). Returns `true` when something changed that
    /// the caller should commit soon.
    pub fn learn(&mut self, budget: &BudgetId, headers: &RateLimitHeaders, now: Timestamp) -> bool {
        let now = ms(self.observe_time(now));
        let synced = self.last_synced.unwrap_or(false);
        let Some(b) = self.budgets.get_mut(budget) else {
            return false;
        };
        let mut changed = false;
        let pairs = [
            (
                Dim::Requests,
                headers.limit_requests,
                headers.remaining_requests,
                headers.reset_requests,
            ),
            (
                Dim::Tokens,
                headers.limit_tokens,
                headers.remaining_tokens,
                headers.reset_tokens,
            ),
        ];
        for (dim, limit, remaining, reset) in pairs {
            if limit.is_none() && remaining.is_none() {
                continue;
            }
            let minute = Meter::of(Window::Minute, dim).configured(&b.limits);
            let day = Meter::of(Window::Day, dim).configured(&b.limits);
            let Some(window) = classify(limit, reset, minute, day) else {
                continue;
            };
            let meter = Meter::of(window, dim);
            if let Some(limit) = limit {
                changed |= b.set_learned(meter, limit, None);
            }
            let Some(remaining) = remaining else {
                continue;
            };
            let view = b.view(now, synced);
            let Some(limit) = b.limit(meter, now) else {
                continue;
            };
            if remaining >= limit.saturating_sub(b.used(meter, &view)) {
                continue;
            }
            // What the provider has counted that the ledger has not: its used count
            // minus ours, leaving out our requests still in flight (not in its count
            // yet, and charged in our slots regardless).
            let in_flight = b
                .open
                .values()
                .map(|(c, _, _)| c.get(dim))
                .fold(0, u64::saturating_add);
            let ours = b
                .used(meter, &view)
                .saturating_sub(b.correction(meter, now).map_or(0, |c| c.extra))
                .saturating_sub(in_flight);
            let theirs = limit.saturating_sub(remaining);
            let extra = theirs.saturating_sub(ours);
            let default_reset = match window {
                Window::Minute => MINUTE_WINDOW_MS,
                Window::Day => match view.day {
                    DayRule::Zone { next_midnight, .. } => next_midnight.saturating_sub(now),
                    DayRule::Rolling => DAY_WINDOW_MS,
                },
            };
            let until = now.saturating_add(reset.map_or(default_reset, duration_ms));
            let current = b.correction(meter, now);
            if current.is_none_or(|c| c.extra < extra) {
                let until = current.map_or(until, |c| until.max(ms(c.until)));
                b.corrections[meter.index()] = Some(Correction {
                    extra,
                    until: ts(until),
                });
                changed = true;
            }
        }
        b.dirty |= changed;
        changed
    }

    /// Lowers `budget`'s limits after a 429 that named the limits that refused
    /// (`violations`), for the request of `refused` cost. A limit whose value the
    /// provider stated takes that value, for [`STATED_LIMIT_LIFETIME_MS`]. A minute limit
    /// named without a value takes what the ledger counts as accepted in the window, but
    /// at least the refused request's cost, so that the key still serves one such request
    /// a minute, for [`COUNTED_LIMIT_LIFETIME_MS`]; a guess only ever lowers the limit in
    /// force. Either way the ledger stops handing out what the provider would refuse.
    /// Returns `true` when something changed that the caller should commit soon. Call it
    /// after releasing the refused reservation.
    pub fn learn_refusal(
        &mut self,
        budget: &BudgetId,
        violations: &[Violation],
        refused: Cost,
        now: Timestamp,
    ) -> bool {
        let now = ms(self.observe_time(now));
        let synced = self.last_synced.unwrap_or(false);
        let Some(b) = self.budgets.get_mut(budget) else {
            return false;
        };
        let view = b.view(now, synced);
        let mut changed = false;
        for violation in violations {
            let dim = Dim::from(violation.dimension);
            let meter = Meter::of(Window::from(violation.scope), dim);
            match (violation.limit, meter.window()) {
                (Some(limit), _) => {
                    changed |= b.set_learned(
                        meter,
                        limit,
                        Some(now.saturating_add(STATED_LIMIT_LIFETIME_MS)),
                    );
                }
                (None, Window::Minute) => {
                    let guess = b.accepted_in_minute(dim, &view).max(refused.get(dim));
                    if b.limit(meter, now).is_none_or(|limit| guess < limit) {
                        changed |= b.set_learned(
                            meter,
                            guess,
                            Some(now.saturating_add(COUNTED_LIMIT_LIFETIME_MS)),
                        );
                    }
                }
                // A daily limit without a value: the key is exhausted until the reset
                // anyway, and a day's count is no guess at the limit.
                (None, Window::Day) => {}
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use crate::config::DailyReset;
    use crate::ledger::Room;
    use crate::provider::{LimitDimension, LimitScope, Usage};

    use super::*;
    use crate::ledger::tests::*;

    #[test]
    fn groq_headers_lower_day_requests_and_minute_tokens() {
        let (mut l, b) = one(groq_limits(), DailyReset::Rolling);
        let t = at("2026-01-01T00:00:00Z");
        let headers = RateLimitHeaders {
            limit_requests: Some(1000),
            remaining_requests: Some(10),
            reset_requests: Some(secs(120)),
            limit_tokens: Some(12000),
            remaining_tokens: Some(500),
            reset_tokens: Some(secs(5)),
            retry_after: None,
        };
        assert!(l.learn(&b, &headers, t));
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(10));
        assert_eq!(l.remaining_today(&b, t, true).tpd, Some(100_000));
        let small = Cost {
            requests: 1,
            tokens: 400,
        };
        let big = Cost {
            requests: 1,
            tokens: 600,
        };
        assert_eq!(l.room(&b, small, t, true), Room::Now);
        assert_eq!(
            l.room(&b, big, t, true),
            Room::At(at("2026-01-01T00:00:05Z"))
        );
        // The minute's requests are untouched: 30 fit in a minute... but only 10 today.
        for _ in 0..10 {
            assert!(l.reserve(&b, REQ, t, true).is_ok());
        }
        assert_eq!(
            l.reserve(&b, REQ, t, true),
            Err(Room::At(at("2026-01-01T00:02:00Z")))
        );
    }

    #[test]
    fn headers_never_give_more_than_the_config() {
        let (mut l, b) = one(groq_limits(), DailyReset::Rolling);
        let t = at("2026-01-01T00:00:00Z");
        for _ in 0..5 {
            l.reserve(&b, REQ, t, true).expect("fits");
        }
        // Larger limits and more remaining than the ledger thinks: nothing changes.
        let headers = RateLimitHeaders {
            limit_requests: Some(1000),
            remaining_requests: Some(1000),
            reset_requests: Some(secs(120)),
            limit_tokens: Some(12000),
            remaining_tokens: Some(12000),
            reset_tokens: Some(secs(1)),
            retry_after: None,
        };
        assert!(!l.learn(&b, &headers, t));
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(995));
        let bigger = RateLimitHeaders {
            limit_requests: Some(1900),
            remaining_requests: Some(1900),
            ..headers
        };
        l.learn(&b, &bigger, t);
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(995));
        // A smaller limit replaces the config's.
        let smaller = RateLimitHeaders {
            limit_requests: Some(600),
            remaining_requests: Some(595),
            ..headers
        };
        assert!(l.learn(&b, &smaller, t));
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(595));
    }

    #[test]
    fn openai_headers_are_per_minute() {
        let (mut l, b) = one(
            limits(Some(500), Some(10_000), Some(30_000), None),
            DailyReset::Rolling,
        );
        let t = at("2026-01-01T00:00:00Z");
        let headers = RateLimitHeaders {
            limit_requests: Some(500),
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_millis(120)),
            limit_tokens: Some(30_000),
            remaining_tokens: Some(29_000),
            reset_tokens: Some(Duration::from_millis(2000)),
            retry_after: None,
        };
        l.learn(&b, &headers, t);
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(10_000));
        assert_eq!(
            l.room(&b, REQ, t, true),
            Room::At(at("2026-01-01T00:00:00.120Z"))
        );
    }

    #[test]
    fn a_429_stating_its_limit_allows_no_more_than_that_a_minute() {
        let (mut l, b) = one(limits(Some(30), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        // The provider allows 15 a minute; the config says 30. The 16th is refused.
        for _ in 0..15 {
            let r = l.reserve(&b, REQ, t0, true).expect("fits");
            l.settle(&r, Usage::default(), t0);
        }
        let refused = l
            .reserve(&b, REQ, t0, true)
            .expect("the config says it fits");
        l.release(&refused);
        assert!(l.learn_refusal(&b, &rpm_refusal(Some(15)), REQ, t0));
        // Every task waiting for the key wakes when the cooldown ends: the ledger grants
        // none of them before the window has room, however many ask.
        assert_eq!(
            l.reserve(&b, REQ, t0 + secs(2), true),
            Err(Room::At(at("2026-01-01T00:01:01Z")))
        );
        // Each following minute: 15, and the 16th waits for the window.
        let mut t = at("2026-01-01T00:01:01Z");
        for _ in 0..5 {
            let (granted, room) = fill(&mut l, &b, t);
            assert_eq!(granted, 15, "at {t}");
            assert_eq!(room, Room::At(t + secs(61)));
            t += secs(61);
        }
        // The provider's word that the limit is the configured one ends the lowering.
        assert!(l.learn_refusal(&b, &rpm_refusal(Some(30)), REQ, t));
        assert_eq!(fill(&mut l, &b, t).0, 30);
    }

    #[test]
    fn a_stated_limit_lasts_a_day_then_the_config_is_in_force_again() {
        let (mut l, b) = one(limits(Some(30), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        l.learn_refusal(&b, &rpm_refusal(Some(15)), REQ, t0);
        let end = at("2026-01-02T00:00:00Z");
        let before_end = end - secs(30);
        assert_eq!(fill(&mut l, &b, before_end).0, 15);
        // The window would free at +61 s, but the limit ends first: then the 15 counted
        // leave room for 15 more under the configured 30.
        assert_eq!(l.room(&b, REQ, before_end, true), Room::At(end));
        assert_eq!(fill(&mut l, &b, end).0, 15);
    }

    #[test]
    fn a_429_without_a_value_caps_the_minute_at_what_was_accepted_for_an_hour() {
        let (mut l, b) = one(limits(Some(30), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        for _ in 0..10 {
            let r = l.reserve(&b, REQ, t0, true).expect("fits");
            l.settle(&r, Usage::default(), t0);
        }
        // One more in flight, and one refused: neither was accepted by the provider.
        let in_flight = l.reserve(&b, REQ, t0, true).expect("fits");
        let refused = l.reserve(&b, REQ, t0, true).expect("fits");
        l.release(&refused);
        assert!(l.learn_refusal(&b, &rpm_refusal(None), REQ, t0));
        l.settle(&in_flight, Usage::default(), t0 + secs(1));
        assert!(l.reserve(&b, REQ, t0 + secs(2), true).is_err());
        let t1 = at("2026-01-01T00:01:02Z");
        let (granted, room) = fill(&mut l, &b, t1);
        assert_eq!(granted, 10);
        assert_eq!(room, Room::At(t1 + secs(61)));
        // A guess only ever lowers: a later 429 counting more changes nothing.
        let (more, _) = fill(&mut l, &b, t1 + secs(61));
        assert_eq!(more, 10);
        assert!(!l.learn_refusal(&b, &rpm_refusal(None), REQ, t1 + secs(61)));
        // Just before the hour ends, the window's room is after the guess's end: the
        // wait ends with the guess, and then the configured 30 are in force.
        let end = at("2026-01-01T01:00:00Z");
        let late = end - secs(30);
        assert_eq!(fill(&mut l, &b, late).0, 10);
        assert_eq!(l.room(&b, REQ, late, true), Room::At(end));
        assert_eq!(fill(&mut l, &b, end).0, 20);
        assert_eq!(fill(&mut l, &b, end + secs(61)).0, 30);
    }

    #[test]
    fn a_guess_keeps_at_least_the_refused_request_and_never_says_never() {
        let (mut l, b) = one(
            limits(Some(30), None, Some(1000), None),
            DailyReset::Rolling,
        );
        let t0 = at("2026-01-01T00:00:00Z");
        // Refused with nothing counted in the window (another client spent the account).
        let cost = Cost {
            requests: 1,
            tokens: 300,
        };
        let refused = l.reserve(&b, cost, t0, true).expect("fits");
        l.release(&refused);
        let both = [
            refusal(LimitScope::Minute, LimitDimension::Requests, None),
            refusal(LimitScope::Minute, LimitDimension::Tokens, None),
        ];
        assert!(l.learn_refusal(&b, &both, cost, t0));
        // One such request a minute, not none.
        let t1 = t0 + secs(61);
        assert!(l.reserve(&b, cost, t1, true).is_ok());
        assert!(l.reserve(&b, cost, t1, true).is_err());
        // A larger request waits for the guess to end rather than being refused for good.
        let larger = Cost {
            requests: 1,
            tokens: 500,
        };
        assert_eq!(
            l.room(&b, larger, t1 + secs(61), true),
            Room::At(at("2026-01-01T01:00:00Z"))
        );
        // Beyond the configured limit it never fits, guess or not.
        let huge = Cost {
            requests: 1,
            tokens: 1001,
        };
        assert_eq!(l.room(&b, huge, t1 + secs(61), true), Room::Never);
    }

    #[test]
    fn a_daily_429_with_its_value_lowers_the_day_budget() {
        let (mut l, b) = one(
            limits(Some(30), Some(3000), None, None),
            zone("America/Los_Angeles"),
        );
        let t = at("2026-01-01T20:00:00Z");
        for _ in 0..5 {
            let r = l.reserve(&b, REQ, t, true).expect("fits");
            l.settle(&r, Usage::default(), t);
        }
        // A day limit named without a value teaches nothing: the key is exhausted anyway.
        let no_value = [refusal(LimitScope::Day, LimitDimension::Requests, None)];
        assert!(!l.learn_refusal(&b, &no_value, REQ, t));
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(2995));
        // Gemini names both its quotas in one answer; each lowers its own limit.
        let gemini = [
            refusal(LimitScope::Minute, LimitDimension::Requests, Some(15)),
            refusal(LimitScope::Day, LimitDimension::Requests, Some(1500)),
        ];
        assert!(l.learn_refusal(&b, &gemini, REQ, t));
        assert_eq!(l.remaining_today(&b, t, true).rpd, Some(1495));
        assert!((l.day_fraction_left(&b, t, true) - 1495.0 / 1500.0).abs() < 1e-9);
        assert_eq!(fill(&mut l, &b, t).0, 10);
        let tokens_per_day = [refusal(LimitScope::Day, LimitDimension::Tokens, Some(200))];
        assert!(l.learn_refusal(&b, &tokens_per_day, REQ, t));
        // 15 requests of 10 tokens counted today: 50 tokens left.
        assert_eq!(l.remaining_today(&b, t, true).tpd, Some(50));
    }
}
