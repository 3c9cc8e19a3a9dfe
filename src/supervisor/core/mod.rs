//! The supervisor's decisions without I/O: the generation table, the
//! restart transaction (spawn → READY=1 → health check → cutover → reply),
//! exits and what they mean, the watchdog, crash accounting and backoff, the
//! crash-loop verdict, stopping, what to do with fds a generation stores,
//! upstream notifications, and when `baton upgrade` may run.
//!
//! [`Core`] takes [`Input`]s — requests, spawn and health-check outcomes,
//! parsed notify datagrams already attributed to a generation, process
//! exits, handoff connections, timers — with the current time as an
//! argument, and returns [`Action`]s for the shell ([`super::Supervisor`])
//! to carry out: spawn generation N, signal or kill a generation's process
//! group, run or kill a health check, answer callers (by [`Token`], with a
//! typed [`Outcome`]), notify upstream ([`Upstream`]), store, remove or pass
//! fds (by [`FdsHandle`]), report [`Event`]s for the log. Its one timer is
//! [`Core::next_deadline`]: the shell sleeps until it and feeds
//! [`Input::Tick`], and asks again after every input (arming a timer is
//! answering that query; there is nothing to cancel).
//!
//! It makes no syscall, reads no clock and knows nothing of tokio: the same
//! inputs at the same times give the same actions, which is what the
//! deterministic simulation (`simulation`, its tests) relies on. One task
//! (the shell's) owns it; nothing is shared.
//!
//! What stays in the shell, because it needs the system: spawning, pidfds
//! and which process `MAINPID=` names (its liveness is a pidfd's), the
//! attribution of a datagram to a generation (the lineage check reads
//! `/proc`; the rule itself is the pure `notify::attribute`), reading the
//! datagram, the fds themselves, output pipes, the upgrade's probe and
//! exec. Text is rendered there too, from the typed outcomes.
//!
//! The concerns: [`transaction`] (the restart, its queue, backoff and the
//! crash-loop verdict), [`exits`] (exits, the watchdog, stopping),
//! [`notices`] (what a datagram changes, stored fds and connections),
//! [`timers`] (deadlines and what falls due), [`eligibility`] (`baton
//! upgrade`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::failure::{Exit, StartFailure, WatchdogCause};
use super::lifecycle::{Life, State};
use super::phase::{Phase, Trigger};
use super::policy::Policy;
use super::{Ended, Failure};

mod eligibility;
mod exits;
mod notices;
#[cfg(test)]
mod tests;
mod timers;
mod transaction;

pub(super) use eligibility::Busy;

/// A caller waiting for an outcome, named by the shell (which keeps its
/// reply channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Token(pub(super) u64);

/// Fds a datagram brought (`FDSTORE=1`), named by the shell (which holds
/// them) until an action consumes them: each handle is consumed by exactly
/// one [`Action::StoreFds`] or [`Action::PushConnections`], or by
/// [`Action::CloseFds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct FdsHandle(pub(super) u64);

/// Why the serving generation stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lost {
    /// It ended on its own.
    Crashed,
    /// The watchdog fired (it was sent SIGABRT).
    Hung,
    /// It sent `STOPPING=1`.
    Stopping,
}

/// A generation as the core keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Gen {
    pub(super) number: u64,
    /// Its leader's pid (Baton's child: its process group).
    pub(super) leader: u32,
    /// Its state and deadlines (see `lifecycle`).
    pub(super) life: Life,
    pub(super) spawned_at: Instant,
    pub(super) ready_at: Option<Instant>,
    /// Its last `STATUS=`.
    pub(super) status_text: Option<String>,
    /// Whether it connected to `$BATON_HANDOFF_SOCKET`.
    pub(super) handoff: bool,
}

