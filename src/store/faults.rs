//! Disks that fail as real ones do, behind the storage seam ([`Store::open_with_backend`]): one
//! that fills up, one whose power is cut mid-commit; and what the store keeps on each.

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;
use redb::backends::FileBackend;

use super::batch::Merged;
use super::test_support::{answer, commit_now, open, reply_to, row, task};
use super::{Batch, CommitError, FILE_NAME, Loaded, PendingTask, Store};

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

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
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
