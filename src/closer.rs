//! Closing fds that other processes chose, off the supervisor's thread.
//!
//! `close(2)` is not always quick. Dropping the last reference to a file runs
//! its release in the closing thread (`fput()` → `__fput()` on return to user
//! space, `fs/file_table.c`), and some releases wait:
//!
//! - a TCP socket with `SO_LINGER` set and unsent data waits up to the linger
//!   time for the peer to acknowledge it (`inet_release()` →
//!   `tcp_close()` → `sk_stream_wait_close()`); a peer that never reads makes
//!   that the whole linger time;
//! - a FUSE file waits for its daemon's answer to `FLUSH`;
//! - an `AF_UNIX` socket releases every fd still queued in it
//!   (`unix_release_sock()` purges its receive queue), each of which may be
//!   any of the above.
//!
//! Anyone who can send Baton an fd (over `SCM_RIGHTS` to the notify socket,
//! or queued in a connection to the handoff socket) and then closes their own
//! copy decides how long Baton's close of it takes. Baton's supervisor runs
//! on one thread, so such a close would freeze READY processing, reaping,
//! timers and the control socket meanwhile (issue 10, finding 1: `baton
//! status` took 13 s during a 15 s linger).
//!
//! So every fd Baton did not create itself is held as a [`ReceivedFd`], whose
//! drop hands it to one closer thread over a bounded queue
//! ([`QUEUE_CAPACITY`]). Only the closer thread ever waits. A queue that is
//! full (the closer is stuck behind slow closes) does not grow: the fd is
//! then closed inline after `SO_LINGER {on, 0}`; see [`discard`] for what
//! that costs. `execve` would close the queued fds on the exec'ing thread
//! (they are close-on-exec), so `baton upgrade` calls
//! [`close_queued_without_lingering`] first.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How many fds may wait for the closer thread. Each waiting fd holds a slot
/// of Baton's `RLIMIT_NOFILE`, so this stays far below the usual soft limit
/// of 1024 (even with one more notify datagram of 253 fds in hand).
pub const QUEUE_CAPACITY: usize = 256;

/// The closer thread needs next to no stack: it only closes fds.
const CLOSER_STACK: usize = 64 * 1024;

/// An fd another process chose (received over `SCM_RIGHTS`, or an accepted
/// connection whose peer may have queued fds in it): dropping it never
/// blocks the calling thread, see the [module docs](self).
///
/// Owns the fd like an [`OwnedFd`]; [`into_owned`](Self::into_owned) gives
/// the plain fd back to code that must own it (e.g. to pass it on), which
/// then takes over the duty of closing it safely.
#[derive(Debug)]
pub struct ReceivedFd(Option<OwnedFd>);

impl ReceivedFd {
    /// Takes ownership of `fd`.
    pub fn new(fd: OwnedFd) -> ReceivedFd {
        ReceivedFd(Some(fd))
    }

    /// The plain fd, no longer closed through the closer thread.
    pub fn into_owned(mut self) -> OwnedFd {
        self.0.take().expect("a ReceivedFd holds its fd until dropped")
    }
}

impl From<OwnedFd> for ReceivedFd {
    fn from(fd: OwnedFd) -> ReceivedFd {
        ReceivedFd::new(fd)
    }
}

impl AsFd for ReceivedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_ref().expect("a ReceivedFd holds its fd until dropped").as_fd()
    }
}

impl AsRawFd for ReceivedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for ReceivedFd {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            discard(fd);
        }
    }
}

/// How many fds were closed inline because the queue was full or the closer
/// thread could not be started.
static CLOSED_INLINE: AtomicU64 = AtomicU64::new(0);

/// Starts the closer thread now rather than with the first fd to close, so
/// that Baton's thread count is the same before and after (a soak test
/// counts threads). Idempotent.
pub fn start() {
    let _ = closer();
}

/// The process's one closer.
fn closer() -> &'static Closer {
    static CLOSER: OnceLock<Closer> = OnceLock::new();
    CLOSER.get_or_init(|| Closer::with_capacity(QUEUE_CAPACITY))
}

/// A closer thread and its bounded queue; the thread ends when the closer
/// is dropped (only test closers are), after closing what is queued.
///
/// A mutex-guarded queue rather than a channel, so that
/// [`close_queued_without_lingering`] can reach the fds still waiting.
struct Closer {
    /// `None` when the thread could not be started.
    shared: Option<Arc<Shared>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when an fd is queued or the closer is dropped.
    queued: Condvar,
    /// Signalled when an fd has been closed (for [`flush`]).
    closed: Condvar,
}

