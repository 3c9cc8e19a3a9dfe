//! Datagrams in the simulation's world: attributed by the shell's own
//! `attribute()` (see [`super::senders`]) over the core's table, then
//! carried out the way the shell's `on_datagram` does: `MAINPID=` stays in
//! the shell (it pins a process of the generation's tree, or refuses);
//! everything else is parsed into a [`Notice`] and fed to the core, with
//! an [`FdsHandle`] for the fds of `FDSTORE=1` (which the core must consume
//! exactly once: invariant 7).

use super::senders::{Claim, Msg};
use super::world::{READY_TIMEOUT, Violation, World};
use crate::supervisor::core::{FdStore, FdsHandle, Input, Notice, Said, Timing};

impl World {
    /// A datagram from `pid`; `stranger`: its sender is no generation's
    /// (invariant 8: it must be refused, and so change nothing).
    pub(super) fn datagram(&mut self, pid: u32, msg: Msg, stranger: bool) -> Result<(), Violation> {
        self.datagrams += 1;
        let got = self.pids.attribute(self.access, pid, self.core.generations());
        let expected = self.pids.expected(self.access, pid);
        if got != expected {
            return Err(format!(
                "{msg:?} from pid {pid} attributed to {got:?}, the model says {expected:?} ({:?})",
                self.access
            ));
        }
        // Refused: the shell logs it (rate-limited) and changes nothing.
        let Some(generation) = got else { return Ok(()) };
        if stranger {
            return Err(format!("{msg:?} from pid {pid}, no generation's process, attributed to {generation}"));
        }
        self.attributed += 1;
        let mut notice = Notice::default();
        match msg {
            Msg::MainPid(claim) => {
                self.main_pid(generation, claim);
                return Ok(());
            }
            Msg::Ready => notice.lifecycle = Some(Said::Ready),
            Msg::Stopping => notice.lifecycle = Some(Said::Stopping),
            Msg::Status => notice.status = Some(format!("busy in generation {generation}")),
            Msg::Watchdog => notice.timing.push(Timing::Ping),
            Msg::Trigger => notice.watchdog_trigger = true,
            Msg::WatchdogUsec(ms) => notice.timing.push(Timing::WatchdogUsec(u64::from(ms) * 1000)),
            Msg::Extend(ms) => {
                if !self.extended.insert(generation) {
                    return Ok(());
                }
                let ms = u64::from(ms).min(READY_TIMEOUT.as_millis() as u64);
                notice.timing.push(Timing::ExtendUsec(ms * 1000));
            }
            Msg::Store { conn, poll } => {
                let fds = FdsHandle(self.next_fds);
                self.next_fds += 1;
                self.fds_open.insert(fds);
                notice.fdstore = Some(FdStore::Store { name: fd_name(conn).into(), fds, poll });
            }
            Msg::Remove { conn } => notice.fdstore = Some(FdStore::Remove { name: fd_name(conn).into() }),
        }
        self.feed(Input::Notified { generation, notice })
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
}

/// A connection (`conn`, which goes to the active generation's handoff)
/// or anything else an app keeps in the store.
fn fd_name(conn: bool) -> &'static str {
    if conn { baton_sd::fdstore::CONNECTION } else { "cache" }
}
