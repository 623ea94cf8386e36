//! The admin console: the virtual database `pgsluice` (alias `pgbouncer`)
//! on the main port, speaking the simple query protocol.
//!
//! Each query is one command, parsed into [`Command`] and dispatched to the
//! file of its family (one variant + one file per command family). Output
//! columns, their order and types follow pgbouncer 1.18 wherever pgbouncer
//! has the command, so its tooling (exporters, scripts) reads pgsluice
//! unchanged; docs/admin.md lists every command and every difference.
//!
//! Access: `general.admin_users` may run everything, `general.stats_users`
//! only the read-only commands (`SHOW …`). Anyone else is refused at login
//! with a FATAL 28000. The extended query protocol is answered with 0A000
//! (the connection stays usable).

mod command;
mod config;
mod control;
mod lists;
mod prepared;
mod replicas;
mod result;
mod route;
mod settings;
mod shards;
mod show_clients;
mod show_pools;
mod show_stats;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::frontend::ClientHandle;
use crate::protocol::{self, Severity, TxStatus, sqlstate};
use crate::proxy::{Phase, Shared};
use crate::tls::ClientStream;

pub use command::{Command, ShutdownMode, parse};
pub use result::{Column, ResultSet};

/// Longest query the console reads (a `SHOW ROUTE` of a long statement
/// fits; nothing else comes near).
const MAX_CONSOLE_QUERY: usize = 1024 * 1024;

/// What a console user may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every command (`general.admin_users`).
    Admin,
    /// Read-only commands (`general.stats_users`).
    Stats,
}

/// The console access of `user`, if any.
pub fn access_for(config: &crate::config::Config, user: &str) -> Option<Access> {
    let g = &config.general;
    if g.admin_users.iter().any(|u| u == user) {
        Some(Access::Admin)
    } else if g.stats_users.iter().any(|u| u == user) {
        Some(Access::Stats)
    } else {
        None
    }
}

/// ParameterStatus values a console client is welcomed with. The version
/// starts with the pgbouncer release whose console pgsluice speaks, so
/// drivers that parse it (libpq, psycopg2) see a valid number.
pub fn welcome_params(access: Access) -> Vec<(&'static str, String)> {
    vec![
        (
            "server_version",
            format!("1.18.0/pgsluice {}", env!("CARGO_PKG_VERSION")),
        ),
        ("client_encoding", "UTF8".into()),
        ("server_encoding", "UTF8".into()),
        ("DateStyle", "ISO".into()),
        ("TimeZone", "UTC".into()),
        ("standard_conforming_strings", "on".into()),
        (
            "is_superuser",
            if access == Access::Admin { "on" } else { "off" }.into(),
        ),
    ]
}

/// A command's failure: an ErrorResponse with this SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleError {
    pub code: &'static str,
    pub message: String,
}

impl ConsoleError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn no_such_database(name: &str) -> Self {
        Self::new(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no such database: {name}"),
        )
    }
}

/// What a successful command sends back.
#[derive(Debug)]
pub enum Reply {
    /// A result set (`SHOW …`), tagged `SHOW`.
    Rows(ResultSet),
    /// A command without rows, tagged with its name (`PAUSE`, …).
    Done(&'static str),
    /// `SHOW HELP`: a NOTICE, then `SHOW`.
    Notice(String),
    /// A command without rows that reports what it did in a NOTICE.
    DoneNotice(&'static str, String),
}

pub type Outcome = Result<Reply, ConsoleError>;

/// What a command runs with.
pub struct Ctx<'a> {
    pub shared: &'a Arc<Shared>,
    /// The console client running the command.
    pub me: &'a ClientHandle,
}

impl Ctx<'_> {
    /// The configured database `name`, or the console's "no such database".
    fn database(&self, name: &str) -> Result<crate::config::Database, ConsoleError> {
        self.shared
            .config()
            .databases
            .get(name)
            .cloned()
            .ok_or_else(|| ConsoleError::no_such_database(name))
    }

    /// `name`'s database, or every configured database when `None`.
    fn databases(&self, name: Option<&str>) -> Result<Vec<String>, ConsoleError> {
        match name {
            Some(n) => Ok(vec![self.database(n)?.name.clone()]),
            None => Ok(self.shared.config().databases.keys().cloned().collect()),
        }
    }
}

