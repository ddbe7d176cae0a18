//! The upcall channel of an [`AgentVm`]: `hotplug`'s guest-side upcall server (which answers
//! like a patched guest kernel) behind a stand-in hybrid-vsock muxer on a Unix socket, with
//! [`GuestAgent::cpu_callback`] as what the guest does for each CPU, and the VMM's
//! [`UpcallClient`] connected to it and handed to the vCPU manager, so that
//! [`vmm_core::VcpuManager::resize_vcpus`] works end to end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hotplug::guest::{GuestServerOptions, GuestUpcallServer, VsockMuxerStub};
use hotplug::{HotplugError, HybridVsockConnector, UpcallClient, UpcallConfig, UPCALL_GUEST_PORT};
use slog::{o, Logger};

use super::{AgentVm, GuestAgent};
use crate::IntegrationError;

/// How to attach the upcall channel.
#[derive(Clone, Debug)]
pub struct AgentUpcallOptions {
    /// The muxer's Unix socket (must not exist). `None`: a fresh path in the temporary
    /// directory, removed when the [`AgentUpcall`] is dropped.
    pub socket: Option<PathBuf>,
    /// How long the guest agent may take to bring one CPU online or offline.
    pub cpu_timeout: Duration,
    /// The client's reply timeout: enough for the guest to act on every CPU of a request.
    pub reply_timeout: Duration,
    /// Logger for the server, the muxer and the client.
    pub logger: Logger,
    /// `Some(k)`: the guest takes `k` CPUs offline, then fails the next offline with `EIO`
    /// (once), as a kernel that cannot offline a CPU does. The manager sends one APIC ID per
    /// `DEL_CPU` request, so a request-position fault ([`hotplug::guest::GuestFault::FailCpu`]
    /// at position `k > 0`) would never be reached: this counts across requests instead
    /// (`vcpuctl chaos --fault partial-remove:K`).
    pub fail_offline_after: Option<usize>,
}

impl Default for AgentUpcallOptions {
    fn default() -> Self {
        Self {
            socket: None,
            cpu_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(120),
            logger: Logger::root(slog::Discard, o!()),
            fail_offline_after: None,
        }
    }
}

impl AgentUpcallOptions {
    /// The defaults, logging to `logger`.
    pub fn with_logger(logger: Logger) -> Self {
        Self {
            logger,
            ..Self::default()
        }
    }
}

/// The guest side of the channel; it stops (and removes its socket) when dropped.
#[derive(Debug)]
pub struct AgentUpcall {
    /// The guest-side server: what the "guest kernel" knows about its CPUs.
    pub server: GuestUpcallServer,
    /// The client given to the vCPU manager.
    pub client: Arc<UpcallClient>,
    muxer: Option<VsockMuxerStub>,
    socket: PathBuf,
}

impl AgentUpcall {
    /// The muxer's socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The APIC IDs the guest-side server counts online, widened to the manager's `u32`.
    pub fn guest_online_apic_ids(&self) -> Vec<u32> {
        self.server
            .online_apic_ids()
            .into_iter()
            .map(u32::from)
            .collect()
    }
}

impl Drop for AgentUpcall {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(m) = self.muxer.take() {
            m.shutdown();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn upcall_error(e: HotplugError) -> IntegrationError {
    IntegrationError::Guest(format!("upcall channel: {e}"))
}

/// A socket path no other attachment of this process uses.
fn fresh_socket() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vcpuctl-upcall-{}-{n}.sock", std::process::id()))
}

/// Starts the guest-side server for `vm` (its present vCPUs are the guest's boot CPUs, the
/// first being the boot CPU) behind a muxer stub, connects a client to it and gives the client
/// to `vm`'s manager.
pub fn attach_upcall(
    vm: &mut AgentVm,
    options: AgentUpcallOptions,
) -> Result<AgentUpcall, IntegrationError> {
    let boot_ids = vm
        .present_apic_ids()
        .into_iter()
        .map(|id| {
            u8::try_from(id).map_err(|_| {
                IntegrationError::Guest(format!("APIC ID {id} does not fit the upcall protocol"))
            })
        })
        .collect::<Result<Vec<u8>, _>>()?;
    let (server, muxer, client, socket) = connect(&vm.agent, &boot_ids, options)?;
    vm.vcpus.set_upcall_client(Arc::clone(&client));
    Ok(AgentUpcall {
        server,
        client,
        muxer: Some(muxer),
        socket,
    })
}

fn connect(
    agent: &Arc<GuestAgent>,
    boot_ids: &[u8],
    options: AgentUpcallOptions,
) -> Result<
    (
        GuestUpcallServer,
        VsockMuxerStub,
        Arc<UpcallClient>,
        PathBuf,
    ),
    IntegrationError,
> {
    let mut act = agent.cpu_callback(options.cpu_timeout);
    let mut offline_budget = options.fail_offline_after;
    let callback: hotplug::guest::CpuCallback = Box::new(move |action| {
        if let hotplug::guest::CpuAction::Offline(_) = action {
            match offline_budget {
                Some(0) => {
                    offline_budget = None;
                    return Err(hotplug::guest::EIO);
                }
                Some(ref mut left) => *left -= 1,
                None => {}
            }
        }
        act(action)
    });
    let server = GuestUpcallServer::new(
        boot_ids,
        callback,
        GuestServerOptions {
            logger: options.logger.clone(),
            ..GuestServerOptions::default()
        },
    )
    .map_err(upcall_error)?;
    let socket = options.socket.clone().unwrap_or_else(fresh_socket);
    let muxer = VsockMuxerStub::start(
        &socket,
        UPCALL_GUEST_PORT,
        server.clone(),
        options.logger.clone(),
    )
    .map_err(upcall_error)?;
    let client = UpcallClient::new(
        Box::new(HybridVsockConnector::new(&socket, UPCALL_GUEST_PORT)),
        UpcallConfig {
            reply_timeout: options.reply_timeout,
            ..UpcallConfig::default()
        },
        options.logger,
    );
    if let Err(e) = client.connect() {
        muxer.shutdown();
        let _ = std::fs::remove_file(&socket);
        return Err(upcall_error(e));
    }
    Ok((server, muxer, Arc::new(client), socket))
}
