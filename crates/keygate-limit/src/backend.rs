//! Where token-rate and budget counters live: the [`LimitBackend`] trait and the in-memory
//! [`MemoryBackend`].
//!
//! The layers speak to a backend in plain data: a list of [`Charge`]s to reserve at once
//! (all or nothing), then one [`settle`](LimitBackend::settle) with the actual amounts or one
//! [`release`](LimitBackend::release). A Redis backend implements the same three calls as Lua
//! scripts over the same counter keys, so limits hold exactly across replicas without any
//! change to the layers.

use std::future::{Future, ready};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::hash_table::{Entry, HashTable};
use keygate_core::{Money, Timestamp};
use smallvec::SmallVec;

/// The name of one counter, stable across processes (a Redis key suffix, a SQL primary key).
pub type CounterKey = Arc<str>;

/// The group of the counters of `project` (see [`Charge::group`]): a stable 64-bit hash
/// (FNV-1a), the same in every process and every version.
pub fn group_of(project: &str) -> u64 {
    project.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How a counter's window works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Window {
    /// A leaky bucket holding at most `limit`, draining `limit` every `per` (tokens per minute:
    /// `per` = 60 s). A reservation is admitted only if it fits in the bucket now.
    Rate {
        /// How long the bucket takes to drain completely.
        per: Duration,
    },
    /// A calendar period `[start, end)` (budgets); `end` is `None` for a lifetime budget. The
    /// counter starts from zero in every new period.
    Fixed {
        /// The start of the period the charge belongs to.
        start: Timestamp,
        /// The end of that period.
        end: Option<Timestamp>,
    },
}

impl Window {
    /// Whether this is a rate (as opposed to a budget period).
    pub fn is_rate(&self) -> bool {
        matches!(self, Window::Rate { .. })
    }
}

/// What a counter counts; [`settle`](LimitBackend::settle) picks the matching actual amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unit {
    /// Tokens (prompt + completion).
    Tokens,
    /// Money, in nano-dollars.
    Nanodollars,
}

/// One amount to reserve against one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The group the counter belongs to ([`group_of`] its project): every charge of one
    /// request has the same one, and a counter is always in the same group, so a backend that
    /// spreads counters over shards (Redis Cluster's hash tags) keeps one request's counters
    /// together. 0 where nothing shards.
    pub group: u64,
    /// The counter.
    pub key: CounterKey,
    /// Its window.
    pub window: Window,
    /// Its unit.
    pub unit: Unit,
    /// The most the counter may hold.
    pub limit: u64,
    /// How much to reserve.
    pub amount: u64,
}

/// A charge that was reserved; part of a [`Reservation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Its group, as charged.
    pub group: u64,
    /// The counter.
    pub key: CounterKey,
    /// Its window, as reserved (a settle after a budget period ended applies to no period).
    pub window: Window,
    /// Its unit.
    pub unit: Unit,
    /// The limit at reservation time (a rate bucket drains at `limit` per `per`).
    pub limit: u64,
    /// The amount held.
    pub amount: u64,
}

/// The state of a counter after a reservation, for `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStatus {
    /// The counter's limit.
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// How long until the counter is back to its full limit.
    pub reset: Duration,
}

impl CounterStatus {
    /// Keeps in `tightest` whichever has less left: it, or `charge`'s counter holding `used`
    /// at `now` (Unix nanoseconds). How a backend picks [`Reservation::tokens`].
    pub fn tightest(tightest: &mut Option<CounterStatus>, charge: &Charge, used: u64, now: u64) {
        let status = CounterStatus {
            limit: charge.limit,
            remaining: charge.limit.saturating_sub(used),
            reset: reset_after(charge.window, charge.limit, used, now),
        };
        if tightest.is_none_or(|t| status.remaining < t.remaining) {
            *tightest = Some(status);
        }
    }
}

/// Amounts held against counters until settled or released. Plain data: a backend may
/// serialize it. Settle or release every reservation exactly once; [`Pending`] does that for
/// you, even when dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The charges held.
    pub charges: Vec<Reserved>,
    /// The tightest token-rate counter after reserving, if any (for response headers).
    pub tokens: Option<CounterStatus>,
    /// The id a durable backend gave the reservation (its ledger rows are keyed by it, so a
    /// replayed settle or release has no second effect); 0 when nothing tracks it (the
    /// in-memory backend, or a reservation without charges).
    pub id: u64,
}

/// The actual amounts a request used, to replace its reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actual {
    /// Tokens used.
    pub tokens: u64,
    /// Money spent.
    pub cost: Money,
}

