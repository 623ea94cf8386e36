//! Named prepared statements across pooled servers (transaction and
//! statement mode).
//!
//! A client's named Parse is recorded under the client's name and
//! deduplicated globally by (query text, parameter types) to one server-side
//! name, `PGSLUICE_<id>`. Each server connection remembers which of those it
//! holds. Before a Bind or Describe reaches a server that lacks the
//! statement, the Parse is sent there first, silently; a Parse the server
//! already holds, and a Close of a client name, are answered by pgsluice with
//! a synthetic ParseComplete / CloseComplete **in order**. The [`Replies`]
//! queue keeps that order: it lists, for every message forwarded or answered
//! locally, the reply the client is owed, so synthetic replies are emitted
//! exactly where PostgreSQL would have sent them, replies to injected
//! messages never reach the client, and an error makes everything up to the
//! next Sync vanish as it does on the server (with the bookkeeping undone).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

use super::effects::{self, Effects};
use crate::protocol::{self, Severity};

/// Prepared-statement and session-state counters (process-wide, relaxed
/// atomics: each is a plain event count for metrics).
#[derive(Debug, Default)]
pub struct PreparedStats {
    /// Parse messages received from clients (named and unnamed).
    pub client_parses: AtomicU64,
    /// Parse messages sent to servers: the client's own, and those pgsluice
    /// injects because the server it got lacks the statement.
    pub server_parses: AtomicU64,
    /// Client Parses answered by pgsluice because the server already held
    /// the statement.
    pub cache_hits: AtomicU64,
    /// Statements closed on a server to stay within
    /// `max_prepared_statements`, or dropped after PostgreSQL said their
    /// cached plan was stale.
    pub evictions: AtomicU64,
    /// Times a client was pinned to its server by a session-only feature.
    pub pins: AtomicU64,
    /// Requests sent again, after their stale pooled statements were
    /// prepared afresh, because PostgreSQL reported a stale cached plan.
    pub replans: AtomicU64,
}

impl PreparedStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One distinct (query text, parameter types), as the server knows it.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    pub server_name: String,
    /// Parse body after the statement name: query, NUL, parameter types.
    tail: Bytes,
    /// What running it may do to session state (scanned once per text).
    pub effects: Effects,
    /// A stale cached plan met while running it alone in an implicit
    /// transaction can be recovered by preparing it again and resending.
    pub replannable: bool,
}

impl Statement {
    /// The query text.
    pub fn text(&self) -> &[u8] {
        let end = self
            .tail
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.tail.len());
        &self.tail[..end]
    }

    /// Number of parameter types the Parse declared.
    pub fn declared_params(&self) -> usize {
        let Some(end) = self.tail.iter().position(|&b| b == 0) else {
            return 0;
        };
        match self.tail.get(end + 1..end + 3) {
            Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
            _ => 0,
        }
    }

    /// The Parse body after the statement name: query, NUL, parameter
    /// types (sharding reads the types to decode bound keys).
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// A Parse of this statement under its server-side name.
    pub fn write_parse(&self, out: &mut BytesMut) {
        let len = 4 + self.server_name.len() + 1 + self.tail.len();
        out.put_u8(b'P');
        out.put_i32(len as i32);
        out.put_slice(self.server_name.as_bytes());
        out.put_u8(0);
        out.put_slice(&self.tail);
    }
}

/// Process-wide deduplication of statements.
#[derive(Default)]
pub struct StatementRegistry {
    map: Mutex<HashMap<Bytes, Weak<Statement>>>,
    next_id: AtomicU64,
    /// Size at which dead entries are next swept.
    sweep_at: AtomicU64,
}

