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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{DirBuilder, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use redb::backends::FileBackend;
use redb::{
    Builder, Database, Durability, MultimapTableHandle, ReadOnlyTable, ReadTransaction,
    ReadableDatabase, ReadableTable, StorageBackend, TableDefinition, TableError, TableHandle,
};
use tokio::sync::oneshot;

/// The state file's name inside `state_dir`.
pub const FILE_NAME: &str = "keyrelay.redb";

/// Least time between the starts of two commits. Each commit is one fsync and about 20 KB
/// written, so under load the card sees about one per interval; the first commit after a quiet
/// interval goes at once, so a lone task does not wait. It is also the longest a task waits, under
/// load, for its record to be durable (and so for its PUBACK). A little over a second, so
/// that steady load, which also gets the at-once commit after each lull, stays under one
/// fsync per second.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(1250);

/// How long an answered task id is remembered (SPEC §3: answered again, never re-run, within 24 h).
pub const ANSWER_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// Most expired answered records removed by one commit, so that a commit after a long pause
/// does not turn into one huge transaction. At one commit a second this removes far more records
/// than any key pool can answer.
const EXPIRE_PER_COMMIT: usize = 1000;

/// First wait before reopening the file after a failed commit; doubled on each failed attempt.
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Longest wait between two automatic reopen attempts: an operator who frees the disk
/// sees keyrelay carry on within this, and a failed attempt costs only an open.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(15);

/// redb's page cache. The state is small; redb's default (1 GiB) is sized for servers, not a Pi.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Marks the file as keyrelay's, so that another program's redb file is never taken for an empty
/// state.
const SCHEMA_NAME: &str = "keyrelay-state";

/// The layout of the tables below. A file of a newer version is refused, never rewritten.
const FORMAT_VERSION: u32 = 1;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const META_SCHEMA: &str = "schema";
const META_VERSION: &str = "version";
const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows");
/// Task id → (received at, payload).
const PENDING: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("pending");
/// Task id → (answered at, reply).
const ANSWERED: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("answered");
/// (answered at, task id): the answered records in the order they expire.
const ANSWERED_BY_TIME: TableDefinition<(i64, &str), ()> = TableDefinition::new("answered_by_time");
const CLOCK: TableDefinition<&str, i64> = TableDefinition::new("clock");
const CLOCK_LATEST: &str = "latest_time_ms";

/// What the operator reads when the file cannot be used as it is.
const MOVE_ASIDE: &str = "stop keyrelay, move the file aside (keep it for a bug report) and start \
     keyrelay again: it then starts with an empty state, and may spend again up to a day of \
     each key's budget that the old file had counted";

/// A task taken and durably recorded but not yet answered. The payload is the caller's
/// encoding (reply topic, correlation data, deadline, the task itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    pub id: String,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
}

/// A task answered: its id is deduplicated for [`ANSWER_TTL_MS`] and `reply` sent again on a
/// redelivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub id: String,
    pub reply: Vec<u8>,
    pub at_ms: i64,
}

/// One caller's changes, made durable together with whatever other batches share the commit.
///
/// Within a batch, `pending_add` applies before `pending_remove` (a task taken and answered in
/// the same batch leaves no record); across batches, the later one wins for each row and task id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Rows to insert or replace, by key.
    pub rows: Vec<(String, Vec<u8>)>,
    pub pending_add: Vec<PendingTask>,
    /// Ids of recorded tasks that no longer need answering after a restart.
    pub pending_remove: Vec<String>,
    pub answered: Vec<Answered>,
    /// The wall time the batch was made at, from the clock that never runs backwards.
    ///
    /// The store reads no clock. Its idea of now is the greatest time it has been given, here
    /// or as an `at_ms` or `received_at_ms`: it returns it at open, expires answered records
    /// older than it by [`ANSWER_TTL_MS`], and judges [`Store::answered`] by it.
    pub latest_time_ms: Option<i64>,
}

impl Batch {
    /// The greatest time the batch carries.
    fn latest_time(&self) -> Option<i64> {
        let answered = self.answered.iter().map(|a| a.at_ms);
        let received = self.pending_add.iter().map(|t| t.received_at_ms);
        answered.chain(received).chain(self.latest_time_ms).max()
    }
}

/// Everything the file held at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    pub rows: BTreeMap<String, Vec<u8>>,
    /// Tasks recorded and not answered, oldest first.
    pub pending: Vec<PendingTask>,
    pub latest_time_ms: Option<i64>,
}

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

/// The state file cannot be opened (or reopened) as keyrelay's state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("cannot create the state directory {}: {source}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state file {} is not a redb database ({detail}); {}", .path.display(), MOVE_ASIDE)]
    NotRedb { path: PathBuf, detail: String },
    #[error(
        "the state file {} is a redb database but not keyrelay's state ({found}); {}",
        .path.display(),
        MOVE_ASIDE
    )]
    Foreign { path: PathBuf, found: String },
    #[error(
        "the state file {} was written by a newer keyrelay (state format {found}, this one reads \
         format {FORMAT_VERSION}); run that keyrelay again, or {}",
        .path.display(),
        MOVE_ASIDE
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("the state file {} is corrupted ({detail}); {}", .path.display(), MOVE_ASIDE)]
    Corrupted { path: PathBuf, detail: String },
    #[error(
        "the state file {} is in use by another process; is another keyrelay running with the \
         same state_dir?",
        .path.display()
    )]
    InUse { path: PathBuf },
    #[error("cannot read or write the state file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the state file {}: {detail}", .path.display())]
    Other { path: PathBuf, detail: String },
    #[error("cannot start the thread that writes the state file {}: {source}", .path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A batch is not (yet) durable. Its callers must not acknowledge what it records; the store
