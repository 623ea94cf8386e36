//! ErrorResponses sent to clients, counted by SQLSTATE class (the first two
//! characters of the code: `08` connection, `53` resources, `57` operator
//! intervention, …).

use std::sync::atomic::{AtomicU64, Ordering};

/// SQLSTATE characters are digits and upper-case letters.
const ALPHABET: usize = 36;

/// One relaxed counter per possible class: counting needs no lock or map.
#[derive(Debug)]
pub struct ErrorClasses([AtomicU64; ALPHABET * ALPHABET]);

impl Default for ErrorClasses {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

fn digit(c: u8) -> Option<usize> {
    match c {
        b'0'..=b'9' => Some(usize::from(c - b'0')),
        b'A'..=b'Z' => Some(usize::from(c - b'A') + 10),
        _ => None,
    }
}

fn symbol(i: usize) -> char {
    let i = i as u8;
    char::from(if i < 10 { b'0' + i } else { b'A' + i - 10 })
}

impl ErrorClasses {
    /// Counts an error with this SQLSTATE (a malformed code is not counted).
    pub fn count_code(&self, code: &[u8]) {
        if let [a, b, ..] = code {
            if let (Some(a), Some(b)) = (digit(*a), digit(*b)) {
                self.0[a * ALPHABET + b].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a whole ErrorResponse message (tag, length, fields) by its
    /// `C` field, without allocating.
    pub fn count_message(&self, msg: &[u8]) {
        let mut fields = msg.get(5..).unwrap_or_default();
        while let [kind, rest @ ..] = fields {
            if *kind == 0 {
                return;
            }
            let end = memchr::memchr(0, rest).unwrap_or(rest.len());
            if *kind == b'C' {
                return self.count_code(&rest[..end]);
            }
            fields = rest.get(end + 1..).unwrap_or_default();
        }
    }

    /// Classes seen at least once, with their counts, in order.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| {
                    let class: String = [symbol(i / ALPHABET), symbol(i % ALPHABET)]
                        .into_iter()
                        .collect();
                    (class, n)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, Severity};

    #[test]
    fn errors_are_counted_by_class() {
        let e = ErrorClasses::default();
        let mut msg = bytes::BytesMut::new();
        protocol::error_response(&mut msg, Severity::Error, "53300", "too many");
        e.count_message(&msg);
        e.count_message(&msg);
        e.count_code(b"57P01");
        e.count_code(b"ZZ999");
        e.count_code(b"x");
        e.count_code(b"a1000");
        e.count_message(b"E\0\0\0\x05\0");
        assert_eq!(
            e.snapshot(),
            vec![("53".into(), 2), ("57".into(), 1), ("ZZ".into(), 1)]
        );
    }
}
