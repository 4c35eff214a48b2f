//! The gateway's HTTP/1 server: hyper with a header read timeout (which also bounds how long a
//! kept-alive connection may sit idle), a cap on concurrent connections, and a drain with a
//! deadline on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::Service;

/// How the server treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// How long a client has to send a request's headers; the same timer runs while a
    /// kept-alive connection waits for its next request (hyper starts it whenever the
    /// connection reads a request head). `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// Whether connections stay open between requests.
    pub keep_alive: bool,
    /// At most this many connections at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long requests in flight may take to finish once shutdown starts.
    pub drain_timeout: Duration,
}

impl From<&keygate::ServerConfig> for ServerSettings {
    fn from(c: &keygate::ServerConfig) -> Self {
        ServerSettings {
            header_read_timeout: c.header_read_timeout(),
            keep_alive: c.keep_alive,
            max_connections: c.max_connections.max(1),
            drain_timeout: c.drain_timeout(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings::from(&keygate::ServerConfig::default())
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open at the deadline, closed by force.
    pub cut: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets requests in
/// flight finish for at most the drain timeout, calls `before_cut` if any connection is still
/// open at the deadline (so their audit records can say so), and closes what is left.
///
/// Each request carries the client's address as `ConnectInfo<SocketAddr>` in its extensions.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
    before_cut: impl FnOnce(),
) -> Drained {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(settings.keep_alive);
    let permits = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = app.clone();
        let service = tower::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(request)
        });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);

    let open = connections.len();
    let drained = if open == 0 {
        true
    } else {
        tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
            .await
            .is_ok()
    };
    let mut cut = 0;
    if !drained {
        cut = connections.len();
        before_cut();
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
    Drained { cut }
}

/// Binds `addr` with the backlog the cap on connections needs.
///
/// # Errors
///
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    fn settings() -> ServerSettings {
        ServerSettings {
            header_read_timeout: Some(Duration::from_secs(30)),
            keep_alive: true,
            max_connections: 100,
            drain_timeout: Duration::from_secs(5),
        }
    }

    /// `/` answers at once, `/slow` after 2 s, `/hang` never.
    fn app() -> Router {
        use axum::routing::get;
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "slow"
                }),
            )
            .route("/hang", get(std::future::pending::<String>))
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
    }

    struct Running {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        done: tokio::task::JoinHandle<Drained>,
        cut_called: Arc<AtomicBool>,
    }

    async fn start(settings: ServerSettings) -> Running {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let cut_called = Arc::new(AtomicBool::new(false));
        let flag = cut_called.clone();
        let done = tokio::spawn(serve(
            listener,
            app(),
            settings,
            async {
                let _ = stopped.await;
            },
            move || flag.store(true, Ordering::SeqCst),
        ));
        Running {
            addr,
            stop,
            done,
            cut_called,
        }
    }

    async fn send(stream: &mut TcpStream, path: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
    }

    /// Reads one response (this test app's bodies are short and sent whole).
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let server = start(settings()).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-half: ")
            .await
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        // hyper answers 408 or just closes; either way the connection ends at the timeout.
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // The server still serves others.
        let mut ok = TcpStream::connect(server.addr).await.unwrap();
        send(&mut ok, "/").await;
        assert!(read_response(&mut ok).await.ends_with("ok"));
        let _ = server.stop.send(());
        assert_eq!(server.done.await.unwrap(), Drained { cut: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
        let server = start(settings()).await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        send(&mut client, "/").await;
        assert!(read_response(&mut client).await.starts_with("HTTP/1.1 200"));
        let idle_since = Instant::now();
        let mut buf = [0u8; 64];
        assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
        assert_eq!(idle_since.elapsed(), Duration::from_secs(30));
        let _ = server.stop.send(());
        server.done.await.unwrap();
    }

    #[tokio::test]
    async fn requests_carry_the_client_address() {
        let server = start(settings()).await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        let local = client.local_addr().unwrap();
        send(&mut client, "/peer").await;
        assert!(
            read_response(&mut client)
                .await
                .ends_with(&local.to_string())
        );
        let _ = server.stop.send(());
        server.done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let server = start(ServerSettings {
            max_connections: 1,
            ..settings()
        })
        .await;
        let mut first = TcpStream::connect(server.addr).await.unwrap();
        send(&mut first, "/").await;
        assert!(read_response(&mut first).await.ends_with("ok"));
        // The first connection stays open (keep-alive); the second is not served until the
        // first is closed by its idle timeout, 30 s later.
        let started = Instant::now();
        let mut second = TcpStream::connect(server.addr).await.unwrap();
        send(&mut second, "/").await;
        assert!(read_response(&mut second).await.ends_with("ok"));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        let _ = server.stop.send(());
        server.done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_a_request_in_flight_finish_within_the_drain_deadline() {
        let server = start(settings()).await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        send(&mut client, "/slow").await;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = server.stop.send(());
        assert!(read_response(&mut client).await.ends_with("slow"));
        assert_eq!(server.done.await.unwrap(), Drained { cut: 0 });
        assert!(!server.cut_called.load(Ordering::SeqCst));
        // No longer accepting.
        assert!(TcpStream::connect(server.addr).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cuts_a_hung_request_at_the_drain_deadline() {
        let server = start(settings()).await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        send(&mut client, "/hang").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopping = Instant::now();
        let _ = server.stop.send(());
        assert_eq!(server.done.await.unwrap(), Drained { cut: 1 });
        assert_eq!(stopping.elapsed(), Duration::from_secs(5));
        assert!(server.cut_called.load(Ordering::SeqCst));
        let mut buf = [0u8; 64];
        assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
    }
}
