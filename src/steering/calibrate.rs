//! Finding each socket's index in its reuseport group, by experiment.
//!
//! The index is the socket's position in `reuse->socks[]`
//! (`net/core/sock_reuseport.c`): TCP sockets join at `listen()`
//! (`inet_reuseport_add_sock()` from `__inet_hash()`), UDP sockets at
//! `bind()` (`udp_reuseport_add_sock()`), and a socket leaving moves the
//! last one into its place (`reuseport_detach_sock()`). Under systemd the
//! order in which PID 1 set up the two `.socket` units is not known, so it
//! is measured: with a program that sends everything to index `k`, one
//! connection (datagram) to the address shows which of the two sockets is
//! at `k`. Every new connection goes to that one socket while the program
//! is attached, so real clients arriving meanwhile do not confuse the
//! count; both indices are measured, and must differ.
//!
//! The TCP probe connection is not accepted: accepting could take a real
//! client's connection instead, which Baton cannot put back. It is closed
//! at once (a FIN), so the first generation accepts it and reads EOF, as
//! from a port scanner. An (empty) UDP probe datagram is read away when it
//! is first in the queue, which the peeked sender address tells.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{self, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::{program, sys};

/// How often the queues are looked at while waiting for a probe.
const LOOK_EVERY: Duration = Duration::from_millis(1);

/// Attempts per index before giving up when both sockets grew (a
/// handshake begun before the program was attached completing meanwhile).
const ATTEMPTS: usize = 3;

/// Where Baton can reach a socket bound to `local`: the loopback address
/// of the same family for a wildcard, else the address itself.
pub fn reachable(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// The amount that grows when a probe arrives: queued connections (TCP) or
/// receive-buffer bytes (UDP).
fn level(fd: BorrowedFd<'_>, stream: bool) -> io::Result<u64> {
    if stream { sys::accept_queue(fd).map(|(n, _)| u64::from(n)) } else { sys::rmem_alloc(fd).map(u64::from) }
}

/// The probe: a connecting TCP socket, or a UDP socket that sent an empty
/// datagram. Dropping it closes it.
fn send_probe(to: SocketAddr, stream: bool) -> io::Result<OwnedFd> {
    let family = if to.is_ipv6() { AddressFamily::INET6 } else { AddressFamily::INET };
    if stream {
        let fd = net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
        match net::connect(&fd, &to) {
            Ok(()) | Err(Errno::INPROGRESS) => Ok(fd),
            Err(e) => Err(e.into()),
        }
    } else {
        let fd = net::socket_with(family, SocketType::DGRAM, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
        // Connected, so that getsockname() names the source address the
        // datagram carries (an unbound socket would say 0.0.0.0).
        net::connect(&fd, &to)?;
        net::send(&fd, &[], SendFlags::empty())?;
        Ok(fd)
    }
}

/// Reads the empty probe datagram away from `fd` if it is first in line.
fn discard_probe_datagram(fd: BorrowedFd<'_>, probe: &OwnedFd) {
    let Ok(ours) = net::getsockname(probe) else { return };
    let mut buf = [0u8; 1];
    if let Ok((_, 0, Some(from))) = net::recvfrom(fd, &mut buf[..], RecvFlags::PEEK | RecvFlags::DONTWAIT)
        && from == ours
    {
        let _ = net::recvfrom(fd, &mut buf[..], RecvFlags::DONTWAIT);
    }
}

/// Which of `fds` receives while a program selecting index `k` is attached.
fn who_is(fds: [BorrowedFd<'_>; 2], stream: bool, to: SocketAddr, k: u32, wait: Duration) -> Result<usize, String> {
    sys::attach_cbpf(fds[0], &program::select(k)).map_err(|e| format!("SO_ATTACH_REUSEPORT_CBPF failed: {e}"))?;
    for _ in 0..ATTEMPTS {
        let before = [level(fds[0], stream), level(fds[1], stream)];
        let [Ok(b0), Ok(b1)] = before else {
            return Err("cannot read the sockets' queues".to_owned());
        };
        let probe = send_probe(to, stream).map_err(|e| format!("cannot reach {to} to find the socket order: {e}"))?;
        let deadline = Instant::now() + wait;
        loop {
            let grew0 = level(fds[0], stream).is_ok_and(|n| n > b0);
            let grew1 = level(fds[1], stream).is_ok_and(|n| n > b1);
            match (grew0, grew1) {
                (true, false) | (false, true) => {
                    let winner = usize::from(grew1);
                    if !stream {
                        discard_probe_datagram(fds[winner], &probe);
                    }
                    return Ok(winner);
                }
                (true, true) => break,
                (false, false) if Instant::now() >= deadline => {
                    return Err(format!(
                        "a probe to {to} reached neither socket within {wait:?} (another process's socket in \
                         the same SO_REUSEPORT group, or the address is not reachable from this host)"
                    ));
                }
                (false, false) => std::thread::sleep(LOOK_EVERY),
            }
        }
    }
    Err(format!("both sockets kept receiving during {ATTEMPTS} probes to {to}"))
}

/// The group index of each of `fds` (both members of one group bound to
/// `local`), measured as the module header says. Leaves a program
/// attached; the caller attaches the one it wants next.
pub fn indices(fds: [BorrowedFd<'_>; 2], stream: bool, local: SocketAddr, wait: Duration) -> Result<[u32; 2], String> {
    let to = reachable(local);
    let at0 = who_is(fds, stream, to, 0, wait)?;
    let at1 = who_is(fds, stream, to, 1, wait)?;
    if at0 == at1 {
        return Err(format!(
            "index 0 and 1 of the group are not these two sockets (another socket is in the same SO_REUSEPORT \
             group at {local})"
        ));
    }
    let mut out = [0, 0];
    out[at1] = 1;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_reached_on_loopback() {
        let cases = [
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("[::]:443", "[::1]:443"),
            ("10.1.2.3:80", "10.1.2.3:80"),
            ("[fe80::1]:80", "[fe80::1]:80"),
            ("127.0.0.2:8", "127.0.0.2:8"),
        ];
        for (local, to) in cases {
            assert_eq!(reachable(local.parse().unwrap()), to.parse::<SocketAddr>().unwrap(), "{local}");
        }
    }
}
