//! [`TokenLimitLayer`]: tokens per minute and money budgets, reserved before and settled after.
//!
//! - this file: the layer and its configuration;
//! - `charges`: which counters a request is charged against, and the worst case it reserves;
//! - `service`: the service and its future: read the facts, reserve, forward;
//! - `respond`: refusals, token headers, and what happens once the inner service answers.

mod charges;
#[cfg(test)]
mod image_tests;
mod respond;
mod service;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use http::Response;
use keygate_core::{Clock, ResponseBody};
use tower_layer::Layer;

use crate::backend::{LimitBackend, MemoryBackend};
use crate::body::{OnDisconnect, TokenBody};
use crate::guard::WalletGuard;
use crate::price::PriceTable;

pub use charges::budget_counter;
pub use service::ResponseFuture;

/// What to do when a budget applies to a request whose model has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unpriced {
    /// Refuse it: 403 `model_not_priced` (fail closed; the default).
    #[default]
    Deny,
    /// Count its tokens against token rates only; money budgets see no cost.
    CountTokensOnly,
}

/// Limits tokens per minute (per key, project, token and model pattern) and money budgets
/// (per key, project and token, overall or per model pattern, per UTC day, week, month or
/// lifetime), from the limits the request's [`Principal`](keygate_core::Principal) carries.
///
/// What a request is comes from its [`RequestFacts`](keygate_core::RequestFacts), which the
/// scope layer decided once; used alone, this layer scans a JSON body itself with the same
/// scanner ([`keygate_core::facts::scan_json`]). A route that generates nothing billed
/// ([`Generation::Nothing`](keygate_core::Generation): list models, retrieve or delete
/// objects) passes with no reservation and never needs a price.
///
/// **Before forwarding, it reserves the worst case** against every limit that applies, in one
/// atomic backend call: the prompt (the text the model sees, at
/// [`with_bytes_per_token`](TokenLimitLayer::with_bytes_per_token) bytes per token, or the
/// exact count when one is known) plus the most the upstream may produce: the output cap ×
/// `max(n, best_of)` (no output for embeddings). A request that names no output cap reserves
/// the default cap ([`with_default_output_tokens`](TokenLimitLayer::with_default_output_tokens))
/// and is forwarded **with that cap set** in the route's cap field (so the upstream cannot
/// produce more), lowered to what the remaining budget and token rate can pay for (never below
/// [`with_min_output_tokens`](TokenLimitLayer::with_min_output_tokens)). A request that names
/// more than can be paid for is refused: 429 `insufficient_quota` (a budget; the message names
/// the largest cap that fits) or 429 `rate_limit_exceeded` (a token rate, with
/// `x-ratelimit-*-tokens` headers), unless
/// [`with_max_tokens_lowering`](TokenLimitLayer::with_max_tokens_lowering) clamps it instead.
///
/// **Images** whose model has prices per image
/// ([`PriceTable::with_image_prices`](crate::PriceTable::with_image_prices)) reserve `n` × the
/// price of one image at the request's `size` and `quality` (the model's defaults where the
/// request names none), and no tokens: images count against token rates only with the tokens
/// an upstream reports for them (gpt-image models do), when the response ends; OpenAI limits
/// image models by images per minute, which a request rate bounds. A budget that cannot pay
/// for `n` images is 429 `insufficient_quota` naming how many it can; a size and quality with
/// no price is unpriced (403 `model_not_priced` under a budget, or as [`Unpriced`] says). They
/// settle at the token usage reported, at the model's token price when it has one; else at the
/// images the response's `data` array holds × the price; else (a stream, an unreadable or
/// oversized body) at the reservation. A cost above the reservation (more images than `n`) is
/// charged and flagged as an over-reservation. An image model with only a token price is
/// reserved as text is.
///
/// **After**, the reservation is replaced by the actual usage, read from the response's
/// [`Usage`](keygate_core::Usage) extension, a JSON body's `usage`, or a streamed (SSE) body's
/// usage event, when the body ends; if the body is dropped early, per [`OnDisconnect`]. Streams
/// of the completions APIs always carry usage to keygate (`stream_options.include_usage` is
/// forced on); a client that did not ask for it does not see the usage chunk (it is removed
/// from the stream). An upstream that reports more than was reserved is charged what it
/// reported (the budget reflects it at once) and the request is flagged in its
/// [`UsageMeter`](keygate_core::UsageMeter) (and so in the audit record and a metric); the
/// meter also says whether usage was reported or estimated.
///
/// gRPC requests (on routes declared gRPC) are never buffered, nor are form bodies: they reserve
/// the default output cap and settle from a [`Usage`](keygate_core::Usage) response extension,
/// or at the reservation. A JSON body is handed on as the bytes read (edited only where a cap or
/// `include_usage` is set): the inner service receives a [`RequestBody`](crate::RequestBody).
///
/// Non-success responses release the reservation (unless they carry a usage); a response cut
/// by a timeout is charged its whole reservation.
///
/// Concurrency: every limit that applies is reserved in one backend call, so concurrent
/// requests can never be admitted past a limit (see [`LimitBackend`](crate::LimitBackend)); the
/// reservation ends exactly once, through a guard that settles it at the reserved amounts if
/// dropped.
#[must_use]
pub struct TokenLimitLayer<B = MemoryBackend> {
    config: Arc<Config<B>>,
}

