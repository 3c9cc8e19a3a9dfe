//! The processes around the generations, as notify senders: each
//! generation's leader, the process its `MAINPID=` names, its health check,
//! its other descendants; processes that exited (whose pid a stranger may
//! now hold); strangers. Datagrams are attributed by the shell's own pure
//! [`attribute`], with the candidates the shell takes from the core's
//! table (each generation's leader, or the process its `MAINPID=` pinned,
//! and [`Gen::health_check`]) and the model's process tree as the lineage
//! check, and compared with what the model says the sender may do
//! ([`Pids::expected`]).

use std::collections::BTreeMap;

use crate::supervisor::core::Gen;
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
    /// `WATCHDOG=trigger`.
    Trigger,
    /// `WATCHDOG_USEC=` (ms; 0 turns it off).
    WatchdogUsec(u16),
    /// `EXTEND_TIMEOUT_USEC=` (ms; once per generation, at most the
    /// ready timeout, so that invariant 3's deadlines hold).
    Extend(u16),
    /// `FDSTORE=1` with fds: connections (`conn`) or another name.
    Store {
        conn: bool,
        poll: bool,
    },
    /// `FDSTORE_REMOVE=1`.
    Remove {
        conn: bool,
    },
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
    /// Every live generation's processes (its leader not reaped yet).
    pub(super) gens: BTreeMap<u64, Procs>,
    /// Running health checks, by generation (Baton's children, in a
    /// process group of their own: they outlive their generation's leader
    /// unless killed).
    pub(super) checks: BTreeMap<u64, u32>,
    /// Pids of processes that exited, newest last.
    exited: Vec<u32>,
}

impl Pids {
    pub(super) fn new() -> Pids {
        Pids { next: 100, gens: BTreeMap::new(), checks: BTreeMap::new(), exited: Vec::new() }
    }

    fn fresh(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    pub(super) fn exit_pid(&mut self, pid: u32) {
        if self.exited.len() == EXITED_KEPT {
            self.exited.remove(0);
        }
        self.exited.push(pid);
    }

    /// A fresh pid no process had before (an orphan's, a stranger's).
    pub(super) fn fresh_pid(&mut self) -> u32 {
        self.fresh()
    }

    /// A pid for a new child of Baton's: once enough processes were
    /// reaped, the kernel's pids wrap and the oldest reaped one comes back
    /// (the core must tell processes apart by what is alive now).
    fn new_child(&mut self) -> u32 {
        if self.exited.len() == EXITED_KEPT { self.exited.remove(0) } else { self.fresh() }
    }

    /// Generation `g` was spawned: its leader.
    pub(super) fn spawned(&mut self, g: u64) -> u32 {
        let leader = self.new_child();
        self.gens.insert(g, Procs { leader, ..Procs::default() });
        leader
    }

    /// Generation `g`'s leader exited and was reaped: what was left of its
    /// process group (its descendants, still running until the shell
    /// SIGKILLs the group).
    pub(super) fn reaped(&mut self, g: u64) -> Option<Procs> {
        let procs = self.gens.remove(&g)?;
        self.exit_pid(procs.leader);
        Some(procs)
    }

    /// SIGKILL to generation `g`'s group: its descendants die (they are
    /// reaped by Baton as subreaper: returned, to be fed as exits); its
    /// leader dies too (the caller feeds its exit).
    pub(super) fn kill_descendants(&mut self, g: u64) -> Vec<u32> {
        let Some(p) = self.gens.get_mut(&g) else { return Vec::new() };
        p.main = None;
        std::mem::take(&mut p.descendants)
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
        let pid = self.new_child();
        self.checks.insert(g, pid);
        pid
    }

    /// Its health check stops counting as its own: it exited, or it was
    /// sent SIGKILL (its exit is fed later, as an orphan's).
    pub(super) fn take_health_check(&mut self, g: u64) -> Option<u32> {
        self.checks.remove(&g)
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
            Sender::HealthCheck(k) => self.pick(k).and_then(|g| self.checks.get(&g).copied()),
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
    /// shell's own [`attribute`], fed the core's table (`gens`) as the
    /// shell does: each generation's main process (its leader unless
    /// `MAINPID=` pinned another) and the core's idea of its health check.
    pub(super) fn attribute(&self, access: NotifyAccess, pid: u32, gens: &[Gen]) -> Option<u64> {
        let candidates: Vec<Candidate> = gens
            .iter()
            .map(|g| Candidate {
                main_pid: self.gens.get(&g.number).and_then(|p| p.main).unwrap_or(g.leader),
                health_check: g.health_check(),
            })
            .collect();
        let descends = |i: usize| self.gens.get(&gens[i].number).is_some_and(|p| p.descends(pid));
        attribute(access, pid, &candidates, descends).map(|i| gens[i].number)
    }

    /// What the model says: the generation `pid` may notify for under
    /// `access` (its main process always, its health check with `exec` or
    /// `all`, any process of its tree with `all`), independently of
    /// [`attribute`]'s search order.
    pub(super) fn expected(&self, access: NotifyAccess, pid: u32) -> Option<u64> {
        self.gens.iter().find_map(|(g, p)| {
            let check = self.checks.get(g).copied();
            let allowed = p.main_pid() == pid
                || (check == Some(pid) && access != NotifyAccess::Main)
                || (p.descends(pid) && access == NotifyAccess::All);
            allowed.then_some(*g)
        })
    }

    /// Whether `pid` is a live process of generation `g`.
    pub(super) fn owns(&self, g: u64, pid: u32) -> bool {
        self.gens.get(&g).is_some_and(|p| p.descends(pid)) || self.checks.get(&g) == Some(&pid)
    }
}
