//! The router's configuration: a TOML file (`router --config`) or the
//! `--listen`/`--route` flags, validated before anything starts, with errors
//! that name the line and field. `router.example.toml` documents every key.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// How connections are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Splice in the kernel where the probe loads; otherwise copy (logged).
    Auto,
    /// Splice in the kernel; fail at start if the probe cannot load.
    Ebpf,
    /// Copy every byte in userspace (the original article's naive loop).
    Copy,
}

/// How a route picks among its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
}

/// Which PROXY protocol header a route sends its backends before the
/// client's bytes, so that they see the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 <client> <router> <port> <port>\r\n`.
    V1,
    /// The binary header (12-byte signature, then the addresses).
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            _ => Err(format!("`{text}`: the PROXY protocol version is v1 or v2")),
        }
    }
}

/// The access log's format: one line per connection at its end
/// ([`crate::access_log`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// `key=value` pairs.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

/// Active health checks of a route's backends: a TCP connect every
/// `interval`, failed past `timeout`; `fall` failures in a row (checks or
/// client connections) mark a backend down, `rise` successful checks in a
/// row mark it up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthCheck {
    /// HAProxy's defaults (`inter 2s rise 2 fall 3`), with a 1 s timeout.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// What a route matches on the first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// HTTP/1.x `Host` header.
    Host(Pattern),
    /// TLS ClientHello server name.
    Sni(Pattern),
    /// `ROUTE <name> [token]\r\n` preamble naming this route.
    Preamble {
        name: String,
        token: Option<Secret>,
        /// Forward the preamble line too (default: strip it).
        keep: bool,
    },
    /// Anything no earlier route took.
    Default,
}

/// A host name: exact, or `*.suffix` (any name ending in `.suffix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Suffix(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (suffix, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = crate::host::normalize(name.as_bytes())
            .ok_or_else(|| format!("`{text}` is not a host name or `*.suffix` pattern"))?;
        Ok(if suffix {
            Self::Suffix(name)
        } else {
            Self::Exact(name)
        })
    }

    /// Whether `name` (already lower-cased, without port or final dot)
    /// matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::Suffix(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// One route, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    /// The backends as configured: addresses, or names to resolve.
    pub targets: Vec<Target>,
    /// Every backend address: each target's, in order (a name gives as many
    /// as it resolves to). Balancing, health and counters go by these.
    pub backends: Vec<SocketAddr>,
    /// The weight of each of `backends` (same index): its target's.
    pub weights: Vec<u32>,
    /// How long a forwarded connection may move no byte before it is
    /// closed (`None`: the top-level `idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Backends tried again after a failed connect (`None`: the top-level
    /// `connect_retries`).
    pub connect_retries: Option<u32>,
    pub balance: Balance,
    /// Send the backend a PROXY protocol header first (default: none).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Check the backends (default: `None`, no checks: every connection
    /// tries the pool in order).
    pub health_check: Option<HealthCheck>,
    /// Make the backend close an HTTP connection after its first response
    /// (the request goes out with `Connection: close`): later requests on a
    /// kept-alive connection are not routed, so this keeps them from
    /// reaching another virtual host of the backend.
    pub http_close: bool,
}

impl Default for Route {
    /// A `default` route without backends: the base the parsers fill in.
    fn default() -> Self {
        Self {
            name: String::new(),
            matcher: Matcher::Default,
            targets: Vec::new(),
            backends: Vec::new(),
            weights: Vec::new(),
            idle_timeout: None,
            connect_retries: None,
            balance: Balance::default(),
            proxy_protocol: None,
            health_check: None,
            http_close: false,
        }
    }
}

impl Route {
    /// `options` with its name, matcher and targets, and the addresses of
    /// those targets.
    fn new(name: String, matcher: Matcher, targets: Vec<Target>, options: Route) -> Self {
        let mut route = Route {
            name,
            matcher,
            targets,
            ..options
        };
        route.expand();
        route
    }

    /// Rebuilds `backends` and `weights` from the targets.
    fn expand(&mut self) {
        self.backends.clear();
        self.weights.clear();
        for target in &self.targets {
            for addr in target.addrs() {
                self.backends.push(addr);
                self.weights.push(target.weight);
            }
        }
    }
}

/// A backend as configured: an address or a name (resolved at start, on
/// reload and every `resolve_interval`), with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
    /// Its share of the route's connections, relative to the others'
    /// (1 to 256; a name's addresses each get it).
    pub weight: u32,
}

/// Where a target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Ip(IpAddr),
    /// A DNS name, with the addresses it last resolved to (empty until
    /// resolved).
    Name {
        name: String,
        addrs: Vec<IpAddr>,
    },
}

impl Target {
    /// The addresses it stands for now.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let ips = match &self.host {
            TargetHost::Ip(ip) => std::slice::from_ref(ip),
            TargetHost::Name { addrs, .. } => addrs.as_slice(),
        };
        ips.iter().map(|ip| SocketAddr::new(*ip, self.port))
    }

    /// The name to resolve, if it is one.
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            TargetHost::Ip(_) => None,
            TargetHost::Name { name, .. } => Some(name),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TargetHost::Name { name, .. } => write!(f, "{name}:{}", self.port),
            TargetHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
        }
    }
}

