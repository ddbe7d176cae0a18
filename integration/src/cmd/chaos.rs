//! `vcpuctl chaos --fault FAULT [--to N]`: a resize against a misbehaving guest, with another
//! thread pausing and resuming the VM while the resize waits for the guest, then a
//! well-behaved resize back to the boot count. It shows (and the end-to-end tests check) that
//! the vCPU manager holds whatever the guest does:
//!
//! - no success is reported for a request the guest refused or never answered;
//! - the VMM's present vCPUs and the guest's online CPUs agree afterwards, or the error says
//!   the guest's state cannot be known;
//! - `pause_all` and `resume_all` do not wait for the guest;
//! - the next resize works, and every present vCPU runs guest code at the end.
//!
//! The guest is the agent guest ([`crate::guest::agent`]) with `hotplug`'s guest-side upcall
//! server, whose fault hooks ([`GuestFault`]) play the misbehaviour:
//!
//! | FAULT | what the guest does | resize |
//! | --- | --- | --- |
//! | `partial-add:K` | onlines the first K new CPUs, then refuses the next | grow to N (default: max) |
//! | `partial-remove:K` | offlines K CPUs, then refuses the next | grow to max cleanly, then shrink to N (default: the boot count) |
//! | `silent` | reads the request, never answers | grow to N |
//! | `stray-reply` | sends an unsolicited success reply while idle, then refuses the request | grow to N |
//! | `never-read` | stops reading its socket | grow to N |
//! | `hang-up` | closes the connection in the middle of the request | grow to N |
//!
//! The other fault names of [`GuestFault`] (`answer-twice`, `late-reply:MS`, `truncated:BYTES`,
//! `slow-greeting:MS`) are accepted too, with a grow.
//!
//! `partial-remove:K` counts offlined CPUs across requests
//! ([`AgentUpcallOptions::fail_offline_after`]), because the manager sends one APIC ID per
//! `DEL_CPU` request.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hotplug::guest::GuestFault;
use hotplug::CpuOp;
use serde::Serialize;
use vmm_core::{AsyncResizer, ResizeError, VcpuManager};

use super::{
    boot_counting_agent, millis, open_kvm, print_json, CliError, ExitCode, Out, VmSpec,
    GUEST_TIMEOUT,
};
use crate::guest::agent::{attach_upcall, AgentUpcallOptions, AgentVm, GuestAgent};
use crate::IntegrationError;

/// How long the upcall client waits for one reply in a chaos run (a silent guest costs this).
pub const CHAOS_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The fault's name, e.g. `partial-add:2` (see the [module](self) table).
    pub fault: String,
    /// The resize target; `None`: the maximum (grow faults) or the boot count
    /// (`partial-remove`).
    pub to: Option<u32>,
    /// The upcall client's reply timeout.
    pub reply_timeout: Duration,
}

impl ChaosOptions {
    /// `fault`, default target, [`CHAOS_REPLY_TIMEOUT`].
    pub fn new(fault: impl Into<String>) -> Self {
        Self {
            fault: fault.into(),
            to: None,
            reply_timeout: CHAOS_REPLY_TIMEOUT,
        }
    }
}

/// The resize under fault.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosResize {
    /// Whether the manager reported success.
    pub ok: bool,
    /// Its error message, if not.
    pub error: Option<String>,
    /// Whether the error says the guest's state cannot be known.
    pub guest_state_unknown: bool,
}

/// The vCPUs as each side sees them at one moment (APIC IDs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuViews {
    /// The VMM's present vCPUs.
    pub vmm_present: Vec<u32>,
    /// The guest's online CPUs (from the guest side).
    pub guest_online: Vec<u32>,
}

impl CpuViews {
    /// Whether both sides name the same vCPUs.
    pub fn agree(&self) -> bool {
        self.vmm_present == self.guest_online
    }
}

