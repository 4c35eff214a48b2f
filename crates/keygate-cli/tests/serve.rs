//! The `keygate` binary's `serve` command as a real process: the README's first command from
//! an empty directory, and SIGTERM with a request hung on its upstream.
//!
//! Real time, bounded: every wait has a deadline well above what it needs, and nothing sleeps.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// The gateway process and the lines it printed up to its first blank-free demo section.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Gateway {
    /// Starts `keygate serve ARGS` in `dir` and waits (at most 60 s) for its listening line.
    fn start(dir: &Path, args: &[&str]) -> Gateway {
        Self::start_with_stderr(dir, args, Stdio::null())
    }

    /// As [`Gateway::start`], with its standard error going to `stderr`.
    fn start_with_stderr(dir: &Path, args: &[&str], stderr: Stdio) -> Gateway {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the gateway printed nothing");
        let addr = first
            .strip_prefix("keygate gateway listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .unwrap();
        Gateway { child, addr, lines }
    }

    /// The next printed line (at most 10 s away).
    fn line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// Sends SIGTERM; returns whether it exited successfully and how long it took (at most
    /// `limit`, else the test fails).
    fn terminate(mut self, limit: Duration) -> (bool, Duration) {
        let pid = self.child.id().to_string();
        let sent = Instant::now();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let (tx, rx) = mpsc::channel();
        let mut child = std::mem::replace(&mut self.child, dummy());
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(limit) {
            Ok(status) => (status.unwrap().success(), sent.elapsed()),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                panic!("the gateway did not exit within {limit:?} of SIGTERM");
            }
        }
    }
}

