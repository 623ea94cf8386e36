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
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::tls::ClientStream;

pub(super) mod parked;
pub(crate) mod route;
mod shapes;
pub(super) mod shard;
mod sql_prepared;
mod state;
mod tracked;
mod upstream;
mod window;

use super::params::ClientParams;
use super::relay::{self, RelayState, ServerEvent};
use super::statements::{ClientStatements, Replies, Verdict};
use crate::backend::{self, QueryOutcome};
use crate::cluster::{Attached, Cluster};
use crate::config::PoolMode;
use crate::frontend::Alert;
use crate::frontend::spares;
use crate::pool::{NodePools, Pool, PoolError, Pooled};
use crate::protocol::{self, ErrorFields, Scanner, Segment, Severity, TxStatus, sqlstate};
use crate::proxy::{Phase, Shared};
use route::{ClientRoute, Scan, Why};
use window::{Window, close_window, emit, flush_carry};

/// First read of a client's next request: most fit.
const CLIENT_FIRST_READ: usize = 1024;
/// Read size for client input while relaying (COPY, pipelines, big binds).
const CLIENT_READ: usize = 8 * 1024;
/// Read size for server output.
const SERVER_READ: usize = 32 * 1024;
/// An idle client keeps no read buffer: it goes back to the thread's spares
/// (up to [`SPARE_BUFFERS_MAX`] of at most [`SPARE_BUFFER_MAX_CAPACITY`]
/// bytes, a larger one is freed) and the client takes one again when its
/// next request arrives, as pgbouncer lends a buffer only while bytes are in
/// flight. Freeing and allocating it anew cost every transaction a malloc
/// and a free outside glibc's fast path (~500 instructions under callgrind).
const SPARE_BUFFERS_MAX: usize = 64;
const SPARE_BUFFER_MAX_CAPACITY: usize = 2 * CLIENT_READ;

thread_local! {
    static SPARE_BUFFERS: std::cell::RefCell<Vec<BytesMut>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives an idle client's (empty) read buffer to the thread's spares.
fn shed_buffer(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    buf.clear();
    // A buffer read into and consumed keeps its room behind the consumed
    // bytes: this takes it back (it moves nothing and allocates nothing then).
    buf.reserve(CLIENT_FIRST_READ);
    if buf.capacity() > SPARE_BUFFER_MAX_CAPACITY {
        return;
    }
    spares::give(&SPARE_BUFFERS, buf, SPARE_BUFFERS_MAX);
}

/// Room for a client's next request: a spare buffer when the client has
/// none, then at least `additional` bytes free.
fn ready_buffer(buf: &mut BytesMut, additional: usize) {
    if buf.capacity() == 0 {
        if let Some(spare) = spares::take(&SPARE_BUFFERS) {
            *buf = spare;
        }
    }
    buf.reserve(additional);
}
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
    /// The admin console killed it (KILL, KILL_CLIENT).
    Killed,
    /// Not an end: the idle client goes to the parking lot.
    Parked,
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

/// Client bytes kept back from the attached server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Until the server has answered everything sent so far (pgsluice
    /// answers the next request itself, in order).
    UntilQuiet,
    /// The next request needs another node: once the server is quiet and
    /// outside a transaction it is released and the request routed afresh;
    /// inside a transaction the request stays with it.
    Reroute,
}

/// Where a client's requests can go: its pools on every node of its
/// database, and the database's replication group if it has replicas.
pub(super) struct Upstream {
    pub pools: NodePools,
    pub cluster: Option<Arc<Cluster>>,
    /// This client counted against its user's and database's limits.
    pub admitted: crate::proxy::Admitted,
    /// This client in the admin console's registry.
    pub client: crate::frontend::ClientHandle,
    /// A sharded database: every shard's pools (`pools` and `cluster` are
    /// shard 0's until a request is placed elsewhere; see `shard.rs`).
    pub sharded: Option<Box<shard::ShardRoute>>,
    /// The reload generation `pools` and `cluster` belong to.
    pub generation: u64,
    /// The configuration the client logged in with.
    pub config: Arc<crate::config::Config>,
}

/// How an attempt to attach a server ended.
enum Attach {
    Attached,
    Failed(PoolError),
    Exit(Step),
}

