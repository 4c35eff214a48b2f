//! [`LedgerBackend`]: token and budget counters in memory, with a durable SQLite spend ledger.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use keygate_core::{Clock, Timestamp};
use keygate_limit::backend::{
    Actual, BackendError, Charge, CounterKey, LimitBackend, MemoryBackend, Reservation,
    ReserveError, Reserved, Unit, Window,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
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

/// The floor below which every reservation has ended (`meta.spend_open_floor`, see
/// [`Floor`]) is written once the true one is this many ids ahead of it: one small write per
/// this many reservations, and at most this many more rows for a restart to read.
#[cfg(not(test))]
const FLOOR_STEP: u64 = 4096;
#[cfg(test)]
const FLOOR_STEP: u64 = 2;

/// A reservation still open this many ids behind the newest is listed in `spend_open_old`
/// instead of holding the floor back (a long stream, or an end lost in a failed commit).
#[cfg(not(test))]
const OLD_AFTER: u64 = 4096;
#[cfg(test)]
const OLD_AFTER: u64 = 3;

/// At most this many are listed: beyond, the floor stays at the oldest open reservation.
#[cfg(not(test))]
const MAX_OLD: usize = 1024;
#[cfg(test)]
const MAX_OLD: usize = 2;

/// Commits between two looks at where the floor could be (a look reads the queue's
/// reservations in flight under its lock).
#[cfg(not(test))]
const FLOOR_EVERY: usize = 16;
#[cfg(test)]
const FLOOR_EVERY: usize = 1;

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
/// reservation that holds charges is then queued for the ledger, and everything queued
/// (reservations, settlements, releases) is written in one transaction (group commit):
/// [`reserve`](LimitBackend::reserve) resolves only once the transaction holding its rows
/// has committed, so a request is never forwarded on spend the ledger does not know. The
/// commit is made by the first reservation that finds no commit under way, on its own
/// thread (no hand-off to another thread and back); reservations queued meanwhile wait for
/// the next one, which that same caller makes (at most two in a row, then the writer thread
/// takes over, so no caller is kept committing for others under steady load). Settlements and releases are applied to memory at once and written without
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
///   of every amount charged to it within the last `per` before now (counted in buckets of
///   `per / 64`, so up to one bucket more), as if none of it had drained yet, and drains from
///   the moment of the restart. A leaky bucket never holds more than what entered it during
///   the last `per` (it holds at most its limit), so this is never less than what the bucket
///   held before the restart.
///
/// So a budget is never overspent across a graceful restart, a crash, or `kill -9`: what is
/// admitted after a restart fits on top of everything that was admitted before it.
///
/// Three tables (schema version 8): `spend_reservations`, one row per reservation keyed by
/// its [`id`](Reservation::id) (the largest id in the ledger plus one, onwards, at every
/// open) and holding its charges as pairs of a kind and an amount, `spend_charge_kinds`,
/// each kind of charge (counter, window, unit, limit) named once (the writer keeps the ids
/// it met in memory), and `spend_totals`, what settled reservations spent per counter and
/// period, added to in the transaction that settles them. A restart reads the totals
/// and the open rows, never the history: every row below a floor the writer moves forward
/// every few thousand reservations has ended, but for a few listed ones open for long (see
/// `Floor`). A new reservation is appended at the end of its table and its settlement
/// rewrites that same recent page, so a commit writes a few pages
/// whatever the size of the ledger. Every write is an insert that ignores an existing id or
/// an update of an open row, so writing an operation twice has no second effect. Settled
/// rows are never deleted: they are the spend history (see [`Db::ledger_usage`]).
///
/// One `LedgerBackend` per database file at a time: opening one settles every reservation
/// that is still open, including those of another live process.
///
/// Cheap to clone (the clones share the counters and the writer). Dropping the last clone
/// commits what is queued and stops the writer thread (blocking until it has).
///
/// Two threads of its own: the writer (settlements and releases nobody waits for, commits
/// handed over by a caller, and the log restarts below), and a checkpointer that copies
/// SQLite's write-ahead log into the database every hundred commits, off the request path.
/// Once the log has grown to 16 MiB, the writer thread copies the pages committed since the
/// last checkpoint itself, after a commit (one pause, about two `fsync`s, never on a
/// caller's thread), so that the log starts again from the beginning instead of growing for
/// as long as commits keep coming.
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
///     group: 0,
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
    core: Arc<Core>,
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
}

/// What callers and the writer thread share: the queue, and the connection that whoever
/// leads the next commit writes with.
#[derive(Debug)]
struct Core {
    queue: Mutex<Queue>,
    /// The writer thread waits here.
    wake: Condvar,
    db: Mutex<Writer>,
    /// Set by the checkpointer: the log can start again once the writer thread has copied
    /// what was committed since.
    restart: Arc<AtomicBool>,
    #[cfg(test)]
    hooks: Hooks,
}

#[derive(Debug, Default)]
struct Queue {
    ops: Vec<Op>,
    /// Someone (a caller, or the writer thread) is writing what is queued: the others wait.
    leading: bool,
    /// The commit under way hands over to the writer thread.
    handoff: bool,
    /// No more operations (the backend is being dropped).
    closed: bool,
    /// The writer thread has been told of settlements and releases waiting (it commits them
    /// within [`END_DELAY`] unless a reservation's commit takes them first).
    timing: bool,
    /// When each reservation not yet ended was made, by id: a settlement's rate charges
    /// count from then (so its write needs no lookup of the row).
    open: FastMap<u64, u64>,
    /// The id of the next reservation queued. Given out here, under the queue's lock, so
    /// that reservations are committed in the order of their ids (what [`Floor`] relies on).
    next_id: u64,
}

