//! The client → server direction in transaction and statement mode: named
//! prepared statements are rewritten to their pooled server-side names,
//! prepared on demand, and answered locally where PostgreSQL's answer is
//! known (see `frontend/statements.rs`).

use std::time::Instant;

use bytes::{Buf, Bytes};

use crate::tls::ClientStream;

use super::{Exit, Session, Step};
use crate::backend::{ServerConn, ServerStatement};
use crate::frontend::effects::{self, Effects};
use crate::frontend::statements::{
    self, CLOSE_COMPLETE, ClientStatements, Kind, PARSE_COMPLETE, PreparedStats, Statement, Undo,
    Undos,
};
use crate::protocol::{self, Segment, sqlstate};

/// The client's unnamed statement: its parse generation and Parse body tail,
/// kept so it can be prepared again on another server.
pub(super) type Unnamed = Option<(u64, Bytes)>;

/// Applies and clears the undo records of messages that never took effect.
pub(super) fn apply_undo(
    server: &mut ServerConn,
    names: &mut ClientStatements,
    unnamed: &mut Unnamed,
    undone: &mut Vec<Undo>,
) {
    for undo in undone.drain(..) {
        match undo {
            Undo::ServerForget(id) => {
                server.prepared.remove(&id);
            }
            Undo::ClientForget(name) => {
                names.remove(&name);
            }
            Undo::ClientRestore(name, stmt) => {
                names.insert(&name, stmt);
            }
            Undo::ServerRestore(stmt) => {
                server.prepared_tick += 1;
                server
                    .prepared
                    .insert(stmt.id, ServerStatement::new(stmt, server.prepared_tick));
            }
            Undo::UnnamedLost(generation) => {
                if unnamed.as_ref().is_some_and(|(g, _)| *g == generation) {
                    *unnamed = None;
                }
                server.unnamed_owner = None;
            }
        }
    }
}

/// The query text of a Parse body tail (query, NUL, parameter types).
pub(super) fn text_of(tail: &[u8]) -> &[u8] {
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    &tail[..end]
}

/// Client messages the tracked relay needs whole.
/// A Query is read whole (it is capped by `max_packet_size`) so its text
/// can be checked for session-state effects.
fn needs_whole(tag: u8) -> bool {
    matches!(tag, b'X' | b'P' | b'B' | b'D' | b'C' | b'Q')
}

