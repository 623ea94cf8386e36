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
}

impl SessionState {
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

    fn needs_settle(&self) -> bool {
        self.params_dirty || self.check_features
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
            if self.shared.config.general.session_features == SessionFeatures::Refuse {
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

    /// At a release point: captures session parameters and checks for
    /// session-only state if a request since the last one may have changed
    /// them.
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
        let sql = match (capture, check) {
            (true, true) => {
                let extra = format!(" UNION ALL {SESSION_STATE_CHECK}");
                self.params.capture_sql(&self.state.names, &extra)
            }
            (true, false) => self.params.capture_sql(&self.state.names, ""),
            _ => SESSION_STATE_CHECK.to_owned(),
        };
        let Some(server) = self.server.as_deref_mut() else {
            return Settled::Release;
        };
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
        let mut feature = None;
        for row in rows {
            match (
                row.first().cloned().flatten(),
                row.get(1).cloned().flatten(),
            ) {
                (Some(name), Some(value)) => captured.push((name, value)),
                (None, f) => feature = f,
                (Some(_), None) => {}
            }
        }
        if capture {
            self.params.adopt_session(server, &captured);
        }
        self.state.params_dirty = false;
        self.state.names.clear();
        self.state.check_features = false;
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
