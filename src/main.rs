use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match docsidecar::config::parse(std::env::args_os()) {
        Ok(cli) => docsidecar::commands::run(cli).await,
        Err(e) => e.exit(),
    }
}
