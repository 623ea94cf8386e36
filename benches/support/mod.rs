//! Shared pieces of the benches that need a server socket: a *scripted
//! PostgreSQL peer* and a raw protocol client.
//!
//! The scripted peer is not PostgreSQL and does not pretend to be one for
//! anything but the relay's and the pool's sake: it accepts any startup with
//! AuthenticationOk, then answers every request from a fixed script with
//! responses built once (a pgbench-like one-row result, or a large result for
//! statements naming `big_result`). It runs no SQL, so a bench against it
//! measures pgsluice's own cost per request (relay, pool, framing, syscalls)
//! rather than PostgreSQL's. End-to-end numbers against real PostgreSQL come
//! from `bench/run.sh`.
//!
//! The raw client speaks just enough of the protocol to log in with trust
//! authentication and to send requests and read their answers up to
//! ReadyForQuery, counting messages and bytes. Benches compare the same
//! client straight to the peer ("direct") and through pgsluice: the
//! difference is what pgsluice adds.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use pgsluice::protocol::{
    self, PG_MAX_MESSAGE_LEN, PROTOCOL_3_0, StartupPacket, TxStatus, peek_header, read_startup,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The ParameterStatus set a PostgreSQL 15 server reports at login.
pub const PG15_PARAMS: &[(&str, &str)] = &[
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("default_transaction_read_only", "off"),
    ("in_hot_standby", "off"),
    ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"),
    ("is_superuser", "off"),
    ("server_encoding", "UTF8"),
    ("server_version", "15.18"),
    ("session_authorization", "bench"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "Etc/UTC"),
];

/// The criterion settings of the benches that run a server: short runs,
/// since each iteration is a network round trip or more.
pub fn criterion_config() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
}

/// Rows in the answer to a statement naming `big_result`.
pub const BIG_RESULT_ROWS: usize = 10_000;

/// The statement `pgbench -S` sends, and what the scripted peer answers with
/// one row.
pub const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;";
/// Answered with [`BIG_RESULT_ROWS`] rows.
pub const BIG_SELECT: &str = "SELECT id, name, created_at, balance FROM big_result;";

pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32, i16)]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (i, (name, type_oid, size)) in columns.iter().enumerate() {
            cstr(b, name);
            b.put_u32(16_400); // table oid
            b.put_i16(i as i16 + 1);
            b.put_u32(*type_oid);
            b.put_i16(*size);
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

pub fn data_row(buf: &mut BytesMut, values: &[&[u8]]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_i32(v.len() as i32);
            b.put_slice(v);
        }
    });
}

/// One scripted result: its RowDescription, and its rows plus CommandComplete.
struct Result {
    description: Bytes,
    rows_and_complete: Bytes,
}

fn point_result() -> Result {
    let mut d = BytesMut::new();
    row_description(&mut d, &[("abalance", 23, 4)]);
    let mut r = BytesMut::new();
    data_row(&mut r, &[b"-2817"]);
    protocol::command_complete(&mut r, "SELECT 1");
    Result {
        description: d.freeze(),
        rows_and_complete: r.freeze(),
    }
}

fn big_result() -> Result {
    let mut d = BytesMut::new();
    row_description(
        &mut d,
        &[
            ("id", 23, 4),
            ("name", 25, -1),
            ("created_at", 1184, 8),
            ("balance", 1700, -1),
        ],
    );
    let mut r = BytesMut::new();
    for i in 0..BIG_RESULT_ROWS {
        let id = i.to_string();
        data_row(
            &mut r,
            &[
                id.as_bytes(),
                b"customer name of middling length",
                b"2026-11-26 23:28:04.123456+00",
                b"12345.67",
            ],
        );
    }
    protocol::command_complete(&mut r, &format!("SELECT {BIG_RESULT_ROWS}"));
    Result {
        description: d.freeze(),
        rows_and_complete: r.freeze(),
    }
}

