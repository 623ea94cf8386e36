//! One client connection: encryption negotiation (TLS after an SSLRequest
//! or PostgreSQL 17's direct TLS, GSSENC refused), startup (protocol
//! negotiation, cancel requests), authentication, the welcome answered from
//! the pool's cached parameters, then the session loop.
//!
//! A client that misbehaves is answered with an error and closed; nothing it
//! does reaches another client or leaves a pooled server dirty.

mod cancel;
mod clients;
mod effects;
pub mod fanout;
mod negotiate;
mod params;
mod park;
mod relay;
mod session;
mod spares;
mod statements;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::auth::hba::{self, Connection};
use crate::auth::{AuthStep, ClientAuth, Method, Nonces, ServerCredential};
use crate::backend::ServerParams;
use crate::pool::NodePools;
use crate::protocol::{self, ProtocolError, Severity, StartupPacket, sqlstate};
use crate::proxy::{ClientPermit, Shared};
use crate::tls::{ClientStream, common_name};

pub use cancel::{CancelRegistry, CancelSlot};
pub use clients::{
    Alert, ClientHandle, ClientIdentity, ClientInfo, ClientRegistry, ClientState, Link,
};
pub use effects::{Effects, Feature, SqlPrepared, scan as scan_effects};
pub use params::{ClientParams, ParamInterner, parse_options};
pub use park::ParkingLot;
pub use relay::{RelayState, ServerEvent, client_tag_inspected, server_tag_inspected};
pub(crate) use session::route::preview as preview_route;
pub use statements::{PreparedStats, Statement, StatementRegistry};

/// Cap on authentication messages (password, SASL) from a client.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// Why a client connection ended before its session started.
#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error("client disconnected during startup")]
    Gone,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// Refused with this SQLSTATE and message (sent as FATAL).
    #[error("{message}")]
    Refused { code: String, message: String },
}

fn refused(code: &str, message: impl Into<String>) -> LoginError {
    LoginError::Refused {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// How long a freshly logged-in client may stay silent before it is parked
/// without ever getting a task of its own (`park_idle_clients_after` on).
const LOGIN_PARK_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// Serves one accepted client connection to the end.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, permit: ClientPermit) {
    // Debug level: an enabled span costs ~220 ns per poll of the session
    // (measured in release with this subscriber: reload layer + EnvFilter
    // + registry), about 1 us per transaction; at info it costs nothing.
    // Connections opened while debug is on carry it.
    let span = tracing::debug_span!(
        "client",
        %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty,
        client_id = tracing::field::Empty
    );
    async move {
        let deadline =
            tokio::time::Instant::now() + shared.config().general.client_login_timeout;
        let mut buf = BytesMut::with_capacity(256);
        let opened = tokio::time::timeout_at(deadline, negotiate::open(tcp, &mut buf, &shared));
        let mut stream = match opened.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(negotiate::OpenError { stream, error })) => {
                if let Some(mut stream) = stream {
                    refuse_login(&mut stream, error).await;
                } else {
                    tracing::debug!(%error, "client connection closed during encryption negotiation");
                }
                return;
            }
            Err(_) => {
                tracing::debug!("client did not finish encryption negotiation within client_login_timeout");
                return;
            }
        };
        let login =
            tokio::time::timeout_at(deadline, login(&mut stream, buf, peer, &shared, &permit))
                .await;
        let session = match login {
            Ok(Ok(Some(LoggedIn::Pooled(session)))) => session,
            Ok(Ok(Some(LoggedIn::Console(console)))) => {
                console.run(stream).await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return refuse_login(&mut stream, e).await,
            Err(_) => {
                let timeout = shared.config().general.client_login_timeout;
                let e = refused(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "client did not complete login within client_login_timeout ({})",
                        humantime::format_duration(timeout)
                    ),
                );
                return refuse_login(&mut stream, e).await;
            }
        };
        // A client that sends nothing right after logging in (a driver's
        // pool filling up) is parked at once: its session never gets a task
        // (see park.rs). One that sends at once gets its task without a
        // detour through the parking lot.
        let stream = match stream {
            ClientStream::Plain(tcp) if session.parkable() => {
                let ready = std::future::poll_fn(|cx| tcp.poll_read_ready(cx));
                if tokio::time::timeout(LOGIN_PARK_GRACE, ready).await.is_err() {
                    session.park(ClientStream::Plain(tcp), permit);
                    return;
                }
                ClientStream::Plain(tcp)
            }
            other => other,
        };
        // The session runs as a task of its own, so that the login's state
        // (the largest part of this future) is freed now instead of being
        // kept for the life of the connection: an idle client costs the
        // session's future only (docs/benchmarks.md, RSS per idle client).
        let run = session.run(stream, permit);
        tokio::spawn(run.instrument(tracing::Span::current()));
    }
    .instrument(span)
    .await
}

