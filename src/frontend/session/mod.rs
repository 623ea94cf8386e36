//! The message loop of one logged-in client.
//!
//! Between transactions (transaction and statement mode) the client holds no
//! server and costs only its socket and a small struct. Its first message
//! checks a server out; the relay then streams bytes both ways, inspecting
//! only the messages that change state (see `relay.rs`), until the exchange
//! is at a clean boundary and the server goes back to the pool.
//!
//! Reads go into persistent buffers, so every read in a `select!` is
//! cancel-safe; writes happen outside `select!`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod tracked;

use super::cancel::CancelSlot;
use super::params::ClientParams;
use super::relay::{self, RelayState, ServerEvent};
use super::statements::{ClientStatements, Replies, Verdict};
use crate::backend::{self, QueryOutcome};
use crate::config::PoolMode;
use crate::pool::{Pool, Pooled};
use crate::protocol::{self, Scanner, Segment, Severity, TxStatus, sqlstate};
use crate::proxy::{Phase, Shared};

/// First read of a client's next request: most fit, and an allocation this
/// small is served from the allocator's thread cache (the buffer is freed
/// again while the client is idle).
const CLIENT_FIRST_READ: usize = 1024;
/// Read size for client input while relaying (COPY, pipelines, big binds).
const CLIENT_READ: usize = 8 * 1024;
/// Read size for server output.
const SERVER_READ: usize = 32 * 1024;
/// An idle client keeps at most this much buffer.
const IDLE_BUFFER_KEEP: usize = 0;
/// Time allowed for the pooler's own queries (param sync, ROLLBACK, DISCARD).
const INTERNAL_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// After query_timeout sent a cancel, how long the server gets to answer.
const QUERY_CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// EOF or I/O error from the client.
    ClientGone,
    /// The client sent Terminate.
    Terminated,
    /// We told the client why and are closing it.
    Closed,
}

enum Step {
    Continue,
    Exit(Exit),
}

/// Whether the server connection survived relaying its output.
enum ServerFlow {
    Ok,
    Lost,
}

/// Writes synthetic replies now due, after the server bytes up to `pos`.
async fn emit_synthetic(
    replies: &mut Replies,
    out: &mut BytesMut,
    client: &mut TcpStream,
    buf: &[u8],
    written: &mut usize,
    pos: usize,
) -> std::io::Result<()> {
    out.clear();
    replies.take_ready(out);
    if !out.is_empty() {
        client.write_all(&buf[*written..pos]).await?;
        client.write_all(out).await?;
        *written = pos;
    }
    Ok(())
}

/// CommandComplete of `DISCARD ALL` / `DEALLOCATE ALL`: the server dropped
/// every prepared statement it had.
fn forgets_all_statements(msg: &[u8]) -> bool {
    let body = protocol::body(msg);
    body == b"DISCARD ALL\0" || body == b"DEALLOCATE ALL\0"
}

