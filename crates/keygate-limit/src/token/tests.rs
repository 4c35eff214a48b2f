use super::charges::*;
use super::*;
use crate::backend::{Actual, Charge, LimitBackend, Reservation, ReserveError, Window};
use crate::body::RequestBody;
use crate::price::{Price, PriceTable};
use crate::test_support::*;
use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body::Frame;
use http_body_util::StreamBody;
use http_body_util::{BodyExt, Full};
use keygate_core::{Budget, ManualClock, Money, Period, Timestamp};
use keygate_core::{Cut, Denial, LimitScope, Limits, Principal, Usage, UsageMeter};
use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_service::Service;

const MINI: &str = "gpt-4o-mini";

fn prices() -> PriceTable {
    PriceTable::new()
        .with_price(
            MINI,
            Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
        )
        .unwrap()
}

fn start() -> Timestamp {
    Timestamp::parse_rfc3339("2026-03-31T23:59:00Z").unwrap()
}

fn layer(manual: &ManualClock) -> TokenLimitLayer {
    TokenLimitLayer::default()
        .with_clock(manual.clock())
        .with_prices(prices())
}

fn day_budget(dollars_nanos: u64) -> Budget {
    Budget {
        amount: Money::from_nanos(dollars_nanos),
        period: Period::Day,
        model: None,
    }
}

fn budget_used(layer: &TokenLimitLayer, owner: &str, now: Timestamp) -> u64 {
    let (start, end) = Period::Day.window(now);
    let key = format!("key\u{1f}{owner}\u{1f}budget\u{1f}day\u{1f}*");
    layer
        .backend()
        .used(&key, Window::Fixed { start, end }, u64::MAX, now)
        .unwrap_or(0)
}

fn tpm_used(layer: &TokenLimitLayer, owner: &str, now: Timestamp) -> u64 {
    let key = format!("key\u{1f}{owner}\u{1f}tpm");
    let window = Window::Rate {
        per: Duration::from_secs(60),
    };
    layer
        .backend()
        .used(&key, window, 1_000_000, now)
        .unwrap_or(0)
}

/// The prompt tokens the layer reserves for `body` (a token a byte of text).
fn prompt_of(body: &str) -> u64 {
    let fields = keygate_core::facts::scan_json(body.as_bytes()).unwrap();
    let mut facts = keygate_core::RequestFacts::unrouted();
    facts.absorb_json(&fields);
    facts.prompt.tokens_at_most(1)
}

/// The stream of [`sse_frames`] as a client that did not ask for usage sees it.
const SSE_WITHOUT_USAGE: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";

fn chat(p: &Principal, body: &str) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    r.extensions_mut().insert(p.clone());
    r
}

fn json_response(body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

const USAGE_JSON: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150}}"#;
// 100 × $0.15/M + 50 × $0.60/M.
const USAGE_COST: u64 = 15_000 + 30_000;

#[test]
fn counter_keys_join_scope_owner_and_parts_with_unit_separators() {
    assert_eq!(
        &*counter_key(LimitScope::Key, "key_a", &["tpm"]),
        "key\u{1f}key_a\u{1f}tpm"
    );
    assert_eq!(
        &*counter_key(LimitScope::Project, "p", &["budget", "day", "*"]),
        "project\u{1f}p\u{1f}budget\u{1f}day\u{1f}*"
    );
    // Longer than the stack buffer: the same key, built on the heap.
    let pattern = "m".repeat(300);
    assert_eq!(
        &*counter_key(LimitScope::Token, "tok", &["tpm", &pattern]),
        format!("token\u{1f}tok\u{1f}tpm\u{1f}{pattern}")
    );
}

#[tokio::test]
async fn json_response_settles_once_at_actual_usage_and_reports_the_meter() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response(USAGE_JSON))
        },
    );
    let p = principal_with(|k, _| {
        k.budgets.push(day_budget(1_000_000_000));
        k.tokens_per_minute = NonZeroU64::new(100_000);
    });
    let meter = UsageMeter::new();
    let mut req = chat(&p, r#"{"model":"gpt-4o-mini","max_tokens":1000}"#);
    req.extensions_mut().insert(meter.clone());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "100000");
    // Reserved while the body is unread: more than the actual.
    assert!(budget_used(&layer, "key_a", manual.now()) > USAGE_COST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, USAGE_JSON.as_bytes());
    assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
    assert_eq!(tpm_used(&layer, "key_a", manual.now()), 150);
    assert_eq!(meter.usage(), Some(Usage::new(100, 50)));
    assert_eq!(meter.cost(), Some(Money::from_nanos(USAGE_COST)));
}

