//! Kicking a vCPU thread out of `KVM_RUN`: the sender's own mapping of `kvm_run` (to set
//! `immediate_exit`) and the process-wide kick signal.
//!
//! # Why no message is ever missed
//!
//! The sender does, in this order: (S1) enqueue the message, (S2) store
//! `immediate_exit = 1` (SeqCst), (S3) load the state (SeqCst) and, if it is `Running`,
//! `pthread_kill` the thread with the kick signal.
//!
//! The vCPU thread, before every `KVM_RUN`, does: (T1) swap `immediate_exit` to 0 (a SeqCst
//! read-modify-write), (T2) if T1 found it set, drain the mailbox, (T3) `KVM_RUN`.
//!
//! S2 and T1 act on the same byte, so one of them comes first in its modification order:
//! - S2 before T1: T1 reads the value S2 stored (or a later one), so T1 finds 1, and S2
//!   synchronizes with T1: S1, sequenced before S2, happens before the drain (T2), which
//!   therefore sees the message.
//! - T1 before S2: `immediate_exit` is 1 when `KVM_RUN` (T3) is entered, so the ioctl returns
//!   `EINTR` at once without entering the guest, and the loop goes back to T1 (which now
//!   finds 1) and T2. If the thread was already inside `KVM_RUN` (past T3), its store of
//!   `Running`, sequenced before T1, precedes S2 and therefore S3 in the single total order of
//!   SeqCst operations, so S3 reads `Running` and the signal interrupts the ioctl (`EINTR`).
//!
//! So a T1 that finds 0 proves that no message is waiting that the next `KVM_RUN` would not
//! be kicked for, and the exit path skips the mailbox entirely.
//!
//! A thread that is `Paused` or `WaitingExit` blocks on the mailbox itself and wakes on S1; it
//! needs no signal.
//!
//! # The signal is never delivered
//!
//! The vCPU thread blocks the kick signal and gives KVM a mask without it for the time of
//! `KVM_RUN` (`KVM_SET_SIGNAL_MASK`, see [`deliver_only_in_kvm_run`]). A kick therefore only
//! makes `KVM_RUN` return `EINTR` (or return at once if it is pending when `KVM_RUN` is
//! entered) and stays queued; the thread takes it off the queue with a zero-timeout
//! `sigtimedwait` after every `EINTR` ([`take_queued`]). No handler runs on the vCPU thread:
//! no signal frame on its stack (a few KiB with AVX-512 or AMX state, a page of resident
//! memory per vCPU) and no `EINTR` in the system calls of its device handlers. S3 signals
//! only when the sender turns the shared `kick_queued` flag from false to true, which the
//! thread clears after taking the queued kick, so at most two kicks are ever queued for a
//! thread (see `VcpuHandle::kick` for why a sender that finds the flag set needs no signal).
//! The process-wide handler is still installed (it does nothing but a fence): it is what
//! marks the signal as this crate's, and what runs should anything else deliver it.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};

use crate::VcpuError;

