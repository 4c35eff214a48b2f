//! The admin API and console over 100,000 keys: time to the response of the first page of
//! the key list, and of a page deep in it (keyset pagination), as JSON and as the console's
//! HTML. The handlers render the whole page before answering, so this is the time to first
//! byte less the network.
//!
//! `cargo bench -p keygate-admin -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use keygate_admin::{AdminApi, AdminStore};
use keygate_core::admin::{AdminKeyRecord, AdminScope, AuditBy, admin_key_format};
use keygate_core::{
    Budget, KeyDigest, KeyId, KeyRecord, Money, Period, Permissions, ProjectRecord, Timestamp,
};
use keygate_store::Db;
use tower::ServiceExt;

const KEYS: usize = 100_000;

struct Fixture {
    _dir: tempfile::TempDir,
    app: axum::Router,
    admin: String,
    cookie: String,
}

fn fixture(rt: &tokio::runtime::Runtime) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let mut db = Db::open(&path).unwrap();
    db.create_project(&ProjectRecord::new("p")).unwrap();
    let keys: Vec<KeyRecord> = (0..KEYS)
        .map(|i| {
            let mut k = KeyRecord::new(
                KeyId::new(format!("key_{i:06}")),
                "p",
                KeyDigest::of(&format!("secret-{i}")),
                Timestamp::from_unix_secs(i as u64),
            );
            k.name = format!("service-{i}");
            k.permissions = Permissions::All;
            // A budget, as most keys have: each row of the console shows it with its spend.
            k.limits.budgets = vec![Budget {
                amount: Money::from_dollars(5),
                period: Period::Month,
                model: None,
            }];
            k
        })
        .collect();
    db.insert_keys(&keys, "bench").unwrap();
    let secret = admin_key_format().generate().unwrap();
    let by = AuditBy {
        actor: "bench",
        action: "admin_key.create",
        at: Timestamp::from_unix_secs(1),
    };
    db.insert_admin_key(
        &AdminKeyRecord {
            id: "adm_bench".into(),
            name: "bench".into(),
            digest: secret.digest(),
            scope: AdminScope::read_only(),
            created_at: Timestamp::from_unix_secs(1),
            created_by: "bench".into(),
            revoked_at: None,
        },
        by,
    )
    .unwrap();
    drop(db);
    let app = AdminApi::new(AdminStore::open_sqlite(&path).unwrap()).router();
    let admin = secret.expose().to_owned();
    let login = Request::post("/admin/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(format!("admin_key={admin}")))
        .unwrap();
    let answer = rt.block_on(app.clone().oneshot(login)).unwrap();
    let cookie = answer.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    Fixture {
        _dir: dir,
        app,
        admin,
        cookie,
    }
}

async fn get(app: &axum::Router, path: &str, header: (&str, &str)) -> usize {
    let request = Request::get(path)
        .header(header.0, header.1)
        .body(Body::empty())
        .unwrap();
    let answer = app.clone().oneshot(request).await.unwrap();
    assert!(answer.status().is_success(), "{path}: {}", answer.status());
    answer.into_body().collect().await.unwrap().to_bytes().len()
}

fn list(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = fixture(&rt);
    let bearer = format!("Bearer {}", f.admin);
    let mut group = c.benchmark_group("admin_list_100k");
    for (name, path) in [
        ("json_first_page", "/admin/v1/keys?limit=50".to_owned()),
        (
            "json_page_at_90000",
            "/admin/v1/keys?limit=50&after=key_090000".to_owned(),
        ),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| get(&f.app, &path, ("authorization", bearer.as_str())))
        });
    }
    for (name, path) in [
        ("html_first_page", "/admin/keys".to_owned()),
        (
            "html_page_at_90000",
            "/admin/keys?after=key_090000".to_owned(),
        ),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| get(&f.app, &path, ("cookie", f.cookie.as_str())))
        });
    }
    group.finish();
}

criterion_group!(benches, list);
criterion_main!(benches);
