//! vCPU hotplug end to end: the upcall client of the VMM talks, through a stand-in vsock
//! muxer, to the guest-side upcall server of `hotplug`, whose callback makes the CPUID probe's
//! BSP wake each new APIC ID with INIT/SIPI (as a patched guest kernel does), and waits until
//! that vCPU has run guest code and reported its APIC ID from CPUID.
//!
//! Offlining: the guest server accepts `DEL_CPU` and the VMM then exits those vCPU threads;
//! the probe's APs have no parking code of their own (a real guest kernel parks them first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotplug::guest::{CpuAction, GuestServerOptions, GuestUpcallServer, VsockMuxerStub, EIO};
use hotplug::{HybridVsockConnector, UpcallClient, UpcallConfig, UPCALL_GUEST_PORT};

use crate::cli::{CliError, Out, ProbeVm, ResizeStep, VmSpec};
use crate::guest::GuestVm;
use crate::probe::wake_ap;
use crate::IntegrationError;

/// How long the guest server's callback waits for a woken vCPU to report.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest side of the upcall channel, alive as long as this value.
pub struct UpcallGuest {
    /// The guest-side server (what a patched guest kernel does).
    pub server: GuestUpcallServer,
    muxer: Option<VsockMuxerStub>,
    path: PathBuf,
}

