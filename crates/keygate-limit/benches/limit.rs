//! Criterion benches of the limit layers: each layer alone over a bare handler, the cost of a
//! reserve + settle, and the memory an active key costs at one million keys.
//!
//! `cargo bench -p keygate-limit -- --warm-up-time 1 --measurement-time 2`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroU64};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use keygate_core::{
    Budget, Credential, KeyDigest, KeyId, KeyRecord, Limits, ManualClock, Money, Period, Principal,
    ProjectRecord, Secret, Timestamp,
};
use keygate_limit::backend::{Actual, Charge, Unit, Window};
use keygate_limit::{MemoryBackend, Price, PriceTable, RateLimitLayer, TokenLimitLayer};
use tower::{Layer, Service, ServiceExt};

/// Every future here completes without waiting (in-memory state, ready handler).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("bench future was not ready at once"),
    }
}

fn drain<B: Body>(body: B) {
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(_)) = body.as_mut().poll_frame(&mut cx) {}
}

fn principal(id: &str, f: impl FnOnce(&mut Limits)) -> Principal {
    let mut key = KeyRecord::new(
        KeyId::new(id),
        "proj",
        KeyDigest::of(id),
        Timestamp::UNIX_EPOCH,
    );
    f(&mut key.limits);
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("proj")),
        Credential::ApiKey(Secret::Current),
    )
}

/// A bare handler; like any real upstream it answers with a content type.
async fn bare<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(res)
}