/// TCP keepalive on both sockets of a connection: after `idle` without
/// traffic, a probe every `interval`; `count` unanswered ones end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Default for Keepalive {
    /// A dead peer is found within about 2 minutes of silence (Linux's own
    /// defaults take over 2 hours).
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub cores: Option<usize>,
    pub mode: Mode,
    pub first_packet_timeout: Duration,
    pub first_packet_max: usize,
    pub connect_timeout: Duration,
    pub in_flight_limit: u64,
    pub sockmap_capacity: u32,
    /// Bytes a direction of a connection carries in userspace before the
    /// kernel takes it over (0: spliced from the first packet on).
    pub splice_after: u64,
    /// Health checks of the routes that do not set theirs (`None`: off).
    pub health_check: Option<HealthCheck>,
    /// Where to serve Prometheus metrics (`GET /metrics`) and `GET /healthz`.
    pub metrics: Option<SocketAddr>,
    /// How long a stopping router lets live connections finish.
    pub drain_timeout: Duration,
    /// How long a stopping router keeps accepting, with `/readyz` already
    /// answering 503, before it closes its listeners.
    pub drain_delay: Duration,
    /// Connections open at once over every listener and core; `None`: as
    /// many as the open-files limit allows (two descriptors each).
    pub max_connections: Option<usize>,
    /// Connections open at once on each listen address (over every core).
    pub max_connections_per_listener: Option<usize>,
    /// Reload when the configuration file changes, as on SIGHUP (for a
    /// Kubernetes ConfigMap, which is swapped in place).
    pub watch_config: bool,
    /// How long a forwarded connection may move no byte either way before
    /// it is closed on both sides (`Duration::ZERO`: never).
    pub idle_timeout: Duration,
    /// TCP keepalive on client and backend sockets (`None`: off).
    pub tcp_keepalive: Option<Keepalive>,
    /// Backends tried again after a failed connect, for routes that do not
    /// set theirs (`None`: each backend of the route once).
    pub connect_retries: Option<u32>,
    /// How often backend names are resolved again.
    pub resolve_interval: Duration,
    /// The DNS servers to ask (empty: those of /etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
    pub routes: Vec<Route>,
    /// The listen addresses that expect a PROXY protocol header (v1 or v2)
    /// from a load balancer in front before the client's bytes.
    pub accept_proxy: Vec<SocketAddr>,
    /// The access log's format (`off`: none).
    pub access_log: AccessLog,
    /// Where the access log goes (`None`: stderr).
    pub access_log_file: Option<PathBuf>,
}

/// Default of [`Config::splice_after`]: see docs/performance.md, "Lazy
/// splice", for the measurements that chose it.
pub const DEFAULT_SPLICE_AFTER: u64 = 16 * 1024;

/// HAProxy's usual `timeout client`/`timeout server`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            cores: None,
            mode: Mode::Auto,
            first_packet_timeout: Duration::from_secs(5),
            first_packet_max: 16 * 1024,
            connect_timeout: Duration::from_secs(2),
            in_flight_limit: 64 << 20,
            sockmap_capacity: 32 * 1024,
            splice_after: DEFAULT_SPLICE_AFTER,
            health_check: None,
            metrics: None,
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            max_connections: None,
            max_connections_per_listener: None,
            watch_config: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            tcp_keepalive: Some(Keepalive::default()),
            connect_retries: None,
            resolve_interval: Duration::from_secs(30),
            resolvers: Vec::new(),
            routes: Vec::new(),
            accept_proxy: Vec::new(),
            access_log: AccessLog::Text,
            access_log_file: None,
        }
    }
}

/// A secret (a preamble token): shown as `<redacted>` by `Debug`, so that
/// no log line or debug dump of the configuration or of a first packet can
/// reveal it. Routes compare it in constant time ([`crate::routes`]); the
/// derived `PartialEq` is for tests and configuration comparisons only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the constant-time comparison.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configuration error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: Vec<Spanned<RawListen>>,
    cores: Option<Spanned<usize>>,
    mode: Option<Mode>,
    first_packet_timeout: Option<Spanned<String>>,
    first_packet_max: Option<Spanned<usize>>,
    connect_timeout: Option<Spanned<String>>,
    in_flight_limit: Option<Spanned<u64>>,
    sockmap_capacity: Option<Spanned<u32>>,
    splice_after: Option<u64>,
    health_check: Option<RawHealthCheck>,
    metrics: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    drain_delay: Option<Spanned<String>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_listener: Option<Spanned<usize>>,
    idle_timeout: Option<Spanned<String>>,
    tcp_keepalive: Option<RawKeepalive>,
    connect_retries: Option<Spanned<u32>>,
    resolve_interval: Option<Spanned<String>>,
    resolvers: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    watch_config: bool,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    access_log: Option<AccessLog>,
    access_log_file: Option<String>,
}

/// A `listen` entry: an address, or a table with the listener's options.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawListen {
    Address(String),
    Options(RawListenOptions),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenOptions {
    address: String,
    #[serde(default)]
    accept_proxy: bool,
}

/// A `tcp_keepalive` table, over the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    enabled: Option<bool>,
    idle: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    count: Option<Spanned<u32>>,
}

