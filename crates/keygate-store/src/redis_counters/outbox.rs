//! Reading the counters' outbox: each shard's stream of settled charges, through a consumer
//! group, so that an entry is read again until it is acknowledged (after the ledger commits).

use std::sync::atomic::Ordering;
use std::time::Duration;

use keygate_core::Timestamp;
use keygate_limit::backend::{BackendError, Unit};
use redis::Value;

use super::{Inner, PREFIX, RedisBackend, SHARDS, error, unexpected};

/// The consumer group every gateway's ledger writer reads the outbox in.
pub const LEDGER_GROUP: &str = "ledger";

/// One charge of one settled (or reaped) reservation, as the outbox carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledCharge {
    /// The shard (of the outbox) it came from.
    pub shard: u64,
    /// The reservation's id.
    pub reservation: u64,
    /// The counter charged.
    pub counter: String,
    /// Tokens or nanodollars.
    pub unit: Unit,
    /// The budget period's start; `None` for a rate.
    pub period_start: Option<Timestamp>,
    /// The budget period's end; `None` for a rate or a lifetime budget.
    pub period_end: Option<Timestamp>,
    /// What was reserved.
    pub held: u64,
    /// What was charged.
    pub amount: u64,
    /// Whether it was reaped (never settled: charged at what it held).
    pub reaped: bool,
}

/// One outbox entry: its stream id and its charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The shard.
    pub shard: u64,
    /// The stream entry's id (to acknowledge).
    pub id: String,
    /// Its charges (none if the entry could not be read: it is acknowledged all the same,
    /// and logged).
    pub charges: Vec<SettledCharge>,
}

fn outbox_key(shard: u64) -> String {
    format!("{PREFIX}:{{{shard:02}}}:out")
}

impl RedisBackend {
    /// Up to `count` entries of each shard's outbox for `consumer`: first those another
    /// consumer (or this one) read more than `claim_idle` ago without acknowledging them
    /// (it died, or its ledger write failed), then new ones. Every entry comes back until
    /// [`ack_outbox`](Self::ack_outbox) is called for it.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer.
    pub async fn read_outbox(
        &self,
        consumer: &str,
        count: usize,
        claim_idle: Duration,
    ) -> Result<Vec<OutboxEntry>, BackendError> {
        let reads =
            (0..SHARDS).map(|shard| self.inner.read_shard(shard, consumer, count, claim_idle));
        let mut out = Vec::new();
        for entries in futures_util::future::join_all(reads).await {
            out.extend(entries?);
        }
        Ok(out)
    }

    /// Acknowledges and deletes these entries (the ledger has them).
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer (they are read again: the ledger's keys
    /// make that harmless).
    pub async fn ack_outbox(&self, entries: &[OutboxEntry]) -> Result<(), BackendError> {
        let mut by_shard: Vec<Vec<&str>> = vec![Vec::new(); SHARDS as usize];
        for e in entries {
            if let Some(ids) = by_shard.get_mut(usize::try_from(e.shard).unwrap_or(usize::MAX)) {
                ids.push(&e.id);
            }
        }
        let acks = by_shard
            .iter()
            .enumerate()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(shard, ids)| {
                let key = outbox_key(shard as u64);
                let mut pipe = redis::pipe();
                pipe.cmd("XACK")
                    .arg(&key)
                    .arg(LEDGER_GROUP)
                    .arg(ids)
                    .ignore();
                pipe.cmd("XDEL").arg(&key).arg(ids).ignore();
                let inner = &self.inner;
                async move { inner.query_pipe(&pipe).await }
            });
        for done in futures_util::future::join_all(acks).await {
            done?;
        }
        Ok(())
    }
}

impl Inner {
    async fn query_pipe(&self, pipe: &redis::Pipeline) -> Result<Value, BackendError> {
        let mut conn = self.conn.clone();
        self.within(pipe.query_async(&mut conn)).await
    }

