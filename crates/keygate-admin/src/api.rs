//! The handlers of `/admin/v1/` and `GET /v1/key`.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use keygate_core::admin::{AdminKeyRecord, AdminScope, admin_key_format, admin_key_id};
use keygate_core::{KeyId, KeyRecord, PreviousSecret, Principal, ProjectRecord};
use keygate_store::{EventQuery, KeyQuery, KeyStatus, StoredKey};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AdminApi;
use crate::BudgetUse;
use crate::error::ApiError;
use crate::spend::{BudgetReset, Owner, budgets, budgets_of};
use crate::store::By;
use crate::views::{
    KEY_FIELDS, PROJECT_FIELDS, admin_key_view, key_status, key_view, merged, object,
};

/// The admin key a request came with: put in the request's extensions by the
/// authentication middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its id (`adm_…`): the actor of what it changes.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scope: AdminScope,
}

/// The longest rotation grace period: 30 days.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Page size when a listing names none.
pub const DEFAULT_PAGE: usize = 50;

type ApiResult = Result<Response, ApiError>;

fn ok(value: Value) -> ApiResult {
    Ok(Json(value).into_response())
}

fn created(value: Value) -> ApiResult {
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

/// The bearer token of a request, if it has one.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Looks the request's admin key up; refuses it with 401 unless it is a live admin key.
pub(crate) async fn authenticate(
    State(api): State<AdminApi>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match api.caller(bearer(request.headers())).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

impl AdminApi {
    /// The admin key behind `secret`, if it is a live one.
    pub(crate) async fn caller(&self, secret: Option<&str>) -> Result<Caller, ApiError> {
        let digest = secret
            .and_then(|s| admin_key_format().parse(s).ok())
            .ok_or_else(ApiError::unauthenticated)?;
        match self.inner.store.admin_key_by_digest(digest).await? {
            Some(key) if key.revoked_at.is_none() => Ok(Caller {
                id: key.id,
                name: key.name,
                scope: key.scope,
            }),
            _ => Err(ApiError::unauthenticated()),
        }
    }

    pub(crate) fn by(&self, caller: &Caller, action: &'static str) -> By {
        By {
            actor: caller.id.clone(),
            action,
            at: self.inner.clock.now(),
        }
    }

    /// After a change: the gateway's snapshot catches up now rather than at its next poll.
    pub(crate) async fn changed(&self) {
        if let Some(source) = &self.inner.source
            && let Err(error) = source.reload().await
        {
            tracing::warn!(%error, "admin API: reloading the keys after a change failed");
        }
    }

    /// The key `id` if `caller` may see it (else 404, as for a key that does not exist),
    /// and may change it when `manage` (else 403).
    pub(crate) async fn visible_key(
        &self,
        caller: &Caller,
        id: &str,
        manage: bool,
    ) -> Result<StoredKey, ApiError> {
        let key = self
            .inner
            .store
            .key(id)
            .await?
            .filter(|k| caller.scope.may_read(&k.record.project))
            .ok_or_else(|| ApiError::not_found(format!("key {id}")))?;
        if manage && !caller.scope.may_manage(&key.record.project) {
            return Err(ApiError::forbidden(format!(
                "admin key {} may not change the keys of project {:?}",
                caller.id, key.record.project
            )));
        }
        Ok(key)
    }

    pub(crate) async fn change_key(
        &self,
        caller: &Caller,
        id: &str,
        action: &'static str,
        change: impl FnOnce(&mut KeyRecord, &mut Option<String>) -> Result<(), String> + Send + 'static,
    ) -> Result<StoredKey, ApiError> {
        self.visible_key(caller, id, true).await?;
        let scope = caller.scope.clone();
        let checked = move |k: &mut KeyRecord, reason: &mut Option<String>| {
            // Checked again inside the transaction.
            if !scope.may_manage(&k.project) {
                return Err("the key's project is outside this admin key's scope".to_owned());
            }
            change(k, reason)
        };
        self.inner
            .store
            .update_key(id, self.by(caller, action), Box::new(checked))
            .await?;
        self.changed().await;
        self.visible_key(caller, id, false).await
    }

    pub(crate) fn superuser(caller: &Caller, what: &str) -> Result<(), ApiError> {
        if caller.scope.is_superuser() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{what} needs an admin key with scope manage (every project)"
            )))
        }
    }
}

