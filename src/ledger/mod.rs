//! Budgets: what each key (or account) has spent of its minute and day limits per
//! model, reservations against them, corrections learned from the providers'
//! headers and 429s, and the leases that keep a crash from ever handing out budget
//! twice.
//! Pure: time comes in as arguments; nothing here reads a clock or touches a disk.
//!
//! Counting is conservative everywhere: usage is kept in time slots, and a slot's
//! usage counts until the *end* of its slot plus the window, so the ledger may
//! believe it has less budget than the provider does, never more.
//!
//! One idea per file: `cost` what a request costs; `window` the minute and day
//! windows and when a cost fits; `lease` budget charged ahead; `learn` what the
//! providers' headers and 429s teach; `snapshot` the persisted rows. This file holds
//! the budgets and the ledger's API.

mod cost;
mod learn;
mod lease;
mod snapshot;
mod window;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::Serialize;

use crate::config::{Config, DailyReset, ModelLimits};
use crate::provider::Usage;

pub use cost::{
    BYTES_PER_TOKEN, Cost, DEFAULT_MAX_TOKENS, MESSAGE_OVERHEAD_TOKENS, estimate_prompt_tokens,
};
pub use snapshot::RestoreError;
pub(crate) use snapshot::{decode, encode};

use learn::Correction;
use lease::{LEASE_LIFETIME_MS, Lease};
use window::{
    DAY_WINDOW_MS, Meter, add_to, day_slot, midnight_at_or_after, minute_expiry, minute_slot, ms,
    take_from, ts,
};

/// What remains today of one key's budget for one model (shown in the health topic and
/// by `keyrelay status`); `None`: no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Remaining {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
}

/// When a cost fits a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Now,
    /// The earliest instant this cost fits, if nothing else is spent meanwhile.
    At(Timestamp),
    /// The cost exceeds one of the limits outright: it never fits.
    Never,
}

/// One budget: a provider, an account (or a key without one) and a model. Its string
/// form is the budget's row id in the persisted snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetId(String);

