//! The PostgreSQL store against a real server (started by the test, on a Unix socket).

use std::time::{Duration, Instant};

use keygate_core::{
    KeyDigest, KeyId, KeyRecord, KeyStore, Permissions, PreviousSecret, ProjectRecord, Rejection,
    Secret, Timestamp,
};
use keygate_core::{ObjectKind, ObjectRecord, ObjectRegistry};
use keygate_store::{DbError, KeyFile, OBJECT_RECHECK, PgDb, PgRegistry, PgStore, RefreshOutcome};
use keygate_testkit::Postgres;

fn key(id: &str, project: &str, secret: &str) -> KeyRecord {
    let mut k = KeyRecord::new(
        KeyId::new(id),
        project,
        KeyDigest::of(secret),
        Timestamp::from_unix_secs(1_000),
    );
    k.permissions = Permissions::All;
    k
}

async fn db_with_project(pg: &Postgres) -> PgDb {
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    db.create_project(&ProjectRecord::new("p")).await.unwrap();
    db
}

/// Waits (bounded) until `f` holds; the time it took.
async fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgDb::connect(&url).await })
        })
        .collect();
    for c in connects {
        let db = c.await.unwrap().unwrap();
        assert_eq!(db.schema_version().await.unwrap(), 3);
        assert_eq!(db.change_seq().await.unwrap(), 0);
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("UPDATE keygate_schema SET version = 99", &[])
        .await
        .unwrap();
    assert_eq!(
        PgDb::connect(&url).await.unwrap_err(),
        DbError::TooNew {
            found: 99,
            supported: 3
        }
    );
}

#[tokio::test]
async fn a_database_of_the_previous_schema_is_migrated_with_its_keys_kept() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let db = db_with_project(&pg).await;
    db.insert_keys(&[key("k1", "p", "s1")], "test")
        .await
        .unwrap();
    // Back to version 1: what a database made by an earlier keygate holds.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "DROP TABLE spend, admin_keys, admin_events, usage_daily; UPDATE keygate_schema SET version = 1",
        )
        .await
        .unwrap();
    drop(db);
    let db = PgDb::connect(&url).await.unwrap();
    assert_eq!(db.schema_version().await.unwrap(), 3);
    assert!(db.key("k1").await.unwrap().is_some());
    assert_eq!(db.spend_rows().await.unwrap(), 0);
}

