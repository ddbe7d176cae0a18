//! End to end on real KVM: a vCPU that stops (triple fault, shutdown port) stops the whole
//! VM through the exit EventFd and the event loop; so does a stop request from the API.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use integration::guest::{self, smp_counter, GuestCode, GuestVm, SHUTDOWN_MESSAGE, SHUTDOWN_VALUE};
use integration::kvm_or_skip;
use integration::loader::memory_map::DEFAULT_LOAD_ADDR;
use vcpu_actor::VcpuExitReason;
use vmm_core::{
    StopCause, VcpuConfig, VcpuControlError, VcpuManagerOptions, VmOptions, VmStopReason,
};

const GENEROUS: Duration = Duration::from_secs(30);

/// A serial console writer the test can read back.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 2 boot vCPUs of 4: the AP waits for INIT/SIPI inside KVM_RUN, so stopping the VM must
/// also get it out of there.
fn start(kvm: kvm_ioctls::Kvm, code: GuestCode) -> GuestVm {
    start_with(kvm, code, VmOptions::default())
}

fn start_with(kvm: kvm_ioctls::Kvm, code: GuestCode, vm_options: VmOptions) -> GuestVm {
    let config = VcpuConfig::with_counts(2, 4).unwrap();
    let g = GuestVm::create(kvm, code, config, vm_options, VcpuManagerOptions::default())
        .expect("create the VM");
    g.vcpus.start_boot_vcpus().expect("start");
    g
}

/// Every vCPU exited and joined; the VM refuses to run again.
fn assert_stopped(g: &GuestVm) {
    assert!(
        g.vcpus.present_vcpus().is_empty(),
        "{:?}",
        g.vcpus.present_vcpus()
    );
    assert_eq!(g.vcpus.kept_vcpu_fds(), [0, 1]);
    assert!(g.vcpus.exit_requested());
    assert!(matches!(
        g.vcpus.resume_all(),
        Err(VcpuControlError::InvalidState { .. })
    ));
}

#[test]
fn vm_stop_triple_fault_stops_the_vm_naming_the_vcpu() {
    let Some(kvm) = kvm_or_skip("vm_stop_triple_fault_stops_the_vm_naming_the_vcpu") else {
        return;
    };
    let mut g = start(kvm, guest::triple_fault());
    let stop = g
        .vcpus
        .wait_for_exit(Some(GENEROUS))
        .expect("event loop")
        .expect("the VM stopped within the timeout");
    assert_eq!(
        stop,
        VmStopReason {
            vcpu_id: Some(0),
            vcpu_index: Some(0),
            reason: StopCause::VcpuExit(VcpuExitReason::TripleFault {
                vcpu_id: 0,
                rip: DEFAULT_LOAD_ADDR
            }),
            also_stopped: vec![],
        }
    );
    let text = stop.to_string();
    assert!(
        text.contains("vCPU 0") && text.to_lowercase().contains("triple"),
        "{text}"
    );
    assert_stopped(&g);
}

#[test]
fn vm_stop_shutdown_port_stops_the_vm_through_run_until_exit() {
    let Some(kvm) = kvm_or_skip("vm_stop_shutdown_port_stops_the_vm_through_run_until_exit") else {
        return;
    };
    let console = SharedBuf::default();
    let g = start_with(
        kvm,
        guest::shutdown_port(),
        VmOptions {
            serial_output: Box::new(console.clone()),
            ..Default::default()
        },
    );
    let (g, stop) =
        common::run_until_exit_within(g, GENEROUS, "the shutdown port did not stop the VM");
    assert_eq!(stop.vcpu_id, Some(0));
    match &stop.reason {
        StopCause::VcpuExit(VcpuExitReason::DeviceRequestedStop { vcpu_id: 0, rip }) => {
            // Stopped right after the `out`, inside the program.
            let end = DEFAULT_LOAD_ADDR + guest::shutdown_port().code.len() as u64;
            assert!(*rip > DEFAULT_LOAD_ADDR && *rip < end, "{rip:#x}");
        }
        other => panic!("expected a device-requested stop by vCPU 0, got {other:?}"),
    }
    assert_eq!(g.vm.shutdown_port().last_value(), u64::from(SHUTDOWN_VALUE));
    // What the guest printed on COM1 reached the writer we chose.
    assert_eq!(
        String::from_utf8_lossy(&console.0.lock().unwrap()),
        SHUTDOWN_MESSAGE
    );
    assert_stopped(&g);
}

#[test]
fn vm_stop_requested_from_another_thread() {
    let Some(kvm) = kvm_or_skip("vm_stop_requested_from_another_thread") else {
        return;
    };
    let mut g = start(kvm, smp_counter());
    // Nothing stops on its own: a timed wait times out.
    assert_eq!(
        g.vcpus
            .wait_for_exit(Some(Duration::from_millis(50)))
            .unwrap(),
        None
    );
    let monitor = g.vcpus.exit_monitor();
    let requester = std::thread::spawn(move || monitor.request_stop());
    let stop = g
        .vcpus
        .wait_for_exit(Some(GENEROUS))
        .expect("event loop")
        .expect("the stop request arrived");
    requester.join().unwrap().unwrap();
    assert_eq!(stop.reason, StopCause::StopRequested);
    assert_eq!(stop.vcpu_id, None);
    assert_stopped(&g);
}
