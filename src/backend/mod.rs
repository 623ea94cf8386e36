//! One server connection: connect, log in (trust, cleartext, md5,
//! SCRAM-SHA-256), remember what the server reported, run the pooler's own
//! housekeeping queries, and send cancel requests.
//!
//! A `ServerConn` knows nothing about clients. Its read buffer lives with it,
//! so a pooled connection's buffer is reused by every client it serves.

pub mod auth_query;
mod login;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{self, ErrorFields, TxStatus};
use crate::tls::ServerStream;

pub use login::{Credentials, LoginSpec};

/// Initial capacity of a server connection's read buffer.
const SERVER_BUF: usize = 16 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to server {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("server {addr} did not finish login within server_connect_timeout ({after:?})")]
    Timeout { addr: String, after: Duration },
    #[error("server {addr} refused login: {} (SQLSTATE {})", .fields.message, .fields.code)]
    Rejected { addr: String, fields: ErrorFields },
    #[error("server {addr} asked for unsupported authentication: {method}")]
    UnsupportedAuth { addr: String, method: String },
    #[error(
        "server {addr} asked for a password but none is configured for user {user} that answers its method (a SCRAM secret is passed through only once a client has logged in with it; or set users.{user}.server_password)"
    )]
    NoPassword { addr: String, user: String },
    #[error("server {addr}: SCRAM pass-through for user {user} failed: {reason}")]
    PassThrough {
        addr: String,
        user: String,
        reason: String,
    },
    #[error("server {addr} broke the protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("server {addr}: TLS: {reason}")]
    Tls { addr: String, reason: String },
    #[error("server connection lost: {0}")]
    Io(String),
}

impl BackendError {
    /// The SQLSTATE a client is told when this error keeps it from a server.
    pub fn sqlstate(&self) -> &str {
        match self {
            Self::Rejected { fields, .. } if !fields.code.is_empty() => &fields.code,
            Self::UnsupportedAuth { .. } | Self::NoPassword { .. } | Self::PassThrough { .. } => {
                protocol::sqlstate::INVALID_AUTHORIZATION
            }
            Self::Protocol { .. } => protocol::sqlstate::PROTOCOL_VIOLATION,
            _ => protocol::sqlstate::CONNECTION_FAILURE,
        }
    }
}

