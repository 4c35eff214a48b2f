//! Support code shared by the workspace's examples, integration tests and benches. The gateway
//! and the mock upstream live in `keygate-cli` (the `keygate serve` binary); they are
//! re-exported here so the tests keep one path to them. Not published.

pub use keygate_cli::{gateway, mock_upstream};