impl Session {
    /// Forwards the client messages in `cbuf[..limit]`.
    pub(super) async fn forward_client_tracked(
        &mut self,
        client: &mut ClientStream,
        limit: usize,
    ) -> std::io::Result<Option<Step>> {
        if self.shapes_to_check() {
            // Boxed, like the rare exits below: this future is part of the
            // relay's, which is boxed once per request.
            Box::pin(self.check_shapes(limit)).await;
        }
        let max = self.config.general.max_packet_size;
        let now = Instant::now();
        let cbuf = std::mem::take(&mut self.cbuf);
        let stop = limit.min(cbuf.len());
        self.sout.clear();
        let mut pos = 0;
        let mut end = None;
        let mut protocol_error = None;
        loop {
            match self.cscan.next(&cbuf[pos..stop], max) {
                Ok(Segment::Pass { len }) => {
                    if !self.client_skip {
                        self.sout.extend_from_slice(&cbuf[pos..pos + len]);
                    }
                    pos += len;
                }
                Ok(Segment::Start { header, .. }) if !protocol::is_frontend_message(header.tag) => {
                    protocol_error = Some(protocol::ProtocolError::UnknownMessage(header.tag));
                    break;
                }
                Ok(Segment::Start { header, whole }) => {
                    let tag = header.tag;
                    if needs_whole(tag) && !whole {
                        break;
                    }
                    if tag == b'X' {
                        end = Some(Step::Exit(Exit::Terminated));
                        break;
                    }
                    if self.client_skip && tag != b'S' {
                        // Dropped: PostgreSQL skips up to Sync after an error.
                        pos += self.cscan.pass_partial(header, stop - pos);
                        continue;
                    }
                    if tag == b'Q' {
                        let msg = &cbuf[pos..pos + header.total_len];
                        let fx = effects::scan(text_of(crate::protocol::body(msg)));
                        let refused = self
                            .note_text(&fx)
                            .map_or_else(|| self.prepare_sql_names(&fx.sql, true, now), Err);
                        if let Err(error) = refused {
                            let reply = self.refused_query(&error);
                            self.replies.push_synthetic(reply, Undos::default());
                            pos += header.total_len;
                            continue;
                        }
                        self.state.note_request();
                    }
                    if needs_whole(tag) && tag != b'Q' {
                        let msg = &cbuf[pos..pos + header.total_len];
                        self.batch_was_open = self.relay.batch_open();
                        self.relay.on_client_tag(tag, now);
                        self.rewrite(tag, msg);
                        pos += header.total_len;
                        continue;
                    }
                    let copy_in = self.relay.copy_in();
                    self.relay.on_client_tag(tag, now);
                    match tag {
                        b'E' => self
                            .replies
                            .push_server(Kind::Execute, false, Undos::default()),
                        b'S' if !copy_in => {
                            self.client_skip = false;
                            self.state.note_request();
                            self.replies
                                .push_server(Kind::Sync, false, Undos::default());
                        }
                        b'Q' => {
                            // A simple Query destroys the unnamed statement.
                            self.unnamed = None;
                            if let Some(server) = self.server.as_deref_mut() {
                                server.unnamed_owner = None;
                            }
                            self.replies
                                .push_server(Kind::Simple, false, Undos::default());
                        }
                        b'F' => self
                            .replies
                            .push_server(Kind::Simple, false, Undos::default()),
                        _ => {}
                    }
                    let n = self.cscan.pass_partial(header, stop - pos);
                    self.sout.extend_from_slice(&cbuf[pos..pos + n]);
                    pos += n;
                }
                Ok(Segment::NeedMore) => break,
                Err(e) => {
                    protocol_error = Some(e);
                    break;
                }
            }
        }
        self.cbuf = cbuf;
        self.cbuf.advance(pos);
        let server_ok = self.flush_to_server().await;
        // Synthetic replies with nothing owed before them go out now (into
        // the retry window while one is open: a retried request repeats them).
        self.out.clear();
        self.replies.take_ready(&mut self.out);
        if !self.out.is_empty() {
            match self.window.as_mut() {
                Some(w) if w.failed.is_some() && w.failed != Some(super::window::Retry::Replan) => {
                }
                Some(w) => w.held.extend_from_slice(&self.out),
                None => client.write_all(&self.out).await?,
            }
        }
        if let Some(e) = protocol_error {
            let message = e.to_string();
            return Box::pin(self.close_with(client, e.sqlstate(), &message))
                .await
                .map(Some);
        }
        if !server_ok {
            return Box::pin(self.server_lost(client)).await.map(Some);
        }
        Ok(end)
    }

    /// Writes the rewritten bytes to the server; false if it is gone.
    async fn flush_to_server(&mut self) -> bool {
        if let Some(server) = self.server.as_deref_mut() {
            apply_undo(
                server,
                &mut self.statements,
                &mut self.unnamed,
                &mut self.replies.undone,
            );
            if self.sout.is_empty() {
                return true;
            }
            return server.stream.write_all(&self.sout).await.is_ok();
        }
        false
    }