/// keeps its contents and writes them with the next commit that succeeds.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    #[error(
        "cannot write the state file {}: {source}; keyrelay spends nothing until it can write it \
         again, and retries on its own (is its file system full or failing?)",
        .path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("the state file {} is corrupted ({detail}); {}", .path.display(), MOVE_ASIDE)]
    Corrupted { path: PathBuf, detail: String },
    #[error("cannot write the state file {}: {detail}", .path.display())]
    Other { path: PathBuf, detail: String },
    #[error(
        "the state file {} cannot be written since an earlier failure ({cause}); the batch is kept \
         and written once the file can be reopened, which keyrelay retries on its own",
        .path.display()
    )]
    Unusable { path: PathBuf, cause: String },
    #[error("the state store of {} has stopped", .path.display())]
    Stopped { path: PathBuf },
}

/// An answered task id could not be looked up.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    #[error("cannot read the state file {}: {detail}", .path.display())]
    Read { path: PathBuf, detail: String },
    #[error(
        "the state file {} cannot be read since an earlier failure ({cause})",
        .path.display()
    )]
    Unusable { path: PathBuf, cause: String },
    #[error("the state store of {} has stopped", .path.display())]
    Stopped { path: PathBuf },
}

/// The file could not be reopened after a failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReopenError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("the state store of {} has stopped", .path.display())]
    Stopped { path: PathBuf },
}

/// Any error of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Reopen(#[from] ReopenError),
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
    /// Opens the state file at `path` (`{state_dir}/`[`FILE_NAME`]), creating its directory
    /// (mode 0700) and an empty state if there is none, and loads everything it holds.
    ///
    /// Blocks: it checks every page's checksum and reads the whole file, so call it from
    /// `spawn_blocking`. A file that is not keyrelay's state, or is corrupted, is refused with an
    /// error that names it and says what to do; it is never reset.
    pub fn open(path: &Path) -> Result<(Store, Loaded), OpenError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            // The file records which keys are spent; nobody else on the box needs to read it.
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| OpenError::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        }
        let path = path.to_path_buf();
        let file_path = path.clone();
        let opener = move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&file_path)
                .map_err(|source| OpenError::Io {
                    path: file_path.clone(),
                    source,
                })?;
            let backend = FileBackend::new(file).map_err(|e| classify_open(&file_path, e))?;
            builder()
                .create_with_backend(backend)
                .map_err(|e| classify_open(&file_path, e))
        };
        Self::start(path, Box::new(opener))
    }

    /// Opens a store on any redb storage backend: the seam for crash and full-disk tests.
    /// `backend` is called again for each reopen after a failure; `path_for_messages` only names
    /// the state in errors and logs. Blocks, like [`Store::open`].
    pub fn open_with_backend<B, F>(
        path_for_messages: &Path,
        mut backend: F,
    ) -> Result<(Store, Loaded), OpenError>
    where
        B: StorageBackend,
        F: FnMut() -> io::Result<B> + Send + 'static,
    {
        let path = path_for_messages.to_path_buf();
        let message_path = path.clone();
        let opener = move || {
            let storage = backend().map_err(|source| OpenError::Io {
                path: message_path.clone(),
                source,
            })?;
            builder()
                .create_with_backend(storage)
                .map_err(|e| classify_open(&message_path, e))
        };
        Self::start(path, Box::new(opener))
    }

    fn start(path: PathBuf, mut opener: Opener) -> Result<(Store, Loaded), OpenError> {
        let (db, loaded, index) = open_checked(&path, &mut opener, true)?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            usable: AtomicBool::new(true),
            commits: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            failed_commits: AtomicU64::new(0),
            latest_time_ms: AtomicI64::new(loaded.latest_time_ms.unwrap_or(NO_TIME)),
            index: Mutex::new(index),
        });
        let (commands, receiver) = mpsc::channel();
        let worker = Worker {
            path: path.clone(),
            opener,
            state: DbState::Open(db),
            shared: Arc::clone(&shared),
            commands: receiver,
            pending: Merged::default(),
            waiters: Vec::new(),
            pending_batches: 0,
            due: None,
            last_commit: None,
        };
        thread::Builder::new()
            .name("keyrelay-store".to_owned())
            .spawn(move || worker.run())
            .map_err(|source| OpenError::Thread { path, source })?;
        Ok((Store { commands, shared }, loaded))
    }

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
            let mut index = self.index();
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
        if !self.index().answered_since(id, self.shared.answer_cutoff()) {
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

    fn index(&self) -> std::sync::MutexGuard<'_, AnsweredIndex> {
        // The index is a hint rebuilt from plain inserts; a panic elsewhere cannot leave it in a
        // state worse than missing an id, which the file still has.
        self.shared
            .index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

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
}

/// Which task ids were answered when, so that the common case, a new id, needs no read of the
/// file. A superset of the file's answered records: a hit is confirmed by the store's thread.
#[derive(Debug, Default)]
struct AnsweredIndex {
    by_id: HashMap<String, i64>,
    by_time: BTreeSet<(i64, String)>,
}

