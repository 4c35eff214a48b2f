//! `[counters]`: where a configured gateway counts request rates, token rates and budgets
//! when it runs as one of several replicas (Redis, one server or a cluster).

use std::time::Duration;

use keygate_store::{RedisOptions, RedisTarget};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `[counters]`: shared counters (off by default: a gateway on SQLite counts in its own
/// memory with the SQLite ledger behind it).
///
/// ```toml
/// [counters]
/// url = "redis://127.0.0.1:6379/0"     # or "redis+unix:///run/redis.sock", "rediss://…"
/// # cluster = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]   # a Redis Cluster instead
/// deadline_millis = 500
/// ```
///
/// With counters set, every replica given the same ones shares each key's request rate,
/// token rate and budgets exactly; a request that needs them while they do not answer gets
/// 503 with `Retry-After` (fail closed). A gateway on a PostgreSQL store must have them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountersConfig {
    /// One Redis server: `redis://[user:password@]host:port/db`, `rediss://…` (TLS) or
    /// `redis+unix:///path/to/redis.sock`.
    pub url: Option<String>,
    /// A Redis Cluster, reached through any of these nodes (instead of `url`).
    pub cluster: Vec<String>,
    /// Milliseconds each attempt of a call may take (default 500).
    pub deadline_millis: Option<u64>,
    /// Attempts per call (default 2); a retry has no second effect on budgets.
    pub attempts: Option<u32>,
    /// Seconds after which a reservation never settled (a replica that died mid-request) is
    /// reaped at its reserved amount (default 900).
    pub reservation_ttl_secs: Option<u64>,
    /// Admit requests uncounted while the counters do not answer (default false: 503).
    /// **Every rate and budget goes unenforced meanwhile**; each request admitted so is
    /// counted in `keygate_counters_failed_open_total` and in `/healthz`.
    pub fail_open: bool,
}

impl CountersConfig {
    /// Where the counters are, if they are configured.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for both `url` and `cluster`, or a URL that is not Redis's.
    pub fn target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        let redis_url = |u: &str| {
            ["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| u.starts_with(scheme))
        };
        match (&self.url, self.cluster.as_slice()) {
            (None, []) => Ok(None),
            (Some(_), [_, ..]) => Err(ConfigError::Invalid(
                "counters: give url or cluster, not both".to_owned(),
            )),
            (Some(url), []) if redis_url(url) => Ok(Some(RedisTarget::Single(url.clone()))),
            (None, nodes) if nodes.iter().all(|u| redis_url(u)) => {
                Ok(Some(RedisTarget::Cluster(nodes.to_vec())))
            }
            _ => Err(ConfigError::Invalid(
                "counters: a Redis URL (redis://, rediss:// or redis+unix://) is needed".to_owned(),
            )),
        }
    }

    /// The connection's settings.
    pub fn options(&self) -> RedisOptions {
        let mut options = RedisOptions::default();
        if let Some(ms) = self.deadline_millis {
            options = options.deadline(Duration::from_millis(ms.max(1)));
        }
        if let Some(n) = self.attempts {
            options = options.attempts(n.max(1));
        }
        if let Some(secs) = self.reservation_ttl_secs {
            options = options.reservation_ttl(Duration::from_secs(secs));
        }
        options.fail_open(self.fail_open)
    }
}

/// A suspension hook that disables the key in the PostgreSQL store (a task of its own, off
/// the request path; every replica's store watcher then serves it within its poll).
pub(crate) fn persist_suspension_pg(db: keygate_store::PgDb) -> impl keygate_limit::SuspensionHook {
    move |key_id: &keygate_core::KeyId, change: keygate_limit::Suspension| {
        if change != keygate_limit::Suspension::Suspended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(key_id = %key_id, "could not persist a key suspension: no runtime");
            return;
        };
        let db = db.clone();
        let id = key_id.as_str().to_owned();
        runtime.spawn(async move {
            let result = db
                .update_key(&id, |key, reason| {
                    key.disabled = true;
                    *reason = Some(crate::config::SUSPENDED_REASON.to_owned());
                    Ok(())
                })
                .await;
            match result {
                Ok(()) => tracing::warn!(key_id = %id, "key suspended and disabled in the store"),
                Err(error) => {
                    tracing::error!(key_id = %id, %error, "could not persist a key suspension")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_one_server_or_a_cluster_never_both_nor_another_scheme() {
        let c = |url: Option<&str>, cluster: &[&str]| CountersConfig {
            url: url.map(str::to_owned),
            cluster: cluster.iter().map(|s| (*s).to_owned()).collect(),
            ..CountersConfig::default()
        };
        assert_eq!(c(None, &[]).target().unwrap(), None);
        assert_eq!(
            c(Some("redis://h:1/0"), &[]).target().unwrap(),
            Some(RedisTarget::Single("redis://h:1/0".into()))
        );
        assert_eq!(
            c(None, &["redis://a:1", "redis://b:2"]).target().unwrap(),
            Some(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        assert!(c(Some("redis://h"), &["redis://a"]).target().is_err());
        assert!(c(Some("postgres://h"), &[]).target().is_err());
        assert!(c(None, &["redis://a", "http://b"]).target().is_err());
    }
}
