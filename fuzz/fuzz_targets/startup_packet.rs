//! `read_startup` over arbitrary bytes, packet after packet until it stops
//! consuming.
//!
//! Checked: no panic; `Ok(None)` leaves the buffer untouched; `Ok(Some)`
//! consumes exactly the length word's worth of bytes, within the cap; a
//! StartupMessage without `_pq_.` options re-encodes to the very bytes it was
//! read from (the pooler forwards parameters transparently).
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgsluice::protocol::{MAX_STARTUP_PACKET, PROTOCOL_3_0, StartupPacket, read_startup};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut offset = 0;
    loop {
        let rest = &data[offset..];
        match read_startup(&mut buf) {
            Ok(None) => {
                assert_eq!(&buf[..], rest, "Ok(None) consumed bytes");
                break;
            }
            Err(_) => break,
            Ok(Some(packet)) => {
                let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
                assert!((8..=MAX_STARTUP_PACKET as i32).contains(&len), "{len}");
                let len = len as usize;
                assert_eq!(&buf[..], &rest[len..], "consumed other than one packet");
                check(&packet, &rest[..len]);
                offset += len;
            }
        }
    }
});

fn check(packet: &StartupPacket, wire: &[u8]) {
    match packet {
        StartupPacket::Ssl | StartupPacket::GssEnc => assert_eq!(wire.len(), 8),
        StartupPacket::Cancel { .. } => assert_eq!(wire.len(), 16),
        StartupPacket::Startup {
            minor,
            params,
            unsupported_options,
        } => {
            assert!(params.get("user").is_some());
            for (name, _) in params.iter() {
                assert!(!name.is_empty() && !name.starts_with("_pq_."), "{name:?}");
            }
            for o in unsupported_options {
                assert!(o.starts_with("_pq_."), "{o:?}");
            }
            if unsupported_options.is_empty() {
                let mut again = BytesMut::new();
                again.put_i32(0);
                again.put_i32(PROTOCOL_3_0 | i32::from(*minor));
                for (k, v) in params.iter() {
                    again.put_slice(k.as_bytes());
                    again.put_u8(0);
                    again.put_slice(v.as_bytes());
                    again.put_u8(0);
                }
                again.put_u8(0);
                let len = again.len() as i32;
                again[..4].copy_from_slice(&len.to_be_bytes());
                assert_eq!(&again[..], wire, "startup packet does not re-encode");
            }
        }
    }
}
