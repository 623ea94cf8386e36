//! Console commands: the text of one simple Query → a [`Command`].
//!
//! Keywords are case-insensitive, a trailing `;` is allowed, and everything
//! after `SHOW ROUTE` is the SQL text, verbatim. A command gets exactly the
//! arguments it takes; anything else is 42601 naming the command and the
//! expected form.

use crate::protocol::sqlstate;

use super::ConsoleError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowPools,
    ShowStats,
    ShowStatsTotals,
    ShowStatsAverages,
    ShowTotals,
    ShowClients,
    ShowServers,
    ShowDatabases,
    ShowUsers,
    ShowLists,
    ShowConfig,
    ShowVersion,
    ShowHelp,
    /// pgsluice: every node, its role, state, lag and rotation.
    ShowReplicas,
    /// pgsluice: where this SQL would go now, and why.
    ShowRoute(String),
    /// pgsluice: the prepared statements shared across clients.
    ShowPrepared,
    /// pgsluice: every node of every shard of the sharded databases.
    ShowShards,
    /// Re-read and apply the configuration file (as SIGHUP).
    Reload,
    /// `SET key = value`: only `log_level` changes at runtime.
    Set(String, String),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Kill(String),
    /// A client's pid as `SHOW CLIENTS` shows it (`ptr` / `remote_pid`).
    KillClient(i32),
    WaitClose(Option<String>),
    Shutdown(ShutdownMode),
    Disable(String),
    Enable(String),
    /// pgsluice: take a replica out of read rotation (`db@replicaN`,
    /// `replicaN` in every database, or `host:port`).
    Ban(String),
    Unban(String),
}

/// How `SHUTDOWN` ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Close every client now.
    Immediate,
    /// Refuse new clients; end each client at its next transaction
    /// boundary (shutdown_timeout as for SIGTERM).
    WaitForServers,
    /// Refuse new clients; exit once the others have disconnected.
    WaitForClients,
}

impl Command {
    /// Whether a stats user may run it (it changes nothing).
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Self::ShowPools
                | Self::ShowStats
                | Self::ShowStatsTotals
                | Self::ShowStatsAverages
                | Self::ShowTotals
                | Self::ShowClients
                | Self::ShowServers
                | Self::ShowDatabases
                | Self::ShowUsers
                | Self::ShowLists
                | Self::ShowConfig
                | Self::ShowVersion
                | Self::ShowHelp
                | Self::ShowReplicas
                | Self::ShowRoute(_)
                | Self::ShowPrepared
                | Self::ShowShards
        )
    }

    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause(_) => "PAUSE",
            Self::Resume(_) => "RESUME",
            Self::Reconnect(_) => "RECONNECT",
            Self::Kill(_) => "KILL",
            Self::KillClient(_) => "KILL_CLIENT",
            Self::WaitClose(_) => "WAIT_CLOSE",
            Self::Shutdown(_) => "SHUTDOWN",
            Self::Disable(_) => "DISABLE",
            Self::Reload => "RELOAD",
            Self::Set(..) => "SET",
            Self::Enable(_) => "ENABLE",
            Self::Ban(_) => "BAN",
            Self::Unban(_) => "UNBAN",
            _ => "SHOW",
        }
    }
}

fn syntax(message: impl Into<String>) -> ConsoleError {
    ConsoleError::new(sqlstate::SYNTAX_ERROR, message)
}

