//! Output for people: logging setup, error banners, JSON printing, progress bars.

use std::io::IsTerminal as _;

/// Flags every subcommand honours.
#[derive(Debug, Clone, Copy)]
pub struct Global {
    /// Only errors on stderr; no progress bars.
    pub quiet: bool,
}

impl Global {
    /// Whether to draw progress bars: stderr is a terminal and the user did not ask for quiet.
    pub fn progress(&self, json: bool) -> bool {
        !self.quiet && !json && std::io::stderr().is_terminal()
    }
}

/// Installs the tracing subscriber. `TANDEM_LOG` wins over `-v`.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Prints `tandem: <what>: <cause>…` on stderr.
pub fn print_error(err: &anyhow::Error) {
    let mut msg = format!("tandem: {err}");
    for cause in err.chain().skip(1) {
        msg.push_str(&format!(": {cause}"));
    }
    eprintln!("{msg}");
}

/// Prints one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(value)?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e.into()),
    }
}

/// Runs a future to completion on a fresh multi-threaded runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(fut))
}
