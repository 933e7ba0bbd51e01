//! What callers hand the store and get back: batches of changes, the tasks and answers they
//! record, and what the file held at open; and how the batches waiting for one commit merge.

use std::collections::BTreeMap;

/// A task taken and durably recorded but not yet answered. The payload is the caller's
/// encoding (reply topic, correlation data, deadline, the task itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    pub id: String,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
}

/// A task answered: its id is deduplicated for [`ANSWER_TTL_MS`](super::ANSWER_TTL_MS) and `reply` sent again on a
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
    /// older than it by [`ANSWER_TTL_MS`](super::ANSWER_TTL_MS), and judges [`Store::answered`](super::Store::answered) by it.
    pub latest_time_ms: Option<i64>,
}

impl Batch {
    /// The greatest time the batch carries.
    pub(super) fn latest_time(&self) -> Option<i64> {
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

/// The batches not yet durable, merged: later values win per row and per task id.
#[derive(Debug, Default)]
pub(super) struct Merged {
    pub(super) rows: BTreeMap<String, Vec<u8>>,
    /// `Some` records the task (received at, payload); `None` removes its record.
    pub(super) tasks: BTreeMap<String, Option<(i64, Vec<u8>)>>,
    pub(super) answered: BTreeMap<String, (i64, Vec<u8>)>,
    pub(super) latest_time_ms: Option<i64>,
}

impl Merged {
    pub(super) fn add(&mut self, batch: Batch) {
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

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.tasks.is_empty()
            && self.answered.is_empty()
            && self.latest_time_ms.is_none()
    }
}

/// The later of two optional times.
pub(super) fn later(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}
