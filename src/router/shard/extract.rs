//! Key extraction: which shard a statement's rows live on. (Skeleton: hints only.)

use super::{BoundParams, Hint, Placement, ShardingRules, parse_hint, shard_of};

/// The parameter-independent part of placing one statement text: cache it per text.
#[derive(Debug, Clone)]
pub struct Analysis {
    hint: Option<Hint>,
}

/// Analyzes one statement text (parses it once).
pub fn analyze(sql: &str, _rules: &ShardingRules) -> Analysis {
    Analysis {
        hint: parse_hint(sql),
    }
}

impl Analysis {
    /// The placement of one execution, given its bound parameters (if any).
    pub fn place(&self, _params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
        match &self.hint {
            Some(Hint::Shard(s)) if *s < rules.shards => Placement::Shard {
                shard: *s,
                reason: format!("hint shard={s}"),
            },
            Some(Hint::Key(k)) => match rules.key_type.parse_text_coded(k) {
                Ok(v) => Placement::Shard {
                    shard: shard_of(rules.key_type, &v, rules.shards),
                    reason: format!("hint shard_key={v}"),
                },
                Err(e) => Placement::Refuse {
                    code: e.code,
                    message: e.message,
                },
            },
            _ => Placement::refuse("pgsluice: statement placement is not implemented yet"),
        }
    }
}
