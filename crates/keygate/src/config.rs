//! [`Config`]: the whole stack from a TOML file.
//!
//! Every key is optional; an empty file is a working configuration (keys in the SQLite
//! store `keygate.db`, the OpenAI routes, audit to `tracing`, tokens signed with a random
//! per-process secret). Unknown keys are errors, so a typo never silently falls back to a
//! default.
//!
//! ```toml
//! keys_file = "keys.toml"
//! body_limit = 1048576
//!
//! [routes]
//! preset = "openai"
//!
//! [limits]
//! unpriced = "deny"
//!
//! [prices."gpt-4o-mini"]
//! input_per_million = "0.15"
//! output_per_million = "0.60"
//!
//! [prices."dall-e-3".images]
//! "1024x1024" = "0.04"
//! "1024x1024/hd" = "0.08"
//!
//! [audit.jsonl]
//! path = "audit.jsonl"
//!
//! [trusted_proxies]
//! ranges = ["10.0.0.0/8"]
//!
//! [[policies]]             # for every key; keys and projects carry their own too
//! type = "members_only"
//! group = "research"
//! models = ["o1*"]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_audit::{
    AuditSink, Backpressure, DEFAULT_CAPACITY, DEFAULT_KEEP, DEFAULT_MAX_BYTES, FanOut, JsonlSink,
    NoopSink, TracingSink,
};
use keygate_core::{
    KeyFormat, KeyFormatConfigError, KeyStore, Money, Principal, SecretScanner, Timestamp,
    TokenError, TokenVerifier,
};
use keygate_jwt::{JwtVerifier, KeySet, SigningKey, TokenExchange};
use keygate_limit::{ImagePrices, Price, PriceTable, Unpriced, WalletGuard};
use keygate_scope::{DEFAULT_BODY_LIMIT, RouteError, RouteSpec, RouteTable, TrustedProxies};
use keygate_store::{FileStore, FileStoreError};
use serde::{Deserialize, Serialize};

use crate::builder::{BuildError, Keygate, KeygateBuilder, KeygateLayer};
use crate::source::KeySource;

/// The keygate configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where keys, projects and spend live: `sqlite:PATH` (default `sqlite:keygate.db`,
    /// relative to the working directory; written by the `keygate` CLI, digests only), or
    /// `postgres://…` for replicas (which then need `[counters]`: a gateway on PostgreSQL
    /// with counters in its own memory does not start). With `keys_file` set, keys come from
    /// the file and spend goes to the store only when `store` is given too (else spend is
    /// counted in memory, and a restart forgets it).
    pub store: Option<String>,
    /// Serve keys from this TOML key file instead of the store (for keys kept in git), with a
    /// [`FileStore`].
    pub keys_file: Option<PathBuf>,
    /// Seconds between checks of the key file for changes; 0 turns polling off (the gateway
    /// still reloads on SIGHUP). Default 2.
    pub reload_interval_secs: u64,
    /// Milliseconds between checks of the store for changes (a revoked key is refused by
    /// every gateway within this); default 250, at least 10.
    pub store_poll_millis: u64,
    /// The prefix of keys (default `sk-kg-`); must match the prefix keys were created with.
    pub key_prefix: String,
    /// Keep the client's credential headers on the request handed to the service (default
    /// false: they are removed, so an upstream never sees the client's key).
    pub keep_credential_headers: bool,
    /// The most bytes of a request body read to find its model and estimate its tokens;
    /// larger bodies on model routes get 413. Default 8 MiB.
    pub body_limit: usize,
    /// Filter the answer of `GET /v1/models` down to the models the caller may use (default
    /// true).
    pub model_list_filter: bool,
    /// Keep each project's objects to itself on a shared upstream (default true): files,
    /// uploads, batches, assistants, threads, messages, runs, vector stores, fine-tuning jobs
    /// and stored responses and chat completions created through the gateway are recorded as
    /// the creating key's project's (in the store's `objects` table; in memory when keys come
    /// from a key file and no store is named), and a request naming another project's object,
    /// or one not created through the gateway, gets 404. Runs and batches of keys with model
    /// rules are checked as their assistant's model and their input file's models.
    pub isolate_objects: bool,
    /// Which routes exist and which endpoint group each belongs to.
    pub routes: RoutesConfig,
    /// How limits are enforced (the limits themselves are on keys and projects).
    pub limits: LimitsConfig,
    /// Prices per model pattern (`"gpt-4o-mini"`, `"gpt-4o*"`), in dollars per million
    /// tokens and, for image models, per image (`[prices."dall-e-3".images]`); the most
    /// specific pattern wins. Budgets are charged from these.
    pub prices: BTreeMap<String, PriceConfig>,
    /// Where audit records go.
    pub audit: AuditConfig,
    /// Proxies whose forwarding header is believed for the client address (for IP rules):
    /// `ranges = ["10.0.0.0/8"]`, `header = "x_forwarded_for"` (default) or `"forwarded"`.
    /// Default: none; the connection's peer address is the client.
    pub trusted_proxies: TrustedProxies,
    /// Short-lived tokens (JWT) exchanged for keys.
    pub jwt: JwtConfig,
    /// The denial-of-wallet guard (`[guard]`, off by default).
    pub guard: GuardConfig,
    /// The model servers the gateway forwards to (`[[upstreams]]`), tried in order: the
    /// first whose `models` match the request's model serves it.
    pub upstreams: Vec<UpstreamConfig>,
    /// How the gateway talks to its upstreams: timeouts and TLS (`[proxy]`).
    pub proxy: ProxyConfig,
    /// The gateway's HTTP server: timeouts, connection cap, drain on shutdown (`[server]`).
    pub server: ServerConfig,
    /// Counters shared by replicas (`[counters]`, Redis): request rates, token rates and
    /// budgets. Off by default.
    pub counters: crate::counters::CountersConfig,
    /// Conditions every request must meet (`[[policies]]`, the same as a key's or project's
    /// `policies`: `type = "time_window" | "require_label" | "require_group" |
    /// "members_only"`), checked after those of the caller's records.
    pub policies: Vec<keygate_core::Condition>,
}

/// `[[upstreams]]`: one model server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its base URL, `http://` or `https://` (`https://api.openai.com`).
    pub url: String,
    /// The models it serves, as patterns (`["gpt-*", "o3*"]`); empty (the default) or `"*"`:
    /// every model. Requests that name no model go to the first upstream for every model (or
    /// the first listed).
    #[serde(default)]
    pub models: Vec<String>,
    /// The environment variable holding its provider key (sent as `Authorization: Bearer`);
    /// the key itself is never in the file. Unset: no key is sent.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// `[proxy]`: timeouts and TLS of upstream requests. A timeout of 0 turns it off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Seconds to open a connection (default 10).
    pub connect_timeout_secs: u64,
    /// Seconds from sending a request to the response head (default 600: reasoning models
    /// can think for minutes before a non-streamed answer). Then 504.
    pub head_timeout_secs: u64,
    /// The longest pause between two chunks of a response body, in seconds (default 300).
    /// Then the body is cut (a stream ends with an `error` event).
    pub idle_timeout_secs: u64,
    /// Seconds for the whole exchange (default 1800).
    pub total_timeout_secs: u64,
    /// The roots `https://` upstreams are verified against: `"webpki"` (default, Mozilla's,
    /// compiled in), `"system"` or `"none"` (only `extra_ca_file`).
    pub roots: Roots,
    /// A PEM file of extra CA certificates to trust (private endpoints).
    pub extra_ca_file: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout_secs: 10,
            head_timeout_secs: 600,
            idle_timeout_secs: 300,
            total_timeout_secs: 1800,
            roots: Roots::Webpki,
            extra_ca_file: None,
        }
    }
}

