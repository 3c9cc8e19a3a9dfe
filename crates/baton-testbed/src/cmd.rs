//! Running host commands with a deadline, without threads and without busy
//! waiting: the pipes and the child's pidfd are `poll(2)`ed.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::error::{Error, IoContext, Result};

/// What a finished command printed, and how it exited.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub argv: Vec<String>,
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output (lossily decoded as UTF-8).
    pub stdout: String,
    /// Its standard error (lossily decoded as UTF-8).
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, `None` if it was killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Standard output without the trailing newline(s).
    pub fn stdout_trimmed(&self) -> &str {
        self.stdout.trim_end_matches('\n')
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.argv.join(" "),
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Renders a `Command` as a shell-like line for messages.
pub(crate) fn describe(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy().into_owned()).collect()
}

/// Runs `cmd` (stdin from /dev/null) and collects its output. After
/// `timeout` the command is killed and [`Error::CommandTimeout`] returned.
pub(crate) fn run(mut cmd: Command, timeout: Duration) -> Result<CmdOutput> {
    let argv = describe(&cmd);
    let deadline = deadline_after(timeout);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("cannot run `{}`", argv.join(" ")))?;

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let mut timed_out = false;

    // Read both pipes until EOF. A grandchild that keeps a pipe open (say, a
    // daemon started by the command) would keep us here until the deadline,
    // which is the best we can do.
    while out_pipe.is_some() || err_pipe.is_some() {
        let Some(left) = remaining(deadline) else {
            timed_out = true;
            break;
        };
        let (out_ready, err_ready) = {
            let mut fds = Vec::with_capacity(2);
            if let Some(p) = &out_pipe {
                fds.push(PollFd::new(p, PollFlags::IN));
            }
            if let Some(p) = &err_pipe {
                fds.push(PollFd::new(p, PollFlags::IN));
            }
            poll_retrying(&mut fds, left).context(|| "poll on command pipes".into())?;
            let ready = |fd: &PollFd<'_>| !fd.revents().is_empty();
            match (&out_pipe, &err_pipe) {
                (Some(_), Some(_)) => (ready(&fds[0]), ready(&fds[1])),
                (Some(_), None) => (ready(&fds[0]), false),
                _ => (false, ready(&fds[0])),
            }
        };
        if out_ready {
            drain_once(&mut out_pipe, &mut stdout)?;
        }
        if err_ready {
            drain_once(&mut err_pipe, &mut stderr)?;
        }
    }

    let status = if timed_out { None } else { wait_deadline(&mut child, deadline)? };
    let Some(status) = status else {
        // Kill and reap: no zombie, no leaked child.
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::CommandTimeout {
            argv: argv.join(" "),
            timeout,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        });
    };
    Ok(CmdOutput {
        argv,
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// One `read` from a pipe that `poll` reported ready; EOF closes it.
fn drain_once<R: Read>(pipe: &mut Option<R>, buf: &mut Vec<u8>) -> Result<()> {
    let Some(p) = pipe else { return Ok(()) };
    let mut chunk = [0u8; 16 * 1024];
    match p.read(&mut chunk) {
        Ok(0) => *pipe = None,
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e).context(|| "reading command output".into()),
    }
    Ok(())
}

/// `now + timeout`, saturating instead of panicking on absurd timeouts.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// Time left until `deadline`, `None` once it has passed.
pub(crate) fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// `poll(2)` with a relative timeout, restarted on `EINTR`.
fn poll_retrying(fds: &mut [PollFd<'_>], timeout: Duration) -> rustix::io::Result<usize> {
    let deadline = deadline_after(timeout);
    loop {
        // Capped at a day so the conversion cannot overflow.
        let left = remaining(deadline).unwrap_or_default().min(Duration::from_secs(86_400));
        let ts = Timespec::try_from(left).unwrap_or_default();
        match poll(fds, Some(&ts)) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Waits until `fd` is readable (pipe data/EOF, or a pidfd's process has
/// exited). Returns `false` if `timeout` passed first.
pub(crate) fn wait_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    Ok(poll_retrying(&mut fds, timeout)? > 0)
}

/// Opens a pidfd for a (still unreaped) child.
pub(crate) fn child_pidfd(child: &Child) -> io::Result<OwnedFd> {
    Ok(pidfd_open(Pid::from_child(child), PidfdFlags::empty())?)
}

/// Waits for `child` to exit, up to `deadline`. `Ok(None)` on timeout.
pub(crate) fn wait_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait().context(|| "waiting for child".into())? {
        return Ok(Some(status));
    }
    let pidfd = child_pidfd(child).context(|| "pidfd_open on child".into())?;
    let left = remaining(deadline).unwrap_or_default();
    if wait_readable(&pidfd, left).context(|| "poll on child pidfd".into())? {
        return child.wait().map(Some).context(|| "waiting for child".into());
    }
    Ok(None)
}
