//! The `tidesync-gateway` command, built inside the tests package so crash tests can spawn it.

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tidesync_gateway::cli::main_with_args(std::env::args_os())
}