/// The ledger's own maps: keyed by its ids and by counter names from the configuration (not
/// by anything a request chooses), hashed with foldhash rather than SipHash (a lookup or two
/// per charge of every reservation).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Writer {
    db: Db,
    next_prune: u64,
    kinds: Kinds,
    floor: Floor,
    /// Commits since the checkpointer was last told.
    uncounted: usize,
    /// Tells the checkpointer of every [`CHECKPOINT_EVERY`] commits (a wake-up of its
    /// thread each time, so not at every commit).
    commits: mpsc::SyncSender<()>,
}

/// Where the open reservations are: every row of `spend_reservations` with an id below the
/// floor (`meta.spend_open_floor`) has ended, except the ids listed in `spend_open_old`. So a
/// restart, or `spend show`, reads the rows from the floor on, and those listed, never the
/// whole history, and no index of the open rows is kept up to date at every commit.
///
/// The floor only moves forward: rows never open again, and every new reservation's id is
/// above it (ids are given out in the order reservations are queued, and commits follow that
/// order). So a floor written at one moment holds at every later one, and the writer needs
/// to move it only now and then ([`FLOOR_STEP`]). Where it can move to is read from the
/// queue: the lowest id among the reservations not yet ended, the ends queued but not yet
/// written, and the ends lost in failed commits (those rows stay open until the next open).
#[derive(Debug)]
struct Floor {
    /// What the ledger holds.
    stored: Moved,
    /// Reservations whose end was in a commit that failed.
    lost: BTreeSet<u64>,
    /// More ends lost than can be listed: the floor is not moved again by this process.
    frozen: bool,
    /// Commits since the last look.
    commits: usize,
}

/// A floor and the ids below it still open.
#[derive(Debug, PartialEq, Eq)]
struct Moved {
    floor: u64,
    old: Vec<u64>,
}

impl Floor {
    /// The floor a ledger has once it is opened (nothing open: `next_id`).
    fn at(next_id: u64) -> Floor {
        Floor {
            stored: Moved {
                floor: next_id,
                old: Vec::new(),
            },
            lost: BTreeSet::new(),
            frozen: false,
            commits: 0,
        }
    }

    /// Where the floor can move to, once every [`FLOOR_EVERY`] commits and when it would
    /// move by [`FLOOR_STEP`] at least; written in the commit about to be made (so the ends
    /// of its batch, no longer queued, are written with it).
    fn look(&mut self, queue: &Mutex<Queue>) -> Option<Moved> {
        self.commits += 1;
        if self.frozen || self.commits < FLOOR_EVERY {
            return None;
        }
        self.commits = 0;
        let mut old = Vec::new();
        let mut floor;
        {
            let q = lock(queue);
            floor = q.next_id;
            let recent = q.next_id.saturating_sub(OLD_AFTER);
            let ends = q.ops.iter().filter_map(|op| match op {
                Op::End { id, .. } => Some(*id),
                _ => None,
            });
            for id in q
                .open
                .keys()
                .copied()
                .chain(ends)
                .chain(self.lost.iter().copied())
            {
                if id >= recent {
                    floor = floor.min(id);
                } else {
                    old.push(id);
                }
            }
        }
        if old.len() > MAX_OLD {
            floor = old.iter().copied().fold(floor, u64::min);
            old.clear();
        } else {
            old.sort_unstable();
            old.dedup();
        }
        (floor >= self.stored.floor.saturating_add(FLOOR_STEP)).then_some(Moved { floor, old })
    }

    /// The ends of `batch`, whose commit failed, stay open in the ledger.
    fn lost(&mut self, batch: &[Op]) {
        for op in batch {
            if let Op::End { id, .. } = op {
                self.lost.insert(*id);
            }
        }
        if self.lost.len() > MAX_OLD {
            self.frozen = true;
            self.lost.clear();
        }
    }
}

/// Writes `floor` as the ledger's floor, and `old` (when given) as the ids listed below it.
fn write_floor(tx: &Connection, floor: u64, old: Option<&[u64]>) -> Result<(), rusqlite::Error> {
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'spend_open_floor'")?
        .execute([sql_int(floor)])?;
    if let Some(old) = old {
        tx.prepare_cached("DELETE FROM spend_open_old")?
            .execute([])?;
        let mut insert = tx.prepare_cached("INSERT INTO spend_open_old (id) VALUES (?1)")?;
        for id in old {
            insert.execute([sql_int(*id)])?;
        }
    }
    Ok(())
}

/// The rows of the reservations still open (id, when reserved, charges): those from the floor
/// on, and those listed below it (see [`Floor`]). One statement, so one snapshot.
const OPEN_ROWS: &str = "\
    WITH f (floor) AS ( \
        SELECT COALESCE(MAX(value), 0) FROM meta WHERE name = 'spend_open_floor') \
    SELECT id, at, charges FROM spend_reservations \
    WHERE id >= (SELECT floor FROM f) AND state = 0 \
    UNION ALL \
    SELECT r.id, r.at, r.charges FROM spend_open_old o \
    JOIN spend_reservations r ON r.id = o.id \
    WHERE r.id < (SELECT floor FROM f) AND r.state = 0";

/// Test hooks: hold the writer (operations queue up), or make it stop writing for good as a
/// crashed process would.
#[cfg(test)]
#[derive(Debug, Default)]
struct Hooks {
    held: AtomicBool,
    crashed: AtomicBool,
    /// Transactions committed.
    commits: AtomicU64,
    /// Checkpoints the writer ran to let the log restart.
    tail_checkpoints: AtomicU64,
}

