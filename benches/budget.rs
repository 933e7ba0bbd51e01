//! Budget efficiency on a simulated day: how many tasks a pool of rate-limited keys
//! serves when keyrelay's rotator drives it, against the naive rotation people write
//! today and an oracle that knows the provider's windows.
//!
//! `cargo bench --bench budget` (another seed: `KEYRELAY_BENCH_SEED=n`).
//!
//! Everything runs on a simulated clock (jiff timestamps advanced by an event queue,
//! no sleeping), seeded, so a run is reproducible. The pool: 8 Groq-like keys (30 rpm,
//! 1000 rpd, 12000 tpm, 100000 tpd, rolling day) then 2 Gemini-like keys (15 rpm,
//! 1500 rpd, day reset at midnight in Los Angeles). The simulated provider enforces each
//! key's real limits with true sliding windows (60 s; 24 h, or since LA midnight) and
//! answers every call with the `CallOutcome` the real clients classify its HTTP answer
//! into: usage and Groq's `x-ratelimit-*` headers on success, `RateLimited` with the
//! provider's delay, scope and the limit it names (Groq's "on requests per minute (RPM):
//! Limit 30" in the message, Gemini's `quotaId` and `quotaValue`) on a 429. The day starts at noon in Los Angeles, so
//! Gemini's daily reset falls in its middle.
//!
//! Demand is 1.3 × the pool's nominal daily capacity, each task with a 120 s deadline:
//! most arrive alone at random instants, the rest in batches of 50 to 300 submitted
//! within ten seconds (a content pipeline's run), which the minute limits cannot take
//! at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use keyrelay::config::{
    Config, DailyReset, KeyConfig, ModelLimits, ProviderConfig, ProviderKind, SecretSource, Target,
};
use keyrelay::ledger::Cost;
use keyrelay::provider::{
    CallOutcome, ChatMessage, ChatRequest, Completion, Failure, LimitDimension, LimitScope,
    RateLimitHeaders, Usage, Violation,
};
use keyrelay::rotator::{Attempt, Call, Next, Plan, Rotator};
use keyrelay::secret::Secret;

const DEFAULT_SEED: u64 = 20_260_310;
const SEED_ENV: &str = "KEYRELAY_BENCH_SEED";

/// Noon in Los Angeles (PDT): Gemini's budget resets twelve hours in.
const DAY_START: &str = "2026-03-10T19:00:00Z";
const DAY_MS: i64 = 86_400_000;
const MINUTE_MS: i64 = 60_000;
const DEADLINE_MS: i64 = 120_000;

/// Demand over the pool's nominal daily capacity: the headline run, and a second one
/// with lighter demand, where the batches strain the pool more than the day budgets do.
const OVERSUBSCRIPTION: f64 = 1.3;
const WITHIN_BUDGET: f64 = 0.6;
/// Share of the tasks that come in batches.
const BATCH_SHARE: f64 = 0.3;
const BATCH_SIZE: std::ops::RangeInclusive<usize> = 50..=300;
/// A batch is submitted over this long.
const BATCH_SPREAD_MS: i64 = 10_000;
const PROMPT_CHARS: std::ops::RangeInclusive<usize> = 200..=700;
const MAX_TOKENS: std::ops::RangeInclusive<u32> = 120..=180;
/// Least completion; the rest of `max_tokens` is used at random.
const MIN_COMPLETION: u64 = 20;
/// Real prompt tokens as a share of keyrelay's estimate (which errs high by design).
const PROMPT_SHARE: std::ops::Range<f64> = 0.9..1.0;
/// How long an answer takes, and how long a refusal.
const ANSWER_LATENCY_MS: std::ops::RangeInclusive<i64> = 400..=2_000;
const REFUSAL_LATENCY_MS: std::ops::RangeInclusive<i64> = 50..=200;

const GROQ: &str = "groq";
const GROQ_MODEL: &str = "llama-3.3-70b-versatile";
const GROQ_KEYS: usize = 8;
const GROQ_LIMITS: Limits = Limits {
    rpm: 30,
    rpd: 1000,
    tpm: Some(12_000),
    tpd: Some(100_000),
};
const GEMINI: &str = "gemini";
const GEMINI_MODEL: &str = "gemini-2.0-flash";
const GEMINI_KEYS: usize = 2;
const GEMINI_LIMITS: Limits = Limits {
    rpm: 15,
    rpd: 1500,
    tpm: None,
    tpd: None,
};
const GEMINI_ZONE: &str = "America/Los_Angeles";
/// Local days of Gemini's budget the simulated day touches (it starts at LA noon).
const GEMINI_DAYS: u64 = 2;

