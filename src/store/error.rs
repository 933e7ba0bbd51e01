//! The store's errors, one type per operation (open, commit, lookup, reopen), each written for
//! the operator who reads it: it names the file and says what to do. Below them, redb's errors
//! sorted by what the operator has to do about them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::tables::FORMAT_VERSION;

/// What the operator reads when the file cannot be used as it is.
const MOVE_ASIDE: &str = "stop keyrelay, move the file aside (keep it for a bug report) and start \
     keyrelay again: it then starts with an empty state, and may spend again up to a day of \
     each key's budget that the old file had counted";

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

/// Why a transaction that panicked inside redb failed.
pub(super) const PANICKED: &str = "redb stopped on an inconsistency in the file";

pub(super) fn panicked() -> Failure {
    Failure::Corrupted(PANICKED.to_owned())
}

/// A redb error, sorted by what the operator has to do about it.
#[derive(Debug)]
pub(super) enum Failure {
    Io(io::Error),
    Corrupted(String),
    InUse,
    Other(String),
}

impl Failure {
    pub(super) fn from_redb(error: impl Into<redb::Error>) -> Self {
        match error.into() {
            redb::Error::Io(e) => Failure::Io(e),
            redb::Error::Corrupted(detail) => Failure::Corrupted(detail),
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => Failure::InUse,
            other => Failure::Other(other.to_string()),
        }
    }

    /// What went wrong, without the file's name or advice, for nesting in another message.
    pub(super) fn detail(&self) -> String {
        match self {
            Failure::Io(e) => e.to_string(),
            Failure::Corrupted(detail) => format!("the file is corrupted: {detail}"),
            Failure::InUse => "the file is in use by another process".to_owned(),
            Failure::Other(detail) => detail.clone(),
        }
    }

    pub(super) fn into_open_error(self, path: &Path) -> OpenError {
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

    pub(super) fn into_commit_error(self, path: &Path) -> CommitError {
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

pub(super) fn classify_open(path: &Path, error: redb::DatabaseError) -> OpenError {
    Failure::from_redb(error).into_open_error(path)
}
