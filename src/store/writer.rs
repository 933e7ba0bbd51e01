//! The store's thread: it owns the database and runs every transaction. Batches sent close
//! together share one write transaction (the commit policy is [`COMMIT_INTERVAL`]); when a commit
//! fails, the thread keeps what it held, answers every waiter with the error, and reopens the
//! file with a backoff until it can write it again.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use redb::Database;
use tokio::sync::oneshot;

use super::answered::{self, ANSWER_TTL_MS};
use super::batch::{Batch, Merged};
use super::error::{CommitError, LookupError, PANICKED, ReopenError, panicked};
use super::open::{Opener, open_checked};
use super::{Shared, tables};

/// Least time between the starts of two commits. Each commit is one fsync and about 20 KB
/// written, so under load the card sees about one per interval; the first commit after a quiet
/// interval goes at once, so a lone task does not wait. It is also the longest a task waits, under
/// load, for its record to be durable (and so for its PUBACK). A little over a second, so
/// that steady load, which also gets the at-once commit after each lull, stays under one
/// fsync per second.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(1250);

/// First wait before reopening the file after a failed commit; doubled on each failed attempt.
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Longest wait between two automatic reopen attempts: an operator who frees the disk
/// sees keyrelay carry on within this, and a failed attempt costs only an open.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(15);

