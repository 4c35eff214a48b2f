//! The one denial builder every layer uses: an OpenAI-compatible JSON error for HTTP, a
//! trailers-only status for gRPC, and the reason in the response's extensions.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use pin_project_lite::pin_project;

/// The keygate layer that made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Stage {
    /// Credential extraction and verification.
    Extract,
    /// Route, permission, model and address checks.
    Scope,
    /// A policy hook.
    Policy,
    /// Request rate limits.
    RateLimit,
    /// Token rates and budgets.
    TokenLimit,
    /// The audit layer (a required sink that cannot take events).
    Audit,
}

impl Stage {
    /// The stage's name in audit records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Extract => "extract",
            Stage::Scope => "scope",
            Stage::Policy => "policy",
            Stage::RateLimit => "rate_limit",
            Stage::TokenLimit => "token_limit",
            Stage::Audit => "audit",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a layer refused a request. Put in the refusal's response extensions, so the audit layer
/// records the reason without parsing bodies.
///
/// The `message` and `code` go to the client; the `detail` never does (it is for audit and
/// logs, for example *which* check failed on a key that all clients see as the same 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    stage: Stage,
    status: StatusCode,
    code: Cow<'static, str>,
    error_type: &'static str,
    message: Cow<'static, str>,
    param: Option<&'static str>,
    detail: Option<&'static str>,
    /// Milliseconds, rounded up, at least 1 (a niche keeps `Denial` small).
    retry_after_ms: Option<std::num::NonZeroU64>,
    challenge: bool,
    /// The JSON body, when it is one of the fixed ones built once per process.
    cached_body: Option<&'static Bytes>,
}

/// The message of every 401 for a presented credential that does not work, whatever the cause.
pub const INVALID_CREDENTIAL_MESSAGE: &str = "Incorrect API key provided.";

impl Denial {
    /// A denial with the given stage, status, machine code and client message.
    ///
    /// The OpenAI error `type` is chosen from the status (`invalid_request_error`,
    /// `authentication_error`, `permission_error`, `rate_limit_error`, `server_error`);
    /// change it with [`Denial::with_error_type`].
    pub fn new(
        stage: Stage,
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        let error_type = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        Denial {
            stage,
            status,
            code: code.into(),
            error_type,
            message: message.into(),
            param: None,
            detail: None,
            retry_after_ms: None,
            challenge: false,
            cached_body: None,
        }
    }

    /// 401 for a request that carries no credential; answers with `WWW-Authenticate: Bearer`.
    pub fn missing_credential() -> Self {
        let mut d = Denial::new(
            Stage::Extract,
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "You didn't provide an API key. Provide it in the Authorization header as a Bearer token.",
        );
        d.challenge = true;
        static BODY: OnceLock<Bytes> = OnceLock::new();
        d.cached_body = Some(BODY.get_or_init(|| d.build_json_body()));
        d
    }

    /// The one 401 for every presented credential that does not work (malformed, bad checksum,
    /// unknown, disabled, not yet valid, expired, revoked, bad token). `detail` says which, for
    /// audit only; the response is byte-identical whatever it is.
    pub fn invalid_credential(detail: &'static str) -> Self {
        let mut d = Denial::new(
            Stage::Extract,
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            INVALID_CREDENTIAL_MESSAGE,
        );
        d.challenge = true;
        static BODY: OnceLock<Bytes> = OnceLock::new();
        d.cached_body = Some(BODY.get_or_init(|| d.build_json_body()));
        d.detail = Some(detail);
        d
    }

    /// 503: a backend keygate needs (store, audit sink) is unavailable; the request is refused.
    pub fn unavailable(stage: Stage, detail: &'static str) -> Self {
        Denial::new(
            stage,
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The service is temporarily unable to authorize requests. Please retry.",
        )
        .with_detail(detail)
    }

    /// Sets the OpenAI error `type`.
    #[must_use]
    pub fn with_error_type(mut self, error_type: &'static str) -> Self {
        self.cached_body = None;
        self.error_type = error_type;
        self
    }

