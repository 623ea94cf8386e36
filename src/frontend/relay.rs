//! What the relay knows about a client/server exchange in flight, as a pure
//! state machine fed message tags. It decides when a server may be released:
//! only at ReadyForQuery `I`, with no request unanswered (pipelined clients
//! keep their server until every Sync is answered), no extended-protocol
//! batch left open without Sync, and no COPY in progress.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::{self, ErrorFields, TxStatus};

/// Server message tags the relay needs whole.
pub fn server_tag_inspected(tag: u8) -> bool {
    matches!(tag, b'Z' | b'S' | b'E' | b'G' | b'W')
}

/// Client message tags the relay needs whole.
pub fn client_tag_inspected(tag: u8) -> bool {
    tag == b'X'
}

/// Something a server message means for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerEvent {
    None,
    /// A ReadyForQuery arrived with this status.
    Ready(TxStatus),
    /// A session parameter changed.
    Parameter {
        name: String,
        value: String,
    },
    /// The server reported a fatal error and is about to close.
    Fatal(ErrorFields),
    /// ReadyForQuery without a request outstanding: the stream is not what
    /// we think it is, so this server must never be reused.
    Desync,
}

#[derive(Debug, Clone)]
pub struct RelayState {
    /// Requests sent (Query `Q`, Sync `S`, FunctionCall `F`) awaiting their
    /// ReadyForQuery, oldest first.
    pending: VecDeque<u8>,
    /// Extended-protocol messages sent since the last Sync.
    batch_open: bool,
    /// The open batch ran something (Bind, Execute): it is more than
    /// statements being prepared and described.
    batch_ran: bool,
    copy_in: bool,
    tx: TxStatus,
    /// When the oldest unanswered request was sent (query_timeout).
    pub request_since: Option<Instant>,
    /// When the last ReadyForQuery arrived (idle_transaction_timeout).
    pub ready_since: Instant,
    /// When the transaction in progress sent its first request (stats).
    xact_since: Option<Instant>,
    /// The request the last ReadyForQuery answered took this long, and
    /// ended a transaction of the second duration (stats).
    /// (nanoseconds, `u64::MAX` for none: half the size of the Durations,
    /// in every session.)
    answered: (u64, u64),
    /// The server said it is going away (FATAL) or desynchronised.
    pub server_unusable: bool,
}

impl Default for RelayState {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayState {
    /// Gives back the request queue's memory when nothing is pending (an
    /// idle client keeps no capacity from its last transaction).
    pub fn shed(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
    }

    pub fn new() -> Self {
        Self {
            pending: VecDeque::new(),
            batch_open: false,
            batch_ran: false,
            copy_in: false,
            tx: TxStatus::Idle,
            request_since: None,
            ready_since: Instant::now(),
            xact_since: None,
            answered: (0, u64::MAX),
            server_unusable: false,
        }
    }

    /// How long the request the last ReadyForQuery answered took, and the
    /// transaction it ended, if it ended one (ReadyForQuery `I`).
    pub fn answered(&self) -> (Duration, Option<Duration>) {
        let (query, xact) = self.answered;
        (
            Duration::from_nanos(query),
            (xact != u64::MAX).then(|| Duration::from_nanos(xact)),
        )
    }

    pub fn tx_status(&self) -> TxStatus {
        self.tx
    }

    /// The server is in COPY IN (it ignores Sync and Flush).
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Extended-protocol messages were sent since the last Sync.
    pub fn batch_open(&self) -> bool {
        self.batch_open
    }

    /// An extended batch is open that only prepared, described or closed
    /// statements (asyncpg's Parse, Describe, Flush): nothing ran in it.
    pub fn batch_only_prepares(&self) -> bool {
        self.batch_open && !self.batch_ran && !self.copy_in
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Back to the state of a fresh server attachment, keeping allocations.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.batch_open = false;
        self.batch_ran = false;
        self.copy_in = false;
        self.tx = TxStatus::Idle;
        self.request_since = None;
        self.ready_since = Instant::now();
        self.xact_since = None;
        self.server_unusable = false;
    }

    /// No request outstanding and no batch or COPY open. The transaction may
    /// still be open (see [`RelayState::tx_status`]).
    pub fn quiet(&self) -> bool {
        self.pending.is_empty() && !self.batch_open && !self.copy_in
    }

    /// At a transaction boundary: the server could serve another client.
    pub fn at_boundary(&self) -> bool {
        self.quiet() && self.tx == TxStatus::Idle && !self.server_unusable
    }

