//! The router: a thread-per-core L4 router that reads each TCP connection's
//! first packet (TLS SNI, HTTP `Host`, or a preamble), picks a backend, and
//! splices the two sockets inside the kernel with eBPF.
//!
//! - [`config`]: the configuration (TOML or flags), validated;
//! - [`sniff`]: what a first packet says;
//! - [`routes`]: which route it takes, or why it is refused;
//! - [`refuse`]: what a refused client receives;
//! - [`backends`]: picking and connecting to a route's backends;
//! - [`health`]: backend health checks and passive ejection;
//! - [`proxy_protocol`]: the PROXY protocol header sent to backends;
//! - [`server`]: the executors, the listeners and each connection's life;
//! - [`supervise`]: the main thread's signals: report, reload, drain;
//! - [`reload`]: hot reload of the configuration (SIGHUP);
//! - [`stats`]: the counters and the `stats:` line;
//! - [`metrics`]: the Prometheus metrics and their HTTP endpoint;
//! - [`demo`]: the demo backends of `router --demo`.
pub mod backends;
pub mod config;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod proxy_protocol;
pub mod refuse;
pub mod reload;
pub mod routes;
pub mod server;
pub mod sniff;
pub mod stats;
pub mod supervise;
