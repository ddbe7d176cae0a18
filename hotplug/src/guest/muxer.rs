//! [`VsockMuxerStub`]: a stand-in for a hybrid-vsock muxer with a [`GuestUpcallServer`]
//! behind it.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use slog::{debug, info, o, warn, Logger};

use super::{lock, GuestUpcallServer};
use crate::connector::{read_line_bounded, LineError};
use crate::error::HotplugError;

struct MuxInner {
    path: PathBuf,
    guest_port: u32,
    server: GuestUpcallServer,
    stop: AtomicBool,
    guest_listening: AtomicBool,
    next_host_port: AtomicU32,
    accepted: AtomicU64,
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
    logger: Logger,
}

/// A stand-in for a hybrid-vsock muxer (the Unix socket of a Firecracker-style vsock device)
/// with a [`GuestUpcallServer`] behind it.
///
/// Dropping it (or [`shutdown`](Self::shutdown)) stops listening, removes the socket file and
/// shuts down every open connection (their threads end on their own).
pub struct VsockMuxerStub {
    inner: Arc<MuxInner>,
    /// A second handle on the listening socket, to wake the blocked `accept` on shutdown.
    listener: UnixListener,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VsockMuxerStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxerStub")
            .field("path", &self.inner.path)
            .field("guest_port", &self.inner.guest_port)
            .finish_non_exhaustive()
    }
}

/// How long the stub waits for the `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first host port the stub reports in `OK <port>`.
const FIRST_HOST_PORT: u32 = 1024;

impl VsockMuxerStub {
    /// Listens on `path` (which must not exist) for connections to `guest_port`.
    ///
    /// # Errors
    ///
    /// [`HotplugError::Bind`] when the socket cannot be created (the path exists, the
    /// directory is missing) or the accepting thread cannot start.
    pub fn start(
        path: impl Into<PathBuf>,
        guest_port: u32,
        server: GuestUpcallServer,
        logger: Logger,
    ) -> Result<Self, HotplugError> {
        let path = path.into();
        let listener = UnixListener::bind(&path).map_err(|source| HotplugError::Bind {
            path: path.clone(),
            source,
        })?;
        let logger = logger.new(o!("upcall" => "vsock-stub", "path" => path.display().to_string()));
        let inner = Arc::new(MuxInner {
            path,
            guest_port,
            server,
            stop: AtomicBool::new(false),
            guest_listening: AtomicBool::new(true),
            next_host_port: AtomicU32::new(FIRST_HOST_PORT),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            logger,
        });
        let waker = listener.try_clone().map_err(|source| HotplugError::Bind {
            path: inner.path.clone(),
            source,
        })?;
        let thread_inner = Arc::clone(&inner);
        let accept_thread = std::thread::Builder::new()
            .name("vsock-stub".into())
            .spawn(move || accept_loop(&thread_inner, listener))
            .map_err(|source| HotplugError::Bind {
                path: inner.path.clone(),
                source,
            })?;
        Ok(VsockMuxerStub {
            inner,
            listener: waker,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The server behind the stub.
    pub fn server(&self) -> &GuestUpcallServer {
        &self.inner.server
    }

    /// Whether the guest "listens" on the port: when false, the stub closes every new stream
    /// after reading `CONNECT`, as a real muxer does before the guest's server is up.
    pub fn set_guest_listening(&self, listening: bool) {
        self.inner
            .guest_listening
            .store(listening, Ordering::SeqCst);
    }

    /// How many streams were accepted (answered `OK`).
    pub fn accepted_connections(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Stops listening, removes the socket file and shuts down open connections.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        self.inner.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept (it fails with EINVAL on a shut-down listener), whether or
        // not the socket file still exists; the loop then sees the stop flag.
        // SAFETY: shutdown(2) on a descriptor this struct owns; no memory is involved.
        let rc = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            // Fall back to a connection through the path.
            let _ = UnixStream::connect(&self.inner.path);
        }
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.inner.path);
        self.inner.server.release_stalled();
        for (stream, _thread) in lock(&self.inner.conns).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        info!(self.inner.logger, "vsock stub stopped");
    }
}

impl Drop for VsockMuxerStub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(inner: &Arc<MuxInner>, listener: UnixListener) {
    for stream in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(inner.logger, "accept failed"; "error" => %e);
                // Do not spin on a persistent error (e.g. out of descriptors).
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!(inner.logger, "cannot keep a handle on the stream"; "error" => %e);
                continue;
            }
        };
        let conn_inner = Arc::clone(inner);
        let spawned = std::thread::Builder::new()
            .name("vsock-stub-conn".into())
            .spawn(move || serve_connection(&conn_inner, stream));
        match spawned {
            Ok(handle) => {
                let mut conns = lock(&inner.conns);
                conns.retain(|(_, h)| !h.is_finished());
                conns.push((control, handle));
            }
            Err(e) => warn!(inner.logger, "cannot start a connection thread"; "error" => %e),
        }
    }
}

/// Parses `CONNECT <port>`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Serves one accepted stream, then closes the connection itself: the stub keeps another
/// handle on every stream, so dropping this one would not hang up.
fn serve_connection(inner: &MuxInner, stream: UnixStream) {
    let closer = stream.try_clone();
    handshake_and_serve(inner, stream);
    if let Ok(closer) = closer {
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }
}

fn handshake_and_serve(inner: &MuxInner, mut stream: UnixStream) {
    let log = &inner.logger;
    if stream.set_read_timeout(Some(CONNECT_LINE_TIMEOUT)).is_err() {
        return;
    }
    let line = match read_line_bounded(&mut stream) {
        Ok(line) => line,
        Err(LineError::Eof(_)) => return,
        Err(e) => {
            warn!(log, "bad CONNECT line, closing"; "error" => ?e);
            return;
        }
    };
    let port = parse_connect(line.as_bytes());
    if port != Some(inner.guest_port) {
        info!(log, "CONNECT to a port nobody listens on, closing"; "line" => ?line);
        return;
    }
    if !inner.guest_listening.load(Ordering::SeqCst) {
        info!(log, "guest not listening yet, closing");
        return;
    }
    let host_port = inner.next_host_port.fetch_add(1, Ordering::SeqCst);
    if stream
        .write_all(format!("OK {host_port}\n").as_bytes())
        .is_err()
    {
        return;
    }
    inner.accepted.fetch_add(1, Ordering::SeqCst);
    debug!(log, "connection accepted"; "host_port" => host_port);
    if let Err(e) = inner.server.serve(stream) {
        info!(log, "connection ended"; "error" => %e);
    }
}
