//! Real servers for keygate's tests: [`Postgres`] and [`Redis`], each started by the test
//! itself in a temporary directory, listening on a Unix socket only (no port to collide, no
//! network), and stopped when dropped.
//!
//! A missing server is a failure, never a skip: the panic says what to install
//! (`scripts/test` installs both on a fresh machine).
//!
//! PostgreSQL refuses to run as root, so under root (CI) the cluster is made and run as an
//! unprivileged user: `KEYGATE_TEST_PG_USER`, else `postgres` (the distribution package's
//! user), else `nobody`.
//!
//! And TLS for tests ([`test_pki`], [`serve_tls`]): a private CA and a server over it.

mod tls;
pub use tls::{serve_tls, test_pki};

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL server of its own: a fresh cluster (copied from one `initdb` made once per
/// machine and kept, see `template`) in a temporary directory, on a Unix socket.
///
/// Tuned for tests, not durability: `fsync` off (a `kill -9` of the server still loses
/// nothing committed; a power loss would).
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    user: Option<(u32, u32)>,
}

/// The user the cluster is made and run as: `None` when not root.
fn pg_user() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let candidates = std::env::var("KEYGATE_TEST_PG_USER")
        .map(|u| vec![u])
        .unwrap_or_else(|_| vec!["postgres".to_owned(), "nobody".to_owned()]);
    for name in &candidates {
        if let (Some(uid), Some(gid)) = (id(name, "-u"), id(name, "-g")) {
            return Some((uid, gid));
        }
    }
    panic!("running as root, and none of the users {candidates:?} exists to run PostgreSQL as");
}

fn is_root() -> bool {
    id("", "-u") == Some(0)
}

fn id(name: &str, flag: &str) -> Option<u32> {
    let mut cmd = Command::new("id");
    cmd.arg(flag);
    if !name.is_empty() {
        cmd.arg(name);
    }
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// The directory holding `initdb` and `postgres`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`, else the `PATH`.
fn pg_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("postgres").exists())
            .collect();
        found.sort();
        if let Some(newest) = found.pop() {
            return newest;
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("postgres").exists() {
                return dir;
            }
        }
        panic!(
            "PostgreSQL is not installed (no postgres binary in /usr/lib/postgresql/*/bin or \
             pg_config --bindir): run scripts/test, or apt-get install -y postgresql"
        );
    })
}

/// The cluster every server starts as a copy of: made by `initdb` once per machine, user and
/// PostgreSQL build, and kept in the temporary directory under a fixed name (a cluster made
/// per test process would be left behind by every one: nothing drops a static).
fn template(user: Option<(u32, u32)>) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let owner = user.map_or_else(|| id("", "-u").unwrap_or(0), |(uid, _)| uid);
        let build: String = pg_bin()
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let kept = std::env::temp_dir().join(format!("keygate-pg-template-{owner}-{build}"));
        let data = kept.join("data");
        if data.join("PG_VERSION").exists() {
            return data;
        }
        // Made aside, then renamed into place whole: another test process may be making it
        // too, and a process killed halfway leaves no half-made template.
        let dir = tempfile::Builder::new()
            .prefix("keygate-pg-template-new-")
            .tempdir()
            .expect("a temporary directory");
        give(dir.path(), user);
        let mut cmd = Command::new(pg_bin().join("initdb"));
        cmd.arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "keygate", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale", "C"]);
        as_user(&mut cmd, user);
        let out = cmd.output().expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(dir.path(), &kept).is_ok() {
            // Kept: it is the template now.
            let _ = dir.keep();
        } else {
            // Another process's came first (ours is removed as `dir` drops).
            assert!(
                data.join("PG_VERSION").exists(),
                "cannot keep the template cluster at {}",
                kept.display()
            );
        }
        data
    })
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
}

/// Makes `path` the user's (and only theirs: PostgreSQL insists on 0700 data directories).
fn give(path: &Path, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the test directory");
    }
}

