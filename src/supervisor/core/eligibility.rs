//! When `baton upgrade` may run: only a stable state (no generation
//! starting, no restart pending or scheduled) is handed over, so the new
//! image never has to resume a half-done transition.

use std::fmt;

use super::{Action, Core, Upgrade};
use crate::supervisor::lifecycle::State;
use crate::supervisor::phase::Phase;

/// Why `baton upgrade` cannot happen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Busy {
    Stopping,
    AnotherUpgrade,
    Restarting { generation: u64 },
    Replacing,
    Starting { generation: u64 },
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Busy::Stopping => f.write_str("baton is stopping"),
            Busy::AnotherUpgrade => f.write_str("another upgrade is in progress"),
            Busy::Restarting { generation } => {
                // It may be starting, proven, or on probation.
                write!(f, "a restart is in progress (generation {generation} is not serving alone yet)")
            }
            Busy::Replacing => f.write_str("a crashed generation is being replaced"),
            Busy::Starting { generation } => write!(f, "generation {generation} is starting"),
        }
    }
}

impl Core {
    /// Why the state cannot be handed over now, if it cannot.
    pub(in crate::supervisor) fn busy(&self) -> Option<Busy> {
        if self.is_stopping() {
            return Some(Busy::Stopping);
        }
        if let Some((generation, _)) = self.restart() {
            return Some(Busy::Restarting { generation });
        }
        if matches!(self.phase, Phase::BackingOff { .. }) || self.pending_exit.is_some() {
            return Some(Busy::Replacing);
        }
        self.gens
            .iter()
            .find(|g| !matches!(g.life.state, State::Active | State::Draining { .. }))
            .map(|g| Busy::Starting { generation: g.number })
    }

    pub(super) fn upgrade_requested(&mut self) {
        let busy = match self.upgrade {
            Some(_) if !self.is_stopping() => Some(Busy::AnotherUpgrade),
            _ => self.busy(),
        };
        match busy {
            Some(busy) => self.actions.push(Action::RefuseUpgrade(busy)),
            None => {
                self.upgrade = Some(Upgrade::Probing);
                self.actions.push(Action::ProbeUpgrade);
            }
        }
    }

    pub(super) fn upgrade_probed(&mut self, ok: bool) {
        if self.upgrade != Some(Upgrade::Probing) {
            return;
        }
        self.upgrade = None;
        if !ok {
            return;
        }
        // A restart may have begun while probing.
        match self.busy() {
            Some(busy) => self.actions.push(Action::RefuseUpgrade(busy)),
            None => {
                self.upgrade = Some(Upgrade::Executing);
                self.actions.push(Action::ExecuteUpgrade);
            }
        }
    }
}
