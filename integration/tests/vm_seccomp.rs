//! End to end on real KVM: the VMM's devices run on vCPU threads under their default seccomp
//! filter. A device that makes a forbidden system call stops the VM through the exit path
//! with a reason naming the call; a device writing to an fd the VMM allowed works.

use std::io::Write;
use std::os::fd::RawFd;
use std::time::Duration;

mod common;

use integration::guest::{self, GuestVm, SHUTDOWN_MESSAGE};
use integration::kvm_or_skip;
use vcpu_actor::{SeccompMode, VcpuExitReason, VcpuOptions};
use vmm_core::{StopCause, VcpuConfig, VcpuManagerOptions, VmOptions, VmStopReason};

const GENEROUS: Duration = Duration::from_secs(30);

/// A serial console writer that opens a file for every write (a device doing more than it
/// should on the vCPU thread).
struct OpeningWriter;

impl Write for OpeningWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::fs::File::open("/proc/self/status")?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A serial console writer that writes straight to an fd.
struct FdWriter(RawFd);

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a valid buffer to an fd this test owns.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the guest that prints on COM1 then writes the shutdown port, until the VM stops.
fn run_shutdown_guest(
    kvm: kvm_ioctls::Kvm,
    serial_output: Box<dyn Write + Send>,
    seccomp: SeccompMode,
) -> (GuestVm, VmStopReason) {
    let config = VcpuConfig::with_counts(1, 2).unwrap();
    let vm_options = VmOptions {
        serial_output,
        ..VmOptions::default()
    };
    let options = VcpuManagerOptions {
        vcpu: VcpuOptions {
            seccomp,
            ..VcpuOptions::default()
        },
        ..VcpuManagerOptions::default()
    };
    let g = GuestVm::create(kvm, guest::shutdown_port(), config, vm_options, options)
        .expect("create the VM");
    g.vcpus.start_boot_vcpus().expect("start");
    let tid = g.vcpus.present_vcpus()[0].tid.expect("tid");
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"));
    // The thread may already have ended; when it is there, it is filtered.
    if let Ok(status) = status {
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
    common::run_until_exit_within(g, GENEROUS, "the VM did not stop")
}

#[test]
fn vm_seccomp_a_device_making_a_forbidden_call_stops_the_vm_naming_it() {
    let Some(kvm) = kvm_or_skip("vm_seccomp_a_device_making_a_forbidden_call_stops_the_vm") else {
        return;
    };
    let (_g, stop) = run_shutdown_guest(kvm, Box::new(OpeningWriter), SeccompMode::default());
    assert_eq!(stop.vcpu_id, Some(0));
    match &stop.reason {
        StopCause::VcpuExit(VcpuExitReason::SeccompViolation {
            vcpu_id: 0,
            syscall,
            name,
            ..
        }) => {
            assert_eq!(*syscall, libc::SYS_openat);
            assert_eq!(name.as_deref(), Some("openat"));
        }
        other => panic!("expected a seccomp violation of openat, got {other:?}"),
    }
    let text = stop.to_string();
    assert!(
        text.contains("openat") && text.contains("seccomp") && text.contains("vCPU 0"),
        "{text}"
    );
    // The process is fine: this thread can open files.
    assert!(std::fs::read_to_string("/proc/self/status").is_ok());
}

#[test]
fn vm_seccomp_a_console_on_an_allowed_fd_works() {
    let Some(kvm) = kvm_or_skip("vm_seccomp_a_console_on_an_allowed_fd_works") else {
        return;
    };
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    let [read_end, write_end] = fds;
    let seccomp = SeccompMode::default().with_write_fds([write_end]);
    let (_g, stop) = run_shutdown_guest(kvm, Box::new(FdWriter(write_end)), seccomp);
    assert!(
        matches!(
            stop.reason,
            StopCause::VcpuExit(VcpuExitReason::DeviceRequestedStop { vcpu_id: 0, .. })
        ),
        "{stop}"
    );
    let mut buf = vec![0u8; 4096];
    // SAFETY: reading into a valid buffer from the pipe's read end.
    let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).expect("the console wrote into the pipe");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), SHUTDOWN_MESSAGE);
    for fd in [read_end, write_end] {
        // SAFETY: closing each fd of the pipe, once.
        unsafe { libc::close(fd) };
    }
}