#[tokio::test]
async fn keys_and_projects_follow_the_sqlite_rules() {
    let pg = Postgres::start();
    let db = db_with_project(&pg).await;
    assert!(matches!(
        db.create_project(&ProjectRecord::new("p")).await,
        Err(DbError::Exists(_))
    ));
    // A key needs its project.
    assert!(matches!(
        db.insert_keys(&[key("key_x", "nope", "x")], "admin").await,
        Err(DbError::NotFound(_))
    ));
    // A batch with one duplicate digest (in the batch, or against a stored key) inserts
    // nothing.
    let seq = db.change_seq().await.unwrap();
    let mut batch: Vec<_> = (0..10)
        .map(|i| key(&format!("key_{i}"), "p", &format!("s{i}")))
        .collect();
    batch[7].digest = batch[2].digest;
    assert!(matches!(
        db.insert_keys(&batch, "admin").await,
        Err(DbError::Exists(_))
    ));
    assert_eq!(db.change_seq().await.unwrap(), seq);
    assert!(db.keys(None).await.unwrap().is_empty());
    db.insert_keys(&[key("key_a", "p", "a")], "admin")
        .await
        .unwrap();
    let mut b = key("key_b", "p", "b");
    b.previous = Some(PreviousSecret {
        digest: KeyDigest::of("a"),
        valid_until: Timestamp::from_unix_secs(2_000),
    });
    let err = db.insert_keys(&[b], "admin").await.unwrap_err();
    assert!(
        matches!(&err, DbError::Exists(m) if m.contains("key_a")),
        "{err}"
    );
    // The stored key, with what only the database knows.
    let stored = db.key("key_a").await.unwrap().unwrap();
    assert_eq!(stored.record, key("key_a", "p", "a"));
    assert_eq!(stored.created_by.as_deref(), Some("admin"));
    // A refused change writes nothing, and the reason goes with the record.
    let seq = db.change_seq().await.unwrap();
    let refused = db
        .update_key("key_a", |k, _| {
            k.disabled = true;
            Err::<(), _>("no".to_owned())
        })
        .await;
    assert_eq!(refused, Err(DbError::Invalid("no".to_owned())));
    assert_eq!(db.change_seq().await.unwrap(), seq);
    db.update_key("key_a", |k, reason| {
        k.disabled = true;
        *reason = Some("suspended".to_owned());
        Ok(())
    })
    .await
    .unwrap();
    let stored = db.key("key_a").await.unwrap().unwrap();
    assert!(stored.record.disabled);
    assert_eq!(stored.disabled_reason.as_deref(), Some("suspended"));
    assert!(matches!(
        db.update_key("key_zz", |_, _| Ok(())).await,
        Err(DbError::NotFound(_))
    ));
    // Changes after a number: only what changed.
    let changes = db.changes_since(seq).await.unwrap();
    assert_eq!(changes.seq, seq + 1);
    assert_eq!(changes.keys.len(), 1);
    assert!(changes.projects.is_empty());
    let renamed = db
        .update_project("p", |p| {
            p.name = "Project P".into();
            Ok(7)
        })
        .await
        .unwrap();
    assert_eq!(renamed, 7);
    let changes = db.changes_since(seq + 1).await.unwrap();
    assert_eq!(changes.projects.len(), 1);
    assert!(changes.keys.is_empty());
    // Last use is not a change.
    let seq = db.change_seq().await.unwrap();
    db.touch_last_used(&[
        (KeyId::new("key_a"), Timestamp::from_unix_secs(50)),
        (KeyId::new("key_unknown"), Timestamp::from_unix_secs(50)),
    ])
    .await
    .unwrap();
    db.touch_last_used(&[(KeyId::new("key_a"), Timestamp::from_unix_secs(40))])
        .await
        .unwrap();
    assert_eq!(
        db.key("key_a").await.unwrap().unwrap().last_used_at,
        Some(Timestamp::from_unix_secs(50))
    );
    assert_eq!(db.change_seq().await.unwrap(), seq);
}