/// A backend in the file: `"ADDR"`, or `{ address = "ADDR", weight = N }`.
struct RawBackend {
    address: String,
    weight: Option<u32>,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            weight: Option<u32>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address (\"IP:PORT\" or \"NAME:PORT\") or { address = ..., weight = N }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawBackend, E> {
                Ok(RawBackend {
                    address: text.to_owned(),
                    weight: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawBackend, A::Error> {
                let table = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBackend {
                    address: table.address,
                    weight: table.weight,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A `health_check` table: each key overrides the one it is layered on
/// (the built-in defaults, then the top-level table for a route's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    enabled: Option<bool>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    host: Option<Spanned<String>>,
    sni: Option<Spanned<String>>,
    preamble: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    #[serde(default)]
    keep_preamble: bool,
    #[serde(default)]
    default: bool,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    balance: Balance,
    idle_timeout: Option<Spanned<String>>,
    connect_retries: Option<Spanned<u32>>,
    proxy_protocol: Option<ProxyProtocol>,
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    http_close: bool,
}

/// Where a span starts, as `line N`.
struct Source<'a>(&'a str);

impl Source<'_> {
    fn at(&self, span: Range<usize>) -> String {
        let line = self.0[..span.start.min(self.0.len())].matches('\n').count() + 1;
        format!("line {line}")
    }
}

impl Config {
    /// Parses a TOML configuration and checks each field; `origin` names it
    /// in errors. What concerns the whole (`validate`) is checked once the
    /// command line's `--listen` and `--route` are merged in.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let source = Source(text);
        // One line: the error's own text quotes the file over several.
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| format!("{}: ", source.at(span)));
            let message = if e.message().contains("untagged enum RawListen") {
                "a `listen` entry is \"IP:port\" or { address = \"IP:port\", accept_proxy = true }"
                    .to_owned()
            } else {
                e.message().split_whitespace().collect::<Vec<_>>().join(" ")
            };
            ConfigError(format!("{origin}: {}{message}", at.unwrap_or_default()))
        })?;
        let fail = |span: Range<usize>, field: &str, message: String| {
            ConfigError(format!("{origin}: {}: {field}: {message}", source.at(span)))
        };
        let mut config = Config::default();
        for entry in &raw.listen {
            let (text, accept_proxy) = match entry.get_ref() {
                RawListen::Address(text) => (text, false),
                RawListen::Options(options) => (&options.address, options.accept_proxy),
            };
            let addr = parse_addr(text).map_err(|m| fail(entry.span(), "listen", m))?;
            config.listen.push(addr);
            if accept_proxy {
                config.accept_proxy.push(addr);
            }
        }
        if let Some(format) = raw.access_log {
            config.access_log = format;
        }
        config.access_log_file = raw.access_log_file.map(PathBuf::from);
        if let Some(cores) = &raw.cores {
            if *cores.get_ref() == 0 {
                return Err(fail(cores.span(), "cores", "must be at least 1".into()));
            }
            config.cores = Some(*cores.get_ref());
        }
        if let Some(mode) = raw.mode {
            config.mode = mode;
        }
        if let Some(timeout) = &raw.first_packet_timeout {
            config.first_packet_timeout = parse_duration(timeout.get_ref())
                .map_err(|m| fail(timeout.span(), "first_packet_timeout", m))?;
        }
        if let Some(max) = &raw.first_packet_max {
            if !(64..=1 << 20).contains(max.get_ref()) {
                return Err(fail(
                    max.span(),
                    "first_packet_max",
                    "must be between 64 and 1048576 bytes".into(),
                ));
            }
            config.first_packet_max = *max.get_ref();
        }
        if let Some(timeout) = &raw.connect_timeout {
            config.connect_timeout = parse_duration(timeout.get_ref())
                .map_err(|m| fail(timeout.span(), "connect_timeout", m))?;
        }
        if let Some(limit) = &raw.in_flight_limit {
            if *limit.get_ref() < 64 * 1024 {
                return Err(fail(
                    limit.span(),
                    "in_flight_limit",
                    "must be at least 65536 bytes".into(),
                ));
            }
            config.in_flight_limit = *limit.get_ref();
        }
        if let Some(capacity) = &raw.sockmap_capacity {
            if *capacity.get_ref() < 2 {
                return Err(fail(
                    capacity.span(),
                    "sockmap_capacity",
                    "must be at least 2 (a connection takes two slots)".into(),
                ));
            }
            config.sockmap_capacity = *capacity.get_ref();
        }
        if let Some(bytes) = raw.splice_after {
            config.splice_after = bytes;
        }
        // The top-level table is the base of every route's, even when it
        // leaves checks off by default.
        let mut health_base = HealthCheck::default();
        if let Some(table) = &raw.health_check {
            let (enabled, check) = table
                .resolve(health_base)
                .map_err(|(span, key, m)| fail(span, &format!("health_check.{key}"), m))?;
            health_base = check;
            config.health_check = enabled.then_some(check);
        }
        if let Some(addr) = &raw.metrics {
            config.metrics =
                Some(parse_addr(addr.get_ref()).map_err(|m| fail(addr.span(), "metrics", m))?);
        }
        for (value, field, target) in [
            (
                &raw.drain_timeout,
                "drain_timeout",
                &mut config.drain_timeout,
            ),
            (&raw.drain_delay, "drain_delay", &mut config.drain_delay),
        ] {
            if let Some(text) = value {
                *target =
                    parse_drain_timeout(text.get_ref()).map_err(|m| fail(text.span(), field, m))?;
            }
        }
        for (value, field, target) in [
            (
                &raw.max_connections,
                "max_connections",
                &mut config.max_connections,
            ),
            (
                &raw.max_connections_per_listener,
                "max_connections_per_listener",
                &mut config.max_connections_per_listener,
            ),
        ] {
            if let Some(limit) = value {
                if *limit.get_ref() == 0 {
                    return Err(fail(limit.span(), field, "must be at least 1".into()));
                }
                *target = Some(*limit.get_ref());
            }
        }
        config.watch_config = raw.watch_config;
        if let Some(timeout) = &raw.idle_timeout {
            config.idle_timeout = parse_idle_timeout(timeout.get_ref())
                .map_err(|m| fail(timeout.span(), "idle_timeout", m))?;
        }
        if let Some(table) = &raw.tcp_keepalive {
            config.tcp_keepalive = table
                .resolve()
                .map_err(|(span, key, m)| fail(span, &format!("tcp_keepalive.{key}"), m))?;
        }
        if let Some(retries) = &raw.connect_retries {
            config.connect_retries = Some(
                check_retries(*retries.get_ref())
                    .map_err(|m| fail(retries.span(), "connect_retries", m))?,
            );
        }
        if let Some(interval) = &raw.resolve_interval {
            config.resolve_interval = parse_duration(interval.get_ref())
                .map_err(|m| fail(interval.span(), "resolve_interval", m))?;
        }
        for server in raw.resolvers.iter().flatten() {
            config.resolvers.push(
                parse_resolver(server.get_ref())
                    .map_err(|m| fail(server.span(), "resolvers", m))?,
            );
        }
        for (i, spanned) in raw.route.iter().enumerate() {
            let route = spanned.get_ref();
            let field = |name: &str| format!("route[{i}] ({}).{name}", route.name.get_ref());
            let matchers = [
                route.host.is_some(),
                route.sni.is_some(),
                route.preamble.is_some(),
                route.default,
            ]
            .iter()
            .filter(|set| **set)
            .count();
            if matchers != 1 {
                return Err(fail(
                    spanned.span(),
                    &format!("route[{i}] ({})", route.name.get_ref()),
                    "needs exactly one of `host`, `sni`, `preamble` or `default = true`".into(),
                ));
            }
            let pattern = |value: &Spanned<String>, name: &str| {
                Pattern::parse(value.get_ref()).map_err(|m| fail(value.span(), &field(name), m))
            };
            let matcher = if let Some(host) = &route.host {
                Matcher::Host(pattern(host, "host")?)
            } else if let Some(sni) = &route.sni {
                Matcher::Sni(pattern(sni, "sni")?)
            } else if let Some(name) = &route.preamble {
                validate_route_name(name.get_ref())
                    .map_err(|m| fail(name.span(), &field("preamble"), m))?;
                if let Some(token) = &route.token {
                    validate_token(token.get_ref())
                        .map_err(|m| fail(token.span(), &field("token"), m))?;
                }
                Matcher::Preamble {
                    name: name.get_ref().clone(),
                    token: route
                        .token
                        .as_ref()
                        .map(|t| Secret::from(t.get_ref().as_str())),
                    keep: route.keep_preamble,
                }
            } else {
                Matcher::Default
            };
            if let Some(token) = &route.token
                && !matches!(matcher, Matcher::Preamble { .. })
            {
                return Err(fail(
                    token.span(),
                    &field("token"),
                    "only a `preamble` route takes a token".into(),
                ));
            }
            let targets = route
                .backends
                .iter()
                .map(|b| {
                    let raw = b.get_ref();
                    let mut target = parse_target(&raw.address)?;
                    if let Some(weight) = raw.weight {
                        target.weight = check_weight(weight)?;
                    }
                    Ok(target)
                })
                .zip(&route.backends)
                .map(|(target, b)| target.map_err(|m| fail(b.span(), &field("backends"), m)))
                .collect::<Result<Vec<_>, _>>()?;
            let idle_timeout = match &route.idle_timeout {
                Some(timeout) => Some(
                    parse_idle_timeout(timeout.get_ref())
                        .map_err(|m| fail(timeout.span(), &field("idle_timeout"), m))?,
                ),
                None => None,
            };
            let connect_retries = match &route.connect_retries {
                Some(retries) => Some(
                    check_retries(*retries.get_ref())
                        .map_err(|m| fail(retries.span(), &field("connect_retries"), m))?,
                ),
                None => None,
            };
            let health_check = match &route.health_check {
                None => config.health_check,
                Some(table) => {
                    let (enabled, check) =
                        table.resolve(health_base).map_err(|(span, key, m)| {
                            fail(span, &field(&format!("health_check.{key}")), m)
                        })?;
                    enabled.then_some(check)
                }
            };
            config.routes.push(Route::new(
                route.name.get_ref().clone(),
                matcher,
                targets,
                Route {
                    balance: route.balance,
                    proxy_protocol: route.proxy_protocol,
                    health_check,
                    http_close: route.http_close,
                    idle_timeout,
                    connect_retries,
                    ..Route::default()
                },
            ));
            config.validate_route(i).map_err(|m| {
                fail(
                    spanned.span(),
                    &format!("route[{i}] ({})", route.name.get_ref()),
                    m,
                )
            })?;
        }
        Ok(config)
    }

    fn validate_route(&self, index: usize) -> Result<(), String> {
        let route = &self.routes[index];
        if route.targets.is_empty() {
            return Err("`backends` must list at least one address".into());
        }
        if self.routes[..index].iter().any(|r| r.name == route.name) {
            return Err(format!("route name `{}` is used twice", route.name));
        }
        if self.routes[..index]
            .iter()
            .any(|r| r.matcher == Matcher::Default)
        {
            return Err(
                "comes after the `default` route, which takes everything: move `default` last"
                    .into(),
            );
        }
        if route.http_close && !matches!(route.matcher, Matcher::Host(_) | Matcher::Default) {
            return Err("`http_close` applies to HTTP: a `host` or `default` route".into());
        }
        if let Matcher::Preamble { name, .. } = &route.matcher {
            let taken = self.routes[..index].iter().any(
                |r| matches!(&r.matcher, Matcher::Preamble { name: other, .. } if other == name),
            );
            if taken {
                return Err(format!("preamble name `{name}` is used twice"));
            }
        }
        Ok(())
    }

    /// The idle timeout of `route`'s connections (`ZERO`: none).
    pub fn idle_timeout_of(&self, route: &Route) -> Duration {
        route.idle_timeout.unwrap_or(self.idle_timeout)
    }

    /// How many connects a connection of `route` may try: one, then
    /// `connect_retries` more; by default each backend once.
    pub fn connect_attempts_of(&self, route: &Route) -> usize {
        match route.connect_retries.or(self.connect_retries) {
            Some(retries) => retries as usize + 1,
            None => route.backends.len(),
        }
    }

    /// Whether any backend is given by name.
    pub fn has_names(&self) -> bool {
        self.routes
            .iter()
            .flat_map(|r| &r.targets)
            .any(|t| t.name().is_some())
    }

    /// Resolves every backend name with `lookup`, as at start: a name that
    /// does not resolve is an error naming the route, the backend and why.
    pub fn resolve_names(
        &mut self,
        lookup: &mut dyn FnMut(&str) -> Result<Vec<IpAddr>, String>,
    ) -> Result<(), String> {
        for route in &mut self.routes {
            for target in &mut route.targets {
                let shown = target.to_string();
                if let TargetHost::Name { name, addrs } = &mut target.host {
                    *addrs = lookup(name).map_err(|why| {
                        format!(
                            "route `{}`: backend `{shown}`: cannot resolve `{name}`: {why}",
                            route.name
                        )
                    })?;
                }
            }
            route.expand();
        }
        Ok(())
    }

    /// The configuration with its backend names resolved again, or `None`
    /// if no address changed. A name that no longer resolves keeps its last
    /// addresses; `failed` hears of it (route, backend, why).
    pub fn re_resolved(
        &self,
        lookup: &mut dyn FnMut(&str) -> Result<Vec<IpAddr>, String>,
        failed: &mut dyn FnMut(&str, &Target, &str),
    ) -> Option<Config> {
        let mut new = self.clone();
        for route in &mut new.routes {
            for target in &mut route.targets {
                let Some(name) = target.name() else { continue };
                match lookup(name) {
                    Ok(found) => {
                        if let TargetHost::Name { addrs, .. } = &mut target.host {
                            *addrs = found;
                        }
                    }
                    Err(why) => failed(&route.name, target, &why),
                }
            }
            route.expand();
        }
        (new.routes != self.routes).then_some(new)
    }

    /// Checks what concerns the whole configuration.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("no `listen` address".into());
        }
        if self.routes.is_empty() {
            return Err("no route: add a `[[route]]` (or `--route`)".into());
        }
        Ok(())
    }

    /// Adds a route given as `--route` (`host:NAME=ADDR[,ADDR...]`,
    /// `sni:NAME=...`, `preamble:NAME[:TOKEN]=...`, `default=...`), with
    /// options among the addresses: `proxy_protocol=v1|v2`,
    /// `balance=round-robin|least-connections`, `http_close=true`.
    pub fn add_route_flag(&mut self, spec: &str) -> Result<(), ConfigError> {
        let shown = redact_route_flag(spec);
        let fail = |m: String| ConfigError(format!("--route {shown}: {m}"));
        let (matcher, addrs) = spec.split_once('=').ok_or_else(|| {
            fail("expected KIND:NAME=ADDR[,ADDR...] or default=ADDR[,...]".into())
        })?;
        let mut targets: Vec<Target> = Vec::new();
        let mut options = Route::default();
        for item in addrs.split(',').map(str::trim) {
            // An address never holds `=`: an item that does is an option.
            match item.split_once('=') {
                None => targets.push(parse_target(item).map_err(&fail)?),
                Some(("weight", weight)) => {
                    let Some(target) = targets.last_mut() else {
                        return Err(fail("`weight=N` follows the address it weighs".into()));
                    };
                    let weight = weight
                        .parse()
                        .map_err(|_| format!("`{weight}`: a weight is a number"))
                        .and_then(check_weight)
                        .map_err(&fail)?;
                    target.weight = weight;
                }
                Some(("connect_retries", retries)) => {
                    let retries = retries
                        .parse()
                        .map_err(|_| format!("`{retries}`: connect_retries is a number"))
                        .and_then(check_retries)
                        .map_err(&fail)?;
                    options.connect_retries = Some(retries);
                }
                Some(("idle_timeout", timeout)) => {
                    options.idle_timeout = Some(parse_idle_timeout(timeout).map_err(&fail)?);
                }
                Some(("proxy_protocol", version)) => {
                    options.proxy_protocol = Some(version.parse().map_err(&fail)?);
                }
                Some(("balance", "round-robin")) => options.balance = Balance::RoundRobin,
                Some(("balance", "least-connections")) => {
                    options.balance = Balance::LeastConnections;
                }
                Some(("http_close", "true")) => options.http_close = true,
                Some(("http_close", "false")) => options.http_close = false,
                Some(("http_close", other)) => {
                    return Err(fail(format!("`{other}`: http_close is true or false")));
                }
                Some(("balance", other)) => {
                    return Err(fail(format!(
                        "`{other}`: balance is round-robin or least-connections"
                    )));
                }
                Some((option, _)) => {
                    return Err(fail(format!(
                        "unknown option `{option}` (options: weight=N after an address, \
                         proxy_protocol=v1|v2, balance=..., http_close=true, connect_retries=N, \
                         idle_timeout=DURATION)"
                    )));
                }
            }
        }
        let (matcher, name) = match matcher.split_once(':') {
            None if matcher == "default" => (Matcher::Default, "default".to_owned()),
            Some(("host", host)) => (
                Matcher::Host(Pattern::parse(host).map_err(&fail)?),
                format!("host:{host}"),
            ),
            Some(("sni", host)) => (
                Matcher::Sni(Pattern::parse(host).map_err(&fail)?),
                format!("sni:{host}"),
            ),
            Some(("preamble", rest)) => {
                let (name, token) = match rest.split_once(':') {
                    Some((name, token)) => (name, Some(Secret::from(token))),
                    None => (rest, None),
                };
                validate_route_name(name).map_err(&fail)?;
                if let Some(token) = &token {
                    validate_token(token.expose()).map_err(&fail)?;
                }
                (
                    Matcher::Preamble {
                        name: name.to_owned(),
                        token,
                        keep: false,
                    },
                    format!("preamble:{name}"),
                )
            }
            _ => {
                return Err(fail(
                    "kind must be host:, sni:, preamble: or default".into(),
                ));
            }
        };
        // Named after what it matches: the same whatever the flags' order.
        self.routes.push(Route::new(
            name,
            matcher,
            targets,
            Route {
                health_check: self.health_check,
                ..options
            },
        ));
        self.validate_route(self.routes.len() - 1).map_err(fail)
    }
}

