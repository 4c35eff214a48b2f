//! What the key commands do to a store, whichever database it is.

use std::cell::RefCell;

use keygate_admin::{AdminStore, BudgetUse};
use keygate_core::admin::{AdminKeyRecord, AuditBy};
use keygate_core::{KeyRecord, ObjectKind, ObjectRecord, ProjectRecord, Timestamp};
use keygate_store::{
    Db, DbError, ImportOutcome, KeyFile, PgDb, RedisBackend, RedisOptions, RedisTarget, StoredKey,
};

/// A change to one key (see [`Db::update_key`]).
pub(crate) type KeyChange<'a> =
    dyn FnMut(&mut KeyRecord, &mut Option<String>) -> Result<(), String> + 'a;

/// A change to one project (see [`Db::update_project`]).
pub(crate) type ProjectChange<'a> = dyn FnMut(&mut ProjectRecord) -> Result<(), String> + 'a;

/// The store operations of the key commands: each one transaction in the database.
pub(crate) trait StoreOps {
    fn export(&self) -> Result<KeyFile, DbError>;
    fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError>;
    fn create_project(&self, project: &ProjectRecord, by: AuditBy<'_>) -> Result<(), DbError>;
    fn update_project(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut ProjectChange<'_>,
    ) -> Result<(), DbError>;
    fn insert_keys(&self, keys: &[KeyRecord], by: AuditBy<'_>) -> Result<(), DbError>;
    fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError>;
    fn update_key(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut KeyChange<'_>,
    ) -> Result<(), DbError>;
    fn insert_admin_key(&self, key: &AdminKeyRecord, by: AuditBy<'_>) -> Result<(), DbError>;
    fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError>;
    fn revoke_admin_key(&self, id: &str, by: AuditBy<'_>) -> Result<AdminKeyRecord, DbError>;
    fn import(&self, file: &KeyFile, created_by: &str) -> Result<ImportOutcome, DbError>;
    fn objects(
        &self,
        project: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Vec<ObjectRecord>, DbError>;
    fn object(&self, id: &str) -> Result<Option<ObjectRecord>, DbError>;
    fn record_objects(&self, objects: &[ObjectRecord]) -> Result<(), DbError>;
    fn remove_object(&self, id: &str) -> Result<bool, DbError>;
    /// The money budgets of key `id` and of its project now, as the admin API shows them
    /// (`None`: no such key); on PostgreSQL, what requests in flight hold is read from the
    /// shared `counters` when given (else it shows as unknown).
    fn key_budgets(
        &self,
        id: &str,
        now: Timestamp,
        counters: Option<&str>,
    ) -> Result<Option<Vec<BudgetUse>>, DbError>;
}

impl StoreOps for RefCell<Db> {
    fn export(&self) -> Result<KeyFile, DbError> {
        self.borrow().export()
    }
    fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError> {
        self.borrow().project(id)
    }
    fn create_project(&self, project: &ProjectRecord, by: AuditBy<'_>) -> Result<(), DbError> {
        self.borrow_mut().create_project_as(project, by)
    }
    fn update_project(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut ProjectChange<'_>,
    ) -> Result<(), DbError> {
        self.borrow_mut().update_project_as(id, by, change)
    }
    fn insert_keys(&self, keys: &[KeyRecord], by: AuditBy<'_>) -> Result<(), DbError> {
        self.borrow_mut().insert_keys_as(keys, by.actor, by)
    }
    fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError> {
        self.borrow().key(id)
    }
    fn update_key(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut KeyChange<'_>,
    ) -> Result<(), DbError> {
        self.borrow_mut().update_key_as(id, by, change)
    }
    fn insert_admin_key(&self, key: &AdminKeyRecord, by: AuditBy<'_>) -> Result<(), DbError> {
        self.borrow_mut().insert_admin_key(key, by)
    }
    fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError> {
        self.borrow().admin_keys()
    }
    fn revoke_admin_key(&self, id: &str, by: AuditBy<'_>) -> Result<AdminKeyRecord, DbError> {
        self.borrow_mut().revoke_admin_key(id, by)
    }
    fn import(&self, file: &KeyFile, created_by: &str) -> Result<ImportOutcome, DbError> {
        self.borrow_mut().import(file, created_by)
    }
    fn objects(
        &self,
        project: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Vec<ObjectRecord>, DbError> {
        self.borrow().objects(project, kind)
    }
    fn object(&self, id: &str) -> Result<Option<ObjectRecord>, DbError> {
        self.borrow().object(id)
    }
    fn record_objects(&self, objects: &[ObjectRecord]) -> Result<(), DbError> {
        self.borrow_mut().record_objects(objects)
    }
    fn remove_object(&self, id: &str) -> Result<bool, DbError> {
        self.borrow_mut().remove_object(id)
    }
    fn key_budgets(
        &self,
        id: &str,
        now: Timestamp,
        _counters: Option<&str>,
    ) -> Result<Option<Vec<BudgetUse>>, DbError> {
        // The admin API's own reading, on a connection of its own, on a thread of its own
        // (the caller may be on an async runtime's thread, where no other can block).
        let path = self.borrow().path().to_owned();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let store = AdminStore::open_sqlite(&path)?;
                    runtime()?.block_on(keygate_admin::key_budgets(&store, id, now))
                })
                .join()
                .unwrap_or_else(|_| Err(DbError::Unavailable("reading spend failed".into())))
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, DbError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DbError::Unavailable(e.to_string()))
}

/// A PostgreSQL database, driven from the synchronous CLI on a runtime of its own.
pub(crate) struct PgOps {
    runtime: tokio::runtime::Runtime,
    db: PgDb,
}

impl PgOps {
    pub(crate) fn connect(url: &str) -> Result<PgOps, DbError> {
        let runtime = runtime()?;
        let db = runtime.block_on(PgDb::connect(url))?;
        Ok(PgOps { runtime, db })
    }
}

impl StoreOps for PgOps {
    fn export(&self) -> Result<KeyFile, DbError> {
        self.runtime.block_on(self.db.export())
    }
    fn project(&self, id: &str) -> Result<Option<ProjectRecord>, DbError> {
        self.runtime.block_on(self.db.project(id))
    }
    fn create_project(&self, project: &ProjectRecord, by: AuditBy<'_>) -> Result<(), DbError> {
        self.runtime
            .block_on(self.db.create_project_as(project, by))
    }
    fn update_project(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut ProjectChange<'_>,
    ) -> Result<(), DbError> {
        self.runtime
            .block_on(self.db.update_project_as(id, by, change))
    }
    fn insert_keys(&self, keys: &[KeyRecord], by: AuditBy<'_>) -> Result<(), DbError> {
        self.runtime
            .block_on(self.db.insert_keys_as(keys, by.actor, by))
    }
    fn key(&self, id: &str) -> Result<Option<StoredKey>, DbError> {
        self.runtime.block_on(self.db.key(id))
    }
    fn update_key(
        &self,
        id: &str,
        by: AuditBy<'_>,
        change: &mut KeyChange<'_>,
    ) -> Result<(), DbError> {
        self.runtime.block_on(self.db.update_key_as(id, by, change))
    }
    fn insert_admin_key(&self, key: &AdminKeyRecord, by: AuditBy<'_>) -> Result<(), DbError> {
        self.runtime.block_on(self.db.insert_admin_key(key, by))
    }
    fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError> {
        self.runtime.block_on(self.db.admin_keys())
    }
    fn revoke_admin_key(&self, id: &str, by: AuditBy<'_>) -> Result<AdminKeyRecord, DbError> {
        self.runtime.block_on(self.db.revoke_admin_key(id, by))
    }
    fn import(&self, file: &KeyFile, created_by: &str) -> Result<ImportOutcome, DbError> {
        self.runtime.block_on(self.db.import(file, created_by))
    }
    fn objects(
        &self,
        project: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Vec<ObjectRecord>, DbError> {
        self.runtime.block_on(self.db.objects(project, kind))
    }
    fn object(&self, id: &str) -> Result<Option<ObjectRecord>, DbError> {
        self.runtime.block_on(self.db.object(id))
    }
    fn record_objects(&self, objects: &[ObjectRecord]) -> Result<(), DbError> {
        self.runtime.block_on(self.db.record_objects(objects))
    }
    fn remove_object(&self, id: &str) -> Result<bool, DbError> {
        self.runtime.block_on(self.db.remove_object(id))
    }
    /// Settled: the PostgreSQL ledger (which trails the counters by a flush, about 250 ms).
    /// Reserved: what the shared counters hold beyond it, when they are given.
    fn key_budgets(
        &self,
        id: &str,
        now: Timestamp,
        counters: Option<&str>,
    ) -> Result<Option<Vec<BudgetUse>>, DbError> {
        self.runtime.block_on(async {
            let mut store = AdminStore::postgres(self.db.clone());
            if let Some(url) = counters {
                let redis =
                    RedisBackend::connect(&RedisTarget::from_list(url), RedisOptions::default())
                        .await
                        .map_err(|e| DbError::Unavailable(format!("--counters: {e}")))?;
                store = store.with_counters(redis);
            }
            keygate_admin::key_budgets(&store, id, now).await
        })
    }
}
