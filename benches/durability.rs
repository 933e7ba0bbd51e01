//! Durable writes under load: fsyncs and bytes written to the state file when tasks
//! flow at 100 a second, each doing what the daemon does with the store.
//!
//! `cargo bench --bench durability`
//!
//! Real time and real fsyncs: a `Store` on a directory under the target directory (a
//! real disk, not tmpfs), a real `Rotator` reserving budget on four keys, and per task,
//! as `relay` does: a `pending_add` batch committed in the background (its
//! acknowledgement), the rotator's dirty rows committed before the call whenever a
//! lease it draws on is not durable yet (`needs_commit` and `Reservation::lease`,
//! waited for as `relay` does, mirrored here), a simulated provider call of
//! 0.3-1.5 s settled by `record`, then an `answered` + `pending_remove` batch. The store
//! counts its write transactions; each is one fsync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use keyrelay::config::{
    Config, DailyReset, KeyConfig, ModelLimits, ProviderConfig, ProviderKind, SecretSource, Target,
};
use keyrelay::ledger::Cost;
use keyrelay::provider::{
    CallOutcome, ChatMessage, ChatRequest, Completion, RateLimitHeaders, Usage,
};
use keyrelay::rotator::{Attempt, Next, Plan, Rotator};
use keyrelay::secret::Secret;
use keyrelay::store::{Answered, Batch, FILE_NAME, PendingTask, Store, StoreStats};
use tokio::sync::watch;

const SEED: u64 = 7;
const TASKS_PER_SEC: u64 = 100;
const LOAD: Duration = Duration::from_secs(10);
const PROVIDER: &str = "openai";
const MODEL: &str = "gpt-4o-mini";
/// Four keys of a paid tier: 100 tasks a second is 25 a second per key.
const KEYS: usize = 4;
const LIMITS: ModelLimits = ModelLimits {
    rpm: Some(5_000),
    rpd: Some(1_000_000),
    tpm: Some(4_000_000),
    tpd: None,
};
const PROMPT: &str = "Summarise the following customer review in one sentence and rate its \
     tone from 1 to 5: the delivery was late but the support team sorted it out quickly.";
const MAX_TOKENS: u32 = 150;
const CALL_LATENCY_MS: std::ops::RangeInclusive<u64> = 300..=1_500;
const DEADLINE: Duration = Duration::from_secs(120);
/// `relay`'s wait for another task's commit of a lease before committing it itself.
const LEASE_COMMIT_WAIT: Duration = Duration::from_secs(3);
/// What the daemon stores per task: the recorded task and its reply are this order.
const PAYLOAD_BYTES: usize = 600;
const REPLY_BYTES: usize = 900;
/// The goal: fewer fsyncs than seconds of load, however many tasks.
const GOAL_FSYNCS_PER_SEC: f64 = 1.0;

fn config() -> Config {
    let provider = ProviderConfig {
        name: PROVIDER.to_owned(),
        kind: ProviderKind::OpenAi,
        base_url: "http://127.0.0.1:9".to_owned(),
        daily_reset: DailyReset::Rolling,
        timeout: Duration::from_secs(60),
        max_concurrency: keyrelay::config::DEFAULT_MAX_CONCURRENCY,
        models: BTreeMap::from([(MODEL.to_owned(), LIMITS)]),
        keys: (1..=KEYS)
            .map(|i| KeyConfig {
                label: format!("key-{i}"),
                secret_source: SecretSource::Env(format!("KEY_{i}")),
                secret: Secret::new("not-a-real-key"),
                account: None,
            })
            .collect(),
    };
    Config::from_providers(
        vec![provider],
        vec![Target {
            provider: PROVIDER.to_owned(),
            model: MODEL.to_owned(),
        }],
    )
}

/// `/proc/self/io`: bytes handed to `write` (`wchar`) and bytes sent to the block
/// layer (`write_bytes`), for this process.
#[derive(Debug, Clone, Copy, Default)]
struct Io {
    wchar: u64,
    write_bytes: u64,
}

fn io() -> Option<Io> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Io {
        wchar: field("wchar")?,
        write_bytes: field("write_bytes")?,
    })
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

