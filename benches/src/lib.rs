//! Shared fixtures of the keygate cross-layer benches: keys and stores of any size, the
//! upstream handler every stack wraps, chat bodies of a given size, the whole keygate stack,
//! a way to call a service and drain its answer, resident memory, and the reader of
//! criterion's results that prints the ratios `BENCHMARKS.md` quotes.
//!
//! ```
//! use keygate_benches::{Keys, call, full_stack, rt_current_thread, upstream};
//!
//! let keys = Keys::new(4);
//! let mut service = full_stack(keys.store.clone(), keygate_limit::RateLimitLayer::new(), upstream());
//! let status = rt_current_thread().block_on(call(&mut service, keys.models_request(0)));
//! assert_eq!(status, http::StatusCode::OK);
//! ```

use std::convert::Infallible;
use std::fmt::Debug;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use keygate_audit::{AuditLayer, NoopSink};
use keygate_core::{
    Access, Credential, KeyDigest, KeyFormat, KeyId, KeyRecord, ModelPattern, ModelRules,
    Permissions, Principal, ProjectRecord, Secret, Timestamp,
};
use keygate_extract::KeyExtractLayer;
use keygate_limit::{RateLimitLayer, TokenLimitLayer};
use keygate_scope::ScopeLayer;
use keygate_store::MemoryStore;
use tower::{Service, ServiceBuilder, ServiceExt};

/// The project every bench key belongs to.
pub const PROJECT: &str = "proj_bench";
/// The model every bench request names (and every bench key may use).
pub const MODEL: &str = "gpt-4o-mini";
/// The path of the request without a body: `GET /v1/models/{model}` carries its model in the
/// path. (`GET /v1/models` would be the natural choice, but the scope layer currently answers
/// it with 400 `model_required` for keys with model rules.)
pub const MODEL_PATH: &str = "/v1/models/gpt-4o-mini";

