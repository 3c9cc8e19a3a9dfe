//! The restart transaction: request → spawn → READY=1 → (health check) →
//! cutover → answer every caller; a failed start; the queue of requests
//! that came meanwhile; crash replacements, backoff and the crash-loop
//! verdict.

use std::time::Instant;

use super::{
    Action, Core, Event, Gen, Lost, Outcome, Proof, Proven, RestartReset, Sig, Slot, StartFailure, Token, Upstream,
};
use crate::supervisor::lifecycle::{Life, State};
use crate::supervisor::phase::{Phase, Restart, Trigger};
use crate::supervisor::policy::SteeringMode;
use crate::supervisor::{Ended, Failure, after, micros};

impl Core {
    pub(super) fn request_restart(&mut self, waiter: Option<Token>) {
        match &mut self.phase {
            // Too late: what `baton restart` hears while Baton stops.
            Phase::Stopping { .. } | Phase::Ended(_) => self.answer(waiter.into_iter().collect(), Outcome::Stopping),
            // Served by the next restart, right after this one.
            Phase::Restarting { queued, .. } => queued.get_or_insert_default().extend(waiter),
            // A crash replacement that was due anyway starts now.
            Phase::Steady | Phase::BackingOff { .. } => {
                self.begin_restart(Trigger::Requested, waiter.into_iter().collect())
            }
        }
    }

    pub(super) fn begin_restart(&mut self, trigger: Trigger, waiters: Vec<Token>) {
        let generation = self.counters.next_number;
        self.counters.next_number += 1;
        self.phase = Phase::Restarting { restart: Restart { generation, trigger, waiters }, queued: None };
        if trigger != Trigger::Initial {
            self.upstream(Upstream::Reloading { generation });
        }
        // Our own start/reload timeout upstream must not fire before the
        // app's ready timeout does.
        let usec = micros(self.policy.ready_timeout).saturating_add(5_000_000);
        self.upstream(Upstream::ExtendTimeout { usec });
        self.spawning = Some(generation);
        // The slot the serving generation does not have, so steering can
        // tell them apart; with nothing serving, the slot traffic goes to
        // already (what is queued there is the new one's to accept).
        let slot = self.active().map_or(self.steered, |a| a.slot.other());
        self.actions.push(Action::Spawn { generation, trigger, slot });
    }

    /// The restart's generation runs, on `slot`.
    pub(super) fn spawned(&mut self, now: Instant, generation: u64, leader: u32, slot: Slot) {
        if self.spawning == Some(generation) {
            self.spawning = None;
        }
        if self.index(generation).is_some() {
            return;
        }
        self.gens.push(Gen {
            number: generation,
            leader,
            life: Life::starting(now, self.policy.ready_timeout, self.policy.watchdog),
            spawned_at: now,
            ready_at: None,
            status_text: None,
            handoff: false,
            slot,
            proof: Proof::default(),
        });
        self.begin_proving(now, self.gens.len() - 1);
        if self.restart().is_none_or(|(g, _)| g != generation) {
            // Its restart ended while it was being spawned (a stop signal
            // handed over first, see `Supervisor::feed`): it only drains,
            // and the stop waits for it (`check_stopped`). Found by the
            // simulation: the stop used to end the run at once, with the
            // table still empty, and this generation was never reaped.
            let i = self.gens.len() - 1;
            let signal = if matches!(self.phase, Phase::Ended(_)) { Sig::Kill } else { Sig::Stop };
            self.drain(now, i, Some(signal));
        }
    }

    /// The restart's generation could not be spawned.
    pub(super) fn spawn_failed(&mut self, now: Instant, generation: u64, why: String) {
        if self.spawning == Some(generation) {
            self.spawning = None;
        }
        self.fail_start(now, generation, StartFailure::SpawnFailed(why));
        // A stop that came while it was being spawned may be complete.
        self.check_stopped();
    }

    pub(super) fn health_check_started(&mut self, generation: u64, pid: u32) {
        if let Some(i) = self.index(generation)
            && self.gens[i].life.state == State::Starting
        {
            self.gens[i].life.state = State::HealthCheck { pid };
        } else {
            // It stopped starting meanwhile: the check has nothing to prove.
            self.actions.push(Action::KillHealthCheck { generation });
        }
    }

    /// Generation `generation` is ready (and healthy): the active one
    /// drains, it takes over, its callers hear so.
    pub(super) fn cutover(&mut self, now: Instant, generation: u64) {
        let mut replaced = None;
        for i in 0..self.gens.len() {
            if self.gens[i].life.state == State::Active {
                replaced = Some(self.gens[i].number);
                self.drain(now, i, Some(Sig::Stop));
                self.log(Event::Draining { generation: self.gens[i].number });
            }
        }
        let Some(i) = self.index(generation) else { return };
        self.gens[i].life.activate(now);
        if replaced.is_none() && self.policy.proving.steering != SteeringMode::Off {
            // Nothing served before it: what waits on the other slot's
            // sockets (clients that came before Baton attached its program,
            // as systemd's sockets take them; calibration's probe) would
            // wait there until the next restart. It is this one's.
            let from = self.gens[i].slot.other();
            self.actions.push(Action::RescueQueued { from, to: generation });
        }
        let ready_ms = self.gens[i].ready_ms();
        let g = &self.gens[i];
        let proven = g.proof.flipped_at.map(|at| Proven {
            flip_ms: at.saturating_duration_since(g.spawned_at).as_millis() as u64,
            probation_ms: now.saturating_duration_since(at).as_millis() as u64,
        });
        if self.restart_reset != RestartReset::Done {
            self.restart_reset = RestartReset::Due { generation, at: after(now, super::PROVEN_HEALTHY_AFTER) };
        }
        self.enforce_draining_limit(now);
        self.flush_connections();
        if self.restart().is_none_or(|(g, _)| g != generation) {
            return;
        }
        self.log(Event::Ready { generation, ready_ms });
        self.upstream(Upstream::Serving { generation });
        let Some((restart, queued)) = self.phase.take_restart() else { return };
        self.counters.consecutive_failures = 0;
        if restart.trigger != Trigger::Initial {
            self.counters.restarts += 1;
        }
        self.answer(restart.waiters, Outcome::Restarted { generation, ready_ms, replaced, proven });
        self.next_restart(queued);
    }

