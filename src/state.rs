//! The schema of what keyrelay persists: the names of the store's rows and the shapes of
//! the rows and task records that the rotator, the relay and `run` write and read back.
//! The store only keeps bytes under these names and is the only module touching redb;
//! the ledger's budget row is the ledger's own business, and is only named here.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Row-name prefixes, one per kind of row.
const BUDGET_ROW: &str = "budget/";
const KEY_ROW: &str = "key/";
const PROVIDER_ROW: &str = "provider/";
const KEY_FILE_ROW: &str = "keyfile/";

/// What a row's name says it holds. Rows of other kinds are left to whoever wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row<'a> {
    /// A ledger budget, by the ledger's id for it.
    Budget(&'a str),
    /// A key's [`KeyStates`], by label.
    Key(&'a str),
    /// A provider's [`ProviderBackoff`], by name.
    Provider(&'a str),
    /// The identity of a key's file, by label (see [`key_file_identity`]).
    KeyFile(&'a str),
    /// Any other row, by its whole name.
    Other(&'a str),
}

impl<'a> Row<'a> {
    pub fn parse(name: &'a str) -> Row<'a> {
        if let Some(id) = name.strip_prefix(BUDGET_ROW) {
            Row::Budget(id)
        } else if let Some(label) = name.strip_prefix(KEY_ROW) {
            Row::Key(label)
        } else if let Some(provider) = name.strip_prefix(PROVIDER_ROW) {
            Row::Provider(provider)
        } else if let Some(label) = name.strip_prefix(KEY_FILE_ROW) {
            Row::KeyFile(label)
        } else {
            Row::Other(name)
        }
    }

    /// The row's name in the store.
    pub fn name(&self) -> String {
        match self {
            Row::Budget(id) => format!("{BUDGET_ROW}{id}"),
            Row::Key(label) => format!("{KEY_ROW}{label}"),
            Row::Provider(name) => format!("{PROVIDER_ROW}{name}"),
            Row::KeyFile(label) => format!("{KEY_FILE_ROW}{label}"),
            Row::Other(name) => (*name).to_owned(),
        }
    }
}

/// A state that ends by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub until: Timestamp,
    pub reason: String,
}

/// One key's state for one model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooling: Option<Hold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted: Option<Hold>,
    /// Requests estimated at this many tokens or more do not fit this key and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub too_large: Option<u64>,
}

impl ModelState {
    pub fn is_empty(&self) -> bool {
        self.cooling.is_none() && self.exhausted.is_none() && self.too_large.is_none()
    }
}

/// One key's state: the `key/{label}` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStates {
    /// Why the key is refused; until an operator resets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelState>,
}

/// A provider's backoff: the `provider/{name}` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderBackoff {
    #[serde(default)]
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub level: u32,
    #[serde(default)]
    pub last_burst: Option<Timestamp>,
}

/// The `keyfile/{label}` row: size, modification time and inode of the key file, enough
/// to see it was replaced, and nothing derived from the secret itself.
pub fn key_file_identity(meta: &std::fs::Metadata) -> Vec<u8> {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}.{}:{}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    )
    .into_bytes()
}

/// What the store keeps of a task it has accepted (its pending record's payload), to
/// answer it after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingRecord {
    /// The task as received.
    pub task: serde_json::Value,
    pub reply_topic: String,
    pub correlation: Option<Vec<u8>>,
    pub deadline_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_name_reads_back_as_the_row_it_names() {
        for row in [
            Row::Budget("groq/acct/llama"),
            Row::Key("g1"),
            Row::Provider("gemini"),
            Row::KeyFile("g1"),
            Row::Other("task/1"),
        ] {
            assert_eq!(Row::parse(&row.name()), row);
        }
        // Older rows keep their meaning: the names are on disk.
        assert_eq!(Row::parse("key/g1"), Row::Key("g1"));
        assert_eq!(Row::parse("budget/x"), Row::Budget("x"));
        assert_eq!(Row::parse("provider/groq"), Row::Provider("groq"));
        assert_eq!(Row::parse("keyfile/g1"), Row::KeyFile("g1"));
        assert_eq!(Row::parse("task/1"), Row::Other("task/1"));
    }
}
