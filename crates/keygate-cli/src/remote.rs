//! The key commands over a running gateway's admin API (`--server URL --admin-key …`), so
//! operators need no access to its database: each command is one or a few HTTP requests, and
//! every change is made (and recorded, as the admin key's) by the gateway.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::CliError;

/// How long one request to the gateway may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer read (a page of keys is far less).
const MAX_ANSWER: usize = 16 << 20;
/// Keys asked for per page when listing.
const PAGE: usize = 500;

/// A gateway's admin API.
pub(crate) struct Remote {
    runtime: tokio::runtime::Runtime,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://authority[/prefix]`, without a trailing `/`.
    base: String,
    auth: HeaderValue,
}

fn failed(msg: impl Into<String>) -> CliError {
    CliError::Server(msg.into())
}

impl Remote {
    /// A client of the gateway at `server` (`http://` or `https://`), authenticated with
    /// `admin_key`; `ca_file` adds PEM certificates to trust (a private CA).
    pub(crate) fn connect(
        server: &str,
        admin_key: Option<&str>,
        ca_file: Option<&Path>,
    ) -> Result<Remote, CliError> {
        let base = server.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| crate::invalid(format!("--server {server:?} is not a URL")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(crate::invalid(format!(
                "--server {server:?}: give http://HOST:PORT or https://HOST"
            )));
        }
        let key = admin_key.ok_or_else(|| {
            crate::invalid("--server needs an admin key: --admin-key or KEYGATE_ADMIN_KEY")
        })?;
        // Never send anything but an admin key (and never echo it).
        if keygate_core::admin::admin_key_format().parse(key).is_err() {
            return Err(crate::invalid(format!(
                "--admin-key is not an admin key (they start with {})",
                keygate_core::admin::ADMIN_KEY_PREFIX
            )));
        }
        let mut auth = HeaderValue::try_from(format!("Bearer {key}"))
            .map_err(|_| crate::invalid("--admin-key holds characters a header cannot"))?;
        auth.set_sensitive(true);
        let extra = match ca_file {
            Some(path) => vec![
                std::fs::read(path)
                    .map_err(|e| crate::invalid(format!("--server-ca {}: {e}", path.display())))?,
            ],
            None => Vec::new(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = {
            let _entered = runtime.enter();
            keygate::proxy::https_client(keygate::proxy::Roots::Webpki, &extra, Some(TIMEOUT))
                .map_err(|e| failed(format!("--server: {e}")))?
        };
        Ok(Remote {
            runtime,
            client,
            base,
            auth,
        })
    }

    /// `method path` with a JSON `body`; the answer's JSON, or the gateway's error message.
    pub(crate) fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let mut request = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(AUTHORIZATION, self.auth.clone());
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(bytes))
            .map_err(|e| failed(format!("{method} {url}: {e}")))?;
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(TIMEOUT, async {
                let response = self.client.request(request).await.map_err(|e| {
                    failed(format!("cannot reach the gateway at {}: {e}", self.base))
                })?;
                let status = response.status();
                let body = Limited::new(response.into_body(), MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| failed(format!("{method} {url}: reading the answer: {e}")))?
                    .to_bytes();
                Ok::<_, CliError>((status, body))
            })
            .await
            .map_err(|_| failed(format!("{method} {url}: no answer within {TIMEOUT:?}")))?
        })?;
        let (status, body) = answer;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        // The gateway's own message (OpenAI's error shape), which never holds a secret.
        let message = json["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        Err(failed(format!(
            "the gateway answered {}: {message}",
            status.as_u16()
        )))
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::GET, path, None)
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(Method::POST, path, Some(body))
    }

    pub(crate) fn patch(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(Method::PATCH, path, Some(body))
    }

    /// Every key (of `project`, if given), page after page.
    pub(crate) fn all_keys(&self, project: Option<&str>) -> Result<Vec<Value>, CliError> {
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", PAGE.to_string())];
            if let Some(p) = project {
                query.push(("project", p.to_owned()));
            }
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let query = serde_urlencoded::to_string(&query)
                .map_err(|e| failed(format!("listing keys: {e}")))?;
            let page = self.get(&format!("/admin/v1/keys?{query}"))?;
            keys.extend(page["data"].as_array().cloned().unwrap_or_default());
            match (page["has_more"].as_bool(), page["last_id"].as_str()) {
                (Some(true), Some(last)) => after = Some(last.to_owned()),
                _ => return Ok(keys),
            }
        }
    }
}