    /// Generation `generation` did not take over (`why`): if it is the
    /// restart's, it drains (if it still runs), the failure is reported,
    /// and the restart ends.
    pub(super) fn fail_start(&mut self, now: Instant, generation: u64, why: StartFailure) {
        let status_text = self.generation(generation).and_then(|g| g.status_text.clone());
        self.fail_start_with(now, generation, why, status_text);
    }

    pub(super) fn fail_start_with(
        &mut self,
        now: Instant,
        generation: u64,
        why: StartFailure,
        status_text: Option<String>,
    ) {
        if let Some(g) = self.generation(generation) {
            let slot = g.slot;
            self.steer_back(generation, slot);
        }
        if self.restart().is_none_or(|(g, _)| g != generation) {
            // Not the restart's (it ended): a generation still starting can
            // never take over any more, so it drains rather than fall due
            // again at every turn.
            if let Some(i) = self.index(generation)
                && matches!(self.gens[i].life.state, State::Starting | State::HealthCheck { .. })
            {
                self.drain(now, i, Some(Sig::Stop));
            }
            return;
        }
        self.actions.push(Action::KeepFailedOutput { generation, status_text });
        if let Some(i) = self.index(generation) {
            // Like systemd after a failed start: ask it to stop, so
            // connections it already accepted from the shared socket are
            // finished, and SIGKILL only at the stop deadline.
            if !matches!(self.gens[i].life.state, State::Draining { .. }) {
                self.drain(now, i, Some(Sig::Stop));
            }
            self.enforce_draining_limit(now);
        }
        let serving = self.active_number();
        self.log(Event::RestartFailed { generation, why: why.clone() });
        self.upstream(Upstream::StartFailed { generation, why: why.clone(), serving });
        let Some((restart, queued)) = self.phase.take_restart() else { return };
        if serving.is_none() || restart.trigger == Trigger::Replace {
            // Nothing is serving (or a replacement failed): keep trying,
            // with backoff.
            self.schedule_replacement(now);
        }
        self.answer(restart.waiters, Outcome::RestartFailed { generation, why, serving });
        self.next_restart(queued);
    }

    /// Requests that came during a restart get one more, unless the run is
    /// over or stopping.
    fn next_restart(&mut self, queued: Option<Vec<Token>>) {
        match queued {
            Some(waiters) if self.is_stopping() => self.answer(waiters, Outcome::Stopping),
            Some(waiters) => self.begin_restart(Trigger::Requested, waiters),
            None => {}
        }
    }

    pub(super) fn serving_lost(&mut self, now: Instant, lost: Lost) {
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
        let backoff = self.policy.backoff;
        let shift = self.counters.consecutive_failures.min(16);
        self.counters.consecutive_failures += 1;
        let delay = (backoff.initial * 2u32.pow(shift)).min(backoff.max);
        debug_assert!(self.phase.restart().is_none(), "a backoff never replaces a running restart");
        self.phase = Phase::BackingOff { at: after(now, delay) };
        self.log(Event::BackOff { delay });
    }

    /// The backoff is over: the replacement starts.
    pub(super) fn backoff_due(&mut self, now: Instant) {
        if let Phase::BackingOff { at } = self.phase
            && at <= now
        {
            self.phase = Phase::Steady;
            self.counters.crash_restarts += 1;
            self.begin_restart(Trigger::Replace, Vec::new());
        }
    }

    /// Records a failure; `false` (and the crash-loop verdict) once `burst`
    /// failures happened within `interval`.
    fn note_failure(&mut self, now: Instant) -> bool {
        let backoff = self.policy.backoff;
        let crashes = &mut self.counters.crashes;
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.saturating_duration_since(*t) > backoff.interval) {
            crashes.pop_front();
        }
        if crashes.len() as u32 <= backoff.burst {
            return true;
        }
        let verdict = Failure::CrashLoop { failures: crashes.len(), interval: backoff.interval };
        // Whoever still waits (a restart's callers, a stop's) hears
        // "stopping": the run is over.
        match std::mem::replace(&mut self.phase, Phase::Ended(Ended::CrashLoop(verdict.clone()))) {
            Phase::Restarting { restart, queued } => {
                self.answer(restart.waiters, Outcome::Stopping);
                self.answer(queued.unwrap_or_default(), Outcome::Stopping);
            }
            Phase::Stopping { waiters } => self.answer(waiters, Outcome::Stopping),
            Phase::Steady | Phase::BackingOff { .. } | Phase::Ended(_) => {}
        }
        self.actions.push(Action::GiveUp(verdict));
        false
    }
}
