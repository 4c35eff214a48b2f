//! Records as the API shows them, and changes to records as the API takes them.

use keygate_core::admin::{AdminKeyRecord, strip_digests};
use keygate_core::{KeyRecord, Secret, Timestamp};
use keygate_store::StoredKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The fields of a key an admin may set (at creation and later).
pub const KEY_FIELDS: &[&str] = &[
    "name",
    "permissions",
    "models",
    "limits",
    "allowed_ips",
    "labels",
    "groups",
    "policies",
    "not_before",
    "expires_at",
];

/// The fields of a project an admin may set.
pub const PROJECT_FIELDS: &[&str] = &[
    "name",
    "models",
    "limits",
    "allowed_ips",
    "labels",
    "policies",
    "disabled",
];

/// `active`, or why the key does not work now (`revoked`, `disabled`, `expired`,
/// `not_yet_valid`).
pub fn key_status(key: &KeyRecord, now: Timestamp) -> &'static str {
    match key.check_live(Secret::Current, now) {
        Ok(()) => "active",
        Err(r) => r.code(),
    }
}

/// A stored key as JSON: the record without digests, its status, and what only the
/// database knows (who made it, its last use, why it was disabled).
pub(crate) fn key_view(key: &StoredKey, now: Timestamp) -> Value {
    let mut v = serde_json::to_value(&key.record).unwrap_or(Value::Null);
    strip_digests(&mut v);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("object".into(), "key".into());
        obj.insert("status".into(), key_status(&key.record, now).into());
        obj.insert("created_by".into(), key.created_by.clone().into());
        obj.insert(
            "last_used_at".into(),
            key.last_used_at.map(|t| t.to_string()).into(),
        );
        obj.insert("disabled_reason".into(), key.disabled_reason.clone().into());
    }
    v
}

/// An admin key as JSON, without its digest.
pub(crate) fn admin_key_view(key: &AdminKeyRecord) -> Value {
    let mut v = serde_json::to_value(key).unwrap_or(Value::Null);
    strip_digests(&mut v);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("object".into(), "admin_key".into());
        obj.insert(
            "status".into(),
            if key.revoked_at.is_some() {
                "revoked"
            } else {
                "active"
            }
            .into(),
        );
    }
    v
}

/// A JSON object from a request body.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("the body must be a JSON object".to_owned()),
        Err(e) => Err(format!(
            "the body is not JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        )),
    }
}

/// `record` with `patch` merged in (RFC 7386: a field given replaces the record's, `null`
/// removes it), taking only the fields in `allowed`; then read back as a record, so every
/// rule of the record's format holds.
pub(crate) fn merged<T: Serialize + DeserializeOwned>(
    record: &T,
    patch: &Map<String, Value>,
    allowed: &[&str],
) -> Result<T, String> {
    let mut value = serde_json::to_value(record).map_err(|e| e.to_string())?;
    let Some(obj) = value.as_object_mut() else {
        return Err("not a record".to_owned());
    };
    for (field, new) in patch {
        if !allowed.contains(&field.as_str()) {
            return Err(format!(
                "field {field:?} cannot be set here (settable: {})",
                allowed.join(", ")
            ));
        }
        if new.is_null() {
            obj.remove(field);
        } else {
            obj.insert(field.clone(), new.clone());
        }
    }
    serde_json::from_value(value).map_err(|e| format!("invalid record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{KeyDigest, KeyId, Permissions};
    use serde_json::json;

    fn record() -> KeyRecord {
        KeyRecord::new(
            KeyId::new("key_a"),
            "p",
            KeyDigest::of("s"),
            Timestamp::from_unix_secs(10),
        )
    }

    #[test]
    fn a_patch_sets_and_removes_allowed_fields_only() {
        let mut k = record();
        k.name = "old".into();
        let patch =
            object(br#"{"name": "new", "permissions": "all", "labels": {"team": "x"}}"#).unwrap();
        let k2 = merged(&k, &patch, KEY_FIELDS).unwrap();
        assert_eq!(k2.name, "new");
        assert_eq!(k2.permissions, Permissions::All);
        assert_eq!(k2.labels["team"], "x");
        let k3 = merged(&k2, &object(br#"{"labels": null}"#).unwrap(), KEY_FIELDS).unwrap();
        assert!(k3.labels.is_empty());
        for bad in [
            json!({"digest": "00"}),
            json!({"id": "key_b"}),
            json!({"revoked_at": null}),
        ] {
            let patch = object(bad.to_string().as_bytes()).unwrap();
            let err = merged(&k, &patch, KEY_FIELDS).unwrap_err();
            assert!(err.contains("cannot be set"), "{err}");
        }
        let wrong = object(br#"{"permissions": "everything"}"#).unwrap();
        assert!(
            merged(&k, &wrong, KEY_FIELDS)
                .unwrap_err()
                .starts_with("invalid record")
        );
        assert!(object(b"[1]").is_err() && object(b"{").is_err());
    }

    #[test]
    fn a_view_has_no_digest() {
        let mut k = record();
        k.previous = Some(keygate_core::PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(99),
        });
        let stored = StoredKey::from(k.clone());
        let text = key_view(&stored, Timestamp::from_unix_secs(20)).to_string();
        assert!(!text.contains(&KeyDigest::of("s").to_string()));
        assert!(!text.contains(&KeyDigest::of("old").to_string()));
        assert!(text.contains("\"status\":\"active\""), "{text}");
    }
}
