//! Column values of fan-out results, as the merge needs them: ordered by
//! value (by the RowDescription's type OID, in text or binary format) and
//! added up for `count`/`sum`. A type pgsluice cannot order or add exactly
//! is an error naming it, never a guess.

use std::cmp::Ordering;

/// Type OIDs the merge understands.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
}

/// Whether values of this type compare as bytes (only correct under the
/// `C` collation).
pub fn is_text(type_oid: u32) -> bool {
    matches!(type_oid, oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME)
}

/// Whether [`Key::decode`] can order values of this type.
pub fn orderable(type_oid: u32) -> bool {
    is_text(type_oid)
        || matches!(
            type_oid,
            oid::BOOL
                | oid::INT2
                | oid::INT4
                | oid::INT8
                | oid::OID
                | oid::FLOAT4
                | oid::FLOAT8
                | oid::NUMERIC
                | oid::DATE
                | oid::TIME
                | oid::TIMESTAMP
                | oid::TIMESTAMPTZ
        )
}

/// A value decoded for ordering. Values of one column are all of one
/// variant (the column has one type), NULLs aside.
#[derive(Debug, Clone, PartialEq)]
pub enum Key<'a> {
    Int(i128),
    Float(f64),
    Numeric(Decimal),
    /// Dates (days), times and timestamps (microseconds), ±infinity as the
    /// extremes.
    Time(i64),
    Bytes(&'a [u8]),
}

