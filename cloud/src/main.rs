//! The `tidesync-cloud` command: a thin shell over [`tidesync_cloud::cli`].

fn main() -> std::process::ExitCode {
    tidesync_cloud::cli::main()
}
