//! One generation: its lifecycle state and its processes, and how it is
//! spawned.

use super::*;

pub(super) struct Generation {
    pub(super) number: u64,
    pub(super) child: Child,
    /// The process named by `MAINPID=`, if not the leader: pinned by its
    /// pidfd, and forgotten once it exits (see [`crate::lineage`]).
    pub(super) main: Option<MainProcess>,
    /// Its state and deadlines (pure: see `lifecycle`).
    pub(super) life: Life,
    pub(super) spawned_at: Instant,
    pub(super) ready_at: Option<Instant>,
    pub(super) status_text: Option<String>,
    pub(super) output: Output,
    /// The running health check, killed with the generation if it fails.
    pub(super) health: Option<Child>,
    /// Its `$BATON_HANDOFF_SOCKET` connection, once it connected (closed off
    /// this thread: fds queued in it are released by its close).
    pub(super) handoff: Option<ReceivedFd>,
    /// The store's fds it got in `LISTEN_FDS`: never pushed to it again.
    pub(super) passed: Vec<std::os::fd::RawFd>,
}

impl Generation {
    pub(super) fn state_name(&self) -> &'static str {
        match self.life.state {
            State::Starting => "starting",
            State::HealthCheck { .. } => "health-check",
            State::Active => "active",
            State::Draining { .. } => "draining",
        }
    }

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

    /// The pid of its health check while it runs (Baton's child too: see
    /// [`is_main`](Self::is_main)).
    pub(super) fn health_check_pid(&self) -> Option<u32> {
        match self.life.state {
            State::HealthCheck { pid } if self.health.is_some() => Some(pid),
            _ => None,
        }
    }

    /// Asks it to drain and exit: `signal` to its process group (`None`
    /// when it said `STOPPING=1` itself), SIGKILL at `kill_at`. A health
    /// check it still had is killed: it cannot take over any more.
    pub(super) fn drain(&mut self, signal: Option<Signal>, kill_at: Instant) -> std::io::Result<()> {
        if let Some(h) = self.health.take() {
            let _ = h.signal_group(Signal::KILL);
        }
        self.life.drain(kill_at);
        signal.map_or(Ok(()), |s| self.child.signal_group(s))
    }

    /// SIGKILL to the whole generation; it stays listed until reaped.
    pub(super) fn force_kill(&mut self) {
        let _ = self.child.signal_group(Signal::KILL);
        self.life.killed(Instant::now());
    }
}

impl Supervisor {
    pub(super) fn spawn(&self, number: u64) -> Result<Generation, String> {
        let fds: Vec<(BorrowedFd<'_>, &str)> = self
            .cfg
            .sockets
            .iter()
            .map(|s| (s.fd.as_fd(), s.name.as_str()))
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
        let setup = GenerationSetup {
            fds: &fds,
            notify_socket: Some(self.notify.address()),
            watchdog_usec: self.cfg.policy.watchdog.map(micros),
            extra_env: &extra,
            output: output_fd.as_ref().map(|fd| fd.as_fd()),
        };
        let child = self.cfg.command.spawn(&setup).map_err(|e| e.to_string())?;
        output.set_pid(child.pid);
        // Only the child (and its descendants) may hold the write end, so
        // the copying task sees end-of-file when they are all gone.
        drop(output_fd);
        let now = Instant::now();
        Ok(Generation {
            number,
            main: None,
            child,
            life: Life::starting(now, self.cfg.policy.ready_timeout, self.cfg.policy.watchdog),
            spawned_at: now,
            ready_at: None,
            status_text: None,
            output,
            health: None,
            handoff: None,
            passed,
        })
    }
}
