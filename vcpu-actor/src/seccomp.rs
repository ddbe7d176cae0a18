//! The seccomp filter every vCPU thread installs on itself before its first `KVM_RUN` (on by
//! default), and what happens when the thread breaks it.
//!
//! # What a vCPU thread calls
//!
//! Measured with `strace -ff` on `vcpuctl demo` (debug build, 2 boot vCPUs grown to 12 and
//! shrunk to 3, pause/resume, guest shutdown; every thread named `vcpu{id}`), from the moment
//! the filter is installed (after the thread's start-up: name, malloc arena, alternate signal
//! stack, `gettid`, blocking the kick signal and `KVM_SET_SIGNAL_MASK`) to the thread's end:
//!
//! | syscall | arguments seen | who |
//! |---|---|---|
//! | `ioctl` | own vCPU fd: `KVM_RUN`, `KVM_KVMCLOCK_CTRL` (on pause), `KVM_GET_REGS` (exit reason) | the run loop |
//! | `futex` | wake/wait | mailbox, reply condvar, the device handlers' locks |
//! | `sched_yield` | | a crossbeam channel's back-off (an `slog-async` logger's, when the thread logs) |
//! | `rt_sigtimedwait` | the kick signal, zero timeout | taking a kick off the queue after `KVM_RUN` returns `EINTR` |
//! | `rt_sigreturn` | | end of a signal handler (`SIGSYS` after a violation) |
//! | `write` | the exit EventFd only | `waiting_exit` |
//! | `fcntl` | `F_GETFD` only | std's check before `close` (debug builds) |
//! | `close` | the exit EventFd | thread end |
//! | `sigaltstack`, `munmap` | std's alternate signal stack | thread end (until vCPU threads were started without `std::thread`, see the spawn docs; still allowed) |
//! | `rt_sigprocmask` | `SIG_BLOCK` | thread end (glibc) |
//! | `madvise` | `MADV_DONTNEED` on the stack | thread end (glibc) |
//! | `exit` | | thread end |
//!
//! No `read`, `open`, `clock_gettime` (the vDSO answers), `mmap` or `brk` after start-up in
//! that run. Before the filter (not filtered): `prctl(PR_SET_NAME)`, `mmap`/`munmap`/`mprotect`
//! of the malloc arena, `openat`+`read` of
//! `/sys/devices/system/cpu/online` (glibc's arena limit), `sched_getaffinity`, `gettid`,
//! `rt_sigprocmask`, `KVM_SET_SIGNAL_MASK`, the setup's ioctls. `vcpuctl boot` adds `write`
//! to the console's fd from the 16550 serial device, which runs on the vCPU thread (see
//! *Extra write fds* below).
//!
//! # The filter ([`SeccompMode::default`])
//!
//! Written by this module's own classic-BPF writer (`bpf`) once per mode and exit EventFd;
//! each thread gets a copy with its own vCPU fd in the two places that name it (see
//! [`SeccompMode::compile`]). The program: the architecture check, a search tree on the
//! syscall number (a handful of instructions for any number, where a rule compiler's chain
//! grows with the list), then one block per syscall with arguments, the `ioctl` block
//! checking the fd once and `KVM_RUN` first. 83 instructions where seccompiler makes 315 of
//! the same rules (a unit test runs both over every syscall number and the interesting
//! arguments and checks that they decide alike). Short matters twice per vCPU thread: the
//! kernel installing it (it converts the program, JIT-compiles it and, holding the process's
//! signal lock, runs it for every syscall number to fill its cache) and every
//! `KVM_RUN`. The rules:
//! - `ioctl(vcpu_fd, request)` where `vcpu_fd` is this actor's vCPU fd and `request` is one of
//!   [`vcpu_ioctls`]: `KVM_RUN`, `KVM_KVMCLOCK_CTRL` and the `KVM_GET_*`/`KVM_SET_*` of vCPU
//!   state that save/restore needs. `ioctl` on any other fd (the VM fd, `/dev/kvm`, a
//!   terminal) or with any other request is a violation.
//! - `write(fd)` only for the actor's exit EventFd and the
//!   [extra write fds](SeccompMode::with_write_fds); `close(fd)` only for the exit EventFd
//!   and the vCPU fd (dropped on the thread when nobody `join`s it); `fcntl(_, F_GETFD)`
//!   only.
//! - `mmap` and `mprotect` only without `PROT_EXEC`; `munmap`, `madvise`, `mremap`, `brk`
//!   (the allocator's needs when a device handler allocates).
//! - `futex`, `sched_yield`, `rt_sigtimedwait`, `rt_sigreturn`, `rt_sigprocmask`, `sigaltstack`,
//!   `restart_syscall`, `clock_gettime` (where the vDSO falls back to the kernel),
//!   `getrandom` (std's `HashMap` keys, on a thread's first `HashMap`), `exit`.
//!
//! Everything else is a violation, including `open`/`openat`, `socket`, `clone`, `execve`,
//! `exit_group`, `kill`/`tgkill`, `mmap` with `PROT_EXEC` and `write` to stdout/stderr.
//!
//! # A violation ([`ViolationAction::StopVm`], the default)
//!
//! The filter answers a violation with `SECCOMP_RET_TRAP`: the kernel skips the call and
//! sends `SIGSYS` to the thread. This module's `SIGSYS` handler (installed once per process,
//! only over the default disposition) records the call's number (`siginfo.si_syscall`) for
//! the thread and makes the call return `-EPERM`. After the current exit has been handled,
//! the run loop sees the record and the actor goes to `waiting_exit` with
//! [`VcpuExitReason::SeccompViolation`](crate::VcpuExitReason::SeccompViolation) (syscall
//! number and name), writing the exit EventFd: the VMM's exit path stops the VM with that
//! reason. The process and the other vCPUs are unharmed. A violation while the vCPU is
//! paused is reported when it is next resumed, before it enters the guest.
//! [`ViolationAction::KillThread`] and [`ViolationAction::KillProcess`] are the harsher
//! choices, [`ViolationAction::Errno`] the gentler one; [`SeccompMode::Disabled`] turns the
//! filter off for debugging.
//!
//! # Extra write fds, logging and panics
//!
//! Device handlers run on the vCPU thread under this filter. A device that writes to a file
//! descriptor (a serial console on stdout) must have that fd allowed with
//! [`SeccompMode::with_write_fds`] (`vcpuctl boot` allows fd 1 for its console), or hand
//! the bytes to another thread (the console writers of the tests write into memory). The
//! same holds for the [`Logger`](slog::Logger) given to the actor: use a drain that does its
//! I/O on another thread (`slog-async`, as `vcpuctl -v` does) or allow its fd. A panic on a
//! vCPU thread cannot print its message to stderr (fd 2 is not allowed); the thread still
//! ends and signals the exit EventFd.

