//! Every admitted request is bounded: the whole stack (scope → rate → token) on the facts the
//! scope layer decides once. Reservations are the worst case (output × choices, a cap set when
//! the client names none), streams always carry usage to keygate, routes that make nothing
//! never touch a counter, and an upstream that reports more than was reserved is charged and
//! flagged.

use std::convert::Infallible;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_audit::{AuditEvent, RequestEvent};
use keygate_core::{
    Budget, KeyRecord, LimitScope, ManualClock, ModelPattern, ModelRules, Money, Period, SecretKey,
    Timestamp, UsageSource,
};
use keygate_limit::backend::Window;
use keygate_limit::{Price, PriceTable, budget_counter};
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::{Keygate, KeygateLayer, MemoryStore};

/// $0.15 / $0.60 per million tokens: 150 and 600 nano-dollars a token.
pub(crate) fn prices() -> PriceTable {
    PriceTable::new()
        .with_price(
            "gpt-4o-mini",
            Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
        )
        .unwrap()
}

const START: u64 = 1_750_000_000;

fn day_budget(nanos: u64) -> Budget {
    Budget {
        amount: Money::from_nanos(nanos),
        period: Period::Day,
        model: None,
    }
}

/// The whole stack over one key (`key_t`, all permissions, as `edit` leaves it), with a
/// manual clock and every audit event kept. The image tests use it too.
pub(crate) struct Stack {
    pub(crate) layer: KeygateLayer<MemoryStore>,
    pub(crate) secret: SecretKey,
    pub(crate) key: KeyRecord,
    pub(crate) clock: ManualClock,
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

fn stack(edit: impl FnOnce(&mut KeyRecord)) -> Stack {
    stack_with(prices(), None, edit)
}

/// [`stack`] with these prices and, if given, this body limit.
pub(crate) fn stack_with(
    prices: PriceTable,
    body_limit: Option<usize>,
    edit: impl FnOnce(&mut KeyRecord),
) -> Stack {
    let (store, secret, key) = crate::tests::store(edit);
    let clock = ManualClock::new(Timestamp::from_unix_secs(START));
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let mut builder = Keygate::builder(store)
        .clock(clock.clock())
        .prices(prices)
        .audit_sink(move |e: &AuditEvent| seen.lock().unwrap().push(e.clone()));
    if let Some(limit) = body_limit {
        builder = builder.body_limit(limit);
    }
    let layer = builder.build().unwrap();
    Stack {
        layer,
        secret,
        key,
        clock,
        events,
    }
}

impl Stack {
    fn post(&self, path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(path)
            .header("authorization", format!("Bearer {}", self.secret.expose()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    fn get(&self, path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header("authorization", format!("Bearer {}", self.secret.expose()))
            .body(Full::default())
            .unwrap()
    }

    pub(crate) fn spent(&self) -> u64 {
        let budget = &self.key.limits.budgets[0];
        let now = self.clock.now();
        let (key, window) = budget_counter(LimitScope::Key, "key_t", budget, now);
        self.layer
            .token_limit_layer()
            .backend()
            .memory()
            .unwrap()
            .used(&key, window, u64::MAX, now)
            .unwrap_or(0)
    }

    fn tpm_used(&self) -> u64 {
        let window = Window::Rate {
            per: std::time::Duration::from_secs(60),
        };
        self.layer
            .token_limit_layer()
            .backend()
            .memory()
            .unwrap()
            .used("key\u{1f}key_t\u{1f}tpm", window, 1 << 40, self.clock.now())
            .unwrap_or(0)
    }

    pub(crate) fn last_event(&self) -> RequestEvent {
        self.events
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|e| e.as_request().cloned())
            .unwrap()
    }
}

type Seen = Arc<Mutex<Vec<Bytes>>>;

/// An upstream that records what it was sent and answers with `respond(forwarded body)`.
fn upstream<B>(
    respond: impl Fn(&serde_json::Value) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
) -> (
    Seen,
    impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let seen = Seen::default();
    let log = seen.clone();
    let svc = tower::service_fn(move |req: Request<B>| {
        let log = log.clone();
        let respond = respond.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            log.lock().unwrap().push(body);
            Ok::<_, Infallible>(respond(&json))
        }
    });
    (seen, svc)
}

fn json(body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// An honest upstream: it uses up every output token it was allowed, for every choice.
fn honest(req: &serde_json::Value) -> Response<Full<Bytes>> {
    json(format!(
        r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":{}}}}}"#,
        all_allowed(req)
    ))
}

/// The most output an upstream may produce for `req`: every token of its cap, for every
/// choice (`best_of` of them when more than `n`).
fn all_allowed(req: &serde_json::Value) -> u64 {
    let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| req[k].as_u64())
        .unwrap_or(0);
    let n = req["n"].as_u64().unwrap_or(1);
    cap * n.max(req["best_of"].as_u64().unwrap_or(1))
}

macro_rules! call {
    ($svc:expr, $req:expr) => {{
        let res = $svc.clone().oneshot($req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
    }};
}

fn refusal_code(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

const MESSAGES: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

#[tokio::test]
async fn n_and_best_of_multiply_the_output_reservation() {
    let s = stack(|k| k.limits.tokens_per_minute = NonZeroU64::new(10_000));
    let (_, up) =
        upstream(|_| json(r#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#.into()));
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let one = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10}}"#);
    let (status, headers, _) = call!(svc, s.post("/v1/chat/completions", &one));
    assert_eq!(status, StatusCode::OK);
    let remaining = |h: &http::HeaderMap| -> u64 {
        h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let after_one = remaining(&headers);
    s.clock.advance(std::time::Duration::from_secs(120));
    let eight = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10,"n":8}}"#);
    let (_, headers, _) = call!(svc, s.post("/v1/chat/completions", &eight));
    // The same prompt, eight times the output.
    assert_eq!(10_000 - remaining(&headers), (10_000 - after_one) + 70);
    s.clock.advance(std::time::Duration::from_secs(120));
    let best = r#"{"model":"gpt-4o-mini","prompt":"hi","max_tokens":10,"n":2,"best_of":5}"#;
    let (_, headers, _) = call!(svc, s.post("/v1/completions", best));
    // best_of candidates are generated (and billed) even though only n come back: a prompt of
    // one token ("hi") and 4 of framing, and 5 × 10 output.
    assert_eq!(10_000 - remaining(&headers), 5 + 50);
}

#[tokio::test]
async fn a_request_without_a_cap_is_forwarded_with_one_the_budget_can_pay_for() {
    // Room for 1,000 output tokens and a little prompt.
    let s = stack(|k| k.limits.budgets.push(day_budget(1_000 * 600 + 10 * 150)));
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES}}}"#);
    let (status, _, _) = call!(svc, s.post("/v1/chat/completions", &body));
    assert_eq!(status, StatusCode::OK);
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    let cap = forwarded["max_completion_tokens"].as_u64().unwrap();
    // 12 prompt tokens, counted with gpt-4o-mini's tokenizer ("role", "user", "content",
    // "hi": 4, and 8 of framing), at 150 nano-dollars; the rest at 600 a token.
    assert_eq!(
        cap,
        (1_000 * 600 + 10 * 150 - 12 * 150) / 600,
        "{forwarded}"
    );
    // Everything else is as the client sent it.
    assert_eq!(forwarded["messages"][0]["content"], "hi");
    // The honest upstream used it all, and the budget held.
    assert!(s.spent() <= 1_000 * 600 + 10 * 150);
    // With room for more than the default, the default cap (4,096) is set.
    let roomy = stack(|k| k.limits.budgets.push(day_budget(1_000_000_000)));
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(roomy.layer.clone()).service(up);
    call!(svc, roomy.post("/v1/chat/completions", &body));
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(forwarded["max_completion_tokens"], 4096);
}

