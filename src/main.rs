#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = podium::cli::Cli::parse_or_serve();
    let _sentry = match podium::ops::telemetry::init_with_sentry(cli.sentry_dsn()) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("error: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match podium::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "podium failed");
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
