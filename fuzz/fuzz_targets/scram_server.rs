//! The SCRAM-SHA-256 server state machine over arbitrary client messages,
//! and the pass-through client over arbitrary server messages.
//!
//! Input: byte 0 picks the mode; the rest is split at the first NUL into a
//! client-first and a client-final message (mode bit 0: a well-formed
//! client-first is used instead and the whole rest is the client-final, so
//! the fuzzer reaches the proof check).
//!
//! Checks: no panic; a fake exchange (unknown user) never succeeds; a
//! message after the end is refused; the client refuses a server-first
//! whose nonce does not extend its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::auth::scram::{ScramClient, ScramServer, ServerStep};
use pgsluice::auth::{ScramKeys, ScramSecret};

const SALT: &[u8] = b"0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (first, last): (&[u8], &[u8]) = if mode & 1 == 1 {
        (b"n,,n=,r=fuzznonce", rest)
    } else {
        match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        }
    };
    let fake = mode & 2 == 2;
    let mut server = if fake {
        ScramServer::fake(SALT.to_vec(), 2, "srvnonce".into())
    } else {
        ScramServer::new(ScramSecret::derive(b"pencil", SALT, 2), "srvnonce".into())
    };
    match server.on_message(first) {
        ServerStep::Continue(server_first) => {
            assert!(server_first.starts_with(b"r="));
            let step = server.on_message(last);
            if fake {
                assert!(!matches!(step, ServerStep::Done { .. }), "a fake exchange succeeded");
            }
            assert!(matches!(server.on_message(last), ServerStep::Failed(_)));
        }
        ServerStep::Failed(_) => {
            assert!(matches!(server.on_message(last), ServerStep::Failed(_)));
        }
        ServerStep::Done { .. } => panic!("done after one message"),
    }

    if mode & 4 == 4 {
        let keys = ScramKeys::derive(b"pencil", SALT, 2);
        let mut client = ScramClient::new(keys, "clientnonce".into());
        let _ = client.client_first();
        if let Ok(final_msg) = client.on_server_first(first) {
            assert!(first.starts_with(b"r=clientnonce"));
            assert!(final_msg.starts_with(b"c=biws,r=clientnonce"));
            let _ = client.on_server_final(last);
        }
    }
});