mod bpf;
mod names;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError};

use libc::{c_int, c_void, siginfo_t};
use seccompiler::BpfProgram;

use bpf::{ArgCheck, Rules};

/// What happens when a vCPU thread makes a system call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViolationAction {
    /// The call fails with `EPERM`, and the vCPU stops with
    /// [`VcpuExitReason::SeccompViolation`](crate::VcpuExitReason::SeccompViolation) once the
    /// current exit is handled: the VMM stops the VM with a reason naming the call. Uses
    /// `SECCOMP_RET_TRAP` and this crate's `SIGSYS` handler (installed over the default
    /// disposition only; a spawn fails with [`VcpuError::SeccompBuild`](crate::VcpuError)
    /// if `SIGSYS` has another handler). The default.
    #[default]
    StopVm,
    /// The call fails with this errno (e.g. `libc::EPERM`); the vCPU keeps working. The
    /// gentlest choice: a device handler sees an ordinary error.
    Errno(i32),
    /// The vCPU thread is killed at once (no destructors run; `join` then times out).
    KillThread,
    /// The whole process is killed at once.
    KillProcess,
}

impl ViolationAction {
    /// The filter's return value for a violation (`SECCOMP_RET_*`).
    fn ret_value(self) -> u32 {
        match self {
            ViolationAction::StopVm => libc::SECCOMP_RET_TRAP,
            // Errno values are small positive numbers; anything else is clamped to EPERM.
            ViolationAction::Errno(e) => {
                let errno = u32::try_from(e)
                    .ok()
                    .filter(|&e| e <= libc::SECCOMP_RET_DATA)
                    .unwrap_or(libc::EPERM.unsigned_abs());
                libc::SECCOMP_RET_ERRNO | errno
            }
            ViolationAction::KillThread => libc::SECCOMP_RET_KILL_THREAD,
            ViolationAction::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// Whether and how a vCPU thread confines itself with seccomp. The default is
/// [`Enforce`](SeccompMode::Enforce) with [`ViolationAction::StopVm`], no extra syscalls and
/// no extra write fds (see the module documentation for the list).
#[derive(Debug, Clone, PartialEq)]
pub enum SeccompMode {
    /// No filter: for debugging only.
    Disabled,
    /// The vCPU thread's allow-list (see the module documentation) plus `extra_syscalls`
    /// (allowed with any arguments) and `extra_write_fds`; anything else gets `action`.
    Enforce {
        /// What a syscall outside the list gets.
        action: ViolationAction,
        /// More syscall numbers (`libc::SYS_*`) the exit handler needs, allowed with any
        /// arguments.
        extra_syscalls: Vec<i64>,
        /// More file descriptors `write` may use (e.g. a serial console's stdout).
        extra_write_fds: Vec<RawFd>,
    },
    /// The same list; anything else is allowed but logged by the kernel (audit log,
    /// `SECCOMP_RET_LOG`). Use it to find out what a handler needs.
    Log {
        /// More syscall numbers (`libc::SYS_*`) that need no log line.
        extra_syscalls: Vec<i64>,
        /// More file descriptors `write` may use without a log line.
        extra_write_fds: Vec<RawFd>,
    },
    /// A filter built by the caller, installed as is (no per-thread fds in it).
    Custom(BpfProgram),
}

impl Default for SeccompMode {
    fn default() -> Self {
        Self::enforce(ViolationAction::StopVm)
    }
}

impl SeccompMode {
    /// The default list with `action` for violations.
    pub fn enforce(action: ViolationAction) -> Self {
        SeccompMode::Enforce {
            action,
            extra_syscalls: Vec::new(),
            extra_write_fds: Vec::new(),
        }
    }

    /// The default list; a violation stops the VM (the default mode).
    pub fn stop_vm() -> Self {
        Self::enforce(ViolationAction::StopVm)
    }

    /// The default list; violations fail with `EPERM` and the vCPU keeps working.
    pub fn errno_eperm() -> Self {
        Self::enforce(ViolationAction::Errno(libc::EPERM))
    }

    /// The default list; a violation kills the process.
    pub fn kill() -> Self {
        Self::enforce(ViolationAction::KillProcess)
    }

    /// The default list; violations are allowed and logged by the kernel.
    pub fn log() -> Self {
        SeccompMode::Log {
            extra_syscalls: Vec::new(),
            extra_write_fds: Vec::new(),
        }
    }

    /// The same mode, with `write` also allowed on `fds` (for a device that writes there
    /// from the vCPU thread, e.g. a serial console on stdout: `[libc::STDOUT_FILENO]`). No
    /// effect on [`Disabled`](Self::Disabled) and [`Custom`](Self::Custom).
    #[must_use]
    pub fn with_write_fds(mut self, fds: impl IntoIterator<Item = RawFd>) -> Self {
        match &mut self {
            SeccompMode::Enforce {
                extra_write_fds, ..
            }
            | SeccompMode::Log {
                extra_write_fds, ..
            } => extra_write_fds.extend(fds),
            SeccompMode::Disabled | SeccompMode::Custom(_) => {}
        }
        self
    }

    /// Whether a violation is reported through this crate's `SIGSYS` handler.
    pub(crate) fn traps(&self) -> bool {
        matches!(
            self,
            SeccompMode::Enforce {
                action: ViolationAction::StopVm,
                ..
            }
        )
    }

    /// Compiles the filter of the vCPU thread whose vCPU fd is `vcpu_fd` and whose exit
    /// EventFd is `exit_evt_fd`, or `None` for [`SeccompMode::Disabled`]. The program is
    /// written directly (a search tree on the syscall number, see the module documentation),
    /// once per mode and exit EventFd: the last one written is kept with the places that
    /// hold the vCPU fd, and a thread of the same mode gets a copy with its own fd there
    /// (a copy instead of a build per vCPU thread).
    ///
    /// # Errors
    ///
    /// Why the rules cannot be written as a filter (an extra syscall number that is not
    /// one, or so many extra syscalls and fds that a jump would exceed classic BPF's reach).
    pub fn compile(
        &self,
        vcpu_fd: RawFd,
        exit_evt_fd: RawFd,
    ) -> Result<Option<BpfProgram>, String> {
        let Some(rules) = self.rules() else {
            return Ok(match self {
                SeccompMode::Custom(prog) => Some(prog.clone()),
                _ => None,
            });
        };
        let mut last = LAST_FILTER.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(template) = last.as_ref().filter(|t| t.fits(self, exit_evt_fd)) {
            return Ok(Some(template.with_vcpu_fd(vcpu_fd)));
        }
        let program = rules.build(vcpu_fd, exit_evt_fd)?;
        // A second build with another vCPU fd shows where the fd sits.
        let other = rules.build(vcpu_fd ^ 1, exit_evt_fd)?;
        *last = FilterTemplate::new(self, exit_evt_fd, &program, &other);
        Ok(Some(sized_past_thread_caches(program)))
    }

    /// What an `Enforce` or `Log` mode asks of the filter; `None` for the others.
    fn rules(&self) -> Option<ModeRules<'_>> {
        match self {
            SeccompMode::Enforce {
                action,
                extra_syscalls,
                extra_write_fds,
            } => Some(ModeRules {
                violation: action.ret_value(),
                extra_syscalls,
                extra_write_fds,
            }),
            SeccompMode::Log {
                extra_syscalls,
                extra_write_fds,
            } => Some(ModeRules {
                violation: libc::SECCOMP_RET_LOG,
                extra_syscalls,
                extra_write_fds,
            }),
            SeccompMode::Disabled | SeccompMode::Custom(_) => None,
        }
    }
}

/// The parts of an `Enforce` or `Log` [`SeccompMode`] that shape its filter.
struct ModeRules<'a> {
    /// What a syscall outside the list gets (`SECCOMP_RET_*`).
    violation: u32,
    extra_syscalls: &'a [i64],
    extra_write_fds: &'a [RawFd],
}

impl ModeRules<'_> {
    /// The filter of the thread whose vCPU fd is `vcpu_fd` and exit EventFd `exit_evt_fd`.
    fn build(&self, vcpu_fd: RawFd, exit_evt_fd: RawFd) -> Result<BpfProgram, String> {
        let mut rules = thread_rules(vcpu_fd, exit_evt_fd, self.extra_write_fds)?;
        for &nr in self.extra_syscalls {
            // No checks: any arguments.
            rules.allow(nr, Vec::new())?;
        }
        rules.compile(self.violation)
    }
}

