//! The state file, `{state_dir}/keyrelay.redb`, and the only module that touches redb.
//!
//! It keeps opaque bytes for the rest of the daemon and does not know their meaning: rows
//! (the ledger's and rotator's state, latest value per key), records of tasks taken but not
//! yet answered, the replies of tasks answered in the last [`ANSWER_TTL_MS`], and the latest
//! wall time the clock has recorded. One dedicated thread owns the database; async callers hand
//! it [`Batch`]es and await their durability. Batches that arrive close together share one
//! write transaction, so the SD card sees about one fsync per [`COMMIT_INTERVAL`] however many
//! tasks flow.
//!
//! A file that is not keyrelay's, or is damaged, is refused at open with an error naming it and
//! saying what to do; it is never reset. When a commit fails (a full disk, an I/O error) every
//! caller waiting on it gets the error, [`Store::usable`] turns false and the store keeps what
//! it could not write: it reopens the file on its own with a backoff ([`Store::reopen`] tries at
//! once) and writes it with the next commit. A failed batch is therefore "not known durable",
//! never "discarded"; every change is idempotent, so writing it late is safe.
//!
//! # Layout
//! - this file: the [`Store`] handle that async callers hold, and its API;
//! - `batch`: what callers hand in ([`Batch`]) and get back at open ([`Loaded`]);
//! - `open`: opening the file or a storage backend, checking it is keyrelay's, loading it;
//! - `writer`: the thread that owns the database: group commit, failures and reopening;
//! - `tables`: the file's layout and the write transaction;
//! - `answered`: answered task ids, their index in memory and their expiry;
//! - `error`: one error type per operation, written for the operator;
//! - `faults` (tests only): disks that fill up or lose power, behind the storage seam.

mod answered;
mod batch;
mod error;
mod open;
mod tables;
mod writer;

#[cfg(test)]
mod faults;
#[cfg(test)]
mod test_support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};

use tokio::sync::oneshot;

pub use answered::ANSWER_TTL_MS;
pub use batch::{Answered, Batch, Loaded, PendingTask};
pub use error::{CommitError, LookupError, OpenError, ReopenError};
pub use writer::COMMIT_INTERVAL;

use answered::AnsweredIndex;
use writer::Command;

/// The state file's name inside `state_dir`.
pub const FILE_NAME: &str = "keyrelay.redb";

/// Counters for benchmarks and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions made durable.
    pub commits: u64,
    /// Caller batches made durable; `batches / commits` is how much group commit saved.
    pub batches: u64,
    /// Write transactions that failed, each of which made the store unusable for a while.
    pub failed_commits: u64,
}

/// A handle on the store's thread; cheap to clone. When the last handle is dropped the thread
/// commits what it still holds and closes the file; [`Store::close`] does the same and says when
/// it is done.
#[derive(Clone)]
pub struct Store {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("usable", &self.usable())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Makes `batch` durable, sharing the write transaction with the batches sent around the same
    /// time; resolves once it is on disk, or with the error that stopped it.
    ///
    /// The batch is handed to the store's thread when this is called, not when the future is
    /// first polled: batches are applied in the order of the calls, and dropping the future only
    /// loses the confirmation, never the batch.
    pub fn commit(
        &self,
        batch: Batch,
    ) -> impl Future<Output = Result<(), CommitError>> + Send + 'static {
        // Noted before sending, so that a lookup made after this call sees the batch whether or
        // not its commit is done.
        if let Some(time) = batch.latest_time() {
            self.shared.latest_time_ms.fetch_max(time, Ordering::AcqRel);
        }
        {
            let mut index = self.shared.index();
            for answered in &batch.answered {
                index.insert(&answered.id, answered.at_ms);
            }
        }
        let (reply, confirmed) = oneshot::channel();
        let sent = self.commands.send(Command::Commit { batch, reply }).is_ok();
        let path = self.shared.path.clone();
        async move {
            if !sent {
                return Err(CommitError::Stopped { path });
            }
            confirmed
                .await
                .unwrap_or(Err(CommitError::Stopped { path }))
        }
    }

    /// Commits what the store holds now, without waiting for [`COMMIT_INTERVAL`]; for shutdown.
    pub async fn flush(&self) -> Result<(), CommitError> {
        let (reply, done) = oneshot::channel();
        self.request(Command::Flush(reply), done)
            .await
            .unwrap_or_else(|| Err(self.stopped_commit()))
    }

    /// Commits what the store holds, closes the file and stops the thread. Every handle fails
    /// with `Stopped` afterwards. The file is released when this returns, so another process may
    /// open it.
    pub async fn close(&self) -> Result<(), CommitError> {
        let (reply, done) = oneshot::channel();
        self.request(Command::Close(reply), done)
            .await
            .unwrap_or_else(|| Err(self.stopped_commit()))
    }

    /// The stored reply of task `id` if it was answered within [`ANSWER_TTL_MS`] of the latest
    /// time the store has been given (see [`Batch::latest_time_ms`]), including by a batch sent
    /// but not yet durable.
    ///
    /// Ids never answered are told from memory at once; only a hit reads the file.
    pub async fn answered(&self, id: &str) -> Result<Option<Vec<u8>>, LookupError> {
        if !self
            .shared
            .index()
            .answered_since(id, self.shared.answer_cutoff())
        {
            return Ok(None);
        }
        let (reply, found) = oneshot::channel();
        let lookup = Command::Lookup {
            id: id.to_owned(),
            reply,
        };
        self.request(lookup, found).await.unwrap_or_else(|| {
            Err(LookupError::Stopped {
                path: self.shared.path.clone(),
            })
        })
    }

    /// Tries at once to reopen the file after a failed commit; a no-op while the store is usable.
    /// The store also retries on its own, first after a second and then backing off to once a
    /// minute; this is for a caller that should not wait for that, such as an operator's request.
    pub async fn reopen(&self) -> Result<(), ReopenError> {
        let (reply, done) = oneshot::channel();
        self.request(Command::Reopen(reply), done)
            .await
            .unwrap_or_else(|| {
                Err(ReopenError::Stopped {
                    path: self.shared.path.clone(),
                })
            })
    }

    /// False from a failed commit until the file is reopened, and once the store has stopped:
    /// nothing recorded in that time is durable, so nothing should be spent.
    pub fn usable(&self) -> bool {
        self.shared.usable.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            failed_commits: self.shared.failed_commits.load(Ordering::Relaxed),
        }
    }

    /// The state file, for messages.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Sends `command` and waits for its answer; `None` if the thread has stopped.
    async fn request<T>(&self, command: Command, answer: oneshot::Receiver<T>) -> Option<T> {
        self.commands.send(command).ok()?;
        answer.await.ok()
    }

    fn stopped_commit(&self) -> CommitError {
        CommitError::Stopped {
            path: self.shared.path.clone(),
        }
    }
}

