//! [`Keygate::builder`]: one builder for the whole stack, and the [`KeygateLayer`] it makes.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use keygate_audit::{Audit, AuditEvent, AuditLayer, AuditSink, Backpressure, TracingSink};
use keygate_core::{Clock, KeyFormat, KeyStore, NoTokens, SecretScanner, TokenVerifier};
use keygate_extract::{CredentialSource, KeyExtract, KeyExtractLayer};
use keygate_limit::{
    PriceTable, RateConfigError, RateLimit, RateLimitLayer, TokenLimit, TokenLimitLayer, Unpriced,
    WalletGuard,
};
use keygate_scope::{
    DEFAULT_BODY_LIMIT, ModelList, ModelListLayer, ObjectList, ObjectListLayer, Policy, RouteError,
    RouteSpec, RouteTable, Scope, ScopeLayer, TrustedProxies,
};
use tower_layer::Layer;

use crate::spend::SpendBackend;

/// The service a [`KeygateLayer`] wraps around `S`: audit → key extraction → scope → model-list
/// filter → request rate → token rate and budgets → object-list filter → `S`.
pub type KeygateService<S, K, T = NoTokens> =
    Audit<KeyExtract<Scope<ModelList<RateLimit<TokenLimit<ObjectList<S>, SpendBackend>>>>, K, T>>;

/// The OpenAI preset's route specs, with `model_required` off on routes that carry no model
/// (a caller with model rules can always list models or read its files).
pub(crate) fn openai_specs() -> Vec<RouteSpec> {
    let mut specs = RouteTable::openai_specs();
    for spec in &mut specs {
        if spec.model.is_empty() {
            spec.model_required = false;
        }
    }
    specs
}

/// [`RouteTable::openai`], built from [`openai_specs`].
pub(crate) fn openai_routes() -> RouteTable {
    routes_from(openai_specs()).unwrap_or_else(|_| RouteTable::openai())
}

/// A table from specs.
pub(crate) fn routes_from(specs: Vec<RouteSpec>) -> Result<RouteTable, RouteError> {
    specs
        .into_iter()
        .fold(RouteTable::builder(), |b, spec| b.spec(spec))
        .build()
}

/// The entry point: `Keygate::builder(store)`.
#[derive(Debug, Clone, Copy)]
pub struct Keygate;

impl Keygate {
    /// A builder for the full stack over `store`, with the defaults: the OpenAI route table
    /// ([`RouteTable::openai_specs`]; routes that carry no model never ask for one),
    /// the system clock, audit events to `tracing`, no prices (budgets refuse unpriced
    /// models), no tokens, the model-list filter on `GET /v1/models`.
    pub fn builder<K: KeyStore>(store: K) -> KeygateBuilder<K> {
        KeygateBuilder {
            store,
            verifier: NoTokens,
            clock: Clock::system(),
            routes: None,
            audit_sink: SharedSink::new(TracingSink::new()),
            backpressure: Backpressure::DropAndCount,
            metrics: true,
            key_metrics: false,
            accept_request_id: true,
            secret_scanner: SecretScanner::new(),
            prices: PriceTable::new(),
            unpriced: Unpriced::Deny,
            default_output_tokens: None,
            min_output_tokens: None,
            max_tokens_lowering: false,
            bytes_per_token: None,
            include_usage: true,
            key_format: KeyFormat::default(),
            sources: None,
            keep_credential_headers: false,
            trusted_proxies: TrustedProxies::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            count_tokens: true,
            policies: Vec::new(),
            objects: None,
            model_list_path: Some("/v1/models".to_owned()),
            rate_max_entries: None,
            rate_headers: true,
            guard: None,
            spend: None,
            rate_hash_key: None,
            rate_cold_until: None,
            shared_rates: None,
        }
    }
}

/// Why a [`KeygateLayer`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The credential sources are not usable (empty, a header listed twice, ...).
    #[error("credential sources: {0}")]
    CredentialSources(#[from] keygate_extract::ConfigError),
    /// The rate limiter setting cannot work.
    #[error("rate limit: {0}")]
    RateLimit(#[from] RateConfigError),
    /// The model-list path does not start with `/`.
    #[error("model list path must start with '/': {0:?}")]
    ModelListPath(String),
}

/// An [`AuditSink`] behind an `Arc`, so the layer's type does not depend on the sink's.
#[derive(Clone)]
pub struct SharedSink(Arc<dyn AuditSink>);

impl SharedSink {
    /// Shares `sink`.
    pub fn new(sink: impl AuditSink) -> Self {
        SharedSink(Arc::new(sink))
    }
}

impl fmt::Debug for SharedSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSink").finish_non_exhaustive()
    }
}

