//! Property tests for every wire parser in `protocol` and the option parser
//! in `frontend::params`.
//!
//! Each property states what the relay relies on: framing reproduces the
//! byte stream exactly whatever the read sizes, headers outside the allowed
//! range are refused before anything is allocated, an incomplete startup
//! packet is never consumed, and what pgsluice builds it can read back.
//!
//! The case count is kept low so the file runs in a few seconds in a debug
//! build; set `PROPTEST_CASES` for a longer run.

use bytes::{BufMut, BytesMut};
use pgsluice::frontend::parse_options;
use pgsluice::frontend::{client_tag_inspected, server_tag_inspected};
use pgsluice::protocol::{
    self, ErrorFields, HEADER_LEN, Header, MAX_STARTUP_PACKET, PG_MAX_MESSAGE_LEN, PROTOCOL_3_0,
    ProtocolError, Scanner, Segment, Severity, StartupPacket, peek_header, read_startup,
};
use proptest::prelude::*;

/// Tags a client sends after startup.
const FRONTEND_TAGS: &[u8] = b"BCcdDEfFHPpQSX";
/// Tags a server sends.
const BACKEND_TAGS: &[u8] = b"123ACcdDEGHIKnNRSsTtVvWZ";

/// Any text at all, NUL and control characters included (`any::<String>()`
/// never yields control characters).
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![4 => any::<char>(), 1 => Just('\0'), 1 => Just('\\'), 1 => Just(' ')],
        0..40,
    )
    .prop_map(String::from_iter)
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// (a) Streaming framing
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Msg {
    tag: u8,
    body_len: usize,
    seed: u8,
}

impl Msg {
    fn total_len(&self) -> usize {
        1 + 4 + self.body_len
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        out.extend_from_slice(&((self.body_len + 4) as i32).to_be_bytes());
        // Cheap, deterministic, shrinkable filler: the scanner never reads it.
        let mut x = self.seed;
        out.extend((0..self.body_len).map(|_| {
            x = x.wrapping_mul(73).wrapping_add(41);
            x
        }));
    }
}

fn tag() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(FRONTEND_TAGS),
        3 => prop::sample::select(BACKEND_TAGS),
        1 => any::<u8>(),
    ]
}

fn msg() -> impl Strategy<Value = Msg> {
    let body_len = prop_oneof![
        8 => 0usize..64,
        3 => 0usize..2_048,
        1 => 0usize..=20_000,
    ];
    (tag(), body_len, any::<u8>()).prop_map(|(tag, body_len, seed)| Msg {
        tag,
        body_len,
        seed,
    })
}

/// Read sizes, cycled: one byte at a time, small, socket-sized, or all at once.
fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![1]),
        prop::collection::vec(1usize..16, 1..8),
        prop::collection::vec(1usize..20_000, 1..8),
        Just(vec![usize::MAX]),
    ]
}

/// Which tags the driver needs whole, as the relay's two directions do.
#[derive(Debug, Clone)]
enum Inspect {
    Server,
    Client,
    Tags(Vec<u8>),
}

impl Inspect {
    fn wants(&self, tag: u8) -> bool {
        match self {
            Inspect::Server => server_tag_inspected(tag),
            Inspect::Client => client_tag_inspected(tag),
            Inspect::Tags(tags) => tags.contains(&tag),
        }
    }
}

fn inspect() -> impl Strategy<Value = Inspect> {
    prop_oneof![
        Just(Inspect::Server),
        Just(Inspect::Client),
        prop::collection::vec(tag(), 0..6).prop_map(Inspect::Tags),
    ]
}

/// What a relay-style driver saw of a stream.
#[derive(Debug, Default)]
struct Relayed {
    /// Bytes forwarded, in order.
    out: Vec<u8>,
    /// (stream offset, tag) of every message the driver handled.
    starts: Vec<(usize, u8)>,
    error: Option<ProtocolError>,
}

