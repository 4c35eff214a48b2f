//! [`RateLimitLayer`]: per-key (and per-project, per-token, per-model) request rates.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use keygate_core::{
    Clock, Credential, Denial, LimitScope, Principal, RequestFacts, ResponseBody,
    ResponseFuture as CoreFuture, Stage,
};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::rate_shared::{SharedOutcome, SharedRates};

const SHARDS: usize = 64;
const MINUTE: u64 = 60_000_000_000;

/// A rate limiter setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateConfigError {
    /// The entry cap must allow at least one entry per shard.
    #[error("max_entries must be at least {SHARDS}")]
    TooFewEntries,
}

/// Limits request rates per key, per project, per derived token and per model pattern, from
/// the limits the request's [`Principal`] carries (`requests_per_minute`).
///
/// Each (scope, owner, model pattern) has its own GCRA cell (an `AtomicU64` "theoretical
/// arrival time" updated by compare-and-swap, as governor does), with a burst of the whole
/// minute's quota. A request must fit every limit that applies; if one refuses, the cells
/// already advanced are given back. State is shared by every clone of the layer and service.
///
/// Answers:
/// - 429 `rate_limit_exceeded` with `Retry-After` (whole seconds, rounded up, at least 1) and
///   `retry-after-ms` when a limit is reached;
/// - `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and
///   `x-ratelimit-reset-requests` (OpenAI format: `1s`, `6m0s`) for the tightest limit, on
///   allowed and refused responses;
/// - 401 when no [`Principal`] is in the request (the extraction layer is missing: fail
///   closed);
/// - 503 when the limiter is full of active entries (see [`with_max_entries`]).
///
/// Memory: one 16-byte cell per active (scope, owner, model pattern), a few dozen bytes with
/// the hash table's overhead (see the crate benches). Cells back at full capacity hold no
/// information and are swept as shards grow; [`RateLimitLayer::sweep`] sweeps everything.
///
/// [`with_max_entries`]: RateLimitLayer::with_max_entries
#[must_use]
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    state: Arc<RateState>,
}

#[derive(Debug)]
struct RateState {
    shards: Box<[RwLock<Shard>]>,
    /// The SipHash key of cell ids: random by default; a host that persists cells across
    /// restarts ([`RateLimitLayer::cells`]) keeps it with them, so ids stay the same.
    hash_key: [u8; 16],
    /// Until then (unix nanoseconds), a cell made for the first time starts full: after an
    /// unclean restart, what was used in the last minute is not known, so assume all of it.
    cold_until: u64,
    clock: Clock,
    max_entries: usize,
    entries: AtomicUsize,
    headers: bool,
    /// When set, rates are counted there (shared by replicas) instead of in `shards`.
    shared: Option<Arc<dyn SharedRates>>,
}

/// Cells keyed by a keyed 64-bit hash of (scope, owner, model pattern): 16 bytes a cell, one
/// hash a lookup. With a random SipHash key nobody can aim for a collision; by chance, two of
/// a million cells share one with probability about 3·10⁻⁸ (they would then share a rate).
#[derive(Debug, Default)]
struct Shard {
    map: HashMap<u64, AtomicU64, BuildHasherDefault<IdHasher>>,
    sweep_at: usize,
}

/// The cell id is already a uniformly random hash.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

fn random_key() -> [u8; 16] {
    let mut key = [0u8; 16];
    if getrandom::fill(&mut key).is_err() {
        // No OS randomness here: std's per-process random hasher keys instead.
        use std::hash::BuildHasher;
        let r = std::hash::RandomState::new();
        key[..8].copy_from_slice(&r.hash_one(1u8).to_le_bytes());
        key[8..].copy_from_slice(&r.hash_one(2u8).to_le_bytes());
    }
    key
}

/// A fresh state with `s`'s hash key and cold start (builders keep them, whatever their order).
fn rebuilt(s: &RateState, clock: Clock, max_entries: usize, headers: bool) -> RateState {
    let mut state = new_state(clock, max_entries, headers);
    state.hash_key = s.hash_key;
    state.cold_until = s.cold_until;
    state.shared = s.shared.clone();
    state
}

fn new_state(clock: Clock, max_entries: usize, headers: bool) -> RateState {
    RateState {
        shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        hash_key: random_key(),
        cold_until: 0,
        clock,
        max_entries,
        entries: AtomicUsize::new(0),
        headers,
        shared: None,
    }
}

impl RateLimitLayer {
    /// A limiter with the system clock, at most 4 million active entries, and headers on.
    pub fn new() -> Self {
        RateLimitLayer {
            state: Arc::new(new_state(Clock::system(), 4_000_000, true)),
        }
    }

    /// The clock (fresh state).
    pub fn with_clock(self, clock: Clock) -> Self {
        let s = &self.state;
        RateLimitLayer {
            state: Arc::new(rebuilt(s, clock, s.max_entries, s.headers)),
        }
    }