impl RawHealthCheck {
    /// Layers this table over `base`: whether checks are on (`enabled`;
    /// writing the table turns them on) and their settings; an error names
    /// the key and where it is.
    fn resolve(
        &self,
        base: HealthCheck,
    ) -> Result<(bool, HealthCheck), (Range<usize>, &'static str, String)> {
        let mut check = base;
        if let Some(interval) = &self.interval {
            check.interval =
                parse_duration(interval.get_ref()).map_err(|m| (interval.span(), "interval", m))?;
        }
        if let Some(timeout) = &self.timeout {
            check.timeout =
                parse_duration(timeout.get_ref()).map_err(|m| (timeout.span(), "timeout", m))?;
        }
        for (value, target, key) in [
            (&self.rise, &mut check.rise, "rise"),
            (&self.fall, &mut check.fall, "fall"),
        ] {
            if let Some(value) = value {
                if !(1..=100).contains(value.get_ref()) {
                    return Err((value.span(), key, "must be between 1 and 100".into()));
                }
                *target = *value.get_ref();
            }
        }
        Ok((self.enabled.unwrap_or(true), check))
    }
}

impl RawKeepalive {
    /// Layers this table over the defaults: `None` when `enabled = false`;
    /// an error names the key and where it is.
    fn resolve(&self) -> Result<Option<Keepalive>, (Range<usize>, &'static str, String)> {
        let mut keepalive = Keepalive::default();
        for (value, target, key) in [
            (&self.idle, &mut keepalive.idle, "idle"),
            (&self.interval, &mut keepalive.interval, "interval"),
        ] {
            if let Some(value) = value {
                let duration =
                    parse_duration(value.get_ref()).map_err(|m| (value.span(), key, m))?;
                // The kernel counts these in whole seconds.
                if duration < Duration::from_secs(1) || duration > Duration::from_secs(32767) {
                    return Err((value.span(), key, "must be between 1s and 32767s".into()));
                }
                *target = duration;
            }
        }
        if let Some(count) = &self.count {
            if !(1..=127).contains(count.get_ref()) {
                return Err((count.span(), "count", "must be between 1 and 127".into()));
            }
            keepalive.count = *count.get_ref();
        }
        Ok(self.enabled.unwrap_or(true).then_some(keepalive))
    }
}

