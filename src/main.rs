//! The `user-manager` command: serve, migrate, healthcheck, config.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::{
    app::{self, Application},
    config::{Settings, Sources},
    telemetry,
};

/// The UserManager gRPC service.
#[derive(Parser)]
#[command(version, about, after_help = CONFIGURATION_HELP)]
struct Cli {
    /// A TOML file layered over the defaults (and under the environment).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How settings are found, for `--help`: the variables are otherwise invisible.
const CONFIGURATION_HELP: &str = "\
Configuration comes in four layers, each later one overriding the keys it sets:
  1. the defaults compiled into the binary (config/default.toml in the repository)
  2. config/$APP_ENV.toml, relative to the working directory, if APP_ENV is set
     and that file exists
  3. the file given with --config FILE
  4. environment variables USER_MANAGER__SECTION__KEY, e.g.
     USER_MANAGER__SERVER__LISTEN=127.0.0.1:5000 or USER_MANAGER__LOG__FORMAT=json
`user-manager config` prints every key, its value and where it came from.";

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
    /// The server to ask [default: 127.0.0.1 on server.health_listen's port if
    /// set and --tls is not given, else on server.listen's]
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The health service name: "" (the server), "readiness", "liveness", "UserManager".
    #[arg(long, default_value = "", value_name = "NAME")]
    service: String,
    /// Give up after this long, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args)]
struct TlsArgs {
    /// Speak TLS, verifying the server's certificate against --ca.
    #[arg(long, requires = "ca")]
    tls: bool,
    /// PEM file of the CA certificates the server's certificate chains to.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// PEM file of a client certificate, for a server that requires one (mTLS).
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key"])]
    cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "cert"])]
    key: Option<PathBuf>,
    /// The name the server's certificate must be valid for [default: the host of --addr].
    #[arg(long, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
}

impl TlsArgs {
    /// The client TLS configuration, if TLS was asked for.
    fn client_config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        use anyhow::Context as _;
        let (true, Some(ca)) = (self.tls, &self.ca) else {
            return Ok(None);
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(
                read("--cert", cert)?,
                read("--key", key)?,
            ));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name);
        }
        Ok(Some(config))
    }
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
            eprintln!("user-manager: setting up logging and traces: {}", chain(&e));
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
            app::migrate(&settings).await
        }
    });
    // After the server drained: the spans of every finished RPC get exported.
    runtime.block_on(telemetry.shutdown());
    // Connections the drain gave up on (a silent socket, an open Watch) end here.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr: a log line too would say it twice on a terminal.
            eprintln!("user-manager: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each once: `a: b: c`. Libraries often put their
/// cause's text into their own message as well (hyper's `tcp connect error`,
/// rustls' alerts, an io error inside a file error), so anyhow's `{:#}` would
/// print it twice; a cause whose text is already there adds nothing.
fn chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// What to do about a failed health check, where the cause says.
fn health_hint(error: &anyhow::Error, addr: &str, tls: bool) -> Option<String> {
    let refused = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    let text = chain(error);
    if refused || text.contains("Connection refused") {
        Some(format!("is the server running on {addr}?"))
    } else if tls && text.contains("InvalidContentType") {
        Some(format!(
            "{addr} does not speak TLS: drop --tls for a plaintext server"
        ))
    } else if text.contains("dns error") {
        Some(format!("is the host in {addr} spelt right?"))
    } else {
        None
    }
}

fn healthcheck(args: HealthcheckArgs, config: Option<PathBuf>) -> ExitCode {
    let addr = match args.addr {
        Some(addr) => addr,
        None => match Settings::load(config) {
            Ok(settings) => {
                let port = match settings.server.health_listen {
                    Some(health) if !args.tls.tls => health.port(),
                    _ => settings.server.listen.port(),
                };
                format!("127.0.0.1:{port}")
            }
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
    let tls = match args.tls.client_config() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("user-manager: {}", chain(&e));
            return ExitCode::from(2);
        }
    };
    let tls_on = tls.is_some();
    match runtime.block_on(check_health(&addr, &args.service, tls, timeout)) {
        Ok(status) if status == ServingStatus::Serving => {
            println!("{}", status.as_str_name());
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(e) => {
            let hint =
                health_hint(&e, &addr, tls_on).map_or_else(String::new, |h| format!("; {h}"));
            eprintln!("user-manager: health check of {addr}: {}{hint}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn check_health(
    addr: &str,
    service: &str,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
) -> anyhow::Result<ServingStatus> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut channel = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        channel = channel.tls_config(tls)?;
    }
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
