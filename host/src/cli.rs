//! The `hyperty` command line: `run`, `check` and `pin` a bundle.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::bundle::{Bundle, pin, signature_path};
use crate::gateway::GatewayConfig;
use crate::signing;
use crate::runtime::{Runtime, RuntimeConfig, check_file, default_cache_dir, default_data_dir};

#[derive(Parser)]
#[command(name = "hyperty", version, about = "Runs reTHINK hyperties as sandboxed WebAssembly components")]
struct Cli {
    /// Where compiled components are cached.
    #[arg(long, global = true, default_value_os_t = default_cache_dir())]
    cache_dir: PathBuf,
    /// Where the runtime keeps its address and kept hyperty addresses.
    #[arg(long, global = true, default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// How the log on stderr is written: `text` for people (coloured only
    /// when stderr is a terminal and `NO_COLOR` is unset or empty), `json`
    /// for log collectors (one JSON object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The log's format on stderr (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Deploy a bundle and run it until Ctrl-C (log level from RUST_LOG).
    Run {
        bundle: PathBuf,
        /// Stop once every hyperty is idle: no message queued or in hand and
        /// no request pending.
        #[arg(long)]
        exit_when_idle: bool,
        /// Default request timeout, after which the host answers 408.
        #[arg(long, default_value_t = 5000)]
        request_timeout_ms: u64,
        /// The runtime's bus-access policies (Cedar), e.g. policies/runtime.cedar.
        #[arg(long)]
        policies: Option<PathBuf>,
        /// User groups for policies (TOML: group = ["user", ...]); edit it
        /// with `hyperty group`, the running runtime picks changes up.
        #[arg(long)]
        groups: Option<PathBuf>,
        /// Serve the registry of this provider domain: keep what runtimes
        /// announce to domain://registry.<domain>, expire what they stop
        /// refreshing. Repeatable.
        #[arg(long, value_name = "DOMAIN")]
        serve_registry: Vec<String>,
        /// How often this runtime's registrations are refreshed toward their
        /// domains' registries.
        #[arg(long, default_value_t = 60_000)]
        registry_keep_alive_ms: u64,
        /// Component instances (hyperties, protostubs, IdP proxies) the
        /// runtime holds at once; each reserves 4 GiB of address space.
        #[arg(long, default_value_t = crate::engine::DEFAULT_MAX_INSTANCES)]
        max_instances: u32,
        /// How components are executed: `cranelift` (machine code, the
        /// default) or `pulley` (wasmtime's interpreter, for hosts without
        /// JIT; slower). Overrides the bundle's `engine`.
        #[arg(long, value_name = "ENGINE")]
        engine: Option<crate::EngineKind>,
        /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics;
        /// a bare port means 127.0.0.1:PORT (see ARCHITECTURE.md, "Metrics").
        #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        gateway: GatewayFlags,
    },
    /// Add a user to or remove one from a group in a groups file.
    Group {
        #[arg(value_parser = ["add", "remove"])]
        action: String,
        groups_file: PathBuf,
        group: String,
        user: String,
    },
    /// Show what a running runtime runs (domains, hyperties, protostubs),
    /// read from the status its `--metrics` endpoint serves.
    Status {
        /// The runtime's metrics address (as given to `run --metrics`).
        #[arg(value_parser = parse_metrics_addr)]
        metrics: std::net::SocketAddr,
    },
    /// Check a bundle: manifest, component files, sha256 pins, and that each
    /// component fits its world. Lists every problem.
    Check { bundle: PathBuf },
    /// Rewrite the bundle's sha256 pins to the digests of its component
    /// files as they are now.
    Pin { bundle: PathBuf },
    /// Create an Ed25519 key pair for signing components: writes the secret
    /// key to SECRET_KEY (owner-only) and prints the public key to put in a
    /// domain's `trusted-keys`.
    Keygen {
        #[arg(value_name = "SECRET_KEY")]
        secret_key: PathBuf,
    },
    /// Sign components with a secret key: writes `<component>.sig` beside
    /// each.
    Sign {
        #[arg(long, value_name = "SECRET_KEY")]
        key: PathBuf,
        #[arg(required = true)]
        components: Vec<PathBuf>,
    },
}

