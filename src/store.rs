//! Baton's own fd store.
//!
//! The app sends `FDSTORE=1` (with `FDNAME=` and fds) to keep fds — its
//! listeners, live connections, memfds with state — across a restart; the
//! next generation receives them after the sockets in `LISTEN_FDS`, with
//! their names in `LISTEN_FDNAMES`. The semantics are systemd 252's
//! (`service_add_fd_store()`, `on_fd_store_io()` and
//! `service_remove_fd_store()` in `src/core/service.c`):
//!
//! - a maximum (`--fdstore-max`, systemd's `FileDescriptorStoreMax=`); 0
//!   disables the store and every fd sent is closed;
//! - when the store is full, the fd that does not fit and all remaining fds
//!   of that message are closed (checked *before* de-duplication, as in
//!   systemd);
//! - an fd referring to the same open file description as an entry already
//!   stored is closed silently (systemd's `same_fd()`). Two such fds have
//!   the same inode, so only entries with the new fd's inode are compared
//!   (by `kcmp`): one `fstat` per fd, where systemd 252 compares each new
//!   fd with every stored one (10,000 connections cost it ~35 s);
//! - polled entries (the default) are removed automatically when they report
//!   `EPOLLHUP` or `EPOLLERR` — a connection whose peer is gone — while
//!   `FDPOLL=0` entries and fds that cannot be polled (regular files,
//!   memfds) are kept until removed;
//! - `FDSTOREREMOVE=1` removes every entry with the given name.
//!
//! # Hang-up detection
//!
//! Exactly as systemd (`sd_event_add_io(…, fd, 0, …)`), polled entries are
//! registered with an *empty* event mask in a private epoll instance: the
//! kernel reports only `EPOLLHUP` and `EPOLLERR` for them, never
//! readability. A stored connection whose client pipelines data, or
//! half-closes its side (`EPOLLRDHUP`), therefore never wakes Baton. The
//! epoll fd itself is registered with tokio once and becomes readable only
//! when some entry hung up. Using a private epoll instance also sidesteps
//! tokio's rule that one fd is registered only once: a stored fd may share its
//! open file description with one of Baton's own listening sockets, which is
//! registered in tokio's epoll, not in ours.
//!
//! Order: [`FdStore::entries`] yields insertion order. systemd 252 passes its
//! store newest-first (it prepends) and documents the order as arbitrary;
//! insertion order is the one an app can reason about.
//!
//! # Closing
//!
//! Every fd the store holds or refuses came from another process, so it is
//! a [`ReceivedFd`]: refused ones (full, disabled, duplicate), removed ones
//! and hung-up ones are closed by the closer thread, never on the
//! supervisor's (see [`crate::closer`]). Closing is therefore asynchronous:
//! an fd is gone shortly after the call that dropped it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use baton_sd::fdstore::CONNECTION;

use crate::closer::ReceivedFd;

/// `KCMP_FILE` from `<linux/kcmp.h>`: compare two fds' open file
/// descriptions.
const KCMP_FILE: libc::c_int = 0;

/// The outcome for one fd given to [`FdStore::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The fd is now in the store.
    Stored,
    /// The store already holds this open file description; the fd was
    /// closed (systemd does the same, silently).
    Duplicate,
}

/// Why fds could not be stored. The fds counted in `closed` are closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is disabled (maximum 0).
    #[error(
        "the fd store is disabled: closed {closed} fd(s) the app sent with FDSTORE=1; start Baton with \
         --fdstore-max N to keep them"
    )]
    Disabled {
        /// How many fds were closed.
        closed: usize,
    },
    /// The store holds its maximum already.
    #[error(
        "the fd store is full ({max} fds): closed the remaining {closed} fd(s); raise --fdstore-max or have the \
         app remove entries with FDSTOREREMOVE=1"
    )]
    Full {
        /// The store's maximum.
        max: usize,
        /// How many fds were closed.
        closed: usize,
    },
    /// Watching an fd for hang-ups failed for a reason other than the fd
    /// being unpollable (e.g. `fs.epoll.max_user_watches` reached). As in
    /// systemd, that fd and the remaining ones were closed.
    #[error(
        "could not watch a stored fd for hang-ups: {source}; closed {closed} fd(s) (raise \
         fs.epoll.max_user_watches, or send FDPOLL=0 for fds that need no watching)"
    )]
    Watch {
        /// How many fds were closed.
        closed: usize,
        /// The epoll error.
        source: io::Error,
    },
}