struct State {
    fds: VecDeque<OwnedFd>,
    capacity: usize,
    /// Fds ever queued, and ever taken off the queue and closed (or defused):
    /// `flush` waits for the second to reach the first.
    total_queued: u64,
    total_done: u64,
    shutdown: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still
        // consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Closer {
    fn with_capacity(capacity: usize) -> Closer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fds: VecDeque::with_capacity(capacity),
                capacity,
                total_queued: 0,
                total_done: 0,
                shutdown: false,
            }),
            queued: Condvar::new(),
            closed: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("baton-closer".into())
            .stack_size(CLOSER_STACK)
            .spawn(move || run(&worker));
        match spawned {
            Ok(_) => Closer { shared: Some(shared) },
            Err(e) => {
                tracing::error!(
                    "cannot start the fd closer thread: {e}; received fds are closed without lingering instead \
                     (raise the thread or memory limit of Baton)"
                );
                Closer { shared: None }
            }
        }
    }

    fn discard(&self, fd: OwnedFd) {
        let Some(shared) = &self.shared else { return close_without_lingering(fd) };
        let mut state = shared.lock();
        if state.fds.len() >= state.capacity {
            drop(state);
            return close_without_lingering(fd);
        }
        state.fds.push_back(fd);
        state.total_queued += 1;
        drop(state);
        shared.queued.notify_one();
    }

    fn flush(&self) {
        let Some(shared) = &self.shared else { return };
        let mut state = shared.lock();
        let target = state.total_queued;
        while state.total_done < target {
            state = shared.closed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close_queued_without_lingering(&self) {
        let Some(shared) = &self.shared else { return };
        let mut state = shared.lock();
        let fds = std::mem::take(&mut state.fds);
        state.total_done += fds.len() as u64;
        drop(state);
        fds.into_iter().for_each(close_without_lingering);
        shared.closed.notify_all();
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().shutdown = true;
            shared.queued.notify_one();
        }
    }
}

fn run(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(fd) = state.fds.pop_front() {
            // Closed without the lock held: this is the close that may wait.
            drop(state);
            drop(fd);
            state = shared.lock();
            state.total_done += 1;
            shared.closed.notify_all();
        } else if state.shutdown {
            return;
        } else {
            state = shared.queued.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// For `baton upgrade`, right before the exec: `execve` closes every
/// close-on-exec fd on the calling thread, lingering included, so the fds
/// still queued for the closer are closed now, without lingering (see
/// [`discard`] for what that costs). The one the closer thread is closing at
/// that moment does not hold the exec up: the exec kills that thread, which
/// interrupts its wait.
pub fn close_queued_without_lingering() {
    closer().close_queued_without_lingering();
}

/// Closes `fd` without blocking the calling thread: queued for the closer
/// thread, or, when its queue is full, closed inline after `SO_LINGER {on,
/// 0}`.
///
/// The inline fallback's trade-off: a TCP socket closed with a zero linger
/// is reset (`RST`), its unsent data discarded, instead of being shut down
/// gracefully; and the option is set on the open file description, which
/// the sender may still share. That only happens while the closer is
/// already stuck behind [`QUEUE_CAPACITY`] slow closes, i.e. under attack,
/// and it keeps both the supervisor responsive and Baton's memory and fd use
/// bounded. What the fallback cannot defuse: a non-socket whose release
/// waits (a FUSE file with an unresponsive daemon) or an `AF_UNIX` socket
/// with lingering sockets queued in it; those still need the closer stuck
/// behind hundreds of such files first.
pub fn discard(fd: OwnedFd) {
    closer().discard(fd);
}

/// `SO_LINGER {on, 0}`, then close: an abortive close that never waits for
/// the peer. Not a socket (`ENOTSOCK`): closed as it is.
fn close_without_lingering(fd: OwnedFd) {
    CLOSED_INLINE.fetch_add(1, Ordering::Relaxed);
    let _ = rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO));
    drop(fd);
}

/// Blocks until every fd handed to the closer before the call is closed.
/// For tests that check an fd is gone; never call it on the supervisor's
/// thread (it waits behind slow closes).
#[doc(hidden)]
pub fn flush() {
    closer().flush();
}

