//! The sibling of a socket: a second socket in its `SO_REUSEPORT` group,
//! for steering ([`crate::steering`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{self, AddressFamily, SocketFlags, SocketType, sockopt};

/// Binds a new socket into `fd`'s reuseport group: same family, type and
/// address, the options `fd` has (`SO_REUSEADDR`, `IPV6_V6ONLY`,
/// `IP_FREEBIND`/`IPV6_FREEBIND`) and, for TCP, its `listen()` backlog
/// (which `TCP_INFO` reports). All read from the kernel, so it works for a
/// socket bound by [`super::bind`] and for an inherited one alike.
///
/// `fd` must be an IP socket with `SO_REUSEPORT`, bound by this user (the
/// kernel groups only sockets of one owner); else `EINVAL` or
/// `EADDRINUSE`.
pub fn bind_sibling(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let family = sockopt::socket_domain(fd)?;
    let ty = sockopt::socket_type(fd)?;
    if (family != AddressFamily::INET && family != AddressFamily::INET6)
        || (ty != SocketType::STREAM && ty != SocketType::DGRAM)
    {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a TCP or UDP socket"));
    }
    if !sockopt::socket_reuseport(fd)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket has no SO_REUSEPORT, so no second socket can join it",
        ));
    }
    let local = SocketAddr::try_from(net::getsockname(fd)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the socket's address is not an IP address"))?;
    let backlog = if ty == SocketType::STREAM {
        let (_, max) = crate::steering::listen_backlog(fd)?;
        Some(max)
    } else {
        None
    };
    let sib = net::socket_with(family, ty, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&sib, sockopt::socket_reuseaddr(fd)?)?;
    sockopt::set_socket_reuseport(&sib, true)?;
    if family == AddressFamily::INET6 {
        sockopt::set_ipv6_v6only(&sib, sockopt::ipv6_v6only(fd)?)?;
        if sockopt::ipv6_freebind(fd)? {
            sockopt::set_ipv6_freebind(&sib, true)?;
        }
    } else if sockopt::ip_freebind(fd)? {
        sockopt::set_ip_freebind(&sib, true)?;
    }
    net::bind(&sib, &local)?;
    if let Some(backlog) = backlog {
        net::listen(&sib, i32::try_from(backlog).unwrap_or(i32::MAX))?;
    }
    Ok(sib)
}
