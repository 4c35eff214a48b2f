//! Verification shared by keygate tokens and external identity tokens, and [`JwtVerifier`].

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Validation};
use keygate_core::{
    Credential, KeyStore, Principal, Restriction, Secret, Timestamp, TokenError, TokenVerifier,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::cache::{TokenCache, Verified};
use crate::keys::{ConfigError, KeySet, SUPPORTED_ALGORITHMS, kid_is_valid};

/// The default leeway for `exp` and `nbf`: small, for clock skew between hosts only.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The longest token looked at; anything longer is refused before parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The detail of [`TokenError::Invalid`] when a token names a key id its verifier does not
/// hold (so [`AnyOf`](crate::AnyOf) can hand it to the next verifier).
pub const UNKNOWN_KID: &str = "unknown kid";

/// Whether `credential` is a compact JWS by its bytes: `eyJ`, three non-empty segments of
/// base64url separated by dots, at most [`MAX_TOKEN_LEN`] bytes. Allocation-free; says
/// nothing about validity.
pub fn looks_like_jws(credential: &str) -> bool {
    has_jws_shape(credential) && credential.bytes().all(|c| JWS_BYTE[usize::from(c)])
}

/// The cheaper test [`TokenVerifier::accepts`] uses: `eyJ`, at most [`MAX_TOKEN_LEN`] bytes,
/// exactly two dots (found with SIMD) and no empty segment. The alphabet is checked by
/// [`looks_like_jws`] when the token is verified; a credential with stray bytes that passes
/// here is refused there with the same 401 it would get as a malformed key.
pub(crate) fn has_jws_shape(credential: &str) -> bool {
    let b = credential.as_bytes();
    if b.len() > MAX_TOKEN_LEN || !b.starts_with(b"eyJ") {
        return false;
    }
    let mut dots = memchr::memchr_iter(b'.', b);
    match (dots.next(), dots.next(), dots.next()) {
        (Some(first), Some(second), None) => second > first + 1 && second + 1 < b.len(),
        _ => false,
    }
}

/// Bytes of a compact JWS: the base64url alphabet and `.`.
static JWS_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.';
        i += 1;
    }
    t
};

/// Issuer, audience, algorithms and leeway: what every verified token must match.
#[derive(Debug, Clone)]
pub(crate) struct Checks {
    validations: Vec<Validation>,
    leeway_secs: u64,
}

/// The time claims, parsed strictly: `exp` must be an integer (a string or a float is refused,
/// GHSA-h395-gr6q-cpjc), `nbf` too when present.
#[derive(Deserialize)]
pub(crate) struct TimeClaims {
    pub(crate) exp: u64,
    #[serde(default)]
    pub(crate) nbf: Option<u64>,
}

impl Checks {
    pub(crate) fn new(
        issuer: &str,
        audience: &str,
        algorithms: &[Algorithm],
        leeway: Duration,
    ) -> Result<Self, ConfigError> {
        if issuer.is_empty() {
            return Err(ConfigError::Missing("issuer"));
        }
        if audience.is_empty() {
            return Err(ConfigError::Missing("audience"));
        }
        if algorithms.is_empty() {
            return Err(ConfigError::Empty);
        }
        let mut validations = Vec::with_capacity(algorithms.len());
        for &alg in algorithms {
            if !SUPPORTED_ALGORITHMS.contains(&alg) {
                return Err(ConfigError::UnsupportedAlgorithm(format!("{alg:?}")));
            }
            // One algorithm per validation: the key's pinned algorithm is the only one tried.
            let mut v = Validation::new(alg);
            v.set_issuer(&[issuer]);
            v.set_audience(&[audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            // The library's own time checks read the system clock; keygate checks `exp` and
            // `nbf` against the injected `Clock` instead (see `check_times`), so tests can move
            // time and every layer agrees on "now". The library still refuses a non-numeric
            // `exp` as a missing required claim.
            v.validate_exp = false;
            v.validate_nbf = false;
            v.leeway = 0;
            validations.push(v);
        }
        Ok(Checks {
            validations,
            leeway_secs: leeway.as_secs(),
        })
    }

    pub(crate) fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_secs = leeway.as_secs();
        self
    }

    pub(crate) fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        self.validations.iter().map(|v| v.algorithms[0])
    }

