//! The untagged packets a client may open a connection with: StartupMessage,
//! SSLRequest, GSSENCRequest and CancelRequest.

use bytes::{Buf, BytesMut};

use super::ProtocolError;

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
pub const PROTOCOL_3_0: i32 = 196_608;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;

/// Startup parameters in the order the client sent them (order matters to
/// nobody, but transparency is cheaper than an argument about it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams(pub Vec<(String, String)>);

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    Startup {
        /// Minor protocol version requested (3.x); anything above 0 is
        /// answered with NegotiateProtocolVersion.
        minor: u16,
        params: StartupParams,
        /// `_pq_.*` protocol options we do not support, to be listed in
        /// NegotiateProtocolVersion.
        unsupported_options: Vec<String>,
    },
}

/// Parses one startup-phase packet from the front of `buf`, consuming it.
///
/// Returns `Ok(None)` until the whole packet has arrived. The length word is
/// checked against [`MAX_STARTUP_PACKET`] before waiting for the body.
pub fn read_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 8 {
        // The length word alone can already be judged.
        if buf.len() >= 4 {
            check_len(i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))?;
        }
        return Ok(None);
    }
    let len = check_len(i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))?;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    let parsed = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::Ssl,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEnc,
        CANCEL_REQUEST_CODE if len == 16 => StartupPacket::Cancel {
            process_id: packet.get_i32(),
            secret_key: packet.get_i32(),
        },
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            return Err(ProtocolError::BadLength {
                what: "startup request",
                len: len as i64,
            });
        }
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let (params, unsupported_options) = parse_params(&packet)?;
            StartupPacket::Startup {
                minor,
                params,
                unsupported_options,
            }
        }
    };
    Ok(Some(parsed))
}

fn check_len(len: i32) -> Result<usize, ProtocolError> {
    if len < 8 {
        return Err(ProtocolError::BadLength {
            what: "startup packet",
            len: i64::from(len),
        });
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::TooLarge {
            what: "startup packet",
            len,
            max: MAX_STARTUP_PACKET,
            limit: "the startup packet limit",
        });
    }
    Ok(len)
}

fn parse_params(mut body: &[u8]) -> Result<(StartupParams, Vec<String>), ProtocolError> {
    let mut params = Vec::new();
    let mut unsupported = Vec::new();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        if name.starts_with("_pq_.") {
            unsupported.push(name.to_owned());
        } else {
            params.push((name.to_owned(), value.to_owned()));
        }
    }
    if !body.is_empty() {
        return Err(ProtocolError::Malformed(
            "startup packet (bytes after terminator)",
        ));
    }
    if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
        return Err(ProtocolError::MissingUser);
    }
    Ok((StartupParams(params), unsupported))
}

fn take_cstr<'a>(body: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed(
            "startup packet (unterminated string)",
        ))?;
    let s = std::str::from_utf8(&body[..end])
        .map_err(|_| ProtocolError::Malformed("startup packet (invalid UTF-8)"))?;
    *body = &body[end + 1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(version: i32, pairs: &[(&str, &str)]) -> BytesMut {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(&body);
        buf
    }

    #[test]
    fn parses_startup_params() {
        let mut buf = startup(PROTOCOL_3_0, &[("user", "app"), ("database", "db")]);
        let Some(StartupPacket::Startup { minor, params, .. }) = read_startup(&mut buf).unwrap()
        else {
            panic!("not a startup")
        };
        assert_eq!(minor, 0);
        assert_eq!(params.get("user"), Some("app"));
        assert_eq!(params.get("database"), Some("db"));
        assert!(buf.is_empty());
    }

    #[test]
    fn newer_minor_and_pq_options_are_reported() {
        let mut buf = startup(PROTOCOL_3_0 + 2, &[("user", "u"), ("_pq_.x", "1")]);
        let Some(StartupPacket::Startup {
            minor,
            unsupported_options,
            ..
        }) = read_startup(&mut buf).unwrap()
        else {
            panic!("not a startup")
        };
        assert_eq!(minor, 2);
        assert_eq!(unsupported_options, vec!["_pq_.x".to_owned()]);
    }

    #[test]
    fn waits_for_whole_packet_and_caps_length() {
        let full = startup(PROTOCOL_3_0, &[("user", "u")]);
        let mut partial = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(read_startup(&mut partial), Ok(None));
        let mut huge = BytesMut::from(&100_000i32.to_be_bytes()[..]);
        assert!(matches!(
            read_startup(&mut huge),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut tiny = BytesMut::from(&4i32.to_be_bytes()[..]);
        assert!(read_startup(&mut tiny).is_err());
    }

    #[test]
    fn ssl_and_cancel() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        buf.extend_from_slice(&16i32.to_be_bytes());
        buf.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        buf.extend_from_slice(&7i32.to_be_bytes());
        buf.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(read_startup(&mut buf), Ok(Some(StartupPacket::Ssl)));
        assert_eq!(
            read_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel {
                process_id: 7,
                secret_key: 9
            }))
        );
    }

    #[test]
    fn rejects_missing_user_and_old_protocol() {
        let mut buf = startup(PROTOCOL_3_0, &[("database", "d")]);
        assert!(read_startup(&mut buf).is_err());
        let mut buf = startup(2 << 16, &[("user", "u")]);
        assert!(matches!(
            read_startup(&mut buf),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
    }
}
