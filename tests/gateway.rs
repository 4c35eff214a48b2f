//! The gateway (`keygate serve`) over real loopback sockets, driven by a plain hyper client.

mod common;

use common::{Setup, call, chat, create_key};

#[tokio::test]
async fn first_line_names_the_real_address() {
    let setup = Setup::new();
    create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, out) = setup.start("").await;
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        format!("keygate gateway listening on http://{}", gw.addr())
    );
    assert_ne!(gw.addr().port(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn missing_key_is_401_with_www_authenticate() {
    let setup = Setup::new();
    create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    let a = call(gw.addr(), "GET", "/v1/models", None, None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    assert_eq!(a.code(), "missing_api_key");
    let bad = call(gw.addr(), "GET", "/v1/models", Some("sk-kg-nope"), None).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.code(), "invalid_api_key");
    gw.shutdown().await;
}

#[tokio::test]
async fn allowed_call_is_200_with_request_id_and_rate_headers() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all", "--rpm", "10"]);
    let (gw, _) = setup.start("").await;
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&chat("gpt-4o-mini")),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.header("x-request-id").is_some());
    assert_eq!(a.header("x-ratelimit-limit-requests"), Some("10"));
    assert_eq!(a.header("x-ratelimit-remaining-requests"), Some("9"));
    assert_eq!(a.json()["usage"]["completion_tokens"], 8);
    gw.shutdown().await;
}

#[tokio::test]
async fn disallowed_model_is_403_model_not_allowed() {
    let setup = Setup::new();
    let (_, key) = create_key(
        &setup.keys(),
        &["--permissions", "all", "--allow-model", "gpt-4o-mini"],
    );
    let (gw, _) = setup.start("").await;
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&chat("gpt-4o")),
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!(a.code(), "model_not_allowed");
    assert_eq!(a.json()["error"]["param"], "model");
    // The model list shows only what the key may use.
    let list = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    let ids: Vec<_> = list.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, vec![serde_json::json!("gpt-4o-mini")]);
    gw.shutdown().await;
}

#[tokio::test]
async fn missing_scope_is_403_insufficient_permissions() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "read_only"]);
    let (gw, _) = setup.start("").await;
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&chat("gpt-4o-mini")),
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!(a.code(), "insufficient_permissions");
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", Some(&key), None)
            .await
            .status,
        200
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn exhausted_rate_is_429_with_retry_after() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all", "--rpm", "1"]);
    let (gw, _) = setup.start("").await;
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", Some(&key), None)
            .await
            .status,
        200
    );
    let a = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.code(), "rate_limit_exceeded");
    let secs: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs));
    gw.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("body_limit = 256").await;
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(1000)
    );
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&big),
    )
    .await;
    assert_eq!(a.status, 413);
    gw.shutdown().await;
}

#[tokio::test]
async fn key_limited_to_other_networks_is_403_from_loopback() {
    let setup = Setup::new();
    let (_, key) = create_key(
        &setup.keys(),
        &["--permissions", "all", "--allow-ip", "10.0.0.0/8"],
    );
    let (gw, _) = setup.start("").await;
    let a = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.code(), "ip_not_allowed");
    gw.shutdown().await;
}

#[tokio::test]
async fn streaming_chat_settles_usage_in_the_audit_record() {
    let setup = Setup::new();
    let (id, key) = create_key(&setup.keys(), &["--permissions", "all", "--tpm", "100000"]);
    let prices =
        "[prices.\"gpt-4o-mini\"]\ninput_per_million = \"0.15\"\noutput_per_million = \"0.60\"\n";
    let (gw, _) = setup.start(prices).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"abcdefgh"}]}"#;
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(body),
    )
    .await;
    assert_eq!(a.status, 200);
    let text = std::str::from_utf8(&a.body).unwrap();
    assert!(text.contains("data: [DONE]"));
    // keygate asked the upstream for usage and settled from it, but the client, which did
    // not ask, never sees the usage chunk.
    assert!(!text.contains(r#""completion_tokens""#), "{text}");
    let records = setup.audit_records(&gw);
    let chat = records
        .iter()
        .find(|r| r["path"] == "/v1/chat/completions")
        .unwrap();
    assert_eq!(chat["decision"], "allowed");
    assert_eq!(chat["key_id"], id.as_str());
    assert_eq!(chat["usage"]["prompt_tokens"], 2);
    assert_eq!(chat["usage"]["completion_tokens"], 5);
    // 2 tokens in at $0.15/M and 5 out at $0.60/M: 300 + 3000 nano-dollars.
    assert_eq!(chat["cost"], "0.0000033", "{chat}");
    gw.shutdown().await;
}

#[tokio::test]
async fn cli_round_trip_create_serve_revoke_reload() {
    let setup = Setup::new();
    let (id, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", Some(&key), None)
            .await
            .status,
        200
    );
    common::cli(&setup.keys(), &["keys", "revoke", &id]);
    gw.built().store().reload().await.unwrap();
    let a = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.code(), "invalid_api_key");
    gw.shutdown().await;
}

