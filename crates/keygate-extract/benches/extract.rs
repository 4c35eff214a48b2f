//! What the extraction layer costs per request, and what a key lookup costs as the store grows.
//!
//! `cargo bench -p keygate-extract -- --warm-up-time 1 --measurement-time 2`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::Request;
use keygate_core::{
    KeyDigest, KeyFormat, KeyId, KeyRecord, KeyStore, ProjectRecord, SecretKey, Snapshot, Timestamp,
};
use keygate_extract::KeyExtractLayer;
use tower::{Layer, Service};

fn store_with(n: usize) -> (Arc<Snapshot>, SecretKey) {
    let format = KeyFormat::default();
    let secret = format.generate().unwrap();
    let real = KeyRecord::new(
        KeyId::new("key_real"),
        "p",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    let fillers = (1..n).map(|i| {
        KeyRecord::new(
            KeyId::new(format!("key_{i}")),
            "p",
            KeyDigest::of(&format!("filler-{i}")),
            Timestamp::UNIX_EPOCH,
        )
    });
    let store = Snapshot::new(
        [ProjectRecord::new("p")],
        std::iter::once(real).chain(fillers),
    )
    .map(Arc::new)
    .unwrap();
    (store, secret)
}

/// Calls a service that is always ready and answers on the first poll (an axum handler, an
/// in-memory store): no runtime in the measurement.
fn call_now<S: Service<Request<Body>>>(svc: &mut S, req: Request<Body>) -> S::Response
where
    S::Error: std::fmt::Debug,
{
    futures_util::future::poll_fn(|cx| svc.poll_ready(cx))
        .now_or_never()
        .expect("ready")
        .unwrap();
    svc.call(req)
        .now_or_never()
        .expect("answered at once")
        .unwrap()
}

fn request(auth: Option<&str>) -> Request<Body> {
    let mut b = Request::get("/v1/models");
    if let Some(auth) = auth {
        b = b.header("authorization", auth);
    }
    b.body(Body::empty()).unwrap()
}

fn layer_over_axum(c: &mut Criterion) {
    async fn handler() -> &'static str {
        "ok"
    }
    let (store, secret) = store_with(1_000);
    let router = Router::new().route("/v1/models", get(handler));
    let guarded = KeyExtractLayer::new(store).layer(router.clone());
    let good = format!("Bearer {}", secret.expose());
    let unknown = format!(
        "Bearer {}",
        KeyFormat::default().generate().unwrap().expose()
    );

    let mut group = c.benchmark_group("axum_handler");
    group.bench_function("bare", |b| {
        let mut svc = router.clone();
        b.iter_batched(
            || request(Some(&good)),
            |req| black_box(call_now(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("with_key_extract", |b| {
        let mut svc = guarded.clone();
        b.iter_batched(
            || request(Some(&good)),
            |req| black_box(call_now(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("denied_unknown_key", |b| {
        let mut svc = guarded.clone();
        b.iter_batched(
            || request(Some(&unknown)),
            |req| black_box(call_now(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("denied_missing_key", |b| {
        let mut svc = guarded.clone();
        b.iter_batched(
            || request(None),
            |req| black_box(call_now(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn key_lookup(c: &mut Criterion) {
    let format = KeyFormat::default();
    let mut group = c.benchmark_group("key_lookup");
    for n in [1_000usize, 100_000, 1_000_000] {
        let (store, secret) = store_with(n);
        let presented = secret.expose().to_owned();
        group.bench_with_input(
            BenchmarkId::new("parse_digest_lookup", n),
            &presented,
            |b, key| {
                b.iter(|| {
                    let digest = format.parse(black_box(key)).unwrap();
                    let found = store.lookup(&digest).now_or_never().unwrap().unwrap();
                    black_box(found.is_some())
                })
            },
        );
    }
    let presented = KeyFormat::default().generate().unwrap();
    group.bench_function("parse_digest_only", |b| {
        b.iter(|| black_box(format.parse(black_box(presented.expose())).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, layer_over_axum, key_lookup);
criterion_main!(benches);
