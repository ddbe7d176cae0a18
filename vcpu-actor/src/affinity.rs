//! vCPU thread affinity: the host CPUs a vCPU thread may run on.
//!
//! A vCPU thread applies its set to itself ([`VcpuOptions::affinity`](crate::VcpuOptions)),
//! before it installs its seccomp filter (which does not allow `sched_setaffinity`), and
//! anyone can read a thread's set back as the kernel shows it ([`thread_affinity`]).

/// The most CPUs a set holds (`CPU_SETSIZE`).
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// The set of `cpus`; `None` if one is not below [`MAX_CPUS`].
fn cpu_set(cpus: &[usize]) -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= MAX_CPUS {
            return None;
        }
        // SAFETY: CPU_SET on a set we own, with cpu below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Some(set)
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity(0, ...)`: 0 is the calling
/// thread, not the process).
///
/// # Errors
///
/// A message when a CPU is beyond [`MAX_CPUS`] or the kernel refuses the set (e.g. no CPU of
/// it is online or allowed by the thread's cpuset cgroup).
pub fn set_current_thread_affinity(cpus: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Err("the CPU set is empty".into());
    }
    let set = cpu_set(cpus)
        .ok_or_else(|| format!("a CPU of {cpus:?} is not below CPU_SETSIZE ({MAX_CPUS})"))?;
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(format!(
            "sched_setaffinity({cpus:?}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The CPUs the kernel lets thread `tid` (a Linux thread id) run on (`sched_getaffinity`).
///
/// # Errors
///
/// The OS error, e.g. `ESRCH` for a thread that has ended.
pub fn thread_affinity(tid: i32) -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..MAX_CPUS)
        // SAFETY: CPU_ISSET reads a set we own, every index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_sets_and_reads_its_own_set() {
        let all = thread_affinity(0).unwrap();
        assert!(!all.is_empty());
        let first = all[0];
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            set_current_thread_affinity(&[first]).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), vec![first]);
        })
        .join()
        .unwrap();
        // The calling thread (and so the process's other threads) kept theirs.
        assert_eq!(thread_affinity(0).unwrap(), all);
        assert!(set_current_thread_affinity(&[MAX_CPUS]).is_err());
        assert!(set_current_thread_affinity(&[]).is_err());
    }
}