impl Actual {
    /// The amount in `unit`.
    pub fn amount(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::Nanodollars => self.cost.as_nanos(),
        }
    }
}

/// A reservation that did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// Index of the first charge (in the order given) that did not fit.
    pub index: usize,
    /// The counter's limit.
    pub limit: u64,
    /// What is left in it now.
    pub remaining: u64,
    /// When the charge would fit; `None` if it never will in this window (larger than the
    /// limit, or a lifetime budget).
    pub retry_after: Option<Duration>,
    /// How long until the counter is back to its full limit.
    pub reset: Duration,
}

impl Exceeded {
    /// Charge `index` (`charge`) does not fit on a counter holding `used` at `now` (Unix
    /// nanoseconds): what is left, and when it would fit. Every backend answers the same.
    pub fn of(index: usize, charge: &Charge, used: u64, now: u64) -> Exceeded {
        Exceeded {
            index,
            limit: charge.limit,
            remaining: charge.limit.saturating_sub(used),
            retry_after: wait_until_fits(charge, used, now),
            reset: reset_after(charge.window, charge.limit, used, now),
        }
    }
}

/// A backend failure (store unreachable). The layers fail closed on it: 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit backend failed: {0}")]
pub struct BackendError(pub Arc<str>);

/// Why a reservation was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// A counter cannot hold its charge.
    #[error("limit exceeded")]
    Exceeded(Exceeded),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Counters for token rates and budgets, with atomic all-or-nothing reservations.
///
/// Invariants every implementation keeps:
/// - `reserve` admits the charges only if every counter can hold its amount on top of what it
///   holds now (reserved or settled), and then adds them all; otherwise it changes nothing.
///   Concurrent calls are serialized per counter, so admitted amounts never exceed a limit.
/// - `settle` replaces each reserved amount by the actual one (which may exceed it: that is
///   recorded, but only after the fact); `release` removes the reserved amounts.
///
/// The returned futures are `'static` so that a reservation can be settled from a `Drop`
/// (the layers poll such a future once and spawn it on the current Tokio runtime if it is not
/// ready at once; the in-memory backend is always ready at once).
///
/// A backend that can answer without waiting (an in-process one) also implements
/// [`reserve_at_once`](LimitBackend::reserve_at_once) and
/// [`end_at_once`](LimitBackend::end_at_once), which spare the layers a future (and an
/// allocation) per call; a network backend leaves their defaults, which defer to the three
/// calls above.
pub trait LimitBackend: Send + Sync + 'static {
    /// Reserves every charge, or none.
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static;

    /// Replaces a reservation by the actual amounts.
    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static;

    /// Gives a reservation back unused.
    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static;

    /// Reserves without waiting, if this backend can answer at once (the in-memory one
    /// always can); otherwise hands the charges back (`Err`) for
    /// [`reserve`](LimitBackend::reserve). The layers try it first, which spares them a
    /// future per request. The default hands them back: a network backend needs not
    /// implement it.
    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        let _ = now;
        Err(charges)
    }

    /// Settles at `actual` (`Some`) or releases (`None`) without waiting, if this backend can
    /// (returns `None`); otherwise hands the reservation back for
    /// [`settle`](LimitBackend::settle) / [`release`](LimitBackend::release). The default
    /// hands it back.
    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Option<Reservation> {
        let _ = (actual, now);
        Some(reservation)
    }
}

impl<T: LimitBackend> LimitBackend for Arc<T> {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        (**self).reserve(charges, now)
    }
    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        (**self).settle(reservation, actual, now)
    }
    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        (**self).release(reservation, now)
    }
    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        (**self).reserve_at_once(charges, now)
    }
    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Option<Reservation> {
        (**self).end_at_once(reservation, actual, now)
    }
}

/// At most 64: a reservation's shards are one bit each of a `u64`.
const SHARDS: usize = 64;

/// Each charge's key hash and index among the locked shards.
type Slots = SmallVec<[(u64, u8); 8]>;
/// The locked shards, in index order.
type Guards<'a> = SmallVec<[MutexGuard<'a, ShardMap>; 4]>;

/// In-process counters: a mutex per shard of a hash map, held only for the few arithmetic
/// operations of one call. Reservations spanning several shards lock them in index order, so
/// they never deadlock.
///
/// Memory is bounded by the active counters: drained rate counters and budget counters of
/// ended periods are swept as shards grow (and by [`MemoryBackend::sweep`]); lifetime budgets
/// are kept (they are the record of spend).
#[derive(Debug)]
pub struct MemoryBackend {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    map: Mutex<ShardMap>,
}

