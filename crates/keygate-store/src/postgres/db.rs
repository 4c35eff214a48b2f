//! [`PgDb`]: the keygate database on PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use keygate_core::admin::AuditBy;
use keygate_core::{KeyDigest, KeyId, KeyRecord, ProjectRecord, Snapshot, Timestamp};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::admin::{insert_event, insert_events};
use super::schema::{MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION};
use crate::admin::{key_event, project_event};
use crate::db::{
    Changes, ImportOutcome, StoredKey, changed_key, changed_project, check_key_file, check_record,
    digest_taken, key_digests, nanos, parse_key, parse_project, to_json,
};
use crate::error::DbError;
use crate::file::{KEY_FILE_VERSION, KeyFile};

/// How long one database operation may take, waiting for a connection included. Past it the
/// operation fails with [`DbError::Unavailable`] (a request that needs it gets 503).
pub const PG_DEADLINE: Duration = Duration::from_secs(5);

/// The NOTIFY channel every change to projects or keys is announced on (the payload is the
/// new change sequence number).
pub(crate) const CHANGES_CHANNEL: &str = "keygate_changes";

/// Keys inserted per statement by a bulk insert.
const INSERT_CHUNK: usize = 5_000;

/// A connection pool to the keygate database on PostgreSQL: what the CLI, the admin tools
/// and a gateway's [`PgStore`](crate::PgStore) use.
///
/// The same records, rules and errors as the SQLite [`Db`](crate::Db), asynchronous. Any
/// number of `PgDb`s, in any number of processes, may use one database: every
/// read-modify-write locks the change counter's row first, so writers take turns (and take
/// change numbers in the order they commit) instead of losing each other's changes. Every
/// change is announced with `NOTIFY keygate_changes` when it commits.
///
/// Every call has a deadline ([`PG_DEADLINE`], waiting for a connection included).
#[derive(Clone)]
pub struct PgDb {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password: only where it goes.
        f.debug_struct("PgDb")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error as a [`DbError`]: the server's severity, code and message (never its
/// detail, which quotes values), or [`DbError::Unavailable`] for a connection that failed.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> DbError {
    match e.as_db_error() {
        Some(db) => DbError::Postgres(format!(
            "{} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        )),
        None => DbError::Unavailable(e.to_string()),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> DbError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => DbError::Unavailable(other.to_string()),
    }
}

/// Runs `op` within [`PG_DEADLINE`].
pub(crate) async fn deadline<T>(
    op: impl Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(PG_DEADLINE, op).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Unavailable(format!(
            "no answer within {PG_DEADLINE:?}"
        ))),
    }
}

/// Parses a `postgres://` (or `postgresql://`, or `key=value`) connection string, with
/// keygate's defaults for what it does not say: a 5 s connect timeout and
/// `application_name=keygate`.
pub(crate) fn pg_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|_| DbError::Open {
        path: "postgres".into(),
        // tokio-postgres's message may quote the string, and so its password.
        message: "the PostgreSQL URL cannot be parsed".to_owned(),
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PG_DEADLINE);
    }
    if config.get_application_name().is_none() {
        config.application_name("keygate");
    }
    Ok(config)
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