#[tokio::test]
async fn usage_extension_from_the_handler_settles_at_once() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            let mut res = Response::new(Full::new(Bytes::from_static(b"x")));
            res.extensions_mut().insert(Usage::new(10, 0));
            Ok::<_, Infallible>(res)
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000)));
    let res = svc
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","max_tokens":1}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(budget_used(&layer, "key_a", manual.now()), 1500);
    drop(res);
    assert_eq!(budget_used(&layer, "key_a", manual.now()), 1500);
}

fn sse_frames() -> Vec<&'static str> {
    vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":",
        "100,\"completion_tokens\":50,\"total_tokens\":150}}\n\ndata: [DONE]\n\n",
    ]
}

type Sse = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn sse_response() -> Response<Sse> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = sse_frames()
        .into_iter()
        .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
        .collect();
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(StreamBody::new(stream::iter(frames)))
        .unwrap()
}

#[tokio::test]
async fn a_stream_settles_from_the_usage_chunk_keygate_asked_for_and_the_client_never_sees_it() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        move |r: Request<RequestBody<Full<Bytes>>>| {
            let seen = seen2.clone();
            async move {
                let len = r.headers()[CONTENT_LENGTH].clone();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(len, body.len().to_string().as_str());
                seen.lock().unwrap().push(body);
                Ok::<_, Infallible>(sse_response())
            }
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    let sent = r#"{"model":"gpt-4o-mini","stream":true}"#;
    let mut req = chat(&p, sent);
    req.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(sent.len()));
    let res = svc.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, SSE_WITHOUT_USAGE.as_bytes());
    assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
    assert_eq!(
        seen.lock().unwrap()[0],
        br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#[..]
    );
}

async fn disconnect_after_first_frame(layer: &TokenLimitLayer, p: &Principal) {
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(sse_response()) },
    );
    let res = svc
        .oneshot(chat(
            p,
            r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100}"#,
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
}

#[tokio::test]
async fn disconnect_mid_stream_settles_once_at_the_reservation() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    disconnect_after_first_frame(&layer, &p).await;
    let prompt = prompt_of(r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100}"#);
    let estimate = Usage::new(prompt, 100);
    let cost = prices().price(MINI).unwrap().cost(estimate).as_nanos();
    assert_eq!(budget_used(&layer, "key_a", manual.now()), cost);
}

#[tokio::test]
async fn disconnect_after_the_usage_chunk_can_settle_at_usage_seen() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual).with_on_disconnect(OnDisconnect::UsageSeen);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(sse_response()) },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    // The client asks for usage itself: the stream passes as it came.
    let res = svc
        .oneshot(chat(
            &p,
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#,
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
}

#[tokio::test]
async fn budget_refuses_with_insufficient_quota_until_the_utc_day_turns() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual).with_default_output_tokens(0);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response(USAGE_JSON))
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(USAGE_COST + 10)));
    let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let denial = res.extensions().get::<Denial>().unwrap();
    assert_eq!(denial.code(), "insufficient_quota");
    // Until 00:00 UTC: 60 s away.
    assert_eq!(res.headers()["retry-after"], "60");
    manual.advance(Duration::from_secs(59));
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    manual.advance(Duration::from_secs(1));
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn token_rate_refuses_with_rate_limit_exceeded_and_token_headers() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response(
                r#"{"usage":{"prompt_tokens":10,"completion_tokens":90}}"#,
            ))
        },
    );
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(150));
    // 6 bytes of text (a token a byte), 4 tokens of framing, and 92: 102.
    let body = r#"{"model":"gpt-4o-mini","prompt":"hello!","max_tokens":92}"#;
    assert_eq!(prompt_of(body), 10);
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "48");
    res.into_body().collect().await.unwrap();
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        "rate_limit_exceeded"
    );
    assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "150");
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "50");
    // 52 tokens over at 150/min: 20.8 s.
    assert_eq!(res.headers()["retry-after-ms"], "20800");
    assert_eq!(res.headers()["retry-after"], "21");
}

