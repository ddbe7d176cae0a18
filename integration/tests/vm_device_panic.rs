//! End to end on real KVM: a device that panics on a vCPU thread stops the VM with a reason
//! naming the device access, and every vCPU fd is kept (none is lost with a dead thread).

use std::sync::Arc;
use std::time::Duration;

use integration::guest::{self, GuestVm};
use integration::kvm_or_skip;
use vcpu_actor::{IoAccess, VcpuExitReason};
use vmm_core::devices::SHUTDOWN_PORT;
use vmm_core::{
    BusAccess, BusDevice, BusSpace, DeviceError, IoOutcome, StopCause, VcpuConfig,
    VcpuControlError, VcpuManagerOptions, VmOptions,
};

const GENEROUS: Duration = Duration::from_secs(30);
const PANIC_MESSAGE: &str = "the replacement shutdown device broke on purpose";

/// Panics on every write: a bug in a device.
struct PanickingDevice;

impl BusDevice for PanickingDevice {
    fn read(&self, _: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, _: BusAccess, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        panic!("{PANIC_MESSAGE}");
    }
}

#[test]
fn vm_device_panic_stops_the_vm_with_a_reason_and_keeps_every_fd() {
    let Some(kvm) = kvm_or_skip("vm_device_panic_stops_the_vm_with_a_reason_and_keeps_every_fd")
    else {
        return;
    };
    // The shutdown-port guest writes to SHUTDOWN_PORT, where a panicking device now sits.
    let config = VcpuConfig::with_counts(2, 4).expect("config");
    let mut g = GuestVm::create(
        kvm,
        guest::shutdown_port(),
        config,
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .expect("create the VM");
    let bus = g.vm.io_bus();
    let port = u64::from(SHUTDOWN_PORT);
    assert!(bus.unregister(BusSpace::Pio, port).is_some());
    bus.register(
        BusSpace::Pio,
        port,
        1,
        "panicking",
        Arc::new(PanickingDevice),
    )
    .expect("register the panicking device");
    g.vcpus.start_boot_vcpus().expect("start");

    let stop = g
        .vcpus
        .wait_for_exit(Some(GENEROUS))
        .expect("a device panic stops the VM with a reason, not an error")
        .expect("the VM stopped within the timeout");
    assert_eq!((stop.vcpu_id, stop.vcpu_index), (Some(0), Some(0)));
    match &stop.reason {
        StopCause::VcpuExit(VcpuExitReason::DevicePanicked {
            vcpu_id: 0,
            access: IoAccess::PioWrite,
            addr,
            message,
            ..
        }) => {
            assert_eq!(*addr, port);
            assert_eq!(message, PANIC_MESSAGE);
        }
        other => panic!("expected a device panic on vCPU 0, got {other:?}"),
    }
    let text = stop.to_string();
    assert!(
        text.contains("vCPU 0:") && text.contains("panicked") && text.contains(PANIC_MESSAGE),
        "{text}"
    );
    assert_eq!(text.matches("vCPU 0").count(), 1, "{text}");

    // Every thread was joined and every fd kept, the panicking vCPU's included.
    assert!(g.vcpus.present_vcpus().is_empty());
    assert_eq!(g.vcpus.kept_vcpu_fds(), [0, 1]);
    assert!(matches!(
        g.vcpus.resume_all(),
        Err(VcpuControlError::InvalidState { .. })
    ));
}
