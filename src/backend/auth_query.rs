//! `auth_query`: users who are not in the config are looked up on the
//! database's primary, as pgbouncer does, through a dedicated connection per
//! database logged in as `auth_query.user` — never a pooled connection, so
//! no client's session state can touch it. The query is parameterised
//! (`$1` = the user name, sent as a bound parameter, never spliced into
//! SQL). Results, found or not, are reused for `auth_query.cache_ttl`, so a
//! storm of logins (or of probes for unknown names) costs one query per
//! name per TTL.
//!
//! The secret found is used exactly like one from the config: SCRAM secrets
//! verify the client's proof, and the keys recovered from that proof log
//! pgsluice in to PostgreSQL (SCRAM pass-through), so no password is ever
//! stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Secret;
use crate::config::{AuthQuery, Config, Database, User};
use crate::tls::TlsHandle;

/// (database, user) → when looked up, and what was found.
type Cache = HashMap<(String, String), (Instant, Option<Arc<User>>)>;

/// Cache entries kept at most (expired ones are swept first).
const CACHE_MAX: usize = 10_000;

pub struct AuthLookup {
    settings: AuthQuery,
    password: Option<String>,
    tls: TlsHandle,
    /// One lookup connection per database, opened on first use.
    conns: tokio::sync::Mutex<HashMap<String, tokio_postgres::Client>>,
    cache: Mutex<Cache>,
}

impl AuthLookup {
    /// `None` when `[auth_query]` is not configured.
    pub fn new(config: &Config, tls: TlsHandle) -> Option<Self> {
        let settings = config.auth_query.clone()?;
        let password = config
            .users
            .get(&settings.user)
            .and_then(Config::monitor_password);
        Some(Self {
            settings,
            password,
            tls,
            conns: tokio::sync::Mutex::default(),
            cache: Mutex::default(),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user `name` as the server knows it, or `None` if it does not.
    /// An error means the lookup itself failed (server down, bad query).
    pub async fn lookup(&self, db: &Database, name: &str) -> Result<Option<Arc<User>>, String> {
        let key = (db.name.clone(), name.to_owned());
        if let Some((at, found)) = self.cache().get(&key) {
            if at.elapsed() < self.settings.cache_ttl {
                return Ok(found.clone());
            }
        }
        let found = self.query(db, name).await?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_MAX {
            let ttl = self.settings.cache_ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), found.clone()));
        Ok(found)
    }

    async fn query(&self, db: &Database, name: &str) -> Result<Option<Arc<User>>, String> {
        let mut conns = self.conns.lock().await;
        // One reconnect if the kept connection has gone away.
        for attempt in 0..2 {
            let client = match conns.get(&db.name) {
                Some(c) if !c.is_closed() => c,
                _ => {
                    let c = self.connect(db).await?;
                    conns.insert(db.name.clone(), c);
                    match conns.get(&db.name) {
                        Some(c) => c,
                        None => return Err("lookup connection vanished".into()),
                    }
                }
            };
            let timeout = db.pool.server_connect_timeout.max(Duration::from_secs(1));
            match tokio::time::timeout(timeout, client.query_opt(&self.settings.query, &[&name]))
                .await
            {
                Ok(Ok(row)) => return Ok(row.and_then(|r| user_from_row(name, &r))),
                Ok(Err(e)) if attempt == 0 && client.is_closed() => {
                    tracing::debug!(error = %e, "auth_query connection lost; reconnecting");
                    conns.remove(&db.name);
                }
                Ok(Err(e)) => return Err(format!("auth_query failed: {e}")),
                Err(_) => {
                    conns.remove(&db.name);
                    return Err(format!(
                        "auth_query gave no answer within {}",
                        humantime::format_duration(timeout)
                    ));
                }
            }
        }
        Err("auth_query connection lost".into())
    }

    async fn connect(&self, db: &Database) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&db.primary.host)
            .port(db.primary.port)
            .user(&self.settings.user)
            .dbname(self.settings.dbname.as_deref().unwrap_or(&db.dbname))
            .application_name("pgsluice auth_query")
            .connect_timeout(db.pool.server_connect_timeout);
        if let Some(p) = &self.password {
            config.password(p);
        }
        crate::tls::connect_postgres(&config, &self.tls)
            .await
            .map_err(|e| format!("auth_query cannot log in as {}: {e}", self.settings.user))
    }
}

/// A row (name, secret): a user whose secret authenticates clients. A role
/// without a usable secret (NULL, unreadable) is treated as unknown: no
/// password can log it in.
fn user_from_row(name: &str, row: &tokio_postgres::Row) -> Option<Arc<User>> {
    let secret: String = row.try_get::<_, Option<String>>(1).ok().flatten()?;
    let password = Some(Secret::parse(&secret).ok()?);
    Some(Arc::new(User {
        name: name.to_owned(),
        password,
        server_password: None,
        max_client_conn: None,
    }))
}
