//! Which key serves a task next, and what a provider's answer means for the keys:
//! cooling, exhausted, disabled, too large, provider-wide backoff. Owns the
//! [`Ledger`]. Pure: time, the clock's state and jitter come in as arguments.
//! Keys are known by label only; their secrets are not this module's business.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::config::{Config, DailyReset, Target};
use crate::health::{KeyReport, KeyState};
use crate::ledger::{self, BudgetId, Cost, Ledger, Reservation, Room};
use crate::provider::{CallOutcome, Failure, LimitScope};

pub use crate::ledger::RestoreError;

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
/// The smallest cost there is, for "could this key serve anything now".
const MIN_COST: Cost = Cost {
    requests: 1,
    tokens: 1,
};

/// Row-id prefixes of the persisted state.
const BUDGET_ROW: &str = "budget/";
const KEY_ROW: &str = "key/";
const PROVIDER_ROW: &str = "provider/";

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

/// A state that ends by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    until: Timestamp,
    reason: String,
}

/// One key's state for one model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ModelState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cooling: Option<Hold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exhausted: Option<Hold>,
    /// Requests estimated at this many tokens or more do not fit this key and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    too_large: Option<u64>,
}

impl ModelState {
    fn is_empty(&self) -> bool {
        self.cooling.is_none() && self.exhausted.is_none() && self.too_large.is_none()
    }
}

/// One key's state, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyStates {
    /// Why the key is refused; until an operator resets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, ModelState>,
}

/// A provider's backoff, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ProviderBackoff {
    #[serde(default)]
    until: Option<Timestamp>,
    #[serde(default)]
    level: u32,
    #[serde(default)]
    last_burst: Option<Timestamp>,
}

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

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

