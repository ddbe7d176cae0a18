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
//! needs no signal. The signal handler does nothing but a fence: its only job is to make the
//! ioctl return `EINTR`, so it is installed without `SA_RESTART`.

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

/// Unblocks `sig` in the calling thread (a spawner that blocked it must not stop kicks).
pub(crate) fn unblock_in_current_thread(sig: c_int) {
    let _ = vmm_sys_util::signal::unblock_signal(sig);
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