/// The app gateway's flags; they override the bundle's `[gateway]`.
#[derive(clap::Args)]
struct GatewayFlags {
    /// Serve the app gateway (WebSocket and static files) on this address
    /// (e.g. 127.0.0.1:8080; see ARCHITECTURE.md, "Gateway"). A bundle with
    /// a [gateway] section is served without it (on its `listen`, else
    /// 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    gateway: Option<std::net::SocketAddr>,
    /// Page origins allowed to connect to the gateway, instead of the
    /// bundle's (default: only its own, http://ADDR). Repeatable.
    #[arg(long, value_name = "ORIGIN")]
    gateway_origin: Vec<String>,
    /// Development mode: a gateway login naming USER in DOMAIN needs no
    /// assertion (added to the bundle's dev-users). Repeatable.
    #[arg(long, value_name = "DOMAIN=USER", value_parser = parse_dev_user)]
    gateway_dev_user: Vec<(String, String)>,
    /// Serve the static files of DIR over HTTP, instead of the bundle's.
    #[arg(long, value_name = "DIR")]
    gateway_static: Option<PathBuf>,
}

/// `--metrics`: a socket address, or a port on loopback.
fn parse_metrics_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    match text.parse::<u16>() {
        Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        Err(_) => text.parse().map_err(|e| format!("{text:?} is neither ADDR:PORT nor a port: {e}")),
    }
}

fn parse_dev_user(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((domain, user)) if !domain.is_empty() && !user.is_empty() => Ok((domain.to_owned(), user.to_owned())),
        _ => Err(format!("{text:?} is not DOMAIN=USER")),
    }
}

/// How often `run` looks whether its bundle file changed.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Where the gateway listens when neither the flag nor the bundle says.
const DEFAULT_GATEWAY: &str = "127.0.0.1:8080";

impl GatewayFlags {
    /// Where and how to serve the gateway, from the bundle's section and
    /// these flags; `None` if neither asks for it.
    fn config(self, bundle: &Bundle) -> anyhow::Result<Option<(std::net::SocketAddr, GatewayConfig)>> {
        let options = !self.gateway_origin.is_empty() || !self.gateway_dev_user.is_empty() || self.gateway_static.is_some();
        let spec = match (&bundle.gateway, self.gateway) {
            (Some(spec), _) => spec.clone(),
            (None, Some(_)) => crate::bundle::GatewaySpec::default(),
            (None, None) if options => {
                anyhow::bail!("--gateway-origin, --gateway-dev-user and --gateway-static need --gateway or a [gateway] section in the bundle")
            }
            (None, None) => return Ok(None),
        };
        let addr = self.gateway.or(spec.listen).unwrap_or_else(|| DEFAULT_GATEWAY.parse().expect("a socket address"));
        let mut config = GatewayConfig::from_spec(&spec);
        for (domain, user) in self.gateway_dev_user {
            config.dev_users.entry(domain).or_default().push(user);
        }
        if !self.gateway_origin.is_empty() {
            config.allowed_origins = self.gateway_origin;
        }
        config.static_dir = self.gateway_static.or(config.static_dir);
        Ok(Some((addr, config)))
    }
}

