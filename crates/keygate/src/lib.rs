//! keygate facade: work in progress.
