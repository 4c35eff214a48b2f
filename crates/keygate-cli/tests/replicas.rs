//! Three gateways (in-process, each the very gateway `keygate serve` runs) on one real
//! PostgreSQL and one real Redis, as the README's replica set-up runs them: limits shared
//! exactly, revocation refused by all within a second, Redis down → 503.
//!
//! Real time, bounded: every wait has a deadline, and nothing sleeps a fixed time.

mod common;
use common::{cli, status};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keygate_cli::gateway::{self, Gateway, GatewayOptions};
use keygate_testkit::{Postgres, Redis};

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

/// A key with every permission in project `p` and `extra` rules: (id, secret).
async fn key(store: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "keys",
        "create",
        "--project",
        "p",
        "--create-project",
        "--permissions",
        "all",
    ];
    args.extend_from_slice(extra);
    let made = cli(store, &args).await;
    (
        made["key"]["id"].as_str().unwrap().to_owned(),
        made["secret"].as_str().unwrap().to_owned(),
    )
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as text.
async fn request(addr: SocketAddr, method: &str, path: &str, key: &str, body: &str) -> String {
    keygate_testkit::http(addr, method, path, key, body).await
}

/// Waits until every gateway answers `GET /v1/models` with `secret` by a code `refused`
/// accepts; fails if that takes longer than `limit`.
async fn refused_by_all_within(
    addrs: &[SocketAddr],
    secret: &str,
    refused: impl Fn(u16) -> bool,
    limit: Duration,
) {
    let started = Instant::now();
    let mut refused_by = vec![false; addrs.len()];
    while !refused_by.iter().all(|&r| r) {
        assert!(
            started.elapsed() < limit,
            "still admitted after {limit:?} by {refused_by:?}"
        );
        for (i, &addr) in addrs.iter().enumerate() {
            if !refused_by[i] {
                refused_by[i] = refused(status(
                    &request(addr, "GET", "/v1/models", secret, "").await,
                ));
            }
        }
    }
}

/// Three gateways on `store` with counters at `counters`, each with its own embedded mock.
async fn three(store: &str, counters: &str) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
        options.store = Some(store.to_owned());
        options.counters = Some(counters.to_owned());
        let mut printed = Vec::new();
        out.push(gateway::start(options, &mut printed).await.unwrap());
    }
    out
}