fn until(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
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

    /// The budgets, read-only.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
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

    /// Whether some key of `route` could serve a request now.
    /// The node's health (SPEC §3) as this rotator sees it, `auto` being the route whose
    /// service decides between degraded and exhausted.
    pub fn health(
        &self,
        auto: &[Target],
        now: Timestamp,
        synced: bool,
        queue: usize,
        tasks: crate::health::Counters,
    ) -> crate::health::Health {
        let keys = self.key_reports(now, synced);
        crate::health::derive(
            keys,
            self.servable_now(auto, now, synced),
            queue,
            tasks,
            synced,
        )
    }

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

    /// See [`Ledger::leases_opened`]: read with the snapshot it is to describe.
    pub fn leases_opened(&self) -> u64 {
        self.ledger.leases_opened()
    }

    /// Rows changed since the last call (budgets with their leases counted as spent, key
    /// states, provider backoffs): what a commit writes.
    pub fn snapshot_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = self
            .ledger
            .snapshot_dirty()
            .into_iter()
            .map(|(id, bytes)| (format!("{BUDGET_ROW}{id}"), bytes))
            .collect();
        let keys = std::mem::take(&mut self.dirty_keys);
        for label in keys {
            match self.key_row(&label) {
                Some(row) => rows.push(row),
                None => {
                    self.dirty_keys.insert(label);
                }
            }
        }
        let providers = std::mem::take(&mut self.dirty_providers);
        for name in providers {
            match self.provider_row(&name) {
                Some(row) => rows.push(row),
                None => {
                    self.dirty_providers.insert(name);
                }
            }
        }
        rows
    }

    /// Every row, budgets without leases: for a clean stop.
    pub fn snapshot_exact(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = self
            .ledger
            .snapshot_exact()
            .into_iter()
            .map(|(id, bytes)| (format!("{BUDGET_ROW}{id}"), bytes))
            .collect();
        let labels: Vec<String> = self.keys.iter().map(|k| k.label.clone()).collect();
        rows.extend(labels.iter().filter_map(|l| self.key_row(l)));
        let names: Vec<String> = self.providers.keys().cloned().collect();
        rows.extend(names.iter().filter_map(|n| self.provider_row(n)));
        self.dirty_keys.clear();
        self.dirty_providers.clear();
        rows
    }

    fn key_row(&self, label: &str) -> Option<(String, Vec<u8>)> {
        let mut states = self.states.get(label).cloned().unwrap_or_default();
        states.models.retain(|_, s| !s.is_empty());
        ledger::encode(&format!("{KEY_ROW}{label}"), &states)
    }

    fn provider_row(&self, name: &str) -> Option<(String, Vec<u8>)> {
        let backoff = self
            .provider_states
            .get(name)
            .map(|p| p.backoff.clone())
            .unwrap_or_default();
        ledger::encode(&format!("{PROVIDER_ROW}{name}"), &backoff)
    }

    /// Rebuilds budgets, key states and provider backoffs from persisted rows (meant
    /// for a fresh rotator). Rows of keys, providers or budgets no longer configured, and
    /// rows of other kinds, are ignored; a row that fails to parse is an error, and then
    /// nothing is restored.
    pub fn restore<I>(&mut self, rows: I) -> Result<(), RestoreError>
    where
        I: IntoIterator<Item = (String, Vec<u8>)>,
    {
        let mut budgets = Vec::new();
        let mut keys = Vec::new();
        let mut providers = Vec::new();
        for (id, bytes) in rows {
            if let Some(budget) = id.strip_prefix(BUDGET_ROW) {
                budgets.push((budget.to_owned(), bytes));
            } else if let Some(label) = id.strip_prefix(KEY_ROW) {
                if self.key(label).is_some() {
                    let states: KeyStates = ledger::decode(&id, &bytes)?;
                    keys.push((label.to_owned(), states));
                }
            } else if let Some(name) = id.strip_prefix(PROVIDER_ROW)
                && self.providers.contains_key(name)
            {
                let backoff: ProviderBackoff = ledger::decode(&id, &bytes)?;
                providers.push((name.to_owned(), backoff));
            }
        }
        // Parsed budgets are applied by the ledger only once all of them have parsed.
        self.ledger.restore(budgets).map_err(|e| match e {
            RestoreError::Corrupt { id, source } => RestoreError::Corrupt {
                id: format!("{BUDGET_ROW}{id}"),
                source,
            },
        })?;
        for (label, mut states) in keys {
            let models = self
                .key(&label)
                .map(|k| k.models.clone())
                .unwrap_or_default();
            states.models.retain(|m, _| models.contains(m));
            self.states.insert(label, states);
        }
        for (name, backoff) in providers {
            self.provider_states.entry(name).or_default().backoff = backoff;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelLimits;
    use crate::ledger::tests::{at, config, limits, provider, secs, zone};
    use crate::provider::{Completion, LimitDimension, RateLimitHeaders, Usage, Violation};

    const COST: Cost = Cost {
        requests: 1,
        tokens: 100,
    };

    fn target(provider: &str, model: &str) -> Target {
        Target {
            provider: provider.to_owned(),
            model: model.to_owned(),
        }
    }

    fn groq_limits() -> ModelLimits {
        limits(Some(30), Some(1000), Some(12_000), Some(100_000))
    }

    /// groq (rolling, keys g1..g3) and gemini (Los Angeles midnight, keys m1, m2).
    fn two_providers() -> Rotator {
        Rotator::new(&config(vec![
            provider(
                "groq",
                DailyReset::Rolling,
                &[("llama", groq_limits())],
                &[("g1", None), ("g2", None), ("g3", None)],
            ),
            provider(
                "gemini",
                zone("America/Los_Angeles"),
                &[("flash", limits(Some(15), Some(1500), None, None))],
                &[("m1", None), ("m2", None)],
            ),
        ]))
    }

    fn route() -> Vec<Target> {
        vec![target("groq", "llama"), target("gemini", "flash")]
    }

    fn ok() -> CallOutcome {
        CallOutcome {
            result: Ok(Completion {
                content: "hi".to_owned(),
                usage: Usage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                },
            }),
            headers: RateLimitHeaders::default(),
        }
    }

    fn failed(failure: Failure) -> CallOutcome {
        CallOutcome {
            result: Err(failure),
            headers: RateLimitHeaders::default(),
        }
    }

    fn limited(retry_after: Option<Duration>, scope: LimitScope) -> CallOutcome {
        failed(Failure::RateLimited {
            retry_after,
            scope,
            violations: Vec::new(),
            detail: "Rate limit reached".to_owned(),
        })
    }

    /// A minute 429 naming the requests-per-minute limit, as Groq's "on requests per
    /// minute (RPM): Limit 15" or Gemini's `quotaValue` do.
    fn rpm_refused(retry_after: Duration, limit: Option<u64>) -> CallOutcome {
        failed(Failure::RateLimited {
            retry_after: Some(retry_after),
            scope: LimitScope::Minute,
            violations: vec![Violation {
                scope: LimitScope::Minute,
                dimension: LimitDimension::Requests,
                limit,
            }],
            detail: "Rate limit reached".to_owned(),
        })
    }

    /// Plans and answers tasks at `now` until the rotator says to wait; how many calls
    /// it made, and the wait.
    fn serve_all(r: &mut Rotator, route: &[Target], now: Timestamp) -> (usize, Plan) {
        for served in 0..1000 {
            match r.plan(route, COST, &Attempt::new(), now, now + secs(120), true) {
                Plan::Call(c) => {
                    r.record(&c, &ok(), &mut Attempt::new(), now, true, 0.5);
                }
                other => return (served, other),
            }
        }
        panic!("no end to the calls at {now}");
    }

    fn call(r: &mut Rotator, route: &[Target], now: Timestamp) -> Call {
        match r.plan(route, COST, &Attempt::new(), now, now + secs(120), true) {
            Plan::Call(call) => call,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    fn state_of(r: &Rotator, label: &str, now: Timestamp) -> KeyReport {
        r.key_reports(now, true)
            .into_iter()
            .find(|k| k.label == label)
            .expect("key")
    }

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

    #[test]
    fn states_and_budgets_survive_a_restart() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let mut attempt = Attempt::new();
        let c = call(&mut r, &route(), now);
        r.record(
            &c,
            &limited(Some(secs(300)), LimitScope::Minute),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let c = call(&mut r, &route(), now);
        r.record(
            &c,
            &failed(Failure::KeyRejected {
                status: 403,
                detail: "forbidden".to_owned(),
            }),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let big = Cost {
            requests: 1,
            tokens: 9000,
        };
        let Plan::Call(c) = r.plan(&route(), big, &Attempt::new(), now, now + secs(120), true)
        else {
            panic!("expected a call");
        };
        r.record(
            &c,
            &failed(Failure::TooLarge {
                detail: "too large".to_owned(),
            }),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let c = call(&mut r, &route(), now);
        r.record(&c, &ok(), &mut attempt, now, true, 0.5);
        let before = r.key_reports(now, true);

        // A crash: only what was committed survives.
        let rows = r.snapshot_dirty();
        let mut after = two_providers();
        after.restore(rows).expect("restores");
        assert_eq!(after.key_reports(now, true), before);
        assert!(matches!(
            after.plan(&route(), big, &Attempt::new(), now, now + secs(120), true),
            Plan::Call(Call { label, .. }) if label != "g3"
        ));
        // And a clean stop.
        let mut again = two_providers();
        again.restore(r.snapshot_exact()).expect("restores");
        assert_eq!(again.key_reports(now, true), before);
        // Rows of other kinds and of keys no longer configured are ignored; a broken
        // row is an error.
        let mut other = two_providers();
        other
            .restore(vec![
                ("key/gone".to_owned(), b"?".to_vec()),
                ("task/1".to_owned(), b"?".to_vec()),
            ])
            .expect("ignored");
        assert!(
            other
                .restore(vec![("key/g1".to_owned(), b"?".to_vec())])
                .is_err()
        );
    }

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
