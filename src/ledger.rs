//! Budgets: what each key (or account) has spent of its minute and day limits per
//! model, reservations against them, corrections learned from the providers'
//! headers and 429s, and the leases that keep a crash from ever handing out budget
//! twice.
//! Pure: time comes in as arguments; nothing here reads a clock or touches a disk.
//!
//! Counting is conservative everywhere: usage is kept in time slots, and a slot's
//! usage counts until the *end* of its slot plus the window, so the ledger may
//! believe it has less budget than the provider does, never more.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::config::{Config, DailyReset, ModelLimits};
use crate::health::Remaining;
use crate::provider::{
    ChatRequest, LimitDimension, LimitScope, RateLimitHeaders, Usage, Violation,
};

/// Length of the minute window.
const MINUTE_WINDOW_MS: i64 = 60_000;
/// Width of a minute-window slot: budget comes back at most one second later than
/// the provider gives it, for 61 counters per budget.
const MINUTE_SLOT_MS: i64 = 1_000;
/// Length of the rolling day window.
const DAY_WINDOW_MS: i64 = 86_400_000;
/// Width of a day-window slot: budget comes back at most five minutes late, for 289
/// counters per budget.
const DAY_SLOT_MS: i64 = 300_000;

/// Tokens assumed for the answer when a task gives no `max_tokens`: providers default
/// to the model's whole context, which would make any task look unaffordable; the
/// settled usage replaces this guess once the answer comes.
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// Tokens a chat format spends around each message (role, separators), whatever its text.
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 4;
/// Bytes of UTF-8 per token in the prompt estimate. Counting bytes rather than
/// characters errs on the high side for non-Latin scripts, which tokenise densely.
pub const BYTES_PER_TOKEN: u64 = 4;

/// How far back the demand that sizes a new lease is measured.
const LEASE_DEMAND_SPAN_MS: i64 = 5_000;
/// A new lease covers this many times the demand of the last `LEASE_DEMAND_SPAN_MS`,
/// i.e. about ten seconds of steady load: under steady load a budget commits well
/// under once a second, and a quickening load doubles its lease at each commit.
const LEASE_DEMAND_FACTOR: u64 = 2;
/// How long a lease may be drawn on. The persisted snapshot counts an unused lease
/// as spent at its expiry, so it must not be drawn on after that instant; longer
/// than the demand it covers, so that a lease is not dropped half used.
const LEASE_LIFETIME_MS: i64 = 10_000;

/// A header reset delay up to this is a per-minute limit; longer is per day.
const HEADER_MINUTE_RESET_MAX: Duration = Duration::from_secs(60);
/// A header `limit` is taken to be the configured limit it is within this factor of
/// (Groq sends the day's request limit and the minute's token limit side by side).
const LIMIT_MATCH_FACTOR: f64 = 2.0;
/// While the clock is unsynchronised a day window cannot say when it frees; callers
/// are told to look again after this long (the clock may have synchronised by then).
const UNSYNCED_RECHECK_MS: i64 = 60_000;
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

/// What one request costs a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
}

