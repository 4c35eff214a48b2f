//! What the gateway integration tests share.

#![allow(dead_code, unreachable_pub)]

/// Runs the CLI in-process on `store` (on a blocking thread: it has a runtime of its own);
/// returns its JSON answer.
pub async fn cli(store: &str, args: &[&str]) -> serde_json::Value {
    let mut argv: Vec<String> = ["keygate", "--store", store, "--json"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        keygate_cli::run(argv.clone(), keygate_core::Clock::system().now(), &mut out)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
    })
    .await
    .unwrap()
}

/// The status code of a whole HTTP answer.
pub fn status(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}
