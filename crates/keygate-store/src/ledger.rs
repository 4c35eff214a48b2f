//! [`LedgerBackend`]: token and budget counters in memory, with a durable SQLite spend ledger.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keygate_core::{Clock, Timestamp};
use keygate_limit::backend::{
    Actual, BackendError, Charge, LimitBackend, MemoryBackend, Reservation, ReserveError, Reserved,
    Unit, Window,
};
use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::{Db, DbError};

/// At most this many operations share a transaction (a bound on the writer's memory and on
/// how long one commit holds the write lock).
const MAX_BATCH: usize = 4096;

/// Commits between two checkpoints (a reservation and its settlement write about ten
/// pages: about SQLite's default of a checkpoint per thousand pages).
const CHECKPOINT_EVERY: usize = 100;

/// Once the write-ahead log holds this many pages (16 MiB of 4 KiB pages) and the
/// checkpointer has copied them all, the writer copies those it committed meanwhile, so that
/// its next commit starts the log again from the beginning.
///
/// Without this, a writer that commits back to back never lets the log restart: SQLite
/// rewinds the log only when a write transaction begins with every page of it already in
/// the database, and a checkpoint running beside the writer is always a few commits behind.
/// The log then grows without bound (gigabytes within a minute under load), and every commit
/// appends to a growing file, which costs the writer up to 1.5–2 times the CPU.
#[cfg(not(test))]
const RESTART_PAGES: i64 = 4096;
#[cfg(test)]
const RESTART_PAGES: i64 = 64;

/// How long settlements and releases may wait for a reservation to share its commit: at most
/// this much settled spend is counted at its reserved amount after a crash.
const END_DELAY: Duration = Duration::from_millis(20);

/// What a committed ledger transaction survives (SQLite's `synchronous` setting of the
/// ledger's connection; the key store's connection keeps its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// A commit survives the gateway process dying at any moment (`kill -9`, a panic, an
    /// out-of-memory kill): it is in the operating system's cache when `reserve` resolves
    /// (`synchronous = NORMAL` in WAL mode): no `fsync` on the request's path.
    ///
    /// # Security
    ///
    /// A power loss or an operating-system crash can lose the last commits before it, and so
    /// the reservations of requests that were forwarded in those last moments: a budget can
    /// then be overspent by what those requests spent. Choose [`PowerLoss`](Self::PowerLoss)
    /// where that matters more than latency.
    #[default]
    ProcessCrash,
    /// A commit survives a power loss too: the write-ahead log is synced to the disk before
    /// `reserve` resolves (`synchronous = FULL`). One `fsync` per commit (shared by every
    /// reservation in it): typically hundreds of microseconds.
    PowerLoss,
}

/// What a reservation's rows, or a flush, are waiting for.
type Ack = oneshot::Sender<Result<(), BackendError>>;

