//! Images through the whole stack: `n` × the price of one image at the requested size and
//! quality is reserved, an unpriced size is refused under a budget, the settlement is the
//! images returned; and batch input files larger than the body limit are refused, never
//! forwarded unread.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{Budget, KeyRecord, ModelPattern, ModelRules, Money, Period, UsageSource};
use keygate_limit::{ImagePrices, PriceTable};
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::bounded_tests::{Stack, stack_with};

fn dollars(s: &str) -> Money {
    Money::parse(s).unwrap()
}

/// OpenAI's list prices: dall-e-2 by size; dall-e-3 by size and quality.
fn prices() -> PriceTable {
    let dalle2 = [
        ("256x256", "0.016"),
        ("512x512", "0.018"),
        ("1024x1024", "0.02"),
    ];
    let dalle3 = [
        ("1024x1024", "0.04"),
        ("1024x1024/hd", "0.08"),
        ("1792x1024", "0.08"),
        ("1792x1024/hd", "0.12"),
    ];
    let table = |entries: &[(&str, &str)]| {
        entries.iter().fold(ImagePrices::new(), |t, (key, price)| {
            t.with_price(key, dollars(price)).unwrap()
        })
    };
    PriceTable::new()
        .with_image_prices("dall-e-2", table(&dalle2))
        .unwrap()
        .with_image_prices("dall-e-3", table(&dalle3))
        .unwrap()
}

fn stack(body_limit: usize, edit: impl FnOnce(&mut KeyRecord)) -> Stack {
    stack_with(prices(), Some(body_limit), edit)
}

fn budget(amount: Money) -> impl FnOnce(&mut KeyRecord) {
    move |k| {
        k.limits.budgets.push(Budget {
            amount,
            period: Period::Day,
            model: None,
        })
    }
}

impl Stack {
    fn request(&self, path: &str, content_type: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
        Request::post(path)
            .header("authorization", format!("Bearer {}", self.secret.expose()))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    fn generate(&self, body: &str) -> Request<Full<Bytes>> {
        self.request(
            "/v1/images/generations",
            "application/json",
            body.as_bytes().to_vec(),
        )
    }
}

type Seen = Arc<Mutex<Vec<Bytes>>>;

/// What the stack hands its inner service.
type Forwarded = Request<keygate_limit::RequestBody<Full<Bytes>>>;

/// An images upstream that records what it was sent and makes `made(n)` images for a
/// request asking for `n` (read from a JSON body or a form; 1 if neither says).
fn upstream(
    made: impl Fn(u64) -> u64 + Clone + Send + Sync + 'static,
) -> (
    Seen,
    impl Service<Forwarded, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
) {
    let seen = Seen::default();
    let log = seen.clone();
    let svc = tower::service_fn(move |req: Forwarded| {
        let (log, made) = (log.clone(), made.clone());
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["n"].as_u64())
                .or_else(|| form_n(&body))
                .unwrap_or(1);
            log.lock().unwrap().push(body);
            let data = vec![r#"{"url":"https://img.example/a.png"}"#; made(n) as usize];
            let json = format!(r#"{{"created":1,"data":[{}]}}"#, data.join(","));
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(json)))
                    .unwrap(),
            )
        }
    });
    (seen, svc)
}

/// The `n` field of a form (as `form` writes them).
fn form_n(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let at = text.find("name=\"n\"\r\n\r\n")? + "name=\"n\"\r\n\r\n".len();
    text[at..].split("\r\n").next()?.parse().ok()
}

fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = String::from(
        "--B0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNG\r\n",
    );
    for (name, value) in fields {
        body.push_str(&format!(
            "--B0\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--B0--\r\n");
    body.into_bytes()
}

macro_rules! call {
    ($svc:expr, $req:expr) => {{
        let res = $svc.clone().oneshot($req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (status, v)
    }};
}

#[tokio::test]
async fn a_budget_for_three_images_refuses_four_and_admits_three() {
    // Three standard 1024x1024 dall-e-3 images, and half a cent.
    let s = stack(1 << 20, budget(dollars("0.125")));
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let body = |n: u32| format!(r#"{{"model":"dall-e-3","prompt":"a lighthouse","n":{n}}}"#);
    let (status, v) = call!(svc, s.generate(&body(4)));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["error"]["code"], "insufficient_quota");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 3 images"), "{message}");
    assert!(seen.lock().unwrap().is_empty());
    let (status, _) = call!(svc, s.generate(&body(3)));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.spent(), dollars("0.12").as_nanos());
    // Forwarded as sent: nothing to cap on an image request.
    let forwarded = seen.lock().unwrap()[0].clone();
    assert_eq!(forwarded, body(3).as_bytes());
    let event = s.last_event();
    assert_eq!(event.cost, Some(dollars("0.12")));
    assert_eq!(event.usage_source, Some(UsageSource::Reported));
    // Half a cent buys no image.
    let (status, _) = call!(svc, s.generate(&body(1)));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn hd_and_larger_sizes_cost_their_own_price_and_the_default_model_is_priced() {
    let s = stack(1 << 20, budget(Money::from_dollars(10)));
    let (_, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let mut total = 0;
    for (body, cost) in [
        (
            r#"{"model":"dall-e-3","prompt":"x","n":2,"quality":"hd"}"#,
            "0.16",
        ),
        (
            r#"{"model":"dall-e-3","prompt":"x","n":2,"quality":"standard"}"#,
            "0.08",
        ),
        (
            r#"{"model":"dall-e-3","prompt":"x","size":"1792x1024","quality":"hd"}"#,
            "0.12",
        ),
        (
            r#"{"model":"dall-e-3","prompt":"x","size":"1792x1024"}"#,
            "0.08",
        ),
        // No model: dall-e-2, the API's default, at its default size.
        (r#"{"prompt":"x"}"#, "0.02"),
        (r#"{"prompt":"x","size":"256x256","n":3}"#, "0.048"),
    ] {
        let (status, v) = call!(svc, s.generate(body));
        assert_eq!(status, StatusCode::OK, "{body}: {v}");
        total += dollars(cost).as_nanos();
        assert_eq!(s.spent(), total, "{body}");
    }
}

#[tokio::test]
async fn an_image_size_without_a_price_is_403_for_a_key_with_a_budget() {
    let s = stack(1 << 20, budget(Money::from_dollars(10)));
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    // dall-e-3 makes no 256x256 images, and none is priced.
    let body = r#"{"model":"dall-e-3","prompt":"x","size":"256x256"}"#;
    let (status, v) = call!(svc, s.generate(body));
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "model_not_priced");
    assert_eq!(v["error"]["param"], "size");
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(s.spent(), 0);
    // Without a budget no price is needed.
    let free = stack(1 << 20, |_| {});
    let (_, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(free.layer.clone()).service(up);
    let (status, _) = call!(svc, free.generate(body));
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_edit_form_is_priced_by_its_n_and_size() {
    // Two 256x256 images fit; two at the default 1024x1024 do not.
    let s = stack(1 << 20, budget(dollars("0.035")));
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let edit = |fields: &[(&str, &str)]| {
        s.request(
            "/v1/images/edits",
            "multipart/form-data; boundary=B0",
            form(fields),
        )
    };
    let (status, v) = call!(svc, edit(&[("prompt", "add a hat"), ("n", "2")]));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1 images")
    );
    let (status, v) = call!(
        svc,
        edit(&[("prompt", "add a hat"), ("n", "2"), ("size", "256x256")])
    );
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(s.spent(), dollars("0.032").as_nanos());
    // The form went upstream as it was sent.
    assert_eq!(
        seen.lock().unwrap()[0],
        form(&[("prompt", "add a hat"), ("n", "2"), ("size", "256x256")])
    );
    // A form's n the upstream might read otherwise is refused.
    let (status, v) = call!(svc, edit(&[("n", "2 ")]));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "n");
}

#[tokio::test]
async fn settled_at_the_images_returned_and_more_than_reserved_is_charged_and_flagged() {
    let s = stack(1 << 20, budget(Money::from_dollars(10)));
    let body = r#"{"model":"dall-e-3","prompt":"x","n":3}"#;
    // One of three came back: one is charged.
    let (_, up) = upstream(|_| 1);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let (status, _) = call!(svc, s.generate(body));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.spent(), dollars("0.04").as_nanos());
    assert!(!s.last_event().over_reservation);
    // Five for three: five are charged, and the record says so.
    let (_, up) = upstream(|_| 5);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    call!(svc, s.generate(body));
    assert_eq!(s.spent(), dollars("0.24").as_nanos());
    let event = s.last_event();
    assert!(event.over_reservation);
    assert_eq!(event.cost, Some(dollars("0.2")));
}

fn batch_upload(s: &Stack, file: &str) -> Request<Full<Bytes>> {
    let body = format!(
        "--B0\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{file}\r\n--B0--\r\n"
    );
    let len = body.len();
    let mut req = s.request(
        "/v1/files",
        "multipart/form-data; boundary=B0",
        body.into_bytes(),
    );
    req.headers_mut()
        .insert("content-length", len.to_string().parse().unwrap());
    req
}

#[tokio::test]
async fn a_batch_file_over_the_body_limit_is_413_and_never_reaches_the_upstream() {
    let rules = |k: &mut KeyRecord| {
        k.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]);
    };
    let line = |model: &str| {
        format!(
            r#"{{"custom_id":"r","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#
        )
    };
    // Allowed lines up to past the limit, then one the key may not run.
    let file = format!(
        "{}{}\n",
        format!("{}\n", line("gpt-4o-mini")).repeat(30),
        line("gpt-4o")
    );
    assert!(file.len() > 2048);
    let s = stack(2048, rules);
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(s.layer.clone()).service(up);
    let (status, v) = call!(svc, batch_upload(&s, &file));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "request_too_large");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("keys with model rules can upload files of up to 2048 bytes"),
        "{message}"
    );
    assert!(seen.lock().unwrap().is_empty(), "forwarded unverified");
    assert_eq!(s.last_event().status, Some(413));
    // A limit that holds the file reads it whole, and its last line is refused.
    let roomy = stack(1 << 20, rules);
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(roomy.layer.clone()).service(up);
    let (status, v) = call!(svc, batch_upload(&roomy, &file));
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "model_not_allowed");
    assert!(seen.lock().unwrap().is_empty());
    // A key without model rules uploads it, unread, whatever its size.
    let free = stack(2048, |_| {});
    let (seen, up) = upstream(|n| n);
    let svc = ServiceBuilder::new().layer(free.layer.clone()).service(up);
    let (status, _) = call!(svc, batch_upload(&free, &file));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 1);
}
