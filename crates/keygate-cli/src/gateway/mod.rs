//! The gateway (`keygate serve`): the full keygate stack in front of OpenAI-compatible
//! upstreams (the embedded [mock](crate::mock_upstream), a real one with `--upstream`, or
//! several by model with `[[upstreams]]` in the config). Library code, so the integration tests
//! start the very same gateway in-process.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, get_service, post_service};
use keygate::proxy::UpstreamProxy;
use keygate::{Built, Config, ConfigError, JsonlConfig, PriceConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;

pub mod demo;
pub mod server;

pub use server::{Drained, ServerSettings};

/// Histogram buckets of the gateway's latency metrics, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// The environment variable holding the provider key sent to a real `--upstream`.
pub const UPSTREAM_KEY_ENV: &str = "KEYGATE_UPSTREAM_API_KEY";

/// Command-line options of the gateway (`keygate serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayOptions {
    /// The address to listen on (port 0: any free port; the first line printed names it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// An OpenAI-compatible upstream (`http://` or `https://`, optionally with a base path)
    /// for every model, instead of the config's `[[upstreams]]` or the embedded mock; the
    /// provider key comes from the environment variable `KEYGATE_UPSTREAM_API_KEY`.
    #[arg(long)]
    pub upstream: Option<String>,
    /// A TOML configuration file (see the README's config reference).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The store keys and projects live in (`keygate --store URL serve`: overrides the
    /// config's `store`; default `sqlite:keygate.db`). With no config and no key file, an empty
    /// store gets demo keys.
    #[arg(skip)]
    pub store: Option<String>,
    /// Serve keys from this TOML key file instead of the store (overrides the config's
    /// `keys_file`).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// Count request rates, token rates and budgets in Redis, shared by every replica given
    /// the same (`redis://host:port/db`, `redis+unix:///path`; several comma-separated URLs:
    /// the nodes of a Redis Cluster). Overrides the config's `[counters]`.
    #[arg(long)]
    pub counters: Option<String>,
    /// Also write audit records as JSON Lines to this file (overrides `[audit.jsonl]`).
    #[arg(long)]
    pub audit_jsonl: Option<PathBuf>,
    /// Serve the same routes and proxy with no keygate layer at all: every request goes
    /// straight to the upstream. Only for measuring what the stack costs (`scripts/load.sh`);
    /// never expose a gateway started this way.
    #[arg(long, hide = true)]
    pub without_keygate: bool,
    /// The provider key for `--upstream` (the binary reads it from
    /// `KEYGATE_UPSTREAM_API_KEY`; never a flag, so it stays out of process listings).
    #[arg(skip)]
    pub upstream_api_key: Option<String>,
}

impl GatewayOptions {
    /// Options with the defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        GatewayOptions {
            listen,
            upstream: None,
            config: None,
            store: None,
            keys_file: None,
            counters: None,
            audit_jsonl: None,
            without_keygate: false,
            upstream_api_key: None,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration (or key file, or audit file) is unusable.
    Config(ConfigError),
    /// The upstream URL is unusable.
    Upstream(keygate::proxy::UpstreamError),
    /// Binding a socket, or writing the demo key file, failed.
    Io(std::io::Error),
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayError::Config(e) => write!(f, "{e}"),
            GatewayError::Upstream(e) => write!(f, "--upstream: {e}"),
            GatewayError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for GatewayError {}

impl From<std::io::Error> for GatewayError {
    fn from(e: std::io::Error) -> Self {
        GatewayError::Io(e)
    }
}

impl From<ConfigError> for GatewayError {
    fn from(e: ConfigError) -> Self {
        GatewayError::Config(e)
    }
}

/// Default prices (dollars per million tokens) for the mock's models, used when no config
/// file is given, so the demo's budgets can be charged.
pub fn demo_prices() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("gpt-4o", "2.50", "10.00"),
        ("gpt-4o-mini", "0.15", "0.60"),
        ("gpt-4.1", "2.00", "8.00"),
        ("o3-mini", "1.10", "4.40"),
        ("text-embedding-3-small", "0.02", "0"),
    ]
}

