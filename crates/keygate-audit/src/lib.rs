//! keygate-audit: work in progress.
