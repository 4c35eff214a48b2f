//! Admin keys, admin events and key listings on PostgreSQL: what `admin.rs` gives [`Db`](crate::Db).

use deadpool_postgres::GenericClient;
use keygate_core::admin::{AdminEvent, AdminKeyRecord, AuditBy};
use keygate_core::{KeyDigest, Timestamp};
use tokio_postgres::error::SqlState;

use super::db::{PgDb, deadline, pg_error, stored_key};
use crate::admin::{
    ADD_USAGE, EventQuery, KeyPage, KeyQuery, KeyStatus, READ_USAGE, UsageRow, admin_key_event,
    check_admin_key, int, like_prefix, page_limit, parse_admin_key, uint,
};
use crate::db::{nanos, to_json};
use crate::error::DbError;

pub(crate) async fn insert_event(
    client: &impl GenericClient,
    e: &AdminEvent,
) -> Result<(), DbError> {
    insert_events(client, std::slice::from_ref(e)).await
}

pub(crate) async fn insert_events(
    client: &impl GenericClient,
    events: &[AdminEvent],
) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    let at: Vec<i64> = events.iter().map(|e| nanos(e.at)).collect();
    let actor: Vec<&str> = events.iter().map(|e| e.actor.as_str()).collect();
    let action: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    let target: Vec<&str> = events.iter().map(|e| e.target.as_str()).collect();
    let project: Vec<Option<&str>> = events.iter().map(|e| e.project.as_deref()).collect();
    let before: Vec<Option<&str>> = events.iter().map(|e| e.before.as_deref()).collect();
    let after: Vec<Option<&str>> = events.iter().map(|e| e.after.as_deref()).collect();
    client
        .execute(
            "INSERT INTO admin_events (at, actor, action, target, project, before, after) \
             SELECT at, actor, action, target, project, before, after FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
                                  $5::text[], $6::text[], $7::text[]) \
             WITH ORDINALITY AS e(at, actor, action, target, project, before, after, n) \
             ORDER BY n",
            &[&at, &actor, &action, &target, &project, &before, &after],
        )
        .await
        .map_err(pg_error)?;
    Ok(())
}

fn ts(n: i64) -> Timestamp {
    Timestamp::from_unix_nanos(u64::try_from(n).unwrap_or(0))
}

impl PgDb {
    /// Records an admin event on its own (see [`Db::record_event`](crate::Db::record_event)).
    ///
    /// # Errors
    ///
    /// [`DbError`] when it cannot be written.
    pub async fn record_event(&self, e: &AdminEvent) -> Result<(), DbError> {
        super::db::deadline(async {
            let client = self.client().await?;
            insert_event(&client, e).await
        })
        .await
    }

