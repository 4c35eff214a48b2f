//! Object ownership through the whole layer, against a small upstream that creates objects.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{
    Credential, KeyDigest, KeyId, KeyRecord, MemoryRegistry, ModelPattern, ModelRules, ObjectKind,
    ObjectRecord, ObjectRegistry, Permissions, Principal, ProjectRecord, RegistryError,
    RegistryFuture, RequestFacts, Secret, Timestamp,
};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt, service_fn};

use crate::objects::Owner;
use crate::*;

fn key_of(project: &str, models: &[&str]) -> Principal {
    let mut key = KeyRecord::new(
        KeyId::new(format!("key_{project}")),
        project,
        KeyDigest::of(project),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    if !models.is_empty() {
        key.models = ModelRules::allow_only(models.iter().map(|m| ModelPattern::new(m).unwrap()));
    }
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new(project)),
        Credential::ApiKey(Secret::Current),
    )
}

/// An upstream that makes an object for every POST (its kind from the path), answers every
/// other request with what it was asked, and counts its calls.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    next: Arc<AtomicUsize>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn answer(&self, req: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let model = req
            .extensions()
            .get::<RequestFacts>()
            .and_then(|f| f.model().map(str::to_owned));
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let object = |id: String, object: &str| json!({"id": id, "object": object, "model": sent.get("model").cloned().unwrap_or(Value::Null)});
        let (status, value, sse) = match (path.as_str(), &sent) {
            ("/v1/files", _) => (200, object(format!("file-{n}"), "file"), false),
            ("/v1/assistants", _) => (200, object(format!("asst_{n}"), "assistant"), false),
            ("/v1/threads/runs", s) if s["stream"] == true => (
                200,
                json!({"id": format!("run_{n}"), "object": "thread.run", "thread_id": format!("thread_{n}"), "model": "gpt-4o"}),
                true,
            ),
            ("/v1/responses", s) if s["stream"] == true => (
                200,
                json!({"type": "response.created", "response": object(format!("resp_{n}"), "response")}),
                true,
            ),
            ("/v1/responses", _) => (200, object(format!("resp_{n}"), "response"), false),
            ("/v1/chat/completions", _) => (
                200,
                object(format!("chatcmpl-{n}"), "chat.completion"),
                false,
            ),
            ("/v1/fail", _) => (400, json!({"id": "file-x", "object": "file"}), false),
            _ => (
                200,
                json!({"path": path, "model": model, "deleted": true}),
                false,
            ),
        };
        let body = if sse {
            format!("event: created\ndata: {value}\n\ndata: [DONE]\n\n")
        } else {
            value.to_string()
        };
        Response::builder()
            .status(status)
            .header(
                "content-type",
                if sse {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }
}

struct Gate {
    layer: ScopeLayer,
    registry: Arc<MemoryRegistry>,
    upstream: Upstream,
}

impl Gate {
    fn new() -> Self {
        let registry = Arc::new(MemoryRegistry::new());
        Gate {
            layer: ScopeLayer::openai().with_objects(registry.clone()),
            registry,
            upstream: Upstream::default(),
        }
    }

