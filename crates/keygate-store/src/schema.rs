//! The versioned schema.
//!
//! Each migration takes the database from `version - 1` to `version`; `PRAGMA user_version`
//! records the last one applied. The SQL keeps to what PostgreSQL reads the same way (`TEXT`,
//! `BIGINT`, `REFERENCES`, `UNIQUE`), so a PostgreSQL store can replay the same list. Version 2 adds the spend
//! ledger next to the key tables without touching them; version 3 the request-rate cells.
//!
//! Records are stored whole as JSON (`record`), so every field `KeyRecord` and
//! `ProjectRecord` carry now or later survives without a migration; the other columns are
//! what lookups, listings and uniqueness need, written from the record on every change.

/// One step of the schema.
pub(crate) struct Migration {
    pub(crate) version: u32,
    pub(crate) sql: &'static str,
}

/// Every migration, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
        -- `change_seq` grows by one in every transaction that changes a project or a key;
        -- the rows it changed carry it in `updated_seq`, which is how a snapshot catches up.
        CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        );
        INSERT INTO meta (name, value) VALUES ('change_seq', 0);

        CREATE TABLE projects (
            id TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            updated_seq BIGINT NOT NULL
        );
        CREATE INDEX projects_updated_seq ON projects (updated_seq);

        -- Digests are 64 lowercase hex digits (KeyDigest's text form).
        CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL REFERENCES projects (id),
            digest TEXT NOT NULL UNIQUE,
            previous_digest TEXT UNIQUE,
            created_at BIGINT NOT NULL,
            record TEXT NOT NULL,
            created_by TEXT,
            last_used_at BIGINT,
            disabled_reason TEXT,
            updated_seq BIGINT NOT NULL
        );
        CREATE INDEX keys_project ON keys (project);
        CREATE INDEX keys_updated_seq ON keys (updated_seq);
        CREATE INDEX keys_created ON keys (created_at, id);
    ",
    },
    Migration {
        version: 2,
        sql: "
        -- The spend ledger (see `LedgerBackend`): one row per reservation, keyed by its id so
        -- a replayed write has no second effect. Times are Unix nanoseconds. `state` is
        -- `open` until the reservation is `settled` or `released`.
        CREATE TABLE ledger (
            reservation_id BIGINT PRIMARY KEY,
            at BIGINT NOT NULL,
            state TEXT NOT NULL,
            settled_at BIGINT
        );
        CREATE INDEX ledger_state ON ledger (state);

        -- One row per charge of a reservation. `window_kind` is `fixed` (a budget period
        -- [window_start, window_end), window_end NULL for a lifetime budget) or `rate` (a
        -- bucket draining in rate_per_nanos; window_end is at + rate_per_nanos, when the
        -- charge no longer counts). `unit` is `tokens` or `nanodollars`. `actual` is NULL
        -- while the reservation is open, 0 once released.
        CREATE TABLE ledger_charges (
            reservation_id BIGINT NOT NULL REFERENCES ledger (reservation_id),
            idx INTEGER NOT NULL,
            counter TEXT NOT NULL,
            window_kind TEXT NOT NULL,
            at BIGINT NOT NULL,
            window_start BIGINT,
            window_end BIGINT,
            rate_per_nanos BIGINT,
            unit TEXT NOT NULL,
            limit_amount BIGINT NOT NULL,
            reserved BIGINT NOT NULL,
            actual BIGINT,
            PRIMARY KEY (reservation_id, idx)
        );
        -- Restore: the charges whose window has not ended.
        CREATE INDEX ledger_charges_live ON ledger_charges (window_kind, window_end);
        -- Spend of one counter in one period.
        CREATE INDEX ledger_charges_counter ON ledger_charges (counter, window_start);
    ",
    },
    Migration {
        version: 3,
        sql: "
        -- Request-rate cells (GCRA theoretical arrival times, Unix nanoseconds, by cell id),
        -- saved when a gateway stops cleanly and read back by the next one, and in
        -- `rate_meta` the SipHash key the ids were made with (`hash_key`, hex) and whether
        -- the last gateway stopped cleanly (`clean`, '1' or '0').
        CREATE TABLE rate_cells (
            id BIGINT PRIMARY KEY,
            tat BIGINT NOT NULL
        );
        CREATE TABLE rate_meta (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
    ",
    },
];

/// The schema version this build writes: the last migration's.
pub(crate) const SCHEMA_VERSION: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one_up_to_the_schema_version() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    }
}