impl Drop for UpcallGuest {
    fn drop(&mut self) {
        if let Some(m) = self.muxer.take() {
            m.shutdown();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the guest-side upcall server for `guest` (a probe VM) behind a muxer stub on the
/// Unix socket `socket`, and gives the VM's manager an upcall client connected to it.
pub fn attach_upcall(
    guest: &mut GuestVm,
    socket: &Path,
    logger: &slog::Logger,
    reply_timeout: Duration,
) -> Result<UpcallGuest, IntegrationError> {
    let hp = |e: hotplug::HotplugError| IntegrationError::Guest(format!("upcall: {e}"));
    let boot_ids: Vec<u8> = guest
        .vcpus
        .present_vcpus()
        .iter()
        .filter_map(|v| u8::try_from(v.apic_id).ok())
        .collect();
    let vm = guest.vm.clone();
    let reports = guest.reports.clone();
    let callback = Box::new(move |action: CpuAction| -> Result<(), i32> {
        match action {
            CpuAction::Online(apic_id) => {
                reports.forget(u32::from(apic_id));
                wake_ap(vm.memory(), &reports, u32::from(apic_id), ONLINE_TIMEOUT).map_err(|_| EIO)
            }
            CpuAction::Offline(_) => Ok(()),
        }
    });
    let options = GuestServerOptions {
        logger: logger.clone(),
        ..GuestServerOptions::default()
    };
    let server = GuestUpcallServer::new(&boot_ids, callback, options).map_err(hp)?;
    let _ = std::fs::remove_file(socket);
    let muxer = VsockMuxerStub::start(socket, UPCALL_GUEST_PORT, server.clone(), logger.clone())
        .map_err(hp)?;
    let connector = HybridVsockConnector::new(socket, UPCALL_GUEST_PORT);
    let config = UpcallConfig {
        reply_timeout,
        ..UpcallConfig::default()
    };
    let client = UpcallClient::new(Box::new(connector), config, logger.clone());
    client.connect().map_err(hp)?;
    guest.vcpus.set_upcall_client(Arc::new(client));
    Ok(UpcallGuest {
        server,
        muxer: Some(muxer),
        path: socket.to_path_buf(),
    })
}

/// Resizes to the maximum and back to 3 vCPUs over upcall, with latency.
pub fn demo_resize(
    probe: &mut ProbeVm,
    spec: &VmSpec,
    out: &Out,
) -> Result<Vec<ResizeStep>, CliError> {
    let socket = std::env::temp_dir().join(format!("vcpuctl-upcall-{}.sock", std::process::id()));
    let _guest = attach_upcall(
        &mut probe.guest,
        &socket,
        &spec.logger,
        hotplug::UpcallConfig::default()
            .reply_timeout
            .max(ONLINE_TIMEOUT * 2),
    )?;
    let max = spec.smp.max_cpus;
    let mut steps = Vec::new();
    for target in [max, 3.min(max)] {
        let from = probe.guest.vcpus.present_vcpu_count();
        if target == from {
            continue;
        }
        out.line(format!("resize {from} -> {target} vCPUs over upcall..."));
        let t = Instant::now();
        let outcome = probe.guest.vcpus.resize_vcpus(target)?;
        let latency = t.elapsed();
        let present: Vec<u32> = probe
            .guest
            .vcpus
            .present_vcpus()
            .iter()
            .map(|v| v.apic_id)
            .collect();
        out.line(format!(
            "  done in {:.1} ms (vCPU work {:.1} ms, upcall round trip {:.1} ms); present APIC \
             IDs {present:?}",
            latency.as_secs_f64() * 1e3,
            outcome.vcpu_work.as_secs_f64() * 1e3,
            outcome.upcall.as_secs_f64() * 1e3,
        ));
        if !outcome.added.is_empty() {
            let views = probe.views()?;
            let added: Vec<_> = views
                .into_iter()
                .filter(|v| outcome.added.iter().any(|a| a.index == v.index))
                .collect();
            out.line("  the new vCPUs' guest code read:");
            out.line(crate::cli::location_table(&added));
        }
        steps.push(ResizeStep {
            from,
            to: target,
            latency_ms: latency.as_secs_f64() * 1e3,
            present_apic_ids: present,
        });
    }
    Ok(steps)
}

/// One row of the hotplug benchmark.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HotplugBenchRow {
    /// vCPUs added (then removed) at once.
    pub added: u32,
    /// `resize_vcpus(1 + added)`: request until the reply is in, every new vCPU having run
    /// guest code and reported its APIC ID.
    pub add_total: Duration,
    /// The part spent creating, configuring and starting the vCPUs.
    pub add_vcpu_work: Duration,
    /// The part spent in the upcall round trip (the guest waking them).
    pub add_upcall: Duration,
    /// Bare KVM: `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` for as many vCPUs.
    pub bare_create: Duration,
    /// `resize_vcpus(1)` back.
    pub remove_total: Duration,
}

/// Hot-adds `added` vCPUs to a 1-vCPU probe VM (1 socket x `max` cores) and removes them
/// again, next to the bare cost of creating as many KVM vCPUs.
pub fn bench_resize(added: u32, logger: &slog::Logger) -> Result<HotplugBenchRow, CliError> {
    let max = (added + 1).max(2);
    let spec = VmSpec {
        smp: topology::SmpConfig::new(1, max, topology::CpuTopology::new(1, 1, max, 1)?)?,
        vpmu: vpmu::VpmuFeatureLevel::Disabled,
        memory_mib: 64,
        logger: logger.clone(),
    };
    let kvm = crate::cli::open_kvm()?;
    let mut probe = ProbeVm::boot(kvm, &spec, 1)?;
    let socket =
        std::env::temp_dir().join(format!("vcpuctl-bench-{}-{added}.sock", std::process::id()));
    let _guest = attach_upcall(&mut probe.guest, &socket, logger, ONLINE_TIMEOUT * 2)?;
    let add = probe.guest.vcpus.resize_vcpus(1 + added)?;
    let remove = probe.guest.vcpus.resize_vcpus(1)?;
    probe.guest.vcpus.exit_all()?;
    let bare_create = crate::bench::bare_startup(added)?;
    Ok(HotplugBenchRow {
        added,
        add_total: add.total,
        add_vcpu_work: add.vcpu_work,
        add_upcall: add.upcall,
        bare_create,
        remove_total: remove.total,
    })
}

/// The hotplug benchmark's table (milliseconds).
pub fn format_hotplug_table(rows: &[HotplugBenchRow]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut s = String::from(
        "  +N | add ms | vCPU work ms | upcall ms | bare create+CPUID ms | work/bare | remove ms\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{:>4} | {:>6.2} | {:>12.2} | {:>9.2} | {:>20.2} | {:>9.2} | {:>9.2}\n",
            r.added,
            ms(r.add_total),
            ms(r.add_vcpu_work),
            ms(r.add_upcall),
            ms(r.bare_create),
            ms(r.add_vcpu_work) / ms(r.bare_create).max(1e-6),
            ms(r.remove_total),
        ));
    }
    s
}
