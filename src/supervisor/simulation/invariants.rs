//! The invariants checked after every turn (listed in [`super`]), against
//! the core's own table, and the end-of-run checks.

use super::world::{MAX_DRAINING, Violation, World};
use crate::supervisor::lifecycle::State;

impl World {
    pub(super) fn check(&self) -> Result<(), Violation> {
        if self.has_ended() {
            return Ok(());
        }
        self.same_table()?;
        let gens = self.core.generations();
        let mut starting = gens
            .iter()
            .filter(|g| matches!(g.life.state, State::Starting | State::HealthCheck { .. } | State::Probation { .. }));
        let first = starting.next().map(|g| g.number);
        // Invariant 4: at most one starting, and it is the restart's.
        if let Some(second) = starting.next() {
            return Err(format!("generations {first:?} and {} both starting", second.number));
        }
        let restart = self.core.restart().map(|(g, _)| g);
        if first.is_some() && first != restart {
            return Err(format!("generation {first:?} starting outside a restart ({restart:?})"));
        }
        // Invariant 1: a restart under way waits for something.
        if let Some(r) = restart
            && first != Some(r)
            && self.core.awaiting_output() != Some(r)
        {
            return Err(format!("the restart of generation {r} waits for nothing: wedged"));
        }
        let stopping = self.core.is_stopping();
        // (`busy()` is `None` only with no backoff scheduled, no failure
        // report pending, nothing starting.)
        if !stopping && self.core.active().is_none() && restart.is_none() && self.core.busy().is_none() {
            return Err("nothing serves, nothing starts and no replacement is scheduled".into());
        }
        // Invariant 11: the draining limit, outside a stop.
        let draining = gens.iter().filter(|g| matches!(g.life.state, State::Draining { killed: false, .. })).count();
        if draining > MAX_DRAINING && !stopping {
            return Err(format!("{draining} generations draining, more than {MAX_DRAINING}"));
        }
        // Invariant 12: real traffic goes to proven generations only. While
        // one serves (or is on probation), new connections are steered to
        // no generation that is still being proven; and the shell steers
        // where the core says.
        let proven = |s: &State| matches!(s, State::Active | State::Probation { .. });
        if gens.iter().any(|g| proven(&g.life.state)) {
            let steered = self.core.steered();
            if let Some(g) = gens
                .iter()
                .find(|g| g.slot == steered && matches!(g.life.state, State::Starting | State::HealthCheck { .. }))
            {
                return Err(format!(
                    "new connections steered to generation {}, which is still {}",
                    g.number,
                    g.state_name()
                ));
            }
        }
        if self.policy.proving.steering != crate::supervisor::policy::SteeringMode::Off
            && self.steered != self.core.steered()
            && self.depth == 0
        {
            return Err(format!("the core steers to {:?}, the shell to {:?}", self.core.steered(), self.steered));
        }
        // Invariant 7: fds never outlive the input that brought them.
        if let Some(fds) = self.fds_open.first() {
            return Err(format!("{fds:?} leaked: never stored, pushed or closed"));
        }
        // Invariant 3: nobody waits beyond their deadline.
        for (t, (asked, since)) in &self.waiting {
            self.in_time(*t, *asked, *since)?;
        }
        Ok(())
    }

    /// Invariant 5: the core's table is the world's live leaders, with
    /// their pids and health checks; every main process is its own.
    fn same_table(&self) -> Result<(), Violation> {
        let gens = self.core.generations();
        if !gens.iter().map(|g| g.number).eq(self.pids.gens.keys().copied()) {
            return Err(format!(
                "the core lists generations {:?}, the world runs {:?}",
                gens.iter().map(|g| g.number).collect::<Vec<_>>(),
                self.pids.gens.keys().collect::<Vec<_>>()
            ));
        }
        for g in gens {
            let p = &self.pids.gens[&g.number];
            if p.leader != g.leader {
                return Err(format!(
                    "generation {}: leader {} in the core, {} in the world",
                    g.number, g.leader, p.leader
                ));
            }
            let world = self.pids.checks.get(&g.number).copied();
            if g.health_check() != world {
                return Err(format!(
                    "generation {}: health check {:?} in the core, {world:?} running",
                    g.number,
                    g.health_check()
                ));
            }
            if let Some(m) = p.main
                && !self.pids.owns(g.number, m)
            {
                return Err(format!("generation {}'s main process {m} is not its own", g.number));
            }
        }
        Ok(())
    }

    /// Invariant 9, at the end of a run: every generation that ran was
    /// reaped and forgotten (or killed by the crash-loop verdict, or its
    /// report still waited for output when the run ended), and nothing of
    /// it runs on.
    pub(super) fn everything_reaped(&self) -> Result<(), Violation> {
        for g in &self.running {
            if self.given_up.contains(g) {
                continue;
            }
            if !self.reaped.contains(g) {
                return Err(format!("generation {g} was never reaped"));
            }
            if !self.forgotten.contains(g) && self.awaiting_at_end != Some(*g) {
                return Err(format!("generation {g} was never forgotten"));
            }
        }
        if let Some((g, p)) = self.pids.gens.iter().find(|(g, _)| !self.given_up.contains(g)) {
            return Err(format!("generation {g}'s processes {p:?} outlived the run"));
        }
        if let Some((g, pid)) = self.pids.checks.iter().next() {
            return Err(format!("generation {g}'s health check {pid} outlived the run"));
        }
        if let Some(g) = self.group_pending.keys().next() {
            return Err(format!("generation {g}'s group was never killed"));
        }
        Ok(())
    }
}
