//! What goes into the core and what comes out: [`Input`]s, [`Action`]s,
//! and the typed values they carry — a parsed [`Notice`], a caller's
//! [`Outcome`], an [`Upstream`] notification, a log [`Event`]. Nothing here
//! is text: the shell renders it (`render`).

use std::time::Duration;

use super::eligibility::Busy;
use crate::supervisor::Failure;
use crate::supervisor::failure::{Exit, StartFailure, WatchdogCause};
use crate::supervisor::phase::Trigger;

/// A caller waiting for an outcome, named by the shell (which keeps its
/// reply channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(in crate::supervisor) struct Token(pub(in crate::supervisor) u64);

/// Fds a datagram brought (`FDSTORE=1`), named by the shell (which holds
/// them) until an action consumes them: each handle is consumed by exactly
/// one [`Action::StoreFds`] or [`Action::PushConnections`], or by
/// [`Action::CloseFds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(in crate::supervisor) struct FdsHandle(pub(in crate::supervisor) u64);

/// Which socket of each steered pair (two sockets per address in one
/// `SO_REUSEPORT` group, see `crate::steering`) a generation accepts from.
/// A new generation gets the slot the serving one does not have, so the
/// two can be told apart by steering; without steering, both accept from
/// the same sockets and the slot changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(in crate::supervisor) enum Slot {
    #[default]
    A,
    B,
}

impl Slot {
    /// The other one.
    pub(in crate::supervisor) fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Why the serving generation stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Lost {
    /// It ended on its own.
    Crashed,
    /// The watchdog fired (it was sent SIGABRT).
    Hung,
    /// It sent `STOPPING=1`.
    Stopping,
}

/// What a notify datagram says, once attributed to a generation and parsed
/// (the shell has already handled `BARRIER=1`, `MAINPID=` and
/// `MAINPIDFD=1`, which need the system).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(in crate::supervisor) struct Notice {
    /// `STATUS=`.
    pub(in crate::supervisor) status: Option<String>,
    /// `WATCHDOG=1`, `WATCHDOG_USEC=` and `EXTEND_TIMEOUT_USEC=`, in the
    /// order sent.
    pub(in crate::supervisor) timing: Vec<Timing>,
    /// `WATCHDOG=trigger`.
    pub(in crate::supervisor) watchdog_trigger: bool,
    /// `FDSTORE=1` or `FDSTORE_REMOVE=1`.
    pub(in crate::supervisor) fdstore: Option<FdStore>,
    /// `READY=1` or `STOPPING=1` (`RELOADING=1` changes nothing here).
    pub(in crate::supervisor) lifecycle: Option<Said>,
}

/// A timing field of a [`Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Timing {
    Ping,
    WatchdogUsec(u64),
    ExtendUsec(u64),
}

/// The fd-store part of a [`Notice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::supervisor) enum FdStore {
    /// `FDSTORE=1` with fds (`FDNAME=`, default `stored`); `poll`: not
    /// `FDPOLL=0`.
    Store { name: String, fds: FdsHandle, poll: bool },
    /// `FDSTORE_REMOVE=1` with `FDNAME=`.
    Remove { name: String },
}

/// `READY=1` or `STOPPING=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Said {
    Ready,
    Stopping,
}

