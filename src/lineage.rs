//! Which processes belong to a generation, for attributing notify datagrams
//! and handoff connections without trusting a bare pid.
//!
//! A pid names a process only while that process exists: once it is reaped,
//! the number is free and any process, of any user, may get it next. Baton
//! therefore never keeps a pid it has not pinned:
//!
//! - a generation's leader (the process Baton started) and its health check
//!   are Baton's own children: their pids cannot be reused before Baton
//!   reaps them. Between the reaping and the supervisor handling that exit
//!   a datagram may come first, so their pidfds are asked too
//!   ([`is_running`]): an exited leader or health check has nothing
//!   attributed to it;
//! - a process named by `MAINPID=` is held by a pidfd ([`MainProcess`]),
//!   opened *before* checking that the pid belongs to the generation; once
//!   that process has exited (the pidfd is readable), its pid no longer
//!   names anything of the generation's and the leader is the main process
//!   again. systemd does the same with its `PidRef` (`src/core/service.c`,
//!   `service_set_main_pidref()`);
//! - `--notify-access all` accepts a sender of the leader's process group
//!   only if it also *descends from the leader* ([`belongs_to`]: its parent
//!   chain in `/proc`, each link checked again after the walk): a process
//!   group is joined with `setpgid()` by anyone in Baton's session, while a
//!   parent chain cannot be forged (only the kernel reparents, and only on
//!   the parent's exit, which the second check sees). The group test comes
//!   first and is one system call, so a flood from strangers costs no
//!   `/proc` walk. systemd uses the unit's cgroup for this (`src/core/service.c`,
//!   `service_notify_message_authorized()`); Baton creates no cgroup of its
//!   own, so it uses ancestry.
//!
//! What this cannot see: the pid in a datagram's `SCM_CREDENTIALS` is the
//! sender's *at send time*. A datagram whose sender exits before Baton reads
//! it, while a process of the generation gets the same pid, is attributed to
//! the generation (the kernel's `SCM_PIDFD`, Linux 6.5, would close this).
//! A descendant whose parent exited is reparented to Baton (the subreaper)
//! and no longer descends from the leader: under `--notify-access all` it is
//! refused, like a stranger.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags};

/// Longest parent chain followed; deeper process trees are refused.
const MAX_DEPTH: usize = 64;

/// A process named by `MAINPID=`, pinned by its pidfd.
#[derive(Debug)]
pub struct MainProcess {
    /// Its pid, valid only while [`is_alive`](Self::is_alive).
    pub pid: u32,
    /// Refers to this very process even after its pid is reused.
    pub pidfd: OwnedFd,
}