#[tokio::test]
async fn unpriced_model_under_a_budget_is_denied_or_counted_by_tokens() {
    let manual = ManualClock::new(start());
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000)));
    let handler =
        |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(json_response("{}")) };
    let deny = ServiceBuilder::new()
        .layer(layer(&manual))
        .service_fn(handler);
    let res = deny.oneshot(chat(&p, r#"{"model":"o9"}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        "model_not_priced"
    );
    let count = ServiceBuilder::new()
        .layer(layer(&manual).with_unpriced(Unpriced::CountTokensOnly))
        .service_fn(handler);
    let res = count.oneshot(chat(&p, r#"{"model":"o9"}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_bodies_are_refused() {
    let manual = ManualClock::new(start());
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000_000));
    let svc = ServiceBuilder::new()
        .layer(layer(&manual).with_max_body(64))
        .service_fn(|_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response("{}"))
        });
    let dup = r#"{"max_tokens":1,"max_tokens":100000}"#;
    assert_eq!(
        svc.clone().oneshot(chat(&p, dup)).await.unwrap().status(),
        400
    );
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(100));
    assert_eq!(
        svc.clone().oneshot(chat(&p, &big)).await.unwrap().status(),
        413
    );
    let mut gz = chat(&p, "{}");
    gz.headers_mut()
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    assert_eq!(svc.clone().oneshot(gz).await.unwrap().status(), 415);
}

#[tokio::test]
async fn upstream_error_status_releases_the_reservation() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            let mut res = json_response(r#"{"error":{}}"#);
            *res.status_mut() = StatusCode::BAD_GATEWAY;
            Ok::<_, Infallible>(res)
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    let res = svc
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(budget_used(&layer, "key_a", manual.now()), 0);
}