/// A polled entry that hung up and was removed from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hangup {
    /// The entry's name (`FDNAME=`).
    pub name: String,
}

#[derive(Debug)]
struct Entry {
    /// Key in the epoll instance, unique for the store's lifetime.
    id: u64,
    name: String,
    fd: ReceivedFd,
    /// Registered in the epoll instance (must be deleted from it before the
    /// fd is closed: other processes may hold copies of the description, and
    /// epoll forgets an fd only when the description's last copy closes).
    polled: bool,
    /// Its inode, the key of [`FdStore::inodes`]; `None` if `fstat` failed.
    inode: Option<Inode>,
}

/// A file's device and inode number: every fd of one open file description
/// has the same.
type Inode = (u64, u64);

fn inode_of(fd: BorrowedFd<'_>) -> Option<Inode> {
    rustix::fs::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// The private epoll instance, created on the first polled entry and handed
/// to tokio on the first [`FdStore::hangup`].
#[derive(Debug)]
enum Watcher {
    None,
    Plain(OwnedFd),
    Registered(AsyncFd<OwnedFd>),
    /// tokio refused to register it: hang-ups go unnoticed (logged once).
    Unregistrable(OwnedFd),
}

impl Watcher {
    fn epoll_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Watcher::None => None,
            Watcher::Plain(fd) | Watcher::Unregistrable(fd) => Some(fd.as_fd()),
            Watcher::Registered(afd) => Some(afd.get_ref().as_fd()),
        }
    }
}

/// Baton's fd store. See the [module docs](self).
#[derive(Debug)]
pub struct FdStore {
    max: usize,
    entries: Vec<Entry>,
    /// How many entries have each inode: a new fd is compared only with
    /// the entries of its own inode (see the [module docs](self)).
    inodes: HashMap<Inode, usize>,
    /// How many entries are connections ([`CONNECTION`]).
    connections: usize,
    next_id: u64,
    watcher: Watcher,
    spurious_wakeups: u64,
}

impl FdStore {
    /// An empty store holding at most `max` fds; 0 disables it.
    ///
    /// Needs no runtime; [`hangup`](Self::hangup) must be awaited within a
    /// tokio runtime.
    pub fn new(max: usize) -> FdStore {
        FdStore {
            max,
            entries: Vec::new(),
            inodes: HashMap::new(),
            connections: 0,
            next_id: 0,
            watcher: Watcher::None,
            spurious_wakeups: 0,
        }
    }

    /// Creates the private epoll instance now rather than with the first
    /// polled entry, so that a long-running Baton holds the same number of
    /// fds before and after its store is first used (a soak test counts
    /// them). A no-op when it exists or the store is disabled.
    pub fn watch_hangups(&mut self) -> io::Result<()> {
        if self.max > 0 && matches!(self.watcher, Watcher::None) {
            self.watcher = Watcher::Plain(epoll::create(epoll::CreateFlags::CLOEXEC)?);
        }
        Ok(())
    }

    /// The maximum number of entries.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many entries are connections (named [`CONNECTION`]).
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Whether the store holds no fd.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds one datagram's fds under one name. `poll` is false for
    /// `FDPOLL=0`.
    ///
    /// Returns the outcome per fd, or a [`StoreError`] once an fd cannot be
    /// stored: that fd and all the following ones are closed (the ones
    /// before it stay stored). No fds is always `Ok`, even when the store is
    /// disabled.
    pub fn add(&mut self, name: &str, fds: Vec<OwnedFd>, poll: bool) -> Result<Vec<Added>, StoreError> {
        // Wrapped before anything can drop one: a refused fd, too, is closed
        // off this thread.
        self.add_received(name, fds.into_iter().map(ReceivedFd::new).collect(), poll)
    }