/// Runs `command` for a user with `access`.
pub async fn dispatch(command: Command, access: Access, ctx: &Ctx<'_>) -> Outcome {
    if !command.read_only() && access != Access::Admin {
        return Err(ConsoleError::new(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!(
                "{} needs an admin user (general.admin_users); \"{}\" is a stats user (general.stats_users), which may run SHOW commands only",
                command.name(),
                ctx.me.id.user
            ),
        ));
    }
    match command {
        Command::ShowPools => show_pools::pools(ctx),
        Command::ShowStats => show_stats::stats(ctx),
        Command::ShowStatsTotals => show_stats::totals(ctx),
        Command::ShowStatsAverages => show_stats::averages(ctx),
        Command::ShowTotals => show_stats::grand_totals(ctx),
        Command::ShowClients => show_clients::clients(ctx),
        Command::ShowServers => show_clients::servers(ctx),
        Command::ShowDatabases => lists::databases(ctx),
        Command::ShowUsers => lists::users(ctx),
        Command::ShowLists => lists::lists(ctx),
        Command::ShowVersion => lists::version(),
        Command::ShowHelp => lists::help(),
        Command::ShowConfig => config::show(ctx),
        Command::ShowReplicas => replicas::show(ctx),
        Command::ShowRoute(sql) => route::show(ctx, &sql),
        Command::ShowPrepared => prepared::show(ctx),
        Command::ShowShards => shards::show(ctx),
        Command::Reload => settings::reload(ctx),
        Command::Set(key, value) => settings::set(ctx, &key, &value),
        Command::Pause(db) => control::pause(ctx, db.as_deref()).await,
        Command::Resume(db) => control::resume(ctx, db.as_deref()),
        Command::Reconnect(db) => control::reconnect(ctx, db.as_deref()),
        Command::Kill(db) => control::kill(ctx, &db),
        Command::KillClient(pid) => control::kill_client(ctx, pid),
        Command::WaitClose(db) => control::wait_close(ctx, db.as_deref()).await,
        Command::Shutdown(mode) => control::shutdown(ctx, mode),
        Command::Disable(db) => control::disable(ctx, &db, true),
        Command::Enable(db) => control::disable(ctx, &db, false),
        Command::Ban(node) => replicas::ban(ctx, &node, true),
        Command::Unban(node) => replicas::ban(ctx, &node, false),
    }
}

/// One logged-in console connection.
pub struct Console {
    shared: Arc<Shared>,
    client: ClientHandle,
    access: Access,
    buf: BytesMut,
    out: BytesMut,
    phase: tokio::sync::watch::Receiver<Phase>,
}

/// How reading the next message ended.
enum Input {
    Message { tag: u8, len: usize },
    Closed,
}

impl Console {
    pub fn new(shared: Arc<Shared>, client: ClientHandle, access: Access, buf: BytesMut) -> Self {
        let phase = shared.phase.clone();
        Self {
            shared,
            client,
            access,
            buf,
            out: BytesMut::new(),
            phase,
        }
    }

