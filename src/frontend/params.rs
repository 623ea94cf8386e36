//! Session parameters a client expects its server to have, and the one
//! round trip that makes a pooled server match them.
//!
//! Tracked: the reported parameters clients care about (client_encoding,
//! DateStyle, TimeZone, IntervalStyle, standard_conforming_strings,
//! application_name) with the pool's defaults filled in, so a client never
//! inherits another client's value; plus every other startup parameter
//! (search_path, extra_float_digits, `-c` options…), applied with
//! `set_config` exactly as PostgreSQL applies startup parameters.

use crate::backend::ServerParams;
use crate::protocol::StartupParams;

/// Reported parameters every client gets its own value of.
pub const TRACKED_REPORTED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
];

/// Startup keys that are not session parameters.
const NOT_PARAMETERS: &[&str] = &["user", "database", "options", "replication"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientParams {
    /// (name, value) the client expects, names as the client spelled them.
    /// Shared with the servers that were last found to match it
    /// (`ServerConn::params_verified`); copied on change.
    wanted: crate::backend::ParamList,
    /// `pgsluice.*` settings from the startup packet: pgsluice's own, never
    /// sent to a server.
    /// Boxed: rarely any, and 16 bytes less in every session (the lint's
    /// `Vec` would be 24 bytes in each).
    #[allow(clippy::box_collection)]
    own: Option<Box<Vec<(String, String)>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// A parameter list held without keeping it alive.
type WeakParamList = std::sync::Weak<Vec<(String, String)>>;

/// How many distinct parameter lists [`ParamInterner`] remembers.
const INTERNED_LISTS: usize = 64;

/// The parameter lists of recent logins, held weakly: a list lives as long
/// as a client (or a server's `params_verified`) holds it.
#[derive(Debug, Default)]
pub struct ParamInterner {
    recent: std::sync::Mutex<Vec<WeakParamList>>,
}

impl ParamInterner {
    /// Replaces `list` by an equal live list if one is known; otherwise
    /// remembers `list` (forgetting dead lists, then the oldest).
    fn intern(&self, list: &mut crate::backend::ParamList) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for known in recent.iter() {
            if let Some(known) = known.upgrade() {
                if *known == **list {
                    *list = known;
                    return;
                }
            }
        }
        recent.retain(|w| w.strong_count() > 0);
        if recent.len() >= INTERNED_LISTS {
            recent.remove(0);
        }
        recent.push(std::sync::Arc::downgrade(list));
    }
}

impl ClientParams {
    /// From the startup packet and the pool's reported defaults.
    pub fn from_startup(
        startup: &StartupParams,
        defaults: &ServerParams,
    ) -> Result<Self, ParamError> {
        let mut p = Self::default();
        for name in TRACKED_REPORTED {
            if let Some(v) = defaults.get(name) {
                p.set(name, v);
            }
        }
        for (k, v) in startup.iter() {
            if k == "replication" {
                return Err(ParamError(
                    "replication connections are not supported through pgsluice".into(),
                ));
            }
            let mut put = |name: &str, value: &str| {
                if name
                    .get(..9)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("pgsluice."))
                {
                    p.own
                        .get_or_insert_default()
                        .push((name.to_ascii_lowercase(), value.to_owned()));
                } else {
                    p.set(name, value);
                }
            };
            if k == "options" {
                for (name, value) in parse_options(v)? {
                    put(&name, &value);
                }
            } else if !NOT_PARAMETERS.contains(&k) {
                put(k, v);
            }
        }
        Ok(p)
    }

    pub fn set(&mut self, name: &str, value: &str) {
        if self.get(name) == Some(value) {
            // Unchanged: a shared list stays shared.
            return;
        }
        let wanted = std::sync::Arc::make_mut(&mut self.wanted);
        match wanted
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some((_, v)) => {
                if v != value {
                    value.clone_into(v);
                }
            }
            None => wanted.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Shares an identical parameter list another live client already
    /// holds (clients of one application send the same startup
    /// parameters), so each idle client does not keep its own copy of a
    /// dozen name/value strings (about 470 bytes). Copy-on-write keeps
    /// them apart when one changes (`set`).
    pub fn share(&mut self, interner: &ParamInterner) {
        interner.intern(&mut self.wanted);
    }

    /// A `pgsluice.*` startup setting (lower-case name), the last given.
    pub fn own(&self, name: &str) -> Option<&str> {
        self.own
            .as_deref()?
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.wanted
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.wanted.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A server's parameter changed while this client held it (its own SET,
    /// or the canonical form PostgreSQL reported after our sync): the client
    /// now expects that value.
    pub fn observe(&mut self, name: &str, value: &str) {
        if TRACKED_REPORTED
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name))
            || self.get(name).is_some()
        {
            self.set(name, value);
        }
    }

    /// [`ClientParams::sync_sql`] for `server`, skipped when the server
    /// was last found to match exactly these parameters (this client's or
    /// another's with the same values: one exact comparison, usually a
    /// pointer comparison) and its own have not changed since. Every change
    /// of the server's parameters, including `set_by_pooler` (which moves
    /// only with them), gives them a new generation, so a remembered match
    /// is never stale.
    pub fn sync_sql_for(&self, server: &mut crate::backend::ServerConn) -> Option<String> {
        let generation = server.params.generation();
        if let Some((wanted, verified_at)) = &server.params_verified {
            if *verified_at == generation
                && (std::sync::Arc::ptr_eq(wanted, &self.wanted) || **wanted == *self.wanted)
            {
                return None;
            }
        }
        let sql = self.sync_sql(&server.params, &server.set_by_pooler);
        server.params_verified = match sql {
            None => Some((std::sync::Arc::clone(&self.wanted), generation)),
            Some(_) => None,
        };
        sql
    }

    /// The SQL that makes `server` match, or `None` when it already does.
    /// `set_by_pooler` lists unreported parameters an earlier sync set.
    pub fn sync_sql(&self, server: &ServerParams, set_by_pooler: &[String]) -> Option<String> {
        let mut sets = Vec::new();
        for (name, value) in self.iter() {
            if server.get(name) != Some(value) {
                sets.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    literal(name),
                    literal(value)
                ));
            }
        }
        let mut resets = Vec::new();
        for name in set_by_pooler {
            if self.get(name).is_none() {
                resets.push(format!("RESET {}", identifier(name)));
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
            sql.push(';');
        }
        for r in resets {
            sql.push_str(&r);
            sql.push(';');
        }
        Some(sql)
    }
}