    /// At most this many active entries (fresh state). When full of entries that still hold a
    /// rate, new keys are refused with 503 rather than letting an old key's limit be forgotten.
    ///
    /// # Errors
    ///
    /// [`RateConfigError::TooFewEntries`] below 64.
    pub fn with_max_entries(self, max: usize) -> Result<Self, RateConfigError> {
        if max < SHARDS {
            return Err(RateConfigError::TooFewEntries);
        }
        let s = &self.state;
        Ok(RateLimitLayer {
            state: Arc::new(rebuilt(s, s.clock.clone(), max, s.headers)),
        })
    }

    /// Whether to add `x-ratelimit-*-requests` headers to allowed responses (default on;
    /// fresh state).
    pub fn with_headers(self, on: bool) -> Self {
        let s = &self.state;
        RateLimitLayer {
            state: Arc::new(rebuilt(s, s.clock.clone(), s.max_entries, on)),
        }
    }

    /// Uses `key` for the SipHash of cell ids (fresh state), so the ids of
    /// [`cells`](Self::cells) saved by one process mean the same keys in the next.
    ///
    /// # Security
    ///
    /// The key is what keeps ids unguessable (nobody can aim two keys at one cell): keep it
    /// as secret as the store it is saved in, and random.
    pub fn with_hash_key(self, key: [u8; 16]) -> Self {
        let s = &self.state;
        let mut state = rebuilt(s, s.clock.clone(), s.max_entries, s.headers);
        state.hash_key = key;
        RateLimitLayer {
            state: Arc::new(state),
        }
    }

    /// Treats every cell made before `until` as full (fresh state): the conservative start
    /// after an unclean shutdown, when what was used in the last minute is unknown. Keys then
    /// get requests at their steady rate, one per interval, until the minute has passed.
    pub fn with_cold_start_until(self, until: keygate_core::Timestamp) -> Self {
        let s = &self.state;
        let mut state = rebuilt(s, s.clock.clone(), s.max_entries, s.headers);
        state.cold_until = until.as_unix_nanos();
        RateLimitLayer {
            state: Arc::new(state),
        }
    }

    /// Counts every rate in `store` instead of in this process (fresh state): replicas
    /// given the same store share each key's rate exactly. Each request with a rate then
    /// costs one call to the store (requests of keys without rates make none); a store that
    /// fails or does not answer in time gets the request a 503 with `Retry-After` (fail
    /// closed). The entry cap, cold start and saved cells are for the in-process cells and do
    /// not apply.
    pub fn with_shared(self, store: Arc<dyn SharedRates>) -> Self {
        let s = &self.state;
        let mut state = rebuilt(s, s.clock.clone(), s.max_entries, s.headers);
        state.shared = Some(store);
        RateLimitLayer {
            state: Arc::new(state),
        }
    }

    /// Whether rates are counted in a shared store.
    pub fn is_shared(&self) -> bool {
        self.state.shared.is_some()
    }

    /// The SipHash key of cell ids (to save with [`cells`](Self::cells)).
    pub fn hash_key(&self) -> [u8; 16] {
        self.state.hash_key
    }

    /// Every cell that still holds part of a rate: `(id, theoretical arrival time in unix
    /// nanoseconds)`, to save at shutdown and give back to [`restore`](Self::restore).
    pub fn cells(&self) -> Vec<(u64, u64)> {
        let now = self.state.clock.now().as_unix_nanos();
        let mut out = Vec::new();
        for shard in &self.state.shards {
            let s = read(shard);
            out.extend(
                s.map
                    .iter()
                    .map(|(id, tat)| (*id, tat.load(Ordering::Relaxed)))
                    .filter(|&(_, tat)| tat > now),
            );
        }
        out
    }

