//! The simulation's world: the shell around the core (it carries out the
//! core's actions: [`super::shell`]) and the outside world (processes,
//! callers, datagrams, time), what it remembers for the invariants
//! ([`super::invariants`]), and the moves it makes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::senders::{Msg, Pids, Sender};
use super::{Choice, Move, Who};
use crate::supervisor::Ended;
use crate::supervisor::core::Slot;
use crate::supervisor::core::{Core, Counters, FdsHandle, Input, Token};
use crate::supervisor::failure::Exit;
use crate::supervisor::lifecycle::State;
use crate::supervisor::policy::{Backoff, HealthProbe, NotifyAccess, Policy, Proving, SteeringMode};

/// `--ready-timeout` and `--stop-timeout` of every run.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// `--watchdog`, for the seeds that have one.
const WATCHDOG: Duration = Duration::from_secs(4);
/// The longest the shell waits for a queue to drain.
pub(super) const QUEUE_WAIT: Duration = Duration::from_secs(1);
/// `--max-draining`.
pub(super) const MAX_DRAINING: usize = 2;
/// How often [`World::advance`] may tick at one instant before a deadline
/// that never clears counts as a wedge.
const TICKS_AT_ONE_INSTANT: u32 = 100;

/// What a waiting caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asked {
    Restart,
    Stop,
}

/// What the world does with the next few actions (set by [`Move::Next`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Choices {
    /// The next spawn fails.
    pub(super) spawn_fails: bool,
    /// The next health check cannot be started.
    pub(super) check_not_run: bool,
    /// Awaited output: complete at once (`None`: later, by
    /// [`Move::Output`]; `Some(false)`: never, the core's deadline ends it).
    pub(super) output_later: Option<bool>,
    /// An upgrade to execute is abandoned (the exec failed) instead.
    pub(super) upgrade_abandoned: bool,
    /// SIGTERM arrives while the shell carries out actions: its
    /// `stop_begun` feeds the stop before the next nested input.
    pub(super) sigterm_in_turn: bool,
}

/// The upstream notifications so far (invariant 6).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct UpstreamLedger {
    /// The generation whose `RELOADING=1` has not been ended yet.
    pub(super) reload_open: Option<u64>,
    pub(super) stopping: bool,
    pub(super) restart_resets: u32,
}

