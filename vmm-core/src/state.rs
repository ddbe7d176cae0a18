//! The vCPU manager's state machine: what the VM as a whole is doing ([`VmRunState`]), and
//! whether a resize is in flight (an orthogonal flag: a resize runs while the VM is running,
//! and the VM may be paused, resumed or stopped while the resize waits for the guest).
//!
//! # The table
//!
//! Rows are the state an operation finds, columns the operation; a cell is the state after it
//! succeeds, or `refused` (a typed error at once, nothing done).
//!
//! | state \ operation | create vCPUs | `start_*`, `resume_all` | `pause_all` | begin a resize | `exit_all` | stop (`stop_vm`) |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | `Created` | `Created` | `Running` | `Created` | refused (not running) | `Created` | `Stopping` then `Stopped` |
//! | `Running` | `Running` | `Running` | `Paused` | `Running` + resize in flight | `Created` | `Stopping` then `Stopped` |
//! | `Paused` | `Paused` | `Running` | `Paused` | refused (paused) | `Created` | `Stopping` then `Stopped` |
//! | `Stopping` | refused | refused | refused | refused (stopping) | `Stopped` | `Stopping` then `Stopped` |
//! | `Stopped` | refused | refused | refused | refused (stopped) | `Stopped` | `Stopped` |
//!
//! The resize-in-flight flag:
//!
//! - **Set** by the first phase of a resize (under the manager), only from `Running`, and only
//!   if no resize is in flight: a second resize meanwhile is refused
//!   ([`ResizeError::Busy`](crate::ResizeError::Busy)). One resize at a time is this rule, not
//!   a lock held across the guest round trip.
//! - **Does not block anything else.** While it is set, `pause_all`, `resume_all`, `exit_all`
//!   and a stop proceed at once, by the table above; they act on the vCPUs present then,
//!   including the ones the resize has just created.
//! - **Cleared** by the resize's last phase (under the manager), which reconciles with
//!   whatever state it finds: in `Stopping`/`Stopped` (or `Created`, after `exit_all`) every
//!   vCPU has been exited, and the resize reports
//!   [`ResizeError::VmStopped`](crate::ResizeError::VmStopped).
//!
//! `pause_all` and `resume_all` change the state once every request is sent, even when a
//! vCPU did not acknowledge in time: the request stays queued and the vCPU takes it when it
//! leaves its exit handler.

use serde::{Deserialize, Serialize};

use crate::error::HotplugOp;

/// What the VM as a whole is doing, as the vCPU manager sees it (see the
/// [module](crate::state) table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// vCPUs may exist but have not been started (also after `exit_all` without a stop).
    Created,
    /// The vCPUs were started or resumed.
    Running,
    /// `pause_all` was called: no vCPU runs guest code.
    Paused,
    /// A stop is under way (the exit flag is set), some vCPU threads may still be present.
    Stopping,
    /// The VM stopped: every vCPU thread has ended. Nothing runs again.
    Stopped,
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmRunState::Created => "created (not started)",
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::Stopping => "stopping",
            VmRunState::Stopped => "stopped",
        })
    }
}

/// A resize between its first and its last phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ResizeInFlight {
    /// Its target vCPU count.
    pub target: u32,
    /// Adding or removing.
    #[serde(skip)]
    pub op: HotplugOp,
}

/// An operation the state machine rules on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Creating vCPUs (boot vCPUs or one index).
    Create,
    /// Starting vCPUs or resuming them all.
    Run,
    /// Pausing them all.
    Pause,
    /// Every vCPU exited (`exit_all`).
    AllExited,
}

/// Why the state machine refused an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The VM's state does not allow it.
    State(VmRunState),
    /// A resize is in flight (only for beginning another one).
    ResizeInFlight(ResizeInFlight),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::State(VmRunState::Stopping) => {
                f.write_str("the VM is stopping (its exit flag is set)")
            }
            Refusal::State(VmRunState::Stopped) => f.write_str("the VM has stopped"),
            Refusal::State(state) => write!(f, "the VM is {state}"),
            Refusal::ResizeInFlight(r) => {
                write!(f, "a resize to {} vCPUs is in flight", r.target)
            }
        }
    }
}

/// The state machine (kept by the manager behind its own small lock, so that `&self`
/// operations such as `pause_all` can move it).
#[derive(Debug)]
pub(crate) struct ManagerState {
    /// `Created`, `Running` or `Paused`, or `Stopped` once a stop has exited every vCPU.
    /// `Stopping` is not stored: it is the exit flag being set (see [`Self::run_state`]).
    base: VmRunState,
    resize: Option<ResizeInFlight>,
}

impl ManagerState {
    /// A new manager: `Created`, no resize.
    pub(crate) fn new() -> Self {
        Self {
            base: VmRunState::Created,
            resize: None,
        }
    }

    /// The state, given whether the exit flag is set.
    pub(crate) fn run_state(&self, exit_flag: bool) -> VmRunState {
        match (self.base, exit_flag) {
            (VmRunState::Stopped, _) => VmRunState::Stopped,
            (_, true) => VmRunState::Stopping,
            (base, false) => base,
        }
    }

    /// The resize in flight, if any.
    pub(crate) fn resize_in_flight(&self) -> Option<ResizeInFlight> {
        self.resize
    }