/// The well-behaved resize back to the boot count, afterwards.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosAfter {
    /// Whether it succeeded.
    pub resize_ok: bool,
    /// Both sides' vCPUs afterwards.
    #[serde(flatten)]
    pub cpus: CpuViews,
}

/// What `vcpuctl chaos` reports (these fields are its JSON).
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// The fault injected.
    pub fault: String,
    /// The resize under fault.
    pub resize: ChaosResize,
    /// How long `pause_all` took, called while the resize waited for the guest (the lock
    /// included).
    pub pause_wait_ms: f64,
    /// How long `resume_all` took, right after.
    pub resume_wait_ms: f64,
    /// Both sides' vCPUs after the resize.
    #[serde(flatten)]
    pub cpus: CpuViews,
    /// Both sides agree ([`CpuViews::agree`]), or the error said the guest's state is
    /// unknown.
    pub consistent: bool,
    /// The resize back to the boot count.
    pub after: ChaosAfter,
    /// Every present vCPU's guest progress counter advanced at the end.
    pub running: bool,
    /// Whether the manager behaved (the exit code is 0 then).
    #[serde(skip)]
    pub behaved: bool,
    /// What the manager did wrong, if it did not behave.
    #[serde(skip)]
    pub problems: Vec<String>,
    /// Whether `pause_all` and `resume_all` both returned while the resize still waited for
    /// the guest.
    #[serde(skip)]
    pub paused_during_flight: bool,
}

/// What a fault means for the run.
#[derive(Debug)]
struct Plan {
    /// Injected into the guest-side server (none for `partial-remove`).
    fault: Option<GuestFault>,
    /// For `partial-remove:K`: the guest offlines K, then refuses.
    fail_offline_after: Option<usize>,
    /// Grow to max cleanly first (`partial-remove`).
    grow_first: bool,
    /// The target of the faulty resize.
    to: u32,
    /// Whether the guest refuses (or never answers) the resize for sure.
    must_fail: bool,
    /// Whether the guest stalls the resize until the reply timeout (so it is surely in flight
    /// while the VM is paused).
    stalls: bool,
}

fn plan(name: &str, to: Option<u32>, boot: u32, max: u32) -> Result<Plan, CliError> {
    let fault: GuestFault = name
        .parse()
        .map_err(|e: hotplug::guest::UnknownFault| CliError::usage(e.to_string()))?;
    let check = |to: u32| {
        if (1..=max).contains(&to) {
            Ok(to)
        } else {
            Err(CliError::usage(format!(
                "--to {to}: the target must be in [1, {max}] (maxcpus)"
            )))
        }
    };
    Ok(match fault {
        GuestFault::FailCpu {
            op: CpuOp::Del,
            index,
            ..
        } => {
            let to = check(to.unwrap_or(boot))?;
            Plan {
                fault: None,
                fail_offline_after: Some(index),
                grow_first: true,
                must_fail: index < (max - to) as usize,
                stalls: false,
                to,
            }
        }
        fault => {
            let to = check(to.unwrap_or(max))?;
            if to <= boot {
                return Err(CliError::usage(format!(
                    "--fault {name} grows the VM: --to must be above the boot count {boot}"
                )));
            }
            let must_fail = match &fault {
                GuestFault::FailCpu { index, .. } => *index < (to - boot) as usize,
                GuestFault::Silent
                | GuestFault::StrayReply { .. }
                | GuestFault::NeverRead
                | GuestFault::HangUp
                | GuestFault::TruncatedReply { .. } => true,
                _ => false,
            };
            let stalls = matches!(fault, GuestFault::Silent | GuestFault::NeverRead);
            Plan {
                fault: Some(fault),
                fail_offline_after: None,
                grow_first: false,
                must_fail,
                stalls,
                to,
            }
        }
    })
}

