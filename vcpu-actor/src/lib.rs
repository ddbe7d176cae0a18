//! vCPU actors: one thread per vCPU that owns its KVM vCPU fd and is driven by typed
//! messages.
//!
//! This crate owns what happens on a vCPU thread: the life-cycle state machine
//! ([`VcpuState`]: created `paused`, `Resume` -> `running`, an exit it cannot handle ->
//! `waiting_exit`, `Exit` -> `exited`), the `KVM_RUN` loop and its exit dispatch to the VMM's
//! [`ExitHandler`], kicking a running vCPU out of `KVM_RUN` without races (the sender sets
//! `kvm_run.immediate_exit` through its own mapping, then signals the thread), per-vCPU
//! [metrics](VcpuMetricsSnapshot), a per-thread [seccomp filter](SeccompMode), on by
//! default (`ioctl` only on the vCPU's own fd with the vCPU requests, `write` only to the
//! exit EventFd, no new executable memory; a forbidden call stops the VM with
//! [`VcpuExitReason::SeccompViolation`] naming it), and saving a paused vCPU's state on its
//! own thread ([`VcpuRequest::SaveState`], with the VMM's [`VcpuStateSaver`]; a pause first
//! completes the I/O instruction of the last exit).
//! It does not create VMs or vCPUs, set registers or CPUID, or route I/O: that is the VMM's.
//!
//! The manager talks to each actor through a [`VcpuHandle`]: [`VcpuHandle::send`] returns a
//! [`RequestId`], and every [`VcpuReply`] carries it back together with the request.
//! [`VcpuHandle::spawn`] starts one actor and waits until its thread is ready; to start many,
//! start each with [`PendingVcpu::start`] and then [`wait_ready`](PendingVcpu::wait_ready) on
//! each, so that the threads get ready in parallel.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use kvm_ioctls::Kvm;
//! use vcpu_actor::{
//!     DeviceError, ExitHandler, IoOutcome, ReplyOutcome, VcpuHandle, VcpuOptions, VcpuParts,
//!     VcpuRequest,
//! };
//! use vmm_sys_util::eventfd::EventFd;
//!
//! /// A bus with no devices: reads return all ones, writes are dropped.
//! struct EmptyBus;
//!
//! impl ExitHandler for EmptyBus {
//!     fn pio_read(&self, _: u32, _: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
//!         data.fill(0xff);
//!         Ok(IoOutcome::Handled)
//!     }
//!     fn pio_write(&self, _: u32, _: u16, _: &[u8]) -> Result<IoOutcome, DeviceError> {
//!         Ok(IoOutcome::Handled)
//!     }
//!     fn mmio_read(&self, _: u32, _: u64, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
//!         data.fill(0xff);
//!         Ok(IoOutcome::Handled)
//!     }
//!     fn mmio_write(&self, _: u32, _: u64, _: &[u8]) -> Result<IoOutcome, DeviceError> {
//!         Ok(IoOutcome::Handled)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! // ... guest memory, registers and CPUID are the VMM's business ...
//! let vcpu = vm.create_vcpu(0)?;
//! // One exit EventFd for the whole VM, shared by every vCPU.
//! let exit_evt = Arc::new(EventFd::new(0)?);
//! let parts = VcpuParts {
//!     id: 0,
//!     vcpu,
//!     vcpu_mmap_size: kvm.get_vcpu_mmap_size()?,
//!     handler: Arc::new(EmptyBus),
//!     exit_evt: Arc::clone(&exit_evt),
//! };
//! // On failure, `SpawnFailure::vcpu` gives the fd back where it can.
//! let handle = VcpuHandle::spawn(parts, VcpuOptions::default())?;
//! let timeout = Duration::from_secs(5);
//! let reply = handle.request(VcpuRequest::Resume, timeout)?;
//! assert_eq!(reply.outcome, ReplyOutcome::Resumed);
//! // ... later, or once `exit_evt` fires (see `handle.exit_reason()`):
//! handle.request(VcpuRequest::Exit, timeout)?;
//! let _vcpu_fd_back = handle.join(timeout)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Threads and signals
//!
//! The kick signal is `SIGRTMIN + VcpuOptions::kick_signal_offset`; its handler (installed
//! once per process, without `SA_RESTART`) does nothing. vCPU threads keep the signal blocked
//! except inside `KVM_RUN` (`KVM_SET_SIGNAL_MASK`): a kick interrupts `KVM_RUN` and is then
//! taken off the thread's queue, never delivered to the handler, so exit handlers' system
//! calls are not interrupted by kicks. vCPU threads also block every other asynchronous
//! signal (all but `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGTRAP`, `SIGSYS` and
//! `SIGABRT`): signals sent to the process go to the embedder's other threads, never to a
//! vCPU thread running under its seccomp filter.
//!
//! The handler is installed only over the default disposition: a spawn whose kick signal
//! already has another handler (or `SIG_IGN`) fails with [`VcpuError::KickSignalInUse`];
//! choose another offset then. Once vCPUs are spawned, the embedder must not change the
//! kick signal's disposition nor the vCPU threads' signal masks: with `SIG_IGN` pauses time
//! out, with `SIG_DFL` the first kick kills the process.
//!
//! With the default seccomp mode ([`ViolationAction::StopVm`]) the crate also installs a
//! `SIGSYS` handler (once per process, only over the default disposition; a spawn fails with
//! [`VcpuError::SeccompBuild`] if `SIGSYS` has another handler) and unblocks `SIGSYS` in
//! vCPU threads. Exit handlers and the actor's logger run on the filtered thread: see the
//! [`seccomp`] module for what they may call.

#![deny(missing_docs)]

mod affinity;
mod channel;
mod error;
mod exit;
mod handle;
mod kick;
mod mailbox;
mod metrics;
mod os_thread;
mod request;
mod save;
pub mod seccomp;
mod spawn;
pub mod state;
#[cfg(feature = "test-util")]
pub mod test_util;
mod thread;

pub use affinity::{set_current_thread_affinity, thread_affinity, MAX_CPUS};
pub use error::VcpuError;
pub use exit::{DeviceError, ExitHandler, IoAccess, IoOutcome, VcpuExitReason};
pub use handle::VcpuHandle;
pub use metrics::{ExitCounts, VcpuMetricsSnapshot};
pub use request::{ReplyOutcome, RequestId, RequestRefused, VcpuReply, VcpuRequest};
pub use save::{SaveStateError, VcpuStateSaver};
pub use seccomp::{syscall_name, unrestricted_syscalls, vcpu_ioctls, SeccompMode, ViolationAction};
pub use spawn::{PendingVcpu, SpawnFailure, VcpuOptions, VcpuParts, VcpuSetup};
pub use state::VcpuState;
