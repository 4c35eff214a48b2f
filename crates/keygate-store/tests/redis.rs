//! The Redis counters against real servers (started by the tests): one server on a Unix
//! socket, and a cluster of three masters on loopback ports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keygate_core::{Money, Timestamp};
use std::num::NonZeroU32;

use keygate_core::LimitScope;
use keygate_limit::LimitBackend;
use keygate_limit::backend::{
    Actual, Charge, MemoryBackend, Reservation, ReserveError, Unit, Window, group_of,
};
use keygate_limit::rate_shared::{SharedCell, SharedOutcome, SharedRates};
use keygate_store::{MAX_EXACT, RedisBackend, RedisOptions, RedisTarget, SHARDS};
use keygate_testkit::{Redis, RedisCluster};

const NOW: Timestamp = Timestamp::from_unix_secs(1_800_000_000);
const PERIOD: Timestamp = Timestamp::from_unix_secs(1_799_990_000);
const PERIOD_END: Timestamp = Timestamp::from_unix_secs(1_802_000_000);

fn budget(group: u64, key: &str, limit: u64, amount: u64) -> Charge {
    budget_in(group, key, limit, amount, PERIOD)
}

fn budget_in(group: u64, key: &str, limit: u64, amount: u64, start: Timestamp) -> Charge {
    Charge {
        group,
        key: key.into(),
        window: Window::Fixed {
            start,
            end: Some(PERIOD_END),
        },
        unit: Unit::Nanodollars,
        limit,
        amount,
    }
}

fn tokens_per_hour(group: u64, key: &str, limit: u64, amount: u64) -> Charge {
    Charge {
        group,
        key: key.into(),
        window: Window::Rate {
            per: Duration::from_secs(3600),
        },
        unit: Unit::Tokens,
        limit,
        amount,
    }
}

fn cost(nanos: u64) -> Actual {
    Actual {
        tokens: 0,
        cost: Money::from_nanos(nanos),
    }
}

fn single(redis: &Redis) -> RedisTarget {
    RedisTarget::Single(redis.url())
}

async fn replicas(target: &RedisTarget, options: RedisOptions, n: usize) -> Vec<RedisBackend> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(RedisBackend::connect(target, options).await.unwrap());
    }
    out
}