/// Runs the CLI with `args` (the first is the program name).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(cli.log_format);
    let config = RuntimeConfig { cache_dir: cli.cache_dir, data_dir: Some(cli.data_dir), ..RuntimeConfig::default() };
    let result = match cli.command {
        Command::Run {
            bundle,
            exit_when_idle,
            request_timeout_ms,
            policies,
            groups,
            serve_registry,
            registry_keep_alive_ms,
            max_instances,
            engine,
            metrics,
            gateway,
        } => {
            let config = RuntimeConfig {
                request_timeout: Duration::from_millis(request_timeout_ms),
                serve_registries: serve_registry,
                registry_keep_alive: Duration::from_millis(registry_keep_alive_ms),
                max_instances,
                ..config
            };
            setup_policies(&config, policies.as_deref(), groups.as_deref())
                .and_then(|()| run(&bundle, config, engine, exit_when_idle, metrics, gateway))
        }
        Command::Status { metrics } => crate::metrics::status::fetch(metrics).map(|status| print!("{}", crate::metrics::status::table(&status))),
        Command::Group { action, groups_file, group, user } => edit_group(&groups_file, &group, &user, action == "add"),
        Command::Check { bundle } => match (std::time::Instant::now(), check_file(&bundle, config)) {
            (started, Ok(b)) => {
                let n: usize = b.domains.iter().map(|d| d.hyperties.len()).sum();
                let ms = started.elapsed().as_secs_f64() * 1e3;
                println!("{}: ok ({n} hyperties in {} domains, checked in {ms:.0} ms)", bundle.display(), b.domains.len());
                Ok(())
            }
            (_, Err(e)) => Err(anyhow::Error::new(e)),
        },
        Command::Pin { bundle } => pin(&bundle).map(|changed| {
            for (field, old, new) in &changed {
                println!("{}: {field}: {} -> {new}", bundle.display(), if old.is_empty() { "(none)" } else { old });
            }
            if changed.is_empty() {
                println!("{}: every pin matches", bundle.display());
            }
        }),
        Command::Keygen { secret_key } => signing::keygen(&secret_key).map(|public| {
            println!("{public}");
            eprintln!("secret key written to {} (keep it private)", secret_key.display());
        }),
        Command::Sign { key, components } => components.iter().try_for_each(|component| {
            let signature = signing::sign(&key, component)?;
            let path = signature_path(component);
            std::fs::write(&path, signature).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            println!("{}", path.display());
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the runtime's policies and groups and watches them for changes.
fn setup_policies(config: &RuntimeConfig, policies: Option<&Path>, groups: Option<&Path>) -> anyhow::Result<()> {
    if let Some(file) = policies {
        config.policies.set_runtime_policies(file)?;
    }
    if let Some(file) = groups {
        config.policies.set_groups_file(file)?;
    }
    config.policies.watch(Duration::from_millis(500));
    Ok(())
}

/// Adds `user` to (or removes it from) `group` in a groups file, keeping
/// its layout; a running runtime watching the file picks the change up.
fn edit_group(file: &Path, group: &str, user: &str, add: bool) -> anyhow::Result<()> {
    let text = if file.exists() { std::fs::read_to_string(file)? } else { String::new() };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let members = doc
        .entry(group)
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("{}: {group} is not a list of users", file.display()))?;
    let present = members.iter().position(|m| m.as_str() == Some(user));
    match (add, present) {
        (true, None) => members.push(user),
        (false, Some(i)) => {
            members.remove(i);
        }
        _ => {}
    }
    members.fmt();
    std::fs::write(file, doc.to_string())?;
    println!("{}: {group} = {}", file.display(), doc[group].to_string().trim());
    Ok(())
}

fn run(
    path: &std::path::Path,
    config: RuntimeConfig,
    engine: Option<crate::EngineKind>,
    exit_when_idle: bool,
    metrics: Option<std::net::SocketAddr>,
    gateway: GatewayFlags,
) -> anyhow::Result<()> {
    let watch = crate::runtime::BundleWatch::new(path);
    let bundle = Bundle::load(path)?;
    let gateway = gateway.config(&bundle)?;
    let config = RuntimeConfig { engine: engine.or(bundle.engine).unwrap_or(config.engine), ..config };
    let runtime = Runtime::new(config)?;
    let _metrics = metrics.map(|addr| runtime.serve_metrics(addr)).transpose()?;
    if let Some(metrics) = &_metrics {
        println!("metrics: http://{}/metrics", metrics.local_addr());
    }
    tracing::info!(
        "runtime {} ({} engine): deploying bundle {:?} ({} domains)",
        runtime.address(),
        runtime.engine(),
        bundle.name,
        bundle.domains.len()
    );
    runtime.deploy(&bundle)?;
    let _gateway = gateway.map(|(addr, config)| runtime.serve_gateway(addr, config)).transpose()?;
    if let Some(gateway) = &_gateway {
        println!("app gateway: http://{}/", gateway.local_addr());
    }
    if exit_when_idle {
        runtime.wait_idle(Duration::MAX);
        tracing::info!("every hyperty is idle; stopping");
    } else {
        tracing::info!("running; press Ctrl-C to stop; changes to {} are applied as they are saved", path.display());
        // The watcher stops when `stop` is dropped.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let runtime = &runtime;
            scope.spawn(move || runtime.watch_bundle(watch, WATCH_EVERY, stopped));
            let waited = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(|rt| {
                rt.block_on(tokio::signal::ctrl_c())?;
                Ok(())
            });
            drop(stop);
            waited
        })?;
        tracing::info!("Ctrl-C: stopping");
    }
    runtime.shutdown();
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in `format`.
/// Text carries ANSI colour escapes only when stderr is a terminal and
/// `NO_COLOR` is unset or empty (<https://no-color.org>), so a log
/// redirected to a file is plain text; JSON is one object per line
/// (`timestamp`, `level`, `fields.message`, the event's other fields).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).try_init()
        }
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}
