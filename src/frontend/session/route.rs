//! Read/write routing of one client's requests, in transaction and statement
//! mode for a database with replicas.
//!
//! A request (a simple Query, or extended-protocol messages up to Sync or
//! Flush) is classified before a server is chosen: every statement in it
//! counts, so a pipeline that reads and then writes goes to the primary.
//! A request whose end has not arrived yet is waited for; one that grows
//! past `DECIDE_LIMIT` bytes without ending goes to the primary, which can
//! run anything.
//!
//! Guarantees:
//! - a write never reaches a replica on purpose; one that does anyway (a
//!   hint, a misclassified function) fails there with 25006 and is retried
//!   on the primary before the client saw anything;
//! - a transaction never moves: routing happens only with no server
//!   attached, or between requests on a replica with no transaction open;
//! - read-your-writes: after a client used the primary, its reads go only to
//!   replicas that have replayed a WAL position the monitor sampled after
//!   that (or to the primary until one has).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::cluster::Cluster;
use crate::frontend::effects::{self, Replan};
use crate::frontend::statements::ClientStatements;
use crate::protocol::{self, ProtocolError};
use crate::router::{Access, Class, Command, Hint, RouteMode};

/// A request not finished within this many bytes is decided as it stands
/// (to the primary, since its rest is unknown).
const DECIDE_LIMIT: usize = 64 * 1024;
/// Server output held back while a read may still be retried.
pub(super) const RETRY_HOLD_LIMIT: usize = 256 * 1024;

/// What the buffered request needs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Request {
    pub access: Access,
    pub hint: Option<Hint>,
    /// pgsluice's own command, when the request is exactly one simple Query
    /// holding it.
    pub command: Option<Command>,
    /// Bytes of the request in the buffer.
    pub len: usize,
    /// The whole request is buffered, ends with Query or Sync, and can be
    /// sent again (what follows it waits until its outcome is known).
    pub replayable: bool,
    /// As `replayable`, but the request ends with Flush (asyncpg prepares
    /// so): only a stale plan may be recovered (see `window.rs`).
    pub flush_end: bool,
    /// Client statement names this request creates: forgotten before it is
    /// sent again, so the repeat creates them afresh.
    pub new_names: Vec<Bytes>,
    /// It runs a pooled prepared statement (Bind of a named statement, or
    /// a lone SQL `EXECUTE`) and no transaction control: a stale cached
    /// plan can be recovered by preparing again and resending it.
    pub replans: bool,
}

pub(super) enum Scan {
    NeedMore,
    Ready(Request),
}

/// Whether `text` mentions pgsluice (a hint or `SET pgsluice.route`), in
/// any letter case.
fn mentions_pgsluice(text: &[u8]) -> bool {
    memchr::memchr2_iter(b'p', b'P', text).any(|i| {
        text.get(i..i + 8)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"pgsluice"))
    })
}

/// How a request's texts are classified. With `decided` (the client's
/// route is `primary`, or it is inside a transaction on the primary that
/// already wrote), only texts that mention pgsluice are: nothing else can
/// change where the request goes or what is recorded of it, so the rest
/// count as writes without the cost of a classification per query.
/// Without a cluster nothing is classified (only the request's extent and
/// statements matter).
pub(super) fn judge(
    cluster: Option<&Cluster>,
    decided: bool,
) -> impl Fn(&[u8]) -> Option<Class> + '_ {
    move |text: &[u8]| match cluster {
        Some(cluster) if !decided || mentions_pgsluice(text) => Some(cluster.classify(text)),
        _ => None,
    }
}