fn no_randomness(e: keygate_core::RandomError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "no_randomness",
        e.to_string(),
    )
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    object(body).map_err(ApiError::bad_request)
}

/// `GET /admin/v1/me`: the admin key itself.
pub(crate) async fn me(axum::Extension(caller): axum::Extension<Caller>) -> ApiResult {
    ok(json!({
        "object": "admin_key",
        "id": caller.id,
        "name": caller.name,
        "scope": caller.scope,
    }))
}

// ---- projects ----

fn project_view(p: &ProjectRecord) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("object".into(), "project".into());
    }
    v
}

pub(crate) async fn list_projects(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> ApiResult {
    let data: Vec<Value> = api
        .inner
        .store
        .projects()
        .await?
        .iter()
        .filter(|p| caller.scope.may_read(&p.id))
        .map(project_view)
        .collect();
    ok(json!({ "object": "list", "data": data, "has_more": false }))
}

pub(crate) async fn create_project(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    AdminApi::superuser(&caller, "creating a project")?;
    let mut fields = body_object(&body)?;
    let Some(Value::String(id)) = fields.remove("id") else {
        return Err(ApiError::bad_request(
            "a project needs an \"id\" (a string)",
        ));
    };
    let project =
        merged(&ProjectRecord::new(id), &fields, PROJECT_FIELDS).map_err(ApiError::bad_request)?;
    api.inner
        .store
        .create_project(project.clone(), api.by(&caller, "project.create"))
        .await?;
    api.changed().await;
    created(project_view(&project))
}

async fn visible_project(
    api: &AdminApi,
    caller: &Caller,
    id: &str,
) -> Result<ProjectRecord, ApiError> {
    api.inner
        .store
        .project(id)
        .await?
        .filter(|p| caller.scope.may_read(&p.id))
        .ok_or_else(|| ApiError::not_found(format!("project {id:?}")))
}

/// A project the caller sees and may change.
async fn managed_project(
    api: &AdminApi,
    caller: &Caller,
    id: &str,
) -> Result<ProjectRecord, ApiError> {
    let project = visible_project(api, caller, id).await?;
    if !caller.scope.may_manage(id) {
        return Err(ApiError::forbidden(format!(
            "admin key {} may not change project {id:?}",
            caller.id
        )));
    }
    Ok(project)
}

pub(crate) async fn get_project(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    ok(project_view(&visible_project(&api, &caller, &id).await?))
}

pub(crate) async fn update_project(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    managed_project(&api, &caller, &id).await?;
    let patch = body_object(&body)?;
    api.inner
        .store
        .update_project(
            &id,
            api.by(&caller, "project.update"),
            Box::new(move |p| {
                *p = merged(p, &patch, PROJECT_FIELDS)?;
                Ok(())
            }),
        )
        .await?;
    api.changed().await;
    ok(project_view(&visible_project(&api, &caller, &id).await?))
}

// ---- keys ----

/// The query of `GET /admin/v1/keys`.
#[derive(Debug, Deserialize)]
pub(crate) struct KeysQuery {
    project: Option<String>,
    status: Option<KeyStatus>,
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub(crate) async fn list_keys(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<KeysQuery>,
) -> ApiResult {
    let mut query = KeyQuery::new(q.limit.unwrap_or(DEFAULT_PAGE));
    query.project = q.project;
    query.within = caller.scope.projects.clone();
    query.status = q.status;
    query.prefix = q.prefix;
    query.after = q.after;
    let page = api.inner.store.list_keys(query).await?;
    let now = api.inner.clock.now();
    let data: Vec<Value> = page.keys.iter().map(|k| key_view(k, now)).collect();
    let last = page.keys.last().map(|k| k.record.id.to_string());
    ok(json!({ "object": "list", "data": data, "has_more": page.more, "last_id": last }))
}

pub(crate) async fn create_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let (key, secret) = api.create_key(&caller, body_object(&body)?).await?;
    created(json!({
        "key": key_view(&key, api.inner.clock.now()),
        // The only time the secret is shown: keygate keeps its digest only.
        "secret": secret,
    }))
}

impl AdminApi {
    /// Makes a key of `fields` (`project` and the settable fields); the key as stored and
    /// its secret.
    pub(crate) async fn create_key(
        &self,
        caller: &Caller,
        mut fields: Map<String, Value>,
    ) -> Result<(StoredKey, String), ApiError> {
        let Some(Value::String(project)) = fields.remove("project") else {
            return Err(ApiError::bad_request(
                "a key needs a \"project\" (a project id)",
            ));
        };
        if !caller.scope.may_manage(&project) {
            return Err(ApiError::forbidden(format!(
                "admin key {} may not create keys in project {project:?}",
                caller.id
            )));
        }
        let secret = self.inner.key_format.generate().map_err(no_randomness)?;
        let id = KeyId::generate().map_err(no_randomness)?;
        let base = KeyRecord::new(id, project, secret.digest(), self.inner.clock.now());
        let key = merged(&base, &fields, KEY_FIELDS).map_err(ApiError::bad_request)?;
        self.inner
            .store
            .insert_key(key.clone(), self.by(caller, "key.create"))
            .await?;
        self.changed().await;
        let stored = self.visible_key(caller, key.id.as_str(), false).await?;
        Ok((stored, secret.expose().to_owned()))
    }

    /// Gives key `id` a new secret; the old one works `grace` longer. The key and the new
    /// secret.
    pub(crate) async fn rotate(
        &self,
        caller: &Caller,
        id: &str,
        grace: Duration,
    ) -> Result<(StoredKey, String), ApiError> {
        if grace > MAX_GRACE {
            return Err(ApiError::bad_request(
                "the grace period is at most 2592000 seconds (30 days)",
            ));
        }
        let secret = self.inner.key_format.generate().map_err(no_randomness)?;
        let digest = secret.digest();
        let now = self.inner.clock.now();
        let key = self
            .change_key(caller, id, "key.rotate", move |k, _| {
                if k.revoked_at.is_some() {
                    return Err(format!("key {} is revoked; create a new key instead", k.id));
                }
                k.previous = (!grace.is_zero()).then(|| PreviousSecret {
                    digest: k.digest,
                    valid_until: now.saturating_add(grace),
                });
                k.digest = digest;
                Ok(())
            })
            .await?;
        Ok((key, secret.expose().to_owned()))
    }

    /// Disables key `id` (`why`: the reason shown with it).
    pub(crate) async fn disable(
        &self,
        caller: &Caller,
        id: &str,
        why: String,
    ) -> Result<StoredKey, ApiError> {
        self.change_key(caller, id, "key.disable", move |k, reason| {
            k.disabled = true;
            *reason = Some(why);
            Ok(())
        })
        .await
    }

    /// Enables key `id` again (also one the wallet guard suspended); never a revoked one.
    pub(crate) async fn enable(&self, caller: &Caller, id: &str) -> Result<StoredKey, ApiError> {
        self.change_key(caller, id, "key.enable", |k, reason| {
            if k.revoked_at.is_some() {
                return Err(format!("key {} is revoked: it never works again", k.id));
            }
            k.disabled = false;
            *reason = None;
            Ok(())
        })
        .await
    }

    /// Revokes key `id` for good.
    pub(crate) async fn revoke(&self, caller: &Caller, id: &str) -> Result<StoredKey, ApiError> {
        let now = self.inner.clock.now();
        self.change_key(caller, id, "key.revoke", move |k, _| {
            k.revoked_at.get_or_insert(now);
            k.previous = None;
            Ok(())
        })
        .await
    }

    /// Applies `patch` (the settable fields) to key `id`.
    pub(crate) async fn update(
        &self,
        caller: &Caller,
        id: &str,
        patch: Map<String, Value>,
    ) -> Result<StoredKey, ApiError> {
        self.change_key(caller, id, "key.update", move |k, _| {
            *k = merged(k, &patch, KEY_FIELDS)?;
            Ok(())
        })
        .await
    }
}

pub(crate) async fn get_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let key = api.visible_key(&caller, &id, false).await?;
    ok(key_view(&key, api.inner.clock.now()))
}

