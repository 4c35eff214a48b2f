//! [`SharedRates`]: request rates counted in a store every replica shares (Redis), so a key's
//! `requests_per_minute` holds across all of them rather than once per process.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::time::Duration;

use keygate_core::{LimitScope, Principal};

use crate::backend::BackendError;

/// One request-rate limit a request must fit, as a shared store counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCell {
    /// The cell's name, the same in every process: scope, owner and model pattern
    /// (`k:6:key_ab` for a key's own rate, `p:5:proj1:gpt-4o*` for a project's rate on a model
    /// pattern).
    pub name: String,
    /// The limit: this many requests in any minute, all of them at once at most (GCRA with a
    /// burst of the whole quota, as the in-process limiter).
    pub per_minute: NonZeroU32,
    /// Whose limit it is (for the refusal's message).
    pub scope: LimitScope,
}

/// Where the tightest limit stands after a request (for the `x-ratelimit-*-requests`
/// headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    /// The limit, requests per minute.
    pub limit: u32,
    /// Requests left now.
    pub remaining: u64,
    /// Until the cell is back at full capacity.
    pub reset: Duration,
}

/// A shared store's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedOutcome {
    /// Every cell took the request; the tightest one's status (`None` when there were no
    /// cells).
    Allowed(Option<RateStatus>),
    /// The cell at `index` refused, and no cell took the request.
    Limited {
        /// Which of the cells given refused.
        index: usize,
        /// That cell's status.
        status: RateStatus,
        /// How long until it would take the request.
        retry_after: Duration,
    },
}

/// The boxed future of [`SharedRates::acquire`].
pub type AcquireFuture =
    Pin<Box<dyn Future<Output = Result<SharedOutcome, BackendError>> + Send + 'static>>;

/// A store of request-rate cells shared by replicas ([`RateLimitLayer::with_shared`]).
///
/// An implementation takes a request in every cell or in none, atomically, on one clock for
/// every replica (Redis: the server's), and answers within a deadline; a failure is a
/// [`BackendError`] and the layer answers 503 (fail closed).
///
/// [`RateLimitLayer::with_shared`]: crate::RateLimitLayer::with_shared
pub trait SharedRates: Send + Sync + fmt::Debug + 'static {
    /// Takes one request in every cell, or in none. `group` is the request's project's
    /// [group](crate::backend::group_of): every cell of one request has the same, so a
    /// clustered store can keep them together.
    fn acquire(&self, group: u64, cells: Vec<SharedCell>) -> AcquireFuture;
}

/// The cells a request must fit: every scope's own rate, then its rates for patterns that
/// match `model`.
pub(crate) fn cells(principal: &Principal, model: Option<&str>) -> Vec<SharedCell> {
    let mut out = Vec::new();
    for (scope, limits) in principal.limits() {
        let owner = crate::rate::owner(principal, scope);
        if let Some(rpm) = limits.requests_per_minute {
            out.push(SharedCell {
                name: cell_name(scope, owner, None),
                per_minute: rpm,
                scope,
            });
        }
        if let Some(m) = model {
            for (pattern, l) in limits.for_model(m) {
                if let Some(rpm) = l.requests_per_minute {
                    out.push(SharedCell {
                        name: cell_name(scope, owner, Some(pattern)),
                        per_minute: rpm,
                        scope,
                    });
                }
            }
        }
    }
    out
}

/// `scope:owner_len:owner[:pattern]`: the owner's length keeps any owner and pattern apart.
fn cell_name(scope: LimitScope, owner: &str, pattern: Option<&str>) -> String {
    let s = match scope {
        LimitScope::Key => 'k',
        LimitScope::Project => 'p',
        LimitScope::Token => 't',
    };
    match pattern {
        None => format!("{s}:{}:{owner}", owner.len()),
        Some(p) => format!("{s}:{}:{owner}:{p}", owner.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_owner_and_pattern_apart() {
        let a = cell_name(LimitScope::Key, "a:b", Some("c"));
        let b = cell_name(LimitScope::Key, "a", Some("b:c"));
        assert_ne!(a, b);
        assert_eq!(a, "k:3:a:b:c");
        assert_eq!(cell_name(LimitScope::Project, "p1", None), "p:2:p1");
        assert_ne!(
            cell_name(LimitScope::Project, "p1", None),
            cell_name(LimitScope::Key, "p1", None)
        );
    }
}
