//! Message framing: a 1-byte tag, a 4-byte big-endian length that counts
//! itself, then the body.
//!
//! The relay never decodes rows. [`Scanner`] walks a byte stream header by
//! header and reports, for each stretch of bytes, whether it may be forwarded
//! as-is or holds a complete message the caller asked to inspect. Bodies the
//! caller does not need (DataRow, CopyData, Bind…) are passed through even
//! when only part of them has arrived, so a large result is streamed, not
//! buffered.

/// Tag byte plus the length word.
pub const HEADER_LEN: usize = 5;

/// The header of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Total length on the wire, tag included (`1 + length word`).
    pub total_len: usize,
}

/// Reads the header at the start of `buf`, if five bytes are there.
///
/// The length word must be at least 4 and the whole message at most
/// `max_len` bytes; anything else is a protocol error before any allocation.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<Header>, super::ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(super::ProtocolError::BadLength {
            what: "message",
            len: i64::from(len),
        });
    }
    let total_len = len as usize + 1;
    if total_len > max_len {
        return Err(super::ProtocolError::TooLarge {
            what: "message",
            len: total_len,
            max: max_len,
            limit: "max_packet_size",
        });
    }
    Ok(Some(Header {
        tag: buf[0],
        total_len,
    }))
}

/// One step of a scan over a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes that need no inspection: pass them on.
    Pass { len: usize },
    /// A message starts here (its header is complete). `whole` is true when
    /// the entire message (`header.total_len` bytes) is in the buffer.
    Start { header: Header, whole: bool },
    /// More bytes are needed before anything else can be said.
    NeedMore,
}

/// Resumable position in a message stream.
///
/// The scanner only remembers how many bytes of the current message body are
/// still to come, so the caller may forward or drop bytes between calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scanner {
    /// Bytes of a message already started whose remainder has not arrived.
    remaining: usize,
}

impl Scanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when the stream is exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Looks at `buf` (the unconsumed bytes) and says what comes next.
    ///
    /// After `Start`, the caller either consumes the whole message (advancing
    /// by `header.total_len`) or passes its available prefix on with
    /// [`Scanner::pass_partial`].
    pub fn next(&mut self, buf: &[u8], max_len: usize) -> Result<Segment, super::ProtocolError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(Segment::NeedMore);
            }
            let len = self.remaining.min(buf.len());
            self.remaining -= len;
            return Ok(Segment::Pass { len });
        }
        match peek_header(buf, max_len)? {
            None => Ok(Segment::NeedMore),
            Some(header) => Ok(Segment::Start {
                header,
                whole: buf.len() >= header.total_len,
            }),
        }
    }

    /// Forwards the available part of the message that starts at the front of
    /// `available` bytes; returns how many bytes may be passed on now.
    pub fn pass_partial(&mut self, header: Header, available: usize) -> usize {
        let len = header.total_len.min(available);
        self.remaining = header.total_len - len;
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(peek_header(b"Z\0\0\0", 100), Ok(None));
        let h = peek_header(&msg(b'Z', b"I"), 100).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                tag: b'Z',
                total_len: 6
            }
        );
    }

    #[test]
    fn rejects_short_and_oversized_lengths() {
        assert!(peek_header(b"Q\0\0\0\x03", 100).is_err());
        assert!(peek_header(b"Q\xff\xff\xff\xff", 100).is_err());
        let err = peek_header(b"Q\0\0\x10\0", 100).unwrap_err();
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }

    #[test]
    fn scanner_streams_partial_bodies() {
        let data = msg(b'D', &[7u8; 100]);
        let mut s = Scanner::new();
        // Only 30 bytes have arrived.
        let Segment::Start { header, whole } = s.next(&data[..30], 1 << 20).unwrap() else {
            panic!("expected a start")
        };
        assert!(!whole);
        assert_eq!(s.pass_partial(header, 30), 30);
        assert!(!s.at_boundary());
        // The rest arrives with the next message behind it.
        let mut rest = data[30..].to_vec();
        rest.extend(msg(b'Z', b"I"));
        assert_eq!(s.next(&rest, 1 << 20).unwrap(), Segment::Pass { len: 75 });
        assert!(s.at_boundary());
        let Segment::Start { header, whole } = s.next(&rest[75..], 1 << 20).unwrap() else {
            panic!("expected a start")
        };
        assert!(whole);
        assert_eq!(header.tag, b'Z');
    }
}
