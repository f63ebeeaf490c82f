use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = podium::cli::Cli::parse();
    podium::telemetry::init();
    match podium::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "podium failed");
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