struct Script {
    point: Result,
    big: Result,
    login: Bytes,
}

impl Script {
    fn new() -> Self {
        let mut login = BytesMut::new();
        protocol::authentication_ok(&mut login);
        for (k, v) in PG15_PARAMS {
            protocol::parameter_status(&mut login, k, v);
        }
        protocol::backend_key_data(&mut login, 4242, 171_717);
        protocol::ready_for_query(&mut login, TxStatus::Idle);
        Self {
            point: point_result(),
            big: big_result(),
            login: login.freeze(),
        }
    }

    /// The result a SELECT gets; `None` for anything else (a command).
    fn result_for(&self, sql: &[u8]) -> Option<&Result> {
        let text = String::from_utf8_lossy(sql);
        let upper = text.trim_start().to_ascii_uppercase();
        if upper.contains("BIG_RESULT") {
            Some(&self.big)
        } else if upper.starts_with("SELECT") {
            Some(&self.point)
        } else {
            None
        }
    }
}

/// The CommandComplete tag of a non-SELECT statement (what pgsluice itself
/// may send: SET, RESET, DISCARD ALL, ROLLBACK …).
fn command_tag(sql: &[u8]) -> String {
    let text = String::from_utf8_lossy(sql);
    let upper = text.trim().trim_end_matches(';').to_ascii_uppercase();
    if upper.starts_with("DISCARD ALL") || upper.starts_with("DEALLOCATE ALL") {
        return upper
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
    }
    upper
        .split_whitespace()
        .next()
        .unwrap_or("EMPTY")
        .to_owned()
}

