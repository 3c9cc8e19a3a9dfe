//! `--probe`: a private loopback listener per generation.
//!
//! Every generation shares the listening sockets, so a health check that
//! connects through them may be answered by the old generation and pass
//! falsely. With `--probe`, Baton binds one more listener for each
//! generation it spawns — on the loopback address of the first listening
//! socket's family, port 0 — and passes it to that generation only, after
//! the listening sockets, named [`PROBE_FDNAME`]. Its address is the health
//! command's `$BATON_PROBE_ADDR`. Baton keeps its own copy while the
//! generation is in its table (so connections to it wait in its backlog,
//! never refused, while the generation runs) and closes it when the
//! generation is forgotten; `baton upgrade` hands it over with the
//! generation.
//!
//! A first socket of the Unix family has no loopback address to match:
//! `--probe` is refused at start with the fix named (see
//! [`family_for`]).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::listen::BoundSocket;

/// The probe listener's `LISTEN_FDNAMES` name.
pub use baton_sd::PROBE_FDNAME;

/// The health command's variable with the probe listener's address.
pub const PROBE_ADDR_ENV: &str = "BATON_PROBE_ADDR";

/// The kernel's default `somaxconn`: probes are few, but a generation that
/// is slow to accept must not see them refused.
const BACKLOG: i32 = 128;

/// One generation's probe listener, as Baton holds it.
#[derive(Debug)]
pub(crate) struct ProbeSocket {
    /// The listener: `CLOEXEC`, blocking (like the listening sockets).
    pub(crate) fd: OwnedFd,
    /// Where it listens (port chosen by the kernel).
    pub(crate) addr: SocketAddr,
}

impl ProbeSocket {
    /// Binds a listener on `family`'s loopback address, port 0.
    pub(crate) fn bind(family: ProbeFamily) -> io::Result<Self> {
        let (af, addr) = match family {
            ProbeFamily::V4 => (AddressFamily::INET, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            ProbeFamily::V6 => (AddressFamily::INET6, SocketAddr::from((Ipv6Addr::LOCALHOST, 0))),
        };
        let fd = rustix::net::socket_with(af, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        rustix::net::bind(&fd, &addr)?;
        rustix::net::listen(&fd, BACKLOG)?;
        Self::adopt(fd)
    }

    /// A probe listener handed over by `baton upgrade`: its address is the
    /// kernel's.
    pub(crate) fn adopt(fd: OwnedFd) -> io::Result<Self> {
        let addr = SocketAddr::try_from(rustix::net::getsockname(&fd)?)
            .map_err(|_| io::Error::other("the probe listener is not an IP socket"))?;
        Ok(ProbeSocket { fd, addr })
    }

    /// The listener, to pass.
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The address family of the probe listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFamily {
    /// `127.0.0.1`.
    V4,
    /// `::1`.
    V6,
}

/// The probe family for these listening sockets: the first one's. Refused,
/// with the fix, when there is none or it is not an IP socket: a Unix
/// socket has no loopback address of its own family, and a TCP probe beside
/// it would put the app on a network it was not configured for.
pub fn family_for(sockets: &[BoundSocket]) -> Result<ProbeFamily, String> {
    let Some(first) = sockets.first() else {
        return Err("--probe needs a listening socket (-l/--listen or a passed socket): the probe listener takes \
                    the first one's address family"
            .into());
    };
    let family = rustix::net::sockopt::socket_domain(&first.fd)
        .map_err(|e| format!("--probe: cannot read the address family of socket {}: {e}", first.name))?;
    if family == AddressFamily::INET {
        Ok(ProbeFamily::V4)
    } else if family == AddressFamily::INET6 {
        Ok(ProbeFamily::V6)
    } else {
        Err(format!(
            "--probe needs a TCP or UDP first listening socket, but {} is {}: list a tcp: or udp: socket \
             first (its family, IPv4 or IPv6, is the probe's), or drop --probe",
            first.name, first.local
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::{SocketOptions, bind};

    fn socket(spec: &str) -> BoundSocket {
        bind(&spec.parse().unwrap(), &SocketOptions::default()).unwrap()
    }

    #[test]
    fn the_probe_takes_the_first_sockets_family_and_listens_on_loopback() {
        for (spec, family, ip) in
            [("tcp:127.0.0.1:0", ProbeFamily::V4, "127.0.0.1"), ("udp:[::1]:0", ProbeFamily::V6, "::1")]
        {
            let Ok(bound) = bind(&spec.parse().unwrap(), &SocketOptions::default()) else {
                continue; // no IPv6 on this host
            };
            assert_eq!(family_for(&[bound]).unwrap(), family);
            let probe = ProbeSocket::bind(family).unwrap();
            assert_eq!(probe.addr.ip().to_string(), ip);
            assert_ne!(probe.addr.port(), 0);
            std::net::TcpStream::connect(probe.addr).unwrap();
        }
    }

    #[test]
    fn unix_or_missing_first_sockets_are_refused_with_the_fix() {
        let e = family_for(&[]).unwrap_err();
        assert!(e.contains("--probe needs a listening socket"), "{e}");
        let unix = socket(&format!("@baton-probe-test-{}", std::process::id()));
        let e = family_for(&[unix]).unwrap_err();
        assert!(e.contains("needs a TCP or UDP first listening socket") && e.contains("drop --probe"), "{e}");
    }
}