    /// Adds an admin key, recording `by` in the same transaction.
    ///
    /// # Errors
    ///
    /// As [`Db::insert_admin_key`](crate::Db::insert_admin_key).
    pub async fn insert_admin_key(
        &self,
        key: &AdminKeyRecord,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        check_admin_key(key)?;
        let json = to_json(key)?;
        let event = admin_key_event(by, None, Some(key))?;
        deadline(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(
                "INSERT INTO admin_keys (id, digest, record, revoked_at) VALUES ($1, $2, $3, $4)",
                &[
                    &key.id,
                    &key.digest.to_string(),
                    &json,
                    &key.revoked_at.map(nanos),
                ],
            )
            .await
            .map_err(|e| {
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    DbError::Exists(format!("admin key {} (or its digest)", key.id))
                } else {
                    pg_error(e)
                }
            })?;
            insert_event(&tx, &event).await?;
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    /// Every admin key, by id.
    ///
    /// # Errors
    ///
    /// [`DbError::Postgres`], [`DbError::Unavailable`] or [`DbError::Corrupt`].
    pub async fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            let rows = client
                .query("SELECT id, record FROM admin_keys ORDER BY id", &[])
                .await
                .map_err(pg_error)?;
            rows.iter()
                .map(|r| parse_admin_key(r.get(0), r.get(1)))
                .collect()
        })
        .await
    }

    /// The admin key whose secret has `digest`, revoked or not.
    ///
    /// # Errors
    ///
    /// As [`PgDb::admin_keys`].
    pub async fn admin_key_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<Option<AdminKeyRecord>, DbError> {
        deadline(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT id, record FROM admin_keys WHERE digest = $1",
                    &[&digest.to_string()],
                )
                .await
                .map_err(pg_error)?;
            row.map(|r| parse_admin_key(r.get(0), r.get(1))).transpose()
        })
        .await
    }

    /// Revokes the admin key `id` (a revoked one stays as it is), recording `by`.
    ///
    /// # Errors
    ///
    /// [`DbError::NotFound`] for an unknown id; as [`PgDb::admin_keys`].
    pub async fn revoke_admin_key(
        &self,
        id: &str,
        by: AuditBy<'_>,
    ) -> Result<AdminKeyRecord, DbError> {
        deadline(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let row = tx
                .query_opt(
                    "SELECT record FROM admin_keys WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(pg_error)?
                .ok_or_else(|| DbError::NotFound(format!("admin key {id}")))?;
            let old = parse_admin_key(id, row.get(0))?;
            if old.revoked_at.is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            new.revoked_at = Some(by.at);
            tx.execute(
                "UPDATE admin_keys SET record = $2, revoked_at = $3 WHERE id = $1",
                &[&id, &to_json(&new)?, &nanos(by.at)],
            )
            .await
            .map_err(pg_error)?;
            insert_event(&tx, &admin_key_event(by, Some(&old), Some(&new))?).await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(new)
        })
        .await
    }

    /// Admin events, newest first.
    ///
    /// # Errors
    ///
    /// As [`PgDb::admin_keys`].
    pub async fn admin_events(&self, query: &EventQuery) -> Result<Vec<AdminEvent>, DbError> {
        let before = query
            .before
            .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = page_limit(query.limit) as i64;
        deadline(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id, at, actor, action, target, project, before, after \
                     FROM admin_events \
                     WHERE id < $1 AND ($2::text IS NULL OR target = $2) \
                       AND ($3::text[] IS NULL OR project = ANY($3)) \
                     ORDER BY id DESC LIMIT $4",
                    &[&before, &query.target, &query.within, &limit],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| AdminEvent {
                    id: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                    at: ts(r.get(1)),
                    actor: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    project: r.get(5),
                    before: r.get(6),
                    after: r.get(7),
                })
                .collect())
        })
        .await
    }

    /// Adds usage counts, in one transaction (as [`Db::add_usage`](crate::Db::add_usage)).
    ///
    /// # Errors
    ///
    /// As [`PgDb::admin_keys`]; nothing is written then.
    pub async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), DbError> {
        deadline(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let stmt = tx.prepare_cached(ADD_USAGE).await.map_err(pg_error)?;
            for r in rows {
                tx.execute(
                    &stmt,
                    &[
                        &r.key_id,
                        &i64::from(r.day),
                        &r.model,
                        &int(r.requests),
                        &int(r.denied),
                        &int(r.input_tokens),
                        &int(r.output_tokens),
                        &int(r.cost_nanos),
                    ],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    /// What `key_id` did from day `from_day` on, by day then model.
    ///
    /// # Errors
    ///
    /// As [`PgDb::admin_keys`].
    pub async fn usage(&self, key_id: &str, from_day: u32) -> Result<Vec<UsageRow>, DbError> {
        deadline(async {
            let client = self.client().await?;
            let rows = client
                .query(READ_USAGE, &[&key_id, &i64::from(from_day)])
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| UsageRow {
                    key_id: r.get(0),
                    day: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    model: r.get(2),
                    requests: uint(r.get(3)),
                    denied: uint(r.get(4)),
                    input_tokens: uint(r.get(5)),
                    output_tokens: uint(r.get(6)),
                    cost_nanos: uint(r.get(7)),
                })
                .collect())
        })
        .await
    }

    /// One page of keys, by creation time then id.
    ///
    /// # Errors
    ///
    /// As [`Db::list_keys`](crate::Db::list_keys).
    pub async fn list_keys(&self, query: &KeyQuery) -> Result<KeyPage, DbError> {
        let limit = page_limit(query.limit);
        let status: Option<&str> = query.status.map(|s| match s {
            KeyStatus::Active => "active",
            KeyStatus::Disabled => "disabled",
            KeyStatus::Revoked => "revoked",
        });
        let prefix = query.prefix.as_deref().map(like_prefix);
        deadline(async {
            let client = self.client().await?;
            let (after_at, after_id) = match &query.after {
                None => (i64::MIN, String::new()),
                Some(id) => {
                    let row = client
                        .query_opt("SELECT created_at FROM keys WHERE id = $1", &[id])
                        .await
                        .map_err(pg_error)?
                        .ok_or_else(|| DbError::NotFound(format!("key {id} (the page cursor)")))?;
                    (row.get::<_, i64>(0), id.clone())
                }
            };
            let rows = client
                .query(
                    "SELECT id, record, created_by, last_used_at, disabled_reason FROM keys \
                     WHERE (created_at, id) > ($1, $2) \
                       AND ($3::text IS NULL OR project = $3) \
                       AND ($4::text[] IS NULL OR project = ANY($4)) \
                       AND ($5::text IS NULL OR CASE \
                             WHEN record::jsonb ? 'revoked_at' THEN 'revoked' \
                             WHEN COALESCE((record::jsonb ->> 'disabled')::boolean, false) \
                               THEN 'disabled' \
                             ELSE 'active' END = $5) \
                       AND ($6::text IS NULL OR id LIKE $6 OR record::jsonb ->> 'name' LIKE $6) \
                     ORDER BY created_at, id LIMIT $7",
                    &[
                        &after_at,
                        &after_id,
                        &query.project,
                        &query.within,
                        &status,
                        &prefix,
                        &((limit + 1) as i64),
                    ],
                )
                .await
                .map_err(pg_error)?;
            let mut keys = rows.iter().map(stored_key).collect::<Result<Vec<_>, _>>()?;
            let more = keys.len() > limit;
            keys.truncate(limit);
            Ok(KeyPage { keys, more })
        })
        .await
    }
}