#[tokio::test]
async fn a_response_cut_by_a_timeout_is_charged_the_whole_reservation() {
    // The same 504 twice: once as a plain upstream error (released), once marked as cut by
    // a timeout (the upstream may have done the work: charged what was reserved).
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cut.clone();
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        move |_r: Request<RequestBody<Full<Bytes>>>| {
            let cut = flag.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                let mut res = json_response(r#"{"error":{}}"#);
                *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                if cut {
                    res.extensions_mut().insert(Cut::UpstreamHead);
                }
                Ok::<_, Infallible>(res)
            }
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    let body = r#"{"model":"gpt-4o-mini","max_tokens":100}"#;
    let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(budget_used(&layer, "key_a", manual.now()), 0);

    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let res = svc.oneshot(chat(&p, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    res.into_body().collect().await.unwrap();
    let estimate = Usage::new(prompt_of(body), 100);
    let reserved = prices().price(MINI).unwrap().cost(estimate).as_nanos();
    assert_eq!(budget_used(&layer, "key_a", manual.now()), reserved);
}

#[tokio::test]
async fn key_without_token_limits_passes_untouched_and_missing_principal_is_401() {
    let manual = ManualClock::new(start());
    let svc = ServiceBuilder::new().layer(layer(&manual)).service_fn(
        |r: Request<RequestBody<Full<Bytes>>>| async move {
            // The original body, not a buffered copy.
            assert!(format!("{:?}", r.body()).contains("Inner"));
            Ok::<_, Infallible>(json_response("{}"))
        },
    );
    let p = principal_with(|_, _| {});
    assert_eq!(
        svc.clone().oneshot(chat(&p, "{}")).await.unwrap().status(),
        200
    );
    let res = svc.oneshot(Request::new(empty())).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn suspended_key_is_refused_and_a_spike_suspends() {
    let manual = ManualClock::new(start());
    let guard = WalletGuard::new()
        .with_clock(manual.clock())
        .with_ceiling(Some(200), None);
    let layer = layer(&manual).with_guard(guard.clone());
    let svc = ServiceBuilder::new().layer(layer).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(json_response(USAGE_JSON))
        },
    );
    let p = principal_with(|_, _| {});
    for _ in 0..2 {
        let res = svc.clone().oneshot(chat(&p, "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
    assert!(guard.is_suspended("key_a"));
    let res = svc.clone().oneshot(chat(&p, "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        "key_suspended"
    );
    guard.reinstate("key_a");
    assert_eq!(
        svc.oneshot(chat(&p, "{}")).await.unwrap().status(),
        StatusCode::OK
    );
}

/// A service answering `USAGE_JSON` that records every body it was sent.
#[allow(clippy::type_complexity)]
fn recording(
    layer: TokenLimitLayer,
) -> (
    impl Service<
        Request<Full<Bytes>>,
        Response = Out<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone,
    Arc<Mutex<Vec<Bytes>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(
        move |r: Request<RequestBody<Full<Bytes>>>| {
            let seen = seen2.clone();
            async move {
                let body = r.into_body().collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(body);
                Ok::<_, Infallible>(json_response(USAGE_JSON))
            }
        },
    );
    (svc, seen)
}

const CAPPED: &str = r#"{"model":"gpt-4o-mini","max_tokens":1000}"#;

fn capped_prompt() -> u64 {
    prompt_of(CAPPED)
}

#[tokio::test]
async fn output_cap_lowering_is_off_by_default() {
    let manual = ManualClock::new(start());
    // Room for the prompt and 100 output tokens only (150 and 600 nano-dollars a token).
    let budget = capped_prompt() * 150 + 100 * 600;
    let p = principal_with(|k, _| k.budgets.push(day_budget(budget)));
    let (svc, seen) = recording(layer(&manual));
    let res = svc.oneshot(chat(&p, CAPPED)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn output_cap_is_lowered_to_what_the_tightest_limit_holds_when_enabled() {
    let manual = ManualClock::new(start());
    let budget = capped_prompt() * 150 + 100 * 600;
    // The budget holds 100 output tokens, the token rate 60: 60 it is.
    let p = principal_with(|k, _| {
        k.budgets.push(day_budget(budget));
        k.tokens_per_minute = NonZeroU64::new(capped_prompt() + 60);
    });
    let layer = layer(&manual).with_max_tokens_lowering(true);
    let (svc, seen) = recording(layer.clone());
    let res = svc.clone().oneshot(chat(&p, CAPPED)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        seen.lock().unwrap()[0],
        br#"{"model":"gpt-4o-mini","max_tokens":60}"#[..]
    );
    assert_eq!(
        budget_used(&layer, "key_a", manual.now()),
        capped_prompt() * 150 + 60 * 600
    );
    drop(res);
    // Only the budget binds now: 100 output tokens.
    let p = principal_named("key_b", "p", |k, _| k.budgets.push(day_budget(budget)));
    seen.lock().unwrap().clear();
    let res = svc.clone().oneshot(chat(&p, CAPPED)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(res);
    // A request without an explicit cap is refused, not rewritten.
    let res = svc
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        seen.lock().unwrap()[..],
        [Bytes::from_static(
            br#"{"model":"gpt-4o-mini","max_tokens":100}"#
        )]
    );
}

#[tokio::test]
async fn per_model_token_rate_applies_to_matching_models_only() {
    let manual = ManualClock::new(start());
    let p = principal_with(|k, _| {
        k.models.insert(
            "gpt-4o*".into(),
            keygate_core::ModelLimits {
                requests_per_minute: None,
                tokens_per_minute: NonZeroU64::new(200),
            },
        );
    });
    let layer = layer(&manual).with_unpriced(Unpriced::CountTokensOnly);
    let (svc, _) = recording(layer.clone());
    let body = |m: &str| format!(r#"{{"model":"{m}","max_tokens":150}}"#);
    let res = svc.clone().oneshot(chat(&p, &body(MINI))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "200");
    drop(res);
    let res = svc.clone().oneshot(chat(&p, &body(MINI))).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        "rate_limit_exceeded"
    );
    let res = svc.oneshot(chat(&p, &body("o1"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("x-ratelimit-limit-tokens"));
}

#[tokio::test]
async fn project_budget_binds_every_key_of_the_project() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual).with_default_output_tokens(0);
    let (svc, _) = recording(layer.clone());
    // Each request settles at USAGE_COST; the project holds two of them.
    let budget = |_: &mut Limits, p: &mut Limits| p.budgets.push(day_budget(2 * USAGE_COST));
    let a = principal_named("key_a", "p1", budget);
    let b = principal_named("key_b", "p1", budget);
    let other = principal_named("key_c", "p2", budget);
    let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
    for p in [&a, &b] {
        let res = svc.clone().oneshot(chat(p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
    let res = svc.clone().oneshot(chat(&a, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        "insufficient_quota"
    );
    let res = svc.oneshot(chat(&other, body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn per_model_budget_charges_only_matching_models() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual)
        .with_default_output_tokens(0)
        .with_unpriced(Unpriced::CountTokensOnly);
    let (svc, _) = recording(layer.clone());
    let p = principal_with(|k, _| {
        k.budgets.push(Budget {
            amount: Money::from_nanos(USAGE_COST),
            period: Period::Day,
            model: Some(keygate_core::ModelPattern::new("gpt-4o*").unwrap()),
        })
    });
    let mini = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
    let res = svc.clone().oneshot(chat(&p, mini)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    let res = svc.clone().oneshot(chat(&p, mini)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let other = r#"{"model":"o1","max_tokens":1}"#;
    for _ in 0..3 {
        let res = svc.clone().oneshot(chat(&p, other)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn week_and_month_budgets_reset_at_their_utc_boundary_and_lifetime_never() {
    let body = r#"{"model":"gpt-4o-mini","max_tokens":1}"#;
    // Sunday 2026-04-05 and Tuesday 2026-03-31, each one minute before midnight UTC.
    for (period, at) in [
        (Period::Week, "2026-04-05T23:59:00Z"),
        (Period::Month, "2026-03-31T23:59:00Z"),
        (Period::Lifetime, "2026-03-31T23:59:00Z"),
    ] {
        let manual = ManualClock::new(Timestamp::parse_rfc3339(at).unwrap());
        let layer = layer(&manual).with_default_output_tokens(0);
        let (svc, _) = recording(layer.clone());
        let p = principal_with(|k, _| {
            k.budgets.push(Budget {
                amount: Money::from_nanos(USAGE_COST),
                period,
                model: None,
            })
        });
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{period:?}");
        res.into_body().collect().await.unwrap();
        manual.advance(Duration::from_secs(59));
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{period:?}");
        manual.advance(Duration::from_secs(1));
        let res = svc.clone().oneshot(chat(&p, body)).await.unwrap();
        let expected = if period == Period::Lifetime {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::OK
        };
        assert_eq!(res.status(), expected, "{period:?}");
    }
}

#[test]
fn thousand_concurrent_requests_admit_exactly_what_fits() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":100}"#;
    let estimate = Usage::new(prompt_of(body), 100);
    let cost = prices().price(MINI).unwrap().cost(estimate).as_nanos();
    let fits = 137u64;
    type Setup = fn(&mut Limits, u64, u64);
    let cases: [(Setup, &str); 2] = [
        (
            |k, _tokens, cost| k.budgets.push(day_budget(cost * 137 + cost / 2)),
            "budget",
        ),
        (
            |k, tokens, _cost| k.tokens_per_minute = NonZeroU64::new(tokens * 137 + 1),
            "tpm",
        ),
    ];
    for (setup, name) in cases {
        let manual = ManualClock::new(start());
        let layer = layer(&manual);
        let p = principal_with(|k, _| setup(k, estimate.total_tokens, cost));
        let admitted = rt.block_on(async {
            let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
                move |_r: Request<RequestBody<Full<Bytes>>>| async move {
                    tokio::task::yield_now().await;
                    let mut res = Response::new(Full::new(Bytes::new()));
                    res.extensions_mut().insert(estimate);
                    Ok::<_, Infallible>(res)
                },
            );
            let tasks: Vec<_> = (0..1000)
                .map(|_| {
                    let svc = svc.clone();
                    let req = chat(&p, body);
                    tokio::spawn(async move {
                        let res = svc.oneshot(req).await.unwrap();
                        res.status() == StatusCode::OK
                    })
                })
                .collect();
            let mut n = 0u64;
            for t in tasks {
                n += u64::from(t.await.unwrap());
            }
            n
        });
        assert_eq!(admitted, fits, "{name}");
        if name == "budget" {
            assert_eq!(budget_used(&layer, "key_a", manual.now()), cost * fits);
        } else {
            assert_eq!(
                tpm_used(&layer, "key_a", manual.now()),
                estimate.total_tokens * fits
            );
        }
    }
}

#[tokio::test]
async fn works_under_axum_with_the_rate_layer() {
    use axum::routing::post;
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async { ([(CONTENT_TYPE, "application/json")], USAGE_JSON) }),
    );
    let p = principal_with(|k, _| {
        k.budgets.push(day_budget(1_000_000_000));
        k.requests_per_minute = std::num::NonZeroU32::new(5);
    });
    let svc = ServiceBuilder::new()
        .layer(crate::RateLimitLayer::new().with_clock(manual.clock()))
        .layer(layer.clone())
        .service(router);
    let res = svc
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "4");
    res.into_body().collect().await.unwrap();
    assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
}

/// A real hyper HTTP/1 server on 127.0.0.1 with both layers over `Incoming` bodies, and
/// a hyper client: a streamed response settles at its usage chunk, and the next request
/// is refused on the wire with the rate headers.
#[tokio::test]
async fn works_in_a_hyper_server_over_incoming_bodies() {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = principal_with(|k, _| {
        k.budgets.push(day_budget(1_000_000_000));
        k.requests_per_minute = std::num::NonZeroU32::new(1);
    });
    let server_layer = layer.clone();
    let rate = crate::RateLimitLayer::new().with_clock(manual.clock());
    let server = async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(p.clone());
                req
            })
            .layer(rate)
            .layer(server_layer)
            .service_fn(
                |r: Request<RequestBody<hyper::body::Incoming>>| async move {
                    let body = r.into_body().collect().await.unwrap().to_bytes();
                    assert!(memchr::memmem::find(&body, b"include_usage").is_some());
                    Ok::<_, Infallible>(sse_response())
                },
            );
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .await
            .unwrap();
    };
    let client = async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        let talk = async move {
            let send = || {
                Request::post("/v1/chat/completions")
                    .header("host", "localhost")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"model":"gpt-4o-mini","stream":true}"#,
                    )))
                    .unwrap()
            };
            let res = sender.send_request(send()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, SSE_WITHOUT_USAGE.as_bytes());
            let res = sender.send_request(send()).await.unwrap();
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(res.headers()["retry-after"], "60");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["error"]["code"], "rate_limit_exceeded");
        };
        let (conn, ()) = tokio::join!(conn, talk);
        conn.unwrap();
    };
    tokio::join!(server, client);
    assert_eq!(budget_used(&layer, "key_a", manual.now()), USAGE_COST);
}

#[tokio::test]
async fn grpc_passes_both_layers_without_buffering() {
    let manual = ManualClock::new(start());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let p = principal_with(|k, _| {
        k.tokens_per_minute = NonZeroU64::new(10_000);
        k.requests_per_minute = std::num::NonZeroU32::new(5);
    });
    let layer = layer(&manual).with_default_output_tokens(10);
    let svc = ServiceBuilder::new()
        .layer(crate::RateLimitLayer::new().with_clock(manual.clock()))
        .layer(layer.clone())
        .service(health);
    let mut req = Request::post("/grpc.health.v1.Health/Check")
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    req.extensions_mut().insert(p.clone());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "4");
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    // No usage reported: settled at the reservation (the default output ceiling).
    assert_eq!(tpm_used(&layer, "key_a", manual.now()), 10);
}

/// Counts how reservations end, over the memory backend.
#[derive(Default)]
struct Counting {
    inner: MemoryBackend,
    reserved: std::sync::atomic::AtomicUsize,
    ended: std::sync::atomic::AtomicUsize,
    fail: bool,
    /// Answer `reserve_at_once` / `end_at_once` (as the memory backend does).
    at_once: bool,
}

impl LimitBackend for Counting {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<crate::backend::Reservation, ReserveError>> + Send + 'static
    {
        let r = if self.fail {
            Err(ReserveError::Backend(crate::backend::BackendError(
                "down".into(),
            )))
        } else {
            self.reserved
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner
                .reserve_now(charges, now)
                .map_err(ReserveError::Exceeded)
        };
        std::future::ready(r)
    }
    fn settle(
        &self,
        reservation: crate::backend::Reservation,
        actual: Actual,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static {
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.settle_now(reservation, actual, now);
        std::future::ready(Ok(()))
    }
    fn release(
        &self,
        reservation: crate::backend::Reservation,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static {
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.release_now(reservation, now);
        std::future::ready(Ok(()))
    }
    fn reserve_at_once(
        &self,
        charges: Vec<Charge>,
        now: keygate_core::Timestamp,
    ) -> Result<Result<Reservation, ReserveError>, Vec<Charge>> {
        if !self.at_once || self.fail {
            return Err(charges);
        }
        self.reserved
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self
            .inner
            .reserve_now(charges, now)
            .map_err(ReserveError::Exceeded))
    }
    fn end_at_once(
        &self,
        reservation: Reservation,
        actual: Option<Actual>,
        now: keygate_core::Timestamp,
    ) -> Option<Reservation> {
        if !self.at_once {
            return Some(reservation);
        }
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match actual {
            Some(actual) => self.inner.settle_now(reservation, actual, now),
            None => self.inner.release_now(reservation, now),
        }
        None
    }
}

#[tokio::test]
async fn every_kind_of_response_ends_its_reservation_exactly_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let manual = ManualClock::new(start());
    let backend = Arc::new(Counting::default());
    let layer = TokenLimitLayer::with_shared_backend(backend.clone())
        .with_clock(manual.clock())
        .with_prices(prices());
    let p = principal_with(|k, _| k.budgets.push(day_budget(1_000_000_000)));
    let svc = ServiceBuilder::new().layer(layer).service_fn(
        |r: Request<RequestBody<Full<Bytes>>>| async move {
            let streaming = r.into_body().collect().await.unwrap().to_bytes();
            let res = if memchr::memmem::find(&streaming, b"stream").is_some() {
                sse_response().map(http_body_util::Either::Left)
            } else {
                json_response(USAGE_JSON).map(http_body_util::Either::Right)
            };
            Ok::<_, Infallible>(res)
        },
    );
    // Non-streaming, read to the end and then dropped.
    let res = svc
        .clone()
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (1, 1)
    );
    // Streaming, read to the end.
    let res = svc
        .clone()
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","stream":true}"#))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (2, 2)
    );
    // Streaming, dropped after one frame.
    let res = svc
        .clone()
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini","stream":true}"#))
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(backend.ended.load(SeqCst), 2);
    drop(body);
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (3, 3)
    );
    // Response never polled: dropped with its body unread.
    let res = svc
        .clone()
        .oneshot(chat(&p, r#"{"model":"gpt-4o-mini"}"#))
        .await
        .unwrap();
    drop(res);
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (4, 4)
    );
    // All of it settled at the actual usage but the dropped ones.
    let used = backend.inner.used(
        "key\u{1f}key_a\u{1f}budget\u{1f}day\u{1f}*",
        {
            let (start, end) = Period::Day.window(manual.now());
            Window::Fixed { start, end }
        },
        u64::MAX,
        manual.now(),
    );
    assert!(used.unwrap() > 2 * USAGE_COST);
}

#[tokio::test]
async fn backend_failure_fails_closed_with_503() {
    let manual = ManualClock::new(start());
    let backend = Counting {
        fail: true,
        ..Counting::default()
    };
    let layer = TokenLimitLayer::new(backend)
        .with_clock(manual.clock())
        .with_prices(prices());
    let svc = ServiceBuilder::new().layer(layer).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async { Ok::<_, Infallible>(json_response("{}")) },
    );
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000_000));
    let res = svc.oneshot(chat(&p, "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn non_json_bodies_pass_unread_and_reserve_the_output_ceiling() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual).with_default_output_tokens(7);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |r: Request<RequestBody<Full<Bytes>>>| async move {
            assert!(format!("{:?}", r.body()).contains("Inner"));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
    let mut req = Request::post("/v1/audio/transcriptions")
        .header(CONTENT_TYPE, "multipart/form-data; boundary=x")
        .body(Full::new(Bytes::from(vec![b'x'; 100_000])))
        .unwrap();
    req.extensions_mut().insert(p.clone());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
}

/// The memory backend behind reservations that are not ready at their first poll.
#[derive(Default)]
struct Slow(MemoryBackend);

/// Pending once (waking itself), then the value.
struct YieldOnce<T>(Option<T>, bool);

impl<T: Unpin> Future for YieldOnce<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.0.take().expect("polled after completion"))
    }
}

