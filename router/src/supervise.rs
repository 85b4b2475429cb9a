//! The main thread once the executors serve: it waits for signals and acts
//! on them, so that nothing of this runs on the connection path.
//!
//! - SIGUSR1 (and every `--stats-interval`): print the `stats:` line;
//! - SIGHUP, or a changed configuration file under `watch_config`
//!   ([`crate::watch`]): reload the configuration ([`crate::reload`]); an
//!   invalid one is logged and the running one kept; the access log is
//!   reopened;
//! - SIGUSR2: reopen the access log (logrotate);
//! - SIGTERM or SIGINT: drain. `/readyz` answers 503 at once; after
//!   `drain_delay` (default none) the listeners are shut down (new
//!   connections are refused by the kernel), live connections, spliced or
//!   copied, go on until they end or `drain_timeout` passes, then the
//!   process exits. A second SIGTERM/SIGINT exits at once;
//! - an upgrade ([`crate::upgrade`]): once a new process took the
//!   listeners over, the upgrade thread wakes this one, which finishes the
//!   live connections as a drain does (within `drain_timeout`), without
//!   shutting the listeners (they are the new process's now) and without
//!   telling the service manager it stops.
use std::{
    io::Write as _,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use splice::{
    KernelView,
    runtime::{self, Signal},
};
use tracing::{debug, error, info, warn};

use crate::{
    access_log::AccessLogger,
    config::Config,
    limits::Limits,
    listeners::Listeners,
    reload::{self, Published, Reloader},
    service,
    telemetry::{
        counters::{Labelled, Lifecycle},
        stats::{Report, RouterStats},
    },
    watch::{self, ConfigWatch},
};

/// How often a draining router checks whether its connections ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// What the main thread watches and acts on.
pub struct Supervisor<'a> {
    pub mode: &'static str,
    pub stats: &'a [Arc<RouterStats>],
    pub kernel: &'a [KernelView],
    pub published: &'a Published,
    pub lifecycle: &'a Lifecycle,
    pub labelled: &'a Labelled,
    /// The listen addresses, with the main thread's copy of each socket
    /// (shared with the upgrade thread, which hands them over).
    pub listeners: Arc<Mutex<Listeners>>,
    pub stats_interval: Option<Duration>,
    pub reload: Reloader,
    /// The configuration file, read again every [`watch::POLL`] while the
    /// configuration in force sets `watch_config`.
    pub watch: Option<ConfigWatch>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The connection limits every executor checks, and the total used when
    /// the configuration sets none.
    pub limits: Arc<Limits>,
    pub default_max_connections: usize,
    pub access_log: Arc<AccessLogger>,
}

