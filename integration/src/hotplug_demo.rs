//! vCPU hotplug end to end: the upcall client of the VMM talks, through a stand-in vsock
//! muxer, to the guest-side upcall server of `hotplug`, whose callback makes the CPUID probe's
//! BSP wake each new APIC ID with INIT/SIPI (as a patched guest kernel does), and waits until
//! that vCPU has run guest code and reported its APIC ID from CPUID.
//!
//! Offlining: the guest server accepts `DEL_CPU` and the VMM then exits those vCPU threads;
//! the probe's APs have no parking code of their own (a real guest kernel parks them first).
//! The guest agent ([`crate::agent::attach_upcall`]) does park them; `vcpuctl` uses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hotplug::guest::{CpuAction, GuestServerOptions, GuestUpcallServer, VsockMuxerStub, EIO};
use hotplug::{HybridVsockConnector, UpcallClient, UpcallConfig, UPCALL_GUEST_PORT};

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