impl MainProcess {
    /// Pins `pid` if it is a live process of `leader`'s generation
    /// ([`belongs_to`]); `Err` says why not, for the log.
    pub fn pin(pid: u32, leader: u32) -> Result<MainProcess, String> {
        let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| format!("{pid} is not a pid"))?;
        // The pidfd first: if the process it names is still alive after
        // the ancestry check below, the check was about this process.
        let pidfd =
            rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(|e| format!("no process {pid} ({e})"))?;
        if !belongs_to(pid, leader) {
            return Err(format!(
                "process {pid} is not in the generation's process group {leader} or does not descend from its leader"
            ));
        }
        let pinned = MainProcess { pid, pidfd };
        if !pinned.is_alive() {
            return Err(format!("process {pid} exited"));
        }
        Ok(pinned)
    }

    /// Pins `pid` as [`pin`](Self::pin) does, and checks that it is the
    /// process whose pidfd id (`MAINPIDFDID=`, systemd ≥ 257) the sender
    /// gave: a process that got the pid after the one the sender meant
    /// exited has another id. Without pidfs (Linux < 6.9) no process has an
    /// id to compare, and `MAINPID=` alone decides, as before 257.
    pub fn pin_with_id(pid: u32, leader: u32, pidfd_id: u64) -> Result<MainProcess, String> {
        let pinned = Self::pin(pid, leader)?;
        match baton_sd::pidfs::pidfd_inode_id(pinned.pidfd.as_fd()) {
            Some(id) if id != pidfd_id => Err(format!(
                "process {pid} has pidfd id {id}, not MAINPIDFDID={pidfd_id}: the process meant has exited"
            )),
            _ => Ok(pinned),
        }
    }

    /// Pins the process `pidfd` refers to (`MAINPIDFD=1`, systemd ≥ 257:
    /// the sender attached the new main process's pidfd) if it is a live
    /// process of `leader`'s generation and, when the sender also gave
    /// `MAINPID=` (`claimed`), has that pid. The pidfd names one process
    /// for good, so no pid reuse can slip in between.
    pub fn from_pidfd(pidfd: OwnedFd, claimed: Option<u32>, leader: u32) -> Result<MainProcess, String> {
        let pid = pidfd_pid(pidfd.as_fd())?;
        if let Some(claimed) = claimed.filter(|c| *c != pid) {
            return Err(format!("MAINPID={claimed} but the attached pidfd is of process {pid}"));
        }
        if !belongs_to(pid, leader) {
            return Err(format!(
                "process {pid} (from MAINPIDFD=1) is not in the generation's process group {leader} or does not \
                 descend from its leader"
            ));
        }
        let pinned = MainProcess { pid, pidfd };
        if !pinned.is_alive() {
            return Err(format!("process {pid} exited"));
        }
        Ok(pinned)
    }

    /// Adopts a pidfd handed over by the previous image (`baton upgrade`).
    pub fn adopt(pid: u32, pidfd: OwnedFd) -> MainProcess {
        MainProcess { pid, pidfd }
    }

    /// Whether the process is still running (a pidfd polls readable once
    /// its process has exited, zombie or reaped).
    pub fn is_alive(&self) -> bool {
        is_running(self.pidfd.as_fd())
    }

    /// Borrows the pidfd, for handing it over.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

/// The pid of the process `pidfd` refers to, from the `Pid:` line the
/// kernel writes in a pidfd's `/proc/self/fdinfo` entry (Linux 5.3+; no
/// such line for any other kind of fd). `-1` there means the process has
/// exited, `0` that it is outside Baton's pid namespace.
fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Result<u32, String> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| format!("cannot read the attached fd's fdinfo ({e})"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or("the fd attached to MAINPIDFD=1 is not a pidfd")?
        .trim();
    match pid.parse::<i64>() {
        Ok(p) if p > 0 => u32::try_from(p).map_err(|_| format!("pid {p} out of range")),
        Ok(0) => Err("the pidfd's process is outside Baton's pid namespace".into()),
        Ok(_) => Err("the pidfd's process has exited".into()),
        Err(_) => Err(format!("unreadable pid {pid:?} in the pidfd's fdinfo")),
    }
}

/// Whether the process behind `pidfd` is still running: a pidfd polls
/// readable once its process has exited (zombie or reaped), and an error
/// counts as exited (fail closed).
pub fn is_running(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
}

/// Whether `pid` is in the process group the leader `leader` heads and
/// descends from it: a process of the generation, by the rules above.
pub fn belongs_to(pid: u32, leader: u32) -> bool {
    in_group(pid, leader) && descends_from(pid, leader)
}

/// Whether `pid` is in process group `pgid` (false if it is gone).
pub fn in_group(pid: u32, pgid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // libc rather than rustix: the kernel answers 0 for a process whose group
    // is outside our pid namespace, which rustix's non-zero Pid cannot hold.
    // SAFETY: getpgid only reads kernel state for the given pid.
    let group = unsafe { libc::getpgid(pid) };
    group > 0 && group as u32 == pgid
}

/// Whether `pid` is `ancestor` or one of its descendants, by the parent
/// links in `/proc/PID/stat`. `ancestor` must be pinned by the caller (a
/// child of Baton's not yet reaped), so its number cannot change meaning.
///
/// After reaching `ancestor`, every link is read again: a process of the
/// chain that exited meanwhile had its children reparented (to Baton, the
/// subreaper, or to init), so its pid, possibly reused by now, is not
/// trusted as the parent it was.
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut chain = vec![pid];
    let mut current = pid;
    while current != ancestor {
        if chain.len() > MAX_DEPTH {
            return false;
        }
        match parent_of(current) {
            // 0: the top of our pid namespace; 1: init, above any generation.
            Some(parent) if parent > 1 => {
                chain.push(parent);
                current = parent;
            }
            _ => return false,
        }
    }
    chain.windows(2).all(|link| parent_of(link[0]) == Some(link[1]))
}