impl StatementRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The statement for this Parse tail, shared by every client using it.
    pub fn intern(&self, tail: &[u8]) -> Arc<Statement> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(tail).and_then(Weak::upgrade) {
            return s;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let tail = Bytes::copy_from_slice(tail);
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let stmt = Arc::new(Statement {
            id,
            server_name: format!("PGSLUICE_{id}"),
            effects: effects::scan(&tail[..end]),
            replannable: effects::replan(&tail[..end]) == effects::Replan::Yes,
            tail: tail.clone(),
        });
        map.insert(tail, Arc::downgrade(&stmt));
        // Statements no client references any more are forgotten; servers
        // that still hold them simply never see them used again.
        if map.len() as u64 >= self.sweep_at.load(Ordering::Relaxed).max(1024) {
            map.retain(|_, w| w.strong_count() > 0);
            self.sweep_at.store(map.len() as u64 * 2, Ordering::Relaxed);
        }
        stmt
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The statements still in use (by a client or a server), by id.
    pub fn live(&self) -> Vec<Arc<Statement>> {
        let mut v: Vec<_> = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// A Parse message: statement name and the rest of the body.
pub fn parse_parse(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    split_cstr(protocol::body(msg))
}

/// A Bind message: portal, statement name, and the rest of the body.
pub fn parse_bind(msg: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (portal, rest) = split_cstr(protocol::body(msg))?;
    let (stmt, rest) = split_cstr(rest)?;
    Some((portal, stmt, rest))
}

/// A Describe or Close message: kind (`S` or `P`) and name.
pub fn parse_target(msg: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, rest) = protocol::body(msg).split_first()?;
    let (name, _) = split_cstr(rest)?;
    Some((kind, name))
}

/// A Parse of the unnamed statement with the given body tail.
pub fn write_unnamed_parse(out: &mut BytesMut, tail: &[u8]) {
    out.put_u8(b'P');
    out.put_i32((4 + 1 + tail.len()) as i32);
    out.put_u8(0);
    out.put_slice(tail);
}

pub fn write_bind(out: &mut BytesMut, portal: &[u8], stmt: &str, rest: &[u8]) {
    let len = 4 + portal.len() + 1 + stmt.len() + 1 + rest.len();
    out.put_u8(b'B');
    out.put_i32(len as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(stmt.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
}

pub fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    out.put_u8(tag);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

pub const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
pub const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];

/// An error PostgreSQL would have sent for a client's statement name.
pub fn statement_error(code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    protocol::error_response(&mut b, Severity::Error, code, message);
    b.freeze()
}

/// What the server's reply to a forwarded message looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    Describe,
    Close,
    Execute,
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery.
    Simple,
}

/// Bookkeeping to reverse if the message it belongs to never takes effect
/// (an error made the server skip it).
#[derive(Debug, Clone)]
pub enum Undo {
    /// The server does not hold this statement after all.
    ServerForget(u64),
    /// The client's name was not created after all.
    ClientForget(Vec<u8>),
    /// The client's name was not closed after all.
    ClientRestore(Vec<u8>, Arc<Statement>),
    /// The server still holds this statement (an eviction was skipped).
    ServerRestore(Arc<Statement>),
    /// A Parse of the unnamed statement (this client's generation) failed or
    /// was skipped: neither the client nor the server has it.
    UnnamedLost(u64),
}

/// At most two undo records (a message never needs more), kept inline so
/// that tracking a message allocates nothing.
#[derive(Debug, Default)]
pub struct Undos(Option<Undo>, Option<Undo>);

impl Undos {
    pub fn one(u: Undo) -> Self {
        Self(Some(u), None)
    }

    pub fn two(a: Undo, b: Undo) -> Self {
        Self(Some(a), Some(b))
    }
}

impl IntoIterator for Undos {
    type Item = Undo;
    type IntoIter = std::iter::Chain<std::option::IntoIter<Undo>, std::option::IntoIter<Undo>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().chain(self.1)
    }
}

#[derive(Debug)]
enum Reply {
    Server {
        kind: Kind,
        /// The message was injected by pgsluice: its success reply is
        /// swallowed (an error still reaches the client: it explains the
        /// failure of the client's own message behind it).
        hidden: bool,
        undo: Undos,
        /// A Describe of this client statement name (or of a portal bound
        /// to it): its RowDescription is what the client knows of it.
        describes: Option<Vec<u8>>,
    },
    Synthetic {
        msg: Bytes,
        undo: Undos,
    },
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// A reply to an injected message: do not relay it.
    Swallow,
    /// The reply does not match what was asked: the stream is not what we
    /// think it is, and the server must not be reused.
    Desync,
}

/// Spare reply queues per thread (see [`Replies::shed`]): enough for the
/// clients of one worker that are mid-request at once, each at most
/// [`SPARE_QUEUE_MAX_LEN`] long (a pipelining client's longer queue is
/// freed).
const SPARE_QUEUES_MAX: usize = 256;
const SPARE_QUEUE_MAX_LEN: usize = 16;

