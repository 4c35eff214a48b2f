//! Helpers shared by the integration tests: keys made with the CLI, a gateway started
//! in-process on a loopback port, and a plain hyper client.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keygate::Timestamp;
use keygate_workspace::gateway::{self, Gateway, GatewayOptions};
use serde_json::Value;

/// Runs the `keygate` CLI (in-process) on `file` with `--json`; returns its JSON output.
pub fn cli(file: &Path, args: &[&str]) -> Value {
    let now = Timestamp::from_unix_secs(keygate::Clock::system().now().as_unix_secs());
    let mut argv = vec!["keygate", "--file", file.to_str().unwrap(), "--json"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    keygate_cli::run(argv, now, &mut out).unwrap_or_else(|e| panic!("keygate {args:?}: {e}"));
    if out.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out).unwrap()
    }
}

/// Creates a key in project `test` with the CLI; returns (id, secret).
pub fn create_key(file: &Path, args: &[&str]) -> (String, String) {
    let mut all = vec!["keys", "create", "--project", "test", "--create-project"];
    all.extend_from_slice(args);
    let v = cli(file, &all);
    let id = v["id"]
        .as_str()
        .or_else(|| v["key"]["id"].as_str())
        .unwrap()
        .to_owned();
    (id, v["secret"].as_str().unwrap().to_owned())
}

/// A temporary directory with a config for the gateway: the key file `keys.toml`, an audit
/// file `audit.jsonl`, no key-file polling, `extra` TOML appended.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn keys(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    pub fn audit(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Starts the gateway with this setup's files and `extra` config; returns it and what it
    /// printed.
    pub async fn start(&self, extra: &str) -> (Gateway, String) {
        self.start_with(extra, |_| {}).await
    }

    /// As [`Setup::start`], with the command-line options edited by `edit`.
    pub async fn start_with(
        &self,
        extra: &str,
        edit: impl FnOnce(&mut GatewayOptions),
    ) -> (Gateway, String) {
        let config = self.dir.path().join("keygate.toml");
        let text = format!(
            "keys_file = {:?}\nreload_interval_secs = 0\n{extra}\n[audit]\ntracing = false\n[audit.jsonl]\npath = {:?}\n",
            self.keys(),
            self.audit()
        );
        std::fs::write(&config, text).unwrap();
        let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
        options.config = Some(config);
        edit(&mut options);
        let mut out = Vec::new();
        let gw = gateway::start(options, &mut out).await.unwrap();
        (gw, String::from_utf8(out).unwrap())
    }

    /// The request records of the audit file (after flushing it).
    pub fn audit_records(&self, gw: &Gateway) -> Vec<Value> {
        gw.built().flush_audit();
        std::fs::read_to_string(self.audit())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["type"] == "request")
            .collect()
    }
}

/// A plain HTTP/1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response with its body read.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

pub async fn send(request: Request<Full<Bytes>>) -> Answer {
    let response: Response<_> = client().request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `method path` on `addr` with `key` (if any) and a JSON `body` (if any).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body
        .map(|b| Full::new(Bytes::from(b.to_owned())))
        .unwrap_or_default();
    send(req.body(body).unwrap()).await
}

/// A chat request body for `model`.
pub fn chat(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":8}}"#
    )
}
