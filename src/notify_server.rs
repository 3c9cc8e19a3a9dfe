//! The receiving end of `$NOTIFY_SOCKET` for the app's generations.
//!
//! Baton takes systemd's place towards the app, so it receives `sd_notify`
//! datagrams exactly as PID 1 does in systemd 252 (`manager_setup_notify()`
//! and `manager_dispatch_notify_fd()` in `src/core/manager.c`):
//!
//! - an `AF_UNIX` `SOCK_DGRAM` socket, close-on-exec and non-blocking, with
//!   `SO_PASSCRED` set before it is bound, so the kernel attaches the
//!   sender's real pid/uid/gid to every datagram, even from senders that
//!   attach none (libsystemd attaches none in the common case);
//! - the receive buffer raised to 8 MiB (`NOTIFY_RCVBUF_SIZE`);
//! - `recvmsg(MSG_CMSG_CLOEXEC | MSG_TRUNC | MSG_DONTWAIT)` into a
//!   [`NOTIFY_BUFFER_MAX`]-byte buffer (systemd's `iov_len`) with room for
//!   credentials plus [`NOTIFY_FD_MAX`] fds;
//! - truncated control data (`MSG_CTRUNC`): every fd that did arrive is
//!   closed and the datagram dropped;
//! - a datagram longer than the buffer (the kernel reports the real length
//!   with `MSG_TRUNC`) is dropped whole, with its fds;
//! - no credentials, or a pid that is not valid in our PID namespace → drop.
//!
//! Parsing the payload is not done here: the supervisor applies
//! `baton_sd::wire::parse` and its own access checks to each [`Datagram`].
//!
//! Every received fd becomes a [`ReceivedFd`] before any decision is taken,
//! so no path (drop, error, panic unwinding) can leak one, and none can close
//! one on the supervisor's thread: the sender chose the fd, and its close may
//! block for as long as the sender likes (see [`crate::closer`]).

use std::io;
use std::mem::{MaybeUninit, size_of, size_of_val};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use baton_sd::wire::{NOTIFY_BUFFER_MAX, NOTIFY_FD_MAX};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::closer::ReceivedFd;

/// The receive buffer systemd asks for on its notify socket
/// (`NOTIFY_RCVBUF_SIZE`, 8 MiB), so a burst of notifications from many
/// processes is queued rather than dropped.
const NOTIFY_RCVBUF_SIZE: usize = 8 * 1024 * 1024;

/// Mode of a path-bound notify socket. The app may run as another user than
/// Baton (Baton started as root, an app that drops its privileges before
/// READY=1, or a `--control` directory shared on purpose), and sending to an
/// `AF_UNIX` socket needs write permission on its inode. systemd's
/// `/run/systemd/notify` is world-writable too (PID 1 runs with umask 0).
/// That is safe because the receiver never trusts the sender: every datagram
/// carries kernel-attested credentials, and the supervisor accepts only pids
/// of its own generations. Who can reach the socket at all is decided by its
/// directory: Baton's own runtime directory is 0700 (see [`crate::rundir`]).
const SOCKET_MODE: u32 = 0o666;

/// Control buffer size: one `SCM_CREDENTIALS` plus `SCM_RIGHTS` of
/// [`NOTIFY_FD_MAX`] fds, as systemd's
/// `CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * NOTIFY_FD_MAX)`.
const CONTROL_LEN: usize = rustix::cmsg_space!(ScmCredentials(1), ScmRights(NOTIFY_FD_MAX));

/// One accepted datagram with the sender's kernel-attested credentials.
#[derive(Debug)]
pub struct Datagram {
    /// The sending process, as seen from Baton's PID namespace (never 0).
    pub pid: u32,
    /// The sender's real uid.
    pub uid: u32,
    /// The sender's real gid.
    pub gid: u32,
    /// The payload, at most [`NOTIFY_BUFFER_MAX`] bytes, not yet parsed.
    pub payload: Vec<u8>,
    /// The fds that came with it, close-on-exec. Whatever the supervisor
    /// does not store is closed when dropped, as systemd closes "extra
    /// auxiliary fds", by the closer thread.
    pub fds: Vec<ReceivedFd>,
}

