//! The facade's stack: order, configuration, and the config-built stack end to end.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_audit::AuditEvent;
use keygate_core::{
    KeyFormat, KeyId, KeyRecord, ManualClock, Permissions, ProjectRecord, SecretKey, Stage,
    Timestamp,
};
use keygate_store::{KeyFile, MemoryStore};
use tower::{ServiceBuilder, ServiceExt, service_fn};

use crate::{BuildError, Config, Keygate};

pub(crate) fn store(edit: impl FnOnce(&mut KeyRecord)) -> (MemoryStore, SecretKey, KeyRecord) {
    let secret = KeyFormat::default().generate().unwrap();
    let mut key = KeyRecord::new(
        KeyId::new("key_t"),
        "p",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    edit(&mut key);
    let store = MemoryStore::from_records([ProjectRecord::new("p")], [key.clone()]).unwrap();
    (store, secret, key)
}

type Events = Arc<Mutex<Vec<AuditEvent>>>;

fn recorder() -> (Events, impl Fn(&AuditEvent) + Send + Sync + 'static) {
    let events = Events::default();
    let seen = events.clone();
    (events, move |e: &AuditEvent| {
        seen.lock().unwrap().push(e.clone())
    })
}

async fn ok(_req: Request<impl Sized>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = br#"{"object":"list","data":[{"id":"gpt-4o"},{"id":"gpt-4o-mini"}]}"#;
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

fn get(path: &str, secret: Option<&SecretKey>) -> Request<Full<Bytes>> {
    let mut r = Request::get(path);
    if let Some(s) = secret {
        r = r.header("authorization", format!("Bearer {}", s.expose()));
    }
    r.body(Full::default()).unwrap()
}

#[tokio::test]
async fn audit_is_outermost_and_records_inner_denials() {
    let (store, secret, _) = store(|k| k.permissions = Permissions::ReadOnly);
    let (events, sink) = recorder();
    let svc = ServiceBuilder::new()
        .layer(Keygate::builder(store).audit_sink(sink).build().unwrap())
        .service_fn(ok);
    let missing = svc.clone().oneshot(get("/v1/models", None)).await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("x-request-id"));
    missing.into_body().collect().await.unwrap();
    let unknown = svc
        .oneshot(get("/v1/nothing-here", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    unknown.into_body().collect().await.unwrap();
    let events = events.lock().unwrap();
    let stages: Vec<_> = events
        .iter()
        .map(|e| match &e.as_request().unwrap().decision {
            keygate_audit::Decision::Denied { stage, .. } => *stage,
            _ => Stage::Audit,
        })
        .collect();
    assert_eq!(stages, vec![Stage::Extract, Stage::Scope]);
}

#[tokio::test]
async fn rate_limit_sits_inside_scope_and_uses_the_injected_clock() {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
    let (store, secret, _) = store(|k| k.limits.requests_per_minute = std::num::NonZeroU32::new(1));
    let svc = ServiceBuilder::new()
        .layer(
            Keygate::builder(store)
                .clock(clock.clock())
                .build()
                .unwrap(),
        )
        .service_fn(ok);
    // A route the scope layer refuses never reaches the limiter.
    let refused = svc
        .clone()
        .oneshot(get("/nope", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        svc.clone()
            .oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let limited = svc
        .clone()
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(
        svc.oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn model_list_is_filtered_unless_turned_off() {
    let (store, secret, _) = store(|k| {
        k.models =
            keygate_core::ModelRules::allow_only([
                keygate_core::ModelPattern::new("gpt-4o-mini").unwrap()
            ]);
    });
    let filtered = ServiceBuilder::new()
        .layer(Keygate::builder(store.clone()).build().unwrap())
        .service_fn(ok);
    let body = filtered
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);

    let unfiltered = ServiceBuilder::new()
        .layer(
            Keygate::builder(store)
                .model_list_path(None)
                .build()
                .unwrap(),
        )
        .service_fn(ok);
    let response = unfiltered
        .oneshot(get("/v1/models", Some(&secret)))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "no model is needed to list models"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[test]
fn invalid_settings_fail_at_build() {
    let (store, _, _) = store(|_| {});
    let e = Keygate::builder(store.clone())
        .max_rate_entries(1)
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::RateLimit(_)));
    let e = Keygate::builder(store.clone())
        .credential_sources([])
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::CredentialSources(_)));
    let e = Keygate::builder(store)
        .model_list_path(Some("v1/models"))
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::ModelListPath(_)));
}

#[tokio::test]
async fn a_config_built_stack_serves_keys_from_the_file_and_accepts_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let (_, secret, key) = store(|_| {});
    let mut file = KeyFile::default();
    file.projects.push(ProjectRecord::new("p"));
    file.keys.push(key);
    file.save_atomic(&keys).unwrap();
    let text = format!(
        "keys_file = {keys:?}\n[audit]\ntracing = false\n[audit.jsonl]\npath = {:?}\n",
        dir.path().join("audit.jsonl")
    );
    let built = Config::from_toml_str(&text).unwrap().build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(built.layer().clone())
        .service(service_fn(ok));
    assert_eq!(
        svc.clone()
            .oneshot(get("/v1/models", Some(&secret)))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // Exchange the key for a token, then call with the token.
    let exchange = ServiceBuilder::new()
        .layer(built.layer().extract_layer().clone())
        .service(built.token_exchange().unwrap().clone());
    let mut ask = Request::post("/v1/tokens")
        .header("authorization", format!("Bearer {}", secret.expose()))
        .body(Full::new(Bytes::from_static(br#"{"ttl_seconds":60}"#)))
        .unwrap();
    ask.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let issued = exchange.oneshot(ask).await.unwrap();
    assert_eq!(issued.status(), StatusCode::OK);
    let body = issued.into_body().collect().await.unwrap().to_bytes();
    let token = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_token = Request::get("/v1/models")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        svc.oneshot(with_token).await.unwrap().status(),
        StatusCode::OK
    );

    built.flush_audit();
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 2);
    assert!(!audit.contains(secret.expose()) && !audit.contains(&token));
}

/// Keys for the cross-layer test, one per kind of refusal that needs its own limits.
fn keys() -> (MemoryStore, Vec<SecretKey>) {
    use keygate_core::{Access, Budget, ModelPattern, ModelRules, Money, Period};
    let mut out = Vec::new();
    let mut records = Vec::new();
    let edits: [fn(&mut KeyRecord); 4] = [
        // 0: chat write + models read, two models.
        |k| {
            k.permissions = Permissions::Restricted(
                [
                    ("chat.completions".to_owned(), Access::Write),
                    ("models".to_owned(), Access::Read),
                ]
                .into(),
            );
            k.models = ModelRules::allow_only(
                ["gpt-4o-mini", "o3-mini"].map(|m| ModelPattern::new(m).unwrap()),
            );
        },
        // 1: only from 10.0.0.0/8.
        |k| k.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()],
        // 2: one request per minute.
        |k| k.limits.requests_per_minute = std::num::NonZeroU32::new(1),
        // 3: a budget of one micro-dollar.
        |k| {
            k.limits.budgets = vec![Budget {
                amount: Money::from_micros(1),
                period: Period::Day,
                model: None,
            }]
        },
    ];
    for (i, edit) in edits.into_iter().enumerate() {
        let secret = KeyFormat::default().generate().unwrap();
        let mut key = KeyRecord::new(
            KeyId::new(format!("key_{i}")),
            "p",
            secret.digest(),
            Timestamp::UNIX_EPOCH,
        );
        key.permissions = Permissions::All;
        edit(&mut key);
        records.push(key);
        out.push(secret);
    }
    let store = MemoryStore::from_records([ProjectRecord::new("p")], records).unwrap();
    (store, out)
}

fn post(path: &str, secret: &SecretKey, body: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("authorization", format!("Bearer {}", secret.expose()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn chat(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":100,"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

#[tokio::test]
async fn every_refusal_of_every_layer_is_one_audit_event_with_its_layer_and_reason() {
    use crate::limit::{Price, PriceTable};
    use crate::scope::PolicyDenial;
    use keygate_core::ClientIp;
    use keygate_core::Money;

    let (store, keys) = keys();
    let (events, sink) = recorder();
    let prices = PriceTable::new()
        .with_price(
            "*",
            Price::per_million(Money::from_dollars(1), Money::from_dollars(1)),
        )
        .unwrap();
    let layer = Keygate::builder(store)
        .clock(ManualClock::new(Timestamp::from_unix_secs(1_000_000)).clock())
        .audit_sink(sink)
        .prices(prices)
        .policy(|ctx: &crate::scope::PolicyContext<'_>| {
            if ctx.model() == Some("o3-mini") {
                return Err(PolicyDenial::new("reasoning_models_off", "Not today."));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service_fn(ok);
    let from = |ip: &str, mut r: Request<Full<Bytes>>| {
        r.extensions_mut().insert(ClientIp(ip.parse().unwrap()));
        r
    };
    let local = |r| from("127.0.0.1", r);
    let bad = KeyFormat::default().generate().unwrap();

    // (request, status, stage, reason, group, model); `None` stage: allowed.
    type Case = (
        Request<Full<Bytes>>,
        u16,
        Option<Stage>,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            local(get("/v1/models", None)),
            401,
            Some(Stage::Extract),
            "missing_api_key",
            None,
            None,
        ),
        (
            local(get("/v1/models", Some(&bad))),
            401,
            Some(Stage::Extract),
            "invalid_api_key",
            None,
            None,
        ),
        (
            local(get("/v1/nothing", Some(&keys[0]))),
            404,
            Some(Stage::Scope),
            "unknown_route",
            None,
            None,
        ),
        (
            local(post(
                "/v1/embeddings",
                &keys[0],
                r#"{"model":"gpt-4o-mini","input":"x"}"#,
            )),
            403,
            Some(Stage::Scope),
            "insufficient_permissions",
            Some("embeddings"),
            None,
        ),
        (
            local(post("/v1/chat/completions", &keys[0], &chat("gpt-4o"))),
            403,
            Some(Stage::Scope),
            "model_not_allowed",
            Some("chat.completions"),
            Some("gpt-4o"),
        ),
        (
            local(post("/v1/chat/completions", &keys[0], "{not json")),
            400,
            Some(Stage::Scope),
            "invalid_json",
            Some("chat.completions"),
            None,
        ),
        (
            local(post("/v1/chat/completions", &keys[0], &chat("o3-mini"))),
            403,
            Some(Stage::Policy),
            "reasoning_models_off",
            Some("chat.completions"),
            Some("o3-mini"),
        ),
        (
            local(get("/v1/models", Some(&keys[1]))),
            403,
            Some(Stage::Scope),
            "ip_not_allowed",
            Some("models"),
            None,
        ),
        (
            from("10.1.2.3", get("/v1/models", Some(&keys[1]))),
            200,
            None,
            "",
            Some("models"),
            None,
        ),
        (
            local(get("/v1/models", Some(&keys[2]))),
            200,
            None,
            "",
            Some("models"),
            None,
        ),
        (
            local(get("/v1/models", Some(&keys[2]))),
            429,
            Some(Stage::RateLimit),
            "rate_limit_exceeded",
            Some("models"),
            None,
        ),
        (
            local(post("/v1/chat/completions", &keys[3], &chat("gpt-4o-mini"))),
            429,
            Some(Stage::TokenLimit),
            "insufficient_quota",
            Some("chat.completions"),
            Some("gpt-4o-mini"),
        ),
        (
            local(post("/v1/chat/completions", &keys[0], &chat("gpt-4o-mini"))),
            200,
            None,
            "",
            Some("chat.completions"),
            Some("gpt-4o-mini"),
        ),
    ];
    let n = cases.len();
    let mut expected = Vec::new();
    for (i, (req, status, stage, reason, group, model)) in cases.into_iter().enumerate() {
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "case {i}");
        res.into_body().collect().await.unwrap();
        expected.push((stage, reason, group, model));
    }

    let events = events.lock().unwrap();
    assert_eq!(events.len(), n, "exactly one event per request");
    for (i, (event, (stage, reason, group, model))) in events.iter().zip(expected).enumerate() {
        let e = event.as_request().expect("a request event");
        match (&e.decision, stage) {
            (
                keygate_audit::Decision::Denied {
                    stage: s,
                    reason: r,
                    ..
                },
                Some(stage),
            ) => {
                assert_eq!((*s, r.as_str()), (stage, reason), "case {i}");
            }
            (keygate_audit::Decision::Allowed, None) => {}
            (d, s) => panic!("case {i}: decision {d:?}, expected stage {s:?}"),
        }
        assert_eq!(
            e.endpoint_group.as_ref().map(|g| g.as_str()),
            group,
            "case {i}"
        );
        assert_eq!(e.model.as_deref(), model, "case {i}");
    }
    // Nothing secret in any event, in its JSON or its Debug form.
    for event in events.iter() {
        let json = serde_json::to_string(event).unwrap();
        let debug = format!("{event:?}");
        for secret in keys.iter().chain([&bad]) {
            assert!(!json.contains(secret.expose()), "{json}");
            assert!(!debug.contains(secret.expose()), "{debug}");
        }
    }
}

/// The configured stack over an upstream that reports 100 tokens of usage for every request.
fn hundred_token_upstream(
    layer: crate::KeygateLayer<crate::KeySource, crate::ConfigTokens>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>>,
    Error = Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_req: Request<_>| async {
            let body = r#"{"object":"chat.completion","usage":{"prompt_tokens":60,"completion_tokens":40,"total_tokens":100}}"#;
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(response)
        }))
}

/// A small priced chat request with `secret`.
fn chat_request(secret: &keygate_core::SecretKey) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {}", secret.expose()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}"#,
        )))
        .unwrap()
}

