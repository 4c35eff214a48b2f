//! The spend ledger in PostgreSQL, written from the Redis counters' outbox, against real
//! servers (started by the test): every settled charge recorded exactly once through crashes,
//! lost acknowledgements and a PostgreSQL outage, and the ledger equal to the counters.

use std::time::Duration;

use keygate_core::{Money, Timestamp};
use keygate_limit::LimitBackend;
use keygate_limit::backend::{Actual, Charge, Unit, Window, group_of};
use keygate_store::{LedgerWriter, PgDb, RedisBackend, RedisOptions, RedisTarget};
use keygate_testkit::{Postgres, Redis};

const NOW: Timestamp = Timestamp::from_unix_secs(1_800_000_000);
const PERIOD: Timestamp = Timestamp::from_unix_secs(1_799_990_000);
const PERIOD_END: Timestamp = Timestamp::from_unix_secs(1_802_000_000);

fn window() -> Window {
    Window::Fixed {
        start: PERIOD,
        end: Some(PERIOD_END),
    }
}

fn budget(group: u64, key: &str, amount: u64) -> Charge {
    Charge {
        group,
        key: key.into(),
        window: window(),
        unit: Unit::Nanodollars,
        limit: 1_000_000_000,
        amount,
    }
}

/// `n` requests over `backends`, each reserving on its key and the project's, settled at a
/// cost that varies (every seventh released instead); the counters of the keys used.
async fn traffic(backends: &[RedisBackend], n: usize, group: u64) -> Vec<String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let backend = backends[i % backends.len()].clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("key-{}", i % 5);
            let r = backend
                .reserve(
                    vec![budget(group, &key, 100), budget(group, "project", 100)],
                    NOW,
                )
                .await
                .unwrap();
            if i % 7 == 0 {
                backend.release(r, NOW).await.unwrap();
            } else {
                let actual = Actual {
                    tokens: 0,
                    cost: Money::from_nanos(1 + (i as u64 * 37) % 100),
                };
                backend.settle(r, actual, NOW).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut counters: Vec<String> = (0..5).map(|k| format!("key-{k}")).collect();
    counters.push("project".into());
    counters
}

/// Each counter as Redis holds it and as the ledger sums it.
async fn both(redis: &RedisBackend, db: &PgDb, group: u64, counters: &[String]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for c in counters {
        let counted = redis.used(group, c, window()).await.unwrap().unwrap_or(0);
        let ledger = db.spent(c, Some(PERIOD)).await.unwrap();
        out.push((counted, ledger));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_settled_charge_reaches_the_ledger_once_through_crashes_and_outages() {
    let mut pg = Postgres::start();
    let redis = Redis::start();
    let target = RedisTarget::Single(redis.url());
    let options = RedisOptions::default().outbox(true);
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(RedisBackend::connect(&target, options).await.unwrap());
    }
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let g = group_of("p");

    // 300 requests; then a writer that crashes after its commit, before acknowledging.
    let counters = traffic(&backends, 300, g).await;
    let settled = 300 - 300usize.div_ceil(7);
    let crashed = backends[0]
        .read_outbox("crashed", 10_000, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(crashed.len(), settled);
    let charges: Vec<_> = crashed.iter().flat_map(|e| e.charges.clone()).collect();
    assert_eq!(db.record_spend(&charges).await.unwrap(), 2 * settled as u64);
    // Another replica's writer takes the unacknowledged entries over: all replays.
    let writer = LedgerWriter::new(backends[1].clone(), db.clone(), "replica-1")
        .with_claim_idle(Duration::ZERO);
    let done = writer.flush().await.unwrap();
    assert_eq!((done.entries, done.recorded), (settled, 0));
    assert_eq!(done.replayed, 2 * settled as u64);
    // Acknowledged: nothing is read again.
    assert_eq!(writer.flush().await.unwrap().entries, 0);
    for (counted, ledger) in both(&backends[2], &db, g, &counters).await {
        assert_eq!(counted, ledger);
        assert!(counted > 0);
    }

    // PostgreSQL killed: the flush fails, the outbox keeps every charge.
    let more = traffic(&backends, 200, g).await;
    pg.kill();
    assert!(writer.flush().await.is_err());
    // Back: everything is recorded, once.
    pg.restart();
    let mut entries = 0;
    for _ in 0..50 {
        match writer.flush().await {
            Ok(done) => {
                entries += done.entries;
                if done.entries == 0 && entries > 0 {
                    break;
                }
            }
            // The pool's connections died with the server: new ones are opened.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(entries, 200 - 200usize.div_ceil(7));
    assert_eq!(more, counters);
    for (counted, ledger) in both(&backends[0], &db, g, &counters).await {
        assert_eq!(counted, ledger);
    }
    assert_eq!(
        db.spend_rows().await.unwrap(),
        2 * (settled + entries) as u64
    );
}