impl AnsweredIndex {
    fn insert(&mut self, id: &str, at_ms: i64) {
        if let Some(previous) = self.by_id.insert(id.to_owned(), at_ms) {
            self.by_time.remove(&(previous, id.to_owned()));
        }
        self.by_time.insert((at_ms, id.to_owned()));
    }

    fn answered_since(&self, id: &str, cutoff_ms: i64) -> bool {
        self.by_id.get(id).is_some_and(|at| *at >= cutoff_ms)
    }

    fn expire(&mut self, cutoff_ms: i64) {
        while let Some((at, _)) = self.by_time.first()
            && *at < cutoff_ms
        {
            if let Some((at, id)) = self.by_time.pop_first()
                && self.by_id.get(&id) == Some(&at)
            {
                self.by_id.remove(&id);
            }
        }
    }
}

type Opener = Box<dyn FnMut() -> Result<Database, OpenError> + Send>;

enum Command {
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

/// The batches not yet durable, merged: later values win per row and per task id.
#[derive(Debug, Default)]
struct Merged {
    rows: BTreeMap<String, Vec<u8>>,
    /// `Some` records the task (received at, payload); `None` removes its record.
    tasks: BTreeMap<String, Option<(i64, Vec<u8>)>>,
    answered: BTreeMap<String, (i64, Vec<u8>)>,
    latest_time_ms: Option<i64>,
}

impl Merged {
    fn add(&mut self, batch: Batch) {
        self.latest_time_ms = later(self.latest_time_ms, batch.latest_time());
        self.rows.extend(batch.rows);
        for task in batch.pending_add {
            self.tasks
                .insert(task.id, Some((task.received_at_ms, task.payload)));
        }
        for id in batch.pending_remove {
            self.tasks.insert(id, None);
        }
        for answered in batch.answered {
            self.answered
                .insert(answered.id, (answered.at_ms, answered.reply));
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.tasks.is_empty()
            && self.answered.is_empty()
            && self.latest_time_ms.is_none()
    }
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
                panic::catch_unwind(AssertUnwindSafe(|| write(db, pending)))
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
                        .index
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
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
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = db.begin_read()?;
            let Some(answered) = open_existing(&txn, ANSWERED)? else {
                return Ok(None);
            };
            let found = answered.get(id)?.and_then(|entry| {
                let (at, reply) = entry.value();
                (at >= cutoff).then(|| reply.to_vec())
            });
            Ok(found)
        };
        panic::catch_unwind(AssertUnwindSafe(read))
            .unwrap_or_else(|_| Err(redb::Error::Corrupted(PANICKED.to_owned())))
            .map_err(|e| LookupError::Read {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }
}

/// Writes `m` in one durable transaction and expires old answered records; returns the latest
/// time now on disk.
fn write(db: &Database, m: &Merged) -> Result<Option<i64>, Failure> {
    let mut txn = db.begin_write().map_err(Failure::from_redb)?;
    txn.set_durability(Durability::Immediate)
        .map_err(Failure::from_redb)?;
    let latest = fill(&txn, m).map_err(Failure::from_redb)?;
    txn.commit().map_err(Failure::from_redb)?;
    Ok(latest)
}

fn fill(txn: &redb::WriteTransaction, m: &Merged) -> Result<Option<i64>, redb::Error> {
    let mut rows = txn.open_table(ROWS)?;
    for (key, value) in &m.rows {
        rows.insert(key.as_str(), value.as_slice())?;
    }
    let mut pending = txn.open_table(PENDING)?;
    for (id, task) in &m.tasks {
        match task {
            Some((at, payload)) => {
                pending.insert(id.as_str(), (*at, payload.as_slice()))?;
            }
            None => {
                pending.remove(id.as_str())?;
            }
        }
    }
    let mut answered = txn.open_table(ANSWERED)?;
    let mut by_time = txn.open_table(ANSWERED_BY_TIME)?;
    for (id, (at, reply)) in &m.answered {
        let previous = answered
            .insert(id.as_str(), (*at, reply.as_slice()))?
            .map(|old| old.value().0);
        if let Some(previous) = previous {
            by_time.remove((previous, id.as_str()))?;
        }
        by_time.insert((*at, id.as_str()), ())?;
    }
    let mut clock = txn.open_table(CLOCK)?;
    let stored = clock.get(CLOCK_LATEST)?.map(|entry| entry.value());
    let latest = later(stored, m.latest_time_ms);
    if let Some(latest) = latest
        && stored != Some(latest)
    {
        clock.insert(CLOCK_LATEST, latest)?;
    }
    if let Some(latest) = latest {
        let cutoff = latest.saturating_sub(ANSWER_TTL_MS);
        let expired = by_time
            .range(..(cutoff, ""))?
            .take(EXPIRE_PER_COMMIT)
            .map(|entry| {
                entry.map(|(key, _)| {
                    let (at, id) = key.value();
                    (at, id.to_owned())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (at, id) in expired {
            by_time.remove((at, id.as_str()))?;
            // The id may have been answered again since; its newer record has its own entry.
            let current = answered.get(id.as_str())?.map(|entry| entry.value().0);
            if current == Some(at) {
                answered.remove(id.as_str())?;
            }
        }
    }
    Ok(latest)
}

fn builder() -> Builder {
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    // Every page's checksum is verified at open, so a file damaged outside redb (a bad SD card)
    // is refused with an error instead of trusted, or making redb panic later.
    builder.set_check_integrity_on_open(true);
    builder
}

/// Opens the database, checks that it is keyrelay's (initialising a new one), and, for a first
/// open, loads it.
fn open_checked(
    path: &Path,
    opener: &mut Opener,
    load_all: bool,
) -> Result<(Database, Loaded, AnsweredIndex), OpenError> {
    let attempt = || -> Result<(Database, Loaded, AnsweredIndex), OpenError> {
        let db = opener()?;
        check_format(&db, path)?;
        let (loaded, index) = if load_all {
            load(&db).map_err(|e| Failure::from_redb(e).into_open_error(path))?
        } else {
            (Loaded::default(), AnsweredIndex::default())
        };
        Ok((db, loaded, index))
    };
    // redb promises errors rather than panics for damaged files with the integrity check on; a
    // panic is still caught, so that a bad file never takes the daemon down without its name.
    panic::catch_unwind(AssertUnwindSafe(attempt)).unwrap_or_else(|_| {
        Err(OpenError::Corrupted {
            path: path.to_path_buf(),
            detail: PANICKED.to_owned(),
        })
    })
}

/// Refuses a redb file that is not keyrelay's state, and initialises an empty one.
fn check_format(db: &Database, path: &Path) -> Result<(), OpenError> {
    let fail = |e: redb::Error| Failure::from_redb(e).into_open_error(path);
    let foreign = |found: String| OpenError::Foreign {
        path: path.to_path_buf(),
        found,
    };
    let txn = db.begin_read().map_err(|e| fail(e.into()))?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => {
            let mut names: Vec<String> = txn
                .list_tables()
                .map_err(|e| fail(e.into()))?
                .map(|table| table.name().to_owned())
                .collect();
            names.extend(
                txn.list_multimap_tables()
                    .map_err(|e| fail(e.into()))?
                    .map(|table| table.name().to_owned()),
            );
            drop(txn);
            if names.is_empty() {
                return initialise(db).map_err(fail);
            }
            return Err(foreign(format!(
                "it has no keyrelay marker; its tables are {}",
                names.join(", ")
            )));
        }
        Err(
            e @ (TableError::TableTypeMismatch { .. }
            | TableError::TableIsMultimap(_)
            | TableError::TypeDefinitionChanged { .. }),
        ) => return Err(foreign(format!("its meta table is not keyrelay's: {e}"))),
        Err(e) => return Err(fail(e.into())),
    };
    let get = |key: &str| -> Result<Option<String>, OpenError> {
        Ok(meta
            .get(key)
            .map_err(|e| fail(e.into()))?
            .map(|value| value.value().to_owned()))
    };
    match get(META_SCHEMA)? {
        Some(schema) if schema == SCHEMA_NAME => {}
        Some(schema) => return Err(foreign(format!("it holds the state of {schema:?}"))),
        None => return Err(foreign("its meta table has no schema name".to_owned())),
    }
    let version = get(META_VERSION)?;
    match version.as_deref().map(str::parse::<u32>) {
        Some(Ok(FORMAT_VERSION)) => Ok(()),
        Some(Ok(found)) if found > FORMAT_VERSION => Err(OpenError::NewerFormat {
            path: path.to_path_buf(),
            found,
        }),
        _ => Err(OpenError::Corrupted {
            path: path.to_path_buf(),
            detail: format!("its state format version is {version:?}"),
        }),
    }
}

fn initialise(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(META_SCHEMA, SCHEMA_NAME)?;
        meta.insert(META_VERSION, FORMAT_VERSION.to_string().as_str())?;
        txn.open_table(ROWS)?;
        txn.open_table(PENDING)?;
        txn.open_table(ANSWERED)?;
        txn.open_table(ANSWERED_BY_TIME)?;
        txn.open_table(CLOCK)?;
    }
    txn.commit()?;
    Ok(())
}

fn load(db: &Database) -> Result<(Loaded, AnsweredIndex), redb::Error> {
    let txn = db.begin_read()?;
    let mut loaded = Loaded::default();
    if let Some(rows) = open_existing(&txn, ROWS)? {
        for entry in rows.iter()? {
            let (key, value) = entry?;
            loaded
                .rows
                .insert(key.value().to_owned(), value.value().to_vec());
        }
    }
    if let Some(pending) = open_existing(&txn, PENDING)? {
        for entry in pending.iter()? {
            let (id, value) = entry?;
            let (received_at_ms, payload) = value.value();
            loaded.pending.push(PendingTask {
                id: id.value().to_owned(),
                payload: payload.to_vec(),
                received_at_ms,
            });
        }
        loaded
            .pending
            .sort_by(|a, b| (a.received_at_ms, &a.id).cmp(&(b.received_at_ms, &b.id)));
    }
    let mut index = AnsweredIndex::default();
    if let Some(by_time) = open_existing(&txn, ANSWERED_BY_TIME)? {
        for entry in by_time.iter()? {
            let (key, _) = entry?;
            let (at, id) = key.value();
            index.insert(id, at);
        }
    }
    if let Some(clock) = open_existing(&txn, CLOCK)? {
        loaded.latest_time_ms = clock.get(CLOCK_LATEST)?.map(|entry| entry.value());
    }
    Ok((loaded, index))
}

/// A table that an older file of the same format may lack is read as empty.
fn open_existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, TableError> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn later(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

const PANICKED: &str = "redb stopped on an inconsistency in the file";

fn panicked() -> Failure {
    Failure::Corrupted(PANICKED.to_owned())
}

/// A redb error, sorted by what the operator has to do about it.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Corrupted(String),
    InUse,
    Other(String),
}

impl Failure {
    fn from_redb(error: impl Into<redb::Error>) -> Self {
        match error.into() {
            redb::Error::Io(e) => Failure::Io(e),
            redb::Error::Corrupted(detail) => Failure::Corrupted(detail),
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => Failure::InUse,
            other => Failure::Other(other.to_string()),
        }
    }

    /// What went wrong, without the file's name or advice, for nesting in another message.
    fn detail(&self) -> String {
        match self {
            Failure::Io(e) => e.to_string(),
            Failure::Corrupted(detail) => format!("the file is corrupted: {detail}"),
            Failure::InUse => "the file is in use by another process".to_owned(),
            Failure::Other(detail) => detail.clone(),
        }
    }

    fn into_open_error(self, path: &Path) -> OpenError {
        let path = path.to_path_buf();
        match self {
            // redb's word for a file without its magic number: not ours to judge further.
            Failure::Io(e) if e.kind() == io::ErrorKind::InvalidData => OpenError::NotRedb {
                path,
                detail: e.to_string(),
            },
            Failure::Io(source) => OpenError::Io { path, source },
            Failure::Corrupted(detail) => OpenError::Corrupted { path, detail },
            Failure::InUse => OpenError::InUse { path },
            Failure::Other(detail) => OpenError::Other { path, detail },
        }
    }

    fn into_commit_error(self, path: &Path) -> CommitError {
        let path = path.to_path_buf();
        match self {
            Failure::Io(source) => CommitError::Io {
                path,
                source: Arc::new(source),
            },
            Failure::Corrupted(detail) => CommitError::Corrupted { path, detail },
            Failure::InUse => CommitError::Other {
                path,
                detail: "it is in use by another process".to_owned(),
            },
            Failure::Other(detail) => CommitError::Other { path, detail },
        }
    }
}

fn classify_open(path: &Path, error: redb::DatabaseError) -> OpenError {
    Failure::from_redb(error).into_open_error(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use std::ops::Bound;
    use std::os::unix::fs::PermissionsExt;

    fn row(key: &str, value: &[u8]) -> (String, Vec<u8>) {
        (key.to_owned(), value.to_vec())
    }

    fn task(id: &str, received_at_ms: i64) -> PendingTask {
        PendingTask {
            id: id.to_owned(),
            payload: format!("payload of {id}").into_bytes(),
            received_at_ms,
        }
    }

    fn answer(id: &str, at_ms: i64) -> Answered {
        Answered {
            id: id.to_owned(),
            reply: format!("reply to {id}").into_bytes(),
            at_ms,
        }
    }

    fn reply_to(id: &str) -> Option<Vec<u8>> {
        Some(format!("reply to {id}").into_bytes())
    }

    /// Commits at once rather than after [`COMMIT_INTERVAL`], for tests about something else.
    async fn commit_now(store: &Store, batch: Batch) -> Result<(), CommitError> {
        let committed = store.commit(batch);
        let flushed = store.flush().await;
        let result = committed.await;
        assert_eq!(result.is_ok(), flushed.is_ok());
        result
    }

    fn open(dir: &Path) -> (Store, Loaded) {
        Store::open(&dir.join(FILE_NAME)).unwrap()
    }

    fn open_err(dir: &Path) -> OpenError {
        match Store::open(&dir.join(FILE_NAME)) {
            Ok(_) => panic!("the state in {} was accepted", dir.display()),
            Err(e) => e,
        }
    }

    fn assert_tells_operator(error: &dyn std::error::Error, path: &Path) {
        let message = error.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{message} does not name {}",
            path.display()
        );
        assert!(
            message.contains("move the file aside"),
            "{message} does not say what to do"
        );
    }

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

    #[tokio::test]
    async fn a_reply_is_found_as_soon_as_its_batch_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let committed = store.commit(Batch {
            answered: vec![answer("a1", 1_000)],
            ..Batch::default()
        });
        // A redelivery racing the commit is still told the task was answered.
        assert_eq!(store.answered("a1").await.unwrap(), reply_to("a1"));
        committed.await.unwrap();
        assert_eq!(store.answered("a1").await.unwrap(), reply_to("a1"));
        // A day later, by the caller's clock, the id is new again.
        let later = Batch {
            latest_time_ms: Some(1_000 + ANSWER_TTL_MS + 1),
            ..Batch::default()
        };
        // Sent when called: dropping the future loses only the confirmation.
        drop(store.commit(later));
        assert_eq!(store.answered("a1").await.unwrap(), None);
        store.close().await.unwrap();
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.latest_time_ms, Some(1_000 + ANSWER_TTL_MS + 1));
    }

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

    /// The ids of the answered records in the file, read past the store and its index.
    fn answered_in_file(dir: &Path) -> BTreeSet<String> {
        let db = Database::open(dir.join(FILE_NAME)).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(ANSWERED).unwrap();
        let ids = table
            .iter()
            .unwrap()
            .map(|entry| entry.unwrap().0.value().to_owned())
            .collect();
        let by_time = txn.open_table(ANSWERED_BY_TIME).unwrap();
        assert_eq!(by_time.len().unwrap(), table.len().unwrap());
        ids
    }

    #[tokio::test]
    async fn answered_records_older_than_a_day_are_expired() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let first = Batch {
            answered: vec![answer("old", 1_000), answer("recent", ANSWER_TTL_MS)],
            latest_time_ms: Some(ANSWER_TTL_MS),
            ..Batch::default()
        };
        commit_now(&store, first).await.unwrap();
        assert_eq!(store.answered("old").await.unwrap(), reply_to("old"));

        let now = 1_000 + ANSWER_TTL_MS + 1;
        let later = Batch {
            latest_time_ms: Some(now),
            ..Batch::default()
        };
        commit_now(&store, later).await.unwrap();
        assert_eq!(store.answered("old").await.unwrap(), None);
        assert_eq!(store.answered("recent").await.unwrap(), reply_to("recent"));
        store.close().await.unwrap();

        let recent_only: BTreeSet<String> = ["recent".to_owned()].into();
        assert_eq!(answered_in_file(dir.path()), recent_only);
        let (store, loaded) = open(dir.path());
        assert_eq!(loaded.latest_time_ms, Some(now));
        assert_eq!(store.answered("recent").await.unwrap(), reply_to("recent"));
    }