/// The certificate authorities `https://` upstreams are verified against (besides any extra
/// CA).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Roots {
    /// Mozilla's root store, compiled in (`webpki-roots`): the same on every machine.
    #[default]
    Webpki,
    /// The operating system's store (`rustls-native-certs`), read when the proxy is built.
    System,
    /// Only the extra CAs: for a gateway that talks to private endpoints alone.
    None,
}

impl ProxyConfig {
    /// The timeouts these settings name.
    #[cfg(feature = "proxy")]
    pub fn timeouts(&self) -> crate::proxy::Timeouts {
        crate::proxy::Timeouts::none()
            .with_connect(secs(self.connect_timeout_secs))
            .with_head(secs(self.head_timeout_secs))
            .with_idle(secs(self.idle_timeout_secs))
            .with_total(secs(self.total_timeout_secs))
    }
}

/// `[server]`: the gateway's HTTP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Seconds a client has to send a request's headers (default 30). The same timer runs
    /// while a kept-alive connection waits for its next request, so it is also the keep-alive
    /// idle timeout. 0 turns it off (not advised: slow clients then hold connections forever).
    pub header_read_timeout_secs: u64,
    /// Keep connections open between requests (default true).
    pub keep_alive: bool,
    /// At most this many client connections at once (default 10,000); more wait in the
    /// listen backlog until one closes.
    pub max_connections: usize,
    /// On SIGTERM or Ctrl-C, seconds to let requests in flight finish (default 30); what is
    /// left then is cut (and audited as cut by shutdown).
    pub drain_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout_secs: 30,
            keep_alive: true,
            max_connections: 10_000,
            drain_timeout_secs: 30,
        }
    }
}

fn secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

impl ServerConfig {
    /// The header read (and keep-alive idle) timeout, if on.
    pub fn header_read_timeout(&self) -> Option<Duration> {
        secs(self.header_read_timeout_secs)
    }

    /// The drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: None,
            keys_file: None,
            reload_interval_secs: 2,
            store_poll_millis: 250,
            key_prefix: keygate_core::DEFAULT_PREFIX.to_owned(),
            keep_credential_headers: false,
            body_limit: DEFAULT_BODY_LIMIT,
            model_list_filter: true,
            isolate_objects: true,
            routes: RoutesConfig::default(),
            limits: LimitsConfig::default(),
            prices: BTreeMap::new(),
            audit: AuditConfig::default(),
            trusted_proxies: TrustedProxies::default(),
            jwt: JwtConfig::default(),
            guard: GuardConfig::default(),
            upstreams: Vec::new(),
            proxy: ProxyConfig::default(),
            server: ServerConfig::default(),
            counters: crate::counters::CountersConfig::default(),
            policies: Vec::new(),
        }
    }
}

/// `[guard]`: the denial-of-wallet guard. A key whose tokens or spend in one window jump past
/// `multiple` × its own baseline (after `warmup_windows` windows of history, and above the
/// floors), or past an absolute ceiling, is suspended: 403 `key_suspended` until the process
/// restarts, with a `key_suspended` alert in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Turn the guard on (default false).
    pub enabled: bool,
    /// The window usage is counted in, in seconds (default 60).
    pub window_secs: u64,
    /// Suspend past this multiple of the key's baseline (default 10).
    pub multiple: NonZeroU32,
    /// Windows of history before the multiple applies (default 5).
    pub warmup_windows: u32,
    /// No suspension for the multiple below this many tokens in a window (default 10,000).
    pub floor_tokens: u64,
    /// ... or below this spend in a window, in dollars (default 1).
    pub floor_dollars: Money,
    /// Suspend any key past this many tokens in one window, whatever its baseline.
    pub ceiling_tokens: Option<u64>,
    /// Suspend any key past this spend in one window, in dollars, whatever its baseline.
    pub ceiling_dollars: Option<Money>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: false,
            window_secs: 60,
            multiple: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            warmup_windows: 5,
            floor_tokens: 10_000,
            floor_dollars: Money::from_dollars(1),
            ceiling_tokens: None,
            ceiling_dollars: None,
        }
    }
}

impl GuardConfig {
    /// The guard these settings describe, or `None` when it is off.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a zero window.
    pub fn guard(&self) -> Result<Option<WalletGuard>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let guard = WalletGuard::new()
            .with_window(Duration::from_secs(self.window_secs))
            .map_err(|e| ConfigError::Invalid(format!("guard.window_secs: {e}")))?
            .with_multiple(self.multiple)
            .with_warmup(self.warmup_windows)
            .with_floor(self.floor_tokens, self.floor_dollars)
            .with_ceiling(self.ceiling_tokens, self.ceiling_dollars);
        Ok(Some(guard))
    }
}

/// `[routes]`: the route table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// `"openai"` (default): the OpenAI API's routes and endpoint groups; `"none"`: only the
    /// `custom` routes.
    pub preset: RoutePreset,
    /// Routes added to the preset (`[[routes.custom]]` with `method`, `path`, `group`, and
    /// optionally `access` (`"read"`/`"write"`), `model` (`["json"]`, `["multipart"]`,
    /// `["body"]`, `[{ path = "name" }]`, `[{ query = "name" }]`) and `model_required`).
    pub custom: Vec<RouteSpec>,
}

/// The route table a configuration starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RoutePreset {
    /// [`RouteTable::openai`].
    #[default]
    Openai,
    /// No routes but the custom ones.
    None,
}

/// `[limits]`: how limits are enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// When a money budget applies to a model with no price: `"deny"` (default; 403
    /// `model_not_priced`) or `"count_tokens_only"`.
    pub unpriced: UnpricedConfig,
    /// The output cap of a request that names none (default 4096): reserved, and set on the
    /// forwarded request (lowered to what the budget and token rate can still pay for).
    pub default_output_tokens: u64,
    /// The smallest cap keygate lowers an output cap to, to fit (default 16); below it the
    /// request is refused.
    pub min_output_tokens: u64,
    /// Lower a cap the client named, to what fits, instead of refusing the request with 429
    /// naming what it can afford (default false).
    pub max_tokens_lowering: bool,
    /// Count the prompts of OpenAI model families with OpenAI's tokenizers (default true).
    pub count_prompt_tokens: bool,
    /// Bytes of prompt text per token for prompts no tokenizer counts (default 1: a bound, as
    /// no token is shorter than a byte; more admits more at the risk of under-reserving).
    pub bytes_per_token: NonZeroU32,
    /// At most this many keys (and projects) tracked by the request rate limiter at once
    /// (default 4,000,000; at least 64).
    pub max_rate_entries: usize,
    /// Add `x-ratelimit-*-requests` headers to allowed responses (default true).
    pub rate_limit_headers: bool,
    /// Force `stream_options.include_usage` on in streaming completions requests so their
    /// usage can be settled; a client that did not ask does not see the usage chunk (default
    /// true).
    pub include_usage: bool,
    /// What a committed ledger write survives: `"process_crash"` (default: `kill -9`, a
    /// panic; no fsync on the request's path) or `"power_loss"` (an fsync per group commit,
    /// about twice the latency).
    pub ledger_durability: LedgerDurability,
}

