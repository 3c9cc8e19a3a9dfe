//! The processes around the generations, as notify senders: each
//! generation's leader, the process its `MAINPID=` names, its health check,
//! its other descendants; processes that exited (whose pid a stranger may
//! now hold); strangers. Datagrams are attributed by the shell's own pure
//! [`attribute`], with the model's process tree as the lineage check, and
//! compared with what the model says the sender may do
//! ([`Pids::expected`]).

use std::collections::BTreeMap;

use crate::supervisor::notify::{Candidate, attribute};
use crate::supervisor::policy::NotifyAccess;

/// Exited pids kept for reuse and for late datagrams (bounded).
const EXITED_KEPT: usize = 32;

/// Who sends a datagram; `u8`s pick a live generation (oldest first,
/// modulo their number) or an exited pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Sender {
    Leader(u8),
    /// The live process its `MAINPID=` named, if any.
    Main(u8),
    HealthCheck(u8),
    /// A descendant of its leader that is not its main process.
    Descendant(u8),
    /// A pid whose process exited (and was reaped): a datagram that
    /// arrives after its sender's exit was handled.
    Exited(u8),
    /// A process that is no generation's: a fresh pid, or (`reuse`) one
    /// that a generation's exited process had.
    Stranger {
        reuse: bool,
    },
}

/// What a datagram says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Msg {
    Ready,
    Stopping,
    Status,
    Watchdog,
    MainPid(Claim),
}

/// The process a `MAINPID=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum Claim {
    /// The generation's own leader (back to it).
    Leader,
    /// Its newest descendant.
    Descendant,
    /// A process that is not the generation's.
    Stranger,
}

/// A generation's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Procs {
    pub(super) leader: u32,
    /// Its descendants (besides the leader), oldest first.
    pub(super) descendants: Vec<u32>,
    /// The descendant `MAINPID=` named, while it lives.
    pub(super) main: Option<u32>,
    /// Its running health check (Baton's child, not the leader's).
    pub(super) health_check: Option<u32>,
}

impl Procs {
    /// Its main process now: the shell's `Generation::main_pid`.
    pub(super) fn main_pid(&self) -> u32 {
        self.main.unwrap_or(self.leader)
    }

    fn descends(&self, pid: u32) -> bool {
        pid == self.leader || self.descendants.contains(&pid)
    }
}

/// The model's process table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pids {
    next: u32,
    /// Every live generation's processes.
    pub(super) gens: BTreeMap<u64, Procs>,
    /// Pids of processes that exited, newest last.
    exited: Vec<u32>,
}

impl Pids {
    pub(super) fn new() -> Pids {
        Pids { next: 100, gens: BTreeMap::new(), exited: Vec::new() }
    }

