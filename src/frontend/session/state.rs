//! Session state that must follow a client across pooled servers
//! (transaction and statement mode), or keep it on one.
//!
//! - Parameters: a request whose text may change a session parameter (see
//!   `frontend/effects.rs`) marks the client; at the next release point,
//!   before the server goes back to the pool, one query captures every
//!   session-level setting with its exact value. The client's wanted
//!   parameters become exactly those, and the server's bookkeeping lists
//!   them, so the next client of this server gets them undone in its
//!   checkout sync. Capturing *after* the request gives PostgreSQL's own
//!   semantics for free: `SET LOCAL` and SETs rolled back are gone by then.
//! - Session-only features: when a request may have created state that
//!   lives beyond the transaction, the same query asks the server whether
//!   any such state exists (listening channels, session advisory locks,
//!   holdable cursors, temporary relations). If so the client is pinned:
//!   the server is not released (and not re-routed) until a later check
//!   finds the state gone, or the client disconnects (the server is then
//!   cleaned with DISCARD ALL). With `session_features = "refuse"` such
//!   statements are answered with 0A000 instead.
//!
//! A client that does none of this pays only the lexical prefilter.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Session;
use crate::backend::QueryOutcome;
use crate::config::SessionFeatures;
use crate::frontend::effects::{Effects, Feature};
use crate::frontend::statements::PreparedStats;
use crate::protocol::{self, Severity, TxStatus, sqlstate};

/// Answers `(NULL, feature)`: the first session-only state this backend
/// holds, or NULL.
const SESSION_STATE_CHECK: &str = "SELECT NULL::text, CASE \
     WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) THEN 'LISTEN' \
     WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
                  AND pid = pg_catalog.pg_backend_pid()) THEN 'session-level advisory locks' \
     WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) THEN 'cursors WITH HOLD' \
     WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class \
                  WHERE relnamespace = pg_catalog.pg_my_temp_schema()) THEN 'temporary tables' \
     END";

/// Answers `('', name)` for every SQL-level prepared statement the server
/// holds.
const SQL_PREPARED_NAMES: &str =
    "SELECT '', name FROM pg_catalog.pg_prepared_statements WHERE from_sql";

/// Closes every pgsluice-named statement on the server (one statement, no
/// rows); the client's own SQL-level statements stay.
const DEALLOCATE_POOLED: &str = "DO $pgsluice$ DECLARE s text; BEGIN \
     FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements \
              WHERE NOT from_sql AND name LIKE 'PGSLUICE\\_%' LOOP \
       EXECUTE pg_catalog.format('DEALLOCATE %I', s); \
     END LOOP; END $pgsluice$;";

/// What happened since the last release point that the pool must know.
#[derive(Debug, Default)]
pub(super) struct SessionState {
    /// A request may have changed session parameters: capture them.
    params_dirty: bool,
    /// Parameter names SET/RESET named since the last capture.
    names: Vec<String>,
    /// A request may have created (or, while pinned, removed) session-only
    /// state: ask the server.
    check_features: bool,
    /// The client keeps its server because it holds this state.
    pub pinned: Option<String>,
    /// SQL-level PREPARE/DEALLOCATE since the last release point: confirm
    /// against `pg_prepared_statements`.
    sql_dirty: bool,
    /// Names PREPAREd since then (recorded optimistically).
    sql_pending: Vec<String>,
    /// PostgreSQL reported a stale cached plan for a pooled statement.
    pub stale_plans: bool,
}

impl SessionState {
    /// Nothing to capture or check, no pin: what a fresh state holds (a
    /// parked session is resumed with one; see `parked.rs`).
    pub fn at_rest(&self) -> bool {
        !self.params_dirty
            && self.names.is_empty()
            && !self.check_features
            && self.pinned.is_none()
            && !self.sql_dirty
            && self.sql_pending.is_empty()
            && !self.stale_plans
    }

    /// Records the effects of a request's text.
    pub fn note(&mut self, fx: &Effects) {
        if fx.params {
            self.params_dirty = true;
            for n in &fx.names {
                if !self.names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
                    self.names.push(n.clone());
                }
            }
        }
        if fx.feature.is_some() {
            self.check_features = true;
        }
    }

    /// A request went to the server while pinned: it may have released the
    /// state.
    pub fn note_request(&mut self) {
        if self.pinned.is_some() {
            self.check_features = true;
        }
    }

    pub fn note_sql_prepare(&mut self, name: &str) {
        self.sql_dirty = true;
        self.sql_pending.push(name.to_owned());
    }

    /// The names PREPAREd since the last release point (a retried request
    /// makes them again).
    pub fn take_sql_pending(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sql_pending)
    }

    pub fn note_sql_change(&mut self) {
        self.sql_dirty = true;
    }

    fn needs_settle(&self) -> bool {
        self.params_dirty || self.check_features || self.sql_dirty || self.stale_plans
    }

    /// The server may carry session state beyond what pgsluice tracks
    /// for the next client: clean it fully before reuse.
    pub fn server_needs_discard(&self) -> bool {
        self.needs_settle() || self.pinned.is_some()
    }
}

