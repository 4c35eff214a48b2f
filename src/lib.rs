//! Support code shared by the workspace's examples, integration tests and benches: a mock
//! OpenAI-compatible upstream. Not published.

pub mod mock_upstream;
