use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use user_manager::{
    config::Settings,
    server::{Application, prepare_store},
    store::UserStore,
    telemetry,
};

/// The UserManager gRPC service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file layered over the defaults (and under the environment).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, import the seed, then serve (the default).
    Serve,
    /// Migrate and import the seed, then exit (for init containers).
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Configuration errors are reported before anything binds or opens.
    let settings = match Settings::load(cli.config) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("user-manager: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("user-manager: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter's connection is spawned on it.
    let telemetry = match runtime.block_on(async { telemetry::init(&settings) }) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("user-manager: setting up logging and traces: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                Application::build(settings)
                    .await?
                    .run_until_stopped()
                    .await
            }
            Command::Migrate => {
                prepare_store(&settings).await?.close().await;
                Ok(())
            }
        }
    });
    // After the server drained: the spans of every finished RPC get exported.
    runtime.block_on(telemetry.shutdown());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("user-manager: {e:#}");
            ExitCode::FAILURE
        }
    }
}
