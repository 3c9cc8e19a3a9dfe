//! The shell's side of proving and steering: which sockets a generation on
//! a [`Slot`] gets, the built-in probes it is sent, and carrying out the
//! core's steering decisions on the listening sockets
//! ([`crate::steering`]): flips, the wait for an old generation's accept
//! queue to empty, and the connections rescued from a failed one's.

use std::time::Duration;

use super::*;
use crate::steering;

/// How often the accept queue of the generation about to be retired is
/// looked at (a non-blocking `TCP_INFO` read per steered listener).
pub(super) const QUEUE_POLL: Duration = Duration::from_millis(5);
/// How long Baton waits for that queue to empty: the old generation still
/// accepts (it was not signalled), so it normally takes microseconds; one
/// that stopped accepting must not hold up the restart for ever.
pub(super) const QUEUE_WAIT: Duration = Duration::from_secs(1);
/// At most this many connections are rescued from a failed generation's
/// queue (its backlog bounds them anyway).
const RESCUE_MAX: usize = 4096;

impl Supervisor {
    /// Whether any listening socket is steered (else every generation
    /// accepts from the same sockets).
    pub(super) fn steers(&self) -> bool {
        self.cfg.steering.as_ref().is_some_and(steering::Steering::is_steering)
    }

    /// The listening sockets a generation on `slot` gets, with their
    /// names, in `LISTEN_FDS` order.
    pub(super) fn listeners_for(&self, slot: Slot) -> Vec<(BorrowedFd<'_>, &str)> {
        match &self.cfg.steering {
            Some(s) => s.sockets_for(to_steering(slot)).into_iter().zip(s.names()).collect(),
            None => self.cfg.sockets.iter().map(|s| (s.fd.as_fd(), s.name.as_str())).collect(),
        }
    }

    /// Steers new connections to `to`'s sockets (or `percent` % of them).
    pub(super) fn steer(&mut self, to: Slot, percent: Option<u8>) {
        let Some(s) = self.cfg.steering.as_ref().filter(|s| s.is_steering()) else { return };
        let slot = to_steering(to);
        let done = match percent {
            None => s.steer(slot),
            Some(p) => s.canary(slot, p),
        };
        match done {
            Ok(()) => tracing::debug!(event = "steered", slot = %slot, percent, "new connections go to slot {slot}"),
            // Traffic stays where it went: the old generation keeps it,
            // which costs nothing but the candidate's proof by traffic.
            Err(e) => tracing::error!(event = "steer-failed", "cannot steer new connections to slot {slot}: {e}"),
        }
    }

    /// Says [`Input::QueueDrained`] once `slot`'s listeners have nothing
    /// queued (at once without steering), looking every [`QUEUE_POLL`] for
    /// at most [`QUEUE_WAIT`].
    pub(super) fn await_queue_drained(&mut self, slot: Slot) {
        self.queue_watch = Some((slot, Instant::now() + QUEUE_WAIT));
        self.check_queue();
    }

    /// One look at the watched queue.
    pub(super) fn check_queue(&mut self) {
        let Some((slot, until)) = self.queue_watch else { return };
        let queued = match self.cfg.steering.as_ref().filter(|s| s.is_steering()) {
            Some(s) => s.queued(to_steering(slot)),
            None => Ok(0),
        };
        let done = match queued {
            Ok(0) => true,
            Ok(n) if Instant::now() >= until => {
                tracing::warn!(
                    event = "queue-not-drained",
                    queued = n,
                    "the old generation left {n} connection(s) queued for {QUEUE_WAIT:?}; retiring it anyway \
                     (they are accepted by the next generation on its sockets)"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(
                    event = "queue-unreadable",
                    "cannot read the accept queue: {e}; retiring the old generation"
                );
                true
            }
        };
        if done {
            self.queue_watch = None;
            self.feed(Input::QueueDrained { slot });
        }
    }

    /// Gives what is queued on `from`'s listeners (a generation failed
    /// after traffic was steered to it) to generation `to`: straight to it
    /// if it adopts connections (`$BATON_HANDOFF_SOCKET`), else relayed to
    /// it through the listening address, which steering now sends to it.
    pub(super) fn rescue_queued(&mut self, from: Slot, to: u64) {
        let Some(s) = self.cfg.steering.as_ref().filter(|s| s.is_steering()) else { return };
        let taken = match s.take_queued(to_steering(from), RESCUE_MAX) {
            Ok(t) => t,
            Err(e) => {
                return tracing::error!(
                    event = "rescue-failed",
                    "cannot take the connections queued on slot {from:?}: {e}"
                );
            }
        };
        // A client that closed before sending anything (calibration's
        // probe, one that gave up) needs no server: relayed, it would
        // reach the app as a connection from Baton.
        let taken: Vec<_> = taken.into_iter().filter(|(_, fd)| !closed_unused(fd.as_fd())).collect();
        if taken.is_empty() {
            return;
        }
        let count = taken.len();
        tracing::info!(
            event = "rescued",
            generation = to,
            count,
            "{count} connection(s) queued on slot {from:?}'s sockets go to generation {to}"
        );
        if self.procs(to).is_some_and(|p| p.handoff.is_some()) {
            let fds = taken.into_iter().map(|(_, fd)| ReceivedFd::new(fd)).collect();
            return self.push_connections(baton_sd::fdstore::CONNECTION, fds, true, to);
        }
        for (_, fd) in taken {
            self.relay(fd);
        }
    }

    /// Relays one rescued connection to a new connection to the address
    /// it was made to (which steering now sends to the serving
    /// generation), until either side closes.
    fn relay(&mut self, fd: OwnedFd) {
        if self.relays.len() >= RESCUE_MAX {
            // Bounded: beyond it the connection is closed (its client sees
            // a reset), never queued without limit.
            return tracing::warn!(
                event = "relay-refused",
                "{RESCUE_MAX} rescued connections are relayed already; closing one more"
            );
        }
        let client = std::net::TcpStream::from(fd);
        let Ok(addr) = client.local_addr() else { return };
        self.relays.spawn(async move {
            let Ok(mut client) = tokio::net::TcpStream::from_std(client) else { return };
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut server) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                Err(e) => tracing::warn!(event = "relay-failed", "cannot relay a rescued connection to {addr}: {e}"),
            }
        });
    }

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

/// Whether the peer of `conn` closed it without sending a byte (it reads
/// EOF at once); a peek, so nothing is taken from one that did send.
fn closed_unused(conn: BorrowedFd<'_>) -> bool {
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(conn, &mut [0u8; 1][..], flags), Ok((0, _)))
}

/// The steering module's name for a core slot.
fn to_steering(slot: Slot) -> steering::Slot {
    match slot {
        Slot::A => steering::Slot::A,
        Slot::B => steering::Slot::B,
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
