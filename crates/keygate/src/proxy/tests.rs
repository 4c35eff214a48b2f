use super::*;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use keygate_core::RequestedModel;
use keygate_testkit::{serve_tls, test_pki};
use tower::ServiceExt;

type Req = Request<Full<Bytes>>;

fn get(path: &str) -> Req {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

fn with_model(mut req: Req, model: &str) -> Req {
    let mut facts = RequestFacts::unrouted();
    facts.model = Some(RequestedModel::new(model));
    req.extensions_mut().insert(facts);
    req
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Echoes `name|path|auth|x-api-key present|body`.
fn echo(name: &'static str) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| async move {
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
        format!(
            "{name}|{path}|{auth}|{api_key}|{}",
            String::from_utf8_lossy(&body)
        )
    })
}

async fn text(response: Response<ProxyResponseBody>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn forwards_path_body_and_provider_key_but_not_client_key() {
    let addr = serve(echo("a")).await;
    let proxy = UpstreamProxy::new(&format!("http://{addr}/base/"), Some("prov-secret")).unwrap();
    let request = Request::post("/v1/chat/completions?x=1")
        .header("authorization", "Bearer client-key")
        .header("x-api-key", "client-key")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap();
    let response = proxy.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        text(response).await,
        "a|/base/v1/chat/completions?x=1|Bearer prov-secret|false|{\"model\":\"m\"}"
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
    let response = proxy.oneshot(get("/v1/models")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(response.extensions().get::<Denial>().is_none());
    assert!(response.extensions().get::<Cut>().is_none());
    assert!(text(response).await.contains("upstream_unavailable"));
}

#[test]
fn bad_urls_and_debug_output() {
    assert!(UpstreamProxy::new("not a url", None).is_err());
    assert!(UpstreamProxy::new("/relative", None).is_err());
    assert!(UpstreamProxy::new("ftp://api.example", None).is_err());
    assert!(UpstreamProxy::new("http://user:pw@api.example", None).is_err());
    assert!(UpstreamProxy::new("https://api.example", None).is_ok());
    assert!(matches!(
        UpstreamProxy::builder().build(),
        Err(UpstreamError::NoUpstream)
    ));
    let proxy = UpstreamProxy::new("https://127.0.0.1:9", Some("prov-secret")).unwrap();
    assert!(!format!("{proxy:?}").contains("prov-secret"));
}

#[tokio::test]
async fn each_model_goes_to_the_upstream_that_serves_it_with_its_own_key() {
    let openai = serve(echo("openai")).await;
    let local = serve(echo("local")).await;
    let proxy = UpstreamProxy::builder()
        .upstream(
            Upstream::new(&format!("http://{local}"))
                .unwrap()
                .with_models(["llama-*"])
                .unwrap()
                .with_provider_key(Some("local-key"))
                .unwrap(),
        )
        .upstream(
            Upstream::new(&format!("http://{openai}"))
                .unwrap()
                .with_models(["gpt-*", "o3*"])
                .unwrap()
                .with_provider_key(Some("openai-key"))
                .unwrap(),
        )
        .build()
        .unwrap();
    let llama = proxy
        .clone()
        .oneshot(with_model(get("/v1/x"), "llama-3-8b"))
        .await
        .unwrap();
    assert_eq!(text(llama).await, "local|/v1/x|Bearer local-key|false|");
    let gpt = proxy
        .clone()
        .oneshot(with_model(get("/v1/x"), "gpt-4o-mini"))
        .await
        .unwrap();
    assert_eq!(text(gpt).await, "openai|/v1/x|Bearer openai-key|false|");
    // No upstream serves it: 404 in the OpenAI shape, nothing forwarded.
    let other = proxy
        .clone()
        .oneshot(with_model(get("/v1/x"), "claude-3"))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    assert!(text(other).await.contains("model_not_found"));
    // No model: the first upstream listed (none serves every model).
    let none = proxy.oneshot(get("/v1/files")).await.unwrap();
    assert!(text(none).await.starts_with("local|"));
}

#[tokio::test]
async fn a_request_with_no_model_goes_to_the_upstream_for_every_model() {
    let special = serve(echo("special")).await;
    let general = serve(echo("general")).await;
    let proxy = UpstreamProxy::builder()
        .upstream(
            Upstream::new(&format!("http://{special}"))
                .unwrap()
                .with_models(["llama-*"])
                .unwrap(),
        )
        .upstream(Upstream::new(&format!("http://{general}")).unwrap())
        .build()
        .unwrap();
    let none = proxy.clone().oneshot(get("/v1/files")).await.unwrap();
    assert!(text(none).await.starts_with("general|"));
    let any = proxy
        .oneshot(with_model(get("/v1/x"), "gpt-4o"))
        .await
        .unwrap();
    assert!(text(any).await.starts_with("general|"));
}

/// An upstream whose `/hang` never answers, `/sse` sends one event then stalls, and `/json`
/// sends part of a body then stalls.
fn slow() -> axum::Router {
    use axum::routing::get;
    use futures_util::StreamExt;
    fn stalled(first: &'static str) -> axum::body::Body {
        let first = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from_static(first.as_bytes()))
        });
        axum::body::Body::from_stream(first.chain(futures_util::stream::pending()))
    }
    axum::Router::new()
        .route("/hang", get(std::future::pending::<String>))
        .route(
            "/sse",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    stalled("data: {\"choices\":[]}\n\n"),
                )
            }),
        )
        .route(
            "/json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    stalled("{\"id\":"),
                )
            }),
        )
}

