//! Setup shared by the tests that run the client against a guest side over Unix sockets.
//!
//! Each test file uses a subset of these helpers.
#![allow(dead_code, unused_macros)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotplug::guest::{
    CpuAction, CpuCallback, GuestServerOptions, GuestUpcallServer, VsockMuxerStub,
};
use hotplug::protocol::MSG_SIZE;
use hotplug::UPCALL_GUEST_PORT;
use hotplug::{
    BrokenReason, HotplugError, HybridVsockConnector, Phase, UpcallClient, UpcallConfig,
    UpcallState,
};
use tempfile::TempDir;

/// A generous limit that only turns a hang into a failure.
pub const HANG_LIMIT: Duration = Duration::from_secs(30);

/// A logger that drops everything.
pub fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Generous deadlines (a slow CI host is no failure), a quick retry with a budget of 3.
pub fn fast_config() -> UpcallConfig {
    UpcallConfig {
        reply_timeout: Duration::from_secs(10),
        greeting_timeout: Duration::from_secs(10),
        connect_retry_delay: Duration::from_millis(1),
        connect_retry_max_delay: Duration::from_millis(4),
        connect_retry_budget: 3,
        ..UpcallConfig::default()
    }
}

/// [`fast_config`] with a short reply deadline.
pub fn reply_within(ms: u64) -> UpcallConfig {
    UpcallConfig {
        reply_timeout: Duration::from_millis(ms),
        ..fast_config()
    }
}

/// [`fast_config`] with a short greeting deadline.
pub fn greeting_within(ms: u64) -> UpcallConfig {
    UpcallConfig {
        greeting_timeout: Duration::from_millis(ms),
        ..fast_config()
    }
}

/// A client of the hybrid-vsock socket at `socket`, guest port 219.
pub fn client_for(socket: &Path, config: UpcallConfig) -> UpcallClient {
    let connector = HybridVsockConnector::new(socket, UPCALL_GUEST_PORT)
        .with_handshake_timeout(Duration::from_secs(10));
    UpcallClient::new(Box::new(connector), config, logger())
}

/// Asserts that `err` is a timeout during `during`.
#[track_caller]
pub fn assert_timeout(err: &HotplugError, during: Phase) {
    assert!(
        matches!(err, HotplugError::Timeout { during: d, .. } if *d == during),
        "expected a timeout during {during:?}, got {err:?}"
    );
}

/// What the guest was asked to do, in order.
pub type Actions = Arc<Mutex<Vec<CpuAction>>>;

/// A callback that records every action the guest is asked to take and succeeds.
pub fn recording_callback() -> (CpuCallback, Actions) {
    let log = Actions::default();
    let sink = Arc::clone(&log);
    let callback: CpuCallback = Box::new(move |action| {
        sink.lock().unwrap().push(action);
        Ok(())
    });
    (callback, log)
}

/// A guest-side server behind the stand-in muxer, in a temporary directory.
///
/// Fields drop in order: the stub before the directory holding its socket.
pub struct Setup {
    /// `None` once a test shut the muxer down.
    pub muxer: Option<VsockMuxerStub>,
    pub server: GuestUpcallServer,
    pub actions: Actions,
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Setup {
    /// The muxer (a test that took it out must not call this).
    pub fn muxer(&self) -> &VsockMuxerStub {
        self.muxer.as_ref().expect("the muxer is running")
    }
}

/// A guest booted with `boot` whose callback records and succeeds.
pub fn setup(boot: &[u8]) -> Setup {
    let (callback, actions) = recording_callback();
    setup_with(boot, callback, actions)
}

/// A guest booted with `boot` acting through `callback`.
pub fn setup_with(boot: &[u8], callback: CpuCallback, actions: Actions) -> Setup {
    setup_with_options(boot, callback, actions, GuestServerOptions::default())
}

/// A guest booted with `boot` acting through `callback`, with these server options.
pub fn setup_with_options(
    boot: &[u8],
    callback: CpuCallback,
    actions: Actions,
    options: GuestServerOptions,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock");
    let server = GuestUpcallServer::new(boot, callback, options).unwrap();
    let muxer =
        VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server.clone(), logger()).unwrap();
    Setup {
        muxer: Some(muxer),
        server,
        actions,
        socket,
        _dir: dir,
    }
}

/// Speaks to the stub by hand: handshake (asserting `OK`), then `service` if given.
pub fn raw_session(socket: &Path, service: Option<u8>) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    stream.write_all(b"CONNECT 219\n").unwrap();
    let mut ok = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        ok.push(byte[0]);
    }
    assert!(ok.starts_with(b"OK "), "{ok:?}");
    if let Some(service) = service {
        stream.write_all(&[service]).unwrap();
    }
    stream
}

/// A hand-written `ADD_CPU` request of the one APIC ID `id` (version 0x14).
pub fn add_request(id: u8) -> [u8; MSG_SIZE] {
    let mut request = [0u8; MSG_SIZE];
    request[..19].copy_from_slice(&[
        0x00, 0x01, 0x4D, 0x44, 0x02, 0x01, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x14, id,
    ]);
    request
}

/// [`raw_session`] with the service byte `d`, up to and including the greeting.
pub fn greeted_session(socket: &Path) -> UnixStream {
    let mut stream = raw_session(socket, Some(b'd'));
    let mut greeting = [0u8; MSG_SIZE];
    stream.read_exact(&mut greeting).unwrap();
    stream
}

/// Asserts that the peer closed `stream` without sending anything.
#[track_caller]
pub fn assert_closed(mut stream: UnixStream, why: &str) {
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap(), 0, "{why}");
}

/// Asserts that `value` matches `pattern` (an `if` guard allowed), printing it otherwise.
/// The value is borrowed, so it stays usable afterwards.
macro_rules! assert_matches {
    ($value:expr, $($pattern:tt)+) => {{
        let value = &$value;
        assert!(matches!(*value, $($pattern)+), "{value:?}");
    }};
}

/// Asserts that `err` is the `timeout` deadline passing `during` a request whose outcome is
/// therefore unknown, and that it left `client` broken by the timeout.
#[track_caller]
pub fn assert_lost_answer(
    client: &UpcallClient,
    err: &HotplugError,
    during: Phase,
    timeout: Duration,
) {
    assert_matches!(
        *err,
        HotplugError::Timeout { during: d, timeout: t } if d == during && t == timeout
    );
    assert!(err.outcome_unknown(), "{err:?}");
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
}
