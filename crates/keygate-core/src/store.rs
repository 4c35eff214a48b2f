//! Where keys live: the [`KeyStore`] trait and the [`Snapshot`] every store serves from.
//!
//! A store answers one question on the hot path: which key has this digest? Every backend
//! (memory, file and SQLite in `keygate-store`, and later PostgreSQL or Redis with a cache in
//! front) implements the same trait and returns the same shared, immutable [`Lookup`], so
//! layers never know which one they use.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use crate::key::{BuildDigestHasher, KeyDigest};
use crate::record::{KeyRecord, ProjectRecord, Secret};

/// A key found in a store, with its project and which of its secrets matched.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The key.
    pub key: Arc<KeyRecord>,
    /// The key's project.
    pub project: Arc<ProjectRecord>,
    /// Which secret the digest was of.
    pub secret: Secret,
}

/// A store could not answer. Layers refuse the request (503); they never let it pass.
#[derive(Debug, Clone, thiserror::Error)]
#[error("key store unavailable: {message}")]
pub struct StoreError {
    message: Arc<str>,
}

impl StoreError {
    /// An error with a message (never anything secret).
    pub fn new(message: impl Into<Arc<str>>) -> Self {
        StoreError {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Looks keys up by digest (each request) and by id (tokens derived from a key).
///
/// Lookups return shared, immutable snapshots of records: a reload or an admin change makes a
/// new record, never mutates one a request is holding. Implementations must be cheap to call
/// concurrently; a remote backend puts a cache in front and answers [`StoreError`] when it
/// cannot reach its truth, so the layer can fail closed.
pub trait KeyStore: Send + Sync + 'static {
    /// The key whose current or previous secret has `digest`.
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send;

    /// The key with public id `id`.
    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send;
}

impl<S: KeyStore> KeyStore for Arc<S> {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        (**self).lookup(digest)
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        (**self).lookup_id(id)
    }
}

/// Why a set of records cannot become a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A record failed its own validation.
    #[error("{0}")]
    Invalid(String),
    /// Two projects share an id.
    #[error("duplicate project id {0:?}")]
    DuplicateProject(String),
    /// Two keys share an id.
    #[error("duplicate key id {0:?}")]
    DuplicateKeyId(String),
    /// Two keys (or a key and another's previous secret) share a digest.
    #[error("two keys share a digest (key {0:?})")]
    DuplicateDigest(String),
    /// A key names a project that does not exist.
    #[error("key {key:?} names unknown project {project:?}")]
    UnknownProject {
        /// The key.
        key: String,
        /// The missing project.
        project: String,
    },
}

/// An immutable, validated set of keys and projects, indexed for lookup.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_digest: HashMap<KeyDigest, Lookup, BuildDigestHasher>,
    by_id: HashMap<Arc<str>, Lookup>,
    projects: HashMap<String, Arc<ProjectRecord>>,
}

impl Snapshot {
    /// Validates and indexes the records.
    ///
    /// # Errors
    ///
    /// A [`SnapshotError`] for an invalid record, a duplicate id or digest, or a key whose
    /// project is missing. Nothing is half-built: the error leaves no snapshot.
    pub fn new(
        projects: impl IntoIterator<Item = ProjectRecord>,
        keys: impl IntoIterator<Item = KeyRecord>,
    ) -> Result<Self, SnapshotError> {
        let mut snapshot = Snapshot::default();
        for project in projects {
            project.validate().map_err(SnapshotError::Invalid)?;
            if snapshot.projects.contains_key(&project.id) {
                return Err(SnapshotError::DuplicateProject(project.id));
            }
            snapshot
                .projects
                .insert(project.id.clone(), Arc::new(project));
        }
        let keys = keys.into_iter();
        snapshot.by_digest.reserve(keys.size_hint().0);
        snapshot.by_id.reserve(keys.size_hint().0);
        for key in keys {
            key.validate().map_err(SnapshotError::Invalid)?;
            let project = snapshot
                .projects
                .get(&key.project)
                .cloned()
                .ok_or_else(|| SnapshotError::UnknownProject {
                    key: key.id.to_string(),
                    project: key.project.clone(),
                })?;
            snapshot.insert_key(Arc::new(key), project)?;
        }
        Ok(snapshot)
    }

