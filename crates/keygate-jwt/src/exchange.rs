//! [`TokenExchange`]: the service that trades an API key for a narrower, expiring token.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use ipnet::IpNet;
use jsonwebtoken::Header;
use keygate_core::{
    Clock, Credential, Denial, Limits, ModelRules, Permissions, Principal, Restriction, Secret,
    Stage, Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::keys::{ConfigError, SigningKey};

/// The default token lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// The default ceiling on a requested lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(60 * 60);

/// The largest request body read.
pub const MAX_REQUEST_BODY: usize = 16 * 1024;

/// What a caller asks for; every field is optional and can only narrow the key's rights.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds (default 15 minutes; at most the configured ceiling, and never past
    /// the key's own expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Access per endpoint group; must be within the key's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// Models; each allow pattern must be within the key's and the project's allow lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<ModelRules>,
    /// Client address ranges; each must be inside the key's and the project's ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Limits; none may be higher than the key's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// The answer to a successful exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The signed token (a secret: show it once, never log it).
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// When the token stops working.
    pub expires_at: Timestamp,
    /// Seconds from now until `expires_at`.
    pub expires_in: u64,
}

/// The claims keygate signs.
#[derive(Serialize)]
struct IssuedClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "is_unrestricted")]
    rights: &'a Restriction,
}

fn is_unrestricted(r: &&Restriction) -> bool {
    **r == Restriction::default()
}

/// A tower service, mounted by the host on a route of its choice (the example gateway uses
/// `POST /v1/tokens`), that issues a signed short-lived token for the API key that calls it.
///
/// It expects `KeyExtractLayer` in front of it and reads the [`Principal`] from the request
/// extensions: none → 401; a principal that is itself a token → 403 (tokens do not mint
/// tokens). The JSON body ([`TokenRequest`], may be empty) asks for a subset of the key's
/// rights; asking for anything the key does not have is refused with 403
/// `token_scope_exceeds_key`, never silently trimmed. The answer is a [`TokenResponse`].
///
/// Tokens carry `iss`, `aud`, `sub` (the key id), `iat`, `nbf`, `exp`, `jti` and the narrowed
/// rights (claim `rights`, a [`Restriction`]); verify them with
/// [`JwtVerifier`](crate::JwtVerifier) configured with the same issuer, audience and (public)
/// key under the same `kid`.
///
/// `Error` is `Infallible` and the response body `Full<Bytes>`, so it mounts directly with
/// axum's `Router::route_service` or under any hyper/tower stack.
#[derive(Debug, Clone)]
pub struct TokenExchange {
    inner: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    issuer: String,
    audience: String,
    key: SigningKey,
    default_ttl: Duration,
    max_ttl: Duration,
    clock: Clock,
}

impl TokenExchange {
    /// Issues tokens from `issuer` for `audience`, signed with `key`; lifetimes
    /// [`DEFAULT_TTL`] by default, at most [`DEFAULT_MAX_TTL`]; the system clock.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Missing`] for an empty issuer or audience.
    pub fn new(issuer: &str, audience: &str, key: SigningKey) -> Result<Self, ConfigError> {
        if issuer.is_empty() {
            return Err(ConfigError::Missing("issuer"));
        }
        if audience.is_empty() {
            return Err(ConfigError::Missing("audience"));
        }
        crate::install_backend();
        Ok(TokenExchange {
            inner: Arc::new(Config {
                issuer: issuer.to_owned(),
                audience: audience.to_owned(),
                key,
                default_ttl: DEFAULT_TTL,
                max_ttl: DEFAULT_MAX_TTL,
                clock: Clock::system(),
            }),
        })
    }

    /// Sets the lifetime given when the caller asks for none, and the most it may ask for.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Lifetime`] when either is under a second or `default` exceeds `max`.
    pub fn with_ttl(self, default: Duration, max: Duration) -> Result<Self, ConfigError> {
        if default < Duration::from_secs(1) || max < Duration::from_secs(1) {
            return Err(ConfigError::Lifetime(
                "lifetimes must be at least one second",
            ));
        }
        if default > max {
            return Err(ConfigError::Lifetime(
                "default lifetime exceeds the maximum",
            ));
        }
        Ok(self.map(|c| {
            c.default_ttl = default;
            c.max_ttl = max;
        }))
    }

