//! The web console at `/admin/`: server-rendered HTML (maud), plain forms that work without
//! JavaScript, a session cookie made by logging in with an admin key, a CSRF token in every
//! form, and a strict Content-Security-Policy. The only script (embedded, like the style
//! sheet) adds a copy button next to a new secret.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use keygate_core::admin::admin_key_format;
use keygate_core::{
    Access, Condition, KeyDigest, KeyFormat, KeyRecord, Money, Permissions, ProjectRecord,
    Timestamp,
};
use keygate_store::{EventQuery, KeyQuery, KeyStatus, StoredKey};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AdminApi;
use crate::api::{Caller, DEFAULT_PAGE, date_of, disable_reason, usage_rows};
use crate::error::ApiError;
use crate::spend::{BudgetUse, Owner, budgets, budgets_of, period_name};
use crate::views::key_status;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "kg_admin";

/// How long a session lasts after logging in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The most sessions kept at once (the oldest go first).
pub const MAX_SESSIONS: usize = 10_000;

/// The Content-Security-Policy of every console page: nothing but this origin's own style
/// sheet and script, no inline code, no framing, forms posting only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// A logged-in browser: which admin key, its CSRF token, and until when.
#[derive(Debug, Clone)]
struct Session {
    admin: KeyDigest,
    csrf: String,
    expires: Timestamp,
}

/// The console's sessions, by the digest of their cookie (in this process's memory: a
/// restart, or another replica, asks to log in again).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<KeyDigest, Session>>,
}

fn session_format() -> KeyFormat {
    KeyFormat::with_prefix("kg-session-").unwrap_or_default()
}

impl Sessions {
    fn start(&self, admin: KeyDigest, now: Timestamp) -> Result<(String, String), ApiError> {
        let cookie = session_format().generate().map_err(random_failed)?;
        let csrf = session_format().generate().map_err(random_failed)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            cookie.digest(),
            Session {
                admin,
                csrf: csrf.expose().to_owned(),
                expires: now.saturating_add(SESSION_TTL),
            },
        );
        Ok((cookie.expose().to_owned(), csrf.expose().to_owned()))
    }

    fn get(&self, cookie: &str, now: Timestamp) -> Option<Session> {
        let digest = session_format().parse(cookie).ok()?;
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&digest).filter(|s| s.expires > now).cloned()
    }

    fn end(&self, cookie: &str) {
        if let Ok(digest) = session_format().parse(cookie) {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.remove(&digest);
        }
    }
}

fn random_failed(e: keygate_core::RandomError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "no_randomness",
        e.to_string(),
    )
}

/// The caller of a console request, with its session's CSRF token.
struct Visitor {
    caller: Caller,
    csrf: String,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a state-changing request comes from this console's own pages: a browser says
/// where a request comes from (`Sec-Fetch-Site`, `Origin`); one from another site is refused.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => {
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
        (Some(_), None) => false,
        // Not a browser, or one that says nothing: the CSRF token decides.
        (None, _) => true,
    }
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl AdminApi {
    /// The logged-in visitor, or why not (a redirect to the login page).
    async fn visitor(&self, headers: &HeaderMap) -> Result<Visitor, Response> {
        let now = self.inner.clock.now();
        let to_login = || Redirect::to("/admin/login").into_response();
        let session = cookie(headers, SESSION_COOKIE)
            .and_then(|c| self.inner.sessions.get(c, now))
            .ok_or_else(to_login)?;
        // The admin key is checked at every request: a revoked one ends its sessions.
        match self.inner.store.admin_key_by_digest(session.admin).await {
            Ok(Some(key)) if key.revoked_at.is_none() => Ok(Visitor {
                caller: Caller {
                    id: key.id,
                    name: key.name,
                    scope: key.scope,
                },
                csrf: session.csrf,
            }),
            Ok(_) => Err(to_login()),
            Err(e) => Err(page_error(ApiError::from(e))),
        }
    }

    /// The visitor of a form post whose CSRF token and origin check out.
    async fn poster(&self, headers: &HeaderMap, form: &Form) -> Result<Visitor, Response> {
        let visitor = self.visitor(headers).await?;
        let token = form.one("csrf").unwrap_or_default();
        if !same_origin(headers) || !same_token(token, &visitor.csrf) {
            return Err(page_error(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "this form is stale or was not sent from the console: reload the page and try again",
            )));
        }
        Ok(visitor)
    }
}

impl AdminApi {
    /// A form post's fields and its visitor, once the form is read and its CSRF token and
    /// origin check out.
    async fn posted(&self, headers: &HeaderMap, body: &Bytes) -> Result<(Form, Visitor), Response> {
        let form = Form::parse(body).map_err(page_error)?;
        let visitor = self.poster(headers, &form).await?;
        Ok((form, visitor))
    }
}

/// After a change to key `id`: back to its page, or the error.
fn back_or_error<T>(result: Result<T, ApiError>, id: &str) -> Response {
    match result {
        Ok(_) => back_to(id),
        Err(e) => page_error(e),
    }
}

/// A URL-encoded form's fields, in order (a field may repeat).
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &Bytes) -> Result<Form, ApiError> {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
            .map(Form)
            .map_err(|_| ApiError::bad_request("the form could not be read"))
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

/// Security headers of every console response.
fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html_page(status: StatusCode, markup: Markup) -> Response {
    secure(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            markup.into_string(),
        )
            .into_response(),
    )
}

