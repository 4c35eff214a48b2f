//! Signing and verification keys: [`SigningKey`] for issuing tokens, [`KeySet`] for checking
//! them (static keys or a JWKS document the host supplies).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

/// The algorithms keygate supports. Every one of them is pinned per key: a key verifies only
/// tokens whose header names exactly its algorithm.
pub const SUPPORTED_ALGORITHMS: [Algorithm; 4] = [
    Algorithm::EdDSA,
    Algorithm::ES256,
    Algorithm::RS256,
    Algorithm::HS256,
];

/// The shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash output size).
pub const MIN_HMAC_SECRET_LEN: usize = 32;

/// The longest key id accepted, in configuration and in tokens.
pub const MAX_KID_LEN: usize = 128;

/// A configuration mistake, reported when a key, verifier or exchange service is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key id that is empty, too long, or holds characters other than ASCII letters,
    /// digits, `-`, `_`, `.` and `:`; or one that starts with a dot.
    #[error("invalid key id {0:?}: use 1 to 128 ASCII letters, digits, '-', '_', '.' or ':'")]
    InvalidKid(String),
    /// Two keys share an id.
    #[error("duplicate key id {0:?}")]
    DuplicateKid(String),
    /// An algorithm keygate does not support (only EdDSA, ES256, RS256, HS256).
    #[error("unsupported algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// An HMAC secret shorter than [`MIN_HMAC_SECRET_LEN`].
    #[error("HMAC secret too short: at least {MIN_HMAC_SECRET_LEN} bytes")]
    WeakSecret,
    /// Key material that does not parse (the message names the key id, never the material).
    #[error("key {0:?}: key material does not parse for its algorithm")]
    BadKey(String),
    /// A JWKS document that does not parse.
    #[error("JWKS document does not parse: {0}")]
    BadJwks(String),
    /// A key set with no keys, or no allowed algorithms.
    #[error("no keys configured")]
    Empty,
    /// An issuer or audience that is empty.
    #[error("{0} must not be empty")]
    Missing(&'static str),
    /// Lifetimes that are zero or out of order.
    #[error("invalid lifetime: {0}")]
    Lifetime(&'static str),
}

/// Whether `kid` is a key id keygate accepts: a plain name, never anything a path or URL
/// could be made of (no `/`, `\`, `%`, leading dot, spaces or controls).
pub(crate) fn kid_is_valid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && !kid.starts_with('.')
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn check_kid(kid: &str) -> Result<(), ConfigError> {
    if kid_is_valid(kid) {
        Ok(())
    } else {
        Err(ConfigError::InvalidKid(kid.to_owned()))
    }
}

/// The key a [`TokenExchange`](crate::TokenExchange) signs tokens with, and the `kid` it puts
/// in their header.
///
/// `Debug` shows the id and algorithm only.
#[derive(Clone)]
pub struct SigningKey {
    kid: Arc<str>,
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// An HS256 key: a shared secret of at least [`MIN_HMAC_SECRET_LEN`] bytes, which the
    /// verifier must hold too ([`KeySet::with_hs256`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`] or [`ConfigError::WeakSecret`].
    pub fn hs256(kid: &str, secret: &[u8]) -> Result<Self, ConfigError> {
        check_kid(kid)?;
        if secret.len() < MIN_HMAC_SECRET_LEN {
            return Err(ConfigError::WeakSecret);
        }
        Ok(SigningKey {
            kid: kid.into(),
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        })
    }

    /// An EdDSA (Ed25519) key from a PKCS#8 private key PEM.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`] or [`ConfigError::BadKey`].
    pub fn eddsa_pem(kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        Self::from_pem(kid, Algorithm::EdDSA, pem, EncodingKey::from_ed_pem)
    }

    /// An ES256 (P-256) key from a PKCS#8 private key PEM.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`] or [`ConfigError::BadKey`].
    pub fn es256_pem(kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        Self::from_pem(kid, Algorithm::ES256, pem, EncodingKey::from_ec_pem)
    }

    /// An RS256 key from an RSA private key PEM (PKCS#1 or PKCS#8).
    ///
    /// # Security
    ///
    /// The pure-Rust RSA implementation behind this backend is not constant-time for private
    /// key operations (RUSTSEC-2023-0071); prefer EdDSA or HS256 for issuing tokens. Verifying
    /// RS256 (public key only) is not affected.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`] or [`ConfigError::BadKey`].
    pub fn rs256_pem(kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        Self::from_pem(kid, Algorithm::RS256, pem, EncodingKey::from_rsa_pem)
    }

    fn from_pem(
        kid: &str,
        alg: Algorithm,
        pem: &[u8],
        parse: fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>,
    ) -> Result<Self, ConfigError> {
        check_kid(kid)?;
        crate::install_backend();
        let key = parse(pem).map_err(|_| ConfigError::BadKey(kid.to_owned()))?;
        // Parsing alone does not prove the key signs: try once now, not on the first request.
        jsonwebtoken::crypto::sign(b"keygate", &key, alg)
            .map_err(|_| ConfigError::BadKey(kid.to_owned()))?;
        Ok(SigningKey {
            kid: kid.into(),
            alg,
            key,
        })
    }

    /// The key id put in tokens' `kid` header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.key
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// One verification key and the one algorithm it verifies.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// Verification keys by `kid`: the only keys a token is ever checked against.
///
/// Several keys may be present at once, so signing keys rotate without downtime: add the new
/// key, start signing with it, remove the old one once its last token has expired. Each key is
/// pinned to one algorithm; a token whose header names another is refused. Keys named by the
/// token itself (`jku`, `x5u`, an embedded `jwk`) are never used.
///
/// `Debug` shows key ids and algorithms only.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<Box<str>, VerifyingKey>,
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        KeySet::default()
    }

    /// Adds an HS256 shared secret.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`], [`ConfigError::DuplicateKid`] or [`ConfigError::WeakSecret`].
    pub fn with_hs256(self, kid: &str, secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < MIN_HMAC_SECRET_LEN {
            return Err(ConfigError::WeakSecret);
        }
        self.insert(kid, Algorithm::HS256, DecodingKey::from_secret(secret))
    }

    /// Adds an Ed25519 public key (SPKI PEM) for EdDSA.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`], [`ConfigError::DuplicateKid`] or [`ConfigError::BadKey`].
    pub fn with_eddsa_pem(self, kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|_| ConfigError::BadKey(kid.into()))?;
        self.insert(kid, Algorithm::EdDSA, key)
    }

    /// Adds a P-256 public key (SPKI PEM) for ES256.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`], [`ConfigError::DuplicateKid`] or [`ConfigError::BadKey`].
    pub fn with_es256_pem(self, kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        let key = DecodingKey::from_ec_pem(pem).map_err(|_| ConfigError::BadKey(kid.into()))?;
        self.insert(kid, Algorithm::ES256, key)
    }

    /// Adds an RSA public key (PEM) for RS256.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidKid`], [`ConfigError::DuplicateKid`] or [`ConfigError::BadKey`].
    pub fn with_rs256_pem(self, kid: &str, pem: &[u8]) -> Result<Self, ConfigError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|_| ConfigError::BadKey(kid.into()))?;
        self.insert(kid, Algorithm::RS256, key)
    }

    /// Parses a JWKS document (`{"keys": [...]}`) the host fetched or loaded; keygate never
    /// fetches one.
    ///
    /// A key's algorithm is its `alg`, or, when absent, inferred from its type (`OKP`/`Ed25519`
    /// → EdDSA, `EC`/`P-256` → ES256, `RSA` → RS256). Keys keygate cannot use are skipped, so
    /// a provider publishing extra key types does not break the refresh: keys marked
    /// `"use": "enc"`, keys without a `kid`, keys of another algorithm or curve, and symmetric
    /// (`oct`) keys (a JWKS is a public document; never trust a secret from one).
    ///
    /// # Errors
    ///
    /// [`ConfigError::BadJwks`] when the document does not parse; [`ConfigError::BadKey`]
    /// when a usable key's material does not; [`ConfigError::InvalidKid`] /
    /// [`ConfigError::DuplicateKid`]; [`ConfigError::Empty`] when no key is usable (keep the
    /// previous set).
    pub fn from_jwks(json: &str) -> Result<Self, ConfigError> {
        let set: JwkSet =
            serde_json::from_str(json).map_err(|e| ConfigError::BadJwks(e.to_string()))?;
        let mut out = KeySet::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let (Some(kid), Some(alg)) = (jwk.common.key_id.as_deref(), jwk_algorithm(jwk)) else {
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|_| ConfigError::BadKey(kid.into()))?;
            out = out.insert(kid, alg, key)?;
        }
        if out.is_empty() {
            return Err(ConfigError::Empty);
        }
        Ok(out)
    }

    fn insert(mut self, kid: &str, alg: Algorithm, key: DecodingKey) -> Result<Self, ConfigError> {
        check_kid(kid)?;
        if self.keys.contains_key(kid) {
            return Err(ConfigError::DuplicateKid(kid.to_owned()));
        }
        self.keys.insert(kid.into(), VerifyingKey { alg, key });
        Ok(self)
    }

    /// Removes the key `kid` (the end of a rotation); whether it was present.
    pub fn remove(&mut self, kid: &str) -> bool {
        self.keys.remove(kid).is_some()
    }

    /// Whether the set holds `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids and their algorithms.
    pub fn kids(&self) -> impl Iterator<Item = (&str, Algorithm)> {
        self.keys.iter().map(|(k, v)| (&**k, v.alg))
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }
}

fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(inferred),
        Some(KeyAlgorithm::EdDSA) if inferred == Algorithm::EdDSA => Some(inferred),
        Some(KeyAlgorithm::ES256) if inferred == Algorithm::ES256 => Some(inferred),
        Some(KeyAlgorithm::RS256) if inferred == Algorithm::RS256 => Some(inferred),
        Some(_) => None,
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<_> = self.kids().collect();
        kids.sort_by(|a, b| a.0.cmp(b.0));
        f.debug_struct("KeySet").field("keys", &kids).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_like_and_url_like_kids_are_refused() {
        for kid in [
            "../../etc/passwd",
            "a/b",
            "a\\b",
            "",
            ".hidden",
            "a b",
            "%2e",
            "http://x",
        ] {
            assert!(!kid_is_valid(kid), "{kid:?}");
        }
        for kid in ["key-1", "2026-11:ed", "a.b_c"] {
            assert!(kid_is_valid(kid), "{kid:?}");
        }
        assert!(matches!(
            KeySet::new().with_hs256("../x", &[7; 32]),
            Err(ConfigError::InvalidKid(_))
        ));
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        assert_eq!(
            SigningKey::hs256("k", b"short").unwrap_err(),
            ConfigError::WeakSecret
        );
        assert_eq!(
            KeySet::new().with_hs256("k", b"short").unwrap_err(),
            ConfigError::WeakSecret
        );
    }

    #[test]
    fn duplicate_kids_are_refused() {
        let set = KeySet::new().with_hs256("k", &[1; 32]).unwrap();
        assert_eq!(
            set.with_hs256("k", &[2; 32]).unwrap_err(),
            ConfigError::DuplicateKid("k".into())
        );
    }

    #[test]
    fn jwks_parses_with_pinned_algorithms() {
        let set = KeySet::from_jwks(include_str!("../testdata/jwks.json")).unwrap();
        let mut kids: Vec<_> = set.kids().collect();
        kids.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(
            kids,
            [
                ("idp-ec-1", Algorithm::ES256),
                ("idp-ed-1", Algorithm::EdDSA),
                ("idp-rsa-1", Algorithm::RS256)
            ]
        );
    }

    #[test]
    fn jwks_keys_keygate_cannot_use_are_skipped() {
        let good = r#"{"kty":"OKP","crv":"Ed25519","x":"3BTqMHMjIfRjJ7YErmcGLIZNS9_uCMUA4efAUH7oh8I","kid":"ok"}"#;
        let unusable = [
            r#"{"kty":"oct","k":"c2VjcmV0","kid":"sym"}"#,
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"rsa-as-hs","alg":"HS256"}"#,
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"pss","alg":"PS256"}"#,
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#,
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"enc","use":"enc"}"#,
        ];
        let doc = format!(r#"{{"keys":[{good},{}]}}"#, unusable.join(","));
        let set = KeySet::from_jwks(&doc).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), [("ok", Algorithm::EdDSA)]);
        let only_unusable = format!(r#"{{"keys":[{}]}}"#, unusable.join(","));
        assert_eq!(
            KeySet::from_jwks(&only_unusable).unwrap_err(),
            ConfigError::Empty
        );
        assert!(matches!(
            KeySet::from_jwks("{"),
            Err(ConfigError::BadJwks(_))
        ));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let secret = [b'z'; 32];
        let set = KeySet::new().with_hs256("k1", &secret).unwrap();
        let text = format!("{set:?} {:?}", SigningKey::hs256("k1", &secret).unwrap());
        assert!(!text.contains("zzzz") && !text.contains("122"), "{text}");
        assert!(text.contains("k1"));
    }

    #[test]
    fn private_pems_load_for_each_algorithm() {
        SigningKey::eddsa_pem("e", include_bytes!("../testdata/ed25519.pem")).unwrap();
        SigningKey::es256_pem("p", include_bytes!("../testdata/p256.pem")).unwrap();
        SigningKey::rs256_pem("r", include_bytes!("../testdata/rsa.pem")).unwrap();
        assert!(SigningKey::eddsa_pem("e", include_bytes!("../testdata/rsa.pem")).is_err());
    }
}
