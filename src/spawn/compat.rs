//! Other supervisors' protocols, spoken to a generation besides systemd's
//! (`--compat`), so apps written for them run unchanged.
//!
//! - **crank** (pusher/crank, `src/crank/process.go` and
//!   `process_notifier.go`): the app gets a datagram socket as `NOTIFY_FD`
//!   and its instance name as `CRANK_NAME`, and writes `READY=1` to it.
//!   crank gives it one end of a socketpair; Baton gives it a `SOCK_DGRAM`
//!   socket *connected to Baton's own notify socket* (the `$NOTIFY_SOCKET`
//!   address), so its datagrams arrive exactly like `sd_notify()`'s: the
//!   notify socket has `SO_PASSCRED`, so the kernel attaches the writing
//!   process's credentials (`scm_send()` fills them from `current`,
//!   `net/core/scm.c`), and the supervisor attributes and checks them as for
//!   any notification. It is passed right after the `LISTEN_FDS` fds (fd 4
//!   for one socket, as crank does), outside `LISTEN_FDS`.
//! - **einhorn** (contribsys/einhorn, `lib/einhorn/command.rb`, and the
//!   older `EINHORN_FDS` that socketmaster and goji's `bind` read):
//!   `EINHORN_FD_COUNT`, `EINHORN_FD_0`..`EINHORN_FD_<n-1>` and
//!   `EINHORN_FDS="3 4 ..."` name the passed sockets (the probe listener
//!   included, the fd store's entries not). Readiness is einhorn's timer
//!   (`--ready after:D`) or any of Baton's.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// crank's variable with the notify socket's fd number.
pub const NOTIFY_FD_ENV: &str = "NOTIFY_FD";
/// crank's variable with the instance name.
pub const CRANK_NAME_ENV: &str = "CRANK_NAME";

/// What a generation gets of other supervisors' protocols.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompatSetup<'a> {
    /// crank's notify socket and name (`--compat crank`).
    pub crank: Option<CrankSetup<'a>>,
    /// einhorn's variables for the first this many passed fds, the sockets
    /// (`--compat einhorn`); more than are passed is refused.
    pub einhorn_sockets: Option<usize>,
}

/// crank's part of a generation's setup.
#[derive(Debug, Clone, Copy)]
pub struct CrankSetup<'a> {
    /// A datagram socket connected to Baton's notify socket
    /// ([`crank_notify_socket`]); the child gets its copy as `NOTIFY_FD`.
    pub notify: BorrowedFd<'a>,
    /// `CRANK_NAME`: the instance's name.
    pub name: &'a str,
}

/// A `SOCK_DGRAM` socket, close-on-exec, connected to the notify socket at
/// `notify_socket` (a path, or `@name` in the abstract namespace, as in
/// `$NOTIFY_SOCKET`), for one generation's `NOTIFY_FD`. Drop Baton's copy
/// once the generation is spawned. Never blocks.
pub fn crank_notify_socket(notify_socket: &str) -> io::Result<OwnedFd> {
    let addr = match notify_socket.strip_prefix('@') {
        Some(name) => SocketAddrUnix::new_abstract_name(name.as_bytes()),
        None => SocketAddrUnix::new(notify_socket),
    }
    .map_err(|e| io::Error::new(e.kind(), format!("notify socket address {notify_socket:?}: {e}")))?;
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    rustix::net::connect(&fd, &addr)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("connecting to {notify_socket:?}: {e}")))?;
    Ok(fd)
}

/// Whether an inherited variable names fds of Baton's own (as an app of
/// crank or einhorn, Baton would have been given them): never valid in a
/// generation, so always dropped from what it inherits, like `LISTEN_FDS`.
pub(super) fn is_foreign_fd_var(name: &[u8]) -> bool {
    name == NOTIFY_FD_ENV.as_bytes()
        || name == b"EINHORN_FDS"
        || name == b"EINHORN_FD_COUNT"
        || name.strip_prefix(b"EINHORN_FD_").is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
}

