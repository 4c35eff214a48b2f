//! The hook through which the extraction layer accepts credentials other than API keys
//! (short-lived keygate tokens, external identity tokens).

use std::future::Future;

use crate::clock::Timestamp;
use crate::principal::Principal;
use crate::store::StoreError;

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not valid (bad signature, expired, wrong audience, its key revoked, ...).
    /// The string says which check failed, for audit only: clients see the same 401 as for a
    /// bad key.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A backend needed to decide (the key store) is unavailable: refuse with 503.
    #[error(transparent)]
    Unavailable(#[from] StoreError),
}

/// Verifies bearer tokens that are not API keys and turns them into a [`Principal`].
pub trait TokenVerifier: Send + Sync + 'static {
    /// A cheap syntactic test: is this credential a token this verifier handles? Credentials
    /// it does not claim are treated as API keys.
    fn accepts(&self, credential: &str) -> bool;

    /// Verifies the token at `now`.
    fn verify(
        &self,
        token: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<Principal, TokenError>> + Send;
}

/// Accepts no tokens: only API keys authenticate.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTokens;

impl TokenVerifier for NoTokens {
    fn accepts(&self, _credential: &str) -> bool {
        false
    }

    fn verify(
        &self,
        _token: &str,
        _now: Timestamp,
    ) -> impl Future<Output = Result<Principal, TokenError>> + Send {
        std::future::ready(Err(TokenError::Invalid("tokens not accepted")))
    }
}

impl<T: TokenVerifier> TokenVerifier for std::sync::Arc<T> {
    fn accepts(&self, credential: &str) -> bool {
        (**self).accepts(credential)
    }

    fn verify(
        &self,
        token: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<Principal, TokenError>> + Send {
        (**self).verify(token, now)
    }
}
