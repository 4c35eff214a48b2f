//! [`UpstreamProxy`]: a streaming reverse proxy to OpenAI-compatible model servers, to put
//! behind the keygate layers.
//!
//! - **Streaming** both ways: bodies are never buffered whole.
//! - **`http://` and `https://`** upstreams, TLS through rustls with the webpki roots (or the
//!   system's, [`Roots::System`]) plus any extra CA of a private endpoint
//!   ([`ProxyBuilder::extra_ca_pem`]).
//! - **Several upstreams**, chosen per request by the model the scope layer found
//!   ([`RequestFacts`]): the first [`Upstream`] whose patterns match serves it; a request
//!   that names no model goes to the default upstream (the first one for every model). A
//!   model no upstream serves gets 404 `model_not_found`.
//! - **Credentials**: the client's credential headers are never forwarded (the extraction layer
//!   strips them; the proxy strips them again); each upstream's provider key is set only on the
//!   upstream request, so it never reaches the client.
//! - **Timeouts** ([`Timeouts`]): connect, response head, idle gap between body chunks, total.
//!   A connect or head timeout answers 504 `upstream_timeout` in the OpenAI error shape; an idle
//!   or total timeout cuts the body (an event stream ends with an `error` event). The cut is
//!   recorded in the request's [`RequestTrace`] (the audit record's `cut`), and a 504 carries
//!   the [`Cut`] in its extensions.
//!
//! **Settlement of a cut request**: keygate cannot know how much the upstream generated before
//! it was cut, so the token layer charges the request's whole reservation (the most it could
//! have cost), never less. A refused connection (502) is released: nothing was generated.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use keygate_core::{Cut, Denial, ModelPattern, RequestFacts, RequestTrace, Stage};

mod body;
mod jwks;
mod tls;

pub use crate::config::Roots;
pub use body::{ProxyResponseBody, UpstreamTimedOut};
pub use jwks::{JwksError, JwksFetcher};

/// An http(s) client (hyper, rustls with ring) verifying servers against `roots` and the PEM
/// certificates in `extra_ca`: the one the proxy and the JWKS fetcher use, for other clients of
/// keygate (the CLI driving a gateway's admin API).
///
/// # Errors
///
/// Unusable roots or certificates.
pub fn https_client<B>(
    roots: Roots,
    extra_ca: &[Vec<u8>],
    connect_timeout: Option<Duration>,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, UpstreamError>
where
    B: Body + Send,
    B::Data: Send,
{
    tls::client(roots, extra_ca, connect_timeout)
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why an upstream or the proxy cannot be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("upstream must be an absolute http:// or https:// URL")]
    InvalidUrl,
    /// The provider key cannot be sent as a header value.
    #[error("provider key holds characters that cannot be sent in a header")]
    InvalidProviderKey,
    /// A model pattern is not valid.
    #[error("model pattern: {0}")]
    InvalidModelPattern(#[from] keygate_core::ModelPatternError),
    /// No upstream was given.
    #[error("no upstream configured")]
    NoUpstream,
    /// An extra CA certificate could not be read or parsed.
    #[error("extra CA certificates: {0}")]
    Ca(String),
    /// The TLS settings are unusable.
    #[error("tls: {0}")]
    Tls(String),
}

/// The proxy's timeouts. `None` turns one off.
///
/// Defaults: connect 10 s; response head 10 min (reasoning models can think for minutes
/// before a non-streamed answer starts); idle gap between body chunks 5 min; total 30 min.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// To open the TCP connection (TLS handshake not included).
    pub connect: Option<Duration>,
    /// From sending the request to the upstream's response head.
    pub head: Option<Duration>,
    /// The longest pause between two chunks of the response body.
    pub idle: Option<Duration>,
    /// From sending the request to the end of the response body.
    pub total: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Some(Duration::from_secs(10)),
            head: Some(Duration::from_secs(600)),
            idle: Some(Duration::from_secs(300)),
            total: Some(Duration::from_secs(1800)),
        }
    }
}