/// A backend address: `IP:PORT` (IPv6 in brackets), `localhost:PORT`, or
/// `NAME:PORT` (a DNS name, resolved later), of weight 1.
pub fn parse_target(text: &str) -> Result<Target, String> {
    let bad = || format!("`{text}` is not an IP:port or NAME:port address (IPv6 as [addr]:port)");
    let (host, port) = match parse_addr(text) {
        Ok(addr) => (TargetHost::Ip(addr.ip()), addr.port()),
        Err(_) => {
            let (name, port) = text.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| format!("`{text}`: bad port"))?;
            // A name has a letter somewhere: `1.2.3:80` is a typo, not a name.
            let name = crate::host::normalize(name.as_bytes())
                .filter(|n| n.bytes().any(|b| b.is_ascii_alphabetic()))
                .ok_or_else(bad)?;
            (
                TargetHost::Name {
                    name,
                    addrs: Vec::new(),
                },
                port,
            )
        }
    };
    Ok(Target {
        host,
        port,
        weight: 1,
    })
}

fn check_weight(weight: u32) -> Result<u32, String> {
    if (1..=256).contains(&weight) {
        Ok(weight)
    } else {
        Err(format!("weight {weight}: must be between 1 and 256"))
    }
}

fn check_retries(retries: u32) -> Result<u32, String> {
    if retries <= 100 {
        Ok(retries)
    } else {
        Err(format!("connect_retries {retries}: at most 100"))
    }
}

