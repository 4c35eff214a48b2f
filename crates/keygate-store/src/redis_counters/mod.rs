//! [`RedisBackend`]: request rates, token rates and budget counters in Redis (one server or a
//! Redis Cluster), shared exactly by every gateway replica.

use std::future::Future;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keygate_core::Timestamp;
use keygate_limit::backend::{
    Actual, BackendError, Charge, CounterStatus, Exceeded, LimitBackend, Reservation, ReserveError,
    Reserved, Unit, Window,
};
use keygate_limit::rate_shared::{
    AcquireFuture, RateStatus, SharedCell, SharedOutcome, SharedRates,
};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

/// The counters' key prefix (`kg1:{sNN}:…`); the digit is the layout's version.
const PREFIX: &str = "kg1";

/// How many shards (hash tags) the counters are spread over. A request's counters are all in
/// the shard of its [group](Charge::group), so one script touches one slot of a cluster;
/// each shard has its own reservations, due times and outbox.
pub const SHARDS: u64 = 64;

/// The largest amount or limit Redis's scripts count exactly (Lua's numbers are doubles):
/// 2^53 − 1. A larger limit is counted as this one (a budget of more than about 9 million
/// dollars per period, or 9·10^15 tokens): never more is admitted than the limit given.
pub const MAX_EXACT: u64 = (1 << 53) - 1;

mod outbox;

pub use outbox::{LEDGER_GROUP, OutboxEntry, SettledCharge};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("script.lua")));
static RATES: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("rates.lua")));
/// Takes ARGV[2] off a budget counter whose period starts at ARGV[1] (never below zero);
/// answers what it took.
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local h = redis.call('HMGET', KEYS[1], 'u', 's') \
         if h[2] ~= ARGV[1] then return 0 end \
         local u = tonumber(h[1]) or 0 \
         local take = math.min(u, tonumber(ARGV[2])) \
         if take > 0 then redis.call('HSET', KEYS[1], 'u', string.format('%.0f', u - take)) end \
         return take",
    )
});

/// Where the counters live.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisTarget {
    /// One server: `redis://host:port/db`, `rediss://…`, or `redis+unix:///path`.
    Single(String),
    /// A Redis Cluster, reached through any of these nodes (`redis://host:port` each).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// One URL (a server), or several comma-separated (a cluster's nodes), as the
    /// `--counters` flags take them.
    pub fn from_list(list: &str) -> RedisTarget {
        let urls: Vec<String> = list.split(',').map(|u| u.trim().to_owned()).collect();
        match <[String; 1]>::try_from(urls) {
            Ok([url]) => RedisTarget::Single(url),
            Err(nodes) => RedisTarget::Cluster(nodes),
        }
    }
}

impl std::fmt::Debug for RedisTarget {
    /// Without passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(url) => f.debug_tuple("Single").field(&redacted(url)).finish(),
            RedisTarget::Cluster(urls) => f
                .debug_tuple("Cluster")
                .field(&urls.iter().map(|u| redacted(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// `url` with any password replaced by `***`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

/// How a [`RedisBackend`] calls Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long one attempt may take before it is given up (and retried with the same
    /// reservation id, which has no second effect). Default 500 ms.
    pub deadline: Duration,
    /// How many attempts a call makes before it fails (the layers then answer 503).
    /// Default 2.
    pub attempts: u32,
    /// How long a reservation may stay open: one not ended by then (its gateway died, or
    /// its request ran longer) is settled at its reserved amounts. Default 15 minutes.
    pub reservation_ttl: Duration,
    /// How long an ended reservation's id is remembered, so that a retried settle, release
    /// or reserve has no effect. Default 60 s (longer than every call's attempts).
    pub tombstone_ttl: Duration,
    /// Whether settled charges are appended to each shard's outbox stream
    /// (`kg1:{sNN}:out`) for a durable ledger to consume. Default off: turn it on only
    /// where a consumer drains the streams, or they grow without bound.
    pub outbox: bool,
    /// How long a settle or release keeps trying while Redis does not answer (it runs after
    /// the response, so nobody waits for it): from 100 ms apart, doubling up to 2 s. Past it,
    /// the reservation is left to be reaped at its reserved amounts. Default 30 s (kept
    /// under the tombstone's time, so a late retry still has no second effect).
    pub end_patience: Duration,
    /// Admit without counting when Redis does not answer (default off: a request that needs
    /// the counters gets 503). **Every limit is then unenforced for as long as Redis is
    /// down**; each request admitted so is counted ([`RedisBackend::failed_open`]).
    pub fail_open: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            deadline: Duration::from_millis(500),
            attempts: 2,
            reservation_ttl: Duration::from_secs(15 * 60),
            tombstone_ttl: Duration::from_secs(60),
            outbox: false,
            end_patience: Duration::from_secs(30),
            fail_open: false,
        }
    }
}

impl RedisOptions {
    /// With `deadline` per attempt.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// With `attempts` attempts per call (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// With reservations reaped after `ttl`.
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.reservation_ttl = ttl;
        self
    }

