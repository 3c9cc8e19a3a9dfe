use super::*;

impl Supervisor {
    /// Whether Baton's stop has begun, beginning it now if a stop signal
    /// arrived that tokio's stream has not delivered yet: nothing may be
    /// spawned then. Under `KillMode=control-group` systemd's SIGTERM reaches
    /// Baton and the generations at once, and a generation's STOPPING=1 (or
    /// exit) read before the stream fires would otherwise start a
    /// replacement that is stopped right away (see [`crate::stop_signal`]).
    pub(super) fn stop_begun(&mut self) -> bool {
        if self.stopping.is_none() && self.ended.is_none() && crate::stop_signal::arrived() {
            tracing::info!(event = "stop-signal", "stop signal received");
            self.begin_stop(None);
        }
        self.stopping.is_some() || self.ended.is_some()
    }

    pub(super) fn begin_stop(&mut self, reply: Option<oneshot::Sender<Response>>) {
        if let Some(waiters) = &mut self.stopping {
            waiters.extend(reply);
            return;
        }
        tracing::info!(event = "stopping", "stopping all generations");
        if let Some(up) = self.upgrading.take() {
            let _ = up.reply.send(Response::Error { message: "baton is stopping; the upgrade was cancelled".into() });
        }
        if self.restart.as_ref().is_some_and(|r| r.trigger != Trigger::Initial) {
            // We announced RELOADING=1; systemd 252 ignores STOPPING=1 until
            // the reload is over, so end it first, in its own datagram.
            self.upstream_notify(&[NotifyState::Ready]);
        }
        self.upstream_notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        self.stopping = Some(reply.into_iter().collect());
        self.scheduled = None;
        if let Some(r) = self.restart.take() {
            for w in r.waiters {
                let _ = w.send(Response::Stopping);
            }
        }
        for w in self.pending.drain(..) {
            let _ = w.send(Response::Stopping);
        }
        let now = Instant::now();
        for g in &mut self.generations {
            if let Some(h) = g.health.take() {
                let _ = h.signal_group(Signal::KILL);
            }
            if !matches!(g.state, State::Draining { .. }) {
                let _ = g.child.signal_group(self.cfg.policy.stop_signal);
                g.state = State::Draining { kill_at: after(now, self.cfg.policy.stop_timeout), killed: false };
            }
        }
        self.check_stopped();
    }

    pub(super) fn check_stopped(&mut self) {
        if self.generations.is_empty()
            && let Some(waiters) = self.stopping.take()
        {
            for w in waiters {
                let _ = w.send(Response::Stopping);
            }
            self.ended.get_or_insert(Ended::Stopped);
        }
    }

    pub(super) fn kill_all(&mut self) {
        for g in &mut self.generations {
            if let Some(h) = g.health.take() {
                let _ = h.signal_group(Signal::KILL);
            }
            let _ = g.child.signal_group(Signal::KILL);
        }
    }
}