    /// A new snapshot: this one with `projects` and `keys` added or replaced (by id).
    ///
    /// Only what changed is validated; unchanged records are shared with this snapshot, not
    /// copied. A replaced key loses the digest entries of its old secrets (current and
    /// previous) before its new ones are indexed, so a rotation or the end of a grace period
    /// takes effect; a replaced project is what the lookups of all its keys then carry. The
    /// duplicate rules are those of [`Snapshot::new`]. Records cannot be removed: a key leaves
    /// service by being revoked or disabled.
    ///
    /// The indexes are copied (pointer clones, linear in the number of keys); a change of a
    /// project also rewrites the lookups of the keys that are not themselves changed.
    ///
    /// # Errors
    ///
    /// As [`Snapshot::new`], for the changed records: an invalid record, an id given twice
    /// in the change, a digest another key already has, or a key naming a missing project.
    /// This snapshot is untouched and no new one is made.
    pub fn with_changes(
        &self,
        projects: impl IntoIterator<Item = ProjectRecord>,
        keys: impl IntoIterator<Item = KeyRecord>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut next = Snapshot {
            by_digest: self.by_digest.clone(),
            by_id: self.by_id.clone(),
            projects: self.projects.clone(),
        };
        let mut changed_projects = Vec::new();
        for project in projects {
            project.validate().map_err(SnapshotError::Invalid)?;
            if changed_projects.contains(&project.id) {
                return Err(SnapshotError::DuplicateProject(project.id));
            }
            changed_projects.push(project.id.clone());
            next.projects.insert(project.id.clone(), Arc::new(project));
        }
        let keys: Vec<KeyRecord> = keys.into_iter().collect();
        let mut changed_keys = HashSet::with_capacity(keys.len());
        for key in &keys {
            key.validate().map_err(SnapshotError::Invalid)?;
            if !changed_keys.insert(key.id.as_str()) {
                return Err(SnapshotError::DuplicateKeyId(key.id.to_string()));
            }
        }
        // Every old digest of every changed key goes first, so that keys trading secrets in
        // one change do not collide with each other's old entries.
        for key in &keys {
            if let Some(old) = next.by_id.remove(key.id.as_str()) {
                next.by_digest.remove(&old.key.digest);
                if let Some(prev) = &old.key.previous {
                    next.by_digest.remove(&prev.digest);
                }
            }
        }
        if !changed_projects.is_empty() {
            let repoint = |lookup: &mut Lookup| {
                if let Some(project) = next.projects.get(&lookup.key.project)
                    && changed_projects.contains(&lookup.key.project)
                {
                    lookup.project = project.clone();
                }
            };
            next.by_id.values_mut().for_each(repoint);
            next.by_digest.values_mut().for_each(repoint);
        }
        for key in keys {
            let project = next.projects.get(&key.project).cloned().ok_or_else(|| {
                SnapshotError::UnknownProject {
                    key: key.id.to_string(),
                    project: key.project.clone(),
                }
            })?;
            next.insert_key(Arc::new(key), project)?;
        }
        Ok(next)
    }

    fn insert_key(
        &mut self,
        key: Arc<KeyRecord>,
        project: Arc<ProjectRecord>,
    ) -> Result<(), SnapshotError> {
        let id: Arc<str> = key.id.as_str().into();
        let current = Lookup {
            key: key.clone(),
            project,
            secret: Secret::Current,
        };
        if self.by_id.insert(id, current.clone()).is_some() {
            return Err(SnapshotError::DuplicateKeyId(key.id.to_string()));
        }
        let mut entries = vec![(key.digest, current.clone())];
        if let Some(prev) = &key.previous {
            let previous = Lookup {
                secret: Secret::Previous,
                ..current
            };
            entries.push((prev.digest, previous));
        }
        for (digest, entry) in entries {
            if self.by_digest.insert(digest, entry).is_some() {
                return Err(SnapshotError::DuplicateDigest(key.id.to_string()));
            }
        }
        Ok(())
    }

    /// The key with a secret of this digest.
    #[inline]
    pub fn get(&self, digest: &KeyDigest) -> Option<&Lookup> {
        self.by_digest.get(digest)
    }

    /// The key with this id.
    pub fn get_id(&self, id: &str) -> Option<&Lookup> {
        self.by_id.get(id)
    }

