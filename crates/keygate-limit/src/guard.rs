//! The denial-of-wallet guard: suspends a key whose token or spend rate jumps far past its
//! own recent baseline (or past an absolute ceiling).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keygate_core::{Alert, AlertKind, AlertSink, Clock, KeyId, Money, Timestamp};

/// A guard setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GuardConfigError {
    /// The window must be at least one second.
    #[error("the guard window must be at least one second")]
    WindowTooShort,
    /// The smoothing factor must be in (0, 1].
    #[error("the baseline smoothing factor must be in (0, 1]")]
    BadSmoothing,
}

/// A change of a key's suspension, for a [`SuspensionHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Suspension {
    /// The key was suspended.
    Suspended,
    /// The key was reinstated.
    Reinstated,
}

/// Where a host persists suspensions, for example by marking the key disabled in its key
/// store so that the suspension outlives the process and holds on every replica. Called once
/// per change, synchronously, on the request path that caused it: keep it quick (hand slow
/// work to a task). Implemented for closures `Fn(&KeyId, Suspension)`.
pub trait SuspensionHook: Send + Sync + 'static {
    /// `key_id`'s suspension changed.
    fn changed(&self, key_id: &KeyId, change: Suspension);
}

impl<F> SuspensionHook for F
where
    F: Fn(&KeyId, Suspension) + Send + Sync + 'static,
{
    fn changed(&self, key_id: &KeyId, change: Suspension) {
        self(key_id, change);
    }
}

/// The denial-of-wallet guard, shared by every clone (cheap to clone).
///
/// Usage is counted per key in windows of [`with_window`](WalletGuard::with_window) (default
/// one minute). Each finished window updates the key's baseline, an exponentially weighted
/// moving average (factor 0.2 by default). A key whose current window exceeds `multiple` ×
/// baseline (after `warmup` windows of history, and above a floor), or an absolute ceiling,
/// is suspended: the token layer answers it with 403 `key_suspended` until
/// [`reinstate`](WalletGuard::reinstate). Each suspension emits an [`Alert`] to the
/// configured [`AlertSink`] (for the audit layer), and calls the [`SuspensionHook`] where a
/// host persists it (see [`with_suspension_hook`](WalletGuard::with_suspension_hook)).
#[derive(Clone)]
pub struct WalletGuard {
    inner: Arc<Inner>,
}

struct Inner {
    /// Settings; builder methods change them in place, for every clone.
    settings: RwLock<Settings>,
    rates: Mutex<HashMap<KeyId, KeyRate>>,
    suspended: RwLock<HashSet<KeyId>>,
    suspended_count: AtomicUsize,
}

struct Settings {
    config: Config,
    sink: Option<Arc<dyn AlertSink>>,
    hook: Option<Arc<dyn SuspensionHook>>,
    clock: Clock,
}

#[derive(Debug, Clone)]
struct Config {
    window: u64,
    multiple: u32,
    smoothing: f64,
    warmup: u32,
    floor_tokens: u64,
    floor_spend: Money,
    ceiling_tokens: Option<u64>,
    ceiling_spend: Option<Money>,
}

#[derive(Debug, Clone, Copy)]
struct KeyRate {
    window_start: u64,
    tokens: u64,
    spend: u64,
    base_tokens: f64,
    base_spend: f64,
    windows: u32,
}

