use super::*;

impl Supervisor {
    /// Backoff for replacing a generation that died on its own (or a first
    /// start that failed); gives up after `burst` failures in `interval`.
    pub(super) fn schedule_replacement(&mut self) {
        if !self.note_failure() {
            return;
        }
        let now = Instant::now();
        let shift = self.consecutive_failures.min(16);
        self.consecutive_failures += 1;
        let delay = (self.cfg.policy.backoff.initial * 2u32.pow(shift)).min(self.cfg.policy.backoff.max);
        tracing::info!(event = "backoff", delay_ms = delay.as_millis() as u64, "next start in {delay:?}");
        self.scheduled = Some(after(now, delay));
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
            let reason = format!(
                "{} failures within {:?}; giving up (see the log for each)",
                self.crashes.len(),
                self.cfg.policy.backoff.interval
            );
            tracing::error!(event = "crash-loop", "{reason}");
            self.last_failure = Some(reason.clone());
            self.ended = Some(Ended::CrashLoop(reason));
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

    pub(super) fn fail_starting(&mut self, number: u64, reason: String) {
        if self.restart.as_ref().is_some_and(|r| r.generation == number) {
            self.finish_restart(Err(reason));
        }
    }

    /// Like systemd: SIGABRT to the hung generation; its exit then triggers
    /// a replacement.
    pub(super) fn watchdog_expired(&mut self, number: u64, why: &str) {
        let Some(g) = self.generations.iter_mut().find(|g| g.number == number) else { return };
        tracing::error!(event = "watchdog", generation = number, pid = g.main_pid(), "generation {number}: {why}");
        self.last_failure = Some(format!("generation {number}: {why}"));
        let _ = g.child.signal_group(Signal::ABORT);
        g.watchdog = None;
        let now = Instant::now();
        g.state = State::Draining { kill_at: after(now, self.cfg.policy.stop_timeout), killed: false };
        // A hung generation counts as a failure: an app that always hangs
        // ends in the crash-loop verdict, not in endless replacements.
        if self.note_failure() {
            self.replace_active();
        }
    }

    /// The active generation is gone or going: start a replacement now,
    /// unless a restart is already under way (it becomes the replacement).
    pub(super) fn replace_active(&mut self) {
        if self.stop_begun() || self.restart.is_some() {
            return;
        }
        self.crash_restarts += 1;
        self.begin_restart(Trigger::Replace, Vec::new());
    }

    pub(super) fn on_exit(&mut self, pid: u32, status: &std::process::ExitStatus) {
        let how = reaper::describe(status);
        self.on_gone(pid, how, status.success());
    }

    /// A child is gone (`how` it ended, and whether it succeeded).
    pub(super) fn on_gone(&mut self, pid: u32, how: String, success: bool) {
        // Health check processes.
        if let Some(g) = self.generations.iter_mut().find(|g| g.state == State::HealthCheck { pid }) {
            let number = g.number;
            g.health = None;
            if success {
                tracing::info!(event = "health-ok", generation = number, "health check passed");
                self.cutover(number);
            } else {
                self.fail_starting(number, format!("health check {how}"));
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
                let mut reason = match g.state {
                    State::HealthCheck { .. } => format!("{how} after READY=1, during its health check"),
                    _ => format!("{how} before READY=1"),
                };
                if let Some(s) = &g.status_text {
                    reason.push_str(&format!(" (last status: {s})"));
                }
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
                let mut failure = format!("generation {} {how} while serving", g.number);
                if let Some(h) = self.output_hint(&g) {
                    failure.push_str(&format!("; {h}"));
                }
                self.last_failure = Some(failure);
                let _ = g.child.signal_group(Signal::KILL);
                if self.stopping.is_none() {
                    if self.restart.is_some() {
                        // The starting generation becomes the replacement.
                    } else {
                        self.schedule_replacement();
                    }
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
