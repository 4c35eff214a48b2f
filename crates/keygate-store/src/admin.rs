//! What the admin API needs of a database: admin keys, the record of admin actions, and
//! listings of keys page by page. [`Db`] here; [`PgDb`](crate::PgDb) in `postgres/admin.rs`,
//! with the same types.

use keygate_core::admin::{AdminEvent, AdminKeyRecord, AuditBy};
use keygate_core::{KeyDigest, KeyRecord, ProjectRecord, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::db::{Db, StoredKey, nanos, parse_key, to_json};
use crate::error::DbError;

/// The most keys or events one page holds.
pub const MAX_PAGE: usize = 1_000;

/// Which keys a listing shows, and from where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyQuery {
    /// Only the keys of this project.
    pub project: Option<String>,
    /// Only the keys of these projects (an admin key's scope); `None`: any project.
    pub within: Option<Vec<String>>,
    /// Only keys in this state.
    pub status: Option<KeyStatus>,
    /// Only keys whose id or name starts with this.
    pub prefix: Option<String>,
    /// The page after the key with this id (the previous page's last).
    pub after: Option<String>,
    /// At most this many (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

/// A key's state, for filtering listings (expiry is shown, not filtered: it depends on when
/// one asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Neither disabled nor revoked.
    Active,
    /// Disabled (and not revoked).
    Disabled,
    /// Revoked.
    Revoked,
}

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyPage {
    /// The keys, by creation time then id.
    pub keys: Vec<StoredKey>,
    /// Whether more follow (ask again with `after` set to the last key's id).
    pub more: bool,
}

/// Which admin events a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventQuery {
    /// Only events about this key, project or admin key.
    pub target: Option<String>,
    /// Only events of these projects (an admin key's scope); `None`: every event.
    pub within: Option<Vec<String>>,
    /// Only events older than this id (the previous page's last).
    pub before: Option<u64>,
    /// At most this many (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl KeyQuery {
    /// Every key, `limit` at a time.
    pub fn new(limit: usize) -> Self {
        KeyQuery {
            limit,
            ..KeyQuery::default()
        }
    }
}

impl EventQuery {
    /// Every event, newest first, `limit` at a time.
    pub fn new(limit: usize) -> Self {
        EventQuery {
            limit,
            ..EventQuery::default()
        }
    }
}

/// What one key did on one UTC day with one model (see [`Db::add_usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// The key.
    pub key_id: String,
    /// Days since 1970-01-01 (UTC).
    pub day: u32,
    /// The model the requests named (empty: none).
    pub model: String,
    /// Requests seen.
    pub requests: u64,
    /// Of which refused by keygate.
    pub denied: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// What they cost, in nanodollars.
    pub cost_nanos: u64,
}

impl UsageRow {
    /// Adds `other`'s counts (same key, day and model) to this row's.
    pub fn add(&mut self, other: &UsageRow) {
        self.requests += other.requests;
        self.denied += other.denied;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_nanos += other.cost_nanos;
    }
}

pub(crate) const ADD_USAGE: &str = "INSERT INTO usage_daily \
     (key_id, day, model, requests, denied, input_tokens, output_tokens, cost) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (key_id, day, model) DO UPDATE SET \
     requests = usage_daily.requests + excluded.requests, \
     denied = usage_daily.denied + excluded.denied, \
     input_tokens = usage_daily.input_tokens + excluded.input_tokens, \
     output_tokens = usage_daily.output_tokens + excluded.output_tokens, \
     cost = usage_daily.cost + excluded.cost";

pub(crate) const READ_USAGE: &str = "SELECT key_id, day, model, requests, denied, input_tokens, \
     output_tokens, cost FROM usage_daily WHERE key_id = $1 AND day >= $2 ORDER BY day, model";

