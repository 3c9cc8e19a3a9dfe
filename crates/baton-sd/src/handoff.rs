//! Receiving handed-over fds while running: Baton's extension for
//! overlapped restarts.
//!
//! Under systemd a restart is stop-then-start, so connections the old
//! generation puts in the fd store reach the new one through `LISTEN_FDS`.
//! Under Baton the new generation is already running when the old one is
//! told to stop; Baton therefore pushes the connections a draining
//! generation stores (name [`CONNECTION`](crate::fdstore::CONNECTION)) to
//! the *active* generation over a socket named by `$BATON_HANDOFF_SOCKET`.
//!
//! The protocol is deliberately small: a unix `SOCK_SEQPACKET` connection
//! that the generation opens at start-up (before `READY=1`: Baton pushes only
//! to the active generation, which it becomes at `READY=1`); each message is
//! the fds' name as bytes with the fds in `SCM_RIGHTS` (at most 253). Baton
//! checks the peer's credentials, so only its own generations receive.
//! Pushed fds are *moved*: they are no longer in any store, so nothing needs
//! removing. Without the variable (plain systemd) there is nothing to do.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::wire::SCM_MAX_FD;

/// The variable naming Baton's handoff socket.
pub const HANDOFF_SOCKET_ENV: &str = "BATON_HANDOFF_SOCKET";

/// Longest name in one handoff message.
pub const NAME_MAX: usize = 256;

/// One pushed batch: fds sharing a name.
#[derive(Debug)]
pub struct Handoff {
    /// Their fd-store name (`conn` for connections).
    pub name: String,
    /// The fds, now owned by this process (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// The receiving end of `$BATON_HANDOFF_SOCKET`.
#[derive(Debug)]
pub struct HandoffReceiver {
    socket: AsyncFd<OwnedFd>,
}

impl HandoffReceiver {
    /// Connects to `$BATON_HANDOFF_SOCKET`; `Ok(None)` when it is unset (not
    /// run by Baton). Must run inside a tokio runtime.
    pub fn connect_from_env() -> std::io::Result<Option<Self>> {
        match std::env::var_os(HANDOFF_SOCKET_ENV) {
            Some(path) if !path.is_empty() => Self::connect(std::path::Path::new(&path)).map(Some),
            _ => Ok(None),
        }
    }

    /// Connects to a handoff socket at `path`.
    pub fn connect(path: &std::path::Path) -> std::io::Result<Self> {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let addr = SocketAddrUnix::new(path)?;
        match rustix::net::connect(&socket, &addr) {
            Ok(()) => {}
            // A non-blocking unix connect completes at once or reports
            // EAGAIN when the backlog is full; wait for writability then.
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS) => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::Error::from(e).kind(),
                    format!("cannot connect to {HANDOFF_SOCKET_ENV}={}: {e}", path.display()),
                ));
            }
        }
        // SAFETY: `socket` is an OwnedFd moved into the AsyncFd and neither
        // closed nor replaced while it is registered.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(std::io::Error::from)?;
        Ok(Self { socket })
    }

    /// The next pushed batch; `Ok(None)` when Baton closed the connection.
    pub async fn recv(&mut self) -> std::io::Result<Option<Handoff>> {
        loop {
            let mut guard = self.socket.readable().await?;
            match guard.try_io(|inner| receive(inner.get_ref().as_fd()).map_err(std::io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One message of this protocol from `fd`, without waiting: `Ok(None)` at
/// the end of the stream, `Err(WOULDBLOCK)` when nothing is queued. Baton's
/// connection vault holds its messages in the same format.
pub fn receive(fd: std::os::fd::BorrowedFd<'_>) -> Result<Option<Handoff>, rustix::io::Errno> {
    let mut name = [0u8; NAME_MAX];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(&mut name)];
    let msg = rustix::net::recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let len = msg.bytes.min(NAME_MAX);
    Ok(Some(Handoff { name: String::from_utf8_lossy(&name[..len]).into_owned(), fds }))
}
