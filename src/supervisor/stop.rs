//! Stopping, the shell's side: stop signals are handed to the core first,
//! and the crash-loop verdict kills everything (the core decides the rest:
//! `core::exits`).

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

    /// The crash-loop verdict: SIGKILL every generation and health check.
    /// Only those the core still keeps: one whose leader was reaped already
    /// (its report waiting for its output) had its group killed then, and
    /// its pid may be anyone's now.
    pub(super) fn kill_all(&mut self) {
        let core = &self.core;
        for p in self.procs.iter_mut().filter(|p| core.generation(p.number).is_some()) {
            if let Some(h) = p.health.take() {
                let _ = h.signal_group(Signal::KILL);
            }
            let _ = p.child.signal_group(Signal::KILL);
        }
    }
}