/// The configuration the options name: the config file (or the defaults, with the demo
/// prices), then the flags on top.
///
/// # Errors
///
/// When the config file cannot be read or parsed.
pub fn config_for(options: &GatewayOptions) -> Result<Config, ConfigError> {
    let mut config = match &options.config {
        Some(path) => Config::load(path)?,
        None => {
            let mut config = Config::default();
            for (model, input, output) in demo_prices() {
                let price = PriceConfig::per_million(
                    keygate::Money::parse(input).unwrap_or_default(),
                    keygate::Money::parse(output).unwrap_or_default(),
                );
                config.prices.insert(model.to_owned(), price);
            }
            config
        }
    };
    if let Some(store) = &options.store {
        config.store = Some(store.clone());
    }
    if let Some(keys) = &options.keys_file {
        config.keys_file = Some(keys.clone());
    }
    if let Some(counters) = &options.counters {
        (config.counters.url, config.counters.cluster) =
            match keygate_store::RedisTarget::from_list(counters) {
                keygate_store::RedisTarget::Single(url) => (Some(url), Vec::new()),
                keygate_store::RedisTarget::Cluster(nodes) => (None, nodes),
                // `from_list` makes only the two above.
                _ => (None, Vec::new()),
            };
    }
    if let Some(path) = &options.audit_jsonl {
        config.audit.jsonl = Some(JsonlConfig {
            path: path.clone(),
            max_bytes: keygate::audit::DEFAULT_MAX_BYTES,
            keep: keygate::audit::DEFAULT_KEEP,
            capacity: keygate::audit::DEFAULT_CAPACITY,
            fallback_after_secs: keygate::audit::DEFAULT_FALLBACK_AFTER.as_secs(),
        });
    }
    Ok(config)
}

/// The process-wide Prometheus recorder (installed once; later gateways in the same process
/// share it).
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Fixed buckets (seconds): Prometheus histograms add up across gateway replicas,
        // where the exporter's default summaries (quantiles per process) do not.
        // (`set_buckets` refuses only an empty list.)
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if the host installed another recorder: then /metrics shows this one's
        // (empty) view and the host's recorder gets the metrics.
        let _ = metrics::set_global_recorder(recorder);
        keygate::audit::metrics::describe_metrics();
        handle
    })
}

/// The admin side of a gateway: the admin API where its keys are in a database, and
/// `GET /v1/key` where its spend is (see [`admin_for`]).
#[derive(Debug, Clone, Default)]
pub struct AdminRoutes {
    /// `/admin/v1/…`, on the database the keys are served from.
    pub api: Option<keygate_admin::AdminApi>,
    /// `GET /v1/key`, reading spend from the gateway's ledger.
    pub own_key: Option<keygate_admin::AdminApi>,
}

/// The admin routes of a gateway built as `built`, making keys with the config's
/// `key_prefix`: the admin API on its SQLite or PostgreSQL store (none for a key file: its
/// keys are changed in the file), and `GET /v1/key` wherever a ledger is.
///
/// # Errors
///
/// When the SQLite database cannot be opened once more, or the prefix is not one.
pub fn admin_for(built: &Built, key_prefix: &str) -> Result<AdminRoutes, GatewayError> {
    use keygate_admin::{AdminApi, AdminStore};
    let format = keygate::KeyFormat::with_prefix(key_prefix)
        .map_err(|e| GatewayError::Config(ConfigError::Invalid(format!("key_prefix: {e}"))))?;
    let open = |path: &std::path::Path| {
        AdminStore::open_sqlite(path)
            .map_err(|e| GatewayError::Config(ConfigError::Invalid(e.to_string())))
    };
    let source = built.store();
    let store = if let Some(pg) = source.postgres() {
        let store = AdminStore::postgres(pg.db().clone());
        Some(match built.counters() {
            Some(counters) => store.with_counters(counters.clone()),
            None => store,
        })
    } else if let Some(sqlite) = source.sqlite() {
        let store = open(sqlite.path())?;
        // Spend is reset through the ledger this gateway counts in.
        Some(match built.layer().token_limit_layer().backend().ledger() {
            Some(ledger) => store.with_ledger(ledger.clone()),
            None => store,
        })
    } else {
        None
    };
    let api = store.map(|store| {
        AdminApi::new(store)
            .with_key_format(format)
            .with_key_source(source.clone())
            .with_activity(built.activity().clone())
    });
    let own_key = match (&api, built.ledger_path()) {
        (Some(api), _) => Some(api.clone()),
        (None, Some(path)) => {
            Some(AdminApi::new(open(path)?).with_activity(built.activity().clone()))
        }
        (None, None) => None,
    };
    Ok(AdminRoutes { api, own_key })
}

