//! Proving a candidate before, and after, it takes real traffic: readiness
//! (`READY=1`, the first passing probe, or a timer), built-in probes, the
//! quiet period, the steering flip, probation, and handing the traffic back.
//!
//! ```text
//!  spawned ─ready─► quiet period ──proven──► flip ──► probation ──over──► old's queue empty ──► cutover
//!   (Starting)   (Starting, probes,    (Steer to its slot)  (old Active,          (AwaitQueueDrained)   (old drains)
//!                 health command)                            unsignalled)
//!      │                │                                        │
//!      └─fails──────────┴─► the start fails: it drains,          └─fails─► Steer back, RescueQueued, it drains,
//!         the old one never stopped serving                                the start fails (no crash restart)
//! ```
//!
//! "Proven" is: ready, its `--health-cmd` passed (if any), `--health-passes`
//! probes in a row passed (if probes are configured), and its quiet period
//! over. With nothing serving (the first start, a crash replacement) there
//! is no traffic to protect and no one to hand back to: ready and the health
//! command suffice, and it takes over at once.
//!
//! One probe per generation is out at a time; the next is due
//! `--health-interval` after the last one answered. Probes run from spawn
//! under `--ready probe` (failures before the first pass only mean "not
//! ready yet"), else from readiness, and end with probation: a serving
//! generation is not probed (that is the liveness of the next issue).

use std::time::Instant;

use super::{Action, Core, Event, Sig, Slot, StartFailure, Upstream};
use crate::supervisor::failure::ProbationFailure;
use crate::supervisor::lifecycle::State;
use crate::supervisor::policy::{Readiness, SteeringMode};
use crate::supervisor::{after, micros};

impl Core {
    /// Generation `i` was just spawned: what its readiness waits for.
    pub(super) fn begin_proving(&mut self, now: Instant, i: usize) {
        let proving = &self.policy.proving;
        let g = &mut self.gens[i];
        match proving.ready {
            Readiness::Notify => {}
            Readiness::Probe => g.proof.probe_due = Some(now),
            Readiness::After(d) => g.proof.ready_after = Some(after(now, d)),
        }
    }

    /// `READY=1` from generation `i`.
    pub(super) fn on_ready(&mut self, now: Instant, i: usize) {
        // Under `--ready probe` or `after:` the app's own READY=1 does not
        // decide: the operator chose what readiness means.
        if self.policy.proving.ready == Readiness::Notify {
            self.became_ready(now, i);
        }
    }

    /// Generation `i` is ready: its quiet period begins, its probes and
    /// health command run.
    fn became_ready(&mut self, now: Instant, i: usize) {
        let g = &mut self.gens[i];
        if g.life.state != State::Starting || g.proof.ready {
            return; // READY=1 repeated, or after a reload of the app itself
        }
        g.ready_at = Some(now);
        g.proof.ready = true;
        g.proof.ready_after = None;
        let quiet = self.policy.proving.quiet_period;
        g.proof.quiet_until = Some(after(now, quiet));
        // Proving has the ready timeout again, after the quiet period (the
        // timeout is the app's, to get ready; proving is Baton's).
        let ready_timeout = self.policy.ready_timeout;
        g.life.start_deadline = g.life.start_deadline.max(after(now, quiet + ready_timeout));
        if self.policy.proving.probe.is_some() && g.proof.probe_due.is_none() && !g.proof.probing {
            g.proof.probe_due = Some(now);
        }
        let cmd = self.policy.health_cmd.is_some();
        g.proof.cmd_passed = !cmd;
        let (generation, slot, ready_ms) = (g.number, g.slot, g.ready_ms());
        let proving = &self.policy.proving;
        let (probe, probation) = (proving.probe.is_some(), proving.probation);
        // With nothing serving, it takes over at once: nothing to prove.
        if (!quiet.is_zero() || probe) && self.active().is_some() {
            self.log(Event::Proving { generation, ready_ms });
            // Our own reload timeout upstream must not fire before proving
            // and probation can end.
            let usec = micros(quiet + ready_timeout + probation).saturating_add(5_000_000);
            self.upstream(Upstream::ExtendTimeout { usec });
        }
        if cmd {
            self.actions.push(Action::RunHealthCheck { generation });
        }
        let canary = self.policy.proving.canary;
        if canary > 0
            && self.steering()
            && self.active().is_some_and(|a| a.slot != slot)
            && !self.policy.proving.quiet_period.is_zero()
        {
            self.canary = true;
            self.actions.push(Action::Canary { to: slot, percent: canary });
        }
    }

