//! How the client reaches the guest: the connector trait and the hybrid-vsock connector.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use slog::{debug, o, Logger};

use crate::error::{io_error, HotplugError, Phase};

/// The longest answer line accepted from a vsock muxer (`OK <port>\n` is far shorter).
pub const HANDSHAKE_LINE_LIMIT: usize = 64;

/// The default time a muxer has to answer `CONNECT <port>`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A byte stream to the guest's upcall server, after the transport's own handshake.
pub trait UpcallStream: Read + Write + Send {
    /// Sets the timeout of subsequent reads (`None`: block); the client sets it before every
    /// read so that a silent guest turns into [`HotplugError::Timeout`].
    ///
    /// # Errors
    ///
    /// The transport's error if it cannot set the timeout.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// Sets the timeout of subsequent writes (`None`: block); the client sets it before every
    /// write so that a guest that stops reading its socket turns into
    /// [`HotplugError::Timeout`] instead of blocking the client for good. A write that runs
    /// out of time must fail with [`io::ErrorKind::WouldBlock`] or [`io::ErrorKind::TimedOut`]
    /// (or return the bytes it wrote so far).
    ///
    /// # Errors
    ///
    /// The transport's error if it cannot set the timeout.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// Without blocking, reads what the peer sent that nobody asked for (at most a few bytes;
    /// what is read is gone) and says whether the stream is still idle.
    ///
    /// The client calls it before every request: a reply is only ever taken as the answer to
    /// the request sent just before it, so anything already waiting is a protocol error. The
    /// default implementation does one read with a 1 µs read timeout; override it when the
    /// transport can look without waiting.
    ///
    /// # Errors
    ///
    /// The transport's error other than "nothing to read" (the stream is then unusable).
    fn poll_unsolicited(&mut self) -> io::Result<Unsolicited> {
        self.set_read_timeout(Some(Duration::from_micros(1)))?;
        let mut probe = [0u8; UNSOLICITED_PROBE];
        let result = loop {
            match self.read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        unsolicited_from_read(result)
    }
}

/// The most bytes [`UpcallStream::poll_unsolicited`] reads (enough to know they are there).
pub const UNSOLICITED_PROBE: usize = 16;

/// What an idle stream holds (see [`UpcallStream::poll_unsolicited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unsolicited {
    /// Nothing: the stream is idle, as it should be between requests.
    Nothing,
    /// The peer sent this many bytes (at least; the count is capped) that answer no request.
    Data(usize),
    /// The peer closed the stream.
    Closed,
}

/// Maps the result of a probing read (no data: `WouldBlock` / `TimedOut`).
fn unsolicited_from_read(result: io::Result<usize>) -> io::Result<Unsolicited> {
    match result {
        Ok(0) => Ok(Unsolicited::Closed),
        Ok(n) => Ok(Unsolicited::Data(n)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Unsolicited::Nothing)
        }
        Err(e) => Err(e),
    }
}

impl UpcallStream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }

    fn poll_unsolicited(&mut self) -> io::Result<Unsolicited> {
        self.set_nonblocking(true)?;
        let mut probe = [0u8; UNSOLICITED_PROBE];
        let result = loop {
            match self.read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        // Back to blocking reads and writes (with their timeouts) before anything else.
        self.set_nonblocking(false)?;
        unsolicited_from_read(result)
    }
}

/// Opens streams to the guest's upcall server (port 219), one per connection attempt.
///
/// The client writes the service byte and reads the greeting itself; a connector only does
/// what its transport needs. Return retryable errors (see [`HotplugError::is_retryable`]) when
/// the guest may simply not be listening yet. Closures
/// `FnMut() -> Result<Box<dyn UpcallStream>, HotplugError>` are connectors too.
pub trait UpcallConnector: Send {
    /// Opens one stream.
    ///
    /// # Errors
    ///
    /// Whatever keeps the transport from giving a stream; [`HotplugError::is_retryable`] says
    /// whether the client tries again.
    fn connect(&mut self) -> Result<Box<dyn UpcallStream>, HotplugError>;
}

impl<F> UpcallConnector for F
where
    F: FnMut() -> Result<Box<dyn UpcallStream>, HotplugError> + Send,
{
    fn connect(&mut self) -> Result<Box<dyn UpcallStream>, HotplugError> {
        self()
    }
}

/// A line of at most [`HANDSHAKE_LINE_LIMIT`] bytes, without its newline, on the stack.
#[derive(Clone, Copy)]
pub struct HandshakeLine {
    buf: [u8; HANDSHAKE_LINE_LIMIT],
    len: usize,
}

impl HandshakeLine {
    /// The line's bytes, without the newline.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The line for messages (lossy UTF-8).
    pub fn to_text(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl std::fmt::Debug for HandshakeLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_text())
    }
}

