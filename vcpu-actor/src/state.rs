//! The vCPU life-cycle state machine: [`VcpuState`] and its explicit [`transition`] table.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// Where a vCPU actor is in its life cycle.
///
/// ```text
///            Resume               unhandled exit
///   Paused ─────────▶ Running ────────────────────▶ WaitingExit
///     ▲   ◀─────────    │                              │
///     │     Pause       │ Exit                         │ Exit
///     │ Exit            ▼                              ▼
///     └──────────────▶ Exited ◀────────────────────────┘
/// ```
///
/// See [`transition`] for the full table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuState {
    /// Created or paused: the thread blocks on its mailbox, the guest does not run.
    Paused,
    /// The thread is in (or around) `KVM_RUN`, handling exits.
    Running,
    /// The guest hit an exit the actor cannot handle; the exit event was signalled and the
    /// thread waits for `Exit`.
    WaitingExit,
    /// The thread has ended (or is ending) its loop; the vCPU fd can be taken back with `join`.
    Exited,
}

impl VcpuState {
    /// The snake_case name used in logs, JSON and `Display`.
    pub fn as_str(self) -> &'static str {
        match self {
            VcpuState::Paused => "paused",
            VcpuState::Running => "running",
            VcpuState::WaitingExit => "waiting_exit",
            VcpuState::Exited => "exited",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            VcpuState::Paused => 0,
            VcpuState::Running => 1,
            VcpuState::WaitingExit => 2,
            VcpuState::Exited => 3,
        }
    }

    fn from_u8(v: u8) -> VcpuState {
        match v {
            0 => VcpuState::Paused,
            1 => VcpuState::Running,
            2 => VcpuState::WaitingExit,
            _ => VcpuState::Exited,
        }
    }
}

impl fmt::Display for VcpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What drives a state change: a message from the manager or an event inside the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A `Resume` request.
    Resume,
    /// A `Pause` request.
    Pause,
    /// An `Exit` request (or the mailbox closing).
    Exit,
    /// The guest hit an exit the actor cannot handle.
    FatalExit,
    /// A `SaveState` request (it does not change the state).
    SaveState,
    /// A `GetMpState` request (it does not change the state).
    GetMpState,
}

/// The result of applying an [`Event`] to a [`VcpuState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Move to the given state (it may equal the current one for idempotent requests).
    To(VcpuState),
    /// The event is not allowed in this state; the state does not change.
    NotAllowed,
}

/// The explicit transition table of the vCPU state machine.
///
/// | from \ event  | Resume      | Pause       | Exit   | FatalExit   | SaveState   | GetMpState      |
/// |---------------|-------------|-------------|--------|-------------|-------------|-----------------|
/// | Paused        | Running     | Paused (=)  | Exited | NotAllowed  | Paused (=)  | Paused (=)      |
/// | Running       | Running (=) | Paused      | Exited | WaitingExit | NotAllowed  | NotAllowed      |
/// | WaitingExit   | NotAllowed  | NotAllowed  | Exited | NotAllowed  | NotAllowed  | WaitingExit (=) |
/// | Exited        | NotAllowed  | NotAllowed  | Exited | NotAllowed  | NotAllowed  | Exited (=)      |
///
/// `(=)` marks the cases that leave the state as it is. `Exit` is allowed from every state.
/// `SaveState` only while paused: a running vCPU's registers change under the saver.
/// `GetMpState` wherever the thread holds the fd and the guest does not run: paused, waiting
/// to exit, and exited (a request queued before the thread ended is still answered with the
/// fd); not while running, where the guest changes the MP state under the reader (pause
/// first). `GetTid` and `GetState` are answered in every state and do not go through the
/// table.
pub fn transition(from: VcpuState, event: Event) -> Transition {
    use VcpuState::*;
    match (from, event) {
        (_, Event::Exit) => Transition::To(Exited),
        (Paused, Event::Resume) | (Running, Event::Resume) => Transition::To(Running),
        (Paused, Event::Pause) | (Running, Event::Pause) => Transition::To(Paused),
        (Running, Event::FatalExit) => Transition::To(WaitingExit),
        (Paused, Event::SaveState) => Transition::To(Paused),
        (Paused | WaitingExit | Exited, Event::GetMpState) => Transition::To(from),
        (WaitingExit, _)
        | (Exited, _)
        | (Paused, Event::FatalExit)
        | (Running, Event::SaveState | Event::GetMpState) => Transition::NotAllowed,
    }
}

/// A [`VcpuState`] that other threads can read without locks. Loads and stores are SeqCst:
/// the kick protocol (module `kick`) relies on one total order with `immediate_exit`.
#[derive(Debug)]
pub(crate) struct AtomicVcpuState(AtomicU8);

impl AtomicVcpuState {
    pub(crate) fn new(s: VcpuState) -> Self {
        AtomicVcpuState(AtomicU8::new(s.to_u8()))
    }

    pub(crate) fn load(&self) -> VcpuState {
        VcpuState::from_u8(self.0.load(Ordering::SeqCst))
    }

    pub(crate) fn store(&self, s: VcpuState) {
        self.0.store(s.to_u8(), Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [VcpuState; 4] = [
        VcpuState::Paused,
        VcpuState::Running,
        VcpuState::WaitingExit,
        VcpuState::Exited,
    ];

    #[test]
    fn exit_is_allowed_everywhere() {
        for s in ALL {
            assert_eq!(
                transition(s, Event::Exit),
                Transition::To(VcpuState::Exited)
            );
        }
    }

    #[test]
    fn idempotent_pause_and_resume() {
        for (s, e) in [
            (VcpuState::Paused, Event::Pause),
            (VcpuState::Running, Event::Resume),
        ] {
            assert_eq!(transition(s, e), Transition::To(s), "{e:?} in {s:?}");
        }
    }

    #[test]
    fn save_state_only_while_paused() {
        assert_eq!(
            transition(VcpuState::Paused, Event::SaveState),
            Transition::To(VcpuState::Paused)
        );
        for s in [
            VcpuState::Running,
            VcpuState::WaitingExit,
            VcpuState::Exited,
        ] {
            assert_eq!(transition(s, Event::SaveState), Transition::NotAllowed);
        }
    }

    #[test]
    fn mp_state_is_read_wherever_the_guest_does_not_run() {
        for s in [VcpuState::Paused, VcpuState::WaitingExit, VcpuState::Exited] {
            assert_eq!(transition(s, Event::GetMpState), Transition::To(s), "{s:?}");
        }
        assert_eq!(
            transition(VcpuState::Running, Event::GetMpState),
            Transition::NotAllowed
        );
    }

    #[test]
    fn nothing_but_exit_leaves_waiting_exit() {
        for e in [
            Event::Resume,
            Event::Pause,
            Event::FatalExit,
            Event::SaveState,
        ] {
            assert_eq!(
                transition(VcpuState::WaitingExit, e),
                Transition::NotAllowed
            );
            assert_eq!(transition(VcpuState::Exited, e), Transition::NotAllowed);
        }
    }

    #[test]
    fn atomic_round_trip_and_names() {
        let a = AtomicVcpuState::new(VcpuState::Paused);
        for s in ALL {
            a.store(s);
            assert_eq!(a.load(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
        }
    }
}
