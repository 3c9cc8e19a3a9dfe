//! Getting the listening socket: one code path after this, however it came.
//!
//! 1. **Passed** by socket activation — systemd's `.socket` unit or `baton
//!    run`, both use `LISTEN_FDS` — under the name `--socket-name` (default
//!    `http`, the `.socket` unit's `FileDescriptorName=`). The manager owns
//!    the socket: during a restart, new connections wait in its backlog.
//! 2. **Stored** by an earlier generation of this service as
//!    `listen/<name>` (see 3).
//! 3. **Bound** to `--listen ADDR`. Under a service manager with handoff on,
//!    the socket is then put in the fd store as `listen/<name>`, so the
//!    next generation reuses it and connections arriving during a restart
//!    wait in its backlog instead of being refused. Without a manager (a
//!    terminal), a restart closes the port for a moment.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use baton_sd::{ActivationError, FdPoll, ListenFds, Notifier, StoredName};
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

/// Backlog for sockets we bind (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Where the listening socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the service manager under the configured name.
    Passed,
    /// Stored by an earlier generation as `listen/<name>`.
    Stored,
    /// Bound by this process to `--listen`.
    Bound,
}

/// A listening socket and its origin.
#[derive(Debug)]
pub struct Acquired {
    /// The socket (blocking mode as received; made non-blocking by the
    /// runtime).
    pub listener: std::net::TcpListener,
    /// Where it came from.
    pub origin: Origin,
}

/// No usable listening socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// A passed fd with the name is not a listening TCP socket.
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// Nothing was passed under the name and no `--listen` was given.
    #[error(
        "no listening socket named {name:?} was passed (passed: {passed}) and --listen was not given: \
         set FileDescriptorName={name} in the .socket unit, pass --socket-name, or give --listen ADDR"
    )]
    NoSocket {
        /// The name looked for.
        name: String,
        /// The names that were passed, for the message.
        passed: String,
    },
    /// Binding `--listen` failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Finds the listening socket (see the [module docs](self)). `store` is
/// where to keep a socket we bind (`None`: do not store it).
pub fn acquire(
    fds: &mut ListenFds,
    name: &str,
    listen: Option<SocketAddr>,
    store: Option<&Notifier>,
) -> Result<Acquired, ListenError> {
    if let Some(listener) = fds.take_tcp_listener(name)? {
        return Ok(Acquired { listener, origin: Origin::Passed });
    }
    let stored_name = StoredName::Listener(name).to_string();
    if let Some(listener) = fds.take_tcp_listener(stored_name.as_str())? {
        return Ok(Acquired { listener, origin: Origin::Stored });
    }
    let Some(addr) = listen else {
        let passed: Vec<&str> = fds.names().map(|(_, n, _)| n).collect();
        let passed = if passed.is_empty() { "none".to_owned() } else { passed.join(", ") };
        return Err(ListenError::NoSocket { name: name.to_owned(), passed });
    };
    let fd = bind(addr).map_err(|source| ListenError::Bind { addr, source })?;
    if let Some(n) = store {
        // systemd would store a name it refuses (e.g. one with ':') as
        // "stored", which the next generation would not recognise.
        match StoredName::Listener(name).to_fdname() {
            Ok(fdname) => {
                if let Err(e) = n.store_fds(&fdname, &[fd.as_fd()], FdPoll::NoPoll) {
                    tracing::warn!(error = %e, "cannot keep the listening socket in the fd store");
                }
            }
            Err(e) => tracing::warn!(error = %e, "the socket name cannot be used in the fd store"),
        }
    }
    Ok(Acquired { listener: std::net::TcpListener::from(fd), origin: Origin::Bound })
}

/// `socket` + `SO_REUSEADDR` + `bind` + `listen`, close-on-exec.
fn bind(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(fd)
}