/// Why a datagram was dropped (its fds handed to the closer thread, see
/// [`crate::closer`]). For logging; the server keeps running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Dropped {
    /// The payload is longer than systemd's notify buffer.
    #[error(
        "notify datagram of {len} bytes from {} dropped: at most {NOTIFY_BUFFER_MAX} bytes are accepted (systemd's \
         NOTIFY_BUFFER_MAX); the app must send a shorter message (e.g. shorten STATUS=)",
        sender(.pid)
    )]
    TooLarge {
        /// The sender, if its credentials came through.
        pid: Option<u32>,
        /// The datagram's real length.
        len: usize,
    },
    /// The control data was truncated (too many fds): the fds that did
    /// arrive were closed, as systemd does.
    #[error(
        "notify datagram from {} dropped with all its fds: its control data was truncated, either \
         because it carried more than {NOTIFY_FD_MAX} fds (the app must send fewer per message) or \
         because Baton is at its open-file limit (raise LimitNOFILE= / ulimit -n)",
        sender(.pid)
    )]
    TruncatedControl {
        /// The sender, if its credentials came through.
        pid: Option<u32>,
    },
    /// No `SCM_CREDENTIALS` at all. Cannot happen while `SO_PASSCRED` is set
    /// on the socket, which [`NotifyServer`] always does.
    #[error(
        "notify datagram without sender credentials dropped: SO_PASSCRED is not set on the notify socket; bind \
         it with NotifyServer::bind"
    )]
    NoCredentials,
    /// The credentials carry pid 0: the sender lives in a PID namespace that
    /// Baton cannot see into (e.g. on the host while Baton runs in a
    /// container sharing the network namespace and so the abstract socket).
    /// systemd drops these too ("without valid credentials").
    #[error(
        "notify datagram from uid {uid} gid {gid} dropped: the sender's pid is not visible in Baton's PID \
         namespace; run the app in Baton's PID namespace or below it"
    )]
    PidNotVisible {
        /// The sender's uid as the kernel reported it.
        uid: u32,
        /// The sender's gid as the kernel reported it.
        gid: u32,
    },
}

impl Dropped {
    /// The sender's pid, when the kernel reported one visible to Baton (the
    /// key for rate-limiting the log).
    pub fn sender(&self) -> Option<u32> {
        match self {
            Dropped::TooLarge { pid, .. } | Dropped::TruncatedControl { pid } => *pid,
            Dropped::NoCredentials | Dropped::PidNotVisible { .. } => None,
        }
    }
}

fn sender(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "an unknown sender".to_owned(),
    }
}

/// A [`NotifyServer`] as handed over by `baton upgrade`; see
/// [`NotifyServer::export`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NotifyExport {
    /// The socket's fd number.
    pub fd: std::os::fd::RawFd,
    /// `NOTIFY_SOCKET` value.
    pub address: String,
    /// Path, device and inode of a filesystem socket.
    pub bound: Option<(PathBuf, u64, u64)>,
}

/// The receiving end of `$NOTIFY_SOCKET` for the app's generations.
#[derive(Debug)]
pub struct NotifyServer {
    fd: AsyncFd<OwnedFd>,
    address: String,
    /// For a filesystem socket: its path and the inode we created, so that
    /// dropping the server never unlinks a socket someone else bound later.
    bound: Option<BoundPath>,
}

