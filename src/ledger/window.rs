//! Time in the ledger: the minute and day windows counted in slots, the day rules
//! (rolling, or a zone's local midnight), when usage stops counting and when a cost
//! fits again, and re-dating what was recorded while the clock was unsynchronised.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::cost::{Cost, Dim};
use super::{Budget, Room};
use crate::config::{DailyReset, ModelLimits};
use crate::provider::LimitScope;

/// Length of the minute window.
pub(super) const MINUTE_WINDOW_MS: i64 = 60_000;
/// Width of a minute-window slot: budget comes back at most one second later than
/// the provider gives it, for 61 counters per budget.
pub(super) const MINUTE_SLOT_MS: i64 = 1_000;
/// Length of the rolling day window.
pub(super) const DAY_WINDOW_MS: i64 = 86_400_000;
/// Width of a day-window slot: budget comes back at most five minutes late, for 289
/// counters per budget.
pub(super) const DAY_SLOT_MS: i64 = 300_000;

/// While the clock is unsynchronised a day window cannot say when it frees; callers
/// are told to look again after this long (the clock may have synchronised by then).
const UNSYNCED_RECHECK_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Window {
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
pub(super) enum Meter {
    Rpm,
    Rpd,
    Tpm,
    Tpd,
}

impl Meter {
    pub(super) const ALL: [Meter; 4] = [Meter::Rpm, Meter::Rpd, Meter::Tpm, Meter::Tpd];

    pub(super) fn of(window: Window, dim: Dim) -> Meter {
        match (window, dim) {
            (Window::Minute, Dim::Requests) => Meter::Rpm,
            (Window::Day, Dim::Requests) => Meter::Rpd,
            (Window::Minute, Dim::Tokens) => Meter::Tpm,
            (Window::Day, Dim::Tokens) => Meter::Tpd,
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn window(self) -> Window {
        match self {
            Meter::Rpm | Meter::Tpm => Window::Minute,
            Meter::Rpd | Meter::Tpd => Window::Day,
        }
    }

    pub(super) fn dim(self) -> Dim {
        match self {
            Meter::Rpm | Meter::Rpd => Dim::Requests,
            Meter::Tpm | Meter::Tpd => Dim::Tokens,
        }
    }

    pub(super) fn configured(self, limits: &ModelLimits) -> Option<u64> {
        match self {
            Meter::Rpm => limits.rpm,
            Meter::Rpd => limits.rpd,
            Meter::Tpm => limits.tpm,
            Meter::Tpd => limits.tpd,
        }
    }
}

/// How the day window is counted at one instant.
pub(super) enum DayRule {
    Rolling,
    Zone {
        tz: TimeZone,
        last_midnight: i64,
        next_midnight: i64,
    },
}

/// A budget looked at from one instant.
pub(super) struct View {
    pub(super) now: i64,
    pub(super) synced: bool,
    pub(super) day: DayRule,
}

pub(super) fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

pub(super) fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(if ms > 0 {
        Timestamp::MAX
    } else {
        Timestamp::MIN
    })
}

pub(super) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn minute_slot(t: i64) -> i64 {
    t.div_euclid(MINUTE_SLOT_MS)
}

pub(super) fn day_slot(t: i64) -> i64 {
    t.div_euclid(DAY_SLOT_MS)
}

/// When a minute slot's usage stops counting: the end of the slot plus the window.
pub(super) fn minute_expiry(slot: i64) -> i64 {
    slot.saturating_add(1)
        .saturating_mul(MINUTE_SLOT_MS)
        .saturating_add(MINUTE_WINDOW_MS)
}

fn day_slot_end(slot: i64) -> i64 {
    slot.saturating_add(1).saturating_mul(DAY_SLOT_MS)
}

/// The first local midnight at or after `t` (milliseconds).
pub(super) fn midnight_at_or_after(tz: &TimeZone, t: i64) -> i64 {
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

pub(super) fn add_to(slots: &mut BTreeMap<i64, Cost>, slot: i64, cost: Cost) {
    if cost.is_zero() {
        return;
    }
    let entry = slots.entry(slot).or_default();
    *entry = entry.plus(cost);
}

pub(super) fn take_from(slots: &mut BTreeMap<i64, Cost>, slot: i64, cost: Cost) {
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

impl Budget {
    pub(super) fn view(&self, now: i64, synced: bool) -> View {
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

    /// A day slot recorded while the clock was unsynchronised and not yet re-dated.
    fn pending(&self, slot: i64) -> bool {
        self.unsynced_since.is_some_and(|u| slot >= day_slot(u))
    }

    /// A minute slot recorded while the clock was unsynchronised and not yet re-dated.
    fn pending_minute(&self, slot: i64) -> bool {
        self.unsynced_since.is_some_and(|u| slot >= minute_slot(u))
    }

    pub(super) fn minute_live(&self, slot: i64, view: &View) -> bool {
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

    pub(super) fn day_live(&self, slot: i64, view: &View) -> bool {
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
    pub(super) fn day_expiry(&self, slot: i64, view: &View) -> i64 {
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

    /// What the ledger counts as spent against one limit at `view.now`.
    pub(super) fn used(&self, meter: Meter, view: &View) -> u64 {
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

    pub(super) fn left(&self, meter: Meter, view: &View) -> Option<u64> {
        self.limit(meter, view.now)
            .map(|limit| limit.saturating_sub(self.used(meter, view)))
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
    pub(super) fn meter_room(&self, meter: Meter, amount: u64, view: &View) -> Room {
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

    pub(super) fn room(&self, cost: Cost, view: &View) -> Room {
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

    pub(super) fn prune(&mut self, view: &View) {
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
    pub(super) fn redate(&mut self, since: i64, now: i64) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::*;

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
}
