//! What one upcall request costs over a Unix socket: N CPUs in one request against N
//! requests of one CPU each (`add_cpus` vs `add_cpus_one_by_one`), against the guest-side
//! server with a callback that does nothing. This is the protocol's own cost; a real guest
//! adds the time its kernel takes to bring each CPU up or down.
//!
//! Run: `cargo run -p hotplug --example request_cost [ROUNDS]`.

use std::time::{Duration, Instant};

use hotplug::guest::{CpuCallback, GuestServerOptions, GuestUpcallServer, VsockMuxerStub};
use hotplug::{HybridVsockConnector, UpcallClient, UpcallConfig, UPCALL_GUEST_PORT};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(200);
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("vsock.sock");
    let callback: CpuCallback = Box::new(|_| Ok(()));
    let server = GuestUpcallServer::new(&[0], callback, GuestServerOptions::default())?;
    let _muxer = VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server, logger.clone())?;
    let connector = HybridVsockConnector::new(&socket, UPCALL_GUEST_PORT);
    let client = UpcallClient::new(Box::new(connector), UpcallConfig::default(), logger);
    client.connect()?;

    println!("{rounds} rounds of add + remove; time per round trip of the operation");
    println!(
        "{:>5} {:>14} {:>14} {:>8}",
        "CPUs", "batch", "one by one", "ratio"
    );
    for n in [1u8, 2, 4, 8, 16, 32] {
        let ids: Vec<u8> = (1..=n).collect();
        let mut batch = Duration::ZERO;
        let mut single = Duration::ZERO;
        for _ in 0..rounds {
            let t = Instant::now();
            client.add_cpus(&ids, hotplug::DEFAULT_APIC_VERSION)?;
            client.del_cpus(&ids)?;
            batch += t.elapsed();
            let t = Instant::now();
            client.add_cpus_one_by_one(&ids, hotplug::DEFAULT_APIC_VERSION)?;
            client.del_cpus_one_by_one(&ids)?;
            single += t.elapsed();
        }
        let per = |d: Duration| d / (2 * rounds);
        println!(
            "{n:>5} {:>14?} {:>14?} {:>7.1}x",
            per(batch),
            per(single),
            single.as_secs_f64() / batch.as_secs_f64()
        );
    }
    Ok(())
}
