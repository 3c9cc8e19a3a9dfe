//! Deadlines: the next one to sleep until, and what is due when it comes
//! (ready timeouts, stop deadlines, the watchdog, the backoff).

use super::*;

impl Supervisor {
    pub(super) fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut next = far;
        if let Some(at) = self.core.next_deadline() {
            next = next.min(at);
        }
        if let Some(p) = &self.pending_exit {
            next = next.min(p.deadline);
        }
        if let Some(at) = self.flush_retry {
            next = next.min(at);
        }
        if let RestartReset::Due { at, .. } = self.restart_reset {
            next = next.min(at);
        }
        self.generations.iter().filter_map(|g| g.life.next_deadline()).fold(next, Instant::min)
    }

    pub(super) fn on_timers(&mut self) {
        let now = Instant::now();
        if self.pending_exit.as_ref().is_some_and(|p| p.deadline <= now) {
            self.report_pending_exit(true);
        }
        if self.flush_retry.is_some_and(|at| at <= now) {
            self.flush_retry = None;
            self.flush_connections();
        }
        self.restart_reset_if_due(now);
        // A stop signal that arrived drops the backoff instead.
        if self.core.next_deadline().is_some_and(|at| at <= now) && !self.stop_begun() {
            self.feed(Input::Tick);
        }
        let mut failed = None;
        let mut watchdog = Vec::new();
        let timeout = self.cfg.policy.ready_timeout;
        for g in &mut self.generations {
            match g.life.due(now) {
                Some(Due::ReadyTimeout) => failed = Some((g.number, StartFailure::NoReady { timeout })),
                Some(Due::HealthCheckTimeout) => {
                    failed = Some((g.number, StartFailure::HealthCheckTimedOut { timeout }))
                }
                Some(Due::Kill) => {
                    tracing::warn!(
                        event = "forced-kill",
                        generation = g.number,
                        "generation {} still running at the stop deadline; SIGKILL",
                        g.number
                    );
                    g.force_kill();
                }
                Some(Due::Watchdog) => watchdog.push(g.number),
                None => {}
            }
        }
        if let Some((number, reason)) = failed {
            self.fail_starting(number, reason);
        }
        for number in watchdog {
            self.watchdog_expired(number, WatchdogCause::Timeout);
        }
    }
}
