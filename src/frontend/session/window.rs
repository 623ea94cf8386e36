//! The retry window: a request sent to a server whose output is held back
//! until the client would see a row, so that it can be sent again if the
//! server fails it first.
//!
//! Two failures are worth a second try:
//! - a read on a replica that the replica cannot run (25006: the classifier
//!   or a hint sent a write there; 40001: cancelled by recovery; or the
//!   connection broke) goes elsewhere (`route.rs`);
//! - "cached plan must not change result type" (0A000) on a pooled prepared
//!   statement, in an implicit transaction: DDL changed what the statement
//!   returns since this server planned it. Statements are shared between
//!   clients, so the client cannot fix this by preparing again itself. The
//!   request is sent again once, on the same server after it prepared the
//!   statements afresh — but only where the client cannot be misled by the
//!   new shape: the request describes what it runs (a simple Query, or a
//!   Describe), or the statement's column types are the same as before
//!   (e.g. a `varchar(50)` widened to `varchar(75)`). Otherwise the client
//!   gets PostgreSQL's error, as it would without a pooler, since its
//!   driver may hold the old row description; the statement is prepared
//!   afresh for its next use.
//!
//! Either way the failed attempt rolled back everything it did (one
//! implicit transaction, no transaction control in it), and the client saw
//! none of its output.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::tracked::text_of;
use super::{Session, Step, route, state};
use crate::backend::QueryOutcome;
use crate::frontend::PreparedStats;
use crate::frontend::statements::{self, Statement};
use crate::protocol::{self, ErrorFields, TxStatus, sqlstate};
use crate::tls::ClientStream;

/// What to do with a windowed request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Another replica, or the primary.
    Elsewhere,
    /// The primary only (a replica refused a write).
    Primary,
    /// The same server, after it dropped its stale pooled statements.
    Replan,
}

pub(super) struct Window {
    /// The request has been sent (later requests wait until it is done).
    pub sent: bool,
    pub request: Bytes,
    /// Client statement names the request creates: forgotten before it is
    /// sent again, so the repeat creates them afresh.
    pub new_names: Vec<Bytes>,
    /// Server output not yet shown to the client.
    pub held: BytesMut,
    pub failed: Option<Retry>,
    /// A read on a replica (retried elsewhere when the replica fails it).
    pub on_replica: bool,
    /// A stale cached plan may be recovered (not for a request that is
    /// itself the recovery).
    pub replan: bool,
    /// The request ends with Flush, not Sync: after a failure pgsluice
    /// ends the server's failed batch itself with a hidden Sync.
    pub flush_end: bool,
    pub synced: bool,
}

impl Window {
    pub fn new(request: &[u8], new_names: Vec<Bytes>, on_replica: bool, replan: bool) -> Box<Self> {
        Box::new(Self {
            sent: false,
            request: Bytes::copy_from_slice(request),
            new_names,
            held: BytesMut::new(),
            failed: None,
            on_replica,
            replan,
            flush_end: false,
            synced: false,
        })
    }

    /// Notes an error the server sent for the windowed request.
    pub fn on_error(&mut self, fields: &ErrorFields) {
        self.failed = match fields.code.as_str() {
            // The classifier (or a hint) sent a write here.
            sqlstate::READ_ONLY_SQL_TRANSACTION if self.on_replica => Some(Retry::Primary),
            // Canceled by a conflict with recovery.
            sqlstate::SERIALIZATION_FAILURE if self.on_replica && !fields.is_fatal() => {
                Some(Retry::Elsewhere)
            }
            _ if self.replan && fields.is_stale_plan() => Some(Retry::Replan),
            _ => None,
        };
    }
}

/// Sends server output on to the client, or into the retry window while
/// one is open (and drops it once the window's request has failed).
pub(super) async fn send(
    client: &mut ClientStream,
    window: &mut Option<Box<Window>>,
    bytes: &[u8],
) -> std::io::Result<()> {
    match window {
        _ if bytes.is_empty() => Ok(()),
        // A stale plan's error is kept: it may be shown after all.
        Some(w) if w.failed.is_some() && w.failed != Some(Retry::Replan) => Ok(()),
        Some(w) => {
            w.held.extend_from_slice(bytes);
            Ok(())
        }
        None => client.write_all(bytes).await,
    }
}

