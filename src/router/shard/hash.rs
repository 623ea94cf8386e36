//! PostgreSQL's `PARTITION BY HASH` row hash, for one key column.
//!
//! A row goes to the hash partition whose remainder equals `row_hash % modulus`, where
//! `row_hash` combines, for each key column, the type's *extended* hash function called with
//! the fixed partition seed. With one key column that is
//! `hash_combine64(0, type_hash_extended(key, HASH_PARTITION_SEED))`.
//!
//! The type hash functions are Bob Jenkins' lookup3 (`hash_bytes_extended` and its 32-bit
//! shortcut), as PostgreSQL computes them on a **little-endian** server: the byte order of
//! the machine changes how byte strings are folded into words, so a big-endian server
//! places text and uuid keys differently (PostgreSQL documents hash partitioning as not
//! portable across architectures). Every server we target (x86-64, aarch64) is little-endian.
//!
//! Verified against a real PostgreSQL in `tests/shard_placement.rs`; the unit tests below
//! hold values read from `SELECT hashint8extended(…)` and friends.

use super::{KeyType, KeyValue};

/// `HASH_PARTITION_SEED` from PostgreSQL's `catalog/partition.h`.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// The constant `hash_combine64` adds (64 bits of random data, `common/hashfn.h`).
const COMBINE64: u64 = 0x49a0_f4dd_15e5_a8e3;

/// lookup3's initial state: the golden ratio plus the key length plus a fixed salt.
const INIT: u32 = 0x9e37_79b9u32.wrapping_add(3_923_095);