/// A path segment (an id) as it may go into a URL path.
pub(crate) fn segment(id: &str) -> String {
    serde_urlencoded::to_string([("", id)])
        .map(|s| s.trim_start_matches('=').replace('+', "%20"))
        .unwrap_or_default()
}

/// A record from the API's view of it: without the view's own fields (`extra`), and with
/// placeholder digests where the view leaves them out (the API never shows them; nothing the
/// CLI prints from such a record shows a digest).
pub(crate) fn record_of<T: DeserializeOwned>(view: &Value, extra: &[&str]) -> Result<T, CliError> {
    let mut v = view.clone();
    let zero = Value::String("0".repeat(64));
    if let Some(map) = v.as_object_mut() {
        for field in extra {
            map.remove(*field);
        }
        if map.contains_key("id") && !map.contains_key("digest") && extra.contains(&"digest") {
            map.insert("digest".into(), zero.clone());
        }
        if let Some(prev) = map.get_mut("previous").and_then(Value::as_object_mut) {
            prev.entry("digest").or_insert(zero);
        }
    }
    serde_json::from_value(v).map_err(|e| failed(format!("the gateway's answer: {e}")))
}

/// The view fields of a key that are not in its record (and `digest`, to put back).
pub(crate) const KEY_VIEW: &[&str] = &[
    "object",
    "status",
    "created_by",
    "last_used_at",
    "disabled_reason",
    "digest",
];
/// The view fields of a project that are not in its record.
pub(crate) const PROJECT_VIEW: &[&str] = &["object"];
/// The view fields of an admin key that are not in its record.
pub(crate) const ADMIN_KEY_VIEW: &[&str] = &["object", "status", "digest"];

/// The JSON merge patch (RFC 7386) that turns `before` into `after`, over `fields` only.
pub(crate) fn merge_patch(before: &Value, after: &Value, fields: &[&str]) -> Map<String, Value> {
    fn diff(before: &Value, after: &Value) -> Option<Value> {
        if before == after {
            return None;
        }
        match (before, after) {
            (Value::Object(b), Value::Object(a)) => {
                let mut out = Map::new();
                for (k, av) in a {
                    if let Some(d) = diff(b.get(k).unwrap_or(&Value::Null), av) {
                        out.insert(k.clone(), d);
                    }
                }
                for k in b.keys().filter(|k| !a.contains_key(*k)) {
                    out.insert(k.clone(), Value::Null);
                }
                Some(Value::Object(out))
            }
            _ => Some(after.clone()),
        }
    }
    let mut patch = Map::new();
    for f in fields {
        let (b, a) = (
            before.get(*f).unwrap_or(&Value::Null),
            after.get(*f).unwrap_or(&Value::Null),
        );
        if let Some(d) = diff(b, a) {
            patch.insert((*f).to_owned(), d);
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Applies a merge patch as RFC 7386 says.
    fn apply(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        apply(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    #[test]
    fn merge_patches_turn_before_into_after() {
        let before = json!({
            "name": "a", "labels": {"team": "x", "env": "dev"}, "groups": ["g"],
            "policies": [{"type": "require_group", "group": "g"}], "id": "key_1"
        });
        let after = json!({
            "name": "a", "labels": {"env": "prod"}, "policies": [], "id": "key_2"
        });
        let fields = ["name", "labels", "groups", "policies"];
        let patch = Value::Object(merge_patch(&before, &after, &fields));
        assert_eq!(
            patch,
            json!({"labels": {"team": null, "env": "prod"}, "groups": null, "policies": []})
        );
        let mut applied = before.clone();
        apply(&mut applied, &patch);
        for f in fields {
            assert_eq!(applied.get(f), after.get(f), "{f}");
        }
        // Fields outside the list are never sent.
        assert_eq!(applied["id"], "key_1");
        assert!(merge_patch(&before, &before, &fields).is_empty());
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(segment("key_abc"), "key_abc");
        assert_eq!(segment("a/b c?"), "a%2Fb%20c%3F");
    }

    #[test]
    fn only_admin_keys_are_sent() {
        let e = Remote::connect("http://127.0.0.1:9", Some("sk-kg-abc"), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not an admin key"), "{e}");
        assert!(!e.to_string().contains("sk-kg-abc"));
        let e = Remote::connect("http://127.0.0.1:9", None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("KEYGATE_ADMIN_KEY"), "{e}");
        let e = Remote::connect("ftp://x", Some("kg-admin-x"), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("http://"), "{e}");
    }
}
