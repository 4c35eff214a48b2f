//! Per-request overhead of keygate over a bare axum handler, in one run: the bare handler,
//! each keygate layer alone, the whole stack without and with the model check on JSON bodies,
//! JWT verification through the extract layer, and the pair of peer middleware a team would
//! stack instead (tower-http's bearer check + tower_governor keyed by the `Authorization`
//! header). Ends by printing the ratios `BENCHMARKS.md` quotes.
//!
//! Every service is built once; each iteration is `ready().await` + `call(req).await` and a
//! drained response body, on a current-thread tokio runtime.
//!
//! `cargo bench -p keygate-benches --bench overhead -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::fmt::Debug;
use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as HttpBody;
use keygate_audit::{AuditLayer, NoopSink};
use keygate_benches::{
    Keys, call, chat_body, chat_request, fmt_ns, full_stack, mean_ns, measuring, models_request,
    rt_current_thread, upstream,
};
use keygate_core::TokenVerifier;
use keygate_extract::KeyExtractLayer;
use keygate_jwt::{JwtVerifier, KeySet, SigningKey, TokenExchange, TokenRequest};
use keygate_limit::{RateLimitLayer, TokenLimitLayer};
use keygate_scope::ScopeLayer;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceBuilder};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;

const GROUP: &str = "kg_overhead";
const BODY_GROUP: &str = "kg_model_check";
/// Body sizes of the model check: 1 KiB, 4 KiB (the target size), 16 KiB, 1 MiB.
const SIZES: [usize; 4] = [1024, 4 * 1024, 16 * 1024, 1024 * 1024];
/// Keys in the store behind the extract layer (one of them is presented).
const STORE_KEYS: usize = 1_000;

const JWT_ISSUER: &str = "https://gateway.bench";
const JWT_AUDIENCE: &str = "keygate";
const HS256_SECRET: &[u8; 32] = b"bench-hs256-secret-of-32-bytes!!";
const ED25519_PEM: &[u8] = include_bytes!("../../crates/keygate-jwt/testdata/ed25519.pem");
const ED25519_PUB_PEM: &[u8] = include_bytes!("../../crates/keygate-jwt/testdata/ed25519.pub.pem");

/// tower_governor keyed by the `Authorization` header: one bucket per bearer token, the
/// closest a governor setup gets to a per-key limit (its default extractor needs the peer
/// address from `ConnectInfo`, absent when calling a service directly).
#[derive(Clone, Debug)]
struct AuthorizationKey;

impl KeyExtractor for AuthorizationKey {
    type Key = HeaderValue;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, tower_governor::GovernorError> {
        req.headers()
            .get(header::AUTHORIZATION)
            .cloned()
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// Benches `service` under `id`: checks once that `make` gets a 200, then times
/// `ready` + `call` + drained body per iteration, the service built once per sample.
fn bench_service<S, B, F>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    size: Option<usize>,
    service: S,
    make: F,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: Debug,
    B: HttpBody,
    B::Error: Debug,
    F: Fn(u64) -> Request<Body>,
{
    let mut check = service.clone();
    let status = rt.block_on(call(&mut check, make(0)));
    assert_eq!(
        status,
        StatusCode::OK,
        "{name} {size:?} must answer 200 to be measured"
    );
    let id = match size {
        Some(size) => BenchmarkId::new(name, size),
        None => BenchmarkId::from_parameter(name),
    };
    let make = &make;
    let service = &service;
    g.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = service.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    black_box(call(&mut svc, make(i)).await);
                }
                start.elapsed()
            }
        })
    });
}

fn with_principal(keys: &Keys, mut req: Request<Body>) -> Request<Body> {
    req.extensions_mut().insert(keys.principals[0].clone());
    req
}

fn with_key(keys: &Keys, mut req: Request<Body>) -> Request<Body> {
    req.headers_mut()
        .insert(header::AUTHORIZATION, keys.bearer[0].clone());
    req
}

fn with_token(token: &HeaderValue, mut req: Request<Body>) -> Request<Body> {
    req.headers_mut()
        .insert(header::AUTHORIZATION, token.clone());
    req
}

