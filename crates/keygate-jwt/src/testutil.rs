//! Shared test fixtures: test-only keys (committed under `testdata/`), records and tokens.

use std::collections::BTreeMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keygate_core::{
    Access, Credential, KeyDigest, KeyId, KeyRecord, ModelPattern, ModelRules, Permissions,
    Principal, ProjectRecord, Secret, Timestamp,
};
use keygate_store::MemoryStore;
use serde_json::{Value, json};

use crate::{JwtVerifier, KeySet, SigningKey};

pub(crate) const ISS: &str = "https://gw.test";
pub(crate) const AUD: &str = "keygate";
pub(crate) const HS_SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
pub(crate) const ED_PRIV: &[u8] = include_bytes!("../testdata/ed25519.pem");
pub(crate) const ED_PUB: &[u8] = include_bytes!("../testdata/ed25519.pub.pem");
pub(crate) const ED_B_PRIV: &[u8] = include_bytes!("../testdata/ed25519-b.pem");
pub(crate) const EC_PRIV: &[u8] = include_bytes!("../testdata/p256.pem");
pub(crate) const EC_PUB: &[u8] = include_bytes!("../testdata/p256.pub.pem");
pub(crate) const RSA_PRIV: &[u8] = include_bytes!("../testdata/rsa.pem");
pub(crate) const RSA_PUB: &[u8] = include_bytes!("../testdata/rsa.pub.pem");
pub(crate) const JWKS: &str = include_str!("../testdata/jwks.json");

/// 2026-11-23T12:00:00Z.
pub(crate) const NOW: u64 = 1_795_435_200;

pub(crate) fn now() -> Timestamp {
    Timestamp::from_unix_secs(NOW)
}

pub(crate) fn key_record() -> KeyRecord {
    let mut key = KeyRecord::new(
        KeyId::new("key_a"),
        "p",
        KeyDigest::of("secret-a"),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::Restricted(BTreeMap::from([
        ("chat.completions".to_owned(), Access::Write),
        ("models".to_owned(), Access::Read),
        ("files".to_owned(), Access::Write),
    ]));
    key.models = ModelRules::allow_only([
        ModelPattern::new("gpt-4o*").unwrap(),
        ModelPattern::new("o1-mini").unwrap(),
    ]);
    key.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
    key.limits.requests_per_minute = std::num::NonZeroU32::new(100);
    key
}

pub(crate) fn store_with(key: KeyRecord) -> MemoryStore {
    MemoryStore::from_records([ProjectRecord::new("p")], [key]).unwrap()
}

pub(crate) fn store() -> MemoryStore {
    store_with(key_record())
}

pub(crate) fn principal(key: KeyRecord) -> Principal {
    Principal::new(
        Arc::new(key),
        Arc::new(ProjectRecord::new("p")),
        Credential::ApiKey(Secret::Current),
    )
}

/// Every test key, each under its own kid.
pub(crate) fn all_keys() -> KeySet {
    KeySet::new()
        .with_hs256("hs", HS_SECRET)
        .unwrap()
        .with_eddsa_pem("ed", ED_PUB)
        .unwrap()
        .with_es256_pem("ec", EC_PUB)
        .unwrap()
        .with_rs256_pem("rsa", RSA_PUB)
        .unwrap()
}

pub(crate) fn verifier() -> JwtVerifier<MemoryStore> {
    JwtVerifier::new(store(), ISS, AUD, all_keys()).unwrap()
}

pub(crate) fn signing_key(alg: Algorithm) -> SigningKey {
    match alg {
        Algorithm::HS256 => SigningKey::hs256("hs", HS_SECRET).unwrap(),
        Algorithm::EdDSA => SigningKey::eddsa_pem("ed", ED_PRIV).unwrap(),
        Algorithm::ES256 => SigningKey::es256_pem("ec", EC_PRIV).unwrap(),
        Algorithm::RS256 => SigningKey::rs256_pem("rsa", RSA_PRIV).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

pub(crate) fn encoding_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIV).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIV).unwrap(),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIV).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

/// Valid keygate claims at [`NOW`].
pub(crate) fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "key_a", "jti": "tok_1",
        "iat": NOW, "nbf": NOW, "exp": NOW + 600,
        "rights": {"permissions": {"restricted": {"models": "read"}}},
    })
}

/// A token with `claims`, signed by the test key of `alg` under `kid`.
pub(crate) fn sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    crate::install_backend();
    jsonwebtoken::encode(&header, claims, &encoding_key(alg)).unwrap()
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(T[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A token assembled by hand: any header, any payload, any signature bytes.
pub(crate) fn raw_token(header: &Value, payload: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(signature)
    )
}

/// HMAC-SHA256 signature of `message` with `secret` (for forging tokens in tests).
pub(crate) fn hmac_sha256(secret: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let mut inner = Sha256::new();
    inner.update(key.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(key.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// A token signed by HS256 with `secret` (any bytes) under `kid`, built by hand.
pub(crate) fn forge_hs256(kid: &str, secret: &[u8], payload: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let sig = hmac_sha256(secret, message.as_bytes());
    format!("{message}.{}", b64(&sig))
}
