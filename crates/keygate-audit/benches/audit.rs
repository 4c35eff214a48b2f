//! Per-request cost of the audit layer over a bare handler: request in, body read to its end,
//! event emitted.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use keygate_audit::{AuditLayer, JsonlSink, NoopSink};
use keygate_core::{
    Credential, EndpointGroup, KeyDigest, KeyFormat, KeyId, KeyRecord, Principal, ProjectRecord,
    RequestTrace, Secret, SecretScanner, Timestamp,
};
use tower::{Layer, Service, service_fn};

fn handler()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    })
}

fn run<S, B>(svc: &mut S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let req = Request::post("/v1/chat/completions?stream=true")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.call(req).now_or_never().unwrap().unwrap();
    let body = response
        .into_body()
        .collect()
        .now_or_never()
        .unwrap()
        .unwrap();
    black_box(body);
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions?stream=true")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Only the way in and the response head: requests are built and responses (whose drop emits
/// the event) are dropped outside the timed section.
fn head_only<S, B>(svc: &mut S, request: Request<Full<Bytes>>) -> Response<B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    svc.call(request).now_or_never().unwrap().unwrap()
}

/// A request shaped as hyper hands it over: the URI shares the connection's read buffer (so
/// cloning it does not allocate) and the header map already holds a few headers.
fn realistic_request() -> Request<Full<Bytes>> {
    let mut line = BytesMut::from(&b"/v1/chat/completions?stream=true"[..]);
    let uri = http::Uri::from_maybe_shared(line.split().freeze()).unwrap();
    Request::post(uri)
        .header("host", "api.example.com")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-kg-not-a-real-key")
        .header("user-agent", "bench/1.0")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A handler whose response has a header map already (as nearly every real one does).
fn json_handler()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<Full<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(response)
    })
}

/// A handler that records a caller into the trace, as the inner keygate layers do, so the
/// metrics see a key, a project and an endpoint group.
fn keyed_handler()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    let key = KeyRecord::new(
        KeyId::new("key_bench"),
        "proj_bench",
        KeyDigest::of("sk-kg-unused"),
        Timestamp::UNIX_EPOCH,
    );
    let principal = Principal::new(
        std::sync::Arc::new(key),
        std::sync::Arc::new(ProjectRecord::new("proj_bench")),
        Credential::ApiKey(Secret::Current),
    );
    let group = EndpointGroup::new("chat.completions");
    service_fn(move |req: Request<Full<Bytes>>| {
        if let Some(trace) = req.extensions().get::<RequestTrace>() {
            trace.set_principal(&principal);
            trace.set_endpoint_group(&group);
            trace.set_model("gpt-4o-mini");
        }
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}")))) }
    })
}