/// `[limits] ledger_durability`: see [`keygate_store::Durability`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LedgerDurability {
    /// [`keygate_store::Durability::ProcessCrash`].
    #[default]
    ProcessCrash,
    /// [`keygate_store::Durability::PowerLoss`].
    PowerLoss,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            unpriced: UnpricedConfig::Deny,
            default_output_tokens: 4096,
            min_output_tokens: 16,
            max_tokens_lowering: false,
            count_prompt_tokens: true,
            bytes_per_token: NonZeroU32::MIN,
            max_rate_entries: 4_000_000,
            rate_limit_headers: true,
            include_usage: true,
            ledger_durability: LedgerDurability::ProcessCrash,
        }
    }
}

/// What to do with an unpriced model under a budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UnpricedConfig {
    /// Refuse (403 `model_not_priced`).
    #[default]
    Deny,
    /// Count tokens against token rates only.
    CountTokensOnly,
}

/// A model's price: in dollars per million tokens (`"0.15"`, `0.15` or `"$0.15"`), per image
/// by size and quality, or both.
///
/// ```toml
/// [prices."dall-e-3".images]          # dollars per image: "SIZE" (any quality) or "SIZE/QUALITY"
/// "1024x1024" = "0.04"
/// "1024x1024/hd" = "0.08"
///
/// [prices."gpt-image-1"]
/// input_per_million = 5               # prices the token usage it reports
/// output_per_million = 40
/// default_image_size = "auto"         # what the API makes when a request names none
/// default_image_quality = "auto"
/// [prices."gpt-image-1".images]
/// "*" = "0.25"                        # "*": any size
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Dollars per million input (prompt) tokens (with `output_per_million`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_per_million: Option<Money>,
    /// Dollars per million output (completion) tokens (with `input_per_million`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_per_million: Option<Money>,
    /// Dollars per image, by `"SIZE"` (every quality of that size) or `"SIZE/QUALITY"`;
    /// `SIZE` may be `"*"` (every size). A request is priced at the first of `size/quality`,
    /// `size`, `*/quality`, `*` that has a price; none: the image is unpriced (403
    /// `model_not_priced` under a budget, as `[limits] unpriced` says). See
    /// [`ImagePrices`](keygate_limit::ImagePrices).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, Money>,
    /// The size priced for an image request that names none (default `"1024x1024"`, the
    /// API's default for `dall-e-2` and `dall-e-3`; `"auto"` for `gpt-image-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image_size: Option<String>,
    /// The quality priced for an image request that names none (default `"standard"`, what
    /// `dall-e-2` and `dall-e-3` make; `"auto"` for `gpt-image-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image_quality: Option<String>,
}

impl PriceConfig {
    /// A price per million input and output tokens, and none per image.
    pub fn per_million(input: Money, output: Money) -> Self {
        PriceConfig {
            input_per_million: Some(input),
            output_per_million: Some(output),
            ..PriceConfig::default()
        }
    }

    /// The token price and the image prices this entry names.
    fn prices(&self) -> Result<(Option<Price>, Option<ImagePrices>), String> {
        let tokens = match (self.input_per_million, self.output_per_million) {
            (Some(input), Some(output)) => Some(Price::per_million(input, output)),
            (None, None) => None,
            _ => return Err("give both input_per_million and output_per_million".into()),
        };
        let defaults = self.default_image_size.is_some() || self.default_image_quality.is_some();
        if self.images.is_empty() {
            if defaults {
                return Err("default_image_size and default_image_quality need images".into());
            }
            if tokens.is_none() {
                return Err(
                    "no price: give input_per_million and output_per_million, or images".into(),
                );
            }
            return Ok((tokens, None));
        }
        let mut images = ImagePrices::new();
        if let Some(size) = &self.default_image_size {
            images = images.with_default_size(size);
        }
        if let Some(quality) = &self.default_image_quality {
            images = images.with_default_quality(quality);
        }
        for (key, price) in &self.images {
            images = images
                .with_price(key, *price)
                .map_err(|e| format!("images: {e}"))?;
        }
        Ok((tokens, Some(images)))
    }
}

/// `[audit]`: where audit records go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Emit every record as a `tracing` event (target `keygate::audit`; default true).
    pub tracing: bool,
    /// Record metrics (`keygate_requests_total`, ...) through the `metrics` facade (default
    /// true).
    pub metrics: bool,
    /// Also per-key metric series (`keygate_key_requests_total`, ...; default false): one
    /// time series per key, so only for a small, fixed set of keys. Per-key usage is in the
    /// audit records either way.
    pub key_metrics: bool,
    /// `"drop_and_count"` (default): serve and count records a full sink drops;
    /// `"fail_closed"`: refuse requests with 503 while the JSON Lines sink cannot take them.
    pub backpressure: BackpressureConfig,
    /// Keep a valid `x-request-id` the client sends (default true). An id that could be a
    /// credential is never kept.
    pub accept_request_id: bool,
    /// Key prefixes that count as credentials besides the built-in ones
    /// ([`DEFAULT_SECRET_PREFIXES`](keygate_core::DEFAULT_SECRET_PREFIXES)) and `key_prefix`:
    /// request ids carrying one are replaced, path segments and models carrying one are
    /// recorded as `[redacted]` (default none).
    pub secret_prefixes: Vec<String>,
    /// Also write records as JSON Lines to a file (`[audit.jsonl]`).
    pub jsonl: Option<JsonlConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            tracing: true,
            metrics: true,
            key_metrics: false,
            backpressure: BackpressureConfig::DropAndCount,
            accept_request_id: true,
            secret_prefixes: Vec::new(),
            jsonl: None,
        }
    }
}

/// The audit layer's backpressure mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackpressureConfig {
    /// [`Backpressure::DropAndCount`].
    #[default]
    DropAndCount,
    /// [`Backpressure::FailClosed`].
    FailClosed,
}

/// `[audit.jsonl]`: a JSON Lines audit file with size-based rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The file (appended to; created if missing).
    pub path: PathBuf,
    /// Rotate when the file reaches this many bytes (default 64 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1`, ...; default 10).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Records that may wait for the writer before new ones are dropped (default 8192).
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// While the file cannot be written, records already taken are retried; after this many
    /// seconds (default 5), and at shutdown, they go to stderr instead, so none is lost.
    #[serde(default = "default_fallback_after_secs")]
    pub fallback_after_secs: u64,
}

fn default_fallback_after_secs() -> u64 {
    keygate_audit::DEFAULT_FALLBACK_AFTER.as_secs()
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}
fn default_keep() -> usize {
    DEFAULT_KEEP
}
fn default_capacity() -> usize {
    DEFAULT_CAPACITY
}

/// `[jwt]`: short-lived tokens exchanged for keys (`POST /v1/tokens` in the gateway) and
/// accepted in their place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Accept and issue tokens (default true).
    pub enabled: bool,
    /// The `iss` of issued tokens, required of presented ones (default `"keygate"`).
    pub issuer: String,
    /// The `aud` of issued tokens, required of presented ones (default `"keygate"`).
    pub audience: String,
    /// The key id (`kid`) of the signing key (default `"k1"`).
    pub kid: String,
    /// The environment variable holding the HS256 secret (32 bytes or more). Unset (the
    /// default): a random secret per process, so tokens die with the process and are not
    /// shared between instances.
    pub secret_env: Option<String>,
    /// Lifetime of a token when the request names none, in seconds (default 900).
    pub default_ttl_secs: u64,
    /// Longest lifetime a request may ask for, in seconds (default 3600).
    pub max_ttl_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            enabled: true,
            issuer: "keygate".to_owned(),
            audience: "keygate".to_owned(),
            kid: "k1".to_owned(),
            secret_env: None,
            default_ttl_secs: 900,
            max_ttl_secs: 3600,
        }
    }
}