impl<'a> Key<'a> {
    /// Decodes a non-NULL value of `type_oid` in format `binary`.
    pub fn decode(type_oid: u32, binary: bool, v: &'a [u8]) -> Result<Key<'a>, String> {
        let bad = || format!("malformed value of type OID {type_oid} in a shard's result");
        if is_text(type_oid) {
            return Ok(Key::Bytes(v));
        }
        Ok(match (type_oid, binary) {
            (oid::BOOL, true) => Key::Int(i128::from(v.first().copied().ok_or_else(bad)? != 0)),
            (oid::BOOL, false) => Key::Int(i128::from(v == b"t")),
            (oid::INT2 | oid::INT4 | oid::INT8 | oid::OID, true) => {
                Key::Int(be_int(v).ok_or_else(bad)?)
            }
            (oid::INT2 | oid::INT4 | oid::INT8 | oid::OID, false) => Key::Int(
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?,
            ),
            (oid::FLOAT4, true) => Key::Float(f64::from(f32::from_be_bytes(
                v.try_into().map_err(|_| bad())?,
            ))),
            (oid::FLOAT8, true) => Key::Float(f64::from_be_bytes(v.try_into().map_err(|_| bad())?)),
            (oid::FLOAT4 | oid::FLOAT8, false) => Key::Float(parse_float(v).ok_or_else(bad)?),
            (oid::NUMERIC, true) => Key::Numeric(Decimal::from_binary(v).ok_or_else(bad)?),
            (oid::NUMERIC, false) => Key::Numeric(Decimal::parse(v).ok_or_else(bad)?),
            (oid::DATE, true) => Key::Time(i64::from(i32::from_be_bytes(
                v.try_into().map_err(|_| bad())?,
            ))),
            (oid::TIME | oid::TIMESTAMP | oid::TIMESTAMPTZ, true) => {
                Key::Time(i64::from_be_bytes(v.try_into().map_err(|_| bad())?))
            }
            (oid::DATE | oid::TIME | oid::TIMESTAMP | oid::TIMESTAMPTZ, false) => {
                Key::Time(parse_iso_time(type_oid, v).ok_or_else(|| {
                    format!(
                        "pgsluice cannot order the date/time value `{}` across shards: only ISO \
                         DateStyle output (YYYY-MM-DD …) is understood; SET DateStyle = ISO or \
                         fetch the column in binary format",
                        String::from_utf8_lossy(v)
                    )
                })?)
            }
            _ => {
                return Err(format!(
                    "pgsluice cannot order values of type OID {type_oid} across shards"
                ));
            }
        })
    }

    /// PostgreSQL's order for one type: NaN above every other float (and
    /// numeric), ±infinity at the ends.
    pub fn order(&self, other: &Key<'_>) -> Ordering {
        match (self, other) {
            (Key::Int(a), Key::Int(b)) => a.cmp(b),
            (Key::Float(a), Key::Float(b)) => match (a.is_nan(), b.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            },
            (Key::Numeric(a), Key::Numeric(b)) => a.cmp(b),
            (Key::Time(a), Key::Time(b)) => a.cmp(b),
            (Key::Bytes(a), Key::Bytes(b)) => a.cmp(b),
            // Not reached: one column has one type.
            _ => Ordering::Equal,
        }
    }
}

fn be_int(v: &[u8]) -> Option<i128> {
    Some(match v.len() {
        2 => i128::from(i16::from_be_bytes(v.try_into().ok()?)),
        4 => i128::from(i32::from_be_bytes(v.try_into().ok()?)),
        8 => i128::from(i64::from_be_bytes(v.try_into().ok()?)),
        _ => return None,
    })
}

fn parse_float(v: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(v).ok()?;
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Days from 2000-01-01 (PostgreSQL's epoch) to `y-m-d` (proleptic
/// Gregorian).
fn days_from_pg_epoch(y: i64, m: i64, d: i64) -> i64 {
    // Days from civil, as in Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 - 10_957
}

fn digits(s: &[u8]) -> Option<i64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// ISO DateStyle text of a date (days), time or timestamp[tz]
/// (microseconds since 2000-01-01 00:00 UTC for timestamptz).
fn parse_iso_time(type_oid: u32, v: &[u8]) -> Option<i64> {
    match v {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        _ => {}
    }
    if type_oid == oid::TIME {
        return parse_clock(v).map(|(micros, _)| micros);
    }
    // YYYY-MM-DD (4+ digit year; BC dates are not understood).
    if v.ends_with(b" BC") {
        return None;
    }
    let dash = v.iter().position(|&b| b == b'-')?;
    let year = digits(&v[..dash])?;
    let rest = &v[dash + 1..];
    if rest.len() < 5 || rest[2] != b'-' {
        return None;
    }
    let month = digits(&rest[..2])?;
    let day = digits(&rest[3..5])?;
    let days = days_from_pg_epoch(year, month, day);
    if type_oid == oid::DATE {
        return (rest.len() == 5).then_some(days);
    }
    let clock = rest.get(5..)?.strip_prefix(b" ")?;
    let (micros, offset) = parse_clock(clock)?;
    let local = days.checked_mul(86_400_000_000)?.checked_add(micros)?;
    match (type_oid, offset) {
        (oid::TIMESTAMP, None) => Some(local),
        (oid::TIMESTAMPTZ, Some(off)) => local.checked_sub(off),
        _ => None,
    }
}

/// `HH:MM:SS[.ffffff][+HH[:MM[:SS]]]`: microseconds of the day, and the
/// UTC offset in microseconds when one is written.
fn parse_clock(v: &[u8]) -> Option<(i64, Option<i64>)> {
    let split = v.iter().position(|&b| b == b'+' || b == b'-');
    let (clock, zone) = match split {
        Some(i) => (&v[..i], Some(&v[i..])),
        None => (v, None),
    };
    let (hms, frac) = match clock.iter().position(|&b| b == b'.') {
        Some(i) => (&clock[..i], &clock[i + 1..]),
        None => (clock, &b""[..]),
    };
    if hms.len() != 8 || hms[2] != b':' || hms[5] != b':' || frac.len() > 6 {
        return None;
    }
    let mut micros =
        (digits(&hms[..2])? * 3600 + digits(&hms[3..5])? * 60 + digits(&hms[6..8])?) * 1_000_000;
    if !frac.is_empty() {
        micros += digits(frac)? * 10_i64.pow(6 - frac.len() as u32);
    }
    let offset = match zone {
        None => None,
        Some(z) => {
            let sign = if z[0] == b'-' { -1 } else { 1 };
            let mut secs = 0;
            for (i, part) in z[1..].split(|&b| b == b':').enumerate() {
                if part.len() != 2 || i > 2 {
                    return None;
                }
                secs += digits(part)? * [3600, 60, 1][i];
            }
            Some(sign * secs * 1_000_000)
        }
    };
    Some((micros, offset))
}

/// An exact decimal: what `numeric` holds. `digits` is the magnitude with
/// `scale` digits after the point, most significant first, no leading
/// zeros (zero is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decimal {
    NegInf,
    Finite {
        negative: bool,
        digits: Vec<u8>,
        scale: usize,
    },
    PosInf,
    NaN,
}

impl Decimal {
    /// Text form: `-12.340`, `NaN`, `Infinity`, `-Infinity`.
    pub fn parse(v: &[u8]) -> Option<Decimal> {
        match v {
            b"NaN" => return Some(Decimal::NaN),
            b"Infinity" => return Some(Decimal::PosInf),
            b"-Infinity" => return Some(Decimal::NegInf),
            _ => {}
        }
        let (negative, v) = match v.first() {
            Some(b'-') => (true, &v[1..]),
            Some(b'+') => (false, &v[1..]),
            _ => (false, v),
        };
        let (int, frac) = match v.iter().position(|&b| b == b'.') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &b""[..]),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.iter().chain(frac).all(u8::is_ascii_digit) {
            return None;
        }
        let digits: Vec<u8> = int.iter().chain(frac).map(|b| b - b'0').collect();
        Some(Decimal::finite(negative, digits, frac.len()))
    }

    fn finite(negative: bool, mut digits: Vec<u8>, scale: usize) -> Decimal {
        let lead = digits.iter().take_while(|&&d| d == 0).count();
        digits.drain(..lead);
        Decimal::Finite {
            negative: negative && !digits.is_empty(),
            digits,
            scale,
        }
    }

    /// PostgreSQL's binary `numeric`: ndigits, weight, sign, dscale, then
    /// base-10000 digits.
    pub fn from_binary(v: &[u8]) -> Option<Decimal> {
        let word = |i: usize| -> Option<i16> {
            Some(i16::from_be_bytes(v.get(i..i + 2)?.try_into().ok()?))
        };
        let ndigits = usize::try_from(word(0)?).ok()?;
        let weight = i64::from(word(2)?);
        let sign = word(4)? as u16;
        let dscale = usize::try_from(word(6)?).ok()?;
        match sign {
            0xC000 => return Some(Decimal::NaN),
            0xD000 => return Some(Decimal::PosInf),
            0xF000 => return Some(Decimal::NegInf),
            0x0000 | 0x4000 => {}
            _ => return None,
        }
        if v.len() != 8 + 2 * ndigits {
            return None;
        }
        // Base-10000 digit k has weight (weight - k): value = d * 10000^(weight-k).
        // Write every base-10 digit from 10000^weight down to 10^-dscale.
        let top = weight.max(0);
        let mut out = Vec::new();
        let first_exp = top * 4 + 3; // decimal exponent of the first digit written
        let last_exp = -(dscale as i64);
        let mut exp = first_exp;
        while exp >= last_exp {
            let group = exp.div_euclid(4);
            let k = weight - group;
            let d = if (0..ndigits as i64).contains(&k) {
                let g = word(8 + 2 * k as usize)?;
                let pos = exp.rem_euclid(4);
                (g as i64 / 10_i64.pow(pos as u32)) % 10
            } else {
                0
            };
            out.push(d as u8);
            exp -= 1;
        }
        Some(Decimal::finite(sign == 0x4000, out, dscale))
    }

    /// The binary `numeric` form of this value.
    pub fn to_binary(&self) -> Vec<u8> {
        let header = |ndigits: i16, weight: i16, sign: u16, dscale: i16| {
            let mut b = Vec::with_capacity(8);
            b.extend_from_slice(&ndigits.to_be_bytes());
            b.extend_from_slice(&weight.to_be_bytes());
            b.extend_from_slice(&sign.to_be_bytes());
            b.extend_from_slice(&dscale.to_be_bytes());
            b
        };
        let (negative, digits, scale) = match self {
            Decimal::NaN => return header(0, 0, 0xC000, 0),
            Decimal::PosInf => return header(0, 0, 0xD000, 0),
            Decimal::NegInf => return header(0, 0, 0xF000, 0),
            Decimal::Finite {
                negative,
                digits,
                scale,
            } => (*negative, digits, *scale),
        };
        // Pad to whole base-10000 groups on both sides of the point.
        let int_len = digits.len().saturating_sub(scale);
        let int_pad = (4 - int_len % 4) % 4;
        let frac_pad = (4 - scale % 4) % 4;
        let mut padded = vec![0u8; int_pad];
        if digits.len() < scale {
            padded.extend(std::iter::repeat_n(0, scale - digits.len()));
        }
        padded.extend_from_slice(digits);
        padded.extend(std::iter::repeat_n(0, frac_pad));
        let mut groups: Vec<i16> = padded
            .chunks(4)
            .map(|c| c.iter().fold(0i16, |a, &d| a * 10 + i16::from(d)))
            .collect();
        let int_groups = (int_len + int_pad) / 4;
        let mut weight = int_groups as i64 - 1;
        // Strip leading and trailing zero groups.
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let mut b = header(
            groups.len() as i16,
            weight as i16,
            if negative { 0x4000 } else { 0 },
            scale as i16,
        );
        for g in groups {
            b.extend_from_slice(&g.to_be_bytes());
        }
        b
    }

    /// Text form with exactly `scale` digits after the point.
    pub fn to_text(&self) -> String {
        let (negative, digits, scale) = match self {
            Decimal::NaN => return "NaN".into(),
            Decimal::PosInf => return "Infinity".into(),
            Decimal::NegInf => return "-Infinity".into(),
            Decimal::Finite {
                negative,
                digits,
                scale,
            } => (*negative, digits, *scale),
        };
        let mut s = String::new();
        if negative {
            s.push('-');
        }
        let int_len = digits.len().saturating_sub(scale);
        if int_len == 0 {
            s.push('0');
        }
        for d in &digits[..int_len] {
            s.push(char::from(b'0' + d));
        }
        if scale > 0 {
            s.push('.');
            for _ in digits.len()..scale {
                s.push('0');
            }
            for d in &digits[int_len..] {
                s.push(char::from(b'0' + d));
            }
        }
        s
    }

    /// Digits aligned to `scale` (which is at least the value's own).
    fn aligned(digits: &[u8], own: usize, scale: usize) -> Vec<u8> {
        let mut d = digits.to_vec();
        d.extend(std::iter::repeat_n(0, scale - own));
        d
    }

    /// `self + other`, exactly; the scale is the larger of the two (as
    /// PostgreSQL's numeric addition).
    pub fn add(&self, other: &Decimal) -> Decimal {
        use Decimal::*;
        match (self, other) {
            (NaN, _) | (_, NaN) | (PosInf, NegInf) | (NegInf, PosInf) => NaN,
            (PosInf, _) | (_, PosInf) => PosInf,
            (NegInf, _) | (_, NegInf) => NegInf,
            (
                Finite {
                    negative: an,
                    digits: ad,
                    scale: asc,
                },
                Finite {
                    negative: bn,
                    digits: bd,
                    scale: bsc,
                },
            ) => {
                let scale = (*asc).max(*bsc);
                let a = Self::aligned(ad, *asc, scale);
                let b = Self::aligned(bd, *bsc, scale);
                if an == bn {
                    return Decimal::finite(*an, add_mag(&a, &b), scale);
                }
                match cmp_mag(&a, &b) {
                    Ordering::Equal => Decimal::finite(false, Vec::new(), scale),
                    Ordering::Greater => Decimal::finite(*an, sub_mag(&a, &b), scale),
                    Ordering::Less => Decimal::finite(*bn, sub_mag(&b, &a), scale),
                }
            }
        }
    }
}

fn strip(d: &[u8]) -> &[u8] {
    let lead = d.iter().take_while(|&&x| x == 0).count();
    &d[lead..]
}

fn cmp_mag(a: &[u8], b: &[u8]) -> Ordering {
    let (a, b) = (strip(a), strip(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn add_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = a.len().max(b.len());
    let mut out = vec![0u8; n + 1];
    let mut carry = 0;
    for i in 0..n {
        let x = a.len().checked_sub(i + 1).map_or(0, |j| a[j]);
        let y = b.len().checked_sub(i + 1).map_or(0, |j| b[j]);
        let s = x + y + carry;
        out[n - i] = s % 10;
        carry = s / 10;
    }
    out[0] = carry;
    out
}

/// `a - b` for magnitudes with `a >= b`.
fn sub_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = a.len();
    let mut out = vec![0u8; n];
    let mut borrow = 0i8;
    for i in 0..n {
        let x = a[n - i - 1] as i8;
        let y = b.len().checked_sub(i + 1).map_or(0, |j| b[j]) as i8;
        let mut d = x - y - borrow;
        borrow = 0;
        if d < 0 {
            d += 10;
            borrow = 1;
        }
        out[n - i - 1] = d as u8;
    }
    out
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        use Decimal::*;
        let rank = |d: &Decimal| match d {
            NegInf => 0,
            Finite { .. } => 1,
            PosInf => 2,
            NaN => 3,
        };
        match (self, other) {
            (
                Finite {
                    negative: an,
                    digits: ad,
                    scale: asc,
                },
                Finite {
                    negative: bn,
                    digits: bd,
                    scale: bsc,
                },
            ) => {
                let scale = (*asc).max(*bsc);
                let mag = cmp_mag(
                    &Self::aligned(ad, *asc, scale),
                    &Self::aligned(bd, *bsc, scale),
                );
                match (an, bn) {
                    (false, false) => mag,
                    (true, true) => mag.reverse(),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::parse(s.as_bytes()).expect(s)
    }

    #[test]
    fn decimals_order_add_and_round_trip_through_binary() {
        assert!(dec("-1.5") < dec("-1.25"));
        assert!(dec("10") > dec("9.999"));
        assert_eq!(dec("1.50").cmp(&dec("1.5")), Ordering::Equal);
        assert!(dec("NaN") > dec("Infinity"));
        assert_eq!(dec("1.25").add(&dec("-3.5")).to_text(), "-2.25");
        assert_eq!(
            dec("99999999999999999999").add(&dec("1")).to_text(),
            "100000000000000000000"
        );
        assert_eq!(dec("0.001").add(&dec("-0.001")).to_text(), "0.000");
        for s in [
            "0",
            "1",
            "-1",
            "12345.678",
            "0.0001",
            "100000000",
            "-0.5",
            "123456789012345678901234.5",
            "0.00",
        ] {
            let d = dec(s);
            let back = Decimal::from_binary(&d.to_binary()).expect("binary");
            assert_eq!(back.to_text(), d.to_text(), "{s}");
        }
        // PostgreSQL's own encoding of 12345.678 (ndigits 3, weight 1, dscale 3).
        let pg = [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C];
        assert_eq!(Decimal::from_binary(&pg), Some(dec("12345.678")));
        assert_eq!(dec("12345.678").to_binary(), pg);
    }

    #[test]
    fn iso_dates_and_timestamps_order_by_instant() {
        let t = |ty, s: &str| parse_iso_time(ty, s.as_bytes()).expect(s);
        assert_eq!(t(oid::DATE, "2000-01-01"), 0);
        assert_eq!(t(oid::DATE, "2000-03-01"), 60);
        assert!(t(oid::DATE, "1999-12-31") < 0);
        assert_eq!(
            t(oid::TIMESTAMPTZ, "2024-03-31 03:30:00+02"),
            t(oid::TIMESTAMPTZ, "2024-03-31 01:30:00+00")
        );
        assert!(
            t(oid::TIMESTAMP, "2024-01-01 00:00:00.5")
                > t(oid::TIMESTAMP, "2024-01-01 00:00:00.49")
        );
        assert_eq!(t(oid::TIME, "00:00:01.25"), 1_250_000);
        assert!(parse_iso_time(oid::DATE, b"01/02/2024").is_none());
        assert!(parse_iso_time(oid::DATE, b"0044-03-15 BC").is_none());
    }

    #[test]
    fn floats_put_nan_last() {
        fn k(s: &str) -> Key<'_> {
            Key::decode(oid::FLOAT8, false, s.as_bytes()).expect(s)
        }
        assert_eq!(k("NaN").order(&k("Infinity")), Ordering::Greater);
        assert_eq!(k("-1.5").order(&k("2")), Ordering::Less);
        assert!(Key::decode(3802, false, b"{}").is_err());
    }
}