impl BudgetId {
    fn new(provider: &str, key_label: &str, account: Option<&str>, model: &str) -> Self {
        // Prefixes keep an account and a key of the same name apart.
        match account {
            Some(account) => BudgetId(format!("{provider}/account:{account}/{model}")),
            None => BudgetId(format!("{provider}/key:{key_label}/{model}")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BudgetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cost charged to a budget for one request in flight; closed by
/// [`Ledger::settle`], [`Ledger::settle_estimated`] or [`Ledger::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    budget: BudgetId,
    id: u64,
    cost: Cost,
    /// The caller must durably commit [`Ledger::snapshot_dirty`] before sending the
    /// request: this reservation took a new lease that is not on disk yet.
    pub needs_commit: bool,
    /// The lease this reservation draws on, numbered as [`Ledger::leases_opened`] counts:
    /// the request may be sent once a snapshot taken at that count or later is durable,
    /// whoever committed it.
    lease: u64,
}

impl Reservation {
    pub fn budget(&self) -> &BudgetId {
        &self.budget
    }

    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// See the field: which snapshot must be durable before the request is sent.
    pub fn lease(&self) -> u64 {
        self.lease
    }
}

#[derive(Debug, Clone)]
struct Budget {
    limits: ModelLimits,
    reset: DailyReset,
    /// Slot index (time / `MINUTE_SLOT_MS`) → usage charged in that slot.
    minute: BTreeMap<i64, Cost>,
    /// Slot index (time / `DAY_SLOT_MS`) → usage charged in that slot.
    day: BTreeMap<i64, Cost>,
    /// Limits the provider announced below the configured ones, by `Meter::index`.
    learned: [Option<u64>; 4],
    /// Milliseconds: when each learned limit stops being in force (`None`: a header's,
    /// in force until a header says otherwise).
    learned_until: [Option<i64>; 4],
    corrections: [Option<Correction>; 4],
    lease: Lease,
    /// Reservations in flight: id → (cost charged, minute slot, day slot).
    open: BTreeMap<u64, (Cost, i64, i64)>,
    /// Milliseconds: since when usage was recorded under an unsynchronised clock.
    unsynced_since: Option<i64>,
    /// Changed since the last snapshot.
    dirty: bool,
}

/// Every budget of the configuration, by key label and model.
#[derive(Debug, Clone)]
pub struct Ledger {
    budgets: BTreeMap<BudgetId, Budget>,
    /// Key label → model → its budget.
    keys: BTreeMap<String, BTreeMap<String, BudgetId>>,
    /// Milliseconds: the latest instant seen; time never runs backwards past it here.
    latest: i64,
    /// Whether the clock was synchronised at the last observation (`None`: none yet).
    last_synced: Option<bool>,
    next_reservation: u64,
    /// Leases opened since this ledger was made; see [`Ledger::leases_opened`].
    leases_opened: u64,
}

impl Budget {
    fn new(limits: ModelLimits, reset: DailyReset) -> Self {
        Budget {
            limits,
            reset,
            minute: BTreeMap::new(),
            day: BTreeMap::new(),
            learned: [None; 4],
            learned_until: [None; 4],
            corrections: [None; 4],
            lease: Lease::default(),
            open: BTreeMap::new(),
            unsynced_since: None,
            dirty: false,
        }
    }
}

impl Ledger {
    /// A ledger with an empty budget for every (account or key, model) of the config.
    pub fn new(config: &Config) -> Ledger {
        let mut budgets = BTreeMap::new();
        let mut keys: BTreeMap<String, BTreeMap<String, BudgetId>> = BTreeMap::new();
        for provider in &config.providers {
            for (model, limits) in &provider.models {
                for key in &provider.keys {
                    let id =
                        BudgetId::new(&provider.name, &key.label, key.account.as_deref(), model);
                    budgets
                        .entry(id.clone())
                        .or_insert_with(|| Budget::new(*limits, provider.daily_reset.clone()));
                    keys.entry(key.label.clone())
                        .or_default()
                        .insert(model.clone(), id);
                }
            }
        }
        Ledger {
            budgets,
            keys,
            latest: i64::MIN,
            last_synced: None,
            next_reservation: 0,
            leases_opened: 0,
        }
    }

    /// The budget a key spends from for a model.
    pub fn budget_for(&self, label: &str, model: &str) -> Option<&BudgetId> {
        self.keys.get(label).and_then(|models| models.get(model))
    }

    /// Every budget id.
    pub fn budget_ids(&self) -> impl Iterator<Item = &BudgetId> {
        self.budgets.keys()
    }

    /// The latest instant the ledger has seen (time never runs backwards past it).
    pub fn latest(&self) -> Option<Timestamp> {
        (self.latest != i64::MIN).then(|| ts(self.latest))
    }

    fn effective(&self, now: Timestamp) -> i64 {
        ms(now).max(self.latest)
    }

    /// Takes note of the time and of the clock's state; returns the instant to use
    /// (never earlier than one already seen). Called by every mutating operation; the
    /// rotator calls it before planning. When the clock becomes synchronised, usage
    /// recorded while it was not is dated at that instant.
    pub fn observe(&mut self, now: Timestamp, synced: bool) -> Timestamp {
        let now = self.effective(now);
        self.latest = now;
        if self.last_synced != Some(synced) {
            for budget in self.budgets.values_mut() {
                if synced {
                    if let Some(since) = budget.unsynced_since {
                        budget.redate(since, now);
                    }
                } else if budget.unsynced_since.is_none() {
                    budget.unsynced_since = Some(now);
                    // The next commit records from when the clock is not to be trusted.
                    budget.dirty |= !budget.minute.is_empty() || !budget.day.is_empty();
                }
            }
            self.last_synced = Some(synced);
        }
        ts(now)
    }

    /// When `cost` fits `budget` (unknown budgets never fit).
    pub fn room(&self, budget: &BudgetId, cost: Cost, now: Timestamp, synced: bool) -> Room {
        match self.budgets.get(budget) {
            Some(b) => b.room(cost, &b.view(self.effective(now), synced)),
            None => Room::Never,
        }
    }

    /// Charges `cost` to both windows of `budget` if it fits now, else says when it will.
    pub fn reserve(
        &mut self,
        budget: &BudgetId,
        cost: Cost,
        now: Timestamp,
        synced: bool,
    ) -> Result<Reservation, Room> {
        let now = ms(self.observe(now, synced));
        let id = self.next_reservation;
        let Some(b) = self.budgets.get_mut(budget) else {
            return Err(Room::Never);
        };
        let view = b.view(now, synced);
        b.prune(&view);
        match b.room(cost, &view) {
            Room::Now => {}
            other => return Err(other),
        }
        // The lease: budget charged ahead on disk, so that most reservations need no
        // commit of their own. Drawing on it is covered by what is already persisted.
        let needs_commit = if b.lease_valid(now) && b.lease.left.covers(cost) {
            b.lease.left = b.lease.left.minus(cost);
            false
        } else {
            let size = b.new_lease(cost, &view);
            self.leases_opened += 1;
            b.lease = Lease {
                left: size.minus(cost),
                expires: now.saturating_add(LEASE_LIFETIME_MS),
                number: self.leases_opened,
            };
            true
        };
        let (m, d) = (minute_slot(now), day_slot(now));
        add_to(&mut b.minute, m, cost);
        add_to(&mut b.day, d, cost);
        b.open.insert(id, (cost, m, d));
        b.dirty = true;
        self.next_reservation = self.next_reservation.wrapping_add(1);
        Ok(Reservation {
            budget: budget.clone(),
            id,
            cost,
            needs_commit,
            lease: b.lease.number,
        })
    }

    /// Closes a reservation whose request was answered: the token estimate is replaced
    /// by the real total (requests stay charged). Returns `true` when the real usage
    /// exceeded the estimate by more than the lease could absorb: the excess is not on
    /// disk yet, and the caller should commit soon. Closing twice does nothing.
    pub fn settle(&mut self, reservation: &Reservation, usage: Usage, now: Timestamp) -> bool {
        let now = ms(self.observe_time(now));
        let Some(b) = self.budgets.get_mut(&reservation.budget) else {
            return false;
        };
        let Some((charged, m, d)) = b.open.remove(&reservation.id) else {
            return false;
        };
        // A provider that reports no usage has not told us anything: keep the estimate.
        let actual = if usage.total() == 0 {
            charged.tokens
        } else {
            usage.total()
        };
        b.dirty = true;
        if actual <= charged.tokens {
            let back = Cost {
                requests: 0,
                tokens: charged.tokens - actual,
            };
            take_from(&mut b.minute, m, back);
            take_from(&mut b.day, d, back);
            false
        } else {
            // Providers count tokens when they admit a request: charge the excess where
            // the estimate was.
            let excess = Cost {
                requests: 0,
                tokens: actual - charged.tokens,
            };
            add_to(&mut b.minute, m, excess);
            add_to(&mut b.day, d, excess);
            if b.lease_valid(now) && b.lease.left.covers(excess) {
                b.lease.left = b.lease.left.minus(excess);
                false
            } else {
                true
            }
        }
    }

    /// Closes a reservation whose outcome is unknown (a timeout, a 5xx): the provider may
    /// have counted it, so the whole estimate stays charged.
    pub fn settle_estimated(&mut self, reservation: &Reservation) {
        if let Some(b) = self.budgets.get_mut(&reservation.budget) {
            b.open.remove(&reservation.id);
        }
    }

    /// Gives a reservation back whole: the request never reached the provider, or the
    /// provider refused it without counting it (a 429). Releasing twice does nothing.
    pub fn release(&mut self, reservation: &Reservation) {
        let Some(b) = self.budgets.get_mut(&reservation.budget) else {
            return;
        };
        let Some((charged, m, d)) = b.open.remove(&reservation.id) else {
            return;
        };
        // Not back into the lease: on disk this cost sits in its own, earlier slot,
        // which leaves the window before a request drawn from the lease later would.
        take_from(&mut b.minute, m, charged);
        take_from(&mut b.day, d, charged);
        b.dirty = true;
    }

    fn observe_time(&mut self, now: Timestamp) -> Timestamp {
        let now = self.effective(now);
        self.latest = now;
        ts(now)
    }

    /// What remains today of `budget`'s day limits.
    pub fn remaining_today(&self, budget: &BudgetId, now: Timestamp, synced: bool) -> Remaining {
        let Some(b) = self.budgets.get(budget) else {
            return Remaining::default();
        };
        let view = b.view(self.effective(now), synced);
        Remaining {
            rpd: b.left(Meter::Rpd, &view),
            tpd: b.left(Meter::Tpd, &view),
        }
    }

    /// The smallest fraction left of `budget`'s day limits (1.0 without any).
    pub fn day_fraction_left(&self, budget: &BudgetId, now: Timestamp, synced: bool) -> f64 {
        self.fraction_left(budget, [Meter::Rpd, Meter::Tpd], now, synced)
            .unwrap_or(1.0)
    }

    /// The smallest fraction left of `budget`'s minute limits (1.0 without any): how the
    /// rotator spreads load. An unknown budget has none left.
    pub fn minute_fraction_left(&self, budget: &BudgetId, now: Timestamp, synced: bool) -> f64 {
        self.fraction_left(budget, [Meter::Rpm, Meter::Tpm], now, synced)
            .unwrap_or(0.0)
    }

    /// The smallest fraction left over `meters` (1.0 when none has a limit); `None` for
    /// an unknown budget.
    fn fraction_left(
        &self,
        budget: &BudgetId,
        meters: [Meter; 2],
        now: Timestamp,
        synced: bool,
    ) -> Option<f64> {
        let b = self.budgets.get(budget)?;
        let view = b.view(self.effective(now), synced);
        Some(
            meters
                .into_iter()
                .filter_map(|m| {
                    let limit = b.limit(m, view.now)?;
                    let left = b.left(m, &view)?;
                    Some(if limit == 0 {
                        0.0
                    } else {
                        left as f64 / limit as f64
                    })
                })
                .fold(1.0, f64::min),
        )
    }

    /// When the oldest usage counted in `budget`'s minute window stops counting.
    pub fn oldest_minute_usage_leaves(
        &self,
        budget: &BudgetId,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let b = self.budgets.get(budget)?;
        let now = self.effective(now);
        b.minute
            .keys()
            .map(|slot| minute_expiry(*slot))
            .find(|expiry| *expiry > now)
            .map(ts)
    }

    /// When the oldest usage counted in `budget`'s day window stops counting (for a
    /// zone, the next local midnight); `None` when nothing is counted. With the clock
    /// unsynchronised this is an estimate: nothing leaves until it is synchronised.
    pub fn oldest_day_usage_leaves(
        &self,
        budget: &BudgetId,
        now: Timestamp,
        synced: bool,
    ) -> Option<Timestamp> {
        let b = self.budgets.get(budget)?;
        let view = b.view(self.effective(now), synced);
        b.day
            .iter()
            .filter(|(slot, c)| !c.is_zero() && b.day_live(**slot, &view))
            .map(|(slot, _)| b.day_expiry(*slot, &view))
            .filter(|expiry| *expiry > view.now)
            .min()
            .map(ts)
    }

    /// The next local midnight for a budget whose provider resets at one; `None` for a
    /// rolling window.
    pub fn next_daily_reset(&self, budget: &BudgetId, now: Timestamp) -> Option<Timestamp> {
        let b = self.budgets.get(budget)?;
        match &b.reset {
            DailyReset::Rolling => None,
            DailyReset::Zone { tz, .. } => Some(ts(midnight_at_or_after(
                tz,
                self.effective(now).saturating_add(1),
            ))),
        }
    }

    /// When `budget`'s day window is spent (no room for one more request or token):
    /// the instant it frees; `None` while it is not spent.
    pub fn day_spent_until(
        &self,
        budget: &BudgetId,
        now: Timestamp,
        synced: bool,
    ) -> Option<Timestamp> {
        let b = self.budgets.get(budget)?;
        let view = b.view(self.effective(now), synced);
        let mut until: Option<Timestamp> = None;
        for meter in [Meter::Rpd, Meter::Tpd] {
            if b.left(meter, &view) == Some(0) {
                let free = match b.meter_room(meter, 1, &view) {
                    Room::At(t) => t,
                    // A limit of zero: spent for as long as anyone can tell.
                    Room::Never | Room::Now => ts(view.now.saturating_add(DAY_WINDOW_MS)),
                };
                until = Some(until.map_or(free, |u| u.max(free)));
            }
        }
        until
    }

    /// How many leases this ledger has opened. A snapshot taken now holds all of them:
    /// once it is durable, every reservation whose [`Reservation::lease`] is at most this
    /// may be sent, and a reservation on a budget whose lease is older need not wait for
    /// a commit of another budget's new one.
    pub fn leases_opened(&self) -> u64 {
        self.leases_opened
    }
}
