//! Token verification per request, by algorithm, with and without the verified-token cache.
//!
//! `cargo bench -p keygate-jwt -- --warm-up-time 1 --measurement-time 2`

// criterion's macros define undocumented public functions.
#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use keygate_core::{
    Access, Credential, KeyDigest, KeyId, KeyRecord, Permissions, Principal, ProjectRecord, Secret,
    Timestamp, TokenVerifier,
};
use keygate_jwt::{JwtVerifier, KeySet, SigningKey, TokenExchange, TokenRequest};
use keygate_store::MemoryStore;
use sha2::{Digest, Sha256};

const ISS: &str = "https://gw.bench";
const AUD: &str = "keygate";
const HS: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

/// The futures here never pend (in-memory store): poll once.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("pending"),
    }
}

fn record() -> KeyRecord {
    let mut key = KeyRecord::new(
        KeyId::new("key_bench"),
        "p",
        KeyDigest::of("x"),
        Timestamp::UNIX_EPOCH,
    );
    key.permissions = Permissions::All;
    key
}

fn bench(c: &mut Criterion) {
    let store = Arc::new(MemoryStore::from_records([ProjectRecord::new("p")], [record()]).unwrap());
    let keys = KeySet::new()
        .with_hs256("hs", HS)
        .unwrap()
        .with_eddsa_pem("ed", include_bytes!("../testdata/ed25519.pub.pem"))
        .unwrap()
        .with_es256_pem("ec", include_bytes!("../testdata/p256.pub.pem"))
        .unwrap()
        .with_rs256_pem("rsa", include_bytes!("../testdata/rsa.pub.pem"))
        .unwrap();
    let verifier = JwtVerifier::new(store.clone(), ISS, AUD, keys.clone()).unwrap();
    let cached = JwtVerifier::new(store.clone(), ISS, AUD, keys)
        .unwrap()
        .with_cache(std::num::NonZeroUsize::new(1024).unwrap());
    let principal = Principal::new(
        Arc::new(record()),
        Arc::new(ProjectRecord::new("p")),
        Credential::ApiKey(Secret::Current),
    );
    let request: TokenRequest = serde_json::from_str(
        r#"{"permissions": {"restricted": {"chat.completions": "write", "models": "read"}},
            "models": {"allow": ["gpt-4o-mini"]}}"#,
    )
    .unwrap();
    let signers = [
        ("HS256", SigningKey::hs256("hs", HS).unwrap()),
        (
            "EdDSA",
            SigningKey::eddsa_pem("ed", include_bytes!("../testdata/ed25519.pem")).unwrap(),
        ),
        (
            "ES256",
            SigningKey::es256_pem("ec", include_bytes!("../testdata/p256.pem")).unwrap(),
        ),
        (
            "RS256",
            SigningKey::rs256_pem("rsa", include_bytes!("../testdata/rsa.pem")).unwrap(),
        ),
    ];
    let now = Timestamp::from_unix_secs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );

    let mut group = c.benchmark_group("verify");
    let mut sample_token = String::new();
    for (name, key) in signers {
        let exchange = TokenExchange::new(ISS, AUD, key).unwrap();
        let token = exchange.issue(&principal, &request).unwrap().token;
        let p = ready(verifier.verify(&token, now)).unwrap();
        assert_eq!(p.access("models"), Access::Read);
        group.bench_function(name, |b| {
            b.iter(|| ready(verifier.verify(black_box(&token), now)).unwrap())
        });
        group.bench_function(format!("{name}_cached"), |b| {
            b.iter(|| ready(cached.verify(black_box(&token), now)).unwrap())
        });
        sample_token = token;
    }
    group.finish();

    c.bench_function("sha256_of_token", |b| {
        b.iter(|| Sha256::digest(black_box(sample_token.as_bytes())))
    });

    c.bench_function("accepts", |b| {
        b.iter(|| verifier.accepts(black_box(&sample_token)))
    });
}

criterion_group!(benches, bench);

criterion_main!(benches);