/// The filter [`SeccompMode::compile`] wrote last, kept for the next vCPU thread.
static LAST_FILTER: Mutex<Option<FilterTemplate>> = Mutex::new(None);

/// A vCPU thread's filter with the vCPU fd left to fill in: the instructions that compare
/// an argument with it (the fd check of `ioctl` and `close`).
struct FilterTemplate {
    mode: SeccompMode,
    exit_evt_fd: RawFd,
    program: BpfProgram,
    vcpu_fd_at: Vec<usize>,
}

impl FilterTemplate {
    /// The template behind `program`, given `other`, the same rules written for another vCPU
    /// fd: they must differ only in the `k` of some instructions, which become the fd's
    /// places. `None` if they differ otherwise (the writer's layout would then depend on the
    /// fd's value, and every thread gets a build of its own).
    fn new(
        mode: &SeccompMode,
        exit_evt_fd: RawFd,
        program: &BpfProgram,
        other: &BpfProgram,
    ) -> Option<Self> {
        if program.len() != other.len() {
            return None;
        }
        let mut vcpu_fd_at = Vec::new();
        for (at, (a, b)) in program.iter().zip(other).enumerate() {
            if (a.code, a.jt, a.jf) != (b.code, b.jt, b.jf) {
                return None;
            }
            if a.k != b.k {
                vcpu_fd_at.push(at);
            }
        }
        Some(FilterTemplate {
            mode: mode.clone(),
            exit_evt_fd,
            program: program.clone(),
            vcpu_fd_at,
        })
    }

