//! [`SqliteStore`]: the request path's view of the database.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keygate_core::{KeyDigest, KeyId, KeyStore, Lookup, StoreError, Timestamp};

use crate::db::Db;
use crate::error::DbError;
use crate::memory::MemoryStore;

/// At most this many keys' uses wait for the next write; uses of further keys are dropped
/// (a use already waiting is still moved forward).
const MAX_PENDING_USES: usize = 1 << 20;

/// The latest use of each key, waiting in memory to be written in one batch.
#[derive(Debug, Default)]
pub(crate) struct PendingUses(Mutex<HashMap<KeyId, Timestamp>>);

impl PendingUses {
    /// Notes that `key` was used at `at` (one short lock).
    pub(crate) fn note(&self, key: &KeyId, at: Timestamp) {
        let mut uses = lock(&self.0);
        if let Some(last) = uses.get_mut(key) {
            *last = (*last).max(at);
        } else if uses.len() < MAX_PENDING_USES {
            uses.insert(key.clone(), at);
        }
    }

    /// Everything noted so far, to write.
    pub(crate) fn take(&self) -> Vec<(KeyId, Timestamp)> {
        std::mem::take(&mut *lock(&self.0)).into_iter().collect()
    }

    /// Puts back uses that could not be written, for the next try.
    pub(crate) fn put_back(&self, batch: &[(KeyId, Timestamp)]) {
        for (key, at) in batch {
            self.note(key, *at);
        }
    }
}

/// What a [`SqliteStore::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshOutcome {
    /// Nothing changed since the last refresh.
    Unchanged,
    /// Changed projects and keys were applied to the snapshot.
    Applied {
        /// Projects created or changed.
        projects: usize,
        /// Keys created or changed.
        keys: usize,
    },
    /// The database went back in time (replaced by an older copy): everything was reloaded.
    Reloaded {
        /// Projects now served.
        projects: usize,
        /// Keys now served.
        keys: usize,
    },
}

/// Keys and projects from a SQLite database, served from memory.
///
/// Lookups read a [`MemoryStore`] snapshot only, never the database, so the request path
/// costs what an in-memory store costs. [`SqliteStore::refresh`] (or
/// [`SqliteStore::watch`], on an interval) brings the snapshot up to date with changes made
/// through any [`Db`], in this process or another, applying only the rows that changed.
/// When the database cannot be read, the previous snapshot keeps serving and the error is
/// kept for [`SqliteStore::last_error`] (for a health check).
///
/// Clones share the snapshot, the connection and the pending uses.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    memory: MemoryStore,
    state: Mutex<State>,
    last_error: Mutex<Option<String>>,
    uses: PendingUses,
}

struct State {
    db: Db,
    /// The change sequence number the snapshot reflects.
    seq: u64,
    /// `PRAGMA data_version` when the snapshot was last brought up to date.
    data_version: i64,
    /// Which file the connection has open, to notice one renamed over it.
    file: Option<FileId>,
}