thread_local! {
    static SPARE_QUEUES: std::cell::RefCell<Vec<VecDeque<Reply>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The replies a client is owed, in order.
#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Reply>,
    /// The server hit an error and skips messages until the next Sync.
    skipping: bool,
    /// Undo records of messages that never took effect; drained by the
    /// session.
    pub undone: Vec<Undo>,
    /// The client statement name whose description the message just
    /// accounted for completed; taken by the session.
    pub described: Option<Vec<u8>>,
}

impl Replies {
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives back the queues' memory when nothing is owed (an idle client
    /// keeps no capacity from its last transaction). The reply queue goes
    /// to this thread's spares, for the next request of any client: a new
    /// queue would cost an allocation and a regrowth per transaction.
    pub fn shed(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            let queue = std::mem::take(&mut self.queue);
            if queue.capacity() <= SPARE_QUEUE_MAX_LEN {
                super::spares::give(&SPARE_QUEUES, queue, SPARE_QUEUES_MAX);
            }
        }
        if self.undone.is_empty() && self.undone.capacity() > 0 {
            self.undone = Vec::new();
        }
    }

    /// A queue with room, from this thread's spares when there is one.
    fn ready_queue(&mut self) {
        if self.queue.capacity() == 0 {
            if let Some(spare) = super::spares::take(&SPARE_QUEUES) {
                self.queue = spare;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The server reported an error and skips messages until a Sync.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    pub fn reset(&mut self) {
        self.queue.clear();
        self.skipping = false;
        self.undone.clear();
        self.described = None;
    }

    /// A message forwarded to the server.
    pub fn push_server(&mut self, kind: Kind, hidden: bool, undo: Undos) {
        if self.skipping {
            if kind == Kind::Sync {
                self.skipping = false;
            } else {
                // The server will skip it: it never takes effect.
                self.undone.extend(undo);
                return;
            }
        }
        self.ready_queue();
        self.queue.push_back(Reply::Server {
            kind,
            hidden,
            undo,
            describes: None,
        });
    }

    /// A Describe forwarded to the server, of the client statement `name`
    /// (or a portal bound to it) when known.
    pub fn push_describe(&mut self, name: Option<Vec<u8>>) {
        self.push_server(Kind::Describe, false, Undos::default());
        if let (Some(Reply::Server { describes, .. }), false) =
            (self.queue.back_mut(), self.skipping)
        {
            *describes = name;
        }
    }

    /// A reply pgsluice gives itself, in order.
    pub fn push_synthetic(&mut self, msg: Bytes, undo: Undos) {
        if self.skipping {
            self.undone.extend(undo);
            return;
        }
        self.ready_queue();
        self.queue.push_back(Reply::Synthetic { msg, undo });
    }

    /// Moves synthetic replies now at the head of the queue into `out`.
    pub fn take_ready(&mut self, out: &mut BytesMut) {
        while let Some(Reply::Synthetic { .. }) = self.queue.front() {
            if let Some(Reply::Synthetic { msg, .. }) = self.queue.pop_front() {
                out.extend_from_slice(&msg);
            }
        }
    }

    /// Accounts for one server message (its tag; for ErrorResponse, whether
    /// it is fatal does not matter here).
    pub fn on_server(&mut self, tag: u8) -> Verdict {
        // Asynchronous messages may come at any time.
        if matches!(tag, b'N' | b'A' | b'S') {
            return Verdict::Forward;
        }
        // A fatal error may come with nothing outstanding (a terminated
        // backend); the relay deals with it.
        if tag == b'E' && self.queue.is_empty() {
            return Verdict::Forward;
        }
        // Synthetic replies are emitted as soon as they reach the head, so
        // the head is always a server reply when the server speaks.
        let Some(Reply::Server { kind, hidden, .. }) = self.queue.front() else {
            return Verdict::Desync;
        };
        let (kind, hidden) = (*kind, *hidden);
        if kind == Kind::Simple && hidden {
            // pgsluice's own simple Query: nothing of its answer, errors
            // included, is the client's.
            if tag == b'Z' {
                self.queue.pop_front();
            }
            return Verdict::Swallow;
        }
        let completes = match (kind, tag) {
            (_, b'E') if kind != Kind::Simple => {
                self.fail_head();
                return Verdict::Forward;
            }
            (Kind::Parse, b'1') | (Kind::Bind, b'2') | (Kind::Close, b'3') => true,
            (Kind::Describe, b'T' | b'n') => true,
            (Kind::Describe, b't') => false,
            (Kind::Execute, b'C' | b'I' | b's') => true,
            (Kind::Execute, b'G' | b'W') => {
                // COPY IN: the Sync the client sent behind this Execute is
                // read by the server in copy mode and ignored.
                if let Some(i) = self.queue.iter().position(|r| {
                    matches!(
                        r,
                        Reply::Server {
                            kind: Kind::Sync,
                            ..
                        }
                    )
                }) {
                    self.queue.remove(i);
                }
                false
            }
            (Kind::Execute, b'D' | b'H' | b'd' | b'c') => false,
            (Kind::Sync | Kind::Simple, b'Z') => true,
            (Kind::Simple, _) => false,
            _ => return Verdict::Desync,
        };
        if completes {
            if let Some(Reply::Server { describes, .. }) = self.queue.pop_front() {
                if tag != b'E' {
                    self.described = describes;
                }
            }
            if kind == Kind::Sync {
                self.skipping = false;
            }
            if hidden {
                return Verdict::Swallow;
            }
        }
        Verdict::Forward
    }

    /// The head message failed: it and everything up to the next Sync are
    /// skipped by the server.
    fn fail_head(&mut self) {
        while let Some(front) = self.queue.front() {
            if matches!(
                front,
                Reply::Server {
                    kind: Kind::Sync,
                    ..
                }
            ) {
                return;
            }
            match self.queue.pop_front() {
                Some(Reply::Server { undo, .. } | Reply::Synthetic { undo, .. }) => {
                    self.undone.extend(undo)
                }
                None => break,
            }
        }
        self.skipping = true;
    }
}

/// A client's prepared statements, by the client's names. Boxed, and only
/// while the client has any: most clients never name one, and every idle
/// session carries this struct.
#[derive(Debug, Default)]
pub struct ClientStatements {
    maps: Option<Box<StatementMaps>>,
}

#[derive(Debug, Default)]
struct StatementMaps {
    by_name: HashMap<Vec<u8>, Arc<Statement>>,
    /// Column type OIDs of the last RowDescription the client was sent for
    /// a name (what its driver may decode rows with); only for names in
    /// `by_name`.
    shapes: HashMap<Vec<u8>, Vec<u32>>,
}

impl ClientStatements {
    /// Gives back the maps' memory once the client has no statement left
    /// (a map keeps its table after its last entry is removed).
    pub fn shed(&mut self) {
        if self.is_empty() {
            self.maps = None;
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.maps.as_ref()?.by_name.get(name)
    }

    pub fn insert(&mut self, name: &[u8], stmt: Arc<Statement>) -> Option<Arc<Statement>> {
        let maps = self.maps.get_or_insert_with(Box::default);
        maps.shapes.remove(name);
        maps.by_name.insert(name.to_vec(), stmt)
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let maps = self.maps.as_mut()?;
        maps.shapes.remove(name);
        maps.by_name.remove(name)
    }

    pub fn clear(&mut self) {
        self.maps = None;
    }

    /// Records the row shape the client was just told for `name`.
    pub fn set_shape(&mut self, name: &[u8], types: Vec<u32>) {
        if let Some(maps) = self.maps.as_mut() {
            if maps.by_name.contains_key(name) {
                maps.shapes.insert(name.to_vec(), types);
            }
        }
    }

    /// Whether the client was told any statement's row shape.
    pub fn has_shapes(&self) -> bool {
        self.maps.as_ref().is_some_and(|m| !m.shapes.is_empty())
    }

    /// The row shape the client was last told for `name`, if any.
    pub fn shape(&self, name: &[u8]) -> Option<&[u32]> {
        self.maps.as_ref()?.shapes.get(name).map(Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.maps.as_ref().is_none_or(|m| m.by_name.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic_bytes(r: &mut Replies) -> Vec<u8> {
        let mut out = BytesMut::new();
        r.take_ready(&mut out);
        out.to_vec()
    }

    #[test]
    fn registry_dedups_by_text_and_types() {
        let reg = StatementRegistry::new();
        let a = reg.intern(b"SELECT 1\0\0\0");
        let b = reg.intern(b"SELECT 1\0\0\0");
        let c = reg.intern(b"SELECT 1\0\0\x01\0\0\0\x17");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id, c.id);
        let mut out = BytesMut::new();
        a.write_parse(&mut out);
        let (name, tail) = parse_parse(&out).unwrap();
        assert_eq!(name, a.server_name.as_bytes());
        assert_eq!(tail, b"SELECT 1\0\0\0");
    }

    #[test]
    fn synthetic_reply_waits_for_earlier_server_replies() {
        let mut r = Replies::new();
        r.push_server(Kind::Bind, false, Undos::default());
        r.push_synthetic(Bytes::from_static(PARSE_COMPLETE), Undos::default());
        r.push_server(Kind::Sync, false, Undos::default());
        assert!(
            synthetic_bytes(&mut r).is_empty(),
            "Bind's reply comes first"
        );
        assert_eq!(r.on_server(b'2'), Verdict::Forward);
        assert_eq!(synthetic_bytes(&mut r), PARSE_COMPLETE);
        assert_eq!(r.on_server(b'Z'), Verdict::Forward);
        assert!(r.is_empty());
    }

    #[test]
    fn injected_parse_reply_is_swallowed() {
        let mut r = Replies::new();
        r.push_server(Kind::Parse, true, Undos::one(Undo::ServerForget(7)));
        r.push_server(Kind::Bind, false, Undos::default());
        assert_eq!(r.on_server(b'1'), Verdict::Swallow);
        assert_eq!(r.on_server(b'2'), Verdict::Forward);
        assert!(r.undone.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_undoes() {
        let mut r = Replies::new();
        r.push_server(Kind::Parse, true, Undos::one(Undo::ServerForget(1)));
        r.push_server(Kind::Bind, false, Undos::default());
        r.push_synthetic(
            Bytes::from_static(CLOSE_COMPLETE),
            Undos::one(Undo::ClientForget(b"x".to_vec())),
        );
        r.push_server(Kind::Execute, false, Undos::default());
        // Nothing up to the Sync yet: later messages are skipped as they come.
        assert_eq!(r.on_server(b'E'), Verdict::Forward);
        assert_eq!(r.undone.len(), 2);
        r.push_server(Kind::Parse, false, Undos::one(Undo::ServerForget(2)));
        assert_eq!(r.undone.len(), 3);
        r.push_server(Kind::Sync, false, Undos::default());
        assert!(synthetic_bytes(&mut r).is_empty());
        assert_eq!(r.on_server(b'Z'), Verdict::Forward);
        assert!(r.is_empty());
        // After the Sync, business as usual.
        r.push_synthetic(Bytes::from_static(PARSE_COMPLETE), Undos::default());
        assert_eq!(synthetic_bytes(&mut r), PARSE_COMPLETE);
    }

    #[test]
    fn simple_query_errors_do_not_skip() {
        let mut r = Replies::new();
        r.push_server(Kind::Simple, false, Undos::default());
        for tag in [b'T', b'D', b'C', b'E', b'N'] {
            assert_eq!(r.on_server(tag), Verdict::Forward);
        }
        assert_eq!(r.on_server(b'Z'), Verdict::Forward);
        assert!(r.is_empty());
    }

    #[test]
    fn extended_copy_in_drops_the_early_sync() {
        let mut r = Replies::new();
        r.push_server(Kind::Bind, false, Undos::default());
        r.push_server(Kind::Execute, false, Undos::default());
        r.push_server(Kind::Sync, false, Undos::default());
        assert_eq!(r.on_server(b'2'), Verdict::Forward);
        assert_eq!(r.on_server(b'G'), Verdict::Forward);
        r.push_server(Kind::Sync, false, Undos::default());
        assert_eq!(r.on_server(b'C'), Verdict::Forward);
        assert_eq!(r.on_server(b'Z'), Verdict::Forward);
        assert!(r.is_empty());
    }

    #[test]
    fn injected_simple_query_is_swallowed_whole() {
        let mut r = Replies::new();
        r.push_server(Kind::Simple, true, Undos::default());
        r.push_server(Kind::Simple, false, Undos::default());
        for tag in [b'C', b'E', b'Z'] {
            assert_eq!(r.on_server(tag), Verdict::Swallow);
        }
        assert_eq!(r.on_server(b'N'), Verdict::Forward);
        for tag in [b'T', b'D', b'C', b'Z'] {
            assert_eq!(r.on_server(tag), Verdict::Forward);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn unexpected_reply_is_a_desync() {
        let mut r = Replies::new();
        r.push_server(Kind::Bind, false, Undos::default());
        assert_eq!(r.on_server(b'1'), Verdict::Desync);
        let mut empty = Replies::new();
        assert_eq!(empty.on_server(b'Z'), Verdict::Desync);
    }

    /// Bytes a hashbrown table with this capacity holds (buckets of `T`
    /// plus one control byte each and a 16-byte group tail).
    fn table_bytes<T>(capacity: usize) -> usize {
        if capacity == 0 {
            return 0;
        }
        let buckets = if capacity < 8 {
            (capacity + 1).next_power_of_two()
        } else {
            (capacity * 8 / 7).next_power_of_two()
        };
        buckets * (std::mem::size_of::<T>() + 1) + 16
    }

    fn statement_bytes(s: &Statement) -> usize {
        // Arc header + struct, its server name, its Parse tail (Bytes: the
        // copied bytes plus the shared-storage header a clone creates).
        16 + std::mem::size_of::<Statement>() + s.server_name.capacity() + s.tail.len() + 32
    }

    /// Memory held by statement caches for 1,000 clients × 100 statements,
    /// computed from the structures actually built (sizes of the hash
    /// tables at their real capacities, keys, shared statements, registry,
    /// and 20 servers each holding `max_prepared_statements` = 500).
    /// `cargo test --lib statement_cache_memory -- --nocapture` prints it.
    #[test]
    fn statement_cache_memory() {
        for distinct in [false, true] {
            let reg = StatementRegistry::new();
            let mut clients = Vec::new();
            let mut all = Vec::new();
            for c in 0..1000 {
                let mut cs = ClientStatements::default();
                for i in 0..100 {
                    let text = if distinct {
                        format!(
                            "SELECT id, name, balance FROM accounts WHERE id = $1 AND k = {c} AND j = {i}\0\0\0"
                        )
                    } else {
                        format!(
                            "SELECT id, name, balance FROM accounts WHERE id = $1 AND k = {i}\0\0\0"
                        )
                    };
                    let stmt = reg.intern(text.as_bytes());
                    all.push(stmt.clone());
                    cs.insert(format!("s{i}").as_bytes(), stmt);
                }
                clients.push(cs);
            }
            let mut client_bytes = 0;
            for cs in &clients {
                let maps = cs.maps.as_deref().expect("statements were inserted");
                client_bytes += std::mem::size_of::<ClientStatements>()
                    + std::mem::size_of::<StatementMaps>()
                    + table_bytes::<(Vec<u8>, Arc<Statement>)>(maps.by_name.capacity())
                    + maps.by_name.keys().map(|k| k.capacity()).sum::<usize>();
            }
            let mut seen = std::collections::HashSet::new();
            let mut shared_bytes = 0;
            for s in &all {
                if seen.insert(s.id) {
                    shared_bytes += statement_bytes(s);
                }
            }
            let map = reg.map.lock().unwrap();
            let registry_bytes = table_bytes::<(Bytes, Weak<Statement>)>(map.capacity());
            drop(map);
            let server_bytes = 20 * table_bytes::<(u64, (Arc<Statement>, u64))>(500);
            let total = client_bytes + shared_bytes + registry_bytes + server_bytes;
            println!(
                "{} texts: clients {} KiB ({} B/client), statements {} KiB ({} distinct), \
                 registry {} KiB, 20 servers x 500 {} KiB, total {:.1} MiB",
                if distinct { "distinct" } else { "shared" },
                client_bytes / 1024,
                client_bytes / 1000,
                shared_bytes / 1024,
                seen.len(),
                registry_bytes / 1024,
                server_bytes / 1024,
                total as f64 / (1024.0 * 1024.0)
            );
            assert!(client_bytes / 1000 < 8 * 1024, "per-client map stays small");
        }
    }

    #[test]
    fn message_views_round_trip() {
        let mut out = BytesMut::new();
        write_bind(&mut out, b"p1", "PGSLUICE_3", b"\0\0\0\0\0\0");
        let (portal, stmt, rest) = parse_bind(&out).unwrap();
        assert_eq!(
            (portal, stmt, rest),
            (&b"p1"[..], &b"PGSLUICE_3"[..], &b"\0\0\0\0\0\0"[..])
        );
        out.clear();
        write_target(&mut out, b'D', b'S', "PGSLUICE_3");
        assert_eq!(parse_target(&out), Some((b'S', &b"PGSLUICE_3"[..])));
    }
}