fn timed(addr: SocketAddr, timeouts: Timeouts) -> UpstreamProxy {
    UpstreamProxy::builder()
        .upstream(Upstream::new(&format!("http://{addr}")).unwrap())
        .timeouts(timeouts)
        .build()
        .unwrap()
}

fn traced(path: &str) -> (Req, RequestTrace) {
    let mut req = get(path);
    let trace = RequestTrace::new();
    req.extensions_mut().insert(trace.clone());
    (req, trace)
}

#[tokio::test(start_paused = true)]
async fn a_hung_upstream_is_a_504_after_the_head_timeout_and_is_traced() {
    let addr = serve(slow()).await;
    let proxy = timed(
        addr,
        Timeouts::none().with_head(Some(Duration::from_secs(600))),
    );
    let (req, trace) = traced("/hang");
    let started = tokio::time::Instant::now();
    let response = proxy.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), Duration::from_secs(600));
    assert_eq!(response.extensions().get::<Cut>(), Some(&Cut::UpstreamHead));
    assert_eq!(trace.cut(), Some(Cut::UpstreamHead));
    let body = text(response).await;
    assert!(body.contains("\"code\":\"upstream_timeout\""), "{body}");
    assert!(body.contains("\"type\":\"server_error\""), "{body}");
}

#[tokio::test(start_paused = true)]
async fn the_total_timeout_bounds_the_wait_for_the_head_too() {
    let addr = serve(slow()).await;
    let proxy = timed(
        addr,
        Timeouts::none()
            .with_head(Some(Duration::from_secs(600)))
            .with_total(Some(Duration::from_secs(30))),
    );
    let (req, trace) = traced("/hang");
    let response = proxy.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(trace.cut(), Some(Cut::UpstreamTotal));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_ends_with_an_error_event_after_the_idle_timeout() {
    let addr = serve(slow()).await;
    let proxy = timed(
        addr,
        Timeouts::none().with_idle(Some(Duration::from_secs(60))),
    );
    let (req, trace) = traced("/sse");
    let response = proxy.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let started = tokio::time::Instant::now();
    let body = text(response).await;
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert!(body.starts_with("data: {\"choices\":[]}\n\n"), "{body}");
    assert!(
        body.ends_with("\n\n") && body.contains("event: error\ndata: {\"error\""),
        "{body}"
    );
    assert!(body.contains("upstream_timeout"), "{body}");
    assert_eq!(trace.cut(), Some(Cut::UpstreamIdle));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_plain_body_ends_with_an_error_not_a_short_answer() {
    let addr = serve(slow()).await;
    let proxy = timed(
        addr,
        Timeouts::none()
            .with_idle(Some(Duration::from_secs(60)))
            .with_total(Some(Duration::from_secs(45))),
    );
    let (req, trace) = traced("/json");
    let response = proxy.oneshot(req).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"{\"id\":"));
    let end = body.frame().await.unwrap();
    let error = end.unwrap_err();
    assert!(error.is::<UpstreamTimedOut>(), "{error}");
    // The total timeout (45 s) came before the idle one (60 s).
    assert_eq!(trace.cut(), Some(Cut::UpstreamTotal));
    assert!(body.frame().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn chunks_that_keep_coming_reset_the_idle_timeout() {
    use futures_util::StreamExt;
    // Five chunks 50 s apart: each gap is under the 60 s idle timeout, the whole over it.
    let app = axum::Router::new().fallback(|| async {
        let chunks = futures_util::stream::iter(0..5).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(50)).await;
            Ok::<_, std::io::Error>(Bytes::from(format!("data: {i}\n\n")))
        });
        (
            [(header::CONTENT_TYPE, "text/event-stream")],
            axum::body::Body::from_stream(chunks),
        )
    });
    let addr = serve(app).await;
    let proxy = timed(
        addr,
        Timeouts::none().with_idle(Some(Duration::from_secs(60))),
    );
    let (req, trace) = traced("/");
    let body = text(proxy.oneshot(req).await.unwrap()).await;
    assert_eq!(
        body,
        "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
    assert_eq!(trace.cut(), None);
}

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let (ca_pem, server) = test_pki();
    let addr = serve_tls(echo("tls"), server).await;
    let url = format!("https://127.0.0.1:{}/base", addr.port());

    let proxy = UpstreamProxy::builder()
        .upstream(
            Upstream::new(&url)
                .unwrap()
                .with_provider_key(Some("prov-secret"))
                .unwrap(),
        )
        .roots(Roots::None)
        .extra_ca_pem(ca_pem.clone())
        .build()
        .unwrap();
    let response = proxy.oneshot(get("/v1/models")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        text(response).await,
        "tls|/base/v1/models|Bearer prov-secret|false|"
    );

    // Without the CA the certificate is not trusted: 502, nothing sent in the clear.
    let untrusted = UpstreamProxy::new(&url, Some("prov-secret")).unwrap();
    let response = untrusted.oneshot(get("/v1/models")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

#[test]
fn unusable_ca_files_are_refused_at_build() {
    let builder =
        || UpstreamProxy::builder().upstream(Upstream::new("https://127.0.0.1:9").unwrap());
    assert!(matches!(
        builder().extra_ca_pem("not a pem").build(),
        Err(UpstreamError::Ca(_))
    ));
    assert!(matches!(
        builder().roots(Roots::None).build(),
        Err(UpstreamError::Tls(_))
    ));
}

#[tokio::test]
async fn a_key_set_is_fetched_over_https_and_refreshed() {
    use keygate_jwt::{KeySetSource, SharedKeySet};
    let (ca_pem, server) = test_pki();
    let jwks = std::sync::Arc::new(std::sync::Mutex::new(
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"3BTqMHMjIfRjJ7YErmcGLIZNS9_uCMUA4efAUH7oh8I","kid":"one"}]}"#.to_owned(),
    ));
    let doc = jwks.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let doc = doc.lock().unwrap().clone();
            async move { doc }
        }),
    );
    let addr = serve_tls(app, server).await;
    let url = format!("https://127.0.0.1:{}/jwks.json", addr.port());
    let ca = ca_pem.into_bytes();
    let fetcher = JwksFetcher::new(&url, Roots::None, std::slice::from_ref(&ca)).unwrap();
    let keys = SharedKeySet::new(fetcher.fetch().await.unwrap());
    assert!(keys.key_set().contains("one"));

    // A broken document is an error; the caller keeps what it has.
    *jwks.lock().unwrap() = "{".to_owned();
    assert!(matches!(fetcher.fetch().await, Err(JwksError::Keys(_))));
    let base = format!("https://127.0.0.1:{}", addr.port());
    let missing = JwksFetcher::new(
        &format!("{base}/nope"),
        Roots::None,
        std::slice::from_ref(&ca),
    )
    .unwrap();
    assert!(matches!(
        missing.fetch().await,
        Err(JwksError::Status(StatusCode::NOT_FOUND))
    ));
    // Another CA: the TLS handshake fails, nothing is trusted.
    let other_ca = test_pki().0.into_bytes();
    let untrusted = JwksFetcher::new(&url, Roots::None, &[other_ca]).unwrap();
    assert!(matches!(untrusted.fetch().await, Err(JwksError::Fetch(_))));
    assert!(JwksFetcher::new("ftp://x", Roots::Webpki, &[]).is_err());
}
