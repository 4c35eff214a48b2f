use std::fs;
use std::time::Duration;

use keygate_core::{KeyFormat, KeyStore, Rejection};
use keygate_store::FileStore;
use serde_json::Value;

use super::*;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-03-01T12:00:00Z").unwrap()
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        Env { _dir: dir, path }
    }

    /// With project `default` created.
    fn with_project() -> Self {
        let env = Env::new();
        env.ok(&["projects", "create", "default"], t0());
        env
    }

    fn run(&self, args: &[&str], now: Timestamp) -> Result<String, CliError> {
        let mut argv = vec!["keygate", "--file", self.path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut out = Vec::new();
        run(argv, now, &mut out).map(|()| String::from_utf8(out).unwrap())
    }

    fn ok(&self, args: &[&str], now: Timestamp) -> String {
        self.run(args, now)
            .unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
    }

    fn json(&self, args: &[&str], now: Timestamp) -> Value {
        let mut argv = vec!["--json"];
        argv.extend_from_slice(args);
        let text = self.ok(&argv, now);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Creates a key; returns (id, secret).
    fn create(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["keys", "create", "--project", "default"];
        args.extend_from_slice(extra);
        let v = self.json(&args, t0());
        (
            v["key"]["id"].as_str().unwrap().to_owned(),
            v["secret"].as_str().unwrap().to_owned(),
        )
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }
}

async fn live(path: &Path, secret: &str, now: Timestamp) -> Result<(), Rejection> {
    let store = FileStore::open(path).unwrap();
    let digest = KeyFormat::default().parse(secret).unwrap();
    let found = store.lookup(&digest).await.unwrap().expect("key not found");
    found.key.check_live(found.secret, now)
}

#[tokio::test]
async fn created_key_works_until_revoked() {
    let env = Env::with_project();
    let (id, secret) = env.create(&["--permissions", "all", "--name", "ci"]);
    assert_eq!(live(&env.path, &secret, t0()).await, Ok(()));
    env.ok(&["keys", "revoke", &id], t0());
    assert_eq!(
        live(&env.path, &secret, t0()).await,
        Err(Rejection::Revoked)
    );
}

#[test]
fn created_key_carries_every_flag() {
    let env = Env::with_project();
    let (id, _) = env.create(&[
        "--scope",
        "chat.completions=write",
        "--scope",
        "models=read",
        "--allow-model",
        "gpt-4o*",
        "--deny-model",
        "gpt-4o-audio*",
        "--rpm",
        "60",
        "--tpm",
        "100000",
        "--budget",
        "50/month",
        "--budget",
        "$2.50/day/gpt-4o",
        "--allow-ip",
        "10.0.0.0/8",
        "--allow-ip",
        "192.0.2.7",
        "--label",
        "team=ml",
        "--group",
        "research",
        "--expires-in",
        "7d",
        "--not-before",
        "2026-03-02T00:00:00Z",
    ]);
    let file = KeyFile::load(&env.path).unwrap();
    let k = file.keys.iter().find(|k| k.id.as_str() == id).unwrap();
    assert_eq!(k.permissions.access("chat.completions"), Access::Write);
    assert_eq!(k.permissions.access("models"), Access::Read);
    assert_eq!(k.permissions.access("files"), Access::None);
    assert!(k.models.allows("gpt-4o-mini") && !k.models.allows("gpt-4o-audio-preview"));
    assert_eq!(k.limits.requests_per_minute.unwrap().get(), 60);
    assert_eq!(k.limits.tokens_per_minute.unwrap().get(), 100_000);
    assert_eq!(k.limits.budgets[0].amount, Money::from_dollars(50));
    assert_eq!(k.limits.budgets[0].period, Period::Month);
    assert_eq!(k.limits.budgets[1].amount, Money::parse("2.5").unwrap());
    assert_eq!(
        k.limits.budgets[1].model.as_ref().unwrap().as_str(),
        "gpt-4o"
    );
    assert_eq!(k.allowed_ips.len(), 2);
    assert_eq!(k.allowed_ips[1].to_string(), "192.0.2.7/32");
    assert_eq!(k.labels["team"], "ml");
    assert_eq!(k.groups, ["research"]);
    assert_eq!(
        k.expires_at,
        Some(t0().saturating_add(Duration::from_secs(7 * 86_400)))
    );
    assert_eq!(
        k.not_before,
        Some(Timestamp::parse_rfc3339("2026-03-02T00:00:00Z").unwrap())
    );
    assert_eq!(k.created_at, t0());
}

#[tokio::test]
async fn rotated_key_old_secret_works_until_grace_ends() {
    let env = Env::with_project();
    let (id, old) = env.create(&["--permissions", "all"]);
    let v = env.json(&["keys", "rotate", &id, "--grace", "1h"], t0());
    let new = v["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let almost = t0().saturating_add(Duration::from_secs(3_599));
    let after = t0().saturating_add(Duration::from_secs(3_600));
    assert_eq!(live(&env.path, &old, almost).await, Ok(()));
    assert_eq!(
        live(&env.path, &old, after).await,
        Err(Rejection::GraceEnded)
    );
    assert_eq!(live(&env.path, &new, after).await, Ok(()));
}

#[test]
fn rotation_with_zero_grace_ends_the_old_secret_now() {
    let env = Env::with_project();
    let (id, old) = env.create(&["--permissions", "all"]);
    env.ok(&["keys", "rotate", &id, "--grace", "0s"], t0());
    let store = FileStore::open(&env.path).unwrap();
    let digest = KeyFormat::default().parse(&old).unwrap();
    assert!(store.store().get(&digest).is_none());
}

#[tokio::test]
async fn disabled_key_fails_until_enabled() {
    let env = Env::with_project();
    let (id, secret) = env.create(&["--permissions", "read_only"]);
    env.ok(&["keys", "disable", &id], t0());
    assert_eq!(
        live(&env.path, &secret, t0()).await,
        Err(Rejection::Disabled)
    );
    env.ok(&["keys", "enable", &id], t0());
    assert_eq!(live(&env.path, &secret, t0()).await, Ok(()));
}

#[test]
fn revoked_key_cannot_be_enabled_or_rotated() {
    let env = Env::with_project();
    let (id, _) = env.create(&["--permissions", "all"]);
    env.ok(&["keys", "revoke", &id], t0());
    let before = env.bytes();
    assert!(matches!(
        env.run(&["keys", "enable", &id], t0()),
        Err(CliError::Invalid(_))
    ));
    assert!(matches!(
        env.run(&["keys", "rotate", &id, "--grace", "1h"], t0()),
        Err(CliError::Invalid(_))
    ));
    assert_eq!(env.bytes(), before);
}

#[test]
fn every_command_prints_one_json_document() {
    let env = Env::new();
    let p = env.json(&["projects", "create", "default", "--rpm", "100"], t0());
    assert_eq!(p["project"]["id"], "default");
    let (id, secret) = env.create(&["--permissions", "all"]);
    assert!(secret.starts_with("sk-kg-"));
    let list = env.json(&["keys", "list"], t0());
    assert_eq!(list["keys"][0]["id"], id.as_str());
    assert_eq!(list["keys"][0]["status"], "active");
    let show = env.json(&["keys", "show", &id], t0());
    assert_eq!(show["key"]["permissions"], "all");
    let projects = env.json(&["projects", "list"], t0());
    assert_eq!(projects["projects"][0]["keys"], 1);
    for cmd in ["disable", "enable", "revoke"] {
        let v = env.json(&["keys", cmd, &id], t0());
        assert_eq!(v["key"]["id"], id.as_str());
    }
    assert_eq!(
        env.json(&["keys", "show", &id], t0())["key"]["status"],
        "revoked"
    );
}

#[test]
fn list_and_show_never_print_a_secret_or_full_digest() {
    let env = Env::with_project();
    let (id, secret) = env.create(&["--permissions", "all"]);
    let (id2, _) = env.create(&["--permissions", "all"]);
    let rotated = env.json(&["keys", "rotate", &id2, "--grace", "1d"], t0());
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let digests: Vec<String> = KeyFile::load(&env.path)
        .unwrap()
        .keys
        .iter()
        .flat_map(|k| {
            [Some(k.digest), k.previous.as_ref().map(|p| p.digest)]
                .into_iter()
                .flatten()
        })
        .map(|d| d.to_string())
        .collect();
    assert_eq!(digests.len(), 3);
    for args in [
        vec!["keys", "list"],
        vec!["--json", "keys", "list"],
        vec!["keys", "show", &id],
        vec!["--json", "keys", "show", &id],
        vec!["keys", "show", &id2],
        vec!["--json", "keys", "show", &id2],
        vec!["keys", "revoke", &id],
        vec!["projects", "list"],
    ] {
        let out = env.ok(&args, t0());
        assert!(
            out.contains("key_") || args[0] == "projects",
            "{args:?}: {out}"
        );
        for s in [&secret, &new_secret] {
            assert!(!out.contains(s.as_str()), "{args:?} printed a secret");
            // Not even the random part without the prefix.
            assert!(!out.contains(&s["sk-kg-".len()..]), "{args:?}");
        }
        for d in &digests {
            assert!(!out.contains(d.as_str()), "{args:?} printed a digest");
        }
    }
}

#[test]
fn key_file_never_holds_a_secret() {
    let env = Env::with_project();
    let (id, secret) = env.create(&["--permissions", "all"]);
    env.ok(&["keys", "rotate", &id, "--grace", "1h"], t0());
    let text = String::from_utf8(env.bytes()).unwrap();
    assert!(!text.contains(&secret));
    assert!(!text.contains(&secret["sk-kg-".len()..]));
}

#[test]
fn human_create_output_shows_the_secret_once() {
    let env = Env::with_project();
    let out = env.ok(
        &[
            "keys",
            "create",
            "--project",
            "default",
            "--permissions",
            "all",
        ],
        t0(),
    );
    let secret = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-kg-"))
        .unwrap();
    assert_eq!(out.matches(secret).count(), 1);
    assert!(KeyFormat::default().parse(secret).is_ok());
}

#[test]
fn bad_arguments_fail_and_leave_the_file_byte_identical() {
    let env = Env::with_project();
    let (id, _) = env.create(&["--permissions", "all"]);
    let before = env.bytes();
    let create = |extra: &[&'static str]| {
        let mut v = vec!["keys", "create", "--project", "default"];
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<Vec<&str>> = vec![
        create(&[]),                              // no permissions
        create(&["--permissions", "everything"]), // bad enum
        create(&["--permissions", "all", "--scope", "models=read"]),
        create(&["--scope", "models=admin"]),
        create(&["--scope", "models=read", "--scope", "models=write"]),
        create(&["--permissions", "all", "--expires-in", "10 parsecs"]),
        create(&["--permissions", "all", "--expires-in", "0s"]),
        create(&[
            "--permissions",
            "all",
            "--expires-in",
            "1d",
            "--expires-at",
            "2027-01-01T00:00:00Z",
        ]),
        create(&[
            "--permissions",
            "all",
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ]),
        create(&["--permissions", "all", "--expires-at", "tomorrow"]),
        create(&[
            "--permissions",
            "all",
            "--not-before",
            "2027-01-01T00:00:00Z",
            "--expires-in",
            "1d",
        ]),
        create(&["--permissions", "all", "--budget", "50/fortnight"]),
        create(&["--permissions", "all", "--budget", "-5/day"]),
        create(&["--permissions", "all", "--rpm", "0"]),
        create(&["--permissions", "all", "--allow-ip", "10.0.0.0/33"]),
        create(&["--permissions", "all", "--allow-model", ""]),
        create(&["--permissions", "all", "--label", "novalue"]),
        create(&["--permissions", "all", "--prefix", "bad prefix!"]),
        create(&["--permissions", "all", "--frobnicate"]),
        vec![
            "keys",
            "create",
            "--project",
            "nope",
            "--permissions",
            "all",
        ],
        vec!["keys", "revoke", "key_missing"],
        vec!["keys", "rotate", &id],
        vec!["keys", "rotate", &id, "--grace", "soon"],
        vec!["projects", "create", "default"],
        vec!["projects", "create", "bad id"],
        vec!["projects", "create", "x", "--budget", "1/day/"],
        vec!["keys"],
        vec!["bogus"],
    ];
    for args in cases {
        let result = env.run(&args, t0());
        let err = result.expect_err(&format!("{args:?} succeeded"));
        assert_ne!(err.exit_code(), 0, "{args:?}");
        assert!(!err.to_string().is_empty());
        assert_eq!(env.bytes(), before, "{args:?} changed the file");
    }
}

#[test]
fn create_project_flag_makes_a_missing_project() {
    let env = Env::new();
    let v = env.json(
        &[
            "keys",
            "create",
            "--project",
            "fresh",
            "--create-project",
            "--permissions",
            "all",
        ],
        t0(),
    );
    assert_eq!(v["key"]["project"], "fresh");
    let file = KeyFile::load(&env.path).unwrap();
    assert_eq!(file.projects[0].id, "fresh");
}

#[test]
fn reading_a_missing_file_is_an_error() {
    let env = Env::new();
    assert!(matches!(
        env.run(&["keys", "list"], t0()),
        Err(CliError::File(FileStoreError::Io { .. }))
    ));
    assert!(!env.path.exists());
}

#[test]
fn writes_to_an_invalid_file_are_refused() {
    let env = Env::with_project();
    fs::write(&env.path, "version = 1\n[[keys]]\nid = 3\n").unwrap();
    let before = env.bytes();
    let err = env.run(&["projects", "create", "other"], t0()).unwrap_err();
    assert!(matches!(err, CliError::File(FileStoreError::Parse { .. })));
    assert_eq!(env.bytes(), before);
}

#[test]
fn project_rules_are_stored() {
    let env = Env::new();
    env.ok(
        &[
            "projects",
            "create",
            "acme",
            "--name",
            "Acme",
            "--deny-model",
            "o1*",
            "--tpm",
            "5000",
            "--budget",
            "100/month",
            "--allow-ip",
            "2001:db8::/32",
        ],
        t0(),
    );
    let file = KeyFile::load(&env.path).unwrap();
    let p = &file.projects[0];
    assert_eq!(p.name, "Acme");
    assert!(!p.models.allows("o1-mini"));
    assert_eq!(p.limits.tokens_per_minute.unwrap().get(), 5000);
    assert_eq!(p.limits.budgets.len(), 1);
    assert_eq!(p.allowed_ips[0].to_string(), "2001:db8::/32");
    let out = env.ok(&["projects", "list"], t0());
    assert!(out.contains("acme") && out.contains("Acme"));
}

#[test]
fn list_filters_by_project() {
    let env = Env::with_project();
    env.ok(&["projects", "create", "other"], t0());
    let (a, _) = env.create(&["--permissions", "all"]);
    let v = env.json(
        &[
            "keys",
            "create",
            "--project",
            "other",
            "--permissions",
            "all",
        ],
        t0(),
    );
    let b = v["key"]["id"].as_str().unwrap();
    let out = env.ok(&["keys", "list", "--project", "other"], t0());
    assert!(out.contains(b) && !out.contains(&a));
}

#[test]
fn status_reflects_expiry_at_the_injected_time() {
    let env = Env::with_project();
    let (id, _) = env.create(&["--permissions", "all", "--expires-in", "1h"]);
    let later = t0().saturating_add(Duration::from_secs(3_600));
    assert_eq!(
        env.json(&["keys", "show", &id], t0())["key"]["status"],
        "active"
    );
    assert_eq!(
        env.json(&["keys", "show", &id], later)["key"]["status"],
        "expired"
    );
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1_800)));
    assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
    assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in [
        "",
        "5",
        "h",
        "5x",
        "-5m",
        "1.5h",
        "99999999999999999999s",
        "5 m",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn budgets_parse() {
    let b = parse_budget("$10.5/week/gpt-4*").unwrap();
    assert_eq!(b.amount, Money::parse("10.5").unwrap());
    assert_eq!(b.period, Period::Week);
    assert_eq!(b.model.unwrap().as_str(), "gpt-4*");
    assert!(parse_budget("10").is_err());
    assert!(parse_budget("ten/day").is_err());
}

/// The key commands on the SQLite store (`--store sqlite:PATH`).
struct StoreEnv {
    _dir: tempfile::TempDir,
    db: PathBuf,
}

impl StoreEnv {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        StoreEnv { _dir: dir, db }
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.db.display())
    }

    fn run(&self, args: &[&str]) -> Result<String, CliError> {
        let url = self.url();
        let mut argv = vec!["keygate", "--store", &url];
        argv.extend_from_slice(args);
        let mut out = Vec::new();
        run(argv, t0(), &mut out).map(|()| String::from_utf8(out).unwrap())
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut argv = vec!["--json"];
        argv.extend_from_slice(args);
        let text = self
            .run(&argv)
            .unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    fn create(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["keys", "create", "--project", "default", "--create-project"];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        (
            v["key"]["id"].as_str().unwrap().to_owned(),
            v["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn live(&self, secret: &str) -> Result<(), Rejection> {
        let store = keygate_store::SqliteStore::open(&self.db).unwrap();
        let digest = KeyFormat::default().parse(secret).unwrap();
        let found = store.lookup(&digest).await.unwrap().expect("key not found");
        found.key.check_live(found.secret, t0())
    }
}

#[tokio::test]
async fn on_the_store_keys_are_created_rotated_disabled_and_revoked() {
    let env = StoreEnv::new();
    let (id, secret) = env.create(&["--permissions", "all", "--name", "ci", "--rpm", "60"]);
    assert_eq!(env.live(&secret).await, Ok(()));
    let shown = env.json(&["keys", "show", &id]);
    assert_eq!(shown["key"]["name"], "ci");
    assert!(shown["key"].get("digest").is_none());
    let listed = env.json(&["keys", "list", "--project", "default"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);

    let rotated = env.json(&["keys", "rotate", &id, "--grace", "1h"]);
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(env.live(&new_secret).await, Ok(()));
    assert_eq!(
        env.live(&secret).await,
        Ok(()),
        "the old secret works for the grace"
    );

    env.json(&["keys", "disable", &id]);
    assert_eq!(env.live(&new_secret).await, Err(Rejection::Disabled));
    env.json(&["keys", "enable", &id]);
    assert_eq!(env.live(&new_secret).await, Ok(()));
    env.json(&["keys", "revoke", &id]);
    assert_eq!(env.live(&new_secret).await, Err(Rejection::Revoked));
    let e = env.run(&["keys", "enable", &id]).unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(matches!(
        env.run(&["keys", "revoke", "key_nope"]),
        Err(CliError::NoSuchKey(_))
    ));
}

#[test]
fn on_the_store_projects_are_created_once_and_keys_need_one() {
    let env = StoreEnv::new();
    let e = env
        .run(&[
            "keys",
            "create",
            "--project",
            "acme",
            "--permissions",
            "all",
        ])
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    env.json(&["projects", "create", "acme", "--allow-model", "gpt-4o*"]);
    let e = env.run(&["projects", "create", "acme"]).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    env.json(&[
        "keys",
        "create",
        "--project",
        "acme",
        "--permissions",
        "all",
    ]);
    let projects = env.json(&["projects", "list"]);
    assert_eq!(projects["projects"][0]["id"], "acme");
}

#[test]
fn store_and_file_are_one_or_the_other() {
    let env = StoreEnv::new();
    let url = env.url();
    let mut out = Vec::new();
    let e = run(
        [
            "keygate", "--store", &url, "--file", "k.toml", "keys", "list",
        ],
        t0(),
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, CliError::Usage(_)));
    let e = env
        .run(&["--store", "mysql://x", "keys", "list"])
        .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}

#[test]
fn bulk_create_makes_every_key_in_one_go() {
    let env = StoreEnv::new();
    let v = env.json(&[
        "keys",
        "create",
        "--project",
        "bulk",
        "--create-project",
        "--permissions",
        "read_only",
        "--count",
        "500",
    ]);
    let made = v["keys"].as_array().unwrap();
    assert_eq!(made.len(), 500);
    let secrets: std::collections::HashSet<&str> =
        made.iter().map(|k| k["secret"].as_str().unwrap()).collect();
    assert_eq!(secrets.len(), 500);
    let listed = env.json(&["keys", "list", "--project", "bulk"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 500);
    let store = keygate_store::SqliteStore::open(&env.db).unwrap();
    for k in made.iter().take(20) {
        let digest = KeyFormat::default()
            .parse(k["secret"].as_str().unwrap())
            .unwrap();
        assert!(store.store().get(&digest).is_some());
    }
}

#[test]
fn toml_import_into_the_store_and_export_round_trip() {
    // Keys made in a TOML file (as a team keeping keys in git would) ...
    let file = Env::with_project();
    file.create(&[
        "--permissions",
        "all",
        "--label",
        "team=ml",
        "--budget",
        "5/day",
        "--policy",
        "members_only research models=o1*,gpt-4o endpoints=fine_tuning",
        "--policy",
        "time_window mon-fri 08:00-18:00 group=interns",
    ]);
    let (rotated, _) = file.create(&["--permissions", "read_only"]);
    file.ok(&["keys", "rotate", &rotated, "--grace", "1h"], t0());
    let original = KeyFile::load(&file.path).unwrap();

    // ... imported into the store, exported again: the same records.
    let env = StoreEnv::new();
    let path = file.path.to_str().unwrap();
    let v = env.json(&["keys", "import", path]);
    assert_eq!(v["imported"]["keys"], 2);
    let out = env._dir.path().join("exported.toml");
    env.json(&["keys", "export", "--output", out.to_str().unwrap()]);
    let exported = KeyFile::load(&out).unwrap();
    let sorted = |mut f: KeyFile| {
        f.keys.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        f.projects.sort_by(|a, b| a.id.cmp(&b.id));
        f
    };
    assert_eq!(sorted(exported), sorted(original.clone()));
    // To stdout, as TOML.
    let text = env.run(&["keys", "export"]).unwrap();
    assert_eq!(
        sorted(KeyFile::parse("stdout", &text).unwrap()),
        sorted(original)
    );
    // Importing again changes nothing (same ids).
    env.json(&["keys", "import", path]);
    assert_eq!(
        env.json(&["keys", "list"])["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn conditions_are_set_added_and_cleared_on_keys_and_projects() {
    let lines = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        serde_json::from_value::<Condition>(c.clone())
                            .unwrap()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // The same commands on a key file and on the store.
    let file = Env::with_project();
    let store = StoreEnv::new();
    type Json<'a> = Box<dyn Fn(&[&str]) -> Value + 'a>;
    type Fails<'a> = Box<dyn Fn(&[&str]) -> String + 'a>;
    let targets: [(Json, Fails, String); 2] = [
        (
            Box::new(|a: &[&str]| file.json(a, t0())),
            Box::new(|a: &[&str]| file.run(a, t0()).unwrap_err().to_string()),
            file.create(&["--permissions", "all", "--policy", "require_group ml"])
                .0,
        ),
        (
            Box::new(|a: &[&str]| store.json(a)),
            Box::new(|a: &[&str]| store.run(a).unwrap_err().to_string()),
            store
                .create(&["--permissions", "all", "--policy", "require_group ml"])
                .0,
        ),
    ];
    for (json, fails, id) in &targets {
        let shown = json(&["keys", "show", id]);
        assert_eq!(lines(&shown["key"]["policies"]), ["require_group ml"]);
        let added = json(&[
            "keys",
            "update",
            id,
            "--add",
            "--policy",
            "members_only research models=o1*",
            "--group",
            "research",
        ]);
        assert_eq!(
            lines(&added["key"]["policies"]),
            ["require_group ml", "members_only research models=o1*"]
        );
        assert_eq!(added["key"]["groups"], serde_json::json!(["research"]));
        let replaced = json(&["keys", "update", id, "--policy", "require_label env=prod"]);
        assert_eq!(
            lines(&replaced["key"]["policies"]),
            ["require_label env=prod"]
        );
        // A condition that does not parse or cannot hold changes nothing, and says why.
        for bad in [
            "time_window funday 09:00-10:00",
            "members_only research",
            "whenever",
        ] {
            let e = fails(&["keys", "update", id, "--policy", bad]);
            assert!(
                e.contains("condition") || e.contains("weekday") || e.contains("takes"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            lines(&json(&["keys", "show", id])["key"]["policies"]),
            ["require_label env=prod"]
        );
        let cleared = json(&["keys", "update", id, "--no-policies", "--no-groups"]);
        assert!(cleared["key"].get("policies").is_none(), "{cleared}");
        assert!(cleared["key"].get("groups").is_none(), "{cleared}");
        // Projects.
        let p = json(&[
            "projects",
            "update",
            "default",
            "--policy",
            "time_window mon-fri 09:00-17:00",
        ]);
        assert_eq!(
            lines(&p["project"]["policies"]),
            ["time_window mon-fri 09:00-17:00"]
        );
        let p = json(&[
            "projects",
            "update",
            "default",
            "--no-policies",
            "--name",
            "Default",
        ]);
        assert!(p["project"].get("policies").is_none(), "{p}");
        assert_eq!(p["project"]["name"], "Default");
        let e = fails(&["projects", "update", "nope", "--name", "x"]);
        assert!(e.contains("no project"), "{e}");
    }
    // In the store, each change is an admin event by the CLI.
    let db = Db::open(&store.db).unwrap();
    let events = db
        .admin_events(&keygate_store::EventQuery::new(100))
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "key.update").count(),
        3,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == "project.update").count(),
        2,
        "{actions:?}"
    );
}

#[test]
fn import_refuses_a_broken_file_and_changes_nothing() {
    let env = StoreEnv::new();
    env.create(&["--permissions", "all"]);
    let bad = env._dir.path().join("bad.toml");
    fs::write(&bad, "").unwrap();
    assert!(env.run(&["keys", "import", bad.to_str().unwrap()]).is_err());
    fs::write(
        &bad,
        "version = 1\n[[keys]]\nid = \"key_x\"\nproject = \"nope\"\n",
    )
    .unwrap();
    assert!(env.run(&["keys", "import", bad.to_str().unwrap()]).is_err());
    assert_eq!(
        env.json(&["keys", "list"])["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn concurrent_cli_runs_on_the_store_lose_nothing() {
    // Two "processes" at once: one creates keys, the other revokes the ones made before.
    let env = StoreEnv::new();
    let first: Vec<String> = (0..20)
        .map(|_| env.create(&["--permissions", "all"]).0)
        .collect();
    let url = env.url();
    let creator = {
        let url = url.clone();
        std::thread::spawn(move || {
            let mut made = Vec::new();
            for _ in 0..20 {
                let mut out = Vec::new();
                run(
                    [
                        "keygate",
                        "--store",
                        &url,
                        "--json",
                        "keys",
                        "create",
                        "--project",
                        "default",
                        "--permissions",
                        "all",
                    ],
                    t0(),
                    &mut out,
                )
                .unwrap();
                let v: Value = serde_json::from_slice(&out).unwrap();
                made.push(v["key"]["id"].as_str().unwrap().to_owned());
            }
            made
        })
    };
    let revoker = {
        let first = first.clone();
        std::thread::spawn(move || {
            for id in &first {
                let mut out = Vec::new();
                run(
                    ["keygate", "--store", &url, "keys", "revoke", id],
                    t0(),
                    &mut out,
                )
                .unwrap();
            }
        })
    };
    let made = creator.join().unwrap();
    revoker.join().unwrap();
    let listed = env.json(&["keys", "list"]);
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 40);
    for k in keys {
        let id = k["id"].as_str().unwrap();
        let revoked = k["status"] == "revoked";
        assert_eq!(revoked, first.iter().any(|f| f == id), "{k}");
        assert!(first.iter().any(|f| f == id) || made.iter().any(|m| m == id));
    }
}

#[test]
fn on_the_store_a_disabled_key_says_why_and_enable_clears_it() {
    let env = StoreEnv::new();
    let (id, _) = env.create(&["--permissions", "all"]);
    assert_eq!(
        env.json(&["keys", "show", &id])["key"]["disabled_reason"],
        Value::Null
    );
    env.json(&["keys", "disable", &id]);
    let shown = env.json(&["keys", "show", &id]);
    assert_eq!(shown["key"]["disabled_reason"], "disabled with the CLI");
    assert_eq!(shown["key"]["created_by"], "cli");
    // As the wallet guard leaves a suspended key: enabling clears the reason.
    let mut db = keygate_store::Db::open(&env.db).unwrap();
    db.update_key(&id, |k, reason| {
        k.disabled = true;
        *reason = Some("suspended".to_owned());
        Ok(())
    })
    .unwrap();
    assert!(
        env.run(&["keys", "show", &id])
            .unwrap()
            .contains("disabled because: suspended")
    );
    env.json(&["keys", "enable", &id]);
    let shown = env.json(&["keys", "show", &id]);
    assert_eq!(shown["key"]["disabled_reason"], Value::Null);
    assert_eq!(shown["key"]["status"], "active");
}

#[tokio::test]
async fn spend_show_reads_each_budget_from_the_ledger() {
    use keygate::limit::LimitBackend;
    use keygate::limit::backend::{Actual, Charge, Unit};
    // Amounts as the admin API writes them.
    let money = |m: Money| serde_json::to_value(m).unwrap();
    let env = StoreEnv::new();
    env.json(&["projects", "create", "default", "--budget", "10/month"]);
    let (id, _) = env.create(&["--permissions", "all", "--budget", "1/day"]);
    let v = env.json(&["spend", "show", &id]);
    let budgets = v["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2);
    assert_eq!(budgets[0]["spent"], money(Money::ZERO));

    // What the gateway's token layer does: reserve against the key's and the project's
    // budget counters, settle one request, leave one in flight.
    let ledger = keygate_store::LedgerBackend::open_at(&env.db, t0()).unwrap();
    let key_budget = keygate_core::Budget {
        amount: Money::from_dollars(1),
        period: Period::Day,
        model: None,
    };
    let (counter, window) =
        keygate::limit::budget_counter(keygate_core::LimitScope::Key, &id, &key_budget, t0());
    let charge = |amount| Charge {
        group: 0,
        key: counter.clone(),
        window,
        unit: Unit::Nanodollars,
        limit: key_budget.amount.as_nanos(),
        amount,
    };
    let done = ledger
        .reserve(vec![charge(300_000_000)], t0())
        .await
        .unwrap();
    ledger
        .settle(
            done,
            Actual {
                tokens: 0,
                cost: Money::from_nanos(250_000_000),
            },
            t0(),
        )
        .await
        .unwrap();
    let _in_flight = ledger
        .reserve(vec![charge(100_000_000)], t0())
        .await
        .unwrap();
    ledger.flush().await.unwrap();

    let v = env.json(&["spend", "show", &id]);
    let key_row = &v["budgets"][0];
    assert_eq!(key_row["scope"], "key");
    assert_eq!(key_row["period"], "day");
    assert_eq!(key_row["limit"], money(Money::from_dollars(1)));
    assert_eq!(key_row["spent"], money(Money::from_nanos(250_000_000)));
    assert_eq!(key_row["reserved"], money(Money::from_nanos(100_000_000)));
    assert_eq!(key_row["remaining"], money(Money::from_nanos(650_000_000)));
    assert_eq!(key_row["resets_at"], "2026-03-02T00:00:00Z");
    assert_eq!(v["budgets"][1]["scope"], "project");
    assert_eq!(v["budgets"][1]["spent"], money(Money::ZERO));
    let text = env.run(&["spend", "show", &id]).unwrap();
    assert!(text.contains("REMAINING"), "{text}");
    assert!(matches!(
        env.run(&["spend", "show", "key_nope"]),
        Err(CliError::NoSuchKey(_))
    ));
}
