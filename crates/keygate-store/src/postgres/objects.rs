//! [`PgRegistry`]: the object registry in PostgreSQL (table `objects`), shared by replicas.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate_core::{ObjectKind, ObjectRecord, ObjectRegistry, RegistryFuture};

use super::db::{PgDb, deadline, pg_error};
use crate::error::DbError;
use crate::objects::{Cache, OBJECT_RECHECK, lock, prune_due, unavailable};

/// The object registry of gateway replicas on PostgreSQL: which project owns each object
/// created through any of them.
///
/// Answers come from a bounded in-memory cache (two generations of 65,536), else from one
/// indexed read; a record is written before its future resolves, so an object created
/// through one replica is found by every other. A removal anywhere (another replica, the
/// CLI) is seen within [`OBJECT_RECHECK`]: the cache is dropped when the database's count of
/// removals has moved. A known object's owner never changes.
pub struct PgRegistry {
    db: PgDb,
    cache: Mutex<Cache>,
    recheck: Duration,
    written: AtomicU64,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRegistry").finish_non_exhaustive()
    }
}

impl PgRegistry {
    /// The registry in `db`.
    pub fn new(db: PgDb) -> PgRegistry {
        PgRegistry {
            db,
            cache: Mutex::new(Cache::default()),
            recheck: OBJECT_RECHECK,
            written: AtomicU64::new(0),
        }
    }

    /// Checks cached answers against removals every `every` instead of every
    /// [`OBJECT_RECHECK`].
    #[must_use]
    pub fn with_recheck(mut self, every: Duration) -> Self {
        self.recheck = every;
        self
    }

    /// Drops the cache if objects were removed since it was last checked (one read per
    /// `recheck` interval, whatever the request rate).
    async fn recheck(&self) -> Result<(), DbError> {
        let now = Instant::now();
        let known = {
            let mut cache = lock(&self.cache);
            match cache.checked {
                Some((at, _)) if now.duration_since(at) < self.recheck => return Ok(()),
                Some((_, seq)) => {
                    // Others skip the read meanwhile.
                    cache.checked = Some((now, seq));
                    Some(seq)
                }
                None => None,
            }
        };
        let seq = self.db.objects_seq().await.inspect_err(|_| {
            // Not checked after all: the next call tries again.
            let mut cache = lock(&self.cache);
            if let Some(seq) = known {
                cache.checked = Some((now - self.recheck, seq));
            }
        })?;
        let mut cache = lock(&self.cache);
        if known.is_some_and(|k| k != seq) {
            cache.clear();
        }
        cache.checked = Some((now, seq));
        Ok(())
    }
}

