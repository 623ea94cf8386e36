//! SQL-level prepared statements (`PREPARE name AS …`, `EXECUTE name`,
//! `DEALLOCATE name`) in transaction and statement mode.
//!
//! They live in the server process under the client's own name, so
//! pgsluice keeps, per client, name → the PREPARE statement's text, and
//! per server connection which names it holds with which text. Before a
//! request that uses a name, the server is made to hold the client's
//! version: a hidden simple Query (`DEALLOCATE` of another client's
//! statement by that name if needed, then the client's PREPARE) goes
//! first, and its whole answer is swallowed. A name the client never
//! prepared but the server holds for someone else is answered with
//! PostgreSQL's 26000, so no client can run another's statement.
//!
//! PREPAREs are recorded optimistically when forwarded; at the next release
//! point the server's `pg_prepared_statements` confirms which exist (see
//! `state.rs`), so a failed PREPARE leaves no trace.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use super::Session;
use crate::frontend::effects::SqlPrepared;
use crate::frontend::statements::{self, Kind, Undos};
use crate::protocol::sqlstate;

/// A client's SQL-level prepared statements: name → PREPARE text. Boxed,
/// and only while there are any (every idle session carries this).
#[derive(Debug, Default)]
// The box is the point: 8 bytes in the session instead of the map's 48.
#[allow(clippy::box_collection)]
pub(super) struct SqlNames(Option<Box<std::collections::HashMap<String, Arc<str>>>>);

impl SqlNames {
    pub fn get(&self, name: &str) -> Option<&Arc<str>> {
        self.0.as_ref()?.get(name)
    }

    pub fn insert(&mut self, name: String, text: Arc<str>) {
        self.0.get_or_insert_with(Box::default).insert(name, text);
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(map) = self.0.as_mut() {
            map.remove(name);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|m| m.is_empty())
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// Gives back the map once it is empty.
    pub fn shed(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

fn identifier(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl Session {
    /// Makes the attached server hold this client's versions of the names
    /// `ops` use, writing a hidden Query into `sout` if it must (only when
    /// `can_inject`: at the start of a request). `Err` carries the error
    /// to answer instead of the request.
    pub(super) fn prepare_sql_names(
        &mut self,
        ops: &[SqlPrepared],
        can_inject: bool,
        now: Instant,
    ) -> Result<(), Bytes> {
        if ops.is_empty() {
            return Ok(());
        }
        let Some(server) = self.server.as_deref_mut() else {
            return Ok(());
        };
        // Refusals first, before any bookkeeping changes.
        let mut prepared_here: Vec<&str> = Vec::new();
        let mut inject_needed = false;
        for op in ops {
            match op {
                SqlPrepared::Prepare { name, .. } => {
                    match self.sql_prepared.get(name) {
                        Some(text) => inject_needed |= server.sql_prepared.get(name) != Some(text),
                        None => inject_needed |= server.sql_prepared.contains_key(name),
                    }
                    prepared_here.push(name);
                }
                SqlPrepared::Execute(name) | SqlPrepared::Deallocate(name) => {
                    match self.sql_prepared.get(name) {
                        Some(text) => inject_needed |= server.sql_prepared.get(name) != Some(text),
                        None if prepared_here.contains(&name.as_str()) => {}
                        None if server.sql_prepared.contains_key(name) => {
                            return Err(statements::statement_error(
                                sqlstate::INVALID_SQL_STATEMENT_NAME,
                                &format!("prepared statement \"{name}\" does not exist"),
                            ));
                        }
                        None => {}
                    }
                }
                SqlPrepared::DeallocateAll => {}
            }
        }
        if inject_needed && !can_inject {
            return Err(statements::statement_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "an SQL-level prepared statement used in the middle of an extended-protocol \
                 batch cannot be moved to this server; send it as its own request",
            ));
        }
        let mut inject = String::new();
        for op in ops {
            match op {
                SqlPrepared::Prepare { name, text } => {
                    match self.sql_prepared.get(name) {
                        // The server answers 42P05 itself, once it holds ours.
                        Some(ours) => {
                            if server.sql_prepared.get(name) != Some(ours) {
                                if server.sql_prepared.contains_key(name) {
                                    inject.push_str(&format!("DEALLOCATE {};", identifier(name)));
                                }
                                inject.push_str(ours);
                                inject.push(';');
                                server.sql_prepared.insert(name.clone(), ours.clone());
                            }
                        }
                        None => {
                            if server.sql_prepared.remove(name).is_some() {
                                inject.push_str(&format!("DEALLOCATE {};", identifier(name)));
                            }
                            let text: Arc<str> = Arc::from(text.as_str());
                            self.sql_prepared.insert(name.clone(), text.clone());
                            server.sql_prepared.insert(name.clone(), text);
                            self.state.note_sql_prepare(name);
                        }
                    }
                }
                SqlPrepared::Execute(name) | SqlPrepared::Deallocate(name) => {
                    if let Some(ours) = self.sql_prepared.get(name) {
                        if server.sql_prepared.get(name) != Some(ours) {
                            if server.sql_prepared.contains_key(name) {
                                inject.push_str(&format!("DEALLOCATE {};", identifier(name)));
                            }
                            inject.push_str(ours);
                            inject.push(';');
                            server.sql_prepared.insert(name.clone(), ours.clone());
                        }
                    }
                    if matches!(op, SqlPrepared::Deallocate(_)) {
                        self.sql_prepared.remove(name);
                        server.sql_prepared.remove(name);
                        self.state.note_sql_change();
                    }
                }
                SqlPrepared::DeallocateAll => {
                    // The CommandComplete clears both maps (and the
                    // protocol-level statements, as PostgreSQL does).
                    self.state.note_sql_change();
                }
            }
        }
        if !inject.is_empty() {
            let mut q = BytesMut::with_capacity(inject.len() + 6);
            q.put_u8(b'Q');
            q.put_i32((inject.len() + 5) as i32);
            q.put_slice(inject.as_bytes());
            q.put_u8(0);
            self.sout.extend_from_slice(&q);
            // A simple Query destroys the server's unnamed statement.
            server.unnamed_owner = None;
            self.relay.on_client_tag(b'Q', now);
            self.replies
                .push_server(Kind::Simple, true, Undos::default());
        }
        Ok(())
    }
}
