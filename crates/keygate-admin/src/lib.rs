//! The keygate admin API: every key's rights, models, limits and spend, read and changed over
//! JSON under `/admin/v1/`, and a key holder's own `GET /v1/key`.
//!
//! [`AdminApi::router`] is an axum [`Router`] to mount in the gateway or in any
//! axum app. It reads and changes the keygate database ([`AdminStore`]: SQLite or
//! PostgreSQL); a gateway serving from the same database sees each change at once (with
//! [`AdminApi::with_key_source`]) or at its next poll.
//!
//! **Admin keys** (`kg-admin-…`) are their own kind of credential, made with
//! `keygate admin-keys create` and stored as digests. Each has a scope
//! ([`AdminScope`](keygate_core::admin::AdminScope)): `read` or `manage`, of every project or
//! of some. A data-plane key is refused with 401 on every admin route, and an admin key is
//! refused with 401 on every model route (it is not a key there). Every change is recorded,
//! in the same transaction, as an [`AdminEvent`](keygate_core::admin::AdminEvent): who, what,
//! the record before and after, never a secret nor a digest (`GET /admin/v1/events`).
//!
//! Routes (all JSON; errors in OpenAI's shape `{"error": {"message", "type", "code"}}`; the
//! whole description at `GET /admin/v1/openapi.json`):
//!
//! | Route | Scope |
//! |---|---|
//! | `GET /admin/v1/me` | any |
//! | `GET /admin/v1/projects`, `GET /admin/v1/projects/{id}` | read |
//! | `POST /admin/v1/projects` | manage (every project) |
//! | `PATCH /admin/v1/projects/{id}` | manage (that project) |
//! | `GET /admin/v1/projects/{id}/spend`, `POST …/spend/reset` | read, manage (that project) |
//! | `GET /admin/v1/keys?project=&status=&prefix=&after=&limit=` | read |
//! | `POST /admin/v1/keys` (the secret is in this response only) | manage |
//! | `GET`, `PATCH /admin/v1/keys/{id}` | read, manage |
//! | `POST /admin/v1/keys/{id}/rotate`, `/disable`, `/enable`, `/revoke` | manage |
//! | `GET /admin/v1/keys/{id}/spend`, `/usage?days=`, `/decisions`, `/events` | read |
//! | `POST /admin/v1/keys/{id}/spend/reset` (`{"model"?, "period"?}`) | manage |
//! | `GET /admin/v1/events?target=&before=&limit=` | read |
//! | `GET`, `POST /admin/v1/admin-keys`, `POST /admin/v1/admin-keys/{id}/revoke` | manage (every project) |
//!
//! A key outside an admin key's projects is answered 404, as one that does not exist.
//!
//! **The web console** at `/admin/` (same router): log in with an admin key (a session
//! cookie, `HttpOnly`, `SameSite=Strict`, `Secure` with [`AdminApi::with_secure_cookies`]),
//! then the keys list (status, expiry, budget and spend, last use), a key's page (one row
//! per model rule with its limit, spend and what remains; endpoint-group rights; rates and
//! address ranges; spend per day over 30 days; recent requests; changes), and forms to
//! create (the secret shown once), edit, set a per-model limit, rotate, disable, re-enable
//! and revoke. Server-rendered (maud), plain forms that work without JavaScript, a CSRF
//! token in every form, and [`CSP`] on every page; assets are embedded.
//!
//! ```no_run
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keygate_admin::{AdminApi, AdminStore};
//!
//! let api = AdminApi::new(AdminStore::open_sqlite("keygate.db")?);
//! // Serve it with axum::serve, or merge it into the app's own router.
//! let app: axum::Router = axum::Router::new().merge(api.router());
//! # let _ = app;
//! # Ok(()) }
//! ```

mod api;
mod console;
mod error;
mod spend;
mod store;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use keygate::KeySource;
use keygate_core::{Clock, KeyFormat};

pub use api::{Caller, DEFAULT_PAGE, MAX_GRACE, MAX_USAGE_DAYS};
pub use console::{CSP, MAX_SESSIONS, SESSION_COOKIE, SESSION_TTL};
pub use error::ApiError;
pub use spend::{BudgetReset, BudgetUse, key_budgets, period_name};
pub use store::AdminStore;
pub use views::{KEY_FIELDS, PROJECT_FIELDS, key_status};