fn lock(m: &Mutex<VcpuManager>) -> MutexGuard<'_, VcpuManager> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn present_ids(m: &Mutex<VcpuManager>) -> Vec<u32> {
    lock(m).present_vcpus().iter().map(|v| v.apic_id).collect()
}

/// Runs one chaos scenario on `kvm` (see the [module](self) docs).
pub fn chaos(
    kvm: kvm_ioctls::Kvm,
    spec: &VmSpec,
    options: &ChaosOptions,
    out: &Out,
) -> Result<ChaosReport, CliError> {
    let boot = spec.smp.boot_cpus;
    let max = spec.smp.max_cpus;
    let plan = plan(&options.fault, options.to, boot, max)?;
    let mut vm = boot_counting_agent(kvm, spec, out)?;
    let upcall = attach_upcall(
        &mut vm,
        AgentUpcallOptions {
            reply_timeout: options.reply_timeout,
            logger: spec.logger.clone(),
            fail_offline_after: plan.fail_offline_after,
            ..AgentUpcallOptions::default()
        },
    )?;
    if plan.grow_first {
        let _p = out.progress(format!("growing to {max} vCPUs (well-behaved guest)"));
        vm.vcpus.resize_vcpus(max)?;
    }
    let AgentVm { vcpus, agent, .. } = vm;
    let manager = Arc::new(Mutex::new(vcpus));
    let cpu_views = || CpuViews {
        vmm_present: present_ids(&manager),
        guest_online: upcall.guest_online_apic_ids(),
    };

    if let Some(fault) = plan.fault.clone() {
        let idle_fault = matches!(fault, GuestFault::StrayReply { .. } | GuestFault::NeverRead);
        let used = upcall.server.faults_used();
        upcall.server.inject_fault(fault);
        // An idle-time fault acts while the connection waits: let it happen first.
        if idle_fault
            && !crate::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
                upcall.server.faults_used() > used
            })
        {
            return Err(IntegrationError::Guest(format!(
                "the guest-side server did not act on {} while idle",
                options.fault
            ))
            .into());
        }
    }

    let from = lock(&manager).present_vcpu_count();
    out.line(format!(
        "resize {from} -> {} vCPUs with the guest fault {}",
        plan.to, options.fault
    ));
    let resizer = AsyncResizer::new(Arc::clone(&manager));
    let handle = resizer.start(plan.to)?;
    // Phase 1 runs under the lock and marks the resize in flight: once the mark is seen (or
    // the resize ended), the resize is waiting for the guest.
    crate::poll_until(GUEST_TIMEOUT, Duration::from_micros(200), || {
        lock(&manager).resize_in_flight().is_some() || resizer.in_flight_target().is_none()
    });
    let in_flight_before = lock(&manager).resize_in_flight().is_some();
    let t = Instant::now();
    let paused = lock(&manager).pause_all();
    let pause_wait = t.elapsed();
    let t = Instant::now();
    let resumed = lock(&manager).resume_all();
    let resume_wait = t.elapsed();
    let in_flight_after = lock(&manager).resize_in_flight().is_some();
    out.line(format!(
        "  pause_all {:.2} ms, resume_all {:.2} ms{}",
        millis(pause_wait),
        millis(resume_wait),
        if in_flight_before && in_flight_after {
            " (the resize was waiting for the guest throughout)"
        } else {
            ""
        }
    ));

    let outcome = {
        let _p = out.progress("waiting for the resize");
        handle.wait_timeout(options.reply_timeout * 4 + GUEST_TIMEOUT)
    };
    let resize = match &outcome {
        Ok(_) => ChaosResize {
            ok: true,
            error: None,
            guest_state_unknown: false,
        },
        Err(e) => ChaosResize {
            ok: false,
            error: Some(e.to_string()),
            guest_state_unknown: matches!(
                e,
                ResizeError::HotplugFailed {
                    guest_state_unknown: true,
                    ..
                }
            ),
        },
    };
    out.line(format!(
        "  resize: {}",
        resize.error.as_deref().unwrap_or("succeeded")
    ));
    let cpus = cpu_views();
    let consistent = cpus.agree() || resize.guest_state_unknown;

    let after_ok = {
        let _p = out.progress(format!("resize back to {boot} vCPUs (well-behaved guest)"));
        VcpuManager::resize_shared(&manager, boot)
    };
    if let Err(e) = &after_ok {
        out.line(format!("  resize back failed: {e}"));
    }
    let after = ChaosAfter {
        resize_ok: after_ok.is_ok(),
        cpus: cpu_views(),
    };
    let running = all_running(&agent, &after.cpus.vmm_present);
    let result = lock(&manager).exit_all();

    let mut problems = Vec::new();
    if plan.must_fail && resize.ok {
        problems.push("the resize reported success for a request the guest refused".into());
    }
    if !consistent {
        problems.push(format!(
            "the VMM's vCPUs {:?} and the guest's {:?} differ, and the error did not say the \
             guest's state is unknown",
            cpus.vmm_present, cpus.guest_online
        ));
    }
    let paused_during_flight = in_flight_before && in_flight_after;
    if let Err(e) = paused.and(resumed) {
        problems.push(format!("pause/resume during the resize failed: {e}"));
    }
    if plan.stalls && !paused_during_flight {
        problems.push("pause_all/resume_all waited for the stalled resize".into());
    }
    if !after.resize_ok {
        problems.push("the resize back to the boot count failed".into());
    }
    if !after.cpus.agree() {
        problems.push(format!(
            "after the resize back, the VMM's vCPUs {:?} and the guest's {:?} differ",
            after.cpus.vmm_present, after.cpus.guest_online
        ));
    }
    if !running {
        problems.push("some present vCPU did not run guest code at the end".into());
    }
    if let Err(e) = result {
        problems.push(format!("exiting the vCPUs failed: {e}"));
    }
    Ok(ChaosReport {
        fault: options.fault.clone(),
        resize,
        pause_wait_ms: millis(pause_wait),
        resume_wait_ms: millis(resume_wait),
        cpus,
        consistent,
        after,
        running,
        behaved: problems.is_empty(),
        problems,
        paused_during_flight,
    })
}

