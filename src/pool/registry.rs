//! The set of pools: per database and user, one pool per node (index 0 is
//! the primary, then the replicas in configuration order), created on first
//! use.
//!
//! The registry follows the live configuration: [`Pools::reconfigure`]
//! (a reload) updates every pool in place, adds pools for new replicas and
//! forgets those of removed databases, users and replicas. A forgotten pool
//! still serves the clients that hold it (they finish their work); it
//! closes its connections when the last of them is gone.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::{Gate, Pool, lock};
use crate::backend::{Credentials, LoginSpec};
use crate::config::{Config, Database, ServerAddr, User};
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

#[derive(Default)]
struct Registry {
    /// group (a database, or a shard's [`shard_group`]) → user → pools (two
    /// levels so a lookup allocates nothing).
    map: HashMap<String, HashMap<String, NodePools>>,
    /// The configuration pools are built from, when set: a login that read
    /// an older one still gets pools of the current topology.
    config: Option<Arc<Config>>,
}

pub struct Pools {
    inner: Mutex<Registry>,
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

/// What a reload did to the pools.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolChanges {
    /// `db/user@node` pools whose connections are being replaced (address,
    /// database or credential changed).
    pub replaced: Vec<String>,
    /// `db/user@node` pools no longer used by new clients.
    pub removed: Vec<String>,
    /// `db/user@node` pools added for new replicas.
    pub added: Vec<String>,
}

impl Pools {
    pub fn new(tls: TlsHandle) -> Self {
        Self {
            inner: Mutex::default(),
            gates: Mutex::default(),
            conn_ids: Arc::default(),
            tls,
        }
    }

    /// The login specs of `user` on the nodes `primary` + `replicas` of
    /// `db`; `keep` carries the credentials clients taught the previous
    /// pools.
    fn specs(
        &self,
        db: &Database,
        nodes: (&ServerAddr, &[ServerAddr]),
        user: &User,
        keep: Option<&Credentials>,
    ) -> Vec<LoginSpec> {
        let configured = Config::server_credential(user);
        let credentials = match keep {
            Some(c) if c.configured == configured => c.clone(),
            _ => Credentials::configured(configured),
        };
        std::iter::once(nodes.0)
            .chain(nodes.1.iter())
            .map(|addr| LoginSpec {
                addr: addr.clone(),
                user: user.name.clone(),
                credentials: credentials.clone(),
                database: db.dbname.clone(),
                connect_timeout: db.pool.server_connect_timeout,
                tls: self.tls.clone(),
            })
            .collect()
    }

    /// The pools of `user` on every node of `db`, created on first use
    /// (shard 0's for a sharded database). When the registry follows a
    /// configuration, the database and user are taken from it (the
    /// caller's copy may predate a reload).
    pub fn for_user(&self, db: &Database, user: &User) -> NodePools {
        if db.sharding.is_some() {
            return self.for_shard(db, 0, user);
        }
        self.for_group(db, None, user)
    }

    /// The pools of `user` on every node of shard `shard` of a sharded
    /// database (labels `NAME/USER@shardN.primary`), created on first use.
    /// An unsharded database has one shard, its own nodes.
    pub fn for_shard(&self, db: &Database, shard: usize, user: &User) -> NodePools {
        let exists = db.sharding.as_ref().is_some_and(|s| shard < s.shards.len());
        self.for_group(db, exists.then_some(shard), user)
    }

    fn for_group(&self, db: &Database, shard: Option<usize>, user: &User) -> NodePools {
        let group = match shard {
            Some(s) => shard_group(&db.name, s),
            None => db.name.clone(),
        };
        let mut reg = lock(&self.inner);
        if let Some(p) = reg.map.get(&group).and_then(|users| users.get(&user.name)) {
            return p.clone();
        }
        let current = reg.config.clone();
        let db = current
            .as_ref()
            .and_then(|c| c.databases.get(&db.name))
            .unwrap_or(db);
        let user = current
            .as_ref()
            .and_then(|c| c.users.get(&user.name))
            .unwrap_or(user);
        let nodes = match (shard, db.sharding.as_ref()) {
            (Some(s), Some(sharding)) => match sharding.shards.get(s) {
                Some(n) => (&n.primary, n.replicas.as_slice()),
                None => (&db.primary, db.replicas.as_slice()),
            },
            _ => (&db.primary, db.replicas.as_slice()),
        };
        let gate = self.gate(&db.name);
        let pools: NodePools = self
            .specs(db, nodes, user, None)
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
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
        reg.map
            .entry(group)
            .or_default()
            .insert(user.name.clone(), pools.clone());
        pools
    }

