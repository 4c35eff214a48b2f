//! [`Db`]: the keygate database, synchronous.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_core::admin::AuditBy;
use keygate_core::{KeyDigest, KeyId, KeyRecord, ProjectRecord, Snapshot, Timestamp};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::DbError;
use crate::file::{KEY_FILE_VERSION, KeyFile};
use crate::schema::{MIGRATIONS, SCHEMA_VERSION};

/// How long a write waits for another process's write to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A key as the database holds it: the record and what only the database knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredKey {
    /// The record the request path serves.
    pub record: KeyRecord,
    /// Who created the key (an admin's name, `import`, ...).
    pub created_by: Option<String>,
    /// The latest use recorded (see [`SqliteStore::record_use`](crate::SqliteStore::record_use)).
    pub last_used_at: Option<Timestamp>,
    /// Why the key was disabled, for people reading a listing.
    pub disabled_reason: Option<String>,
}

impl From<KeyRecord> for StoredKey {
    /// A key the database knows nothing more about.
    fn from(record: KeyRecord) -> Self {
        StoredKey {
            record,
            created_by: None,
            last_used_at: None,
            disabled_reason: None,
        }
    }
}

/// What an [`Db::import`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ImportOutcome {
    /// Projects created or changed (identical ones are not counted, nor written).
    pub projects: usize,
    /// Keys created or changed (identical ones are not counted, nor written).
    pub keys: usize,
}

/// The projects and keys changed after a change sequence number (see [`Db::changes_since`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Changes {
    /// Projects created or changed, by id.
    pub projects: Vec<ProjectRecord>,
    /// Keys created or changed, by created time then id.
    pub keys: Vec<KeyRecord>,
    /// The sequence number these changes bring a reader up to.
    pub seq: u64,
}