    #[tokio::test]
    async fn expiry_does_bounded_work_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        let count = EXPIRE_PER_COMMIT + 10;
        let answers = (0..count)
            .map(|i| answer(&format!("a{i:05}"), i64::try_from(i).unwrap()))
            .collect();
        let first = Batch {
            answered: answers,
            ..Batch::default()
        };
        commit_now(&store, first).await.unwrap();
        let later = Batch {
            latest_time_ms: Some(10 * ANSWER_TTL_MS),
            ..Batch::default()
        };
        commit_now(&store, later.clone()).await.unwrap();
        store.close().await.unwrap();

        // The oldest went first; the newest wait for the next commit.
        let newest: BTreeSet<String> = (EXPIRE_PER_COMMIT..count)
            .map(|i| format!("a{i:05}"))
            .collect();
        assert_eq!(answered_in_file(dir.path()), newest);

        let (store, _) = open(dir.path());
        commit_now(&store, later).await.unwrap();
        store.close().await.unwrap();
        assert_eq!(answered_in_file(dir.path()), BTreeSet::new());
    }

    #[test]
    fn a_file_of_random_bytes_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut rng = fastrand::Rng::with_seed(7);
        let bytes: Vec<u8> = (0..256 * 1024).map(|_| rng.u8(..)).collect();
        std::fs::write(&path, &bytes).unwrap();

        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::NotRedb { .. }), "{error:?}");
        assert_tells_operator(&error, &path);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn another_programs_redb_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let users: TableDefinition<&str, u64> = TableDefinition::new("users");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(users).unwrap().insert("ada", 36).unwrap();
            txn.commit().unwrap();
        }

        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::Foreign { .. }), "{error:?}");
        assert_tells_operator(&error, &path);
        assert!(error.to_string().contains("users"), "{error}");

        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let age = txn.open_table(users).unwrap().get("ada").unwrap();
        assert_eq!(age.map(|v| v.value()), Some(36));
    }

    fn assert_foreign_meta_refused(write: impl FnOnce(&redb::WriteTransaction)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            write(&txn);
            txn.commit().unwrap();
        }
        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::Foreign { .. }), "{error:?}");
        assert_tells_operator(&error, &path);
    }

    #[test]
    fn a_meta_table_that_is_not_keyrelays_is_refused() {
        let other_schema: TableDefinition<&str, &str> = TableDefinition::new("meta");
        assert_foreign_meta_refused(|txn| {
            let mut meta = txn.open_table(other_schema).unwrap();
            meta.insert("schema", "someone-else").unwrap();
        });
        let other_types: TableDefinition<&str, u64> = TableDefinition::new("meta");
        assert_foreign_meta_refused(|txn| {
            let mut meta = txn.open_table(other_types).unwrap();
            meta.insert("schema", 1).unwrap();
        });
    }

    #[tokio::test]
    async fn a_file_from_a_newer_keyrelay_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (store, _) = open(dir.path());
        store.close().await.unwrap();
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(META_VERSION, "2")
                .unwrap();
            txn.commit().unwrap();
        }
        let error = open_err(dir.path());
        assert!(
            matches!(error, OpenError::NewerFormat { found: 2, .. }),
            "{error:?}"
        );
        assert_tells_operator(&error, &path);
    }

    /// Writes rows whose values fill most of the file, and returns them.
    async fn fill_with_rows(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let (store, _) = open(dir);
        let rows: BTreeMap<String, Vec<u8>> = (0..64)
            .map(|i| {
                let value = format!("ROW-VALUE-{i:04}|").repeat(256).into_bytes();
                (format!("row/{i:04}"), value)
            })
            .collect();
        store
            .commit(Batch {
                rows: rows.clone().into_iter().collect(),
                ..Batch::default()
            })
            .await
            .unwrap();
        store.close().await.unwrap();
        rows
    }

    #[tokio::test]
    async fn a_damaged_row_is_refused_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        fill_with_rows(dir.path()).await;

        // Flip a byte inside every copy of one row's value, so a live page is certainly damaged.
        let mut bytes = std::fs::read(&path).unwrap();
        let needle = b"ROW-VALUE-0031|";
        let hits: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, window)| window == needle)
            .map(|(at, _)| at)
            .collect();
        assert!(!hits.is_empty());
        for at in hits {
            bytes[at + 4] ^= 0xff;
        }
        std::fs::write(&path, &bytes).unwrap();

        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::Corrupted { .. }), "{error:?}");
        assert_tells_operator(&error, &path);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[tokio::test]
    async fn bytes_flipped_mid_file_never_lose_rows_silently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let rows = fill_with_rows(dir.path()).await;
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        for byte in &mut bytes[middle..middle + 64] {
            *byte ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();

        match Store::open(&path) {
            // Flipped where nothing lives, or repaired by redb: everything is still there.
            Ok((_, loaded)) => assert_eq!(loaded.rows, rows),
            Err(error) => assert_tells_operator(&error, &path),
        }
    }

    /// A file that takes `left` more bytes before the disk is full (`None`: never full).
    #[derive(Debug)]
    struct FullDisk {
        inner: FileBackend,
        left: Arc<Mutex<Option<u64>>>,
    }

    impl FullDisk {
        fn factory(
            path: &Path,
            left: &Arc<Mutex<Option<u64>>>,
        ) -> impl FnMut() -> io::Result<FullDisk> + Send + 'static {
            let path = path.to_path_buf();
            let left = Arc::clone(left);
            move || {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                Ok(FullDisk {
                    inner: FileBackend::new(file).map_err(io::Error::other)?,
                    left: Arc::clone(&left),
                })
            }
        }

        fn spend(&self, bytes: u64) -> io::Result<()> {
            let mut left = self.left.lock().unwrap();
            match *left {
                None => Ok(()),
                Some(room) if room >= bytes && room > 0 => {
                    *left = Some(room - bytes);
                    Ok(())
                }
                Some(_) => {
                    *left = Some(0);
                    Err(io::Error::from_raw_os_error(28))
                }
            }
        }
    }

    impl StorageBackend for FullDisk {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            let grows = len.saturating_sub(self.inner.len()?);
            self.spend(grows)?;
            self.inner.set_len(len)
        }

        fn sync_data(&self) -> io::Result<()> {
            // Delayed allocation: a full disk may show first at fsync.
            self.spend(0)?;
            self.inner.sync_data()
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.spend(u64::try_from(data.len()).unwrap())?;
            self.inner.write(offset, data)
        }

        fn close(&self) -> io::Result<()> {
            self.inner.close()
        }

        fn try_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(start, end)
        }

        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }

        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
            self.inner.lock_range(start, end)
        }

        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(start, end)
        }

        fn unlock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(start, end)
        }

        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(start, end)
        }
    }

    #[tokio::test]
    async fn a_full_disk_fails_every_waiter_and_the_store_carries_on_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let left = Arc::new(Mutex::new(None));
        let (store, _) = Store::open_with_backend(&path, FullDisk::factory(&path, &left)).unwrap();
        store
            .commit(Batch {
                rows: vec![row("before", b"kept")],
                pending_add: vec![task("t-before", 1)],
                ..Batch::default()
            })
            .await
            .unwrap();

        *left.lock().unwrap() = Some(0);
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                store.commit(Batch {
                    rows: vec![row(&format!("during/{i}"), b"not yet durable")],
                    ..Batch::default()
                })
            })
            .collect();
        for waiter in waiting {
            let error = waiter.await.unwrap_err();
            assert!(
                matches!(&error, CommitError::Io { source, .. }
                    if source.kind() == io::ErrorKind::StorageFull),
                "{error:?}"
            );
            assert!(error.to_string().contains(&path.display().to_string()));
        }
        assert!(!store.usable());
        assert_eq!(store.stats().failed_commits, 1);
        let error = store
            .commit(Batch {
                rows: vec![row("while-unusable", b"x")],
                ..Batch::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(error, CommitError::Unusable { .. }), "{error:?}");
        assert!(store.reopen().await.is_err());
        assert!(!store.usable());

        *left.lock().unwrap() = None;
        store.reopen().await.unwrap();
        assert!(store.usable());
        let after = Batch {
            rows: vec![row("after", b"written")],
            ..Batch::default()
        };
        commit_now(&store, after).await.unwrap();
        store.close().await.unwrap();

        let (_, loaded) = open(dir.path());
        assert_eq!(
            loaded.rows.get("before").map(Vec::as_slice),
            Some(&b"kept"[..])
        );
        assert_eq!(loaded.pending, vec![task("t-before", 1)]);
        assert_eq!(
            loaded.rows.get("after").map(Vec::as_slice),
            Some(&b"written"[..])
        );
        // What failed was kept and written once the disk had room again.
        for key in ["during/0", "during/1", "during/2", "while-unusable"] {
            assert!(loaded.rows.contains_key(key), "{key} was lost");
        }
    }

    enum DiskOp {
        Write(u64, Vec<u8>),
        SetLen(u64),
    }

    impl std::fmt::Debug for DiskOp {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                DiskOp::Write(offset, data) => write!(f, "write {} at {offset}", data.len()),
                DiskOp::SetLen(len) => write!(f, "set_len {len}"),
            }
        }
    }

    #[derive(Debug, Default)]
    struct Platter {
        /// What survives a power cut.
        durable: Vec<u8>,
        /// What reads see.
        current: Vec<u8>,
        /// Changes since the last sync, which a power cut may keep or lose, each on its own.
        unsynced: Vec<DiskOp>,
        syncs_fail: bool,
    }

    /// A disk in memory whose power can be cut.
    #[derive(Debug, Clone, Default)]
    struct PowerCutDisk(Arc<Mutex<Platter>>);

    impl PowerCutDisk {
        fn factory(&self) -> impl FnMut() -> io::Result<PowerCutDisk> + Send + 'static {
            let disk = self.clone();
            move || Ok(disk.clone())
        }

        /// From now on each fsync fails, as if the power went during it.
        fn fail_syncs(&self) {
            self.0.lock().unwrap().syncs_fail = true;
        }

        /// The power comes back: the disk holds what was synced, plus each unsynced change for
        /// which `keep` says so.
        fn cut(&self, mut keep: impl FnMut() -> bool) {
            let mut platter = self.0.lock().unwrap();
            let mut image = platter.durable.clone();
            for op in std::mem::take(&mut platter.unsynced) {
                if !keep() {
                    continue;
                }
                match op {
                    DiskOp::SetLen(len) => image.resize(usize::try_from(len).unwrap(), 0),
                    DiskOp::Write(offset, data) => {
                        let start = usize::try_from(offset).unwrap();
                        let end = start + data.len();
                        if image.len() < end {
                            image.resize(end, 0);
                        }
                        image[start..end].copy_from_slice(&data);
                    }
                }
            }
            platter.durable = image.clone();
            platter.current = image;
            platter.syncs_fail = false;
        }
    }

    impl StorageBackend for PowerCutDisk {
        fn len(&self) -> io::Result<u64> {
            Ok(u64::try_from(self.0.lock().unwrap().current.len()).unwrap())
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let platter = self.0.lock().unwrap();
            let start = usize::try_from(offset).unwrap();
            let bytes = platter
                .current
                .get(start..start + out.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(bytes);
            Ok(())
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            let mut platter = self.0.lock().unwrap();
            platter.current.resize(usize::try_from(len).unwrap(), 0);
            platter.unsynced.push(DiskOp::SetLen(len));
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            let mut platter = self.0.lock().unwrap();
            if platter.syncs_fail {
                return Err(io::Error::other("the power went during fsync"));
            }
            platter.durable = platter.current.clone();
            platter.unsynced.clear();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut platter = self.0.lock().unwrap();
            let start = usize::try_from(offset).unwrap();
            let end = start + data.len();
            if platter.current.len() < end {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            platter.current[start..end].copy_from_slice(data);
            platter.unsynced.push(DiskOp::Write(offset, data.to_vec()));
            Ok(())
        }
    }

    fn durable_batch() -> Batch {
        Batch {
            rows: vec![row("key/a", b"a-1"), row("key/b", b"b-1")],
            pending_add: vec![task("t1", 10), task("t2", 11)],
            answered: vec![answer("done-1", 100)],
            latest_time_ms: Some(100),
            ..Batch::default()
        }
    }

    fn lost_batch() -> Batch {
        Batch {
            rows: vec![row("key/a", b"a-2"), row("key/c", b"c-2")],
            pending_add: vec![task("t3", 12)],
            pending_remove: vec!["t1".to_owned()],
            answered: vec![answer("done-2", 200)],
            latest_time_ms: Some(200),
        }
    }

    fn loaded_after(batches: &[Batch]) -> Loaded {
        let mut merged = Merged::default();
        for batch in batches {
            merged.add(batch.clone());
        }
        Loaded {
            rows: merged.rows,
            pending: merged
                .tasks
                .into_iter()
                .filter_map(|(id, task)| {
                    task.map(|(received_at_ms, payload)| PendingTask {
                        id,
                        payload,
                        received_at_ms,
                    })
                })
                .collect(),
            latest_time_ms: merged.latest_time_ms,
        }
    }

    /// Commits one batch durably, then loses power during the next commit; returns what the
    /// disk holds when the power is back, opened again.
    async fn power_cut_during_second_commit(keep: impl FnMut() -> bool) -> (Store, Loaded) {
        let path = Path::new("/power-cut/keyrelay.redb");
        let disk = PowerCutDisk::default();
        let (store, _) = Store::open_with_backend(path, disk.factory()).unwrap();
        store.commit(durable_batch()).await.unwrap();
        disk.fail_syncs();
        assert!(commit_now(&store, lost_batch()).await.is_err());
        assert!(!store.usable());
        assert!(store.close().await.is_err());
        disk.cut(keep);
        Store::open_with_backend(path, disk.factory()).unwrap()
    }

    #[tokio::test]
    async fn after_a_power_cut_only_completed_commits_survive() {
        let (store, loaded) = power_cut_during_second_commit(|| false).await;
        assert_eq!(loaded, loaded_after(&[durable_batch()]));
        assert_eq!(store.answered("done-1").await.unwrap(), reply_to("done-1"));
        assert_eq!(store.answered("done-2").await.unwrap(), None);
        store.commit(lost_batch()).await.unwrap();
        assert_eq!(store.answered("done-2").await.unwrap(), reply_to("done-2"));
    }

    #[tokio::test]
    async fn a_power_cut_that_keeps_some_unsynced_writes_leaves_one_commit_or_the_other() {
        let before = loaded_after(&[durable_batch()]);
        let after = loaded_after(&[durable_batch(), lost_batch()]);
        for seed in 0..64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (store, loaded) = power_cut_during_second_commit(|| rng.bool()).await;
            assert!(
                loaded == before || loaded == after,
                "seed {seed} left {loaded:?}"
            );
            store.commit(lost_batch()).await.unwrap();
        }
    }
}