/// What happened.
#[derive(Debug)]
pub(in crate::supervisor) enum Input {
    /// `baton restart` (with its caller, if it waits) or SIGHUP.
    RestartRequested { waiter: Option<Token> },
    /// `baton stop` (with its caller), SIGTERM or SIGINT.
    StopRequested { waiter: Option<Token> },
    /// Generation `generation` runs on `slot`'s sockets, led by `leader`
    /// (after [`Action::Spawn`]).
    Spawned { generation: u64, leader: u32, slot: Slot },
    /// It could not be spawned.
    SpawnFailed { generation: u64, why: String },
    /// Its health check runs as `pid` (after [`Action::RunHealthCheck`]).
    HealthCheckStarted { generation: u64, pid: u32 },
    /// Its health check could not be started.
    HealthCheckNotRun { generation: u64, why: String },
    /// A datagram from generation `generation`'s process.
    Notified { generation: u64, notice: Notice },
    /// A child of Baton's ended (a leader, a health check, or an orphan
    /// reaped as subreaper).
    Exited { pid: u32, exit: Exit },
    /// The output of generation `generation`, which exited while starting,
    /// is complete (after [`Action::AwaitOutput`]).
    OutputComplete { generation: u64 },
    /// Generation `generation` connected to the handoff socket.
    HandoffConnected { generation: u64 },
    /// Moving connections failed for now (the handoff socket was full):
    /// what was not sent is in the store; try again soon.
    HandoffBlocked,
    /// The handoff socket that was full has room again: move the rest now
    /// rather than when the retry timer fires.
    HandoffWritable,
    /// `baton upgrade` was asked.
    UpgradeRequested,
    /// The new binary's probe ended (`ok`: it can take the state).
    UpgradeProbed { ok: bool },
    /// The upgrade did not happen after all (the exec failed, a signal
    /// came): Baton goes on as before.
    UpgradeAbandoned,
    /// A built-in probe of generation `generation` ended (after
    /// [`Action::Probe`]): passed, or failed with the text to report.
    Probed { generation: u64, result: Result<(), String> },
    /// Slot `slot`'s accept queues are empty (after
    /// [`Action::AwaitQueueDrained`]; at once without steering).
    QueueDrained { slot: Slot },
    /// Time passed (a deadline of [`Core::next_deadline`](super::Core::next_deadline) may be due).
    Tick,
}

/// Which signal a generation's process group gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Sig {
    /// `--stop-signal`: drain and exit.
    Stop,
    /// The watchdog's SIGABRT.
    Abort,
    /// SIGKILL.
    Kill,
}

/// An outcome a waiting caller hears (rendered into a control answer by
/// the shell, with what only it knows: the main pid, the output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::supervisor) enum Outcome {
    /// Generation `generation` took over, replacing `replaced`; `proven`:
    /// when it took the traffic, and how long its probation lasted, if it
    /// had one.
    Restarted { generation: u64, ready_ms: u64, replaced: Option<u64>, proven: Option<Proven> },
    /// Generation `generation` did not take over; `serving` still serves.
    RestartFailed { generation: u64, why: StartFailure, serving: Option<u64> },
    /// Baton is stopping (or stopped).
    Stopping,
}

/// How a restart's generation was proven before it took over alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) struct Proven {
    /// Milliseconds from its spawn to the flip (readiness, quiet period,
    /// probes).
    pub(in crate::supervisor) flip_ms: u64,
    /// Milliseconds from the flip to the old generation's retirement.
    pub(in crate::supervisor) probation_ms: u64,
}

/// A notification to the service manager above Baton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::supervisor) enum Upstream {
    /// `RELOADING=1`, `MONOTONIC_USEC=`, `STATUS=starting generation N`.
    Reloading { generation: u64 },
    /// `EXTEND_TIMEOUT_USEC=`: Baton's own start or reload timeout must
    /// not fire before the app's ready timeout does.
    ExtendTimeout { usec: u64 },
    /// `READY=1` and `STATUS=generation N serving as pid P`.
    Serving { generation: u64 },
    /// `READY=1` and the failure as `STATUS=` (a reload always ends with
    /// READY=1, or systemd waits until its timeout).
    StartFailed { generation: u64, why: StartFailure, serving: Option<u64> },
    /// `READY=1` alone: ends an announced reload before `STOPPING=1`
    /// (systemd 252 ignores STOPPING=1 during a reload).
    EndReload,
    /// `STOPPING=1`, `STATUS=stopping`.
    Stopping,
    /// `RESTART_RESET=1`.
    RestartReset,
    /// `FDSTORE_REMOVE=1`, `FDNAME=app/<name>`.
    FdStoreRemove { name: String },
}

