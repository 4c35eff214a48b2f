//! Behaviour of the layer over a `tower::service_fn` with `Full<Bytes>` bodies.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    Credential, Denial, KeyDigest, KeyFormat, KeyId, KeyRecord, KeyStore, Lookup, ManualClock,
    PreviousSecret, Principal, ProjectRecord, Secret, SecretKey, Snapshot, SnapshotError,
    StoreError, Timestamp, TokenError, TokenVerifier,
};
use tower::{Layer, ServiceExt, service_fn};

use crate::{ConfigError, CredentialSource, KeyExtractLayer};

const T0: Timestamp = Timestamp::from_unix_secs(1_800_000_000);

/// A fixed set of keys, shared by the clones of a layer: all these tests need of a store.
type Store = Arc<Snapshot>;

fn store_of(
    projects: impl IntoIterator<Item = ProjectRecord>,
    keys: impl IntoIterator<Item = KeyRecord>,
) -> Result<Store, SnapshotError> {
    Snapshot::new(projects, keys).map(Arc::new)
}

struct Fixture {
    clock: ManualClock,
    store: Store,
    live: SecretKey,
    revoked: SecretKey,
    expired: SecretKey,
    disabled: SecretKey,
    not_yet: SecretKey,
    expiring: SecretKey,
    rotated_new: SecretKey,
    rotated_old: SecretKey,
    project_off: SecretKey,
    unknown: SecretKey,
}

fn secret() -> SecretKey {
    KeyFormat::default().generate().unwrap()
}

fn record(id: &str, project: &str, s: &SecretKey) -> KeyRecord {
    KeyRecord::new(
        KeyId::new(id),
        project,
        s.digest(),
        T0.saturating_sub(Duration::from_secs(3600)),
    )
}

fn fixture() -> Fixture {
    let f = Fixture {
        clock: ManualClock::new(T0),
        store: Store::default(),
        live: secret(),
        revoked: secret(),
        expired: secret(),
        disabled: secret(),
        not_yet: secret(),
        expiring: secret(),
        rotated_new: secret(),
        rotated_old: secret(),
        project_off: secret(),
        unknown: secret(),
    };
    let mut revoked = record("key_revoked", "p", &f.revoked);
    revoked.revoked_at = Some(T0);
    let mut expired = record("key_expired", "p", &f.expired);
    expired.expires_at = Some(T0);
    let mut disabled = record("key_disabled", "p", &f.disabled);
    disabled.disabled = true;
    let mut not_yet = record("key_not_yet", "p", &f.not_yet);
    not_yet.not_before = Some(T0.saturating_add(Duration::from_secs(60)));
    let mut expiring = record("key_expiring", "p", &f.expiring);
    expiring.expires_at = Some(T0.saturating_add(Duration::from_secs(10)));
    let mut rotated = record("key_rotated", "p", &f.rotated_new);
    rotated.previous = Some(PreviousSecret {
        digest: f.rotated_old.digest(),
        valid_until: T0.saturating_add(Duration::from_secs(60)),
    });
    let mut off = ProjectRecord::new("off");
    off.disabled = true;
    let store = store_of(
        [ProjectRecord::new("p"), off],
        [
            record("key_live", "p", &f.live),
            revoked,
            expired,
            disabled,
            not_yet,
            expiring,
            rotated,
            record("key_off", "off", &f.project_off),
        ],
    )
    .unwrap();
    Fixture { store, ..f }
}

impl Fixture {
    fn layer(&self) -> KeyExtractLayer<Store> {
        KeyExtractLayer::new(self.store.clone()).with_clock(self.clock.clock())
    }
}

/// Answers 200 with the caller's key id as body, and tells which credential headers it saw.
async fn echo(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let who = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.key_id().to_string())
        .unwrap_or_default();
    let seen: Vec<&str> = ["authorization", "x-api-key", "api-key"]
        .into_iter()
        .filter(|h| req.headers().contains_key(*h))
        .collect();
    let sensitive = req
        .headers()
        .iter()
        .filter(|(_, v)| v.is_sensitive())
        .count();
    let mut res = Response::new(Full::from(who));
    res.headers_mut()
        .insert("x-seen", seen.join(",").parse().unwrap());
    res.headers_mut().insert("x-sensitive", sensitive.into());
    Ok(res)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    denial: Option<Denial>,
}

