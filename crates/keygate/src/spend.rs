//! [`SpendBackend`]: where the token layer keeps token rates and budgets, in memory only or
//! in memory with the durable SQLite ledger behind it.

use std::future::Future;

use futures_util::future::Either;
use keygate_core::Timestamp;
use keygate_limit::LimitBackend;
use keygate_limit::MemoryBackend;
use keygate_limit::backend::{Actual, BackendError, Charge, Reservation, ReserveError};
use keygate_store::LedgerBackend;

/// The token layer's counters in a [`KeygateLayer`](crate::KeygateLayer).
///
/// - [`SpendBackend::Memory`]: one process's memory (tests, or a gateway that accepts that
///   a restart forgets spend).
/// - [`SpendBackend::Ledger`]: admission in memory, every reservation durable in the SQLite
///   ledger before the request is forwarded, counters rebuilt from it at start (what a
///   configured gateway with `store = "sqlite:…"` uses), so a restart never doubles a budget.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpendBackend {
    /// In memory only.
    Memory(MemoryBackend),
    /// In memory, with the SQLite ledger as the truth.
    Ledger(LedgerBackend),
}

impl Default for SpendBackend {
    fn default() -> Self {
        SpendBackend::Memory(MemoryBackend::new())
    }
}

impl SpendBackend {
    /// The in-memory counters admission is decided on (for inspection: what is used now).
    pub fn memory(&self) -> &MemoryBackend {
        match self {
            SpendBackend::Memory(m) => m,
            SpendBackend::Ledger(l) => l.memory(),
        }
    }

    /// The ledger, when there is one.
    pub fn ledger(&self) -> Option<&LedgerBackend> {
        match self {
            SpendBackend::Memory(_) => None,
            SpendBackend::Ledger(l) => Some(l),
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
            SpendBackend::Ledger(l) => Either::Right(l.reserve(charges, now)),
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
            SpendBackend::Ledger(l) => Either::Right(l.settle(reservation, actual, now)),
        }
    }

    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        match self {
            SpendBackend::Memory(m) => Either::Left(m.release(reservation, now)),
            SpendBackend::Ledger(l) => Either::Right(l.release(reservation, now)),
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
        }
    }
}