fn issue(keys: &Keys, key: SigningKey) -> HeaderValue {
    let exchange = TokenExchange::new(JWT_ISSUER, JWT_AUDIENCE, key).expect("exchange");
    let token = exchange
        .issue(&keys.principals[0], &TokenRequest::default())
        .expect("a token")
        .token;
    HeaderValue::try_from(format!("Bearer {token}")).expect("a header value")
}

fn overhead(c: &mut Criterion) {
    let rt = rt_current_thread();
    let keys = Keys::new(STORE_KEYS);
    let key = keys.secrets[0].clone();

    let mut g = c.benchmark_group(GROUP);
    g.warm_up_time(Duration::from_secs(1));

    // The baselines: the same request with a key header (what the extract layer and peers
    // see), and with a principal in its extensions (what layers benched without the extract
    // layer in front need; inserting it costs an allocation, so it has its own baseline).
    bench_service(&mut g, &rt, "bare", None, upstream(), |_| {
        with_key(&keys, models_request())
    });
    bench_service(&mut g, &rt, "bare_with_principal", None, upstream(), |_| {
        with_principal(&keys, models_request())
    });

    // Each layer alone.
    bench_service(
        &mut g,
        &rt,
        "audit_noop_sink",
        None,
        AuditLayer::new(NoopSink).layer(upstream()),
        |_| with_key(&keys, models_request()),
    );
    bench_service(
        &mut g,
        &rt,
        "extract_memory_store",
        None,
        KeyExtractLayer::new(keys.store.clone()).layer(upstream()),
        |_| with_key(&keys, models_request()),
    );
    bench_service(
        &mut g,
        &rt,
        "scope_route_permission",
        None,
        ScopeLayer::openai().layer(upstream()),
        |_| with_principal(&keys, models_request()),
    );
    bench_service(
        &mut g,
        &rt,
        "rate_limit",
        None,
        RateLimitLayer::new().layer(upstream()),
        |_| with_principal(&keys, models_request()),
    );
    bench_service(
        &mut g,
        &rt,
        "token_limit_no_body",
        None,
        TokenLimitLayer::default().layer(upstream()),
        |_| with_principal(&keys, models_request()),
    );

    // The whole stack on a request without a body to check.
    bench_service(
        &mut g,
        &rt,
        "full_stack",
        None,
        full_stack(keys.store.clone(), RateLimitLayer::new(), upstream()),
        |_| with_key(&keys, models_request()),
    );

    // The peers: bearer check + keyed governor, as a team would stack them instead.
    #[allow(deprecated)] // "too basic to be useful in real applications": exactly the point.
    let bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&key);
    let governor = GovernorConfigBuilder::default()
        .key_extractor(AuthorizationKey)
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .expect("a governor config");
    let peers = ServiceBuilder::new()
        .layer(bearer)
        .layer(GovernorLayer::new(governor))
        .service(upstream());
    bench_service(&mut g, &rt, "peers_bearer_governor", None, peers, |_| {
        with_key(&keys, models_request())
    });

    // JWT verification through the extract layer.
    let key_set = KeySet::new()
        .with_hs256("hs", HS256_SECRET)
        .expect("hs256 key")
        .with_eddsa_pem("ed", ED25519_PUB_PEM)
        .expect("ed25519 key");
    let verifier =
        JwtVerifier::new(keys.store.clone(), JWT_ISSUER, JWT_AUDIENCE, key_set).expect("verifier");
    let hs256 = issue(&keys, SigningKey::hs256("hs", HS256_SECRET).expect("hs256"));
    let eddsa = issue(
        &keys,
        SigningKey::eddsa_pem("ed", ED25519_PEM).expect("ed25519"),
    );
    assert!(verifier.accepts(hs256.to_str().unwrap().trim_start_matches("Bearer ")));
    let jwt_extract = KeyExtractLayer::new(keys.store.clone())
        .with_token_verifier(verifier)
        .layer(upstream());
    for (name, token) in [("extract_jwt_hs256", &hs256), ("extract_jwt_eddsa", &eddsa)] {
        bench_service(&mut g, &rt, name, None, jwt_extract.clone(), |_| {
            with_token(token, models_request())
        });
    }
    g.finish();

    // The model check: chat bodies of growing size, model last.
    let mut g = c.benchmark_group(BODY_GROUP);
    g.warm_up_time(Duration::from_secs(1));
    for size in SIZES {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(size as u64));
        bench_service(&mut g, &rt, "bare", Some(size), upstream(), |_| {
            with_key(&keys, chat_request(&body))
        });
        bench_service(
            &mut g,
            &rt,
            "scope",
            Some(size),
            ScopeLayer::openai().layer(upstream()),
            |_| with_principal(&keys, chat_request(&body)),
        );
        bench_service(
            &mut g,
            &rt,
            "full_stack",
            Some(size),
            full_stack(keys.store.clone(), RateLimitLayer::new(), upstream()),
            |_| keys.chat_request(0, &body),
        );
    }
    g.finish();
}

