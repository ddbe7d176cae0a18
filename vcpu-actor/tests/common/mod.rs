//! Shared helpers for the vcpu-actor tests: a KVM VM with identity-mapped memory, CPL-3
//! long-mode vCPUs, an exit handler that records port writes, and the request helpers.
#![allow(dead_code)]

pub mod guests;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
pub use vcpu_actor::test_util::kvm_or_skip;
use vcpu_actor::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, VcpuError, VcpuHandle, VcpuOptions,
    VcpuParts, VcpuRequest, VcpuState,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size.
pub const MEM_SIZE: usize = 2 << 20;
/// GDT (null, code0, data0, code3, data3).
pub const GDT_ADDR: u64 = 0x1000;
/// PML4; PDPT at +0x1000, PD for 0-1 GiB at +0x2000, PD for 3-4 GiB at +0x3000.
pub const PML4_ADDR: u64 = 0x2000;
/// 64-bit TSS with an all-zero I/O permission bitmap (every port allowed at CPL 3).
pub const TSS_ADDR: u64 = 0x20000;
/// TSS limit: 104 bytes of TSS, 8 KiB of bitmap, the closing 0xFF byte.
const TSS_LIMIT: u32 = 0x68 + 0x2000;
/// Where the AP's real-mode code goes (SIPI vector 8).
pub const AP_CODE_ADDR: u64 = 0x8000;
/// Where the long-mode program goes.
pub const CODE_ADDR: u64 = 0x10000;
/// Data area; vCPU `i` gets `DATA_ADDR + 64 * i`.
pub const DATA_ADDR: u64 = 0x100000;
/// Generous timeout for every wait: turns a hang into a failure.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A VM with `MEM_SIZE` bytes at guest-physical 0, page tables and a GDT.
pub struct TestVm {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub mmap_size: usize,
}

/// Runs `body` on a fresh [`TestVm`] (`irqchip`: see [`TestVm::new`]); without KVM, skips
/// `test` after [`kvm_or_skip`]'s SKIPPED line.
pub fn with_vm(test: &str, irqchip: bool, body: impl FnOnce(TestVm)) {
    if let Some(kvm) = kvm_or_skip(test) {
        body(TestVm::new(kvm, irqchip));
    }
}

/// `kvm_test!(name, irqchip, |vm| { ... })`: the test `name`, run by [`with_vm`].
macro_rules! kvm_test {
    ($name:ident, $irqchip:expr, $body:expr) => {
        #[test]
        fn $name() {
            $crate::common::with_vm(stringify!($name), $irqchip, $body);
        }
    };
}
pub(crate) use kvm_test;

impl TestVm {
    /// Creates the VM; `irqchip` adds the in-kernel PIC/IOAPIC/LAPICs (needed for INIT/SIPI).
    pub fn new(kvm: Kvm, irqchip: bool) -> TestVm {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
        if irqchip {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory");
        let host = mem.get_host_address(GuestAddress(0)).expect("host address");
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is backed by `mem`, which lives as long as the VM (both in Self).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        let mmap_size = kvm.get_vcpu_mmap_size().expect("KVM_GET_VCPU_MMAP_SIZE");
        let t = TestVm {
            kvm,
            vm,
            mem,
            mmap_size,
        };
        t.write_tables();
        t
    }

    fn write_tables(&self) {
        // Null, 64-bit code DPL 0, data DPL 0, 64-bit code DPL 3, data DPL 3.
        let gdt: [u64; 5] = [
            0,
            0x0020_9a00_0000_0000,
            0x0000_9200_0000_0000,
            0x0020_fa00_0000_0000,
            0x0000_f200_0000_0000,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.write_u64(GDT_ADDR + 8 * i as u64, *d);
        }
        // I/O map base right after the TSS; the bitmap is zero (guest memory starts zeroed)
        // and ends with the required 0xFF byte.
        self.mem
            .write_obj(0x68u16, GuestAddress(TSS_ADDR + 0x66))
            .expect("tss");
        self.mem
            .write_obj(0xffu8, GuestAddress(TSS_ADDR + u64::from(TSS_LIMIT)))
            .expect("tss");
        const PRESENT_RW_USER: u64 = 0x7;
        const PAGE_2M: u64 = 0x80;
        const PCD: u64 = 0x10;
        let pdpt = PML4_ADDR + 0x1000;
        let pd_low = PML4_ADDR + 0x2000;
        let pd_high = PML4_ADDR + 0x3000;
        self.write_u64(PML4_ADDR, pdpt | PRESENT_RW_USER);
        self.write_u64(pdpt, pd_low | PRESENT_RW_USER);
        self.write_u64(pdpt + 3 * 8, pd_high | PRESENT_RW_USER);
        for i in 0..512u64 {
            self.write_u64(pd_low + 8 * i, (i << 21) | PAGE_2M | PRESENT_RW_USER);
        }
        // The LAPIC page 0xFEE00000, uncached.
        let lapic: u64 = 0xfee0_0000;
        let idx = (lapic - 0xc000_0000) >> 21;
        self.write_u64(pd_high + 8 * idx, lapic | PCD | PAGE_2M | PRESENT_RW_USER);
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.mem
            .write_obj(v, GuestAddress(addr))
            .expect("guest write");
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).expect("guest read")
    }