/// The OpenAPI 3.1 description of the admin API, as served at `/admin/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The admin API over one keygate database.
#[derive(Debug, Clone)]
pub struct AdminApi {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    store: AdminStore,
    clock: Clock,
    key_format: KeyFormat,
    source: Option<KeySource>,
    activity: Option<keygate::Activity>,
    sessions: Arc<console::Sessions>,
    secure_cookies: bool,
}

impl AdminApi {
    /// The API over `store`, on the system clock, making keys in the default format.
    pub fn new(store: AdminStore) -> Self {
        AdminApi {
            inner: Arc::new(Inner {
                store,
                clock: Clock::system(),
                key_format: KeyFormat::default(),
                source: None,
                activity: None,
                sessions: Arc::default(),
                secure_cookies: false,
            }),
        }
    }

    /// With another clock (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        Arc::make_mut(&mut self.inner).clock = clock;
        self
    }

    /// Making keys in `format` (the gateway's `key_prefix`).
    #[must_use]
    pub fn with_key_format(mut self, format: KeyFormat) -> Self {
        Arc::make_mut(&mut self.inner).key_format = format;
        self
    }

    /// Reloading `source` after each change, so a gateway in this process serves it at
    /// once rather than at its next poll.
    #[must_use]
    pub fn with_key_source(mut self, source: KeySource) -> Self {
        Arc::make_mut(&mut self.inner).source = Some(source);
        self
    }

    /// Showing the recent decisions `activity` keeps (the gateway's, in this process).
    #[must_use]
    pub fn with_activity(mut self, activity: keygate::Activity) -> Self {
        Arc::make_mut(&mut self.inner).activity = Some(activity);
        self
    }

    /// Marking the console's session cookie `Secure` (send it over HTTPS only): set it when
    /// browsers reach the console over TLS (a proxy in front terminating it).
    #[must_use]
    pub fn with_secure_cookies(mut self, secure: bool) -> Self {
        Arc::make_mut(&mut self.inner).secure_cookies = secure;
        self
    }

    /// The store.
    pub fn store(&self) -> &AdminStore {
        &self.inner.store
    }

    /// The admin API: `/admin/v1/…`.
    pub fn router(&self) -> Router {
        let authenticated = Router::new()
            .route("/admin/v1/me", get(api::me))
            .route(
                "/admin/v1/projects",
                get(api::list_projects).post(api::create_project),
            )
            .route("/admin/v1/projects/{id}/spend", get(api::project_spend))
            .route(
                "/admin/v1/projects/{id}/spend/reset",
                post(api::reset_project_spend),
            )
            .route(
                "/admin/v1/projects/{id}",
                get(api::get_project).patch(api::update_project),
            )
            .route("/admin/v1/keys", get(api::list_keys).post(api::create_key))
            .route(
                "/admin/v1/keys/{id}",
                get(api::get_key).patch(api::update_key),
            )
            .route("/admin/v1/keys/{id}/rotate", post(api::rotate_key))
            .route("/admin/v1/keys/{id}/disable", post(api::disable_key))
            .route("/admin/v1/keys/{id}/enable", post(api::enable_key))
            .route("/admin/v1/keys/{id}/revoke", post(api::revoke_key))
            .route("/admin/v1/keys/{id}/spend", get(api::key_spend))
            .route(
                "/admin/v1/keys/{id}/spend/reset",
                post(api::reset_key_spend),
            )
            .route("/admin/v1/keys/{id}/events", get(api::key_events))
            .route("/admin/v1/keys/{id}/usage", get(api::key_usage))
            .route("/admin/v1/keys/{id}/decisions", get(api::key_decisions))
            .route("/admin/v1/events", get(api::list_events))
            .route(
                "/admin/v1/admin-keys",
                get(api::list_admin_keys).post(api::create_admin_key),
            )
            .route(
                "/admin/v1/admin-keys/{id}/revoke",
                post(api::revoke_admin_key),
            )
            .route("/admin/v1/{*rest}", axum::routing::any(api::not_found))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                api::authenticate,
            ))
            .with_state(self.clone());
        Router::new()
            .route(
                "/admin/v1/openapi.json",
                get(|| async { ([(http::header::CONTENT_TYPE, "application/json")], OPENAPI) }),
            )
            .merge(authenticated)
            .merge(console::routes(self))
    }

    /// `GET /v1/key`: the calling key's own rights, limits and remaining budgets. Mount it
    /// behind keygate's key extraction (which puts the caller's
    /// [`Principal`](keygate_core::Principal) in the request); without one it answers 401.
    pub fn own_key_router(&self) -> Router {
        Router::new()
            .route("/v1/key", get(api::own_key))
            .with_state(self.clone())
    }
}