impl AdminRoutes {
    /// The store usage reports are written to.
    fn store(&self) -> Option<&keygate_admin::AdminStore> {
        self.api
            .as_ref()
            .or(self.own_key.as_ref())
            .map(|a| a.store())
    }
}

/// How often the keys' usage per day and model is added to the store.
pub const USAGE_FLUSH: Duration = Duration::from_secs(1);

/// Adds what `activity` counted to `store`; rows it could not write wait for the next time.
async fn flush_usage(activity: &keygate::Activity, store: &keygate_admin::AdminStore) {
    let rows = activity.take_usage();
    if rows.is_empty() {
        return;
    }
    if let Err(error) = store.add_usage(rows.clone()).await {
        tracing::warn!(%error, "writing the keys' usage failed; trying again with the next");
        activity.put_back(rows);
    }
}

/// The gateway's HTTP app: `/healthz` and `/metrics` (unauthenticated), `POST /v1/tokens`
/// (audit → key extraction → request rate → token exchange), `GET /v1/key` (audit → key
/// extraction → request rate → the key's own view), the admin API under `/admin/v1/`, and
/// everything else through the full keygate stack to `upstream`.
pub fn app(built: &Built, upstream: UpstreamProxy, admin: &AdminRoutes) -> Router {
    let layer = built.layer();
    let source = built.store().clone();
    let counters = built.counters().cloned();
    let mut router = Router::new()
        .route(
            "/healthz",
            get(move || {
                let (source, counters) = (source.clone(), counters.clone());
                async move { health(&source, counters.as_ref()).await }
            }),
        )
        .route("/metrics", get(|| async { prometheus().render() }));
    if let Some(exchange) = built.token_exchange() {
        let tokens = ServiceBuilder::new()
            .layer(layer.audit_layer().clone())
            .layer(layer.extract_layer().clone())
            .layer(layer.rate_limit_layer().clone())
            .service(exchange.clone());
        router = router.route("/v1/tokens", post_service(tokens));
    }
    if let Some(own) = &admin.own_key {
        let own_key = ServiceBuilder::new()
            .layer(layer.audit_layer().clone())
            .layer(layer.extract_layer().clone())
            .layer(layer.rate_limit_layer().clone())
            .service(own.own_key_router());
        router = router.route("/v1/key", get_service(own_key));
    }
    match &admin.api {
        Some(api) => router = router.merge(api.router()),
        None => {
            router = router.route(
                "/admin/{*rest}",
                axum::routing::any(|| async {
                    keygate_admin::ApiError {
                        status: http::StatusCode::NOT_IMPLEMENTED,
                        code: "no_admin_store",
                        message: "this gateway serves keys from a key file: change them in the \
                                  file (the admin API needs a database store)"
                            .to_owned(),
                    }
                }),
            );
        }
    }
    router.fallback_service(ServiceBuilder::new().layer(layer.clone()).service(upstream))
}

/// `/healthz`: 200 either way (the gateway still serves from its last good keys), with
/// `{"status":"ok"}`, or `{"status":"degraded", …}` naming what is wrong: `"keys"` while
/// the key source cannot be read, `"counters"` while the shared counters do not answer a
/// ping (requests that need them get 503 meanwhile, or are admitted uncounted with
/// `fail_open`: then `"counters_failed_open"` says how many were). The gauges `keygate_key_source_up` and
/// `keygate_counters_up` say the same to Prometheus.
async fn health(
    source: &keygate::KeySource,
    counters: Option<&keygate::store::RedisBackend>,
) -> axum::Json<serde_json::Value> {
    let keys = source.last_error();
    metrics::gauge!(KEY_SOURCE_UP).set(if keys.is_some() { 0.0 } else { 1.0 });
    let failed_open = counters.map_or(0, |c| c.failed_open());
    let counters = match counters {
        Some(c) => {
            let down = c.ping().await.err().map(|e| e.to_string());
            metrics::gauge!(COUNTERS_UP).set(if down.is_some() { 0.0 } else { 1.0 });
            metrics::counter!(COUNTERS_FAILED_OPEN).absolute(failed_open);
            down
        }
        None => None,
    };
    let mut body = serde_json::json!({ "status": "ok" });
    if failed_open > 0 {
        // Requests admitted uncounted since the start (`fail_open`): limits were not held.
        body["counters_failed_open"] = failed_open.into();
    }
    if let Some(why) = keys {
        body["status"] = "degraded".into();
        body["keys"] = why.into();
    }
    if let Some(why) = counters {
        body["status"] = "degraded".into();
        body["counters"] = why.into();
    }
    axum::Json(body)
}