/// Token and budget counters in memory, made durable by a SQLite spend ledger: the
/// [`LimitBackend`] of a single gateway on the embedded database.
///
/// Admission is decided in memory by a [`MemoryBackend`], exactly as without a ledger. A
/// reservation that holds charges is then written to the ledger by one writer thread, which
/// drains everything queued (reservations, settlements, releases) into one transaction
/// (group commit): [`reserve`](LimitBackend::reserve) resolves only once the transaction
/// holding its rows has committed, so a request is never forwarded on spend the ledger does
/// not know. Settlements and releases are applied to memory at once and written without
/// being waited for, in the next reservation's commit (or alone within 20 ms when none
/// comes): one lost in a crash leaves its reservation open, and an open reservation is
/// counted at its reserved amount.
///
/// At [`open`](LedgerBackend::open) the counters are rebuilt from the ledger:
///
/// - every reservation a previous process left open is settled at its reserved amount (its
///   request may have been forwarded and paid for);
/// - a budget counter (a [`Window::Fixed`] period that contains now) holds the sum of its
///   charges in that period: the actual amounts of settled reservations, nothing for released
///   ones;
/// - a token-rate counter ([`Window::Rate`]) is **restored conservatively**: it holds the sum
///   of every amount charged to it within the last `per` before now, as if none of it had
///   drained yet, and drains from the moment of the restart. A leaky bucket never holds more
///   than what entered it during the last `per` (it holds at most its limit), so this is never
///   less than what the bucket held before the restart.
///
/// So a budget is never overspent across a graceful restart, a crash, or `kill -9`: what is
/// admitted after a restart fits on top of everything that was admitted before it.
///
/// Rows are keyed by the reservation's [`id`](Reservation::id) (the largest id in the ledger
/// plus one, onwards, at every open); every write is an insert that ignores an existing id
/// or an update of an open row, so writing an operation twice has no second effect.
/// Settled rows are never deleted: they are the spend history (see [`Db::ledger_usage`]).
///
/// One `LedgerBackend` per database file at a time: opening one settles every reservation
/// that is still open, including those of another live process.
///
/// Cheap to clone (the clones share the counters and the writer). Dropping the last clone
/// commits what is queued and stops the writer thread (blocking until it has).
///
/// Two threads of its own: the writer, and a checkpointer that copies SQLite's write-ahead
/// log into the database every hundred commits, off the writer's path. Once the log has
/// grown to 16 MiB, the writer copies the pages committed since the last checkpoint itself,
/// after a commit (one pause, about two `fsync`s), so that the log starts again from the
/// beginning instead of growing for as long as commits keep coming.
///
/// ```
/// use keygate_core::Timestamp;
/// use keygate_limit::LimitBackend;
/// use keygate_limit::backend::{Actual, Charge, Unit, Window};
/// use keygate_store::LedgerBackend;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// # rt.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("keygate.db");
/// let now = Timestamp::from_unix_secs(1_700_000_000);
/// let budget = Charge {
///     key: "budget:key_demo".into(),
///     window: Window::Fixed { start: Timestamp::UNIX_EPOCH, end: None },
///     unit: Unit::Nanodollars,
///     limit: 1_000,
///     amount: 400,
/// };
///
/// let ledger = LedgerBackend::open_at(&path, now)?;
/// // Durable once this resolves: the request may now be forwarded.
/// let reservation = ledger.reserve(vec![budget.clone()], now).await?;
/// assert!(reservation.id > 0);
/// let spent = Actual { tokens: 0, cost: keygate_core::Money::from_nanos(150) };
/// ledger.settle(reservation, spent, now).await?;
/// drop(ledger); // commits what is queued
///
/// // After a restart, 850 are left.
/// let ledger = LedgerBackend::open_at(&path, now)?;
/// assert_eq!(ledger.memory().used(&budget.key, budget.window, 1_000, now), Some(150));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LedgerBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    memory: MemoryBackend,
    /// `None` only while dropping (so the writer sees the queue close).
    queue: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    #[cfg(test)]
    hooks: Arc<Hooks>,
}

/// Test hooks: hold the writer (operations queue up), or make it stop writing for good as a
/// crashed process would.
#[derive(Debug, Default)]
struct Hooks {
    held: Mutex<bool>,
    resumed: Condvar,
    crashed: AtomicBool,
    /// Transactions committed.
    commits: AtomicU64,
    /// Checkpoints the writer ran to let the log restart.
    tail_checkpoints: AtomicU64,
}

impl Hooks {
    fn wait_while_held(&self) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _unheld = self
            .resumed
            .wait_while(held, |held| *held)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    #[cfg(test)]
    fn set_held(&self, value: bool) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *held = value;
        self.resumed.notify_all();
    }
}

#[derive(Debug)]
enum Op {
    Reserve {
        id: u64,
        at: u64,
        charges: Vec<Reserved>,
        ack: Ack,
    },
    /// Settled at these amounts (one per charge), or released (`None`).
    End {
        id: u64,
        at: u64,
        actual: Option<Vec<u64>>,
    },
    Flush(Ack),
}