impl fmt::Debug for WalletGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalletGuard")
            .field("config", &read(&self.inner.settings).config)
            .field(
                "suspended",
                &self.inner.suspended_count.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Default for WalletGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl WalletGuard {
    /// A guard with defaults: one-minute windows, trip at 10× the baseline after 5 windows of
    /// history and above 10,000 tokens or $1 per window; no absolute ceiling; no sink.
    pub fn new() -> Self {
        WalletGuard {
            inner: Arc::new(Inner {
                settings: RwLock::new(Settings {
                    config: Config {
                        window: 60_000_000_000,
                        multiple: 10,
                        smoothing: 0.2,
                        warmup: 5,
                        floor_tokens: 10_000,
                        floor_spend: Money::from_dollars(1),
                        ceiling_tokens: None,
                        ceiling_spend: None,
                    },
                    sink: None,
                    hook: None,
                    clock: Clock::system(),
                }),
                rates: Mutex::default(),
                suspended: RwLock::default(),
                suspended_count: AtomicUsize::new(0),
            }),
        }
    }

    /// Builder methods change the shared guard in place, so a clone kept by the host (to
    /// call [`reinstate`](WalletGuard::reinstate)) sees the same settings and state.
    fn edit(self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut write(&self.inner.settings));
        self
    }

    /// The length of the short window.
    ///
    /// # Errors
    ///
    /// [`GuardConfigError::WindowTooShort`] under one second.
    pub fn with_window(self, window: Duration) -> Result<Self, GuardConfigError> {
        if window < Duration::from_secs(1) {
            return Err(GuardConfigError::WindowTooShort);
        }
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Ok(self.edit(|i| i.config.window = nanos))
    }

    /// How many times its baseline a key's window may reach before it is suspended.
    pub fn with_multiple(self, multiple: NonZeroU32) -> Self {
        self.edit(|i| i.config.multiple = multiple.get())
    }

    /// The baseline's smoothing factor (weight of the newest window).
    ///
    /// # Errors
    ///
    /// [`GuardConfigError::BadSmoothing`] outside (0, 1].
    pub fn with_smoothing(self, factor: f64) -> Result<Self, GuardConfigError> {
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(GuardConfigError::BadSmoothing);
        }
        Ok(self.edit(|i| i.config.smoothing = factor))
    }

    /// Windows of history a key needs before the relative check applies.
    pub fn with_warmup(self, windows: u32) -> Self {
        self.edit(|i| i.config.warmup = windows)
    }

    /// Below these amounts per window the relative check never trips.
    pub fn with_floor(self, tokens: u64, spend: Money) -> Self {
        self.edit(|i| {
            i.config.floor_tokens = tokens;
            i.config.floor_spend = spend;
        })
    }

    /// Absolute ceilings per window; a key past either is suspended whatever its history.
    pub fn with_ceiling(self, tokens: Option<u64>, spend: Option<Money>) -> Self {
        self.edit(|i| {
            i.config.ceiling_tokens = tokens;
            i.config.ceiling_spend = spend;
        })
    }

    /// Where alerts go (and where a host persists suspensions).
    pub fn with_alert_sink(self, sink: impl AlertSink) -> Self {
        let sink: Arc<dyn AlertSink> = Arc::new(sink);
        self.edit(|i| i.sink = Some(sink))
    }

    /// Where suspensions and reinstatements are persisted (for example: mark the key
    /// disabled in the key store).
    pub fn with_suspension_hook(self, hook: impl SuspensionHook) -> Self {
        let hook: Arc<dyn SuspensionHook> = Arc::new(hook);
        self.edit(|i| i.hook = Some(hook))
    }

    /// The clock.
    pub fn with_clock(self, clock: Clock) -> Self {
        self.edit(|i| i.clock = clock)
    }

    fn persist(&self, key_id: &KeyId, change: Suspension) {
        let hook = read(&self.inner.settings).hook.clone();
        if let Some(hook) = hook {
            hook.changed(key_id, change);
        }
    }

    /// Whether `key_id` is suspended.
    #[inline]
    pub fn is_suspended(&self, key_id: &str) -> bool {
        self.inner.suspended_count.load(Ordering::Acquire) > 0
            && read(&self.inner.suspended).contains(key_id)
    }

    /// Suspends `key_id` by hand (emits an alert).
    pub fn suspend(&self, key_id: &KeyId, project: &str, reason: &str, message: String) {
        let newly = write(&self.inner.suspended).insert(key_id.clone());
        if newly {
            self.inner.suspended_count.fetch_add(1, Ordering::AcqRel);
            self.persist(key_id, Suspension::Suspended);
            self.emit(AlertKind::KeySuspended, key_id, project, reason, message);
        }
    }

    /// Lifts a suspension; returns whether the key was suspended. Its rate history is cleared
    /// so that the spike does not become its baseline.
    pub fn reinstate(&self, key_id: &str) -> bool {
        let removed = write(&self.inner.suspended).take(key_id);
        let Some(id) = removed else { return false };
        self.inner.suspended_count.fetch_sub(1, Ordering::AcqRel);
        lock(&self.inner.rates).remove(key_id);
        self.persist(&id, Suspension::Reinstated);
        self.emit(
            AlertKind::KeyReinstated,
            &id,
            "",
            "reinstated",
            "The key was reinstated.".to_owned(),
        );
        true
    }

    fn emit(&self, kind: AlertKind, key_id: &KeyId, project: &str, reason: &str, message: String) {
        let (sink, now) = {
            let settings = read(&self.inner.settings);
            (settings.sink.clone(), settings.clock.now())
        };
        if let Some(sink) = sink {
            sink.alert(Alert {
                at: now,
                kind,
                key_id: key_id.clone(),
                project: project.to_owned(),
                reason: reason.to_owned(),
                message,
            });
        }
    }

    /// Counts a request's settled usage; suspends the key if it trips. Returns whether the key
    /// was suspended by this call.
    pub fn record(&self, key_id: &KeyId, project: &str, tokens: u64, spend: Money) -> bool {
        let (config, now) = {
            let settings = read(&self.inner.settings);
            (settings.config.clone(), settings.clock.now())
        };
        let trip = {
            let mut rates = lock(&self.inner.rates);
            if rates.len() >= 4096 && rates.len().is_power_of_two() {
                sweep_locked(&config, &mut rates, now);
            }
            let rate = rates.entry(key_id.clone()).or_insert(KeyRate {
                window_start: now.as_unix_nanos(),
                tokens: 0,
                spend: 0,
                base_tokens: 0.0,
                base_spend: 0.0,
                windows: 0,
            });
            roll(rate, &config, now.as_unix_nanos());
            rate.tokens = rate.tokens.saturating_add(tokens);
            rate.spend = rate.spend.saturating_add(spend.as_nanos());
            check(&config, rate)
        };
        match trip {
            Some((reason, message)) if !self.is_suspended(key_id.as_str()) => {
                self.suspend(key_id, project, reason, message);
                true
            }
            _ => false,
        }
    }
}

