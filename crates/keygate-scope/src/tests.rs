//! Behaviour of the whole layer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    Access, ClientIp, Credential, Denial, KeyDigest, KeyId, KeyRecord, ManualClock, ModelPattern,
    ModelRules, Permissions, Principal, ProjectRecord, RequestFacts, Secret, Stage, Timestamp,
};
use tower::{Layer, Service, ServiceExt, service_fn};

use crate::*;

pub(crate) fn principal_with(perms: Permissions, models: &[&str], ips: &[&str]) -> Principal {
    let mut key = KeyRecord::new(
        KeyId::new("key_t"),
        "p",
        KeyDigest::of("t"),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = perms;
    if !models.is_empty() {
        key.models = ModelRules::allow_only(models.iter().map(|m| ModelPattern::new(m).unwrap()));
    }
    key.allowed_ips = ips.iter().map(|n| n.parse().unwrap()).collect();
    key.groups = vec!["staff".into()];
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("p")),
        Credential::ApiKey(Secret::Current),
    )
}

fn restricted(groups: &[(&str, Access)]) -> Permissions {
    Permissions::Restricted(groups.iter().map(|(g, a)| (g.to_string(), *a)).collect())
}

/// Echoes the body, and reports what the layer put in extensions as headers.
async fn echo(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::builder();
    if let Some(facts) = req.extensions().get::<RequestFacts>() {
        if let Some(m) = facts.model() {
            res = res.header("x-model", m);
        }
        let e = &facts.endpoint;
        res = res.header("x-group", e.group.as_str());
        res = res.header("x-access", e.access.as_str());
    }
    if let Some(ClientIp(ip)) = req.extensions().get::<ClientIp>() {
        res = res.header("x-ip", ip.to_string());
    }
    if let Some(ce) = req.headers().get(http::header::CONTENT_ENCODING) {
        res = res.header("x-content-encoding", ce);
    }
    for h in METHOD_OVERRIDE_HEADERS {
        if req.headers().contains_key(h) {
            res = res.header("x-override-seen", h);
        }
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    Ok(res.body(Full::new(body)).unwrap())
}

struct Call {
    status: StatusCode,
    headers: http::HeaderMap,
    denial: Option<Denial>,
    body: Bytes,
}

async fn run(layer: &ScopeLayer, req: Request<Full<Bytes>>) -> Call {
    let svc = layer.layer(service_fn(echo));
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let denial = res.extensions().get::<Denial>().cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Call {
        status,
        headers,
        denial,
        body,
    }
}

fn req(method: Method, path: &str, principal: &Principal) -> http::request::Builder {
    let _ = principal;
    Request::builder().method(method).uri(path)
}

fn with(p: &Principal, mut r: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    r.extensions_mut().insert(p.clone());
    r
}

fn get(path: &str, p: &Principal) -> Request<Full<Bytes>> {
    with(p, req(Method::GET, path, p).body(Full::default()).unwrap())
}

fn json(path: &str, body: &str, p: &Principal) -> Request<Full<Bytes>> {
    with(
        p,
        Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
    )
}

fn code(c: &Call) -> &str {
    c.denial.as_ref().map_or("", |d| d.code())
}

fn all() -> Principal {
    principal_with(Permissions::All, &[], &[])
}

// ---- principal, routes, permissions ----

#[tokio::test]
async fn missing_principal_is_refused_with_401() {
    let r = Request::get("/v1/models").body(Full::default()).unwrap();
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(c.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unknown_route_is_refused_with_404() {
    let c = run(&ScopeLayer::openai(), get("/v1/admin/keys", &all())).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::NOT_FOUND, "unknown_route")
    );
    let c = run(
        &ScopeLayer::openai(),
        with(
            &all(),
            Request::put("/v1/models").body(Full::default()).unwrap(),
        ),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::NOT_FOUND, "unknown_route")
    );
}

