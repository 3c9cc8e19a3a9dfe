//! Exits, crash backoff, the crash-loop verdict and the watchdog.

use super::*;

impl Supervisor {
    /// Backoff for replacing a generation that died on its own (or a first
    /// start that failed); gives up after `burst` failures in `interval`.
    pub(super) fn schedule_replacement(&mut self) {
        if !self.note_failure() || self.phase.is_stopping() {
            return;
        }
        let now = Instant::now();
        let shift = self.consecutive_failures.min(16);
        self.consecutive_failures += 1;
        let delay = (self.cfg.policy.backoff.initial * 2u32.pow(shift)).min(self.cfg.policy.backoff.max);
        tracing::info!(event = "backoff", delay_ms = delay.as_millis() as u64, "next start in {delay:?}");
        debug_assert!(self.phase.restart().is_none(), "a backoff never replaces a running restart");
        self.phase = Phase::BackingOff { at: after(now, delay) };
    }

    /// Records a failure; `false` (and the crash-loop verdict) once `burst`
    /// failures happened within `interval`.
    pub(super) fn note_failure(&mut self) -> bool {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now - *t > self.cfg.policy.backoff.interval) {
            self.crashes.pop_front();
        }
        if self.crashes.len() as u32 > self.cfg.policy.backoff.burst {
            let verdict =
                Failure::CrashLoop { failures: self.crashes.len(), interval: self.cfg.policy.backoff.interval };
            tracing::error!(event = "crash-loop", "{verdict}");
            self.last_failure = Some(verdict.clone());
            // Callers of a restart still under way hear "stopping".
            self.phase = Phase::Ended(Ended::CrashLoop(verdict));
            self.kill_all();
            return false;
        }
        true
    }

    /// Reports a starting generation's exit once its output is complete (or
    /// `anyway`, at the deadline).
    pub(super) fn report_pending_exit(&mut self, anyway: bool) {
        if !anyway && !self.pending_exit.as_ref().is_some_and(|p| p.output.is_closed()) {
            return;
        }
        let Some(p) = self.pending_exit.take() else { return };
        let lines = p.output.lines();
        self.failed_output = Some(FailedOutput { number: p.number, status_text: p.status_text, lines, hint: p.hint });
        self.fail_starting(p.number, p.reason);
    }

    pub(super) fn fail_starting(&mut self, number: u64, reason: StartFailure) {
        if self.phase.restart().is_some_and(|r| r.generation == number) {
            self.finish_restart(Err(reason));
        }
    }

    /// Like systemd: SIGABRT to the hung generation; its exit then triggers
    /// a replacement.
    pub(super) fn watchdog_expired(&mut self, number: u64, cause: WatchdogCause) {
        let kill_at = self.drain_deadline(Instant::now());
        let Some(g) = self.generations.iter_mut().find(|g| g.number == number) else { return };
        let failure = Failure::Watchdog { generation: number, cause };
        tracing::error!(event = "watchdog", generation = number, pid = g.main_pid(), "{failure}");
        self.last_failure = Some(failure);
        let _ = g.drain(Some(Signal::ABORT), kill_at);
        g.watchdog = None;
        // A hung generation counts as a failure: an app that always hangs
        // ends in the crash-loop verdict, not in endless replacements.
        if self.note_failure() {
            self.replace_active();
        }
    }

    /// The active generation is gone or going: start a replacement now,
    /// unless a restart is already under way (it becomes the replacement).
    pub(super) fn replace_active(&mut self) {
        if self.stop_begun() || self.phase.restart().is_some() {
            return;
        }
        self.crash_restarts += 1;
        self.begin_restart(Trigger::Replace, Waiters::default());
    }

    pub(super) fn on_exit(&mut self, pid: u32, status: &std::process::ExitStatus) {
        self.on_gone(pid, Exit::from_status(status));
    }

    /// A child is gone (`how` it ended).
    pub(super) fn on_gone(&mut self, pid: u32, how: Exit) {
        // Health check processes.
        if let Some(g) = self.generations.iter_mut().find(|g| g.state == State::HealthCheck { pid }) {
            let number = g.number;
            g.health = None;
            if how.success() {
                tracing::info!(event = "health-ok", generation = number, "health check passed");
                self.cutover(number);
            } else {
                self.fail_starting(number, StartFailure::HealthCheckFailed { exit: how });
            }
            return;
        }
        let Some(i) = self.generations.iter().position(|g| g.child.pid == pid) else {
            // An orphaned grandchild we reaped as subreaper.
            tracing::debug!(event = "reaped", pid, "reaped pid {pid} ({how})");
            return;
        };
        let g = self.generations.remove(i);
        match g.state {
            State::Starting | State::HealthCheck { .. } => {
                let (exit, last_status) = (how, g.status_text.clone());
                let reason = match g.state {
                    State::HealthCheck { .. } => StartFailure::ExitedDuringHealthCheck { exit, last_status },
                    _ => StartFailure::ExitedBeforeReady { exit, last_status },
                };
                tracing::warn!(event = "exited", generation = g.number, pid, "generation {} {reason}", g.number);
                // Kill what it left behind in its process group.
                let _ = g.child.signal_group(Signal::KILL);
                self.pending_exit = Some(PendingExit {
                    number: g.number,
                    reason,
                    status_text: g.status_text.clone(),
                    output: g.output.clone(),
                    hint: self.output_hint(&g),
                    deadline: Instant::now() + Duration::from_millis(500),
                });
                self.report_pending_exit(false);
            }
            State::Active => {
                tracing::error!(
                    event = "crashed",
                    generation = g.number,
                    pid,
                    "generation {} {how} while serving",
                    g.number
                );
                let hint = self.output_hint(&g);
                self.last_failure = Some(Failure::CrashedWhileServing { generation: g.number, exit: how, hint });
                let _ = g.child.signal_group(Signal::KILL);
                match self.phase {
                    Phase::Stopping { .. } => {}
                    // The starting generation becomes the replacement.
                    Phase::Restarting { .. } => {}
                    _ => self.schedule_replacement(),
                }
            }
            State::Draining { .. } => {
                tracing::info!(event = "retired", generation = g.number, pid, "generation {} {how}", g.number);
                let _ = g.child.signal_group(Signal::KILL);
            }
        }
        self.check_stopped();
    }
}
