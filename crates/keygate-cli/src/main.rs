//! The `keygate` binary: wires process arguments, stdout and the system clock to
//! [`keygate_cli::run`].

use std::io::Write;
use std::process::ExitCode;

use keygate_cli::CliError;
use keygate_core::{Clock, Timestamp};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    // Whole seconds: the file's timestamps read better, and nothing needs finer.
    let now = Timestamp::from_unix_secs(Clock::system().now().as_unix_secs());
    let mut stdout = std::io::stdout().lock();
    let result = keygate_cli::run(std::env::args_os(), now, &mut stdout);
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // clap prints help and usage errors itself, to the right stream with the right code.
        Err(CliError::Usage(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
