//! Each example program driven over real loopback sockets: the axum app and the hyper service
//! with a hyper client, the tonic health server with tonic-health's generated client.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum_app.rs"]
mod axum_app;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/hyper_service.rs"]
mod hyper_service;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic_health.rs"]
mod tonic_example;

use std::net::SocketAddr;
use std::num::NonZeroU32;

use common::call;
use keygate::{
    Access, KeyFormat, KeyId, KeyRecord, MemoryStore, Permissions, ProjectRecord, SecretKey,
    Timestamp,
};
use tokio::net::TcpListener;

/// A store with keys named by `edits`; returns the secrets in the same order.
fn store(edits: &[fn(&mut KeyRecord)]) -> (MemoryStore, Vec<SecretKey>) {
    let mut keys = Vec::new();
    let mut secrets = Vec::new();
    for (i, edit) in edits.iter().enumerate() {
        let secret = KeyFormat::default().generate().unwrap();
        let mut key = KeyRecord::new(
            KeyId::new(format!("key_{i}")),
            "p",
            secret.digest(),
            Timestamp::UNIX_EPOCH,
        );
        key.permissions = Permissions::All;
        edit(&mut key);
        keys.push(key);
        secrets.push(secret);
    }
    (
        MemoryStore::from_records([ProjectRecord::new("p")], keys).unwrap(),
        secrets,
    )
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

#[tokio::test]
async fn axum_app_answers_allowed_and_refused_requests() {
    let (store, keys) = store(&[|_| {}, |k| k.permissions = Permissions::ReadOnly]);
    let (l, addr) = listener().await;
    tokio::spawn(async move { axum::serve(l, axum_app::app(store)).await.unwrap() });
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let ok = call(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(keys[0].expose()),
        Some(body),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("key_0")
    );
    assert!(ok.header("x-request-id").is_some());
    let anon = call(addr, "POST", "/v1/chat/completions", None, Some(body)).await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.header("www-authenticate"), Some("Bearer"));
    let ro = call(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(keys[1].expose()),
        Some(body),
    )
    .await;
    assert_eq!(ro.status, 403);
    assert_eq!(ro.code(), "insufficient_permissions");
}

#[tokio::test]
async fn hyper_service_answers_allowed_and_refused_requests() {
    let (store, keys) = store(&[
        |k| k.limits.requests_per_minute = NonZeroU32::new(1),
        |k| k.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()],
    ]);
    let (l, addr) = listener().await;
    tokio::spawn(hyper_service::serve(l, store));
    let ok = call(addr, "GET", "/v1/models", Some(keys[0].expose()), None).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["caller"], "key_0");
    assert_eq!(ok.header("x-ratelimit-limit-requests"), Some("1"));
    let limited = call(addr, "GET", "/v1/models", Some(keys[0].expose()), None).await;
    assert_eq!(limited.status, 429);
    assert!(limited.header("retry-after").is_some());
    // The peer address reaches the scope layer: loopback is not in 10.0.0.0/8.
    let vpn = call(addr, "GET", "/v1/models", Some(keys[1].expose()), None).await;
    assert_eq!(vpn.status, 403);
    assert_eq!(vpn.code(), "ip_not_allowed");
    let model = r#"{"model":"gpt-4o","messages":[]}"#;
    let ok = call(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(keys[1].expose()),
        Some(model),
    )
    .await;
    assert_eq!(ok.status, 403);
}

mod grpc {
    use super::*;
    use tonic::Code;
    use tonic::metadata::MetadataValue;
    use tonic::transport::Channel;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    async fn check(addr: SocketAddr, key: Option<&str>) -> Result<(), tonic::Status> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        if let Some(key) = key {
            let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        client.check(request).await.map(|_| ())
    }

    #[tokio::test]
    async fn tonic_clients_see_grpc_statuses() {
        let (store, keys) = store(&[
            |k| {
                k.permissions =
                    Permissions::Restricted([("health".to_owned(), Access::Read)].into());
                k.limits.requests_per_minute = NonZeroU32::new(1);
            },
            |k| {
                k.permissions =
                    Permissions::Restricted([("other".to_owned(), Access::Write)].into())
            },
        ]);
        let (l, addr) = listener().await;
        tokio::spawn(tonic_example::serve(l, store));

        check(addr, Some(keys[0].expose())).await.unwrap();
        let limited = check(addr, Some(keys[0].expose())).await.unwrap_err();
        assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
        let anon = check(addr, None).await.unwrap_err();
        assert_eq!(anon.code(), Code::Unauthenticated, "{anon:?}");
        let bad = check(addr, Some("sk-kg-not-a-key")).await.unwrap_err();
        assert_eq!(bad.code(), Code::Unauthenticated);
        let denied = check(addr, Some(keys[1].expose())).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    }
}