async fn refuse_login(stream: &mut ClientStream, e: LoginError) {
    let (code, message) = match &e {
        LoginError::Gone => return,
        LoginError::Io(err) => {
            tracing::debug!(error = %err, "client I/O error during login");
            return;
        }
        LoginError::Protocol(p) => (p.sqlstate().to_owned(), p.to_string()),
        LoginError::Refused { code, message } => (code.clone(), message.clone()),
    };
    tracing::debug!(%code, %message, "login refused");
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, Severity::Fatal, &code, &message);
    // Best effort, bounded: a client that does not read must not hold us.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Reads more client bytes into `buf`; EOF is [`LoginError::Gone`].
async fn read_more<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(), LoginError> {
    buf.reserve(1024);
    if stream.read_buf(buf).await? == 0 {
        return Err(LoginError::Gone);
    }
    Ok(())
}

/// A client past login: a pooled session, or the admin console.
// Moved once per login and consumed at once: boxing the session would only
// add an allocation per login.
#[allow(clippy::large_enum_variant)]
enum LoggedIn {
    Pooled(session::Session),
    Console(crate::admin::console::Console),
}

/// Startup and authentication. `Ok(None)` when the connection was a cancel
/// request (served and done).
async fn login(
    stream: &mut ClientStream,
    buf: BytesMut,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    permit: &ClientPermit,
) -> Result<Option<LoggedIn>, LoginError> {
    // The authentication's last message (SCRAM's final one) waits here to
    // go out in one write with AuthenticationOk and the welcome, one
    // syscall less per login; if the login fails after it, the client gets
    // it before the error, as from PostgreSQL.
    let mut pending = BytesMut::new();
    let result = login_inner(stream, buf, peer, shared, permit, &mut pending).await;
    if result.is_err() && !pending.is_empty() {
        let _ = stream.write_all(&pending).await;
    }
    result
}