fn page_error(e: ApiError) -> Response {
    let status = e.status;
    html_page(
        status,
        layout(
            "Error",
            None,
            html! {
                h1 { "Not done" }
                p.error role="alert" { (e.message) }
                p { a href="javascript:history.back()" { "Back" } " · " a href="/admin/keys" { "Keys" } }
            },
        ),
    )
}

fn layout(title: &str, visitor: Option<&Visitor>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keygate" }
                link rel="stylesheet" href="/admin/assets/console.css";
                script src="/admin/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/admin/keys" { "keygate" }
                    @if let Some(v) = visitor {
                        nav {
                            a href="/admin/keys" { "Keys" }
                            a href="/admin/keys/new" { "New key" }
                        }
                        form.logout method="post" action="/admin/logout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            span.who { (v.caller.name) " (" (v.caller.scope) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The console's routes, under `/admin/`.
pub(crate) fn routes(api: &AdminApi) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/admin", get(|| async { Redirect::to("/admin/keys") }))
        .route("/admin/", get(|| async { Redirect::to("/admin/keys") }))
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/keys", get(keys_page).post(create_key))
        .route("/admin/keys/new", get(new_key_page))
        .route("/admin/keys/{id}", get(key_page))
        .route("/admin/keys/{id}/edit", get(edit_page).post(edit))
        .route("/admin/keys/{id}/limits", post(add_limit))
        .route("/admin/keys/{id}/limits/remove", post(remove_limit))
        .route("/admin/keys/{id}/policies", post(add_policy))
        .route("/admin/keys/{id}/policies/remove", post(remove_policy))
        .route("/admin/keys/{id}/{action}", post(key_action))
        .route(
            "/admin/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/admin/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .with_state(api.clone())
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, kind)], text).into_response();
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

// ---- login ----

async fn login_page() -> Response {
    html_page(StatusCode::OK, login_form(None))
}

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/admin/login" {
                label for="admin_key" { "Admin key" }
                input #admin_key type="password" name="admin_key" autocomplete="off" required
                    placeholder="kg-admin-…";
                button type="submit" { "Log in" }
            }
            p.hint { "Make one with " code { "keygate admin-keys create --name NAME --scope manage" } "." }
        },
    )
}

async fn login(State(api): State<AdminApi>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(e) => return page_error(e),
    };
    if !same_origin(&headers) {
        return page_error(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "log in from the console's own page",
        ));
    }
    let Some(secret) = form.one("admin_key") else {
        return html_page(
            StatusCode::UNAUTHORIZED,
            login_form(Some("Give an admin key.")),
        );
    };
    if api.caller(Some(secret)).await.is_err() {
        return html_page(
            StatusCode::UNAUTHORIZED,
            login_form(Some("That is not a live admin key.")),
        );
    }
    let Ok(digest) = admin_key_format().parse(secret) else {
        return html_page(StatusCode::UNAUTHORIZED, login_form(None));
    };
    let (cookie, _) = match api.inner.sessions.start(digest, api.inner.clock.now()) {
        Ok(s) => s,
        Err(e) => return page_error(e),
    };
    let secure_flag = if api.inner.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let mut response = Redirect::to("/admin/keys").into_response();
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={cookie}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}{secure_flag}",
        SESSION_TTL.as_secs()
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    secure(response)
}

async fn logout(State(api): State<AdminApi>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(e) => return page_error(e),
    };
    if let Err(r) = api.poster(&headers, &form).await {
        return r;
    }
    if let Some(c) = cookie(&headers, SESSION_COOKIE) {
        api.inner.sessions.end(c);
    }
    let mut response = Redirect::to("/admin/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kg_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    secure(response)
}

// ---- the keys list ----

#[derive(Debug, Deserialize)]
struct ListQuery {
    project: Option<String>,
    status: Option<String>,
    prefix: Option<String>,
    after: Option<String>,
}

/// A time as people read it: `2026-12-02 10:39 UTC`.
fn when(t: Timestamp) -> String {
    let text = t.to_string();
    match (text.get(..10), text.get(11..16)) {
        (Some(date), Some(time)) => format!("{date} {time} UTC"),
        _ => text,
    }
}

fn when_or(t: Option<Timestamp>, none: &str) -> String {
    t.map_or_else(|| none.to_owned(), when)
}

fn money(m: Money) -> String {
    m.to_string()
}

/// A budget's use as a `<meter>` and the same in words (readable without colour).
fn budget_bar(b: &BudgetUse) -> Markup {
    let used = b.limit.as_nanos().saturating_sub(b.remaining.as_nanos());
    let pct = if b.limit.as_nanos() == 0 {
        100
    } else {
        used.saturating_mul(100) / b.limit.as_nanos()
    };
    html! {
        meter min="0" max=(b.limit.as_nanos()) value=(used) high=(b.limit.as_nanos() / 10 * 9)
            title=(format!("{pct}% used")) {}
        span.figures { (money(Money::from_nanos(used))) " of " (money(b.limit)) " / " (b.period) " (" (pct) "%)" }
    }
}

fn status_text(k: &StoredKey, now: Timestamp) -> Markup {
    let status = key_status(&k.record, now);
    html! {
        span class={"status " (status)} { (status) }
        @if let Some(reason) = &k.disabled_reason { span.reason { " — " (reason) } }
    }
}