    /// [`add`](Self::add) for fds already held as [`ReceivedFd`]s, as they
    /// come from the notify socket.
    pub fn add_received(&mut self, name: &str, fds: Vec<ReceivedFd>, poll: bool) -> Result<Vec<Added>, StoreError> {
        let mut outcome = Vec::with_capacity(fds.len());
        let mut fds = fds.into_iter();
        while let Some(fd) = fds.next() {
            // Dropping `fd` and the iterator closes what is left.
            let closed = 1 + fds.len();
            if self.entries.len() >= self.max {
                return Err(if self.max == 0 {
                    StoreError::Disabled { closed }
                } else {
                    StoreError::Full { max: self.max, closed }
                });
            }
            let inode = inode_of(fd.as_fd());
            if self.holds(inode, fd.as_fd()) {
                outcome.push(Added::Duplicate);
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let polled = if poll {
                match self.watch(fd.as_fd(), id) {
                    Ok(polled) => polled,
                    Err(source) => return Err(StoreError::Watch { closed, source }),
                }
            } else {
                false
            };
            self.push(Entry { id, name: name.to_owned(), fd, polled, inode });
            outcome.push(Added::Stored);
        }
        Ok(outcome)
    }

    /// `FDSTOREREMOVE=1`: removes and closes every entry named `name`;
    /// returns how many.
    pub fn remove(&mut self, name: &str) -> usize {
        self.remove_where(|e| e.name == name)
    }

    /// Removes (and closes) the entries holding these fd numbers; returns
    /// how many.
    pub fn remove_raw(&mut self, raws: &[std::os::fd::RawFd]) -> usize {
        // A set: thousands of connections are moved out at once.
        let raws: HashSet<std::os::fd::RawFd> = raws.iter().copied().collect();
        self.remove_where(|e| raws.contains(&e.fd.as_raw_fd()))
    }

    /// Removes (and closes) the entries `doomed` picks, in one pass;
    /// returns how many.
    fn remove_where(&mut self, mut doomed: impl FnMut(&Entry) -> bool) -> usize {
        let before = self.entries.len();
        let mut kept = Vec::with_capacity(before);
        let mut closed = Vec::new();
        for entry in std::mem::take(&mut self.entries) {
            if doomed(&entry) {
                closed.push(self.unlist(entry));
            } else {
                kept.push(entry);
            }
        }
        self.entries = kept;
        // Together: thousands of connections leave at once when they are
        // moved to a generation.
        crate::closer::discard_all(closed);
        before - self.entries.len()
    }

    /// Whether an entry refers to `fd`'s open file description: only the
    /// entries with its inode can (`kcmp` tells them apart).
    fn holds(&self, inode: Option<Inode>, fd: BorrowedFd<'_>) -> bool {
        match inode {
            Some(inode) if self.inodes.contains_key(&inode) => {
                self.entries.iter().any(|e| e.inode == Some(inode) && same_fd(e.fd.as_fd(), fd))
            }
            // No entry has its inode, or it has none to compare (`fstat`
            // failed: stored rather than lost, as `same_fd` does).
            _ => false,
        }
    }

    fn push(&mut self, entry: Entry) {
        if let Some(inode) = entry.inode {
            *self.inodes.entry(inode).or_default() += 1;
        }
        self.connections += usize::from(entry.name == CONNECTION);
        self.entries.push(entry);
    }

    /// The entries in insertion order, for passing to the next generation.
    pub fn entries(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        self.entries.iter().map(|e| (e.name.as_str(), e.fd.as_fd()))
    }

    /// Waits until a polled entry hangs up (`EPOLLHUP`/`EPOLLERR`), removes
    /// and closes it, and says which.
    ///
    /// Pending forever while nothing polled hangs up. Cancel-safe: the
    /// hang-up is taken from epoll and the entry removed within one poll, so
    /// it can be a branch of `tokio::select!` in a loop.
    pub async fn hangup(&mut self) -> Hangup {
        if let Watcher::Plain(_) = self.watcher {
            let Watcher::Plain(ep) = std::mem::replace(&mut self.watcher, Watcher::None) else { unreachable!() };
            // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it
            // until dropped: it stays open, refers to the same epoll
            // instance, and `as_raw_fd()` returns the same number throughout.
            self.watcher = match unsafe { AsyncFd::register_with_interest(ep, Interest::READABLE) } {
                Ok(afd) => Watcher::Registered(afd),
                Err(e) => {
                    let (ep, e) = e.into_parts();
                    tracing::error!("fd store: cannot watch stored fds for hang-ups: {e}; they stay stored");
                    Watcher::Unregistrable(ep)
                }
            };
        }
        let FdStore { entries, inodes, connections, watcher, spurious_wakeups, .. } = self;
        let Watcher::Registered(afd) = &*watcher else {
            // Nothing polled yet (a later call will see new entries), or
            // hang-ups cannot be watched at all.
            return std::future::pending().await;
        };
        loop {
            let mut guard = match afd.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!("fd store: watching for hang-ups failed: {e}; stored fds stay stored");
                    return std::future::pending().await;
                }
            };
            let mut events = [const { MaybeUninit::<epoll::Event>::uninit() }; 16];
            let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
            let (found, more) = match epoll::wait(afd.get_ref(), &mut events, Some(&zero)) {
                // Every registered id belongs to a live entry (ids leave
                // epoll before their entry goes), so the first event is
                // normally the one; looking past unknown ids keeps even a
                // stale registration from hiding real hang-ups.
                Ok((ready, _)) => {
                    (ready.iter().find_map(|ev| entries.iter().position(|e| e.id == ev.data.u64())), ready.len() > 1)
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!("fd store: epoll_wait failed: {e}; stored fds stay stored");
                    return std::future::pending().await;
                }
            };
            let Some(pos) = found else {
                // Nothing to report: wait for the next edge.
                *spurious_wakeups += 1;
                guard.clear_ready();
                continue;
            };
            if more {
                // Level-triggered: the other pending hang-ups are reported
                // again by the next epoll_wait, so keep the readiness.
                guard.retain_ready();
            } else {
                // The one pending event is handled (its entry leaves epoll
                // below). A hang-up arriving meanwhile is a new edge for the
                // reactor, which `clear_ready` does not swallow.
                guard.clear_ready();
            }
            let entry = entries.remove(pos);
            let name = entry.name.clone();
            drop(unlist(watcher.epoll_fd(), inodes, connections, entry));
            return Hangup { name };
        }
    }

    /// Every entry as (name, fd number, polled), in insertion order, for
    /// handing the store to the next program image (`baton upgrade`). The
    /// numbers stay valid while the store lives; the private epoll instance
    /// is not handed over (close-on-exec): [`restore`](Self::restore)
    /// builds a new one.
    pub fn export(&self) -> Vec<(String, std::os::fd::RawFd, bool)> {
        self.entries.iter().map(|e| (e.name.clone(), e.fd.as_raw_fd(), e.polled)).collect()
    }

    /// Whether the private epoll instance exists (it is created by the
    /// first entry stored with polling asked for, even an unpollable one).
    pub fn is_watching(&self) -> bool {
        !matches!(self.watcher, Watcher::None)
    }

    /// Rebuilds a store from [`export`](Self::export)ed entries whose fds
    /// were handed over: same order, names and polling (an entry that was
    /// not polled — `FDPOLL=0` or unpollable — stays unpolled). `watching`
    /// ([`is_watching`](Self::is_watching) of the old store) recreates the
    /// epoll instance even with no polled entry, so the new image holds
    /// exactly as many fds as the old one.
    pub fn restore(max: usize, entries: Vec<(String, OwnedFd, bool)>, watching: bool) -> Result<FdStore, StoreError> {
        // No limit or duplicate check: these entries passed them when they
        // were first stored.
        let entries: Vec<(String, ReceivedFd, bool)> =
            entries.into_iter().map(|(name, fd, polled)| (name, ReceivedFd::new(fd), polled)).collect();
        let mut store = FdStore::new(max);
        if watching {
            let ep = epoll::create(epoll::CreateFlags::CLOEXEC)
                .map_err(|e| StoreError::Watch { closed: entries.len(), source: e.into() })?;
            store.watcher = Watcher::Plain(ep);
        }
        for (name, fd, polled) in entries {
            let id = store.next_id;
            store.next_id += 1;
            let polled = if polled {
                match store.watch(fd.as_fd(), id) {
                    Ok(polled) => polled,
                    Err(source) => return Err(StoreError::Watch { closed: 1, source }),
                }
            } else {
                false
            };
            let inode = inode_of(fd.as_fd());
            store.push(Entry { id, name, fd, polled, inode });
        }
        Ok(store)
    }

    /// Empties the store, closing everything.
    pub fn clear(&mut self) {
        self.remove_where(|_| true);
    }

    /// How often [`hangup`](Self::hangup) woke up without any hang-up to
    /// report. Stays 0 when readable-but-alive entries cause no wake-ups;
    /// for tests.
    #[doc(hidden)]
    pub fn spurious_wakeups(&self) -> u64 {
        self.spurious_wakeups
    }

    /// Registers `fd` for hang-ups. `Ok(false)` when it cannot be polled
    /// (epoll says `EPERM`: regular files, memfds), which systemd accepts as
    /// "never hangs up".
    fn watch(&mut self, fd: BorrowedFd<'_>, id: u64) -> io::Result<bool> {
        if let Watcher::None = self.watcher {
            self.watcher = Watcher::Plain(epoll::create(epoll::CreateFlags::CLOEXEC)?);
        }
        let ep = self.watcher.epoll_fd().expect("created above");
        // An empty mask: only EPOLLHUP and EPOLLERR, which epoll always
        // reports, level-triggered until the entry is deleted.
        match epoll::add(ep, fd, epoll::EventData::new_u64(id), epoll::EventFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::PERM) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A removed entry's fd, out of the epoll instance and the inode count,
    /// for the caller to close.
    fn unlist(&mut self, entry: Entry) -> ReceivedFd {
        unlist(self.watcher.epoll_fd(), &mut self.inodes, &mut self.connections, entry)
    }
}

