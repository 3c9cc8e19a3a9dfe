//! Datagrams in the simulation's world: attributed by the shell's own
//! `attribute()` (see [`super::senders`]), and only then carried out the
//! way the shell's `on_datagram` does — READY=1 (and the health check it
//! starts), STOPPING=1, STATUS=, WATCHDOG=1, MAINPID=.

use super::senders::{Claim, Msg};
use super::world::{Violation, World};
use crate::control::{Response, RestartDone};
use crate::supervisor::core::{Input, Lost};
use crate::supervisor::lifecycle::State;

impl World {
    /// A datagram from `pid`; `stranger`: its sender is no generation's
    /// (invariant 7: it must change nothing).
    pub(super) fn datagram(&mut self, pid: u32, msg: Msg, stranger: bool) -> Result<(), Violation> {
        self.datagrams += 1;
        let got = self.pids.attribute(self.access, pid);
        let expected = self.pids.expected(self.access, pid);
        if got != expected {
            return Err(format!(
                "{msg:?} from pid {pid} attributed to {got:?}, the model says {expected:?} ({:?})",
                self.access
            ));
        }
        // Refused: the shell logs it (rate-limited) and changes nothing.
        let Some(g) = got else { return Ok(()) };
        if stranger {
            return Err(format!("{msg:?} from pid {pid}, no generation's process, attributed to {g}"));
        }
        self.attributed += 1;
        let Some(state) = self.lives.get(&g).map(|l| l.state) else {
            return Err(format!("attributed to generation {g}, which has no life"));
        };
        match msg {
            Msg::Ready if state == State::Starting => self.ready(g)?,
            // READY=1 again, or after a reload of the app itself: nothing.
            Msg::Ready => {}
            Msg::Stopping if state == State::Active => {
                if self.serving != Some(g) {
                    return Err(format!("generation {g} is active but {:?} serves", self.serving));
                }
                self.serving_lost(Lost::Stopping)?;
            }
            Msg::Stopping | Msg::Status => {}
            Msg::Watchdog => {
                let at = self.at();
                if let Some(life) = self.lives.get_mut(&g) {
                    life.ping(at);
                }
            }
            Msg::MainPid(claim) => self.main_pid(g, claim),
        }
        Ok(())
    }

    /// READY=1 from a starting generation: its health check starts, or it
    /// takes over.
    fn ready(&mut self, g: u64) -> Result<(), Violation> {
        if self.starting.map(|(s, _)| s) != Some(g) {
            return Err(format!("generation {g} is starting but the world starts {:?}", self.starting));
        }
        if !self.health_check {
            return self.cutover(g);
        }
        let pid = self.pids.start_health_check(g);
        if let Some(life) = self.lives.get_mut(&g) {
            life.state = State::HealthCheck { pid };
        }
        Ok(())
    }

    /// `MAINPID=`: the shell pins it only if it is the leader or one of
    /// the leader's live descendants (`lineage::MainProcess::pin`).
    fn main_pid(&mut self, g: u64, claim: Claim) {
        let Some(pid) = self.pids.claimed(g, claim) else { return };
        let Some(p) = self.pids.gens.get_mut(&g) else { return };
        if pid == p.leader {
            p.main = None;
        } else if p.descendants.contains(&pid) {
            p.main = Some(pid);
        }
    }

    /// The starting generation's health check exits (`passed`: status 0);
    /// a hang is its deadline passing ([`super::Move::Advance`]), a crash a
    /// failure.
    pub(super) fn health_check_exits(&mut self, passed: bool) -> Result<(), Violation> {
        let Some((g, _)) = self.starting else { return Ok(()) };
        if self.pids.gens.get(&g).is_none_or(|p| p.health_check.is_none()) {
            return Ok(());
        }
        self.pids.end_health_check(g);
        if passed {
            return self.cutover(g);
        }
        // The shell's `fail_starting`: drained, reported.
        self.starting = None;
        self.drain(g, true)?;
        self.fail_start(g)
    }

    /// Generation `g` takes over: the one serving drains (SIGTERM).
    fn cutover(&mut self, generation: u64) -> Result<(), Violation> {
        self.starting = None;
        if let Some(old) = self.serving.replace(generation) {
            self.drain(old, true)?;
        }
        let at = self.at();
        self.lives.get_mut(&generation).expect("starting is alive").activate(at);
        let done = RestartDone { generation, pid: 1000 + generation as u32, ready_ms: 1, replaced: None };
        self.feed(Input::TookOver { response: Response::Restarted(done) })
    }
}
