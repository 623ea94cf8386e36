//! Opening a server connection and logging in as the configured user.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BackendError, CancelKey, SERVER_BUF, ServerConn, ServerParams};
use crate::auth::scram::{self, ScramClient};
use crate::auth::{ScramKeys, ServerCredential};
use crate::config::ServerAddr;
use crate::protocol::ErrorFields;
use crate::tls::{ServerStream, ServerTlsMode, TlsHandle};

/// Code of an SSLRequest.
const SSL_REQUEST_CODE: i32 = crate::protocol::SSL_REQUEST_CODE;

/// Everything needed to open one server connection.
#[derive(Debug, Clone)]
pub struct LoginSpec {
    pub addr: ServerAddr,
    pub user: String,
    pub credentials: Credentials,
    pub database: String,
    pub connect_timeout: Duration,
    /// `tls.server_mode` and the connector, as of the latest reload.
    pub tls: TlsHandle,
}

/// What pgsluice can log in to PostgreSQL with, as one user.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// From the config: `server_password`, a plaintext password or an md5
    /// hash.
    pub configured: Option<ServerCredential>,
    /// Learned from the latest client that authenticated as this user (the
    /// cleartext password, or SCRAM keys for pass-through); shared by every
    /// clone of the spec.
    pub learned: Arc<Mutex<Option<ServerCredential>>>,
    /// SCRAM keys derived from a password for the server's salt and
    /// iteration count (shared by every clone of the spec).
    derived: Arc<Mutex<Option<DerivedKeys>>>,
}

/// SCRAM keys and the password, salt and iteration count they came from.
///
/// Deriving them is PBKDF2 with the server's iteration count (4,096 by
/// default): ~12 million instructions, 3–5 ms of the runtime thread. A
/// role's salt and count stay the same until its password changes, and the
/// primary and its replicas share them, so one derivation serves every
/// server login of the user; a changed salt or password derives afresh.
struct DerivedKeys {
    password: String,
    keys: ScramKeys,
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKeys").finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn configured(c: Option<ServerCredential>) -> Self {
        Self {
            configured: c,
            learned: Arc::default(),
            derived: Arc::default(),
        }
    }

    /// The SCRAM keys of `password` for a server secret with `salt` and
    /// `iterations`: derived once, then reused while all three stay the
    /// same. The lock is held while deriving, so logins that start together
    /// wait for one derivation instead of each running their own.
    fn keys_for(&self, password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = derived.as_ref().filter(|d| {
            d.keys.iterations == iterations && d.keys.salt == salt && d.password == password
        }) {
            return d.keys.clone();
        }
        let keys = ScramKeys::derive(password.as_bytes(), salt, iterations);
        *derived = Some(DerivedKeys {
            password: password.to_owned(),
            keys: keys.clone(),
        });
        keys
    }

    /// Remembers what a client's login taught us (never replaces a
    /// configured password).
    pub fn learn(&self, c: ServerCredential) {
        if matches!(self.configured, Some(ServerCredential::Password(_))) {
            return;
        }
        *self.learned.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// The configured credential, then the learned one, whichever `usable`
    /// accepts first.
    fn pick(&self, usable: impl Fn(&ServerCredential) -> bool) -> Option<ServerCredential> {
        if let Some(c) = self.configured.as_ref().filter(|c| usable(c)) {
            return Some(c.clone());
        }
        self.learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| usable(c))
    }
}

/// A SCRAM exchange with the server: by password until the server's salt is
/// known (then by the keys derived from it), or by passed-through keys.
enum Sasl {
    Password { password: String, nonce: String },
    Keys(ScramClient),
}

pub(super) async fn connect(spec: &LoginSpec, id: u64) -> Result<ServerConn, BackendError> {
    let label = spec.addr.to_string();
    match tokio::time::timeout(spec.connect_timeout, login(spec, id)).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout {
            addr: label,
            after: spec.connect_timeout,
        }),
    }
}

