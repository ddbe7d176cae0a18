//! Prints the vCPU manager benchmark table (startup, pause-all, resume-all for N vCPUs, each
//! next to bare KVM). Usage: `cargo run --release -p integration --example vcpu_bench
//! [ROUNDS] [N...]`.

fn main() -> Result<(), integration::IntegrationError> {
    let mut args = std::env::args().skip(1);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let sizes: Vec<u32> = args.filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        integration::bench::DEFAULT_SIZES.to_vec()
    } else {
        sizes
    };
    let mut rows = Vec::new();
    for n in sizes {
        eprintln!("N = {n} ...");
        rows.push(integration::bench::bench_vcpus(n, rounds)?);
    }
    print!("{}", integration::bench::format_table(&rows));
    Ok(())
}
