//! The router: a thread-per-core L4 router that reads each TCP connection's
//! first packet (TLS SNI, HTTP `Host`, or a preamble), picks a backend, and
//! splices the two sockets inside the kernel with eBPF.
//!
//! - [`config`]: the configuration (TOML or flags), validated;
//! - [`sniff`]: what a first packet says;
//! - [`host`]: which host names are valid, as routes compare them;
//! - [`routes`]: which route it takes, or why it is refused;
//! - [`refuse`]: what a refused client receives;
//! - [`rewrite`]: what a route changes in the first packet (`http_close`);
//! - [`exclusive`]: one router per listen address;
//! - [`idle`]: idle timeout and TCP keepalive;
//! - [`limits`]: connection limits, in total and per listener;
//! - [`listeners`]: the listen addresses, bound at start and by reloads;
//! - [`backends`]: picking and connecting to a route's backends;
//! - [`health`]: backend health checks and passive ejection;
//! - [`proxy_protocol`]: the PROXY protocol header sent to backends;
//! - [`proxy_header`]: the PROXY protocol header a load balancer in front
//!   sends (`accept_proxy`);
//! - [`access_log`]: one line per connection at its end;
//! - [`logging`]: the process log's level and one-line records;
//! - [`startup`]: process start-up, then the main thread's supervision;
//! - [`executor`]: one executor per core: its probe, its accept loops;
//! - [`shard`]: an executor's state, as its connections use it;
//! - [`connection`]: one connection's life: routing, connecting,
//!   forwarding (splice or copy), refusing;
//! - [`supervise`]: the main thread's signals: report, reload, drain;
//! - [`reload`]: hot reload of the configuration (SIGHUP);
//! - [`upgrade`]: a new binary takes the listeners over from the running
//!   one (`--upgrade-socket`, `--upgrade-from`);
//! - [`service`]: the systemd notify protocol (ready, reloading, stopping);
//! - [`watch`]: `watch_config`, a reload when the configuration file changes;
//! - [`resolve`]: backend names, resolved at start, on reload and every
//!   `resolve_interval`;
//! - [`telemetry`]: counters, the `stats:` line, Prometheus metrics and
//!   their HTTP endpoint (`/metrics`, `/healthz`, `/readyz`);
//! - [`demo`]: the demo backends of `router --demo`.
//!
//! Without the default feature `server` only the parsers are built
//! (`config`, `sniff`, `routes`, `refuse`, `proxy_header`): what `fuzz/`
//! needs.
#[cfg(feature = "server")]
pub mod access_log;
#[cfg(feature = "server")]
pub mod backends;
pub mod config;
#[cfg(feature = "server")]
pub mod connection;
#[cfg(feature = "server")]
pub mod demo;
#[cfg(feature = "server")]
pub mod exclusive;
#[cfg(feature = "server")]
pub mod executor;
#[cfg(feature = "server")]
pub mod health;
pub mod host;
#[cfg(feature = "server")]
pub mod idle;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod listeners;
#[cfg(feature = "server")]
pub mod logging;
pub mod proxy_header;
#[cfg(feature = "server")]
pub mod proxy_protocol;
pub mod refuse;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod resolve;
pub mod rewrite;
pub mod routes;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod shard;
pub mod sniff;
#[cfg(feature = "server")]
pub mod startup;
#[cfg(feature = "server")]
pub mod supervise;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod upgrade;
#[cfg(feature = "server")]
pub mod watch;