fn stopped() -> BackendError {
    BackendError("spend ledger writer stopped".into())
}

impl LedgerBackend {
    /// Opens the ledger in the database at `path` (the key store's file: both share it
    /// through write-ahead logging), rebuilds the counters as of the system clock's now, and
    /// starts the writer thread.
    ///
    /// # Errors
    ///
    /// As [`Db::open`]; [`DbError::Sqlite`] when the ledger cannot be read or the open
    /// reservations of a previous process cannot be settled.
    pub fn open(path: impl AsRef<Path>) -> Result<LedgerBackend, DbError> {
        Self::open_with(path, Clock::system().now(), Durability::default())
    }

    /// [`open`](LedgerBackend::open), rebuilding the counters as of `now`.
    ///
    /// # Errors
    ///
    /// As [`open`](LedgerBackend::open).
    pub fn open_at(path: impl AsRef<Path>, now: Timestamp) -> Result<LedgerBackend, DbError> {
        Self::open_with(path, now, Durability::default())
    }

    /// [`open_at`](LedgerBackend::open_at), committing with `durability`.
    ///
    /// # Errors
    ///
    /// As [`open`](LedgerBackend::open).
    pub fn open_with(
        path: impl AsRef<Path>,
        now: Timestamp,
        durability: Durability,
    ) -> Result<LedgerBackend, DbError> {
        let mut db = Db::open(path.as_ref())?;
        let synchronous = match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        db.conn().pragma_update(None, "synchronous", synchronous)?;
        // The checkpointer copies the log into the database, off the writer's path.
        db.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpoints = Db::open(path.as_ref())?;
        let memory = MemoryBackend::new();
        let last_id = restore(db.conn_mut(), &memory, now)?;
        let (queue, rx) = mpsc::channel();
        let (commits, committed) = mpsc::sync_channel(CHECKPOINT_EVERY);
        let restart = Arc::new(AtomicBool::new(false));
        let hooks = Arc::new(Hooks::default());
        let spawn_error = |e: std::io::Error| DbError::Open {
            path: path.as_ref().to_path_buf(),
            message: format!("cannot start the ledger writer: {e}"),
        };
        let checkpointer = {
            let restart = restart.clone();
            std::thread::Builder::new()
                .name("keygate-ledger-checkpoint".into())
                .spawn(move || checkpoint_loop(&checkpoints, &committed, &restart))
                .map_err(spawn_error)?
        };
        let writer = {
            let hooks = hooks.clone();
            std::thread::Builder::new()
                .name("keygate-ledger".into())
                .spawn(move || write_loop(db, &rx, &commits, &restart, &hooks))
                .map_err(spawn_error)?
        };
        Ok(LedgerBackend {
            shared: Arc::new(Shared {
                memory,
                queue: Some(queue),
                writer: Some(writer),
                checkpointer: Some(checkpointer),
                next_id: AtomicU64::new(last_id.saturating_add(1)),
                #[cfg(test)]
                hooks,
            }),
        })
    }

    /// The in-memory counters that decide admission (to read them: reserving or ending
    /// through them directly bypasses the ledger).
    pub fn memory(&self) -> &MemoryBackend {
        &self.shared.memory
    }