/// The parent pid of `pid` (field 4 of `/proc/PID/stat`, after the command
/// name, which may itself hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader of its own group (as Baton starts generations) with one
    /// child in that group: the leader and the child's pid.
    fn leader_with_child() -> (std::process::Child, u32) {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(leader.stdout.take().unwrap()).read_line(&mut line).unwrap();
        (leader, line.trim().parse().unwrap())
    }

    #[test]
    fn ancestry_follows_parent_links() {
        let me = std::process::id();
        let (mut leader, sleeper) = leader_with_child();
        let l = leader.id();
        assert!(descends_from(sleeper, l) && descends_from(sleeper, me) && descends_from(l, me));
        assert!(descends_from(me, me), "a process counts as its own descendant");
        assert!(!descends_from(me, l), "a parent does not descend from its child");
        assert!(!descends_from(1, me), "init descends from nothing of ours");
        assert!(!descends_from(u32::MAX, me), "no such process");
        assert!(belongs_to(sleeper, l) && belongs_to(l, l));
        assert!(!belongs_to(me, l), "neither in the group nor a descendant");
        let pinned = MainProcess::pin(sleeper, l).unwrap();
        assert!(pinned.is_alive());
        assert!(MainProcess::pin(me, l).unwrap_err().contains("does not descend"));
        rustix::process::kill_process(Pid::from_raw(sleeper as i32).unwrap(), rustix::process::Signal::KILL).unwrap();
        // The shell reaps it and exits.
        leader.wait().unwrap();
        assert!(!pinned.is_alive(), "the pidfd sees the exit");
        assert!(MainProcess::pin(sleeper, l).is_err(), "gone");
    }

    #[test]
    fn a_pidfd_or_a_pidfd_id_names_the_main_process() {
        let (mut leader, sleeper) = leader_with_child();
        let l = leader.id();
        let open = |pid: u32| rustix::process::pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty());

        // MAINPIDFD=1: the pid comes from the pidfd itself.
        let pinned = MainProcess::from_pidfd(open(sleeper).unwrap(), None, l).unwrap();
        assert_eq!(pinned.pid, sleeper);
        assert!(MainProcess::from_pidfd(open(sleeper).unwrap(), Some(sleeper), l).is_ok());
        let err = MainProcess::from_pidfd(open(sleeper).unwrap(), Some(l), l).unwrap_err();
        assert!(err.contains(&format!("MAINPID={l} but the attached pidfd is of process {sleeper}")), "{err}");
        let me = std::process::id();
        let err = MainProcess::from_pidfd(open(me).unwrap(), None, l).unwrap_err();
        assert!(err.contains("does not descend"), "a pidfd of a process outside the generation: {err}");
        let file: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        let err = MainProcess::from_pidfd(file, None, l).unwrap_err();
        assert!(err.contains("is not a pidfd"), "{err}");

        // MAINPIDFDID=: checked where the kernel has pidfs.
        match baton_sd::pidfs::pidfd_inode_id(open(sleeper).unwrap().as_fd()) {
            Some(id) => {
                assert!(MainProcess::pin_with_id(sleeper, l, id).is_ok());
                let err = MainProcess::pin_with_id(sleeper, l, id + 1).unwrap_err();
                assert!(err.contains("the process meant has exited"), "{err}");
            }
            None => assert!(MainProcess::pin_with_id(sleeper, l, 12345).is_ok(), "no pidfs: MAINPID= decides"),
        }

        // A pidfd of a process that has exited names nothing.
        let kept = open(sleeper).unwrap();
        rustix::process::kill_process(Pid::from_raw(sleeper as i32).unwrap(), rustix::process::Signal::KILL).unwrap();
        leader.wait().unwrap();
        assert!(!pinned.is_alive());
        let err = MainProcess::from_pidfd(kept, None, l).unwrap_err();
        assert!(err.contains("exited") || err.contains("does not descend"), "{err}");
    }
}
