//! The service and its future: read the request's facts, reserve its worst case, forward.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use keygate_core::facts::{JsonEdit, scan_json};
use keygate_core::{
    Denial, Generation, Money, Principal, Protocol, RequestFacts, RequestedModel, ResponseBody,
    Stage, Timestamp, Usage, UsageMeter, is_grpc,
};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::charges::{Meta, WorstCase, plan, plan_images};
use super::respond::{
    Affordable, After, Pricing, Shape, bad_request, deny, exceeded_response, meta_of, refused,
};
use super::{BoxFuture, Config, Out, TokenLimit};
use crate::backend::{LimitBackend, Reservation, ReserveError};
use crate::body::{ImageCharge, RequestBody, TokenBody};
use crate::rate::missing_principal;

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
        let facts = req.extensions().get::<RequestFacts>();
        let bills = facts.is_none_or(|f| f.generation.bills());
        let metered =
            !self.config.prices.is_empty() && req.extensions().get::<UsageMeter>().is_some();
        if !bills || (guard.is_none() && !metered && !principal.has_token_limits()) {
            // Nothing to count (a route that makes nothing billed, or a key without limits):
            // no body read, no reservation.
            return ResponseFuture::pass(self.inner.call(req.map(RequestBody::inner)));
        }
        let skip = match facts {
            Some(f) if f.protocol == Protocol::Json => None,
            Some(_) => Some(Skip::Untouched),
            None => skips_body(&req),
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if let Some(skip) = skip {
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

/// The output cap of one choice a request reserves: none for embeddings, else the client's or
/// the default.
fn per_choice<B>(config: &Config<B>, facts: &RequestFacts) -> u64 {
    match facts.generation {
        Generation::Embeddings | Generation::Nothing => 0,
        _ => facts.max_output.unwrap_or(config.default_output),
    }
}

/// The price of one image of an image request whose model has prices per image (the inner
/// `None`: none for its size and quality); `None` for every other request, priced by tokens.
fn image_price<B>(config: &Config<B>, facts: &RequestFacts) -> Option<Option<Money>> {
    if facts.generation != Generation::Images {
        return None;
    }
    let prices = config.prices.image_prices(facts.model()?)?;
    Some(prices.price(facts.image_size.as_deref(), facts.image_quality.as_deref()))
}

/// A request's estimate, charges (with what each is) and pricing.
type Plan = (
    Usage,
    Vec<crate::backend::Charge>,
    super::charges::Metas,
    Pricing,
);

/// The plan of an image request priced per image.
fn images_plan<B>(
    config: &Config<B>,
    principal: &Principal,
    facts: &RequestFacts,
    each: Option<Money>,
    now: Timestamp,
) -> Result<Plan, Denial> {
    let model = facts.model();
    let count = facts.choices;
    let (estimate, charges, metas) = plan_images(config, principal, model, each, count, now)?;
    let pricing = Pricing {
        // Prices the token usage an upstream reports (gpt-image models do); not for an image
        // size without a price (counted as tokens only).
        tokens: each.and(model.and_then(|m| config.prices.price(m))),
        images: Some(ImageCharge {
            each: each.unwrap_or(Money::ZERO),
            count,
        }),
    };
    Ok((estimate, charges, metas, pricing))
}

/// Whether the forwarded stream must be made to carry usage: a streaming completions request
/// whose client did not ask for usage (then removed from what the client sees).
fn forces_usage<B>(config: &Config<B>, facts: &RequestFacts, path: &str) -> bool {
    config.include_usage
        && facts.stream
        && facts.generation == Generation::Text
        && facts.usage_requested != Some(true)
        && path.ends_with("/completions")
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
    let scoped = parts.extensions.get::<RequestFacts>().is_some();
    if !scoped {
        // Used without the scope layer: refuse what it would refuse before reading.
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
    let facts: Cow<'_, RequestFacts> = match parts.extensions.get::<RequestFacts>() {
        Some(f) => Cow::Borrowed(f),
        None => {
            // The same scanner the scope layer uses, on the same bytes.
            let fields = match scan_json(&bytes) {
                Ok(f) => f,
                Err(e) => return Ok(deny(e.denial(Stage::TokenLimit), &parts.headers)),
            };
            let mut facts = RequestFacts::unrouted();
            facts.absorb_json(&fields);
            facts.model = fields.model.as_deref().map(RequestedModel::new);
            Cow::Owned(facts)
        }
    };
    let Some(principal) = parts.extensions.get::<Principal>() else {
        return Ok(deny(missing_principal(Stage::TokenLimit), &parts.headers));
    };
    let model = facts.model();
    let price = model.and_then(|m| config.prices.price(m));
    let now = config.clock.now();
    let asked = facts.max_output;
    let mut worst = WorstCase {
        prompt: facts.prompt.tokens_at_most(config.bytes_per_token),
        per_choice: per_choice(&config, &facts),
        choices: facts.choices,
    };
    // Where a cap can be written: the route's cap field, or the fields the client gave.
    let cap_field = facts
        .output_field
        .clone()
        .filter(|_| facts.has_layout() && worst.per_choice > 0);
    let can_lower = match asked {
        None => cap_field.is_some(),
        Some(_) => config.lower_max_tokens && facts.has_layout(),
    };
    // The cap written on the forwarded request: the default when the client named none.
    let mut set_cap = cap_field
        .as_ref()
        .and(asked.is_none().then_some(worst.per_choice));
    let mut attempts = 0;
    let image = image_price(&config, &facts);
    let (reservation, estimate, pricing) = if let Some(each) = image {
        let (estimate, charges, metas, pricing) =
            match images_plan(&config, principal, &facts, each, now) {
                Ok(plan) => plan,
                Err(denial) => return Ok(deny(denial, &parts.headers)),
            };
        let reservation = if charges.is_empty() {
            Reservation::default()
        } else {
            match config.backend.reserve(charges, now).await {
                Ok(r) => r,
                Err(e) => return Ok(refused(&e, &metas, pricing.images, &parts.headers)),
            }
        };
        // Nothing to cap: an image's price bounds it.
        set_cap = None;
        (reservation, estimate, pricing)
    } else {
        let pricing = Pricing {
            tokens: price,
            images: None,
        };
        let (reservation, estimate) = loop {
            let (estimate, charges, metas) = match plan(
                &config,
                principal,
                model,
                price,
                worst.prompt,
                worst.output(),
                now,
            ) {
                Ok(plan) => plan,
                Err(denial) => return Ok(deny(denial, &parts.headers)),
            };
            if charges.is_empty() {
                break (Reservation::default(), estimate);
            }
            match config.backend.reserve(charges, now).await {
                Ok(r) => break (r, estimate),
                Err(ReserveError::Exceeded(e)) => {
                    let meta: Meta = meta_of(&metas, e.index);
                    attempts += 1;
                    let fits = worst.fitting(&e, meta, price);
                    match fits {
                        Some(fits)
                            if can_lower
                                && attempts <= 8
                                && fits >= config.min_output
                                && fits < worst.per_choice =>
                        {
                            worst.per_choice = fits;
                            set_cap = Some(fits);
                        }
                        _ => {
                            // Name the largest cap that fits when the client named one.
                            let affordable = match fits.filter(|_| asked.is_some()) {
                                Some(n) => Affordable::OutputTokens(n),
                                None => Affordable::Unknown,
                            };
                            return Ok(exceeded_response(&e, meta, affordable, &parts.headers));
                        }
                    }
                }
                Err(e) => return Ok(refused(&e, &metas, None, &parts.headers)),
            }
        };
        (reservation, estimate, pricing)
    };
    let force_usage = forces_usage(&config, &facts, parts.uri.path());
    let field = cap_field.as_deref().unwrap_or("max_tokens");
    let edit = JsonEdit {
        include_usage: force_usage,
        max_output: set_cap.map(|cap| (cap, field)),
    };
    let edited = facts.edit_json(&bytes, edit);
    let streaming = facts.stream;
    let guard = config.guard.clone().map(|g| (g, principal.clone()));
    let meter = parts.extensions.get::<UsageMeter>().cloned();
    let after = After::new(
        &config,
        reservation,
        estimate,
        pricing,
        meter,
        guard,
        Shape {
            grpc: false,
            streaming,
            strip_usage: force_usage,
        },
    );
    let forward = match edited {
        Some(edited) => {
            if parts.headers.contains_key(CONTENT_LENGTH) {
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(edited.len()));
            }
            Bytes::from(edited)
        }
        None => bytes,
    };
    if let Cow::Owned(facts) = facts {
        parts.extensions.insert(facts);
    }
    after.respond(
        inner
            .call(Request::from_parts(parts, RequestBody::buffered(forward)))
            .await,
    )
}

/// How a request whose body is not read passes: untouched (gRPC, a form, not JSON), or as the
/// empty body it is (the same bytes a read would have given).
#[derive(Clone, Copy)]
enum Skip {
    Untouched,
    Empty,
}

/// A body with no `Content-Type` is read as JSON (for the estimate).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_none_or(|v| v.to_str().is_ok_and(keygate_core::is_json_media_type))
}