/// A connection to the keygate database.
///
/// Synchronous: the CLI uses it directly, the gateway through [`SqliteStore`](crate::SqliteStore),
/// which runs it off the request path. Any number of `Db`s, in any number of processes, may
/// use one file: every read-modify-write runs in one `IMMEDIATE` transaction, so concurrent
/// writers wait for each other (up to 5 s) instead of losing each other's changes.
///
/// Every change to projects or keys is stamped with a new change sequence number, so a
/// reader can ask for what changed since the number it last saw ([`Db::changes_since`]).
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Opens the database at `path`, creating it if missing, and brings its schema up to
    /// date in one transaction.
    ///
    /// The connection uses write-ahead logging (readers never block the writer), enforces
    /// foreign keys and waits up to 5 s for a lock held by another process.
    ///
    /// # Errors
    ///
    /// [`DbError::Open`] when the file cannot be opened or is not a SQLite database,
    /// [`DbError::TooNew`] when a newer keygate made it.
    pub fn open(path: impl AsRef<Path>) -> Result<Db, DbError> {
        let path = path.as_ref().to_path_buf();
        let open_error = |message: String| DbError::Open {
            path: path.clone(),
            message,
        };
        create_private(&path).map_err(|e| open_error(e.to_string()))?;
        let setup = || -> Result<Connection, rusqlite::Error> {
            let mut conn = Connection::open(&path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // Every transaction of the store reads, then writes: begun deferred, its first
            // write fails at once ("database is locked", no busy wait) when another
            // connection (the ledger, another process) committed since its first read.
            // Immediate: it takes the write lock as it begins, waiting up to BUSY_TIMEOUT.
            conn.set_transaction_behavior(TransactionBehavior::Immediate);
            conn.pragma_update(None, "foreign_keys", true)?;
            // Reading the header here is what fails for a file that is not a database.
            let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            Ok(conn)
        };
        let conn = setup().map_err(|e| open_error(e.to_string()))?;
        let mut db = Db {
            conn,
            path: path.clone(),
        };
        db.migrate().map_err(|e| match e {
            DbError::Sqlite(message) => open_error(message),
            other => other,
        })?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(DbError::TooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version > found) {
            tx.execute_batch(migration.sql)?;
            tracing::info!(version = migration.version, "key database migrated");
        }
        if found < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The connection, for the other modules of this crate (the ledger).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The connection, mutably (to begin a transaction).
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The file this connection uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the database (`PRAGMA user_version`).
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the database cannot be read.
    pub fn schema_version(&self) -> Result<u32, DbError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// The change sequence number: how many changing transactions the database has seen.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] or [`DbError::Corrupt`] when it cannot be read.
    pub fn change_seq(&self) -> Result<u64, DbError> {
        read_seq(&self.conn)
    }

    /// A number that changes when another connection commits (`PRAGMA data_version`): a
    /// check that costs no table read.
    pub(crate) fn data_version(&self) -> Result<i64, DbError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Every project, sorted by id.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the database cannot be read, [`DbError::Corrupt`] for a row
    /// that is not a project record.
    pub fn projects(&self) -> Result<Vec<ProjectRecord>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, record FROM projects ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, json) = row?;
            parse_project(&id, &json)
        })
        .collect()
    }

    /// The project `id`.
    ///
    /// # Errors
    ///
    /// As [`Db::projects`].
    pub fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError> {
        read_project(&self.conn, id)
    }

    /// The keys of `project`, or every key, sorted by creation time then id.
    ///
    /// # Errors
    ///
    /// As [`Db::projects`].
    pub fn keys(&self, project: Option<&str>) -> Result<Vec<StoredKey>, DbError> {
        const ALL: &str = "SELECT id, record, created_by, last_used_at, disabled_reason \
                           FROM keys ORDER BY created_at, id";
        const OF: &str = "SELECT id, record, created_by, last_used_at, disabled_reason \
                          FROM keys WHERE project = ?1 ORDER BY created_at, id";
        let mut stmt = self
            .conn
            .prepare_cached(if project.is_some() { OF } else { ALL })?;
        let rows = match project {
            Some(p) => stmt.query_map([p], stored_key_row)?,
            None => stmt.query_map([], stored_key_row)?,
        };
        rows.map(|row| row?.into_stored()).collect()
    }

    /// The key `id`.
    ///
    /// # Errors
    ///
    /// As [`Db::projects`].
    pub fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, record, created_by, last_used_at, disabled_reason FROM keys WHERE id = ?1",
        )?;
        stmt.query_row([id], stored_key_row)
            .optional()?
            .map(StoredKeyRow::into_stored)
            .transpose()
    }

    /// Creates a project.
    ///
    /// # Errors
    ///
    /// [`DbError::Invalid`] when the record fails [`ProjectRecord::validate`],
    /// [`DbError::Exists`] when the id is taken, [`DbError::Sqlite`] when it cannot be written.
    pub fn create_project(&mut self, project: &ProjectRecord) -> Result<(), DbError> {
        self.create_project_by(project, None)
    }

    /// [`Db::create_project`], recording `by` as an [`AdminEvent`](keygate_core::admin::AdminEvent)
    /// in the same transaction.
    ///
    /// # Errors
    ///
    /// As [`Db::create_project`].
    pub fn create_project_as(
        &mut self,
        project: &ProjectRecord,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        self.create_project_by(project, Some(by))
    }

    fn create_project_by(
        &mut self,
        project: &ProjectRecord,
        by: Option<AuditBy<'_>>,
    ) -> Result<(), DbError> {
        project.validate().map_err(DbError::Invalid)?;
        let mut w = Writer::begin(&mut self.conn)?;
        if read_project(&w.tx, &project.id)?.is_some() {
            return Err(DbError::Exists(format!("project {:?}", project.id)));
        }
        w.write_project(project, false)?;
        if let Some(by) = by {
            let event = crate::admin::project_event(by, None, Some(project))?;
            crate::admin::insert_event(&w.tx, &event)?;
        }
        w.commit()
    }

    /// Changes the project `id` with `f`, in one transaction: read, change, validate, write.
    /// Nothing is written when `f` fails or leaves the record as it was.
    ///
    /// # Errors
    ///
    /// [`DbError::NotFound`] for an unknown id, [`DbError::Invalid`] with `f`'s error, or when
    /// the result fails validation or has another id, [`DbError::Sqlite`] when it cannot be
    /// written.
    pub fn update_project<T>(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_project_by(id, None, f)
    }

    /// [`Db::update_project`], recording `by` (with the project before and after) in the
    /// same transaction when it changes anything.
    ///
    /// # Errors
    ///
    /// As [`Db::update_project`].
    pub fn update_project_as<T>(
        &mut self,
        id: &str,
        by: AuditBy<'_>,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_project_by(id, Some(by), f)
    }

    fn update_project_by<T>(
        &mut self,
        id: &str,
        by: Option<AuditBy<'_>>,
        f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
    ) -> Result<T, DbError> {
        let mut w = Writer::begin(&mut self.conn)?;
        let old =
            read_project(&w.tx, id)?.ok_or_else(|| DbError::NotFound(format!("project {id:?}")))?;
        let (out, project) = changed_project(&old, f)?;
        if let Some(project) = project {
            w.write_project(&project, true)?;
            if let Some(by) = by {
                let event = crate::admin::project_event(by, Some(&old), Some(&project))?;
                crate::admin::insert_event(&w.tx, &event)?;
            }
            w.commit()?;
        }
        Ok(out)
    }

    /// Adds keys, all in one transaction: either every key is added or none is.
    ///
    /// # Errors
    ///
    /// [`DbError::Invalid`] for a record that fails [`KeyRecord::validate`] or whose previous
    /// secret is its current one, [`DbError::NotFound`] for a key whose project does not
    /// exist, [`DbError::Exists`] for an id already used or a digest (current or previous)
    /// another key already has, in the database or earlier in `keys`.
    pub fn insert_keys(&mut self, keys: &[KeyRecord], created_by: &str) -> Result<(), DbError> {
        self.insert_keys_by(keys, created_by, None)
    }

    /// [`Db::insert_keys`], recording `by` for each key (its record after) in the same
    /// transaction.
    ///
    /// # Errors
    ///
    /// As [`Db::insert_keys`].
    pub fn insert_keys_as(
        &mut self,
        keys: &[KeyRecord],
        created_by: &str,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        self.insert_keys_by(keys, created_by, Some(by))
    }

    fn insert_keys_by(
        &mut self,
        keys: &[KeyRecord],
        created_by: &str,
        by: Option<AuditBy<'_>>,
    ) -> Result<(), DbError> {
        let mut w = Writer::begin(&mut self.conn)?;
        let mut projects = HashSet::new();
        let mut ids = HashSet::with_capacity(keys.len());
        let mut digests: HashMap<KeyDigest, &KeyId> = HashMap::with_capacity(keys.len());
        for key in keys {
            check_record(key)?;
            if !ids.insert(key.id.as_str()) || key_exists(&w.tx, key.id.as_str())? {
                return Err(DbError::Exists(format!("key {}", key.id)));
            }
            if !projects.contains(key.project.as_str()) {
                check_project_exists(&w.tx, key)?;
                projects.insert(key.project.as_str());
            }
            for digest in key_digests(key) {
                if let Some(owner) = digests.insert(digest, &key.id) {
                    return Err(digest_taken(key, owner.as_str()));
                }
            }
            check_digests_free(&w.tx, key)?;
            w.insert_key(key, Some(created_by))?;
            if let Some(by) = by {
                let event = crate::admin::key_event(by, None, Some(key))?;
                crate::admin::insert_event(&w.tx, &event)?;
            }
        }
        w.commit()
    }

    /// Changes the key `id` with `f`, in one transaction: read, change, validate, write, so
    /// two processes changing one key never lose each other's change. `f` also gets the
    /// key's disabled reason. Nothing is written when `f` fails or changes nothing.
    ///
    /// # Errors
    ///
    /// [`DbError::NotFound`] for an unknown id or a project that does not exist,
    /// [`DbError::Invalid`] with `f`'s error, or when the result fails validation or has
    /// another id, [`DbError::Exists`] when a new digest is another key's.
    pub fn update_key<T>(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_key_by(id, None, f)
    }

    /// [`Db::update_key`], recording `by` (with the key before and after) in the same
    /// transaction when it changes anything.
    ///
    /// # Errors
    ///
    /// As [`Db::update_key`].
    pub fn update_key_as<T>(
        &mut self,
        id: &str,
        by: AuditBy<'_>,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        self.update_key_by(id, Some(by), f)
    }

    fn update_key_by<T>(
        &mut self,
        id: &str,
        by: Option<AuditBy<'_>>,
        f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
    ) -> Result<T, DbError> {
        let mut w = Writer::begin(&mut self.conn)?;
        let old =
            read_stored_key(&w.tx, id)?.ok_or_else(|| DbError::NotFound(format!("key {id}")))?;
        let (out, changed) = changed_key(&old, f)?;
        let Some((record, reason)) = changed else {
            return Ok(out);
        };
        check_project_exists(&w.tx, &record)?;
        check_digests_free(&w.tx, &record)?;
        w.update_key(&record, reason.as_deref())?;
        if let Some(by) = by {
            let event = crate::admin::key_event(by, Some(&old.record), Some(&record))?;
            crate::admin::insert_event(&w.tx, &event)?;
        }
        w.commit()?;
        Ok(out)
    }

    /// Adds or replaces (by id) the projects and keys of a key file, in one transaction:
    /// either all of it is applied or none. Records identical to the stored ones are left
    /// alone, so importing an [`export`](Db::export) changes nothing. New keys get
    /// `created_by`; keys already there keep theirs, and their last use and disabled reason.
    ///
    /// # Errors
    ///
    /// As [`Db::create_project`] and [`Db::insert_keys`], minus [`DbError::Exists`] for ids.
    pub fn import(&mut self, file: &KeyFile, created_by: &str) -> Result<ImportOutcome, DbError> {
        check_key_file(file)?;
        let mut w = Writer::begin(&mut self.conn)?;
        let mut outcome = ImportOutcome::default();
        for project in &file.projects {
            match read_project(&w.tx, &project.id)? {
                Some(old) if old == *project => continue,
                old => w.write_project(project, old.is_some())?,
            }
            outcome.projects += 1;
        }
        for key in &file.keys {
            let old = read_stored_key(&w.tx, key.id.as_str())?;
            if old.as_ref().is_some_and(|old| old.record == *key) {
                continue;
            }
            check_project_exists(&w.tx, key)?;
            check_digests_free(&w.tx, key)?;
            match old {
                Some(old) => w.update_key(key, old.disabled_reason.as_deref())?,
                None => w.insert_key(key, Some(created_by))?,
            }
            outcome.keys += 1;
        }
        w.commit()?;
        Ok(outcome)
    }

    /// Everything as a key file: projects by id, keys by creation time then id. What only
    /// the database knows (who created a key, its last use, why it was disabled) is not in it.
    ///
    /// # Errors
    ///
    /// As [`Db::projects`].
    pub fn export(&self) -> Result<KeyFile, DbError> {
        let tx = self.conn.unchecked_transaction()?;
        let projects = self.projects()?;
        let keys = self.keys(None)?.into_iter().map(|k| k.record).collect();
        tx.finish()?;
        Ok(KeyFile {
            version: KEY_FILE_VERSION,
            projects,
            keys,
        })
    }

    /// Records when keys were last used, in one transaction. A key keeps the latest time it
    /// was given; unknown ids are skipped. Not a change: the change sequence stays as it is
    /// and no snapshot reloads anything for it.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when it cannot be written.
    pub fn touch_last_used(&mut self, uses: &[(KeyId, Timestamp)]) -> Result<(), DbError> {
        if uses.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE keys SET last_used_at = ?2 \
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
            )?;
            for (id, at) in uses {
                stmt.execute(params![id.as_str(), nanos(*at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every project and key as a validated [`Snapshot`], with the change sequence number it
    /// reflects (read in one transaction, so the two agree).
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the database cannot be read, [`DbError::Corrupt`] for rows
    /// that are not records or do not make a snapshot.
    pub fn load(&self) -> Result<(Snapshot, u64), DbError> {
        let tx = self.conn.unchecked_transaction()?;
        let seq = read_seq(&tx)?;
        let projects = self.projects()?;
        let mut stmt = tx.prepare_cached("SELECT id, record FROM keys")?;
        let keys = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .map(|row| {
                let (id, json) = row?;
                parse_key(&id, &json)
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        tx.finish()?;
        let snapshot =
            Snapshot::new(projects, keys).map_err(|e| DbError::Corrupt(e.to_string()))?;
        Ok((snapshot, seq))
    }

    /// The projects and keys changed after change sequence number `seq`, and the number they
    /// bring a reader up to (read in one transaction).
    ///
    /// # Errors
    ///
    /// As [`Db::load`].
    pub fn changes_since(&self, seq: u64) -> Result<Changes, DbError> {
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        let tx = self.conn.unchecked_transaction()?;
        let now = read_seq(&tx)?;
        let mut changes = Changes {
            seq: now,
            ..Changes::default()
        };
        if now > seq {
            // Sorted here: an ORDER BY would have SQLite scan a whole table in that order
            // rather than search the `updated_seq` index.
            let mut stmt = tx.prepare_cached(CHANGED_PROJECTS)?;
            for row in stmt.query_map([after], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (id, json) = row?;
                changes.projects.push(parse_project(&id, &json)?);
            }
            let mut stmt = tx.prepare_cached(CHANGED_KEYS)?;
            for row in stmt.query_map([after], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (id, json) = row?;
                changes.keys.push(parse_key(&id, &json)?);
            }
            changes.projects.sort_by(|a, b| a.id.cmp(&b.id));
            changes
                .keys
                .sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        }
        tx.finish()?;
        Ok(changes)
    }
}

const CHANGED_PROJECTS: &str = "SELECT id, record FROM projects WHERE updated_seq > ?1";
const CHANGED_KEYS: &str = "SELECT id, record FROM keys WHERE updated_seq > ?1";

/// Creates a missing database file readable by its owner only (0600 on unix), as the key
/// file is; SQLite gives its `-wal` and `-shm` files the same permissions.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// A changing transaction: takes the next change sequence number on its first write.
struct Writer<'c> {
    tx: Transaction<'c>,
    seq: Option<i64>,
}

impl<'c> Writer<'c> {
    fn begin(conn: &'c mut Connection) -> Result<Self, DbError> {
        Ok(Writer {
            tx: conn.transaction_with_behavior(TransactionBehavior::Immediate)?,
            seq: None,
        })
    }

    fn seq(&mut self) -> Result<i64, DbError> {
        if let Some(seq) = self.seq {
            return Ok(seq);
        }
        let seq: i64 = self.tx.query_row(
            "UPDATE meta SET value = value + 1 WHERE name = 'change_seq' RETURNING value",
            [],
            |r| r.get(0),
        )?;
        self.seq = Some(seq);
        Ok(seq)
    }

    fn write_project(&mut self, project: &ProjectRecord, exists: bool) -> Result<(), DbError> {
        let seq = self.seq()?;
        let json = to_json(project)?;
        let sql = if exists {
            "UPDATE projects SET record = ?2, updated_seq = ?3 WHERE id = ?1"
        } else {
            "INSERT INTO projects (id, record, updated_seq) VALUES (?1, ?2, ?3)"
        };
        self.tx
            .prepare_cached(sql)?
            .execute(params![project.id, json, seq])?;
        Ok(())
    }

    fn insert_key(&mut self, key: &KeyRecord, created_by: Option<&str>) -> Result<(), DbError> {
        let seq = self.seq()?;
        let json = to_json(key)?;
        self.tx
            .prepare_cached(
                "INSERT INTO keys (id, project, digest, previous_digest, created_at, record, \
                 created_by, updated_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                key.id.as_str(),
                key.project,
                key.digest.to_string(),
                key.previous.as_ref().map(|p| p.digest.to_string()),
                nanos(key.created_at),
                json,
                created_by,
                seq
            ])
            .map_err(|e| constraint_to_exists(e, key))?;
        Ok(())
    }

    fn update_key(
        &mut self,
        key: &KeyRecord,
        disabled_reason: Option<&str>,
    ) -> Result<(), DbError> {
        let seq = self.seq()?;
        let json = to_json(key)?;
        self.tx
            .prepare_cached(
                "UPDATE keys SET project = ?2, digest = ?3, previous_digest = ?4, \
                 created_at = ?5, record = ?6, disabled_reason = ?7, updated_seq = ?8 \
                 WHERE id = ?1",
            )?
            .execute(params![
                key.id.as_str(),
                key.project,
                key.digest.to_string(),
                key.previous.as_ref().map(|p| p.digest.to_string()),
                nanos(key.created_at),
                json,
                disabled_reason,
                seq
            ])
            .map_err(|e| constraint_to_exists(e, key))?;
        Ok(())
    }

    fn commit(self) -> Result<(), DbError> {
        self.tx.commit()?;
        Ok(())
    }
}

/// A uniqueness constraint the explicit checks did not foresee still says which key.
fn constraint_to_exists(e: rusqlite::Error, key: &KeyRecord) -> DbError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            DbError::Exists(format!("key {} (or one of its digests)", key.id))
        }
        _ => e.into(),
    }
}