/// The world around the core, and what the invariants need to remember.
pub(super) struct World {
    pub(super) core: Core,
    pub(super) policy: Policy,
    pub(super) base: Instant,
    pub(super) now: Duration,
    /// `--notify-access`.
    pub(super) access: NotifyAccess,
    /// The processes: senders of datagrams, targets of signals.
    pub(super) pids: Pids,
    /// How deep in the shell's nested `feed`s the world is (0: between
    /// turns).
    pub(super) depth: usize,
    /// `ExecuteUpgrade` was decided: executed once the turn ends.
    pub(super) upgrade_due: bool,
    /// Processes sent SIGKILL, not reaped yet: (pid, generation if it is
    /// that generation's leader).
    pub(super) dying: Vec<(u32, Option<u64>)>,
    /// Leaders reaped whose group must still get SIGKILL in this turn
    /// (with what was left of it).
    pub(super) group_pending: BTreeMap<u64, Vec<u32>>,
    pub(super) choices: Choices,
    /// The generation whose output the shell is still reading, after
    /// [`Action::AwaitOutput`](crate::supervisor::core::Action::AwaitOutput).
    pub(super) output_pending: Option<u64>,
    pub(super) probing: bool,
    /// Built-in probes out, oldest first (the shell runs them as tasks).
    pub(super) probes_out: Vec<u64>,
    /// The slot whose accept queue the shell watches for the core.
    pub(super) queue_watched: Option<(Slot, Duration)>,
    /// Where the shell steers new connections.
    pub(super) steered: Slot,
    /// Generations connected to the handoff socket.
    pub(super) handoff: BTreeSet<u64>,
    /// Generations that sent `EXTEND_TIMEOUT_USEC=` (once each).
    pub(super) extended: BTreeSet<u64>,
    pub(super) next_fds: u64,
    /// Fds handed to the core and not yet consumed.
    pub(super) fds_open: BTreeSet<FdsHandle>,
    pub(super) consumed: BTreeSet<FdsHandle>,
    /// Generations the core asked to spawn; those that run (`Spawned`);
    /// those whose leader was reaped; those forgotten; those killed by
    /// the crash-loop verdict.
    pub(super) last_spawned: u64,
    pub(super) spawned: BTreeSet<u64>,
    pub(super) running: BTreeSet<u64>,
    pub(super) reaped: BTreeSet<u64>,
    pub(super) forgotten: BTreeSet<u64>,
    pub(super) given_up: BTreeSet<u64>,
    pub(super) next_token: u64,
    /// Callers waiting: what they asked, when.
    pub(super) waiting: BTreeMap<Token, (Asked, Duration)>,
    pub(super) answered: BTreeSet<Token>,
    pub(super) stop_began: Option<Duration>,
    pub(super) upstream: UpstreamLedger,
    /// Failures the core may count (crashes, watchdogs, failed starts),
    /// for the crash-loop check.
    pub(super) failures: Vec<Duration>,
    /// `BATON_SIM_TRACE=1`: print every input and its actions (to read a
    /// shrunk trace).
    pub(super) trace: bool,
    /// How the run ended, once the core said so (the shell's run loop
    /// returns then: nothing more is fed).
    pub(super) ended: Option<Ended>,
    /// The generation whose failed start's report still waited for its
    /// output when the run ended: moot, never forgotten (the run loop
    /// returns and drops everything).
    pub(super) awaiting_at_end: Option<u64>,
    /// Core inputs fed; upgrades executed; datagrams sent and attributed.
    pub(super) events: u64,
    pub(super) upgrades: u64,
    pub(super) datagrams: u64,
    pub(super) attributed: u64,
}

pub(super) type Violation = String;