async fn send<K: KeyStore, T: TokenVerifier>(
    layer: KeyExtractLayer<K, T>,
    req: Request<Full<Bytes>>,
) -> Answer {
    let svc = layer.layer(service_fn(echo));
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let denial = res.extensions().get::<Denial>().cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
        denial,
    }
}

fn get() -> http::request::Builder {
    Request::get("/v1/chat/completions")
}

fn bearer(s: &str) -> Request<Full<Bytes>> {
    get()
        .header("authorization", format!("Bearer {s}"))
        .body(Full::default())
        .unwrap()
}

fn detail(a: &Answer) -> Option<&'static str> {
    a.denial.as_ref().and_then(|d| d.detail())
}

#[tokio::test]
async fn valid_key_reaches_the_handler_with_its_principal() {
    let f = fixture();
    let a = send(f.layer(), bearer(f.live.expose())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "key_live");
    assert!(a.denial.is_none());
}

#[tokio::test]
async fn every_default_source_is_read() {
    let f = fixture();
    for header in ["x-api-key", "api-key"] {
        let req = get()
            .header(header, f.live.expose())
            .body(Full::default())
            .unwrap();
        let a = send(f.layer(), req).await;
        assert_eq!(a.status, StatusCode::OK, "{header}");
        assert_eq!(a.body, "key_live");
    }
}

#[tokio::test]
async fn missing_credential_is_401_with_a_bearer_challenge() {
    let f = fixture();
    let a = send(f.layer(), get().body(Full::default()).unwrap()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    assert_eq!(a.denial.unwrap().code(), "missing_api_key");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "missing_api_key");
}

#[tokio::test]
async fn each_malformed_shape_gets_the_one_invalid_credential_401() {
    let f = fixture();
    let reference = send(f.layer(), bearer(f.unknown.expose())).await;
    assert_eq!(reference.status, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&reference), Some("unknown"));

    let good = f.live.expose();
    let mut bad_checksum = good.to_owned();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    let mut bad_charset = good.to_owned();
    bad_charset.replace_range(10..11, "_");
    let cases: Vec<(Request<Full<Bytes>>, &str)> = vec![
        (
            bearer(&good.replace("sk-kg-", "sk-xx-")),
            "malformed_prefix",
        ),
        (bearer(&format!("{good}A")), "malformed_length"),
        (bearer(&good[..good.len() - 1]), "malformed_length"),
        (bearer(&bad_charset), "malformed_charset"),
        (bearer(&bad_checksum), "bad_checksum"),
        (bearer("not-a-key"), "malformed_prefix"),
        (
            get()
                .header("authorization", format!("Basic {good}"))
                .body(Full::default())
                .unwrap(),
            "malformed",
        ),
        (
            get()
                .header("authorization", "Bearer")
                .body(Full::default())
                .unwrap(),
            "malformed",
        ),
        (
            get()
                .header(
                    "x-api-key",
                    http::HeaderValue::from_bytes(b"sk-kg-\xff").unwrap(),
                )
                .body(Full::default())
                .unwrap(),
            "malformed",
        ),
    ];
    for (req, expected) in cases {
        let a = send(f.layer(), req).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{expected}");
        assert_eq!(detail(&a), Some(expected));
        assert_eq!(a.headers, reference.headers, "{expected}");
        assert_eq!(a.body, reference.body, "{expected}");
    }
}

#[tokio::test]
async fn unknown_revoked_expired_and_others_are_byte_identical() {
    let f = fixture();
    let reference = send(f.layer(), bearer(f.unknown.expose())).await;
    let cases = [
        (&f.revoked, "revoked"),
        (&f.expired, "expired"),
        (&f.disabled, "disabled"),
        (&f.not_yet, "not_yet_valid"),
        (&f.project_off, "project_disabled"),
    ];
    for (key, expected) in cases {
        let a = send(f.layer(), bearer(key.expose())).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{expected}");
        assert_eq!(detail(&a), Some(expected));
        assert_eq!(a.headers, reference.headers, "{expected}");
        assert_eq!(a.body, reference.body, "{expected}");
    }
    assert_eq!(reference.headers["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn previous_secret_works_only_during_rotation_grace() {
    let f = fixture();
    let a = send(f.layer(), bearer(f.rotated_old.expose())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "key_rotated");

    f.clock.advance(Duration::from_secs(60));
    let a = send(f.layer(), bearer(f.rotated_old.expose())).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&a), Some("grace_ended"));

    let a = send(f.layer(), bearer(f.rotated_new.expose())).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn principal_says_which_secret_was_used() {
    let f = fixture();
    let layer = f.layer();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let p = req.extensions().get::<Principal>().unwrap();
        let used = match p.credential() {
            Credential::ApiKey(Secret::Previous) => "previous",
            Credential::ApiKey(Secret::Current) => "current",
            _ => "other",
        };
        Ok::<_, Infallible>(Response::new(Full::from(used)))
    }));
    let res = svc.oneshot(bearer(f.rotated_old.expose())).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "previous");
}

