//! The admin API of a real gateway (in-process, the very gateway `keygate serve` runs) on a
//! SQLite store: every operation, every scope boundary, the audit record of each change,
//! pagination, and the key holder's own `GET /v1/key`.

use std::net::SocketAddr;

mod common;
use common::{cli, status};

use keygate_cli::gateway::{self, Gateway, GatewayOptions};
use serde_json::{Value, json};

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

/// An HTTP answer: status and body (de-chunked), parsed as JSON when it is.
struct Answer {
    status: u16,
    text: String,
    json: Value,
}

fn parse(raw: &str) -> Answer {
    let status = status(raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    Answer {
        status,
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        text: body,
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, key: &str, body: &Value) -> Answer {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    parse(&keygate_testkit::http(addr, method, path, key, &body).await)
}

/// The status of `GET /v1/models` with `secret`.
async fn models(addr: SocketAddr, secret: &str) -> u16 {
    call(addr, "GET", "/v1/models", secret, &Value::Null)
        .await
        .status
}

struct Setup {
    _dir: tempfile::TempDir,
    store: String,
    gateway: Gateway,
    root: String,
    root_id: String,
    p_admin: String,
    reader: String,
    reader_id: String,
}

impl Setup {
    fn addr(&self) -> SocketAddr {
        self.gateway.addr()
    }

    /// Makes a key of `fields` with `admin`; its secret and id.
    async fn key(&self, admin: &str, fields: Value) -> (String, String) {
        let made = call(self.addr(), "POST", "/admin/v1/keys", admin, &fields).await;
        assert_eq!(made.status, 201, "{}", made.text);
        (
            made.json["secret"].as_str().unwrap().to_owned(),
            made.json["key"]["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Makes projects, as the admin of everything.
    async fn projects(&self, ids: &[&str]) {
        for id in ids {
            let made = call(
                self.addr(),
                "POST",
                "/admin/v1/projects",
                &self.root,
                &json!({ "id": id }),
            )
            .await;
            assert_eq!(made.status, 201, "{}", made.text);
        }
    }
}

/// One chat request with `secret`.
async fn chat(addr: SocketAddr, secret: &str) -> Answer {
    call(
        addr,
        "POST",
        "/v1/chat/completions",
        secret,
        &serde_json::from_str(CHAT).unwrap(),
    )
    .await
}

async fn admin_key(store: &str, name: &str, scope: &str) -> (String, String) {
    let made = cli(
        store,
        &["admin-keys", "create", "--name", name, "--scope", scope],
    )
    .await;
    assert!(
        made["secret"].as_str().unwrap().starts_with("kg-admin-"),
        "{made}"
    );
    (
        made["admin_key"]["id"].as_str().unwrap().to_owned(),
        made["secret"].as_str().unwrap().to_owned(),
    )
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("kg.db").display());
    let (root_id, root) = admin_key(&store, "root", "manage").await;
    let (_, p_admin) = admin_key(&store, "p-owner", "manage:p").await;
    let (reader_id, reader) = admin_key(&store, "auditor", "read").await;
    let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.store = Some(store.clone());
    let mut printed = Vec::new();
    let gateway = gateway::start(options, &mut printed).await.unwrap();
    Setup {
        _dir: dir,
        store,
        gateway,
        root,
        root_id,
        p_admin,
        reader,
        reader_id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_keys_within_their_scope_and_every_change_is_recorded() {
    let s = setup().await;
    let addr = s.addr();
    // Projects: only `manage` over everything makes them.
    s.projects(&["p", "q"]).await;
    let refused = call(
        addr,
        "POST",
        "/admin/v1/projects",
        &s.p_admin,
        &json!({ "id": "r" }),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert_eq!(refused.json["error"]["code"], "insufficient_admin_scope");
    let seen = call(addr, "GET", "/admin/v1/projects", &s.p_admin, &Value::Null).await;
    let ids: Vec<&str> = seen.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["p"]);

    // A key made by the project's admin works at once, with a per-model budget.
    let made = call(
        addr,
        "POST",
        "/admin/v1/keys",
        &s.p_admin,
        &json!({
            "project": "p",
            "name": "app",
            "permissions": "all",
            "labels": { "team": "search" },
            "limits": { "budgets": [{ "amount": "0.01", "period": "day", "model": "gpt-4o-mini" }] },
        }),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let secret = made.json["secret"].as_str().unwrap().to_owned();
    let id = made.json["key"]["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-kg-"));
    assert!(!made.json["key"].to_string().contains("digest"));
    let chat = chat(addr, &secret).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    let elsewhere = call(
        addr,
        "POST",
        "/admin/v1/keys",
        &s.p_admin,
        &json!({ "project": "q", "permissions": "all" }),
    )
    .await;
    assert_eq!(elsewhere.status, 403, "{}", elsewhere.text);

    // Spend, to the admin and to the key's holder (once the ledger has committed the
    // settlement).
    s.gateway.built().flush().await;
    let spend = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/spend"),
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(spend.status, 200, "{}", spend.text);
    let row = &spend.json["data"][0];
    assert_eq!(row["scope"], "key");
    assert_eq!(row["model"], "gpt-4o-mini");
    assert_eq!(row["limit"], "0.01");
    let spent: f64 = row["spent"].as_str().unwrap().parse().unwrap();
    assert!(spent > 0.0, "{row}");
    let remaining: f64 = row["remaining"].as_str().unwrap().parse().unwrap();
    let reserved: f64 = row["reserved"].as_str().unwrap().parse().unwrap();
    assert!((remaining + spent + reserved - 0.01).abs() < 1e-9, "{row}");
    assert!(row["resets_at"].as_str().unwrap().ends_with('Z'));
    let own = call(addr, "GET", "/v1/key", &secret, &Value::Null).await;
    assert_eq!(own.status, 200, "{}", own.text);
    assert_eq!(own.json["id"], id.as_str());
    assert_eq!(own.json["budgets"][0]["spent"], row["spent"]);
    assert_eq!(own.json["budgets"][0]["remaining"], row["remaining"]);
    assert!(!own.text.contains("digest") && !own.text.contains(&secret));

    // The key's recent decisions (in memory) and its usage per day and model (written
    // about once a second).
    let recent = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/decisions"),
        &s.reader,
        &Value::Null,
    )
    .await;
    let kinds: Vec<&str> = recent.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["decision"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"allowed"), "{}", recent.text);
    assert_eq!(
        recent.json["data"].as_array().unwrap().last().unwrap()["path"],
        "/v1/chat/completions"
    );
    // The request's audit record may land just after its answer: flush until it is counted.
    let started = std::time::Instant::now();
    loop {
        s.gateway.flush_usage().await;
        let usage = call(
            addr,
            "GET",
            &format!("/admin/v1/keys/{id}/usage?days=7"),
            &s.reader,
            &Value::Null,
        )
        .await;
        let rows = usage.json["data"].as_array().unwrap().clone();
        if let Some(row) = rows.iter().find(|r| r["model"] == "gpt-4o-mini") {
            assert_eq!(row["requests"], 1, "{}", usage.text);
            assert!(row["output_tokens"].as_u64().unwrap() > 0);
            assert_ne!(row["cost"], "0");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "no usage: {}",
            usage.text
        );
    }

    // Another project's key is invisible to the project's admin, and untouchable.
    let other = call(
        addr,
        "POST",
        "/admin/v1/keys",
        &s.root,
        &json!({ "project": "q", "permissions": "read_only" }),
    )
    .await;
    assert_eq!(other.status, 201);
    let other_id = other.json["key"]["id"].as_str().unwrap().to_owned();
    for (method, path) in [
        ("GET", format!("/admin/v1/keys/{other_id}")),
        ("PATCH", format!("/admin/v1/keys/{other_id}")),
        ("POST", format!("/admin/v1/keys/{other_id}/disable")),
        ("POST", format!("/admin/v1/keys/{other_id}/revoke")),
        ("POST", format!("/admin/v1/keys/{other_id}/rotate")),
        ("GET", format!("/admin/v1/keys/{other_id}/spend")),
        ("GET", format!("/admin/v1/keys/{other_id}/events")),
        ("PATCH", "/admin/v1/projects/q".to_owned()),
    ] {
        let a = call(addr, method, &path, &s.p_admin, &json!({})).await;
        assert_eq!(a.status, 404, "{method} {path}: {}", a.text);
    }
    let listed = call(
        addr,
        "GET",
        "/admin/v1/keys?limit=100",
        &s.p_admin,
        &Value::Null,
    )
    .await;
    assert!(
        listed.json["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["project"] == "p")
    );
    assert!(!listed.text.contains(&other_id));

    // Read-only reads everything and changes nothing.
    let read = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{other_id}"),
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(read.status, 200);
    for path in [
        format!("/admin/v1/keys/{id}/disable"),
        format!("/admin/v1/keys/{id}/revoke"),
        "/admin/v1/admin-keys".to_owned(),
    ] {
        let a = call(addr, "POST", &path, &s.reader, &json!({})).await;
        assert_eq!(a.status, 403, "{path}: {}", a.text);
    }

    // Update: settable fields only, records re-validated.
    let renamed = call(
        addr,
        "PATCH",
        &format!("/admin/v1/keys/{id}"),
        &s.p_admin,
        &json!({ "name": "renamed", "labels": null }),
    )
    .await;
    assert_eq!(renamed.status, 200, "{}", renamed.text);
    assert_eq!(renamed.json["name"], "renamed");
    assert!(renamed.json.get("labels").is_none());
    for bad in [
        json!({ "digest": "00" }),
        json!({ "project": "q" }),
        json!({ "permissions": "everything" }),
    ] {
        let a = call(
            addr,
            "PATCH",
            &format!("/admin/v1/keys/{id}"),
            &s.p_admin,
            &bad,
        )
        .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text);
        assert_eq!(a.json["error"]["type"], "invalid_request_error");
    }

    // Disable, re-enable, rotate with grace, revoke: each seen by the gateway at once.
    let disabled = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/disable"),
        &s.p_admin,
        &json!({ "reason": "incident 42" }),
    )
    .await;
    assert_eq!(disabled.json["status"], "disabled");
    assert_eq!(disabled.json["disabled_reason"], "incident 42");
    assert_eq!(models(addr, &secret).await, 401);
    let enabled = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/enable"),
        &s.p_admin,
        &Value::Null,
    )
    .await;
    assert_eq!(enabled.json["status"], "active");
    assert_eq!(enabled.json["disabled_reason"], Value::Null);
    assert_eq!(models(addr, &secret).await, 200);
    let rotated = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        &s.p_admin,
        &json!({ "grace_seconds": 600 }),
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let new_secret = rotated.json["secret"].as_str().unwrap().to_owned();
    assert!(rotated.json["key"]["previous"]["valid_until"].is_string());
    assert_eq!(models(addr, &new_secret).await, 200);
    assert_eq!(models(addr, &secret).await, 200);
    let too_long = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        &s.p_admin,
        &json!({ "grace_seconds": 99_999_999 }),
    )
    .await;
    assert_eq!(too_long.status, 400);
    let revoked = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/revoke"),
        &s.p_admin,
        &Value::Null,
    )
    .await;
    assert_eq!(revoked.json["status"], "revoked");
    assert_eq!(models(addr, &new_secret).await, 401);
    assert_eq!(models(addr, &secret).await, 401);
    let again = call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{id}/enable"),
        &s.p_admin,
        &Value::Null,
    )
    .await;
    assert_eq!(again.status, 400, "{}", again.text);

    // Every change is one record: who, what, before and after; never a secret or a digest.
    let events = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &s.reader,
        &Value::Null,
    )
    .await;
    let actions: Vec<&str> = events.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.revoke",
            "key.rotate",
            "key.enable",
            "key.disable",
            "key.update",
            "key.create"
        ]
    );
    let p_admin_id = call(addr, "GET", "/admin/v1/me", &s.p_admin, &Value::Null)
        .await
        .json["id"]
        .clone();
    for e in events.json["data"].as_array().unwrap() {
        assert_eq!(e["actor"], p_admin_id);
        assert_eq!(e["project"], "p");
    }
    let update = &events.json["data"][4];
    assert_eq!(update["before"]["name"], "app");
    assert_eq!(update["after"]["name"], "renamed");
    let all = call(
        addr,
        "GET",
        "/admin/v1/events?limit=1000",
        &s.root,
        &Value::Null,
    )
    .await;
    for text in [&events.text, &all.text] {
        assert!(!text.contains("digest"), "{text}");
        for secret in [&secret, &new_secret, &s.root, &s.p_admin] {
            assert!(!text.contains(secret.as_str()));
        }
    }
    let scoped = call(
        addr,
        "GET",
        "/admin/v1/events?limit=1000",
        &s.p_admin,
        &Value::Null,
    )
    .await;
    assert!(
        scoped.json["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["project"] == "p")
    );
    assert!(!scoped.text.contains(&other_id));
    // The command line's changes are recorded too.
    cli(&s.store, &["keys", "disable", &other_id]).await;
    let by_cli = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{other_id}/events"),
        &s.root,
        &Value::Null,
    )
    .await;
    assert_eq!(by_cli.json["data"][0]["actor"], "cli");
    assert_eq!(by_cli.json["data"][0]["action"], "key.disable");
    assert_eq!(by_cli.json["data"][1]["actor"], s.root_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_set_through_the_api_bind_keys_at_once() {
    let s = setup().await;
    let addr = s.addr();
    s.projects(&["p"]).await;
    let (secret, id) = s.key(&s.p_admin, json!({
            "project": "p",
            "permissions": "all",
            "policies": [{ "type": "members_only", "group": "research", "models": ["gpt-4o*"] }],
        })).await;
    let chat = || chat(addr, &secret);
    let refused = chat().await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert_eq!(refused.json["error"]["code"], "members_only");
    let patch = |body: Value| {
        let path = format!("/admin/v1/keys/{id}");
        let key = s.p_admin.clone();
        async move { call(addr, "PATCH", &path, &key, &body).await }
    };
    // In the group, the key may.
    assert_eq!(patch(json!({ "groups": ["research"] })).await.status, 200);
    assert_eq!(chat().await.status, 200);
    // A condition that cannot hold is refused whole, and the key is left as it was.
    for bad in [
        json!({ "policies": [{ "type": "time_window", "days": [], "start": "09:00", "end": "17:00" }] }),
        json!({ "policies": [{ "type": "time_window", "days": ["mon"], "start": "9", "end": "17:00" }] }),
        json!({ "policies": [{ "type": "members_only", "group": "research" }] }),
        json!({ "policies": [{ "type": "sometimes" }] }),
    ] {
        let answer = patch(bad.clone()).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text);
    }
    assert_eq!(chat().await.status, 200);
    // The project's conditions bind every key in it.
    let project = call(
        addr,
        "PATCH",
        "/admin/v1/projects/p",
        &s.p_admin,
        &json!({ "policies": [{ "type": "require_label", "key": "env", "value": "prod" }] }),
    )
    .await;
    assert_eq!(project.status, 200, "{}", project.text);
    assert_eq!(project.json["policies"][0]["type"], "require_label");
    let refused = chat().await;
    assert_eq!(
        refused.json["error"]["code"], "label_required",
        "{}",
        refused.text
    );
    assert_eq!(
        patch(json!({ "labels": { "env": "prod" } })).await.status,
        200
    );
    assert_eq!(chat().await.status, 200);
    // Shown with the key, and every change is an event with the conditions before and after.
    let shown = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}"),
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(shown.json["policies"][0]["models"], json!(["gpt-4o*"]));
    let events = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &s.reader,
        &Value::Null,
    )
    .await;
    let groups_added = &events.json["data"][1];
    assert_eq!(groups_added["action"], "key.update");
    assert_eq!(groups_added["before"]["policies"], shown.json["policies"]);
    assert_eq!(groups_added["after"]["groups"], json!(["research"]));
    // Clearing them (merge patch: null) frees the key of its own conditions.
    assert_eq!(
        patch(json!({ "policies": null, "groups": null }))
            .await
            .status,
        200
    );
    assert_eq!(chat().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_gives_a_key_its_budget_back_and_is_recorded() {
    let s = setup().await;
    let addr = s.addr();
    s.projects(&["p", "q"]).await;
    // A budget a few requests use up.
    let (secret, id) = s
        .key(
            &s.p_admin,
            json!({
                "project": "p",
                "permissions": "all",
                "limits": { "budgets": [
                    { "amount": "0.00003", "period": "day", "model": "gpt-4o-mini" },
                    { "amount": "1", "period": "month" },
                ] },
            }),
        )
        .await;
    let until_refused = || async {
        for n in 0..50 {
            let chat = chat(addr, &secret).await;
            if chat.status == 429 {
                assert_eq!(
                    chat.json["error"]["code"], "insufficient_quota",
                    "{}",
                    chat.text
                );
                return n;
            }
            assert_eq!(chat.status, 200, "{}", chat.text);
        }
        panic!("never refused");
    };
    let admitted = until_refused().await;
    assert!(admitted >= 2, "{admitted}");
    let reset_path = format!("/admin/v1/keys/{id}/spend/reset");
    // Only a manager of the key's project resets it.
    let refused = call(addr, "POST", &reset_path, &s.reader, &Value::Null).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    let q_admin = admin_key(&s.store, "q-owner", "manage:q").await.1;
    let hidden = call(addr, "POST", &reset_path, &q_admin, &Value::Null).await;
    assert_eq!(hidden.status, 404, "{}", hidden.text);
    for bad in [
        json!({ "period": "week" }),
        json!({ "model": "gpt-4o" }),
        json!({ "models": "x" }),
    ] {
        let answer = call(addr, "POST", &reset_path, &s.p_admin, &bad).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text);
    }
    // The day's budget on the model only: the month's is left as it is.
    let reset = call(
        addr,
        "POST",
        &reset_path,
        &s.p_admin,
        &json!({ "period": "day" }),
    )
    .await;
    assert_eq!(reset.status, 200, "{}", reset.text);
    assert_eq!(
        reset.json["reset"].as_array().unwrap().len(),
        1,
        "{}",
        reset.text
    );
    let given: f64 = reset.json["reset"][0]["given_back"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(given > 0.0, "{}", reset.text);
    let day = reset.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["period"] == "day")
        .unwrap()
        .clone();
    assert_eq!(day["spent"], "0", "{day}");
    let month = reset.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["period"] == "month")
        .unwrap()
        .clone();
    assert_ne!(month["spent"], "0", "{month}");
    // The gateway admits exactly as many again.
    assert_eq!(until_refused().await, admitted);
    // Recorded: who, and the budgets before and after.
    let events = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &s.reader,
        &Value::Null,
    )
    .await;
    let e = &events.json["data"][0];
    assert_eq!(e["action"], "key.spend_reset", "{}", events.text);
    assert_eq!(e["project"], "p");
    assert_ne!(e["before"]["budgets"][0]["spent"], "0", "{e}");
    assert_eq!(e["after"]["budgets"][0]["spent"], "0", "{e}");
    // The project's budgets, shared by its keys, have their own spend and reset.
    let project_reset = "/admin/v1/projects/p/spend/reset";
    let refused = call(addr, "POST", project_reset, &s.reader, &Value::Null).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    let answer = call(addr, "POST", project_reset, &s.p_admin, &Value::Null).await;
    assert_eq!(answer.status, 400, "p has no budget: {}", answer.text);
    let patched = call(
        addr,
        "PATCH",
        "/admin/v1/projects/p",
        &s.root,
        &json!({ "limits": { "budgets": [{ "amount": "0.00002", "period": "week" }] } }),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    // (The key's own budget was used up above: reset it, so the project's is what refuses.)
    let reset_key = || async { call(addr, "POST", &reset_path, &s.p_admin, &Value::Null).await };
    assert_eq!(reset_key().await.status, 200);
    let project_admitted = until_refused().await;
    assert!(project_admitted >= 1, "{project_admitted}");
    let spend = call(
        addr,
        "GET",
        "/admin/v1/projects/p/spend",
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_ne!(spend.json["data"][0]["spent"], "0", "{}", spend.text);
    let answer = call(
        addr,
        "POST",
        project_reset,
        &s.p_admin,
        &json!({ "period": "week" }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json["data"][0]["spent"], "0", "{}", answer.text);
    assert_eq!(reset_key().await.status, 200);
    assert_eq!(until_refused().await, project_admitted);
    let events = call(
        addr,
        "GET",
        "/admin/v1/events?target=p",
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(
        events.json["data"][0]["action"], "project.spend_reset",
        "{}",
        events.text
    );
    let cleared = call(
        addr,
        "PATCH",
        "/admin/v1/projects/p",
        &s.root,
        &json!({ "limits": null }),
    )
    .await;
    assert_eq!(cleared.status, 200, "{}", cleared.text);
    // And through the CLI over the API.
    let text = remote(
        addr,
        &s.p_admin,
        &["spend", "reset", &id, "--model", "gpt-4o-mini"],
    )
    .await
    .unwrap();
    assert_eq!(text["reset"][0]["model"], "gpt-4o-mini", "{text}");
    assert_eq!(until_refused().await, admitted);
    // A reset is kept across a restart of the gateway (the ledger has it).
    let store = s.store.clone();
    s.gateway.built().flush().await;
    let reset = call(addr, "POST", &reset_path, &s.p_admin, &Value::Null).await;
    assert_eq!(reset.status, 200, "{}", reset.text);
    drop(s.gateway);
    let mut options = GatewayOptions::new("127.0.0.1:0".parse().unwrap());
    options.store = Some(store);
    let again = gateway::start(options, &mut Vec::new()).await.unwrap();
    let chat = chat(again.addr(), &secret).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
}

/// The CLI over the gateway's admin API (`--server`, `--admin-key`); its JSON answer, or the
/// error's message.
async fn remote(addr: SocketAddr, admin: &str, args: &[&str]) -> Result<Value, String> {
    let mut argv: Vec<String> = ["keygate", "--json", "--server"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    argv.push(format!("http://{addr}"));
    argv.push("--admin-key".into());
    argv.push(admin.to_owned());
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        keygate_cli::run(argv, keygate_core::Clock::system().now(), &mut out)
            .map(|()| serde_json::from_slice(&out).unwrap_or(Value::Null))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_running_gateway_through_the_admin_api() {
    let s = setup().await;
    let addr = s.addr();
    let ok = |admin: String, args: &'static [&'static str]| async move {
        remote(addr, &admin, args)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let chat = |secret: String| async move { chat(addr, &secret).await };
    let made = ok(
        s.root.clone(),
        &["projects", "create", "p", "--budget", "1/day"],
    )
    .await;
    assert_eq!(made["project"]["id"], "p");
    let made = remote(
        addr,
        &s.p_admin,
        &[
            "keys",
            "create",
            "--project",
            "p",
            "--permissions",
            "all",
            "--name",
            "ci",
            "--group",
            "ml",
            "--policy",
            "require_group ml",
            "--budget",
            "0.5/day/gpt-4o-mini",
        ],
    )
    .await
    .unwrap();
    let secret = made["secret"].as_str().unwrap().to_owned();
    let id = made["key"]["id"].as_str().unwrap().to_owned();
    assert!(!made["key"].to_string().contains("digest"), "{made}");
    assert_eq!(chat(secret.clone()).await.status, 200);
    let listed = remote(addr, &s.p_admin, &["keys", "list", "--project", "p"])
        .await
        .unwrap();
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    let shown = remote(addr, &s.reader, &["keys", "show", &id])
        .await
        .unwrap();
    assert_eq!(shown["key"]["name"], "ci");
    assert!(
        shown["key"]["created_by"]
            .as_str()
            .unwrap()
            .starts_with("adm_")
    );

    // Conditions, groups, disable and enable: the gateway acts on each at once.
    let update = |args: Vec<&'static str>| {
        let (id, key) = (id.clone(), s.p_admin.clone());
        async move {
            let mut argv = vec!["keys", "update", id.as_str()];
            argv.extend(args);
            remote(addr, &key, &argv).await
        }
    };
    update(vec![
        "--add",
        "--policy",
        "members_only research models=gpt-4o*",
    ])
    .await
    .unwrap();
    assert_eq!(
        chat(secret.clone()).await.json["error"]["code"],
        "members_only"
    );
    let cleared = update(vec!["--no-policies", "--label", "env=prod"])
        .await
        .unwrap();
    assert!(cleared["key"].get("policies").is_none(), "{cleared}");
    assert_eq!(chat(secret.clone()).await.status, 200);
    let e = update(vec!["--policy", "time_window funday 09:00-10:00"])
        .await
        .unwrap_err();
    assert!(e.contains("weekday"), "{e}");
    remote(addr, &s.p_admin, &["keys", "disable", &id])
        .await
        .unwrap();
    assert_eq!(chat(secret.clone()).await.status, 401);
    remote(addr, &s.p_admin, &["keys", "enable", &id])
        .await
        .unwrap();
    assert_eq!(chat(secret.clone()).await.status, 200);

    // The project's conditions, through `projects update`.
    let p = ok(
        s.root.clone(),
        &[
            "projects",
            "update",
            "p",
            "--policy",
            "require_label env=dev",
        ],
    )
    .await;
    assert_eq!(p["project"]["policies"][0]["value"], "dev");
    assert_eq!(
        chat(secret.clone()).await.json["error"]["code"],
        "label_required"
    );
    ok(
        s.root.clone(),
        &["projects", "update", "p", "--no-policies"],
    )
    .await;
    assert_eq!(chat(secret.clone()).await.status, 200);
    let projects = ok(s.reader.clone(), &["projects", "list"]).await;
    let listed_p = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "p");
    assert_eq!(listed_p.unwrap()["keys"], 1, "{projects}");

    // Spend, per budget, from the gateway's own view.
    s.gateway.built().flush().await;
    let spend = remote(addr, &s.reader, &["spend", "show", &id])
        .await
        .unwrap();
    let budgets = spend["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2, "{spend}");
    assert!(
        budgets
            .iter()
            .any(|b| b["scope"] == "key" && b["model"] == "gpt-4o-mini")
    );
    assert!(budgets.iter().all(|b| b["spent"] != "0"), "{spend}");

    // Rotation: the new secret is printed once; with no grace the old one stops at once.
    let rotated = remote(addr, &s.p_admin, &["keys", "rotate", &id, "--grace", "0s"])
        .await
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(chat(new_secret.clone()).await.status, 200);
    assert_eq!(chat(secret.clone()).await.status, 401);

    // Admin keys, by the admin of everything only.
    let made = ok(
        s.root.clone(),
        &["admin-keys", "create", "--name", "bot", "--scope", "read:p"],
    )
    .await;
    let bot = made["secret"].as_str().unwrap().to_owned();
    let bot_id = made["admin_key"]["id"].as_str().unwrap().to_owned();
    assert!(bot.starts_with("kg-admin-"));
    let listed = ok(s.root.clone(), &["admin-keys", "list"]).await;
    assert!(
        listed["admin_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == bot_id.as_str())
    );
    assert!(remote(addr, &bot, &["keys", "show", &id]).await.is_ok());
    let revoked = remote(addr, &s.root, &["admin-keys", "revoke", &bot_id])
        .await
        .unwrap();
    assert!(revoked["admin_key"]["revoked_at"].is_string(), "{revoked}");

    // Refusals say why, and never repeat a secret.
    for (key, args, says) in [
        (
            s.reader.clone(),
            vec!["keys", "disable", id.as_str()],
            "403",
        ),
        (bot.clone(), vec!["keys", "list"], "401"),
        (s.p_admin.clone(), vec!["admin-keys", "list"], "403"),
        (s.root.clone(), vec!["keys", "export"], "digests"),
        (new_secret.clone(), vec!["keys", "list"], "not an admin key"),
    ] {
        let e = remote(addr, &key, &args).await.unwrap_err();
        assert!(e.contains(says), "{args:?}: {e}");
        assert!(!e.contains(&key) && !e.contains(&new_secret), "{e}");
    }
    let dead = remote("127.0.0.1:9".parse().unwrap(), &s.root, &["keys", "list"])
        .await
        .unwrap_err();
    assert!(dead.contains("cannot reach the gateway"), "{dead}");

    // Every change is the admin key's, in the gateway's record.
    let events = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &s.reader,
        &Value::Null,
    )
    .await;
    let actions: Vec<&str> = events.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.rotate",
            "key.enable",
            "key.disable",
            "key.update",
            "key.update",
            "key.create"
        ]
    );
    let p_admin_id = call(addr, "GET", "/admin/v1/me", &s.p_admin, &Value::Null)
        .await
        .json["id"]
        .clone();
    assert!(
        events.json["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == p_admin_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_cross_between_the_admin_api_and_the_model_routes() {
    let s = setup().await;
    let addr = s.addr();
    s.projects(&["p"]).await;
    let (secret, id) = s
        .key(&s.root, json!({ "project": "p", "permissions": "all" }))
        .await;
    let spec = call(addr, "GET", "/admin/v1/openapi.json", "", &Value::Null).await;
    assert_eq!(spec.status, 200);
    assert_eq!(spec.json["openapi"], "3.1.0");
    let mut routes = Vec::new();
    for (path, ops) in spec.json["paths"].as_object().unwrap() {
        if !path.starts_with("/admin/v1/") || path.ends_with("openapi.json") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            let real = path.replace(
                "{id}",
                if path.contains("admin-keys") {
                    "adm_nope"
                } else {
                    &id
                },
            );
            routes.push((method.to_uppercase(), real));
        }
    }
    assert!(routes.len() >= 19, "{routes:?}");
    for (method, path) in &routes {
        // A data-plane key, no key, a made-up admin key: 401 on every admin route.
        for key in [
            secret.as_str(),
            "",
            "kg-admin-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            let a = call(addr, method, path, key, &json!({})).await;
            assert_eq!(a.status, 401, "{method} {path} with {key:.8}: {}", a.text);
            assert_eq!(a.json["error"]["code"], "invalid_admin_key");
        }
        // Every documented route exists (the read-only admin gets past authentication and
        // is answered by the route, not by the catch-all).
        let a = call(addr, method, path, &s.reader, &json!({})).await;
        assert_ne!(
            a.json["error"]["message"], "this admin route not found",
            "{method} {path}"
        );
        assert_ne!(a.status, 401, "{method} {path}");
    }
    let unknown = call(addr, "GET", "/admin/v1/nothing", &s.reader, &Value::Null).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.json["error"]["message"],
        "this admin route not found"
    );

    // An admin key calls no model, nor /v1/key.
    for admin in [&s.root, &s.reader] {
        for (method, path, body) in [
            ("GET", "/v1/models", ""),
            ("POST", "/v1/chat/completions", CHAT),
            ("GET", "/v1/key", ""),
        ] {
            let a = parse(&keygate_testkit::http(addr, method, path, admin, body).await);
            assert_eq!(a.status, 401, "{method} {path}: {}", a.text);
        }
    }

    // Admin keys: listed and revoked by the superuser only; a revoked one is refused.
    let listed = call(addr, "GET", "/admin/v1/admin-keys", &s.root, &Value::Null).await;
    assert_eq!(listed.json["data"].as_array().unwrap().len(), 3);
    assert!(!listed.text.contains("digest"));
    assert_eq!(
        call(
            addr,
            "GET",
            "/admin/v1/admin-keys",
            &s.p_admin,
            &Value::Null
        )
        .await
        .status,
        403
    );
    let made = call(
        addr,
        "POST",
        "/admin/v1/admin-keys",
        &s.root,
        &json!({ "name": "ci", "scope": "read:p" }),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let ci = made.json["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        call(addr, "GET", "/admin/v1/keys", &ci, &Value::Null)
            .await
            .status,
        200
    );
    let revoked = call(
        addr,
        "POST",
        &format!("/admin/v1/admin-keys/{}/revoke", s.reader_id),
        &s.root,
        &Value::Null,
    )
    .await;
    assert_eq!(revoked.json["status"], "revoked", "{}", revoked.text);
    assert_eq!(
        call(addr, "GET", "/admin/v1/me", &s.reader, &Value::Null)
            .await
            .status,
        401
    );
    let bad_scope = call(
        addr,
        "POST",
        "/admin/v1/admin-keys",
        &s.root,
        &json!({ "scope": "write" }),
    )
    .await;
    assert_eq!(bad_scope.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_page_through_every_key_once_with_filters() {
    let s = setup().await;
    let addr = s.addr();
    s.projects(&["p"]).await;
    let mut made = Vec::new();
    for i in 0..7 {
        let a = call(
            addr,
            "POST",
            "/admin/v1/keys",
            &s.root,
            &json!({ "project": "p", "name": format!("svc-{i}"), "permissions": "read_only" }),
        )
        .await;
        made.push(a.json["key"]["id"].as_str().unwrap().to_owned());
    }
    call(
        addr,
        "POST",
        &format!("/admin/v1/keys/{}/disable", made[3]),
        &s.root,
        &Value::Null,
    )
    .await;
    let mut seen = Vec::new();
    let mut path = "/admin/v1/keys?project=p&limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = call(addr, "GET", &path, &s.reader, &Value::Null).await;
        assert_eq!(page.status, 200, "{}", page.text);
        pages += 1;
        for k in page.json["data"].as_array().unwrap() {
            seen.push(k["id"].as_str().unwrap().to_owned());
        }
        if page.json["has_more"] != true {
            break;
        }
        path = format!(
            "/admin/v1/keys?project=p&limit=3&after={}",
            page.json["last_id"].as_str().unwrap()
        );
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made);
    let disabled = call(
        addr,
        "GET",
        "/admin/v1/keys?project=p&status=disabled",
        &s.reader,
        &Value::Null,
    )
    .await;
    let ids: Vec<&str> = disabled.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [made[3].as_str()]);
    let named = call(
        addr,
        "GET",
        "/admin/v1/keys?prefix=svc-6",
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(named.json["data"].as_array().unwrap().len(), 1);
    let bad = call(
        addr,
        "GET",
        "/admin/v1/keys?status=sleepy",
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(bad.status, 400);
    let cursor = call(
        addr,
        "GET",
        "/admin/v1/keys?after=key_nope",
        &s.reader,
        &Value::Null,
    )
    .await;
    assert_eq!(cursor.status, 404);
}

/// A raw request with `headers` (each `name: value`) and a form `body`; the whole answer.
async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_takes_only_admin_keys_and_only_its_own_forms() {
    let s = setup().await;
    let addr = s.addr();
    s.projects(&["p"]).await;
    let (secret, id) = s
        .key(&s.root, json!({ "project": "p", "permissions": "all" }))
        .await;
    // Not logged in: to the login page, which carries the security headers.
    let page = raw(addr, "GET", "/admin/keys", &[], "").await;
    assert_eq!(status(&page), 303, "{page}");
    assert!(page.contains("location: /admin/login"), "{page}");
    let login = raw(addr, "GET", "/admin/login", &[], "").await;
    let lower = login.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{login}"
    );
    assert!(lower.contains("x-frame-options: deny") && lower.contains("cache-control: no-store"));
    // A data-plane key does not log in; an admin key does, from the console's own origin.
    let refused = raw(
        addr,
        "POST",
        "/admin/login",
        &[],
        &format!("admin_key={secret}"),
    )
    .await;
    assert_eq!(status(&refused), 401);
    assert!(!refused.contains("set-cookie"));
    let cross = raw(
        addr,
        "POST",
        "/admin/login",
        &["origin: https://evil.example"],
        &format!("admin_key={}", s.root),
    )
    .await;
    assert_eq!(status(&cross), 403);
    let logged = raw(
        addr,
        "POST",
        "/admin/login",
        &["origin: http://gw"],
        &format!("admin_key={}", s.root),
    )
    .await;
    assert_eq!(status(&logged), 303, "{logged}");
    let set = logged
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap()
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/admin")
    );
    let cookie = format!(
        "cookie: {}",
        set["set-cookie: ".len()..].split(';').next().unwrap()
    );
    let page = raw(addr, "GET", &format!("/admin/keys/{id}"), &[&cookie], "").await;
    assert_eq!(status(&page), 200);
    assert!(!page.contains(&secret) && !page.contains("digest"));
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    // A form without the session's token, or from another site, changes nothing.
    for (headers, body) in [
        (vec![cookie.as_str()], "reason=x".to_owned()),
        (
            vec![cookie.as_str()],
            "csrf=kg-session-forged&reason=x".to_owned(),
        ),
        (
            vec![cookie.as_str(), "sec-fetch-site: cross-site"],
            format!("csrf={csrf}&reason=x"),
        ),
    ] {
        let a = raw(
            addr,
            "POST",
            &format!("/admin/keys/{id}/disable"),
            &headers,
            &body,
        )
        .await;
        assert_eq!(status(&a), 403, "{a}");
    }
    assert_eq!(models(addr, &secret).await, 200);
    let done = raw(
        addr,
        "POST",
        &format!("/admin/keys/{id}/disable"),
        &[&cookie, "origin: http://gw"],
        &format!("csrf={csrf}&reason=by+console"),
    )
    .await;
    assert_eq!(status(&done), 303, "{done}");
    assert_eq!(models(addr, &secret).await, 401);
    let events = call(
        addr,
        "GET",
        &format!("/admin/v1/keys/{id}/events"),
        &s.root,
        &Value::Null,
    )
    .await;
    assert_eq!(events.json["data"][0]["action"], "key.disable");
    assert_eq!(events.json["data"][0]["actor"], s.root_id.as_str());
    // Revoking the admin key ends its sessions.
    call(
        addr,
        "POST",
        &format!("/admin/v1/admin-keys/{}/revoke", s.root_id),
        &s.root,
        &Value::Null,
    )
    .await;
    let after = raw(addr, "GET", "/admin/keys", &[&cookie], "").await;
    assert_eq!(status(&after), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_an_https_gateway_that_a_private_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kg.db");
    let store = format!("sqlite:{}", path.display());
    let (_, root) = admin_key(&store, "root", "manage").await;
    // The admin API over TLS, with a certificate from a CA of our own.
    let (ca_pem, tls) = keygate_testkit::test_pki();
    let api = keygate_admin::AdminApi::new(keygate_admin::AdminStore::open_sqlite(&path).unwrap());
    let addr = keygate_testkit::serve_tls(api.router(), tls).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let run = |extra: Vec<String>| {
        let mut argv = vec!["keygate".to_owned(), "--json".into()];
        argv.extend([
            "--server".into(),
            format!("https://127.0.0.1:{}", addr.port()),
        ]);
        argv.extend(["--admin-key".into(), root.clone()]);
        argv.extend(extra);
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            keygate_cli::run(argv, keygate_core::Clock::system().now(), &mut out)
                .map(|()| serde_json::from_slice::<Value>(&out).unwrap())
                .map_err(|e| e.to_string())
        })
    };
    let with_ca = |args: &[&str]| {
        let mut v = vec!["--server-ca".to_owned(), ca.display().to_string()];
        v.extend(args.iter().map(|a| (*a).to_owned()));
        v
    };
    let made = run(with_ca(&["projects", "create", "p"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(made["project"]["id"], "p");
    let listed = run(with_ca(&["projects", "list"])).await.unwrap().unwrap();
    assert!(
        listed["projects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "p")
    );
    // Without the CA, the server is not trusted: nothing is sent past the handshake.
    let e = run(vec!["projects".into(), "list".into()])
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.contains("cannot reach the gateway"), "{e}");
    assert!(!e.contains(&root), "{e}");
    let e = run(vec![
        "--server-ca".into(),
        "/nonexistent.pem".into(),
        "projects".into(),
        "list".into(),
    ])
    .await
    .unwrap()
    .unwrap_err();
    assert!(e.contains("--server-ca"), "{e}");
}
