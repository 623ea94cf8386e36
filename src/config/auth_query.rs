//! `[auth_query]`: users not in the config are looked up on the server.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, duration, fmt_d, invalid};

/// pgbouncer's default: needs a superuser, or a SECURITY DEFINER function
/// in its place (see docs/security.md).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthQuery {
    pub user: Option<String>,
    pub query: Option<String>,
    pub dbname: Option<String>,
    pub cache_ttl: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthQuery {
    /// The `[users.NAME]` the lookup connection logs in as.
    pub user: String,
    /// Returns (name, secret) for `$1` = the user name.
    pub query: String,
    /// Database the lookup runs in; `None`: the client's database.
    pub dbname: Option<String>,
    /// How long a result (found or not) is reused.
    pub cache_ttl: Duration,
}

impl AuthQuery {
    pub(super) fn validate(r: &RawAuthQuery) -> Result<Option<Self>, ConfigError> {
        let Some(user) = r.user.clone() else {
            if r.query.is_some() || r.dbname.is_some() || r.cache_ttl.is_some() {
                return Err(invalid(
                    "auth_query.user",
                    "missing: the lookup needs a [users.NAME] to log in as",
                ));
            }
            return Ok(None);
        };
        let query = r
            .query
            .clone()
            .unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_owned());
        if !query.contains("$1") {
            return Err(invalid(
                "auth_query.query",
                "must take the user name as the parameter $1",
            ));
        }
        Ok(Some(Self {
            user,
            query,
            dbname: r.dbname.clone().filter(|d| !d.is_empty()),
            cache_ttl: duration("auth_query.cache_ttl", r.cache_ttl.as_deref(), "10s")?,
        }))
    }

    pub(super) fn render(&self, out: &mut String) {
        let _ = writeln!(out, "\n[auth_query]");
        let _ = writeln!(out, "user = \"{}\"", self.user);
        let _ = writeln!(out, "query = \"{}\"", self.query.replace('"', "\\\""));
        if let Some(d) = &self.dbname {
            let _ = writeln!(out, "dbname = \"{d}\"");
        }
        let _ = writeln!(out, "cache_ttl = \"{}\"", fmt_d(self.cache_ttl));
    }
}
