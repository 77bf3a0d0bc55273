//! The `tidesync-cloud` command line.

/// Runs the command; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