pub struct Session {
    cbuf: BytesMut,
    out: BytesMut,
    shared: Arc<Shared>,
    /// This user's pools on every node; index 0 is the primary.
    pools: NodePools,
    /// Node of the attached (or last attached) server.
    node: usize,
    /// Read/write routing (transaction and statement mode with replicas,
    /// or a sharded database).
    route: Option<Box<ClientRoute>>,
    /// Shard placement (a sharded database).
    shard: Option<Box<shard::ShardRoute>>,
    _admitted: crate::proxy::Admitted,
    /// This client's state for the admin console, and its kill switch.
    client: crate::frontend::ClientHandle,
    /// Client bytes read since the last ReadyForQuery (stats).
    received: u64,
    /// Counts this client on its node while a server is attached.
    on_node: Option<Attached>,
    /// The attached primary ran something that may have written.
    primary_wrote: bool,
    held: Option<Held>,
    mode: PoolMode,
    params: ClientParams,
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
    /// The text of `unnamed` changes no session state (its effects scan
    /// found nothing).
    unnamed_plain: bool,
    unnamed_generation: u64,
    /// After pgsluice itself reported an error for a statement name, the
    /// client's messages up to its next Sync are dropped, as PostgreSQL
    /// skips them.
    client_skip: bool,
    /// Session parameters to capture and session-only state (pinning).
    state: state::SessionState,
    /// This client's SQL-level prepared statements: name → PREPARE text.
    sql_prepared: sql_prepared::SqlNames,
    /// The extended-protocol batch was already open before the message
    /// being rewritten (nothing can be injected in front of it).
    batch_was_open: bool,
    /// The request sent last, kept until the client sees its first row so
    /// it can be sent again (see `window.rs`).
    window: Option<Box<Window>>,
    /// The request at the front of `cbuf` is a resend: no second one.
    replanned: bool,
    /// The client statement name bound to the unnamed portal (empty: the
    /// unnamed statement).
    portal_statement: Vec<u8>,
    /// Client statement names whose columns changed since the client
    /// described them, found at the start of this request (`shapes.rs`).
    mismatched: Vec<Vec<u8>>,
    /// The reload generation of `pools`, `route` and `config` (see
    /// `upstream.rs`).
    generation: u64,
    /// The live configuration as of `generation`: read without touching
    /// the shared `ArcSwap` on every message.
    config: Arc<crate::config::Config>,
    config_generation: u64,
}

impl Session {
    pub(super) fn new(
        cbuf: BytesMut,
        shared: Arc<Shared>,
        upstream: Upstream,
        mode: PoolMode,
        params: ClientParams,
    ) -> Self {
        let route = match upstream.cluster {
            Some(c)
                if mode != PoolMode::Session
                    && (c.nodes().len() > 1 || upstream.sharded.is_some()) =>
            {
                let startup = params
                    .own("pgsluice.route")
                    .and_then(route::parse_route_mode);
                Some(Box::new(ClientRoute::new(c, startup)))
            }
            _ => None,
        };
        let kept = parked::Kept {
            pools: upstream.pools,
            admitted: upstream.admitted,
            client: upstream.client,
            received: 0,
            generation: upstream.generation,
            node: 0,
            route,
            shard: upstream.sharded,
            mode,
            params,
            tracked: mode != PoolMode::Session,
            statements: ClientStatements::default(),
            sql_prepared: sql_prepared::SqlNames::default(),
            unnamed: None,
            unnamed_plain: false,
            unnamed_generation: 0,
            portal_statement: Box::default(),
        };
        let config = Some((upstream.config, upstream.generation));
        Self::assemble(kept, config, cbuf, shared)
    }

    /// A session from its lasting state (see `parked.rs`), with everything
    /// that lives only during a request fresh and empty.
    /// `config`: the configuration and its generation, if the caller has
    /// them (else the live ones).
    fn assemble(
        kept: parked::Kept,
        config: Option<(Arc<crate::config::Config>, u64)>,
        cbuf: BytesMut,
        shared: Arc<Shared>,
    ) -> Self {
        let parked::Kept {
            pools,
            admitted,
            client,
            received,
            generation,
            node,
            route,
            shard,
            mode,
            params,
            tracked,
            statements,
            sql_prepared,
            unnamed,
            unnamed_plain,
            unnamed_generation,
            portal_statement,
        } = kept;
        let phase = shared.phase.clone();
        let (config, config_generation) = config.unwrap_or_else(|| {
            // Generation first: a reload after this read is seen next time.
            let generation = shared.generation();
            (arc_swap::Guard::into_inner(shared.config()), generation)
        });
        Self {
            cbuf,
            out: BytesMut::new(),
            shared,
            pools,
            _admitted: admitted,
            client,
            received,
            generation,
            config,
            config_generation,
            node: usize::from(node),
            route,
            shard,
            on_node: None,
            primary_wrote: false,
            held: None,
            mode,
            params,
            server: None,
            relay: RelayState::new(),
            cscan: Scanner::new(),
            sscan: Scanner::new(),
            phase,
            rollback_pending: false,
            query_cancelled: None,
            tracked,
            statements,
            replies: Replies::new(),
            sout: BytesMut::new(),
            client_skip: false,
            state: state::SessionState::default(),
            sql_prepared,
            batch_was_open: false,
            unnamed: unnamed.map(|u| *u),
            unnamed_plain,
            unnamed_generation,
            window: None,
            replanned: false,
            portal_statement: portal_statement.into_vec(),
            mismatched: Vec::new(),
        }
    }

    fn pool(&self) -> &Arc<Pool> {
        &self.pools[self.node]
    }

    /// Serves the logged-in client until it leaves; `permit` (its place
    /// under `max_client_conn`) is given back at the end.
    ///
    /// Not an `async fn`: an async fn keeps its arguments twice in its
    /// future (as captured arguments and as the body's locals; rustc issue
    /// 62958), which cost every live session 968 bytes. The `async move`
    /// block below uses what it captured in place.
    // The lint's suggestion, an async fn, is exactly what this avoids.
    #[allow(clippy::manual_async_fn)]
    pub fn run(
        mut self,
        mut client: ClientStream,
        permit: crate::proxy::ClientPermit,
    ) -> impl std::future::Future<Output = ()> + Send {
        // No `let` rebinding in the block: that would store them twice again.
        async move {
            if self.run_to_end(&mut client).await == Exit::Parked {
                self.park(client, permit);
            } else {
                drop(client);
                drop(permit);
            }
        }
    }

