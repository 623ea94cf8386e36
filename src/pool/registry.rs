//! The set of pools: per database and user, one pool per node (index 0 is
//! the primary, then the replicas in configuration order), created on first
//! use.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::{Gate, Pool, lock};
use crate::backend::{Credentials, LoginSpec};
use crate::config::{Database, User};
use crate::tls::{TlsContext, TlsHandle};

/// One user's pools on every node of a database.
pub type NodePools = Arc<[Arc<Pool>]>;

/// A (database, user) and its pools on every node (index 0: the primary).
#[derive(Clone)]
pub struct PoolEntry {
    pub database: String,
    pub user: String,
    pub pools: NodePools,
}

/// The name pgsluice gives node `index` of a database in logs, errors, the
/// admin console and metrics: `primary`, `replica1`, `replica2`, ….
pub fn node_name(index: usize) -> String {
    if index == 0 {
        "primary".to_owned()
    } else {
        format!("replica{index}")
    }
}

pub struct Pools {
    /// database → user → pools (two levels so a lookup allocates nothing).
    map: Mutex<HashMap<String, HashMap<String, NodePools>>>,
    /// Each database's PAUSE/DISABLE switches, created on first use.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    conn_ids: Arc<AtomicU64>,
    /// TLS towards the servers, shared with every login spec.
    tls: TlsHandle,
}

impl Default for Pools {
    fn default() -> Self {
        Self::new(TlsContext::disabled().handle())
    }
}

impl Pools {
    pub fn new(tls: TlsHandle) -> Self {
        Self {
            map: Mutex::default(),
            gates: Mutex::default(),
            conn_ids: Arc::default(),
            tls,
        }
    }

    /// The pools of `user` on every node of `db`, created on first use
    /// (shard 0's for a sharded database).
    pub fn for_user(&self, db: &Database, user: &User) -> NodePools {
        if db.sharding.is_some() {
            return self.for_shard(db, 0, user);
        }
        self.for_group(db, &db.name, None, &db.primary, &db.replicas, user)
    }

    /// The pools of `user` on every node of shard `shard` of a sharded
    /// database (labels `NAME/USER@shardN.primary`), created on first use.
    /// An unsharded database has one shard, its own nodes.
    pub fn for_shard(&self, db: &Database, shard: usize, user: &User) -> NodePools {
        match db.sharding.as_ref().and_then(|s| s.shards.get(shard)) {
            Some(nodes) => self.for_group(
                db,
                &shard_group(&db.name, shard),
                Some(shard),
                &nodes.primary,
                &nodes.replicas,
                user,
            ),
            None => self.for_group(db, &db.name, None, &db.primary, &db.replicas, user),
        }
    }

    fn for_group(
        &self,
        db: &Database,
        group: &str,
        shard: Option<usize>,
        primary: &crate::config::ServerAddr,
        replicas: &[crate::config::ServerAddr],
        user: &User,
    ) -> NodePools {
        let mut map = lock(&self.map);
        if let Some(p) = map.get(group).and_then(|users| users.get(&user.name)) {
            return p.clone();
        }
        let gate = self.gate(&db.name);
        let pools: NodePools = std::iter::once(primary)
            .chain(replicas.iter())
            .enumerate()
            .map(|(i, addr)| {
                let spec = LoginSpec {
                    addr: addr.clone(),
                    user: user.name.clone(),
                    credentials: Credentials::configured(crate::config::Config::server_credential(
                        user,
                    )),
                    database: db.dbname.clone(),
                    connect_timeout: db.pool.server_connect_timeout,
                    tls: self.tls.clone(),
                };
                let node = match shard {
                    None => node_name(i),
                    Some(s) => format!("shard{s}.{}", node_name(i)),
                };
                let label = format!("{}/{}@{node}", db.name, user.name);
                Pool::new(
                    label,
                    spec,
                    db.pool.clone(),
                    self.conn_ids.clone(),
                    gate.clone(),
                )
            })
            .collect();
        map.entry(group.to_owned())
            .or_default()
            .insert(user.name.clone(), pools.clone());
        pools
    }

    /// The primary's pool for `db` and `user`.
    pub fn primary(&self, db: &Database, user: &User) -> Arc<Pool> {
        self.for_user(db, user)[0].clone()
    }

    /// Node `index` of `database` (or of a shard's group, see
    /// [`shard_group`]) answers again: let its pools try logging
    /// in at once instead of waiting out `server_login_retry`.
    pub fn node_reachable(&self, database: &str, index: usize) {
        let map = lock(&self.map);
        for pools in map.get(database).into_iter().flat_map(|u| u.values()) {
            if let Some(p) = pools.get(index) {
                p.forget_login_failure();
            }
        }
    }

    /// The PAUSE/DISABLE switches of database `name`.
    pub fn gate(&self, name: &str) -> Arc<Gate> {
        lock(&self.gates)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Every (database, user) with pools, sorted by database then user.
    pub fn entries(&self) -> Vec<PoolEntry> {
        let mut out: Vec<PoolEntry> = lock(&self.map)
            .iter()
            .flat_map(|(db, users)| {
                users.iter().map(|(user, pools)| PoolEntry {
                    database: db.clone(),
                    user: user.clone(),
                    pools: pools.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        out
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.map)
            .values()
            .flat_map(|users| users.values().flat_map(|p| p.iter().cloned()))
            .collect()
    }

    pub fn close_all(&self) {
        for p in self.all() {
            p.close();
        }
    }
}

/// The name of shard `shard` of database `database` as a replication group
/// (its pools' key and its cluster's name): `NAME.shardN`.
pub fn shard_group(database: &str, shard: usize) -> String {
    format!("{database}.shard{shard}")
}
