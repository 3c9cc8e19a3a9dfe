//! The simulation's world: the generations around the core, modelled the
//! way the shell keeps them, and the invariants checked after each input
//! (listed in [`super`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::Move;
use super::senders::{Msg, Pids, Sender};
use crate::control::{Response, RestartFailure};
use crate::supervisor::Ended;
use crate::supervisor::core::{Action, Core, Counters, Input, Lost, Token};
use crate::supervisor::lifecycle::{Due, Life, State, over_draining_limit};
use crate::supervisor::policy::{Backoff, NotifyAccess};

/// The model's ready timeout and stop timeout (the shell enforces them).
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The even generations' watchdog interval.
const WATCHDOG: Duration = Duration::from_secs(4);
/// `--max-draining`.
const MAX_DRAINING: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asked {
    Restart,
    Stop,
}

/// The world around the core, and what the invariants need to remember.
pub(super) struct World {
    pub(super) core: Core,
    pub(super) backoff: Backoff,
    pub(super) base: Instant,
    pub(super) now: Duration,
    /// The generation starting, and when it was spawned.
    pub(super) starting: Option<(u64, Duration)>,
    pub(super) serving: Option<u64>,
    /// Every live generation's state and deadlines, as the shell keeps
    /// them ([`Life`]: the same pure code).
    pub(super) lives: BTreeMap<u64, Life>,
    pub(super) last_spawned: u64,
    pub(super) stop_all_at: Option<Duration>,
    pub(super) next_token: u64,
    /// Callers waiting: what they asked, when.
    pub(super) waiting: BTreeMap<Token, (Asked, Duration)>,
    pub(super) answered: BTreeSet<Token>,
    /// Failures the core must have counted (for the crash-loop check).
    pub(super) failures: Vec<Duration>,
    pub(super) events: u64,
    /// `--notify-access`, and whether a health check runs after READY=1.
    pub(super) access: NotifyAccess,
    pub(super) health_check: bool,
    /// The processes: senders of datagrams, targets of signals.
    pub(super) pids: Pids,
    /// Generations spawned, and those reaped (invariant 9).
    pub(super) spawned: BTreeSet<u64>,
    pub(super) reaped: BTreeSet<u64>,
    /// Datagrams sent, and those attributed.
    pub(super) datagrams: u64,
    pub(super) attributed: u64,
}

pub(super) type Violation = String;

