//! Recording: what a provider's answer means. A call's outcome settles or releases its
//! budget, teaches the ledger, and may cool, exhaust or disable keys, back a whole
//! provider off, or send the task to another key, to a retry or to its failure.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

use super::{Attempt, Call, Rotator, add, later};
use crate::ledger::BudgetId;
use crate::provider::{CallOutcome, Failure, LimitScope};
use crate::state::Hold;

/// Transient failures (timeouts, 5xx) one task may retry before it fails with
/// `upstream_error`. Moving to another key after a 429 is not counted here.
pub const MAX_TRANSIENT_RETRIES: u32 = 3;
/// First delay after a transient failure; doubles with each further one.
const TRANSIENT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest delay after a transient failure: with `MAX_TRANSIENT_RETRIES` the retries
/// of one task stay well inside the default 120 s deadline.
const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(16);
/// Shortest cooldown after a minute 429, whatever delay came with it: a zero delay
/// still means "not now", and a task must not ping-pong on one key.
const MIN_COOLDOWN: Duration = Duration::from_secs(2);
/// Longest a minute window can hold usage (a 1 s slot plus the 60 s window): the
/// cooldown after a minute 429 without any delay never needs to be longer.
const MAX_MINUTE_COOLDOWN: Duration = Duration::from_secs(61);
/// A rolling day exhaustion with nothing better to go by lasts a whole window.
const DAY_EXHAUSTION_FALLBACK: Duration = Duration::from_secs(24 * 3600);
/// Minute 429s from this many distinct keys of one provider within
/// `PROVIDER_BURST_SPAN` point at a limit on the address rather than the keys.
const PROVIDER_BURST_KEYS: usize = 3;
/// See `PROVIDER_BURST_KEYS`: "at once", as seen from a node moving a task from key to
/// key without waiting.
const PROVIDER_BURST_SPAN: Duration = Duration::from_secs(5);
/// First provider-wide backoff; doubles with each further burst.
const PROVIDER_BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Longest provider-wide backoff: an address limit rarely outlasts a few minutes, and
/// the other providers of the route serve meanwhile.
const PROVIDER_BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A burst this long after the previous one starts the backoff from the base again.
const PROVIDER_BACKOFF_FORGET: Duration = Duration::from_secs(900);
/// Reasons are shown in the health topic and `status`: kept to one readable line.
const REASON_MAX_CHARS: usize = 200;

/// How a task fails for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCode {
    /// The provider refused the request itself (400-like); no key is to blame.
    UpstreamRejected,
    /// Transient failures past [`MAX_TRANSIENT_RETRIES`].
    UpstreamError,
}

/// What to do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Answered: usage settled, headers learned.
    Done,
    /// Plan again at once, without sleeping (429, disabled key, too large).
    TryNext,
    /// A transient failure: plan again after this delay (another key preferred).
    RetryAfter(Duration),
    Fail {
        code: FailCode,
        message: String,
    },
}

/// Exponential backoff from `base`, `n` ≥ 1, capped, with "equal jitter": between half
/// and all of the step, so that nodes and tasks do not retry in lockstep.
fn backoff(base: Duration, cap: Duration, n: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1));
    let step = base.saturating_mul(factor).min(cap);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    step.mul_f64(0.5 + jitter / 2.0)
}

fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    if line.chars().count() <= REASON_MAX_CHARS {
        line.to_owned()
    } else {
        let mut cut: String = line.chars().take(REASON_MAX_CHARS).collect();
        cut.push('…');
        cut
    }
}