#[derive(Debug, Default)]
struct ShardMap {
    /// Keyed by the backend's hash of the key's text, computed once per charge.
    counters: HashTable<(CounterKey, Counter)>,
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    used: u64,
    /// Rate: when `used` was last drained. Fixed: the start of the period `used` counts.
    stamp: u64,
    /// Fixed: the end of the period (`u64::MAX` for lifetime). Rate: 0.
    end: u64,
    /// Rate: the drain period in nanoseconds and the limit last seen. Fixed: 0.
    per: u64,
    limit: u64,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

const SWEEP_MIN: usize = 1024;

impl MemoryBackend {
    /// Empty counters.
    pub fn new() -> Self {
        MemoryBackend {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn hash_of(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Middle bits: the table uses the low bits (bucket) and the top 7 (tag).
    fn shard_of(hash: u64) -> usize {
        ((hash >> 32) as usize) % SHARDS
    }

    /// Locks the shards of `charges` in index order (so concurrent reservations never
    /// deadlock); returns each charge's slot in the guards.
    fn lock_all<'a>(&'a self, charges: &[Charge]) -> (Slots, Guards<'a>) {
        let mut shards: Slots = SmallVec::with_capacity(charges.len());
        let mut set = 0u64;
        for charge in charges {
            let hash = self.hash_of(&charge.key);
            let shard = Self::shard_of(hash);
            set |= 1 << shard;
            shards.push((hash, shard as u8));
        }
        let mut guards = Guards::new();
        let mut rest = set;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            guards.push(lock(&self.shards[i].map));
        }
        // A shard's slot: how many locked shards come before it.
        for (_, shard) in &mut shards {
            *shard = (set & ((1u64 << *shard) - 1)).count_ones() as u8;
        }
        (shards, guards)
    }

    /// Reserves synchronously (what [`LimitBackend::reserve`] does).
    ///
    /// # Errors
    ///
    /// [`Exceeded`] for the first charge that does not fit; nothing is reserved then.
    pub fn reserve_now(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Reservation, Exceeded> {
        let now = now.as_unix_nanos();
        let (slots, mut guards) = self.lock_all(&charges);
        // Check every charge first (earlier charges on the same counter count too).
        for (n, charge) in charges.iter().enumerate() {
            let (hash, slot) = slots[n];
            let current = guards[usize::from(slot)]
                .find(hash, &charge.key)
                .map_or(0, |c| refreshed(*c, charge.window, charge.limit, now).used);
            let earlier: u64 = charges[..n]
                .iter()
                .filter(|c| c.key == charge.key)
                .map(|c| c.amount)
                .sum();
            let used = current.saturating_add(earlier);
            if used.saturating_add(charge.amount) > charge.limit {
                return Err(Exceeded::of(n, charge, used, now));
            }
        }
        let mut tokens: Option<CounterStatus> = None;
        // Same layout: collected in place, in the charges' own allocation.
        let reserved: Vec<Reserved> = charges
            .into_iter()
            .enumerate()
            .map(|(n, charge)| {
                let (hash, slot) = slots[n];
                let counter =
                    guards[usize::from(slot)].get_or_insert(hash, &charge.key, &self.hasher);
                *counter = refreshed(*counter, charge.window, charge.limit, now);
                counter.used = counter.used.saturating_add(charge.amount);
                if charge.window.is_rate() && charge.unit == Unit::Tokens {
                    CounterStatus::tightest(&mut tokens, &charge, counter.used, now);
                }
                // A counter already in a later period (another replica's clock ran ahead)
                // holds this charge: settle against the period it was really added to.
                let window = match charge.window {
                    Window::Fixed { end, .. } => Window::Fixed {
                        start: Timestamp::from_unix_nanos(counter.stamp),
                        end,
                    },
                    rate => rate,
                };
                Reserved {
                    group: charge.group,
                    key: charge.key,
                    window,
                    unit: charge.unit,
                    limit: charge.limit,
                    amount: charge.amount,
                }
            })
            .collect();
        for map in &mut guards {
            map.maybe_sweep(now);
        }
        Ok(Reservation {
            charges: reserved,
            tokens,
            id: 0,
        })
    }

    /// Settles synchronously (what [`LimitBackend::settle`] does).
    pub fn settle_now(&self, reservation: Reservation, actual: Actual, now: Timestamp) {
        self.end_now(&reservation, Some(actual), now);
    }

    /// Releases synchronously (what [`LimitBackend::release`] does).
    pub fn release_now(&self, reservation: Reservation, now: Timestamp) {
        self.end_now(&reservation, None, now);
    }

    /// Settles (`Some`) or releases (`None`) synchronously, leaving `reservation` to the
    /// caller (a durable backend then records its charges without copying them). Ending the
    /// same reservation twice applies it twice: the caller ends each once.
    pub fn end_now(&self, reservation: &Reservation, actual: Option<Actual>, now: Timestamp) {
        let now = now.as_unix_nanos();
        for r in &reservation.charges {
            let new = actual.map_or(0, |a| a.amount(r.unit));
            let hash = self.hash_of(&r.key);
            let mut map = lock(&self.shards[Self::shard_of(hash)].map);
            if let Window::Fixed { start, .. } = r.window {
                // Spend belongs to the period it was admitted in; once that period is over
                // (the counter moved on or was swept) there is nothing left to correct.
                match map.find_mut(hash, &r.key) {
                    Some(c) if c.stamp == start.as_unix_nanos() => {
                        c.used = c.used.saturating_sub(r.amount).saturating_add(new);
                    }
                    _ => {}
                }
                continue;
            }
            let counter = map.get_or_insert(hash, &r.key, &self.hasher);
            *counter = refreshed(*counter, r.window, r.limit, now);
            counter.used = counter.used.saturating_sub(r.amount).saturating_add(new);
        }
    }

    /// Sets a counter to hold `used` in `window` as of `now`, replacing what it held: how a
    /// durable backend rebuilds the counters from its ledger at startup, before serving.
    ///
    /// A rate counter starts draining from `now` (at `limit` per `per`); a budget counter
    /// counts `used` in the period starting at the window's `start` (a later period starts
    /// from zero again, as always).
    pub fn restore(&self, key: &CounterKey, window: Window, limit: u64, used: u64, now: Timestamp) {
        let now = now.as_unix_nanos();
        let hash = self.hash_of(key);
        let mut map = lock(&self.shards[Self::shard_of(hash)].map);
        let counter = map.get_or_insert(hash, key, &self.hasher);
        // From scratch: a restored rate counter drains from now, not from an old stamp.
        let mut fresh = refreshed(Counter::default(), window, limit, now);
        fresh.used = used;
        *counter = fresh;
    }

    /// Takes `amount` off a budget counter's current period (never below zero); what was
    /// taken. How spend reset by an operator reaches the counters: a period other than the
    /// counter's current one, or a rate window, is left alone.
    pub fn give_back(&self, key: &str, window: Window, amount: u64) -> u64 {
        let Window::Fixed { start, .. } = window else {
            return 0;
        };
        let hash = self.hash_of(key);
        let mut map = lock(&self.shards[Self::shard_of(hash)].map);
        match map.find_mut(hash, key) {
            Some(c) if c.stamp == start.as_unix_nanos() && c.per == 0 => {
                let taken = c.used.min(amount);
                c.used -= taken;
                taken
            }
            _ => 0,
        }
    }

    /// The amount a counter holds now (`None` if it holds nothing or does not exist).
    pub fn used(&self, key: &str, window: Window, limit: u64, now: Timestamp) -> Option<u64> {
        let hash = self.hash_of(key);
        let map = lock(&self.shards[Self::shard_of(hash)].map);
        let c = map.find(hash, key)?;
        if let Window::Fixed { start, .. } = window
            && c.stamp != start.as_unix_nanos()
        {
            return None;
        }
        Some(refreshed(*c, window, limit, now.as_unix_nanos()).used)
    }

    /// Approximate heap bytes of the counters: table slots (a 16-byte key handle, a 40-byte
    /// counter, a control byte) plus each key's shared string (16-byte header and its text).
    pub fn memory_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let map = lock(&s.map);
                let keys: usize = map
                    .counters
                    .iter()
                    .map(|(k, _)| (16 + k.len()).next_multiple_of(16))
                    .sum();
                crate::rate::table_bytes(
                    map.counters.capacity(),
                    std::mem::size_of::<(CounterKey, Counter)>(),
                ) + keys
            })
            .sum()
    }

