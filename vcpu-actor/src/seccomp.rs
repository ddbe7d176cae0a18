//! The optional seccomp filter a vCPU thread installs on itself before its first `KVM_RUN`.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What happens when a vCPU thread makes a system call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationAction {
    /// The call fails with this errno (e.g. `libc::EPERM`); the vCPU keeps working. The
    /// gentlest choice: a device handler sees an ordinary error.
    Errno(i32),
    /// The kernel sends `SIGSYS` to the thread; without a `SIGSYS` handler that ends the
    /// whole process (with a core dump), which shows the offending call.
    Trap,
    /// The vCPU thread is killed at once (no destructors run; `join` then times out).
    KillThread,
    /// The whole process is killed at once.
    KillProcess,
}

impl ViolationAction {
    fn to_seccompiler(self) -> SeccompAction {
        match self {
            // Errno values are small positive numbers; anything else is clamped to EPERM.
            ViolationAction::Errno(e) => {
                SeccompAction::Errno(u32::try_from(e).unwrap_or(libc::EPERM as u32))
            }
            ViolationAction::Trap => SeccompAction::Trap,
            ViolationAction::KillThread => SeccompAction::KillThread,
            ViolationAction::KillProcess => SeccompAction::KillProcess,
        }
    }
}

/// Whether and how a vCPU thread confines itself with seccomp.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum SeccompMode {
    /// No filter (the default).
    #[default]
    Disabled,
    /// [`default_allowed_syscalls`] plus `extra_syscalls`; anything else gets `action`.
    Enforce {
        /// What a syscall outside the list gets.
        action: ViolationAction,
        /// More syscall numbers (`libc::SYS_*`) the exit handler needs.
        extra_syscalls: Vec<i64>,
    },
    /// [`default_allowed_syscalls`] plus `extra_syscalls`; anything else is allowed but logged
    /// by the kernel (audit log, `SECCOMP_RET_LOG`). Use it to find out what a handler needs.
    Log {
        /// More syscall numbers (`libc::SYS_*`) that need no log line.
        extra_syscalls: Vec<i64>,
    },
    /// A filter built by the caller, installed as is.
    Custom(BpfProgram),
}

impl SeccompMode {
    /// The default list; violations fail with `EPERM` and the vCPU keeps working.
    pub fn errno_eperm() -> Self {
        SeccompMode::Enforce {
            action: ViolationAction::Errno(libc::EPERM),
            extra_syscalls: Vec::new(),
        }
    }

    /// The default list; a violation kills the process.
    pub fn kill() -> Self {
        SeccompMode::Enforce {
            action: ViolationAction::KillProcess,
            extra_syscalls: Vec::new(),
        }
    }

    /// The default list; a violation raises `SIGSYS`.
    pub fn trap() -> Self {
        SeccompMode::Enforce {
            action: ViolationAction::Trap,
            extra_syscalls: Vec::new(),
        }
    }

    /// The default list; violations are allowed and logged by the kernel.
    pub fn log() -> Self {
        SeccompMode::Log {
            extra_syscalls: Vec::new(),
        }
    }

    /// Compiles the filter, or `None` for [`SeccompMode::Disabled`].
    pub fn compile(&self) -> Result<Option<BpfProgram>, String> {
        let (mismatch, extra) = match self {
            SeccompMode::Disabled => return Ok(None),
            SeccompMode::Custom(prog) => return Ok(Some(prog.clone())),
            SeccompMode::Enforce {
                action,
                extra_syscalls,
            } => (action.to_seccompiler(), extra_syscalls),
            SeccompMode::Log { extra_syscalls } => (SeccompAction::Log, extra_syscalls),
        };
        let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
            default_allowed_syscalls()
                .iter()
                .chain(extra.iter())
                .map(|&nr| (nr, Vec::<SeccompRule>::new()))
                .collect();
        // `fcntl(fd, F_GETFD)` only: the standard library checks that an fd is open before it
        // closes it (debug builds), e.g. when the thread drops its exit EventFd.
        if let std::collections::btree_map::Entry::Vacant(slot) = rules.entry(libc::SYS_fcntl) {
            let getfd = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| e.to_string())?;
            slot.insert(vec![getfd]);
        }
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| e.to_string())?;
        BpfProgram::try_from(filter)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// The system calls a vCPU thread needs: `KVM_RUN` and the other vCPU ioctls, the mailbox
/// (futex), the kick signal (rt_sigreturn), memory allocation, clocks, logging (write), the
/// exit EventFd (write) and thread exit. `ioctl` is allowed on any fd and request. On top
/// of this list the filter allows `fcntl(fd, F_GETFD)` (and nothing else of `fcntl`).
pub fn default_allowed_syscalls() -> &'static [i64] {
    &[
        libc::SYS_ioctl,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_compiles_to_nothing() {
        assert_eq!(SeccompMode::Disabled.compile(), Ok(None));
    }

    #[test]
    fn default_modes_compile() {
        for m in [
            SeccompMode::errno_eperm(),
            SeccompMode::kill(),
            SeccompMode::trap(),
            SeccompMode::log(),
        ] {
            let prog = m.compile().unwrap().unwrap();
            assert!(prog.len() > default_allowed_syscalls().len());
        }
    }

    #[test]
    fn getpid_is_not_in_the_default_list() {
        assert!(!default_allowed_syscalls().contains(&libc::SYS_getpid));
        assert!(!default_allowed_syscalls().contains(&libc::SYS_socket));
    }
}
