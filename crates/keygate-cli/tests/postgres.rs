//! The key commands on a PostgreSQL store (a real server, started by the test).

use std::process::{Command, Output};
use std::time::Instant;

use keygate_testkit::Postgres;
use serde_json::Value;

fn keygate(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .env_remove("KEYGATE_KEYS_FILE")
        .arg("--store")
        .arg(url)
        .args(args)
        .output()
        .expect("the keygate binary runs")
}

fn ok(out: Output) -> Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn keys_are_created_listed_revoked_exported_and_imported_on_postgres() {
    let pg = Postgres::start();
    pg.create_database("one");
    pg.create_database("two");
    let url = pg.url("one");
    ok(keygate(&url, &["projects", "create", "default"]));
    let made = ok(keygate(
        &url,
        &[
            "--json",
            "keys",
            "create",
            "--project",
            "default",
            "--permissions",
            "all",
            "--name",
            "ci",
        ],
    ));
    let id = made["key"]["id"].as_str().unwrap().to_owned();
    let secret = made["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-kg-"));
    // Listed, without its secret.
    let listed = keygate(&url, &["--json", "keys", "list"]);
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    let listed = ok(listed);
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    assert!(!text.contains(&secret));

    ok(keygate(&url, &["keys", "revoke", &id]));
    let shown = ok(keygate(&url, &["--json", "keys", "show", &id]));
    assert!(shown["key"]["revoked_at"].is_string(), "{shown}");
    assert_eq!(shown["key"]["created_by"], "cli");
    // An unknown key: exit 1, named.
    let out = keygate(&url, &["keys", "disable", "key_nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_nope"));
    // A revoked key cannot be enabled: nothing written.
    let out = keygate(&url, &["keys", "enable", &id]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Export from one database, import into another: the same keys.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    ok(keygate(
        &url,
        &["keys", "export", "--output", file.to_str().unwrap()],
    ));
    let other = pg.url("two");
    let imported = ok(keygate(
        &other,
        &["--json", "keys", "import", file.to_str().unwrap()],
    ));
    assert_eq!(imported["imported"]["keys"], 1);
    let again = ok(keygate(
        &other,
        &["--json", "keys", "import", file.to_str().unwrap()],
    ));
    assert_eq!(again["imported"]["keys"], 0);
    let there = ok(keygate(&other, &["--json", "keys", "show", &id]));
    assert_eq!(there["key"]["revoked_at"], shown["key"]["revoked_at"]);

    // Objects: imported, listed, removed.
    ok(keygate(
        &url,
        &[
            "objects",
            "import",
            "--project",
            "default",
            "--kind",
            "file",
            "file-abc",
        ],
    ));
    let listed = ok(keygate(
        &url,
        &["--json", "objects", "list", "--project", "default"],
    ));
    assert_eq!(listed[0]["id"], "file-abc", "{listed}");
    let removed = ok(keygate(&url, &["--json", "objects", "remove", "file-abc"]));
    assert_eq!(removed["removed"][0], "file-abc");
    let listed = ok(keygate(
        &url,
        &["--json", "objects", "list", "--project", "default"],
    ));
    assert_eq!(listed, serde_json::json!([]));

    // Spend is read from the PostgreSQL ledger (this key has no budget).
    let spend = ok(keygate(&url, &["--json", "spend", "show", &id]));
    assert_eq!(spend["budgets"], serde_json::json!([]), "{spend}");
}

#[test]
fn concurrent_cli_runs_lose_nothing_and_a_bulk_create_is_whole() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    ok(keygate(&url, &["projects", "create", "default"]));
    let made = ok(keygate(
        &url,
        &[
            "--json",
            "keys",
            "create",
            "--project",
            "default",
            "--permissions",
            "all",
            "--count",
            "8",
        ],
    ));
    let ids: Vec<String> = made["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 8);
    // Revokes of every key and creates of new ones, all at once.
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args(["--store", &url, "keys", "revoke", id])
                .spawn()
                .unwrap()
        })
        .chain((0..4).map(|_| {
            Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args([
                    "--store",
                    &url,
                    "keys",
                    "create",
                    "--project",
                    "default",
                    "--permissions",
                    "read-only",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        }))
        .collect();
    for mut run in runs {
        assert!(run.wait().unwrap().success());
    }
    let listed = ok(keygate(&url, &["--json", "keys", "list"]));
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 12);
    for id in &ids {
        let key = keys.iter().find(|k| k["id"] == id.as_str()).unwrap();
        assert!(key["revoked_at"].is_string(), "{key}");
    }

    let started = Instant::now();
    let bulk = ok(keygate(
        &url,
        &[
            "--json",
            "keys",
            "create",
            "--project",
            "default",
            "--permissions",
            "read-only",
            "--count",
            "20000",
        ],
    ));
    eprintln!(
        "20,000 keys created on PostgreSQL in {:?}",
        started.elapsed()
    );
    assert_eq!(bulk["keys"].as_array().unwrap().len(), 20_000);
    let listed = ok(keygate(&url, &["--json", "keys", "list"]));
    assert_eq!(listed["keys"].as_array().unwrap().len(), 20_012);
}