#[derive(Debug)]
struct BoundPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundPath {
    /// Unlinks the path if it is still the socket we bound.
    fn unlink_if_ours(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl NotifyServer {
    /// Binds an `AF_UNIX` `SOCK_DGRAM` socket at an absolute filesystem path
    /// (close-on-exec, non-blocking, `SO_PASSCRED` set before binding, receive
    /// buffer raised to 8 MiB, best effort, with `SO_RCVBUFFORCE` when
    /// privileged).
    ///
    /// A stale socket file at the path is removed first; anything else there
    /// (a regular file, a directory, a socket some process still receives on)
    /// is an error rather than being replaced. The parent directory must
    /// exist.
    ///
    /// The socket is made world-writable (0666), like systemd's
    /// `/run/systemd/notify`: the app may run as another user, and senders
    /// are identified by kernel-attested credentials, not by file
    /// permissions. Protect the socket with the directory's permissions if
    /// other users must not even reach it.
    ///
    /// Must be called within a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<NotifyServer> {
        let address = path
            .to_str()
            .ok_or_else(|| invalid(format!("notify socket path {path:?} is not UTF-8; NOTIFY_SOCKET must be")))?;
        if !path.is_absolute() {
            return Err(invalid(format!(
                "notify socket path {address:?} is relative; NOTIFY_SOCKET needs an absolute path"
            )));
        }
        let addr = SocketAddrUnix::new(path).map_err(|_| {
            invalid(format!("notify socket path {address:?} is too long: AF_UNIX paths hold at most 107 bytes"))
        })?;
        remove_stale_socket(path)?;
        let fd = new_socket().map_err(|e| context(e, address, "creating the notify socket"))?;
        // Created with its final mode by the bind itself: no chmod on the
        // path afterwards, which a symbolic link planted in between would
        // redirect.
        crate::rundir::bind_with_mode(fd.as_fd(), &addr, SOCKET_MODE).map_err(|e| {
            let what = if e.kind() == io::ErrorKind::NotFound {
                "binding the notify socket (its directory must exist)"
            } else {
                "binding the notify socket"
            };
            context(e, address, what)
        })?;
        // From here on the path exists: remove it again if setting up fails.
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(context(e, address, "checking the bound notify socket"));
            }
        };
        let bound = BoundPath { path: path.to_owned(), dev: meta.dev(), ino: meta.ino() };
        match register(fd).map_err(|e| context(e, address, "registering the notify socket")) {
            Ok(fd) => Ok(NotifyServer { fd, address: address.to_owned(), bound: Some(bound) }),
            Err(e) => {
                bound.unlink_if_ours();
                Err(e)
            }
        }
    }

    /// Binds in the Linux abstract namespace: `name` without the leading
    /// `@`; [`address`](Self::address) returns `@name`. For tests and for
    /// unprivileged runs without a runtime directory. Abstract sockets
    /// belong to the network namespace, and anyone in it may send: the
    /// credentials decide, as for [`bind`](Self::bind).
    ///
    /// Must be called within a tokio runtime.
    pub fn bind_abstract(name: &str) -> io::Result<NotifyServer> {
        let address = format!("@{name}");
        if name.is_empty() || name.contains('\0') {
            return Err(invalid(format!(
                "abstract notify socket name {address:?} is invalid: it must be non-empty and contain no NUL"
            )));
        }
        let addr = SocketAddrUnix::new_abstract_name(name.as_bytes())
            .map_err(|_| invalid(format!("abstract notify socket name {address:?} is too long: at most 107 bytes")))?;
        let fd = new_socket().map_err(|e| context(e, &address, "creating the notify socket"))?;
        rustix::net::bind(&fd, &addr).map_err(|e| context(e.into(), &address, "binding the notify socket"))?;
        let fd = register(fd).map_err(|e| context(e, &address, "registering the notify socket"))?;
        Ok(NotifyServer { fd, address, bound: None })
    }

    /// What `baton upgrade` hands to the next program image: the fd number
    /// (valid while the server lives), the address, and for a filesystem
    /// socket its path with the device and inode Baton created, so the new
    /// image, too, unlinks only its own socket.
    pub fn export(&self) -> NotifyExport {
        NotifyExport {
            fd: self.fd.get_ref().as_raw_fd(),
            address: self.address.clone(),
            bound: self.bound.as_ref().map(|b| (b.path.clone(), b.dev, b.ino)),
        }
    }

    /// Takes over the notify socket handed over by the previous program
    /// image (`baton upgrade`). Datagrams queued meanwhile are still in it.
    /// Refuses an fd that is not a datagram socket with `SO_PASSCRED`, the
    /// one thing every accepted datagram relies on. Must be called within a
    /// tokio runtime.
    pub fn adopt(fd: OwnedFd, export: &NotifyExport) -> io::Result<NotifyServer> {
        if sockopt::socket_type(&fd)? != SocketType::DGRAM || !sockopt::socket_passcred(&fd)? {
            return Err(invalid(format!(
                "the handed-over notify socket {:?} is not a datagram socket with SO_PASSCRED",
                export.address
            )));
        }
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        let fd = register(fd).map_err(|e| context(e, &export.address, "registering the notify socket"))?;
        let bound =
            export.bound.as_ref().map(|(path, dev, ino)| BoundPath { path: path.clone(), dev: *dev, ino: *ino });
        Ok(NotifyServer { fd, address: export.address.clone(), bound })
    }

    /// The value to put in the children's `NOTIFY_SOCKET` (`/path` or
    /// `@name`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Receives the next datagram.
    ///
    /// The outer `Err` is only for a broken socket (after which systemd, too,
    /// stops listening rather than spin); `Ok(Err(Dropped))` is one refused
    /// datagram, whose fds are closed off this thread, and the next call
    /// goes on receiving.
    ///
    /// Cancel-safe: a datagram is taken off the socket and returned within
    /// one poll, so dropping the future (e.g. in `tokio::select!`) loses
    /// nothing.
    pub async fn recv(&self) -> io::Result<Result<Datagram, Dropped>> {
        loop {
            let mut guard = self.fd.readable().await?;
            // `try_io` clears the readiness on WouldBlock, so the next
            // `readable()` waits for a new edge instead of spinning.
            match guard.try_io(|fd| {
                let mut control = ControlBuffer::<CONTROL_LEN>::new();
                recv_datagram(fd.get_ref().as_fd(), control.as_mut_slice())
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        if let Some(bound) = &self.bound {
            bound.unlink_if_ours();
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn context(e: io::Error, address: &str, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} at {address:?}: {e}"))
}

/// Creates the socket with systemd's flags and options. `SO_PASSCRED` is set
/// before `bind` so that no datagram can ever be queued without credentials:
/// the kernel decides whether to record them when the datagram is sent.
fn new_socket() -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    sockopt::set_socket_passcred(&fd, true)?;
    raise_rcvbuf(&fd);
    Ok(fd)
}

/// systemd's `fd_increase_rxbuf()`: `SO_RCVBUF` first; if the kernel capped it
/// (`net.core.rmem_max`), `SO_RCVBUFFORCE`, which needs `CAP_NET_ADMIN`. Best
/// effort: a smaller buffer only means bursts may block senders sooner.
fn raise_rcvbuf(fd: &OwnedFd) {
    // The kernel doubles the value it is given (bookkeeping overhead) and
    // reports the doubled value.
    let enough = |fd: &OwnedFd| sockopt::socket_recv_buffer_size(fd).is_ok_and(|v| v >= 2 * NOTIFY_RCVBUF_SIZE);
    if enough(fd) {
        return;
    }
    let _ = sockopt::set_socket_recv_buffer_size(fd, NOTIFY_RCVBUF_SIZE);
    if enough(fd) {
        return;
    }
    if let Err(e) = sockopt::set_socket_recv_buffer_size_force(fd, NOTIFY_RCVBUF_SIZE) {
        tracing::debug!("could not raise the notify socket's receive buffer to 8 MiB: {e}");
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until it
    // is dropped: the fd stays open, refers to the same socket and
    // `as_raw_fd()` returns the same number for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Removes a socket file left behind at `path` by a previous run. Refuses to
/// remove anything that is not a socket, or a socket some process still
/// receives on (a datagram `connect` to it succeeds).
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(e, &path.display().to_string(), "checking the notify socket path")),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: refusing to replace it; choose another notify socket path",
                path.display()
            ),
        ));
    }
    let probe = rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&probe, &addr) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a notify socket another process is still receiving on (another Baton?); stop it or choose \
                 another path",
                path.display()
            ),
        )),
        Err(rustix::io::Errno::CONNREFUSED) => std::fs::remove_file(path)
            .map_err(|e| context(e, &path.display().to_string(), "removing the stale notify socket")),
        Err(e) => Err(context(e.into(), &path.display().to_string(), "probing the existing notify socket")),
    }
}

