//! [`SqliteRegistry`]: the object registry in the SQLite database (table `objects`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keygate_core::{ObjectKind, ObjectRecord, ObjectRegistry, RegistryError, RegistryFuture};
use rusqlite::{OptionalExtension, params};

use crate::{Db, DbError};

/// How often a cached answer is checked against removals by other processes (the CLI,
/// another gateway): a removal is seen within this.
pub const OBJECT_RECHECK: Duration = Duration::from_secs(1);

/// How long stored responses and chat completions are kept in the registry: the 30 days the
/// upstream keeps them.
pub const STORED_RESULT_DAYS: u64 = 30;

/// Records written between two prunes of expired stored results.
const PRUNE_EVERY: u64 = 10_000;

/// Records kept in memory per generation of the cache (two generations: at most twice
/// this many).
const CACHE_GENERATION: usize = 1 << 16;

/// The object registry of a gateway on the embedded database: every object created through
/// keygate, with its owning project, in the `objects` table (indexed by id, and by project,
/// kind and creation time), so ownership survives restarts.
///
/// A lookup is answered from an in-memory cache of the objects most recently recorded or
/// read (bounded: two generations of 65,536), else by one indexed read. A record is in the
/// cache at once (a request that follows it in this process finds it) and written to the
/// database on a blocking thread before its future resolves.
///
/// A removal by another process (`keygate objects remove`) is seen within [`OBJECT_RECHECK`]: the
/// cache is dropped when the database's count of removals has moved.
///
/// An existing object's owner never changes: recording an id again (an assistant updated
/// with a new model) updates its model only if the project is the same.
pub struct SqliteRegistry {
    reader: Mutex<Db>,
    writer: Arc<Mutex<Db>>,
    cache: Mutex<Cache>,
    recheck: Duration,
    written: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRegistry").finish_non_exhaustive()
    }
}

/// The objects most recently recorded or read: two generations, each at most
/// [`CACHE_GENERATION`].
#[derive(Default)]
pub(crate) struct Cache {
    current: HashMap<String, Arc<ObjectRecord>>,
    previous: HashMap<String, Arc<ObjectRecord>>,
    /// The database's count of removals when the cache was last checked, and when.
    pub(crate) checked: Option<(Instant, i64)>,
}

impl Cache {
    pub(crate) fn get(&mut self, id: &str) -> Option<Arc<ObjectRecord>> {
        if let Some(r) = self.current.get(id) {
            return Some(r.clone());
        }
        let r = self.previous.remove(id)?;
        self.insert(r.clone());
        Some(r)
    }

    pub(crate) fn insert(&mut self, r: Arc<ObjectRecord>) {
        if self.current.len() >= CACHE_GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(r.id.clone(), r);
    }

    pub(crate) fn remove(&mut self, id: &str) {
        self.current.remove(id);
        self.previous.remove(id);
    }

