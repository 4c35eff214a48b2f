use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    Alert, AlertKind, AlertSink, ClientIp, Credential, Denial, EndpointGroup, KeyDigest, KeyFormat,
    KeyId, KeyRecord, ManualClock, Money, Principal, ProjectRecord, RequestTrace, Secret, Stage,
    Timestamp, Usage, UsageMeter, deny,
};
use tower::{Service, ServiceExt, service_fn};

use super::*;
use crate::{
    ChannelSink, Completion, Decision, FanOut, JsonlSink, NoopSink, RequestEvent, TracingSink,
};

type Events = Arc<Mutex<Vec<AuditEvent>>>;

/// A sink that keeps every event, after checking that neither its JSON record nor its `Debug`
/// output holds anything shaped like a keygate secret: every test that records events scans
/// them.
fn recorder() -> (Events, impl Fn(&AuditEvent) + Send + Sync + 'static) {
    let events: Events = Default::default();
    let seen = events.clone();
    (events, move |e: &AuditEvent| {
        assert_no_secret(e);
        seen.lock().unwrap().push(e.clone())
    })
}

fn assert_no_secret(e: &AuditEvent) {
    let json = serde_json::to_string(e).unwrap();
    let debug = format!("{e:?}");
    for text in [&json, &debug] {
        assert!(
            !text.contains("sk-kg-"),
            "secret-shaped text in an event: {text}"
        );
    }
}

fn requests(events: &Events) -> Vec<RequestEvent> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_request().cloned())
        .collect()
}

fn manual() -> ManualClock {
    ManualClock::new(Timestamp::from_unix_secs(1_700_000_000))
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

fn principal(name: &str) -> Principal {
    let mut key = KeyRecord::new(
        KeyId::new("key_test"),
        "proj_test",
        KeyDigest::of("sk-kg-unused"),
        Timestamp::UNIX_EPOCH,
    );
    key.name = name.into();
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("proj_test")),
        Credential::ApiKey(Secret::Current),
    )
}

/// Plays the inner keygate layers: records who and what into the trace, as they would.
fn record_trace(req: &Request<Full<Bytes>>, name: &str, model: &str) {
    let trace = req.extensions().get::<RequestTrace>().expect("trace");
    trace.set_principal(&principal(name));
    trace.set_endpoint_group(&EndpointGroup::new("chat.completions"));
    trace.set_model(model);
    trace.set_client_ip("203.0.113.7".parse().unwrap());
}

fn ok_response() -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

async fn finish<B: Body>(response: Response<B>) -> Response<()>
where
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    body.collect().await.unwrap();
    Response::from_parts(parts, ())
}

#[tokio::test]
async fn every_denial_stage_yields_one_event_with_its_reason_and_stage() {
    let denials = [
        Denial::missing_credential(),
        Denial::invalid_credential("expired"),
        Denial::new(
            Stage::Scope,
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            "no",
        )
        .with_detail("key_rules"),
        Denial::new(Stage::Policy, StatusCode::FORBIDDEN, "policy_denied", "no"),
        Denial::new(
            Stage::RateLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow",
        )
        .with_retry_after(Duration::from_secs(1)),
        Denial::new(
            Stage::TokenLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "budget",
        ),
        Denial::unavailable(Stage::Extract, "store_unavailable"),
    ];
    for denial in denials {
        let (events, sink) = recorder();
        let d = denial.clone();
        let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
            move |req: Request<Full<Bytes>>| {
                let d = d.clone();
                async move { Ok::<_, Infallible>(deny::<Full<Bytes>>(d, req.headers())) }
            },
        ));
        let response = finish(svc.oneshot(get("/v1/chat/completions")).await.unwrap()).await;
        assert_eq!(response.status(), denial.status());
        let events = requests(&events);
        assert_eq!(events.len(), 1, "one event for {denial}");
        assert_eq!(
            events[0].decision,
            Decision::Denied {
                stage: denial.stage(),
                reason: denial.code().to_owned(),
                detail: denial.detail(),
            }
        );
        assert_eq!(events[0].status, Some(denial.status().as_u16()));
        assert_eq!(events[0].completion, Completion::Complete);
    }
}

#[tokio::test]
async fn event_carries_what_inner_layers_recorded() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            record_trace(&req, "ci bot", "gpt-4o-mini");
            ok_response()
        },
    ));
    finish(svc.oneshot(get("/v1/chat/completions?x=1")).await.unwrap()).await;
    let e = &requests(&events)[0];
    assert_eq!(e.key_id.as_ref().map(KeyId::as_str), Some("key_test"));
    assert_eq!(e.key_name.as_deref(), Some("ci bot"));
    assert_eq!(e.project.as_deref(), Some("proj_test"));
    assert_eq!(
        e.endpoint_group.as_ref().map(|g| g.as_str()),
        Some("chat.completions")
    );
    assert_eq!(e.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(e.client_ip, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(e.path, "/v1/chat/completions");
    assert_eq!(e.method, http::Method::GET);
    assert_eq!(e.decision, Decision::Allowed);
}

#[tokio::test]
async fn client_ip_already_in_extensions_is_used() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |_req: Request<Full<Bytes>>| async { ok_response() },
    ));
    let mut req = get("/");
    req.extensions_mut()
        .insert(ClientIp("192.0.2.1".parse().unwrap()));
    finish(svc.oneshot(req).await.unwrap()).await;
    assert_eq!(
        requests(&events)[0].client_ip,
        Some("192.0.2.1".parse().unwrap())
    );
}