pub(crate) async fn update_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let key = api.update(&caller, &id, body_object(&body)?).await?;
    ok(key_view(&key, api.inner.clock.now()))
}

/// The reason a disable gives: `reason` when it is one, else who disabled it.
pub(crate) fn disable_reason(caller: &Caller, reason: Option<&Value>) -> Result<String, ApiError> {
    match reason {
        None | Some(Value::Null) => Ok(format!("disabled by {}", caller.id)),
        Some(Value::String(s)) if s.is_empty() => Ok(format!("disabled by {}", caller.id)),
        Some(Value::String(s)) if s.len() <= 200 => Ok(s.clone()),
        Some(_) => Err(ApiError::bad_request(
            "\"reason\" must be a string of at most 200 bytes",
        )),
    }
}

pub(crate) async fn disable_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let why = disable_reason(&caller, body_object(&body)?.get("reason"))?;
    let key = api.disable(&caller, &id, why).await?;
    ok(key_view(&key, api.inner.clock.now()))
}

pub(crate) async fn enable_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let key = api.enable(&caller, &id).await?;
    ok(key_view(&key, api.inner.clock.now()))
}

pub(crate) async fn revoke_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let key = api.revoke(&caller, &id).await?;
    ok(key_view(&key, api.inner.clock.now()))
}