    /// How many counters are held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(&s.map).counters.len())
            .sum()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops drained rate counters and budget counters of ended periods.
    pub fn sweep(&self, now: Timestamp) {
        for shard in self.shards.iter() {
            lock(&shard.map).sweep(now.as_unix_nanos());
        }
    }
}

impl ShardMap {
    fn find(&self, hash: u64, key: &str) -> Option<&Counter> {
        self.counters
            .find(hash, |(k, _)| **k == *key)
            .map(|(_, c)| c)
    }

    fn find_mut(&mut self, hash: u64, key: &str) -> Option<&mut Counter> {
        self.counters
            .find_mut(hash, |(k, _)| **k == *key)
            .map(|(_, c)| c)
    }

    fn get_or_insert(&mut self, hash: u64, key: &CounterKey, hasher: &RandomState) -> &mut Counter {
        let entry =
            self.counters
                .entry(hash, |(k, _)| **k == **key, |(k, _)| hasher.hash_one(&**k));
        let (_, counter) = match entry {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert((key.clone(), Counter::default())).into_mut(),
        };
        counter
    }

    fn maybe_sweep(&mut self, now: u64) {
        if self.counters.len() >= self.sweep_at.max(SWEEP_MIN) {
            self.sweep(now);
            self.sweep_at = self.counters.len().saturating_mul(2);
        }
    }

