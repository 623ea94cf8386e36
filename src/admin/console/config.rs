//! `SHOW CONFIG`: every scalar setting of `[general]`, `[routing]`,
//! `[admin]`, `[auth_query]` and `[tls]` as `section.key`, its effective
//! value, its default and whether a reload can change it.
//!
//! Built from the same rendering `pgsluice check` prints (passwords never
//! appear there), so a setting added to the config shows up here without
//! a second list to keep in step.

use std::sync::OnceLock;

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply};
use crate::config::Config;

const SECTIONS: [&str; 5] = ["general", "routing", "admin", "auth_query", "tls"];

/// `section.key` → value, in section order then key order.
fn flatten(config: &Config) -> Vec<(String, String)> {
    let Ok(table) = config.render().parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for section in SECTIONS {
        let Some(toml::Value::Table(t)) = table.get(section) else {
            continue;
        };
        for (key, value) in t {
            let text = match value {
                toml::Value::Table(_) => continue,
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            out.push((format!("{section}.{key}"), text));
        }
    }
    out
}

/// The values of a configuration that sets nothing it need not.
fn defaults() -> &'static [(String, String)] {
    static DEFAULTS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let minimal =
            "[databases.db]\nprimary = \"127.0.0.1:5432\"\n[users.user]\npassword = \"x\"\n";
        Config::from_toml(minimal, "defaults", std::iter::empty())
            .map(|c| flatten(&c))
            .unwrap_or_default()
    })
}

pub fn show(ctx: &Ctx<'_>) -> Outcome {
    let defaults = defaults();
    let mut rs = ResultSet::new(&[
        Column::Text("key"),
        Column::Text("value"),
        Column::Text("default"),
        Column::Text("changeable"),
    ]);
    for (key, value) in flatten(&ctx.shared.config()) {
        let default = defaults
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, d)| d.clone());
        // What RELOAD (or SIGHUP) cannot change.
        let restart_only = crate::config::RESTART_ONLY.contains(&key.as_str())
            || (key.starts_with("databases.")
                && [
                    ".shards",
                    ".shard_key",
                    ".shard_key_type",
                    ".unsharded_tables",
                    ".unsharded_writes",
                    ".multi_shard_insert",
                    ".max_fanout_rows",
                ]
                .iter()
                .any(|k| key.ends_with(k)));
        let changeable = if restart_only { "no" } else { "yes" };
        rs.push(vec![v(&key), v(value), default, v(changeable)]);
    }
    Ok(Reply::Rows(rs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_flattened_with_their_defaults() {
        let d = defaults();
        let get = |k: &str| d.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("general.pool_size"), Some("20"));
        assert_eq!(get("general.pool_mode"), Some("transaction"));
        assert_eq!(get("general.admin_users"), Some(""));
        assert_eq!(get("general.stats_period"), Some("1m"));
        assert_eq!(get("routing.max_replica_lag"), Some("100ms"));
        assert!(d.iter().all(|(k, _)| !k.contains("password")));
    }
}
