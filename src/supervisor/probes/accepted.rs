//! Whether the app has `accept()`ed one connection Baton made to its probe
//! listener.
//!
//! Baton holds its own copy of every probe listener, so `connect()` to it
//! always succeeds: the kernel completes the handshake and queues the
//! connection in the listener's accept queue whether the app ever calls
//! `accept()` or not. A TCP probe therefore passes only once the app took
//! *this* connection off the queue. Two ways to see that, without sleeping
//! blindly:
//!
//! - **sock_diag** (exact, preferred): one `NETLINK_SOCK_DIAG`
//!   `SOCK_DIAG_BY_FAMILY` request for the server-side socket of our
//!   connection (its 4-tuple). The kernel reports `idiag_inode` from
//!   `sock_i_ino()`, which is 0 while the socket sits in the accept queue
//!   (no `struct socket` is grafted on it before `accept()`, see
//!   `inet_csk_accept()`/`sock_graft()` in `net/ipv4/inet_connection_sock.c`)
//!   and the inode of the app's new socket once accepted. The exact lookup
//!   (`inet_diag_find_one_icsk()` in `net/ipv4/inet_diag.c`) falls back to
//!   the *listener* when no connected socket matches, so an answer counts
//!   only when its remote port is ours.
//! - **TCP_INFO on the listener** (where `AF_NETLINK` is refused, as by a
//!   unit's `RestrictAddressFamilies=`): on a listener `tcpi_unacked` is the
//!   accept queue's length (`sk_ack_backlog`, `tcp_get_info()` in
//!   `net/ipv4/tcp.c`). An empty queue after our connect completed means
//!   ours was taken. Weaker than sock_diag: it cannot tell ours from another
//!   connection, so it waits for the queue to be empty, and it counts on the
//!   handshake's last ACK having reached the listener by the time the
//!   client's connect completes, which on loopback happens in the same
//!   softirq run that wakes the connecting thread.
//!
//! Both are single non-blocking system calls (a netlink request to the
//! kernel is answered before `sendmsg()` returns), so the caller may poll
//! them from the supervisor's thread.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLM_F_REQUEST` (`linux/netlink.h`).
const NLM_F_REQUEST: u16 = 1;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR_LEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`.
const MSG_LEN: usize = 72;
/// `TCPF_ALL`: any state.
const ALL_STATES: u32 = u32::MAX;
/// `INET_DIAG_NOCOOKIE`, both halves.
const NO_COOKIE: u32 = u32::MAX;
/// `TCP_ESTABLISHED`... `TCP_CLOSING` (`include/net/tcp_states.h`): the
/// states of a connected socket (not `TCP_LISTEN`, 10, nor a request sock,
/// `TCP_NEW_SYN_RECV`, 12).
const CONNECTED_STATES: std::ops::RangeInclusive<u8> = 1..=11;
/// `TCP_LISTEN`.
const TCP_LISTEN: u8 = 10;

/// What one look says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// The app accepted it.
    Accepted,
    /// Still queued (or not yet visible): look again.
    Queued,
}

/// How to look.
pub(super) enum Observer {
    /// A `NETLINK_SOCK_DIAG` socket, `CLOEXEC`.
    SockDiag(OwnedFd),
    /// `TCP_INFO` on the listener.
    AcceptQueue,
}

impl Observer {
    /// sock_diag where this process may open it, else the accept queue.
    pub(super) fn new() -> Observer {
        match rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::SOCK_DIAG),
        ) {
            Ok(fd) => Observer::SockDiag(fd),
            Err(_) => Observer::AcceptQueue,
        }
    }

    /// Whether the connection from `client` (our end's address) to
    /// `server` (the probe listener's address) was accepted.
    pub(super) fn look(&self, listener: BorrowedFd<'_>, client: SocketAddr, server: SocketAddr) -> io::Result<Seen> {
        match self {
            Observer::SockDiag(nl) => {
                let request = diag_request(client, server);
                rustix::net::send(nl, &request, SendFlags::empty())?;
                let mut reply = [0u8; 8192];
                // Answered within the send above: never blocks.
                let (_, len) = rustix::net::recv(nl, &mut reply[..], RecvFlags::DONTWAIT)?;
                parse_diag_reply(&reply[..len.min(reply.len())], client)
            }
            Observer::AcceptQueue => Ok(if accept_queue_len(listener)? == 0 { Seen::Accepted } else { Seen::Queued }),
        }
    }
}

/// The `SOCK_DIAG_BY_FAMILY` request for the server side of the TCP
/// connection `client` → `server`: the socket's own address is `server`.
pub(super) fn diag_request(client: SocketAddr, server: SocketAddr) -> [u8; NLMSG_HDR_LEN + REQ_LEN] {
    let mut b = [0u8; NLMSG_HDR_LEN + REQ_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    // nlmsg_seq and nlmsg_pid stay 0: one request at a time, to the kernel.
    let r = &mut b[NLMSG_HDR_LEN..];
    r[0] = match server.ip() {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    r[1] = libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&ALL_STATES.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order.
    r[8..10].copy_from_slice(&server.port().to_be_bytes());
    r[10..12].copy_from_slice(&client.port().to_be_bytes());
    put_addr(&mut r[12..28], server.ip());
    put_addr(&mut r[28..44], client.ip());
    // idiag_if 0: any interface.
    r[48..52].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    r[52..56].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    b
}

fn put_addr(to: &mut [u8], ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => to[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => to.copy_from_slice(&v6.octets()),
    }
}

/// Reads the kernel's answer: an `inet_diag_msg` for a connected socket
/// whose remote port is `client`'s, with an inode, is [`Seen::Accepted`];
/// the same socket without one (still queued), a request sock (handshake
/// not complete), the listener (no connected match yet) or `ENOENT` is
/// [`Seen::Queued`]. Other errors are returned.
pub(super) fn parse_diag_reply(reply: &[u8], client: SocketAddr) -> io::Result<Seen> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer");
    if reply.len() < NLMSG_HDR_LEN {
        return Err(short());
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let body = &reply[NLMSG_HDR_LEN..];
    if kind == NLMSG_ERROR {
        let code = i32::from_ne_bytes(body.get(0..4).ok_or_else(short)?.try_into().map_err(|_| short())?);
        return match -code {
            0 | libc::ENOENT => Ok(Seen::Queued),
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || body.len() < MSG_LEN {
        return Err(short());
    }
    let state = body[1];
    let remote_port = u16::from_be_bytes([body[6], body[7]]);
    let inode = u32::from_ne_bytes([body[68], body[69], body[70], body[71]]);
    let ours = state != TCP_LISTEN && CONNECTED_STATES.contains(&state) && remote_port == client.port();
    Ok(if ours && inode != 0 { Seen::Accepted } else { Seen::Queued })
}

/// The accept queue's length of a TCP listener (`TCP_INFO`'s
/// `tcpi_unacked`, see the module header).
pub(crate) fn accept_queue_len(listener: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data, all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the
    // call; the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the probe socket is not a TCP listener"));
    }
    Ok(info.tcpi_unacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};

    fn v4(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn the_request_names_the_server_side_socket() {
        let b = diag_request(v4(40000), v4(8080));
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), SOCK_DIAG_BY_FAMILY);
        let r = &b[16..];
        assert_eq!((r[0], r[1]), (libc::AF_INET as u8, 6));
        assert_eq!(&r[8..12], &[0x1f, 0x90, 0x9c, 0x40]); // sport 8080, dport 40000
        assert_eq!(&r[12..16], &[127, 0, 0, 1]);
        assert_eq!(&r[28..32], &[127, 0, 0, 1]);
        let b6 = diag_request(SocketAddr::from((Ipv6Addr::LOCALHOST, 1)), SocketAddr::from((Ipv6Addr::LOCALHOST, 2)));
        assert_eq!(b6[16], libc::AF_INET6 as u8);
        assert_eq!(b6[16 + 27], 1);
        assert_eq!(b6[16 + 43], 1);
    }

    fn reply(state: u8, remote_port: u16, inode: u32) -> Vec<u8> {
        let mut r = vec![0u8; NLMSG_HDR_LEN + MSG_LEN];
        r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let m = &mut r[NLMSG_HDR_LEN..];
        m[1] = state;
        m[6..8].copy_from_slice(&remote_port.to_be_bytes());
        m[68..72].copy_from_slice(&inode.to_ne_bytes());
        r
    }

    fn error(errno: i32) -> Vec<u8> {
        let mut r = vec![0u8; NLMSG_HDR_LEN + 20];
        r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        r[16..20].copy_from_slice(&(-errno).to_ne_bytes());
        r
    }

    #[test]
    fn replies_are_read_as_the_kernel_means_them() {
        let client = v4(40000);
        assert_eq!(parse_diag_reply(&reply(1, 40000, 77), client).unwrap(), Seen::Accepted);
        assert_eq!(parse_diag_reply(&reply(8, 40000, 77), client).unwrap(), Seen::Accepted, "CLOSE_WAIT");
        assert_eq!(parse_diag_reply(&reply(1, 40000, 0), client).unwrap(), Seen::Queued, "not grafted yet");
        assert_eq!(parse_diag_reply(&reply(TCP_LISTEN, 0, 55), client).unwrap(), Seen::Queued, "the listener");
        assert_eq!(parse_diag_reply(&reply(12, 40000, 0), client).unwrap(), Seen::Queued, "a request sock");
        assert_eq!(parse_diag_reply(&reply(1, 40001, 77), client).unwrap(), Seen::Queued, "another connection");
        assert_eq!(parse_diag_reply(&error(libc::ENOENT), client).unwrap(), Seen::Queued);
        assert_eq!(parse_diag_reply(&error(libc::EPERM), client).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(parse_diag_reply(&[0; 8], client).is_err());
        assert!(parse_diag_reply(&reply(1, 40000, 1)[..40], client).is_err());
    }

    /// Both observers against the kernel: queued until the app accepts.
    #[test]
    fn both_observers_see_the_accept() {
        for observer in [Observer::new(), Observer::AcceptQueue] {
            let listener = TcpListener::bind(v4(0)).unwrap();
            let server = listener.local_addr().unwrap();
            let conn = TcpStream::connect(server).unwrap();
            let client = conn.local_addr().unwrap();
            let look = || observer.look(listener.as_fd(), client, server).unwrap();
            if matches!(observer, Observer::SockDiag(_)) {
                // The handshake's last ACK may still be on its way: wait
                // until the kernel shows the connection, queued.
                assert_eq!(look(), Seen::Queued);
            } else {
                assert_eq!(accept_queue_len(listener.as_fd()).unwrap(), 1);
                assert_eq!(look(), Seen::Queued);
            }
            let (_accepted, _) = listener.accept().unwrap();
            assert_eq!(look(), Seen::Accepted);
        }
    }

    #[test]
    fn this_machine_offers_sock_diag() {
        // The exact observer is the one used outside restricted units;
        // make sure the test above exercised it here.
        assert!(matches!(Observer::new(), Observer::SockDiag(_)));
    }

    #[test]
    fn the_queue_of_a_non_listener_is_refused() {
        let listener = TcpListener::bind(v4(0)).unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let e = accept_queue_len(conn.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a TCP listener"), "{e}");
    }
}
