//! The facade's stack: order, configuration, and the config-built stack end to end.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_audit::AuditEvent;
use keygate_core::{
    KeyFile, KeyFormat, KeyId, KeyRecord, ManualClock, MemoryStore, Permissions, ProjectRecord,
    SecretKey, Stage, Timestamp,
};
use tower::{ServiceBuilder, ServiceExt, service_fn};

use crate::{BuildError, Config, Keygate};

fn store(edit: impl FnOnce(&mut KeyRecord)) -> (MemoryStore, SecretKey, KeyRecord) {
    let secret = KeyFormat::default().generate().unwrap();
    let mut key = KeyRecord::new(
        KeyId::new("key_t"),
        "p",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    edit(&mut key);
    let store = MemoryStore::from_records([ProjectRecord::new("p")], [key.clone()]).unwrap();
    (store, secret, key)
}

type Events = Arc<Mutex<Vec<AuditEvent>>>;

fn recorder() -> (Events, impl Fn(&AuditEvent) + Send + Sync + 'static) {
    let events = Events::default();
    let seen = events.clone();
    (events, move |e: &AuditEvent| {
        seen.lock().unwrap().push(e.clone())
    })
}

async fn ok(_req: Request<impl Sized>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = br#"{"object":"list","data":[{"id":"gpt-4o"},{"id":"gpt-4o-mini"}]}"#;
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

fn get(path: &str, secret: Option<&SecretKey>) -> Request<Full<Bytes>> {
    let mut r = Request::get(path);
    if let Some(s) = secret {
        r = r.header("authorization", format!("Bearer {}", s.expose()));
    }
    r.body(Full::default()).unwrap()
}

#[tokio::test]
async fn audit_is_outermost_and_records_inner_denials() {
    let (store, secret, _) = store(|k| k.permissions = Permissions::ReadOnly);
    let (events, sink) = recorder();
    let svc = ServiceBuilder::new()
        .layer(Keygate::builder(store).audit_sink(sink).build().unwrap())
        .service_fn(ok);
    let missing = svc.clone().oneshot(get("/v1/models", None)).await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("x-request-id"));
    missing.into_body().collect().await.unwrap();
    let unknown = svc
        .oneshot(get("/v1/nothing-here", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    unknown.into_body().collect().await.unwrap();
    let events = events.lock().unwrap();
    let stages: Vec<_> = events
        .iter()
        .map(|e| match &e.as_request().unwrap().decision {
            keygate_audit::Decision::Denied { stage, .. } => *stage,
            _ => Stage::Audit,
        })
        .collect();
    assert_eq!(stages, vec![Stage::Extract, Stage::Scope]);
}

#[tokio::test]
async fn rate_limit_sits_inside_scope_and_uses_the_injected_clock() {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
    let (store, secret, _) = store(|k| k.limits.requests_per_minute = std::num::NonZeroU32::new(1));
    let svc = ServiceBuilder::new()
        .layer(
            Keygate::builder(store)
                .clock(clock.clock())
                .build()
                .unwrap(),
        )
        .service_fn(ok);
    // A route the scope layer refuses never reaches the limiter.
    let refused = svc
        .clone()
        .oneshot(get("/nope", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        svc.clone()
            .oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let limited = svc
        .clone()
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(
        svc.oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn model_list_is_filtered_unless_turned_off() {
    let (store, secret, _) = store(|k| {
        k.models =
            keygate_core::ModelRules::allow_only([
                keygate_core::ModelPattern::new("gpt-4o-mini").unwrap()
            ]);
    });
    let filtered = ServiceBuilder::new()
        .layer(Keygate::builder(store.clone()).build().unwrap())
        .service_fn(ok);
    let body = filtered
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);

    let unfiltered = ServiceBuilder::new()
        .layer(
            Keygate::builder(store)
                .model_list_path(None)
                .build()
                .unwrap(),
        )
        .service_fn(ok);
    let response = unfiltered
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "no model is needed to list models"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[test]
fn invalid_settings_fail_at_build() {
    let (store, _, _) = store(|_| {});
    let e = Keygate::builder(store.clone())
        .max_rate_entries(1)
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::RateLimit(_)));
    let e = Keygate::builder(store.clone())
        .credential_sources([])
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::CredentialSources(_)));
    let e = Keygate::builder(store)
        .model_list_path(Some("v1/models"))
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::ModelListPath(_)));
}

#[tokio::test]
async fn a_config_built_stack_serves_keys_from_the_file_and_accepts_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let (_, secret, key) = store(|_| {});
    let mut file = KeyFile::default();
    file.projects.push(ProjectRecord::new("p"));
    file.keys.push(key);
    file.save_atomic(&keys).unwrap();
    let text = format!(
        "keys_file = {keys:?}\n[audit]\ntracing = false\n[audit.jsonl]\npath = {:?}\n",
        dir.path().join("audit.jsonl")
    );
    let built = Config::from_toml_str(&text).unwrap().build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(built.layer().clone())
        .service(service_fn(ok));
    assert_eq!(
        svc.clone()
            .oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // Exchange the key for a token, then call with the token.
    let exchange = ServiceBuilder::new()
        .layer(built.layer().extract_layer().clone())
        .service(built.token_exchange().unwrap().clone());
    let mut ask = Request::post("/v1/tokens")
        .header("authorization", format!("Bearer {}", secret.expose()))
        .body(Full::new(Bytes::from_static(br#"{"ttl_seconds":60}"#)))
        .unwrap();
    ask.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let issued = exchange.oneshot(ask).await.unwrap();
    assert_eq!(issued.status(), StatusCode::OK);
    let body = issued.into_body().collect().await.unwrap().to_bytes();
    let token = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_token = Request::get("/v1/models")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        svc.oneshot(with_token).await.unwrap().status(),
        StatusCode::OK
    );

    built.flush_audit();
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 2);
    assert!(!audit.contains(secret.expose()) && !audit.contains(&token));
}