/// What the handles and the thread share.
struct Shared {
    path: PathBuf,
    usable: AtomicBool,
    commits: AtomicU64,
    batches: AtomicU64,
    failed_commits: AtomicU64,
    /// The greatest time given to the store, or [`NO_TIME`].
    latest_time_ms: AtomicI64,
    index: Mutex<AnsweredIndex>,
}

/// `latest_time_ms` before any time is known.
const NO_TIME: i64 = i64::MIN;

impl Shared {
    /// Answers at or after this time count as answered "in the last 24 h".
    fn answer_cutoff(&self) -> i64 {
        match self.latest_time_ms.load(Ordering::Acquire) {
            NO_TIME => NO_TIME,
            latest => latest.saturating_sub(ANSWER_TTL_MS),
        }
    }

    fn index(&self) -> MutexGuard<'_, AnsweredIndex> {
        // The index is a hint rebuilt from plain inserts; a panic elsewhere cannot leave it in a
        // state worse than missing an id, which the file still has.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::test_support::{answer, commit_now, open, reply_to, row, task};
    use super::*;

    #[tokio::test]
    async fn what_was_committed_is_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let (store, loaded) = Store::open(&state_dir.join(FILE_NAME)).unwrap();
        assert_eq!(loaded, Loaded::default());
        let mode = std::fs::metadata(&state_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(store.path(), state_dir.join(FILE_NAME));

        store
            .commit(Batch {
                rows: vec![row("key/groq-1", b"one"), row("key/groq-2", b"two")],
                pending_add: vec![task("t1", 10), task("t2", 20), task("t3", 5)],
                answered: vec![answer("a1", 1_000)],
                latest_time_ms: Some(1_000),
                ..Batch::default()
            })
            .await
            .unwrap();
        let later = Batch {
            rows: vec![row("key/groq-1", b"one, later")],
            pending_remove: vec!["t1".to_owned()],
            latest_time_ms: Some(2_000),
            ..Batch::default()
        };
        commit_now(&store, later).await.unwrap();
        // A time older than the latest recorded does not move it back.
        let earlier = Batch {
            latest_time_ms: Some(1_500),
            ..Batch::default()
        };
        commit_now(&store, earlier).await.unwrap();
        store.close().await.unwrap();
        assert!(!store.usable());

        let (store, loaded) = open(&state_dir);
        let rows: BTreeMap<String, Vec<u8>> =
            [row("key/groq-1", b"one, later"), row("key/groq-2", b"two")]
                .into_iter()
                .collect();
        assert_eq!(loaded.rows, rows);
        assert_eq!(loaded.pending, vec![task("t3", 5), task("t2", 20)]);
        assert_eq!(loaded.latest_time_ms, Some(2_000));
        assert_eq!(store.answered("a1").await.unwrap(), reply_to("a1"));
        assert_eq!(store.answered("t2").await.unwrap(), None);
        assert!(store.usable());
    }
}