impl Gen {
    /// `baton status`'s word for its state.
    pub(super) fn state_name(&self) -> &'static str {
        match self.life.state {
            State::Starting => "starting",
            State::HealthCheck { .. } => "health-check",
            State::Active => "active",
            State::Draining { .. } => "draining",
        }
    }

    /// Its running health check's pid.
    pub(super) fn health_check(&self) -> Option<u32> {
        match self.life.state {
            State::HealthCheck { pid } => Some(pid),
            _ => None,
        }
    }

    /// Milliseconds from its spawn to READY=1 (0 before).
    pub(super) fn ready_ms(&self) -> u64 {
        self.ready_at.map_or(0, |r| r.saturating_duration_since(self.spawned_at).as_millis() as u64)
    }
}

/// What a notify datagram says, once attributed to a generation and parsed
/// (the shell has already handled `BARRIER=1`, `MAINPID=` and
/// `MAINPIDFD=1`, which need the system).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Notice {
    /// `STATUS=`.
    pub(super) status: Option<String>,
    /// `WATCHDOG=1`, `WATCHDOG_USEC=` and `EXTEND_TIMEOUT_USEC=`, in the
    /// order sent.
    pub(super) timing: Vec<Timing>,
    /// `WATCHDOG=trigger`.
    pub(super) watchdog_trigger: bool,
    /// `FDSTORE=1` or `FDSTORE_REMOVE=1`.
    pub(super) fdstore: Option<FdStore>,
    /// `READY=1` or `STOPPING=1` (`RELOADING=1` changes nothing here).
    pub(super) lifecycle: Option<Said>,
}

/// A timing field of a [`Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timing {
    Ping,
    WatchdogUsec(u64),
    ExtendUsec(u64),
}

/// The fd-store part of a [`Notice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FdStore {
    /// `FDSTORE=1` with fds (`FDNAME=`, default `stored`); `poll`: not
    /// `FDPOLL=0`.
    Store { name: String, fds: FdsHandle, poll: bool },
    /// `FDSTORE_REMOVE=1` with `FDNAME=`.
    Remove { name: String },
}

/// `READY=1` or `STOPPING=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Said {
    Ready,
    Stopping,
}

/// What happened.
#[derive(Debug)]
pub(super) enum Input {
    /// `baton restart` (with its caller, if it waits) or SIGHUP.
    RestartRequested { waiter: Option<Token> },
    /// `baton stop` (with its caller), SIGTERM or SIGINT.
    StopRequested { waiter: Option<Token> },
    /// Generation `generation` runs, led by `leader` (after
    /// [`Action::Spawn`]).
    Spawned { generation: u64, leader: u32 },
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
    /// `baton upgrade` was asked.
    UpgradeRequested,
    /// The new binary's probe ended (`ok`: it can take the state).
    UpgradeProbed { ok: bool },
    /// The upgrade did not happen after all (the exec failed, a signal
    /// came): Baton goes on as before.
    UpgradeAbandoned,
    /// Time passed (a deadline of [`Core::next_deadline`] may be due).
    Tick,
}

/// Which signal a generation's process group gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sig {
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
pub(super) enum Outcome {
    /// Generation `generation` took over, replacing `replaced`.
    Restarted { generation: u64, ready_ms: u64, replaced: Option<u64> },
    /// Generation `generation` did not take over; `serving` still serves.
    RestartFailed { generation: u64, why: StartFailure, serving: Option<u64> },
    /// Baton is stopping (or stopped).
    Stopping,
}

/// A notification to the service manager above Baton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Upstream {
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
pub(super) enum Event {
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
}

/// What the shell must do, in order.
#[derive(Debug, PartialEq)]
pub(super) enum Action {
    /// Start generation `generation`; the outcome comes back as
    /// [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn { generation: u64, trigger: Trigger },
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

/// The counters `baton status` shows and the handover carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Counters {
    /// Number of the next generation.
    pub(super) next_number: u64,
    /// Successful restarts (not the first start).
    pub(super) restarts: u64,
    /// Crash replacements begun.
    pub(super) crash_restarts: u64,
    /// Failures in a row (the backoff's exponent).
    pub(super) consecutive_failures: u32,
    /// Recent failures, for the crash-loop verdict.
    pub(super) crashes: VecDeque<Instant>,
}

