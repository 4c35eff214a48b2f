//! The versioned schema.
//!
//! Each migration takes the database from `version - 1` to `version`; `PRAGMA user_version`
//! records the last one applied. The SQL keeps to what PostgreSQL reads the same way (`TEXT`,
//! `BIGINT`, `REFERENCES`, `UNIQUE`), so a PostgreSQL store can replay the same list. Version 2 adds the spend
//! ledger next to the key tables without touching them; version 3 the request-rate cells;
//! version 4 rebuilds the ledger as one appended row per reservation and a total per
//! counter and period (fewer pages written per commit, and a restart reads the totals, not
//! the history); version 5 adds the object registry; version 6 admin keys, the admin events and the usage per key, day and model; version 7 names each
//! kind of charge once (`spend_charge_kinds`), so a reservation's row holds ids and amounts;
//! version 8 finds the open reservations from a floor (`meta.spend_open_floor` and
//! `spend_open_old`) instead of a partial index.
//! Version 4 uses SQLite's row ids (`INTEGER PRIMARY KEY`), a table
//! `WITHOUT ROWID` and its JSON functions (to carry version 3's rows over): a PostgreSQL
//! store keeps the same tables and columns in its own dialect.
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
    Migration {
        version: 4,
        sql: "
        -- The spend ledger (see `LedgerBackend`), version 4.
        --
        -- One row per reservation, keyed by its id (SQLite's row id, so a new reservation is
        -- appended at the end of the table and its settlement rewrites the same recent page).
        -- `state`: 0 open, 1 settled, 2 released. `charges` is the JSON array of what was
        -- reserved (`counter`, `window` 'fixed' or 'rate', `start` and `end` of a budget
        -- period, `per` of a rate, both in Unix nanoseconds; `unit` 'tokens' or
        -- 'nanodollars'; `limit`; `amount`); `actual` the JSON array of the settled amounts,
        -- one per charge (zeros once released). Never deleted: the spend history.
        CREATE TABLE spend_reservations (
            id INTEGER PRIMARY KEY,
            at BIGINT NOT NULL,
            state INTEGER NOT NULL,
            ended_at BIGINT,
            charges TEXT NOT NULL,
            actual TEXT
        );
        -- The reservations still open: few (those in flight), read at every open.
        CREATE INDEX spend_open ON spend_reservations (id) WHERE state = 0;

        -- What settled reservations spent, per counter and period, added in the transaction
        -- that settles them. A budget (`window_kind` 'fixed', `rate_per_nanos` 0) has one row
        -- per period [window_start, window_end) (`window_end` NULL: a lifetime budget). A
        -- rate has one row per bucket of 1/64 of its period (`window_start` is the bucket's
        -- start; `window_end` the moment none of it counts any more: the bucket's end plus the
        -- period); buckets that ended are deleted.
        CREATE TABLE spend_totals (
            counter TEXT NOT NULL,
            window_kind TEXT NOT NULL,
            window_start BIGINT NOT NULL,
            rate_per_nanos BIGINT NOT NULL,
            window_end BIGINT,
            unit TEXT NOT NULL,
            limit_amount BIGINT NOT NULL,
            settled BIGINT NOT NULL,
            PRIMARY KEY (counter, window_kind, window_start, rate_per_nanos)
        ) WITHOUT ROWID;
        -- Restore reads the totals whose window has not ended (written once per new row:
        -- adding to `settled` leaves it alone).
        CREATE INDEX spend_totals_end ON spend_totals (window_end);

        -- Version 3's ledger, carried over.
        INSERT INTO spend_reservations (id, at, state, ended_at, charges, actual)
        SELECT l.reservation_id, l.at,
               CASE l.state WHEN 'open' THEN 0 WHEN 'settled' THEN 1 ELSE 2 END,
               l.settled_at,
               (SELECT json_group_array(json_object(
                    'counter', c.counter, 'window', c.window_kind, 'start', c.window_start,
                    'end', CASE c.window_kind WHEN 'fixed' THEN c.window_end END,
                    'per', c.rate_per_nanos, 'unit', c.unit, 'limit', c.limit_amount,
                    'amount', c.reserved))
                FROM (SELECT * FROM ledger_charges c
                      WHERE c.reservation_id = l.reservation_id ORDER BY c.idx) c),
               CASE WHEN l.state = 'open' THEN NULL ELSE
                   (SELECT json_group_array(COALESCE(c.actual, 0))
                    FROM (SELECT actual FROM ledger_charges c
                          WHERE c.reservation_id = l.reservation_id ORDER BY c.idx) c)
               END
        FROM ledger l;
        INSERT INTO spend_totals (counter, window_kind, window_start, rate_per_nanos,
                                  window_end, unit, limit_amount, settled)
        SELECT counter, 'fixed', window_start, 0, MAX(window_end), MAX(unit),
               MAX(limit_amount), SUM(actual)
        FROM ledger_charges
        WHERE window_kind = 'fixed' AND actual IS NOT NULL
        GROUP BY counter, window_start;
        INSERT INTO spend_totals (counter, window_kind, window_start, rate_per_nanos,
                                  window_end, unit, limit_amount, settled)
        SELECT counter, 'rate', bucket, per, bucket + len + per, MAX(unit), MAX(limit_amount),
               SUM(actual)
        FROM (SELECT counter, rate_per_nanos AS per, MAX(rate_per_nanos / 64, 1) AS len,
                     at - at % MAX(rate_per_nanos / 64, 1) AS bucket, unit, limit_amount, actual
              FROM ledger_charges
              WHERE window_kind = 'rate' AND actual IS NOT NULL)
        GROUP BY counter, per, bucket;
        DROP TABLE ledger_charges;
        DROP TABLE ledger;
    ",
    },
    Migration {
        version: 5,
        sql: "
        -- The object registry: which project owns each object created through keygate
        -- (or imported), and what later requests check (an assistant's model, the models a
        -- batch input file's requests name, as a JSON array).
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
        -- Grows with every removal, so a process caching objects notices another's.
        INSERT INTO meta (name, value) VALUES ('objects_seq', 0);
    ",
    },
    Migration {
        version: 6,
        sql: "
        -- Admin keys (`AdminKeyRecord` as JSON in `record`; `digest` is SHA-256 hex of the
        -- secret) and the record of every admin action (`AdminEvent`: who, what, on which
        -- key, project or admin key, the record before and after as JSON without digests),
        -- written in the transaction of the change. Never deleted. Times are Unix nanoseconds.
        CREATE TABLE admin_keys (
            id TEXT PRIMARY KEY,
            digest TEXT NOT NULL UNIQUE,
            record TEXT NOT NULL,
            revoked_at BIGINT
        );
        CREATE TABLE admin_events (
            id INTEGER PRIMARY KEY,
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

        -- What each key did per UTC day and model (`day`: days since 1970-01-01; `model`
        -- '' when the request named none): requests, how many were refused, tokens, and
        -- cost in nanodollars. Added to by the gateways about once a second; a report, not
        -- the budgets' truth (that is the ledger).
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
    Migration {
        version: 7,
        sql: "
        -- What a reservation charges, named once: a counter, its window (`window_kind`
        -- 'fixed' with `window_start` and `window_end` of a budget period, NULL end for a
        -- lifetime budget; or 'rate' with `rate_per_nanos`), its unit ('tokens' or
        -- 'nanodollars') and its limit. From version 7 on, `spend_reservations.charges`
        -- holds `KIND:AMOUNT` pairs, comma-separated, one per charge (the id of a row here
        -- and the amount reserved) instead of the JSON of each charge: about a tenth of
        -- the bytes written per reservation. Rows written before keep their JSON and are
        -- read as they are.
        CREATE TABLE spend_charge_kinds (
            id INTEGER PRIMARY KEY,
            counter TEXT NOT NULL,
            window_kind TEXT NOT NULL,
            window_start BIGINT,
            window_end BIGINT,
            rate_per_nanos BIGINT,
            unit TEXT NOT NULL,
            limit_amount BIGINT NOT NULL
        );
        -- The writer looks a kind up here the first time it meets it in a process.
        CREATE INDEX spend_charge_kinds_of ON spend_charge_kinds (counter, window_start);
    ",
    },
    Migration {
        version: 8,
        sql: "
        -- The open reservations are found from a floor instead of a partial index (which
        -- cost every commit one more page, and every reservation an insert and a delete in
        -- it). Every row of `spend_reservations` below `meta.spend_open_floor` is settled or
        -- released, except the ids listed in `spend_open_old` (reservations open for long,
        -- such as a long stream, so that they do not hold the floor back). The writer moves
        -- the floor forward every few thousand reservations; a floor behind the truth only
        -- makes a restart read a few more rows.
        CREATE TABLE spend_open_old (
            id INTEGER PRIMARY KEY
        );
        INSERT INTO meta (name, value)
        SELECT 'spend_open_floor',
               COALESCE((SELECT MIN(id) FROM spend_reservations WHERE state = 0),
                        (SELECT COALESCE(MAX(id), 0) + 1 FROM spend_reservations));
        DROP INDEX spend_open;
    ",
    },
];

/// The schema version this build writes: the last migration's.
pub(crate) const SCHEMA_VERSION: u32 = 8;

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