async fn keys_page(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let visitor = match api.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut query = KeyQuery::new(DEFAULT_PAGE);
    query.project = q.project.clone().filter(|p| !p.is_empty());
    query.within = visitor.caller.scope.projects.clone();
    query.status = match q.status.as_deref() {
        Some("active") => Some(KeyStatus::Active),
        Some("disabled") => Some(KeyStatus::Disabled),
        Some("revoked") => Some(KeyStatus::Revoked),
        _ => None,
    };
    query.prefix = q.prefix.clone().filter(|p| !p.is_empty());
    query.after = q.after.clone().filter(|p| !p.is_empty());
    let page = match api.inner.store.list_keys(query).await {
        Ok(p) => p,
        Err(e) => return page_error(e.into()),
    };
    let projects = api.inner.store.projects().await.unwrap_or_default();
    let now = api.inner.clock.now();
    // Each key's own budget over every model, when it has one: the whole page in one read.
    let owners: Vec<Owner<'_>> = page.keys.iter().map(|k| Owner::key(&k.record)).collect();
    let uses = budgets_of(&api.inner.store, &owners, now)
        .await
        .unwrap_or_default();
    let rows: Vec<_> = page
        .keys
        .iter()
        .map(|k| {
            let total = uses
                .iter()
                .find(|b| b.owner == k.record.id.as_str() && b.model == "*")
                .cloned();
            (k, total)
        })
        .collect();
    let prefix = api.inner.key_format.prefix().to_owned();
    let next = page.more.then(|| {
        let last = page
            .keys
            .last()
            .map(|k| k.record.id.to_string())
            .unwrap_or_default();
        format!(
            "/admin/keys?project={}&status={}&prefix={}&after={last}",
            q.project.as_deref().unwrap_or(""),
            q.status.as_deref().unwrap_or(""),
            q.prefix.as_deref().unwrap_or(""),
        )
    });
    let body = html! {
        h1 { "Keys" }
        form.filters method="get" action="/admin/keys" {
            label { "Project "
                select name="project" {
                    option value="" { "all" }
                    @for p in projects.iter().filter(|p| visitor.caller.scope.may_read(&p.id)) {
                        option value=(p.id) selected[q.project.as_deref() == Some(p.id.as_str())] { (p.id) }
                    }
                }
            }
            label { "Status "
                select name="status" {
                    @for s in ["", "active", "disabled", "revoked"] {
                        option value=(s) selected[q.status.as_deref().unwrap_or("") == s] { (if s.is_empty() { "any" } else { s }) }
                    }
                }
            }
            label { "Name or id starts with " input type="search" name="prefix" value=(q.prefix.as_deref().unwrap_or("")); }
            button type="submit" { "Show" }
        }
        @if rows.is_empty() {
            p { "No keys here." }
        } @else {
            table.keys {
                thead { tr {
                    th { "Name" } th { "Key" } th { "Project" } th { "Status" } th { "Expires" }
                    th { "Budget and spend" } th { "Last used" }
                } }
                tbody {
                    @for (k, total) in &rows {
                        tr {
                            td data-label="Name" { a href=(format!("/admin/keys/{}", k.record.id)) { (if k.record.name.is_empty() { "(no name)" } else { k.record.name.as_str() }) } }
                            td data-label="Key" { code { (prefix) "…" } " " small { (k.record.id) } }
                            td data-label="Project" { (k.record.project) }
                            td data-label="Status" { (status_text(k, now)) }
                            td data-label="Expires" { (when_or(k.record.expires_at, "never")) }
                            td data-label="Budget" {
                                @match total {
                                    Some(b) => (budget_bar(b)),
                                    None => "no limit",
                                }
                            }
                            td data-label="Last used" { (when_or(k.last_used_at, "never")) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next { p { a rel="next" href=(next) { "Next page →" } } }
    };
    html_page(StatusCode::OK, layout("Keys", Some(&visitor), body))
}

// ---- creating a key ----

const PERIODS: [&str; 4] = ["day", "week", "month", "lifetime"];

fn key_fields(v: &Visitor, projects: &[ProjectRecord], key: Option<&KeyRecord>) -> Markup {
    let list = |items: Option<Vec<String>>| items.map(|v| v.join(", ")).unwrap_or_default();
    let allow = list(key.and_then(|k| {
        k.models
            .allow
            .as_ref()
            .map(|a| a.iter().map(ToString::to_string).collect())
    }));
    let deny = list(key.map(|k| k.models.deny.iter().map(ToString::to_string).collect()));
    let ips = list(key.map(|k| k.allowed_ips.iter().map(ToString::to_string).collect()));
    let groups = list(key.map(|k| k.groups.clone()));
    let labels = list(key.map(|k| k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect()));
    let policies = key.map_or_else(String::new, |k| {
        k.policies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (perm, scopes) = match key.map(|k| &k.permissions) {
        Some(Permissions::All) | None => ("all", String::new()),
        Some(Permissions::ReadOnly) => ("read_only", String::new()),
        Some(Permissions::Restricted(map)) => (
            "restricted",
            map.iter()
                .map(|(g, a)| format!("{g}={}", access_name(*a)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    };
    html! {
        @if key.is_none() {
            label for="project" { "Project" }
            select #project name="project" required {
                @for p in projects.iter().filter(|p| v.caller.scope.may_manage(&p.id)) {
                    option value=(p.id) { (p.id) }
                }
            }
        }
        label for="name" { "Name" }
        input #name name="name" value=(key.map_or("", |k| k.name.as_str()));
        fieldset {
            legend { "What it may do" }
            @for (value, text) in [("all", "everything"), ("read_only", "read only"), ("restricted", "only the groups below")] {
                label.inline { input type="radio" name="permissions" value=(value) checked[perm == value]; " " (text) }
            }
            label for="scopes" { "Groups (restricted): GROUP=none|read|write, comma-separated" }
            input #scopes name="scopes" value=(scopes) placeholder="chat.completions=write, models=read";
        }
        label for="allow_models" { "Allowed models (patterns, comma-separated; empty: all)" }
        input #allow_models name="allow_models" value=(allow) placeholder="gpt-4o-mini, gpt-4o*";
        label for="deny_models" { "Denied models" }
        input #deny_models name="deny_models" value=(deny);
        @if key.is_none() {
            fieldset {
                legend { "Budget over every model (optional)" }
                label.inline { "$ " input name="budget_amount" inputmode="decimal" size="8"; }
                label.inline { " per "
                    select name="budget_period" { @for p in PERIODS { option value=(p) selected[p == "month"] { (p) } } }
                }
            }
        }
        label for="rpm" { "Requests per minute (empty: no limit)" }
        input #rpm name="rpm" inputmode="numeric" value=(key.and_then(|k| k.limits.requests_per_minute).map(|n| n.to_string()).unwrap_or_default());
        label for="tpm" { "Tokens per minute" }
        input #tpm name="tpm" inputmode="numeric" value=(key.and_then(|k| k.limits.tokens_per_minute).map(|n| n.to_string()).unwrap_or_default());
        label for="allowed_ips" { "Client address ranges (CIDR, comma-separated; empty: any)" }
        input #allowed_ips name="allowed_ips" value=(ips);
        label for="expires_at" { "Expires (RFC 3339, UTC; empty: never)" }
        input #expires_at name="expires_at" value=(key.and_then(|k| k.expires_at).map(|t| t.to_string()).unwrap_or_default()) placeholder="2027-01-01T00:00:00Z";
        label for="groups" { "Holder's groups" }
        input #groups name="groups" value=(groups);
        label for="labels" { "Labels (KEY=VALUE, comma-separated)" }
        input #labels name="labels" value=(labels);
        label for="policies" { "Conditions, one per line (" code { "members_only research models=o1*" } ", " code { "time_window mon-fri 09:00-17:00" } ", " code { "require_label env=prod" } ", " code { "require_group ml" } ")" }
        textarea #policies name="policies" rows="3" { (policies) }
    }
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::None => "none",
        Access::Read => "read",
        _ => "write",
    }
}

fn split_list(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The settable fields a key form gives, as a merge patch.
fn form_patch(form: &Form) -> Result<Map<String, Value>, ApiError> {
    let mut patch = Map::new();
    patch.insert("name".into(), form.one("name").unwrap_or_default().into());
    let permissions = match form.one("permissions") {
        Some("read_only") => json!("read_only"),
        Some("restricted") => {
            let mut groups = Map::new();
            for item in split_list(form.one("scopes")) {
                let (group, access) = item.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(format!("{item:?}: give GROUP=none|read|write"))
                })?;
                groups.insert(group.trim().to_owned(), access.trim().into());
            }
            json!({ "restricted": groups })
        }
        _ => json!("all"),
    };
    patch.insert("permissions".into(), permissions);
    let allow = split_list(form.one("allow_models"));
    let deny = split_list(form.one("deny_models"));
    let mut models = Map::new();
    if !allow.is_empty() {
        models.insert("allow".into(), allow.into());
    }
    if !deny.is_empty() {
        models.insert("deny".into(), deny.into());
    }
    patch.insert("models".into(), Value::Object(models));
    let ips = split_list(form.one("allowed_ips"));
    patch.insert(
        "allowed_ips".into(),
        if ips.is_empty() {
            Value::Null
        } else {
            ips.into()
        },
    );
    let groups = split_list(form.one("groups"));
    patch.insert(
        "groups".into(),
        if groups.is_empty() {
            Value::Null
        } else {
            groups.into()
        },
    );
    let mut labels = Map::new();
    for item in split_list(form.one("labels")) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| ApiError::bad_request(format!("label {item:?}: give KEY=VALUE")))?;
        labels.insert(k.trim().to_owned(), v.trim().into());
    }
    patch.insert(
        "labels".into(),
        if labels.is_empty() {
            Value::Null
        } else {
            Value::Object(labels)
        },
    );
    patch.insert(
        "expires_at".into(),
        form.one("expires_at").map_or(Value::Null, Into::into),
    );
    let policies = form_policies(form.one("policies").unwrap_or_default())?;
    patch.insert(
        "policies".into(),
        if policies.is_empty() {
            Value::Null
        } else {
            serde_json::to_value(policies).unwrap_or(Value::Null)
        },
    );
    Ok(patch)
}

/// Conditions written one per line.
fn form_policies(text: &str) -> Result<Vec<Condition>, ApiError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<Condition>()
                .map_err(|e| ApiError::bad_request(format!("condition {l:?}: {e}")))
        })
        .collect()
}

/// `limits` with the form's request and token rates.
fn form_rates(form: &Form, mut limits: Value) -> Result<Value, ApiError> {
    let obj = limits
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("limits are not an object"))?;
    for (field, name) in [("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute")] {
        match form.one(field) {
            None => {
                obj.remove(name);
            }
            Some(text) => {
                let n: u64 = text.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::bad_request(format!("{field}: a whole number above 0"))
                })?;
                obj.insert(name.to_owned(), n.into());
            }
        }
    }
    Ok(limits)
}

