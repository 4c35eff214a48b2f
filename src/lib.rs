//! Support code shared by the workspace's examples, integration tests and benches: a mock
//! OpenAI-compatible upstream and the example gateway. Not published.

pub mod gateway;
pub mod mock_upstream;
