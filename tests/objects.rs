//! Tenant isolation through the gateway (`keygate serve`) and its embedded mock upstream,
//! which really creates, lists and deletes objects: every object belongs to the project
//! whose key made it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use common::{Answer, Setup, call, cli, send};
use http::Request;
use http_body_util::Full;
use keygate_workspace::gateway::{self, GatewayOptions};
use serde_json::{Value, json};

/// A key with every permission in `project`, and `extra` CLI arguments; its secret.
fn key(setup: &Setup, project: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "keys",
        "create",
        "--project",
        project,
        "--create-project",
        "--permissions",
        "all",
    ];
    args.extend_from_slice(extra);
    cli(&setup.keys(), &args)["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn post(addr: SocketAddr, key: &str, path: &str, body: Value) -> Answer {
    call(addr, "POST", path, Some(key), Some(&body.to_string())).await
}

/// Creates an object with `body` at `path`; its id.
async fn create(addr: SocketAddr, key: &str, path: &str, body: Value) -> String {
    let a = post(addr, key, path, body).await;
    assert_eq!(a.status, 200, "{path}: {:?}", a.body);
    a.json()["id"].as_str().unwrap().to_owned()
}

/// Uploads a file (`purpose`, JSON Lines `content`); the answer.
async fn upload(addr: SocketAddr, key: &str, purpose: &str, content: &str) -> Answer {
    let boundary = "kgboundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/files"))
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(req).await
}

fn batch_line(model: &str) -> String {
    json!({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}})
    .to_string()
}

/// One object of every kind, made by `key`: the value of each path parameter.
async fn make_objects(addr: SocketAddr, key: &str) -> HashMap<&'static str, String> {
    let mut ids = HashMap::new();
    let file = upload(addr, key, "assistants", "hello").await;
    assert_eq!(file.status, 200, "{:?}", file.body);
    let file = file.json()["id"].as_str().unwrap().to_owned();
    let asst = create(addr, key, "/v1/assistants", json!({"model": "gpt-4o-mini"})).await;
    let thread = create(addr, key, "/v1/threads", json!({})).await;
    let message = create(
        addr,
        key,
        &format!("/v1/threads/{thread}/messages"),
        json!({"role": "user", "content": "hi"}),
    )
    .await;
    let run = create(
        addr,
        key,
        &format!("/v1/threads/{thread}/runs"),
        json!({"assistant_id": asst}),
    )
    .await;
    let vs = create(addr, key, "/v1/vector_stores", json!({"name": "v"})).await;
    create(
        addr,
        key,
        &format!("/v1/vector_stores/{vs}/files"),
        json!({"file_id": file}),
    )
    .await;
    let vsfb = create(
        addr,
        key,
        &format!("/v1/vector_stores/{vs}/file_batches"),
        json!({"file_ids": [file]}),
    )
    .await;
    let job = create(
        addr,
        key,
        "/v1/fine_tuning/jobs",
        json!({"model": "gpt-4o-mini", "training_file": file}),
    )
    .await;
    let batch = create(
        addr,
        key,
        "/v1/batches",
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    let response = create(
        addr,
        key,
        "/v1/responses",
        json!({"model": "gpt-4o-mini", "input": "hi"}),
    )
    .await;
    let completion = create(
        addr,
        key,
        "/v1/chat/completions",
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "store": true}),
    )
    .await;
    let upload = create(
        addr,
        key,
        "/v1/uploads",
        json!({"filename": "a.txt", "purpose": "assistants", "bytes": 1, "mime_type": "text/plain"}),
    )
    .await;
    ids.insert("file_id", file);
    ids.insert("assistant_id", asst);
    ids.insert("thread_id", thread);
    ids.insert("message_id", message);
    ids.insert("run_id", run);
    ids.insert("vector_store_id", vs);
    ids.insert("vsfb", vsfb);
    ids.insert("job_id", job);
    ids.insert("batch_id", batch);
    ids.insert("response_id", response);
    ids.insert("completion_id", completion);
    ids.insert("upload_id", upload);
    ids.insert("step_id", "step_1".to_owned());
    ids
}

