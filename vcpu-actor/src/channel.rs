//! The one-to-one channel between a vCPU's handle and its thread: the mailbox of requests,
//! the thread's "ready" answer, and the vCPU fd it gives back at its end.
//!
//! The design rule: one sender, one receiver, unbounded, and a receiver learns one of three
//! things: a message, that its time ran out, or that the sender is gone with nothing left to
//! read (its thread ended, or unwound through a panic, and dropped the [`Sender`]). A sender
//! learns only whether the receiver is still there. That is all the actor needs, so the
//! channel is a mutex-protected queue and a condition variable in one small allocation: a
//! general-purpose channel costs hundreds of bytes of cache-padded state per instance, and
//! each vCPU has three of them.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

struct State<T> {
    queue: VecDeque<T>,
    sender_alive: bool,
    receiver_alive: bool,
    /// The receiver is blocked on the condvar: only then does a sender wake it (a wake is a
    /// system call, and most sends find the receiver busy, e.g. in `KVM_RUN`).
    receiver_waiting: bool,
}

impl<T> State<T> {
    /// What a receiver gets without waiting: the next message, or `Disconnected` when none
    /// is queued and the sender is gone; `None` when it has to wait.
    fn take(&mut self) -> Option<Result<T, RecvError>> {
        match self.queue.pop_front() {
            Some(message) => Some(Ok(message)),
            None if !self.sender_alive => Some(Err(RecvError::Disconnected)),
            None => None,
        }
    }
}

struct Inner<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Spin rounds of a receiver's back-off before it blocks (1, 2, 4 ... spins).
const BACKOFF_SPINS: u32 = 7;
/// CPU yields of a receiver's back-off after the spins.
const BACKOFF_YIELDS: u32 = 4;

/// Why a receive returned no message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// Nothing came in time (the sender is still there).
    Timeout,
    /// Nothing is queued and the sender is gone: nothing ever will be.
    Disconnected,
}

/// The sending side (a vCPU handle, or the vCPU thread for its answers).
pub(crate) struct Sender<T>(Arc<Inner<T>>);

/// The receiving side.
pub(crate) struct Receiver<T>(Arc<Inner<T>>);

/// A new channel.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            sender_alive: true,
            receiver_alive: true,
            receiver_waiting: false,
        }),
        changed: Condvar::new(),
    });
    (Sender(Arc::clone(&inner)), Receiver(inner))
}

impl<T> Sender<T> {
    /// Queues `message`; it comes back if the receiver is gone.
    pub(crate) fn send(&self, message: T) -> Result<(), T> {
        let mut s = self.0.lock();
        if !s.receiver_alive {
            return Err(message);
        }
        s.queue.push_back(message);
        let waiting = s.receiver_waiting;
        drop(s);
        if waiting {
            self.0.changed.notify_one();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.sender_alive = false;
        let waiting = s.receiver_waiting;
        drop(s);
        if waiting {
            self.0.changed.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// Waits up to `timeout` for a message. A `timeout` too large to add to the current time
    /// (e.g. `Duration::MAX`) waits without a deadline.
    ///
    /// Before it blocks, it looks again a few times, spinning and then yielding the CPU
    /// (`BACKOFF_SPINS` rounds of 1, 2, 4 ... spins, then `BACKOFF_YIELDS` yields): a vCPU
    /// paused for a moment (a snapshot, a resize's MP-state read) often gets its next request
    /// in that time, and then no sleep and wake-up is paid.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        if timeout.is_zero() {
            return self.try_recv();
        }
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.0.lock();
        for step in 0..BACKOFF_SPINS + BACKOFF_YIELDS {
            if let Some(r) = s.take() {
                return r;
            }
            drop(s);
            if step < BACKOFF_SPINS {
                for _ in 0..1u32 << step {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
            s = self.0.lock();
        }
        loop {
            if let Some(r) = s.take() {
                return r;
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.saturating_duration_since(Instant::now()) {
                    left if left.is_zero() => return Err(RecvError::Timeout),
                    left => Some(left),
                },
            };
            // Set and cleared under the lock, which the wait releases atomically: a sender
            // that queues after this sees it and wakes this thread.
            s.receiver_waiting = true;
            s = match left {
                None => self
                    .0
                    .changed
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.0
                        .changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            s.receiver_waiting = false;
        }
    }

    /// Waits for a message as long as the sender is there.
    pub(crate) fn recv(&self) -> Result<T, RecvError> {
        self.recv_timeout(Duration::MAX)
    }

    /// A queued message, without waiting (and without reading the clock: the vCPU thread
    /// calls this after every kick).
    pub(crate) fn try_recv(&self) -> Result<T, RecvError> {
        self.0.lock().take().unwrap_or(Err(RecvError::Timeout))
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver_alive = false;
        // Whatever is still queued is dropped here, not when the sender goes.
        s.queue.clear();
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("receiver_alive", &self.0.lock().receiver_alive)
            .finish()
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.lock();
        f.debug_struct("Receiver")
            .field("queued", &s.queue.len())
            .field("sender_alive", &s.sender_alive)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_in_order_and_then_the_end() {
        let (tx, rx) = channel();
        assert_eq!(tx.send(1), Ok(()));
        assert_eq!(tx.send(2), Ok(()));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(RecvError::Timeout));
        tx.send(3).unwrap();
        drop(tx);
        // What was sent before the sender went is still delivered.
        assert_eq!(rx.recv(), Ok(3));
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
        assert_eq!(rx.try_recv(), Err(RecvError::Disconnected));
    }

    #[test]
    fn nothing_sent_times_out() {
        let (_tx, rx) = channel::<u8>();
        let t = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(20)),
            Err(RecvError::Timeout)
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn a_waiter_without_deadline_wakes_for_a_message_or_a_panicking_sender() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || tx.send(String::from("fd")));
        assert_eq!(rx.recv_timeout(Duration::MAX).as_deref(), Ok("fd"));
        assert!(t.join().unwrap().is_ok());
        let (tx, rx) = channel::<u8>();
        let t = std::thread::spawn(move || {
            let _tx = tx;
            panic!("the sending thread panics");
        });
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
        assert!(t.join().is_err());
    }

    #[test]
    fn a_message_for_a_gone_receiver_comes_back() {
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }
}