pub(crate) async fn rotate_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let fields = body_object(&body)?;
    let grace = match fields.get("grace_seconds") {
        None | Some(Value::Null) => Duration::ZERO,
        Some(v) => v.as_u64().map(Duration::from_secs).ok_or_else(|| {
            ApiError::bad_request(
                "\"grace_seconds\" must be a whole number from 0 to 2592000 (30 days)",
            )
        })?,
    };
    let (key, secret) = api.rotate(&caller, &id, grace).await?;
    ok(json!({ "key": key_view(&key, api.inner.clock.now()), "secret": secret }))
}

pub(crate) async fn key_spend(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let key = api.visible_key(&caller, &id, false).await?;
    let project = api.inner.store.project(&key.record.project).await?;
    let now = api.inner.clock.now();
    let rows = budgets(&api.inner.store, &key.record, project.as_ref(), now).await?;
    ok(json!({ "object": "list", "key": id, "at": now, "data": rows }))
}

/// The `model` and `period` a spend reset is limited to (each optional; nothing else).
fn reset_filter(body: &Bytes) -> Result<(Option<String>, Option<String>), ApiError> {
    let fields = body_object(body)?;
    let text = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!(
            "\"{name}\" must be a string"
        ))),
    };
    if let Some(extra) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "model" | "period"))
    {
        return Err(ApiError::bad_request(format!(
            "unknown field {extra:?}: give \"model\" and/or \"period\", or nothing"
        )));
    }
    Ok((text("model")?, text("period")?))
}

/// `POST /admin/v1/keys/{id}/spend/reset`: the key's own budgets (on `model`, of `period`,
/// when given) start their current period from nothing spent; recorded as an admin event
/// with the budgets before and after.
pub(crate) async fn reset_key_spend(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (model, period) = reset_filter(&body)?;
    let (reset, after) = api
        .reset_spend(&caller, &id, model.as_deref(), period.as_deref())
        .await?;
    ok(json!({ "object": "spend_reset", "key": id, "reset": reset, "data": after }))
}

/// `GET /admin/v1/projects/{id}/spend`: the project's own budgets (shared by its keys).
pub(crate) async fn project_spend(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let project = visible_project(&api, &caller, &id).await?;
    let now = api.inner.clock.now();
    let rows = budgets_of(&api.inner.store, &[Owner::project(&project)], now).await?;
    ok(json!({ "object": "list", "project": id, "at": now, "data": rows }))
}