#[tokio::test]
async fn import_then_export_gives_back_the_key_file_and_a_second_import_changes_nothing() {
    let pg = Postgres::start();
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let keys = (0..30)
        .map(|i| {
            let mut k = key(
                &format!("key_{i:02}"),
                if i % 2 == 0 { "a" } else { "b" },
                &format!("s{i}"),
            );
            k.created_at = Timestamp::from_unix_secs(1_000 + i);
            k
        })
        .collect();
    let mut file = KeyFile {
        projects: vec![ProjectRecord::new("a"), ProjectRecord::new("b")],
        keys,
        ..KeyFile::default()
    };
    let outcome = db.import(&file, "import").await.unwrap();
    assert_eq!((outcome.projects, outcome.keys), (2, 30));
    assert_eq!(db.export().await.unwrap(), file);
    let seq = db.change_seq().await.unwrap();
    let again = db.import(&file, "import").await.unwrap();
    assert_eq!((again.projects, again.keys), (0, 0));
    assert_eq!(db.change_seq().await.unwrap(), seq);
    // A changed key is replaced and keeps its disabled reason and creator.
    db.update_key("key_03", |_, reason| {
        *reason = Some("ops".into());
        Ok(())
    })
    .await
    .unwrap();
    file.keys[3].name = "renamed".into();
    let changed = db.import(&file, "later").await.unwrap();
    assert_eq!((changed.projects, changed.keys), (0, 1));
    let stored = db.key("key_03").await.unwrap().unwrap();
    assert_eq!(stored.record.name, "renamed");
    assert_eq!(stored.disabled_reason.as_deref(), Some("ops"));
    assert_eq!(stored.created_by.as_deref(), Some("import"));
    // A file naming a key twice changes nothing.
    let mut twice = file.clone();
    twice.keys.push(twice.keys[0].clone());
    assert!(matches!(
        db.import(&twice, "x").await,
        Err(DbError::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_in_two_pools_lose_nothing_and_bulk_inserts_are_whole() {
    let pg = Postgres::start();
    let db = db_with_project(&pg).await;
    db.insert_keys(&[key("key_a", "p", "a")], "admin")
        .await
        .unwrap();
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let url = pg.url("postgres");
            tokio::spawn(async move {
                let db = PgDb::connect(&url).await.unwrap();
                for i in 0..40 {
                    db.update_key("key_a", |k, _| {
                        k.labels.insert(format!("t{t}-{i}"), "x".into());
                        Ok(())
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        db.key("key_a").await.unwrap().unwrap().record.labels.len(),
        80
    );

    // More keys than one statement inserts, in one transaction.
    let many: Vec<_> = (0..12_000)
        .map(|i| key(&format!("key_bulk_{i:05}"), "p", &format!("bulk{i}")))
        .collect();
    db.insert_keys(&many, "bulk").await.unwrap();
    assert_eq!(db.keys(Some("p")).await.unwrap().len(), 12_001);
    let (snapshot, _) = db.load().await.unwrap();
    assert!(snapshot.get(&KeyDigest::of("bulk11999")).is_some());
    // One digest taken in the last chunk: none of the batch is written.
    let mut more: Vec<_> = (0..11_000)
        .map(|i| key(&format!("key_more_{i:05}"), "p", &format!("more{i}")))
        .collect();
    more[10_999].digest = KeyDigest::of("bulk5");
    assert!(matches!(
        db.insert_keys(&more, "bulk").await,
        Err(DbError::Exists(_))
    ));
    assert_eq!(db.keys(Some("p")).await.unwrap().len(), 12_001);
}

fn refused(store: &PgStore, secret: &str) -> bool {
    let found = store.store().get(&KeyDigest::of(secret));
    found.is_none_or(|f| {
        f.key
            .check_live(Secret::Current, Timestamp::from_unix_secs(5_000))
            .is_err()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_replica_within_a_second_through_notify_alone() {
    let pg = Postgres::start();
    let admin = db_with_project(&pg).await;
    admin
        .insert_keys(&[key("key_a", "p", "a")], "admin")
        .await
        .unwrap();
    let url = pg.url("postgres");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let store = PgStore::connect(&url).await.unwrap();
        // Polling once an hour: only the notification can bring the change in time.
        let watch = store.watch(Duration::from_secs(3_600));
        replicas.push((store, watch));
    }
    for (store, _) in &replicas {
        assert!(!refused(store, "a"));
        within(Duration::from_secs(5), || store.listening()).await;
    }
    admin
        .update_key("key_a", |k, _| {
            k.revoked_at = Some(Timestamp::from_unix_secs(1));
            Ok(())
        })
        .await
        .unwrap();
    let revoked = Instant::now();
    for (store, _) in &replicas {
        within(
            Duration::from_secs(1).saturating_sub(revoked.elapsed()),
            || refused(store, "a"),
        )
        .await;
        let found = store.lookup(&KeyDigest::of("a")).await.unwrap().unwrap();
        assert_eq!(
            found
                .key
                .check_live(Secret::Current, Timestamp::from_unix_secs(2)),
            Err(Rejection::Revoked)
        );
    }
    for (_, watch) in replicas {
        watch.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_keeps_the_keys_serving_and_its_return_is_resynchronised() {
    let mut pg = Postgres::start();
    let url = pg.url("postgres");
    let admin = db_with_project(&pg).await;
    admin
        .insert_keys(&[key("key_a", "p", "a"), key("key_b", "p", "b")], "admin")
        .await
        .unwrap();
    let store = PgStore::connect(&url).await.unwrap();
    let watch = store.watch(Duration::from_millis(100));
    within(Duration::from_secs(5), || store.listening()).await;
    store.record_use(&KeyId::new("key_a"), Timestamp::from_unix_secs(77));

    pg.kill();
    // The keys loaded keep serving; the failure shows.
    within(Duration::from_secs(10), || store.last_error().is_some()).await;
    assert!(!refused(&store, "a"));
    let error = store.last_error().unwrap();
    assert!(!error.contains("keygate@"), "{error}");

    pg.restart();
    // A change made while the replica was away (through a fresh pool).
    let admin = PgDb::connect(&url).await.unwrap();
    admin
        .update_key("key_b", |k, _| {
            k.disabled = true;
            Ok(())
        })
        .await
        .unwrap();
    within(Duration::from_secs(10), || refused(&store, "b")).await;
    within(Duration::from_secs(10), || store.last_error().is_none()).await;
    within(Duration::from_secs(10), || store.listening()).await;
    // The use noted during the outage was kept and written once it came back.
    let mut written = None;
    for _ in 0..200 {
        written = admin.key("key_a").await.unwrap().unwrap().last_used_at;
        if written.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(written, Some(Timestamp::from_unix_secs(77)));
    // And notifications work again: a change with polling nearly off.
    watch.abort();
    let watch = store.watch(Duration::from_secs(3_600));
    within(Duration::from_secs(5), || store.listening()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    admin
        .update_key("key_a", |k, _| {
            k.disabled = true;
            Ok(())
        })
        .await
        .unwrap();
    within(Duration::from_secs(1), || refused(&store, "a")).await;
    watch.abort();
    assert_eq!(store.refresh().await.unwrap(), RefreshOutcome::Unchanged);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_within_the_deadline_and_no_password_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://keygate:hunter2@{}/postgres",
        dir.path().display().to_string().replace('/', "%2F")
    );
    let started = Instant::now();
    let err = PgDb::connect(&url).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, DbError::Unavailable(_)), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let err = PgDb::connect("postgres://k:hunter2@[bad")
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_recorded_through_one_replica_are_owned_everywhere_and_removals_are_seen() {
    let mut pg = Postgres::start();
    let url = pg.url("postgres");
    let a = PgRegistry::new(PgDb::connect(&url).await.unwrap());
    let b = PgRegistry::new(PgDb::connect(&url).await.unwrap());
    a.record(vec![
        ObjectRecord::new("asst_1", ObjectKind::Assistant, "p", "key_a", 7).with_model("gpt-4o"),
        ObjectRecord::new("file-1", ObjectKind::File, "p", "key_a", 8)
            .with_models(vec!["gpt-4o".into()]),
    ])
    .await
    .unwrap();
    // Found by the other replica, with what it was recorded with.
    let asst = b.get("asst_1").await.unwrap().unwrap();
    assert_eq!(
        (asst.project.as_str(), asst.model.as_deref()),
        ("p", Some("gpt-4o"))
    );
    let file = b.get("file-1").await.unwrap().unwrap();
    assert_eq!(file.models, Some(vec!["gpt-4o".to_owned()]));
    assert!(b.get("file-unknown").await.unwrap().is_none());
    // Another project recording the same id changes nothing; the owner updating does.
    b.record(vec![
        ObjectRecord::new("asst_1", ObjectKind::Assistant, "q", "key_q", 9).with_model("x"),
    ])
    .await
    .unwrap();
    let fresh = PgRegistry::new(PgDb::connect(&url).await.unwrap());
    assert_eq!(fresh.get("asst_1").await.unwrap().unwrap().project, "p");
    a.record(vec![
        ObjectRecord::new("asst_1", ObjectKind::Assistant, "p", "key_a", 10)
            .with_model("gpt-4o-mini"),
    ])
    .await
    .unwrap();
    let fresh = PgRegistry::new(PgDb::connect(&url).await.unwrap());
    assert_eq!(
        fresh.get("asst_1").await.unwrap().unwrap().model.as_deref(),
        Some("gpt-4o-mini")
    );
    // Removed through one replica: the other, which has it cached, stops finding it within
    // the recheck interval.
    assert!(a.get("file-1").await.unwrap().is_some());
    b.remove("file-1").await.unwrap();
    let removed = Instant::now();
    loop {
        if a.get("file-1").await.unwrap().is_none() {
            break;
        }
        assert!(removed.elapsed() < OBJECT_RECHECK + Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = PgDb::connect(&url).await.unwrap();
    let listed: Vec<String> = db
        .objects("p", None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(listed, vec!["asst_1".to_owned()]);
    // An unreachable database is an error (the layer answers 503), never "not found".
    pg.kill();
    let lost = PgRegistry::new(db);
    assert!(lost.get("asst_1").await.is_err());
}

#[tokio::test]
async fn admin_keys_events_and_key_pages_follow_the_sqlite_rules() {
    use keygate_core::admin::{AdminKeyRecord, AdminScope, AuditBy, admin_key_format};
    use keygate_store::{EventQuery, KeyQuery, KeyStatus};
    let pg = Postgres::start();
    let db = db_with_project(&pg).await;
    let by = |action| AuditBy {
        actor: "adm_test",
        action,
        at: Timestamp::from_unix_secs(2_000),
    };
    let secret = admin_key_format().generate().unwrap();
    let admin = AdminKeyRecord {
        id: "adm_one".to_owned(),
        name: "ops".to_owned(),
        digest: secret.digest(),
        scope: AdminScope::manage_projects(["p"]),
        created_at: Timestamp::from_unix_secs(1),
        created_by: "cli".to_owned(),
        revoked_at: None,
    };
    db.insert_admin_key(&admin, by("admin_key.create"))
        .await
        .unwrap();
    assert!(matches!(
        db.insert_admin_key(&admin, by("admin_key.create")).await,
        Err(DbError::Exists(_))
    ));
    assert_eq!(
        db.admin_key_by_digest(&secret.digest()).await.unwrap(),
        Some(admin.clone())
    );
    let revoked = db
        .revoke_admin_key("adm_one", by("admin_key.revoke"))
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(db.admin_keys().await.unwrap(), vec![revoked]);

    let keys: Vec<KeyRecord> = (0..25)
        .map(|i| {
            let mut k = key(&format!("key_{i:02}"), "p", &format!("s{i}"));
            k.name = if i % 2 == 0 { "even" } else { "odd_%" }.to_owned();
            k.disabled = i % 5 == 0;
            k
        })
        .collect();
    db.insert_keys_as(&keys, "adm_test", by("key.create"))
        .await
        .unwrap();
    db.update_key_as("key_01", by("key.revoke"), |k, _| {
        k.revoked_at = Some(Timestamp::from_unix_secs(3_000));
        Ok(())
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut query = KeyQuery::new(10);
    loop {
        let page = db.list_keys(&query).await.unwrap();
        seen.extend(page.keys.iter().map(|k| k.record.id.to_string()));
        if !page.more {
            break;
        }
        query.after = Some(page.keys.last().unwrap().record.id.to_string());
    }
    let expected: Vec<String> = (0..25).map(|i| format!("key_{i:02}")).collect();
    assert_eq!(seen, expected);
    let count = |status, prefix: Option<&str>| {
        let mut q = KeyQuery::new(100);
        q.status = status;
        q.prefix = prefix.map(str::to_owned);
        let db = db.clone();
        async move { db.list_keys(&q).await.unwrap().keys.len() }
    };
    assert_eq!(count(Some(KeyStatus::Disabled), None).await, 5);
    assert_eq!(count(Some(KeyStatus::Revoked), None).await, 1);
    assert_eq!(count(Some(KeyStatus::Active), None).await, 19);
    assert_eq!(count(None, Some("odd_%")).await, 12);
    assert_eq!(count(None, Some("od%")).await, 0);

    let events = db.admin_events(&EventQuery::new(100)).await.unwrap();
    assert_eq!(events.len(), 2 + 25 + 1);
    assert_eq!(events[0].action, "key.revoke");
    assert_eq!(events[0].target, "key_01");
    assert!(events.windows(2).all(|w| w[0].id > w[1].id));
    for e in &events {
        for text in [&e.before, &e.after].into_iter().flatten() {
            assert!(!text.contains("\"digest\""), "{text}");
        }
    }
    let mut about = EventQuery::new(100);
    about.target = Some("key_01".to_owned());
    assert_eq!(db.admin_events(&about).await.unwrap().len(), 2);
    let mut elsewhere = EventQuery::new(100);
    elsewhere.within = Some(vec!["q".to_owned()]);
    assert!(db.admin_events(&elsewhere).await.unwrap().is_empty());
}