    /// Puts saved cells back (made with the same [`hash_key`](Self::hash_key)); a cell
    /// already present keeps the later of the two times. Beyond the entry limit, the rest is
    /// dropped.
    pub fn restore(&self, cells: impl IntoIterator<Item = (u64, u64)>) {
        let state = &self.state;
        for (id, tat) in cells {
            let mut s = write(state.shard(id));
            match s.map.get(&id) {
                Some(cell) => {
                    cell.fetch_max(tat, Ordering::AcqRel);
                }
                None => {
                    if state.entries.load(Ordering::Relaxed) >= state.max_entries {
                        return;
                    }
                    s.map.insert(id, AtomicU64::new(tat));
                    state.entries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops every entry back at full capacity.
    pub fn sweep(&self) {
        self.state.sweep_all(self.state.clock.now().as_unix_nanos());
    }

    /// The bytes the cells' hash tables hold (capacity × 17 bytes: a 16-byte cell and a
    /// control byte), for metrics.
    pub fn memory_bytes(&self) -> usize {
        self.state
            .shards
            .iter()
            .map(|s| table_bytes(read(s).map.capacity(), 16))
            .sum()
    }

    /// How many cells are held.
    pub fn len(&self) -> usize {
        self.state.entries.load(Ordering::Relaxed)
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    state: Arc<RateState>,
}

impl<S> RateLimit<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The state of the tightest limit after a request, for headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    limit: u32,
    remaining: u64,
    reset: u64,
}

enum Outcome {
    Allowed(Option<Status>),
    Limited(Status, u64, LimitScope),
    Full,
}

impl RateState {
    fn sweep_all(&self, now: u64) {
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            let before = shard.map.len();
            shard.map.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
            let removed = before - shard.map.len();
            self.entries.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    fn check(&self, principal: &Principal, model: Option<&str>) -> Outcome {
        let now = self.clock.now().as_unix_nanos();
        let mut tightest: Option<Status> = None;
        // Cells advanced so far, to give back if a later one refuses.
        let mut taken: [(u64, u64); 8] = [(0, 0); 8];
        let mut n_taken = 0;
        let mut more_taken: Vec<(u64, u64)> = Vec::new();
        let mut outcome = None;
        'scopes: for (scope, limits) in principal.limits() {
            let owner = owner(principal, scope);
            let global = limits.requests_per_minute.map(|rpm| (None, rpm));
            let per_model = model.into_iter().flat_map(|m| {
                limits
                    .for_model(m)
                    .filter_map(|(p, l)| l.requests_per_minute.map(|rpm| (Some(p), rpm)))
            });
            for (pattern, rpm) in global.into_iter().chain(per_model) {
                let interval = MINUTE / u64::from(rpm.get());
                let id = self.cell_id(scope, owner, pattern);
                match self.acquire(id, interval, rpm.get(), now) {
                    Some(Ok(status)) => {
                        if n_taken < taken.len() {
                            taken[n_taken] = (id, interval);
                            n_taken += 1;
                        } else {
                            more_taken.push((id, interval));
                        }
                        if tightest.is_none_or(|t| status.remaining < t.remaining) {
                            tightest = Some(status);
                        }
                    }
                    Some(Err((status, wait))) => {
                        outcome = Some(Outcome::Limited(status, wait, scope));
                        break 'scopes;
                    }
                    None => {
                        outcome = Some(Outcome::Full);
                        break 'scopes;
                    }
                }
            }
        }
        match outcome {
            None => Outcome::Allowed(tightest),
            Some(refused) => {
                for &(id, interval) in taken[..n_taken].iter().chain(&more_taken) {
                    self.give_back(id, interval);
                }
                refused
            }
        }
    }

    fn cell_id(&self, scope: LimitScope, owner: &str, pattern: Option<&str>) -> u64 {
        let scope: u8 = match scope {
            LimitScope::Key => 0,
            LimitScope::Project => 1,
            LimitScope::Token => 2,
        };
        // Written byte by byte, not through `Hash`, so an id is the same in every build.
        let mut h = siphasher::sip::SipHasher13::new_with_key(&self.hash_key);
        h.write_u8(scope);
        h.write(owner.as_bytes());
        h.write_u8(0xff);
        match pattern {
            Some(p) => {
                h.write_u8(1);
                h.write(p.as_bytes());
            }
            None => h.write_u8(0),
        }
        h.finish()
    }

    fn shard(&self, id: u64) -> &RwLock<Shard> {
        // Middle bits: the map itself uses the low bits (bucket) and the top 7 (tag).
        &self.shards[((id >> 32) as usize) % SHARDS]
    }

    /// `None`: the limiter is full.
    fn acquire(
        &self,
        id: u64,
        interval: u64,
        rpm: u32,
        now: u64,
    ) -> Option<Result<Status, (Status, u64)>> {
        let shard = self.shard(id);
        {
            let s = read(shard);
            if let Some(cell) = s.map.get(&id) {
                return Some(gcra(cell, now, interval, rpm));
            }
        }
        if self.entries.load(Ordering::Relaxed) >= self.max_entries {
            // Full: sweep every shard (one lock at a time, none held here).
            self.sweep_all(now);
            if self.entries.load(Ordering::Relaxed) >= self.max_entries {
                return None;
            }
        }
        let mut s = write(shard);
        if !s.map.contains_key(&id) {
            if s.map.len() >= s.sweep_at.max(64) {
                let before = s.map.len();
                s.map.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
                self.entries
                    .fetch_sub(before - s.map.len(), Ordering::Relaxed);
                s.sweep_at = s.map.len().saturating_mul(2);
            }
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        let cold = now < self.cold_until;
        let cell = s.map.entry(id).or_insert_with(|| {
            // Cold start: full, so it admits at the steady rate until it drains.
            AtomicU64::new(if cold { now + MINUTE } else { 0 })
        });
        Some(gcra(cell, now, interval, rpm))
    }

    fn give_back(&self, id: u64, interval: u64) {
        let s = read(self.shard(id));
        if let Some(cell) = s.map.get(&id) {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(interval))
            });
        }
    }
}

/// GCRA with a burst of the whole quota: admitted if, after adding one emission interval,
/// the theoretical arrival time is at most one minute (`rpm` intervals) ahead of now.
fn gcra(tat: &AtomicU64, now: u64, interval: u64, rpm: u32) -> Result<Status, (Status, u64)> {
    let cap = interval * u64::from(rpm);
    let mut old = tat.load(Ordering::Acquire);
    loop {
        let new = old.max(now) + interval;
        let ahead = new - now;
        if ahead > cap {
            let current = old.max(now) - now;
            let status = Status {
                limit: rpm,
                remaining: 0,
                reset: current,
            };
            return Err((status, ahead - cap));
        }
        match tat.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                return Ok(Status {
                    limit: rpm,
                    remaining: (cap - ahead) / interval,
                    reset: ahead,
                });
            }
            Err(seen) => old = seen,
        }
    }
}