#[tokio::test]
async fn valid_incoming_request_id_is_kept_and_returned() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            assert_eq!(req.headers()[X_REQUEST_ID], "abc-123");
            assert_eq!(
                req.extensions().get::<RequestId>().unwrap().as_str(),
                "abc-123"
            );
            ok_response()
        },
    ));
    let mut req = get("/");
    req.headers_mut()
        .insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
    let response = finish(svc.oneshot(req).await.unwrap()).await;
    assert_eq!(response.headers()[X_REQUEST_ID], "abc-123");
    assert_eq!(requests(&events)[0].request_id.as_str(), "abc-123");
}

#[tokio::test]
async fn invalid_incoming_request_id_is_replaced_everywhere() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            let header = req.headers()[X_REQUEST_ID].clone();
            let ext = req.extensions().get::<RequestId>().unwrap().clone();
            assert_eq!(&header, ext.header_value());
            ok_response()
        },
    ));
    let mut req = get("/");
    req.headers_mut()
        .insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
    let response = finish(svc.oneshot(req).await.unwrap()).await;
    let id = response.headers()[X_REQUEST_ID]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(id, "has space");
    assert_eq!(requests(&events)[0].request_id.as_str(), id);
}

#[tokio::test]
async fn incoming_request_id_is_ignored_when_not_accepted() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink)
        .with_metrics(false)
        .with_accept_request_id(false)
        .layer(service_fn(|_req: Request<Full<Bytes>>| async {
            ok_response()
        }));
    let mut req = get("/");
    req.headers_mut()
        .insert(X_REQUEST_ID, HeaderValue::from_static("chosen-by-client"));
    finish(svc.oneshot(req).await.unwrap()).await;
    assert_ne!(requests(&events)[0].request_id.as_str(), "chosen-by-client");
}

const JWT: &str =
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJrZXlfYWJjIn0.c2lnbmF0dXJlLWJ5dGVz";

/// One of each credential shape a client might send by mistake.
fn credential_shapes() -> Vec<String> {
    let key = KeyFormat::default().generate().unwrap();
    let other_prefix = KeyFormat::with_prefix("acme_").unwrap().generate().unwrap();
    vec![
        key.expose().to_owned(),
        other_prefix.expose().to_owned(),
        JWT.to_owned(),
        "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx".to_owned(),
        "corp.tok-abcdefgh12345678".to_owned(),
    ]
}

#[tokio::test]
async fn credential_shaped_request_id_is_replaced_on_request_record_and_response() {
    let (events, sink) = recorder();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let inner_seen = seen.clone();
    let svc = AuditLayer::new(sink)
        .with_metrics(false)
        .with_secret_prefixes(["corp."])
        .unwrap()
        .layer(service_fn(move |req: Request<Full<Bytes>>| {
            inner_seen
                .lock()
                .unwrap()
                .push(req.headers()[X_REQUEST_ID].clone());
            async { ok_response() }
        }));
    let shapes = credential_shapes();
    for secret in &shapes {
        let mut req = get("/");
        req.headers_mut()
            .insert(X_REQUEST_ID, HeaderValue::from_str(secret).unwrap());
        let response = finish(svc.clone().oneshot(req).await.unwrap()).await;
        let returned = response.headers()[X_REQUEST_ID].to_str().unwrap();
        assert_ne!(returned, secret);
        assert!(returned.starts_with('k'), "a generated id: {returned}");
    }
    let records = requests(&events);
    for (i, secret) in shapes.iter().enumerate() {
        assert_ne!(records[i].request_id.as_str(), secret);
        assert_ne!(seen.lock().unwrap()[i], secret.as_str(), "forwarded inward");
    }
}

#[tokio::test]
async fn ordinary_request_ids_are_still_kept() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |_req: Request<Full<Bytes>>| async { ok_response() },
    ));
    let ids = [
        "550e8400-e29b-41d4-a716-446655440000",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "req_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "task-1234",
    ];
    for id in ids {
        let mut req = get("/");
        req.headers_mut()
            .insert(X_REQUEST_ID, HeaderValue::from_static(id));
        finish(svc.clone().oneshot(req).await.unwrap()).await;
    }
    let kept: Vec<_> = requests(&events)
        .iter()
        .map(|r| r.request_id.as_str().to_owned())
        .collect();
    assert_eq!(kept, ids);
}

#[tokio::test]
async fn credential_shaped_path_segments_and_model_are_redacted_in_the_record() {
    let (events, sink) = recorder();
    let shapes = credential_shapes();
    let model = shapes[0].clone();
    let svc = AuditLayer::new(sink)
        .with_metrics(false)
        .with_secret_scanner(
            keygate_core::SecretScanner::new()
                .with_prefix("corp.")
                .unwrap(),
        )
        .layer(service_fn(move |req: Request<Full<Bytes>>| {
            record_trace(&req, "k", &model);
            async { ok_response() }
        }));
    for secret in &shapes {
        let req = get(&format!("/v1/files/{secret}/content?after={secret}"));
        finish(svc.clone().oneshot(req).await.unwrap()).await;
    }
    for (record, secret) in requests(&events).iter().zip(&shapes) {
        assert_eq!(record.path, "/v1/files/[redacted]/content");
        assert_eq!(record.model.as_deref(), Some("[redacted]"));
        let json = serde_json::to_string(record).unwrap();
        assert!(!json.contains(secret.as_str()), "{json}");
    }
}

