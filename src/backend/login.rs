//! Opening a server connection and logging in as the configured user.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BackendError, CancelKey, SERVER_BUF, ServerConn, ServerParams};
use crate::config::ServerAddr;
use crate::protocol::ErrorFields;

/// Everything needed to open one server connection.
#[derive(Debug, Clone)]
pub struct LoginSpec {
    pub addr: ServerAddr,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
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
        created: Instant::now(),
        last_used: Instant::now(),
        retire_at: None,
        prepared: std::collections::HashMap::new(),
        prepared_tick: 0,
        unnamed_owner: None,
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
    let mut scram: Option<ScramSha256> = None;
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
                let pw = password(spec, &label)?;
                let hash = postgres_protocol::authentication::md5_hash(
                    spec.user.as_bytes(),
                    pw.as_bytes(),
                    body.salt(),
                );
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
                let pw = password(spec, &label)?;
                let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| protocol_err("SASL continue without SASL start"))?;
                s.update(body.data())
                    .map_err(|e| protocol_err(&format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut out)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| protocol_err("SASL final without SASL start"))?;
                s.finish(body.data())
                    .map_err(|e| protocol_err(&format!("SCRAM server signature: {e}")))?;
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

fn password<'a>(spec: &'a LoginSpec, label: &str) -> Result<&'a str, BackendError> {
    spec.password
        .as_deref()
        .ok_or_else(|| BackendError::NoPassword {
            addr: label.to_owned(),
            user: spec.user.clone(),
        })
}