/// Scans the request at the start of `buf`, classifying its texts with
/// `judge` (see [`judge`]); `sql_prepared` says whether the client has
/// SQL-level prepared statements.
pub(super) fn scan_request(
    buf: &[u8],
    max: usize,
    judge: impl Fn(&[u8]) -> Option<Class>,
    statements: &ClientStatements,
    unnamed: Option<&[u8]>,
    sql_prepared: bool,
) -> Result<Scan, ProtocolError> {
    let mut pos = 0;
    let mut access = Access::Read;
    let mut hint = None;
    let mut command = None;
    let mut replayable = true;
    let mut new_names = Vec::new();
    // Named statements bound, and whether each is safe to resend.
    let mut binds_named = false;
    let mut replannable = true;
    let mut parses = false;
    let mut parsed_unnamed = false;
    // Statement names the request closes (a Parse after that is new).
    let mut closed: Vec<&[u8]> = Vec::new();
    let mut first = true;
    let mut note = |class: &Option<Class>, access: &mut Access| {
        let Some(class) = class else {
            *access = Access::Write;
            first = false;
            return;
        };
        if class.access == Access::Write {
            *access = Access::Write;
        }
        if first {
            hint = class.hint;
        }
        first = false;
    };
    let mut last;
    loop {
        let header = match protocol::peek_header(&buf[pos..], max)? {
            Some(h) if buf.len() - pos >= h.total_len => h,
            _ => {
                if buf.len() >= DECIDE_LIMIT {
                    // Everything buffered and whatever follows it.
                    return Ok(Scan::Ready(Request {
                        access: Access::Write,
                        hint: None,
                        command: None,
                        len: usize::MAX,
                        replayable: false,
                        flush_end: false,
                        new_names: Vec::new(),
                        replans: false,
                    }));
                }
                return Ok(Scan::NeedMore);
            }
        };
        if !protocol::is_frontend_message(header.tag) {
            return Err(ProtocolError::UnknownMessage(header.tag));
        }
        let msg = &buf[pos..pos + header.total_len];
        pos += header.total_len;
        last = header.tag;
        match header.tag {
            b'Q' => {
                let text = protocol::query_text(msg);
                let class = judge(text);
                if pos == header.total_len {
                    command = class.as_ref().and_then(|c| c.command.clone());
                    binds_named = sql_prepared
                        && starts_with_execute(text)
                        && effects::replan(text) == Replan::Execute;
                }
                note(&class, &mut access);
                break;
            }
            b'P' => {
                let (name, text) = match protocol::parse_statement_text(msg) {
                    Some(text) => (statement_name(msg), text),
                    None => (b"".as_slice(), b"".as_slice()),
                };
                parses = true;
                parsed_unnamed |= name.is_empty();
                if !name.is_empty() {
                    let exists = statements.get(name).is_some() && !closed.contains(&name);
                    if exists || new_names.len() >= 8 {
                        // A duplicate name fails (42P05): not worth a repeat.
                        replayable = false;
                    } else {
                        new_names.push(Bytes::copy_from_slice(name));
                    }
                }
                note(&judge(text), &mut access);
            }
            b'B' => {
                let text = match crate::frontend::statements::parse_bind(msg) {
                    // Parsed in this request: judged with its Parse.
                    Some((_, b"", _)) if parsed_unnamed => continue,
                    Some((_, name, _)) if new_names.iter().any(|n| n == name) => {
                        binds_named = true;
                        continue;
                    }
                    Some((_, b"", _)) => unnamed,
                    Some((_, name, _)) => statements.get(name).map(|s| {
                        binds_named = true;
                        replannable &= s.replannable;
                        s.text()
                    }),
                    None => None,
                };
                match text {
                    Some(text) => note(&judge(text), &mut access),
                    // Unknown statement: the server reports it; the primary
                    // is as good a place as any.
                    None => access = Access::Write,
                }
            }
            // Describing a pooled statement can meet a stale plan too.
            b'D' => match crate::frontend::statements::parse_target(msg) {
                Some((b'S', name)) if !name.is_empty() => {
                    if let Some(s) = statements.get(name) {
                        binds_named = true;
                        replannable &= s.replannable;
                    } else if new_names.iter().any(|n| n == name) {
                        binds_named = true;
                    }
                }
                _ => {}
            },
            b'C' => {
                if let Some((b'S', name)) = crate::frontend::statements::parse_target(msg) {
                    closed.push(name);
                }
            }
            // Close is answered by pgsluice (named statements) or
            // harmless to repeat (portals, the unnamed statement).
            // A function call may do anything.
            b'F' => {
                access = Access::Write;
                break;
            }
            b'S' | b'H' => break,
            _ => {}
        }
    }
    // `SET pgsluice.route` is answered only as a lone simple Query.
    if buf.first() != Some(&b'Q') {
        command = None;
    }
    // Statements parsed in the request count too (lexed only here, when a
    // pooled statement is bound: the rare case).
    let replans =
        binds_named && replannable && (!parses || parsed_texts_replannable(&buf[..pos], max));
    Ok(Scan::Ready(Request {
        access,
        hint,
        command,
        len: pos,
        // Only a request that ends with an answer the client waits for
        // (ReadyForQuery) can be held back and sent again.
        replayable: replayable && matches!(last, b'Q' | b'S'),
        flush_end: replayable && last == b'H',
        new_names,
        replans,
    }))
}