#[tokio::test]
async fn endpoint_match_reaches_the_inner_service() {
    let c = run(
        &ScopeLayer::openai(),
        get("/v1/files/file-1/content", &all()),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-group"], "files");
    assert_eq!(c.headers["x-access"], "read");
}

#[tokio::test]
async fn restricted_key_gets_exactly_its_groups() {
    let p = principal_with(
        restricted(&[
            ("chat.completions", Access::Write),
            ("models", Access::Read),
        ]),
        &[],
        &[],
    );
    let layer = ScopeLayer::openai();
    assert_eq!(
        run(&layer, get("/v1/models", &p)).await.status,
        StatusCode::OK
    );
    let c = run(&layer, json("/v1/chat/completions", r#"{"model":"m"}"#, &p)).await;
    assert_eq!(c.status, StatusCode::OK);
    let c = run(&layer, get("/v1/files", &p)).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "insufficient_permissions")
    );
    let msg = c.denial.unwrap().message().to_owned();
    assert!(msg.contains("'files'") && msg.contains("read"), "{msg}");
    let c = run(
        &layer,
        with(
            &p,
            Request::delete("/v1/models/ft:x")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await;
    assert_eq!(
        c.status,
        StatusCode::FORBIDDEN,
        "models: Read does not allow DELETE"
    );
}

#[tokio::test]
async fn read_only_key_cannot_write() {
    let p = principal_with(Permissions::ReadOnly, &[], &[]);
    let layer = ScopeLayer::openai();
    assert_eq!(
        run(&layer, get("/v1/files", &p)).await.status,
        StatusCode::OK
    );
    let c = run(&layer, json("/v1/chat/completions", r#"{"model":"m"}"#, &p)).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "insufficient_permissions")
    );
}

#[tokio::test]
async fn head_needs_read_like_get() {
    let none = principal_with(restricted(&[("chat.completions", Access::Write)]), &[], &[]);
    let read = principal_with(restricted(&[("models", Access::Read)]), &[], &[]);
    let head = |p: &Principal| {
        with(
            p,
            Request::head("/v1/models").body(Full::default()).unwrap(),
        )
    };
    let layer = ScopeLayer::openai();
    assert_eq!(run(&layer, head(&none)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(run(&layer, head(&read)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn head_on_a_model_route_checks_the_model() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let head = |path: &str| with(&p, Request::head(path).body(Full::default()).unwrap());
    let layer = ScopeLayer::openai();
    let c = run(&layer, head("/v1/models/gpt-4o")).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );
    assert_eq!(
        run(&layer, head("/v1/models/gpt-4o-mini")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn write_implies_read_and_a_missing_group_is_none() {
    let p = principal_with(restricted(&[("chat.completions", Access::Write)]), &[], &[]);
    let layer = ScopeLayer::openai();
    let c = run(&layer, get("/v1/chat/completions", &p)).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.denial);
    assert_eq!(c.headers["x-access"], "read");
    let c = run(&layer, get("/v1/models", &p)).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "insufficient_permissions")
    );
}

#[tokio::test]
async fn method_override_headers_do_not_change_the_decision_and_are_removed() {
    let read = principal_with(restricted(&[("files", Access::Read)]), &[], &[]);
    let layer = ScopeLayer::openai();
    for h in METHOD_OVERRIDE_HEADERS {
        // A POST that claims to be a GET is still a POST.
        let r = with(
            &read,
            Request::post("/v1/files")
                .header(h, "GET")
                .body(Full::default())
                .unwrap(),
        );
        assert_eq!(run(&layer, r).await.status, StatusCode::FORBIDDEN, "{h}");
        // A GET that claims to be a DELETE is allowed as the GET it is, without the header.
        let r = with(
            &read,
            Request::get("/v1/files/f")
                .header(h, "DELETE")
                .body(Full::default())
                .unwrap(),
        );
        let c = run(&layer, r).await;
        assert_eq!(c.status, StatusCode::OK, "{h}");
        assert!(
            !c.headers.contains_key("x-override-seen"),
            "{h} reached the inner service"
        );
    }
}

#[tokio::test]
async fn ambiguous_paths_are_refused_with_400() {
    let layer = ScopeLayer::openai();
    for path in [
        "/v1/models/a%2fb",
        "/v1/models/a%2Fb",
        "/v1/%2e%2e/models",
        "/v1/models/%2E",
        "/v1/./models",
        "/v1/x/../models",
        "/v1//models",
        "//v1/models",
        "/v1/models;x",
        "/v1/models/a%5cb",
        "/v1/%6dodels",
        "/v1/models/%ff",
        "/v1/models/%zz",
        // Non-ASCII bytes: `http` accepts raw UTF-8 in a path; routers and upstreams do not
        // agree on it.
        "/v1/mod\u{e9}ls",
        "/v1/models/gpt-4o\u{e9}",
    ] {
        let c = run(&layer, get(path, &all())).await;
        assert_eq!(
            (c.status, code(&c)),
            (StatusCode::BAD_REQUEST, "ambiguous_path"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn case_and_trailing_slash_decisions_match_axum() {
    // An axum router serving exactly the preset's GET routes.
    let mut router = axum::Router::new();
    for spec in RouteTable::openai_specs() {
        if spec.method == "GET" {
            router = router.route(&spec.path, axum::routing::get(|| async { "served" }));
        }
    }
    let layer = ScopeLayer::openai();
    for path in [
        "/v1/models",
        "/v1/models/",
        "/V1/models",
        "/v1/Models",
        "/v1/models/gpt-4o",
        "/v1/models/gpt-4o/",
        "/v1/files/f/content",
        "/v1/files/f/content/",
        "/v1/files/F",
        "/v1/models/ft:gpt-4o:acme:x",
        "/v1/models/a%20b",
    ] {
        let served = router
            .clone()
            .oneshot(Request::get(path).body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
            == StatusCode::OK;
        let allowed = run(&layer, get(path, &all())).await.status == StatusCode::OK;
        assert_eq!(
            allowed, served,
            "{path}: scope allows {allowed}, axum serves {served}"
        );
    }
}

/// Whether `axum_router` serves `method path` (200), and whether `layer` found a route for it
/// (anything but 404 `unknown_route` or 400 `ambiguous_path`).
async fn routed_vs_served(
    layer: &ScopeLayer,
    router: &axum::Router,
    method: &Method,
    path: &str,
) -> (bool, bool) {
    let served = router
        .clone()
        .oneshot(
            Request::builder()
                .method(method.clone())
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap()
        .status()
        == StatusCode::OK;
    let r = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
        .unwrap();
    let c = run(layer, with(&all(), r)).await;
    let routed = !matches!(code(&c), "unknown_route" | "ambiguous_path");
    (routed, served)
}

#[tokio::test]
async fn every_preset_route_and_its_variants_are_routed_exactly_when_axum_serves_them() {
    use std::collections::BTreeMap;
    let specs = RouteTable::openai_specs();
    let mut by_path: BTreeMap<String, axum::routing::MethodRouter> = BTreeMap::new();
    for spec in &specs {
        let method: Method = spec.method.parse().unwrap();
        let filter = axum::routing::MethodFilter::try_from(method).unwrap();
        let mr = by_path.remove(&spec.path).unwrap_or_default();
        by_path.insert(spec.path.clone(), mr.on(filter, || async { "served" }));
    }
    let router = by_path
        .into_iter()
        .fold(axum::Router::new(), |r, (path, mr)| r.route(&path, mr));
    let layer = ScopeLayer::openai();
    let mut checked = 0;
    for spec in &specs {
        let concrete: String = spec
            .path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "id-1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let method: Method = spec.method.parse().unwrap();
        let mut methods = vec![method.clone(), Method::PUT, Method::OPTIONS];
        if method == Method::GET {
            methods.push(Method::HEAD);
        }
        for path in [
            concrete.clone(),
            format!("{concrete}/"),
            concrete.to_uppercase(),
            concrete.replacen("/v1/", "/V1/", 1),
            format!("{concrete}/extra"),
        ] {
            for m in &methods {
                let (routed, served) = routed_vs_served(&layer, &router, m, &path).await;
                assert_eq!(
                    routed, served,
                    "{m} {path}: scope routes it {routed}, axum serves it {served}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "{checked}");
}

#[tokio::test]
async fn wildcard_routes_match_axum() {
    let table = RouteTable::builder()
        .route(Method::GET, "/static/{*rest}", "static")
        .route(Method::GET, "/static/fixed", "static")
        .build()
        .unwrap();
    let layer = ScopeLayer::new(table);
    let router = axum::Router::new()
        .route("/static/{*rest}", axum::routing::get(|| async { "served" }))
        .route("/static/fixed", axum::routing::get(|| async { "served" }));
    for path in [
        "/static",
        "/static/",
        "/static/a",
        "/static/a/",
        "/static/a/b/c",
        "/static/fixed",
        "/static/fixed/",
        "/static/fixed/x",
        "/Static/a",
    ] {
        for m in [Method::GET, Method::HEAD, Method::POST] {
            let (routed, served) = routed_vs_served(&layer, &router, &m, path).await;
            assert_eq!(
                routed, served,
                "{m} {path}: scope routes it {routed}, axum serves it {served}"
            );
        }
    }
}

// ---- JSON model ----

#[tokio::test]
async fn allowed_json_model_passes_with_requested_model() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/chat/completions", r#"{"model":"gpt-4o-mini"}"#, &p),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-model"], "gpt-4o-mini");
}

#[tokio::test]
async fn requested_model_is_set_without_model_rules() {
    let c = run(
        &ScopeLayer::openai(),
        json(
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"x"}"#,
            &all(),
        ),
    )
    .await;
    assert_eq!(c.headers["x-model"], "text-embedding-3-small");
}

#[tokio::test]
async fn disallowed_json_model_is_refused_with_403() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/chat/completions", r#"{"model":"gpt-4o"}"#, &p),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );
    let d = c.denial.unwrap();
    assert_eq!((d.param(), d.stage()), (Some("model"), Stage::Scope));
}

#[tokio::test]
async fn body_reaches_the_inner_service_byte_identical() {
    let body = "{ \"messages\" : [ {\"content\": \"h\\u00e9llo \\\"x\\\"\"} ],\n\t\"model\":\"gpt-4o-mini\" }  ";
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/chat/completions", body, &p),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.body, body.as_bytes());
}

#[tokio::test]
async fn ambiguous_json_bodies_are_refused_with_400() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let layer = ScopeLayer::openai();
    for (body, want) in [
        (
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
            "ambiguous_model",
        ),
        (
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
            "ambiguous_model",
        ),
        (
            r#"{"model":"gpt-4o-mini","mod\u0065l":"gpt-4o"}"#,
            "ambiguous_model",
        ),
        (r#"{"model":["gpt-4o-mini"]}"#, "invalid_model"),
        (r#"{"model":1}"#, "invalid_model"),
        (
            r#"{"model":"gpt-4o-mini","stream":true,"stream":false}"#,
            "duplicate_key",
        ),
        (r#"{"model":"gpt-4o-mini",}"#, "invalid_json"),
        (r#"["gpt-4o-mini"]"#, "invalid_json"),
    ] {
        let c = run(&layer, json("/v1/chat/completions", body, &p)).await;
        assert_eq!(
            (c.status, code(&c)),
            (StatusCode::BAD_REQUEST, want),
            "{body}"
        );
    }
}

#[tokio::test]
async fn project_and_key_model_rules_intersect_and_deny_wins() {
    // Project: any gpt-4o*, but never the realtime models. Key: gpt-4o-mini* and o1.
    let mut key = KeyRecord::new(
        KeyId::new("key_m"),
        "p",
        KeyDigest::of("m"),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    key.models =
        ModelRules::allow_only(["gpt-4o-mini*", "o1"].map(|m| ModelPattern::new(m).unwrap()));
    let mut project = ProjectRecord::new("p");
    project.models = ModelRules::allow_only([ModelPattern::new("gpt-4o*").unwrap()]);
    project.models.deny = vec![ModelPattern::new("gpt-4o-mini-realtime*").unwrap()];
    let p = Principal::new(
        Arc::new(key),
        Arc::new(project),
        Credential::ApiKey(Secret::Current),
    );
    let layer = ScopeLayer::openai();
    for (model, allowed) in [
        ("gpt-4o-mini", true),
        ("gpt-4o-mini-2024-07-18", true),
        ("gpt-4o", false), // the project allows it, the key does not
        ("o1", false),     // the key allows it, the project does not
        ("gpt-4o-mini-realtime-preview", false), // both allow, the project denies
    ] {
        let body = format!(r#"{{"model":"{model}"}}"#);
        let c = run(&layer, json("/v1/chat/completions", &body, &p)).await;
        let want = if allowed { "" } else { "model_not_allowed" };
        assert_eq!(code(&c), want, "{model}");
    }
}

#[tokio::test]
async fn escaped_model_value_is_decoded_before_the_check() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/chat/completions", r#"{"model":"gpt-4\u006f"}"#, &p),
    )
    .await;
    assert_eq!(code(&c), "model_not_allowed");
}

#[tokio::test]
async fn missing_model_with_model_rules_is_refused() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/chat/completions", r#"{"messages":[]}"#, &p),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::BAD_REQUEST, "model_required")
    );
    // Where the API has a default, a missing model is checked as that default.
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/moderations", r#"{"input":"x"}"#, &p),
    )
    .await;
    assert_eq!(code(&c), "model_not_allowed");
    let moderator = principal_with(Permissions::All, &["omni-moderation-*"], &[]);
    let c = run(
        &ScopeLayer::openai(),
        json("/v1/moderations", r#"{"input":"x"}"#, &moderator),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-model"], "omni-moderation-latest");
}

#[tokio::test]
async fn routes_without_a_model_need_none_under_model_rules() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(&ScopeLayer::openai(), get("/v1/models", &p)).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.denial);
    let c = run(&ScopeLayer::openai(), with(&p, upload("fine-tune", "{}"))).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.denial);
}

#[tokio::test]
async fn non_json_content_type_on_json_route_is_415() {
    let r = with(
        &all(),
        Request::post("/v1/chat/completions")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(r#"{"model":"x"}"#)))
            .unwrap(),
    );
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    // gRPC framing is never read as JSON, whatever its codec.
    for ct in ["application/grpc+json", "application/grpc"] {
        let r = with(
            &all(),
            Request::post("/v1/chat/completions")
                .header("content-type", ct)
                .body(Full::new(Bytes::from(r#"{"model":"x"}"#)))
                .unwrap(),
        );
        let c = run(&ScopeLayer::openai(), r).await;
        // Refused (in gRPC's own shape, for a gRPC client).
        assert_eq!(code(&c), "unsupported_media_type", "{ct}");
    }
    // No Content-Type at all: parsed as JSON (and so checked).
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let r = with(
        &p,
        Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(r#"{"model":"gpt-4o"}"#)))
            .unwrap(),
    );
    assert_eq!(
        code(&run(&ScopeLayer::openai(), r).await),
        "model_not_allowed"
    );
}

#[tokio::test]
async fn two_content_types_are_415() {
    let r = with(
        &all(),
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(r#"{"model":"x"}"#)))
            .unwrap(),
    );
    assert_eq!(
        run(&ScopeLayer::openai(), r).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
}

#[tokio::test]
async fn compressed_body_is_415() {
    let r = with(
        &all(),
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b")))
            .unwrap(),
    );
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(
        (c.status, code(&c)),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding"
        )
    );
}

// ---- compressed bodies (feature `decompression`) ----

#[cfg(feature = "decompression")]
mod compressed {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Bytes {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    fn zlib(data: &[u8]) -> Bytes {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    fn encoded(
        path: &str,
        content_type: &str,
        encoding: &str,
        body: Bytes,
        p: &Principal,
    ) -> Request<Full<Bytes>> {
        with(
            p,
            Request::post(path)
                .header("content-type", content_type)
                .header("content-encoding", encoding)
                .body(Full::new(body))
                .unwrap(),
        )
    }

    fn chat(encoding: &str, body: Bytes, p: &Principal) -> Request<Full<Bytes>> {
        encoded(
            "/v1/chat/completions",
            "application/json",
            encoding,
            body,
            p,
        )
    }

    fn layer() -> ScopeLayer {
        ScopeLayer::openai().with_decompression(Decompression::new())
    }

    fn mini() -> Principal {
        principal_with(Permissions::All, &["gpt-4o-mini"], &[])
    }

    #[tokio::test]
    async fn gzip_json_with_allowed_model_is_forwarded_decoded_as_checked() {
        let plain = br#"{"model":"gpt-4o-mini","messages":[]}"#;
        let c = run(&layer(), chat("gzip", gzip(plain), &mini())).await;
        assert_eq!(c.status, StatusCode::OK);
        assert_eq!(c.headers["x-model"], "gpt-4o-mini");
        assert!(!c.headers.contains_key("x-content-encoding"));
        assert_eq!(c.body, &plain[..]);
    }

    #[tokio::test]
    async fn gzip_json_with_disallowed_model_is_403() {
        let body = gzip(br#"{"model":"gpt-4o","messages":[]}"#);
        let c = run(&layer(), chat("gzip", body, &mini())).await;
        assert_eq!(
            (c.status, code(&c)),
            (StatusCode::FORBIDDEN, "model_not_allowed")
        );
    }

    #[tokio::test]
    async fn deflate_json_is_decoded_as_zlib_and_checked() {
        let plain = br#"{"model":"gpt-4o-mini"}"#;
        let c = run(&layer(), chat("deflate", zlib(plain), &mini())).await;
        assert_eq!(c.status, StatusCode::OK);
        assert!(!c.headers.contains_key("x-content-encoding"));
        assert_eq!(c.body, &plain[..]);
        let bad = zlib(br#"{"model":"gpt-4o"}"#);
        let c = run(&layer(), chat("Deflate", bad, &mini())).await;
        assert_eq!(code(&c), "model_not_allowed");
    }

    #[tokio::test]
    async fn decompression_bomb_is_413_at_the_cap() {
        // 10 MiB of zeros inside `{"model":"gpt-4o-mini","x":"…"}`: about 10 KiB compressed.
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(br#"{"model":"gpt-4o-mini","x":""#).unwrap();
        let zeros = [b'0'; 64 * 1024];
        for _ in 0..160 {
            e.write_all(&zeros).unwrap();
        }
        e.write_all(br#""}"#).unwrap();
        let bomb = Bytes::from(e.finish().unwrap());
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        let layer = ScopeLayer::openai()
            .with_decompression(Decompression::new().with_max_decompressed(1024 * 1024));
        let c = run(&layer, chat("gzip", bomb, &mini())).await;
        assert_eq!(
            (c.status, code(&c)),
            (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
        );
    }

    #[tokio::test]
    async fn decompressed_cap_defaults_to_the_body_limit() {
        let body = format!(r#"{{"model":"gpt-4o-mini","x":"{}"}}"#, "a".repeat(4096));
        let small = gzip(body.as_bytes());
        assert!(small.len() < 1024);
        let layer = ScopeLayer::openai()
            .with_body_limit(1024)
            .with_decompression(Decompression::new());
        let c = run(&layer, chat("gzip", small.clone(), &mini())).await;
        assert_eq!(c.status, StatusCode::PAYLOAD_TOO_LARGE);
        let roomy = layer.with_decompression(Decompression::new().with_max_decompressed(8192));
        let c = run(&roomy, chat("gzip", small, &mini())).await;
        assert_eq!(c.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_batch_file_that_decompresses_past_the_cap_is_413_naming_the_cap() {
        let p = mini();
        let line = batch_line("gpt-4o-mini");
        // Allowed lines, then one naming another model past the cap.
        let file = format!(
            "{}{}\n",
            format!("{line}\n").repeat(64),
            batch_line("gpt-4o")
        );
        let form = format!(
            "--B0\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n{file}\r\n--B0--\r\n"
        );
        let small = gzip(form.as_bytes());
        assert!(small.len() < 2048 && form.len() > 4096);
        let layer = ScopeLayer::openai()
            .with_body_limit(2048)
            .with_decompression(Decompression::new().with_max_decompressed(4096));
        let upload = || {
            encoded(
                "/v1/files",
                "multipart/form-data; boundary=B0",
                "gzip",
                small.clone(),
                &p,
            )
        };
        let c = run(&layer, upload()).await;
        assert_eq!(
            (c.status, code(&c)),
            (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
        );
        let message = c.denial.unwrap().message().to_owned();
        assert!(
            message.contains("decompresses to more than 4096 bytes"),
            "{message}"
        );
        // With room for it, it is read whole and its last line refused.
        let roomy = layer.with_decompression(Decompression::new().with_max_decompressed(1 << 20));
        let c = run(&roomy, upload()).await;
        assert_eq!(code(&c), "model_not_allowed");
    }

    #[tokio::test]
    async fn compressed_body_over_the_body_limit_is_413() {
        let body = gzip(
            &(0..4096u32)
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<_>>(),
        );
        let layer = ScopeLayer::openai()
            .with_body_limit(1024)
            .with_decompression(Decompression::new().with_max_decompressed(1 << 20));
        let c = run(&layer, chat("gzip", body, &mini())).await;
        assert_eq!(c.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn corrupt_or_trailing_gzip_is_400() {
        let good = gzip(br#"{"model":"gpt-4o-mini"}"#);
        let mut trailing = good.to_vec();
        trailing.extend_from_slice(&gzip(br#"{"model":"gpt-4o"}"#));
        let truncated = good.slice(..good.len() - 4);
        for body in [
            Bytes::from_static(b"\x1f\x8b\x08\x00garbage"),
            Bytes::from(br#"{"model":"gpt-4o-mini"}"#.to_vec()),
            truncated,
            trailing.into(),
        ] {
            let c = run(&layer(), chat("gzip", body, &mini())).await;
            assert_eq!(
                (c.status, code(&c)),
                (StatusCode::BAD_REQUEST, "invalid_body_encoding")
            );
        }
    }

    #[tokio::test]
    async fn codings_not_accepted_or_stacked_are_415() {
        let gz = gzip(br#"{"model":"gpt-4o-mini"}"#);
        let only_deflate =
            ScopeLayer::openai().with_decompression(Decompression::only([ContentCoding::Deflate]));
        for (layer, encoding) in [
            (layer(), "br"),
            (layer(), "zstd"),
            (layer(), "gzip, gzip"),
            (layer(), "identity, gzip"),
            (layer(), ""),
            (only_deflate, "gzip"),
        ] {
            let c = run(&layer, chat(encoding, gz.clone(), &mini())).await;
            assert_eq!(
                (c.status, code(&c)),
                (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_content_encoding"
                ),
                "{encoding}"
            );
        }
        // Two header lines stack as well.
        let mut r = chat("gzip", gz, &mini());
        r.headers_mut()
            .append("content-encoding", "gzip".parse().unwrap());
        let c = run(&layer(), r).await;
        assert_eq!(c.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn identity_is_still_accepted_with_decompression_on() {
        let body = r#"{"model":"gpt-4o-mini"}"#;
        let c = run(&layer(), chat("identity", Bytes::from(body), &mini())).await;
        assert_eq!((c.status, c.body), (StatusCode::OK, Bytes::from(body)));
    }

    #[tokio::test]
    async fn decoded_json_keeps_the_ambiguity_rules() {
        for body in [
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
            r#"{"model":1}"#,
        ] {
            let c = run(&layer(), chat("gzip", gzip(body.as_bytes()), &mini())).await;
            assert_eq!(c.status, StatusCode::BAD_REQUEST, "{body}");
        }
        let c = run(&layer(), chat("gzip", gzip(b"not json"), &mini())).await;
        assert_eq!(code(&c), "invalid_json");
    }

    #[tokio::test]
    async fn gzip_multipart_model_is_checked() {
        let form = |model: &str| {
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n"
            )
        };
        let p = principal_with(Permissions::All, &["whisper-1"], &[]);
        let call = |model: &str| {
            encoded(
                "/v1/audio/transcriptions",
                "multipart/form-data; boundary=b",
                "gzip",
                gzip(form(model).as_bytes()),
                &p,
            )
        };
        let c = run(&layer(), call("whisper-1")).await;
        assert_eq!(c.status, StatusCode::OK);
        assert_eq!(c.headers["x-model"], "whisper-1");
        let c = run(&layer(), call("gpt-4o-transcribe")).await;
        assert_eq!(code(&c), "model_not_allowed");
    }

    #[tokio::test]
    async fn routes_without_a_model_never_decode() {
        // The body is not gzip at all: it is never read.
        let r = with(
            &all(),
            Request::delete("/v1/files/file-1")
                .header("content-encoding", "br")
                .body(Full::new(Bytes::from_static(b"junk")))
                .unwrap(),
        );
        let c = run(&layer(), r).await;
        assert_eq!(
            (c.status, c.body),
            (StatusCode::OK, Bytes::from_static(b"junk"))
        );
    }

    #[tokio::test]
    async fn decompression_loads_from_config() {
        let config: ScopeConfig = toml::from_str(
            r#"
            [decompression]
            encodings = ["deflate"]
            max_decompressed = 64
            "#,
        )
        .unwrap();
        let layer = ScopeLayer::from_config(&config).unwrap();
        let p = mini();
        let ok = zlib(br#"{"model":"gpt-4o-mini"}"#);
        assert_eq!(
            run(&layer, chat("deflate", ok, &p)).await.status,
            StatusCode::OK
        );
        let big = zlib(format!(r#"{{"model":"gpt-4o-mini","x":"{}"}}"#, "a".repeat(64)).as_bytes());
        assert_eq!(
            run(&layer, chat("deflate", big, &p)).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let gz = gzip(br#"{"model":"gpt-4o-mini"}"#);
        assert_eq!(
            run(&layer, chat("gzip", gz.clone(), &p)).await.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // Defaults: both codings, and without the table none.
        let defaults: ScopeConfig = toml::from_str("[decompression]").unwrap();
        assert_eq!(defaults.decompression, Some(Decompression::new()));
        let off = ScopeLayer::from_config(&ScopeConfig::default()).unwrap();
        assert_eq!(
            run(&off, chat("gzip", gz, &p)).await.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert!(toml::from_str::<ScopeConfig>("[decompression]\nencodings = [\"br\"]").is_err());
    }
}

#[tokio::test]
async fn content_length_over_limit_is_413_before_reading() {
    let layer = ScopeLayer::openai().with_body_limit(16);
    let r = with(
        &all(),
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-length", "17")
            .body(Full::new(Bytes::from(r#"{"model":"abcdef"}"#)))
            .unwrap(),
    );
    let c = run(&layer, r).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
    );
}

/// A body of `chunks` chunks of `size` bytes with no length, counting what was polled.
struct Chunked {
    left: usize,
    size: usize,
    polled: Arc<AtomicUsize>,
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        self.polled.fetch_add(self.size, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; self.size])))))
    }
}

impl BodyFromBytes for Chunked {
    fn from_bytes(_: Bytes) -> Self {
        unreachable!("never rebuilt in these tests")
    }
}

#[tokio::test]
async fn chunked_body_over_limit_is_413_without_buffering_past_the_limit() {
    let polled = Arc::new(AtomicUsize::new(0));
    let body = Chunked {
        left: 1_000_000,
        size: 1024,
        polled: polled.clone(),
    };
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    r.extensions_mut().insert(all());
    let inner = service_fn(|_: Request<Chunked>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let res = ScopeLayer::openai()
        .with_body_limit(64 * 1024)
        .layer(inner)
        .oneshot(r)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        polled.load(Ordering::SeqCst) <= 64 * 1024 + 1024,
        "read {} bytes",
        polled.load(Ordering::SeqCst)
    );
}

// ---- other model sources ----

#[tokio::test]
async fn path_model_is_checked_on_retrieve() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(&ScopeLayer::openai(), get("/v1/models/gpt-4o", &p)).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );
    let c = run(&ScopeLayer::openai(), get("/v1/models/gpt-4o-mini", &p)).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-model"], "gpt-4o-mini");
}

fn azure_layer() -> ScopeLayer {
    let table = RouteTable::builder()
        .spec(RouteSpec {
            model: vec![
                ModelIn::Path("model".into()),
                ModelIn::Json,
                ModelIn::Query("model".into()),
            ],
            ..RouteSpec::new(
                "POST",
                "/openai/deployments/{model}/chat/completions",
                "chat.completions",
            )
        })
        .model_route(Method::GET, "/q", "q", ModelIn::Query("model".into()))
        .build()
        .unwrap();
    ScopeLayer::new(table)
}

#[tokio::test]
async fn model_in_two_places_must_agree() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let layer = azure_layer();
    let c = run(
        &layer,
        json(
            "/openai/deployments/gpt-4o-mini/chat/completions",
            r#"{"model":"gpt-4o"}"#,
            &p,
        ),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::BAD_REQUEST, "ambiguous_model")
    );
    let c = run(
        &layer,
        json(
            "/openai/deployments/gpt-4o-mini/chat/completions?model=gpt-4o",
            r#"{}"#,
            &p,
        ),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::BAD_REQUEST, "ambiguous_model")
    );
    let c = run(
        &layer,
        json(
            "/openai/deployments/gpt-4o-mini/chat/completions",
            r#"{"model":"gpt-4o-mini"}"#,
            &p,
        ),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    let c = run(
        &layer,
        json("/openai/deployments/gpt-4o/chat/completions", r#"{}"#, &p),
    )
    .await;
    assert_eq!(code(&c), "model_not_allowed");
}

#[tokio::test]
async fn query_model_is_checked_and_duplicates_are_ambiguous() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let layer = azure_layer();
    assert_eq!(
        run(&layer, get("/q?model=gpt-4o-mini", &p)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        code(&run(&layer, get("/q?model=gpt-4o", &p)).await),
        "model_not_allowed"
    );
    assert_eq!(
        code(&run(&layer, get("/q?model=gpt-4o-mini&model=gpt-4o", &p)).await),
        "ambiguous_model"
    );
    assert_eq!(
        code(&run(&layer, get("/q?model=gpt-4o-mini&Model=gpt-4o", &p)).await),
        "ambiguous_model"
    );
    assert_eq!(
        code(&run(&layer, get("/q?mod%65l=gpt-4o", &p)).await),
        "model_not_allowed"
    );
}

fn form(model_fields: &[&str]) -> Request<Full<Bytes>> {
    let mut body = String::from(
        "--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n",
    );
    for m in model_fields {
        body.push_str(&format!(
            "--B0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
        ));
    }
    body.push_str("--B0--\r\n");
    Request::post("/v1/audio/transcriptions")
        .header("content-type", "multipart/form-data; boundary=B0")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn multipart_model_is_checked() {
    let p = principal_with(Permissions::All, &["whisper-1"], &[]);
    let layer = ScopeLayer::openai();
    let sent = form(&["whisper-1"]);
    let bytes = sent.body().clone().collect().await.unwrap().to_bytes();
    let c = run(&layer, with(&p, sent)).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-model"], "whisper-1");
    assert_eq!(
        c.body, bytes,
        "the form reaches the inner service byte-identical"
    );
    assert_eq!(
        code(&run(&layer, with(&p, form(&["gpt-4o-transcribe"]))).await),
        "model_not_allowed"
    );
    assert_eq!(
        code(&run(&layer, with(&p, form(&["whisper-1", "gpt-4o-transcribe"]))).await),
        "ambiguous_model"
    );
}

// ---- gRPC ----

#[cfg(feature = "tonic")]
struct Untouchable(Arc<AtomicUsize>);

#[cfg(feature = "tonic")]
impl Body for Untouchable {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(None)
    }
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn grpc_requests_are_never_buffered() {
    let polled = Arc::new(AtomicUsize::new(0));
    let table = RouteTable::builder()
        .route(Method::POST, "/pkg.Chat/Complete", "chat.completions")
        .build()
        .unwrap();
    let inner = service_fn(|req: Request<tonic::body::Body>| async move {
        drop(req);
        Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
    });
    let svc = ScopeLayer::new(table).layer(inner);
    let mut r = Request::post("/pkg.Chat/Complete")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::new(Untouchable(polled.clone())))
        .unwrap();
    r.extensions_mut().insert(all());
    assert_eq!(
        svc.clone().oneshot(r).await.unwrap().status(),
        StatusCode::OK
    );
    // A gRPC request to a JSON-model route is refused unread, never buffered.
    let svc = ScopeLayer::openai().layer(service_fn(|_: Request<tonic::body::Body>| async {
        Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
    }));
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::new(Untouchable(polled.clone())))
        .unwrap();
    r.extensions_mut().insert(all());
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "3");
    assert_eq!(polled.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn grpc_denials_are_grpc_statuses() {
    let svc = ScopeLayer::openai().layer(service_fn(|_: Request<tonic::body::Body>| async {
        Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
    }));
    let mut r = Request::post("/pkg.Unknown/Method")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::empty())
        .unwrap();
    r.extensions_mut().insert(all());
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "12");
}

// ---- axum ----

#[cfg(feature = "axum")]
#[tokio::test]
async fn works_as_an_axum_layer() {
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let router = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(
                |facts: Option<axum::Extension<RequestFacts>>, body: String| async move {
                    format!(
                        "{}|{body}",
                        facts
                            .and_then(|f| f.0.model().map(str::to_owned))
                            .unwrap_or_default()
                    )
                },
            ),
        )
        .layer(ScopeLayer::openai());
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"model":"gpt-4o-mini"}"#))
        .unwrap();
    r.extensions_mut().insert(p.clone());
    let res = router.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, r#"gpt-4o-mini|{"model":"gpt-4o-mini"}"#);
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"model":"gpt-4o"}"#))
        .unwrap();
    r.extensions_mut().insert(p);
    assert_eq!(
        router.oneshot(r).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_connect_info_is_the_peer() {
    let p = principal_with(Permissions::All, &[], &["10.0.0.0/8"]);
    let mut r = get("/v1/models", &p);
    r.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [10, 1, 1, 1],
            9,
        ))));
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.headers["x-ip"], "10.1.1.1");
}

// ---- hyper ----

/// A real hyper HTTP/1 server on 127.0.0.1 and a hyper client: the peer address comes from
/// the connection, `Incoming` is mapped into a boxed body before the layer, the body reaches
/// the handler byte-identical, and a denial is an OpenAI JSON error on the wire.
#[tokio::test]
async fn works_in_a_hyper_server() {
    use http_body_util::combinators::BoxBody;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &["127.0.0.0/8"]);
    let server = async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let svc = tower::ServiceBuilder::new()
            .map_request(move |req: Request<hyper::body::Incoming>| {
                let mut req = req.map(BodyExt::boxed);
                // What an extract layer and the accept loop put there.
                req.extensions_mut().insert(p.clone());
                req.extensions_mut().insert(peer);
                req
            })
            .layer(ScopeLayer::openai())
            .service(service_fn(
                |req: Request<BoxBody<Bytes, hyper::Error>>| async move {
                    let model = req.extensions().get::<RequestFacts>().unwrap().clone();
                    let model = model.model.unwrap();
                    let ip = req.extensions().get::<ClientIp>().unwrap().0;
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let res = Response::builder()
                        .header("x-model", model.as_str())
                        .header("x-ip", ip.to_string())
                        .body(Full::new(body))
                        .unwrap();
                    Ok::<_, Infallible>(res)
                },
            ));
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
            let send = |body: &'static str| {
                Request::post("/v1/chat/completions")
                    .header("host", "localhost")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap()
            };
            let sent = "{\"model\" : \"gpt-4o-mini\", \"messages\":[]}\n";
            let res = sender.send_request(send(sent)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["x-model"], "gpt-4o-mini");
            assert_eq!(res.headers()["x-ip"], "127.0.0.1");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, sent.as_bytes());

            let res = sender
                .send_request(send(r#"{"model":"gpt-4o"}"#))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::FORBIDDEN);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["error"]["code"], "model_not_allowed");
            // Dropping the sender closes the connection, which ends the server.
        };
        let (conn, ()) = tokio::join!(conn, talk);
        conn.unwrap();
    };
    tokio::join!(server, client);
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn tonic_connect_info_can_be_the_peer() {
    use tonic::transport::server::TcpConnectInfo;
    fn tonic_peer(ext: &http::Extensions) -> Option<std::net::IpAddr> {
        ext.get::<TcpConnectInfo>()?.remote_addr().map(|a| a.ip())
    }
    let p = principal_with(Permissions::All, &[], &["10.0.0.0/8"]);
    let layer = ScopeLayer::openai().with_peer_addr(tonic_peer);
    let mut r = get("/v1/models", &p);
    r.extensions_mut().insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(std::net::SocketAddr::from(([10, 0, 0, 9], 50051))),
    });
    let c = run(&layer, r).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.denial);
    assert_eq!(c.headers["x-ip"], "10.0.0.9");
    // The reader replaces the default: a bare `ClientIp` is not read any more.
    let c = run(&layer, from("10.0.0.9", get("/v1/models", &p))).await;
    assert_eq!(code(&c), "ip_not_allowed");
}

// ---- IP ----

fn from(ip: &str, mut r: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    r.extensions_mut().insert(ClientIp(ip.parse().unwrap()));
    r
}

#[tokio::test]
async fn client_address_must_be_in_range() {
    let p = principal_with(Permissions::All, &[], &["10.0.0.0/8"]);
    let layer = ScopeLayer::openai();
    assert_eq!(
        run(&layer, from("10.2.3.4", get("/v1/models", &p)))
            .await
            .status,
        StatusCode::OK
    );
    let c = run(&layer, from("192.168.1.1", get("/v1/models", &p))).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "ip_not_allowed")
    );
    assert_eq!(
        run(&layer, from("::ffff:10.2.3.4", get("/v1/models", &p)))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_client_address_with_ip_rules_is_refused() {
    let p = principal_with(Permissions::All, &[], &["10.0.0.0/8"]);
    let c = run(&ScopeLayer::openai(), get("/v1/models", &p)).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "ip_not_allowed")
    );
    // Without rules, an unknown address is fine.
    assert_eq!(
        run(&ScopeLayer::openai(), get("/v1/models", &all()))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let p = principal_with(Permissions::All, &[], &["10.0.0.0/8"]);
    let layer = ScopeLayer::openai()
        .with_trusted_proxies(TrustedProxies::new(["192.168.0.0/16".parse().unwrap()]));
    let xff = |peer: &str, xff: &str| {
        let mut r = from(peer, get("/v1/models", &p));
        r.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        r
    };
    assert_eq!(
        run(&layer, xff("192.168.0.1", "10.1.1.1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        run(&layer, xff("192.168.0.1", "10.1.1.1, 8.8.8.8"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // An untrusted peer cannot claim an address.
    assert_eq!(
        run(&layer, xff("8.8.8.8", "10.1.1.1")).await.status,
        StatusCode::FORBIDDEN
    );
}

// ---- policies ----

#[tokio::test]
async fn policy_denial_carries_its_code_and_stage() {
    let layer = ScopeLayer::openai().with_policy(|ctx: &PolicyContext<'_>| {
        if ctx.model() == Some("o1") {
            Err(PolicyDenial::new("no_o1_here", "o1 is off today"))
        } else {
            Ok(())
        }
    });
    let c = run(
        &layer,
        json("/v1/chat/completions", r#"{"model":"o1"}"#, &all()),
    )
    .await;
    assert_eq!((c.status, code(&c)), (StatusCode::FORBIDDEN, "no_o1_here"));
    assert_eq!(c.denial.unwrap().stage(), Stage::Policy);
    assert_eq!(
        run(
            &layer,
            json("/v1/chat/completions", r#"{"model":"o3"}"#, &all())
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn policies_see_the_layer_clock_and_all_must_allow() {
    use time::macros::time;
    // 2026-11-28 is a Saturday.
    let clock = ManualClock::new(Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap());
    let layer = ScopeLayer::openai()
        .with_clock(clock.clock())
        .with_policy(RequireGroup::new("staff"))
        .with_policy(TimeWindow::weekdays(time!(9:00), time!(17:00)));
    let c = run(&layer, get("/v1/models", &all())).await;
    assert_eq!(code(&c), "outside_time_window");
    clock.set(Timestamp::parse_rfc3339("2026-11-30T12:00:00Z").unwrap());
    assert_eq!(
        run(&layer, get("/v1/models", &all())).await.status,
        StatusCode::OK
    );
    let layer = layer.with_policy(MembersOnly::new("research").endpoint("models"));
    assert_eq!(
        code(&run(&layer, get("/v1/models", &all())).await),
        "members_only"
    );
}

#[tokio::test]
async fn conditions_in_the_key_and_project_records_are_enforced() {
    // The key (group "staff") and its project each carry conditions as data.
    let with_records = |key_policies: &[&str], project_policies: &[&str], groups: &[&str]| {
        let base = all();
        let mut key = base.key().clone();
        key.policies = key_policies.iter().map(|l| l.parse().unwrap()).collect();
        key.groups = groups.iter().map(|g| g.to_string()).collect();
        let mut project = base.project().clone();
        project.policies = project_policies
            .iter()
            .map(|l| l.parse().unwrap())
            .collect();
        Principal::new(
            Arc::new(key),
            Arc::new(project),
            Credential::ApiKey(Secret::Current),
        )
    };
    let chat = |p: &Principal, model: &str| {
        json(
            "/v1/chat/completions",
            &format!(r#"{{"model":"{model}"}}"#),
            p,
        )
    };
    let layer = ScopeLayer::openai();
    let outsider = with_records(&["members_only research models=o1*"], &[], &[]);
    let c = run(&layer, chat(&outsider, "o1-mini")).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "members_only")
    );
    assert_eq!(c.denial.unwrap().stage(), Stage::Policy);
    assert_eq!(
        run(&layer, chat(&outsider, "gpt-4o")).await.status,
        StatusCode::OK
    );
    let member = with_records(&["members_only research models=o1*"], &[], &["research"]);
    assert_eq!(
        run(&layer, chat(&member, "o1-mini")).await.status,
        StatusCode::OK
    );
    // The project's conditions bind every key in it, members or not of the key's groups.
    let unlabelled = with_records(&[], &["require_label env=prod"], &["research"]);
    assert_eq!(
        code(&run(&layer, chat(&unlabelled, "gpt-4o")).await),
        "label_required"
    );
    // A time window in the record sees the layer's clock (2026-11-28 is a Saturday).
    let clock = ManualClock::new(Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap());
    let layer = ScopeLayer::openai().with_clock(clock.clock());
    let office = with_records(&["time_window mon-fri 09:00-17:00"], &[], &[]);
    assert_eq!(
        code(&run(&layer, get("/v1/models", &office)).await),
        "outside_time_window"
    );
    clock.set(Timestamp::parse_rfc3339("2026-11-30T12:00:00Z").unwrap());
    assert_eq!(
        run(&layer, get("/v1/models", &office)).await.status,
        StatusCode::OK
    );
    // An endpoint group reserved in the record.
    let no_images = with_records(&["members_only design endpoints=images"], &[], &[]);
    let c = run(
        &layer,
        json(
            "/v1/images/generations",
            r#"{"model":"dall-e-3","prompt":"x"}"#,
            &no_images,
        ),
    )
    .await;
    assert_eq!(code(&c), "members_only");
}

// ---- models list ----

#[tokio::test]
async fn models_list_shows_only_allowed_models() {
    let upstream = service_fn(|_: Request<Full<Bytes>>| async {
        let body = r#"{"object":"list","data":[{"id":"gpt-4o","object":"model"},{"id":"gpt-4o-mini","object":"model"},{"id":"o1","object":"model"}]}"#;
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
    });
    let svc = ModelListLayer::new().layer(upstream);
    let p = principal_with(Permissions::All, &["gpt-4o-mini", "o1*"], &[]);
    let res = svc.clone().oneshot(get("/v1/models", &p)).await.unwrap();
    let len: usize = res.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(len, body.len());
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = doc["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini", "o1"]);
    // Without model rules the answer is untouched.
    let res = svc.oneshot(get("/v1/models", &all())).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn unreadable_models_list_is_not_passed_to_restricted_callers() {
    let upstream = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(Full::new(Bytes::from_static(b"\x1f\x8b...")))
                .unwrap(),
        )
    });
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let res = ModelListLayer::new()
        .layer(upstream)
        .oneshot(get("/v1/models", &p))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn service_poll_ready_forwards_to_inner() {
    let mut svc = ScopeLayer::openai().layer(service_fn(echo));
    std::future::poll_fn(|cx| Service::<Request<Full<Bytes>>>::poll_ready(&mut svc, cx))
        .await
        .unwrap();
}

// ---- raw vs canonical ----

/// RFC 3986 normalisation: decode unreserved escapes, remove dot segments, collapse `//`.
fn canonical(raw: &str) -> String {
    let mut decoded = String::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&raw[i + 1..i + 3], 16)
            && (v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(v as char);
            i += 3;
            continue;
        }
        decoded.push(b[i] as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !out.is_empty();
    format!("/{}{}", out.join("/"), if trailing { "/" } else { "" })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    #[test]
    fn decision_on_raw_equals_decision_on_canonical_or_raw_is_rejected(
        segs in proptest::collection::vec(
            proptest::sample::select(vec![
                "v1", "models", "files", "f", "content", "chat", "completions", "gpt-4o",
                ".", "..", "", "%2e", "%2E%2e", "%76%31", "%6dodels", "V1", "%2f", "x;y", "%20",
            ]),
            1..6,
        ),
        delete in proptest::bool::ANY,
    ) {
        let raw = format!("/{}", segs.join("/"));
        let Ok(uri) = raw.parse::<http::Uri>() else { return Ok(()); };
        let p = principal_with(restricted(&[("models", Access::Read), ("files", Access::Write)]), &["gpt-4o-mini"], &[]);
        let method = if delete { Method::DELETE } else { Method::GET };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let decide = |path: String| {
            let r = with(&p, Request::builder().method(method.clone()).uri(path).body(Full::default()).unwrap());
            rt.block_on(run(&ScopeLayer::openai(), r)).status
        };
        let raw_status = decide(uri.path().to_owned());
        if raw_status != StatusCode::BAD_REQUEST {
            let canon = canonical(uri.path());
            proptest::prop_assert_eq!(raw_status, decide(canon.clone()), "raw {} canonical {}", raw, canon);
        }
    }
}

#[tokio::test]
async fn layer_loads_from_config() {
    let config: ScopeConfig = toml::from_str(
        r#"
        body_limit = 32
        [trusted_proxies]
        ranges = ["192.168.0.0/16"]
        [[routes]]
        method = "GET"
        path = "/internal/stats"
        group = "stats"
        [[policies]]
        type = "require_group"
        group = "ops"
        "#,
    )
    .unwrap();
    let layer = ScopeLayer::from_config(&config).unwrap();
    let p = principal_with(Permissions::All, &[], &[]);
    assert_eq!(
        code(&run(&layer, get("/internal/stats", &p)).await),
        "group_required"
    );
    assert_eq!(
        code(&run(&layer, get("/v1/nope", &p)).await),
        "unknown_route"
    );
    let big = json(
        "/v1/embeddings",
        &format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(64)),
        &p,
    );
    assert_eq!(code(&run(&layer, big).await), "request_too_large");
    let bad: ScopeConfig =
        toml::from_str("[[routes]]\nmethod = \"GET\"\npath = \"nope\"\ngroup = \"g\"").unwrap();
    assert!(matches!(
        ScopeLayer::from_config(&bad),
        Err(ScopeConfigError::Route(_))
    ));
}

#[tokio::test]
async fn records_group_and_model_in_the_request_trace_even_when_denied() {
    let mini = principal_with(
        restricted(&[("chat.completions", Access::Write)]),
        &["gpt-4o-mini"],
        &[],
    );
    // Allowed: the group and the body's model are recorded for the outer audit layer.
    let trace = keygate_core::RequestTrace::new();
    let mut r = json(
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        &mini,
    );
    r.extensions_mut().insert(trace.clone());
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(
        trace.endpoint_group().map(|g| g.as_str()),
        Some("chat.completions")
    );
    assert_eq!(trace.model().map(|m| &**m), Some("gpt-4o-mini"));

    // Denied for the model: the audit record still says which model was refused.
    let trace = keygate_core::RequestTrace::new();
    let mut r = json("/v1/chat/completions", r#"{"model":"gpt-4o"}"#, &mini);
    r.extensions_mut().insert(trace.clone());
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(code(&c), "model_not_allowed");
    assert_eq!(trace.model().map(|m| &**m), Some("gpt-4o"));

    // Denied for the group: the group is recorded, no model was read.
    let trace = keygate_core::RequestTrace::new();
    let mut r = json("/v1/embeddings", r#"{"model":"gpt-4o-mini"}"#, &mini);
    r.extensions_mut().insert(trace.clone());
    let c = run(&ScopeLayer::openai(), r).await;
    assert_eq!(code(&c), "insufficient_permissions");
    assert_eq!(
        trace.endpoint_group().map(|g| g.as_str()),
        Some("embeddings")
    );
    assert!(trace.model().is_none());
}

// ---- model rules on every route ----

/// A request to a preset route, naming `model` wherever the route takes one (or nowhere).
fn preset_request(spec: &RouteSpec, model: Option<&str>) -> Request<Full<Bytes>> {
    let mut path = String::new();
    for seg in spec.path.split('/').skip(1) {
        path.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) if spec.model.contains(&ModelIn::Path(name.into())) => {
                path.push_str(model.unwrap_or("x"))
            }
            Some(_) => path.push_str("obj_1"),
            None => path.push_str(seg),
        }
    }
    let named = |m: Option<&str>| m.map_or(String::from("{}"), |m| format!(r#"{{"model":"{m}"}}"#));
    let builder = Request::builder().method(spec.method.as_str()).uri(path);
    if spec.model.contains(&ModelIn::Multipart) {
        let mut body = String::from(
            "--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nx\r\n",
        );
        if let Some(m) = model {
            body.push_str(&format!(
                "--B0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
            ));
        }
        body.push_str("--B0--\r\n");
        return builder
            .header("content-type", "multipart/form-data; boundary=B0")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    if spec.method == "GET" || spec.method == "DELETE" {
        return builder.body(Full::default()).unwrap();
    }
    builder
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(named(model))))
        .unwrap()
}

/// Every preset route either checks the model (named, the API's default, or named to override
/// an indirect one) or refuses a model-restricted key: no route gets another model's work done.
#[tokio::test]
async fn every_preset_route_checks_the_model_or_refuses_a_restricted_key() {
    use keygate_core::Generation;
    let layer = ScopeLayer::openai();
    let restricted = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let mut checked = 0;
    for spec in RouteTable::openai_specs() {
        let bills = spec.generates.is_some_and(Generation::bills);
        let carries = !spec.model.is_empty();
        let label = format!("{} {}", spec.method, spec.path);
        // Naming a model outside the rules is refused wherever a model does the work.
        if bills || carries || spec.model_indirect {
            let c = run(
                &layer,
                with(&restricted, preset_request(&spec, Some("gpt-4o"))),
            )
            .await;
            assert!(
                c.status == StatusCode::FORBIDDEN || c.status == StatusCode::BAD_REQUEST,
                "{label}: {:?}",
                c.status
            );
            checked += 1;
        }
        // Naming none: refused where work is done (model required, the default checked, or
        // the indirect model unverifiable).
        if bills || spec.model_indirect {
            let c = run(&layer, with(&restricted, preset_request(&spec, None))).await;
            assert!(
                matches!(
                    code(&c),
                    "model_required" | "model_not_allowed" | "model_unverifiable"
                ),
                "{label}: {:?} {}",
                c.status,
                code(&c)
            );
        }
        // Naming an allowed model passes where a request can name one.
        if carries {
            let c = run(
                &layer,
                with(&restricted, preset_request(&spec, Some("gpt-4o-mini"))),
            )
            .await;
            assert_eq!(c.status, StatusCode::OK, "{label}: {}", code(&c));
        }
        // Routes that make nothing and carry no model need none.
        if !bills && !carries && !spec.model_indirect {
            let c = run(&layer, with(&restricted, preset_request(&spec, None))).await;
            assert_eq!(c.status, StatusCode::OK, "{label}: {}", code(&c));
        }
    }
    assert!(checked >= 20, "{checked}");
}

// ---- batch input files ----

fn upload(purpose: &str, file: &str) -> Request<Full<Bytes>> {
    let body = format!(
        "--B0\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{file}\r\n--B0--\r\n"
    );
    Request::post("/v1/files")
        .header("content-type", "multipart/form-data; boundary=B0")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn batch_line(model: &str) -> String {
    format!(
        r#"{{"custom_id":"r","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#
    )
}

#[tokio::test]
async fn a_batch_file_naming_a_model_outside_the_rules_is_refused_at_upload() {
    let layer = ScopeLayer::openai();
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let file = format!("{}\n{}\n", batch_line("gpt-4o-mini"), batch_line("gpt-4o"));
    let c = run(&layer, with(&p, upload("batch", &file))).await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );
    let file = format!(
        "{}\n{}\n",
        batch_line("gpt-4o-mini"),
        batch_line("gpt-4o-mini")
    );
    let c = run(&layer, with(&p, upload("batch", &file))).await;
    assert_eq!(c.status, StatusCode::OK, "{}", code(&c));
    // A line without a model is refused for a restricted key.
    let c = run(&layer, with(&p, upload("batch", r#"{"body":{}}"#))).await;
    assert_eq!(code(&c), "invalid_batch_file");
    // Other purposes are not requests: not checked.
    let c = run(
        &layer,
        with(&p, upload("assistants", &batch_line("gpt-4o"))),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    // A key without model rules uploads anything, unread.
    let c = run(&layer, with(&all(), upload("batch", &batch_line("gpt-4o")))).await;
    assert_eq!(c.status, StatusCode::OK);
}

#[tokio::test]
async fn the_models_of_a_batch_file_are_carried_in_the_facts() {
    let p = principal_with(Permissions::All, &["gpt-4o*"], &[]);
    let svc = tower::ServiceBuilder::new()
        .layer(ScopeLayer::openai())
        .service_fn(|req: Request<Full<Bytes>>| async move {
            let facts = req.extensions().get::<RequestFacts>().unwrap();
            let models = facts.batch_models.clone().unwrap_or_default().join(",");
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(models))))
        });
    let file = format!("{}\n{}\n", batch_line("gpt-4o-mini"), batch_line("gpt-4o"));
    let res = svc.oneshot(with(&p, upload("batch", &file))).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "gpt-4o,gpt-4o-mini");
}

#[tokio::test]
async fn a_batch_upload_in_parts_is_refused_for_a_restricted_key() {
    let layer = ScopeLayer::openai();
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    let c = run(
        &layer,
        json(
            "/v1/uploads",
            r#"{"purpose":"batch","filename":"b.jsonl","bytes":10,"mime_type":"text/jsonl"}"#,
            &p,
        ),
    )
    .await;
    assert_eq!(code(&c), "model_unverifiable");
    let c = run(
        &layer,
        json(
            "/v1/uploads",
            r#"{"purpose":"assistants","filename":"a.pdf","bytes":10,"mime_type":"application/pdf"}"#,
            &p,
        ),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
}

/// An inner service that counts the requests that reach it in `calls`.
fn counting(
    calls: &Arc<AtomicUsize>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    let seen = calls.clone();
    service_fn(move |_: Request<Full<Bytes>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
    })
}

#[tokio::test]
async fn a_batch_file_over_the_body_limit_is_413_naming_the_limit_and_never_forwarded() {
    let layer = ScopeLayer::openai().with_body_limit(1024);
    let p = principal_with(Permissions::All, &["gpt-4o-mini"], &[]);
    // Allowed lines up to past the limit, then one naming a model the key may not use: only
    // a read of the whole file could find it.
    let file = format!(
        "{}{}\n",
        format!("{}\n", batch_line("gpt-4o-mini")).repeat(12),
        batch_line("gpt-4o")
    );
    assert!(file.len() > 1024);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(counting(&calls));
    // Declared too large: refused before reading.
    let mut declared = with(&p, upload("batch", &file));
    let len = declared.body().size_hint().exact().unwrap();
    declared
        .headers_mut()
        .insert("content-length", len.to_string().parse().unwrap());
    // Of no declared length: refused when the read passes the limit.
    for req in [declared, with(&p, upload("batch", &file))] {
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let denial = res.extensions().get::<Denial>().unwrap().clone();
        assert_eq!(denial.code(), "request_too_large");
        assert_eq!(denial.param(), Some("file"));
        let message = denial.message();
        assert!(
            message.contains("larger than 1024 bytes")
                && message.contains("keys with model rules can upload files of up to 1024 bytes"),
            "{message}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "an unverified batch file was forwarded"
    );
    // Within a limit that holds it, the file is read whole and its last line refused.
    let c = run(
        &ScopeLayer::openai().with_body_limit(4096),
        with(&p, upload("batch", &file)),
    )
    .await;
    assert_eq!(
        (c.status, code(&c)),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );
    // A key without model rules has nothing to verify: its upload is forwarded unread.
    let calls = Arc::new(AtomicUsize::new(0));
    let res = layer
        .layer(counting(&calls))
        .oneshot(with(&all(), upload("batch", &file)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_endless_batch_upload_is_refused_without_reading_past_the_limit() {
    let polled = Arc::new(AtomicUsize::new(0));
    let body = Chunked {
        left: 1_000_000,
        size: 1024,
        polled: polled.clone(),
    };
    let mut r = Request::post("/v1/files")
        .header("content-type", "multipart/form-data; boundary=B0")
        .body(body)
        .unwrap();
    r.extensions_mut()
        .insert(principal_with(Permissions::All, &["gpt-4o-mini"], &[]));
    let inner = service_fn(|_: Request<Chunked>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let res = ScopeLayer::openai()
        .with_body_limit(64 * 1024)
        .layer(inner)
        .oneshot(r)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let denial = res.extensions().get::<Denial>().unwrap();
    assert!(
        denial.message().contains("65536 bytes"),
        "{}",
        denial.message()
    );
    assert!(polled.load(Ordering::SeqCst) <= 64 * 1024 + 1024);
}

// ---- image forms ----

fn image_form(path: &str, fields: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut body = String::from(
        "--B0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x089PNG\r\n",
    );
    for (name, value) in fields {
        body.push_str(&format!(
            "--B0\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--B0--\r\n");
    Request::post(path)
        .header("content-type", "multipart/form-data; boundary=B0")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Reports the image facts the layer decided.
async fn image_facts(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let f = req.extensions().get::<RequestFacts>().unwrap();
    let text = format!(
        "{} {} {:?} {:?}",
        f.model().unwrap_or(""),
        f.choices,
        f.image_size.as_deref(),
        f.image_quality.as_deref()
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}

#[tokio::test]
async fn image_forms_carry_n_size_and_quality_in_the_facts() {
    let svc = ScopeLayer::openai().layer(service_fn(image_facts));
    let facts = |req| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(with(&all(), req)).await.unwrap();
            let status = res.status();
            let denial = res.extensions().get::<Denial>().cloned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, denial, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (_, _, text) = facts(image_form(
        "/v1/images/edits",
        &[
            ("prompt", "a hat"),
            ("n", "3"),
            ("size", "512x512"),
            ("quality", "hd"),
        ],
    ))
    .await;
    assert_eq!(text, r#"dall-e-2 3 Some("512x512") Some("hd")"#);
    let (_, _, text) = facts(image_form("/v1/images/variations", &[])).await;
    assert_eq!(text, "dall-e-2 1 None None");
    // n as the API reads it or refused; a field twice is refused, never guessed.
    for bad in ["0", "two", "2.0", " 2", ""] {
        let (status, denial, _) = facts(image_form("/v1/images/variations", &[("n", bad)])).await;
        let denial = denial.unwrap();
        assert_eq!(
            (status, denial.code(), denial.param()),
            (StatusCode::BAD_REQUEST, "invalid_value", Some("n")),
            "{bad:?}"
        );
    }
    let (status, denial, _) = facts(image_form(
        "/v1/images/edits",
        &[("size", "256x256"), ("size", "1024x1024")],
    ))
    .await;
    let denial = denial.unwrap();
    assert_eq!(
        (status, denial.code(), denial.param()),
        (StatusCode::BAD_REQUEST, "invalid_form", Some("size"))
    );
}
