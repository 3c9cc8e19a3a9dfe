//! The shell's side of proving and steering: which sockets a generation on
//! a [`Slot`] gets, the built-in probes it is sent, and carrying out the
//! core's steering decisions on the listening sockets.

use super::*;

impl Supervisor {
    /// Whether any listening socket is steered (else every generation
    /// accepts from the same sockets).
    pub(super) fn steers(&self) -> bool {
        false
    }

    /// The listening sockets a generation on `slot` gets, with their
    /// names, in `LISTEN_FDS` order.
    pub(super) fn listeners_for(&self, _slot: Slot) -> impl Iterator<Item = (BorrowedFd<'_>, &str)> {
        self.cfg.sockets.iter().map(|s| (s.fd.as_fd(), s.name.as_str()))
    }

    /// Steers new connections to `to`'s sockets (or `percent` % of them).
    pub(super) fn steer(&mut self, _to: Slot, _percent: Option<u8>) {}

    /// Says [`Input::QueueDrained`] once `slot`'s listeners have nothing
    /// queued.
    pub(super) fn await_queue_drained(&mut self, slot: Slot) {
        self.feed(Input::QueueDrained { slot });
    }

    /// Gives what is queued on `from`'s listeners to generation `to`.
    pub(super) fn rescue_queued(&mut self, _from: Slot, _to: u64) {}

    /// Sends generation `generation` one built-in probe, as a task whose
    /// result comes back to the run loop ([`Input::Probed`]).
    pub(super) fn start_probe(&mut self, generation: u64) {
        let Some(kind) = self.cfg.policy.proving.probe.clone() else { return };
        let timeout = self.cfg.policy.proving.timeout;
        let listener = self.procs(generation).and_then(|p| p.probe.as_ref()).map(|p| (p.fd.try_clone(), p.addr));
        let (listener, addr) = match listener {
            Some((Ok(fd), addr)) => (fd, addr),
            Some((Err(e), _)) => {
                let result = Err(format!("cannot probe: duplicating its probe listener failed: {e}"));
                return self.feed(Input::Probed { generation, result });
            }
            // Every generation has one when probes are configured (the
            // policy implies `--probe`); one adopted from an image without
            // it cannot be probed.
            None => {
                let result = Err("cannot probe: it has no probe listener".into());
                return self.feed(Input::Probed { generation, result });
            }
        };
        self.probes.spawn(async move {
            let result = probes::probe(&kind, &listener, addr, timeout).await.map(|_| ()).map_err(|f| f.to_string());
            (generation, result)
        });
    }
}

/// `status`'s words for how far `g` is proven, while it is being proven or
/// is on probation.
pub(super) fn proving_text(g: &Gen, proving: &Proving, now: Instant) -> Option<String> {
    use lifecycle::State;
    let left = |until: Instant| until.saturating_duration_since(now).as_secs_f64();
    let probes = proving.probe.as_ref().map(|_| match &g.proof.last_failure {
        Some(f) => format!("{} of {} probes passed, last failed: {f}", g.proof.passes, proving.passes),
        None => format!("{} of {} probes passed", g.proof.passes.min(proving.passes), proving.passes),
    });
    let phase = match g.life.state {
        State::Starting | State::HealthCheck { .. } if !g.proof.ready => Some("waiting for readiness".to_owned()),
        State::Starting | State::HealthCheck { .. } => Some(
            g.proof
                .quiet_until
                .map_or("quiet period over".to_owned(), |q| format!("quiet period {:.1}s left", left(q))),
        ),
        State::Probation { until, retiring: false } => Some(format!("probation {:.1}s left", left(until))),
        State::Probation { retiring: true, .. } => Some("the old generation's queue is being emptied".to_owned()),
        State::Active | State::Draining { .. } => None,
    }?;
    Some(match probes {
        Some(p) => format!("{p}, {phase}"),
        None => phase,
    })
}
