//! Which key serves a task next, and what a provider's answer means for the keys:
//! cooling, exhausted, disabled, too large, provider-wide backoff. Owns the
//! [`Ledger`]. Pure: time, the clock's state and jitter come in as arguments.
//! Keys are known by label only; their secrets are not this module's business.
//!
//! - `plan`: which key of a route serves a task now, or until when it waits.
//! - `record`: what a call's outcome does to the budgets and the keys' states.
//! - `report`: each key's state as operators see it.
//! - `snapshot`: the rows committed to the store and rebuilt from it; what the rows
//!   hold is [`crate::state`]'s.
//!
//! This file holds the rotator itself: the keys it knows, their states, and the
//! operator's reset.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::config::{Config, DailyReset, Target};
use crate::ledger::Ledger;
use crate::state::{KeyStates, ModelState, ProviderBackoff};

mod plan;
mod record;
mod report;
mod snapshot;
#[cfg(test)]
mod test_support;

pub use crate::ledger::RestoreError;
pub use plan::{Attempt, Call, Plan};
pub use record::{FailCode, MAX_TRANSIENT_RETRIES, Next};
pub use report::{KeyReport, KeyState};

/// A provider's backoff and what may start the next one.
#[derive(Debug, Clone, Default)]
struct ProviderState {
    backoff: ProviderBackoff,
    /// Recent minute 429s: when, and which key.
    refusals: Vec<(Timestamp, String)>,
}

#[derive(Debug, Clone)]
struct KeyInfo {
    label: String,
    provider: String,
    account: Option<String>,
    models: Vec<String>,
}

#[derive(Debug, Clone)]
struct ProviderInfo {
    /// Indexes into `Rotator::keys`.
    keys: Vec<usize>,
    zone: Option<TimeZone>,
}

/// Keys, their states and their budgets.
#[derive(Debug, Clone)]
pub struct Rotator {
    ledger: Ledger,
    keys: Vec<KeyInfo>,
    providers: BTreeMap<String, ProviderInfo>,
    states: BTreeMap<String, KeyStates>,
    provider_states: BTreeMap<String, ProviderState>,
    dirty_keys: BTreeSet<String>,
    dirty_providers: BTreeSet<String>,
    /// Per target, the index (into the provider's keys) chosen last: ties go round-robin.
    cursor: BTreeMap<Target, usize>,
    /// The clock's state at the last `plan` or `record`, for `next_change`.
    last_synced: bool,
}

// Time arithmetic that saturates rather than fails: a hold too far off to name is still
// a hold, and a time already past is no wait.
fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

fn until(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

fn later(a: Option<Timestamp>, b: Timestamp) -> Timestamp {
    a.map_or(b, |a| a.max(b))
}

fn earlier(a: Option<Timestamp>, b: Timestamp) -> Timestamp {
    a.map_or(b, |a| a.min(b))
}

impl Rotator {
    pub fn new(config: &Config) -> Rotator {
        let mut keys = Vec::new();
        let mut providers = BTreeMap::new();
        for p in &config.providers {
            let mut indexes = Vec::new();
            for k in &p.keys {
                indexes.push(keys.len());
                keys.push(KeyInfo {
                    label: k.label.clone(),
                    provider: p.name.clone(),
                    account: k.account.clone(),
                    models: p.models.keys().cloned().collect(),
                });
            }
            let zone = match &p.daily_reset {
                DailyReset::Zone { tz, .. } => Some(tz.clone()),
                DailyReset::Rolling => None,
            };
            providers.insert(
                p.name.clone(),
                ProviderInfo {
                    keys: indexes,
                    zone,
                },
            );
        }
        Rotator {
            ledger: Ledger::new(config),
            keys,
            providers,
            states: BTreeMap::new(),
            provider_states: BTreeMap::new(),
            dirty_keys: BTreeSet::new(),
            dirty_providers: BTreeSet::new(),
            cursor: BTreeMap::new(),
            last_synced: false,
        }
    }

    fn key(&self, label: &str) -> Option<&KeyInfo> {
        self.keys.iter().find(|k| k.label == label)
    }

    fn model_state(&self, label: &str, model: &str) -> Option<&ModelState> {
        self.states.get(label).and_then(|s| s.models.get(model))
    }

    fn model_state_mut(&mut self, label: &str, model: &str) -> &mut ModelState {
        self.dirty_keys.insert(label.to_owned());
        self.states
            .entry(label.to_owned())
            .or_default()
            .models
            .entry(model.to_owned())
            .or_default()
    }

    fn backoff_until(&self, provider: &str, now: Timestamp) -> Option<Timestamp> {
        self.provider_states
            .get(provider)
            .and_then(|p| p.backoff.until)
            .filter(|u| *u > now)
    }

    /// An operator's reset: clears the key's cooldowns, exhaustion, disabled state and
    /// too-large thresholds. `false` when no key has this label.
    ///
    /// A disabled key stays disabled across restarts; the caller calls this when the
    /// key's secret may have changed (`keyrelay reset`, or a key file found changed at
    /// start). Nothing derived from a secret is ever kept here.
    pub fn reset(&mut self, label: &str) -> bool {
        if self.key(label).is_none() {
            return false;
        }
        self.states.remove(label);
        self.dirty_keys.insert(label.to_owned());
        true
    }
}