/// A control-message buffer aligned for `cmsghdr` (8 bytes on 64-bit Linux).
#[repr(C, align(8))]
struct ControlBuffer<const N: usize>([MaybeUninit<u8>; N]);

impl<const N: usize> ControlBuffer<N> {
    fn new() -> Self {
        Self([MaybeUninit::uninit(); N])
    }

    fn as_mut_slice(&mut self) -> &mut [MaybeUninit<u8>] {
        &mut self.0
    }
}

/// Receives one datagram (or fails with `WouldBlock`) and applies systemd's
/// acceptance rules. `control` is the control-message buffer (aligned for
/// `cmsghdr`); its size decides how many fds fit before `MSG_CTRUNC`, which
/// is why it is a parameter.
///
/// The control data is parsed here rather than with rustix's
/// `RecvAncillaryMessage::ScmCredentials`: that type holds the pid as a
/// non-zero `Pid`, but the kernel reports pid 0 for a sender outside our PID
/// namespace (or one that sent before `SO_PASSCRED` was on), which would be
/// undefined behaviour to materialise.
fn recv_datagram(fd: BorrowedFd<'_>, control: &mut [MaybeUninit<u8>]) -> io::Result<Result<Datagram, Dropped>> {
    debug_assert_eq!(control.as_ptr().align_offset(align_of::<libc::cmsghdr>()), 0);
    let mut buf = [0u8; NOTIFY_BUFFER_MAX];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(control) as _;
    let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC | libc::MSG_DONTWAIT;
    let len = loop {
        // SAFETY: `msg` points at `iov`, `buf` and `control`, which all
        // outlive the call; the kernel writes only within the given lengths.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };

    // Own every fd before deciding anything, so every return below closes
    // them, off this thread. (At Baton's open-file limit the kernel itself
    // drops the fds it could not install, in `__scm_destroy()` on this
    // thread; the buffer holds more fds than one message can carry, so only
    // that limit truncates, and keeping below it is the one defence.)
    let mut fds = Vec::new();
    let mut creds: Option<libc::ucred> = None;
    let control_start = msg.msg_control as usize;
    let control_end = control_start + msg.msg_controllen as usize;
    // SAFETY: the kernel filled `msg.msg_controllen` bytes of `control` with
    // well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // them, each message's data is clamped to the filled area, and reads are
    // unaligned-safe. Each SCM_RIGHTS entry is a fresh fd installed for us by
    // this recvmsg and owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let hdr = cmsg.read_unaligned();
            let data = libc::CMSG_DATA(cmsg);
            let data_len = (hdr.cmsg_len as usize)
                .saturating_sub(libc::CMSG_LEN(0) as usize)
                .min(control_end.saturating_sub(data as usize));
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                for i in 0..data_len / size_of::<libc::c_int>() {
                    let raw = data.cast::<libc::c_int>().add(i).read_unaligned();
                    if raw >= 0 {
                        fds.push(ReceivedFd::new(OwnedFd::from_raw_fd(raw)));
                    }
                }
            } else if hdr.cmsg_level == libc::SOL_SOCKET
                && hdr.cmsg_type == libc::SCM_CREDENTIALS
                && hdr.cmsg_len as usize == libc::CMSG_LEN(size_of::<libc::ucred>() as u32) as usize
            {
                creds = Some(data.cast::<libc::ucred>().read_unaligned());
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }

    let pid = creds.and_then(|c| u32::try_from(c.pid).ok()).filter(|&p| p > 0);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(fds);
        return Ok(Err(Dropped::TruncatedControl { pid }));
    }
    // With MSG_TRUNC the kernel returns the datagram's real length, and flags
    // the truncation: systemd drops both "n ≥ its 4097-byte buffer" and
    // MSG_TRUNC, i.e. anything longer than the 4096 bytes it reads.
    if len > NOTIFY_BUFFER_MAX || msg.msg_flags & libc::MSG_TRUNC != 0 {
        drop(fds);
        return Ok(Err(Dropped::TooLarge { pid, len }));
    }
    let Some(creds) = creds else {
        drop(fds);
        return Ok(Err(Dropped::NoCredentials));
    };
    let Some(pid) = pid else {
        drop(fds);
        return Ok(Err(Dropped::PidNotVisible { uid: creds.uid, gid: creds.gid }));
    };
    Ok(Ok(Datagram { pid, uid: creds.uid, gid: creds.gid, payload: buf[..len].to_vec(), fds }))
}