    /// Sets the OpenAI error `param` (the request field at fault).
    #[must_use]
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.cached_body = None;
        self.param = Some(param);
        self
    }

    /// Sets the internal detail (audit and logs only, never sent).
    #[must_use]
    pub fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Sets how long the client should wait; sent as `Retry-After` (whole seconds, rounded
    /// up, at least 1) and `retry-after-ms`.
    #[must_use]
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        let nanos = wait.as_nanos();
        let ms = u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX);
        self.retry_after_ms = std::num::NonZeroU64::new(ms.max(1));
        self
    }

    /// The layer that refused.
    pub fn stage(&self) -> Stage {
        self.stage
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// The machine-readable code (`invalid_api_key`, `model_not_allowed`, ...).
    pub fn code(&self) -> &str {
        &self.code
    }
    /// The OpenAI error type.
    pub fn error_type(&self) -> &'static str {
        self.error_type
    }
    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The request field at fault.
    pub fn param(&self) -> Option<&'static str> {
        self.param
    }
    /// The internal detail, for audit only.
    pub fn detail(&self) -> Option<&'static str> {
        self.detail
    }
    /// How long the client should wait (whole milliseconds, rounded up).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms
            .map(|ms| Duration::from_millis(ms.get()))
    }

    /// The gRPC status code for this denial.
    pub fn grpc_code(&self) -> u8 {
        match self.status.as_u16() {
            401 => 16,                  // UNAUTHENTICATED
            403 => 7,                   // PERMISSION_DENIED
            429 => 8,                   // RESOURCE_EXHAUSTED
            404 | 405 => 12,            // UNIMPLEMENTED
            400 | 411 | 413 | 415 => 3, // INVALID_ARGUMENT
            503 => 14,                  // UNAVAILABLE
            _ => 13,                    // INTERNAL
        }
    }

    /// The JSON error body `{"error":{"message","type","param","code"}}`.
    pub fn json_body(&self) -> Bytes {
        match &self.cached_body {
            Some(body) => Bytes::clone(body),
            None => self.build_json_body(),
        }
    }

    fn build_json_body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        });
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The refusal for a request with headers `request_headers`: gRPC if the request is gRPC,
    /// JSON otherwise. The denial itself rides in the response's extensions.
    pub fn into_response(self, request_headers: &HeaderMap) -> Response<Full<Bytes>> {
        if is_grpc(request_headers) {
            self.into_grpc_response()
        } else {
            self.into_http_response()
        }
    }

    /// The HTTP form of the refusal: the status and an OpenAI-compatible JSON error.
    pub fn into_http_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.json_body()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.put_common_headers(headers);
        response.extensions_mut().insert(self);
        response
    }

    /// The gRPC form: HTTP 200, trailers-only, with `grpc-status` and `grpc-message`.
    pub fn into_grpc_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from(u16::from(self.grpc_code())),
        );
        let message = utf8_percent_encode(&self.message, GRPC_MESSAGE).to_string();
        if let Ok(v) = HeaderValue::from_str(&message) {
            headers.insert(HeaderName::from_static("grpc-message"), v);
        }
        self.put_common_headers(headers);
        response.extensions_mut().insert(self);
        response
    }

    fn put_common_headers(&self, headers: &mut HeaderMap) {
        if self.challenge {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(ms),
            );
        }
    }
}

/// Whole seconds to put in `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} denied {} ({})",
            self.stage,
            self.status.as_u16(),
            self.code
        )
    }
}

// gRPC percent-encodes everything outside printable ASCII, and '%' itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// Whether a request is gRPC (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether a `Content-Type` value names JSON: `application/json` or `application/*+json`,
/// any letter case, parameters ignored. The one definition the layers that read JSON bodies
/// share, so they never disagree on whether a body is JSON.
pub fn is_json_media_type(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let Some((top, sub)) = mime.split_once('/') else {
        return false;
    };
    top.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

pin_project! {
    /// A response body: the inner service's, or a keygate layer's small buffered refusal.
    ///
    /// Layers that can refuse wrap the inner body in this, so the happy path neither boxes nor
    /// copies.
    pub struct ResponseBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Inner { #[pin] body: B },
        Denied { body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody {
            kind: BodyKind::Inner { body },
        }
    }

    /// A refusal body.
    pub fn denied(body: Full<Bytes>) -> Self {
        ResponseBody {
            kind: BodyKind::Denied { body },
        }
    }

    /// Whether this is a refusal.
    pub fn is_denied(&self) -> bool {
        matches!(self.kind, BodyKind::Denied { .. })
    }
}

impl<B> Body for ResponseBody<B>
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
            BodyKindProj::Inner { body } => body.poll_frame(cx),
            BodyKindProj::Denied { body } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body } => body.is_end_stream(),
            BodyKind::Denied { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body } => body.size_hint(),
            BodyKind::Denied { body } => body.size_hint(),
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BodyKind::Inner { body } => f.debug_tuple("ResponseBody::Inner").field(body).finish(),
            BodyKind::Denied { .. } => f.write_str("ResponseBody::Denied"),
        }
    }
}