/// Whose counter a scope's limits use. A derived token's own limits are counted per token id
/// (its `jti`); other credentials count them under the key id.
pub(crate) fn owner(principal: &Principal, scope: LimitScope) -> &str {
    match scope {
        LimitScope::Key => principal.key_id().as_str(),
        LimitScope::Project => principal.project().id.as_str(),
        LimitScope::Token => match principal.credential() {
            Credential::Token { id, .. } => id,
            _ => principal.key_id().as_str(),
        },
    }
}

pub(crate) fn scope_name(scope: LimitScope) -> &'static str {
    match scope {
        LimitScope::Key => "key",
        LimitScope::Project => "project",
        LimitScope::Token => "token",
    }
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1.5s`,
/// `6m0s`, `1h2m3s`.
#[cfg(test)]
fn openai_duration(nanos: u64) -> String {
    let mut buf = [0u8; 40];
    let n = write_duration(&mut buf, nanos);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The header value of [`openai_duration`]: sub-second values (whole milliseconds, the
/// common case of a key well under its rate) are made once and shared; others are formatted
/// on the stack (one allocation).
pub(crate) fn duration_header(nanos: u64) -> Option<HeaderValue> {
    static MILLIS: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    if nanos < 1_000_000_000 {
        let millis =
            MILLIS.get_or_init(|| static_values((0..=1000u64).map(|ms| format!("{ms}ms"))));
        return millis.get(nanos.div_ceil(1_000_000) as usize).cloned();
    }
    let mut buf = [0u8; 40];
    let n = write_duration(&mut buf, nanos);
    HeaderValue::from_bytes(&buf[..n]).ok()
}

fn write_duration(buf: &mut [u8; 40], nanos: u64) -> usize {
    use std::io::Write;
    let mut w = &mut buf[..];
    let _ = if nanos < 1_000_000_000 {
        write!(w, "{}ms", nanos.div_ceil(1_000_000))
    } else {
        let ms = nanos.div_ceil(1_000_000);
        let secs = ms / 1000;
        if secs < 60 {
            let frac = ms % 1000;
            match (frac % 10, frac % 100) {
                _ if frac == 0 => write!(w, "{secs}s"),
                (_, 0) => write!(w, "{secs}.{}s", frac / 100),
                (0, _) => write!(w, "{secs}.{:02}s", frac / 10),
                _ => write!(w, "{secs}.{frac:03}s"),
            }
        } else {
            let secs = nanos.div_ceil(1_000_000_000);
            let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
            if h > 0 {
                write!(w, "{h}h{m}m{s}s")
            } else {
                write!(w, "{m}m{s}s")
            }
        }
    };
    40 - w.len()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn missing_principal(stage: Stage) -> Denial {
    Denial::new(
        stage,
        StatusCode::UNAUTHORIZED,
        "missing_api_key",
        "No authenticated API key reached the limit layer.",
    )
    .with_detail("no_principal")
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// The heap bytes of a hashbrown table of `capacity` with `entry`-byte entries.
pub(crate) fn table_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

/// Header values over one string leaked once per process (a few kilobytes): a clone or drop
/// of a static value is a plain copy, where a shared one costs two atomic operations.
fn static_values(values: impl Iterator<Item = String>) -> Box<[HeaderValue]> {
    let values: Vec<String> = values.collect();
    let all: &'static str = Box::leak(values.concat().into_boxed_str());
    let mut at = 0;
    values
        .iter()
        .map(|v| {
            let text = &all[at..at + v.len()];
            at += v.len();
            HeaderValue::from_static(text)
        })
        .collect()
}

/// A header value for a number; small ones are made once and shared.
pub(crate) fn num_header(n: u64) -> HeaderValue {
    static SMALL: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    let small = SMALL.get_or_init(|| static_values((0..1024u64).map(|n| n.to_string())));
    match usize::try_from(n).ok().and_then(|i| small.get(i)) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

/// The header value of a limit: like [`num_header`], and larger ones are kept in a small
/// per-thread cache (a key's limit is the same on every response; formatting a new value
/// costs an allocation).
pub(crate) fn limit_header(n: u64) -> HeaderValue {
    const SLOTS: usize = 32;
    thread_local! {
        static RECENT: std::cell::RefCell<[Option<(u64, HeaderValue)>; SLOTS]> =
            const { std::cell::RefCell::new([const { None }; SLOTS]) };
    }
    if n < 1024 {
        return num_header(n);
    }
    let slot = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize % SLOTS;
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        match &recent[slot] {
            Some((cached, value)) if *cached == n => value.clone(),
            _ => {
                let value = HeaderValue::from(n);
                recent[slot] = Some((n, value.clone()));
                value
            }
        }
    })
}

fn put_headers(headers: &mut HeaderMap, status: Status) {
    // One growth of the map instead of up to three.
    headers.reserve(3);
    headers.insert(
        LIMIT_REQUESTS.clone(),
        limit_header(u64::from(status.limit)),
    );
    headers.insert(REMAINING_REQUESTS.clone(), num_header(status.remaining));
    if let Some(v) = duration_header(status.reset) {
        headers.insert(RESET_REQUESTS.clone(), v);
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(principal) = req.extensions().get::<Principal>() else {
            return ResponseFuture::new(
                CoreFuture::denied(missing_principal(Stage::RateLimit), req.headers()),
                None,
            );
        };
        let model = req
            .extensions()
            .get::<RequestFacts>()
            .and_then(RequestFacts::model);
        if let Some(store) = &self.state.shared {
            let cells = crate::rate_shared::cells(principal, model);
            if cells.is_empty() {
                return ResponseFuture::new(CoreFuture::inner(self.inner.call(req)), None);
            }
            let group = crate::backend::group_of(principal.project().id.as_str());
            let scopes: smallvec::SmallVec<[LimitScope; 4]> =
                cells.iter().map(|c| c.scope).collect();
            let acquire = store.acquire(group, cells);
            // The service that was polled ready goes with the request; a clone stays.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let headers = self.state.headers;
            return ResponseFuture::checking(Box::pin(async move {
                match acquire.await {
                    Ok(SharedOutcome::Allowed(status)) => (
                        CoreFuture::inner(inner.call(req)),
                        status.filter(|_| headers).map(Status::from),
                    ),
                    Ok(SharedOutcome::Limited {
                        index,
                        status,
                        retry_after,
                    }) => {
                        let scope = scopes.get(index).copied().unwrap_or(LimitScope::Key);
                        let status = Status::from(status);
                        let denial = limited(status, retry_after, scope);
                        (CoreFuture::denied(denial, req.headers()), Some(status))
                    }
                    Err(error) => {
                        tracing::error!(%error, "the shared request-rate store failed: 503");
                        let denial =
                            Denial::unavailable(Stage::RateLimit, "rate_store_unavailable")
                                .with_retry_after(Duration::from_secs(1));
                        (CoreFuture::denied(denial, req.headers()), None)
                    }
                }
            }));
        }
        match self.state.check(principal, model) {
            Outcome::Allowed(status) => {
                let status = status.filter(|_| self.state.headers);
                ResponseFuture::new(CoreFuture::inner(self.inner.call(req)), status)
            }
            Outcome::Limited(status, wait, scope) => {
                let denial = limited(status, Duration::from_nanos(wait), scope);
                ResponseFuture::new(CoreFuture::denied(denial, req.headers()), Some(status))
            }
            Outcome::Full => ResponseFuture::new(
                CoreFuture::denied(
                    Denial::unavailable(Stage::RateLimit, "limiter_full"),
                    req.headers(),
                ),
                None,
            ),
        }
    }
}

impl From<crate::rate_shared::RateStatus> for Status {
    fn from(s: crate::rate_shared::RateStatus) -> Self {
        Status {
            limit: s.limit,
            remaining: s.remaining,
            reset: u64::try_from(s.reset.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// The 429 of a request over `scope`'s rate.
fn limited(status: Status, wait: Duration, scope: LimitScope) -> Denial {
    let message = format!(
        "Rate limit reached for requests per minute ({} limit: {}). Please try again later.",
        scope_name(scope),
        status.limit
    );
    Denial::new(
        Stage::RateLimit,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        message,
    )
    .with_detail(scope_name(scope))
    .with_retry_after(wait)
}

/// What a shared store's check hands on: the inner future (or the refusal) and the headers'
/// status.
type Checked<F> = (CoreFuture<F>, Option<Status>);

pin_project! {
    /// The future of [`RateLimit`]: the inner response (or the refusal) with rate headers;
    /// with a shared store, first the store's answer.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Checking {
            check: Pin<Box<dyn Future<Output = Checked<F>> + Send>>,
        },
        Running {
            #[pin]
            inner: CoreFuture<F>,
            status: Option<Status>,
        },
    }
}

impl<F> ResponseFuture<F> {
    fn new(inner: CoreFuture<F>, status: Option<Status>) -> Self {
        ResponseFuture {
            state: State::Running { inner, status },
        }
    }

    fn checking(check: Pin<Box<dyn Future<Output = Checked<F>> + Send>>) -> Self {
        ResponseFuture {
            state: State::Checking { check },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check } => {
                    let (inner, status) = std::task::ready!(check.as_mut().poll(cx));
                    this.state.set(State::Running { inner, status });
                }
                StateProj::Running { inner, status } => {
                    let mut result = std::task::ready!(inner.poll(cx));
                    if let (Ok(response), Some(status)) = (&mut result, status.take()) {
                        put_headers(response.headers_mut(), status);
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use keygate_core::{ManualClock, ModelLimits, RequestedModel, Timestamp};
    use std::num::NonZeroU32;
    use tower::{ServiceBuilder, ServiceExt};

    fn rpm(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[tokio::test]
    async fn requests_past_the_quota_get_429_with_retry_after_and_headers() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new().with_clock(manual.clock());
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        let p = principal_with(|k, _| k.requests_per_minute = rpm(3));
        for remaining in [2, 1, 0] {
            let res = svc.clone().oneshot(request(&p)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["x-ratelimit-limit-requests"], "3");
            assert_eq!(
                res.headers()["x-ratelimit-remaining-requests"],
                remaining.to_string().as_str()
            );
        }
        let res = svc.clone().oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["retry-after"], "20");
        assert_eq!(res.headers()["retry-after-ms"], "20000");
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(res.headers()["x-ratelimit-reset-requests"], "1m0s");
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "rate_limit_exceeded"
        );
        manual.advance(Duration::from_secs(20));
        let res = svc.clone().oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn saved_cells_restored_with_the_same_hash_key_keep_the_quota_used() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let p = principal_with(|k, _| k.requests_per_minute = rpm(3));
        let first = RateLimitLayer::new().with_clock(manual.clock());
        let svc = ServiceBuilder::new()
            .layer(first.clone())
            .service_fn(ok_handler);
        for _ in 0..2 {
            assert_eq!(
                svc.clone().oneshot(request(&p)).await.unwrap().status(),
                200
            );
        }
        let (key, cells) = (first.hash_key(), first.cells());
        assert_eq!(cells.len(), 1);

        // "Restarted": a new limiter with the saved key and cells has one request left.
        let second = RateLimitLayer::new()
            .with_clock(manual.clock())
            .with_hash_key(key);
        second.restore(cells.clone());
        let svc = ServiceBuilder::new().layer(second).service_fn(ok_handler);
        assert_eq!(
            svc.clone().oneshot(request(&p)).await.unwrap().status(),
            200
        );
        assert_eq!(
            svc.clone().oneshot(request(&p)).await.unwrap().status(),
            429
        );

        // Another key: the cells name other ids, and the quota starts whole.
        let other = RateLimitLayer::new().with_clock(manual.clock());
        other.restore(cells);
        let svc = ServiceBuilder::new().layer(other).service_fn(ok_handler);
        for _ in 0..3 {
            assert_eq!(
                svc.clone().oneshot(request(&p)).await.unwrap().status(),
                200
            );
        }
    }

    #[tokio::test]
    async fn a_cold_start_assumes_every_quota_used_for_one_minute() {
        let start = Timestamp::from_unix_secs(1_700_000_000);
        let manual = ManualClock::new(start);
        let layer = RateLimitLayer::new()
            .with_cold_start_until(start.saturating_add(Duration::from_secs(60)))
            .with_clock(manual.clock());
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        // 6 a minute: one every 10 s. Cold: nothing at once ...
        let p = principal_with(|k, _| k.requests_per_minute = rpm(6));
        assert_eq!(
            svc.clone().oneshot(request(&p)).await.unwrap().status(),
            429
        );
        // ... then the steady rate, as the assumed-full bucket drains.
        manual.advance(Duration::from_secs(10));
        assert_eq!(
            svc.clone().oneshot(request(&p)).await.unwrap().status(),
            200
        );
        assert_eq!(
            svc.clone().oneshot(request(&p)).await.unwrap().status(),
            429
        );
        // A key first seen after the cold minute starts whole.
        manual.advance(Duration::from_secs(60));
        let q = principal_named("key_b", "p1", |k, _| k.requests_per_minute = rpm(6));
        for _ in 0..6 {
            assert_eq!(
                svc.clone().oneshot(request(&q)).await.unwrap().status(),
                200
            );
        }
    }

    #[tokio::test]
    async fn sub_second_wait_rounds_retry_after_up_to_one_second() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new().with_clock(manual.clock());
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        // 120 a minute: one every 500 ms once the burst is spent.
        let p = principal_with(|k, _| k.requests_per_minute = rpm(120));
        for _ in 0..120 {
            let res = svc.clone().oneshot(request(&p)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        let res = svc.clone().oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(res.headers()["retry-after-ms"], "500");
        manual.advance(Duration::from_millis(499));
        let res = svc.clone().oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(res.headers()["retry-after-ms"], "1");
        manual.advance(Duration::from_millis(1));
        let res = svc.oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn each_key_has_its_own_quota_and_clones_share_state() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new().with_clock(manual.clock());
        let a = principal_named("key_a", "p1", |k, _| k.requests_per_minute = rpm(1));
        let b = principal_named("key_b", "p1", |k, _| k.requests_per_minute = rpm(2));
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(ok_handler);
        let other = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        assert_eq!(
            svc.clone().oneshot(request(&a)).await.unwrap().status(),
            200
        );
        assert_eq!(
            other.clone().oneshot(request(&a)).await.unwrap().status(),
            429
        );
        assert_eq!(
            svc.clone().oneshot(request(&b)).await.unwrap().status(),
            200
        );
        assert_eq!(
            svc.clone().oneshot(request(&b)).await.unwrap().status(),
            200
        );
        assert_eq!(
            svc.clone().oneshot(request(&b)).await.unwrap().status(),
            429
        );
    }

    #[tokio::test]
    async fn project_limit_binds_all_its_keys_and_refusal_gives_back_key_cells() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new().with_clock(manual.clock());
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        let a = principal_named("key_a", "p1", |k, p| {
            k.requests_per_minute = rpm(10);
            p.requests_per_minute = rpm(2);
        });
        let b = principal_named("key_b", "p1", |k, p| {
            k.requests_per_minute = rpm(10);
            p.requests_per_minute = rpm(2);
        });
        assert_eq!(
            svc.clone().oneshot(request(&a)).await.unwrap().status(),
            200
        );
        assert_eq!(
            svc.clone().oneshot(request(&b)).await.unwrap().status(),
            200
        );
        for _ in 0..5 {
            assert_eq!(
                svc.clone().oneshot(request(&a)).await.unwrap().status(),
                429
            );
        }
        // Key a's own cell was given back each time: 9 left.
        manual.advance(Duration::from_secs(60));
        let res = svc.clone().oneshot(request(&a)).await.unwrap();
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "1");
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "2");
    }

    #[tokio::test]
    async fn per_model_limit_applies_to_matching_models_only() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new().with_clock(manual.clock());
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        let p = principal_with(|k, _| {
            k.models.insert(
                "gpt-4*".into(),
                ModelLimits {
                    requests_per_minute: rpm(1),
                    tokens_per_minute: None,
                },
            );
        });
        let with_model = |m: &str| {
            let mut r = request(&p);
            let mut facts = RequestFacts::unrouted();
            facts.model = Some(RequestedModel::new(m));
            r.extensions_mut().insert(facts);
            r
        };
        assert_eq!(
            svc.clone()
                .oneshot(with_model("gpt-4o"))
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            svc.clone()
                .oneshot(with_model("gpt-4o"))
                .await
                .unwrap()
                .status(),
            429
        );
        assert_eq!(
            svc.clone()
                .oneshot(with_model("o1"))
                .await
                .unwrap()
                .status(),
            200
        );
    }

    #[tokio::test]
    async fn missing_principal_fails_closed() {
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new())
            .service_fn(ok_handler);
        let res = svc.oneshot(Request::new(empty())).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn idle_entries_are_swept_and_a_full_limiter_refuses_new_keys() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let layer = RateLimitLayer::new()
            .with_clock(manual.clock())
            .with_max_entries(64)
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(ok_handler);
        for i in 0..64 {
            let p = principal_named(&format!("key_{i}"), "p", |k, _| {
                k.requests_per_minute = rpm(5)
            });
            assert_eq!(
                svc.clone().oneshot(request(&p)).await.unwrap().status(),
                200
            );
        }
        assert_eq!(layer.len(), 64);
        let late = principal_named("key_late", "p", |k, _| k.requests_per_minute = rpm(5));
        assert_eq!(
            svc.clone().oneshot(request(&late)).await.unwrap().status(),
            503
        );
        manual.advance(Duration::from_secs(60));
        assert_eq!(
            svc.clone().oneshot(request(&late)).await.unwrap().status(),
            200
        );
        assert_eq!(layer.len(), 1);
        manual.advance(Duration::from_secs(60));
        layer.sweep();
        assert!(layer.is_empty());
    }

    #[test]
    fn durations_are_written_like_openai() {
        assert_eq!(openai_duration(20_000_000), "20ms");
        for nanos in [
            0,
            1,
            20_000_000,
            999_000_001,
            999_999_999,
            1_000_000_000,
            61_500_000_000,
        ] {
            let expected = openai_duration(nanos);
            assert_eq!(
                duration_header(nanos).unwrap(),
                expected.as_str(),
                "{nanos}"
            );
        }
        assert_eq!(openai_duration(999_999_999), "1000ms");
        assert_eq!(openai_duration(1_000_000_000), "1s");
        assert_eq!(openai_duration(1_500_000_000), "1.5s");
        assert_eq!(openai_duration(1_050_000_000), "1.05s");
        assert_eq!(openai_duration(1_005_000_000), "1.005s");
        assert_eq!(openai_duration(360_000_000_000), "6m0s");
        assert_eq!(openai_duration(3_723_000_000_000), "1h2m3s");
    }

    #[test]
    fn number_headers_are_the_decimal_value_shared_or_not() {
        for n in [0u64, 7, 600, 1023, 1024, 100_000, u64::MAX] {
            assert_eq!(num_header(n), n.to_string().as_str(), "{n}");
            // Twice: the second may come from the cache.
            assert_eq!(limit_header(n), n.to_string().as_str(), "{n}");
            assert_eq!(limit_header(n), n.to_string().as_str(), "{n}");
        }
        // Values sharing a cache slot replace each other, never answer for each other.
        for n in (1024..200_000u64).step_by(997) {
            assert_eq!(limit_header(n), n.to_string().as_str(), "{n}");
        }
        // Shared values are independent handles: dropping one leaves the next intact.
        drop(num_header(5));
        assert_eq!(num_header(5), "5");
        assert_eq!(duration_header(100_000_000).unwrap(), "100ms");
    }

    #[test]
    fn concurrent_requests_admit_exactly_the_quota() {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let state = Arc::new(new_state(manual.clock(), 1000, true));
        let p = principal_with(|k, _| k.requests_per_minute = rpm(100));
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        if matches!(state.check(&p, None), Outcome::Allowed(_)) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
    }

    /// A shared store in memory: counts per cell name, no drain (enough for a burst), or
    /// failing when `down`.
    #[derive(Debug, Default)]
    struct FakeShared {
        used: std::sync::Mutex<HashMap<String, u64>>,
        calls: AtomicUsize,
        groups: std::sync::Mutex<Vec<u64>>,
        down: std::sync::atomic::AtomicBool,
    }

    impl SharedRates for FakeShared {
        fn acquire(
            &self,
            group: u64,
            cells: Vec<crate::SharedCell>,
        ) -> crate::rate_shared::AcquireFuture {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.groups.lock().unwrap().push(group);
            if self.down.load(Ordering::Relaxed) {
                return Box::pin(async { Err(crate::backend::BackendError("down".into())) });
            }
            let mut used = self.used.lock().unwrap();
            let status = |c: &crate::SharedCell, u: u64| crate::rate_shared::RateStatus {
                limit: c.per_minute.get(),
                remaining: u64::from(c.per_minute.get()).saturating_sub(u),
                reset: Duration::from_secs(60),
            };
            for (index, c) in cells.iter().enumerate() {
                let u = used.get(&c.name).copied().unwrap_or(0);
                if u >= u64::from(c.per_minute.get()) {
                    let outcome = SharedOutcome::Limited {
                        index,
                        status: status(c, u),
                        retry_after: Duration::from_secs(7),
                    };
                    return Box::pin(async move { Ok(outcome) });
                }
            }
            let mut tightest: Option<crate::rate_shared::RateStatus> = None;
            for c in &cells {
                let u = used.entry(c.name.clone()).or_default();
                *u += 1;
                let st = status(c, *u);
                if tightest.is_none_or(|t| st.remaining < t.remaining) {
                    tightest = Some(st);
                }
            }
            Box::pin(async move { Ok(SharedOutcome::Allowed(tightest)) })
        }
    }

    #[tokio::test]
    async fn layers_with_one_shared_store_share_each_rate() {
        let shared = Arc::new(FakeShared::default());
        let replicas: Vec<_> = (0..3)
            .map(|_| {
                ServiceBuilder::new()
                    .layer(RateLimitLayer::new().with_shared(shared.clone()))
                    .service_fn(ok_handler)
            })
            .collect();
        let p = principal_with(|k, pr| {
            k.requests_per_minute = rpm(5);
            pr.requests_per_minute = rpm(100);
        });
        let mut statuses = Vec::new();
        for i in 0..9 {
            let res = replicas[i % 3].clone().oneshot(request(&p)).await.unwrap();
            statuses.push(res.status().as_u16());
            if i == 0 {
                assert_eq!(res.headers()["x-ratelimit-limit-requests"], "5");
                assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "4");
            }
            if i == 5 {
                assert_eq!(res.headers()["retry-after"], "7");
                assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
                let denial = res.extensions().get::<Denial>().unwrap();
                assert_eq!(denial.code(), "rate_limit_exceeded");
            }
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429]);
        // One call per request, all of the project's group; the project took only the five
        // admitted ones (a refused request takes nothing anywhere).
        assert_eq!(shared.calls.load(Ordering::Relaxed), 9);
        let group = crate::backend::group_of(p.project().id.as_str());
        assert!(shared.groups.lock().unwrap().iter().all(|&g| g == group));
        let used = shared.used.lock().unwrap();
        assert_eq!(
            used.values()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            1
        );
        assert!(used.values().all(|&u| u == 5));
    }

    #[tokio::test]
    async fn a_shared_store_is_not_asked_for_keys_without_rates() {
        let shared = Arc::new(FakeShared::default());
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new().with_shared(shared.clone()))
            .service_fn(ok_handler);
        let p = principal_with(|_, _| {});
        let res = svc.oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("x-ratelimit-limit-requests").is_none());
        assert_eq!(shared.calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_failing_shared_store_gets_503_with_retry_after_and_forwards_nothing() {
        let shared = Arc::new(FakeShared::default());
        shared.down.store(true, Ordering::Relaxed);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let seen = forwarded.clone();
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new().with_shared(shared.clone()))
            .service_fn(move |req: Request<http_body_util::Full<bytes::Bytes>>| {
                seen.fetch_add(1, Ordering::Relaxed);
                ok_handler(req)
            });
        let p = principal_with(|k, _| k.requests_per_minute = rpm(5));
        let res = svc.oneshot(request(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().detail(),
            Some("rate_store_unavailable")
        );
        assert_eq!(forwarded.load(Ordering::Relaxed), 0);
    }
}
