//! Logging: plain `tracing` lines on stderr (no colour codes unless stderr is a terminal),
//! level from `DUST3D_LOG` or `RUST_LOG` (default `info`).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber; safe to call more than once. Under MPI only rank 0
/// logs below `warn` (the ranks would repeat each other), unless `DUST3D_LOG` is set.
pub fn init() {
    let default = if crate::base::comm::is_root() {
        "info"
    } else {
        "warn"
    };
    let filter = std::env::var("DUST3D_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A progress bar on a terminal; hidden (and replaced by log lines) in batch jobs.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}