    /// Checks signature, algorithm, issuer, audience and times; returns the claims.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        keys: &KeySet,
        token: &str,
        now: Timestamp,
    ) -> Result<(T, TimeClaims), TokenError> {
        if !looks_like_jws(token) {
            return Err(TokenError::Invalid("malformed token"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Invalid("malformed token header"))?;
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions we do not understand must be refused.
            return Err(TokenError::Invalid("unsupported critical header"));
        }
        // `jku`, `x5u`, `x5c` and an embedded `jwk` are never read: only `kid`, only in `keys`.
        let kid = header
            .kid
            .as_deref()
            .ok_or(TokenError::Invalid("token has no kid"))?;
        if !kid_is_valid(kid) {
            return Err(TokenError::Invalid("invalid kid"));
        }
        let key = keys.get(kid).ok_or(TokenError::Invalid(UNKNOWN_KID))?;
        if header.alg != key.alg {
            return Err(TokenError::Invalid("algorithm does not match the key"));
        }
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms[0] == key.alg)
            .ok_or(TokenError::Invalid("algorithm not allowed"))?;
        let data = jsonwebtoken::decode::<Both<T>>(token, &key.key, validation)
            .map_err(|e| TokenError::Invalid(error_detail(e.kind())))?;
        let Both { claims, times } = data.claims;
        self.check_times(&times, now)?;
        Ok((claims, times))
    }

    pub(crate) fn check_times(&self, times: &TimeClaims, now: Timestamp) -> Result<(), TokenError> {
        let now = now.as_unix_secs();
        // `exp` is the first second at which the token no longer works (RFC 7519 §4.1.4).
        if now >= times.exp.saturating_add(self.leeway_secs) {
            return Err(TokenError::Invalid("token expired"));
        }
        if times
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway_secs))
        {
            return Err(TokenError::Invalid("token not yet valid"));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Both<T> {
    #[serde(flatten)]
    claims: T,
    #[serde(flatten)]
    times: TimeClaims,
}

fn error_detail(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => "bad signature",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::MissingRequiredClaim(_) => "missing or malformed required claim",
        K::InvalidClaimFormat(_) => "malformed claim",
        K::InvalidAlgorithm => "algorithm not allowed",
        K::Json(_) => "malformed claims",
        _ => "invalid token",
    }
}

/// The claims keygate puts in the tokens it issues, besides `iss`, `aud`, `exp`, `nbf`.
#[derive(Deserialize)]
pub(crate) struct KeygateClaims {
    pub(crate) sub: String,
    pub(crate) jti: String,
    #[serde(default)]
    pub(crate) rights: Restriction,
}

/// Verifies the short-lived tokens a [`TokenExchange`](crate::TokenExchange) issues, as a
/// [`TokenVerifier`] for the extraction layer.
///
/// Per token: shape, `kid` (looked up only in the configured [`KeySet`]), the algorithm pinned
/// for that key (and allowed by configuration), signature, `iss`, `aud`, `exp` (required,
/// numeric), `nbf`, then the key named by `sub` is loaded from the [`KeyStore`] and must still
/// work (not revoked, disabled or expired; project not disabled). The [`Principal`] it yields
/// carries the token's narrowed rights as its [`Restriction`].
///
/// Every refusal is [`TokenError::Invalid`] (the same 401 as a bad key), except a store that
/// cannot answer ([`TokenError::Unavailable`], 503).
///
/// Time is the `now` the extraction layer passes (read from its injectable `Clock`), not the
/// system clock: jsonwebtoken's own `exp`/`nbf` checks read the system clock, so they are
/// turned off and the same checks are made here against `now`, with the leeway. Tests move
/// time instead of sleeping, and every layer agrees on what "now" is.
///
/// Optionally, [`JwtVerifier::with_cache`] keeps verified tokens so a repeated token skips
/// the signature check (the key record is still consulted on every request).
#[derive(Debug, Clone)]
pub struct JwtVerifier<K> {
    inner: Arc<Inner<K>>,
    cache: Option<Arc<TokenCache>>,
}