#[tokio::test]
async fn clean_path_and_model_are_recorded_as_sent() {
    let (events, sink) = recorder();
    let svc =
        AuditLayer::new(sink)
            .with_metrics(false)
            .layer(service_fn(|req: Request<Full<Bytes>>| {
                record_trace(&req, "k", "ft:gpt-4o-mini:acme:task-xyz:abc123");
                async { ok_response() }
            }));
    let path = "/v1/files/file-AbCdEf1234567890GhIjKl/content";
    finish(svc.oneshot(get(path)).await.unwrap()).await;
    let record = &requests(&events)[0];
    assert_eq!(record.path, path);
    assert_eq!(
        record.model.as_deref(),
        Some("ft:gpt-4o-mini:acme:task-xyz:abc123")
    );
}

/// A streamed body that reports usage into the meter like the token limit layer's wrapper:
/// at its end, or (if `on_drop`) only when dropped.
struct Streamed {
    chunks: VecDeque<Bytes>,
    meter: UsageMeter,
    usage: Usage,
    on_drop: bool,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => {
                if !self.on_drop {
                    self.meter.report_usage(self.usage);
                    self.meter.report_cost(Money::from_nanos(1234));
                }
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if self.on_drop {
            self.meter.report_usage(self.usage);
        }
    }
}

fn streaming_service(
    on_drop: bool,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Streamed>, Error = Infallible> + Clone {
    service_fn(move |req: Request<Full<Bytes>>| {
        let meter = req.extensions().get::<UsageMeter>().unwrap().clone();
        async move {
            Ok::<_, Infallible>(Response::new(Streamed {
                chunks: ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"]
                    .into_iter()
                    .map(|s: &'static str| Bytes::from_static(s.as_bytes()))
                    .collect(),
                meter,
                usage: Usage::new(12, 34),
                on_drop,
            }))
        }
    })
}

#[tokio::test]
async fn streaming_response_yields_one_event_with_usage_after_the_end() {
    let (events, sink) = recorder();
    let clock = manual();
    let mut svc = AuditLayer::new(sink)
        .with_metrics(false)
        .with_clock(clock.clock())
        .layer(streaming_service(false));
    let fut = svc.call(get("/v1/chat/completions"));
    clock.advance(Duration::from_millis(5));
    let mut response = fut.await.unwrap();
    clock.advance(Duration::from_millis(100));
    for _ in 0..3 {
        assert!(response.body_mut().frame().await.unwrap().is_ok());
        assert!(events.lock().unwrap().is_empty(), "no event before the end");
    }
    assert!(response.body_mut().frame().await.is_none());
    drop(response);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.usage, Some(Usage::new(12, 34)));
    assert_eq!(e.cost, Some(Money::from_nanos(1234)));
    assert_eq!(e.completion, Completion::Complete);
    assert_eq!(e.timestamp, Timestamp::from_unix_secs(1_700_000_000));
    assert_eq!(e.time_to_head, Some(Duration::from_millis(5)));
    assert_eq!(e.duration, Duration::from_millis(105));
}

#[tokio::test]
async fn disconnected_stream_yields_one_event_with_usage_reported_on_drop() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink)
        .with_metrics(false)
        .layer(streaming_service(true));
    let mut response = svc.oneshot(get("/v1/chat/completions")).await.unwrap();
    response.body_mut().frame().await.unwrap().unwrap();
    drop(response);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].completion, Completion::Aborted);
    assert_eq!(events[0].status, Some(200));
    // The inner body was dropped before the meter was read.
    assert_eq!(events[0].usage, Some(Usage::new(12, 34)));
}

#[tokio::test]
async fn body_dropped_after_its_last_frame_counts_as_complete() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |_req: Request<Full<Bytes>>| async { ok_response() },
    ));
    let mut response = svc.oneshot(get("/")).await.unwrap();
    response.body_mut().frame().await.unwrap().unwrap();
    drop(response);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].completion, Completion::Complete);
}

#[tokio::test]
async fn request_dropped_before_the_head_yields_one_cancelled_event() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            record_trace(&req, "n", "m");
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
        },
    ));
    let mut fut = Box::pin(svc.oneshot(get("/v1/chat/completions")));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].completion, Completion::Cancelled);
    assert_eq!(events[0].status, None);
    assert_eq!(events[0].decision, Decision::Unknown);
    assert_eq!(
        events[0].key_id.as_ref().map(KeyId::as_str),
        Some("key_test")
    );
}

#[tokio::test]
async fn inner_error_yields_one_failed_event() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |_req: Request<Full<Bytes>>| async { Err::<Response<Full<Bytes>>, _>("boom") },
    ));
    assert!(svc.oneshot(get("/")).await.is_err());
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].completion, Completion::Failed);
    assert_eq!(events[0].status, None);
    assert_eq!(events[0].decision, Decision::Unknown);
}

fn counting_service(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(move |_req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { ok_response() }
    })
}