/// [`send`], except that once a window has closed in the middle of a read,
/// the rest of that read joins what the window held (`carry`) so that
/// [`flush_carry`] writes both with one syscall.
pub(super) async fn emit(
    client: &mut ClientStream,
    window: &mut Option<Box<Window>>,
    carry: &mut BytesMut,
    bytes: &[u8],
) -> std::io::Result<()> {
    if window.is_none() && !carry.is_empty() {
        carry.extend_from_slice(bytes);
        Ok(())
    } else {
        send(client, window, bytes).await
    }
}

/// Closes the open retry window at `pos` in the server read `buf` (the
/// client is about to see results). When all it held is this read's, from
/// `written` on, those bytes stay where they are and go out with the rest
/// of the read, uncopied; otherwise what it held and this read's part so
/// far become `carry`, for [`flush_carry`] to write in one go.
pub(super) async fn close_window(
    client: &mut ClientStream,
    window: &mut Option<Box<Window>>,
    carry: &mut BytesMut,
    buf: &[u8],
    written: &mut usize,
    pos: usize,
) -> std::io::Result<()> {
    if window.as_ref().is_some_and(|w| w.held.is_empty()) && carry.is_empty() {
        *window = None;
        return Ok(());
    }
    emit(client, window, carry, &buf[*written..pos]).await?;
    *written = pos;
    if let Some(w) = window.take() {
        *carry = w.held;
    }
    Ok(())
}

/// Writes what [`emit`] gathered.
pub(super) async fn flush_carry(
    client: &mut ClientStream,
    carry: &mut BytesMut,
) -> std::io::Result<()> {
    if carry.is_empty() {
        return Ok(());
    }
    let result = client.write_all(carry).await;
    carry.clear();
    result
}

impl Session {
    /// A windowed request failed before the client saw a row, and the
    /// server has answered in full: send it again.
    pub(super) async fn after_window(
        &mut self,
        client: &mut ClientStream,
    ) -> std::io::Result<Option<Step>> {
        let Some(failed) = self.window.as_ref().and_then(|w| w.failed) else {
            return Ok(None);
        };
        if self
            .window
            .as_ref()
            .is_some_and(|w| w.flush_end && !w.synced)
        {
            return self.end_failed_batch().await;
        }
        if !self.server_quiet() {
            return Ok(None);
        }
        match failed {
            Retry::Replan => return self.replan(client).await,
            Retry::Elsewhere | Retry::Primary => {
                if !(self.relay.at_boundary() && self.release().await) {
                    self.drop_server().await;
                }
                self.resend(Some(failed == Retry::Primary));
            }
        }
        Ok(Some(Step::Continue))
    }

    /// A stale cached plan failed the windowed request (see the module
    /// docs): resend it, or show the client PostgreSQL's error.
    async fn replan(&mut self, client: &mut ClientStream) -> std::io::Result<Option<Step>> {
        let Some(window) = self.window.as_ref() else {
            return Ok(None);
        };
        let request = window.request.clone();
        let (shown, used) = self.shapes_in(&request);
        let resend = if shown {
            // The server forgets its pooled statements now (settling acts
            // on the error's mark); the client's SQL-level statements
            // there are made unknown, so the resend prepares again those
            // it uses.
            if let Some(server) = self.server.as_deref_mut() {
                for (name, text) in server.sql_prepared.iter_mut() {
                    if self.sql_prepared.get(name) == Some(text) {
                        *text = Arc::from("");
                    }
                }
            }
            if matches!(self.settle().await, state::Settled::Broken) {
                self.drop_server().await;
            }
            true
        } else {
            self.same_shapes_after_prepare(&used).await
        };
        if resend {
            PreparedStats::bump(&self.shared.stats.prepared.replans);
            tracing::info!("stale cached plan: statement prepared again; resending the request");
            self.resend(None);
            return Ok(Some(Step::Continue));
        }
        // PostgreSQL's error, as the client would have had it; the
        // statements are dropped at the release point.
        if let Some(w) = self.window.take() {
            client.write_all(&w.held).await?;
            if w.flush_end {
                // The server's batch was ended by pgsluice: the client's
                // messages up to its own Sync are skipped here, as the
                // server would have skipped them.
                self.client_skip = true;
            }
        }
        Ok(None)
    }

    /// A request that ended with Flush failed: the server skips everything
    /// up to a Sync the client will not send before it sees an answer. Once
    /// the server has answered all it was sent, pgsluice sends that Sync
    /// itself (its ReadyForQuery is swallowed).
    async fn end_failed_batch(&mut self) -> std::io::Result<Option<Step>> {
        if self.end_batch().await {
            if let Some(w) = self.window.as_mut() {
                w.synced = true;
            }
        }
        Ok(None)
    }