    /// Resolves once everything queued before the call is committed.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when the transaction holding the queued operations failed or the
    /// writer has stopped.
    pub fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        let sent = self.shared.send(Op::Flush(ack));
        async move {
            sent?;
            done.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Admits in memory and queues the rows; what `reserve` then waits for.
    fn begin_reserve(&self, charges: Vec<Charge>, now: Timestamp) -> Step {
        let mut reservation = match self.shared.memory.reserve_now(charges, now) {
            Ok(r) => r,
            Err(e) => return Step::Done(Err(ReserveError::Exceeded(e))),
        };
        if reservation.charges.is_empty() {
            return Step::Done(Ok(reservation));
        }
        if !reservation.charges.iter().all(|c| known(c.window, c.unit)) {
            // A kind of window this ledger cannot record: refuse rather than not record it.
            self.shared.memory.release_now(reservation, now);
            let e = BackendError("spend ledger cannot record this kind of counter".into());
            return Step::Done(Err(e.into()));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        reservation.id = id;
        let (ack, committed) = oneshot::channel();
        let op = Op::Reserve {
            id,
            at: now.as_unix_nanos(),
            charges: reservation.charges.clone(),
            ack,
        };
        if let Err(e) = self.shared.send(op) {
            self.shared.memory.release_now(reservation, now);
            return Step::Done(Err(e.into()));
        }
        Step::Wait(
            Hold {
                shared: self.shared.clone(),
                reservation: Some(reservation),
                now,
            },
            committed,
        )
    }

    /// Ends in memory at once and queues the ledger update.
    fn end(&self, reservation: Reservation, actual: Option<Actual>, now: Timestamp) {
        let id = reservation.id;
        let amounts = actual.map(|a| {
            reservation
                .charges
                .iter()
                .map(|c| a.amount(c.unit))
                .collect()
        });
        match actual {
            Some(a) => self.shared.memory.settle_now(reservation, a, now),
            None => self.shared.memory.release_now(reservation, now),
        }
        if id == 0 {
            return;
        }
        let op = Op::End {
            id,
            at: now.as_unix_nanos(),
            actual: amounts,
        };
        if self.shared.send(op).is_err() {
            // Left open in the ledger: counted at its reserved amount after a restart.
            tracing::warn!(
                reservation = id,
                "spend ledger writer stopped; settlement not recorded"
            );
        }
    }

    /// Holds the writer: operations queue up, unwritten, until [`resume`] or [`crash`].
    #[cfg(test)]
    async fn hold(&self) {
        self.flush().await.unwrap();
        self.shared.hooks.set_held(true);
    }

    #[cfg(test)]
    fn resume(&self) {
        self.shared.hooks.set_held(false);
    }

    /// The writer stops writing, as if the process had been killed: what is queued, and
    /// everything after, is never committed.
    #[cfg(test)]
    fn crash(&self) {
        self.shared.hooks.crashed.store(true, Ordering::SeqCst);
        self.shared.hooks.set_held(false);
    }
}

impl Shared {
    fn send(&self, op: Op) -> Result<(), BackendError> {
        match &self.queue {
            Some(queue) => queue.send(op).map_err(|_| stopped()),
            None => Err(stopped()),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is left and return.
        self.queue = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the spend ledger writer panicked");
        }
        // The writer gone, the checkpointer's queue is closed too.
        if let Some(checkpointer) = self.checkpointer.take()
            && checkpointer.join().is_err()
        {
            tracing::error!("the spend ledger checkpointer panicked");
        }
    }
}

enum Step {
    Done(Result<Reservation, ReserveError>),
    Wait(Hold, oneshot::Receiver<Result<(), BackendError>>),
}

/// A memory reservation waiting for its rows to commit. Dropped before that (the request
/// was cancelled), it gives the memory back and queues a release of the rows.
struct Hold {
    shared: Arc<Shared>,
    reservation: Option<Reservation>,
    now: Timestamp,
}

impl Hold {
    fn finish(
        mut self,
        committed: Result<Result<(), BackendError>, oneshot::error::RecvError>,
    ) -> Result<Reservation, ReserveError> {
        let Some(reservation) = self.reservation.take() else {
            return Err(stopped().into());
        };
        match committed.unwrap_or_else(|_| Err(stopped())) {
            Ok(()) => Ok(reservation),
            Err(e) => {
                // Fail closed: nothing durable, nothing admitted.
                self.shared.memory.release_now(reservation, self.now);
                Err(e.into())
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            LedgerBackend {
                shared: self.shared.clone(),
            }
            .end(reservation, None, self.now);
        }
    }
}

impl LimitBackend for LedgerBackend {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        let step = self.begin_reserve(charges, now);
        async move {
            match step {
                Step::Done(result) => result,
                Step::Wait(hold, committed) => {
                    let committed = committed.await;
                    hold.finish(committed)
                }
            }
        }
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        self.end(reservation, Some(actual), now);
        std::future::ready(Ok(()))
    }

    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        self.end(reservation, None, now);
        std::future::ready(Ok(()))
    }

    /// Never at once: a reservation waits for its commit.
    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        _now: Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        Err(charges)
    }

