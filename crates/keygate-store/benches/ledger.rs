//! What the spend ledger costs: one metered request (reserve, then settle) through
//! [`LedgerBackend`] against the bare [`MemoryBackend`], and how many reservations per second
//! the group commit sustains with 64 requests in flight.
//!
//! `cargo bench -p keygate-store --bench ledger -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use keygate_core::{Money, Timestamp};
use keygate_limit::LimitBackend;
use keygate_limit::MemoryBackend;
use keygate_limit::backend::{Actual, Charge, Unit, Window};
use keygate_store::{Durability, LedgerBackend};

fn charges(key: &str) -> Vec<Charge> {
    vec![
        Charge {
            group: 0,
            key: format!("budget:{key}").into(),
            window: Window::Fixed {
                start: Timestamp::UNIX_EPOCH,
                end: None,
            },
            unit: Unit::Nanodollars,
            limit: u64::MAX / 2,
            amount: 1_000,
        },
        Charge {
            group: 0,
            key: format!("tpm:{key}").into(),
            window: Window::Rate {
                per: Duration::from_secs(60),
            },
            unit: Unit::Tokens,
            limit: u64::MAX / 2,
            amount: 500,
        },
    ]
}

const ACTUAL: Actual = Actual {
    tokens: 300,
    cost: Money::from_nanos(600),
};

const NOW: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

async fn metered<B: LimitBackend>(backend: &B, key: &str) {
    let r = backend.reserve(charges(key), NOW).await.unwrap();
    if let Some(r) = backend.end_at_once(r, Some(ACTUAL), NOW) {
        backend.settle(r, ACTUAL, NOW).await.unwrap();
    }
}

fn request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("metered_request");
    let memory = MemoryBackend::new();
    group.bench_function("memory", |b| b.iter(|| rt.block_on(metered(&memory, "k"))));
    for (name, durability) in [
        ("sqlite_ledger_process_crash", Durability::ProcessCrash),
        ("sqlite_ledger_power_loss", Durability::PowerLoss),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ledger =
            LedgerBackend::open_with(dir.path().join("bench.db"), NOW, durability).unwrap();
        group.bench_function(name, |b| b.iter(|| rt.block_on(metered(&ledger, "k"))));
    }
    group.finish();
}

/// 64 tasks doing reserve + settle back to back for 2 s on two worker threads.
fn group_commit_throughput(durability: Durability) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger =
        LedgerBackend::open_with(dir.path().join("throughput.db"), NOW, durability).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (ledger, done, stop) = (ledger.clone(), done.clone(), stop.clone());
                tokio::spawn(async move {
                    let key = format!("key_{}", i % 16);
                    while !stop.load(Ordering::Relaxed) {
                        metered(&ledger, &key).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
    });
    let elapsed = started.elapsed();
    let n = done.load(Ordering::Relaxed);
    println!(
        "group commit ({durability:?}): {n} reservations (reserve + settle) in {elapsed:.2?} \
         with 64 in flight: {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );
}

criterion_group!(benches, request);

fn main() {
    benches();
    group_commit_throughput(Durability::ProcessCrash);
    group_commit_throughput(Durability::PowerLoss);
    Criterion::default().configure_from_args().final_summary();
}