impl<B> Clone for TokenLimitLayer<B> {
    fn clone(&self) -> Self {
        TokenLimitLayer {
            config: self.config.clone(),
        }
    }
}

impl<B> std::fmt::Debug for TokenLimitLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLimitLayer")
            .field("prices", &self.config.prices)
            .field("unpriced", &self.config.unpriced)
            .finish_non_exhaustive()
    }
}

struct Config<B> {
    backend: Arc<B>,
    clock: Clock,
    prices: PriceTable,
    unpriced: Unpriced,
    bytes_per_token: u64,
    default_output: u64,
    min_output: u64,
    max_body: usize,
    max_scan: usize,
    on_disconnect: OnDisconnect,
    include_usage: bool,
    lower_max_tokens: bool,
    guard: Option<WalletGuard>,
}

impl<B> Clone for Config<B> {
    fn clone(&self) -> Self {
        Config {
            backend: self.backend.clone(),
            clock: self.clock.clone(),
            prices: self.prices.clone(),
            unpriced: self.unpriced,
            bytes_per_token: self.bytes_per_token,
            default_output: self.default_output,
            min_output: self.min_output,
            max_body: self.max_body,
            max_scan: self.max_scan,
            on_disconnect: self.on_disconnect,
            include_usage: self.include_usage,
            lower_max_tokens: self.lower_max_tokens,
            guard: self.guard.clone(),
        }
    }
}

impl Default for TokenLimitLayer<MemoryBackend> {
    fn default() -> Self {
        Self::new(MemoryBackend::new())
    }
}

impl<B: LimitBackend> TokenLimitLayer<B> {
    /// A layer over `backend`: no prices, unpriced models denied when a budget applies, 1 byte
    /// per token, a default output ceiling of 4,096 tokens, request bodies up to 8 MiB.
    pub fn new(backend: B) -> Self {
        Self::with_shared_backend(Arc::new(backend))
    }