/// `POST /admin/v1/projects/{id}/spend/reset`: the project's budgets, as a key's.
pub(crate) async fn reset_project_spend(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (model, period) = reset_filter(&body)?;
    let project = managed_project(&api, &caller, &id).await?;
    let (reset, after) = api
        .reset_budgets(
            &caller,
            Owner::project(&project),
            "project.spend_reset",
            model.as_deref(),
            period.as_deref(),
        )
        .await?;
    ok(json!({ "object": "spend_reset", "project": id, "reset": reset, "data": after }))
}

impl AdminApi {
    /// Resets a key's own budgets (see [`reset_key_spend`]): what each gave back, and the
    /// key's budgets after.
    pub(crate) async fn reset_spend(
        &self,
        caller: &Caller,
        id: &str,
        model: Option<&str>,
        period: Option<&str>,
    ) -> Result<(Vec<BudgetReset>, Vec<BudgetUse>), ApiError> {
        let key = self.visible_key(caller, id, true).await?;
        self.reset_budgets(
            caller,
            Owner::key(&key.record),
            "key.spend_reset",
            model,
            period,
        )
        .await
    }

    /// Resets `owner`'s budgets, recording `action` with the budgets before and after.
    async fn reset_budgets(
        &self,
        caller: &Caller,
        owner: Owner<'_>,
        action: &'static str,
        model: Option<&str>,
        period: Option<&str>,
    ) -> Result<(Vec<BudgetReset>, Vec<BudgetUse>), ApiError> {
        let store = &self.inner.store;
        let now = self.inner.clock.now();
        let before = budgets_of(store, &[owner], now).await?;
        let reset = crate::spend::reset(store, owner, model, period, now).await?;
        if reset.is_empty() {
            return Err(ApiError::bad_request(
                "no money budget matches: see the spend of the key or project",
            ));
        }
        let after = budgets_of(store, &[owner], now).await?;
        store
            .record_event(keygate_store::action_event(
                self.by(caller, action).audit(),
                owner.id,
                Some(owner.project),
                &json!({ "budgets": before }),
                &json!({ "budgets": after, "reset": reset }),
            ))
            .await?;
        Ok((reset, after))
    }
}

/// The query of `GET /admin/v1/keys/{id}/usage`.
#[derive(Debug, Deserialize)]
pub(crate) struct UsageQuery {
    days: Option<u32>,
}

/// The most days a usage report covers.
pub const MAX_USAGE_DAYS: u32 = 366;

const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// The UTC date of day `day` (days since 1970-01-01), `YYYY-MM-DD`.
pub(crate) fn date_of(day: u32) -> String {
    let t = keygate_core::Timestamp::from_unix_secs(u64::from(day) * 86_400);
    t.to_string().get(..10).unwrap_or_default().to_owned()
}

/// Usage of a key per UTC day and model over the last `days` days (today included).
pub(crate) async fn usage_rows(
    api: &AdminApi,
    id: &str,
    days: u32,
) -> Result<(u32, Vec<keygate_store::UsageRow>), ApiError> {
    let today = u32::try_from(api.inner.clock.now().as_unix_nanos() / NANOS_PER_DAY).unwrap_or(0);
    let from = today.saturating_sub(days.clamp(1, MAX_USAGE_DAYS) - 1);
    Ok((from, api.inner.store.usage(id, from).await?))
}

pub(crate) async fn key_usage(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> ApiResult {
    api.visible_key(&caller, &id, false).await?;
    let (from, rows) = usage_rows(&api, &id, q.days.unwrap_or(30)).await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "date": date_of(r.day),
                "model": r.model,
                "requests": r.requests,
                "denied": r.denied,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "cost": keygate_core::Money::from_nanos(r.cost_nanos),
            })
        })
        .collect();
    ok(json!({ "object": "list", "key": id, "from": date_of(from), "data": data }))
}

pub(crate) async fn key_decisions(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    api.visible_key(&caller, &id, false).await?;
    let data = api
        .inner
        .activity
        .as_ref()
        .map(|a| a.recent(&id))
        .unwrap_or_default();
    ok(json!({ "object": "list", "key": id, "data": data }))
}

