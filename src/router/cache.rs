//! A bounded cache of [`classify`] results keyed by statement text.
//!
//! Applications send the same few hundred statement texts over and over, so a hit turns a
//! classification into one hash lookup. The cache holds at most `capacity` entries and does
//! not keep texts longer than [`MAX_CACHED_LEN`] (those are rare and would dominate its
//! memory). Eviction is CLOCK (second chance): an entry used since the hand last passed it
//! survives one more round. Each entry remembers the [`FunctionCatalog::generation`] it was
//! computed with; after a catalog reload it is recomputed on its next use.
//!
//! The lock is held only for the lookup or the insert, never while classifying.
//!
//! A plain `SELECT`, `INSERT`, `UPDATE`, `DELETE` or `WITH` statement with literals (`… WHERE
//! id = 42`, as simple-protocol clients and ORMs inline their values) is keyed by its shape
//! ([`shape_into`]: the literals' values taken out), so `id = 42` and `id = 43` share one entry:
//! for those statements the class depends on the literals' kinds, never their values. Any
//! other text with literals that the lexer decided alone is classified again each time (see
//! `classify_costed`), since its next use usually carries other values. Keys are hashed with
//! foldhash: the cache is consulted for every statement, and SipHash cost more than the
//! lookup itself.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::classify::classify_costed;
use super::{Class, FunctionCatalog};

/// Statement texts longer than this are classified every time rather than cached.
pub const MAX_CACHED_LEN: usize = 16 * 1024;

/// Bounded, thread-safe cache of [`classify`] keyed by statement text.
#[derive(Debug)]
pub struct ClassCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Arc<str>, Entry, foldhash::fast::RandomState>,
    /// The CLOCK ring: every key in `entries`, once, in insertion order.
    ring: VecDeque<Arc<str>>,
}

#[derive(Debug)]
struct Entry {
    generation: u64,
    class: Class,
    used: bool,
}

impl ClassCache {
    pub fn new(capacity: usize) -> Self {
        ClassCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// `classify(sql, functions)`, from the cache when it was computed with this catalog.
    pub fn classify(&self, sql: &str, functions: &FunctionCatalog) -> Class {
        let Some(word_end) = may_shape(sql) else {
            return self.classify_keyed(sql, sql, false, functions);
        };
        let run = |buffer: &mut String| {
            let shaped = shape_into(sql, word_end, buffer);
            let key = if shaped { buffer.as_str() } else { sql };
            self.classify_keyed(sql, key, shaped, functions)
        };
        // The shape is written into a buffer of this thread's, not a new
        // string per statement.
        SHAPE_BUFFER.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buffer) => {
                let class = run(&mut buffer);
                if buffer.capacity() > SHAPE_BUFFER_KEEP {
                    *buffer = String::new();
                }
                class
            }
            Err(_) => run(&mut String::new()),
        })
    }

    /// Looks `sql` up under `key` (its shape when `shaped`, else itself);
    /// classifies and keeps it on a miss.
    fn classify_keyed(
        &self,
        sql: &str,
        key: &str,
        shaped: bool,
        functions: &FunctionCatalog,
    ) -> Class {
        let generation = functions.generation();
        if let Some(entry) = self.lock().entries.get_mut(key) {
            if entry.generation == generation {
                entry.used = true;
                return entry.class.clone();
            }
        }
        let (class, worth_caching) = classify_costed(sql, functions);
        if !(worth_caching || shaped) || self.capacity == 0 || key.len() > MAX_CACHED_LEN {
            return class;
        }
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.get_mut(key) {
            entry.generation = generation;
            entry.class = class.clone();
            entry.used = true;
            return class;
        }
        while inner.entries.len() >= self.capacity {
            inner.evict_one();
        }
        let key: Arc<str> = Arc::from(key);
        inner.ring.push_back(Arc::clone(&key));
        inner.entries.insert(
            key,
            Entry {
                generation,
                class: class.clone(),
                used: false,
            },
        );
        class
    }

    /// Number of cached statement texts.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A panic elsewhere while the lock was held cannot leave the map inconsistent (every
    /// mutation is a single call), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