struct Shared {
    store: Store,
    rotator: Mutex<Rotator>,
    route: Vec<Target>,
    /// As in `Relay`: the highest `Rotator::leases_opened` whose snapshot is on disk. A
    /// call goes out only once the lease it draws on is durable, whoever opened it.
    durable: watch::Sender<u64>,
    reservations: AtomicU64,
    needs_commit: AtomicU64,
    /// Calls that waited for a lease to be durable, and how long (µs), summed and worst.
    lease_waits: AtomicU64,
    lease_wait_us: AtomicU64,
    lease_wait_max_us: AtomicU64,
    ack_us: AtomicU64,
    ack_max_us: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn rotator(&self) -> std::sync::MutexGuard<'_, Rotator> {
        self.rotator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// As `Relay::persist`: the rows changed since the last commit, and the time.
    async fn persist(&self) {
        let (committed, version) = {
            let mut rotator = self.rotator();
            let batch = Batch {
                rows: rotator.snapshot_dirty(),
                latest_time_ms: Some(Timestamp::now().as_millisecond()),
                ..Batch::default()
            };
            (self.store.commit(batch), rotator.leases_opened())
        };
        committed.await.expect("lease committed");
        self.durable.send_if_modified(|durable| {
            let newer = version > *durable;
            if newer {
                *durable = version;
            }
            newer
        });
    }

    /// As `Relay::lease_durable`: waits for another task's commit of the lease numbered
    /// `version` (for at most `LEASE_COMMIT_WAIT`), or commits it itself.
    async fn lease_durable(&self, version: u64, opened_it: bool) {
        if *self.durable.borrow() >= version {
            return;
        }
        let since = Instant::now();
        if !opened_it {
            let mut durable = self.durable.subscribe();
            let _ =
                tokio::time::timeout(LEASE_COMMIT_WAIT, durable.wait_for(|d| *d >= version)).await;
        }
        if *self.durable.borrow() < version {
            self.persist().await;
        }
        self.lease_waits.fetch_add(1, Ordering::Relaxed);
        note(
            &self.lease_wait_us,
            &self.lease_wait_max_us,
            since.elapsed(),
        );
    }
}

fn note(sum: &AtomicU64, max: &AtomicU64, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    sum.fetch_add(us, Ordering::Relaxed);
    max.fetch_max(us, Ordering::Relaxed);
}