/// Why a configuration could not be loaded or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not a valid configuration.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The route table is invalid.
    #[error("routes: {0}")]
    Routes(#[from] RouteError),
    /// The key file could not be loaded.
    #[error(transparent)]
    KeyFile(#[from] FileStoreError),
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] keygate_store::DbError),
    /// The JSON Lines audit file could not be opened.
    #[error("audit file {path}: {source}")]
    AuditFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The shared counters cannot be reached.
    #[error("counters: {0}")]
    Counters(String),
    /// The JWT settings are unusable.
    #[error("jwt: {0}")]
    Jwt(#[from] keygate_jwt::ConfigError),
    /// The layers could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
}

impl From<KeyFormatConfigError> for ConfigError {
    fn from(e: KeyFormatConfigError) -> Self {
        ConfigError::Invalid(format!("key_prefix: {e}"))
    }
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] for TOML that is not a configuration (unknown keys included).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`] or [`ConfigError::Parse`].
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// The route table this configuration names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Routes`] for an invalid custom route.
    pub fn route_table(&self) -> Result<RouteTable, ConfigError> {
        let mut specs = match self.routes.preset {
            RoutePreset::Openai => crate::builder::openai_specs(),
            RoutePreset::None => Vec::new(),
        };
        specs.extend(self.routes.custom.iter().cloned());
        Ok(crate::builder::routes_from(specs)?)
    }

    /// The price table this configuration names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a price pattern that is not a model pattern, an entry
    /// with one token price of two or no price at all, or an image price key that is not
    /// `SIZE` or `SIZE/QUALITY`.
    pub fn price_table(&self) -> Result<PriceTable, ConfigError> {
        self.prices
            .iter()
            .try_fold(PriceTable::new(), |mut table, (pattern, p)| {
                let invalid = |e: String| ConfigError::Invalid(format!("prices.{pattern:?}: {e}"));
                let (tokens, images) = p.prices().map_err(invalid)?;
                if let Some(price) = tokens {
                    table = table
                        .with_price(pattern, price)
                        .map_err(|e| invalid(e.to_string()))?;
                }
                if let Some(images) = images {
                    table = table
                        .with_image_prices(pattern, images)
                        .map_err(|e| invalid(e.to_string()))?;
                }
                Ok(table)
            })
    }

    /// How often the key source is checked for changes, if it is: the store every
    /// `store_poll_millis`, a key file every `reload_interval_secs` (0: never).
    pub fn reload_interval(&self) -> Option<Duration> {
        match &self.keys_file {
            Some(_) => (self.reload_interval_secs > 0)
                .then(|| Duration::from_secs(self.reload_interval_secs)),
            None => Some(Duration::from_millis(self.store_poll_millis.max(10))),
        }
    }

    /// The store URL, parsed.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a URL that is not one keygate knows.
    pub fn store_url(&self) -> Result<keygate_store::StoreUrl, ConfigError> {
        self.store
            .as_deref()
            .unwrap_or(keygate_store::DEFAULT_STORE_URL)
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("store: {e}")))
    }

    /// The SQLite database spend is kept in: the store, unless keys come from a key file and
    /// no store is named.
    ///
    /// # Errors
    ///
    /// As [`Config::store_url`].
    pub fn ledger_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        if self.keys_file.is_some() && self.store.is_none() {
            return Ok(None);
        }
        match self.store_url()? {
            keygate_store::StoreUrl::Sqlite(path) => Ok(Some(path)),
            other => Err(not_servable(&other)),
        }
    }

    /// Opens the key source: the key file when `keys_file` is set, else the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError::KeyFile`] or [`ConfigError::Store`] when it cannot be opened or read:
    /// a gateway with no usable key source does not start.
    pub fn key_source(&self) -> Result<KeySource, ConfigError> {
        match &self.keys_file {
            Some(path) => Ok(FileStore::open(path)?.into()),
            None => match self.store_url()? {
                keygate_store::StoreUrl::Sqlite(path) => {
                    Ok(keygate_store::SqliteStore::open(&path)?.into())
                }
                other => Err(not_servable(&other)),
            },
        }
    }

    /// Applies every setting except the audit sink and the token verifier to `builder`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for invalid routes, prices or key prefix.
    pub fn apply<K: KeyStore, T: TokenVerifier>(
        &self,
        builder: KeygateBuilder<K, T>,
    ) -> Result<KeygateBuilder<K, T>, ConfigError> {
        let limits = &self.limits;
        let unpriced = match limits.unpriced {
            UnpricedConfig::Deny => Unpriced::Deny,
            UnpricedConfig::CountTokensOnly => Unpriced::CountTokensOnly,
        };
        let backpressure = match self.audit.backpressure {
            BackpressureConfig::DropAndCount => Backpressure::DropAndCount,
            BackpressureConfig::FailClosed => Backpressure::FailClosed,
        };
        let mut builder = match self.guard.guard()? {
            Some(guard) => builder.wallet_guard(guard),
            None => builder,
        };
        for p in &self.policies {
            p.validate()
                .map_err(|e| ConfigError::Invalid(format!("[[policies]] {p}: {e}")))?;
            builder = builder.policy(p.clone());
        }
        Ok(builder
            .routes(self.route_table()?)
            .prices(self.price_table()?)
            .unpriced(unpriced)
            .default_output_tokens(limits.default_output_tokens)
            .min_output_tokens(limits.min_output_tokens)
            .max_tokens_lowering(limits.max_tokens_lowering)
            .count_prompt_tokens(limits.count_prompt_tokens)
            .bytes_per_token(limits.bytes_per_token)
            .max_rate_entries(limits.max_rate_entries)
            .rate_limit_headers(limits.rate_limit_headers)
            .include_usage(limits.include_usage)
            .key_format(KeyFormat::with_prefix(&self.key_prefix)?)
            .keep_credential_headers(self.keep_credential_headers)
            .body_limit(self.body_limit)
            .model_list_path(self.model_list_filter.then_some("/v1/models"))
            .trusted_proxies(self.trusted_proxies.clone())
            .audit_backpressure(backpressure)
            .metrics(self.audit.metrics)
            .key_metrics(self.audit.key_metrics)
            .accept_request_id(self.audit.accept_request_id)
            .secret_scanner(
                SecretScanner::new()
                    .with_prefixes(&self.audit.secret_prefixes)
                    .map_err(|e| ConfigError::Invalid(format!("audit.secret_prefixes: {e}")))?,
            ))
    }

    /// Opens the key file and the audit sinks and builds the whole stack.
    ///
    /// # Errors
    ///
    /// Any [`ConfigError`]: an unreadable key file, an audit file that cannot be opened, a
    /// JWT secret that is missing or too short, invalid routes or prices.
    pub fn build(&self) -> Result<Built, ConfigError> {
        if self.counters.target()?.is_some() {
            return Err(ConfigError::Invalid(
                "counters: a gateway with shared counters connects to them: start it with \
                 Config::open"
                    .to_owned(),
            ));
        }
        let store = self.key_source()?;
        self.build_with(store, Shared::default())
    }

    /// Connects to what the configuration names (the PostgreSQL store, the Redis counters)
    /// and builds the whole stack, as [`Config::build`] does for a gateway of its own.
    ///
    /// # Errors
    ///
    /// As [`Config::build`]; [`ConfigError::Counters`] when the counters do not answer;
    /// [`ConfigError::Store`] when PostgreSQL cannot be reached; [`ConfigError::Invalid`]
    /// for a PostgreSQL store without `[counters]` (replicas counting in their own memory
    /// would each grant every budget and rate again).
    pub async fn open(&self) -> Result<Built, ConfigError> {
        let url = self.store_url()?;
        let on_postgres = matches!(url, keygate_store::StoreUrl::Postgres(_))
            && (self.keys_file.is_none() || self.store.is_some());
        let counters = match self.counters.target()? {
            // On PostgreSQL, settled charges go through the outbox to its ledger.
            Some(target) => Some(
                keygate_store::RedisBackend::connect(
                    &target,
                    self.counters.options().outbox(on_postgres),
                )
                .await
                .map_err(|e| ConfigError::Counters(e.to_string()))?,
            ),
            None if on_postgres => return Err(not_servable(&url)),
            None => None,
        };
        let (store, pg) = match (&url, &self.keys_file) {
            (keygate_store::StoreUrl::Postgres(pg), None) => {
                let store = keygate_store::PgStore::connect(pg.as_str()).await?;
                let db = store.db().clone();
                (KeySource::from(store), Some(db))
            }
            (keygate_store::StoreUrl::Postgres(pg), Some(_)) if on_postgres => (
                self.key_source()?,
                Some(keygate_store::PgDb::connect(pg.as_str()).await?),
            ),
            _ => (self.key_source()?, None),
        };
        let ledger = match (&counters, &pg) {
            (Some(redis), Some(db)) => {
                // A Redis that lost its data gets each shard's budgets back from the ledger
                // before it admits anything there.
                redis.rebuild_from(std::sync::Arc::new(db.clone()));
                let mut tag = [0u8; 6];
                getrandom::fill(&mut tag)
                    .map_err(|e| ConfigError::Invalid(format!("no random writer name: {e}")))?;
                let name: String = tag.iter().map(|b| format!("{b:02x}")).collect();
                Some(keygate_store::LedgerWriter::new(
                    redis.clone(),
                    db.clone(),
                    format!("gateway-{}-{name}", std::process::id()),
                ))
            }
            _ => None,
        };
        let mut built = self.build_with(store, Shared { counters, pg })?;
        built.ledger = ledger;
        Ok(built)
    }

    fn build_with(&self, store: KeySource, shared: Shared) -> Result<Built, ConfigError> {
        let jsonl = match &self.audit.jsonl {
            Some(j) => Some(
                JsonlSink::builder(&j.path)
                    .with_max_bytes(j.max_bytes)
                    .with_keep(j.keep)
                    .with_capacity(j.capacity)
                    .with_fallback_after(Duration::from_secs(j.fallback_after_secs))
                    .open()
                    .map_err(|source| ConfigError::AuditFile {
                        path: j.path.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let sink: Box<dyn AuditSink> = match (&jsonl, self.audit.tracing) {
            (Some(file), true) => Box::new(
                FanOut::new()
                    .with(file.clone())
                    .with_optional(TracingSink::new()),
            ),
            (Some(file), false) => Box::new(file.clone()),
            (None, true) => Box::new(TracingSink::new()),
            (None, false) => Box::new(NoopSink),
        };
        // What each key did, for the admin API (never holds a request back).
        let activity = crate::Activity::new();
        let sink: Box<dyn AuditSink> = Box::new(crate::activity::Watched {
            sink,
            activity: activity.clone(),
        });

        let (verifier, exchange) = if self.jwt.enabled {
            let secret = self.jwt_secret()?;
            let j = &self.jwt;
            let keys = KeySet::new().with_hs256(&j.kid, &secret)?;
            let verifier = JwtVerifier::new(store.clone(), &j.issuer, &j.audience, keys)?;
            let exchange =
                TokenExchange::new(&j.issuer, &j.audience, SigningKey::hs256(&j.kid, &secret)?)?
                    .with_ttl(
                        Duration::from_secs(j.default_ttl_secs),
                        Duration::from_secs(j.max_ttl_secs),
                    )?;
            (ConfigTokens(Some(verifier)), Some(exchange))
        } else {
            (ConfigTokens(None), None)
        };

        let builder = Keygate::builder(store.clone())
            .audit_sink(BoxedSink(sink))
            .token_verifier(verifier);
        let mut builder = self.apply(builder)?;
        // The SQLite database of the store, if it is one; the local ledger and saved rates
        // are in it unless the counters are shared.
        let sqlite_path = match (&self.store_url()?, &shared.pg) {
            (keygate_store::StoreUrl::Sqlite(_), None) => self.ledger_path()?,
            _ => None,
        };
        let ledger_path = sqlite_path.clone().filter(|_| shared.counters.is_none());
        if let Some(redis) = &shared.counters {
            // Every replica on these counters shares each rate and budget exactly.
            builder = builder
                .spend_backend(crate::SpendBackend::Redis(redis.clone()))
                .shared_rates(std::sync::Arc::new(redis.clone()));
        }
        let mut restore_rates = Vec::new();
        if let Some(path) = &ledger_path {
            // Request rates go on from a clean stop, or start full after an unclean one.
            let mut new_key = [0u8; 16];
            getrandom::fill(&mut new_key)
                .map_err(|e| ConfigError::Invalid(format!("no random rate key: {e}")))?;
            let begin = keygate_store::Db::open(path)?.begin_rates(new_key)?;
            builder = builder.rate_hash_key(begin.hash_key);
            match begin.start {
                keygate_store::RateStart::Clean { cells } => restore_rates = cells,
                keygate_store::RateStart::Unclean => {
                    let now = keygate_core::Clock::system().now();
                    tracing::warn!(
                        "the last gateway on this store did not stop cleanly: every request rate counts as used for the next minute"
                    );
                    builder =
                        builder.rate_cold_start_until(now.saturating_add(Duration::from_secs(60)));
                }
                _ => {}
            }
        }
        if let Some(path) = ledger_path.clone() {
            // Spend is durable: every reservation is in the ledger before the request goes on,
            // and the counters are rebuilt from it at start.
            let durability = match self.limits.ledger_durability {
                LedgerDurability::ProcessCrash => keygate_store::Durability::ProcessCrash,
                LedgerDurability::PowerLoss => keygate_store::Durability::PowerLoss,
            };
            let now = keygate_core::Clock::system().now();
            let ledger = keygate_store::LedgerBackend::open_with(&path, now, durability)?;
            builder = builder.spend_backend(crate::SpendBackend::Ledger(ledger));
        }
        if self.isolate_objects {
            let registry: std::sync::Arc<dyn keygate_core::ObjectRegistry> = match (
                &shared.pg,
                &sqlite_path,
            ) {
                (Some(db), _) => std::sync::Arc::new(keygate_store::PgRegistry::new(db.clone())),
                (None, Some(path)) => {
                    std::sync::Arc::new(keygate_store::SqliteRegistry::open(path)?)
                }
                (None, None) => {
                    tracing::warn!(
                        "objects created through the gateway are recorded in memory only (keys come from a key file and no store is named): after a restart, they are refused to everyone"
                    );
                    std::sync::Arc::new(keygate_core::MemoryRegistry::new())
                }
            };
            builder = builder.objects(registry);
        }
        if let Some(guard) = self.guard.guard()? {
            // A suspension outlives the process (and reaches every replica): the key is
            // disabled in the store with the reason `suspended` (re-enable it with
            // `keygate keys enable`).
            if let Some(db) = &shared.pg {
                builder = builder.wallet_guard(
                    guard.with_suspension_hook(crate::counters::persist_suspension_pg(db.clone())),
                );
            } else if let Some(sqlite) = store.sqlite() {
                builder = builder.wallet_guard(
                    guard.with_suspension_hook(persist_suspension(sqlite.path().to_path_buf())),
                );
            }
        }
        let layer = builder.build()?;
        layer.rate_limit_layer().restore(restore_rates);
        Ok(Built {
            activity,
            rates_db: ledger_path,
            counters: shared.counters,
            ledger: None,
            layer,
            store,
            exchange,
            jsonl,
        })
    }

    /// The upstream proxy `[[upstreams]]` and `[proxy]` describe, with each provider key read
    /// from its environment variable; `None` when no upstream is configured.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for an unusable URL or model pattern, a provider key variable
    /// that is named but not set, or an unreadable CA file.
    #[cfg(feature = "proxy")]
    pub fn proxy(&self) -> Result<Option<crate::proxy::UpstreamProxy>, ConfigError> {
        use crate::proxy::{Upstream, UpstreamProxy};
        if self.upstreams.is_empty() {
            return Ok(None);
        }
        let invalid = |what: String| ConfigError::Invalid(what);
        let mut builder = UpstreamProxy::builder()
            .timeouts(self.proxy.timeouts())
            .roots(self.proxy.roots);
        if let Some(path) = &self.proxy.extra_ca_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            builder = builder.extra_ca_pem(pem);
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = match &u.api_key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    invalid(format!(
                        "upstreams[{i}].api_key_env: environment variable {var} is not set"
                    ))
                })?),
                None => None,
            };
            let upstream = Upstream::new(&u.url)
                .and_then(|up| up.with_provider_key(key.as_deref()))
                .and_then(|up| up.with_models(&u.models))
                .map_err(|e| invalid(format!("upstreams[{i}] ({}): {e}", u.url)))?;
            builder = builder.upstream(upstream);
        }
        builder
            .build()
            .map(Some)
            .map_err(|e| invalid(format!("proxy: {e}")))
    }

    fn jwt_secret(&self) -> Result<Vec<u8>, ConfigError> {
        match &self.jwt.secret_env {
            Some(var) => std::env::var(var).map(String::into_bytes).map_err(|_| {
                ConfigError::Invalid(format!(
                    "jwt.secret_env: environment variable {var} is not set"
                ))
            }),
            None => {
                let mut secret = vec![0u8; 32];
                getrandom::fill(&mut secret)
                    .map_err(|e| ConfigError::Invalid(format!("jwt: no random secret: {e}")))?;
                Ok(secret)
            }
        }
    }
}

