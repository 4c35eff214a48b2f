//! [`MemoryStore`]: keys in memory, replaceable while serving.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use keygate_core::{
    KeyDigest, KeyRecord, KeyStore, Lookup, ProjectRecord, Snapshot, SnapshotError, StoreError,
};

/// Keys in memory: lock-free reads, whole-snapshot atomic replacement.
///
/// Clones share the same keys; [`MemoryStore::replace`] swaps in a new snapshot that the next
/// lookup sees, while requests holding records of the old one finish with them. The
/// [`FileStore`](crate::FileStore) and the [`SqliteStore`](crate::SqliteStore) serve through
/// one of these.
///
/// ```
/// use keygate_core::{KeyDigest, KeyId, KeyRecord, ProjectRecord, Snapshot, Timestamp};
/// use keygate_store::MemoryStore;
///
/// let key = |id: &str, secret: &str| {
///     KeyRecord::new(KeyId::new(id), "p", KeyDigest::of(secret), Timestamp::UNIX_EPOCH)
/// };
/// let store = MemoryStore::from_records([ProjectRecord::new("p")], [key("key_a", "a")])?;
/// assert!(store.get(&KeyDigest::of("a")).is_some());
///
/// store.replace(Snapshot::new([ProjectRecord::new("p")], [key("key_b", "b")])?);
/// assert!(store.get(&KeyDigest::of("a")).is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl MemoryStore {
    /// A store serving `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        MemoryStore {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
        }
    }

    /// A store built from records.
    ///
    /// # Errors
    ///
    /// As [`Snapshot::new`].
    pub fn from_records(
        projects: impl IntoIterator<Item = ProjectRecord>,
        keys: impl IntoIterator<Item = KeyRecord>,
    ) -> Result<Self, SnapshotError> {
        Snapshot::new(projects, keys).map(Self::new)
    }

    /// Serves `snapshot` from the next lookup on.
    pub fn replace(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Looks a digest up without going through a future.
    #[inline]
    pub fn get(&self, digest: &KeyDigest) -> Option<Lookup> {
        self.snapshot.load().get(digest).cloned()
    }
}

impl KeyStore for MemoryStore {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        std::future::ready(Ok(self.get(digest)))
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        std::future::ready(Ok(self.snapshot.load().get_id(id).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{KeyId, PreviousSecret, Secret, Timestamp};

    fn key(id: &str, secret: &str) -> KeyRecord {
        KeyRecord::new(
            KeyId::new(id),
            "p",
            KeyDigest::of(secret),
            Timestamp::UNIX_EPOCH,
        )
    }

    #[tokio::test]
    async fn lookup_finds_current_and_previous_secrets() {
        let mut k = key("key_a", "new");
        k.previous = Some(PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(10),
        });
        let store = MemoryStore::from_records([ProjectRecord::new("p")], [k]).unwrap();
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
        let hit = store.lookup_id("key_a").await.unwrap().unwrap();
        assert_eq!(hit.key.id.as_str(), "key_a");
    }

    #[tokio::test]
    async fn replace_takes_effect_for_the_next_lookup() {
        let store =
            MemoryStore::from_records([ProjectRecord::new("p")], [key("key_a", "a")]).unwrap();
        let clone = store.clone();
        clone.replace(Snapshot::new([ProjectRecord::new("p")], [key("key_b", "b")]).unwrap());
        assert!(store.lookup(&KeyDigest::of("a")).await.unwrap().is_none());
        assert!(store.lookup(&KeyDigest::of("b")).await.unwrap().is_some());
    }
}
