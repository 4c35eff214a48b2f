//! The PostgreSQL schema: the SQLite store's tables and columns in PostgreSQL's dialect.
//!
//! Its own numbered list (PostgreSQL starts from the current design, not from SQLite's
//! history); `keygate_schema` records the last migration applied. Migrations run in one
//! transaction under an advisory lock, so replicas starting together migrate once.

/// One step of the schema.
pub(crate) struct Migration {
    pub(crate) version: i32,
    pub(crate) sql: &'static str,
}

/// The advisory lock migrations hold (any constant; this one spells "keygate").
pub(crate) const MIGRATION_LOCK: i64 = 0x006b_6579_6761_7465;

/// Every migration, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
        -- `change_seq` grows by one in every transaction that changes a project or a key;
        -- the rows it changed carry it in `updated_seq`, which is how a snapshot catches up.
        -- Writers lock its row first, so they take numbers in the order they commit.
        -- `objects_seq` grows with every removal of an object.
        CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        );
        INSERT INTO meta (name, value) VALUES ('change_seq', 0), ('objects_seq', 0);

        CREATE TABLE projects (
            id TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            updated_seq BIGINT NOT NULL
        );
        CREATE INDEX projects_updated_seq ON projects (updated_seq);

        -- Digests are 64 lowercase hex digits (KeyDigest's text form). Times are Unix
        -- nanoseconds.
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

        -- The object registry (see `PgRegistry`): which project owns each object created
        -- through keygate; `models` is a JSON array. Times are Unix seconds.
        CREATE TABLE objects (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            project TEXT NOT NULL,
            key_id TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            model TEXT,
            models TEXT
        );
        CREATE INDEX objects_by_project ON objects (project, kind, created_at);
        CREATE INDEX objects_by_age ON objects (kind, created_at);
    ",
    },
    Migration {
        version: 2,
        sql: "
        -- The spend ledger: every charge settled in the shared counters (Redis), one row per
        -- reservation and counter, written from the counters' outbox and acknowledged there
        -- only after commit; the key makes a replay harmless. `reservation` is the 64-bit id
        -- with the same bits, signed. Periods are Unix nanoseconds (NULL: a rate, or no end);
        -- amounts are tokens ('t') or nanodollars ('n'); `held` is what was reserved.
        CREATE TABLE spend (
            shard INTEGER NOT NULL,
            reservation BIGINT NOT NULL,
            counter TEXT NOT NULL,
            kind TEXT NOT NULL,
            unit TEXT NOT NULL,
            period_start BIGINT,
            period_end BIGINT,
            held BIGINT NOT NULL,
            amount BIGINT NOT NULL,
            reaped BOOLEAN NOT NULL,
            recorded_at BIGINT NOT NULL,
            PRIMARY KEY (shard, reservation, counter)
        );
        CREATE INDEX spend_by_counter ON spend (counter, period_start);
    ",
    },
    Migration {
        version: 3,
        sql: "
        -- Admin keys, the record of every admin action and the usage per key, day and
        -- model, as in the SQLite store's version 6.
        CREATE TABLE admin_keys (
            id TEXT PRIMARY KEY,
            digest TEXT NOT NULL UNIQUE,
            record TEXT NOT NULL,
            revoked_at BIGINT
        );
        CREATE TABLE admin_events (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            project TEXT,
            before TEXT,
            after TEXT
        );
        CREATE INDEX admin_events_target ON admin_events (target, id);
        CREATE INDEX admin_events_project ON admin_events (project, id);
        CREATE TABLE usage_daily (
            key_id TEXT NOT NULL,
            day BIGINT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL,
            denied BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cost BIGINT NOT NULL,
            PRIMARY KEY (key_id, day, model)
        );
    ",
    },
];

/// The schema version this build writes: the last migration's.
pub(crate) const SCHEMA_VERSION: i32 = 3;

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