/// The metrics of a keyed request with a recorder installed (the debugging recorder keeps its
/// metrics in the same registry type the Prometheus exporter uses).
fn bench_metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("audit_metrics");
    let mut off = AuditLayer::new(NoopSink)
        .with_metrics(false)
        .layer(keyed_handler());
    group.bench_function("keyed_metrics_off", |b| b.iter(|| run(&mut off)));
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let mut on = AuditLayer::new(NoopSink).layer(keyed_handler());
    let mut per_key = AuditLayer::new(NoopSink)
        .with_key_metrics(true)
        .layer(keyed_handler());
    metrics::with_local_recorder(&recorder, || {
        group.bench_function("keyed_metrics_recorder", |b| b.iter(|| run(&mut on)));
        group.bench_function("keyed_metrics_recorder_per_key_labels", |b| {
            b.iter(|| run(&mut per_key))
        });
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("audit_request_path_realistic");
    let mut bare = json_handler();
    group.bench_function("bare_handler", |b| {
        b.iter_batched(
            realistic_request,
            |r| head_only(&mut bare, r),
            BatchSize::PerIteration,
        )
    });
    let mut noop = AuditLayer::new(NoopSink)
        .with_metrics(false)
        .layer(json_handler());
    group.bench_function("noop_sink", |b| {
        b.iter_batched(
            realistic_request,
            |r| head_only(&mut noop, r),
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("audit_request_path");
    let mut bare = handler();
    group.bench_function("bare_handler", |b| {
        b.iter_batched(
            request,
            |r| head_only(&mut bare, r),
            BatchSize::PerIteration,
        )
    });
    let mut noop = AuditLayer::new(NoopSink)
        .with_metrics(false)
        .layer(handler());
    group.bench_function("noop_sink", |b| {
        b.iter_batched(
            request,
            |r| head_only(&mut noop, r),
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let jsonl = JsonlSink::builder(dir.path().join("audit.jsonl"))
        .with_max_bytes(16 << 20)
        .with_keep(1)
        .open()
        .unwrap();
    let mut file = AuditLayer::new(jsonl.clone())
        .with_metrics(false)
        .layer(handler());
    group.bench_function("jsonl_sink", |b| {
        b.iter_batched(
            request,
            |r| head_only(&mut file, r),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    jsonl.shutdown();

    let mut group = c.benchmark_group("audit");

    let mut bare = handler();
    group.bench_function("bare_handler", |b| b.iter(|| run(&mut bare)));

    let mut noop = AuditLayer::new(NoopSink)
        .with_metrics(false)
        .layer(handler());
    group.bench_function("noop_sink", |b| b.iter(|| run(&mut noop)));

    let mut noop_metrics = AuditLayer::new(NoopSink).layer(handler());
    group.bench_function("noop_sink_metrics_facade", |b| {
        b.iter(|| run(&mut noop_metrics))
    });

    let dir = tempfile::tempdir().unwrap();
    let jsonl = JsonlSink::builder(dir.path().join("audit.jsonl"))
        .with_max_bytes(16 << 20)
        .with_keep(1)
        .open()
        .unwrap();
    let mut file = AuditLayer::new(jsonl.clone())
        .with_metrics(false)
        .layer(handler());
    group.bench_function("jsonl_sink", |b| b.iter(|| run(&mut file)));
    group.finish();
    jsonl.shutdown();
    let stats = jsonl.stats();
    eprintln!(
        "jsonl sink: written {} dropped {} (queue full)",
        stats.written, stats.dropped
    );
}

/// What the secret scanner costs per call: request ids and paths the audit layer sees on every
/// request, and the rare ones that hold a secret.
fn bench_redact(c: &mut Criterion) {
    let mut group = c.benchmark_group("redact");
    let scanner = SecretScanner::new().with_prefix("corp.").unwrap();
    let key = KeyFormat::default().generate().unwrap();
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJrZXlfYWJjIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2lnbmF0dXJlLWJ5dGVzLW9mLWEtand0LXRva2Vu";
    for (name, id) in [
        ("id_uuid", "550e8400-e29b-41d4-a716-446655440000"),
        (
            "id_traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("id_short", "req-123"),
        ("id_keygate_key", key.expose()),
        ("id_jwt", jwt),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(scanner.could_be_secret(black_box(id))))
        });
    }
    let key_path = format!("/v1/files/{}/content", key.expose());
    for (name, path) in [
        ("path_chat", "/v1/chat/completions"),
        ("path_file", "/v1/files/file-AbCdEf1234567890GhIjKl/content"),
        (
            "path_model",
            "/v1/models/ft:gpt-4o-mini:acme:task-xyz:abc123",
        ),
        (
            "path_response",
            "/v1/responses/resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        ),
        ("path_with_key", key_path.as_str()),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(scanner.redact_path(black_box(path))))
        });
    }
    group.finish();

    // The audit layer with a client's request id: the id is scanned before it is taken.
    let mut group = c.benchmark_group("audit_request_path");
    let mut noop = AuditLayer::new(NoopSink)
        .with_metrics(false)
        .layer(handler());
    let with_id = || {
        Request::post("/v1/chat/completions?stream=true")
            .header("x-request-id", "550e8400-e29b-41d4-a716-446655440000")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    group.bench_function("noop_sink_client_request_id", |b| {
        b.iter_batched(
            with_id,
            |r| head_only(&mut noop, r),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench, bench_metrics, bench_redact);
criterion_main!(benches);