/// Prints what this run measured as the overheads and ratios `BENCHMARKS.md` quotes (from
/// criterion's saved estimates; nothing when run as a test).
fn report(_c: &mut Criterion) {
    if !measuring() {
        return;
    }
    let m = |id: &str| mean_ns(GROUP, id);
    let (Some(bare), Some(bare_p)) = (m("bare"), m("bare_with_principal")) else {
        println!("\n(no saved estimates: run with `cargo bench` for the summary)");
        return;
    };
    println!(
        "\n## keygate overhead summary (mean per request; overhead = variant − its baseline)\n"
    );
    println!("| variant | mean | overhead |");
    println!("| --- | --- | --- |");
    println!("| bare axum handler | {} | — |", fmt_ns(bare));
    println!("| bare, principal inserted | {} | — |", fmt_ns(bare_p));
    let rows = [
        ("audit (no-op sink)", "audit_noop_sink", bare),
        (
            "extract (MemoryStore, 1k keys)",
            "extract_memory_store",
            bare,
        ),
        (
            "scope (route + permission)",
            "scope_route_permission",
            bare_p,
        ),
        ("rate limit", "rate_limit", bare_p),
        ("token limit (no body path)", "token_limit_no_body", bare_p),
        ("extract + JWT HS256", "extract_jwt_hs256", bare),
        ("extract + JWT EdDSA", "extract_jwt_eddsa", bare),
        ("**full stack** (no body)", "full_stack", bare),
        (
            "**peers**: bearer + governor",
            "peers_bearer_governor",
            bare,
        ),
    ];
    for (label, id, base) in rows {
        if let Some(t) = m(id) {
            println!("| {label} | {} | {} |", fmt_ns(t), fmt_ns(t - base));
        }
    }
    if let (Some(full), Some(peers)) = (m("full_stack"), m("peers_bearer_governor")) {
        let ratio = (full - bare) / (peers - bare);
        println!(
            "\nfull-stack overhead / peers overhead = {} / {} = **{ratio:.2}** (target ≤ 1.0)",
            fmt_ns(full - bare),
            fmt_ns(peers - bare)
        );
    }
    println!("\n| body | bare | scope alone: overhead, rate | full stack: overhead, rate |");
    println!("| --- | --- | --- | --- |");
    for size in SIZES {
        let b = |who: &str| mean_ns(BODY_GROUP, &format!("{who}/{size}"));
        let (Some(bare_b), Some(scope), Some(full)) = (b("bare"), b("scope"), b("full_stack"))
        else {
            continue;
        };
        // The scope request carries a principal instead of a key header.
        let scope_over = scope - bare_b - (bare_p - bare);
        let full_over = full - bare_b;
        let rate = |ns: f64| format!("{:.2} GB/s", size as f64 / ns);
        println!(
            "| {} | {} | {}, {} | {}, {} |",
            if size >= 1024 * 1024 {
                format!("{} MiB", size / (1024 * 1024))
            } else {
                format!("{} KiB", size / 1024)
            },
            fmt_ns(bare_b),
            fmt_ns(scope_over),
            rate(scope_over),
            fmt_ns(full_over),
            rate(full_over),
        );
    }
}

criterion_group!(benches, overhead, report);
criterion_main!(benches);