    fn fresh(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    fn exit_pid(&mut self, pid: u32) {
        if self.exited.len() == EXITED_KEPT {
            self.exited.remove(0);
        }
        self.exited.push(pid);
    }

    /// Generation `g` was spawned: its leader.
    pub(super) fn spawned(&mut self, g: u64) {
        let leader = self.fresh();
        self.gens.insert(g, Procs { leader, ..Procs::default() });
    }

    /// Generation `g` was reaped: its process group is gone with it (the
    /// shell SIGKILLs the group on the leader's exit). Its health check is
    /// not in that group: `true` if one was still running (the caller says
    /// whether the shell killed it).
    pub(super) fn reaped(&mut self, g: u64) -> Option<Procs> {
        let procs = self.gens.remove(&g)?;
        for pid in std::iter::once(procs.leader).chain(procs.descendants.iter().copied()) {
            self.exit_pid(pid);
        }
        if let Some(hc) = procs.health_check {
            self.exit_pid(hc);
        }
        Some(procs)
    }

    /// Generation `g` forks a process.
    pub(super) fn fork(&mut self, g: u64) {
        let pid = self.fresh();
        if let Some(p) = self.gens.get_mut(&g) {
            p.descendants.push(pid);
        }
    }

    /// Generation `g`'s oldest descendant exits (its main process, if
    /// `MAINPID=` named it).
    pub(super) fn child_exits(&mut self, g: u64) {
        let Some(p) = self.gens.get_mut(&g) else { return };
        if p.descendants.is_empty() {
            return;
        }
        let pid = p.descendants.remove(0);
        if p.main == Some(pid) {
            p.main = None;
        }
        self.exit_pid(pid);
    }

    /// Its health check starts.
    pub(super) fn start_health_check(&mut self, g: u64) -> u32 {
        let pid = self.fresh();
        if let Some(p) = self.gens.get_mut(&g) {
            p.health_check = Some(pid);
        }
        pid
    }

    /// Its health check exited (or was killed and reaped).
    pub(super) fn end_health_check(&mut self, g: u64) {
        if let Some(hc) = self.gens.get_mut(&g).and_then(|p| p.health_check.take()) {
            self.exit_pid(hc);
        }
    }

    /// The generation picked by `k`, oldest first.
    pub(super) fn pick(&self, k: u8) -> Option<u64> {
        let n = self.gens.len();
        (n > 0).then(|| *self.gens.keys().nth(k as usize % n).expect("in range"))
    }

    /// The pid `sender` has now, if there is such a process.
    pub(super) fn pid_of(&mut self, sender: Sender) -> Option<u32> {
        let procs = |k| self.pick(k).and_then(|g| self.gens.get(&g));
        match sender {
            Sender::Leader(k) => procs(k).map(|p| p.leader),
            Sender::Main(k) => procs(k).and_then(|p| p.main),
            Sender::HealthCheck(k) => procs(k).and_then(|p| p.health_check),
            Sender::Descendant(k) => {
                procs(k).and_then(|p| p.descendants.iter().copied().rev().find(|d| Some(*d) != p.main))
            }
            Sender::Exited(k) => {
                let n = self.exited.len();
                (n > 0).then(|| self.exited[k as usize % n])
            }
            // A reused pid is no longer an exited one.
            Sender::Stranger { reuse: true } if !self.exited.is_empty() => Some(self.exited.remove(0)),
            Sender::Stranger { .. } => Some(self.fresh()),
        }
    }

    /// The pid `claim` names for generation `g`.
    pub(super) fn claimed(&mut self, g: u64, claim: Claim) -> Option<u32> {
        match claim {
            Claim::Leader => self.gens.get(&g).map(|p| p.leader),
            Claim::Descendant => self.gens.get(&g).and_then(|p| p.descendants.last().copied()),
            Claim::Stranger => Some(self.fresh()),
        }
    }

    /// The generation the shell attributes a datagram from `pid` to: the
    /// shell's own [`attribute`], fed the model's table.
    pub(super) fn attribute(&self, access: NotifyAccess, pid: u32) -> Option<u64> {
        let numbers: Vec<u64> = self.gens.keys().copied().collect();
        let candidates: Vec<Candidate> =
            self.gens.values().map(|p| Candidate { main_pid: p.main_pid(), health_check: p.health_check }).collect();
        let descends = |i: usize| self.gens[&numbers[i]].descends(pid);
        attribute(access, pid, &candidates, descends).map(|i| numbers[i])
    }

    /// What the model says: the generation `pid` may notify for under
    /// `access` (its main process always, its health check with `exec` or
    /// `all`, any process of its tree with `all`), independently of
    /// [`attribute`]'s search order.
    pub(super) fn expected(&self, access: NotifyAccess, pid: u32) -> Option<u64> {
        self.gens.iter().find_map(|(g, p)| {
            let allowed = p.main_pid() == pid
                || (p.health_check == Some(pid) && access != NotifyAccess::Main)
                || (p.descends(pid) && access == NotifyAccess::All);
            allowed.then_some(*g)
        })
    }

    /// Whether `pid` is a live process of generation `g`.
    pub(super) fn owns(&self, g: u64, pid: u32) -> bool {
        self.gens.get(&g).is_some_and(|p| p.descends(pid) || p.health_check == Some(pid))
    }
}