async fn new_key_page(State(api): State<AdminApi>, headers: HeaderMap) -> Response {
    let visitor = match api.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let projects = api.inner.store.projects().await.unwrap_or_default();
    let body = html! {
        h1 { "New key" }
        form.stacked method="post" action="/admin/keys" {
            input type="hidden" name="csrf" value=(visitor.csrf);
            (key_fields(&visitor, &projects, None))
            button type="submit" { "Create key" }
        }
    };
    html_page(StatusCode::OK, layout("New key", Some(&visitor), body))
}

/// The page that shows a new secret, the only time it is shown.
fn secret_page(visitor: &Visitor, key: &StoredKey, secret: &str, what: &str) -> Response {
    let body = html! {
        h1 { (what) }
        p.notice role="status" { "Copy the secret now: this is the only time it is shown. keygate keeps only its digest." }
        div.secret {
            input #secret type="text" readonly value=(secret) aria-label="The secret" size="50";
            button type="button" data-copy="secret" hidden { "Copy" }
        }
        p { a href=(format!("/admin/keys/{}", key.record.id)) { "Go to the key " (key.record.id) } }
    };
    html_page(StatusCode::OK, layout(what, Some(visitor), body))
}

async fn create_key(State(api): State<AdminApi>, headers: HeaderMap, body: Bytes) -> Response {
    let (form, visitor) = match api.posted(&headers, &body).await {
        Ok(posted) => posted,
        Err(r) => return r,
    };
    let made = async {
        let mut fields = form_patch(&form)?;
        fields.insert(
            "project".into(),
            form.one("project").unwrap_or_default().into(),
        );
        let mut limits = form_rates(&form, json!({}))?;
        if let Some(amount) = form.one("budget_amount") {
            let period = form.one("budget_period").unwrap_or("month");
            limits["budgets"] = json!([{ "amount": amount, "period": period }]);
        }
        fields.insert("limits".into(), limits);
        api.create_key(&visitor.caller, fields).await
    };
    match made.await {
        Ok((key, secret)) => secret_page(&visitor, &key, &secret, "Key created"),
        Err(e) => page_error(e),
    }
}