/// How many fds were closed inline (queue full or no closer thread). For
/// tests.
#[doc(hidden)]
pub fn closed_inline() -> u64 {
    CLOSED_INLINE.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// A loopback TCP connection whose close would linger for `linger`:
    /// the peer never reads, the send buffer is full, `SO_LINGER` is set.
    /// Returns the sending end and the listener/peer to keep alive.
    fn lingering_socket(linger: Duration) -> (OwnedFd, (TcpListener, TcpStream)) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&peer, 4096).unwrap();
        client.set_nonblocking(true).unwrap();
        let chunk = [0u8; 65536];
        while client.write(&chunk).is_ok() {}
        rustix::net::sockopt::set_socket_linger(&client, Some(linger)).unwrap();
        (OwnedFd::from(client), (listener, peer))
    }

    #[test]
    fn a_plain_close_of_such_a_socket_does_block() {
        // The premise of this module, so that the tests below mean something.
        let (fd, _keep) = lingering_socket(Duration::from_secs(1));
        let started = Instant::now();
        drop(fd);
        assert!(started.elapsed() >= Duration::from_millis(900), "closed in {:?}", started.elapsed());
    }

    #[test]
    fn dropping_a_received_fd_returns_at_once_and_closes_it_later() {
        let (fd, _keep) = lingering_socket(Duration::from_secs(2));
        let probe = fd.try_clone().unwrap();
        let started = Instant::now();
        drop(ReceivedFd::new(fd));
        assert!(started.elapsed() < Duration::from_millis(500), "drop took {:?}", started.elapsed());
        // Our probe keeps the socket alive, so the closer's close is not the
        // last one and returns at once; the flush proves it was done.
        flush();
        drop(probe);
    }

    #[test]
    fn the_inline_fallback_does_not_linger() {
        let (fd, _keep) = lingering_socket(Duration::from_secs(30));
        let before = closed_inline();
        let started = Instant::now();
        close_without_lingering(fd);
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(closed_inline() > before);
    }

    #[test]
    fn a_full_queue_falls_back_to_closing_without_lingering() {
        // A private closer with room for one fd: the first lingering socket
        // keeps its thread busy, the second waits in the queue, the third
        // finds the queue full.
        let closer = Closer::with_capacity(1);
        let (busy, _keep1) = lingering_socket(Duration::from_secs(2));
        let (queued, _keep2) = lingering_socket(Duration::from_secs(2));
        let (overflow, _keep3) = lingering_socket(Duration::from_secs(60));
        let started = Instant::now();
        closer.discard(busy);
        let shared = closer.shared.as_ref().unwrap();
        // Let the thread take the first one off the queue.
        poll(|| shared.lock().fds.is_empty());
        closer.discard(queued);
        let before = closed_inline();
        closer.discard(overflow);
        assert!(closed_inline() > before, "the third went inline");
        assert!(started.elapsed() < Duration::from_secs(20), "the inline close lingered: {:?}", started.elapsed());
        // The thread closes the other two, lingering, then ends with the
        // closer.
        closer.flush();
        assert!(started.elapsed() >= Duration::from_millis(3900), "both lingered on the closer thread");
    }

    #[test]
    fn queued_fds_can_be_closed_at_once_before_an_exec() {
        let closer = Closer::with_capacity(8);
        let (busy, _keep1) = lingering_socket(Duration::from_secs(2));
        let waiting: Vec<_> = (0..3).map(|_| lingering_socket(Duration::from_secs(60))).collect();
        closer.discard(busy);
        let shared = closer.shared.as_ref().unwrap();
        poll(|| shared.lock().fds.is_empty());
        let mut keep = Vec::new();
        for (fd, peer) in waiting {
            closer.discard(fd);
            keep.push(peer);
        }
        let started = Instant::now();
        closer.close_queued_without_lingering();
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
        assert!(shared.lock().fds.is_empty());
        // Only the busy one is left, and it lingers 2 s, not 60.
        closer.flush();
        assert!(started.elapsed() < Duration::from_secs(20), "flush took {:?}", started.elapsed());
    }

    fn poll(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn non_sockets_close_inline_too() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        close_without_lingering(w);
        let mut buf = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 0, "the write end is closed: EOF");
    }

    #[test]
    fn into_owned_keeps_the_fd_open() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let raw = w.as_raw_fd();
        let received = ReceivedFd::from(w);
        assert_eq!(received.as_raw_fd(), raw);
        let w = received.into_owned();
        flush();
        assert_eq!(rustix::io::write(&w, b"x").unwrap(), 1);
        drop(ReceivedFd::new(w));
        flush();
        let mut buf = [0u8; 2];
        assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 1);
        assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 0, "closed by the closer thread");
    }
}
