//! The manager's end of a vCPU actor ([`VcpuHandle`]) and what it shares with the thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use slog::{debug, warn, Logger};

use crate::channel::{Receiver, RecvError, Sender};
use crate::kick::KvmRunMapping;
use crate::metrics::VcpuMetrics;
use crate::os_thread::OsThread;
use crate::state::AtomicVcpuState;
use crate::VcpuState;
use crate::{RequestId, VcpuError, VcpuExitReason, VcpuMetricsSnapshot, VcpuReply, VcpuRequest};

/// A request as it travels through the mailbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Envelope {
    pub(crate) id: RequestId,
    pub(crate) request: VcpuRequest,
}

/// At most this many replies wait unclaimed per vCPU; past it the oldest reply that nobody
/// waits for is discarded (replies being waited for are never discarded, even past it).
pub(crate) const MAX_UNCLAIMED_REPLIES: usize = 4096;

/// How many discarded request ids are remembered exactly (so that a late `wait_reply` for one
/// is told at once); older ones are summed up by [`ReplyBox::forgotten_below`].
const MAX_REMEMBERED_DISCARDS: usize = 4 * MAX_UNCLAIMED_REPLIES;

/// Replies not yet claimed by `wait_reply`.
///
/// Bounded: a caller that sends without ever waiting cannot make it grow past
/// [`MAX_UNCLAIMED_REPLIES`] replies and [`MAX_REMEMBERED_DISCARDS`] ids. A reply that a
/// `wait_reply` is waiting for is never discarded.
#[derive(Debug, Default)]
pub(crate) struct ReplyBox {
    pub(crate) replies: Replies,
    /// The thread has dropped its mailbox: no further replies will come.
    pub(crate) finished: bool,
    /// Request ids with a `wait_reply` in progress, and how many waiters each has.
    waiting: BTreeMap<u64, usize>,
    /// Requests whose reply was discarded unclaimed (the most recent ones).
    discarded: BTreeSet<u64>,
    /// Every request below this id whose reply is not in `replies` was discarded or taken.
    forgotten_below: u64,
}

impl ReplyBox {
    /// Stores a reply; when more than [`MAX_UNCLAIMED_REPLIES`] are unclaimed, discards the
    /// oldest one that nobody waits for and returns its request id.
    pub(crate) fn insert(&mut self, reply: VcpuReply) -> Option<u64> {
        self.replies.insert(reply);
        if self.replies.len() <= MAX_UNCLAIMED_REPLIES {
            return None;
        }
        let victim = self
            .replies
            .oldest_where(|id| !self.waiting.contains_key(&id))?;
        self.replies.take(victim);
        self.discarded.insert(victim);
        if self.discarded.len() > MAX_REMEMBERED_DISCARDS {
            if let Some(oldest) = self.discarded.pop_first() {
                self.forgotten_below = self.forgotten_below.max(oldest + 1);
            }
        }
        Some(victim)
    }

    /// Whether the reply to `id` was discarded unclaimed (or, for a very old id, may have
    /// been).
    fn was_discarded(&self, id: u64) -> bool {
        self.discarded.contains(&id) || (id < self.forgotten_below && !self.replies.contains(id))
    }

    /// Whether a `wait_reply` for `id` is in progress (it must then be woken).
    pub(crate) fn is_waited_for(&self, id: u64) -> bool {
        self.waiting.contains_key(&id)
    }

    fn add_waiter(&mut self, id: u64) {
        *self.waiting.entry(id).or_insert(0) += 1;
    }

    fn remove_waiter(&mut self, id: u64) {
        if let Some(n) = self.waiting.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(&id);
                release_if_empty(&mut self.waiting);
            }
        }
    }

    /// Takes the reply to `id`, if it is there.
    fn take(&mut self, id: u64) -> Option<VcpuReply> {
        self.replies.take(id)
    }
}

/// Gives an emptied map's memory back. A `BTreeMap` keeps its last node when its last entry
/// is removed (0.2 KiB for `waiting`, 0.45 KiB for the replies' overflow), per vCPU for the
/// life of the actor, although between requests both are empty.
fn release_if_empty<K, V>(map: &mut BTreeMap<K, V>) {
    if map.is_empty() {
        *map = BTreeMap::new();
    }
}

/// The unclaimed replies of one actor, by request id: the first in a slot of its own, any
/// others in a map. Nearly always there is at most one (a request, its reply, the
/// `wait_reply` that takes it), which then costs no allocation: with a map alone, each
/// reply would allocate a node on the vCPU thread that the waiting thread frees (or the
/// map would keep it, 0.45 KiB per vCPU for good).
#[derive(Debug, Default)]
pub(crate) struct Replies {
    first: Option<VcpuReply>,
    more: BTreeMap<u64, VcpuReply>,
}