/// `hash_combine64(a, b)`.
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(COMBINE64)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// lookup3 `mix()`: mixes three words reversibly.
#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3 `final()`: the last mixing step, into `c` (and `b`).
#[inline]
fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The seed, when non-zero, is hashed first as a 12-byte chunk of its two halves.
#[inline]
fn seeded(len: u32, seed: u64) -> (u32, u32, u32) {
    let init = INIT.wrapping_add(len);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// `hash_bytes_uint32_extended(k, seed)`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = seeded(4, seed);
    a = a.wrapping_add(k);
    finish(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_extended(k, len, seed)` as a little-endian server computes it (the aligned
/// and unaligned code paths agree there: words are read least significant byte first).
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    // PostgreSQL passes the length as an int; a key over 4 GiB cannot be a datum (1 GB limit).
    let (mut a, mut b, mut c) = seeded(k.len() as u32, seed);
    let mut chunks = k.chunks_exact(12);
    for chunk in &mut chunks {
        a = a.wrapping_add(le_word(&chunk[0..4]));
        b = b.wrapping_add(le_word(&chunk[4..8]));
        c = c.wrapping_add(le_word(&chunk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }
    let rest = chunks.remainder();
    // The last 0..=11 bytes: a and b take whole or partial words; c takes bytes 8..11
    // shifted up by one byte, its lowest byte being reserved for the length.
    a = a.wrapping_add(le_word(rest.get(..4.min(rest.len())).unwrap_or(&[])));
    if rest.len() > 4 {
        b = b.wrapping_add(le_word(&rest[4..8.min(rest.len())]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(le_word(&rest[8..]) << 8);
    }
    finish(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// Up to four bytes as a little-endian word (missing high bytes are zero).
#[inline]
fn le_word(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .rev()
        .fold(0u32, |word, &byte| (word << 8) | u32::from(byte))
}

/// `hashint8extended`: the high half is folded into the low half (complemented for a
/// negative value) so that equal int2/int4/int8 values hash alike, then hashed as a uint32.
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = lo ^ if v >= 0 { hi } else { !hi };
    hash_uint32_extended(folded, seed)
}

/// `hashint4extended`.
pub fn hashint4extended(v: i32, seed: u64) -> u64 {
    hash_uint32_extended(v as u32, seed)
}

/// `hashtextextended` under a deterministic collation: the string's bytes (in the database
/// encoding, UTF-8 here), without a terminator.
pub fn hashtextextended(v: &str, seed: u64) -> u64 {
    hash_bytes_extended(v.as_bytes(), seed)
}

/// `uuid_hash_extended`: the 16 bytes in network order.
pub fn uuid_hash_extended(v: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(v, seed)
}

/// The type's extended hash of one key value with the partition seed, combined into a
/// row hash. A value of the wrong kind for `ty` (an `Int` for a text key) is hashed as the
/// type it is; callers build values with [`KeyType::parse_text`] and friends, which never
/// mix kinds.
pub fn partition_hash(ty: KeyType, v: &KeyValue) -> u64 {
    let h = match (ty, v) {
        (KeyType::Integer, KeyValue::Int(i)) if i32::try_from(*i).is_ok() => {
            hashint4extended(*i as i32, HASH_PARTITION_SEED)
        }
        (_, KeyValue::Int(i)) => hashint8extended(*i, HASH_PARTITION_SEED),
        (_, KeyValue::Text(s)) => hashtextextended(s, HASH_PARTITION_SEED),
        (_, KeyValue::Uuid(u)) => uuid_hash_extended(u, HASH_PARTITION_SEED),
    };
    hash_combine64(0, h)
}

/// The row hash of a NULL key: PostgreSQL skips NULL columns, so it is 0 and the row goes to
/// the partition with remainder 0.
pub const NULL_ROW_HASH: u64 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    // Values from PostgreSQL 15 (x86-64): SELECT hashint8extended(42, 0), …; the seed
    // 8816678312871386365 is HASH_PARTITION_SEED as a signed bigint.

    #[test]
    fn seed_is_the_signed_bigint_postgres_shows() {
        assert_eq!(HASH_PARTITION_SEED as i64, 8816678312871386365);
    }

    #[test]
    fn int_hashes_match_postgres() {
        let s = HASH_PARTITION_SEED;
        assert_eq!(hashint8extended(42, 0) as i64, 8010225493015854792);
        assert_eq!(hashint8extended(42, s) as i64, 7363975540656877951);
        assert_eq!(hashint8extended(-1, s) as i64, -5017072347659237694);
        assert_eq!(hashint8extended(i64::MAX, s) as i64, 4938542303000433043);
        // int4 and int8 hash equal values alike.
        assert_eq!(hashint4extended(42, s) as i64, 7363975540656877951);
        assert_eq!(hashint4extended(-7, s) as i64, -7298374200968567817);
    }

    #[test]
    fn byte_hashes_match_postgres() {
        let s = HASH_PARTITION_SEED;
        assert_eq!(hashtextextended("abc", 0) as i64, -6747756470228489321);
        assert_eq!(hashtextextended("", s) as i64, -5700645584453517373);
        assert_eq!(hashtextextended("abc", s) as i64, 3628778498291917250);
        // 31 bytes: two full 12-byte rounds and a 7-byte tail.
        assert_eq!(
            hashtextextended("hello world, twelve+ bytes long", s) as i64,
            -6013215988882206897
        );
        assert_eq!(hashtextextended("héllo", s) as i64, 3506307356728073920);
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(uuid_hash_extended(&uuid, s) as i64, 424513190990560493);
    }

    #[test]
    fn combine_matches_the_c_definition() {
        // hash_combine64(0, b) = b + constant (wrapping).
        assert_eq!(hash_combine64(0, 1), 1u64.wrapping_add(COMBINE64));
        let a = 0x0123_4567_89ab_cdefu64;
        let b = 0xfedc_ba98_7654_3210u64;
        let expected = a
            ^ (b.wrapping_add(COMBINE64)
                .wrapping_add(a.wrapping_shl(54))
                .wrapping_add(a >> 7));
        assert_eq!(hash_combine64(a, b), expected);
    }

    #[test]
    fn remainders_match_hash_partitioned_tables() {
        use crate::router::shard::shard_of;
        // INSERTed into tables PARTITION BY HASH (k) with four partitions MODULUS 4 and read
        // back with tableoid::regclass.
        let big = [
            (i64::MIN, 3),
            (-1, 1),
            (0, 0),
            (1, 0),
            (2, 2),
            (3, 1),
            (42, 2),
            (4294967296, 0),
            (i64::MAX, 2),
        ];
        for (k, r) in big {
            assert_eq!(
                shard_of(KeyType::BigInt, &KeyValue::Int(k), 4),
                r,
                "bigint {k}"
            );
        }
        let int = [
            (i32::MIN, 2),
            (-1, 1),
            (0, 0),
            (1, 0),
            (2, 2),
            (3, 1),
            (42, 2),
            (i32::MAX, 3),
        ];
        for (k, r) in int {
            let v = KeyValue::Int(k.into());
            assert_eq!(shard_of(KeyType::Integer, &v, 4), r, "integer {k}");
        }
        let text = [
            ("", 2),
            ("a", 2),
            ("abc", 1),
            ("alice", 1),
            ("hello world, twelve+ bytes long", 2),
            ("héllo", 3),
        ];
        for (k, r) in text {
            let v = KeyValue::Text(k.into());
            assert_eq!(shard_of(KeyType::Text, &v, 4), r, "text {k:?}");
        }
        let uuid = [
            ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 0),
            ("00000000-0000-0000-0000-000000000000", 1),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 1),
        ];
        for (k, r) in uuid {
            let v = KeyType::Uuid.parse_text_coded(k).expect("valid uuid");
            assert_eq!(shard_of(KeyType::Uuid, &v, 4), r, "uuid {k}");
        }
    }
}
