//! A client of a sharded database: which shard each request goes to.
//!
//! Before the node choice of `route.rs`, every request is placed
//! (`router::shard`): on one shard (its key, a hint, or the client's
//! `SET pgsluice.shard[_key]`), on any shard, or on all of them (a key-less
//! read, merged by `frontend/fanout`; a write to an unsharded table; a
//! multi-row INSERT split per shard), or refused with a SQLSTATE naming the
//! reason. Switching shards means switching the session's pools and
//! replication group, so within a shard replica choice, lag checks,
//! read-your-writes and retries work exactly as for an unsharded database.
//!
//! Transactions: a lone `BEGIN` is answered by pgsluice and held back until
//! the first statement that needs a server; the transaction then opens on
//! that statement's shard and stays there. A later statement of the
//! transaction for another shard (or one that would fan out) fails with
//! 0A000 naming both shards, and the transaction is aborted as PostgreSQL
//! aborts one after any error (the client rolls back).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::task::JoinSet;

use super::route::{ClientRoute, Request};
use super::{INTERNAL_QUERY_TIMEOUT, Session, Step};
use crate::backend::QueryOutcome;
use crate::cluster::ShardedDatabase;
use crate::config::PoolMode;
use crate::frontend::fanout::{self, FanoutError, ShardAnswer};
use crate::frontend::statements;
use crate::pool::{NodePools, Pooled};
use crate::protocol::{self, Severity, TxStatus, sqlstate};
use crate::router::shard::{BoundParams, MergePlan, Placement};
use crate::router::{Access, TxControl};
use crate::tls::ClientStream;

const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// A request must end (Query or Sync) within this many bytes to be placed.
const SHARD_DECIDE_LIMIT: usize = 64 * 1024 * 1024;
const TOO_BIG: &str =
    "pgsluice cannot place a request of more than 64 MiB without a Sync on a shard";

/// `SET pgsluice.shard_key` / `SET pgsluice.shard`: the shard every
/// statement goes to, and how the client named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pin {
    pub shard: usize,
    /// `shard_key=42` or `shard=2`.
    pub what: String,
}

/// One client's sharding state.
pub(crate) struct ShardRoute {
    pub db: Arc<ShardedDatabase>,
    /// This user's pools on every shard.
    pools: Vec<NodePools>,
    /// The shard whose pools and replication group the session uses now.
    pub current: usize,
    /// `SET pgsluice.shard[_key]` for the session.
    session_pin: Option<Pin>,
    /// `SET LOCAL pgsluice.shard[_key]`: for the open transaction.
    local_pin: Option<Pin>,
    /// A `BEGIN` pgsluice answered and has not sent anywhere yet.
    deferred: Option<Deferred>,
    /// The deferred `BEGIN`, to run on the server about to be attached.
    begin_on_attach: Option<String>,
}

struct Deferred {
    begin: String,
    /// A statement failed in it: only its end is accepted.
    aborted: bool,
}

impl ShardRoute {
    /// No transaction-scoped pin and no `BEGIN` held back: between
    /// transactions (a parked session keeps the rest; see `parked.rs`).
    pub(crate) fn at_rest(&self) -> bool {
        self.local_pin.is_none() && self.deferred.is_none() && self.begin_on_attach.is_none()
    }

    pub(crate) fn new(db: Arc<ShardedDatabase>, pools: Vec<NodePools>) -> Box<Self> {
        Box::new(Self {
            db,
            pools,
            current: 0,
            session_pin: None,
            local_pin: None,
            deferred: None,
            begin_on_attach: None,
        })
    }

    fn pin(&self) -> Option<&Pin> {
        self.local_pin.as_ref().or(self.session_pin.as_ref())
    }
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    Any,
    Shard(usize, String),
    FanOut {
        plan: MergePlan,
        sql: Option<String>,
    },
    AllWrite,
    Split(Vec<(usize, String)>),
    Refuse(&'static str, String),
}

/// pgsluice's own sharding commands (a lone simple Query).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    /// `SET [SESSION | LOCAL] pgsluice.shard[_key] …`; `None` = RESET / DEFAULT.
    Set {
        local: bool,
        pin: Option<Pin>,
    },
    Show {
        key: bool,
    },
    Invalid(String),
}

/// What the relay does with a request while a server is attached.
pub(super) enum Relay {
    /// Forward it (it belongs on the attached shard).
    Go,
    /// Hold it back (see `Held`).
    Hold(super::Held),
    /// pgsluice answered it.
    Answered,
    /// The rest of the request must arrive before it can be placed.
    NeedMore,
    Exit(Step),
}

/// One client message of a request.
struct Msg<'a> {
    tag: u8,
    bytes: &'a [u8],
}

fn messages(buf: &[u8]) -> Vec<Msg<'_>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(Some(h)) = protocol::peek_header(&buf[pos..], protocol::PG_MAX_MESSAGE_LEN) {
        if buf.len() - pos < h.total_len {
            break;
        }
        out.push(Msg {
            tag: h.tag,
            bytes: &buf[pos..pos + h.total_len],
        });
        pos += h.total_len;
    }
    out
}

/// Length of the whole request at the start of `buf` (through its Query
/// or Sync), if it has arrived.
fn whole_request(buf: &[u8], max: usize) -> Option<usize> {
    let mut pos = 0;
    loop {
        let h = protocol::peek_header(&buf[pos..], max).ok()??;
        if buf.len() - pos < h.total_len {
            return None;
        }
        pos += h.total_len;
        if matches!(h.tag, b'Q' | b'S' | b'F') {
            return Some(pos);
        }
    }
}

/// Parameter format codes and values (`None` = NULL) of a Bind.
type BindValues<'a> = (Vec<i16>, Vec<Option<&'a [u8]>>);

/// Formats and values of a Bind after its statement name.
fn bind_params(rest: &[u8]) -> Option<BindValues<'_>> {
    let word = |p: usize| -> Option<i16> {
        Some(i16::from_be_bytes(rest.get(p..p + 2)?.try_into().ok()?))
    };
    let nformats = usize::try_from(word(0)?).ok()?;
    let mut pos = 2;
    let mut formats = Vec::with_capacity(nformats);
    for _ in 0..nformats {
        formats.push(word(pos)?);
        pos += 2;
    }
    let nvalues = usize::try_from(word(pos)?).ok()?;
    pos += 2;
    let mut values = Vec::with_capacity(nvalues);
    for _ in 0..nvalues {
        let len = i32::from_be_bytes(rest.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len < 0 {
            values.push(None);
        } else {
            let len = len as usize;
            values.push(Some(rest.get(pos..pos + len)?));
            pos += len;
        }
    }
    Some((formats, values))
}