/// Counter: requests admitted uncounted because the shared counters did not answer (only
/// with `[counters] fail_open = true`).
pub const COUNTERS_FAILED_OPEN: &str = "keygate_counters_failed_open_total";

/// How often settled charges move from the shared counters' outbox to the PostgreSQL ledger.
pub const LEDGER_FLUSH: Duration = Duration::from_millis(250);

/// Gauge: 1 while the shared counters answer, 0 while they do not (set by `/healthz` and
/// every 5 s).
pub const COUNTERS_UP: &str = "keygate_counters_up";

/// Gauge: 1 while the key source reads fine, 0 while the gateway serves from its last good
/// snapshot because the source cannot be read.
pub const KEY_SOURCE_UP: &str = "keygate_key_source_up";

/// The same listener and proxy with no keygate layer: the baseline `scripts/load.sh` compares
/// the full stack against.
pub fn bare_app(upstream: UpstreamProxy) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback_service(upstream)
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    built: Arc<Built>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Drained>,
    background: Vec<JoinHandle<()>>,
    signals: Option<ShutdownSignals>,
    /// Where the keys' usage is written (flushed once more at shutdown).
    usage: Option<keygate_admin::AdminStore>,
}

impl std::fmt::Debug for ShutdownSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownSignals")
    }
}

/// Starts the gateway: loads the config (creating the demo key file if it is the default and
/// missing), chooses the upstreams (`--upstream`, else the config's `[[upstreams]]`, else the
/// embedded mock, started here), binds, and prints the first line
/// `keygate gateway listening on http://ADDR` and then the demo keys to `out`.
///
/// # Errors
///
/// [`GatewayError`] when the configuration, key file, upstream URL or socket is unusable.
pub async fn start(
    options: GatewayOptions,
    out: &mut (dyn Write + Send),
) -> Result<Gateway, GatewayError> {
    let signals = ShutdownSignals::listen();
    let config = config_for(&options)?;
    // With no config and no key file, an empty store is given the demo keys.
    let demo = options.config.is_none() && config.keys_file.is_none();
    let created = match config.store_url()? {
        keygate_store::StoreUrl::Sqlite(path) if demo => demo::create_in_store(&path)?,
        _ => None,
    };
    let built = Arc::new(config.open().await?);
    let mut background = Vec::new();

    let timeouts = config.proxy.timeouts();
    let (upstream, described) = match (&options.upstream, config.proxy()?) {
        (Some(url), _) => {
            let upstream = keygate::proxy::Upstream::new(url)
                .and_then(|u| u.with_provider_key(options.upstream_api_key.as_deref()))
                .map_err(GatewayError::Upstream)?;
            let mut builder = UpstreamProxy::builder()
                .upstream(upstream)
                .timeouts(timeouts)
                .roots(config.proxy.roots);
            if let Some(path) = &config.proxy.extra_ca_file {
                let pem = std::fs::read(path)?;
                builder = builder.extra_ca_pem(pem);
            }
            let proxy = builder.build().map_err(GatewayError::Upstream)?;
            (proxy, url.clone())
        }
        (None, Some(proxy)) => {
            let names: Vec<String> = proxy.upstreams().iter().map(|u| u.url()).collect();
            (proxy, names.join(", "))
        }
        (None, None) => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
            let mock_addr = listener.local_addr()?;
            background.push(tokio::spawn(async move {
                let _ = axum::serve(listener, crate::mock_upstream::router()).await;
            }));
            let proxy = UpstreamProxy::builder()
                .upstream(
                    keygate::proxy::Upstream::new(&format!("http://{mock_addr}"))
                        .map_err(GatewayError::Upstream)?,
                )
                .timeouts(timeouts)
                .build()
                .map_err(GatewayError::Upstream)?;
            (proxy, "the embedded mock OpenAI server".to_owned())
        }
    };

    if let Some(interval) = config.reload_interval() {
        background.push(built.store().watch(interval));
    }
    background.push(reload_on_sighup(built.clone()));
    if let Some(writer) = built.ledger_writer() {
        background.push(writer.clone().run(LEDGER_FLUSH));
    }
    let source = built.store().clone();
    let counters = built.counters().cloned();
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut ticks = 0u64;
        loop {
            tick.tick().await;
            ticks += 1;
            let up = if source.last_error().is_some() {
                0.0
            } else {
                1.0
            };
            metrics::gauge!(KEY_SOURCE_UP).set(up);
            if let Some(counters) = &counters {
                let up = counters.ping().await.is_ok();
                metrics::gauge!(COUNTERS_UP).set(if up { 1.0 } else { 0.0 });
                metrics::counter!(COUNTERS_FAILED_OPEN).absolute(counters.failed_open());
                // Reservations of replicas that died mid-request: settled at what they
                // held once due (calls reap a few as they go; this covers idle periods).
                if up
                    && ticks.is_multiple_of(6)
                    && let Err(error) = counters.reap().await
                {
                    tracing::warn!(%error, "reaping the shared counters' due reservations failed");
                }
            }
            prometheus().run_upkeep();
        }
    }));
    // Install the recorder before the first request is counted.
    let _ = prometheus();

    let admin = admin_for(&built, &config.key_prefix)?;
    let usage = admin.store().cloned();
    if let Some(store) = usage.clone() {
        let activity = built.activity().clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(USAGE_FLUSH);
            loop {
                tick.tick().await;
                flush_usage(&activity, &store).await;
            }
        }));
    }
    let listener = server::bind(options.listen)?;
    let addr = listener.local_addr()?;
    let app = if options.without_keygate {
        bare_app(upstream)
    } else {
        app(&built, upstream, &admin)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = ServerSettings::from(&config.server);
    let cut_switch = built.layer().audit_layer().shutdown_switch();
    let server = tokio::spawn(async move {
        server::serve(
            listener,
            app,
            settings,
            async {
                let _ = stopped.await;
            },
            move || {
                tracing::warn!(
                    "keygate gateway: drain deadline passed; closing the connections left"
                );
                cut_switch.cut_in_flight();
            },
        )
        .await
    });

    writeln!(out, "keygate gateway listening on http://{addr}")?;
    if options.without_keygate {
        writeln!(
            out,
            "WARNING: --without-keygate: no key is checked, for load measurements only"
        )?;
    }
    writeln!(out, "upstream: {described}")?;
    let source = built.store().describe();
    if demo {
        demo::print(out, addr, &source, created.as_deref())?;
    } else {
        writeln!(out, "keys: {source}")?;
    }
    out.flush()?;

    Ok(Gateway {
        addr,
        built,
        stop: Some(stop),
        server,
        background,
        signals: Some(signals),
        usage,
    })
}

