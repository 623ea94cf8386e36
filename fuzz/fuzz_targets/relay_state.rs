//! `RelayState` fed an arbitrary interleaving of client tags and whole
//! server messages (arbitrary, or well-formed ReadyForQuery / ErrorResponse
//! / ParameterStatus built from the input).
//!
//! Checked after every step: no panic; `at_boundary` implies `quiet`
//! implies nothing pending; the query timer runs whenever a request is
//! pending and never while the relay is quiet; a server once unusable stays
//! unusable (until `reset` hands it over); each event agrees with the state
//! change it reports.
#![no_main]

use std::time::Instant;

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgsluice::frontend::{RelayState, ServerEvent};
use pgsluice::protocol::{self, Severity, TxStatus};

/// Real frontend tags, so that interesting sequences come up often.
const CLIENT_TAGS: &[u8] = b"QPBEDSHCFXdcf";
/// Real backend tags, ditto.
const SERVER_TAGS: &[u8] = b"123ACcdDEGHIKnNRSsTtVvWZ";

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn text(&mut self) -> String {
        let n = usize::from(self.byte() % 16);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }

    fn pick(&mut self, from: &[u8]) -> u8 {
        let b = self.byte();
        if b & 0x80 != 0 {
            from[usize::from(b & 0x7f) % from.len()]
        } else {
            b
        }
    }
}

fn message(tag: u8, body: &[u8]) -> BytesMut {
    let mut m = BytesMut::with_capacity(5 + body.len());
    m.put_u8(tag);
    m.put_i32(4 + body.len() as i32);
    m.put_slice(body);
    m
}

fn server_message(input: &mut Input) -> BytesMut {
    let mut m = BytesMut::new();
    match input.byte() % 4 {
        0 => {
            let status = match input.byte() % 4 {
                0 => b'I',
                1 => b'T',
                2 => b'E',
                _ => input.byte(),
            };
            m = message(b'Z', &[status]);
        }
        1 => {
            let severity = if input.byte() & 1 == 0 {
                Severity::Error
            } else {
                Severity::Fatal
            };
            let (code, text) = (input.text(), input.text());
            protocol::error_response(&mut m, severity, &code, &text);
        }
        2 => {
            let (name, value) = (input.text(), input.text());
            protocol::parameter_status(&mut m, &name, &value);
        }
        _ => {
            let tag = input.pick(SERVER_TAGS);
            let n = usize::from(input.byte());
            m = message(tag, input.bytes(n));
        }
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut r = RelayState::new();
    let now = Instant::now();
    while !input.0.is_empty() {
        let pending = r.pending();
        let unusable = r.server_unusable;
        match input.byte() % 8 {
            0..=3 => {
                let tag = input.pick(CLIENT_TAGS);
                r.on_client_tag(tag, now);
                assert!(r.pending() == pending || r.pending() == pending + 1);
                if r.pending() > pending {
                    assert!(matches!(tag, b'Q' | b'F' | b'S'), "{tag}");
                }
            }
            4..=6 => {
                let msg = server_message(&mut input);
                let tag = msg[0];
                let event = r.on_server_message(tag, &msg, now);
                match &event {
                    ServerEvent::Ready(status) => {
                        assert_eq!(tag, b'Z');
                        assert_eq!(r.pending() + 1, pending);
                        assert_eq!(r.tx_status(), *status);
                        assert_eq!(protocol::parse_ready_for_query(&msg), Some(*status));
                    }
                    ServerEvent::Desync => {
                        assert_eq!(tag, b'Z');
                        assert!(r.server_unusable);
                        assert_eq!(r.pending(), pending);
                    }
                    ServerEvent::Fatal(fields) => {
                        assert_eq!(tag, b'E');
                        assert!(fields.is_fatal() && r.server_unusable);
                    }
                    ServerEvent::Parameter { .. } => assert_eq!(tag, b'S'),
                    ServerEvent::None if matches!(tag, b'G' | b'W') => {
                        // An extended-protocol Sync sent ahead of COPY IN is
                        // swallowed by the server: at most that one goes.
                        assert!(!r.quiet(), "COPY IN started but the relay is quiet");
                        assert!(r.pending() == pending || r.pending() + 1 == pending);
                    }
                    ServerEvent::None => {
                        assert_ne!(tag, b'Z', "ReadyForQuery must be Ready or Desync");
                        assert_eq!(r.pending(), pending);
                    }
                }
            }
            _ if input.byte() & 1 == 0 => {
                r.force_idle();
                assert_eq!(r.tx_status(), TxStatus::Idle);
            }
            _ => {
                // The server is handed to another client.
                r.reset();
                assert!(r.at_boundary() && r.pending() == 0 && r.request_since.is_none());
                continue;
            }
        }
        if unusable {
            assert!(r.server_unusable, "an unusable server became usable");
        }
        if r.at_boundary() {
            assert!(r.quiet() && r.tx_status() == TxStatus::Idle && !r.server_unusable);
        }
        if r.quiet() {
            assert_eq!(r.pending(), 0);
        }
        // The query timer runs while a request is pending, and never while
        // the relay is quiet (nothing owed by either side).
        if r.pending() > 0 {
            assert!(r.request_since.is_some(), "request pending without a timer");
        }
        if r.quiet() {
            assert!(r.request_since.is_none(), "query timer running while quiet");
        }
    }
});