impl LimitBackend for Slow {
    fn reserve(
        &self,
        charges: Vec<Charge>,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<Reservation, ReserveError>> + Send + 'static {
        let r = self.0.reserve_now(charges, now);
        YieldOnce(Some(r.map_err(ReserveError::Exceeded)), false)
    }
    fn settle(
        &self,
        reservation: Reservation,
        actual: Actual,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static {
        self.0.settle_now(reservation, actual, now);
        std::future::ready(Ok(()))
    }
    fn release(
        &self,
        reservation: Reservation,
        now: keygate_core::Timestamp,
    ) -> impl Future<Output = Result<(), crate::backend::BackendError>> + Send + 'static {
        self.0.release_now(reservation, now);
        std::future::ready(Ok(()))
    }
}

fn get_models(p: &Principal) -> Request<Full<Bytes>> {
    let mut r = Request::get("/v1/models").body(empty()).unwrap();
    r.extensions_mut().insert(p.clone());
    r
}

#[tokio::test]
async fn unread_body_with_a_backend_that_waits_is_reserved_refused_and_settled() {
    let manual = ManualClock::new(start());
    let backend = Arc::new(Slow::default());
    let layer = TokenLimitLayer::with_shared_backend(backend.clone())
        .with_clock(manual.clock())
        .with_default_output_tokens(600);
    let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
    let res = svc.clone().oneshot(get_models(&p)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
    res.into_body().collect().await.unwrap();
    let window = Window::Rate {
        per: Duration::from_secs(60),
    };
    let used = |b: &Slow| {
        b.0.used("key\u{1f}key_a\u{1f}tpm", window, 1_000, manual.now())
    };
    assert_eq!(used(&backend), Some(600));
    let res = svc.oneshot(get_models(&p)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
    assert_eq!(used(&backend), Some(600));
}

#[tokio::test]
async fn empty_bodies_pass_as_empty_and_compressed_empty_json_is_still_refused() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual).with_default_output_tokens(7);
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |r: Request<RequestBody<Full<Bytes>>>| async move {
            assert!(format!("{:?}", r.body()).contains("Buffered"));
            assert!(r.body().is_end_stream());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
    let res = svc.clone().oneshot(chat(&p, "")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
    let mut req = chat(&p, "");
    req.headers_mut()
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(tpm_used(&layer, "key_a", manual.now()), 7);
}

#[tokio::test]
async fn response_future_dropped_before_the_answer_settles_at_the_reservation() {
    use std::sync::atomic::Ordering::SeqCst;
    // Reserved in `call` (a backend that answers at once) or at the first poll.
    for at_once in [true, false] {
        let manual = ManualClock::new(start());
        let backend = Arc::new(Counting {
            at_once,
            ..Counting::default()
        });
        let layer = TokenLimitLayer::with_shared_backend(backend.clone())
            .with_clock(manual.clock())
            .with_default_output_tokens(9);
        let mut svc = ServiceBuilder::new().layer(layer).service_fn(
            |_r: Request<RequestBody<Full<Bytes>>>| {
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
            },
        );
        let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
        let mut future = svc.ready().await.unwrap().call(get_models(&p));
        let waker = std::task::Waker::noop();
        let polled = Pin::new(&mut future).poll(&mut Context::from_waker(waker));
        assert!(polled.is_pending());
        assert_eq!(backend.reserved.load(SeqCst), 1, "{at_once}");
        assert_eq!(backend.ended.load(SeqCst), 0, "{at_once}");
        drop(future);
        assert_eq!(backend.ended.load(SeqCst), 1, "{at_once}");
        let window = Window::Rate {
            per: Duration::from_secs(60),
        };
        let used = backend
            .inner
            .used("key\u{1f}key_a\u{1f}tpm", window, 1_000, manual.now());
        assert_eq!(used, Some(9), "{at_once}");
    }
}

#[tokio::test]
async fn backends_that_answer_at_once_end_each_reservation_once_without_futures() {
    use std::sync::atomic::Ordering::SeqCst;
    let manual = ManualClock::new(start());
    let backend = Arc::new(Counting {
        at_once: true,
        ..Counting::default()
    });
    let layer = TokenLimitLayer::with_shared_backend(backend.clone())
        .with_clock(manual.clock())
        .with_default_output_tokens(600);
    let svc = ServiceBuilder::new().layer(layer).service_fn(ok_handler);
    let p = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(1_000));
    let res = svc.clone().oneshot(get_models(&p)).await.unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "400");
    res.into_body().collect().await.unwrap();
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (1, 1)
    );
    // Refused: tried (counted), nothing held, nothing to end.
    let res = svc.oneshot(get_models(&p)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        (backend.reserved.load(SeqCst), backend.ended.load(SeqCst)),
        (2, 1)
    );
}

#[test]
fn reserved_amounts_are_what_a_dropped_settlement_charges() {
    let r = crate::backend::Reservation::default();
    assert_eq!(crate::backend::reserved_amounts(&r), Actual::default());
}
