//! Test helpers shared by the ledger's tests and the rotator's, and the tests of the
//! ledger as a whole: budgets shared by an account, settling, and a property test
//! of random operations, clock jumps and crashes.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use proptest::prelude::*;

use super::window::{DAY_WINDOW_MS, MINUTE_WINDOW_MS, ms, ts};
use super::*;
use crate::config::{
    Config, DailyReset, KeyConfig, ModelLimits, ProviderConfig, ProviderKind, SecretSource, Target,
};
use crate::provider::{LimitDimension, LimitScope, RateLimitHeaders, Usage, Violation};
use crate::secret::Secret;

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

pub(crate) fn one(limits: ModelLimits, reset: DailyReset) -> (Ledger, BudgetId) {
    let ledger = Ledger::new(&config(vec![provider(
        "groq",
        reset,
        &[("m", limits)],
        &[("k1", None)],
    )]));
    let id = ledger.budget_for("k1", "m").expect("budget").clone();
    (ledger, id)
}

pub(crate) const REQ: Cost = Cost {
    requests: 1,
    tokens: 10,
};

pub(crate) fn groq_limits() -> ModelLimits {
    limits(Some(30), Some(1000), Some(12000), Some(100_000))
}

/// A 429 that named this limit.
pub(crate) fn refusal(
    scope: LimitScope,
    dimension: LimitDimension,
    limit: Option<u64>,
) -> Violation {
    Violation {
        scope,
        dimension,
        limit,
    }
}

pub(crate) fn rpm_refusal(limit: Option<u64>) -> Vec<Violation> {
    vec![refusal(LimitScope::Minute, LimitDimension::Requests, limit)]
}

/// Reserves and settles requests at `t` until the ledger refuses one; how many it
/// granted, and its answer to the one more.
pub(crate) fn fill(l: &mut Ledger, b: &BudgetId, t: Timestamp) -> (usize, Room) {
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

// --- The ledger as a whole. ---

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
        after.minute_fraction_left(b, now, synced) <= before.minute_fraction_left(b, now, synced)
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