impl World {
    pub(super) fn new(access: NotifyAccess, health_check: bool) -> World {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            burst: 10,
            interval: Duration::from_secs(60),
        };
        World {
            core: Core::new(backoff, Counters { next_number: 1, ..Counters::default() }),
            backoff,
            base: Instant::now(),
            now: Duration::ZERO,
            starting: None,
            serving: None,
            lives: BTreeMap::new(),
            last_spawned: 0,
            stop_all_at: None,
            next_token: 0,
            waiting: BTreeMap::new(),
            answered: BTreeSet::new(),
            failures: Vec::new(),
            events: 0,
            access,
            health_check,
            pids: Pids::new(),
            spawned: BTreeSet::new(),
            reaped: BTreeSet::new(),
            datagrams: 0,
            attributed: 0,
        }
    }

    pub(super) fn at(&self) -> Instant {
        self.base + self.now
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

    pub(super) fn feed(&mut self, input: Input) -> Result<(), Violation> {
        let stopping_before = self.core.is_stopping();
        let kind = match &input {
            Input::RestartRequested { .. } => "RestartRequested",
            Input::StopRequested { .. } => "StopRequested",
            Input::TookOver { .. } => "TookOver",
            Input::StartFailed { .. } => "StartFailed",
            Input::ServingLost(_) => "ServingLost",
            Input::AllGone => "AllGone",
            Input::Tick => "Tick",
        };
        let actions = self.core.handle(self.at(), input);
        self.events += 1;
        self.apply(actions, stopping_before).map_err(|e| format!("after {kind}: {e}"))?;
        self.check()
    }

    pub(super) fn apply(&mut self, actions: Vec<Action>, stopping_before: bool) -> Result<(), Violation> {
        for action in actions {
            match action {
                Action::Spawn { generation, .. } => {
                    if stopping_before || self.core.is_stopping() {
                        return Err(format!("spawned generation {generation} while stopping"));
                    }
                    if let Some((s, _)) = self.starting {
                        return Err(format!("spawned generation {generation} while {s} is starting"));
                    }
                    if generation <= self.last_spawned {
                        return Err(format!("generation {generation} after {}", self.last_spawned));
                    }
                    self.last_spawned = generation;
                    self.spawned.insert(generation);
                    self.pids.spawned(generation);
                    self.starting = Some((generation, self.now));
                    let watchdog = (generation % 2 == 0).then_some(WATCHDOG);
                    self.lives.insert(generation, Life::starting(self.at(), READY_TIMEOUT, watchdog));
                }
                Action::Answer { waiters, response } => {
                    for t in waiters {
                        let Some((asked, since)) = self.waiting.remove(&t) else {
                            return Err(if self.answered.contains(&t) {
                                format!("{t:?} answered twice ({response:?})")
                            } else {
                                format!("{t:?} answered but never asked")
                            });
                        };
                        self.answered.insert(t);
                        let waited = self.now - since;
                        let limit = match asked {
                            // Its own restart and the one it queued behind,
                            // each extended at most once more.
                            Asked::Restart => 4 * READY_TIMEOUT,
                            Asked::Stop => STOP_TIMEOUT,
                        };
                        // A stop waits for the drain it began (or joined).
                        let waited = match (asked, self.stop_all_at) {
                            (Asked::Stop, Some(at)) => self.now - at.max(since),
                            _ => waited,
                        };
                        if waited > limit {
                            return Err(format!("{t:?} ({asked:?}) answered after {waited:?}"));
                        }
                    }
                }
                Action::StopAll { .. } => {
                    if self.stop_all_at.is_some() {
                        return Err("a second StopAll".into());
                    }
                    self.stop_all_at = Some(self.now);
                    for g in self.starting.take().map(|(g, _)| g).into_iter().chain(self.serving.take()) {
                        self.drain(g, true)?;
                    }
                    if self.nothing_left() {
                        self.feed(Input::AllGone)?;
                    }
                }
                Action::BackOff { delay } => {
                    if delay > self.backoff.max {
                        return Err(format!("backoff of {delay:?} beyond the maximum"));
                    }
                }
                Action::GiveUp(_) => {
                    let window = self.failures.iter().filter(|t| self.now - **t <= self.backoff.interval).count();
                    if window as u32 <= self.backoff.burst {
                        return Err(format!("crash-loop verdict after {window} failures in the window"));
                    }
                    // kill_all (health checks too): the run loop returns
                    // at its next turn, everything is reaped.
                    self.starting = None;
                    self.serving = None;
                    let all: Vec<u64> = self.lives.keys().copied().collect();
                    for g in all {
                        self.reap(g)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn nothing_left(&self) -> bool {
        self.lives.is_empty()
    }

    /// The shell's `Generation::drain` (`signal`: SIGTERM or SIGABRT to
    /// its group; none after its own `STOPPING=1`), which also kills its
    /// health check: SIGKILL at the stop deadline; and its draining limit,
    /// except in a stop (which drains them all).
    pub(super) fn drain(&mut self, g: u64, signal: bool) -> Result<(), Violation> {
        let kill_at = self.at() + STOP_TIMEOUT;
        let Some(life) = self.lives.get_mut(&g) else {
            return Err(format!("drained generation {g}, which the model does not have"));
        };
        life.drain(kill_at);
        if signal {
            self.signal(g)?;
        }
        self.pids.end_health_check(g);
        if self.stop_all_at.is_none() {
            self.enforce_draining_limit()?;
        }
        Ok(())
    }

    /// A signal to generation `g`'s group: invariant 8, it is a live
    /// generation of the model, whose leader the model knows.
    pub(super) fn signal(&mut self, g: u64) -> Result<(), Violation> {
        if !self.lives.contains_key(&g) || !self.pids.gens.contains_key(&g) {
            return Err(format!("signalled generation {g}, which the model does not have"));
        }
        Ok(())
    }

    /// Generation `g`'s leader exited (on its own or by a signal) and the
    /// shell reaped it, SIGKILLing what is left of its group.
    pub(super) fn reap(&mut self, g: u64) -> Result<(), Violation> {
        self.signal(g)?;
        self.lives.remove(&g);
        self.pids.reaped(g);
        if !self.reaped.insert(g) {
            return Err(format!("generation {g} reaped twice"));
        }
        Ok(())
    }

    /// The shell's `enforce_draining_limit`: the oldest beyond it get
    /// SIGKILL (and are gone: a stop is never waiting for them alone, as
    /// some generation drains or serves after every drain).
    pub(super) fn enforce_draining_limit(&mut self) -> Result<(), Violation> {
        let numbers: Vec<u64> = self.lives.keys().copied().collect();
        let beyond = over_draining_limit(self.lives.values().map(|l| &l.state), MAX_DRAINING);
        for i in beyond {
            self.reap(numbers[i])?;
        }
        Ok(())
    }

    /// The oldest draining generation, if any.
    pub(super) fn oldest_draining(&self) -> Option<u64> {
        self.lives.iter().find(|(_, l)| matches!(l.state, State::Draining { .. })).map(|(g, _)| *g)
    }

    pub(super) fn check(&self) -> Result<(), Violation> {
        let draining = self.lives.values().filter(|l| matches!(l.state, State::Draining { killed: false, .. })).count();
        if draining > MAX_DRAINING && self.stop_all_at.is_none() {
            return Err(format!("{draining} generations draining, more than {MAX_DRAINING}"));
        }
        let state = |g: Option<u64>| g.and_then(|g| self.lives.get(&g)).map(|l| l.state);
        if self.serving.is_some() && state(self.serving) != Some(State::Active) {
            return Err(format!("serving generation {:?} is {:?}", self.serving, state(self.serving)));
        }
        if !self.core.is_stopping()
            && self.serving.is_none()
            && self.starting.is_none()
            && self.core.backoff_due().is_none()
        {
            return Err("nothing serves, nothing starts and no replacement is scheduled".into());
        }
        // Invariant 8: the process table is the generation table, and
        // every main process is one of its generation's own.
        if !self.lives.keys().eq(self.pids.gens.keys()) {
            return Err(format!(
                "generations {:?} but processes of {:?}",
                self.lives.keys().collect::<Vec<_>>(),
                self.pids.gens.keys().collect::<Vec<_>>()
            ));
        }
        if let Some((g, p)) = self.pids.gens.iter().find(|(g, p)| p.main.is_some_and(|m| !self.pids.owns(**g, m))) {
            return Err(format!("generation {g}'s main process {:?} is not its own", p.main));
        }
        if self.core.restart().map(|(g, _)| g) != self.starting.map(|(g, _)| g) && !self.core.is_stopping() {
            return Err(format!("core restarting {:?}, world starting {:?}", self.core.restart(), self.starting));
        }
        Ok(())
    }

    /// The shell's response to a start that did not take over.
    pub(super) fn fail_start(&mut self, generation: u64) -> Result<(), Violation> {
        let serving = self.serving.is_some();
        self.failures.push(self.now);
        let response = Response::RestartFailed(RestartFailure {
            generation,
            reason: "exited with status 1 before READY=1".into(),
            status_text: None,
            log_tail: Vec::new(),
            serving: self.serving,
        });
        // The shell drains the failed generation (it already exited here).
        self.feed(Input::StartFailed { generation, serving, response })
    }

    pub(super) fn step(&mut self, m: Move) -> Result<(), Violation> {
        if self.core.has_ended() {
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
                // Its main process sends READY=1 (and, with a health
                // check, the check passes).
                let Some((generation, _)) = self.starting else { return Ok(()) };
                let main = self.pids.gens.get(&generation).map(|p| p.main_pid());
                if let Some(pid) = main {
                    self.datagram(pid, Msg::Ready, false)?;
                }
                if self.pids.gens.get(&generation).is_some_and(|p| p.health_check.is_some()) {
                    self.health_check_exits(true)?;
                }
            }
            Move::FailStart => {
                // It exited before READY=1 (or during its health check).
                let Some((generation, _)) = self.starting.take() else { return Ok(()) };
                self.reap(generation)?;
                self.fail_start(generation)?;
            }
            Move::Notify(sender, msg) => {
                let stranger = matches!(sender, Sender::Exited(_) | Sender::Stranger { .. });
                let Some(pid) = self.pids.pid_of(sender) else { return Ok(()) };
                if !stranger {
                    return self.datagram(pid, msg, false);
                }
                // Invariant 7: nothing changes, in the core or the world.
                let before = (self.lives.clone(), self.events, self.serving, self.starting, self.pids.gens.clone());
                self.datagram(pid, msg, true)?;
                let after = (self.lives.clone(), self.events, self.serving, self.starting, self.pids.gens.clone());
                if before != after {
                    return Err(format!("{msg:?} from pid {pid}, no generation's process, changed the world"));
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
            Move::HealthCheckExits { passed } => self.health_check_exits(passed)?,
            Move::Ping => {
                let at = self.at();
                if let Some(life) = self.serving.and_then(|g| self.lives.get_mut(&g)) {
                    life.ping(at);
                }
            }
            Move::Extend(ms) => {
                let (at, now) = (self.at(), self.now);
                // Extended once at most by its ready timeout (so that the
                // callers' deadline of invariant 3 holds).
                if let Some((g, spawned)) = self.starting
                    && now - spawned < READY_TIMEOUT
                    && let Some(life) = self.lives.get_mut(&g)
                {
                    life.extend(at, ms.min(READY_TIMEOUT.as_millis() as u64) * 1000);
                }
            }
            Move::StaleFail => {
                let generation = self.last_spawned.saturating_sub(1);
                if self.starting.is_some_and(|(g, _)| g == generation) {
                    return Ok(());
                }
                let response = Response::Stopping;
                self.feed(Input::StartFailed { generation, serving: self.serving.is_some(), response })?;
            }
            Move::Crash => {
                if self.core.is_stopping() {
                    return Ok(());
                }
                let Some(g) = self.serving.take() else { return Ok(()) };
                self.reap(g)?;
                self.failures.push(self.now);
                self.feed(Input::ServingLost(Lost::Crashed))?;
            }
            Move::Hang | Move::SelfStop => {
                if self.core.is_stopping() {
                    return Ok(());
                }
                self.serving_lost(if m == Move::Hang { Lost::Hung } else { Lost::Stopping })?;
            }
            Move::DrainExit => {
                let Some(g) = self.oldest_draining() else { return Ok(()) };
                self.reap(g)?;
                self.exited()?;
            }
            Move::Advance(ms) => self.advance(self.now + Duration::from_millis(ms))?,
        }
        Ok(())
    }

    /// The serving generation hangs (the watchdog: SIGABRT) or says
    /// `STOPPING=1`: it drains.
    pub(super) fn serving_lost(&mut self, lost: Lost) -> Result<(), Violation> {
        let Some(g) = self.serving.take() else { return Ok(()) };
        // SIGABRT for the watchdog; none after its own STOPPING=1.
        self.drain(g, lost == Lost::Hung)?;
        if lost == Lost::Hung {
            self.failures.push(self.now);
        }
        self.feed(Input::ServingLost(lost))
    }

    /// A generation exited: the shell's `check_stopped`.
    pub(super) fn exited(&mut self) -> Result<(), Violation> {
        if self.nothing_left() && self.core.is_stopping() && !self.core.has_ended() {
            self.feed(Input::AllGone)?;
        }
        Ok(())
    }

    /// Moves time to `until`, handling every deadline on the way in order,
    /// like the shell's timers.
    pub(super) fn advance(&mut self, until: Duration) -> Result<(), Violation> {
        loop {
            if self.core.has_ended() {
                return Ok(());
            }
            let backoff = self.core.next_deadline();
            let lives = self.lives.values().filter_map(Life::next_deadline);
            let next = backoff.into_iter().chain(lives).min().map(|at| at - self.base);
            match next {
                Some(at) if at <= until => {
                    self.now = self.now.max(at);
                    let at = self.at();
                    let due = self.lives.iter().find_map(|(g, l)| l.due(at).map(|d| (*g, d)));
                    match due {
                        Some((g, Due::ReadyTimeout | Due::HealthCheckTimeout)) => {
                            // The shell drains it and reports the failure.
                            self.starting = None;
                            self.drain(g, true)?;
                            self.fail_start(g)?;
                        }
                        Some((g, Due::Kill)) => {
                            // SIGKILL: it is gone.
                            self.reap(g)?;
                            self.exited()?;
                        }
                        Some((_, Due::Watchdog)) => self.serving_lost(Lost::Hung)?,
                        None => self.feed(Input::Tick)?,
                    }
                }
                _ => {
                    self.now = until;
                    return Ok(());
                }
            }
        }
    }

    /// Stops everything and lets every deadline pass: the run must end,
    /// with no caller left waiting.
    pub(super) fn finish(&mut self) -> Result<(), Violation> {
        if !self.core.has_ended() {
            let waiter = self.token(true, Asked::Stop);
            self.feed(Input::StopRequested { waiter })?;
            self.advance(self.now + 2 * (READY_TIMEOUT + STOP_TIMEOUT))?;
        }
        if !self.core.has_ended() {
            return Err("the stop never completed".into());
        }
        if let Some(t) = self.waiting.keys().next() {
            return Err(format!("{t:?} never answered"));
        }
        // Invariant 9: every generation spawned was signalled or exited,
        // and reaped; none of its processes is left.
        if let Some(g) = self.spawned.difference(&self.reaped).next() {
            return Err(format!("generation {g} was never reaped"));
        }
        if let Some((g, p)) = self.pids.gens.iter().next() {
            return Err(format!("generation {g}'s processes {p:?} outlived the run"));
        }
        match self.core.take_ended() {
            Some(Ended::Stopped | Ended::CrashLoop(_)) => Ok(()),
            None => Err("ended without a verdict".into()),
        }
    }
}
