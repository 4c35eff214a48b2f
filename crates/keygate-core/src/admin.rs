//! Admin credentials and the record of what admins did.
//!
//! Admin keys are a different kind of credential from the data-plane keys that call models:
//! their own prefix ([`ADMIN_KEY_PREFIX`]), their own table, their own [`AdminScope`]. A
//! data-plane key is never an admin key (its digest is not among the admin keys' and its
//! prefix is not theirs), and an admin key never calls a model (its digest is not among the
//! keys'). Only the SHA-256 digest of an admin key is stored, like a key's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::Timestamp;
use crate::key::{KeyDigest, KeyFormat, RandomError};

/// The prefix of every admin key: `kg-admin-` + 32 random base62 characters + a checksum.
pub const ADMIN_KEY_PREFIX: &str = "kg-admin-";

/// The format admin keys are made and parsed in.
pub fn admin_key_format() -> KeyFormat {
    // The prefix is a constant that `with_prefix` accepts (letters and '-').
    KeyFormat::with_prefix(ADMIN_KEY_PREFIX).unwrap_or_default()
}

/// A fresh admin key id: `adm_` + 16 base62 characters.
///
/// # Errors
///
/// When the operating system's random source fails.
pub fn admin_key_id() -> Result<String, RandomError> {
    let id = crate::key::KeyId::generate()?;
    Ok(format!("adm_{}", &id.as_str()["key_".len()..]))
}

/// Takes a record's digests out of its JSON (`digest`, `previous.digest`): not secrets, but
/// what a guessed secret could be checked against, so never shown nor logged.
pub fn strip_digests(value: &mut serde_json::Value) {
    if let Some(map) = value.as_object_mut() {
        map.remove("digest");
        if let Some(previous) = map
            .get_mut("previous")
            .and_then(serde_json::Value::as_object_mut)
        {
            previous.remove("digest");
        }
    }
}

/// What an admin key may do: read, or manage, the keys of some projects or of all.
///
/// Written `read` / `manage` (everything), or `read:proj_a,proj_b` / `manage:proj_a`
/// (those projects only). Only `manage` over every project ([`AdminScope::is_superuser`])
/// creates projects and manages admin keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminScope {
    /// Whether the key may change things, or only read them.
    pub manage: bool,
    /// The projects it covers; `None`: every project, present and future.
    pub projects: Option<Vec<String>>,
}

/// Text that is not an admin scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an admin scope: expected read, manage, read:PROJECT[,PROJECT...] or manage:PROJECT[,PROJECT...]"
)]
pub struct AdminScopeParseError;

impl AdminScope {
    /// Reads everything.
    pub fn read_only() -> Self {
        AdminScope {
            manage: false,
            projects: None,
        }
    }

    /// Manages everything.
    pub fn everything() -> Self {
        AdminScope {
            manage: true,
            projects: None,
        }
    }

    /// Manages the keys of `projects`.
    pub fn manage_projects(projects: impl IntoIterator<Item = impl Into<String>>) -> Self {
        AdminScope {
            manage: true,
            projects: Some(projects.into_iter().map(Into::into).collect()),
        }
    }

    /// Whether the scope covers `project`.
    pub fn covers(&self, project: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p == project))
    }

    /// Whether it may read `project` and its keys.
    pub fn may_read(&self, project: &str) -> bool {
        self.covers(project)
    }

    /// Whether it may change `project`'s keys (and the project's own limits).
    pub fn may_manage(&self, project: &str) -> bool {
        self.manage && self.covers(project)
    }

    /// Manage over every project: creates projects and manages admin keys.
    pub fn is_superuser(&self) -> bool {
        self.manage && self.projects.is_none()
    }
}

impl fmt::Display for AdminScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.manage { "manage" } else { "read" })?;
        if let Some(projects) = &self.projects {
            write!(f, ":{}", projects.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for AdminScope {
    type Err = AdminScopeParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (access, projects) = match s.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let manage = match access {
            "read" => false,
            "manage" => true,
            _ => return Err(AdminScopeParseError),
        };
        let projects = match projects {
            None => None,
            Some(list) => {
                let ids: Vec<String> = list.split(',').map(|p| p.trim().to_owned()).collect();
                let valid = |p: &String| {
                    !p.is_empty()
                        && p.len() <= 64
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                };
                if !ids.iter().all(valid) {
                    return Err(AdminScopeParseError);
                }
                Some(ids)
            }
        };
        Ok(AdminScope { manage, projects })
    }
}

impl Serialize for AdminScope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AdminScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An admin key as stored: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKeyRecord {
    /// Public id (`adm_…`).
    pub id: String,
    /// Human name (who holds it).
    #[serde(default)]
    pub name: String,
    /// SHA-256 of the secret.
    pub digest: KeyDigest,
    /// What it may do.
    pub scope: AdminScope,
    /// When it was made.
    pub created_at: Timestamp,
    /// Who made it (an admin key id, or `cli`).
    #[serde(default)]
    pub created_by: String,
    /// A revoked admin key never works again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
}

/// One thing an admin did, as the store records it in the same transaction as the change.
///
/// `before` and `after` are the changed record as JSON (a key's digests left out: never a
/// secret, nor what a secret could be checked against).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEvent {
    /// Order of the events (assigned by the store; 0 before it is written).
    pub id: u64,
    /// When.
    pub at: Timestamp,
    /// Who: an admin key id (`adm_…`), or `cli` / `cli:NAME` for the command line on the store.
    pub actor: String,
    /// What: `key.create`, `key.update`, `key.disable`, `project.create`, `admin_key.revoke`, ...
    pub action: String,
    /// The id of what was changed.
    pub target: String,
    /// The project it belongs to, when it belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The record before the change (JSON), for changes of something that existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The record after the change (JSON), for changes that leave something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// Who makes a change and what to call it, for the [`AdminEvent`] the store writes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditBy<'a> {
    /// [`AdminEvent::actor`].
    pub actor: &'a str,
    /// [`AdminEvent::action`].
    pub action: &'a str,
    /// [`AdminEvent::at`].
    pub at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_read_back_as_written_and_bound_what_they_cover() {
        for text in ["read", "manage", "read:a", "manage:a,b.c"] {
            let scope: AdminScope = text.parse().unwrap();
            assert_eq!(scope.to_string(), text);
        }
        let scope: AdminScope = "manage:a,b".parse().unwrap();
        assert!(scope.may_manage("a") && scope.may_manage("b"));
        assert!(!scope.may_read("c") && !scope.is_superuser());
        let read: AdminScope = "read".parse().unwrap();
        assert!(read.may_read("anything") && !read.may_manage("anything"));
        assert!(AdminScope::everything().is_superuser());
        for bad in [
            "",
            "write",
            "read:",
            "manage:a,,b",
            "manage:a b",
            "read:a;b",
        ] {
            assert!(bad.parse::<AdminScope>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admin_keys_are_not_data_plane_keys_and_back() {
        let admin = admin_key_format().generate().unwrap();
        assert!(admin.expose().starts_with(ADMIN_KEY_PREFIX));
        assert!(KeyFormat::default().parse(admin.expose()).is_err());
        let key = KeyFormat::default().generate().unwrap();
        assert!(admin_key_format().parse(key.expose()).is_err());
        assert_eq!(
            admin_key_format().parse(admin.expose()).unwrap(),
            admin.digest()
        );
        let id = admin_key_id().unwrap();
        assert!(id.starts_with("adm_") && id.len() == 20, "{id}");
    }
}