/// Takes a removed entry out of the epoll instance, the inode count and the
/// count of connections; returns its fd.
fn unlist(
    epoll_fd: Option<BorrowedFd<'_>>,
    inodes: &mut HashMap<Inode, usize>,
    connections: &mut usize,
    entry: Entry,
) -> ReceivedFd {
    *connections -= usize::from(entry.name == CONNECTION);
    if entry.polled
        && let Some(ep) = epoll_fd
    {
        let _ = epoll::delete(ep, &entry.fd);
    }
    if let Some(inode) = entry.inode
        && let Some(count) = inodes.get_mut(&inode)
    {
        *count -= 1;
        if *count == 0 {
            inodes.remove(&inode);
        }
    }
    entry.fd
}

/// systemd's `same_fd()`: whether two fds refer to the same open file
/// description. `kcmp(KCMP_FILE)` answers exactly; where it is unavailable
/// (`ENOSYS`, or `EPERM`/`EACCES` under a restrictive seccomp or Yama
/// policy), the fallback is the same inode (and file type), not a device, and
/// the same file status flags — which tells the two ends of a pipe apart but
/// may take two separate opens of one file with equal flags for one.
/// Any other error counts as "different", so the fd is stored rather than
/// lost.
fn same_fd(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    if a.as_raw_fd() == b.as_raw_fd() {
        return true;
    }
    let pid = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: kcmp takes only integers (pids, a type, two fd numbers) and
    // touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd() as libc::c_ulong,
            b.as_raw_fd() as libc::c_ulong,
        )
    };
    match r {
        0 => true,
        r if r > 0 => false,
        _ => match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM | libc::EACCES) => same_fd_by_stat(a, b),
            _ => false,
        },
    }
}

