//! keygate-jwt: work in progress.