/// What to do with the server at a release point.
pub(super) enum Settled {
    Release,
    /// The client is pinned to it.
    Keep,
    /// The capture failed: the server cannot be trusted for another client.
    Broken,
}

impl Session {
    /// Notes a Query or Parse text; returns the error to answer instead
    /// when `session_features = "refuse"` forbids it.
    pub(super) fn note_text(&mut self, fx: &Effects) -> Option<Bytes> {
        if let Some(feature) = fx.feature {
            if self.config.general.session_features == SessionFeatures::Refuse {
                return Some(refusal(feature, self.mode.as_str()));
            }
        }
        self.state.note(fx);
        None
    }

    /// A refused simple Query: its error and ReadyForQuery.
    pub(super) fn refused_query(&self, error: &[u8]) -> Bytes {
        let mut b = BytesMut::from(error);
        protocol::ready_for_query(&mut b, self.relay.tx_status());
        b.freeze()
    }

    /// At a release point: captures session parameters, checks for
    /// session-only state, confirms SQL-level prepared statements and drops
    /// stale pooled statements — whichever a request since the last one
    /// may have changed — in one round trip.
    pub(super) async fn settle(&mut self) -> Settled {
        if !self.tracked || !self.state.needs_settle() {
            return if self.state.pinned.is_some() {
                Settled::Keep
            } else {
                Settled::Release
            };
        }
        let capture = self.state.params_dirty;
        let check = self.state.check_features;
        let sql_names = self.state.sql_dirty;
        let stale = std::mem::take(&mut self.state.stale_plans);
        let mut branches = Vec::new();
        if capture {
            branches.push(self.params.capture_sql(&self.state.names, ""));
        }
        if check {
            branches.push(SESSION_STATE_CHECK.to_owned());
        }
        if sql_names {
            branches.push(SQL_PREPARED_NAMES.to_owned());
        }
        let mut sql = String::new();
        if stale {
            sql.push_str(DEALLOCATE_POOLED);
        }
        sql.push_str(&branches.join(" UNION ALL "));
        let Some(server) = self.server.as_deref_mut() else {
            return Settled::Release;
        };
        if stale {
            // A pooled statement's cached plan went stale (DDL changed what
            // it reads): this server forgets every pgsluice statement, and
            // the next use prepares it afresh.
            let evicted = server.prepared.len() as u64;
            server.prepared.clear();
            self.shared
                .stats
                .prepared
                .evictions
                .fetch_add(evicted, std::sync::atomic::Ordering::Relaxed);
        }
        let mut rows = Vec::new();
        match server
            .query_internal(&sql, super::INTERNAL_QUERY_TIMEOUT, &mut rows)
            .await
        {
            Ok(QueryOutcome::Done(TxStatus::Idle)) => {}
            other => {
                tracing::warn!(outcome = ?other, "capturing session state failed; closing the server");
                return Settled::Broken;
            }
        }
        let mut captured = Vec::new();
        let mut sql_held = Vec::new();
        let mut feature = None;
        for row in rows {
            match (
                row.first().cloned().flatten(),
                row.get(1).cloned().flatten(),
            ) {
                (Some(name), Some(value)) if name.is_empty() => sql_held.push(value),
                (Some(name), Some(value)) => captured.push((name, value)),
                (None, f) => feature = f,
                (Some(_), None) => {}
            }
        }
        if capture {
            self.params.adopt_session(server, &captured);
        }
        if sql_names {
            server.sql_prepared.retain(|n, _| sql_held.contains(n));
            for n in sql_held {
                server
                    .sql_prepared
                    .entry(n)
                    .or_insert_with(|| Arc::from(""));
            }
            for n in self.state.sql_pending.drain(..) {
                if !server.sql_prepared.contains_key(&n) {
                    self.sql_prepared.remove(&n);
                }
            }
        }
        self.state.params_dirty = false;
        self.state.names.clear();
        self.state.check_features = false;
        self.state.sql_dirty = false;
        if check {
            if feature.is_some() && self.state.pinned.is_none() {
                PreparedStats::bump(&self.shared.stats.prepared.pins);
                tracing::debug!(feature = ?feature, "client pinned to its server");
            } else if feature.is_none() && self.state.pinned.is_some() {
                tracing::debug!("session-only state gone; client unpinned");
            }
            self.state.pinned = feature;
        }
        if self.state.pinned.is_some() {
            Settled::Keep
        } else {
            Settled::Release
        }
    }
}

fn refusal(feature: Feature, mode: &str) -> Bytes {
    let mut b = BytesMut::new();
    protocol::error_response(
        &mut b,
        Severity::Error,
        sqlstate::FEATURE_NOT_SUPPORTED,
        &format!(
            "{} cannot be used with pool_mode = {mode}: the next transaction may run on \
             another server (session_features = \"refuse\"; set it to \"pin\" or use \
             pool_mode = session)",
            feature.describe()
        ),
    );
    b.freeze()
}