    /// Reads time from `clock` (tests inject a `ManualClock`).
    #[must_use]
    pub fn with_clock(self, clock: Clock) -> Self {
        self.map(|c| c.clock = clock)
    }

    fn map(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut config = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Config {
            issuer: shared.issuer.clone(),
            audience: shared.audience.clone(),
            key: shared.key.clone(),
            default_ttl: shared.default_ttl,
            max_ttl: shared.max_ttl,
            clock: shared.clock.clone(),
        });
        f(&mut config);
        TokenExchange {
            inner: Arc::new(config),
        }
    }

    /// Issues a token for `principal` narrowed by `request`, without HTTP: what the service
    /// does once it has the principal and the parsed body.
    ///
    /// # Errors
    ///
    /// The [`Denial`] the service would answer with (403 for a token principal or for rights
    /// the key lacks, 400 for a bad lifetime, 500 if signing fails).
    // `Denial` is the workspace's one refusal type, passed by value everywhere; refusals are
    // the rare path, so its size does not matter here.
    #[allow(clippy::result_large_err)]
    pub fn issue(
        &self,
        principal: &Principal,
        request: &TokenRequest,
    ) -> Result<TokenResponse, Denial> {
        let config = &*self.inner;
        let secret = match principal.credential() {
            Credential::ApiKey(secret) => *secret,
            _ => {
                return Err(Denial::new(
                    Stage::Policy,
                    StatusCode::FORBIDDEN,
                    "token_exchange_requires_key",
                    "Only an API key can be exchanged for a token.",
                ));
            }
        };
        let restriction = narrow(principal, request)?;

        let now = config.clock.now();
        let ttl = match request.ttl_seconds {
            None => config.default_ttl,
            Some(0) => {
                return Err(bad_request(
                    "ttl_seconds must be at least 1.",
                    "ttl_seconds",
                ));
            }
            Some(s) if Duration::from_secs(s) > config.max_ttl => {
                return Err(bad_request(
                    "ttl_seconds exceeds the maximum token lifetime.",
                    "ttl_seconds",
                ));
            }
            Some(s) => Duration::from_secs(s),
        };
        let now_secs = now.as_unix_secs();
        let mut exp = now_secs.saturating_add(ttl.as_secs());
        // Never outlive the key, nor (for a previous secret) the rotation grace period.
        let key = principal.key();
        let mut caps = vec![key.expires_at];
        if secret == Secret::Previous {
            caps.push(key.previous.as_ref().map(|p| p.valid_until));
        }
        for cap in caps.into_iter().flatten() {
            exp = exp.min(cap.as_unix_secs());
        }
        if exp <= now_secs {
            return Err(scope_exceeded("The key expires too soon to issue a token."));
        }

        let jti = new_jti().map_err(|_| {
            Denial::new(
                Stage::Policy,
                StatusCode::INTERNAL_SERVER_ERROR,
                "token_issue_failed",
                "The token could not be issued.",
            )
            .with_detail("random source failed")
        })?;
        let claims = IssuedClaims {
            iss: &config.issuer,
            aud: &config.audience,
            sub: principal.key_id().as_str(),
            iat: now_secs,
            nbf: now_secs,
            exp,
            jti: &jti,
            rights: &restriction,
        };
        let mut header = Header::new(config.key.algorithm());
        header.kid = Some(config.key.kid().to_owned());
        let token =
            jsonwebtoken::encode(&header, &claims, config.key.encoding_key()).map_err(|_| {
                Denial::new(
                    Stage::Policy,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "token_issue_failed",
                    "The token could not be issued.",
                )
                .with_detail("signing failed")
            })?;
        Ok(TokenResponse {
            token,
            token_type: "Bearer".to_owned(),
            expires_at: Timestamp::from_unix_secs(exp),
            expires_in: exp - now_secs,
        })
    }
}

fn new_jti() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    let mut s = String::with_capacity(36);
    s.push_str("tok_");
    for b in bytes {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    Ok(s)
}

