//! Benchmark routines: the vCPU manager next to bare KVM, measured in the same run.
//!
//! - Startup: [`vmm_core::VcpuManager::create_boot_vcpus`] + [`vmm_core::VcpuManager::start_boot_vcpus`] for N
//!   vCPUs (create, CPUID from topology + vPMU, MSRs, LAPIC, FPU, registers, actor thread,
//!   start) next to bare `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` of KVM's supported CPUID.
//! - Pause/resume: [`vmm_core::VcpuManager::pause_all`] / [`vmm_core::VcpuManager::resume_all`] of N vCPUs that
//!   spin at CPL 3 (the smp_counter guest), next to bare threads that run N vCPUs spinning at
//!   CPL 3 (the spin guest) and are kicked out of `KVM_RUN` with `immediate_exit` + a signal,
//!   then block until resumed. Both sides wait for every thread's acknowledgement.
//!
//! Every number is a median over the rounds. No thresholds: these are for reading.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_run, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::Serialize;
use vmm_core::loader::load_program;
use vmm_core::{BootEntry, VcpuConfig, VcpuManagerOptions, Vm, VmOptions};

use crate::guest::{self, GuestVm};
use crate::IntegrationError;

/// The vCPU counts the issue asks for.
pub const DEFAULT_SIZES: [u32; 4] = [1, 8, 64, 254];

/// One row of the benchmark table.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BenchRow {
    /// N.
    pub vcpus: u32,
    /// Manager: create + configure + start N vCPUs.
    pub startup_manager: Duration,
    /// The create + configure part of it (including spawning the actor threads).
    pub create_manager: Duration,
    /// Bare: `KVM_CREATE_VCPU` + `KVM_SET_CPUID2`, N times.
    pub startup_bare: Duration,
    /// Manager: `pause_all` (median).
    pub pause_manager: Duration,
    /// Bare: kick N threads out of `KVM_RUN`, all acknowledged (median).
    pub pause_bare: Duration,
    /// Manager: `resume_all` (median).
    pub resume_manager: Duration,
    /// Bare: wake N blocked threads, all acknowledged (median).
    pub resume_bare: Duration,
}

