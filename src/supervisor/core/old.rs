//! The supervisor's decisions without I/O: the restart transaction, its
//! queue, crash accounting and backoff, the crash-loop verdict, and
//! stopping.
//!
//! [`Core`] takes [`Input`]s — requests, the outcome of a start, the loss of
//! the serving generation, timers — with the current time as an argument,
//! and returns [`Action`]s for the shell ([`super::Supervisor`]) to carry
//! out: spawn generation N, answer callers (by [`Token`]), drain everything,
//! give up. It makes no syscall, reads no clock and knows nothing of tokio:
//! the same inputs at the same times give the same actions, which is what
//! the deterministic simulation (`simulation`, its tests) relies on. One task
//! (the shell's) owns it; nothing is shared.
//!
//! Each generation's states and deadlines, and the draining limit, are
//! pure too ([`super::lifecycle`]), driven by the shell. Still in the shell,
//! for now: the generation table, READY=1 → health check → cutover, exit
//! classification, upstream notifications, connections and the fd store,
//! the upgrade. The shell reports their outcomes to the core as inputs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::failure::Failure;
use super::phase::{Phase, Restart, Trigger};
use super::policy::Backoff;
use super::{Ended, after};
use crate::control::Response;

/// A caller waiting for an outcome, named by the shell (which keeps its
/// reply channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Token(pub(super) u64);

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

/// What happened.
#[derive(Debug)]
pub(super) enum Input {
    /// `baton restart` (with its caller, if it waits) or SIGHUP.
    RestartRequested { waiter: Option<Token> },
    /// `baton stop` (with its caller), SIGTERM or SIGINT.
    StopRequested { waiter: Option<Token> },
    /// The restart's generation took over (`response`: what its callers
    /// hear).
    TookOver { response: Response },
    /// Generation `generation` did not take over; `serving` says whether
    /// another one still serves.
    StartFailed { generation: u64, serving: bool, response: Response },
    /// The serving generation stopped serving.
    ServingLost(Lost),
    /// No generation is left.
    AllGone,
    /// Time passed (a deadline of [`Core::next_deadline`] may be due).
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, PartialEq)]
pub(super) enum Action {
    /// Start generation `generation`; the outcome comes back as
    /// [`Input::TookOver`] or [`Input::StartFailed`].
    Spawn { generation: u64, trigger: Trigger },
    /// Answer these callers with `response`.
    Answer { waiters: Vec<Token>, response: Response },
    /// The stop began: drain every generation (`end_reload`: a reload was
    /// announced upstream, end it first).
    StopAll { end_reload: bool },
    /// Nothing serves: the next start is due in `delay`.
    BackOff { delay: Duration },
    /// Crash loop: give up, SIGKILL everything.
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

/// See the module docs.
pub(super) struct Core {
    backoff: Backoff,
    phase: Phase,
    counters: Counters,
    actions: Vec<Action>,
}

impl Core {
    /// A core before the first generation (start it with
    /// [`start`](Self::start)), or adopting `counters` after `baton
    /// upgrade`.
    pub(super) fn new(backoff: Backoff, counters: Counters) -> Core {
        Core { backoff, phase: Phase::Steady, counters, actions: Vec::new() }
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
            Input::StopRequested { waiter } => self.begin_stop(waiter),
            Input::TookOver { response } => self.took_over(response),
            Input::StartFailed { generation, serving, response } => {
                self.start_failed(now, generation, serving, response)
            }
            Input::ServingLost(lost) => self.serving_lost(now, lost),
            Input::AllGone => self.all_gone(),
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

    /// When a crash replacement is due, while backing off.
    pub(super) fn backoff_due(&self) -> Option<Instant> {
        match self.phase {
            Phase::BackingOff { at } => Some(at),
            _ => None,
        }
    }

    /// The earliest time [`Input::Tick`] has something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.backoff_due()
    }

    /// How the run ended, once it has (the run loop returns it).
    pub(super) fn take_ended(&mut self) -> Option<Ended> {
        self.phase.take_ended()
    }

