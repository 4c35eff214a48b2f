//! The `async-openai` crate, a real OpenAI client, against the gateway (`keygate serve`).

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::CreateChatCompletionRequest;
use common::{Setup, create_key};
use futures_util::StreamExt;
use serde_json::json;

/// A client that does not retry (so refusals surface at once).
fn client(addr: std::net::SocketAddr, key: &str) -> Client<OpenAIConfig> {
    retrying_client(addr, key).with_http_service(ReqwestService::new(reqwest::Client::new()))
}

/// A client with async-openai's own retry (3 retries, honouring `Retry-After`).
fn retrying_client(addr: std::net::SocketAddr, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(key),
    )
}

fn request(model: &str, stream: bool) -> CreateChatCompletionRequest {
    serde_json::from_value(json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": stream,
    }))
    .unwrap()
}

/// The HTTP status and error code of an API error.
fn api_error(e: OpenAIError) -> (u16, String) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error.code.unwrap_or_default()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn async_openai_sees_success_and_each_refusal() {
    let setup = Setup::new();
    let (_, full) = create_key(
        &setup.keys(),
        &[
            "--permissions",
            "all",
            "--allow-model",
            "gpt-4o-mini",
            "--rpm",
            "2",
            "--tpm",
            "100000",
        ],
    );
    let (_, readonly) = create_key(&setup.keys(), &["--permissions", "read_only"]);
    let (gw, _) = setup.start("").await;
    let ok = client(gw.addr(), &full);

    let answer = ok
        .chat()
        .create(request("gpt-4o-mini", false))
        .await
        .unwrap();
    assert_eq!(answer.usage.unwrap().completion_tokens, 4);

    let mut stream = ok
        .chat()
        .create_stream(request("gpt-4o-mini", true))
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in chunk.unwrap().choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(text, "tok tok tok tok");

    let (status, code) = api_error(
        ok.chat()
            .create(request("gpt-4o", false))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (403, "model_not_allowed"));

    // The key's two requests a minute are used up (the refused model never reached the limiter).
    let (status, code) = api_error(
        ok.chat()
            .create(request("gpt-4o-mini", false))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));

    let bad = client(gw.addr(), "sk-kg-wrong");
    let (status, code) = api_error(bad.models().list().await.unwrap_err());
    assert_eq!((status, code.as_str()), (401, "invalid_api_key"));

    let ro = client(gw.addr(), &readonly);
    assert!(!ro.models().list().await.unwrap().data.is_empty());
    let (status, code) = api_error(
        ro.chat()
            .create(request("gpt-4o-mini", false))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (403, "insufficient_permissions"));

    // Usage of the streamed call was settled from the stream's usage chunk.
    let records = setup.audit_records(&gw);
    let streamed: Vec<_> = records
        .iter()
        .filter(|r| r["status"] == 200 && r["path"] == "/v1/chat/completions")
        .collect();
    assert_eq!(streamed.len(), 2);
    assert!(
        streamed
            .iter()
            .all(|r| r["usage"]["completion_tokens"] == 4),
        "{streamed:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn async_openai_retry_honours_retry_after() {
    let setup = Setup::new();
    // 60 a minute: once the burst is spent, the next request may go one second later.
    let (id, key) = create_key(&setup.keys(), &["--permissions", "all", "--rpm", "60"]);
    let (gw, _) = setup.start("").await;
    let plain = client(gw.addr(), &key);
    // Spend the burst (60, plus whatever refilled meanwhile) until the first refusal.
    let mut refused = None;
    for _ in 0..1000 {
        if let Err(e) = plain.models().list().await {
            refused = Some(e);
            break;
        }
    }
    assert_eq!(api_error(refused.expect("a refusal")).0, 429);

    // The default client waits for Retry-After (1 s) and then succeeds.
    retrying_client(gw.addr(), &key)
        .models()
        .list()
        .await
        .unwrap();
    let records = setup.audit_records(&gw);
    let statuses: Vec<_> = records
        .iter()
        .filter(|r| r["key_id"] == id.as_str())
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert!(statuses.len() >= 63, "{statuses:?}");
    assert_eq!(&statuses[statuses.len() - 3..], &[429, 429, 200]);
    gw.shutdown().await;
}