#[derive(Debug)]
struct Inner<K> {
    store: K,
    keys: KeySet,
    checks: Checks,
}

impl<K: KeyStore> JwtVerifier<K> {
    /// A verifier of tokens issued by `issuer` for `audience`, signed by one of `keys`, whose
    /// keys live in `store`. Algorithms allowed: those of the keys in `keys`. Leeway
    /// [`DEFAULT_LEEWAY`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for an empty issuer, audience or key set.
    pub fn new(store: K, issuer: &str, audience: &str, keys: KeySet) -> Result<Self, ConfigError> {
        Self::with_options(store, issuer, audience, keys, None, DEFAULT_LEEWAY)
    }

    /// Like [`JwtVerifier::new`], with the allowed algorithms pinned explicitly (a key of
    /// another algorithm in `keys` is a configuration error) and the leeway for `exp`/`nbf`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for an empty issuer, audience, key set or algorithm list, an
    /// unsupported algorithm, a key whose algorithm is not allowed, or a leeway over 5 minutes.
    pub fn with_options(
        store: K,
        issuer: &str,
        audience: &str,
        keys: KeySet,
        algorithms: Option<&[Algorithm]>,
        leeway: Duration,
    ) -> Result<Self, ConfigError> {
        crate::install_backend();
        if keys.is_empty() {
            return Err(ConfigError::Empty);
        }
        if leeway > Duration::from_secs(300) {
            return Err(ConfigError::Lifetime("leeway over 5 minutes"));
        }
        let algs: Vec<Algorithm> = match algorithms {
            Some(a) => a.to_vec(),
            None => {
                let mut v: Vec<Algorithm> = Vec::new();
                for (_, alg) in keys.kids() {
                    if !v.contains(&alg) {
                        v.push(alg);
                    }
                }
                v
            }
        };
        let checks = Checks::new(issuer, audience, &algs, leeway)?;
        for (kid, alg) in keys.kids() {
            if !algs.contains(&alg) {
                return Err(ConfigError::UnsupportedAlgorithm(format!(
                    "key {kid:?} uses {alg:?}, which is not among the allowed algorithms"
                )));
            }
        }
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                store,
                keys,
                checks,
            }),
            cache: None,
        })
    }

    /// The allowed algorithms.
    pub fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        self.inner.checks.algorithms()
    }
}

impl<K: KeyStore> JwtVerifier<K> {
    /// Keeps up to `capacity` verified tokens, keyed by the SHA-256 of the token, so a token
    /// presented again skips the signature check and claim parsing (measured: a hit costs
    /// under a microsecond, against several for HS256 and tens to hundreds for EdDSA, ES256
    /// and RS256). `exp` and `nbf` are still checked against `now`, and the key record is
    /// still loaded and checked on every request: revoking a key refuses its cached tokens at
    /// once. Only tokens that verified are inserted.
    #[must_use]
    pub fn with_cache(mut self, capacity: NonZeroUsize) -> Self {
        self.cache = Some(Arc::new(TokenCache::new(capacity)));
        self
    }