    /// Parse, Bind, Describe and Close: rewritten, injected or answered here.
    fn rewrite(&mut self, tag: u8, msg: &[u8]) {
        match tag {
            b'P' => self.on_parse(msg),
            b'B' => {
                let kind = Kind::Bind;
                match statements::parse_bind(msg) {
                    Some((portal, b"", _)) => {
                        if portal.is_empty() {
                            self.portal_statement.clear();
                        }
                        if !self.ensure_unnamed() {
                            return;
                        }
                        self.sout.extend_from_slice(msg);
                    }
                    Some((_, name, _)) if self.shape_changed(name) => {
                        self.refuse_parse(super::shapes::stale_plan_error());
                        return;
                    }
                    Some((portal, name, rest)) => {
                        if portal.is_empty() {
                            self.portal_statement.clear();
                            self.portal_statement.extend_from_slice(name);
                        }
                        match self.statements.get(name).cloned() {
                            Some(stmt) => {
                                if !stmt.effects.is_none() {
                                    self.state.note(&stmt.effects);
                                    let can_inject = !self.batch_was_open;
                                    if let Err(error) = self.prepare_sql_names(
                                        &stmt.effects.sql,
                                        can_inject,
                                        Instant::now(),
                                    ) {
                                        self.refuse_parse(error);
                                        return;
                                    }
                                }
                                self.ensure_prepared(&stmt);
                                statements::write_bind(
                                    &mut self.sout,
                                    portal,
                                    &stmt.server_name,
                                    rest,
                                );
                            }
                            // Unknown name: the server answers 26000 itself.
                            None => self.sout.extend_from_slice(msg),
                        }
                    }
                    _ => self.sout.extend_from_slice(msg),
                }
                self.replies.push_server(kind, false, Undos::default());
            }
            b'D' => {
                match statements::parse_target(msg) {
                    Some((b'S', b"")) => {
                        if !self.ensure_unnamed() {
                            return;
                        }
                        self.sout.extend_from_slice(msg);
                    }
                    Some((b'S', name)) if self.shape_changed(name) => {
                        self.refuse_parse(super::shapes::stale_plan_error());
                        return;
                    }
                    Some((b'S', name)) => match self.statements.get(name).cloned() {
                        Some(stmt) => {
                            self.ensure_prepared(&stmt);
                            statements::write_target(&mut self.sout, b'D', b'S', &stmt.server_name);
                        }
                        None => self.sout.extend_from_slice(msg),
                    },
                    _ => self.sout.extend_from_slice(msg),
                }
                // What the client will know of a statement's rows.
                let describes = match statements::parse_target(msg) {
                    Some((b'S', name)) if !name.is_empty() => Some(name.to_vec()),
                    Some((b'P', b"")) if !self.portal_statement.is_empty() => {
                        Some(self.portal_statement.clone())
                    }
                    _ => None,
                };
                self.replies.push_describe(describes);
            }
            b'C' => match statements::parse_target(msg) {
                Some((b'S', name)) if !name.is_empty() => {
                    // Closing only forgets the client's name; the pooled
                    // server statement may serve other clients.
                    let undo = self
                        .statements
                        .remove(name)
                        .map(|stmt| Undos::one(Undo::ClientRestore(name.to_vec(), stmt)))
                        .unwrap_or_default();
                    self.replies
                        .push_synthetic(Bytes::from_static(CLOSE_COMPLETE), undo);
                }
                _ => {
                    self.sout.extend_from_slice(msg);
                    self.replies
                        .push_server(Kind::Close, false, Undos::default());
                }
            },
            _ => self.sout.extend_from_slice(msg),
        }
    }

