//! Logs on stderr: one line per event, as text or as a JSON object
//! (`general.log_format`), with the fields of the spans it happened in
//! (`client`, debug level: peer, user, database, client id; `server`: pool,
//! address, connection number, pid). The filter (`general.log_level`, or `RUST_LOG` when set) can be
//! changed while running through [`LogControl`] — by a reload, or by the
//! admin console's `SET log_level`.

use std::io::IsTerminal as _;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogFormat, check_log_level};

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// Replaces the filter, e.g. `"debug"`, `"pgsluice=debug,info"`,
    /// `"pgsluice::pool=trace,warn"` (`RUST_LOG` syntax). An invalid one
    /// changes nothing; the error says why.
    pub fn set_level(&self, directives: &str) -> Result<(), String> {
        check_log_level(directives)?;
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        directives.clone_into(&mut self.current.lock().unwrap_or_else(|e| e.into_inner()));
        tracing::info!(log_level = directives, "log filter changed");
        Ok(())
    }

    /// The filter in force.
    pub fn level(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Installs the process's subscriber on stderr. `RUST_LOG`, when set and
/// valid, wins over `directives` at startup. Fails if a subscriber is
/// installed already.
pub fn init(format: LogFormat, directives: &str) -> Result<LogControl, String> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty() && check_log_level(v).is_ok());
    let directives = from_env.as_deref().unwrap_or(directives);
    check_log_level(directives)?;
    let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
    let (filter, handle) = reload::Layer::new(filter);
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LogControl {
        handle,
        current: Mutex::new(directives.to_owned()),
    })
}