async fn login(spec: &LoginSpec, id: u64) -> Result<ServerConn, BackendError> {
    let label = spec.addr.to_string();
    let stream = TcpStream::connect((spec.addr.host.as_str(), spec.addr.port))
        .await
        .map_err(|e| BackendError::Connect {
            addr: label.clone(),
            reason: e.to_string(),
        })?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let local_addr = stream.local_addr().ok();
    let stream = negotiate_tls(stream, spec, &label).await?;
    let mut conn = ServerConn {
        stream,
        buf: BytesMut::with_capacity(SERVER_BUF),
        params: ServerParams::default(),
        set_by_pooler: Vec::new(),
        cancel_key: CancelKey {
            addr: peer,
            process_id: 0,
            secret_key: 0,
        },
        id,
        local_addr,
        created: Instant::now(),
        last_used: Instant::now(),
        retire_at: None,
        prepared: std::collections::HashMap::new(),
        prepared_tick: 0,
        unnamed_owner: None,
        sql_prepared: std::collections::HashMap::new(),
        params_verified: None,
    };
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", spec.user.as_str()),
            ("database", spec.database.as_str()),
        ],
        &mut out,
    )?;
    conn.stream.write_all(&out).await?;

    let protocol_err = |reason: &str| BackendError::Protocol {
        addr: label.clone(),
        reason: reason.to_owned(),
    };
    let mut scram: Option<Sasl> = None;
    loop {
        let msg = match Message::parse(&mut conn.buf).map_err(|e| protocol_err(&e.to_string()))? {
            Some(m) => m,
            None => {
                conn.buf.reserve(SERVER_BUF);
                if conn.stream.read_buf(&mut conn.buf).await? == 0 {
                    return Err(BackendError::Io(format!(
                        "server {label} closed the connection during login"
                    )));
                }
                continue;
            }
        };
        out.clear();
        match msg {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = password(spec, &label)?;
                frontend::password_message(pw.as_bytes(), &mut out)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let cred = spec
                    .credentials
                    .pick(|c| !matches!(c, ServerCredential::Scram(_)))
                    .ok_or_else(|| no_password(spec, &label))?;
                let hash = match cred {
                    ServerCredential::Password(pw) => postgres_protocol::authentication::md5_hash(
                        spec.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    ),
                    ServerCredential::Md5Hash(h) => {
                        crate::auth::secret::md5_salted(&h, body.salt())
                    }
                    ServerCredential::Scram(_) => return Err(no_password(spec, &label)),
                };
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut has_scram = false;
                while let Some(m) = mechanisms
                    .next()
                    .map_err(|e| protocol_err(&e.to_string()))?
                {
                    has_scram |= m == sasl::SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(BackendError::UnsupportedAuth {
                        addr: label,
                        method: "SASL without SCRAM-SHA-256".into(),
                    });
                }
                let cred = spec
                    .credentials
                    .pick(|c| !matches!(c, ServerCredential::Md5Hash(_)))
                    .ok_or_else(|| no_password(spec, &label))?;
                let s = match cred {
                    ServerCredential::Password(password) => {
                        let nonce = crate::auth::Nonces::random().scram_nonce;
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            &scram::client_first(&nonce),
                            &mut out,
                        )?;
                        Sasl::Password { password, nonce }
                    }
                    ServerCredential::Scram(keys) => {
                        let nonce = crate::auth::Nonces::random().scram_nonce;
                        let c = ScramClient::new(keys, nonce);
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            &c.client_first(),
                            &mut out,
                        )?;
                        Sasl::Keys(c)
                    }
                    ServerCredential::Md5Hash(_) => return Err(no_password(spec, &label)),
                };
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                match scram
                    .take()
                    .ok_or_else(|| protocol_err("SASL continue without SASL start"))?
                {
                    Sasl::Password { password, nonce } => {
                        let scram_err =
                            |e: scram::ClientError| protocol_err(&format!("SCRAM: {e}"));
                        let first = scram::ServerFirst::parse(body.data()).map_err(scram_err)?;
                        let keys =
                            spec.credentials
                                .keys_for(&password, &first.salt, first.iterations);
                        let mut c = ScramClient::new(keys, nonce);
                        let msg = c.on_server_first(body.data()).map_err(scram_err)?;
                        frontend::sasl_response(&msg, &mut out)?;
                        scram = Some(Sasl::Keys(c));
                    }
                    Sasl::Keys(mut c) => {
                        let msg = c.on_server_first(body.data()).map_err(|e| {
                            BackendError::PassThrough {
                                addr: label.clone(),
                                user: spec.user.clone(),
                                reason: e.to_string(),
                            }
                        })?;
                        frontend::sasl_response(&msg, &mut out)?;
                        scram = Some(Sasl::Keys(c));
                    }
                }
            }
            Message::AuthenticationSaslFinal(body) => {
                let r = match scram
                    .as_mut()
                    .ok_or_else(|| protocol_err("SASL final without SASL start"))?
                {
                    Sasl::Password { .. } => Err("SASL final before SASL continue".to_owned()),
                    Sasl::Keys(c) => c.on_server_final(body.data()).map_err(|e| e.to_string()),
                };
                r.map_err(|e| protocol_err(&format!("SCRAM server signature: {e}")))?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationSspi
            | Message::AuthenticationGssContinue(_) => {
                return Err(BackendError::UnsupportedAuth {
                    addr: label,
                    method: "GSS/SSPI/Kerberos".into(),
                });
            }
            Message::ParameterStatus(body) => {
                let name = body.name().map_err(|e| protocol_err(&e.to_string()))?;
                let value = body.value().map_err(|e| protocol_err(&e.to_string()))?;
                conn.params.set(name, value);
            }
            Message::BackendKeyData(body) => {
                conn.cancel_key.process_id = body.process_id();
                conn.cancel_key.secret_key = body.secret_key();
            }
            Message::ErrorResponse(body) => {
                let mut fields = ErrorFields::default();
                let mut it = body.fields();
                while let Ok(Some(f)) = it.next() {
                    let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
                    match f.type_() {
                        b'V' => fields.severity = value,
                        b'S' if fields.severity.is_empty() => fields.severity = value,
                        b'C' => fields.code = value,
                        b'M' => fields.message = value,
                        _ => {}
                    }
                }
                return Err(BackendError::Rejected {
                    addr: label,
                    fields,
                });
            }
            Message::NoticeResponse(_) => {}
            Message::ReadyForQuery(_) => return Ok(conn),
            _ => return Err(protocol_err("unexpected message during login")),
        }
        if !out.is_empty() {
            conn.stream.write_all(&out).await?;
        }
    }
}

