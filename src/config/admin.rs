//! `[admin]`: the operator's endpoints.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub http_listen_addr: Option<String>,
    pub ready_requires_primary: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where `/health`, `/ready` and `/metrics` are served (off when unset).
    pub http_listen_addr: Option<SocketAddr>,
    /// `/ready` answers 503 while the primary of a database with replicas is
    /// unreachable; when false, a replica in rotation is enough (read-only
    /// service).
    pub ready_requires_primary: bool,
}

impl Admin {
    pub(super) fn validate(r: &RawAdmin) -> Result<Self, ConfigError> {
        let http_listen_addr = match r.http_listen_addr.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| {
                invalid(
                    "admin.http_listen_addr",
                    format!("`{s}` is not an IP:port address"),
                )
            })?),
        };
        Ok(Self {
            http_listen_addr,
            ready_requires_primary: r.ready_requires_primary.unwrap_or(true),
        })
    }

    pub(super) fn render(&self, out: &mut String) {
        let _ = writeln!(out, "\n[admin]");
        if let Some(a) = self.http_listen_addr {
            let _ = writeln!(out, "http_listen_addr = \"{a}\"");
        }
        let _ = writeln!(
            out,
            "ready_requires_primary = {}",
            self.ready_requires_primary
        );
    }
}
