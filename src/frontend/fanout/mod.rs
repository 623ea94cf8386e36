//! Fan-out: one request run on several shards at once, and the merge of
//! their answers into the one answer PostgreSQL would have given on an
//! unsharded database.
//!
//! [`exchange`] sends a request to one server and collects its answer up to
//! ReadyForQuery (so the server is always left at a clean boundary, or
//! closed); [`merge_rows`] checks that every shard described the same
//! columns and merges the rows by a [`MergePlan`]: concatenation, ORDER BY
//! (each shard's rows are already in order; a stable sort of the runs is
//! the k-way merge, ties kept in shard order), `count`/`sum`/`min`/`max`
//! with or without GROUP BY, then OFFSET and LIMIT. A value the merge
//! cannot order or add exactly is an error naming why, never a guess.
//!
//! Guarantees: rows held in memory are bounded by a budget shared by all
//! shards of one fan-out (a server past it is closed, not drained); any
//! shard's error is the answer.

pub mod values;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use crate::backend::ServerConn;
use crate::protocol::{self, TxStatus, sqlstate};
use crate::router::shard::{MergeColumn, MergePlan};
use values::{Decimal, Key, oid};

/// A program limit (the fan-out row budget).
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";

/// Why a fan-out has no answer to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanoutError {
    /// The server connection failed or misbehaved: it must be closed.
    Server(String),
    /// The row budget was exceeded: the server is mid-answer and must be
    /// closed.
    TooManyRows,
    /// query_timeout passed.
    Timeout,
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub type_oid: u32,
    pub typmod: i32,
    pub binary: bool,
}

/// Parses a RowDescription message into its fields.
pub fn row_description(msg: &[u8]) -> Option<Vec<Field>> {
    let body = protocol::body(msg);
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut pos = 2;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let end = pos + body.get(pos..)?.iter().position(|&b| b == 0)?;
        let name = body[pos..end].to_vec();
        let f = body.get(end + 1..end + 19)?;
        fields.push(Field {
            name,
            type_oid: u32::from_be_bytes(f[6..10].try_into().ok()?),
            typmod: i32::from_be_bytes(f[12..16].try_into().ok()?),
            binary: i16::from_be_bytes(f[16..18].try_into().ok()?) == 1,
        });
        pos = end + 19;
    }
    Some(fields)
}

/// One shard's answer to a fan-out request.
#[derive(Debug, Default)]
pub struct ShardAnswer {
    pub parameter_description: Option<Bytes>,
    /// RowDescription, or None after NoData.
    pub row_description: Option<Bytes>,
    pub rows: Vec<Bytes>,
    /// CommandComplete tags, in order.
    pub tags: Vec<String>,
    /// The first ErrorResponse (the server skips the rest of the request).
    pub error: Option<Bytes>,
    pub notices: Vec<Bytes>,
    pub status: Option<TxStatus>,
}

/// Sends `request` (ending with Sync or a simple Query) to `server` and
/// reads its answer up to ReadyForQuery. DataRows count against `budget`
/// (shared by the shards of one fan-out); past `max_rows` the exchange
/// stops with [`FanoutError::TooManyRows`] and the server must be closed.
pub async fn exchange(
    server: &mut ServerConn,
    request: &[u8],
    budget: &AtomicUsize,
    max_rows: usize,
    timeout: Option<Duration>,
) -> Result<ShardAnswer, FanoutError> {
    let work = async {
        server
            .stream
            .write_all(request)
            .await
            .map_err(|e| FanoutError::Server(e.to_string()))?;
        read_answer(server, budget, max_rows).await
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, work)
            .await
            .map_err(|_| FanoutError::Timeout)?,
        None => work.await,
    }
}

async fn read_answer(
    server: &mut ServerConn,
    budget: &AtomicUsize,
    max_rows: usize,
) -> Result<ShardAnswer, FanoutError> {
    let mut answer = ShardAnswer::default();
    loop {
        let header = protocol::peek_header(&server.buf, protocol::PG_MAX_MESSAGE_LEN)
            .map_err(|e| FanoutError::Server(e.to_string()))?
            .filter(|h| server.buf.len() >= h.total_len);
        let Some(header) = header else {
            server.buf.reserve(32 * 1024);
            let n = server
                .stream
                .read_buf(&mut server.buf)
                .await
                .map_err(|e| FanoutError::Server(e.to_string()))?;
            if n == 0 {
                return Err(FanoutError::Server(
                    "server closed the connection".to_owned(),
                ));
            }
            continue;
        };
        let msg = server.buf.split_to(header.total_len).freeze();
        match header.tag {
            b'D' => {
                if budget.fetch_add(1, AtomicOrdering::Relaxed) >= max_rows {
                    return Err(FanoutError::TooManyRows);
                }
                answer.rows.push(msg);
            }
            b'T' => answer.row_description = Some(msg),
            b't' => answer.parameter_description = Some(msg),
            b'C' => answer.tags.push(
                String::from_utf8_lossy(protocol::body(&msg))
                    .trim_end_matches('\0')
                    .to_owned(),
            ),
            b'E' => {
                let fields = protocol::ErrorFields::parse(&msg);
                if fields.is_fatal() {
                    return Err(FanoutError::Server(fields.message));
                }
                answer.error.get_or_insert(msg);
            }
            b'N' => answer.notices.push(msg),
            b'S' => {
                if let Some((k, v)) = protocol::parse_parameter_status(&msg) {
                    server.params.set(k, v);
                }
            }
            b'G' | b'H' | b'W' => {
                return Err(FanoutError::Server("unexpected COPY in a fan-out".into()));
            }
            b'Z' => {
                answer.status = protocol::parse_ready_for_query(&msg);
                return Ok(answer);
            }
            // ParseComplete, BindComplete, NoData, EmptyQueryResponse,
            // PortalSuspended, notifications: the client's answer is built
            // from its own request.
            _ => {}
        }
    }
}

