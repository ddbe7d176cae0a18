//! The classic-BPF writer behind the vCPU thread's filter.
//!
//! Design rule: the filter's cost is paid per vCPU twice over (writing it only once per
//! mode: threads get a copy with their own fd) — in the kernel when it is installed (the
//! kernel converts and JIT-compiles it, then, holding the process's signal lock with
//! interrupts off, runs it once for every system call number to fill its per-filter "always
//! allowed" cache), and on every system call the thread makes, `KVM_RUN` above all. So the
//! program is as short and as shallow as the rules allow:
//!
//! 1. the architecture is checked (not x86_64: the process is killed, as seccompiler does);
//! 2. the syscall number is found by a **search tree** (`jge` splits, one `jeq` per leaf):
//!    a handful of instructions for any number, listed or not, instead of a chain as long as
//!    the list. The tree is shaped for the kernel's pass over every number at installation
//!    (`split`): the wide ranges without a listed number leave it after a jump or two;
//!    a listed number is at most a few levels deeper than in a tree balanced over the
//!    listed numbers alone;
//! 3. a listed number without conditions returns `ALLOW` from its leaf; one with conditions
//!    jumps to its block, which loads each argument once and compares it with every allowed
//!    value (`ioctl`: the fd once, then the requests, `KVM_RUN` first).
//!
//! Arguments are compared on their low 32 bits, as the kernel reads file descriptors (`int`),
//! `ioctl` requests (`unsigned int`) and `prot`/`cmd` flags (`int`).
//!
//! Every instruction jumps forward only (classic BPF has no backward jumps), by at most 255
//! instructions; a rule set that would need more is refused (it would need far more extra
//! syscalls and fds than a vCPU thread has).

use seccompiler::{sock_filter, BpfProgram};

use libc::{
    BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ALLOW,
    SECCOMP_RET_KILL_PROCESS,
};

/// `AUDIT_ARCH_X86_64` (include/uapi/linux/audit.h): `EM_X86_64 | 64BIT | LE`.
pub(crate) const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// The offsets of `nr`, `arch` and `args` in `struct seccomp_data`
/// (include/uapi/linux/seccomp.h).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// An instruction's opcode (the kernel's `__u16 code`) from bpf_common.h's fields.
fn opcode(fields: u32) -> u16 {
    // Every BPF_* field is below 0x100.
    u16::try_from(fields).unwrap_or(u16::MAX)
}

/// One condition on a system call's argument (its low 32 bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ArgCheck {
    /// Argument `arg` is one of `values` (tried in this order).
    OneOf {
        /// The argument, 0 to 5.
        arg: u8,
        /// The allowed values.
        values: Vec<u32>,
    },
    /// Argument `arg` has none of the bits of `mask`.
    NoneOf {
        /// The argument, 0 to 5.
        arg: u8,
        /// The forbidden bits.
        mask: u32,
    },
}

/// The rules of one filter: each listed system call is allowed when all its checks hold
/// (none: always); everything else gets the violation action.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rules {
    syscalls: Vec<(u32, Vec<ArgCheck>)>,
}

impl Rules {
    /// Allows `nr` when every one of `checks` holds; replaces an earlier rule for `nr`.
    pub(crate) fn allow(&mut self, nr: i64, checks: Vec<ArgCheck>) -> Result<(), String> {
        let nr = u32::try_from(nr).map_err(|_| format!("{nr} is not a system call number"))?;
        self.syscalls.retain(|(n, _)| *n != nr);
        self.syscalls.push((nr, checks));
        Ok(())
    }

