//! What the SQLite store costs: lookups (the memory snapshot, as for `MemoryStore`), a bulk
//! insert, and a refresh that applies one changed key, at 100,000 keys.
//!
//! `cargo bench -p keygate-store -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keygate_core::{KeyDigest, KeyId, KeyRecord, KeyStore, ProjectRecord, Timestamp};
use keygate_store::{Db, MemoryStore, RefreshOutcome, SqliteStore};

const KEYS: usize = 100_000;

fn keys(n: usize) -> Vec<KeyRecord> {
    (0..n)
        .map(|i| {
            KeyRecord::new(
                KeyId::new(format!("key_{i:06}")),
                "p",
                KeyDigest::of(&format!("secret-{i}")),
                Timestamp::from_unix_secs(i as u64),
            )
        })
        .collect()
}

fn fresh_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(dir.path().join("bench.db")).unwrap();
    db.create_project(&ProjectRecord::new("p")).unwrap();
    (dir, db)
}

/// Polls a future that is ready at once (a snapshot lookup): no runtime in the measurement.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a snapshot lookup is ready at once"),
    }
}

fn lookup(c: &mut Criterion) {
    let records = keys(KEYS);
    let (_dir, mut db) = fresh_db();
    db.insert_keys(&records, "bench").unwrap();
    let sqlite = SqliteStore::open(db.path()).unwrap();
    let memory = MemoryStore::from_records([ProjectRecord::new("p")], records).unwrap();
    let digest = KeyDigest::of("secret-54321");
    let mut group = c.benchmark_group("lookup_100k");
    group.bench_function("memory_store", |b| {
        b.iter(|| now(memory.lookup(black_box(&digest))).unwrap().unwrap())
    });
    group.bench_function("sqlite_store", |b| {
        b.iter(|| now(sqlite.lookup(black_box(&digest))).unwrap().unwrap())
    });
    group.finish();
}

fn insert(c: &mut Criterion) {
    let records = keys(KEYS);
    let mut group = c.benchmark_group("insert_keys");
    group.sample_size(10);
    group.bench_function("100k_one_transaction", |b| {
        b.iter_batched(
            fresh_db,
            |(dir, mut db)| {
                let start = Instant::now();
                db.insert_keys(&records, "bench").unwrap();
                eprintln!(
                    "insert_keys of {KEYS} keys: {:.2} s",
                    start.elapsed().as_secs_f64()
                );
                (dir, db)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn refresh(c: &mut Criterion) {
    let (_dir, mut db) = fresh_db();
    db.insert_keys(&keys(KEYS), "bench").unwrap();
    let store = SqliteStore::open(db.path()).unwrap();
    let mut group = c.benchmark_group("refresh_100k");
    group.bench_function("unchanged", |b| {
        b.iter(|| assert_eq!(store.refresh().unwrap(), RefreshOutcome::Unchanged))
    });
    let mut n = 0u64;
    group.bench_function("one_changed_key", |b| {
        b.iter_batched(
            || {
                n += 1;
                db.update_key("key_054321", |k, _| {
                    k.labels.insert("n".into(), n.to_string());
                    Ok(())
                })
                .unwrap();
            },
            |()| {
                let outcome = store.refresh().unwrap();
                assert!(matches!(outcome, RefreshOutcome::Applied { keys: 1, .. }));
            },
            BatchSize::PerIteration,
        )
    });
    // What the refresh is made of: the incremental snapshot, against a full reload.
    let snapshot = store.store().snapshot();
    let mut changed = db.key("key_054321").unwrap().unwrap().record;
    changed.labels.insert("n".into(), "bench".into());
    group.bench_function("snapshot_with_changes_one_key", |b| {
        b.iter(|| {
            snapshot
                .with_changes([], [black_box(changed.clone())])
                .unwrap()
        })
    });
    group.sample_size(10);
    group.bench_function("full_load_for_comparison", |b| {
        b.iter(|| db.load().unwrap())
    });
    group.finish();
}

criterion_group!(benches, lookup, insert, refresh);
criterion_main!(benches);