    /// Copies a guest program to `addr`.
    pub fn load(&self, program: &[u8], addr: u64) {
        self.mem
            .write_slice(program, GuestAddress(addr))
            .expect("load program");
    }

    /// The parts of an actor for `vcpu`, with a non-blocking exit EventFd (a clone of it is
    /// returned beside).
    pub fn parts(&self, id: u32, vcpu: VcpuFd, handler: Arc<Recorder>) -> (VcpuParts, EventFd) {
        let exit_evt = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let mine = exit_evt.try_clone().expect("eventfd");
        let parts = VcpuParts {
            id,
            vcpu,
            vcpu_mmap_size: self.mmap_size,
            handler,
            exit_evt,
        };
        (parts, mine)
    }

    /// Spawns an actor for `vcpu`; returns its handle and its exit event.
    pub fn spawn(
        &self,
        id: u32,
        vcpu: VcpuFd,
        handler: Arc<Recorder>,
        options: VcpuOptions,
    ) -> (VcpuHandle, EventFd) {
        let (parts, evt) = self.parts(id, vcpu, handler);
        (VcpuHandle::spawn(parts, options).expect("spawn"), evt)
    }

    /// Loads `program` at `CODE_ADDR` and spawns vCPU 0 running it at CPL 3 with
    /// `rdi = data` and `rdx = port`.
    pub fn spawn_program(
        &self,
        program: &[u8],
        data: u64,
        port: u16,
        handler: Arc<Recorder>,
        options: VcpuOptions,
    ) -> (VcpuHandle, EventFd) {
        self.load(program, CODE_ADDR);
        let vcpu = self.new_cpl3_vcpu(0, CODE_ADDR, data, port.into(), 0);
        self.spawn(0, vcpu, handler, options)
    }

    /// A vCPU with the host's supported CPUID and nothing else (an AP stays
    /// KVM_MP_STATE_UNINITIALIZED until INIT/SIPI when there is an irqchip).
    pub fn new_plain_vcpu(&self, id: u64) -> VcpuFd {
        let vcpu = self.vm.create_vcpu(id).expect("KVM_CREATE_VCPU");
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        vcpu
    }

    /// A vCPU in 64-bit mode at CPL 3 starting at `entry`, with IOPL 3 and the given
    /// `rdi`/`rdx`/`rsi`.
    pub fn new_cpl3_vcpu(&self, id: u64, entry: u64, rdi: u64, rdx: u64, rsi: u64) -> VcpuFd {
        let vcpu = self.new_plain_vcpu(id);
        let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x18 | 3,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x20 | 3,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_ADDR,
            limit: TSS_LIMIT,
            selector: 0,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 5 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
        sregs.efer = 0x500; // LME, LMA
        vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
        let regs = kvm_bindings::kvm_regs {
            rip: entry,
            rflags: 0x3002, // IOPL 3, reserved bit 1
            rdi,
            rdx,
            rsi,
            rsp: DATA_ADDR - 0x100,
            ..Default::default()
        };
        vcpu.set_regs(&regs).expect("KVM_SET_REGS");
        vcpu
    }
}

/// An exit handler that records port writes (count and last value per port), optionally
/// stops the VM on one port and runs a hook on each write.
#[derive(Default)]
pub struct Recorder {
    ports: Mutex<HashMap<u16, (u64, u64)>>,
    changed: Condvar,
    stop_port: Option<u16>,
    hook: Option<Box<dyn Fn(u32, u16) + Send + Sync>>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// A write to `port` returns `IoOutcome::StopVm`.
    pub fn stopping_on(port: u16) -> Arc<Recorder> {
        Arc::new(Recorder {
            stop_port: Some(port),
            ..Recorder::default()
        })
    }

    /// `hook(vcpu, port)` runs on every port write, in the vCPU thread.
    pub fn with_hook(hook: impl Fn(u32, u16) + Send + Sync + 'static) -> Arc<Recorder> {
        Arc::new(Recorder {
            hook: Some(Box::new(hook)),
            ..Recorder::default()
        })
    }