async fn task(shared: Arc<Shared>, n: u64, latency: Duration) {
    let id = format!("task-{n:06}");
    let received = Timestamp::now();
    let deadline = received.checked_add(DEADLINE).expect("deadline in range");
    // Recorded, then acknowledged; the daemon serves it meanwhile.
    let record = Batch {
        pending_add: vec![PendingTask {
            id: id.clone(),
            payload: vec![b'p'; PAYLOAD_BYTES],
            received_at_ms: received.as_millisecond(),
        }],
        ..Batch::default()
    };
    let ack = {
        let shared = Arc::clone(&shared);
        let commit = shared.store.commit(record);
        let since = Instant::now();
        tokio::spawn(async move {
            commit.await.expect("task recorded");
            note(&shared.ack_us, &shared.ack_max_us, since.elapsed());
        })
    };
    let request = ChatRequest {
        model: MODEL.to_owned(),
        messages: vec![ChatMessage {
            role: "user".to_owned(),
            content: PROMPT.to_owned(),
        }],
        max_tokens: Some(MAX_TOKENS),
        temperature: None,
        top_p: None,
        stop: Vec::new(),
    };
    let cost = Cost::estimate(&request);
    let mut attempt = Attempt::new();
    loop {
        let plan = shared.rotator().plan(
            &shared.route,
            cost,
            &attempt,
            Timestamp::now(),
            deadline,
            true,
        );
        match plan {
            Plan::Call(call) => {
                shared.reservations.fetch_add(1, Ordering::Relaxed);
                if call.needs_commit {
                    shared.needs_commit.fetch_add(1, Ordering::Relaxed);
                }
                shared
                    .lease_durable(call.reservation.lease(), call.needs_commit)
                    .await;
                tokio::time::sleep(latency).await;
                let outcome = CallOutcome {
                    result: Ok(Completion {
                        content: "ok".to_owned(),
                        usage: Usage {
                            prompt_tokens: 40,
                            completion_tokens: 60,
                        },
                    }),
                    headers: RateLimitHeaders::default(),
                };
                let next = shared.rotator().record(
                    &call,
                    &outcome,
                    &mut attempt,
                    Timestamp::now(),
                    true,
                    0.5,
                );
                match next {
                    Next::Done => break,
                    other => panic!("a simulated answer was not taken as done: {other:?}"),
                }
            }
            Plan::Wait { until } => {
                let wait = Timestamp::now().duration_until(until);
                tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
            }
            Plan::Exhausted { message, .. } => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("task {id} not served: {message}");
                break;
            }
        }
    }
    let answer = Batch {
        pending_remove: vec![id.clone()],
        answered: vec![Answered {
            id,
            reply: vec![b'r'; REPLY_BYTES],
            at_ms: Timestamp::now().as_millisecond(),
        }],
        ..Batch::default()
    };
    shared.store.commit(answer).await.expect("answer recorded");
    ack.await.expect("ack task");
    shared.served.fetch_add(1, Ordering::Relaxed);
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("durability-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let path = dir.path().join(FILE_NAME);
    let (store, _) = Store::open(&path).expect("store opens");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = config();
    let shared = Arc::new(Shared {
        store: store.clone(),
        rotator: Mutex::new(Rotator::new(&config)),
        route: config.routing.auto.clone(),
        durable: watch::channel(0).0,
        reservations: AtomicU64::new(0),
        needs_commit: AtomicU64::new(0),
        lease_waits: AtomicU64::new(0),
        lease_wait_us: AtomicU64::new(0),
        lease_wait_max_us: AtomicU64::new(0),
        ack_us: AtomicU64::new(0),
        ack_max_us: AtomicU64::new(0),
        served: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let total = TASKS_PER_SEC * LOAD.as_secs();
    let size_before = file_size(&path);
    let stats_before = store.stats();
    let io_before = io();
    let started = Instant::now();
    let mut load_done = Duration::ZERO;
    runtime.block_on(async {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let mut tick = tokio::time::interval(Duration::from_secs(1) / TASKS_PER_SEC as u32);
        let mut tasks = Vec::new();
        for n in 0..total {
            tick.tick().await;
            let latency = Duration::from_millis(rng.u64(CALL_LATENCY_MS));
            tasks.push(tokio::spawn(task(Arc::clone(&shared), n, latency)));
        }
        load_done = started.elapsed();
        for t in tasks {
            t.await.expect("task");
        }
    });
    let elapsed = started.elapsed();
    let stats: StoreStats = store.stats();
    let io_after = io();
    runtime.block_on(store.close()).expect("store closes");
    let size_after = file_size(&path);

    let commits = stats.commits - stats_before.commits;
    let batches = stats.batches - stats_before.batches;
    let served = shared.served.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    let per_sec = commits as f64 / secs;
    let reservations = shared.reservations.load(Ordering::Relaxed);
    let needs_commit = shared.needs_commit.load(Ordering::Relaxed);
    let lease_waits = shared.lease_waits.load(Ordering::Relaxed);
    println!(
        "durability: {total} tasks at {TASKS_PER_SEC}/s over {KEYS} keys, calls of {}-{} ms; \
         state file {}",
        CALL_LATENCY_MS.start(),
        CALL_LATENCY_MS.end(),
        path.display()
    );
    println!(
        "load {:.2} s of arrivals, {:.2} s until the last answer was durable; {served} served, {} \
         not",
        load_done.as_secs_f64(),
        secs,
        shared.failed.load(Ordering::Relaxed)
    );
    println!(
        "fsyncs (store commits): {commits} = {per_sec:.2} per second from the first arrival to \
         the last durable answer, {:.4} per task; \
         {batches} caller batches, {:.1} batches per fsync; failed commits {}",
        commits as f64 / served.max(1) as f64,
        batches as f64 / commits.max(1) as f64,
        stats.failed_commits - stats_before.failed_commits,
    );
    println!(
        "leases: {needs_commit} of {reservations} reservations opened a new lease ({:.1}%); \
         {lease_waits} calls ({:.1}%) waited for a lease to be durable before going out, {:.0} \
         ms on average, {:.0} ms at worst",
        100.0 * needs_commit as f64 / reservations.max(1) as f64,
        100.0 * lease_waits as f64 / reservations.max(1) as f64,
        shared.lease_wait_us.load(Ordering::Relaxed) as f64 / lease_waits.max(1) as f64 / 1e3,
        shared.lease_wait_max_us.load(Ordering::Relaxed) as f64 / 1e3,
    );
    println!(
        "acknowledgement (pending_add durable): {:.0} ms on average, {:.0} ms at worst",
        shared.ack_us.load(Ordering::Relaxed) as f64 / served.max(1) as f64 / 1e3,
        shared.ack_max_us.load(Ordering::Relaxed) as f64 / 1e3,
    );
    match (io_before, io_after) {
        (Some(before), Some(after)) => {
            let wchar = after.wchar - before.wchar;
            let block = after.write_bytes - before.write_bytes;
            println!(
                "written: {} KB through write() = {:.1} KB per task, {:.1} KB per fsync; {} KB \
                 to the block layer = {:.1} KB per task",
                wchar / 1000,
                wchar as f64 / served.max(1) as f64 / 1e3,
                wchar as f64 / commits.max(1) as f64 / 1e3,
                block / 1000,
                block as f64 / served.max(1) as f64 / 1e3,
            );
        }
        _ => println!("written: /proc/self/io is not readable here"),
    }
    println!(
        "state file: {} KB before, {} KB after",
        size_before / 1000,
        size_after / 1000
    );
    println!(
        "goal: under {GOAL_FSYNCS_PER_SEC} fsync per second of load: {per_sec:.2} {}",
        if per_sec < GOAL_FSYNCS_PER_SEC {
            "met"
        } else {
            "MISSED"
        }
    );
}
