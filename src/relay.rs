//! The running daemon's work: take a task from the broker, answer it from the store if
//! it was answered before, record it, run it through the rotator and the providers,
//! publish the reply and acknowledge. Owns the in-memory queue of waiting tasks and
//! the counters; the decisions themselves are the rotator's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::GuardedClock;
use crate::config::{Config, Target};
use crate::health::{Counters, Health};
use crate::ledger::Cost;
use crate::mqtt::{Link, Received, Topics};
use crate::provider::{Failure, ProviderClient};
use crate::rotator::{Attempt, FailCode, Next, Plan, Rotator};
use crate::secret::Secret;
use crate::state::PendingRecord;
use crate::store::{Answered, Batch, PendingTask, Store};
use crate::task::{self, ErrorCode, Reply, Served, Task};

/// How long a task waits before looking again when the store cannot record budget:
/// nothing is spent until it can (fail closed).
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Longest sleep of a waiting task between looks at the keys, so that a key reset or a
/// freed budget is noticed even without a wake-up.
const WAIT_SLICE: Duration = Duration::from_secs(5);
/// How long a call waits for another task's commit of the lease it draws on before it
/// commits itself (group commits space fsyncs by `store::COMMIT_INTERVAL`).
const LEASE_COMMIT_WAIT: Duration = Duration::from_secs(3);

/// Counters since the daemon started (the health topic's `tasks`).
#[derive(Debug, Default)]
pub struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    provider_calls: AtomicU64,
    rate_limited: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> Counters {
        Counters {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            provider_calls: self.provider_calls.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
        }
    }
}

/// Everything the relay's tasks share.
pub struct Relay {
    pub config: Config,
    pub topics: Topics,
    pub link: Link,
    pub store: Store,
    pub clock: GuardedClock,
    pub stats: Stats,
    /// Bumped whenever a key's state may have changed (a reply, a reset, the store):
    /// health republishes and waiting tasks look again. A watch, so no wake-up is lost.
    changes: watch::Sender<u64>,
    /// Every task the relay spawns, so a stop can wait for them.
    tracker: TaskTracker,
    rotator: Mutex<Rotator>,
    /// The highest [`Rotator::leases_opened`] whose snapshot is on disk. A call is sent
    /// only once this covers the lease its reservation draws on, whoever opened that
    /// lease: a crash must never forget budget that reached a provider.
    durable: watch::Sender<u64>,
    providers: HashMap<String, ProviderClient>,
    /// Each key's secret by label; `reset` reads the key file again.
    keys: Mutex<HashMap<String, Secret>>,
    waiting: AtomicUsize,
    /// Tasks being served, by id, with further deliveries of the same id to acknowledge.
    in_flight: Mutex<HashMap<String, Vec<Received>>>,
    /// Stops new work; set on SIGTERM.
    pub stopping: CancellationToken,
    store_usable: AtomicBool,
}

/// Why the relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("provider {name}: {source}")]
    Provider {
        name: String,
        source: crate::provider::ProviderBuildError,
    },
}

