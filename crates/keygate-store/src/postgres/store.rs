//! [`PgStore`]: the request path's view of the PostgreSQL database.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use keygate_core::{KeyDigest, KeyId, KeyStore, Lookup, StoreError, Timestamp};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use super::db::{CHANGES_CHANNEL, PgDb, pg_error};
use crate::error::DbError;
use crate::memory::MemoryStore;
use crate::store::{PendingUses, RefreshOutcome, lock};

/// How long the watcher waits between two attempts to open its listening connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Keys and projects from PostgreSQL, served from memory: what each gateway replica looks
/// keys up in.
///
/// Lookups read a [`MemoryStore`] snapshot only, never the database. [`PgStore::watch`]
/// keeps it up to date with changes made by any writer (another replica, the CLI, the admin
/// API), applying only the rows that changed:
///
/// - woken by `LISTEN keygate_changes` the moment a change commits;
/// - and polling the change counter every `poll` interval whatever happens, so a lost
///   notification or a dead listening connection delays a change by at most `poll`;
/// - resynchronising every time the listening connection is (re)opened.
///
/// When the database cannot be reached, the previous snapshot keeps serving and the error
/// is kept for [`PgStore::last_error`] (for `/healthz`).
///
/// Clones share the snapshot and the pending uses.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: PgDb,
    memory: MemoryStore,
    /// The change sequence number the snapshot reflects (held across a refresh's I/O, so
    /// two refreshes never apply changes out of order).
    seq: tokio::sync::Mutex<u64>,
    last_error: Mutex<Option<String>>,
    uses: PendingUses,
    listening: std::sync::atomic::AtomicBool,
}

impl PgStore {
    /// Connects to the database at `url` (as [`PgDb::connect`]) and loads every project and
    /// key.
    ///
    /// # Errors
    ///
    /// As [`PgDb::connect`] and [`PgDb::load`]: a gateway that cannot read its keys does
    /// not start.
    pub async fn connect(url: &str) -> Result<PgStore, DbError> {
        Self::from_db(PgDb::connect(url).await?).await
    }

