//! Replicas sharing their counters in Redis: three stacks (three gateways' layers) on one
//! key and one real `redis-server`, a thousand requests at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::{Budget, LimitScope, ManualClock, Money, Period, Timestamp};
use keygate_limit::backend::group_of;
use keygate_limit::budget_counter;
use keygate_store::{RedisBackend, RedisOptions, RedisTarget};
use keygate_testkit::Redis;
use tokio::sync::Semaphore;
use tower::{ServiceBuilder, ServiceExt};

use crate::bounded_tests::prices;
use crate::{Keygate, SpendBackend};

const BUDGET: u64 = 100_000_000; // $0.10 a day

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_admit_a_budget_exactly_and_fail_closed_without_it() {
    let mut redis = Redis::start();
    let (store, secret, key) = crate::tests::store(|k| {
        k.limits.budgets = vec![Budget {
            amount: Money::from_nanos(BUDGET),
            period: Period::Day,
            model: None,
        }];
    });
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_750_000_000));
    let target = RedisTarget::Single(redis.url());
    // A deadline far above what a command takes, even with the other tests of this binary
    // keeping both cores busy in a debug build (at 200 ms, some requests failed closed).
    let options = RedisOptions::default().deadline(Duration::from_secs(5));
    // The upstream holds every request it gets until the test lets them go, so that every
    // admitted request holds its reservation at once.
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(AtomicU64::new(0));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let counters = RedisBackend::connect(&target, options).await.unwrap();
        let layer = Keygate::builder(store.clone())
            .clock(clock.clock())
            .prices(prices())
            .spend_backend(SpendBackend::Redis(counters))
            .build()
            .unwrap();
        let (gate, arrived) = (gate.clone(), arrived.clone());
        let upstream = tower::service_fn(move |_req: Request<_>| {
            let (gate, arrived) = (gate.clone(), arrived.clone());
            async move {
                arrived.fetch_add(1, Ordering::Relaxed);
                gate.acquire().await.unwrap().forget();
                let body = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                        .unwrap(),
                )
            }
        });
        replicas.push(ServiceBuilder::new().layer(layer).service(upstream));
    }
    let request = || {
        Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {}", secret.expose()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap()
    };
    // Answered without being forwarded, and of those, refused for the budget (429).
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let svc = replicas[i % 3].clone();
        let req = request();
        let (answered, refused) = (answered.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(req).await.unwrap();
            let status = res.status();
            let _ = res.into_body().collect().await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            answered.fetch_add(1, Ordering::Relaxed);
            status
        }));
    }
    let started = Instant::now();
    while arrived.load(Ordering::Relaxed) + answered.load(Ordering::Relaxed) < 1000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "requests neither forwarded nor answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every request not forwarded was refused for the budget, none failed otherwise.
    assert_eq!(
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        "requests answered with something else than 429"
    );
    // Every admitted request holds the same worst-case reservation: the budget holds as many
    // as fit, and not one more.
    let admitted = arrived.load(Ordering::Relaxed);
    let budget = &key.limits.budgets[0];
    let (counter, window) = budget_counter(LimitScope::Key, "key_t", budget, clock.now());
    let probe = RedisBackend::connect(&target, options).await.unwrap();
    let held = probe
        .used(group_of("p"), &counter, window)
        .await
        .unwrap()
        .unwrap();
    assert!(admitted > 10, "{admitted}");
    let each = held / admitted;
    assert_eq!(held, each * admitted, "reservations differ");
    assert!(held <= BUDGET, "overspent: {held} > {BUDGET}");
    assert!(
        BUDGET - held < each,
        "one more would have fit: {held} of {BUDGET}"
    );

    // Let them go: each settles at what the upstream reports (1 + 1 tokens: 750 nanos).
    gate.add_permits(1000);
    for t in tasks {
        let status = t.await.unwrap();
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
    }
    // A settlement is sent as its response body ends and runs on its own: wait (bounded)
    // until every one has landed.
    let started = Instant::now();
    loop {
        let settled = probe
            .used(group_of("p"), &counter, window)
            .await
            .unwrap()
            .unwrap();
        if settled == admitted * 750 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "settled {settled}, expected {}",
            admitted * 750
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Without Redis: 503 with Retry-After, and nothing forwarded.
    redis.kill();
    let before = arrived.load(Ordering::Relaxed);
    let res = replicas[0].clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "service_unavailable");
    assert_eq!(arrived.load(Ordering::Relaxed), before);
}