async fn login_inner(
    stream: &mut ClientStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    permit: &ClientPermit,
    pending: &mut BytesMut,
) -> Result<Option<LoggedIn>, LoginError> {
    let params = loop {
        let Some(packet) = protocol::read_startup(&mut buf)? else {
            read_more(stream, &mut buf).await?;
            continue;
        };
        match packet {
            StartupPacket::Ssl | StartupPacket::GssEnc if stream.is_tls() => {
                return Err(ProtocolError::Malformed(
                    "encryption request on an encrypted connection",
                )
                .into());
            }
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                if !buf.is_empty() {
                    // Bytes sent before our answer could be injected by a
                    // man in the middle; PostgreSQL refuses them too.
                    return Err(ProtocolError::Malformed(
                        "data received after an encryption request",
                    )
                    .into());
                }
                stream.write_all(&[protocol::REFUSE_ENCRYPTION]).await?;
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                let peers = shared.config().general.peers.clone();
                shared
                    .cancels
                    .cancel_or_forward(&shared.registry, process_id, secret_key, &peers)
                    .await;
                return Ok(None);
            }
            StartupPacket::Startup {
                minor,
                params,
                unsupported_options,
            } => {
                let mode = shared.config().tls.client_mode;
                if mode.requires_tls() && !stream.is_tls() {
                    return Err(refused(
                        sqlstate::INVALID_AUTHORIZATION,
                        format!(
                            "pgsluice accepts only TLS connections (tls.client_mode = \"{}\"); connect with sslmode=require or stronger",
                            mode.as_str()
                        ),
                    ));
                }
                if minor > 0 || !unsupported_options.is_empty() {
                    let mut out = BytesMut::new();
                    protocol::negotiate_protocol_version(
                        &mut out,
                        protocol::PROTOCOL_3_0,
                        &unsupported_options,
                    );
                    stream.write_all(&out).await?;
                }
                break params;
            }
        }
    };
    if permit.over_limit {
        return Err(refused(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "too many client connections (max_client_conn = {})",
                shared.config().general.max_client_conn
            ),
        ));
    }
    if *shared.phase.borrow() >= crate::proxy::Phase::Draining {
        return Err(refused(
            sqlstate::ADMIN_SHUTDOWN,
            "pgsluice is shutting down",
        ));
    }
    let user_name = params.get("user").unwrap_or_default().to_owned();
    let db_name = params.get("database").unwrap_or(&user_name).to_owned();
    // One configuration for the whole login, even if a reload lands
    // meanwhile (the session then follows it at its first request).
    let generation = shared.generation();
    let config = arc_swap::Guard::into_inner(shared.config());
    tracing::Span::current()
        .record("user", user_name.as_str())
        .record("database", db_name.as_str());
    let method = access_method(&config, peer, stream.is_tls(), &db_name, &user_name)?;
    if method == Method::Cert || config.tls.client_mode == crate::tls::ClientTlsMode::VerifyFull {
        check_certificate_user(stream, &config, &user_name)?;
    }
    // Users not in the config: looked up on the server (auth_query).
    let auth_lookup = shared.auth_lookup();
    let looked_up = match (
        config.users.contains_key(&user_name),
        &auth_lookup,
        config.databases.get(&db_name),
    ) {
        (false, Some(lookup), Some(db)) => match lookup.lookup(db, &user_name).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(user = %user_name, error = %e, "auth_query lookup failed");
                return Err(refused(
                    sqlstate::CONNECTION_FAILURE,
                    "pgsluice cannot check this login now (auth_query lookup failed)",
                ));
            }
        },
        _ => None,
    };
    let known_user = config.users.get(&user_name).or(looked_up.as_deref());
    let learned = if method == Method::Cert {
        tracing::debug!(method = method.as_str(), "client authenticated");
        None
    } else {
        authenticate(
            stream, &mut buf, shared, method, &user_name, known_user, pending,
        )
        .await?
    };

    let mut identity = ClientIdentity {
        user: Arc::from(user_name.as_str()),
        database: Arc::from(db_name.as_str()),
        peer,
        local: stream.tcp().local_addr().ok(),
        tls: stream.is_tls(),
        application_name: params.get("application_name").unwrap_or_default().into(),
        console: crate::admin::is_console_database(&db_name),
    };
    if identity.console {
        return console_login(stream, buf, shared, identity, std::mem::take(pending))
            .await
            .map(Some);
    }
    let Some(db) = config.databases.get(&db_name) else {
        return Err(refused(
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{db_name}\" does not exist in the pgsluice configuration"),
        ));
    };
    let user = known_user.ok_or_else(|| {
        refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!("role \"{user_name}\" does not exist"),
        )
    })?;
    if let Some((code, message)) = shared.pools.gate(&db.name).refusal(&db.name) {
        return Err(refused(code, message));
    }
    let admitted = shared
        .admit(user, db)
        .map_err(|m| refused(sqlstate::TOO_MANY_CONNECTIONS, m))?;
    // The registry entry keeps the copies every client of this user shares.
    identity.user = Arc::clone(admitted.user());
    identity.database = Arc::clone(admitted.database());
    let pools = shared.pools.for_user(db, user);
    let sharded = shared.shards.get(&db.name).map(|set| {
        let shard_pools = (0..set.shards.len())
            .map(|i| shared.pools.for_shard(db, i, user))
            .collect();
        session::shard::ShardRoute::new(set.clone(), shard_pools)
    });
    if let Some(c) = learned {
        // Every node of the database logs this user in the same way.
        for pool in pools.iter() {
            pool.learn_credential(c.clone());
        }
        let shards = shared.shards.get(&db.name).map_or(0, |s| s.shards.len());
        for i in 1..shards {
            for pool in shared.pools.for_shard(db, i, user).iter() {
                pool.learn_credential(c.clone());
            }
        }
    }
    let defaults = welcome_params(&pools).await?;
    let mut client_params = ClientParams::from_startup(&params, &defaults)
        .map_err(|e| refused(sqlstate::FEATURE_NOT_SUPPORTED, e.0))?;
    client_params.share(&shared.param_lists);
    if let Some(v) = client_params.own("pgsluice.route") {
        if session::route::parse_route_mode(v).is_none() {
            return Err(refused(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("invalid value for pgsluice.route: \"{v}\" (use primary, replica or auto)"),
            ));
        }
    }
    let pid = shared.registry.new_pid(&shared.cancels);
    let cancel = CancelSlot::new();
    tracing::Span::current().record("client_id", pid);

    let mut out = std::mem::take(pending);
    out.reserve(512);
    protocol::authentication_ok(&mut out);
    for (name, value) in defaults.iter() {
        protocol::parameter_status(&mut out, name, client_params.get(name).unwrap_or(value));
    }
    protocol::backend_key_data(&mut out, pid, cancel.secret_key());
    protocol::ready_for_query(&mut out, protocol::TxStatus::Idle);
    stream.write_all(&out).await?;
    tracing::debug!(pool = pools[0].label(), pid, "client logged in");
    // Pools and group always agree on the nodes (a reload racing this
    // login is picked up at the first request).
    let cluster = shared
        .clusters()
        .get(&db.name)
        .filter(|c| c.nodes().len() == pools.len())
        .cloned()
        .or_else(|| {
            sharded
                .as_ref()
                .and_then(|s| s.db.shards.first())
                .map(|s| s.cluster.clone())
        });
    Ok(Some(LoggedIn::Pooled(session::Session::new(
        buf,
        shared.clone(),
        session::Upstream {
            admitted,
            pools,
            cluster,
            sharded,
            client: shared.registry.register(pid, cancel, identity),
            generation,
            config: config.clone(),
        },
        db.pool_mode,
        client_params,
    ))))
}