    fn sweep(&mut self, now: u64) {
        self.counters.retain(|(_, c)| {
            if c.per > 0 {
                let window = Window::Rate {
                    per: Duration::from_nanos(c.per),
                };
                refreshed(*c, window, c.limit, now).used > 0
            } else {
                c.end > now
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain integers behind: still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The counter as of `now`: a rate bucket drained for the time passed, a budget reset at a
/// new period.
fn refreshed(mut c: Counter, window: Window, limit: u64, now: u64) -> Counter {
    match window {
        Window::Rate { per } => {
            let per = nanos(per).max(1);
            c.end = 0;
            c.per = per;
            c.limit = limit;
            if c.stamp == 0 || limit == 0 {
                c.stamp = now;
                return c;
            }
            let elapsed = now.saturating_sub(c.stamp);
            let drained = (u128::from(elapsed) * u128::from(limit) / u128::from(per)) as u64;
            if drained >= c.used {
                c.used = 0;
                c.stamp = now;
            } else {
                c.used -= drained;
                // Advance only by the time the drained whole units took, keeping the rest.
                c.stamp += (u128::from(drained) * u128::from(per) / u128::from(limit)) as u64;
            }
            c
        }
        Window::Fixed { start, end } => {
            let start = start.as_unix_nanos();
            if c.stamp < start || c.per != 0 {
                c.per = 0;
                c.used = 0;
                c.stamp = start;
            }
            c.end = end.map_or(u64::MAX, Timestamp::as_unix_nanos);
            c
        }
    }
}

fn wait_until_fits(charge: &Charge, used: u64, now: u64) -> Option<Duration> {
    if charge.amount > charge.limit {
        return None;
    }
    match charge.window {
        Window::Rate { per } => {
            let over = used.saturating_add(charge.amount) - charge.limit;
            let per = u128::from(nanos(per));
            let limit = u128::from(charge.limit.max(1));
            Some(Duration::from_nanos(
                (u128::from(over) * per).div_ceil(limit) as u64,
            ))
        }
        Window::Fixed { end, .. } => {
            end.map(|e| Duration::from_nanos(e.as_unix_nanos().saturating_sub(now)))
        }
    }
}

fn reset_after(window: Window, limit: u64, used: u64, now: u64) -> Duration {
    match window {
        Window::Rate { per } => {
            let per = u128::from(nanos(per));
            Duration::from_nanos((u128::from(used) * per).div_ceil(u128::from(limit.max(1))) as u64)
        }
        Window::Fixed { end, .. } => end.map_or(Duration::MAX, |e| {
            Duration::from_nanos(e.as_unix_nanos().saturating_sub(now))
        }),
    }
}

impl LimitBackend for MemoryBackend {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        ready(
            self.reserve_now(charges, now)
                .map_err(ReserveError::Exceeded),
        )
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        self.settle_now(reservation, actual, now);
        ready(Ok(()))
    }

    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        self.release_now(reservation, now);
        ready(Ok(()))
    }

    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        Ok(self
            .reserve_now(charges, now)
            .map_err(ReserveError::Exceeded))
    }

    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Option<Reservation> {
        self.end_now(&reservation, actual, now);
        None
    }
}

/// A reservation that must end exactly once: [`settle`](Pending::settle) or
/// [`release`](Pending::release) it; dropped untouched, it settles at the reserved amounts
/// (nothing is ever left reserved, and nothing reserved is forgotten).
///
/// Ending a reservation from `Drop` polls the backend's future once; if it is not ready (a
/// network backend), it is spawned on the current Tokio runtime, or, with no runtime, dropped
/// with a warning (the reservation then expires with its window in that backend).
pub struct Pending<B: LimitBackend> {
    backend: Arc<B>,
    reservation: Option<Reservation>,
    clock: keygate_core::Clock,
}

impl<B: LimitBackend> std::fmt::Debug for Pending<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("reservation", &self.reservation)
            .finish_non_exhaustive()
    }
}

