//! TLS on both sides of pgsluice: towards clients (pgsluice is the TLS
//! server) and towards PostgreSQL (pgsluice is the TLS client).
//!
//! Certificates and keys are read into a [`TlsContext`] once at startup and
//! again on reload (SIGHUP); the running proxy holds it in an
//! [`arc_swap::ArcSwap`] ([`TlsHandle`]), so a reload changes what *new*
//! connections use and never touches established ones. A reload that fails
//! leaves the old context in place.
//!
//! Every rustls config is built with the ring provider passed explicitly
//! (`builder_with_provider`): nothing depends on a process-wide default, so
//! any number of proxies can run in one process.

mod cert;
mod postgres;
mod stream;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use cert::common_name;
pub use postgres::{MakeRustlsConnect, connect_postgres};
pub use stream::{ClientStream, ServerStream};

/// ALPN protocol name of PostgreSQL (required for direct TLS negotiation).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// TLS towards clients (`tls.client_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`; direct TLS is refused.
    Disable,
    /// TLS when the client asks; plaintext is accepted.
    Allow,
    /// As `allow` (pgsluice never initiates TLS towards a client).
    Prefer,
    /// Plaintext logins are refused (28000).
    Require,
    /// As `require`, and the client must present a certificate signed by
    /// `tls.client_ca_file`.
    VerifyCa,
    /// As `verify-ca`, and the certificate's CN (through `tls.cert_map`)
    /// must be the user name the client logs in as.
    VerifyFull,
}

/// TLS towards PostgreSQL (`tls.server_mode`), with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerTlsMode {
    Disable,
    /// TLS if the server offers it, otherwise plaintext; the certificate is
    /// not checked.
    Prefer,
    /// TLS or fail; the certificate is not checked.
    Require,
    /// TLS, certificate chain checked against `tls.server_ca_file`.
    VerifyCa,
    /// As `verify-ca`, and the host name in the server address must match
    /// the certificate.
    VerifyFull,
}

pub(crate) const CLIENT_MODES: &str = "disable, allow, prefer, require, verify-ca, verify-full";
pub(crate) const SERVER_MODES: &str = "disable, prefer, require, verify-ca, verify-full";

impl ClientTlsMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Plaintext logins are refused.
    pub fn requires_tls(self) -> bool {
        self >= Self::Require
    }

    /// Clients must present a verified certificate.
    pub fn requires_client_cert(self) -> bool {
        self >= Self::VerifyCa
    }
}

impl ServerTlsMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The `[tls]` settings as validated: modes and file paths (files are read
/// by [`TlsContext::load`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub client_mode: ClientTlsMode,
    /// pgsluice's certificate chain and key shown to clients.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// CAs that sign client certificates (`verify-*`, `cert` auth).
    pub client_ca_file: Option<PathBuf>,
    pub server_mode: ServerTlsMode,
    /// CAs that sign PostgreSQL's certificates (`verify-*`).
    pub server_ca_file: Option<PathBuf>,
    /// pgsluice's own client certificate towards PostgreSQL (optional).
    pub server_cert_file: Option<PathBuf>,
    pub server_key_file: Option<PathBuf>,
    /// Certificate CN → user name for `cert` auth and `verify-full`; a CN
    /// not in the map stands for itself.
    pub cert_map: BTreeMap<String, String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            client_mode: ClientTlsMode::Disable,
            client_cert_file: None,
            client_key_file: None,
            client_ca_file: None,
            server_mode: ServerTlsMode::Prefer,
            server_ca_file: None,
            server_cert_file: None,
            server_key_file: None,
            cert_map: BTreeMap::new(),
        }
    }
}

impl TlsSettings {
    /// The user a certificate with this CN logs in as.
    pub fn user_for_cn<'a>(&'a self, cn: &'a str) -> &'a str {
        self.cert_map.get(cn).map_or(cn, String::as_str)
    }
}

/// A TLS file that could not be used: names the setting and the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{key}`: {file}: {reason}")]
pub struct TlsFileError {
    pub key: &'static str,
    pub file: String,
    pub reason: String,
}

/// What new connections use: rustls configs built from the files.
pub struct TlsContext {
    pub settings: TlsSettings,
    /// `None` when `client_mode = disable`.
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// `None` when `server_mode = disable`.
    pub connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("client_mode", &self.settings.client_mode)
            .field("server_mode", &self.settings.server_mode)
            .finish()
    }
}

