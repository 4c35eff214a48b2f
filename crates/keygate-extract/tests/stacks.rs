//! The same layer in front of an axum Router, a plain `service_fn` and a tonic service.

use std::convert::Infallible;
use std::sync::Arc;

use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    KeyFormat, KeyId, KeyRecord, Principal, ProjectRecord, SecretKey, Snapshot, Timestamp,
};
use keygate_extract::KeyExtractLayer;
use tower::{ServiceBuilder, ServiceExt, service_fn};

fn store() -> (Arc<Snapshot>, SecretKey) {
    let secret = KeyFormat::default().generate().unwrap();
    let key = KeyRecord::new(
        KeyId::new("key_stack"),
        "p",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    let store = Arc::new(Snapshot::new([ProjectRecord::new("p")], [key]).unwrap());
    (store, secret)
}

fn bearer(secret: &SecretKey) -> String {
    format!("Bearer {}", secret.expose())
}

#[tokio::test]
async fn works_over_an_axum_router() {
    let (store, secret) = store();
    async fn whoami(Extension(p): Extension<Principal>) -> String {
        p.key_id().to_string()
    }
    let app = Router::new()
        .route("/whoami", get(whoami))
        .layer(KeyExtractLayer::new(store));

    let req = Request::get("/whoami")
        .header("authorization", bearer(&secret))
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "key_stack");

    let req = Request::get("/whoami")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn the_axum_extractor_gives_the_principal_and_refuses_without_the_layer() {
    use keygate_extract::Authenticated;

    let (store, secret) = store();
    async fn whoami(caller: Authenticated) -> String {
        caller.key_id().to_string()
    }
    async fn maybe(caller: Option<Authenticated>) -> &'static str {
        if caller.is_some() {
            "someone"
        } else {
            "nobody"
        }
    }
    let guarded = Router::new()
        .route("/whoami", get(whoami))
        .layer(KeyExtractLayer::new(store));
    let req = Request::get("/whoami")
        .header("x-api-key", secret.expose())
        .body(axum::body::Body::empty())
        .unwrap();
    let res = guarded.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "key_stack"
    );

    // Mounted outside the layer by mistake: refuses rather than serving anonymously.
    let unguarded = Router::new()
        .route("/whoami", get(whoami))
        .route("/maybe", get(maybe));
    let req = Request::get("/whoami")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = unguarded.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "missing_api_key");

    let req = Request::get("/maybe")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = unguarded.oneshot(req).await.unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "nobody"
    );
}

#[tokio::test]
async fn works_over_a_service_fn_with_full_bodies() {
    let (store, secret) = store();
    let svc = ServiceBuilder::new()
        .layer(KeyExtractLayer::new(store))
        .service(service_fn(|req: Request<Full<Bytes>>| async move {
            let p = req.extensions().get::<Principal>().unwrap();
            Ok::<_, Infallible>(Response::new(Full::from(p.key_id().to_string())))
        }));
    let req = Request::post("/v1/embeddings")
        .header("api-key", secret.expose())
        .body(Full::from("{}"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "key_stack"
    );
}

fn health_check(auth: Option<String>) -> Request<tonic::body::Body> {
    // An empty HealthCheckRequest: uncompressed flag, zero length.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    let mut builder = Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    builder
        .body(tonic::body::Body::new(Full::new(frame)))
        .unwrap()
}

#[tokio::test]
async fn works_over_a_tonic_service() {
    let (store, secret) = store();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let svc = ServiceBuilder::new()
        .layer(KeyExtractLayer::new(store))
        .service(health);

    let res = svc
        .clone()
        .oneshot(health_check(Some(bearer(&secret))))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("grpc-status").is_none());
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert!(!collected.to_bytes().is_empty(), "a HealthCheckResponse");

    let res = svc.oneshot(health_check(None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "16");
    assert_eq!(res.headers()["content-type"], "application/grpc");
}