/// Whether every Parse in the (whole, scanned) request is one statement
/// that is not transaction control.
fn parsed_texts_replannable(request: &[u8], max: usize) -> bool {
    let mut pos = 0;
    while let Ok(Some(h)) = protocol::peek_header(&request[pos..], max) {
        let msg = &request[pos..pos + h.total_len];
        pos += h.total_len;
        if h.tag == b'P' {
            match protocol::parse_statement_text(msg) {
                Some(text) if effects::replan(text) == Replan::Yes => {}
                _ => return false,
            }
        }
        if pos >= request.len() {
            break;
        }
    }
    true
}

/// Cheap prefilter for SQL `EXECUTE`: the text's first word.
fn starts_with_execute(text: &[u8]) -> bool {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    text.get(start..start + 7)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"execute"))
}

fn statement_name(msg: &[u8]) -> &[u8] {
    let body = protocol::body(msg);
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    &body[..end]
}

/// Why a request went where it went (logs, and later metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    Write,
    Read,
    Hint,
    Setting,
    NoReplica,
    ReadYourWrites,
    Retry,
}

impl From<Why> for crate::stats::RouteReason {
    fn from(w: Why) -> Self {
        use crate::stats::RouteReason as R;
        match w {
            Why::Write => R::Write,
            Why::Read => R::Read,
            Why::Hint => R::Hint,
            Why::Setting => R::Setting,
            Why::NoReplica => R::NoReplica,
            Why::ReadYourWrites => R::ReadYourWrites,
            Why::Retry => R::Retry,
        }
    }
}

/// Where a lone statement would go for a client that just connected (no
/// write of its own yet, the default route): the admin console's
/// `SHOW ROUTE`. Returns its classification, the node and the reason.
pub(crate) fn preview(
    cluster: &Arc<Cluster>,
    sql: &str,
) -> (Class, usize, crate::stats::RouteReason) {
    let class = cluster.classify(sql.as_bytes());
    let (node, why) = ClientRoute::new(cluster.clone(), None).choose(class.access, class.hint);
    (class, node, why.into())
}

/// One client's routing state.
pub(super) struct ClientRoute {
    pub cluster: Arc<Cluster>,
    /// `SET pgsluice.route`.
    pub mode: RouteMode,
    /// The replica this client's last read went to, which the next read
    /// prefers ([`Cluster::pick_replica`]).
    last_replica: Option<usize>,
    /// When this client last released the primary.
    pub last_write: Option<Instant>,
    /// The next decision must avoid this node (a failed read's retry), and
    /// use the primary if `primary_only`.
    pub retry: Option<(usize, bool)>,
}

/// A `pgsluice.route` value.
pub(crate) fn parse_route_mode(value: &str) -> Option<RouteMode> {
    match value.trim().to_ascii_lowercase().as_str() {
        "primary" => Some(RouteMode::Primary),
        "replica" => Some(RouteMode::Replica),
        "auto" | "default" => Some(RouteMode::Auto),
        _ => None,
    }
}

impl ClientRoute {
    /// `startup`: the client's `pgsluice.route` startup setting, if valid.
    pub fn new(cluster: Arc<Cluster>, startup: Option<RouteMode>) -> Self {
        let mode = startup.unwrap_or(match cluster.settings().default_route {
            crate::config::DefaultRoute::Auto => RouteMode::Auto,
            crate::config::DefaultRoute::Primary => RouteMode::Primary,
        });
        Self {
            cluster,
            mode,
            last_replica: None,
            last_write: None,
            retry: None,
        }
    }

