//! `RELOAD` and `SET log_level`: the configuration at runtime.

use super::{ConsoleError, Ctx, Outcome, Reply};
use crate::protocol::sqlstate;

/// `RELOAD`: re-reads the configuration file, as SIGHUP does. What changed
/// (or what needs a restart) comes back as a NOTICE; an invalid file keeps
/// the running configuration and is reported as the error (`F0000`
/// config_file_error), naming the setting at fault.
pub fn reload(ctx: &Ctx<'_>) -> Outcome {
    match ctx.shared.reload() {
        Ok(report) => Ok(Reply::DoneNotice(
            "RELOAD",
            format!("configuration reloaded: {report}"),
        )),
        Err(e) => Err(ConsoleError::new(
            sqlstate::CONFIG_FILE_ERROR,
            e.to_string(),
        )),
    }
}

/// `SET log_level = '…'`: the log filter, in `RUST_LOG` syntax, changed
/// for the running process (not written to the configuration file).
pub fn set(ctx: &Ctx<'_>, key: &str, value: &str) -> Outcome {
    if key != "log_level" {
        return Err(ConsoleError::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "SET {key}: only log_level can be changed here; change other settings in the configuration file and RELOAD"
            ),
        ));
    }
    let Some(log) = ctx.shared.log.get() else {
        return Err(ConsoleError::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "this pgsluice has no runtime log filter (it was not started by the pgsluice binary)",
        ));
    };
    log.set_level(value).map_err(|e| {
        ConsoleError::new(sqlstate::INVALID_PARAMETER_VALUE, format!("log_level: {e}"))
    })?;
    Ok(Reply::DoneNotice(
        "SET",
        format!("log_level = {}", log.level()),
    ))
}
