//! Images priced per image: `n` × the price of their size and quality reserved, settled at
//! the images returned (or the token usage reported), refused when unpriced under a budget.

use std::convert::Infallible;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::facts::scan_json;
use keygate_core::{
    Access, Budget, Denial, EndpointGroup, EndpointMatch, Generation, ManualClock, Money, Period,
    Principal, Protocol, RequestFacts, RequestedModel, Timestamp, UsageMeter, UsageSource,
};
use tower::{ServiceBuilder, ServiceExt};

use super::*;
use crate::backend::Window;
use crate::body::RequestBody;
use crate::price::{ImagePrices, Price, PriceTable};
use crate::test_support::principal_with;

fn dollars(s: &str) -> Money {
    Money::parse(s).unwrap()
}

/// dall-e-3 at $0.04 (1024x1024), $0.08 (1024x1024 hd); dall-e-2 at $0.016 (256x256) and
/// $0.02 (1024x1024, the default size); gpt-image-1 per token and per image.
fn prices() -> PriceTable {
    PriceTable::new()
        .with_image_prices(
            "dall-e-3",
            ImagePrices::new()
                .with_price("1024x1024", dollars("0.04"))
                .unwrap()
                .with_price("1024x1024/hd", dollars("0.08"))
                .unwrap(),
        )
        .unwrap()
        .with_image_prices(
            "dall-e-2",
            ImagePrices::new()
                .with_price("256x256", dollars("0.016"))
                .unwrap()
                .with_price("1024x1024", dollars("0.02"))
                .unwrap(),
        )
        .unwrap()
        .with_image_prices(
            "gpt-image-1",
            ImagePrices::new()
                .with_price("*", dollars("0.25"))
                .unwrap()
                .with_default_size("auto")
                .with_default_quality("auto"),
        )
        .unwrap()
        .with_price(
            "gpt-image-1",
            Price::per_million(Money::from_dollars(5), Money::from_dollars(40)),
        )
        .unwrap()
}

fn start() -> Timestamp {
    Timestamp::parse_rfc3339("2026-03-31T12:00:00Z").unwrap()
}

fn layer(manual: &ManualClock) -> TokenLimitLayer {
    TokenLimitLayer::default()
        .with_clock(manual.clock())
        .with_prices(prices())
}

fn day_budget(amount: Money) -> Budget {
    Budget {
        amount,
        period: Period::Day,
        model: None,
    }
}

fn spent(layer: &TokenLimitLayer, now: Timestamp) -> u64 {
    let (start, end) = Period::Day.window(now);
    layer
        .backend()
        .used(
            "key\u{1f}key_a\u{1f}budget\u{1f}day\u{1f}*",
            Window::Fixed { start, end },
            u64::MAX,
            now,
        )
        .unwrap_or(0)
}

fn tpm_used(layer: &TokenLimitLayer, now: Timestamp) -> u64 {
    let window = Window::Rate {
        per: Duration::from_secs(60),
    };
    layer
        .backend()
        .used("key\u{1f}key_a\u{1f}tpm", window, 1 << 40, now)
        .unwrap_or(0)
}

fn images_route(path: &str) -> EndpointMatch {
    EndpointMatch {
        group: EndpointGroup::new("images"),
        access: Access::Write,
        route: Arc::from(path),
    }
}

/// A JSON image generation request, with the facts the scope layer would decide for it
/// (`dall-e-2` when it names no model).
fn generation(p: &Principal, meter: &UsageMeter, body: &str) -> Request<Full<Bytes>> {
    let fields = scan_json(body.as_bytes()).unwrap();
    let mut facts = RequestFacts::new(images_route("/v1/images/generations"), Generation::Images);
    facts.absorb_json(&fields);
    facts.model = Some(RequestedModel::new(
        fields.model.as_deref().unwrap_or("dall-e-2"),
    ));
    let mut r = Request::post("/v1/images/generations")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    r.extensions_mut().insert(facts);
    r.extensions_mut().insert(p.clone());
    r.extensions_mut().insert(meter.clone());
    r
}

fn images_json(count: usize, usage: &str) -> Response<Full<Bytes>> {
    let data = vec![r#"{"url":"https://img.example/1.png"}"#; count].join(",");
    Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"created":1,"data":[{data}]{usage}}}"#
        ))))
        .unwrap()
}

/// An upstream that makes as many images as asked (`n`, default 1).
async fn makes_n(
    r: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Ok(images_json(v["n"].as_u64().unwrap_or(1) as usize, ""))
}

