//! [`SpendBackend`]: where the token layer keeps token rates and budgets: in memory only, in
//! memory with the durable SQLite ledger behind it, or in Redis shared by every replica.

use std::future::Future;

use futures_util::future::Either;
use keygate_core::Timestamp;
use keygate_limit::LimitBackend;
use keygate_limit::MemoryBackend;
use keygate_limit::backend::{Actual, BackendError, Charge, Reservation, ReserveError};
use keygate_store::{LedgerBackend, RedisBackend};

/// The token layer's counters in a [`KeygateLayer`](crate::KeygateLayer).
///
/// - [`SpendBackend::Memory`]: one process's memory (tests, or a gateway that accepts that
///   a restart forgets spend).
/// - [`SpendBackend::Ledger`]: admission in memory, every reservation durable in the SQLite
///   ledger before the request is forwarded, counters rebuilt from it at start (what a
///   configured gateway with `store = "sqlite:…"` uses), so a restart never doubles a budget.
/// - [`SpendBackend::Redis`]: counters in Redis ([`RedisBackend`]), shared exactly by every
///   replica that uses the same server or cluster; every call a round trip.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpendBackend {
    /// In memory only.
    Memory(MemoryBackend),
    /// In memory, with the SQLite ledger as the truth.
    Ledger(LedgerBackend),
    /// In Redis, shared by replicas.
    Redis(RedisBackend),
}

impl Default for SpendBackend {
    fn default() -> Self {
        SpendBackend::Memory(MemoryBackend::new())
    }
}

impl SpendBackend {
    /// The in-memory counters admission is decided on (for inspection: what is used now);
    /// `None` when they are in Redis.
    pub fn memory(&self) -> Option<&MemoryBackend> {
        match self {
            SpendBackend::Memory(m) => Some(m),
            SpendBackend::Ledger(l) => Some(l.memory()),
            SpendBackend::Redis(_) => None,
        }
    }

    /// The ledger, when there is one.
    pub fn ledger(&self) -> Option<&LedgerBackend> {
        match self {
            SpendBackend::Ledger(l) => Some(l),
            _ => None,
        }
    }

    /// The Redis counters, when they are there.
    pub fn redis(&self) -> Option<&RedisBackend> {
        match self {
            SpendBackend::Redis(r) => Some(r),
            _ => None,
        }
    }
}

impl LimitBackend for SpendBackend {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        match self {
            SpendBackend::Memory(m) => Either::Left(m.reserve(charges, now)),
            SpendBackend::Ledger(l) => Either::Right(Either::Left(l.reserve(charges, now))),
            SpendBackend::Redis(r) => Either::Right(Either::Right(r.reserve(charges, now))),
        }
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        match self {
            SpendBackend::Memory(m) => Either::Left(m.settle(reservation, actual, now)),
            SpendBackend::Ledger(l) => {
                Either::Right(Either::Left(l.settle(reservation, actual, now)))
            }
            SpendBackend::Redis(r) => {
                Either::Right(Either::Right(r.settle(reservation, actual, now)))
            }
        }
    }

    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        match self {
            SpendBackend::Memory(m) => Either::Left(m.release(reservation, now)),
            SpendBackend::Ledger(l) => Either::Right(Either::Left(l.release(reservation, now))),
            SpendBackend::Redis(r) => Either::Right(Either::Right(r.release(reservation, now))),
        }
    }

    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        match self {
            SpendBackend::Memory(m) => m.reserve_at_once(charges, now),
            SpendBackend::Ledger(l) => l.reserve_at_once(charges, now),
            SpendBackend::Redis(r) => r.reserve_at_once(charges, now),
        }
    }

    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Option<Reservation> {
        match self {
            SpendBackend::Memory(m) => m.end_at_once(reservation, actual, now),
            SpendBackend::Ledger(l) => l.end_at_once(reservation, actual, now),
            SpendBackend::Redis(r) => r.end_at_once(reservation, actual, now),
        }
    }
}