fn check(c: &Config, r: &KeyRate) -> Option<(&'static str, String)> {
    if c.ceiling_tokens.is_some_and(|max| r.tokens > max) {
        return Some((
            "token_ceiling",
            format!("{} tokens in one window", r.tokens),
        ));
    }
    if c.ceiling_spend.is_some_and(|max| r.spend > max.as_nanos()) {
        let spend = Money::from_nanos(r.spend);
        return Some(("spend_ceiling", format!("{spend} spent in one window")));
    }
    if r.windows < c.warmup {
        return None;
    }
    let multiple = f64::from(c.multiple);
    if r.tokens > c.floor_tokens && r.tokens as f64 > multiple * r.base_tokens {
        return Some((
            "token_spike",
            format!(
                "{} tokens in one window against a baseline of {:.0}",
                r.tokens, r.base_tokens
            ),
        ));
    }
    if r.spend > c.floor_spend.as_nanos() && r.spend as f64 > multiple * r.base_spend {
        let spend = Money::from_nanos(r.spend);
        let base = Money::from_nanos(r.base_spend as u64);
        return Some((
            "spend_spike",
            format!("{spend} spent in one window against a baseline of {base}"),
        ));
    }
    None
}

fn sweep_locked(c: &Config, rates: &mut HashMap<KeyId, KeyRate>, now: Timestamp) {
    // Keys idle for 100 windows have a baseline of ~0 anyway.
    let idle = c.window.saturating_mul(100);
    rates.retain(|_, r| now.as_unix_nanos().saturating_sub(r.window_start) < idle);
}