impl World {
    pub(super) fn new(access: NotifyAccess, health_check: bool, watchdog: bool, proving: bool) -> World {
        let policy = Policy {
            ready_timeout: READY_TIMEOUT,
            stop_timeout: STOP_TIMEOUT,
            notify_access: access,
            watchdog: watchdog.then_some(WATCHDOG),
            health_cmd: health_check.then(|| "check".into()),
            max_draining: MAX_DRAINING,
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(2),
                burst: 10,
                interval: Duration::from_secs(20),
            },
            proving: match proving {
                true => Proving {
                    probe: Some(HealthProbe::Tcp),
                    interval: Duration::from_millis(200),
                    timeout: Duration::from_secs(1),
                    passes: 2,
                    quiet_period: Duration::from_secs(1),
                    probation: Duration::from_secs(1),
                    steering: SteeringMode::Auto,
                    canary: 10,
                    ..Proving::by_ready_alone()
                },
                false => Proving::by_ready_alone(),
            },
            ..Policy::default()
        };
        World {
            core: Core::new(policy.clone(), Counters { next_number: 1, ..Counters::default() }),
            policy,
            base: Instant::now(),
            now: Duration::ZERO,
            access,
            pids: Pids::new(),
            depth: 0,
            upgrade_due: false,
            dying: Vec::new(),
            group_pending: BTreeMap::new(),
            choices: Choices::default(),
            output_pending: None,
            probing: false,
            probes_out: Vec::new(),
            queue_watched: None,
            steered: Slot::A,
            handoff: BTreeSet::new(),
            extended: BTreeSet::new(),
            next_fds: 0,
            fds_open: BTreeSet::new(),
            consumed: BTreeSet::new(),
            last_spawned: 0,
            spawned: BTreeSet::new(),
            running: BTreeSet::new(),
            reaped: BTreeSet::new(),
            forgotten: BTreeSet::new(),
            given_up: BTreeSet::new(),
            next_token: 0,
            waiting: BTreeMap::new(),
            answered: BTreeSet::new(),
            stop_began: None,
            trace: std::env::var_os("BATON_SIM_TRACE").is_some(),
            ended: None,
            awaiting_at_end: None,
            upstream: UpstreamLedger::default(),
            failures: Vec::new(),
            events: 0,
            upgrades: 0,
            datagrams: 0,
            attributed: 0,
        }
    }

    pub(super) fn has_ended(&self) -> bool {
        self.ended.is_some()
    }

    pub(super) fn at(&self) -> Instant {
        self.base + self.now
    }

    /// The first generation, as `Supervisor::run` starts it.
    pub(super) fn start(&mut self) -> Result<(), Violation> {
        let actions = self.core.start();
        self.events += 1;
        self.depth += 1;
        let applied = self.apply(actions, false);
        self.depth -= 1;
        applied?;
        self.end_turn()
    }

    pub(super) fn token(&mut self, wait: bool, asked: Asked) -> Option<Token> {
        if !wait {
            return None;
        }
        let t = Token(self.next_token);
        self.next_token += 1;
        self.waiting.insert(t, (asked, self.now));
        Some(t)
    }

    /// Feeds `input` and carries out the actions, as the shell's `feed`
    /// does: an action whose outcome is known at once (a spawn, a health
    /// check, complete output) feeds it right there, before the actions
    /// after it. Once the outermost input is carried out, the turn ends.
    pub(super) fn feed(&mut self, input: Input) -> Result<(), Violation> {
        if self.depth > 0
            && !matches!(input, Input::StopRequested { .. })
            && std::mem::take(&mut self.choices.sigterm_in_turn)
        {
            self.feed(Input::StopRequested { waiter: None })?;
        }
        let kind = kind(&input);
        let stopping_before = self.core.is_stopping();
        if self.trace {
            println!("{:?} {}{input:?}", self.now, "  ".repeat(self.depth));
        }
        let actions = self.core.handle(self.at(), input);
        if self.trace {
            println!("{:?} {}-> {actions:?}", self.now, "  ".repeat(self.depth));
        }
        self.events += 1;
        self.depth += 1;
        let applied = self.apply(actions, stopping_before);
        self.depth -= 1;
        applied.map_err(|e| format!("after {kind}: {e}"))?;
        if self.depth == 0 { self.end_turn() } else { Ok(()) }
    }

    /// The end of the shell's turn: the run loop returns if the run ended;
    /// the invariants hold; an upgrade that was decided is executed (at the
    /// top of the run loop, as the shell does).
    fn end_turn(&mut self) -> Result<(), Violation> {
        if let Some(g) = self.group_pending.keys().next() {
            return Err(format!("generation {g}'s leader was reaped but its process group was not killed"));
        }
        if self.ended.is_none() {
            self.awaiting_at_end = self.core.awaiting_output();
            self.ended = self.core.take_ended();
        }
        self.check()?;
        if std::mem::take(&mut self.upgrade_due) && !self.has_ended() {
            self.execute_upgrade()?;
        }
        Ok(())
    }

    /// The first live generation (core's table) in `state`.
    fn in_state(&self, want: fn(&State) -> bool) -> Option<u64> {
        self.core.generations().iter().find(|g| want(&g.life.state)).map(|g| g.number)
    }

    /// The restart's generation, not serving alone yet (on probation it
    /// may still fail the start).
    pub(super) fn starting(&self) -> Option<u64> {
        self.in_state(|s| matches!(s, State::Starting | State::HealthCheck { .. } | State::Probation { .. }))
    }

    pub(super) fn active(&self) -> Option<u64> {
        self.core.active().map(|g| g.number)
    }

    pub(super) fn oldest_draining(&self) -> Option<u64> {
        self.in_state(|s| matches!(s, State::Draining { .. }))
    }

    /// Whether `m` has something to act on now.
    pub(super) fn applies(&self, m: &Move) -> bool {
        match m {
            Move::TakeOver | Move::Ready | Move::FailStart | Move::Extend(_) => self.starting().is_some(),
            Move::Crash | Move::Hang | Move::SelfStop | Move::Ping => self.active().is_some(),
            Move::DrainExit => self.oldest_draining().is_some(),
            Move::HealthCheckExits { .. } => !self.pids.checks.is_empty(),
            Move::Reap => !self.dying.is_empty(),
            Move::Output => self.output_pending.is_some(),
            Move::Probed { .. } => self.probing,
            Move::ProbeAnswer { .. } => !self.probes_out.is_empty(),
            Move::QueueDrains => self.queue_watched.is_some(),
            _ => true,
        }
    }

    /// The oldest probe out ends.
    fn answer_probe(&mut self, ok: bool) -> Result<(), Violation> {
        match self.probes_out.first().copied() {
            Some(g) => self.answer_probe_of(g, ok),
            None => Ok(()),
        }
    }

    /// Generation `g`'s probe ends.
    fn answer_probe_of(&mut self, g: u64, ok: bool) -> Result<(), Violation> {
        self.probes_out.retain(|p| *p != g);
        let result = if ok { Ok(()) } else { Err("TCP probe: not accepted within 1s".into()) };
        self.feed(Input::Probed { generation: g, result })
    }

    /// The watched queue is empty.
    fn queue_drains(&mut self) -> Result<(), Violation> {
        match self.queue_watched.take() {
            Some((slot, _)) => self.feed(Input::QueueDrained { slot }),
            None => Ok(()),
        }
    }

    /// The main process of generation `g` sends `msg`.
    fn main_sends(&mut self, g: Option<u64>, msg: Msg) -> Result<(), Violation> {
        match g.and_then(|g| self.pids.gens.get(&g)).map(|p| p.main_pid()) {
            Some(pid) => self.datagram(pid, msg, false),
            None => Ok(()),
        }
    }

    pub(super) fn step(&mut self, m: Move) -> Result<(), Violation> {
        if self.has_ended() {
            return Ok(());
        }
        match m {
            Move::Restart { wait } => {
                let waiter = self.token(wait, Asked::Restart);
                self.feed(Input::RestartRequested { waiter })?;
            }
            Move::Stop { wait } => {
                let waiter = self.token(wait, Asked::Stop);
                self.feed(Input::StopRequested { waiter })?;
            }
            Move::TakeOver => {
                let g = self.starting();
                if let Some(g) = g
                    && self.probes_out.contains(&g)
                {
                    self.answer_probe_of(g, true)?;
                }
                if g.is_some_and(|g| self.core.generation(g).is_some_and(|g| g.life.state == State::Starting)) {
                    self.main_sends(g, Msg::Ready)?;
                }
                if let Some(g) = g
                    && self.pids.checks.contains_key(&g)
                {
                    self.check_exits(g, true)?;
                }
            }
            Move::Ready => self.main_sends(self.starting(), Msg::Ready)?,
            Move::FailStart => self.exits(Who::Starting, Exit::Code(1))?,
            Move::Crash => self.exits(Who::Active, Exit::Code(1))?,
            Move::DrainExit => self.exits(Who::OldestDraining, Exit::Code(0))?,
            Move::LeaderExits(k) => self.exits(Who::Any(k), Exit::Code(143))?,
            Move::Hang => self.main_sends(self.active(), Msg::Trigger)?,
            Move::SelfStop => self.main_sends(self.active(), Msg::Stopping)?,
            Move::Ping => self.main_sends(self.active(), Msg::Watchdog)?,
            Move::Extend(ms) => self.main_sends(self.starting(), Msg::Extend(ms))?,
            Move::Notify(sender, msg) => {
                let stranger = matches!(sender, Sender::Exited(_) | Sender::Stranger { .. });
                if let Some(pid) = self.pids.pid_of(sender) {
                    self.datagram(pid, msg, stranger)?;
                }
            }
            Move::Fork(k) => {
                if let Some(g) = self.pids.pick(k) {
                    self.pids.fork(g);
                }
            }
            Move::ChildExit(k) => {
                if let Some(g) = self.pids.pick(k) {
                    self.pids.child_exits(g);
                }
            }
            Move::HealthCheckExits { passed } => {
                if let Some(g) = self.pids.checks.keys().next().copied() {
                    self.check_exits(g, passed)?;
                }
            }
            Move::Orphan => {
                let pid = self.pids.fresh_pid();
                self.feed(Input::Exited { pid, exit: Exit::Code(0) })?;
            }
            Move::Handoff(k) => {
                if let Some(g) = self.pids.pick(k)
                    && self.handoff.insert(g)
                {
                    self.feed(Input::HandoffConnected { generation: g })?;
                }
            }
            Move::Blocked => self.feed(Input::HandoffBlocked)?,
            Move::Writable => self.feed(Input::HandoffWritable)?,
            Move::Reap => {
                if !self.dying.is_empty() {
                    let (pid, leader) = self.dying.remove(0);
                    self.reap_killed(pid, leader)?;
                }
            }
            Move::Output => {
                if let Some(generation) = self.output_pending.take() {
                    self.feed(Input::OutputComplete { generation })?;
                }
            }
            Move::Stale(k) => {
                // Late news of a generation that is gone (or never was):
                // its output, or a process it left connecting to the
                // handoff socket.
                let generation = self.last_spawned.saturating_sub(u64::from(k % 3));
                if k % 2 == 1 && !self.pids.gens.contains_key(&generation) {
                    self.feed(Input::HandoffConnected { generation })?;
                } else if self.output_pending != Some(generation) {
                    self.feed(Input::OutputComplete { generation })?;
                }
            }
            Move::Upgrade => self.feed(Input::UpgradeRequested)?,
            Move::Probed { ok } => {
                if std::mem::take(&mut self.probing) {
                    self.feed(Input::UpgradeProbed { ok })?;
                }
            }
            Move::Next(choice) => match choice {
                Choice::SpawnFails => self.choices.spawn_fails = true,
                Choice::CheckNotRun => self.choices.check_not_run = true,
                Choice::OutputNow => self.choices.output_later = None,
                Choice::OutputLater => self.choices.output_later = Some(true),
                Choice::OutputNever => self.choices.output_later = Some(false),
                Choice::UpgradeAbandoned(yes) => self.choices.upgrade_abandoned = yes,
                Choice::SigtermInTurn => self.choices.sigterm_in_turn = true,
            },
            Move::Tick => self.feed(Input::Tick)?,
            Move::ProbeAnswer { ok } => self.answer_probe(ok)?,
            Move::QueueDrains => self.queue_drains()?,
            Move::Advance(ms) => self.advance(self.now + Duration::from_millis(ms))?,
        }
        Ok(())
    }

    /// A generation's leader exits on its own (`exit`).
    fn exits(&mut self, who: Who, exit: Exit) -> Result<(), Violation> {
        let g = match who {
            Who::Starting => self.starting(),
            Who::Active => self.active(),
            Who::OldestDraining => self.oldest_draining(),
            Who::Any(k) => self.pids.pick(k),
        };
        let Some(g) = g else { return Ok(()) };
        // It ended before the SIGKILL it may have been sent.
        self.dying.retain(|(_, leader)| *leader != Some(g));
        self.leader_exits(g, exit)
    }

    /// Generation `g`'s leader ended and is reaped: the shell feeds its
    /// exit; the core must then SIGKILL what is left of its group.
    pub(super) fn leader_exits(&mut self, g: u64, exit: Exit) -> Result<(), Violation> {
        let Some(procs) = self.pids.reaped(g) else { return Ok(()) };
        if !self.reaped.insert(g) {
            return Err(format!("generation {g} reaped twice"));
        }
        self.group_pending.insert(g, procs.descendants);
        self.feed(Input::Exited { pid: procs.leader, exit })
    }

    /// Generation `g`'s health check ends on its own.
    fn check_exits(&mut self, g: u64, passed: bool) -> Result<(), Violation> {
        let Some(pid) = self.pids.take_health_check(g) else { return Ok(()) };
        self.pids.exit_pid(pid);
        self.feed(Input::Exited { pid, exit: Exit::Code(if passed { 0 } else { 1 }) })
    }

    /// A process sent SIGKILL dies and is reaped.
    fn reap_killed(&mut self, pid: u32, leader: Option<u64>) -> Result<(), Violation> {
        let killed = Exit::Other("killed by SIGKILL".into());
        match leader {
            Some(g) => self.leader_exits(g, killed),
            None => {
                self.pids.exit_pid(pid);
                self.feed(Input::Exited { pid, exit: killed })
            }
        }
    }

    /// Every process sent SIGKILL dies (the kernel does not wait for time
    /// to pass).
    fn reap_all_killed(&mut self) -> Result<(), Violation> {
        while !self.dying.is_empty() && !self.has_ended() {
            let (pid, leader) = self.dying.remove(0);
            self.reap_killed(pid, leader)?;
        }
        Ok(())
    }

    /// Moves time to `until`, feeding [`Input::Tick`] at every deadline of
    /// the core's on the way, like the shell's timer.
    pub(super) fn advance(&mut self, until: Duration) -> Result<(), Violation> {
        let mut ticks_here = 0;
        loop {
            self.reap_all_killed()?;
            if self.has_ended() {
                return Ok(());
            }
            let next = self.core.next_deadline().map(|at| at.saturating_duration_since(self.base));
            // The shell waits for a queue to drain a bounded time
            // (`QUEUE_WAIT`): by then it says so anyway.
            if let Some((_, since)) = self.queue_watched
                && since + QUEUE_WAIT <= until
                && next.is_none_or(|n| since + QUEUE_WAIT < n)
            {
                self.now = self.now.max(since + QUEUE_WAIT);
                self.queue_drains()?;
                continue;
            }
            match next {
                Some(at) if at <= until => {
                    ticks_here = if at <= self.now { ticks_here + 1 } else { 0 };
                    if ticks_here > TICKS_AT_ONE_INSTANT {
                        return Err(format!("the deadline at {at:?} never clears (now {:?})", self.now));
                    }
                    self.now = self.now.max(at);
                    self.feed(Input::Tick)?;
                }
                _ => {
                    self.now = until;
                    return self.check();
                }
            }
        }
    }

    /// Stops everything and lets every deadline pass: the run must end,
    /// with no caller left waiting and nothing left running.
    pub(super) fn finish(&mut self) -> Result<(), Violation> {
        if !self.has_ended() {
            let waiter = self.token(true, Asked::Stop);
            self.feed(Input::StopRequested { waiter })?;
            self.advance(self.now + 2 * (READY_TIMEOUT + STOP_TIMEOUT))?;
        }
        if !self.has_ended() {
            return Err("the stop never completed".into());
        }
        let ended = self.ended.take();
        // Even after the crash-loop verdict: its waiters hear "stopping".
        if let Some(t) = self.waiting.keys().next() {
            return Err(format!("{t:?} never answered"));
        }
        if !matches!(ended, Some(Ended::CrashLoop(_))) && !self.upstream.stopping {
            return Err("stopped without STOPPING=1 upstream".into());
        }
        self.everything_reaped()?;
        match ended {
            Some(Ended::Stopped | Ended::CrashLoop(_)) => Ok(()),
            None => Err("ended without a verdict".into()),
        }
    }
}

/// An input's name, for violations.
fn kind(input: &Input) -> &'static str {
    match input {
        Input::RestartRequested { .. } => "RestartRequested",
        Input::StopRequested { .. } => "StopRequested",
        Input::Spawned { .. } => "Spawned",
        Input::SpawnFailed { .. } => "SpawnFailed",
        Input::HealthCheckStarted { .. } => "HealthCheckStarted",
        Input::HealthCheckNotRun { .. } => "HealthCheckNotRun",
        Input::Notified { .. } => "Notified",
        Input::Exited { .. } => "Exited",
        Input::OutputComplete { .. } => "OutputComplete",
        Input::HandoffConnected { .. } => "HandoffConnected",
        Input::HandoffBlocked => "HandoffBlocked",
        Input::HandoffWritable => "HandoffWritable",
        Input::UpgradeRequested => "UpgradeRequested",
        Input::UpgradeProbed { .. } => "UpgradeProbed",
        Input::UpgradeAbandoned => "UpgradeAbandoned",
        Input::Probed { .. } => "Probed",
        Input::QueueDrained { .. } => "QueueDrained",
        Input::Tick => "Tick",
    }
}