    /// Whether this is the filter of `mode` with the exit EventFd `exit_evt_fd`.
    fn fits(&self, mode: &SeccompMode, exit_evt_fd: RawFd) -> bool {
        self.exit_evt_fd == exit_evt_fd && self.mode == *mode
    }

    /// The filter of the thread whose vCPU fd is `vcpu_fd`, in a buffer sized as
    /// [`sized_past_thread_caches`] says.
    fn with_vcpu_fd(&self, vcpu_fd: RawFd) -> BpfProgram {
        let mut program = Vec::with_capacity(self.program.len().max(PAST_THREAD_CACHE));
        program.extend_from_slice(&self.program);
        for &at in &self.vcpu_fd_at {
            program[at].k = fd_arg(vcpu_fd);
        }
        program
    }
}

/// The smallest capacity, in instructions, of a program buffer that glibc's allocator does
/// not keep in a per-thread cache when it is freed: its tcache holds chunks of up to 1032
/// usable bytes (plus an 8-byte header) for the thread that frees them, for that thread's
/// whole life.
const PAST_THREAD_CACHE: usize = 1040 / std::mem::size_of::<seccompiler::sock_filter>() + 1;

/// `prog` with room for at least [`PAST_THREAD_CACHE`] instructions. The spawner builds the
/// program and the vCPU thread frees it once installed; in a buffer below that size (the
/// default program has 83 instructions in a 128-instruction buffer) it would stay in the
/// vCPU thread's cache, 1 KiB of every vCPU's resident memory for nothing. Past it, the
/// free returns it to the spawner's arena, where the next vCPU's program reuses it.
fn sized_past_thread_caches(mut prog: BpfProgram) -> BpfProgram {
    prog.reserve_exact(PAST_THREAD_CACHE.saturating_sub(prog.len()));
    prog
}