    fn verify_token(&self, token: &str, now: Timestamp) -> Result<Verified, TokenError> {
        let inner = &*self.inner;
        let (claims, times) = inner
            .checks
            .decode::<KeygateClaims>(&inner.keys, token, now)?;
        if claims.jti.is_empty() || claims.jti.len() > 128 {
            return Err(TokenError::Invalid("malformed jti"));
        }
        if claims.sub.is_empty() || claims.sub.len() > 256 {
            return Err(TokenError::Invalid("malformed sub"));
        }
        Ok(Verified {
            sub: claims.sub.into_boxed_str(),
            jti: claims.jti.into(),
            exp: times.exp,
            nbf: times.nbf,
            rights: Arc::new(claims.rights),
        })
    }
}

impl<K: KeyStore> TokenVerifier for JwtVerifier<K> {
    fn accepts(&self, credential: &str) -> bool {
        has_jws_shape(credential)
    }

    async fn verify(&self, token: &str, now: Timestamp) -> Result<Principal, TokenError> {
        let inner = &*self.inner;
        let verified = match &self.cache {
            None => self.verify_token(token, now)?,
            Some(cache) => {
                let digest = TokenCache::digest(token);
                match cache.get(&digest) {
                    Some(hit) => {
                        inner.checks.check_times(
                            &TimeClaims {
                                exp: hit.exp,
                                nbf: hit.nbf,
                            },
                            now,
                        )?;
                        hit
                    }
                    None => {
                        let fresh = self.verify_token(token, now)?;
                        cache.insert(digest, fresh.clone(), now.as_unix_secs());
                        fresh
                    }
                }
            }
        };
        // Every request, cached or not: the key must still exist and work.
        let found = inner
            .store
            .lookup_id(&verified.sub)
            .await?
            .ok_or(TokenError::Invalid("token key unknown"))?;
        found
            .key
            .check_live(Secret::Current, now)
            .map_err(|r| TokenError::Invalid(rejection_detail(r)))?;
        if found.project.disabled {
            return Err(TokenError::Invalid("project disabled"));
        }
        let credential = Credential::Token {
            id: verified.jti,
            expires_at: Timestamp::from_unix_secs(verified.exp),
        };
        Ok(Principal::new(found.key, found.project, credential).with_restriction(verified.rights))
    }
}

