//! keygate-limit: work in progress.