/// Whether the progress counter of every APIC ID in `apic_ids` advances (within
/// [`GUEST_TIMEOUT`]).
fn all_running(agent: &GuestAgent, apic_ids: &[u32]) -> bool {
    let before = agent.progress_of(apic_ids);
    crate::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
        agent
            .progress_of(apic_ids)
            .iter()
            .zip(&before)
            .all(|(now, then)| now > then)
    })
}

/// `vcpuctl chaos`: runs [`chaos`], prints the report, and fails (exit code 1) when the
/// manager misbehaved.
pub fn run(
    spec: &VmSpec,
    out: &Out,
    fault: &str,
    to: Option<u32>,
    json: bool,
) -> Result<(), CliError> {
    let kvm = open_kvm()?;
    let options = ChaosOptions {
        to,
        ..ChaosOptions::new(fault)
    };
    let report = chaos(kvm, spec, &options, out)?;
    if json {
        print_json(&report)?;
    } else {
        out.line(format!(
            "VMM present {:?}, guest online {:?}: {}",
            report.cpus.vmm_present,
            report.cpus.guest_online,
            if report.consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            }
        ));
        out.line(format!(
            "after the resize back: {} (VMM {:?}, guest {:?}); vCPUs running: {}",
            if report.after.resize_ok {
                "ok"
            } else {
                "FAILED"
            },
            report.after.cpus.vmm_present,
            report.after.cpus.guest_online,
            report.running
        ));
    }
    if report.behaved {
        out.line("the manager behaved");
        Ok(())
    } else {
        Err(CliError {
            code: ExitCode::Failure,
            message: format!("the manager misbehaved: {}", report.problems.join("; ")),
        })
    }
}