/// A file descriptor as the kernel's `int` argument: its 32 bits.
fn fd_arg(fd: RawFd) -> u32 {
    fd as u32
}

/// `arg` is one of `values`.
fn one_of(arg: u8, values: impl IntoIterator<Item = u32>) -> ArgCheck {
    ArgCheck::OneOf {
        arg,
        values: values.into_iter().collect(),
    }
}

/// The rules of one vCPU thread (see the module documentation).
fn thread_rules(vcpu_fd: RawFd, exit_evt_fd: RawFd, write_fds: &[RawFd]) -> Result<Rules, String> {
    let mut rules = Rules::default();
    for &nr in unrestricted_syscalls() {
        rules.allow(nr, Vec::new())?;
    }
    // The fd once, then the requests (KVM_RUN first: the hot path).
    let requests = vcpu_ioctls().iter().map(|&(_, request)| request);
    rules.allow(
        libc::SYS_ioctl,
        vec![one_of(0, [fd_arg(vcpu_fd)]), one_of(1, requests)],
    )?;
    let mut writable = vec![exit_evt_fd];
    writable.extend(write_fds.iter().filter(|&&fd| fd != exit_evt_fd));
    rules.allow(
        libc::SYS_write,
        vec![one_of(0, writable.into_iter().map(fd_arg))],
    )?;
    // The exit EventFd at the thread's end; the vCPU fd if nobody takes it back (`join`).
    rules.allow(
        libc::SYS_close,
        vec![one_of(0, [fd_arg(exit_evt_fd), fd_arg(vcpu_fd)])],
    )?;
    // std checks that an fd is open before it closes it (debug builds).
    rules.allow(
        libc::SYS_fcntl,
        vec![one_of(1, [libc::F_GETFD.unsigned_abs()])],
    )?;
    let no_exec = || ArgCheck::NoneOf {
        arg: 2,
        mask: libc::PROT_EXEC.unsigned_abs(),
    };
    rules.allow(libc::SYS_mmap, vec![no_exec()])?;
    rules.allow(libc::SYS_mprotect, vec![no_exec()])?;
    Ok(rules)
}

/// The system calls a vCPU thread may make with any arguments: the mailbox and locks
/// (`futex`, `sched_yield`), signal handlers' return, the allocator (without new executable
/// memory: `mmap` and `mprotect` are filtered separately), clocks, std's `HashMap` keys and
/// thread exit. The filter also allows `ioctl`, `write`, `close`, `fcntl`, `mmap` and
/// `mprotect` with restricted arguments (see the module documentation).
pub fn unrestricted_syscalls() -> &'static [i64] {
    &[
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        // Taking the queued kick signal off after KVM_RUN returns EINTR (zero timeout).
        libc::SYS_rt_sigtimedwait,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_getrandom,
        // Harmless and read-only: a VMM state saver or logger may name its thread.
        libc::SYS_gettid,
        libc::SYS_exit,
    ]
}