/// Turns a refusal into a response with a layer's body type.
pub fn deny<B>(denial: Denial, request_headers: &HeaderMap) -> Response<ResponseBody<B>> {
    denial
        .into_response(request_headers)
        .map(ResponseBody::denied)
}

pin_project! {
    /// Response future of a layer that decides before calling the inner service: either the
    /// inner service's future, or a ready refusal.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: FutureKind<F>,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind<F> {
        Inner { #[pin] future: F },
        Denied { response: Option<Response<Full<Bytes>>> },
    }
}

impl<F> ResponseFuture<F> {
    /// Waits on the inner service.
    pub fn inner(future: F) -> Self {
        ResponseFuture {
            kind: FutureKind::Inner { future },
        }
    }

    /// Answers at once with a refusal.
    pub fn denied(denial: Denial, request_headers: &HeaderMap) -> Self {
        ResponseFuture {
            kind: FutureKind::Denied {
                response: Some(denial.into_response(request_headers)),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Inner { future } => future
                .poll(cx)
                .map(|r| r.map(|res| res.map(ResponseBody::inner))),
            FutureKindProj::Denied { response } => {
                let response = response
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(response.map(ResponseBody::denied)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn http_denial_is_openai_json_with_reason_in_extensions() {
        let denial = Denial::new(
            Stage::Scope,
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            "The model `gpt-4` is not allowed for this key.",
        )
        .with_param("model");
        let response = denial.clone().into_response(&HeaderMap::new());
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.extensions().get::<Denial>(), Some(&denial));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4"));
    }

    #[test]
    fn json_media_types_are_recognised_in_one_place() {
        for ct in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=utf-8",
            "application/merge-patch+json",
            "application/vnd.api+JSON",
        ] {
            assert!(is_json_media_type(ct), "{ct}");
        }
        for ct in [
            "",
            "json",
            "text/plain",
            "text/json",
            "application/jsonx",
            "application/json-seq",
            "application/+jsonx",
            "multipart/form-data; boundary=x",
        ] {
            assert!(!is_json_media_type(ct), "{ct}");
        }
    }

    #[test]
    fn grpc_request_gets_trailers_only_status() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let response = Denial::invalid_credential("unknown").into_response(&headers);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "16");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        assert!(
            response.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("Incorrect")
        );
    }

    #[test]
    fn grpc_codes_follow_status() {
        let d = |s| Denial::new(Stage::Scope, s, "x", "y").grpc_code();
        assert_eq!(d(StatusCode::FORBIDDEN), 7);
        assert_eq!(d(StatusCode::TOO_MANY_REQUESTS), 8);
        assert_eq!(d(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(d(StatusCode::BAD_REQUEST), 3);
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        let response = Denial::new(
            Stage::RateLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow down",
        )
        .with_retry_after(Duration::from_millis(250))
        .into_http_response();
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(response.headers()["retry-after-ms"], "250");
    }

    #[tokio::test]
    async fn invalid_credential_bodies_are_identical_whatever_the_detail() {
        let a = Denial::invalid_credential("unknown").into_http_response();
        let b = Denial::invalid_credential("expired").into_http_response();
        assert_eq!(a.headers(), b.headers());
        assert_eq!(a.headers()[WWW_AUTHENTICATE], "Bearer");
        let a = a.into_body().collect().await.unwrap().to_bytes();
        let b = b.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(a, b);
    }

    #[test]
    fn denial_stays_small_enough_to_return_by_value() {
        // Layers return `Result<_, Denial>` on the hot path; clippy's `result_large_err`
        // draws the line at 128 bytes.
        assert!(
            std::mem::size_of::<Denial>() < 128,
            "{}",
            std::mem::size_of::<Denial>()
        );
    }

    #[test]
    fn cached_bodies_equal_freshly_built_ones() {
        for d in [
            Denial::missing_credential(),
            Denial::invalid_credential("x"),
        ] {
            assert!(d.cached_body.is_some());
            assert_eq!(d.json_body(), d.build_json_body());
        }
        let changed = Denial::invalid_credential("x").with_param("p");
        assert!(changed.json_body().windows(3).any(|w| w == b"\"p\""));
    }

    #[tokio::test]
    async fn message_with_quotes_and_newlines_is_escaped() {
        let d = Denial::new(Stage::Policy, StatusCode::FORBIDDEN, "policy", "a\"b\r\nc");
        let body = d
            .into_http_response()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "a\"b\r\nc");
        assert!(!body.contains(&b'\n'));
    }
}
