//! Pushing handed-over connections to the running generation
//! (`$BATON_HANDOFF_SOCKET`, see `baton_sd::handoff` for the app side).
//!
//! An overlapped restart starts the new generation *before* the old one is
//! asked to stop, so connections the old one stores on its way out cannot
//! reach the new one through `LISTEN_FDS`. Each generation may connect to
//! this `SOCK_SEQPACKET` socket at start-up; when a draining generation
//! stores connections, the supervisor moves them straight to the active
//! generation's connection: one message per batch, the name as payload and
//! up to 253 fds in `SCM_RIGHTS`.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_sd::wire::SCM_MAX_FD;
use rustix::net::{AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::closer::ReceivedFd;

/// Mode of the handoff socket: like the notify socket's, world-writable
/// because the app may run as another user than Baton, and safe because
/// peers are identified by their kernel credentials (`SO_PEERCRED`); who can
/// reach it at all is decided by Baton's 0700 runtime directory (see
/// [`crate::rundir`]).
pub const SOCKET_MODE: u32 = 0o666;

/// Connections waiting for the supervisor to attribute them.
const PENDING: usize = 64;

/// A connected process: its credentials (from `SO_PEERCRED`) and the
/// connection. The supervisor decides whether it is a generation.
#[derive(Debug)]
pub struct Peer {
    /// The connecting process, or `None` when its pid is not visible in
    /// Baton's PID namespace (the kernel reports 0: a peer in an ancestor or
    /// unrelated namespace), which no generation can be.
    pub pid: Option<u32>,
    /// The connecting process's uid.
    pub uid: u32,
    /// The connection to push fds over (non-blocking, close-on-exec). A
    /// [`ReceivedFd`]: the peer may have queued fds in it, which its close
    /// releases (see [`crate::closer`]).
    pub conn: ReceivedFd,
}

/// The listening handoff socket; removes its path when dropped.
#[derive(Debug)]
pub struct HandoffServer {
    path: PathBuf,
    /// Shared with the accept task so its fd number can be handed over by
    /// `baton upgrade`.
    listener: Arc<AsyncFd<OwnedFd>>,
    accept: tokio::task::JoinHandle<()>,
}

impl HandoffServer {
    /// Binds the socket at `path` (mode [`SOCKET_MODE`]) and accepts in
    /// the background. A socket file left by a Baton that died is replaced;
    /// a live socket or any other file at `path` is an error. Must run
    /// inside a tokio runtime.
    pub fn bind(path: &Path) -> std::io::Result<(HandoffServer, mpsc::Receiver<Peer>)> {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let addr = rustix::net::SocketAddrUnix::new(path)?;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket: refusing to replace it", path.display()),
                ));
            }
            Ok(_) => {
                // Never unlink a socket something still listens on (whatever
                // its type: PROTOTYPE means a live socket of another type).
                let probe = rustix::net::socket_with(
                    AddressFamily::UNIX,
                    SocketType::SEQPACKET,
                    SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                    None,
                )?;
                match rustix::net::connect(&probe, &addr) {
                    Err(rustix::io::Errno::CONNREFUSED) => std::fs::remove_file(path)?,
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is a socket another process is still using; stop it", path.display()),
                        ));
                    }
                }
            }
        }
        // Created with its final mode by the bind itself, never chmod-ed by
        // path (see `crate::rundir::bind_with_mode`).
        crate::rundir::bind_with_mode(socket.as_fd(), &addr, SOCKET_MODE)?;
        rustix::net::listen(&socket, 64)?;
        Self::serve(path, socket)
    }

    /// Takes over the listening handoff socket handed over by the previous
    /// program image (`baton upgrade`). Generations connected to the old
    /// image keep their connections (handed over with them); ones connecting
    /// meanwhile wait in the backlog. Must run inside a tokio runtime.
    pub fn adopt(path: &Path, socket: OwnedFd) -> std::io::Result<(HandoffServer, mpsc::Receiver<Peer>)> {
        if rustix::net::sockopt::socket_type(&socket)? != SocketType::SEQPACKET {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the handed-over handoff socket {} is not a SOCK_SEQPACKET socket", path.display()),
            ));
        }
        let flags = rustix::fs::fcntl_getfl(&socket)?;
        rustix::fs::fcntl_setfl(&socket, flags | rustix::fs::OFlags::NONBLOCK)?;
        Self::serve(path, socket)
    }

    fn serve(path: &Path, socket: OwnedFd) -> std::io::Result<(HandoffServer, mpsc::Receiver<Peer>)> {
        // SAFETY: `socket` is an OwnedFd moved into the AsyncFd and neither
        // closed nor replaced while it is registered.
        let listener =
            unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(std::io::Error::from)?;
        let listener = Arc::new(listener);
        let (tx, rx) = mpsc::channel(PENDING);
        let accept = tokio::spawn(accept_loop(Arc::clone(&listener), tx));
        Ok((HandoffServer { path: path.to_owned(), listener, accept }, rx))
    }

    /// The listening socket's fd number (valid while the server lives).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.listener.get_ref())
    }

    /// The socket path, for `$BATON_HANDOFF_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HandoffServer {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: Arc<AsyncFd<OwnedFd>>, tx: mpsc::Sender<Peer>) {
    loop {
        let Ok(mut guard) = listener.readable().await else { return };
        let accepted = guard.try_io(|l| {
            rustix::net::accept_with(l.get_ref(), SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
                .map_err(std::io::Error::from)
        });
        let conn = match accepted {
            Ok(Ok(conn)) => ReceivedFd::new(conn),
            Err(_would_block) => continue,
            Ok(Err(_)) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(cred) = peer_credentials(conn.as_fd()) else { continue };
        let pid = u32::try_from(cred.pid).ok().filter(|&pid| pid > 0);
        // The supervisor drains this quickly; a flood of connections from
        // one generation must not grow memory, so extra ones are dropped.
        let _ = tx.try_send(Peer { pid, uid: cred.uid, conn });
    }
}

/// `SO_PEERCRED`, read into `libc::ucred` rather than with rustix's
/// `socket_peercred`: that holds the pid as a non-zero `Pid`, but the kernel
/// reports 0 for a peer whose pid is not visible in our PID namespace, which
/// would be undefined behaviour to materialise.
fn peer_credentials(conn: BorrowedFd<'_>) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` outlive the call, and `len` is the size of
    // `cred`; the kernel writes at most `len` bytes to it.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&conn),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// Moves `fds` to a generation's handoff connection, in batches of at most
/// 253, without blocking. On error, returns how many fds were sent before
/// it (whole batches: a failed batch was not sent at all) with the error.
pub fn push(conn: &impl AsFd, name: &str, fds: &[BorrowedFd<'_>]) -> Result<(), (usize, std::io::Error)> {
    let mut sent = 0;
    for batch in fds.chunks(SCM_MAX_FD) {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(batch));
        let iov = [IoSlice::new(name.as_bytes())];
        rustix::net::sendmsg(conn.as_fd(), &iov, &mut control, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)
            .map_err(|e| (sent, e.into()))?;
        sent += batch.len();
    }
    Ok(())
}
