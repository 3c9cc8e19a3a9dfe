//! Carrying out the core's actions: each becomes a syscall, a log line, an
//! answer or an upstream notification here, in the order the core gave
//! them. Actions that start something (a spawn, a health check) feed its
//! outcome back to the core at once.

use super::*;

/// Fds a datagram brought, by the handle the core names them by. Each is
/// taken by the action the same input produced; whatever is left after
/// that input's actions is closed (none is, by the core's invariant).
#[derive(Default)]
pub(super) struct FdHandles {
    next: u64,
    held: Vec<(FdsHandle, Vec<ReceivedFd>)>,
}

impl FdHandles {
    pub(super) fn hold(&mut self, fds: Vec<ReceivedFd>) -> FdsHandle {
        let handle = FdsHandle(self.next);
        self.next += 1;
        self.held.push((handle, fds));
        handle
    }

    fn take(&mut self, handle: FdsHandle) -> Vec<ReceivedFd> {
        match self.held.iter().position(|(h, _)| *h == handle) {
            Some(i) => self.held.swap_remove(i).1,
            None => Vec::new(),
        }
    }
}

impl Supervisor {
    /// Carries out the core's actions, in order.
    pub(super) fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spawn { generation, slot, .. } => self.spawn_generation(generation, slot),
                Action::Probe { generation } => self.start_probe(generation),
                Action::Steer { to } => self.steer(to, None),
                Action::Canary { to, percent } => self.steer(to, Some(percent)),
                Action::AwaitQueueDrained { slot } => self.await_queue_drained(slot),
                Action::RescueQueued { from, to } => self.rescue_queued(from, to),
                Action::Signal { generation, signal } => self.signal(generation, signal),
                Action::RunHealthCheck { generation } => self.run_health_check(generation),
                Action::KillHealthCheck { generation } => {
                    if let Some(h) = self.procs_mut(generation).and_then(|p| p.health.take()) {
                        let _ = h.signal_group(Signal::KILL);
                    }
                }
                Action::KeepFailedOutput { generation, status_text } => {
                    self.keep_failed_output(generation, status_text)
                }
                Action::AwaitOutput { generation } => {
                    if self.procs(generation).is_some_and(|p| p.output.is_closed()) {
                        self.feed(Input::OutputComplete { generation });
                    }
                }
                Action::Forget { generation } => self.procs.retain(|p| p.number != generation),
                Action::Answer { waiters, outcome } => {
                    let response = self.render_outcome(outcome);
                    self.waiters.answer(&waiters, &response);
                }
                Action::Upstream(up) => self.render_upstream(up),
                Action::StoreFds { fds, name, poll } => {
                    let fds = self.fds.take(fds);
                    self.store_fds(&name, fds, poll);
                }
                Action::PushConnections { fds, name, poll, to } => {
                    let fds = self.fds.take(fds);
                    self.push_connections(&name, fds, poll, to);
                }
                Action::CloseFds { fds } => drop(self.fds.take(fds)),
                Action::RemoveStored { name } => {
                    let removed = self.store.remove(&name);
                    tracing::debug!(event = "fdstore-remove", name, removed);
                    self.tidy_vault();
                }
                Action::FlushConnections { to } => self.flush_connections(to),
                Action::ProbeUpgrade => self.probe_upgrade(),
                Action::RefuseUpgrade(busy) => {
                    self.refuse_upgrade(format!(
                        "busy: {busy}; nothing was changed, retry `baton upgrade` once it is over"
                    ));
                }
                Action::CancelUpgrade => {
                    if let Some(up) = self.upgrading.take() {
                        let message = "baton is stopping; the upgrade was cancelled".into();
                        let _ = up.reply.send(Response::Error { message });
                    }
                }
                Action::ExecuteUpgrade => {
                    // Executed at the top of the run loop, which owns the
                    // control channel (`upgrading` with no probe left).
                }
                Action::Log(event) => self.render_event(event),
                Action::GiveUp(verdict) => {
                    tracing::error!(event = "crash-loop", "{verdict}");
                    self.last_failure = Some(verdict);
                    self.kill_all();
                }
            }
        }
        // Every handle is taken by its action (the core's invariant, checked
        // by the simulation); were one left, it is closed here, not leaked.
        self.fds.held.clear();
    }

    /// Signals generation `generation`'s process group.
    fn signal(&mut self, generation: u64, signal: self::core::Sig) {
        let signal = match signal {
            self::core::Sig::Stop => self.cfg.policy.stop_signal,
            self::core::Sig::Abort => Signal::ABORT,
            self::core::Sig::Kill => Signal::KILL,
        };
        let Some(p) = self.procs(generation) else { return };
        if let Err(e) = p.child.signal_group(signal)
            && signal != Signal::KILL
        {
            tracing::warn!(event = "signal-failed", generation, "cannot signal generation {generation}: {e}");
        }
    }
}