impl AuditSink for SharedSink {
    fn record(&self, event: &AuditEvent) {
        self.0.record(event);
    }

    fn record_owned(&self, event: AuditEvent) {
        self.0.record_owned(event);
    }

    fn can_accept(&self) -> bool {
        self.0.can_accept()
    }

    fn try_reserve(&self) -> bool {
        self.0.try_reserve()
    }

    fn record_reserved(&self, event: AuditEvent) {
        self.0.record_reserved(event);
    }

    fn release_reservation(&self) {
        self.0.release_reservation();
    }
}

type ScopeEdit = Box<dyn FnOnce(ScopeLayer) -> ScopeLayer + Send>;

/// Configures the whole keygate stack; [`KeygateBuilder::build`] checks it and makes a
/// [`KeygateLayer`]. Made by [`Keygate::builder`].
#[must_use]
pub struct KeygateBuilder<K, T = NoTokens> {
    store: K,
    verifier: T,
    clock: Clock,
    routes: Option<RouteTable>,
    audit_sink: SharedSink,
    backpressure: Backpressure,
    metrics: bool,
    key_metrics: bool,
    accept_request_id: bool,
    secret_scanner: SecretScanner,
    prices: PriceTable,
    unpriced: Unpriced,
    default_output_tokens: Option<u64>,
    min_output_tokens: Option<u64>,
    max_tokens_lowering: bool,
    bytes_per_token: Option<NonZeroU32>,
    include_usage: bool,
    key_format: KeyFormat,
    sources: Option<Vec<CredentialSource>>,
    keep_credential_headers: bool,
    trusted_proxies: TrustedProxies,
    body_limit: usize,
    count_tokens: bool,
    policies: Vec<ScopeEdit>,
    objects: Option<Arc<dyn keygate_core::ObjectRegistry>>,
    model_list_path: Option<String>,
    rate_max_entries: Option<usize>,
    rate_headers: bool,
    guard: Option<WalletGuard>,
    spend: Option<SpendBackend>,
    rate_hash_key: Option<[u8; 16]>,
    rate_cold_until: Option<keygate_core::Timestamp>,
    shared_rates: Option<Arc<dyn keygate_limit::SharedRates>>,
}

impl<K, T> fmt::Debug for KeygateBuilder<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeygateBuilder")
            .field("store", &std::any::type_name::<K>())
            .field("verifier", &std::any::type_name::<T>())
            .field("clock", &self.clock)
            .field("backpressure", &self.backpressure)
            .field("prices", &self.prices)
            .field("body_limit", &self.body_limit)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("model_list_path", &self.model_list_path)
            .finish_non_exhaustive()
    }
}

impl<K: KeyStore, T: TokenVerifier> KeygateBuilder<K, T> {
    /// The route table the scope layer checks requests against (default: the OpenAI preset,
    /// [`RouteTable::openai_specs`]).
    pub fn routes(mut self, routes: RouteTable) -> Self {
        self.routes = Some(routes);
        self
    }

    /// The clock every layer reads (default the system clock; tests inject a
    /// [`ManualClock`](keygate_core::ManualClock)).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Where audit events go (default [`TracingSink`]).
    pub fn audit_sink(mut self, sink: impl AuditSink) -> Self {
        self.audit_sink = SharedSink::new(sink);
        self
    }

    /// What happens when the audit sink cannot take events (default
    /// [`Backpressure::DropAndCount`]).
    pub fn audit_backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// Whether the audit layer records metrics through the `metrics` facade (default on).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Whether metrics also carry per-key series (default off; see
    /// [`AuditLayer::with_key_metrics`]).
    ///
    /// # Security
    ///
    /// Not a secret leak (key ids only), but one time series per key: unbounded cardinality
    /// for the metrics backend.
    pub fn key_metrics(mut self, on: bool) -> Self {
        self.key_metrics = on;
        self
    }

    /// Whether a valid incoming `x-request-id` is kept (default on; see
    /// [`AuditLayer::with_accept_request_id`]).
    pub fn accept_request_id(mut self, accept: bool) -> Self {
        self.accept_request_id = accept;
        self
    }

    /// What the audit layer counts as a credential (default [`SecretScanner::new`]): request
    /// ids it flags are replaced, path segments and models it flags are recorded as
    /// `[redacted]` (see [`AuditLayer::with_secret_scanner`]). The key format's prefix is
    /// always added.
    pub fn secret_scanner(mut self, scanner: SecretScanner) -> Self {
        self.secret_scanner = scanner;
        self
    }

