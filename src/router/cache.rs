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
//! Only results worth keeping are inserted (see `classify_costed`): a text with literals that
//! the lexer decided alone is classified again each time, since its next use usually carries
//! other values. Keys are hashed with foldhash: the cache is consulted for every statement,
//! and SipHash cost more than the lookup itself.

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
        let generation = functions.generation();
        if let Some(entry) = self.lock().entries.get_mut(sql) {
            if entry.generation == generation {
                entry.used = true;
                return entry.class.clone();
            }
        }
        let (class, worth_caching) = classify_costed(sql, functions);
        if !worth_caching || self.capacity == 0 || sql.len() > MAX_CACHED_LEN {
            return class;
        }
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.get_mut(sql) {
            entry.generation = generation;
            entry.class = class.clone();
            entry.used = true;
            return class;
        }
        while inner.entries.len() >= self.capacity {
            inner.evict_one();
        }
        let key: Arc<str> = Arc::from(sql);
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
    fn texts_with_literals_decided_by_the_lexer_are_not_kept() {
        let cache = ClassCache::new(8);
        let functions = FunctionCatalog::builtin();
        assert_eq!(
            cache
                .classify("SELECT a FROM t WHERE id = 42", &functions)
                .access,
            Access::Read
        );
        assert_eq!(
            cache
                .classify("SELECT a FROM t WHERE s = 'x'", &functions)
                .access,
            Access::Read
        );
        assert!(cache.is_empty());
        // sqlparser was needed (a column named like a write keyword): kept.
        let kept = "SELECT update FROM t WHERE id = 42";
        cache.classify(kept, &functions);
        assert!(cache.lock().entries.contains_key(kept));
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
