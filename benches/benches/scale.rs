//! How keygate's per-request cost grows with the number of distinct keys: key lookup
//! (parse + digest + `MemoryStore` lookup), the rate and token limit layers, and the whole
//! stack, each with 1k, 100k and 1M keys, every request presenting the next key (so large
//! sets miss the CPU caches as real traffic does). Then the whole stack under 2 threads.
//! Ends by printing the 1M / 1k ratios `BENCHMARKS.md` quotes.
//!
//! Under `cargo test --benches` only a small key set is built.
//!
//! `cargo bench -p keygate-benches --bench scale -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU64;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, StatusCode};
use keygate_benches::{
    Keys, PROJECT, call, fmt_ns, full_stack, mean_ns, measuring, models_request, rt_current_thread,
    rt_multi_thread, upstream,
};
use keygate_core::{Credential, KeyDigest, KeyFormat, KeyStore, Principal, ProjectRecord, Secret};
use keygate_limit::{RateLimitLayer, TokenLimitLayer};
use tower::Layer;

/// A small chat body: the token layer reads it to estimate the prompt.
const SMALL_CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}"#;

fn sizes() -> &'static [usize] {
    if measuring() {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[100]
    }
}

/// Key sets are costly to build at 1M (about a second and a few hundred MB): build each once.
fn key_set(n: usize) -> &'static Keys {
    static SETS: OnceLock<Vec<(usize, Keys)>> = OnceLock::new();
    let sets = SETS.get_or_init(|| sizes().iter().map(|&n| (n, Keys::new(n))).collect());
    &sets.iter().find(|(m, _)| *m == n).expect("a built size").1
}

/// Polls a future that never waits (in-memory store) once.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory lookup waited"),
    }
}

fn key_lookup(c: &mut Criterion) {
    let format = KeyFormat::default();
    let mut g = c.benchmark_group("kg_key_lookup");
    g.warm_up_time(Duration::from_secs(1));
    for &n in sizes() {
        let keys = key_set(n);
        g.bench_with_input(
            BenchmarkId::new("parse_digest_lookup", n),
            keys,
            |b, keys| {
                // The secrets side by side in one buffer: a request's key arrives in a
                // buffer the CPU has just read, so reading it must not cost a cache miss
                // that a real request never pays (1M separately allocated Strings would).
                let len = keys.secrets[0].len();
                let flat = keys.secrets.concat();
                let mut i = 0;
                b.iter(|| {
                    let at = (i % n) * len;
                    let secret = &flat[at..at + len];
                    i += 1;
                    let digest = format.parse(black_box(secret)).expect("a valid key");
                    let found = now(keys.store.lookup(&digest)).expect("store answers");
                    black_box(found.expect("a known key").secret)
                })
            },
        );
        // The same without parsing and hashing: what the map itself costs at this size.
        let digests: Vec<KeyDigest> = keys.secrets.iter().map(|s| KeyDigest::of(s)).collect();
        g.bench_with_input(
            BenchmarkId::new("lookup_only", n),
            &digests,
            |b, digests| {
                let mut i = 0;
                b.iter(|| {
                    let digest = &digests[i % n];
                    i += 1;
                    let found = now(keys.store.lookup(black_box(digest))).expect("store answers");
                    black_box(found.expect("a known key").secret)
                })
            },
        );
    }
    g.finish();
}

fn request_as(p: &Principal, body: Body) -> Request<Body> {
    let mut req = Request::post("/v1/chat/completions")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid request");
    req.extensions_mut().insert(p.clone());
    req
}

fn limit_layers(c: &mut Criterion) {
    let rt = rt_current_thread();
    let mut g = c.benchmark_group("kg_rate_limit_keys");
    g.warm_up_time(Duration::from_secs(1));
    for &n in sizes() {
        let keys = key_set(n);
        let mut service = RateLimitLayer::new().layer(upstream());
        // Every key is known to the limiter before measuring (its first request made the
        // entry); what is timed is the steady state.
        rt.block_on(async {
            for p in &keys.principals {
                let req = models_request_as(p);
                assert_eq!(call(&mut service, req).await, StatusCode::OK);
            }
        });
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = service.clone();
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        let p = &keys.principals[i as usize % n];
                        black_box(call(&mut svc, models_request_as(p)).await);
                    }
                    start.elapsed()
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("kg_token_limit_keys");
    g.warm_up_time(Duration::from_secs(1));
    let body = Bytes::from_static(SMALL_CHAT);
    for &n in sizes() {
        let keys = key_set(n);
        // The same keys with a token rate: the layer reads the body, reserves and settles.
        let project = Arc::new(ProjectRecord::new(PROJECT));
        let limited: Vec<Principal> = keys
            .principals
            .iter()
            .map(|p| {
                let mut record = p.key().clone();
                record.limits.tokens_per_minute = NonZeroU64::new(u64::MAX / 4);
                Principal::new(
                    Arc::new(record),
                    project.clone(),
                    Credential::ApiKey(Secret::Current),
                )
            })
            .collect();
        let mut service = TokenLimitLayer::default().layer(upstream());
        rt.block_on(async {
            for p in &limited {
                let req = request_as(p, Body::from(body.clone()));
                assert_eq!(call(&mut service, req).await, StatusCode::OK);
            }
        });
        let limited = &limited;
        let body = &body;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = service.clone();
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        let p = &limited[i as usize % n];
                        let req = request_as(p, Body::from(body.clone()));
                        black_box(call(&mut svc, req).await);
                    }
                    start.elapsed()
                }
            })
        });
    }
    g.finish();
}

