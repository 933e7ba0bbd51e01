//! The persisted form of the budgets: one row per budget, encoded for the store and
//! restored from it, leases counted as spent so that a restart after a crash never
//! shows more room than there was.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::cost::Cost;
use super::learn::Correction;
use super::lease::Lease;
use super::window::{DAY_SLOT_MS, MINUTE_SLOT_MS, add_to, day_slot, minute_slot, ms, ts};
use super::{Budget, BudgetId, Ledger};

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

/// A row's bytes. These rows hold no map with non-string keys and no fallible
/// `Serialize`, so encoding cannot fail; were it ever to, the row is left out and its
/// owner stays dirty, so it is tried again rather than lost.
pub(crate) fn encode<T: Serialize>(id: &str, row: &T) -> Option<(String, Vec<u8>)> {
    serde_json::to_vec(row)
        .ok()
        .map(|bytes| (id.to_owned(), bytes))
}

impl Budget {
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

impl Ledger {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::DailyReset;
    use crate::provider::{LimitDimension, LimitScope, RateLimitHeaders, Usage};

    use super::*;
    use crate::ledger::tests::*;

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
}
