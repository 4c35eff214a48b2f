//! End to end through `KeyExtractLayer`: exchange an API key for a token, then call a handler
//! with the token and see exactly the narrowed rights.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    Access, KeyFormat, KeyId, KeyRecord, ManualClock, ModelPattern, ModelRules, Permissions,
    Principal, ProjectRecord, Snapshot, Timestamp,
};
use keygate_extract::KeyExtractLayer;
use keygate_jwt::{JwtVerifier, KeySet, SigningKey, TokenExchange, TokenResponse};
use keygate_store::MemoryStore;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const ISS: &str = "https://gw.test";
const AUD: &str = "keygate";
const SECRET: &[u8; 32] = b"an e2e test secret, 32 bytes ok!";

fn key_record(digest: keygate_core::KeyDigest) -> KeyRecord {
    let mut key = KeyRecord::new(KeyId::new("key_e2e"), "p", digest, Timestamp::UNIX_EPOCH);
    key.permissions = Permissions::Restricted(BTreeMap::from([
        ("chat.completions".to_owned(), Access::Write),
        ("files".to_owned(), Access::Write),
    ]));
    key.models = ModelRules::allow_only([ModelPattern::new("gpt-4o*").unwrap()]);
    key
}

/// What the handler saw: access to two groups and two models.
async fn whoami(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let p = req
        .extensions()
        .get::<Principal>()
        .expect("put by the layer");
    let text = format!(
        "{} chat={} files={} gpt-4o={} gpt-4o-mini={}",
        p.key_id(),
        p.access("chat.completions"),
        p.access("files"),
        p.allows_model("gpt-4o"),
        p.allows_model("gpt-4o-mini"),
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}

fn bearer(path: &str, credential: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn text<B: http_body::Body>(response: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn exchanged_token_reaches_the_handler_with_narrowed_rights() {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_795_435_200));
    let secret = KeyFormat::default().generate().unwrap();
    let store = Arc::new(
        MemoryStore::from_records([ProjectRecord::new("p")], [key_record(secret.digest())])
            .unwrap(),
    );
    let verifier = JwtVerifier::new(
        store.clone(),
        ISS,
        AUD,
        KeySet::new().with_hs256("k1", SECRET).unwrap(),
    )
    .unwrap();
    let extract = KeyExtractLayer::new(store.clone())
        .with_token_verifier(verifier)
        .with_clock(clock.clock());

    let exchange = ServiceBuilder::new().layer(extract.clone()).service(
        TokenExchange::new(ISS, AUD, SigningKey::hs256("k1", SECRET).unwrap())
            .unwrap()
            .with_clock(clock.clock()),
    );
    let app = ServiceBuilder::new()
        .layer(extract)
        .service(service_fn(whoami));

    // The key itself: its full rights.
    let response = app
        .clone()
        .oneshot(bearer("/whoami", secret.expose(), ""))
        .await
        .unwrap();
    assert_eq!(
        text(response).await,
        "key_e2e chat=write files=write gpt-4o=true gpt-4o-mini=true"
    );

    // Exchange it for a read-only-chat token on one model.
    let response = exchange
        .clone()
        .oneshot(bearer(
            "/v1/tokens",
            secret.expose(),
            r#"{"ttl_seconds": 300, "permissions": {"restricted": {"chat.completions": "read"}},
               "models": {"allow": ["gpt-4o-mini"]}}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let issued: TokenResponse = serde_json::from_str(&text(response).await).unwrap();

    let response = app
        .clone()
        .oneshot(bearer("/whoami", &issued.token, ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        text(response).await,
        "key_e2e chat=read files=none gpt-4o=false gpt-4o-mini=true"
    );

    // A token cannot mint tokens.
    let response = exchange
        .clone()
        .oneshot(bearer("/v1/tokens", &issued.token, "{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Asking for more than the key is refused.
    let response = exchange
        .clone()
        .oneshot(bearer(
            "/v1/tokens",
            secret.expose(),
            r#"{"permissions": "all"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Expiry, with the injected clock.
    clock.advance(Duration::from_secs(300 + 30));
    let response = app
        .clone()
        .oneshot(bearer("/whoami", &issued.token, ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn revoking_the_key_refuses_its_token_with_the_bad_key_401() {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_795_435_200));
    let secret = KeyFormat::default().generate().unwrap();
    let store = Arc::new(
        MemoryStore::from_records([ProjectRecord::new("p")], [key_record(secret.digest())])
            .unwrap(),
    );
    let keys = KeySet::new().with_hs256("k1", SECRET).unwrap();
    let extract = KeyExtractLayer::new(store.clone())
        .with_token_verifier(JwtVerifier::new(store.clone(), ISS, AUD, keys).unwrap())
        .with_clock(clock.clock());
    let exchange = ServiceBuilder::new().layer(extract.clone()).service(
        TokenExchange::new(ISS, AUD, SigningKey::hs256("k1", SECRET).unwrap())
            .unwrap()
            .with_clock(clock.clock()),
    );
    let app = ServiceBuilder::new()
        .layer(extract)
        .service(service_fn(whoami));
    let response = exchange
        .oneshot(bearer("/v1/tokens", secret.expose(), ""))
        .await
        .unwrap();
    let issued: TokenResponse = serde_json::from_str(&text(response).await).unwrap();
    let ok = app
        .clone()
        .oneshot(bearer("/whoami", &issued.token, ""))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    let bad_key = app
        .clone()
        .oneshot(bearer("/whoami", "sk-kg-not-a-real-key", ""))
        .await
        .unwrap();
    let bad_key_status = bad_key.status();
    let bad_key_body = text(bad_key).await;

    let mut revoked = key_record(secret.digest());
    revoked.revoked_at = Some(clock.now());
    store.replace(Snapshot::new([ProjectRecord::new("p")], [revoked]).unwrap());
    let refused = app
        .clone()
        .oneshot(bearer("/whoami", &issued.token, ""))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(refused.status(), bad_key_status);
    assert_eq!(text(refused).await, bad_key_body, "same 401 as a bad key");
}

#[tokio::test]
async fn exchange_mounts_on_an_axum_router() {
    let secret = KeyFormat::default().generate().unwrap();
    let store = Arc::new(
        MemoryStore::from_records([ProjectRecord::new("p")], [key_record(secret.digest())])
            .unwrap(),
    );
    let exchange = TokenExchange::new(ISS, AUD, SigningKey::hs256("k1", SECRET).unwrap()).unwrap();
    let app: axum::Router = axum::Router::new()
        .route_service("/v1/tokens", exchange)
        .layer(KeyExtractLayer::new(store));
    let request = Request::post("/v1/tokens")
        .header("authorization", format!("Bearer {}", secret.expose()))
        .body(axum::body::Body::from(r#"{"ttl_seconds": 60}"#))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let issued: TokenResponse = serde_json::from_str(&text(response).await).unwrap();
    assert_eq!(issued.expires_in, 60);
}
