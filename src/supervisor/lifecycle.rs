//! A generation's lifecycle without I/O: its state, its deadlines (the ready
//! timeout, `EXTEND_TIMEOUT_USEC=`, the stop deadline, the watchdog), what
//! is due when, and which draining generations are beyond `--max-draining`.
//!
//! Pure like the [`Core`](super::core::Core): the current time is an
//! argument, nothing here signals or reads a clock; the shell
//! ([`Generation`](super::generation::Generation)) carries out what is due.
//! systemd's equivalents: `service_enter_*()` and the timer of
//! `service_dispatch_timer()`, and `service_handle_watchdog()`
//! (src/core/service.c).

use std::time::{Duration, Instant};

use super::after;

/// Where a generation is in its life (see the diagram in [`super`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Spawned, not yet proven: waiting for its readiness, then in its
    /// quiet period (no real traffic) until its probes prove it.
    Starting,
    /// Its `--health-cmd` runs (after readiness; still no real traffic).
    HealthCheck {
        pid: u32,
    },
    /// It took the traffic (steering flipped to it), and the generation it
    /// replaces still runs, unsignalled, until `until`, to take the
    /// traffic back should it fail; `retiring`: that is over, and the old
    /// generation's accept queue is being emptied before it is signalled.
    Probation {
        until: Instant,
        retiring: bool,
    },
    Active,
    Draining {
        kill_at: Instant,
        killed: bool,
    },
}

/// What is due for a generation at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Still starting at its start deadline: no READY=1 in time.
    ReadyTimeout,
    /// Its health check still running at the start deadline.
    HealthCheckTimeout,
    /// Still draining at its stop deadline: SIGKILL.
    Kill,
    /// Serving, and no `WATCHDOG=1` within its interval.
    Watchdog,
}

/// A generation's state and deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Life {
    pub(super) state: State,
    /// Start deadline (Starting/HealthCheck), extended by
    /// `EXTEND_TIMEOUT_USEC=`.
    pub(super) start_deadline: Instant,
    /// The watchdog interval in force (`WATCHDOG_USEC=` may change it).
    pub(super) watchdog: Option<Duration>,
    pub(super) last_ping: Instant,
}

impl Life {
    /// A generation spawned at `now`.
    pub(super) fn starting(now: Instant, ready_timeout: Duration, watchdog: Option<Duration>) -> Life {
        Life { state: State::Starting, start_deadline: after(now, ready_timeout), watchdog, last_ping: now }
    }

    /// What is due at `now`, if anything.
    pub(super) fn due(&self, now: Instant) -> Option<Due> {
        match self.state {
            State::Starting if self.start_deadline <= now => Some(Due::ReadyTimeout),
            State::HealthCheck { .. } if self.start_deadline <= now => Some(Due::HealthCheckTimeout),
            State::Draining { kill_at, killed: false } if kill_at <= now => Some(Due::Kill),
            State::Active | State::Probation { .. }
                if self.watchdog.is_some_and(|w| after(self.last_ping, w) <= now) =>
            {
                Some(Due::Watchdog)
            }
            _ => None,
        }
    }