#[tokio::test]
async fn a_cap_beyond_the_budget_is_refused_naming_what_it_can_afford() {
    let s = stack(|k| k.limits.budgets.push(day_budget(1_000 * 600 + 10 * 150)));
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":100000}}"#);
    let (status, _, body) = call!(svc, s.post("/v1/chat/completions", &body));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refusal_code(&body), "insufficient_quota");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 999 output tokens"), "{message}");
    assert!(seen.lock().unwrap().is_empty());
}

fn sse(body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A stream that carries usage only when asked to, as OpenAI's does.
fn streaming(req: &serde_json::Value) -> Response<Full<Bytes>> {
    let with_usage = req["stream_options"]["include_usage"] == true;
    let mut out = String::from("data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]");
    out.push_str(if with_usage {
        ",\"usage\":null}\n\n"
    } else {
        "}\n\n"
    });
    if with_usage {
        out.push_str(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7}}\n\n",
        );
    }
    out.push_str("data: [DONE]\n\n");
    sse(&out)
}

#[tokio::test]
async fn include_usage_false_still_settles_from_real_usage_and_the_client_sees_no_usage_chunk() {
    let s = stack(|k| k.limits.budgets.push(day_budget(1_000_000_000)));
    let (seen, up) = upstream(streaming);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    for options in [r#","stream_options":{"include_usage":false}"#, ""] {
        let before = s.spent();
        let body = format!(
            r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":50,"stream":true{options}}}"#
        );
        let (status, _, text) = call!(svc, s.post("/v1/chat/completions", &body));
        assert_eq!(status, StatusCode::OK);
        let forwarded: serde_json::Value =
            serde_json::from_slice(seen.lock().unwrap().last().unwrap()).unwrap();
        assert_eq!(forwarded["stream_options"]["include_usage"], true);
        let text = std::str::from_utf8(&text).unwrap();
        assert!(!text.contains("completion_tokens"), "{text}");
        assert!(text.contains("[DONE]") && text.contains("Hi"));
        // Settled at the 3 + 7 tokens reported, not the 50-token reservation.
        assert_eq!(s.spent() - before, 3 * 150 + 7 * 600);
        assert_eq!(s.last_event().usage_source, Some(UsageSource::Reported));
    }
    // A client that asks for usage gets the chunk.
    let body = format!(
        r#"{{"model":"gpt-4o-mini",{MESSAGES},"stream":true,"stream_options":{{"include_usage":true}}}}"#
    );
    let (_, _, text) = call!(svc, s.post("/v1/chat/completions", &body));
    assert!(
        std::str::from_utf8(&text)
            .unwrap()
            .contains("\"completion_tokens\":7")
    );
}

