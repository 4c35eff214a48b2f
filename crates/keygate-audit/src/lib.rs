//! The keygate audit layer: one structured record per request — who (key id, name, project,
//! client address), what (method, path, endpoint group, model), the decision (allowed, or which
//! layer denied it and why), status, time to response head and to end of body, tokens and cost —
//! plus alerts, written to sinks you choose, and metrics through the `metrics` facade.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::{Arc, Mutex};
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use keygate_audit::{AuditEvent, AuditLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let events = Arc::new(Mutex::new(Vec::new()));
//! let seen = events.clone();
//! let service = ServiceBuilder::new()
//!     .layer(AuditLayer::new(move |e: &AuditEvent| seen.lock().unwrap().push(e.clone())))
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
//!     });
//!
//! let request = Request::get("/v1/models?limit=2").body(Full::default())?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert!(response.headers().contains_key("x-request-id"));
//! response.into_body().collect().await?; // the event is emitted when the body ends
//!
//! let events = events.lock().unwrap();
//! let event = events[0].as_request().unwrap();
//! assert_eq!(event.path, "/v1/models");
//! assert!(event.decision.is_allowed());
//! # Ok(())
//! # }
//! ```
//!
//! # How it sees the inner layers
//!
//! Put [`AuditLayer`] outermost. It puts a [`RequestTrace`](keygate_core::RequestTrace), a
//! [`UsageMeter`](keygate_core::UsageMeter) and a [`RequestId`] in request extensions; inner
//! layers record the principal, endpoint group, model and client address into the trace and the
//! settled usage and cost into the meter; a layer that refuses puts its
//! [`Denial`](keygate_core::Denial) in the response extensions. The event is emitted exactly once:
//! when the response body ends, fails or is dropped, or when the request is dropped or fails
//! before a response.
//!
//! # Sinks and backpressure
//!
//! [`TracingSink`] (structured `tracing` events), [`JsonlSink`] (JSON Lines, background writer,
//! bounded queue, size-based rotation), [`ChannelSink`] (a bounded tokio channel), [`FanOut`] (several
//! sinks), or any closure `Fn(&AuditEvent)`. A full queue drops the event and counts it
//! ([`SinkStats`], metric `keygate_audit_events_dropped_total`).
//!
//! With [`Backpressure::FailClosed`] no request is forwarded unless its record has a place: the
//! layer reserves one in the sink when the request arrives ([`AuditSink::try_reserve`]) and
//! answers 503 when the sink is full or failing to write, and serves again as soon as it
//! recovers. A [`JsonlSink`] whose file fails (disk full, read-only, failed rotation) keeps the
//! lines it could not write, retries them, and writes them to a fallback (stderr) if the file
//! does not recover within a few seconds, at [`JsonlSink::flush`] and at shutdown: a request
//! that was forwarded always has its record, in the file or in the fallback.
//!
//! # Shutdown
//!
//! [`AuditLayer::shutdown_switch`] gives the server a handle to call when its drain deadline
//! passes: requests that then end without completing are recorded with
//! `cut: Some(Cut::Shutdown)` ([`RequestEvent::cut`]; upstream timeouts recorded in the
//! [`RequestTrace`](keygate_core::RequestTrace) show there too). Shut the [`JsonlSink`] down
//! after the server, so the last records are written.
//!
//! # Nothing secret
//!
//! The layer never reads credential headers, and events name keys only by id and name. What a
//! client chose and the record repeats is checked for credential shapes (keygate keys of any
//! prefix, JWTs, common provider prefixes such as `sk-`, long random tokens, and prefixes you
//! add with [`AuditLayer::with_secret_prefixes`]; see
//! [`SecretScanner`](keygate_core::SecretScanner)): an incoming `x-request-id` that could be a
//! credential is replaced by a generated one (on the request, the response and the record),
//! and path segments and model names that could be one are recorded as `[redacted]`. The query
//! string is never recorded.
//!
//! Other request logging in the stack should hide credential headers too: wrap it in tower-http's
//! `SetSensitiveRequestHeadersLayer::new(keygate_audit::sensitive_headers())` (feature
//! `sensitive-headers` of tower-http), so `Authorization`, `x-api-key`, `api-key` and
//! `proxy-authorization` are marked sensitive and shown as `Sensitive` by `Debug` and tower-http's
//! trace layer. With this crate's `tower-http` feature, `sensitive_headers_layer()` builds that
//! layer for you; put it outside any request logging.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod event;
mod future;
mod jsonl;
mod layer;
pub mod metrics;
mod sink;
mod tracing_sink;

pub use body::AuditBody;
pub use event::{AuditEvent, Completion, Decision, MAX_REQUEST_ID_LEN, RequestEvent, RequestId};
pub use future::ResponseFuture;
pub use jsonl::{
    DEFAULT_CAPACITY, DEFAULT_FALLBACK_AFTER, DEFAULT_KEEP, DEFAULT_MAX_BYTES, JsonlBuilder,
    JsonlSink,
};
pub use layer::{Audit, AuditAlerts, AuditLayer, Backpressure, ShutdownSwitch, X_REQUEST_ID};
pub use sink::{AuditSink, ChannelSink, FanOut, NoopSink, SinkStats};
pub use tracing_sink::TracingSink;

use http::HeaderName;

/// The credential headers keygate reads: `authorization`, `x-api-key`, `api-key` and
/// `proxy-authorization`. Mark them sensitive wherever requests are logged.
pub fn sensitive_headers() -> [HeaderName; 4] {
    [
        http::header::AUTHORIZATION,
        HeaderName::from_static("x-api-key"),
        HeaderName::from_static("api-key"),
        http::header::PROXY_AUTHORIZATION,
    ]
}

/// tower-http's `SetSensitiveRequestHeadersLayer` for [`sensitive_headers`]: requests that pass
/// through it have their credential headers marked sensitive, so loggers that honour
/// [`HeaderValue::is_sensitive`](http::HeaderValue::is_sensitive) hide them.
#[cfg(feature = "tower-http")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower-http")))]
pub fn sensitive_headers_layer() -> tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer {
    tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new(sensitive_headers())
}