    /// Ends the server's open extended batch with a Sync of pgsluice's own
    /// (its ReadyForQuery is swallowed), once the server has answered
    /// everything it was sent. False if it cannot yet.
    pub(super) async fn end_batch(&mut self) -> bool {
        let answered = self.replies.is_empty()
            && self.sscan.at_boundary()
            && self.cscan.at_boundary()
            && self.server.as_ref().is_some_and(|s| s.buf.is_empty());
        let Some(server) = self.server.as_deref_mut().filter(|_| answered) else {
            return false;
        };
        self.relay.on_client_tag(b'S', std::time::Instant::now());
        self.replies
            .push_server(statements::Kind::Sync, true, statements::Undos::default());
        if server.stream.write_all(super::shapes::SYNC).await.is_err() {
            self.relay.server_unusable = true;
        }
        true
    }

    /// Whether `request` shows the client the row shape of what it runs (a
    /// simple Query; a portal Describe; a Describe of every statement it
    /// binds), and the client statement names it binds or describes.
    fn shapes_in<'r>(&self, request: &'r [u8]) -> (bool, Vec<&'r [u8]>) {
        let mut used: Vec<&[u8]> = Vec::new();
        let mut described: Vec<&[u8]> = Vec::new();
        let mut bound: Vec<&[u8]> = Vec::new();
        let mut portal = false;
        let mut pos = 0;
        while let Ok(Some(h)) = protocol::peek_header(&request[pos..], usize::MAX) {
            let Some(msg) = request.get(pos..pos + h.total_len) else {
                break;
            };
            pos += h.total_len;
            let name = match h.tag {
                b'Q' => return (true, used),
                b'B' => statements::parse_bind(msg).map(|(_, name, _)| {
                    bound.push(name);
                    name
                }),
                b'D' => match statements::parse_target(msg) {
                    Some((b'P', _)) => {
                        portal = true;
                        None
                    }
                    Some((_, name)) => {
                        described.push(name);
                        Some(name)
                    }
                    None => None,
                },
                _ => None,
            };
            if let Some(name) = name.filter(|n| self.statements.get(n).is_some()) {
                if !used.contains(&name) {
                    used.push(name);
                }
            }
        }
        let shown = portal || bound.iter().all(|n| described.contains(n));
        (shown && !used.is_empty(), used)
    }

    /// Prepares the statements behind the client's `names` afresh on the
    /// attached server and says whether each now returns the column types
    /// the client was last told for it (so its driver decodes the rows as
    /// before). A name the client never had described: no.
    async fn same_shapes_after_prepare(&mut self, names: &[&[u8]]) -> bool {
        let mut known = Vec::with_capacity(names.len());
        for name in names {
            match (self.statements.get(name), self.statements.shape(name)) {
                (Some(stmt), Some(shape)) => known.push((stmt.clone(), shape.to_vec())),
                _ => return false,
            }
        }
        let Some(server) = self.server.as_deref_mut() else {
            return false;
        };
        let mut msgs = BytesMut::new();
        let mut fresh: Vec<&Arc<Statement>> = Vec::new();
        for (stmt, _) in &known {
            if fresh.iter().any(|f| f.id == stmt.id) {
                continue;
            }
            statements::write_target(&mut msgs, b'C', b'S', &stmt.server_name);
            stmt.write_parse(&mut msgs);
            statements::write_target(&mut msgs, b'D', b'S', &stmt.server_name);
            fresh.push(stmt);
            PreparedStats::bump(&self.shared.stats.prepared.server_parses);
        }
        msgs.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        let mut after = Vec::new();
        match server
            .describe_internal(&msgs, super::INTERNAL_QUERY_TIMEOUT, &mut after)
            .await
        {
            Ok(QueryOutcome::Done(TxStatus::Idle)) if after.len() == fresh.len() => {}
            other => {
                tracing::debug!(outcome = ?other, "stale plan: preparing again failed");
                return false;
            }
        }
        for (stmt, shape) in fresh.iter().zip(&after) {
            if let Some(held) = server.prepared.get_mut(&stmt.id) {
                held.shape = Some(shape.clone());
            }
        }
        for (stmt, before) in &known {
            let i = fresh.iter().position(|f| f.id == stmt.id);
            if i.and_then(|i| after.get(i)) != Some(before) {
                tracing::debug!(?before, ?after, "stale plan: the column types changed");
                return false;
            }
        }
        // Only these were stale as far as anyone knows; the others stay.
        self.state.stale_plans = false;
        true
    }

    /// Puts the windowed request back in front of the client's input. With
    /// `elsewhere`, it is routed again avoiding the node that failed it (to
    /// the primary only if `true`).
    pub(super) fn resend(&mut self, elsewhere: Option<bool>) {
        let Some(window) = self.window.take() else {
            return;
        };
        if let (Some(primary_only), Some(route)) = (elsewhere, self.route.as_deref_mut()) {
            route.retry = Some((self.node, primary_only));
            route.cluster.count_retry();
            tracing::info!(
                node = %route.cluster.nodes()[self.node].name,
                to_primary = primary_only,
                "read failed on a replica before any row was sent; retrying it"
            );
        }
        // The repeat must not be recovered a second time.
        self.replanned = true;
        for name in &window.new_names {
            self.statements.remove(name);
        }
        // SQL-level PREPAREs of the request are made again with it.
        for name in self.state.take_sql_pending() {
            self.sql_prepared.remove(&name);
        }
        let mut again = BytesMut::with_capacity(window.request.len() + self.cbuf.len());
        again.extend_from_slice(&window.request);
        again.extend_from_slice(&self.cbuf);
        self.cbuf = again;
    }
}