pub(crate) fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A record as an event's `before` or `after`: JSON without any digest.
fn audit_json<T: Serialize>(record: &T) -> Result<String, DbError> {
    let mut value = serde_json::to_value(record)
        .map_err(|e| DbError::Invalid(format!("record not storable: {e}")))?;
    keygate_core::admin::strip_digests(&mut value);
    Ok(value.to_string())
}

fn event(
    by: AuditBy<'_>,
    target: &str,
    project: Option<&str>,
    before: Option<String>,
    after: Option<String>,
) -> AdminEvent {
    AdminEvent {
        id: 0,
        at: by.at,
        actor: by.actor.to_owned(),
        action: by.action.to_owned(),
        target: target.to_owned(),
        project: project.map(str::to_owned),
        before,
        after,
    }
}

/// The event of a key's change (`before` `None`: created).
pub(crate) fn key_event(
    by: AuditBy<'_>,
    before: Option<&KeyRecord>,
    after: Option<&KeyRecord>,
) -> Result<AdminEvent, DbError> {
    let Some(key) = after.or(before) else {
        return Err(DbError::Invalid("an event of no key".to_owned()));
    };
    Ok(event(
        by,
        key.id.as_str(),
        Some(&key.project),
        before.map(audit_json).transpose()?,
        after.map(audit_json).transpose()?,
    ))
}

/// The event of a project's change (`before` `None`: created).
pub(crate) fn project_event(
    by: AuditBy<'_>,
    before: Option<&ProjectRecord>,
    after: Option<&ProjectRecord>,
) -> Result<AdminEvent, DbError> {
    let Some(project) = after.or(before) else {
        return Err(DbError::Invalid("an event of no project".to_owned()));
    };
    Ok(event(
        by,
        &project.id,
        Some(&project.id),
        before.map(audit_json).transpose()?,
        after.map(audit_json).transpose()?,
    ))
}

/// The event of an admin key's change.
pub(crate) fn admin_key_event(
    by: AuditBy<'_>,
    before: Option<&AdminKeyRecord>,
    after: Option<&AdminKeyRecord>,
) -> Result<AdminEvent, DbError> {
    let Some(key) = after.or(before) else {
        return Err(DbError::Invalid("an event of no admin key".to_owned()));
    };
    Ok(event(
        by,
        &key.id,
        None,
        before.map(audit_json).transpose()?,
        after.map(audit_json).transpose()?,
    ))
}

pub(crate) fn insert_event(conn: &Connection, e: &AdminEvent) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO admin_events (at, actor, action, target, project, before, after) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        nanos(e.at),
        e.actor,
        e.action,
        e.target,
        e.project,
        e.before,
        e.after
    ])?;
    Ok(())
}

pub(crate) fn parse_admin_key(id: &str, json: &str) -> Result<AdminKeyRecord, DbError> {
    let key: AdminKeyRecord = serde_json::from_str(json).map_err(|e| {
        DbError::Corrupt(format!(
            "the record of admin key {id:?} is unreadable ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if key.id != id {
        return Err(DbError::Corrupt(format!(
            "the row of admin key {id:?} holds another's record"
        )));
    }
    Ok(key)
}

pub(crate) fn check_admin_key(key: &AdminKeyRecord) -> Result<(), DbError> {
    let ok = key.id.starts_with("adm_")
        && key.id.len() <= 64
        && key
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(DbError::Invalid(format!(
            "admin key id {:?} must be adm_ and ASCII letters or digits",
            key.id
        )));
    }
    Ok(())
}

pub(crate) fn page_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE)
}

