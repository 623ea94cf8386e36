//! Sans-IO PostgreSQL wire protocol: framing, the startup packet, and the few
//! messages pgsluice builds or inspects itself.
//!
//! Nothing here touches a socket or tokio. Parsers take a byte slice or a
//! `BytesMut` and return `Ok(None)` when more bytes are needed, so callers can
//! keep partial input in a persistent buffer (cancel-safe reads). Every length
//! read from the wire is checked against a cap *before* anything is allocated
//! for it.

mod framing;
mod messages;
mod startup;

pub use framing::{HEADER_LEN, Header, Scanner, Segment, peek_header};
pub use messages::*;
pub use startup::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, PROTOCOL_3_0, SSL_REQUEST_CODE,
    StartupPacket, StartupParams, read_startup,
};

/// Largest message PostgreSQL itself accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
pub const PG_MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// A violation of the wire protocol by the peer. Always fatal for that one
/// connection (SQLSTATE 08P01), never for anyone else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what} of {len} bytes exceeds {limit} ({max} bytes)")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
        limit: &'static str,
    },
    #[error("invalid {what} length {len}")]
    BadLength { what: &'static str, len: i64 },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
    #[error("invalid frontend message type {0}")]
    UnknownMessage(u8),
}

impl ProtocolError {
    /// The SQLSTATE PostgreSQL itself reports for this mistake.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::UnsupportedVersion { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            Self::MissingUser => sqlstate::INVALID_AUTHORIZATION,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Whether a client may send a message with this tag once logged in (the
/// set PostgreSQL's own main loop accepts).
pub fn is_frontend_message(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'S' | b'H' | b'F' | b'X' | b'd' | b'c' | b'f'
    )
}
