//! [`AnyOf`]: two verifiers behind one, so keygate tokens and identity tokens both work.

use keygate_core::{Principal, Timestamp, TokenError, TokenVerifier};

use crate::verify::UNKNOWN_KID;

/// Tries `A`, then `B` when `A` refuses the token as invalid (typically because the token's
/// `kid` is not among `A`'s keys). A store outage in `A` is answered at once (503), never
/// retried against `B`.
///
/// When both refuse, the reason reported is `B`'s, unless `B` did not know the key id, in
/// which case it is `A`'s (the more useful one for audit). A key id present in both verifiers'
/// sets is `A`'s first.
#[derive(Debug, Clone)]
pub struct AnyOf<A, B> {
    first: A,
    second: B,
}

impl<A, B> AnyOf<A, B> {
    /// `first`, then `second`.
    pub fn new(first: A, second: B) -> Self {
        AnyOf { first, second }
    }
}

impl<A: TokenVerifier, B: TokenVerifier> TokenVerifier for AnyOf<A, B> {
    fn accepts(&self, credential: &str) -> bool {
        self.first.accepts(credential) || self.second.accepts(credential)
    }

    async fn verify(&self, token: &str, now: Timestamp) -> Result<Principal, TokenError> {
        let first = if self.first.accepts(token) {
            match self.first.verify(token, now).await {
                Ok(p) => return Ok(p),
                Err(TokenError::Invalid(reason)) => Some(reason),
                Err(other) => return Err(other),
            }
        } else {
            None
        };
        if !self.second.accepts(token) {
            return Err(TokenError::Invalid(first.unwrap_or("token not accepted")));
        }
        match self.second.verify(token, now).await {
            Err(TokenError::Invalid(reason)) if reason == UNKNOWN_KID => {
                Err(TokenError::Invalid(first.unwrap_or(reason)))
            }
            other => other,
        }
    }
}