/// How reading a bounded line ended, short of a complete line.
#[derive(Debug)]
pub enum LineError {
    /// The stream ended; this many bytes had come (no newline).
    Eof(HandshakeLine),
    /// [`HANDSHAKE_LINE_LIMIT`] bytes without a newline.
    TooLong,
    /// A read failed (a read timeout shows as `WouldBlock` or `TimedOut`).
    Io(io::Error),
}

/// Reads one `\n`-terminated line of at most [`HANDSHAKE_LINE_LIMIT`] bytes, one byte at a
/// time so that nothing after the newline is consumed.
///
/// # Errors
///
/// [`LineError::Eof`] with the bytes so far when the stream ends first,
/// [`LineError::TooLong`] after [`HANDSHAKE_LINE_LIMIT`] bytes without a newline,
/// [`LineError::Io`] for a failed read (other than `Interrupted`).
pub fn read_line_bounded<R: Read + ?Sized>(reader: &mut R) -> Result<HandshakeLine, LineError> {
    let mut line = HandshakeLine {
        buf: [0u8; HANDSHAKE_LINE_LIMIT],
        len: 0,
    };
    let mut byte = [0u8; 1];
    loop {
        match reader.read(&mut byte) {
            Ok(0) => return Err(LineError::Eof(line)),
            Ok(_) => {
                if byte[0] == b'\n' {
                    return Ok(line);
                }
                if line.len == HANDSHAKE_LINE_LIMIT {
                    return Err(LineError::TooLong);
                }
                line.buf[line.len] = byte[0];
                line.len += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LineError::Io(e)),
        }
    }
}

/// Connects through a Firecracker / Cloud Hypervisor style hybrid vsock: the Unix socket of
/// the VMM's vsock device, then `CONNECT <port>\n`, then an `OK <host_port>\n` answer.
pub struct HybridVsockConnector {
    path: PathBuf,
    guest_port: u32,
    handshake_timeout: Duration,
    logger: Logger,
}

impl std::fmt::Debug for HybridVsockConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridVsockConnector")
            .field("path", &self.path)
            .field("guest_port", &self.guest_port)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl HybridVsockConnector {
    /// A connector for the muxer at `unix_socket_path`, asking for `guest_port`
    /// ([`UPCALL_GUEST_PORT`](crate::UPCALL_GUEST_PORT) for upcall).
    pub fn new(unix_socket_path: impl Into<PathBuf>, guest_port: u32) -> Self {
        HybridVsockConnector {
            path: unix_socket_path.into(),
            guest_port,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            logger: Logger::root(slog::Discard, o!()),
        }
    }

    /// Sets how long the muxer has to answer `CONNECT` (default 5 s; zero is taken as 1 ms).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the logger.
    pub fn with_logger(mut self, logger: Logger) -> Self {
        self.logger = logger.new(o!("vsock" => self.path.display().to_string()));
        self
    }

    /// The muxer's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest port asked for.
    pub fn guest_port(&self) -> u32 {
        self.guest_port
    }

    fn handshake(&self, stream: &mut UnixStream) -> Result<(), HotplugError> {
        let during = Phase::Handshake;
        let timeout = self.handshake_timeout;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|source| HotplugError::Io { during, source })?;
        let request = format!("CONNECT {}\n", self.guest_port);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| io_error(during, 0, timeout, e))?;
        let line = match read_line_bounded(stream) {
            Ok(line) => line,
            Err(LineError::Eof(partial)) if partial.as_bytes().is_empty() => {
                return Err(HotplugError::HandshakeClosed {
                    port: self.guest_port,
                })
            }
            Err(LineError::Eof(partial)) => {
                return Err(HotplugError::HandshakeRejected {
                    port: self.guest_port,
                    reply: partial.to_text(),
                })
            }
            Err(LineError::TooLong) => {
                return Err(HotplugError::HandshakeLineTooLong {
                    limit: HANDSHAKE_LINE_LIMIT,
                })
            }
            Err(LineError::Io(e)) => return Err(io_error(during, 0, timeout, e)),
        };
        if !line.as_bytes().starts_with(b"OK") {
            return Err(HotplugError::HandshakeRejected {
                port: self.guest_port,
                reply: line.to_text(),
            });
        }
        debug!(self.logger, "hybrid vsock connected"; "answer" => line.to_text());
        stream
            .set_read_timeout(None)
            .map_err(|source| HotplugError::Io { during, source })
    }
}

impl UpcallConnector for HybridVsockConnector {
    fn connect(&mut self) -> Result<Box<dyn UpcallStream>, HotplugError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| HotplugError::Connect {
                path: self.path.clone(),
                source,
            })?;
        self.handshake(&mut stream)?;
        Ok(Box::new(stream))
    }
}
