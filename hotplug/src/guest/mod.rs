//! A guest-side upcall server that behaves like the patched guest kernel, and a stand-in for
//! a hybrid-vsock muxer (feature `guest-server`; test and demo equipment, not for runtimes).
//!
//! # What the guest kernel does, and so does [`GuestUpcallServer`]
//!
//! This restates, in our words, the device-manager service of the guest patches that Kata
//! Containers carries for Dragonball (`tools/packaging/kernel/patches/*/dragonball-experimental/`
//! in kata-containers: `db_devmgr_process`, `add_cpu_dev`, `del_cpu_dev`, `db_devmgr_server`).
//! The wire format is in the repository's `docs/upcall-protocol.md`.
//!
//! - **One reply buffer per connection.** Each connection gets a zeroed request and reply
//!   buffer; the greeting is that reply buffer with a `CONNECT` header, and every reply reuses
//!   it without clearing it. A field a reply does not set keeps the value of an earlier reply
//!   on the same connection.
//! - **`ADD_CPU`.** First every listed APIC ID is checked: if one is already present, the
//!   request is refused (`-EINVAL`) and nothing changes. Then the CPUs are handled in the
//!   order listed: each is registered and brought online; the first that fails is
//!   unregistered again and ends the request, **the ones before it stay online**.
//! - **`DEL_CPU`.** Refused up front if `count` is not below the number of present CPUs or if
//!   an APIC ID is unknown; these two refusals write `apic_index` = 0. Then the CPUs are handled
//!   in order: the boot CPU is refused only when the loop reaches it, a CPU that fails to go
//!   offline stays, and the first failure ends the request, **the ones before it stay
//!   offline**.
//! - **Success**: `result` 0, `msg_size` 4, `apic_index` = `count`.
//! - **Failure**: `result` = -errno, `msg_size` 0, and `apic_index` is **not** written (except
//!   for the two `DEL_CPU` checks above): it holds the previous reply's value, so a failed reply
//!   says nothing of how far the request got. A VMM must find out itself which CPUs of a failed
//!   request the guest handled, or send one APIC ID per request.
//! - **No handler for the type** (memory, MMIO, PCI here): `result` -1, `msg_size` 0.
//! - **Bad magic**: only the header is rewritten (right magic, `msg_size` 0, the request's
//!   type); `result` and the payload keep their previous values.
//! - The service byte must be `d` and arrive within 10 s, or the connection is closed.
//!
//! Where the kernel's behaviour is undefined this server picks the refusal the code means:
//! `count` 0 answers success with `apic_index` 0 (the kernel returns an uninitialised
//! result); an APIC ID repeated within a request, or 255, fails with `-EINVAL` when reached; an
//! unknown APIC ID in `DEL_CPU` is refused up front (the kernel asks `cpu_possible(-1)`). The
//! kernel also takes whatever one `recvmsg` returns as a whole request; this server reassembles
//! all 1024 bytes first.
//!
//! # Misbehaviour on demand
//!
//! [`GuestUpcallServer::inject_fault`] queues a [`GuestFault`] (also parsed from the names
//! `vcpuctl chaos` uses: `partial-add:K`, `partial-remove:K`, `silent`, `stray-reply`,
//! `never-read`, `hang-up`, ...). [`GuestUpcallServer::online_apic_ids`] is the guest's own view
//! of its CPUs, to compare with what the VMM believes.
//!
//! [`VsockMuxerStub`] listens on a Unix socket, answers `CONNECT <port>\n` with
//! `OK <host_port>\n` (closing the stream for other ports or while the guest is "not
//! listening") and serves each accepted stream on its own thread.
//!
//! # Layout
//!
//! One file per concern, everything public re-exported here: the faults and their names
//! (`fault.rs`), the kernel's request semantics, i.e. what a request does to the CPUs and which
//! reply fields it writes (`kernel.rs`), the connection handling of
//! [`GuestUpcallServer::serve`] (`server.rs`) and the muxer stand-in (`muxer.rs`).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use slog::{o, Logger};

mod fault;
mod kernel;
mod muxer;
mod server;

pub use fault::{GuestFault, UnknownFault};
pub use muxer::VsockMuxerStub;
pub use server::GuestUpcallServer;

/// `EINVAL`, the errno the guest patches use for refused requests.
pub const EINVAL: i32 = 22;
/// `EIO`, used when a callback reports failure with errno 0, and by injected CPU failures.
pub const EIO: i32 = 5;
/// The result for a message type the guest has no handler for.
pub const UNKNOWN_TYPE_RESULT: i32 = -1;
/// How long the guest waits for the service byte (the patches: 10 s).
pub const DEFAULT_SERVICE_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the guest must do for one CPU of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuAction {
    /// Bring the CPU with this APIC ID online (on x86: INIT/SIPI it and wait until it runs).
    Online(u8),
    /// Take the CPU with this APIC ID offline (park it).
    Offline(u8),
}

impl CpuAction {
    /// The APIC ID acted on.
    pub fn apic_id(&self) -> u8 {
        match self {
            CpuAction::Online(id) | CpuAction::Offline(id) => *id,
        }
    }
}

/// Makes the guest act on one CPU; `Err(errno)` (positive, e.g. 5 for `EIO`) fails the
/// request at that CPU.
pub type CpuCallback = Box<dyn FnMut(CpuAction) -> Result<(), i32> + Send>;

/// Options of a [`GuestUpcallServer`].
#[derive(Debug, Clone)]
pub struct GuestServerOptions {
    /// Where the server logs.
    pub logger: Logger,
    /// How long a new connection has to send the service byte (default 10 s).
    pub service_byte_timeout: Duration,
}

impl Default for GuestServerOptions {
    fn default() -> Self {
        GuestServerOptions {
            logger: Logger::root(slog::Discard, o!()),
            service_byte_timeout: DEFAULT_SERVICE_BYTE_TIMEOUT,
        }
    }
}

/// Locks `m`, taking over a lock whose holder panicked (the guarded state stays consistent:
/// every critical section here is a single update).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