/// A shared mapping of one vCPU's `kvm_run` page, used only through atomic accesses to
/// `immediate_exit`.
///
/// It is mapped from the vCPU fd itself (no duplicate fd: each vCPU costs one fd). A mapping
/// holds its own reference to the open file, and the file keeps the vCPU (and its VM)
/// alive, so the mapping stays valid until it is unmapped whatever happens to the fd it was
/// made from: closed, handed back by `join`, or mapped again by a new actor.
#[derive(Debug)]
pub(crate) struct KvmRunMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU8` operations on `immediate_exit`,
// which the kernel and every thread may touch concurrently; the pointer stays valid until drop.
unsafe impl Send for KvmRunMapping {}
// SAFETY: see `Send`.
unsafe impl Sync for KvmRunMapping {}

impl KvmRunMapping {
    /// Maps `size` bytes of `kvm_run` from the vCPU fd `vcpu`.
    pub(crate) fn new(vcpu_id: u32, vcpu: &impl AsRawFd, size: usize) -> Result<Self, VcpuError> {
        let min = std::mem::size_of::<kvm_run>();
        if size < min {
            return Err(VcpuError::MmapSizeTooSmall { vcpu_id, size, min });
        }
        // SAFETY: a new shared mapping at an address the kernel chooses, so no existing memory
        // is affected; offset 0 of a vCPU fd is its kvm_run area. The result is checked. The
        // mapping does not depend on the fd staying open (see the type's documentation); it
        // lives until `drop` unmaps it, i.e. until the handle and the thread (which share it
        // through an `Arc`) are both gone, so every write to `immediate_exit` lands in it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(VcpuError::MmapKvmRun {
                vcpu_id,
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let addr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| VcpuError::MmapKvmRun {
            vcpu_id,
            size,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(KvmRunMapping { addr, size })
    }

    fn immediate_exit_cell(&self) -> &AtomicU8 {
        let off = std::mem::offset_of!(kvm_run, immediate_exit);
        // SAFETY: `off` is inside the mapping (size >= size_of::<kvm_run>() was checked).
        let byte = unsafe { self.addr.as_ptr().add(off) };
        // SAFETY: the byte is valid for the mapping's lifetime (which bounds the returned
        // borrow), only ever accessed atomically, and AtomicU8 has the layout of u8.
        unsafe { &*byte.cast::<AtomicU8>() }
    }

    /// Sets `kvm_run.immediate_exit` to 1 (the sender's step S2).
    pub(crate) fn request_immediate_exit(&self) {
        self.immediate_exit_cell().store(1, Ordering::SeqCst)
    }

    /// Clears `kvm_run.immediate_exit` with a SeqCst swap (the vCPU thread's step T1) and says
    /// whether it was set, i.e. whether a sender may have queued a message since the last
    /// clear.
    pub(crate) fn clear_immediate_exit(&self) -> bool {
        self.immediate_exit_cell().swap(0, Ordering::SeqCst) != 0
    }

    /// Reads `kvm_run.immediate_exit`.
    #[cfg(test)]
    pub(crate) fn immediate_exit(&self) -> bool {
        self.immediate_exit_cell().load(Ordering::SeqCst) != 0
    }
}

impl Drop for KvmRunMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; nothing borrows it any more.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast::<c_void>(), self.size);
        }
    }
}

extern "C" fn kick_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Nothing to do: being delivered is what makes KVM_RUN return EINTR. The fence keeps the
    // compiler from treating the handler as removable and orders nothing else.
    fence(Ordering::SeqCst);
}

/// Serializes the check and the installation of kick handlers.
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// The address `sigaction` reports for [`kick_handler`].
fn kick_handler_address() -> libc::sighandler_t {
    kick_handler as *const () as libc::sighandler_t
}

/// The current handler of `sig` (`SIG_DFL`, `SIG_IGN` or a function's address).
fn current_handler(sig: c_int) -> Result<libc::sighandler_t, VcpuError> {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a query only (no new action); `old` is valid for writes of a `sigaction`.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(VcpuError::SignalHandler {
            signal: sig,
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    // SAFETY: all-zero is a valid `sigaction` (a plain C struct), and sigaction(2) succeeded.
    let old = unsafe { old.assume_init() };
    Ok(old.sa_sigaction)
}

/// The kick signal number for `offset`, installing its handler where the signal has the
/// default disposition. A signal that already has this crate's handler is used as is; one
/// with any other handler (or `SIG_IGN`) is refused: it belongs to someone else.
pub(crate) fn kick_signal(offset: i32) -> Result<c_int, VcpuError> {
    let sig = vmm_sys_util::signal::SIGRTMIN().saturating_add(offset);
    if !(0..64).contains(&offset) || sig > vmm_sys_util::signal::SIGRTMAX() {
        return Err(VcpuError::InvalidKickSignal { offset });
    }
    let _lock = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let current = current_handler(sig)?;
    if current == kick_handler_address() {
        return Ok(sig);
    }
    if current != libc::SIG_DFL {
        return Err(VcpuError::KickSignalInUse {
            signal: sig,
            offset,
        });
    }
    // register_signal_handler uses SA_SIGINFO without SA_RESTART.
    vmm_sys_util::signal::register_signal_handler(sig, kick_handler).map_err(|source| {
        VcpuError::SignalHandler {
            signal: sig,
            source,
        }
    })?;
    Ok(sig)
}

// `KVM_SET_SIGNAL_MASK` (include/uapi/linux/kvm.h): the signal mask of the calling thread
// while it is inside `KVM_RUN` of this vCPU.
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    kvm_bindings::KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);

/// `struct kvm_signal_mask` followed by the kernel's signal set (64 bits on x86-64, bit
/// `n - 1` for signal `n`), as `KVM_SET_SIGNAL_MASK` reads it.
#[repr(C)]
struct KernelSignalMask {
    len: u32,
    sigset: [u8; 8],
}

/// The set holding `sig` alone.
fn only(sig: c_int) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `set` is valid for writes; sigemptyset only writes it.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: as above; sigaddset fails only for a signal number out of range, which
    // `kick_signal` has excluded.
    unsafe { libc::sigaddset(set.as_mut_ptr(), sig) };
    // SAFETY: sigemptyset initialized it.
    unsafe { set.assume_init() }
}

/// The signals a vCPU thread leaves unblocked: those the kernel raises for the thread's own
/// faults (blocking them would kill the process at the first fault), `SIGSYS` for the
/// seccomp filter's traps and `SIGABRT` for `abort`.
const SYNCHRONOUS: [c_int; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
    libc::SIGABRT,
];

/// Sets the calling vCPU thread's signal masks: outside `KVM_RUN` every signal is blocked but
/// the [`SYNCHRONOUS`] ones, inside `KVM_RUN` of `vcpu` (`KVM_SET_SIGNAL_MASK`) the kick
/// signal `sig` is unblocked too.
///
/// - A kick makes `KVM_RUN` return `EINTR` (or not enter the guest) and stays queued, never
///   delivered: no handler runs, so no signal frame lands on the thread's stack (up to
///   11 KiB with AMX state, about 3 KiB with AVX-512) and no system call of an exit handler
///   is interrupted. [`take_queued`] takes it off the queue.
/// - Signals sent to the process (`SIGCHLD`, `SIGINT`, `SIGTERM` ...) go to one of its
///   threads that does not block them: never a vCPU thread, where the embedder's handler
///   would run under the vCPU's seccomp filter, on its small stack, in the middle of an exit.
///
/// On failure the mask is as it was and the thread must not run the vCPU.
pub(crate) fn deliver_only_in_kvm_run(vcpu: &impl AsRawFd, sig: c_int) -> std::io::Result<()> {
    let mut block = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `block` is valid for writes; sigfillset fills it (glibc leaves its own internal
    // signals out of a filled set).
    unsafe { libc::sigfillset(block.as_mut_ptr()) };
    for s in SYNCHRONOUS {
        // SAFETY: as above; every signal of the list is in range.
        unsafe { libc::sigdelset(block.as_mut_ptr(), s) };
    }
    // SAFETY: sigfillset initialized it.
    let block = unsafe { block.assume_init() };
    let mut before = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both sets are valid; pthread_sigmask writes the old mask into `before`.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &block, before.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: pthread_sigmask succeeded and filled it in.
    let before = unsafe { before.assume_init() };
    // The thread's mask now is `before` and `block` together; inside KVM_RUN, that without
    // the kick.
    // SAFETY: `set` is a valid set; sigismember only reads it.
    let has = |set: &libc::sigset_t, n: c_int| unsafe { libc::sigismember(set, n) } == 1;
    let bits = (1..=64)
        .filter(|&n| n != sig && (has(&before, n) || has(&block, n)))
        .fold(0u64, |bits, n| bits | 1 << (n - 1));
    let mask = KernelSignalMask {
        len: 8,
        sigset: bits.to_le_bytes(),
    };
    // SAFETY: KVM_SET_SIGNAL_MASK reads a kvm_signal_mask and the `len` bytes after it,
    // which `mask` holds; the fd is a vCPU fd.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &mask) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        // SAFETY: `before` is the thread's mask from above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
        return Err(error);
    }
    Ok(())
}

/// Takes every queued instance of the kick signal `sig` (blocked in the calling thread, see
/// [`deliver_only_in_kvm_run`]) without waiting. The vCPU thread calls it whenever `KVM_RUN`
/// returns `EINTR`: a kick left queued would make every later `KVM_RUN` return at once.
pub(crate) fn take_queued(sig: c_int) {
    let kick = only(sig);
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // At most two are queued (see `VcpuHandle::kick`); the bound only guards the loop.
    for _ in 0..64 {
        // SAFETY: valid set and timeout; no siginfo is asked for.
        let got = unsafe { libc::sigtimedwait(&kick, std::ptr::null_mut(), &now) };
        if got != sig {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_signal_is_realtime_and_idempotent() {
        let a = kick_signal(0).unwrap();
        let b = kick_signal(0).unwrap();
        assert_eq!(a, b);
        assert!(a >= vmm_sys_util::signal::SIGRTMIN());
        assert!(matches!(
            kick_signal(1000),
            Err(VcpuError::InvalidKickSignal { offset: 1000 })
        ));
    }

    #[test]
    fn mapping_shares_immediate_exit_with_the_vcpu_fd() {
        let Some(kvm) = crate::test_util::kvm_or_skip("mapping_shares_immediate_exit") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let size = kvm.get_vcpu_mmap_size().unwrap();
        let map = KvmRunMapping::new(0, &vcpu, size).unwrap();
        assert!(!map.immediate_exit());
        map.request_immediate_exit();
        assert_eq!(vcpu.get_kvm_run().immediate_exit, 1);
        // With immediate_exit set, KVM_RUN returns EINTR without entering the guest.
        assert_eq!(vcpu.run().unwrap_err().errno(), libc::EINTR);
        assert!(map.clear_immediate_exit());
        assert_eq!(vcpu.get_kvm_run().immediate_exit, 0);
        assert!(!map.clear_immediate_exit());
        vcpu.set_kvm_immediate_exit(1);
        assert!(map.immediate_exit());
    }

    #[test]
    fn too_small_mapping_is_refused() {
        assert!(matches!(
            KvmRunMapping::new(3, &std::io::stdin(), 16),
            Err(VcpuError::MmapSizeTooSmall {
                vcpu_id: 3,
                size: 16,
                ..
            })
        ));
    }

    extern "C" fn foreign_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

    #[test]
    fn a_handler_that_is_not_ours_is_not_replaced() {
        // Offsets no other test of this process uses.
        let (foreign, ignored) = (5, 6);
        let sig = vmm_sys_util::signal::SIGRTMIN() + foreign;
        vmm_sys_util::signal::register_signal_handler(sig, foreign_handler).unwrap();
        let refused = kick_signal(foreign).unwrap_err();
        assert!(
            matches!(refused, VcpuError::KickSignalInUse { signal, offset } if signal == sig && offset == foreign),
            "{refused:?}"
        );
        let text = refused.to_string();
        assert!(text.contains("kick_signal_offset"), "{text}");
        assert_eq!(
            current_handler(sig).unwrap(),
            foreign_handler as *const () as usize
        );

        let sig = vmm_sys_util::signal::SIGRTMIN() + ignored;
        // SAFETY: setting SIG_IGN for a real-time signal nothing in this test process uses.
        let old = unsafe { libc::signal(sig, libc::SIG_IGN) };
        assert_ne!(old, libc::SIG_ERR);
        assert!(matches!(
            kick_signal(ignored),
            Err(VcpuError::KickSignalInUse { .. })
        ));
        assert_eq!(current_handler(sig).unwrap(), libc::SIG_IGN);
    }

    #[test]
    fn our_own_handler_is_reused_and_the_default_replaced() {
        let offset = 4;
        let sig = vmm_sys_util::signal::SIGRTMIN() + offset;
        assert_eq!(current_handler(sig).unwrap(), libc::SIG_DFL);
        assert_eq!(kick_signal(offset).unwrap(), sig);
        assert_eq!(current_handler(sig).unwrap(), kick_handler_address());
        assert_eq!(kick_signal(offset).unwrap(), sig);
    }
}
