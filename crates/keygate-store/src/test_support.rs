//! Records and databases for the tests.

use std::path::PathBuf;

use keygate_core::{KeyDigest, KeyId, KeyRecord, Permissions, ProjectRecord, Timestamp};

use crate::Db;

pub(crate) fn key(id: &str, project: &str, secret: &str) -> KeyRecord {
    let mut k = KeyRecord::new(
        KeyId::new(id),
        project,
        KeyDigest::of(secret),
        Timestamp::from_unix_secs(1_000),
    );
    k.permissions = Permissions::All;
    k
}

/// A temporary database with project `p` and no keys.
pub(crate) fn db_with_project() -> (tempfile::TempDir, PathBuf, Db) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let mut db = Db::open(&path).unwrap();
    db.create_project(&ProjectRecord::new("p")).unwrap();
    (dir, path, db)
}

/// A plain connection, as another tool (or an attacker with file access) would have.
pub(crate) fn raw(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}