/// A DNS server: `IP` or `IP:PORT` (port 53 by default).
fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    text.parse().map_err(|_| {
        format!("`{text}` is not a DNS server address (IP or IP:PORT; IPv6 as [addr]:port)")
    })
}

/// Parses an idle timeout: a duration, where `0s` turns it off.
pub fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (e.g. \"1h\", \"30s\", \"0s\" for none)"))
}

/// A `--route` spec as errors show it: a preamble token replaced by
/// `<redacted>` (`preamble:db:s3cret=...` -> `preamble:db:<redacted>=...`).
fn redact_route_flag(spec: &str) -> String {
    let (matcher, addrs) = spec.split_once('=').unwrap_or((spec, ""));
    let equals = if spec.contains('=') { "=" } else { "" };
    match matcher
        .strip_prefix("preamble:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((name, _token)) => format!("preamble:{name}:<redacted>{equals}{addrs}"),
        None => spec.to_owned(),
    }
}

/// Parses an `IP:port` (IPv6 in brackets) or `localhost:port`.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| format!("`{text}`: bad port"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is not an IP:port address (IPv6 as [addr]:port)"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (e.g. \"5s\", \"250ms\")"))?;
    if duration.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(duration)
}

/// Parses a drain timeout: a duration, where `0s` means "do not wait".
pub fn parse_drain_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (e.g. \"30s\", \"2m\", \"0s\")"))?;
    if timeout > Duration::from_secs(24 * 3600) {
        return Err(format!("`{text}`: at most 24h"));
    }
    Ok(timeout)
}

/// Preamble route names: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn validate_route_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a route name (1 to 64 of A-Z a-z 0-9 . _ -)"
        ))
    }
}