    /// The pooler itself brought the server back to idle (e.g. ROLLBACK).
    pub fn force_idle(&mut self) {
        self.tx = TxStatus::Idle;
    }

    /// The pooler itself opened a transaction on the server (a client's
    /// `BEGIN` it answered earlier; see `session/shard.rs`).
    pub fn force_in_transaction(&mut self) {
        self.tx = TxStatus::InTransaction;
    }

    /// Account for a client message about to be forwarded.
    pub fn on_client_tag(&mut self, tag: u8, now: Instant) {
        match tag {
            b'Q' | b'F' => self.request(tag, now),
            // The server ignores Sync and Flush during COPY IN.
            b'S' if !self.copy_in => {
                self.batch_open = false;
                self.batch_ran = false;
                self.request(tag, now);
            }
            b'P' | b'D' | b'C' => {
                self.batch_open = true;
                self.xact_since.get_or_insert(now);
            }
            b'B' | b'E' => {
                self.batch_open = true;
                self.batch_ran = true;
                self.xact_since.get_or_insert(now);
            }
            b'c' | b'f' => self.copy_in = false,
            _ => {}
        }
    }

    fn request(&mut self, tag: u8, now: Instant) {
        if self.pending.is_empty() {
            self.request_since = Some(now);
        }
        if self.xact_since.is_none() {
            self.xact_since = Some(now);
        }
        self.pending.push_back(tag);
    }

    /// Account for a whole server message being relayed.
    pub fn on_server_message(&mut self, tag: u8, msg: &[u8], now: Instant) -> ServerEvent {
        match tag {
            b'Z' => {
                let Some(status) = protocol::parse_ready_for_query(msg) else {
                    self.server_unusable = true;
                    return ServerEvent::Desync;
                };
                if self.pending.pop_front().is_none() {
                    self.server_unusable = true;
                    return ServerEvent::Desync;
                }
                self.copy_in = false;
                self.tx = status;
                self.ready_since = now;
                let query = self
                    .request_since
                    .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                let mut xact = None;
                if status == TxStatus::Idle {
                    xact = self.xact_since.map(|s| now.saturating_duration_since(s));
                    self.xact_since = (!self.pending.is_empty()).then_some(now);
                }
                let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1);
                self.answered = (nanos(query), xact.map_or(u64::MAX, nanos));
                self.request_since = (!self.pending.is_empty()).then_some(now);
                ServerEvent::Ready(status)
            }
            b'S' => match protocol::parse_parameter_status(msg) {
                Some((name, value)) => ServerEvent::Parameter {
                    name: name.to_owned(),
                    value: value.to_owned(),
                },
                None => ServerEvent::None,
            },
            b'E' => {
                let fields = ErrorFields::parse(msg);
                if fields.is_fatal() {
                    self.server_unusable = true;
                    ServerEvent::Fatal(fields)
                } else {
                    ServerEvent::None
                }
            }
            b'G' | b'W' => {
                self.copy_in = true;
                // The server entered COPY IN while running the oldest
                // request. If that is an extended-protocol batch whose Sync
                // the client already sent, the server reads that Sync in copy
                // mode and ignores it: no ReadyForQuery will answer it (the
                // client's Sync after CopyDone gets it instead).
                if self.pending.front() == Some(&b'S') {
                    self.pending.pop_front();
                    // The batch stays open until the client's Sync after
                    // CopyDone/CopyFail: its CommandComplete is still owed.
                    self.batch_open = true;
                }
                ServerEvent::None
            }
            _ => ServerEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn rfq(status: TxStatus) -> BytesMut {
        let mut b = BytesMut::new();
        protocol::ready_for_query(&mut b, status);
        b
    }

    fn z(r: &mut RelayState, status: TxStatus) -> ServerEvent {
        r.on_server_message(b'Z', &rfq(status), Instant::now())
    }

    #[test]
    fn simple_query_releases_at_idle() {
        let mut r = RelayState::new();
        let now = Instant::now();
        r.on_client_tag(b'Q', now);
        assert!(!r.at_boundary());
        assert_eq!(
            z(&mut r, TxStatus::InTransaction),
            ServerEvent::Ready(TxStatus::InTransaction)
        );
        assert!(!r.at_boundary(), "an open transaction keeps its server");
        r.on_client_tag(b'Q', now);
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary());
    }