impl Timeouts {
    /// No timeout at all.
    pub fn none() -> Self {
        Timeouts {
            connect: None,
            head: None,
            idle: None,
            total: None,
        }
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect(mut self, d: Option<Duration>) -> Self {
        self.connect = d;
        self
    }

    /// Sets the response head timeout.
    #[must_use]
    pub fn with_head(mut self, d: Option<Duration>) -> Self {
        self.head = d;
        self
    }

    /// Sets the idle timeout between body chunks.
    #[must_use]
    pub fn with_idle(mut self, d: Option<Duration>) -> Self {
        self.idle = d;
        self
    }

    /// Sets the total timeout.
    #[must_use]
    pub fn with_total(mut self, d: Option<Duration>) -> Self {
        self.total = d;
        self
    }
}

/// One model server: its base URL, provider key, and the models it serves.
#[derive(Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host: HeaderValue,
    provider_auth: Option<HeaderValue>,
    models: Vec<ModelPattern>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url())
            .field(
                "provider_key",
                &self.provider_auth.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "models",
                &self
                    .models
                    .iter()
                    .map(ModelPattern::as_str)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Upstream {
    /// A model server at `base_url` (`http://` or `https://`, optionally with a base path:
    /// `https://host/openai` + `/v1/models`), serving every model.
    ///
    /// # Errors
    ///
    /// [`UpstreamError::InvalidUrl`] for anything but an absolute http(s) URL.
    pub fn new(base_url: &str) -> Result<Self, UpstreamError> {
        let uri: Uri = base_url.parse().map_err(|_| UpstreamError::InvalidUrl)?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(UpstreamError::InvalidUrl);
        };
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(UpstreamError::InvalidUrl);
        }
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(UpstreamError::InvalidUrl);
        }
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::InvalidUrl)?;
        Ok(Upstream {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            host,
            provider_auth: None,
            models: Vec::new(),
        })
    }

    /// Sends `key` as `Authorization: Bearer` to this upstream (`None`: no key).
    ///
    /// # Errors
    ///
    /// [`UpstreamError::InvalidProviderKey`] when the key cannot be a header value.
    pub fn with_provider_key(mut self, key: Option<&str>) -> Result<Self, UpstreamError> {
        self.provider_auth = key
            .map(|k| {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| UpstreamError::InvalidProviderKey)?;
                v.set_sensitive(true);
                Ok::<_, UpstreamError>(v)
            })
            .transpose()?;
        Ok(self)
    }

    /// Serves only models matching one of `patterns` (`gpt-*`, `llama-*`); none (the default)
    /// or `*` means every model.
    ///
    /// # Errors
    ///
    /// [`UpstreamError::InvalidModelPattern`] for a pattern that is not one.
    pub fn with_models<I, P>(mut self, patterns: I) -> Result<Self, UpstreamError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        self.models = patterns
            .into_iter()
            .map(|p| ModelPattern::new(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }

    fn serves_every_model(&self) -> bool {
        self.models.is_empty() || self.models.iter().any(|p| p.as_str() == "*")
    }

    fn serves(&self, model: &str) -> bool {
        self.serves_every_model() || self.models.iter().any(|p| p.matches(model))
    }

    fn uri_for(&self, original: &Uri) -> Option<Uri> {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query: PathAndQuery = if self.base_path.is_empty() {
            PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(pq.as_bytes())).ok()?
        } else {
            format!("{}{}", self.base_path, pq).parse().ok()?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .ok()
    }
}

/// Builds an [`UpstreamProxy`]. Made by [`UpstreamProxy::builder`].
#[derive(Debug, Default)]
#[must_use]
pub struct ProxyBuilder {
    upstreams: Vec<Upstream>,
    timeouts: Timeouts,
    roots: Roots,
    extra_ca: Vec<Vec<u8>>,
}

impl ProxyBuilder {
    /// Adds an upstream; for a request, the first one that serves its model is chosen.
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    /// Sets the timeouts (default [`Timeouts::default`]).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Which roots `https://` upstreams are verified against (default [`Roots::Webpki`]).
    pub fn roots(mut self, roots: Roots) -> Self {
        self.roots = roots;
        self
    }

    /// Also trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks), for
    /// private endpoints; checked by [`build`](Self::build).
    pub fn extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca.push(pem.into());
        self
    }

    /// Checks the settings and makes the proxy.
    ///
    /// # Errors
    ///
    /// [`UpstreamError::NoUpstream`] with no upstream; [`UpstreamError::Ca`] or
    /// [`UpstreamError::Tls`] for unusable TLS settings.
    pub fn build(self) -> Result<UpstreamProxy, UpstreamError> {
        if self.upstreams.is_empty() {
            return Err(UpstreamError::NoUpstream);
        }
        let client = tls::client(self.roots, &self.extra_ca, self.timeouts.connect)?;
        let default = self
            .upstreams
            .iter()
            .position(Upstream::serves_every_model)
            .unwrap_or(0);
        Ok(UpstreamProxy {
            inner: Arc::new(Inner {
                upstreams: self.upstreams,
                default,
                timeouts: self.timeouts,
            }),
            client,
        })
    }
}

/// A tower service that forwards each request to an upstream model server.
///
/// The request's path and query are appended to the upstream's base URL path
/// (`http://host:8080/openai` + `/v1/models`). Hop-by-hop headers are dropped; `Host` is
/// set to the upstream's. An unreachable upstream answers 502, a timed-out one 504, both with
/// an OpenAI-style error. See the [module docs](self) for routing, TLS and timeouts.
#[derive(Clone)]
pub struct UpstreamProxy {
    inner: Arc<Inner>,
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
}

struct Inner {
    upstreams: Vec<Upstream>,
    default: usize,
    timeouts: Timeouts,
}