#[cfg(test)]
mod tests {
    //! The receive function with control buffers and socket options that
    //! [`NotifyServer`] never uses, to reach the paths no real sender can.

    use super::*;
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};

    /// A connected datagram pair: (receiver, sender).
    fn pair(passcred: bool) -> (OwnedFd, OwnedFd) {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        sockopt::set_socket_passcred(&a, passcred).unwrap();
        (a, b)
    }

    fn send(sock: &OwnedFd, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(253))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        sendmsg(sock, &[IoSlice::new(payload)], &mut control, SendFlags::empty()).unwrap();
    }

    /// A pipe whose write end we send around: once every copy of the write
    /// end is closed, the read end reports POLLHUP. That proves no copy
    /// leaked, whatever other tests running in parallel do with fds.
    fn all_writers_closed(read_end: &OwnedFd) -> bool {
        let mut pfd = [rustix::event::PollFd::new(read_end, rustix::event::PollFlags::IN)];
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        rustix::event::poll(&mut pfd, Some(&zero)).unwrap();
        pfd[0].revents().contains(rustix::event::PollFlags::HUP)
    }

    #[test]
    fn truncated_control_closes_every_fd_that_arrived() {
        let (rx, tx) = pair(true);
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let ws: Vec<BorrowedFd<'_>> = (0..10).map(|_| w.as_fd()).collect();
        send(&tx, b"FDSTORE=1", &ws);
        drop(w);
        assert!(!all_writers_closed(&r), "10 copies are in flight");
        // Room for the credentials and 2 fds: the kernel installs 2, sets
        // MSG_CTRUNC and discards the other 8.
        let mut control = ControlBuffer::<{ rustix::cmsg_space!(ScmCredentials(1), ScmRights(2)) }>::new();
        let got = recv_datagram(rx.as_fd(), control.as_mut_slice()).unwrap();
        match got {
            Err(Dropped::TruncatedControl { pid }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected TruncatedControl, got {other:?}"),
        }
        crate::closer::flush();
        assert!(all_writers_closed(&r), "the 2 fds that arrived were closed too");
    }

    #[test]
    fn no_credentials_is_dropped_with_its_fds() {
        // Neither side has SO_PASSCRED: the datagram carries no credentials.
        let (rx, tx) = pair(false);
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        send(&tx, b"READY=1", &[w.as_fd()]);
        drop(w);
        let mut control = ControlBuffer::<CONTROL_LEN>::new();
        let got = recv_datagram(rx.as_fd(), control.as_mut_slice()).unwrap();
        assert!(matches!(got, Err(Dropped::NoCredentials)), "{got:?}");
        crate::closer::flush();
        assert!(all_writers_closed(&r));
    }

    #[test]
    fn pid_zero_is_dropped_not_misread() {
        // Sent while neither side had SO_PASSCRED, received after it was
        // turned on: the kernel attaches credentials with pid 0 (no pid
        // recorded), the same as for a sender in an invisible PID namespace.
        let (rx, tx) = pair(false);
        send(&tx, b"READY=1", &[]);
        sockopt::set_socket_passcred(&rx, true).unwrap();
        let mut control = ControlBuffer::<CONTROL_LEN>::new();
        let got = recv_datagram(rx.as_fd(), control.as_mut_slice()).unwrap();
        assert!(matches!(got, Err(Dropped::PidNotVisible { .. })), "{got:?}");
    }

    #[test]
    fn socket_options_are_systemds() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _enter = rt.enter();
        let name = format!("baton-unit-notify-{}", std::process::id());
        let server = NotifyServer::bind_abstract(&name).unwrap();
        let fd = server.fd.get_ref();
        assert!(sockopt::socket_passcred(fd).unwrap());
        let flags = rustix::io::fcntl_getfd(fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        assert!(rustix::fs::fcntl_getfl(fd).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
        if rustix::process::geteuid().is_root() {
            // SO_RCVBUFFORCE lifts the rmem_max cap; the kernel reports double.
            assert!(sockopt::socket_recv_buffer_size(fd).unwrap() >= 2 * NOTIFY_RCVBUF_SIZE);
        }
    }

    #[test]
    fn empty_socket_would_block() {
        let (rx, _tx) = pair(true);
        let mut control = ControlBuffer::<CONTROL_LEN>::new();
        let err = recv_datagram(rx.as_fd(), control.as_mut_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn boundary_lengths() {
        let (rx, tx) = pair(true);
        let mut control = ControlBuffer::<CONTROL_LEN>::new();
        for (len, accepted) in [(0, true), (NOTIFY_BUFFER_MAX, true), (NOTIFY_BUFFER_MAX + 1, false)] {
            send(&tx, &vec![b'x'; len], &[]);
            match recv_datagram(rx.as_fd(), control.as_mut_slice()).unwrap() {
                Ok(d) => {
                    assert!(accepted, "{len} bytes must be dropped");
                    assert_eq!(d.payload.len(), len);
                }
                Err(Dropped::TooLarge { len: l, pid }) => {
                    assert!(!accepted, "{len} bytes must be accepted");
                    assert_eq!(l, len);
                    assert_eq!(pid, Some(std::process::id()));
                }
                Err(other) => panic!("{len} bytes: {other:?}"),
            }
        }
    }
}
