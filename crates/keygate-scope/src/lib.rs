//! keygate-scope: work in progress.
