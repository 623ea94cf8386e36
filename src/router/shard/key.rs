//! Shard key values from SQL text and from bound parameters, read the way PostgreSQL's
//! input functions read them (`int8in`, `int4in`, `uuid_in`, `int8recv` …), so that a key
//! pgsluice accepts is the key PostgreSQL stores and a key PostgreSQL rejects is rejected
//! here with PostgreSQL's SQLSTATE and a message naming the type.

use std::fmt;

use super::{KeyType, KeyValue, codes};

/// A key that is not a valid value of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// `22P02` (invalid text representation), `22003` (out of range) or `22P03` (bad
    /// binary representation).
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl KeyError {
    fn syntax(ty: &str, input: &str) -> Self {
        KeyError {
            code: codes::INVALID_TEXT_REPRESENTATION,
            message: format!(
                "invalid input syntax for type {ty}: \"{}\" (shard key)",
                shorten(input)
            ),
        }
    }

    fn range(ty: &str, input: &str) -> Self {
        KeyError {
            code: codes::NUMERIC_VALUE_OUT_OF_RANGE,
            message: format!(
                "value \"{}\" is out of range for type {ty} (shard key)",
                shorten(input)
            ),
        }
    }

    fn binary(ty: &str, detail: &str) -> Self {
        KeyError {
            code: codes::INVALID_BINARY_REPRESENTATION,
            message: format!("incorrect binary data format for shard key of type {ty}: {detail}"),
        }
    }
}

/// Error messages quote at most this much of a bad key.
fn shorten(s: &str) -> &str {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl KeyType {
    /// `"bigint"`, `"integer"`, `"text"` or `"uuid"` (case-insensitive; `int8`, `int4`,
    /// `int` are accepted as PostgreSQL's aliases).
    pub fn parse(s: &str) -> Option<KeyType> {
        let s = s.trim();
        [
            ("bigint", KeyType::BigInt),
            ("int8", KeyType::BigInt),
            ("integer", KeyType::Integer),
            ("int4", KeyType::Integer),
            ("int", KeyType::Integer),
            ("text", KeyType::Text),
            ("uuid", KeyType::Uuid),
        ]
        .into_iter()
        .find(|(name, _)| s.eq_ignore_ascii_case(name))
        .map(|(_, ty)| ty)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::BigInt => "bigint",
            KeyType::Integer => "integer",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    /// A key written as SQL text (a literal, a text-format parameter, a hint, a SET value).
    pub fn parse_text(self, s: &str) -> Result<KeyValue, String> {
        self.parse_text_coded(s).map_err(|e| e.message)
    }

    /// A binary-format bound parameter (int8/int4 big-endian, text bytes, 16 uuid bytes).
    pub fn parse_binary(self, b: &[u8]) -> Result<KeyValue, String> {
        self.parse_binary_coded(b).map_err(|e| e.message)
    }

    /// [`KeyType::parse_text`] with the SQLSTATE PostgreSQL would report.
    pub fn parse_text_coded(self, s: &str) -> Result<KeyValue, KeyError> {
        match self {
            KeyType::BigInt => parse_int(s, "bigint", i64::MIN, i64::MAX).map(KeyValue::Int),
            KeyType::Integer => {
                parse_int(s, "integer", i32::MIN.into(), i32::MAX.into()).map(KeyValue::Int)
            }
            KeyType::Text => Ok(KeyValue::Text(s.to_string())),
            KeyType::Uuid => parse_uuid(s).map(KeyValue::Uuid),
        }
    }

    /// [`KeyType::parse_binary`] with the SQLSTATE PostgreSQL would report. Integer keys
    /// accept 2, 4 or 8 bytes (an int2, int4 or int8 parameter compared with the column).
    pub fn parse_binary_coded(self, b: &[u8]) -> Result<KeyValue, KeyError> {
        match self {
            KeyType::BigInt | KeyType::Integer => {
                let v = binary_int(b).ok_or_else(|| {
                    KeyError::binary(
                        self.as_str(),
                        &format!("{} bytes, expected 2, 4 or 8", b.len()),
                    )
                })?;
                if self == KeyType::Integer && i32::try_from(v).is_err() {
                    return Err(KeyError::range("integer", &v.to_string()));
                }
                Ok(KeyValue::Int(v))
            }
            KeyType::Text => std::str::from_utf8(b)
                .map(|s| KeyValue::Text(s.to_string()))
                .map_err(|_| KeyError::binary("text", "not valid UTF-8")),
            KeyType::Uuid => <[u8; 16]>::try_from(b)
                .map(KeyValue::Uuid)
                .map_err(|_| KeyError::binary("uuid", &format!("{} bytes, expected 16", b.len()))),
        }
    }
}

/// A big-endian two's-complement integer of 2, 4 or 8 bytes.
pub(super) fn binary_int(b: &[u8]) -> Option<i64> {
    match b.len() {
        2 => Some(i16::from_be_bytes([b[0], b[1]]).into()),
        4 => Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]).into()),
        8 => {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            Some(i64::from_be_bytes(w))
        }
        _ => None,
    }
}