/// Without facts (no scope layer): whether the request body can be handed on without
/// reading it: gRPC and non-JSON bodies are never read; an empty JSON body has nothing to
/// count (once it passes the checks a read body would).
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
    let facts = req.extensions().get::<RequestFacts>();
    let grpc = facts.map_or_else(|| is_grpc(headers), |f| f.protocol == Protocol::Grpc);
    let model = facts.and_then(RequestFacts::model);
    let now = config.clock.now();
    let planned = match facts.and_then(|f| Some((f, image_price(config, f)?))) {
        // A form of an image edit or variation, priced per image.
        Some((f, each)) => images_plan(config, principal, f, each, now),
        None => {
            let output = match facts {
                Some(f) => per_choice(config, f).saturating_mul(f.choices),
                None => config.default_output,
            };
            let price = model.and_then(|m| config.prices.price(m));
            plan(config, principal, model, price, 0, output, now).map(|(e, c, m)| {
                let pricing = Pricing {
                    tokens: price,
                    images: None,
                };
                (e, c, m, pricing)
            })
        }
    };
    let (estimate, charges, metas, pricing) = match planned {
        Ok(plan) => plan,
        Err(denial) => return ResponseFuture::denied(denial, headers),
    };
    let guard = config.guard.clone().map(|g| (g, principal.clone()));
    let meter = req.extensions().get::<UsageMeter>().cloned();
    let shape = Shape {
        grpc,
        streaming: false,
        strip_usage: false,
    };
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
            Ok(Err(e)) => {
                return ResponseFuture::ready(refused(&e, &metas, pricing.images, headers));
            }
            Err(charges) => {
                let config = config.clone();
                // Reserved when first polled, as on the read path: a future dropped unpolled
                // holds nothing.
                return ResponseFuture::boxed(Box::pin(async move {
                    let reservation = match config.backend.reserve(charges, now).await {
                        Ok(reservation) => reservation,
                        Err(e) => return Ok(refused(&e, &metas, pricing.images, req.headers())),
                    };
                    let after =
                        After::new(&config, reservation, estimate, pricing, meter, guard, shape);
                    after.respond(inner.call(forward(req)).await)
                }));
            }
        }
    };
    let after = After::new(config, reservation, estimate, pricing, meter, guard, shape);
    ResponseFuture::direct(inner.call(forward(req)), after)
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