fn bad_request(message: &'static str, param: &'static str) -> Denial {
    Denial::new(
        Stage::Policy,
        StatusCode::BAD_REQUEST,
        "invalid_token_request",
        message,
    )
    .with_param(param)
}

fn scope_exceeded(message: &'static str) -> Denial {
    Denial::new(
        Stage::Policy,
        StatusCode::FORBIDDEN,
        "token_scope_exceeds_key",
        message,
    )
}

/// The restriction `request` asks for, if every part of it is within `principal`'s rights.
#[allow(clippy::result_large_err)] // as `TokenExchange::issue`
pub(crate) fn narrow(principal: &Principal, request: &TokenRequest) -> Result<Restriction, Denial> {
    let key = principal.key();
    let project = principal.project();
    if let Some(perms) = &request.permissions
        && !perms.is_within(&key.permissions)
    {
        return Err(
            scope_exceeded("The requested permissions exceed the key's.").with_param("permissions"),
        );
    }
    let models = request.models.clone().unwrap_or_default();
    if let Some(allow) = &models.allow {
        for wanted in allow {
            for bound in [&key.models.allow, &project.models.allow]
                .into_iter()
                .flatten()
            {
                if !bound.iter().any(|b| wanted.is_within(b)) {
                    return Err(scope_exceeded("The requested models exceed the key's.")
                        .with_param("models"));
                }
            }
        }
    }
    let ips = request.allowed_ips.clone().unwrap_or_default();
    for net in &ips {
        for bound in [&key.allowed_ips, &project.allowed_ips] {
            if !bound.is_empty() && !bound.iter().any(|b| b.contains(net)) {
                return Err(
                    scope_exceeded("The requested address ranges exceed the key's.")
                        .with_param("allowed_ips"),
                );
            }
        }
    }
    let limits = request.limits.clone().unwrap_or_default();
    if limits.validate().is_err() {
        return Err(bad_request(
            "A per-model limit pattern is invalid.",
            "limits",
        ));
    }
    if !limits_within(&limits, &key.limits) {
        return Err(scope_exceeded("The requested limits exceed the key's.").with_param("limits"));
    }
    Ok(Restriction {
        permissions: request.permissions.clone(),
        models,
        allowed_ips: ips,
        limits,
    })
}

/// Whether no limit in `wanted` is higher than the same limit of `key`. Token limits apply on
/// top of the key's anyway, so a higher one could never widen anything; it is refused so a
/// caller is never misled about what it got.
fn limits_within(wanted: &Limits, key: &Limits) -> bool {
    fn le<T: PartialOrd>(w: Option<T>, k: Option<T>) -> bool {
        match (w, k) {
            (Some(w), Some(k)) => w <= k,
            _ => true,
        }
    }
    le(wanted.requests_per_minute, key.requests_per_minute)
        && le(wanted.tokens_per_minute, key.tokens_per_minute)
        && wanted.budgets.iter().all(|w| {
            key.budgets
                .iter()
                .filter(|k| k.period == w.period && k.model == w.model)
                .all(|k| w.amount <= k.amount)
        })
        && wanted.models.iter().all(|(pattern, w)| {
            key.models.get(pattern).is_none_or(|k| {
                le(w.requests_per_minute, k.requests_per_minute)
                    && le(w.tokens_per_minute, k.tokens_per_minute)
            })
        })
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The body is a bearer credential.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The future of [`TokenExchange`]: reads the body, then issues. Boxed: exchanges are rare
/// next to the requests their tokens make.
pub type ExchangeFuture =
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

impl<B> tower_service::Service<Request<B>> for TokenExchange
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ExchangeFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(request).await) })
    }
}

