//! What the router tells about itself: [`counters`] (per-core atomics the
//! connection path bumps), [`stats`] (the `stats:` line), [`prometheus`]
//! (the metrics, encoded when scraped) and [`endpoint`] (the HTTP endpoint
//! serving `/metrics`, `/healthz` and `/readyz`, off the executors), with
//! the standard [`process`] metrics.
pub mod counters;
pub mod endpoint;
pub mod process;
pub mod prometheus;
pub mod stats;
