//! Shard placement over arbitrary statement text and Bind parameters.
//!
//! Byte 0 picks the rules (key type, 1–8 shards, split or refuse spanning INSERTs, unsharded
//! writes); the rest is split at the first NUL into the SQL text and the value of `$1`
//! (bytes 1's low bit: binary format). Checks: no panic; every shard number is below the
//! shard count; a split has one part per shard, in order, each part placed on its shard; a
//! per-shard text parses; placing the same analysis twice gives the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::router::shard::{
    BoundParams, KeyType, MultiShardInsert, Placement, ShardingRules, UnshardedWrites, analyze,
    place,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ty = [
        KeyType::BigInt,
        KeyType::Integer,
        KeyType::Text,
        KeyType::Uuid,
    ][usize::from(mode & 3)];
    let mut rules = ShardingRules::new(ty, usize::from((mode >> 2) & 7) + 1);
    rules.unsharded_tables = vec!["countries".into()];
    if mode & 0x20 != 0 {
        rules.multi_shard_insert = MultiShardInsert::Split;
    }
    if mode & 0x40 != 0 {
        rules.unsharded_writes = UnshardedWrites::AllShards;
    }
    let (sql, param) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let sql = String::from_utf8_lossy(sql);
    let params = BoundParams {
        formats: vec![i16::from(mode >> 7)],
        values: vec![param],
        types: vec![],
    };
    let analysis = analyze(&sql, &rules);
    let first = analysis.place(Some(&params), &rules);
    assert_eq!(first, analysis.place(Some(&params), &rules));
    match &first {
        Placement::Shard { shard, .. } => assert!(*shard < rules.shards),
        Placement::Split { parts, .. } => {
            assert!(parts.len() > 1);
            assert!(parts.windows(2).all(|w| w[0].0 < w[1].0));
            for (shard, text) in parts {
                assert!(*shard < rules.shards);
                match place(text, None, &rules) {
                    Placement::Shard { shard: s, .. } => assert_eq!(s, *shard, "{text}"),
                    other => panic!("split part {text:?} placed as {other:?}"),
                }
            }
        }
        Placement::AllShards {
            plan,
            per_shard_sql,
            ..
        } => {
            if let Some(text) = per_shard_sql {
                assert!(
                    matches!(
                        place(text, None, &rules),
                        Placement::AllShards { .. } | Placement::Refuse { .. }
                    ),
                    "{text}"
                );
            }
            if let Some(columns) = &plan.columns {
                assert!(plan.order_by.iter().all(|k| k.column < columns.len()));
            }
        }
        Placement::Refuse { code, message } => {
            assert_eq!(code.len(), 5);
            assert!(!message.is_empty());
        }
        Placement::AnyShard { .. } | Placement::AllShardsWrite { .. } => {}
    }
});
