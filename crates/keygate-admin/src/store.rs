//! [`AdminStore`]: the keygate database the admin API reads and changes, SQLite or
//! PostgreSQL, with one asynchronous interface.

use std::path::Path;
use std::sync::{Arc, Mutex};

use keygate::limit::backend::Window;
use keygate_core::admin::{AdminEvent, AdminKeyRecord, AuditBy};
use keygate_core::{KeyDigest, KeyRecord, ProjectRecord, Timestamp};
use keygate_store::{
    Db, DbError, EventQuery, KeyPage, KeyQuery, LedgerBackend, PgDb, RedisBackend, StoredKey,
    UsageRow,
};

/// Who changes something, owned (the SQLite calls run on a blocking thread).
#[derive(Debug, Clone)]
pub(crate) struct By {
    pub(crate) actor: String,
    pub(crate) action: &'static str,
    pub(crate) at: Timestamp,
}

impl By {
    pub(crate) fn audit(&self) -> AuditBy<'_> {
        AuditBy {
            actor: &self.actor,
            action: self.action,
            at: self.at,
        }
    }
}

/// A change to one key: the record and its disabled reason.
pub(crate) type KeyChange =
    Box<dyn FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<(), String> + Send>;

/// A change to one project.
pub(crate) type ProjectChange = Box<dyn FnOnce(&mut ProjectRecord) -> Result<(), String> + Send>;

/// The keygate database behind the admin API: a SQLite file (each call on a blocking
/// thread, one connection) or a PostgreSQL pool; with the shared counters, for the spend
/// still held by requests in flight on a PostgreSQL store.
#[derive(Debug, Clone)]
pub struct AdminStore {
    db: Kind,
    counters: Option<RedisBackend>,
    ledger: Option<LedgerBackend>,
}

#[derive(Debug, Clone)]
enum Kind {
    Sqlite(Arc<Mutex<Db>>),
    Postgres(Box<PgDb>),
}

impl AdminStore {
    /// The SQLite database at `path` (created and migrated if need be).
    ///
    /// # Errors
    ///
    /// As [`Db::open`].
    pub fn open_sqlite(path: impl AsRef<Path>) -> Result<AdminStore, DbError> {
        Ok(AdminStore {
            db: Kind::Sqlite(Arc::new(Mutex::new(Db::open(path)?))),
            counters: None,
            ledger: None,
        })
    }

    /// A PostgreSQL database.
    pub fn postgres(db: PgDb) -> AdminStore {
        AdminStore {
            db: Kind::Postgres(Box::new(db)),
            counters: None,
            ledger: None,
        }
    }

    /// With the shared counters a PostgreSQL store's gateways count in: what requests in
    /// flight hold is read there (without them it shows as unknown).
    #[must_use]
    pub fn with_counters(mut self, counters: RedisBackend) -> Self {
        self.counters = Some(counters);
        self
    }

    /// With the spend ledger a SQLite store's gateway counts in (its
    /// [`LedgerBackend`]): spend is reset through it, so the gateway's counters see the reset
    /// at once. Without it (or the shared counters on PostgreSQL) spend cannot be reset.
    #[must_use]
    pub fn with_ledger(mut self, ledger: LedgerBackend) -> Self {
        self.ledger = Some(ledger);
        self
    }