/// Preamble tokens: 1 to 256 printable ASCII characters, no space.
pub fn validate_token(token: &str) -> Result<(), String> {
    let ok = (1..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err("a token is 1 to 256 printable ASCII characters without spaces".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = ["127.0.0.1:8080", "[::1]:8080"]
mode = "copy"
first_packet_timeout = "250ms"
metrics = "127.0.0.1:9100"
drain_timeout = "0s"
drain_delay = "1500ms"
watch_config = true
max_connections = 1000
max_connections_per_listener = 600

[[route]]
name = "api"
host = "api.example.com"
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
balance = "least-connections"

[[route]]
name = "tls"
sni = "*.example.com"
backends = ["127.0.0.1:9443"]

[[route]]
name = "db"
preamble = "db"
token = "s3cret"
backends = ["127.0.0.1:5432"]

[[route]]
name = "rest"
default = true
backends = ["127.0.0.1:9000"]
"#;

    #[test]
    fn a_full_configuration_parses() {
        let config = Config::from_toml(GOOD, "test.toml").unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.mode, Mode::Copy);
        assert_eq!(config.first_packet_timeout, Duration::from_millis(250));
        assert_eq!(config.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(config.drain_timeout, Duration::ZERO);
        assert_eq!(config.drain_delay, Duration::from_millis(1500));
        assert!(config.watch_config);
        assert_eq!(config.max_connections, Some(1000));
        assert_eq!(config.max_connections_per_listener, Some(600));
        assert_eq!(config.routes.len(), 4);
        assert_eq!(config.routes[0].balance, Balance::LeastConnections);
        assert_eq!(
            config.routes[1].matcher,
            Matcher::Sni(Pattern::Suffix("example.com".into()))
        );
        assert_eq!(
            config.routes[2].matcher,
            Matcher::Preamble {
                name: "db".into(),
                token: Some("s3cret".into()),
                keep: false
            }
        );
        // Tokens never show in debug output (logs, dumps), nor in errors.
        let e = Config::default()
            .add_route_flag("preamble:db:s3cret=nowhere")
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("--route preamble:db:<redacted>=nowhere: "),
            "{e}"
        );
        let dump = format!("{config:?}");
        assert!(!dump.contains("s3cret"), "{dump}");
        assert!(dump.contains("<redacted>"), "{dump}");
    }

    fn error(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().0
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let e = error("listen = [\"127.0.0.1:1\"]\nmax_connections = 0\n");
        assert!(
            e.contains("line 2: max_connections: must be at least 1"),
            "{e}"
        );
        let e = error(
            "listen = [\"127.0.0.1:1\"]\n[[route]]\nname = \"a\"\nhost = \"bad host!\"\nbackends = [\"127.0.0.1:2\"]\n",
        );
        assert!(e.contains("line 4: route[0] (a).host"), "{e}");
        let e = error(
            "listen = [\"127.0.0.1:1\"]\n[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = [\"nowhere\"]\n",
        );
        assert!(
            e.contains("line 5: route[0] (a).backends: `nowhere` is not an IP:port"),
            "{e}"
        );
        let e = error(
            "listen = [\"127.0.0.1:1\"]\n\n[[route]]\nname = \"a\"\nbackends = [\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.contains("line 3: route[0] (a): needs exactly one of"),
            "{e}"
        );
        let e = error("listen = [\"127.0.0.1:1\"]\nfirst_packet_timeout = \"soon\"\n");
        assert!(e.contains("line 2: first_packet_timeout"), "{e}");
        let e = error("listen = [\"127.0.0.1:1\"]\nunknown = 1\n");
        assert!(e.contains("line 2") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn semantic_mistakes_are_refused() {
        let base = "listen = [\"127.0.0.1:1\"]\n";
        let e = error(&format!(
            "{base}[[route]]\nname = \"d\"\ndefault = true\nbackends = [\"127.0.0.1:2\"]\n[[route]]\nname = \"x\"\nhost = \"x.y\"\nbackends = [\"127.0.0.1:3\"]\n"
        ));
        assert!(e.contains("comes after the `default` route"), "{e}");
        let e = error(&format!(
            "{base}[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = []\n"
        ));
        assert!(
            e.contains("`backends` must list at least one address"),
            "{e}"
        );
        let e = error(&format!(
            "{base}[[route]]\nname = \"a\"\nhost = \"a.b\"\ntoken = \"t\"\nbackends = [\"127.0.0.1:2\"]\n"
        ));
        assert!(e.contains("only a `preamble` route takes a token"), "{e}");
        // `listen` may come from the command line instead; the whole is
        // checked once both are merged.
        let config = Config::from_toml(
            "[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = [\"127.0.0.1:2\"]\n",
            "t.toml",
        )
        .unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("no `listen` address")
        );
    }

    #[test]
    fn route_flags_build_routes() {
        let mut config = Config::default();
        config.add_route_flag("host:a.test=127.0.0.1:9001").unwrap();
        config
            .add_route_flag("sni:b.test=127.0.0.1:9002,127.0.0.1:9003")
            .unwrap();
        config.add_route_flag("preamble:db:tok=[::1]:5432").unwrap();
        config.add_route_flag("default=127.0.0.1:9004").unwrap();
        assert_eq!(config.routes[1].backends.len(), 2);
        assert!(
            matches!(&config.routes[2].matcher, Matcher::Preamble { token: Some(t), .. } if t.expose() == "tok")
        );
        assert!(config.add_route_flag("host:x=127.0.0.1:1").is_err());
        let e = config.add_route_flag("tcp:x=1.2.3.4:5").unwrap_err().0;
        assert!(e.contains("kind must be"), "{e}");
    }

    #[test]
    fn health_checks_layer_route_over_top_level_over_defaults() {
        let text = r#"
listen = ["127.0.0.1:1"]
[health_check]
interval = "500ms"
fall = 2

[[route]]
name = "inherits"
host = "a.test"
backends = ["127.0.0.1:2"]
proxy_protocol = "v2"

[[route]]
name = "own"
host = "b.test"
backends = ["127.0.0.1:3"]
health_check = { timeout = "100ms", rise = 5 }

[[route]]
name = "off"
default = true
backends = ["127.0.0.1:4"]
health_check = { enabled = false }
"#;
        let config = Config::from_toml(text, "t.toml").unwrap();
        let top = HealthCheck {
            interval: Duration::from_millis(500),
            fall: 2,
            ..HealthCheck::default()
        };
        assert_eq!(config.health_check, Some(top));
        assert_eq!(config.routes[0].health_check, Some(top));
        assert_eq!(config.routes[0].proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(
            config.routes[1].health_check,
            Some(HealthCheck {
                timeout: Duration::from_millis(100),
                rise: 5,
                ..top
            })
        );
        assert_eq!(config.routes[1].proxy_protocol, None);
        assert_eq!(config.routes[2].health_check, None);
        // Without a top-level table, checks are off unless a route asks.
        let config = Config::from_toml(
            "[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = [\"127.0.0.1:2\"]\n\
             [[route]]\nname = \"b\"\nhost = \"b.b\"\nbackends = [\"127.0.0.1:2\"]\n\
             health_check = {}\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.routes[0].health_check, None);
        assert_eq!(config.routes[1].health_check, Some(HealthCheck::default()));
    }

    #[test]
    fn bad_health_checks_and_proxy_versions_name_their_line() {
        let base = "listen = [\"127.0.0.1:1\"]\n";
        let e = error(&format!("{base}[health_check]\nrise = 0\n"));
        assert!(
            e.contains("line 3: health_check.rise: must be between"),
            "{e}"
        );
        let e = error(&format!(
            "{base}[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = [\"127.0.0.1:2\"]\n\
             health_check = {{ interval = \"often\" }}\n"
        ));
        assert!(
            e.contains("line 6: route[0] (a).health_check.interval"),
            "{e}"
        );
        let e = error(&format!(
            "{base}[[route]]\nname = \"a\"\nhost = \"a.b\"\nbackends = [\"127.0.0.1:2\"]\n\
             proxy_protocol = \"v3\"\n"
        ));
        assert!(e.contains("line 6") && e.contains("v3"), "{e}");
        let e = error(&format!("{base}[health_check]\nintervall = \"1s\"\n"));
        assert!(e.contains("intervall"), "{e}");
    }

    #[test]
    fn route_flags_take_options_among_their_addresses() {
        let mut config = Config::default();
        config
            .add_route_flag("host:a.test=127.0.0.1:1,proxy_protocol=v1,[::1]:2")
            .unwrap();
        config
            .add_route_flag("default=127.0.0.1:3,balance=least-connections,proxy_protocol=v2")
            .unwrap();
        assert_eq!(config.routes[0].backends.len(), 2);
        assert_eq!(config.routes[0].proxy_protocol, Some(ProxyProtocol::V1));
        assert_eq!(config.routes[0].balance, Balance::RoundRobin);
        assert_eq!(config.routes[1].proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(config.routes[1].balance, Balance::LeastConnections);
        let e = config
            .add_route_flag("host:b=127.0.0.1:1,proxy_protocol=v9")
            .unwrap_err()
            .0;
        assert!(e.contains("v1 or v2"), "{e}");
        let mut weighted = Config::default();
        weighted
            .add_route_flag("host:b=127.0.0.1:1,weight=3,db.internal:2,connect_retries=0")
            .unwrap();
        let route = &weighted.routes[0];
        // The name has no address until resolved.
        assert_eq!(route.weights, vec![3]);
        assert_eq!(route.targets[1].weight, 1);
        assert_eq!(route.targets[1].to_string(), "db.internal:2");
        assert_eq!(route.connect_retries, Some(0));
        let e = config
            .add_route_flag("host:c=weight=2,127.0.0.1:1")
            .unwrap_err()
            .0;
        assert!(e.contains("follows the address it weighs"), "{e}");
        let e = config
            .add_route_flag("host:c=127.0.0.1:1,weight=0")
            .unwrap_err()
            .0;
        assert!(e.contains("between 1 and 256"), "{e}");
        let e = config
            .add_route_flag("host:c=127.0.0.1:1,wieght=2")
            .unwrap_err()
            .0;
        assert!(e.contains("unknown option `wieght`"), "{e}");
        let e = config
            .add_route_flag("host:b=proxy_protocol=v1")
            .unwrap_err()
            .0;
        assert!(e.contains("at least one address"), "{e}");
    }

    #[test]
    fn names_weights_timeouts_and_keepalive_parse_from_the_file() {
        let text = r#"
listen = ["127.0.0.1:1"]
idle_timeout = "10m"
connect_retries = 1
resolve_interval = "5s"
resolvers = ["127.0.0.1:5353", "10.0.0.53"]
[tcp_keepalive]
idle = "30s"
count = 3

[[route]]
name = "db"
default = true
backends = ["db.internal:5432", { address = "127.0.0.1:2", weight = 4 }]
idle_timeout = "0s"
connect_retries = 0
"#;
        let mut config = Config::from_toml(text, "t.toml").unwrap();
        assert_eq!(config.idle_timeout, Duration::from_secs(600));
        assert_eq!(config.resolve_interval, Duration::from_secs(5));
        assert_eq!(config.resolvers[1], "10.0.0.53:53".parse().unwrap());
        assert_eq!(
            config.tcp_keepalive,
            Some(Keepalive {
                idle: Duration::from_secs(30),
                count: 3,
                ..Keepalive::default()
            })
        );
        let route = &config.routes[0];
        assert_eq!(config.idle_timeout_of(route), Duration::ZERO);
        assert_eq!(config.connect_attempts_of(route), 1);
        // Unresolved, the name stands for no address yet.
        assert_eq!(route.backends, vec!["127.0.0.1:2".parse().unwrap()]);
        assert_eq!(route.weights, vec![4]);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        config
            .resolve_names(&mut |name| {
                assert_eq!(name, "db.internal");
                Ok(vec![ip("10.0.0.1"), ip("10.0.0.2")])
            })
            .unwrap();
        assert_eq!(config.routes[0].backends.len(), 3);
        assert_eq!(config.routes[0].weights, vec![1, 1, 4]);
        // Unchanged: nothing to publish; a failure keeps the addresses.
        let mut failures = Vec::new();
        let same = config.re_resolved(
            &mut |_| {
                Ok(vec![ip("10.0.0.2"), ip("10.0.0.1")]
                    .into_iter()
                    .rev()
                    .collect())
            },
            &mut |_, _, _| {},
        );
        assert!(same.is_none());
        let kept = config.re_resolved(
            &mut |_| Err("SERVFAIL".into()),
            &mut |route, target, why| {
                failures.push(format!("{route} {target} {why}"));
            },
        );
        assert!(kept.is_none());
        assert_eq!(failures, ["db db.internal:5432 SERVFAIL"]);
        let moved = config
            .re_resolved(&mut |_| Ok(vec![ip("10.0.0.9")]), &mut |_, _, _| {})
            .unwrap();
        assert_eq!(
            moved.routes[0].backends[0],
            "10.0.0.9:5432".parse().unwrap()
        );
        let e = config
            .resolve_names(&mut |_| Err("NXDOMAIN".into()))
            .unwrap_err();
        assert_eq!(
            e,
            "route `db`: backend `db.internal:5432`: cannot resolve `db.internal`: NXDOMAIN"
        );
        let base = "listen = [\"127.0.0.1:1\"]\n";
        let e = error(&format!(
            "{base}[[route]]\nname = \"a\"\ndefault = true\nbackends = [{{ address = \"127.0.0.1:2\", weight = 0 }}]\n"
        ));
        assert!(e.contains("line 5: route[0] (a).backends: weight 0"), "{e}");
        let e = error(&format!("{base}[tcp_keepalive]\ninterval = \"10ms\"\n"));
        assert!(e.contains("line 3: tcp_keepalive.interval"), "{e}");
        let e = error(&format!("{base}resolvers = [\"dns.example\"]\n"));
        assert!(e.contains("line 2: resolvers"), "{e}");
    }

    #[test]
    fn patterns_match_exactly_or_by_suffix() {
        let exact = Pattern::parse("A.Test.").unwrap();
        assert!(exact.matches("a.test"));
        assert!(!exact.matches("b.a.test"));
        let suffix = Pattern::parse("*.example.com").unwrap();
        assert!(suffix.matches("www.example.com"));
        assert!(suffix.matches("a.b.example.com"));
        assert!(!suffix.matches("example.com"));
        assert!(!suffix.matches("badexample.com"));
        assert!(Pattern::parse("*").is_err());
        assert!(Pattern::parse("a..b").is_err());
        assert!(Pattern::parse("a.test..").is_err());
        assert!(Pattern::parse("*..a.test").is_err());
    }
}
