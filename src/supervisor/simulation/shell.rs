//! The shell's part in the simulation: the core's actions carried out the
//! way [`Supervisor`](crate::supervisor::Supervisor) does, each checked on
//! the way (invariants 2 to 7 and 9 to 11, see [`super`]).

use super::world::{Asked, READY_TIMEOUT, STOP_TIMEOUT, Violation, World};
use crate::supervisor::core::{Action, Core, Event, FdsHandle, Input, Outcome, Sig, Slot, Token, Upstream};

impl World {
    /// Carries out `actions`, in order. `stopping_before`: whether the core
    /// was stopping before the input that produced them.
    pub(super) fn apply(&mut self, actions: Vec<Action>, stopping_before: bool) -> Result<(), Violation> {
        for action in actions {
            self.carry_out(action, stopping_before)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, action: Action, stopping_before: bool) -> Result<(), Violation> {
        match action {
            Action::Spawn { generation, slot, .. } => self.spawn(generation, slot, stopping_before)?,
            Action::Probe { generation } => {
                self.known(generation, "Probe")?;
                if self.probes_out.contains(&generation) {
                    return Err(format!("a second probe of generation {generation} while one is out"));
                }
                self.probes_out.push(generation);
            }
            Action::Steer { to } | Action::Canary { to, .. } => {
                if matches!(action, Action::Steer { .. }) {
                    self.steered = to;
                }
            }
            Action::AwaitQueueDrained { slot } => {
                if let Some((other, _)) = self.queue_watched.replace((slot, self.now)) {
                    return Err(format!("watching the queue of {slot:?} while still watching {other:?}'s"));
                }
            }
            Action::RescueQueued { from, to } => {
                // To the generation that served when the core decided (it
                // may have stopped serving later in the same input).
                self.known(to, "RescueQueued")?;
                if self.core.generation(to).is_some_and(|g| g.slot == from) {
                    return Err(format!("rescued {from:?}'s queue to generation {to}, on that same slot"));
                }
            }
            Action::Signal { generation, signal } => {
                self.known(generation, "Signal")?;
                if signal == Sig::Kill {
                    self.kill_group(generation);
                }
                // `--stop-signal` and SIGABRT: the app exits when it likes,
                // or never (then the stop deadline's SIGKILL).
            }
            Action::RunHealthCheck { generation } => {
                self.known(generation, "RunHealthCheck")?;
                if !self.pids.gens.contains_key(&generation) {
                    return Err(format!("health check for generation {generation}, whose leader is gone"));
                }
                if self.pids.checks.contains_key(&generation) {
                    return Err(format!("a second health check for generation {generation}"));
                }
                if std::mem::take(&mut self.choices.check_not_run) {
                    let why = "sh: not found".into();
                    self.feed(Input::HealthCheckNotRun { generation, why })?;
                } else {
                    let pid = self.pids.start_health_check(generation);
                    self.feed(Input::HealthCheckStarted { generation, pid })?;
                }
            }
            Action::KillHealthCheck { generation } => {
                self.known(generation, "KillHealthCheck")?;
                if let Some(pid) = self.pids.take_health_check(generation) {
                    self.dying.push((pid, None));
                }
            }
            Action::KeepFailedOutput { generation, .. } => {
                if !self.spawned.contains(&generation) {
                    return Err(format!("kept the output of generation {generation}, never spawned"));
                }
            }
            Action::AwaitOutput { generation } => {
                self.known(generation, "AwaitOutput")?;
                match self.choices.output_later {
                    None => self.feed(Input::OutputComplete { generation })?,
                    Some(true) => self.output_pending = Some(generation),
                    Some(false) => {}
                }
            }
            Action::Forget { generation } => {
                self.known(generation, "Forget")?;
                if self.pids.gens.contains_key(&generation) {
                    return Err(format!("forgot generation {generation}, whose leader still runs"));
                }
                self.forgotten.insert(generation);
                self.handoff.remove(&generation);
                if self.output_pending == Some(generation) {
                    self.output_pending = None;
                }
            }
            Action::Answer { waiters, outcome } => self.answered(waiters, &outcome)?,
            Action::Upstream(up) => self.upstream(up)?,
            Action::StoreFds { fds, .. } | Action::CloseFds { fds } => self.consume(fds)?,
            Action::PushConnections { fds, to, .. } => {
                self.consume(fds)?;
                self.known(to, "PushConnections")?;
                if self.active() != Some(to) || !self.handoff.contains(&to) {
                    return Err(format!("connections pushed to generation {to}, not the active one with a handoff"));
                }
            }
            Action::RemoveStored { .. } => {}
            Action::FlushConnections { to } => {
                self.known(to, "FlushConnections")?;
                if !self.handoff.contains(&to) {
                    return Err(format!("connections flushed to generation {to}, which has no handoff"));
                }
            }
            Action::ProbeUpgrade => {
                if std::mem::replace(&mut self.probing, true) {
                    return Err("a second upgrade probe while one runs".into());
                }
            }
            Action::RefuseUpgrade(_) => {}
            Action::CancelUpgrade => {
                if !std::mem::take(&mut self.probing) {
                    return Err("cancelled an upgrade that was not being probed".into());
                }
            }
            Action::ExecuteUpgrade => {
                if std::mem::replace(&mut self.upgrade_due, true) {
                    return Err("ExecuteUpgrade twice".into());
                }
            }
            Action::Log(event) => self.logged(&event)?,
            Action::GiveUp(_) => {
                let interval = self.policy.backoff.interval;
                let window = self.failures.iter().filter(|t| self.now - **t <= interval).count();
                if window as u32 <= self.policy.backoff.burst {
                    return Err(format!("crash-loop verdict after {window} failures in the window"));
                }
                // kill_all: every group and health check; the run loop
                // returns at its next turn.
                for g in self.core.generations().iter().map(|g| g.number).collect::<Vec<_>>() {
                    self.given_up.insert(g);
                    self.kill_group(g);
                }
                let checks: Vec<u64> = self.pids.checks.keys().copied().collect();
                for g in checks {
                    let pid = self.pids.take_health_check(g).expect("listed");
                    self.dying.push((pid, None));
                }
            }
        }
        Ok(())
    }

    /// Invariant 4 (and the shell's spawn: it runs, or it cannot be spawned).
    fn spawn(&mut self, generation: u64, slot: Slot, stopping_before: bool) -> Result<(), Violation> {
        if stopping_before || self.core.is_stopping() {
            return Err(format!("spawned generation {generation} while stopping"));
        }
        if let Some(s) = self.starting() {
            return Err(format!("spawned generation {generation} while {s} is starting"));
        }
        if generation <= self.last_spawned {
            return Err(format!("generation {generation} after {}", self.last_spawned));
        }
        self.last_spawned = generation;
        self.spawned.insert(generation);
        if std::mem::take(&mut self.choices.spawn_fails) {
            let why = "No such file or directory (os error 2)".into();
            self.feed(Input::SpawnFailed { generation, why })?;
        } else {
            let leader = self.pids.spawned(generation);
            self.running.insert(generation);
            self.feed(Input::Spawned { generation, leader, slot })?;
        }
        Ok(())
    }

    /// Invariant 5: an action names a generation the core spawned, that
    /// runs (or ran), and that the shell has not forgotten.
    fn known(&self, generation: u64, what: &str) -> Result<(), Violation> {
        if !self.running.contains(&generation) {
            return Err(format!("{what} names generation {generation}, which never ran"));
        }
        if self.forgotten.contains(&generation) {
            return Err(format!("{what} names generation {generation}, already forgotten"));
        }
        Ok(())
    }

    /// SIGKILL to generation `g`'s process group: all of it dies (reaped
    /// later, [`World::advance`] or [`super::Move::Reap`]).
    fn kill_group(&mut self, g: u64) {
        if let Some(left) = self.group_pending.remove(&g) {
            self.dying.extend(left.into_iter().map(|pid| (pid, None)));
            return;
        }
        let descendants = self.pids.kill_descendants(g);
        self.dying.extend(descendants.into_iter().map(|pid| (pid, None)));
        if let Some(p) = self.pids.gens.get(&g)
            && !self.dying.contains(&(p.leader, Some(g)))
        {
            self.dying.push((p.leader, Some(g)));
        }
    }

    /// Invariant 7: each handle consumed once.
    fn consume(&mut self, fds: FdsHandle) -> Result<(), Violation> {
        if self.fds_open.remove(&fds) {
            self.consumed.insert(fds);
            return Ok(());
        }
        Err(if self.consumed.contains(&fds) {
            format!("{fds:?} consumed twice")
        } else {
            format!("{fds:?} consumed but never handed over")
        })
    }

    /// Invariants 2 and 3: one answer per caller, the right one, in time.
    pub(super) fn answered(&mut self, waiters: Vec<Token>, outcome: &Outcome) -> Result<(), Violation> {
        for t in waiters {
            let Some((asked, since)) = self.waiting.remove(&t) else {
                return Err(if self.answered.contains(&t) {
                    format!("{t:?} answered twice ({outcome:?})")
                } else {
                    format!("{t:?} answered but never asked")
                });
            };
            self.answered.insert(t);
            if asked == Asked::Stop && *outcome != Outcome::Stopping {
                return Err(format!("{t:?} asked to stop and heard {outcome:?}"));
            }
            self.in_time(t, asked, since)?;
        }
        Ok(())
    }

    /// Invariant 3: how long a caller may wait. A restart's: its own
    /// restart and the one it queued behind, each at most a ready timeout
    /// extended once by as much, plus the output grace of a failed start.
    /// A stop's: the stop timeout (extended once at most by a ready
    /// timeout) from when the stop began.
    pub(super) fn in_time(&self, t: Token, asked: Asked, since: std::time::Duration) -> Result<(), Violation> {
        let (waited, limit) = match asked {
            Asked::Restart => (self.now - since, 4 * READY_TIMEOUT + 2 * crate::supervisor::core::OUTPUT_GRACE),
            Asked::Stop => (self.now - self.stop_began.unwrap_or(since).max(since), STOP_TIMEOUT + READY_TIMEOUT),
        };
        if waited > limit {
            return Err(format!("{t:?} ({asked:?}) still waiting after {waited:?} (limit {limit:?}): wedged"));
        }
        Ok(())
    }

    /// Invariant 6: every `RELOADING=1` ends before the next one and before
    /// `STOPPING=1`, which comes once, and nothing reloads after it.
    fn upstream(&mut self, up: Upstream) -> Result<(), Violation> {
        let u = &mut self.upstream;
        match up {
            Upstream::Reloading { generation } => {
                if u.stopping {
                    return Err(format!("RELOADING=1 for generation {generation} after STOPPING=1"));
                }
                if let Some(open) = u.reload_open.replace(generation) {
                    return Err(format!("RELOADING=1 for generation {generation}; the reload of {open} never ended"));
                }
            }
            Upstream::Serving { generation } | Upstream::StartFailed { generation, .. } => {
                if let Some(open) = u.reload_open.take()
                    && open != generation
                {
                    return Err(format!("the reload of generation {open} ended by generation {generation}'s"));
                }
            }
            Upstream::EndReload => {
                if u.reload_open.take().is_none() {
                    return Err("EndReload without a reload".into());
                }
            }
            Upstream::Stopping => {
                if std::mem::replace(&mut u.stopping, true) {
                    return Err("STOPPING=1 twice".into());
                }
                if let Some(open) = u.reload_open {
                    return Err(format!("STOPPING=1 while the reload of generation {open} was not ended"));
                }
                self.stop_began.get_or_insert(self.now);
            }
            Upstream::RestartReset => {
                u.restart_resets += 1;
                if u.restart_resets > 1 {
                    return Err("RESTART_RESET=1 twice from one image".into());
                }
            }
            Upstream::ExtendTimeout { .. } | Upstream::FdStoreRemove { .. } => {}
        }
        Ok(())
    }

    fn logged(&mut self, event: &Event) -> Result<(), Violation> {
        match event {
            Event::Crashed { .. } | Event::Watchdog { .. } | Event::RestartFailed { .. } => {
                self.failures.push(self.now)
            }
            Event::BackOff { delay } if *delay > self.policy.backoff.max => {
                return Err(format!("backoff of {delay:?} beyond the maximum"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Invariant 10: `baton upgrade` executes only from a stable state;
    /// then (unless the exec fails) the next image adopts the state, as
    /// `Core::adopt` does after the handover.
    pub(super) fn execute_upgrade(&mut self) -> Result<(), Violation> {
        if let Some(busy) = self.core.busy() {
            return Err(format!("upgrade executed while busy: {busy}"));
        }
        if self.choices.upgrade_abandoned {
            // The exec failed: a turn of its own.
            return self.feed(Input::UpgradeAbandoned);
        }
        if let Some(t) = self.waiting.keys().next() {
            return Err(format!("upgrade executed with {t:?} waiting"));
        }
        let gens = self.core.generations().to_vec();
        let counters = self.core.counters().clone();
        self.core = Core::adopt(self.policy.clone(), counters, gens, self.core.flush_retry());
        self.upstream.restart_resets = 0;
        self.upgrades += 1;
        Ok(())
    }
}
