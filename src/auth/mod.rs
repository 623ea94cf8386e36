//! Client authentication as pure state machines: fed the client's messages,
//! they say what to send back and when the client is in. No I/O here, and
//! every random value (md5 salt, SCRAM nonce) is passed in, so each method is
//! testable with recorded exchanges.
//!
//! Guarantees:
//! - An unknown user, or a user whose stored secret cannot serve the method
//!   (an md5 hash under `scram-sha-256`), runs the same exchange as a known
//!   one and fails with the same 28P01 as a wrong password. Its fake SCRAM
//!   salt is derived from the user name and a per-process key, so it is
//!   stable across attempts.
//! - No password, hash or key appears in an error, a log line or `Debug`.
//! - Which method applies is decided before (`hba`), not here.

pub mod hba;
pub mod scram;
pub mod secret;

use bytes::BytesMut;
use rand::RngCore as _;

use crate::protocol::{self, sqlstate};
pub use hba::{ConnType, HbaRule, Method};
use scram::{ScramError, ScramServer, ServerStep};
pub use secret::{ScramKeys, ScramSecret, Secret, constant_time_eq, hash_password};

/// What the session should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send the bytes written to `out` and wait for the client's next
    /// authentication message (tag `p`).
    Continue,
    /// The client is authenticated (anything written to `out` goes first,
    /// e.g. SCRAM's server-final message).
    Done,
    /// Refuse the client with this error.
    Failed(AuthFailure),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    pub code: &'static str,
    pub message: String,
}

impl AuthFailure {
    pub fn bad_password(user: &str) -> Self {
        Self {
            code: sqlstate::INVALID_PASSWORD,
            message: format!("password authentication failed for user \"{user}\""),
        }
    }

    fn protocol(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: message.into(),
        }
    }
}

/// A credential pgsluice can log in to PostgreSQL with. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerCredential {
    /// Answers cleartext, md5 and SCRAM challenges.
    Password(String),
    /// A stored `md5…` hash: answers md5 challenges only.
    Md5Hash(String),
    /// Keys recovered from a client's SCRAM proof: answer SCRAM challenges
    /// from a server whose secret has the same salt and iterations.
    Scram(ScramKeys),
}

impl std::fmt::Debug for ServerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Password(_) => "Password(<redacted>)",
            Self::Md5Hash(_) => "Md5Hash(<redacted>)",
            Self::Scram(_) => "Scram(<redacted>)",
        })
    }
}

/// The per-process key fake SCRAM salts are derived from.
#[derive(Clone)]
pub struct FakeSaltKey([u8; 32]);

impl std::fmt::Debug for FakeSaltKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeSaltKey(<redacted>)")
    }
}

impl FakeSaltKey {
    pub fn random() -> Self {
        let mut k = [0; 32];
        rand::rng().fill_bytes(&mut k);
        Self(k)
    }

    pub fn from_bytes(k: [u8; 32]) -> Self {
        Self(k)
    }

    /// The 16-byte salt an unknown `user` is shown, the same every time.
    pub fn salt_for(&self, user: &str) -> Vec<u8> {
        let mut input = b"pgsluice fake SCRAM salt\0".to_vec();
        input.extend_from_slice(user.as_bytes());
        secret::hmac(&self.0, &input)[..16].to_vec()
    }
}

/// [`ScramSecret::derive`], remembered: a plaintext password configured for
/// SCRAM is stretched with PBKDF2 (4,096 rounds, ~0.5 ms) once per password
/// and salt instead of at every login, as PostgreSQL stores the derived
/// secret. Derivation is a pure function of its inputs, so a remembered
/// result is always the right one. Keys are an HMAC of the password under
/// the salt (no plaintext is kept); the cache is emptied when it reaches
/// [`DERIVED_CACHE_MAX`] entries.
fn derive_cached(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecret {
    type Cache = std::collections::HashMap<([u8; 32], u32), ScramSecret>;
    static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);
    // The salt's length first: no two (salt, password) pairs share an input.
    let mut key_input = (salt.len() as u64).to_be_bytes().to_vec();
    key_input.extend_from_slice(salt);
    key_input.extend_from_slice(password);
    let key = (
        secret::hmac(b"pgsluice derived SCRAM secret", &key_input),
        iterations,
    );
    let lock = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = lock().as_ref().and_then(|c| c.get(&key)) {
        return found.clone();
    }
    let derived = ScramSecret::derive(password, salt, iterations);
    let mut guard = lock();
    let cache = guard.get_or_insert_with(Cache::new);
    if cache.len() >= DERIVED_CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, derived.clone());
    derived
}

/// Bound of [`derive_cached`]'s cache (one entry per user and password).
const DERIVED_CACHE_MAX: usize = 4096;

