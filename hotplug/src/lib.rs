//! Upcall client for vCPU hot-add and hot-remove without ACPI (and, with feature
//! `guest-server`, a guest-side server that behaves like the patched guest kernel).
//!
//! This crate owns the upcall wire format ([`protocol`]: 1024-byte messages, strict decoding
//! that never panics or allocates on what a guest sends), the connection ([`UpcallConnector`],
//! with [`HybridVsockConnector`] for Firecracker / Cloud Hypervisor style vsock muxers) and
//! [`UpcallClient`], a state machine with one request in flight, a deadline on every write and
//! every reply, strict matching of replies to requests (bytes that arrive between requests are
//! never taken as an answer) and reconnection with backoff and a budget. The wire protocol is
//! described in the repository's `docs/upcall-protocol.md`.
//!
//! The VMM creates the vCPUs (threads waiting for INIT/SIPI) before [`UpcallClient::add_cpus`]
//! and stops them only after [`UpcallClient::del_cpus`] succeeded. A guest that fails part-way
//! through a request of several CPUs keeps the ones it already handled and does not say which:
//! [`UpcallClient::add_cpus_one_by_one`] and [`UpcallClient::del_cpus_one_by_one`] send one
//! APIC ID per request so that the outcome is exact ([`StepwiseError`]).
//!
//! ```
//! use hotplug::guest::{CpuAction, GuestServerOptions, GuestUpcallServer, VsockMuxerStub};
//! use hotplug::{HybridVsockConnector, UpcallClient, UpcallConfig, UpcallState};
//! use hotplug::{DEFAULT_APIC_VERSION, UPCALL_GUEST_PORT};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let logger = slog::Logger::root(slog::Discard, slog::o!());
//! let dir = tempfile::tempdir()?;
//! let socket = dir.path().join("vsock.sock");
//!
//! // Stand-in for the guest: boot CPU APIC ID 0; a real VMM has a guest kernel here.
//! let server = GuestUpcallServer::new(
//!     &[0],
//!     Box::new(|action: CpuAction| {
//!         println!("guest: {action:?}");
//!         Ok(())
//!     }),
//!     GuestServerOptions::default(),
//! )?;
//! let _muxer = VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server.clone(), logger.clone())?;
//!
//! // The VMM side.
//! let connector = HybridVsockConnector::new(&socket, UPCALL_GUEST_PORT);
//! let client = UpcallClient::new(Box::new(connector), UpcallConfig::default(), logger);
//! client.connect()?;
//! assert_eq!(client.state(), UpcallState::Ready);
//!
//! let reply = client.add_cpus(&[2, 4], DEFAULT_APIC_VERSION)?;
//! assert_eq!(reply.apic_index, 2);
//! client.del_cpus(&[4])?;
//! assert_eq!(server.present_apic_ids(), vec![0, 2]);
//!
//! // The guest refuses to remove its boot CPU: a typed error with the guest's errno.
//! let err = client.del_cpus(&[0]).unwrap_err();
//! assert_eq!(err.guest_errno(), Some(22));
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod connector;
pub mod error;
#[cfg(feature = "guest-server")]
pub mod guest;
pub mod protocol;

pub use client::{BrokenReason, StepwiseError, UpcallClient, UpcallConfig, UpcallState};
pub use connector::{
    HybridVsockConnector, UpcallConnector, UpcallStream, DEFAULT_HANDSHAKE_TIMEOUT,
    HANDSHAKE_LINE_LIMIT,
};
pub use error::{HotplugError, Operation, Phase};
pub use protocol::{
    decode_cpu_reply, decode_cpu_request, decode_greeting, encode_cpu_request, encode_greeting,
    CpuDevReply, CpuDevRequest, CpuOp, MsgBuf, MsgHeader, MsgType, DEFAULT_APIC_VERSION,
    MSG_MAGIC_VERSION, MSG_SIZE, UPCALL_GUEST_PORT,
};