impl Replies {
    fn insert(&mut self, reply: VcpuReply) {
        if self.first.is_none() {
            self.first = Some(reply);
        } else {
            self.more.insert(reply.request_id.0, reply);
        }
    }

    fn take(&mut self, id: u64) -> Option<VcpuReply> {
        if self.first.as_ref().is_some_and(|r| r.request_id.0 == id) {
            return self.first.take();
        }
        let reply = self.more.remove(&id)?;
        release_if_empty(&mut self.more);
        Some(reply)
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn contains(&self, id: u64) -> bool {
        self.first.as_ref().is_some_and(|r| r.request_id.0 == id) || self.more.contains_key(&id)
    }

    /// The smallest request id for which `keep` is true.
    fn oldest_where(&self, keep: impl Fn(u64) -> bool) -> Option<u64> {
        let first = self
            .first
            .as_ref()
            .map(|r| r.request_id.0)
            .filter(|id| keep(*id));
        let more = self.more.keys().copied().find(|id| keep(*id));
        match (first, more) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the handle and the thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: u32,
    pub(crate) state: AtomicVcpuState,
    pub(crate) metrics: VcpuMetrics,
    /// 0 until the thread has started.
    pub(crate) tid: AtomicI32,
    pub(crate) exit_reason: OnceLock<VcpuExitReason>,
    pub(crate) replies: Mutex<ReplyBox>,
    pub(crate) reply_ready: Condvar,
    /// Dropped (unmapped) with the last of the handle and the thread, so every write to
    /// `immediate_exit`, from either side, lands in a live mapping.
    pub(crate) kvm_run: KvmRunMapping,
    /// A kick signal has been sent that the thread may not have taken off its queue yet
    /// (see [`VcpuHandle::kick`]).
    pub(crate) kick_queued: AtomicBool,
    /// The kick signal's number: blocked in the thread except inside `KVM_RUN`.
    pub(crate) kick_signal: libc::c_int,
}

impl Shared {
    pub(crate) fn new(id: u32, kvm_run: KvmRunMapping, kick_signal: libc::c_int) -> Self {
        Shared {
            id,
            state: AtomicVcpuState::new(VcpuState::Paused),
            metrics: VcpuMetrics::default(),
            tid: AtomicI32::new(0),
            exit_reason: OnceLock::new(),
            replies: Mutex::new(ReplyBox::default()),
            reply_ready: Condvar::new(),
            kvm_run,
            kick_queued: AtomicBool::new(false),
            kick_signal,
        }
    }

    /// Makes the thread leave `KVM_RUN` and look at its mailbox: sets `immediate_exit`, then,
    /// if the thread is `Running`, signals `pthread` (the thread's id, `None` once it has
    /// been joined) as [`VcpuHandle::kick`] explains.
    pub(crate) fn kick(&self, pthread: Option<libc::pthread_t>, logger: &Logger) {
        self.kvm_run.request_immediate_exit();
        let Some(pthread) = pthread else {
            return;
        };
        if self.state.load() == VcpuState::Running && !self.kick_queued.swap(true, Ordering::SeqCst)
        {
            // SAFETY: the caller passes the id of a thread that has not been joined, so the
            // id is valid even if the thread has ended (pthread_kill then says ESRCH).
            let rc = unsafe { libc::pthread_kill(pthread, self.kick_signal) };
            if rc != 0 {
                // Nothing is queued after all: let the next sender try.
                self.kick_queued.store(false, Ordering::SeqCst);
                if rc != libc::ESRCH {
                    warn!(logger, "cannot signal the vCPU thread";
                          "signal" => self.kick_signal, "errno" => rc);
                }
            }
        }
    }

    pub(crate) fn lock_replies(&self) -> MutexGuard<'_, ReplyBox> {
        // A poisoned lock only means a waiter panicked; the map itself is consistent.
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The manager's end of one vCPU actor, made by [`VcpuHandle::spawn`] or
/// [`PendingVcpu::wait_ready`](crate::PendingVcpu::wait_ready). `Send + Sync`: any thread may
/// send requests and wait for their replies. Dropping the handle without
/// [`join`](Self::join) asks the thread to exit and detaches it.
#[derive(Debug)]
pub struct VcpuHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tx: Sender<Envelope>,
    pub(crate) done_rx: Receiver<VcpuFd>,
    pub(crate) join: Option<OsThread>,
    /// Valid while `join` is `Some` (the thread is not joined, so the id is not reused).
    pub(crate) pthread: libc::pthread_t,
    pub(crate) next_id: AtomicU64,
    pub(crate) logger: Logger,
}

impl VcpuHandle {
    /// How many replies may wait unclaimed per vCPU: send requests without taking their
    /// replies and, past this, the oldest reply that no [`wait_reply`](Self::wait_reply) is
    /// waiting for is discarded (a later `wait_reply` for it fails with
    /// [`VcpuError::ReplyDiscarded`]).
    pub const MAX_UNCLAIMED_REPLIES: usize = MAX_UNCLAIMED_REPLIES;

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Enqueues `req` and kicks the thread out of `KVM_RUN` so that it sees it promptly.
    /// The reply is taken with [`wait_reply`](Self::wait_reply).
    ///
    /// # Errors
    ///
    /// [`VcpuError::ThreadGone`] when the thread has closed its mailbox.
    pub fn send(&self, req: VcpuRequest) -> Result<RequestId, VcpuError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.tx
            .send(Envelope { id, request: req })
            .map_err(|_| self.thread_gone())?;
        self.kick();
        Ok(id)
    }

    /// Makes the thread leave `KVM_RUN` (if it is in it) and look at its mailbox; see the
    /// ordering argument in the `kick` module.
    ///
    /// The signal is blocked in the thread outside `KVM_RUN` and queued until the thread
    /// takes it (after `KVM_RUN` returns `EINTR`, then clearing `kick_queued`). A sender
    /// signals only when it turns `kick_queued` from false to true, so at most two kicks are
    /// ever queued for a thread, however many senders and however long an exit handler
    /// takes. One that finds it true needs no signal of its own: the signal of the sender
    /// that set it is queued (or on its way) and ends the next `KVM_RUN` at once, or the
    /// thread has taken it and has yet to clear the flag, which it does before its next T1
    /// (so T1 sees this sender's `immediate_exit`).
    fn kick(&self) {
        // `pthread` is valid only while `join` is Some (the thread is not joined).
        self.shared
            .kick(self.join.as_ref().map(|_| self.pthread), &self.logger);
    }

    fn thread_gone(&self) -> VcpuError {
        VcpuError::ThreadGone {
            vcpu_id: self.shared.id,
            state: self.shared.state.load(),
        }
    }

    /// Waits up to `timeout` for the reply to request `id` and takes it (each reply can be
    /// taken once). A `timeout` too large to add to the current time (e.g. `Duration::MAX`)
    /// waits without a deadline.
    ///
    /// # Errors
    ///
    /// [`VcpuError::UnknownRequest`] for an id this handle did not issue,
    /// [`VcpuError::ReplyDiscarded`] when the reply came but was discarded because more than
    /// [`MAX_UNCLAIMED_REPLIES`](crate::VcpuHandle::MAX_UNCLAIMED_REPLIES) replies were left
    /// unclaimed (a reply is never discarded while this method waits for it),
    /// [`VcpuError::ReplyTimeout`] when no reply came in time (or it was already taken),
    /// [`VcpuError::ThreadGone`] when the thread ended without answering.
    pub fn wait_reply(&self, id: RequestId, timeout: Duration) -> Result<VcpuReply, VcpuError> {
        if id.0 >= self.next_id.load(Ordering::Relaxed) {
            return Err(VcpuError::UnknownRequest {
                vcpu_id: self.shared.id,
                request_id: id,
            });
        }
        let deadline = Instant::now().checked_add(timeout);
        let mut replies = self.shared.lock_replies();
        // Registered under the lock, before looking: the thread never discards a reply that
        // is waited for.
        replies.add_waiter(id.0);
        let result = loop {
            if let Some(reply) = replies.take(id.0) {
                break Ok(reply);
            }
            if replies.was_discarded(id.0) {
                break Err(VcpuError::ReplyDiscarded {
                    vcpu_id: self.shared.id,
                    request_id: id,
                    limit: MAX_UNCLAIMED_REPLIES,
                });
            }
            if replies.finished {
                break Err(self.thread_gone());
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d > now => d - now,
                Some(_) => {
                    break Err(VcpuError::ReplyTimeout {
                        vcpu_id: self.shared.id,
                        request_id: id,
                        timeout,
                        state: self.shared.state.load(),
                    })
                }
                // A timeout too large for Instant: wait in long slices.
                None => Duration::from_secs(3600),
            };
            replies = self
                .shared
                .reply_ready
                .wait_timeout(replies, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        replies.remove_waiter(id.0);
        result
    }

    /// [`send`](Self::send) then [`wait_reply`](Self::wait_reply).
    ///
    /// # Errors
    ///
    /// Those of [`send`](Self::send) and [`wait_reply`](Self::wait_reply).
    pub fn request(&self, req: VcpuRequest, timeout: Duration) -> Result<VcpuReply, VcpuError> {
        let id = self.send(req)?;
        self.wait_reply(id, timeout)
    }

    /// The state last published by the thread (a lock-free read).
    pub fn state(&self) -> VcpuState {
        self.shared.state.load()
    }

    /// Why the vCPU went to [`VcpuState::WaitingExit`], once it has.
    pub fn exit_reason(&self) -> Option<VcpuExitReason> {
        self.shared.exit_reason.get().cloned()
    }

    /// A copy of the vCPU's counters.
    pub fn metrics(&self) -> VcpuMetricsSnapshot {
        self.shared.metrics.snapshot(self.shared.id)
    }

    /// The Linux thread id of the vCPU thread (known once the handle exists).
    pub fn tid(&self) -> Option<i32> {
        match self.shared.tid.load(Ordering::Relaxed) {
            0 => None,
            tid => Some(tid),
        }
    }

    /// Waits up to `timeout` for the thread to end and gives the vCPU fd back. If the actor
    /// has not exited yet, `Exit` is sent first. A `timeout` too large to add to the current
    /// time (e.g. `Duration::MAX`) waits without a deadline.
    ///
    /// # Errors
    ///
    /// [`VcpuError::JoinTimeout`] when the thread did not end in time (it stays detached,
    /// the fd is lost), [`VcpuError::ThreadPanicked`] when it ended without the fd.
    pub fn join(mut self, timeout: Duration) -> Result<VcpuFd, VcpuError> {
        if self.shared.state.load() != VcpuState::Exited {
            // The thread may be gone already; what matters is what done_rx says.
            let _ = self.send(VcpuRequest::Exit);
        }
        let id = self.shared.id;
        // The channel waits without a deadline when `timeout` overflows Instant.
        match self.done_rx.recv_timeout(timeout) {
            Ok(fd) => {
                if let Some(join) = self.join.take() {
                    // The thread sent the fd as its last act; this returns promptly.
                    let _ = join.join();
                }
                Ok(fd)
            }
            Err(RecvError::Timeout) => Err(VcpuError::JoinTimeout {
                vcpu_id: id,
                timeout,
                state: self.shared.state.load(),
            }),
            Err(RecvError::Disconnected) => {
                let message = match self.join.take().map(OsThread::join) {
                    Some(Err(payload)) => panic_message(payload.as_ref()),
                    _ => "the thread ended without giving the vCPU fd back".to_string(),
                };
                Err(VcpuError::ThreadPanicked {
                    vcpu_id: id,
                    message,
                })
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.join.is_some() && self.shared.state.load() != VcpuState::Exited {
            debug!(
                self.logger,
                "handle dropped without join: asking the vCPU thread to exit"
            );
            let _ = self.send(VcpuRequest::Exit);
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplyOutcome;

    fn reply(id: u64) -> VcpuReply {
        VcpuReply {
            vcpu_id: 0,
            request_id: RequestId(id),
            request: VcpuRequest::GetState,
            outcome: ReplyOutcome::State(VcpuState::Paused),
        }
    }

    #[test]
    fn unclaimed_replies_are_bounded_but_a_waited_one_is_kept() {
        let mut b = ReplyBox::default();
        // Someone waits for request 0; requests 1.. are never claimed.
        b.add_waiter(0);
        let n = MAX_UNCLAIMED_REPLIES as u64 + 10;
        let discarded: Vec<u64> = (0..=n).filter_map(|id| b.insert(reply(id))).collect();
        assert_eq!(discarded, (1..=11).collect::<Vec<_>>());
        assert_eq!(b.replies.len(), MAX_UNCLAIMED_REPLIES);
        assert!(b.replies.contains(0) && b.replies.contains(n));
        assert!(b.was_discarded(1) && b.was_discarded(11));
        assert!(!b.was_discarded(0) && !b.was_discarded(12) && !b.was_discarded(n + 1));
        b.remove_waiter(0);
        assert!(b.waiting.is_empty());

        // Flooding on: the remembered discards are bounded too, and older ids still count
        // as discarded.
        let more = n + 2 * MAX_REMEMBERED_DISCARDS as u64;
        for id in n + 1..=more {
            b.insert(reply(id));
        }
        assert_eq!(b.replies.len(), MAX_UNCLAIMED_REPLIES);
        assert_eq!(b.discarded.len(), MAX_REMEMBERED_DISCARDS);
        assert!(b.was_discarded(1) && b.was_discarded(0) && b.was_discarded(more - 5000));
        assert!(!b.was_discarded(more));
    }
}
