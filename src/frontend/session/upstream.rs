//! Following a reload: at a request boundary (no server attached, so never
//! inside a transaction), a session whose configuration, pools and
//! replication group predate the last reload takes the current ones. A client of a removed
//! database or user keeps what it has and finishes with it.

use std::sync::Arc;

use super::Session;
use super::route::{ClientRoute, parse_route_mode};
use crate::config::PoolMode;

impl Session {
    /// Takes the live configuration (timeouts, limits) if a reload happened
    /// since; cheap enough for every request boundary, including those of
    /// a session-mode client that keeps its server.
    pub(super) fn follow_config(&mut self) {
        let generation = self.shared.generation();
        if generation != self.config_generation {
            self.config = arc_swap::Guard::into_inner(self.shared.config());
            self.config_generation = generation;
        }
    }

    /// Takes this client's pools and replication group from the live
    /// configuration if a reload happened since they were taken.
    pub(super) fn follow_reload(&mut self) {
        let generation = self.shared.generation();
        if generation == self.generation || self.server.is_some() {
            return;
        }
        // Timeouts and limits follow the reload in any case.
        self.config = arc_swap::Guard::into_inner(self.shared.config());
        self.config_generation = generation;
        if self.shard.is_some() {
            // A sharded database's shards do not change on reload (its
            // pools take new settings in place).
            self.generation = generation;
            return;
        }
        let (database, user) = (&**self._admitted.database(), &**self._admitted.user());
        let Some(pools) = self.shared.pools.get(database, user) else {
            // Removed database or user: finish with the old pools.
            self.generation = generation;
            return;
        };
        let group = self.shared.clusters().get(database).cloned();
        if pools.len() != group.as_ref().map_or(1, |c| c.nodes().len()) {
            // A reload is being applied right now: look again next time.
            return;
        }
        let cluster = group.filter(|c| self.mode != PoolMode::Session && c.nodes().len() > 1);
        self.generation = generation;
        self.pools = pools;
        self.node = 0;
        match (cluster, self.route.as_deref_mut()) {
            (Some(c), Some(route)) => {
                if !Arc::ptr_eq(&c, &route.cluster) {
                    route.cluster = c;
                    route.retry = None;
                }
            }
            (Some(c), None) => {
                let startup = self.params.own("pgsluice.route").and_then(parse_route_mode);
                self.route = Some(Box::new(ClientRoute::new(c, startup)));
            }
            (None, _) => self.route = None,
        }
    }
}
