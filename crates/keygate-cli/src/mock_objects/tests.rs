//! The mock upstream's objects, driven through the whole mock router.

use super::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// One mock upstream (the whole router, as the gateway has it), called again and again.
struct Mock(Router);

impl Mock {
    fn new() -> Self {
        Self(mock_upstream::router())
    }

    /// The status, content type and body.
    async fn send(&self, request: Request<Body>) -> (StatusCode, String, String) {
        let response = self.0.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE);
        let content_type = content_type.map_or("", |v| v.to_str().unwrap()).to_owned();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    async fn call(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let request = Request::builder().method(method).uri(uri);
        let request = request
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let (status, _, text) = self.send(request).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn ok(&self, method: &str, uri: &str, body: Value) -> Value {
        let (status, v) = self.call(method, uri, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {uri}: {v}");
        v
    }

    /// A multipart `POST` of (name, file name, contents) parts.
    async fn upload(&self, uri: &str, parts: &[(&str, Option<&str>, &str)]) -> (StatusCode, Value) {
        let mut body = String::new();
        for (name, filename, contents) in parts {
            let filename = filename
                .map(|f| format!("; filename=\"{f}\""))
                .unwrap_or_default();
            body += &format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n{contents}\r\n"
            );
        }
        body += "--XyZ--\r\n";
        let request =
            Request::post(uri).header("content-type", "multipart/form-data; boundary=XyZ");
        let (status, _, text) = self.send(request.body(Body::from(body)).unwrap()).await;
        (status, serde_json::from_str(&text).unwrap())
    }

    async fn file(&self, name: &str, contents: &str) -> String {
        let parts = [
            ("purpose", None, "assistants"),
            ("file", Some(name), contents),
        ];
        let (status, file) = self.upload("/v1/files", &parts).await;
        assert_eq!(status, StatusCode::OK, "{file}");
        id_of(&file)
    }

    async fn content(&self, file: &str) -> (String, String) {
        let request = Request::get(format!("/v1/files/{file}/content"));
        let (status, content_type, body) = self.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        (content_type, body)
    }

    /// The (event, data) pairs of a streamed answer.
    async fn events(&self, uri: &str, body: Value) -> Vec<(String, Value)> {
        let request = Request::post(uri).header("content-type", "application/json");
        let (status, content_type, text) = self
            .send(request.body(Body::from(body.to_string())).unwrap())
            .await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, "text/event-stream")
        );
        let field = |block: &str, name: &str| {
            let line = block
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default();
            line.trim().to_owned()
        };
        let blocks = text.split("\n\n").filter(|b| !b.trim().is_empty());
        blocks
            .map(|b| {
                let data = field(b, "data:");
                (
                    field(b, "event:"),
                    serde_json::from_str(&data).unwrap_or(Value::String(data)),
                )
            })
            .collect()
    }
}

fn ids(list: &Value) -> Vec<&str> {
    let items = list["data"].as_array().unwrap().iter();
    items.map(|v| v["id"].as_str().unwrap()).collect()
}

