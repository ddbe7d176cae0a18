//! The crate's error type.

use std::time::Duration;

use crate::request::RequestId;
use crate::state::VcpuState;

/// Everything that can go wrong when spawning or talking to a vCPU actor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// `mmap(2)` of the vCPU's `kvm_run` area failed.
    #[error("vCPU {vcpu_id}: cannot mmap {size} bytes of kvm_run from the vCPU fd: {source}; pass Kvm::get_vcpu_mmap_size() as vcpu_mmap_size")]
    MmapKvmRun {
        /// The vCPU id.
        vcpu_id: u32,
        /// The size that was asked for.
        size: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The `vcpu_mmap_size` given to spawn is smaller than `struct kvm_run`.
    #[error("vCPU {vcpu_id}: vcpu_mmap_size {size} is smaller than struct kvm_run ({min} bytes); pass Kvm::get_vcpu_mmap_size()")]
    MmapSizeTooSmall {
        /// The vCPU id.
        vcpu_id: u32,
        /// The size given.
        size: usize,
        /// The minimum.
        min: usize,
    },
    /// The process-wide kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler for signal {signal}: {source}; choose another kick_signal_offset in VcpuOptions")]
    SignalHandler {
        /// The signal number.
        signal: i32,
        /// The OS error.
        source: vmm_sys_util::errno::Error,
    },
    /// Something else in the process has a handler (or `SIG_IGN`) for the kick signal; this
    /// crate does not replace it.
    #[error("the vCPU kick signal {signal} (SIGRTMIN+{offset}) already has a handler that is not vcpu-actor's; choose another kick_signal_offset in VcpuOptions, or leave that signal to vcpu-actor")]
    KickSignalInUse {
        /// The signal number.
        signal: i32,
        /// The offset from `SIGRTMIN` that was asked for.
        offset: i32,
    },
    /// The kick signal offset does not name a real-time signal.
    #[error("kick signal SIGRTMIN+{offset} is past SIGRTMAX; choose a smaller kick_signal_offset")]
    InvalidKickSignal {
        /// The offset that was asked for.
        offset: i32,
    },
    /// The vCPU thread could not be created.
    #[error("vCPU {vcpu_id}: cannot spawn thread vcpu{vcpu_id}: {source}; check the thread and memory limits")]
    SpawnThread {
        /// The vCPU id.
        vcpu_id: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// The seccomp filter could not be compiled.
    #[error("vCPU {vcpu_id}: cannot build the seccomp filter: {reason}; check SeccompMode in VcpuOptions")]
    SeccompBuild {
        /// The vCPU id.
        vcpu_id: u32,
        /// What seccompiler said.
        reason: String,
    },
    /// The vCPU thread could not install its seccomp filter (the thread has ended, the vCPU
    /// fd is closed).
    #[error("vCPU {vcpu_id}: cannot install the seccomp filter in the vCPU thread: {reason}; run without SeccompMode or check that the kernel has CONFIG_SECCOMP_FILTER")]
    SeccompApply {
        /// The vCPU id.
        vcpu_id: u32,
        /// What seccompiler said.
        reason: String,
    },
    /// The vCPU thread could not restrict itself to its CPU set
    /// ([`VcpuOptions::affinity`](crate::VcpuOptions::affinity)); the thread has ended and
    /// handed the vCPU fd back.
    #[error("vCPU {vcpu_id}: cannot pin the vCPU thread to its CPU set: {reason}; list host CPUs that are online and allowed to this process (see `taskset -pc $$`)")]
    Affinity {
        /// The vCPU id.
        vcpu_id: u32,
        /// What failed.
        reason: String,
    },
    /// The vCPU thread could not block the kick signal or give KVM its signal mask for
    /// `KVM_RUN` (`KVM_SET_SIGNAL_MASK`); the thread has ended and handed the vCPU fd back.
    #[error("vCPU {vcpu_id}: cannot set the kick signal's mask for KVM_RUN (KVM_SET_SIGNAL_MASK): {source}; this KVM or seccomp policy does not allow it")]
    KickMask {
        /// The vCPU id.
        vcpu_id: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// The setup given to [`PendingVcpu::start_with_setup`](crate::PendingVcpu::start_with_setup)
    /// failed on the vCPU thread; the thread has ended and handed the vCPU fd back.
    #[error("vCPU {vcpu_id}: setting the vCPU up on its thread failed: {source}")]
    Setup {
        /// The vCPU id.
        vcpu_id: u32,
        /// What the setup returned (downcast it to the caller's own error type).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The new vCPU thread did not report that it was ready.
    #[error("vCPU {vcpu_id}: the new vCPU thread did not start within {timeout:?}; the machine may be overloaded")]
    StartupTimeout {
        /// The vCPU id.
        vcpu_id: u32,
        /// How long spawn waited.
        timeout: Duration,
    },
    /// The vCPU thread has ended (or ended its mailbox) and cannot take messages.
    #[error("vCPU {vcpu_id}: the vCPU thread is gone (state {state}); spawn a new actor")]
    ThreadGone {
        /// The vCPU id.
        vcpu_id: u32,
        /// The last state the thread published.
        state: VcpuState,
    },
    /// No reply arrived within the timeout.
    #[error("vCPU {vcpu_id}: no reply to request {request_id} within {timeout:?} (state {state}); the vCPU thread may be stuck in a device handler")]
    ReplyTimeout {
        /// The vCPU id.
        vcpu_id: u32,
        /// The request waited for.
        request_id: RequestId,
        /// How long we waited.
        timeout: Duration,
        /// The state when the wait gave up.
        state: VcpuState,
    },
    /// The reply to a request was discarded before anyone waited for it: more than `limit`
    /// replies were left unclaimed.
    #[error("vCPU {vcpu_id}: the reply to request {request_id} was discarded unclaimed: more than {limit} replies were waiting to be taken; take the reply of every request sent (wait_reply), or use request()")]
    ReplyDiscarded {
        /// The vCPU id.
        vcpu_id: u32,
        /// The request waited for.
        request_id: RequestId,
        /// How many unclaimed replies a vCPU keeps.
        limit: usize,
    },
    /// A reply is waited for that this handle never issued (or was already taken).
    #[error("vCPU {vcpu_id}: request {request_id} is unknown or its reply was already taken")]
    UnknownRequest {
        /// The vCPU id.
        vcpu_id: u32,
        /// The request id.
        request_id: RequestId,
    },
    /// The thread did not end within the join timeout.
    #[error("vCPU {vcpu_id}: thread did not end within {timeout:?} (state {state}); it may be stuck in a device handler")]
    JoinTimeout {
        /// The vCPU id.
        vcpu_id: u32,
        /// How long we waited.
        timeout: Duration,
        /// The state when the wait gave up.
        state: VcpuState,
    },
    /// The vCPU thread panicked (a bug in an exit handler or in this crate).
    #[error("vCPU {vcpu_id}: the vCPU thread panicked: {message}")]
    ThreadPanicked {
        /// The vCPU id.
        vcpu_id: u32,
        /// The panic payload, if it was a string.
        message: String,
    },
}