/// Sends chat requests one after another, round robin over `gateways`, until one is refused
/// (or `max` are admitted); how many were admitted.
async fn spend_until_refused(gateways: &[SocketAddr], secret: &str, max: usize) -> usize {
    for n in 0..max {
        let answer = request(
            gateways[n % gateways.len()],
            "POST",
            "/v1/chat/completions",
            secret,
            CHAT,
        )
        .await;
        if status(&answer) == 429 {
            assert!(answer.contains("insufficient_quota"), "{answer}");
            return n;
        }
        assert_eq!(status(&answer), 200, "{answer}");
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_one_postgres_and_one_redis_share_limits_and_revocations() {
    let pg = Postgres::start();
    pg.create_database("kg");
    let store = pg.url("kg");
    let mut redis = Redis::start();
    let (_, rpm_key) = key(&store, &["--rpm", "5"]).await;
    let (_, budget_a) = key(&store, &["--budget", "0.0001/day"]).await;
    let (budget_b_id, budget_b) = key(&store, &["--budget", "0.0001/day"]).await;
    let (revoked_id, revoked) = key(&store, &[]).await;
    let gateways = three(&store, &redis.url()).await;
    let addrs: Vec<SocketAddr> = gateways.iter().map(Gateway::addr).collect();

    // A rate of 5 a minute: 1,000 requests at once over three gateways admit exactly 5
    // (each gateway counting its own would admit 15).
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (addr, secret) = (addrs[i % 3], rpm_key.clone());
        tasks.push(tokio::spawn(async move {
            status(&request(addr, "GET", "/v1/models", &secret, "").await)
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "slower than one emission interval: not conclusive"
    );
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 5, "{codes:?}");
    // Every other one is refused: by the rate (429), or, for the few whose call to Redis
    // missed its deadline under this load (a debug build, 1,000 at once on two cores), by
    // failing closed (503). Never admitted.
    let failed_closed = codes.iter().filter(|&&c| c == 503).count();
    assert_eq!(
        codes.iter().filter(|&&c| c == 429).count() + failed_closed,
        995,
        "{codes:?}"
    );
    assert!(
        failed_closed <= 50,
        "{failed_closed} of 1,000 failed closed: {codes:?}"
    );

    // A budget: what one gateway admits one request after another is what three admit
    // round robin (each counting its own would admit three times as many).
    let alone = spend_until_refused(&addrs[..1], &budget_a, 100).await;
    assert!((3..100).contains(&alone), "{alone}");
    let spread = spend_until_refused(&addrs, &budget_b, 300).await;
    assert_eq!(spread, alone);
    // Every settled charge reaches the PostgreSQL ledger (through the outbox, within a few
    // flushes): the ledger equals the counters.
    let db = keygate::store::PgDb::connect(&store).await.unwrap();
    let record = db.key(&budget_b_id).await.unwrap().unwrap().record;
    let now = keygate_core::Clock::system().now();
    let (counter, window) = keygate::limit::budget_counter(
        keygate_core::LimitScope::Key,
        &budget_b_id,
        &record.limits.budgets[0],
        now,
    );
    let keygate::limit::backend::Window::Fixed { start, .. } = window else {
        panic!("{window:?}")
    };
    let counted = gateways[0]
        .built()
        .counters()
        .unwrap()
        .used(keygate::limit::backend::group_of("p"), &counter, window)
        .await
        .unwrap()
        .unwrap();
    // The gateways' writers run every 250 ms; flushing here takes over what they read.
    let writer = gateways[0]
        .built()
        .ledger_writer()
        .unwrap()
        .clone()
        .with_claim_idle(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.spent(&counter, Some(start)).await.unwrap() != counted {
        assert!(Instant::now() < deadline, "the ledger never caught up");
        writer.flush().await.unwrap();
    }
    assert!(counted > 0);
    // `keygate spend show` reads the same: settled from the ledger, nothing in flight now
    // (with the counters given), the rest remaining; without them, in flight is unknown.
    let shown = cli(
        &store,
        &["spend", "show", &budget_b_id, "--counters", &redis.url()],
    )
    .await;
    let row = &shown["budgets"][0];
    // Amounts as the admin API writes them.
    let money = |m: keygate::Money| serde_json::to_value(m).unwrap();
    assert_eq!(
        row["spent"],
        money(keygate::Money::from_nanos(counted)),
        "{shown}"
    );
    assert_eq!(row["reserved"], money(keygate::Money::ZERO), "{shown}");
    let shown = cli(&store, &["spend", "show", &budget_b_id]).await;
    assert_eq!(
        shown["budgets"][0]["reserved"],
        serde_json::Value::Null,
        "{shown}"
    );

    // Revoked with the CLI: refused by every gateway within a second of the command's end.
    for &addr in &addrs {
        assert_eq!(
            status(&request(addr, "GET", "/v1/models", &revoked, "").await),
            200
        );
    }
    cli(&store, &["keys", "revoke", &revoked_id]).await;
    // 401: the key is gone.
    refused_by_all_within(&addrs, &revoked, |code| code == 401, Duration::from_secs(1)).await;

    // Redis down: requests that need the counters get 503 with Retry-After, and /healthz
    // says why; key checks go on (an unknown key is still 401).
    redis.kill();
    let answer = request(addrs[1], "GET", "/v1/models", &rpm_key, "").await;
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let answer = request(addrs[2], "POST", "/v1/chat/completions", &budget_a, CHAT).await;
    assert_eq!(status(&answer), 503, "{answer}");
    let health = request(addrs[0], "GET", "/healthz", "", "").await;
    assert!(health.contains(r#""status":"degraded""#), "{health}");
    assert!(health.contains(r#""counters""#), "{health}");
    let unknown = request(addrs[0], "GET", "/v1/models", "sk-kg-nope", "").await;
    assert_eq!(status(&unknown), 401, "{unknown}");
    // Back: served again, and healthy.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = request(addrs[1], "GET", "/v1/models", &rpm_key, "").await;
        if status(&answer) != 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still 503 after Redis came back");
        tokio::task::yield_now().await;
    }
    let health = request(addrs[0], "GET", "/healthz", "", "").await;
    assert!(health.contains(r#""status":"ok""#), "{health}");
    // Redis came back empty: the spent budget was rebuilt from the ledger before anything
    // was admitted, so it is still spent (with the counters lost, it would pay again).
    for &addr in &addrs {
        let answer = request(addr, "POST", "/v1/chat/completions", &budget_b, CHAT).await;
        assert_eq!(status(&answer), 429, "{answer}");
        assert!(answer.contains("insufficient_quota"), "{answer}");
    }
    let rebuilt = gateways[0]
        .built()
        .counters()
        .unwrap()
        .used(keygate::limit::backend::group_of("p"), &counter, window)
        .await
        .unwrap();
    assert_eq!(rebuilt, Some(counted));

    for gw in gateways {
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_postgres_without_shared_counters_does_not_start() {
    let pg = Postgres::start();
    pg.create_database("kg");
    let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.store = Some(pg.url("kg"));
    let mut printed = Vec::new();
    let error = gateway::start(options, &mut printed).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("shared counters"), "{text}");
    assert!(text.contains("[counters]"), "{text}");
    assert!(printed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_suspended_by_one_gateway_is_refused_by_every_gateway_within_a_second() {
    let pg = Postgres::start();
    pg.create_database("kg");
    let store = pg.url("kg");
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.toml");
    // Any key past one token in a minute is suspended (a denial-of-wallet spike).
    std::fs::write(
        &config,
        "[limits]\nunpriced = \"count_tokens_only\"\n\n[guard]\nenabled = true\nceiling_tokens = 1\n",
    )
    .unwrap();
    let (id, secret) = key(&store, &[]).await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
        options.store = Some(store.clone());
        options.counters = Some(redis.url());
        options.config = Some(config.clone());
        let mut printed = Vec::new();
        gateways.push(gateway::start(options, &mut printed).await.unwrap());
    }
    let addrs: Vec<SocketAddr> = gateways.iter().map(Gateway::addr).collect();
    for &addr in &addrs {
        assert_eq!(
            status(&request(addr, "GET", "/v1/models", &secret, "").await),
            200
        );
    }
    // The spike, on the first gateway only.
    let answer = request(addrs[0], "POST", "/v1/chat/completions", &secret, CHAT).await;
    assert_eq!(status(&answer), 200, "{answer}");
    // 403 where it was suspended, 401 where it is disabled in the store.
    refused_by_all_within(&addrs, &secret, |code| code != 200, Duration::from_secs(1)).await;
    // It is disabled in the store, with the reason.
    let shown = cli(&store, &["keys", "show", &id]).await;
    assert_eq!(shown["key"]["disabled"], true, "{shown}");
    assert_eq!(shown["key"]["disabled_reason"], "suspended", "{shown}");
    for gw in gateways {
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_through_one_gateways_admin_api_is_served_and_disabled_on_every_gateway() {
    let pg = Postgres::start();
    pg.create_database("kg");
    let redis = Redis::start();
    let store = pg.url("kg");
    let made = cli(
        &store,
        &["admin-keys", "create", "--name", "ops", "--scope", "manage"],
    )
    .await;
    let admin = made["secret"].as_str().unwrap().to_owned();
    let gateways = three(&store, &redis.url()).await;
    let addrs: Vec<SocketAddr> = gateways.iter().map(Gateway::addr).collect();
    let answer = request(
        addrs[0],
        "POST",
        "/admin/v1/projects",
        &admin,
        r#"{"id":"p"}"#,
    )
    .await;
    assert_eq!(status(&answer), 201, "{answer}");
    let answer = request(
        addrs[1],
        "POST",
        "/admin/v1/keys",
        &admin,
        r#"{"project":"p","permissions":"all","limits":{"budgets":[{"amount":"1","period":"day"}]}}"#,
    )
    .await;
    assert_eq!(status(&answer), 201, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let secret = body["secret"].as_str().unwrap().to_owned();
    let id = body["key"]["id"].as_str().unwrap().to_owned();
    // Served by all three within a second (NOTIFY), not only by the one that made it.
    refused_by_all_within(&addrs, &secret, |s| s == 200, Duration::from_secs(1)).await;
    let chat = request(addrs[2], "POST", "/v1/chat/completions", &secret, CHAT).await;
    assert_eq!(status(&chat), 200, "{chat}");
    // Spend on a PostgreSQL store: the ledger plus what the counters hold.
    let spend = request(
        addrs[0],
        "GET",
        &format!("/admin/v1/keys/{id}/spend"),
        &admin,
        "",
    )
    .await;
    assert_eq!(status(&spend), 200, "{spend}");
    let spend: serde_json::Value =
        serde_json::from_str(spend.split_once("\r\n\r\n").unwrap().1).unwrap();
    let row = &spend["data"][0];
    let used = row["spent"].as_str().unwrap().parse::<f64>().unwrap()
        + row["reserved"].as_str().unwrap().parse::<f64>().unwrap();
    assert!(used > 0.0, "{row}");
    // A key whose budget a few requests use up, over all three gateways: reset through one
    // gateway's admin API, every gateway admits it again (the ledger has a credit, the
    // shared counters give the amount back).
    let answer = request(
        addrs[0],
        "POST",
        "/admin/v1/keys",
        &admin,
        r#"{"project":"p","permissions":"all","limits":{"budgets":[{"amount":"0.00003","period":"day"}]}}"#,
    )
    .await;
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let small = body["secret"].as_str().unwrap().to_owned();
    let small_id = body["key"]["id"].as_str().unwrap().to_owned();
    refused_by_all_within(&addrs, &small, |s| s == 200, Duration::from_secs(1)).await;
    let admitted = spend_until_refused(&addrs, &small, 50).await;
    assert!((2..50).contains(&admitted), "{admitted}");
    for g in &gateways {
        g.built().flush().await;
    }
    let reset = request(
        addrs[1],
        "POST",
        &format!("/admin/v1/keys/{small_id}/spend/reset"),
        &admin,
        "",
    )
    .await;
    assert_eq!(status(&reset), 200, "{reset}");
    let reset: serde_json::Value =
        serde_json::from_str(reset.split_once("\r\n\r\n").unwrap().1).unwrap();
    let given: f64 = reset["reset"][0]["given_back"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(given > 0.0, "{reset}");
    for addr in &addrs {
        let chat = request(*addr, "POST", "/v1/chat/completions", &small, CHAT).await;
        assert_eq!(status(&chat), 200, "{chat}");
    }
    let again = spend_until_refused(&addrs, &small, 50).await;
    // The whole budget again: every settled charge was in the ledger when it was reset.
    assert_eq!(again + 3, admitted);
    let disabled = request(
        addrs[2],
        "POST",
        &format!("/admin/v1/keys/{id}/disable"),
        &admin,
        "",
    )
    .await;
    assert_eq!(status(&disabled), 200, "{disabled}");
    refused_by_all_within(&addrs, &secret, |s| s == 401, Duration::from_secs(1)).await;
    let events = request(
        addrs[1],
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &admin,
        "",
    )
    .await;
    assert!(
        events.contains("\"key.disable\"") && events.contains("\"key.create\""),
        "{events}"
    );
}