/// Device and inode: what tells a file renamed over the path from the one opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> std::io::Result<Option<FileId>> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(Some(FileId(meta.dev(), meta.ino())))
    }

    #[cfg(not(unix))]
    fn of(_path: &Path) -> std::io::Result<Option<FileId>> {
        Ok(None)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks is valid after any panic: a map, a counter, a message.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteStore {
    /// Opens the database at `path` (creating and migrating it as [`Db::open`] does) and
    /// loads every project and key.
    ///
    /// # Errors
    ///
    /// As [`Db::open`] and [`Db::load`]: a gateway that cannot read its keys does not start.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, DbError> {
        let path = path.as_ref().to_path_buf();
        let db = Db::open(&path)?;
        let file = FileId::of(&path).map_err(|e| DbError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Read before loading: a commit in between is then seen by the next refresh.
        let data_version = db.data_version()?;
        let (snapshot, seq) = db.load()?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                memory: MemoryStore::new(snapshot),
                state: Mutex::new(State {
                    db,
                    seq,
                    data_version,
                    file,
                }),
                last_error: Mutex::new(None),
                uses: PendingUses::default(),
            }),
        })
    }

    /// The in-memory store serving lookups (shares the snapshot with this store).
    pub fn store(&self) -> MemoryStore {
        self.inner.memory.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Brings the snapshot up to date, then writes the uses recorded since the last call.
    ///
    /// Cheap when nothing changed: one `PRAGMA data_version`, and a read of the change
    /// sequence only when another connection committed something. When something did, only
    /// the changed projects and keys are read and applied
    /// ([`Snapshot::with_changes`](keygate_core::Snapshot::with_changes)). Blocking: run it
    /// off the async runtime (as [`SqliteStore::watch`] does).
    ///
    /// # Errors
    ///
    /// A [`DbError`] when the database cannot be read or written, holds records that do not
    /// fit together, or its file was deleted or replaced by another (renamed over it). The
    /// changes applied before an error stay applied; the previous snapshot keeps serving, and the error is kept for
    /// [`SqliteStore::last_error`] until a refresh succeeds.
    pub fn refresh(&self) -> Result<RefreshOutcome, DbError> {
        let mut state = lock(&self.inner.state);
        let result = self.catch_up(&mut state);
        let flushed = self.flush_locked(&mut state);
        let result = result.and_then(|outcome| flushed.map(|_| outcome));
        *lock(&self.inner.last_error) = result.as_ref().err().map(ToString::to_string);
        result
    }

    fn catch_up(&self, state: &mut State) -> Result<RefreshOutcome, DbError> {
        // The connection keeps reading the file it opened. One moved over the path (a
        // restored copy, garbage) is refused rather than followed: the `-wal` file beside it
        // belongs to the old one, and opening the pair would mix them.
        let file = FileId::of(&self.inner.path).map_err(|e| {
            DbError::Sqlite(format!(
                "the key database {} cannot be read: {e}",
                self.inner.path.display()
            ))
        })?;
        if file != state.file {
            return Err(DbError::Sqlite(format!(
                "the key database {} was replaced by another file; restart to load it",
                self.inner.path.display()
            )));
        }
        let version = state.db.data_version()?;
        if version == state.data_version {
            return Ok(RefreshOutcome::Unchanged);
        }
        let changes = state.db.changes_since(state.seq)?;
        let outcome = if changes.seq == state.seq {
            // Another connection only recorded uses.
            RefreshOutcome::Unchanged
        } else if changes.seq < state.seq {
            let (snapshot, seq) = state.db.load()?;
            let outcome = RefreshOutcome::Reloaded {
                projects: snapshot.projects().count(),
                keys: snapshot.len(),
            };
            tracing::warn!(
                path = %self.inner.path.display(),
                was = state.seq,
                now = seq,
                "the key database's change sequence went back; reloaded every key"
            );
            self.inner.memory.replace(snapshot);
            state.seq = seq;
            outcome
        } else {
            let outcome = RefreshOutcome::Applied {
                projects: changes.projects.len(),
                keys: changes.keys.len(),
            };
            let snapshot = self
                .inner
                .memory
                .snapshot()
                .with_changes(changes.projects, changes.keys)
                .map_err(|e| DbError::Corrupt(e.to_string()))?;
            self.inner.memory.replace(snapshot);
            state.seq = changes.seq;
            outcome
        };
        state.data_version = version;
        Ok(outcome)
    }

    /// Notes that `key` was used at `at`. No I/O: the latest use of each key waits in memory
    /// for the next [`SqliteStore::refresh`] (or [`SqliteStore::flush_uses`]), which writes
    /// them all in one transaction.
    pub fn record_use(&self, key: &KeyId, at: Timestamp) {
        self.inner.uses.note(key, at);
    }

    /// Writes the uses recorded so far (call it at shutdown); returns how many keys'.
    ///
    /// # Errors
    ///
    /// As [`Db::touch_last_used`]; the uses are kept for the next try.
    pub fn flush_uses(&self) -> Result<usize, DbError> {
        let mut state = lock(&self.inner.state);
        self.flush_locked(&mut state)
    }

    fn flush_locked(&self, state: &mut State) -> Result<usize, DbError> {
        let batch = self.inner.uses.take();
        if batch.is_empty() {
            return Ok(0);
        }
        match state.db.touch_last_used(&batch) {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                self.inner.uses.put_back(&batch);
                Err(e)
            }
        }
    }

    /// Refreshes every `interval` on the current tokio runtime, on a blocking thread (see
    /// [`SqliteStore::refresh`]). Changes applied are logged at `debug`, failures at `error`
    /// (the previous snapshot keeps serving). Abort the returned handle to stop; call
    /// [`SqliteStore::flush_uses`] afterwards to write the last uses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `interval` is zero.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // the first tick is immediate; the snapshot was just loaded
            loop {
                ticks.tick().await;
                let store = this.clone();
                match tokio::task::spawn_blocking(move || store.refresh()).await {
                    Ok(Ok(RefreshOutcome::Unchanged)) => {}
                    Ok(Ok(outcome)) => tracing::debug!(
                        path = %this.inner.path.display(),
                        ?outcome,
                        "key snapshot refreshed"
                    ),
                    Ok(Err(error)) => tracing::error!(
                        path = %this.inner.path.display(),
                        %error,
                        "key database refresh failed; the previous keys stay in use"
                    ),
                    Err(join) => tracing::error!(error = %join, "key database refresh task failed"),
                }
            }
        })
    }

    /// Why the last refresh failed, or `None` when it worked (for a health check).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.inner.last_error).clone()
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("keys", &self.inner.memory.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl KeyStore for SqliteStore {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        self.inner.memory.lookup(digest)
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        self.inner.memory.lookup_id(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{db_with_project, key, raw};
    use keygate_core::{ModelPattern, ModelRules, PreviousSecret, Secret};

    fn setup() -> (tempfile::TempDir, PathBuf, Db, SqliteStore) {
        let (dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a"), key("key_b", "p", "b")], "admin")
            .unwrap();
        let store = SqliteStore::open(&path).unwrap();
        (dir, path, db, store)
    }

    fn served(store: &SqliteStore, secret: &str) -> Option<Lookup> {
        store.store().get(&KeyDigest::of(secret))
    }

    #[tokio::test]
    async fn lookups_come_from_the_loaded_snapshot() {
        let (_dir, _path, _db, store) = setup();
        let hit = store.lookup(&KeyDigest::of("a")).await.unwrap().unwrap();
        assert_eq!(hit.key.id.as_str(), "key_a");
        assert_eq!(hit.project.id, "p");
        assert!(store.lookup_id("key_b").await.unwrap().is_some());
        assert!(store.lookup(&KeyDigest::of("x")).await.unwrap().is_none());
    }

    #[test]
    fn a_revoked_key_is_seen_at_the_next_refresh() {
        let (_dir, _path, mut db, store) = setup();
        db.update_key("key_a", |k, _| {
            k.revoked_at = Some(Timestamp::from_unix_secs(5));
            Ok(())
        })
        .unwrap();
        assert!(served(&store, "a").unwrap().key.revoked_at.is_none());
        assert_eq!(
            store.refresh().unwrap(),
            RefreshOutcome::Applied {
                projects: 0,
                keys: 1
            }
        );
        assert!(served(&store, "a").unwrap().key.revoked_at.is_some());
        assert!(store.last_error().is_none());
    }

    #[test]
    fn disabled_created_and_rotated_keys_are_seen_at_the_next_refresh() {
        let (_dir, _path, mut db, store) = setup();
        db.update_key("key_b", |k, reason| {
            k.disabled = true;
            *reason = Some("audit".into());
            Ok(())
        })
        .unwrap();
        db.insert_keys(&[key("key_c", "p", "c")], "admin").unwrap();
        db.update_key("key_a", |k, _| {
            k.previous = Some(PreviousSecret {
                digest: k.digest,
                valid_until: Timestamp::from_unix_secs(9_000),
            });
            k.digest = KeyDigest::of("a2");
            Ok(())
        })
        .unwrap();
        assert_eq!(
            store.refresh().unwrap(),
            RefreshOutcome::Applied {
                projects: 0,
                keys: 3
            }
        );
        assert!(served(&store, "b").unwrap().key.disabled);
        assert!(served(&store, "c").is_some());
        assert_eq!(served(&store, "a2").unwrap().secret, Secret::Current);
        assert_eq!(served(&store, "a").unwrap().secret, Secret::Previous);
    }

    #[test]
    fn a_changed_project_reaches_the_lookups_of_its_keys() {
        let (_dir, _path, mut db, store) = setup();
        let rules = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]);
        db.update_project("p", |p| {
            p.models = rules.clone();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            store.refresh().unwrap(),
            RefreshOutcome::Applied {
                projects: 1,
                keys: 0
            }
        );
        assert_eq!(served(&store, "b").unwrap().project.models, rules);
    }

    #[test]
    fn refresh_with_nothing_changed_is_unchanged() {
        let (_dir, _path, mut db, store) = setup();
        assert_eq!(store.refresh().unwrap(), RefreshOutcome::Unchanged);
        // Another connection recording uses is not a change either.
        db.touch_last_used(&[(KeyId::new("key_a"), Timestamp::from_unix_secs(9))])
            .unwrap();
        assert_eq!(store.refresh().unwrap(), RefreshOutcome::Unchanged);
        assert_eq!(store.refresh().unwrap(), RefreshOutcome::Unchanged);
    }

    #[test]
    fn an_unreadable_database_keeps_the_old_snapshot_serving() {
        let (_dir, path, mut db, store) = setup();
        db.update_key("key_b", |k, _| {
            k.disabled = true;
            Ok(())
        })
        .unwrap();
        let other = raw(&path);
        other
            .execute_batch("ALTER TABLE meta RENAME TO meta_gone")
            .unwrap();
        assert!(store.refresh().is_err());
        assert!(store.last_error().is_some());
        assert!(served(&store, "a").is_some());
        assert!(!served(&store, "b").unwrap().key.disabled);
        // Repaired: the change is applied and the error cleared.
        other
            .execute_batch("ALTER TABLE meta_gone RENAME TO meta")
            .unwrap();
        assert!(matches!(
            store.refresh().unwrap(),
            RefreshOutcome::Applied { keys: 1, .. }
        ));
        assert!(store.last_error().is_none());
        assert!(served(&store, "b").unwrap().key.disabled);
        // Gone for good.
        other
            .execute_batch("DROP TABLE keys; DROP TABLE projects; DROP TABLE meta;")
            .unwrap();
        assert!(store.refresh().is_err());
        assert!(store.last_error().is_some());
        assert!(served(&store, "a").is_some());
    }

    #[test]
    fn a_corrupt_changed_row_keeps_the_old_snapshot_serving() {
        let (_dir, path, _db, store) = setup();
        raw(&path)
            .execute_batch(
                "UPDATE meta SET value = value + 1;
                 UPDATE keys SET record = 'nonsense', updated_seq = 99 WHERE id = 'key_a';",
            )
            .unwrap();
        assert!(matches!(store.refresh(), Err(DbError::Corrupt(_))));
        assert!(served(&store, "a").is_some());
        assert!(store.last_error().is_some_and(|e| e.contains("key_a")));
    }

    #[test]
    fn recorded_uses_reach_the_database_at_refresh_without_a_change() {
        let (_dir, path, db, store) = setup();
        let seq = db.change_seq().unwrap();
        let t = Timestamp::from_unix_secs;
        let id = KeyId::new("key_a");
        store.record_use(&id, t(10));
        store.record_use(&id, t(30));
        store.record_use(&id, t(20));
        assert_eq!(db.key("key_a").unwrap().unwrap().last_used_at, None);
        assert_eq!(store.refresh().unwrap(), RefreshOutcome::Unchanged);
        assert_eq!(db.key("key_a").unwrap().unwrap().last_used_at, Some(t(30)));
        assert_eq!(db.key("key_b").unwrap().unwrap().last_used_at, None);
        assert_eq!(db.change_seq().unwrap(), seq);
        // A second gateway on the same file reloads nothing for it.
        let other = SqliteStore::open(&path).unwrap();
        store.record_use(&id, t(40));
        assert_eq!(store.flush_uses().unwrap(), 1);
        assert_eq!(other.refresh().unwrap(), RefreshOutcome::Unchanged);
        assert_eq!(db.key("key_a").unwrap().unwrap().last_used_at, Some(t(40)));
    }

    #[test]
    fn uses_that_cannot_be_written_wait_for_the_next_try() {
        let (_dir, path, db, store) = setup();
        let other = raw(&path);
        other
            .execute_batch("ALTER TABLE keys RENAME TO keys_gone")
            .unwrap();
        store.record_use(&KeyId::new("key_a"), Timestamp::from_unix_secs(10));
        assert!(store.flush_uses().is_err());
        other
            .execute_batch("ALTER TABLE keys_gone RENAME TO keys")
            .unwrap();
        assert_eq!(store.flush_uses().unwrap(), 1);
        assert_eq!(
            db.key("key_a").unwrap().unwrap().last_used_at,
            Some(Timestamp::from_unix_secs(10))
        );
    }

    #[test]
    fn a_database_gone_back_in_time_is_reloaded_whole() {
        let (_dir, path, mut db, store) = setup();
        db.insert_keys(&[key("key_c", "p", "c")], "admin").unwrap();
        store.refresh().unwrap();
        // As if an older copy were restored: fewer keys, a lower sequence.
        raw(&path)
            .execute_batch("DELETE FROM keys WHERE id = 'key_c'; UPDATE meta SET value = 1;")
            .unwrap();
        assert_eq!(
            store.refresh().unwrap(),
            RefreshOutcome::Reloaded {
                projects: 1,
                keys: 2
            }
        );
        assert!(served(&store, "c").is_none());
    }

    #[test]
    fn open_refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        std::fs::write(&path, [0xA5u8; 8192]).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, DbError::Open { .. }), "{err}");
        assert!(err.to_string().contains("keys.db"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn watch_applies_a_change_within_one_interval() {
        let (_dir, _path, mut db, store) = setup();
        let interval = Duration::from_secs(1);
        let handle = store.watch(interval);
        tokio::task::yield_now().await; // the watcher starts its clock now
        db.update_key("key_a", |k, _| {
            k.revoked_at = Some(Timestamp::from_unix_secs(5));
            Ok(())
        })
        .unwrap();
        store.record_use(&KeyId::new("key_b"), Timestamp::from_unix_secs(7));
        // Paused time: the sleep ends once the watcher's tick, and the refresh it runs on a
        // blocking thread, are done.
        tokio::time::sleep(interval + Duration::from_millis(1)).await;
        assert!(served(&store, "a").unwrap().key.revoked_at.is_some());
        assert_eq!(
            db.key("key_b").unwrap().unwrap().last_used_at,
            Some(Timestamp::from_unix_secs(7))
        );
        handle.abort();
    }

    #[test]
    fn clones_share_the_snapshot() {
        let (_dir, _path, mut db, store) = setup();
        let clone = store.clone();
        db.insert_keys(&[key("key_c", "p", "c")], "admin").unwrap();
        clone.refresh().unwrap();
        assert!(served(&store, "c").is_some());
        assert_eq!(store.path(), clone.path());
    }

    #[test]
    fn a_file_renamed_over_the_database_is_an_error_not_followed() {
        let (dir, path, _db, store) = setup();
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, [0x5Au8; 8192]).unwrap();
        std::fs::rename(&garbage, &path).unwrap();
        let err = store.refresh().unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
        assert!(store.last_error().is_some());
        assert!(served(&store, "a").is_some());
        std::fs::remove_file(&path).unwrap();
        assert!(store.refresh().is_err());
        assert!(served(&store, "a").is_some());
    }
}