/// Feeds `stream` in reads of `chunks` (cycled) through a persistent buffer,
/// exactly as the session forwards: pass partial bodies of uninspected
/// messages, wait for inspected ones to be whole, forward `buf[..pos]`.
fn relay(stream: &[u8], chunks: &[usize], inspect: &Inspect, max_len: usize) -> Relayed {
    let mut r = Relayed::default();
    let mut scanner = Scanner::new();
    let mut buf = BytesMut::new();
    let mut offset = 0; // stream offset of buf[0]
    let mut fed = 0;
    let mut sizes = chunks.iter().cycle();
    while fed < stream.len() {
        let n = (*sizes.next().unwrap()).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;

        let mut pos = 0;
        loop {
            match scanner.next(&buf[pos..], max_len) {
                Ok(Segment::Pass { len }) => {
                    assert!(len > 0 && pos + len <= buf.len(), "bad pass of {len}");
                    pos += len;
                }
                Ok(Segment::NeedMore) => break,
                Ok(Segment::Start { header, whole }) => {
                    assert_eq!(whole, buf.len() - pos >= header.total_len);
                    if inspect.wants(header.tag) {
                        if !whole {
                            break;
                        }
                        r.starts.push((offset + pos, header.tag));
                        let msg = &buf[pos..pos + header.total_len];
                        assert_eq!(msg, &stream[offset + pos..offset + pos + header.total_len]);
                        pos += header.total_len;
                    } else {
                        r.starts.push((offset + pos, header.tag));
                        let len = scanner.pass_partial(header, buf.len() - pos);
                        assert!(len > 0);
                        pos += len;
                    }
                }
                Err(e) => {
                    r.error = Some(e);
                    break;
                }
            }
        }
        r.out.extend_from_slice(&buf[..pos]);
        let _ = buf.split_to(pos);
        offset += pos;
        if r.error.is_some() {
            return r;
        }
    }
    assert!(buf.is_empty(), "{} bytes left unforwarded", buf.len());
    assert!(scanner.at_boundary());
    r
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn scanner_reproduces_stream_and_boundaries(
        msgs in prop::collection::vec(msg(), 0..12),
        chunks in chunks(),
        inspect in inspect(),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for m in &msgs {
            expected.push((stream.len(), m.tag));
            m.encode(&mut stream);
        }
        let r = relay(&stream, &chunks, &inspect, PG_MAX_MESSAGE_LEN);
        prop_assert_eq!(r.error, None);
        prop_assert!(r.out == stream, "forwarded bytes differ from the stream");
        prop_assert_eq!(r.starts, expected);
    }

    /// A message over the cap is refused as soon as its header is complete,
    /// and everything before it has been forwarded intact.
    #[test]
    fn scanner_stops_at_first_oversized_message(
        msgs in prop::collection::vec(msg(), 1..10),
        chunks in chunks(),
        inspect in inspect(),
        max_len in HEADER_LEN..4_096,
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut too_big = None;
        for m in &msgs {
            if too_big.is_none() {
                if m.total_len() > max_len {
                    too_big = Some(stream.len());
                } else {
                    expected.push((stream.len(), m.tag));
                }
            }
            m.encode(&mut stream);
        }
        let r = relay(&stream, &chunks, &inspect, max_len);
        match too_big {
            Some(at) => {
                let is_too_large = matches!(r.error, Some(ProtocolError::TooLarge { .. }));
                prop_assert!(is_too_large, "{:?}", r.error);
                prop_assert!(r.out == stream[..at], "forwarded {} of {} bytes", r.out.len(), at);
            }
            None => {
                prop_assert_eq!(r.error, None);
                prop_assert!(r.out == stream);
            }
        }
        prop_assert_eq!(r.starts, expected);
    }
}

// ---------------------------------------------------------------------------
// (b) peek_header
// ---------------------------------------------------------------------------

fn length_word() -> impl Strategy<Value = i32> {
    prop_oneof![
        any::<i32>(),
        -2i32..12,
        (i32::MAX - 4)..=i32::MAX,
        i32::MIN..(i32::MIN + 4),
        0i32..70_000,
    ]
}

fn cap() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..16,
        0usize..70_000,
        Just(PG_MAX_MESSAGE_LEN),
        Just(usize::MAX),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn peek_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..16), max in cap()) {
        let _ = peek_header(&bytes, max);
    }

    #[test]
    fn peek_header_checks_every_length(
        tag in any::<u8>(),
        len in length_word(),
        extra in prop::collection::vec(any::<u8>(), 0..8),
        max in cap(),
    ) {
        let mut buf = vec![tag];
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&extra);
        // Fewer than five bytes: never a verdict.
        for cut in 0..HEADER_LEN {
            prop_assert_eq!(peek_header(&buf[..cut], max), Ok(None));
        }
        let got = peek_header(&buf, max);
        if len < 4 {
            let is_bad_length = matches!(got, Err(ProtocolError::BadLength { .. }));
            prop_assert!(is_bad_length, "{:?}", got);
        } else if len as usize + 1 > max {
            let is_too_large = matches!(got, Err(ProtocolError::TooLarge { .. }));
            prop_assert!(is_too_large, "{:?}", got);
        } else {
            prop_assert_eq!(got, Ok(Some(Header { tag, total_len: len as usize + 1 })));
        }
    }
}

