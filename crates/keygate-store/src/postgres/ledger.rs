//! The spend ledger in PostgreSQL, written from the shared counters' outbox.

use std::time::Duration;

use keygate_core::Timestamp;
use keygate_limit::backend::{BackendError, Unit};

use super::db::{PgDb, deadline, pg_error};
use crate::db::nanos;
use crate::error::DbError;
use crate::redis_counters::{
    LedgerSource, LedgerWindow, OutboxEntry, RedisBackend, SettledCharge, WindowsFuture,
};

/// A 64-bit unsigned value in a signed column, with the same bits.
fn signed(n: u64) -> i64 {
    i64::from_ne_bytes(n.to_ne_bytes())
}

fn unsigned(n: i64) -> u64 {
    u64::from_ne_bytes(n.to_ne_bytes())
}

impl PgDb {
    /// Records settled charges in the ledger, in one transaction; a charge already recorded
    /// (the same shard, reservation and counter: a replay) is left as it is. How many were
    /// new.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database cannot be written: nothing is recorded.
    pub async fn record_spend(&self, charges: &[SettledCharge]) -> Result<u64, DbError> {
        if charges.is_empty() {
            return Ok(0);
        }
        let shard: Vec<i32> = charges
            .iter()
            .map(|c| i32::try_from(c.shard).unwrap_or(i32::MAX))
            .collect();
        let reservation: Vec<i64> = charges.iter().map(|c| signed(c.reservation)).collect();
        let counter: Vec<&str> = charges.iter().map(|c| c.counter.as_str()).collect();
        let kind: Vec<&str> = charges
            .iter()
            .map(|c| if c.period_start.is_some() { "f" } else { "r" })
            .collect();
        let unit: Vec<&str> = charges
            .iter()
            .map(|c| if c.unit == Unit::Tokens { "t" } else { "n" })
            .collect();
        let start: Vec<Option<i64>> = charges.iter().map(|c| c.period_start.map(nanos)).collect();
        let end: Vec<Option<i64>> = charges.iter().map(|c| c.period_end.map(nanos)).collect();
        let held: Vec<i64> = charges.iter().map(|c| signed(c.held)).collect();
        let amount: Vec<i64> = charges.iter().map(|c| signed(c.amount)).collect();
        let reaped: Vec<bool> = charges.iter().map(|c| c.reaped).collect();
        deadline(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "INSERT INTO spend (shard, reservation, counter, kind, unit, period_start, \
                     period_end, held, amount, reaped, recorded_at) \
                     SELECT u.*, (extract(epoch FROM clock_timestamp()) * 1e9)::bigint \
                     FROM UNNEST($1::integer[], $2::bigint[], $3::text[], $4::text[], \
                     $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], \
                     $10::boolean[]) AS u \
                     ON CONFLICT (shard, reservation, counter) DO NOTHING",
                    &[
                        &shard,
                        &reservation,
                        &counter,
                        &kind,
                        &unit,
                        &start,
                        &end,
                        &held,
                        &amount,
                        &reaped,
                    ],
                )
                .await
                .map_err(pg_error)?;
            Ok(n)
        })
        .await
    }

    /// What the ledger holds for `counter`: in the budget period starting at `start`, or over
    /// all time for `None`.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database cannot be read.
    pub async fn spent(&self, counter: &str, start: Option<Timestamp>) -> Result<u64, DbError> {
        let start = start.map(nanos);
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT COALESCE(SUM(amount), 0)::bigint FROM spend \
                     WHERE counter = $1 AND ($2::bigint IS NULL OR period_start = $2)",
                    &[&counter, &start],
                )
                .await
                .map_err(pg_error)?;
            Ok(unsigned(row.get(0)))
        })
        .await
    }

    /// Resets the budget period of `counter` starting at `start` (ending at `end`; `None`: a
    /// lifetime budget): a credit row takes off what the ledger holds for it, so what was
    /// settled no longer counts, for spend shown and for counters rebuilt from the ledger.
    /// Concurrent resets of one counter take turns. The amount taken off.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database cannot be written: nothing changed.
    pub async fn reset_spend(
        &self,
        shard: u64,
        counter: &str,
        start: Timestamp,
        end: Option<Timestamp>,
    ) -> Result<u64, DbError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| DbError::Unavailable(format!("random: {e}")))?;
        // Negative: never a reservation's id (those are the counters' own, below 2^63).
        let reservation = i64::from_ne_bytes(id) | i64::MIN;
        let shard = i32::try_from(shard).unwrap_or(i32::MAX);
        let (start, end) = (nanos(start), end.map(nanos));
        deadline(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&counter])
                .await
                .map_err(pg_error)?;
            let total: i64 = tx
                .query_one(
                    "SELECT COALESCE(SUM(amount), 0)::bigint FROM spend \
                     WHERE counter = $1 AND kind = 'f' AND period_start = $2",
                    &[&counter, &start],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            if total > 0 {
                tx.execute(
                    "INSERT INTO spend (shard, reservation, counter, kind, unit, period_start, \
                     period_end, held, amount, reaped, recorded_at) \
                     VALUES ($1, $2, $3, 'f', 'n', $4, $5, 0, $6, false, \
                     (extract(epoch FROM clock_timestamp()) * 1e9)::bigint)",
                    &[&shard, &reservation, &counter, &start, &end, &-total],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(unsigned(total.max(0)))
        })
        .await
    }

    /// How many charges the ledger holds.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database cannot be read.
    pub async fn spend_rows(&self) -> Result<u64, DbError> {
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT COUNT(*) FROM spend", &[])
                .await
                .map_err(pg_error)?;
            Ok(unsigned(row.get(0)))
        })
        .await
    }
}

