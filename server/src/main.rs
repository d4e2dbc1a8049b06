//! The `millrace` binary: parses the command line and runs the server until shut down.

use clap::{Parser, Subcommand};
use millrace::config::ServeConfig;
use tracing_subscriber::EnvFilter;

/// Millrace: a streaming SQL database that speaks PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "millrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the server.
    Serve(ServeConfig),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MILLRACE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            // NOTE: planning deeply nested SQL recurses; DataFusion grows the stack in its own
            // recursion, but the frames between its checkpoints need headroom beyond tokio's
            // 2 MiB default.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.workers())
                .thread_stack_size(16 << 20)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match runtime.block_on(millrace::server::run(config)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "millrace stopped with an error");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