thread_local! {
    static SHAPE_BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A thread's shape buffer is given back after a text longer than this.
const SHAPE_BUFFER_KEEP: usize = 4096;

/// A cheap first look for [`shape_into`]: not too long to be kept, no
/// parameter (`$1`: an extended-protocol text, the same each time, keyed as
/// it is) and a first word that can be shaped; where that word ends.
fn may_shape(sql: &str) -> Option<usize> {
    let b = sql.as_bytes();
    if b.len() > MAX_CACHED_LEN || memchr::memchr(b'$', b).is_some() {
        return None;
    }
    shaped_word_end(b)
}

/// Where the text's first word ends, if that word is one of [`SHAPED`].
fn shaped_word_end(b: &[u8]) -> Option<usize> {
    let start = b.iter().position(|c| !c.is_ascii_whitespace())?;
    let end = b[start..]
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .map_or(b.len(), |n| start + n);
    let first = &b[start..end];
    SHAPED
        .iter()
        .any(|w| first.eq_ignore_ascii_case(w))
        .then_some(end)
}

/// First words of the statements keyed by their shape.
const SHAPED: &[&[u8]] = &[b"select", b"insert", b"update", b"delete", b"with"];

/// The bytes [`shape_into`] looks at; it steps over every other byte.
static SHAPE_STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let mut c = b'0';
    while c <= b'9' {
        stops[c as usize] = true;
        c += 1;
    }
    let others = b"\"$\\-/;pP'";
    let mut i = 0;
    while i < others.len() {
        stops[others[i] as usize] = true;
        i += 1;
    }
    stops
};

/// The shape of a statement with literals: `sql` with every string
/// literal's content dropped (`'abc'` → `''`) and every run of digits that
/// starts a number made one `0` (`1.5e-3` → `0.0e-0`), so that two texts
/// differing only in their literals' values have one shape.
///
/// Only for texts whose class cannot depend on those values: one
/// statement (trailing `;` aside) starting with a [`SHAPED`] word, without
/// comments, quoted identifiers, dollar quotes or parameters, backslashes
/// (a string could then end elsewhere with `standard_conforming_strings`
/// off) or the word pgsluice. The classifier reads literal values only in
/// `SET`, `BEGIN`/`START TRANSACTION`, `EXPLAIN` options and pgsluice's own
/// commands, none of which is shaped; token kinds survive (a number stays
/// a number, `E'…'` stays a string). No shape for any other text, nor for
/// a text without literals (its own text is its key).
///
/// The caller has found the [`SHAPED`] first word, ending at `word_end`
/// ([`shaped_word_end`]). The shape is written into `out` (cleared first);
/// false when there is none.
fn shape_into(sql: &str, word_end: usize, out: &mut String) -> bool {
    out.clear();
    shape_parts(sql, word_end, out).is_some()
}