// ---------------------------------------------------------------------------
// (c) read_startup
// ---------------------------------------------------------------------------

/// Bytes that look enough like a startup packet to get past the length word.
fn startup_like() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(PROTOCOL_3_0),
        (0u16..4).prop_map(|minor| PROTOCOL_3_0 + i32::from(minor)),
        Just(protocol::SSL_REQUEST_CODE),
        Just(protocol::GSSENC_REQUEST_CODE),
        Just(protocol::CANCEL_REQUEST_CODE),
        any::<i32>(),
    ];
    let body = prop::collection::vec(
        prop_oneof![
            4 => any::<u8>(),
            2 => Just(0u8),
            2 => prop::sample::select(b"user".as_slice()),
        ],
        0..64,
    );
    (code, body, -3i32..8, any::<bool>()).prop_map(|(code, body, skew, lie)| {
        let mut v = Vec::new();
        let len = 8 + body.len() as i32;
        v.extend_from_slice(&(if lie { len + skew } else { len }).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&body);
        v
    })
}

/// Runs `read_startup` once and checks what it did to the buffer.
fn read_startup_checked(bytes: &[u8]) -> Result<Option<StartupPacket>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let got = read_startup(&mut buf);
    if let Some(word) = bytes.get(..4) {
        let len = i32::from_be_bytes(word.try_into().unwrap());
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
            assert!(got.is_err(), "length word {len} accepted: {got:?}");
        }
    }
    match &got {
        Ok(None) => assert_eq!(&buf[..], bytes, "Ok(None) consumed bytes"),
        Ok(Some(_)) => {
            let len = i32::from_be_bytes(bytes[..4].try_into().unwrap());
            assert!((8..=MAX_STARTUP_PACKET as i32).contains(&len));
            assert_eq!(
                &buf[..],
                &bytes[len as usize..],
                "consumed other than one packet"
            );
        }
        Err(_) => {}
    }
    got
}

fn cstr() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z_][a-zA-Z0-9_.]{0,20}",
        text().prop_map(|s| s.replace('\0', "")),
    ]
}

#[derive(Debug, Clone)]
struct Startup {
    minor: u16,
    params: Vec<(String, String)>,
    pq_options: Vec<String>,
}

impl Startup {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.put_i32(PROTOCOL_3_0 | i32::from(self.minor));
        for (k, v) in &self.params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        for o in &self.pq_options {
            body.extend_from_slice(o.as_bytes());
            body.extend_from_slice(b"\0on\0");
        }
        body.push(0);
        let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        v
    }
}

fn startup_packet() -> impl Strategy<Value = Startup> {
    let name = cstr().prop_filter("names are non-empty and not _pq_.", |n| {
        !n.is_empty() && !n.starts_with("_pq_.")
    });
    (
        any::<u16>(),
        cstr(),
        prop::collection::vec((name, cstr()), 0..8),
        0usize..8,
        prop::collection::vec("_pq_\\.[a-z_]{1,12}", 0..3),
    )
        .prop_map(|(minor, user, mut params, at, pq_options)| {
            params.insert(at.min(params.len()), ("user".to_owned(), user));
            Startup {
                minor,
                params,
                pq_options,
            }
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn read_startup_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = read_startup_checked(&bytes);
    }

    #[test]
    fn read_startup_on_startup_like_bytes(bytes in startup_like()) {
        for cut in 0..=bytes.len() {
            let _ = read_startup_checked(&bytes[..cut]);
        }
    }

    #[test]
    fn read_startup_returns_the_params_sent(
        packet in startup_packet(),
        trailing in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let wire = packet.encode();
        if wire.len() > MAX_STARTUP_PACKET {
            // Refused on the length word alone, before the body arrives.
            let got = read_startup_checked(&wire[..4]);
            let is_too_large = matches!(got, Err(ProtocolError::TooLarge { .. }));
            prop_assert!(is_too_large, "{:?}", got);
            return Ok(());
        }
        for cut in 0..wire.len() {
            prop_assert_eq!(read_startup_checked(&wire[..cut]), Ok(None));
        }
        let mut stream = wire.clone();
        stream.extend_from_slice(&trailing);
        let got = read_startup_checked(&stream);
        if !packet.params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
            // As PostgreSQL: no (or an empty) user name is refused with 28000.
            prop_assert_eq!(got, Err(ProtocolError::MissingUser));
            return Ok(());
        }
        let expected = StartupPacket::Startup {
            minor: packet.minor,
            params: protocol::StartupParams(packet.params.clone()),
            unsupported_options: packet.pq_options.clone(),
        };
        prop_assert_eq!(got, Ok(Some(expected)));
    }
}