/// `pattern` with every parameter replaced by the id of `ids`; `None` if it names one that
/// keygate does not record (a model, a fine-tuning checkpoint).
fn fill(pattern: &str, ids: &HashMap<&'static str, String>) -> Option<String> {
    let mut out = Vec::new();
    let segs: Vec<&str> = pattern.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
            out.push((*seg).to_owned());
            continue;
        };
        let key = match name {
            "batch_id" if segs[i - 1] == "file_batches" => "vsfb",
            "model" | "checkpoint" | "permission_id" => return None,
            other => other,
        };
        out.push(ids.get(key)?.clone());
    }
    Some(out.join("/"))
}

/// A body the route accepts from the objects' owner.
fn body_for(pattern: &str, ids: &HashMap<&'static str, String>) -> Value {
    if pattern.ends_with("/runs") {
        json!({"assistant_id": ids["assistant_id"]})
    } else if pattern.ends_with("/messages") {
        json!({"role": "user", "content": "hi"})
    } else if pattern.ends_with("/submit_tool_outputs") {
        json!({"tool_outputs": []})
    } else if pattern.ends_with("/files") {
        json!({"file_id": ids["file_id"]})
    } else if pattern.ends_with("/file_batches") {
        json!({"file_ids": [ids["file_id"]]})
    } else {
        json!({})
    }
}