// ---- one key ----

/// One row of the models table: a model rule and the money limit on it.
struct ModelRow {
    pattern: String,
    access: &'static str,
    whom: String,
    budget: Option<BudgetUse>,
    /// Which budget of the key it is (for the remove button).
    index: Option<usize>,
}

fn model_rows(
    key: &KeyRecord,
    project: Option<&ProjectRecord>,
    uses: &[BudgetUse],
) -> Vec<ModelRow> {
    let mut rows = Vec::new();
    let use_of = |pattern: &str, period: &str| {
        uses.iter()
            .find(|b| b.scope == "key" && b.model == pattern && b.period == period)
            .cloned()
    };
    // Members-only conditions of the key and its project: who may use each model rule.
    let conditions: Vec<&Condition> = project
        .map(|p| p.policies.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(&key.policies)
        .collect();
    let whom = |pattern: &str| {
        let groups = Condition::reserved_to(conditions.iter().copied(), pattern);
        if groups.is_empty() {
            "everyone".to_owned()
        } else {
            format!("members of {}", groups.join(", "))
        }
    };
    let patterns: Vec<String> = match &key.models.allow {
        Some(allow) => allow.iter().map(ToString::to_string).collect(),
        None => vec!["*".to_owned()],
    };
    for pattern in &patterns {
        let limited: Vec<(usize, &keygate_core::Budget)> = key
            .limits
            .budgets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.model.as_ref().map_or("*", |m| m.as_str()) == pattern)
            .collect();
        if limited.is_empty() {
            rows.push(ModelRow {
                pattern: pattern.clone(),
                access: "allowed",
                whom: whom(pattern),
                budget: None,
                index: None,
            });
        }
        for (i, b) in limited {
            rows.push(ModelRow {
                pattern: pattern.clone(),
                access: "allowed",
                whom: whom(pattern),
                budget: use_of(pattern, period_name(b.period)),
                index: Some(i),
            });
        }
    }
    // Budgets on models the allow list does not name as such.
    for (i, b) in key.limits.budgets.iter().enumerate() {
        let pattern = b.model.as_ref().map_or("*", |m| m.as_str());
        if !patterns.iter().any(|p| p == pattern) {
            rows.push(ModelRow {
                pattern: pattern.to_owned(),
                access: "allowed",
                whom: whom(pattern),
                budget: use_of(pattern, period_name(b.period)),
                index: Some(i),
            });
        }
    }
    for pattern in &key.models.deny {
        rows.push(ModelRow {
            pattern: pattern.to_string(),
            access: "denied",
            whom: "—".to_owned(),
            budget: None,
            index: None,
        });
    }
    if let Some(p) = project {
        for pattern in &p.models.deny {
            rows.push(ModelRow {
                pattern: pattern.to_string(),
                access: "denied by the project",
                whom: "—".to_owned(),
                budget: None,
                index: None,
            });
        }
    }
    rows
}

/// Daily spend over the last 30 days as bars (SVG, no script), with the same figures in a
/// table for reading without the chart.
fn spend_chart(from: u32, rows: &[keygate_store::UsageRow]) -> Markup {
    const DAYS: u32 = 30;
    let mut per_day = [0u64; DAYS as usize];
    let mut requests = [0u64; DAYS as usize];
    for r in rows {
        if let Some(i) = r.day.checked_sub(from).filter(|i| *i < DAYS) {
            per_day[i as usize] += r.cost_nanos;
            requests[i as usize] += r.requests;
        }
    }
    let max = per_day.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = per_day.iter().sum();
    html! {
        figure.chart {
            svg viewBox="0 0 300 100" role="img" aria-label=(format!("Spend per day over the last 30 days; {} in all", Money::from_nanos(total))) {
                line x1="0" y1="99.5" x2="300" y2="99.5" class="axis" {}
                @for (i, cost) in per_day.iter().enumerate() {
                    @let h = (cost * 96).div_ceil(max);
                    rect x=(i * 10 + 1) y=(99 - h) width="8" height=(h) {
                        title { (date_of(from + i as u32)) ": " (Money::from_nanos(*cost)) }
                    }
                }
            }
            figcaption { "Spend per day (UTC), last 30 days: " (Money::from_nanos(total)) " in all." }
        }
        details {
            summary { "The figures" }
            table.compact {
                thead { tr { th { "Day" } th { "Requests" } th { "Spend" } } }
                tbody {
                    @for i in 0..DAYS {
                        @if requests[i as usize] > 0 {
                            tr { td { (date_of(from + i)) } td { (requests[i as usize]) } td { (Money::from_nanos(per_day[i as usize])) } }
                        }
                    }
                }
            }
        }
    }
}