/// The query of the event listings.
#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    target: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn events(
    api: &AdminApi,
    caller: &Caller,
    target: Option<String>,
    q: EventsQuery,
) -> ApiResult {
    let mut query = EventQuery::new(q.limit.unwrap_or(DEFAULT_PAGE));
    query.target = target;
    query.within = caller.scope.projects.clone();
    query.before = q.before;
    let list = api.inner.store.admin_events(query).await?;
    let last = list.last().map(|e| e.id);
    let data: Vec<Value> = list
        .into_iter()
        .map(|e| {
            let parse = |t: Option<String>| t.and_then(|t| serde_json::from_str::<Value>(&t).ok());
            json!({
                "object": "admin_event",
                "id": e.id,
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "project": e.project,
                "before": parse(e.before),
                "after": parse(e.after),
            })
        })
        .collect();
    ok(json!({ "object": "list", "data": data, "last_id": last }))
}

pub(crate) async fn key_events(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult {
    api.visible_key(&caller, &id, false).await?;
    events(&api, &caller, Some(id), q).await
}

pub(crate) async fn list_events(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(mut q): Query<EventsQuery>,
) -> ApiResult {
    let target = q.target.take();
    events(&api, &caller, target, q).await
}

// ---- admin keys ----

pub(crate) async fn list_admin_keys(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> ApiResult {
    AdminApi::superuser(&caller, "listing admin keys")?;
    let data: Vec<Value> = api
        .inner
        .store
        .admin_keys()
        .await?
        .iter()
        .map(admin_key_view)
        .collect();
    ok(json!({ "object": "list", "data": data, "has_more": false }))
}

pub(crate) async fn create_admin_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    AdminApi::superuser(&caller, "creating admin keys")?;
    let fields = body_object(&body)?;
    let scope: AdminScope = match fields.get("scope") {
        Some(Value::String(s)) => {
            s.parse()
                .map_err(|e: keygate_core::admin::AdminScopeParseError| {
                    ApiError::bad_request(e.to_string())
                })?
        }
        _ => {
            return Err(ApiError::bad_request(
                "an admin key needs a \"scope\": read, manage, read:PROJECTS or manage:PROJECTS",
            ));
        }
    };
    let name = match fields.get("name") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad_request("\"name\" must be a string")),
    };
    let secret = admin_key_format().generate().map_err(no_randomness)?;
    let id = admin_key_id().map_err(no_randomness)?;
    let record = AdminKeyRecord {
        id,
        name,
        digest: secret.digest(),
        scope,
        created_at: api.inner.clock.now(),
        created_by: caller.id.clone(),
        revoked_at: None,
    };
    api.inner
        .store
        .insert_admin_key(record.clone(), api.by(&caller, "admin_key.create"))
        .await?;
    created(json!({ "admin_key": admin_key_view(&record), "secret": secret.expose() }))
}

pub(crate) async fn revoke_admin_key(
    State(api): State<AdminApi>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    AdminApi::superuser(&caller, "revoking admin keys")?;
    let record = api
        .inner
        .store
        .revoke_admin_key(&id, api.by(&caller, "admin_key.revoke"))
        .await?;
    ok(admin_key_view(&record))
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("this admin route")
}

// ---- the key holder's own view ----

/// `GET /v1/key`: the calling key's rights, limits and what is left of each budget, for the
/// data-plane key itself (mount it behind the key extraction layer).
pub(crate) async fn own_key(
    State(api): State<AdminApi>,
    principal: Option<axum::Extension<Principal>>,
) -> ApiResult {
    let Some(axum::Extension(principal)) = principal else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "an API key is required",
        ));
    };
    let now = api.inner.clock.now();
    let key = principal.key();
    let rows = budgets(&api.inner.store, key, Some(principal.project()), now).await?;
    let mut view = key_view(&StoredKey::from(key.clone()), now);
    if let Some(obj) = view.as_object_mut() {
        for private in ["created_by", "last_used_at", "disabled_reason"] {
            obj.remove(private);
        }
        obj.insert("status".into(), key_status(key, now).into());
        obj.insert(
            "budgets".into(),
            serde_json::to_value(rows).unwrap_or(Value::Null),
        );
        obj.insert(
            "project_limits".into(),
            serde_json::to_value(&principal.project().limits).unwrap_or(Value::Null),
        );
    }
    ok(view)
}