impl Session {
    /// Scans the request at the front of `cbuf`, classifying its texts
    /// with this client's routing (nothing is classified without it).
    /// Inside a transaction on the primary that already wrote (TPC-B's
    /// every statement after its first UPDATE) a statement cannot move the
    /// transaction nor change what the release records, so it is not
    /// classified; sharded sessions classify everything (a statement may
    /// name another shard).
    pub(super) fn scan_front(&self) -> Result<route::Scan, crate::protocol::ProtocolError> {
        let unnamed = self.unnamed.as_ref().map(|(_, tail)| text_of(tail));
        let route = self.route.as_deref();
        let wrote_in_transaction = self.primary_wrote
            && self.node == 0
            && self.server.is_some()
            && self.shard.is_none()
            && self.relay.tx_status() != TxStatus::Idle;
        route::scan_request(
            &self.cbuf,
            self.config.general.max_packet_size,
            route::judge(
                route.map(|r| &*r.cluster),
                wrote_in_transaction
                    || route.is_some_and(|r| r.mode == crate::router::RouteMode::Primary),
            ),
            &self.statements,
            unnamed,
            !self.sql_prepared.is_empty(),
        )
    }

    /// Opens the window for `req`, the request at the front of `cbuf`, when
    /// it can be sent again: a replayable read on a replica, or a request
    /// running pooled prepared statements that arrived alone (holding it
    /// back must not stall a pipeline). The caller checked that it starts
    /// a request outside any transaction with the server quiet.
    pub(super) fn open_window(&mut self, req: &route::Request) -> bool {
        let resend = std::mem::take(&mut self.replanned);
        if !(req.replayable || req.flush_end) || req.len > self.cbuf.len() {
            return false;
        }
        // A client pinned to a replica stays there, failures and all.
        let on_replica =
            req.replayable && self.node != 0 && self.route.is_some() && self.state.pinned.is_none();
        let replan = self.tracked && req.replans && !resend && req.len == self.cbuf.len();
        if !(on_replica || replan) {
            return false;
        }
        let mut window = Window::new(
            &self.cbuf[..req.len],
            req.new_names.clone(),
            on_replica,
            replan,
        );
        window.flush_end = req.flush_end;
        self.window = Some(window);
        true
    }

    /// Without routing: opens a window for the request at the front of
    /// `cbuf` if it runs pooled prepared statements (see `open_window`);
    /// returns its length, for it to go out alone.
    pub(super) fn open_plan_window(&mut self) -> Option<usize> {
        // A named Parse first: its name is not empty (after tag and length).
        let parses_named = self.cbuf.first() == Some(&b'P') && self.cbuf.get(5) != Some(&0);
        if !self.tracked
            || (self.statements.is_empty() && self.sql_prepared.is_empty() && !parses_named)
            || !self.cscan.at_boundary()
            || self.relay.batch_open()
            || self.relay.copy_in()
            || self.client_skip
            || !(self.relay.quiet() && self.replies.is_empty())
            || self.relay.tx_status() != TxStatus::Idle
        {
            return None;
        }
        let req = match self.scan_front() {
            Ok(route::Scan::Ready(req)) => req,
            _ => return None,
        };
        if !self.open_window(&req) {
            return None;
        }
        if let Some(w) = self.window.as_mut() {
            w.sent = true;
        }
        Some(req.len)
    }
}