/// Parameter type OIDs of a Parse body tail (query, NUL, count, OIDs).
fn param_types(tail: &[u8]) -> Vec<u32> {
    let Some(nul) = tail.iter().position(|&b| b == 0) else {
        return Vec::new();
    };
    let t = &tail[nul + 1..];
    let Some(n) = t.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return Vec::new();
    };
    (0..usize::try_from(n).unwrap_or(0))
        .map_while(|i| {
            t.get(2 + 4 * i..6 + 4 * i)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect()
}

/// The first word of `text` (lower case) and whether `text` holds one
/// statement only.
fn lone_statement(text: &str) -> Option<String> {
    let t = text.trim().trim_end_matches(';').trim();
    if t.contains(';') {
        return None;
    }
    let first = t.split_whitespace().next()?;
    Some(first.to_ascii_lowercase())
}

/// Parses `SET/RESET/SHOW pgsluice.shard[_key]`; `None` when the text is
/// something else.
fn parse_command(text: &str, db: &ShardedDatabase) -> Option<Command> {
    let t = text.trim().trim_end_matches(';').trim();
    if !t
        .get(..t.len().min(64))
        .is_some_and(|h| h.to_ascii_lowercase().contains("pgsluice.shard"))
    {
        return None;
    }
    let (verb, rest) = t.split_once(char::is_whitespace)?;
    let verb = verb.to_ascii_lowercase();
    let mut rest = rest.trim_start();
    let mut local = false;
    if verb == "set" {
        if let Some((w, r)) = rest.split_once(char::is_whitespace) {
            match w.to_ascii_lowercase().as_str() {
                "local" => (local, rest) = (true, r.trim_start()),
                "session" => rest = r.trim_start(),
                _ => {}
            }
        }
    }
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let name = rest[..end].to_ascii_lowercase();
    let key = match name.as_str() {
        "pgsluice.shard_key" => true,
        "pgsluice.shard" => false,
        _ => return None,
    };
    let value = rest[end..].trim_start();
    match verb.as_str() {
        "show" if value.is_empty() => Some(Command::Show { key }),
        "reset" if value.is_empty() => Some(Command::Set { local, pin: None }),
        "set" => {
            let value = if let Some(v) = value.strip_prefix('=') {
                v.trim()
            } else if value.len() > 2 && value[..2].eq_ignore_ascii_case("to") {
                value[2..].trim()
            } else {
                return Some(Command::Invalid(format!("syntax error in \"{t}\"")));
            };
            if value.eq_ignore_ascii_case("default") {
                return Some(Command::Set { local, pin: None });
            }
            let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                Some(inner) => inner.replace("''", "'"),
                None => value.to_owned(),
            };
            Some(match pin_for(db, key, &value) {
                Ok(pin) => Command::Set {
                    local,
                    pin: Some(pin),
                },
                Err(e) => Command::Invalid(e),
            })
        }
        _ => Some(Command::Invalid(format!(
            "pgsluice does not understand \"{t}\" (use SET, RESET or SHOW pgsluice.shard_key / pgsluice.shard)"
        ))),
    }
}

fn pin_for(db: &ShardedDatabase, key: bool, value: &str) -> Result<Pin, String> {
    let shards = db.shards.len();
    if key {
        let v = db
            .rules
            .key_type
            .parse_text_coded(value)
            .map_err(|e| format!("invalid value for pgsluice.shard_key: {}", e.message))?;
        Ok(Pin {
            shard: crate::router::shard::shard_of(db.rules.key_type, &v, shards),
            what: format!("shard_key={value}"),
        })
    } else {
        match value.parse::<usize>() {
            Ok(s) if s < shards => Ok(Pin {
                shard: s,
                what: format!("shard={s}"),
            }),
            _ => Err(format!(
                "invalid value for pgsluice.shard: \"{value}\" (database \"{}\" has shards 0 to {})",
                db.database,
                shards - 1
            )),
        }
    }
}

/// A simple Query raising `code`/`message` on the server, so that a
/// refusal inside a transaction aborts it there as any error would.
fn raise_query(code: &str, message: &str) -> BytesMut {
    let clean = message
        .replace('\\', "/")
        .replace('\'', "''")
        .replace("$pgsluice$", "$ pgsluice $");
    let sql = format!(
        "DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{clean}'; END$pgsluice$"
    );
    let mut b = BytesMut::with_capacity(sql.len() + 6);
    b.put_u8(b'Q');
    b.put_i32((sql.len() + 5) as i32);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    b
}

/// Simple Query message.
fn query_message(sql: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(sql.len() + 6);
    b.put_u8(b'Q');
    b.put_i32((sql.len() + 5) as i32);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    b.freeze()
}

fn cstr_message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut b = Vec::with_capacity(len + 1);
    b.push(tag);
    b.extend_from_slice(&(len as i32).to_be_bytes());
    for p in parts {
        b.extend_from_slice(p);
    }
    b
}

/// What a fan-out (or all-shard write) request looks like to the client.
enum Shape {
    Simple,
    /// The client's extended messages, answered one by one.
    Extended {
        msgs: Vec<(u8, Bytes)>,
    },
}

/// How the shards' answers become the client's.
enum Combine {
    Merge(MergePlan),
    /// Every shard ran the same write: shard 0's answer stands for all.
    First,
    /// One INSERT per shard: rows concatenated, counts added.
    Inserts,
}

impl Session {
    fn sharding(&self) -> Option<&ShardRoute> {
        self.shard.as_deref()
    }

