//! The restart transaction: request → spawn → READY=1 → (health check)
//! → cutover → reply to every caller; and a failed start's report.

use super::*;

impl Supervisor {
    pub(super) fn active(&self) -> Option<&Generation> {
        self.generations.iter().find(|g| g.life.state == State::Active)
    }

    /// Starts generation `number` (the core's [`Action::Spawn`]).
    pub(super) fn spawn_generation(&mut self, number: u64, trigger: Trigger) {
        if trigger != Trigger::Initial {
            self.upstream_notify(&[
                NotifyState::Reloading,
                NotifyState::monotonic_usec_now(),
                NotifyState::Status(&format!("starting generation {number}")),
            ]);
        }
        // Our own start/reload timeout upstream must not fire before the
        // app's ready timeout does.
        self.upstream_notify(&[NotifyState::ExtendTimeoutUsec(
            micros(self.cfg.policy.ready_timeout).saturating_add(5_000_000),
        )]);
        match self.spawn(number) {
            Ok(g) => {
                tracing::info!(
                    event = "spawned",
                    generation = number,
                    pid = g.child.pid,
                    "generation {number} started as pid {}",
                    g.child.pid
                );
                self.generations.push(g);
            }
            Err(reason) => self.finish_restart(Err(StartFailure::SpawnFailed(reason))),
        }
    }

    /// The starting generation is ready (and healthy): retire the old one.
    pub(super) fn cutover(&mut self, number: u64) {
        let now = Instant::now();
        let kill_at = self.drain_deadline(now);
        let stop_signal = self.cfg.policy.stop_signal;
        let mut replaced = None;
        for g in &mut self.generations {
            if g.life.state == State::Active {
                replaced = Some(g.number);
                if let Err(e) = g.drain(Some(stop_signal), kill_at) {
                    tracing::warn!(
                        event = "signal-failed",
                        generation = g.number,
                        "cannot signal generation {}: {e}",
                        g.number
                    );
                }
                tracing::info!(
                    event = "draining",
                    generation = g.number,
                    pid = g.main_pid(),
                    "generation {} draining",
                    g.number
                );
            }
        }
        let Some(g) = self.generations.iter_mut().find(|g| g.number == number) else { return };
        g.life.activate(now);
        let done = RestartDone {
            generation: number,
            pid: g.main_pid(),
            ready_ms: g.ready_at.map_or(0, |r| (r - g.spawned_at).as_millis() as u64),
            replaced,
        };
        if self.restart_reset != RestartReset::Done {
            self.restart_reset = RestartReset::Due { generation: number, at: after(now, PROVEN_HEALTHY_AFTER) };
        }
        self.enforce_draining_limit();
        self.flush_connections();
        self.finish_restart(Ok(done));
    }

    /// `RESTART_RESET=1` once the generation that cut over is still serving
    /// [`PROVEN_HEALTHY_AFTER`] later. systemd < 258 ignores the unknown
    /// assignment (252's `service_notify_message()` only looks up the keys
    /// it knows), so it is sent whatever the version.
    pub(super) fn restart_reset_if_due(&mut self, now: Instant) {
        let RestartReset::Due { generation, at } = self.restart_reset else { return };
        if at > now {
            return;
        }
        if self.active().is_some_and(|g| g.number == generation) && !self.stop_begun() {
            tracing::info!(
                event = "restart-reset",
                generation,
                "generation {generation} has served for {PROVEN_HEALTHY_AFTER:?}: RESTART_RESET=1 (earlier restarts of \
                 baton stop counting)"
            );
            self.upstream_notify(&[NotifyState::RestartReset]);
            self.restart_reset = RestartReset::Done;
        } else {
            self.restart_reset = RestartReset::Waiting;
        }
    }

    /// Kills the oldest draining generations beyond `max_draining`: after
    /// every drain but a stop's (which drains them all, each with its full
    /// stop timeout). Found by the simulation: it used to run at cutovers
    /// only, so a failed start, a watchdog or a `STOPPING=1` could leave
    /// more draining until the next cutover, or for good if none came.
    pub(super) fn enforce_draining_limit(&mut self) {
        let beyond = lifecycle::over_draining_limit(
            self.generations.iter().map(|g| &g.life.state),
            self.cfg.policy.max_draining,
        );
        for i in beyond {
            let g = &mut self.generations[i];
            tracing::warn!(
                event = "drain-limit",
                generation = g.number,
                "too many draining generations; killing {}",
                g.number
            );
            g.force_kill();
        }
    }