    /// Checks `t` against the table without changing anything.
    pub(crate) fn check(&self, t: Transition, exit_flag: bool) -> Result<(), Refusal> {
        match (self.run_state(exit_flag), t) {
            (_, Transition::AllExited) => Ok(()),
            (state @ (VmRunState::Stopping | VmRunState::Stopped), _) => Err(Refusal::State(state)),
            _ => Ok(()),
        }
    }

    /// Applies `t` (after [`check`](Self::check) allowed it).
    pub(crate) fn apply(&mut self, t: Transition, exit_flag: bool) {
        let state = self.run_state(exit_flag);
        self.base = match (state, t) {
            (VmRunState::Stopping | VmRunState::Stopped, Transition::AllExited) => {
                VmRunState::Stopped
            }
            (_, Transition::AllExited) => VmRunState::Created,
            (_, Transition::Run) => VmRunState::Running,
            (VmRunState::Running | VmRunState::Paused, Transition::Pause) => VmRunState::Paused,
            (_, Transition::Pause | Transition::Create) => self.base,
        };
    }

    /// [`check`](Self::check) then [`apply`](Self::apply).
    pub(crate) fn transition(&mut self, t: Transition, exit_flag: bool) -> Result<(), Refusal> {
        self.check(t, exit_flag)?;
        self.apply(t, exit_flag);
        Ok(())
    }

    /// Marks a resize in flight: only while `Running` and no other resize is in flight.
    pub(crate) fn begin_resize(
        &mut self,
        resize: ResizeInFlight,
        exit_flag: bool,
    ) -> Result<(), Refusal> {
        if let Some(other) = self.resize {
            return Err(Refusal::ResizeInFlight(other));
        }
        match self.run_state(exit_flag) {
            VmRunState::Running => {
                self.resize = Some(resize);
                Ok(())
            }
            state => Err(Refusal::State(state)),
        }
    }

    /// Clears the resize-in-flight flag (the resize's last phase, whatever happened).
    pub(crate) fn end_resize(&mut self) {
        self.resize = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Transition; 4] = [
        Transition::Create,
        Transition::Run,
        Transition::Pause,
        Transition::AllExited,
    ];

    fn resize(target: u32) -> ResizeInFlight {
        ResizeInFlight {
            target,
            op: HotplugOp::Add,
        }
    }

    /// The module's table, cell by cell: (state, transition) -> state after, or refused.
    #[test]
    fn transitions_follow_the_table() {
        use VmRunState::*;
        let table: [(VmRunState, [Option<VmRunState>; 4]); 5] = [
            // create, run, pause, all exited
            (
                Created,
                [Some(Created), Some(Running), Some(Created), Some(Created)],
            ),
            (
                Running,
                [Some(Running), Some(Running), Some(Paused), Some(Created)],
            ),
            (
                Paused,
                [Some(Paused), Some(Running), Some(Paused), Some(Created)],
            ),
            (Stopping, [None, None, None, Some(Stopped)]),
            (Stopped, [None, None, None, Some(Stopped)]),
        ];
        for (from, row) in table {
            for (t, want) in ALL.into_iter().zip(row) {
                let (mut s, exit_flag) = reach(from);
                let got = s.transition(t, exit_flag).map(|()| s.run_state(exit_flag));
                match want {
                    Some(to) => assert_eq!(got, Ok(to), "{from:?} {t:?}"),
                    None => assert_eq!(got, Err(Refusal::State(from)), "{from:?} {t:?}"),
                }
            }
        }
    }

    /// A state machine in `state`, and the exit flag that goes with it.
    fn reach(state: VmRunState) -> (ManagerState, bool) {
        let mut s = ManagerState::new();
        let exit_flag = matches!(state, VmRunState::Stopping | VmRunState::Stopped);
        match state {
            VmRunState::Created | VmRunState::Stopping => {}
            VmRunState::Running => s.apply(Transition::Run, false),
            VmRunState::Paused => {
                s.apply(Transition::Run, false);
                s.apply(Transition::Pause, false);
            }
            VmRunState::Stopped => s.apply(Transition::AllExited, true),
        }
        assert_eq!(s.run_state(exit_flag), state);
        (s, exit_flag)
    }

    #[test]
    fn a_resize_begins_only_while_running_and_one_at_a_time() {
        for state in [
            VmRunState::Created,
            VmRunState::Paused,
            VmRunState::Stopping,
            VmRunState::Stopped,
        ] {
            let (mut s, exit_flag) = reach(state);
            assert_eq!(
                s.begin_resize(resize(4), exit_flag),
                Err(Refusal::State(state))
            );
            assert_eq!(s.resize_in_flight(), None);
        }
        let (mut s, _) = reach(VmRunState::Running);
        s.begin_resize(resize(4), false).unwrap();
        assert_eq!(
            s.begin_resize(resize(6), false),
            Err(Refusal::ResizeInFlight(resize(4)))
        );
        // Pause, resume and a stop are not held back by the resize in flight.
        for t in [Transition::Pause, Transition::Run, Transition::AllExited] {
            s.transition(t, false).unwrap();
        }
        assert_eq!(s.resize_in_flight(), Some(resize(4)));
        s.end_resize();
        s.apply(Transition::Run, false);
        s.begin_resize(resize(6), false).unwrap();
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(
            Refusal::State(VmRunState::Paused).to_string(),
            "the VM is paused"
        );
        assert!(Refusal::State(VmRunState::Stopping)
            .to_string()
            .contains("exit flag"));
        assert_eq!(
            Refusal::ResizeInFlight(resize(4)).to_string(),
            "a resize to 4 vCPUs is in flight"
        );
    }
}