/// The object (created under `base`) is read, listed (when `listed`), deleted, then 404 and
/// unlisted.
async fn lifecycle(mock: &Mock, base: &str, listed: bool, created: &Value, deleted: &str) {
    let id = created["id"].as_str().unwrap();
    let uri = format!("{base}/{id}");
    let read = mock.ok("GET", &uri, Value::Null).await;
    assert_eq!(
        (&read["id"], &read["object"]),
        (&created["id"], &created["object"])
    );
    if listed {
        assert!(
            ids(&mock.ok("GET", base, Value::Null).await).contains(&id),
            "{base}"
        );
    }
    let gone = mock.ok("DELETE", &uri, Value::Null).await;
    assert_eq!(gone, json!({"id": id, "object": deleted, "deleted": true}));
    let (status, error) = mock.call("GET", &uri, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!(" object: {id}"))
    );
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["param"], Value::Null);
    assert_eq!(
        mock.call("DELETE", &uri, Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
    if listed {
        assert!(!ids(&mock.ok("GET", base, Value::Null).await).contains(&id));
    }
}

#[tokio::test]
async fn each_kind_is_created_read_listed_and_deleted() {
    let mock = Mock::new();
    let parts = [
        ("purpose", None, "batch"),
        ("file", Some("a.jsonl"), "hello"),
    ];
    let (status, file) = mock.upload("/v1/files", &parts).await;
    assert_eq!(status, StatusCode::OK);
    assert!(file["id"].as_str().unwrap().starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(
        (&file["bytes"], &file["filename"]),
        (&json!(5), &json!("a.jsonl"))
    );
    assert_eq!(
        (&file["purpose"], &file["status"]),
        (&json!("batch"), &json!("processed"))
    );
    assert_eq!(
        mock.content(&id_of(&file)).await,
        ("application/octet-stream".into(), "hello".into())
    );
    let other = mock.file("b.txt", "other").await;
    let by_purpose = mock.ok("GET", "/v1/files?purpose=batch", Value::Null).await;
    assert_eq!(ids(&by_purpose), [file["id"].as_str().unwrap()]);
    lifecycle(&mock, "/v1/files", true, &file, "file").await;

    let assistant = mock
        .ok(
            "POST",
            "/v1/assistants",
            json!({"model": "gpt-4o", "name": "a"}),
        )
        .await;
    assert!(assistant["id"].as_str().unwrap().starts_with("asst_"));
    let uri = format!("/v1/assistants/{}", assistant["id"].as_str().unwrap());
    let updated = mock
        .ok(
            "POST",
            &uri,
            json!({"model": "gpt-4.1", "instructions": "be brief"}),
        )
        .await;
    assert_eq!(
        (&updated["model"], &updated["name"]),
        (&json!("gpt-4.1"), &json!("a"))
    );
    assert_eq!(
        mock.ok("GET", &uri, Value::Null).await["instructions"],
        "be brief"
    );
    lifecycle(
        &mock,
        "/v1/assistants",
        true,
        &assistant,
        "assistant.deleted",
    )
    .await;
    assert_eq!(
        mock.call("POST", &uri, json!({})).await.0,
        StatusCode::NOT_FOUND
    );

    let thread = mock
        .ok(
            "POST",
            "/v1/threads",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(thread["object"], "thread");
    let messages = format!("/v1/threads/{}/messages", id_of(&thread));
    let listed = mock.ok("GET", &messages, Value::Null).await;
    assert_eq!(listed["data"][0]["content"][0]["text"]["value"], "hi");
    let message = mock
        .ok(
            "POST",
            &messages,
            json!({"role": "user", "content": "more"}),
        )
        .await;
    assert_eq!(
        (&message["object"], &message["thread_id"]),
        (&json!("thread.message"), &thread["id"])
    );
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    lifecycle(&mock, &messages, true, &message, "thread.message.deleted").await;
    let first = format!("{messages}/{}", listed["data"][0]["id"].as_str().unwrap());
    mock.ok("GET", &first, Value::Null).await;
    lifecycle(&mock, "/v1/threads", false, &thread, "thread.deleted").await;
    // The thread's messages are gone with it.
    for uri in [&messages, &first] {
        let (status, error) = mock.call("GET", uri, Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("No such Thread object")
        );
    }

    let vs = mock
        .ok(
            "POST",
            "/v1/vector_stores",
            json!({"name": "docs", "file_ids": [other]}),
        )
        .await;
    assert_eq!(
        (&vs["object"], &vs["name"]),
        (&json!("vector_store"), &json!("docs"))
    );
    assert_eq!(vs["file_counts"]["total"], 1);
    let vs_uri = format!("/v1/vector_stores/{}", id_of(&vs));
    let third = mock.file("c.txt", "third").await;
    let vs_file = mock
        .ok(
            "POST",
            &format!("{vs_uri}/files"),
            json!({"file_id": third}),
        )
        .await;
    assert_eq!(
        (&vs_file["id"], &vs_file["object"]),
        (&json!(third), &json!("vector_store.file"))
    );
    assert_eq!(
        (&vs_file["vector_store_id"], &vs_file["status"]),
        (&vs["id"], &json!("completed"))
    );
    assert_eq!(
        mock.ok("GET", &vs_uri, Value::Null).await["file_counts"]["total"],
        2
    );
    lifecycle(
        &mock,
        &format!("{vs_uri}/files"),
        true,
        &vs_file,
        "vector_store.file.deleted",
    )
    .await;
    assert_eq!(
        mock.ok("GET", &vs_uri, Value::Null).await["file_counts"]["total"],
        1
    );
    lifecycle(
        &mock,
        "/v1/vector_stores",
        true,
        &vs,
        "vector_store.deleted",
    )
    .await;

    let response = mock
        .ok(
            "POST",
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "hi"}),
        )
        .await;
    lifecycle(&mock, "/v1/responses", false, &response, "response").await;
    let chat =
        json!({"model": "gpt-4o", "store": true, "messages": [{"role": "user", "content": "hi"}]});
    let chat = mock.ok("POST", "/v1/chat/completions", chat).await;
    lifecycle(
        &mock,
        "/v1/chat/completions",
        true,
        &chat,
        "chat.completion.deleted",
    )
    .await;

    let fresh = Mock::new();
    assert_eq!(
        fresh
            .call("GET", &format!("/v1/files/{other}"), Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn pages_are_exact_in_both_orders() {
    let mock = Mock::new();
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(id_of(
            &mock
                .ok("POST", "/v1/assistants", json!({"model": "gpt-4o"}))
                .await,
        ));
    }
    let a = |i: usize| made[i - 1].as_str();
    let page = async |q: &str| {
        mock.ok("GET", &format!("/v1/assistants?{q}"), Value::Null)
            .await
    };
    for (q, want, more) in [
        ("limit=2", vec![a(5), a(4)], true),
        (&format!("limit=2&after={}", a(4)), vec![a(3), a(2)], true),
        (&format!("limit=2&after={}", a(2)), vec![a(1)], false),
        ("limit=2&order=asc", vec![a(1), a(2)], true),
        (
            &format!("order=asc&limit=2&after={}", a(2)),
            vec![a(3), a(4)],
            true,
        ),
        (
            &format!("order=asc&limit=2&after={}", a(4)),
            vec![a(5)],
            false,
        ),
        ("", vec![a(5), a(4), a(3), a(2), a(1)], false),
        // A page that takes exactly what is left has no more after it.
        ("limit=5", vec![a(5), a(4), a(3), a(2), a(1)], false),
        ("limit=4", vec![a(5), a(4), a(3), a(2)], true),
        (
            &format!("order=asc&limit=2&after={}", a(3)),
            vec![a(4), a(5)],
            false,
        ),
    ] {
        let list = page(q).await;
        assert_eq!(
            (ids(&list), &list["has_more"]),
            (want.clone(), &json!(more)),
            "{q}"
        );
        assert_eq!(
            (&list["first_id"], &list["last_id"]),
            (&json!(want[0]), &json!(want.last().unwrap()))
        );
        assert_eq!(list["object"], "list");
    }
    for q in [
        "limit=0",
        "limit=101",
        "limit=x",
        "order=up",
        "after=asst_nope",
    ] {
        let (status, error) = mock
            .call("GET", &format!("/v1/assistants?{q}"), Value::Null)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{q}");
    }
    mock.ok("DELETE", &format!("/v1/assistants/{}", a(3)), Value::Null)
        .await;
    assert_eq!(ids(&page("").await), [a(5), a(4), a(2), a(1)]);
    let (status, _) = mock
        .call(
            "GET",
            &format!("/v1/assistants?after={}", a(3)),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn runs_take_their_assistants_model_and_stream_their_usage() {
    let mock = Mock::new();
    let assistant = mock
        .ok("POST", "/v1/assistants", json!({"model": "gpt-4.1"}))
        .await;
    let body = json!({"messages": [{"role": "user", "content": "12345678"}]});
    let thread = id_of(&mock.ok("POST", "/v1/threads", body).await);
    let runs = format!("/v1/threads/{thread}/runs");
    let ask = json!({"assistant_id": assistant["id"]});
    let run = mock.ok("POST", &runs, ask.clone()).await;
    assert!(run["id"].as_str().unwrap().starts_with("run_"));
    assert_eq!(
        (&run["object"], &run["model"]),
        (&json!("thread.run"), &json!("gpt-4.1"))
    );
    assert_eq!(
        (&run["thread_id"], &run["assistant_id"]),
        (&json!(thread), &assistant["id"])
    );
    assert_eq!(
        (&run["status"], &run["usage"]),
        (&json!("queued"), &Value::Null)
    );
    let own = mock
        .ok(
            "POST",
            &runs,
            json!({"assistant_id": assistant["id"], "model": "gpt-4o-mini"}),
        )
        .await;
    assert_eq!(own["model"], "gpt-4o-mini");
    let (status, _) = mock
        .call("POST", &runs, json!({"assistant_id": "asst_nope"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        mock.call("POST", "/v1/threads/thread_nope/runs", ask.clone())
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ids(&mock.ok("GET", &runs, Value::Null).await),
        [id_of(&own), id_of(&run)]
    );

    let uri = format!("{runs}/{}", id_of(&run));
    assert_eq!(mock.ok("GET", &uri, Value::Null).await["id"], run["id"]);
    assert_eq!(
        mock.ok("POST", &format!("{uri}/cancel"), Value::Null).await["status"],
        "cancelling"
    );
    let outputs = json!({"tool_outputs": []});
    assert_eq!(
        mock.ok("POST", &format!("{uri}/submit_tool_outputs"), outputs)
            .await["id"],
        run["id"]
    );
    let steps = mock.ok("GET", &format!("{uri}/steps"), Value::Null).await;
    assert_eq!((ids(&steps).len(), &steps["has_more"]), (0, &json!(false)));
    assert_eq!(
        mock.call("GET", &format!("{uri}/steps/step_1"), Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let elsewhere = id_of(&mock.ok("POST", "/v1/threads", Value::Null).await);
    let other_thread = format!("/v1/threads/{elsewhere}/runs/{}", id_of(&run));
    assert_eq!(
        mock.call("GET", &other_thread, Value::Null).await.0,
        StatusCode::NOT_FOUND
    );

    let events = mock
        .events(
            &runs,
            json!({"assistant_id": assistant["id"], "stream": true}),
        )
        .await;
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        ["thread.run.created", "thread.run.completed", "done"]
    );
    let (created, completed) = (&events[0].1, &events[1].1);
    assert_eq!(
        (&created["status"], &created["model"]),
        (&json!("queued"), &json!("gpt-4.1"))
    );
    assert_eq!(
        (&completed["id"], &completed["status"]),
        (&created["id"], &json!("completed"))
    );
    let usage = json!({"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18});
    assert_eq!(completed["usage"], usage);
    assert_eq!(events[2].1, "[DONE]");
    let stored = mock
        .ok("GET", &format!("{runs}/{}", id_of(created)), Value::Null)
        .await;
    assert_eq!(stored["status"], "completed");

    let both = json!({"assistant_id": assistant["id"], "thread": {"messages": [{"role": "user", "content": "yo"}]}});
    let run = mock.ok("POST", "/v1/threads/runs", both).await;
    let new_thread = run["thread_id"].as_str().unwrap();
    assert!(new_thread.starts_with("thread_") && new_thread != thread);
    assert_eq!(run["model"], "gpt-4.1");
    let messages = mock
        .ok(
            "GET",
            &format!("/v1/threads/{new_thread}/messages"),
            Value::Null,
        )
        .await;
    assert_eq!(messages["data"][0]["content"][0]["text"]["value"], "yo");
    let (status, _) = mock
        .call(
            "POST",
            "/v1/threads/runs",
            json!({"assistant_id": "asst_nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn messages_belong_to_their_thread() {
    let mock = Mock::new();
    let (a, b) = (
        id_of(&mock.ok("POST", "/v1/threads", json!({})).await),
        id_of(&mock.ok("POST", "/v1/threads", json!({})).await),
    );
    let message = mock
        .ok(
            "POST",
            &format!("/v1/threads/{a}/messages"),
            json!({"role": "user", "content": "x"}),
        )
        .await;
    let in_b = format!("/v1/threads/{b}/messages");
    assert_eq!(ids(&mock.ok("GET", &in_b, Value::Null).await).len(), 0);
    assert_eq!(
        mock.call("GET", &format!("{in_b}/{}", id_of(&message)), Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = mock
        .call(
            "POST",
            &format!("/v1/threads/{a}/messages"),
            json!({"role": "user"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn batches_need_an_existing_input_file() {
    let mock = Mock::new();
    let ask = |file: &str| json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (status, error) = mock.call("POST", "/v1/batches", ask("file-nope")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["message"], "No such File object: file-nope");
    assert_eq!(
        ids(&mock.ok("GET", "/v1/batches", Value::Null).await).len(),
        0
    );
    let file = mock.file("in.jsonl", "{}").await;
    let batch = mock.ok("POST", "/v1/batches", ask(&file)).await;
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(
        (&batch["object"], &batch["status"]),
        (&json!("batch"), &json!("validating"))
    );
    assert_eq!(
        (&batch["input_file_id"], &batch["endpoint"]),
        (&json!(file), &json!("/v1/chat/completions"))
    );
    let uri = format!("/v1/batches/{}", id_of(&batch));
    assert_eq!(mock.ok("GET", &uri, Value::Null).await, batch);
    assert_eq!(
        ids(&mock.ok("GET", "/v1/batches?limit=1", Value::Null).await),
        [id_of(&batch)]
    );
    assert_eq!(
        mock.ok("POST", &format!("{uri}/cancel"), Value::Null).await["status"],
        "cancelling"
    );
    assert_eq!(
        mock.call("GET", "/v1/batches/batch_nope", Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn completed_uploads_are_files_of_their_parts() {
    let mock = Mock::new();
    let ask = json!({"filename": "big.jsonl", "purpose": "batch", "bytes": 11, "mime_type": "text/jsonl"});
    let upload = mock.ok("POST", "/v1/uploads", ask.clone()).await;
    assert!(upload["id"].as_str().unwrap().starts_with("upload_"));
    assert_eq!(
        (&upload["object"], &upload["status"]),
        (&json!("upload"), &json!("pending"))
    );
    assert_eq!(
        (&upload["filename"], &upload["bytes"]),
        (&json!("big.jsonl"), &json!(11))
    );
    let uri = format!("/v1/uploads/{}", id_of(&upload));
    let mut parts = Vec::new();
    for data in ["world", "hello "] {
        let (status, part) = mock
            .upload(&format!("{uri}/parts"), &[("data", Some("blob"), data)])
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(part["id"].as_str().unwrap().starts_with("part_"));
        assert_eq!(
            (&part["object"], &part["upload_id"]),
            (&json!("upload.part"), &upload["id"])
        );
        parts.push(id_of(&part));
    }
    parts.reverse();
    let done = mock
        .ok(
            "POST",
            &format!("{uri}/complete"),
            json!({"part_ids": parts}),
        )
        .await;
    assert_eq!(done["status"], "completed");
    let file = &done["file"];
    assert_eq!(
        (&file["object"], &file["bytes"], &file["filename"]),
        (&json!("file"), &json!(11), &json!("big.jsonl"))
    );
    assert_eq!(mock.content(&id_of(file)).await.1, "hello world");
    assert!(
        ids(&mock.ok("GET", "/v1/files", Value::Null).await)
            .contains(&file["id"].as_str().unwrap())
    );
    let (status, _) = mock
        .upload(&format!("{uri}/parts"), &[("data", Some("blob"), "late")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let other = id_of(&mock.ok("POST", "/v1/uploads", ask).await);
    let foreign = json!({"part_ids": [parts[0]]});
    let (status, _) = mock
        .call("POST", &format!("/v1/uploads/{other}/complete"), foreign)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let cancelled = mock
        .ok("POST", &format!("/v1/uploads/{other}/cancel"), Value::Null)
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        mock.call("POST", "/v1/uploads/upload_nope/cancel", Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn only_stored_chat_completions_are_kept() {
    let mock = Mock::new();
    let ask = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let unstored = mock.ok("POST", "/v1/chat/completions", ask.clone()).await;
    let mut stored_ask = ask.clone();
    stored_ask["store"] = json!(true);
    stored_ask["metadata"] = json!({"k": "v"});
    let stored = mock
        .ok("POST", "/v1/chat/completions", stored_ask.clone())
        .await;
    for id in [&unstored["id"], &stored["id"]] {
        assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    }
    assert_ne!(unstored["id"], stored["id"]);
    let uri = |v: &Value| format!("/v1/chat/completions/{}", id_of(v));
    assert_eq!(
        mock.call("GET", &uri(&unstored), Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
    let kept = mock.ok("GET", &uri(&stored), Value::Null).await;
    assert_eq!(
        (&kept["object"], &kept["metadata"]),
        (&json!("chat.completion"), &json!({"k": "v"}))
    );
    assert_eq!(
        (&kept["choices"], &kept["created"]),
        (&stored["choices"], &stored["created"])
    );
    let messages = mock
        .ok("GET", &format!("{}/messages", uri(&stored)), Value::Null)
        .await;
    assert_eq!(messages["data"][0]["content"], "hi");
    assert_eq!(messages["data"][0]["id"], format!("{}-0", id_of(&stored)));
    let updated = mock
        .ok("POST", &uri(&stored), json!({"metadata": {"k": "w"}}))
        .await;
    assert_eq!(updated["metadata"], json!({"k": "w"}));

    let mut streamed_ask = stored_ask;
    streamed_ask["model"] = json!("gpt-4o-mini");
    streamed_ask["stream"] = json!(true);
    let events = mock.events("/v1/chat/completions", streamed_ask).await;
    let streamed = &events[0].1;
    assert_eq!(
        mock.ok("GET", &uri(streamed), Value::Null).await["model"],
        "gpt-4o-mini"
    );
    let by_model = mock
        .ok("GET", "/v1/chat/completions?model=gpt-4o", Value::Null)
        .await;
    assert_eq!(ids(&by_model), [id_of(&stored)]);
    assert_eq!(
        ids(&mock.ok("GET", "/v1/chat/completions", Value::Null).await).len(),
        2
    );
}

#[tokio::test]
async fn responses_are_kept_unless_not_stored_and_stream_their_creation_first() {
    let mock = Mock::new();
    let ask = json!({"model": "gpt-4o", "input": "hello"});
    let first = mock.ok("POST", "/v1/responses", ask.clone()).await;
    assert!(first["id"].as_str().unwrap().starts_with("resp_"));
    let uri = format!("/v1/responses/{}", id_of(&first));
    assert_eq!(mock.ok("GET", &uri, Value::Null).await, first);
    let items = mock
        .ok("GET", &format!("{uri}/input_items"), Value::Null)
        .await;
    assert_eq!(items["data"][0]["content"][0]["text"], "hello");
    assert!(items["data"][0]["id"].as_str().unwrap().starts_with("msg_"));

    let unkept = mock
        .ok(
            "POST",
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "x", "store": false}),
        )
        .await;
    assert_ne!(unkept["id"], first["id"]);
    let unkept_uri = format!("/v1/responses/{}", id_of(&unkept));
    assert_eq!(
        mock.call("GET", &unkept_uri, Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
    let follow = json!({"model": "gpt-4o", "input": "x", "previous_response_id": unkept["id"]});
    let (status, error) = mock.call("POST", "/v1/responses", follow).await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("previous_response_not_found"))
    );
    let follow = json!({"model": "gpt-4o", "input": "x", "previous_response_id": first["id"]});
    assert_eq!(
        mock.ok("POST", "/v1/responses", follow).await["previous_response_id"],
        first["id"]
    );
    assert_eq!(
        mock.ok("POST", &format!("{uri}/cancel"), Value::Null).await["status"],
        "cancelled"
    );

    let events = mock
        .events(
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "abcd", "stream": true, "max_output_tokens": 2}),
        )
        .await;
    let (name, created) = &events[0];
    assert_eq!(
        (name.as_str(), &created["type"]),
        ("response.created", &json!("response.created"))
    );
    let response = &created["response"];
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(
        (&response["object"], &response["model"]),
        (&json!("response"), &json!("gpt-4o"))
    );
    assert_eq!(response["status"], "in_progress");
    let (name, completed) = events.last().unwrap();
    assert_eq!(
        (name.as_str(), &completed["response"]["id"]),
        ("response.completed", &response["id"])
    );
    assert_eq!(completed["response"]["usage"]["output_tokens"], 2);
    let kept = mock
        .ok(
            "GET",
            &format!("/v1/responses/{}", id_of(response)),
            Value::Null,
        )
        .await;
    assert_eq!(kept["status"], "completed");
}

#[tokio::test]
async fn vector_stores_search_and_take_file_batches() {
    let mock = Mock::new();
    let vs = id_of(&mock.ok("POST", "/v1/vector_stores", json!({})).await);
    let uri = format!("/v1/vector_stores/{vs}");
    let search = mock
        .ok("POST", &format!("{uri}/search"), json!({"query": "q"}))
        .await;
    assert_eq!(
        search,
        json!({"object": "vector_store.search_results.page", "data": [], "has_more": false, "next_page": null})
    );
    let (a, b) = (mock.file("a", "1").await, mock.file("b", "2").await);
    let (status, _) = mock
        .call(
            "POST",
            &format!("{uri}/files"),
            json!({"file_id": "file-nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = mock
        .call(
            "POST",
            &format!("{uri}/file_batches"),
            json!({"file_ids": [a, "file-nope"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let batch = mock
        .ok(
            "POST",
            &format!("{uri}/file_batches"),
            json!({"file_ids": [a, b]}),
        )
        .await;
    assert!(batch["id"].as_str().unwrap().starts_with("vsfb_"));
    assert_eq!(
        (&batch["object"], &batch["status"]),
        (&json!("vector_store.file_batch"), &json!("completed"))
    );
    assert_eq!(batch["vector_store_id"], vs);
    let batch_uri = format!("{uri}/file_batches/{}", id_of(&batch));
    assert_eq!(mock.ok("GET", &batch_uri, Value::Null).await, batch);
    let files = mock
        .ok("GET", &format!("{batch_uri}/files"), Value::Null)
        .await;
    assert_eq!(ids(&files), [&b, &a]);
    assert_eq!(files["data"][0]["object"], "vector_store.file");
    assert_eq!(
        mock.ok("POST", &format!("{batch_uri}/cancel"), Value::Null)
            .await["status"],
        "cancelled"
    );
    let content = mock
        .ok("GET", &format!("{uri}/files/{a}/content"), Value::Null)
        .await;
    assert_eq!(content["object"], "vector_store.file_content.page");
    let attributes = json!({"attributes": {"k": "v"}});
    assert_eq!(
        mock.ok("POST", &format!("{uri}/files/{a}"), attributes)
            .await["attributes"]["k"],
        "v"
    );
    assert_eq!(
        mock.ok("GET", &uri, Value::Null).await["file_counts"]["completed"],
        2
    );
    let renamed = mock.ok("POST", &uri, json!({"name": "n"})).await;
    assert_eq!(
        (&renamed["name"], &renamed["id"]),
        (&json!("n"), &json!(vs))
    );
    let elsewhere = id_of(&mock.ok("POST", "/v1/vector_stores", json!({})).await);
    let wrong = format!("/v1/vector_stores/{elsewhere}/files/{a}");
    assert_eq!(
        mock.call("GET", &wrong, Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn fine_tuning_jobs_need_their_training_file() {
    let mock = Mock::new();
    let (status, _) = mock
        .call(
            "POST",
            "/v1/fine_tuning/jobs",
            json!({"model": "gpt-4o-mini", "training_file": "file-nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let file = mock.file("train.jsonl", "{}").await;
    let job = mock
        .ok(
            "POST",
            "/v1/fine_tuning/jobs",
            json!({"model": "gpt-4o-mini", "training_file": file}),
        )
        .await;
    assert!(job["id"].as_str().unwrap().starts_with("ftjob-"));
    assert_eq!(
        (&job["object"], &job["status"]),
        (&json!("fine_tuning.job"), &json!("queued"))
    );
    assert_eq!(
        (&job["training_file"], &job["validation_file"]),
        (&json!(file), &Value::Null)
    );
    assert_eq!(
        (&job["model"], &job["fine_tuned_model"]),
        (&json!("gpt-4o-mini"), &Value::Null)
    );
    let list = mock
        .ok("GET", "/v1/fine_tuning/jobs?limit=1", Value::Null)
        .await;
    assert_eq!(
        list,
        json!({"object": "list", "data": [job], "has_more": false})
    );
    let uri = format!("/v1/fine_tuning/jobs/{}", id_of(&job));
    assert_eq!(mock.ok("GET", &uri, Value::Null).await, job);
    for (action, status) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("cancel", "cancelled"),
    ] {
        assert_eq!(
            mock.ok("POST", &format!("{uri}/{action}"), Value::Null)
                .await["status"],
            status
        );
    }
    for list in ["events", "checkpoints"] {
        let empty = mock.ok("GET", &format!("{uri}/{list}"), Value::Null).await;
        assert_eq!(
            empty,
            json!({"object": "list", "data": [], "has_more": false})
        );
    }
    assert_eq!(
        mock.call("GET", "/v1/fine_tuning/jobs/ftjob-nope/events", Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}