    #[test]
    fn queries_and_transactions_are_timed() {
        let mut r = RelayState::new();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // BEGIN; SELECT; COMMIT, one Query each.
        r.on_client_tag(b'Q', t0);
        r.on_server_message(b'Z', &rfq(TxStatus::InTransaction), ms(1));
        assert_eq!(r.answered(), (Duration::from_millis(1), None));
        r.on_client_tag(b'Q', ms(5));
        r.on_server_message(b'Z', &rfq(TxStatus::InTransaction), ms(8));
        assert_eq!(r.answered(), (Duration::from_millis(3), None));
        r.on_client_tag(b'Q', ms(10));
        r.on_server_message(b'Z', &rfq(TxStatus::Idle), ms(11));
        assert_eq!(
            r.answered(),
            (Duration::from_millis(1), Some(Duration::from_millis(11)))
        );
        // Two pipelined extended requests: each answer is one query and,
        // outside a transaction block, one transaction.
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            r.on_client_tag(tag, ms(20));
        }
        r.on_server_message(b'Z', &rfq(TxStatus::Idle), ms(22));
        assert_eq!(
            r.answered(),
            (Duration::from_millis(2), Some(Duration::from_millis(2)))
        );
        r.on_server_message(b'Z', &rfq(TxStatus::Idle), ms(25));
        assert_eq!(
            r.answered(),
            (Duration::from_millis(3), Some(Duration::from_millis(3)))
        );
    }

    #[test]
    fn pipelined_syncs_keep_the_server_until_all_answered() {
        let mut r = RelayState::new();
        let now = Instant::now();
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            r.on_client_tag(tag, now);
        }
        z(&mut r, TxStatus::Idle);
        assert!(!r.at_boundary());
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary());
    }

    #[test]
    fn batch_without_sync_keeps_the_server() {
        let mut r = RelayState::new();
        let now = Instant::now();
        for tag in [b'P', b'B', b'E', b'H'] {
            r.on_client_tag(tag, now);
        }
        assert!(!r.at_boundary());
        r.on_client_tag(b'S', now);
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary());
    }

    #[test]
    fn sync_during_copy_in_is_not_a_request() {
        let mut r = RelayState::new();
        let now = Instant::now();
        r.on_client_tag(b'Q', now);
        r.on_server_message(b'G', b"G\0\0\0\x07\0\0\0", now);
        r.on_client_tag(b'd', now);
        r.on_client_tag(b'S', now);
        r.on_client_tag(b'c', now);
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary());
    }

    #[test]
    fn extended_copy_in_with_early_sync_is_counted_once() {
        // tokio-postgres and libpq: Bind, Execute, Sync, then (after
        // CopyInResponse) CopyData, CopyDone, Sync. PostgreSQL ignores the
        // first Sync (read in copy mode) and answers the second.
        let mut r = RelayState::new();
        let now = Instant::now();
        for tag in [b'B', b'E', b'S'] {
            r.on_client_tag(tag, now);
        }
        r.on_server_message(b'G', b"G\0\0\0\x07\0\0\0", now);
        for tag in [b'd', b'd', b'c'] {
            r.on_client_tag(tag, now);
        }
        assert!(
            !r.at_boundary(),
            "CommandComplete and ReadyForQuery still owed"
        );
        r.on_client_tag(b'S', now);
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary(), "pending: {}", r.pending());
    }

    #[test]
    fn extended_copy_in_with_flush_then_sync_after_done() {
        let mut r = RelayState::new();
        let now = Instant::now();
        for tag in [b'P', b'B', b'E', b'H'] {
            r.on_client_tag(tag, now);
        }
        r.on_server_message(b'G', b"G\0\0\0\x07\0\0\0", now);
        for tag in [b'd', b'f', b'S'] {
            r.on_client_tag(tag, now);
        }
        z(&mut r, TxStatus::Idle);
        assert!(r.at_boundary());
    }

    #[test]
    fn unsolicited_ready_marks_server_unusable() {
        let mut r = RelayState::new();
        assert_eq!(z(&mut r, TxStatus::Idle), ServerEvent::Desync);
        assert!(!r.at_boundary());
    }

    #[test]
    fn fatal_error_marks_server_unusable() {
        let mut r = RelayState::new();
        let mut e = BytesMut::new();
        protocol::error_response(&mut e, protocol::Severity::Fatal, "57P01", "bye");
        assert!(matches!(
            r.on_server_message(b'E', &e, Instant::now()),
            ServerEvent::Fatal(_)
        ));
        assert!(r.server_unusable);
    }
}