impl<B: LimitBackend> Pending<B> {
    /// Wraps a reservation made on `backend`.
    pub fn new(backend: Arc<B>, reservation: Reservation, clock: keygate_core::Clock) -> Self {
        Pending {
            backend,
            reservation: Some(reservation),
            clock,
        }
    }

    /// The reservation, while not yet ended.
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// Settles at `actual` (once; later calls do nothing). An empty reservation never
    /// reaches the backend.
    pub fn settle(&mut self, actual: Actual) {
        if let Some(r) = self.reservation.take()
            && !r.charges.is_empty()
        {
            let now = self.clock.now();
            if let Some(r) = self.backend.end_at_once(r, Some(actual), now) {
                drive(self.backend.settle(r, actual, now));
            }
        }
    }

    /// Releases (once; later calls do nothing).
    pub fn release(&mut self) {
        if let Some(r) = self.reservation.take()
            && !r.charges.is_empty()
        {
            let now = self.clock.now();
            if let Some(r) = self.backend.end_at_once(r, None, now) {
                drive(self.backend.release(r, now));
            }
        }
    }

    /// Settles at the reserved amounts (once).
    pub fn settle_as_reserved(&mut self) {
        if let Some(r) = &self.reservation {
            let actual = reserved_amounts(r);
            self.settle(actual);
        }
    }
}

/// The amounts a reservation holds, as an [`Actual`] (the largest held per unit).
pub fn reserved_amounts(r: &Reservation) -> Actual {
    let mut a = Actual::default();
    for c in &r.charges {
        match c.unit {
            Unit::Tokens => a.tokens = a.tokens.max(c.amount),
            Unit::Nanodollars => a.cost = a.cost.max(Money::from_nanos(c.amount)),
        }
    }
    a
}

impl<B: LimitBackend> Drop for Pending<B> {
    fn drop(&mut self) {
        self.settle_as_reserved();
    }
}