/// An error for the client: SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeError {
    pub code: &'static str,
    pub message: String,
}

fn refuse(message: impl Into<String>) -> MergeError {
    MergeError {
        code: sqlstate::FEATURE_NOT_SUPPORTED,
        message: message.into(),
    }
}

/// The merged answer of a fan-out read.
#[derive(Debug, Clone)]
pub struct Merged {
    /// DataRow messages, in order.
    pub rows: Vec<Bytes>,
}

/// A DataRow split into its column values (`None` = NULL).
struct Row {
    msg: Bytes,
    cols: Vec<Option<(usize, usize)>>,
}

impl Row {
    fn parse(msg: Bytes, ncols: usize) -> Option<Row> {
        let body_start = protocol::HEADER_LEN;
        let body = msg.get(body_start..)?;
        let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
        if n != ncols {
            return None;
        }
        let mut pos = 2;
        let mut cols = Vec::with_capacity(n);
        for _ in 0..n {
            let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
            pos += 4;
            if len < 0 {
                cols.push(None);
                continue;
            }
            let len = len as usize;
            body.get(pos..pos + len)?;
            cols.push(Some((body_start + pos, body_start + pos + len)));
            pos += len;
        }
        Some(Row { msg, cols })
    }

    fn value(&self, i: usize) -> Option<&[u8]> {
        self.cols[i].map(|(a, b)| &self.msg[a..b])
    }
}