#[tokio::test]
async fn fail_closed_refuses_with_503_while_the_sink_is_full_and_recovers() {
    let (sink, mut rx) = ChannelSink::bounded(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .with_backpressure(Backpressure::FailClosed)
        .layer(counting_service(calls.clone()));

    // The first request's event fills the channel.
    let r = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!sink.can_accept());

    let r = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let denial = r.extensions().get::<Denial>().unwrap().clone();
    assert_eq!(denial.stage(), Stage::Audit);
    assert!(r.headers().contains_key(X_REQUEST_ID));
    finish(r).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the refused request went no further"
    );
    assert_eq!(
        sink.stats().dropped,
        1,
        "its event could not be queued either"
    );

    // The consumer catches up: requests are served again.
    let first = rx.try_recv().unwrap();
    assert!(first.as_request().unwrap().decision.is_allowed());
    let r = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn drop_mode_serves_requests_and_counts_dropped_events() {
    let (sink, _rx) = ChannelSink::bounded(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .layer(counting_service(calls.clone()));
    for _ in 0..5 {
        let r = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let stats = sink.stats();
    assert_eq!((stats.accepted, stats.dropped), (1, 4));
}

#[tokio::test]
async fn grpc_denial_is_recorded_with_its_reason_and_stage() {
    // A gRPC refusal is HTTP 200 with a `grpc-status` trailer: the decision comes from the
    // `Denial` extension, not from the status.
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            let d = Denial::new(
                Stage::Scope,
                StatusCode::FORBIDDEN,
                "endpoint_not_allowed",
                "no",
            );
            Ok::<_, Infallible>(deny::<Full<Bytes>>(d, req.headers()))
        },
    ));
    let mut req = get("/inference.Chat/Complete");
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let response = finish(svc.oneshot(req).await.unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].decision,
        Decision::Denied {
            stage: Stage::Scope,
            reason: "endpoint_not_allowed".into(),
            detail: None,
        }
    );
    assert_eq!(events[0].path, "/inference.Chat/Complete");
}

#[tokio::test]
async fn fail_closed_refusal_is_one_audit_stage_denial_for_sinks_that_accept() {
    let (full, _rx) = ChannelSink::bounded(1);
    full.record_owned(AuditEvent::Alert(Alert {
        at: Timestamp::UNIX_EPOCH,
        kind: AlertKind::KeySuspended,
        key_id: KeyId::new("key_fill"),
        project: "p".into(),
        reason: "fill".into(),
        message: String::new(),
    }));
    let (events, record) = recorder();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuditLayer::new(FanOut::new().with(full.clone()).with_optional(record))
        .with_metrics(false)
        .with_backpressure(Backpressure::FailClosed)
        .layer(counting_service(calls.clone()));
    let r = finish(svc.oneshot(get("/v1/models")).await.unwrap()).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].decision,
        Decision::Denied {
            stage: Stage::Audit,
            reason: "service_unavailable".into(),
            detail: Some("audit_sink_unavailable"),
        }
    );
    assert_eq!(events[0].status, Some(503));
    assert_eq!(full.stats().dropped, 1, "the full required sink counted it");
}

#[tokio::test]
async fn path_has_no_query_for_origin_absolute_and_authority_forms() {
    for (uri, method, path) in [
        (
            "/v1/models?limit=2&key=sk-kg-x",
            http::Method::GET,
            "/v1/models",
        ),
        (
            "https://api.example.com/v1/chat/completions?stream=true",
            http::Method::POST,
            "/v1/chat/completions",
        ),
        ("https://api.example.com", http::Method::GET, "/"),
        ("api.example.com:443", http::Method::CONNECT, ""),
    ] {
        let (events, sink) = recorder();
        let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
            |_req: Request<Full<Bytes>>| async { ok_response() },
        ));
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::default())
            .unwrap();
        assert_eq!(req.uri().path(), path, "{uri}");
        finish(svc.oneshot(req).await.unwrap()).await;
        assert_eq!(requests(&events)[0].path, path, "{uri}");
    }
}

#[tokio::test]
async fn generated_request_id_is_the_same_everywhere() {
    let (events, sink) = recorder();
    let seen = Arc::new(Mutex::new(None));
    let inner_seen = seen.clone();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        move |req: Request<Full<Bytes>>| {
            let header = req.headers()[X_REQUEST_ID].clone();
            let ext = req.extensions().get::<RequestId>().unwrap().clone();
            assert_eq!(&header, ext.header_value());
            *inner_seen.lock().unwrap() = Some(ext);
            async { ok_response() }
        },
    ));
    let response = finish(svc.oneshot(get("/")).await.unwrap()).await;
    let id = seen.lock().unwrap().clone().unwrap();
    assert_eq!(&response.headers()[X_REQUEST_ID], id.header_value());
    assert_eq!(requests(&events)[0].request_id, id);
    assert!(id.as_str().starts_with('k'));
}

#[test]
fn alerts_become_audit_events() {
    let (events, sink) = recorder();
    let layer = AuditLayer::new(sink).with_metrics(false);
    let alerts = layer.alert_sink();
    alerts.alert(Alert {
        at: Timestamp::from_unix_secs(5),
        kind: AlertKind::KeySuspended,
        key_id: KeyId::new("key_test"),
        project: "proj_test".into(),
        reason: "spend_spike".into(),
        message: "spent too fast".into(),
    });
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 1);
    let alert = events[0].as_alert().unwrap();
    assert_eq!(alert.reason, "spend_spike");
    let json = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(json["type"], "alert");
    assert_eq!(json["kind"], "key_suspended");
}

