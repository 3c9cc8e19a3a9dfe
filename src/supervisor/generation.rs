//! One generation's processes and handles — its leader, the process
//! `MAINPID=` names, its output, its health check, its handoff connection —
//! and how it is spawned. Its state is the core's ([`Gen`]).

use super::*;

/// What the shell holds for a generation: everything that is a process or
/// an fd.
pub(super) struct Procs {
    pub(super) number: u64,
    pub(super) child: Child,
    /// The process named by `MAINPID=`, if not the leader: pinned by its
    /// pidfd, and forgotten once it exits (see [`crate::lineage`]).
    pub(super) main: Option<MainProcess>,
    pub(super) spawned_at: Instant,
    pub(super) output: Output,
    /// The running health check.
    pub(super) health: Option<Child>,
    /// Its `$BATON_HANDOFF_SOCKET` connection, once it connected (closed off
    /// this thread: fds queued in it are released by its close).
    pub(super) handoff: Option<ReceivedFd>,
    /// The store's fds it got in `LISTEN_FDS`: never pushed to it again.
    pub(super) passed: Vec<std::os::fd::RawFd>,
    /// Its private probe listener (`--probe`), Baton's copy: closed when
    /// the generation is forgotten (this is dropped).
    pub(super) probe: Option<ProbeSocket>,
}

impl Procs {
    /// The main process: the live process named by `MAINPID=`, else the
    /// leader. Never the pid of a `MAINPID=` process that has exited,
    /// whoever has that pid now.
    pub(super) fn main_pid(&self) -> u32 {
        match &self.main {
            Some(m) if m.is_alive() => m.pid,
            _ => self.child.pid,
        }
    }

    /// Whether `pid` is its main process now. A process named by `MAINPID=`
    /// counts only while the process we pinned runs (see
    /// [`crate::lineage`]). The leader counts until its exit is handled,
    /// zombie or not: it is Baton's own child, so its pid cannot be reused
    /// before Baton's reaper collects it, and the `STOPPING=1` or `STATUS=`
    /// it sent just before exiting must still count, as systemd handles
    /// notifications before `SIGCHLD`.
    pub(super) fn is_main(&self, pid: u32) -> bool {
        self.main_pid() == pid
    }
}

impl Supervisor {
    pub(super) fn spawn(&self, number: u64, slot: Slot) -> Result<Procs, String> {
        let probe = match self.cfg.policy.probe {
            true => Some(
                probe::family_for(&self.cfg.sockets)
                    .and_then(|f| ProbeSocket::bind(f).map_err(|e| format!("cannot bind its probe listener: {e}")))?,
            ),
            false => None,
        };
        // The probe right after the listening sockets: apps that serve
        // every socket find it among them, before the store's entries.
        let fds: Vec<(BorrowedFd<'_>, &str)> = self
            .listeners_for(slot)
            .into_iter()
            .chain(probe.as_ref().map(|p| (p.as_fd(), probe::PROBE_FDNAME)))
            .chain(self.store.entries().map(|(name, fd)| (fd, name)))
            .collect();
        let passed: Vec<std::os::fd::RawFd> =
            self.store.entries().map(|(_, fd)| std::os::fd::AsRawFd::as_raw_fd(&fd)).collect();
        let mut extra = vec![("BATON_GENERATION", number.to_string())];
        if let Some((server, _)) = &self.handoff {
            extra.push((baton_sd::handoff::HANDOFF_SOCKET_ENV, server.path().display().to_string()));
        }
        let (output_fd, output) = match self.cfg.policy.output {
            OutputMode::Pipe => {
                let identity = crate::journal::Identity::new(self.cfg.command.program(), number);
                let (fd, tail) = crate::output::capture(Arc::clone(&self.output_closed), identity)
                    .map_err(|e| format!("cannot create the pipe for its output: {e}"))?;
                (Some(fd), Output::Captured(tail))
            }
            // Its 1 and 2 stay Baton's own (GenerationSetup::output: None).
            OutputMode::Inherit => (None, Output::Inherited),
        };
        // crank's NOTIFY_FD: Baton's copy goes once the child has its own.
        let crank = match self.cfg.policy.compat.crank {
            true => Some(
                crate::spawn::crank_notify_socket(self.notify.address())
                    .map_err(|e| format!("cannot create its crank notify socket (--compat crank): {e}"))?,
            ),
            false => None,
        };
        let compat = crate::spawn::CompatSetup {
            crank: crank.as_ref().map(|fd| crate::spawn::CrankSetup { notify: fd.as_fd(), name: &self.cfg.name }),
            // The sockets: every passed fd but the store's entries (last).
            einhorn_sockets: self.cfg.policy.compat.einhorn.then(|| fds.len() - passed.len()),
        };
        let setup = GenerationSetup {
            fds: &fds,
            notify_socket: Some(self.notify.address()),
            watchdog_usec: self.cfg.policy.watchdog.map(micros),
            extra_env: &extra,
            output: output_fd.as_ref().map(|fd| fd.as_fd()),
            compat,
        };
        let child = self.cfg.command.spawn(&setup).map_err(|e| e.to_string())?;
        drop(crank);
        output.set_pid(child.pid);
        // Only the child (and its descendants) may hold the write end, so
        // the copying task sees end-of-file when they are all gone.
        drop(output_fd);
        Ok(Procs {
            number,
            main: None,
            child,
            spawned_at: Instant::now(),
            output,
            health: None,
            handoff: None,
            passed,
            probe,
        })
    }
}