#[tokio::test]
async fn healthz_and_metrics_need_no_key() {
    let setup = Setup::new();
    create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", None, None)
            .await
            .status,
        401
    );
    let health = call(gw.addr(), "GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200);
    let metrics = call(gw.addr(), "GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200);
    let text = std::str::from_utf8(&metrics.body).unwrap();
    assert!(text.contains("keygate_requests_total"), "{text}");
    // Latencies are histograms with fixed buckets (they add up across replicas).
    assert!(
        text.contains("keygate_request_duration_seconds_bucket{"),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn token_exchange_issues_a_narrower_token() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    let ask = r#"{"ttl_seconds":600,"permissions":{"restricted":{"models":"read"}}}"#;
    let a = call(gw.addr(), "POST", "/v1/tokens", Some(&key), Some(ask)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("cache-control"), Some("no-store"));
    let token = a.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", Some(&token), None)
            .await
            .status,
        200
    );
    let write = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&token),
        Some(&chat("gpt-4o-mini")),
    )
    .await;
    assert_eq!(write.status, 403);
    assert_eq!(
        call(gw.addr(), "POST", "/v1/tokens", None, Some(ask))
            .await
            .status,
        401
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_never_sees_the_client_key() {
    // The mock upstream would echo nothing, so check what the proxy forwards with an echo
    // upstream of our own.
    use axum::Router;
    let echo = Router::new().fallback(|req: axum::extract::Request| async move {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        axum::Json(serde_json::json!({"object": "list", "data": [], "auth": auth}))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, echo).await.unwrap() });

    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let config = setup.dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!("keys_file = {:?}\n[audit]\ntracing = false\n", setup.keys()),
    )
    .unwrap();
    let mut options =
        keygate_workspace::gateway::GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.config = Some(config);
    options.upstream = Some(format!("http://{upstream}"));
    options.upstream_api_key = Some("provider-secret".to_owned());
    let mut out = Vec::new();
    let gw = keygate_workspace::gateway::start(options, &mut out)
        .await
        .unwrap();
    let a = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["auth"], "Bearer provider-secret");
    assert!(!std::str::from_utf8(&a.body).unwrap().contains(&key));
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_a_request_in_flight_and_flushes_its_audit_record() {
    use http_body_util::BodyExt;
    let setup = Setup::new();
    let (id, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    // The response head is here; its body is not read yet.
    let response = common::client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let shutdown = tokio::spawn(gw.shutdown());
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        std::str::from_utf8(&text)
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    shutdown.await.unwrap();
    let audit = std::fs::read_to_string(setup.audit()).unwrap();
    assert!(audit.contains(&id), "{audit}");
    assert!(audit.contains(r#""completion":"complete""#), "{audit}");
}

#[test]
fn without_a_config_the_gateway_uses_the_sqlite_store_and_demo_prices() {
    use keygate_workspace::gateway::{GatewayOptions, config_for};
    let options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    let config = config_for(&options).unwrap();
    assert_eq!(config.store, None);
    assert_eq!(
        config.store_url().unwrap(),
        "sqlite:keygate.db".parse().unwrap()
    );
    assert_eq!(config.keys_file, None);
    assert!(config.price_table().unwrap().price("gpt-4o-mini").is_some());
    assert!(config.jwt.enabled && config.jwt.secret_env.is_none());
}

#[tokio::test]
async fn without_keygate_the_same_routes_are_served_with_no_check() {
    // The load script's baseline: the same proxy with no layer, so a request with no key
    // reaches the mock upstream. The keygate mode refuses the very same request.
    let setup = Setup::new();
    create_key(&setup.keys(), &["--permissions", "all"]);
    let (bare, out) = setup.start_with("", |o| o.without_keygate = true).await;
    assert!(out.contains("--without-keygate"), "{out}");
    let a = call(bare.addr(), "GET", "/v1/models", None, None).await;
    assert_eq!(a.status, 200);
    assert!(a.header("x-request-id").is_none());
    bare.shutdown().await;

    let (gw, _) = setup.start("").await;
    let a = call(gw.addr(), "GET", "/v1/models", None, None).await;
    assert_eq!(a.status, 401);
    gw.shutdown().await;
}

/// An upstream that takes requests and never answers.
async fn hung_upstream() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            held.push(stream);
        }
    });
    addr
}