/// A writer that holds its first write until released, so a test can fill the queue.
struct Gate {
    open: std::sync::mpsc::Receiver<()>,
    opened: bool,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.opened {
            let _ = self.open.recv();
            self.opened = true;
        }
        self.out.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn counter(
    snapshot: &[(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
    labels: &[(&str, &str)],
) -> u64 {
    snapshot
        .iter()
        .filter(|(k, ..)| {
            k.key().name() == name
                && labels
                    .iter()
                    .all(|(lk, lv)| k.key().labels().any(|l| l.key() == *lk && l.value() == *lv))
        })
        .map(|(.., v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

#[test]
fn burst_of_100k_requests_keeps_the_queue_bounded_and_counts_drops_exactly() {
    const N: usize = 100_000;
    const CAPACITY: usize = 64;
    let (release, open) = std::sync::mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = JsonlSink::to_writer(
        Gate {
            open,
            opened: false,
            out: out.clone(),
        },
        CAPACITY,
    )
    .unwrap();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let mut svc =
            AuditLayer::new(sink.clone()).layer(service_fn(|_req: Request<Full<Bytes>>| async {
                ok_response()
            }));
        for _ in 0..N {
            let response = svc.call(get("/v1/models")).now_or_never().unwrap().unwrap();
            response
                .into_body()
                .collect()
                .now_or_never()
                .unwrap()
                .unwrap();
            assert!(sink.stats().queue_len <= CAPACITY as u64);
        }
    });
    release.send(()).unwrap();
    sink.shutdown();
    let stats = sink.stats();
    let lines = out.lock().unwrap().iter().filter(|&&b| b == b'\n').count();
    assert_eq!(stats.written as usize, lines);
    assert_eq!(stats.written + stats.dropped, N as u64);
    assert!(stats.max_queue_len <= CAPACITY as u64);
    // The writer held one event and the queue the rest; all others were dropped.
    assert!(stats.written <= CAPACITY as u64 + 1);
    let snapshot = snapshotter.snapshot().into_vec();
    assert_eq!(
        counter(
            &snapshot,
            crate::metrics::DROPPED_TOTAL,
            &[("sink", "jsonl")]
        ),
        stats.dropped
    );
    assert_eq!(
        counter(
            &snapshot,
            crate::metrics::REQUESTS_TOTAL,
            &[("decision", "allowed")]
        ),
        N as u64
    );
}

/// Runs two denied and one allowed (streamed, with usage) request through layers made by
/// `layer` inside a debugging recorder; returns the snapshot.
fn metrics_of(
    layer: impl Fn() -> AuditLayer<NoopSink>,
) -> Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    metrics_util::debugging::DebugValue,
)> {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let denying = layer().layer(service_fn(|req: Request<Full<Bytes>>| async move {
            record_trace(&req, "n", "gpt-4");
            let d = Denial::new(
                Stage::Scope,
                StatusCode::FORBIDDEN,
                "model_not_allowed",
                "no",
            );
            Ok::<_, Infallible>(deny::<Full<Bytes>>(d, req.headers()))
        }));
        let keyed = service_fn(|req: Request<Full<Bytes>>| {
            record_trace(&req, "n", "gpt-4");
            streaming_service(false).oneshot(req)
        });
        let allowing = layer().layer(keyed);
        for svc_denies in [true, true, false] {
            if svc_denies {
                let r = denying.clone().oneshot(get("/v1/chat/completions"));
                finish(r.now_or_never().unwrap().unwrap())
                    .now_or_never()
                    .unwrap();
            } else {
                let r = allowing.clone().oneshot(get("/v1/chat/completions"));
                finish(r.now_or_never().unwrap().unwrap())
                    .now_or_never()
                    .unwrap();
            }
        }
    });
    snapshotter.snapshot().into_vec()
}

#[test]
fn metrics_count_decisions_by_stage_and_reason_with_cached_handles() {
    let s = metrics_of(|| AuditLayer::new(NoopSink));
    let requests = crate::metrics::REQUESTS_TOTAL;
    assert_eq!(
        counter(
            &s,
            requests,
            &[
                ("decision", "denied"),
                ("stage", "scope"),
                ("reason", "model_not_allowed")
            ]
        ),
        2
    );
    assert_eq!(counter(&s, requests, &[("decision", "allowed")]), 1);
    assert_eq!(
        counter(&s, crate::metrics::TOKENS_TOTAL, &[("kind", "prompt")]),
        12
    );
    assert_eq!(
        counter(&s, crate::metrics::TOKENS_TOTAL, &[("kind", "completion")]),
        34
    );
    assert_eq!(counter(&s, crate::metrics::COST_TOTAL, &[]), 1234);
    let durations = s
        .iter()
        .filter(|(k, ..)| k.key().name() == crate::metrics::REQUEST_DURATION)
        .map(|(.., v)| match v {
            metrics_util::debugging::DebugValue::Histogram(v) => v.len(),
            _ => 0,
        })
        .sum::<usize>();
    assert_eq!(durations, 3);
}

#[test]
fn no_metric_has_a_key_or_project_label_by_default() {
    let s = metrics_of(|| AuditLayer::new(NoopSink));
    assert!(!s.is_empty());
    for (key, ..) in &s {
        for label in key.key().labels() {
            assert!(
                !matches!(label.key(), "key_id" | "project" | "model"),
                "{} has an unbounded label {}",
                key.key().name(),
                label.key()
            );
        }
        assert!(!key.key().name().starts_with("keygate_key_"));
    }
}

#[test]
fn per_key_metrics_appear_only_with_the_opt_in() {
    let s = metrics_of(|| AuditLayer::new(NoopSink).with_key_metrics(true));
    assert_eq!(
        counter(
            &s,
            crate::metrics::KEY_REQUESTS_TOTAL,
            &[
                ("key_id", "key_test"),
                ("project", "proj_test"),
                ("endpoint_group", "chat.completions"),
                ("decision", "denied")
            ]
        ),
        2
    );
    assert_eq!(
        counter(
            &s,
            crate::metrics::KEY_TOKENS_TOTAL,
            &[("key_id", "key_test"), ("kind", "completion")]
        ),
        34
    );
    assert_eq!(
        counter(
            &s,
            crate::metrics::KEY_COST_TOTAL,
            &[("key_id", "key_test")]
        ),
        1234
    );
    // The bounded series are there as well.
    assert_eq!(
        counter(
            &s,
            crate::metrics::REQUESTS_TOTAL,
            &[("decision", "allowed")]
        ),
        1
    );
}

#[test]
fn jsonl_rotation_loses_no_line() {
    const N: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlSink::builder(&path)
        .with_max_bytes(4096)
        .with_keep(10_000)
        .open()
        .unwrap();
    let mut svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .layer(service_fn(|_req: Request<Full<Bytes>>| async {
            ok_response()
        }));
    for i in 0..N {
        let mut req = get("/v1/models");
        req.headers_mut().insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&format!("req-{i}")).unwrap(),
        );
        let response = svc.call(req).now_or_never().unwrap().unwrap();
        response
            .into_body()
            .collect()
            .now_or_never()
            .unwrap()
            .unwrap();
        if i % 500 == 0 {
            sink.flush(); // let the writer catch up, so nothing is dropped
        }
    }
    sink.shutdown();
    assert_eq!(sink.stats().dropped, 0);
    let mut ids = std::collections::BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(text.len() <= 4096, "rotated by size");
        files += 1;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(ids.insert(v["request_id"].as_str().unwrap().to_owned()));
        }
    }
    assert!(files > 10, "rotated into {files} files");
    assert_eq!(ids.len(), N);
}