impl From<io::Error> for BackendError {
    fn from(e: io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// The server's half of a cancel key, and where to send the cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

/// Session parameters as the server has them: what it reported with
/// ParameterStatus, plus unreported ones pgsluice set itself.
#[derive(Debug, Clone, Default)]
pub struct ServerParams {
    list: Vec<(String, String)>,
    /// Changes with every `set`/`remove`, unique across the process: two
    /// equal generations mean equal contents (see `ServerConn::params_verified`).
    generation: u64,
}

impl PartialEq for ServerParams {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Eq for ServerParams {}

/// (name, value) pairs as a client expects them, shared between a client and
/// the servers found to match it.
pub type ParamList = std::sync::Arc<Vec<(String, String)>>;

/// Source of [`ServerParams`] generations.
fn next_params_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ServerParams {
    /// Identifies the current contents (see [`next_params_generation`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.generation = next_params_generation();
        match self
            .list
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some((_, v)) => {
                if v != value {
                    value.clone_into(v);
                }
            }
            None => self.list.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.generation = next_params_generation();
        self.list.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.list.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

pub struct ServerConn {
    /// Plain TCP or TLS (`tls.server_mode`); the relay reads it with
    /// `read_buf` either way.
    pub stream: ServerStream,
    /// Bytes read from the server and not yet relayed.
    pub buf: BytesMut,
    pub params: ServerParams,
    /// Names of unreported parameters pgsluice has set with `set_config`
    /// (they must be reset when the next client does not want them).
    pub set_by_pooler: Vec<String>,
    pub cancel_key: CancelKey,
    pub id: u64,
    /// This end of the TCP connection (admin console `SHOW SERVERS`).
    pub local_addr: Option<SocketAddr>,
    pub created: Instant,
    pub last_used: Instant,
    /// When this connection is retired (server_lifetime, jittered).
    pub retire_at: Option<Instant>,
    /// pgsluice-named prepared statements this server holds, by statement
    /// id.
    pub prepared: std::collections::HashMap<u64, ServerStatement>,
    /// Use counter for `prepared`.
    pub prepared_tick: u64,
    /// Whose unnamed statement this server holds: (client process id,
    /// that client's parse generation). `None` when unknown or destroyed.
    pub unnamed_owner: Option<(i32, u64)>,
    /// SQL-level prepared statements (`PREPARE name AS …`) this server holds,
    /// by name, with the PREPARE text that created them (empty: unknown).
    pub sql_prepared: std::collections::HashMap<String, std::sync::Arc<str>>,
    /// The client parameters this server was last found to match, and the
    /// generation of `params` then (`ClientParams::sync_sql_for`).
    pub params_verified: Option<(ParamList, u64)>,
}

/// A pgsluice-named prepared statement a server holds.
#[derive(Debug)]
pub struct ServerStatement {
    pub stmt: std::sync::Arc<crate::frontend::Statement>,
    /// `prepared_tick` at its last use (for LRU eviction).
    pub tick: u64,
    /// The column type OIDs it returns here, when a Describe told.
    pub shape: Option<Vec<u32>>,
}

impl ServerStatement {
    pub fn new(stmt: std::sync::Arc<crate::frontend::Statement>, tick: u64) -> Self {
        Self {
            stmt,
            tick,
            shape: None,
        }
    }
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("pid", &self.cancel_key.process_id)
            .field("addr", &self.cancel_key.addr)
            .finish()
    }
}

/// Outcome of a housekeeping query.
#[derive(Debug)]
pub enum QueryOutcome {
    Done(TxStatus),
    Failed {
        error: ErrorFields,
        status: TxStatus,
    },
}

impl ServerConn {
    pub async fn connect(spec: &LoginSpec, id: u64) -> Result<Self, BackendError> {
        login::connect(spec, id).await
    }

    /// Says goodbye (Terminate) without waiting, then closes.
    pub fn terminate(mut self) {
        self.stream.try_send_and_close(&[b'X', 0, 0, 0, 4]);
    }

    pub fn process_id(&self) -> i32 {
        self.cancel_key.process_id
    }

    /// Forgets tokio's cached "readable" flag left by the relay's last
    /// successful read, without a syscall, so that [`Self::is_clean_idle`]
    /// costs nothing unless the server really sent something (or closed)
    /// after this point. Call when the connection goes idle with an empty
    /// buffer. If bytes raced in just before this call, the connection is
    /// merely found broken on its next use, as if it had died a moment after
    /// checkout.
    pub fn forget_read_readiness(&self) {
        // TLS: the idle check polls the stream itself; nothing cached here.
        if let ServerStream::Plain(s) = &self.stream {
            let _ = s.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }

    /// True when the idle connection is still usable: nothing arrived
    /// unasked (an error or EOF from a terminated backend) and no bytes of
    /// an earlier exchange are left over.
    pub fn is_clean_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream.is_quiet()
    }

    /// Sends a simple query of the pooler's own and consumes the whole answer
    /// up to ReadyForQuery; nothing reaches any client. ParameterStatus
    /// messages update `params`.
    pub async fn run_internal(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<QueryOutcome, BackendError> {
        tokio::time::timeout(timeout, self.run_internal_inner(sql, None))
            .await
            .map_err(|_| BackendError::Io(format!("internal query timed out after {timeout:?}")))?
    }

    /// As [`Self::run_internal`], collecting the text of every DataRow
    /// (NULL as `None`) into `rows`.
    pub async fn query_internal(
        &mut self,
        sql: &str,
        timeout: Duration,
        rows: &mut Vec<Vec<Option<String>>>,
    ) -> Result<QueryOutcome, BackendError> {
        tokio::time::timeout(timeout, self.run_internal_inner(sql, Some(rows)))
            .await
            .map_err(|_| BackendError::Io(format!("internal query timed out after {timeout:?}")))?
    }

    async fn run_internal_inner(
        &mut self,
        sql: &str,
        rows: Option<&mut Vec<Vec<Option<String>>>>,
    ) -> Result<QueryOutcome, BackendError> {
        // A simple Query destroys the unnamed prepared statement.
        self.unnamed_owner = None;
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        out.put_u8(b'Q');
        out.put_i32((sql.len() + 5) as i32);
        out.put_slice(sql.as_bytes());
        out.put_u8(0);
        self.exchange(&out, rows, None).await
    }

    /// Sends extended-protocol messages of the pooler's own, ending with
    /// Sync, and consumes the answer up to ReadyForQuery; the column type
    /// OIDs of every RowDescription (NoData: none) go into `shapes`, in
    /// order. Nothing reaches any client.
    pub async fn describe_internal(
        &mut self,
        messages: &[u8],
        timeout: Duration,
        shapes: &mut Vec<Vec<u32>>,
    ) -> Result<QueryOutcome, BackendError> {
        tokio::time::timeout(timeout, self.exchange(messages, None, Some(shapes)))
            .await
            .map_err(|_| BackendError::Io(format!("internal query timed out after {timeout:?}")))?
    }

    async fn exchange(
        &mut self,
        out: &[u8],
        mut rows: Option<&mut Vec<Vec<Option<String>>>>,
        mut shapes: Option<&mut Vec<Vec<u32>>>,
    ) -> Result<QueryOutcome, BackendError> {
        self.stream.write_all(out).await?;
        let mut error = None;
        loop {
            let Some(header) = protocol::peek_header(&self.buf, protocol::PG_MAX_MESSAGE_LEN)
                .map_err(|e| BackendError::Io(e.to_string()))?
                .filter(|h| self.buf.len() >= h.total_len)
            else {
                self.buf.reserve(SERVER_BUF);
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    return Err(BackendError::Io("server closed the connection".into()));
                }
                continue;
            };
            let msg = self.buf.split_to(header.total_len);
            match header.tag {
                b'E' => {
                    let fields = ErrorFields::parse(&msg);
                    if fields.is_fatal() {
                        return Err(BackendError::Io(format!(
                            "server error: {}",
                            fields.message
                        )));
                    }
                    error = Some(fields);
                }
                b'S' => {
                    if let Some((k, v)) = protocol::parse_parameter_status(&msg) {
                        self.params.set(k, v);
                    }
                }
                b'D' => {
                    if let Some(rows) = rows.as_deref_mut() {
                        let row = parse_data_row(&msg)
                            .ok_or_else(|| BackendError::Io("malformed DataRow".into()))?;
                        rows.push(row);
                    }
                }
                b'T' | b'n' => {
                    if let Some(shapes) = shapes.as_deref_mut() {
                        let types = protocol::row_types(&msg)
                            .ok_or_else(|| BackendError::Io("malformed RowDescription".into()))?;
                        shapes.push(types);
                    }
                }
                b'G' | b'H' | b'W' => {
                    return Err(BackendError::Io("unexpected COPY in internal query".into()));
                }
                b'Z' => {
                    let status = protocol::parse_ready_for_query(&msg)
                        .ok_or_else(|| BackendError::Io("bad ReadyForQuery".into()))?;
                    return Ok(match error {
                        None => QueryOutcome::Done(status),
                        Some(error) => QueryOutcome::Failed { error, status },
                    });
                }
                _ => {}
            }
        }
    }
}

/// The columns of a DataRow as text (NULL as `None`); `None` if malformed.
fn parse_data_row(msg: &[u8]) -> Option<Vec<Option<String>>> {
    let body = protocol::body(msg);
    let count = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut rest = body.get(2..)?;
    let mut row = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        let value = rest.get(..len)?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len..];
    }
    Some(row)
}

/// Sends a CancelRequest for `key` over a new connection and waits until the
/// server has taken it (it closes the connection after signalling).
pub async fn send_cancel(key: CancelKey, timeout: Duration) -> io::Result<()> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(key.addr).await?;
        let mut pkt = BytesMut::with_capacity(16);
        postgres_protocol::message::frontend::cancel_request(
            key.process_id,
            key.secret_key,
            &mut pkt,
        );
        s.write_all(&pkt).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "cancel request timed out"))?
}
