//! Key values as written in SQL: literals, `$n` parameters, and the casts around them
//! (`'42'::bigint`, `CAST($1 AS int8)`, `uuid '…'`), read before they meet the key column.

use sqlparser::ast::{CastKind, DataType, Expr, UnaryOperator, Value};

use super::key::KeyError;
use super::params::{Scalar, SqlType, cast};
use super::scope::name_parts;

/// A key value as written, before it meets the key column's type.
#[derive(Debug)]
pub(super) enum Raw {
    /// `'42'`, `$$42$$`: typed by the column it is compared with.
    Untyped(String),
    Typed(Result<Scalar, KeyError>, SqlType),
    Param(usize, Option<SqlType>),
    Null,
}

/// The cast target types that matter for keys.
pub(super) fn sql_type(dt: &DataType) -> Option<SqlType> {
    Some(match dt {
        DataType::BigInt(_) | DataType::Int8(_) => SqlType::Int8,
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => SqlType::Int4,
        DataType::SmallInt(_) | DataType::Int2(_) => SqlType::Int2,
        DataType::Text | DataType::Varchar(_) | DataType::CharacterVarying(_) => SqlType::Text,
        DataType::Uuid => SqlType::Uuid,
        DataType::Custom(name, mods) if mods.is_empty() => {
            let parts = name_parts(name)?;
            let last = parts.last()?;
            match last.as_str() {
                "int8" | "bigint" => SqlType::Int8,
                "int4" | "int" | "integer" => SqlType::Int4,
                "int2" | "smallint" => SqlType::Int2,
                "text" | "varchar" => SqlType::Text,
                "uuid" => SqlType::Uuid,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// An integer literal's digits (PostgreSQL types a literal without `.`/`e` as an integer).
pub(super) fn int_literal(digits: &str, negative: bool) -> Option<i64> {
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v: i128 = digits.parse().ok()?;
    i64::try_from(if negative { -v } else { v }).ok()
}

/// `$n` → 0-based index.
pub(super) fn placeholder(p: &str) -> Option<usize> {
    let n: usize = p.strip_prefix('$')?.parse().ok()?;
    n.checked_sub(1)
}

pub(super) fn raw_value(e: &Expr) -> Option<Raw> {
    match e {
        Expr::Nested(inner) => raw_value(inner),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => {
                int_literal(n, false).map(|i| Raw::Typed(Ok(Scalar::Int(i)), SqlType::Int8))
            }
            Value::SingleQuotedString(s) => Some(Raw::Untyped(s.clone())),
            Value::DollarQuotedString(d) => Some(Raw::Untyped(d.value.clone())),
            Value::Null => Some(Raw::Null),
            Value::Placeholder(p) => placeholder(p).map(|i| Raw::Param(i, None)),
            _ => None,
        },
        Expr::UnaryOp {
            op: op @ (UnaryOperator::Minus | UnaryOperator::Plus),
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => int_literal(n, *op == UnaryOperator::Minus)
                    .map(|i| Raw::Typed(Ok(Scalar::Int(i)), SqlType::Int8)),
                _ => None,
            },
            _ => None,
        },
        Expr::Cast {
            kind: CastKind::Cast | CastKind::DoubleColon,
            expr,
            data_type,
            format: None,
        } => {
            let ty = sql_type(data_type)?;
            Some(match raw_value(expr)? {
                Raw::Untyped(s) => Raw::Typed(cast(Scalar::Text(s), ty), ty),
                Raw::Typed(Ok(v), _) => Raw::Typed(cast(v, ty), ty),
                Raw::Typed(Err(e), _) => Raw::Typed(Err(e), ty),
                Raw::Param(i, None) => Raw::Param(i, Some(ty)),
                Raw::Param(_, Some(_)) => return None,
                Raw::Null => Raw::Null,
            })
        }
        Expr::TypedString(ts) => {
            let ty = sql_type(&ts.data_type)?;
            let s = match &ts.value.value {
                Value::SingleQuotedString(s) => s.clone(),
                Value::DollarQuotedString(d) => d.value.clone(),
                _ => return None,
            };
            Some(Raw::Typed(cast(Scalar::Text(s), ty), ty))
        }
        _ => None,
    }
}
