//! Exits, crash backoff, the crash-loop verdict and the watchdog.

use super::*;

impl Supervisor {
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
        if self.core.restart().is_some_and(|(generation, _)| generation == number) {
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
        g.life.watchdog = None;
        self.enforce_draining_limit();
        // The core counts it as a failure and replaces it (no spawn once a
        // stop signal arrived: see `stop_begun`).
        self.stop_begun();
        self.feed(Input::ServingLost(Lost::Hung));
    }

    pub(super) fn on_exit(&mut self, pid: u32, status: &std::process::ExitStatus) {
        self.on_gone(pid, Exit::from_status(status));
    }

    /// A child is gone (`how` it ended).
    pub(super) fn on_gone(&mut self, pid: u32, how: Exit) {
        // Health check processes.
        if let Some(g) = self.generations.iter_mut().find(|g| g.life.state == State::HealthCheck { pid }) {
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
        let mut g = self.generations.remove(i);
        match g.life.state {
            State::Starting | State::HealthCheck { .. } => {
                let (exit, last_status) = (how, g.status_text.clone());
                let reason = match g.life.state {
                    State::HealthCheck { .. } => StartFailure::ExitedDuringHealthCheck { exit, last_status },
                    _ => StartFailure::ExitedBeforeReady { exit, last_status },
                };
                tracing::warn!(event = "exited", generation = g.number, pid, "generation {} {reason}", g.number);
                // Kill what it left behind in its process group, and its
                // health check, which runs in a group of its own: nothing
                // else would ever stop it (it is reaped as an orphan).
                let _ = g.child.signal_group(Signal::KILL);
                if let Some(check) = g.health.take() {
                    let _ = check.signal_group(Signal::KILL);
                }
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
                // Backoff, unless stopping or a restart is under way (its
                // generation becomes the replacement).
                self.feed(Input::ServingLost(Lost::Crashed));
            }
            State::Draining { .. } => {
                tracing::info!(event = "retired", generation = g.number, pid, "generation {} {how}", g.number);
                let _ = g.child.signal_group(Signal::KILL);
            }
        }
        self.check_stopped();
    }
}