    /// Notes records about to be written; the owner of a known object never changes.
    pub(crate) fn note(&mut self, objects: &[ObjectRecord]) {
        for o in objects {
            let keep = self
                .get(&o.id)
                .is_some_and(|known| known.project != o.project);
            if !keep {
                self.insert(Arc::new(o.clone()));
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts `objects` as written; now and then (every [`PRUNE_EVERY`] records) the time before
/// which stored results are past their upstream's retention, to forget them.
pub(crate) fn prune_due(
    written: &std::sync::atomic::AtomicU64,
    objects: &[ObjectRecord],
) -> Option<u64> {
    let n = objects.len() as u64;
    let before = written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    (before / PRUNE_EVERY != (before + n) / PRUNE_EVERY).then(|| {
        objects
            .iter()
            .map(|o| o.created_at)
            .max()
            .unwrap_or(0)
            .saturating_sub(STORED_RESULT_DAYS * 86_400)
    })
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(format!("object registry: {e}"))
}

impl SqliteRegistry {
    /// Opens the registry in the database at `path` (created and migrated if needed).
    ///
    /// # Errors
    ///
    /// The database cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteRegistry, DbError> {
        let writer = Db::open(path.as_ref())?;
        // A record lost to a power cut only makes its object refused to everyone (fail
        // closed): no `fsync` per record.
        writer.conn().pragma_update(None, "synchronous", "NORMAL")?;
        Ok(SqliteRegistry {
            reader: Mutex::new(Db::open(path.as_ref())?),
            writer: Arc::new(Mutex::new(writer)),
            cache: Mutex::new(Cache::default()),
            recheck: OBJECT_RECHECK,
            written: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks cached answers against removals by other processes every `every` instead of
    /// every [`OBJECT_RECHECK`].
    #[must_use]
    pub fn with_recheck(mut self, every: Duration) -> Self {
        self.recheck = every;
        self
    }

    /// Drops the cache if another process removed objects since it was last checked.
    fn recheck(&self, cache: &mut Cache) -> Result<(), DbError> {
        let now = Instant::now();
        if let Some((at, _)) = cache.checked
            && now.duration_since(at) < self.recheck
        {
            return Ok(());
        }
        let seq = lock(&self.reader).objects_seq()?;
        if cache.checked.is_some_and(|(_, known)| known != seq) {
            cache.clear();
        }
        cache.checked = Some((now, seq));
        Ok(())
    }

    fn read(&self, id: &str) -> Result<Option<ObjectRecord>, DbError> {
        lock(&self.reader).object(id)
    }
}

impl ObjectRegistry for SqliteRegistry {
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        let cached = {
            let mut cache = lock(&self.cache);
            match self.recheck(&mut cache) {
                Ok(()) => cache.get(id),
                Err(e) => return Box::pin(async move { Err(unavailable(e)) }),
            }
        };
        let found = match cached {
            Some(r) => Ok(Some(r)),
            None => self.read(id).map_err(unavailable).map(|r| {
                r.map(|r| {
                    let r = Arc::new(r);
                    lock(&self.cache).insert(r.clone());
                    r
                })
            }),
        };
        Box::pin(async move { found })
    }

    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        {
            lock(&self.cache).note(&objects);
        }
        let writer = self.writer.clone();
        let prune = prune_due(&self.written, &objects);
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let mut db = lock(&writer);
                db.record_objects(&objects)?;
                if let Some(before) = prune {
                    db.prune_stored_results(before)?;
                }
                Ok::<_, DbError>(())
            })
            .await
            .map_err(unavailable)?;
            written.map_err(unavailable)
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()> {
        lock(&self.cache).remove(id);
        let writer = self.writer.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let done = tokio::task::spawn_blocking(move || lock(&writer).remove_object(&id))
                .await
                .map_err(unavailable)?;
            done.map(|_| ()).map_err(unavailable)
        })
    }
}

impl Db {
    /// The object `id`, if recorded.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn object(&self, id: &str) -> Result<Option<ObjectRecord>, DbError> {
        let row = self
            .conn()
            .prepare_cached(
                "SELECT kind, project, key_id, created_at, model, models FROM objects WHERE id = ?1",
            )?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .optional()?;
        let Some((kind, project, key_id, created_at, model, models)) = row else {
            return Ok(None);
        };
        let kind = ObjectKind::parse(&kind)
            .ok_or_else(|| DbError::Sqlite(format!("object {id} has an unknown kind {kind:?}")))?;
        let mut record = ObjectRecord::new(
            id,
            kind,
            project,
            key_id,
            u64::try_from(created_at).unwrap_or(0),
        );
        record.model = model;
        if let Some(models) = models {
            let list: Vec<String> = serde_json::from_str(&models)
                .map_err(|e| DbError::Sqlite(format!("object {id}: bad models: {e}")))?;
            record.models = Some(list);
        }
        Ok(Some(record))
    }