#[derive(Debug)]
enum Op {
    Reserve {
        id: u64,
        at: u64,
        charges: Vec<Reserved>,
        ack: Ack,
    },
    /// Settled at what the request used (each charge at the amount in its unit), or
    /// released (`None`).
    End {
        id: u64,
        /// When the reservation was made (filled in as it is queued).
        reserved_at: u64,
        at: u64,
        charges: Vec<Reserved>,
        actual: Option<Actual>,
    },
    Flush(Ack),
    /// An operator's reset of a budget period: what it settled so far no longer counts
    /// (answered with the amount taken off).
    Reset {
        counter: String,
        start: i64,
        ack: oneshot::Sender<Result<u64, BackendError>>,
    },
}

impl Op {
    /// Whether someone waits for this operation's commit.
    fn urgent(&self) -> bool {
        !matches!(self, Op::End { .. })
    }
}

fn stopped() -> BackendError {
    BackendError("spend ledger writer stopped".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many commits in a row a caller makes before the writer thread takes over.
const CALLER_COMMITS: usize = 2;

impl Core {
    /// Queues `op`. An urgent one is committed before this returns when no commit is under
    /// way (this caller leads it); otherwise the commit under way, or the writer thread,
    /// picks it up.
    fn submit(&self, op: Op) -> Result<(), BackendError> {
        if self.enqueue(op)?.0 {
            self.lead(Some(CALLER_COMMITS));
        }
        Ok(())
    }

    /// Queues `op`, giving a reservation its id; whether the caller is to lead the next
    /// commit (an urgent operation and no commit under way), and the id given (0 for other
    /// operations).
    fn enqueue(&self, mut op: Op) -> Result<(bool, u64), BackendError> {
        let urgent = op.urgent();
        let mut q = lock(&self.queue);
        if q.closed {
            return Err(stopped());
        }
        let mut given = 0;
        match &mut op {
            Op::Reserve { id, at, .. } => {
                given = q.next_id;
                q.next_id += 1;
                *id = given;
                q.open.insert(given, *at);
            }
            Op::End {
                id, reserved_at, ..
            } => match q.open.remove(id) {
                Some(at) => *reserved_at = at,
                // Ended already: a replay has no second effect.
                None => return Ok((false, 0)),
            },
            Op::Flush(_) | Op::Reset { .. } => {}
        }
        q.ops.push(op);
        let lead = if q.leading {
            false
        } else if urgent {
            q.leading = true;
            true
        } else {
            if !q.timing {
                // The writer thread commits it within END_DELAY if nothing else does (one
                // wake-up per END_DELAY at most: not once per settlement).
                q.timing = true;
                self.wake.notify_one();
            }
            false
        };
        Ok((lead, given))
    }

    /// Hands the lead of the next commit to the writer thread.
    fn hand_off(&self) {
        let mut q = lock(&self.queue);
        q.handoff = true;
        self.wake.notify_one();
    }

    /// Commits what is queued, batch after batch, until the queue is empty. Called with
    /// `leading` set by the caller; clears it, or (after `rounds` commits, or when the log is
    /// to restart) hands it to the writer thread.
    fn lead(&self, rounds: Option<usize>) {
        let mut done = 0;
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.ops.is_empty() || self.held() {
                    q.leading = false;
                    if q.closed {
                        // The writer thread waits for this commit to end before it returns.
                        self.wake.notify_one();
                    }
                    return;
                }
                let handoff = rounds.is_some_and(|r| done >= r)
                    || (rounds.is_some() && self.restart.load(Ordering::Relaxed));
                if handoff {
                    q.handoff = true;
                    self.wake.notify_one();
                    return;
                }
                let n = q.ops.len().min(MAX_BATCH);
                q.ops.drain(..n).collect::<Vec<_>>()
            };
            self.commit(batch);
            done += 1;
        }
    }

    /// Writes `batch` in one transaction and answers everyone waiting on it.
    fn commit(&self, batch: Vec<Op>) {
        #[cfg(test)]
        if self.hooks.crashed.load(Ordering::SeqCst) {
            // Dropped unwritten: every waiting reservation sees the writer gone.
            return;
        }
        let mut w = lock(&self.db);
        let Writer {
            db,
            next_prune,
            kinds,
            floor,
            uncounted,
            commits,
        } = &mut *w;
        let moved = floor.look(&self.queue);
        // The ids listed are rewritten only when they change (most often: none before, none now).
        let to_write = moved.as_ref().map(|m| {
            (
                m.floor,
                (m.old != floor.stored.old).then_some(m.old.as_slice()),
            )
        });
        let result = write(db.conn(), &batch, next_prune, kinds, to_write).map_err(|e| {
            tracing::error!(error = %e, operations = batch.len(), "spend ledger write failed");
            BackendError(format!("spend ledger write failed: {e}").into())
        });
        match (&result, moved) {
            (Ok(_), Some(moved)) => floor.stored = moved,
            (Ok(_), None) => {}
            (Err(_), _) => floor.lost(&batch),
        }
        if result.is_ok() {
            #[cfg(test)]
            self.hooks.commits.fetch_add(1, Ordering::Relaxed);
            *uncounted += 1;
            if *uncounted >= CHECKPOINT_EVERY {
                *uncounted = 0;
                // Full: the checkpointer is behind and will catch up anyway.
                let _ = commits.try_send(());
            }
        }
        drop(w);
        if result.is_err() {
            // Refused reservations: nothing of theirs is in the ledger to end.
            let mut q = lock(&self.queue);
            for op in &batch {
                if let Op::Reserve { id, .. } = op {
                    q.open.remove(id);
                }
            }
        }
        let mut resets = result.as_ref().map(|r| r.iter().copied()).ok();
        for op in batch {
            match op {
                Op::Reserve { ack, .. } | Op::Flush(ack) => {
                    // A receiver gone is a request that was cancelled: nothing to tell.
                    let _ = ack.send(result.as_ref().map(|_| ()).map_err(Clone::clone));
                }
                Op::Reset { ack, .. } => {
                    let taken = match (&mut resets, &result) {
                        (Some(amounts), _) => Ok(amounts.next().unwrap_or(0)),
                        (None, Err(e)) => Err(e.clone()),
                        (None, Ok(_)) => Ok(0),
                    };
                    let _ = ack.send(taken);
                }
                Op::End { .. } => {}
            }
        }
    }

    /// Whether a test holds the writer.
    fn held(&self) -> bool {
        #[cfg(test)]
        {
            self.hooks.held.load(Ordering::SeqCst)
        }
        #[cfg(not(test))]
        {
            false
        }
    }

    /// The writer thread copies the log when the checkpointer asks (see [`RESTART_PAGES`]).
    fn restart_log(&self) {
        if self.restart.swap(false, Ordering::Relaxed) {
            let w = lock(&self.db);
            match checkpoint(&w.db) {
                Ok(_) => {
                    #[cfg(test)]
                    self.hooks.tail_checkpoints.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "spend ledger checkpoint failed"),
            }
        }
    }
}

