//! [`KeySource`]: where a configured gateway's keys come from, the SQLite store (the default),
//! PostgreSQL (shared by replicas) or a TOML key file.

use std::future::Future;
use std::time::Duration;

use keygate_core::{KeyDigest, KeyStore, Lookup, StoreError};
use keygate_store::{FileStore, MemoryStore, PgStore, SqliteStore};

/// The key store of a [`Config`](crate::Config): the SQLite database (`store =
/// "sqlite:keygate.db"`, the default), a PostgreSQL database (`store = "postgres://…"`) or a
/// TOML key file (`keys_file`). Lookups are served from memory every way; a change to the
/// source is picked up by [`KeySource::watch`]. Made with `From<SqliteStore>`,
/// `From<PgStore>` or `From<FileStore>`.
#[derive(Debug, Clone)]
pub struct KeySource {
    // The snapshot both kinds serve from (shared with the store, so it sees every refresh);
    // held here so a lookup costs no clone.
    memory: MemoryStore,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Sqlite(SqliteStore),
    Postgres(PgStore),
    File(FileStore),
}

impl From<SqliteStore> for KeySource {
    fn from(s: SqliteStore) -> Self {
        KeySource {
            memory: s.store(),
            kind: Kind::Sqlite(s),
        }
    }
}

impl From<PgStore> for KeySource {
    fn from(s: PgStore) -> Self {
        KeySource {
            memory: s.store(),
            kind: Kind::Postgres(s),
        }
    }
}

impl From<FileStore> for KeySource {
    fn from(f: FileStore) -> Self {
        KeySource {
            memory: f.store(),
            kind: Kind::File(f),
        }
    }
}

impl KeySource {
    /// The in-memory snapshot being served.
    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// The SQLite store, when that is the source.
    pub fn sqlite(&self) -> Option<&SqliteStore> {
        match &self.kind {
            Kind::Sqlite(s) => Some(s),
            _ => None,
        }
    }

    /// The PostgreSQL store, when that is the source.
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.kind {
            Kind::Postgres(s) => Some(s),
            _ => None,
        }
    }

    /// The key file store, when that is the source.
    pub fn file(&self) -> Option<&FileStore> {
        match &self.kind {
            Kind::File(f) => Some(f),
            _ => None,
        }
    }

    /// Why the last refresh failed, if it did (the previous keys keep serving): for
    /// `/healthz`.
    pub fn last_error(&self) -> Option<String> {
        match &self.kind {
            Kind::Sqlite(s) => s.last_error(),
            Kind::Postgres(s) => s.last_error(),
            Kind::File(f) => f.last_error().map(|e| e.to_string()),
        }
    }

    /// Picks changes up every `interval` on the tokio runtime (see [`SqliteStore::watch`],
    /// [`PgStore::watch`] and [`FileStore::watch`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `interval` is zero.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        match &self.kind {
            Kind::Sqlite(s) => s.watch(interval),
            Kind::Postgres(s) => s.watch(interval),
            Kind::File(f) => f.watch(interval),
        }
    }

    /// Reloads now (the file and SQLite reads on a blocking thread) and says what happened,
    /// in words for a log line.
    ///
    /// # Errors
    ///
    /// Why the source could not be read; the previous keys keep serving.
    pub async fn reload(&self) -> Result<String, String> {
        let kind = self.kind.clone();
        match kind {
            Kind::Postgres(s) => s
                .refresh()
                .await
                .map(|o| format!("{o:?}"))
                .map_err(|e| e.to_string()),
            Kind::Sqlite(s) => {
                blocking(move || {
                    s.refresh()
                        .map(|o| format!("{o:?}"))
                        .map_err(|e| e.to_string())
                })
                .await
            }
            Kind::File(f) => {
                blocking(move || {
                    f.reload()
                        .map(|o| format!("{o:?}"))
                        .map_err(|e| e.to_string())
                })
                .await
            }
        }
    }

    /// Writes what is only in memory (the store's batched last-used times): call at
    /// shutdown.
    pub async fn flush(&self) {
        let result = match self.kind.clone() {
            Kind::Sqlite(s) => blocking(move || s.flush_uses().map_err(|e| e.to_string())).await,
            Kind::Postgres(s) => s.flush_uses().await.map_err(|e| e.to_string()),
            Kind::File(_) => Ok(0),
        };
        if let Err(error) = result {
            tracing::error!(%error, "writing the keys' last-used times failed");
        }
    }

    /// What it is, for the gateway's first lines (`sqlite:keygate.db`, `keys.toml`).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Sqlite(s) => format!("sqlite:{}", s.path().display()),
            Kind::Postgres(s) => format!("postgres ({} keys)", s.store().snapshot().len()),
            Kind::File(f) => f.path().display().to_string(),
        }
    }
}

impl KeyStore for KeySource {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        let found = self.memory.get(digest);
        if let Some(hit) = &found {
            // Last-used times: noted in memory (one short lock), written in batches by the
            // store's watcher; to the second, which is all a "last used" needs.
            let now = || {
                let secs = keygate_core::Clock::system().now().as_unix_secs();
                keygate_core::Timestamp::from_unix_secs(secs)
            };
            match &self.kind {
                Kind::Sqlite(store) => store.record_use(&hit.key.id, now()),
                Kind::Postgres(store) => store.record_use(&hit.key.id, now()),
                Kind::File(_) => {}
            }
        }
        std::future::ready(Ok(found))
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        std::future::ready(Ok(self.memory.snapshot().get_id(id).cloned()))
    }
}

/// Runs blocking I/O on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the reload stopped: {e}")))
}