const KVMIO: u32 = 0xAE;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, KVMIO, nr, size)` (include/uapi/asm-generic/ioctl.h); `size` has 14 bits.
const fn kvm_ioc(dir: u32, nr: u32, size: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // vCPU state structs are far below 16 KiB
    let size = size as u32;
    (dir << 30) | (size << 16) | (KVMIO << 8) | nr
}

const fn io(nr: u32) -> u32 {
    kvm_ioc(0, nr, 0)
}

const fn ior<T>(nr: u32) -> u32 {
    kvm_ioc(IOC_READ, nr, std::mem::size_of::<T>())
}

const fn iow<T>(nr: u32) -> u32 {
    kvm_ioc(IOC_WRITE, nr, std::mem::size_of::<T>())
}

const fn iowr<T>(nr: u32) -> u32 {
    kvm_ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}

/// The `ioctl` requests a vCPU thread may make, on its own vCPU fd only: what the actor does
/// today (`KVM_RUN`, `KVM_KVMCLOCK_CTRL`, `KVM_GET_REGS`) and the get/set of vCPU state that
/// saving and restoring a vCPU on its own thread needs. Numbers as in
/// include/uapi/linux/kvm.h (x86_64).
pub fn vcpu_ioctls() -> &'static [(&'static str, u32)] {
    use kvm_bindings::{
        kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs,
        kvm_nested_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    const LIST: &[(&str, u32)] = &[
        ("KVM_RUN", io(0x80)),
        ("KVM_GET_REGS", ior::<kvm_regs>(0x81)),
        ("KVM_SET_REGS", iow::<kvm_regs>(0x82)),
        ("KVM_GET_SREGS", ior::<kvm_sregs>(0x83)),
        ("KVM_SET_SREGS", iow::<kvm_sregs>(0x84)),
        ("KVM_GET_MSRS", iowr::<kvm_msrs>(0x88)),
        ("KVM_SET_MSRS", iow::<kvm_msrs>(0x89)),
        ("KVM_GET_FPU", ior::<kvm_fpu>(0x8c)),
        ("KVM_SET_FPU", iow::<kvm_fpu>(0x8d)),
        ("KVM_GET_LAPIC", ior::<kvm_lapic_state>(0x8e)),
        ("KVM_SET_LAPIC", iow::<kvm_lapic_state>(0x8f)),
        ("KVM_GET_CPUID2", iowr::<kvm_cpuid2>(0x91)),
        ("KVM_GET_MP_STATE", ior::<kvm_mp_state>(0x98)),
        ("KVM_SET_MP_STATE", iow::<kvm_mp_state>(0x99)),
        ("KVM_GET_VCPU_EVENTS", ior::<kvm_vcpu_events>(0x9f)),
        ("KVM_SET_VCPU_EVENTS", iow::<kvm_vcpu_events>(0xa0)),
        ("KVM_GET_DEBUGREGS", ior::<kvm_debugregs>(0xa1)),
        ("KVM_SET_DEBUGREGS", iow::<kvm_debugregs>(0xa2)),
        ("KVM_SET_TSC_KHZ", io(0xa2)),
        ("KVM_GET_TSC_KHZ", io(0xa3)),
        ("KVM_GET_XSAVE", ior::<kvm_xsave>(0xa4)),
        ("KVM_SET_XSAVE", iow::<kvm_xsave>(0xa5)),
        ("KVM_GET_XCRS", ior::<kvm_xcrs>(0xa6)),
        ("KVM_SET_XCRS", iow::<kvm_xcrs>(0xa7)),
        ("KVM_KVMCLOCK_CTRL", io(0xad)),
        ("KVM_GET_NESTED_STATE", iowr::<kvm_nested_state>(0xbe)),
        ("KVM_SET_NESTED_STATE", iow::<kvm_nested_state>(0xbf)),
        ("KVM_GET_XSAVE2", ior::<kvm_xsave>(0xcf)),
    ];
    LIST
}

/// The name of x86_64 system call `nr` (`"openat"` for 257), if it is a known one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::name(nr)
}

// ---------------------------------------------------------------------------------------
// The violation path: SIGSYS handler and the per-thread record.

/// No violation recorded.
const NO_VIOLATION: i64 = -1;

thread_local! {
    /// The first forbidden syscall number of this thread not yet reported. Const-initialized
    /// and without a destructor, so the signal handler may touch it.
    static VIOLATION: AtomicI64 = const { AtomicI64::new(NO_VIOLATION) };
}

/// `si_code` of a `SIGSYS` sent by seccomp.
const SYS_SECCOMP: c_int = 1;

/// The start of `siginfo_t` for `SIGSYS` on x86_64 (include/uapi/asm-generic/siginfo.h:
/// `_sigsys { void *_call_addr; int _syscall; unsigned int _arch; }` after the three ints
/// and the union's 8-byte alignment).
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

extern "C" fn sigsys_handler(_: c_int, info: *mut siginfo_t, ucontext: *mut c_void) {
    if info.is_null() || ucontext.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO); SigsysInfo describes its
    // first 32 bytes, which every siginfo_t (128 bytes) has.
    let sys = unsafe { &*info.cast::<SigsysInfo>() };
    if sys.code != SYS_SECCOMP {
        return;
    }
    let nr = i64::from(sys.syscall);
    let _ = VIOLATION.try_with(|v| {
        // Only the first one is kept until it is reported.
        let _ = v.compare_exchange(NO_VIOLATION, nr, Ordering::SeqCst, Ordering::SeqCst);
    });
    #[cfg(target_arch = "x86_64")]
    {
        let uc = ucontext.cast::<libc::ucontext_t>();
        let rax = usize::try_from(libc::REG_RAX).unwrap_or(0);
        // SAFETY: `ucontext` is the kernel's ucontext_t for this signal (SA_SIGINFO); the
        // register the interrupted syscall returns in becomes -EPERM: the call failed.
        unsafe {
            (*uc).uc_mcontext.gregs[rax] = -i64::from(libc::EPERM);
        }
    }
}

/// Serializes the check and installation of the `SIGSYS` handler.
static SIGSYS_LOCK: Mutex<()> = Mutex::new(());

fn sigsys_handler_address() -> libc::sighandler_t {
    sigsys_handler as *const () as libc::sighandler_t
}

/// Installs the `SIGSYS` handler that reports violations, unless it is installed already.
/// Refuses to replace a handler that is not this crate's (or `SIG_IGN`).
pub(crate) fn install_sigsys_handler() -> Result<(), String> {
    let _lock = SIGSYS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a query only; `old` is valid for writes of a `sigaction`.
    if unsafe { libc::sigaction(libc::SIGSYS, std::ptr::null(), old.as_mut_ptr()) } != 0 {
        return Err(format!(
            "cannot read the SIGSYS disposition: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: sigaction succeeded, and all-zero is a valid `sigaction` anyway.
    let current = unsafe { old.assume_init() }.sa_sigaction;
    if current == sigsys_handler_address() {
        return Ok(());
    }
    if current != libc::SIG_DFL {
        return Err(
            "SIGSYS already has a handler that is not vcpu-actor's, so seccomp \
                    violations cannot be reported; remove it, or choose another \
                    ViolationAction (Errno, KillThread or KillProcess) in SeccompMode"
                .to_string(),
        );
    }
    // SAFETY: all-zero is a valid `sigaction`; the fields set below make it a SA_SIGINFO
    // handler with an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = sigsys_handler_address();
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (it touches
    // a const-initialized thread-local atomic and the signal's own ucontext only).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "cannot install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Prepares the calling vCPU thread for its filter: `SIGSYS` must not be blocked (a blocked
/// `SIGSYS` from seccomp kills the process), and no violation is pending.
pub(crate) fn prepare_thread() {
    let _ = vmm_sys_util::signal::unblock_signal(libc::SIGSYS);
    VIOLATION.with(|v| v.store(NO_VIOLATION, Ordering::SeqCst));
}

/// The first violation of the calling thread not yet reported, if any (and forgets it).
pub(crate) fn take_violation() -> Option<i64> {
    let nr = VIOLATION.with(|v| v.swap(NO_VIOLATION, Ordering::SeqCst));
    (nr != NO_VIOLATION).then_some(nr)
}

#[cfg(test)]
mod oracle_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_compiles_to_nothing() {
        assert_eq!(SeccompMode::Disabled.compile(5, 6), Ok(None));
    }

    /// The copy a thread gets from the kept filter is the filter written for its own fds,
    /// whatever the order of modes, exit EventFds and vCPU fds (so a kept filter is never
    /// handed to a thread of another mode or exit EventFd, nor with another thread's fd).
    #[test]
    fn a_copied_filter_is_the_one_written_for_the_thread() {
        let modes = [
            SeccompMode::stop_vm(),
            SeccompMode::stop_vm().with_write_fds([1, 9]),
            SeccompMode::log(),
            SeccompMode::errno_eperm(),
            SeccompMode::Enforce {
                action: ViolationAction::KillThread,
                extra_syscalls: vec![libc::SYS_getpid],
                extra_write_fds: vec![],
            },
        ];
        let mut compiled = 0;
        for round in 0..3 {
            for mode in &modes {
                for exit_evt_fd in [6, 7] {
                    // The vCPU fd takes values below, next to and far from the others'.
                    for vcpu_fd in [3, 5, 6, 8, 1000, 70_000 + round] {
                        let want = mode.rules().unwrap().build(vcpu_fd, exit_evt_fd).unwrap();
                        let got = mode.compile(vcpu_fd, exit_evt_fd).unwrap().unwrap();
                        assert_eq!(got, want, "{mode:?} exit {exit_evt_fd} vcpu {vcpu_fd}");
                        assert!(got.capacity() >= PAST_THREAD_CACHE);
                        compiled += 1;
                    }
                }
            }
        }
        assert_eq!(compiled, 3 * 5 * 2 * 6);
    }

    #[test]
    fn the_fd_places_are_the_fd_checks_of_ioctl_and_close() {
        let program = SeccompMode::stop_vm()
            .rules()
            .unwrap()
            .build(40, 41)
            .unwrap();
        let other = SeccompMode::stop_vm()
            .rules()
            .unwrap()
            .build(50, 41)
            .unwrap();
        let t = FilterTemplate::new(&SeccompMode::stop_vm(), 41, &program, &other).unwrap();
        assert_eq!(t.vcpu_fd_at.len(), 2);
        assert!(t.vcpu_fd_at.iter().all(|&at| program[at].k == 40));
        // Rules whose layout differs are not a template.
        let longer = SeccompMode::stop_vm()
            .with_write_fds([3])
            .rules()
            .unwrap()
            .build(50, 41)
            .unwrap();
        assert!(FilterTemplate::new(&SeccompMode::stop_vm(), 41, &program, &longer).is_none());
    }

    #[test]
    fn the_default_is_enforced_and_stops_the_vm() {
        assert_eq!(SeccompMode::default(), SeccompMode::stop_vm());
        assert!(SeccompMode::default().traps());
        assert!(!SeccompMode::errno_eperm().traps());
    }

    #[test]
    fn write_fds_are_added_to_enforce_and_log_only() {
        let m = SeccompMode::log().with_write_fds([1]);
        assert!(
            matches!(m, SeccompMode::Log { ref extra_write_fds, .. } if extra_write_fds == &[1])
        );
        assert_eq!(
            SeccompMode::Disabled.with_write_fds([1]),
            SeccompMode::Disabled
        );
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        let find = |name: &str| {
            vcpu_ioctls()
                .iter()
                .find(|&&(n, _)| n == name)
                .map(|&(_, v)| v)
                .unwrap()
        };
        // From include/uapi/linux/kvm.h, as `strace -X raw` shows them.
        for (name, value) in [
            ("KVM_RUN", 0xae80),
            ("KVM_GET_REGS", 0x8090_ae81),
            ("KVM_SET_REGS", 0x4090_ae82),
            ("KVM_GET_SREGS", 0x8138_ae83),
            ("KVM_GET_MSRS", 0xc008_ae88),
            ("KVM_GET_LAPIC", 0x8400_ae8e),
            ("KVM_GET_MP_STATE", 0x8004_ae98),
            ("KVM_GET_VCPU_EVENTS", 0x8040_ae9f),
            ("KVM_GET_XSAVE", 0x9000_aea4),
            ("KVM_KVMCLOCK_CTRL", 0xaead),
            ("KVM_GET_NESTED_STATE", 0xc080_aebe),
            ("KVM_GET_XSAVE2", 0x9000_aecf),
        ] {
            assert_eq!(find(name), value, "{name}");
        }
        // Not for a vCPU thread: creating things, VM-wide state.
        let kvm_create_vcpu = 0xae41;
        let kvm_create_vm = 0xae01;
        let kvm_set_cpuid2 = 0x4008_ae90;
        for forbidden in [kvm_create_vcpu, kvm_create_vm, kvm_set_cpuid2] {
            assert!(vcpu_ioctls().iter().all(|&(_, v)| v != forbidden));
        }
    }

    #[test]
    fn syscall_names() {
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(libc::SYS_read), Some("read"));
        assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
        assert_eq!(syscall_name(libc::SYS__sysctl), Some("_sysctl"));
        assert_eq!(syscall_name(100_000), None);
        assert!(names::SYSCALLS.len() > 350);
    }

    #[test]
    fn what_is_not_in_the_list() {
        for nr in [
            libc::SYS_getpid,
            libc::SYS_socket,
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_exit_group,
            libc::SYS_read,
        ] {
            assert!(!unrestricted_syscalls().contains(&nr), "{nr}");
        }
    }

    #[test]
    fn a_violation_is_taken_once() {
        prepare_thread();
        assert_eq!(take_violation(), None);
        VIOLATION.with(|v| v.store(libc::SYS_openat, Ordering::SeqCst));
        assert_eq!(take_violation(), Some(libc::SYS_openat));
        assert_eq!(take_violation(), None);
    }
}
