//! What an attributed notify datagram changes — `STATUS=`, the watchdog,
//! `EXTEND_TIMEOUT_USEC=`, `FDSTORE=1`/`FDSTORE_REMOVE=1`, `READY=1`,
//! `STOPPING=1` — and where stored connections go. Follows systemd's
//! `service_notify_message()` (src/core/service.c), in its order.

use std::time::Instant;

use baton_sd::StoredName;

use super::{Action, Core, FdStore, Lost, Notice, Said, Timing, Upstream};
use crate::supervisor::core::Event;
use crate::supervisor::failure::{ProbationFailure, WatchdogCause};
use crate::supervisor::lifecycle::State;

impl Core {
    pub(super) fn notified(&mut self, now: Instant, generation: u64, notice: Notice) {
        let Some(i) = self.index(generation) else {
            // Attributed by the shell from this very table; gone only if
            // fds came with it, which must not leak.
            if let Some(FdStore::Store { fds, .. }) = notice.fdstore {
                self.actions.push(Action::CloseFds { fds });
            }
            return;
        };
        let g = &mut self.gens[i];
        if let Some(s) = notice.status {
            g.status_text = Some(s);
        }
        for t in notice.timing {
            match t {
                Timing::Ping => g.life.ping(now),
                Timing::WatchdogUsec(u) => g.life.set_watchdog(now, u),
                Timing::ExtendUsec(u) => g.life.extend(now, u),
            }
        }
        if notice.watchdog_trigger {
            self.watchdog_expired(now, i, WatchdogCause::Triggered);
        }
        match notice.fdstore {
            Some(FdStore::Remove { name }) => {
                self.actions.push(Action::RemoveStored { name: name.clone() });
                self.upstream(Upstream::FdStoreRemove { name });
            }
            Some(FdStore::Store { name, fds, poll }) => {
                // Connections stored by a generation that is not the active
                // one go straight to the active generation, if it listens
                // for them. With no active generation (Baton is stopping)
                // they are kept in the store, forwarded to systemd's, for
                // whoever runs next.
                let to = self.active().filter(|a| a.handoff).map(|a| a.number);
                match to {
                    Some(to)
                        if StoredName::parse(&name) == StoredName::Connection
                            && self.gens[i].life.state != State::Active =>
                    {
                        self.actions.push(Action::PushConnections { fds, name, poll, to })
                    }
                    _ => self.actions.push(Action::StoreFds { fds, name, poll }),
                }
            }
            None => {}
        }
        match notice.lifecycle {
            Some(Said::Ready) => self.on_ready(now, i),
            // A generation's STOPPING=1 is never forwarded upstream: from
            // systemd 259 on, STOPPING=1 is final for the whole unit.
            Some(Said::Stopping) if self.gens[i].life.state == State::Active => {
                // It is stopping already: no signal.
                self.drain(now, i, None);
                self.enforce_draining_limit(now);
                let replaced = !self.is_stopping();
                self.log(Event::StoppingOnItsOwn { generation, replaced });
                if replaced {
                    self.serving_lost(now, Lost::Stopping);
                }
            }
            // On probation: it gives up the traffic it just took.
            Some(Said::Stopping) if matches!(self.gens[i].life.state, State::Probation { .. }) => {
                self.hand_back(now, i, ProbationFailure::Stopping, None);
            }
            Some(Said::Stopping) | None => {}
        }
    }

    /// Generation `generation` connected to the handoff socket: it may
    /// have become active before we saw it connect.
    pub(super) fn handoff_connected(&mut self, generation: u64) {
        if let Some(i) = self.index(generation) {
            self.gens[i].handoff = true;
            self.flush_connections();
        }
    }

    /// Stored connections go to the active generation, if it listens for
    /// them (the shell moves those it has not seen yet).
    pub(super) fn flush_connections(&mut self) {
        if let Some(to) = self.active().filter(|a| a.handoff).map(|a| a.number) {
            self.actions.push(Action::FlushConnections { to });
        }
    }
}