/// What `f` makes of a stored project: its result, and the project to write (`None` when
/// `f` left it as it was), validated and with its id unchanged.
pub(crate) fn changed_project<T>(
    old: &ProjectRecord,
    f: impl FnOnce(&mut ProjectRecord) -> Result<T, String>,
) -> Result<(T, Option<ProjectRecord>), DbError> {
    let mut project = old.clone();
    let out = f(&mut project).map_err(DbError::Invalid)?;
    if project == *old {
        return Ok((out, None));
    }
    if project.id != old.id {
        return Err(DbError::Invalid(format!(
            "project {:?}: the id of a project cannot change",
            old.id
        )));
    }
    project.validate().map_err(DbError::Invalid)?;
    Ok((out, Some(project)))
}

/// What `f` makes of a stored key: its result, and the record and disabled reason to write
/// (`None` when `f` changed neither), checked and with its id unchanged.
pub(crate) type KeyChangeOutcome<T> = (T, Option<(KeyRecord, Option<String>)>);

pub(crate) fn changed_key<T>(
    old: &StoredKey,
    f: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<T, String>,
) -> Result<KeyChangeOutcome<T>, DbError> {
    let mut record = old.record.clone();
    let mut reason = old.disabled_reason.clone();
    let out = f(&mut record, &mut reason).map_err(DbError::Invalid)?;
    if record == old.record && reason == old.disabled_reason {
        return Ok((out, None));
    }
    if record.id != old.record.id {
        return Err(DbError::Invalid(format!(
            "key {}: the id of a key cannot change",
            old.record.id
        )));
    }
    check_record(&record)?;
    Ok((out, Some((record, reason))))
}

