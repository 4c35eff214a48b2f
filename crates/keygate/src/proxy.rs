//! [`UpstreamProxy`]: a streaming reverse proxy to an OpenAI-compatible model server, to put
//! behind the keygate layers.
//!
//! Bodies stream both ways without being buffered whole. The client's credential headers are
//! never forwarded (the extraction layer strips them; the proxy strips them again), and the
//! provider key is set only on the upstream request, so it never reaches the client.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keygate_core::{Denial, Stage};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The response body of [`UpstreamProxy`]: the upstream's, streamed, or a small error.
pub type ProxyResponseBody = Either<hyper::body::Incoming, Full<Bytes>>;

/// Why an upstream cannot be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The URL is not an absolute `http://` URL.
    #[error("upstream must be an absolute http:// URL (https needs a TLS-terminating sidecar)")]
    InvalidUrl,
    /// The provider key cannot be sent as a header value.
    #[error("provider key holds characters that cannot be sent in a header")]
    InvalidProviderKey,
}

/// A tower service that forwards each request to an upstream base URL.
///
/// The request's path and query are appended to the base URL's path
/// (`http://host:8080/openai` + `/v1/models`). Hop-by-hop headers are dropped; `Host` is
/// set to the upstream's. An unreachable upstream answers 502 with an OpenAI-style error.
#[derive(Clone)]
pub struct UpstreamProxy {
    inner: Arc<Inner>,
    client: Client<HttpConnector, ProxyBody>,
}

struct Inner {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host: HeaderValue,
    provider_auth: Option<HeaderValue>,
}

impl std::fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamProxy")
            .field(
                "upstream",
                &format_args!(
                    "{}://{}{}",
                    self.inner.scheme, self.inner.authority, self.inner.base_path
                ),
            )
            .field(
                "provider_key",
                &self.inner.provider_auth.as_ref().map(|_| "<redacted>"),
            )
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
    /// A proxy to `base_url`, sending `provider_key` (if any) as `Authorization: Bearer`.
    ///
    /// # Errors
    ///
    /// [`UpstreamError`] for a URL that is not absolute `http://`, or a key that cannot be a
    /// header value.
    pub fn new(base_url: &str, provider_key: Option<&str>) -> Result<Self, UpstreamError> {
        let uri: Uri = base_url.parse().map_err(|_| UpstreamError::InvalidUrl)?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(UpstreamError::InvalidUrl);
        };
        if scheme != Scheme::HTTP {
            return Err(UpstreamError::InvalidUrl);
        }
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::InvalidUrl)?;
        let provider_auth = provider_key
            .map(|k| {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| UpstreamError::InvalidProviderKey)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(UpstreamProxy {
            inner: Arc::new(Inner {
                scheme,
                authority,
                base_path,
                host,
                provider_auth,
            }),
            client,
        })
    }

    fn upstream_uri(&self, original: &Uri) -> Option<Uri> {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query: PathAndQuery =
            format!("{}{}", self.inner.base_path, pq).parse().ok()?;
        Uri::builder()
            .scheme(self.inner.scheme.clone())
            .authority(self.inner.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .ok()
    }
}

fn bad_gateway() -> Response<ProxyResponseBody> {
    // Not a keygate decision, so no `Denial` in the extensions: only the same JSON shape.
    let body = Denial::new(
        Stage::Audit,
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
        "The model server could not be reached.",
    )
    .with_error_type("server_error")
    .json_body();
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
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
        let Some(uri) = self.upstream_uri(request.uri()) else {
            return Box::pin(std::future::ready(Ok(bad_gateway())));
        };
        let (mut parts, body) = request.into_parts();
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        for name in CLIENT_CREDENTIAL_HEADERS.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(*name);
        }
        headers.insert(header::HOST, self.inner.host.clone());
        if let Some(auth) = &self.inner.provider_auth {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        let body: ProxyBody = body.map_err(Into::into).boxed_unsync();
        let request = Request::from_parts(parts, body);
        let client = self.client.clone();
        Box::pin(async move {
            match client.request(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    for name in HOP_BY_HOP {
                        parts.headers.remove(HeaderName::from_static(name));
                    }
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                Err(_) => Ok(bad_gateway()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tower::ServiceExt;

    async fn echo_server() -> SocketAddr {
        // Echoes the path, the auth header it saw and the body.
        let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .unwrap_or_default();
            let api_key = req.headers().contains_key("x-api-key");
            let path = req.uri().to_string();
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            format!("{path}|{auth}|{api_key}|{}", String::from_utf8_lossy(&body))
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn forwards_path_body_and_provider_key_but_not_client_key() {
        let addr = echo_server().await;
        let proxy =
            UpstreamProxy::new(&format!("http://{addr}/base/"), Some("prov-secret")).unwrap();
        let request = Request::post("/v1/chat/completions?x=1")
            .header("authorization", "Bearer client-key")
            .header("x-api-key", "client-key")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .unwrap();
        let response = proxy.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "/base/v1/chat/completions?x=1|Bearer prov-secret|false|{\"model\":\"m\"}"
        );
    }

    #[tokio::test]
    async fn unreachable_upstream_is_502_json() {
        // Bind then drop to get a port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let proxy = UpstreamProxy::new(&format!("http://{addr}"), None).unwrap();
        let response = proxy
            .oneshot(
                Request::get("/v1/models")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(response.extensions().get::<Denial>().is_none());
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            std::str::from_utf8(&text)
                .unwrap()
                .contains("upstream_unavailable")
        );
    }

    #[test]
    fn bad_urls_and_debug_output() {
        assert!(UpstreamProxy::new("not a url", None).is_err());
        assert!(UpstreamProxy::new("/relative", None).is_err());
        assert!(UpstreamProxy::new("https://api.example", None).is_err());
        let proxy = UpstreamProxy::new("http://127.0.0.1:9", Some("prov-secret")).unwrap();
        assert!(!format!("{proxy:?}").contains("prov-secret"));
    }
}
