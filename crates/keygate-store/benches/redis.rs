//! What shared counters in Redis cost: one metered request (reserve, then settle: two
//! scripts, two round trips) through [`RedisBackend`] against the bare [`MemoryBackend`], on
//! a Unix socket and on loopback TCP; the distribution of that added latency (p50, p99);
//! and how many metered requests per second one and three replicas sustain against one
//! server; and the ledger outbox's sustained rate: settled charges moved from Redis into
//! PostgreSQL per second by one writer. Starts its own `redis-server` and PostgreSQL.
//!
//! `cargo bench -p keygate-store --bench redis -- --warm-up-time 1 --measurement-time 3`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use keygate_core::{Money, Timestamp};
use keygate_limit::LimitBackend;
use keygate_limit::MemoryBackend;
use keygate_limit::backend::{Actual, Charge, Unit, Window, group_of};
use keygate_store::{RedisBackend, RedisOptions, RedisTarget};
use keygate_testkit::{Postgres, Redis};

fn charges(project: &str, key: &str) -> Vec<Charge> {
    let group = group_of(project);
    let budget = |key: String| Charge {
        group,
        key: key.into(),
        window: Window::Fixed {
            start: Timestamp::UNIX_EPOCH,
            end: None,
        },
        unit: Unit::Nanodollars,
        limit: u64::MAX / 2,
        amount: 1_000,
    };
    vec![
        budget(format!("budget:{key}")),
        budget(format!("budget:{project}")),
        Charge {
            group,
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

async fn metered<B: LimitBackend>(backend: &B, project: &str, key: &str) {
    let r = backend.reserve(charges(project, key), NOW).await.unwrap();
    if let Some(r) = backend.end_at_once(r, Some(ACTUAL), NOW) {
        backend.settle(r, ACTUAL, NOW).await.unwrap();
    }
}

fn connect(rt: &tokio::runtime::Runtime, url: String) -> RedisBackend {
    rt.block_on(RedisBackend::connect(
        &RedisTarget::Single(url),
        RedisOptions::default(),
    ))
    .unwrap()
}

fn request(c: &mut Criterion, redis: &Redis) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("metered_request");
    let memory = MemoryBackend::new();
    group.bench_function("memory", |b| {
        b.iter(|| rt.block_on(metered(&memory, "p", "k")))
    });
    let unix = connect(&rt, redis.url());
    group.bench_function("redis_unix_socket", |b| {
        b.iter(|| rt.block_on(metered(&unix, "p", "k")))
    });
    let tcp = connect(&rt, redis.tcp_url());
    group.bench_function("redis_loopback_tcp", |b| {
        b.iter(|| rt.block_on(metered(&tcp, "p", "k")))
    });
    group.finish();
}

/// Reserve and settle one at a time, 20,000 times: the added latency's distribution.
fn latency(redis: &Redis) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let memory = MemoryBackend::new();
    for (name, url) in [
        ("unix socket", redis.url()),
        ("loopback tcp", redis.tcp_url()),
    ] {
        let backend = connect(&rt, url);
        let mut remote = Vec::with_capacity(20_000);
        let mut local = Vec::with_capacity(20_000);
        rt.block_on(async {
            for _ in 0..1_000 {
                metered(&backend, "p", "warm").await;
            }
            for i in 0..20_000 {
                let key = if i % 2 == 0 { "k0" } else { "k1" };
                let t = Instant::now();
                metered(&backend, "p", key).await;
                remote.push(t.elapsed());
                let t = Instant::now();
                metered(&memory, "p", key).await;
                local.push(t.elapsed());
            }
        });
        // The reserve alone: what a request waits for before it is forwarded.
        let mut reserve_only = Vec::with_capacity(20_000);
        let mut ping = Vec::with_capacity(20_000);
        rt.block_on(async {
            for i in 0..20_000 {
                let key = if i % 2 == 0 { "k0" } else { "k1" };
                let t = Instant::now();
                let r = backend.reserve(charges("p", key), NOW).await.unwrap();
                reserve_only.push(t.elapsed());
                backend.settle(r, ACTUAL, NOW).await.unwrap();
                let t = Instant::now();
                backend.ping().await.unwrap();
                ping.push(t.elapsed());
            }
        });
        remote.sort();
        local.sort();
        reserve_only.sort();
        ping.sort();
        let at = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        println!(
            "metered request over {name}: redis p50 {:?} p99 {:?}; memory p50 {:?} p99 {:?}; \
             added p50 {:?} p99 {:?}",
            at(&remote, 0.5),
            at(&remote, 0.99),
            at(&local, 0.5),
            at(&local, 0.99),
            at(&remote, 0.5).saturating_sub(at(&local, 0.5)),
            at(&remote, 0.99).saturating_sub(at(&local, 0.99)),
        );
        println!(
            "  reserve alone over {name}: p50 {:?} p99 {:?}; a PING: p50 {:?} p99 {:?}",
            at(&reserve_only, 0.5),
            at(&reserve_only, 0.99),
            at(&ping, 0.5),
            at(&ping, 0.99),
        );
    }
}

/// `replicas` backends (connections), 64 tasks each doing metered requests back to back
/// for 2 s on two worker threads, over 16 projects; metered requests per second.
fn throughput(redis: &Redis, replicas: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backends: Vec<RedisBackend> = (0..replicas)
        .map(|_| connect(&rt, redis.tcp_url()))
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..64 * replicas)
            .map(|i| {
                let backend = backends[i % replicas].clone();
                let (done, stop) = (done.clone(), stop.clone());
                tokio::spawn(async move {
                    let project = format!("project_{}", i % 16);
                    let key = format!("key_{}", i % 64);
                    while !stop.load(Ordering::Relaxed) {
                        metered(&backend, &project, &key).await;
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
        "{replicas} replica(s) x 64 in flight, loopback tcp: {n} metered requests in \
         {elapsed:.2?}: {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );
}

/// 20,000 metered requests settled with the outbox on (each three charges), then one
/// ledger writer moving them all into PostgreSQL: settled charges recorded per second.
fn outbox_rate(redis: &Redis) {
    let pg = Postgres::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let target = RedisTarget::Single(redis.tcp_url());
    let backend = rt
        .block_on(RedisBackend::connect(
            &target,
            RedisOptions::default().outbox(true),
        ))
        .unwrap();
    let requests = 20_000;
    rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let backend = backend.clone();
                tokio::spawn(async move {
                    let project = format!("outbox_project_{}", i % 16);
                    for _ in 0..requests / 64 {
                        metered(&backend, &project, &format!("outbox_key_{i}")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let db = rt
        .block_on(keygate_store::PgDb::connect(&pg.url("postgres")))
        .unwrap();
    let writer = keygate_store::LedgerWriter::new(backend, db, "bench").with_batch(2048);
    let started = Instant::now();
    let mut charges = 0;
    loop {
        let done = rt.block_on(writer.flush()).unwrap();
        if done.entries == 0 {
            break;
        }
        charges += done.recorded;
    }
    let elapsed = started.elapsed();
    println!(
        "ledger outbox: {charges} settled charges ({} requests) into PostgreSQL in {elapsed:.2?}: \
         {:.0} charges/s",
        requests / 64 * 64,
        charges as f64 / elapsed.as_secs_f64()
    );
}

fn main() {
    let redis = Redis::start_with_tcp();
    let mut c = Criterion::default().configure_from_args();
    request(&mut c, &redis);
    latency(&redis);
    throughput(&redis, 1);
    throughput(&redis, 3);
    outbox_rate(&redis);
    c.final_summary();
}