/// The `fstat` + `F_GETFL` fallback of [`same_fd`].
fn same_fd_by_stat(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (Ok(sa), Ok(sb)) = (rustix::fs::fstat(a), rustix::fs::fstat(b)) else {
        return false;
    };
    let kind = |st: &rustix::fs::Stat| st.st_mode & libc::S_IFMT;
    if sa.st_dev != sb.st_dev || sa.st_ino != sb.st_ino || kind(&sa) != kind(&sb) {
        return false;
    }
    // Two fds of one device node may be quite different device contexts.
    if kind(&sa) == libc::S_IFCHR || kind(&sa) == libc::S_IFBLK {
        return false;
    }
    matches!((rustix::fs::fcntl_getfl(a), rustix::fs::fcntl_getfl(b)), (Ok(fa), Ok(fb)) if fa == fb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_fd_tells_descriptions_apart() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let r2 = r.try_clone().unwrap();
        assert!(same_fd(r.as_fd(), r2.as_fd()));
        assert!(!same_fd(r.as_fd(), w.as_fd()), "pipe ends are different descriptions");
        let f1 = std::fs::File::open("/proc/self/exe").unwrap();
        let f2 = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!same_fd(f1.as_fd(), f2.as_fd()), "kcmp sees two opens of one file as different");
    }

    #[test]
    fn stat_fallback_matches_systemd() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let r2 = r.try_clone().unwrap();
        assert!(same_fd_by_stat(r.as_fd(), r2.as_fd()));
        assert!(!same_fd_by_stat(r.as_fd(), w.as_fd()), "same inode, different flags");
        let null1 = std::fs::File::open("/dev/null").unwrap();
        let null2 = null1.try_clone().unwrap();
        assert!(!same_fd_by_stat(null1.as_fd(), null2.as_fd()), "device fds always count as different");
    }
}
