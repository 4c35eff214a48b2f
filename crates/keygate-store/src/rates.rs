//! Request-rate cells across restarts: what a gateway saves when it stops cleanly, and what
//! the next one starts from.
//!
//! A clean stop saves every cell still holding part of a rate, with the hash key their ids
//! were made with; the next gateway takes both and the counts go on where they were. After an
//! unclean stop (`kill -9`, a crash, a power loss) the cells of the last minute are unknown,
//! so the next gateway assumes every rate full for one minute (see
//! [`keygate_limit::RateLimitLayer::with_cold_start_until`]): never more than a rate allows.

use rusqlite::{OptionalExtension, params};

use crate::db::Db;
use crate::error::DbError;

/// How the last gateway on this database left the request rates, from [`Db::begin_rates`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateStart {
    /// No gateway ran on this database before: rates start empty.
    First,
    /// The last one stopped cleanly: go on from its cells.
    Clean {
        /// `(cell id, theoretical arrival time)`.
        cells: Vec<(u64, u64)>,
    },
    /// The last one did not stop cleanly: assume every rate full for one window.
    Unclean,
}

/// What [`Db::begin_rates`] returns: the hash key to make cell ids with, and how to start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateBegin {
    /// The key: the one saved before, or the one given when there was none.
    pub hash_key: [u8; 16],
    /// How to start.
    pub start: RateStart,
}

fn hex(key: &[u8; 16]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(key)
}

/// SQL integers are signed: ids keep their bits.
fn to_sql(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn from_sql(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

impl Db {
    /// Starts a gateway's run: says how the last one left the rates (and the hash key to go
    /// on with; `new_key` is stored when there is none yet), then marks this run as not
    /// stopped cleanly until [`Db::save_rates`]. One transaction.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the database cannot be read or written.
    pub fn begin_rates(&mut self, new_key: [u8; 16]) -> Result<RateBegin, DbError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let get = |name: &str| -> Result<Option<String>, DbError> {
            Ok(tx
                .query_row("SELECT value FROM rate_meta WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?)
        };
        let stored = get("hash_key")?;
        let clean = get("clean")?;
        let (hash_key, start) = match stored.as_deref().and_then(unhex) {
            None => (new_key, RateStart::First),
            Some(key) if clean.as_deref() == Some("1") => {
                let mut stmt = tx.prepare("SELECT id, tat FROM rate_cells")?;
                let cells = stmt
                    .query_map([], |r| Ok((from_sql(r.get(0)?), from_sql(r.get(1)?))))?
                    .collect::<Result<Vec<_>, _>>()?;
                (key, RateStart::Clean { cells })
            }
            Some(key) => (key, RateStart::Unclean),
        };
        tx.execute(
            "INSERT INTO rate_meta (name, value) VALUES ('hash_key', ?1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [hex(&hash_key)],
        )?;
        tx.execute(
            "INSERT INTO rate_meta (name, value) VALUES ('clean', '0') \
             ON CONFLICT (name) DO UPDATE SET value = '0'",
            [],
        )?;
        tx.execute("DELETE FROM rate_cells", [])?;
        tx.commit()?;
        Ok(RateBegin { hash_key, start })
    }

    /// Saves the rate cells at a clean stop and marks the run clean. One transaction.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when the database cannot be written; the run then counts as
    /// unclean, and the next one starts conservatively.
    pub fn save_rates(&mut self, hash_key: [u8; 16], cells: &[(u64, u64)]) -> Result<(), DbError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM rate_cells", [])?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO rate_cells (id, tat) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET tat = excluded.tat",
            )?;
            for &(id, tat) in cells {
                insert.execute(params![to_sql(id), to_sql(tat)])?;
            }
        }
        tx.execute(
            "INSERT INTO rate_meta (name, value) VALUES ('hash_key', ?1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [hex(&hash_key)],
        )?;
        tx.execute(
            "INSERT INTO rate_meta (name, value) VALUES ('clean', '1') \
             ON CONFLICT (name) DO UPDATE SET value = '1'",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_stop_hands_its_cells_and_key_to_the_next_run_and_a_crash_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.db");
        let mut db = Db::open(&path).unwrap();
        let first = db.begin_rates([7; 16]).unwrap();
        assert_eq!(
            first,
            RateBegin {
                hash_key: [7; 16],
                start: RateStart::First
            }
        );

        let cells = vec![(u64::MAX, 5), (1, u64::from(u32::MAX) << 20)];
        db.save_rates([7; 16], &cells).unwrap();
        // The next run, with another key of its own, gets the saved key and cells.
        let mut db = Db::open(&path).unwrap();
        let next = db.begin_rates([9; 16]).unwrap();
        assert_eq!(next.hash_key, [7; 16]);
        let RateStart::Clean { cells: mut got } = next.start else {
            panic!("{next:?}");
        };
        got.sort_unstable();
        let mut want = cells;
        want.sort_unstable();
        assert_eq!(got, want);

        // That run never saves (killed): the one after starts conservatively.
        let after = Db::open(&path).unwrap().begin_rates([9; 16]).unwrap();
        assert_eq!(after.hash_key, [7; 16]);
        assert_eq!(after.start, RateStart::Unclean);
    }

    #[test]
    fn hex_round_trips_and_junk_is_no_key() {
        let key = [0, 1, 0xab, 0xff, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0x7f];
        assert_eq!(unhex(&hex(&key)), Some(key));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(32)), None);
    }
}
