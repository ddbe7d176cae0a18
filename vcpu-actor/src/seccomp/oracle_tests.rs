//! The filter this crate writes against seccompiler's compile of the same rules: both
//! programs are run by a classic-BPF interpreter over every x86_64 syscall number (and
//! numbers no syscall has, and another architecture) with the argument values the rules
//! name, and near misses of them; every decision must be the same.

#![allow(clippy::cast_possible_truncation)] // syscall numbers and fds in tests are small

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    sock_filter, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::bpf::AUDIT_ARCH_X86_64;
use super::*;

/// `struct seccomp_data`, as the filter sees it.
#[derive(Clone, Copy, Debug)]
struct Data {
    nr: u32,
    arch: u32,
    args: [u64; 6],
}

impl Data {
    fn word(&self, offset: u32) -> u32 {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&self.nr.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.arch.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let o = offset as usize;
        u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
    }
}

/// Runs a classic BPF program (the subset seccomp filters use) and returns its verdict;
/// panics on anything else, and on a jump out of the program.
fn run(prog: &[sock_filter], data: &Data) -> u32 {
    run_counted(prog, data).0
}

/// [`run`], and how many instructions ran.
fn run_counted(prog: &[sock_filter], data: &Data) -> (u32, usize) {
    let (verdict, steps) = run_until(prog, data, Args::Known);
    (verdict.expect("every argument is known"), steps)
}

/// What the interpreter does at a load of an argument.
#[derive(Clone, Copy, PartialEq)]
enum Args {
    /// Loads it from the data.
    Known,
    /// Stops there without a verdict, as the kernel's pass at installation does.
    Unknown,
}

/// Runs `prog` until its verdict (`Some`), or, with [`Args::Unknown`], until the first load
/// of an argument (`None`); and how many instructions ran.
fn run_until(prog: &[sock_filter], data: &Data, args: Args) -> (Option<u32>, usize) {
    let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let i = &prog[pc];
        pc += 1;
        steps += 1;
        match i.code {
            // ld w abs: an argument is at 16 and beyond in `struct seccomp_data`
            0x20 if i.k >= 16 && args == Args::Unknown => return (None, steps),
            0x20 => a = data.word(i.k),
            0x54 => a &= i.k,                  // alu and k
            0x06 => return (Some(i.k), steps), // ret k
            0x05 => pc += i.k as usize,        // ja
            0x15 | 0x25 | 0x35 | 0x45 => {
                let taken = match i.code {
                    0x15 => a == i.k,
                    0x25 => a > i.k,
                    0x35 => a >= i.k,
                    _ => a & i.k != 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            code => panic!("instruction {code:#x} at {} is not interpreted", pc - 1),
        }
    }
}

/// The same rules as [`thread_rules`], for seccompiler.
fn seccompiler_rules(
    vcpu_fd: RawFd,
    exit_evt_fd: RawFd,
    write_fds: &[RawFd],
) -> BTreeMap<i64, Vec<SeccompRule>> {
    let eq = |arg, value: u32| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value.into()).unwrap()
    };
    let one = |arg, value| SeccompRule::new(vec![eq(arg, value)]).unwrap();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = unrestricted_syscalls()
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let fd = |fd: RawFd| fd as u32;
    let ioctls = vcpu_ioctls()
        .iter()
        .map(|&(_, r)| SeccompRule::new(vec![eq(0, fd(vcpu_fd)), eq(1, r)]).unwrap())
        .collect();
    rules.insert(libc::SYS_ioctl, ioctls);
    let mut writable = vec![exit_evt_fd];
    writable.extend(write_fds.iter().filter(|&&f| f != exit_evt_fd));
    let writes = writable.iter().map(|&f| one(0, fd(f))).collect();
    rules.insert(libc::SYS_write, writes);
    let closes = [exit_evt_fd, vcpu_fd]
        .iter()
        .map(|&f| one(0, fd(f)))
        .collect();
    rules.insert(libc::SYS_close, closes);
    rules.insert(libc::SYS_fcntl, vec![one(1, libc::F_GETFD as u32)]);
    let no_exec = || {
        let exec = u64::from(libc::PROT_EXEC as u32);
        let c = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0);
        SeccompRule::new(vec![c.unwrap()]).unwrap()
    };
    rules.insert(libc::SYS_mmap, vec![no_exec()]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()]);
    rules
}

