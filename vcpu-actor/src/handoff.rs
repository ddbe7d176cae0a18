//! A value handed from one thread to another once: the vCPU thread's "ready" answer and, at
//! its end, the vCPU fd.
//!
//! The design rule: a waiter learns one of three things and nothing else: the value, that
//! its time ran out, or that the giving side is gone without giving (its thread ended, or
//! unwound through a panic, and dropped its [`Giver`]). It replaces a one-slot channel per
//! hand-off: a channel costs two cache-padded allocations of about 700 bytes, and every vCPU
//! has two hand-offs, so with hundreds of vCPUs this is the smaller footprint (one shared
//! slot of a few dozen bytes).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where the value is.
enum Slot<T> {
    /// Not given yet.
    Empty,
    /// Given, not taken yet.
    Given(T),
    /// Taken (a second take finds nothing).
    Taken,
    /// The giver was dropped without giving.
    GiverGone,
}

struct Inner<T> {
    slot: Mutex<(Slot<T>, bool)>,
    changed: Condvar,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, (Slot<T>, bool)> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Taker::take_timeout`] returned no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TakeError {
    /// The time ran out first.
    Timeout,
    /// The giver was dropped without giving (or the value was taken already).
    Gone,
}

/// The giving side (the vCPU thread).
pub(crate) struct Giver<T>(Arc<Inner<T>>);

/// The taking side (the spawner, then the handle).
pub(crate) struct Taker<T>(Arc<Inner<T>>);

/// A new hand-off.
pub(crate) fn handoff<T>() -> (Giver<T>, Taker<T>) {
    let inner = Arc::new(Inner {
        slot: Mutex::new((Slot::Empty, false)),
        changed: Condvar::new(),
    });
    (Giver(Arc::clone(&inner)), Taker(inner))
}

impl<T> Giver<T> {
    /// Gives `value`; it comes back if the taker is gone (nobody will take it).
    pub(crate) fn give(self, value: T) -> Result<(), T> {
        let mut g = self.0.lock();
        if g.1 {
            return Err(value);
        }
        g.0 = Slot::Given(value);
        drop(g);
        self.0.changed.notify_all();
        Ok(())
    }
}

impl<T> Drop for Giver<T> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        if matches!(g.0, Slot::Empty) {
            g.0 = Slot::GiverGone;
            drop(g);
            self.0.changed.notify_all();
        }
    }
}

impl<T> Taker<T> {
    /// Waits up to `timeout` for the value. A `timeout` too large to add to the current time
    /// (e.g. `Duration::MAX`) waits without a deadline.
    pub(crate) fn take_timeout(&self, timeout: Duration) -> Result<T, TakeError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = self.0.lock();
        loop {
            match std::mem::replace(&mut g.0, Slot::Taken) {
                Slot::Given(v) => return Ok(v),
                Slot::Empty => g.0 = Slot::Empty,
                gone @ (Slot::Taken | Slot::GiverGone) => {
                    g.0 = gone;
                    return Err(TakeError::Gone);
                }
            }
            g = match deadline {
                None => self
                    .0
                    .changed
                    .wait(g)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TakeError::Timeout);
                    }
                    self.0
                        .changed
                        .wait_timeout(g, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

impl<T> std::fmt::Debug for Taker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.lock();
        let state = match g.0 {
            Slot::Empty => "waiting",
            Slot::Given(_) => "given",
            Slot::Taken => "taken",
            Slot::GiverGone => "giver gone",
        };
        f.debug_struct("Taker").field("state", &state).finish()
    }
}

impl<T> Drop for Taker<T> {
    fn drop(&mut self) {
        self.0.lock().1 = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_value_is_taken_once() {
        let (giver, taker) = handoff();
        assert!(giver.give(7).is_ok());
        assert_eq!(taker.take_timeout(Duration::ZERO), Ok(7));
        assert_eq!(taker.take_timeout(Duration::ZERO), Err(TakeError::Gone));
    }

    #[test]
    fn nothing_given_times_out_and_a_dropped_giver_is_gone() {
        let (giver, taker) = handoff::<u8>();
        assert_eq!(
            taker.take_timeout(Duration::from_millis(10)),
            Err(TakeError::Timeout)
        );
        drop(giver);
        assert_eq!(taker.take_timeout(Duration::MAX), Err(TakeError::Gone));
    }

    #[test]
    fn a_waiter_without_deadline_wakes_for_the_value_or_a_panicking_giver() {
        let (giver, taker) = handoff();
        let t = std::thread::spawn(move || giver.give(String::from("fd")));
        assert_eq!(taker.take_timeout(Duration::MAX).as_deref(), Ok("fd"));
        assert!(t.join().unwrap().is_ok());
        let (giver, taker) = handoff::<u8>();
        let t = std::thread::spawn(move || {
            let _giver = giver;
            panic!("the giving thread panics");
        });
        assert_eq!(taker.take_timeout(Duration::MAX), Err(TakeError::Gone));
        assert!(t.join().is_err());
    }

    #[test]
    fn a_value_for_a_gone_taker_comes_back() {
        let (giver, taker) = handoff();
        drop(taker);
        assert_eq!(giver.give(3), Err(3));
    }
}