/// One argument: a bare word or a double-quoted name (`""` inside is `"`).
fn words(s: &str) -> Result<Vec<String>, ConsoleError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        word.push('"');
                    }
                    Some('"') => break,
                    Some(c) => word.push(c),
                    None => return Err(syntax("unterminated quoted name")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

/// Parses one console query.
pub fn parse(text: &str) -> Result<Command, ConsoleError> {
    let trimmed = text.trim();
    let trimmed = trimmed.strip_suffix(';').unwrap_or(trimmed).trim_end();
    let unknown = || {
        syntax(format!(
            "invalid admin console command '{trimmed}'; send SHOW HELP for the list"
        ))
    };
    let (verb, rest) = match trimmed.split_once(char::is_whitespace) {
        Some((v, r)) => (v, r.trim_start()),
        None => (trimmed, ""),
    };
    let verb = verb.to_ascii_uppercase();
    if verb == "SHOW" {
        let (what, rest) = match rest.split_once(char::is_whitespace) {
            Some((w, r)) => (w.to_ascii_uppercase(), r.trim()),
            None => (rest.to_ascii_uppercase(), ""),
        };
        if what == "ROUTE" {
            if rest.is_empty() {
                return Err(syntax(
                    "SHOW ROUTE needs a statement: SHOW ROUTE SELECT * FROM t",
                ));
            }
            return Ok(Command::ShowRoute(rest.to_owned()));
        }
        let command = match what.as_str() {
            "POOLS" => Command::ShowPools,
            "STATS" => Command::ShowStats,
            "STATS_TOTALS" => Command::ShowStatsTotals,
            "STATS_AVERAGES" => Command::ShowStatsAverages,
            "TOTALS" => Command::ShowTotals,
            "CLIENTS" => Command::ShowClients,
            "SERVERS" => Command::ShowServers,
            "DATABASES" => Command::ShowDatabases,
            "USERS" => Command::ShowUsers,
            "LISTS" => Command::ShowLists,
            "CONFIG" => Command::ShowConfig,
            "VERSION" => Command::ShowVersion,
            "HELP" => Command::ShowHelp,
            "REPLICAS" => Command::ShowReplicas,
            "PREPARED" => Command::ShowPrepared,
            "SHARDS" => Command::ShowShards,
            _ => return Err(unknown()),
        };
        if !rest.is_empty() {
            return Err(syntax(format!("SHOW {what} takes no arguments")));
        }
        return Ok(command);
    }
    if verb == "RELOAD" {
        if !rest.is_empty() {
            return Err(syntax("RELOAD takes no arguments"));
        }
        return Ok(Command::Reload);
    }
    if verb == "SET" {
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => match rest.split_once(char::is_whitespace) {
                Some((k, v)) => match v.trim_start().split_once(char::is_whitespace) {
                    Some((to, v)) if to.eq_ignore_ascii_case("TO") => (k.trim(), v.trim()),
                    _ => (k.trim(), ""),
                },
                None => (rest.trim(), ""),
            },
        };
        let value = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(value);
        if key.is_empty() || value.is_empty() {
            return Err(syntax(
                "SET needs a setting and a value: SET log_level = 'debug'",
            ));
        }
        return Ok(Command::Set(key.to_ascii_lowercase(), value.to_owned()));
    }
    let args = words(rest)?;
    let optional = |make: fn(Option<String>) -> Command| match args.as_slice() {
        [] => Ok(make(None)),
        [db] => Ok(make(Some(db.clone()))),
        _ => Err(syntax(format!("{verb} takes at most one database name"))),
    };
    let required = |make: fn(String) -> Command, what: &str| match args.as_slice() {
        [one] => Ok(make(one.clone())),
        [] => Err(syntax(format!("{verb} needs {what}: {verb} <{what}>"))),
        _ => Err(syntax(format!("{verb} takes exactly one {what}"))),
    };
    match verb.as_str() {
        "PAUSE" => optional(Command::Pause),
        "RESUME" => optional(Command::Resume),
        "RECONNECT" => optional(Command::Reconnect),
        "WAIT_CLOSE" => optional(Command::WaitClose),
        "KILL" => required(Command::Kill, "database"),
        "DISABLE" => required(Command::Disable, "database"),
        "ENABLE" => required(Command::Enable, "database"),
        "BAN" => required(Command::Ban, "node"),
        "UNBAN" => required(Command::Unban, "node"),
        "KILL_CLIENT" => {
            let [id] = args.as_slice() else {
                return Err(syntax(
                    "KILL_CLIENT needs one client id (the ptr or remote_pid column of SHOW CLIENTS)",
                ));
            };
            let pid = match id.strip_prefix("0x").or_else(|| id.strip_prefix("0X")) {
                Some(hex) => i32::from_str_radix(hex, 16).ok(),
                None => id.parse().ok(),
            };
            pid.filter(|p| *p > 0).map(Command::KillClient).ok_or_else(|| {
                syntax(format!(
                    "KILL_CLIENT: `{id}` is not a client id (the ptr or remote_pid column of SHOW CLIENTS)"
                ))
            })
        }
        "SHUTDOWN" => match args.as_slice() {
            [] => Ok(Command::Shutdown(ShutdownMode::Immediate)),
            [m] if m.eq_ignore_ascii_case("WAIT_FOR_SERVERS") => {
                Ok(Command::Shutdown(ShutdownMode::WaitForServers))
            }
            [m] if m.eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => {
                Ok(Command::Shutdown(ShutdownMode::WaitForClients))
            }
            _ => Err(syntax(
                "SHUTDOWN takes nothing, WAIT_FOR_SERVERS or WAIT_FOR_CLIENTS",
            )),
        },
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively_with_optional_semicolon() {
        assert_eq!(parse("SHOW POOLS"), Ok(Command::ShowPools));
        assert_eq!(
            parse("  show   stats_totals ; "),
            Ok(Command::ShowStatsTotals)
        );
        assert_eq!(parse("SHOW STATS;"), Ok(Command::ShowStats));
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            parse("RESUME \"My DB\""),
            Ok(Command::Resume(Some("My DB".into())))
        );
        assert_eq!(parse("KILL app"), Ok(Command::Kill("app".into())));
        assert_eq!(parse("KILL_CLIENT 0x1f"), Ok(Command::KillClient(31)));
        assert_eq!(parse("kill_client 31"), Ok(Command::KillClient(31)));
        assert_eq!(
            parse("SHUTDOWN wait_for_clients"),
            Ok(Command::Shutdown(ShutdownMode::WaitForClients))
        );
        assert_eq!(
            parse("SHOW ROUTE SELECT 'a;b' FROM t;"),
            Ok(Command::ShowRoute("SELECT 'a;b' FROM t".into()))
        );
        assert_eq!(
            parse("BAN app@replica1"),
            Ok(Command::Ban("app@replica1".into()))
        );
    }

    #[test]
    fn mistakes_say_what_is_expected() {
        for bad in [
            "",
            "SELECT 1",
            "SHOW",
            "SHOW FOO",
            "SHOW POOLS extra",
            "KILL",
            "PAUSE a b",
            "KILL_CLIENT x",
            "KILL_CLIENT -3",
            "SHUTDOWN NOW",
            "SHOW ROUTE",
            "DISABLE \"open",
        ] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.code, sqlstate::SYNTAX_ERROR, "{bad}");
        }
        assert!(
            parse("KILL")
                .unwrap_err()
                .message
                .contains("KILL <database>")
        );
        assert!(!Command::Pause(None).read_only());
        assert!(Command::ShowRoute("x".into()).read_only());
    }
}
