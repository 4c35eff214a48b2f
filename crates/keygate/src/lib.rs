//! keygate: granular, scoped API keys for AI model endpoints.
//!
//! This facade re-exports the layer crates and offers one builder that stacks them in the
//! right order, plus config loading. (The builder lands as the layer crates do.)

pub use keygate_core as core;
pub use keygate_core::*;

#[cfg(feature = "proxy")]
pub mod proxy;