    /// At once in memory; the ledger update is queued, not waited for.
    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Option<Reservation> {
        self.end(reservation, actual, now);
        None
    }
}

/// The spend recorded for one counter in one budget period (see [`Db::ledger_usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerUsage {
    /// The actual amounts of settled reservations.
    pub settled: u64,
    /// The reserved amounts of reservations still open (in flight, or left by a crash until
    /// the next [`LedgerBackend::open`] settles them at these amounts).
    pub open_reserved: u64,
}

impl Db {
    /// The spend the ledger records for `counter` in the budget period starting at
    /// `window_start` (the counter names are the budget layer's; `spend show` reads them).
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the ledger cannot be read.
    pub fn ledger_usage(
        &self,
        counter: &str,
        window_start: Timestamp,
    ) -> Result<LedgerUsage, DbError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT COALESCE(SUM(actual), 0), \
                    COALESCE(SUM(CASE WHEN actual IS NULL THEN reserved ELSE 0 END), 0) \
             FROM ledger_charges \
             WHERE counter = ?1 AND window_start = ?2 AND window_kind = 'fixed'",
        )?;
        let (settled, open): (i64, i64) = stmt.query_row(
            params![counter, sql_int(window_start.as_unix_nanos())],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(LedgerUsage {
            settled: settled.max(0).unsigned_abs(),
            open_reserved: open.max(0).unsigned_abs(),
        })
    }
}

fn known(window: Window, unit: Unit) -> bool {
    matches!(window, Window::Rate { .. } | Window::Fixed { .. })
        && matches!(unit, Unit::Tokens | Unit::Nanodollars)
}

/// SQL integers are signed 64-bit: larger amounts are recorded as the largest one.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    v.max(0).unsigned_abs()
}

/// Settles what an earlier process left open and seeds `memory`; returns the largest id.
fn restore(conn: &mut Connection, memory: &MemoryBackend, now: Timestamp) -> Result<u64, DbError> {
    let at = sql_int(now.as_unix_nanos());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "UPDATE ledger_charges SET actual = reserved WHERE actual IS NULL AND reservation_id IN \
         (SELECT reservation_id FROM ledger WHERE state = 'open')",
        [],
    )?;
    let left_open = tx.execute(
        "UPDATE ledger SET state = 'settled', settled_at = ?1 WHERE state = 'open'",
        [at],
    )?;
    if left_open > 0 {
        tracing::warn!(
            reservations = left_open,
            "reservations left open by an earlier run settled at their reserved amounts"
        );
    }
    let last_id: i64 = tx.query_row(
        "SELECT COALESCE(MAX(reservation_id), 0) FROM ledger",
        [],
        |r| r.get(0),
    )?;
    {
        // Later periods of a counter come last and win (memory holds one period per counter).
        let mut fixed = tx.prepare(
            "SELECT counter, window_start, MAX(window_end), MAX(limit_amount), \
                    SUM(COALESCE(actual, reserved)) \
             FROM ledger_charges \
             WHERE window_kind = 'fixed' AND (window_end IS NULL OR window_end > ?1) \
               AND window_start <= ?1 \
             GROUP BY counter, window_start ORDER BY window_start",
        )?;
        let rows = fixed.query_map([at], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (counter, start, end, limit, used) = row?;
            let window = Window::Fixed {
                start: Timestamp::from_unix_nanos(from_sql(start)),
                end: end.map(|e| Timestamp::from_unix_nanos(from_sql(e))),
            };
            memory.restore(
                &counter.into(),
                window,
                from_sql(limit),
                from_sql(used),
                now,
            );
        }
        // A rate charge counts until `window_end` (= at + per): none of it drained.
        let mut rate = tx.prepare(
            "SELECT counter, rate_per_nanos, MAX(limit_amount), SUM(COALESCE(actual, reserved)) \
             FROM ledger_charges \
             WHERE window_kind = 'rate' AND window_end > ?1 AND at <= ?1 \
             GROUP BY counter, rate_per_nanos",
        )?;
        let rows = rate.query_map([at], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (counter, per, limit, used) = row?;
            let window = Window::Rate {
                per: Duration::from_nanos(from_sql(per)),
            };
            memory.restore(
                &counter.into(),
                window,
                from_sql(limit),
                from_sql(used),
                now,
            );
        }
    }
    tx.commit()?;
    Ok(from_sql(last_id))
}