/// A finished child to leave in place of the real one.
fn dummy() -> Child {
    let mut c = Command::new("true").spawn().unwrap();
    let _ = c.wait();
    c
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a key with every permission in project `p` with the CLI (in-process), on
/// `target` (`["--file", PATH]` or `["--store", URL]`) with `extra` flags; returns its secret.
fn cli_key(target: [&str; 2], extra: &[&str]) -> String {
    let mut argv = vec!["keygate", target[0], target[1], "--json", "keys", "create"];
    argv.extend_from_slice(&["--project", "p", "--create-project", "--permissions", "all"]);
    argv.extend_from_slice(extra);
    let mut out = Vec::new();
    keygate_cli::run(
        argv,
        keygate_core::Timestamp::from_unix_secs(1_700_000_000),
        &mut out,
    )
    .unwrap();
    let created: serde_json::Value = serde_json::from_slice(&out).unwrap();
    created["secret"].as_str().unwrap().to_owned()
}

/// A key with every permission in the TOML key file `keys`.
fn create_key(keys: &Path) -> String {
    cli_key(["--file", keys.to_str().unwrap()], &[])
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as text.
async fn request(addr: SocketAddr, method: &str, path: &str, key: &str, body: &str) -> String {
    keygate_testkit::http(addr, method, path, key, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_command_serves_demo_keys_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    // The README's `keygate serve`, on a free port instead of 8080.
    let gw = Gateway::start(dir.path(), &["--listen", "127.0.0.1:0"]);
    assert_eq!(gw.line(), "upstream: the embedded mock OpenAI server");
    assert_eq!(
        gw.line(),
        "created demo keys in sqlite:keygate.db (secrets are shown only now):"
    );
    let full = gw.line();
    let secret = full
        .split_whitespace()
        .nth(1)
        .filter(|_| full.trim_start().starts_with("full "))
        .unwrap_or_else(|| panic!("no full key in {full:?}"))
        .to_owned();
    assert!(secret.starts_with("sk-kg-"));
    assert!(dir.path().join("keygate.db").exists());

    let models = request(gw.addr, "GET", "/v1/models", &secret, "").await;
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    assert!(models.contains("gpt-4o-mini"), "{models}");
    let chat =
        r#"{"model":"gpt-4o-mini","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = request(gw.addr, "POST", "/v1/chat/completions", &secret, chat).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"usage\""), "{answer}");
    let refused = request(gw.addr, "GET", "/v1/models", "sk-kg-wrong", "").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    let (ok, _) = gw.terminate(Duration::from_secs(30));
    assert!(ok, "the gateway did not exit cleanly on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_upstream_request_exits_at_the_drain_deadline() {
    // An upstream that takes requests and never answers; it says when one arrived.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel::<()>(4);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = upstream.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = arrived_tx.send(()).await;
            held.push(stream);
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let secret = create_key(&keys);
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "keys_file = {keys:?}\n[audit]\ntracing = false\n[audit.jsonl]\npath = {audit:?}\n\
             [server]\ndrain_timeout_secs = 1\n[[upstreams]]\nurl = \"http://{upstream_addr}\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--config", "keygate.toml"],
    );
    let addr = gw.addr;
    let client = tokio::spawn(async move { request(addr, "GET", "/v1/models", &secret, "").await });
    tokio::time::timeout(Duration::from_secs(30), arrived.recv())
        .await
        .expect("the request never reached the upstream");

    let (ok, took) = gw.terminate(Duration::from_secs(20));
    assert!(ok);
    // The drain deadline is 1 s; the process does not wait for the upstream's 10 min.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let answer = client.await.unwrap();
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let records = std::fs::read_to_string(&audit).unwrap();
    let record = records
        .lines()
        .find(|l| l.contains("\"path\":\"/v1/models\""))
        .unwrap_or_else(|| panic!("no audit record for the cut request: {records}"));
    assert!(record.contains("\"completion\":\"cancelled\""), "{record}");
    assert!(record.contains("\"cut\":\"shutdown\""), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_audit_on_a_full_disk_serves_nothing_unaudited() {
    // The audit file is /dev/full: every write fails with ENOSPC. With fail_closed, no request
    // may be served unless its record is written somewhere: the file, or at the latest the
    // fallback (stderr).
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let secret = create_key(&keys);
    std::fs::write(
        dir.path().join("keygate.toml"),
        format!(
            "keys_file = {keys:?}\n[audit]\ntracing = false\nbackpressure = \"fail_closed\"\n\
             [audit.jsonl]\npath = \"/dev/full\"\ncapacity = 16\n"
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let gw = Gateway::start_with_stderr(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--config", "keygate.toml"],
        Stdio::from(stderr),
    );
    let addr = gw.addr;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            request(addr, "GET", "/v1/models", &secret, "").await
        }));
    }
    let mut served = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        if answer.starts_with("HTTP/1.1 200") {
            let id = answer
                .lines()
                .find_map(|l| l.strip_prefix("x-request-id: "))
                .unwrap()
                .trim()
                .to_owned();
            served.push(id);
        } else {
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(
                answer.contains("audit_sink_unavailable") || answer.contains("service_unavailable"),
                "{answer}"
            );
            refused += 1;
        }
    }
    assert!(
        !served.is_empty() && refused > 0,
        "served {}, refused {refused}",
        served.len()
    );
    let (ok, _) = gw.terminate(Duration::from_secs(30));
    assert!(ok);
    let fallback = std::fs::read_to_string(&stderr_path).unwrap();
    for id in &served {
        let needle = format!("\"request_id\":\"{id}\"");
        let record = fallback.lines().find(|l| l.contains(&needle));
        let record =
            record.unwrap_or_else(|| panic!("request {id} was served with no audit record"));
        assert!(record.contains("\"status\":200"), "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_with_the_cli_is_refused_by_the_running_gateway_and_stays_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &["--listen", "127.0.0.1:0"]);
    assert_eq!(gw.line(), "upstream: the embedded mock OpenAI server");
    gw.line();
    let line = gw.line();
    let secret = line.split_whitespace().nth(1).unwrap().to_owned();
    let ok = request(gw.addr, "GET", "/v1/models", &secret, "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // The CLI, as another process would, on the gateway's own store.
    let url = format!("sqlite:{}", dir.path().join("keygate.db").display());
    let mut out = Vec::new();
    keygate_cli::run(
        ["keygate", "--store", &url, "--json", "keys", "list"],
        keygate_core::Timestamp::from_unix_secs(1_800_000_000),
        &mut out,
    )
    .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let full = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "full")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    keygate_cli::run(
        ["keygate", "--store", &url, "keys", "revoke", &full],
        keygate_core::Timestamp::from_unix_secs(1_800_000_000),
        &mut Vec::new(),
    )
    .unwrap();
    // The gateway polls the store every 250 ms; give it a generous, bounded while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let answer = request(gw.addr, "GET", "/v1/models", &secret, "").await;
        if answer.starts_with("HTTP/1.1 401") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::task::yield_now().await;
    };
    assert!(refused, "the revoked key still works");
    let health = request(gw.addr, "GET", "/healthz", "", "").await;
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let (ok, _) = gw.terminate(Duration::from_secs(30));
    assert!(ok);

    // A restart keeps the store: no new demo keys, the revoked key still refused.
    let gw = Gateway::start(dir.path(), &["--listen", "127.0.0.1:0"]);
    gw.line();
    assert_eq!(
        gw.line(),
        "using the keys in sqlite:keygate.db; the demo keys are:"
    );
    let answer = request(gw.addr, "GET", "/v1/models", &secret, "").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    gw.terminate(Duration::from_secs(30));
}

#[test]
fn a_gateway_with_no_usable_key_source_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), "").unwrap();
    std::fs::write(
        dir.path().join("broken.db"),
        b"this is not a database at all, not even close....",
    )
    .unwrap();
    for args in [
        ["--keys-file", "keys.toml"],
        ["--store", "sqlite:broken.db"],
        ["--keys-file", "absent.toml"],
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
}