#[test]
fn jsonl_rotation_keeps_only_the_configured_number_of_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlSink::builder(&path)
        .with_max_bytes(0)
        .with_keep(2)
        .open()
        .unwrap();
    for reason in ["a", "b", "c", "d"] {
        sink.record_owned(AuditEvent::Alert(Alert {
            at: Timestamp::UNIX_EPOCH,
            kind: AlertKind::KeySuspended,
            key_id: KeyId::new("key_x"),
            project: "p".into(),
            reason: reason.into(),
            message: String::new(),
        }));
    }
    sink.shutdown();
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    assert!(read(path.clone()).contains("\"d\""));
    assert!(read(dir.path().join("audit.jsonl.1")).contains("\"c\""));
    assert!(read(dir.path().join("audit.jsonl.2")).contains("\"b\""));
    assert!(!dir.path().join("audit.jsonl.3").exists());
}

#[tokio::test]
async fn crlf_in_key_name_or_model_cannot_forge_a_jsonl_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlSink::builder(&path).open().unwrap();
    let forged =
        "x\r\n{\"type\":\"request\",\"decision\":\"allowed\",\"key_id\":\"key_admin\"}\r\n";
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .layer(service_fn(move |req: Request<Full<Bytes>>| async move {
            record_trace(&req, forged, forged);
            ok_response()
        }));
    finish(svc.oneshot(get("/")).await.unwrap()).await;
    sink.shutdown();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(!text.contains('\r'));
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["key_name"], forged);
    assert_eq!(v["model"], forged);
    assert_eq!(v["key_id"], "key_test");
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_event_or_log_line_contains_a_key_secret() {
    let secret = KeyFormat::default().generate().unwrap();
    let secret_text = secret.expose().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let jsonl = JsonlSink::builder(&path).open().unwrap();
    let (events, record) = recorder();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_max_level(tracing::Level::TRACE)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let svc = AuditLayer::new(
            FanOut::new()
                .with(jsonl.clone())
                .with(TracingSink::new())
                .with(record),
        )
        .with_metrics(false);
        let alerts = svc.alert_sink();
        let svc = svc.layer(service_fn(|req: Request<Full<Bytes>>| async move {
            record_trace(&req, "ci key \r\n level=ERROR", "gpt-4o");
            let d = Denial::new(
                Stage::RateLimit,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "slow",
            );
            Ok::<_, Infallible>(deny::<Full<Bytes>>(d, req.headers()))
        }));
        for header in [
            "authorization",
            "x-api-key",
            "api-key",
            "proxy-authorization",
        ] {
            let mut req = get("/v1/chat/completions");
            let value = if header == "authorization" {
                format!("Bearer {secret_text}")
            } else {
                secret_text.clone()
            };
            req.headers_mut()
                .insert(header, HeaderValue::from_str(&value).unwrap());
            finish(svc.clone().oneshot(req).now_or_never().unwrap().unwrap())
                .now_or_never()
                .unwrap();
        }
        alerts.alert(Alert {
            at: Timestamp::UNIX_EPOCH,
            kind: AlertKind::KeySuspended,
            key_id: KeyId::new("key_test"),
            project: "proj_test".into(),
            reason: "spend_spike".into(),
            message: "suspended".into(),
        });
    });
    jsonl.shutdown();
    let file = std::fs::read_to_string(&path).unwrap();
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let debug = format!("{:?}", events.lock().unwrap());
    assert_eq!(file.lines().count(), 5);
    assert_eq!(logs.lines().count(), 5, "one log line per event: {logs}");
    for text in [&file, &logs, &debug] {
        assert!(text.contains("key_test"), "the key is named by id");
        assert!(!text.contains(&secret_text), "secret leaked: {text}");
        assert!(!text.contains(&secret_text[6..]), "secret body leaked");
    }
    assert!(!logs.contains('\r'));
}