    /// Serves the client until it leaves, or until it parks (the caller
    /// then hands it to the parking lot; see `parked.rs`).
    async fn run_to_end(&mut self, client: &mut ClientStream) -> Exit {
        // The loop is here, not in a function of its own: every level of
        // awaiting keeps its own copy of `self` and `client` in the task.
        let exit = loop {
            let step = if self.server.is_none() {
                self.idle_step(client).await
            } else {
                // Boxed: the relay's state exists only while a server is
                // attached, not in every idle session's task.
                Box::pin(self.relay_step(client)).await
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::Exit(Exit::Parked)) => return Exit::Parked,
                Ok(Step::Exit(exit)) => break exit,
                Err(e) => {
                    tracing::debug!(error = %e, "client connection error");
                    break Exit::ClientGone;
                }
            }
        };
        tracing::debug!(?exit, "client session ended");
        // The end of a session is boxed: its futures' state is not part of
        // every live session's task.
        if exit == Exit::Killed {
            let why = self.client.kill_reason();
            let _ = Box::pin(self.close_with(client, sqlstate::ADMIN_SHUTDOWN, &why)).await;
        }
        Box::pin(self.put_back_server()).await;
        // The caller drops the socket, which closes it (FIN).
        exit
    }

    /// Gives back what the last transaction left in the session's queues
    /// and maps, as the client goes idle: a client between transactions
    /// holds no capacity it is not using (pgbouncer likewise lends a buffer
    /// only while bytes are in flight). The reply queue goes to the
    /// thread's spares for the next request (see `Replies::shed`); maps and
    /// name lists are dropped once empty and made again when needed. Before
    /// this, every idle client that had run a prepared statement kept
    /// ~0.8 kB it no longer used.
    fn shed(&mut self) {
        self.replies.shed();
        self.statements.shed();
        if self.portal_statement.is_empty() && self.portal_statement.capacity() > 0 {
            self.portal_statement = Vec::new();
        }
        if self.mismatched.is_empty() && self.mismatched.capacity() > 0 {
            self.mismatched = Vec::new();
        }
        self.sql_prepared.shed();
    }

    /// What [`ClientInfo::alerted`](crate::frontend::ClientInfo::alerted)
    /// reported: a kill ends the session; a phase change is marked seen (the
    /// caller's loop then acts on the new phase).
    fn on_alert(&mut self, alert: Alert) -> Step {
        match alert {
            Alert::Killed => Step::Exit(Exit::Killed),
            Alert::Phase(true) => {
                self.phase.borrow_and_update();
                Step::Continue
            }
            Alert::Phase(false) => Step::Exit(Exit::Closed),
            Alert::Park if self.parkable() => Step::Exit(Exit::Parked),
            Alert::Park => {
                self.client.park_declined();
                Step::Continue
            }
        }
    }

    // ----- between transactions ------------------------------------------

    /// Waits for the client's next message with no server attached; checks
    /// a server out when one is needed.
    async fn idle_step(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
        if self.cbuf.is_empty() {
            if *self.phase.borrow() >= Phase::Draining {
                // Rare paths are boxed: their futures would size every idle session.
                return Box::pin(self.close_for_shutdown(client)).await;
            }
            shed_buffer(&mut self.cbuf);
            self.shed();
            let read = match client {
                // Plain TCP: wait for readiness without a buffer, then one
                // draining read (see `read_draining`).
                ClientStream::Plain(tcp) => {
                    // poll_read_ready waits in the socket's own waker slot;
                    // `readable()` would add a ~130-byte waiter to every
                    // idle session's future.
                    let alert = tokio::select! {
                        biased;
                        r = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)) => {
                            r?;
                            None
                        }
                        a = self.client.alerted_idle(&self.phase) => Some(a),
                    };
                    if let Some(a) = alert {
                        return Ok(self.on_alert(a));
                    }
                    ready_buffer(&mut self.cbuf, CLIENT_FIRST_READ);
                    read_draining(tcp, &mut self.cbuf)
                }
                // TLS may hold decrypted bytes the socket no longer shows:
                // only a read tells.
                ClientStream::Tls(tls) => {
                    ready_buffer(&mut self.cbuf, CLIENT_FIRST_READ);
                    let read = tokio::select! {
                        r = tls.read_buf(&mut self.cbuf) => Ok(r),
                        a = self.client.alerted(&self.phase) => Err(a),
                    };
                    match read {
                        Ok(r) => r,
                        Err(a) => return Ok(self.on_alert(a)),
                    }
                }
            };
            match read {
                Ok(0) => return Ok(Step::Exit(Exit::ClientGone)),
                Ok(n) => self.received += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Step::Continue),
                Err(e) => return Err(e),
            }
        }
        let max = self.config.general.max_packet_size;
        let header = match protocol::peek_header(&self.cbuf, max) {
            Ok(Some(h)) => h,
            Ok(None) => return self.read_client(client).await,
            Err(e) => {
                let message = e.to_string();
                return Box::pin(self.close_with(client, sqlstate::PROTOCOL_VIOLATION, &message))
                    .await;
            }
        };
        if !protocol::is_frontend_message(header.tag) {
            let e = protocol::ProtocolError::UnknownMessage(header.tag);
            let message = e.to_string();
            return Box::pin(self.close_with(client, e.sqlstate(), &message)).await;
        }
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
            // Boxed: checkout and routing state exists only while a request
            // is being placed, not in every idle session's task.
            _ => Box::pin(self.route_and_attach(client)).await,
        }
    }

    /// Picks the node for the buffered request (or answers it, if it is
    /// pgsluice's own command) and attaches a server there.
    async fn route_and_attach(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
        self.follow_reload();
        let started = Instant::now();
        let deadline = started + self.pools[0].settings().checkout_timeout;
        if self.route.is_none() {
            return Ok(match self.attach(client, 0, started, deadline).await? {
                Attach::Attached => Step::Continue,
                Attach::Failed(e) => {
                    Box::pin(self.refuse_checkout(client, e)).await?;
                    Step::Continue
                }
                Attach::Exit(step) => step,
            });
        }
        let req = match self.scan_front() {
            Ok(Scan::Ready(req)) => req,
            Ok(Scan::NeedMore) => return self.read_client(client).await,
            Err(e) => {
                let message = e.to_string();
                return Box::pin(self.close_with(client, e.sqlstate(), &message)).await;
            }
        };
        let mut req = req;
        if self.shard.is_some() {
            // Sharding is boxed: its state would size every request.
            if let Some(step) = Box::pin(self.shard_idle(client, &mut req)).await? {
                return Ok(step);
            }
        }
        let Some(route) = self.route.as_deref_mut() else {
            return Ok(Step::Continue);
        };
        if let Some(command) = &req.command {
            self.out.clear();
            route.answer(command, &mut self.out, TxStatus::Idle);
            self.cbuf.advance(req.len);
            client.write_all(&self.out).await?;
            return Ok(Step::Continue);
        }
        loop {
            let Some(route) = self.route.as_deref_mut() else {
                return Ok(Step::Continue);
            };
            let (node, why) = route.decide(&req);
            match self.attach(client, node, started, deadline).await? {
                Attach::Attached => {
                    if self.shard.is_some() {
                        if let Some(step) = Box::pin(self.shard_after_attach(client)).await? {
                            return Ok(step);
                        }
                    }
                    tracing::trace!(node, ?why, "routed");
                    self.primary_wrote = node == 0
                        && !matches!(why, Why::NoReplica | Why::ReadYourWrites | Why::Read);
                    self.open_window(&req);
                    return Ok(Step::Continue);
                }
                // A replica that cannot be reached: the primary serves
                // the read, within the same deadline.
                Attach::Failed(PoolError::Server(e)) if node != 0 => {
                    tracing::info!(node, error = %e, "replica unavailable; read goes to the primary");
                    if let Some(route) = self.route.as_deref_mut() {
                        route.retry = Some((node, true));
                    }
                }
                Attach::Failed(e) => {
                    Box::pin(self.refuse_checkout(client, e)).await?;
                    return Ok(Step::Continue);
                }
                Attach::Exit(step) => return Ok(step),
            }
        }
    }

    /// Tells the client no server could be had for its request.
    async fn refuse_checkout(
        &mut self,
        client: &mut ClientStream,
        e: PoolError,
    ) -> std::io::Result<()> {
        tracing::info!(pool = self.pool().label(), error = %e, "checkout failed");
        let message = match (&e, self.route.is_some() && self.node == 0) {
            (PoolError::Server(_), true) => format!(
                "the primary of database \"{}\" is unavailable: {e}",
                self.route
                    .as_ref()
                    .map_or("", |r| r.cluster.database.as_str())
            ),
            _ => e.to_string(),
        };
        self.refuse_request(client, e.sqlstate(), &message).await
    }

    async fn read_client(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
        self.cbuf.reserve(CLIENT_READ);
        match client.read_buf(&mut self.cbuf).await? {
            0 => Ok(Step::Exit(Exit::ClientGone)),
            n => {
                self.received += n as u64;
                Ok(Step::Continue)
            }
        }
    }

    /// Checks a server out on `node` and makes its session parameters the
    /// client's.
    async fn attach(
        &mut self,
        client: &mut ClientStream,
        node: usize,
        started: Instant,
        deadline: Instant,
    ) -> std::io::Result<Attach> {
        self.node = node;
        self.client.waiting(node, started);
        // The client counts on `node` from now on, while it waits too, so
        // that replica choice sees queues and not only busy servers.
        let counted = self.route.as_deref().map(|r| r.cluster.attach(node));
        // An idle server is taken without a future; waiting for one (or for
        // a new connection) is boxed, as is the parameter sync below, so
        // that this future, boxed once per request, stays small.
        let checked_out = match self.pools[node].try_checkout_idle() {
            Some(server) => Ok(server),
            None => match Box::pin(self.wait_checkout(node, started, deadline)).await {
                Some(r) => r,
                None => return Ok(Attach::Exit(Step::Exit(Exit::Killed))),
            },
        };
        let mut server = match checked_out {
            Ok(s) => s,
            Err(e) => {
                self.client.idle();
                return Ok(Attach::Failed(e));
            }
        };
        if let Some(sql) = self.params.sync_sql_for(&mut server) {
            match Box::pin(self.sync_params(client, server, sql)).await? {
                Ok(synced) => server = synced,
                Err(step) => return Ok(Attach::Exit(step)),
            }
        }
        self.client.cancel.attach(server.cancel_key);
        self.client
            .attached(node, crate::frontend::Link::of(&server));
        self.server = Some(server);
        self.relay.reset();
        self.replies.reset();
        self.sscan = Scanner::new();
        self.query_cancelled = None;
        self.held = None;
        self.on_node = counted;
        Ok(Attach::Attached)
    }

    /// Waits for a server on `node` (the pool has no idle one); `None` when
    /// the client was killed meanwhile.
    async fn wait_checkout(
        &self,
        node: usize,
        started: Instant,
        deadline: Instant,
    ) -> Option<Result<Pooled, PoolError>> {
        let checkout = self
            .client
            .cancel
            .abortable(|| self.pools[node].checkout_by(started, deadline));
        tokio::select! {
            // No random start: no RNG draw per wait.
            biased;
            r = checkout => Some(r),
            () = self.client.killed() => None,
        }
    }

    /// Makes a checked-out server's session parameters the client's with
    /// `sql`; the server back, or the step that ends the session.
    async fn sync_params(
        &mut self,
        client: &mut ClientStream,
        mut server: Pooled,
        sql: String,
    ) -> std::io::Result<Result<Pooled, Step>> {
        match server.run_internal(&sql, INTERNAL_QUERY_TIMEOUT).await {
            Ok(QueryOutcome::Done(TxStatus::Idle)) => {
                self.params.after_sync(&mut server);
                Ok(Ok(server))
            }
            Ok(QueryOutcome::Failed {
                error,
                status: TxStatus::Idle,
            }) => {
                server.release();
                Ok(Err(self
                    .close_with(client, &error.code, &error.message)
                    .await?))
            }
            Ok(_) | Err(_) => {
                drop(server);
                Ok(Err(self
                    .close_with(
                        client,
                        sqlstate::CONNECTION_FAILURE,
                        "server connection failed while applying session parameters",
                    )
                    .await?))
            }
        }
    }

    /// Answers the client's pending request with an error (the connection
    /// lives on), discarding its messages up to the Query or Sync that ends
    /// the request, as PostgreSQL does after an error.
    async fn refuse_request(
        &mut self,
        client: &mut ClientStream,
        code: &str,
        message: &str,
    ) -> std::io::Result<()> {
        self.out.clear();
        protocol::error_response(&mut self.out, Severity::Error, code, message);
        self.shared.stats.errors.count_code(code.as_bytes());
        client.write_all(&self.out).await?;
        let max = self.config.general.max_packet_size;
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
    async fn close_for_shutdown(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
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
        client: &mut ClientStream,
        code: &str,
        message: &str,
    ) -> std::io::Result<Step> {
        self.out.clear();
        protocol::error_response(&mut self.out, Severity::Fatal, code, message);
        self.shared.stats.errors.count_code(code.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&self.out)).await;
        Ok(Step::Exit(Exit::Closed))
    }

    // ----- with a server attached -----------------------------------------

    /// Relays until the server is released (transaction/statement mode) or
    /// the session ends.
    async fn relay_step(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
        if !self.cbuf.is_empty() {
            if let Some(step) = self.pump_client(client).await? {
                return Ok(step);
            }
        }
        loop {
            if let Some(step) = self.after_window(client).await? {
                return Ok(step);
            }
            if let Some(held) = self.held {
                if held == Held::Reroute
                    && self.relay.batch_only_prepares()
                    && !self.replies.skipping()
                {
                    // Only statements were prepared on this replica (a
                    // Parse/Describe/Flush): pgsluice ends that batch, so
                    // the request that needs another node can move.
                    self.end_batch().await;
                }
                if self.server_quiet() {
                    self.held = None;
                    if held == Held::Reroute
                        && self.relay.at_boundary()
                        && *self.phase.borrow() < Phase::Draining
                    {
                        // The next request goes elsewhere: idle_step routes it
                        // (unless the client is pinned here).
                        if self.release().await {
                            return Ok(Step::Continue);
                        }
                    }
                    if let Some(step) = self.pump_client(client).await? {
                        return Ok(step);
                    }
                    continue;
                }
            }
            if self.at_release_point() {
                self.follow_config();
                if *self.phase.borrow() >= Phase::Draining {
                    return self.close_for_shutdown(client).await;
                }
                if self.mode != PoolMode::Session && self.release().await {
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
                Alert(Alert),
            }
            let ev = tokio::select! {
                // Polled in this order (no random start: no RNG per poll).
                biased;
                r = server.stream.read_buf(&mut server.buf) => Ev::Server(r),
                r = client.read_buf(&mut self.cbuf) => Ev::Client(r),
                _ = timer => Ev::Timer,
                a = self.client.alerted(&self.phase) => Ev::Alert(a),
            };
            match ev {
                Ev::Server(Ok(n)) if n > 0 => {
                    self.pools[self.node].stats().sent(n);
                    if let ServerFlow::Lost = self.forward_server(client).await? {
                        return self.server_lost(client).await;
                    }
                    if !self.cbuf.is_empty() {
                        // Client bytes that waited for a retry window to
                        // close may go now.
                        if let Some(step) = self.pump_client(client).await? {
                            return Ok(step);
                        }
                    }
                }
                Ev::Server(r) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "server read failed");
                    }
                    return self.server_lost(client).await;
                }
                Ev::Client(Ok(n)) if n > 0 => {
                    self.received += n as u64;
                    if let Some(step) = self.pump_client(client).await? {
                        return Ok(step);
                    }
                }
                Ev::Client(_) => return Ok(Step::Exit(Exit::ClientGone)),
                Ev::Timer => {
                    if let Some(step) = self.on_timer(client).await? {
                        return Ok(step);
                    }
                }
                Ev::Alert(a) => {
                    if let Step::Exit(e) = self.on_alert(a) {
                        return Ok(Step::Exit(e));
                    }
                }
            }
        }
    }

    /// The server has answered everything sent to it.
    fn server_quiet(&self) -> bool {
        self.relay.quiet()
            && self.replies.is_empty()
            && self.sscan.at_boundary()
            && self.cscan.at_boundary()
            && self.server.as_ref().is_some_and(|s| s.buf.is_empty())
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

    /// Returns the server to its pool at a release point, after capturing
    /// the session state the client's requests changed. False when the
    /// client is pinned to it (it stays attached).
    async fn release(&mut self) -> bool {
        match self.settle().await {
            state::Settled::Release => {}
            state::Settled::Keep => return false,
            state::Settled::Broken => self.relay.server_unusable = true,
        }
        if self.relay.server_unusable {
            self.drop_server().await;
            self.primary_wrote = false;
            return true;
        }
        self.client.cancel.detach().await;
        if let Some(server) = self.server.take() {
            server.release();
        }
        self.on_node = None;
        self.client.idle();
        if self.node == 0 && self.primary_wrote {
            if let Some(route) = self.route.as_deref_mut() {
                route.last_write = Some(Instant::now());
            }
        }
        self.primary_wrote = false;
        true
    }

    /// Forwards buffered client bytes. With routing, one request at a time:
    /// each is classified first, and one a replica must not run is held
    /// back (see [`Held`]).
    async fn pump_client(&mut self, client: &mut ClientStream) -> std::io::Result<Option<Step>> {
        if self.route.is_none() {
            if self.window.is_some() {
                // Later requests wait until the windowed one is done.
                return Ok(None);
            }
            let limit = self.open_plan_window().unwrap_or(usize::MAX);
            return self.forward_client(client, limit).await;
        }
        loop {
            let window_sent = self.window.as_ref().map(|w| w.sent);
            if self.cbuf.is_empty() || self.held.is_some() || window_sent == Some(true) {
                return Ok(None);
            }
            if window_sent == Some(false) {
                // The windowed request itself, exactly as it was scanned.
                let len = self.window.as_mut().map_or(0, |w| {
                    w.sent = true;
                    w.request.len()
                });
                if let Some(step) = self.forward_client(client, len).await? {
                    return Ok(Some(step));
                }
                continue;
            }
            // Whole messages are classified whenever one starts (COPY data
            // and a message still streaming just pass); the node can only
            // change at a request start, outside an open extended batch.
            let at_message = self.cscan.at_boundary()
                && !self.relay.copy_in()
                && !self.client_skip
                && !matches!(self.cbuf.first(), Some(b'd' | b'c' | b'f'));
            if !at_message {
                return self.forward_client(client, usize::MAX).await;
            }
            let request_start = !self.relay.batch_open();
            let req = match self.scan_front() {
                Ok(Scan::Ready(req)) => req,
                Ok(Scan::NeedMore) => return Ok(None),
                Err(e) => {
                    let message = e.to_string();
                    return Box::pin(self.close_with(client, e.sqlstate(), &message))
                        .await
                        .map(Some);
                }
            };
            let quiet = self.relay.quiet() && self.replies.is_empty();
            let mut req = req;
            if self.shard.is_some() {
                match Box::pin(self.shard_relay(client, &mut req, request_start, quiet)).await? {
                    shard::Relay::Go => {}
                    shard::Relay::Hold(held) => {
                        self.held = Some(held);
                        return Ok(None);
                    }
                    shard::Relay::Answered => continue,
                    shard::Relay::NeedMore => return Ok(None),
                    shard::Relay::Exit(step) => return Ok(Some(step)),
                }
            }
            let Some(route) = self.route.as_deref_mut() else {
                return Ok(None);
            };
            if let Some(command) = req.command.as_ref().filter(|_| request_start) {
                if !quiet {
                    self.held = Some(Held::UntilQuiet);
                    return Ok(None);
                }
                self.out.clear();
                route.answer(command, &mut self.out, self.relay.tx_status());
                self.cbuf.advance(req.len);
                client.write_all(&self.out).await?;
                continue;
            }
            // Inside a transaction on this replica, or inside an open
            // extended batch (an implicit transaction), the request stays
            // here: PostgreSQL refuses a write with 25006 as it would.
            // A batch on this replica that only prepared statements (and
            // was answered without error) can still be left.
            let prepares_only = !request_start
                && self.tracked
                && self.relay.batch_only_prepares()
                && self.replies.is_empty()
                && !self.replies.skipping();
            if self.node != 0
                && (request_start || prepares_only)
                && self.state.pinned.is_none()
                && !route.replica_may_run(&req)
                && (!quiet || self.relay.tx_status() == TxStatus::Idle)
            {
                self.held = Some(Held::Reroute);
                return Ok(None);
            }
            if self.node == 0 && req.access == crate::router::Access::Write {
                self.primary_wrote = true;
            }
            if request_start && req.replayable && self.relay.tx_status() == TxStatus::Idle {
                if self.node != 0 && self.state.pinned.is_none() {
                    // A read that can still be retried if this replica fails
                    // it: it goes out alone, once what came before is
                    // answered.
                    if !quiet {
                        self.held = Some(Held::UntilQuiet);
                        return Ok(None);
                    }
                    self.open_window(&req);
                } else if quiet {
                    self.open_window(&req);
                }
                if let Some(w) = self.window.as_mut() {
                    w.sent = true;
                }
            }
            let before = self.cbuf.len();
            if let Some(step) = self.forward_client(client, req.len).await? {
                return Ok(Some(step));
            }
            if self.cbuf.len() == before {
                // A message still arriving (past the decision limit).
                return Ok(None);
            }
        }
    }

    /// Forwards every complete or streamable client message in
    /// `cbuf[..limit]`. Returns a step when the session must end.
    async fn forward_client(
        &mut self,
        client: &mut ClientStream,
        limit: usize,
    ) -> std::io::Result<Option<Step>> {
        if self.tracked {
            return self.forward_client_tracked(client, limit).await;
        }
        let max = self.config.general.max_packet_size;
        let now = Instant::now();
        let mut pos = 0;
        let mut end = None;
        loop {
            match self.cscan.next(&self.cbuf[pos..], max) {
                Ok(Segment::Pass { len }) => pos += len,
                Ok(Segment::Start { header, .. }) if !protocol::is_frontend_message(header.tag) => {
                    self.write_server_prefix(pos).await;
                    let e = protocol::ProtocolError::UnknownMessage(header.tag);
                    let message = e.to_string();
                    return Box::pin(self.close_with(client, e.sqlstate(), &message))
                        .await
                        .map(Some);
                }
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
                    let message = e.to_string();
                    return Box::pin(self.close_with(
                        client,
                        sqlstate::PROTOCOL_VIOLATION,
                        &message,
                    ))
                    .await
                    .map(Some);
                }
            }
        }
        if !self.write_server_prefix(pos).await {
            return Box::pin(self.server_lost(client)).await.map(Some);
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
    /// messages that change state. While a read may still be retried (see
    /// `route.rs`), the output goes to the retry window instead.
    async fn forward_server(&mut self, client: &mut ClientStream) -> std::io::Result<ServerFlow> {
        let tracked = self.tracked;
        let Some(server) = self.server.as_deref_mut() else {
            return Ok(ServerFlow::Ok);
        };
        let mut window = self.window.take();
        // What a retry window held, and what follows it in this read, go to
        // the client in one write (not one for the held part and another
        // for the rest).
        let mut carry = BytesMut::new();
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
                    emit(client, &mut window, &mut carry, &server.buf[written..pos]).await?;
                    flush_carry(client, &mut carry).await?;
                    server.buf.clear();
                    self.window = window;
                    return Ok(ServerFlow::Lost);
                }
            };
            if let (Segment::Start { header, whole }, Some(w)) = (&seg, window.as_mut()) {
                // Rows, COPY, and notices (a long statement's progress the client may
                // be waiting for) end the window.
                let shows_rows =
                    matches!(header.tag, b'D' | b'G' | b'H' | b'W' | b'd' | b'N' | b'A');
                if w.failed.is_none()
                    && (shows_rows || w.held.len() + (pos - written) > route::RETRY_HOLD_LIMIT)
                {
                    // The client is about to see results: no retry now.
                    close_window(
                        client,
                        &mut window,
                        &mut carry,
                        &server.buf,
                        &mut written,
                        pos,
                    )
                    .await?;
                } else if header.tag == b'E' && *whole && w.failed.is_none() {
                    w.on_error(&ErrorFields::parse(
                        &server.buf[pos..pos + header.total_len],
                    ));
                }
            }
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
                        if header.tag == b'E' && ErrorFields::parse(msg).is_stale_plan() {
                            // Dropped at the release point (state.rs).
                            self.state.stale_plans = true;
                            tracing::debug!(
                                window = ?window.as_ref().map(|w| (w.replan, w.on_replica)),
                                replanned = self.replanned,
                                "server reported a stale cached plan"
                            );
                        }
                        let verdict = self.replies.on_server(header.tag);
                        if let Some(name) = self.replies.described.take() {
                            if let Some(types) = protocol::row_types(msg) {
                                // What the client knows, and what the
                                // server's copy returns.
                                let id = self.statements.get(&name).map(|s| s.id);
                                if let Some(held) = id.and_then(|id| server.prepared.get_mut(&id)) {
                                    held.shape = Some(types.clone());
                                }
                                self.statements.set_shape(&name, types);
                            }
                        }
                        match verdict {
                            Verdict::Forward => {}
                            Verdict::Swallow => {
                                emit(client, &mut window, &mut carry, &server.buf[written..pos])
                                    .await?;
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
                            server.sql_prepared.clear();
                            self.statements.clear();
                            self.sql_prepared.clear();
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
                    // Stats count what the client sees (not replies swallowed above).
                    let shown = written != end;
                    if shown && matches!(event, ServerEvent::Ready(_)) {
                        let (query, xact) = self.relay.answered();
                        let received = std::mem::take(&mut self.received);
                        self.pools[self.node].stats().ready(query, xact, received);
                    } else if shown && header.tag == b'E' {
                        self.shared
                            .stats
                            .errors
                            .count_message(&server.buf[pos..end]);
                    }
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
                            emit(client, &mut window, &mut carry, &server.buf[written..pos])
                                .await?;
                            self.out.clear();
                            protocol::error_response(
                                &mut self.out,
                                Severity::Error,
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "transaction blocks are not allowed with pool_mode = statement; \
                                 the transaction was rolled back",
                            );
                            protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                            emit(client, &mut window, &mut carry, &self.out).await?;
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
                        self.out.clear();
                        self.replies.take_ready(&mut self.out);
                        if !self.out.is_empty() {
                            emit(client, &mut window, &mut carry, &server.buf[written..pos])
                                .await?;
                            emit(client, &mut window, &mut carry, &self.out).await?;
                            written = pos;
                        }
                    }
                    if header.tag == b'Z' && window.as_ref().is_some_and(|w| w.failed.is_none()) {
                        // The read finished without showing a row: done.
                        close_window(
                            client,
                            &mut window,
                            &mut carry,
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
        emit(client, &mut window, &mut carry, &server.buf[written..pos]).await?;
        flush_carry(client, &mut carry).await?;
        server.buf.advance(pos);
        if window
            .as_ref()
            .is_some_and(|w| w.flush_end && w.failed.is_none())
            && self.replies.is_empty()
            && self.sscan.at_boundary()
        {
            // A request ending with Flush was answered in full without
            // failing: no ReadyForQuery will come to close the window.
            if let Some(w) = window.take() {
                client.write_all(&w.held).await?;
            }
        }
        self.window = window;
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

    /// Closes the attached server without returning it to its pool.
    async fn drop_server(&mut self) {
        self.client.cancel.detach().await;
        self.server = None;
        self.on_node = None;
        self.client.idle();
    }

    /// The server connection broke: tell the client and end the session.
    async fn server_lost(&mut self, client: &mut ClientStream) -> std::io::Result<Step> {
        if self.window.as_ref().is_some_and(|w| w.on_replica) {
            // A replica went away before the client saw a row.
            self.drop_server().await;
            self.resend(Some(false));
            return Ok(Step::Continue);
        }
        let label = self.pool().label().to_owned();
        self.client.cancel.detach().await;
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
        let g = &self.config.general;
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

    async fn on_timer(&mut self, client: &mut ClientStream) -> std::io::Result<Option<Step>> {
        let now = Instant::now();
        let g = &self.config.general;
        let (query_timeout, idle_tx_timeout) = (g.query_timeout, g.idle_transaction_timeout);
        if let (Some(qt), Some(since)) = (query_timeout, self.relay.request_since) {
            match self.query_cancelled {
                Some(at) if at >= since && now >= at + QUERY_CANCEL_GRACE => {
                    let msg = format!(
                        "query_timeout ({}) exceeded and the server did not answer the cancel",
                        humantime::format_duration(qt)
                    );
                    if let Some(server) = self.server.take() {
                        self.client.cancel.detach().await;
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
                            pool = self.pool().label(),
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
        self.client.cancel.detach().await;
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
            tracing::debug!(
                pool = self.pool().label(),
                "closing server left mid-request"
            );
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
        if self.mode == PoolMode::Session || self.state.server_needs_discard() {
            match server
                .run_internal("DISCARD ALL", INTERNAL_QUERY_TIMEOUT)
                .await
            {
                Ok(QueryOutcome::Done(TxStatus::Idle)) => {
                    for name in std::mem::take(&mut server.set_by_pooler) {
                        server.params.remove(&name);
                    }
                    server.prepared.clear();
                    server.sql_prepared.clear();
                }
                _ => return,
            }
        }
        server.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_clients_buffer_goes_to_the_next_request() {
        let spares = || SPARE_BUFFERS.with(|cell| cell.borrow().len());
        let before = spares();
        // A request read and consumed: the buffer is empty with its room
        // behind the consumed bytes.
        let mut buf = BytesMut::new();
        ready_buffer(&mut buf, CLIENT_FIRST_READ);
        buf.extend_from_slice(&[b'Q'; 60]);
        buf.advance(60);
        let at = buf.as_ptr();
        shed_buffer(&mut buf);
        assert_eq!(buf.capacity(), 0, "the idle client keeps nothing");
        assert_eq!(spares(), before + 1);
        let mut next = BytesMut::new();
        ready_buffer(&mut next, CLIENT_FIRST_READ);
        assert_eq!(spares(), before);
        assert!(next.is_empty() && next.capacity() >= CLIENT_FIRST_READ);
        // The same allocation, its room taken back, not a new one.
        assert_eq!(next.as_ptr(), at.wrapping_sub(60));
        // A buffer grown past the cap is freed, not kept.
        let mut big = BytesMut::with_capacity(SPARE_BUFFER_MAX_CAPACITY + 1);
        shed_buffer(&mut big);
        assert_eq!((big.capacity(), spares()), (0, before));
    }
}