/// An authenticated client of the admin console database: admin and
/// stats users are welcomed, anyone else refused (28000).
async fn console_login(
    stream: &mut ClientStream,
    buf: BytesMut,
    shared: &Arc<Shared>,
    identity: ClientIdentity,
    mut out: BytesMut,
) -> Result<LoggedIn, LoginError> {
    let Some(access) = crate::admin::console::access_for(&shared.config(), &identity.user) else {
        if !out.is_empty() {
            // The final authentication message, before the refusal.
            let _ = stream.write_all(&out).await;
        }
        return Err(refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!(
                "user \"{}\" may not use the admin console (database \"{}\"): list it in general.admin_users or general.stats_users",
                identity.user, identity.database
            ),
        ));
    };
    let pid = shared.registry.new_pid(&shared.cancels);
    let cancel = CancelSlot::new();
    out.reserve(512);
    protocol::authentication_ok(&mut out);
    for (name, value) in crate::admin::console::welcome_params(access) {
        protocol::parameter_status(&mut out, name, &value);
    }
    protocol::backend_key_data(&mut out, pid, cancel.secret_key());
    protocol::ready_for_query(&mut out, protocol::TxStatus::Idle);
    // The console runs no queries to cancel: a cancel with this key finds
    // nothing attached and is dropped.
    stream.write_all(&out).await?;
    tracing::debug!(user = %identity.user, ?access, pid, "admin console login");
    let client = shared.registry.register(pid, cancel, identity);
    Ok(LoggedIn::Console(crate::admin::console::Console::new(
        shared.clone(),
        client,
        access,
        buf,
    )))
}

