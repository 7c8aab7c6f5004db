use clap::Parser;
use docsidecar::config::Cli;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    docsidecar::commands::run(Cli::parse()).await
}
