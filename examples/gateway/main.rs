//! An OpenAI-compatible gateway guarded by keygate.
//!
//! ```sh
//! cargo run --release --example gateway                      # mock upstream, demo keys, 127.0.0.1:8080
//! KEYGATE_UPSTREAM_API_KEY=sk-... cargo run --release --example gateway -- --upstream http://localhost:11434
//! ```
//!
//! The gateway itself lives in `keygate_workspace::gateway` so the integration tests run the
//! very same code.

use std::process::ExitCode;

use clap::Parser;
use keygate_workspace::gateway::{self, GatewayOptions, UPSTREAM_KEY_ENV};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let mut options = GatewayOptions::parse();
    if options.upstream.is_some() {
        options.upstream_api_key = std::env::var(UPSTREAM_KEY_ENV).ok();
    }
    let mut stdout = std::io::stdout();
    match gateway::start(options, &mut stdout).await {
        Ok(gateway) => {
            gateway.run_until_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
