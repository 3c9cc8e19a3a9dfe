//! Notify datagrams: who sent them (`--notify-access`, see
//! [`crate::lineage`]) and what they change — READY=1, STOPPING=1,
//! STATUS=, MAINPID=, the watchdog, EXTEND_TIMEOUT_USEC=, FDSTORE=.
//! Follows systemd's `service_notify_message()` (src/core/service.c).

use super::core::{FdStore, Notice, Said, Timing};
use super::*;

impl Supervisor {
    pub(super) fn on_datagram(&mut self, mut d: Datagram) {
        // Refused datagrams drop their fds through the closer thread
        // (`ReceivedFd`), and are logged within the rate limit.
        let Some(number) = self.attribute(d.pid) else {
            if self.refusals.allow(Refused::Notify, Some(d.pid)) {
                tracing::warn!(
                    event = "notify-refused",
                    sender = d.pid,
                    "notify message from pid {} refused: not a generation's {} process",
                    d.pid,
                    match self.cfg.policy.notify_access {
                        NotifyAccess::All => "",
                        _ => "main",
                    }
                );
            }
            // `baton notify` ends with a barrier: tell it, not just the log.
            crate::notify_refusal::answer_refused_barrier(&d.payload, &d.fds, d.pid, self.cfg.policy.notify_access);
            return;
        };
        let msg = match wire::parse(&d.payload) {
            Ok(m) => m,
            Err(e) => {
                if self.refusals.allow(Refused::Notify, Some(d.pid)) {
                    tracing::warn!(
                        event = "notify-refused",
                        sender = d.pid,
                        "notify message from pid {} refused: {e}",
                        d.pid
                    );
                }
                return;
            }
        };
        for bad in &msg.invalid {
            tracing::warn!(event = "notify-invalid", sender = d.pid, "ignoring {:?}: {}", bad.line, bad.reason);
        }
        match msg.barrier() {
            BarrierUse::Valid if d.fds.len() == 1 => {
                // Everything sent before was processed (one task, in order):
                // closing the fd is the acknowledgement.
                d.fds.clear();
                return;
            }
            BarrierUse::None => {}
            _ => {
                tracing::warn!(
                    event = "notify-refused",
                    sender = d.pid,
                    "BARRIER=1 must come alone with exactly one fd; ignoring the message"
                );
                return;
            }
        }
        self.main_pid_named(number, &msg, &mut d.fds);
        let mut notice = Notice { status: msg.status().map(str::to_owned), ..Notice::default() };
        for f in &msg.fields {
            match f {
                NotifyState::Watchdog => notice.timing.push(Timing::Ping),
                NotifyState::WatchdogUsec(u) => notice.timing.push(Timing::WatchdogUsec(*u)),
                NotifyState::ExtendTimeoutUsec(u) => notice.timing.push(Timing::ExtendUsec(*u)),
                _ => {}
            }
        }
        notice.watchdog_trigger = msg.has(&NotifyState::WatchdogTrigger);
        if msg.has(&NotifyState::FdStoreRemove) {
            notice.fdstore = msg.fdname().map(|name| FdStore::Remove { name: name.to_owned() });
        } else if msg.has(&NotifyState::FdStore) && !d.fds.is_empty() {
            let name = msg.fdname().unwrap_or("stored").to_owned();
            let poll = !msg.has(&NotifyState::FdPollDisable);
            let fds = self.fds.hold(std::mem::take(&mut d.fds));
            notice.fdstore = Some(FdStore::Store { name, fds, poll });
        }
        if !d.fds.is_empty() {
            tracing::warn!(event = "notify-fds-closed", "closing {} fd(s) sent without FDSTORE=1", d.fds.len());
        }
        notice.lifecycle = match msg.lifecycle() {
            Some(Lifecycle::Ready) => Some(Said::Ready),
            Some(Lifecycle::Stopping) => Some(Said::Stopping),
            Some(Lifecycle::Reloading) | None => None,
        };
        self.feed(Input::Notified { generation: number, notice });
    }