#[test]
fn sensitive_headers_name_every_credential_header() {
    let names = crate::sensitive_headers();
    for name in [
        "authorization",
        "x-api-key",
        "api-key",
        "proxy-authorization",
    ] {
        assert!(names.iter().any(|n| n == name), "{name}");
    }
}

#[tokio::test]
async fn works_as_an_axum_router_layer() {
    let (events, sink) = recorder();
    let app = axum::Router::new()
        .route("/v1/models", axum::routing::get(|| async { "models" }))
        .layer(AuditLayer::new(sink).with_metrics(false));
    let response = app
        .oneshot(
            Request::get("/v1/models")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key(X_REQUEST_ID));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"models");
    let events = requests(&events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].completion, Completion::Complete);
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn sensitive_headers_layer_marks_credential_headers() {
    let svc = crate::sensitive_headers_layer().layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            for name in ["authorization", "x-api-key", "api-key"] {
                assert!(req.headers()[name].is_sensitive(), "{name}");
            }
            assert!(!req.headers()["accept"].is_sensitive());
            ok_response()
        },
    ));
    let mut req = get("/");
    for name in ["authorization", "x-api-key", "api-key", "accept"] {
        req.headers_mut()
            .insert(name, HeaderValue::from_static("v"));
    }
    svc.oneshot(req).await.unwrap();
}

/// A writer that always fails as a full disk does (ENOSPC): the `/dev/full` stand-in.
struct DiskFull;

impl Write for DiskFull {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(28))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(28))
    }
}

