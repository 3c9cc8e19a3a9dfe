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

use super::Ended;
use super::failure::{Exit, StartFailure};
use super::lifecycle::{Life, State};
use super::phase::{Phase, Trigger};
use super::policy::Policy;

mod eligibility;
mod exits;
mod interface;
mod notices;
mod proving;
#[cfg(test)]
mod tests;
mod timers;
mod transaction;

pub(super) use interface::{
    Action, Event, FdStore, FdsHandle, Input, Lost, Notice, Outcome, Proven, Said, Sig, Slot, Timing, Token, Upstream,
};

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
    /// Which socket of each steered pair it accepts from.
    pub(super) slot: Slot,
    /// How far it is proven (see [`proving`]).
    pub(super) proof: Proof,
}

/// How far a generation is proven: readiness, probes, its health command,
/// its quiet period (see [`proving`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Proof {
    /// It is ready (READY=1, its first passing probe, or the timer).
    pub(super) ready: bool,
    /// `--ready after:`: when it is.
    pub(super) ready_after: Option<Instant>,
    /// The end of its quiet period (set at readiness).
    pub(super) quiet_until: Option<Instant>,
    /// Probes passed in a row.
    pub(super) passes: u32,
    /// Probes answered, passed or not.
    pub(super) probes: u32,
    /// The last probe's result: its failure's text.
    pub(super) last_failure: Option<String>,
    /// When its next probe is due (none while one is out, or once it no
    /// longer needs probing).
    pub(super) probe_due: Option<Instant>,
    /// A probe is out ([`Action::Probe`] given, [`Input::Probed`] not yet):
    /// one at a time per generation.
    pub(super) probing: bool,
    /// Its `--health-cmd` passed (or there is none).
    pub(super) cmd_passed: bool,
    /// When it took the traffic while another generation still served
    /// (the start of its probation).
    pub(super) flipped_at: Option<Instant>,
}

impl Gen {
    /// `baton status`'s word for its state.
    pub(super) fn state_name(&self) -> &'static str {
        match self.life.state {
            State::Starting if self.proof.ready => "proving",
            State::Starting => "starting",
            State::HealthCheck { .. } => "health-check",
            State::Probation { retiring: false, .. } => "probation",
            State::Probation { retiring: true, .. } => "taking-over",
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
    /// The generation the shell is spawning ([`Action::Spawn`] given, its
    /// [`Input::Spawned`] or [`Input::SpawnFailed`] not yet): a stop does
    /// not end while it may still appear.
    spawning: Option<u64>,
    /// Where new connections go: the slot steering sends them to, and
    /// whether a canary share goes to the other.
    steered: Slot,
    canary: bool,
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
            spawning: None,
            steered: Slot::A,
            canary: false,
            actions: Vec::new(),
        }
    }

    /// A core adopting the state of the image before `baton upgrade`: its
    /// generations (each active or draining), counters and connection
    /// retry. The image before proved its generations already: an upgrade
    /// is no restart systemd counts, so no `RESTART_RESET=1` is due.
    pub(super) fn adopt(policy: Policy, counters: Counters, gens: Vec<Gen>, flush_retry: Option<Instant>) -> Core {
        // Traffic goes where the serving generation accepts (the image
        // before steered there).
        let steered = gens.iter().find(|g| g.life.state == State::Active).map_or(Slot::A, |g| g.slot);
        Core { gens, flush_retry, restart_reset: RestartReset::Done, steered, ..Core::new(policy, counters) }
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
            Input::Spawned { generation, leader, slot } => self.spawned(now, generation, leader, slot),
            Input::SpawnFailed { generation, why } => self.spawn_failed(now, generation, why),
            Input::HealthCheckStarted { generation, pid } => self.health_check_started(generation, pid),
            Input::HealthCheckNotRun { generation, why } => {
                self.fail_start(now, generation, StartFailure::HealthCheckNotRun(why))
            }
            Input::Notified { generation, notice } => self.notified(now, generation, notice),
            Input::Exited { pid, exit } => self.exited(now, pid, exit),
            Input::OutputComplete { generation } => self.output_complete(now, generation),
            Input::HandoffConnected { generation } => self.handoff_connected(generation),
            Input::HandoffBlocked => self.flush_retry = Some(super::after(now, FLUSH_RETRY)),
            Input::HandoffWritable => {
                if self.flush_retry.take().is_some() {
                    self.flush_connections();
                }
            }
            Input::UpgradeRequested => self.upgrade_requested(),
            Input::UpgradeProbed { ok } => self.upgrade_probed(ok),
            Input::UpgradeAbandoned => self.upgrade = None,
            Input::Probed { generation, result } => self.probed(now, generation, result),
            Input::QueueDrained { slot } => self.queue_drained(now, slot),
            Input::Tick => self.tick(now),
        }
        // What the input changed may prove a candidate, or leave one on
        // probation with nothing left to hand back to.
        self.settle(now);
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

    /// Where new connections go (steering's slot).
    pub(super) fn steered(&self) -> Slot {
        self.steered
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
