//! A session at rest, without a task: what a parked client keeps.
//!
//! A client idle between requests for `park_idle_clients_after` is asked to
//! park (see `frontend/park.rs`). If it is at rest (no server, no bytes or
//! replies in flight, nothing half-done in its routing or session state) its
//! task ends: the lasting part of the session ([`Kept`]) and the socket,
//! taken out of tokio, wait in the parking lot. Its next message, its
//! disconnection, a kill or a shutdown gives it a task again, with the
//! request-time state ([`Session::assemble`]) fresh, as after any release.
//! The client sees nothing of this.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::Instrument;

use super::{Session, route::ClientRoute, shard::ShardRoute, sql_prepared::SqlNames};
use crate::config::PoolMode;
use crate::frontend::{ClientHandle, ClientInfo, ClientParams};
use crate::pool::NodePools;
use crate::proxy::{Admitted, ClientPermit, Phase, Shared};
use crate::tls::ClientStream;

/// The part of a [`Session`] that outlives a request: who the client is,
/// where its requests go, and what it has prepared.
pub(super) struct Kept {
    pub(super) pools: NodePools,
    pub(super) admitted: Admitted,
    pub(super) client: ClientHandle,
    pub(super) received: u64,
    pub(super) generation: u64,
    pub(super) node: u8,
    pub(super) route: Option<Box<ClientRoute>>,
    pub(super) shard: Option<Box<ShardRoute>>,
    pub(super) mode: PoolMode,
    pub(super) params: ClientParams,
    pub(super) tracked: bool,
    pub(super) statements: super::ClientStatements,
    pub(super) sql_prepared: SqlNames,
    /// Boxed: 32 bytes less for the many parked clients without one.
    pub(super) unnamed: Option<Box<(u64, Bytes)>>,
    pub(super) unnamed_plain: bool,
    pub(super) unnamed_generation: u64,
    pub(super) portal_statement: Box<[u8]>,
}

/// A parked client: its socket (out of tokio) and its lasting state.
pub struct Parked {
    tcp: std::net::TcpStream,
    permit: ClientPermit,
    kept: Kept,
}

impl Parked {
    pub fn socket(&self) -> &std::net::TcpStream {
        &self.tcp
    }

    pub fn client(&self) -> &ClientInfo {
        &self.kept.client
    }

    /// Gives the client a task again (on the current runtime), to serve
    /// what woke it: a message, its disconnection, a kill or a shutdown.
    pub fn resume(self, shared: &Arc<Shared>) {
        let Parked { tcp, permit, kept } = self;
        kept.client.unparked();
        match tokio::net::TcpStream::from_std(tcp) {
            Ok(tcp) => {
                let id = &kept.client.id;
                let span = tracing::debug_span!(
                    "client",
                    peer = %id.peer,
                    user = %id.user,
                    database = %id.database,
                    client_id = kept.client.pid
                );
                // The live configuration, not the one it parked with.
                let session = Session::assemble(kept, None, BytesMut::new(), shared.clone());
                tokio::spawn(
                    session
                        .run(ClientStream::Plain(tcp), permit)
                        .instrument(span),
                );
            }
            Err(e) => {
                // The runtime refused the socket: the session ends here
                // (closing the socket), as if the client had gone.
                tracing::warn!(error = %e, "could not resume a parked client");
            }
        }
    }
}

impl Session {
    /// At rest between requests: nothing a task would still have to do
    /// and nothing that a fresh [`Session::assemble`] would lose.
    pub(in crate::frontend) fn parkable(&self) -> bool {
        *self.phase.borrow() < Phase::Draining
            && self.config.general.park_idle_clients_after.is_some()
            && self.server.is_none()
            && self.cbuf.is_empty()
            && self.cscan.at_boundary()
            && self.held.is_none()
            && self.window.is_none()
            && self.on_node.is_none()
            && !self.rollback_pending
            && !self.client_skip
            && !self.batch_was_open
            && !self.replanned
            && self.mismatched.is_empty()
            && self.replies.is_empty()
            && !self.replies.skipping()
            && self.relay.at_boundary()
            && self.state.at_rest()
            && self.shard.as_deref().is_none_or(ShardRoute::at_rest)
    }

    /// Ends the session's task and hands the client to the parking lot.
    /// Called with the session at rest ([`Session::parkable`]).
    pub(in crate::frontend) fn park(self, client: ClientStream, permit: ClientPermit) {
        let ClientStream::Plain(tcp) = client else {
            // Never asked of a TLS client; end it if it happens.
            return;
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "could not take an idle client out of the runtime");
                return;
            }
        };
        let shared = self.shared.clone();
        let parked = Parked {
            tcp,
            permit,
            kept: self.into_kept(),
        };
        shared.parking.park(parked, &shared);
    }

    /// The lasting part; the rest (empty between requests) is dropped.
    fn into_kept(self) -> Kept {
        let Session {
            cbuf: _,
            out: _,
            shared: _,
            pools,
            node,
            route,
            shard,
            _admitted: admitted,
            client,
            received,
            on_node: _,
            primary_wrote: _,
            held: _,
            mode,
            params,
            server: _,
            relay: _,
            cscan: _,
            sscan: _,
            phase: _,
            rollback_pending: _,
            query_cancelled: _,
            tracked,
            statements,
            replies: _,
            sout: _,
            unnamed,
            unnamed_plain,
            unnamed_generation,
            client_skip: _,
            state: _,
            sql_prepared,
            batch_was_open: _,
            window: _,
            replanned: _,
            portal_statement,
            mismatched: _,
            generation,
            // Taken afresh when resumed (16 bytes less per parked client).
            config: _,
            config_generation: _,
        } = self;
        Kept {
            pools,
            admitted,
            client,
            received,
            generation,
            node: u8::try_from(node).unwrap_or(0),
            route,
            shard,
            mode,
            params,
            tracked,
            statements,
            sql_prepared,
            unnamed: unnamed.map(Box::new),
            unnamed_plain,
            unnamed_generation,
            portal_statement: portal_statement.into_boxed_slice(),
        }
    }
}