/// What the log says (rendered by the shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::supervisor) enum Event {
    Draining {
        generation: u64,
    },
    DrainLimit {
        generation: u64,
    },
    ForcedKill {
        generation: u64,
    },
    Watchdog {
        generation: u64,
        cause: WatchdogCause,
    },
    ExitedStarting {
        generation: u64,
        pid: u32,
        why: StartFailure,
    },
    /// The serving generation ended on its own.
    Crashed {
        generation: u64,
        pid: u32,
        exit: Exit,
    },
    Retired {
        generation: u64,
        pid: u32,
        exit: Exit,
    },
    Reaped {
        pid: u32,
        exit: Exit,
    },
    HealthCheckPassed {
        generation: u64,
    },
    Ready {
        generation: u64,
        ready_ms: u64,
    },
    /// A start failed (its output was kept just before).
    RestartFailed {
        generation: u64,
        why: StartFailure,
    },
    /// A generation sent `STOPPING=1`; `replaced`: a replacement starts.
    StoppingOnItsOwn {
        generation: u64,
        replaced: bool,
    },
    RestartReset {
        generation: u64,
    },
    BackOff {
        delay: Duration,
    },
    StoppingAll,
    /// It is ready; its quiet period (no real traffic) begins.
    Proving {
        generation: u64,
        ready_ms: u64,
    },
    /// It is proven and takes the traffic; the old one stays for
    /// `probation`.
    Flipped {
        generation: u64,
        replaced: Option<u64>,
        probation: Duration,
    },
    /// It failed on probation: the traffic went back to `to`.
    HandedBack {
        generation: u64,
        to: u64,
    },
}

/// What the shell must do, in order.
#[derive(Debug, PartialEq)]
pub(in crate::supervisor) enum Action {
    /// Start generation `generation` on `slot`'s sockets; the outcome
    /// comes back as [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn { generation: u64, trigger: Trigger, slot: Slot },
    /// Send one built-in probe to its probe listener; the result comes
    /// back as [`Input::Probed`].
    Probe { generation: u64 },
    /// Steer every new connection to `to`'s sockets (atomic per address).
    Steer { to: Slot },
    /// Steer `percent` % of new connections to `to`'s sockets, the rest to
    /// the other slot's.
    Canary { to: Slot, percent: u8 },
    /// Say [`Input::QueueDrained`] once `slot`'s listeners have nothing
    /// queued (their generation accepted it all).
    AwaitQueueDrained { slot: Slot },
    /// Take what is queued on `from`'s listeners (its generation failed
    /// after connections were steered to it) and give it to generation
    /// `to`.
    RescueQueued { from: Slot, to: u64 },
    /// Signal the generation's process group.
    Signal { generation: u64, signal: Sig },
    /// Start its health check (`BATON_PID`: its main process); the outcome
    /// comes back as [`Input::HealthCheckStarted`] or
    /// [`Input::HealthCheckNotRun`].
    RunHealthCheck { generation: u64 },
    /// SIGKILL its health check's process group, if it has one.
    KillHealthCheck { generation: u64 },
    /// Its start failed: keep its last output (and `status_text`, its last
    /// `STATUS=`) for the report, which the [`Event::RestartFailed`],
    /// [`Upstream::StartFailed`] and [`Outcome::RestartFailed`] after it
    /// render.
    KeepFailedOutput { generation: u64, status_text: Option<String> },
    /// It exited while starting: say [`Input::OutputComplete`] once its
    /// output is read to the end (the core gives up waiting at a deadline).
    AwaitOutput { generation: u64 },
    /// Nothing more is needed of it: drop its handles.
    Forget { generation: u64 },
    /// Answer these callers.
    Answer { waiters: Vec<Token>, outcome: Outcome },
    /// Tell the service manager.
    Upstream(Upstream),
    /// Keep these fds in the fd store (and forward them upstream).
    StoreFds { fds: FdsHandle, name: String, poll: bool },
    /// Send these connections straight to generation `to`'s handoff
    /// connection (what cannot be sent is stored; then
    /// [`Input::HandoffBlocked`]).
    PushConnections { fds: FdsHandle, name: String, poll: bool, to: u64 },
    /// Close these fds unused.
    CloseFds { fds: FdsHandle },
    /// Remove the store's entries named `name`.
    RemoveStored { name: String },
    /// Move stored connections generation `to` has not seen to it.
    FlushConnections { to: u64 },
    /// Probe the new binary of `baton upgrade`
    /// ([`Input::UpgradeProbed`]).
    ProbeUpgrade,
    /// Refuse the upgrade: Baton is busy.
    RefuseUpgrade(Busy),
    /// Cancel the upgrade being probed: Baton is stopping.
    CancelUpgrade,
    /// The probe passed and nothing is under way: hand over and exec.
    ExecuteUpgrade,
    /// Log this.
    Log(Event),
    /// Crash loop: give up, SIGKILL every generation and health check.
    GiveUp(Failure),
}
