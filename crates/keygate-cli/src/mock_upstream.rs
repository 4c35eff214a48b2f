//! A mock OpenAI-compatible model server: the gateway's embedded upstream (`keygate serve`
//! with no upstream configured), and the server the integration tests drive.
//!
//! Usage counts are derived from the request (a quarter of the prompt's characters, rounded
//! up; the requested output ceiling, or 16), so limits and budgets can be exercised exactly.
//!
//! Objects (files, batches, assistants, threads, vector stores, fine-tuning jobs, stored
//! responses and chat completions) live in the `mock_objects` module, whose
//! routes this router merges, each router with a store of its own.

use std::convert::Infallible;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde_json::{Value, json};

/// Models the mock serves.
pub const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "text-embedding-3-small",
    "whisper-1",
];

/// Output tokens when the request names no ceiling.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;

/// The mock upstream's routes.
pub fn router() -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .merge(crate::mock_objects::router())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "unknown_url", "Unknown request URL") })
}

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, Json(body)).into_response()
}

// The error is the response to send, built once per bad request: its size does not matter.
#[allow(clippy::result_large_err)]
pub(crate) fn parse(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "The body is not valid JSON.",
        )
    })
}

/// Prompt tokens the mock charges for `text`: a quarter of its characters, rounded up, at least 1.
pub fn prompt_tokens_for(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// All text in a JSON value's strings, concatenated (messages, prompts, inputs).
fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(items) => items.iter().for_each(|i| text_of(i, out)),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "content" | "text" | "input" | "prompt" | "messages"
                )
            })
            .for_each(|(_, v)| text_of(v, out)),
        _ => {}
    }
}

fn prompt_tokens(req: &Value, field: &str) -> u64 {
    let mut text = String::new();
    if let Some(v) = req.get(field) {
        text_of(v, &mut text);
    }
    prompt_tokens_for(&text)
}

fn completion_tokens(req: &Value) -> u64 {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| req.get(*f).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
}

fn model_of(req: &Value) -> String {
    req.get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini")
        .to_owned()
}

fn reply_text(tokens: u64) -> String {
    (0..tokens)
        .map(|i| if i == 0 { "tok" } else { " tok" })
        .collect()
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(axum::extract::Path(model): axum::extract::Path<String>) -> Response {
    if MODELS.contains(&model.as_str()) {
        Json(json!({"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
            .into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            "The model does not exist.",
        )
    }
}

fn chat_usage(req: &Value) -> Value {
    let prompt = prompt_tokens(req, "messages");
    let completion = completion_tokens(req);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The chat completion (not streamed) answering `req`.
pub(crate) fn chat_completion(req: &Value, id: &str, created: u64) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model_of(req),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply_text(completion_tokens(req))}, "finish_reason": "stop"}],
        "usage": chat_usage(req),
    })
}

/// The answer to a chat request: the completion, or its stream of chunks.
pub(crate) fn chat_reply(req: &Value, id: &str, created: u64) -> Response {
    let streaming = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !streaming {
        return Json(chat_completion(req, id, created)).into_response();
    }
    let model = model_of(req);
    let completion = completion_tokens(req);
    let usage = chat_usage(req);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for i in 0..completion {
        events.push(chunk(
            json!({"content": if i == 0 { "tok" } else { " tok" }}),
            Value::Null,
        ));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let last = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                          "model": model, "choices": [], "usage": usage});
        events.push(last);
    }
    let events = events
        .into_iter()
        .map(|v| Event::default().data(v.to_string()))
        .chain(std::iter::once(Event::default().data("[DONE]")))
        .map(Ok::<_, Infallible>);
    Sse::new(stream::iter(events)).into_response()
}

async fn completions(body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let prompt = prompt_tokens(&req, "prompt");
    let completion = completion_tokens(&req);
    Json(json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": model_of(&req),
        "choices": [{"index": 0, "text": reply_text(completion), "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }))
    .into_response()
}

async fn embeddings(body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let inputs = match req.get("input") {
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let prompt = prompt_tokens(&req, "input");
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2, 0.3]}))
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model_of(&req),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
    .into_response()
}

/// The response (completed) answering `req`.
pub(crate) fn response_object(req: &Value, id: &str, created: u64) -> Value {
    let input = prompt_tokens(req, "input");
    let output = completion_tokens(req);
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": model_of(req),
        "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": reply_text(output), "annotations": []}]}],
        "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output},
    })
}

/// The answer to a responses request: the response, or (asked to stream) its events:
/// `response.created` (in progress, no output yet), the text, and `response.completed` with
/// the usage.
pub(crate) fn responses_reply(req: &Value, response: Value) -> Response {
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(response).into_response();
    }
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    let text = response.pointer("/output/0/content/0/text").cloned();
    let events = [
        json!({"type": "response.created", "sequence_number": 0, "response": started}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_mock",
               "output_index": 0, "content_index": 0, "delta": text}),
        json!({"type": "response.completed", "sequence_number": 2, "response": response}),
    ];
    let events = events.into_iter().map(|v| {
        let name = v["type"].as_str().unwrap_or_default().to_owned();
        Ok::<_, Infallible>(Event::default().event(name).data(v.to_string()))
    });
    Sse::new(stream::iter(events)).into_response()
}

async fn transcriptions(headers: HeaderMap, body: Bytes) -> Response {
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_content_type",
            "Expected multipart/form-data.",
        );
    }
    let input = (body.len() as u64).div_ceil(1000).max(1);
    let output = 4;
    Json(json!({
        "text": "mock transcription",
        "usage": {"type": "tokens", "input_tokens": input, "output_tokens": output, "total_tokens": input + output},
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(method: &str, uri: &str, body: Value) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn chat_usage_is_derived_from_the_request() {
        let (status, body) = call(
            "POST",
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "12345678"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 7);
    }

    #[tokio::test]
    async fn streaming_chat_ends_with_usage_chunk_only_when_asked() {
        let req = json!({"model": "gpt-4o", "stream": true, "max_tokens": 3,
                         "messages": [{"role": "user", "content": "hi"}]});
        let (_, without) = call("POST", "/v1/chat/completions", req.clone()).await;
        assert!(!without.contains("\"usage\""));
        assert!(without.trim_end().ends_with("data: [DONE]"));
        let mut with = req;
        with["stream_options"] = json!({"include_usage": true});
        let (_, body) = call("POST", "/v1/chat/completions", with).await;
        assert!(
            body.contains("\"usage\":{\"completion_tokens\":3"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn models_are_listed_and_unknown_ones_are_404() {
        let (status, body) = call("GET", "/v1/models", Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("gpt-4o-mini"));
        let (status, _) = call("GET", "/v1/models/nope", Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn responses_and_embeddings_report_their_usage_shapes() {
        let (_, body) = call(
            "POST",
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "abcd", "max_output_tokens": 2}),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["usage"]["input_tokens"], 1);
        assert_eq!(v["usage"]["output_tokens"], 2);
        let (_, body) = call(
            "POST",
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["abcdefgh", "x"]}),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }
}