    async fn sqlite<T: Send + 'static>(
        db: &Arc<Mutex<Db>>,
        f: impl FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db
                .lock()
                .map_err(|_| DbError::Unavailable("the admin connection failed".to_owned()))?;
            f(&mut db)
        })
        .await
        .map_err(|_| DbError::Unavailable("the admin database call was cancelled".to_owned()))?
    }

    pub(crate) async fn projects(&self) -> Result<Vec<ProjectRecord>, DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, |db| db.projects()).await,
            Kind::Postgres(db) => db.projects().await,
        }
    }

    pub(crate) async fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError> {
        let id = id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.project(&id)).await,
            Kind::Postgres(db) => db.project(&id).await,
        }
    }

    pub(crate) async fn create_project(
        &self,
        project: ProjectRecord,
        by: By,
    ) -> Result<(), DbError> {
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| db.create_project_as(&project, by.audit())).await
            }
            Kind::Postgres(db) => db.create_project_as(&project, by.audit()).await,
        }
    }

    pub(crate) async fn update_project(
        &self,
        id: &str,
        by: By,
        change: ProjectChange,
    ) -> Result<(), DbError> {
        let id = id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| db.update_project_as(&id, by.audit(), change)).await
            }
            Kind::Postgres(db) => db.update_project_as(&id, by.audit(), change).await,
        }
    }

    pub(crate) async fn list_keys(&self, query: KeyQuery) -> Result<KeyPage, DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.list_keys(&query)).await,
            Kind::Postgres(db) => db.list_keys(&query).await,
        }
    }

    pub(crate) async fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError> {
        let id = id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.key(&id)).await,
            Kind::Postgres(db) => db.key(&id).await,
        }
    }

    pub(crate) async fn insert_key(&self, key: KeyRecord, by: By) -> Result<(), DbError> {
        let keys = [key];
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| {
                    db.insert_keys_as(&keys, &by.actor, by.audit())
                })
                .await
            }
            Kind::Postgres(db) => db.insert_keys_as(&keys, &by.actor, by.audit()).await,
        }
    }

    pub(crate) async fn update_key(
        &self,
        id: &str,
        by: By,
        change: KeyChange,
    ) -> Result<(), DbError> {
        let id = id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| db.update_key_as(&id, by.audit(), change)).await
            }
            Kind::Postgres(db) => db.update_key_as(&id, by.audit(), change).await,
        }
    }

    pub(crate) async fn admin_key_by_digest(
        &self,
        digest: KeyDigest,
    ) -> Result<Option<AdminKeyRecord>, DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.admin_key_by_digest(&digest)).await,
            Kind::Postgres(db) => db.admin_key_by_digest(&digest).await,
        }
    }

    pub(crate) async fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, |db| db.admin_keys()).await,
            Kind::Postgres(db) => db.admin_keys().await,
        }
    }

    pub(crate) async fn insert_admin_key(
        &self,
        key: AdminKeyRecord,
        by: By,
    ) -> Result<(), DbError> {
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| db.insert_admin_key(&key, by.audit())).await
            }
            Kind::Postgres(db) => db.insert_admin_key(&key, by.audit()).await,
        }
    }

    pub(crate) async fn revoke_admin_key(
        &self,
        id: &str,
        by: By,
    ) -> Result<AdminKeyRecord, DbError> {
        let id = id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| db.revoke_admin_key(&id, by.audit())).await
            }
            Kind::Postgres(db) => db.revoke_admin_key(&id, by.audit()).await,
        }
    }

    pub(crate) async fn admin_events(&self, query: EventQuery) -> Result<Vec<AdminEvent>, DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.admin_events(&query)).await,
            Kind::Postgres(db) => db.admin_events(&query).await,
        }
    }

    /// Adds usage counts (see [`Db::add_usage`]).
    ///
    /// # Errors
    ///
    /// When the store cannot be written; nothing is then.
    pub async fn add_usage(&self, rows: Vec<UsageRow>) -> Result<(), DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.add_usage(&rows)).await,
            Kind::Postgres(db) => db.add_usage(&rows).await,
        }
    }

    pub(crate) async fn usage(
        &self,
        key_id: &str,
        from_day: u32,
    ) -> Result<Vec<UsageRow>, DbError> {
        let key_id = key_id.to_owned();
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.usage(&key_id, from_day)).await,
            Kind::Postgres(db) => db.usage(&key_id, from_day).await,
        }
    }

    /// Resets the budget counter `counter` of `group` in the period `window`: what settled
    /// in it no longer counts, in the ledger and in the counters the gateways admit on;
    /// requests in flight keep their holds. The amount taken off.
    pub(crate) async fn reset_budget(
        &self,
        counter: &str,
        group: u64,
        window: Window,
    ) -> Result<u64, DbError> {
        let unavailable =
            |what: &str, e: &dyn std::fmt::Display| DbError::Unavailable(format!("{what}: {e}"));
        match &self.db {
            Kind::Sqlite(_) => match &self.ledger {
                Some(ledger) => ledger
                    .reset_budget(counter, window)
                    .await
                    .map_err(|e| unavailable("the spend ledger", &e)),
                None => Err(DbError::Unavailable(
                    "spend can be reset only through the gateway that keeps its ledger".into(),
                )),
            },
            Kind::Postgres(db) => {
                let Window::Fixed { start, end } = window else {
                    return Ok(0);
                };
                let shard = group % keygate_store::SHARDS;
                // The ledger first: if the counters then fail, they count too much, never
                // too little.
                let taken = db.reset_spend(shard, counter, start, end).await?;
                if let Some(redis) = &self.counters {
                    redis
                        .give_back(group, counter, window, taken)
                        .await
                        .map_err(|e| unavailable("the shared counters", &e))?;
                }
                Ok(taken)
            }
        }
    }

    /// Records an admin event of an action that changes no record.
    pub(crate) async fn record_event(&self, event: AdminEvent) -> Result<(), DbError> {
        match &self.db {
            Kind::Sqlite(db) => Self::sqlite(db, move |db| db.record_event(&event)).await,
            Kind::Postgres(db) => db.record_event(&event).await,
        }
    }

    /// What each budget counter `(counter, group, window)` holds in its budget period:
    /// settled (the ledger), and held by requests in flight (`None` when unknown: a
    /// PostgreSQL store without its counters). One answer per counter, in order; on SQLite
    /// all in one call.
    pub(crate) async fn budget_usages(
        &self,
        counters: Vec<(std::sync::Arc<str>, u64, Window)>,
    ) -> Result<Vec<(u64, Option<u64>)>, DbError> {
        let start_of = |w: &Window| match w {
            Window::Fixed { start, .. } => Some(*start),
            _ => None,
        };
        match &self.db {
            Kind::Sqlite(db) => {
                Self::sqlite(db, move |db| {
                    let wanted: Vec<(&str, Timestamp)> = counters
                        .iter()
                        .filter_map(|(c, _, w)| start_of(w).map(|s| (&**c, s)))
                        .collect();
                    let mut found = db.ledger_usages(&wanted)?.into_iter();
                    Ok(counters
                        .iter()
                        .map(|(_, _, w)| match start_of(w) {
                            Some(_) => found
                                .next()
                                .map_or((0, Some(0)), |u| (u.settled, Some(u.open_reserved))),
                            None => (0, Some(0)),
                        })
                        .collect())
                })
                .await
            }
            Kind::Postgres(db) => {
                let mut out = Vec::with_capacity(counters.len());
                for (counter, group, window) in &counters {
                    let Some(start) = start_of(window) else {
                        out.push((0, Some(0)));
                        continue;
                    };
                    let settled = db.spent(counter, Some(start)).await?;
                    let Some(redis) = &self.counters else {
                        out.push((settled, None));
                        continue;
                    };
                    let counted = redis
                        .used(*group, counter, *window)
                        .await
                        .map_err(|e| DbError::Unavailable(format!("the shared counters: {e}")))?
                        .unwrap_or(0);
                    out.push((settled, Some(counted.saturating_sub(settled))));
                }
                Ok(out)
            }
        }
    }
}