/// How long a generation must serve, from its cutover, before it has proven
/// healthy and Baton sends `RESTART_RESET=1` (systemd ≥ 258): systemd's
/// restarts of Baton before that (`NRestarts`, which `RestartSteps=` grows
/// the next restart delay by) no longer count. Once per Baton process: its
/// own later restarts of the app are not systemd's.
pub(super) const PROVEN_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How soon to retry moving connections when the handoff socket was full.
pub(super) const FLUSH_RETRY: Duration = Duration::from_millis(50);
/// How long a failed start's report waits for the rest of its output.
pub(super) const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Where `RESTART_RESET=1` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RestartReset {
    /// No generation has cut over yet (or the last one stopped serving
    /// before it was due).
    Waiting,
    /// Generation `generation` cut over; send if it is still the active one
    /// at `at`.
    Due { generation: u64, at: Instant },
    /// Sent (or, after `baton upgrade`, not this image's to send).
    Done,
}

/// A starting generation that exited: its failure is reported once its
/// output has been read to the end, or at `deadline`, so the report has its
/// last lines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingExit {
    generation: u64,
    why: StartFailure,
    status_text: Option<String>,
    deadline: Instant,
}

/// Where `baton upgrade` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// Its new binary is being probed.
    Probing,
    /// Probed; the shell quiesces and executes it.
    Executing,
}

/// See the module docs.
pub(super) struct Core {
    policy: Policy,
    phase: Phase,
    counters: Counters,
    /// The live generations, oldest first.
    gens: Vec<Gen>,
    pending_exit: Option<PendingExit>,
    restart_reset: RestartReset,
    flush_retry: Option<Instant>,
    upgrade: Option<Upgrade>,
    actions: Vec<Action>,
}

impl Core {
    /// A core before the first generation (start it with
    /// [`start`](Self::start)).
    pub(super) fn new(policy: Policy, counters: Counters) -> Core {
        Core {
            policy,
            phase: Phase::Steady,
            counters,
            gens: Vec::new(),
            pending_exit: None,
            restart_reset: RestartReset::Waiting,
            flush_retry: None,
            upgrade: None,
            actions: Vec::new(),
        }
    }

    /// A core adopting the state of the image before `baton upgrade`: its
    /// generations (each active or draining), counters and connection
    /// retry. The image before proved its generations already: an upgrade
    /// is no restart systemd counts, so no `RESTART_RESET=1` is due.
    pub(super) fn adopt(policy: Policy, counters: Counters, gens: Vec<Gen>, flush_retry: Option<Instant>) -> Core {
        Core { gens, flush_retry, restart_reset: RestartReset::Done, ..Core::new(policy, counters) }
    }

    /// The first generation.
    pub(super) fn start(&mut self) -> Vec<Action> {
        self.begin_restart(Trigger::Initial, Vec::new());
        std::mem::take(&mut self.actions)
    }