/// The current TLS context, swapped on reload.
pub type TlsHandle = Arc<ArcSwap<TlsContext>>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl TlsContext {
    /// TLS off both ways.
    pub fn disabled() -> Self {
        Self {
            settings: TlsSettings {
                server_mode: ServerTlsMode::Disable,
                ..TlsSettings::default()
            },
            acceptor: None,
            connector: None,
        }
    }

    /// Reads every configured file and builds the rustls configs.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsFileError> {
        let acceptor = match settings.client_mode {
            ClientTlsMode::Disable => None,
            _ => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
                settings,
            )?))),
        };
        let connector = match settings.server_mode {
            ServerTlsMode::Disable => None,
            _ => Some(tokio_rustls::TlsConnector::from(Arc::new(client_config(
                settings,
            )?))),
        };
        Ok(Self {
            settings: settings.clone(),
            acceptor,
            connector,
        })
    }

    pub fn handle(self) -> TlsHandle {
        Arc::new(ArcSwap::from_pointee(self))
    }
}

fn file_error(key: &'static str, file: &Path, reason: impl std::fmt::Display) -> TlsFileError {
    TlsFileError {
        key,
        file: file.display().to_string(),
        reason: reason.to_string(),
    }
}

fn required<'a>(key: &'static str, p: &'a Option<PathBuf>) -> Result<&'a Path, TlsFileError> {
    p.as_deref().ok_or_else(|| TlsFileError {
        key,
        file: "(not set)".into(),
        reason: "required by the TLS mode".into(),
    })
}

fn read_certs(
    key: &'static str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    // Read first so a missing file reports the OS error, not a PEM error.
    let bytes = std::fs::read(file).map_err(|e| file_error(key, file, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, file, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            file,
            "no PEM certificate (BEGIN CERTIFICATE) found",
        ));
    }
    Ok(certs)
}

fn read_key(key: &'static str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = std::fs::read(file).map_err(|e| file_error(key, file, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(key, file, format!("no usable PEM private key ({e})")))
}

fn read_roots(key: &'static str, file: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(key, file)? {
        roots
            .add(c)
            .map_err(|e| file_error(key, file, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// pgsluice as the TLS server clients talk to.
fn server_config(s: &TlsSettings) -> Result<ServerConfig, TlsFileError> {
    let cert_file = required("tls.client_cert_file", &s.client_cert_file)?;
    let key_file = required("tls.client_key_file", &s.client_key_file)?;
    let certs = read_certs("tls.client_cert_file", cert_file)?;
    let key = read_key("tls.client_key_file", key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| file_error("tls.client_cert_file", cert_file, e))?;
    let builder = match &s.client_ca_file {
        Some(ca) => {
            let roots = read_roots("tls.client_ca_file", ca)?;
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if s.client_mode.requires_client_cert() {
                v
            } else {
                // Asked for, not required: `cert` rules check for one.
                v.allow_unauthenticated()
            };
            let v = v
                .build()
                .map_err(|e| file_error("tls.client_ca_file", ca, e))?;
            builder.with_client_cert_verifier(v)
        }
        None if s.client_mode.requires_client_cert() => {
            return Err(TlsFileError {
                key: "tls.client_ca_file",
                file: "(not set)".into(),
                reason: format!(
                    "client_mode = \"{}\" checks client certificates against it",
                    s.client_mode.as_str()
                ),
            });
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        file_error(
            "tls.client_key_file",
            key_file,
            format!("{e} (does the key belong to tls.client_cert_file?)"),
        )
    })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}

/// pgsluice as a TLS client of PostgreSQL.
fn client_config(s: &TlsSettings) -> Result<ClientConfig, TlsFileError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsFileError {
            key: "tls.server_mode",
            file: String::new(),
            reason: e.to_string(),
        })?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match s.server_mode {
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
            let ca = required("tls.server_ca_file", &s.server_ca_file)?;
            let roots = read_roots("tls.server_ca_file", ca)?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| file_error("tls.server_ca_file", ca, e))?;
            if s.server_mode == ServerTlsMode::VerifyCa {
                Arc::new(verify::IgnoreName(webpki))
            } else {
                webpki
            }
        }
        _ => Arc::new(verify::Unchecked(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&s.server_cert_file, &s.server_key_file) {
        (Some(c), Some(k)) => {
            let certs = read_certs("tls.server_cert_file", c)?;
            let key = read_key("tls.server_key_file", k)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| file_error("tls.server_key_file", k, e))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests;