    /// The program: what [`Rules`] allow returns `SECCOMP_RET_ALLOW`, anything else
    /// `violation` (a `SECCOMP_RET_*` value), another architecture `SECCOMP_RET_KILL_PROCESS`.
    pub(crate) fn compile(self, violation: u32) -> Result<BpfProgram, String> {
        let mut syscalls = self.syscalls;
        syscalls.sort_by_key(|&(nr, _)| nr);
        let mut asm = Asm::default();
        let allow = asm.label();
        let deny = asm.label();
        // Another architecture (a 32-bit `int 0x80` call) kills the process.
        asm.stmt(BPF_LD | BPF_W | BPF_ABS, DATA_ARCH);
        let arch_ok = asm.label();
        asm.jump(
            BPF_JEQ,
            AUDIT_ARCH_X86_64,
            Target::Label(arch_ok),
            Target::Next,
        );
        asm.stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
        asm.bind(arch_ok);
        asm.stmt(BPF_LD | BPF_W | BPF_ABS, DATA_NR);
        if syscalls.is_empty() {
            asm.stmt(BPF_RET | BPF_K, violation);
            return asm.finish();
        }
        // Where each number leads (a label): ALLOW, or its block of checks.
        let leaves: Vec<(u32, usize)> = syscalls
            .iter()
            .map(|(nr, checks)| {
                (
                    *nr,
                    if checks.is_empty() {
                        allow
                    } else {
                        asm.label()
                    },
                )
            })
            .collect();
        asm.search(&leaves, 0, NR_END, deny);
        for ((_, checks), &(_, block)) in syscalls.iter().zip(&leaves) {
            if block != allow {
                asm.bind(block);
                asm.checks(checks, allow, deny);
            }
        }
        asm.bind(allow);
        asm.stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
        asm.bind(deny);
        asm.stmt(BPF_RET | BPF_K, violation);
        asm.finish()
    }
}

/// Above every x86_64 system call number (the kernel has fewer than 512): the end of the
/// range the search is shaped for.
const NR_END: u32 = 512;

/// How much a listed number counts against an unlisted one when the search is shaped: the
/// calls a vCPU thread makes are listed, so they stay near the top of the tree.
const LISTED_WEIGHT: u64 = 16;

/// Where the number search splits `[lo, hi)`, which holds the listed numbers of `leaves`
/// (two or more): at a listed number or just after one, where the weight on either side is
/// closest to even, counting every number once and a listed one [`LISTED_WEIGHT`] times.
/// The kernel runs the filter for every number when it installs it (to fill its cache of
/// always-allowed calls), so the wide ranges without a listed number are sent to the
/// violation in one or two jumps instead of a search as deep as for a listed one. (An
/// optimal tree, found by dynamic programming over every range, ran 4% fewer instructions in
/// that pass but took 2.5 ms to find, once per process: more than it saved.)
fn split(leaves: &[(u32, usize)], lo: u32, hi: u32) -> u32 {
    // The weight of `[lo, at)`.
    let weight = |at: u32| {
        let listed = leaves.partition_point(|&(nr, _)| nr < at);
        u64::from(at - lo) + (LISTED_WEIGHT - 1) * listed as u64
    };
    let total = weight(hi);
    leaves
        .iter()
        .flat_map(|&(nr, _)| [nr, nr + 1])
        .filter(|&at| lo < at && at < hi)
        .min_by_key(|&at| (2 * weight(at)).abs_diff(total))
        .unwrap_or(lo)
}

/// Where the search of `[lo, hi)`, which holds the listed numbers of `leaves`, goes without
/// an instruction: `deny` when it lists no number, the leaf's label when it is one listed
/// number.
fn direct(leaves: &[(u32, usize)], lo: u32, hi: u32, deny: usize) -> Option<usize> {
    match leaves {
        [] => Some(deny),
        [(nr, target)] if *nr == lo && hi == lo + 1 => Some(*target),
        _ => None,
    }
}

/// Where a jump goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The next instruction.
    Next,
    /// A label, bound to an instruction later (forward) with [`Asm::bind`].
    Label(usize),
}

/// An instruction whose jump targets are not resolved yet.
#[derive(Debug)]
struct Insn {
    code: u16,
    k: u32,
    jt: Target,
    jf: Target,
}

