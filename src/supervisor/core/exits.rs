//! Exits and what they mean (a health check's verdict, a failed start, a
//! crash, a retirement), the watchdog, and stopping.
//!
//! Follows systemd's `service_sigchld_event()` and
//! `service_handle_watchdog()` (src/core/service.c): a start that ends is a
//! failed start; the serving process that ends is a crash (replaced, with
//! backoff); a stopping one that ends is done.

use std::time::Instant;

use super::{Action, Core, Event, Exit, Lost, Outcome, PendingExit, Sig, StartFailure, Token, Upstream};
use crate::supervisor::failure::{ProbationFailure, WatchdogCause};
use crate::supervisor::lifecycle::State;
use crate::supervisor::phase::{Phase, Trigger};
use crate::supervisor::policy::Readiness;
use crate::supervisor::{Ended, after};

impl Core {
    /// A child of Baton's ended.
    pub(super) fn exited(&mut self, now: Instant, pid: u32, exit: Exit) {
        // Health check processes.
        if let Some(i) = self.gens.iter().position(|g| g.health_check() == Some(pid)) {
            let generation = self.gens[i].number;
            // Back to starting: it has no check any more, whatever comes.
            self.gens[i].life.state = State::Starting;
            if exit.success() {
                self.log(Event::HealthCheckPassed { generation });
                // Proven once the rest is (`settle`).
                self.health_check_passed(i);
            } else {
                self.fail_start(now, generation, StartFailure::HealthCheckFailed { exit });
            }
            return;
        }
        let Some(i) = self.gens.iter().position(|g| g.leader == pid) else {
            // An orphaned grandchild we reaped as subreaper.
            self.log(Event::Reaped { pid, exit });
            return;
        };
        let g = self.gens.remove(i);
        let generation = g.number;
        match g.life.state {
            State::Starting | State::HealthCheck { .. } => {
                let last_status = g.status_text.clone();
                let why = match g.life.state {
                    State::HealthCheck { .. } => StartFailure::ExitedDuringHealthCheck { exit, last_status },
                    _ if g.proof.ready => StartFailure::ExitedWhileProving { exit, last_status },
                    _ if self.policy.proving.ready != Readiness::Notify => {
                        StartFailure::ExitedUnready { exit, last_status }
                    }
                    _ => StartFailure::ExitedBeforeReady { exit, last_status },
                };
                self.log(Event::ExitedStarting { generation, pid, why: why.clone() });
                // Kill what it left behind in its process group, and its
                // health check, which runs in a group of its own: nothing
                // else would ever stop it (it is reaped as an orphan).
                self.actions.push(Action::Signal { generation, signal: Sig::Kill });
                if g.health_check().is_some() {
                    self.actions.push(Action::KillHealthCheck { generation });
                }
                // Reported once its output is complete (or at the deadline).
                self.pending_exit = Some(PendingExit {
                    generation,
                    why,
                    status_text: g.status_text,
                    deadline: after(now, super::OUTPUT_GRACE),
                });
                self.actions.push(Action::AwaitOutput { generation });
            }
            State::Probation { .. } => {
                // The traffic goes back at once; the report waits for its
                // last output, as a failed start's does.
                self.steer_back(generation, g.slot);
                let why =
                    StartFailure::OnProbation(ProbationFailure::Exited { exit, last_status: g.status_text.clone() });
                self.log(Event::ExitedStarting { generation, pid, why: why.clone() });
                self.actions.push(Action::Signal { generation, signal: Sig::Kill });
                self.pending_exit = Some(PendingExit {
                    generation,
                    why,
                    status_text: g.status_text,
                    deadline: after(now, super::OUTPUT_GRACE),
                });
                self.actions.push(Action::AwaitOutput { generation });
            }
            State::Active => {
                self.log(Event::Crashed { generation, pid, exit });
                self.actions.push(Action::Signal { generation, signal: Sig::Kill });
                self.actions.push(Action::Forget { generation });
                // Backoff, unless stopping or a restart is under way (its
                // generation becomes the replacement).
                self.serving_lost(now, Lost::Crashed);
            }
            State::Draining { .. } => {
                self.log(Event::Retired { generation, pid, exit });
                self.actions.push(Action::Signal { generation, signal: Sig::Kill });
                self.actions.push(Action::Forget { generation });
            }
        }
        self.check_stopped();
    }