impl TokenExchange {
    async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let refuse = |d: Denial, headers: &HeaderMap| d.into_response(headers);
        let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
            return refuse(Denial::missing_credential(), &parts.headers);
        };
        if parts.method != Method::POST {
            return refuse(
                Denial::new(
                    Stage::Policy,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "Use POST to exchange a key for a token.",
                ),
                &parts.headers,
            );
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
            return refuse(too_large(), &parts.headers);
        }
        let bytes = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return refuse(too_large(), &parts.headers),
        };
        let token_request = if bytes.iter().all(u8::is_ascii_whitespace) {
            TokenRequest::default()
        } else {
            match serde_json::from_slice::<TokenRequest>(&bytes) {
                Ok(r) => r,
                Err(_) => {
                    return refuse(
                        Denial::new(
                            Stage::Policy,
                            StatusCode::BAD_REQUEST,
                            "invalid_token_request",
                            "The request body is not a valid token request.",
                        ),
                        &parts.headers,
                    );
                }
            }
        };
        match self.issue(&principal, &token_request) {
            Ok(issued) => match serde_json::to_vec(&issued) {
                Ok(body) => json_response(StatusCode::OK, body),
                Err(_) => refuse(
                    Denial::new(
                        Stage::Policy,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "token_issue_failed",
                        "The token could not be issued.",
                    ),
                    &parts.headers,
                ),
            },
            Err(denial) => refuse(denial, &parts.headers),
        }
    }
}

