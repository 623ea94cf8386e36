//! Result sets with typed columns, written as RowDescription + DataRows in
//! text format, with the column types pgbouncer uses (so a client that
//! reads the types, like psycopg, gets numbers as numbers).

use bytes::{BufMut, BytesMut};

/// A column's name and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Text(&'static str),
    Int4(&'static str),
    Int8(&'static str),
    Numeric(&'static str),
}

impl Column {
    pub fn name(self) -> &'static str {
        match self {
            Self::Text(n) | Self::Int4(n) | Self::Int8(n) | Self::Numeric(n) => n,
        }
    }

    /// (type OID, type size) as RowDescription carries them.
    pub fn pg_type(self) -> (i32, i16) {
        match self {
            Self::Text(_) => (25, -1),
            Self::Int4(_) => (23, 4),
            Self::Int8(_) => (20, 8),
            Self::Numeric(_) => (1700, -1),
        }
    }
}

/// Rows of text values (`None` is NULL) under typed columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    pub fn new(columns: &[Column]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one value per column.
    pub fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width");
        self.rows.push(row);
    }

    /// RowDescription, the DataRows and CommandComplete `tag`.
    pub fn write(&self, out: &mut BytesMut, tag: &str) {
        message(out, b'T', |b| {
            b.put_i16(self.columns.len() as i16);
            for c in &self.columns {
                let (oid, size) = c.pg_type();
                cstr(b, c.name());
                b.put_i32(0); // table OID
                b.put_i16(0); // column number
                b.put_i32(oid);
                b.put_i16(size);
                b.put_i32(-1); // type modifier
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            message(out, b'D', |b| {
                b.put_i16(row.len() as i16);
                for v in row {
                    match v {
                        Some(v) => {
                            b.put_i32(v.len() as i32);
                            b.put_slice(v.as_bytes());
                        }
                        None => b.put_i32(-1),
                    }
                }
            });
        }
        crate::protocol::command_complete(out, tag);
    }
}

/// A value cell.
pub fn v(x: impl ToString) -> Option<String> {
    Some(x.to_string())
}

/// A NoticeResponse (severity NOTICE, code 00000) with `detail`.
pub fn notice(out: &mut BytesMut, detail: &str) {
    message(out, b'N', |b| {
        for (k, val) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', "Console usage"),
            (b'D', detail),
        ] {
            b.put_u8(k);
            cstr(b, val);
        }
        b.put_u8(0);
    });
}

/// A NoticeResponse (severity NOTICE, code 00000) whose message is `text`.
pub fn notice_message(out: &mut BytesMut, text: &str) {
    message(out, b'N', |b| {
        for (k, val) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', text),
        ] {
            b.put_u8(k);
            cstr(b, val);
        }
        b.put_u8(0);
    });
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.extend(s.bytes().filter(|&c| c != 0));
    b.put_u8(0);
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_columns_and_nulls_on_the_wire() {
        let mut rs = ResultSet::new(&[Column::Text("name"), Column::Int4("n")]);
        rs.push(vec![v("a"), None]);
        let mut out = BytesMut::new();
        rs.write(&mut out, "SHOW");
        // RowDescription: 2 columns; the second is int4 (OID 23, size 4).
        assert_eq!(out[0], b'T');
        let t_len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        let t = &out[5..1 + t_len];
        assert_eq!(&t[..2], &[0, 2]);
        let second = &t[2 + 5 + 18..];
        assert_eq!(&second[..2], b"n\0");
        assert_eq!(&second[2 + 6..2 + 12], &[0, 0, 0, 23, 0, 4]);
        // DataRow: "a", NULL.
        let d = &out[1 + t_len..];
        assert_eq!(d[0], b'D');
        assert_eq!(
            &d[5..],
            &[
                0, 2, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff, b'C', 0, 0, 0, 9, b'S', b'H', b'O',
                b'W', 0
            ][..]
        );
    }
}
