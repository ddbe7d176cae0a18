//! TEMPORARY experiment (to be removed): drive the BSP directly.
#![allow(missing_docs, clippy::all)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuExit};
use vcpu_actor::ExitHandler;

use super::*;
use crate::{Vm, VmOptions};

#[derive(Clone)]
struct Out(Arc<Mutex<Vec<u8>>>, Instant);
impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut v = self.0.lock().unwrap();
        v.extend_from_slice(b);
        if b.contains(&b'\n') {
            let s = String::from_utf8_lossy(&v);
            let line = s.lines().last().unwrap_or("");
            eprintln!("[{:8.3}] {}", self.1.elapsed().as_secs_f64(), line);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore]
fn experiment_boot() {
    let kernel = std::env::var("EXP_KERNEL").unwrap();
    let cmdline = std::env::var("EXP_CMDLINE").unwrap_or("console=ttyS0 noxsave".into());
    let hide_cx16 = std::env::var("EXP_HIDE_CX16").is_ok();
    let t0 = Instant::now();
    let out = Out(Arc::new(Mutex::new(Vec::new())), t0);
    let kvm = Kvm::new().unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let vm = Vm::new(
        kvm,
        VmOptions {
            memory_size: 256 << 20,
            serial_output: Box::new(out.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let topo = topology::CpuTopology::new(1, 1, 3, 2).unwrap();
    let config = VcpuConfig {
        boot_vcpu_count: 2,
        max_vcpu_count: 6,
        topology: topo,
        vpmu: Default::default(),
    };
    let mut boot = LinuxBootConfig::new(kernel);
    boot.cmdline = cmdline;
    let entry = load_linux(vm.memory(), &boot, &mp_cpus(&config).unwrap()).unwrap();
    eprintln!("entry {:#x} e820 {:?}", entry.kernel.entry, entry.e820);
    let mut vcpu = vm.fd().create_vcpu(0).unwrap();
    let host = crate::cpuid::entries_from_kvm(supported.as_slice());
    let mut ents = topology::build_vcpu_cpuid(
        &host,
        topology::CpuVendor::from_entries(&host).unwrap(),
        &topo,
        0,
    )
    .unwrap();
    if hide_cx16 {
        for e in ents.iter_mut() {
            if e.function == 1 {
                e.ecx &= !(1 << 13);
            }
        }
    }
    vcpu.set_cpuid2(&crate::cpuid::entries_to_kvm(&ents).unwrap())
        .unwrap();
    let mut st = vcpu.get_lapic().unwrap();
    crate::manager::lapic::set_lvt_delivery_mode(
        &mut st,
        crate::manager::lapic::LVT_LINT0,
        crate::manager::lapic::DeliveryMode::ExtInt,
    );
    crate::manager::lapic::set_lvt_delivery_mode(
        &mut st,
        crate::manager::lapic::LVT_LINT1,
        crate::manager::lapic::DeliveryMode::Nmi,
    );
    vcpu.set_lapic(&st).unwrap();
    entry.setup_bsp(&vcpu, vm.memory()).unwrap();
    let bus = vm.io_bus().clone();
    let limit = std::env::var("EXP_SECS")
        .map(|s| s.parse::<u64>().unwrap())
        .unwrap_or(60);
    let mut exits = 0u64;
    loop {
        if t0.elapsed().as_secs() > limit {
            eprintln!("time limit");
            break;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let _ = bus.pio_read(0, port, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let _ = bus.pio_write(0, port, data);
            }
            Ok(VcpuExit::MmioRead(a, data)) => {
                data.fill(0);
                eprintln!("mmio read {a:#x}");
            }
            Ok(VcpuExit::MmioWrite(a, _)) => {
                eprintln!("mmio write {a:#x}");
            }
            Ok(VcpuExit::Hlt) => {
                eprintln!("hlt");
                break;
            }
            Ok(other) => {
                let o = format!("{other:?}");
                eprintln!("exit {o} after {exits} exits");
                break;
            }
            Err(e) => {
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                    continue;
                }
                eprintln!("run error {e}");
                break;
            }
        }
        exits += 1;
    }
    let r = vcpu.get_regs().unwrap();
    eprintln!("rip {:#x} elapsed {:?} exits {exits}", r.rip, t0.elapsed());
}