/// The method this connection must authenticate with: the first matching
/// access rule, or `general.auth_type` when there are no rules.
fn access_method(
    config: &crate::config::Config,
    peer: SocketAddr,
    tls: bool,
    database: &str,
    user: &str,
) -> Result<Method, LoginError> {
    if config.hba.is_empty() {
        return Ok(config.general.auth_type);
    }
    let host = peer.ip().to_canonical();
    let conn = Connection {
        tls,
        database,
        user,
        addr: host,
    };
    match hba::first_match(&config.hba, &conn).map(|r| r.method) {
        Some(Method::Reject) => Err(refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!(
                "pgsluice access rule rejects connection for host \"{host}\", user \"{user}\", database \"{database}\""
            ),
        )),
        Some(m) => Ok(m),
        None => Err(refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!(
                "no pgsluice access rule for host \"{host}\", user \"{user}\", database \"{database}\""
            ),
        )),
    }
}

/// `cert` authentication and `verify-full`: the client's verified
/// certificate must name `user` (its CN, through `tls.cert_map`).
fn check_certificate_user(
    stream: &ClientStream,
    config: &crate::config::Config,
    user: &str,
) -> Result<(), LoginError> {
    let failed = |why: &str| {
        tracing::debug!(user, reason = why, "certificate authentication failed");
        refused(
            sqlstate::INVALID_AUTHORIZATION,
            format!("certificate authentication failed for user \"{user}\""),
        )
    };
    if !stream.is_tls() {
        return Err(failed("not a TLS connection"));
    }
    let cert = stream
        .peer_certificate()
        .ok_or_else(|| failed("no client certificate"))?;
    let cn = common_name(cert).ok_or_else(|| failed("certificate has no common name"))?;
    let mapped = config.tls.user_for_cn(&cn);
    if mapped != user {
        tracing::debug!(cn, mapped, user, "certificate names another user");
        return Err(failed("certificate names another user"));
    }
    Ok(())
}

/// The server parameters a new client is welcomed with: cached from the
/// first login of any of the user's pools, or fetched with one login — on
/// the primary, or on a replica while the primary is down (reads go on).
async fn welcome_params(pools: &NodePools) -> Result<Arc<ServerParams>, LoginError> {
    if let Some(p) = pools.iter().find_map(|p| p.welcome_params()) {
        return Ok(p);
    }
    let mut first_error = None;
    for pool in pools.iter() {
        match pool.checkout().await {
            Ok(server) => {
                server.release();
                if let Some(p) = pool.welcome_params() {
                    return Ok(p);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(match first_error {
        Some(e) => refused(e.sqlstate(), e.to_string()),
        None => refused(sqlstate::CONNECTION_FAILURE, "server sent no parameters"),
    })
}

/// Runs the client's authentication exchange; returns what it taught us
/// for logging in to PostgreSQL as this user.
async fn authenticate(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    shared: &Shared,
    method: Method,
    user_name: &str,
    user: Option<&crate::config::User>,
    pending: &mut BytesMut,
) -> Result<Option<ServerCredential>, LoginError> {
    let mut auth = ClientAuth::new(
        method,
        user_name,
        user.is_some(),
        user.and_then(|u| u.password.as_ref()),
        &shared.fake_salt_key,
        Nonces::random(),
    );
    let mut out = BytesMut::new();
    let mut step = auth.start(&mut out);
    loop {
        let failed = match step {
            AuthStep::Done => {
                // The last message goes out with the welcome (see `login`).
                *pending = out;
                tracing::debug!(method = method.as_str(), "client authenticated");
                return Ok(auth.learned().cloned());
            }
            AuthStep::Failed(f) => Some(f),
            AuthStep::Continue => None,
        };
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if let Some(f) = failed {
            return Err(refused(f.code, f.message));
        }
        let header = loop {
            match protocol::peek_header(buf, MAX_AUTH_MESSAGE)? {
                Some(h) if buf.len() >= h.total_len => break h,
                _ => read_more(stream, buf).await?,
            }
        };
        let msg = buf.split_to(header.total_len);
        step = auth.on_message(&msg, &mut out);
    }
}