impl Rotator {
    /// Takes a call's outcome: settles or releases its budget, learns from the headers
    /// and from the limits a 429 names, updates the key's state, and says what the task
    /// does next.
    pub fn record(
        &mut self,
        call: &Call,
        outcome: &CallOutcome,
        attempt: &mut Attempt,
        now: Timestamp,
        synced: bool,
        jitter: f64,
    ) -> Next {
        let now = self.ledger.observe(now, synced);
        self.last_synced = synced;
        attempt.attempts = attempt.attempts.saturating_add(1);
        let budget = call.reservation.budget().clone();
        let failure = match &outcome.result {
            Ok(completion) => {
                self.ledger.settle(&call.reservation, completion.usage, now);
                self.ledger.learn(&budget, &outcome.headers, now);
                self.provider_answered(&call.provider);
                return Next::Done;
            }
            Err(failure) => failure,
        };
        match failure {
            Failure::Transient { detail } => {
                // The provider may have counted it: the reservation stays charged.
                self.ledger.settle_estimated(&call.reservation);
                self.ledger.learn(&budget, &outcome.headers, now);
                attempt
                    .failed_keys
                    .insert((call.label.clone(), call.model.clone()));
                attempt.transient_retries = attempt.transient_retries.saturating_add(1);
                if attempt.transient_retries > MAX_TRANSIENT_RETRIES {
                    return Next::Fail {
                        code: FailCode::UpstreamError,
                        message: format!(
                            "{} failed {} times: {}",
                            call.provider,
                            attempt.transient_retries,
                            short(detail)
                        ),
                    };
                }
                return Next::RetryAfter(backoff(
                    TRANSIENT_BACKOFF_BASE,
                    TRANSIENT_BACKOFF_CAP,
                    attempt.transient_retries,
                    jitter,
                ));
            }
            Failure::Rejected { status, detail } => {
                // The request reached the provider, which may well have counted it
                // against the key: keep it charged rather than risk believing in
                // budget that is not there.
                self.ledger.settle_estimated(&call.reservation);
                self.ledger.learn(&budget, &outcome.headers, now);
                return Next::Fail {
                    code: FailCode::UpstreamRejected,
                    message: format!(
                        "{} refused the request (HTTP {status}): {}",
                        call.provider,
                        short(detail)
                    ),
                };
            }
            _ => {}
        }
        // Everything below refused the request without counting it.
        self.ledger.release(&call.reservation);
        self.ledger.learn(&budget, &outcome.headers, now);
        match failure {
            Failure::RateLimited {
                retry_after,
                scope,
                violations,
                detail,
            } => {
                // The cooldown alone would let the tasks waiting for it wake together
                // and spend the key past the provider's real limit again: the limit
                // itself is lowered, on the budget every key of the account shares.
                self.ledger
                    .learn_refusal(&budget, violations, call.reservation.cost(), now);
                self.rate_limited(
                    call,
                    &budget,
                    *retry_after,
                    *scope,
                    detail,
                    now,
                    synced,
                    jitter,
                );
            }
            Failure::TooLarge { .. } => {
                let cost = call.reservation.cost().tokens;
                let state = self.model_state_mut(&call.label, &call.model);
                state.too_large = Some(state.too_large.map_or(cost, |t| t.min(cost)));
            }
            Failure::KeyRejected { status, detail } => {
                self.disable(
                    &call.label,
                    format!(
                        "rejected by {} (HTTP {status}): {}",
                        call.provider,
                        short(detail)
                    ),
                );
            }
            Failure::QuotaGone { detail } => {
                self.disable(
                    &call.label,
                    format!("quota gone at {}: {}", call.provider, short(detail)),
                );
            }
            Failure::Rejected { .. } | Failure::Transient { .. } => {}
        }
        Next::TryNext
    }

    fn disable(&mut self, label: &str, reason: String) {
        self.states.entry(label.to_owned()).or_default().disabled = Some(reason);
        self.dirty_keys.insert(label.to_owned());
    }