#[tokio::test]
async fn an_upstream_over_report_is_charged_and_flagged() {
    let budget = 1_000_000;
    let s = stack(|k| k.limits.budgets.push(day_budget(budget)));
    let (_, up) =
        upstream(|_| json(r#"{"usage":{"prompt_tokens":1,"completion_tokens":1000000}}"#.into()));
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10}}"#);
    let (status, _, _) = call!(svc, s.post("/v1/chat/completions", &body));
    assert_eq!(status, StatusCode::OK);
    // Charged as reported, past the budget.
    assert_eq!(s.spent(), 150 + 1_000_000 * 600);
    let event = s.last_event();
    assert!(event.over_reservation);
    assert_eq!(event.usage_source, Some(UsageSource::Reported));
    // The budget reflects it at once.
    let (status, _, body) = call!(svc, s.post("/v1/chat/completions", &body));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refusal_code(&body), "insufficient_quota");
    // An honest answer is not flagged.
    let s = stack(|k| k.limits.budgets.push(day_budget(budget)));
    let (_, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10}}"#);
    call!(svc, s.post("/v1/chat/completions", &body));
    assert!(!s.last_event().over_reservation);
}

#[tokio::test]
async fn listing_models_never_touches_a_counter_nor_needs_a_price() {
    // An overall budget and a token rate; no price for anything the listing could name.
    let s = stack(|k| {
        k.limits.budgets.push(day_budget(1_000));
        k.limits.tokens_per_minute = NonZeroU64::new(100);
    });
    let (_, up) = upstream(|_| json(r#"{"object":"list","data":[]}"#.into()));
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    for _ in 0..50 {
        let (status, _, body) = call!(svc, s.get("/v1/models"));
        assert_eq!(status, StatusCode::OK, "{body:?}");
        let (status, _, _) = call!(svc, s.get("/v1/files/file-1"));
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(s.tpm_used(), 0);
    assert_eq!(s.spent(), 0);
}

#[tokio::test]
async fn a_model_named_in_the_query_and_the_body_must_agree() {
    let s =
        stack(|k| k.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]));
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":5}}"#);
    let (status, _, text) = call!(svc, s.post("/v1/chat/completions?model=gpt-4o", &body));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refusal_code(&text), "ambiguous_model");
    let (status, _, _) = call!(svc, s.post("/v1/chat/completions?model=gpt-4o-mini", &body));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_400() {
    let s = stack(|_| {});
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let mut req = s.post("/v1/chat/completions", "");
    *req.body_mut() = Full::new(Bytes::from_static(
        b"{\"model\":\"gpt-4o-mini\",\"x\":\"\xff\"}",
    ));
    let (status, _, text) = call!(svc, req);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refusal_code(&text), "invalid_encoding");
    assert!(seen.lock().unwrap().is_empty());
}