/// Whether criterion runs for measurement (`cargo bench`) rather than once per bench as a
/// test (`cargo test --benches`): large fixtures are built only for measurement.
pub fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A single-threaded tokio runtime, as `#[tokio::main(flavor = "current_thread")]` makes.
///
/// # Panics
///
/// When the runtime cannot be built.
pub fn rt_current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A multi-threaded tokio runtime with `workers` worker threads.
///
/// # Panics
///
/// When the runtime cannot be built.
pub fn rt_multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The bare upstream: an axum router answering `GET /v1/models/{model}` and
/// `POST /v1/chat/completions` with a small static JSON body, without reading the request
/// body.
pub fn upstream() -> Router {
    async fn models() -> ([(header::HeaderName, &'static str); 1], &'static str) {
        (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"id":"gpt-4o-mini","object":"model","owned_by":"system"}"#,
        )
    }
    async fn chat() -> ([(header::HeaderName, &'static str); 1], &'static str) {
        (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#,
        )
    }
    Router::new()
        .route("/v1/models/{model}", get(models))
        .route("/v1/chat/completions", post(chat))
}

/// The record of bench key `i`: chat completions (write) and models (read), the model
/// [`MODEL`] only, and a request rate so high it never refuses (the rate layer still counts).
pub fn key_record(i: usize, digest: KeyDigest) -> KeyRecord {
    let mut key = KeyRecord::new(
        KeyId::new(format!("key_{i:08}")),
        PROJECT,
        digest,
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::Restricted(
        [
            ("chat.completions".to_owned(), Access::Write),
            ("models".to_owned(), Access::Read),
        ]
        .into(),
    );
    key.models = ModelRules::allow_only([ModelPattern::new(MODEL).expect("a valid pattern")]);
    key.limits.requests_per_minute = NonZeroU32::new(u32::MAX);
    key
}

/// `n` distinct keys in a [`MemoryStore`], with their secrets ready to present.
#[derive(Debug)]
pub struct Keys {
    /// The store holding every key.
    pub store: MemoryStore,
    /// The secrets, in key order.
    pub secrets: Vec<String>,
    /// `Bearer <secret>` for each key, built once so requests only clone it.
    pub bearer: Vec<HeaderValue>,
    /// The principal of each key, as the extract layer would make it (for layers benched
    /// without the extract layer in front).
    pub principals: Vec<Principal>,
}

impl Keys {
    /// `n` fresh keys (at least one).
    ///
    /// # Panics
    ///
    /// When the random source fails or the records do not make a snapshot.
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let format = KeyFormat::default();
        let project = Arc::new(ProjectRecord::new(PROJECT));
        let mut secrets = Vec::with_capacity(n);
        let mut records = Vec::with_capacity(n);
        let mut bearer = Vec::with_capacity(n);
        let mut principals = Vec::with_capacity(n);
        for i in 0..n {
            let secret = format.generate().expect("random source");
            let record = key_record(i, secret.digest());
            principals.push(Principal::new(
                Arc::new(record.clone()),
                project.clone(),
                Credential::ApiKey(Secret::Current),
            ));
            records.push(record);
            let mut value = HeaderValue::try_from(format!("Bearer {}", secret.expose()))
                .expect("a key is a valid header value");
            value.set_sensitive(true);
            bearer.push(value);
            secrets.push(secret.expose().to_owned());
        }
        let store = MemoryStore::from_records([ProjectRecord::new(PROJECT)], records)
            .expect("valid records");
        Keys {
            store,
            secrets,
            bearer,
            principals,
        }
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Whether there are no keys (never: [`Keys::new`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `GET /v1/models/gpt-4o-mini` with key `i` (modulo the number of keys): a route whose
    /// model is in the path, so the whole stack runs without reading a body.
    pub fn models_request(&self, i: usize) -> Request<Body> {
        let mut req = models_request();
        req.headers_mut().insert(
            header::AUTHORIZATION,
            self.bearer[i % self.bearer.len()].clone(),
        );
        req
    }

    /// `POST /v1/chat/completions` with key `i` and `body` (JSON).
    pub fn chat_request(&self, i: usize, body: &Bytes) -> Request<Body> {
        let mut req = chat_request(body);
        req.headers_mut().insert(
            header::AUTHORIZATION,
            self.bearer[i % self.bearer.len()].clone(),
        );
        req
    }
}

/// `GET /v1/models/gpt-4o-mini` with no credential.
pub fn models_request() -> Request<Body> {
    Request::get(MODEL_PATH)
        .body(Body::empty())
        .expect("a valid request")
}

/// `POST /v1/chat/completions` with a JSON `body` and no credential.
pub fn chat_request(body: &Bytes) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.clone()))
        .expect("a valid request")
}

/// A chat-completions JSON body of about `size` bytes (never less than a minimal request):
/// messages with escaped quotes, then `"model"` last, so a scanner has to walk all of it.
pub fn chat_body(size: usize) -> Bytes {
    let content =
        r#"Explain \"tower\" middleware in Rust: layers, services, and back-pressure. "#.repeat(4);
    let tail = format!(r#"],"temperature":0.2,"max_tokens":64,"model":"{MODEL}"}}"#);
    let mut out = String::with_capacity(size + 512);
    out.push_str(r#"{"messages":["#);
    let mut first = true;
    loop {
        let role = if first { "system" } else { "user" };
        let message = format!(r#"{{"role":"{role}","content":"{content}"}}"#);
        // Always at least one message, then as many as fit.
        if !first && out.len() + message.len() + 1 + tail.len() > size {
            break;
        }
        if !first {
            out.push(',');
        }
        out.push_str(&message);
        first = false;
    }
    // Pad the last message to land on `size` exactly when there is room.
    let missing = size.saturating_sub(out.len() + tail.len());
    if missing > 0 && out.ends_with("\"}") {
        out.truncate(out.len() - 2);
        out.extend(std::iter::repeat_n('x', missing));
        out.push_str("\"}");
    }
    out.push_str(&tail);
    debug_assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
    Bytes::from(out)
}

/// The whole keygate stack, outermost first: audit (no-op sink), key extraction from
/// `store`, scope ([`ScopeLayer::openai`]), `rate`, and the token limit layer (no prices: for
/// keys without token limits or budgets it passes without reading the body), over `inner`.
pub fn full_stack<S, ResBody>(
    store: MemoryStore,
    rate: RateLimitLayer,
    inner: S,
) -> impl Service<
    Request<Body>,
    Response = Response<impl HttpBody<Data = Bytes, Error: Debug> + Send + use<S, ResBody>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ use<S, ResBody>
where
    S: Service<
            Request<keygate_limit::RequestBody<Body>>,
            Response = Response<ResBody>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ResBody: HttpBody<Data = Bytes, Error: Debug + Send> + Send + 'static,
{
    ServiceBuilder::new()
        .layer(AuditLayer::new(NoopSink))
        .layer(KeyExtractLayer::new(store))
        .layer(ScopeLayer::openai())
        .layer(rate)
        .layer(TokenLimitLayer::default())
        .service(inner)
}

/// Calls `service` once the way a server does (`ready`, `call`), then drains the response
/// body to its end (the audit layer records a request when its body ends).
///
/// # Panics
///
/// When the service or the body fails.
pub async fn call<S, B>(service: &mut S, request: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Debug,
    B: HttpBody,
    B::Error: Debug,
{
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("answered");
    let status = response.status();
    let mut body = pin!(response.into_body());
    while let Some(frame) = body.frame().await {
        frame.expect("body frame");
    }
    status
}

/// This process's resident memory in bytes (`VmRSS` of `/proc/self/status`), when known.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where criterion keeps its results: `$CRITERION_HOME`, else `<target>/criterion` of the
/// running bench binary (`<target>/<profile>/deps/<bench>`).
pub fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(Path::new(&target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The mean time (ns) criterion measured for `group/id` in its latest run, if there is one.
pub fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir()?
        .join(group)
        .join(id)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("mean")?.get("point_estimate")?.as_f64()
}

/// Formats nanoseconds for a table: `850 ns`, `1.24 µs`, `3.10 ms`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{:.2} ms", ns / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_is_json_of_the_asked_size_with_the_model_last() {
        for size in [1024, 4096, 16 * 1024] {
            let body = chat_body(size);
            assert_eq!(body.len(), size);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["model"], MODEL);
            assert!(body.ends_with(format!(r#""model":"{MODEL}"}}"#).as_bytes()));
        }
    }

    #[test]
    fn full_stack_admits_every_key_of_a_set() {
        let keys = Keys::new(3);
        let mut service = full_stack(keys.store.clone(), RateLimitLayer::new(), upstream());
        let rt = rt_current_thread();
        for i in 0..3 {
            assert_eq!(
                rt.block_on(call(&mut service, keys.models_request(i))),
                StatusCode::OK
            );
            let body = chat_body(1024);
            assert_eq!(
                rt.block_on(call(&mut service, keys.chat_request(i, &body))),
                StatusCode::OK
            );
        }
    }

    #[test]
    fn full_stack_refuses_a_request_without_a_key() {
        let keys = Keys::new(1);
        let mut service = full_stack(keys.store.clone(), RateLimitLayer::new(), upstream());
        let request = models_request();
        let status = rt_current_thread().block_on(call(&mut service, request));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn full_stack_refuses_a_model_the_key_may_not_use() {
        let keys = Keys::new(1);
        let mut service = full_stack(keys.store.clone(), RateLimitLayer::new(), upstream());
        let body = Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#);
        let status = rt_current_thread().block_on(call(&mut service, keys.chat_request(0, &body)));
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
}
