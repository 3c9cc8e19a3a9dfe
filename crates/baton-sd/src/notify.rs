//! Sending `sd_notify(3)` messages to systemd or to a supervisor.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    sendmsg_addr,
};

use crate::wire::{self, NotifyState, SCM_MAX_FD, WireError};

/// Why a notification could not be delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// The message itself would be dropped or misread by the receiver.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// `NOTIFY_SOCKET` holds something that is not a socket address.
    #[error("NOTIFY_SOCKET={value:?} is invalid: {reason}")]
    InvalidSocket {
        /// The value found.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More fds than one datagram can carry.
    #[error("{count} fds in one notify message; the kernel passes at most {SCM_MAX_FD}: send them in several messages")]
    TooManyFds {
        /// How many fds were given.
        count: usize,
    },
    /// The socket call failed.
    #[error("sending to NOTIFY_SOCKET={socket:?} failed: {source}")]
    Io {
        /// The notify socket address as configured.
        socket: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process named as the new main process could not be pinned.
    #[error("cannot open a pidfd for the new main process {pid}: {source} (is it running?)")]
    MainPid {
        /// The pid given.
        pid: u32,
        /// Why `pidfd_open()` failed.
        source: std::io::Error,
    },
    /// The receiver did not confirm a `BARRIER=1` in time.
    #[error("no BARRIER=1 acknowledgement from NOTIFY_SOCKET={socket:?} within {timeout:?}")]
    BarrierTimeout {
        /// The notify socket address as configured.
        socket: String,
        /// How long we waited.
        timeout: Duration,
    },
}

/// A handle to the notify socket named by `$NOTIFY_SOCKET`.
///
/// Holds one unbound, close-on-exec datagram socket and the destination
/// address; each call sends one datagram. Cheap to share (`Arc`) between
/// tasks: sending needs only `&self`.
#[derive(Debug)]
pub struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
    display: String,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. `Ok(None)` when it is unset or empty: not run
    /// by a service manager, so notifications are no-ops.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => match v.into_string() {
                Ok(v) => Self::new(&v).map(Some),
                Err(v) => {
                    Err(NotifyError::InvalidSocket { value: v.to_string_lossy().into_owned(), reason: "not UTF-8" })
                }
            },
        }
    }

    /// A notifier for an explicit address: `/absolute/path` or `@abstract`
    /// (a leading `@` stands for the abstract namespace's NUL byte).
    pub fn new(address: &str) -> Result<Self, NotifyError> {
        let invalid = |reason| NotifyError::InvalidSocket { value: address.to_owned(), reason };
        if address.len() < 2 || address.contains('\0') {
            return Err(invalid("expected an absolute path or an @abstract name of at least one character"));
        }
        let addr = if let Some(name) = address.strip_prefix('@') {
            SocketAddrUnix::new_abstract_name(name.as_bytes())
                .map_err(|_| invalid("abstract name too long (108 bytes at most)"))?
        } else if address.starts_with('/') {
            SocketAddrUnix::new(address).map_err(|_| invalid("path too long (108 bytes at most)"))?
        } else if address.starts_with("vsock") {
            return Err(invalid("AF_VSOCK notify sockets (systemd ≥ 253) are not supported"));
        } else {
            return Err(invalid("expected an absolute path or an @abstract name"));
        };
        let socket = rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
            .map_err(|e| NotifyError::Io { socket: address.to_owned(), source: e.into() })?;
        Ok(Self { socket, addr, display: address.to_owned() })
    }

    /// The address, as given in `$NOTIFY_SOCKET`.
    pub fn address(&self) -> &str {
        &self.display
    }

    /// Sends the assignments in one datagram.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> Result<(), NotifyError> {
        self.notify_with_fds(states, &[])
    }

    /// Sends the assignments with fds attached (for `FDSTORE=1`).
    ///
    /// The caller keeps its own copies of the fds; the receiver gets
    /// duplicates.
    pub fn notify_with_fds(&self, states: &[NotifyState<'_>], fds: &[BorrowedFd<'_>]) -> Result<(), NotifyError> {
        let payload = wire::encode(states)?;
        self.send_raw(payload.as_bytes(), fds)
    }

    /// Tells the manager that process `pid` is the service's main process
    /// now, race-free: `MAINPID=` and `MAINPIDFD=1` with the process's
    /// pidfd attached, plus `states` (e.g. [`NotifyState::Ready`]) in the
    /// same datagram. systemd ≥ 257 and Baton take the process the pidfd
    /// refers to, so a pid reused between the send and the receipt cannot
    /// be mistaken for it; older systemd reads `MAINPID=` and closes the fd.
    pub fn notify_main_pid(&self, pid: u32, states: &[NotifyState<'_>]) -> Result<(), NotifyError> {
        let main_pid = |source: std::io::Error| NotifyError::MainPid { pid, source };
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| main_pid(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let pidfd =
            rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).map_err(|e| main_pid(e.into()))?;
        let mut all = vec![NotifyState::MainPid(pid), NotifyState::MainPidFd];
        all.extend_from_slice(states);
        self.notify_with_fds(&all, &[std::os::fd::AsFd::as_fd(&pidfd)])
    }

    /// Sends a raw payload, unchecked. For tests and tools that must send
    /// what a well-behaved client never would.
    pub fn send_raw(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), NotifyError> {
        if fds.len() > SCM_MAX_FD {
            return Err(NotifyError::TooManyFds { count: fds.len() });
        }
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            // Cannot fail: the buffer is sized for SCM_MAX_FD fds.
            control.push(SendAncillaryMessage::ScmRights(fds));
        }
        let iov = [IoSlice::new(payload)];
        loop {
            match sendmsg_addr(&self.socket, &self.addr, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(NotifyError::Io { socket: self.display.clone(), source: e.into() });
                }
            }
        }
    }

    /// `sd_notify_barrier(3)`: sends `BARRIER=1` with one end of a pipe and
    /// waits until the receiver closes it, which it does only after
    /// processing every message sent before. Blocks the calling thread for at
    /// most `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<(), NotifyError> {
        let read_end = self.send_barrier()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec::try_from(left)
                .unwrap_or(rustix::time::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
            let mut pfd = [rustix::event::PollFd::new(&read_end, rustix::event::PollFlags::IN)];
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                Ok(0) => return Err(self.barrier_timeout(timeout)),
                Ok(_) => {
                    // Only end-of-file (every write end closed) acknowledges
                    // the barrier; bytes written into the pipe do not.
                    if drain_pipe(&read_end).map_err(|e| self.io(e))? {
                        return Ok(());
                    }
                }
                Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    /// [`barrier`](Self::barrier) without blocking a runtime thread.
    #[cfg(feature = "tokio")]
    pub async fn barrier_async(&self, timeout: Duration) -> Result<(), NotifyError> {
        let read_end = self.send_barrier()?;
        // SAFETY: `read_end` is an `OwnedFd`, moved into the AsyncFd and
        // neither closed nor replaced while the AsyncFd lives.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(read_end, tokio::io::Interest::READABLE) }
            .map_err(|e| NotifyError::Io { socket: self.display.clone(), source: e.into() })?;
        let wait_eof = async {
            loop {
                let mut guard = fd.readable().await?;
                // Only end-of-file (every write end closed) acknowledges the
                // barrier; bytes written into the pipe do not.
                match guard.try_io(|inner| drain_pipe(inner.get_ref()).map_err(std::io::Error::from)) {
                    Ok(Ok(true)) => return Ok(()),
                    Ok(Ok(false)) | Err(_) => continue,
                    Ok(Err(e)) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(timeout, wait_eof).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NotifyError::Io { socket: self.display.clone(), source: e }),
            Err(_) => Err(self.barrier_timeout(timeout)),
        }
    }

    fn io(&self, e: rustix::io::Errno) -> NotifyError {
        NotifyError::Io { socket: self.display.clone(), source: e.into() }
    }

    /// Sends `BARRIER=1` with a pipe's write end, closes our copy of it and
    /// returns the (non-blocking, close-on-exec) read end to wait on.
    fn send_barrier(&self) -> Result<OwnedFd, NotifyError> {
        let (read_end, write_end) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(|e| NotifyError::Io { socket: self.display.clone(), source: e.into() })?;
        self.notify_with_fds(&[NotifyState::Barrier], &[write_end.as_fd()])?;
        drop(write_end);
        Ok(read_end)
    }

    fn barrier_timeout(&self, timeout: Duration) -> NotifyError {
        NotifyError::BarrierTimeout { socket: self.display.clone(), timeout }
    }
}

/// Reads everything available from a non-blocking pipe: `Ok(true)` at
/// end-of-file, `Ok(false)` when it would block (data was discarded).
fn drain_pipe(fd: &OwnedFd) -> Result<bool, rustix::io::Errno> {
    let mut buf = [0u8; 256];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends the assignments to `$NOTIFY_SOCKET`, like `sd_notify(0, …)`.
///
/// Returns `Ok(false)` without sending when `$NOTIFY_SOCKET` is unset, so a
/// service runs unchanged outside a service manager. Opens a socket per call;
/// keep a [`Notifier`] for frequent messages.
pub fn notify(states: &[NotifyState<'_>]) -> Result<bool, NotifyError> {
    match Notifier::from_env()? {
        Some(n) => n.notify(states).map(|()| true),
        None => Ok(false),
    }
}

/// Removes `NOTIFY_SOCKET` from the environment, so child processes do not
/// send notifications on our behalf (`sd_notify(1, …)`'s `unset_environment`).
///
/// # Safety
///
/// Changing the environment is unsound while another thread may read it
/// (`getenv` in libc, DNS resolution, …). Call this only while the process is
/// single-threaded, in particular before starting a tokio runtime.
pub unsafe fn unset_notify_env() {
    // SAFETY: the caller guarantees no other thread reads the environment.
    unsafe { std::env::remove_var("NOTIFY_SOCKET") };
}
