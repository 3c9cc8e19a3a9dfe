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
//! | `conn/<pid>/<seq>` | a live connection handed over by process `<pid>`, its `<seq>`-th; unique per fd so that it can be removed alone |
//! | anything else | the application's own (`stored` is systemd's default) |
//!
//! A stored fd stays in the store after it is passed to the next
//! generation. Whoever *adopts* a stored connection must therefore remove it
//! (`FDSTOREREMOVE=1` with its name, see [`Notifier::remove_fds`]) or it is
//! handed over again on the next restart. Connections are stored with
//! polling on (the default), so the manager drops them by itself when the
//! peer hangs up while they wait in the store.

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::notify::{Notifier, NotifyError};
use crate::wire::{FdNameError, NotifyState};

/// A parsed fd-store name (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredName<'a> {
    /// `listen/<name>`.
    Listener(&'a str),
    /// `conn/<pid>/<seq>`.
    Connection {
        /// The process that stored it.
        pid: u32,
        /// Its sequence number within that process.
        seq: u64,
    },
    /// Any other name.
    Other(&'a str),
}

impl<'a> StoredName<'a> {
    /// Classifies a name from `LISTEN_FDNAMES`.
    pub fn parse(name: &'a str) -> Self {
        if let Some(l) = name.strip_prefix("listen/") {
            return StoredName::Listener(l);
        }
        if let Some(rest) = name.strip_prefix("conn/")
            && let Some((pid, seq)) = rest.split_once('/')
            && let (Some(pid), Some(seq)) = (crate::wire::parse_decimal(pid), crate::wire::parse_decimal(seq))
            && let Ok(pid) = u32::try_from(pid)
        {
            return StoredName::Connection { pid, seq };
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
            StoredName::Connection { pid, seq } => write!(f, "conn/{pid}/{seq}"),
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
        for n in [StoredName::Listener("http"), StoredName::Connection { pid: 42, seq: 7 }, StoredName::Other("state")]
        {
            let s = n.to_fdname().unwrap();
            assert_eq!(StoredName::parse(&s), n);
        }
        assert_eq!(StoredName::parse("conn/x/1"), StoredName::Other("conn/x/1"));
        assert_eq!(StoredName::parse("conn/1"), StoredName::Other("conn/1"));
        assert!(StoredName::Listener("a:b").to_fdname().is_err());
    }
}
