//! [`TokenLimitLayer`]: tokens per minute and money budgets, reserved before and settled after.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::Full;
use keygate_core::{
    Clock, Cut, Denial, LimitScope, Limits, Principal, RequestedModel, ResponseBody, Stage, Usage,
    UsageMeter, is_grpc,
};
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::{
    Charge, CounterStatus, Exceeded, LimitBackend, MemoryBackend, Pending, Reservation,
    ReserveError, Unit, Window,
};
use crate::body::{OnDisconnect, RequestBody, Scan, Settlement, TokenBody};
use crate::guard::WalletGuard;
use crate::json::{RequestFields, SseScanner, request_fields, with_include_usage, with_max_output};
use crate::price::{Price, PriceTable};
use crate::rate::{
    duration_header, limit_header, missing_principal, num_header, owner, scope_name,
};

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
/// lifetime), from the limits the request's [`Principal`] carries.
///
/// Before forwarding, it reserves an estimate against every limit that applies, atomically:
/// prompt tokens ≈ JSON body bytes / 4 (see [`with_bytes_per_token`]), plus the request's
/// `max_tokens` / `max_completion_tokens` / `max_output_tokens` or a default output ceiling;
/// cost from the [`PriceTable`]. If any limit cannot hold it: 429 `rate_limit_exceeded` (a
/// token rate, with `x-ratelimit-*-tokens` headers) or 429 `insufficient_quota` (a budget).
///
/// After: the reservation is replaced by the actual usage, read from the response's
/// [`Usage`] extension, a JSON body's `usage`, or a streamed (SSE) body's usage event, when
/// the body ends; if the body is dropped early, per [`OnDisconnect`]. Usage and cost are
/// reported into the request's [`UsageMeter`] if any. Streaming chat requests that do not
/// ask for usage get `"stream_options":{"include_usage":true}` added (nothing else is
/// changed; the client then also receives the final usage chunk, whose `choices` is empty).
///
/// gRPC requests are never buffered, nor are bodies that are not JSON (multipart uploads,
/// audio): they reserve the default output ceiling and settle from a [`Usage`] response
/// extension, or at the reservation. A JSON body is read once (up to
/// [`with_max_body`](TokenLimitLayer::with_max_body); compressed bodies are refused with 415,
/// malformed ones or ones that repeat a key with 400) and handed on as the same bytes: the
/// inner service receives a [`RequestBody`]. A client that sets `include_usage: false`
/// explicitly is left alone; its streams settle at the reservation.
///
/// Non-success responses release the reservation (unless they carry a [`Usage`]).
///
/// Optionally ([`with_max_tokens_lowering`](TokenLimitLayer::with_max_tokens_lowering), off
/// by default), a request whose explicit output cap does not fit is forwarded with the cap
/// lowered to what still fits, instead of being refused.
///
/// Concurrency: every limit that applies is reserved in one backend call, so concurrent
/// requests can never be admitted past a limit (see [`LimitBackend`]); the reservation ends
/// exactly once, through a guard that settles it at the reserved amounts if dropped.
///
/// [`with_bytes_per_token`]: TokenLimitLayer::with_bytes_per_token
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
    /// A layer over `backend`: no prices, unpriced models denied when a budget applies, 4 bytes
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
                bytes_per_token: 4,
                default_output: 4096,
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

    /// Bytes of JSON request body per estimated prompt token (default 4).
    pub fn with_bytes_per_token(self, bytes: NonZeroU32) -> Self {
        self.edit(|c| c.bytes_per_token = u64::from(bytes.get()))
    }

    /// Output tokens reserved when the request sets no `max_tokens` (default 4,096).
    pub fn with_default_output_tokens(self, tokens: u64) -> Self {
        self.edit(|c| c.default_output = tokens)
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

    /// Whether to add `stream_options.include_usage` to streaming chat requests (default on).
    pub fn with_include_usage(self, on: bool) -> Self {
        self.edit(|c| c.include_usage = on)
    }

    /// Whether to lower a request's explicit `max_tokens` / `max_completion_tokens` /
    /// `max_output_tokens` to what its tightest token rate or budget can still hold, instead
    /// of refusing it (default off). The cap is rewritten in the forwarded body (nothing else
    /// changes); a request without an explicit cap, or that fits no output at all, is refused
    /// as usual.
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

fn has_token_limits(principal: &Principal) -> bool {
    principal.limits().any(|(_, l)| {
        l.tokens_per_minute.is_some()
            || !l.budgets.is_empty()
            || l.models.values().any(|m| m.tokens_per_minute.is_some())
    })
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for TokenLimit<S, B>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    B: LimitBackend,
{
    type Response = Out<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(principal) = req.extensions().get::<Principal>() else {
            return ResponseFuture::denied(missing_principal(Stage::TokenLimit), req.headers());
        };
        let guard = self.config.guard.as_ref();
        if guard.is_some_and(|g| g.is_suspended(principal.key_id().as_str())) {
            let denial = Denial::new(
                Stage::TokenLimit,
                StatusCode::FORBIDDEN,
                "key_suspended",
                "This API key has been suspended after an unusual spike in usage. Contact the key's owner.",
            );
            return ResponseFuture::denied(denial, req.headers());
        }
        let metered =
            !self.config.prices.is_empty() && req.extensions().get::<UsageMeter>().is_some();
        if guard.is_none() && !metered && !has_token_limits(principal) {
            // Nothing to count: no body read, no reservation.
            return ResponseFuture::pass(self.inner.call(req.map(RequestBody::inner)));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if let Some(skip) = skips_body(&req) {
            return direct(&self.config, inner, req, skip);
        }
        ResponseFuture::boxed(Box::pin(run(self.config.clone(), inner, req)))
    }
}

pin_project! {
    /// The future of [`TokenLimit`]: passes straight through when no token limit applies;
    /// otherwise reads the request, reserves, forwards and wraps the response.
    pub struct ResponseFuture<F, ResBody, E> {
        #[pin]
        kind: Kind<F, ResBody, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResBody, E> {
        Pass { #[pin] future: F },
        Denied { response: Option<Response<Full<Bytes>>> },
        Ready { response: Option<Out<ResBody>> },
        Direct {
            #[pin]
            future: F,
            after: Option<After>,
        },
        Boxed { future: BoxFuture<Out<ResBody>, E> },
    }
}

impl<F, ResBody, E> ResponseFuture<F, ResBody, E> {
    fn pass(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Pass { future },
        }
    }

    fn denied(denial: Denial, headers: &HeaderMap) -> Self {
        ResponseFuture {
            kind: Kind::Denied {
                response: Some(denial.into_response(headers)),
            },
        }
    }

    fn ready(response: Out<ResBody>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    fn direct(future: F, after: After) -> Self {
        ResponseFuture {
            kind: Kind::Direct {
                future,
                after: Some(after),
            },
        }
    }

    fn boxed(future: BoxFuture<Out<ResBody>, E>) -> Self {
        ResponseFuture {
            kind: Kind::Boxed { future },
        }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F, ResBody, E>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Out<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Pass { future } => future
                .poll(cx)
                .map(|r| r.map(|res| res.map(|b| ResponseBody::inner(TokenBody::new(b, None))))),
            KindProj::Denied { response } => {
                let response = response
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(response.map(ResponseBody::denied)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Direct { future, after } => {
                let result = std::task::ready!(future.poll(cx));
                let after = after
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(after.respond(result))
            }
            KindProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

/// What one charge is, for the refusal message.
#[derive(Clone, Copy)]
struct Meta {
    scope: LimitScope,
    budget: bool,
}

/// What each charge is, in order.
type Metas = SmallVec<[Meta; 4]>;

fn deny<ResBody>(denial: Denial, headers: &HeaderMap) -> Out<ResBody> {
    denial.into_response(headers).map(ResponseBody::denied)
}

/// `scope␟owner␟part␟part…`, joined on the stack and copied once into its shared string.
fn counter_key(scope: LimitScope, owner: &str, parts: &[&str]) -> Arc<str> {
    const SEP: &str = "\u{1f}";
    let pieces = [scope_name(scope), SEP, owner]
        .into_iter()
        .chain(parts.iter().flat_map(|p| [SEP, *p]));
    let mut buf = [0u8; 192];
    let mut len = 0;
    for piece in pieces.clone() {
        let Some(slot) = buf.get_mut(len..len + piece.len()) else {
            // Longer than the buffer (a very long pattern): on the heap.
            return pieces.collect::<String>().into();
        };
        slot.copy_from_slice(piece.as_bytes());
        len += piece.len();
    }
    // Only whole `&str`s were copied: always UTF-8.
    std::str::from_utf8(&buf[..len]).map_or_else(|_| pieces.collect::<String>().into(), Arc::from)
}

/// The counter a money budget of `owner` (a key id under [`LimitScope::Key`], a project id
/// under [`LimitScope::Project`]) is kept in, and the budget period that holds `now`: what the
/// token layer charges, and what `keygate spend show` reads back from a ledger.
pub fn budget_counter(
    scope: LimitScope,
    owner: &str,
    budget: &keygate_core::Budget,
    now: keygate_core::Timestamp,
) -> (crate::backend::CounterKey, Window) {
    let (start, end) = budget.period.window(now);
    let pattern = budget.model.as_ref().map_or("*", |p| p.as_str());
    let period = match budget.period {
        keygate_core::Period::Day => "day",
        keygate_core::Period::Week => "week",
        keygate_core::Period::Month => "month",
        _ => "lifetime",
    };
    (
        counter_key(scope, owner, &["budget", period, pattern]),
        Window::Fixed { start, end },
    )
}

/// Every charge that applies to a request of `model` estimated at `usage` and `cost`.
fn charges(
    principal: &Principal,
    model: Option<&str>,
    tokens: u64,
    cost: Option<u64>,
    now: keygate_core::Timestamp,
) -> Result<(Vec<Charge>, Metas), ()> {
    let mut charges: Vec<Charge> = Vec::new();
    let mut metas: Metas = SmallVec::new();
    let mut push = |charge: Charge, meta: Meta| {
        // The same counter twice (two budgets of one period and pattern): the lower limit.
        if let Some(c) = charges.iter_mut().find(|c| c.key == charge.key) {
            c.limit = c.limit.min(charge.limit);
        } else {
            charges.push(charge);
            metas.push(meta);
        }
    };
    let rate = |key, limit: u64| Charge {
        key,
        window: Window::Rate {
            per: Duration::from_secs(60),
        },
        unit: Unit::Tokens,
        limit,
        amount: tokens,
    };
    for (scope, limits) in principal.limits() {
        let owner = owner(principal, scope);
        let meta = Meta {
            scope,
            budget: false,
        };
        if let Some(tpm) = limits.tokens_per_minute {
            push(rate(counter_key(scope, owner, &["tpm"]), tpm.get()), meta);
        }
        if let Some(model) = model {
            for (pattern, l) in limits.for_model(model) {
                if let Some(tpm) = l.tokens_per_minute {
                    let key = counter_key(scope, owner, &["tpm", pattern]);
                    push(rate(key, tpm.get()), meta);
                }
            }
        }
        budgets(limits, model, |budget| {
            let Some(cost) = cost else {
                return Err(());
            };
            let (key, window) = budget_counter(scope, owner, budget, now);
            push(
                Charge {
                    key,
                    window,
                    unit: Unit::Nanodollars,
                    limit: budget.amount.as_nanos(),
                    amount: cost,
                },
                Meta {
                    scope,
                    budget: true,
                },
            );
            Ok(())
        })?;
    }
    Ok((charges, metas))
}

/// The budgets of `limits` that apply to `model`; a per-model budget applies when the model is
/// not known (fail closed).
fn budgets(
    limits: &Limits,
    model: Option<&str>,
    mut f: impl FnMut(&keygate_core::Budget) -> Result<(), ()>,
) -> Result<(), ()> {
    for budget in &limits.budgets {
        let applies = match (&budget.model, model) {
            (None, _) | (Some(_), None) => true,
            (Some(p), Some(m)) => p.matches(m),
        };
        if applies {
            f(budget)?;
        }
    }
    Ok(())
}

static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

fn put_token_headers(headers: &mut HeaderMap, limit: u64, remaining: u64, reset: Duration) {
    headers.reserve(3);
    headers.insert(LIMIT_TOKENS.clone(), limit_header(limit));
    headers.insert(REMAINING_TOKENS.clone(), num_header(remaining));
    let reset = u64::try_from(reset.as_nanos()).unwrap_or(u64::MAX);
    if let Some(v) = duration_header(reset) {
        headers.insert(RESET_TOKENS.clone(), v);
    }
}

fn exceeded_response<ResBody>(e: &Exceeded, meta: Meta, headers: &HeaderMap) -> Out<ResBody> {
    let scope = scope_name(meta.scope);
    let denial = if meta.budget {
        Denial::new(
            Stage::TokenLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            format!(
                "You exceeded your current quota ({scope} budget). The budget resets at the start of its next period."
            ),
        )
        .with_error_type("insufficient_quota")
    } else {
        let message = if e.retry_after.is_none() {
            format!(
                "Request too large for the tokens-per-minute limit ({scope} limit: {}).",
                e.limit
            )
        } else {
            format!(
                "Rate limit reached for tokens per minute ({scope} limit: {}, remaining: {}). Please try again later.",
                e.limit, e.remaining
            )
        };
        Denial::new(
            Stage::TokenLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            message,
        )
    }
    .with_detail(scope);
    let denial = match e.retry_after {
        Some(wait) => denial.with_retry_after(wait),
        None => denial,
    };
    let mut response = deny(denial, headers);
    if !meta.budget {
        put_token_headers(response.headers_mut(), e.limit, e.remaining, e.reset);
    }
    response
}

fn bad_request<ResBody>(code: &'static str, message: &'static str, h: &HeaderMap) -> Out<ResBody> {
    let status = match code {
        "request_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unsupported_encoding" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::BAD_REQUEST,
    };
    deny(Denial::new(Stage::TokenLimit, status, code, message), h)
}

/// A body with no `Content-Type` is read as JSON too (for the estimate); the scope layer
/// refuses such bodies on routes whose model is in the body.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_none_or(|v| v.to_str().is_ok_and(keygate_core::is_json_media_type))
}

/// The largest output a request of `prompt` tokens may ask for to fit the counter `e` refused.
fn output_that_fits(e: &Exceeded, meta: Meta, prompt: u64, price: Option<Price>) -> Option<u64> {
    if !meta.budget {
        return e.remaining.checked_sub(prompt);
    }
    let price = price?;
    let per_million = u128::from(price.output_per_million.as_nanos());
    if per_million == 0 {
        return None;
    }
    let left = e
        .remaining
        .checked_sub(price.cost(Usage::new(prompt, 0)).as_nanos())?;
    // `Price::cost` rounds each part up: ceil(o × p / 10⁶) ≤ left ⇔ o × p ≤ left × 10⁶.
    u64::try_from(u128::from(left) * 1_000_000 / per_million).ok()
}

/// The bytes to forward: as read, with the output cap lowered if it was, and with
/// `stream_options.include_usage` added to a streaming completion that does not say.
fn forward_body<B>(
    config: &Config<B>,
    parts: &mut http::request::Parts,
    bytes: Bytes,
    fields: Option<RequestFields>,
    lowered: Option<u64>,
) -> Bytes {
    let Some(mut fields) = fields else {
        return bytes;
    };
    let mut forward = bytes;
    let mut changed = false;
    if let Some(to) = lowered {
        forward = Bytes::from(with_max_output(&forward, &fields, to));
        changed = true;
        match request_fields(&forward) {
            Ok(f) => fields = f,
            // Cannot happen (one number replaced another); then add nothing more.
            Err(_) => fields.stream = false,
        }
    }
    let path = parts.uri.path();
    if config.include_usage
        && parts.method == Method::POST
        && path.ends_with("/completions")
        && let Some(with_usage) = with_include_usage(&forward, &fields)
    {
        forward = Bytes::from(with_usage);
        changed = true;
    }
    if changed && parts.headers.contains_key(CONTENT_LENGTH) {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(forward.len()));
    }
    forward
}

/// The request body as the layer holds it before forwarding.
enum Incoming<B> {
    /// Not read (gRPC, not JSON): handed on untouched.
    Unread(B),
    /// Read; its fields when it was not empty.
    Read(Bytes, Option<RequestFields>),
}

async fn run<S, B, ReqBody, ResBody>(
    config: Arc<Config<B>>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Out<ResBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ResBody: Body<Data = Bytes>,
    B: LimitBackend,
{
    let (mut parts, body) = req.into_parts();
    let principal = match parts.extensions.get::<Principal>() {
        Some(p) => p,
        None => return Ok(deny(missing_principal(Stage::TokenLimit), &parts.headers)),
    };
    let grpc = is_grpc(&parts.headers);
    let mut model = parts
        .extensions
        .get::<RequestedModel>()
        .map(|m| m.as_str().to_owned());
    let mut prompt = 0;
    let mut max_output = None;
    let mut streaming = false;
    let incoming = if grpc || !is_json(&parts.headers) {
        // Never buffer a gRPC call; other bodies (multipart uploads, binary) are not counted
        // and pass untouched: they reserve the default output ceiling.
        Incoming::Unread(body)
    } else {
        if parts
            .headers
            .get(CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Ok(bad_request(
                "unsupported_encoding",
                "Compressed request bodies are not accepted.",
                &parts.headers,
            ));
        }
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.max_body as u64) {
            return Ok(bad_request(
                "request_too_large",
                "The request body is too large.",
                &parts.headers,
            ));
        }
        let bytes = match read_body(body, config.max_body).await {
            Ok(b) => b,
            Err(code) => {
                let message = if code == "request_too_large" {
                    "The request body is too large."
                } else {
                    "The request body could not be read."
                };
                return Ok(bad_request(code, message, &parts.headers));
            }
        };
        if bytes.is_empty() {
            Incoming::Read(bytes, None)
        } else {
            let Ok(fields) = request_fields(&bytes) else {
                return Ok(bad_request(
                    "invalid_json",
                    "The request body is not a valid JSON object (or repeats a key).",
                    &parts.headers,
                ));
            };
            prompt = (bytes.len() as u64).div_ceil(config.bytes_per_token);
            max_output = fields.max_output;
            streaming = fields.stream;
            if model.is_none() {
                model.clone_from(&fields.model);
            }
            Incoming::Read(bytes, Some(fields))
        }
    };
    let price = model.as_deref().and_then(|m| config.prices.price(m));
    let now = config.clock.now();
    let mut output = max_output.unwrap_or(config.default_output);
    let mut lowered = None;
    let mut attempts = 0;
    let (reservation, estimate) = loop {
        let plan = plan(
            &config,
            principal,
            model.as_deref(),
            price,
            prompt,
            output,
            now,
        );
        let (estimate, charges, metas) = match plan {
            Ok(plan) => plan,
            Err(denial) => return Ok(deny(denial, &parts.headers)),
        };
        if charges.is_empty() {
            break (Default::default(), estimate);
        }
        match config.backend.reserve(charges, now).await {
            Ok(r) => break (r, estimate),
            Err(ReserveError::Exceeded(e)) => {
                let meta = meta_of(&metas, e.index);
                attempts += 1;
                // Lower an explicit output cap to what fits, rather than refuse (opt-in).
                let fits = (config.lower_max_tokens && max_output.is_some() && attempts <= 8)
                    .then(|| output_that_fits(&e, meta, prompt, price))
                    .flatten();
                match fits {
                    Some(fits) if fits > 0 && fits < output => {
                        output = fits;
                        lowered = Some(fits);
                    }
                    _ => return Ok(exceeded_response(&e, meta, &parts.headers)),
                }
            }
            Err(e) => return Ok(refused(&e, &metas, &parts.headers)),
        }
    };
    let guard = config.guard.clone().map(|g| (g, principal.clone()));
    let body = match incoming {
        Incoming::Unread(body) => RequestBody::inner(body),
        Incoming::Read(bytes, fields) => {
            RequestBody::buffered(forward_body(&config, &mut parts, bytes, fields, lowered))
        }
    };
    let after = After::new(
        &config,
        reservation,
        estimate,
        price,
        parts.extensions.get::<UsageMeter>().cloned(),
        guard,
        grpc,
        streaming,
    );
    after.respond(inner.call(Request::from_parts(parts, body)).await)
}

/// How a request whose body is not read passes: untouched (gRPC, not JSON), or as the empty
/// body it is (the same bytes a read would have given).
#[derive(Clone, Copy)]
enum Skip {
    Untouched,
    Empty,
}

/// Whether the request body can be handed on without reading it: gRPC and non-JSON bodies
/// are never read; an empty JSON body has nothing to count (once it passes the checks a
/// read body would).
fn skips_body<B: Body>(req: &Request<B>) -> Option<Skip> {
    let headers = req.headers();
    if is_grpc(headers) || !is_json(headers) {
        return Some(Skip::Untouched);
    }
    let identity = headers
        .get(CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let length_ok = headers.get(CONTENT_LENGTH).is_none_or(|v| v == "0");
    (req.body().is_end_stream() && identity && length_ok).then_some(Skip::Empty)
}

/// A request whose body is not read: planned and, when the backend answers at once
/// ([`LimitBackend::reserve_at_once`]; the in-memory one always does), reserved right here,
/// so that the returned future only waits for the inner service: no boxed future, no copy
/// of the request into one. A backend that must wait gets a boxed future that waits for it.
fn direct<S, B, ReqBody, ResBody>(
    config: &Arc<Config<B>>,
    mut inner: S,
    req: Request<ReqBody>,
    skip: Skip,
) -> ResponseFuture<S::Future, ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    B: LimitBackend,
{
    let headers = req.headers();
    let Some(principal) = req.extensions().get::<Principal>() else {
        return ResponseFuture::denied(missing_principal(Stage::TokenLimit), headers);
    };
    let grpc = is_grpc(headers);
    let model = req
        .extensions()
        .get::<RequestedModel>()
        .map(RequestedModel::as_str);
    let price = model.and_then(|m| config.prices.price(m));
    let now = config.clock.now();
    let (estimate, charges, metas) = match plan(
        config,
        principal,
        model,
        price,
        0,
        config.default_output,
        now,
    ) {
        Ok(plan) => plan,
        Err(denial) => return ResponseFuture::denied(denial, headers),
    };
    let guard = config.guard.clone().map(|g| (g, principal.clone()));
    let meter = req.extensions().get::<UsageMeter>().cloned();
    let forward = move |req: Request<ReqBody>| {
        req.map(|body| match skip {
            Skip::Untouched => RequestBody::inner(body),
            Skip::Empty => RequestBody::buffered(Bytes::new()),
        })
    };
    let reservation = if charges.is_empty() {
        Reservation::default()
    } else {
        match config.backend.reserve_at_once(charges, now) {
            Ok(Ok(reservation)) => reservation,
            Ok(Err(e)) => return ResponseFuture::ready(refused(&e, &metas, headers)),
            Err(charges) => {
                let config = config.clone();
                // Reserved when first polled, as on the read path: a future dropped unpolled
                // holds nothing.
                return ResponseFuture::boxed(Box::pin(async move {
                    let reservation = match config.backend.reserve(charges, now).await {
                        Ok(reservation) => reservation,
                        Err(e) => return Ok(refused(&e, &metas, req.headers())),
                    };
                    let after = After::new(
                        &config,
                        reservation,
                        estimate,
                        price,
                        meter,
                        guard,
                        grpc,
                        false,
                    );
                    after.respond(inner.call(forward(req)).await)
                }));
            }
        }
    };
    let after = After::new(
        config,
        reservation,
        estimate,
        price,
        meter,
        guard,
        grpc,
        false,
    );
    ResponseFuture::direct(inner.call(forward(req)), after)
}

/// The estimate and charges of a request of `prompt` tokens asking for up to `output`;
/// `Err`: the refusal of an unpriced model under a budget.
fn plan<B>(
    config: &Config<B>,
    principal: &Principal,
    model: Option<&str>,
    price: Option<Price>,
    prompt: u64,
    output: u64,
    now: keygate_core::Timestamp,
) -> Result<(Usage, Vec<Charge>, Metas), Denial> {
    let estimate = Usage::new(prompt, output);
    let cost = match (price, config.unpriced) {
        (Some(p), _) => Some(p.cost(estimate).as_nanos()),
        (None, Unpriced::CountTokensOnly) => Some(0),
        (None, Unpriced::Deny) => None,
    };
    match charges(principal, model, estimate.total_tokens, cost, now) {
        Ok((charges, metas)) => Ok((estimate, charges, metas)),
        Err(()) => Err(Denial::new(
            Stage::TokenLimit,
            StatusCode::FORBIDDEN,
            "model_not_priced",
            "A spending budget applies to this key, but the model has no price.",
        )
        .with_param("model")),
    }
}

fn meta_of(metas: &Metas, index: usize) -> Meta {
    metas.get(index).copied().unwrap_or(Meta {
        scope: LimitScope::Key,
        budget: false,
    })
}

/// The answer to a reservation that was not made.
fn refused<ResBody>(e: &ReserveError, metas: &Metas, headers: &HeaderMap) -> Out<ResBody> {
    match e {
        ReserveError::Exceeded(e) => exceeded_response(e, meta_of(metas, e.index), headers),
        _ => deny(
            Denial::unavailable(Stage::TokenLimit, "limit_backend"),
            headers,
        ),
    }
}

/// What happens once the inner service answers an admitted request: its reservation ends
/// (now, or when the response body does) and the token headers are added.
struct After {
    settlement: Box<Settlement>,
    tokens: Option<CounterStatus>,
    grpc: bool,
    streaming: bool,
    max_scan: usize,
}

impl After {
    #[allow(clippy::too_many_arguments)]
    fn new<B: LimitBackend>(
        config: &Config<B>,
        reservation: Reservation,
        estimate: Usage,
        price: Option<Price>,
        meter: Option<UsageMeter>,
        guard: Option<(WalletGuard, Principal)>,
        grpc: bool,
        streaming: bool,
    ) -> Self {
        let tokens = reservation.tokens;
        let pending = Pending::new(config.backend.clone(), reservation, config.clock.clone());
        After {
            settlement: Box::new(Settlement {
                pending,
                estimate,
                price,
                meter,
                guard,
                on_disconnect: config.on_disconnect,
                scan: Scan::Nothing,
                done: false,
            }),
            tokens,
            grpc,
            streaming,
            max_scan: config.max_scan,
        }
    }

    fn respond<ResBody, E>(self, result: Result<Response<ResBody>, E>) -> Result<Out<ResBody>, E> {
        let After {
            mut settlement,
            tokens,
            grpc,
            streaming,
            max_scan,
        } = self;
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                settlement.release();
                return Err(e);
            }
        };
        if let Some(usage) = response.extensions().get::<Usage>().copied() {
            settlement.finish_with(Some(usage));
        } else if response.extensions().get::<Cut>().is_some() {
            // Cut by a timeout: the upstream may have generated up to the whole reservation.
            settlement.finish_with(None);
        } else if !response.status().is_success() && !grpc {
            settlement.release();
        } else {
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .map(HeaderValue::as_bytes);
            settlement.scan = match content_type {
                Some(ct) if ct.starts_with(b"text/event-stream") => {
                    Scan::Sse(SseScanner::default())
                }
                Some(ct) if ct.starts_with(b"application/json") && !streaming => {
                    Scan::json(max_scan)
                }
                _ => Scan::Nothing,
            };
        }
        if let Some(s) = tokens {
            put_token_headers(response.headers_mut(), s.limit, s.remaining, s.reset);
        }
        let settlement = (!settlement.done).then_some(settlement);
        Ok(response.map(|body| ResponseBody::inner(TokenBody::new(body, settlement))))
    }
}

async fn read_body<B>(body: B, max: usize) -> Result<Bytes, &'static str>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|_| "unreadable_body")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > max {
            return Err("request_too_large");
        }
        match (&mut first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut all = BytesMut::with_capacity(len);
                all.extend_from_slice(f);
                all.extend_from_slice(&data);
                rest = Some(all);
            }
            (Some(_), Some(all)) => all.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(all)) => all.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Actual;
    use crate::test_support::*;
    use futures_util::stream;
    use http_body::Frame;
    use http_body_util::StreamBody;
    use keygate_core::{Budget, ManualClock, Money, Period, Timestamp};
    use std::convert::Infallible;
    use std::num::NonZeroU64;
    use std::sync::Mutex;
    use tower::{ServiceBuilder, ServiceExt};

    const MINI: &str = "gpt-4o-mini";

    fn prices() -> PriceTable {
        PriceTable::new()
            .with_price(
                MINI,
                Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
            )
            .unwrap()
    }

    fn start() -> Timestamp {
        Timestamp::parse_rfc3339("2026-03-31T23:59:00Z").unwrap()
    }

    fn layer(manual: &ManualClock) -> TokenLimitLayer {
        TokenLimitLayer::default()
            .with_clock(manual.clock())
            .with_prices(prices())
    }

    fn day_budget(dollars_nanos: u64) -> Budget {
        Budget {
            amount: Money::from_nanos(dollars_nanos),
            period: Period::Day,
            model: None,
        }
    }

    fn budget_used(layer: &TokenLimitLayer, owner: &str, now: Timestamp) -> u64 {
        let (start, end) = Period::Day.window(now);
        let key = format!("key\u{1f}{owner}\u{1f}budget\u{1f}day\u{1f}*");
        layer
            .backend()
            .used(&key, Window::Fixed { start, end }, u64::MAX, now)
            .unwrap_or(0)
    }

    fn tpm_used(layer: &TokenLimitLayer, owner: &str, now: Timestamp) -> u64 {
        let key = format!("key\u{1f}{owner}\u{1f}tpm");
        let window = Window::Rate {
            per: Duration::from_secs(60),
        };
        layer
            .backend()
            .used(&key, window, 1_000_000, now)
            .unwrap_or(0)
    }

    fn chat(p: &Principal, body: &str) -> Request<Full<Bytes>> {
        let mut r = Request::post("/v1/chat/completions")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        r.extensions_mut().insert(p.clone());
        r
    }

    fn json_response(body: &'static str) -> Response<Full<Bytes>> {
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    const USAGE_JSON: &str =
        r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150}}"#;
    // 100 × $0.15/M + 50 × $0.60/M.
    const USAGE_COST: u64 = 15_000 + 30_000;

    #[test]
    fn counter_keys_join_scope_owner_and_parts_with_unit_separators() {
        assert_eq!(
            &*counter_key(LimitScope::Key, "key_a", &["tpm"]),
            "key\u{1f}key_a\u{1f}tpm"
        );
        assert_eq!(
            &*counter_key(LimitScope::Project, "p", &["budget", "day", "*"]),
            "project\u{1f}p\u{1f}budget\u{1f}day\u{1f}*"
        );
        // Longer than the stack buffer: the same key, built on the heap.
        let pattern = "m".repeat(300);
        assert_eq!(
            &*counter_key(LimitScope::Token, "tok", &["tpm", &pattern]),
            format!("token\u{1f}tok\u{1f}tpm\u{1f}{pattern}")
        );
    }

    #[tokio::test]
    async fn json_response_settles_once_at_actual_usage_and_reports_the_meter() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response(USAGE_JSON))
            },
        );
        let p = principal_with(|k, _| {
            k.budgets.push(day_budget(1_000_000_000));
            k.tokens_per_minute = NonZeroU64::new(100_000);
        });
        let meter = UsageMeter::new();
        let mut req = chat(&p, r#"{"model":"gpt-4o-mini","max_tokens":1000}"#);
        req.extensions_mut().insert(meter.clone());
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "100000");
        // Reserved while the body is unread: more than the actual.
        assert!(budget_used(&layer, "key_a", manual.now()) > USAGE_COST);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, USAGE_JSON.as_bytes());
        assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
        assert_eq!(tpm_used(&layer, "key_a", manual.now()), 150);
        assert_eq!(meter.usage(), Some(Usage::new(100, 50)));
        assert_eq!(meter.cost(), Some(Money::from_nanos(USAGE_COST)));
    }

    #[tokio::test]
    async fn usage_extension_from_the_handler_settles_at_once() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                let mut res = Response::new(Full::new(Bytes::from_static(b"x")));
                res.extensions_mut().insert(Usage::new(10, 0));
                Ok::<_, Infallible>(res)
            },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000)));
        let res = svc
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","max_tokens":1}"#))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(budget_used(&layer, "key_a", manual.now()), 1500);
        drop(res);
        assert_eq!(budget_used(&layer, "key_a", manual.now()), 1500);
    }

    fn sse_frames() -> Vec<&'static str> {
        vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":",
            "100,\"completion_tokens\":50,\"total_tokens\":150}}\n\ndata: [DONE]\n\n",
        ]
    }

    type Sse = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn sse_response() -> Response<Sse> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = sse_frames()
            .into_iter()
            .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
            .collect();
        Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .body(StreamBody::new(stream::iter(frames)))
            .unwrap()
    }

    #[tokio::test]
    async fn streamed_response_settles_from_its_usage_chunk_and_gets_include_usage() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            move |r: Request<RequestBody<Full<Bytes>>>| {
                let seen = seen2.clone();
                async move {
                    let len = r.headers()[CONTENT_LENGTH].clone();
                    let body = r.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(len, body.len().to_string().as_str());
                    seen.lock().unwrap().push(body);
                    Ok::<_, Infallible>(sse_response())
                }
            },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        let sent = r#"{"model":"gpt-4o-mini","stream":true}"#;
        let mut req = chat(&p, sent);
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(sent.len()));
        let res = svc.oneshot(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, sse_frames().concat().as_bytes());
        assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
        assert_eq!(
            seen.lock().unwrap()[0],
            br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#[..]
        );
    }

    async fn disconnect_after_first_frame(layer: &TokenLimitLayer, p: &Principal) {
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(sse_response()) },
        );
        let res = svc
            .oneshot(chat(
                p,
                r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100}"#,
            ))
            .await
            .unwrap();
        let mut body = res.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
    }

    #[tokio::test]
    async fn disconnect_mid_stream_settles_once_at_the_reservation() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        disconnect_after_first_frame(&layer, &p).await;
        let body_len = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100}"#.len() as u64;
        let estimate = Usage::new(body_len.div_ceil(4), 100);
        let cost = prices().price(MINI).unwrap().cost(estimate).as_nanos();
        assert_eq!(budget_used(&layer, "key_a", manual.now()), cost);
    }

    #[tokio::test]
    async fn disconnect_after_the_usage_chunk_can_settle_at_usage_seen() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual).with_on_disconnect(OnDisconnect::UsageSeen);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(sse_response()) },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        let res = svc
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","stream":true}"#))
            .await
            .unwrap();
        let mut body = res.into_body();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        drop(body);
        assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
    }

    #[tokio::test]
    async fn budget_refuses_with_insufficient_quota_until_the_utc_day_turns() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual).with_default_output_tokens(0);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response(USAGE_JSON))
            },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(USAGE_COST + 10)));
        let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let denial = res.extensions().get::<Denial>().unwrap();
        assert_eq!(denial.code(), "insufficient_quota");
        // Until 00:00 UTC: 60 s away.
        assert_eq!(res.headers()["retry-after"], "60");
        manual.advance(Duration::from_secs(59));
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        manual.advance(Duration::from_secs(1));
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn token_rate_refuses_with_rate_limit_exceeded_and_token_headers() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response(
                    r#"{"usage":{"prompt_tokens":10,"completion_tokens":90}}"#,
                ))
            },
        );
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(150));
        let body = r#"{"model":"gpt-4o-mini","max_tokens":92}"#; // 40 bytes: 10 + 92
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "48");
        res.into_body().collect().await.unwrap();
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "rate_limit_exceeded"
        );
        assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "150");
        assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "50");
        // 52 tokens over at 150/min: 20.8 s.
        assert_eq!(res.headers()["retry-after-ms"], "20800");
        assert_eq!(res.headers()["retry-after"], "21");
    }

    #[tokio::test]
    async fn unpriced_model_under_a_budget_is_denied_or_counted_by_tokens() {
        let manual = ManualClock::new(start());
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000)));
        let handler = |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response("{}"))
        };
        let deny = ServiceBuilder::new()
            .layer(layer(&manual))
            .service_fn(handler);
        let res = deny.oneshot(chat(&p, r#"{"model":"o9"}"#)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "model_not_priced"
        );
        let count = ServiceBuilder::new()
            .layer(layer(&manual).with_unpriced(Unpriced::CountTokensOnly))
            .service_fn(handler);
        let res = count.oneshot(chat(&p, r#"{"model":"o9"}"#)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn bad_bodies_are_refused() {
        let manual = ManualClock::new(start());
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000_000));
        let svc = ServiceBuilder::new()
            .layer(layer(&manual).with_max_body(64))
            .service_fn(|_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response("{}"))
            });
        let dup = r#"{"max_tokens":1,"max_tokens":100000}"#;
        assert_eq!(
            svc.clone().oneshot(chat(&p, dup)).await.unwrap().status(),
            400
        );
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(100));
        assert_eq!(
            svc.clone().oneshot(chat(&p, &big)).await.unwrap().status(),
            413
        );
        let mut gz = chat(&p, "{}");
        gz.headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(svc.clone().oneshot(gz).await.unwrap().status(), 415);
    }

    #[tokio::test]
    async fn upstream_error_status_releases_the_reservation() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                let mut res = json_response(r#"{"error":{}}"#);
                *res.status_mut() = StatusCode::BAD_GATEWAY;
                Ok::<_, Infallible>(res)
            },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        let res = svc
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(budget_used(&layer, "key_a", manual.now()), 0);
    }

    #[tokio::test]
    async fn a_response_cut_by_a_timeout_is_charged_the_whole_reservation() {
        // The same 504 twice: once as a plain upstream error (released), once marked as cut by
        // a timeout (the upstream may have done the work: charged what was reserved).
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            move |_r: Request<RequestBody<Full<Bytes>>>| {
                let cut = flag.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    let mut res = json_response(r#"{"error":{}}"#);
                    *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                    if cut {
                        res.extensions_mut().insert(Cut::UpstreamHead);
                    }
                    Ok::<_, Infallible>(res)
                }
            },
        );
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        let body = r#"{"model":"gpt-4o-mini","max_tokens":100}"#;
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(budget_used(&layer, "key_a", manual.now()), 0);

        cut.store(true, std::sync::atomic::Ordering::SeqCst);
        let res = svc.oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        res.into_body().collect().await.unwrap();
        let estimate = Usage::new((body.len() as u64).div_ceil(4), 100);
        let reserved = prices().price(MINI).unwrap().cost(estimate).as_nanos();
        assert_eq!(budget_used(&layer, "key_a", manual.now()), reserved);
    }

    #[tokio::test]
    async fn key_without_token_limits_passes_untouched_and_missing_principal_is_401() {
        let manual = ManualClock::new(start());
        let svc = ServiceBuilder::new().layer(layer(&manual)).service_fn(
            |r: Request<RequestBody<Full<Bytes>>>| async move {
                // The original body, not a buffered copy.
                assert!(format!("{:?}", r.body()).contains("Inner"));
                Ok::<_, Infallible>(json_response("{}"))
            },
        );
        let p = principal_with(|_, _| {});
        assert_eq!(
            svc.clone().oneshot(chat(&p, "{}")).await.unwrap().status(),
            200
        );
        let res = svc.oneshot(Request::new(empty())).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn suspended_key_is_refused_and_a_spike_suspends() {
        let manual = ManualClock::new(start());
        let guard = WalletGuard::new()
            .with_clock(manual.clock())
            .with_ceiling(Some(200), None);
        let layer = layer(&manual).with_guard(guard.clone());
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response(USAGE_JSON))
            },
        );
        let p = principal_with(|_, _| {});
        for _ in 0..2 {
            let res = svc.clone().oneshot(chat(&p, "{}")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }
        assert!(guard.is_suspended("key_a"));
        let res = svc.clone().oneshot(chat(&p, "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "key_suspended"
        );
        guard.reinstate("key_a");
        assert_eq!(
            svc.oneshot(chat(&p, "{}")).await.unwrap().status(),
            StatusCode::OK
        );
    }

    /// A service answering `USAGE_JSON` that records every body it was sent.
    #[allow(clippy::type_complexity)]
    fn recording(
        layer: TokenLimitLayer,
    ) -> (
        impl Service<
            Request<Full<Bytes>>,
            Response = Out<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
        Arc<Mutex<Vec<Bytes>>>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            move |r: Request<RequestBody<Full<Bytes>>>| {
                let seen = seen2.clone();
                async move {
                    let body = r.into_body().collect().await.unwrap().to_bytes();
                    seen.lock().unwrap().push(body);
                    Ok::<_, Infallible>(json_response(USAGE_JSON))
                }
            },
        );
        (svc, seen)
    }

    const CAPPED: &str = r#"{"model":"gpt-4o-mini","max_tokens":1000}"#;

    fn capped_prompt() -> u64 {
        (CAPPED.len() as u64).div_ceil(4)
    }

    #[tokio::test]
    async fn output_cap_lowering_is_off_by_default() {
        let manual = ManualClock::new(start());
        // Room for the prompt and 100 output tokens only (150 and 600 nano-dollars a token).
        let budget = capped_prompt() * 150 + 100 * 600;
        let p = principal_with(|k, _| k.budgets.push(day_budget(budget)));
        let (svc, seen) = recording(layer(&manual));
        let res = svc.oneshot(chat(&p, CAPPED)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn output_cap_is_lowered_to_what_the_tightest_limit_holds_when_enabled() {
        let manual = ManualClock::new(start());
        let budget = capped_prompt() * 150 + 100 * 600;
        // The budget holds 100 output tokens, the token rate 60: 60 it is.
        let p = principal_with(|k, _| {
            k.budgets.push(day_budget(budget));
            k.tokens_per_minute = NonZeroU64::new(capped_prompt() + 60);
        });
        let layer = layer(&manual).with_max_tokens_lowering(true);
        let (svc, seen) = recording(layer.clone());
        let res = svc.clone().oneshot(chat(&p, CAPPED)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            seen.lock().unwrap()[0],
            br#"{"model":"gpt-4o-mini","max_tokens":60}"#[..]
        );
        assert_eq!(
            budget_used(&layer, "key_a", manual.now()),
            capped_prompt() * 150 + 60 * 600
        );
        drop(res);
        // Only the budget binds now: 100 output tokens.
        let p = principal_named("key_b", "p", |k, _| k.budgets.push(day_budget(budget)));
        seen.lock().unwrap().clear();
        let res = svc.clone().oneshot(chat(&p, CAPPED)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        drop(res);
        // A request without an explicit cap is refused, not rewritten.
        let res = svc
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            seen.lock().unwrap()[..],
            [Bytes::from_static(
                br#"{"model":"gpt-4o-mini","max_tokens":100}"#
            )]
        );
    }

    #[tokio::test]
    async fn per_model_token_rate_applies_to_matching_models_only() {
        let manual = ManualClock::new(start());
        let p = principal_with(|k, _| {
            k.models.insert(
                "gpt-4o*".into(),
                keygate_core::ModelLimits {
                    requests_per_minute: None,
                    tokens_per_minute: NonZeroU64::new(200),
                },
            );
        });
        let layer = layer(&manual).with_unpriced(Unpriced::CountTokensOnly);
        let (svc, _) = recording(layer.clone());
        let body = |m: &str| format!(r#"{{"model":"{m}","max_tokens":150}}"#);
        let res = svc.clone().oneshot(chat(&p, &body(MINI))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "200");
        drop(res);
        let res = svc.clone().oneshot(chat(&p, &body(MINI))).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "rate_limit_exceeded"
        );
        let res = svc.oneshot(chat(&p, &body("o1"))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!res.headers().contains_key("x-ratelimit-limit-tokens"));
    }

    #[tokio::test]
    async fn project_budget_binds_every_key_of_the_project() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual).with_default_output_tokens(0);
        let (svc, _) = recording(layer.clone());
        // Each request settles at USAGE_COST; the project holds two of them.
        let budget = |_: &mut Limits, p: &mut Limits| p.budgets.push(day_budget(2 * USAGE_COST));
        let a = principal_named("key_a", "p1", budget);
        let b = principal_named("key_b", "p1", budget);
        let other = principal_named("key_c", "p2", budget);
        let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
        for p in [&a, &b] {
            let res = svc.clone().oneshot(chat(p, body)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }
        let res = svc.clone().oneshot(chat(&a, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            "insufficient_quota"
        );
        let res = svc.oneshot(chat(&other, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn per_model_budget_charges_only_matching_models() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual)
            .with_default_output_tokens(0)
            .with_unpriced(Unpriced::CountTokensOnly);
        let (svc, _) = recording(layer.clone());
        let p = principal_with(|k, _| {
            k.budgets.push(Budget {
                amount: Money::from_nanos(USAGE_COST),
                period: Period::Day,
                model: Some(keygate_core::ModelPattern::new("gpt-4o*").unwrap()),
            })
        });
        let mini = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
        let res = svc.clone().oneshot(chat(&p, mini)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
        let res = svc.clone().oneshot(chat(&p, mini)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let other = r#"{"model":"o1","max_tokens":1}"#;
        for _ in 0..3 {
            let res = svc.clone().oneshot(chat(&p, other)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn week_and_month_budgets_reset_at_their_utc_boundary_and_lifetime_never() {
        let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
        // Sunday 2026-04-05 and Tuesday 2026-03-31, each one minute before midnight UTC.
        for (period, at) in [
            (Period::Week, "2026-04-05T23:59:00Z"),
            (Period::Month, "2026-03-31T23:59:00Z"),
            (Period::Lifetime, "2026-03-31T23:59:00Z"),
        ] {
            let manual = ManualClock::new(Timestamp::parse_rfc3339(at).unwrap());
            let layer = layer(&manual).with_default_output_tokens(0);
            let (svc, _) = recording(layer.clone());
            let p = principal_with(|k, _| {
                k.budgets.push(Budget {
                    amount: Money::from_nanos(USAGE_COST),
                    period,
                    model: None,
                })
            });
            let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{period:?}");
            res.into_body().collect().await.unwrap();
            manual.advance(Duration::from_secs(59));
            let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{period:?}");
            manual.advance(Duration::from_secs(1));
            let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
            let expected = if period == Period::Lifetime {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            assert_eq!(res.status(), expected, "{period:?}");
        }
    }

    #[test]
    fn thousand_concurrent_requests_admit_exactly_what_fits() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        let body = r#"{"model":"gpt-4o-mini","max_tokens":100}"#;
        let estimate = Usage::new((body.len() as u64).div_ceil(4), 100);
        let cost = prices().price(MINI).unwrap().cost(estimate).as_nanos();
        let fits = 137u64;
        type Setup = fn(&mut Limits, u64, u64);
        let cases: [(Setup, &str); 2] = [
            (
                |k, _tokens, cost| k.budgets.push(day_budget(cost * 137 + cost / 2)),
                "budget",
            ),
            (
                |k, tokens, _cost| k.tokens_per_minute = NonZeroU64::new(tokens * 137 + 1),
                "tpm",
            ),
        ];
        for (setup, name) in cases {
            let manual = ManualClock::new(start());
            let layer = layer(&manual);
            let p = principal_with(|k, _| setup(k, estimate.total_tokens, cost));
            let admitted = rt.block_on(async {
                let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
                    move |_r: Request<RequestBody<Full<Bytes>>>| async move {
                        tokio::task::yield_now().await;
                        let mut res = Response::new(Full::new(Bytes::new()));
                        res.extensions_mut().insert(estimate);
                        Ok::<_, Infallible>(res)
                    },
                );
                let tasks: Vec<_> = (0..1000)
                    .map(|_| {
                        let svc = svc.clone();
                        let req = chat(&p, body);
                        tokio::spawn(async move {
                            let res = svc.oneshot(req).await.unwrap();
                            res.status() == StatusCode::OK
                        })
                    })
                    .collect();
                let mut n = 0u64;
                for t in tasks {
                    n += u64::from(t.await.unwrap());
                }
                n
            });
            assert_eq!(admitted, fits, "{name}");
            if name == "budget" {
                assert_eq!(budget_used(&layer, "key_a", manual.now()), cost * fits);
            } else {
                assert_eq!(
                    tpm_used(&layer, "key_a", manual.now()),
                    estimate.total_tokens * fits
                );
            }
        }
    }

    #[tokio::test]
    async fn works_under_axum_with_the_rate_layer() {
        use axum::routing::post;
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let router = axum::Router::new().route(
            "/v1/chat/completions",
            post(|| async { ([(CONTENT_TYPE, "application/json")], USAGE_JSON) }),
        );
        let p = principal_with(|k, _| {
            k.budgets.push(day_budget(1_000_000_000));
            k.requests_per_minute = std::num::NonZeroU32::new(5);
        });
        let svc = ServiceBuilder::new()
            .layer(crate::RateLimitLayer::new().with_clock(manual.clock()))
            .layer(layer.clone())
            .service(router);
        let res = svc
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "4");
        res.into_body().collect().await.unwrap();
        assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
    }

    /// A real hyper HTTP/1 server on 127.0.0.1 with both layers over `Incoming` bodies, and
    /// a hyper client: a streamed response settles at its usage chunk, and the next request
    /// is refused on the wire with the rate headers.
    #[tokio::test]
    async fn works_in_a_hyper_server_over_incoming_bodies() {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;

        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let p = principal_with(|k, _| {
            k.budgets.push(day_budget(1_000_000_000));
            k.requests_per_minute = std::num::NonZeroU32::new(1);
        });
        let server_layer = layer.clone();
        let rate = crate::RateLimitLayer::new().with_clock(manual.clock());
        let server = async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = ServiceBuilder::new()
                .map_request(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(p.clone());
                    req
                })
                .layer(rate)
                .layer(server_layer)
                .service_fn(
                    |r: Request<RequestBody<hyper::body::Incoming>>| async move {
                        let body = r.into_body().collect().await.unwrap().to_bytes();
                        assert!(memchr::memmem::find(&body, b"include_usage").is_some());
                        Ok::<_, Infallible>(sse_response())
                    },
                );
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await
                .unwrap();
        };
        let client = async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .unwrap();
            let talk = async move {
                let send = || {
                    Request::post("/v1/chat/completions")
                        .header("host", "localhost")
                        .header(CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"model":"gpt-4o-mini","stream":true}"#,
                        )))
                        .unwrap()
                };
                let res = sender.send_request(send()).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, sse_frames().concat().as_bytes());
                let res = sender.send_request(send()).await.unwrap();
                assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
                assert_eq!(res.headers()["retry-after"], "60");
                let body = res.into_body().collect().await.unwrap().to_bytes();
                let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(doc["error"]["code"], "rate_limit_exceeded");
            };
            let (conn, ()) = tokio::join!(conn, talk);
            conn.unwrap();
        };
        tokio::join!(server, client);
        assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
    }

    #[tokio::test]
    async fn grpc_passes_both_layers_without_buffering() {
        let manual = ManualClock::new(start());
        let (_reporter, health) = tonic_health::server::health_reporter();
        let p = principal_with(|k, _| {
            k.tokens_per_minute = NonZeroU64::new(10_000);
            k.requests_per_minute = std::num::NonZeroU32::new(5);
        });
        let layer = layer(&manual).with_default_output_tokens(10);
        let svc = ServiceBuilder::new()
            .layer(crate::RateLimitLayer::new().with_clock(manual.clock()))
            .layer(layer.clone())
            .service(health);
        let mut req = Request::post("/grpc.health.v1.Health/Check")
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        req.extensions_mut().insert(p.clone());
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "4");
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        // No usage reported: settled at the reservation (the default output ceiling).
        assert_eq!(tpm_used(&layer, "key_a", manual.now()), 10);
    }

    /// Counts how reservations end, over the memory backend.
    #[derive(Default)]
    struct Counting {
        inner: MemoryBackend,
        reserved: std::sync::atomic::AtomicUsize,
        ended: std::sync::atomic::AtomicUsize,
        fail: bool,
        /// Answer `reserve_at_once` / `end_at_once` (as the memory backend does).
        at_once: bool,
    }

    impl LimitBackend for Counting {
        fn reserve(
            &self,
            charges: Vec<Charge>,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<crate::backend::Reservation, ReserveError>> + Send + 'static
        {
            let r = if self.fail {
                Err(ReserveError::Backend(crate::backend::BackendError(
                    "down".into(),
                )))
            } else {
                self.reserved
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.inner
                    .reserve_now(charges, now)
                    .map_err(ReserveError::Exceeded)
            };
            std::future::ready(r)
        }
        fn settle(
            &self,
            reservation: crate::backend::Reservation,
            actual: Actual,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static
        {
            self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.settle_now(reservation, actual, now);
            std::future::ready(Ok(()))
        }
        fn release(
            &self,
            reservation: crate::backend::Reservation,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static
        {
            self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.release_now(reservation, now);
            std::future::ready(Ok(()))
        }
        fn reserve_at_once(
            &self,
            charges: Vec<Charge>,
            now: keygate_core::Timestamp,
        ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
            if !self.at_once || self.fail {
                return Err(charges);
            }
            self.reserved
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self
                .inner
                .reserve_now(charges, now)
                .map_err(ReserveError::Exceeded))
        }
        fn end_at_once(
            &self,
            reservation: Reservation,
            actual: Option<Actual>,
            now: keygate_core::Timestamp,
        ) -> Option<Reservation> {
            if !self.at_once {
                return Some(reservation);
            }
            self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match actual {
                Some(actual) => self.inner.settle_now(reservation, actual, now),
                None => self.inner.release_now(reservation, now),
            }
            None
        }
    }

    #[tokio::test]
    async fn every_kind_of_response_ends_its_reservation_exactly_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let manual = ManualClock::new(start());
        let backend = Arc::new(Counting::default());
        let layer = TokenLimitLayer::with_shared_backend(backend.clone())
            .with_clock(manual.clock())
            .with_prices(prices());
        let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            |r: Request<RequestBody<Full<Bytes>>>| async move {
                let streaming = r.into_body().collect().await.unwrap().to_bytes();
                let res = if memchr::memmem::find(&streaming, b"stream").is_some() {
                    sse_response().map(http_body_util::Either::Left)
                } else {
                    json_response(USAGE_JSON).map(http_body_util::Either::Right)
                };
                Ok::<_, Infallible>(res)
            },
        );
        // Non-streaming, read to the end and then dropped.
        let res = svc
            .clone()
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (1, 1)
        );
        // Streaming, read to the end.
        let res = svc
            .clone()
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","stream":true}"#))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (2, 2)
        );
        // Streaming, dropped after one frame.
        let res = svc
            .clone()
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","stream":true}"#))
            .await
            .unwrap();
        let mut body = res.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(backend.ended.load(SeqCst), 2);
        drop(body);
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (3, 3)
        );
        // Response never polled: dropped with its body unread.
        let res = svc
            .clone()
            .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        drop(res);
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (4, 4)
        );
        // All of it settled at the actual usage but the dropped ones.
        let used = backend.inner.used(
            "key\u{1f}key_a\u{1f}budget\u{1f}day\u{1f}*",
            {
                let (start, end) = Period::Day.window(manual.now());
                Window::Fixed { start, end }
            },
            u64::MAX,
            manual.now(),
        );
        assert!(used.unwrap() > 2 * USAGE_COST);
    }

    #[tokio::test]
    async fn backend_failure_fails_closed_with_503() {
        let manual = ManualClock::new(start());
        let backend = Counting {
            fail: true,
            ..Counting::default()
        };
        let layer = TokenLimitLayer::new(backend)
            .with_clock(manual.clock())
            .with_prices(prices());
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(json_response("{}"))
            },
        );
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000_000));
        let res = svc.oneshot(chat(&p, "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn non_json_bodies_pass_unread_and_reserve_the_output_ceiling() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual).with_default_output_tokens(7);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |r: Request<RequestBody<Full<Bytes>>>| async move {
                assert!(format!("{:?}", r.body()).contains("Inner"));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        );
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
        let mut req = Request::post("/v1/audio/transcriptions")
            .header(CONTENT_TYPE, "multipart/form-data; boundary=x")
            .body(Full::new(Bytes::from(vec![b'x'; 100_000])))
            .unwrap();
        req.extensions_mut().insert(p.clone());
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
        assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
    }

    /// The memory backend behind reservations that are not ready at their first poll.
    #[derive(Default)]
    struct Slow(MemoryBackend);

    /// Pending once (waking itself), then the value.
    struct YieldOnce<T>(Option<T>, bool);

    impl<T: Unpin> Future for YieldOnce<T> {
        type Output = T;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
            if !self.1 {
                self.1 = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.0.take().expect("polled after completion"))
        }
    }

    impl LimitBackend for Slow {
        fn reserve(
            &self,
            charges: Vec<Charge>,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
            let r = self.0.reserve_now(charges, now);
            YieldOnce(Some(r.map_err(ReserveError::Exceeded)), false)
        }
        fn settle(
            &self,
            reservation: Reservation,
            actual: Actual,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static
        {
            self.0.settle_now(reservation, actual, now);
            std::future::ready(Ok(()))
        }
        fn release(
            &self,
            reservation: Reservation,
            now: keygate_core::Timestamp,
        ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static
        {
            self.0.release_now(reservation, now);
            std::future::ready(Ok(()))
        }
    }

    fn get_models(p: &Principal) -> Request<Full<Bytes>> {
        let mut r = Request::get("/v1/models").body(empty()).unwrap();
        r.extensions_mut().insert(p.clone());
        r
    }

    #[tokio::test]
    async fn unread_body_with_a_backend_that_waits_is_reserved_refused_and_settled() {
        let manual = ManualClock::new(start());
        let backend = Arc::new(Slow::default());
        let layer = TokenLimitLayer::with_shared_backend(backend.clone())
            .with_clock(manual.clock())
            .with_default_output_tokens(600);
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
        let res = svc.clone().oneshot(get_models(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
        res.into_body().collect().await.unwrap();
        let window = Window::Rate {
            per: Duration::from_secs(60),
        };
        let used = |b: &Slow| {
            b.0.used("key\u{1f}key_a\u{1f}tpm", window, 1_000, manual.now())
        };
        assert_eq!(used(&backend), Some(600));
        let res = svc.oneshot(get_models(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
        assert_eq!(used(&backend), Some(600));
    }

    #[tokio::test]
    async fn empty_bodies_pass_as_empty_and_compressed_empty_json_is_still_refused() {
        let manual = ManualClock::new(start());
        let layer = layer(&manual).with_default_output_tokens(7);
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            |r: Request<RequestBody<Full<Bytes>>>| async move {
                assert!(format!("{:?}", r.body()).contains("Buffered"));
                assert!(r.body().is_end_stream());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        );
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
        let res = svc.clone().oneshot(chat(&p, "")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
        assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
        let mut req = chat(&p, "");
        req.headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
    }

    #[tokio::test]
    async fn response_future_dropped_before_the_answer_settles_at_the_reservation() {
        use std::sync::atomic::Ordering::SeqCst;
        // Reserved in `call` (a backend that answers at once) or at the first poll.
        for at_once in [true, false] {
            let manual = ManualClock::new(start());
            let backend = Arc::new(Counting {
                at_once,
                ..Counting::default()
            });
            let layer = TokenLimitLayer::with_shared_backend(backend.clone())
                .with_clock(manual.clock())
                .with_default_output_tokens(9);
            let mut svc = ServiceBuilder::new().layer(layer).service_fn(
                |_r: Request<RequestBody<Full<Bytes>>>| {
                    std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
                },
            );
            let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
            let mut future = svc.ready().await.unwrap().call(get_models(&p));
            let waker = std::task::Waker::noop();
            let polled = Pin::new(&mut future).poll(&mut Context::from_waker(waker));
            assert!(polled.is_pending());
            assert_eq!(backend.reserved.load(SeqCst), 1, "{at_once}");
            assert_eq!(backend.ended.load(SeqCst), 0, "{at_once}");
            drop(future);
            assert_eq!(backend.ended.load(SeqCst), 1, "{at_once}");
            let window = Window::Rate {
                per: Duration::from_secs(60),
            };
            let used = backend
                .inner
                .used("key\u{1f}key_a\u{1f}tpm", window, 1_000, manual.now());
            assert_eq!(used, Some(9), "{at_once}");
        }
    }

    #[tokio::test]
    async fn backends_that_answer_at_once_end_each_reservation_once_without_futures() {
        use std::sync::atomic::Ordering::SeqCst;
        let manual = ManualClock::new(start());
        let backend = Arc::new(Counting {
            at_once: true,
            ..Counting::default()
        });
        let layer = TokenLimitLayer::with_shared_backend(backend.clone())
            .with_clock(manual.clock())
            .with_default_output_tokens(600);
        let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
        let res = svc.clone().oneshot(get_models(&p)).await.unwrap();
        assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
        res.into_body().collect().await.unwrap();
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (1, 1)
        );
        // Refused: tried (counted), nothing held, nothing to end.
        let res = svc.oneshot(get_models(&p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
            (2, 1)
        );
    }

    #[test]
    fn reserved_amounts_are_what_a_dropped_settlement_charges() {
        let r = crate::backend::Reservation::default();
        assert_eq!(crate::backend::reserved_amounts(&r), Actual::default());
    }
}
