//! `[routing]`: how reads are sent to replicas and how replicas are watched.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, duration, fmt_d, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub max_replica_lag: Option<String>,
    pub monitor_interval: Option<String>,
    pub monitor_timeout: Option<String>,
    pub monitor_user: Option<String>,
    pub read_balance: Option<String>,
    pub read_your_writes: Option<bool>,
    pub default_route: Option<String>,
    pub read_only_functions: Option<Vec<String>>,
    pub function_refresh_interval: Option<String>,
}

/// How a read picks among the replicas in rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBalance {
    /// The replica with the fewest clients attached right now.
    LeastOutstanding,
    RoundRobin,
}

impl ReadBalance {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastOutstanding => "least_outstanding",
            Self::RoundRobin => "round_robin",
        }
    }
}

/// Where statements go before a client says otherwise
/// (`SET pgsluice.route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRoute {
    /// Reads to replicas, writes to the primary.
    Auto,
    /// Everything to the primary.
    Primary,
}

impl DefaultRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Primary => "primary",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// A replica further behind than this leaves read rotation.
    pub max_replica_lag: Duration,
    /// How often the monitor samples every node.
    pub monitor_interval: Duration,
    /// One deadline for a whole probe (connect + query).
    pub monitor_timeout: Duration,
    /// The `[users.NAME]` the monitor logs in as (databases may override).
    pub monitor_user: Option<String>,
    pub read_balance: ReadBalance,
    /// After a client's write, its reads go only to replicas that have
    /// replayed it.
    pub read_your_writes: bool,
    pub default_route: DefaultRoute,
    /// Volatile functions that do not write (added to the built-in list).
    pub read_only_functions: Vec<String>,
    /// How often the list of volatile functions is re-read from `pg_proc`.
    pub function_refresh_interval: Duration,
}

impl Routing {
    pub(super) fn validate(r: &RawRouting) -> Result<Self, ConfigError> {
        let max_replica_lag = duration(
            "routing.max_replica_lag",
            r.max_replica_lag.as_deref(),
            "100ms",
        )?;
        let monitor_interval = duration(
            "routing.monitor_interval",
            r.monitor_interval.as_deref(),
            "25ms",
        )?;
        if monitor_interval < Duration::from_millis(5) {
            return Err(invalid("routing.monitor_interval", "must be at least 5ms"));
        }
        let monitor_timeout = duration(
            "routing.monitor_timeout",
            r.monitor_timeout.as_deref(),
            "1s",
        )?;
        if monitor_timeout.is_zero() {
            return Err(invalid("routing.monitor_timeout", "must be above 0s"));
        }
        let read_balance = match r.read_balance.as_deref().unwrap_or("least_outstanding") {
            "least_outstanding" => ReadBalance::LeastOutstanding,
            "round_robin" => ReadBalance::RoundRobin,
            other => {
                return Err(invalid(
                    "routing.read_balance",
                    format!("`{other}` is not one of least_outstanding, round_robin"),
                ));
            }
        };
        let default_route = match r.default_route.as_deref().unwrap_or("auto") {
            "auto" => DefaultRoute::Auto,
            "primary" => DefaultRoute::Primary,
            other => {
                return Err(invalid(
                    "routing.default_route",
                    format!("`{other}` is not one of auto, primary"),
                ));
            }
        };
        Ok(Self {
            max_replica_lag,
            monitor_interval,
            monitor_timeout,
            monitor_user: r.monitor_user.clone(),
            read_balance,
            read_your_writes: r.read_your_writes.unwrap_or(true),
            default_route,
            read_only_functions: r
                .read_only_functions
                .iter()
                .flatten()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
            function_refresh_interval: duration(
                "routing.function_refresh_interval",
                r.function_refresh_interval.as_deref(),
                "60s",
            )?,
        })
    }

    pub(super) fn render(&self, out: &mut String) {
        let _ = writeln!(out, "\n[routing]");
        let _ = writeln!(out, "max_replica_lag = \"{}\"", fmt_d(self.max_replica_lag));
        let _ = writeln!(
            out,
            "monitor_interval = \"{}\"",
            fmt_d(self.monitor_interval)
        );
        let _ = writeln!(out, "monitor_timeout = \"{}\"", fmt_d(self.monitor_timeout));
        if let Some(u) = &self.monitor_user {
            let _ = writeln!(out, "monitor_user = \"{u}\"");
        }
        let _ = writeln!(out, "read_balance = \"{}\"", self.read_balance.as_str());
        let _ = writeln!(out, "read_your_writes = {}", self.read_your_writes);
        let _ = writeln!(out, "default_route = \"{}\"", self.default_route.as_str());
        let fns: Vec<String> = self
            .read_only_functions
            .iter()
            .map(|f| format!("\"{f}\""))
            .collect();
        let _ = writeln!(out, "read_only_functions = [{}]", fns.join(", "));
        let _ = writeln!(
            out,
            "function_refresh_interval = \"{}\"",
            fmt_d(self.function_refresh_interval)
        );
    }
}