fn seccompiler_program(mode: &SeccompMode, vcpu_fd: RawFd, exit_fd: RawFd) -> Vec<sock_filter> {
    let (action, extra, write_fds) = match mode {
        SeccompMode::Enforce {
            action,
            extra_syscalls,
            extra_write_fds,
        } => {
            let a = match action {
                ViolationAction::StopVm => SeccompAction::Trap,
                ViolationAction::Errno(e) => SeccompAction::Errno(*e as u32),
                ViolationAction::KillThread => SeccompAction::KillThread,
                ViolationAction::KillProcess => SeccompAction::KillProcess,
            };
            (a, extra_syscalls, extra_write_fds)
        }
        SeccompMode::Log {
            extra_syscalls,
            extra_write_fds,
        } => (SeccompAction::Log, extra_syscalls, extra_write_fds),
        _ => unreachable!(),
    };
    let mut rules = seccompiler_rules(vcpu_fd, exit_fd, write_fds);
    for &nr in extra {
        rules.insert(nr, Vec::new());
    }
    let filter =
        SeccompFilter::new(rules, action, SeccompAction::Allow, TargetArch::x86_64).unwrap();
    filter.try_into().unwrap()
}

/// The argument values worth trying: those the rules name, their neighbours, values whose
/// high 32 bits are set, and flags with and without `PROT_EXEC`.
fn interesting_args(vcpu_fd: RawFd, exit_fd: RawFd, write_fds: &[RawFd]) -> Vec<u64> {
    let mut v: Vec<u64> = vec![0, 1, 2, u64::MAX, 1 << 32];
    for fd in [vcpu_fd, exit_fd].iter().chain(write_fds) {
        let fd = u64::from(*fd as u32);
        v.extend([fd, fd + 1, fd.wrapping_sub(1), fd | (7 << 32)]);
    }
    for &(_, r) in vcpu_ioctls() {
        let r = u64::from(r);
        v.extend([r, r + 1, r | (1 << 32)]);
    }
    let exec = libc::PROT_EXEC as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    v.extend([
        rw,
        exec,
        rw | exec,
        libc::F_GETFD as u64,
        libc::F_SETFD as u64,
    ]);
    v.sort_unstable();
    v.dedup();
    v
}

fn assert_same_decisions(mode: &SeccompMode, vcpu_fd: RawFd, exit_fd: RawFd) {
    let ours = mode.compile(vcpu_fd, exit_fd).unwrap().unwrap();
    assert!(ours.len() > vcpu_ioctls().len(), "{mode:?}");
    let theirs = seccompiler_program(mode, vcpu_fd, exit_fd);
    let write_fds = match mode {
        SeccompMode::Enforce {
            extra_write_fds, ..
        }
        | SeccompMode::Log {
            extra_write_fds, ..
        } => extra_write_fds.clone(),
        _ => Vec::new(),
    };
    let args = interesting_args(vcpu_fd, exit_fd, &write_fds);
    let conditional = [
        libc::SYS_ioctl,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_mmap,
        libc::SYS_mprotect,
    ];
    let mut nrs: Vec<u32> = (0..=470).collect();
    nrs.extend([1000, 0x4000_0000, 0x4000_0010, u32::MAX]);
    // Every pair of the first two arguments with a few third ones, and every third one
    // with a few pairs: the rules look at one or two of the first three arguments.
    let few = [args[0], args[args.len() / 2], args[args.len() - 1]];
    let mut full: Vec<[u64; 3]> = Vec::new();
    for &a0 in &args {
        for &a1 in &args {
            full.extend(few.iter().map(|&a2| [a0, a1, a2]));
        }
    }
    for &a2 in &args {
        full.extend(few.iter().map(|&a| [a, a, a2]));
    }
    let sparse: Vec<[u64; 3]> = few.iter().map(|&a| [a, a, a]).collect();
    let mut nrs: Vec<u32> = (0..=470).collect();
    nrs.extend([1000, 0x4000_0000, 0x4000_0010, u32::MAX]);
    let mut checked = 0u64;
    for arch in [AUDIT_ARCH_X86_64, 0x4000_0003 /* i386 */] {
        for &nr in &nrs {
            let is_conditional = conditional.iter().any(|&c| c as u32 == nr);
            let tried = if is_conditional && arch == AUDIT_ARCH_X86_64 {
                &full
            } else {
                &sparse
            };
            for a in tried {
                let mut data = Data {
                    nr,
                    arch,
                    args: [0; 6],
                };
                data.args[..3].copy_from_slice(a);
                let (o, t) = (run(&ours, &data), run(&theirs, &data));
                assert_eq!(o, t, "{mode:?}: {data:x?}: ours {o:#x}, seccompiler {t:#x}");
                checked += 1;
            }
        }
    }
    assert!(checked > 50_000, "{checked}");
}