#[tokio::test]
async fn a_hung_upstream_is_a_504_charged_at_the_reservation_and_audited_as_cut() {
    let upstream = hung_upstream().await;
    let setup = Setup::new();
    let (id, key) = create_key(
        &setup.keys(),
        &["--permissions", "all", "--budget", "1/day"],
    );
    // Real time, kept short: a 1 s head timeout.
    let (gw, _) = setup
        .start(&format!(
            "[[upstreams]]\nurl = \"http://{upstream}\"\n[proxy]\nhead_timeout_secs = 1\n\
             [prices.\"gpt-4o-mini\"]\ninput_per_million = 1\noutput_per_million = 1\n"
        ))
        .await;
    let a = call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&chat("gpt-4o-mini")),
    )
    .await;
    assert_eq!(a.status, 504);
    assert_eq!(a.code(), "upstream_timeout");
    assert_eq!(a.json()["error"]["type"], "server_error");
    let records = setup.audit_records(&gw);
    let record = records.iter().find(|r| r["key_id"] == id.as_str()).unwrap();
    assert_eq!(record["status"], 504);
    assert_eq!(record["cut"], "upstream_head");
    assert_eq!(record["decision"], "allowed");
    // The whole reservation was charged: the estimate's tokens, at a price.
    assert!(
        record["usage"]["completion_tokens"].as_u64().unwrap() >= 8,
        "{record}"
    );
    assert!(
        record["cost"].is_string() || record["cost"].is_number(),
        "{record}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn two_upstreams_are_chosen_by_the_model_of_the_request() {
    // The embedded mock for gpt-*, an echo for llama-*: each sees only its own models.
    let echo = axum::Router::new()
        .fallback(|| async { axum::Json(serde_json::json!({"served_by": "local"})) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, echo).await.unwrap() });
    let mock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(mock, keygate_workspace::mock_upstream::router())
            .await
            .unwrap()
    });

    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, out) = setup
        .start(&format!(
            "[[upstreams]]\nurl = \"http://{local}\"\nmodels = [\"llama-*\"]\n\
             [[upstreams]]\nurl = \"http://{mock_addr}\"\nmodels = [\"gpt-*\"]\n"
        ))
        .await;
    assert!(
        out.contains(&format!("upstream: http://{local}, http://{mock_addr}")),
        "{out}"
    );
    let chat_with = |model: &'static str| {
        let key = key.clone();
        let addr = gw.addr();
        async move {
            call(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(&chat(model)),
            )
            .await
        }
    };
    let llama = chat_with("llama-3-8b").await;
    assert_eq!(llama.status, 200);
    assert_eq!(llama.json()["served_by"], "local");
    let gpt = chat_with("gpt-4o-mini").await;
    assert_eq!(gpt.status, 200);
    assert_eq!(gpt.json()["object"], "chat.completion");
    let other = chat_with("claude-3").await;
    assert_eq!(other.status, 404);
    assert_eq!(other.code(), "model_not_found");
    gw.shutdown().await;
}

#[tokio::test]
async fn healthz_says_degraded_while_the_key_file_is_broken_and_the_old_keys_serve() {
    let setup = Setup::new();
    let (_, key) = create_key(&setup.keys(), &["--permissions", "all"]);
    let (gw, _) = setup.start("").await;
    let health = call(gw.addr(), "GET", "/healthz", None, None).await;
    assert_eq!(health.json()["status"], "ok");

    std::fs::write(setup.keys(), "").unwrap();
    assert!(gw.built().store().reload().await.is_err());
    let health = call(gw.addr(), "GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "degraded");
    assert!(
        health.json()["keys"].as_str().unwrap().contains("empty"),
        "{:?}",
        health.json()
    );
    // The last good keys keep serving.
    let a = call(gw.addr(), "GET", "/v1/models", Some(&key), None).await;
    assert_eq!(a.status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_key_used_through_the_gateway_has_its_last_use_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keygate.db");
    let url = format!("sqlite:{}", db.display());
    let mut out = Vec::new();
    keygate_cli::run(
        [
            "keygate",
            "--store",
            &url,
            "--json",
            "keys",
            "create",
            "--project",
            "p",
            "--create-project",
            "--permissions",
            "all",
        ],
        keygate::Timestamp::from_unix_secs(1_700_000_000),
        &mut out,
    )
    .unwrap();
    let created: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let (id, secret) = (
        created["key"]["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    );
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!("store = {url:?}\n[audit]\ntracing = false\n"),
    )
    .unwrap();
    let mut options =
        keygate_workspace::gateway::GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.config = Some(config);
    let gw = keygate_workspace::gateway::start(options, &mut Vec::new())
        .await
        .unwrap();
    let store = keygate_store::Db::open(&db).unwrap();
    assert_eq!(store.key(&id).unwrap().unwrap().last_used_at, None);
    let a = call(gw.addr(), "GET", "/v1/models", Some(&secret), None).await;
    assert_eq!(a.status, 200);
    gw.shutdown().await;
    let used = store.key(&id).unwrap().unwrap().last_used_at;
    assert!(
        used.is_some_and(|t| t.as_unix_secs() > 1_700_000_000),
        "{used:?}"
    );
}
