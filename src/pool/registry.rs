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

use super::{Pool, lock};
use crate::backend::{Credentials, LoginSpec};
use crate::config::{Config, Database, User};
use crate::tls::{TlsContext, TlsHandle};

/// One user's pools on every node of a database.
pub type NodePools = Arc<[Arc<Pool>]>;

#[derive(Default)]
struct Registry {
    /// database → user → pools (two levels so a lookup allocates nothing).
    map: HashMap<String, HashMap<String, NodePools>>,
    /// The configuration pools are built from, when set: a login that read
    /// an older one still gets pools of the current topology.
    config: Option<Arc<Config>>,
}

pub struct Pools {
    inner: Mutex<Registry>,
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

fn node_name(i: usize) -> String {
    if i == 0 {
        "primary".to_owned()
    } else {
        format!("replica{i}")
    }
}

impl Pools {
    pub fn new(tls: TlsHandle) -> Self {
        Self {
            inner: Mutex::default(),
            conn_ids: Arc::default(),
            tls,
        }
    }

    /// The login specs of `user` on every node of `db`; `learned` carries
    /// the credentials clients taught the previous pools.
    fn specs(&self, db: &Database, user: &User, keep: Option<&Credentials>) -> Vec<LoginSpec> {
        let configured = Config::server_credential(user);
        let credentials = match keep {
            Some(c) if c.configured == configured => c.clone(),
            _ => Credentials::configured(configured),
        };
        std::iter::once(&db.primary)
            .chain(db.replicas.iter())
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

    fn build(&self, db: &Database, user: &User) -> NodePools {
        self.specs(db, user, None)
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let label = format!("{}/{}@{}", db.name, user.name, node_name(i));
                Pool::new(label, spec, db.pool.clone(), self.conn_ids.clone())
            })
            .collect()
    }

    /// The pools of `user` on every node of `db`, created on first use.
    /// When the registry follows a configuration, the database and user
    /// are taken from it (the caller's copy may predate a reload).
    pub fn for_user(&self, db: &Database, user: &User) -> NodePools {
        let mut reg = lock(&self.inner);
        if let Some(p) = reg
            .map
            .get(&db.name)
            .and_then(|users| users.get(&user.name))
        {
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
        let pools = self.build(db, user);
        reg.map
            .entry(db.name.clone())
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
    /// their pools while `auth_query` is configured.
    pub fn reconfigure(&self, config: Arc<Config>) -> PoolChanges {
        let mut changes = PoolChanges::default();
        let mut reg = lock(&self.inner);
        reg.config = Some(config.clone());
        let map = std::mem::take(&mut reg.map);
        for (db_name, users) in map {
            let Some(db) = config.databases.get(&db_name) else {
                for pools in users.values() {
                    changes
                        .removed
                        .extend(pools.iter().map(|p| p.label().to_owned()));
                }
                continue;
            };
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
                let specs = if config.users.contains_key(&user_name) {
                    self.specs(db, user, Some(&old_credentials))
                } else {
                    let mut specs = self.specs(db, user, None);
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
                            Pool::new(label, spec, db.pool.clone(), self.conn_ids.clone())
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

    /// Node `index` of `database` answers again: let its pools try logging
    /// in at once instead of waiting out `server_login_retry`.
    pub fn node_reachable(&self, database: &str, index: usize) {
        let reg = lock(&self.inner);
        for pools in reg.map.get(database).into_iter().flat_map(|u| u.values()) {
            if let Some(p) = pools.get(index) {
                p.forget_login_failure();
            }
        }
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