/// Why an operator's reset did not take effect; the control socket sends it back.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("no key is labelled {0:?}")]
    UnknownKey(String),
    #[error("the key of {label} cannot be read: {source}")]
    Secret {
        label: String,
        source: crate::config::SecretError,
    },
    /// The cleared state could not be written to the state file.
    #[error(transparent)]
    Store(#[from] crate::store::CommitError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Relay {
    pub fn new(
        config: Config,
        link: Link,
        store: Store,
        clock: GuardedClock,
        rotator: Rotator,
        stopping: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Self, SetupError> {
        let topics = Topics::new(
            &config.mqtt.topic_prefix,
            &config.node_id,
            &config.mqtt.share_group,
        );
        let mut providers = HashMap::new();
        let mut keys = HashMap::new();
        for p in &config.providers {
            let client = ProviderClient::new(p).map_err(|source| SetupError::Provider {
                name: p.name.clone(),
                source,
            })?;
            providers.insert(p.name.clone(), client);
            for k in &p.keys {
                keys.insert(k.label.clone(), k.secret.clone());
            }
        }
        Ok(Self {
            config,
            topics,
            link,
            store,
            clock,
            stats: Stats::default(),
            changes: watch::channel(0).0,
            tracker,
            rotator: Mutex::new(rotator),
            durable: watch::channel(0).0,
            providers,
            keys: Mutex::new(keys),
            waiting: AtomicUsize::new(0),
            in_flight: Mutex::new(HashMap::new()),
            stopping,
            store_usable: AtomicBool::new(true),
        })
    }

    /// Says that a key's state may have changed.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later [`Self::changed`].
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn queue_len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn store_usable(&self) -> bool {
        self.store_usable.load(Ordering::Relaxed) && self.store.usable()
    }

    /// The health value of SPEC §3, as topic, LEDs and `status` show it.
    pub fn health(&self) -> Health {
        let now = self.clock.now();
        let synced = self.clock.synchronised();
        crate::health::of_rotator(
            &lock(&self.rotator),
            &self.config.routing.auto,
            now,
            synced,
            self.queue_len(),
            self.stats.snapshot(),
        )
    }

    /// When a key's state next ends by itself, so health can be republished then.
    pub fn next_change(&self) -> Option<Timestamp> {
        lock(&self.rotator).next_change(self.clock.now())
    }

    /// Writes what changed in the budgets and key states; `exact` on a clean stop.
    pub async fn persist(&self, exact: bool) -> Result<(), crate::store::CommitError> {
        let (committed, version) = {
            let mut r = lock(&self.rotator);
            let rows = if exact {
                r.snapshot_exact()
            } else {
                r.snapshot_dirty()
            };
            let batch = Batch {
                rows,
                latest_time_ms: Some(self.clock.now().as_millisecond()),
                ..Batch::default()
            };
            // Handed to the store under the lock, so snapshots reach it in the order they
            // were taken: an older row never overwrites a newer one, and once this one is
            // durable so is every snapshot before it.
            (self.store.commit(batch), r.leases_opened())
        };
        self.confirm(committed).await?;
        self.durable.send_if_modified(|durable| {
            let newer = version > *durable;
            if newer {
                *durable = version;
            }
            newer
        });
        Ok(())
    }

    /// Whether the lease numbered `version` is on disk, committing it when nobody else
    /// does within [`LEASE_COMMIT_WAIT`]. `false`: the store cannot record it.
    async fn lease_durable(&self, version: u64, opened_it: bool) -> bool {
        if *self.durable.borrow() >= version {
            return true;
        }
        if !opened_it {
            let mut durable = self.durable.subscribe();
            let waited =
                tokio::time::timeout(LEASE_COMMIT_WAIT, durable.wait_for(|d| *d >= version)).await;
            if matches!(waited, Ok(Ok(_))) {
                return true;
            }
        }
        self.persist(false).await.is_ok() && *self.durable.borrow() >= version
    }

    async fn commit(&self, batch: Batch) -> Result<(), crate::store::CommitError> {
        self.confirm(self.store.commit(batch)).await
    }

    /// Waits for a batch handed to the store, and notes whether the store works.
    async fn confirm(
        &self,
        committed: impl Future<Output = Result<(), crate::store::CommitError>>,
    ) -> Result<(), crate::store::CommitError> {
        let result = committed.await;
        let ok = result.is_ok();
        if self.store_usable.swap(ok, Ordering::Relaxed) != ok {
            self.changed();
        }
        result
    }

    /// An operator's reset: reads the key file again and clears the key's state.
    pub async fn reset(&self, label: &str) -> Result<(), ResetError> {
        let (_, key) = self
            .config
            .key(label)
            .ok_or_else(|| ResetError::UnknownKey(label.to_owned()))?;
        let secret = crate::config::load_secret(&key.secret_source).map_err(|source| {
            ResetError::Secret {
                label: label.to_owned(),
                source,
            }
        })?;
        lock(&self.keys).insert(label.to_owned(), secret);
        lock(&self.rotator).reset(label);
        log::info!(event = "key_reset", key = label; "key {label} reset by the operator");
        self.persist(false).await?;
        self.changed();
        Ok(())
    }

    /// Takes one delivery from the broker. Spawned once per publish.
    pub async fn take(self: Arc<Self>, received: Received) {
        let max = self.config.mqtt.max_payload_bytes;
        let parsed = task::parse(&received.publish.payload, max, || {
            uuid::Uuid::new_v4().to_string()
        });
        let task = match parsed {
            Ok(task) => task,
            Err(invalid) => return self.refuse(&received, invalid).await,
        };
        if received
            .correlation_data()
            .is_some_and(|c| c.len() > task::MAX_CORRELATION_BYTES)
        {
            let invalid = task::InvalidTask {
                id: Some(task.id.clone()),
                reply_to: task.reply_to.clone(),
                message: format!(
                    "correlation data longer than {} bytes",
                    task::MAX_CORRELATION_BYTES
                ),
            };
            return self.refuse(&received, invalid).await;
        }
        let reply_topic = match task::reply_topic(
            received.response_topic(),
            task.reply_to.as_deref(),
            &task.id,
            &self.topics,
            self.config.mqtt.allowed_reply_prefixes.as_deref(),
        ) {
            Ok(topic) => topic,
            Err(refused) => {
                log::warn!(event = "reply_refused", task_id = task.id.as_str(); "task dropped: {refused}");
                self.link.ack(&received).await;
                return;
            }
        };
        let correlation = received.correlation_data().cloned();

        // A second delivery of a task being served is acknowledged with the first.
        {
            let mut in_flight = lock(&self.in_flight);
            if let Some(others) = in_flight.get_mut(&task.id) {
                others.push(received);
                return;
            }
            in_flight.insert(task.id.clone(), Vec::new());
        }
        match self.store.answered(&task.id).await {
            Ok(Some(stored)) => {
                log::info!(event = "task_repeat", task_id = task.id.as_str(); "task {} answered before; replying from the store", task.id);
                self.link
                    .publish(&reply_topic, stored, false, correlation)
                    .await;
                self.finish_deliveries(&task.id, Some(&received)).await;
                return;
            }
            Ok(None) => {}
            Err(e) => log::warn!("could not look up task {} in the store: {e}", task.id),
        }

        let received_at = self.clock.now();
        let deadline = received_at + Duration::from_secs(task.deadline_secs);
        let route = self.config.targets_for_model(&task.request.model);
        if route.is_empty() {
            let reply = Reply::error(
                &task.id,
                ErrorCode::NoRoute,
                format!("no provider serves the model {:?}", task.request.model),
            );
            return self
                .answer(&task, reply, &reply_topic, correlation, Some(&received))
                .await;
        }

        // Record the task, then acknowledge: from then on it is ours to answer, even
        // across a restart. The reply may come first, which acknowledges it too.
        let acked = Arc::new(AtomicBool::new(false));
        let record = PendingRecord {
            task: serde_json::from_slice(&received.publish.payload).unwrap_or_default(),
            reply_topic: reply_topic.clone(),
            correlation: correlation.as_ref().map(|c| c.to_vec()),
            deadline_ms: deadline.as_millisecond(),
        };
        {
            let batch = Batch {
                pending_add: vec![PendingTask {
                    id: task.id.clone(),
                    payload: serde_json::to_vec(&record).unwrap_or_default(),
                    received_at_ms: received_at.as_millisecond(),
                }],
                ..Batch::default()
            };
            // The store queues the batch now, before the answer's batch can be queued:
            // a record that landed after its own removal would be served again after a
            // restart.
            let recorded = self.store.commit(batch);
            let relay = self.clone();
            let received = received.clone();
            let acked = acked.clone();
            self.tracker.spawn(async move {
                if recorded.await.is_ok() && !acked.swap(true, Ordering::SeqCst) {
                    relay.link.ack(&received).await;
                }
            });
        }
        let Some(reply) = self.serve(&task, &route, deadline, received_at).await else {
            // Shutting down: a recorded task is answered after the restart; one not yet
            // recorded was not acknowledged, so the broker delivers it again.
            lock(&self.in_flight).remove(&task.id);
            return;
        };
        let first = (!acked.swap(true, Ordering::SeqCst)).then_some(&received);
        self.answer(&task, reply, &reply_topic, correlation, first)
            .await;
    }

    /// Answers a task recorded before a restart.
    pub async fn resume(self: Arc<Self>, pending: PendingTask) {
        let record: PendingRecord = match serde_json::from_slice(&pending.payload) {
            Ok(r) => r,
            Err(e) => {
                log::error!(
                    "a recorded task ({}) cannot be read back and is dropped: {e}",
                    pending.id
                );
                return self.forget_pending(&pending.id).await;
            }
        };
        let payload = serde_json::to_vec(&record.task).unwrap_or_default();
        let task = match task::parse(&payload, usize::MAX, || pending.id.clone()) {
            Ok(t) => t,
            Err(e) => {
                log::error!(
                    "a recorded task ({}) is no longer valid and is dropped: {e}",
                    pending.id
                );
                return self.forget_pending(&pending.id).await;
            }
        };
        if matches!(self.store.answered(&task.id).await, Ok(Some(_))) {
            return self.forget_pending(&task.id).await;
        }
        lock(&self.in_flight).insert(task.id.clone(), Vec::new());
        let correlation = record.correlation.map(Bytes::from);
        let deadline =
            Timestamp::from_millisecond(record.deadline_ms).unwrap_or_else(|_| self.clock.now());
        let received_at = Timestamp::from_millisecond(pending.received_at_ms)
            .unwrap_or_else(|_| self.clock.now());
        let route = self.config.targets_for_model(&task.request.model);
        let reply = if route.is_empty() {
            Some(Reply::error(
                &task.id,
                ErrorCode::NoRoute,
                format!("no provider serves the model {:?}", task.request.model),
            ))
        } else {
            self.serve(&task, &route, deadline, received_at).await
        };
        match reply {
            Some(reply) => {
                self.answer(&task, reply, &record.reply_topic, correlation, None)
                    .await
            }
            None => {
                lock(&self.in_flight).remove(&task.id);
            }
        }
    }

    async fn forget_pending(&self, id: &str) {
        let batch = Batch {
            pending_remove: vec![id.to_owned()],
            ..Batch::default()
        };
        if let Err(e) = self.commit(batch).await {
            log::warn!("could not drop task {id} from the store: {e}");
        }
    }

    /// Answers a payload that is not a valid task, where the client can hear it.
    async fn refuse(&self, received: &Received, invalid: task::InvalidTask) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let id = invalid.id.clone().unwrap_or_default();
        log::warn!(event = "task_invalid", task_id = id.as_str(); "invalid task: {}", invalid.message);
        let topic = match (
            received.response_topic(),
            invalid.reply_to.as_deref(),
            invalid.id.as_deref(),
        ) {
            (None, None, None) => None,
            (rt, reply_to, id) => task::reply_topic(
                rt,
                reply_to,
                id.unwrap_or_default(),
                &self.topics,
                self.config.mqtt.allowed_reply_prefixes.as_deref(),
            )
            .ok(),
        };
        if let Some(topic) = topic {
            let correlation = received
                .correlation_data()
                .filter(|c| c.len() <= task::MAX_CORRELATION_BYTES)
                .cloned();
            let reply = Reply::error(&id, ErrorCode::InvalidRequest, invalid.message);
            self.link
                .publish(&topic, reply.to_json(), false, correlation)
                .await;
        }
        self.link.ack(received).await;
    }

    /// Publishes the reply, acknowledges every delivery of the task, records the answer.
    async fn answer(
        &self,
        task: &Task,
        reply: Reply,
        topic: &str,
        correlation: Option<Bytes>,
        first: Option<&Received>,
    ) {
        let counter = if reply.is_ok() {
            &self.stats.ok
        } else {
            &self.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let json = reply.to_json();
        match &reply.error {
            None => log::info!(
                event = "task_done", task_id = task.id.as_str(), key = reply.key.as_deref().unwrap_or_default(),
                provider = reply.provider.as_deref().unwrap_or_default(), model = reply.model.as_deref().unwrap_or_default();
                "task {} answered", task.id
            ),
            Some(e) => {
                log::info!(event = "task_failed", task_id = task.id.as_str(); "task {} failed: {:?}: {}", task.id, e.code, e.message)
            }
        }
        let batch = Batch {
            pending_remove: vec![task.id.clone()],
            answered: vec![Answered {
                id: task.id.clone(),
                reply: json.clone(),
                at_ms: self.clock.now().as_millisecond(),
            }],
            ..Batch::default()
        };
        // Queued before the task leaves `in_flight`: a redelivery arriving meanwhile
        // finds the answer in the store's queue and is not sent to a provider again.
        let recorded = self.store.commit(batch);
        self.link.publish(topic, json, false, correlation).await;
        self.finish_deliveries(&task.id, first).await;
        if let Err(e) = recorded.await {
            log::warn!("could not record the answer to task {}: {e}", task.id);
        }
        self.changed();
    }

    async fn finish_deliveries(&self, id: &str, first: Option<&Received>) {
        let others = lock(&self.in_flight).remove(id).unwrap_or_default();
        for received in first.into_iter().chain(others.iter()) {
            self.link.ack(received).await;
        }
    }

    /// Runs a task until it has a reply, or `None` when the daemon stops first.
    async fn serve(
        &self,
        task: &Task,
        route: &[Target],
        deadline: Timestamp,
        received_at: Timestamp,
    ) -> Option<Reply> {
        let cost = Cost::estimate(&task.request);
        // One copy per task, not per call: each call only changes its model.
        let mut request = task.request.clone();
        let mut attempt = Attempt::new();
        let mut queued = Duration::ZERO;
        let started = Instant::now();
        loop {
            let now = self.clock.now();
            if now >= deadline {
                return Some(self.deadline_reply(task, received_at));
            }
            let synced = self.clock.synchronised();
            let plan = lock(&self.rotator).plan(route, cost, &attempt, now, deadline, synced);
            match plan {
                Plan::Call(call) => {
                    if !self
                        .lease_durable(call.reservation.lease(), call.needs_commit)
                        .await
                    {
                        // Nothing is spent that the store cannot remember.
                        lock(&self.rotator).release(&call);
                        self.pause(STORE_RETRY, deadline).await?;
                        continue;
                    }
                    let Some(client) = self.providers.get(&call.provider) else {
                        lock(&self.rotator).release(&call);
                        return Some(Reply::error(
                            &task.id,
                            ErrorCode::NoRoute,
                            format!("provider {} is not configured", call.provider),
                        ));
                    };
                    let Some(secret) = lock(&self.keys).get(&call.label).cloned() else {
                        lock(&self.rotator).release(&call);
                        continue;
                    };
                    request.model.clone_from(&call.model);
                    let outcome = client.chat(&secret, &request).await;
                    self.stats.provider_calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(failure) = &outcome.result {
                        if matches!(failure, Failure::RateLimited { .. }) {
                            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        }
                        log::warn!(
                            event = "provider_failure", task_id = task.id.as_str(), key = call.label.as_str(),
                            provider = call.provider.as_str(), model = call.model.as_str();
                            "{} via {}: {failure}", call.provider, call.label
                        );
                    }
                    let now = self.clock.now();
                    let next = lock(&self.rotator).record(
                        &call,
                        &outcome,
                        &mut attempt,
                        now,
                        self.clock.synchronised(),
                        fastrand::f64(),
                    );
                    self.changed();
                    match (next, outcome.result) {
                        (Next::Done, Ok(completion)) => {
                            let served = Served {
                                provider: call.provider.clone(),
                                model: call.model.clone(),
                                key: call.label.clone(),
                                usage: completion.usage,
                                attempts: attempt.attempts,
                                queued_ms: millis(queued),
                                latency_ms: millis(started.elapsed()),
                            };
                            return Some(Reply::ok(&task.id, completion.content, served));
                        }
                        (Next::Done, Err(_)) | (Next::TryNext, _) => {}
                        (Next::RetryAfter(delay), _) => {
                            self.pause(delay, deadline).await?;
                        }
                        (Next::Fail { code, message }, _) => {
                            let code = match code {
                                FailCode::UpstreamRejected => ErrorCode::UpstreamRejected,
                                FailCode::UpstreamError => ErrorCode::UpstreamError,
                            };
                            return Some(Reply::error(&task.id, code, message));
                        }
                    }
                }
                Plan::Wait { until } => {
                    if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.config.routing.max_queue
                    {
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                        let reply = Reply::error(
                            &task.id,
                            ErrorCode::BudgetExhausted,
                            "the queue of tasks waiting for budget is full",
                        )
                        .retry_after(Some(secs_until(now, until)));
                        return Some(reply);
                    }
                    self.changed();
                    let t0 = Instant::now();
                    let woke = self.wait_for_budget(until, deadline).await;
                    queued += t0.elapsed();
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.changed();
                    woke?;
                }
                Plan::Exhausted {
                    retry_after,
                    message,
                } => {
                    return Some(
                        Reply::error(&task.id, ErrorCode::BudgetExhausted, message).retry_after(
                            retry_after.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                        ),
                    );
                }
            }
        }
    }

    fn deadline_reply(&self, task: &Task, received_at: Timestamp) -> Reply {
        Reply::error(
            &task.id,
            ErrorCode::DeadlineExceeded,
            format!(
                "the task's deadline of {} s passed (taken at {received_at})",
                task.deadline_secs
            ),
        )
    }

    /// Sleeps up to `delay`, never past the deadline; `None` when the daemon stops.
    async fn pause(&self, delay: Duration, deadline: Timestamp) -> Option<()> {
        let left = duration_until(self.clock.now(), deadline);
        tokio::select! {
            () = self.stopping.cancelled() => None,
            () = tokio::time::sleep(delay.min(left)) => Some(()),
        }
    }

    /// Waits until `until`, a wake-up, or the deadline; `None` when the daemon stops.
    async fn wait_for_budget(&self, until: Timestamp, deadline: Timestamp) -> Option<()> {
        let mut changes = self.watch_changes();
        let now = self.clock.now();
        let wait = duration_until(now, until.min(deadline)).min(WAIT_SLICE);
        tokio::select! {
            () = self.stopping.cancelled() => None,
            _ = changes.changed() => Some(()),
            () = tokio::time::sleep(wait) => Some(()),
        }
    }

    /// Takes tasks from the broker until stopped; each runs as its own tracked task.
    pub async fn intake(self: Arc<Self>, mut tasks: tokio::sync::mpsc::Receiver<Received>) {
        loop {
            let received = tokio::select! {
                () = self.stopping.cancelled() => break,
                r = tasks.recv() => match r { Some(r) => r, None => break },
            };
            self.tracker.spawn(self.clone().take(received));
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn duration_until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// Whole seconds from `now` to `then`, rounded up.
fn secs_until(now: Timestamp, then: Timestamp) -> u64 {
    let d = duration_until(now, then);
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