fn request_ids(out: &Captured) -> std::collections::BTreeSet<String> {
    let bytes = out.0.lock().unwrap().clone();
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["request_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// An inner service that notes each request id it sees and then waits at the gate.
fn gated_service(
    served: Arc<Mutex<Vec<String>>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(move |req: Request<Full<Bytes>>| {
        let id = req.extensions().get::<RequestId>().unwrap().to_string();
        served.lock().unwrap().push(id);
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire().await.unwrap();
            ok_response()
        }
    })
}

#[tokio::test]
async fn fail_closed_on_a_full_disk_serves_no_request_without_a_record() {
    const CAPACITY: usize = 8;
    const BURST: usize = 50;
    let fallback = Captured::default();
    let sink = JsonlSink::writer_builder(DiskFull)
        .with_capacity(CAPACITY)
        .with_fallback(fallback.clone())
        .open()
        .unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .with_backpressure(Backpressure::FailClosed)
        .layer(gated_service(served.clone(), gate.clone()));

    // A burst far larger than the queue, all in flight at once: only as many as there are
    // places for records reach the inner service; the others are refused at once.
    let burst = futures_util::future::join_all((0..BURST).map(|_| {
        let svc = svc.clone();
        async move { finish(svc.oneshot(get("/v1/chat/completions")).await.unwrap()).await }
    }));
    let open_gate = async {
        while served.lock().unwrap().len() < CAPACITY {
            tokio::task::yield_now().await;
        }
        // Every future has been polled at least once by now: the refused ones finished.
        tokio::task::yield_now().await;
        gate.add_permits(BURST);
    };
    let (responses, ()) = tokio::join!(burst, open_gate);
    let ok = responses
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    assert_eq!(ok, CAPACITY);
    assert_eq!(served.lock().unwrap().len(), CAPACITY);
    assert!(
        responses
            .iter()
            .all(|r| matches!(r.status(), StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE))
    );

    // The writer has seen the failure: new requests are refused before the inner service.
    sink.flush();
    assert!(!sink.can_accept());
    for _ in 0..20 {
        let r = finish(svc.clone().oneshot(get("/v1/models")).await.unwrap()).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(served.lock().unwrap().len(), CAPACITY);

    sink.shutdown();
    let stats = sink.stats();
    let recorded = request_ids(&fallback);
    for id in served.lock().unwrap().iter() {
        assert!(recorded.contains(id), "served without a record: {id}");
    }
    assert_eq!(stats.written, 0);
    assert_eq!(stats.fallback as usize, recorded.len());
    assert_eq!(
        (stats.fallback + stats.dropped) as usize,
        BURST + 20,
        "every record is written to the fallback or counted: {stats:?}"
    );
    assert_eq!(stats.queue_len, 0);
}

#[tokio::test]
async fn fail_closed_on_dev_full_refuses_once_the_failure_is_seen() {
    let fallback = Captured::default();
    let Ok(sink) = JsonlSink::builder("/dev/full")
        .with_fallback(fallback.clone())
        .open()
    else {
        return; // no /dev/full here
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .with_backpressure(Backpressure::FailClosed)
        .layer(counting_service(calls.clone()));
    let first = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
    assert_eq!(first.status(), StatusCode::OK);
    sink.flush();
    let second = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    sink.shutdown();
    let recorded = request_ids(&fallback);
    let id = |r: &Response<()>| r.headers()[X_REQUEST_ID].to_str().unwrap().to_owned();
    assert!(
        recorded.contains(&id(&first)),
        "the served request's record"
    );
    assert!(recorded.contains(&id(&second)), "the refusal's record");
    let stats = sink.stats();
    assert_eq!((stats.written, stats.fallback, stats.dropped), (0, 2, 0));
}

#[tokio::test]
async fn drop_and_count_counts_every_record_a_failing_sink_loses() {
    let sink = JsonlSink::writer_builder(DiskFull)
        .with_capacity(4)
        .without_fallback()
        .open()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .layer(counting_service(calls.clone()));
    for _ in 0..40 {
        let r = finish(svc.clone().oneshot(get("/")).await.unwrap()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    sink.shutdown();
    let stats = sink.stats();
    assert_eq!(calls.load(Ordering::SeqCst), 40);
    assert_eq!(
        stats.written + stats.fallback + stats.dropped,
        40,
        "{stats:?}"
    );
    assert_eq!(stats.dropped, 40);
}

#[tokio::test]
async fn channel_reservations_hold_their_place_in_a_burst() {
    let (sink, mut rx) = ChannelSink::bounded(2);
    let served = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = AuditLayer::new(sink.clone())
        .with_metrics(false)
        .with_backpressure(Backpressure::FailClosed)
        .layer(gated_service(served.clone(), gate.clone()));
    let burst = futures_util::future::join_all((0..10).map(|_| {
        let svc = svc.clone();
        async move { finish(svc.oneshot(get("/")).await.unwrap()).await }
    }));
    let open_gate = async {
        while served.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        gate.add_permits(10);
    };
    let (responses, ()) = tokio::join!(burst, open_gate);
    let ok = responses
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    assert_eq!(ok, 2);
    let mut ids = Vec::new();
    while let Ok(e) = rx.try_recv() {
        ids.push(e.as_request().unwrap().request_id.to_string());
    }
    for id in served.lock().unwrap().iter() {
        assert!(ids.contains(id), "the served request's record was kept");
    }
    let stats = sink.stats();
    assert_eq!(stats.accepted + stats.dropped, 10);
}

#[test]
fn fan_out_gives_back_reservations_when_a_required_sink_refuses() {
    let (free, _rx_free) = ChannelSink::bounded(1);
    let (full, _rx_full) = ChannelSink::bounded(1);
    assert!(full.try_reserve());
    let fan = FanOut::new().with(free.clone()).with(full.clone());
    assert!(!fan.try_reserve());
    assert!(free.try_reserve(), "the first sink's place was given back");
    free.release_reservation();
    full.release_reservation();
    assert!(fan.try_reserve());
    assert!(!free.can_accept() && !full.can_accept());
    fan.release_reservation();
    assert!(free.can_accept() && full.can_accept());
}

#[tokio::test]
async fn an_upstream_cut_is_recorded_and_serialized() {
    let (events, sink) = recorder();
    let svc = AuditLayer::new(sink).with_metrics(false).layer(service_fn(
        |req: Request<Full<Bytes>>| async move {
            if req.uri().path() == "/cut" {
                let trace = req.extensions().get::<RequestTrace>().unwrap();
                trace.set_cut(keygate_core::Cut::UpstreamIdle);
            }
            ok_response()
        },
    ));
    finish(svc.clone().oneshot(get("/cut")).await.unwrap()).await;
    finish(svc.oneshot(get("/whole")).await.unwrap()).await;
    let events = requests(&events);
    assert_eq!(events[0].cut, Some(keygate_core::Cut::UpstreamIdle));
    assert_eq!(events[1].cut, None);
    let cut = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(cut["cut"], "upstream_idle");
    let whole = serde_json::to_value(&events[1]).unwrap();
    assert!(whole.get("cut").is_none(), "no cut field when not cut");
}

#[tokio::test]
async fn shutdown_switch_marks_requests_still_in_flight_as_cut_by_shutdown() {
    let (events, sink) = recorder();
    let layer = AuditLayer::new(sink).with_metrics(false);
    let switch = layer.shutdown_switch();
    let svc = layer.clone().layer(streaming_service(false));
    let cut_upstream = layer.layer(service_fn(|req: Request<Full<Bytes>>| {
        let trace = req.extensions().get::<RequestTrace>().unwrap().clone();
        async move {
            trace.set_cut(keygate_core::Cut::UpstreamTotal);
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
        }
    }));

    let mut streaming = svc
        .clone()
        .oneshot(get("/v1/chat/completions"))
        .await
        .unwrap();
    streaming.body_mut().frame().await.unwrap().unwrap();
    let mut waiting = Box::pin(cut_upstream.oneshot(get("/v1/chat/completions")));
    assert!((&mut waiting).now_or_never().is_none());
    assert!(!switch.is_cut());

    switch.cut_in_flight();
    assert!(switch.is_cut());
    drop(streaming);
    drop(waiting);
    // A request that completes after the switch was not cut.
    finish(svc.oneshot(get("/v1/chat/completions")).await.unwrap()).await;

    let events = requests(&events);
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].completion, Completion::Aborted);
    assert_eq!(events[0].cut, Some(keygate_core::Cut::Shutdown));
    assert_eq!(events[1].completion, Completion::Cancelled);
    assert_eq!(
        events[1].cut,
        Some(keygate_core::Cut::UpstreamTotal),
        "the first cut stays"
    );
    assert_eq!(events[2].completion, Completion::Complete);
    assert_eq!(events[2].cut, None);
}
