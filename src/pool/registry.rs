//! The set of pools, created on first use per (database, user).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::{Pool, lock};
use crate::backend::{Credentials, LoginSpec};
use crate::config::{Database, User};

#[derive(Default)]
pub struct Pools {
    /// database → user → pool (two levels so a lookup allocates nothing).
    map: Mutex<HashMap<String, HashMap<String, Arc<Pool>>>>,
    conn_ids: Arc<AtomicU64>,
}

impl Pools {
    pub fn new() -> Self {
        Self::default()
    }

    /// The primary's pool for `db` and `user`, created on first use.
    pub fn primary(&self, db: &Database, user: &User) -> Arc<Pool> {
        let mut map = lock(&self.map);
        if let Some(p) = map.get(&db.name).and_then(|users| users.get(&user.name)) {
            return p.clone();
        }
        let spec = LoginSpec {
            addr: db.primary.clone(),
            user: user.name.clone(),
            credentials: Credentials::configured(crate::config::Config::server_credential(user)),
            database: db.dbname.clone(),
            connect_timeout: db.pool.server_connect_timeout,
        };
        let label = format!("{}/{}@primary", db.name, user.name);
        let pool = Pool::new(label, spec, db.pool.clone(), self.conn_ids.clone());
        map.entry(db.name.clone())
            .or_default()
            .insert(user.name.clone(), pool.clone());
        pool
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.map)
            .values()
            .flat_map(|users| users.values().cloned())
            .collect()
    }

    pub fn close_all(&self) {
        for p in self.all() {
            p.close();
        }
    }
}