/// Goals of keyrelay with correct limits.
const GOAL_SERVED_OF_ORACLE: f64 = 0.99;
const GOAL_REFUSED_OF_CALLS: f64 = 0.001;

#[derive(Debug, Clone, Copy)]
struct Limits {
    rpm: u64,
    rpd: u64,
    tpm: Option<u64>,
    tpd: Option<u64>,
}

impl Limits {
    fn scaled(self, factor: u64) -> ModelLimits {
        ModelLimits {
            rpm: Some(self.rpm * factor),
            rpd: Some(self.rpd * factor),
            tpm: self.tpm.map(|t| t * factor),
            tpd: self.tpd.map(|t| t * factor),
        }
    }
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).expect("simulated time in range")
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn la() -> TimeZone {
    TimeZone::get(GEMINI_ZONE).expect("the tz database has America/Los_Angeles")
}

fn last_midnight(tz: &TimeZone, now: i64) -> i64 {
    let start = ts(now).to_zoned_datetime(tz.clone()).start_of_day();
    ms(start.expect("a day start").timestamp())
}

fn next_midnight(tz: &TimeZone, now: i64) -> i64 {
    let zoned = ts(now).to_zoned_datetime(tz.clone());
    let next = zoned.tomorrow().and_then(|z| z.start_of_day());
    ms(next.expect("a day start").timestamp())
}

// --- Demand ---

struct Task {
    arrival: i64,
    /// Submitted with a batch rather than alone.
    batched: bool,
    deadline: i64,
    request: ChatRequest,
    cost: Cost,
    /// What the provider counts: the real prompt, and the answer it writes.
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Task {
    /// What the provider checks against its token limits before admitting the call.
    fn requested_tokens(&self) -> u64 {
        self.prompt_tokens + u64::from(self.request.max_tokens.unwrap_or(0))
    }
}

const WORDS: [&str; 12] = [
    "summarise",
    "the",
    "following",
    "customer",
    "review",
    "and",
    "rate",
    "its",
    "tone",
    "briefly",
    "in",
    "English",
];

fn prompt(rng: &mut fastrand::Rng, chars: usize) -> String {
    let mut text = String::with_capacity(chars + 12);
    while text.len() < chars {
        text.push_str(WORDS[rng.usize(..WORDS.len())]);
        text.push(' ');
    }
    text.truncate(chars);
    text
}

fn make_task(rng: &mut fastrand::Rng, arrival: i64, batched: bool) -> Task {
    let chars = rng.usize(PROMPT_CHARS);
    let request = ChatRequest {
        model: "auto".to_owned(),
        messages: vec![ChatMessage {
            role: "user".to_owned(),
            content: prompt(rng, chars),
        }],
        max_tokens: Some(rng.u32(MAX_TOKENS)),
        temperature: None,
        top_p: None,
        stop: Vec::new(),
    };
    let cost = Cost::estimate(&request);
    let max_tokens = u64::from(request.max_tokens.unwrap_or(0));
    let estimated_prompt = cost.tokens - max_tokens;
    let share = PROMPT_SHARE.start + rng.f64() * (PROMPT_SHARE.end - PROMPT_SHARE.start);
    Task {
        arrival,
        batched,
        deadline: arrival + DEADLINE_MS,
        prompt_tokens: ((estimated_prompt as f64) * share).round() as u64,
        completion_tokens: rng.u64(MIN_COMPLETION..=max_tokens),
        request,
        cost,
    }
}

/// Mean tokens a task spends, from the distributions above.
fn mean_task_tokens() -> f64 {
    let chars = (*PROMPT_CHARS.start() + *PROMPT_CHARS.end()) as f64 / 2.0;
    let prompt = (chars / 4.0 + 4.0) * (PROMPT_SHARE.start + PROMPT_SHARE.end) / 2.0;
    let max_tokens = f64::from(*MAX_TOKENS.start() + *MAX_TOKENS.end()) / 2.0;
    prompt + (MIN_COMPLETION as f64 + max_tokens) / 2.0
}

/// What the pool can serve in the simulated day if nothing is wasted.
fn nominal_capacity() -> f64 {
    let groq_tokens = GROQ_LIMITS.tpd.map_or(f64::INFINITY, |t| t as f64) / mean_task_tokens();
    let groq = GROQ_KEYS as f64 * groq_tokens.min(GROQ_LIMITS.rpd as f64);
    let gemini = (GEMINI_KEYS as u64 * GEMINI_LIMITS.rpd * GEMINI_DAYS) as f64;
    groq + gemini
}

fn demand(seed: u64, start: i64, factor: f64) -> Vec<Task> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = (nominal_capacity() * factor).round() as usize;
    let batched = (total as f64 * BATCH_SHARE) as usize;
    // (when, in a batch)
    let mut arrivals: Vec<(i64, bool)> = Vec::with_capacity(total);
    while arrivals.len() < batched {
        let at = start + rng.i64(0..DAY_MS - BATCH_SPREAD_MS);
        let size = rng.usize(BATCH_SIZE).min(batched - arrivals.len());
        arrivals.extend((0..size).map(|_| (at + rng.i64(0..BATCH_SPREAD_MS), true)));
    }
    while arrivals.len() < total {
        arrivals.push((start + rng.i64(0..DAY_MS), false));
    }
    arrivals.sort_unstable();
    arrivals
        .into_iter()
        .map(|(at, batched)| make_task(&mut rng, at, batched))
        .collect()
}