    /// Its health command passed.
    pub(super) fn health_check_passed(&mut self, i: usize) {
        self.gens[i].life.state = State::Starting;
        self.gens[i].proof.cmd_passed = true;
    }

    /// A probe of `generation` ended.
    pub(super) fn probed(&mut self, now: Instant, generation: u64, result: Result<(), String>) {
        let Some(i) = self.index(generation) else { return };
        let interval = self.policy.proving.interval;
        let g = &mut self.gens[i];
        g.proof.probing = false;
        g.proof.probes += 1;
        let probing = matches!(g.life.state, State::Starting | State::HealthCheck { .. } | State::Probation { .. });
        if probing {
            g.proof.probe_due = Some(after(now, interval));
        }
        match result {
            Ok(()) => {
                g.proof.passes += 1;
                g.proof.last_failure = None;
                if !g.proof.ready && self.policy.proving.ready == Readiness::Probe {
                    self.became_ready(now, i);
                }
            }
            Err(detail) => {
                g.proof.passes = 0;
                g.proof.last_failure = Some(detail.clone());
                match g.life.state {
                    // Not ready yet (`--ready probe`): it may be loading.
                    State::Starting if !g.proof.ready => {}
                    State::Starting | State::HealthCheck { .. } => {
                        self.fail_start(now, generation, StartFailure::ProbeFailed { detail })
                    }
                    State::Probation { .. } => {
                        self.hand_back(now, i, ProbationFailure::ProbeFailed { detail }, Some(Sig::Stop))
                    }
                    State::Active | State::Draining { .. } => {}
                }
            }
        }
    }

    /// Probes and readiness timers that fall due at `now`; probations that
    /// are over.
    pub(super) fn proving_due(&mut self, now: Instant) {
        for i in 0..self.gens.len() {
            let g = &mut self.gens[i];
            let probing = matches!(g.life.state, State::Starting | State::HealthCheck { .. } | State::Probation { .. });
            if g.proof.probe_due.is_some_and(|at| at <= now) {
                g.proof.probe_due = None;
                if probing && !g.proof.probing {
                    g.proof.probing = true;
                    let generation = g.number;
                    self.actions.push(Action::Probe { generation });
                }
            }
            let g = &mut self.gens[i];
            // Over: `proven` reads no quiet period as over.
            if g.proof.quiet_until.is_some_and(|at| at <= now) {
                g.proof.quiet_until = None;
            }
            if g.proof.ready_after.take_if(|at| *at <= now).is_some() {
                self.became_ready(now, i);
            }
            if let State::Probation { until, retiring: false } = self.gens[i].life.state
                && until <= now
            {
                self.retire_old(now, i);
            }
        }
    }

