//! What the object registry costs on the request path: an id check answered from the cache
//! and one answered by an indexed read of the `objects` table, at 10,000 and 1,000,000
//! objects; and recording a created object (one transaction on the writer).
//!
//! `cargo bench -p keygate-store --bench objects -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use keygate_core::{ObjectKind, ObjectRecord, ObjectRegistry};
use keygate_store::{Db, SqliteRegistry};

fn object(i: usize) -> ObjectRecord {
    ObjectRecord::new(
        format!("file-{i:012}"),
        ObjectKind::File,
        format!("proj_{}", i % 100),
        "key_bench",
        i as u64,
    )
}

fn filled(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.db");
    let mut db = Db::open(&path).unwrap();
    let all: Vec<ObjectRecord> = (0..n).map(object).collect();
    for chunk in all.chunks(100_000) {
        db.record_objects(chunk).unwrap();
    }
    (dir, path)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for n in [10_000usize, 1_000_000] {
        let (_dir, path) = filled(n);
        let registry = SqliteRegistry::open(&path).unwrap();
        let ids: Vec<String> = (0..1024).map(|i| object(i * (n / 1024)).id).collect();
        // Warm: every id in the cache.
        rt.block_on(async {
            for id in &ids {
                registry.get(id).await.unwrap().unwrap();
            }
        });
        let next = AtomicUsize::new(0);
        c.bench_function(&format!("objects/check_cached/{n}"), |b| {
            b.iter(|| {
                let id = &ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                let found = rt.block_on(registry.get(black_box(id))).unwrap();
                black_box(found.is_some_and(|o| o.project.len() > 1))
            })
        });
        // Cold: the indexed read a cache miss makes.
        let db = Db::open(&path).unwrap();
        let mut i = 0usize;
        c.bench_function(&format!("objects/check_indexed_read/{n}"), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(db.object(&object(i).id).unwrap().is_some())
            })
        });
    }
    let (_dir, path) = filled(10_000);
    let registry = SqliteRegistry::open(&path).unwrap();
    let mut i = 10_000usize;
    c.bench_function("objects/record_one", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(registry.record(vec![object(i)])).unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