impl ObjectRegistry for PgRegistry {
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        Box::pin(async move {
            self.recheck().await.map_err(unavailable)?;
            if let Some(r) = lock(&self.cache).get(id) {
                return Ok(Some(r));
            }
            let found = self.db.object(id).await.map_err(unavailable)?;
            Ok(found.map(|r| {
                let r = Arc::new(r);
                lock(&self.cache).insert(r.clone());
                r
            }))
        })
    }

    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        lock(&self.cache).note(&objects);
        let prune = prune_due(&self.written, &objects);
        Box::pin(async move {
            self.db
                .record_objects(&objects)
                .await
                .map_err(unavailable)?;
            if let Some(before) = prune {
                self.db
                    .prune_stored_results(before)
                    .await
                    .map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()> {
        lock(&self.cache).remove(id);
        Box::pin(async move {
            self.db.remove_object(id).await.map_err(unavailable)?;
            Ok(())
        })
    }
}

fn object_row(r: &tokio_postgres::Row) -> Result<ObjectRecord, DbError> {
    let id: String = r.get(0);
    let kind: String = r.get(1);
    let kind = ObjectKind::parse(&kind)
        .ok_or_else(|| DbError::Corrupt(format!("object {id} has an unknown kind {kind:?}")))?;
    let created_at: i64 = r.get(4);
    let mut record = ObjectRecord::new(
        id.as_str(),
        kind,
        r.get::<_, String>(2),
        r.get::<_, String>(3),
        u64::try_from(created_at).unwrap_or(0),
    );
    record.model = r.get(5);
    if let Some(models) = r.get::<_, Option<String>>(6) {
        let list: Vec<String> = serde_json::from_str(&models)
            .map_err(|_| DbError::Corrupt(format!("object {id}: unreadable models")))?;
        record.models = Some(list);
    }
    Ok(record)
}

const OBJECT: &str = "SELECT id, kind, project, key_id, created_at, model, models FROM objects";

impl PgDb {
    /// The object `id`, if recorded.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn object(&self, id: &str) -> Result<Option<ObjectRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_opt(&format!("{OBJECT} WHERE id = $1"), &[&id])
                .await
                .map_err(pg_error)?;
            row.as_ref().map(object_row).transpose()
        })
        .await
    }

    /// Records `objects` in one statement. A known id keeps its project: its model (and
    /// verified models) are updated only when the record names the same project.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn record_objects(&self, objects: &[ObjectRecord]) -> Result<(), DbError> {
        if objects.is_empty() {
            return Ok(());
        }
        let mut models = Vec::with_capacity(objects.len());
        for o in objects {
            models.push(
                o.models
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| DbError::Invalid(e.to_string()))?,
            );
        }
        let ids: Vec<&str> = objects.iter().map(|o| o.id.as_str()).collect();
        let kinds: Vec<&str> = objects.iter().map(|o| o.kind.as_str()).collect();
        let projects: Vec<&str> = objects.iter().map(|o| o.project.as_str()).collect();
        let keys: Vec<&str> = objects.iter().map(|o| o.key_id.as_str()).collect();
        let created: Vec<i64> = objects
            .iter()
            .map(|o| i64::try_from(o.created_at).unwrap_or(i64::MAX))
            .collect();
        let model: Vec<Option<&str>> = objects.iter().map(|o| o.model.as_deref()).collect();
        deadline(async {
            let client = self.client().await?;
            // The last record of an id given twice wins, as one after another would.
            client
                .execute(
                    "INSERT INTO objects (id, kind, project, key_id, created_at, model, models)
                     SELECT DISTINCT ON (id) id, kind, project, key_id, created_at, model, models
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                 $6::text[], $7::text[]) WITH ORDINALITY
                          AS o(id, kind, project, key_id, created_at, model, models, n)
                     ORDER BY id, n DESC
                     ON CONFLICT (id) DO UPDATE SET
                         model = COALESCE(excluded.model, objects.model),
                         models = COALESCE(excluded.models, objects.models)
                     WHERE objects.project = excluded.project",
                    &[&ids, &kinds, &projects, &keys, &created, &model, &models],
                )
                .await
                .map_err(pg_error)?;
            Ok(())
        })
        .await
    }

    /// Forgets object `id`; true if it was recorded.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn remove_object(&self, id: &str) -> Result<bool, DbError> {
        let removed = self
            .delete_objects("DELETE FROM objects WHERE id = $1", &[&id])
            .await?;
        Ok(removed > 0)
    }

    /// Forgets stored responses and chat completions recorded before `before` (Unix
    /// seconds); how many.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn prune_stored_results(&self, before: u64) -> Result<u64, DbError> {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        self.delete_objects(
            "DELETE FROM objects WHERE kind IN ('response', 'chat_completion') \
             AND created_at < $1",
            &[&before],
        )
        .await
    }

    /// Runs one `DELETE` of objects and, if it removed any, counts a removal in
    /// `objects_seq` (which replicas recheck), in one transaction; how many it removed.
    async fn delete_objects(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, DbError> {
        deadline(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let n = tx.execute(sql, params).await.map_err(pg_error)?;
            if n > 0 {
                tx.execute(
                    "UPDATE meta SET value = value + 1 WHERE name = 'objects_seq'",
                    &[],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(n)
        })
        .await
    }

    /// The count of removals so far.
    async fn objects_seq(&self) -> Result<i64, DbError> {
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT value FROM meta WHERE name = 'objects_seq'", &[])
                .await
                .map_err(pg_error)?;
            Ok(row.get(0))
        })
        .await
    }

    /// The objects of `project` (of `kind`, if given), oldest first.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn objects(
        &self,
        project: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Vec<ObjectRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "{OBJECT} WHERE project = $1 AND ($2::text IS NULL OR kind = $2) \
                         ORDER BY created_at, id"
                    ),
                    &[&project, &kind.map(ObjectKind::as_str)],
                )
                .await
                .map_err(pg_error)?;
            rows.iter().map(object_row).collect()
        })
        .await
    }
}