#[tokio::test]
async fn every_route_naming_an_object_is_the_owning_projects_alone() {
    let setup = Setup::new();
    let (owner, other) = (key(&setup, "a", &[]), key(&setup, "b", &[]));
    let (gw, _) = setup.start("").await;
    let addr = gw.addr();
    let ids = make_objects(addr, &owner).await;
    let mut checked = 0;
    for spec in keygate::scope::RouteTable::openai_specs() {
        let Some(path) = fill(&spec.path, &ids) else {
            continue;
        };
        if path == spec.path || spec.method == "DELETE" {
            continue;
        }
        let body = (spec.method == "POST").then(|| body_for(&spec.path, &ids).to_string());
        let theirs = call(addr, &spec.method, &path, Some(&other), body.as_deref()).await;
        assert_eq!(
            (theirs.status.as_u16(), theirs.code().as_str()),
            (404, "object_not_found"),
            "{} {}: another project's key",
            spec.method,
            spec.path
        );
        let mine = call(addr, &spec.method, &path, Some(&owner), body.as_deref()).await;
        assert_ne!(
            mine.code(),
            "object_not_found",
            "{} {}: the owner's key: {:?}",
            spec.method,
            spec.path,
            mine.body
        );
        // Through to the upstream, which may still refuse what this test sends.
        assert!(
            mine.status != 403 && mine.status != 401,
            "{} {}: {} {:?}",
            spec.method,
            spec.path,
            mine.status,
            mine.body
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} routes checked");
    // Deleting: refused to the other project, done for the owner, and then forgotten.
    let path = format!("/v1/assistants/{}", ids["assistant_id"]);
    let theirs = call(addr, "DELETE", &path, Some(&other), None).await;
    assert_eq!(theirs.code(), "object_not_found");
    let mine = call(addr, "DELETE", &path, Some(&owner), None).await;
    assert_eq!(mine.status, 200, "{:?}", mine.body);
    let gone = call(addr, "GET", &path, Some(&owner), None).await;
    assert_eq!(gone.code(), "object_not_found");
    gw.shutdown().await;
}

#[tokio::test]
async fn lists_show_only_the_callers_objects_page_by_page() {
    let setup = Setup::new();
    let (a, b) = (key(&setup, "a", &[]), key(&setup, "b", &[]));
    let (gw, _) = setup.start("").await;
    let addr = gw.addr();
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(
            create(
                addr,
                &a,
                "/v1/assistants",
                json!({"model": "gpt-4o-mini", "name": format!("a{i}")}),
            )
            .await,
        );
        for _ in 0..3 {
            create(addr, &b, "/v1/assistants", json!({"model": "gpt-4o-mini"})).await;
        }
    }
    mine.reverse(); // newest first, as lists come
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let path = match &after {
            Some(id) => format!("/v1/assistants?limit=2&after={id}"),
            None => "/v1/assistants?limit=2".to_owned(),
        };
        let page = call(addr, "GET", &path, Some(&a), None).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let v = page.json();
        let ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(v["first_id"].as_str(), ids.first().map(String::as_str));
        assert_eq!(v["last_id"].as_str(), ids.last().map(String::as_str));
        pages.push((ids.len(), v["has_more"].as_bool().unwrap()));
        seen.extend(ids);
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        after = v["last_id"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, mine, "exactly the caller's, in order");
    assert_eq!(pages, [(2, true), (2, true), (1, false)]);
    // Oldest first works too.
    let asc = call(
        addr,
        "GET",
        "/v1/assistants?order=asc&limit=10",
        Some(&a),
        None,
    )
    .await;
    let first = asc.json()["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(&first, mine.last().unwrap());
    // The other project sees its 15, none of the caller's.
    let theirs = call(addr, "GET", "/v1/assistants?limit=100", Some(&b), None).await;
    let v = theirs.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 15);
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| !mine.contains(&o["id"].as_str().unwrap().to_owned()))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn runs_and_batches_are_checked_as_the_models_they_will_use() {
    let setup = Setup::new();
    let maker = key(&setup, "a", &[]);
    let mini = key(&setup, "a", &["--allow-model", "gpt-4o-mini"]);
    let both = key(
        &setup,
        "a",
        &["--allow-model", "gpt-4o-mini", "--allow-model", "gpt-4o"],
    );
    let (gw, _) = setup.start("").await;
    let addr = gw.addr();
    // A run on an assistant of a model outside the key's rules.
    let big = create(addr, &maker, "/v1/assistants", json!({"model": "gpt-4o"})).await;
    let small = create(
        addr,
        &maker,
        "/v1/assistants",
        json!({"model": "gpt-4o-mini"}),
    )
    .await;
    let refused = post(
        addr,
        &mini,
        "/v1/threads/runs",
        json!({"assistant_id": big}),
    )
    .await;
    assert_eq!(
        (refused.status.as_u16(), refused.code().as_str()),
        (403, "model_not_allowed")
    );
    let run = post(
        addr,
        &mini,
        "/v1/threads/runs",
        json!({"assistant_id": small}),
    )
    .await;
    assert_eq!(run.status, 200, "{:?}", run.body);
    // The run's new thread is the project's.
    let thread = run.json()["thread_id"].as_str().unwrap().to_owned();
    let got = call(
        addr,
        "GET",
        &format!("/v1/threads/{thread}"),
        Some(&maker),
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    // A batch of a file naming a model outside the key's rules.
    let file = upload(addr, &both, "batch", &batch_line("gpt-4o")).await;
    assert_eq!(file.status, 200, "{:?}", file.body);
    let file = file.json()["id"].as_str().unwrap().to_owned();
    let batch = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let refused = post(addr, &mini, "/v1/batches", batch.clone()).await;
    assert_eq!(
        (refused.status.as_u16(), refused.code().as_str()),
        (403, "model_not_allowed")
    );
    let ok = post(addr, &both, "/v1/batches", batch).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    gw.shutdown().await;
}

#[tokio::test]
async fn ownership_survives_a_restart() {
    let setup = Setup::new();
    let (a, b) = (key(&setup, "a", &[]), key(&setup, "b", &[]));
    let store = format!(
        "store = {:?}",
        format!("sqlite:{}", setup.dir.path().join("k.db").display())
    );
    let (gw, _) = setup.start(&store).await;
    let asst = create(
        gw.addr(),
        &a,
        "/v1/assistants",
        json!({"model": "gpt-4o-mini"}),
    )
    .await;
    gw.shutdown().await;
    let (gw, _) = setup.start(&store).await;
    let path = format!("/v1/assistants/{asst}");
    let theirs = call(gw.addr(), "GET", &path, Some(&b), None).await;
    assert_eq!(theirs.code(), "object_not_found");
    // The owner reaches the upstream (whose memory the restart emptied: it answers 404 itself).
    let mine = call(gw.addr(), "GET", &path, Some(&a), None).await;
    assert_ne!(mine.code(), "object_not_found", "{:?}", mine.body);
    gw.shutdown().await;
}

/// Runs the CLI on the store at `db` with `--json`.
fn store_cli(db: &std::path::Path, args: &[&str]) -> Value {
    let url = format!("sqlite:{}", db.display());
    let mut argv = vec!["keygate", "--store", url.as_str(), "--json"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    let now = keygate::Clock::system().now();
    keygate_cli::run(argv, now, &mut out).unwrap_or_else(|e| panic!("keygate {args:?}: {e}"));
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test]
async fn objects_made_without_keygate_are_refused_until_imported() {
    let setup = Setup::new();
    let db = setup.dir.path().join("k.db");
    let secret = |v: Value| v["secret"].as_str().unwrap().to_owned();
    let a = secret(store_cli(
        &db,
        &[
            "keys",
            "create",
            "--project",
            "a",
            "--create-project",
            "--permissions",
            "all",
            "--allow-model",
            "gpt-4o-mini",
        ],
    ));
    let b = secret(store_cli(
        &db,
        &[
            "keys",
            "create",
            "--project",
            "b",
            "--create-project",
            "--permissions",
            "all",
        ],
    ));
    // Keys (and objects) from the store.
    let config = setup.dir.path().join("store.toml");
    std::fs::write(
        &config,
        format!(
            "store = {:?}\n[audit]\ntracing = false\n",
            format!("sqlite:{}", db.display())
        ),
    )
    .unwrap();
    let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.config = Some(config);
    let gw = gateway::start(options, &mut Vec::new()).await.unwrap();
    let addr = gw.addr();
    // An assistant made upstream without keygate.
    let made = "asst_upstream1";
    let path = format!("/v1/assistants/{made}");
    assert_eq!(
        call(addr, "GET", &path, Some(&a), None).await.code(),
        "object_not_found"
    );
    let run = post(addr, &a, "/v1/threads/runs", json!({"assistant_id": made})).await;
    assert_eq!(run.code(), "object_not_found");
    let out = store_cli(
        &db,
        &[
            "objects",
            "import",
            "--project",
            "a",
            "--kind",
            "assistant",
            "--model",
            "gpt-4o",
            made,
        ],
    );
    assert_eq!(out["imported"], json!([made]));
    // Seen by the running gateway at once; its model is checked for runs.
    let got = call(addr, "GET", &path, Some(&a), None).await;
    assert_ne!(got.code(), "object_not_found");
    let run = post(addr, &a, "/v1/threads/runs", json!({"assistant_id": made})).await;
    assert_eq!(
        (run.status.as_u16(), run.code().as_str()),
        (403, "model_not_allowed")
    );
    assert_eq!(
        call(addr, "GET", &path, Some(&b), None).await.code(),
        "object_not_found"
    );
    // Importing it again for another project keeps its owner.
    let again = store_cli(
        &db,
        &[
            "objects",
            "import",
            "--project",
            "b",
            "--kind",
            "assistant",
            made,
        ],
    );
    assert_eq!(again["kept"][0]["project"], "a");
    assert_eq!(
        call(addr, "GET", &path, Some(&b), None).await.code(),
        "object_not_found"
    );
    let listed = store_cli(&db, &["objects", "list", "--project", "a"]);
    assert_eq!(listed[0]["id"], made);
    assert_eq!(
        store_cli(&db, &["objects", "remove", made])["removed"],
        json!([made])
    );
    assert_eq!(
        store_cli(&db, &["objects", "list", "--project", "a"]),
        json!([])
    );
    gw.shutdown().await;
}
