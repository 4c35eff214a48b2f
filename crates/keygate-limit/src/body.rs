//! Bodies: the request body handed on after the token layer read it, and the response body
//! that watches for usage and settles the reservation when it ends or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use keygate_core::{Money, Principal, Usage, UsageMeter, UsageSource};
use pin_project_lite::pin_project;

use crate::backend::{Actual, LimitBackend, Pending};
use crate::guard::WalletGuard;
use crate::price::Price;
use crate::usage::{Reading, SseScanner, images_of, usage_of};

pin_project! {
    /// The request body the token layer hands on: the original body untouched (gRPC, or when
    /// no limit needs the body), or the bytes it read (possibly with
    /// `stream_options.include_usage` added).
    pub struct RequestBody<B> {
        #[pin]
        kind: ReqKind<B>,
    }
}

pin_project! {
    #[project = ReqKindProj]
    enum ReqKind<B> {
        Inner { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

impl<B> RequestBody<B> {
    /// The original body.
    pub fn inner(body: B) -> Self {
        RequestBody {
            kind: ReqKind::Inner { body },
        }
    }

    /// Bytes already read.
    pub fn buffered(data: Bytes) -> Self {
        RequestBody {
            kind: ReqKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

/// No bytes (what a request made by a layer inside, such as the next page of a list, carries).
impl<B> Default for RequestBody<B> {
    fn default() -> Self {
        RequestBody::buffered(Bytes::new())
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ReqKind::Inner { .. } => f.write_str("RequestBody::Inner"),
            ReqKind::Buffered { data } => f
                .debug_struct("RequestBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ReqKindProj::Inner { body } => body.poll_frame(cx),
            ReqKindProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ReqKind::Inner { body } => body.is_end_stream(),
            ReqKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ReqKind::Inner { body } => body.size_hint(),
            ReqKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// What to settle with when the response body is dropped before its end (client gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnDisconnect {
    /// The whole reservation (the upstream may well have finished the generation).
    #[default]
    Reservation,
    /// The usage seen in the stream so far if any usage event passed, else the reservation.
    UsageSeen,
}

/// Erases the backend type from the response body.
pub(crate) trait Settle: Send {
    fn settle(&mut self, actual: Actual);
    fn release(&mut self);
}

impl<B: LimitBackend> Settle for Pending<B> {
    fn settle(&mut self, actual: Actual) {
        Pending::settle(self, actual);
    }
    fn release(&mut self) {
        Pending::release(self);
    }
}

#[derive(Debug)]
pub(crate) enum Scan {
    Nothing,
    Sse(SseScanner),
    Json {
        frames: Vec<Bytes>,
        len: usize,
        limit: usize,
        overflow: bool,
        /// An images response: its `data` array is counted too.
        images: bool,
    },
}

impl Scan {
    pub(crate) fn json(limit: usize, images: bool) -> Self {
        Scan::Json {
            frames: Vec::new(),
            len: 0,
            limit,
            overflow: false,
            images,
        }
    }

    /// Looks at `data` and returns what to hand on (the same bytes, unless an SSE scanner
    /// strips the usage chunk from them).
    fn pass(&mut self, data: Bytes) -> Bytes {
        match self {
            Scan::Nothing => data,
            Scan::Sse(s) => s.pass(data),
            Scan::Json {
                frames,
                len,
                limit,
                overflow,
                ..
            } => {
                if !*overflow {
                    *len += data.len();
                    if *len > *limit {
                        *overflow = true;
                        frames.clear();
                    } else {
                        // A reference-counted handle on the frame, not a copy.
                        frames.push(data.clone());
                    }
                }
                data
            }
        }
    }

    /// What a stripping scanner still holds at the end of the stream.
    fn rest(&mut self) -> Option<Bytes> {
        match self {
            Scan::Sse(s) => s.rest().filter(|b| !b.is_empty()),
            _ => None,
        }
    }

    fn reading(&mut self, complete: bool) -> Reading {
        match self {
            Scan::Nothing => Reading::default(),
            Scan::Sse(s) => {
                if complete {
                    s.finish();
                }
                Reading {
                    usage: s.usage,
                    images: None,
                }
            }
            Scan::Json {
                frames,
                overflow,
                images,
                ..
            } => {
                if *overflow || !complete {
                    return Reading::default();
                }
                let read = |json: &[u8]| {
                    if *images {
                        images_of(json).unwrap_or_default()
                    } else {
                        Reading {
                            usage: usage_of(json),
                            images: None,
                        }
                    }
                };
                if frames.len() == 1 {
                    return read(&frames[0]);
                }
                let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
                read(&all)
            }
        }
    }
}

/// What the images of a request priced per image cost, and how many were reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageCharge {
    /// One image, at the size and quality asked for.
    pub(crate) each: Money,
    /// The images reserved for (`n`).
    pub(crate) count: u64,
}

impl ImageCharge {
    /// `images` of them.
    pub(crate) fn cost(&self, images: u64) -> Money {
        Money::from_nanos(self.each.as_nanos().saturating_mul(images))
    }
}

/// Everything needed to end one request's reservation, in one allocation: built with its
/// backend's [`Pending`] and held as `Box<Settlement>` (the backend type erased).
pub(crate) struct Settlement<P: Settle + ?Sized = dyn Settle> {
    pub(crate) estimate: Usage,
    pub(crate) price: Option<Price>,
    /// Images priced per image (then `price` prices only token usage the upstream reports).
    pub(crate) images: Option<ImageCharge>,
    pub(crate) meter: Option<UsageMeter>,
    pub(crate) guard: Option<(WalletGuard, Principal)>,
    pub(crate) on_disconnect: OnDisconnect,
    pub(crate) scan: Scan,
    pub(crate) done: bool,
    pub(crate) pending: P,
}

impl<P: Settle + ?Sized> std::fmt::Debug for Settlement<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settlement")
            .field("estimate", &self.estimate)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<P: Settle + ?Sized> Settlement<P> {
    /// Ends the reservation at what `read` found (or the estimate) and reports it.
    ///
    /// Text: the usage reported, at the token price. Images priced per image: the token usage
    /// reported at the token price when there is one (gpt-image models report it), else the
    /// images the response holds at the image price, else the reservation; tokens are the
    /// ones reported (none else), and an over-reservation is a cost above the one reserved.
    pub(crate) fn finish_with(&mut self, read: Reading) {
        if self.done {
            return;
        }
        self.done = true;
        let usage = read.usage.unwrap_or(self.estimate);
        let tokens = usage
            .total_tokens
            .max(usage.prompt_tokens.saturating_add(usage.completion_tokens));
        let (cost, reported, over) = match self.images {
            None => {
                let reported = read.usage.is_some();
                let cost = self.price.map(|p| p.cost(usage));
                // More than the worst case was reserved for: charged as reported, and flagged.
                (
                    cost,
                    reported,
                    reported && tokens > self.estimate.total_tokens,
                )
            }
            Some(images) => {
                let reserved = images.cost(images.count);
                let read_cost = match (read.usage, self.price, read.images) {
                    (Some(usage), Some(price), _) => Some(price.cost(usage)),
                    (_, _, Some(made)) => Some(images.cost(made)),
                    _ => None,
                };
                let cost = read_cost.unwrap_or(reserved);
                (Some(cost), read_cost.is_some(), cost > reserved)
            }
        };
        // Report before settling: the settle may be slow (network backend) and the outer
        // layers read the meter as soon as the body ends.
        if let Some(meter) = &self.meter {
            meter.report_usage(usage);
            meter.report_source(if reported {
                UsageSource::Reported
            } else {
                UsageSource::Estimated
            });
            if over {
                meter.flag_over_reservation();
            }
            if let Some(cost) = cost {
                meter.report_cost(cost);
            }
        }
        let cost = cost.unwrap_or(Money::ZERO);
        self.pending.settle(Actual { tokens, cost });
        if let Some((guard, principal)) = &self.guard {
            guard.record(principal.key_id(), &principal.project().id, tokens, cost);
        }
    }

    /// Gives the reservation back (the upstream refused the request).
    pub(crate) fn release(&mut self) {
        if !self.done {
            self.done = true;
            self.pending.release();
        }
    }

    fn finish(&mut self, complete: bool) {
        if self.done {
            return;
        }
        let read = match (complete, self.on_disconnect) {
            (true, _) | (false, OnDisconnect::UsageSeen) => self.scan.reading(complete),
            (false, OnDisconnect::Reservation) => Reading::default(),
        };
        self.finish_with(read);
    }
}

impl<P: Settle + ?Sized> Drop for Settlement<P> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

pin_project! {
    /// The response body of [`TokenLimit`](crate::TokenLimit): the inner body, watched for
    /// usage (and, for a client that did not ask for it, with the usage chunk of a stream
    /// removed); the request's reservation is settled when it ends (before the end is
    /// signalled) or when it is dropped.
    pub struct TokenBody<B> {
        #[pin]
        inner: B,
        settlement: Option<Box<Settlement>>,
        // The inner body has ended and its last bytes were handed on.
        ended: bool,
    }
}

impl<B> TokenBody<B> {
    pub(crate) fn new(inner: B, settlement: Option<Box<Settlement>>) -> Self {
        TokenBody {
            inner,
            settlement,
            ended: false,
        }
    }
}

impl<B> std::fmt::Debug for TokenBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBody")
            .field("settlement", &self.settlement)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TokenBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        loop {
            let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
            let Some(s) = this.settlement.as_deref_mut() else {
                return Poll::Ready(polled);
            };
            match polled {
                Some(Ok(frame)) => {
                    let end = this.inner.is_end_stream();
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let mut out = s.scan.pass(data);
                            if end && let Some(rest) = s.scan.rest() {
                                let mut all = Vec::with_capacity(out.len() + rest.len());
                                all.extend_from_slice(&out);
                                all.extend_from_slice(&rest);
                                out = Bytes::from(all);
                            }
                            if out.is_empty() && !end {
                                // All held back (an unfinished event): wait for more.
                                continue;
                            }
                            Frame::data(out)
                        }
                        Err(frame) => frame,
                    };
                    // hyper stops polling once a body says it has ended.
                    if end {
                        s.finish(true);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                None => {
                    let rest = s.scan.rest();
                    s.finish(true);
                    *this.ended = true;
                    return Poll::Ready(rest.map(|r| Ok(Frame::data(r))));
                }
                Some(Err(e)) => {
                    s.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.settlement.as_deref().map(|s| &s.scan) {
            // Stripping may shorten the body.
            Some(Scan::Sse(_)) => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}
