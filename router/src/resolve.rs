//! Backend names (`db.internal:5432`): resolved with a DNS client (hickory,
//! on a single-threaded tokio runtime of the calling thread) at start and on
//! reload (the main thread, before the configuration is put in force), and
//! every `resolve_interval` by a thread of their own. Executors never wait
//! on DNS: they only ever see a configuration whose names are addresses.
//! Every address a name resolves to is a backend of its route (A and AAAA).
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    thread,
    time::Duration,
};

use anyhow::Context as _;
use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use tracing::{info, warn};

use crate::{config::Config, reload::Published, telemetry::counters::Labelled};

/// How long one query waits for an answer, and how often it is sent: a
/// dead DNS server holds a reload for at most about twice this.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// A DNS client that asks `resolvers` (or the system's servers).
pub struct Resolver {
    runtime: tokio::runtime::Runtime,
    client: TokioResolver,
    servers: Vec<SocketAddr>,
}

impl Resolver {
    pub fn new(servers: &[SocketAddr]) -> anyhow::Result<Self> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider).context("reading /etc/resolv.conf")?
        } else {
            let config = ResolverConfig::from_name_servers(
                servers
                    .iter()
                    .map(|server| {
                        let mut config = NameServerConfig::udp_and_tcp(server.ip());
                        for connection in &mut config.connections {
                            connection.port = server.port();
                        }
                        config
                    })
                    .collect(),
            );
            TokioResolver::builder_with_config(config, provider)
        };
        let options = builder.options_mut();
        options.timeout = QUERY_TIMEOUT;
        options.attempts = QUERY_ATTEMPTS;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let client = builder.build().context("starting the DNS resolver")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the DNS resolver's runtime")?;
        Ok(Self {
            runtime,
            client,
            servers: servers.to_vec(),
        })
    }

    /// Every address `name` resolves to now (asked anew: nothing cached),
    /// or why none.
    pub fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        self.client.clear_cache();
        let found = self
            .runtime
            .block_on(self.client.lookup_ip(name))
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<IpAddr> = found.iter().collect();
        // One order, whatever order the server answers in: a reordering is
        // no change of addresses.
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(addrs)
    }
}

/// Resolves `config`'s backend names before it is put in force (start,
/// reload, `--check-config`): a name that does not resolve is an error.
pub fn resolve_names(config: &mut Config) -> anyhow::Result<()> {
    if !config.has_names() {
        return Ok(());
    }
    let resolver = Resolver::new(&config.resolvers)?;
    config
        .resolve_names(&mut |name| resolver.lookup(name))
        .map_err(anyhow::Error::msg)
}

/// Starts the thread that resolves the names of the configuration in force
/// every `resolve_interval` and publishes it again when an address changed
/// (new connections use the new addresses; live ones keep theirs). A name
/// that stops resolving keeps its last addresses, logged once when it
/// stops and once when it resolves again.
pub fn spawn_refresh(published: Arc<Published>, labelled: Arc<Labelled>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            let mut resolver: Option<Resolver> = None;
            let mut failing: HashSet<(String, String)> = HashSet::new();
            loop {
                let (_, config, _) = published.current();
                thread::sleep(config.resolve_interval);
                let (version, config, _) = published.current();
                if !config.has_names() {
                    continue;
                }
                if resolver
                    .as_ref()
                    .is_none_or(|r| r.servers != config.resolvers)
                {
                    match Resolver::new(&config.resolvers) {
                        Ok(new) => resolver = Some(new),
                        Err(e) => {
                            warn!("resolving backend names: {e:#}");
                            continue;
                        }
                    }
                }
                let Some(client) = &resolver else { continue };
                let mut failed_now = HashSet::new();
                let new = config.re_resolved(
                    &mut |name| client.lookup(name),
                    &mut |route, target, why| {
                        let key = (route.to_owned(), target.to_string());
                        if !failing.contains(&key) {
                            warn!(
                                route,
                                backend = %target,
                                "backend name no longer resolves ({why}); keeping its last \
                                 addresses {:?}",
                                target.addrs().collect::<Vec<_>>()
                            );
                        }
                        failed_now.insert(key);
                    },
                );
                for (route, backend) in failing.difference(&failed_now) {
                    info!(route, backend, "backend name resolves again");
                }
                failing = failed_now;
                let Some(new) = new else { continue };
                for (old, new) in config.routes.iter().zip(&new.routes) {
                    for (before, after) in old.targets.iter().zip(&new.targets) {
                        if before != after {
                            info!(
                                route = new.name,
                                backend = %after,
                                "backend name now resolves to {:?} (was {:?})",
                                after.addrs().collect::<Vec<_>>(),
                                before.addrs().collect::<Vec<_>>()
                            );
                        }
                    }
                }
                labelled.register(&new);
                // A reload in between wins: it resolved the names itself.
                published.publish_if(version, Arc::new(new));
            }
        })
        .context("starting the resolver thread")?;
    Ok(())
}