fn reload_on_sighup(built: Arc<Built>) -> JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match built.store().reload().await {
                    Ok(outcome) => tracing::info!(?outcome, "SIGHUP: keys reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: reloading the keys failed; the previous keys stay in use");
                    }
                }
            }
        }
        #[cfg(not(unix))]
        drop(built);
    })
}

impl Gateway {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The built stack (layer, key store, audit file).
    pub fn built(&self) -> &Built {
        &self.built
    }

    /// Adds the keys' usage counted so far to the store now, rather than at the next of the
    /// flushes made every [`USAGE_FLUSH`].
    pub async fn flush_usage(&self) {
        if let Some(store) = &self.usage {
            flush_usage(self.built.activity(), store).await;
        }
    }

    /// Stops accepting connections, lets requests in flight finish until the drain deadline
    /// (`[server] drain_timeout_secs`), cuts what is left (audited as cut by shutdown),
    /// flushes the audit file and stops the background tasks.
    pub async fn shutdown(mut self) -> Drained {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let drained = (&mut self.server).await.unwrap_or(Drained { cut: 0 });
        self.built.flush().await;
        self.flush_usage().await;
        for task in &self.background {
            task.abort();
        }
        drained
    }

    /// Serves until Ctrl-C or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(mut self) -> Drained {
        if let Some(signals) = self.signals.take() {
            signals.recv().await;
        }
        eprintln!("keygate gateway: shutting down (draining requests, flushing audit)");
        let drained = self.shutdown().await;
        if drained.cut > 0 {
            eprintln!(
                "keygate gateway: {} connection(s) cut at the drain deadline",
                drained.cut
            );
        }
        drained
    }
}

/// SIGTERM and SIGINT, listened for from the moment the gateway starts (before it binds), so a
/// signal that comes while it is starting is never the default "terminate at once".
struct ShutdownSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            ShutdownSignals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    async fn recv(mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