/// The random values one exchange needs, drawn by the caller.
#[derive(Debug, Clone)]
pub struct Nonces {
    pub md5_salt: [u8; 4],
    /// Printable, no `,` (see [`ScramServer::nonce_from`]).
    pub scram_nonce: String,
}

impl Nonces {
    pub fn random() -> Self {
        let mut rng = rand::rng();
        let mut md5_salt = [0; 4];
        rng.fill_bytes(&mut md5_salt);
        let mut raw = [0; scram::SERVER_NONCE_LEN];
        rng.fill_bytes(&mut raw);
        Self {
            md5_salt,
            scram_nonce: ScramServer::nonce_from(&raw),
        }
    }
}

/// One client's authentication exchange.
#[derive(Debug)]
pub struct ClientAuth {
    user: String,
    exchange: Exchange,
    learned: Option<ServerCredential>,
}

#[derive(Debug)]
enum Exchange {
    /// No proof asked; the user must still be configured.
    Trust {
        known: bool,
    },
    /// Refused before any exchange (reject rule, cert without TLS).
    Refuse(AuthFailure),
    /// AuthenticationCleartextPassword, checked against any secret kind.
    Cleartext {
        secret: Option<Secret>,
        asked: bool,
    },
    /// AuthenticationMD5Password against the md5 hash of the user's
    /// password (`None`: unknown user, always fails).
    Md5 {
        hash: Option<String>,
        salt: [u8; 4],
        asked: bool,
    },
    Scram {
        server: Box<ScramServer>,
        /// The client has sent its SASLInitialResponse.
        started: bool,
        asked: bool,
    },
    Finished,
}

impl ClientAuth {
    /// Sets up the exchange `method` asks for. `known`: the user is
    /// configured; `secret`: its password setting (`None` for an unknown
    /// user or one without a password: every password method fails).
    pub fn new(
        method: Method,
        user: &str,
        known: bool,
        secret: Option<&Secret>,
        fake: &FakeSaltKey,
        nonces: Nonces,
    ) -> Self {
        let scram_fake = || {
            Box::new(ScramServer::fake(
                fake.salt_for(user),
                secret::DEFAULT_ITERATIONS,
                nonces.scram_nonce.clone(),
            ))
        };
        let scram = |server| Exchange::Scram {
            server,
            started: false,
            asked: false,
        };
        let exchange = match method {
            Method::Trust => Exchange::Trust { known },
            Method::Reject => Exchange::Refuse(AuthFailure {
                code: sqlstate::INVALID_AUTHORIZATION,
                message: format!("pgsluice access rules reject connection for user \"{user}\""),
            }),
            Method::Cert => Exchange::Refuse(AuthFailure {
                code: sqlstate::INVALID_AUTHORIZATION,
                message: "cert authentication is checked against the TLS client certificate, before this exchange"
                    .to_owned(),
            }),
            Method::Password => Exchange::Cleartext {
                secret: secret.cloned(),
                asked: false,
            },
            // As PostgreSQL: md5 against a SCRAM secret runs SCRAM.
            Method::Md5 => match secret {
                Some(Secret::Scram(s)) => scram(Box::new(ScramServer::new(
                    s.clone(),
                    nonces.scram_nonce.clone(),
                ))),
                Some(Secret::Md5(h)) => Exchange::Md5 {
                    hash: Some(h.clone()),
                    salt: nonces.md5_salt,
                    asked: false,
                },
                Some(Secret::Plain(p)) => Exchange::Md5 {
                    hash: Some(secret::md5_password_hash(p.as_bytes(), user)),
                    salt: nonces.md5_salt,
                    asked: false,
                },
                None => Exchange::Md5 {
                    hash: None,
                    salt: nonces.md5_salt,
                    asked: false,
                },
            },
            Method::ScramSha256 => match secret {
                Some(Secret::Scram(s)) => scram(Box::new(ScramServer::new(
                    s.clone(),
                    nonces.scram_nonce.clone(),
                ))),
                // A plaintext password is turned into a secret with the
                // fake salt: stable per user, unknown to clients.
                Some(Secret::Plain(p)) => scram(Box::new(ScramServer::new(
                    derive_cached(
                        p.as_bytes(),
                        &fake.salt_for(user),
                        secret::DEFAULT_ITERATIONS,
                    ),
                    nonces.scram_nonce.clone(),
                ))),
                // An md5 hash cannot serve SCRAM: PostgreSQL runs a mock
                // exchange that fails; so do we.
                Some(Secret::Md5(_)) | None => scram(scram_fake()),
            },
        };
        Self {
            user: user.to_owned(),
            exchange,
            learned: None,
        }
    }

