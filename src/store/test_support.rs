//! Helpers shared by the store's unit tests: small batches and opening a store in a directory.

use std::path::Path;

use super::{Answered, Batch, CommitError, FILE_NAME, Loaded, OpenError, PendingTask, Store};

pub(super) fn row(key: &str, value: &[u8]) -> (String, Vec<u8>) {
    (key.to_owned(), value.to_vec())
}

pub(super) fn task(id: &str, received_at_ms: i64) -> PendingTask {
    PendingTask {
        id: id.to_owned(),
        payload: format!("payload of {id}").into_bytes(),
        received_at_ms,
    }
}

pub(super) fn answer(id: &str, at_ms: i64) -> Answered {
    Answered {
        id: id.to_owned(),
        reply: format!("reply to {id}").into_bytes(),
        at_ms,
    }
}

pub(super) fn reply_to(id: &str) -> Option<Vec<u8>> {
    Some(format!("reply to {id}").into_bytes())
}

/// Commits at once rather than after [`COMMIT_INTERVAL`], for tests about something else.
pub(super) async fn commit_now(store: &Store, batch: Batch) -> Result<(), CommitError> {
    let committed = store.commit(batch);
    let flushed = store.flush().await;
    let result = committed.await;
    assert_eq!(result.is_ok(), flushed.is_ok());
    result
}

pub(super) fn open(dir: &Path) -> (Store, Loaded) {
    Store::open(&dir.join(FILE_NAME)).unwrap()
}

pub(super) fn open_err(dir: &Path) -> OpenError {
    match Store::open(&dir.join(FILE_NAME)) {
        Ok(_) => panic!("the state in {} was accepted", dir.display()),
        Err(e) => e,
    }
}

pub(super) fn assert_tells_operator(error: &dyn std::error::Error, path: &Path) {
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