fn kvm() -> Result<Kvm, IntegrationError> {
    Kvm::new().map_err(|source| IntegrationError::Kvm {
        op: "opening /dev/kvm",
        source,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Times `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` for `n` vCPUs of a fresh VM.
pub fn bare_startup(n: u32) -> Result<Duration, IntegrationError> {
    let kvm = kvm()?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| IntegrationError::Kvm {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let vm = Vm::new(kvm, VmOptions::default())?;
    let t = Instant::now();
    let mut fds = Vec::with_capacity(n as usize);
    for id in 0..n {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| IntegrationError::Kvm {
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        fd.set_cpuid2(&cpuid)
            .map_err(|source| IntegrationError::Kvm {
                op: "KVM_SET_CPUID2",
                source,
            })?;
        fds.push(fd);
    }
    Ok(t.elapsed())
}

/// One pause and the resume after it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PauseResume {
    /// Until every vCPU acknowledged the pause.
    pub pause: Duration,
    /// Until every vCPU acknowledged the resume.
    pub resume: Duration,
}

/// What [`manager_run`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ManagerSamples {
    /// create + configure + start.
    pub startup: Duration,
    /// create + configure (including the actor threads).
    pub create: Duration,
    /// The pause/resume rounds.
    pub rounds: Vec<PauseResume>,
}

/// The manager side for `n` vCPUs: startup time, then `rounds` pause/resume pairs.
pub fn manager_run(n: u32, rounds: u32) -> Result<ManagerSamples, IntegrationError> {
    let options = VcpuManagerOptions {
        ack_timeout: Duration::from_secs(120),
        join_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let config = VcpuConfig::with_counts(n, n)?;
    let (vm, mut vcpus) = vmm_core::build_vm(kvm()?, VmOptions::default(), config, options)?;
    let entry = Arc::new(load_program(vm.memory(), &guest::smp_counter().program())?);
    let t = Instant::now();
    vcpus.create_boot_vcpus(entry)?;
    let create = t.elapsed();
    vcpus.start_boot_vcpus()?;
    let startup = t.elapsed();
    let g = GuestVm {
        vm,
        vcpus,
        reports: Arc::new(guest::CpuidReports::new()),
    };
    // Let the BSP wake everyone (the reports go nowhere: no device is registered here).
    wait_all_counting(&g)?;
    let mut samples = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t = Instant::now();
        g.vcpus.pause_all()?;
        let pause = t.elapsed();
        let t = Instant::now();
        g.vcpus.resume_all()?;
        samples.push(PauseResume {
            pause,
            resume: t.elapsed(),
        });
    }
    let mut g = g;
    g.vcpus.exit_all()?;
    Ok(ManagerSamples {
        startup,
        create,
        rounds: samples,
    })
}

fn wait_all_counting(g: &GuestVm) -> Result<(), IntegrationError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while g.counters().contains(&0) {
        if Instant::now() > deadline {
            return Err(IntegrationError::Guest(format!(
                "not every vCPU started counting within 120 s: {:?}",
                g.counters()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The bare kick signal: `SIGRTMIN + 3` (the vCPU actors use `SIGRTMIN + 0`).
const BARE_KICK_OFFSET: i32 = 3;

extern "C" fn bare_kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _unused: *mut libc::c_void,
) {
}

enum Cmd {
    Run,
    Exit,
}

struct BareThread {
    pthread: libc::pthread_t,
    /// The vCPU's `kvm_run` mapping (lives as long as the fd, which the thread owns until it
    /// is joined).
    run: *mut kvm_run,
    cmd: Sender<Cmd>,
    join: JoinHandle<VcpuFd>,
}

/// N threads, each running one vCPU at CPL 3 until kicked, then blocking until told to run.
struct BareVcpus {
    _vm: Vm,
    threads: Vec<BareThread>,
    acks: Receiver<u32>,
    signal: libc::c_int,
}

impl BareVcpus {
    fn new(n: u32) -> Result<Self, IntegrationError> {
        let signal = vmm_sys_util::signal::SIGRTMIN() + BARE_KICK_OFFSET;
        static INSTALL: Once = Once::new();
        let mut installed = Ok(());
        INSTALL.call_once(|| {
            installed = vmm_sys_util::signal::register_signal_handler(signal, bare_kick_handler)
                .map_err(|e| IntegrationError::Guest(format!("signal handler: {e}")));
        });
        installed?;
        let kvm = kvm()?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| IntegrationError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let vm = Vm::new(kvm, VmOptions::default())?;
        let entry = load_program(vm.memory(), &guest::spin().program())?;
        let (ack_tx, acks) = channel();
        let mut threads = Vec::with_capacity(n as usize);
        for id in 0..n {
            let kvm_err = |op| move |source| IntegrationError::Kvm { op, source };
            let mut fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            // Every vCPU starts in the spin loop, from the same registers (it uses no stack).
            entry.setup_bsp(&fd, vm.memory())?;
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            let run: *mut kvm_run = fd.get_kvm_run();
            let (cmd, cmd_rx) = channel();
            let ack = ack_tx.clone();
            let join = std::thread::Builder::new()
                .name(format!("bare{id}"))
                .spawn(move || bare_thread(fd, id, cmd_rx, ack))
                .map_err(|e| IntegrationError::Guest(format!("spawn: {e}")))?;
            threads.push(BareThread {
                pthread: join.as_pthread_t(),
                run,
                cmd,
                join,
            });
        }
        Ok(Self {
            _vm: vm,
            threads,
            acks,
            signal,
        })
    }

    fn wait_acks(&self, n: usize) -> Result<(), IntegrationError> {
        for _ in 0..n {
            self.acks
                .recv_timeout(Duration::from_secs(120))
                .map_err(|e| IntegrationError::Guest(format!("bare vCPU ack: {e}")))?;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), IntegrationError> {
        for t in &self.threads {
            t.cmd
                .send(Cmd::Run)
                .map_err(|_| IntegrationError::Guest("a bare vCPU thread ended".into()))?;
        }
        self.wait_acks(self.threads.len())
    }

    fn pause(&self) -> Result<(), IntegrationError> {
        for t in &self.threads {
            // SAFETY: `run` is the live kvm_run mapping of a vCPU fd owned by a thread that
            // has not been joined; immediate_exit is a plain byte KVM reads on entry.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*t.run).immediate_exit), 1) };
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.pthread, self.signal) };
        }
        self.wait_acks(self.threads.len())
    }

    fn exit(self) {
        for t in &self.threads {
            let _ = t.cmd.send(Cmd::Exit);
        }
        for t in self.threads {
            let _ = t.join.join();
        }
    }
}

fn bare_thread(mut fd: VcpuFd, id: u32, cmd: Receiver<Cmd>, ack: Sender<u32>) -> VcpuFd {
    while let Ok(Cmd::Run) = cmd.recv() {
        fd.set_kvm_immediate_exit(0);
        let _ = ack.send(id);
        loop {
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let _ = ack.send(id);
    }
    fd
}

/// The bare side for `n` vCPUs: `rounds` (pause, resume) pairs.
pub fn bare_pause_resume(n: u32, rounds: u32) -> Result<Vec<PauseResume>, IntegrationError> {
    let bare = BareVcpus::new(n)?;
    bare.resume()?;
    let mut samples = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t = Instant::now();
        bare.pause()?;
        let pause = t.elapsed();
        let t = Instant::now();
        bare.resume()?;
        samples.push(PauseResume {
            pause,
            resume: t.elapsed(),
        });
    }
    bare.pause()?;
    bare.exit();
    Ok(samples)
}

/// One row: both sides for `n` vCPUs.
pub fn bench_vcpus(n: u32, rounds: u32) -> Result<BenchRow, IntegrationError> {
    let startup_bare = bare_startup(n)?;
    let manager = manager_run(n, rounds)?;
    let bare = bare_pause_resume(n, rounds)?;
    Ok(BenchRow {
        vcpus: n,
        startup_manager: manager.startup,
        create_manager: manager.create,
        startup_bare,
        pause_manager: median(manager.rounds.iter().map(|s| s.pause).collect()),
        pause_bare: median(bare.iter().map(|s| s.pause).collect()),
        resume_manager: median(manager.rounds.iter().map(|s| s.resume).collect()),
        resume_bare: median(bare.iter().map(|s| s.resume).collect()),
    })
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The table the benchmark prints: milliseconds and manager/bare ratios.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "    N | startup mgr ms (create) | bare ms | ratio | pause mgr ms | bare ms | ratio \
         | resume mgr ms | bare ms | ratio\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{:>5} | {:>9.3} ({:>9.3}) | {:>7.3} | {:>5.2} | {:>12.3} | {:>7.3} | {:>5.2} \
             | {:>13.3} | {:>7.3} | {:>5.2}\n",
            r.vcpus,
            ms(r.startup_manager),
            ms(r.create_manager),
            ms(r.startup_bare),
            ratio(r.startup_manager, r.startup_bare),
            ms(r.pause_manager),
            ms(r.pause_bare),
            ratio(r.pause_manager, r.pause_bare),
            ms(r.resume_manager),
            ms(r.resume_bare),
            ratio(r.resume_manager, r.resume_bare),
        ));
    }
    s
}