fn write_loop(
    mut db: Db,
    rx: &mpsc::Receiver<Op>,
    commits: &mpsc::SyncSender<()>,
    restart: &AtomicBool,
    hooks: &Hooks,
) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        hooks.wait_while_held();
        batch.push(first);
        collect(rx, &mut batch);
        if hooks.crashed.load(Ordering::SeqCst) {
            // Dropped unwritten: every waiting reservation sees the writer gone.
            batch.clear();
            continue;
        }
        let result = write(db.conn_mut(), &batch).map_err(|e| {
            tracing::error!(error = %e, operations = batch.len(), "spend ledger write failed");
            BackendError(format!("spend ledger write failed: {e}").into())
        });
        if result.is_ok() {
            hooks.commits.fetch_add(1, Ordering::Relaxed);
            // Full: the checkpointer is behind and will catch up anyway.
            let _ = commits.try_send(());
        }
        for op in batch.drain(..) {
            match op {
                Op::Reserve { ack, .. } | Op::Flush(ack) => {
                    // A receiver gone is a request that was cancelled: nothing to tell.
                    let _ = ack.send(result.clone());
                }
                Op::End { .. } => {}
            }
        }
        if restart.swap(false, Ordering::Relaxed) {
            // After the acknowledgements: the requests just committed do not wait for it.
            match checkpoint(&db) {
                Ok(_) => {
                    hooks.tail_checkpoints.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "spend ledger checkpoint failed"),
            }
        }
    }
}

/// What a passive checkpoint did: pages in the log, and how many of them are now in the
/// database (`-1` each when the database is not in WAL mode).
fn checkpoint(db: &Db) -> Result<(i64, i64), rusqlite::Error> {
    db.conn()
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
}

/// Copies the log into the database every [`CHECKPOINT_EVERY`] commits, and once more at
/// the end. Passive: it never waits for (nor blocks) the writer or a reader. Once a log of
/// [`RESTART_PAGES`] is all copied, asks the writer for the rest (see there).
fn checkpoint_loop(db: &Db, committed: &mpsc::Receiver<()>, restart: &AtomicBool) {
    let run = || {
        let result = checkpoint(db);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "spend ledger checkpoint failed");
        }
        result
    };
    let mut since = 0;
    while committed.recv().is_ok() {
        since += 1;
        if since >= CHECKPOINT_EVERY {
            if let Ok((log, copied)) = run()
                && log >= RESTART_PAGES
                && copied == log
            {
                restart.store(true, Ordering::Relaxed);
            }
            since = 0;
        }
    }
    let _ = run();
}