    /// Handles `input` at `now`.
    pub(super) fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        match input {
            Input::RestartRequested { waiter } => self.request_restart(waiter),
            Input::StopRequested { waiter } => self.begin_stop(now, waiter),
            Input::Spawned { generation, leader } => self.spawned(now, generation, leader),
            Input::SpawnFailed { generation, why } => self.fail_start(now, generation, StartFailure::SpawnFailed(why)),
            Input::HealthCheckStarted { generation, pid } => self.health_check_started(generation, pid),
            Input::HealthCheckNotRun { generation, why } => {
                self.fail_start(now, generation, StartFailure::HealthCheckNotRun(why))
            }
            Input::Notified { generation, notice } => self.notified(now, generation, notice),
            Input::Exited { pid, exit } => self.exited(now, pid, exit),
            Input::OutputComplete { generation } => self.output_complete(now, generation),
            Input::HandoffConnected { generation } => self.handoff_connected(generation),
            Input::HandoffBlocked => self.flush_retry = Some(super::after(now, FLUSH_RETRY)),
            Input::UpgradeRequested => self.upgrade_requested(),
            Input::UpgradeProbed { ok } => self.upgrade_probed(ok),
            Input::UpgradeAbandoned => self.upgrade = None,
            Input::Tick => self.tick(now),
        }
        std::mem::take(&mut self.actions)
    }

    // ---- queries ----------------------------------------------------------

    /// Whether Baton is stopping or stopped: nothing may be spawned.
    pub(super) fn is_stopping(&self) -> bool {
        self.phase.is_stopping()
    }

    /// The restart under way: its generation and trigger.
    pub(super) fn restart(&self) -> Option<(u64, Trigger)> {
        self.phase.restart().map(|r| (r.generation, r.trigger))
    }

    /// The live generations, oldest first.
    pub(super) fn generations(&self) -> &[Gen] {
        &self.gens
    }

    /// Generation `number`, if it lives.
    pub(super) fn generation(&self, number: u64) -> Option<&Gen> {
        self.gens.iter().find(|g| g.number == number)
    }

    /// The serving generation.
    pub(super) fn active(&self) -> Option<&Gen> {
        self.gens.iter().find(|g| g.life.state == State::Active)
    }

    /// The generation whose exit report waits for its output.
    pub(super) fn awaiting_output(&self) -> Option<u64> {
        self.pending_exit.as_ref().map(|p| p.generation)
    }

    /// How the run ended, once it has (the run loop returns it).
    pub(super) fn take_ended(&mut self) -> Option<Ended> {
        self.phase.take_ended()
    }

    /// The counters.
    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// When to retry moving connections, if it is due (the handover
    /// carries it).
    pub(super) fn flush_retry(&self) -> Option<Instant> {
        self.flush_retry
    }

    // ---- helpers shared by the concerns ------------------------------------

    fn index(&self, number: u64) -> Option<usize> {
        self.gens.iter().position(|g| g.number == number)
    }

    fn active_number(&self) -> Option<u64> {
        self.active().map(|g| g.number)
    }

    fn answer(&mut self, waiters: Vec<Token>, outcome: Outcome) {
        if !waiters.is_empty() {
            self.actions.push(Action::Answer { waiters, outcome });
        }
    }

    fn log(&mut self, event: Event) {
        self.actions.push(Action::Log(event));
    }

    fn upstream(&mut self, up: Upstream) {
        self.actions.push(Action::Upstream(up));
    }

    /// When a generation asked to drain now gets SIGKILL.
    fn drain_deadline(&self, now: Instant) -> Instant {
        super::after(now, self.policy.stop_timeout)
    }

    /// Asks generation `i` to drain and exit: `signal` to its process
    /// group (`None` when it said `STOPPING=1` itself), SIGKILL at the stop
    /// deadline. A health check it still had is killed: it cannot take over
    /// any more.
    fn drain(&mut self, now: Instant, i: usize, signal: Option<Sig>) {
        let kill_at = self.drain_deadline(now);
        let g = &mut self.gens[i];
        let generation = g.number;
        if g.health_check().is_some() {
            self.actions.push(Action::KillHealthCheck { generation });
        }
        g.life.drain(kill_at);
        if let Some(signal) = signal {
            self.actions.push(Action::Signal { generation, signal });
        }
    }

    /// SIGKILL to generation `i`; it stays listed until reaped.
    fn force_kill(&mut self, now: Instant, i: usize) {
        let g = &mut self.gens[i];
        g.life.killed(now);
        let generation = g.number;
        self.actions.push(Action::Signal { generation, signal: Sig::Kill });
    }

    /// Kills the oldest draining generations beyond `--max-draining`: after
    /// every drain but a stop's (which drains them all, each with its full
    /// stop timeout). Found by the simulation: it used to run at cutovers
    /// only, so a failed start, a watchdog or a `STOPPING=1` could leave
    /// more draining until the next cutover, or for good if none came.
    fn enforce_draining_limit(&mut self, now: Instant) {
        let beyond =
            super::lifecycle::over_draining_limit(self.gens.iter().map(|g| &g.life.state), self.policy.max_draining);
        for i in beyond {
            let generation = self.gens[i].number;
            self.log(Event::DrainLimit { generation });
            self.force_kill(now, i);
        }
    }
}