    /// A project by id.
    pub fn project(&self, id: &str) -> Option<&Arc<ProjectRecord>> {
        self.projects.get(id)
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.by_id.values().map(|l| &l.key)
    }

    /// Every project, in no particular order.
    pub fn projects(&self) -> impl Iterator<Item = &Arc<ProjectRecord>> {
        self.projects.values()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A fixed set of keys is a store: lookups answer at once from the snapshot.
///
/// For keys that change while serving, put the snapshot behind a store that can replace it
/// (`keygate-store` has `MemoryStore`, `FileStore` and `SqliteStore`); wrap it in an `Arc`
/// to share one snapshot between clones of a layer.
impl KeyStore for Snapshot {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        std::future::ready(Ok(self.get(digest).cloned()))
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        std::future::ready(Ok(self.get_id(id).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::key::KeyId;
    use crate::record::PreviousSecret;
    use std::collections::BTreeMap;

    fn key(id: &str, secret: &str) -> KeyRecord {
        KeyRecord::new(
            KeyId::new(id),
            "p",
            KeyDigest::of(secret),
            Timestamp::UNIX_EPOCH,
        )
    }

    #[tokio::test]
    async fn a_snapshot_finds_current_and_previous_secrets() {
        let mut k = key("key_a", "new");
        k.previous = Some(PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(10),
        });
        let store = Snapshot::new([ProjectRecord::new("p")], [k]).unwrap();
        let hit = store.lookup(&KeyDigest::of("new")).await.unwrap().unwrap();
        assert_eq!(hit.secret, Secret::Current);
        assert_eq!(hit.project.id, "p");
        let hit = store.lookup(&KeyDigest::of("old")).await.unwrap().unwrap();
        assert_eq!(hit.secret, Secret::Previous);
        assert!(
            store
                .lookup(&KeyDigest::of("other"))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .lookup_id("key_a")
                .await
                .unwrap()
                .unwrap()
                .key
                .id
                .as_str(),
            "key_a"
        );
    }

    #[test]
    fn invalid_sets_are_refused_whole() {
        let p = || ProjectRecord::new("p");
        assert!(matches!(
            Snapshot::new([p(), p()], []),
            Err(SnapshotError::DuplicateProject(_))
        ));
        assert!(matches!(
            Snapshot::new([p()], [key("key_a", "a"), key("key_a", "b")]),
            Err(SnapshotError::DuplicateKeyId(_))
        ));
        assert!(matches!(
            Snapshot::new([p()], [key("key_a", "a"), key("key_b", "a")]),
            Err(SnapshotError::DuplicateDigest(_))
        ));
        assert!(matches!(
            Snapshot::new([], [key("key_a", "a")]),
            Err(SnapshotError::UnknownProject { .. })
        ));
    }

    fn changed(base: &Snapshot, keys: Vec<KeyRecord>) -> Snapshot {
        base.with_changes([], keys).unwrap()
    }

    #[test]
    fn with_changes_rotates_a_key() {
        let base = Snapshot::new([ProjectRecord::new("p")], [key("key_a", "one")]).unwrap();
        let mut rotated = key("key_a", "two");
        rotated.previous = Some(PreviousSecret {
            digest: KeyDigest::of("one"),
            valid_until: Timestamp::from_unix_secs(10),
        });
        let next = changed(&base, vec![rotated.clone()]);
        assert_eq!(
            next.get(&KeyDigest::of("two")).unwrap().secret,
            Secret::Current
        );
        assert_eq!(
            next.get(&KeyDigest::of("one")).unwrap().secret,
            Secret::Previous
        );
        // A second rotation drops the oldest secret.
        let mut again = key("key_a", "three");
        again.previous = Some(PreviousSecret {
            digest: KeyDigest::of("two"),
            valid_until: Timestamp::from_unix_secs(20),
        });
        let last = changed(&next, vec![again]);
        assert!(last.get(&KeyDigest::of("one")).is_none());
        assert_eq!(
            last.get(&KeyDigest::of("two")).unwrap().secret,
            Secret::Previous
        );
        assert_eq!(
            last.get(&KeyDigest::of("three")).unwrap().secret,
            Secret::Current
        );
        assert_eq!(last.len(), 1);
        // The snapshot changed from is untouched.
        assert!(base.get(&KeyDigest::of("two")).is_none());
        assert_eq!(
            base.get(&KeyDigest::of("one")).unwrap().secret,
            Secret::Current
        );
    }

    #[test]
    fn with_changes_revokes_and_adds_keys() {
        let base = Snapshot::new(
            [ProjectRecord::new("p")],
            [key("key_a", "a"), key("key_b", "b")],
        )
        .unwrap();
        let mut revoked = key("key_a", "a");
        revoked.revoked_at = Some(Timestamp::from_unix_secs(5));
        let next = changed(&base, vec![revoked, key("key_c", "c")]);
        assert!(
            next.get(&KeyDigest::of("a"))
                .unwrap()
                .key
                .revoked_at
                .is_some()
        );
        assert!(next.get_id("key_a").unwrap().key.revoked_at.is_some());
        assert!(next.get(&KeyDigest::of("c")).is_some());
        // Unchanged keys are shared, not copied.
        assert!(Arc::ptr_eq(
            &base.get_id("key_b").unwrap().key,
            &next.get_id("key_b").unwrap().key
        ));
        assert_eq!(next.len(), 3);
    }

    #[test]
    fn with_changes_repoints_keys_to_a_changed_project() {
        let base = Snapshot::new(
            [ProjectRecord::new("p"), ProjectRecord::new("q")],
            [key("key_a", "a"), key("key_b", "b")],
        )
        .unwrap();
        let mut p = ProjectRecord::new("p");
        p.models =
            crate::ModelRules::allow_only([crate::ModelPattern::new("gpt-4o-mini").unwrap()]);
        let next = base.with_changes([p.clone()], []).unwrap();
        for lookup in [
            next.get(&KeyDigest::of("a")).unwrap(),
            next.get_id("key_b").unwrap(),
        ] {
            assert_eq!(*lookup.project, p);
        }
        assert_eq!(**next.project("p").unwrap(), p);
        assert!(
            base.get_id("key_a")
                .unwrap()
                .project
                .models
                .is_unrestricted()
        );
        // A key moved to another project in the same change carries the new one.
        let mut moved = key("key_a", "a");
        moved.project = "q".into();
        let mut q = ProjectRecord::new("q");
        q.disabled = true;
        let next = base.with_changes([q], [moved]).unwrap();
        assert!(next.get(&KeyDigest::of("a")).unwrap().project.disabled);
        assert!(!next.get(&KeyDigest::of("b")).unwrap().project.disabled);
    }

    #[test]
    fn with_changes_keeps_the_duplicate_rules() {
        let base = Snapshot::new(
            [ProjectRecord::new("p")],
            [key("key_a", "a"), key("key_b", "b")],
        )
        .unwrap();
        assert!(matches!(
            base.with_changes([], [key("key_b", "a")]),
            Err(SnapshotError::DuplicateDigest(_))
        ));
        let mut prev = key("key_c", "c");
        prev.previous = Some(PreviousSecret {
            digest: KeyDigest::of("b"),
            valid_until: Timestamp::from_unix_secs(10),
        });
        assert!(matches!(
            base.with_changes([], [prev]),
            Err(SnapshotError::DuplicateDigest(_))
        ));
        assert!(matches!(
            base.with_changes([], [key("key_c", "c"), key("key_c", "d")]),
            Err(SnapshotError::DuplicateKeyId(_))
        ));
        let mut stray = key("key_c", "c");
        stray.project = "nope".into();
        assert!(matches!(
            base.with_changes([], [stray]),
            Err(SnapshotError::UnknownProject { .. })
        ));
        assert!(matches!(
            base.with_changes([ProjectRecord::new("bad id")], []),
            Err(SnapshotError::Invalid(_))
        ));
        // Two keys trading secrets in one change is fine.
        let next = changed(&base, vec![key("key_a", "b"), key("key_b", "a")]);
        assert_eq!(
            next.get(&KeyDigest::of("a")).unwrap().key.id.as_str(),
            "key_b"
        );
        assert_eq!(
            base.get(&KeyDigest::of("a")).unwrap().key.id.as_str(),
            "key_a"
        );
    }

    /// A key named `key_{id}` with secret `s{secret}`, maybe a previous secret, in one of
    /// `projects` (`r` does not exist). Small pools, so that digests collide often.
    fn arb_key(
        id: impl proptest::strategy::Strategy<Value = u8>,
        secret: Option<std::ops::Range<u8>>,
        previous: std::ops::Range<u8>,
        projects: &'static [&'static str],
    ) -> impl proptest::strategy::Strategy<Value = KeyRecord> {
        use proptest::prelude::*;
        let secret = secret.map_or(Just(None).boxed(), |r| r.prop_map(Some).boxed());
        (
            id,
            secret,
            proptest::option::weighted(0.4, previous),
            proptest::sample::select(projects),
            any::<bool>(),
        )
            .prop_map(|(id, secret, previous, project, revoked)| {
                let mut k = key(&format!("key_{id}"), &format!("s{}", secret.unwrap_or(id)));
                k.project = project.to_owned();
                k.previous = previous.map(|prev| PreviousSecret {
                    digest: KeyDigest::of(&format!("s{prev}")),
                    valid_until: Timestamp::from_unix_secs(10),
                });
                k.revoked_at = revoked.then(|| Timestamp::from_unix_secs(1));
                k
            })
    }

    fn arb_project() -> impl proptest::strategy::Strategy<Value = ProjectRecord> {
        use proptest::prelude::*;
        (0..2u8, any::<bool>()).prop_map(|(id, disabled)| {
            let mut p = ProjectRecord::new(["p", "q"][usize::from(id)]);
            p.disabled = disabled;
            p
        })
    }

    /// What a lookup answers, by value.
    fn answer(l: Option<&Lookup>) -> Option<(KeyRecord, ProjectRecord, Secret)> {
        l.map(|l| ((*l.key).clone(), (*l.project).clone(), l.secret))
    }

    use proptest::strategy::{Just, Strategy};

    proptest::proptest! {
        #[test]
        fn with_changes_equals_a_snapshot_of_the_merged_records(
            // Valid on the whole: unique ids, current secrets s0..s5, previous ones s6..s9.
            base_keys in proptest::collection::btree_set(0..6u8, 0..6).prop_flat_map(|ids| {
                ids.into_iter()
                    .map(|id| arb_key(Just(id), None, 6..10, &["p", "q"]))
                    .collect::<Vec<_>>()
            }),
            changed_keys in proptest::collection::btree_map(
                0..6u8,
                arb_key(0..6u8, Some(0..10), 0..10, &["p", "q", "r"]),
                0..4,
            ),
            changed_projects in proptest::collection::btree_map(0..2u8, arb_project(), 0..2),
        ) {
            let projects = [ProjectRecord::new("p"), ProjectRecord::new("q")];
            let Ok(base) = Snapshot::new(projects.clone(), base_keys.clone()) else {
                return Ok(());
            };
            // One record per id in a change, as a database gives them.
            let changed_keys: BTreeMap<_, _> =
                changed_keys.into_values().map(|k| (k.id.to_string(), k)).collect();
            let changed_projects: BTreeMap<_, _> =
                changed_projects.into_values().map(|p| (p.id.clone(), p)).collect();
            let mut merged_keys: BTreeMap<_, _> =
                base_keys.into_iter().map(|k| (k.id.to_string(), k)).collect();
            merged_keys.extend(changed_keys.clone());
            let mut merged_projects: BTreeMap<_, _> =
                projects.into_iter().map(|p| (p.id.clone(), p)).collect();
            merged_projects.extend(changed_projects.clone());

            let incremental = base.with_changes(
                changed_projects.into_values(),
                changed_keys.into_values(),
            );
            let whole = Snapshot::new(merged_projects.into_values(), merged_keys.into_values());
            match (incremental, whole) {
                (Ok(inc), Ok(whole)) => {
                    proptest::prop_assert_eq!(inc.len(), whole.len());
                    proptest::prop_assert_eq!(inc.projects().count(), whole.projects().count());
                    for s in 0..10 {
                        let d = KeyDigest::of(&format!("s{s}"));
                        proptest::prop_assert_eq!(answer(inc.get(&d)), answer(whole.get(&d)));
                    }
                    for id in 0..6 {
                        let id = format!("key_{id}");
                        proptest::prop_assert_eq!(answer(inc.get_id(&id)), answer(whole.get_id(&id)));
                    }
                }
                (Err(_), Err(_)) => {}
                (inc, whole) => proptest::prop_assert!(
                    false,
                    "incremental {:?} but whole {:?}",
                    inc.map(|s| s.len()),
                    whole.map(|s| s.len())
                ),
            }
        }
    }
}
