//! The service manager's file descriptor store: keeping fds (listeners, live
//! connections, memfds with state) across restarts of the service.
//!
//! # Naming convention
//!
//! Every stored fd carries an `FDNAME=`; the next generation receives it in
//! `LISTEN_FDNAMES`. Baton's components use these names, and any application
//! may follow them:
//!
//! | Name | Meaning |
//! |---|---|
//! | `listen/<name>` | a listening socket the service bound itself, `<name>` as in `LISTEN_FDNAMES` |
//! | `conn` | a live connection handed over to the next generation |
//! | `vault/<n>` | Baton's: connections queued in one socket, kept for a crash of Baton |
//! | anything else | the application's own (`stored` is systemd's default) |
//!
//! All connections share the one name `conn`, on purpose: `LISTEN_FDNAMES`
//! is a single environment string, which Linux limits to 128 KiB
//! (`MAX_ARG_STRLEN`), so unique per-connection names would stop exec at
//! about 8,000 connections; five bytes each fit about 26,000. Store them up
//! to [`SCM_MAX_FD`](crate::wire::SCM_MAX_FD) per datagram.
//!
//! A stored fd stays in the store after it is passed to the next
//! generation. Whoever *adopts* the stored connections takes every `conn`
//! fd it received and then removes them all with one `FDSTOREREMOVE=1`
//! (see [`Notifier::remove_fds`]); otherwise they are handed over again on
//! the next restart. Connections are stored with polling on (the default),
//! so the manager drops them by itself when the peer hangs up while they
//! wait in the store. Under Baton's overlapped restarts, connections stored
//! by a draining generation are pushed straight to the running one instead
//! (see [`crate::handoff`]).

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::notify::{Notifier, NotifyError};
use crate::wire::{FdNameError, NotifyState};

/// The fd-store name of handed-over connections.
pub const CONNECTION: &str = "conn";

/// `<pid>/<seq>`, the per-connection names of earlier versions.
fn is_legacy_connection(rest: &str) -> bool {
    rest.split_once('/').is_some_and(|(pid, seq)| {
        crate::wire::parse_decimal(pid).is_some_and(|p| p > 0 && p <= i32::MAX as u64)
            && crate::wire::parse_decimal(seq).is_some()
    })
}

/// A parsed fd-store name (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredName<'a> {
    /// `listen/<name>`.
    Listener(&'a str),
    /// `conn` (also the legacy per-connection form `conn/<pid>/<seq>`).
    Connection,
    /// Any other name.
    Other(&'a str),
}

impl<'a> StoredName<'a> {
    /// Classifies a name from `LISTEN_FDNAMES`.
    pub fn parse(name: &'a str) -> Self {
        if let Some(l) = name.strip_prefix("listen/") {
            return StoredName::Listener(l);
        }
        if name == CONNECTION || name.strip_prefix("conn/").is_some_and(is_legacy_connection) {
            return StoredName::Connection;
        }
        StoredName::Other(name)
    }

    /// The name for `FDNAME=`, checked against systemd's rules.
    pub fn to_fdname(&self) -> Result<String, FdNameError> {
        let name = self.to_string();
        crate::wire::validate_fdname(&name)?;
        Ok(name)
    }
}

impl fmt::Display for StoredName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredName::Listener(n) => write!(f, "listen/{n}"),
            StoredName::Connection => f.write_str(CONNECTION),
            StoredName::Other(n) => f.write_str(n),
        }
    }
}

/// Whether the manager watches a stored fd for hang-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FdPoll {
    /// Drop the fd from the store on `EPOLLHUP`/`EPOLLERR` (systemd's
    /// default): right for connections.
    #[default]
    Poll,
    /// `FDPOLL=0`: keep it whatever happens, e.g. a pipe whose writer may exit.
    NoPoll,
}

impl Notifier {
    /// Stores fds under `name` (`FDSTORE=1`, `FDNAME=`). Requires
    /// `FileDescriptorStoreMax=` > 0 in the unit: systemd closes the fds
    /// otherwise and still reports success, so check with a later restart.
    pub fn store_fds(&self, name: &str, fds: &[BorrowedFd<'_>], poll: FdPoll) -> Result<(), NotifyError> {
        let mut states = vec![NotifyState::FdStore, NotifyState::FdName(name)];
        if poll == FdPoll::NoPoll {
            states.push(NotifyState::FdPollDisable);
        }
        self.notify_with_fds(&states, fds)
    }

    /// Removes every stored fd named `name` (`FDSTOREREMOVE=1`).
    pub fn remove_fds(&self, name: &str) -> Result<(), NotifyError> {
        self.notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [StoredName::Listener("http"), StoredName::Connection, StoredName::Other("state")] {
            let s = n.to_fdname().unwrap();
            assert_eq!(StoredName::parse(&s), n);
        }
        assert_eq!(StoredName::parse("conn/42/7"), StoredName::Connection);
        assert_eq!(StoredName::parse("conn/x/1"), StoredName::Other("conn/x/1"));
        assert_eq!(StoredName::parse("conn/1"), StoredName::Other("conn/1"));
        assert!(StoredName::Listener("a:b").to_fdname().is_err());
    }
}
