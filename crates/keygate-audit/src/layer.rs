//! [`AuditLayer`] and its [`Audit`] service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{HeaderName, Request, Response};
use keygate_core::{
    Alert, AlertSink, ClientIp, Clock, Denial, RequestTrace, SecretPrefixError, SecretScanner,
    Stage, UsageMeter,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::AuditBody;
use crate::event::{AuditEvent, RequestId};
use crate::future::{Pending, RequestPath, ResponseFuture};
use crate::sink::AuditSink;

/// The request id header, read from requests and set on responses.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the audit layer does when its sink cannot take events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backpressure {
    /// Serve the request; the sink drops the event and counts it (the default).
    #[default]
    DropAndCount,
    /// Forward no request unless its record has a place in the sink: each request reserves
    /// one when it arrives ([`AuditSink::try_reserve`]), and is refused with 503
    /// (`Stage::Audit`, `service_unavailable`) if the sink is full or failing to write, as
    /// Vault refuses requests it cannot audit. The refusal's own record is kept if the sink
    /// can take it, else dropped and counted.
    FailClosed,
}

pub(crate) struct Shared {
    pub(crate) clock: Clock,
    pub(crate) metrics: bool,
    pub(crate) key_metrics: bool,
    /// Made at the first request, so a recorder installed after the layer is built is used.
    pub(crate) handles: OnceLock<crate::metrics::Handles>,
    pub(crate) sink: Arc<dyn AuditSink>,
    pub(crate) cut_in_flight: Arc<AtomicBool>,
    /// Refuses credential-shaped request ids; redacts the path and model of records.
    pub(crate) scanner: SecretScanner,
}

/// Records one [`AuditEvent`] per request. Meant to be the outermost keygate layer.
///
/// On the way in: takes a valid `x-request-id` that cannot be a credential, or makes one (and
/// sets it on the request, replacing the client's), and
/// puts a [`RequestId`], a [`UsageMeter`] and a [`RequestTrace`] in request extensions for inner
/// layers to fill. On the way out: sets `x-request-id` on the response, reads the [`Denial`] a
/// layer refused with, and emits the event when the response body ends or is dropped (or when
/// no response comes), with timings and the usage reported into the meter.
#[must_use]
pub struct AuditLayer<K> {
    sink: Arc<K>,
    clock: Clock,
    backpressure: Backpressure,
    metrics: bool,
    key_metrics: bool,
    accept_request_id: bool,
    cut_in_flight: Arc<AtomicBool>,
    scanner: SecretScanner,
}

impl<K> Clone for AuditLayer<K> {
    fn clone(&self) -> Self {
        AuditLayer {
            sink: self.sink.clone(),
            clock: self.clock.clone(),
            backpressure: self.backpressure,
            metrics: self.metrics,
            key_metrics: self.key_metrics,
            accept_request_id: self.accept_request_id,
            cut_in_flight: self.cut_in_flight.clone(),
            scanner: self.scanner.clone(),
        }
    }
}

impl<K> std::fmt::Debug for AuditLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLayer")
            .field("clock", &self.clock)
            .field("backpressure", &self.backpressure)
            .field("metrics", &self.metrics)
            .field("key_metrics", &self.key_metrics)
            .field("accept_request_id", &self.accept_request_id)
            .field("scanner", &self.scanner)
            .finish_non_exhaustive()
    }
}

impl<K: AuditSink> AuditLayer<K> {
    /// A layer recording into `sink`, with the system clock, metrics on, and
    /// [`Backpressure::DropAndCount`].
    pub fn new(sink: K) -> Self {
        AuditLayer {
            sink: Arc::new(sink),
            clock: Clock::system(),
            backpressure: Backpressure::DropAndCount,
            metrics: true,
            key_metrics: false,
            accept_request_id: true,
            cut_in_flight: Arc::new(AtomicBool::new(false)),
            scanner: SecretScanner::new(),
        }
    }

    /// Sets the clock that stamps and times events.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets what happens when the sink cannot take events.
    pub fn with_backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// Turns recording through the `metrics` facade on or off (on by default). The metrics
    /// have bounded labels only (see [`crate::metrics`]); their handles are made at the first
    /// request, so install the recorder before serving.
    pub fn with_metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Also records per-key metrics (`keygate_key_requests_total`, `keygate_key_tokens_total`,
    /// `keygate_key_cost_nanodollars_total`, labelled by `key_id` and `project`); off by default.
    /// Only with [`AuditLayer::with_metrics`] on.
    ///
    /// Every key makes its own time series, so their number grows with the keys (unbounded
    /// cardinality), and each request pays for a registry lookup by key. Per-key usage is in
    /// the audit records and the store; turn this on only for a small, fixed set of keys.
    pub fn with_key_metrics(mut self, on: bool) -> Self {
        self.key_metrics = on;
        self
    }

    /// A handle for the server's shutdown: after [`ShutdownSwitch::cut_in_flight`], the record
    /// of every request that does not complete (its [`Completion`](crate::Completion) is not
    /// `Complete`) and was not cut for another reason says `cut: shutdown`. Shared by every
    /// clone of this layer and every service it made.
    pub fn shutdown_switch(&self) -> ShutdownSwitch {
        ShutdownSwitch(self.cut_in_flight.clone())
    }

    /// Whether to take a valid incoming `x-request-id` (default) or always make a new one.
    ///
    /// An id that could be a credential (a keygate key, a JWT, a known or configured key
    /// prefix, a long random token: see [`SecretScanner`]) is never taken: a new one is made,
    /// and replaces it on the request and the response, so a key sent there by mistake
    /// reaches no log and no upstream.
    ///
    /// # Security
    ///
    /// A client chooses the id it sends, so it can reuse another request's id. Ids are for
    /// correlation, not identity; turn this off at an edge that faces untrusted clients if
    /// unique ids matter.
    pub fn with_accept_request_id(mut self, accept: bool) -> Self {
        self.accept_request_id = accept;
        self
    }

    /// Sets what counts as a credential (default [`SecretScanner::new`]): incoming request ids
    /// it flags are replaced, and the path segments and model it flags are recorded as
    /// `[redacted]`. Add your key format's prefix with [`SecretScanner::with_key_format`]
    /// when it is not covered by the defaults.
    pub fn with_secret_scanner(mut self, scanner: SecretScanner) -> Self {
        self.scanner = scanner;
        self
    }

    /// Adds key prefixes to those that count as a credential (see
    /// [`AuditLayer::with_secret_scanner`]).
    ///
    /// # Errors
    ///
    /// [`SecretPrefixError`] for an empty or over-long prefix, or one with characters other
    /// than ASCII letters, digits, `-`, `_` and `.`.
    pub fn with_secret_prefixes<I>(mut self, prefixes: I) -> Result<Self, SecretPrefixError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.scanner = self.scanner.with_prefixes(prefixes)?;
        Ok(self)
    }