fn password(spec: &LoginSpec, label: &str) -> Result<String, BackendError> {
    match spec
        .credentials
        .pick(|c| matches!(c, ServerCredential::Password(_)))
    {
        Some(ServerCredential::Password(pw)) => Ok(pw),
        _ => Err(no_password(spec, label)),
    }
}

fn no_password(spec: &LoginSpec, label: &str) -> BackendError {
    BackendError::NoPassword {
        addr: label.to_owned(),
        user: spec.user.clone(),
    }
}

/// Asks the server for TLS (SSLRequest) as `tls.server_mode` says and runs
/// the handshake; `prefer` falls back to plaintext when the server says no.
async fn negotiate_tls(
    mut tcp: TcpStream,
    spec: &LoginSpec,
    label: &str,
) -> Result<ServerStream, BackendError> {
    let tls = spec.tls.load();
    let mode = tls.settings.server_mode;
    let Some(connector) = tls
        .connector
        .clone()
        .filter(|_| mode != ServerTlsMode::Disable)
    else {
        return Ok(ServerStream::Plain(tcp));
    };
    let tls_err = |reason: String| BackendError::Tls {
        addr: label.to_owned(),
        reason,
    };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8i32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await?;
    // Exactly one byte: anything after it would come from before the
    // handshake and could be injected.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == ServerTlsMode::Prefer => return Ok(ServerStream::Plain(tcp)),
        b'N' => {
            return Err(tls_err(format!(
                "the server does not accept TLS connections, and tls.server_mode = \"{}\"",
                mode.as_str()
            )));
        }
        b'E' => {
            return Err(tls_err(
                "the server answered the TLS request with an error".into(),
            ));
        }
        other => {
            return Err(tls_err(format!(
                "unexpected answer {other:#04x} to the TLS request"
            )));
        }
    }
    let name = rustls::pki_types::ServerName::try_from(spec.addr.host.clone()).map_err(|e| {
        tls_err(format!(
            "host `{}` is not a valid TLS server name: {e}",
            spec.addr.host
        ))
    })?;
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(format!("handshake failed: {e}")))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_reused_for_the_same_secret_and_password() {
        let creds = Credentials::configured(None);
        let first = creds.keys_for("pw", b"salt-one", 4096);
        assert!(first == ScramKeys::derive(b"pw", b"salt-one", 4096));
        // Put a marker in the cache: a second login with the same password,
        // salt and count must take it instead of deriving again.
        let mut marked = first.clone();
        marked.client_key = [7; 32];
        if let Some(d) = creds.derived.lock().unwrap().as_mut() {
            d.keys = marked.clone();
        }
        let clone = creds.clone();
        assert!(clone.keys_for("pw", b"salt-one", 4096) == marked);
        // Another salt (the password was set again), count or password:
        // derived afresh.
        let resalted = creds.keys_for("pw", b"salt-two", 4096);
        assert!(resalted == ScramKeys::derive(b"pw", b"salt-two", 4096));
        assert!(
            creds.keys_for("pw", b"salt-two", 8192) == ScramKeys::derive(b"pw", b"salt-two", 8192)
        );
        assert!(
            creds.keys_for("other", b"salt-two", 8192)
                == ScramKeys::derive(b"other", b"salt-two", 8192)
        );
    }

    #[test]
    fn server_first_parses_and_rejects_what_is_missing() {
        let first = scram::ServerFirst::parse(b"r=abcdef,s=c2FsdA==,i=4096").unwrap();
        assert_eq!(
            (first.nonce, first.salt.as_slice(), first.iterations),
            (b"abcdef".as_slice(), b"salt".as_slice(), 4096)
        );
        for bad in [
            b"s=c2FsdA==,i=4096".as_slice(),
            b"r=abc,i=4096",
            b"r=abc,s=***,i=4096",
            b"r=abc,s=c2FsdA==",
            b"r=abc,s=c2FsdA==,i=0",
            b"r=abc,s=c2FsdA==,i=lots",
        ] {
            assert!(scram::ServerFirst::parse(bad).is_err(), "{bad:?}");
        }
    }
}