/// The writer thread: takes over commits handed to it, commits settlements and releases
/// within [`END_DELAY`] when no reservation shares their commit, copies the log when it is
/// to restart, and at the end commits what is left.
fn write_loop(core: &Core) {
    let mut q = lock(&core.queue);
    let mut waited = false;
    loop {
        let take_over = if q.handoff {
            // `leading` stays set: handed over.
            q.handoff = false;
            true
        } else if !q.leading && !core.held() && !q.ops.is_empty() {
            if !q.closed && !waited && !q.ops.iter().any(Op::urgent) {
                // Only settlements and releases: a reservation may come to share the commit.
                q = core
                    .wake
                    .wait_timeout(q, END_DELAY)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                waited = true;
                continue;
            }
            q.leading = true;
            q.timing = false;
            true
        } else {
            false
        };
        waited = false;
        if take_over {
            drop(q);
            core.restart_log();
            core.lead(None);
            q = lock(&core.queue);
            continue;
        }
        if q.closed && !q.leading {
            // Everything is written (or, in tests, held or crashed).
            return;
        }
        // Nothing queued that the writer thread must commit: the next settlement tells it.
        q.timing = false;
        q = core
            .wake
            .wait(q)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
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
        // The checkpointer copies the log into the database, off the request path.
        db.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpoints = Db::open(path.as_ref())?;
        let memory = MemoryBackend::new();
        let last_id = restore(db.conn_mut(), &memory, now)?;
        let next_id = last_id.saturating_add(1);
        // One message per CHECKPOINT_EVERY commits; one queued is enough to catch up.
        let (commits, committed) = mpsc::sync_channel(1);
        let restart = Arc::new(AtomicBool::new(false));
        let core = Arc::new(Core {
            queue: Mutex::new(Queue {
                next_id,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            db: Mutex::new(Writer {
                db,
                next_prune: 0,
                kinds: Kinds::default(),
                floor: Floor::at(next_id),
                uncounted: 0,
                commits,
            }),
            restart: restart.clone(),
            #[cfg(test)]
            hooks: Hooks::default(),
        });
        let spawn_error = |e: std::io::Error| DbError::Open {
            path: path.as_ref().to_path_buf(),
            message: format!("cannot start the ledger writer: {e}"),
        };
        let checkpointer = std::thread::Builder::new()
            .name("keygate-ledger-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &committed, &restart))
            .map_err(spawn_error)?;
        let writer = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("keygate-ledger".into())
                .spawn(move || write_loop(&core))
                .map_err(spawn_error)?
        };
        Ok(LedgerBackend {
            shared: Arc::new(Shared {
                memory,
                core,
                writer: Some(writer),
                checkpointer: Some(checkpointer),
            }),
        })
    }

    /// The in-memory counters that decide admission (to read them: reserving or ending
    /// through them directly bypasses the ledger).
    pub fn memory(&self) -> &MemoryBackend {
        &self.shared.memory
    }

    /// Resets the budget period of `counter` that `window` is (a budget's current period):
    /// what settled in it so far no longer counts, in the ledger (durably: a restart keeps
    /// the reset) and in the counters admission reads; requests in flight keep what they
    /// hold. The amount taken off, in the counter's unit.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when the ledger could not be written (nothing changed) or the writer
    /// has stopped.
    pub fn reset_budget(
        &self,
        counter: &str,
        window: Window,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        let start = match window {
            Window::Fixed { start, .. } => Some(sql_int(start.as_unix_nanos())),
            _ => None,
        };
        let sent = start.map(|start| {
            self.shared.core.submit(Op::Reset {
                counter: counter.to_owned(),
                start,
                ack,
            })
        });
        let shared = self.shared.clone();
        let counter = counter.to_owned();
        async move {
            match sent {
                None => return Ok(0),
                Some(sent) => sent?,
            }
            let taken = done.await.unwrap_or_else(|_| Err(stopped()))?;
            // Committed: now the counters admission reads may give it back. Settlements
            // queued before the reset are in `taken` and already in memory; later ones stay.
            shared.memory.give_back(&counter, window, taken);
            Ok(taken)
        }
    }

    /// Resolves once everything queued before the call is committed.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when the transaction holding the queued operations failed or the
    /// writer has stopped.
    pub fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        let sent = self.shared.core.submit(Op::Flush(ack));
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
        let (ack, committed) = oneshot::channel();
        let op = Op::Reserve {
            id: 0,
            at: now.as_unix_nanos(),
            charges: reservation.charges.clone(),
            ack,
        };
        let leader = match self.shared.core.enqueue(op) {
            Ok((lead, id)) => {
                reservation.id = id;
                lead.then(|| Leader {
                    core: Some(self.shared.core.clone()),
                })
            }
            Err(e) => {
                self.shared.memory.release_now(reservation, now);
                return Step::Done(Err(e.into()));
            }
        };
        Step::Wait(
            Hold {
                shared: self.shared.clone(),
                reservation: Some(reservation),
                now,
            },
            committed,
            leader,
        )
    }

    /// Ends in memory at once and queues the ledger update.
    fn end(&self, reservation: Reservation, actual: Option<Actual>, now: Timestamp) {
        self.shared.memory.end_now(&reservation, actual, now);
        let Reservation { id, charges, .. } = reservation;
        if id == 0 {
            return;
        }
        let op = Op::End {
            id,
            reserved_at: 0,
            at: now.as_unix_nanos(),
            charges,
            actual,
        };
        if self.shared.core.submit(op).is_err() {
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
        self.shared.core.hooks.held.store(true, Ordering::SeqCst);
    }

    #[cfg(test)]
    fn resume(&self) {
        let core = &self.shared.core;
        // Under the queue's lock: the writer thread cannot miss it.
        let _q = lock(&core.queue);
        core.hooks.held.store(false, Ordering::SeqCst);
        core.wake.notify_one();
    }

    /// The writer stops writing, as if the process had been killed: what is queued, and
    /// everything after, is never committed.
    #[cfg(test)]
    fn crash(&self) {
        self.shared.core.hooks.crashed.store(true, Ordering::SeqCst);
        self.resume();
    }

    #[cfg(test)]
    fn hooks(&self) -> &Hooks {
        &self.shared.core.hooks
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is left and return.
        {
            let mut q = lock(&self.core.queue);
            q.closed = true;
            self.core.wake.notify_one();
        }
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the spend ledger writer panicked");
        }
        // Replacing the checkpointer's sender closes its queue.
        lock(&self.core.db).commits = mpsc::sync_channel(0).0;
        if let Some(checkpointer) = self.checkpointer.take()
            && checkpointer.join().is_err()
        {
            tracing::error!("the spend ledger checkpointer panicked");
        }
    }
}

enum Step {
    Done(Result<Reservation, ReserveError>),
    Wait(
        Hold,
        oneshot::Receiver<Result<(), BackendError>>,
        Option<Leader>,
    ),
}

/// The lead of the next commit, taken by a reservation that found none under way. It first
/// lets every other task that is ready run (one pass of the scheduler), so that under load
/// the reservations they make share its commit; dropped before it has committed (the
/// request was cancelled), it hands the lead to the writer thread.
struct Leader {
    core: Option<Arc<Core>>,
}

impl Leader {
    async fn commit(mut self) {
        tokio::task::yield_now().await;
        if let Some(core) = self.core.take() {
            core.lead(Some(CALLER_COMMITS));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(core) = self.core.take() {
            core.hand_off();
        }
    }
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
                Step::Wait(hold, committed, leader) => {
                    if let Some(leader) = leader {
                        leader.commit().await;
                    }
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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One charge of a reservation, as `spend_reservations.charges` holds it.
#[derive(Debug, serde::Deserialize)]
struct StoredCharge<'a> {
    #[serde(borrow)]
    counter: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    window: std::borrow::Cow<'a, str>,
    #[serde(default)]
    start: Option<i64>,
    #[serde(default)]
    end: Option<i64>,
    #[serde(default)]
    per: Option<i64>,
    #[serde(borrow)]
    unit: std::borrow::Cow<'a, str>,
    limit: i64,
    amount: i64,
}

impl<'a> StoredCharge<'a> {
    fn of(c: &'a Reserved) -> StoredCharge<'a> {
        let (window, start, end, per) = match c.window {
            Window::Rate { per } => ("rate", None, None, Some(sql_int(nanos(per)))),
            Window::Fixed { start, end } => (
                "fixed",
                Some(sql_int(start.as_unix_nanos())),
                end.map(|e| sql_int(e.as_unix_nanos())),
                None,
            ),
            // Refused before queueing (`known`); recorded as a lifetime budget if ever.
            _ => ("fixed", Some(0), None, None),
        };
        let unit = match c.unit {
            Unit::Tokens => "tokens",
            _ => "nanodollars",
        };
        StoredCharge {
            counter: (*c.key).into(),
            window: window.into(),
            start,
            end,
            per,
            unit: unit.into(),
            limit: sql_int(c.limit),
            amount: sql_int(c.amount),
        }
    }
}

/// A kind of charge: what `spend_charge_kinds` names once.
type KindKey = (CounterKey, Window, Unit, u64);

/// The ids of the kinds of charge the writer has met (`spend_charge_kinds`), so that a
/// reservation's row names each of its charges by a number. Forgotten when a commit fails
/// (the kinds it added were rolled back with it) and once it holds [`MAX_KINDS`] (budget
/// periods come and go: each is a new kind).
#[derive(Debug, Default)]
struct Kinds {
    ids: FastMap<KindKey, i64>,
}

/// The most kinds of charge the writer remembers.
const MAX_KINDS: usize = 65_536;

impl Kinds {
    /// The id of the kind of `c`, added to `spend_charge_kinds` (in the transaction of `tx`)
    /// when no row names it yet.
    fn id(&mut self, tx: &Connection, c: &Reserved) -> Result<i64, rusqlite::Error> {
        let key = (c.key.clone(), c.window, c.unit, c.limit);
        if let Some(&id) = self.ids.get(&key) {
            return Ok(id);
        }
        let s = StoredCharge::of(c);
        let kind = params![s.counter, s.window, s.start, s.end, s.per, s.unit, s.limit];
        let found = tx
            .prepare_cached(
                "SELECT id FROM spend_charge_kinds WHERE counter = ?1 AND window_start IS ?3 \
                 AND window_kind = ?2 AND window_end IS ?4 AND rate_per_nanos IS ?5 \
                 AND unit = ?6 AND limit_amount = ?7 LIMIT 1",
            )?
            .query_row(kind, |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                tx.prepare_cached(
                    "INSERT INTO spend_charge_kinds (counter, window_kind, window_start, \
                         window_end, rate_per_nanos, unit, limit_amount) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(kind)?;
                tx.last_insert_rowid()
            }
        };
        if self.ids.len() >= MAX_KINDS {
            self.ids.clear();
        }
        self.ids.insert(key, id);
        Ok(id)
    }

    /// Writes into `out` what `spend_reservations.charges` holds for `charges`: `KIND:AMOUNT`
    /// per charge, comma-separated.
    fn encode(
        &mut self,
        tx: &Connection,
        charges: &[Reserved],
        out: &mut String,
    ) -> Result<(), rusqlite::Error> {
        out.clear();
        for (i, c) in charges.iter().enumerate() {
            let id = self.id(tx, c)?;
            let sep = if i == 0 { "" } else { "," };
            // Writing to a `String` cannot fail.
            let _ = write!(out, "{sep}{id}:{}", sql_int(c.amount));
        }
        Ok(())
    }
}

/// A `spend_reservations.charges` that cannot be read, and why.
fn bad_charges(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, why.into())
}

/// The charges of a `spend_reservations.charges`: `KIND:AMOUNT` pairs (their kinds read
/// from `spend_charge_kinds`), or the JSON array of rows written before schema version 7.
fn decode_charges<'a>(
    conn: &Connection,
    text: &'a str,
) -> Result<Vec<StoredCharge<'a>>, rusqlite::Error> {
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(bad_charges);
    }
    let mut kind = conn.prepare_cached(
        "SELECT counter, window_kind, window_start, window_end, rate_per_nanos, unit, \
             limit_amount FROM spend_charge_kinds WHERE id = ?1",
    )?;
    let mut out = Vec::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (id, amount) = pair
            .split_once(':')
            .and_then(|(id, amount)| Some((id.parse::<i64>().ok()?, amount.parse::<i64>().ok()?)))
            .ok_or_else(|| bad_charges("a reservation's charges are not KIND:AMOUNT pairs"))?;
        let charge = kind
            .query_row([id], |r| {
                Ok(StoredCharge {
                    counter: r.get::<_, String>(0)?.into(),
                    window: r.get::<_, String>(1)?.into(),
                    start: r.get(2)?,
                    end: r.get(3)?,
                    per: r.get(4)?,
                    unit: r.get::<_, String>(5)?.into(),
                    limit: r.get(6)?,
                    amount,
                })
            })
            .optional()?
            .ok_or_else(|| {
                bad_charges("a reservation names a kind of charge that is not recorded")
            })?;
        out.push(charge);
    }
    Ok(out)
}