// --- The simulated provider ---

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wire {
    Groq,
    Gemini,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Meter {
    Rpd,
    Tpd,
    Rpm,
    Tpm,
}

impl Meter {
    /// Checked in this order: a provider names the daily limit when both are hit.
    const ALL: [Meter; 4] = [Meter::Rpd, Meter::Tpd, Meter::Rpm, Meter::Tpm];

    fn is_day(self) -> bool {
        matches!(self, Meter::Rpd | Meter::Tpd)
    }

    fn dimension(self) -> LimitDimension {
        match self {
            Meter::Rpd | Meter::Rpm => LimitDimension::Requests,
            Meter::Tpd | Meter::Tpm => LimitDimension::Tokens,
        }
    }
}

/// Usage inside one window: (when, tokens) per request, with running totals.
#[derive(Debug, Default)]
struct Window {
    entries: VecDeque<(i64, u64)>,
    requests: u64,
    tokens: u64,
}

impl Window {
    fn push(&mut self, at: i64, tokens: u64) {
        self.entries.push_back((at, tokens));
        self.requests += 1;
        self.tokens += tokens;
    }

    /// Forgets requests made before `cutoff`.
    fn drop_before(&mut self, cutoff: i64) {
        while let Some(&(at, tokens)) = self.entries.front() {
            if at >= cutoff {
                break;
            }
            self.entries.pop_front();
            self.requests -= 1;
            self.tokens -= tokens;
        }
    }
}

/// One key as the provider sees it.
struct SimKey {
    label: String,
    wire: Wire,
    model: &'static str,
    limits: Limits,
    /// `None`: a rolling 24 h day.
    zone: Option<TimeZone>,
    minute: Window,
    day: Window,
}

impl SimKey {
    fn new(label: String, wire: Wire, model: &'static str, limits: Limits) -> Self {
        SimKey {
            label,
            wire,
            model,
            limits,
            zone: (wire == Wire::Gemini).then(la),
            minute: Window::default(),
            day: Window::default(),
        }
    }

    fn prune(&mut self, now: i64) {
        // A request made at `t` counts while `now < t + window`.
        self.minute.drop_before(now - MINUTE_MS + 1);
        let day_cutoff = match &self.zone {
            Some(tz) => last_midnight(tz, now),
            None => now - DAY_MS + 1,
        };
        self.day.drop_before(day_cutoff);
    }

    fn limit(&self, meter: Meter) -> Option<u64> {
        match meter {
            Meter::Rpd => Some(self.limits.rpd),
            Meter::Tpd => self.limits.tpd,
            Meter::Rpm => Some(self.limits.rpm),
            Meter::Tpm => self.limits.tpm,
        }
    }

    /// When a request of `tokens` fits `meter` (pruned at `now`): `None` if now.
    fn fits_at(&self, meter: Meter, tokens: u64, now: i64) -> Option<i64> {
        let limit = self.limit(meter)?;
        let (window, span) = if meter.is_day() {
            (&self.day, DAY_MS)
        } else {
            (&self.minute, MINUTE_MS)
        };
        let counts_tokens = matches!(meter, Meter::Tpd | Meter::Tpm);
        let (used, amount) = if counts_tokens {
            (window.tokens, tokens)
        } else {
            (window.requests, 1)
        };
        if used + amount <= limit {
            return None;
        }
        if amount > limit {
            return Some(i64::MAX);
        }
        if meter.is_day()
            && let Some(tz) = &self.zone
        {
            return Some(next_midnight(tz, now));
        }
        let mut over = used + amount - limit;
        for &(at, spent) in &window.entries {
            over = over.saturating_sub(if counts_tokens { spent } else { 1 });
            if over == 0 {
                return Some(at + span);
            }
        }
        Some(i64::MAX)
    }

    /// The limit a request of `tokens` breaks now, and when it would fit it.
    fn refusal(&self, tokens: u64, now: i64) -> Option<(Meter, i64)> {
        Meter::ALL
            .into_iter()
            .find_map(|m| self.fits_at(m, tokens, now).map(|at| (m, at)))
    }

    /// When a request of `tokens` fits every limit.
    fn free_at(&self, tokens: u64, now: i64) -> i64 {
        Meter::ALL
            .into_iter()
            .filter_map(|m| self.fits_at(m, tokens, now))
            .fold(now, i64::max)
    }

    /// Until the oldest counted request leaves `window` (when "remaining" next grows).
    fn next_leave(window: &Window, span: i64, now: i64) -> Duration {
        let left = window.entries.front().map_or(0, |(at, _)| at + span - now);
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// Groq's `x-ratelimit-*`: `-requests` is the day's request budget, `-tokens` the
    /// minute's token budget. Gemini sends none.
    fn headers(&self, now: i64, retry_after: Option<Duration>) -> RateLimitHeaders {
        match self.wire {
            Wire::Gemini => RateLimitHeaders::default(),
            Wire::Groq => RateLimitHeaders {
                limit_requests: Some(self.limits.rpd),
                remaining_requests: Some(self.limits.rpd.saturating_sub(self.day.requests)),
                reset_requests: Some(Self::next_leave(&self.day, DAY_MS, now)),
                limit_tokens: self.limits.tpm,
                remaining_tokens: self
                    .limits
                    .tpm
                    .map(|l| l.saturating_sub(self.minute.tokens)),
                reset_tokens: Some(Self::next_leave(&self.minute, MINUTE_MS, now)),
                retry_after,
            },
        }
    }

    /// A 429 classified as keyrelay's provider clients classify the real one.
    fn refuse(&self, meter: Meter, free: i64, requested: u64, now: i64) -> CallOutcome {
        let wait_secs = u64::try_from(free - now).map_or(0, |ms| ms.div_ceil(1000));
        let scope = if meter.is_day() {
            LimitScope::Day
        } else {
            LimitScope::Minute
        };
        // Both providers name the limit that refused, with its value: what the
        // clients read from Groq's message and from Gemini's `quotaValue`.
        let violations = vec![Violation {
            scope,
            dimension: meter.dimension(),
            limit: self.limit(meter),
        }];
        let (failure, headers) = match self.wire {
            Wire::Groq => {
                let (what, limit, used, asked) = match meter {
                    Meter::Rpd => (
                        "requests per day (RPD)",
                        self.limits.rpd,
                        self.day.requests,
                        1,
                    ),
                    Meter::Tpd => (
                        "tokens per day (TPD)",
                        self.limits.tpd.unwrap_or(0),
                        self.day.tokens,
                        requested,
                    ),
                    Meter::Rpm => (
                        "requests per minute (RPM)",
                        self.limits.rpm,
                        self.minute.requests,
                        1,
                    ),
                    Meter::Tpm => (
                        "tokens per minute (TPM)",
                        self.limits.tpm.unwrap_or(0),
                        self.minute.tokens,
                        requested,
                    ),
                };
                // `retry-after` (whole seconds) is the clearest signal; the client takes it.
                let retry_after = Some(Duration::from_secs(wait_secs));
                let detail = format!(
                    "HTTP 429: Rate limit reached for model `{}` in organization `org_bench` \
                     service tier `on_demand` on {what}: Limit {limit}, Used {used}, Requested \
                     {asked}. Please try again in {wait_secs}s.",
                    self.model
                );
                (
                    Failure::RateLimited {
                        retry_after,
                        scope,
                        violations,
                        detail,
                    },
                    self.headers(now, retry_after),
                )
            }
            Wire::Gemini => {
                // RetryInfo.retryDelay: the minute's wait, or "0s" with a …PerDay… quota.
                let (quota, retry_after) = if meter.is_day() {
                    ("GenerateRequestsPerDayPerProjectPerModel-FreeTier", 0)
                } else {
                    (
                        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                        wait_secs,
                    )
                };
                let detail = format!(
                    "HTTP 429: quota {quota} exceeded: You exceeded your current quota, please \
                     check your plan and billing details."
                );
                (
                    Failure::RateLimited {
                        retry_after: Some(Duration::from_secs(retry_after)),
                        scope,
                        violations,
                        detail,
                    },
                    RateLimitHeaders::default(),
                )
            }
        };
        CallOutcome {
            result: Err(failure),
            headers,
        }
    }

    /// One call: refused if any real limit is short (with the limit), else counted and
    /// answered.
    fn call(&mut self, task: &Task, now: i64) -> (CallOutcome, Option<Meter>) {
        self.prune(now);
        let requested = task.requested_tokens();
        if let Some((meter, free)) = self.refusal(requested, now) {
            return (self.refuse(meter, free, requested, now), Some(meter));
        }
        let usage = Usage {
            prompt_tokens: task.prompt_tokens,
            completion_tokens: task.completion_tokens,
        };
        self.minute.push(now, usage.total());
        self.day.push(now, usage.total());
        let outcome = CallOutcome {
            result: Ok(Completion {
                content: "ok".to_owned(),
                usage,
            }),
            headers: self.headers(now, None),
        };
        (outcome, None)
    }
}

/// Every key of the pool, in route order: Groq's, then Gemini's.
struct World {
    keys: Vec<SimKey>,
    by_label: HashMap<String, usize>,
    /// Per strategy: latencies and jitter.
    rng: fastrand::Rng,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut keys = Vec::new();
        for i in 1..=GROQ_KEYS {
            keys.push(SimKey::new(
                format!("groq-{i}"),
                Wire::Groq,
                GROQ_MODEL,
                GROQ_LIMITS,
            ));
        }
        for i in 1..=GEMINI_KEYS {
            keys.push(SimKey::new(
                format!("gemini-{i}"),
                Wire::Gemini,
                GEMINI_MODEL,
                GEMINI_LIMITS,
            ));
        }
        let by_label = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.label.clone(), i))
            .collect();
        World {
            keys,
            by_label,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Calls key `key`: the outcome, and when it arrives.
    fn call(&mut self, key: usize, task: &Task, now: i64, tally: &mut Tally) -> (CallOutcome, i64) {
        let (outcome, refused) = self.keys[key].call(task, now);
        tally.calls += 1;
        if let Some(meter) = refused {
            *tally
                .refused_by
                .entry((self.keys[key].wire, meter))
                .or_default() += 1;
        }
        let latency = match &outcome.result {
            Ok(_) => {
                *tally.served_by.entry(self.keys[key].wire).or_default() += 1;
                self.rng.i64(ANSWER_LATENCY_MS)
            }
            Err(Failure::RateLimited { scope, .. }) => {
                tally.refused += 1;
                if *scope == LimitScope::Day {
                    tally.refused_day += 1;
                }
                self.rng.i64(REFUSAL_LATENCY_MS)
            }
            Err(_) => self.rng.i64(REFUSAL_LATENCY_MS),
        };
        (outcome, now + latency)
    }
}

// --- Strategies ---

#[derive(Debug, Default)]
struct Tally {
    served: u64,
    served_batched: u64,
    calls: u64,
    refused: u64,
    refused_day: u64,
    served_by: BTreeMap<Wire, u64>,
    /// 429s by provider and the limit that was hit.
    refused_by: BTreeMap<(Wire, Meter), u64>,
    /// Told "no key frees before the deadline", or (naive) every key refused.
    gave_up: u64,
    /// Reached the deadline while waiting.
    timed_out: u64,
    /// Failed otherwise (transient retries, rejected).
    failed: u64,
    most_waiting: usize,
    wall: Duration,
}

/// Events in time order; equal times in the order they were scheduled.
struct Agenda<E> {
    heap: BinaryHeap<Reverse<(i64, u64)>>,
    items: HashMap<u64, E>,
    next: u64,
}

impl<E> Agenda<E> {
    fn new() -> Self {
        Agenda {
            heap: BinaryHeap::new(),
            items: HashMap::new(),
            next: 0,
        }
    }

    fn at(&mut self, t: i64, event: E) {
        self.heap.push(Reverse((t, self.next)));
        self.items.insert(self.next, event);
        self.next += 1;
    }

    fn pop(&mut self) -> Option<(i64, E)> {
        let Reverse((t, id)) = self.heap.pop()?;
        self.items.remove(&id).map(|e| (t, e))
    }
}

enum RelayEvent {
    Plan(usize),
    /// Boxed: the answer is large and most events are plans.
    Answer(Box<(usize, Call, CallOutcome)>),
}

/// (a), (b): the daemon's loop for each task, on the real rotator.
fn keyrelay(config: &Config, tasks: &[Task], seed: u64) -> Tally {
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut world = World::new(seed);
    let mut rotator = Rotator::new(config);
    let route = config.routing.auto.clone();
    let mut attempts: Vec<Attempt> = vec![Attempt::new(); tasks.len()];
    let mut waiting = vec![false; tasks.len()];
    let mut n_waiting = 0usize;
    let mut agenda = Agenda::new();
    for (i, task) in tasks.iter().enumerate() {
        agenda.at(task.arrival, RelayEvent::Plan(i));
    }
    while let Some((now, event)) = agenda.pop() {
        match event {
            RelayEvent::Plan(i) => {
                let task = &tasks[i];
                if std::mem::take(&mut waiting[i]) {
                    n_waiting -= 1;
                }
                if now >= task.deadline {
                    tally.timed_out += 1;
                    continue;
                }
                let plan = rotator.plan(
                    &route,
                    task.cost,
                    &attempts[i],
                    ts(now),
                    ts(task.deadline),
                    true,
                );
                match plan {
                    Plan::Call(call) => {
                        let key = world.by_label[&call.label];
                        let (outcome, at) = world.call(key, task, now, &mut tally);
                        agenda.at(at, RelayEvent::Answer(Box::new((i, call, outcome))));
                    }
                    Plan::Wait { until } => {
                        waiting[i] = true;
                        n_waiting += 1;
                        tally.most_waiting = tally.most_waiting.max(n_waiting);
                        agenda.at(ms(until).max(now + 1), RelayEvent::Plan(i));
                    }
                    Plan::Exhausted { .. } => tally.gave_up += 1,
                }
            }
            RelayEvent::Answer(answer) => {
                let (task, call, outcome) = *answer;
                let jitter = world.rng.f64();
                let next =
                    rotator.record(&call, &outcome, &mut attempts[task], ts(now), true, jitter);
                match next {
                    Next::Done if outcome.result.is_ok() => {
                        tally.served += 1;
                        tally.served_batched += u64::from(tasks[task].batched);
                    }
                    Next::Done | Next::TryNext => agenda.at(now, RelayEvent::Plan(task)),
                    Next::RetryAfter(delay) => {
                        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                        agenda.at(now.saturating_add(delay), RelayEvent::Plan(task));
                    }
                    Next::Fail { .. } => tally.failed += 1,
                }
            }
        }
    }
    tally.wall = started.elapsed();
    tally
}

enum NaiveEvent {
    Try {
        task: usize,
        key: usize,
        tried: usize,
    },
    Answer {
        task: usize,
        key: usize,
        tried: usize,
        ok: bool,
    },
}

/// (c): keys in a ring; on a 429 the next key at once, up to every key, then fail.
fn naive(tasks: &[Task], seed: u64) -> Tally {
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut world = World::new(seed);
    let n = world.keys.len();
    let mut current = 0usize;
    let mut agenda = Agenda::new();
    for (i, task) in tasks.iter().enumerate() {
        agenda.at(
            task.arrival,
            NaiveEvent::Try {
                task: i,
                key: usize::MAX,
                tried: 0,
            },
        );
    }
    while let Some((now, event)) = agenda.pop() {
        match event {
            NaiveEvent::Try { task, key, tried } => {
                // A new task starts at the key in use; a refused one moves along the ring.
                let key = if key == usize::MAX { current } else { key };
                let (outcome, at) = world.call(key, &tasks[task], now, &mut tally);
                let ok = outcome.result.is_ok();
                agenda.at(
                    at,
                    NaiveEvent::Answer {
                        task,
                        key,
                        tried: tried + 1,
                        ok,
                    },
                );
            }
            NaiveEvent::Answer {
                task,
                key,
                tried,
                ok,
            } => {
                if ok {
                    tally.served += 1;
                    tally.served_batched += u64::from(tasks[task].batched);
                    continue;
                }
                if current == key {
                    current = (key + 1) % n;
                }
                if tried >= n {
                    tally.gave_up += 1;
                } else {
                    agenda.at(
                        now,
                        NaiveEvent::Try {
                            task,
                            key: (key + 1) % n,
                            tried,
                        },
                    );
                }
            }
        }
    }
    tally.wall = started.elapsed();
    tally
}

/// (d): knows every key's real windows; serves a task on the first key of the route
/// with room, as soon as one has room before the deadline. Never refused. With
/// `expiring_first` it ignores the route's order and spends Gemini's budget, which
/// is lost at its daily reset, before Groq's rolling one.
fn oracle(tasks: &[Task], seed: u64, expiring_first: bool) -> Tally {
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut world = World::new(seed);
    let n = world.keys.len();
    let groq: Vec<usize> = (0..n)
        .filter(|k| world.keys[*k].wire == Wire::Groq)
        .collect();
    let gemini: Vec<usize> = (0..n)
        .filter(|k| world.keys[*k].wire == Wire::Gemini)
        .collect();
    let mut cursor = [0usize; 2];
    let mut waiting = vec![false; tasks.len()];
    let mut n_waiting = 0usize;
    let mut agenda = Agenda::new();
    for (i, task) in tasks.iter().enumerate() {
        agenda.at(task.arrival, i);
    }
    while let Some((now, i)) = agenda.pop() {
        let task = &tasks[i];
        if std::mem::take(&mut waiting[i]) {
            n_waiting -= 1;
        }
        if now >= task.deadline {
            tally.timed_out += 1;
            continue;
        }
        let requested = task.requested_tokens();
        for key in world.keys.iter_mut() {
            key.prune(now);
        }
        let mut chosen = None;
        let order = if expiring_first {
            [&gemini, &groq]
        } else {
            [&groq, &gemini]
        };
        for (group, keys) in order.into_iter().enumerate() {
            // Round-robin within a provider, so the minute budgets are spread.
            for step in 0..keys.len() {
                let key = keys[(cursor[group] + step) % keys.len()];
                if world.keys[key].refusal(requested, now).is_none() {
                    cursor[group] = (cursor[group] + step + 1) % keys.len();
                    chosen = Some(key);
                    break;
                }
            }
            if chosen.is_some() {
                break;
            }
        }
        if let Some(key) = chosen {
            let (outcome, _) = world.call(key, task, now, &mut tally);
            assert!(outcome.result.is_ok(), "the oracle was refused");
            tally.served += 1;
            tally.served_batched += u64::from(task.batched);
            continue;
        }
        let free = world
            .keys
            .iter()
            .map(|k| k.free_at(requested, now))
            .min()
            .unwrap_or(i64::MAX);
        if free < task.deadline {
            waiting[i] = true;
            n_waiting += 1;
            tally.most_waiting = tally.most_waiting.max(n_waiting);
            agenda.at(free.max(now + 1), i);
        } else {
            tally.gave_up += 1;
        }
    }
    tally.wall = started.elapsed();
    tally
}

// --- The configuration keyrelay is given ---

fn provider(
    name: &str,
    kind: ProviderKind,
    model: &str,
    limits: ModelLimits,
    reset: DailyReset,
    n: usize,
) -> ProviderConfig {
    ProviderConfig {
        name: name.to_owned(),
        kind,
        base_url: "http://127.0.0.1:9".to_owned(),
        daily_reset: reset,
        timeout: Duration::from_secs(60),
        max_concurrency: keyrelay::config::DEFAULT_MAX_CONCURRENCY,
        models: BTreeMap::from([(model.to_owned(), limits)]),
        keys: (1..=n)
            .map(|i| KeyConfig {
                label: format!("{name}-{i}"),
                secret_source: SecretSource::Env(format!("{}_KEY_{i}", name.to_uppercase())),
                secret: Secret::new("not-a-real-key"),
                account: None,
            })
            .collect(),
    }
}

/// The pool as an operator configures it, with every limit `factor` × the real one.
fn pool_config(factor: u64) -> Config {
    let providers = vec![
        provider(
            GROQ,
            ProviderKind::OpenAi,
            GROQ_MODEL,
            GROQ_LIMITS.scaled(factor),
            DailyReset::Rolling,
            GROQ_KEYS,
        ),
        provider(
            GEMINI,
            ProviderKind::Gemini,
            GEMINI_MODEL,
            GEMINI_LIMITS.scaled(factor),
            DailyReset::Zone {
                name: GEMINI_ZONE.to_owned(),
                tz: la(),
            },
            GEMINI_KEYS,
        ),
    ];
    Config::from_providers(
        providers,
        vec![
            Target {
                provider: GROQ.to_owned(),
                model: GROQ_MODEL.to_owned(),
            },
            Target {
                provider: GEMINI.to_owned(),
                model: GEMINI_MODEL.to_owned(),
            },
        ],
    )
}

// --- Report ---

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Runs every strategy on `tasks` and prints the table; returns keyrelay's (served ÷
/// oracle, 429s ÷ calls) with correct limits.
fn scenario(title: &str, tasks: &[Task], seed: u64) -> (f64, f64) {
    let batched = tasks.iter().filter(|t| t.batched).count();
    println!(
        "{title}: {} tasks = {:.1} x nominal capacity {:.0} ({:.0} tokens a task); {batched} in \
         batches of {}-{} within {} s; deadline {} s each",
        tasks.len(),
        tasks.len() as f64 / nominal_capacity(),
        nominal_capacity(),
        mean_task_tokens(),
        BATCH_SIZE.start(),
        BATCH_SIZE.end(),
        BATCH_SPREAD_MS / 1000,
        DEADLINE_MS / 1000,
    );
    let runs: Vec<(&str, Tally)> = vec![
        (
            "(d) oracle (knows the real windows)",
            oracle(tasks, seed, false),
        ),
        (
            "(a) keyrelay, correct limits",
            keyrelay(&pool_config(1), tasks, seed),
        ),
        (
            "(b) keyrelay, limits 2x too high",
            keyrelay(&pool_config(2), tasks, seed),
        ),
        ("(c) naive ring, next key on 429", naive(tasks, seed)),
        (
            "(d') oracle, expiring budget first",
            oracle(tasks, seed, true),
        ),
    ];
    let oracle_served = runs[0].1.served;
    println!(
        "  {:<36} {:>7} {:>8} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "strategy",
        "served",
        "÷oracle",
        "429÷calls",
        "calls/srv",
        "calls",
        "429s",
        "groq",
        "gemini",
        "gave up",
        "timeout",
    );
    for (name, t) in &runs {
        println!(
            "  {:<36} {:>7} {:>7.2}% {:>8.3}% {:>9.3} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            name,
            t.served,
            100.0 * ratio(t.served, oracle_served),
            100.0 * ratio(t.refused, t.calls),
            ratio(t.calls, t.served),
            t.calls,
            t.refused,
            t.served_by.get(&Wire::Groq).copied().unwrap_or(0),
            t.served_by.get(&Wire::Gemini).copied().unwrap_or(0),
            t.gave_up,
            t.timed_out,
        );
    }
    for (name, t) in &runs {
        let by: Vec<String> = t
            .refused_by
            .iter()
            .map(|((wire, meter), n)| format!("{wire:?} {meter:?} {n}"))
            .collect();
        println!(
            "  {name}: 429s by limit [{}]; batched tasks served {:.1}%, lone tasks {:.1}%; \
             {} failed otherwise; at most {} waiting; {:.1} s to simulate",
            by.join(", "),
            100.0 * ratio(t.served_batched, batched as u64),
            100.0 * ratio(t.served - t.served_batched, (tasks.len() - batched) as u64),
            t.failed,
            t.most_waiting,
            t.wall.as_secs_f64()
        );
    }
    println!();
    let a = &runs[1].1;
    (ratio(a.served, oracle_served), ratio(a.refused, a.calls))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn main() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let start = ms(DAY_START.parse::<Timestamp>().expect("DAY_START parses"));
    println!("budget: one simulated day from {DAY_START} (noon in Los Angeles), seed {seed}");
    println!(
        "pool: {GROQ_KEYS} groq keys (rpm {}, rpd {}, tpm {}, tpd {}, rolling day), then \
         {GEMINI_KEYS} gemini keys (rpm {}, rpd {}, reset at midnight {GEMINI_ZONE})",
        GROQ_LIMITS.rpm,
        GROQ_LIMITS.rpd,
        GROQ_LIMITS.tpm.unwrap_or(0),
        GROQ_LIMITS.tpd.unwrap_or(0),
        GEMINI_LIMITS.rpm,
        GEMINI_LIMITS.rpd,
    );
    println!();
    let over = demand(seed, start, OVERSUBSCRIPTION);
    let (served, refused) = scenario("more demand than budget", &over, seed);
    let within = demand(seed, start, WITHIN_BUDGET);
    scenario("lighter demand, the same batches", &within, seed);
    println!(
        "goal, keyrelay with correct limits, more demand than budget: served >= {:.0}% of the \
         oracle: {:.2}% {}; 429s <= {:.1}% of calls: {:.3}% {}",
        100.0 * GOAL_SERVED_OF_ORACLE,
        100.0 * served,
        verdict(served >= GOAL_SERVED_OF_ORACLE),
        100.0 * GOAL_REFUSED_OF_CALLS,
        100.0 * refused,
        verdict(refused <= GOAL_REFUSED_OF_CALLS),
    );
}
