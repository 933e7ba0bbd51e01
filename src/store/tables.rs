//! The file's layout: its tables and format version, and the one write transaction that makes
//! the merged batches durable. Rows, task payloads and replies are the callers' opaque bytes.

use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition,
    TableError,
};

use super::answered;
use super::batch::{Merged, later};
use super::error::Failure;

/// Marks the file as keyrelay's, so that another program's redb file is never taken for an empty
/// state.
pub(super) const SCHEMA_NAME: &str = "keyrelay-state";

/// The layout of the tables below. A file of a newer version is refused, never rewritten.
pub(super) const FORMAT_VERSION: u32 = 1;

pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
pub(super) const META_SCHEMA: &str = "schema";
pub(super) const META_VERSION: &str = "version";
pub(super) const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows");
/// Task id → (received at, payload).
pub(super) const PENDING: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("pending");
/// Task id → (answered at, reply).
pub(super) const ANSWERED: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("answered");
/// (answered at, task id): the answered records in the order they expire.
pub(super) const ANSWERED_BY_TIME: TableDefinition<(i64, &str), ()> =
    TableDefinition::new("answered_by_time");
pub(super) const CLOCK: TableDefinition<&str, i64> = TableDefinition::new("clock");
pub(super) const CLOCK_LATEST: &str = "latest_time_ms";

/// Writes `m` in one durable transaction and expires old answered records; returns the latest
/// time now on disk.
pub(super) fn write(db: &Database, m: &Merged) -> Result<Option<i64>, Failure> {
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
    answered::record(&mut answered, &mut by_time, &m.answered)?;
    let mut clock = txn.open_table(CLOCK)?;
    let stored = clock.get(CLOCK_LATEST)?.map(|entry| entry.value());
    let latest = later(stored, m.latest_time_ms);
    if let Some(latest) = latest
        && stored != Some(latest)
    {
        clock.insert(CLOCK_LATEST, latest)?;
    }
    if let Some(latest) = latest {
        answered::expire(&mut answered, &mut by_time, latest)?;
    }
    Ok(latest)
}

/// A table that an older file of the same format may lack is read as empty.
pub(super) fn open_existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, TableError> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
