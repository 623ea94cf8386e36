//! Key values in a statement: literals (resolved when the text is analyzed) and bound
//! parameters (resolved per execution from the Bind's values, formats and the Parse's
//! declared types), with the casts PostgreSQL would apply between them and the key column.

use super::key::{KeyError, binary_int, parse_int, parse_uuid};
use super::{BoundParams, KeyType, KeyValue, ShardingRules, codes, shard_of};

/// A type a key value passes through: a parameter's declared type or an explicit cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SqlType {
    Int2,
    Int4,
    Int8,
    Text,
    Uuid,
}

impl SqlType {
    /// The type of a parameter declared with this OID in Parse; `None` for 0 (unspecified)
    /// and for types a key cannot be compared with as itself.
    pub(super) fn from_oid(oid: u32) -> Option<Option<SqlType>> {
        match oid {
            // unspecified, or "unknown": typed from the context like an untyped literal
            0 | 705 => Some(None),
            20 => Some(Some(SqlType::Int8)),
            21 => Some(Some(SqlType::Int2)),
            23 => Some(Some(SqlType::Int4)),
            // text, varchar, name
            25 | 1043 | 19 => Some(Some(SqlType::Text)),
            2950 => Some(Some(SqlType::Uuid)),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SqlType::Int2 => "smallint",
            SqlType::Int4 => "integer",
            SqlType::Int8 => "bigint",
            SqlType::Text => "text",
            SqlType::Uuid => "uuid",
        }
    }

    fn of_key(ty: KeyType) -> SqlType {
        match ty {
            KeyType::BigInt => SqlType::Int8,
            KeyType::Integer => SqlType::Int4,
            KeyType::Text => SqlType::Text,
            KeyType::Uuid => SqlType::Uuid,
        }
    }

    /// Whether PostgreSQL compares a value of this type with the key column as a key
    /// (same type family: integers with integer keys, text with text, uuid with uuid).
    fn compares_with(self, key: KeyType) -> bool {
        matches!(
            (self, key),
            (
                SqlType::Int2 | SqlType::Int4 | SqlType::Int8,
                KeyType::BigInt | KeyType::Integer
            ) | (SqlType::Text, KeyType::Text)
                | (SqlType::Uuid, KeyType::Uuid)
        )
    }
}

/// A value of one of the [`SqlType`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scalar {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

fn range_of(ty: SqlType) -> (i64, i64) {
    match ty {
        SqlType::Int2 => (i16::MIN.into(), i16::MAX.into()),
        SqlType::Int4 => (i32::MIN.into(), i32::MAX.into()),
        _ => (i64::MIN, i64::MAX),
    }
}

/// `value::ty` as PostgreSQL casts it (only between the types above).
pub(super) fn cast(value: Scalar, ty: SqlType) -> Result<Scalar, KeyError> {
    match (value, ty) {
        (Scalar::Int(i), SqlType::Int2 | SqlType::Int4 | SqlType::Int8) => {
            let (min, max) = range_of(ty);
            if i < min || i > max {
                return Err(KeyError {
                    code: codes::NUMERIC_VALUE_OUT_OF_RANGE,
                    message: format!("{} out of range (shard key {i})", ty.name()),
                });
            }
            Ok(Scalar::Int(i))
        }
        (Scalar::Int(i), SqlType::Text) => Ok(Scalar::Text(i.to_string())),
        (Scalar::Text(s), SqlType::Int2 | SqlType::Int4 | SqlType::Int8) => {
            let (min, max) = range_of(ty);
            parse_int(&s, ty.name(), min, max).map(Scalar::Int)
        }
        (Scalar::Text(s), SqlType::Text) => Ok(Scalar::Text(s)),
        (Scalar::Text(s), SqlType::Uuid) => parse_uuid(&s).map(Scalar::Uuid),
        (Scalar::Uuid(u), SqlType::Uuid) => Ok(Scalar::Uuid(u)),
        (Scalar::Uuid(u), SqlType::Text) => Ok(Scalar::Text(KeyValue::Uuid(u).to_string())),
        (value, ty) => Err(KeyError {
            code: codes::FEATURE_NOT_SUPPORTED,
            message: format!(
                "cannot cast shard key {} to {}",
                describe_scalar(&value),
                ty.name()
            ),
        }),
    }
}