#[test]
fn every_mode_decides_as_seccompiler_does() {
    for mode in [
        SeccompMode::default(),
        SeccompMode::errno_eperm(),
        SeccompMode::kill(),
        SeccompMode::enforce(ViolationAction::KillThread),
        SeccompMode::log(),
        SeccompMode::default().with_write_fds([1, 2]),
        SeccompMode::Enforce {
            action: ViolationAction::Errno(libc::EACCES),
            extra_syscalls: vec![libc::SYS_getpid, libc::SYS_read, libc::SYS_futex],
            extra_write_fds: vec![1, 9],
        },
    ] {
        assert_same_decisions(&mode, 37, 5);
    }
}

#[test]
fn the_filter_is_short_and_kvm_run_is_near_its_start() {
    let prog = SeccompMode::default().compile(40, 4).unwrap().unwrap();
    let theirs = seccompiler_program(&SeccompMode::default(), 40, 4);
    assert!(
        prog.len() * 3 < theirs.len(),
        "{} vs {} instructions",
        prog.len(),
        theirs.len()
    );
    let kvm_run = Data {
        nr: libc::SYS_ioctl as u32,
        arch: AUDIT_ARCH_X86_64,
        args: [40, 0xae80, 0, 0, 0, 0],
    };
    let (verdict, steps) = run_counted(&prog, &kvm_run);
    assert_eq!(verdict, libc::SECCOMP_RET_ALLOW);
    // Architecture (3), number search (log2 of 20 listed calls, + 1), fd (2), request (2).
    assert!(steps <= 14, "{steps} instructions for KVM_RUN");
    // Any number takes the same few steps, listed or not.
    for nr in [0, libc::SYS_futex as u32, 300, 460] {
        let data = Data { nr, ..kvm_run };
        assert!(run_counted(&prog, &data).1 <= 12, "nr {nr}");
    }
}

#[test]
fn too_many_extras_are_refused_with_a_reason() {
    let mode = SeccompMode::Enforce {
        action: ViolationAction::StopVm,
        extra_syscalls: Vec::new(),
        extra_write_fds: (100..400).collect(),
    };
    let err = mode.compile(5, 6).unwrap_err();
    assert!(err.contains("at most 255"), "{err}");
    let bad = SeccompMode::Enforce {
        action: ViolationAction::StopVm,
        extra_syscalls: vec![-5],
        extra_write_fds: Vec::new(),
    };
    assert!(bad.compile(5, 6).unwrap_err().contains("-5"));
}

/// The instructions the kernel runs when it installs the filter, per architecture (x86_64,
/// i386): for every syscall number below 512 it runs the filter until a `ret` or the first
/// load of an argument, to learn which numbers are always allowed (`seccomp_cache_prepare`,
/// holding the process's signal lock). A few nanoseconds per instruction, per thread that
/// installs the filter.
fn cache_prepare_steps(prog: &[sock_filter]) -> [usize; 2] {
    [AUDIT_ARCH_X86_64, 0x4000_0003].map(|arch| {
        (0..512)
            .map(|nr| {
                let data = Data {
                    nr,
                    arch,
                    args: [0; 6],
                };
                run_until(prog, &data, Args::Unknown).1
            })
            .sum()
    })
}

/// The number search is shaped for that pass: wide ranges of unlisted numbers leave it in a
/// jump or two (a search balanced over the listed numbers alone ran 9.8 instructions per
/// x86_64 number, 6531 in all), and another architecture is refused after three.
#[test]
fn installing_the_filter_runs_few_instructions() {
    let prog = SeccompMode::default().compile(40, 4).unwrap().unwrap();
    let [x86_64, i386] = cache_prepare_steps(&prog);
    assert_eq!(i386, 3 * 512);
    assert!(x86_64 <= 8 * 512, "{x86_64} instructions for 512 numbers");
}
