//! Per-thread lists of spare allocations that a client gives back as it goes
//! idle and the next request of any client on the thread takes again, so a
//! transaction does not free and allocate them anew (the reply queue, the
//! client's read buffer).

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread-local list of spares.
pub(super) type Spares<T> = LocalKey<RefCell<Vec<T>>>;

/// Keeps `item` among `spares` unless they already hold `max` (then it is freed).
pub(super) fn give<T: 'static>(spares: &'static Spares<T>, item: T, max: usize) {
    spares.with_borrow_mut(|s| {
        if s.len() < max {
            s.push(item);
        }
    });
}

/// A spare, when there is one.
pub(super) fn take<T: 'static>(spares: &'static Spares<T>) -> Option<T> {
    spares.with_borrow_mut(Vec::pop)
}