fn rejection_detail(r: keygate_core::Rejection) -> &'static str {
    match r {
        keygate_core::Rejection::Revoked => "token key revoked",
        keygate_core::Rejection::Disabled => "token key disabled",
        keygate_core::Rejection::NotYetValid => "token key not yet valid",
        keygate_core::Rejection::Expired => "token key expired",
        _ => "token key not live",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use keygate_core::{Access, KeyRecord, ProjectRecord, Snapshot};
    use keygate_store::MemoryStore;
    use serde_json::{Value, json};

    async fn verify(token: &str) -> Result<Principal, TokenError> {
        verifier().verify(token, now()).await
    }

    async fn refused(token: &str) -> &'static str {
        match verify(token).await {
            Err(TokenError::Invalid(reason)) => reason,
            Err(other) => panic!("expected Invalid, got {other:?}"),
            Ok(_) => panic!("token was accepted"),
        }
    }

    fn with(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        let mut c = claims();
        f(c.as_object_mut().unwrap());
        c
    }

    #[tokio::test]
    async fn valid_token_of_each_algorithm_yields_narrowed_principal() {
        for (alg, kid) in [
            (Algorithm::HS256, "hs"),
            (Algorithm::EdDSA, "ed"),
            (Algorithm::ES256, "ec"),
            (Algorithm::RS256, "rsa"),
        ] {
            let p = verify(&sign(alg, kid, &claims())).await.unwrap();
            assert_eq!(p.key_id().as_str(), "key_a");
            assert_eq!(p.access("models"), Access::Read, "{alg:?}");
            assert_eq!(p.access("chat.completions"), Access::None, "{alg:?}");
            assert!(matches!(p.credential(), Credential::Token { id, .. } if &**id == "tok_1"));
        }
    }

    #[test]
    fn accepts_only_compact_jws_shapes() {
        let v = verifier();
        assert!(v.accepts(&sign(Algorithm::HS256, "hs", &claims())));
        assert!(!looks_like_jws("eyJa.b.c d") && !looks_like_jws("eyJa.b+/.c"));
        assert!(looks_like_jws("eyJa.b-_.c"));
        for s in [
            "sk-kg-abc",
            "eyJ.a",
            "eyJa..c",
            "eyJa.b.c.d",
            "abc.def.ghi",
            "eyJa.b.",
        ] {
            assert!(!v.accepts(s), "{s:?}");
        }
        assert!(!v.accepts(&format!("eyJ{}.a.b", "a".repeat(MAX_TOKEN_LEN))));
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        let t = raw_token(&json!({"alg": "none", "kid": "hs"}), &claims(), b"");
        // An empty signature segment is not even a JWS shape; with one byte it fails to parse.
        assert!(verify(&t).await.is_err());
        let t = raw_token(&json!({"alg": "none", "kid": "hs"}), &claims(), b"x");
        refused(&t).await;
    }

    #[tokio::test]
    async fn hs256_signed_with_the_rsa_public_key_is_refused() {
        let t = forge_hs256("rsa", RSA_PUB, &claims());
        assert_eq!(refused(&t).await, "algorithm does not match the key");
        let t = forge_hs256("ed", ED_PUB, &claims());
        assert_eq!(refused(&t).await, "algorithm does not match the key");
    }

    #[tokio::test]
    async fn algorithm_not_configured_is_refused() {
        let hs_only = JwtVerifier::with_options(
            store(),
            ISS,
            AUD,
            KeySet::new().with_hs256("hs", HS_SECRET).unwrap(),
            Some(&[Algorithm::HS256]),
            DEFAULT_LEEWAY,
        )
        .unwrap();
        let t = sign(Algorithm::EdDSA, "ed", &claims());
        assert!(matches!(
            hs_only.verify(&t, now()).await,
            Err(TokenError::Invalid(UNKNOWN_KID))
        ));
        // HS384 under the HS256 key's id: the key is pinned to HS256.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS384);
        header.kid = Some("hs".into());
        let t = jsonwebtoken::encode(
            &header,
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(HS_SECRET),
        )
        .unwrap();
        assert!(matches!(
            hs_only.verify(&t, now()).await,
            Err(TokenError::Invalid("algorithm does not match the key"))
        ));
    }

    #[test]
    fn a_key_outside_the_pinned_algorithms_is_a_config_error() {
        let err = JwtVerifier::with_options(
            store(),
            ISS,
            AUD,
            all_keys(),
            Some(&[Algorithm::EdDSA]),
            DEFAULT_LEEWAY,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnsupportedAlgorithm(_)));
        let err = JwtVerifier::with_options(
            store(),
            ISS,
            AUD,
            all_keys(),
            Some(&[Algorithm::PS256]),
            DEFAULT_LEEWAY,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnsupportedAlgorithm(_)));
    }

    #[tokio::test]
    async fn tampered_payload_is_refused() {
        let t = sign(Algorithm::EdDSA, "ed", &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let widened = with(|c| {
            c.insert("rights".into(), json!({}));
        });
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(widened.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(refused(&forged).await, "bad signature");
    }

    #[tokio::test]
    async fn tampered_signature_is_refused() {
        for (alg, kid) in [
            (Algorithm::HS256, "hs"),
            (Algorithm::EdDSA, "ed"),
            (Algorithm::RS256, "rsa"),
        ] {
            let t = sign(alg, kid, &claims());
            let (msg, sig) = t.rsplit_once('.').unwrap();
            let mut sig = sig.as_bytes().to_vec();
            sig[3] = if sig[3] == b'A' { b'B' } else { b'A' };
            let forged = format!("{msg}.{}", String::from_utf8(sig).unwrap());
            assert_eq!(refused(&forged).await, "bad signature", "{alg:?}");
        }
    }

    #[tokio::test]
    async fn expired_token_is_refused_after_the_leeway() {
        let t = sign(Algorithm::HS256, "hs", &claims());
        let v = verifier();
        let exp = Timestamp::from_unix_secs(NOW + 600);
        assert!(v.verify(&t, exp).await.is_ok(), "within leeway");
        let late = Timestamp::from_unix_secs(NOW + 600 + 30);
        assert!(matches!(
            v.verify(&t, late).await,
            Err(TokenError::Invalid("token expired"))
        ));
    }

    #[tokio::test]
    async fn nbf_in_the_future_is_refused() {
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("nbf".into(), json!(NOW + 31));
            }),
        );
        assert_eq!(refused(&t).await, "token not yet valid");
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("nbf".into(), json!(NOW + 30));
            }),
        );
        assert!(verify(&t).await.is_ok(), "within leeway");
    }

    #[tokio::test]
    async fn missing_exp_is_refused() {
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.remove("exp");
            }),
        );
        refused(&t).await;
    }

    #[tokio::test]
    async fn string_exp_and_nbf_are_refused() {
        // GHSA-h395-gr6q-cpjc: a string `exp` must not be skipped as if absent.
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("exp".into(), json!((NOW + 600).to_string()));
            }),
        );
        refused(&t).await;
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("nbf".into(), json!((NOW + 9999).to_string()));
            }),
        );
        refused(&t).await;
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("exp".into(), json!(1e300));
            }),
        );
        refused(&t).await;
    }

    #[test]
    fn the_library_itself_refuses_a_string_exp() {
        // Independently of keygate's strict claim types: the jsonwebtoken release in use has
        // the GHSA-h395-gr6q-cpjc fix, with its time checks on and with them off as keygate
        // runs it (then `exp` is a required claim that must parse as a number).
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("exp".into(), json!("99999999999"));
            }),
        );
        let key = jsonwebtoken::DecodingKey::from_secret(HS_SECRET);
        let mut lib_default = Validation::new(Algorithm::HS256);
        lib_default.set_audience(&[AUD]);
        let err = jsonwebtoken::decode::<Value>(&t, &key, &lib_default).unwrap_err();
        assert!(matches!(
            err.kind(),
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) if c == "exp"
        ));
        let checks = Checks::new(ISS, AUD, &[Algorithm::HS256], DEFAULT_LEEWAY).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&t, &key, &checks.validations[0]).is_err());
        let ok = sign(Algorithm::HS256, "hs", &claims());
        assert!(jsonwebtoken::decode::<Value>(&ok, &key, &checks.validations[0]).is_ok());
    }

    #[tokio::test]
    async fn missing_or_wrong_issuer_is_refused() {
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.remove("iss");
            }),
        );
        refused(&t).await;
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("iss".into(), json!("https://evil.test"));
            }),
        );
        assert_eq!(refused(&t).await, "wrong issuer");
    }

    #[tokio::test]
    async fn missing_or_wrong_audience_is_refused() {
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.remove("aud");
            }),
        );
        refused(&t).await;
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("aud".into(), json!(["other"]));
            }),
        );
        assert_eq!(refused(&t).await, "wrong audience");
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("aud".into(), json!(["other", AUD]));
            }),
        );
        assert!(
            verify(&t).await.is_ok(),
            "an audience list holding ours is fine"
        );
    }

    #[tokio::test]
    async fn unknown_kid_is_refused() {
        let t = sign(Algorithm::HS256, "nope", &claims());
        assert_eq!(refused(&t).await, UNKNOWN_KID);
        let no_kid = raw_token(&json!({"alg": "HS256"}), &claims(), b"sig");
        assert_eq!(refused(&no_kid).await, "token has no kid");
    }

    #[tokio::test]
    async fn path_like_kid_is_refused() {
        for kid in ["../../etc/passwd", "/dev/null", "..\\..\\x", "%2e%2e"] {
            let t = sign(Algorithm::HS256, kid, &claims());
            assert_eq!(refused(&t).await, "invalid kid", "{kid}");
        }
    }

    #[tokio::test]
    async fn jku_x5u_and_embedded_jwk_are_ignored() {
        // Signed by a key the verifier does not hold, pointing at where to "find" it.
        let evil_set = KeySet::new().with_eddsa_pem("ed", ED_PUB).unwrap();
        assert!(evil_set.contains("ed"));
        let header = json!({
            "alg": "EdDSA", "kid": "ed",
            "jku": "https://evil.test/jwks.json", "x5u": "https://evil.test/cert.pem",
        });
        let mut h: jsonwebtoken::Header = serde_json::from_value(header).unwrap();
        h.kid = Some("ed".into());
        let t = jsonwebtoken::encode(
            &h,
            &claims(),
            &jsonwebtoken::EncodingKey::from_ed_pem(ED_B_PRIV).unwrap(),
        )
        .unwrap();
        assert_eq!(refused(&t).await, "bad signature");
        // A jku on a token that is otherwise right changes nothing: verified against the set.
        let mut h = jsonwebtoken::Header::new(Algorithm::EdDSA);
        h.kid = Some("ed".into());
        h.jku = Some("https://evil.test/jwks.json".into());
        let t = jsonwebtoken::encode(&h, &claims(), &encoding_key(Algorithm::EdDSA)).unwrap();
        assert!(verify(&t).await.is_ok());
    }

    #[tokio::test]
    async fn crit_header_is_refused() {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("hs".into());
        h.crit = Some(vec!["exp".into()]);
        let t = jsonwebtoken::encode(&h, &claims(), &encoding_key(Algorithm::HS256)).unwrap();
        assert_eq!(refused(&t).await, "unsupported critical header");
    }

    #[tokio::test]
    async fn rotation_accepts_old_and_new_signing_keys() {
        let keys = KeySet::new()
            .with_hs256("2026-10", &[1; 32])
            .unwrap()
            .with_hs256("2026-11", &[2; 32])
            .unwrap();
        let v = JwtVerifier::new(store(), ISS, AUD, keys).unwrap();
        for (kid, secret) in [("2026-10", [1u8; 32]), ("2026-11", [2u8; 32])] {
            let t = forge_hs256(kid, &secret, &claims());
            assert!(v.verify(&t, now()).await.is_ok(), "{kid}");
        }
        let t = forge_hs256("2026-11", &[1; 32], &claims());
        assert!(
            v.verify(&t, now()).await.is_err(),
            "each kid only its own key"
        );
    }

    #[tokio::test]
    async fn token_of_revoked_disabled_or_expired_key_is_refused() {
        let store = std::sync::Arc::new(store());
        let v = JwtVerifier::new(store.clone(), ISS, AUD, all_keys()).unwrap();
        let t = sign(Algorithm::HS256, "hs", &claims());
        assert!(v.verify(&t, now()).await.is_ok());
        type Change = fn(&mut KeyRecord, &mut ProjectRecord);
        let cases: [(Change, &str); 4] = [
            (
                |k, _| k.revoked_at = Some(Timestamp::UNIX_EPOCH),
                "token key revoked",
            ),
            (|k, _| k.disabled = true, "token key disabled"),
            (
                |k, _| k.expires_at = Some(Timestamp::from_unix_secs(NOW)),
                "token key expired",
            ),
            (|_, p| p.disabled = true, "project disabled"),
        ];
        for (change, reason) in cases {
            let mut key = key_record();
            let mut project = ProjectRecord::new("p");
            change(&mut key, &mut project);
            store.replace(Snapshot::new([project], [key]).unwrap());
            assert!(
                matches!(v.verify(&t, now()).await, Err(TokenError::Invalid(r)) if r == reason),
                "{reason}"
            );
        }
        store.replace(Snapshot::new([ProjectRecord::new("p")], []).unwrap());
        assert!(matches!(
            v.verify(&t, now()).await,
            Err(TokenError::Invalid("token key unknown"))
        ));
    }

    #[tokio::test]
    async fn store_outage_is_unavailable_not_invalid() {
        struct Down;
        impl KeyStore for Down {
            async fn lookup(
                &self,
                _: &keygate_core::KeyDigest,
            ) -> Result<Option<keygate_core::Lookup>, keygate_core::StoreError> {
                Err(keygate_core::StoreError::new("down"))
            }
            async fn lookup_id(
                &self,
                _: &str,
            ) -> Result<Option<keygate_core::Lookup>, keygate_core::StoreError> {
                Err(keygate_core::StoreError::new("down"))
            }
        }
        let v = JwtVerifier::new(Down, ISS, AUD, all_keys()).unwrap();
        let t = sign(Algorithm::HS256, "hs", &claims());
        assert!(matches!(
            v.verify(&t, now()).await,
            Err(TokenError::Unavailable(_))
        ));
    }

    fn cached() -> (
        std::sync::Arc<MemoryStore>,
        JwtVerifier<std::sync::Arc<MemoryStore>>,
    ) {
        let store = std::sync::Arc::new(store());
        let v = JwtVerifier::new(store.clone(), ISS, AUD, all_keys())
            .unwrap()
            .with_cache(NonZeroUsize::new(64).unwrap());
        (store, v)
    }

    #[tokio::test]
    async fn cached_token_gives_the_same_principal() {
        let (_, v) = cached();
        let t = sign(Algorithm::EdDSA, "ed", &claims());
        let first = v.verify(&t, now()).await.unwrap();
        let second = v.verify(&t, now()).await.unwrap();
        assert_eq!(v.cache.as_ref().unwrap().len(), 1);
        assert_eq!(first.credential(), second.credential());
        assert_eq!(first.restriction(), second.restriction());
        assert_eq!(second.access("models"), Access::Read);
    }

    #[tokio::test]
    async fn cached_token_still_expires_and_dies_with_its_key() {
        let (store, v) = cached();
        let t = sign(Algorithm::HS256, "hs", &claims());
        assert!(v.verify(&t, now()).await.is_ok());
        let late = Timestamp::from_unix_secs(NOW + 630);
        assert!(matches!(
            v.verify(&t, late).await,
            Err(TokenError::Invalid("token expired"))
        ));
        let mut revoked = key_record();
        revoked.revoked_at = Some(now());
        store.replace(Snapshot::new([ProjectRecord::new("p")], [revoked]).unwrap());
        assert!(matches!(
            v.verify(&t, now()).await,
            Err(TokenError::Invalid("token key revoked"))
        ));
    }

    #[tokio::test]
    async fn refused_tokens_are_not_cached() {
        let (_, v) = cached();
        let t = sign(
            Algorithm::HS256,
            "hs",
            &with(|c| {
                c.insert("iss".into(), json!("https://evil.test"));
            }),
        );
        assert!(v.verify(&t, now()).await.is_err());
        let forged = forge_hs256("hs", &[9; 32], &claims());
        assert!(v.verify(&forged, now()).await.is_err());
        assert_eq!(v.cache.as_ref().unwrap().len(), 0);
    }

    #[test]
    fn bad_configuration_fails_at_build() {
        assert_eq!(
            JwtVerifier::new(store(), "", AUD, all_keys()).unwrap_err(),
            ConfigError::Missing("issuer")
        );
        assert_eq!(
            JwtVerifier::new(store(), ISS, "", all_keys()).unwrap_err(),
            ConfigError::Missing("audience")
        );
        assert_eq!(
            JwtVerifier::new(MemoryStore::default(), ISS, AUD, KeySet::new()).unwrap_err(),
            ConfigError::Empty
        );
        assert!(
            JwtVerifier::with_options(
                store(),
                ISS,
                AUD,
                all_keys(),
                None,
                Duration::from_secs(301)
            )
            .is_err()
        );
    }
}