/// A tiny assembler: instructions with labelled forward jumps.
#[derive(Debug, Default)]
struct Asm {
    code: Vec<Insn>,
    /// Each label's instruction index, once bound.
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }

    fn stmt(&mut self, fields: u32, k: u32) {
        self.push(fields, k, Target::Next, Target::Next);
    }

    fn jump(&mut self, op: u32, k: u32, jt: Target, jf: Target) {
        self.push(BPF_JMP | op | BPF_K, k, jt, jf);
    }

    fn push(&mut self, fields: u32, k: u32, jt: Target, jf: Target) {
        let code = opcode(fields);
        self.code.push(Insn { code, k, jt, jf });
    }

    /// Search of the syscall number (in the accumulator, known to be in `[lo, hi)`) over
    /// `leaves`, the listed numbers in that range, sorted, each with the label it leads to:
    /// `jge` splits the range where [`split`] says, a range with one listed number is one
    /// `jeq`. Called only for a range that needs an instruction ([`direct`] is `None`).
    fn search(&mut self, leaves: &[(u32, usize)], lo: u32, hi: u32, deny: usize) {
        if let [(nr, target)] = leaves {
            self.jump(BPF_JEQ, *nr, Target::Label(*target), Target::Label(deny));
            return;
        }
        let at = split(leaves, lo, hi);
        let (low, high) = leaves.split_at(leaves.partition_point(|&(nr, _)| nr < at));
        let low_direct = direct(low, lo, at, deny);
        let high_direct = direct(high, at, hi, deny);
        let upper = high_direct.unwrap_or_else(|| self.label());
        let lower = match low_direct {
            Some(label) => Target::Label(label),
            None => Target::Next,
        };
        self.jump(BPF_JGE, at, Target::Label(upper), lower);
        if low_direct.is_none() {
            self.search(low, lo, at, deny);
        }
        if high_direct.is_none() {
            self.bind(upper);
            self.search(high, at, hi, deny);
        }
    }

    /// A block of checks: each loads its argument and goes on to the next check when it
    /// holds, to `deny` when it does not; the last one that holds goes to `allow`.
    fn checks(&mut self, checks: &[ArgCheck], allow: usize, deny: usize) {
        for (i, check) in checks.iter().enumerate() {
            let last = i + 1 == checks.len();
            let pass = if last { allow } else { self.label() };
            match check {
                ArgCheck::OneOf { arg, values } => {
                    self.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(*arg));
                    for (j, &value) in values.iter().enumerate() {
                        let miss = if j + 1 == values.len() {
                            Target::Label(deny)
                        } else {
                            Target::Next
                        };
                        self.jump(BPF_JEQ, value, Target::Label(pass), miss);
                    }
                    if values.is_empty() {
                        self.jump(BPF_JEQ, 0, Target::Label(deny), Target::Label(deny));
                    }
                }
                ArgCheck::NoneOf { arg, mask } => {
                    self.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(*arg));
                    self.jump(BPF_JSET, *mask, Target::Label(deny), Target::Label(pass));
                }
            }
            if !last {
                self.bind(pass);
            }
        }
    }

    /// Resolves every jump into an offset from the next instruction.
    fn finish(self) -> Result<BpfProgram, String> {
        let offset = |at: usize, target: Target| -> Result<u8, String> {
            let to = match target {
                Target::Next => return Ok(0),
                Target::Label(l) => self.labels[l].ok_or("a jump to an unbound label")?,
            };
            to.checked_sub(at + 1)
                .and_then(|d| u8::try_from(d).ok())
                .ok_or_else(|| {
                    format!(
                        "the filter needs a jump of {} instructions (at most 255): \
                         too many extra syscalls or write fds",
                        to.saturating_sub(at + 1)
                    )
                })
        };
        self.code
            .iter()
            .enumerate()
            .map(|(at, insn)| {
                Ok(sock_filter {
                    code: insn.code,
                    jt: offset(at, insn.jt)?,
                    jf: offset(at, insn.jf)?,
                    k: insn.k,
                })
            })
            .collect()
    }
}

/// The offset of argument `arg`'s low 32 bits in `struct seccomp_data` (little-endian).
fn arg_low(arg: u8) -> u32 {
    DATA_ARGS + 8 * u32::from(arg)
}
