//! The session's relay loop (`Scanner` over a persistent buffer) over an
//! arbitrary byte stream, read in arbitrary chunk sizes.
//!
//! Input: byte 0 picks which tags are inspected and the length cap, bytes
//! 1..=4 are read sizes (cycled), the rest is the stream.
//!
//! Checked against a one-pass reference framer over the whole stream: no
//! panic; the bytes forwarded are exactly the bytes consumed, in order;
//! every message start reported is a real boundary, in order, and none is
//! skipped; an over-long or under-long length word stops the relay right at
//! that message, with everything before it forwarded.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsluice::protocol::{HEADER_LEN, PG_MAX_MESSAGE_LEN, Scanner, Segment};
use pgsluice::frontend::server_tag_inspected;

fn inspected(mode: u8, tag: u8) -> bool {
    match mode & 3 {
        0 => server_tag_inspected(tag),
        1 => tag == b'X',
        2 => true,
        _ => false,
    }
}

fn max_len(mode: u8) -> usize {
    match (mode >> 2) & 3 {
        0 => PG_MAX_MESSAGE_LEN,
        1 => 1 << 16,
        2 => 256,
        _ => HEADER_LEN + usize::from(mode >> 4),
    }
}

fn read_size(b: u8, left: usize) -> usize {
    match b {
        0 => left,
        b if b & 0x80 != 0 => usize::from(b & 0x7f) * 64 + 1,
        b => usize::from(b),
    }
}

/// Message starts (offset, tag, total length) of a stream, and the offset of
/// the first invalid length word, read in one pass.
fn reference(stream: &[u8], max: usize) -> (Vec<(usize, u8, usize)>, Option<usize>) {
    let mut starts = Vec::new();
    let mut at = 0;
    while stream.len() - at >= HEADER_LEN {
        let len = i32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap());
        if len < 4 || len as usize + 1 > max {
            return (starts, Some(at));
        }
        let total = len as usize + 1;
        starts.push((at, stream[at], total));
        at = at.saturating_add(total);
        if at >= stream.len() {
            break;
        }
    }
    (starts, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (mode, sizes, stream) = (data[0], &data[1..5], &data[5..]);
    let max = max_len(mode);

    let mut scanner = Scanner::new();
    let mut buf = BytesMut::new();
    let mut forwarded = Vec::new();
    let mut starts = Vec::new();
    let mut consumed = 0; // stream offset of buf[0]
    let mut fed = 0;
    let mut error_at = None;
    let mut sizes = sizes.iter().cycle();
    while fed < stream.len() && error_at.is_none() {
        let n = read_size(*sizes.next().unwrap(), stream.len() - fed).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;

        let mut pos = 0;
        loop {
            match scanner.next(&buf[pos..], max) {
                Ok(Segment::Pass { len }) => {
                    assert!(len > 0 && pos + len <= buf.len());
                    forwarded.extend_from_slice(&buf[pos..pos + len]);
                    pos += len;
                }
                Ok(Segment::NeedMore) => break,
                Ok(Segment::Start { header, whole }) => {
                    assert_eq!(whole, buf.len() - pos >= header.total_len);
                    if inspected(mode, header.tag) {
                        if !whole {
                            break;
                        }
                        starts.push((consumed + pos, header.tag, header.total_len));
                        forwarded.extend_from_slice(&buf[pos..pos + header.total_len]);
                        pos += header.total_len;
                    } else {
                        starts.push((consumed + pos, header.tag, header.total_len));
                        let len = scanner.pass_partial(header, buf.len() - pos);
                        assert!(len > 0 && pos + len <= buf.len());
                        forwarded.extend_from_slice(&buf[pos..pos + len]);
                        pos += len;
                    }
                }
                Err(_) => {
                    error_at = Some(consumed + pos);
                    break;
                }
            }
        }
        let _ = buf.split_to(pos);
        consumed += pos;
        assert_eq!(forwarded.len(), consumed, "forwarded != consumed");
        assert_eq!(&forwarded[..], &stream[..consumed]);
    }

    let (expected, expected_error) = reference(stream, max);
    assert_eq!(error_at, expected_error);
    // Every start reported is a real boundary, in order.
    assert_eq!(&starts[..], &expected[..starts.len()]);
    if error_at.is_none() {
        // Only an incomplete inspected message may be left unreported.
        match &expected[starts.len()..] {
            [] => {}
            [(at, tag, total)] => {
                assert!(inspected(mode, *tag) && at + total > stream.len());
                assert_eq!(consumed, *at);
            }
            more => panic!("{} messages never reported", more.len()),
        }
        // Whatever was not forwarded is the start of an incomplete message.
        let left = stream.len() - consumed;
        if !scanner.at_boundary() {
            assert_eq!(left, 0, "a partial body was held back");
        } else if left >= HEADER_LEN {
            let (at, tag, total) = expected[expected.len() - 1];
            assert!(at == consumed && inspected(mode, tag) && at + total > stream.len());
        }
    }
});