impl std::fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamProxy")
            .field("upstreams", &self.inner.upstreams)
            .field("timeouts", &self.inner.timeouts)
            .finish()
    }
}

const CLIENT_CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl UpstreamProxy {
    /// A proxy to one upstream at `base_url` for every model, sending `provider_key` (if any)
    /// as `Authorization: Bearer`, with the default timeouts and roots.
    ///
    /// # Errors
    ///
    /// [`UpstreamError`] for a URL that is not absolute `http(s)://`, or a key that cannot be a
    /// header value.
    pub fn new(base_url: &str, provider_key: Option<&str>) -> Result<Self, UpstreamError> {
        Self::builder()
            .upstream(Upstream::new(base_url)?.with_provider_key(provider_key)?)
            .build()
    }

    /// A builder for several upstreams, timeouts and TLS roots.
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    /// The upstreams, in the order they are tried.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.inner.upstreams
    }

    /// The timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// The upstream that serves `model` (`None`: the request names no model), if any.
    pub fn upstream_for(&self, model: Option<&str>) -> Option<&Upstream> {
        let upstreams = &self.inner.upstreams;
        match model {
            None => upstreams.get(self.inner.default),
            Some(m) => upstreams.iter().find(|u| u.serves(m)),
        }
    }
}

fn error_response(
    status: StatusCode,
    code: &'static str,
    message: &'static str,
) -> Response<ProxyResponseBody> {
    // Not a keygate decision, so no `Denial` in the extensions: only the same JSON shape.
    let body = Denial::new(Stage::Audit, status, code, message).json_body();
    let mut response = Response::new(ProxyResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn bad_gateway() -> Response<ProxyResponseBody> {
    error_response(
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
        "The model server could not be reached.",
    )
}

fn timed_out(cut: Cut, trace: Option<&RequestTrace>) -> Response<ProxyResponseBody> {
    if let Some(trace) = trace {
        trace.set_cut(cut);
    }
    tracing::warn!(cut = cut.as_str(), "upstream request cut by a timeout");
    let mut response = error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        "The model server did not answer in time.",
    );
    response.extensions_mut().insert(cut);
    response
}

/// Whether a client error is a connect timeout (the connector's `TimedOut`).
fn is_connect_timeout(error: &hyper_util::client::legacy::Error) -> bool {
    if !error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        // hyper-util's connector reports its connect timeout as `TimedOut`.
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

impl<B> tower_service::Service<Request<B>> for UpstreamProxy
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let model = request
            .extensions()
            .get::<RequestFacts>()
            .and_then(RequestFacts::model);
        let Some(upstream) = self.upstream_for(model) else {
            return Box::pin(std::future::ready(Ok(error_response(
                StatusCode::NOT_FOUND,
                "model_not_found",
                "No model server is configured for this model.",
            ))));
        };
        let Some(uri) = upstream.uri_for(request.uri()) else {
            return Box::pin(std::future::ready(Ok(bad_gateway())));
        };
        let (mut parts, body) = request.into_parts();
        let trace = parts.extensions.get::<RequestTrace>().cloned();
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        for name in CLIENT_CREDENTIAL_HEADERS.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(*name);
        }
        headers.insert(header::HOST, upstream.host.clone());
        if let Some(auth) = &upstream.provider_auth {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        let body: ProxyBody = body.map_err(Into::into).boxed_unsync();
        let request = Request::from_parts(parts, body);
        let client = self.client.clone();
        let timeouts = self.inner.timeouts;
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            let deadline = timeouts.total.map(|t| start + t);
            let head_deadline = match (timeouts.head, deadline) {
                (Some(h), Some(d)) => Some((start + h).min(d)),
                (Some(h), None) => Some(start + h),
                (None, d) => d,
            };
            let sent = client.request(request);
            let result = match head_deadline {
                Some(at) => match tokio::time::timeout_at(at, sent).await {
                    Ok(result) => result,
                    Err(_) => {
                        let cut = if Some(at) == deadline
                            && timeouts.head.is_none_or(|h| start + h > at)
                        {
                            Cut::UpstreamTotal
                        } else {
                            Cut::UpstreamHead
                        };
                        return Ok(timed_out(cut, trace.as_ref()));
                    }
                },
                None => sent.await,
            };
            match result {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    for name in HOP_BY_HOP {
                        parts.headers.remove(HeaderName::from_static(name));
                    }
                    let sse = is_event_stream(&parts.headers);
                    let body =
                        ProxyResponseBody::upstream(body, timeouts.idle, deadline, sse, trace);
                    Ok(Response::from_parts(parts, body))
                }
                Err(e) if is_connect_timeout(&e) => {
                    Ok(timed_out(Cut::UpstreamConnect, trace.as_ref()))
                }
                Err(_) => Ok(bad_gateway()),
            }
        })
    }
}
#[cfg(test)]
mod tests;
