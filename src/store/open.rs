//! Opening the state: the file, or any redb storage backend (the seam the crash and full-disk
//! tests use); refusing a file that is not keyrelay's state, initialising a new one, loading what
//! it holds, and starting the store's thread on it. Reopening after a failure is the writer's.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{
    Builder, Database, MultimapTableHandle, ReadableDatabase, ReadableTable, StorageBackend,
    TableError, TableHandle,
};

use super::answered::AnsweredIndex;
use super::batch::{Loaded, PendingTask};
use super::error::{Failure, OpenError, PANICKED, classify_open};
use super::tables::{
    ANSWERED, ANSWERED_BY_TIME, CLOCK, CLOCK_LATEST, FORMAT_VERSION, META, META_SCHEMA,
    META_VERSION, PENDING, ROWS, SCHEMA_NAME, open_existing,
};
use super::{NO_TIME, Shared, Store, writer};

/// redb's page cache. The state is small; redb's default (1 GiB) is sized for servers, not a Pi.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Opens the database again, for the first open and for each reopen after a failure.
pub(super) type Opener = Box<dyn FnMut() -> Result<Database, OpenError> + Send>;

impl Store {
    /// Opens the state file at `path` (`{state_dir}/`[`FILE_NAME`](super::FILE_NAME)), creating
    /// its directory (mode 0700) and an empty state if there is none, and loads everything it
    /// holds.
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
        let commands = writer::spawn(path.clone(), opener, db, Arc::clone(&shared))
            .map_err(|source| OpenError::Thread { path, source })?;
        Ok((Store { commands, shared }, loaded))
    }
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
pub(super) fn open_checked(
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use redb::TableDefinition;

    use super::*;
    use crate::store::test_support::{assert_tells_operator, open, open_err};
    use crate::store::{Batch, FILE_NAME};

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
}