async fn call<S>(svc: &S, req: Request<Full<Bytes>>) -> (StatusCode, Option<Denial>, Bytes)
where
    S: tower_service::Service<
            Request<Full<Bytes>>,
            Response = Response<keygate_core::ResponseBody<crate::TokenBody<Full<Bytes>>>>,
            Error = Infallible,
        > + Clone,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let denial = res.extensions().get::<Denial>().cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, denial, body)
}

#[tokio::test]
async fn n_images_reserve_n_times_the_price_and_a_budget_admits_only_what_it_fits() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(makes_n);
    // Room for three standard 1024x1024 dall-e-3 images, not four.
    let p = principal_with(|k, _| k.budgets.push(day_budget(dollars("0.13"))));
    let meter = UsageMeter::new();
    let body = |n: u32| format!(r#"{{"model":"dall-e-3","prompt":"a cat","n":{n}}}"#);
    let (status, denial, _) = call(&svc, generation(&p, &meter, &body(4))).await;
    let denial = denial.unwrap();
    assert_eq!(
        (status, denial.code()),
        (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota")
    );
    assert!(
        denial.message().contains("at most 3 images"),
        "{}",
        denial.message()
    );
    assert_eq!(spent(&layer, manual.now()), 0);
    let (status, _, _) = call(&svc, generation(&p, &meter, &body(3))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spent(&layer, manual.now()), dollars("0.12").as_nanos());
    assert_eq!(meter.cost(), Some(dollars("0.12")));
    assert_eq!(meter.source(), Some(UsageSource::Reported));
    assert!(!meter.over_reservation());
    // What is left ($0.01) pays for no image.
    let (status, _, _) = call(&svc, generation(&p, &meter, &body(1))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn hd_costs_its_own_price_and_unnamed_size_and_quality_are_the_defaults() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    // The reservation is what is spent while the upstream has not answered.
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |_r: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"not json"))))
        },
    );
    let p = principal_with(|k, _| k.budgets.push(day_budget(Money::from_dollars(10))));
    let meter = UsageMeter::new();
    let mut total = 0;
    for (body, price) in [
        (
            r#"{"model":"dall-e-3","prompt":"x","quality":"hd"}"#,
            "0.08",
        ),
        (
            r#"{"model":"dall-e-3","prompt":"x","quality":"standard","size":"1024x1024"}"#,
            "0.04",
        ),
        (r#"{"model":"dall-e-3","prompt":"x"}"#, "0.04"),
        (r#"{"prompt":"x","n":2}"#, "0.04"),
        (r#"{"prompt":"x","size":"256x256"}"#, "0.016"),
        (r#"{"model":"gpt-image-1","prompt":"x"}"#, "0.25"),
    ] {
        let (status, _, _) = call(&svc, generation(&p, &meter, body)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // An answer that says nothing settles at the reservation.
        total += dollars(price).as_nanos();
        assert_eq!(spent(&layer, manual.now()), total, "{body}");
        assert_eq!(meter.source(), Some(UsageSource::Estimated));
    }
}

#[tokio::test]
async fn an_image_size_without_a_price_is_403_under_a_budget_unless_counted_as_tokens_only() {
    let manual = ManualClock::new(start());
    let svc = |layer: &TokenLimitLayer| {
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(makes_n)
    };
    let p = principal_with(|k, _| k.budgets.push(day_budget(Money::from_dollars(10))));
    let meter = UsageMeter::new();
    let unpriced = r#"{"model":"dall-e-3","prompt":"x","size":"1792x1024","quality":"hd"}"#;
    let deny = layer(&manual);
    let (status, denial, _) = call(&svc(&deny), generation(&p, &meter, unpriced)).await;
    let denial = denial.unwrap();
    assert_eq!(
        (status, denial.code(), denial.param()),
        (StatusCode::FORBIDDEN, "model_not_priced", Some("size"))
    );
    let counted = layer(&manual).with_unpriced(Unpriced::CountTokensOnly);
    let (status, _, _) = call(&svc(&counted), generation(&p, &meter, unpriced)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spent(&counted, manual.now()), 0);
    // A key without a budget needs no price.
    let free = principal_with(|k, _| k.tokens_per_minute = NonZeroU64::new(100));
    let (status, _, _) = call(&svc(&deny), generation(&free, &meter, unpriced)).await;
    assert_eq!(status, StatusCode::OK);
}

/// A request, its response, the cost and tokens settled, the source, whether flagged.
type Case = (
    &'static str,
    Response<Full<Bytes>>,
    Money,
    u64,
    UsageSource,
    bool,
);

#[tokio::test]
async fn settled_at_the_images_returned_or_the_token_usage_reported_and_over_reports_flagged() {
    let manual = ManualClock::new(start());
    let p = principal_with(|k, _| {
        k.budgets.push(day_budget(Money::from_dollars(10)));
        k.tokens_per_minute = NonZeroU64::new(1_000_000);
    });
    let usage = r#","usage":{"input_tokens":50,"output_tokens":4160,"total_tokens":4210}"#;
    let cases: [Case; 5] = [
        // Fewer images than asked: only those.
        (
            r#"{"model":"dall-e-3","prompt":"x","n":4}"#,
            images_json(2, ""),
            dollars("0.08"),
            0,
            UsageSource::Reported,
            false,
        ),
        // More than asked: charged, and flagged.
        (
            r#"{"model":"dall-e-3","prompt":"x","n":1}"#,
            images_json(3, ""),
            dollars("0.12"),
            0,
            UsageSource::Reported,
            true,
        ),
        // gpt-image-1 reports its tokens: at its token price ($5/$40 per million), and they
        // count against the token rate (not an over-reservation: images reserve no tokens).
        (
            r#"{"model":"gpt-image-1","prompt":"x"}"#,
            images_json(1, usage),
            Money::from_nanos(50 * 5_000 + 4160 * 40_000),
            4210,
            UsageSource::Reported,
            false,
        ),
        // Reported usage without a token price: the images.
        (
            r#"{"model":"dall-e-2","prompt":"x","n":3}"#,
            images_json(1, usage),
            dollars("0.02"),
            4210,
            UsageSource::Reported,
            false,
        ),
        // A body that is not an images response: the reservation.
        (
            r#"{"model":"dall-e-2","prompt":"x","n":3}"#,
            images_json(1, "").map(|_| Full::new(Bytes::from_static(br#"{"data":"#))),
            dollars("0.06"),
            0,
            UsageSource::Estimated,
            false,
        ),
    ];
    for (body, response, cost, tokens, source, flagged) in cases {
        let layer = layer(&manual);
        let response = Arc::new(std::sync::Mutex::new(Some(response)));
        let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
            move |_r: Request<RequestBody<Full<Bytes>>>| {
                let res = response.lock().unwrap().take().unwrap();
                async move { Ok::<_, Infallible>(res) }
            },
        );
        let meter = UsageMeter::new();
        let (status, _, _) = call(&svc, generation(&p, &meter, body)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(spent(&layer, manual.now()), cost.as_nanos(), "{body}");
        assert_eq!(meter.cost(), Some(cost), "{body}");
        assert_eq!(tpm_used(&layer, manual.now()), tokens, "{body}");
        assert_eq!(meter.source(), Some(source), "{body}");
        assert_eq!(meter.over_reservation(), flagged, "{body}");
    }
}

#[tokio::test]
async fn an_image_form_reserves_its_n_at_its_size_and_settles_at_the_images_returned() {
    let manual = ManualClock::new(start());
    let layer = layer(&manual);
    let p = principal_with(|k, _| k.budgets.push(day_budget(dollars("0.05"))));
    let form = |n: u64, size: Option<&str>| {
        let mut facts = RequestFacts::new(images_route("/v1/images/edits"), Generation::Images);
        facts.protocol = Protocol::Multipart;
        facts.model = Some(RequestedModel::new("dall-e-2"));
        facts.choices = n;
        facts.image_size = size.map(Arc::from);
        let mut r = Request::post("/v1/images/edits")
            .header(CONTENT_TYPE, "multipart/form-data; boundary=B")
            .body(Full::new(Bytes::from_static(b"--B--\r\n")))
            .unwrap();
        r.extensions_mut().insert(facts);
        r.extensions_mut().insert(p.clone());
        r
    };
    let reserved = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = reserved.clone();
    let (watched, now) = (layer.clone(), manual.now());
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        move |_r: Request<RequestBody<Full<Bytes>>>| {
            // What is held while the upstream works.
            log.lock().unwrap().push(spent(&watched, now));
            async { Ok::<_, Infallible>(images_json(1, "")) }
        },
    );
    // Three 1024x1024 images ($0.06) do not fit $0.05; three 256x256 ($0.048) do.
    let (status, denial, _) = call(&svc, form(3, None)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(denial.unwrap().message().contains("at most 2 images"));
    let (status, _, _) = call(&svc, form(3, Some("256x256"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(*reserved.lock().unwrap(), [dollars("0.048").as_nanos()]);
    // One came back: one is charged.
    assert_eq!(spent(&layer, manual.now()), dollars("0.016").as_nanos());
    assert_eq!(
        tpm_used(&layer, manual.now()),
        0,
        "images count no tokens unless reported"
    );
}
