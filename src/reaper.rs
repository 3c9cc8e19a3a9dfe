//! Reaping children: Baton is a child subreaper, so every descendant of a
//! generation that outlives its parent is reparented to Baton and reaped here,
//! never left as a zombie.
//!
//! The [`Reaper`] reaps *every* child with `waitpid(-1)`, so nothing else in
//! Baton may wait for a child (no `std::process::Child::wait`, no
//! `tokio::process`): [`AppCommand::spawn`](crate::spawn::AppCommand::spawn)
//! is built for that.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Held around every `waitpid()` of the reaper and, in
/// [`AppCommand::spawn`](crate::spawn::AppCommand::spawn), from `fork()` until
/// the new child's pidfd is open: so a child can never be reaped (and its pid
/// reused) before Baton holds a pidfd for it. Held only across system calls,
/// never across an `.await`.
pub(crate) static REAP_GATE: Mutex<()> = Mutex::new(());

/// How many exits may wait for [`Reaper::next`]; when full, reaping pauses
/// (the exited children stay zombies meanwhile) until the consumer catches
/// up, so no exit is ever dropped and memory stays bounded.
const EXIT_QUEUE: usize = 64;

/// Makes this process the subreaper for its descendants
/// (`PR_SET_CHILD_SUBREAPER`), so orphaned grandchildren are reparented to
/// Baton and reaped here, never left as zombies.
pub fn become_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(io::Error::from)
}

/// One reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The pid it had (already free for reuse).
    pub pid: u32,
    /// How it ended.
    pub status: ExitStatus,
}

/// Reaps every child: on each `SIGCHLD` it loops `waitpid(-1, WNOHANG)` until
/// nothing is left, sending one [`Exit`] per reaped pid through a bounded
/// channel (the reaping task waits when it is full; it never drops an exit).
///
/// Create it inside a tokio runtime before the first child is spawned, so no
/// `SIGCHLD` is missed; it also sweeps once at start, collecting children that
/// ended earlier. Exits of pids Baton never handed out (a grandchild
/// reparented to the subreaper) are reported too; the consumer ignores the
/// ones it does not know. Dropping the `Reaper` stops the task.
#[derive(Debug)]
pub struct Reaper {
    exits: mpsc::Receiver<Exit>,
    task: tokio::task::JoinHandle<()>,
}

impl Reaper {
    /// Installs the `SIGCHLD` listener and starts the reaping task. Fails if
    /// called outside a tokio runtime or if the signal cannot be registered.
    pub fn start() -> io::Result<Reaper> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("Reaper::start must be called inside a tokio runtime (with the signal driver enabled)")
        })?;
        // Registering now, before the first sweep, means a SIGCHLD arriving
        // at any later moment wakes the task.
        let _enter = runtime.enter();
        let mut sigchld = signal(SignalKind::child())?;
        let (tx, exits) = mpsc::channel(EXIT_QUEUE);
        let task = runtime.spawn(async move {
            loop {
                loop {
                    match reap_one() {
                        Ok(Some(exit)) => {
                            if tx.send(exit).await.is_err() {
                                return; // Nobody listens any more.
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!("waitpid(-1) failed: {e}; will retry on the next SIGCHLD");
                            break;
                        }
                    }
                }
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(Reaper { exits, task })
    }

    /// The next reaped child, in reaping order. `None` only if the reaping
    /// task has stopped (its runtime is shutting down).
    pub async fn next(&mut self) -> Option<Exit> {
        self.exits.recv().await
    }

    /// An exit already reaped and queued, without waiting: before `baton
    /// upgrade` replaces the program image, the supervisor takes every
    /// queued exit (a reaped child's status would otherwise be lost with the
    /// image; unreaped ones stay zombies for the next image's reaper).
    pub fn try_next(&mut self) -> Option<Exit> {
        self.exits.try_recv().ok()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `waitpid(-1, WNOHANG)`: `Ok(None)` when no child has ended (or there
/// are no children at all).
fn reap_one() -> io::Result<Option<Exit>> {
    let _gate = REAP_GATE.lock().unwrap_or_else(|poison| poison.into_inner());
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid out-pointer for the status.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid > 0 {
            return Ok(Some(Exit { pid: pid as u32, status: ExitStatus::from_raw(raw) }));
        }
        if pid == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Human text for an exit status: "exited with status 3", "killed by
/// SIGKILL", "killed by SIGSEGV (core dumped)".
pub fn describe(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(sig) = status.signal() {
        let core = if status.core_dumped() { " (core dumped)" } else { "" };
        return format!("killed by {}{core}", signal_name(sig));
    }
    if let Some(sig) = status.stopped_signal() {
        return format!("stopped by {}", signal_name(sig));
    }
    if status.continued() {
        return "continued".to_owned();
    }
    format!("ended with raw wait status {:#x}", status.into_raw())
}

/// `SIGKILL`, `SIGRTMIN+3`, or `signal 99` for numbers Linux does not use.
fn signal_name(sig: i32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match sig {
        1..=31 => NAMES[sig as usize].to_owned(),
        // The kernel's real-time range; glibc keeps 32 and 33 for itself and
        // numbers SIGRTMIN from 34, as systemd's signal_to_string() does.
        32..=64 => {
            let rtmin = libc::SIGRTMIN();
            if sig >= rtmin { format!("SIGRTMIN+{}", sig - rtmin) } else { format!("signal {sig}") }
        }
        _ => format!("signal {sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_like_systemd() {
        assert_eq!(describe(&ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(describe(&ExitStatus::from_raw(0)), "exited with status 0");
        assert_eq!(describe(&ExitStatus::from_raw(libc::SIGKILL)), "killed by SIGKILL");
        assert_eq!(describe(&ExitStatus::from_raw(libc::SIGSEGV | 0x80)), "killed by SIGSEGV (core dumped)");
        assert_eq!(describe(&ExitStatus::from_raw(libc::SIGRTMIN() + 2)), "killed by SIGRTMIN+2");
        assert_eq!(describe(&ExitStatus::from_raw(libc::SIGSYS)), "killed by SIGSYS");
    }
}