fn roll(r: &mut KeyRate, c: &Config, now: u64) {
    let passed = now.saturating_sub(r.window_start) / c.window;
    if passed == 0 {
        return;
    }
    let a = c.smoothing;
    r.base_tokens = a * r.tokens as f64 + (1.0 - a) * r.base_tokens;
    r.base_spend = a * r.spend as f64 + (1.0 - a) * r.base_spend;
    let empty = (passed - 1).min(1000) as i32;
    let decay = (1.0 - a).powi(empty);
    r.base_tokens *= decay;
    r.base_spend *= decay;
    r.windows = r
        .windows
        .saturating_add(u32::try_from(passed).unwrap_or(u32::MAX));
    r.tokens = 0;
    r.spend = 0;
    r.window_start += passed * c.window;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::ManualClock;

    fn setup() -> (ManualClock, WalletGuard, Arc<Mutex<Vec<Alert>>>) {
        let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let seen = alerts.clone();
        let guard = WalletGuard::new()
            .with_clock(manual.clock())
            .with_floor(1_000, Money::from_dollars(1))
            .with_alert_sink(move |a: Alert| seen.lock().unwrap().push(a));
        (manual, guard, alerts)
    }

    #[test]
    fn steady_load_is_not_suspended() {
        let (manual, guard, alerts) = setup();
        let key = KeyId::new("key_a");
        for _ in 0..120 {
            for _ in 0..10 {
                assert!(!guard.record(&key, "p", 500, Money::from_micros(100)));
            }
            manual.advance(Duration::from_secs(60));
        }
        assert!(!guard.is_suspended("key_a"));
        assert!(alerts.lock().unwrap().is_empty());
    }

    #[test]
    fn spike_suspends_alerts_and_reinstate_lifts_it() {
        let (manual, guard, alerts) = setup();
        let key = KeyId::new("key_a");
        for _ in 0..10 {
            guard.record(&key, "p", 500, Money::ZERO);
            manual.advance(Duration::from_secs(60));
        }
        let mut tripped = false;
        for _ in 0..20 {
            tripped |= guard.record(&key, "p", 500, Money::ZERO);
        }
        assert!(tripped);
        assert!(guard.is_suspended("key_a"));
        assert!(!guard.is_suspended("key_b"));
        {
            let alerts = alerts.lock().unwrap();
            assert_eq!(alerts.len(), 1);
            assert_eq!(alerts[0].kind, AlertKind::KeySuspended);
            assert_eq!(alerts[0].reason, "token_spike");
            assert_eq!(alerts[0].project, "p");
        }
        assert!(guard.reinstate("key_a"));
        assert!(!guard.is_suspended("key_a"));
        assert_eq!(alerts.lock().unwrap()[1].kind, AlertKind::KeyReinstated);
    }

    #[test]
    fn suspension_and_reinstatement_reach_the_persistence_hook_once() {
        let (_manual, guard, alerts) = setup();
        let persisted = Arc::new(Mutex::new(Vec::new()));
        let store = persisted.clone();
        let guard =
            guard
                .with_ceiling(Some(100), None)
                .with_suspension_hook(move |k: &KeyId, change| {
                    store.lock().unwrap().push((k.as_str().to_owned(), change))
                });
        let key = KeyId::new("key_h");
        for _ in 0..3 {
            guard.record(&key, "p", 101, Money::ZERO);
        }
        guard.reinstate("key_h");
        assert_eq!(
            persisted.lock().unwrap()[..],
            [
                ("key_h".to_owned(), Suspension::Suspended),
                ("key_h".to_owned(), Suspension::Reinstated)
            ]
        );
        assert_eq!(alerts.lock().unwrap().len(), 2);
    }

    #[test]
    fn absolute_ceiling_suspends_a_new_key() {
        let (_manual, guard, _) = setup();
        let guard = guard.with_ceiling(None, Some(Money::from_dollars(5)));
        let key = KeyId::new("key_new");
        assert!(!guard.record(&key, "p", 10, Money::from_dollars(5)));
        assert!(guard.record(&key, "p", 10, Money::from_nanos(1)));
    }

    #[test]
    fn a_clone_kept_by_the_host_shares_settings_and_state() {
        let host = WalletGuard::new();
        let in_layer = host.clone().with_ceiling(Some(10), None);
        assert!(in_layer.record(&KeyId::new("key_k"), "p", 11, Money::ZERO));
        assert!(host.is_suspended("key_k"));
        assert!(host.reinstate("key_k"));
        assert!(!in_layer.is_suspended("key_k"));
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert!(
            WalletGuard::new()
                .with_window(Duration::from_millis(10))
                .is_err()
        );
        assert!(WalletGuard::new().with_smoothing(0.0).is_err());
    }
}