/// What every store checks of a key file before importing any of it: its version, each
/// record, and that no project or key appears twice.
pub(crate) fn check_key_file(file: &KeyFile) -> Result<(), DbError> {
    if file.version != KEY_FILE_VERSION {
        return Err(DbError::Invalid(format!(
            "key file version {} is not {KEY_FILE_VERSION}",
            file.version
        )));
    }
    let mut seen = HashSet::with_capacity(file.projects.len());
    for project in &file.projects {
        project.validate().map_err(DbError::Invalid)?;
        if !seen.insert(project.id.as_str()) {
            return Err(DbError::Invalid(format!(
                "project {:?} appears twice in the key file",
                project.id
            )));
        }
    }
    let mut ids = HashSet::with_capacity(file.keys.len());
    for key in &file.keys {
        check_record(key)?;
        if !ids.insert(key.id.as_str()) {
            return Err(DbError::Invalid(format!(
                "key {} appears twice in the key file",
                key.id
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_record(key: &KeyRecord) -> Result<(), DbError> {
    key.validate().map_err(DbError::Invalid)?;
    if key
        .previous
        .as_ref()
        .is_some_and(|p| p.digest == key.digest)
    {
        return Err(DbError::Invalid(format!(
            "key {}: its previous secret is its current one",
            key.id
        )));
    }
    Ok(())
}

pub(crate) fn key_digests(key: &KeyRecord) -> impl Iterator<Item = KeyDigest> {
    std::iter::once(key.digest).chain(key.previous.as_ref().map(|p| p.digest))
}

pub(crate) fn digest_taken(key: &KeyRecord, owner: &str) -> DbError {
    DbError::Exists(format!("a digest of key {} (key {owner} has it)", key.id))
}

/// Refuses a key with a digest (current or previous) that another key has (as its current
/// or previous one).
fn check_digests_free(conn: &Connection, key: &KeyRecord) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM keys WHERE digest = ?1 AND id <> ?2 \
         UNION ALL SELECT id FROM keys WHERE previous_digest = ?1 AND id <> ?2 LIMIT 1",
    )?;
    for digest in key_digests(key) {
        let owner: Option<String> = stmt
            .query_row(params![digest.to_string(), key.id.as_str()], |r| r.get(0))
            .optional()?;
        if let Some(owner) = owner {
            return Err(digest_taken(key, &owner));
        }
    }
    Ok(())
}

fn check_project_exists(conn: &Connection, key: &KeyRecord) -> Result<(), DbError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM projects WHERE id = ?1")?
        .query_row([&key.project], |_| Ok(()))
        .optional()?;
    found.ok_or_else(|| DbError::NotFound(format!("project {:?} of key {}", key.project, key.id)))
}

fn key_exists(conn: &Connection, id: &str) -> Result<bool, DbError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM keys WHERE id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

fn read_seq(conn: &Connection) -> Result<u64, DbError> {
    let seq: i64 = conn.query_row(
        "SELECT value FROM meta WHERE name = 'change_seq'",
        [],
        |r| r.get(0),
    )?;
    u64::try_from(seq).map_err(|_| DbError::Corrupt("the change sequence is negative".to_owned()))
}

fn read_project(conn: &Connection, id: &str) -> Result<Option<ProjectRecord>, DbError> {
    let json: Option<String> = conn
        .prepare_cached("SELECT record FROM projects WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    json.map(|json| parse_project(id, &json)).transpose()
}

fn read_stored_key(conn: &Connection, id: &str) -> Result<Option<StoredKey>, DbError> {
    conn.prepare_cached(
        "SELECT id, record, created_by, last_used_at, disabled_reason FROM keys WHERE id = ?1",
    )?
    .query_row([id], stored_key_row)
    .optional()?
    .map(StoredKeyRow::into_stored)
    .transpose()
}

struct StoredKeyRow {
    id: String,
    json: String,
    created_by: Option<String>,
    last_used_at: Option<i64>,
    disabled_reason: Option<String>,
}

fn stored_key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKeyRow> {
    Ok(StoredKeyRow {
        id: r.get(0)?,
        json: r.get(1)?,
        created_by: r.get(2)?,
        last_used_at: r.get(3)?,
        disabled_reason: r.get(4)?,
    })
}

impl StoredKeyRow {
    fn into_stored(self) -> Result<StoredKey, DbError> {
        Ok(StoredKey {
            record: parse_key(&self.id, &self.json)?,
            created_by: self.created_by,
            last_used_at: self
                .last_used_at
                .map(|n| Timestamp::from_unix_nanos(u64::try_from(n).unwrap_or(0))),
            disabled_reason: self.disabled_reason,
        })
    }
}

pub(crate) fn parse_key(id: &str, json: &str) -> Result<KeyRecord, DbError> {
    let key: KeyRecord = from_json("key", id, json)?;
    if key.id.as_str() != id {
        return Err(DbError::Corrupt(format!(
            "the row of key {id:?} holds the record of another key"
        )));
    }
    Ok(key)
}

pub(crate) fn parse_project(id: &str, json: &str) -> Result<ProjectRecord, DbError> {
    let project: ProjectRecord = from_json("project", id, json)?;
    if project.id != id {
        return Err(DbError::Corrupt(format!(
            "the row of project {id:?} holds the record of another project"
        )));
    }
    Ok(project)
}

fn from_json<T: DeserializeOwned>(what: &str, id: &str, json: &str) -> Result<T, DbError> {
    // Where and what kind of error only: serde's message may quote the stored value.
    serde_json::from_str(json).map_err(|e| {
        DbError::Corrupt(format!(
            "the record of {what} {id:?} is unreadable ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

pub(crate) fn to_json<T: Serialize>(record: &T) -> Result<String, DbError> {
    serde_json::to_string(record).map_err(|e| DbError::Invalid(format!("record not storable: {e}")))
}

pub(crate) fn nanos(t: Timestamp) -> i64 {
    i64::try_from(t.as_unix_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{db_with_project, key, raw};
    use keygate_core::{ModelPattern, ModelRules, PreviousSecret};

    #[test]
    fn a_store_transaction_takes_the_write_lock_as_it_begins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.db");
        let mut db = Db::open(&path).unwrap();
        let other = crate::test_support::raw(&path);
        other.busy_timeout(Duration::ZERO).unwrap();
        let tx = db.conn_mut().transaction().unwrap();
        let e = other
            .execute("INSERT INTO meta (name, value) VALUES ('probe', 1)", [])
            .unwrap_err();
        assert_eq!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy)
        );
        drop(tx);
        other
            .execute("INSERT INTO meta (name, value) VALUES ('probe', 1)", [])
            .unwrap();
    }

    #[test]
    fn an_empty_file_is_migrated_to_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("new.db")).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(db.change_seq().unwrap(), 0);
        assert!(db.projects().unwrap().is_empty());
        assert!(db.keys(None).unwrap().is_empty());
        let (snapshot, seq) = db.load().unwrap();
        assert!(snapshot.is_empty());
        assert_eq!(seq, 0);
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn reopening_keeps_the_data_and_the_version() {
        let (_dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        let seq = db.change_seq().unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(db.change_seq().unwrap(), seq);
        assert_eq!(db.projects().unwrap(), vec![ProjectRecord::new("p")]);
        let stored = db.key("key_a").unwrap().unwrap();
        assert_eq!(stored.record, key("key_a", "p", "a"));
        assert_eq!(stored.created_by.as_deref(), Some("admin"));
    }

    #[test]
    fn a_database_from_a_newer_keygate_is_refused() {
        let (_dir, path, db) = db_with_project();
        drop(db);
        raw(&path)
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert_eq!(
            Db::open(&path).unwrap_err(),
            DbError::TooNew {
                found: SCHEMA_VERSION + 1,
                supported: SCHEMA_VERSION
            }
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.db");
        std::fs::write(&path, b"not a database, just bytes\n".repeat(200)).unwrap();
        let err = Db::open(&path).unwrap_err();
        assert!(matches!(err, DbError::Open { .. }), "{err}");
        assert!(err.to_string().contains("garbage.db"), "{err}");
        // Left as it was.
        assert!(std::fs::read(&path).unwrap().starts_with(b"not a database"));
    }

    #[test]
    fn concurrent_updates_through_two_connections_lose_nothing() {
        let (_dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut db = Db::open(&path).unwrap();
                    for i in 0..50 {
                        db.update_key("key_a", |k, _| {
                            k.labels.insert(format!("t{t}-{i}"), "x".into());
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let labels = db.key("key_a").unwrap().unwrap().record.labels;
        assert_eq!(labels.len(), 100);
    }

    #[test]
    fn a_batch_with_one_duplicate_digest_inserts_nothing() {
        let (_dir, _path, mut db) = db_with_project();
        let seq = db.change_seq().unwrap();
        let mut batch: Vec<_> = (0..10)
            .map(|i| key(&format!("key_{i}"), "p", &format!("s{i}")))
            .collect();
        batch[7].digest = batch[2].digest;
        assert!(matches!(
            db.insert_keys(&batch, "admin"),
            Err(DbError::Exists(_))
        ));
        assert!(db.keys(None).unwrap().is_empty());
        assert_eq!(db.change_seq().unwrap(), seq);
    }

    #[test]
    fn a_digest_is_unique_across_current_and_previous_secrets() {
        let (_dir, _path, mut db) = db_with_project();
        let mut rotated = key("key_a", "p", "new");
        rotated.previous = Some(PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(5_000),
        });
        db.insert_keys(&[rotated], "admin").unwrap();
        // A new key with the other's previous secret, in the database or in the batch.
        for batch in [
            vec![key("key_b", "p", "old")],
            vec![key("key_b", "p", "b"), {
                let mut c = key("key_c", "p", "c");
                c.previous = Some(PreviousSecret {
                    digest: KeyDigest::of("b"),
                    valid_until: Timestamp::from_unix_secs(5_000),
                });
                c
            }],
            vec![key("key_a", "p", "other")],
        ] {
            let err = db.insert_keys(&batch, "admin").unwrap_err();
            assert!(matches!(err, DbError::Exists(_)), "{err}");
        }
        // Rotating another key onto a taken digest is refused too.
        db.insert_keys(&[key("key_b", "p", "b")], "admin").unwrap();
        let err = db
            .update_key("key_b", |k, _| {
                k.digest = KeyDigest::of("old");
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, DbError::Exists(_)), "{err}");
        assert_eq!(db.keys(None).unwrap().len(), 2);
    }

    #[test]
    fn keys_need_a_project_and_a_valid_record() {
        let (_dir, _path, mut db) = db_with_project();
        assert!(matches!(
            db.insert_keys(&[key("key_a", "nope", "a")], "admin"),
            Err(DbError::NotFound(_))
        ));
        let mut bad = key("key_a", "p", "a");
        bad.expires_at = Some(Timestamp::from_unix_secs(1));
        bad.not_before = Some(Timestamp::from_unix_secs(2));
        assert!(matches!(
            db.insert_keys(&[bad], "admin"),
            Err(DbError::Invalid(_))
        ));
        assert!(matches!(
            db.create_project(&ProjectRecord::new("p")),
            Err(DbError::Exists(_))
        ));
        assert!(matches!(
            db.create_project(&ProjectRecord::new("bad id")),
            Err(DbError::Invalid(_))
        ));
    }

    #[test]
    fn update_key_writes_nothing_when_refused() {
        let (_dir, _path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        let seq = db.change_seq().unwrap();
        assert_eq!(
            db.update_key("key_a", |k, _| -> Result<(), _> {
                k.disabled = true;
                Err("no".to_owned())
            }),
            Err(DbError::Invalid("no".into()))
        );
        assert!(matches!(
            db.update_key("key_a", |k, _| {
                k.id = KeyId::new("key_b");
                Ok(())
            }),
            Err(DbError::Invalid(_))
        ));
        assert!(matches!(
            db.update_key("key_a", |k, _| {
                k.project = "nope".into();
                Ok(())
            }),
            Err(DbError::NotFound(_))
        ));
        assert!(matches!(
            db.update_key("key_x", |_, _| Ok(())),
            Err(DbError::NotFound(_))
        ));
        assert_eq!(db.update_key("key_a", |_, _| Ok(7)), Ok(7));
        assert_eq!(db.change_seq().unwrap(), seq);
        assert!(!db.key("key_a").unwrap().unwrap().record.disabled);
    }

    #[test]
    fn update_key_keeps_the_disabled_reason() {
        let (_dir, _path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        db.update_key("key_a", |k, reason| {
            k.disabled = true;
            *reason = Some("leaked in a log".into());
            Ok(())
        })
        .unwrap();
        let stored = db.key("key_a").unwrap().unwrap();
        assert!(stored.record.disabled);
        assert_eq!(stored.disabled_reason.as_deref(), Some("leaked in a log"));
    }

    #[test]
    fn update_project_reads_changes_and_writes_in_one_step() {
        let (_dir, _path, mut db) = db_with_project();
        db.update_project("p", |p| {
            p.name = "Acme".into();
            Ok(())
        })
        .unwrap();
        assert_eq!(db.project("p").unwrap().unwrap().name, "Acme");
        assert!(matches!(
            db.update_project("p", |p| {
                p.id = "q".into();
                Ok(())
            }),
            Err(DbError::Invalid(_))
        ));
        assert!(matches!(
            db.update_project("q", |_| Ok(())),
            Err(DbError::NotFound(_))
        ));
    }

    #[test]
    fn keys_are_listed_by_creation_time_then_id_and_by_project() {
        let (_dir, _path, mut db) = db_with_project();
        db.create_project(&ProjectRecord::new("q")).unwrap();
        let mut late = key("key_a", "p", "a");
        late.created_at = Timestamp::from_unix_secs(2_000);
        db.insert_keys(
            &[late, key("key_c", "q", "c"), key("key_b", "p", "b")],
            "admin",
        )
        .unwrap();
        let ids = |keys: Vec<StoredKey>| -> Vec<String> {
            keys.into_iter().map(|k| k.record.id.to_string()).collect()
        };
        assert_eq!(ids(db.keys(None).unwrap()), ["key_b", "key_c", "key_a"]);
        assert_eq!(ids(db.keys(Some("p")).unwrap()), ["key_b", "key_a"]);
        assert!(db.keys(Some("none")).unwrap().is_empty());
    }

    fn sample_file() -> KeyFile {
        let mut acme = ProjectRecord::new("acme");
        acme.name = "Acme".into();
        acme.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]);
        acme.labels.insert("tier".into(), "gold".into());
        let mut rotated = key("key_a", "acme", "new");
        rotated.previous = Some(PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(5_000),
        });
        rotated.labels.insert("team".into(), "ml".into());
        rotated.groups = vec!["admins".into()];
        let mut disabled = key("key_b", "default", "b");
        disabled.disabled = true;
        let mut later = key("key_c", "acme", "c");
        later.created_at = Timestamp::from_unix_secs(3_000);
        later.expires_at = Some(Timestamp::from_unix_secs(9_000));
        KeyFile {
            version: KEY_FILE_VERSION,
            projects: vec![acme, ProjectRecord::new("default")],
            keys: vec![rotated, disabled, later],
        }
    }

    #[test]
    fn import_then_export_gives_back_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path().join("k.db")).unwrap();
        let file = sample_file();
        let outcome = db.import(&file, "import").unwrap();
        assert_eq!((outcome.projects, outcome.keys), (2, 3));
        assert_eq!(db.export().unwrap(), file);
        // And back again: nothing changes, not even the change sequence.
        let seq = db.change_seq().unwrap();
        let outcome = db.import(&db.export().unwrap(), "import").unwrap();
        assert_eq!(outcome, ImportOutcome::default());
        assert_eq!(db.change_seq().unwrap(), seq);
        // Through TOML too.
        let text = db.export().unwrap().to_toml().unwrap();
        assert_eq!(KeyFile::parse("k.toml", &text).unwrap(), file);
    }

    #[test]
    fn import_replaces_by_id_and_keeps_what_only_the_database_knows() {
        let (_dir, _path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "alice").unwrap();
        db.update_key("key_a", |_, reason| {
            *reason = Some("paused".into());
            Ok(())
        })
        .unwrap();
        let mut changed = key("key_a", "p", "a");
        changed.name = "renamed".into();
        let file = KeyFile {
            version: KEY_FILE_VERSION,
            projects: vec![],
            keys: vec![changed.clone(), key("key_b", "p", "b")],
        };
        let outcome = db.import(&file, "import").unwrap();
        assert_eq!((outcome.projects, outcome.keys), (0, 2));
        let a = db.key("key_a").unwrap().unwrap();
        assert_eq!(a.record, changed);
        assert_eq!(a.created_by.as_deref(), Some("alice"));
        assert_eq!(a.disabled_reason.as_deref(), Some("paused"));
        assert_eq!(
            db.key("key_b").unwrap().unwrap().created_by.as_deref(),
            Some("import")
        );
        // A failing import applies none of its file.
        let bad = KeyFile {
            version: KEY_FILE_VERSION,
            projects: vec![ProjectRecord::new("new")],
            keys: vec![key("key_c", "new", "c"), key("key_d", "new", "a")],
        };
        assert!(matches!(db.import(&bad, "import"), Err(DbError::Exists(_))));
        assert!(db.project("new").unwrap().is_none());
        assert!(db.key("key_c").unwrap().is_none());
    }

    #[test]
    fn last_use_keeps_the_latest_and_is_not_a_change() {
        let (_dir, _path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        let seq = db.change_seq().unwrap();
        let id = KeyId::new("key_a");
        let t = Timestamp::from_unix_secs;
        db.touch_last_used(&[(id.clone(), t(20)), (KeyId::new("key_gone"), t(5))])
            .unwrap();
        db.touch_last_used(&[(id.clone(), t(10))]).unwrap();
        assert_eq!(db.key("key_a").unwrap().unwrap().last_used_at, Some(t(20)));
        assert_eq!(db.change_seq().unwrap(), seq);
        assert!(db.changes_since(seq).unwrap().keys.is_empty());
    }

    #[test]
    fn changes_since_returns_only_what_changed_after() {
        let (_dir, _path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a"), key("key_b", "p", "b")], "admin")
            .unwrap();
        let seq = db.change_seq().unwrap();
        db.update_key("key_b", |k, _| {
            k.disabled = true;
            Ok(())
        })
        .unwrap();
        let changes = db.changes_since(seq).unwrap();
        assert_eq!(changes.seq, seq + 1);
        assert!(changes.projects.is_empty());
        assert_eq!(changes.keys.len(), 1);
        assert!(changes.keys[0].disabled);
        let all = db.changes_since(0).unwrap();
        assert_eq!((all.projects.len(), all.keys.len()), (1, 2));
        assert_eq!(
            db.changes_since(changes.seq).unwrap(),
            Changes {
                seq: changes.seq,
                ..Changes::default()
            }
        );
    }

    #[test]
    fn a_corrupt_row_is_reported_without_its_contents() {
        let (_dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        raw(&path)
            .execute(
                "UPDATE keys SET record = '{\"id\": \"sk-kg-secretsecretsecret\"' WHERE id = 'key_a'",
                [],
            )
            .unwrap();
        for err in [db.load().unwrap_err(), db.keys(None).unwrap_err()] {
            assert!(matches!(err, DbError::Corrupt(_)), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("key_a") && !msg.contains("secretsecret"),
                "{msg}"
            );
        }
    }

    #[test]
    fn changes_are_found_through_the_sequence_index() {
        let (_dir, _path, db) = db_with_project();
        for (sql, index) in [
            (CHANGED_KEYS, "keys_updated_seq"),
            (CHANGED_PROJECTS, "projects_updated_seq"),
        ] {
            let plan: Vec<String> = db
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([0], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn a_failed_migration_leaves_the_database_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        // Another program's database, with a table of the same name as one of ours.
        raw(&path)
            .execute_batch("CREATE TABLE keys (name TEXT); INSERT INTO keys VALUES ('x');")
            .unwrap();
        assert!(matches!(Db::open(&path), Err(DbError::Open { .. })));
        let conn = raw(&path);
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!((version, tables), (0, vec!["keys".to_owned()]));
    }

    #[cfg(unix)]
    #[test]
    fn a_new_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "admin").unwrap();
        for file in [path.clone(), dir.path().join("keygate.db-wal")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
    }
}