    /// Ends the running restart: reports its outcome (the core answers all
    /// its callers, and starts the next one if requests arrived meanwhile).
    pub(super) fn finish_restart(&mut self, outcome: Result<RestartDone, StartFailure>) {
        let Some((generation, _)) = self.core.restart() else { return };
        let input = match outcome {
            Ok(done) => {
                tracing::info!(
                    event = "ready",
                    generation = done.generation,
                    pid = done.pid,
                    ready_ms = done.ready_ms,
                    "generation {} ready after {} ms",
                    done.generation,
                    done.ready_ms
                );
                let status = format!("generation {} serving as pid {}", done.generation, done.pid);
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                Input::TookOver { response: Response::Restarted(done) }
            }
            Err(why) => {
                let serving = self.active().map(|g| g.number);
                let failed = self.take_failed(generation);
                let (status_text, log_tail, hint) =
                    failed.map(|f| (f.status_text, f.lines, f.hint)).unwrap_or_default();
                // Inherited output: not in the report, so say where it is.
                let reason = failure::with_hint(&why, &hint);
                let failure = Failure::Start { generation, why, hint };
                let message = failure.to_string();
                tracing::error!(event = "restart-failed", generation, "{message}");
                self.last_failure = Some(failure);
                let status = match serving {
                    Some(s) => format!("{message}; generation {s} keeps serving"),
                    None => message.clone(),
                };
                // A reload must always end with READY=1, or systemd waits
                // for it until its timeout.
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                let response =
                    Response::RestartFailed(RestartFailure { generation, reason, status_text, log_tail, serving });
                // Nothing serving (or a replacement failed): the core
                // backs off and tries again.
                Input::StartFailed { generation, serving: serving.is_some(), response }
            }
        };
        self.feed(input);
    }

    /// Kills a generation that failed to start and returns its last
    /// STATUS= and output lines (from `failed_output` if it already exited).
    pub(super) fn take_failed(&mut self, number: u64) -> Option<FailedOutput> {
        if let Some(f) = self.failed_output.take()
            && f.number == number
        {
            return Some(f);
        }
        let i = self.generations.iter().position(|g| g.number == number)?;
        let hint = self.output_hint(&self.generations[i]);
        let (stop_signal, kill_at) = (self.cfg.policy.stop_signal, self.drain_deadline(Instant::now()));
        let g = &mut self.generations[i];
        // Like systemd after a failed start: ask it to stop, so connections
        // it already accepted from the shared socket are finished, and
        // SIGKILL only at the stop deadline.
        let _ = g.drain(Some(stop_signal), kill_at);
        let failed = FailedOutput { number, status_text: g.status_text.clone(), lines: g.output.lines(), hint };
        self.enforce_draining_limit();
        Some(failed)
    }

    /// Where to read `g`'s output if Baton did not capture it.
    pub(super) fn output_hint(&self, g: &Generation) -> Option<String> {
        match g.output {
            Output::Captured(_) => None,
            Output::Inherited => {
                let since = std::time::SystemTime::now().checked_sub(g.spawned_at.elapsed());
                Some(self.inherited_to.hint(g.main_pid(), since.unwrap_or(std::time::UNIX_EPOCH)))
            }
        }
    }

    pub(super) fn on_ready(&mut self, index: usize) {
        let now = Instant::now();
        let g = &mut self.generations[index];
        if g.life.state != State::Starting {
            return; // READY=1 after a reload of the app itself, or repeated
        }
        g.ready_at = Some(now);
        let number = g.number;
        let pid = g.main_pid();
        match &self.cfg.policy.health_cmd {
            None => self.cutover(number),
            Some(cmd) => {
                let sh = AppCommand::new("/bin/sh".as_ref(), &["-c".into(), cmd.into()]);
                let extra = [("BATON_PID", pid.to_string()), ("BATON_GENERATION", number.to_string())];
                let setup = GenerationSetup {
                    fds: &[],
                    notify_socket: None,
                    watchdog_usec: None,
                    extra_env: &extra,
                    output: None,
                };
                match sh.and_then(|sh| sh.spawn(&setup)) {
                    Ok(child) => {
                        let g = &mut self.generations[index];
                        g.life.state = State::HealthCheck { pid: child.pid };
                        g.health = Some(child);
                    }
                    Err(e) => self.fail_starting(number, StartFailure::HealthCheckNotRun(e.to_string())),
                }
            }
        }
    }
}