fn shape_parts(sql: &str, word_end: usize, out: &mut String) -> Option<()> {
    let b = sql.as_bytes();
    let identifier_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mentions_pgsluice =
        |s: &[u8]| s.len() >= 8 && s.windows(8).any(|w| w.eq_ignore_ascii_case(b"pgsluice"));
    let mut copied = 0;
    let mut i = word_end;
    while i < b.len() {
        match b[i..].iter().position(|&c| SHAPE_STOPS[usize::from(c)]) {
            Some(n) => i += n,
            None => break,
        }
        match b[i] {
            b'"' | b'$' | b'\\' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b';' if b[i..].iter().all(|&c| c == b';' || c.is_ascii_whitespace()) => break,
            b';' => return None,
            b'p' | b'P' if mentions_pgsluice(&b[i..(i + 8).min(b.len())]) => return None,
            b'\'' => {
                // The closing quote: the next one that is not doubled.
                let mut j = i + 1;
                loop {
                    j += memchr::memchr(b'\'', &b[j..])?;
                    if b.get(j + 1) != Some(&b'\'') {
                        break;
                    }
                    j += 2;
                }
                let content = &b[i + 1..j];
                if memchr::memchr(b'\\', content).is_some() || mentions_pgsluice(content) {
                    return None;
                }
                out.reserve(sql.len());
                out.push_str(&sql[copied..=i]);
                copied = j;
                i = j + 1;
            }
            c if c.is_ascii_digit() && !identifier_byte(b[i - 1]) => {
                let end = b[i..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(b.len(), |n| i + n);
                out.reserve(sql.len());
                out.push_str(&sql[copied..i]);
                out.push('0');
                copied = end;
                i = end;
            }
            _ => i += 1,
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&sql[copied..]);
    Some(())
}

impl Inner {
    fn evict_one(&mut self) {
        while let Some(key) = self.ring.pop_front() {
            match self.entries.get_mut(&key) {
                Some(entry) if entry.used => {
                    entry.used = false;
                    self.ring.push_back(key);
                }
                Some(_) => {
                    self.entries.remove(&key);
                    return;
                }
                None => {}
            }
        }
        // The ring lost track of entries (it cannot, but never loop forever on it).
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Access, Reason};
    use super::*;

    fn shape(sql: &str) -> Option<String> {
        let mut out = String::new();
        let word_end = shaped_word_end(sql.as_bytes())?;
        shape_into(sql, word_end, &mut out).then_some(out)
    }

    #[test]
    fn hits_return_the_same_class() {
        let cache = ClassCache::new(8);
        let functions = FunctionCatalog::builtin();
        let first = cache.classify("SELECT a FROM t WHERE id = $1", &functions);
        assert_eq!(first.access, Access::Read);
        assert_eq!(
            cache.classify("SELECT a FROM t WHERE id = $1", &functions),
            first
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn other_texts_with_literals_decided_by_the_lexer_are_not_kept() {
        let cache = ClassCache::new(8);
        let functions = FunctionCatalog::builtin();
        for sql in [
            "SET statement_timeout = 42",
            "EXPLAIN SELECT a FROM t WHERE id = 42",
            "SELECT a FROM t WHERE s = $1 AND id = 42",
            "/* x */ SELECT a FROM t WHERE id = 42",
        ] {
            assert_eq!(
                cache.classify(sql, &functions).access,
                Access::Read,
                "{sql}"
            );
        }
        assert!(cache.is_empty());
        // sqlparser was needed (a column named like a write keyword): kept.
        let kept = "/* c */ SELECT update FROM t WHERE id = 42";
        cache.classify(kept, &functions);
        assert!(cache.lock().entries.contains_key(kept));
    }

    #[test]
    fn statements_differing_only_in_literal_values_share_an_entry() {
        let cache = ClassCache::new(8);
        let functions = FunctionCatalog::builtin();
        for id in [42, 43, 1_000_000] {
            let sql = format!("SELECT a FROM t WHERE id = {id} AND s = 'v{id}'");
            assert_eq!(cache.classify(&sql, &functions).access, Access::Read);
        }
        let sql = "UPDATE t SET n = n + -3 WHERE id = 7;";
        assert_eq!(cache.classify(sql, &functions).access, Access::Write);
        let inner = cache.lock();
        assert_eq!(inner.entries.len(), 2);
        assert!(
            inner
                .entries
                .contains_key("SELECT a FROM t WHERE id = 0 AND s = ''")
        );
        assert!(
            inner
                .entries
                .contains_key("UPDATE t SET n = n + -0 WHERE id = 0;")
        );
    }

    #[test]
    fn shapes() {
        for (sql, shaped) in [
            ("select 1", Some("select 0")),
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 51234;",
                Some("SELECT abalance FROM pgbench_accounts WHERE aid = 0;"),
            ),
            (
                "SELECT 1.5e-3, .5, 0x1F, 1_000",
                Some("SELECT 0.0e-0, .0, 0x1F, 0_000"),
            ),
            ("SELECT 1into t2", Some("SELECT 0into t2")),
            (
                "SELECT 'it''s', E'x', 'a'\n'b'",
                Some("SELECT '', E'', ''\n''"),
            ),
            (
                "  with x as (select 'é1') select x1 from x",
                Some("  with x as (select '') select x1 from x"),
            ),
            (
                "INSERT INTO t VALUES (1, 'a') RETURNING *",
                Some("INSERT INTO t VALUES (0, '') RETURNING *"),
            ),
            // No literal: the text is its own key.
            ("SELECT a FROM t", None),
            // Not shaped: literal values may matter, or a string may end
            // elsewhere than it seems.
            ("SET transaction_read_only = 1", None),
            ("EXPLAIN (ANALYZE 0) DELETE FROM t", None),
            ("BEGIN ISOLATION LEVEL 'serializable'", None),
            ("SELECT 1; SET transaction_read_only = 0", None),
            ("SELECT 1 -- 2", None),
            ("SELECT /* 1 */ 2", None),
            ("SELECT \"a1\" FROM t WHERE id = 1", None),
            ("SELECT $1, 2", None),
            ("SELECT $$x$$, 1", None),
            ("SELECT 'a\\', 1", None),
            ("SELECT current_setting('pgsluice.route'), 1", None),
            ("SELECT pgsluice, 1", None),
            ("SELECT 'unterminated", None),
        ] {
            assert_eq!(shape(sql).as_deref(), shaped, "{sql}");
        }
    }

    #[test]
    fn a_shape_classifies_as_its_statements() {
        let functions = FunctionCatalog::builtin();
        for sql in [
            "SELECT a FROM t WHERE id = 42",
            "SELECT 1into t2",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE",
            "SELECT nextval('s'), 1",
            "SELECT set_config('transaction_read_only', 'on', false)",
            "SELECT pg_advisory_lock(1)",
            "SELECT random() * 10",
            "SELECT 'a' 'b', 1.5e-3, .5, 0x1F, 1_000",
            "SELECT * INTO TEMP t2 FROM t WHERE id = 3",
            "UPDATE pgbench_accounts SET abalance = abalance + -3425 WHERE aid = 54;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
            "DELETE FROM t WHERE s = 'x'",
            "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
            "WITH r AS (SELECT 1) SELECT * FROM r",
            "SELECT update FROM t WHERE id = 42",
        ] {
            let shaped = shape(sql).expect("shaped");
            assert_eq!(
                classify_costed(sql, &functions).0,
                classify_costed(&shaped, &functions).0,
                "{sql} / {shaped}"
            );
        }
    }

    #[test]
    fn bounded_and_keeps_recently_used() {
        let cache = ClassCache::new(3);
        let functions = FunctionCatalog::builtin();
        for i in 0..3 {
            cache.classify(&format!("SELECT c{i} FROM t"), &functions);
        }
        cache.classify("SELECT c0 FROM t", &functions); // mark used
        for i in 3..6 {
            cache.classify(&format!("SELECT c{i} FROM t"), &functions);
            assert!(cache.len() <= 3);
        }
        let inner = cache.lock();
        assert!(inner.entries.contains_key("SELECT c5 FROM t"));
        assert_eq!(inner.ring.len(), inner.entries.len());
    }

    #[test]
    fn a_new_catalog_invalidates() {
        let cache = ClassCache::new(8);
        let builtin = FunctionCatalog::builtin();
        let sql = "SELECT my_reader($1)";
        assert_eq!(
            cache.classify(sql, &builtin).reason,
            Reason::VolatileFunction
        );
        let loaded = FunctionCatalog::from_catalog(["my_writer".to_string()], &[]);
        assert_eq!(cache.classify(sql, &loaded).access, Access::Read);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn zero_capacity_and_long_texts_are_not_cached() {
        let functions = FunctionCatalog::builtin();
        let none = ClassCache::new(0);
        none.classify("SELECT a FROM t", &functions);
        assert!(none.is_empty());
        let cache = ClassCache::new(4);
        let long = format!("SELECT 1 {}", " ".repeat(MAX_CACHED_LEN));
        assert_eq!(cache.classify(&long, &functions).access, Access::Read);
        assert!(cache.is_empty());
    }
}
