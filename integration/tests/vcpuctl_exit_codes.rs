//! `vcpuctl`'s exit codes, as its `--help` documents them: 2 for bad arguments (naming the
//! offending value), 3 when `/dev/kvm` cannot be opened, 4 when the host's KVM lacks what the
//! configuration needs (here: a vPMU on a host whose KVM has no PMU).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use assert_cmd::cargo::CommandCargoExt;

/// `KVM_CAP_PMU_CAPABILITY`: 0 when the host's KVM offers no PMU to guests.
const KVM_CAP_PMU_CAPABILITY: libc::c_ulong = 212;

fn vcpuctl(args: &[&str]) -> Output {
    Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args(args)
        .output()
        .expect("running vcpuctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `vcpuctl args` and asserts that it exits `code` with a message naming `token`.
fn assert_exits_naming(args: &[&str], code: i32, token: &str) {
    let out = vcpuctl(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "vcpuctl {args:?}: {err}");
    assert!(
        err.contains(token),
        "vcpuctl {args:?}: the message does not name `{token}`: {err}"
    );
}

#[test]
fn help_documents_the_exit_codes() {
    let out = vcpuctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for code in [
        "0 success",
        "1 failure",
        "2 bad arguments",
        "3 /dev/kvm",
        "4 this host",
    ] {
        assert!(
            help.contains(code),
            "--help does not document `{code}`:\n{help}"
        );
    }
}

#[test]
fn bad_arguments_exit_2_naming_the_value() {
    for (args, token) in [
        (&["--vpmu", "sometimes"][..], "sometimes"),
        (&["cpuid", "--smp", "12,sockets=two"][..], "two"),
        (
            &["--smp", "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=3"][..],
            "threads",
        ),
        (&["bench", "--vcpus", "1,x"][..], "x"),
    ] {
        assert_exits_naming(args, 2, token);
    }
}

#[test]
fn no_access_to_dev_kvm_exits_3() {
    // Runs vcpuctl as `nobody`: only possible as root, and only meaningful when /dev/kvm is
    // not open to everyone.
    let open_to_all = std::fs::metadata("/dev/kvm").is_ok_and(|m| m.mode() & 0o006 == 0o006);
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    if !root || open_to_all {
        eprintln!(
            "SKIPPED: no_access_to_dev_kvm_exits_3 needs root and a /dev/kvm not open to all \
             (root: {root}, open to all: {open_to_all})"
        );
        return;
    }
    let out = Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args(["cpuid"])
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running vcpuctl as nobody");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("/dev/kvm"), "{}", stderr(&out));
}

#[test]
fn a_vpmu_the_host_lacks_exits_4() {
    let Some(kvm) = integration::kvm_or_skip("a_vpmu_the_host_lacks_exits_4") else {
        return;
    };
    if kvm.check_extension_raw(KVM_CAP_PMU_CAPABILITY) != 0 {
        eprintln!("SKIPPED: a_vpmu_the_host_lacks_exits_4: this host's KVM offers a PMU");
        return;
    }
    for level in ["limited", "full"] {
        assert_exits_naming(&["cpuid", "--vpmu", level], 4, level);
    }
}