    /// Serves commands until the client leaves, is killed, or pgsluice
    /// shuts down.
    pub async fn run(mut self, mut stream: ClientStream) {
        let result = self.serve(&mut stream).await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "admin console connection error");
        }
    }

    async fn serve(&mut self, stream: &mut ClientStream) -> std::io::Result<()> {
        // After an extended-protocol message: skip to Sync.
        let mut skipping = false;
        loop {
            let (tag, len) = match self.next_message(stream).await? {
                Input::Message { tag, len } => (tag, len),
                Input::Closed => return Ok(()),
            };
            let msg = self.buf.split_to(len);
            self.out.clear();
            match tag {
                b'X' => return Ok(()),
                b'Q' => {
                    skipping = false;
                    let text = String::from_utf8_lossy(protocol::query_text(&msg)).into_owned();
                    self.run_query(&text, stream).await?;
                    if self.stop_after_command() {
                        return self.close(stream, "pgsluice is shutting down").await;
                    }
                }
                b'S' => {
                    skipping = false;
                    protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                }
                b'H' => {}
                b'F' => {
                    self.error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console does not run functions; send SHOW HELP for its commands",
                    );
                    protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                }
                _ if skipping => {}
                _ => {
                    skipping = true;
                    self.error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console speaks only the simple query protocol (extended query protocol messages are not supported); send commands as plain text queries, e.g. psql -c 'SHOW POOLS'",
                    );
                }
            }
            if !self.out.is_empty() {
                stream.write_all(&self.out).await?;
            }
        }
    }

    fn stop_after_command(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Reads until a whole message is buffered, the client leaves, is
    /// killed, or pgsluice shuts down (the client is then told why).
    async fn next_message(&mut self, stream: &mut ClientStream) -> std::io::Result<Input> {
        loop {
            match protocol::peek_header(&self.buf, MAX_CONSOLE_QUERY) {
                Ok(Some(h)) if self.buf.len() >= h.total_len => {
                    return Ok(Input::Message {
                        tag: h.tag,
                        len: h.total_len,
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    self.close_with(stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                        .await?;
                    return Ok(Input::Closed);
                }
            }
            if self.buf.is_empty() && self.stop_after_command() {
                self.close(stream, "pgsluice is shutting down").await?;
                return Ok(Input::Closed);
            }
            self.buf.reserve(1024);
            let read = tokio::select! {
                r = stream.read_buf(&mut self.buf) => r?,
                r = self.phase.changed() => {
                    if r.is_err() {
                        return Ok(Input::Closed);
                    }
                    continue;
                }
                () = self.client.killed() => {
                    let why = self.client.kill_reason();
                    self.close(stream, &why).await?;
                    return Ok(Input::Closed);
                }
            };
            if read == 0 {
                return Ok(Input::Closed);
            }
        }
    }

    async fn close(&mut self, stream: &mut ClientStream, why: &str) -> std::io::Result<()> {
        self.close_with(stream, sqlstate::ADMIN_SHUTDOWN, why).await
    }

    async fn close_with(
        &mut self,
        stream: &mut ClientStream,
        code: &str,
        message: &str,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        protocol::error_response(&mut out, Severity::Fatal, code, message);
        self.shared.stats.errors.count_code(code.as_bytes());
        match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    fn error(&mut self, code: &str, message: &str) {
        protocol::error_response(&mut self.out, Severity::Error, code, message);
        self.shared.stats.errors.count_code(code.as_bytes());
    }

    /// Parses and runs one query; the answer ends with ReadyForQuery.
    async fn run_query(&mut self, text: &str, stream: &mut ClientStream) -> std::io::Result<()> {
        let outcome = match command::parse(text) {
            Ok(command) => {
                tracing::info!(user = %self.client.id.user, command = %text.trim(), "admin console command");
                let ctx = Ctx {
                    shared: &self.shared,
                    me: &self.client,
                };
                // A long wait (PAUSE, WAIT_CLOSE) ends if this client is
                // killed or pgsluice stops.
                let run = dispatch(command, self.access, &ctx);
                let mut phase = self.phase.clone();
                let stopping = async {
                    loop {
                        if *phase.borrow() == Phase::Stopping || phase.changed().await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    r = run => r,
                    () = self.client.killed() => Err(ConsoleError::new(
                        sqlstate::ADMIN_SHUTDOWN,
                        self.client.kill_reason(),
                    )),
                    () = stopping => Err(ConsoleError::new(
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgsluice is shutting down",
                    )),
                }
            }
            Err(e) => Err(e),
        };
        self.out.clear();
        match outcome {
            Ok(Reply::Rows(rows)) => rows.write(&mut self.out, "SHOW"),
            Ok(Reply::Done(tag)) => protocol::command_complete(&mut self.out, tag),
            Ok(Reply::Notice(text)) => {
                result::notice(&mut self.out, &text);
                protocol::command_complete(&mut self.out, "SHOW");
            }
            Ok(Reply::DoneNotice(tag, text)) => {
                result::notice_message(&mut self.out, &text);
                protocol::command_complete(&mut self.out, tag);
            }
            Err(e) => self.error(e.code, &e.message),
        }
        protocol::ready_for_query(&mut self.out, TxStatus::Idle);
        stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }
}

/// `"<db>"` for node 0, `"<db>@replicaN"` for the others: the database
/// column of pool, server and stats rows (one row per node).
pub fn node_row_name(database: &str, node: usize) -> String {
    if node == 0 {
        database.to_owned()
    } else {
        format!("{database}@{}", crate::pool::node_name(node))
    }
}

/// `2026-01-31 12:00:00 UTC`, as pgbouncer prints times.
fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// A monotonic instant as wall-clock time (for display).
fn wall(t: std::time::Instant) -> std::time::SystemTime {
    let now = std::time::Instant::now();
    let sys = std::time::SystemTime::now();
    match now.checked_duration_since(t) {
        Some(ago) => sys - ago,
        None => sys + t.duration_since(now),
    }
}