impl PgDb {
    /// Connects to the database at `url` (`postgres://user:password@host:port/dbname`, or a
    /// Unix socket directory as the host: `postgres://user@%2Frun%2Fpostgresql/dbname`) and
    /// brings its schema up to date in one transaction (under an advisory lock, so replicas
    /// starting together migrate once).
    ///
    /// # Errors
    ///
    /// [`DbError::Open`] for a URL that cannot be parsed, [`DbError::Unavailable`] when the
    /// server cannot be reached, [`DbError::TooNew`] when a newer keygate made the schema,
    /// [`DbError::Postgres`] when a migration is refused.
    pub async fn connect(url: &str) -> Result<PgDb, DbError> {
        let config = pg_config(url)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(PG_DEADLINE))
            .create_timeout(Some(PG_DEADLINE))
            .recycle_timeout(Some(PG_DEADLINE))
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        let db = PgDb { pool, config };
        deadline(db.migrate()).await?;
        Ok(db)
    }

    /// The connection settings (for a dedicated listening connection).
    pub(crate) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, DbError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_error)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS keygate_schema (version INTEGER NOT NULL)")
            .await
            .map_err(pg_error)?;
        let found: i32 = tx
            .query_opt("SELECT version FROM keygate_schema", &[])
            .await
            .map_err(pg_error)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(DbError::TooNew {
                found: found as u32,
                supported: SCHEMA_VERSION as u32,
            });
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version > found) {
            tx.batch_execute(migration.sql).await.map_err(pg_error)?;
            tracing::info!(
                version = migration.version,
                "PostgreSQL key database migrated"
            );
        }
        if found < SCHEMA_VERSION {
            tx.execute("DELETE FROM keygate_schema", &[])
                .await
                .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO keygate_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    /// The schema version the database is at.
    ///
    /// # Errors
    ///
    /// [`DbError::Postgres`] or [`DbError::Unavailable`] when it cannot be read.
    pub async fn schema_version(&self) -> Result<u32, DbError> {
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT version FROM keygate_schema", &[])
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, i32>(0) as u32)
        })
        .await
    }

    /// The current change sequence number.
    ///
    /// # Errors
    ///
    /// As [`PgDb::schema_version`].
    pub async fn change_seq(&self) -> Result<u64, DbError> {
        deadline(async {
            let client = self.client().await?;
            read_seq(&client).await
        })
        .await
    }

    /// Every project, sorted by id.
    ///
    /// # Errors
    ///
    /// [`DbError::Postgres`] or [`DbError::Unavailable`] when the database cannot be read,
    /// [`DbError::Corrupt`] for a row that is not a project record.
    pub async fn projects(&self) -> Result<Vec<ProjectRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            read_projects(&client).await
        })
        .await
    }

    /// The project `id`.
    ///
    /// # Errors
    ///
    /// As [`PgDb::projects`].
    pub async fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            read_project(&client, id).await
        })
        .await
    }

    /// The keys of `project`, or every key, sorted by creation time then id.
    ///
    /// # Errors
    ///
    /// As [`PgDb::projects`].
    pub async fn keys(&self, project: Option<&str>) -> Result<Vec<StoredKey>, DbError> {
        deadline(async {
            let client = self.client().await?;
            read_stored_keys(&client, project).await
        })
        .await
    }

    /// The key `id`.
    ///
    /// # Errors
    ///
    /// As [`PgDb::projects`].
    pub async fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError> {
        deadline(async {
            let client = self.client().await?;
            read_stored_key(&client, id).await
        })
        .await
    }

    /// Creates a project.
    ///
    /// # Errors
    ///
    /// [`DbError::Invalid`] when the record fails [`ProjectRecord::validate`],
    /// [`DbError::Exists`] when the id is taken, [`DbError::Postgres`] or
    /// [`DbError::Unavailable`] when it cannot be written.
    pub async fn create_project(&self, project: &ProjectRecord) -> Result<(), DbError> {
        self.create_project_by(project, None).await
    }

    /// [`PgDb::create_project`], recording `by` in the same transaction.
    ///
    /// # Errors
    ///
    /// As [`PgDb::create_project`].
    pub async fn create_project_as(
        &self,
        project: &ProjectRecord,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        self.create_project_by(project, Some(by)).await
    }

    async fn create_project_by(
        &self,
        project: &ProjectRecord,
        by: Option<AuditBy<'_>>,
    ) -> Result<(), DbError> {
        project.validate().map_err(DbError::Invalid)?;
        deadline(async {
            let mut client = self.client().await?;
            let mut w = Writer::begin(&mut client).await?;
            if read_project(w.tx(), &project.id).await?.is_some() {
                return Err(DbError::Exists(format!("project {:?}", project.id)));
            }
            w.write_project(project, false).await?;
            if let Some(by) = by {
                let event = project_event(by, None, Some(project))?;
                insert_event(w.tx(), &event).await?;
            }
            w.commit().await
        })
        .await
    }

    /// Changes the project `id` with `f`, in one transaction: read, change, validate, write.
    /// Nothing is written when `f` fails or leaves the record as it was.
    ///
    /// # Errors
    ///
    /// As [`Db::update_project`](crate::Db::update_project).
    pub async fn update_project<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_project_by(id, None, f).await
    }

    /// [`PgDb::update_project`], recording `by` (before and after) in the same transaction
    /// when it changes anything.
    ///
    /// # Errors
    ///
    /// As [`PgDb::update_project`].
    pub async fn update_project_as<T>(
        &self,
        id: &str,
        by: AuditBy<'_>,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_project_by(id, Some(by), f).await
    }

    async fn update_project_by<T>(
        &self,
        id: &str,
        by: Option<AuditBy<'_>>,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        deadline(async {
            let mut client = self.client().await?;
            let mut w = Writer::begin(&mut client).await?;
            let old = read_project(w.tx(), id)
                .await?
                .ok_or_else(|| DbError::NotFound(format!("project {id:?}")))?;
            let (out, project) = changed_project(&old, f)?;
            if let Some(project) = project {
                w.write_project(&project, true).await?;
                if let Some(by) = by {
                    let event = project_event(by, Some(&old), Some(&project))?;
                    insert_event(w.tx(), &event).await?;
                }
                w.commit().await?;
            }
            Ok(out)
        })
        .await
    }

    /// Adds keys, all in one transaction: either every key is added or none is. Checked and
    /// written a few thousand at a time (one statement each), so 100,000 keys take seconds.
    ///
    /// # Errors
    ///
    /// As [`Db::insert_keys`](crate::Db::insert_keys).
    pub async fn insert_keys(&self, keys: &[KeyRecord], created_by: &str) -> Result<(), DbError> {
        self.insert_keys_by(keys, created_by, None).await
    }

    /// [`PgDb::insert_keys`], recording `by` for each key in the same transaction.
    ///
    /// # Errors
    ///
    /// As [`PgDb::insert_keys`].
    pub async fn insert_keys_as(
        &self,
        keys: &[KeyRecord],
        created_by: &str,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        self.insert_keys_by(keys, created_by, Some(by)).await
    }

    async fn insert_keys_by(
        &self,
        keys: &[KeyRecord],
        created_by: &str,
        by: Option<AuditBy<'_>>,
    ) -> Result<(), DbError> {
        // Checked before any I/O: records, ids and digests among themselves.
        let mut ids = HashSet::with_capacity(keys.len());
        let mut digests: HashMap<KeyDigest, &KeyId> = HashMap::with_capacity(keys.len());
        for key in keys {
            check_record(key)?;
            if !ids.insert(key.id.as_str()) {
                return Err(DbError::Exists(format!("key {}", key.id)));
            }
            for digest in key_digests(key) {
                if let Some(owner) = digests.insert(digest, &key.id) {
                    return Err(digest_taken(key, owner.as_str()));
                }
            }
        }
        // A deadline per chunk: the whole may take longer than one call's.
        let mut client = deadline(self.client()).await?;
        let mut w = deadline(Writer::begin(&mut client)).await?;
        let projects: Vec<&str> = keys
            .iter()
            .map(|k| k.project.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let found: HashSet<String> = deadline(async {
            let rows = w
                .tx()
                .query("SELECT id FROM projects WHERE id = ANY($1)", &[&projects])
                .await
                .map_err(pg_error)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await?;
        if let Some(key) = keys.iter().find(|k| !found.contains(&k.project)) {
            return Err(DbError::NotFound(format!(
                "project {:?} of key {}",
                key.project, key.id
            )));
        }
        for chunk in keys.chunks(INSERT_CHUNK) {
            deadline(w.insert_keys(chunk, created_by)).await?;
            if let Some(by) = by {
                let events = chunk
                    .iter()
                    .map(|k| key_event(by, None, Some(k)))
                    .collect::<Result<Vec<_>, _>>()?;
                deadline(insert_events(w.tx(), &events)).await?;
            }
        }
        deadline(w.commit()).await
    }

    /// Changes the key `id` with `f`, in one transaction: read, change, validate, write, so
    /// two processes changing one key never lose each other's change. `f` also gets the
    /// key's disabled reason. Nothing is written when `f` fails or changes nothing.
    ///
    /// # Errors
    ///
    /// As [`Db::update_key`](crate::Db::update_key).
    pub async fn update_key<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_key_by(id, None, f).await
    }

    /// [`PgDb::update_key`], recording `by` (before and after) in the same transaction when
    /// it changes anything.
    ///
    /// # Errors
    ///
    /// As [`PgDb::update_key`].
    pub async fn update_key_as<T>(
        &self,
        id: &str,
        by: AuditBy<'_>,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_key_by(id, Some(by), f).await
    }

    async fn update_key_by<T>(
        &self,
        id: &str,
        by: Option<AuditBy<'_>>,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        deadline(async {
            let mut client = self.client().await?;
            let mut w = Writer::begin(&mut client).await?;
            let old = read_stored_key(w.tx(), id)
                .await?
                .ok_or_else(|| DbError::NotFound(format!("key {id}")))?;
            let (out, changed) = changed_key(&old, f)?;
            let Some((record, reason)) = changed else {
                return Ok(out);
            };
            check_project_exists(w.tx(), &record).await?;
            check_digests_free(w.tx(), &record).await?;
            w.update_key(&record, reason.as_deref()).await?;
            if let Some(by) = by {
                let event = key_event(by, Some(&old.record), Some(&record))?;
                insert_event(w.tx(), &event).await?;
            }
            w.commit().await?;
            Ok(out)
        })
        .await
    }

    /// Adds or replaces (by id) the projects and keys of a key file, in one transaction, as
    /// [`Db::import`](crate::Db::import) does.
    ///
    /// # Errors
    ///
    /// As [`Db::import`](crate::Db::import).
    pub async fn import(&self, file: &KeyFile, created_by: &str) -> Result<ImportOutcome, DbError> {
        check_key_file(file)?;
        let mut client = deadline(self.client()).await?;
        let mut w = deadline(Writer::begin(&mut client)).await?;
        let mut outcome = ImportOutcome::default();
        let stored_projects: HashMap<String, ProjectRecord> = deadline(read_projects(w.tx()))
            .await?
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        for project in &file.projects {
            let old = stored_projects.get(&project.id);
            if old == Some(project) {
                continue;
            }
            deadline(w.write_project(project, old.is_some())).await?;
            outcome.projects += 1;
        }
        let stored: HashMap<String, StoredKey> = deadline(read_stored_keys(w.tx(), None))
            .await?
            .into_iter()
            .map(|k| (k.record.id.as_str().to_owned(), k))
            .collect();
        let mut new = Vec::new();
        for key in &file.keys {
            match stored.get(key.id.as_str()) {
                Some(old) if old.record == *key => {}
                Some(old) => {
                    deadline(async {
                        check_project_exists(w.tx(), key).await?;
                        check_digests_free(w.tx(), key).await?;
                        w.update_key(key, old.disabled_reason.as_deref()).await
                    })
                    .await?;
                    outcome.keys += 1;
                }
                None => new.push(key.clone()),
            }
        }
        for key in &new {
            deadline(check_project_exists(w.tx(), key)).await?;
        }
        for chunk in new.chunks(INSERT_CHUNK) {
            deadline(w.insert_keys(chunk, created_by)).await?;
        }
        outcome.keys += new.len();
        deadline(w.commit()).await?;
        Ok(outcome)
    }

    /// Everything as a key file: projects by id, keys by creation time then id (read in one
    /// snapshot).
    ///
    /// # Errors
    ///
    /// As [`PgDb::projects`].
    pub async fn export(&self) -> Result<KeyFile, DbError> {
        let mut client = deadline(self.client()).await?;
        let tx = deadline(repeatable_read(&mut client)).await?;
        let projects = deadline(read_projects(&tx)).await?;
        let keys = deadline(read_stored_keys(&tx, None))
            .await?
            .into_iter()
            .map(|k| k.record)
            .collect();
        deadline(async { tx.commit().await.map_err(pg_error) }).await?;
        Ok(KeyFile {
            version: KEY_FILE_VERSION,
            projects,
            keys,
        })
    }

    /// Records when keys were last used, in one statement. A key keeps the latest time it
    /// was given; unknown ids are skipped. Not a change: no change number, no notification.
    ///
    /// # Errors
    ///
    /// [`DbError::Postgres`] or [`DbError::Unavailable`] when it cannot be written.
    pub async fn touch_last_used(&self, uses: &[(KeyId, Timestamp)]) -> Result<(), DbError> {
        if uses.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = uses.iter().map(|(id, _)| id.as_str()).collect();
        let at: Vec<i64> = uses.iter().map(|(_, t)| nanos(*t)).collect();
        deadline(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE keys SET last_used_at = u.at \
                     FROM UNNEST($1::text[], $2::bigint[]) AS u(id, at) \
                     WHERE keys.id = u.id AND (keys.last_used_at IS NULL OR keys.last_used_at < u.at)",
                    &[&ids, &at],
                )
                .await
                .map_err(pg_error)?;
            Ok(())
        })
        .await
    }

    /// Every project and key as a validated [`Snapshot`], with the change sequence number it
    /// reflects (read in one snapshot of the database, so the two agree).
    ///
    /// # Errors
    ///
    /// As [`PgDb::projects`], and [`DbError::Corrupt`] for records that do not make a
    /// snapshot.
    pub async fn load(&self) -> Result<(Snapshot, u64), DbError> {
        // A whole load may take longer than one call's deadline at a million keys.
        let mut client = deadline(self.client()).await?;
        let tx = deadline(repeatable_read(&mut client)).await?;
        let seq = deadline(read_seq(&tx)).await?;
        let projects = deadline(read_projects(&tx)).await?;
        let rows = tokio::time::timeout(
            PG_DEADLINE * 12,
            tx.query("SELECT id, record FROM keys", &[]),
        )
        .await
        .map_err(|_| DbError::Unavailable("loading the keys took over a minute".to_owned()))?
        .map_err(pg_error)?;
        let keys = rows
            .iter()
            .map(|r| parse_key(r.get(0), r.get(1)))
            .collect::<Result<Vec<_>, _>>()?;
        deadline(async { tx.commit().await.map_err(pg_error) }).await?;
        let snapshot =
            Snapshot::new(projects, keys).map_err(|e| DbError::Corrupt(e.to_string()))?;
        Ok((snapshot, seq))
    }

    /// The projects and keys changed after change sequence number `seq`, and the number they
    /// bring a reader up to (read in one snapshot of the database).
    ///
    /// # Errors
    ///
    /// As [`PgDb::load`].
    pub async fn changes_since(&self, seq: u64) -> Result<Changes, DbError> {
        deadline(async {
            let after = i64::try_from(seq).unwrap_or(i64::MAX);
            let mut client = self.client().await?;
            let tx = repeatable_read(&mut client).await?;
            let now = read_seq(&tx).await?;
            let mut changes = Changes {
                seq: now,
                ..Changes::default()
            };
            if now > seq {
                let rows = tx
                    .query(
                        "SELECT id, record FROM projects WHERE updated_seq > $1 ORDER BY id",
                        &[&after],
                    )
                    .await
                    .map_err(pg_error)?;
                for r in &rows {
                    changes.projects.push(parse_project(r.get(0), r.get(1))?);
                }
                let rows = tx
                    .query(
                        "SELECT id, record FROM keys WHERE updated_seq > $1 \
                         ORDER BY created_at, id",
                        &[&after],
                    )
                    .await
                    .map_err(pg_error)?;
                for r in &rows {
                    changes.keys.push(parse_key(r.get(0), r.get(1))?);
                }
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(changes)
        })
        .await
    }
}

