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

/// What each migration from version 6 on added, undone, latest first (so a test can take a
/// database back to an earlier version).
const UNDO: &[(u32, &str)] = &[
    (
        8,
        "DROP TABLE spend_open_old; DELETE FROM meta WHERE name = 'spend_open_floor'; \
         CREATE INDEX spend_open ON spend_reservations (id) WHERE state = 0;",
    ),
    (7, "DROP TABLE spend_charge_kinds;"),
    (
        6,
        "DROP TABLE admin_keys; DROP TABLE admin_events; DROP TABLE usage_daily;",
    ),
];

/// Takes the database at `path`, of the current schema, back to schema `version` (5 or later).
pub(crate) fn downgrade(path: &std::path::Path, version: u32) {
    let conn = raw(path);
    for (v, sql) in UNDO {
        if *v > version {
            conn.execute_batch(sql).unwrap();
        }
    }
    conn.pragma_update(None, "user_version", version).unwrap();
}
