//! Encryption negotiation, before the startup packet: TLS after an
//! SSLRequest, or PostgreSQL 17's direct TLS (the client opens with a TLS
//! ClientHello; ALPN `postgresql` is then required). GSSENCRequest is always
//! refused. What follows (startup, cancel) is read by the login.

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{LoginError, read_more};
use crate::protocol::{self, GSSENC_REQUEST_CODE, ProtocolError, SSL_REQUEST_CODE};
use crate::proxy::Shared;
use crate::tls::{ALPN_POSTGRESQL, ClientStream};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Why negotiation stopped; `stream` is where an error can still be sent.
pub(super) struct OpenError {
    pub stream: Option<ClientStream>,
    pub error: LoginError,
}

impl OpenError {
    fn plain(tcp: TcpStream, error: LoginError) -> Self {
        Self {
            stream: Some(ClientStream::Plain(tcp)),
            error,
        }
    }

    fn closed(error: LoginError) -> Self {
        Self {
            stream: None,
            error,
        }
    }
}

enum Request {
    Ssl,
    GssEnc,
    /// Anything else: left in the buffer for the login.
    Other,
}

/// An 8-byte SSLRequest/GSSENCRequest at the front of `buf`, consumed;
/// `None` until enough bytes are there to tell.
fn encryption_request(buf: &mut BytesMut) -> Option<Request> {
    if buf.len() < 4 {
        return None;
    }
    if buf[..4] != 8i32.to_be_bytes() {
        return Some(Request::Other);
    }
    if buf.len() < 8 {
        return None;
    }
    let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let request = match code {
        SSL_REQUEST_CODE => Request::Ssl,
        GSSENC_REQUEST_CODE => Request::GssEnc,
        _ => return Some(Request::Other),
    };
    buf.advance(8);
    Some(request)
}

/// Negotiates encryption with a new client and returns its stream, TLS or
/// plain. Bytes read past the negotiation stay in `buf`.
pub(super) async fn open(
    mut tcp: TcpStream,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<ClientStream, OpenError> {
    let acceptor = shared.tls.load().acceptor.clone();
    // A direct TLS handshake (PostgreSQL 17) starts with its record type.
    // With TLS on, the first byte is peeked so the acceptor gets it; with
    // TLS off nothing needs leaving in the socket, so the first bytes are
    // read, one syscall less per login.
    let direct_tls = match &acceptor {
        Some(_) => {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) => return Err(OpenError::closed(LoginError::Gone)),
                Ok(_) => first[0] == TLS_HANDSHAKE,
                Err(e) => return Err(OpenError::closed(e.into())),
            }
        }
        None => {
            if let Err(e) = read_more(&mut tcp, buf).await {
                return Err(OpenError::closed(e));
            }
            buf.first() == Some(&TLS_HANDSHAKE)
        }
    };
    if direct_tls {
        let Some(acceptor) = acceptor else {
            return Err(OpenError::closed(
                ProtocolError::Malformed("direct TLS connection, but TLS is disabled").into(),
            ));
        };
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| OpenError::closed(e.into()))?;
        let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
        let stream = ClientStream::from(tls);
        if !alpn_ok {
            return Err(OpenError {
                stream: Some(stream),
                error: ProtocolError::Malformed(
                    "direct TLS connection without ALPN protocol \"postgresql\"",
                )
                .into(),
            });
        }
        tracing::debug!("direct TLS connection");
        return Ok(stream);
    }
    loop {
        let request = match encryption_request(buf) {
            Some(r) => r,
            None => match read_more(&mut tcp, buf).await {
                Ok(()) => continue,
                Err(e) => return Err(OpenError::plain(tcp, e)),
            },
        };
        let answer = match (&request, &acceptor) {
            (Request::Other, _) => return Ok(ClientStream::Plain(tcp)),
            (Request::Ssl, Some(_)) => b'S',
            _ => protocol::REFUSE_ENCRYPTION,
        };
        if !buf.is_empty() {
            // Bytes sent before our answer could be injected by a man in
            // the middle; PostgreSQL refuses them too.
            let e = ProtocolError::Malformed("data received after an encryption request");
            return Err(OpenError::plain(tcp, e.into()));
        }
        if let Err(e) = tcp.write_all(&[answer]).await {
            return Err(OpenError::closed(e.into()));
        }
        if let (Request::Ssl, Some(acceptor)) = (request, &acceptor) {
            let tls = acceptor
                .accept(tcp)
                .await
                .map_err(|e| OpenError::closed(e.into()))?;
            return Ok(ClientStream::from(tls));
        }
    }
}