/// Reads what the socket has into `buf`. A short read means the socket was
/// drained at that instant, so tokio's readiness flag is cleared as part of
/// the same readiness event (tick-safe: data arriving after the read sets a
/// newer event that this does not clear). Without this, the relay's next
/// poll of the client would cost a `recvfrom` returning EAGAIN on every
/// transaction.
fn read_draining(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let mut got = 0;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let spare = buf.capacity() - buf.len();
        let n = stream.try_read_buf(buf)?;
        got = n;
        if n > 0 && n < spare {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

pub struct Session {
    cbuf: BytesMut,
    out: BytesMut,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    mode: PoolMode,
    params: ClientParams,
    pid: i32,
    cancel: Arc<CancelSlot>,
    server: Option<Pooled>,
    relay: RelayState,
    cscan: Scanner,
    sscan: Scanner,
    phase: tokio::sync::watch::Receiver<Phase>,
    /// In statement mode a transaction was opened; roll it back when quiet.
    rollback_pending: bool,
    /// The query_timeout cancel was sent for the request started then.
    query_cancelled: Option<Instant>,
    /// Transaction/statement mode: named prepared statements are mapped to
    /// pooled servers (see `statements.rs`); session mode passes through.
    tracked: bool,
    /// This client's prepared statements, by its own names.
    statements: ClientStatements,
    /// Replies owed to the client, in order (tracked mode).
    replies: Replies,
    /// Rewritten client bytes on their way to the server (tracked mode).
    sout: BytesMut,
    /// The client's unnamed statement, kept to prepare it again elsewhere.
    unnamed: tracked::Unnamed,
    unnamed_generation: u64,
    /// After pgsluice itself reported an error for a statement name, the
    /// client's messages up to its next Sync are dropped, as PostgreSQL
    /// skips them.
    client_skip: bool,
}

impl Session {
    pub(super) fn new(
        cbuf: BytesMut,
        shared: Arc<Shared>,
        pool: Arc<Pool>,
        mode: PoolMode,
        params: ClientParams,
        pid: i32,
        cancel: Arc<CancelSlot>,
    ) -> Self {
        let phase = shared.phase.clone();
        Self {
            cbuf,
            out: BytesMut::new(),
            shared,
            pool,
            mode,
            params,
            pid,
            cancel,
            server: None,
            relay: RelayState::new(),
            cscan: Scanner::new(),
            sscan: Scanner::new(),
            phase,
            rollback_pending: false,
            query_cancelled: None,
            tracked: mode != PoolMode::Session,
            statements: ClientStatements::default(),
            replies: Replies::new(),
            sout: BytesMut::new(),
            client_skip: false,
            unnamed: None,
            unnamed_generation: 0,
        }
    }

    pub async fn run(mut self, mut client: TcpStream) {
        let exit = match self.run_loop(&mut client).await {
            Ok(exit) => exit,
            Err(e) => {
                tracing::debug!(error = %e, "client connection error");
                Exit::ClientGone
            }
        };
        tracing::debug!(?exit, "client session ended");
        self.put_back_server().await;
        self.shared.cancels.unregister(self.pid);
        // Dropping the socket closes it (FIN); no separate shutdown call.
        drop(client);
    }

    async fn run_loop(&mut self, client: &mut TcpStream) -> std::io::Result<Exit> {
        loop {
            if self.server.is_none() {
                match self.idle_step(client).await? {
                    Step::Continue => continue,
                    Step::Exit(e) => return Ok(e),
                }
            }
            if let Step::Exit(e) = self.relay_step(client).await? {
                return Ok(e);
            }
        }
    }

    // ----- between transactions ------------------------------------------

    /// Waits for the client's next message with no server attached; checks
    /// a server out when one is needed.
    async fn idle_step(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        if self.cbuf.is_empty() {
            if *self.phase.borrow() != Phase::Running {
                return self.close_for_shutdown(client).await;
            }
            if self.cbuf.capacity() > IDLE_BUFFER_KEEP {
                self.cbuf = BytesMut::new();
            }
            tokio::select! {
                r = client.readable() => r?,
                r = self.phase.changed() => {
                    if r.is_err() {
                        // The proxy is gone: nothing will serve this client.
                        return Ok(Step::Exit(Exit::Closed));
                    }
                    return Ok(Step::Continue);
                }
            }
            self.cbuf.reserve(CLIENT_FIRST_READ);
            match read_draining(client, &mut self.cbuf) {
                Ok(0) => return Ok(Step::Exit(Exit::ClientGone)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Step::Continue),
                Err(e) => return Err(e),
            }
        }
        let max = self.shared.config.general.max_packet_size;
        let header = match protocol::peek_header(&self.cbuf, max) {
            Ok(Some(h)) => h,
            Ok(None) => return self.read_client(client).await,
            Err(e) => {
                return self
                    .close_with(client, sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                    .await;
            }
        };
        let whole = self.cbuf.len() >= header.total_len;
        match header.tag {
            b'X' => Ok(Step::Exit(Exit::Terminated)),
            // A Sync or Flush with nothing before it needs no server.
            b'S' if whole => {
                self.cbuf.advance(header.total_len);
                self.out.clear();
                protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                client.write_all(&self.out).await?;
                Ok(Step::Continue)
            }
            // Flush with nothing before it; or the tail of a COPY the server
            // already ended with an error (it would ignore these too).
            b'H' | b'd' | b'c' | b'f' if whole => {
                self.cbuf.advance(header.total_len);
                Ok(Step::Continue)
            }
            _ => self.attach(client).await,
        }
    }

    async fn read_client(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        self.cbuf.reserve(CLIENT_READ);
        if client.read_buf(&mut self.cbuf).await? == 0 {
            return Ok(Step::Exit(Exit::ClientGone));
        }
        Ok(Step::Continue)
    }

    /// Checks a server out and makes its session parameters the client's.
    async fn attach(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        let mut server = match self.pool.checkout().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(pool = self.pool.label(), error = %e, "checkout failed");
                self.refuse_request(client, e.sqlstate(), &e.to_string())
                    .await?;
                return Ok(Step::Continue);
            }
        };
        if let Some(sql) = self.params.sync_sql(&server.params, &server.set_by_pooler) {
            match server.run_internal(&sql, INTERNAL_QUERY_TIMEOUT).await {
                Ok(QueryOutcome::Done(TxStatus::Idle)) => self.params.after_sync(&mut server),
                Ok(QueryOutcome::Failed {
                    error,
                    status: TxStatus::Idle,
                }) => {
                    server.release();
                    return self.close_with(client, &error.code, &error.message).await;
                }
                Ok(_) | Err(_) => {
                    drop(server);
                    return self
                        .close_with(
                            client,
                            sqlstate::CONNECTION_FAILURE,
                            "server connection failed while applying session parameters",
                        )
                        .await;
                }
            }
        }
        self.cancel.attach(server.cancel_key);
        self.server = Some(server);
        self.relay.reset();
        self.replies.reset();
        self.sscan = Scanner::new();
        self.query_cancelled = None;
        Ok(Step::Continue)
    }

    /// Answers the client's pending request with an error (the connection
    /// lives on), discarding its messages up to the Query or Sync that ends
    /// the request, as PostgreSQL does after an error.
    async fn refuse_request(
        &mut self,
        client: &mut TcpStream,
        code: &str,
        message: &str,
    ) -> std::io::Result<()> {
        self.out.clear();
        protocol::error_response(&mut self.out, Severity::Error, code, message);
        client.write_all(&self.out).await?;
        let max = self.shared.config.general.max_packet_size;
        loop {
            match protocol::peek_header(&self.cbuf, max) {
                Ok(Some(h)) if self.cbuf.len() >= h.total_len => {
                    self.cbuf.advance(h.total_len);
                    if matches!(h.tag, b'Q' | b'S' | b'F') {
                        self.out.clear();
                        protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                        return client.write_all(&self.out).await;
                    }
                }
                Ok(_) => {
                    self.cbuf.reserve(CLIENT_READ);
                    if client.read_buf(&mut self.cbuf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
        }
    }

    /// Tells the client pgsluice is shutting down (57P01) and ends the session.
    async fn close_for_shutdown(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        self.close_with(
            client,
            sqlstate::ADMIN_SHUTDOWN,
            "pgsluice is shutting down",
        )
        .await
    }

    /// Sends a FATAL error and ends the session.
    async fn close_with(
        &mut self,
        client: &mut TcpStream,
        code: &str,
        message: &str,
    ) -> std::io::Result<Step> {
        self.out.clear();
        protocol::error_response(&mut self.out, Severity::Fatal, code, message);
        let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&self.out)).await;
        Ok(Step::Exit(Exit::Closed))
    }

    // ----- with a server attached -----------------------------------------

    /// Relays until the server is released (transaction/statement mode) or
    /// the session ends.
    async fn relay_step(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        if !self.cbuf.is_empty() {
            if let Some(step) = self.forward_client(client).await? {
                return Ok(step);
            }
        }
        loop {
            if self.at_release_point() {
                if *self.phase.borrow() != Phase::Running {
                    return self.close_for_shutdown(client).await;
                }
                if self.mode != PoolMode::Session {
                    self.release().await;
                    return Ok(Step::Continue);
                }
            }
            if *self.phase.borrow() == Phase::Stopping {
                return self
                    .close_with(
                        client,
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgsluice shutdown_timeout reached: closing",
                    )
                    .await;
            }
            let deadline = self.next_deadline();
            let Some(server) = self.server.as_deref_mut() else {
                return Ok(Step::Continue);
            };
            if server.buf.capacity() - server.buf.len() < 1024 {
                server.buf.reserve(SERVER_READ);
            }
            if self.cbuf.capacity() - self.cbuf.len() < 512 {
                self.cbuf.reserve(CLIENT_READ);
            }
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            enum Ev {
                Server(std::io::Result<usize>),
                Client(std::io::Result<usize>),
                Timer,
                Phase(bool),
            }
            let ev = tokio::select! {
                r = server.stream.read_buf(&mut server.buf) => Ev::Server(r),
                r = client.read_buf(&mut self.cbuf) => Ev::Client(r),
                _ = timer => Ev::Timer,
                r = self.phase.changed() => Ev::Phase(r.is_ok()),
            };
            match ev {
                Ev::Server(Ok(n)) if n > 0 => {
                    if let ServerFlow::Lost = self.forward_server(client).await? {
                        return self.server_lost(client).await;
                    }
                }
                Ev::Server(r) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "server read failed");
                    }
                    return self.server_lost(client).await;
                }
                Ev::Client(Ok(n)) if n > 0 => {
                    if let Some(step) = self.forward_client(client).await? {
                        return Ok(step);
                    }
                }
                Ev::Client(_) => return Ok(Step::Exit(Exit::ClientGone)),
                Ev::Timer => {
                    if let Some(step) = self.on_timer(client).await? {
                        return Ok(step);
                    }
                }
                Ev::Phase(true) => {}
                Ev::Phase(false) => return Ok(Step::Exit(Exit::Closed)),
            }
        }
    }

    fn at_release_point(&self) -> bool {
        // Client bytes not yet forwarded (a message still arriving whole)
        // belong to this exchange: release only with nothing pending.
        self.cbuf.is_empty()
            && self.relay.at_boundary()
            && self.replies.is_empty()
            && self.sscan.at_boundary()
            && self.cscan.at_boundary()
            && self.server.as_ref().is_some_and(|s| s.buf.is_empty())
    }

    async fn release(&mut self) {
        self.cancel.detach().await;
        if let Some(server) = self.server.take() {
            server.release();
        }
    }

    /// Forwards every complete or streamable client message in `cbuf`.
    /// Returns a step when the session must end.
    async fn forward_client(&mut self, client: &mut TcpStream) -> std::io::Result<Option<Step>> {
        if self.tracked {
            return self.forward_client_tracked(client).await;
        }
        let max = self.shared.config.general.max_packet_size;
        let now = Instant::now();
        let mut pos = 0;
        let mut end = None;
        loop {
            match self.cscan.next(&self.cbuf[pos..], max) {
                Ok(Segment::Pass { len }) => pos += len,
                Ok(Segment::Start { header, whole }) => {
                    if relay::client_tag_inspected(header.tag) {
                        if !whole {
                            break;
                        }
                        // Terminate: the server stays ours to clean up.
                        end = Some(Step::Exit(Exit::Terminated));
                        break;
                    }
                    self.relay.on_client_tag(header.tag, now);
                    pos += self.cscan.pass_partial(header, self.cbuf.len() - pos);
                }
                Ok(Segment::NeedMore) => break,
                Err(e) => {
                    self.write_server_prefix(pos).await;
                    return self
                        .close_with(client, sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                        .await
                        .map(Some);
                }
            }
        }
        if !self.write_server_prefix(pos).await {
            return self.server_lost(client).await.map(Some);
        }
        Ok(end)
    }

    /// Writes `cbuf[..pos]` to the server; false if the server is gone.
    async fn write_server_prefix(&mut self, pos: usize) -> bool {
        if pos == 0 {
            return true;
        }
        let Some(server) = self.server.as_deref_mut() else {
            return false;
        };
        let ok = server.stream.write_all(&self.cbuf[..pos]).await.is_ok();
        self.cbuf.advance(pos);
        ok
    }

    /// Relays the server's buffered output to the client, acting on the
    /// messages that change state.
    async fn forward_server(&mut self, client: &mut TcpStream) -> std::io::Result<ServerFlow> {
        let tracked = self.tracked;
        let Some(server) = self.server.as_deref_mut() else {
            return Ok(ServerFlow::Ok);
        };
        let now = Instant::now();
        let mut pos = 0;
        let mut written = 0;
        loop {
            let seg = match self
                .sscan
                .next(&server.buf[pos..], protocol::PG_MAX_MESSAGE_LEN)
            {
                Ok(s) => s,
                Err(e) => {
                    // Forward what came before, then treat the server as lost.
                    tracing::warn!(error = %e, "server sent a malformed message");
                    self.relay.server_unusable = true;
                    if pos > written {
                        client.write_all(&server.buf[written..pos]).await?;
                    }
                    server.buf.clear();
                    return Ok(ServerFlow::Lost);
                }
            };
            match seg {
                Segment::Pass { len } => pos += len,
                Segment::NeedMore => break,
                Segment::Start { header, whole }
                    if relay::server_tag_inspected(header.tag)
                        || (tracked && !matches!(header.tag, b'D' | b'd')) =>
                {
                    if !whole {
                        break;
                    }
                    let end = pos + header.total_len;
                    if tracked {
                        let msg = &server.buf[pos..end];
                        match self.replies.on_server(header.tag) {
                            Verdict::Forward => {}
                            Verdict::Swallow => {
                                client.write_all(&server.buf[written..pos]).await?;
                                written = end;
                            }
                            Verdict::Desync => {
                                tracing::warn!(
                                    tag = %char::from(header.tag),
                                    "server reply does not match the requests sent"
                                );
                                self.relay.server_unusable = true;
                            }
                        }
                        if header.tag == b'C' && forgets_all_statements(msg) {
                            server.prepared.clear();
                            self.statements.clear();
                        }
                        tracked::apply_undo(
                            server,
                            &mut self.statements,
                            &mut self.unnamed,
                            &mut self.replies.undone,
                        );
                    }
                    let event = if relay::server_tag_inspected(header.tag) {
                        self.relay
                            .on_server_message(header.tag, &server.buf[pos..end], now)
                    } else {
                        ServerEvent::None
                    };
                    match event {
                        ServerEvent::Parameter { name, value } => {
                            server.params.set(&name, &value);
                            self.params.observe(&name, &value);
                        }
                        ServerEvent::Ready(status)
                            if self.mode == PoolMode::Statement && status != TxStatus::Idle =>
                        {
                            // Statement mode cannot hold a transaction open:
                            // answer with an error instead of this
                            // ReadyForQuery and roll the server back.
                            client.write_all(&server.buf[written..pos]).await?;
                            self.out.clear();
                            protocol::error_response(
                                &mut self.out,
                                Severity::Error,
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "transaction blocks are not allowed with pool_mode = statement; \
                                 the transaction was rolled back",
                            );
                            protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                            client.write_all(&self.out).await?;
                            written = end;
                            self.rollback_pending = true;
                        }
                        ServerEvent::Fatal(fields) => {
                            tracing::info!(code = %fields.code, message = %fields.message, "server reported a fatal error");
                        }
                        ServerEvent::Desync => {
                            tracing::warn!("server sent ReadyForQuery with no request outstanding")
                        }
                        _ => {}
                    }
                    pos = end;
                    if tracked {
                        emit_synthetic(
                            &mut self.replies,
                            &mut self.out,
                            client,
                            &server.buf,
                            &mut written,
                            pos,
                        )
                        .await?;
                    }
                }
                Segment::Start { header, .. } => {
                    if tracked {
                        // DataRow / CopyData: never a reply's end.
                        self.replies.on_server(header.tag);
                    }
                    pos += self.sscan.pass_partial(header, server.buf.len() - pos);
                }
            }
        }
        if pos > written {
            client.write_all(&server.buf[written..pos]).await?;
        }
        server.buf.advance(pos);
        if self.rollback_pending && self.relay.quiet() {
            self.rollback_pending = false;
            match server
                .run_internal("ROLLBACK", INTERNAL_QUERY_TIMEOUT)
                .await
            {
                Ok(QueryOutcome::Done(TxStatus::Idle)) => self.relay.force_idle(),
                _ => self.relay.server_unusable = true,
            }
        }
        Ok(ServerFlow::Ok)
    }

    /// The server connection broke: tell the client and end the session.
    async fn server_lost(&mut self, client: &mut TcpStream) -> std::io::Result<Step> {
        let label = self.pool.label().to_owned();
        self.cancel.detach().await;
        self.server = None; // closed, never reused
        tracing::info!(pool = %label, "server connection lost while attached");
        self.close_with(
            client,
            sqlstate::CONNECTION_FAILURE,
            &format!("server connection closed unexpectedly (pool {label}); the transaction, if any, is lost"),
        )
        .await
    }

    fn next_deadline(&self) -> Option<Instant> {
        let g = &self.shared.config.general;
        let mut deadline: Option<Instant> = None;
        let mut consider = |d: Instant| deadline = Some(deadline.map_or(d, |cur| cur.min(d)));
        if let (Some(qt), Some(since)) = (g.query_timeout, self.relay.request_since) {
            match self.query_cancelled {
                Some(at) if at >= since => consider(at + QUERY_CANCEL_GRACE),
                _ => consider(since + qt),
            }
        }
        if let Some(it) = g.idle_transaction_timeout {
            if self.relay.quiet() && self.relay.tx_status() != TxStatus::Idle {
                consider(self.relay.ready_since + it);
            }
        }
        deadline
    }

    async fn on_timer(&mut self, client: &mut TcpStream) -> std::io::Result<Option<Step>> {
        let now = Instant::now();
        let g = &self.shared.config.general;
        let (query_timeout, idle_tx_timeout) = (g.query_timeout, g.idle_transaction_timeout);
        if let (Some(qt), Some(since)) = (query_timeout, self.relay.request_since) {
            match self.query_cancelled {
                Some(at) if at >= since && now >= at + QUERY_CANCEL_GRACE => {
                    let msg = format!(
                        "query_timeout ({}) exceeded and the server did not answer the cancel",
                        humantime::format_duration(qt)
                    );
                    if let Some(server) = self.server.take() {
                        self.cancel.detach().await;
                        drop(server);
                    }
                    return self
                        .close_with(client, sqlstate::QUERY_CANCELED, &msg)
                        .await
                        .map(Some);
                }
                Some(at) if at >= since => {}
                _ if now >= since + qt => {
                    if let Some(server) = self.server.as_ref() {
                        tracing::info!(
                            pool = self.pool.label(),
                            "query_timeout reached: cancelling"
                        );
                        let key = server.cancel_key;
                        tokio::spawn(async move {
                            let _ = backend::send_cancel(key, Duration::from_secs(5)).await;
                        });
                        self.query_cancelled = Some(now);
                    }
                }
                _ => {}
            }
        }
        if let Some(it) = idle_tx_timeout {
            if self.relay.quiet()
                && self.relay.tx_status() != TxStatus::Idle
                && now >= self.relay.ready_since + it
            {
                let msg = format!(
                    "terminating connection due to idle_transaction_timeout ({})",
                    humantime::format_duration(it)
                );
                return self
                    .close_with(client, sqlstate::IDLE_IN_TRANSACTION_TIMEOUT, &msg)
                    .await
                    .map(Some);
            }
        }
        Ok(None)
    }

    /// At session end: return the server clean, or close it.
    async fn put_back_server(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.cancel.detach().await;
        let clean_stream =
            self.sscan.at_boundary() && self.cscan.at_boundary() && !self.relay.server_unusable;
        if !clean_stream || !self.relay.quiet() {
            if self.relay.pending() > 0 {
                // Stop whatever it is running before closing it.
                let key = server.cancel_key;
                tokio::spawn(async move {
                    let _ = backend::send_cancel(key, Duration::from_secs(5)).await;
                });
            }
            tracing::debug!(pool = self.pool.label(), "closing server left mid-request");
            return;
        }
        if self.relay.tx_status() != TxStatus::Idle {
            match server
                .run_internal("ROLLBACK", INTERNAL_QUERY_TIMEOUT)
                .await
            {
                Ok(QueryOutcome::Done(TxStatus::Idle)) => {}
                _ => return,
            }
        }
        if self.mode == PoolMode::Session {
            match server
                .run_internal("DISCARD ALL", INTERNAL_QUERY_TIMEOUT)
                .await
            {
                Ok(QueryOutcome::Done(TxStatus::Idle)) => {
                    for name in std::mem::take(&mut server.set_by_pooler) {
                        server.params.remove(&name);
                    }
                    server.prepared.clear();
                }
                _ => return,
            }
        }
        server.release();
    }
}