    /// What counts as a credential.
    pub fn secret_scanner(&self) -> &SecretScanner {
        &self.scanner
    }

    /// The sink.
    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// An [`AlertSink`] to hand the limit layer: alerts become [`AuditEvent::Alert`] events in
    /// this layer's sink (and the `keygate_alerts_total` metric).
    pub fn alert_sink(&self) -> AuditAlerts {
        AuditAlerts {
            sink: self.sink.clone(),
            metrics: self.metrics,
        }
    }
}

impl<S, K: AuditSink> Layer<S> for AuditLayer<K> {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Audit<S> {
        let sink: Arc<dyn AuditSink> = self.sink.clone();
        Audit {
            inner,
            shared: Arc::new(Shared {
                clock: self.clock.clone(),
                metrics: self.metrics,
                key_metrics: self.key_metrics,
                handles: OnceLock::new(),
                sink,
                cut_in_flight: self.cut_in_flight.clone(),
                scanner: self.scanner.clone(),
            }),
            fail_closed: self.backpressure == Backpressure::FailClosed,
            accept_request_id: self.accept_request_id,
        }
    }
}

/// Marks the requests still in flight as cut by the server's shutdown. Made by
/// [`AuditLayer::shutdown_switch`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownSwitch(Arc<AtomicBool>);

impl ShutdownSwitch {
    /// Call when the drain deadline passed: every request that has not completed by now (or
    /// that will not complete) is recorded with `cut: Some(Cut::Shutdown)`, unless it was
    /// already cut for another reason.
    pub fn cut_in_flight(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`ShutdownSwitch::cut_in_flight`] was called.
    pub fn is_cut(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Forwards limit-layer alerts into the audit sink. Made by [`AuditLayer::alert_sink`].
#[derive(Clone)]
pub struct AuditAlerts {
    sink: Arc<dyn AuditSink>,
    metrics: bool,
}

impl std::fmt::Debug for AuditAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditAlerts").finish_non_exhaustive()
    }
}

impl AlertSink for AuditAlerts {
    fn alert(&self, alert: Alert) {
        if self.metrics {
            crate::metrics::alert(&alert);
        }
        self.sink.record_owned(AuditEvent::Alert(alert));
    }
}

/// The audit service made by [`AuditLayer`].
#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    shared: Arc<Shared>,
    fail_closed: bool,
    accept_request_id: bool,
}

impl<S> Audit<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Audit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("inner", &self.inner)
            .field("fail_closed", &self.fail_closed)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Audit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = bytes::Bytes>,
{
    type Response = Response<AuditBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let start = self.shared.clock.now();
        let incoming = if self.accept_request_id {
            req.headers()
                .get(X_REQUEST_ID)
                .and_then(|v| RequestId::from_header_with(v, &self.shared.scanner))
        } else {
            None
        };
        let request_id = match incoming {
            Some(id) => id,
            None => {
                let id = RequestId::generate();
                req.headers_mut()
                    .insert(X_REQUEST_ID, id.header_value().clone());
                id
            }
        };
        let ext = req.extensions_mut();
        let meter = match ext.get::<UsageMeter>() {
            Some(m) => m.clone(),
            None => {
                let m = UsageMeter::new();
                ext.insert(m.clone());
                m
            }
        };
        let trace = RequestTrace::new();
        ext.insert(trace.clone());
        ext.insert(request_id.clone());
        let client_ip = ext.get::<ClientIp>().map(|c| c.0);
        let mut pending = Pending {
            shared: self.shared.clone(),
            start,
            request_id,
            method: req.method().clone(),
            path: RequestPath::of(req.uri()),
            meter,
            trace,
            client_ip,
            head: None,
            reserved: false,
        };

        if self.fail_closed {
            // The record's place is taken now, before the request goes on: nothing between here
            // and the end of the response can leave it without one.
            if !self.shared.sink.try_reserve() {
                let denial = Denial::unavailable(Stage::Audit, "audit_sink_unavailable");
                return ResponseFuture::denied(denial.into_response(req.headers()), pending);
            }
            pending.reserved = true;
        }

        // The inner service was made ready by `poll_ready` and is called right away, not from
        // the future: no clone of the stack below is needed (tower's clone-and-swap is for
        // services called after an await).
        ResponseFuture::inner(self.inner.call(req), pending)
    }
}

#[cfg(test)]
mod tests;