/// The scripted PostgreSQL peer, listening on 127.0.0.1.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedServer {
    /// Must be called inside a tokio runtime.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Script::new());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let script = script.clone();
                tokio::spawn(async move {
                    // A connection that breaks the script is just closed.
                    let _ = serve(stream, &script).await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, script: &Script) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        match read_startup(&mut buf).map_err(io::Error::other)? {
            Some(StartupPacket::Startup { .. }) => break,
            Some(StartupPacket::Ssl | StartupPacket::GssEnc) => stream.write_all(b"N").await?,
            Some(StartupPacket::Cancel { .. }) => return Ok(()),
            None => {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
        }
    }
    stream.write_all(&script.login).await?;

    // Statement texts by name, and the statement bound to each portal.
    let mut statements: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut portals: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        while let Some(h) = peek_header(&buf, PG_MAX_MESSAGE_LEN).map_err(io::Error::other)? {
            if buf.len() < h.total_len {
                break;
            }
            let msg = buf.split_to(h.total_len);
            let body = &msg[5..];
            match h.tag {
                b'Q' => {
                    let sql = protocol::query_text(&msg);
                    match script.result_for(sql) {
                        Some(r) => {
                            out.extend_from_slice(&r.description);
                            out.extend_from_slice(&r.rows_and_complete);
                        }
                        None => protocol::command_complete(&mut out, &command_tag(sql)),
                    }
                    protocol::ready_for_query(&mut out, TxStatus::Idle);
                }
                b'P' => {
                    let mut parts = body.splitn(3, |&b| b == 0);
                    let name = parts.next().unwrap_or_default().to_vec();
                    let sql = parts.next().unwrap_or_default().to_vec();
                    statements.insert(name, sql);
                    message(&mut out, b'1', |_| {});
                }
                b'B' => {
                    let mut parts = body.splitn(3, |&b| b == 0);
                    let portal = parts.next().unwrap_or_default().to_vec();
                    let stmt = parts.next().unwrap_or_default();
                    let sql = statements.get(stmt).cloned().unwrap_or_default();
                    portals.insert(portal, sql);
                    message(&mut out, b'2', |_| {});
                }
                b'D' => {
                    let kind = body.first().copied().unwrap_or(b'P');
                    let name = body
                        .get(1..body.len().saturating_sub(1))
                        .unwrap_or_default();
                    let sql = if kind == b'S' {
                        message(&mut out, b't', |b| b.put_i16(0));
                        statements.get(name)
                    } else {
                        portals.get(name)
                    };
                    match sql.and_then(|s| script.result_for(s)) {
                        Some(r) => out.extend_from_slice(&r.description),
                        None => message(&mut out, b'n', |_| {}),
                    }
                }
                b'E' => {
                    let name = body.split(|&b| b == 0).next().unwrap_or_default();
                    let sql = portals.get(name).map(Vec::as_slice).unwrap_or_default();
                    match script.result_for(sql) {
                        Some(r) => out.extend_from_slice(&r.rows_and_complete),
                        None => protocol::command_complete(&mut out, &command_tag(sql)),
                    }
                }
                b'C' => message(&mut out, b'3', |_| {}),
                b'S' => protocol::ready_for_query(&mut out, TxStatus::Idle),
                b'H' => {}
                b'X' => return Ok(()),
                other => {
                    return Err(io::Error::other(format!(
                        "scripted peer: unexpected message {:?}",
                        other as char
                    )));
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// What one request got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub messages: u64,
    pub bytes: u64,
}

/// A client speaking the protocol by hand (trust authentication only).
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, user: &str, database: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let mut startup = BytesMut::new();
        startup.put_i32(0);
        startup.put_i32(PROTOCOL_3_0);
        for (k, v) in [("user", user), ("database", database)] {
            cstr(&mut startup, k);
            cstr(&mut startup, v);
        }
        startup.put_u8(0);
        let len = startup.len() as i32;
        startup[..4].copy_from_slice(&len.to_be_bytes());
        client.stream.write_all(&startup).await?;
        client.read_until_ready().await?;
        Ok(client)
    }

    /// Sends `request` and reads everything up to and including
    /// ReadyForQuery. An ErrorResponse fails the request.
    pub async fn round_trip(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.stream.write_all(request).await?;
        self.read_until_ready().await
    }

    async fn read_until_ready(&mut self) -> io::Result<Answer> {
        let mut answer = Answer {
            messages: 0,
            bytes: 0,
        };
        loop {
            while let Some(h) =
                peek_header(&self.buf, PG_MAX_MESSAGE_LEN).map_err(io::Error::other)?
            {
                if self.buf.len() < h.total_len {
                    break;
                }
                let msg = self.buf.split_to(h.total_len);
                answer.messages += 1;
                answer.bytes += h.total_len as u64;
                match h.tag {
                    b'E' => {
                        let fields = protocol::ErrorFields::parse(&msg);
                        return Err(io::Error::other(format!("server error: {fields:?}")));
                    }
                    b'Z' => {
                        if !self.buf.is_empty() {
                            return Err(io::Error::other("bytes after ReadyForQuery"));
                        }
                        return Ok(answer);
                    }
                    _ => {}
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// A simple-protocol Query message.
pub fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    message(&mut b, b'Q', |b| cstr(b, sql));
    b
}

/// What libpq sends for `pgbench -M extended`: Parse (unnamed, one text
/// parameter), Bind, Describe portal, Execute, Sync.
pub fn extended(sql: &str, param: &str) -> BytesMut {
    let mut b = BytesMut::new();
    message(&mut b, b'P', |b| {
        cstr(b, "");
        cstr(b, sql);
        b.put_i16(0);
    });
    message(&mut b, b'B', |b| {
        cstr(b, "");
        cstr(b, "");
        b.put_i16(0);
        b.put_i16(1);
        b.put_i32(param.len() as i32);
        b.put_slice(param.as_bytes());
        b.put_i16(0);
    });
    message(&mut b, b'D', |b| {
        b.put_u8(b'P');
        cstr(b, "");
    });
    message(&mut b, b'E', |b| {
        cstr(b, "");
        b.put_i32(0);
    });
    message(&mut b, b'S', |_| {});
    b
}