    /// Whether the run has ended.
    pub(super) fn has_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended(_))
    }

    /// The counters.
    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    // ---- transitions ------------------------------------------------------

    fn request_restart(&mut self, waiter: Option<Token>) {
        match &mut self.phase {
            // Too late: what `baton restart` hears while Baton stops.
            Phase::Stopping { .. } | Phase::Ended(_) => self.answer(waiter.into_iter().collect(), Response::Stopping),
            // Served by the next restart, right after this one.
            Phase::Restarting { queued, .. } => queued.get_or_insert_default().extend(waiter),
            // A crash replacement that was due anyway starts now.
            Phase::Steady | Phase::BackingOff { .. } => {
                self.begin_restart(Trigger::Requested, waiter.into_iter().collect())
            }
        }
    }

    fn begin_restart(&mut self, trigger: Trigger, waiters: Vec<Token>) {
        let generation = self.counters.next_number;
        self.counters.next_number += 1;
        self.phase = Phase::Restarting { restart: Restart { generation, trigger, waiters }, queued: None };
        self.actions.push(Action::Spawn { generation, trigger });
    }

    fn took_over(&mut self, response: Response) {
        let Some((restart, queued)) = self.phase.take_restart() else { return };
        self.counters.consecutive_failures = 0;
        if restart.trigger != Trigger::Initial {
            self.counters.restarts += 1;
        }
        self.answer(restart.waiters, response);
        self.next_restart(queued);
    }

    fn start_failed(&mut self, now: Instant, generation: u64, serving: bool, response: Response) {
        if self.phase.restart().is_none_or(|r| r.generation != generation) {
            return;
        }
        let Some((restart, queued)) = self.phase.take_restart() else { return };
        if !serving || restart.trigger == Trigger::Replace {
            // Nothing is serving: keep trying, with backoff.
            self.schedule_replacement(now);
        }
        self.answer(restart.waiters, response);
        self.next_restart(queued);
    }

    /// Requests that came during a restart get one more, unless the run is
    /// over or stopping.
    fn next_restart(&mut self, queued: Option<Vec<Token>>) {
        match queued {
            Some(waiters) if self.is_stopping() => self.answer(waiters, Response::Stopping),
            Some(waiters) => self.begin_restart(Trigger::Requested, waiters),
            None => {}
        }
    }

    fn serving_lost(&mut self, now: Instant, lost: Lost) {
        match lost {
            Lost::Crashed => match self.phase {
                Phase::Stopping { .. } => {}
                // The starting generation becomes the replacement.
                Phase::Restarting { .. } => {}
                _ => self.schedule_replacement(now),
            },
            // A hung generation counts as a failure: an app that always
            // hangs ends in the crash-loop verdict, not in endless
            // replacements.
            Lost::Hung => {
                if self.note_failure(now) {
                    self.replace_active();
                }
            }
            Lost::Stopping => self.replace_active(),
        }
    }

    /// The serving generation is going: start a replacement now, unless a
    /// restart is already under way (it becomes the replacement).
    fn replace_active(&mut self) {
        if self.is_stopping() || self.phase.restart().is_some() {
            return;
        }
        self.counters.crash_restarts += 1;
        self.begin_restart(Trigger::Replace, Vec::new());
    }

    /// Backoff for replacing a generation that died on its own (or a start
    /// that failed with nothing serving); gives up after `burst` failures
    /// within `interval`.
    fn schedule_replacement(&mut self, now: Instant) {
        if !self.note_failure(now) || self.is_stopping() {
            return;
        }
        let shift = self.counters.consecutive_failures.min(16);
        self.counters.consecutive_failures += 1;
        let delay = (self.backoff.initial * 2u32.pow(shift)).min(self.backoff.max);
        debug_assert!(self.phase.restart().is_none(), "a backoff never replaces a running restart");
        self.phase = Phase::BackingOff { at: after(now, delay) };
        self.actions.push(Action::BackOff { delay });
    }

    /// Records a failure; `false` (and the crash-loop verdict) once `burst`
    /// failures happened within `interval`.
    fn note_failure(&mut self, now: Instant) -> bool {
        let crashes = &mut self.counters.crashes;
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.saturating_duration_since(*t) > self.backoff.interval) {
            crashes.pop_front();
        }
        if crashes.len() as u32 <= self.backoff.burst {
            return true;
        }
        let verdict = Failure::CrashLoop { failures: crashes.len(), interval: self.backoff.interval };
        // Whoever still waits (a restart's callers, a stop's) hears
        // "stopping": the run is over.
        match std::mem::replace(&mut self.phase, Phase::Ended(Ended::CrashLoop(verdict.clone()))) {
            Phase::Restarting { restart, queued } => {
                self.answer(restart.waiters, Response::Stopping);
                self.answer(queued.unwrap_or_default(), Response::Stopping);
            }
            Phase::Stopping { waiters } => self.answer(waiters, Response::Stopping),
            Phase::Steady | Phase::BackingOff { .. } | Phase::Ended(_) => {}
        }
        self.actions.push(Action::GiveUp(verdict));
        false
    }

    fn tick(&mut self, now: Instant) {
        if let Phase::BackingOff { at } = self.phase
            && at <= now
        {
            self.phase = Phase::Steady;
            self.counters.crash_restarts += 1;
            self.begin_restart(Trigger::Replace, Vec::new());
        }
    }

    fn begin_stop(&mut self, waiter: Option<Token>) {
        match &mut self.phase {
            Phase::Stopping { waiters } => return waiters.extend(waiter),
            // The run is over (crash loop): nothing left to stop.
            Phase::Ended(_) => return self.answer(waiter.into_iter().collect(), Response::Stopping),
            _ => {}
        }
        let end_reload = self.phase.restart().is_some_and(|r| r.trigger != Trigger::Initial);
        // A backoff is dropped; a restart's callers and those queued for the
        // next one hear "stopping".
        let before = std::mem::replace(&mut self.phase, Phase::Stopping { waiters: waiter.into_iter().collect() });
        if let Phase::Restarting { restart, queued } = before {
            self.answer(restart.waiters, Response::Stopping);
            self.answer(queued.unwrap_or_default(), Response::Stopping);
        }
        self.actions.push(Action::StopAll { end_reload });
    }

    fn all_gone(&mut self) {
        if let Phase::Stopping { waiters } = &mut self.phase {
            let waiters = std::mem::take(waiters);
            self.phase = Phase::Ended(Ended::Stopped);
            self.answer(waiters, Response::Stopping);
        }
    }

    fn answer(&mut self, waiters: Vec<Token>, response: Response) {
        if !waiters.is_empty() {
            self.actions.push(Action::Answer { waiters, response });
        }
    }
}