/// `isspace()` in the C locale, as PostgreSQL's integer input skips it.
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// PostgreSQL's integer input (`pg_strtoint64_safe` as of PostgreSQL 16, a superset of
/// earlier versions): surrounding whitespace, an optional sign, decimal digits or a
/// `0x`/`0o`/`0b` prefix, and single underscores between digits.
pub(super) fn parse_int(s: &str, ty: &str, min: i64, max: i64) -> Result<i64, KeyError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && is_c_space(b[i]) {
        i += 1;
    }
    let negative = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let radix: u32 = match (b.get(i), b.get(i + 1).map(u8::to_ascii_lowercase)) {
        (Some(b'0'), Some(b'x')) => 16,
        (Some(b'0'), Some(b'o')) => 8,
        (Some(b'0'), Some(b'b')) => 2,
        _ => 10,
    };
    if radix != 10 {
        i += 2;
    }
    // Accumulate the magnitude as a negative number so that i64::MIN fits.
    let mut acc: i128 = 0;
    let mut digits = 0usize;
    let mut prev_underscore = false;
    while let Some(&c) = b.get(i) {
        if c == b'_' {
            // Only between digits (after a prefix, one may directly follow it).
            if prev_underscore || (digits == 0 && radix == 10) {
                return Err(KeyError::syntax(ty, s));
            }
            prev_underscore = true;
            i += 1;
            continue;
        }
        let Some(d) = (c as char).to_digit(radix) else {
            break;
        };
        acc = acc * i128::from(radix) + i128::from(d);
        if acc > i128::from(u64::MAX) {
            return Err(KeyError::range(ty, s));
        }
        digits += 1;
        prev_underscore = false;
        i += 1;
    }
    if digits == 0 || prev_underscore {
        return Err(KeyError::syntax(ty, s));
    }
    while i < b.len() && is_c_space(b[i]) {
        i += 1;
    }
    if i != b.len() {
        return Err(KeyError::syntax(ty, s));
    }
    let v = if negative { -acc } else { acc };
    if v < i128::from(min) || v > i128::from(max) {
        return Err(KeyError::range(ty, s));
    }
    Ok(v as i64)
}

