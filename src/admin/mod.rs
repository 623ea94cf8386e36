//! The operator's view of a running pgsluice: an HTTP endpoint with
//! `/health` (the process answers), `/ready` (it should get traffic) and
//! `/metrics` (Prometheus text format, built from live state at each
//! scrape).
//!
//! Nothing here mutates pools or routing; it reads what the pools, the
//! replica monitor, the client registry and the traffic counters
//! (`stats/`) already keep.

mod http;
mod metrics;
mod traffic;

pub use http::{HttpEndpoint, readiness};
pub use metrics::render_metrics;