/// A read-only transaction that sees one snapshot of the database throughout.
async fn repeatable_read(client: &mut deadpool_postgres::Client) -> Result<Tx<'_>, DbError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_error)
}

/// A changing transaction: holds the change counter's row lock from its start (so writers
/// take turns), takes the next change number on its first write, and announces it on commit.
struct Writer<'c> {
    tx: Tx<'c>,
    seq: Option<i64>,
}

impl<'c> Writer<'c> {
    async fn begin(client: &'c mut deadpool_postgres::Client) -> Result<Writer<'c>, DbError> {
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT value FROM meta WHERE name = 'change_seq' FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_error)?;
        Ok(Writer { tx, seq: None })
    }

    fn tx(&self) -> &Tx<'c> {
        &self.tx
    }

    async fn seq(&mut self) -> Result<i64, DbError> {
        if let Some(seq) = self.seq {
            return Ok(seq);
        }
        let row = self
            .tx
            .query_one(
                "UPDATE meta SET value = value + 1 WHERE name = 'change_seq' RETURNING value",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let seq: i64 = row.get(0);
        self.seq = Some(seq);
        Ok(seq)
    }

    async fn write_project(
        &mut self,
        project: &ProjectRecord,
        exists: bool,
    ) -> Result<(), DbError> {
        let seq = self.seq().await?;
        let json = to_json(project)?;
        let sql = if exists {
            "UPDATE projects SET record = $2, updated_seq = $3 WHERE id = $1"
        } else {
            "INSERT INTO projects (id, record, updated_seq) VALUES ($1, $2, $3)"
        };
        let stmt = self.tx.prepare_cached(sql).await.map_err(pg_error)?;
        self.tx
            .execute(&stmt, &[&project.id, &json, &seq])
            .await
            .map_err(|e| unique_to_exists(e, &format!("project {:?}", project.id)))?;
        Ok(())
    }

    /// Inserts keys in one statement, after checking that no id or digest is taken.
    async fn insert_keys(&mut self, keys: &[KeyRecord], created_by: &str) -> Result<(), DbError> {
        if keys.is_empty() {
            return Ok(());
        }
        let seq = self.seq().await?;
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        if let Some(row) = self
            .tx
            .query_opt("SELECT id FROM keys WHERE id = ANY($1) LIMIT 1", &[&ids])
            .await
            .map_err(pg_error)?
        {
            return Err(DbError::Exists(format!("key {}", row.get::<_, &str>(0))));
        }
        let digests: Vec<String> = keys
            .iter()
            .flat_map(key_digests)
            .map(|d| d.to_string())
            .collect();
        if let Some(row) = self
            .tx
            .query_opt(
                "SELECT id, digest, previous_digest FROM keys \
                 WHERE digest = ANY($1) OR previous_digest = ANY($1) LIMIT 1",
                &[&digests],
            )
            .await
            .map_err(pg_error)?
        {
            let owner: &str = row.get(0);
            let taken: [Option<&str>; 2] = [row.get(1), row.get(2)];
            let key = keys
                .iter()
                .find(|k| key_digests(k).any(|d| taken.contains(&Some(d.to_string().as_str()))))
                .unwrap_or(&keys[0]);
            return Err(digest_taken(key, owner));
        }
        let mut projects = Vec::with_capacity(keys.len());
        let mut digest = Vec::with_capacity(keys.len());
        let mut previous = Vec::with_capacity(keys.len());
        let mut created = Vec::with_capacity(keys.len());
        let mut records = Vec::with_capacity(keys.len());
        for key in keys {
            projects.push(key.project.as_str());
            digest.push(key.digest.to_string());
            previous.push(key.previous.as_ref().map(|p| p.digest.to_string()));
            created.push(nanos(key.created_at));
            records.push(to_json(key)?);
        }
        self.tx
            .execute(
                "INSERT INTO keys (id, project, digest, previous_digest, created_at, record, \
                 created_by, updated_seq) \
                 SELECT id, project, digest, previous_digest, created_at, record, $7, $8 \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                             $6::text[]) \
                      AS k(id, project, digest, previous_digest, created_at, record)",
                &[
                    &ids,
                    &projects,
                    &digest,
                    &previous,
                    &created,
                    &records,
                    &created_by,
                    &seq,
                ],
            )
            .await
            .map_err(|e| unique_to_exists(e, "a key (or one of its digests)"))?;
        Ok(())
    }

    async fn update_key(
        &mut self,
        key: &KeyRecord,
        disabled_reason: Option<&str>,
    ) -> Result<(), DbError> {
        let seq = self.seq().await?;
        let json = to_json(key)?;
        let stmt = self
            .tx
            .prepare_cached(
                "UPDATE keys SET project = $2, digest = $3, previous_digest = $4, \
                 created_at = $5, record = $6, disabled_reason = $7, updated_seq = $8 \
                 WHERE id = $1",
            )
            .await
            .map_err(pg_error)?;
        self.tx
            .execute(
                &stmt,
                &[
                    &key.id.as_str(),
                    &key.project,
                    &key.digest.to_string(),
                    &key.previous.as_ref().map(|p| p.digest.to_string()),
                    &nanos(key.created_at),
                    &json,
                    &disabled_reason,
                    &seq,
                ],
            )
            .await
            .map_err(|e| unique_to_exists(e, &format!("key {} (or one of its digests)", key.id)))?;
        Ok(())
    }

    async fn commit(self) -> Result<(), DbError> {
        if let Some(seq) = self.seq {
            // Delivered to every listener when (and only if) the transaction commits.
            self.tx
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&CHANGES_CHANNEL, &seq.to_string()],
                )
                .await
                .map_err(pg_error)?;
        }
        self.tx.commit().await.map_err(pg_error)
    }
}

