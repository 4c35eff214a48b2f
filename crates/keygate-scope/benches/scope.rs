//! Scope check costs: route + permission without a model, and the whole service call with a model check (the scanner itself is benched in keygate-core's `facts` bench).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Method, Request, Response};
use http_body_util::Full;
use keygate_core::{
    Access, Credential, KeyDigest, KeyId, KeyRecord, ModelPattern, ModelRules, Permissions,
    Principal, ProjectRecord, Secret, Timestamp,
};
use keygate_scope::{RouteTable, ScopeLayer, check_path};
use std::hint::black_box;
use tower::{Layer, Service, service_fn};

fn principal() -> Principal {
    let mut key = KeyRecord::new(
        KeyId::new("key_b"),
        "p",
        KeyDigest::of("b"),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::Restricted(
        [
            ("chat.completions".to_owned(), Access::Write),
            ("models".to_owned(), Access::Read),
            ("files".to_owned(), Access::Read),
        ]
        .into(),
    );
    key.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]);
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("p")),
        Credential::ApiKey(Secret::Current),
    )
}

/// A chat body of about `size` bytes, the model last (the scanner must walk all of it).
/// Messages of ~500 bytes of prose with escaped newlines and one escaped quote pair each.
fn chat_body(size: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    let chunk = format!(
        "Tell me about the \\\"tower\\\" crate. {}",
        "Explain how middleware layers compose in Rust, with examples.\\n".repeat(7)
    );
    let mut len = 0;
    while len + chunk.len() + 64 < size {
        let role = if messages.len() % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        let m = format!(r#"{{"role":"{role}","content":"{chunk}"}}"#);
        len += m.len() + 1;
        messages.push(m);
    }
    format!(
        r#"{{"messages":[{}],"temperature":0.7,"stream":true,"model":"gpt-4o-mini"}}"#,
        messages.join(",")
    )
    .into_bytes()
}

fn route_and_permission(c: &mut Criterion) {
    let table = RouteTable::openai();
    let p = principal();
    let mut g = c.benchmark_group("route_permission");
    for (method, path) in [
        (Method::GET, "/v1/models"),
        (Method::POST, "/v1/chat/completions"),
        (Method::GET, "/v1/files/file-abc123/content"),
        (
            Method::POST,
            "/v1/threads/thread_abc/runs/run_abc/submit_tool_outputs",
        ),
    ] {
        g.bench_function(BenchmarkId::new("check", path), |b| {
            b.iter(|| {
                let path = black_box(path);
                let ok = check_path(path).is_ok()
                    && table
                        .lookup(black_box(&method), path)
                        .is_some_and(|(_, group, need)| p.access(group.as_str()).grants(need));
                black_box(ok)
            })
        });
    }
    let long = "/v1/threads/thread_abc/runs/run_abc/submit_tool_outputs";
    g.bench_function("path_only/threads", |b| {
        b.iter(|| black_box(check_path(black_box(long)).is_ok()))
    });
    g.bench_function("lookup_only/models", |b| {
        b.iter(|| {
            black_box(
                table
                    .lookup(&Method::GET, black_box("/v1/models"))
                    .is_some(),
            )
        })
    });
    g.bench_function("lookup_only/threads", |b| {
        b.iter(|| black_box(table.lookup(&Method::POST, black_box(long)).is_some()))
    });
    g.finish();

    // The whole service call on a model-less route (request building excluded).
    let mut svc = ScopeLayer::openai().layer(service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    }));
    let mut probe = Request::get("/v1/models")
        .body(Full::<Bytes>::default())
        .unwrap();
    probe.extensions_mut().insert(p.clone());
    let res = futures_ready(svc.call(probe)).unwrap();
    let denial = res.extensions().get::<keygate_core::Denial>().cloned();
    assert_eq!(
        res.status(),
        http::StatusCode::OK,
        "the bench request must be allowed: {denial:?}"
    );
    c.bench_function("service_call/GET /v1/models", |b| {
        b.iter_batched(
            || {
                let mut r = Request::get("/v1/models")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                r.extensions_mut().insert(p.clone());
                r
            },
            |r| {
                let fut = svc.call(r);
                black_box(futures_ready(fut))
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn futures_ready<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("the bench inner service is always ready"),
    }
}

/// The whole service call with the model check: `POST /v1/chat/completions` with a JSON body
/// (content type and length checks, collecting the body under the limit, the scan, the model
/// rules, rebuilding the body for the inner service). Request building is excluded.
fn service_with_model(c: &mut Criterion) {
    let p = principal();
    let mut svc = ScopeLayer::openai().layer(service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    }));
    let request = |body: &Bytes| {
        let mut r = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(Full::new(body.clone()))
            .unwrap();
        r.extensions_mut().insert(p.clone());
        r
    };
    let mut g = c.benchmark_group("service_call_json");
    for size in [1024, 4 * 1024, 16 * 1024, 1024 * 1024] {
        let body = Bytes::from(chat_body(size));
        let res = futures_ready(svc.call(request(&body))).unwrap();
        assert_eq!(
            res.status(),
            http::StatusCode::OK,
            "the bench request must be allowed"
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter_batched(
                || request(body),
                |r| black_box(futures_ready(svc.call(r))),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The whole service call on a gzip body (decoded only to be inspected, the compressed bytes
/// handed on); throughput in decoded bytes.
#[cfg(feature = "decompression")]
fn service_with_gzip_model(c: &mut Criterion) {
    use std::io::Write;

    use keygate_scope::Decompression;

    let p = principal();
    let mut svc = ScopeLayer::openai()
        .with_decompression(Decompression::new())
        .layer(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }));
    let request = |body: &Bytes| {
        let mut r = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .header("content-length", body.len())
            .body(Full::new(body.clone()))
            .unwrap();
        r.extensions_mut().insert(p.clone());
        r
    };
    let mut g = c.benchmark_group("service_call_gzip_json");
    for size in [4 * 1024, 16 * 1024, 1024 * 1024] {
        let plain = chat_body(size);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&plain).unwrap();
        let body = Bytes::from(e.finish().unwrap());
        let res = futures_ready(svc.call(request(&body))).unwrap();
        assert_eq!(
            res.status(),
            http::StatusCode::OK,
            "the bench request must be allowed"
        );
        g.throughput(Throughput::Bytes(plain.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter_batched(
                || request(body),
                |r| black_box(futures_ready(svc.call(r))),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

#[cfg(not(feature = "decompression"))]
fn service_with_gzip_model(_: &mut Criterion) {}

criterion_group!(
    benches,
    route_and_permission,
    service_with_model,
    service_with_gzip_model
);
criterion_main!(benches);