fn data_row(values: &[Option<Vec<u8>>]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    let len = 4
        + 2
        + values
            .iter()
            .map(|v| 4 + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
    b.put_i32(len as i32);
    b.put_u16(values.len() as u16);
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    b.freeze()
}

/// Checks that every shard described the same columns (name, type,
/// typmod, format) and returns them.
pub fn agree(descriptions: &[(usize, &[u8])]) -> Result<Vec<Field>, MergeError> {
    let mut first: Option<(usize, Vec<Field>)> = None;
    for (shard, msg) in descriptions {
        let fields = row_description(msg).ok_or_else(|| MergeError {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: format!("shard {shard} sent a malformed RowDescription"),
        })?;
        match &first {
            None => first = Some((*shard, fields)),
            Some((s0, f0)) if *f0 != fields => {
                return Err(refuse(format!(
                    "pgsluice cannot merge the fan-out: shard {s0} and shard {shard} returned \
                     different columns ({} vs {}); are the shards' schemas the same?",
                    describe(f0),
                    describe(&fields)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, f)| f).unwrap_or_default())
}

fn describe(fields: &[Field]) -> String {
    fields
        .iter()
        .map(|f| format!("{} oid {}", String::from_utf8_lossy(&f.name), f.type_oid))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Merges the shards' rows (in shard order) by `plan`. `bytewise_text`:
/// every shard's database sorts text bytewise (collation C), so text may
/// be ordered here.
pub fn merge_rows(
    plan: &MergePlan,
    fields: &[Field],
    shard_rows: Vec<Vec<Bytes>>,
    bytewise_text: bool,
) -> Result<Merged, MergeError> {
    let ncols = fields.len();
    let mut rows = Vec::new();
    for msg in shard_rows.into_iter().flatten() {
        rows.push(Row::parse(msg, ncols).ok_or_else(|| MergeError {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: "a shard sent a DataRow that does not match its RowDescription".into(),
        })?);
    }
    let check_orderable = |col: usize, what: &str| -> Result<(), MergeError> {
        let f = fields.get(col).ok_or_else(|| {
            refuse(format!(
                "pgsluice cannot merge {what}: column {} is not in the result",
                col + 1
            ))
        })?;
        if values::is_text(f.type_oid) && !bytewise_text {
            return Err(refuse(format!(
                "pgsluice cannot merge {what} on text column \"{}\" across shards: the \
                 database collation is not C, so pgsluice cannot order text as PostgreSQL does; \
                 add the shard key to the query, or use a database with collation C",
                String::from_utf8_lossy(&f.name)
            )));
        }
        if !values::orderable(f.type_oid) {
            return Err(refuse(format!(
                "pgsluice cannot merge {what} on column \"{}\" across shards: values of type \
                 OID {} cannot be compared by pgsluice",
                String::from_utf8_lossy(&f.name),
                f.type_oid
            )));
        }
        Ok(())
    };
    for k in &plan.order_by {
        check_orderable(k.column, "ORDER BY")?;
    }
    if let Some(columns) = &plan.columns {
        if columns.len() != ncols {
            return Err(refuse(format!(
                "pgsluice cannot merge the aggregate: {} merge rules for {ncols} columns",
                columns.len()
            )));
        }
        for (i, c) in columns.iter().enumerate() {
            if matches!(c, MergeColumn::Min | MergeColumn::Max) {
                check_orderable(i, "min()/max()")?;
            }
        }
        rows = aggregate(columns, fields, rows)?;
    }
    if !plan.order_by.is_empty() {
        let mut keyed = Vec::with_capacity(rows.len());
        for row in rows {
            let mut keys = Vec::with_capacity(plan.order_by.len());
            for k in &plan.order_by {
                let f = &fields[k.column];
                keys.push(match row.value(k.column) {
                    None => None,
                    Some(v) => Some(owned_key(
                        Key::decode(f.type_oid, f.binary, v).map_err(refuse)?,
                    )),
                });
            }
            keyed.push((keys, row));
        }
        // Stable: ties stay in shard order.
        keyed.sort_by(|(a, _), (b, _)| {
            for (i, k) in plan.order_by.iter().enumerate() {
                let ord = match (&a[i], &b[i]) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) if k.nulls_first => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (Some(_), None) if k.nulls_first => Ordering::Greater,
                    (Some(_), None) => Ordering::Less,
                    (Some(x), Some(y)) => {
                        let o = x.as_key().order(&y.as_key());
                        if k.descending { o.reverse() } else { o }
                    }
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            Ordering::Equal
        });
        rows = keyed.into_iter().map(|(_, r)| r).collect();
    }
    let offset = usize::try_from(plan.offset.unwrap_or(0)).unwrap_or(usize::MAX);
    let limit = plan
        .limit
        .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    Ok(Merged {
        rows: rows
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|r| r.msg)
            .collect(),
    })
}

/// A sort key that owns its bytes (rows are moved while sorting).
enum OwnedKey {
    Plain(Key<'static>),
    Bytes(Vec<u8>),
}

impl OwnedKey {
    fn as_key(&self) -> Key<'_> {
        match self {
            OwnedKey::Plain(k) => k.clone(),
            OwnedKey::Bytes(b) => Key::Bytes(b),
        }
    }
}

fn owned_key(k: Key<'_>) -> OwnedKey {
    match k {
        Key::Int(v) => OwnedKey::Plain(Key::Int(v)),
        Key::Float(v) => OwnedKey::Plain(Key::Float(v)),
        Key::Numeric(v) => OwnedKey::Plain(Key::Numeric(v)),
        Key::Time(v) => OwnedKey::Plain(Key::Time(v)),
        Key::Bytes(b) => OwnedKey::Bytes(b.to_vec()),
    }
}

/// Running value of one aggregate column of one group.
enum Acc {
    /// The group key (or min/max winner) as sent.
    Value(Option<Vec<u8>>),
    Int(Option<i128>),
    Numeric(Option<Decimal>),
    Float(Option<f64>),
}

fn aggregate(
    columns: &[MergeColumn],
    fields: &[Field],
    rows: Vec<Row>,
) -> Result<Vec<Row>, MergeError> {
    let key_cols: Vec<usize> = (0..columns.len())
        .filter(|&i| columns[i] == MergeColumn::GroupKey)
        .collect();
    let mut order: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
    let mut groups: HashMap<Vec<Option<Vec<u8>>>, Vec<Acc>> = HashMap::new();
    for row in &rows {
        let key: Vec<Option<Vec<u8>>> = key_cols
            .iter()
            .map(|&i| row.value(i).map(<[u8]>::to_vec))
            .collect();
        let accs = match groups.get_mut(&key) {
            Some(a) => a,
            None => {
                let init = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| init_acc(*c, &fields[i]))
                    .collect::<Result<Vec<_>, _>>()?;
                order.push(key.clone());
                groups.entry(key).or_insert(init)
            }
        };
        for (i, c) in columns.iter().enumerate() {
            fold(&mut accs[i], *c, &fields[i], row.value(i))?;
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for key in order {
        let Some(accs) = groups.remove(&key) else {
            continue;
        };
        let values: Vec<Option<Vec<u8>>> = accs
            .into_iter()
            .zip(fields)
            .map(|(a, f)| finish(a, f))
            .collect::<Result<_, _>>()?;
        let msg = data_row(&values);
        out.push(Row::parse(msg, fields.len()).ok_or_else(|| refuse("internal: bad merged row"))?);
    }
    Ok(out)
}

fn init_acc(c: MergeColumn, f: &Field) -> Result<Acc, MergeError> {
    let name = String::from_utf8_lossy(&f.name);
    Ok(match c {
        MergeColumn::GroupKey | MergeColumn::Min | MergeColumn::Max => Acc::Value(None),
        MergeColumn::Count | MergeColumn::Sum => match f.type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 => Acc::Int(None),
            oid::NUMERIC => Acc::Numeric(None),
            oid::FLOAT4 | oid::FLOAT8 => Acc::Float(None),
            other => {
                return Err(refuse(format!(
                    "pgsluice cannot add up column \"{name}\" across shards: sum() of type OID \
                     {other} is not supported"
                )));
            }
        },
    })
}

fn fold(acc: &mut Acc, c: MergeColumn, f: &Field, v: Option<&[u8]>) -> Result<(), MergeError> {
    let Some(v) = v else {
        // NULL adds nothing and never wins min/max.
        return Ok(());
    };
    match acc {
        Acc::Value(cur) => match (c, cur.as_deref()) {
            (MergeColumn::GroupKey, Some(_)) => {}
            (_, None) => *cur = Some(v.to_vec()),
            (_, Some(old)) => {
                let new = Key::decode(f.type_oid, f.binary, v).map_err(refuse)?;
                let old = Key::decode(f.type_oid, f.binary, old).map_err(refuse)?;
                let ord = new.order(&old);
                let better = match c {
                    MergeColumn::Min => ord == Ordering::Less,
                    _ => ord == Ordering::Greater,
                };
                if better {
                    *cur = Some(v.to_vec());
                }
            }
        },
        Acc::Int(cur) => {
            let Key::Int(n) = Key::decode(f.type_oid, f.binary, v).map_err(refuse)? else {
                return Err(refuse("internal: integer expected"));
            };
            *cur = Some(cur.unwrap_or(0) + n);
        }
        Acc::Numeric(cur) => {
            let Key::Numeric(n) = Key::decode(f.type_oid, f.binary, v).map_err(refuse)? else {
                return Err(refuse("internal: numeric expected"));
            };
            *cur = Some(match cur.take() {
                Some(old) => old.add(&n),
                None => n,
            });
        }
        Acc::Float(cur) => {
            let Key::Float(n) = Key::decode(f.type_oid, f.binary, v).map_err(refuse)? else {
                return Err(refuse("internal: float expected"));
            };
            *cur = Some(cur.unwrap_or(0.0) + n);
        }
    }
    Ok(())
}

fn finish(acc: Acc, f: &Field) -> Result<Option<Vec<u8>>, MergeError> {
    Ok(match acc {
        Acc::Value(v) => v,
        Acc::Int(None) | Acc::Numeric(None) | Acc::Float(None) => None,
        Acc::Int(Some(n)) => {
            let (min, max, width) = match f.type_oid {
                oid::INT2 => (i128::from(i16::MIN), i128::from(i16::MAX), 2),
                oid::INT4 => (i128::from(i32::MIN), i128::from(i32::MAX), 4),
                _ => (i128::from(i64::MIN), i128::from(i64::MAX), 8),
            };
            if n < min || n > max {
                return Err(MergeError {
                    code: NUMERIC_VALUE_OUT_OF_RANGE,
                    message: format!(
                        "the merged sum of column \"{}\" is out of range for its type",
                        String::from_utf8_lossy(&f.name)
                    ),
                });
            }
            Some(if f.binary {
                n.to_be_bytes()[16 - width..].to_vec()
            } else {
                n.to_string().into_bytes()
            })
        }
        Acc::Numeric(Some(d)) => Some(if f.binary {
            d.to_binary()
        } else {
            d.to_text().into_bytes()
        }),
        Acc::Float(Some(x)) => Some(match (f.type_oid, f.binary) {
            (oid::FLOAT4, true) => (x as f32).to_be_bytes().to_vec(),
            (_, true) => x.to_be_bytes().to_vec(),
            (_, false) if x.is_nan() => b"NaN".to_vec(),
            (_, false) if x.is_infinite() => {
                if x > 0.0 {
                    b"Infinity".to_vec()
                } else {
                    b"-Infinity".to_vec()
                }
            }
            (oid::FLOAT4, false) => (x as f32).to_string().into_bytes(),
            (_, false) => x.to_string().into_bytes(),
        }),
    })
}

#[cfg(test)]
mod tests;
