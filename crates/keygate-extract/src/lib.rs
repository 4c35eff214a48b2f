//! keygate-extract: work in progress.
