//! The keygate key stores, and durable state: keys and projects in SQLite, the embedded
//! default store, and the spend ledger that makes token and budget counters survive restarts.
//!
//! Three [`KeyStore`](keygate_core::KeyStore)s, all serving lookups from memory:
//!
//! - [`MemoryStore`]: a [`Snapshot`](keygate_core::Snapshot) you build and replace yourself;
//! - [`FileStore`]: a TOML [`KeyFile`] (digests only), reloaded when it changes, for keys kept
//!   in git;
//! - [`SqliteStore`]: the database the CLI writes, refreshed with the rows that changed.
//!
//! [`Db`] is the database (synchronous; what the CLI and admin tools use). [`SqliteStore`]
//! is the [`KeyStore`](keygate_core::KeyStore) a gateway serves from: a memory snapshot of
//! the database, brought up to date with only the rows that changed, so lookups never touch
//! the disk. [`LedgerBackend`] is the [`LimitBackend`](keygate_limit::LimitBackend) of a
//! gateway on the same file: counters in memory, every reservation durable before its
//! request is forwarded, and the counters rebuilt from the ledger at startup.
//!
//! ```
//! use keygate_core::{KeyFormat, KeyId, KeyRecord, Permissions, ProjectRecord, Rejection, Secret, Timestamp};
//! use keygate_store::{Db, RefreshOutcome, SqliteStore};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("keygate.db");
//!
//! // The CLI: a project and a key (the secret is shown once; only its digest is stored).
//! let mut db = Db::open(&path)?;
//! db.create_project(&ProjectRecord::new("default"))?;
//! let secret = KeyFormat::default().generate()?;
//! let mut key = KeyRecord::new(KeyId::new("key_demo"), "default", secret.digest(), Timestamp::UNIX_EPOCH);
//! key.permissions = Permissions::ReadOnly;
//! db.insert_keys(&[key], "admin")?;
//!
//! // The gateway: lookups come from memory.
//! let store = SqliteStore::open(&path)?;
//! let found = store.store().get(&secret.digest()).expect("the key is served");
//! assert_eq!(found.key.permissions, Permissions::ReadOnly);
//!
//! // Revoked through any connection, seen at the next refresh.
//! db.update_key("key_demo", |key, _reason| {
//!     key.revoked_at = Some(Timestamp::from_unix_secs(1));
//!     Ok(())
//! })?;
//! assert_eq!(store.refresh()?, RefreshOutcome::Applied { projects: 0, keys: 1 });
//! let found = store.store().get(&secret.digest()).expect("still known");
//! assert_eq!(found.key.check_live(Secret::Current, Timestamp::from_unix_secs(2)), Err(Rejection::Revoked));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Deployment
//!
//! - The database file and its `-wal` and `-shm` companions belong together: copy them
//!   with `sqlite3 keygate.db ".backup copy.db"`, not `cp`, while a gateway runs.
//! - Keep the file on a local disk: SQLite's locking is unreliable on network file systems.
//! - A [`SqliteStore`] keeps reading the file it opened. A file renamed over it (a copy
//!   restored with `mv`) is not followed: refreshes fail, visibly in
//!   [`SqliteStore::last_error`], and the keys loaded keep serving until a restart. Restore
//!   in place with `sqlite3 keygate.db ".restore copy.db"` instead.
//! - Records are never deleted, only revoked or disabled, so changes are all a snapshot
//!   needs to follow.

mod admin;
mod db;
mod error;
mod file;
mod ledger;
mod memory;
mod objects;
mod postgres;
mod rates;
mod redis_counters;
mod schema;
mod store;
mod url;

#[cfg(test)]
mod test_support;

pub use admin::{EventQuery, KeyPage, KeyQuery, KeyStatus, MAX_PAGE, UsageRow, action_event};
pub use db::{Changes, Db, ImportOutcome, StoredKey};
pub use error::DbError;
pub use file::{FileStore, FileStoreError, KEY_FILE_VERSION, KeyFile, ReloadOutcome};
pub use ledger::{Durability, LedgerBackend, LedgerUsage};
pub use memory::MemoryStore;
pub use objects::{OBJECT_RECHECK, STORED_RESULT_DAYS, SqliteRegistry};
pub use postgres::{Flushed, LedgerWriter, PG_DEADLINE, PgDb, PgRegistry, PgStore};
pub use rates::{RateBegin, RateStart};
pub use redis_counters::{
    LEDGER_GROUP, LedgerSource, LedgerWindow, MAX_EXACT, OutboxEntry, RedisBackend, RedisOptions,
    RedisTarget, SHARDS, SettledCharge, WindowsFuture,
};
pub use store::{RefreshOutcome, SqliteStore};
pub use url::{DEFAULT_STORE_URL, PostgresUrl, StoreUrl, StoreUrlError};