/// A rate's buckets are 1/64 of its period: restored, a rate counts at most that much more
/// than it held.
const RATE_BUCKETS: u64 = 64;

/// Settled amounts of one transaction, added up per row of `spend_totals` before they are
/// written: one statement per counter and period, however many settlements share it.
#[derive(Debug, Default)]
struct Totals<'a> {
    rows: FastMap<TotalKey<'a>, TotalRow>,
}

/// Counter, window kind, window start, rate period (0 for a budget).
type TotalKey<'a> = (std::borrow::Cow<'a, str>, &'static str, i64, i64);

#[derive(Debug)]
struct TotalRow {
    end: Option<i64>,
    unit: &'static str,
    limit: i64,
    amount: i64,
}

impl<'a> Totals<'a> {
    /// Adds `amount` of charge `c`, reserved at `at`, to its total: a budget's period, or
    /// the rate bucket holding `at` (so it counts until at most one bucket after `at` plus
    /// the rate's period, never less than the charge itself did).
    fn add(&mut self, c: StoredCharge<'a>, amount: i64, at: i64) {
        let (kind, start, per, end) = match (&*c.window, c.per) {
            ("rate", Some(per)) => {
                let per = per.max(0);
                let len = (per / RATE_BUCKETS as i64).max(1);
                let bucket = at - at.rem_euclid(len);
                let end = bucket.saturating_add(len).saturating_add(per);
                ("rate", bucket, per, Some(end))
            }
            _ => ("fixed", c.start.unwrap_or(0), 0, c.end),
        };
        let unit = if c.unit == "tokens" {
            "tokens"
        } else {
            "nanodollars"
        };
        let row = self
            .rows
            .entry((c.counter, kind, start, per))
            .or_insert(TotalRow {
                end,
                unit,
                limit: c.limit,
                amount: 0,
            });
        row.limit = c.limit;
        row.amount = row.amount.saturating_add(amount);
    }