/// Adds what is queued to `batch`. A batch of settlements and releases only (nobody waits
/// for those) waits up to [`END_DELAY`] for a reservation or a flush to share its commit.
fn collect(rx: &mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    let urgent = |op: &Op| !matches!(op, Op::End { .. });
    let mut waiting = !batch.iter().any(urgent);
    let deadline = Instant::now() + END_DELAY;
    while batch.len() < MAX_BATCH {
        let op = match rx.try_recv() {
            Ok(op) => op,
            Err(mpsc::TryRecvError::Empty) if waiting => {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(op) => op,
                    // Timed out, or closed: commit what there is.
                    Err(_) => return,
                }
            }
            Err(_) => return,
        };
        waiting &= !urgent(&op);
        batch.push(op);
    }
}

/// Writes `batch` in one transaction. Each write has an effect only the first time.
fn write(conn: &mut Connection, batch: &[Op]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for op in batch {
        match op {
            Op::Reserve {
                id, at, charges, ..
            } => {
                let (id, at) = (sql_int(*id), sql_int(*at));
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO ledger (reservation_id, at, state) VALUES (?1, ?2, 'open') \
                         ON CONFLICT (reservation_id) DO NOTHING",
                    )?
                    .execute(params![id, at])?;
                if inserted == 0 {
                    continue;
                }
                let mut insert = tx.prepare_cached(
                    "INSERT INTO ledger_charges (reservation_id, idx, counter, window_kind, at, \
                         window_start, window_end, rate_per_nanos, unit, limit_amount, reserved) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                     ON CONFLICT (reservation_id, idx) DO NOTHING",
                )?;
                for (idx, c) in charges.iter().enumerate() {
                    let (kind, start, end, per) = match c.window {
                        Window::Fixed { start, end } => (
                            "fixed",
                            Some(sql_int(start.as_unix_nanos())),
                            end.map(|e| sql_int(e.as_unix_nanos())),
                            None,
                        ),
                        Window::Rate { per } => {
                            let per = sql_int(u64::try_from(per.as_nanos()).unwrap_or(u64::MAX));
                            ("rate", None, Some(at.saturating_add(per)), Some(per))
                        }
                        // Refused before queueing (`known`).
                        _ => return Err(rusqlite::Error::InvalidQuery),
                    };
                    let unit = match c.unit {
                        Unit::Tokens => "tokens",
                        Unit::Nanodollars => "nanodollars",
                        _ => return Err(rusqlite::Error::InvalidQuery),
                    };
                    insert.execute(params![
                        id,
                        i64::try_from(idx).unwrap_or(i64::MAX),
                        &*c.key,
                        kind,
                        at,
                        start,
                        end,
                        per,
                        unit,
                        sql_int(c.limit),
                        sql_int(c.amount),
                    ])?;
                }
            }
            Op::End { id, at, actual } => {
                let state = if actual.is_some() {
                    "settled"
                } else {
                    "released"
                };
                let id = sql_int(*id);
                let ended = tx
                    .prepare_cached(
                        "UPDATE ledger SET state = ?2, settled_at = ?3 \
                         WHERE reservation_id = ?1 AND state = 'open'",
                    )?
                    .execute(params![id, state, sql_int(*at)])?;
                if ended == 0 {
                    continue;
                }
                match actual {
                    Some(amounts) => {
                        let mut update = tx.prepare_cached(
                            "UPDATE ledger_charges SET actual = ?3 \
                             WHERE reservation_id = ?1 AND idx = ?2",
                        )?;
                        for (idx, amount) in amounts.iter().enumerate() {
                            let idx = i64::try_from(idx).unwrap_or(i64::MAX);
                            update.execute(params![id, idx, sql_int(*amount)])?;
                        }
                    }
                    None => {
                        tx.prepare_cached(
                            "UPDATE ledger_charges SET actual = 0 WHERE reservation_id = ?1",
                        )?
                        .execute([id])?;
                    }
                }
            }
            Op::Flush(_) => {}
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests;