    /// `MAINPID=`, `MAINPIDFD=1` and `MAINPIDFDID=`: which process is
    /// generation `number`'s main process now (pinned by a pidfd: this is
    /// the shell's, the core never needs a pid's liveness).
    fn main_pid_named(&mut self, number: u64, msg: &wire::Message<'_>, fds: &mut Vec<ReceivedFd>) {
        let claimed = msg.find(|f| match f {
            NotifyState::MainPid(p) => Some(*p),
            _ => None,
        });
        let pidfd_id = msg.find(|f| match f {
            NotifyState::MainPidFdId(id) => Some(*id),
            _ => None,
        });
        // MAINPIDFD=1 (systemd >= 257): exactly one fd, the new main
        // process's pidfd; FDSTORE=1 in the same message would be ambiguous.
        let pidfd = (msg.has(&NotifyState::MainPidFd) && fds.len() == 1 && !msg.has(&NotifyState::FdStore))
            .then(|| fds.pop())
            .flatten();
        if msg.has(&NotifyState::MainPidFd) && pidfd.is_none() {
            tracing::warn!(
                event = "notify-invalid",
                "MAINPIDFD=1 for generation {number} ignored: it needs exactly one fd, the pidfd, and no FDSTORE=1 ({} attached)",
                fds.len()
            );
        }
        let Some(g) = self.procs_mut(number) else { return };
        let leader = g.child.pid;
        // How the process was named, for the log: race-free (a pidfd, or a
        // pidfd id checked against the process holding the pid) or by pid.
        let (pinned, how) = match (pidfd, claimed) {
            (Some(fd), claimed) => {
                (Some(MainProcess::from_pidfd(fd.into_owned(), claimed, leader).map(Some)), "its pidfd (MAINPIDFD=1)")
            }
            (None, Some(pid)) if pid == leader => (Some(Ok(None)), "pid"),
            (None, Some(pid)) => match pidfd_id {
                Some(id) => (Some(MainProcess::pin_with_id(pid, leader, id).map(Some)), "pid and MAINPIDFDID="),
                None => (Some(MainProcess::pin(pid, leader).map(Some)), "pid"),
            },
            (None, None) => (None, ""),
        };
        match pinned {
            Some(Ok(Some(main))) if main.pid == leader => g.main = None,
            Some(Ok(main)) => {
                if let Some(m) = &main {
                    tracing::info!(
                        event = "main-pid",
                        generation = number,
                        pid = m.pid,
                        "generation {number}'s main process is now {} (named by {how})",
                        m.pid
                    );
                }
                g.main = main;
            }
            Some(Err(why)) => {
                let what = claimed.map_or_else(|| "MAINPIDFD=1".to_owned(), |pid| format!("MAINPID={pid}"));
                tracing::warn!(event = "notify-invalid", "{what} for generation {number} ignored: {why}");
            }
            None => {}
        }
    }

    /// Which generation a notify sender belongs to, per `NotifyAccess`.
    pub(super) fn attribute(&self, pid: u32) -> Option<u64> {
        let gens = self.core.generations();
        let candidates: Vec<Candidate> = gens
            .iter()
            .map(|g| Candidate { main_pid: self.main_pid(g.number), health_check: g.health_check() })
            .collect();
        // Members of the leader's process group that also descend from it:
        // anyone in Baton's session can join the group (see crate::lineage).
        let descends = |i: usize| {
            self.procs(gens[i].number).is_some_and(|p| p.child.is_running() && lineage::belongs_to(pid, p.child.pid))
        };
        attribute(self.cfg.policy.notify_access, pid, &candidates, descends).map(|i| gens[i].number)
    }
}

/// What attribution knows of a generation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    /// Its main process now ([`Procs::main_pid`]).
    pub(super) main_pid: u32,
    /// Its running health check, if any.
    pub(super) health_check: Option<u32>,
}

/// The generation (index into `candidates`) that `pid` may notify for,
/// like systemd's `service_notify_message_authorized()`: its main process
/// always; its health check with `exec` or `all` (systemd's control
/// process); with `all`, also a process that `descends(i)` from generation
/// `i`'s leader (the only check that needs the system: asked last, and only
/// then). Pure otherwise.
pub(super) fn attribute(
    access: NotifyAccess,
    pid: u32,
    candidates: &[Candidate],
    descends: impl FnMut(usize) -> bool,
) -> Option<usize> {
    if let Some(i) = candidates.iter().position(|c| c.main_pid == pid) {
        return Some(i);
    }
    let health_check = || candidates.iter().position(|c| c.health_check == Some(pid));
    match access {
        NotifyAccess::Main => None,
        NotifyAccess::Exec => health_check(),
        NotifyAccess::All => health_check().or_else(|| {
            (0..candidates.len()).find_map({
                let mut descends = descends;
                move |i| descends(i).then_some(i)
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENERATIONS: [Candidate; 2] =
        [Candidate { main_pid: 10, health_check: None }, Candidate { main_pid: 20, health_check: Some(21) }];

    #[test]
    fn the_main_process_always_notifies() {
        for access in [NotifyAccess::Main, NotifyAccess::Exec, NotifyAccess::All] {
            assert_eq!(attribute(access, 20, &GENERATIONS, |_| panic!("no lineage check needed")), Some(1));
        }
    }

    #[test]
    fn the_health_check_needs_exec_or_all() {
        assert_eq!(attribute(NotifyAccess::Main, 21, &GENERATIONS, |_| true), None);
        assert_eq!(attribute(NotifyAccess::Exec, 21, &GENERATIONS, |_| true), Some(1));
        assert_eq!(attribute(NotifyAccess::All, 21, &GENERATIONS, |_| panic!("found before")), Some(1));
    }

    #[test]
    fn descendants_need_all_and_strangers_are_refused() {
        assert_eq!(attribute(NotifyAccess::Exec, 11, &GENERATIONS, |_| true), None);
        assert_eq!(attribute(NotifyAccess::All, 11, &GENERATIONS, |i| i == 0), Some(0));
        assert_eq!(attribute(NotifyAccess::All, 99, &GENERATIONS, |_| false), None);
    }
}