impl ClientParams {
    /// Records what a successful [`ClientParams::sync_sql`] changed on
    /// `server`: reported parameters were updated from ParameterStatus (and
    /// the client adopts PostgreSQL's canonical spelling); unreported ones are
    /// recorded as set by the pooler.
    pub fn after_sync(&mut self, server: &mut crate::backend::ServerConn) {
        let wanted = std::sync::Arc::clone(&self.wanted);
        for (name, value) in wanted.iter() {
            let pooler_set = server
                .set_by_pooler
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name));
            match server.params.get(name) {
                Some(current) if !pooler_set => {
                    let current = current.to_owned();
                    self.set(name, &current);
                }
                _ => {
                    server.params.set(name, value);
                    if !pooler_set {
                        server.set_by_pooler.push(name.clone());
                    }
                }
            }
        }
        let mut i = 0;
        while i < server.set_by_pooler.len() {
            let name = server.set_by_pooler[i].clone();
            if self.get(&name).is_none() {
                server.params.remove(&name);
                server.set_by_pooler.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
}

impl ClientParams {
    /// The query that captures, on the server the client just used, every
    /// parameter set at session level (by the client's SET / RESET /
    /// set_config, or by pgsluice's sync) with its exact current value,
    /// plus `names` (custom placeholders a SET just named) and the
    /// unreported parameters this client already expects. Rows are
    /// `(name, value)`; a NULL value means the name does not exist.
    /// `extra` is appended as one more `UNION ALL` branch of two text
    /// columns (or empty).
    pub fn capture_sql(&self, names: &[String], extra: &str) -> String {
        let mut sql = String::from(
            "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
             WHERE source = 'session' AND name NOT IN \
             ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable')",
        );
        let mut list: Vec<String> = names.iter().map(|n| literal(n)).collect();
        list.extend(self.iter().map(|(name, _)| literal(name)));
        if !list.is_empty() {
            sql.push_str(
                " UNION ALL SELECT n, pg_catalog.current_setting(n, true) \
                 FROM pg_catalog.unnest(ARRAY[",
            );
            sql.push_str(&list.join(", "));
            sql.push_str("]::text[]) AS n");
        }
        sql.push_str(extra);
        sql
    }

    /// Adopts what [`ClientParams::capture_sql`] found: the client now
    /// expects exactly those session settings (anything else unreported is
    /// back at the server default), and the server's bookkeeping lists them
    /// as set, so that the next client of this server gets them undone.
    pub fn adopt_session(
        &mut self,
        server: &mut crate::backend::ServerConn,
        captured: &[(String, String)],
    ) {
        let reported = |server: &crate::backend::ServerConn, name: &str| {
            server.params.get(name).is_some()
                && !server
                    .set_by_pooler
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name))
        };
        let is_captured = |name: &str| captured.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let before: Vec<bool> = self
            .wanted
            .iter()
            .map(|(k, _)| {
                TRACKED_REPORTED.iter().any(|t| t.eq_ignore_ascii_case(k))
                    || reported(server, k)
                    || is_captured(k)
            })
            .collect();
        let mut keep = before.into_iter();
        std::sync::Arc::make_mut(&mut self.wanted).retain(|_| keep.next().unwrap_or(true));
        for (name, value) in captured {
            if !reported(server, name) {
                server.params.set(name, value);
                if !server
                    .set_by_pooler
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name))
                {
                    server.set_by_pooler.push(name.clone());
                }
            }
            self.set(name, value);
        }
        let mut i = 0;
        while i < server.set_by_pooler.len() {
            if is_captured(&server.set_by_pooler[i]) {
                i += 1;
            } else {
                let name = server.set_by_pooler.swap_remove(i);
                server.params.remove(&name);
            }
        }
    }
}