/// `uuid_in`: 32 hex digits, upper or lower case, a hyphen allowed after any group of four,
/// optionally inside `{}`; nothing else (no whitespace).
pub(super) fn parse_uuid(s: &str) -> Result<[u8; 16], KeyError> {
    let b = s.as_bytes();
    let mut i = 0;
    let braces = b.first() == Some(&b'{');
    if braces {
        i += 1;
    }
    let mut out = [0u8; 16];
    for (n, byte) in out.iter_mut().enumerate() {
        let hi = b.get(i).and_then(|&c| (c as char).to_digit(16));
        let lo = b.get(i + 1).and_then(|&c| (c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(KeyError::syntax("uuid", s));
        };
        *byte = (hi * 16 + lo) as u8;
        i += 2;
        if n % 2 == 1 && n < 15 && b.get(i) == Some(&b'-') {
            i += 1;
        }
    }
    if braces {
        if b.get(i) != Some(&b'}') {
            return Err(KeyError::syntax("uuid", s));
        }
        i += 1;
    }
    if i != b.len() {
        return Err(KeyError::syntax("uuid", s));
    }
    Ok(out)
}

impl fmt::Display for KeyValue {
    /// As PostgreSQL prints it: a number, a quoted string, a canonical uuid.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(i) => write!(f, "{i}"),
            KeyValue::Text(s) => write!(f, "'{}'", shorten(s).replace('\'', "''")),
            KeyValue::Uuid(u) => {
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        for ty in [
            KeyType::BigInt,
            KeyType::Integer,
            KeyType::Text,
            KeyType::Uuid,
        ] {
            assert_eq!(KeyType::parse(ty.as_str()), Some(ty));
        }
        assert_eq!(KeyType::parse("INT8"), Some(KeyType::BigInt));
        assert_eq!(KeyType::parse("int"), Some(KeyType::Integer));
        assert_eq!(KeyType::parse("varchar"), None);
    }

    #[test]
    fn integers_as_postgres_reads_them() {
        let big = |s| KeyType::BigInt.parse_text_coded(s);
        assert_eq!(big("42"), Ok(KeyValue::Int(42)));
        assert_eq!(big("  -42\n"), Ok(KeyValue::Int(-42)));
        assert_eq!(big("+7"), Ok(KeyValue::Int(7)));
        assert_eq!(big("-9223372036854775808"), Ok(KeyValue::Int(i64::MIN)));
        assert_eq!(big("9223372036854775807"), Ok(KeyValue::Int(i64::MAX)));
        assert_eq!(big("0x2A"), Ok(KeyValue::Int(42)));
        assert_eq!(big("0o52"), Ok(KeyValue::Int(42)));
        assert_eq!(big("0b101010"), Ok(KeyValue::Int(42)));
        assert_eq!(big("1_000"), Ok(KeyValue::Int(1000)));
        for bad in ["", " ", "-", "4 2", "42x", "1__0", "_1", "1_", "4.0", "0x"] {
            let e = big(bad).unwrap_err();
            assert_eq!(e.code, "22P02", "{bad:?}");
            assert!(e.message.contains("type bigint"), "{}", e.message);
        }
        let e = big("9223372036854775808").unwrap_err();
        assert_eq!(e.code, "22003");
        assert!(e.message.contains("out of range for type bigint"));
        let e = big("99999999999999999999999999999999999999999").unwrap_err();
        assert_eq!(e.code, "22003");
        let int = |s| KeyType::Integer.parse_text_coded(s);
        assert_eq!(int("-2147483648"), Ok(KeyValue::Int(-2147483648)));
        let e = int("2147483648").unwrap_err();
        assert!(e.message.contains("type integer"), "{}", e.message);
    }

    #[test]
    fn uuids_in_every_form_postgres_accepts() {
        let want = KeyValue::Uuid([
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ]);
        for form in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}",
            "a0ee-bc99-9c0b4ef8-bb6d6bb9-bd380a11",
            "{a0eebc99-9c0b4ef8-bb6d-6bb9bd380a11}",
        ] {
            assert_eq!(
                KeyType::Uuid.parse_text_coded(form),
                Ok(want.clone()),
                "{form}"
            );
        }
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        for bad in [
            "",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            let e = KeyType::Uuid.parse_text_coded(bad).unwrap_err();
            assert_eq!(e.code, "22P02");
            assert!(e.message.contains("type uuid"), "{}", e.message);
        }
    }

    #[test]
    fn binary_parameters() {
        assert_eq!(
            KeyType::BigInt.parse_binary(&42i64.to_be_bytes()),
            Ok(KeyValue::Int(42))
        );
        assert_eq!(
            KeyType::BigInt.parse_binary(&(-5i32).to_be_bytes()),
            Ok(KeyValue::Int(-5))
        );
        assert_eq!(
            KeyType::Integer.parse_binary(&7i32.to_be_bytes()),
            Ok(KeyValue::Int(7))
        );
        assert!(
            KeyType::Integer
                .parse_binary(&(1i64 << 40).to_be_bytes())
                .unwrap_err()
                .contains("out of range for type integer")
        );
        assert!(
            KeyType::BigInt
                .parse_binary(&[1, 2, 3])
                .unwrap_err()
                .contains("bigint")
        );
        assert_eq!(
            KeyType::Text.parse_binary("héllo".as_bytes()),
            Ok(KeyValue::Text("héllo".into()))
        );
        assert!(
            KeyType::Text
                .parse_binary(&[0xff])
                .unwrap_err()
                .contains("text")
        );
        assert_eq!(
            KeyType::Uuid.parse_binary(&[7u8; 16]),
            Ok(KeyValue::Uuid([7u8; 16]))
        );
        assert!(
            KeyType::Uuid
                .parse_binary(&[7u8; 15])
                .unwrap_err()
                .contains("uuid")
        );
    }
}
