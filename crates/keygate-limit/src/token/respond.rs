//! Refusals, token headers, and what happens once the inner service answers.

use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use keygate_core::{Cut, Denial, LimitScope, Principal, ResponseBody, Stage, Usage, UsageMeter};

use super::charges::{Meta, Metas};
use super::{Config, Out};
use crate::backend::{CounterStatus, Exceeded, LimitBackend, Pending, Reservation, ReserveError};
use crate::body::{ImageCharge, Scan, Settlement, TokenBody};
use crate::guard::WalletGuard;
use crate::price::Price;
use crate::rate::{duration_header, limit_header, num_header, scope_name};
use crate::usage::{Reading, SseScanner};

pub(super) fn deny<ResBody>(denial: Denial, headers: &HeaderMap) -> Out<ResBody> {
    denial.into_response(headers).map(ResponseBody::denied)
}

static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

pub(super) fn put_token_headers(
    headers: &mut HeaderMap,
    limit: u64,
    remaining: u64,
    reset: Duration,
) {
    headers.reserve(3);
    headers.insert(LIMIT_TOKENS.clone(), limit_header(limit));
    headers.insert(REMAINING_TOKENS.clone(), num_header(remaining));
    let reset = u64::try_from(reset.as_nanos()).unwrap_or(u64::MAX);
    if let Some(v) = duration_header(reset) {
        headers.insert(RESET_TOKENS.clone(), v);
    }
}

/// What a refused request could have afforded, named in its refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Affordable {
    /// Not known, or not worth naming.
    Unknown,
    /// This many output tokens per choice.
    OutputTokens(u64),
    /// This many images.
    Images(u64),
}

/// The refusal of a request a counter cannot hold; `affordable`: the largest output cap (per
/// choice) or number of images that would have fitted, named in the message.
pub(super) fn exceeded_response<ResBody>(
    e: &Exceeded,
    meta: Meta,
    affordable: Affordable,
    headers: &HeaderMap,
) -> Out<ResBody> {
    let scope = scope_name(meta.scope);
    let denial = if meta.budget {
        let message = match affordable {
            Affordable::OutputTokens(n) if n > 0 => format!(
                "You exceeded your current quota ({scope} budget): this request can afford at most {n} output tokens. Lower max_tokens, or wait for the budget's next period."
            ),
            Affordable::Images(n) if n > 0 => format!(
                "You exceeded your current quota ({scope} budget): this request can afford at most {n} images at this size and quality. Lower n, or wait for the budget's next period."
            ),
            _ => format!(
                "You exceeded your current quota ({scope} budget). The budget resets at the start of its next period."
            ),
        };
        Denial::new(
            Stage::TokenLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            message,
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

pub(super) fn bad_request<ResBody>(
    code: &'static str,
    message: &'static str,
    h: &HeaderMap,
) -> Out<ResBody> {
    let status = match code {
        "request_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unsupported_encoding" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::BAD_REQUEST,
    };
    deny(Denial::new(Stage::TokenLimit, status, code, message), h)
}

pub(super) fn meta_of(metas: &Metas, index: usize) -> Meta {
    metas.get(index).copied().unwrap_or(Meta {
        scope: LimitScope::Key,
        budget: false,
    })
}

/// The answer to a reservation that was not made; `images`: what the request's images are
/// charged at, when priced per image (a budget's refusal then names how many it can afford).
pub(super) fn refused<ResBody>(
    e: &ReserveError,
    metas: &Metas,
    images: Option<ImageCharge>,
    headers: &HeaderMap,
) -> Out<ResBody> {
    match e {
        ReserveError::Exceeded(e) => {
            let meta = meta_of(metas, e.index);
            let affordable = match images {
                Some(i) if meta.budget && i.each.as_nanos() > 0 => {
                    Affordable::Images(e.remaining / i.each.as_nanos())
                }
                _ => Affordable::Unknown,
            };
            exceeded_response(e, meta, affordable, headers)
        }
        // The counters' store did not answer (its calls have deadlines): fail closed, and
        // say when to try again.
        _ => deny(
            Denial::unavailable(Stage::TokenLimit, "limit_backend")
                .with_retry_after(std::time::Duration::from_secs(1)),
            headers,
        ),
    }
}

/// What the response of an admitted request is expected to be.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// gRPC: settles from a usage extension (or at the reservation) whatever the status.
    pub(super) grpc: bool,
    /// The request asked for a stream (a JSON answer is then not scanned).
    pub(super) streaming: bool,
    /// keygate forced usage into the stream: remove the usage chunk the client did not ask for.
    pub(super) strip_usage: bool,
}

/// What an admitted request is charged at: its token price, and for images priced per image,
/// the image price and how many were reserved.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pricing {
    pub(super) tokens: Option<Price>,
    pub(super) images: Option<ImageCharge>,
}

/// What happens once the inner service answers an admitted request: its reservation ends
/// (now, or when the response body does) and the token headers are added.
pub(super) struct After {
    settlement: Box<Settlement>,
    tokens: Option<CounterStatus>,
    shape: Shape,
    max_scan: usize,
}

impl After {
    pub(super) fn new<B: LimitBackend>(
        config: &Config<B>,
        reservation: Reservation,
        estimate: Usage,
        pricing: Pricing,
        meter: Option<UsageMeter>,
        guard: Option<(WalletGuard, Principal)>,
        shape: Shape,
    ) -> Self {
        let tokens = reservation.tokens;
        let pending = Pending::new(config.backend.clone(), reservation, config.clock.clone());
        After {
            settlement: Box::new(Settlement {
                pending,
                estimate,
                price: pricing.tokens,
                images: pricing.images,
                meter,
                guard,
                on_disconnect: config.on_disconnect,
                scan: Scan::Nothing,
                done: false,
            }),
            tokens,
            shape,
            max_scan: config.max_scan,
        }
    }

    pub(super) fn respond<ResBody, E>(
        self,
        result: Result<Response<ResBody>, E>,
    ) -> Result<Out<ResBody>, E> {
        let After {
            mut settlement,
            tokens,
            shape,
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
            settlement.finish_with(Reading {
                usage: Some(usage),
                images: None,
            });
        } else if response.extensions().get::<Cut>().is_some() {
            // Cut by a timeout: the upstream may have generated up to the whole reservation.
            settlement.finish_with(Reading::default());
        } else if !response.status().is_success() && !shape.grpc {
            settlement.release();
        } else {
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .map(HeaderValue::as_bytes);
            let images = settlement.images.is_some();
            settlement.scan = match content_type {
                Some(ct) if ct.starts_with(b"text/event-stream") => {
                    if images {
                        // An image stream may report usage per image, and the last usage
                        // seen would undercount: its tokens count, its cost is the
                        // reservation.
                        settlement.price = None;
                    }
                    Scan::Sse(if shape.strip_usage {
                        SseScanner::stripping()
                    } else {
                        SseScanner::default()
                    })
                }
                Some(ct) if ct.starts_with(b"application/json") && !shape.streaming => {
                    Scan::json(max_scan, images)
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