/// The variables `compat` sets for a generation passed `listed` fds in
/// `LISTEN_FDS` (at 3..), the crank socket right after them.
pub(super) fn env(compat: &CompatSetup<'_>, listed: usize) -> Result<Vec<(String, String)>, &'static str> {
    let mut vars = Vec::new();
    if let Some(crank) = compat.crank {
        vars.push((NOTIFY_FD_ENV.to_owned(), (3 + listed).to_string()));
        vars.push((CRANK_NAME_ENV.to_owned(), crank.name.to_owned()));
    }
    if let Some(sockets) = compat.einhorn_sockets {
        if sockets > listed {
            return Err("einhorn's sockets must be among the passed fds");
        }
        let numbers: Vec<String> = (0..sockets).map(|i| (3 + i).to_string()).collect();
        vars.push(("EINHORN_FDS".to_owned(), numbers.join(" ")));
        vars.push(("EINHORN_FD_COUNT".to_owned(), sockets.to_string()));
        vars.extend(numbers.into_iter().enumerate().map(|(i, fd)| (format!("EINHORN_FD_{i}"), fd)));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    fn vars(compat: &CompatSetup<'_>, listed: usize) -> Vec<String> {
        env(compat, listed).unwrap().into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    #[test]
    fn none_sets_nothing() {
        assert!(vars(&CompatSetup::default(), 3).is_empty());
    }

    #[test]
    fn crank_names_the_fd_after_the_listed_ones() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let crank = CompatSetup { crank: Some(CrankSetup { notify: a.as_fd(), name: "web" }), ..Default::default() };
        assert_eq!(vars(&crank, 1), ["NOTIFY_FD=4", "CRANK_NAME=web"]);
        assert_eq!(vars(&crank, 0), ["NOTIFY_FD=3", "CRANK_NAME=web"]);
    }

    #[test]
    fn einhorn_names_the_sockets() {
        let einhorn = CompatSetup { einhorn_sockets: Some(2), ..Default::default() };
        assert_eq!(vars(&einhorn, 3), ["EINHORN_FDS=3 4", "EINHORN_FD_COUNT=2", "EINHORN_FD_0=3", "EINHORN_FD_1=4"]);
        let none = CompatSetup { einhorn_sockets: Some(0), ..Default::default() };
        assert_eq!(vars(&none, 0), ["EINHORN_FDS=", "EINHORN_FD_COUNT=0"]);
        let too_many = CompatSetup { einhorn_sockets: Some(2), ..Default::default() };
        assert!(env(&too_many, 1).is_err());
    }

    #[test]
    fn foreign_fd_variables_are_recognised() {
        for name in ["NOTIFY_FD", "EINHORN_FDS", "EINHORN_FD_COUNT", "EINHORN_FD_0", "EINHORN_FD_12"] {
            assert!(is_foreign_fd_var(name.as_bytes()), "{name}");
        }
        for name in ["CRANK_NAME", "EINHORN_FD_", "EINHORN_FD_X", "EINHORN_SOCK_PATH", "NOTIFY_SOCKET", "NOTIFY_FDS"] {
            assert!(!is_foreign_fd_var(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn the_crank_socket_reaches_the_notify_socket() {
        let name = format!("baton-crank-test-{}", std::process::id());
        let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name);
        let server = UnixDatagram::bind_addr(&addr.unwrap()).unwrap();
        let fd = crank_notify_socket(&format!("@{name}")).unwrap();
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        rustix::net::send(&fd, b"READY=1", rustix::net::SendFlags::empty()).unwrap();
        let mut buf = [0u8; 16];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let e = crank_notify_socket("@baton-crank-test-nobody-listens-here").unwrap_err();
        assert!(e.to_string().contains("connecting to \"@baton-crank-test-nobody"), "{e}");
    }
}