impl Supervisor<'_> {
    fn report(&self) -> String {
        let (_, _, health) = self.published.current();
        Report {
            mode: self.mode,
            shards: self.stats,
            kernel: self.kernel,
            health: &health,
        }
        .line()
    }

    fn print_report(&self) {
        println!("{}", self.report());
        let _ = std::io::stdout().flush();
    }

    fn active(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.splice.active.load(Relaxed))
            .sum()
    }

    /// Serves signals until SIGTERM/SIGINT, then drains; returns when the
    /// process should exit.
    pub fn run(mut self) {
        let mut next_report = self.stats_interval.map(|every| Instant::now() + every);
        loop {
            let watching = self.config.watch_config && self.watch.is_some();
            // Wake for the next report, the next look at the file, or in an
            // hour (a wait needs some bound).
            let wait = [
                next_report.map(|at| at.saturating_duration_since(Instant::now())),
                watching.then_some(watch::POLL),
            ]
            .into_iter()
            .flatten()
            .fold(Duration::from_secs(3600), Duration::min);
            match runtime::wait_for_signal(wait) {
                Some(Signal::Stop) if self.lifecycle.handed_over.load(Relaxed) => {
                    self.finish_after_upgrade();
                    self.access_log.flush();
                    if self.stats_interval.is_some() {
                        self.print_report();
                    }
                    return;
                }
                Some(Signal::Stop) => break,
                Some(Signal::Report) => self.print_report(),
                Some(Signal::Reload) => self.reload("SIGHUP"),
                Some(Signal::Reopen) => self.reopen_access_log(),
                None => {}
            }
            if let (Some(at), Some(every)) = (next_report, self.stats_interval)
                && Instant::now() >= at
            {
                self.print_report();
                next_report = Some(Instant::now() + every);
            }
            if watching && self.watch.as_mut().is_some_and(ConfigWatch::changed) {
                self.reload("config file changed");
            }
        }
        self.drain();
        self.access_log.flush();
        if self.stats_interval.is_some() {
            self.print_report();
        }
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.listeners.lock().expect("no panic under this lock")
    }

    /// After an upgrade: the listeners are the new process's; this one
    /// finishes its connections (bounded by `drain_timeout`) and exits.
    fn finish_after_upgrade(&self) {
        self.lifecycle.draining.store(true, Relaxed);
        let timeout = self.config.drain_timeout;
        let open = self.active();
        if open > 0 {
            info!(
                "upgrade: handed over; finishing {open} open connection(s) within {} \
                 (drain_timeout) before exiting",
                humantime::format_duration(timeout)
            );
        }
        self.finish_connections(
            Instant::now() + timeout,
            "upgrade: handed over and every connection ended: exiting",
            "upgrade: ",
        );
    }

    fn reopen_access_log(&self) {
        self.access_log.reopen(self.config.access_log_file.clone());
    }

    /// Reloads the configuration, telling the service manager; `cause`
    /// opens the log line (`SIGHUP`, or the watched file's change).
    fn reload(&mut self, cause: &str) {
        if self.lifecycle.handed_over.load(Relaxed) {
            return warn!("{cause} after an upgrade: ignored (reload the new process)");
        }
        service::reloading();
        // What this reload reads is what the watch has seen: a SIGHUP after
        // an edit is not followed by a second reload of the same bytes.
        if let Some(watch) = self.watch.as_mut() {
            watch.changed();
        }
        self.reload_config(cause);
        service::ready("serving");
    }

    /// A reload that changed nothing: logged and counted; the access log
    /// is reopened all the same (logrotate sends SIGHUP too).
    fn reload_failed(&self, message: &str) {
        self.reopen_access_log();
        self.lifecycle.reloads_failed.fetch_add(1, Relaxed);
        error!("{message}");
    }

    fn reload_config(&mut self, cause: &str) {
        let started = Instant::now();
        let new = match (self.reload)() {
            Ok(new) => new,
            Err(e) => {
                return self.reload_failed(&format!(
                    "{cause}: the new configuration is invalid, keeping the running one: {e:#}"
                ));
            }
        };
        let (merged, warnings) = reload::merge(&self.config, new);
        for warning in warnings {
            warn!("{cause}: {warning}");
        }
        // Listen addresses first: a reload whose new address cannot be bound
        // changes nothing.
        let listening = match self.listeners().apply(&merged) {
            Ok(changes) => changes,
            Err(e) => {
                return self.reload_failed(&format!(
                    "{cause}: {e:#}; keeping the running configuration"
                ));
            }
        };
        for change in listening {
            info!("{cause}: {change}");
        }
        let merged = Arc::new(merged);
        self.limits.set(
            merged
                .max_connections
                .unwrap_or(self.default_max_connections),
            merged.max_connections_per_listener,
        );
        self.labelled.register(&merged);
        if merged.tcp_keepalive != self.config.tcp_keepalive {
            self.listeners().set_keepalive(merged.tcp_keepalive);
        }
        self.published.publish(Arc::clone(&merged));
        self.lifecycle.reloads_ok.fetch_add(1, Relaxed);
        info!(
            "{cause}: {}",
            reload::summary(&self.config, &merged, started.elapsed())
        );
        self.config = merged;
        self.reopen_access_log();
    }

    /// Says it is draining (`/readyz` 503), keeps accepting for
    /// `drain_delay` so that balancers stop sending first, then stops
    /// accepting and waits for the live connections (bounded).
    fn drain(&mut self) {
        service::stopping();
        self.lifecycle.draining.store(true, Relaxed);
        let delay = self.config.drain_delay;
        if !delay.is_zero() {
            info!(
                "stopping: /readyz answers 503; accepting for {} more (drain_delay) \
                 before closing the listeners",
                humantime::format_duration(delay)
            );
            if !self.serve_signals_until(Instant::now() + delay, || false) {
                self.second_signal();
                return;
            }
        }
        self.listeners().shut_all();
        let timeout = self.config.drain_timeout;
        let deadline = Instant::now() + timeout;
        let open = self.active();
        if open == 0 {
            info!("stopping: listeners closed, no connection open");
            return;
        }
        info!(
            "stopping: listeners closed; waiting up to {} for {open} open connection(s) \
             (send the signal again to exit now)",
            humantime::format_duration(timeout)
        );
        self.finish_connections(deadline, "drained: every connection ended", "");
    }

    /// Serves signals while draining until `done()` or `deadline`; false
    /// if a second stop signal came (the caller exits at once).
    /// Waits, serving signals, until every connection ended (then logs
    /// `ended`) or `deadline`: then resets what is left. A second stop
    /// signal exits at once.
    fn finish_connections(&self, deadline: Instant, ended: &str, prefix: &str) {
        if !self.serve_signals_until(deadline, || self.active() == 0) {
            self.second_signal();
            return;
        }
        let open = self.active();
        if open == 0 {
            info!("{ended}");
            return;
        }
        warn!(
            "{prefix}drain_timeout ({}) passed with {open} connection(s) still open: \
             exiting, resetting them",
            humantime::format_duration(self.config.drain_timeout)
        );
        cut_open_connections();
    }

    fn serve_signals_until(&self, deadline: Instant, done: impl Fn() -> bool) -> bool {
        while !done() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match runtime::wait_for_signal(left.min(DRAIN_POLL)) {
                Some(Signal::Stop) => return false,
                Some(Signal::Report) => self.print_report(),
                Some(Signal::Reload) => warn!("SIGHUP while draining: ignored"),
                Some(Signal::Reopen) => self.reopen_access_log(),
                None => {}
            }
        }
        true
    }

    fn second_signal(&self) {
        warn!(
            "second stop signal: exiting now with {} connection(s) open, resetting them",
            self.active()
        );
        cut_open_connections();
    }
}

/// Makes the exit that follows reset every open connection on both sides:
/// a peer must not take a cut stream for a finished one (the kernel would
/// send FIN when it closes the sockets).
fn cut_open_connections() {
    match splice::socket::reset_every_connection_on_close() {
        Ok(sockets) => debug!(sockets, "connections cut: their sockets send RST on exit"),
        Err(e) => warn!("cannot mark the open connections for a reset: {e}"),
    }
}