    /// With ended ids remembered for `ttl`.
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// With settles and releases retried for `patience` while Redis does not answer.
    pub fn end_patience(mut self, patience: Duration) -> Self {
        self.end_patience = patience;
        self
    }

    /// Admitting without counting while Redis does not answer (see
    /// [`RedisOptions::fail_open`]), or not.
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// With (or without) the outbox streams.
    pub fn outbox(mut self, outbox: bool) -> Self {
        self.outbox = outbox;
        self
    }
}

/// One connection to a server or to a cluster; both multiplex every caller's commands and
/// reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Token-rate and budget counters in Redis: the [`LimitBackend`] of gateway replicas that
/// share their limits exactly.
///
/// Each call is one atomic Lua script on the server, one round trip:
///
/// - **reserve** checks every charge against its counter (what it holds, plus the earlier
///   charges of the same call) and adds them all, or none; it records the reservation under
///   an id this process chose, with a due time. A retry of the same id (after a timeout, the
///   first attempt may have run) returns the first answer and changes nothing.
/// - **settle** / **release** replace the held amounts by the actual ones (or by nothing)
///   and mark the id ended (a tombstone, kept [`tombstone_ttl`](RedisOptions::tombstone_ttl)):
///   a second settle has no effect, nor has a late reserve of an id already ended.
/// - a reservation still open at its due time
///   ([`reservation_ttl`](RedisOptions::reservation_ttl)) is **reaped**: settled at its
///   reserved amounts (its request may have been forwarded and paid for). Every call reaps up
///   to four due ones of its shard; [`reap`](RedisBackend::reap) does all.
///
/// The clock of token rates is the server's (`TIME`), the same for every replica; budget
/// periods are the calendar periods the layers compute. Counters are integers, exact up to
/// [`MAX_EXACT`]. Every key one call touches has the hash tag of its shard (`{kg1:NN}`), so
/// each script runs on one node of a Redis Cluster. Counters expire once drained (rates) or
/// a day after their period ends by the caller's clock (budgets); lifetime budgets are kept.
///
/// Every attempt has a deadline ([`RedisOptions::deadline`]); a failed call is a
/// [`BackendError`] (the layers answer 503: fail closed).
///
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    options: RedisOptions,
    next_id: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    failed_open: AtomicU64,
    /// Whether this process made (or found) each shard's outbox consumer group.
    outbox_groups: Box<[std::sync::atomic::AtomicBool]>,
    /// Where a shard's budgets are rebuilt from when the server lost them.
    ledger: std::sync::OnceLock<Arc<dyn LedgerSource>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects (within the deadline) to `target`.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when the URL is not a Redis URL or no server answers.
    pub async fn connect(
        target: &RedisTarget,
        options: RedisOptions,
    ) -> Result<RedisBackend, BackendError> {
        let deadline = options.deadline;
        let connect = async {
            match target {
                RedisTarget::Single(url) => {
                    let client = redis::Client::open(url.as_str()).map_err(error)?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(deadline))
                        .set_response_timeout(Some(deadline))
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_with_config(client, config)
                        .await
                        .map(Conn::Single)
                        .map_err(error)
                }
                RedisTarget::Cluster(urls) => {
                    let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                        .connection_timeout(deadline)
                        .response_timeout(deadline)
                        .retries(2)
                        .build()
                        .map_err(error)?;
                    client
                        .get_async_connection()
                        .await
                        .map(Conn::Cluster)
                        .map_err(error)
                }
            }
        };
        let mut conn = tokio::time::timeout(deadline.saturating_mul(4), connect)
            .await
            .map_err(|_| BackendError(format!("redis: no answer within {deadline:?}").into()))??;
        // Loaded now, so that the first requests run it at once (a server that restarts
        // empty has it loaded again by the first call that misses it).
        for script in [&*SCRIPT, &*RATES] {
            tokio::time::timeout(deadline, script.load_async(&mut conn))
                .await
                .map_err(|_| BackendError(format!("redis: no answer within {deadline:?}").into()))?
                .map_err(error)?;
        }
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed)
            .map_err(|e| BackendError(format!("no randomness for reservation ids: {e}").into()))?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn,
                options,
                next_id: AtomicU64::new(u64::from_le_bytes(seed)),
                retries: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                failed_open: AtomicU64::new(0),
                outbox_groups: (0..SHARDS)
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect(),
                ledger: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Asks the server for a `PONG` within the deadline: whether the counters are reachable
    /// (for health checks).
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer.
    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.inner.conn.clone();
        let reply: String = self
            .inner
            .within(redis::cmd("PING").query_async(&mut conn))
            .await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(BackendError(
                format!("redis: PING answered {reply:?}").into(),
            ))
        }
    }

    /// How many attempts were retried (after a timeout or a lost connection).
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// How many calls failed after all their attempts.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// How many requests were admitted uncounted because Redis did not answer (only with
    /// [`RedisOptions::fail_open`]).
    pub fn failed_open(&self) -> u64 {
        self.inner.failed_open.load(Ordering::Relaxed)
    }

    /// Reaps every shard's due reservations (settling open ones at their reserved amounts);
    /// how many ids were due. Calls reap a few as they go; this is for idle periods.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer.
    pub async fn reap(&self) -> Result<u64, BackendError> {
        let mut total = 0;
        for shard in 0..SHARDS {
            loop {
                let keys = ShardKeys::new(shard);
                let mut invocation = SCRIPT.prepare_invoke();
                keys.add(&mut invocation);
                self.inner.common_args(&mut invocation, "reap", "0");
                invocation.arg(1000);
                let n: u64 = match self.inner.call(&invocation).await? {
                    Value::Int(n) => u64::try_from(n).unwrap_or(0),
                    other => return Err(unexpected(&other)),
                };
                total += n;
                if n < 1000 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Takes `amount` off the budget counter `key` of `group` in the period `window` (never
    /// below zero; another period, or a rate window, is left alone): how spend reset by an
    /// operator reaches every replica at once. What was taken.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer (the counter is then left as it was, or
    /// changed: the caller resets the ledger first, so either way nothing is overspent).
    pub async fn give_back(
        &self,
        group: u64,
        key: &str,
        window: Window,
        amount: u64,
    ) -> Result<u64, BackendError> {
        let Window::Fixed { start, .. } = window else {
            return Ok(0);
        };
        let mut invocation = GIVE_BACK.key(counter_key(group % SHARDS, key));
        invocation
            .arg(start.as_unix_nanos().to_string())
            .arg(amount.to_string());
        let mut conn = self.inner.conn.clone();
        self.inner.within(invocation.invoke_async(&mut conn)).await
    }

    /// What the counter `key` of `group` holds now in `window` (`None` when it holds nothing
    /// in that period). A rate counter's amount is as of its last change (not drained since).
    ///
    /// # Errors
    ///
    /// [`BackendError`] when Redis does not answer.
    pub async fn used(
        &self,
        group: u64,
        key: &str,
        window: Window,
    ) -> Result<Option<u64>, BackendError> {
        let shard = group % SHARDS;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(counter_key(shard, key)).arg("u").arg("s");
        let mut conn = self.inner.conn.clone();
        let (u, s): (Option<u64>, Option<String>) =
            self.inner.within(cmd.query_async(&mut conn)).await?;
        Ok(match window {
            Window::Fixed { start, .. } if s != Some(start.as_unix_nanos().to_string()) => None,
            _ => u.filter(|u| *u > 0),
        })
    }
}

/// The keys of one shard's bookkeeping.
struct ShardKeys {
    tag: String,
}

impl ShardKeys {
    fn new(shard: u64) -> ShardKeys {
        ShardKeys {
            tag: format!("{PREFIX}:{{{shard:02}}}"),
        }
    }

    fn add(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .key(format!("{}:res", self.tag))
            .key(format!("{}:due", self.tag))
            .key(format!("{}:out", self.tag))
            .key(format!("{}:ready", self.tag));
    }
}

fn counter_key(shard: u64, key: &str) -> String {
    format!("{PREFIX}:{{{shard:02}}}:c:{key}")
}

fn error(e: redis::RedisError) -> BackendError {
    BackendError(format!("redis: {e}").into())
}

fn unexpected(value: &Value) -> BackendError {
    BackendError(format!("redis: unexpected reply {value:?}").into())
}

/// Whether an attempt that failed so may be tried again (the server may not have seen it,
/// or may have: the ids make that harmless).
fn retriable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
}

/// How long a budget counter is kept after its period ends, for settlements arriving late.
const KEEP_AFTER_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// How the script sees a window at `now` (the caller's clock): its kind (`r` rate, `f`
/// budget period), then the drain period in microseconds (rate) or the period's start in
/// nanoseconds (budget), then how long to keep a budget counter in milliseconds (until a day
/// after its period, counted from now, so that a clock apart from the server's does not
/// expire it early; 0: for ever, or a rate).
fn shape(window: &Window, now: Timestamp) -> Result<(&'static str, u64, u64), BackendError> {
    match *window {
        Window::Rate { per } => Ok(("r", per_micros(per), 0)),
        Window::Fixed { start, end } => Ok((
            "f",
            start.as_unix_nanos(),
            end.map_or(0, |e| {
                let left =
                    Duration::from_nanos(e.as_unix_nanos().saturating_sub(now.as_unix_nanos()));
                duration_ms(left.saturating_add(KEEP_AFTER_PERIOD))
            }),
        )),
        _ => Err(BackendError(
            "redis: a window this backend does not know".into(),
        )),
    }
}

fn per_micros(per: Duration) -> u64 {
    u64::try_from(per.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// A charge as the outbox and a reaped reservation describe it: JSON
/// `[key, "r"|"f", "t"|"n", start_ns|null, end_ns|null, held]`.
fn describe<'a>(charges: impl Iterator<Item = (&'a str, &'a Window, Unit, u64)>) -> String {
    type Row<'a> = (
        &'a str,
        &'static str,
        &'static str,
        Option<u64>,
        Option<u64>,
        u64,
    );
    let rows: Vec<Row<'a>> = charges
        .map(|(key, window, unit, amount)| {
            let (kind, start, end) = match *window {
                Window::Fixed { start, end } => (
                    "f",
                    Some(start.as_unix_nanos()),
                    end.map(Timestamp::as_unix_nanos),
                ),
                _ => ("r", None, None),
            };
            let unit = match unit {
                Unit::Tokens => "t",
                _ => "n",
            };
            (key, kind, unit, start, end, amount)
        })
        .collect();
    // Strings, integers and nulls: serializing them cannot fail.
    serde_json::to_string(&rows).unwrap_or_default()
}

impl Inner {
    /// `op` within the deadline, once (for reads and commands that may be repeated): a
    /// timeout or a Redis error is a [`BackendError`].
    async fn within<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.within_raw(op).await?.map_err(error)
    }

    /// `op` within the deadline, its Redis error left to the caller.
    async fn within_raw<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>, BackendError> {
        tokio::time::timeout(self.options.deadline, op)
            .await
            .map_err(|_| {
                BackendError(format!("redis: no answer within {:?}", self.options.deadline).into())
            })
    }

    fn new_id(&self) -> u64 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    fn common_args(&self, invocation: &mut redis::ScriptInvocation<'_>, op: &str, id: &str) {
        invocation
            .arg(op)
            .arg(id)
            .arg(duration_ms(self.options.tombstone_ttl))
            .arg(if self.options.outbox { "1" } else { "0" })
            .arg(if self.ledger.get().is_some() {
                "1"
            } else {
                "0"
            });
    }

    /// Runs the script, retrying (the same invocation, so the same id) on a timeout or a
    /// lost connection.
    async fn call(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Value, BackendError> {
        let attempts = self.options.attempts.max(1);
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            let mut conn = self.conn.clone();
            match tokio::time::timeout(self.options.deadline, invocation.invoke_async(&mut conn))
                .await
            {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if retriable(&e) => last = format!("redis: {e}"),
                Ok(Err(e)) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(error(e));
                }
                Err(_) => {
                    last = format!("redis: no answer within {:?}", self.options.deadline);
                }
            }
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        Err(BackendError(format!("{last} ({attempts} attempts)").into()))
    }

    async fn reserve(
        self: &Arc<Self>,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> Result<Reservation, ReserveError> {
        if charges.is_empty() {
            return Ok(Reservation::default());
        }
        let charges: Vec<Charge> = charges
            .into_iter()
            .map(|mut c| {
                c.limit = c.limit.min(MAX_EXACT);
                c
            })
            .collect();
        let shard = charges[0].group % SHARDS;
        let id = self.new_id();
        let mut rebuilt = false;
        loop {
            match self.reserve_once(&charges, shard, id, now).await {
                Err(ReserveError::Backend(e)) if e.0.as_ref() == NOT_READY && !rebuilt => {
                    self.rebuild(shard, now).await?;
                    rebuilt = true;
                }
                Err(ReserveError::Backend(e)) => {
                    // It may have been made all the same (the answer was lost): released in
                    // the background, so it holds nothing (a late arrival of it then has no
                    // effect either).
                    self.release_failed(charges, id, now);
                    if self.options.fail_open {
                        self.note_failed_open(&e);
                        return Ok(Reservation::default());
                    }
                    return Err(ReserveError::Backend(e));
                }
                other => return other,
            }
        }
    }

    fn note_failed_open(&self, e: &BackendError) {
        if self.failed_open.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(error = %e, "Redis does not answer: admitting requests uncounted (fail_open is on)");
        }
    }

    /// Releases reservation `id` of `charges`, which a failed reserve may have made.
    fn release_failed(self: &Arc<Self>, charges: Vec<Charge>, id: u64, now: Timestamp) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let reservation = Reservation {
            charges: charges
                .into_iter()
                .map(|c| Reserved {
                    group: c.group,
                    key: c.key,
                    window: c.window,
                    unit: c.unit,
                    limit: c.limit,
                    amount: c.amount,
                })
                .collect(),
            tokens: None,
            id,
        };
        let inner = self.clone();
        runtime.spawn(async move {
            let _ = inner.end_patiently(reservation, None, now).await;
        });
    }

    async fn reserve_once(
        &self,
        charges: &[Charge],
        shard: u64,
        id: u64,
        now: Timestamp,
    ) -> Result<Reservation, ReserveError> {
        let id_text = id.to_string();
        let mut invocation = SCRIPT.prepare_invoke();
        ShardKeys::new(shard).add(&mut invocation);
        self.common_args(&mut invocation, "reserve", &id_text);
        invocation
            // 0 is allowed: due at once (reaped by the next call of its shard).
            .arg(u64::try_from(self.options.reservation_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(describe(
                charges
                    .iter()
                    .map(|c| (&*c.key, &c.window, c.unit, c.amount)),
            ))
            .arg(charges.len());
        for c in charges {
            invocation.key(counter_key(shard, &c.key));
            let (kind, p1, p2) = shape(&c.window, now)?;
            invocation
                .arg(kind)
                .arg(c.limit)
                .arg(c.amount)
                .arg(p1)
                .arg(p2);
        }
        let reply = self.call(&invocation).await?;
        let Value::Array(items) = &reply else {
            return Err(unexpected(&reply).into());
        };
        match items.as_slice() {
            [Value::Int(1), Value::BulkString(text)] => {
                let text = std::str::from_utf8(text).map_err(|_| unexpected(&reply))?;
                let mut fields = text.split(' ');
                let mut tokens = None;
                let mut reserved = Vec::with_capacity(charges.len());
                for c in charges {
                    let used: u64 = fields
                        .next()
                        .and_then(|f| f.parse().ok())
                        .ok_or_else(|| unexpected(&reply))?;
                    let start = fields.next().ok_or_else(|| unexpected(&reply))?;
                    let window = match c.window {
                        Window::Fixed { end, .. } => Window::Fixed {
                            start: Timestamp::from_unix_nanos(
                                start.parse().map_err(|_| unexpected(&reply))?,
                            ),
                            end,
                        },
                        rate => rate,
                    };
                    if c.window.is_rate() && c.unit == Unit::Tokens {
                        CounterStatus::tightest(&mut tokens, c, used, now.as_unix_nanos());
                    }
                    reserved.push(Reserved {
                        group: c.group,
                        key: c.key.clone(),
                        window,
                        unit: c.unit,
                        limit: c.limit,
                        amount: c.amount,
                    });
                }
                Ok(Reservation {
                    charges: reserved,
                    tokens,
                    id,
                })
            }
            [Value::Int(0), Value::Int(index), Value::BulkString(used)] => {
                let index = usize::try_from(*index).map_err(|_| unexpected(&reply))?;
                let used: u64 = std::str::from_utf8(used)
                    .ok()
                    .and_then(|u| u.parse().ok())
                    .ok_or_else(|| unexpected(&reply))?;
                let charge = charges.get(index).ok_or_else(|| unexpected(&reply))?;
                Err(ReserveError::Exceeded(Exceeded::of(
                    index,
                    charge,
                    used,
                    now.as_unix_nanos(),
                )))
            }
            [Value::Int(-1)] => {
                Err(BackendError("redis: the reservation id was already ended".into()).into())
            }
            [Value::Int(-2)] => Err(BackendError(NOT_READY.into()).into()),
            _ => Err(unexpected(&reply).into()),
        }
    }

    /// Ends `reservation`, retrying (the same id: no second effect) while Redis does not
    /// answer, for [`RedisOptions::end_patience`].
    async fn end_patiently(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.end(&reservation, actual, now).await {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() + pause > self.options.end_patience => {
                    tracing::error!(error = %e, "a reservation could not be ended in Redis: it is reaped at its reserved amounts");
                    return Err(e);
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn end(
        &self,
        reservation: &Reservation,
        actual: Option<Actual>,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        if reservation.charges.is_empty() || reservation.id == 0 {
            return Ok(());
        }
        let charges = &reservation.charges;
        let shard = charges[0].group % SHARDS;
        let id_text = reservation.id.to_string();
        let mut invocation = SCRIPT.prepare_invoke();
        ShardKeys::new(shard).add(&mut invocation);
        self.common_args(&mut invocation, "end", &id_text);
        let news: Vec<u64> = charges
            .iter()
            .map(|r| actual.map_or(0, |a| a.amount(r.unit)))
            .collect();
        // A settlement's amounts (a release has none); its description for the outbox.
        let actuals = match actual {
            Some(_) => serde_json::to_string(&news).unwrap_or_default(),
            None => String::new(),
        };
        let description = match actual {
            Some(_) if self.options.outbox => describe(
                charges
                    .iter()
                    .map(|r| (&*r.key, &r.window, r.unit, r.amount)),
            ),
            _ => String::new(),
        };
        invocation.arg(description).arg(actuals).arg(charges.len());
        for (r, new) in charges.iter().zip(&news) {
            invocation.key(counter_key(shard, &r.key));
            let (kind, p1, p2) = shape(&r.window, now)?;
            invocation
                .arg(kind)
                .arg(r.limit.min(MAX_EXACT))
                .arg(r.amount)
                .arg(*new)
                .arg(p1)
                .arg(p2);
        }
        match self.call(&invocation).await? {
            Value::Int(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

/// What a reserve answers while its shard waits to be rebuilt from the ledger.
const NOT_READY: &str = "redis: the shard's budgets are not rebuilt from the ledger yet";

/// The most counters one rebuild call writes.
const REBUILD_CHUNK: usize = 256;

/// One budget window as the ledger sums it: what [`LedgerSource`] gives back for a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerWindow {
    /// The counter.
    pub counter: String,
    /// Its period's start.
    pub start: Timestamp,
    /// Its period's end (`None`: a lifetime budget).
    pub end: Option<Timestamp>,
    /// What the ledger holds for it.
    pub used: u64,
}

/// The boxed future of [`LedgerSource::windows`].
pub type WindowsFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Vec<LedgerWindow>, BackendError>> + Send>>;

/// Where a [`RedisBackend`] rebuilds a shard's budgets from when Redis lost them (it
/// restarted empty): the ledger ([`PgDb`](crate::PgDb) is one).
pub trait LedgerSource: Send + Sync + 'static {
    /// Every budget window of `shard` whose period has not ended at `now`, summed.
    fn windows(&self, shard: u64, now: Timestamp) -> WindowsFuture;
}

impl RedisBackend {
    /// Rebuilds budgets from `ledger` whenever Redis has lost them: each shard carries a
    /// marker set once it was rebuilt, and a reservation in a shard without one (a server
    /// that restarted empty, or the first start) first brings every budget window of that
    /// shard up to what the ledger holds, then goes on. A counter is never lowered. Set it
    /// once, before the first request (a second call is ignored).
    pub fn rebuild_from(&self, ledger: Arc<dyn LedgerSource>) {
        let _ = self.inner.ledger.set(ledger);
    }
}

impl Inner {
    /// Brings `shard`'s budget counters up to the ledger's sums and sets its marker.
    async fn rebuild(&self, shard: u64, now: Timestamp) -> Result<(), BackendError> {
        let Some(ledger) = self.ledger.get() else {
            return Err(BackendError(NOT_READY.into()));
        };
        let mut windows = ledger.windows(shard, now).await?;
        windows.sort_by_key(|w| w.start);
        let chunks: Vec<&[LedgerWindow]> = if windows.is_empty() {
            vec![&[]]
        } else {
            windows.chunks(REBUILD_CHUNK).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut invocation = SCRIPT.prepare_invoke();
            ShardKeys::new(shard).add(&mut invocation);
            self.common_args(&mut invocation, "rebuild", "0");
            invocation
                .arg(chunk.len())
                .arg(if i == last { "1" } else { "0" });
            for w in chunk {
                invocation.key(counter_key(shard, &w.counter));
                let window = Window::Fixed {
                    start: w.start,
                    end: w.end,
                };
                let (_, start, keep) = shape(&window, now)?;
                invocation.arg(start).arg(w.used.min(MAX_EXACT)).arg(keep);
            }
            match self.call(&invocation).await? {
                Value::Int(_) => {}
                other => return Err(unexpected(&other)),
            }
        }
        tracing::warn!(
            shard,
            windows = windows.len(),
            "the shared counters had lost a shard's budgets: rebuilt from the ledger"
        );
        Ok(())
    }

    async fn acquire(
        &self,
        group: u64,
        cells: Vec<SharedCell>,
    ) -> Result<SharedOutcome, BackendError> {
        if cells.is_empty() {
            return Ok(SharedOutcome::Allowed(None));
        }
        let shard = group % SHARDS;
        let mut invocation = RATES.prepare_invoke();
        for c in &cells {
            invocation
                .key(format!("{PREFIX}:{{{shard:02}}}:q:{}", c.name))
                .arg(rate_interval_us(c.per_minute.get()))
                .arg(c.per_minute.get());
        }
        let reply = self.call(&invocation).await?;
        let Value::Array(items) = &reply else {
            return Err(unexpected(&reply));
        };
        let int = |v: &Value| match v {
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        let fields: Option<Vec<u64>> = items.iter().map(int).collect();
        let Some([ok, cell, a, b]) = fields.as_deref().and_then(|f| <[u64; 4]>::try_from(f).ok())
        else {
            return Err(unexpected(&reply));
        };
        // Cells are numbered from 1 in the script.
        let index = usize::try_from(cell)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .filter(|&i| i < cells.len())
            .ok_or_else(|| unexpected(&reply))?;
        let limit = cells[index].per_minute.get();
        Ok(if ok == 1 {
            SharedOutcome::Allowed(Some(RateStatus {
                limit,
                remaining: a,
                reset: Duration::from_micros(b),
            }))
        } else {
            SharedOutcome::Limited {
                index,
                status: RateStatus {
                    limit,
                    remaining: 0,
                    reset: Duration::from_micros(a),
                },
                retry_after: Duration::from_micros(b),
            }
        })
    }
}

/// The GCRA emission interval of `per_minute`, in whole microseconds (at least 1): a burst
/// admits exactly `per_minute` requests; a sustained rate above a million a second is
/// counted as a million.
fn rate_interval_us(per_minute: u32) -> u64 {
    (60_000_000 / u64::from(per_minute.max(1))).max(1)
}

/// Request rates (GCRA, as a Lua script on the server's clock), shared by every replica on
/// the same Redis. A request's cells all carry its shard's hash tag (cluster-safe) and are
/// taken in one atomic call, or none is. A retried call after a timeout may count one request
/// twice: it never admits more than the limit.
impl SharedRates for RedisBackend {
    fn acquire(&self, group: u64, cells: Vec<SharedCell>) -> AcquireFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.acquire(group, cells).await {
                Err(e) if inner.options.fail_open => {
                    inner.note_failed_open(&e);
                    Ok(SharedOutcome::Allowed(None))
                }
                other => other,
            }
        })
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl LimitBackend for RedisBackend {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        let inner = self.inner.clone();
        async move { inner.reserve(charges, now).await }
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let inner = self.inner.clone();
        async move { inner.end_patiently(reservation, Some(actual), now).await }
    }

    fn release(
        &self,
        reservation: Reservation,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let inner = self.inner.clone();
        async move { inner.end_patiently(reservation, None, now).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_a_cluster_and_one_url_a_server() {
        assert_eq!(
            RedisTarget::from_list("redis://a:1"),
            RedisTarget::Single("redis://a:1".into())
        );
        assert_eq!(
            RedisTarget::from_list("redis://a:1, redis://b:2"),
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redacted("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redacted("redis://:hunter2@host"), "redis://:***@host");
        assert_eq!(
            redacted("redis+unix:///run/r.sock"),
            "redis+unix:///run/r.sock"
        );
        let debug = format!(
            "{:?}",
            RedisTarget::Cluster(vec!["redis://a:secret@h:1".into()])
        );
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn every_key_of_a_shard_has_its_hash_tag() {
        let tag = |k: &str| {
            let open = k.find('{').unwrap();
            let close = k[open..].find('}').unwrap() + open;
            k[open + 1..close].to_owned()
        };
        assert_eq!(tag(&counter_key(7, "budget:{x}:y")), "07");
        assert_eq!(tag(&format!("{}:res", ShardKeys::new(7).tag)), "07");
        assert_ne!(tag(&counter_key(8, "a")), tag(&counter_key(7, "a")));
    }

    #[test]
    fn descriptions_keep_integers_exact() {
        let window = Window::Fixed {
            start: Timestamp::from_unix_nanos(1_700_000_000_123_456_789),
            end: None,
        };
        let text = describe([("k\"ey", &window, Unit::Nanodollars, u64::MAX)].into_iter());
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed[0][0], "k\"ey");
        assert_eq!(parsed[0][3].as_u64(), Some(1_700_000_000_123_456_789));
        assert_eq!(parsed[0][4], serde_json::Value::Null);
        assert_eq!(parsed[0][5].as_u64(), Some(u64::MAX));
    }
}