fn describe_scalar(v: &Scalar) -> String {
    match v {
        Scalar::Int(i) => i.to_string(),
        Scalar::Text(s) => KeyValue::Text(s.clone()).to_string(),
        Scalar::Uuid(u) => KeyValue::Uuid(*u).to_string(),
    }
}

/// The key value a scalar of `ty` compares equal to, for a key column of `key`; `None`
/// when the types do not compare as keys (the predicate then pins nothing).
/// An integer outside an `integer` key's range matches no row: also `None`.
pub(super) fn to_key(value: Scalar, ty: SqlType, key: KeyType) -> Option<KeyValue> {
    if !ty.compares_with(key) {
        return None;
    }
    match value {
        Scalar::Int(i) if key == KeyType::Integer && i32::try_from(i).is_err() => None,
        Scalar::Int(i) => Some(KeyValue::Int(i)),
        Scalar::Text(s) => Some(KeyValue::Text(s)),
        Scalar::Uuid(u) => Some(KeyValue::Uuid(u)),
    }
}

/// One key value in a statement.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum KeyExpr {
    /// A literal, already placed.
    Shard { shard: usize, value: KeyValue },
    /// `$n` (0-based `index`), optionally cast (`$1::bigint`).
    Param { index: usize, cast: Option<SqlType> },
    /// A NULL key (an INSERTed NULL goes where PostgreSQL puts it: remainder 0).
    Null,
    /// A literal PostgreSQL would reject (`user_id = 'abc'` for a bigint key).
    Invalid(KeyError),
}

/// The key a [`KeyExpr`] resolves to for one execution.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Resolved {
    Key {
        shard: usize,
        value: KeyValue,
    },
    Null,
    /// Compares as another type: pins nothing.
    NotAKey,
}

impl KeyExpr {
    /// A literal of type `ty` (after any cast), placed now.
    pub(super) fn literal(value: Scalar, ty: SqlType, rules: &ShardingRules) -> Option<KeyExpr> {
        let value = to_key(value, ty, rules.key_type)?;
        Some(KeyExpr::Shard {
            shard: shard_of(rules.key_type, &value, rules.shards),
            value,
        })
    }

    pub(super) fn resolve(
        &self,
        params: Option<&BoundParams<'_>>,
        rules: &ShardingRules,
    ) -> Result<Resolved, KeyError> {
        match self {
            KeyExpr::Shard { shard, value } => Ok(Resolved::Key {
                shard: *shard,
                value: value.clone(),
            }),
            KeyExpr::Null => Ok(Resolved::Null),
            KeyExpr::Invalid(e) => Err(e.clone()),
            KeyExpr::Param { index, cast: to } => {
                let Some(params) = params else {
                    return Err(KeyError {
                        code: codes::PROTOCOL_VIOLATION,
                        message: format!(
                            "the statement uses ${} but no parameters were bound",
                            index + 1
                        ),
                    });
                };
                resolve_param(params, *index, *to, rules)
            }
        }
    }
}