    /// What the client's proof taught us for logging in to PostgreSQL as
    /// this user (after [`AuthStep::Done`]): the cleartext password, or
    /// the SCRAM keys.
    pub fn learned(&self) -> Option<&ServerCredential> {
        self.learned.as_ref()
    }

    /// Writes the first request to `out` (if any) and says what next.
    pub fn start(&mut self, out: &mut BytesMut) -> AuthStep {
        match &mut self.exchange {
            Exchange::Trust { known: true } => AuthStep::Done,
            Exchange::Trust { known: false } => AuthStep::Failed(AuthFailure {
                code: sqlstate::INVALID_AUTHORIZATION,
                message: format!("role \"{}\" does not exist", self.user),
            }),
            Exchange::Refuse(f) => AuthStep::Failed(f.clone()),
            Exchange::Cleartext { asked, .. } => {
                protocol::authentication_cleartext_password(out);
                *asked = true;
                AuthStep::Continue
            }
            Exchange::Md5 { salt, asked, .. } => {
                protocol::authentication_md5_password(out, *salt);
                *asked = true;
                AuthStep::Continue
            }
            Exchange::Scram { asked, .. } => {
                protocol::authentication_sasl(out, &[scram::MECHANISM]);
                *asked = true;
                AuthStep::Continue
            }
            Exchange::Finished => {
                AuthStep::Failed(AuthFailure::protocol("authentication already finished"))
            }
        }
    }

    /// Feeds one whole client message (header included).
    pub fn on_message(&mut self, msg: &[u8], out: &mut BytesMut) -> AuthStep {
        if msg.first() != Some(&b'p') {
            self.exchange = Exchange::Finished;
            return AuthStep::Failed(AuthFailure::protocol(
                "expected an authentication message (tag 'p')",
            ));
        }
        let step = match &mut self.exchange {
            Exchange::Cleartext {
                secret,
                asked: true,
            } => {
                let Some(given) = protocol::body(msg).strip_suffix(&[0]) else {
                    return self.fail(AuthFailure::protocol("malformed password message"));
                };
                match secret {
                    Some(s) if s.verify_password(&self.user, given) => {
                        self.learned = std::str::from_utf8(given)
                            .ok()
                            .map(|p| ServerCredential::Password(p.to_owned()));
                        AuthStep::Done
                    }
                    _ => AuthStep::Failed(AuthFailure::bad_password(&self.user)),
                }
            }
            Exchange::Md5 {
                hash,
                salt,
                asked: true,
            } => {
                let Some(given) = protocol::body(msg).strip_suffix(&[0]) else {
                    return self.fail(AuthFailure::protocol("malformed password message"));
                };
                match hash {
                    Some(h) if constant_time_eq(secret::md5_salted(h, *salt).as_bytes(), given) => {
                        AuthStep::Done
                    }
                    _ => AuthStep::Failed(AuthFailure::bad_password(&self.user)),
                }
            }
            Exchange::Scram {
                server,
                started,
                asked: true,
            } => {
                let data = if *started {
                    protocol::body(msg)
                } else {
                    let Some((mechanism, data)) = protocol::parse_sasl_initial_response(msg) else {
                        return self.fail(AuthFailure::protocol("malformed SASLInitialResponse"));
                    };
                    if mechanism != scram::MECHANISM.as_bytes() {
                        return self.fail(AuthFailure::protocol(
                            "client selected an invalid SASL authentication mechanism",
                        ));
                    }
                    *started = true;
                    data.unwrap_or_default()
                };
                match server.on_message(data) {
                    ServerStep::Continue(server_first) => {
                        protocol::authentication_sasl_continue(out, &server_first);
                        return AuthStep::Continue;
                    }
                    ServerStep::Done { server_final, keys } => {
                        protocol::authentication_sasl_final(out, &server_final);
                        self.learned = Some(ServerCredential::Scram(keys));
                        AuthStep::Done
                    }
                    ServerStep::Failed(ScramError::BadProof) => {
                        AuthStep::Failed(AuthFailure::bad_password(&self.user))
                    }
                    ServerStep::Failed(e @ ScramError::Malformed(_)) => {
                        AuthStep::Failed(AuthFailure::protocol(e.to_string()))
                    }
                    ServerStep::Failed(e @ ScramError::Unsupported(_)) => {
                        AuthStep::Failed(AuthFailure {
                            code: sqlstate::FEATURE_NOT_SUPPORTED,
                            message: e.to_string(),
                        })
                    }
                }
            }
            _ => AuthStep::Failed(AuthFailure::protocol(
                "unexpected message during authentication",
            )),
        };
        self.exchange = Exchange::Finished;
        step
    }

    fn fail(&mut self, f: AuthFailure) -> AuthStep {
        self.exchange = Exchange::Finished;
        AuthStep::Failed(f)
    }
}

#[cfg(test)]
mod tests;
