//! The one thing pgsluice reads from a certificate: the subject's common
//! name (CN), which names the user in `cert` authentication.
//!
//! A minimal DER walk over an already-verified certificate (rustls checked
//! its chain): Certificate → tbsCertificate → subject → the first
//! `id-at-commonName` attribute. Every length is bounds-checked; anything
//! unexpected yields `None`.

/// DER of the OID 2.5.4.3 (id-at-commonName).
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// `[0] EXPLICIT` (tbsCertificate version).
const CONTEXT_0: u8 = 0xa0;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const T61_STRING: u8 = 0x14;

/// One TLV: (tag, contents, rest after it).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, body, rest) = tlv(input)?;
    (t == tag).then_some((body, rest))
}

/// The subject CN of a DER certificate, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut fields = tbs;
    if fields.first() == Some(&CONTEXT_0) {
        fields = tlv(fields)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = tlv(fields)?.2;
    }
    let (mut rdns, _) = expect(fields, SEQUENCE)?;
    while !rdns.is_empty() {
        let (mut set, rest) = expect(rdns, SET)?;
        rdns = rest;
        while !set.is_empty() {
            let (attr, rest) = expect(set, SEQUENCE)?;
            set = rest;
            let (oid, value) = expect(attr, OID)?;
            if oid != OID_COMMON_NAME {
                continue;
            }
            let (tag, text, _) = tlv(value)?;
            return match tag {
                UTF8_STRING | PRINTABLE_STRING | IA5_STRING | T61_STRING => {
                    String::from_utf8(text.to_vec()).ok()
                }
                _ => None,
            };
        }
    }
    None
}
