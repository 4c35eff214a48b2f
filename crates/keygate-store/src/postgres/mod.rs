//! PostgreSQL: keys and projects shared by every gateway replica.
//!
//! [`PgDb`] is the database (asynchronous, pooled, every call with a deadline); [`PgStore`]
//! is the [`KeyStore`](keygate_core::KeyStore) each replica serves from memory, told of
//! every change by `LISTEN/NOTIFY` and polling the change counter as the guarantee.
//!
//! The driver is `tokio-postgres` with a `deadpool-postgres` pool: asynchronous on the
//! runtime the gateway already runs, with notifications read straight off a connection of
//! its own and no compile-time query checking to need a database at build time (what
//! `sqlx` would add, with a much larger dependency tree).

mod admin;
mod db;
mod ledger;
mod objects;
mod schema;
mod store;

pub use db::{PG_DEADLINE, PgDb};
pub use ledger::{Flushed, LedgerWriter};
pub use objects::PgRegistry;
pub use store::PgStore;
