//! A small cache of verified tokens, keyed by the SHA-256 of the token.
//!
//! A hit skips only the signature check and claim parsing. Times (`exp`, `nbf`) are checked
//! again against `now`, and the key record is still loaded and checked on every request, so a
//! revoked key's token fails at once whether cached or not. Only tokens that verified are ever
//! inserted, so garbage cannot fill it.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use keygate_core::Restriction;
use sha2::{Digest, Sha256};

const SHARDS: usize = 16;

/// What verifying a token established, independent of the key record.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) sub: Box<str>,
    pub(crate) jti: Arc<str>,
    pub(crate) exp: u64,
    pub(crate) nbf: Option<u64>,
    pub(crate) rights: Arc<Restriction>,
}

pub(crate) struct TokenCache {
    per_shard: usize,
    shards: [Mutex<HashMap<[u8; 32], Verified>>; SHARDS],
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("capacity", &(self.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    pub(crate) fn new(capacity: NonZeroUsize) -> Self {
        TokenCache {
            per_shard: capacity.get().div_ceil(SHARDS),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    pub(crate) fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn shard(&self, digest: &[u8; 32]) -> &Mutex<HashMap<[u8; 32], Verified>> {
        &self.shards[usize::from(digest[0]) % SHARDS]
    }

    pub(crate) fn get(&self, digest: &[u8; 32]) -> Option<Verified> {
        let shard = self
            .shard(digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.get(digest).cloned()
    }

    /// Inserts, first dropping entries expired at `now_secs` when the shard is full, and the
    /// whole shard if that frees nothing (bounded memory, no bookkeeping on the hot path).
    pub(crate) fn insert(&self, digest: [u8; 32], verified: Verified, now_secs: u64) {
        let mut shard = self
            .shard(&digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard {
            shard.retain(|_, v| v.exp > now_secs);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(digest, verified);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(exp: u64) -> Verified {
        Verified {
            sub: "key_a".into(),
            jti: "t".into(),
            exp,
            nbf: None,
            rights: Arc::default(),
        }
    }

    #[test]
    fn cache_stays_bounded() {
        let cache = TokenCache::new(NonZeroUsize::new(32).unwrap());
        for i in 0..10_000u32 {
            cache.insert(TokenCache::digest(&i.to_string()), entry(100), 0);
        }
        assert!(cache.len() <= 32, "{}", cache.len());
    }

    #[test]
    fn expired_entries_go_first() {
        let cache = TokenCache::new(NonZeroUsize::new(16).unwrap());
        // Fill one shard's single slot with an expired entry, then insert into the same shard.
        let a = [0u8; 32];
        let mut b = [0u8; 32];
        b[1] = 1;
        cache.insert(a, entry(5), 0);
        cache.insert(b, entry(100), 10);
        assert!(cache.get(&a).is_none());
        assert!(cache.get(&b).is_some());
    }
}
