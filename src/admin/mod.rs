//! The operator's view of a running pgsluice:
//! - the admin console (`console/`): a virtual database `pgsluice` (alias
//!   `pgbouncer`) on the main port that answers pgbouncer's `SHOW` and
//!   control commands plus pgsluice's own, for `general.admin_users` (all
//!   commands) and `general.stats_users` (`SHOW` only);
//! - an HTTP endpoint with `/health` (the process answers), `/ready` (it
//!   should get traffic) and `/metrics` (Prometheus text format, built from
//!   live state at each scrape).
//!
//! Reading is all `/metrics` and `SHOW` do. The console's control commands
//! act through the pools' and the cluster's own API (`Gate`,
//! `Pool::reconnect`, `Node::set_banned`, the client registry's kill
//! switch, the proxy's shutdown handle).

pub mod console;
mod http;
mod metrics;
mod traffic;

use std::sync::Arc;
use std::time::Instant;

pub use http::{HttpEndpoint, readiness};
pub use metrics::render_metrics;

use crate::proxy::Shared;

/// Database names that reach the admin console instead of a pool.
pub const CONSOLE_DATABASES: [&str; 2] = ["pgsluice", "pgbouncer"];

/// Whether a client asking for database `name` gets the admin console.
pub fn is_console_database(name: &str) -> bool {
    CONSOLE_DATABASES.contains(&name)
}

/// Closes a stats period on every pool every `general.stats_period` (the
/// averages of `SHOW STATS`). Stops when the proxy is gone.
pub fn spawn_stats_period(shared: &Arc<Shared>) {
    let period = shared.config().general.stats_period;
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { return };
            let now = Instant::now();
            for pool in shared.pools.all() {
                pool.stats().roll(now);
            }
        }
    });
}