/// `LIKE` text matching what starts with `prefix` (its wildcards escaped with `\`).
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// An event of an action that changes no record (a spend reset): `before` and `after` are
/// what the action saw and left, as JSON (without secrets).
pub fn action_event(
    by: AuditBy<'_>,
    target: &str,
    project: Option<&str>,
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> AdminEvent {
    event(
        by,
        target,
        project,
        Some(before.to_string()),
        Some(after.to_string()),
    )
}

impl Db {
    /// Records an admin event on its own (for actions that change no record: see
    /// [`action_event`]).
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when it cannot be written.
    pub fn record_event(&mut self, e: &AdminEvent) -> Result<(), DbError> {
        insert_event(self.conn(), e)
    }

    /// Adds an admin key, recording `by` in the same transaction.
    ///
    /// # Errors
    ///
    /// [`DbError::Invalid`] for an id not `adm_…`, [`DbError::Exists`] for an id or digest
    /// taken, [`DbError::Sqlite`] when it cannot be written.
    pub fn insert_admin_key(
        &mut self,
        key: &AdminKeyRecord,
        by: AuditBy<'_>,
    ) -> Result<(), DbError> {
        check_admin_key(key)?;
        let tx = self.conn_mut().transaction()?;
        let json = to_json(key)?;
        tx.prepare_cached(
            "INSERT INTO admin_keys (id, digest, record, revoked_at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            key.id,
            key.digest.to_string(),
            json,
            key.revoked_at.map(nanos)
        ])
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => {
                DbError::Exists(format!("admin key {} (or its digest)", key.id))
            }
            _ => e.into(),
        })?;
        insert_event(&tx, &admin_key_event(by, None, Some(key))?)?;
        tx.commit()?;
        Ok(())
    }

    /// Every admin key, by id.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] or [`DbError::Corrupt`] when they cannot be read.
    pub fn admin_keys(&self) -> Result<Vec<AdminKeyRecord>, DbError> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT id, record FROM admin_keys ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, json) = row?;
            parse_admin_key(&id, &json)
        })
        .collect()
    }

    /// The admin key whose secret has `digest`, revoked or not.
    ///
    /// # Errors
    ///
    /// As [`Db::admin_keys`].
    pub fn admin_key_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<Option<AdminKeyRecord>, DbError> {
        let row: Option<(String, String)> = self
            .conn()
            .prepare_cached("SELECT id, record FROM admin_keys WHERE digest = ?1")?
            .query_row([digest.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(id, json)| parse_admin_key(&id, &json))
            .transpose()
    }

    /// Revokes the admin key `id` at `by.at` (a revoked one stays as it is), recording `by`.
    ///
    /// # Errors
    ///
    /// [`DbError::NotFound`] for an unknown id; as [`Db::admin_keys`].
    pub fn revoke_admin_key(
        &mut self,
        id: &str,
        by: AuditBy<'_>,
    ) -> Result<AdminKeyRecord, DbError> {
        let tx = self.conn_mut().transaction()?;
        let json: Option<String> = tx
            .prepare_cached("SELECT record FROM admin_keys WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        let old = parse_admin_key(
            id,
            &json.ok_or_else(|| DbError::NotFound(format!("admin key {id}")))?,
        )?;
        if old.revoked_at.is_some() {
            return Ok(old);
        }
        let mut new = old.clone();
        new.revoked_at = Some(by.at);
        tx.prepare_cached("UPDATE admin_keys SET record = ?2, revoked_at = ?3 WHERE id = ?1")?
            .execute(params![id, to_json(&new)?, nanos(by.at)])?;
        insert_event(&tx, &admin_key_event(by, Some(&old), Some(&new))?)?;
        tx.commit()?;
        Ok(new)
    }

    /// Admin events, newest first.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when they cannot be read.
    pub fn admin_events(&self, query: &EventQuery) -> Result<Vec<AdminEvent>, DbError> {
        let mut sql = String::from(
            "SELECT id, at, actor, action, target, project, before, after FROM admin_events \
             WHERE id < ?1",
        );
        if query.target.is_some() {
            sql.push_str(" AND target = ?2");
        }
        if query.within.is_some() {
            sql.push_str(" AND project IN (SELECT value FROM json_each(?3))");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?4");
        let before = query
            .before
            .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let within = query
            .within
            .as_ref()
            .map(|w| serde_json::Value::from(w.clone()).to_string());
        let mut stmt = self.conn().prepare(&sql)?;
        let rows = stmt.query_map(
            params![before, query.target, within, page_limit(query.limit) as i64],
            |r| {
                Ok(AdminEvent {
                    id: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    at: Timestamp::from_unix_nanos(u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0)),
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    project: r.get(5)?,
                    before: r.get(6)?,
                    after: r.get(7)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds usage counts (each row to what its key, day and model have), in one transaction.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when it cannot be written (nothing is).
    pub fn add_usage(&mut self, rows: &[UsageRow]) -> Result<(), DbError> {
        let tx = self.conn_mut().transaction()?;
        {
            // SQLite reads `$N` as numbered parameters too.
            let mut stmt = tx.prepare_cached(ADD_USAGE)?;
            for r in rows {
                stmt.execute(params![
                    r.key_id,
                    i64::from(r.day),
                    r.model,
                    int(r.requests),
                    int(r.denied),
                    int(r.input_tokens),
                    int(r.output_tokens),
                    int(r.cost_nanos)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What `key_id` did from day `from_day` on, by day then model.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlite`] when it cannot be read.
    pub fn usage(&self, key_id: &str, from_day: u32) -> Result<Vec<UsageRow>, DbError> {
        let mut stmt = self.conn().prepare_cached(READ_USAGE)?;
        let rows = stmt.query_map(params![key_id, i64::from(from_day)], |r| {
            Ok(UsageRow {
                key_id: r.get(0)?,
                day: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                model: r.get(2)?,
                requests: uint(r.get(3)?),
                denied: uint(r.get(4)?),
                input_tokens: uint(r.get(5)?),
                output_tokens: uint(r.get(6)?),
                cost_nanos: uint(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One page of keys, by creation time then id.
    ///
    /// # Errors
    ///
    /// [`DbError::NotFound`] when `after` names no key; as [`Db::keys`].
    pub fn list_keys(&self, query: &KeyQuery) -> Result<KeyPage, DbError> {
        let limit = page_limit(query.limit);
        let (after_at, after_id) = match &query.after {
            None => (i64::MIN, String::new()),
            Some(id) => {
                let at: i64 = self
                    .conn()
                    .prepare_cached("SELECT created_at FROM keys WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))
                    .optional()?
                    .ok_or_else(|| DbError::NotFound(format!("key {id} (the page cursor)")))?;
                (at, id.clone())
            }
        };
        let mut sql = String::from(
            "SELECT id, record, created_by, last_used_at, disabled_reason FROM keys \
             WHERE (created_at, id) > (?1, ?2)",
        );
        if query.project.is_some() {
            sql.push_str(" AND project = ?3");
        }
        if query.within.is_some() {
            sql.push_str(" AND project IN (SELECT value FROM json_each(?4))");
        }
        match query.status {
            None => {}
            Some(KeyStatus::Revoked) => {
                sql.push_str(" AND json_extract(record, '$.revoked_at') IS NOT NULL");
            }
            Some(KeyStatus::Disabled) => sql.push_str(
                " AND json_extract(record, '$.revoked_at') IS NULL \
                 AND json_extract(record, '$.disabled') = 1",
            ),
            Some(KeyStatus::Active) => sql.push_str(
                " AND json_extract(record, '$.revoked_at') IS NULL \
                 AND COALESCE(json_extract(record, '$.disabled'), 0) = 0",
            ),
        }
        if query.prefix.is_some() {
            sql.push_str(
                " AND (id LIKE ?5 ESCAPE '\\' OR json_extract(record, '$.name') LIKE ?5 ESCAPE '\\')",
            );
        }
        sql.push_str(" ORDER BY created_at, id LIMIT ?6");
        let within = query
            .within
            .as_ref()
            .map(|w| serde_json::Value::from(w.clone()).to_string());
        let prefix = query.prefix.as_deref().map(like_prefix);
        let mut stmt = self.conn().prepare(&sql)?;
        let rows = stmt.query_map(
            params![
                after_at,
                after_id,
                query.project,
                within,
                prefix,
                (limit + 1) as i64
            ],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            },
        )?;
        let mut keys = Vec::with_capacity(limit + 1);
        for row in rows {
            let (id, json, created_by, last_used_at, disabled_reason) = row?;
            keys.push(StoredKey {
                record: parse_key(&id, &json)?,
                created_by,
                last_used_at: last_used_at
                    .map(|n| Timestamp::from_unix_nanos(u64::try_from(n).unwrap_or(0))),
                disabled_reason,
            });
        }
        let more = keys.len() > limit;
        keys.truncate(limit);
        Ok(KeyPage { keys, more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{db_with_project, key};
    use keygate_core::admin::{AdminScope, admin_key_format};

    fn by(action: &str) -> AuditBy<'_> {
        AuditBy {
            actor: "adm_test",
            action,
            at: Timestamp::from_unix_secs(1_000),
        }
    }

    #[test]
    fn admin_keys_are_stored_found_by_digest_and_revoked_with_an_event_each() {
        let (_dir, _path, mut db) = db_with_project();
        let secret = admin_key_format().generate().unwrap();
        let record = AdminKeyRecord {
            id: "adm_one".to_owned(),
            name: "ops".to_owned(),
            digest: secret.digest(),
            scope: AdminScope::everything(),
            created_at: Timestamp::from_unix_secs(1),
            created_by: "cli".to_owned(),
            revoked_at: None,
        };
        db.insert_admin_key(&record, by("admin_key.create"))
            .unwrap();
        assert!(matches!(
            db.insert_admin_key(&record, by("admin_key.create")),
            Err(DbError::Exists(_))
        ));
        assert_eq!(
            db.admin_key_by_digest(&secret.digest()).unwrap(),
            Some(record.clone())
        );
        let revoked = db
            .revoke_admin_key("adm_one", by("admin_key.revoke"))
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(Timestamp::from_unix_secs(1_000)));
        let events = db.admin_events(&EventQuery::new(10)).unwrap();
        let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["admin_key.revoke", "admin_key.create"]);
        for e in &events {
            for text in [&e.before, &e.after].into_iter().flatten() {
                assert!(!text.contains(&secret.digest().to_string()), "{text}");
            }
        }
    }

    #[test]
    fn audited_changes_write_their_event_in_the_same_transaction_without_digests() {
        let (_dir, _path, mut db) = db_with_project();
        let k = key("key_a", "p", "a");
        db.insert_keys_as(std::slice::from_ref(&k), "adm_test", by("key.create"))
            .unwrap();
        db.update_key_as("key_a", by("key.disable"), |r, reason| {
            r.disabled = true;
            *reason = Some("test".to_owned());
            Ok(())
        })
        .unwrap();
        // A change that changes nothing writes no event.
        db.update_key_as("key_a", by("key.update"), |_, _| Ok(()))
            .unwrap();
        // A refused change writes none either.
        assert!(
            db.update_key_as("key_a", by("key.update"), |_, _| Err::<(), _>("no".into()))
                .is_err()
        );
        let events = db.admin_events(&EventQuery::new(10)).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].action, "key.disable");
        assert!(
            events[0]
                .before
                .as_deref()
                .unwrap()
                .contains("\"id\":\"key_a\"")
        );
        assert!(
            events[0]
                .after
                .as_deref()
                .unwrap()
                .contains("\"disabled\":true")
        );
        assert_eq!(events[1].before, None);
        for e in &events {
            for text in [&e.before, &e.after].into_iter().flatten() {
                assert!(!text.contains(&k.digest.to_string()), "{text}");
            }
        }
        let only = EventQuery {
            within: Some(vec!["other".to_owned()]),
            ..EventQuery::new(10)
        };
        assert!(db.admin_events(&only).unwrap().is_empty());
    }

    #[test]
    fn a_database_of_schema_5_gets_the_admin_tables_and_keeps_its_keys() {
        let (_dir, path, mut db) = db_with_project();
        db.insert_keys(&[key("key_a", "p", "a")], "t").unwrap();
        drop(db);
        crate::test_support::downgrade(&path, 5);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), crate::schema::SCHEMA_VERSION);
        assert!(db.key("key_a").unwrap().is_some());
        assert!(db.admin_keys().unwrap().is_empty());
    }

    #[test]
    fn usage_adds_up_per_key_day_and_model() {
        let (_dir, _path, mut db) = db_with_project();
        let row = |day, model: &str, requests| UsageRow {
            key_id: "key_a".to_owned(),
            day,
            model: model.to_owned(),
            requests,
            denied: 1,
            input_tokens: 10,
            output_tokens: 20,
            cost_nanos: 300,
        };
        db.add_usage(&[row(100, "gpt-4o", 2), row(100, "", 1)])
            .unwrap();
        db.add_usage(&[row(100, "gpt-4o", 3), row(101, "gpt-4o", 1)])
            .unwrap();
        let got = db.usage("key_a", 100).unwrap();
        let mut merged = row(100, "gpt-4o", 5);
        merged.denied = 2;
        merged.input_tokens = 20;
        merged.output_tokens = 40;
        merged.cost_nanos = 600;
        assert_eq!(got, vec![row(100, "", 1), merged, row(101, "gpt-4o", 1)]);
        assert_eq!(db.usage("key_a", 101).unwrap().len(), 1);
        assert!(db.usage("key_b", 0).unwrap().is_empty());
    }

    #[test]
    fn listings_page_through_every_key_once_and_filter() {
        let (_dir, _path, mut db) = db_with_project();
        let keys: Vec<KeyRecord> = (0..25)
            .map(|i| {
                let mut k = key(&format!("key_{i:02}"), "p", &format!("s{i}"));
                k.name = if i % 2 == 0 { "even" } else { "odd_%" }.to_owned();
                k.disabled = i % 5 == 0;
                k
            })
            .collect();
        db.insert_keys(&keys, "t").unwrap();
        let mut seen = Vec::new();
        let mut query = KeyQuery::new(10);
        loop {
            let page = db.list_keys(&query).unwrap();
            seen.extend(page.keys.iter().map(|k| k.record.id.to_string()));
            if !page.more {
                break;
            }
            query.after = Some(page.keys.last().unwrap().record.id.to_string());
        }
        let all: Vec<String> = db
            .keys(None)
            .unwrap()
            .iter()
            .map(|k| k.record.id.to_string())
            .collect();
        assert_eq!(seen, all);
        assert_eq!(seen.len(), 25);
        let disabled = KeyQuery {
            status: Some(KeyStatus::Disabled),
            ..KeyQuery::new(100)
        };
        assert_eq!(db.list_keys(&disabled).unwrap().keys.len(), 5);
        let active = KeyQuery {
            status: Some(KeyStatus::Active),
            ..KeyQuery::new(100)
        };
        assert_eq!(db.list_keys(&active).unwrap().keys.len(), 20);
        // `%` and `_` are literal in a prefix.
        let odd = KeyQuery {
            prefix: Some("odd_%".to_owned()),
            ..KeyQuery::new(100)
        };
        assert_eq!(db.list_keys(&odd).unwrap().keys.len(), 12);
        let none = KeyQuery {
            prefix: Some("od%".to_owned()),
            ..KeyQuery::new(100)
        };
        assert!(db.list_keys(&none).unwrap().keys.is_empty());
        let elsewhere = KeyQuery {
            within: Some(vec!["q".to_owned()]),
            ..KeyQuery::new(100)
        };
        assert!(db.list_keys(&elsewhere).unwrap().keys.is_empty());
        let bad_cursor = KeyQuery {
            after: Some("key_nope".to_owned()),
            ..KeyQuery::new(10)
        };
        assert!(matches!(
            db.list_keys(&bad_cursor),
            Err(DbError::NotFound(_))
        ));
    }
}