/// A key on the store at `db` with a budget of `budget` dollars a day; returns its secret.
fn budget_key(db: &Path, budget: &str) -> String {
    let url = format!("sqlite:{}", db.display());
    cli_key(["--store", &url], &["--budget", &format!("{budget}/day")])
}

/// Sends small priced chat completions one after another until one is refused (or `max`
/// are admitted); returns how many were admitted.
async fn spend_until_refused(addr: SocketAddr, secret: &str, max: usize) -> usize {
    let chat =
        r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    for n in 0..max {
        let answer = request(addr, "POST", "/v1/chat/completions", secret, chat).await;
        if answer.starts_with("HTTP/1.1 429") {
            assert!(answer.contains("insufficient_quota"), "{answer}");
            return n;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    max
}

/// Starts the gateway on `db` (no config: the demo prices), with its own fresh key store.
fn start_on(dir: &Path, db: &Path) -> Gateway {
    let url = format!("sqlite:{}", db.display());
    let gw = Gateway::start(dir, &["--listen", "127.0.0.1:0", "--store", &url]);
    gw.line();
    gw
}

fn kill_9(gw: Gateway) {
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_never_spent_twice_across_a_restart_or_a_kill() {
    // $0.0001 a day: about ten of these requests (each reserves ~10k nanodollars, spends ~6k).
    const BUDGET: &str = "0.0001";
    let dir = tempfile::tempdir().unwrap();

    // Without a restart: how many requests the budget pays for.
    let db = dir.path().join("once.db");
    let secret = budget_key(&db, BUDGET);
    let gw = start_on(dir.path(), &db);
    let whole = spend_until_refused(gw.addr, &secret, 100).await;
    gw.terminate(Duration::from_secs(30));
    assert!((3..100).contains(&whole), "{whole}");

    // SIGTERM part way: the remainder after the restart is exactly what was left.
    let db = dir.path().join("term.db");
    let secret = budget_key(&db, BUDGET);
    let gw = start_on(dir.path(), &db);
    let before = spend_until_refused(gw.addr, &secret, whole / 2).await;
    assert_eq!(before, whole / 2);
    let (ok, _) = gw.terminate(Duration::from_secs(30));
    assert!(ok);
    let gw = start_on(dir.path(), &db);
    let after = spend_until_refused(gw.addr, &secret, 100).await;
    gw.terminate(Duration::from_secs(30));
    assert_eq!(before + after, whole, "{before} + {after}");

    // kill -9 part way: never more than the budget (a settlement lost in the kill counts at
    // its reservation, so at most one request fewer).
    let db = dir.path().join("kill.db");
    let secret = budget_key(&db, BUDGET);
    let gw = start_on(dir.path(), &db);
    let before = spend_until_refused(gw.addr, &secret, whole / 2).await;
    kill_9(gw);
    let gw = start_on(dir.path(), &db);
    let after = spend_until_refused(gw.addr, &secret, 100).await;
    gw.terminate(Duration::from_secs(30));
    assert!(before + after <= whole, "{before} + {after} > {whole}");
    assert!(before + after + 1 >= whole, "{before} + {after} vs {whole}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_rate_goes_on_across_a_clean_restart_and_counts_as_used_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rate.db");
    let url = format!("sqlite:{}", db.display());
    let rpm_key = || cli_key(["--store", &url], &["--rpm", "3"]);
    let (secret, other) = (rpm_key(), rpm_key());
    let status = |answer: String| answer.get(9..12).unwrap_or("").to_owned();

    let gw = start_on(dir.path(), &db);
    for _ in 0..2 {
        assert_eq!(
            status(request(gw.addr, "GET", "/v1/models", &secret, "").await),
            "200"
        );
    }
    let (ok, _) = gw.terminate(Duration::from_secs(30));
    assert!(ok);
    // A clean restart goes on: one of the three left, then 429.
    let gw = start_on(dir.path(), &db);
    assert_eq!(
        status(request(gw.addr, "GET", "/v1/models", &secret, "").await),
        "200"
    );
    assert_eq!(
        status(request(gw.addr, "GET", "/v1/models", &secret, "").await),
        "429"
    );
    // The other key uses one of its three, then the gateway is killed.
    assert_eq!(
        status(request(gw.addr, "GET", "/v1/models", &other, "").await),
        "200"
    );
    kill_9(gw);
    // After a kill the last minute is unknown: the rate counts as used in full (3 a minute:
    // the next request is 20 s away), never as fresh.
    let gw = start_on(dir.path(), &db);
    assert_eq!(
        status(request(gw.addr, "GET", "/v1/models", &other, "").await),
        "429"
    );
    gw.terminate(Duration::from_secs(30));
}