    fn provider_answered(&mut self, provider: &str) {
        if let Some(p) = self.provider_states.get_mut(provider) {
            p.refusals.clear();
            if p.backoff.level != 0 {
                p.backoff.level = 0;
                self.dirty_providers.insert(provider.to_owned());
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rate_limited(
        &mut self,
        call: &Call,
        budget: &BudgetId,
        retry_after: Option<Duration>,
        scope: LimitScope,
        detail: &str,
        now: Timestamp,
        synced: bool,
        jitter: f64,
    ) {
        let (hold_until, day) = match scope {
            LimitScope::Minute => {
                let until = match retry_after {
                    Some(delay) => add(now, delay.max(MIN_COOLDOWN)),
                    None => {
                        let floor = add(now, MIN_COOLDOWN);
                        let frees = self
                            .ledger
                            .oldest_minute_usage_leaves(budget, now)
                            .map_or(floor, |t| t.max(floor));
                        frees.min(add(now, MAX_MINUTE_COOLDOWN))
                    }
                };
                (until, false)
            }
            // A daily limit comes back at the daily reset, whatever the delay says.
            LimitScope::Day => {
                let until = self
                    .ledger
                    .next_daily_reset(budget, now)
                    .or_else(|| self.ledger.oldest_day_usage_leaves(budget, now, synced))
                    .or_else(|| retry_after.filter(|d| !d.is_zero()).map(|d| add(now, d)))
                    .unwrap_or_else(|| add(now, DAY_EXHAUSTION_FALLBACK));
                (until, true)
            }
        };
        let reason = if day {
            format!("daily limit for {} reached: {}", call.model, short(detail))
        } else {
            format!("rate limited on {}: {}", call.model, short(detail))
        };
        // Keys of one account share its limits: they cool together.
        let account = self.key(&call.label).and_then(|k| k.account.clone());
        let labels: Vec<String> = match &account {
            Some(account) => self
                .keys
                .iter()
                .filter(|k| k.provider == call.provider && k.account.as_ref() == Some(account))
                .map(|k| k.label.clone())
                .collect(),
            None => vec![call.label.clone()],
        };
        for label in labels {
            let state = self.model_state_mut(&label, &call.model);
            let slot = if day {
                &mut state.exhausted
            } else {
                &mut state.cooling
            };
            let until = later(
                slot.as_ref().filter(|h| h.until > now).map(|h| h.until),
                hold_until,
            );
            *slot = Some(Hold {
                until,
                reason: reason.clone(),
            });
        }
        if !day {
            self.note_refusal(&call.provider, &call.label, now, jitter);
        }
    }

    /// Counts a minute 429 towards a provider-wide backoff.
    fn note_refusal(&mut self, provider: &str, label: &str, now: Timestamp, jitter: f64) {
        let state = self.provider_states.entry(provider.to_owned()).or_default();
        let since = now
            .checked_sub(PROVIDER_BURST_SPAN)
            .unwrap_or(Timestamp::MIN);
        state.refusals.retain(|(t, _)| *t > since);
        state.refusals.push((now, label.to_owned()));
        let distinct: BTreeSet<&str> = state.refusals.iter().map(|(_, l)| l.as_str()).collect();
        if distinct.len() < PROVIDER_BURST_KEYS {
            return;
        }
        let recent = state
            .backoff
            .last_burst
            .is_some_and(|t| add(t, PROVIDER_BACKOFF_FORGET) > now);
        state.backoff.level = if recent {
            state.backoff.level.saturating_add(1)
        } else {
            1
        };
        let delay = backoff(
            PROVIDER_BACKOFF_BASE,
            PROVIDER_BACKOFF_CAP,
            state.backoff.level,
            jitter,
        );
        state.backoff.until = Some(add(now, delay));
        state.backoff.last_burst = Some(now);
        state.refusals.clear();
        self.dirty_providers.insert(provider.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotator::test_support::*;

    #[test]
    fn a_minute_429_cools_the_key_until_the_delay_passes() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let c = call(&mut r, &route(), now);
        assert_eq!(c.label, "g1");
        let mut attempt = Attempt::new();
        let next = r.record(
            &c,
            &limited(Some(secs(20)), LimitScope::Minute),
            &mut attempt,
            now,
            true,
            0.5,
        );
        assert_eq!(next, Next::TryNext);
        let report = state_of(&r, "g1", now);
        assert_eq!(report.state, KeyState::Cooling);
        assert_eq!(report.until, Some(now + secs(20)));
        assert_eq!(r.next_change(now), Some(now + secs(20)));
        for _ in 0..4 {
            assert_ne!(call(&mut r, &route(), now).label, "g1");
        }
        assert_eq!(state_of(&r, "g1", now + secs(20)).state, KeyState::Ready);
        // The cooldown ended by itself: g1 serves again.
        let later = now + secs(20);
        let labels: Vec<String> = (0..3)
            .map(|_| call(&mut r, &route(), later).label)
            .collect();
        assert!(labels.contains(&"g1".to_owned()), "{labels:?}");
    }

    #[test]
    fn after_a_429_naming_its_limit_the_waking_tasks_stay_within_it() {
        // The config says 30 a minute; the provider allows 15.
        let mut r = Rotator::new(&config(vec![provider(
            "gemini",
            zone("America/Los_Angeles"),
            &[("flash", limits(Some(30), Some(1500), None, None))],
            &[("m1", None)],
        )]));
        let route = vec![target("gemini", "flash")];
        let t0 = at("2026-01-01T20:00:00Z");
        for _ in 0..15 {
            let c = call(&mut r, &route, t0);
            r.record(&c, &ok(), &mut Attempt::new(), t0, true, 0.5);
        }
        let c = call(&mut r, &route, t0);
        let next = r.record(
            &c,
            &rpm_refused(secs(2), Some(15)),
            &mut Attempt::new(),
            t0,
            true,
            0.5,
        );
        assert_eq!(next, Next::TryNext);
        // The cooldown ends: the tasks waiting for it get no call before the window
        // frees, where the configured 30 would have let 15 of them in to be refused.
        let wake = t0 + secs(2);
        assert_eq!(serve_all(&mut r, &route, wake).0, 0);
        let free = t0 + secs(61);
        assert_eq!(
            r.plan(&route, COST, &Attempt::new(), wake, wake + secs(120), true),
            Plan::Wait { until: free }
        );
        // Then 15 a minute.
        for minute in 0..3 {
            let t = free + secs(61 * minute);
            let (served, wait) = serve_all(&mut r, &route, t);
            assert_eq!(served, 15, "at {t}");
            assert_eq!(
                wait,
                Plan::Wait {
                    until: t + secs(61)
                }
            );
        }
    }

    #[test]
    fn a_limit_learned_on_one_key_holds_for_every_key_of_its_account() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", limits(Some(4), None, None, None))],
            &[("a1", Some("acct")), ("a2", Some("acct"))],
        )]));
        let route = vec![target("groq", "llama")];
        let t0 = at("2026-01-01T00:00:00Z");
        for _ in 0..2 {
            let c = call(&mut r, &route, t0);
            r.record(&c, &ok(), &mut Attempt::new(), t0, true, 0.5);
        }
        // The account allows 2 a minute; the third call is refused, on whichever key.
        let c = call(&mut r, &route, t0);
        r.record(
            &c,
            &rpm_refused(secs(2), None),
            &mut Attempt::new(),
            t0,
            true,
            0.5,
        );
        // Once the cooldown is over, neither key is called before the window frees.
        let t1 = t0 + secs(3);
        assert_eq!(
            r.plan(&route, COST, &Attempt::new(), t1, t1 + secs(120), true),
            Plan::Wait {
                until: t0 + secs(61)
            }
        );
        let (served, _) = serve_all(&mut r, &route, t0 + secs(61));
        assert_eq!(served, 2);
    }

    #[test]
    fn a_minute_429_without_delay_cools_at_least_the_minimum() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let c = call(&mut r, &route(), now);
        let mut attempt = Attempt::new();
        r.record(
            &c,
            &limited(None, LimitScope::Minute),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let until = state_of(&r, &c.label, now).until.expect("until");
        assert!(until >= now + MIN_COOLDOWN && until <= now + MAX_MINUTE_COOLDOWN);
    }

    #[test]
    fn a_daily_429_exhausts_a_zone_key_until_local_midnight() {
        let mut r = two_providers();
        let now = at("2026-01-01T20:00:00Z"); // 12:00 PST
        let route = vec![target("gemini", "flash")];
        let c = call(&mut r, &route, now);
        let mut attempt = Attempt::new();
        // Gemini's daily quota comes with a retryDelay of 0s.
        r.record(
            &c,
            &limited(Some(secs(0)), LimitScope::Day),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let report = state_of(&r, &c.label, now);
        assert_eq!(report.state, KeyState::Exhausted);
        assert_eq!(report.until, Some(at("2026-01-02T08:00:00Z")));
    }

    #[test]
    fn a_daily_429_exhausts_a_rolling_key_until_its_oldest_usage_leaves() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", groq_limits())],
            &[("g1", None)],
        )]));
        let t0 = at("2026-01-01T10:01:00Z");
        let route = vec![target("groq", "llama")];
        let first = call(&mut r, &route, t0);
        let mut attempt = Attempt::new();
        r.record(&first, &ok(), &mut attempt, t0, true, 0.5);
        let t1 = at("2026-01-01T15:00:00Z");
        let c = call(&mut r, &route, t1);
        r.record(
            &c,
            &limited(Some(secs(60)), LimitScope::Day),
            &mut attempt,
            t1,
            true,
            0.5,
        );
        let report = state_of(&r, "g1", t1);
        assert_eq!(report.state, KeyState::Exhausted);
        // The 5-minute slot holding the 10:01 request leaves at 10:05 the next day.
        assert_eq!(report.until, Some(at("2026-01-02T10:05:00Z")));
    }

    #[test]
    fn a_rejected_key_is_disabled_until_reset() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let c = call(&mut r, &route(), now);
        let mut attempt = Attempt::new();
        let outcome = failed(Failure::KeyRejected {
            status: 401,
            detail: "Invalid API Key".to_owned(),
        });
        assert_eq!(
            r.record(&c, &outcome, &mut attempt, now, true, 0.5),
            Next::TryNext
        );
        let report = state_of(&r, "g1", now);
        assert_eq!(report.state, KeyState::Disabled);
        assert!(report.reason.as_deref().is_some_and(|s| s.contains("401")));
        for i in 0..10 {
            assert_ne!(call(&mut r, &route(), now + secs(i * 3600)).label, "g1");
        }
        assert!(r.reset("g1"));
        assert!(!r.reset("nope"));
        assert_eq!(state_of(&r, "g1", now).state, KeyState::Ready);
        let later = now + secs(36_000);
        let labels: Vec<String> = (0..3)
            .map(|_| call(&mut r, &route(), later).label)
            .collect();
        assert!(labels.contains(&"g1".to_owned()));
    }

    #[test]
    fn quota_gone_disables_the_key() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let c = call(&mut r, &route(), now);
        let outcome = failed(Failure::QuotaGone {
            detail: "insufficient_quota".to_owned(),
        });
        r.record(&c, &outcome, &mut Attempt::new(), now, true, 0.5);
        assert_eq!(state_of(&r, &c.label, now).state, KeyState::Disabled);
    }

    #[test]
    fn too_large_skips_the_key_only_for_requests_that_size() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", groq_limits())],
            &[("g1", None)],
        )]));
        let now = at("2026-01-01T00:00:00Z");
        let route = vec![target("groq", "llama")];
        let big = Cost {
            requests: 1,
            tokens: 5000,
        };
        let Plan::Call(c) = r.plan(&route, big, &Attempt::new(), now, now + secs(120), true) else {
            panic!("expected a call");
        };
        let outcome = failed(Failure::TooLarge {
            detail: "Request too large".to_owned(),
        });
        assert_eq!(
            r.record(&c, &outcome, &mut Attempt::new(), now, true, 0.5),
            Next::TryNext
        );
        let plan = r.plan(&route, big, &Attempt::new(), now, now + secs(120), true);
        assert!(
            matches!(&plan, Plan::Exhausted { retry_after: None, message } if message.contains("large")),
            "{plan:?}"
        );
        assert!(matches!(
            r.plan(&route, COST, &Attempt::new(), now, now + secs(120), true),
            Plan::Call(_)
        ));
        assert_eq!(state_of(&r, "g1", now).state, KeyState::Ready);
    }

    #[test]
    fn a_bad_request_fails_at_once_and_blames_no_key() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", limits(Some(1), None, None, None))],
            &[("g1", None)],
        )]));
        let now = at("2026-01-01T00:00:00Z");
        let route = vec![target("groq", "llama")];
        let c = call(&mut r, &route, now);
        let outcome = failed(Failure::Rejected {
            status: 400,
            detail: "messages: required".to_owned(),
        });
        let next = r.record(&c, &outcome, &mut Attempt::new(), now, true, 0.5);
        assert!(matches!(
            next,
            Next::Fail {
                code: FailCode::UpstreamRejected,
                ..
            }
        ));
        // No key is blamed...
        assert_eq!(state_of(&r, "g1", now).state, KeyState::Ready);
        // ...but the request reached the provider and stays counted: the minute's only
        // request is spent, so the next task waits for the window.
        assert!(matches!(
            r.plan(&route, COST, &Attempt::new(), now, now + secs(120), true),
            Plan::Wait { .. }
        ));
    }

    #[test]
    fn transient_failures_back_off_then_fail() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let route = vec![target("groq", "llama")];
        let mut attempt = Attempt::new();
        let outcome = failed(Failure::Transient {
            detail: "HTTP 500".to_owned(),
        });
        let mut delays = Vec::new();
        let mut used = Vec::new();
        loop {
            let Plan::Call(c) = r.plan(&route, COST, &attempt, now, now + secs(600), true) else {
                panic!("expected a call");
            };
            used.push(c.label.clone());
            match r.record(&c, &outcome, &mut attempt, now, true, 0.5) {
                Next::RetryAfter(d) => delays.push(d),
                Next::Fail { code, .. } => {
                    assert_eq!(code, FailCode::UpstreamError);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(delays.len(), MAX_TRANSIENT_RETRIES as usize);
        assert!(delays.windows(2).all(|w| w[0] < w[1]), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= TRANSIENT_BACKOFF_CAP));
        // Another key each time while one had room, then back to a failed one.
        assert_eq!(&used[..3], ["g1", "g2", "g3"]);
        assert_eq!(attempt.attempts, MAX_TRANSIENT_RETRIES + 1);
    }

    #[test]
    fn many_keys_refused_at_once_back_off_the_provider() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let mut attempt = Attempt::new();
        for i in 0..3 {
            let c = call(&mut r, &route(), now + secs(i));
            assert_eq!(c.provider, "groq");
            // A short delay each: the keys alone would be free again in a second.
            r.record(
                &c,
                &limited(Some(secs(1)), LimitScope::Minute),
                &mut attempt,
                now + secs(i),
                true,
                0.5,
            );
        }
        let t = now + secs(5);
        // groq is backing off as a whole: the task moves to gemini.
        assert_eq!(call(&mut r, &route(), t).provider, "gemini");
        let groq_only = vec![target("groq", "llama")];
        match r.plan(&groq_only, COST, &Attempt::new(), t, t + secs(120), true) {
            Plan::Wait { until } => assert!(until > now + secs(2 + 3), "{until}"),
            other => panic!("expected a wait, got {other:?}"),
        }
        assert_eq!(state_of(&r, "g1", t).state, KeyState::Cooling);
    }
}
