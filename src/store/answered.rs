//! Answered task ids: how long they count ([`ANSWER_TTL_MS`]), the index in memory that tells a
//! new id without reading the file, and the records on disk, which each commit expires a
//! bounded number of.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redb::{Database, ReadableDatabase, ReadableTable, Table};

use super::tables::{ANSWERED, open_existing};

/// How long an answered task id is remembered (SPEC §3: answered again, never re-run, within 24 h).
pub const ANSWER_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// Most expired answered records removed by one commit, so that a commit after a long pause
/// does not turn into one huge transaction. At one commit a second this removes far more records
/// than any key pool can answer.
const EXPIRE_PER_COMMIT: usize = 1000;

/// Which task ids were answered when, so that the common case, a new id, needs no read of the
/// file. A superset of the file's answered records: a hit is confirmed by the store's thread.
#[derive(Debug, Default)]
pub(super) struct AnsweredIndex {
    by_id: HashMap<String, i64>,
    by_time: BTreeSet<(i64, String)>,
}

impl AnsweredIndex {
    pub(super) fn insert(&mut self, id: &str, at_ms: i64) {
        if let Some(previous) = self.by_id.insert(id.to_owned(), at_ms) {
            self.by_time.remove(&(previous, id.to_owned()));
        }
        self.by_time.insert((at_ms, id.to_owned()));
    }

    pub(super) fn answered_since(&self, id: &str, cutoff_ms: i64) -> bool {
        self.by_id.get(id).is_some_and(|at| *at >= cutoff_ms)
    }

    pub(super) fn expire(&mut self, cutoff_ms: i64) {
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

/// Records each answer, replacing an earlier answer to the same id.
pub(super) fn record(
    answered: &mut Table<'_, &'static str, (i64, &'static [u8])>,
    by_time: &mut Table<'_, (i64, &'static str), ()>,
    answers: &BTreeMap<String, (i64, Vec<u8>)>,
) -> Result<(), redb::Error> {
    for (id, (at, reply)) in answers {
        let previous = answered
            .insert(id.as_str(), (*at, reply.as_slice()))?
            .map(|old| old.value().0);
        if let Some(previous) = previous {
            by_time.remove((previous, id.as_str()))?;
        }
        by_time.insert((*at, id.as_str()), ())?;
    }
    Ok(())
}

/// Removes the oldest records answered more than [`ANSWER_TTL_MS`] before `latest_ms`, at most
/// [`EXPIRE_PER_COMMIT`] of them.
pub(super) fn expire(
    answered: &mut Table<'_, &'static str, (i64, &'static [u8])>,
    by_time: &mut Table<'_, (i64, &'static str), ()>,
    latest_ms: i64,
) -> Result<(), redb::Error> {
    let cutoff = latest_ms.saturating_sub(ANSWER_TTL_MS);
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
    Ok(())
}

/// The reply stored for `id` if it was answered at or after `cutoff_ms`.
pub(super) fn read_reply(
    db: &Database,
    id: &str,
    cutoff_ms: i64,
) -> Result<Option<Vec<u8>>, redb::Error> {
    let txn = db.begin_read()?;
    let Some(answered) = open_existing(&txn, ANSWERED)? else {
        return Ok(None);
    };
    let found = answered.get(id)?.and_then(|entry| {
        let (at, reply) = entry.value();
        (at >= cutoff_ms).then(|| reply.to_vec())
    });
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use redb::ReadableTableMetadata;

    use super::*;
    use crate::store::tables::ANSWERED_BY_TIME;
    use crate::store::test_support::{answer, commit_now, open, reply_to};
    use crate::store::{Batch, FILE_NAME};

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
}