    /// When [`due`](Self::due) next has something, if ever.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Starting | State::HealthCheck { .. } => Some(self.start_deadline),
            State::Draining { kill_at, killed: false } => Some(kill_at),
            State::Active | State::Probation { .. } => self.watchdog.map(|w| after(self.last_ping, w)),
            State::Draining { killed: true, .. } => None,
        }
    }

    /// `WATCHDOG=1`.
    pub(super) fn ping(&mut self, now: Instant) {
        self.last_ping = now;
    }

    /// `WATCHDOG_USEC=`: 0 turns it off; anything else restarts it.
    pub(super) fn set_watchdog(&mut self, now: Instant, usec: u64) {
        self.watchdog = (usec != 0).then(|| Duration::from_micros(usec));
        if usec != 0 {
            self.last_ping = now;
        }
    }

    /// `EXTEND_TIMEOUT_USEC=`: the start or stop deadline, never shortened.
    pub(super) fn extend(&mut self, now: Instant, usec: u64) {
        let until = after(now, Duration::from_micros(usec));
        match &mut self.state {
            State::Starting | State::HealthCheck { .. } => self.start_deadline = self.start_deadline.max(until),
            State::Draining { kill_at, killed: false } => *kill_at = (*kill_at).max(until),
            _ => {}
        }
    }

    /// It took over at `now` (its watchdog counts from now, unless it
    /// already did, from its probation).
    pub(super) fn activate(&mut self, now: Instant) {
        if !matches!(self.state, State::Probation { .. }) {
            self.last_ping = now;
        }
        self.state = State::Active;
    }

    /// It took the traffic at `now`, on probation until `until` (its
    /// watchdog counts from now).
    pub(super) fn on_probation(&mut self, now: Instant, until: Instant) {
        self.state = State::Probation { until, retiring: false };
        self.last_ping = now;
    }

    /// Asked to drain: SIGKILL at `kill_at`.
    pub(super) fn drain(&mut self, kill_at: Instant) {
        self.state = State::Draining { kill_at, killed: false };
    }

    /// Sent SIGKILL at `now`.
    pub(super) fn killed(&mut self, now: Instant) {
        self.state = State::Draining { kill_at: now, killed: true };
    }
}

/// Which of `states` (oldest first) to SIGKILL so that at most `max` are
/// draining and not yet killed: the oldest beyond the limit. Indices.
pub(super) fn over_draining_limit<'a>(states: impl Iterator<Item = &'a State>, max: usize) -> Vec<usize> {
    let draining: Vec<usize> = states
        .enumerate()
        .filter(|(_, s)| matches!(s, State::Draining { killed: false, .. }))
        .map(|(i, _)| i)
        .collect();
    let excess = draining.len().saturating_sub(max);
    draining[..excess].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_fall_due_in_each_state() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Life::starting(t0, s(5), Some(s(2)));
        assert_eq!(l.due(t0 + s(4)), None);
        assert_eq!(l.due(t0 + s(5)), Some(Due::ReadyTimeout));
        l.extend(t0 + s(4), 10_000_000);
        assert_eq!(l.due(t0 + s(13)), None);
        assert_eq!(l.next_deadline(), Some(t0 + s(14)));
        l.state = State::HealthCheck { pid: 7 };
        assert_eq!(l.due(t0 + s(14)), Some(Due::HealthCheckTimeout));
        l.activate(t0 + s(6));
        assert_eq!(l.due(t0 + s(7)), None);
        assert_eq!(l.due(t0 + s(8)), Some(Due::Watchdog));
        l.ping(t0 + s(8));
        assert_eq!(l.due(t0 + s(9)), None);
        l.set_watchdog(t0 + s(9), 0);
        assert_eq!((l.due(t0 + s(100)), l.next_deadline()), (None, None));
        l.drain(t0 + s(20));
        l.extend(t0 + s(10), 1_000_000);
        assert_eq!(l.due(t0 + s(19)), None, "extending never shortens");
        assert_eq!(l.due(t0 + s(20)), Some(Due::Kill));
        l.killed(t0 + s(20));
        assert_eq!((l.due(t0 + s(100)), l.next_deadline()), (None, None));
    }

    #[test]
    fn a_huge_extension_saturates() {
        let t0 = Instant::now();
        let mut l = Life::starting(t0, Duration::from_secs(1), None);
        l.extend(t0, u64::MAX);
        assert!(l.due(t0 + Duration::from_secs(3600 * 24 * 365)).is_none());
    }

    #[test]
    fn the_oldest_draining_beyond_the_limit_are_killed() {
        let t0 = Instant::now();
        let d = State::Draining { kill_at: t0, killed: false };
        let k = State::Draining { kill_at: t0, killed: true };
        let states = [d, k, d, State::Active, d, State::Starting];
        assert_eq!(over_draining_limit(states.iter(), 1), [0, 2]);
        assert_eq!(over_draining_limit(states.iter(), 3), Vec::<usize>::new());
    }
}