/// `E'...'` literal, correct whatever standard_conforming_strings says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn identifier(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Parses the `options` startup parameter: `-c name=value` / `-cname=value`
/// / `--name=value`, with backslash escaping spaces, as PostgreSQL does.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, ParamError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| ParamError("`-c` without a setting in options".into()))?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(ParamError(format!(
                "unsupported startup option `{w}` in options (only -c name=value is supported)"
            )));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| ParamError(format!("`{setting}` in options is not name=value")))?;
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ServerParams {
        let mut s = ServerParams::default();
        s.set("TimeZone", "UTC");
        s.set("DateStyle", "ISO, MDY");
        s.set("application_name", "");
        s.set("client_encoding", "UTF8");
        s.set("server_version", "15.0");
        s
    }

    fn startup(pairs: &[(&str, &str)]) -> StartupParams {
        StartupParams(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn no_sync_when_server_matches() {
        let p = ClientParams::from_startup(&startup(&[("user", "u")]), &defaults()).unwrap();
        assert_eq!(p.sync_sql(&defaults(), &[]), None);
        assert_eq!(p.get("server_version"), None);
    }

    #[test]
    fn differing_and_unreported_params_are_set_and_reset() {
        let p = ClientParams::from_startup(
            &startup(&[
                ("user", "u"),
                ("application_name", "it's"),
                ("search_path", "a, b"),
            ]),
            &defaults(),
        )
        .unwrap();
        let sql = p
            .sync_sql(&defaults(), &["extra_float_digits".into()])
            .unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'application_name', E'it\\'s', false), \
             pg_catalog.set_config(E'search_path', E'a, b', false);RESET \"extra_float_digits\";"
        );
    }

    #[test]
    fn another_clients_value_is_undone() {
        let p = ClientParams::from_startup(&startup(&[("user", "u")]), &defaults()).unwrap();
        let mut server = defaults();
        server.set("TimeZone", "Asia/Tokyo");
        let sql = p.sync_sql(&server, &[]).unwrap();
        assert!(sql.contains("E'TimeZone', E'UTC'"), "{sql}");
    }

    #[test]
    fn options_are_parsed_like_postgres() {
        assert_eq!(
            parse_options("-c geqo=off --search-path=a\\ b -cwork_mem=64MB").unwrap(),
            vec![
                ("geqo".into(), "off".into()),
                ("search_path".into(), "a b".into()),
                ("work_mem".into(), "64MB".into())
            ]
        );
        assert!(parse_options("-d 5").is_err());
    }

    #[test]
    fn identical_lists_are_shared_and_copied_on_change() {
        let interner = ParamInterner::default();
        let mut a = ClientParams::from_startup(&startup(&[("user", "u")]), &defaults()).unwrap();
        let mut b = ClientParams::from_startup(&startup(&[("user", "u")]), &defaults()).unwrap();
        let mut c = ClientParams::from_startup(
            &startup(&[("user", "u"), ("application_name", "other")]),
            &defaults(),
        )
        .unwrap();
        a.share(&interner);
        b.share(&interner);
        c.share(&interner);
        assert!(std::sync::Arc::ptr_eq(&a.wanted, &b.wanted));
        assert!(!std::sync::Arc::ptr_eq(&a.wanted, &c.wanted));
        b.set("DateStyle", "German");
        assert_eq!(b.get("DateStyle"), Some("German"));
        assert_ne!(a.get("DateStyle"), Some("German"));
        // A list nobody holds any more is not handed out.
        drop(a);
        drop(b);
        let mut d = ClientParams::from_startup(&startup(&[("user", "u")]), &defaults()).unwrap();
        d.share(&interner);
        assert_eq!(std::sync::Arc::strong_count(&d.wanted), 1);
    }

    #[test]
    fn replication_is_refused() {
        let err = ClientParams::from_startup(
            &startup(&[("user", "u"), ("replication", "true")]),
            &defaults(),
        );
        assert!(err.is_err());
    }
}