    /// The node for `req`: 0 is the primary. Counted for metrics.
    pub fn decide(&mut self, req: &Request) -> (usize, Why) {
        let (node, why) = self.choose(req.access, req.hint);
        if node != 0 {
            self.last_replica = Some(node);
        }
        self.cluster.decisions.count(node != 0, why.into());
        (node, why)
    }

    /// Where a request of this access and hint would go now (nothing
    /// counted: `SHOW ROUTE`).
    pub fn choose(&mut self, access: Access, hint: Option<Hint>) -> (usize, Why) {
        let mut exclude = None;
        if let Some((node, primary_only)) = self.retry.take() {
            if primary_only {
                return (0, Why::Retry);
            }
            exclude = Some(node);
        }
        let want_replica = match (hint, self.mode) {
            (Some(Hint::Primary), _) => return (0, Why::Hint),
            (Some(Hint::Replica), _) => Some(Why::Hint),
            (None, RouteMode::Primary) => return (0, Why::Setting),
            (None, RouteMode::Replica) => Some(Why::Setting),
            (None, RouteMode::Auto) => None,
        };
        if let Some(why) = want_replica {
            // Asked for explicitly: any replica in rotation will do.
            return match self.cluster.pick_replica(None, exclude, self.last_replica) {
                Some(i) => (i, why),
                None => (0, Why::NoReplica),
            };
        }
        if access == Access::Write {
            return (0, Why::Write);
        }
        let min_lsn = match self.last_write {
            Some(at) if self.cluster.settings().read_your_writes => {
                match self.cluster.lsn_after(at) {
                    Some(lsn) => Some(lsn),
                    None => return (0, Why::ReadYourWrites),
                }
            }
            _ => None,
        };
        match self
            .cluster
            .pick_replica(min_lsn, exclude, self.last_replica)
        {
            Some(i) => (i, Why::Read),
            None if min_lsn.is_some() => (0, Why::ReadYourWrites),
            None => (0, Why::NoReplica),
        }
    }

    /// Whether the attached replica may run `req` (else it is routed anew).
    pub fn replica_may_run(&self, req: &Request) -> bool {
        match (req.hint, self.mode) {
            (Some(Hint::Primary), _) | (None, RouteMode::Primary) => false,
            (Some(Hint::Replica), _) | (None, RouteMode::Replica) => true,
            (None, RouteMode::Auto) => req.access == Access::Read,
        }
    }

    /// Answers pgsluice's own command into `out` (ending with
    /// ReadyForQuery in `status`).
    pub fn answer(&mut self, command: &Command, out: &mut BytesMut, status: protocol::TxStatus) {
        match command {
            Command::SetRoute(mode) => {
                self.mode = *mode;
                protocol::command_complete(out, "SET");
            }
            Command::ShowRoute => {
                let value = match self.mode {
                    RouteMode::Auto => "auto",
                    RouteMode::Primary => "primary",
                    RouteMode::Replica => "replica",
                };
                protocol::text_result(out, &["pgsluice.route"], &[vec![value.to_owned()]], "SHOW");
            }
            Command::Invalid(message) => protocol::error_response(
                out,
                protocol::Severity::Error,
                protocol::sqlstate::INVALID_PARAMETER_VALUE,
                message,
            ),
        }
        protocol::ready_for_query(out, status);
    }
}

#[cfg(test)]
mod tests {
    use super::mentions_pgsluice;

    #[test]
    fn pgsluice_is_found_in_any_case_and_only_whole() {
        assert!(mentions_pgsluice(b"/* PgSluice: replica */ SELECT 1"));
        assert!(mentions_pgsluice(b"SET pgsluice.route = auto"));
        assert!(!mentions_pgsluice(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
        assert!(!mentions_pgsluice(b"SELECT 'pgsluic'"));
        assert!(!mentions_pgsluice(b""));
    }
}
