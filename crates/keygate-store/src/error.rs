//! What can go wrong with the key database.

use std::path::PathBuf;

/// A key database operation failed.
///
/// Messages name ids, files and fields, never a secret (the database holds none) and never a
/// stored record's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The database could not be opened or is not a SQLite database.
    #[error("cannot open key database {}: {message}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// SQLite refused an operation (I/O error, locked for too long, ...).
    #[error("key database error: {0}")]
    Sqlite(String),
    /// The thing named already exists (an id, or a digest another key has).
    #[error("{0} already exists")]
    Exists(String),
    /// The thing named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record failed validation, or a change was refused.
    #[error("{0}")]
    Invalid(String),
    /// Stored data cannot be read back (a row that is not a record, or records that do not
    /// fit together).
    #[error("key database is corrupt: {0}")]
    Corrupt(String),
    /// PostgreSQL refused an operation (its severity, SQLSTATE code and message; never the
    /// values it quotes in its details).
    #[error("key database error: {0}")]
    Postgres(String),
    /// The database could not be reached in time (connection refused or lost, the pool's
    /// wait or an operation's deadline passed). A request that needs it gets 503.
    #[error("key database unavailable: {0}")]
    Unavailable(String),
    /// The database was made by a newer keygate.
    #[error(
        "key database schema version {found} is newer than this keygate supports \
         ({supported}); upgrade keygate"
    )]
    TooNew {
        /// The database's version.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite's messages name tables, columns and constraints, not bound values.
        DbError::Sqlite(e.to_string())
    }
}
