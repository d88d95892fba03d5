use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::{
    config::{Settings, Sources},
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
    /// Ask a server's gRPC health service; exit 0 on SERVING, 1 otherwise
    /// (for container health checks in images without a shell).
    Healthcheck(HealthcheckArgs),
    /// Print the effective configuration and where each value came from.
    Config,
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// The server to ask [default: 127.0.0.1 on server.listen's port]
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The health service name: "" (the server), "readiness", "liveness", "UserManager".
    #[arg(long, default_value = "", value_name = "NAME")]
    service: String,
    /// Give up after this long, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serve = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => true,
        Command::Migrate => false,
        // These two neither log nor open anything: they answer and exit.
        Command::Healthcheck(args) => return healthcheck(args, cli.config),
        Command::Config => return print_config(cli.config),
    };
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
        if serve {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        } else {
            prepare_store(&settings).await?.close().await;
            Ok(())
        }
    });
    // After the server drained: the spans of every finished RPC get exported.
    runtime.block_on(telemetry.shutdown());
    // Connections the drain gave up on (a silent socket, an open Watch) end here.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("user-manager: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(args: HealthcheckArgs, config: Option<PathBuf>) -> ExitCode {
    let addr = match args.addr {
        Some(addr) => addr,
        None => match Settings::load(config) {
            Ok(settings) => format!("127.0.0.1:{}", settings.server.listen.port()),
            Err(e) => {
                eprintln!("user-manager: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("user-manager: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    match runtime.block_on(check_health(&addr, &args.service, timeout)) {
        Ok(status) if status == ServingStatus::Serving => {
            println!("{}", status.as_str_name());
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("user-manager: health check of {addr}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn check_health(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ask = async {
        let mut client = HealthClient::new(channel.connect().await?);
        let response = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        anyhow::Ok(ServingStatus::try_from(response.into_inner().status)?)
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
}

fn print_config(config: Option<PathBuf>) -> ExitCode {
    match Settings::explain(Sources::of_process(config)) {
        Ok(explained) => {
            for e in explained {
                println!("{} = {}  # {}", e.key, e.value, e.source);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("user-manager: {e}");
            ExitCode::from(2)
        }
    }
}
