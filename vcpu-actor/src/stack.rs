//! The vCPU thread's stack: giving back the pages its start-up touched and its run loop
//! never will.
//!
//! A vCPU thread's resident memory is mostly stack pages, and a page once touched stays
//! resident until the thread ends. The deepest the thread ever goes is the caller's setup
//! (large KVM structures such as `kvm_lapic_state` are 1 KiB each, and the setup runs below
//! the thread's own frames); the run loop, the mailbox and `KVM_RUN` stay within the two
//! pages at the top (glibc's thread block and static TLS fill most of the first). So once the
//! setup has returned, everything below the current frame is dead memory, and
//! `MADV_DONTNEED` returns it to the kernel: the thread keeps two stack pages instead of
//! three (4 KiB less per idle vCPU), and a later deeper call (a device handler, a state
//! save) just faults zeroed pages in again.

/// Gives the kernel back the pages of the calling thread's stack that lie entirely more than
/// 1 KiB below this function's frame (all dead by the ABI: nothing lives below the stack
/// pointer but the 128-byte red zone). Best effort: does nothing if the stack's bounds
/// cannot be read.
#[inline(never)]
pub(crate) fn release_below_current_frame() {
    let Some(bottom) = stack_bottom() else {
        return;
    };
    let marker = 0u8;
    let here = std::hint::black_box(std::ptr::addr_of!(marker)) as usize;
    let page = page_size();
    let end = here.saturating_sub(1024) & !(page - 1);
    if end <= bottom || !any_resident(bottom, end, page) {
        return;
    }
    // SAFETY: [bottom, end) is this thread's own stack below the current frame by more than
    // the red zone, so no live data is there; MADV_DONTNEED on private anonymous memory
    // makes later reads see zeroes, which is all a stack page below the pointer may hold.
    unsafe {
        libc::madvise(
            bottom as *mut libc::c_void,
            end - bottom,
            libc::MADV_DONTNEED,
        );
    }
}

/// Whether any page of [bottom, end) is resident. `MADV_DONTNEED` is not free even where
/// nothing is resident (it flushes the TLB of every CPU running the process's threads: an
/// IPI each, which exits to the hypervisor in a VM), and a setup that stayed shallow leaves
/// nothing to give back; `mincore` only reads page tables.
fn any_resident(bottom: usize, end: usize, page: usize) -> bool {
    const MAX_PAGES: usize = 64;
    let mut vec = [0u8; MAX_PAGES];
    // Only the pages nearest the frame: a setup's pages are those right below it.
    let start = bottom.max(end.saturating_sub(MAX_PAGES * page));
    // SAFETY: [start, end) lies in this thread's stack mapping; `vec` has a byte for each of
    // its at most MAX_PAGES pages.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    // If mincore fails, give the pages back anyway.
    rc != 0 || vec.iter().any(|b| b & 1 == 1)
}

/// The lowest address of the calling thread's usable stack (above its guard page).
fn stack_bottom() -> Option<usize> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::zeroed();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    // SAFETY: pthread_getattr_np initializes `attr` for the calling thread; it is destroyed
    // below whenever it was initialized.
    if unsafe { libc::pthread_getattr_np(me, attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let mut addr = std::ptr::null_mut();
    let mut size = 0;
    // SAFETY: `attr` was initialized above; the out-pointers are valid.
    let rc = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: initialized above and not used after.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    (rc == 0 && size > 0).then_some(addr as usize)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `depth` bytes of stack below the caller.
    #[inline(never)]
    fn go_deep(depth: usize) -> u8 {
        let mut area = [0u8; 16 * 1024];
        let n = depth.min(area.len());
        for b in area[..n].iter_mut() {
            *b = std::hint::black_box(1);
        }
        std::hint::black_box(&mut area)[0]
    }

    /// How many of the stack's pages are resident (mincore).
    fn resident_stack_pages() -> usize {
        let bottom = stack_bottom().unwrap();
        let page = page_size();
        let marker = 0u8;
        let top = (std::ptr::addr_of!(marker) as usize + page) & !(page - 1);
        let pages = (top - bottom) / page;
        let mut vec = vec![0u8; pages];
        // SAFETY: [bottom, top) is mapped (this thread's stack); `vec` has one byte per page.
        let rc =
            unsafe { libc::mincore(bottom as *mut libc::c_void, top - bottom, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn pages_below_the_frame_are_given_back_and_the_frame_survives() {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let canary = std::hint::black_box([7u8; 64]);
                go_deep(16 * 1024);
                let deep = resident_stack_pages();
                release_below_current_frame();
                let after = resident_stack_pages();
                assert!(
                    after + 3 <= deep,
                    "{deep} resident pages before, {after} after"
                );
                assert_eq!(std::hint::black_box(canary), [7u8; 64]);
                // The released pages work as fresh ones.
                go_deep(16 * 1024);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
