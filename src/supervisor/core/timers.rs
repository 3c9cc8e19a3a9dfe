//! Deadlines: the next one (the shell sleeps until it) and what falls due
//! — a failed start's report, moving connections again, `RESTART_RESET=1`,
//! the backoff, ready timeouts, stop deadlines, the watchdog.

use std::time::Instant;

use super::{Core, Event, RestartReset, StartFailure, Upstream};
use crate::supervisor::failure::WatchdogCause;
use crate::supervisor::lifecycle::Due;
use crate::supervisor::phase::Phase;
use crate::supervisor::policy::Readiness;

impl Core {
    /// The earliest time [`Input::Tick`](super::Input::Tick) has something
    /// to do, if ever.
    pub(in crate::supervisor) fn next_deadline(&self) -> Option<Instant> {
        let backoff = match self.phase {
            Phase::BackingOff { at } => Some(at),
            _ => None,
        };
        let reset = match self.restart_reset {
            RestartReset::Due { at, .. } => Some(at),
            _ => None,
        };
        [backoff, self.pending_exit.as_ref().map(|p| p.deadline), self.flush_retry, reset]
            .into_iter()
            .flatten()
            .chain(self.gens.iter().filter_map(|g| g.life.next_deadline()))
            .chain(self.proving_deadlines())
            .min()
    }

    pub(super) fn tick(&mut self, now: Instant) {
        if self.pending_exit.as_ref().is_some_and(|p| p.deadline <= now) {
            self.report_pending_exit(now);
        }
        if self.flush_retry.is_some_and(|at| at <= now) {
            self.flush_retry = None;
            self.flush_connections();
        }
        self.restart_reset_if_due(now);
        self.backoff_due(now);
        self.proving_due(now);
        let mut failed = None;
        let mut watchdog = Vec::new();
        let timeout = self.policy.ready_timeout;
        for i in 0..self.gens.len() {
            let generation = self.gens[i].number;
            match self.gens[i].life.due(now) {
                Some(Due::ReadyTimeout) => failed = Some((generation, self.not_ready_in_time(i))),
                Some(Due::HealthCheckTimeout) => {
                    failed = Some((generation, StartFailure::HealthCheckTimedOut { timeout }))
                }
                Some(Due::Kill) => {
                    self.log(Event::ForcedKill { generation });
                    self.force_kill(now, i);
                }
                Some(Due::Watchdog) => watchdog.push(generation),
                None => {}
            }
        }
        if let Some((generation, why)) = failed {
            self.fail_start(now, generation, why);
        }
        for generation in watchdog {
            if let Some(i) = self.index(generation) {
                self.watchdog_expired(now, i, WatchdogCause::Timeout);
            }
        }
    }

    /// Why generation `i`, still starting at its start deadline, failed.
    fn not_ready_in_time(&self, i: usize) -> StartFailure {
        let timeout = self.policy.ready_timeout;
        let proof = &self.gens[i].proof;
        if proof.ready {
            StartFailure::NotProven { timeout, passes: proof.passes, needed: self.policy.proving.passes }
        } else if self.policy.proving.ready == Readiness::Probe {
            StartFailure::NoPassingProbe { timeout, last: proof.last_failure.clone() }
        } else {
            StartFailure::NoReady { timeout }
        }
    }

    /// `RESTART_RESET=1` once the generation that cut over is still serving
    /// [`PROVEN_HEALTHY_AFTER`](super::PROVEN_HEALTHY_AFTER) later. systemd
    /// < 258 ignores the unknown assignment (252's
    /// `service_notify_message()` only looks up the keys it knows), so it
    /// is sent whatever the version.
    fn restart_reset_if_due(&mut self, now: Instant) {
        let RestartReset::Due { generation, at } = self.restart_reset else { return };
        if at > now {
            return;
        }
        if self.active_number() == Some(generation) && !self.is_stopping() {
            self.log(Event::RestartReset { generation });
            self.upstream(Upstream::RestartReset);
            self.restart_reset = RestartReset::Done;
        } else {
            self.restart_reset = RestartReset::Waiting;
        }
    }
}