    async fn call(
        &self,
        who: &Principal,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let upstream = self.upstream.clone();
        let svc = self.layer.layer(service_fn(move |req| {
            let upstream = upstream.clone();
            async move { Ok::<_, Infallible>(upstream.answer(req).await) }
        }));
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = req.body(Full::new(Bytes::from(bytes))).unwrap();
        req.extensions_mut().insert(who.clone());
        let res = svc.oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, value)
    }

    /// Creates an object through the gateway as `who`; its id.
    async fn create(&self, who: &Principal, path: &str, body: Value) -> String {
        let (status, v) = self.call(who, Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn an_object_is_reachable_only_by_the_project_that_made_it() {
    let gate = Gate::new();
    let (a, b) = (key_of("a", &[]), key_of("b", &[]));
    let asst = gate
        .create(&a, "/v1/assistants", json!({"model": "gpt-4o"}))
        .await;
    let record = gate.registry.get_now(&asst).unwrap();
    assert_eq!(
        (record.project.as_str(), record.kind),
        ("a", ObjectKind::Assistant)
    );
    assert_eq!(record.key_id, "key_a");
    assert_eq!(record.model.as_deref(), Some("gpt-4o"));

    let path = format!("/v1/assistants/{asst}");
    let (status, _) = gate.call(&a, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let before = gate.upstream.calls();
    for (who, path) in [
        (&b, path.clone()),
        // Unknown, and known but of another kind in that place.
        (&a, "/v1/assistants/asst_nope".to_owned()),
        (&a, format!("/v1/files/{asst}")),
        (&a, format!("/v1/threads/{asst}")),
    ] {
        let (status, v) = gate.call(who, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["code"], "object_not_found");
    }
    assert_eq!(gate.upstream.calls(), before, "the upstream is never asked");
}

#[tokio::test]
async fn objects_named_in_a_body_must_be_the_callers_at_any_depth() {
    let gate = Gate::new();
    let (a, b) = (key_of("a", &[]), key_of("b", &[]));
    let file = gate
        .create(&b, "/v1/assistants", json!({"model": "m"}))
        .await;
    let _ = file;
    gate.registry.record_now([
        ObjectRecord::new("file-b", ObjectKind::File, "b", "key_b", 1),
        ObjectRecord::new("file-a", ObjectKind::File, "a", "key_a", 1),
    ]);
    let before = gate.upstream.calls();
    for (path, body, param) in [
        (
            "/v1/batches",
            json!({"input_file_id": "file-b", "endpoint": "/v1/chat/completions"}),
            "input_file_id",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-b"}}]}]}),
            "file_id",
        ),
        (
            "/v1/vector_stores",
            json!({"file_ids": ["file-a", "file-b"]}),
            "file_ids",
        ),
        (
            "/v1/threads",
            json!({"messages": [{"role": "user", "content": "x", "attachments": [{"file_id": "file-b"}]}]}),
            "file_id",
        ),
    ] {
        let (status, v) = gate.call(&a, Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["param"], param, "{path}");
    }
    assert_eq!(gate.upstream.calls(), before);
    // The caller's own objects, and ids in `metadata` (the client's own keys), pass.
    let (status, v) = gate
        .call(
            &a,
            Method::POST,
            "/v1/vector_stores",
            Some(json!({"file_ids": ["file-a"], "metadata": {"file_id": "file-b"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // An empty body on a route read only for the objects it names names none.
    let (status, _) = gate.call(&a, Method::POST, "/v1/threads", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_run_is_checked_and_priced_as_its_assistants_model() {
    let gate = Gate::new();
    let maker = key_of("a", &[]);
    let asst = gate
        .create(&maker, "/v1/assistants", json!({"model": "gpt-4o"}))
        .await;
    let mini_only = key_of("a", &["gpt-4o-mini"]);
    let (status, v) = gate
        .call(
            &mini_only,
            Method::POST,
            "/v1/threads/runs",
            Some(json!({"assistant_id": asst})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "model_not_allowed");
    let allowed = key_of("a", &["gpt-4o"]);
    let (status, v) = gate
        .call(
            &allowed,
            Method::POST,
            "/v1/threads/runs",
            Some(json!({"assistant_id": asst, "stream": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // The run and its new thread, read from the stream, are the caller's.
    let runs: Vec<_> = (0..10)
        .filter_map(|n| gate.registry.get_now(&format!("run_{n}")))
        .collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].model.as_deref(), Some("gpt-4o"));
    let thread = runs[0].id.replace("run_", "thread_");
    assert_eq!(gate.registry.get_now(&thread).unwrap().project, "a");
    // A tool-output submission is checked as its run's model.
    let submit = format!(
        "/v1/threads/{thread}/runs/{}/submit_tool_outputs",
        runs[0].id
    );
    let (status, _) = gate
        .call(
            &mini_only,
            Method::POST,
            &submit,
            Some(json!({"tool_outputs": []})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, v) = gate
        .call(
            &allowed,
            Method::POST,
            &submit,
            Some(json!({"tool_outputs": []})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], "gpt-4o", "the facts carry the inherited model");
}

#[tokio::test]
async fn a_batch_is_checked_as_the_models_of_its_input_file() {
    let gate = Gate::new();
    gate.registry.record_now([
        ObjectRecord::new("file-read", ObjectKind::File, "a", "k", 1)
            .with_models(vec!["gpt-4o".into(), "gpt-4o-mini".into()]),
        ObjectRecord::new("file-unread", ObjectKind::File, "a", "k", 1),
    ]);
    let batch = |file: &str| json!({"input_file_id": file, "endpoint": "/v1/chat/completions"});
    let both = key_of("a", &["gpt-4o", "gpt-4o-mini"]);
    let (status, v) = gate
        .call(&both, Method::POST, "/v1/batches", Some(batch("file-read")))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mini = key_of("a", &["gpt-4o-mini"]);
    let (status, v) = gate
        .call(&mini, Method::POST, "/v1/batches", Some(batch("file-read")))
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("model_not_allowed"))
    );
    let (status, v) = gate
        .call(
            &both,
            Method::POST,
            "/v1/batches",
            Some(batch("file-unread")),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("model_unverifiable"))
    );
    // A key without model rules may batch any file of its project.
    let any = key_of("a", &[]);
    let (status, _) = gate
        .call(
            &any,
            Method::POST,
            "/v1/batches",
            Some(batch("file-unread")),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_continued_response_must_be_the_callers_and_of_an_allowed_model() {
    let gate = Gate::new();
    let a = key_of("a", &[]);
    let first = gate
        .create(
            &a,
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "hi"}),
        )
        .await;
    let mini = key_of("a", &["gpt-4o-mini"]);
    let next = json!({"model": "gpt-4o-mini", "input": "more", "previous_response_id": first});
    let (status, v) = gate
        .call(&mini, Method::POST, "/v1/responses", Some(next.clone()))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["param"], "previous_response_id");
    let (status, _) = gate
        .call(&key_of("b", &[]), Method::POST, "/v1/responses", Some(next))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Not stored: not recorded; streamed: recorded from its first event.
    let unstored = gate
        .create(
            &a,
            "/v1/responses",
            json!({"model": "m", "input": "x", "store": false}),
        )
        .await;
    assert!(gate.registry.get_now(&unstored).is_none());
    let (status, _) = gate
        .call(
            &a,
            Method::POST,
            "/v1/responses",
            Some(json!({"model": "m", "input": "x", "stream": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(gate.registry.len(), 2);
}

#[tokio::test]
async fn chat_completions_are_recorded_only_when_stored_and_deletes_forget() {
    let gate = Gate::new();
    let a = key_of("a", &[]);
    let plain = gate
        .create(
            &a,
            "/v1/chat/completions",
            json!({"model": "m", "messages": []}),
        )
        .await;
    assert!(gate.registry.get_now(&plain).is_none());
    let stored = gate
        .create(
            &a,
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "store": true}),
        )
        .await;
    assert_eq!(
        gate.registry.get_now(&stored).unwrap().kind,
        ObjectKind::ChatCompletion
    );
    let path = format!("/v1/chat/completions/{stored}");
    let (status, _) = gate
        .call(&key_of("b", &[]), Method::DELETE, &path, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(gate.registry.get_now(&stored).is_some());
    let (status, _) = gate.call(&a, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(gate.registry.get_now(&stored).is_none());
    let (status, _) = gate.call(&a, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_upstream_refusal_records_nothing() {
    let registry = Arc::new(MemoryRegistry::new());
    let mut spec = RouteSpec::new("POST", "/v1/fail", "files");
    spec.records = true;
    let routes = RouteTable::builder().spec(spec).build().unwrap();
    let gate = Gate {
        layer: ScopeLayer::new(routes).with_objects(registry.clone()),
        registry,
        upstream: Upstream::default(),
    };
    let (status, _) = gate
        .call(&key_of("a", &[]), Method::POST, "/v1/fail", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(gate.registry.is_empty());
}

/// A registry that cannot be reached.
struct Down;

impl ObjectRegistry for Down {
    fn get<'a>(&'a self, _: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        Box::pin(async { Err(RegistryError::new("down")) })
    }
    fn record(&self, _: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        Box::pin(async { Err(RegistryError::new("down")) })
    }
    fn remove<'a>(&'a self, _: &'a str) -> RegistryFuture<'a, ()> {
        Box::pin(async { Err(RegistryError::new("down")) })
    }
}

#[tokio::test]
async fn a_registry_that_cannot_answer_refuses_with_503() {
    let gate = Gate {
        layer: ScopeLayer::openai().with_objects(Arc::new(Down)),
        registry: Arc::new(MemoryRegistry::new()),
        upstream: Upstream::default(),
    };
    let (status, v) = gate
        .call(&key_of("a", &[]), Method::GET, "/v1/files/file-1", None)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(gate.upstream.calls(), 0);
    // Routes that name no object do not need it.
    let (status, _) = gate
        .call(&key_of("a", &[]), Method::GET, "/v1/models", None)
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// An upstream list of `total` objects `o0`… (newest first), served three per page whatever
/// the `limit`, honouring `after`; counts the pages served.
fn paged_upstream(
    total: usize,
    pages: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let pages = pages.clone();
        async move {
            pages.fetch_add(1, Ordering::SeqCst);
            let query = req.uri().query().unwrap_or("");
            let after = query
                .split('&')
                .find_map(|p| p.strip_prefix("after="))
                .and_then(|a| a.strip_prefix('o'))
                .and_then(|n| n.parse::<usize>().ok());
            let start = after.map_or(0, |n| total - n);
            let ids: Vec<usize> = (0..total).rev().skip(start).take(3).collect();
            let data: Vec<Value> = ids
                .iter()
                .map(|n| json!({"id": format!("o{n}"), "object": "file"}))
                .collect();
            let more = start + ids.len() < total;
            let body = json!({"object": "list", "data": data, "first_id": null, "last_id": null, "has_more": more});
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap(),
            )
        }
    })
}

async fn list_page(
    registry: &Arc<MemoryRegistry>,
    total: usize,
    who: &Principal,
    query: &str,
) -> (StatusCode, Value, usize) {
    let pages = Arc::new(AtomicUsize::new(0));
    let svc = ObjectListLayer::new(registry.clone()).layer(paged_upstream(total, pages.clone()));
    let svc = ScopeLayer::openai()
        .with_objects(registry.clone())
        .layer(svc);
    let mut req = Request::get(format!("/v1/files{query}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(who.clone());
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap(),
        pages.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn a_list_reads_upstream_pages_until_its_page_is_full_and_says_truly_whether_more_follow() {
    let registry = Arc::new(MemoryRegistry::new());
    // Of 30 files, the caller's are o25, o17, o4 (one in ten, far apart).
    let total = 30;
    registry.record_now((0..total).map(|n| {
        let project = if [25, 17, 4].contains(&n) { "a" } else { "b" };
        ObjectRecord::new(format!("o{n}"), ObjectKind::File, project, "k", 0)
    }));
    let a = key_of("a", &[]);
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, v, read) = list_page(&registry, total, &a, "?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(ids(&v), ["o25", "o17"]);
    assert_eq!(
        (v["first_id"].as_str(), v["last_id"].as_str()),
        (Some("o25"), Some("o17"))
    );
    assert_eq!(v["has_more"], true);
    // Pages of three: o29..o27, …, up to o5..o3, where o4 (the look-ahead) is found.
    assert_eq!(read, 9);
    let (_, v, _) = list_page(&registry, total, &a, "?limit=2&after=o17").await;
    assert_eq!(ids(&v), ["o4"]);
    assert_eq!(v["has_more"], false, "nothing of the caller's follows");
    // Another project's list never shows the caller's objects.
    let (_, v, _) = list_page(&registry, total, &key_of("b", &[]), "?limit=100").await;
    assert_eq!(ids(&v).len(), 27);
    assert!(!ids(&v).contains(&"o25".to_owned()));
}

#[tokio::test]
async fn a_list_too_sparse_to_fill_within_the_page_budget_says_so() {
    let registry = Arc::new(MemoryRegistry::new());
    // More upstream pages of other projects' objects than one request reads.
    let total = 3 * MAX_LIST_PAGES + 3;
    registry.record_now([ObjectRecord::new("o0", ObjectKind::File, "a", "k", 0)]);
    let (status, v, read) = list_page(&registry, total, &key_of("a", &[]), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "list_too_sparse");
    assert_eq!(read, MAX_LIST_PAGES);
    let (status, v, _) = list_page(&registry, 3 * MAX_LIST_PAGES, &key_of("a", &[]), "").await;
    assert_eq!((status, ids_len(&v)), (StatusCode::OK, 1), "{v}");
}

fn ids_len(v: &Value) -> usize {
    v["data"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_fine_tuned_model_is_its_projects_alone() {
    let gate = Gate::new();
    let (a, b) = (key_of("a", &[]), key_of("b", &[]));
    // A job seen done: the model it made is the job's project's.
    gate.registry.record_now([ObjectRecord::new(
        "ftjob-1",
        ObjectKind::FineTuningJob,
        "a",
        "key_a",
        1,
    )]);
    let owner = Owner {
        registry: gate.registry.clone(),
        project: "a".into(),
        key_id: "key_a".into(),
        now: 2,
        batch_models: None,
    };
    let mut found = Vec::new();
    crate::objects::objects_of(
        &json!({"id": "ftjob-1", "object": "fine_tuning.job", "model": "gpt-4o-mini", "fine_tuned_model": "ft:gpt-4o-mini:org::x1"}),
        &owner,
        &mut found,
    );
    assert_eq!(found[1].kind, ObjectKind::Model);
    gate.registry.record_now(found);
    let chat = |model: &str| json!({"model": model, "messages": []});
    let (status, _) = gate
        .call(
            &a,
            Method::POST,
            "/v1/chat/completions",
            Some(chat("ft:gpt-4o-mini:org::x1")),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for (who, model) in [
        (&b, "ft:gpt-4o-mini:org::x1"),
        (&a, "ft:gpt-4o-mini:org::other"),
    ] {
        let (status, v) = gate
            .call(who, Method::POST, "/v1/chat/completions", Some(chat(model)))
            .await;
        assert_eq!(
            (status, &v["error"]["param"]),
            (StatusCode::NOT_FOUND, &json!("model"))
        );
    }
    let path = "/v1/models/ft:gpt-4o-mini:org::x1";
    let (status, _) = gate.call(&b, Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = gate.call(&a, Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(gate.registry.get_now("ft:gpt-4o-mini:org::x1").is_none());
    // Models that are not fine-tuned need no owner.
    let (status, _) = gate
        .call(
            &b,
            Method::POST,
            "/v1/chat/completions",
            Some(chat("gpt-4o")),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_models_list_shows_only_the_callers_fine_tuned_models() {
    let registry = Arc::new(MemoryRegistry::new());
    registry.record_now([
        ObjectRecord::new("ft:m:org::a", ObjectKind::Model, "a", "k", 0),
        ObjectRecord::new("ft:m:org::b", ObjectKind::Model, "b", "k", 0),
    ]);
    let upstream = service_fn(|_req: Request<Full<Bytes>>| async {
        let data: Vec<Value> = ["gpt-4o", "ft:m:org::a", "ft:m:org::b", "ft:m:org::unknown"]
            .iter()
            .map(|id| json!({"id": id, "object": "model"}))
            .collect();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
            json!({"object": "list", "data": data}).to_string(),
        ))))
    });
    let svc = ObjectListLayer::new(registry.clone()).layer(upstream);
    let svc = ScopeLayer::openai().with_objects(registry).layer(svc);
    let mut req = Request::get("/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(key_of("a", &[]));
    let res = svc.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o", "ft:m:org::a"]);
}

/// A registry whose records complete only once `open` is set.
#[derive(Default)]
struct Gated {
    open: std::sync::atomic::AtomicBool,
    inner: MemoryRegistry,
}

impl ObjectRegistry for Gated {
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        self.inner.get(id)
    }
    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        let mut objects = Some(objects);
        Box::pin(std::future::poll_fn(move |_| {
            if !self.open.load(Ordering::SeqCst) {
                return std::task::Poll::Pending;
            }
            self.inner.record_now(objects.take().unwrap_or_default());
            std::task::Poll::Ready(Ok(()))
        }))
    }
    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()> {
        self.inner.remove(id)
    }
}

/// Polls `body` for its next frame once, without waiting.
fn poll_once<B: http_body::Body + Unpin>(body: &mut B) -> std::task::Poll<Option<Bytes>>
where
    B::Data: Into<Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(body).poll_frame(&mut cx).map(|f| {
        f.map(|f| {
            f.unwrap()
                .into_data()
                .ok()
                .map(Into::into)
                .unwrap_or_default()
        })
    })
}

fn owner_of(registry: Arc<Gated>) -> Owner {
    Owner {
        registry,
        project: "a".into(),
        key_id: "key_a".into(),
        now: 1,
        batch_models: None,
    }
}

#[test]
fn a_created_objects_answer_ends_only_once_it_is_recorded() {
    let gated = Arc::new(Gated::default());
    // The answer in two frames.
    let frames = frames_of(&[br#"{"id":"file-1","#, br#""object":"file"}"#]);
    let mut body = crate::objects::ObjectBody::new(
        frames,
        crate::objects::Action::Record(owner_of(gated.clone())),
        false,
    );
    // Nothing reaches the client while the record is pending.
    assert!(poll_once(&mut body).is_pending());
    assert!(poll_once(&mut body).is_pending());
    assert!(gated.inner.is_empty());
    gated.open.store(true, Ordering::SeqCst);
    let mut got = Vec::new();
    while let std::task::Poll::Ready(Some(data)) = poll_once(&mut body) {
        got.extend_from_slice(&data);
    }
    assert_eq!(got, br#"{"id":"file-1","object":"file"}"#);
    assert_eq!(gated.inner.get_now("file-1").unwrap().project, "a");
}

#[test]
fn a_streamed_event_that_creates_an_object_is_held_until_recorded_even_split_across_frames() {
    let gated = Arc::new(Gated::default());
    let frames = frames_of(&[
        b"event: thread.run.created\ndata: {\"id\":\"run_1\",\"obj",
        b"ect\":\"thread.run\",\"thread_id\":\"thread_1\"}\n\n",
        b"data: [DONE]\n\n",
    ]);
    let mut body = crate::objects::ObjectBody::new(
        frames,
        crate::objects::Action::Record(owner_of(gated.clone())),
        true,
    );
    // The first piece names no whole event: it passes at once.
    assert!(matches!(
        poll_once(&mut body),
        std::task::Poll::Ready(Some(_))
    ));
    // The second completes the event: held until the run and its thread are recorded.
    assert!(poll_once(&mut body).is_pending());
    gated.open.store(true, Ordering::SeqCst);
    assert!(matches!(
        poll_once(&mut body),
        std::task::Poll::Ready(Some(_))
    ));
    assert!(gated.inner.get_now("run_1").is_some());
    assert!(gated.inner.get_now("thread_1").is_some());
    assert!(matches!(
        poll_once(&mut body),
        std::task::Poll::Ready(Some(_))
    ));
    assert!(matches!(poll_once(&mut body), std::task::Poll::Ready(None)));
}

/// A body of these frames, in order.
struct Frames(std::collections::VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn frames_of(parts: &[&[u8]]) -> Frames {
    Frames(parts.iter().map(|p| Bytes::copy_from_slice(p)).collect())
}