/// What a [`Store`](super::Store) handle asks of the thread.
pub(super) enum Command {
    Commit {
        batch: Batch,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    Flush(oneshot::Sender<Result<(), CommitError>>),
    Close(oneshot::Sender<Result<(), CommitError>>),
    Lookup {
        id: String,
        reply: oneshot::Sender<Result<Option<Vec<u8>>, LookupError>>,
    },
    Reopen(oneshot::Sender<Result<(), ReopenError>>),
}

enum DbState {
    Open(Database),
    /// A commit failed; the database handle is closed (redb wants a reopen after an I/O error).
    Broken {
        cause: String,
        retry_at: Instant,
        backoff: Duration,
    },
    Closed,
}

enum Flow {
    Continue,
    Stop,
}

/// The store's thread: owns the database and runs every transaction.
struct Worker {
    path: PathBuf,
    opener: Opener,
    state: DbState,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    /// Everything not yet durable, including what failed commits left behind.
    pending: Merged,
    waiters: Vec<oneshot::Sender<Result<(), CommitError>>>,
    /// Caller batches in `pending` whose callers wait, for the stats.
    pending_batches: u64,
    /// When `pending` is to be committed.
    due: Option<Instant>,
    last_commit: Option<Instant>,
}

/// Starts the store's thread on the opened `db`; returns the channel its handles send on.
pub(super) fn spawn(
    path: PathBuf,
    opener: Opener,
    db: Database,
    shared: Arc<Shared>,
) -> std::io::Result<mpsc::Sender<Command>> {
    let (commands, receiver) = mpsc::channel();
    let worker = Worker {
        path,
        opener,
        state: DbState::Open(db),
        shared,
        commands: receiver,
        pending: Merged::default(),
        waiters: Vec::new(),
        pending_batches: 0,
        due: None,
        last_commit: None,
    };
    thread::Builder::new()
        .name("keyrelay-store".to_owned())
        .spawn(move || worker.run())?;
    Ok(commands)
}

impl Drop for Worker {
    fn drop(&mut self) {
        // However the thread ends, including a panic, nothing more becomes durable.
        self.shared.usable.store(false, Ordering::Release);
    }
}

impl Worker {
    fn run(mut self) {
        loop {
            let first = match self.wake_at() {
                None => match self.commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                },
                Some(at) => {
                    match self
                        .commands
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if let Some(command) = first
                && let Flow::Stop = self.handle(command)
            {
                return;
            }
            // Take everything already sent, so that batches sent together share one commit.
            let mut disconnected = false;
            loop {
                match self.commands.try_recv() {
                    Ok(command) => {
                        if let Flow::Stop = self.handle(command) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.on_time();
            if disconnected {
                break;
            }
        }
        // Every handle is gone: nobody waits, but what is held is still the callers' latest state.
        if let DbState::Broken { .. } = self.state {
            let _ = self.reopen();
        }
        let _ = self.commit_pending();
    }

    fn wake_at(&self) -> Option<Instant> {
        let retry = match &self.state {
            DbState::Broken { retry_at, .. } => Some(*retry_at),
            DbState::Open(_) | DbState::Closed => None,
        };
        match (self.due, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle(&mut self, command: Command) -> Flow {
        match command {
            Command::Commit { batch, reply } => {
                self.pending.add(batch);
                match &self.state {
                    DbState::Open(_) => {
                        self.waiters.push(reply);
                        self.pending_batches += 1;
                        self.schedule();
                    }
                    // Kept in `pending` for the reopen, but the caller learns now that it is not
                    // durable rather than after a backoff of unknown length.
                    DbState::Broken { cause, .. } => {
                        let _ = reply.send(Err(CommitError::Unusable {
                            path: self.path.clone(),
                            cause: cause.clone(),
                        }));
                    }
                    DbState::Closed => {
                        let _ = reply.send(Err(CommitError::Stopped {
                            path: self.path.clone(),
                        }));
                    }
                }
            }
            Command::Flush(reply) => {
                let result = self.commit_pending();
                let _ = reply.send(result);
            }
            Command::Close(reply) => {
                if let DbState::Broken { .. } = self.state {
                    // One last try, so that what failed before is not lost on a clean stop.
                    let _ = self.reopen();
                }
                let result = self.commit_pending();
                // Dropped before answering, so that the file's lock is free when close() returns.
                self.state = DbState::Closed;
                self.shared.usable.store(false, Ordering::Release);
                let _ = reply.send(result);
                return Flow::Stop;
            }
            Command::Lookup { id, reply } => {
                let _ = reply.send(self.lookup(&id));
            }
            Command::Reopen(reply) => {
                let _ = reply.send(self.reopen());
            }
        }
        Flow::Continue
    }

    fn schedule(&mut self) {
        if self.due.is_none() {
            let now = Instant::now();
            self.due = Some(match self.last_commit {
                Some(last) => (last + COMMIT_INTERVAL).max(now),
                None => now,
            });
        }
    }

    fn on_time(&mut self) {
        let now = Instant::now();
        if let DbState::Broken { retry_at, .. } = self.state
            && now >= retry_at
        {
            let _ = self.reopen();
        }
        if self.due.is_some_and(|due| now >= due) {
            let _ = self.commit_pending();
        }
    }

    /// Writes `pending` in one transaction and answers every waiter with the outcome.
    fn commit_pending(&mut self) -> Result<(), CommitError> {
        self.due = None;
        let waiters = std::mem::take(&mut self.waiters);
        let batches = std::mem::take(&mut self.pending_batches);
        let result = if self.pending.is_empty() {
            Ok(())
        } else {
            self.write_pending()
        };
        if result.is_ok() {
            self.shared.batches.fetch_add(batches, Ordering::Relaxed);
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        result
    }

    fn write_pending(&mut self) -> Result<(), CommitError> {
        let outcome = match &self.state {
            DbState::Open(db) => {
                self.last_commit = Some(Instant::now());
                let pending = &self.pending;
                panic::catch_unwind(AssertUnwindSafe(|| tables::write(db, pending)))
                    .unwrap_or_else(|_| Err(panicked()))
            }
            DbState::Broken { cause, .. } => {
                return Err(CommitError::Unusable {
                    path: self.path.clone(),
                    cause: cause.clone(),
                });
            }
            DbState::Closed => {
                return Err(CommitError::Stopped {
                    path: self.path.clone(),
                });
            }
        };
        match outcome {
            Ok(latest) => {
                self.pending = Merged::default();
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(latest) = latest {
                    self.shared
                        .index()
                        .expire(latest.saturating_sub(ANSWER_TTL_MS));
                }
                Ok(())
            }
            Err(failure) => {
                let cause = failure.detail();
                let error = failure.into_commit_error(&self.path);
                log::error!("{error}");
                self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
                self.shared.usable.store(false, Ordering::Release);
                // Dropping the handle closes the file: after an I/O error redb serves nothing
                // more from it until it is opened again.
                self.state = DbState::Broken {
                    cause,
                    retry_at: Instant::now() + REOPEN_BACKOFF_FIRST,
                    backoff: REOPEN_BACKOFF_FIRST,
                };
                Err(error)
            }
        }
    }

    fn reopen(&mut self) -> Result<(), ReopenError> {
        let backoff = match &self.state {
            DbState::Open(_) => return Ok(()),
            DbState::Closed => {
                return Err(ReopenError::Stopped {
                    path: self.path.clone(),
                });
            }
            DbState::Broken { backoff, .. } => *backoff,
        };
        match open_checked(&self.path, &mut self.opener, false) {
            Ok((db, _, _)) => {
                log::info!(
                    "the state file {} is writable again; carrying on",
                    self.path.display()
                );
                self.state = DbState::Open(db);
                self.shared.usable.store(true, Ordering::Release);
                if !self.pending.is_empty() {
                    // What failed before is written at once: until it is, the file may hold rows
                    // older than the callers' state.
                    self.due = Some(Instant::now());
                }
                Ok(())
            }
            Err(error) => {
                let backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
                log::warn!("{error}; retrying in {} s", backoff.as_secs());
                self.state = DbState::Broken {
                    cause: error.to_string(),
                    retry_at: Instant::now() + backoff,
                    backoff,
                };
                Err(error.into())
            }
        }
    }

    fn lookup(&self, id: &str) -> Result<Option<Vec<u8>>, LookupError> {
        let cutoff = self.shared.answer_cutoff();
        if let Some((at, reply)) = self.pending.answered.get(id) {
            return Ok((*at >= cutoff).then(|| reply.clone()));
        }
        let db = match &self.state {
            DbState::Open(db) => db,
            DbState::Broken { cause, .. } => {
                return Err(LookupError::Unusable {
                    path: self.path.clone(),
                    cause: cause.clone(),
                });
            }
            DbState::Closed => {
                return Err(LookupError::Stopped {
                    path: self.path.clone(),
                });
            }
        };
        let read = || answered::read_reply(db, id, cutoff);
        panic::catch_unwind(AssertUnwindSafe(read))
            .unwrap_or_else(|_| Err(redb::Error::Corrupted(PANICKED.to_owned())))
            .map_err(|e| LookupError::Read {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{open, row, task};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_batches_share_few_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..200 {
            let store = store.clone();
            callers.spawn(async move {
                store
                    .commit(Batch {
                        rows: vec![row(&format!("row/{i:03}"), &[1, 2, 3])],
                        pending_add: vec![task(&format!("task/{i:03}"), i)],
                        ..Batch::default()
                    })
                    .await
            });
        }
        let mut answered = 0;
        while let Some(result) = callers.join_next().await {
            result.unwrap().unwrap();
            answered += 1;
        }
        assert_eq!(answered, 200);
        let stats = store.stats();
        assert_eq!(stats.batches, 200);
        assert!(
            (1..=3).contains(&stats.commits),
            "200 batches took {} commits",
            stats.commits
        );
        store.close().await.unwrap();

        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.rows.len(), 200);
        assert_eq!(loaded.pending.len(), 200);
    }
}