    /// The price table money budgets are charged from: per million tokens
    /// ([`PriceTable::with_price`]) and, for image models, per image by size and quality
    /// ([`PriceTable::with_image_prices`]).
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// What to do with unpriced models when a budget applies (default [`Unpriced::Deny`]).
    pub fn unpriced(mut self, unpriced: Unpriced) -> Self {
        self.unpriced = unpriced;
        self
    }

    /// The output cap of a request that names none (default 4,096): see
    /// [`TokenLimitLayer::with_default_output_tokens`].
    pub fn default_output_tokens(mut self, tokens: u64) -> Self {
        self.default_output_tokens = Some(tokens);
        self
    }

    /// See [`TokenLimitLayer::with_min_output_tokens`].
    pub fn min_output_tokens(mut self, tokens: u64) -> Self {
        self.min_output_tokens = Some(tokens);
        self
    }

    /// See [`TokenLimitLayer::with_max_tokens_lowering`].
    pub fn max_tokens_lowering(mut self, on: bool) -> Self {
        self.max_tokens_lowering = on;
        self
    }

    /// See [`TokenLimitLayer::with_bytes_per_token`].
    pub fn bytes_per_token(mut self, bytes: NonZeroU32) -> Self {
        self.bytes_per_token = Some(bytes);
        self
    }

    /// See [`TokenLimitLayer::with_include_usage`] (default on).
    pub fn include_usage(mut self, on: bool) -> Self {
        self.include_usage = on;
        self
    }

    /// Also accept tokens `verifier` claims (a [`JwtVerifier`](keygate_jwt::JwtVerifier),
    /// an [`OidcVerifier`](keygate_jwt::OidcVerifier), ...).
    pub fn token_verifier<T2: TokenVerifier>(self, verifier: T2) -> KeygateBuilder<K, T2> {
        KeygateBuilder {
            store: self.store,
            verifier,
            clock: self.clock,
            routes: self.routes,
            audit_sink: self.audit_sink,
            backpressure: self.backpressure,
            metrics: self.metrics,
            key_metrics: self.key_metrics,
            accept_request_id: self.accept_request_id,
            secret_scanner: self.secret_scanner,
            prices: self.prices,
            unpriced: self.unpriced,
            default_output_tokens: self.default_output_tokens,
            min_output_tokens: self.min_output_tokens,
            max_tokens_lowering: self.max_tokens_lowering,
            bytes_per_token: self.bytes_per_token,
            include_usage: self.include_usage,
            key_format: self.key_format,
            sources: self.sources,
            keep_credential_headers: self.keep_credential_headers,
            trusted_proxies: self.trusted_proxies,
            body_limit: self.body_limit,
            count_tokens: self.count_tokens,
            policies: self.policies,
            objects: self.objects,
            model_list_path: self.model_list_path,
            rate_max_entries: self.rate_max_entries,
            rate_headers: self.rate_headers,
            guard: self.guard,
            spend: self.spend,
            rate_hash_key: self.rate_hash_key,
            rate_cold_until: self.rate_cold_until,
            shared_rates: self.shared_rates,
        }
    }

