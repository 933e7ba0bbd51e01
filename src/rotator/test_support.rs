//! What the rotator's tests share: two providers' worth of keys, a route, and outcomes
//! as the classifiers would give them. The ledger's test helpers are reached from here
//! only.

use std::time::Duration;

use jiff::Timestamp;

pub(super) use crate::config::{DailyReset, ModelLimits, Target};
pub(super) use crate::ledger::Cost;
pub(super) use crate::ledger::tests::{at, config, limits, provider, secs, zone};
pub(super) use crate::provider::{
    CallOutcome, Completion, Failure, LimitDimension, LimitScope, RateLimitHeaders, Usage,
    Violation,
};

pub(super) use super::{Attempt, Call, KeyReport, KeyState, Plan, Rotator};

pub(super) const COST: Cost = Cost {
    requests: 1,
    tokens: 100,
};

pub(super) fn target(provider: &str, model: &str) -> Target {
    Target {
        provider: provider.to_owned(),
        model: model.to_owned(),
    }
}

pub(super) fn groq_limits() -> ModelLimits {
    limits(Some(30), Some(1000), Some(12_000), Some(100_000))
}

/// groq (rolling, keys g1..g3) and gemini (Los Angeles midnight, keys m1, m2).
pub(super) fn two_providers() -> Rotator {
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

pub(super) fn route() -> Vec<Target> {
    vec![target("groq", "llama"), target("gemini", "flash")]
}

pub(super) fn ok() -> CallOutcome {
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

pub(super) fn failed(failure: Failure) -> CallOutcome {
    CallOutcome {
        result: Err(failure),
        headers: RateLimitHeaders::default(),
    }
}

pub(super) fn limited(retry_after: Option<Duration>, scope: LimitScope) -> CallOutcome {
    failed(Failure::RateLimited {
        retry_after,
        scope,
        violations: Vec::new(),
        detail: "Rate limit reached".to_owned(),
    })
}

/// A minute 429 naming the requests-per-minute limit, as Groq's "on requests per
/// minute (RPM): Limit 15" or Gemini's `quotaValue` do.
pub(super) fn rpm_refused(retry_after: Duration, limit: Option<u64>) -> CallOutcome {
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
pub(super) fn serve_all(r: &mut Rotator, route: &[Target], now: Timestamp) -> (usize, Plan) {
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

pub(super) fn call(r: &mut Rotator, route: &[Target], now: Timestamp) -> Call {
    match r.plan(route, COST, &Attempt::new(), now, now + secs(120), true) {
        Plan::Call(call) => call,
        other => panic!("expected a call, got {other:?}"),
    }
}

pub(super) fn state_of(r: &Rotator, label: &str, now: Timestamp) -> KeyReport {
    r.key_reports(now, true)
        .into_iter()
        .find(|k| k.label == label)
        .expect("key")
}