/// 1,000 concurrent requests of every shape on a budget for exactly `fits` of them at their
/// worst case: exactly `fits` are admitted and spend never passes the budget.
#[test]
fn a_thousand_concurrent_requests_of_every_shape_never_overspend() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // (content type, body, worst-case output tokens, path)
    let shapes: [(&str, String, u64); 4] = [
        (
            "application/json",
            format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10,"n":3}}"#),
            30,
        ),
        (
            "application/json",
            format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"stream":true,"max_tokens":20}}"#),
            20,
        ),
        (
            "application/vnd.example+json",
            format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":25}}"#),
            25,
        ),
        (
            "application/json",
            format!(r#"{{"model":"gpt-4o-mini",{MESSAGES}}}"#),
            4096,
        ),
    ];
    for (ct, body, output) in shapes {
        let fits = 37u64;
        // The prompt's worst case, measured by one request alone.
        let probe = stack(|k| k.limits.tokens_per_minute = NonZeroU64::new(1 << 30));
        let prompt = rt.block_on(async {
            let (_, up) =
                upstream(|_| json(r#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#.into()));
            let svc = ServiceBuilder::new().layer(probe.layer.clone()).service(up);
            let mut req = probe.post("/v1/chat/completions", &body);
            req.headers_mut()
                .insert("content-type", ct.parse().unwrap());
            let (_, h, _) = call!(svc, req);
            (1u64 << 30)
                - h["x-ratelimit-remaining-tokens"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                - output
        });
        let worst = prompt * 150 + output * 600;
        let budget = worst * fits + worst / 2;
        let s = stack(|k| k.limits.budgets.push(day_budget(budget)));
        let admitted = rt.block_on(async {
            // The most an upstream may do: the whole prompt and every output token allowed.
            let (_, up) = upstream(move |req| {
                let used = all_allowed(req);
                let usage = format!(r#"{{"prompt_tokens":{prompt},"completion_tokens":{used}}}"#);
                if req["stream"] == true {
                    sse(&format!(
                        "data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
                    ))
                } else {
                    json(format!(r#"{{"usage":{usage}}}"#))
                }
            });
            let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
            let tasks: Vec<_> = (0..1000)
                .map(|_| {
                    let svc = svc.clone();
                    let mut req = s.post("/v1/chat/completions", &body);
                    req.headers_mut()
                        .insert("content-type", ct.parse().unwrap());
                    tokio::spawn(async move {
                        let res = svc.oneshot(req).await.unwrap();
                        let ok = res.status() == StatusCode::OK;
                        res.into_body().collect().await.unwrap();
                        ok
                    })
                })
                .collect();
            let mut n = 0u64;
            for t in tasks {
                n += u64::from(t.await.unwrap());
            }
            n
        });
        assert!(
            s.spent() <= budget,
            "{ct} {body}: spent {} of {budget}",
            s.spent()
        );
        if output == 4096 {
            // No cap named: each is given a cap that fits, so more get through, each bounded.
            assert!(admitted >= fits, "{body}: {admitted}");
        } else {
            assert_eq!(admitted, fits, "{ct} {body}");
        }
    }
}

#[tokio::test]
async fn grpc_framing_on_a_json_route_is_refused_before_any_reservation() {
    let s = stack(|k| k.limits.budgets.push(day_budget(1_000_000)));
    let (seen, up) = upstream(honest);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = format!(r#"{{"model":"gpt-4o-mini",{MESSAGES},"max_tokens":10}}"#);
    let mut req = s.post("/v1/chat/completions", &body);
    req.headers_mut()
        .insert("content-type", "application/grpc+json".parse().unwrap());
    let res = svc.clone().oneshot(req).await.unwrap();
    let denial = res.extensions().get::<keygate_core::Denial>().unwrap();
    assert_eq!(denial.code(), "unsupported_media_type");
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(s.spent(), 0);
}

#[tokio::test]
async fn the_prompt_is_counted_with_the_models_tokenizer_or_bounded_by_its_bytes() {
    let s = stack(|k| k.limits.tokens_per_minute = NonZeroU64::new(1_000_000));
    let (_, up) =
        upstream(|_| json(r#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#.into()));
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let text = "Counting the text the model sees, not the JSON around it. ".repeat(20);
    let body = |model: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"{text}"}}],"max_tokens":1}}"#
        )
    };
    let reserved = |h: &http::HeaderMap| -> u64 {
        let left: u64 = h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        1_000_000 - left - 1
    };
    let (_, h, _) = call!(svc, s.post("/v1/chat/completions", &body("gpt-4o-mini")));
    let gpt = reserved(&h);
    let counted = bpe_like_count(&text);
    // The text's own tokens, the three short keys and role, and the framing.
    assert!(
        gpt >= counted && gpt <= counted + 4 + 8,
        "{gpt} vs {counted}"
    );
    s.clock.advance(std::time::Duration::from_secs(120));
    let (_, h, _) = call!(svc, s.post("/v1/chat/completions", &body("llama-3-70b")));
    let other = reserved(&h);
    // No tokenizer for it: a token a byte of text.
    assert_eq!(
        other,
        (text.len() + "role".len() + "user".len() + "content".len()) as u64 + 8
    );
    assert!(gpt * 3 < other);
}

/// The tokens of `text` for gpt-4o-mini, by the tokenizer the scope layer uses.
fn bpe_like_count(text: &str) -> u64 {
    use keygate_core::facts::TokenCounter;
    keygate_scope::OpenAiTokenizer.count("gpt-4o-mini", text)
}