    /// A layer over a backend shared with others (or inspected by the host).
    pub fn with_shared_backend(backend: Arc<B>) -> Self {
        TokenLimitLayer {
            config: Arc::new(Config {
                backend,
                clock: Clock::system(),
                prices: PriceTable::new(),
                unpriced: Unpriced::Deny,
                bytes_per_token: 1,
                default_output: 4096,
                min_output: 16,
                max_body: 8 << 20,
                max_scan: 16 << 20,
                on_disconnect: OnDisconnect::Reservation,
                include_usage: true,
                lower_max_tokens: false,
                guard: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config<B>)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.config.backend
    }

    /// The clock.
    pub fn with_clock(self, clock: Clock) -> Self {
        self.edit(|c| c.clock = clock)
    }

    /// The prices.
    pub fn with_prices(self, prices: PriceTable) -> Self {
        self.edit(|c| c.prices = prices)
    }

    /// What to do with unpriced models when a budget applies.
    pub fn with_unpriced(self, unpriced: Unpriced) -> Self {
        self.edit(|c| c.unpriced = unpriced)
    }

    /// Bytes of prompt text per token, for prompts no tokenizer counted (default 1: a bound,
    /// since no token of a byte-level tokenizer is shorter than a byte; more admits more, at
    /// the risk of a prompt that costs more than was reserved).
    pub fn with_bytes_per_token(self, bytes: NonZeroU32) -> Self {
        self.edit(|c| c.bytes_per_token = u64::from(bytes.get()))
    }

    /// The output cap of a request that names none (default 4,096): reserved, and set on the
    /// forwarded request where its route has a cap field.
    pub fn with_default_output_tokens(self, tokens: u64) -> Self {
        self.edit(|c| c.default_output = tokens)
    }

    /// The smallest output cap keygate lowers a cap to, to fit what the budget and token rate
    /// can still pay for (default 16); below it the request is refused.
    pub fn with_min_output_tokens(self, tokens: u64) -> Self {
        self.edit(|c| c.min_output = tokens.max(1))
    }

    /// Largest request body read (default 8 MiB); larger ones get 413.
    pub fn with_max_body(self, bytes: usize) -> Self {
        self.edit(|c| c.max_body = bytes)
    }

    /// Largest JSON response body scanned for `usage` (default 16 MiB; larger ones settle at
    /// the reservation). Frames are kept by reference, not copied, until the end.
    pub fn with_max_response_scan(self, bytes: usize) -> Self {
        self.edit(|c| c.max_scan = bytes)
    }

    /// What to settle with when the client goes away mid-response.
    pub fn with_on_disconnect(self, on: OnDisconnect) -> Self {
        self.edit(|c| c.on_disconnect = on)
    }

    /// Whether to force `stream_options.include_usage` on in streaming completions requests
    /// (default on; the usage chunk is removed from the stream of a client that did not ask
    /// for it). Off: such streams settle at the reservation.
    pub fn with_include_usage(self, on: bool) -> Self {
        self.edit(|c| c.include_usage = on)
    }

    /// Whether to lower a request's explicit `max_tokens` / `max_completion_tokens` /
    /// `max_output_tokens` to what its tightest token rate or budget can still hold, instead
    /// of refusing it (default off). The cap is rewritten in the forwarded body (nothing else
    /// changes); a request that fits fewer than the minimum output tokens is refused as
    /// usual. (A request without an explicit cap is always given one that fits.)
    pub fn with_max_tokens_lowering(self, on: bool) -> Self {
        self.edit(|c| c.lower_max_tokens = on)
    }

    /// The denial-of-wallet guard: settled usage is fed to it, and suspended keys get 403
    /// `key_suspended`.
    pub fn with_guard(self, guard: WalletGuard) -> Self {
        self.edit(|c| c.guard = Some(guard))
    }
}

impl<S, B> Layer<S> for TokenLimitLayer<B> {
    type Service = TokenLimit<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenLimit {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`TokenLimitLayer`].
pub struct TokenLimit<S, B = MemoryBackend> {
    inner: S,
    config: Arc<Config<B>>,
}

impl<S: Clone, B> Clone for TokenLimit<S, B> {
    fn clone(&self) -> Self {
        TokenLimit {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for TokenLimit<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B> TokenLimit<S, B> {
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

type Out<ResBody> = Response<ResponseBody<TokenBody<ResBody>>>;
type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;