    /// Serves the keys of `db`, loading them all now.
    ///
    /// # Errors
    ///
    /// As [`PgDb::load`].
    pub async fn from_db(db: PgDb) -> Result<PgStore, DbError> {
        let (snapshot, seq) = db.load().await?;
        Ok(PgStore {
            inner: Arc::new(Inner {
                db,
                memory: MemoryStore::new(snapshot),
                seq: tokio::sync::Mutex::new(seq),
                last_error: Mutex::new(None),
                uses: PendingUses::default(),
                listening: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The in-memory store serving lookups (shares the snapshot with this store).
    pub fn store(&self) -> MemoryStore {
        self.inner.memory.clone()
    }

    /// The database.
    pub fn db(&self) -> &PgDb {
        &self.inner.db
    }

    /// Brings the snapshot up to date, then writes the uses recorded since the last call.
    ///
    /// One read of the change counter when nothing changed; otherwise only the changed
    /// projects and keys are read and applied.
    ///
    /// # Errors
    ///
    /// A [`DbError`] when the database cannot be read or written, or holds records that do
    /// not fit together. The previous snapshot keeps serving; the error is kept for
    /// [`PgStore::last_error`] until a refresh succeeds.
    pub async fn refresh(&self) -> Result<RefreshOutcome, DbError> {
        let result = self.catch_up().await;
        let flushed = self.flush_uses().await;
        let result = result.and_then(|outcome| flushed.map(|_| outcome));
        *lock(&self.inner.last_error) = result.as_ref().err().map(ToString::to_string);
        result
    }

    async fn catch_up(&self) -> Result<RefreshOutcome, DbError> {
        let mut seq = self.inner.seq.lock().await;
        let now = self.inner.db.change_seq().await?;
        if now == *seq {
            return Ok(RefreshOutcome::Unchanged);
        }
        if now < *seq {
            // The database was restored from an older copy: follow it whole.
            let (snapshot, loaded) = self.inner.db.load().await?;
            let outcome = RefreshOutcome::Reloaded {
                projects: snapshot.projects().count(),
                keys: snapshot.len(),
            };
            tracing::warn!(
                was = *seq,
                now = loaded,
                "the key database's change sequence went back; reloaded every key"
            );
            self.inner.memory.replace(snapshot);
            *seq = loaded;
            return Ok(outcome);
        }
        let changes = self.inner.db.changes_since(*seq).await?;
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
        *seq = changes.seq;
        Ok(outcome)
    }

    /// Notes that `key` was used at `at`. No I/O: the latest use of each key waits in memory
    /// for the next refresh, which writes them all in one statement.
    pub fn record_use(&self, key: &KeyId, at: Timestamp) {
        self.inner.uses.note(key, at);
    }

    /// Writes the uses recorded so far (call it at shutdown); returns how many keys'.
    ///
    /// # Errors
    ///
    /// As [`PgDb::touch_last_used`]; the uses are kept for the next try.
    pub async fn flush_uses(&self) -> Result<usize, DbError> {
        let batch = self.inner.uses.take();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.inner.db.touch_last_used(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                self.inner.uses.put_back(&batch);
                Err(e)
            }
        }
    }

    /// Keeps the snapshot up to date on the current tokio runtime: woken by PostgreSQL's
    /// notifications, polling every `poll` as the guarantee, resynchronising whenever the
    /// listening connection is opened again. Abort the handle to stop; call
    /// [`PgStore::flush_uses`] afterwards to write the last uses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `poll` is zero.
    pub fn watch(&self, poll: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let wake = Arc::new(Notify::new());
            let mut listener: Option<Listener> = None;
            let mut next_attempt = tokio::time::Instant::now();
            let mut ticks = tokio::time::interval(poll);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if listener.is_none() && tokio::time::Instant::now() >= next_attempt {
                    match Listener::open(this.inner.db.config(), wake.clone()).await {
                        Ok(opened) => {
                            listener = Some(opened);
                            this.set_listening(true);
                            // Whatever was announced while no one listened.
                            this.refresh_logged().await;
                        }
                        Err(error) => {
                            next_attempt = tokio::time::Instant::now() + LISTEN_RETRY;
                            tracing::warn!(%error, "cannot listen for key changes; polling only");
                        }
                    }
                }
                let lost = async {
                    match &mut listener {
                        Some(l) => {
                            let _ = (&mut l.driver).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let closed = tokio::select! {
                    () = wake.notified() => false,
                    _ = ticks.tick() => false,
                    () = lost => true,
                };
                if closed {
                    tracing::warn!("the key-change listening connection closed; reopening it");
                    listener = None;
                    this.set_listening(false);
                    next_attempt = tokio::time::Instant::now();
                    continue;
                }
                this.refresh_logged().await;
            }
        })
    }

    async fn refresh_logged(&self) {
        match self.refresh().await {
            Ok(RefreshOutcome::Unchanged) => {}
            Ok(outcome) => tracing::debug!(?outcome, "key snapshot refreshed"),
            Err(error) => tracing::error!(
                %error,
                "key database refresh failed; the previous keys stay in use"
            ),
        }
    }

    fn set_listening(&self, on: bool) {
        self.inner
            .listening
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the watcher's listening connection is open (changes then arrive at once,
    /// not at the next poll).
    pub fn listening(&self) -> bool {
        self.inner
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the last refresh failed, or `None` when it worked (for a health check).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.inner.last_error).clone()
    }
}

/// A connection of its own that `LISTEN`s for changes, waking the watcher on each.
struct Listener {
    /// Dropping the client closes the connection.
    _client: tokio_postgres::Client,
    /// Drives the connection; ends when it closes.
    driver: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn open(config: &tokio_postgres::Config, wake: Arc<Notify>) -> Result<Listener, DbError> {
        let (client, mut connection) =
            super::db::deadline(async { config.connect(NoTls).await.map_err(pg_error) }).await?;
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let listen = format!("LISTEN {CHANGES_CHANNEL}");
        super::db::deadline(async { client.batch_execute(&listen).await.map_err(pg_error) })
            .await?;
        Ok(Listener {
            _client: client,
            driver,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("db", &self.inner.db)
            .field("keys", &self.inner.memory.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl KeyStore for PgStore {
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