/// Runs a backend future to completion if it is ready at once, else on the Tokio runtime.
pub(crate) fn drive<F>(fut: F)
where
    F: Future<Output = Result<(), BackendError>> + Send + 'static,
{
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(())) => {}
        std::task::Poll::Ready(Err(e)) => {
            tracing::warn!(error = %e, "settling a reservation failed")
        }
        std::task::Poll::Pending => match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::warn!(error = %e, "settling a reservation failed");
                    }
                });
            }
            Err(_) => tracing::warn!("no runtime to settle a reservation on; dropped"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_700_000_000 + secs)
    }

    fn rate(key: &str, limit: u64, amount: u64) -> Charge {
        Charge {
            group: 0,
            key: key.into(),
            window: Window::Rate { per: MIN },
            unit: Unit::Tokens,
            limit,
            amount,
        }
    }

    fn budget(key: &str, limit: u64, amount: u64, start: u64) -> Charge {
        Charge {
            group: 0,
            key: key.into(),
            window: Window::Fixed {
                start: t(start),
                end: Some(t(start + 86_400)),
            },
            unit: Unit::Nanodollars,
            limit,
            amount,
        }
    }

    #[test]
    fn reservation_is_all_or_nothing() {
        let b = MemoryBackend::new();
        b.reserve_now(vec![rate("a", 100, 90)], t(0)).unwrap();
        let err = b
            .reserve_now(vec![rate("b", 100, 50), rate("a", 100, 20)], t(0))
            .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.remaining, 10);
        assert_eq!(b.used("b", Window::Rate { per: MIN }, 100, t(0)), None);
    }

    #[test]
    fn reservation_over_many_shards_reserves_each_charge_on_its_own_counter() {
        let b = MemoryBackend::new();
        // 40 counters: more shards than fit inline, several charges per shard.
        let charges: Vec<Charge> = (0..40u64)
            .map(|i| rate(&format!("k{i}"), 1000, i + 1))
            .collect();
        let r = b.reserve_now(charges, t(0)).unwrap();
        assert_eq!(r.charges.len(), 40);
        for (i, c) in r.charges.iter().enumerate() {
            assert_eq!(&*c.key, format!("k{i}"));
            assert_eq!(c.amount, i as u64 + 1);
            let used = b.used(&c.key, Window::Rate { per: MIN }, 1000, t(0));
            assert_eq!(used, Some(i as u64 + 1));
        }
        // One charge of 40 that does not fit: none of the others is taken.
        let mut charges: Vec<Charge> = (0..40u64)
            .map(|i| rate(&format!("k{i}"), 1000, 1))
            .collect();
        charges[39].amount = 1000;
        let err = b.reserve_now(charges, t(0)).unwrap_err();
        assert_eq!(err.index, 39);
        assert_eq!(b.used("k0", Window::Rate { per: MIN }, 1000, t(0)), Some(1));
        b.release_now(r, t(0));
        let used = b.used("k39", Window::Rate { per: MIN }, 1000, t(0));
        assert_eq!(used.unwrap_or(0), 0);
    }

    #[test]
    fn rate_bucket_drains_over_the_window_and_says_when_it_fits() {
        let b = MemoryBackend::new();
        b.reserve_now(vec![rate("a", 600, 600)], t(0)).unwrap();
        let err = b.reserve_now(vec![rate("a", 600, 100)], t(0)).unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_secs(10)));
        assert_eq!(err.reset, MIN);
        assert!(b.reserve_now(vec![rate("a", 600, 100)], t(9)).is_err());
        assert!(b.reserve_now(vec![rate("a", 600, 100)], t(10)).is_ok());
    }

    #[test]
    fn charge_larger_than_limit_never_fits() {
        let b = MemoryBackend::new();
        let err = b.reserve_now(vec![rate("a", 100, 101)], t(0)).unwrap_err();
        assert_eq!(err.retry_after, None);
    }

    #[test]
    fn settle_replaces_reservation_and_release_gives_it_back() {
        let b = MemoryBackend::new();
        let r1 = b
            .reserve_now(vec![budget("x", 1000, 400, 0)], t(5))
            .unwrap();
        let r2 = b
            .reserve_now(vec![budget("x", 1000, 400, 0)], t(5))
            .unwrap();
        let w = r1.charges[0].window;
        b.settle_now(
            r1,
            Actual {
                tokens: 0,
                cost: Money::from_nanos(150),
            },
            t(6),
        );
        assert_eq!(b.used("x", w, 1000, t(6)), Some(550));
        b.release_now(r2, t(7));
        assert_eq!(b.used("x", w, 1000, t(7)), Some(150));
    }

    #[test]
    fn budget_resets_in_a_new_period_and_late_settles_touch_no_period() {
        let b = MemoryBackend::new();
        let r = b
            .reserve_now(vec![budget("x", 1000, 1000, 0)], t(10))
            .unwrap();
        assert!(b.reserve_now(vec![budget("x", 1000, 1, 0)], t(20)).is_err());
        let next = b
            .reserve_now(vec![budget("x", 1000, 1000, 86_400)], t(86_400))
            .unwrap();
        b.settle_now(r, Actual::default(), t(86_401));
        let w = next.charges[0].window;
        assert_eq!(b.used("x", w, 1000, t(86_401)), Some(1000));
    }

    #[test]
    fn charge_from_a_lagging_clock_is_settled_in_the_period_that_holds_it() {
        let b = MemoryBackend::new();
        let next = b
            .reserve_now(vec![budget("x", 1000, 100, 86_400)], t(86_400))
            .unwrap();
        let late = b
            .reserve_now(vec![budget("x", 1000, 300, 0)], t(86_399))
            .unwrap();
        let w = next.charges[0].window;
        assert_eq!(b.used("x", w, 1000, t(86_400)), Some(400));
        b.release_now(late, t(86_400));
        assert_eq!(b.used("x", w, 1000, t(86_400)), Some(100));
    }

    #[test]
    fn restored_counters_hold_what_was_restored_and_keep_their_windows() {
        let b = MemoryBackend::new();
        let day = budget("x", 1000, 0, 0).window;
        b.restore(&"x".into(), day, 1000, 700, t(5));
        assert_eq!(b.used("x", day, 1000, t(5)), Some(700));
        assert!(
            b.reserve_now(vec![budget("x", 1000, 301, 0)], t(6))
                .is_err()
        );
        assert!(b.reserve_now(vec![budget("x", 1000, 300, 0)], t(6)).is_ok());
        // The next period starts from zero.
        assert!(
            b.reserve_now(vec![budget("x", 1000, 1000, 86_400)], t(86_400))
                .is_ok()
        );

        // A rate counter drains from the moment it was restored.
        let per = Window::Rate { per: MIN };
        b.restore(&"r".into(), per, 600, 600, t(100));
        assert_eq!(b.used("r", per, 600, t(100)), Some(600));
        assert_eq!(b.used("r", per, 600, t(130)), Some(300));
        // Restoring replaces, it does not add.
        b.restore(&"r".into(), per, 600, 60, t(130));
        assert_eq!(b.used("r", per, 600, t(130)), Some(60));
    }

    #[test]
    fn sweep_drops_ended_periods_but_keeps_current_ones() {
        let b = MemoryBackend::new();
        b.reserve_now(vec![budget("old", 10, 1, 0)], t(1)).unwrap();
        b.reserve_now(vec![budget("new", 10, 1, 86_400)], t(86_401))
            .unwrap();
        b.sweep(t(86_402));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn dropped_pending_settles_at_reserved_amounts_once() {
        let b = Arc::new(MemoryBackend::new());
        let clock = keygate_core::ManualClock::new(t(0)).clock();
        let r = b.reserve_now(vec![budget("x", 100, 30, 0)], t(0)).unwrap();
        let w = r.charges[0].window;
        let mut p = Pending::new(b.clone(), r, clock);
        p.settle(Actual {
            tokens: 0,
            cost: Money::from_nanos(10),
        });
        drop(p);
        assert_eq!(b.used("x", w, 100, t(0)), Some(10));
        let r = b.reserve_now(vec![budget("x", 100, 30, 0)], t(0)).unwrap();
        drop(Pending::new(b.clone(), r, keygate_core::Clock::system()));
        assert_eq!(b.used("x", w, 100, t(0)), Some(40));
    }

    #[test]
    fn thousand_concurrent_reservations_admit_exactly_what_fits() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        for (charge, fits) in [(budget("b", 370, 1, 0), 370), (rate("r", 250, 1), 250)] {
            let b = Arc::new(MemoryBackend::new());
            let admitted = rt.block_on(async {
                let tasks: Vec<_> = (0..1000)
                    .map(|_| {
                        let b = b.clone();
                        let c = charge.clone();
                        tokio::spawn(async move { b.reserve(vec![c], t(0)).await.is_ok() })
                    })
                    .collect();
                let mut n = 0;
                for task in tasks {
                    n += usize::from(task.await.unwrap());
                }
                n
            });
            assert_eq!(admitted, fits);
            assert_eq!(
                b.used(&charge.key, charge.window, charge.limit, t(0)),
                Some(fits as u64)
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Counters and one amount for all of them (as the layer reserves).
        Reserve(Vec<usize>, u64),
        Settle(usize, u64),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (prop::collection::vec(0..4usize, 1..4), 1..60u64)
                .prop_map(|(counters, amount)| Op::Reserve(counters, amount)),
            (any::<usize>(), 0..100u64).prop_map(|(i, f)| Op::Settle(i, f)),
            any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest! {
        #[test]
        fn any_interleaving_stays_within_limits_and_ends_at_the_settled_total(
            ops in prop::collection::vec(op(), 1..80),
        ) {
            // Three budgets and a token rate (the clock does not move: it never drains).
            let limits = [100u64, 150, 80, 120];
            let charge = |i: usize, limit: u64, amount: u64| {
                if i == 3 {
                    rate(&format!("c{i}"), limit, amount)
                } else {
                    budget(&format!("c{i}"), limit, amount, 0)
                }
            };
            let b = MemoryBackend::new();
            let now = t(0);
            let mut open: Vec<Reservation> = Vec::new();
            let mut settled = [0u64; 4];
            let key = |i: usize| format!("c{i}");
            for op in ops {
                match op {
                    Op::Reserve(mut counters, amount) => {
                        counters.sort_unstable();
                        counters.dedup();
                        let charges = counters
                            .iter()
                            .map(|&i| charge(i, limits[i], amount))
                            .collect();
                        if let Ok(r) = b.reserve_now(charges, now) {
                            open.push(r);
                        }
                    }
                    Op::Settle(i, fraction) if !open.is_empty() => {
                        let r = open.swap_remove(i % open.len());
                        // Actual at most the reservation: a settle never pushes a counter
                        // past its limit then.
                        let held = r.charges[0].amount;
                        let actual = held * fraction / 100;
                        for c in &r.charges {
                            let n: usize = c.key[1..].parse().unwrap();
                            settled[n] += actual;
                        }
                        let actual = Actual { tokens: actual, cost: Money::from_nanos(actual) };
                        b.settle_now(r, actual, now);
                    }
                    Op::Release(i) if !open.is_empty() => {
                        let r = open.swap_remove(i % open.len());
                        b.release_now(r, now);
                    }
                    _ => {}
                }
                for (i, limit) in limits.iter().enumerate() {
                    let w = charge(i, 0, 0).window;
                    let used = b.used(&key(i), w, *limit, now).unwrap_or(0);
                    prop_assert!(used <= *limit);
                }
            }
            for r in open.drain(..) {
                b.release_now(r, now);
            }
            for (i, limit) in limits.iter().enumerate() {
                let w = charge(i, 0, 0).window;
                prop_assert_eq!(b.used(&key(i), w, *limit, now).unwrap_or(0), settled[i]);
            }
        }
    }
}