    /// The output of a generation that exited while starting is complete.
    pub(super) fn output_complete(&mut self, now: Instant, generation: u64) {
        if self.pending_exit.as_ref().is_some_and(|p| p.generation == generation) {
            self.report_pending_exit(now);
        }
    }

    /// Reports the pending exit's failed start, and forgets the generation.
    pub(super) fn report_pending_exit(&mut self, now: Instant) {
        let Some(p) = self.pending_exit.take() else { return };
        self.fail_start_with(now, p.generation, p.why, p.status_text);
        self.actions.push(Action::Forget { generation: p.generation });
    }

    /// Like systemd: SIGABRT to the hung generation. The serving one is
    /// replaced; a starting one has failed its start; a draining one is
    /// only hurried.
    pub(super) fn watchdog_expired(&mut self, now: Instant, i: usize, cause: WatchdogCause) {
        let generation = self.gens[i].number;
        self.log(Event::Watchdog { generation, cause });
        match self.gens[i].life.state {
            State::Active => {
                self.drain(now, i, Some(Sig::Abort));
                self.gens[i].life.watchdog = None;
                self.enforce_draining_limit(now);
                // Counted as a failure, and replaced (not once stopping).
                self.serving_lost(now, Lost::Hung);
            }
            State::Probation { .. } => {
                self.gens[i].life.watchdog = None;
                self.hand_back(now, i, ProbationFailure::Watchdog, Some(Sig::Abort));
            }
            State::Starting | State::HealthCheck { .. } => {
                // Found while moving the generation table into the core:
                // this used to drain it and wait for a READY=1 that could
                // no longer count, so the restart never ended.
                self.drain(now, i, Some(Sig::Abort));
                self.gens[i].life.watchdog = None;
                self.fail_start(now, generation, StartFailure::WatchdogTriggered);
            }
            State::Draining { .. } => {
                self.gens[i].life.watchdog = None;
                self.actions.push(Action::Signal { generation, signal: Sig::Abort });
            }
        }
    }

    /// `baton stop` (with its caller), SIGTERM or SIGINT.
    pub(super) fn begin_stop(&mut self, now: Instant, waiter: Option<Token>) {
        match &mut self.phase {
            Phase::Stopping { waiters } => return waiters.extend(waiter),
            // The run is over (crash loop): nothing left to stop.
            Phase::Ended(_) => return self.answer(waiter.into_iter().collect(), Outcome::Stopping),
            _ => {}
        }
        let end_reload = self.phase.restart().is_some_and(|r| r.trigger != Trigger::Initial);
        // A backoff is dropped; a restart's callers and those queued for the
        // next one hear "stopping".
        let before = std::mem::replace(&mut self.phase, Phase::Stopping { waiters: waiter.into_iter().collect() });
        if let Phase::Restarting { restart, queued } = before {
            self.answer(restart.waiters, Outcome::Stopping);
            self.answer(queued.unwrap_or_default(), Outcome::Stopping);
        }
        self.log(Event::StoppingAll);
        if self.upgrade.take().is_some() {
            self.actions.push(Action::CancelUpgrade);
        }
        if end_reload {
            // We announced RELOADING=1; systemd 252 ignores STOPPING=1 until
            // the reload is over, so end it first, in its own datagram.
            self.upstream(Upstream::EndReload);
        }
        self.upstream(Upstream::Stopping);
        for i in 0..self.gens.len() {
            // Draining ones were asked already (and have no health check).
            if !matches!(self.gens[i].life.state, State::Draining { .. }) {
                self.drain(now, i, Some(Sig::Stop));
            }
        }
        self.check_stopped();
    }

    /// Once no generation is left (and none is being spawned), a stop is
    /// complete.
    pub(super) fn check_stopped(&mut self) {
        if !self.gens.is_empty() || self.spawning.is_some() {
            return;
        }
        if let Phase::Stopping { waiters } = &mut self.phase {
            let waiters = std::mem::take(waiters);
            self.phase = Phase::Ended(Ended::Stopped);
            self.answer(waiters, Outcome::Stopping);
        }
    }
}