/// The budget windows a Redis that lost them is rebuilt from: every budget period of the
/// shard that has not ended, summed.
impl LedgerSource for PgDb {
    fn windows(&self, shard: u64, now: Timestamp) -> WindowsFuture {
        let db = self.clone();
        let shard = i32::try_from(shard).unwrap_or(i32::MAX);
        let now = nanos(now);
        Box::pin(async move {
            let rows = deadline(async {
                let client = db.client().await?;
                client
                    .query(
                        "SELECT counter, period_start, period_end, SUM(amount)::bigint FROM spend \
                         WHERE shard = $1 AND kind = 'f' AND (period_end IS NULL OR period_end > $2) \
                         GROUP BY counter, period_start, period_end",
                        &[&shard, &now],
                    )
                    .await
                    .map_err(pg_error)
            })
            .await
            .map_err(|e| BackendError(format!("the ledger: {e}").into()))?;
            Ok(rows
                .iter()
                .map(|row| LedgerWindow {
                    counter: row.get(0),
                    start: Timestamp::from_unix_nanos(unsigned(row.get::<_, i64>(1))),
                    end: row
                        .get::<_, Option<i64>>(2)
                        .map(|e| Timestamp::from_unix_nanos(unsigned(e))),
                    used: unsigned(row.get(3)),
                })
                .collect())
        })
    }
}

/// What one [`LedgerWriter::flush`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Flushed {
    /// Outbox entries read and acknowledged.
    pub entries: usize,
    /// Charges newly recorded in the ledger.
    pub recorded: u64,
    /// Charges already there (replays: an entry read again after a crash or a lost ack).
    pub replayed: u64,
}

/// Moves settled charges from the shared counters' outbox (Redis) into the ledger
/// (PostgreSQL): read through a consumer group, recorded in one transaction, acknowledged
/// only after it commits. A crash anywhere loses no charge (an entry not acknowledged is
/// read again, by this writer or, once `claim_idle` has passed, by another replica's) and
/// doubles none (the ledger's key is the shard, reservation and counter).
#[derive(Debug, Clone)]
pub struct LedgerWriter {
    redis: RedisBackend,
    db: PgDb,
    consumer: String,
    batch: usize,
    claim_idle: Duration,
}

impl LedgerWriter {
    /// A writer named `consumer` (unique per process: a replica's name, or random).
    pub fn new(redis: RedisBackend, db: PgDb, consumer: impl Into<String>) -> Self {
        LedgerWriter {
            redis,
            db,
            consumer: consumer.into(),
            batch: 512,
            claim_idle: Duration::from_secs(10),
        }
    }

    /// Entries read per shard per flush (default 512).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long an entry another writer read stays its own before this one takes it over
    /// (default 10 s).
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Moves what the outbox holds now (up to the batch per shard) into the ledger.
    ///
    /// # Errors
    ///
    /// A [`DbError`] when Redis or PostgreSQL fails: what was read is not acknowledged, so
    /// the next flush reads it again.
    pub async fn flush(&self) -> Result<Flushed, DbError> {
        let entries = self
            .redis
            .read_outbox(&self.consumer, self.batch, self.claim_idle)
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        if entries.is_empty() {
            return Ok(Flushed::default());
        }
        let charges: Vec<SettledCharge> = entries
            .iter()
            .flat_map(|e: &OutboxEntry| e.charges.iter().cloned())
            .collect();
        let recorded = self.db.record_spend(&charges).await?;
        // Committed: now, and only now, the outbox may forget them.
        self.redis
            .ack_outbox(&entries)
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Flushed {
            entries: entries.len(),
            recorded,
            replayed: charges.len() as u64 - recorded,
        })
    }

    /// Flushes every `interval` on the tokio runtime (at once again while the outbox is
    /// fuller than a batch), logging failures; abort the handle to stop.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn run(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                loop {
                    match self.flush().await {
                        Ok(done) => {
                            if failing {
                                tracing::info!("the spend ledger is written again");
                                failing = false;
                            }
                            if done.entries < self.batch {
                                break;
                            }
                        }
                        Err(error) => {
                            if !failing {
                                tracing::error!(%error, "writing the spend ledger failed; the outbox keeps the charges until it works");
                                failing = true;
                            }
                            break;
                        }
                    }
                }
            }
        })
    }
}
