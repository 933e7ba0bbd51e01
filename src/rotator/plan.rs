//! Planning: which key of a route serves a task now, chosen by the budget it has left,
//! or until when the task waits, or why nothing will serve it before its deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::{KeyInfo, Rotator, later, until};
use crate::config::Target;
use crate::ledger::{Cost, Reservation, Room};

/// The smallest cost there is, for "could this key serve anything now".
const MIN_COST: Cost = Cost {
    requests: 1,
    tokens: 1,
};

/// What one task has been through so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Calls made to providers.
    pub attempts: u32,
    /// Transient failures so far (timeouts, 5xx).
    pub transient_retries: u32,
    /// (key label, model) that failed transiently for this task: tried again only when
    /// no other key has room.
    pub failed_keys: BTreeSet<(String, String)>,
}

impl Attempt {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A call to make: which key, provider and model, with its budget reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub label: String,
    pub provider: String,
    pub model: String,
    pub reservation: Reservation,
    /// Commit [`Rotator::snapshot_dirty`] durably before sending: a new lease was taken.
    pub needs_commit: bool,
}

/// What to do with a task now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Call(Call),
    /// No key of the route has room now, but one frees before the deadline.
    Wait {
        until: Timestamp,
    },
    /// No key frees before the deadline. `retry_after`: when the first key of the route
    /// frees up (`None`: none will by itself).
    Exhausted {
        retry_after: Option<Duration>,
        message: String,
    },
}

/// Whether a key can take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Avail {
    Now,
    At(Timestamp),
    Never(Why),
}

/// Why a key can never take this request by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Disabled,
    TooLarge,
    OverLimit,
}

/// "00:00 PST" (today or tomorrow) or "2026-11-24 00:00 PST", in the provider's zone
/// when it has one, else UTC.
fn when(t: Timestamp, now: Timestamp, zone: Option<&TimeZone>) -> String {
    let tz = zone.cloned().unwrap_or(TimeZone::UTC);
    let format = if until(now, t) < Duration::from_secs(24 * 3600) {
        "%H:%M %Z"
    } else {
        "%Y-%m-%d %H:%M %Z"
    };
    t.to_zoned_datetime(tz).strftime(format).to_string()
}

