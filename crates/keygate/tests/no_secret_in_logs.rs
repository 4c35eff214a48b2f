//! No secret in any log: every credential shape, sent through every field of a request, reaches
//! none of the audit sinks (JSON Lines file, its fallback, `tracing`), no metric, no other log
//! line of the stack, no denial message, and not the inner service as a request id.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use keygate::audit::{FanOut, JsonlSink, TracingSink};
use keygate::{
    KeyFormat, KeyId, KeyRecord, Keygate, MemoryStore, Permissions, ProjectRecord, SecretScanner,
    Timestamp,
};
use tower::{ServiceBuilder, ServiceExt};

/// Bytes written by any clone.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An output that always fails, so every line goes to the JSON Lines sink's fallback (stderr
/// in production, a buffer here).
struct Broken;

impl Write for Broken {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("disk full"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("disk full"))
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// 16 random base62 characters.
fn random() -> String {
    KeyId::generate().unwrap().as_str()["key_".len()..].to_owned()
}

/// A secret and the parts of it that must not appear either (what is left without its
/// well-known prefix, and a JWT's payload and signature on their own).
struct Shape {
    name: &'static str,
    secret: String,
    parts: Vec<String>,
    /// Recognised without configuration, so also kept out of denial messages (the scope
    /// layer redacts the path it echoes by the default shapes).
    built_in: bool,
}

fn shapes(store_key: &str) -> Vec<Shape> {
    let header = base64url(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#);
    let payload =
        base64url(format!(r#"{{"sub":"key_t","jti":"{}","exp":4102444800}}"#, random()).as_bytes());
    let signature = base64url(format!("{}{}", random(), random()).as_bytes());
    let provider = format!(
        "sk-proj-{}{}T3BlbkFJ{}{}",
        random(),
        random(),
        random(),
        random()
    );
    let configured = format!("corp.{}", random());
    vec![
        Shape {
            name: "keygate key from the store",
            secret: store_key.to_owned(),
            parts: vec![store_key["acme_".len()..].to_owned()],
            built_in: true,
        },
        Shape {
            name: "JWT",
            secret: format!("{header}.{payload}.{signature}"),
            parts: vec![payload, signature],
            built_in: true,
        },
        Shape {
            name: "provider key",
            parts: vec![provider["sk-proj-".len()..].to_owned()],
            secret: provider,
            built_in: true,
        },
        Shape {
            name: "configured prefix",
            parts: vec![configured["corp.".len()..].to_owned()],
            secret: configured,
            built_in: false,
        },
    ]
}

/// Every field of a request a client could put `secret` in, with the store's key in
/// `Authorization` unless that is the field (so the request gets as deep as it can).
fn requests(secret: &str, store_key: &str) -> Vec<(&'static str, Request<Full<Bytes>>)> {
    let bearer = format!("Bearer {store_key}");
    let encoded: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
    let get = |uri: String| Request::get(uri).header("authorization", bearer.as_str());
    let body = format!(
        r#"{{"model":"{secret}","messages":[{{"role":"user","content":"{secret}"}}],"user":"{secret}"}}"#
    );
    let mut out = vec![
        (
            "authorization",
            Request::get("/v1/models").header("authorization", format!("Bearer {secret}")),
        ),
        (
            "x-api-key",
            Request::get("/v1/models").header("x-api-key", secret),
        ),
        (
            "x-api-key next to authorization",
            get("/v1/models".into()).header("x-api-key", secret),
        ),
        (
            "x-request-id",
            get("/v1/models".into()).header("x-request-id", secret),
        ),
        (
            "x-request-id without a key",
            Request::get("/v1/models").header("x-request-id", secret),
        ),
        (
            "another header",
            get("/v1/models".into())
                .header("x-custom-trace", secret)
                .header("openai-project", secret),
        ),
        ("model path segment", get(format!("/v1/models/{secret}"))),
        (
            "object path segment",
            get(format!("/v1/files/{secret}/content")),
        ),
        ("unknown route segment", get(format!("/v1/{secret}/x"))),
        (
            "percent-encoded segment",
            get(format!("/v1/models/{encoded}")),
        ),
        ("query value", get(format!("/v1/models?after={secret}"))),
        ("query name", get(format!("/v1/models?{secret}=1"))),
    ]
    .into_iter()
    .map(|(field, r)| (field, r.body(Full::default()).unwrap()))
    .collect::<Vec<_>>();
    out.push((
        "JSON body",
        Request::post("/v1/chat/completions")
            .header("authorization", bearer.as_str())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    ));
    out
}

/// What the stack hands the service it guards.
type Forwarded = Request<keygate::limit::RequestBody<Full<Bytes>>>;

async fn upstream(
    seen: Arc<Mutex<Vec<String>>>,
    req: Forwarded,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = req
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    seen.lock().unwrap().push(id);
    let body: &'static [u8] = if req.uri().path() == "/v1/chat/completions" {
        br#"{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#
    } else {
        br#"{"object":"list","data":[{"id":"gpt-4o-mini"}]}"#
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(response)
}

#[tokio::test]
async fn no_credential_sent_in_any_field_reaches_any_sink() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let logs = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let format = KeyFormat::with_prefix("acme_").unwrap();
    let secret = format.generate().unwrap();
    let mut key = KeyRecord::new(
        KeyId::new("key_t"),
        "p",
        secret.digest(),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    key.name = "ci".into();
    let store = MemoryStore::from_records([ProjectRecord::new("p")], [key]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let file = JsonlSink::builder(&path).open().unwrap();
    let fallback = Buffer::default();
    let broken = JsonlSink::writer_builder(Broken)
        .with_fallback(fallback.clone())
        .with_fallback_after(std::time::Duration::ZERO)
        .open()
        .unwrap();
    let layer = Keygate::builder(store)
        .key_format(format)
        .secret_scanner(SecretScanner::new().with_prefix("corp.").unwrap())
        .audit_sink(
            FanOut::new()
                .with(file.clone())
                .with(broken.clone())
                .with(TracingSink::new()),
        )
        .key_metrics(true)
        .build()
        .unwrap();
    let forwarded_ids = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new().layer(layer).service_fn({
        let seen = forwarded_ids.clone();
        move |req: Forwarded| upstream(seen.clone(), req)
    });

    let shapes = shapes(secret.expose());
    let mut response_ids = Vec::new();
    let mut responses = String::new();
    let mut sent = 0;
    for shape in &shapes {
        for (field, request) in requests(&shape.secret, secret.expose()) {
            let response = svc.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_ne!(
                id, shape.secret,
                "{}: {field}: the id came back",
                shape.name
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            assert!(
                !shape.built_in || !body.contains(&shape.secret),
                "{}: {field}: the response ({status}) echoes the secret: {body}",
                shape.name
            );
            responses.push_str(&body);
            response_ids.push(id);
            sent += 1;
        }
    }
    file.shutdown();
    broken.shutdown();
    drop(_logging);

    let file_text = std::fs::read_to_string(&path).unwrap();
    let fallback_text = fallback.text();
    let log_text = logs.text();
    let metrics_text = format!("{:?}", snapshotter.snapshot().into_vec());
    assert_eq!(file_text.lines().count(), sent, "one record per request");
    assert_eq!(
        fallback_text.lines().count(),
        sent,
        "every record also went to the fallback"
    );
    assert!(log_text.lines().count() >= sent, "a log line per request");
    assert!(metrics_text.contains("key_t"), "per-key metrics were on");
    let forwarded = forwarded_ids.lock().unwrap().clone();
    assert!(!forwarded.is_empty(), "some requests reached the upstream");

    for (sink, text) in [
        ("jsonl file", &file_text),
        ("jsonl fallback", &fallback_text),
        ("tracing", &log_text),
        ("metrics", &metrics_text),
    ] {
        for shape in &shapes {
            for needle in std::iter::once(&shape.secret).chain(&shape.parts) {
                assert!(
                    !text.contains(needle.as_str()),
                    "{}: leaked into the {sink}: {text}",
                    shape.name
                );
            }
        }
    }
    for shape in &shapes {
        assert!(
            !forwarded.contains(&shape.secret),
            "{}: forwarded upstream as x-request-id",
            shape.name
        );
    }

    // Every recorded request id is one the layer made, and the one the response carried.
    let process_prefix = &response_ids[0][..12];
    for line in file_text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = record["request_id"].as_str().unwrap();
        assert!(id.starts_with(process_prefix), "not a generated id: {id}");
        assert!(response_ids.iter().any(|r| r == id), "{id}");
    }
    assert!(file_text.contains("[redacted]"), "paths were redacted");
    assert!(
        responses.contains("[redacted]"),
        "the unknown route's message is"
    );
    assert!(
        file_text.contains(r#""decision":"allowed""#),
        "some requests went through"
    );
}