#[tokio::test]
async fn key_stops_working_when_the_clock_passes_its_expiry() {
    let f = fixture();
    assert_eq!(
        send(f.layer(), bearer(f.expiring.expose())).await.status,
        StatusCode::OK
    );
    f.clock.advance(Duration::from_secs(10));
    let a = send(f.layer(), bearer(f.expiring.expose())).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&a), Some("expired"));
}

#[tokio::test]
async fn two_different_credentials_are_400() {
    let f = fixture();
    let across = get()
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .header("x-api-key", f.expiring.expose())
        .body(Full::default())
        .unwrap();
    let a = send(f.layer(), across).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.denial.unwrap().code(), "conflicting_credentials");

    let repeated = get()
        .header("x-api-key", f.live.expose())
        .header("x-api-key", f.expiring.expose())
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(f.layer(), repeated).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_same_credential_in_two_sources_is_fine() {
    let f = fixture();
    let req = get()
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .header("x-api-key", f.live.expose())
        .body(Full::default())
        .unwrap();
    assert_eq!(send(f.layer(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_key_in_the_query_string_is_never_accepted() {
    let f = fixture();
    let only_query = Request::get(format!("/v1/models?api_key={}", f.live.expose()))
        .body(Full::default())
        .unwrap();
    let a = send(f.layer(), only_query).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.denial.unwrap().code(), "missing_api_key");

    let both = Request::get(format!("/v1/models?limit=1&key={}", f.live.expose()))
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .body(Full::default())
        .unwrap();
    let a = send(f.layer(), both).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.denial.unwrap().code(), "credential_in_query");
    assert!(!String::from_utf8_lossy(&a.body).contains(f.live.expose()));
}

#[tokio::test]
async fn an_ordinary_key_parameter_is_not_a_credential() {
    let f = fixture();
    let req = Request::get("/v1/files?key=reports/2026.csv")
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(f.layer(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn credential_headers_are_removed_by_default() {
    let f = fixture();
    let req = get()
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .header("x-api-key", f.live.expose())
        .header("api-key", f.live.expose())
        .body(Full::default())
        .unwrap();
    let a = send(f.layer(), req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["x-seen"], "");
}

#[tokio::test]
async fn credential_headers_are_kept_when_configured() {
    let f = fixture();
    let req = get()
        .header("authorization", format!("Bearer {}", f.live.expose()))
        .header("x-api-key", f.live.expose())
        .body(Full::default())
        .unwrap();
    let a = send(f.layer().keep_credential_headers(true), req).await;
    assert_eq!(a.headers["x-seen"], "authorization,x-api-key");
    assert_eq!(
        a.headers["x-sensitive"], "2",
        "kept headers are marked sensitive"
    );
}

#[tokio::test]
async fn grpc_request_gets_trailers_only_unauthenticated() {
    let f = fixture();
    let req = Request::post("/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("authorization", format!("Bearer {}", f.revoked.expose()))
        .body(Full::default())
        .unwrap();
    let a = send(f.layer(), req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["grpc-status"], "16");
    assert!(a.body.is_empty());
}

#[tokio::test]
async fn only_configured_sources_are_read() {
    let f = fixture();
    let layer = f
        .layer()
        .with_sources([CredentialSource::header("x-goog-api-key")])
        .unwrap();
    let a = send(layer.clone(), bearer(f.live.expose())).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.denial.unwrap().code(), "missing_api_key");
    let req = get()
        .header("x-goog-api-key", f.live.expose())
        .body(Full::default())
        .unwrap();
    assert_eq!(send(layer, req).await.status, StatusCode::OK);
}

#[test]
fn an_empty_source_list_is_refused_when_building() {
    let err = KeyExtractLayer::new(Store::default())
        .with_sources([])
        .unwrap_err();
    assert_eq!(err, ConfigError::NoSources);
}

#[tokio::test]
async fn keys_of_a_configured_prefix_are_accepted() {
    let format = KeyFormat::with_prefix("acme-").unwrap();
    let s = format.generate().unwrap();
    let store = store_of([ProjectRecord::new("p")], [record("key_acme", "p", &s)]).unwrap();
    let layer = KeyExtractLayer::new(store.clone()).with_key_format(format);
    assert_eq!(send(layer, bearer(s.expose())).await.status, StatusCode::OK);
    // The default format does not know the prefix.
    let a = send(KeyExtractLayer::new(store), bearer(s.expose())).await;
    assert_eq!(detail(&a), Some("malformed_prefix"));
}

#[tokio::test]
async fn denied_requests_never_reach_the_inner_service() {
    let f = fixture();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = f
        .layer()
        .layer(service_fn(move |_req: Request<Full<Bytes>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
        }));
    let res = svc
        .clone()
        .oneshot(bearer(f.revoked.expose()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    svc.oneshot(bearer(f.live.expose())).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_credential_appears_in_no_response_and_no_debug_output() {
    let f = fixture();
    for key in [&f.unknown, &f.revoked] {
        let a = send(f.layer(), bearer(key.expose())).await;
        let secret = key.expose();
        assert!(!String::from_utf8_lossy(&a.body).contains(secret));
        for v in a.headers.values() {
            assert!(!String::from_utf8_lossy(v.as_bytes()).contains(secret));
        }
        assert!(!format!("{:?}", a.denial.unwrap()).contains(secret));
    }
}

// ---- stores and verifiers that fail or wait ----

/// A store whose lookups fail, or succeed only after yielding once.
#[derive(Clone)]
struct TestStore {
    inner: Store,
    fail: bool,
    wait: bool,
    started: Arc<AtomicUsize>,
}

/// Pending once, then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl KeyStore for TestStore {
    async fn lookup(&self, digest: &KeyDigest) -> Result<Option<Lookup>, StoreError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.wait {
            YieldOnce(false).await;
        }
        if self.fail {
            return Err(StoreError::new("database unreachable"));
        }
        self.inner.lookup(digest).await
    }

    async fn lookup_id(&self, id: &str) -> Result<Option<Lookup>, StoreError> {
        self.inner.lookup_id(id).await
    }
}

fn test_store(f: &Fixture, fail: bool, wait: bool) -> KeyExtractLayer<TestStore> {
    KeyExtractLayer::new(TestStore {
        inner: f.store.clone(),
        fail,
        wait,
        started: Arc::default(),
    })
    .with_clock(f.clock.clock())
}

#[tokio::test]
async fn store_failure_is_503_never_a_pass() {
    let f = fixture();
    for wait in [false, true] {
        let a = send(test_store(&f, true, wait), bearer(f.live.expose())).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "wait={wait}");
        let denial = a.denial.unwrap();
        assert_eq!(denial.code(), "service_unavailable");
        assert_eq!(denial.detail(), Some("key store unavailable"));
    }
}

#[tokio::test]
async fn a_store_that_has_to_wait_gives_the_same_decisions() {
    let f = fixture();
    let a = send(test_store(&f, false, true), bearer(f.live.expose())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "key_live");
    assert_eq!(
        a.headers["x-seen"], "",
        "headers stripped on the waiting path too"
    );

    let reference = send(f.layer(), bearer(f.unknown.expose())).await;
    let a = send(test_store(&f, false, true), bearer(f.revoked.expose())).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body, reference.body);
    assert_eq!(a.headers, reference.headers);
}

#[tokio::test]
async fn a_store_that_waits_is_asked_once_per_request_after_the_first_wait() {
    let f = fixture();
    let started = Arc::new(AtomicUsize::new(0));
    let layer = KeyExtractLayer::new(TestStore {
        inner: f.store.clone(),
        fail: false,
        wait: true,
        started: started.clone(),
    });
    let svc = layer.layer(service_fn(echo));
    for _ in 0..3 {
        let res = svc.clone().oneshot(bearer(f.live.expose())).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    // The first request tried at once, then waited from a boxed future; the others went
    // straight to one.
    assert_eq!(started.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_store_that_answers_at_once_is_asked_once_per_request() {
    let f = fixture();
    let started = Arc::new(AtomicUsize::new(0));
    let layer = KeyExtractLayer::new(TestStore {
        inner: f.store.clone(),
        fail: false,
        wait: false,
        started: started.clone(),
    });
    let svc = layer.layer(service_fn(echo));
    for _ in 0..3 {
        svc.clone().oneshot(bearer(f.live.expose())).await.unwrap();
    }
    assert_eq!(started.load(Ordering::SeqCst), 3);
}

/// Accepts credentials starting with `tok-`: `tok-good`, `tok-bad`, `tok-down`; `tok-slow-*`
/// waits once first.
struct StubVerifier {
    principal: Principal,
}

impl TokenVerifier for StubVerifier {
    fn accepts(&self, credential: &str) -> bool {
        credential.starts_with("tok-")
    }

    async fn verify(&self, token: &str, _now: Timestamp) -> Result<Principal, TokenError> {
        let token = match token.strip_prefix("tok-slow-") {
            Some(rest) => {
                YieldOnce(false).await;
                rest
            }
            None => token.strip_prefix("tok-").unwrap_or(token),
        };
        match token {
            "good" => Ok(self.principal.clone()),
            "down" => Err(TokenError::Unavailable(StoreError::new("down"))),
            _ => Err(TokenError::Invalid("bad_signature")),
        }
    }
}

fn token_layer(f: &Fixture) -> KeyExtractLayer<Store, StubVerifier> {
    let found = f.store.get(&f.live.digest()).cloned().unwrap();
    let principal = Principal::new(
        found.key,
        found.project,
        Credential::Token {
            id: "tok_1".into(),
            expires_at: T0,
        },
    );
    f.layer().with_token_verifier(StubVerifier { principal })
}

#[tokio::test]
async fn an_accepted_token_yields_its_principal() {
    let f = fixture();
    for token in ["tok-good", "tok-slow-good"] {
        let a = send(token_layer(&f), bearer(token)).await;
        assert_eq!(a.status, StatusCode::OK, "{token}");
        assert_eq!(a.body, "key_live");
        assert_eq!(a.headers["x-seen"], "");
    }
}

#[tokio::test]
async fn an_invalid_token_gets_the_same_401_as_a_bad_key() {
    let f = fixture();
    let reference = send(f.layer(), bearer(f.unknown.expose())).await;
    for token in ["tok-bad", "tok-slow-bad"] {
        let a = send(token_layer(&f), bearer(token)).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(detail(&a), Some("bad_signature"));
        assert_eq!(a.body, reference.body);
        assert_eq!(a.headers, reference.headers);
    }
}

#[tokio::test]
async fn an_unavailable_token_verifier_is_503() {
    let f = fixture();
    for token in ["tok-down", "tok-slow-down"] {
        let a = send(token_layer(&f), bearer(token)).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{token}");
    }
}

#[tokio::test]
async fn keys_still_work_next_to_a_token_verifier() {
    let f = fixture();
    let a = send(token_layer(&f), bearer(f.live.expose())).await;
    assert_eq!(a.status, StatusCode::OK);
}

proptest::proptest! {
    /// Whatever a client puts in the credential headers, it gets through only with a live key.
    #[test]
    fn made_up_credentials_never_pass(
        auth in "[ -~]{0,60}",
        key in "(sk-kg-)?[0-9A-Za-z]{0,40}",
    ) {
        use futures_util::FutureExt;
        let f = fixture();
        let svc = f.layer().layer(service_fn(echo));
        let req = get()
            .header("authorization", auth.as_str())
            .header("x-api-key", key.as_str())
            .body(Full::default())
            .unwrap();
        let res = svc.oneshot(req).now_or_never().unwrap().unwrap();
        proptest::prop_assert!(
            matches!(res.status().as_u16(), 400 | 401),
            "status {}", res.status()
        );
    }
}

#[tokio::test]
async fn the_principal_is_recorded_in_an_outer_request_trace() {
    let f = fixture();
    let trace = keygate_core::RequestTrace::new();
    let mut req = bearer(f.live.expose());
    req.extensions_mut().insert(trace.clone());
    let a = send(f.layer(), req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(trace.key().map(|k| k.id.as_str()), Some("key_live"));
}
