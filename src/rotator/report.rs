//! Reporting: each key's state as operators see it (SPEC §3 health topic, `keyrelay
//! status`), and when the next state ends by itself. Presentation types live here,
//! below `health`, which gathers them into the node's health.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use super::{KeyInfo, Rotator, earlier};
use crate::ledger::Remaining;

/// A key's state as operators see it (SPEC §3 health topic, `keyrelay status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Ready,
    Cooling,
    Exhausted,
    Disabled,
}

/// One key, as the rotator reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyReport {
    pub label: String,
    pub provider: String,
    pub state: KeyState,
    /// When the state ends by itself (cooling, exhausted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub remaining: BTreeMap<String, Remaining>,
    /// The smallest fraction of a daily limit left over this key's models (1.0 when none is set);
    /// under 0.2 the node is `degraded`.
    #[serde(skip)]
    pub day_fraction_left: f64,
}

impl Rotator {
    /// One report per key, in config order: the worst state over its models.
    pub fn key_reports(&self, now: Timestamp, synced: bool) -> Vec<KeyReport> {
        self.keys
            .iter()
            .map(|key| self.key_report(key, now, synced))
            .collect()
    }

    fn key_report(&self, key: &KeyInfo, now: Timestamp, synced: bool) -> KeyReport {
        let mut remaining = BTreeMap::new();
        let mut fraction: f64 = 1.0;
        // (rank, until, reason) of the worst state so far.
        let mut worst: (KeyState, Option<Timestamp>, Option<String>) =
            (KeyState::Ready, None, None);
        let rank = |s: KeyState| match s {
            KeyState::Ready => 0,
            KeyState::Cooling => 1,
            KeyState::Exhausted => 2,
            KeyState::Disabled => 3,
        };
        let mut consider = |state: KeyState, until: Timestamp, reason: String| {
            let better = rank(state) > rank(worst.0)
                || (rank(state) == rank(worst.0) && worst.1.is_none_or(|u| until > u));
            if better {
                worst = (state, Some(until), Some(reason));
            }
        };
        for model in &key.models {
            let Some(budget) = self.ledger.budget_for(&key.label, model) else {
                continue;
            };
            remaining.insert(
                model.clone(),
                self.ledger.remaining_today(budget, now, synced),
            );
            fraction = fraction.min(self.ledger.day_fraction_left(budget, now, synced));
            let state = self.model_state(&key.label, model);
            if let Some(h) = state
                .and_then(|s| s.exhausted.as_ref())
                .filter(|h| h.until > now)
            {
                consider(KeyState::Exhausted, h.until, h.reason.clone());
            } else if let Some(t) = self.ledger.day_spent_until(budget, now, synced) {
                consider(
                    KeyState::Exhausted,
                    t,
                    format!("today's budget for {model} is spent"),
                );
            }
            if let Some(h) = state
                .and_then(|s| s.cooling.as_ref())
                .filter(|h| h.until > now)
            {
                consider(KeyState::Cooling, h.until, h.reason.clone());
            }
        }
        if let Some(b) = self.backoff_until(&key.provider, now) {
            consider(
                KeyState::Cooling,
                b,
                format!("{} refused many keys at once: backing off", key.provider),
            );
        }
        let (state, until, reason) =
            match self.states.get(&key.label).and_then(|s| s.disabled.clone()) {
                Some(reason) => (KeyState::Disabled, None, Some(reason)),
                None => worst,
            };
        KeyReport {
            label: key.label.clone(),
            provider: key.provider.clone(),
            state,
            until,
            reason,
            remaining,
            day_fraction_left: fraction,
        }
    }

    /// When some key's state next ends by itself (so that health is republished then).
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        let mut next: Option<Timestamp> = None;
        let mut consider = |t: Timestamp| {
            if t > now {
                next = Some(earlier(next, t));
            }
        };
        for states in self.states.values() {
            for s in states.models.values() {
                for hold in [&s.cooling, &s.exhausted].into_iter().flatten() {
                    consider(hold.until);
                }
            }
        }
        for p in self.provider_states.values() {
            if let Some(t) = p.backoff.until {
                consider(t);
            }
        }
        for budget in self.ledger.budget_ids() {
            if let Some(t) = self.ledger.day_spent_until(budget, now, self.last_synced) {
                consider(t);
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotator::test_support::*;

    #[test]
    fn reports_show_remaining_and_spent_days() {
        let mut r = Rotator::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("llama", limits(None, Some(2), None, None))],
            &[("g1", None)],
        )]));
        let now = at("2026-01-01T00:00:00Z");
        let route = vec![target("groq", "llama")];
        let c = call(&mut r, &route, now);
        r.record(&c, &ok(), &mut Attempt::new(), now, true, 0.5);
        let report = state_of(&r, "g1", now);
        assert_eq!(report.state, KeyState::Ready);
        assert_eq!(report.remaining["llama"].rpd, Some(1));
        assert!((report.day_fraction_left - 0.5).abs() < 1e-9);
        let c = call(&mut r, &route, now);
        r.record(&c, &ok(), &mut Attempt::new(), now, true, 0.5);
        let report = state_of(&r, "g1", now);
        assert_eq!(report.state, KeyState::Exhausted);
        assert_eq!(report.until, Some(at("2026-01-02T00:05:00Z")));
        assert_eq!(r.next_change(now), Some(at("2026-01-02T00:05:00Z")));
    }
}
