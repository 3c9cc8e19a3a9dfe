//! Stopping: every generation drains, callers hear "stopped" once all
//! are gone.

use super::*;

impl Supervisor {
    /// Whether Baton's stop has begun, beginning it now if a stop signal
    /// arrived that tokio's stream has not delivered yet: nothing may be
    /// spawned then. Under `KillMode=control-group` systemd's SIGTERM reaches
    /// Baton and the generations at once, and a generation's STOPPING=1 (or
    /// exit) read before the stream fires would otherwise start a
    /// replacement that is stopped right away (see [`crate::stop_signal`]).
    pub(super) fn stop_begun(&mut self) -> bool {
        if !self.core.is_stopping() && crate::stop_signal::arrived() {
            tracing::info!(event = "stop-signal", "stop signal received");
            self.begin_stop(None);
        }
        self.core.is_stopping()
    }

    /// `baton stop` (with its caller), SIGTERM or SIGINT.
    pub(super) fn begin_stop(&mut self, reply: Option<oneshot::Sender<Response>>) {
        let waiter = self.waiters.register(reply);
        self.feed(Input::StopRequested { waiter });
    }

    /// The stop began (the core's [`Action::StopAll`]): tell systemd, ask
    /// every generation to drain.
    pub(super) fn stop_all(&mut self, end_reload: bool) {
        tracing::info!(event = "stopping", "stopping all generations");
        if let Some(up) = self.upgrading.take() {
            let _ = up.reply.send(Response::Error { message: "baton is stopping; the upgrade was cancelled".into() });
        }
        if end_reload {
            // We announced RELOADING=1; systemd 252 ignores STOPPING=1 until
            // the reload is over, so end it first, in its own datagram.
            self.upstream_notify(&[NotifyState::Ready]);
        }
        self.upstream_notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        let kill_at = self.drain_deadline(Instant::now());
        let stop_signal = self.cfg.policy.stop_signal;
        for g in &mut self.generations {
            // Draining ones were asked already (and have no health check).
            if !matches!(g.life.state, State::Draining { .. }) {
                let _ = g.drain(Some(stop_signal), kill_at);
            }
        }
        self.check_stopped();
    }

    /// Once no generation is left, a stop is complete.
    pub(super) fn check_stopped(&mut self) {
        if self.generations.is_empty() && self.core.is_stopping() && !self.core.has_ended() {
            self.feed(Input::AllGone);
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