    /// The key format (prefix) keys are parsed with (default `sk-kg-`).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.key_format = format;
        self
    }

    /// Where credentials are looked for (default [`CredentialSource::defaults`]); checked by
    /// [`build`](Self::build).
    pub fn credential_sources(
        mut self,
        sources: impl IntoIterator<Item = CredentialSource>,
    ) -> Self {
        self.sources = Some(sources.into_iter().collect());
        self
    }

    /// Whether credential headers stay on the request handed inward (default `false`).
    ///
    /// # Security
    ///
    /// Keeping them lets the inner service (and anything it forwards to) see the client's key.
    pub fn keep_credential_headers(mut self, keep: bool) -> Self {
        self.keep_credential_headers = keep;
        self
    }

    /// Proxies whose forwarding header is believed for the client address.
    ///
    /// # Security
    ///
    /// See [`TrustedProxies`]: a trusted address can claim to forward for any client.
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Whether prompts of OpenAI model families are counted with OpenAI's tokenizer
    /// ([`keygate_scope::OpenAiTokenizer`]; default on), so reservations are exact; off, or for
    /// other models, a prompt is bounded by its bytes of text.
    pub fn count_prompt_tokens(mut self, on: bool) -> Self {
        self.count_tokens = on;
        self
    }

    /// The most bytes of a request body read to find its model and estimate its tokens
    /// (default 8 MiB); larger bodies on model routes get 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Keeps projects' objects apart with `registry` (see
    /// [`ScopeLayer::with_objects`](keygate_scope::ScopeLayer::with_objects)): objects a
    /// response creates are recorded as the caller's project's, and a request naming an object
    /// of another project (or one keygate never saw) gets 404.
    pub fn objects(mut self, registry: Arc<dyn keygate_core::ObjectRegistry>) -> Self {
        self.objects = Some(registry);
        self
    }

    /// Adds a scope policy (evaluated after the built-in checks; every policy must allow).
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policies
            .push(Box::new(move |scope| scope.with_policy(policy)));
        self
    }

    /// The path whose `GET` answer (an OpenAI model list) is filtered down to the models the
    /// caller may use (default `Some("/v1/models")`); `None` turns the filter off.
    pub fn model_list_path(mut self, path: Option<&str>) -> Self {
        self.model_list_path = path.map(str::to_owned);
        self
    }

    /// At most this many active rate-limit entries (default 4 million); checked by
    /// [`build`](Self::build).
    pub fn max_rate_entries(mut self, max: usize) -> Self {
        self.rate_max_entries = Some(max);
        self
    }

    /// Whether allowed responses carry `x-ratelimit-*-requests` headers (default on).
    pub fn rate_limit_headers(mut self, on: bool) -> Self {
        self.rate_headers = on;
        self
    }

    /// Where token rates and budgets are counted (default [`SpendBackend::Memory`]; a
    /// configured gateway with a SQLite store uses the durable [`SpendBackend::Ledger`]).
    pub fn spend_backend(mut self, backend: SpendBackend) -> Self {
        self.spend = Some(backend);
        self
    }

    /// The key request-rate cell ids are hashed with (see
    /// [`RateLimitLayer::with_hash_key`]): the saved one, to restore saved cells.
    pub fn rate_hash_key(mut self, key: [u8; 16]) -> Self {
        self.rate_hash_key = Some(key);
        self
    }

    /// Counts request rates in `store`, shared by every replica given the same (see
    /// [`RateLimitLayer::with_shared`]; a [`RedisBackend`](keygate_store::RedisBackend) is
    /// one), instead of in this process.
    pub fn shared_rates(mut self, store: Arc<dyn keygate_limit::SharedRates>) -> Self {
        self.shared_rates = Some(store);
        self
    }

    /// Every request rate starts full until `until` (see
    /// [`RateLimitLayer::with_cold_start_until`]): after an unclean stop.
    pub fn rate_cold_start_until(mut self, until: keygate_core::Timestamp) -> Self {
        self.rate_cold_until = Some(until);
        self
    }

    /// The denial-of-wallet guard. Its alerts go to the audit sink.
    pub fn wallet_guard(mut self, guard: WalletGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Checks the configuration and makes the layer.
    ///
    /// # Errors
    ///
    /// [`BuildError`] for unusable credential sources, rate limiter settings or model-list
    /// path.
    pub fn build(self) -> Result<KeygateLayer<K, T>, BuildError> {
        let clock = self.clock;
        let audit = AuditLayer::new(self.audit_sink)
            .with_clock(clock.clone())
            .with_backpressure(self.backpressure)
            .with_metrics(self.metrics)
            .with_key_metrics(self.key_metrics)
            .with_accept_request_id(self.accept_request_id)
            .with_secret_scanner(self.secret_scanner.with_key_format(&self.key_format));

        let mut extract = KeyExtractLayer::new(self.store)
            .with_token_verifier(self.verifier)
            .with_key_format(self.key_format)
            .with_clock(clock.clone())
            .keep_credential_headers(self.keep_credential_headers);
        if let Some(sources) = self.sources {
            extract = extract.with_sources(sources)?;
        }

        let mut scope = ScopeLayer::new(self.routes.unwrap_or_else(openai_routes))
            .with_body_limit(self.body_limit)
            .with_trusted_proxies(self.trusted_proxies)
            .with_clock(clock.clone());
        if self.count_tokens {
            scope = scope.with_token_counter(
                Arc::new(keygate_scope::OpenAiTokenizer),
                keygate_scope::DEFAULT_MAX_TOKENIZED,
            );
        }
        for edit in self.policies {
            scope = edit(scope);
        }
        let lists = match self.objects {
            Some(registry) => {
                scope = scope.with_objects(registry.clone());
                ObjectListLayer::new(registry)
            }
            None => ObjectListLayer::off(),
        };

        let models = match self.model_list_path {
            Some(path) if path.starts_with('/') => ModelListLayer::new().with_path(&path),
            Some(path) => return Err(BuildError::ModelListPath(path)),
            // An origin-form request path is never empty, so this path matches nothing.
            None => ModelListLayer::new().with_path(""),
        };

        let mut rate = RateLimitLayer::new()
            .with_clock(clock.clone())
            .with_headers(self.rate_headers);
        if let Some(max) = self.rate_max_entries {
            rate = rate.with_max_entries(max)?;
        }
        if let Some(key) = self.rate_hash_key {
            rate = rate.with_hash_key(key);
        }
        if let Some(until) = self.rate_cold_until {
            rate = rate.with_cold_start_until(until);
        }
        if let Some(store) = self.shared_rates {
            rate = rate.with_shared(store);
        }

        let mut tokens = TokenLimitLayer::new(self.spend.unwrap_or_default())
            .with_clock(clock.clone())
            .with_prices(self.prices)
            .with_unpriced(self.unpriced)
            .with_max_body(self.body_limit)
            .with_include_usage(self.include_usage);
        if let Some(n) = self.min_output_tokens {
            tokens = tokens.with_min_output_tokens(n);
        }
        tokens = tokens.with_max_tokens_lowering(self.max_tokens_lowering);
        if let Some(n) = self.default_output_tokens {
            tokens = tokens.with_default_output_tokens(n);
        }
        if let Some(b) = self.bytes_per_token {
            tokens = tokens.with_bytes_per_token(b);
        }
        if let Some(guard) = self.guard {
            tokens = tokens.with_guard(guard.with_clock(clock).with_alert_sink(audit.alert_sink()));
        }

        Ok(KeygateLayer {
            audit,
            extract,
            scope,
            models,
            lists,
            rate,
            tokens,
        })
    }
}