    /// The current pools of `user` on `database`, if any client created
    /// them (sessions pick up a reloaded topology from here).
    pub fn get(&self, database: &str, user: &str) -> Option<NodePools> {
        lock(&self.inner)
            .map
            .get(database)
            .and_then(|u| u.get(user))
            .cloned()
    }

    /// The primary's pool for `db` and `user`.
    pub fn primary(&self, db: &Database, user: &User) -> Arc<Pool> {
        self.for_user(db, user)[0].clone()
    }

    /// Makes `config` the one pools follow: existing pools are updated in
    /// place (settings at once; connections to a changed address, database
    /// or credential replaced as they become idle), pools are added for new
    /// replicas, and pools of removed databases, users and replicas are
    /// forgotten. Users not in the config (found by `auth_query`) keep
    /// their pools while `auth_query` is configured. A sharded database's
    /// shard pools keep their nodes (shard lists need a restart) and take
    /// new pool settings.
    pub fn reconfigure(&self, config: Arc<Config>) -> PoolChanges {
        let mut changes = PoolChanges::default();
        let mut reg = lock(&self.inner);
        reg.config = Some(config.clone());
        let map = std::mem::take(&mut reg.map);
        for (group, users) in map {
            let shard_of = config.databases.values().find_map(|db| {
                let sharding = db.sharding.as_ref()?;
                (0..sharding.shards.len())
                    .find(|&s| shard_group(&db.name, s) == group)
                    .map(|_| db)
            });
            if let Some(db) = shard_of {
                for pools in users.values() {
                    for p in pools.iter() {
                        p.reconfigure((*p.spec()).clone(), db.pool.clone());
                    }
                }
                reg.map.insert(group, users);
                continue;
            }
            let db_name = group;
            let Some(db) = config
                .databases
                .get(&db_name)
                .filter(|db| db.sharding.is_none())
            else {
                for pools in users.values() {
                    changes
                        .removed
                        .extend(pools.iter().map(|p| p.label().to_owned()));
                }
                continue;
            };
            let gate = self.gate(&db.name);
            let mut kept = HashMap::new();
            for (user_name, pools) in users {
                let looked_up;
                let user = match config.users.get(&user_name) {
                    Some(u) => u,
                    None if config.auth_query.is_some() => {
                        // Keep the credential auth_query found (and what
                        // clients taught) for this user.
                        looked_up = User {
                            name: user_name.clone(),
                            password: None,
                            server_password: None,
                            max_client_conn: None,
                        };
                        &looked_up
                    }
                    None => {
                        changes
                            .removed
                            .extend(pools.iter().map(|p| p.label().to_owned()));
                        continue;
                    }
                };
                let old_credentials = pools[0].spec().credentials.clone();
                let nodes = (&db.primary, db.replicas.as_slice());
                let specs = if config.users.contains_key(&user_name) {
                    self.specs(db, nodes, user, Some(&old_credentials))
                } else {
                    let mut specs = self.specs(db, nodes, user, None);
                    for s in &mut specs {
                        s.credentials = old_credentials.clone();
                    }
                    specs
                };
                let rebuilt: NodePools = specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, spec)| match pools.get(i) {
                        Some(p) => {
                            if p.reconfigure(spec, db.pool.clone()) {
                                changes.replaced.push(p.label().to_owned());
                            }
                            p.clone()
                        }
                        None => {
                            let label = format!("{db_name}/{user_name}@{}", node_name(i));
                            changes.added.push(label.clone());
                            Pool::new(
                                label,
                                spec,
                                db.pool.clone(),
                                self.conn_ids.clone(),
                                gate.clone(),
                            )
                        }
                    })
                    .collect();
                changes.removed.extend(
                    pools
                        .iter()
                        .skip(rebuilt.len())
                        .map(|p| p.label().to_owned()),
                );
                kept.insert(user_name, rebuilt);
            }
            if !kept.is_empty() {
                reg.map.insert(db_name, kept);
            }
        }
        changes
    }

    /// Node `index` of `database` (or of a shard's group, see
    /// [`shard_group`]) answers again: let its pools try logging
    /// in at once instead of waiting out `server_login_retry`.
    pub fn node_reachable(&self, database: &str, index: usize) {
        let reg = lock(&self.inner);
        for pools in reg.map.get(database).into_iter().flat_map(|u| u.values()) {
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
        let mut out: Vec<PoolEntry> = lock(&self.inner)
            .map
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
        lock(&self.inner)
            .map
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
