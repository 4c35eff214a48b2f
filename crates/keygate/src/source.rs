//! [`KeySource`]: where a configured gateway's keys come from, the SQLite store (the default)
//! or a TOML key file.

use std::future::Future;
use std::time::Duration;

use keygate_core::{KeyDigest, KeyStore, Lookup, StoreError};
use keygate_store::{FileStore, MemoryStore, SqliteStore};

/// The key store of a [`Config`](crate::Config): the SQLite database (`store =
/// "sqlite:keygate.db"`, the default) or a TOML key file (`keys_file`). Lookups are served
/// from memory either way; a change to the source is picked up by [`KeySource::watch`].
/// Made with `From<SqliteStore>` or `From<FileStore>`.
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
            Kind::File(_) => None,
        }
    }

    /// The key file store, when that is the source.
    pub fn file(&self) -> Option<&FileStore> {
        match &self.kind {
            Kind::File(f) => Some(f),
            Kind::Sqlite(_) => None,
        }
    }

    /// Why the last refresh failed, if it did (the previous keys keep serving): for
    /// `/healthz`.
    pub fn last_error(&self) -> Option<String> {
        match &self.kind {
            Kind::Sqlite(s) => s.last_error(),
            Kind::File(f) => f.last_error().map(|e| e.to_string()),
        }
    }

    /// Picks changes up every `interval` on the tokio runtime (see [`SqliteStore::watch`] and
    /// [`FileStore::watch`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `interval` is zero.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        match &self.kind {
            Kind::Sqlite(s) => s.watch(interval),
            Kind::File(f) => f.watch(interval),
        }
    }

    /// Reloads now (blocking I/O; from async code call it through `spawn_blocking`) and says
    /// what happened, in words for a log line.
    ///
    /// # Errors
    ///
    /// Why the source could not be read; the previous keys keep serving.
    pub fn reload(&self) -> Result<String, String> {
        match &self.kind {
            Kind::Sqlite(s) => s
                .refresh()
                .map(|o| format!("{o:?}"))
                .map_err(|e| e.to_string()),
            Kind::File(f) => f
                .reload()
                .map(|o| format!("{o:?}"))
                .map_err(|e| e.to_string()),
        }
    }

    /// Writes what is only in memory (the store's batched last-used times; blocking I/O):
    /// call at shutdown.
    pub fn flush(&self) {
        if let Kind::Sqlite(s) = &self.kind
            && let Err(error) = s.flush_uses()
        {
            tracing::error!(%error, "writing the keys' last-used times failed");
        }
    }

    /// What it is, for the gateway's first lines (`sqlite:keygate.db`, `keys.toml`).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Sqlite(s) => format!("sqlite:{}", s.path().display()),
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
        if let (Some(hit), Kind::Sqlite(store)) = (&found, &self.kind) {
            // Last-used times: noted in memory (one short lock), written in batches by the
            // store's watcher; to the second, which is all a "last used" needs.
            let now = keygate_core::Clock::system().now().as_unix_secs();
            store.record_use(&hit.key.id, keygate_core::Timestamp::from_unix_secs(now));
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