/// The whole keygate stack as one tower [`Layer`]: audit → key extraction → scope →
/// model-list filter → request rate → token rate and budgets, outermost first.
///
/// Cheap to clone; every clone (and every service it makes) shares the limiter, budget and
/// audit state. The component layers are available to compose partial stacks (the example
/// gateway mounts its token exchange behind audit, extraction and rate limit only).
#[must_use]
pub struct KeygateLayer<K, T = NoTokens> {
    audit: AuditLayer<SharedSink>,
    extract: KeyExtractLayer<K, T>,
    scope: ScopeLayer,
    models: ModelListLayer,
    lists: ObjectListLayer,
    rate: RateLimitLayer,
    tokens: TokenLimitLayer<SpendBackend>,
}

impl<K, T> Clone for KeygateLayer<K, T> {
    fn clone(&self) -> Self {
        KeygateLayer {
            audit: self.audit.clone(),
            extract: self.extract.clone(),
            scope: self.scope.clone(),
            models: self.models.clone(),
            lists: self.lists.clone(),
            rate: self.rate.clone(),
            tokens: self.tokens.clone(),
        }
    }
}

impl<K, T> fmt::Debug for KeygateLayer<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeygateLayer")
            .field("audit", &self.audit)
            .field("extract", &self.extract)
            .field("scope", &self.scope)
            .field("rate", &self.rate)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl<K, T> KeygateLayer<K, T> {
    /// The audit layer (outermost).
    pub fn audit_layer(&self) -> &AuditLayer<SharedSink> {
        &self.audit
    }

    /// The key extraction layer.
    pub fn extract_layer(&self) -> &KeyExtractLayer<K, T> {
        &self.extract
    }

    /// The scope layer.
    pub fn scope_layer(&self) -> &ScopeLayer {
        &self.scope
    }

    /// The model-list filter.
    pub fn model_list_layer(&self) -> &ModelListLayer {
        &self.models
    }

    /// The request rate layer.
    pub fn rate_limit_layer(&self) -> &RateLimitLayer {
        &self.rate
    }

    /// The token rate and budget layer (its [`backend`](TokenLimitLayer::backend) shows what
    /// has been spent).
    pub fn token_limit_layer(&self) -> &TokenLimitLayer<SpendBackend> {
        &self.tokens
    }
}

impl<S, K, T> Layer<S> for KeygateLayer<K, T> {
    type Service = KeygateService<S, K, T>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = self.lists.layer(inner);
        let inner = self.tokens.layer(inner);
        let inner = self.rate.layer(inner);
        let inner = self.models.layer(inner);
        let inner = self.scope.layer(inner);
        let inner = self.extract.layer(inner);
        self.audit.layer(inner)
    }
}
