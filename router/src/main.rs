//! `router`: a thread-per-core TCP router. It reads each connection's first
//! packet (TLS SNI, HTTP `Host`, or a `ROUTE name [token]` preamble), picks a
//! backend, and splices the two sockets inside the kernel with eBPF.
use std::{
    io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use router::{
    config::{
        AccessLog, Config, Mode, ProxyProtocol, parse_addr, parse_drain_timeout, parse_idle_timeout,
    },
    demo::{self, DemoBackends},
    logging, startup,
    watch::ConfigWatch,
};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "router",
    version,
    about = "Thread-per-core L4 router: routes TCP connections on their first packet \
             (TLS SNI, HTTP Host, preamble) and splices them inside the kernel with eBPF",
    after_help = "Examples:\n  \
        router --demo                                 # demo backends + routes, prints commands to try\n  \
        router --config router.toml                   # see router.example.toml\n  \
        router --config router.toml --check-config    # validate and exit\n  \
        router --listen 127.0.0.1:8080 --route host:a.test=127.0.0.1:9001 \\\n      \
        --route sni:b.test=127.0.0.1:9002,127.0.0.1:9003 --route default=127.0.0.1:9004\n  \
        router ... --route preamble:db:s3cret=127.0.0.1:5432   # clients send \"ROUTE db s3cret\\r\\n\" first\n  \
        router ... --route host:a.test=127.0.0.1:9001,127.0.0.1:9002,proxy_protocol=v2,balance=least-connections\n  \
        router ... --route default=db1.internal:5432,weight=3,db2.internal:5432,connect_retries=1 --idle-timeout 30m\n  \
        router --config router.toml --metrics 127.0.0.1:9100   # curl 127.0.0.1:9100/metrics\n  \
        router ... --log-level debug                  # one line per closed connection too\n  \
        kill -USR1 <pid>                              # print counters now\n  \
        kill -HUP <pid>                               # reload the config file (bad one: kept old)\n  \
        router --config router.toml --watch-config    # reload when the file changes (ConfigMap)\n  \
        router --config router.toml --upgrade-from /run/router/upgrade.sock  # new binary takes over\n  \
        systemctl reload router                       # packaging/router.service: check, then SIGHUP\n  \
        kill -TERM <pid>                              # drain (--drain-timeout), again: exit now"
)]
#[derive(Clone)]
struct Cli {
    /// TOML configuration file (see router.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
    /// Address to listen on (repeatable; adds to the file's `listen`).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    listen: Vec<SocketAddr>,
    /// A route: host:NAME=ADDR[,ADDR...], sni:NAME=..., preamble:NAME[:TOKEN]=..., default=...;
    /// an ADDR is IP:PORT or NAME:PORT (a DNS name: every address it resolves to), optionally
    /// followed by weight=N; options among the addresses: proxy_protocol=v1|v2,
    /// balance=least-connections, http_close=true, connect_retries=N, idle_timeout=DURATION
    /// (repeatable; tried after the file's routes, in order; health checks: config file).
    #[arg(long, value_name = "SPEC")]
    route: Vec<String>,
    /// Executors, one pinned per core [default: all online cores].
    #[arg(long)]
    cores: Option<usize>,
    /// auto: splice in the kernel where the probe loads, else copy (logged);
    /// ebpf: splice or fail; copy: always copy in userspace.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Connections open at once over every listener [default: what the
    /// open-files limit allows]; more are closed at once (refused_limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Connections open at once on each listen address.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_listener: Option<u64>,
    /// Print a `stats:` line every --stats-interval seconds, and at exit.
    #[arg(long)]
    stats: bool,
    /// Seconds between two --stats lines.
    #[arg(long, default_value_t = 1.0)]
    stats_interval: f64,
    /// Run the demo: start three demo backends (HTTP, TLS, echo) and route to
    /// them with an embedded configuration; prints commands to try.
    #[arg(long)]
    demo: bool,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`), with `GET /healthz`
    /// (liveness) and `GET /readyz` (readiness).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    metrics: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, how long live connections may go on before the
    /// router exits (e.g. 30s, 2m, 0s) [default: 30s, or the file's].
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_timeout)]
    drain_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long to keep accepting, with /readyz already
    /// answering 503, before closing the listeners, so that balancers stop
    /// sending first (e.g. 1s) [default: 0s, or the file's].
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_timeout)]
    drain_delay: Option<Duration>,
    /// Close a forwarded connection after this long without a byte either
    /// way (e.g. 1h, 30s; 0s: never) [default: 1h, or the file's].
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_timeout)]
    idle_timeout: Option<Duration>,
    /// In ebpf mode, bytes a direction of a connection carries in userspace
    /// before the kernel takes it over: short exchanges never pay the
    /// splice's set-up (0: splice from the first packet on) [default:
    /// 16384, or the file's `splice_after`].
    #[arg(long, value_name = "BYTES")]
    splice_after: Option<u64>,
    /// Log level: error, warn, info (default), debug (adds a line per
    /// closed connection), trace, or a tracing filter such as
    /// `router=debug`. Takes precedence over RUST_LOG.
    #[arg(long, alias = "log", value_name = "FILTER")]
    log_level: Option<String>,
    /// Access log: one line per connection at its end, as `text` (default),
    /// `json`, or `off` [default: the file's `access_log`, else text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    access_log: Option<AccessLog>,
    /// Write the access log to FILE instead of stderr (reopened on SIGHUP
    /// and SIGUSR2, for logrotate).
    #[arg(long, value_name = "FILE")]
    access_log_file: Option<PathBuf>,
    /// Every --listen address expects a PROXY protocol header (v1 or v2)
    /// from a load balancer in front; connections without one are refused.
    #[arg(long)]
    accept_proxy: bool,
    /// Reload when the --config file changes (checked every second), as on
    /// SIGHUP: for a Kubernetes ConfigMap [default: off, or the file's
    /// `watch_config`].
    #[arg(long)]
    watch_config: bool,
    /// Where this router offers its listeners to a new binary (a unix
    /// socket, mode 0600) [default: /run/router/upgrade.sock, if it can be
    /// bound and no other router holds it].
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// Start as the new binary of an upgrade: take the listeners over from
    /// the router offering itself on PATH (its --upgrade-socket) instead of
    /// binding them; that router then finishes its connections and exits.
    /// The other flags are as usual.
    #[arg(long, value_name = "PATH")]
    upgrade_from: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // --log-level, else RUST_LOG, else info.
    let filter = match &cli.log_level {
        Some(level) => match logging::filter(level) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!("router: error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logging::OneLineStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("router: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !(0.01..=86400.0).contains(&cli.stats_interval) {
        anyhow::bail!("--stats-interval: give seconds between 0.01 and 86400");
    }
    // Before any thread starts (the demo's backends): only the main thread
    // takes SIGHUP, SIGTERM and the others, whose default would kill us.
    splice::runtime::block_signals().context("blocking signals")?;
    let demo_backends = if cli.demo {
        Some(Arc::new(
            demo::start().context("starting the demo backends")?,
        ))
    } else {
        None
    };
    // Before the file is read, so that a change in between is noticed.
    let watch = match (&cli.config, &demo_backends) {
        (Some(path), None) => Some(ConfigWatch::new(path.clone())),
        _ => None,
    };
    let config = build_config(&cli, demo_backends.as_deref())?;
    if cli.check_config {
        println!("configuration ok: {}", summary(&config));
        return Ok(());
    }
    // The demo backends live as long as the router (the callback only
    // borrows them to print the instructions).
    let demo_for_ready = demo_backends.clone();
    let demo_for_reload = demo_backends.clone();
    let reload_cli = cli.clone();
    let options = startup::RunOptions {
        stats_interval: cli
            .stats
            .then(|| Duration::from_secs_f64(cli.stats_interval)),
        on_ready: Box::new(move |bound| {
            println!(
                "router: listening on {}",
                bound
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(backends) = &demo_for_ready {
                println!("{}", backends.instructions(bound[0]));
            }
            let _ = std::io::stdout().flush();
        }),
        reload: Box::new(move || build_config(&reload_cli, demo_for_reload.as_deref())),
        watch,
        upgrade_from: cli.upgrade_from.clone(),
        upgrade_socket: match &cli.upgrade_socket {
            Some(path) => router::upgrade::SocketOption {
                path: path.clone(),
                explicit: true,
            },
            None => router::upgrade::SocketOption {
                path: PathBuf::from(router::upgrade::socket::DEFAULT_PATH),
                explicit: false,
            },
        },
    };
    let result = startup::run(config, options);
    drop(demo_backends);
    result
}

/// The configuration: the file's (or the demo's), then the command line's
/// additions and overrides, validated. Run at start and on every SIGHUP.
fn build_config(cli: &Cli, demo: Option<&DemoBackends>) -> anyhow::Result<Config> {
    let mut config = if let Some(backends) = demo {
        backends.config()
    } else if let Some(path) = &cli.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::from_toml(&text, &path.display().to_string())?
    } else {
        Config::default()
    };
    if demo.is_some() && !cli.listen.is_empty() {
        // The demo's own address gives way to the one asked for.
        config.listen.clear();
    }
    config.listen.extend(&cli.listen);
    if cli.accept_proxy {
        config.accept_proxy.extend(&cli.listen);
    }
    if let Some(format) = cli.access_log {
        config.access_log = format;
    }
    if let Some(path) = &cli.access_log_file {
        config.access_log_file = Some(path.clone());
    }
    for spec in &cli.route {
        config.add_route_flag(spec)?;
    }
    if let Some(cores) = cli.cores {
        anyhow::ensure!(cores > 0, "--cores must be at least 1");
        config.cores = Some(cores);
    }
    if let Some(mode) = cli.mode {
        config.mode = mode;
    }
    if let Some(addr) = cli.metrics {
        config.metrics = Some(addr);
    }
    if let Some(timeout) = cli.drain_timeout {
        config.drain_timeout = timeout;
    }
    if let Some(delay) = cli.drain_delay {
        config.drain_delay = delay;
    }
    if let Some(timeout) = cli.idle_timeout {
        config.idle_timeout = timeout;
    }
    if let Some(bytes) = cli.splice_after {
        config.splice_after = bytes;
    }
    if let Some(max) = cli.max_connections {
        config.max_connections = Some(usize::try_from(max)?);
    }
    if let Some(max) = cli.max_connections_per_listener {
        config.max_connections_per_listener = Some(usize::try_from(max)?);
    }
    if cli.watch_config {
        config.watch_config = true;
    }
    anyhow::ensure!(
        !config.watch_config || (cli.config.is_some() && demo.is_none()),
        "watch_config watches the --config file: give --config FILE"
    );
    config.validate().map_err(|e| match &cli.config {
        Some(path) if demo.is_none() => anyhow::anyhow!("{}: {e}", path.display()),
        _ => anyhow::anyhow!("{e} (give --config FILE, or --listen and --route)"),
    })?;
    router::resolve::resolve_names(&mut config).map_err(|e| match &cli.config {
        Some(path) if demo.is_none() => anyhow::anyhow!("{}: {e:#}", path.display()),
        _ => e,
    })?;
    Ok(config)
}

fn summary(config: &Config) -> String {
    let routes: Vec<String> = config
        .routes
        .iter()
        .map(|r| {
            let mut line = format!("{} -> {} backend(s)", r.name, r.backends.len());
            if let Some(version) = r.proxy_protocol {
                let version = match version {
                    ProxyProtocol::V1 => "v1",
                    ProxyProtocol::V2 => "v2",
                };
                line.push_str(&format!(" with PROXY protocol {version}"));
            }
            if let Some(check) = r.health_check {
                line.push_str(&format!(
                    ", checked every {}",
                    humantime::format_duration(check.interval)
                ));
            }
            line
        })
        .collect();
    format!(
        "{} listener(s), {} route(s): {}",
        config.listen.len(),
        config.routes.len(),
        routes.join(", ")
    )
}