fn models_request_as(p: &Principal) -> Request<Body> {
    let mut req = models_request();
    req.extensions_mut().insert(p.clone());
    req
}

fn stack(c: &mut Criterion) {
    let rt = rt_current_thread();
    let mut g = c.benchmark_group("kg_full_stack_keys");
    g.warm_up_time(Duration::from_secs(1));
    for &n in sizes() {
        let keys = key_set(n);
        let mut service = full_stack(keys.store.clone(), RateLimitLayer::new(), upstream());
        rt.block_on(async {
            for i in 0..n {
                assert_eq!(
                    call(&mut service, keys.models_request(i)).await,
                    StatusCode::OK
                );
            }
        });
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = service.clone();
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(call(&mut svc, keys.models_request(i as usize)).await);
                    }
                    start.elapsed()
                }
            })
        });
    }
    g.finish();

    // Two tasks on a 2-worker runtime, each sending half the requests with its own keys:
    // the time per request is wall time / requests (so 2× throughput shows as half the time
    // of one thread).
    let rt2 = rt_multi_thread(2);
    let mut g = c.benchmark_group("kg_full_stack_2_threads");
    g.warm_up_time(Duration::from_secs(1));
    for &n in sizes() {
        let keys = key_set(n);
        let service = full_stack(keys.store.clone(), RateLimitLayer::new(), upstream());
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                rt2.block_on(async {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..2u64)
                        .map(|t| {
                            let mut svc = service.clone();
                            let per_task = iters / 2 + (iters % 2) * (1 - t);
                            tokio::spawn(async move {
                                let keys = key_set(n);
                                for i in 0..per_task {
                                    // Task 0 takes even keys, task 1 odd ones.
                                    let k = (2 * i + t) as usize;
                                    black_box(call(&mut svc, keys.models_request(k)).await);
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("bench task");
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// Prints the 1M / 1k ratios (from criterion's saved estimates; nothing when run as a test).
fn report(_c: &mut Criterion) {
    if !measuring() {
        return;
    }
    let rows = [
        (
            "key lookup (parse + digest + lookup)",
            "kg_key_lookup",
            "parse_digest_lookup/",
        ),
        (
            "map lookup only (pre-digested)",
            "kg_key_lookup",
            "lookup_only/",
        ),
        ("rate limit layer", "kg_rate_limit_keys", ""),
        ("token limit layer (token rate)", "kg_token_limit_keys", ""),
        ("full stack, 1 thread", "kg_full_stack_keys", ""),
        (
            "full stack, 2 threads (wall / request)",
            "kg_full_stack_2_threads",
            "",
        ),
    ];
    let mut printed = false;
    for (label, group, prefix) in rows {
        let at = |n: usize| mean_ns(group, &format!("{prefix}{n}"));
        let (Some(k1), Some(k100), Some(m1)) = (at(1_000), at(100_000), at(1_000_000)) else {
            continue;
        };
        if !printed {
            println!("\n## keygate scale summary (mean per request)\n");
            println!("| what | 1k keys | 100k keys | 1M keys | 1M / 1k |");
            println!("| --- | --- | --- | --- | --- |");
            printed = true;
        }
        println!(
            "| {label} | {} | {} | {} | **{:.2}** |",
            fmt_ns(k1),
            fmt_ns(k100),
            fmt_ns(m1),
            m1 / k1
        );
    }
    if !printed {
        println!("\n(no saved estimates: run with `cargo bench` for the summary)");
    }
}

criterion_group!(benches, key_lookup, limit_layers, stack, report);
criterion_main!(benches);