#[tokio::test]
async fn a_configured_wallet_guard_suspends_a_key_past_its_ceiling_and_audits_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let (_, secret, key) = store(|_| {});
    let mut file = KeyFile::default();
    file.projects.push(ProjectRecord::new("p"));
    file.keys.push(key);
    file.save_atomic(&keys).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let text = format!(
        "keys_file = {keys:?}\n[audit]\ntracing = false\n[audit.jsonl]\npath = {audit:?}\n\
         [guard]\nenabled = true\nceiling_tokens = 150\n"
    );
    let built = Config::from_toml_str(&text).unwrap().build().unwrap();
    let svc = hundred_token_upstream(built.layer().clone());
    let chat = || chat_request(&secret);
    // 100 tokens: under the ceiling of 150 per window.
    let first = svc.clone().oneshot(chat()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.unwrap();
    // 200 tokens in the window: past the ceiling, so the key is suspended once this settles.
    let second = svc.clone().oneshot(chat()).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    second.into_body().collect().await.unwrap();
    let third = svc.clone().oneshot(chat()).await.unwrap();
    assert_eq!(third.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        third
            .extensions()
            .get::<keygate_core::Denial>()
            .unwrap()
            .code(),
        "key_suspended"
    );
    third.into_body().collect().await.unwrap();

    built.flush_audit();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let alerts: Vec<_> = lines.iter().filter(|l| l["type"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "{lines:?}");
    assert_eq!(alerts[0]["key_id"], "key_t");
    assert_eq!(lines.iter().filter(|l| l["type"] == "request").count(), 3);
}

#[tokio::test]
async fn a_suspension_by_the_wallet_guard_is_persisted_in_the_store_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("keygate.db");
    let (_, secret, key) = store(|_| {});
    let mut file = KeyFile::default();
    file.projects.push(ProjectRecord::new("p"));
    file.keys.push(key);
    keygate_store::Db::open(&db_path)
        .unwrap()
        .import(&file, "test")
        .unwrap();
    let text = format!(
        "store = \"sqlite:{}\"\n[audit]\ntracing = false\n[guard]\nenabled = true\nceiling_tokens = 150\n",
        db_path.display()
    );
    let config = Config::from_toml_str(&text).unwrap();
    let chat = || chat_request(&secret);
    let built = config.build().unwrap();
    let svc = hundred_token_upstream(built.layer().clone());
    for _ in 0..2 {
        let r = svc.clone().oneshot(chat()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.into_body().collect().await.unwrap();
    }
    // The hook writes on a thread of its own; wait for it, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let db = keygate_store::Db::open(&db_path).unwrap();
    loop {
        let stored = db.key("key_t").unwrap().unwrap();
        if stored.disabled_reason.as_deref() == Some(crate::SUSPENDED_REASON) {
            assert!(stored.record.disabled);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the suspension was not persisted"
        );
        std::thread::yield_now();
    }
    drop((svc, built));

    // A restart: a new stack from the same store refuses the key (401: disabled).
    let built = config.build().unwrap();
    let r = hundred_token_upstream(built.layer().clone())
        .oneshot(chat())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
