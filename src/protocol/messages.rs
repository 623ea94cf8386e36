//! Builders for the backend messages pgsluice speaks itself, and views of the
//! few messages it inspects while relaying.

use bytes::{BufMut, BytesMut};

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// SQLSTATE codes pgsluice itself reports.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    /// A write reached a hot standby (the read was retried elsewhere).
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// Canceled by a conflict with recovery on a standby.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// config_file_error: a configuration file could not be applied.
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// Admin console: a stats user ran a command that changes something.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// Admin console: not a command it knows.
    pub const SYNTAX_ERROR: &str = "42601";
    /// Admin console: no such node or client.
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// Admin console: e.g. RESUME of a database that is not paused; login to
    /// a DISABLEd database.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// Severity of an ErrorResponse we generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the connection lives on.
    Error,
    /// The connection is about to be closed.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
        }
    }
}

/// Writes a tagged message whose body is produced by `body`, back-patching
/// the length word.
fn tagged(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - len_at) as i32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early and desynchronise the peer.
    // Checked first: a clean string is then copied whole, where a byte-by-
    // byte filter cost ~450 instructions a ParameterStatus (callgrind,
    // `pgbench -C`; a login sends 13). `contains`, not the memchr crate:
    // these strings are short, and its SIMD set-up cost more than the scan.
    if !s.as_bytes().contains(&0) {
        buf.extend_from_slice(s.as_bytes());
    } else {
        buf.extend(s.bytes().filter(|&b| b != 0));
    }
    buf.put_u8(0);
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    tagged(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// PostgreSQL's "cached plan must not change result type" error, with the
/// source fields drivers recognise it by (asyncpg prepares the statement
/// again when the routine is `RevalidateCachedQuery`).
pub fn stale_plan_error(buf: &mut BytesMut) {
    tagged(buf, b'E', |b| {
        for (kind, value) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', sqlstate::FEATURE_NOT_SUPPORTED),
            (b'M', "cached plan must not change result type"),
            (b'F', "plancache.c"),
            (b'R', "RevalidateCachedQuery"),
        ] {
            b.put_u8(kind);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    tagged(buf, b'C', |b| put_cstr(b, tag));
}

/// A result of text columns: RowDescription, one DataRow per row, and
/// CommandComplete with `tag` (the shape of a `SHOW` answer).
pub fn text_result(buf: &mut BytesMut, columns: &[&str], rows: &[Vec<String>], tag: &str) {
    tagged(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            put_cstr(b, c);
            b.put_i32(0); // table OID
            b.put_i16(0); // column number
            b.put_i32(25); // type OID: text
            b.put_i16(-1); // type size: variable
            b.put_i32(-1); // type modifier
            b.put_i16(0); // format: text
        }
    });
    for row in rows {
        tagged(buf, b'D', |b| {
            b.put_i16(row.len() as i16);
            for v in row {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
        });
    }
    command_complete(buf, tag);
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    tagged(buf, b'Z', |b| b.put_u8(status.byte()));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    tagged(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    tagged(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn authentication_ok(buf: &mut BytesMut) {
    tagged(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_cleartext_password(buf: &mut BytesMut) {
    tagged(buf, b'R', |b| b.put_i32(3));
}

/// AuthenticationMD5Password with its 4-byte salt.
pub fn authentication_md5_password(buf: &mut BytesMut, salt: [u8; 4]) {
    tagged(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

/// AuthenticationSASL offering exactly these mechanisms.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    tagged(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue carrying a server-first message.
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    tagged(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

/// AuthenticationSASLFinal carrying a server-final message.
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    tagged(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// SASLInitialResponse body ('p' during SASL): mechanism and initial data
/// (`None` when the client sent length -1).
pub fn parse_sasl_initial_response(msg: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (mechanism, rest) = split_cstr(body(msg))?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    match len {
        -1 if data.is_empty() => Some((mechanism, None)),
        n if n >= 0 && n as usize == data.len() => Some((mechanism, Some(data))),
        _ => None,
    }
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, options: &[String]) {
    tagged(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(options.len() as i32);
        for o in options {
            put_cstr(b, o);
        }
    });
}

/// Single-byte answer to SSLRequest / GSSENCRequest: not supported here.
pub const REFUSE_ENCRYPTION: u8 = b'N';

/// Body of a whole message (after the 5-byte header).
pub fn body(msg: &[u8]) -> &[u8] {
    msg.get(super::HEADER_LEN..).unwrap_or_default()
}

fn split_cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

/// ParameterStatus ('S' from the server): name and value.
pub fn parse_parameter_status(msg: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = split_cstr(body(msg))?;
    let (value, _) = split_cstr(rest)?;
    Some((
        std::str::from_utf8(name).ok()?,
        std::str::from_utf8(value).ok()?,
    ))
}

/// ReadyForQuery ('Z'): transaction status.
pub fn parse_ready_for_query(msg: &[u8]) -> Option<TxStatus> {
    body(msg).first().copied().and_then(TxStatus::from_byte)
}

/// The fields of an ErrorResponse / NoticeResponse that pgsluice acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localized severity (`V`), falling back to `S`.
    pub severity: String,
    pub code: String,
    pub message: String,
    /// Source routine (`R`): not translated, unlike the message.
    pub routine: String,
}

impl ErrorFields {
    pub fn parse(msg: &[u8]) -> Self {
        let mut fields = Self::default();
        let mut localized = String::new();
        let mut rest = body(msg);
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let Some((value, next)) = split_cstr(tail) else {
                break;
            };
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'S' => localized = value,
                b'V' => fields.severity = value,
                b'C' => fields.code = value,
                b'M' => fields.message = value,
                b'R' => fields.routine = value,
                _ => {}
            }
            rest = next;
        }
        if fields.severity.is_empty() {
            fields.severity = localized;
        }
        fields
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }

    /// "cached plan must not change result type": DDL changed what a
    /// prepared statement returns since it was planned (recognised by the
    /// routine, so a translated message is recognised too).
    pub fn is_stale_plan(&self) -> bool {
        self.code == sqlstate::FEATURE_NOT_SUPPORTED
            && (self.routine == "RevalidateCachedQuery"
                || self.message.starts_with("cached plan must not change"))
    }
}

/// The column type OIDs of a RowDescription ('T'; none for NoData 'n');
/// `None` if malformed.
pub fn row_types(msg: &[u8]) -> Option<Vec<u32>> {
    if msg.first() == Some(&b'n') {
        return Some(Vec::new());
    }
    let b = body(msg);
    let count = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut rest = b.get(2..)?;
    let mut types = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let name_end = rest.iter().position(|&b| b == 0)?;
        // Name, NUL, table OID (4), column number (2), type OID (4), type
        // size (2), type modifier (4), format (2).
        let field = rest.get(name_end + 1..name_end + 19)?;
        types.push(u32::from_be_bytes(field[6..10].try_into().ok()?));
        rest = &rest[name_end + 19..];
    }
    Some(types)
}

/// Text of a simple Query ('Q') message, without its terminator.
pub fn query_text(msg: &[u8]) -> &[u8] {
    let b = body(msg);
    b.strip_suffix(&[0]).unwrap_or(b)
}

/// Statement text of a Parse ('P') message.
pub fn parse_statement_text(msg: &[u8]) -> Option<&[u8]> {
    let (_name, rest) = split_cstr(body(msg))?;
    let (text, _) = split_cstr(rest)?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "53300", "too many\0 clients");
        let f = ErrorFields::parse(&buf);
        assert_eq!(f.code, "53300");
        assert_eq!(f.message, "too many clients");
        assert!(f.is_fatal());
        let header = super::super::peek_header(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(header.total_len, buf.len());
    }

    #[test]
    fn parameter_status_and_ready() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "TimeZone", "UTC");
        assert_eq!(parse_parameter_status(&buf), Some(("TimeZone", "UTC")));
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, TxStatus::Failed);
        assert_eq!(parse_ready_for_query(&buf), Some(TxStatus::Failed));
    }
}