    /// Records `objects` in one transaction. A known id keeps its project: its model (and
    /// verified models) are updated only when the record names the same project.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn record_objects(&mut self, objects: &[ObjectRecord]) -> Result<(), DbError> {
        let tx = self.conn_mut().transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO objects (id, kind, project, key_id, created_at, model, models)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET
                     model = COALESCE(excluded.model, objects.model),
                     models = COALESCE(excluded.models, objects.models)
                 WHERE objects.project = excluded.project",
            )?;
            for o in objects {
                let models = o
                    .models
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| DbError::Sqlite(e.to_string()))?;
                insert.execute(params![
                    o.id,
                    o.kind.as_str(),
                    o.project,
                    o.key_id,
                    i64::try_from(o.created_at).unwrap_or(i64::MAX),
                    o.model,
                    models
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets object `id`; true if it was recorded.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn remove_object(&mut self, id: &str) -> Result<bool, DbError> {
        let tx = self.conn_mut().transaction()?;
        let removed = tx
            .prepare_cached("DELETE FROM objects WHERE id = ?1")?
            .execute([id])?
            > 0;
        if removed {
            tx.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'objects_seq'",
                [],
            )?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Forgets stored responses and chat completions recorded before `before` (Unix
    /// seconds); how many.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn prune_stored_results(&mut self, before: u64) -> Result<usize, DbError> {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let tx = self.conn_mut().transaction()?;
        let n = tx.execute(
            "DELETE FROM objects WHERE kind IN ('response', 'chat_completion') AND created_at < ?1",
            [before],
        )?;
        if n > 0 {
            tx.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'objects_seq'",
                [],
            )?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// The count of removals so far.
    fn objects_seq(&self) -> Result<i64, DbError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT value FROM meta WHERE name = 'objects_seq'")?
            .query_row([], |r| r.get(0))?)
    }

    /// The objects of `project` (of `kind`, if given), oldest first.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn objects(
        &self,
        project: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Vec<ObjectRecord>, DbError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT id FROM objects WHERE project = ?1 AND (?2 IS NULL OR kind = ?2)
             ORDER BY created_at, id",
        )?;
        let ids: Vec<String> = stmt
            .query_map(params![project, kind.map(ObjectKind::as_str)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        ids.iter()
            .filter_map(|id| self.object(id).transpose())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_survive_a_reopen_and_keep_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        {
            let r = SqliteRegistry::open(&path).unwrap();
            r.record(vec![
                ObjectRecord::new("asst_1", ObjectKind::Assistant, "a", "key_a", 7)
                    .with_model("gpt-4o"),
                ObjectRecord::new("file-1", ObjectKind::File, "a", "key_a", 8)
                    .with_models(vec!["gpt-4o".into()]),
            ])
            .await
            .unwrap();
            // Another project recording the same id changes nothing.
            r.record(vec![
                ObjectRecord::new("asst_1", ObjectKind::Assistant, "b", "key_b", 9).with_model("x"),
            ])
            .await
            .unwrap();
            assert_eq!(r.get("asst_1").await.unwrap().unwrap().project, "a");
        }
        let r = SqliteRegistry::open(&path).unwrap();
        let asst = r.get("asst_1").await.unwrap().unwrap();
        assert_eq!(
            (
                asst.project.as_str(),
                asst.model.as_deref(),
                asst.created_at
            ),
            ("a", Some("gpt-4o"), 7)
        );
        let file = r.get("file-1").await.unwrap().unwrap();
        assert_eq!(file.models, Some(vec!["gpt-4o".to_owned()]));
        // The same project updating its assistant's model.
        r.record(vec![
            ObjectRecord::new("asst_1", ObjectKind::Assistant, "a", "key_a", 10)
                .with_model("gpt-4o-mini"),
        ])
        .await
        .unwrap();
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.object("asst_1").unwrap().unwrap().model.as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(db.objects("a", None).unwrap().len(), 2);
        assert_eq!(db.objects("a", Some(ObjectKind::File)).unwrap().len(), 1);
        r.remove("file-1").await.unwrap();
        assert!(r.get("file-1").await.unwrap().is_none());
        assert!(db.object("file-1").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_removal_by_another_process_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let r = SqliteRegistry::open(&path)
            .unwrap()
            .with_recheck(Duration::ZERO);
        r.record(vec![ObjectRecord::new(
            "file-1",
            ObjectKind::File,
            "a",
            "k",
            1,
        )])
        .await
        .unwrap();
        assert!(r.get("file-1").await.unwrap().is_some());
        // The CLI, say, on its own connection.
        assert!(Db::open(&path).unwrap().remove_object("file-1").unwrap());
        assert!(r.get("file-1").await.unwrap().is_none());
    }

    #[test]
    fn stored_results_past_their_retention_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path().join("k.db")).unwrap();
        db.record_objects(&[
            ObjectRecord::new("resp_old", ObjectKind::Response, "a", "k", 10),
            ObjectRecord::new("resp_new", ObjectKind::Response, "a", "k", 100),
            ObjectRecord::new("file-old", ObjectKind::File, "a", "k", 10),
        ])
        .unwrap();
        assert_eq!(db.prune_stored_results(50).unwrap(), 1);
        assert!(db.object("resp_old").unwrap().is_none());
        assert!(db.object("resp_new").unwrap().is_some());
        assert!(
            db.object("file-old").unwrap().is_some(),
            "files are kept until deleted"
        );
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let mut cache = Cache::default();
        let rec = |i: usize| {
            Arc::new(ObjectRecord::new(
                format!("o{i}"),
                ObjectKind::File,
                "p",
                "k",
                0,
            ))
        };
        for i in 0..CACHE_GENERATION * 3 {
            cache.insert(rec(i));
            // The first one stays, being used.
            assert!(cache.get("o0").is_some());
        }
        assert!(cache.current.len() + cache.previous.len() <= 2 * CACHE_GENERATION);
        assert!(cache.get("o1").is_none());
    }
}