impl Cost {
    /// One request, and tokens = an estimate of the prompt plus the answer's
    /// `max_tokens` (or [`DEFAULT_MAX_TOKENS`]).
    pub fn estimate(request: &ChatRequest) -> Cost {
        let prompt: u64 = request
            .messages
            .iter()
            .map(|m| (m.content.len() as u64).div_ceil(BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS)
            .sum();
        let answer = request.max_tokens.map_or(DEFAULT_MAX_TOKENS, u64::from);
        Cost {
            requests: 1,
            tokens: prompt.saturating_add(answer),
        }
    }

    fn get(self, dim: Dim) -> u64 {
        match dim {
            Dim::Requests => self.requests,
            Dim::Tokens => self.tokens,
        }
    }

    fn plus(self, other: Cost) -> Cost {
        Cost {
            requests: self.requests.saturating_add(other.requests),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }

    fn minus(self, other: Cost) -> Cost {
        Cost {
            requests: self.requests.saturating_sub(other.requests),
            tokens: self.tokens.saturating_sub(other.tokens),
        }
    }

    fn covers(self, other: Cost) -> bool {
        self.requests >= other.requests && self.tokens >= other.tokens
    }

    fn is_zero(self) -> bool {
        self.requests == 0 && self.tokens == 0
    }
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

/// A persisted row could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("state row {id:?} is unreadable: {source}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads one persisted row.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    id: &str,
    bytes: &[u8],
) -> Result<T, RestoreError> {
    serde_json::from_slice(bytes).map_err(|source| RestoreError::Corrupt {
        id: id.to_owned(),
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Requests,
    Tokens,
}

impl From<LimitDimension> for Dim {
    fn from(dimension: LimitDimension) -> Self {
        match dimension {
            LimitDimension::Requests => Dim::Requests,
            LimitDimension::Tokens => Dim::Tokens,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Minute,
    Day,
}

impl From<LimitScope> for Window {
    fn from(scope: LimitScope) -> Self {
        match scope {
            LimitScope::Minute => Window::Minute,
            LimitScope::Day => Window::Day,
        }
    }
}

/// One limit of a budget: a window and what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meter {
    Rpm,
    Rpd,
    Tpm,
    Tpd,
}

impl Meter {
    const ALL: [Meter; 4] = [Meter::Rpm, Meter::Rpd, Meter::Tpm, Meter::Tpd];

    fn of(window: Window, dim: Dim) -> Meter {
        match (window, dim) {
            (Window::Minute, Dim::Requests) => Meter::Rpm,
            (Window::Day, Dim::Requests) => Meter::Rpd,
            (Window::Minute, Dim::Tokens) => Meter::Tpm,
            (Window::Day, Dim::Tokens) => Meter::Tpd,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn window(self) -> Window {
        match self {
            Meter::Rpm | Meter::Tpm => Window::Minute,
            Meter::Rpd | Meter::Tpd => Window::Day,
        }
    }

    fn dim(self) -> Dim {
        match self {
            Meter::Rpm | Meter::Rpd => Dim::Requests,
            Meter::Tpm | Meter::Tpd => Dim::Tokens,
        }
    }

    fn configured(self, limits: &ModelLimits) -> Option<u64> {
        match self {
            Meter::Rpm => limits.rpm,
            Meter::Rpd => limits.rpd,
            Meter::Tpm => limits.tpm,
            Meter::Tpd => limits.tpd,
        }
    }
}

/// Usage the provider reported that the ledger had not counted, held until the
/// provider's reset time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Correction {
    extra: u64,
    until: Timestamp,
}

/// Budget charged ahead and persisted; see [`Ledger::reserve`].
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    left: Cost,
    /// Milliseconds; the lease may not be drawn on after this instant.
    expires: i64,
    /// Its number in [`Ledger::leases_opened`]'s count.
    number: u64,
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

/// How the day window is counted at one instant.
enum DayRule {
    Rolling,
    Zone {
        tz: TimeZone,
        last_midnight: i64,
        next_midnight: i64,
    },
}

/// A budget looked at from one instant.
struct View {
    now: i64,
    synced: bool,
    day: DayRule,
}

/// The persisted form of one budget.
#[derive(Debug, Serialize, Deserialize)]
struct BudgetRow {
    latest: Timestamp,
    minute_slot_ms: i64,
    day_slot_ms: i64,
    minute: Vec<(i64, Cost)>,
    day: Vec<(i64, Cost)>,
    learned: [Option<u64>; 4],
    /// Absent in rows written before limits were learned from 429s: none expires.
    #[serde(default)]
    learned_until: [Option<Timestamp>; 4],
    corrections: [Option<Correction>; 4],
    unsynced_since: Option<Timestamp>,
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

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(if ms > 0 {
        Timestamp::MAX
    } else {
        Timestamp::MIN
    })
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn minute_slot(t: i64) -> i64 {
    t.div_euclid(MINUTE_SLOT_MS)
}

fn day_slot(t: i64) -> i64 {
    t.div_euclid(DAY_SLOT_MS)
}

/// When a minute slot's usage stops counting: the end of the slot plus the window.
fn minute_expiry(slot: i64) -> i64 {
    slot.saturating_add(1)
        .saturating_mul(MINUTE_SLOT_MS)
        .saturating_add(MINUTE_WINDOW_MS)
}

fn day_slot_end(slot: i64) -> i64 {
    slot.saturating_add(1).saturating_mul(DAY_SLOT_MS)
}

/// The first local midnight at or after `t` (milliseconds).
fn midnight_at_or_after(tz: &TimeZone, t: i64) -> i64 {
    let zoned = ts(t).to_zoned_datetime(tz.clone());
    let start = zoned.start_of_day().map(|z| ms(z.timestamp()));
    match start {
        Ok(start) if start >= t => start,
        _ => match zoned.tomorrow().and_then(|z| z.start_of_day()) {
            Ok(next) => ms(next.timestamp()),
            // Only at the edge of jiff's range: a rolling window's end is a safe stand-in.
            Err(_) => t.saturating_add(DAY_WINDOW_MS),
        },
    }
}

/// The last local midnight at or before `t` (milliseconds).
fn midnight_at_or_before(tz: &TimeZone, t: i64) -> i64 {
    match ts(t).to_zoned_datetime(tz.clone()).start_of_day() {
        Ok(start) => ms(start.timestamp()),
        // Only at the edge of jiff's range: counting a whole day back keeps more usage.
        Err(_) => t.saturating_sub(DAY_WINDOW_MS),
    }
}

fn add_to(slots: &mut BTreeMap<i64, Cost>, slot: i64, cost: Cost) {
    if cost.is_zero() {
        return;
    }
    let entry = slots.entry(slot).or_default();
    *entry = entry.plus(cost);
}

fn take_from(slots: &mut BTreeMap<i64, Cost>, slot: i64, cost: Cost) {
    if let Some(entry) = slots.get_mut(&slot) {
        *entry = entry.minus(cost);
        if entry.is_zero() {
            slots.remove(&slot);
        }
    }
}

/// Moves every slot at or after `from` into `to` (usage recorded under a wrong clock
/// is dated at the instant the clock became right: never earlier than it really was).
/// Returns the slots moved.
fn move_slots(slots: &mut BTreeMap<i64, Cost>, from: i64, to: i64) -> Vec<i64> {
    let moved: Vec<(i64, Cost)> = slots
        .range(from..)
        .filter(|(slot, _)| **slot < to)
        .map(|(slot, cost)| (*slot, *cost))
        .collect();
    for (slot, cost) in &moved {
        slots.remove(slot);
        add_to(slots, to, *cost);
    }
    moved.into_iter().map(|(slot, _)| slot).collect()
}

/// Rebases slots persisted with another slot width: each old slot goes into the new
/// slot holding its last instant, so that nothing expires earlier than it did.
fn rebase(slots: Vec<(i64, Cost)>, old_width: i64, new_width: i64) -> BTreeMap<i64, Cost> {
    let mut out = BTreeMap::new();
    for (slot, cost) in slots {
        let target = if old_width == new_width || old_width <= 0 {
            slot
        } else {
            slot.saturating_add(1)
                .saturating_mul(old_width)
                .saturating_sub(1)
                .div_euclid(new_width)
        };
        add_to(&mut out, target, cost);
    }
    out
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

    fn view(&self, now: i64, synced: bool) -> View {
        let day = match &self.reset {
            DailyReset::Rolling => DayRule::Rolling,
            DailyReset::Zone { tz, .. } => DayRule::Zone {
                tz: tz.clone(),
                last_midnight: midnight_at_or_before(tz, now),
                next_midnight: midnight_at_or_after(tz, now.saturating_add(1)),
            },
        };
        View { now, synced, day }
    }

    /// The limit in force: the configured one, or a smaller one the provider announced.
    fn limit(&self, meter: Meter, now: i64) -> Option<u64> {
        match (meter.configured(&self.limits), self.learned(meter, now)) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    }

    /// The learned limit of `meter`, while it is in force.
    fn learned(&self, meter: Meter, now: i64) -> Option<u64> {
        let i = meter.index();
        self.learned[i].filter(|_| self.learned_until[i].is_none_or(|until| until > now))
    }

    /// When the learned limit of `meter` stops being in force, if it is in force now and
    /// ever stops.
    fn learned_expiry(&self, meter: Meter, now: i64) -> Option<i64> {
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

    /// A day slot recorded while the clock was unsynchronised and not yet re-dated.
    fn pending(&self, slot: i64) -> bool {
        self.unsynced_since.is_some_and(|u| slot >= day_slot(u))
    }

    /// A minute slot recorded while the clock was unsynchronised and not yet re-dated.
    fn pending_minute(&self, slot: i64) -> bool {
        self.unsynced_since.is_some_and(|u| slot >= minute_slot(u))
    }

    fn minute_live(&self, slot: i64, view: &View) -> bool {
        // Unsynchronised, the minute window slides as usual; once the clock is
        // synchronised, what it recorded meanwhile counts as of now until re-dated.
        minute_expiry(slot) > view.now || (view.synced && self.pending_minute(slot))
    }

    fn minute_expiry_at(&self, slot: i64, view: &View) -> i64 {
        if view.synced && self.pending_minute(slot) {
            minute_expiry(slot.max(minute_slot(view.now)))
        } else {
            minute_expiry(slot)
        }
    }

    fn day_live(&self, slot: i64, view: &View) -> bool {
        if !view.synced || self.pending(slot) {
            // No day window resets or expires until the clock can be trusted.
            return true;
        }
        match view.day {
            DayRule::Rolling => day_slot_end(slot).saturating_add(DAY_WINDOW_MS) > view.now,
            DayRule::Zone { last_midnight, .. } => day_slot_end(slot) > last_midnight,
        }
    }

    /// When a day slot stops counting, were the clock right (an estimate while not).
    fn day_expiry(&self, slot: i64, view: &View) -> i64 {
        let slot = if self.pending(slot) {
            // Re-dated at the instant the clock synchronises, at the earliest now.
            slot.max(day_slot(view.now))
        } else {
            slot
        };
        let end = day_slot_end(slot);
        match &view.day {
            DayRule::Rolling => end.saturating_add(DAY_WINDOW_MS),
            DayRule::Zone {
                tz,
                last_midnight,
                next_midnight,
            } => {
                if end > *last_midnight && end <= *next_midnight {
                    *next_midnight
                } else {
                    midnight_at_or_after(tz, end)
                }
            }
        }
    }

    fn correction(&self, meter: Meter, now: i64) -> Option<Correction> {
        self.corrections[meter.index()].filter(|c| ms(c.until) > now)
    }

    /// What the ledger counts as spent against one limit at `view.now`.
    fn used(&self, meter: Meter, view: &View) -> u64 {
        let dim = meter.dim();
        let slots: u64 = match meter.window() {
            Window::Minute => self
                .minute
                .iter()
                .filter(|(slot, _)| self.minute_live(**slot, view))
                .map(|(_, c)| c.get(dim))
                .fold(0, u64::saturating_add),
            Window::Day => self
                .day
                .iter()
                .filter(|(slot, _)| self.day_live(**slot, view))
                .map(|(_, c)| c.get(dim))
                .fold(0, u64::saturating_add),
        };
        let extra = self.correction(meter, view.now).map_or(0, |c| c.extra);
        slots.saturating_add(extra)
    }

    fn left(&self, meter: Meter, view: &View) -> Option<u64> {
        self.limit(meter, view.now)
            .map(|limit| limit.saturating_sub(self.used(meter, view)))
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

    /// Every piece of usage still counted against `meter`, with when it stops counting.
    fn expiring(&self, meter: Meter, view: &View) -> Vec<(i64, u64)> {
        let dim = meter.dim();
        let mut chunks: Vec<(i64, u64)> = match meter.window() {
            Window::Minute => self
                .minute
                .iter()
                .filter(|(slot, _)| self.minute_live(**slot, view))
                .map(|(slot, c)| (self.minute_expiry_at(*slot, view), c.get(dim)))
                .collect(),
            Window::Day => self
                .day
                .iter()
                .filter(|(slot, _)| self.day_live(**slot, view))
                .map(|(slot, c)| (self.day_expiry(*slot, view), c.get(dim)))
                .collect(),
        };
        if let Some(c) = self.correction(meter, view.now) {
            chunks.push((ms(c.until), c.extra));
        }
        chunks.retain(|(_, amount)| *amount > 0);
        chunks.sort_unstable();
        chunks
    }

    /// When `amount` more fits under one limit.
    fn meter_room(&self, meter: Meter, amount: u64, view: &View) -> Room {
        let in_force = self.room_under(meter, self.limit(meter, view.now), amount, view);
        let Some(expiry) = self.learned_expiry(meter, view.now) else {
            return in_force;
        };
        // A learned limit that expires is no reason to say "never", nor to wait past
        // its end: then the configured limit is in force again.
        let afterwards = match self.room_under(meter, meter.configured(&self.limits), amount, view)
        {
            Room::Now => Room::At(ts(expiry)),
            Room::At(t) => Room::At(t.max(ts(expiry))),
            Room::Never => Room::Never,
        };
        match (in_force, afterwards) {
            (Room::Now, _) | (_, Room::Now) => Room::Now,
            (Room::At(a), Room::At(b)) => Room::At(a.min(b)),
            (Room::At(t), Room::Never) | (Room::Never, Room::At(t)) => Room::At(t),
            (Room::Never, Room::Never) => Room::Never,
        }
    }

    /// When `amount` more fits under `limit`, counted against `meter`'s usage.
    fn room_under(&self, meter: Meter, limit: Option<u64>, amount: u64, view: &View) -> Room {
        let Some(limit) = limit else {
            return Room::Now;
        };
        if amount == 0 {
            return Room::Now;
        }
        if amount > limit {
            return Room::Never;
        }
        let used = self.used(meter, view);
        let mut over = used.saturating_add(amount).saturating_sub(limit);
        if over == 0 {
            return Room::Now;
        }
        for (at, freed) in self.expiring(meter, view) {
            over = over.saturating_sub(freed);
            if over == 0 {
                let at = if meter.window() == Window::Day && !view.synced {
                    at.max(view.now.saturating_add(UNSYNCED_RECHECK_MS))
                } else {
                    at.max(view.now.saturating_add(1))
                };
                return Room::At(ts(at));
            }
        }
        // Usage above the limit that never expires cannot happen; be safe regardless.
        Room::Never
    }

    fn room(&self, cost: Cost, view: &View) -> Room {
        let mut latest: Option<Timestamp> = None;
        for meter in Meter::ALL {
            match self.meter_room(meter, cost.get(meter.dim()), view) {
                Room::Now => {}
                Room::Never => return Room::Never,
                Room::At(t) => latest = Some(latest.map_or(t, |l| l.max(t))),
            }
        }
        latest.map_or(Room::Now, Room::At)
    }

    fn lease_valid(&self, now: i64) -> bool {
        self.lease.expires >= now && !self.lease.left.is_zero()
    }

    /// A new lease for a reservation of `cost` that fits now.
    fn new_lease(&self, cost: Cost, view: &View) -> Cost {
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

    fn prune(&mut self, view: &View) {
        let live: Vec<i64> = self
            .minute
            .keys()
            .copied()
            .filter(|slot| self.minute_live(*slot, view))
            .collect();
        self.minute
            .retain(|slot, _| live.binary_search(slot).is_ok());
        if view.synced && self.unsynced_since.is_none() {
            let live: Vec<i64> = self
                .day
                .keys()
                .copied()
                .filter(|slot| self.day_live(*slot, view))
                .collect();
            self.day.retain(|slot, _| live.binary_search(slot).is_ok());
        }
        for c in &mut self.corrections {
            if c.is_some_and(|c| ms(c.until) <= view.now) {
                *c = None;
            }
        }
        for (learned, until) in self.learned.iter_mut().zip(&mut self.learned_until) {
            if until.is_some_and(|u| u <= view.now) {
                *learned = None;
                *until = None;
            }
        }
    }

    /// Dates usage recorded under an unsynchronised clock at `now`, the first
    /// synchronised instant.
    fn redate(&mut self, since: i64, now: i64) {
        let (m_from, m_to) = (minute_slot(since), minute_slot(now));
        let (d_from, d_to) = (day_slot(since), day_slot(now));
        let minute = move_slots(&mut self.minute, m_from, m_to);
        let day = move_slots(&mut self.day, d_from, d_to);
        // Requests in flight follow their usage; one whose slot has already left the
        // window has nothing to follow (and must not take from the slot it would land in).
        for (_, m, d) in self.open.values_mut() {
            if minute.contains(m) {
                *m = m_to;
            }
            if day.contains(d) {
                *d = d_to;
            }
        }
        self.unsynced_since = None;
        self.dirty |= !minute.is_empty() || !day.is_empty();
    }

    /// The persisted form: with `lease`, the unused lease is counted as spent at its
    /// expiry, the latest instant it may be drawn on.
    fn row(&self, latest: i64, lease: bool) -> BudgetRow {
        let mut minute = self.minute.clone();
        let mut day = self.day.clone();
        if lease && self.lease_valid(latest) {
            add_to(
                &mut minute,
                minute_slot(self.lease.expires),
                self.lease.left,
            );
            add_to(&mut day, day_slot(self.lease.expires), self.lease.left);
        }
        BudgetRow {
            latest: ts(latest),
            minute_slot_ms: MINUTE_SLOT_MS,
            day_slot_ms: DAY_SLOT_MS,
            minute: minute.into_iter().collect(),
            day: day.into_iter().collect(),
            learned: self.learned,
            learned_until: self.learned_until.map(|u| u.map(ts)),
            corrections: self.corrections,
            unsynced_since: self.unsynced_since.map(ts),
        }
    }
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

    /// The rows of every budget changed since the last call, leases counted as spent:
    /// what a commit writes.
    pub fn snapshot_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let latest = self.latest;
        let synced = self.last_synced.unwrap_or(false);
        let mut rows = Vec::new();
        for (id, b) in &mut self.budgets {
            if !b.dirty {
                continue;
            }
            let view = b.view(latest, synced);
            b.prune(&view);
            if let Some(row) = encode(id.as_str(), &b.row(latest, true)) {
                rows.push(row);
                b.dirty = false;
            }
        }
        rows
    }

    /// The rows of every budget without leases, for a clean stop (the leases are
    /// dropped: the next reservation takes a new one and asks for a commit).
    pub fn snapshot_exact(&mut self) -> Vec<(String, Vec<u8>)> {
        let latest = self.latest;
        let mut rows = Vec::new();
        for (id, b) in &mut self.budgets {
            b.lease = Lease::default();
            if let Some(row) = encode(id.as_str(), &b.row(latest, false)) {
                rows.push(row);
                b.dirty = false;
            }
        }
        rows
    }

    /// Rebuilds budgets from persisted rows (meant for a fresh ledger). Rows of budgets
    /// no longer configured are ignored; a row that fails to parse is an error, and then
    /// nothing is restored. Returns how many budgets were restored.
    pub fn restore<I>(&mut self, rows: I) -> Result<usize, RestoreError>
    where
        I: IntoIterator<Item = (String, Vec<u8>)>,
    {
        let mut parsed = Vec::new();
        for (id, bytes) in rows {
            let key = BudgetId(id);
            if !self.budgets.contains_key(&key) {
                continue;
            }
            let row: BudgetRow = decode(&key.0, &bytes)?;
            parsed.push((key, row));
        }
        let count = parsed.len();
        for (key, row) in parsed {
            self.latest = self.latest.max(ms(row.latest));
            if let Some(b) = self.budgets.get_mut(&key) {
                b.minute = rebase(row.minute, row.minute_slot_ms, MINUTE_SLOT_MS);
                b.day = rebase(row.day, row.day_slot_ms, DAY_SLOT_MS);
                b.learned = row.learned;
                b.learned_until = row.learned_until.map(|u| u.map(ms));
                b.corrections = row.corrections;
                b.unsynced_since = row.unsynced_since.map(ms);
                b.lease = Lease::default();
                b.open.clear();
                b.dirty = false;
            }
        }
        // The next observation settles the clock's state anew.
        self.last_synced = None;
        Ok(count)
    }
}

/// A row's bytes. These rows hold no map with non-string keys and no fallible
/// `Serialize`, so encoding cannot fail; were it ever to, the row is left out and its
/// owner stays dirty, so it is tried again rather than lost.
pub(crate) fn encode<T: Serialize>(id: &str, row: &T) -> Option<(String, Vec<u8>)> {
    serde_json::to_vec(row)
        .ok()
        .map(|bytes| (id.to_owned(), bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{KeyConfig, ProviderConfig, ProviderKind, SecretSource, Target};
    use crate::provider::ChatMessage;
    use crate::secret::Secret;
    use proptest::prelude::*;

    pub(crate) fn limits(
        rpm: Option<u64>,
        rpd: Option<u64>,
        tpm: Option<u64>,
        tpd: Option<u64>,
    ) -> ModelLimits {
        ModelLimits { rpm, rpd, tpm, tpd }
    }

    pub(crate) fn zone(name: &str) -> DailyReset {
        DailyReset::Zone {
            name: name.to_owned(),
            tz: TimeZone::get(name).expect("zone"),
        }
    }

    /// A provider; `keys` are (label, account).
    pub(crate) fn provider(
        name: &str,
        reset: DailyReset,
        models: &[(&str, ModelLimits)],
        keys: &[(&str, Option<&str>)],
    ) -> ProviderConfig {
        ProviderConfig {
            name: name.to_owned(),
            kind: ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:9".to_owned(),
            daily_reset: reset,
            timeout: Duration::from_secs(60),
            max_concurrency: crate::config::DEFAULT_MAX_CONCURRENCY,
            models: models.iter().map(|(m, l)| ((*m).to_owned(), *l)).collect(),
            keys: keys
                .iter()
                .map(|(label, account)| KeyConfig {
                    label: (*label).to_owned(),
                    secret_source: SecretSource::Env(format!("KEY_{label}")),
                    secret: Secret::new("sk-test-secret"),
                    account: account.map(str::to_owned),
                })
                .collect(),
        }
    }

    pub(crate) fn config(providers: Vec<ProviderConfig>) -> Config {
        let auto = providers
            .iter()
            .flat_map(|p| {
                p.models.keys().map(|m| Target {
                    provider: p.name.clone(),
                    model: m.clone(),
                })
            })
            .collect();
        Config::from_providers(providers, auto)
    }

    /// Exactly `left` tokens fit now: `left` do, one more does not.
    pub(crate) fn assert_tokens_left(l: &Ledger, b: &BudgetId, t: Timestamp, left: u64) {
        let cost = |tokens| Cost {
            requests: 1,
            tokens,
        };
        assert_eq!(l.room(b, cost(left), t, true), Room::Now);
        assert_ne!(l.room(b, cost(left + 1), t, true), Room::Now);
    }

    pub(crate) fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    pub(crate) fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn one(limits: ModelLimits, reset: DailyReset) -> (Ledger, BudgetId) {
        let ledger = Ledger::new(&config(vec![provider(
            "groq",
            reset,
            &[("m", limits)],
            &[("k1", None)],
        )]));
        let id = ledger.budget_for("k1", "m").expect("budget").clone();
        (ledger, id)
    }

    const REQ: Cost = Cost {
        requests: 1,
        tokens: 10,
    };

    #[test]
    fn estimate_counts_prompt_overhead_and_max_tokens() {
        let mut request = ChatRequest {
            model: "m".to_owned(),
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "abcde".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: "ñ".repeat(4),
                },
            ],
            max_tokens: Some(100),
            temperature: None,
            top_p: None,
            stop: vec![],
        };
        // "abcde": 5 bytes → 2 tokens; "ññññ": 8 bytes → 2 tokens; 2 × overhead.
        let expected = 2 + 2 + 2 * MESSAGE_OVERHEAD_TOKENS + 100;
        assert_eq!(
            Cost::estimate(&request),
            Cost {
                requests: 1,
                tokens: expected
            }
        );
        request.max_tokens = None;
        assert_eq!(
            Cost::estimate(&request).tokens,
            expected - 100 + DEFAULT_MAX_TOKENS
        );
    }

    #[test]
    fn rpm_requests_fit_and_one_more_waits_for_the_slot_to_leave() {
        let (mut l, b) = one(limits(Some(3), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00.400Z");
        for _ in 0..3 {
            assert!(l.reserve(&b, REQ, t0, true).is_ok());
        }
        // The slot [00:00:00, 00:00:01) counts until its end plus 60 s.
        let free = at("2026-01-01T00:01:01Z");
        assert_eq!(l.reserve(&b, REQ, t0, true), Err(Room::At(free)));
        assert_eq!(l.room(&b, REQ, t0, true), Room::At(free));
        let just_before = at("2026-01-01T00:01:00.999Z");
        assert!(l.reserve(&b, REQ, just_before, true).is_err());
        assert!(l.reserve(&b, REQ, free, true).is_ok());
    }

    #[test]
    fn cost_over_a_limit_never_fits() {
        let (l, b) = one(limits(Some(3), None, Some(100), None), DailyReset::Rolling);
        let big = Cost {
            requests: 1,
            tokens: 101,
        };
        assert_eq!(
            l.room(&b, big, at("2026-01-01T00:00:00Z"), true),
            Room::Never
        );
    }

    #[test]
    fn rolling_day_frees_when_the_oldest_usage_leaves() {
        let (mut l, b) = one(limits(None, Some(2), None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T10:02:00Z");
        assert!(l.reserve(&b, REQ, t0, true).is_ok());
        let t1 = at("2026-01-01T12:00:00Z");
        assert!(l.reserve(&b, REQ, t1, true).is_ok());
        // The 5-minute slot [10:00, 10:05) counts until 10:05 the next day.
        let free = at("2026-01-02T10:05:00Z");
        assert_eq!(l.room(&b, REQ, t1, true), Room::At(free));
        assert_eq!(l.oldest_day_usage_leaves(&b, t1, true), Some(free));
        assert_eq!(l.remaining_today(&b, t1, true).rpd, Some(0));
        assert_eq!(l.day_spent_until(&b, t1, true), Some(free));
        assert!(l.reserve(&b, REQ, free, true).is_ok());
    }

    #[test]
    fn zone_day_resets_at_local_midnight() {
        let (mut l, b) = one(
            limits(None, Some(1), None, None),
            zone("America/Los_Angeles"),
        );
        // 23:50 PST.
        let t0 = at("2026-01-01T07:50:00Z");
        assert!(l.reserve(&b, REQ, t0, true).is_ok());
        let midnight = at("2026-01-01T08:00:00Z");
        assert_eq!(l.next_daily_reset(&b, t0), Some(midnight));
        assert_eq!(
            l.room(&b, REQ, at("2026-01-01T07:59:00Z"), true),
            Room::At(midnight)
        );
        assert!(l.reserve(&b, REQ, midnight, true).is_ok());
        assert_eq!(
            l.room(&b, REQ, midnight, true),
            Room::At(at("2026-01-02T08:00:00Z"))
        );
    }

    #[test]
    fn keys_of_one_account_share_one_budget() {
        let l = Ledger::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("m", limits(Some(2), None, None, None))],
            &[("k1", Some("acct")), ("k2", Some("acct")), ("k3", None)],
        )]));
        let mut l = l;
        let b1 = l.budget_for("k1", "m").cloned().expect("b1");
        let b2 = l.budget_for("k2", "m").cloned().expect("b2");
        let b3 = l.budget_for("k3", "m").cloned().expect("b3");
        assert_eq!(b1, b2);
        assert_ne!(b1, b3);
        let t = at("2026-01-01T00:00:00Z");
        assert!(l.reserve(&b1, REQ, t, true).is_ok());
        assert!(l.reserve(&b2, REQ, t, true).is_ok());
        assert!(l.reserve(&b1, REQ, t, true).is_err());
        assert!(l.reserve(&b2, REQ, t, true).is_err());
        assert!(l.reserve(&b3, REQ, t, true).is_ok());
    }

    #[test]
    fn settle_replaces_the_token_estimate_and_release_gives_all_back() {
        let (mut l, b) = one(
            limits(Some(10), None, Some(1000), None),
            DailyReset::Rolling,
        );
        let t = at("2026-01-01T00:00:00Z");
        let cost = Cost {
            requests: 1,
            tokens: 600,
        };
        let r = l.reserve(&b, cost, t, true).expect("fits");
        assert!(l.room(&b, cost, t, true) != Room::Now);
        l.settle(
            &r,
            Usage {
                prompt_tokens: 50,
                completion_tokens: 50,
            },
            t,
        );
        // 100 used: 900 left.
        assert_tokens_left(&l, &b, t, 900);
        // Settling twice changes nothing.
        l.settle(&r, Usage::default(), t);
        let r2 = l.reserve(&b, cost, t, true).expect("fits");
        l.release(&r2);
        l.release(&r2);
        assert_tokens_left(&l, &b, t, 900);
    }

    fn groq_limits() -> ModelLimits {
        limits(Some(30), Some(1000), Some(12000), Some(100_000))
    }

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
    fn unsynchronised_clock_never_resets_a_day_window() {
        let (mut l, b) = one(limits(Some(1), Some(2), None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        // One request while synchronised, one while not.
        assert!(l.reserve(&b, REQ, t0, true).is_ok());
        let t1 = at("2026-01-01T00:10:00Z");
        assert!(l.reserve(&b, REQ, t1, false).is_ok());
        // Minute windows still slide; the day window holds for days.
        let later = at("2026-01-05T00:00:00Z");
        assert_eq!(l.remaining_today(&b, later, false).rpd, Some(0));
        assert!(l.reserve(&b, REQ, later, false).is_err());
        // Once synchronised, what was counted while synchronised expires by its date,
        // and what was counted without a trustworthy clock is dated now.
        assert_eq!(l.remaining_today(&b, later, true).rpd, Some(1));
        l.observe(later, true);
        assert_eq!(l.remaining_today(&b, later, true).rpd, Some(1));
        assert!(l.reserve(&b, REQ, later, true).is_ok());
        assert!(matches!(
            l.reserve(&b, REQ, later + secs(120), true),
            Err(Room::At(_))
        ));
        let next_day = at("2026-01-06T00:05:00Z");
        assert!(l.reserve(&b, REQ, next_day, true).is_ok());
    }

    #[test]
    fn minute_window_slides_while_unsynchronised() {
        let (mut l, b) = one(limits(Some(1), Some(100), None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T00:00:00Z");
        assert!(l.reserve(&b, REQ, t0, false).is_ok());
        assert!(l.reserve(&b, REQ, t0 + secs(30), false).is_err());
        assert!(l.reserve(&b, REQ, t0 + secs(61), false).is_ok());
    }

    #[test]
    fn time_running_backwards_gives_nothing_twice() {
        let (mut l, b) = one(limits(Some(1), None, None, None), DailyReset::Rolling);
        let t0 = at("2026-01-01T01:00:00Z");
        assert!(l.reserve(&b, REQ, t0, true).is_ok());
        let back = at("2026-01-01T00:00:00Z");
        assert_eq!(l.reserve(&b, REQ, back, true), Err(Room::At(t0 + secs(61))));
        assert!(l.reserve(&b, REQ, t0 + secs(61), true).is_ok());
    }

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

    #[test]
    fn snapshot_round_trip_keeps_usage_and_learning() {
        let (mut l, b) = one(groq_limits(), zone("America/Los_Angeles"));
        let t = at("2026-01-01T00:00:00Z");
        for _ in 0..4 {
            let r = l
                .reserve(
                    &b,
                    Cost {
                        requests: 1,
                        tokens: 100,
                    },
                    t,
                    true,
                )
                .expect("fits");
            l.settle(
                &r,
                Usage {
                    prompt_tokens: 10,
                    completion_tokens: 20,
                },
                t,
            );
        }
        let headers = RateLimitHeaders {
            limit_requests: Some(800),
            remaining_requests: Some(700),
            reset_requests: Some(secs(600)),
            ..RateLimitHeaders::default()
        };
        l.learn(&b, &headers, t);
        let rows = l.snapshot_exact();
        let (mut fresh, _) = one(groq_limits(), zone("America/Los_Angeles"));
        assert_eq!(fresh.restore(rows).expect("restores"), 1);
        assert_eq!(
            fresh.remaining_today(&b, t, true),
            l.remaining_today(&b, t, true)
        );
        assert_eq!(fresh.remaining_today(&b, t, true).rpd, Some(700));
        assert_eq!(fresh.remaining_today(&b, t, true).tpd, Some(100_000 - 120));
        assert_eq!(
            fresh.minute_fraction_left(&b, t, true),
            l.minute_fraction_left(&b, t, true)
        );
        assert_eq!(fresh.latest(), Some(t));
    }

    #[test]
    fn restore_after_a_crash_shows_no_more_room_than_before() {
        let lim = limits(Some(20), Some(100), Some(5000), None);
        let (mut l, b) = one(lim, DailyReset::Rolling);
        let mut disk: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let t0 = at("2026-01-01T00:00:00Z");
        let mut uncommitted = 0;
        for i in 0..15u64 {
            let r = l
                .reserve(&b, REQ, t0 + Duration::from_millis(300 * i), true)
                .expect("fits");
            if r.needs_commit {
                disk.extend(l.snapshot_dirty());
            } else {
                uncommitted += 1;
            }
        }
        assert!(uncommitted > 0);
        let crash = t0 + secs(5);
        let (mut after, _) = one(lim, DailyReset::Rolling);
        after.restore(disk).expect("restores");
        let before = l.remaining_today(&b, crash, true);
        let now = after.remaining_today(&b, crash, true);
        assert!(now.rpd <= before.rpd, "{now:?} vs {before:?}");
        assert!(
            after.minute_fraction_left(&b, crash, true) <= l.minute_fraction_left(&b, crash, true)
        );
        // The first reservation after a restore takes a new lease, committed first.
        let r = after
            .reserve(&b, REQ, crash + secs(120), true)
            .expect("fits");
        assert!(r.needs_commit);
    }

    #[test]
    fn a_corrupt_row_is_an_error_and_unknown_budgets_are_ignored() {
        let (mut l, b) = one(groq_limits(), DailyReset::Rolling);
        let rows = vec![
            ("openai/key:gone/m".to_owned(), b"{}".to_vec()),
            (b.as_str().to_owned(), b"not json".to_vec()),
        ];
        let error = l.restore(rows).expect_err("corrupt");
        assert!(error.to_string().contains(b.as_str()));
        let ok = vec![("openai/key:gone/m".to_owned(), b"garbage".to_vec())];
        assert_eq!(l.restore(ok).expect("ignored"), 0);
    }

    #[test]
    fn only_changed_budgets_are_in_a_dirty_snapshot() {
        let l = Ledger::new(&config(vec![provider(
            "groq",
            DailyReset::Rolling,
            &[("m", groq_limits())],
            &[("k1", None), ("k2", None)],
        )]));
        let mut l = l;
        let b1 = l.budget_for("k1", "m").cloned().expect("b1");
        let t = at("2026-01-01T00:00:00Z");
        assert!(l.snapshot_dirty().is_empty());
        l.reserve(&b1, REQ, t, true).expect("fits");
        let rows = l.snapshot_dirty();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, b1.as_str());
        assert!(l.snapshot_dirty().is_empty());
        assert_eq!(l.snapshot_exact().len(), 2);
    }

    // --- Limits learned from 429s. ---

    fn refusal(scope: LimitScope, dimension: LimitDimension, limit: Option<u64>) -> Violation {
        Violation {
            scope,
            dimension,
            limit,
        }
    }

    fn rpm_refusal(limit: Option<u64>) -> Vec<Violation> {
        vec![refusal(LimitScope::Minute, LimitDimension::Requests, limit)]
    }

    /// Reserves and settles requests at `t` until the ledger refuses one; how many it
    /// granted, and its answer to the one more.
    fn fill(l: &mut Ledger, b: &BudgetId, t: Timestamp) -> (usize, Room) {
        let mut granted = 0;
        loop {
            match l.reserve(b, REQ, t, true) {
                Ok(r) => {
                    l.settle(
                        &r,
                        Usage {
                            prompt_tokens: 5,
                            completion_tokens: 5,
                        },
                        t,
                    );
                    granted += 1;
                }
                Err(room) => return (granted, room),
            }
        }
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

    #[test]
    fn limits_learned_from_429s_survive_a_restart_with_their_end() {
        let (mut l, b) = one(
            limits(Some(30), Some(3000), Some(10_000), None),
            DailyReset::Rolling,
        );
        let t0 = at("2026-01-01T00:00:00Z");
        let learned = [
            refusal(LimitScope::Minute, LimitDimension::Requests, Some(15)),
            refusal(LimitScope::Minute, LimitDimension::Tokens, None),
            refusal(LimitScope::Day, LimitDimension::Requests, Some(1500)),
        ];
        // The token guess: the refused request's 10 tokens.
        assert!(l.learn_refusal(&b, &learned, REQ, t0));
        let t1 = t0 + secs(61);
        let crash = l.snapshot_dirty();
        let clean = l.snapshot_exact();
        for rows in [crash, clean] {
            let (mut fresh, _) = one(
                limits(Some(30), Some(3000), Some(10_000), None),
                DailyReset::Rolling,
            );
            assert_eq!(fresh.restore(rows).expect("restores"), 1);
            assert_eq!(fresh.remaining_today(&b, t1, true).rpd, Some(1500));
            assert_eq!(fill(&mut fresh, &b, t1).0, 1, "the token guess was lost");
            // The guess ends after its hour; the stated request limit does not yet.
            let later = at("2026-01-01T01:00:00Z");
            assert_eq!(fill(&mut fresh, &b, later).0, 15);
            assert_eq!(fresh.remaining_today(&b, later, true).rpd, Some(1484));
        }
    }

    #[test]
    fn rows_written_before_limits_had_an_end_still_load() {
        let (mut l, b) = one(groq_limits(), DailyReset::Rolling);
        let t = at("2026-01-01T00:00:00Z");
        let headers = RateLimitHeaders {
            limit_requests: Some(800),
            remaining_requests: Some(800),
            reset_requests: Some(secs(600)),
            ..RateLimitHeaders::default()
        };
        l.learn(&b, &headers, t);
        let rows: Vec<(String, Vec<u8>)> = l
            .snapshot_exact()
            .into_iter()
            .map(|(id, bytes)| {
                let mut row: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
                row.as_object_mut()
                    .expect("an object")
                    .remove("learned_until")
                    .expect("the new field is written");
                (id, serde_json::to_vec(&row).expect("json"))
            })
            .collect();
        let (mut fresh, _) = one(groq_limits(), DailyReset::Rolling);
        assert_eq!(fresh.restore(rows).expect("an old row loads"), 1);
        // A header's limit has no end.
        let much_later = t + secs(30 * 86_400);
        assert_eq!(fresh.remaining_today(&b, much_later, true).rpd, Some(800));
    }

    // --- Property tests: random operations and clock jumps. ---

    #[derive(Debug, Clone)]
    enum Op {
        Reserve {
            tokens: u64,
        },
        Settle {
            pick: usize,
            tokens: u64,
        },
        Release {
            pick: usize,
        },
        Learn {
            remaining: u64,
            reset_secs: u64,
        },
        /// A minute 429 on requests, stating this limit or none.
        Refuse {
            stated: Option<u64>,
        },
        Forward {
            ms: i64,
        },
        Backward {
            ms: i64,
        },
        Sync(bool),
        Commit,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..80).prop_map(|tokens| Op::Reserve { tokens }),
            2 => (any::<usize>(), 0u64..120).prop_map(|(pick, tokens)| Op::Settle { pick, tokens }),
            1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            1 => (0u64..30, 0u64..7200).prop_map(|(remaining, reset_secs)| Op::Learn { remaining, reset_secs }),
            1 => proptest::option::of(1u64..RPM).prop_map(|stated| Op::Refuse { stated }),
            3 => (0i64..5_000).prop_map(|ms| Op::Forward { ms }),
            2 => (5_000i64..120_000).prop_map(|ms| Op::Forward { ms }),
            1 => (120_000i64..3 * 86_400_000).prop_map(|ms| Op::Forward { ms }),
            1 => (0i64..3 * 3_600_000).prop_map(|ms| Op::Backward { ms }),
            1 => any::<bool>().prop_map(Op::Sync),
            1 => Just(Op::Commit),
            1 => Just(Op::Crash),
        ]
    }

    const RPM: u64 = 5;
    const RPD: u64 = 25;

    fn prop_limits() -> ModelLimits {
        limits(Some(RPM), Some(RPD), Some(300), Some(2000))
    }

    fn no_more_room(after: &Ledger, before: &Ledger, b: &BudgetId, now: Timestamp, synced: bool) {
        let (a, c) = (
            after.remaining_today(b, now, synced),
            before.remaining_today(b, now, synced),
        );
        assert!(a.rpd <= c.rpd && a.tpd <= c.tpd, "{a:?} > {c:?}");
        assert!(
            after.minute_fraction_left(b, now, synced)
                <= before.minute_fraction_left(b, now, synced)
        );
        for tokens in [1, 50, 200] {
            let cost = Cost {
                requests: 1,
                tokens,
            };
            if after.room(b, cost, now, synced) == Room::Now {
                assert_eq!(before.room(b, cost, now, synced), Room::Now);
            }
        }
    }

    /// What the daemon does on a commit: write the changed rows and the latest time.
    fn commit(l: &mut Ledger, disk: &mut BTreeMap<String, Vec<u8>>, floor: &mut Timestamp) {
        disk.extend(l.snapshot_dirty());
        if let Some(latest) = l.latest() {
            *floor = (*floor).max(latest);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn budget_is_never_handed_out_twice(
            ops in proptest::collection::vec(op(), 1..120),
            zoned in any::<bool>(),
        ) {
            let reset = || if zoned { zone("America/Los_Angeles") } else { DailyReset::Rolling };
            let (mut l, b) = one(prop_limits(), reset());
            let mut clock = at("2026-03-01T12:00:00Z");
            let mut synced = true;
            // The ledger has seen no time yet: the first instant it is given counts.
            let mut latest = Timestamp::MIN;
            let mut disk: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut floor = Timestamp::MIN;
            // (effective instant in ms, still counted) of every request handed out.
            let mut handed: Vec<(i64, bool)> = Vec::new();
            let mut open: Vec<(Reservation, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Reserve { tokens } => {
                        let cost = Cost { requests: 1, tokens };
                        if let Ok(r) = l.reserve(&b, cost, clock, synced) {
                            if r.needs_commit {
                                commit(&mut l, &mut disk, &mut floor);
                            }
                            latest = latest.max(clock);
                            // The instant the ledger charged it at.
                            let charged = l.latest().expect("a time was seen");
                            handed.push((ms(charged), true));
                            open.push((r, handed.len() - 1));
                        }
                    }
                    Op::Settle { pick, tokens } if !open.is_empty() => {
                        let (r, _) = open.remove(pick % open.len());
                        let usage = Usage { prompt_tokens: tokens, completion_tokens: 0 };
                        if l.settle(&r, usage, clock) {
                            commit(&mut l, &mut disk, &mut floor);
                        }
                    }
                    Op::Release { pick } if !open.is_empty() => {
                        let (r, index) = open.remove(pick % open.len());
                        l.release(&r);
                        handed[index].1 = false;
                    }
                    Op::Learn { remaining, reset_secs } => {
                        let headers = RateLimitHeaders {
                            limit_requests: Some(RPD),
                            remaining_requests: Some(remaining),
                            reset_requests: Some(secs(reset_secs)),
                            ..RateLimitHeaders::default()
                        };
                        if l.learn(&b, &headers, clock) {
                            commit(&mut l, &mut disk, &mut floor);
                        }
                    }
                    Op::Refuse { stated } => {
                        if l.learn_refusal(&b, &rpm_refusal(stated), REQ, clock) {
                            commit(&mut l, &mut disk, &mut floor);
                        }
                    }
                    Op::Forward { ms } => clock += jiff::SignedDuration::from_millis(ms),
                    // The daemon's clock never runs back past the latest instant it
                    // committed; the ledger must cope with anything above that.
                    Op::Backward { ms } => clock = (clock - jiff::SignedDuration::from_millis(ms)).max(floor),
                    Op::Sync(s) => {
                        synced = s;
                        l.observe(clock, synced);
                        latest = latest.max(clock);
                        // The daemon commits what changed regularly; here, at once.
                        commit(&mut l, &mut disk, &mut floor);
                    }
                    Op::Commit => commit(&mut l, &mut disk, &mut floor),
                    Op::Crash => {
                        let (mut restored, _) = one(prop_limits(), reset());
                        restored.restore(disk.clone()).expect("restores");
                        let now = latest.max(clock);
                        no_more_room(&restored, &l, &b, now, synced);
                        l = restored;
                        // Requests in flight at the crash stay counted.
                        open.clear();
                    }
                    Op::Settle { .. } | Op::Release { .. } => {}
                }
                let now = clock.max(latest);
                let left = l.remaining_today(&b, now, synced);
                prop_assert!(left.rpd.is_some_and(|r| r <= RPD));
                prop_assert!(left.tpd.is_some_and(|t| t <= 2000));
                let fraction = l.minute_fraction_left(&b, now, synced);
                prop_assert!((0.0..=1.0).contains(&fraction));
                // A snapshot taken now and restored never shows more room.
                let mut copy = l.clone();
                let (mut restored, _) = one(prop_limits(), reset());
                restored.restore(copy.snapshot_exact()).expect("restores");
                no_more_room(&restored, &l, &b, now, synced);
            }
            let counted: Vec<i64> = handed.iter().filter(|(_, c)| *c).map(|(t, _)| *t).collect();
            for t in &counted {
                let in_minute = counted.iter().filter(|u| **u >= *t && **u < t + MINUTE_WINDOW_MS).count();
                prop_assert!(in_minute as u64 <= RPM, "{in_minute} requests within a minute");
                let in_day = if zoned {
                    // Per local day.
                    let tz = TimeZone::get("America/Los_Angeles").expect("zone");
                    let day = |ms: i64| ts(ms).to_zoned_datetime(tz.clone()).date();
                    counted.iter().filter(|u| day(**u) == day(*t)).count()
                } else {
                    counted.iter().filter(|u| **u >= *t && **u < t + DAY_WINDOW_MS).count()
                };
                prop_assert!(in_day as u64 <= RPD, "{in_day} requests within a day");
            }
        }
    }
}