fn request(p: &Principal, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    r.extensions_mut().insert(p.clone());
    r
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("layer");
    let p = principal("key_bench", |l| {
        l.requests_per_minute = NonZeroU32::new(u32::MAX);
    });
    let mut svc = tower::service_fn(bare::<Full<Bytes>>);
    g.bench_function("bare_handler", |b| {
        b.iter_batched(
            || request(&p, b"{}"),
            |req| {
                let res = now(svc.call(req)).unwrap();
                black_box(res);
            },
            BatchSize::SmallInput,
        )
    });

    // A realistic quota (600/min, so header values are the shared small numbers) on a manual
    // clock moved one emission interval per request: always admitted, never idle. The system
    // clock's own cost is `system_clock_now` below.
    let manual = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
    let p600 = principal("key_bench", |l| {
        l.requests_per_minute = NonZeroU32::new(600);
    });
    for (name, headers) in [("rate_layer", true), ("rate_layer_no_headers", false)] {
        let mut rate = RateLimitLayer::new()
            .with_clock(manual.clock())
            .with_headers(headers)
            .layer(tower::service_fn(bare::<Full<Bytes>>));
        g.bench_function(name, |b| {
            b.iter_batched(
                || request(&p600, b"{}"),
                |req| {
                    manual.advance(Duration::from_millis(100));
                    let res = now(rate.call(req)).unwrap();
                    black_box(res);
                },
                BatchSize::SmallInput,
            )
        });
    }
    let mut rate = RateLimitLayer::new().layer(tower::service_fn(bare::<Full<Bytes>>));
    g.bench_function("rate_layer_system_clock_huge_quota", |b| {
        b.iter_batched(
            || request(&p, b"{}"),
            |req| {
                let res = now(rate.call(req)).unwrap();
                black_box(res);
            },
            BatchSize::SmallInput,
        )
    });

    let mut token = TokenLimitLayer::default().layer(tower::service_fn(bare));
    g.bench_function("token_layer_no_token_limits", |b| {
        b.iter_batched(
            || request(&p, b"{}"),
            |req| {
                let res = now(token.call(req)).unwrap();
                drain(res.into_body());
            },
            BatchSize::SmallInput,
        )
    });

    // Token limits apply but there is no body to read (a GET, or a body that is not JSON):
    // reserve the default output ceiling, settle at it when the (non-JSON) response ends.
    let tpm = principal("key_tpm", |l| {
        l.tokens_per_minute = NonZeroU64::new(u64::MAX / 2);
    });
    let mut token = TokenLimitLayer::default().layer(tower::service_fn(bare));
    g.bench_function("token_layer_tpm_no_body", |b| {
        b.iter_batched(
            || {
                let mut r = Request::get("/v1/models")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                r.extensions_mut().insert(tpm.clone());
                r
            },
            |req| {
                let res = now(token.call(req)).unwrap();
                drain(res.into_body());
            },
            BatchSize::SmallInput,
        )
    });

    let prices = PriceTable::new()
        .with_price(
            "gpt-4o-mini",
            Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
        )
        .unwrap();
    let limited = principal("key_limited", |l| {
        l.tokens_per_minute = NonZeroU64::new(u64::MAX / 2);
        l.budgets.push(Budget {
            amount: Money::from_dollars(1_000_000_000),
            period: Period::Month,
            model: None,
        });
    });
    let mut token = TokenLimitLayer::default()
        .with_prices(prices)
        .layer(tower::service_fn(|_r: Request<_>| async {
            let mut res = Response::new(Full::new(Bytes::from_static(
                br#"{"usage":{"prompt_tokens":10,"completion_tokens":20}}"#,
            )));
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(res)
        }));
    let _ = now(token.ready());
    g.bench_function("token_layer_reserve_settle_json", |b| {
        b.iter_batched(
            || {
                request(
                    &limited,
                    br#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[]}"#,
                )
            },
            |req| {
                let res = now(token.call(req)).unwrap();
                drain(res.into_body());
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn backend(c: &mut Criterion) {
    let clock = keygate_core::Clock::system();
    c.bench_function("system_clock_now", |b| b.iter(|| black_box(clock.now())));
    let backend = MemoryBackend::new();
    let key: Arc<str> = "key\u{1f}key_bench\u{1f}tpm".into();
    let budget: Arc<str> = "key\u{1f}key_bench\u{1f}budget\u{1f}month\u{1f}*".into();
    let t = Timestamp::from_unix_secs(1_700_000_000);
    let (start, end) = Period::Month.window(t);
    c.bench_function("memory_backend_reserve_settle_2_counters", |b| {
        b.iter(|| {
            let charges = vec![
                Charge {
                    group: 0,
                    key: key.clone(),
                    window: Window::Rate {
                        per: Duration::from_secs(60),
                    },
                    unit: Unit::Tokens,
                    limit: u64::MAX / 2,
                    amount: 100,
                },
                Charge {
                    group: 0,
                    key: budget.clone(),
                    window: Window::Fixed { start, end },
                    unit: Unit::Nanodollars,
                    limit: u64::MAX / 2,
                    amount: 1000,
                },
            ];
            let r = backend.reserve_now(charges, t).unwrap();
            backend.settle_now(
                r,
                Actual {
                    tokens: 50,
                    cost: Money::from_nanos(500),
                },
                t,
            );
        })
    });
}

/// Where the rate headers' time goes: three inserts (and the drop) into a response map that
/// already holds a content type, with the `x-ratelimit-*` names (hashed byte by byte) and
/// with three standard names (hashed as an enum tag), values shared and static.
fn header_inserts(c: &mut Criterion) {
    use http::header::{self, HeaderMap, HeaderName, HeaderValue};
    static CUSTOM: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ];
    let standard = [header::ETAG, header::EXPIRES, header::AGE];
    let base = || {
        let mut map = HeaderMap::new();
        map.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        map
    };
    let value = HeaderValue::from_static("600");
    let mut g = c.benchmark_group("headers");
    g.bench_function("insert_3_ratelimit_names", |b| {
        b.iter_batched(
            base,
            |mut map| {
                for name in &CUSTOM {
                    map.insert(name.clone(), value.clone());
                }
                map
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("insert_3_standard_names", |b| {
        b.iter_batched(
            base,
            |mut map| {
                for name in &standard {
                    map.insert(name.clone(), value.clone());
                }
                map
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Not a timing: prints the resident memory one active key costs in each limiter, measured
/// as the growth of the process's RSS over one million distinct keys (each principal is
/// dropped after its request, so only the limiter's state remains), and as computed from the
/// tables' capacities. Set `KEYGATE_BENCH_SKIP_MEMORY` to skip it.
fn memory_per_key(_c: &mut Criterion) {
    const KEYS: usize = 1_000_000;
    if std::env::var_os("KEYGATE_BENCH_SKIP_MEMORY").is_some() {
        return;
    }
    let rate = RateLimitLayer::new();
    let mut svc = rate.clone().layer(tower::service_fn(bare::<Full<Bytes>>));
    let Some(before) = rss_bytes() else { return };
    for i in 0..KEYS {
        let p = principal(&format!("key_{i:016}"), |l| {
            l.requests_per_minute = NonZeroU32::new(1);
        });
        let res = now(svc.call(request(&p, b"{}"))).unwrap();
        black_box(res);
    }
    let after = rss_bytes().unwrap_or(before);
    println!(
        "rate limiter: {} active keys, {:.0} bytes per key (RSS growth), {:.1} bytes per key (table size)",
        rate.len(),
        (after.saturating_sub(before)) as f64 / KEYS as f64,
        rate.memory_bytes() as f64 / KEYS as f64
    );

    let token = TokenLimitLayer::default();
    let mut svc = token.clone().layer(tower::service_fn(bare));
    let before = rss_bytes().unwrap_or(0);
    for i in 0..KEYS {
        let p = principal(&format!("key_{i:016}"), |l| {
            // The 4,097-token reservation drains in about 50 s: the counter stays active.
            l.tokens_per_minute = NonZeroU64::new(5_000);
        });
        let res = now(svc.call(request(&p, b"{}"))).unwrap();
        drain(res.into_body());
    }
    let after = rss_bytes().unwrap_or(before);
    println!(
        "token limiter (tokens/min counter): {} counters, {:.0} bytes per key (RSS growth), {:.1} bytes per key (tables + key strings)",
        token.backend().len(),
        (after.saturating_sub(before)) as f64 / KEYS as f64,
        token.backend().memory_bytes() as f64 / KEYS as f64
    );
}

#[allow(missing_docs, unreachable_pub)]
mod group {
    use super::*;
    criterion_group!(benches, memory_per_key, layers, header_inserts, backend);
}
criterion_main!(group::benches);