// ---------------------------------------------------------------------------
// (d) Builders round-trip through the parsers
// ---------------------------------------------------------------------------

fn no_nul(s: &str) -> String {
    s.replace('\0', "")
}

fn severity() -> impl Strategy<Value = Severity> {
    prop_oneof![Just(Severity::Error), Just(Severity::Fatal)]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn error_response_round_trips(
        prefix in prop::collection::vec(any::<u8>(), 0..8),
        severity in severity(),
        code in text(),
        message in text(),
    ) {
        let mut buf = BytesMut::from(&prefix[..]);
        protocol::error_response(&mut buf, severity, &code, &message);
        let msg = &buf[prefix.len()..];
        let header = peek_header(msg, PG_MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(header.tag, b'E');
        prop_assert_eq!(header.total_len, msg.len());
        let f = ErrorFields::parse(msg);
        prop_assert_eq!(&f.code, &no_nul(&code));
        prop_assert_eq!(&f.message, &no_nul(&message));
        let sev = match severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        prop_assert_eq!(&f.severity, sev);
        prop_assert_eq!(f.is_fatal(), severity == Severity::Fatal);
    }

    #[test]
    fn parameter_status_round_trips(
        prefix in prop::collection::vec(any::<u8>(), 0..8),
        name in text(),
        value in text(),
    ) {
        let mut buf = BytesMut::from(&prefix[..]);
        protocol::parameter_status(&mut buf, &name, &value);
        let msg = &buf[prefix.len()..];
        let header = peek_header(msg, PG_MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(header.tag, b'S');
        prop_assert_eq!(header.total_len, msg.len());
        let (n, v) = protocol::parse_parameter_status(msg).unwrap();
        prop_assert_eq!(n, no_nul(&name));
        prop_assert_eq!(v, no_nul(&value));
    }

    /// The inspectors only ever see bytes the scanner framed, but must not
    /// panic on a short or garbled message either.
    #[test]
    fn inspectors_never_panic(msg in prop::collection::vec(any::<u8>(), 0..48)) {
        let _ = ErrorFields::parse(&msg);
        let _ = protocol::parse_parameter_status(&msg);
        let _ = protocol::parse_ready_for_query(&msg);
        let _ = protocol::parse_statement_text(&msg);
        let _ = protocol::query_text(&msg);
    }
}

// ---------------------------------------------------------------------------
// (e) parse_options
// ---------------------------------------------------------------------------

/// `value` with whitespace and backslashes escaped, as libpq users write it.
fn escape(value: &str) -> String {
    let mut s = String::new();
    for c in value.chars() {
        if c == '\\' || c.is_whitespace() {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

fn setting() -> impl Strategy<Value = (String, String)> {
    ("[a-z_][a-z0-9_.-]{0,15}", text())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parse_options_never_panics(s in text()) {
        let _ = parse_options(&s);
    }

    #[test]
    fn parse_options_never_panics_on_option_like_text(
        s in "([ \\t\\\\=-]|-c|--|[a-z]){0,40}",
    ) {
        let _ = parse_options(&s);
    }

    #[test]
    fn parse_options_reads_back_escaped_settings(
        settings in prop::collection::vec((setting(), 0u8..3, "[ \\t\\n]{1,3}"), 0..6),
    ) {
        let mut options = String::new();
        for ((name, value), form, sep) in &settings {
            let setting = format!("{name}={}", escape(value));
            match form {
                0 => options.push_str(&format!("-c{sep}{setting}")),
                1 => options.push_str(&format!("-c{setting}")),
                _ => options.push_str(&format!("--{setting}")),
            }
            options.push_str(sep);
        }
        let expected: Vec<(String, String)> = settings
            .iter()
            .map(|((n, v), _, _)| (n.replace('-', "_"), v.clone()))
            .collect();
        prop_assert_eq!(parse_options(&options), Ok(expected));
    }
}