fn too_large() -> Denial {
    Denial::new(
        Stage::Policy,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        "The token request body is too large.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use keygate_core::{Access, ManualClock, ModelPattern, TokenError, TokenVerifier};
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use tower::ServiceExt;

    fn exchange() -> TokenExchange {
        TokenExchange::new(ISS, AUD, signing_key(Algorithm::EdDSA))
            .unwrap()
            .with_clock(ManualClock::new(now()).clock())
    }

    use jsonwebtoken::Algorithm;

    async fn call(
        principal: Option<Principal>,
        method: Method,
        body: &str,
    ) -> Response<Full<Bytes>> {
        let mut request = Request::builder()
            .method(method)
            .uri("/v1/tokens")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        if let Some(p) = principal {
            request.extensions_mut().insert(p);
        }
        exchange().oneshot(request).await.unwrap()
    }

    async fn json_of(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn code(response: &Response<Full<Bytes>>) -> (StatusCode, String) {
        let denial = response.extensions().get::<Denial>().expect("a Denial");
        (response.status(), denial.code().to_owned())
    }

    fn request(json: serde_json::Value) -> TokenRequest {
        serde_json::from_value(json).unwrap()
    }

    #[tokio::test]
    async fn key_exchanges_for_a_token_with_the_requested_rights() {
        let response = call(
            Some(principal(key_record())),
            Method::POST,
            r#"{"ttl_seconds": 300, "permissions": {"restricted": {"models": "read"}},
               "models": {"allow": ["gpt-4o-mini"]}, "allowed_ips": ["10.1.0.0/16"],
               "limits": {"requests_per_minute": 5}}"#,
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let issued: TokenResponse = serde_json::from_value(json_of(response).await).unwrap();
        assert_eq!(issued.token_type, "Bearer");
        assert_eq!(issued.expires_in, 300);
        assert_eq!(issued.expires_at, Timestamp::from_unix_secs(NOW + 300));

        let p = verifier().verify(&issued.token, now()).await.unwrap();
        assert_eq!(p.access("models"), Access::Read);
        assert_eq!(p.access("chat.completions"), Access::None);
        assert!(p.allows_model("gpt-4o-mini"));
        assert!(!p.allows_model("gpt-4o"));
        assert!(p.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(!p.allows_ip("10.2.2.3".parse().unwrap()));
        let rpm: Vec<_> = p
            .limits()
            .map(|(s, l)| (s, l.requests_per_minute))
            .collect();
        assert!(rpm.contains(&(
            keygate_core::LimitScope::Token,
            std::num::NonZeroU32::new(5)
        )));
    }

    #[tokio::test]
    async fn empty_body_gives_the_keys_rights_for_the_default_ttl() {
        let response = call(Some(principal(key_record())), Method::POST, "").await;
        let issued: TokenResponse = serde_json::from_value(json_of(response).await).unwrap();
        assert_eq!(issued.expires_in, DEFAULT_TTL.as_secs());
        let p = verifier().verify(&issued.token, now()).await.unwrap();
        assert_eq!(p.access("chat.completions"), Access::Write);
        assert!(p.allows_model("gpt-4o"));
        assert!(!p.allows_model("o1"), "the key's own rules still apply");
    }

    #[tokio::test]
    async fn no_principal_is_401() {
        let response = call(None, Method::POST, "{}").await;
        assert_eq!(
            code(&response),
            (StatusCode::UNAUTHORIZED, "missing_api_key".into())
        );
    }

    #[tokio::test]
    async fn a_token_cannot_mint_tokens() {
        let token_principal = Principal::new(
            std::sync::Arc::new(key_record()),
            std::sync::Arc::new(keygate_core::ProjectRecord::new("p")),
            Credential::Token {
                id: "tok_1".into(),
                expires_at: Timestamp::from_unix_secs(NOW + 60),
            },
        );
        let response = call(Some(token_principal), Method::POST, "{}").await;
        assert_eq!(
            code(&response),
            (StatusCode::FORBIDDEN, "token_exchange_requires_key".into())
        );
    }

    #[tokio::test]
    async fn bad_json_is_400() {
        for body in [
            "{",
            r#"{"ttl_seconds": "60"}"#,
            r#"{"permissions": "god"}"#,
            r#"{"unknown": 1}"#,
            r#"{"ttl_seconds": 60, "ttl_seconds": 600}"#,
            r#"{"models": {"allow": ["gpt-*-mini"]}}"#,
        ] {
            let response = call(Some(principal(key_record())), Method::POST, body).await;
            assert_eq!(
                code(&response),
                (StatusCode::BAD_REQUEST, "invalid_token_request".into()),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn only_post_is_allowed() {
        let response = call(Some(principal(key_record())), Method::GET, "").await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn asking_for_more_than_the_key_is_403() {
        for body in [
            r#"{"permissions": "all"}"#,
            r#"{"permissions": "read_only"}"#,
            r#"{"permissions": {"restricted": {"models": "write"}}}"#,
            r#"{"permissions": {"restricted": {"audio": "read"}}}"#,
            r#"{"models": {"allow": ["gpt-4*"]}}"#,
            r#"{"models": {"allow": ["o1"]}}"#,
            r#"{"models": {"allow": ["*"]}}"#,
            r#"{"allowed_ips": ["0.0.0.0/0"]}"#,
            r#"{"allowed_ips": ["11.0.0.0/8"]}"#,
            r#"{"limits": {"requests_per_minute": 101}}"#,
        ] {
            let response = call(Some(principal(key_record())), Method::POST, body).await;
            assert_eq!(
                code(&response),
                (StatusCode::FORBIDDEN, "token_scope_exceeds_key".into()),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn project_bounds_apply_to_requested_models_and_ips() {
        let mut project = keygate_core::ProjectRecord::new("p");
        project.models = ModelRules::allow_only([ModelPattern::new("gpt-4o-mini").unwrap()]);
        project.allowed_ips = vec!["10.5.0.0/16".parse().unwrap()];
        let p = Principal::new(
            std::sync::Arc::new(key_record()),
            std::sync::Arc::new(project),
            Credential::ApiKey(Secret::Current),
        );
        let ex = exchange();
        let ask = |j| {
            ex.issue(&p, &request(j))
                .map(|_| ())
                .map_err(|d| d.code().to_owned())
        };
        assert!(ask(serde_json::json!({"models": {"allow": ["gpt-4o-mini"]}})).is_ok());
        assert!(ask(serde_json::json!({"models": {"allow": ["gpt-4o"]}})).is_err());
        assert!(ask(serde_json::json!({"allowed_ips": ["10.5.1.0/24"]})).is_ok());
        assert!(ask(serde_json::json!({"allowed_ips": ["10.6.1.0/24"]})).is_err());
    }

    #[tokio::test]
    async fn lifetime_is_capped_by_the_ceiling_and_the_keys_expiry() {
        let ex = exchange()
            .with_ttl(Duration::from_secs(60), Duration::from_secs(600))
            .unwrap();
        let p = principal(key_record());
        assert_eq!(
            ex.issue(&p, &TokenRequest::default()).unwrap().expires_in,
            60
        );
        assert_eq!(
            ex.issue(&p, &request(serde_json::json!({"ttl_seconds": 601})))
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ex.issue(&p, &request(serde_json::json!({"ttl_seconds": 0})))
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        let mut key = key_record();
        key.expires_at = Some(Timestamp::from_unix_secs(NOW + 90));
        let issued = ex
            .issue(
                &principal(key),
                &request(serde_json::json!({"ttl_seconds": 600})),
            )
            .unwrap();
        assert_eq!(issued.expires_at, Timestamp::from_unix_secs(NOW + 90));
    }

    #[test]
    fn previous_secret_tokens_end_with_the_grace_period() {
        let mut key = key_record();
        key.previous = Some(keygate_core::PreviousSecret {
            digest: keygate_core::KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(NOW + 42),
        });
        let p = Principal::new(
            std::sync::Arc::new(key),
            std::sync::Arc::new(keygate_core::ProjectRecord::new("p")),
            Credential::ApiKey(Secret::Previous),
        );
        let issued = exchange().issue(&p, &TokenRequest::default()).unwrap();
        assert_eq!(issued.expires_in, 42);
    }

    #[test]
    fn bad_lifetimes_fail_at_build() {
        let ex = || TokenExchange::new(ISS, AUD, signing_key(Algorithm::HS256)).unwrap();
        assert!(
            ex().with_ttl(Duration::ZERO, Duration::from_secs(60))
                .is_err()
        );
        assert!(
            ex().with_ttl(Duration::from_secs(120), Duration::from_secs(60))
                .is_err()
        );
        assert!(TokenExchange::new("", AUD, signing_key(Algorithm::HS256)).is_err());
    }

    #[tokio::test]
    async fn revoking_the_key_kills_its_tokens_at_once() {
        let store = std::sync::Arc::new(store());
        let v = crate::JwtVerifier::new(store.clone(), ISS, AUD, all_keys()).unwrap();
        let issued = exchange()
            .issue(&principal(key_record()), &TokenRequest::default())
            .unwrap();
        assert!(v.verify(&issued.token, now()).await.is_ok());
        let mut revoked = key_record();
        revoked.revoked_at = Some(now());
        store.replace(
            keygate_core::Snapshot::new([keygate_core::ProjectRecord::new("p")], [revoked])
                .unwrap(),
        );
        assert!(matches!(
            v.verify(&issued.token, now()).await,
            Err(TokenError::Invalid("token key revoked"))
        ));
    }

    #[test]
    fn tokens_of_each_signing_algorithm_verify() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for alg in [
            Algorithm::HS256,
            Algorithm::EdDSA,
            Algorithm::ES256,
            Algorithm::RS256,
        ] {
            let ex = TokenExchange::new(ISS, AUD, signing_key(alg))
                .unwrap()
                .with_clock(ManualClock::new(now()).clock());
            let issued = ex
                .issue(&principal(key_record()), &TokenRequest::default())
                .unwrap();
            assert!(
                rt.block_on(verifier().verify(&issued.token, now())).is_ok(),
                "{alg:?}"
            );
        }
    }

    mod narrowing {
        use super::*;
        use proptest::prelude::*;

        const GROUPS: [&str; 4] = ["chat.completions", "models", "files", "audio"];
        const MODELS: [&str; 7] = [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-mini-2024",
            "o1-mini",
            "o1",
            "gpt-4",
            "claude",
        ];
        const PATTERNS: [&str; 8] = [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o*",
            "gpt-4*",
            "o1-mini",
            "o1*",
            "*",
            "claude",
        ];
        const NETS: [&str; 6] = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "11.0.0.0/8",
            "::/0",
        ];
        const IPS: [&str; 5] = ["10.1.2.3", "10.1.9.9", "10.200.0.1", "11.0.0.1", "::1"];

        fn access() -> impl Strategy<Value = Access> {
            prop_oneof![Just(Access::None), Just(Access::Read), Just(Access::Write)]
        }

        fn permissions() -> impl Strategy<Value = Option<Permissions>> {
            prop_oneof![
                Just(None),
                Just(Some(Permissions::All)),
                Just(Some(Permissions::ReadOnly)),
                proptest::collection::btree_map(
                    proptest::sample::select(&GROUPS[..]).prop_map(str::to_owned),
                    access(),
                    0..4
                )
                .prop_map(|m| Some(Permissions::Restricted(m))),
            ]
        }

        fn models() -> impl Strategy<Value = Option<ModelRules>> {
            let pattern =
                proptest::sample::select(&PATTERNS[..]).prop_map(|p| ModelPattern::new(p).unwrap());
            proptest::option::of(
                (
                    proptest::option::of(proptest::collection::vec(pattern.clone(), 0..3)),
                    proptest::collection::vec(pattern, 0..2),
                )
                    .prop_map(|(allow, deny)| ModelRules { allow, deny }),
            )
        }

        fn ips() -> impl Strategy<Value = Option<Vec<ipnet::IpNet>>> {
            proptest::option::of(proptest::collection::vec(
                proptest::sample::select(&NETS[..]).prop_map(|n| n.parse().unwrap()),
                0..3,
            ))
        }

        fn limits() -> impl Strategy<Value = Option<Limits>> {
            proptest::option::of((1u32..200).prop_map(|rpm| Limits {
                requests_per_minute: std::num::NonZeroU32::new(rpm),
                ..Limits::default()
            }))
        }

        fn token_requests() -> impl Strategy<Value = TokenRequest> {
            (
                proptest::option::of(1u64..4000),
                permissions(),
                models(),
                ips(),
                limits(),
            )
                .prop_map(|(ttl_seconds, permissions, models, allowed_ips, limits)| {
                    TokenRequest {
                        ttl_seconds,
                        permissions,
                        models,
                        allowed_ips,
                        limits,
                    }
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn exchange_only_ever_narrows(req in token_requests()) {
                let key = principal(key_record());
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let ex = TokenExchange::new(ISS, AUD, signing_key(Algorithm::HS256))
                    .unwrap()
                    .with_clock(ManualClock::new(now()).clock());
                match ex.issue(&key, &req) {
                    Err(denial) => {
                        let s = denial.status();
                        prop_assert!(s == StatusCode::FORBIDDEN || (s == StatusCode::BAD_REQUEST && denial.param() == Some("ttl_seconds")), "{denial:?}");
                    }
                    Ok(issued) => {
                        let token = rt.block_on(verifier().verify(&issued.token, now())).unwrap();
                        for g in GROUPS {
                            prop_assert!(token.access(g) <= key.access(g), "group {g}");
                            let wanted = req.permissions.as_ref().map_or(Access::Write, |p| p.access(g));
                            prop_assert_eq!(token.access(g), key.access(g).min(wanted), "exactly narrowed: {}", g);
                        }
                        for m in MODELS {
                            prop_assert!(!token.allows_model(m) || key.allows_model(m), "model {m}");
                            let wanted = req.models.as_ref().is_none_or(|r| r.allows(m));
                            prop_assert_eq!(token.allows_model(m), key.allows_model(m) && wanted, "model {}", m);
                        }
                        for ip in IPS {
                            let ip: IpAddr = ip.parse().unwrap();
                            prop_assert!(!token.allows_ip(ip) || key.allows_ip(ip), "ip {ip}");
                        }
                        let token_rpm = token.limits().filter_map(|(_, l)| l.requests_per_minute).min();
                        prop_assert!(token_rpm <= key.key().limits.requests_per_minute);
                        prop_assert!(issued.expires_in <= DEFAULT_MAX_TTL.as_secs());
                    }
                }
            }
        }

        #[test]
        fn group_names_in_generated_requests_are_the_keys_and_others() {
            // Guards the generator: a request for "audio" (which the key lacks) must refuse.
            let req = TokenRequest {
                permissions: Some(Permissions::Restricted(BTreeMap::from([(
                    "audio".to_owned(),
                    Access::Read,
                )]))),
                ..TokenRequest::default()
            };
            assert_eq!(
                exchange()
                    .issue(&principal(key_record()), &req)
                    .unwrap_err()
                    .status(),
                StatusCode::FORBIDDEN
            );
        }
    }
}
