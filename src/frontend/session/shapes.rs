//! Row shapes of pooled prepared statements.
//!
//! A client's driver decodes the rows of a statement with the
//! RowDescription it was sent when it described it. PostgreSQL keeps that
//! promise per connection: once DDL changes what a statement returns, every
//! execution of it fails with 0A000 "cached plan must not change result
//! type" until the client prepares it again. Through pgsluice, the client's
//! statement runs on whichever server it gets, prepared there on demand and
//! shared with other clients, so a server can hold it in a newer or older
//! shape than the client was told. pgsluice keeps the promise itself:
//! per client name, the column types the client was last told (from the
//! answers to its Describes); per server statement, the types it returns
//! there when known. Before a request binds or describes a statement whose
//! server shape is unknown or differs from the client's, the server prepares
//! it afresh and describes it in one internal round trip; if the fresh shape
//! is not the client's, the client gets PostgreSQL's 0A000 for that message,
//! as it would without a pooler. Clients that never describe statements
//! (`pgbench -M prepared`) pay nothing.

use std::sync::Arc;

use bytes::BytesMut;

use super::Session;
use crate::backend::{QueryOutcome, ServerStatement};
use crate::frontend::statements::{self, PreparedStats, Statement};
use crate::protocol::{self, TxStatus};

/// PostgreSQL's error for a statement whose result type changed.
pub(super) fn stale_plan_error() -> bytes::Bytes {
    let mut b = BytesMut::new();
    protocol::stale_plan_error(&mut b);
    b.freeze()
}

impl Session {
    /// At the start of a request in `cbuf[..limit]`: makes the attached
    /// server hold, in their current form, the statements the request binds
    /// or describes whose shape there is not known to be the client's, and
    /// notes in `mismatched` the client names whose shape changed.
    /// Whether [`Session::check_shapes`] has anything to do for the
    /// request at the front of `cbuf` (cheap; the check itself is boxed by
    /// its caller).
    pub(super) fn shapes_to_check(&self) -> bool {
        self.statements.has_shapes()
            && !self.relay.batch_open()
            && self.relay.quiet()
            && self.replies.is_empty()
            && self.cscan.at_boundary()
            && !self.client_skip
            && self.relay.tx_status() != TxStatus::Failed
    }

    pub(super) async fn check_shapes(&mut self, limit: usize) {
        if !self.shapes_to_check() {
            return;
        }
        self.mismatched.clear();
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        let max = self.config.general.max_packet_size;
        let buf = &self.cbuf[..limit.min(self.cbuf.len())];
        let mut todo: Vec<(Vec<u8>, Arc<Statement>)> = Vec::new();
        // Names the request closes or parses before using them are new.
        let mut redefined: Vec<&[u8]> = Vec::new();
        let mut pos = 0;
        while let Ok(Some(h)) = protocol::peek_header(&buf[pos..], max) {
            let Some(msg) = buf.get(pos..pos + h.total_len) else {
                break;
            };
            pos += h.total_len;
            let name = match h.tag {
                b'B' => statements::parse_bind(msg).map(|(_, name, _)| name),
                b'D' => match statements::parse_target(msg) {
                    Some((b'S', name)) => Some(name),
                    _ => None,
                },
                b'C' => {
                    if let Some((b'S', name)) = statements::parse_target(msg) {
                        redefined.push(name);
                    }
                    None
                }
                b'P' => {
                    let body = protocol::body(msg);
                    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                    redefined.push(&body[..end]);
                    None
                }
                b'S' | b'Q' | b'H' => break,
                _ => None,
            };
            let Some(name) = name.filter(|n| !n.is_empty() && !redefined.contains(n)) else {
                continue;
            };
            let (Some(stmt), Some(shape)) =
                (self.statements.get(name), self.statements.shape(name))
            else {
                continue;
            };
            let here = server
                .prepared
                .get(&stmt.id)
                .and_then(|s| s.shape.as_deref());
            if here != Some(shape) && !todo.iter().any(|(n, _)| n == name) {
                todo.push((name.to_vec(), stmt.clone()));
            }
        }
        if todo.is_empty() {
            return;
        }
        // Close what the server holds (it may be stale), prepare afresh,
        // describe; evict least recently used statements to make room.
        let mut msgs = BytesMut::new();
        let mut fresh: Vec<Arc<Statement>> = Vec::new();
        for (_, stmt) in &todo {
            if fresh.iter().any(|f| f.id == stmt.id) {
                continue;
            }
            if server.prepared.remove(&stmt.id).is_some() {
                statements::write_target(&mut msgs, b'C', b'S', &stmt.server_name);
            } else if server.prepared.len() >= self.config.general.max_prepared_statements {
                let victim = server
                    .prepared
                    .iter()
                    .min_by_key(|(_, held)| held.tick)
                    .map(|(id, _)| *id);
                if let Some(old) = victim.and_then(|id| server.prepared.remove(&id)) {
                    PreparedStats::bump(&self.shared.stats.prepared.evictions);
                    statements::write_target(&mut msgs, b'C', b'S', &old.stmt.server_name);
                }
            }
            stmt.write_parse(&mut msgs);
            statements::write_target(&mut msgs, b'D', b'S', &stmt.server_name);
            PreparedStats::bump(&self.shared.stats.prepared.server_parses);
            fresh.push(stmt.clone());
        }
        msgs.extend_from_slice(SYNC);
        let mut shapes = Vec::new();
        match server
            .describe_internal(&msgs, super::INTERNAL_QUERY_TIMEOUT, &mut shapes)
            .await
        {
            Ok(QueryOutcome::Done(_)) if shapes.len() == fresh.len() => {
                for (stmt, shape) in fresh.iter().zip(shapes) {
                    server.prepared_tick += 1;
                    let mut held = ServerStatement::new(stmt.clone(), server.prepared_tick);
                    held.shape = Some(shape);
                    server.prepared.insert(stmt.id, held);
                }
                for (name, stmt) in &todo {
                    let here = server
                        .prepared
                        .get(&stmt.id)
                        .and_then(|s| s.shape.as_deref());
                    if here != self.statements.shape(name) {
                        tracing::debug!(
                            statement = %String::from_utf8_lossy(name),
                            "the statement's columns changed since the client described it"
                        );
                        self.mismatched.push(name.clone());
                    }
                }
            }
            Ok(_) => {
                // A Parse failed (say its table is gone): none of them is
                // kept, so the request's own use prepares it and reports
                // PostgreSQL's error in place.
                let mut close = BytesMut::new();
                for stmt in &fresh {
                    statements::write_target(&mut close, b'C', b'S', &stmt.server_name);
                }
                close.extend_from_slice(SYNC);
                let mut none = Vec::new();
                if !matches!(
                    server
                        .describe_internal(&close, super::INTERNAL_QUERY_TIMEOUT, &mut none)
                        .await,
                    Ok(QueryOutcome::Done(_))
                ) {
                    self.relay.server_unusable = true;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "checking statement shapes failed");
                self.relay.server_unusable = true;
            }
        }
    }

    /// Whether the client's statement `name` was found changed (see
    /// `check_shapes`): its Bind or Describe gets PostgreSQL's 0A000.
    pub(super) fn shape_changed(&self, name: &[u8]) -> bool {
        self.mismatched.iter().any(|n| n == name)
    }
}

pub(super) const SYNC: &[u8] = &[b'S', 0, 0, 0, 4];