    /// The deadlines of proving: probes, readiness timers, quiet periods,
    /// probations.
    pub(super) fn proving_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.gens.iter().flat_map(|g| {
            let quiet = match g.life.state {
                State::Starting => g.proof.quiet_until,
                _ => None,
            };
            let probation = match g.life.state {
                State::Probation { until, retiring: false } => Some(until),
                _ => None,
            };
            let probe = g.proof.probe_due.filter(|_| !g.proof.probing);
            [probe, g.proof.ready_after, quiet, probation].into_iter().flatten()
        })
    }

    /// `slot`'s accept queues are empty: the candidate that waited for it
    /// takes over.
    pub(super) fn queue_drained(&mut self, now: Instant, slot: Slot) {
        if self.active().is_none_or(|a| a.slot != slot) {
            return;
        }
        let retiring = self.gens.iter().find(|g| matches!(g.life.state, State::Probation { retiring: true, .. }));
        if let Some(generation) = retiring.map(|g| g.number) {
            self.cutover(now, generation);
        }
    }

    /// After every input: a candidate that is proven flips; one on
    /// probation with nothing serving beside it takes over.
    pub(super) fn settle(&mut self, now: Instant) {
        let Some((generation, _)) = self.restart() else { return };
        let Some(i) = self.index(generation) else { return };
        let serving = self.active().is_some();
        let g = &self.gens[i];
        match g.life.state {
            State::Starting if self.proven(g, serving, now) => self.flip(now, i),
            State::Probation { .. } if !serving => self.cutover(now, generation),
            _ => {}
        }
    }

    /// Whether `g` may take the traffic at `now`.
    fn proven(&self, g: &super::Gen, serving: bool, now: Instant) -> bool {
        let p = &g.proof;
        if !p.ready || !p.cmd_passed {
            return false;
        }
        if !serving {
            return true;
        }
        let probes_ok = self.policy.proving.probe.is_none() || p.passes >= self.policy.proving.passes;
        probes_ok && p.quiet_until.is_none_or(|q| q <= now)
    }

    /// Generation `i` is proven: the traffic goes to it; the old one stays
    /// for the probation, or is retired once its queue is empty.
    fn flip(&mut self, now: Instant, i: usize) {
        let (generation, slot) = (self.gens[i].number, self.gens[i].slot);
        let replaced = self.active().map(|a| (a.number, a.slot));
        self.steer(slot);
        let Some(replaced) = replaced.map(|(number, _)| number) else {
            return self.cutover(now, generation);
        };
        let probation = self.policy.proving.probation;
        self.log(Event::Flipped { generation, replaced: Some(replaced), probation });
        let until = after(now, probation);
        self.gens[i].life.on_probation(now, until);
        let proving = &self.policy.proving;
        if !proving.quiet_period.is_zero() || !probation.is_zero() || proving.probe.is_some() {
            // Reported with the outcome; a generation taken at READY=1
            // alone reports what it always did.
            self.gens[i].proof.flipped_at = Some(now);
        }
        // Probes go on through the probation (due already, or soon).
        if self.policy.proving.probe.is_some() && !self.gens[i].proof.probing {
            self.gens[i].proof.probe_due.get_or_insert(now);
        }
        if probation.is_zero() {
            self.retire_old(now, i);
        }
    }

    /// Generation `i`'s probation is over: the old generation is asked to
    /// drain once it accepted everything queued on its sockets (with
    /// shared sockets at once: what it leaves, the new one accepts).
    fn retire_old(&mut self, now: Instant, i: usize) {
        let State::Probation { until, .. } = self.gens[i].life.state else { return };
        self.gens[i].life.state = State::Probation { until, retiring: true };
        match self.active().map(|a| a.slot) {
            Some(slot) if self.steering() => self.actions.push(Action::AwaitQueueDrained { slot }),
            Some(_) => {
                let generation = self.gens[i].number;
                self.cutover(now, generation);
            }
            // Nothing left to retire: `settle` cuts over.
            None => {}
        }
    }

    /// Whether steering may apply (the shell falls back to shared sockets
    /// where it cannot, and then does what the steering actions ask at
    /// once).
    fn steering(&self) -> bool {
        self.policy.proving.steering != SteeringMode::Off
    }

    /// All new connections go to `slot`.
    fn steer(&mut self, slot: Slot) {
        let changed = self.steered != slot || self.canary;
        self.steered = slot;
        self.canary = false;
        if changed && self.steering() {
            self.actions.push(Action::Steer { to: slot });
        }
    }

    /// Generation `i` failed on probation: the traffic goes back to the
    /// serving generation, what was queued on its sockets is given to it,
    /// and the start fails. `signal`: how it is asked to go (`None`: it is
    /// gone or going already).
    pub(super) fn hand_back(&mut self, now: Instant, i: usize, why: ProbationFailure, signal: Option<Sig>) {
        let generation = self.gens[i].number;
        let slot = self.gens[i].slot;
        self.steer_back(generation, slot);
        if !matches!(self.gens[i].life.state, State::Draining { .. }) {
            self.drain(now, i, signal);
        }
        self.fail_start(now, generation, StartFailure::OnProbation(why));
    }

    /// Steering goes back to the serving generation, and what was queued on
    /// `from`'s sockets (failed generation `generation`'s) meanwhile goes to
    /// it too.
    pub(super) fn steer_back(&mut self, generation: u64, from: Slot) {
        let Some((to, slot)) = self.active().map(|a| (a.number, a.slot)) else { return };
        if self.steered == slot && !self.canary {
            return; // no connection was ever steered to `from`
        }
        self.steer(slot);
        if self.steering() {
            self.actions.push(Action::RescueQueued { from, to });
        }
        self.log(Event::HandedBack { generation, to });
    }
}