    /// Adds every total to its row.
    fn write(self, tx: &Connection) -> Result<(), rusqlite::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut upsert = tx.prepare_cached(
            "INSERT INTO spend_totals (counter, window_kind, window_start, rate_per_nanos, \
                 window_end, unit, limit_amount, settled) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT (counter, window_kind, window_start, rate_per_nanos) DO UPDATE SET \
                 settled = spend_totals.settled + excluded.settled, \
                 limit_amount = excluded.limit_amount",
        )?;
        for ((counter, kind, start, per), row) in self.rows {
            upsert.execute(params![
                counter, kind, start, per, row.end, row.unit, row.limit, row.amount
            ])?;
        }
        Ok(())
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
        let usages = self.ledger_usages(&[(counter, window_start)])?;
        Ok(usages.into_iter().next().unwrap_or_default())
    }

    /// [`Db::ledger_usage`] of many counters at once (a page of keys): one pass over the
    /// open reservations for all of them. One usage per `(counter, window_start)`, in order.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the ledger cannot be read.
    pub fn ledger_usages(&self, wanted: &[(&str, Timestamp)]) -> Result<Vec<LedgerUsage>, DbError> {
        let mut out = vec![LedgerUsage::default(); wanted.len()];
        let mut index: std::collections::HashMap<(&str, i64), Vec<usize>> =
            std::collections::HashMap::with_capacity(wanted.len());
        let mut settled = self.conn().prepare_cached(
            "SELECT COALESCE(SUM(settled), 0) FROM spend_totals \
             WHERE counter = ?1 AND window_kind = 'fixed' AND window_start = ?2",
        )?;
        for (i, (counter, start)) in wanted.iter().enumerate() {
            let start = sql_int(start.as_unix_nanos());
            let sum: i64 = settled.query_row(params![counter, start], |r| r.get(0))?;
            out[i].settled = from_sql(sum);
            index.entry((*counter, start)).or_default().push(i);
        }
        let mut stmt = self.conn().prepare_cached(OPEN_ROWS)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let text: String = row.get(2)?;
            for c in decode_charges(self.conn(), &text)? {
                let (Some(start), true) = (c.start, c.window == "fixed") else {
                    continue;
                };
                if let Some(slots) = index.get(&(&*c.counter, start)) {
                    for &i in slots {
                        out[i].open_reserved =
                            out[i].open_reserved.saturating_add(from_sql(c.amount));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Settles what an earlier process left open and seeds `memory`; returns the largest id.
fn restore(conn: &mut Connection, memory: &MemoryBackend, now: Timestamp) -> Result<u64, DbError> {
    let at = sql_int(now.as_unix_nanos());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let open_rows: Vec<(i64, i64, String)> = tx
        .prepare(OPEN_ROWS)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let left_open = open_rows.len();
    let mut totals = Totals::default();
    for (id, reserved_at, text) in &open_rows {
        let charges = decode_charges(&tx, text)?;
        let actual: Vec<i64> = charges.iter().map(|c| c.amount).collect();
        tx.execute(
            "UPDATE spend_reservations SET state = 1, ended_at = ?2, actual = ?3 WHERE id = ?1",
            params![id, at, serde_json::to_string(&actual).unwrap_or_default()],
        )?;
        for c in charges {
            // Counted from when it was reserved: its request may have run since then.
            let amount = c.amount;
            totals.add(c, amount, *reserved_at);
        }
    }
    totals.write(&tx)?;
    if left_open > 0 {
        tracing::warn!(
            reservations = left_open,
            "reservations left open by an earlier run settled at their reserved amounts"
        );
    }
    prune(&tx, at)?;
    let last_id: i64 = tx.query_row(
        "SELECT COALESCE(MAX(id), 0) FROM spend_reservations",
        [],
        |r| r.get(0),
    )?;
    // Nothing is open any more: the floor is the next id, and none is listed below it.
    write_floor(&tx, from_sql(last_id).saturating_add(1), Some(&[]))?;
    {
        // Later periods of a counter come last and win (memory holds one period per counter).
        let mut fixed = tx.prepare(
            "SELECT counter, window_start, window_end, limit_amount, settled \
             FROM spend_totals \
             WHERE window_kind = 'fixed' AND (window_end IS NULL OR window_end > ?1) \
               AND window_start <= ?1 \
             ORDER BY window_start",
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
        // Every bucket that still counts, none of it drained.
        let mut rate = tx.prepare(
            "SELECT counter, rate_per_nanos, MAX(limit_amount), SUM(settled) \
             FROM spend_totals \
             WHERE window_kind = 'rate' AND window_end > ?1 AND window_start <= ?1 \
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

/// Deletes the rate buckets that no longer count at `at`.
fn prune(tx: &Connection, at: i64) -> Result<usize, rusqlite::Error> {
    tx.prepare_cached("DELETE FROM spend_totals WHERE window_kind = 'rate' AND window_end <= ?1")?
        .execute([at])
}

/// What a passive checkpoint did: pages in the log, and how many of them are now in the
/// database (`-1` each when the database is not in WAL mode).
fn checkpoint(db: &Db) -> Result<(i64, i64), rusqlite::Error> {
    db.conn()
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
}

/// Copies the log into the database each time the writer has made [`CHECKPOINT_EVERY`]
/// commits (one message each time), and once more at the end. Passive: it never waits for
/// (nor blocks) the writer or a reader. Once a log of [`RESTART_PAGES`] is all copied, asks
/// the writer for the rest (see there).
fn checkpoint_loop(db: &Db, committed: &mpsc::Receiver<()>, restart: &AtomicBool) {
    let run = || {
        let result = checkpoint(db);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "spend ledger checkpoint failed");
        }
        result
    };
    while committed.recv().is_ok() {
        if let Ok((log, copied)) = run()
            && log >= RESTART_PAGES
            && copied == log
        {
            restart.store(true, Ordering::Relaxed);
        }
    }
    let _ = run();
}

/// How often (in the time of the operations written) the rate buckets that no longer count
/// are deleted.
const PRUNE_EVERY: u64 = 10_000_000_000;

/// Writes `batch` in one transaction, and `floor` when given (where it moves, and the ids
/// listed below it when they change); the amounts its resets took off, in order. Each write
/// has an effect only the first time. Once the operations' time has passed `next_prune`,
/// also deletes the rate buckets that ended.
fn write(
    conn: &Connection,
    batch: &[Op],
    next_prune: &mut u64,
    kinds: &mut Kinds,
    floor: Option<(u64, Option<&[u64]>)>,
) -> Result<Vec<u64>, rusqlite::Error> {
    // The transaction's own statements cached too (`Connection::transaction` prepares its
    // BEGIN and COMMIT at every commit).
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let written = write_in(conn, batch, next_prune, kinds)
        .and_then(|resets| {
            if let Some((floor, old)) = floor {
                write_floor(conn, floor, old)?;
            }
            Ok(resets)
        })
        .and_then(|resets| conn.prepare_cached("COMMIT")?.execute([]).map(|_| resets));
    if written.is_err() {
        // The kinds this batch added are gone with it.
        kinds.ids.clear();
    }
    if written.is_err() && !conn.is_autocommit() {
        // Nothing of the batch stays: its waiters are told it failed.
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "spend ledger rollback failed");
        }
    }
    written
}

/// The statements of [`write`], inside its transaction.
fn write_in(
    tx: &Connection,
    batch: &[Op],
    next_prune: &mut u64,
    kinds: &mut Kinds,
) -> Result<Vec<u64>, rusqlite::Error> {
    let mut latest = 0;
    let mut text = String::new();
    let mut totals = Totals::default();
    let mut resets = Vec::new();
    // Each statement taken from the cache once per batch, not once per operation (a
    // lookup hashes the statement's text).
    let mut insert = None;
    let mut update = None;
    for op in batch {
        match op {
            Op::Reserve {
                id, at, charges, ..
            } => {
                latest = latest.max(*at);
                let insert = match &mut insert {
                    Some(statement) => statement,
                    None => insert.insert(tx.prepare_cached(
                        "INSERT INTO spend_reservations (id, at, state, charges) \
                         VALUES (?1, ?2, 0, ?3) ON CONFLICT (id) DO NOTHING",
                    )?),
                };
                kinds.encode(tx, charges, &mut text)?;
                insert.execute(params![sql_int(*id), sql_int(*at), text])?;
            }
            Op::End {
                id,
                reserved_at,
                at,
                charges,
                actual,
            } => {
                latest = latest.max(*at);
                // The JSON array of the amounts settled, one per charge (zeros once released).
                text.clear();
                text.push('[');
                for (i, c) in charges.iter().enumerate() {
                    let amount = actual.map_or(0, |a| a.amount(c.unit));
                    let sep = if i == 0 { "" } else { "," };
                    // Writing to a `String` cannot fail.
                    let _ = write!(text, "{sep}{amount}");
                }
                text.push(']');
                let state = if actual.is_some() { 1 } else { 2 };
                // Only an open row changes: a replay, or a reservation never written (its
                // commit failed), changes nothing. (Not `UPDATE ... RETURNING at`: that
                // builds and drops a temporary b-tree at every execution; the reservation's
                // time comes with the operation.)
                let update = match &mut update {
                    Some(statement) => statement,
                    None => update.insert(tx.prepare_cached(
                        "UPDATE spend_reservations SET state = ?2, ended_at = ?3, actual = ?4 \
                         WHERE id = ?1 AND state = 0",
                    )?),
                };
                let ended = update.execute(params![sql_int(*id), state, sql_int(*at), text])?;
                if ended == 0 {
                    continue;
                }
                // A rate charge counts from when it was reserved.
                let reserved_at = sql_int(*reserved_at);
                let Some(actual) = actual else {
                    // Released: nothing to add.
                    continue;
                };
                for c in charges {
                    let amount = actual.amount(c.unit);
                    if amount > 0 {
                        totals.add(StoredCharge::of(c), sql_int(amount), reserved_at);
                    }
                }
            }
            Op::Reset { counter, start, .. } => {
                // What settled before it in this batch counts before the reset.
                std::mem::take(&mut totals).write(tx)?;
                let settled: Option<i64> = tx
                    .prepare_cached(
                        "SELECT settled FROM spend_totals WHERE counter = ?1 \
                         AND window_kind = 'fixed' AND window_start = ?2 AND rate_per_nanos = 0",
                    )?
                    .query_row(params![counter, start], |r| r.get(0))
                    .optional()?;
                tx.prepare_cached(
                    "UPDATE spend_totals SET settled = 0 WHERE counter = ?1 \
                     AND window_kind = 'fixed' AND window_start = ?2 AND rate_per_nanos = 0",
                )?
                .execute(params![counter, start])?;
                resets.push(from_sql(settled.unwrap_or(0).max(0)));
            }
            Op::Flush(_) => {}
        }
    }
    totals.write(tx)?;
    if latest >= *next_prune {
        prune(tx, sql_int(latest))?;
        *next_prune = latest.saturating_add(PRUNE_EVERY);
    }
    Ok(resets)
}

#[cfg(test)]
mod tests;