impl Postgres {
    /// Starts a server with an empty cluster (user `keygate`, database `postgres`, trust
    /// authentication on its socket) and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is not installed or does not start within 30 s.
    pub fn start() -> Postgres {
        let user = pg_user();
        let template = template(user);
        let dir = tempfile::Builder::new()
            .prefix("keygate-pg-")
            .tempdir()
            .expect("a temporary directory");
        give(dir.path(), user);
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(template).arg(dir.path().join("data"));
        as_user(&mut copy, user);
        let status = copy.status().expect("cp runs");
        assert!(status.success(), "copying the template cluster failed");
        let mut pg = Postgres {
            dir,
            child: None,
            user,
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("postgres did not start: {log}");
        }
    }

    /// Starts the server and waits until it is ready; `Err` with its log if it exits first.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("a log file");
        give(&log_path, self.user);
        let mut cmd = Command::new(pg_bin().join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses="])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        as_user(&mut cmd, self.user);
        let mut child = cmd.spawn().expect("postgres starts");
        let socket = self.dir.path().join(".s.PGSQL.5432");
        let pid_file = self.dir.path().join("data/postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The lock file's eighth line says `ready` once the server accepts connections.
            let ready = socket.exists()
                && std::fs::read_to_string(&pid_file).is_ok_and(|pid| {
                    pid.lines().next().map(str::trim) == Some(&child.id().to_string())
                        && pid.lines().nth(7).is_some_and(|s| s.trim() == "ready")
                });
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited ({status}): {}", self.log()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "not ready within {START_TIMEOUT:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.dir.path().join("server.log"))
            .and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// The directory of its socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for database `db` (`postgres` exists from the start; see
    /// [`create_database`](Self::create_database)).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://keygate@{}/{db}",
            percent(&self.dir.path().to_string_lossy())
        )
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) {
        let out = Command::new(pg_bin().join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-U",
                "keygate",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills the server at once (`SIGKILL`: no shutdown, no checkpoint), as a crash would,
    /// its backends with it: no connection made before answers after.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let backends = children_of(child.id());
            let _ = child.kill();
            for pid in backends {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data, killing it first if it runs. Right after a
    /// kill the old backends may still hold the shared memory for a moment: the start is
    /// retried until they are gone (within 30 s).
    ///
    /// # Panics
    ///
    /// When it does not start within 30 s.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if Instant::now() > deadline => panic!("postgres did not restart: {log}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // Immediate shutdown: the postmaster takes its backends down with it.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Percent-encodes a socket directory for a URL's host.
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Redis server of its own, in a temporary directory, on a Unix socket only (`port 0`),
/// with persistence off: a restart starts it empty, as a lost Redis would come back (or on,
/// with [`Redis::start_persistent`]).
#[derive(Debug)]
pub struct Redis {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// A loopback TCP port it listens on too (0: none).
    port: u16,
    /// Every write in the append-only file before it is answered.
    persistent: bool,
}

impl Redis {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not start within 30 s.
    pub fn start() -> Redis {
        Redis::start_with(false, false)
    }

    /// Starts a server that writes every change to its append-only file before answering
    /// (`appendfsync always`): killed and restarted, it comes back with everything it
    /// acknowledged.
    ///
    /// # Panics
    ///
    /// As [`Redis::start`].
    pub fn start_persistent() -> Redis {
        Redis::start_with(false, true)
    }

    /// Starts a server that listens on a loopback TCP port too (see [`Redis::tcp_url`]).
    ///
    /// # Panics
    ///
    /// As [`Redis::start`].
    pub fn start_with_tcp() -> Redis {
        Redis::start_with(true, false)
    }

    fn start_with(tcp: bool, persistent: bool) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("keygate-redis-")
            .tempdir()
            .expect("a temporary directory");
        let port = if tcp {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a loopback port")
                .port()
        } else {
            0
        };
        let mut redis = Redis {
            dir,
            child: None,
            port,
            persistent,
        };
        redis.spawn();
        redis
    }

    /// `redis://127.0.0.1:PORT`, for a server started by [`Redis::start_with_tcp`].
    ///
    /// # Panics
    ///
    /// When it listens on no TCP port.
    pub fn tcp_url(&self) -> String {
        assert!(self.port != 0, "started without TCP");
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// A URL for it (`redis+unix:///PATH`).
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("a log file");
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => panic!(
                "redis-server does not run ({e}): run scripts/test, or apt-get install -y redis-server"
            ),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(&socket) {
                self.child = Some(child);
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server exited ({status}) at start: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start within {START_TIMEOUT:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server at once (`SIGKILL`); with persistence off, everything it held is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same socket (killing it first if it runs): empty, or with what
    /// its append-only file holds when persistent.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback TCP ports, in temporary
/// directories, with persistence off; its 16,384 slots spread over the three by
/// `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Child>,
}

impl RedisCluster {
    /// Starts three nodes, joins them into one cluster and waits until every node reports
    /// `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is not installed, or the cluster is not up within
    /// 30 s.
    pub fn start() -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("keygate-redis-cluster-")
            .tempdir()
            .expect("a temporary directory");
        let ports = free_cluster_ports(3);
        let mut children = Vec::new();
        for port in &ports {
            let node = dir.path().join(port.to_string());
            std::fs::create_dir(&node).expect("a node directory");
            let log = std::fs::File::create(node.join("server.log")).expect("a log file");
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&node)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("redis-server does not run ({e}): run scripts/test, or apt-get install -y redis-server")
                });
            children.push(child);
        }
        let cluster = RedisCluster {
            dir,
            ports,
            children,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        for port in &cluster.ports {
            while cli(*port, &["PING"]).as_deref() != Some("PONG") {
                assert!(
                    Instant::now() < deadline,
                    "a cluster node did not start: {}",
                    cluster.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for port in &cluster.ports {
            loop {
                let info = cli(*port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not come up: {info}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The nodes' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// How many keys node `i` holds (`DBSIZE`).
    pub fn keys_on(&self, i: usize) -> u64 {
        cli(self.ports[i], &["DBSIZE"])
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every node's log so far.
    pub fn log(&self) -> String {
        self.ports
            .iter()
            .map(|p| {
                std::fs::read_to_string(self.dir.path().join(p.to_string()).join("server.log"))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `redis-cli -p PORT ARGS…` on loopback; its output, trimmed, if it ran.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `n` loopback ports that are free, each with its cluster bus port (`+10000`) free too.
fn free_cluster_ports(n: usize) -> Vec<u16> {
    use std::net::TcpListener;
    let mut ports = Vec::new();
    let mut held = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if let Ok(bus_listener) = TcpListener::bind(("127.0.0.1", bus)) {
            ports.push(port);
            held.push((listener, bus_listener));
        }
    }
    ports
}

/// Whether a Redis server answers `PING` on `socket`.
fn ping(socket: &Path) -> bool {
    use std::io::Write;
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// One HTTP/1.1 request to `addr` with `Connection: close`, a bearer `key` and a JSON
/// `body`; the whole response as text (what came within 30 s).
///
/// # Panics
///
/// When nothing listens at `addr` or the request cannot be written.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the server listens");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("the request is written");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // `/proc/N/stat`: "N (name) state ppid …"; the name may hold spaces.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = &stat[stat.rfind(')')? + 1..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_starts_answers_and_restarts_on_its_data() {
        let mut pg = Postgres::start();
        pg.create_database("kit");
        let psql = |pg: &Postgres, sql: &str| {
            let out = Command::new(pg_bin().join("psql"))
                .arg("-h")
                .arg(pg.socket_dir())
                .args([
                    "-U",
                    "keygate",
                    "-d",
                    "kit",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        psql(&pg, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)");
        pg.kill();
        pg.restart();
        assert_eq!(psql(&pg, "SELECT v FROM t").trim(), "7");
        assert!(pg.url("kit").starts_with("postgres://keygate@%2F"));
    }

    #[test]
    fn redis_starts_answers_and_comes_back_empty() {
        let mut redis = Redis::start();
        assert!(ping(&redis.socket()));
        redis.kill();
        assert!(!ping(&redis.socket()));
        redis.restart();
        assert!(ping(&redis.socket()));
    }

    #[test]
    fn a_cluster_of_three_masters_serves_every_slot() {
        let cluster = RedisCluster::start();
        let info = cli(cluster.ports()[0], &["CLUSTER", "INFO"]).unwrap_or_default();
        assert!(info.contains("cluster_size:3"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert_eq!(cluster.urls().len(), 3);
    }
}