fn resolve_param(
    params: &BoundParams<'_>,
    index: usize,
    to: Option<SqlType>,
    rules: &ShardingRules,
) -> Result<Resolved, KeyError> {
    let Some(value) = params.values.get(index) else {
        return Err(KeyError {
            code: codes::PROTOCOL_VIOLATION,
            message: format!(
                "the statement uses ${} but the Bind has {} parameters",
                index + 1,
                params.values.len()
            ),
        });
    };
    let Some(bytes) = value else {
        return Ok(Resolved::Null);
    };
    let declared = params.types.get(index).copied().unwrap_or(0);
    let Some(declared) = SqlType::from_oid(declared) else {
        // A type we do not read (numeric, …): it does not pin the statement.
        return Ok(Resolved::NotAKey);
    };
    // PostgreSQL infers an unspecified parameter's type from its cast, else from the
    // column it is compared with.
    let ty = declared.or(to).unwrap_or(SqlType::of_key(rules.key_type));
    let format = match params.formats.as_slice() {
        [] => 0,
        [one] => *one,
        many => many.get(index).copied().unwrap_or(0),
    };
    let scalar = match format {
        0 => {
            let text = std::str::from_utf8(bytes).map_err(|_| KeyError {
                code: codes::INVALID_TEXT_REPRESENTATION,
                message: format!("parameter ${} is not valid UTF-8 (shard key)", index + 1),
            })?;
            from_text(text, ty)?
        }
        1 => binary_scalar(bytes, ty, index)?,
        other => {
            return Err(KeyError {
                code: codes::PROTOCOL_VIOLATION,
                message: format!("invalid format code {other} for parameter ${}", index + 1),
            });
        }
    };
    let (scalar, ty) = match to {
        Some(to) if to != ty => (cast(scalar, to)?, to),
        _ => (scalar, ty),
    };
    Ok(match to_key(scalar, ty, rules.key_type) {
        Some(value) => Resolved::Key {
            shard: shard_of(rules.key_type, &value, rules.shards),
            value,
        },
        None => Resolved::NotAKey,
    })
}

/// A text-format value of type `ty` (only a text key allocates).
fn from_text(s: &str, ty: SqlType) -> Result<Scalar, KeyError> {
    match ty {
        SqlType::Text => Ok(Scalar::Text(s.to_string())),
        SqlType::Uuid => parse_uuid(s).map(Scalar::Uuid),
        _ => {
            let (min, max) = range_of(ty);
            parse_int(s, ty.name(), min, max).map(Scalar::Int)
        }
    }
}

fn binary_scalar(b: &[u8], ty: SqlType, index: usize) -> Result<Scalar, KeyError> {
    let bad = |detail: String| KeyError {
        code: codes::INVALID_BINARY_REPRESENTATION,
        message: format!(
            "incorrect binary data format in parameter ${} ({}, shard key): {detail}",
            index + 1,
            ty.name()
        ),
    };
    let want = match ty {
        SqlType::Int2 => 2,
        SqlType::Int4 => 4,
        SqlType::Int8 => 8,
        SqlType::Uuid => 16,
        SqlType::Text => {
            return std::str::from_utf8(b)
                .map(|s| Scalar::Text(s.to_string()))
                .map_err(|_| bad("not valid UTF-8".to_string()));
        }
    };
    if b.len() != want {
        return Err(bad(format!("{} bytes, expected {want}", b.len())));
    }
    match ty {
        SqlType::Uuid => {
            let mut u = [0u8; 16];
            u.copy_from_slice(b);
            Ok(Scalar::Uuid(u))
        }
        _ => binary_int(b)
            .map(Scalar::Int)
            .ok_or_else(|| bad("not an integer".to_string())),
    }
}

/// A LIMIT bound as parameter `$index+1`: `None` for NULL (no limit).
pub(super) fn count_param(
    params: Option<&BoundParams<'_>>,
    index: usize,
) -> Result<Option<u64>, KeyError> {
    let missing = || KeyError {
        code: codes::PROTOCOL_VIOLATION,
        message: format!("the LIMIT uses ${} but it was not bound", index + 1),
    };
    let params = params.ok_or_else(missing)?;
    let Some(bytes) = params.values.get(index).ok_or_else(missing)? else {
        return Ok(None);
    };
    let format = match params.formats.as_slice() {
        [] => 0,
        [one] => *one,
        many => many.get(index).copied().unwrap_or(0),
    };
    let n = if format == 1 {
        binary_int(bytes).ok_or_else(|| KeyError {
            code: codes::INVALID_BINARY_REPRESENTATION,
            message: format!(
                "incorrect binary data format in LIMIT parameter ${}",
                index + 1
            ),
        })?
    } else {
        let text = std::str::from_utf8(bytes).unwrap_or("");
        parse_int(text, "bigint", i64::MIN, i64::MAX)?
    };
    u64::try_from(n).map(Some).map_err(|_| KeyError {
        code: "2201W",
        message: "LIMIT must not be negative".to_string(),
    })
}