async fn key_page(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let visitor = match api.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let key = match api.visible_key(&visitor.caller, &id, false).await {
        Ok(k) => k,
        Err(e) => return page_error(e),
    };
    let now = api.inner.clock.now();
    let project = api
        .inner
        .store
        .project(&key.record.project)
        .await
        .ok()
        .flatten();
    let uses = budgets(&api.inner.store, &key.record, project.as_ref(), now)
        .await
        .unwrap_or_default();
    let (from, usage) = usage_rows(&api, &id, 30).await.unwrap_or((0, Vec::new()));
    let mut events_query = EventQuery::new(10);
    events_query.target = Some(id.clone());
    events_query.within = visitor.caller.scope.projects.clone();
    let events = api
        .inner
        .store
        .admin_events(events_query)
        .await
        .unwrap_or_default();
    let decisions = api
        .inner
        .activity
        .as_ref()
        .map(|a| a.recent(&id))
        .unwrap_or_default();
    let manage = visitor.caller.scope.may_manage(&key.record.project);
    let k = &key.record;
    let rows = model_rows(k, project.as_ref(), &uses);
    let post = |action: &str| format!("/admin/keys/{id}/{action}");
    let body = html! {
        h1 { (if k.name.is_empty() { "(no name)" } else { k.name.as_str() }) }
        dl.facts {
            dt { "Id" } dd { code { (k.id) } }
            dt { "Project" } dd { (k.project) }
            dt { "Status" } dd { (status_text(&key, now)) }
            dt { "Created" } dd { (when(k.created_at)) @if let Some(by) = &key.created_by { " by " (by) } }
            dt { "Expires" } dd { (when_or(k.expires_at, "never")) }
            dt { "Last used" } dd { (when_or(key.last_used_at, "never")) }
            @if let Some(prev) = &k.previous { dt { "Old secret" } dd { "works until " (when(prev.valid_until)) } }
        }
        @if manage {
            div.actions {
                a.button href=(post("edit")) { "Edit" }
                @if k.revoked_at.is_none() {
                    @if k.disabled {
                        form method="post" action=(post("enable")) {
                            input type="hidden" name="csrf" value=(visitor.csrf);
                            button type="submit" { "Re-enable" }
                        }
                    } @else {
                        form method="post" action=(post("disable")) {
                            input type="hidden" name="csrf" value=(visitor.csrf);
                            input name="reason" placeholder="reason (optional)" aria-label="Reason";
                            button type="submit" { "Disable" }
                        }
                    }
                    form method="post" action=(post("rotate")) {
                        input type="hidden" name="csrf" value=(visitor.csrf);
                        label.inline { "Old secret works for "
                            select name="grace" {
                                option value="0" { "no longer" }
                                option value="3600" selected { "1 hour" }
                                option value="86400" { "1 day" }
                                option value="604800" { "7 days" }
                            }
                        }
                        button type="submit" { "Rotate" }
                    }
                    form method="post" action=(post("revoke")) {
                        input type="hidden" name="csrf" value=(visitor.csrf);
                        button.danger type="submit" { "Revoke" }
                    }
                }
            }
        }
        h2 { "Models" }
        table.models {
            thead { tr { th { "Model" } th { "Access" } th { "For whom" } th { "Limit" } th { "Spent" } th { "Remaining" } @if manage { th { span.visually-hidden { "Change" } } } } }
            tbody {
                @for r in &rows {
                    tr {
                        td data-label="Model" { @if r.pattern == "*" { "every model" } @else { code { (r.pattern) } } }
                        td data-label="Access" { span class={"access " (r.access.split(' ').next().unwrap_or(""))} { (r.access) } }
                        td data-label="For whom" { (r.whom) }
                        @match &r.budget {
                            Some(b) => {
                                td data-label="Limit" { (money(b.limit)) " / " (b.period) }
                                td data-label="Spent" { (money(b.spent)) @if let Some(held) = b.reserved { @if held.as_nanos() > 0 { " (+" (money(held)) " in flight)" } } }
                                td data-label="Remaining" { (money(b.remaining)) " " (budget_bar(b)) }
                            }
                            None => { td data-label="Limit" { "—" } td data-label="Spent" { "—" } td data-label="Remaining" { "—" } }
                        }
                        @if manage {
                            td data-label="Change" {
                                @if let Some(i) = r.index {
                                    form method="post" action=(post("limits/remove")) {
                                        input type="hidden" name="csrf" value=(visitor.csrf);
                                        input type="hidden" name="index" value=(i);
                                        button.small type="submit" { "Remove limit" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if manage && k.revoked_at.is_none() {
            form.inline-form method="post" action=(post("limits")) {
                input type="hidden" name="csrf" value=(visitor.csrf);
                label { "Model " input name="model" required placeholder="gpt-4o-mini" size="14"; }
                label { " $ " input name="amount" required inputmode="decimal" size="7"; }
                label { " per " select name="period" { @for p in PERIODS { option value=(p) selected[p == "day"] { (p) } } } }
                button type="submit" { "Set model limit" }
            }
            form.inline-form method="post" action=(post("policies")) {
                input type="hidden" name="csrf" value=(visitor.csrf);
                input type="hidden" name="kind" value="members_only";
                label { "Model " input name="reserve_model" required placeholder="gpt-4o" size="14"; }
                label { " only for members of " input name="reserve_group" required placeholder="research" size="10"; }
                button type="submit" { "Reserve to group" }
            }
            @if !k.limits.budgets.is_empty() {
                form.inline-form method="post" action=(post("reset-spend")) {
                    input type="hidden" name="csrf" value=(visitor.csrf);
                    button type="submit" { "Reset spend" }
                    " What the key's own limits settled this period stops counting (recorded as a change)."
                }
            }
        }
        @let project_budgets: Vec<&BudgetUse> = uses.iter().filter(|b| b.scope == "project").collect();
        @if !project_budgets.is_empty() {
            h3 { "Project " (k.project) "'s budgets (shared by its keys)" }
            ul { @for b in project_budgets { li { code { (b.model) } " " (budget_bar(b)) } } }
        }
        h2 { "Conditions" }
        @if k.policies.is_empty() && project.as_ref().is_none_or(|p| p.policies.is_empty()) {
            p { "None: the rights, models and limits above are all there is." }
        } @else {
            p { "Every request must meet each of these (the project's bind all its keys)." }
            ul.conditions {
                @if let Some(p) = &project { @for c in &p.policies { li { code { (c) } " (project " (p.id) ")" } } }
                @for (i, c) in k.policies.iter().enumerate() {
                    li { code { (c) }
                        @if manage {
                            form.inline-form method="post" action=(post("policies/remove")) {
                                input type="hidden" name="csrf" value=(visitor.csrf);
                                input type="hidden" name="index" value=(i);
                                button.small type="submit" { "Remove" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Endpoint groups" }
        @match &k.permissions {
            Permissions::All => p { "Write (and read) on every endpoint group." },
            Permissions::ReadOnly => p { "Read on every endpoint group; nothing that writes or generates." },
            Permissions::Restricted(map) => {
                @if map.is_empty() { p { "No endpoint group: this key can do nothing." } }
                @else {
                    table.compact { thead { tr { th { "Group" } th { "Access" } } }
                        tbody { @for (g, a) in map { tr { td { code { (g) } } td { (access_name(*a)) } } } } }
                }
            },
        }
        h2 { "Rates and addresses" }
        ul {
            li { "Requests per minute: " (k.limits.requests_per_minute.map_or_else(|| "no limit".to_owned(), |n| n.to_string())) }
            li { "Tokens per minute: " (k.limits.tokens_per_minute.map_or_else(|| "no limit".to_owned(), |n| n.to_string())) }
            @for (model, l) in &k.limits.models {
                li { code { (model) } ": " (l.requests_per_minute.map_or_else(|| "-".to_owned(), |n| n.to_string())) " requests/min, "
                    (l.tokens_per_minute.map_or_else(|| "-".to_owned(), |n| n.to_string())) " tokens/min" }
            }
            li { "Client addresses: " @if k.allowed_ips.is_empty() { "any" } @else { @for (i, net) in k.allowed_ips.iter().enumerate() { @if i > 0 { ", " } code { (net) } } } }
            @if !k.groups.is_empty() { li { "Holder's groups: " (k.groups.join(", ")) } }
            @if !k.labels.is_empty() { li { "Labels: " @for (a, b) in &k.labels { code { (a) "=" (b) } " " } } }
        }
        h2 { "Spend" }
        (spend_chart(from, &usage))
        h2 { "Recent requests" }
        @if decisions.is_empty() { p { "None seen by this gateway since it started." } }
        @else {
            table.compact {
                thead { tr { th { "When" } th { "Request" } th { "Model" } th { "Decision" } th { "Status" } th { "Cost" } } }
                tbody { @for d in &decisions {
                    tr {
                        td { (when(d.at)) }
                        td { code { (d.method) " " (d.path) } }
                        td { (d.model.as_deref().unwrap_or("—")) }
                        td { (d.decision) @if let Some(r) = &d.reason { " (" (r) ")" } }
                        td { (d.status.map_or_else(|| "—".to_owned(), |s| s.to_string())) }
                        td { (d.cost.map_or_else(|| "—".to_owned(), |c| c.to_string())) }
                    }
                } }
            }
        }
        h2 { "Changes" }
        ul.events { @for e in &events { li { (when(e.at)) " · " code { (e.action) } " by " (e.actor) } } }
    };
    html_page(StatusCode::OK, layout(&k.name, Some(&visitor), body))
}

async fn edit_page(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let visitor = match api.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let key = match api.visible_key(&visitor.caller, &id, true).await {
        Ok(k) => k,
        Err(e) => return page_error(e),
    };
    let body = html! {
        h1 { "Edit " (key.record.id) }
        form.stacked method="post" action=(format!("/admin/keys/{id}/edit")) {
            input type="hidden" name="csrf" value=(visitor.csrf);
            (key_fields(&visitor, &[], Some(&key.record)))
            button type="submit" { "Save" }
        }
    };
    html_page(StatusCode::OK, layout("Edit key", Some(&visitor), body))
}

fn back_to(id: &str) -> Response {
    secure(Redirect::to(&format!("/admin/keys/{id}")).into_response())
}

async fn edit(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (form, visitor) = match api.posted(&headers, &body).await {
        Ok(posted) => posted,
        Err(r) => return r,
    };
    let done = async {
        let key = api.visible_key(&visitor.caller, &id, true).await?;
        let mut patch = form_patch(&form)?;
        let limits = serde_json::to_value(&key.record.limits).unwrap_or_else(|_| json!({}));
        patch.insert("limits".into(), form_rates(&form, limits)?);
        api.update(&visitor.caller, &id, patch).await
    };
    back_or_error(done.await, &id)
}

/// A form that changes one field of a key, computed from the form and the key's record as
/// it is now.
async fn change_field(
    api: &AdminApi,
    headers: &HeaderMap,
    id: &str,
    body: &Bytes,
    field: &str,
    change: impl FnOnce(&Form, &KeyRecord) -> Result<Value, ApiError>,
) -> Response {
    let (form, visitor) = match api.posted(headers, body).await {
        Ok(posted) => posted,
        Err(r) => return r,
    };
    let done = async {
        let key = api.visible_key(&visitor.caller, id, true).await?;
        let mut patch = Map::new();
        patch.insert(field.to_owned(), change(&form, &key.record)?);
        api.update(&visitor.caller, id, patch).await
    };
    back_or_error(done.await, id)
}

fn json_of(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Removes item `index` (from the form) of `list`.
fn remove_at<T: Clone>(form: &Form, list: &[T], what: &str) -> Result<Vec<T>, ApiError> {
    let mut list = list.to_vec();
    match form.one("index").and_then(|i| i.parse::<usize>().ok()) {
        Some(i) if i < list.len() => {
            list.remove(i);
            Ok(list)
        }
        _ => Err(ApiError::bad_request(format!("no such {what}"))),
    }
}

/// Sets a money limit on a model for a period (replacing one on the same model and period).
async fn add_limit(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_field(&api, &headers, &id, &body, "limits", |form, key| {
        let budget = json!({
            "amount": form.one("amount").unwrap_or_default(),
            "period": form.one("period").unwrap_or("day"),
            "model": form.one("model").unwrap_or_default(),
        });
        let mut limits = json_of(&key.limits);
        let list = limits
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("limits are not an object"))?
            .entry("budgets")
            .or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.retain(|b| !(b["model"] == budget["model"] && b["period"] == budget["period"]));
            list.push(budget);
        }
        Ok(limits)
    })
    .await
}

async fn remove_limit(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_field(&api, &headers, &id, &body, "limits", |form, key| {
        let mut limits = key.limits.clone();
        limits.budgets = remove_at(form, &limits.budgets, "limit")?;
        Ok(json_of(&limits))
    })
    .await
}

/// Adds a condition: a model reserved to a group's members (`kind=members_only`,
/// `reserve_model`, `reserve_group`), or any condition as one line (`line`).
async fn add_policy(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_field(&api, &headers, &id, &body, "policies", |form, key| {
        let line = match form.one("kind") {
            Some("members_only") => format!(
                "members_only {} models={}",
                form.one("reserve_group").unwrap_or_default(),
                form.one("reserve_model").unwrap_or_default()
            ),
            _ => form.one("line").unwrap_or_default().to_owned(),
        };
        let added = form_policies(&line)?;
        if added.is_empty() {
            return Err(ApiError::bad_request("give a condition"));
        }
        let mut policies = key.policies.clone();
        for c in added {
            if !policies.contains(&c) {
                policies.push(c);
            }
        }
        Ok(json_of(&policies))
    })
    .await
}

async fn remove_policy(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_field(&api, &headers, &id, &body, "policies", |form, key| {
        Ok(json_of(&remove_at(form, &key.policies, "condition")?))
    })
    .await
}

async fn key_action(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let (form, visitor) = match api.posted(&headers, &body).await {
        Ok(posted) => posted,
        Err(r) => return r,
    };
    let caller = &visitor.caller;
    let result = match action.as_str() {
        "disable" => match disable_reason(caller, form.one("reason").map(Value::from).as_ref()) {
            Ok(why) => api.disable(caller, &id, why).await,
            Err(e) => Err(e),
        },
        "enable" => api.enable(caller, &id).await,
        "reset-spend" => {
            return back_or_error(api.reset_spend(caller, &id, None, None).await, &id);
        }
        "revoke" => api.revoke(caller, &id).await,
        "rotate" => {
            let grace = form.one("grace").and_then(|g| g.parse().ok()).unwrap_or(0);
            return match api.rotate(caller, &id, Duration::from_secs(grace)).await {
                Ok((key, secret)) => secret_page(&visitor, &key, &secret, "Key rotated"),
                Err(e) => page_error(e),
            };
        }
        _ => Err(ApiError::not_found("this console action")),
    };
    back_or_error(result, &id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_cookies_are_found_among_others() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd") && !same_token("abc", "abcd"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kg_admin=xyz; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn a_post_from_another_site_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("gw:8080"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://gw:8080"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h));
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::default();
        let t0 = Timestamp::from_unix_secs(1_000);
        let (cookie, csrf) = sessions.start(KeyDigest::of("admin"), t0).unwrap();
        assert_ne!(cookie, csrf);
        assert_eq!(sessions.get(&cookie, t0).unwrap().csrf, csrf);
        assert!(
            sessions
                .get(&cookie, t0.saturating_add(SESSION_TTL))
                .is_none()
        );
        assert!(sessions.get("kg-session-made-up", t0).is_none());
        sessions.end(&cookie);
        assert!(sessions.get(&cookie, t0).is_none());
    }
}