/// A uniqueness violation the explicit checks did not foresee (a concurrent writer outside
/// keygate) still says what.
fn unique_to_exists(e: tokio_postgres::Error, what: &str) -> DbError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        DbError::Exists(what.to_owned())
    } else {
        pg_error(e)
    }
}

async fn read_seq(client: &impl GenericClient) -> Result<u64, DbError> {
    let row = client
        .query_one("SELECT value FROM meta WHERE name = 'change_seq'", &[])
        .await
        .map_err(pg_error)?;
    u64::try_from(row.get::<_, i64>(0))
        .map_err(|_| DbError::Corrupt("the change sequence is negative".to_owned()))
}

async fn read_projects(client: &impl GenericClient) -> Result<Vec<ProjectRecord>, DbError> {
    let rows = client
        .query("SELECT id, record FROM projects ORDER BY id", &[])
        .await
        .map_err(pg_error)?;
    rows.iter()
        .map(|r| parse_project(r.get(0), r.get(1)))
        .collect()
}

async fn read_project(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<ProjectRecord>, DbError> {
    let row = client
        .query_opt("SELECT record FROM projects WHERE id = $1", &[&id])
        .await
        .map_err(pg_error)?;
    row.map(|r| parse_project(id, r.get(0))).transpose()
}

const STORED_KEY: &str = "SELECT id, record, created_by, last_used_at, disabled_reason FROM keys";

pub(crate) fn stored_key(r: &tokio_postgres::Row) -> Result<StoredKey, DbError> {
    Ok(StoredKey {
        record: parse_key(r.get(0), r.get(1))?,
        created_by: r.get(2),
        last_used_at: r
            .get::<_, Option<i64>>(3)
            .map(|n| Timestamp::from_unix_nanos(u64::try_from(n).unwrap_or(0))),
        disabled_reason: r.get(4),
    })
}

async fn read_stored_keys(
    client: &impl GenericClient,
    project: Option<&str>,
) -> Result<Vec<StoredKey>, DbError> {
    let rows = match project {
        Some(p) => {
            client
                .query(
                    &format!("{STORED_KEY} WHERE project = $1 ORDER BY created_at, id"),
                    &[&p],
                )
                .await
        }
        None => {
            client
                .query(&format!("{STORED_KEY} ORDER BY created_at, id"), &[])
                .await
        }
    }
    .map_err(pg_error)?;
    rows.iter().map(stored_key).collect()
}

async fn read_stored_key(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<StoredKey>, DbError> {
    let row = client
        .query_opt(&format!("{STORED_KEY} WHERE id = $1"), &[&id])
        .await
        .map_err(pg_error)?;
    row.as_ref().map(stored_key).transpose()
}

async fn check_project_exists(client: &impl GenericClient, key: &KeyRecord) -> Result<(), DbError> {
    let found = client
        .query_opt("SELECT 1 FROM projects WHERE id = $1", &[&key.project])
        .await
        .map_err(pg_error)?;
    found
        .map(|_| ())
        .ok_or_else(|| DbError::NotFound(format!("project {:?} of key {}", key.project, key.id)))
}

/// Refuses a key with a digest (current or previous) that another key has.
async fn check_digests_free(client: &impl GenericClient, key: &KeyRecord) -> Result<(), DbError> {
    let digests: Vec<String> = key_digests(key).map(|d| d.to_string()).collect();
    let owner = client
        .query_opt(
            "SELECT id FROM keys WHERE (digest = ANY($1) OR previous_digest = ANY($1)) \
             AND id <> $2 LIMIT 1",
            &[&digests, &key.id.as_str()],
        )
        .await
        .map_err(pg_error)?;
    match owner {
        Some(row) => Err(digest_taken(key, row.get(0))),
        None => Ok(()),
    }
}
