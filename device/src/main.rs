//! The `tidesync-device` binary: parses the command line and hands over to [`tidesync_device::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tidesync_device::cli::Cli::parse();
    tidesync_device::cli::init_tracing();
    match tidesync_device::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