    /// Makes `shard`'s consumer group unless this process already did (or found it).
    async fn ensure_group(&self, shard: u64, key: &str) -> Result<(), BackendError> {
        let made =
            &self.outbox_groups[usize::try_from(shard).unwrap_or(0) % self.outbox_groups.len()];
        if made.load(Ordering::Relaxed) {
            return Ok(());
        }
        let create = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(LEDGER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .to_owned();
        let mut conn = self.conn.clone();
        let made_now: redis::RedisResult<Value> =
            self.within_raw(create.query_async(&mut conn)).await?;
        match made_now {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(error(e)),
        }
        made.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn read_shard(
        &self,
        shard: u64,
        consumer: &str,
        count: usize,
        claim_idle: Duration,
    ) -> Result<Vec<OutboxEntry>, BackendError> {
        let key = outbox_key(shard);
        let mut pipe = redis::pipe();
        pipe.cmd("XAUTOCLAIM")
            .arg(&key)
            .arg(LEDGER_GROUP)
            .arg(consumer)
            .arg(u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(count);
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(LEDGER_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&key)
            .arg(">");
        self.ensure_group(shard, &key).await?;
        let reply = match self.query_pipe(&pipe).await {
            Err(e) if e.0.contains("NOGROUP") => {
                // Redis restarted without it: made again, at once (from the stream's start).
                self.outbox_groups[usize::try_from(shard).unwrap_or(0) % self.outbox_groups.len()]
                    .store(false, Ordering::Relaxed);
                self.ensure_group(shard, &key).await?;
                self.query_pipe(&pipe).await?
            }
            other => other?,
        };
        parse_read(shard, &reply)
    }
}

/// The entries of an `XAUTOCLAIM` + `XREADGROUP` pipeline's reply, each once.
fn parse_read(shard: u64, reply: &Value) -> Result<Vec<OutboxEntry>, BackendError> {
    let Value::Array(parts) = reply else {
        return Err(unexpected(reply));
    };
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // XAUTOCLAIM: [next, [entries], [deleted]]; XREADGROUP: [[key, [entries]]] or nil.
    if let Some(Value::Array(claimed)) = parts.first()
        && let Some(Value::Array(entries)) = claimed.get(1)
    {
        for e in entries {
            if let Some(entry) = parse_entry(shard, e) {
                seen.insert(entry.id.clone());
                out.push(entry);
            }
        }
    }
    if let Some(read) = parts.get(1) {
        for entries in stream_entries(read) {
            for e in entries {
                if let Some(entry) = parse_entry(shard, e)
                    && !seen.contains(&entry.id)
                {
                    out.push(entry);
                }
            }
        }
    }
    Ok(out)
}

/// The entry lists of an `XREADGROUP` reply (RESP2 arrays or RESP3 maps).
fn stream_entries(read: &Value) -> Vec<&[Value]> {
    let mut out = Vec::new();
    match read {
        Value::Array(streams) => {
            for s in streams {
                if let Value::Array(kv) = s
                    && let Some(Value::Array(entries)) = kv.get(1)
                {
                    out.push(entries.as_slice());
                }
            }
        }
        Value::Map(streams) => {
            for (_, v) in streams {
                if let Value::Array(entries) = v {
                    out.push(entries.as_slice());
                }
            }
        }
        _ => {}
    }
    out
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// `[id, [field, value, …]]` → the entry; `None` for a deleted one (nil). An entry whose
/// fields cannot be read has no charges (logged).
fn parse_entry(shard: u64, v: &Value) -> Option<OutboxEntry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?.to_owned();
    let mut fields = std::collections::HashMap::new();
    match parts.get(1) {
        Some(Value::Array(kv)) => {
            for pair in kv.chunks(2) {
                if let [k, v] = pair
                    && let (Some(k), Some(v)) = (text(k), text(v))
                {
                    fields.insert(k, v);
                }
            }
        }
        Some(Value::Map(kv)) => {
            for (k, v) in kv {
                if let (Some(k), Some(v)) = (text(k), text(v)) {
                    fields.insert(k, v);
                }
            }
        }
        _ => {}
    }
    let charges = charges(shard, &fields).unwrap_or_else(|| {
        tracing::error!(shard, entry = %id, "an outbox entry that cannot be read: skipped");
        Vec::new()
    });
    Some(OutboxEntry { shard, id, charges })
}

type Row = (String, String, String, Option<u64>, Option<u64>, u64);

fn charges(
    shard: u64,
    fields: &std::collections::HashMap<&str, &str>,
) -> Option<Vec<SettledCharge>> {
    let reservation: u64 = fields.get("id")?.parse().ok()?;
    let rows: Vec<Row> = serde_json::from_str(fields.get("c")?).ok()?;
    let actual = *fields.get("a")?;
    let reaped = actual == "held";
    let amounts: Vec<u64> = if reaped {
        rows.iter().map(|r| r.5).collect()
    } else {
        serde_json::from_str(actual).ok()?
    };
    if amounts.len() != rows.len() {
        return None;
    }
    rows.into_iter()
        .zip(amounts)
        .map(|((counter, kind, unit, start, end, held), amount)| {
            let unit = match unit.as_str() {
                "t" => Unit::Tokens,
                "n" => Unit::Nanodollars,
                _ => return None,
            };
            let budget = kind == "f";
            Some(SettledCharge {
                shard,
                reservation,
                counter,
                unit,
                period_start: start.filter(|_| budget).map(Timestamp::from_unix_nanos),
                period_end: end.filter(|_| budget).map(Timestamp::from_unix_nanos),
                held,
                amount,
                reaped,
            })
        })
        .collect()
}