/// Why a gateway does not start on `url` without `[counters]`: a shared store (PostgreSQL)
/// means replicas, and replicas need shared counters, or every replica would grant every
/// limit again.
fn not_servable(url: &keygate_store::StoreUrl) -> ConfigError {
    ConfigError::Invalid(format!(
        "store {url}: a gateway on a shared store needs shared counters, or each replica \
         would grant every budget and rate again: set [counters] url = \"redis://…\" in the \
         config (or --counters redis://…)"
    ))
}

/// The reason a key disabled by the denial-of-wallet guard carries in the store.
pub const SUSPENDED_REASON: &str = "suspended";

/// A suspension hook that disables the key in the SQLite store at `path` (off the request
/// path: the write runs on a thread of its own, and the store's refresh then serves it).
fn persist_suspension(path: PathBuf) -> impl keygate_limit::SuspensionHook {
    move |key_id: &keygate_core::KeyId, change: keygate_limit::Suspension| {
        if change != keygate_limit::Suspension::Suspended {
            return;
        }
        let path = path.clone();
        let id = key_id.as_str().to_owned();
        let spawned = std::thread::Builder::new()
            .name("keygate-suspend".into())
            .spawn(move || {
                let result = keygate_store::Db::open(&path).and_then(|mut db| {
                    db.update_key(&id, |key, reason| {
                        key.disabled = true;
                        *reason = Some(SUSPENDED_REASON.to_owned());
                        Ok(())
                    })
                });
                match result {
                    Ok(()) => {
                        tracing::warn!(key_id = %id, "key suspended and disabled in the store")
                    }
                    Err(error) => {
                        tracing::error!(key_id = %id, %error, "could not persist a key suspension")
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start persisting a key suspension");
        }
    }
}

struct BoxedSink(Box<dyn AuditSink>);

impl AuditSink for BoxedSink {
    fn record(&self, event: &keygate_audit::AuditEvent) {
        self.0.record(event);
    }
    fn record_owned(&self, event: keygate_audit::AuditEvent) {
        self.0.record_owned(event);
    }
    fn can_accept(&self) -> bool {
        self.0.can_accept()
    }
    fn try_reserve(&self) -> bool {
        self.0.try_reserve()
    }
    fn record_reserved(&self, event: keygate_audit::AuditEvent) {
        self.0.record_reserved(event);
    }
    fn release_reservation(&self) {
        self.0.release_reservation();
    }
}

/// The token verifier of a configured stack: keygate JWTs when `[jwt]` is enabled, none
/// otherwise.
#[derive(Clone)]
pub struct ConfigTokens(Option<JwtVerifier<KeySource>>);

impl fmt::Debug for ConfigTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConfigTokens")
            .field(&self.0.is_some())
            .finish()
    }
}

impl TokenVerifier for ConfigTokens {
    fn accepts(&self, credential: &str) -> bool {
        self.0.as_ref().is_some_and(|v| v.accepts(credential))
    }

    async fn verify(&self, token: &str, now: Timestamp) -> Result<Principal, TokenError> {
        match &self.0 {
            Some(v) => v.verify(token, now).await,
            None => Err(TokenError::Invalid("tokens not accepted")),
        }
    }
}

/// What [`Config::build`] made: the layer, the key store it serves (to reload or watch), the
/// token exchange service (to mount) and the audit file (to flush at shutdown).
#[derive(Debug)]
pub struct Built {
    layer: KeygateLayer<KeySource, ConfigTokens>,
    activity: crate::Activity,
    store: KeySource,
    /// The database request rates are saved to at a clean stop.
    rates_db: Option<PathBuf>,
    /// The shared counters, when there are.
    counters: Option<keygate_store::RedisBackend>,
    /// What moves their settled charges into the PostgreSQL ledger.
    ledger: Option<keygate_store::LedgerWriter>,
    exchange: Option<TokenExchange>,
    jsonl: Option<JsonlSink>,
}

/// What a gateway of several replicas shares, connected by [`Config::open`].
#[derive(Default)]
struct Shared {
    counters: Option<keygate_store::RedisBackend>,
    pg: Option<keygate_store::PgDb>,
}

impl Built {
    /// The stack.
    pub fn layer(&self) -> &KeygateLayer<KeySource, ConfigTokens> {
        &self.layer
    }

    /// The key source (call [`KeySource::reload`] or [`KeySource::watch`]).
    pub fn store(&self) -> &KeySource {
        &self.store
    }

    /// What each key did, from the audit records (see [`Activity`](crate::Activity)).
    pub fn activity(&self) -> &crate::Activity {
        &self.activity
    }

    /// The SQLite database this gateway's spend ledger is in, when it keeps one (a
    /// SQLite store, or a key file with the default store, without `[counters]`).
    pub fn ledger_path(&self) -> Option<&Path> {
        self.rates_db.as_deref()
    }

    /// The counters shared with other replicas (`[counters]`), when there are.
    pub fn counters(&self) -> Option<&keygate_store::RedisBackend> {
        self.counters.as_ref()
    }

    /// What moves settled charges from the shared counters into the PostgreSQL ledger (on a
    /// PostgreSQL store with `[counters]`): run it with [`LedgerWriter::run`].
    ///
    /// [`LedgerWriter::run`]: keygate_store::LedgerWriter::run
    pub fn ledger_writer(&self) -> Option<&keygate_store::LedgerWriter> {
        self.ledger.as_ref()
    }

    /// The token exchange service, when `[jwt]` is enabled: mount it behind audit and key
    /// extraction (the gateway uses `POST /v1/tokens`).
    pub fn token_exchange(&self) -> Option<&TokenExchange> {
        self.exchange.as_ref()
    }

    /// The JSON Lines audit sink, when configured.
    pub fn audit_file(&self) -> Option<&JsonlSink> {
        self.jsonl.as_ref()
    }

    /// Writes out queued audit records and flushes the audit file (call at shutdown).
    pub fn flush_audit(&self) {
        if let Some(file) = &self.jsonl {
            file.flush();
        }
    }

    /// Commits every queued ledger write (settlements) and flushes the audit file: call at
    /// shutdown, after the server has drained.
    pub async fn flush(&self) {
        if let Some(ledger) = self.layer.token_limit_layer().backend().ledger()
            && let Err(error) = ledger.flush().await
        {
            tracing::error!(%error, "committing the last ledger writes failed; their reservations count at the reserved amount after a restart");
        }
        if let Some(writer) = &self.ledger
            && let Err(error) = writer.flush().await
        {
            tracing::warn!(%error, "writing the last settled charges to the ledger failed; another replica's writer takes them over");
        }
        self.store.flush().await;
        let rates = self.rates_db.clone().map(|path| {
            let rate = self.layer.rate_limit_layer();
            (path, rate.hash_key(), rate.cells())
        });
        let _ = tokio::task::spawn_blocking(move || {
            if let Some((path, key, cells)) = rates {
                // A clean stop: the next gateway goes on from these counts.
                if let Err(error) =
                    keygate_store::Db::open(&path).and_then(|mut db| db.save_rates(key, &cells))
                {
                    tracing::error!(%error, "saving the request rates failed; the next start assumes them full");
                }
            }
        })
        .await;
        self.flush_audit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default_config() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn a_gateway_on_postgres_without_shared_counters_does_not_start_and_hides_the_password() {
        let config =
            Config::from_toml_str("store = \"postgres://keygate:hunter2@db/keys\"").unwrap();
        let e = config.build().unwrap_err().to_string();
        assert!(e.contains("shared counters"), "{e}");
        assert!(e.contains("postgres://keygate:***@db/keys"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml_str("keys_flie = \"x\"").unwrap_err();
        assert!(e.to_string().contains("keys_flie"), "{e}");
        assert!(Config::from_toml_str("[audit]\ntracin = true").is_err());
    }

    #[test]
    fn a_policy_that_cannot_hold_is_refused_at_start() {
        let config =
            Config::from_toml_str("[[policies]]\ntype = \"members_only\"\ngroup = \"research\"\n")
                .unwrap();
        let e = config.apply(crate::Keygate::builder(keygate_store::MemoryStore::new(
            keygate_core::Snapshot::default(),
        )));
        let Err(e) = e else {
            panic!("a members_only that reserves nothing is refused");
        };
        assert!(e.to_string().contains("reserves nothing"), "{e}");
    }

    #[test]
    fn the_readme_config_reference_parses() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Config reference").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").unwrap()];
        let config = Config::from_toml_str(block).unwrap();
        assert_eq!(
            config.routes.custom[0].default_model.as_deref(),
            Some("rerank-1")
        );
        assert_eq!(config.limits.bytes_per_token.get(), 1);
        assert_eq!(
            config.policies[0].to_string(),
            "members_only research models=o1*"
        );
        // Its prices make a table: per token, and per image by size and quality.
        let prices = config.price_table().unwrap();
        let dalle = prices.image_prices("dall-e-3").unwrap();
        assert_eq!(
            dalle.price(None, Some("hd")),
            Some(Money::parse("0.08").unwrap())
        );
        let gpt = prices.image_prices("gpt-image-1").unwrap();
        assert_eq!(gpt.price(None, None), Some(Money::parse("0.25").unwrap()));
        assert!(prices.price("gpt-image-1").is_some());
    }

    #[test]
    fn every_section_parses() {
        let text = r#"
            keys_file = "keys.toml"
            store = "sqlite:/var/lib/keygate/keygate.db"
            store_poll_millis = 100
            reload_interval_secs = 0
            key_prefix = "sk-acme-"
            keep_credential_headers = false
            body_limit = 1024
            model_list_filter = false

            [routes]
            preset = "none"
            [[routes.custom]]
            method = "POST"
            path = "/v1/chat/completions"
            group = "chat"
            model = ["json"]
            generates = "text"
            output_field = "max_tokens"
            default_model = "gpt-4o-mini"

            [limits]
            unpriced = "count_tokens_only"
            default_output_tokens = 100
            min_output_tokens = 8
            max_tokens_lowering = true
            count_prompt_tokens = false
            bytes_per_token = 3
            max_rate_entries = 1000
            rate_limit_headers = false
            include_usage = false
            ledger_durability = "power_loss"

            [prices."gpt-4o*"]
            input_per_million = "2.50"
            output_per_million = 10

            [audit]
            tracing = false
            metrics = false
            key_metrics = true
            backpressure = "fail_closed"
            accept_request_id = false
            [audit.jsonl]
            path = "audit.jsonl"
            max_bytes = 1000
            keep = 2
            capacity = 16
            fallback_after_secs = 1

            [trusted_proxies]
            ranges = ["10.0.0.0/8"]
            header = "forwarded"

            [jwt]
            enabled = true
            issuer = "gw"
            audience = "api"
            kid = "k2"
            secret_env = "MY_SECRET"
            default_ttl_secs = 60
            max_ttl_secs = 120

            [[upstreams]]
            url = "https://api.openai.com"
            models = ["gpt-*"]
            api_key_env = "OPENAI_API_KEY"
            [[upstreams]]
            url = "http://127.0.0.1:8000"

            [proxy]
            connect_timeout_secs = 5
            head_timeout_secs = 0
            idle_timeout_secs = 60
            total_timeout_secs = 120
            roots = "system"
            extra_ca_file = "ca.pem"

            [server]
            header_read_timeout_secs = 5
            keep_alive = false
            max_connections = 64
            drain_timeout_secs = 3

            [guard]
            enabled = true
            window_secs = 30
            multiple = 4
            warmup_windows = 2
            floor_tokens = 100
            floor_dollars = "0.01"
            ceiling_tokens = 1000000
            ceiling_dollars = 50
        "#;
        let c = Config::from_toml_str(text).unwrap();
        assert_eq!(c.body_limit, 1024);
        assert_eq!(c.routes.preset, RoutePreset::None);
        assert_eq!(c.limits.unpriced, UnpricedConfig::CountTokensOnly);
        assert_eq!(
            c.prices["gpt-4o*"].output_per_million,
            Some(Money::from_dollars(10))
        );
        assert_eq!(c.audit.jsonl.as_ref().unwrap().keep, 2);
        assert_eq!(c.jwt.secret_env.as_deref(), Some("MY_SECRET"));
        let table = c.route_table().unwrap();
        assert_eq!(table.len(), 1);
        let prices = c.price_table().unwrap();
        assert_eq!(
            prices.price("gpt-4o-mini").unwrap().input_per_million,
            Money::from_micros(2_500_000)
        );
        assert_eq!(c.reload_interval(), None);
        assert_eq!(c.guard.multiple.get(), 4);
        assert_eq!(c.guard.ceiling_dollars, Some(Money::from_dollars(50)));
        assert!(c.guard.guard().unwrap().is_some());
        assert!(Config::default().guard.guard().unwrap().is_none());
        assert!(c.audit.key_metrics);
        assert_eq!(c.limits.ledger_durability, LedgerDurability::PowerLoss);
        assert_eq!(c.limits.min_output_tokens, 8);
        assert!(c.limits.max_tokens_lowering && !c.limits.count_prompt_tokens);
        assert_eq!(
            c.routes.custom[0].output_field.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(c.audit.jsonl.as_ref().unwrap().fallback_after_secs, 1);
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].models, ["gpt-*"]);
        assert_eq!(c.upstreams[1].api_key_env, None);
        assert_eq!(c.proxy.roots, Roots::System);
        assert_eq!(c.server.max_connections, 64);
        assert_eq!(c.server.header_read_timeout(), Some(Duration::from_secs(5)));
        let t = c.proxy.timeouts();
        assert_eq!(t.connect, Some(Duration::from_secs(5)));
        assert_eq!(t.head, None);
        assert_eq!(t.total, Some(Duration::from_secs(120)));
    }

    #[test]
    fn upstreams_build_a_proxy_and_a_named_key_variable_must_be_set() {
        let mut c = Config::default();
        assert!(c.proxy().unwrap().is_none());
        c.upstreams.push(UpstreamConfig {
            url: "https://api.openai.com".to_owned(),
            models: vec!["gpt-*".to_owned()],
            api_key_env: Some("KEYGATE_TEST_SURELY_UNSET_PROVIDER_KEY".to_owned()),
        });
        let e = c.proxy().unwrap_err().to_string();
        assert!(e.contains("KEYGATE_TEST_SURELY_UNSET_PROVIDER_KEY"), "{e}");
        c.upstreams[0].api_key_env = None;
        let proxy = c.proxy().unwrap().unwrap();
        assert_eq!(proxy.upstreams()[0].url(), "https://api.openai.com");
        assert!(proxy.upstream_for(Some("gpt-4o")).is_some());
        assert!(proxy.upstream_for(Some("llama-3")).is_none());
        c.upstreams[0].url = "ftp://nope".to_owned();
        assert!(matches!(c.proxy(), Err(ConfigError::Invalid(_))));
        c.upstreams[0].url = "https://x".to_owned();
        c.upstreams[0].models = vec![String::new()];
        assert!(matches!(c.proxy(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn invalid_routes_and_prices_are_errors() {
        let c = Config::from_toml_str(
            "[[routes.custom]]\nmethod = \"GET\"\npath = \"nope\"\ngroup = \"g\"",
        )
        .unwrap();
        assert!(matches!(c.route_table(), Err(ConfigError::Routes(_))));
        let c =
            Config::from_toml_str("[prices.\"\"]\ninput_per_million = 1\noutput_per_million = 1")
                .unwrap();
        assert!(matches!(c.price_table(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn image_prices_parse_by_size_and_quality_with_their_defaults() {
        let c = Config::from_toml_str(
            r#"
            [prices."dall-e-3".images]
            "1024x1024" = "0.04"
            "1024x1024/hd" = 0.08
            "1792x1024/hd" = "$0.12"

            [prices."gpt-image-1"]
            input_per_million = 5
            output_per_million = 40
            default_image_size = "auto"
            default_image_quality = "auto"
            [prices."gpt-image-1".images]
            "*" = "0.25"
            "1024x1024/low" = "0.011"
            "#,
        )
        .unwrap();
        let table = c.price_table().unwrap();
        let dollars = |s| Money::parse(s).unwrap();
        let dalle = table.image_prices("dall-e-3").unwrap();
        assert_eq!(dalle.price(None, None), Some(dollars("0.04")));
        assert_eq!(dalle.price(None, Some("hd")), Some(dollars("0.08")));
        assert_eq!(
            dalle.price(Some("1792x1024"), Some("hd")),
            Some(dollars("0.12"))
        );
        assert_eq!(dalle.price(Some("1792x1024"), None), None);
        // An entry of images only has no token price.
        assert!(table.price("dall-e-3").is_none());
        let gpt = table.image_prices("gpt-image-1").unwrap();
        assert_eq!(
            (gpt.default_size(), gpt.default_quality()),
            ("auto", "auto")
        );
        assert_eq!(gpt.price(None, None), Some(dollars("0.25")));
        assert_eq!(
            gpt.price(Some("1024x1024"), Some("low")),
            Some(dollars("0.011"))
        );
        assert_eq!(
            table.price("gpt-image-1").unwrap().output_per_million,
            Money::from_dollars(40)
        );
        // The same configuration written back reads the same.
        let again = Config::from_toml_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.prices, c.prices);
    }

    #[test]
    fn an_image_price_entry_that_cannot_price_is_an_error() {
        for (text, says) in [
            ("[prices.\"m\".images]\n\"1024x1024/\" = 1", "SIZE/QUALITY"),
            ("[prices.\"m\"]\ninput_per_million = 1", "both"),
            (
                "[prices.\"m\"]\ndefault_image_size = \"auto\"\ninput_per_million = 1\noutput_per_million = 1",
                "need images",
            ),
            ("[prices.\"m\"]", "no price"),
        ] {
            let c = Config::from_toml_str(text).unwrap();
            let e = c.price_table().unwrap_err();
            assert!(matches!(e, ConfigError::Invalid(_)), "{text}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
        // An unknown key next to them is refused when read.
        assert!(Config::from_toml_str("[prices.\"m\"]\nimage = {}").is_err());
    }

    #[test]
    fn missing_key_file_fails_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            keys_file: Some(dir.path().join("absent.toml")),
            ..Config::default()
        };
        assert!(matches!(c.build(), Err(ConfigError::KeyFile(_))));
    }

    #[test]
    fn jwt_secret_from_an_unset_variable_fails_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        keygate_store::KeyFile::default()
            .save_atomic(&keys)
            .unwrap();
        let mut c = Config {
            keys_file: Some(keys),
            ..Config::default()
        };
        c.jwt.secret_env = Some("KEYGATE_TEST_SURELY_UNSET_VARIABLE".to_owned());
        assert!(matches!(c.build(), Err(ConfigError::Invalid(_))));
        c.jwt.enabled = false;
        let built = c.build().unwrap();
        assert!(built.token_exchange().is_none());
        assert!(built.audit_file().is_none());
    }

    #[test]
    fn audit_secret_prefixes_and_the_key_prefix_reach_the_audit_layer() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        keygate_store::KeyFile::default()
            .save_atomic(&keys)
            .unwrap();
        let mut c = Config::from_toml_str(
            "key_prefix = \"acme_\"\n[jwt]\nenabled = false\n[audit]\nsecret_prefixes = [\"corp.\"]",
        )
        .unwrap();
        c.keys_file = Some(keys);
        assert_eq!(c.audit.secret_prefixes, ["corp."]);
        let built = c.build().unwrap();
        let scanner = built.layer().audit_layer().secret_scanner();
        assert!(scanner.could_be_secret("corp.abcdefgh"));
        assert!(scanner.could_be_secret("acme_abcdefgh"));
        c.audit.secret_prefixes = vec!["has space".to_owned()];
        assert!(matches!(c.build(), Err(ConfigError::Invalid(_))));
    }
}