    /// Places the request in `buf` (one request, through its Sync/Query),
    /// then applies the client's `SET pgsluice.shard[_key]`: every
    /// statement goes to that shard, except one whose own key is elsewhere.
    fn decide(&self, buf: &[u8]) -> Decision {
        let Some(sr) = self.sharding() else {
            return Decision::Any;
        };
        match (sr.pin(), self.place_request(sr, buf)) {
            (Some(pin), Decision::Shard(s, reason)) if s != pin.shard => Decision::Refuse(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "the statement belongs on shard {s} ({reason}) but pgsluice.{} sends this \
                     client to shard {}",
                    pin.what, pin.shard
                ),
            ),
            (Some(_), d @ Decision::Shard(..)) => d,
            (Some(pin), _) => Decision::Shard(pin.shard, format!("SET pgsluice.{}", pin.what)),
            (None, d) => d,
        }
    }

    fn place_request(&self, sr: &ShardRoute, buf: &[u8]) -> Decision {
        let db = &sr.db;
        let mut parses: Vec<(&[u8], &[u8])> = Vec::new();
        let mut placed: Vec<Placement> = Vec::new();
        for m in messages(buf) {
            match m.tag {
                b'Q' => {
                    let text = String::from_utf8_lossy(protocol::query_text(m.bytes));
                    placed.push(db.place(&text, None));
                }
                b'P' => {
                    if let Some((name, tail)) = statements::parse_parse(m.bytes) {
                        parses.retain(|(n, _)| *n != name);
                        parses.push((name, tail));
                    }
                }
                b'B' => {
                    let Some((_, name, rest)) = statements::parse_bind(m.bytes) else {
                        continue;
                    };
                    let tail: Option<&[u8]> = parses
                        .iter()
                        .rev()
                        .find(|(n, _)| *n == name)
                        .map(|(_, t)| *t)
                        .or_else(|| {
                            if name.is_empty() {
                                self.unnamed.as_ref().map(|(_, t)| &t[..])
                            } else {
                                self.statements.get(name).map(|s| s.tail())
                            }
                        });
                    let Some(tail) = tail else {
                        // Unknown statement: the server reports it.
                        continue;
                    };
                    let text = String::from_utf8_lossy(super::tracked::text_of(tail));
                    let Some((formats, values)) = bind_params(rest) else {
                        placed.push(Placement::Refuse {
                            code: sqlstate::PROTOCOL_VIOLATION,
                            message: "malformed Bind message".into(),
                        });
                        continue;
                    };
                    let params = BoundParams {
                        formats,
                        values,
                        types: param_types(tail),
                    };
                    placed.push(db.place(&text, Some(&params)));
                }
                _ => {}
            }
        }
        let executed = placed.len();
        let mut decision = Decision::Any;
        for p in placed {
            let next = match p {
                Placement::Refuse { code, message } => return Decision::Refuse(code, message),
                Placement::AnyShard { .. } => continue,
                Placement::Shard { shard, reason } => Decision::Shard(shard, reason),
                Placement::AllShards {
                    plan,
                    per_shard_sql,
                    ..
                } => Decision::FanOut {
                    plan,
                    sql: per_shard_sql,
                },
                Placement::AllShardsWrite { .. } => Decision::AllWrite,
                Placement::Split { parts, .. } => Decision::Split(parts),
            };
            decision = match (decision, next) {
                (Decision::Any, next @ Decision::Shard(..)) => next,
                (Decision::Shard(a, r), Decision::Shard(b, _)) if a == b => Decision::Shard(a, r),
                (Decision::Shard(a, ra), Decision::Shard(b, rb)) => {
                    return Decision::Refuse(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "pgsluice cannot run one request on two shards: shard {a} ({ra}) and \
                             shard {b} ({rb}); send them separately"
                        ),
                    );
                }
                (_, next) if executed == 1 => next,
                _ => {
                    return Decision::Refuse(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "pgsluice runs a statement on every shard only when it is sent alone \
                         (not pipelined or batched with other statements)"
                            .into(),
                    );
                }
            };
        }
        decision
    }

    /// Moves the session onto shard `s`: its pools and replication group.
    fn switch_shard(&mut self, s: usize) {
        let Some(sr) = self.shard.as_deref_mut() else {
            return;
        };
        if sr.current == s {
            return;
        }
        let (Some(pools), Some(shard)) = (sr.pools.get(s), sr.db.shards.get(s)) else {
            return;
        };
        sr.current = s;
        self.pools = pools.clone();
        if let Some(route) = self.route.as_deref_mut() {
            route.cluster = shard.cluster.clone();
        }
    }

    /// Answers pgsluice's own sharding command with ReadyForQuery `status`.
    fn answer_command(&mut self, cmd: Command, status: TxStatus) {
        self.out.clear();
        let Some(sr) = self.shard.as_deref_mut() else {
            return;
        };
        match cmd {
            Command::Set { local: true, pin } => {
                if status != TxStatus::Idle {
                    sr.local_pin = pin;
                }
                protocol::command_complete(&mut self.out, "SET");
            }
            Command::Set { local: false, pin } => {
                sr.session_pin = pin;
                protocol::command_complete(&mut self.out, "SET");
            }
            Command::Show { key } => {
                let name = if key {
                    "pgsluice.shard_key"
                } else {
                    "pgsluice.shard"
                };
                let value = match sr.pin() {
                    Some(p) if key => p.what.strip_prefix("shard_key=").unwrap_or("").to_owned(),
                    Some(p) => p.shard.to_string(),
                    None => String::new(),
                };
                protocol::text_result(&mut self.out, &[name], &[vec![value]], "SHOW");
            }
            Command::Invalid(message) => protocol::error_response(
                &mut self.out,
                Severity::Error,
                sqlstate::INVALID_PARAMETER_VALUE,
                &message,
            ),
        }
        protocol::ready_for_query(&mut self.out, status);
    }

    /// The lone simple Query at the start of `buf`, if the request is one.
    fn lone_query(buf: &[u8], len: usize) -> Option<String> {
        let len = len.min(buf.len());
        let msgs = messages(&buf[..len]);
        match msgs.as_slice() {
            [m] if m.tag == b'Q' => {
                Some(String::from_utf8_lossy(protocol::query_text(m.bytes)).into_owned())
            }
            _ => None,
        }
    }

    fn tx_control(&self, text: &str) -> TxControl {
        match self.route.as_deref() {
            Some(r) => r.cluster.classify(text.as_bytes()).tx,
            None => TxControl::None,
        }
    }

    // ----- no server attached ---------------------------------------------

    /// Places the request before a server is chosen. `None`: attach on the
    /// (now current) shard as usual; `Some(step)`: handled here.
    pub(super) async fn shard_idle(
        &mut self,
        client: &mut ClientStream,
        req: &mut Request,
    ) -> std::io::Result<Option<Step>> {
        let max = self.config.general.max_packet_size;
        if req.len == usize::MAX {
            // Past the routing decision limit: sharding needs it whole.
            match whole_request(&self.cbuf, max) {
                Some(len) => req.len = len,
                None if self.cbuf.len() > SHARD_DECIDE_LIMIT => {
                    return self
                        .close_with(client, sqlstate::FEATURE_NOT_SUPPORTED, TOO_BIG)
                        .await
                        .map(Some);
                }
                None => return self.read_client(client).await.map(Some),
            }
        }
        let lone = Self::lone_query(&self.cbuf, req.len);
        let deferred = self.shard.as_deref().is_some_and(|s| s.deferred.is_some());
        if !deferred {
            // No server and nothing deferred: no transaction is open.
            if let Some(sr) = self.shard.as_deref_mut() {
                sr.local_pin = None;
            }
        }
        let status = if deferred {
            if self
                .shard
                .as_deref()
                .and_then(|s| s.deferred.as_ref())
                .is_some_and(|d| d.aborted)
            {
                TxStatus::Failed
            } else {
                TxStatus::InTransaction
            }
        } else {
            TxStatus::Idle
        };
        if let Some(text) = &lone {
            let cmd = self
                .shard
                .as_deref()
                .and_then(|s| parse_command(text, &s.db));
            if let Some(cmd) = cmd {
                self.answer_command(cmd, status);
                self.cbuf.advance(req.len);
                client.write_all(&self.out).await?;
                return Ok(Some(Step::Continue));
            }
        }
        if req.command.is_some() {
            return Ok(None);
        }
        if deferred {
            return self.in_deferred(client, req, lone.as_deref(), status).await;
        }
        if let Some(text) = &lone {
            let pinned = self.sharding().is_some_and(|s| s.session_pin.is_some());
            let first = lone_statement(text);
            if !pinned
                && self.mode == PoolMode::Transaction
                && matches!(first.as_deref(), Some("begin" | "start"))
                && matches!(self.tx_control(text), TxControl::Begin { .. })
            {
                // Opened where its first statement that needs a server goes.
                if let Some(sr) = self.shard.as_deref_mut() {
                    sr.deferred = Some(Deferred {
                        begin: text.clone(),
                        aborted: false,
                    });
                }
                self.out.clear();
                protocol::command_complete(&mut self.out, "BEGIN");
                protocol::ready_for_query(&mut self.out, TxStatus::InTransaction);
                self.cbuf.advance(req.len);
                client.write_all(&self.out).await?;
                return Ok(Some(Step::Continue));
            }
        }
        let decision = self.decide(&self.cbuf[..req.len]);
        self.carry_out(client, req, decision, TxStatus::Idle).await
    }

    /// Acts on a decision with no server attached.
    async fn carry_out(
        &mut self,
        client: &mut ClientStream,
        req: &mut Request,
        decision: Decision,
        status: TxStatus,
    ) -> std::io::Result<Option<Step>> {
        let Some(db) = self.sharding().map(|s| s.db.clone()) else {
            return Ok(None);
        };
        match decision {
            Decision::Any => {
                // Any shard will do: stay, unless the monitor sees this
                // shard's primary down and another's up.
                let now = Instant::now();
                let current = self.sharding().map_or(0, |s| s.current);
                let down = db
                    .shards
                    .get(current)
                    .is_some_and(|s| !s.cluster.primary_reachable(now));
                if down {
                    if let Some(up) = db.shards.iter().find(|s| s.cluster.primary_reachable(now)) {
                        self.switch_shard(up.index);
                    }
                }
                Ok(None)
            }
            Decision::Shard(s, reason) => {
                tracing::trace!(shard = s, %reason, "placed");
                if let Some(shard) = db.shards.get(s) {
                    shard.count_statement();
                }
                self.switch_shard(s);
                Ok(None)
            }
            Decision::Refuse(code, message) => {
                db.count_refused();
                self.refuse_with_status(client, code, &message, status)
                    .await?;
                Ok(Some(Step::Continue))
            }
            _ if status != TxStatus::Idle => {
                db.count_refused();
                self.refuse_with_status(
                    client,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "pgsluice cannot run a statement on every shard inside a transaction \
                     (a transaction stays on one shard); run it outside the transaction, or add \
                     the shard key",
                    status,
                )
                .await?;
                Ok(Some(Step::Continue))
            }
            Decision::FanOut { plan, sql } => {
                let step = self
                    .everywhere(client, req.len, sql, Combine::Merge(plan), true)
                    .await?;
                Ok(Some(step))
            }
            Decision::AllWrite => {
                let step = self
                    .everywhere(client, req.len, None, Combine::First, false)
                    .await?;
                Ok(Some(step))
            }
            Decision::Split(parts) => {
                let step = self.split(client, req.len, parts).await?;
                Ok(Some(step))
            }
        }
    }

    /// A request after a `BEGIN` pgsluice answered itself.
    async fn in_deferred(
        &mut self,
        client: &mut ClientStream,
        req: &mut Request,
        lone: Option<&str>,
        status: TxStatus,
    ) -> std::io::Result<Option<Step>> {
        if let Some(text) = lone {
            if matches!(self.tx_control(text), TxControl::End) {
                let first = lone_statement(text).unwrap_or_default();
                let tag = match (first.as_str(), status) {
                    ("commit" | "end", TxStatus::InTransaction) => "COMMIT",
                    ("prepare", _) => {
                        return self
                            .refuse_deferred(
                                client,
                                req.len,
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "pgsluice cannot PREPARE TRANSACTION a transaction that has not \
                                 run a statement on any shard",
                            )
                            .await;
                    }
                    _ => "ROLLBACK",
                };
                if let Some(sr) = self.shard.as_deref_mut() {
                    sr.deferred = None;
                    sr.local_pin = None;
                }
                self.out.clear();
                protocol::command_complete(&mut self.out, tag);
                protocol::ready_for_query(&mut self.out, TxStatus::Idle);
                self.cbuf.advance(req.len);
                client.write_all(&self.out).await?;
                return Ok(Some(Step::Continue));
            }
        }
        if status == TxStatus::Failed {
            return self
                .refuse_deferred(
                    client,
                    req.len,
                    IN_FAILED_SQL_TRANSACTION,
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
                .await;
        }
        if self.describe_only(req.len) {
            // A statement prepared (not run) inside the transaction does
            // not choose its shard: answered from any shard, outside it.
            return self.describe_aside(client, req.len, status).await.map(Some);
        }
        let decision = match self.decide(&self.cbuf[..req.len]) {
            // The transaction opens on the current shard.
            Decision::Any => {
                let s = self.sharding().map_or(0, |s| s.current);
                Decision::Shard(s, "first statement of the transaction".into())
            }
            d => d,
        };
        match decision {
            Decision::Shard(s, reason) => {
                let begin = self
                    .shard
                    .as_deref_mut()
                    .and_then(|sr| sr.deferred.take())
                    .map(|d| d.begin);
                let read_only = begin.as_deref().is_some_and(|b| {
                    matches!(self.tx_control(b), TxControl::Begin { read_only: true })
                });
                if let Some(sr) = self.shard.as_deref_mut() {
                    sr.begin_on_attach = begin;
                }
                if !read_only {
                    req.access = Access::Write;
                }
                // Inside the transaction now: never sent twice.
                req.replayable = false;
                self.carry_out(client, req, Decision::Shard(s, reason), TxStatus::Idle)
                    .await
            }
            Decision::Refuse(code, message) => {
                self.refuse_deferred(client, req.len, code, &message).await
            }
            other => {
                self.carry_out(client, req, other, TxStatus::InTransaction)
                    .await?;
                if let Some(d) = self.shard.as_deref_mut().and_then(|s| s.deferred.as_mut()) {
                    d.aborted = true;
                }
                Ok(Some(Step::Continue))
            }
        }
    }

    /// An error inside a deferred transaction: it is aborted, as on the
    /// server.
    async fn refuse_deferred(
        &mut self,
        client: &mut ClientStream,
        _len: usize,
        code: &str,
        message: &str,
    ) -> std::io::Result<Option<Step>> {
        if let Some(d) = self.shard.as_deref_mut().and_then(|s| s.deferred.as_mut()) {
            d.aborted = true;
        }
        if let Some(sr) = self.sharding() {
            sr.db.count_refused();
        }
        self.refuse_with_status(client, code, message, TxStatus::Failed)
            .await?;
        Ok(Some(Step::Continue))
    }

    /// As `refuse_request`, ending with ReadyForQuery in `status`.
    async fn refuse_with_status(
        &mut self,
        client: &mut ClientStream,
        code: &str,
        message: &str,
        status: TxStatus,
    ) -> std::io::Result<()> {
        self.out.clear();
        protocol::error_response(&mut self.out, Severity::Error, code, message);
        client.write_all(&self.out).await?;
        let max = self.config.general.max_packet_size;
        loop {
            match protocol::peek_header(&self.cbuf, max) {
                Ok(Some(h)) if self.cbuf.len() >= h.total_len => {
                    self.cbuf.advance(h.total_len);
                    if matches!(h.tag, b'Q' | b'S' | b'F') {
                        self.out.clear();
                        protocol::ready_for_query(&mut self.out, status);
                        return client.write_all(&self.out).await;
                    }
                }
                Ok(_) => {
                    self.cbuf.reserve(8 * 1024);
                    if tokio::io::AsyncReadExt::read_buf(client, &mut self.cbuf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
        }
    }

    /// Right after a server was attached: opens the deferred transaction.
    pub(super) async fn shard_after_attach(
        &mut self,
        client: &mut ClientStream,
    ) -> std::io::Result<Option<Step>> {
        let Some(begin) = self
            .shard
            .as_deref_mut()
            .and_then(|s| s.begin_on_attach.take())
        else {
            return Ok(None);
        };
        let Some(server) = self.server.as_deref_mut() else {
            return Ok(None);
        };
        match server.run_internal(&begin, INTERNAL_QUERY_TIMEOUT).await {
            Ok(QueryOutcome::Done(TxStatus::InTransaction)) => {
                self.relay.force_in_transaction();
                Ok(None)
            }
            Ok(QueryOutcome::Failed { error, .. }) => {
                // The client was told BEGIN worked; it gets this error on
                // its first statement instead.
                self.relay.server_unusable = true;
                self.drop_server().await;
                self.refuse_with_status(client, &error.code, &error.message, TxStatus::Idle)
                    .await?;
                Ok(Some(Step::Continue))
            }
            _ => {
                self.drop_server().await;
                self.close_with(
                    client,
                    sqlstate::CONNECTION_FAILURE,
                    "server connection failed while opening the transaction",
                )
                .await
                .map(Some)
            }
        }
    }

    // ----- a server attached ------------------------------------------------

    /// A request arriving while a server of shard `current` is attached.
    pub(super) async fn shard_relay(
        &mut self,
        client: &mut ClientStream,
        req: &mut Request,
        request_start: bool,
        quiet: bool,
    ) -> std::io::Result<Relay> {
        if !request_start {
            return Ok(Relay::Go);
        }
        if req.len == usize::MAX {
            let max = self.config.general.max_packet_size;
            match whole_request(&self.cbuf, max) {
                Some(len) => req.len = len,
                None if self.cbuf.len() > SHARD_DECIDE_LIMIT => {
                    return self
                        .close_with(client, sqlstate::FEATURE_NOT_SUPPORTED, TOO_BIG)
                        .await
                        .map(Relay::Exit);
                }
                None => return Ok(Relay::NeedMore),
            }
        }
        let status = self.relay.tx_status();
        if status == TxStatus::Idle {
            if let Some(sr) = self.shard.as_deref_mut() {
                sr.local_pin = None;
            }
        }
        let lone = Self::lone_query(&self.cbuf, req.len);
        if let Some(text) = &lone {
            let cmd = self
                .shard
                .as_deref()
                .and_then(|s| parse_command(text, &s.db));
            if let Some(cmd) = cmd {
                if !quiet {
                    return Ok(Relay::Hold(super::Held::UntilQuiet));
                }
                let current = self.sharding().map_or(0, |s| s.current);
                let cmd = match cmd {
                    Command::Set {
                        local: true,
                        pin: Some(p),
                    } if status != TxStatus::Idle && p.shard != current => {
                        Command::Invalid(format!(
                            "the transaction runs on shard {current}; SET LOCAL pgsluice.{} \
                         (shard {}) cannot move it",
                            p.what, p.shard
                        ))
                    }
                    c => c,
                };
                self.answer_command(cmd, status);
                self.cbuf.advance(req.len);
                client.write_all(&self.out).await?;
                return Ok(Relay::Answered);
            }
            let pinned = self.sharding().is_some_and(|s| s.session_pin.is_some());
            if status == TxStatus::Idle
                && !pinned
                && self.mode == PoolMode::Transaction
                && self.state.pinned.is_none()
                && !self.relay.server_unusable
                && matches!(lone_statement(text).as_deref(), Some("begin" | "start"))
                && matches!(self.tx_control(text), TxControl::Begin { .. })
            {
                // Deferred: answered without a server (see `shard_idle`).
                return Ok(if quiet {
                    Relay::Hold(super::Held::Reroute)
                } else {
                    Relay::Hold(super::Held::UntilQuiet)
                });
            }
        }
        if req.command.is_some() {
            return Ok(Relay::Go);
        }
        let current = self.sharding().map_or(0, |s| s.current);
        let decision = self.decide(&self.cbuf[..req.len]);
        let stays = match &decision {
            Decision::Any => true,
            Decision::Shard(s, _) => *s == current,
            _ => false,
        };
        if stays {
            if let (Decision::Shard(s, _), Some(sr)) = (&decision, self.sharding()) {
                if let Some(shard) = sr.db.shards.get(*s) {
                    shard.count_statement();
                }
            }
            return Ok(Relay::Go);
        }
        if !quiet {
            // Judged again once what came before is answered.
            return Ok(Relay::Hold(super::Held::UntilQuiet));
        }
        if status == TxStatus::Failed {
            // PostgreSQL answers 25P02 itself.
            return Ok(Relay::Go);
        }
        if status == TxStatus::Idle && self.state.pinned.is_none() {
            if self.relay.server_unusable {
                return self
                    .close_with(
                        client,
                        sqlstate::CONNECTION_FAILURE,
                        "the server connection became unusable; reconnect",
                    )
                    .await
                    .map(Relay::Exit);
            }
            return Ok(Relay::Hold(super::Held::Reroute));
        }
        let message = match (&decision, status) {
            (Decision::Refuse(_, m), TxStatus::Idle) => m.clone(),
            (Decision::Refuse(_, m), _) => m.clone(),
            (Decision::Shard(s, reason), TxStatus::Idle) => format!(
                "this client is pinned to a server of shard {current} ({}); a statement for \
                 shard {s} ({reason}) cannot run there",
                self.state.pinned.as_deref().unwrap_or("session state")
            ),
            (Decision::Shard(s, reason), _) => format!(
                "the transaction runs on shard {current}; a statement for shard {s} ({reason}) \
                 cannot join it (a transaction stays on one shard; two-phase commit across \
                 shards is not supported)"
            ),
            (_, TxStatus::Idle) => format!(
                "this client is pinned to a server of shard {current} ({}); a statement for \
                 every shard cannot run there",
                self.state.pinned.as_deref().unwrap_or("session state")
            ),
            _ => format!(
                "the transaction runs on shard {current}; a statement for every shard cannot \
                 run inside it (a transaction stays on one shard)"
            ),
        };
        let code = match &decision {
            Decision::Refuse(code, _) => code,
            _ => sqlstate::FEATURE_NOT_SUPPORTED,
        };
        if let Some(sr) = self.sharding() {
            sr.db.count_refused();
        }
        if status == TxStatus::Idle {
            self.refuse_with_status(client, code, &message, TxStatus::Idle)
                .await?;
            return Ok(Relay::Answered);
        }
        let last = messages(&self.cbuf[..req.len.min(self.cbuf.len())])
            .last()
            .map(|m| m.tag);
        if !matches!(last, Some(b'Q' | b'S')) {
            return self
                .close_with(client, code, &message)
                .await
                .map(Relay::Exit);
        }
        // The server raises it, so its transaction is aborted there as it
        // would be after any error, and the client gets the error in order.
        let raise = raise_query(code, &message);
        let mut again = BytesMut::with_capacity(raise.len() + self.cbuf.len() - req.len);
        again.extend_from_slice(&raise);
        again.extend_from_slice(&self.cbuf[req.len..]);
        self.cbuf = again;
        req.len = raise.len();
        req.new_names.clear();
        req.replayable = false;
        req.replans = false;
        Ok(Relay::Go)
    }

    /// Whether the request only prepares and describes statements
    /// (Parse, Describe of a statement, Close, Sync): it runs nothing.
    fn describe_only(&self, len: usize) -> bool {
        let msgs = messages(&self.cbuf[..len.min(self.cbuf.len())]);
        msgs.last().is_some_and(|m| m.tag == b'S')
            && msgs.iter().any(|m| m.tag == b'D')
            && msgs.iter().all(|m| match m.tag {
                b'P' | b'S' | b'H' | b'C' => true,
                b'D' => statements::parse_target(m.bytes).is_some_and(|(k, _)| k == b'S'),
                _ => false,
            })
    }

    /// Answers a [`Self::describe_only`] request from the current shard
    /// (unnamed there), ending with ReadyForQuery in `status`; the client's
    /// statement names are recorded as if a server had prepared them.
    async fn describe_aside(
        &mut self,
        client: &mut ClientStream,
        len: usize,
        status: TxStatus,
    ) -> std::io::Result<Step> {
        let len = len.min(self.cbuf.len());
        let msgs: Vec<(u8, Bytes)> = messages(&self.cbuf[..len])
            .iter()
            .map(|m| (m.tag, Bytes::copy_from_slice(m.bytes)))
            .collect();
        // The statement described: parsed here or earlier.
        let mut parsed: Vec<(Vec<u8>, Bytes)> = Vec::new();
        let mut described = None;
        for (tag, m) in &msgs {
            match tag {
                b'P' => {
                    if let Some((name, tail)) = statements::parse_parse(m) {
                        parsed.push((name.to_vec(), Bytes::copy_from_slice(tail)));
                    }
                }
                b'D' => {
                    let Some((_, name)) = statements::parse_target(m) else {
                        continue;
                    };
                    described = parsed
                        .iter()
                        .rev()
                        .find(|(n, _)| n == name)
                        .map(|(_, t)| t.clone())
                        .or_else(|| {
                            if name.is_empty() {
                                self.unnamed.as_ref().map(|(_, t)| t.clone())
                            } else {
                                self.statements
                                    .get(name)
                                    .map(|s| Bytes::copy_from_slice(s.tail()))
                            }
                        });
                }
                _ => {}
            }
        }
        let Some(tail) = described else {
            self.refuse_with_status(
                client,
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                "prepared statement does not exist",
                status,
            )
            .await?;
            return Ok(Step::Continue);
        };
        let mut request = Vec::new();
        request.extend(cstr_message(b'P', &[b"\0", &tail]));
        request.extend(cstr_message(b'D', &[b"S\0"]));
        request.extend(cstr_message(b'S', &[]));
        let current = self.sharding().map_or(0, |s| s.current);
        let Some(servers) = self.checkout_each(client, &[current], true).await? else {
            return Ok(Step::Continue);
        };
        let mut answers = self.run_parallel(servers, vec![Bytes::from(request)]).await;
        let answer = match answers.pop() {
            Some((_, Ok(a))) => a,
            _ => {
                self.cbuf.advance(len);
                self.out.clear();
                protocol::error_response(
                    &mut self.out,
                    Severity::Error,
                    sqlstate::CONNECTION_FAILURE,
                    &format!(
                        "shard {current}: server connection failed while describing a statement"
                    ),
                );
                protocol::ready_for_query(&mut self.out, status);
                client.write_all(&self.out).await?;
                return Ok(Step::Continue);
            }
        };
        self.cbuf.advance(len);
        self.out.clear();
        if let Some(e) = &answer.error {
            self.out.extend_from_slice(e);
        } else {
            self.remember_statements(&msgs);
            for (tag, _) in &msgs {
                match tag {
                    b'P' => self.out.extend_from_slice(statements::PARSE_COMPLETE),
                    b'D' => {
                        if let Some(p) = &answer.parameter_description {
                            self.out.extend_from_slice(p);
                        }
                        match &answer.row_description {
                            Some(d) => self.out.extend_from_slice(d),
                            None => self.out.extend_from_slice(&[b'n', 0, 0, 0, 4]),
                        }
                    }
                    b'C' => self.out.extend_from_slice(statements::CLOSE_COMPLETE),
                    _ => {}
                }
            }
        }
        protocol::ready_for_query(&mut self.out, status);
        client.write_all(&self.out).await?;
        Ok(Step::Continue)
    }

    // ----- every shard --------------------------------------------------------

    /// Checks out one server per shard in `shards` (a replica for a read
    /// where the routing rules allow) with the client's session
    /// parameters applied. On failure the client has been answered.
    async fn checkout_each(
        &mut self,
        client: &mut ClientStream,
        shards: &[usize],
        read: bool,
    ) -> std::io::Result<Option<Vec<(usize, Pooled)>>> {
        let Some(sr) = self.sharding() else {
            return Ok(None);
        };
        let db = sr.db.clone();
        let pools = sr.pools.clone();
        let started = Instant::now();
        let deadline = started + self.pools[0].settings().checkout_timeout;
        let (mode, last_write) = match self.route.as_deref() {
            Some(r) => (r.mode, r.last_write),
            None => (crate::router::RouteMode::Primary, None),
        };
        let probe = Request {
            access: if read { Access::Read } else { Access::Write },
            hint: None,
            command: None,
            len: 0,
            replayable: false,
            flush_end: false,
            new_names: Vec::new(),
            replans: false,
        };
        let mut servers = Vec::with_capacity(shards.len());
        for &s in shards {
            let (Some(shard), Some(node_pools)) = (db.shards.get(s), pools.get(s)) else {
                continue;
            };
            let mut chooser = ClientRoute::new(shard.cluster.clone(), Some(mode));
            chooser.last_write = last_write;
            let (mut node, _) = chooser.decide(&probe);
            let server = loop {
                match node_pools[node].checkout_by(started, deadline).await {
                    Ok(server) => break server,
                    Err(e) if node != 0 && matches!(e, crate::pool::PoolError::Server(_)) => {
                        node = 0;
                    }
                    Err(e) => {
                        let message = format!("shard {s}: {e}");
                        self.refuse_with_status(client, e.sqlstate(), &message, TxStatus::Idle)
                            .await?;
                        return Ok(None);
                    }
                }
            };
            let mut server = server;
            if let Some(sql) = self.params.sync_sql_for(&mut server) {
                match server.run_internal(&sql, INTERNAL_QUERY_TIMEOUT).await {
                    Ok(QueryOutcome::Done(TxStatus::Idle)) => self.params.after_sync(&mut server),
                    _ => {
                        drop(server);
                        self.refuse_with_status(
                            client,
                            sqlstate::CONNECTION_FAILURE,
                            &format!("shard {s}: applying session parameters failed"),
                            TxStatus::Idle,
                        )
                        .await?;
                        return Ok(None);
                    }
                }
            }
            if read && shard.bytewise_text().is_none() {
                // Whether text sorts bytewise here: asked once per shard.
                let mut rows = Vec::new();
                if let Ok(QueryOutcome::Done(TxStatus::Idle)) = server
                    .query_internal(
                        "SELECT datcollate FROM pg_database WHERE datname = current_database()",
                        INTERNAL_QUERY_TIMEOUT,
                        &mut rows,
                    )
                    .await
                {
                    if let Some(Some(c)) = rows.first().and_then(|r| r.first()) {
                        shard.set_collation(c);
                    }
                }
            }
            servers.push((s, server));
        }
        Ok(Some(servers))
    }

    /// Runs `requests` (one per shard) in parallel; returns the answers in
    /// the same order. Servers left clean go back to their pools.
    async fn run_parallel(
        &mut self,
        servers: Vec<(usize, Pooled)>,
        requests: Vec<Bytes>,
    ) -> Vec<(usize, Result<ShardAnswer, FanoutError>)> {
        let max_rows = self.sharding().map_or(0, |s| s.db.settings.max_fanout_rows);
        let timeout = self.config.general.query_timeout;
        let budget = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        for (i, ((shard, mut server), request)) in servers.into_iter().zip(requests).enumerate() {
            let budget = budget.clone();
            set.spawn(async move {
                let r = fanout::exchange(&mut server, &request, &budget, max_rows, timeout).await;
                match &r {
                    Ok(a) if a.status == Some(TxStatus::Idle) => {
                        // The unnamed statement and portal are ours now.
                        server.unnamed_owner = None;
                        server.release();
                    }
                    Ok(_) => drop(server),
                    Err(_) => {
                        let key = server.cancel_key;
                        drop(server);
                        tokio::spawn(async move {
                            let _ = crate::backend::send_cancel(key, Duration::from_secs(5)).await;
                        });
                    }
                }
                (i, shard, r)
            });
        }
        let mut out: Vec<Option<(usize, Result<ShardAnswer, FanoutError>)>> = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, shard, r)) = joined {
                if out.len() <= i {
                    out.resize_with(i + 1, || None);
                }
                out[i] = Some((shard, r));
            }
        }
        out.into_iter().flatten().collect()
    }

    /// The client's extended messages of the request, or `None` for a
    /// simple Query. Refuses shapes a fan-out cannot answer.
    fn shape_of(&self, len: usize) -> Result<(Shape, String, Vec<u32>, Option<Bytes>), String> {
        let msgs = messages(&self.cbuf[..len.min(self.cbuf.len())]);
        if let [m] = msgs.as_slice() {
            if m.tag == b'Q' {
                let text = String::from_utf8_lossy(protocol::query_text(m.bytes)).into_owned();
                return Ok((Shape::Simple, text, Vec::new(), None));
            }
        }
        let mut parse: Option<(Vec<u8>, Bytes)> = None;
        let mut bind_rest = None;
        let mut stmt_tail: Option<Bytes> = None;
        let mut executes = 0;
        let mut kept = Vec::with_capacity(msgs.len());
        for m in &msgs {
            match m.tag {
                b'P' => {
                    let (name, tail) = statements::parse_parse(m.bytes)
                        .ok_or_else(|| "malformed Parse message".to_owned())?;
                    parse = Some((name.to_vec(), Bytes::copy_from_slice(tail)));
                }
                b'B' => {
                    let (_, name, rest) = statements::parse_bind(m.bytes)
                        .ok_or_else(|| "malformed Bind message".to_owned())?;
                    let tail = match &parse {
                        Some((n, t)) if n == name => t.clone(),
                        _ if name.is_empty() => self
                            .unnamed
                            .as_ref()
                            .map(|(_, t)| t.clone())
                            .ok_or_else(|| {
                                "unnamed prepared statement does not exist".to_owned()
                            })?,
                        _ => self
                            .statements
                            .get(name)
                            .map(|s| Bytes::copy_from_slice(s.tail()))
                            .ok_or_else(|| {
                                format!(
                                    "prepared statement \"{}\" does not exist",
                                    String::from_utf8_lossy(name)
                                )
                            })?,
                    };
                    stmt_tail = Some(tail);
                    bind_rest = Some(Bytes::copy_from_slice(rest));
                }
                b'E' => {
                    let body = protocol::body(m.bytes);
                    let nul = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                    let max_rows = body
                        .get(nul + 1..nul + 5)
                        .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if max_rows != 0 {
                        return Err("pgsluice cannot fetch a statement run on every shard in \
                                    batches (Execute with a row limit)"
                            .into());
                    }
                    executes += 1;
                }
                b'D' | b'C' | b'S' | b'H' => {}
                other => {
                    return Err(format!(
                        "pgsluice cannot run message '{}' on every shard",
                        char::from(other)
                    ));
                }
            }
            kept.push((m.tag, Bytes::copy_from_slice(m.bytes)));
        }
        let (Some(tail), Some(rest)) = (stmt_tail, bind_rest) else {
            return Err("no statement to run".into());
        };
        if executes != 1 {
            return Err("pgsluice runs a statement on every shard only as one Execute".into());
        }
        let text = String::from_utf8_lossy(super::tracked::text_of(&tail)).into_owned();
        Ok((
            Shape::Extended { msgs: kept },
            text,
            param_types(&tail),
            Some(rest),
        ))
    }

    /// Runs the request at the front of `cbuf` on every shard (`read`: a
    /// key-less read, merged; else a write to an unsharded table on every
    /// primary) and answers the client.
    async fn everywhere(
        &mut self,
        client: &mut ClientStream,
        len: usize,
        per_shard_sql: Option<String>,
        combine: Combine,
        read: bool,
    ) -> std::io::Result<Step> {
        let (shape, text, types, bind_rest) = match self.shape_of(len) {
            Ok(s) => s,
            Err(message) => {
                self.refuse_with_status(
                    client,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    &message,
                    TxStatus::Idle,
                )
                .await?;
                return Ok(Step::Continue);
            }
        };
        let sql = per_shard_sql.unwrap_or(text);
        let request = match &bind_rest {
            None => query_message(&sql),
            Some(rest) => {
                let mut types_bytes = Vec::with_capacity(2 + 4 * types.len());
                types_bytes.extend_from_slice(&(types.len() as i16).to_be_bytes());
                for t in &types {
                    types_bytes.extend_from_slice(&t.to_be_bytes());
                }
                let describe_s = matches!(&shape, Shape::Extended { msgs } if msgs.iter().any(|(t, m)| *t == b'D' && statements::parse_target(m).is_some_and(|(k, _)| k == b'S')));
                let mut b = Vec::new();
                b.extend(cstr_message(
                    b'P',
                    &[b"\0", sql.as_bytes(), b"\0", &types_bytes],
                ));
                if describe_s {
                    b.extend(cstr_message(b'D', &[b"S\0"]));
                }
                b.extend(cstr_message(b'B', &[b"\0\0", rest]));
                b.extend(cstr_message(b'D', &[b"P\0"]));
                b.extend(cstr_message(b'E', &[b"\0", &0i32.to_be_bytes()]));
                b.extend(cstr_message(b'S', &[]));
                Bytes::from(b)
            }
        };
        let shards: Vec<usize> = self
            .sharding()
            .map_or_else(Vec::new, |s| (0..s.db.shards.len()).collect());
        let requests = vec![request; shards.len()];
        self.run_and_answer(client, len, &shards, requests, read, combine, shape)
            .await
    }

    /// A multi-row INSERT split per shard (simple protocol).
    async fn split(
        &mut self,
        client: &mut ClientStream,
        len: usize,
        parts: Vec<(usize, String)>,
    ) -> std::io::Result<Step> {
        let shards: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
        let requests = parts.iter().map(|(_, sql)| query_message(sql)).collect();
        self.run_and_answer(
            client,
            len,
            &shards,
            requests,
            false,
            Combine::Inserts,
            Shape::Simple,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_and_answer(
        &mut self,
        client: &mut ClientStream,
        len: usize,
        shards: &[usize],
        requests: Vec<Bytes>,
        read: bool,
        combine: Combine,
        shape: Shape,
    ) -> std::io::Result<Step> {
        let Some(db) = self.sharding().map(|s| s.db.clone()) else {
            return Ok(Step::Continue);
        };
        db.count_fanout();
        for &s in shards {
            if let Some(shard) = db.shards.get(s) {
                shard.count_fanout();
            }
        }
        let Some(servers) = self.checkout_each(client, shards, read).await? else {
            return Ok(Step::Continue);
        };
        let answers = self.run_parallel(servers, requests).await;
        let reply = self.combine(&db, answers, combine, &shape);
        let ok = reply.is_ok();
        if ok && !read {
            if let Some(route) = self.route.as_deref_mut() {
                route.last_write = Some(Instant::now());
            }
        }
        // The request is answered: drop it from the client's input.
        let len = len.min(self.cbuf.len());
        if ok {
            if let Shape::Extended { msgs } = &shape {
                self.remember_statements(msgs);
            }
        }
        self.cbuf.advance(len);
        self.out.clear();
        match reply {
            Ok(bytes) => self.out.extend_from_slice(&bytes),
            Err((code, message, notices)) => {
                self.out.extend_from_slice(&notices);
                match message {
                    Reply::Error(bytes) => self.out.extend_from_slice(&bytes),
                    Reply::Text(m) => {
                        protocol::error_response(&mut self.out, Severity::Error, code, &m)
                    }
                }
            }
        }
        protocol::ready_for_query(&mut self.out, TxStatus::Idle);
        client.write_all(&self.out).await?;
        Ok(Step::Continue)
    }

    /// A named (or unnamed) Parse answered by a fan-out is the client's
    /// statement from now on, as if a server had prepared it.
    fn remember_statements(&mut self, msgs: &[(u8, Bytes)]) {
        for (tag, m) in msgs {
            match tag {
                b'P' => {
                    let Some((name, tail)) = statements::parse_parse(m) else {
                        continue;
                    };
                    if name.is_empty() {
                        self.unnamed_generation += 1;
                        self.unnamed =
                            Some((self.unnamed_generation, Bytes::copy_from_slice(tail)));
                    } else {
                        let stmt = self.shared.statements.intern(tail);
                        self.statements.insert(name, stmt);
                    }
                }
                b'C' => {
                    if let Some((b'S', name)) = statements::parse_target(m) {
                        if !name.is_empty() {
                            self.statements.remove(name);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The client's answer (without the final ReadyForQuery).
    fn combine(
        &self,
        db: &ShardedDatabase,
        answers: Vec<(usize, Result<ShardAnswer, FanoutError>)>,
        combine: Combine,
        shape: &Shape,
    ) -> Result<BytesMut, (&'static str, Reply, BytesMut)> {
        let mut notices = BytesMut::new();
        let mut ok = Vec::with_capacity(answers.len());
        for (shard, a) in answers {
            match a {
                Ok(a) => {
                    for n in &a.notices {
                        notices.extend_from_slice(n);
                    }
                    ok.push((shard, a));
                }
                Err(FanoutError::TooManyRows) => {
                    return Err((
                        fanout::PROGRAM_LIMIT_EXCEEDED,
                        Reply::Text(format!(
                            "the read ran on every shard and returned more than \
                             databases.{}.max_fanout_rows ({}) rows for pgsluice to merge; add \
                             the shard key, a LIMIT, or raise the setting",
                            db.database, db.settings.max_fanout_rows
                        )),
                        notices,
                    ));
                }
                Err(FanoutError::Timeout) => {
                    return Err((
                        sqlstate::QUERY_CANCELED,
                        Reply::Text(
                            "canceling statement due to query_timeout (on every shard)".into(),
                        ),
                        notices,
                    ));
                }
                Err(FanoutError::Server(e)) => {
                    return Err((
                        sqlstate::CONNECTION_FAILURE,
                        Reply::Text(format!("shard {shard}: server connection failed: {e}")),
                        notices,
                    ));
                }
            }
        }
        if let Some((shard, a)) = ok.iter().find(|(_, a)| a.error.is_some()) {
            if let Some(e) = &a.error {
                if ok.len() > 1 && !matches!(combine, Combine::Merge(_)) {
                    tracing::warn!(
                        shard,
                        "a write run on several shards failed on this one; the others may have applied it"
                    );
                }
                return Err(("", Reply::Error(e.clone()), notices));
            }
        }
        let text_error = |code: &'static str, m: String| (code, Reply::Text(m), BytesMut::new());
        let param_description = ok.iter().find_map(|(_, a)| a.parameter_description.clone());
        let descriptions: Vec<(usize, &[u8])> = ok
            .iter()
            .filter_map(|(s, a)| a.row_description.as_deref().map(|d| (*s, d)))
            .collect();
        let (row_description, rows, tag) =
            match combine {
                Combine::Merge(plan) => {
                    if descriptions.is_empty() {
                        return Err(text_error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "pgsluice can merge only statements that return rows".into(),
                        ));
                    }
                    let fields =
                        fanout::agree(&descriptions).map_err(|e| text_error(e.code, e.message))?;
                    let needs_text_order =
                        plan.order_by
                            .iter()
                            .map(|k| k.column)
                            .chain(plan.columns.iter().flatten().enumerate().filter_map(
                                |(i, c)| {
                                    matches!(
                                        c,
                                        crate::router::shard::MergeColumn::Min
                                            | crate::router::shard::MergeColumn::Max
                                    )
                                    .then_some(i)
                                },
                            ))
                            .any(|c| {
                                fields
                                    .get(c)
                                    .is_some_and(|f| fanout::values::is_text(f.type_oid))
                            });
                    let bytewise = needs_text_order
                        && ok.iter().all(|(s, _)| {
                            db.shards.get(*s).and_then(|sh| sh.bytewise_text()) == Some(true)
                        });
                    let desc = Bytes::copy_from_slice(descriptions[0].1);
                    let shard_rows = ok.into_iter().map(|(_, a)| a.rows).collect();
                    let merged = fanout::merge_rows(&plan, &fields, shard_rows, bytewise)
                        .map_err(|e| text_error(e.code, e.message))?;
                    let n = merged.rows.len();
                    (Some(desc), merged.rows, format!("SELECT {n}"))
                }
                Combine::First => {
                    let Some((_, first)) = ok.into_iter().next() else {
                        return Err(text_error(
                            sqlstate::CONNECTION_FAILURE,
                            "no shard answered".into(),
                        ));
                    };
                    let tag = first.tags.last().cloned().unwrap_or_default();
                    (first.row_description, first.rows, tag)
                }
                Combine::Inserts => {
                    let mut total = 0u64;
                    let mut all_inserts = true;
                    for (_, a) in &ok {
                        match a
                            .tags
                            .last()
                            .and_then(|t| t.strip_prefix("INSERT 0 "))
                            .and_then(|n| n.parse::<u64>().ok())
                        {
                            Some(n) => total += n,
                            None => all_inserts = false,
                        }
                    }
                    let desc = ok.iter().find_map(|(_, a)| a.row_description.clone());
                    let tag = if all_inserts {
                        format!("INSERT 0 {total}")
                    } else {
                        ok.first()
                            .and_then(|(_, a)| a.tags.last().cloned())
                            .unwrap_or_default()
                    };
                    let rows = ok.into_iter().flat_map(|(_, a)| a.rows).collect();
                    (desc, rows, tag)
                }
            };
        let mut out = notices;
        match shape {
            Shape::Simple => {
                if let Some(d) = &row_description {
                    out.extend_from_slice(d);
                }
                for r in &rows {
                    out.extend_from_slice(r);
                }
                protocol::command_complete(&mut out, &tag);
            }
            Shape::Extended { msgs } => {
                for (t, m) in msgs {
                    match t {
                        b'P' => out.extend_from_slice(statements::PARSE_COMPLETE),
                        b'B' => out.extend_from_slice(&[b'2', 0, 0, 0, 4]),
                        b'D' => {
                            if statements::parse_target(m).is_some_and(|(k, _)| k == b'S') {
                                // Parameter types, as shard 0 inferred them.
                                if let Some(p) = &param_description {
                                    out.extend_from_slice(p);
                                }
                            }
                            match &row_description {
                                Some(d) => out.extend_from_slice(d),
                                None => out.extend_from_slice(&[b'n', 0, 0, 0, 4]),
                            }
                        }
                        b'E' => {
                            for r in &rows {
                                out.extend_from_slice(r);
                            }
                            protocol::command_complete(&mut out, &tag);
                        }
                        b'C' => out.extend_from_slice(statements::CLOSE_COMPLETE),
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

/// An error for the client: a shard's own ErrorResponse, or pgsluice's text.
enum Reply {
    Error(Bytes),
    Text(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn db() -> Arc<ShardedDatabase> {
        let config = Config::from_toml(
            "[databases.app]\nshards = [{ primary = \"h:1\" }, { primary = \"h:2\" }, { primary = \"h:3\" }, { primary = \"h:4\" }]\n\
             [users.u]\npassword = \"p\"\n",
            "test",
            [],
        )
        .expect("config");
        ShardedDatabase::new(&config.databases["app"], &config.routing).expect("sharded")
    }

    #[test]
    fn own_commands_parse() {
        let db = db();
        assert_eq!(
            parse_command("SET pgsluice.shard = 2", &db),
            Some(Command::Set {
                local: false,
                pin: Some(Pin {
                    shard: 2,
                    what: "shard=2".into()
                })
            })
        );
        let Some(Command::Set {
            local: true,
            pin: Some(p),
        }) = parse_command("set local PGSLUICE.SHARD_KEY to '42';", &db)
        else {
            panic!("SET LOCAL shard_key");
        };
        assert_eq!(p.what, "shard_key=42");
        assert_eq!(
            p.shard,
            crate::router::shard::shard_of(
                crate::router::shard::KeyType::BigInt,
                &crate::router::shard::KeyValue::Int(42),
                4
            )
        );
        assert_eq!(
            parse_command("RESET pgsluice.shard", &db),
            Some(Command::Set {
                local: false,
                pin: None
            })
        );
        assert_eq!(
            parse_command("SHOW pgsluice.shard_key", &db),
            Some(Command::Show { key: true })
        );
        assert!(matches!(
            parse_command("SET pgsluice.shard = 4", &db),
            Some(Command::Invalid(m)) if m.contains("shards 0 to 3")
        ));
        assert!(matches!(
            parse_command("SET pgsluice.shard_key = 'abc'", &db),
            Some(Command::Invalid(_))
        ));
        assert_eq!(parse_command("SET pgsluice.route = primary", &db), None);
        assert_eq!(parse_command("SELECT 1", &db), None);
    }

    #[test]
    fn bind_parameters_and_parse_types_are_read() {
        // 1 format (binary), 2 params: int8 42, NULL; 0 result formats.
        let mut rest = Vec::new();
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&2i16.to_be_bytes());
        rest.extend_from_slice(&8i32.to_be_bytes());
        rest.extend_from_slice(&42i64.to_be_bytes());
        rest.extend_from_slice(&(-1i32).to_be_bytes());
        rest.extend_from_slice(&0i16.to_be_bytes());
        let (formats, values) = bind_params(&rest).expect("bind");
        assert_eq!(formats, vec![1]);
        assert_eq!(values, vec![Some(&42i64.to_be_bytes()[..]), None]);
        let mut tail = b"SELECT $1\0".to_vec();
        tail.extend_from_slice(&1i16.to_be_bytes());
        tail.extend_from_slice(&20u32.to_be_bytes());
        assert_eq!(param_types(&tail), vec![20]);
        assert_eq!(param_types(b"SELECT 1\0\0\0"), Vec::<u32>::new());
    }

    #[test]
    fn refusals_in_a_transaction_are_raised_by_the_server() {
        let q = raise_query("0A000", "it's $pgsluice$ shard 1");
        let text = String::from_utf8_lossy(protocol::query_text(&q)).into_owned();
        assert!(text.starts_with("DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000'"));
        assert!(text.contains("it''s $ pgsluice $ shard 1"), "{text}");
    }
}