/// 1,000 requests at once, spread over `replicas`, each reserving what `charges(i)` gives
/// and settling at its reserved amounts; how many were admitted.
async fn thousand_at_once(
    replicas: &[RedisBackend],
    charges: impl Fn(usize) -> Vec<Charge>,
) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let backend = replicas[i % replicas.len()].clone();
        let charges = charges(i);
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            match backend.reserve(charges, NOW).await {
                Ok(reservation) => {
                    admitted.fetch_add(1, Ordering::Relaxed);
                    // At what was held: tokens for token rates, money for budgets.
                    let held = reservation.charges[0].amount;
                    let actual = Actual {
                        tokens: held,
                        cost: Money::from_nanos(held),
                    };
                    backend.settle(reservation, actual, NOW).await.unwrap();
                }
                Err(ReserveError::Exceeded(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

fn fixed() -> Window {
    Window::Fixed {
        start: PERIOD,
        end: Some(PERIOD_END),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_each_limit_exactly_under_a_thousand_concurrent_requests() {
    let redis = Redis::start();
    let backends = replicas(&single(&redis), RedisOptions::default(), 3).await;
    let g = group_of("p");

    // A key's budget for exactly 137 requests (the project's is larger).
    let n = thousand_at_once(&backends, |_| {
        vec![
            budget(g, "key-a", 137 * 5, 5),
            budget(g, "project-a", 1_000_000, 5),
        ]
    })
    .await;
    assert_eq!(n, 137);
    let used = backends[0].used(g, "key-a", fixed()).await.unwrap();
    assert_eq!(used, Some(137 * 5));
    assert_eq!(
        backends[1].used(g, "project-a", fixed()).await.unwrap(),
        Some(137 * 5)
    );

    // A project's budget for 211, shared by three keys with larger ones.
    let n = thousand_at_once(&backends, |i| {
        vec![
            budget(g, &format!("key-b{}", i % 3), 1_000_000, 3),
            budget(g, "project-b", 211 * 3, 3),
        ]
    })
    .await;
    assert_eq!(n, 211);

    // A per-model budget: only the requests of that model count against it.
    let n = thousand_at_once(&backends, |i| {
        let mut charges = vec![budget(g, "key-c", 1_000_000, 2)];
        if i % 2 == 0 {
            charges.push(budget(g, "key-c:model:gpt-4o", 50 * 2, 2));
        }
        charges
    })
    .await;
    assert_eq!(n, 500 + 50);

    // Tokens per hour: 1,000 tokens, 7 a request (nothing drains in the test's seconds).
    let n = thousand_at_once(&backends, |_| vec![tokens_per_hour(g, "tpm", 1000, 7)]).await;
    assert_eq!(n, 1000 / 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_replaces_the_held_amount_and_a_second_end_has_no_effect() {
    let redis = Redis::start();
    let backends = replicas(&single(&redis), RedisOptions::default(), 2).await;
    let (a, b) = (&backends[0], &backends[1]);
    let r = a.reserve(vec![budget(1, "k", 100, 60)], NOW).await.unwrap();
    assert_ne!(r.id, 0);
    assert_eq!(a.used(1, "k", fixed()).await.unwrap(), Some(60));
    // Another replica settles it (below its reservation), then both again.
    b.settle(r.clone(), cost(25), NOW).await.unwrap();
    assert_eq!(a.used(1, "k", fixed()).await.unwrap(), Some(25));
    a.settle(r.clone(), cost(90), NOW).await.unwrap();
    a.release(r.clone(), NOW).await.unwrap();
    assert_eq!(a.used(1, "k", fixed()).await.unwrap(), Some(25));

    // A release gives everything back, once.
    let r = a.reserve(vec![budget(1, "k", 100, 75)], NOW).await.unwrap();
    assert!(matches!(
        b.reserve(vec![budget(1, "k", 100, 1)], NOW).await,
        Err(ReserveError::Exceeded(e)) if e.remaining == 0 && e.index == 0
    ));
    b.release(r.clone(), NOW).await.unwrap();
    b.release(r, NOW).await.unwrap();
    assert_eq!(a.used(1, "k", fixed()).await.unwrap(), Some(25));

    // Rate counters report the tightest token rate, as the memory backend does.
    let r = a
        .reserve(
            vec![
                tokens_per_hour(1, "t1", 1000, 400),
                tokens_per_hour(1, "t2", 500, 400),
            ],
            NOW,
        )
        .await
        .unwrap();
    let status = r.tokens.unwrap();
    assert_eq!((status.limit, status.remaining), (500, 100));
}

/// A proxy in front of a Redis socket that can hold the server's answers back for a while
/// (each connection's bytes stay in order): a call then runs on the server but its answer
/// arrives after the caller's deadline, as across a congested network.
struct SlowProxy {
    path: std::path::PathBuf,
    hold_until: Arc<std::sync::Mutex<Instant>>,
    _dir: tempfile::TempDir,
}

impl SlowProxy {
    fn start(upstream: std::path::PathBuf) -> SlowProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let hold_until = Arc::new(std::sync::Mutex::new(Instant::now()));
        let hold = hold_until.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::UnixStream::connect(&upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let hold = hold.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let until = *hold.lock().unwrap();
                        tokio::time::sleep_until(until.into()).await;
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowProxy {
            path,
            hold_until,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.path.display())
    }

    /// Answers read from now on reach the client only after `d`.
    fn hold_for(&self, d: Duration) {
        *self.hold_until.lock().unwrap() = Instant::now() + d;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_retried_after_a_timeout_is_applied_once() {
    let redis = Redis::start();
    let proxy = SlowProxy::start(redis.socket());
    let options = RedisOptions::default()
        .deadline(Duration::from_millis(300))
        .attempts(4);
    let backend = RedisBackend::connect(&RedisTarget::Single(proxy.url()), options)
        .await
        .unwrap();
    let direct = RedisBackend::connect(&single(&redis), RedisOptions::default())
        .await
        .unwrap();
    // The script is loaded (a first call), so that the next runs at once.
    backend
        .reserve(vec![budget(3, "warm", 1000, 1)], NOW)
        .await
        .unwrap();
    // The first attempt runs on the server at once, but its answer arrives after 450 ms:
    // it times out at 300 ms and is retried with the same id, whose answer (also held
    // until 450 ms) is the first one's.
    proxy.hold_for(Duration::from_millis(450));
    let started = Instant::now();
    let r = backend
        .reserve(vec![budget(3, "retried", 1000, 40)], NOW)
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(backend.retries() >= 1, "no attempt timed out");
    // Both attempts ran on the server; the counter holds one reservation.
    assert_eq!(direct.used(3, "retried", fixed()).await.unwrap(), Some(40));

    // A settle retried the same way is applied once too.
    proxy.hold_for(Duration::from_millis(450));
    let retries = backend.retries();
    backend.settle(r, cost(10), NOW).await.unwrap();
    assert!(backend.retries() > retries, "no attempt timed out");
    assert_eq!(direct.used(3, "retried", fixed()).await.unwrap(), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reservations_are_reaped_and_settled_ones_reach_the_outbox_once() {
    let redis = Redis::start();
    let options = RedisOptions::default().outbox(true);
    let backend = RedisBackend::connect(&single(&redis), options)
        .await
        .unwrap();
    // Its reservations are due as soon as they are made.
    let hasty = RedisBackend::connect(&single(&redis), options.reservation_ttl(Duration::ZERO))
        .await
        .unwrap();
    let g = 5;
    let settled = backend
        .reserve(vec![budget(g, "o", 1000, 30)], NOW)
        .await
        .unwrap();
    backend
        .settle(settled.clone(), cost(12), NOW)
        .await
        .unwrap();
    backend.settle(settled, cost(12), NOW).await.unwrap();
    let released = backend
        .reserve(vec![budget(g, "o", 1000, 30)], NOW)
        .await
        .unwrap();
    backend.release(released, NOW).await.unwrap();
    // Left open: its gateway died.
    let open = hasty
        .reserve(vec![budget(g, "o", 1000, 100)], NOW)
        .await
        .unwrap();
    assert!(backend.reap().await.unwrap() >= 1);
    // Reaped: its amount stays counted, and settling it now changes nothing.
    assert_eq!(backend.used(g, "o", fixed()).await.unwrap(), Some(112));
    backend.settle(open, cost(1), NOW).await.unwrap();
    assert_eq!(backend.used(g, "o", fixed()).await.unwrap(), Some(112));

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("kg1:{{{:02}}}:out", g % SHARDS);
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fields: Vec<std::collections::HashMap<String, String>> = entries
        .into_iter()
        .map(|(_, f)| f.into_iter().collect())
        .collect();
    // The settlement once (not the second settle, not the release), the reaped one at its
    // reserved amount.
    assert_eq!(fields.len(), 2, "{fields:?}");
    assert_eq!(fields[0]["a"], "[12]");
    let described: serde_json::Value = serde_json::from_str(&fields[0]["c"]).unwrap();
    assert_eq!(described[0][0], "o");
    assert_eq!(described[0][3].as_u64(), Some(PERIOD.as_unix_nanos()));
    assert_eq!(described[0][5].as_u64(), Some(30));
    assert_eq!(fields[1]["a"], "held");
    let described: serde_json::Value = serde_json::from_str(&fields[1]["c"]).unwrap();
    assert_eq!(described[0][5].as_u64(), Some(100));
    assert_ne!(fields[0]["id"], fields[1]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_calls_fail_within_their_deadline_and_work_again_after() {
    let mut redis = Redis::start();
    let options = RedisOptions::default()
        .deadline(Duration::from_millis(200))
        .attempts(2)
        .end_patience(Duration::ZERO);
    let backend = RedisBackend::connect(&single(&redis), options)
        .await
        .unwrap();
    let held = backend
        .reserve(vec![budget(1, "k", 100, 10)], NOW)
        .await
        .unwrap();
    redis.kill();
    let started = Instant::now();
    let err = backend
        .reserve(vec![budget(1, "k", 100, 10)], NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, ReserveError::Backend(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(backend.settle(held, cost(1), NOW).await.is_err());
    assert!(backend.failures() >= 2);
    assert!(backend.ping().await.is_err());

    redis.restart();
    let started = Instant::now();
    loop {
        match backend.reserve(vec![budget(1, "k", 100, 10)], NOW).await {
            Ok(_) => {
                backend.ping().await.unwrap();
                break;
            }
            Err(ReserveError::Backend(_)) => {
                assert!(started.elapsed() < Duration::from_secs(10), "no reconnect");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_above_what_lua_counts_exactly_are_capped_and_amounts_stay_exact() {
    let redis = Redis::start();
    let backend = RedisBackend::connect(&single(&redis), RedisOptions::default())
        .await
        .unwrap();
    let big = (1u64 << 52) + 3;
    backend
        .reserve(vec![budget(2, "big", big + 1, big)], NOW)
        .await
        .unwrap();
    backend
        .reserve(vec![budget(2, "big", big + 1, 1)], NOW)
        .await
        .unwrap();
    assert!(matches!(
        backend.reserve(vec![budget(2, "big", big + 1, 1)], NOW).await,
        Err(ReserveError::Exceeded(e)) if e.remaining == 0
    ));
    assert_eq!(
        backend.used(2, "big", fixed()).await.unwrap(),
        Some(big + 1)
    );
    // A limit of u64::MAX counts as MAX_EXACT.
    backend
        .reserve(vec![budget(2, "max", u64::MAX, MAX_EXACT)], NOW)
        .await
        .unwrap();
    assert!(matches!(
        backend
            .reserve(vec![budget(2, "max", u64::MAX, 1)], NOW)
            .await,
        Err(ReserveError::Exceeded(_))
    ));
}

/// A small deterministic generator (xorshift) for the differential test.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_as_the_memory_backend_does_on_random_budget_sequences() {
    let redis = Redis::start();
    let remote = RedisBackend::connect(&single(&redis), RedisOptions::default())
        .await
        .unwrap();
    let local = MemoryBackend::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let periods = [PERIOD, Timestamp::from_unix_secs(1_799_995_000)];
    let mut open: Vec<(Reservation, Reservation)> = Vec::new();
    let mut admitted = 0;
    for step in 0..600 {
        match rng.below(4) {
            0 | 1 => {
                let n = 1 + rng.below(3);
                let charges: Vec<Charge> = (0..n)
                    .map(|_| {
                        let key = format!("c{}", rng.below(4));
                        let limit = 300 + 150 * u64::from(key.as_bytes()[1] - b'0');
                        let start = periods[usize::from(step >= 300)];
                        budget_in(9, &key, limit, rng.below(30), start)
                    })
                    .collect();
                let a = local.reserve_now(charges.clone(), NOW);
                let b = remote.reserve(charges, NOW).await;
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        admitted += 1;
                        assert_eq!(a.charges, b.charges, "step {step}");
                        open.push((a, b));
                    }
                    (Err(a), Err(ReserveError::Exceeded(b))) => assert_eq!(a, b, "step {step}"),
                    (a, b) => panic!("step {step}: memory {a:?}, redis {b:?}"),
                }
            }
            2 if !open.is_empty() => {
                let (a, b) = open.swap_remove(rng.below(open.len() as u64) as usize);
                let actual = cost(rng.below(25));
                local.settle_now(a, actual, NOW);
                remote.settle(b, actual, NOW).await.unwrap();
            }
            3 if !open.is_empty() => {
                let (a, b) = open.swap_remove(rng.below(open.len() as u64) as usize);
                local.release_now(a, NOW);
                remote.release(b, NOW).await.unwrap();
            }
            _ => {}
        }
        for key in ["c0", "c1", "c2", "c3"] {
            for start in periods {
                let window = Window::Fixed {
                    start,
                    end: Some(PERIOD_END),
                };
                assert_eq!(
                    local.used(key, window, 1000, NOW).filter(|u| *u > 0),
                    remote.used(9, key, window).await.unwrap(),
                    "step {step}, {key}"
                );
            }
        }
    }
    assert!(admitted > 100, "too few admitted to compare: {admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_masters_admits_each_budget_exactly() {
    let cluster = RedisCluster::start();
    let target = RedisTarget::Cluster(cluster.urls());
    let backends = replicas(&target, RedisOptions::default(), 3).await;
    // Eight projects, their counters in (most likely) different slots and nodes; each
    // request's counters in its project's one.
    let groups: Vec<u64> = (0..8).map(|p| group_of(&format!("project-{p}"))).collect();
    let n = thousand_at_once(&backends, |i| {
        let g = groups[i % 8];
        vec![
            budget(g, &format!("key-{}", i % 8), 1_000_000, 4),
            budget(g, &format!("project-{}", i % 8), 17 * 4, 4),
            tokens_per_hour(g, &format!("tpm-{}", i % 8), 1000, 1),
        ]
    })
    .await;
    assert_eq!(n, 8 * 17);
    for (p, g) in groups.iter().enumerate() {
        assert_eq!(
            backends[p % 3]
                .used(*g, &format!("project-{p}"), fixed())
                .await
                .unwrap(),
            Some(17 * 4)
        );
    }
    let nodes_used = (0..3).filter(|i| cluster.keys_on(*i) > 0).count();
    assert!(nodes_used >= 2, "every counter on one node");
}

fn rate(name: &str, per_minute: u32) -> SharedCell {
    SharedCell {
        name: name.to_owned(),
        per_minute: NonZeroU32::new(per_minute).unwrap(),
        scope: LimitScope::Key,
    }
}

/// 1,000 acquires at once, spread over `replicas`, each of the cells `cells(i)` gives in the
/// group `group(i)`; how many were admitted. Fails if the run took so long that a rate
/// could have let one more through (`slowest` is the longest emission interval among them).
async fn thousand_rates_at_once(
    replicas: &[RedisBackend],
    group: impl Fn(usize) -> u64,
    cells: impl Fn(usize) -> Vec<SharedCell>,
    slowest: Duration,
) -> u64 {
    let started = Instant::now();
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let backend = replicas[i % replicas.len()].clone();
        let (g, cells) = (group(i), cells(i));
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            match backend.acquire(g, cells).await.unwrap() {
                SharedOutcome::Allowed(_) => {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                SharedOutcome::Limited { retry_after, .. } => {
                    assert!(retry_after > Duration::ZERO && retry_after <= slowest * 60);
                }
                other => panic!("{other:?}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        started.elapsed() < slowest,
        "the run outlasted an emission interval: the count is not conclusive"
    );
    admitted.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_request_rates_exactly() {
    let redis = Redis::start();
    let backends = replicas(&single(&redis), RedisOptions::default(), 3).await;
    let g = group_of("p");
    // A key's rate of 10 a minute (the bug peers report: 3 replicas let 30 through).
    let n = thousand_rates_at_once(
        &backends,
        |_| g,
        |_| vec![rate("k:1:a", 10), rate("p:1:p", 1000)],
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(n, 10);
    // A project's rate of 25 over four keys of 10 each: the project's is what binds, and a
    // request refused by it took nothing from its key's.
    let n = thousand_rates_at_once(
        &backends,
        |_| g,
        |i| vec![rate(&format!("k:2:b{}", i % 4), 10), rate("p:2:pb", 25)],
        Duration::from_millis(2400),
    )
    .await;
    assert_eq!(n, 25);
    // A per-model rate of 7, on half the requests; the others only meet the key's 600.
    let burst = Instant::now();
    let n = thousand_rates_at_once(
        &backends,
        |_| g,
        |i| {
            let mut cells = vec![rate("k:1:c", 600)];
            if i % 2 == 0 {
                cells.push(rate("k:1:c:gpt-4o*", 7));
            }
            cells
        },
        Duration::from_millis(8500),
    )
    .await;
    // The 500 others, and 7 of the model's; the 493 refused took nothing from the key's.
    assert_eq!(n, 507);
    let key = backends[2]
        .acquire(g, vec![rate("k:1:c", 600)])
        .await
        .unwrap();
    let SharedOutcome::Allowed(Some(status)) = key else {
        panic!("{key:?}")
    };
    // The key's rate earns one back every 100 ms of real time since the burst began.
    let earned = u64::try_from(burst.elapsed().as_millis() / 100).unwrap();
    let remaining = status.remaining;
    assert!(
        (600 - 507 - 1..=600 - 507 - 1 + earned).contains(&remaining),
        "{remaining} left, {earned} earned back"
    );
    let after = backends[0]
        .acquire(g, vec![rate("k:1:c:gpt-4o*", 7)])
        .await
        .unwrap();
    let SharedOutcome::Limited { status, .. } = after else {
        panic!("{after:?}")
    };
    assert_eq!((status.limit, status.remaining), (7, 0));
    // The headers' status: the tightest cell.
    let first = backends[1]
        .acquire(g, vec![rate("k:1:d", 5), rate("p:1:d", 100)])
        .await
        .unwrap();
    let SharedOutcome::Allowed(Some(status)) = first else {
        panic!("{first:?}")
    };
    assert_eq!((status.limit, status.remaining), (5, 4));
    assert!(status.reset <= Duration::from_secs(12) && status.reset > Duration::from_secs(11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_masters_shares_request_rates_exactly() {
    let cluster = RedisCluster::start();
    let target = RedisTarget::Cluster(cluster.urls());
    let backends = replicas(&target, RedisOptions::default(), 3).await;
    let groups: Vec<u64> = (0..8).map(|p| group_of(&format!("project-{p}"))).collect();
    let n = thousand_rates_at_once(
        &backends,
        |i| groups[i % 8],
        |i| {
            vec![
                rate(&format!("k:5:key-{}", i % 8), 1000),
                rate(&format!("p:9:project-{}", i % 8), 12),
            ]
        },
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(n, 8 * 12);
    let nodes_used = (0..3).filter(|i| cluster.keys_on(*i) > 0).count();
    assert!(nodes_used >= 2, "every cell on one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_admits_uncounted_only_when_asked_and_counts_each() {
    let mut redis = Redis::start();
    let fast = RedisOptions::default()
        .deadline(Duration::from_millis(100))
        .attempts(1)
        .end_patience(Duration::ZERO);
    let closed = RedisBackend::connect(&single(&redis), fast).await.unwrap();
    let open = RedisBackend::connect(&single(&redis), fast.fail_open(true))
        .await
        .unwrap();
    // While Redis answers, fail-open changes nothing: the limit holds.
    let over = open.reserve(vec![budget(1, "fo", 10, 20)], NOW).await;
    assert!(matches!(over, Err(ReserveError::Exceeded(_))), "{over:?}");
    assert_eq!(open.failed_open(), 0);

    redis.kill();
    let refused = closed.reserve(vec![budget(1, "fo", 10, 5)], NOW).await;
    assert!(
        matches!(refused, Err(ReserveError::Backend(_))),
        "{refused:?}"
    );
    assert!(closed.acquire(1, vec![rate("k:2:fo", 1)]).await.is_err());
    assert_eq!(closed.failed_open(), 0);
    // Admitted, holding nothing (settling it costs no call), and counted.
    let admitted = open
        .reserve(vec![budget(1, "fo", 10, 5)], NOW)
        .await
        .unwrap();
    assert!(admitted.charges.is_empty() && admitted.id == 0);
    open.settle(admitted, cost(5), NOW).await.unwrap();
    let rate = open.acquire(1, vec![rate("k:2:fo", 1)]).await.unwrap();
    assert_eq!(rate, SharedOutcome::Allowed(None));
    assert_eq!(open.failed_open(), 2);
}
