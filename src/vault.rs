//! The connection vault: connections waiting in Baton's store, kept for a
//! crash of Baton itself in *one* entry of systemd's fd store.
//!
//! Under systemd Baton keeps everything it holds for its generations in
//! systemd's store too, so that a crash of Baton loses nothing. Stored one
//! fd at a time, live connections are what makes that expensive: systemd
//! 252 compares every new fd with every stored one (`service_add_fd_store()`
//! calls `same_fd()` per entry, in `src/core/service.c`), so 10,000
//! connections cost PID 1 about 35 s, and 257 duplicates each one and runs
//! out of fds near 10,000. Connections therefore go into a vault instead: a
//! unix datagram socket pair whose receiving end is stored in systemd's
//! store (one fd, `FDPOLL=0`), while Baton keeps the sending end. Each
//! message holds up to 253 connections in `SCM_RIGHTS`, in
//! [`baton_sd::handoff`]'s format (the name as bytes). Queued messages keep
//! their fds open while no process has received them, and the queue
//! outlives the sender: after a crash the next Baton gets the receiving end
//! back from systemd and [`recover`]s every connection from it.
//!
//! A queue cannot give back single messages, so connections that leave
//! Baton's store (moved to a generation, hung up) stay queued until the
//! vault is rebuilt: [`next_step`] rebuilds it once it holds more than
//! twice the live connections (each connection is sent to a vault O(1)
//! times amortised) and drops it once none is left. A rebuilt vault is
//! stored under a new name before the old one is removed, so a crash at
//! any moment leaves at least one complete copy; the next Baton takes every
//! vault it finds, and its store drops duplicates.
//!
//! Limits: a connection queued in a vault counts as in flight, which Linux
//! caps per user at `RLIMIT_NOFILE` for a process without
//! `CAP_SYS_RESOURCE` (`too_many_unix_fds()` in `net/unix/af_unix.c`); a
//! connection that does not fit is still stored in Baton's own store, only
//! not crash-safe (logged).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use baton_sd::fdstore::CONNECTION;
use baton_sd::{FdPoll, Notifier};
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

/// The prefix of vault entries in systemd's store (`vault/N`).
pub const VAULT_PREFIX: &str = "vault/";

/// Send buffer asked for (with `SO_SNDBUFFORCE` where allowed): each queued
/// message is a small buffer charged to the sending end, and 65,536
/// connections are 260 messages.
const SEND_BUFFER: usize = 4 << 20;

/// What to do with the vault after Baton's store changed ([`next_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing: it holds every live connection and not too many gone ones.
    Keep,
    /// Build a new one holding only the live connections.
    Rebuild,
    /// No connection is left: remove it.
    Drop,
}

/// What a vault holding `held` connections (live or gone) needs when the
/// store holds `live`. Pure: tested exhaustively below.
pub fn next_step(held: usize, live: usize) -> Step {
    if live == 0 {
        Step::Drop
    } else if held > 2 * live + baton_sd::wire::SCM_MAX_FD {
        // The slack of one message keeps a few hang-ups among a handful of
        // connections from rebuilding each time.
        Step::Rebuild
    } else {
        Step::Keep
    }
}

/// A vault Baton fills. See the [module docs](self).
#[derive(Debug)]
pub struct Vault {
    sender: OwnedFd,
    name: String,
    held: usize,
}

impl Vault {
    /// A new vault named `vault/{serial}` in systemd's store, holding `fds`.
    pub fn create(upstream: &Notifier, serial: u64, fds: &[BorrowedFd<'_>]) -> std::io::Result<Vault> {
        let (sender, kept) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        // Best effort: the default buffer already holds ~200 messages
        // (50,000 connections).
        if sockopt::set_socket_send_buffer_size_force(&sender, SEND_BUFFER).is_err() {
            let _ = sockopt::set_socket_send_buffer_size(&sender, SEND_BUFFER);
        }
        let mut vault = Vault { sender, name: format!("{VAULT_PREFIX}{serial}"), held: 0 };
        vault.append(fds)?;
        upstream.store_fds(&vault.name, &[kept.as_fd()], FdPoll::NoPoll).map_err(std::io::Error::other)?;
        Ok(vault)
    }

    /// Queues `fds` in the vault. On error the ones before the failed batch
    /// are in it.
    pub fn append(&mut self, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let result = crate::handoff::push(&self.sender, CONNECTION, fds);
        self.held += match &result {
            Ok(()) => fds.len(),
            Err((sent, _)) => *sent,
        };
        result.map_err(|(_, e)| e)
    }

    /// Connections queued, live or gone.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Its name in systemd's store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its sending end, for `baton upgrade`.
    pub fn sender(&self) -> BorrowedFd<'_> {
        self.sender.as_fd()
    }

    /// A vault handed over by `baton upgrade` ([`sender`](Self::sender),
    /// [`name`](Self::name), [`held`](Self::held)).
    pub fn restore(sender: OwnedFd, name: String, held: usize) -> Vault {
        Vault { sender, name, held }
    }

    /// The serial in a vault's name, to pick the next one above it.
    pub fn serial_of(name: &str) -> Option<u64> {
        name.strip_prefix(VAULT_PREFIX)?.parse().ok()
    }
}

/// Every connection queued in a vault's receiving end (as systemd gives it
/// back): received until the queue is empty, close-on-exec.
pub fn recover(kept: &OwnedFd) -> std::io::Result<Vec<OwnedFd>> {
    rustix::io::ioctl_fionbio(kept, true)?;
    let mut fds = Vec::new();
    loop {
        match baton_sd::handoff::receive(kept.as_fd()) {
            Ok(Some(message)) => fds.extend(message.fds),
            Ok(None) | Err(rustix::io::Errno::WOULDBLOCK) => return Ok(fds),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vault_is_rebuilt_only_when_mostly_gone_and_dropped_when_empty() {
        let slack = baton_sd::wire::SCM_MAX_FD;
        for live in 0..600 {
            for held in live..(3 * live + 2 * slack) {
                let step = next_step(held, live);
                let expected = if live == 0 {
                    Step::Drop
                } else if held > 2 * live + slack {
                    Step::Rebuild
                } else {
                    Step::Keep
                };
                assert_eq!(step, expected, "held {held}, live {live}");
            }
        }
        // Amortised: after a rebuild (held == live) at least live + slack
        // connections must go before the next one.
        for live in 1..2000 {
            assert_eq!(next_step(live, live), Step::Keep);
        }
    }

    #[test]
    fn queued_connections_outlive_the_sender_and_are_recovered() {
        let (sender, kept) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // One at a time: the listener's backlog is small.
        let (clients, accepted): (Vec<_>, Vec<_>) =
            (0..600).map(|_| (std::net::TcpStream::connect(addr).unwrap(), listener.accept().unwrap().0)).unzip();
        let mut vault = Vault::restore(sender, "vault/1".into(), 0);
        let borrowed: Vec<BorrowedFd<'_>> = accepted.iter().map(|s| s.as_fd()).collect();
        vault.append(&borrowed).unwrap();
        assert_eq!(vault.held(), 600);
        drop(accepted);
        drop(vault);
        let recovered = recover(&kept).unwrap();
        assert_eq!(recovered.len(), 600);
        // The same connections: each answers its client.
        use std::io::{Read, Write};
        for (fd, mut client) in recovered.into_iter().zip(clients) {
            let mut server = std::net::TcpStream::from(fd);
            server.write_all(b"x").unwrap();
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x");
        }
        assert!(recover(&kept).unwrap().is_empty(), "the queue is empty once recovered");
    }
}
