//! The spend ledger in PostgreSQL, written from the Redis counters' outbox, against real
//! servers (started by the test): every settled charge recorded exactly once through crashes,
//! lost acknowledgements and a PostgreSQL outage, and the ledger equal to the counters.

use std::sync::Arc;
use std::time::Duration;

use keygate_core::{Money, Timestamp};
use keygate_limit::LimitBackend;
use keygate_limit::backend::{Actual, Charge, Unit, Window, group_of};
use keygate_store::{LedgerWriter, PgDb, RedisBackend, RedisOptions, RedisTarget, SettledCharge};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_empty_is_rebuilt_from_the_ledger_before_it_admits() {
    let pg = Postgres::start();
    let mut redis = Redis::start();
    let target = RedisTarget::Single(redis.url());
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let options = RedisOptions::default().outbox(true);
    let mut backends = Vec::new();
    for _ in 0..2 {
        let b = RedisBackend::connect(&target, options).await.unwrap();
        b.rebuild_from(Arc::new(db.clone()));
        backends.push(b);
    }
    let writer = LedgerWriter::new(backends[0].clone(), db.clone(), "w");
    let g = group_of("p");
    // A budget of 1,000 on the key; each request holds 100 and spends 60.
    let limited = |amount| Charge {
        limit: 1000,
        ..budget(g, "key", amount)
    };
    let spend = |b: RedisBackend| async move {
        let r = b.reserve(vec![limited(100)], NOW).await?;
        let actual = Actual {
            tokens: 0,
            cost: Money::from_nanos(60),
        };
        b.settle(r, actual, NOW).await.unwrap();
        Ok::<(), keygate_limit::backend::ReserveError>(())
    };
    // The first start: the (empty) ledger is the start.
    for i in 0..10 {
        spend(backends[i % 2].clone()).await.unwrap();
    }
    // One request in flight when Redis goes: reserved before, settled after.
    let in_flight = backends[1].reserve(vec![limited(100)], NOW).await.unwrap();
    writer.flush().await.unwrap();
    assert_eq!(db.spent("key", Some(PERIOD)).await.unwrap(), 600);

    redis.restart();
    // Before anything is admitted, the shard is rebuilt: 600 spent, so 4 more of 100 fit
    // (the in-flight one's 100 was lost with Redis, and comes back when it settles).
    let mut admitted = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match spend(backends[admitted % 2].clone()).await {
            Ok(()) => admitted += 1,
            Err(keygate_limit::backend::ReserveError::Exceeded(_)) => break,
            // The connection comes back.
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // 600 + 6 × 60 = 960: the next 100 does not fit.
    assert_eq!(admitted, 6);
    assert_eq!(
        backends[0].used(g, "key", window()).await.unwrap(),
        Some(960)
    );
    // The request in flight settles now: counted, although Redis had lost it, and recorded.
    backends[1]
        .settle(
            in_flight,
            Actual {
                tokens: 0,
                cost: Money::from_nanos(30),
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(
        backends[0].used(g, "key", window()).await.unwrap(),
        Some(990)
    );
    while writer.flush().await.unwrap().entries > 0 {}
    assert_eq!(db.spent("key", Some(PERIOD)).await.unwrap(), 990);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_loses_no_settlement_and_the_counters_equal_the_ledger() {
    let pg = Postgres::start();
    let redis = Arc::new(std::sync::Mutex::new(Redis::start_persistent()));
    let target = RedisTarget::Single(redis.lock().unwrap().url());
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let options = RedisOptions::default()
        .outbox(true)
        .deadline(Duration::from_millis(200));
    let mut backends = Vec::new();
    for _ in 0..3 {
        let b = RedisBackend::connect(&target, options).await.unwrap();
        b.rebuild_from(Arc::new(db.clone()));
        backends.push(b);
    }
    let writer =
        LedgerWriter::new(backends[0].clone(), db.clone(), "w").run(Duration::from_millis(50));
    let g = group_of("p");
    // The project's budget pays for exactly 200 requests of 100; 600 are tried.
    let project = move |amount| Charge {
        limit: 200 * 100,
        ..budget(g, "project", amount)
    };
    let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (kill_now, killed) = tokio::sync::oneshot::channel::<()>();
    let kill_now = Arc::new(std::sync::Mutex::new(Some(kill_now)));
    // Said once the outage has been felt: 30 calls failed.
    let (felt_tx, felt) = tokio::sync::oneshot::channel::<()>();
    let felt_tx = Arc::new(std::sync::Mutex::new(Some(felt_tx)));
    let mut tasks = Vec::new();
    for t in 0..60 {
        let backend = backends[t % 3].clone();
        let (admitted, failures, kill_now, felt_tx) = (
            admitted.clone(),
            failures.clone(),
            kill_now.clone(),
            felt_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut answers = 0;
            while answers < 10 {
                let charges = vec![budget(g, &format!("key-{}", t % 6), 100), project(100)];
                match backend.reserve(charges, NOW).await {
                    Ok(r) => {
                        answers += 1;
                        if admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 100 {
                            // Half way: Redis goes down with requests in flight.
                            if let Some(tx) = kill_now.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                        }
                        tokio::task::yield_now().await;
                        let actual = Actual {
                            tokens: 0,
                            cost: Money::from_nanos(100),
                        };
                        backend.settle(r, actual, NOW).await.unwrap();
                    }
                    Err(keygate_limit::backend::ReserveError::Exceeded(_)) => answers += 1,
                    Err(_) => {
                        if failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 30
                            && let Some(tx) = felt_tx.lock().unwrap().take()
                        {
                            let _ = tx.send(());
                        }
                        assert!(
                            std::time::Instant::now() < deadline,
                            "Redis never came back"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    killed.await.unwrap();
    let r = redis.clone();
    tokio::task::spawn_blocking(move || r.lock().unwrap().kill())
        .await
        .unwrap();
    felt.await.unwrap();
    let r = redis.clone();
    tokio::task::spawn_blocking(move || r.lock().unwrap().restart())
        .await
        .unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    // A reserve whose answer was lost holds its amount until it is released in the
    // background, and a request refused meanwhile counted as an answer: what is left of the
    // budget is admitted now (bounded), and not one request more.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while admitted.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the budget never came back whole"
        );
        let charges = vec![project(100)];
        match backends[0].reserve(charges, NOW).await {
            Ok(r) => {
                admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let actual = Actual {
                    tokens: 0,
                    cost: Money::from_nanos(100),
                };
                backends[0].settle(r, actual, NOW).await.unwrap();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(matches!(
        backends[0].reserve(vec![project(100)], NOW).await,
        Err(keygate_limit::backend::ReserveError::Exceeded(_))
    ));
    // Exactly the budget, though requests failed while Redis was down.
    assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 200);
    assert!(
        failures.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "nothing failed: not mid-load"
    );
    let used = backends[1].used(g, "project", window()).await.unwrap();
    assert_eq!(used, Some(200 * 100));
    // Every settlement reaches the ledger, once: the ledger equals the counters. (The
    // writer that ran through the outage stops; one more takes over what it read.)
    writer.abort();
    let last =
        LedgerWriter::new(backends[2].clone(), db.clone(), "last").with_claim_idle(Duration::ZERO);
    while last.flush().await.unwrap().entries > 0 {}
    let mut counters: Vec<String> = (0..6).map(|k| format!("key-{k}")).collect();
    counters.push("project".into());
    for (counted, ledger) in both(&backends[2], &db, g, &counters).await {
        assert_eq!(counted, ledger);
    }
    assert_eq!(db.spent("project", Some(PERIOD)).await.unwrap(), 200 * 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_brings_back_every_current_window_of_the_shard_and_no_ended_one() {
    let pg = Postgres::start();
    let redis = Redis::start();
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let g = group_of("p");
    let shard = g % keygate_store::SHARDS;
    let charge = |counter: String, start, end, amount| SettledCharge {
        shard,
        reservation: amount,
        counter,
        unit: Unit::Nanodollars,
        period_start: Some(start),
        period_end: end,
        held: amount,
        amount,
        reaped: false,
    };
    // More windows than one rebuild call writes, and one whose period is over.
    let mut charges: Vec<SettledCharge> = (0..300u64)
        .map(|i| charge(format!("c-{i}"), PERIOD, Some(PERIOD_END), 10 + i))
        .collect();
    let ended = Timestamp::from_unix_secs(NOW.as_unix_secs() - 1);
    charges.push(charge(
        "ended".into(),
        Timestamp::from_unix_secs(1),
        Some(ended),
        7,
    ));
    assert_eq!(db.record_spend(&charges).await.unwrap(), 301);

    let backend = RedisBackend::connect(&RedisTarget::Single(redis.url()), RedisOptions::default())
        .await
        .unwrap();
    backend.rebuild_from(Arc::new(db.clone()));
    // The first reservation in the shard rebuilds it, then is counted on top.
    backend
        .reserve(vec![budget(g, "c-0", 1)], NOW)
        .await
        .unwrap();
    assert_eq!(
        backend.used(g, "c-0", window()).await.unwrap(),
        Some(10 + 1)
    );
    for i in 1..300u64 {
        let used = backend.used(g, &format!("c-{i}"), window()).await.unwrap();
        assert_eq!(used, Some(10 + i), "c-{i}");
    }
    let ended_window = Window::Fixed {
        start: Timestamp::from_unix_secs(1),
        end: Some(ended),
    };
    assert_eq!(backend.used(g, "ended", ended_window).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_a_credit_in_the_ledger_and_survives_a_rebuild_of_the_counters() {
    let pg = Postgres::start();
    let mut redis = Redis::start();
    let target = RedisTarget::Single(redis.url());
    let db = PgDb::connect(&pg.url("postgres")).await.unwrap();
    let b = RedisBackend::connect(&target, RedisOptions::default().outbox(true))
        .await
        .unwrap();
    b.rebuild_from(Arc::new(db.clone()));
    let writer = LedgerWriter::new(b.clone(), db.clone(), "w");
    let g = group_of("p");
    let shard = g % keygate_store::SHARDS;
    let settle = |amount: u64| {
        let b = b.clone();
        async move {
            let r = b.reserve(vec![budget(g, "key", 100)], NOW).await.unwrap();
            let cost = Money::from_nanos(amount);
            b.settle(r, Actual { tokens: 0, cost }, NOW).await.unwrap();
        }
    };
    for _ in 0..5 {
        settle(60).await;
    }
    let held = b.reserve(vec![budget(g, "key", 100)], NOW).await.unwrap();
    while writer.flush().await.unwrap().entries > 0 {}
    assert_eq!(db.spent("key", Some(PERIOD)).await.unwrap(), 300);
    // The ledger first (a credit of what it holds), then the counters.
    let taken = db
        .reset_spend(shard, "key", PERIOD, Some(PERIOD_END))
        .await
        .unwrap();
    assert_eq!(taken, 300);
    assert_eq!(b.give_back(g, "key", window(), taken).await.unwrap(), 300);
    assert_eq!(db.spent("key", Some(PERIOD)).await.unwrap(), 0);
    assert_eq!(
        b.used(g, "key", window()).await.unwrap(),
        Some(100),
        "the hold in flight"
    );
    // Another period's counter, or nothing to reset, takes nothing.
    let other = Window::Fixed {
        start: PERIOD_END,
        end: None,
    };
    assert_eq!(b.give_back(g, "key", other, 50).await.unwrap(), 0);
    assert_eq!(
        db.reset_spend(shard, "key", PERIOD, Some(PERIOD_END))
            .await
            .unwrap(),
        0
    );
    // Spend after the reset counts from zero, in both.
    b.settle(
        held,
        Actual {
            tokens: 0,
            cost: Money::from_nanos(40),
        },
        NOW,
    )
    .await
    .unwrap();
    settle(10).await;
    while writer.flush().await.unwrap().entries > 0 {}
    assert_eq!(db.spent("key", Some(PERIOD)).await.unwrap(), 50);
    assert_eq!(b.used(g, "key", window()).await.unwrap(), Some(50));
    // A Redis that restarts empty is rebuilt from the ledger, credit included.
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match b.reserve(vec![budget(g, "key", 1)], NOW).await {
            Ok(r) => {
                b.release(r, NOW).await.unwrap();
                break;
            }
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(b.used(g, "key", window()).await.unwrap(), Some(50));
}