    fn on_parse(&mut self, msg: &[u8]) {
        let Some((name, tail)) = statements::parse_parse(msg) else {
            // Malformed: let the server say so.
            self.sout.extend_from_slice(msg);
            self.replies
                .push_server(Kind::Parse, false, Undos::default());
            return;
        };
        PreparedStats::bump(&self.shared.stats.prepared.client_parses);
        if name.is_empty() {
            // Drivers parse the same text again and again: a text already
            // scanned and found to change nothing is not scanned again.
            let same = self
                .unnamed
                .as_ref()
                .is_some_and(|(_, old)| old[..] == *tail);
            let plain = if same && self.unnamed_plain {
                true
            } else {
                let fx = effects::scan(text_of(tail));
                let can_inject = !self.batch_was_open;
                let refused = self.note_text(&fx).map_or_else(
                    || self.prepare_sql_names(&fx.sql, can_inject, Instant::now()),
                    Err,
                );
                if let Err(error) = refused {
                    self.refuse_parse(error);
                    return;
                }
                fx.is_none()
            };
            PreparedStats::bump(&self.shared.stats.prepared.server_parses);
            // The unnamed statement lives on the server until the next
            // unnamed Parse or simple Query; remember it in case a later
            // request binds it on another server.
            self.unnamed_generation += 1;
            let generation = self.unnamed_generation;
            // Drivers reparse the same text again and again: keep the copy.
            let kept = match self.unnamed.take() {
                Some((_, old)) if old[..] == *tail => old,
                _ => Bytes::copy_from_slice(tail),
            };
            self.unnamed = Some((generation, kept));
            self.unnamed_plain = plain;
            if let Some(server) = self.server.as_deref_mut() {
                server.unnamed_owner = Some((self.client.pid, generation));
            }
            self.sout.extend_from_slice(msg);
            self.replies.push_server(
                Kind::Parse,
                false,
                Undos::one(Undo::UnnamedLost(generation)),
            );
            return;
        }
        if self.statements.get(name).is_some() {
            let message = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(name)
            );
            self.replies.push_synthetic(
                statements::statement_error(sqlstate::DUPLICATE_PREPARED_STATEMENT, &message),
                Undos::default(),
            );
            self.client_skip = true;
            return;
        }
        // Scanned once per distinct text, at intern; the effects count when
        // the statement is bound (only a refusal matters now).
        let stmt = self.shared.statements.intern(tail);
        if stmt.effects.feature.is_some() {
            if let Some(error) = self.note_text(&Effects {
                feature: stmt.effects.feature,
                ..Effects::default()
            }) {
                self.refuse_parse(error);
                return;
            }
        }
        if !stmt.effects.sql.is_empty() {
            // Its Describe already needs the SQL-level statement it names.
            let can_inject = !self.batch_was_open;
            if let Err(error) =
                self.prepare_sql_names(&stmt.effects.sql, can_inject, Instant::now())
            {
                self.refuse_parse(error);
                return;
            }
        }
        self.statements.insert(name, stmt.clone());
        let forget_name = Undo::ClientForget(name.to_vec());
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        if let Some(entry) = server.prepared.get_mut(&stmt.id) {
            server.prepared_tick += 1;
            entry.tick = server.prepared_tick;
            PreparedStats::bump(&self.shared.stats.prepared.cache_hits);
            self.replies
                .push_synthetic(Bytes::from_static(PARSE_COMPLETE), Undos::one(forget_name));
        } else {
            self.make_room();
            let Some(server) = self.server.as_deref_mut() else {
                return;
            };
            stmt.write_parse(&mut self.sout);
            PreparedStats::bump(&self.shared.stats.prepared.server_parses);
            server.prepared_tick += 1;
            server.prepared.insert(
                stmt.id,
                ServerStatement::new(stmt.clone(), server.prepared_tick),
            );
            self.replies.push_server(
                Kind::Parse,
                false,
                Undos::two(Undo::ServerForget(stmt.id), forget_name),
            );
        }
    }

    /// Answers a client's Parse with `error` (session_features = "refuse");
    /// PostgreSQL then skips to the next Sync.
    fn refuse_parse(&mut self, error: Bytes) {
        self.replies.push_synthetic(error, Undos::default());
        self.client_skip = true;
    }

    /// Makes sure the attached server's unnamed statement is this client's,
    /// preparing it there (silently) if another client's or none is there.
    /// False when the client has no unnamed statement: it then gets
    /// PostgreSQL's 26000 instead of running whatever the server holds.
    fn ensure_unnamed(&mut self) -> bool {
        let pid = self.client.pid;
        let Some(server) = self.server.as_deref_mut() else {
            return false;
        };
        match &self.unnamed {
            Some((generation, _)) if server.unnamed_owner == Some((pid, *generation)) => true,
            Some((generation, tail)) => {
                statements::write_unnamed_parse(&mut self.sout, tail);
                PreparedStats::bump(&self.shared.stats.prepared.server_parses);
                server.unnamed_owner = Some((pid, *generation));
                self.replies.push_server(
                    Kind::Parse,
                    true,
                    Undos::one(Undo::UnnamedLost(*generation)),
                );
                true
            }
            None => {
                self.replies.push_synthetic(
                    statements::statement_error(
                        sqlstate::INVALID_SQL_STATEMENT_NAME,
                        "unnamed prepared statement does not exist",
                    ),
                    Undos::default(),
                );
                self.client_skip = true;
                false
            }
        }
    }

    /// Makes sure the attached server holds `stmt`, preparing it there
    /// (silently) first if not.
    fn ensure_prepared(&mut self, stmt: &std::sync::Arc<Statement>) {
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        server.prepared_tick += 1;
        if let Some(entry) = server.prepared.get_mut(&stmt.id) {
            entry.tick = server.prepared_tick;
            return;
        }
        self.make_room();
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        stmt.write_parse(&mut self.sout);
        PreparedStats::bump(&self.shared.stats.prepared.server_parses);
        server.prepared.insert(
            stmt.id,
            ServerStatement::new(stmt.clone(), server.prepared_tick),
        );
        self.replies
            .push_server(Kind::Parse, true, Undos::one(Undo::ServerForget(stmt.id)));
    }

    /// Evicts the least recently used statement from the attached server
    /// when it holds `max_prepared_statements`.
    fn make_room(&mut self) {
        let max = self.config.general.max_prepared_statements;
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        if server.prepared.len() < max {
            return;
        }
        let Some(victim) = server
            .prepared
            .iter()
            .min_by_key(|(_, held)| held.tick)
            .map(|(id, _)| *id)
        else {
            return;
        };
        if let Some(ServerStatement { stmt, .. }) = server.prepared.remove(&victim) {
            PreparedStats::bump(&self.shared.stats.prepared.evictions);
            statements::write_target(&mut self.sout, b'C', b'S', &stmt.server_name);
            self.replies
                .push_server(Kind::Close, true, Undos::one(Undo::ServerRestore(stmt)));
        }
    }
}