    /// (count, last value) of writes to `port`.
    pub fn port(&self, port: u16) -> (u64, u64) {
        let ports = self.ports.lock().expect("recorder lock");
        ports.get(&port).copied().unwrap_or((0, 0))
    }

    /// Waits until `port` has been written at least `count` times.
    pub fn wait_port(&self, port: u16, count: u64, timeout: Duration) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        let mut ports = self.ports.lock().expect("recorder lock");
        loop {
            let v = ports.get(&port).copied().unwrap_or((0, 0));
            if v.0 >= count {
                return v;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "port {port:#x} written {} times, expected {count} within {timeout:?}",
                v.0
            );
            ports = self
                .changed
                .wait_timeout(ports, deadline - now)
                .expect("recorder lock")
                .0;
        }
    }
}

/// The value of a port or MMIO access's `data`: its bytes as a little-endian number (the
/// first 8 of a longer access).
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl ExitHandler for Recorder {
    fn pio_read(&self, _: u32, _: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }

    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        if let Some(hook) = &self.hook {
            hook(vcpu, port);
        }
        {
            let mut ports = self.ports.lock().expect("recorder lock");
            let e = ports.entry(port).or_insert((0, 0));
            e.0 += 1;
            e.1 = le_value(data);
        }
        self.changed.notify_all();
        if self.stop_port == Some(port) {
            return Ok(IoOutcome::StopVm);
        }
        Ok(IoOutcome::Handled)
    }

    fn mmio_read(&self, _: u32, addr: u64, _: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        Err(DeviceError(format!("no device at {addr:#x}")))
    }

    fn mmio_write(&self, _: u32, addr: u64, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        Err(DeviceError(format!("no device at {addr:#x}")))
    }
}

/// Polls `cond` every millisecond until it holds; panics with `what` after `TIMEOUT`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `req`, waits for its reply and checks that it matches and has `outcome`.
pub fn expect(h: &VcpuHandle, req: VcpuRequest, outcome: ReplyOutcome) {
    let reply = h.request(req, TIMEOUT).expect("reply");
    assert_eq!((reply.vcpu_id, reply.request), (h.id(), req));
    assert_eq!(
        reply.outcome,
        outcome,
        "reply to {req}; exit reason: {:?}",
        h.exit_reason()
    );
}

/// Sends `req` and checks that it is refused in `state`, with a reason naming both.
pub fn expect_refused(h: &VcpuHandle, req: VcpuRequest, state: VcpuState) {
    let reply = h.request(req, TIMEOUT).expect("reply");
    assert_eq!(
        reply.outcome,
        ReplyOutcome::NotAllowed {
            request: req,
            state
        }
    );
    assert!(!reply.is_ok());
    let why = reply.refusal().expect("a refusal").to_string();
    assert!(
        why.contains(&state.to_string()) && why.contains(&req.to_string()),
        "{why}"
    );
}

/// After `Exit`: sending `req` either fails (the thread is gone) or is refused.
pub fn expect_gone_or_refused(h: &VcpuHandle, req: VcpuRequest) {
    match h.request(req, TIMEOUT) {
        Err(VcpuError::ThreadGone { state, .. }) => assert_eq!(state, VcpuState::Exited),
        Ok(r) => assert!(
            matches!(r.outcome, ReplyOutcome::NotAllowed { request, .. } if request == req),
            "{r:?}"
        ),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Waits until the eventfd is readable and returns its counter.
pub fn wait_event(evt: &EventFd) -> u64 {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(TIMEOUT.as_millis()).expect("timeout in ms fits in i32");
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert_eq!(
        n, 1,
        "the exit event did not become readable within {TIMEOUT:?}"
    );
    evt.read().expect("read exit event")
}

/// Sends `Exit`, checks the reply and joins the thread; returns the vCPU fd.
pub fn exit_and_join(h: VcpuHandle) -> VcpuFd {
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    h.join(TIMEOUT).expect("join")
}

/// Checks what `GetState` and `GetTid` answer.
pub fn expect_queries(h: &VcpuHandle, state: VcpuState, tid: i32) {
    expect(h, VcpuRequest::GetState, ReplyOutcome::State(state));
    expect(h, VcpuRequest::GetTid, ReplyOutcome::Tid(tid));
}

/// `rounds` times: resume, wait until `port` has `per_round` more writes, check the
/// queries while running, pause.
pub fn run_in_rounds(h: &VcpuHandle, rec: &Recorder, port: u16, rounds: u64, per_round: u64) {
    let tid = h.tid().expect("tid");
    for round in 1..=rounds {
        expect(h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        rec.wait_port(port, per_round * round, TIMEOUT);
        expect_queries(h, VcpuState::Running, tid);
        expect(h, VcpuRequest::Pause, ReplyOutcome::Paused);
    }
}