fn describe(route: &[Target]) -> String {
    route
        .iter()
        .map(|t| format!("{}/{}", t.provider, t.model))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rotator {
    /// When this key can take `cost` for `model`.
    fn availability(
        &self,
        key: &KeyInfo,
        model: &str,
        cost: Cost,
        now: Timestamp,
        synced: bool,
    ) -> Avail {
        let states = self.states.get(&key.label);
        if states.is_some_and(|s| s.disabled.is_some()) {
            return Avail::Never(Why::Disabled);
        }
        let state = self.model_state(&key.label, model);
        if state
            .and_then(|s| s.too_large)
            .is_some_and(|threshold| cost.tokens >= threshold)
        {
            return Avail::Never(Why::TooLarge);
        }
        let Some(budget) = self.ledger.budget_for(&key.label, model) else {
            return Avail::Never(Why::OverLimit);
        };
        let mut free: Option<Timestamp> = None;
        if let Some(s) = state {
            for hold in [&s.cooling, &s.exhausted].into_iter().flatten() {
                if hold.until > now {
                    free = Some(later(free, hold.until));
                }
            }
        }
        if let Some(b) = self.backoff_until(&key.provider, now) {
            free = Some(later(free, b));
        }
        match self.ledger.room(budget, cost, now, synced) {
            Room::Never => return Avail::Never(Why::OverLimit),
            Room::At(t) => free = Some(later(free, t)),
            Room::Now => {}
        }
        match free {
            Some(t) if t > now => Avail::At(t),
            _ => Avail::Now,
        }
    }

    /// Chooses among keys of one target with room: the most minute budget left, then
    /// the most day budget left, ties round-robin after the last one chosen.
    fn pick(
        &self,
        target: &Target,
        candidates: &[usize],
        now: Timestamp,
        synced: bool,
    ) -> Option<usize> {
        let provider = self.providers.get(&target.provider)?;
        let n = provider.keys.len().max(1);
        let last = self.cursor.get(target).copied();
        let score = |pos: usize| -> (f64, f64) {
            let label = &self.keys[provider.keys[pos]].label;
            match self.ledger.budget_for(label, &target.model) {
                Some(b) => (
                    self.ledger.minute_fraction_left(b, now, synced),
                    self.ledger.day_fraction_left(b, now, synced),
                ),
                None => (0.0, 0.0),
            }
        };
        let distance = |pos: usize| match last {
            Some(last) => (pos + n - last - 1) % n,
            None => pos,
        };
        candidates
            .iter()
            .map(|pos| (*pos, score(*pos)))
            .max_by(|(pa, (ma, da)), (pb, (mb, db))| {
                ma.total_cmp(mb)
                    .then(da.total_cmp(db))
                    // Smaller distance after the cursor wins the tie.
                    .then(distance(*pb).cmp(&distance(*pa)))
            })
            .map(|(pos, _)| pos)
    }

    /// Decides what to do with a task of `cost` on `route` now. Targets are tried in
    /// order; the next only when no key of this one has room now.
    pub fn plan(
        &mut self,
        route: &[Target],
        cost: Cost,
        attempt: &Attempt,
        now: Timestamp,
        deadline: Timestamp,
        synced: bool,
    ) -> Plan {
        let now = self.ledger.observe(now, synced);
        self.last_synced = synced;
        let mut first_free: Option<(Timestamp, Option<TimeZone>)> = None;
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut why: BTreeMap<&'static str, BTreeSet<&str>> = BTreeMap::new();
        let mut fallback: Option<(usize, Vec<usize>)> = None;
        let mut choice: Option<(usize, usize)> = None;
        for (t, target) in route.iter().enumerate() {
            let Some(provider) = self.providers.get(&target.provider) else {
                continue;
            };
            let mut ready = Vec::new();
            let mut failed = Vec::new();
            for (pos, index) in provider.keys.iter().enumerate() {
                let key = &self.keys[*index];
                if !key.models.contains(&target.model) {
                    continue;
                }
                seen.insert(&key.label);
                match self.availability(key, &target.model, cost, now, synced) {
                    Avail::Now => {
                        if attempt
                            .failed_keys
                            .contains(&(key.label.clone(), target.model.clone()))
                        {
                            failed.push(pos);
                        } else {
                            ready.push(pos);
                        }
                    }
                    Avail::At(free) => {
                        if first_free.as_ref().is_none_or(|(f, _)| free < *f) {
                            first_free = Some((free, provider.zone.clone()));
                        }
                    }
                    Avail::Never(reason) => {
                        let reason = match reason {
                            Why::Disabled => "disabled",
                            Why::TooLarge => "refused requests this large",
                            Why::OverLimit => "have limits below this request's size",
                        };
                        why.entry(reason).or_default().insert(&key.label);
                    }
                }
            }
            if let Some(pos) = self.pick(target, &ready, now, synced) {
                choice = Some((t, pos));
                break;
            }
            if fallback.is_none() && !failed.is_empty() {
                fallback = Some((t, failed));
            }
        }
        // A key that failed transiently for this task is tried again only when no
        // other key has room.
        if choice.is_none()
            && let Some((t, failed)) = &fallback
        {
            choice = self
                .pick(&route[*t], failed, now, synced)
                .map(|pos| (*t, pos));
        }
        if let Some((t, pos)) = choice {
            let target = &route[t];
            let label = self
                .providers
                .get(&target.provider)
                .and_then(|p| p.keys.get(pos))
                .map(|i| self.keys[*i].label.clone());
            let budget = label
                .as_deref()
                .and_then(|l| self.ledger.budget_for(l, &target.model))
                .cloned();
            if let (Some(label), Some(budget)) = (label, budget)
                && let Ok(reservation) = self.ledger.reserve(&budget, cost, now, synced)
            {
                self.cursor.insert(target.clone(), pos);
                return Plan::Call(Call {
                    label,
                    provider: target.provider.clone(),
                    model: target.model.clone(),
                    needs_commit: reservation.needs_commit,
                    reservation,
                });
            }
        }
        let route_name = describe(route);
        match first_free {
            Some((free, _)) if free <= deadline => Plan::Wait { until: free },
            Some((free, zone)) => Plan::Exhausted {
                retry_after: Some(until(now, free)),
                message: format!(
                    "all {} keys for {route_name} are spent until {}",
                    seen.len(),
                    when(free, now, zone.as_ref())
                ),
            },
            None => {
                let details: Vec<String> = why
                    .iter()
                    .map(|(reason, labels)| format!("{} {reason}", labels.len()))
                    .collect();
                let message = if seen.is_empty() {
                    format!("no key serves {route_name}")
                } else {
                    format!(
                        "none of the {} keys for {route_name} can serve this request ({})",
                        seen.len(),
                        details.join(", ")
                    )
                };
                Plan::Exhausted {
                    retry_after: None,
                    message,
                }
            }
        }
    }

    /// Gives a planned call's budget back: the request was never sent.
    pub fn release(&mut self, call: &Call) {
        self.ledger.release(&call.reservation);
    }

    /// Whether some key of `route` could serve a request now.
    pub fn servable_now(&self, route: &[Target], now: Timestamp, synced: bool) -> bool {
        route.iter().any(|target| {
            self.providers.get(&target.provider).is_some_and(|p| {
                p.keys.iter().any(|i| {
                    let key = &self.keys[*i];
                    key.models.contains(&target.model)
                        && self.availability(key, &target.model, MIN_COST, now, synced)
                            == Avail::Now
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotator::test_support::*;

    #[test]
    fn load_is_spread_over_the_keys() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let labels: Vec<String> = (0..6).map(|_| call(&mut r, &route(), now).label).collect();
        assert_eq!(labels, ["g1", "g2", "g3", "g1", "g2", "g3"]);
    }

    #[test]
    fn shared_accounts_give_no_extra_capacity() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", limits(Some(2), None, None, None))],
            &[("a1", Some("acct")), ("a2", Some("acct"))],
        )]));
        let now = at("2026-01-01T00:00:00Z");
        let route = vec![target("groq", "llama")];
        let first = call(&mut r, &route, now);
        let second = call(&mut r, &route, now);
        assert_ne!(first.label, second.label);
        let third = r.plan(&route, COST, &Attempt::new(), now, now + secs(120), true);
        assert_eq!(
            third,
            Plan::Wait {
                until: now + secs(61)
            }
        );
        // A 429 on one key of the account cools both.
        let mut attempt = Attempt::new();
        r.record(
            &first,
            &limited(Some(secs(30)), LimitScope::Minute),
            &mut attempt,
            now,
            true,
            0.5,
        );
        assert_eq!(state_of(&r, "a2", now).state, KeyState::Cooling);
    }

    #[test]
    fn the_next_target_serves_when_the_first_has_no_room() {
        let mut r = Rotator::new(&config(vec![
            provider(
                "groq",
                DailyReset::Rolling,
                &[("llama", limits(Some(1), None, None, None))],
                &[("g1", None)],
            ),
            provider(
                "gemini",
                DailyReset::Rolling,
                &[("flash", limits(Some(1), None, None, None))],
                &[("m1", None)],
            ),
        ]));
        let now = at("2026-01-01T00:00:00Z");
        let route = route();
        assert_eq!(call(&mut r, &route, now).provider, "groq");
        assert_eq!(call(&mut r, &route, now).provider, "gemini");
        assert_eq!(
            r.plan(&route, COST, &Attempt::new(), now, now + secs(120), true),
            Plan::Wait {
                until: now + secs(61)
            }
        );
        assert!(!r.servable_now(&route, now, true));
        assert!(r.servable_now(&route, now + secs(61), true));
    }

    #[test]
    fn exhausted_when_nothing_frees_before_the_deadline() {
        let mut r = two_providers();
        let now = at("2026-01-01T20:00:00Z"); // 12:00 PST
        let route = vec![target("gemini", "flash")];
        for _ in 0..2 {
            let c = call(&mut r, &route, now);
            r.record(
                &c,
                &limited(Some(secs(0)), LimitScope::Day),
                &mut Attempt::new(),
                now,
                true,
                0.5,
            );
        }
        let plan = r.plan(&route, COST, &Attempt::new(), now, now + secs(120), true);
        let Plan::Exhausted {
            retry_after,
            message,
        } = plan
        else {
            panic!("expected exhaustion, got {plan:?}");
        };
        assert_eq!(retry_after, Some(secs(12 * 3600)));
        assert_eq!(
            message,
            "all 2 keys for gemini/flash are spent until 00:00 PST"
        );
        // With a deadline past midnight, the task waits instead.
        let plan = r.plan(
            &route,
            COST,
            &Attempt::new(),
            now,
            now + secs(13 * 3600),
            true,
        );
        assert_eq!(
            plan,
            Plan::Wait {
                until: at("2026-01-02T08:00:00Z")
            }
        );
    }
}
