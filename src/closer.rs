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

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How many fds may wait for the closer thread: four full notify datagrams'
/// worth, since a handover moves thousands of connections a datagram (253)
/// at a time and Baton's copies of each batch are discarded together. A
/// waiting fd is not in Baton's fd table, but an unprivileged sender's
/// fds in flight count against its `RLIMIT_NOFILE` (`too_many_unix_fds()`
/// in `net/unix/af_unix.c`), so this stays below the usual soft limit of
/// 1024; a send refused for that reason takes the inline fallback.
pub const QUEUE_CAPACITY: usize = 4 * baton_sd::wire::SCM_MAX_FD;

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
/// The queue is not in Baton's fd table: a discarded fd is sent (one
/// `SCM_RIGHTS` message each, or up to 253 together by [`discard_all`])
/// into a socket pair whose receiving end only
/// the closer thread reads, and Baton's own copy is closed at once, which is
/// never the last reference (the message in flight holds one). The closer
/// receives each message *without* a control buffer, so the kernel releases
/// the fd it carried (`scm_recv()` → `scm_destroy()` in
/// `net/core/scm.c`) in the closer thread, without ever installing it in
/// the fd table again.
///
/// Why not a plain queue of fds in the table: a child forked while such an
/// fd is still in the table gets a copy, and if the closer then closes
/// Baton's, the child's close-on-exec close is the last one and lingers in
/// `execve()`, while [`AppCommand::spawn`](crate::spawn::AppCommand::spawn)
/// waits for that exec on the supervisor's thread. So the closer also waits
/// for spawns ([`spawning`]): it releases an fd only when no spawn is in
/// flight that could have copied it.
struct Closer {
    /// `None` when the socket pair or the thread could not be set up.
    shared: Option<Arc<Shared>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when an fd is queued, a spawn ends or the closer is
    /// dropped.
    changed: Condvar,
    /// Signalled when an fd has been released (for [`flush`]).
    closed: Condvar,
    /// Where [`discard`] sends the fds (`SOCK_SEQPACKET`, non-blocking).
    sender: OwnedFd,
    /// Where the closer thread takes them off.
    receiver: OwnedFd,
}

struct State {
    capacity: usize,
    /// Fds sent into the socket pair (and closed in the table).
    sent: u64,
    /// How many fds each message in the socket pair carries, oldest first
    /// (at most [`QUEUE_CAPACITY`] messages).
    messages: std::collections::VecDeque<usize>,
    /// Of those, taken off by the closer thread or the pre-exec drain.
    claimed: u64,
    /// Of those, released.
    done: u64,
    /// Spawns between their `fork()` and the end of their `execve()`.
    spawns: u32,
    shutdown: bool,
}

impl State {
    fn queued(&self) -> u64 {
        self.sent - self.claimed
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still
        // consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Room for [`QUEUE_CAPACITY`] one-fd messages in the socket pair (each
/// costs about 1 KiB of send buffer); best effort: a smaller buffer only
/// makes the inline fallback come sooner.
const SEND_BUFFER: usize = 1024 * 1024;

impl Closer {
    fn with_capacity(capacity: usize) -> Closer {
        match Self::set_up(capacity) {
            Ok(shared) => Closer { shared: Some(shared) },
            Err(e) => {
                tracing::error!(
                    "cannot start the fd closer thread: {e}; received fds are closed without lingering instead \
                     (raise the thread, memory or open-file limit of Baton)"
                );
                Closer { shared: None }
            }
        }
    }

    fn set_up(capacity: usize) -> std::io::Result<Arc<Shared>> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let (sender, receiver) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sender, SEND_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                capacity,
                sent: 0,
                messages: std::collections::VecDeque::new(),
                claimed: 0,
                done: 0,
                spawns: 0,
                shutdown: false,
            }),
            changed: Condvar::new(),
            closed: Condvar::new(),
            sender,
            receiver,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new().name("baton-closer".into()).stack_size(CLOSER_STACK).spawn(move || run(&worker))?;
        Ok(shared)
    }

    fn discard(&self, fd: OwnedFd) {
        self.discard_all(vec![fd]);
    }

    /// Queues `fds` in messages of up to [`SCM_MAX_FD`](baton_sd::wire::SCM_MAX_FD);
    /// what does not fit is closed inline, without lingering.
    fn discard_all(&self, fds: Vec<OwnedFd>) {
        let Some(shared) = &self.shared else { return fds.into_iter().for_each(close_without_lingering) };
        let mut fds = fds.into_iter().peekable();
        while fds.peek().is_some() {
            let batch: Vec<OwnedFd> = fds.by_ref().take(baton_sd::wire::SCM_MAX_FD).collect();
            let mut state = shared.lock();
            let room = state.queued() + batch.len() as u64 <= state.capacity as u64;
            if !room || send_fds(&shared.sender, &batch).is_err() {
                drop(state);
                batch.into_iter().for_each(close_without_lingering);
                continue;
            }
            // Not the last references: the message just sent holds one
            // each. Closed under the lock, so that `spawning` and the closer
            // see the fds either still in the table or already sent, never
            // in between.
            state.sent += batch.len() as u64;
            state.messages.push_back(batch.len());
            drop(batch);
            drop(state);
            shared.changed.notify_one();
        }
    }

    fn spawning(&self) -> SpawnGuard {
        if let Some(shared) = &self.shared {
            shared.lock().spawns += 1;
        }
        SpawnGuard(self.shared.clone())
    }

    fn flush(&self) {
        let Some(shared) = &self.shared else { return };
        let mut state = shared.lock();
        let target = state.sent;
        while state.done < target {
            state = shared.closed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close_queued_without_lingering(&self) {
        let Some(shared) = &self.shared else { return };
        let mut state = shared.lock();
        let queued = state.queued();
        let messages = std::mem::take(&mut state.messages);
        state.claimed += queued;
        drop(state);
        for _ in messages {
            recv_fds(&shared.receiver).into_iter().for_each(close_without_lingering);
        }
        shared.lock().done += queued;
        shared.closed.notify_all();
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().shutdown = true;
            shared.changed.notify_one();
        }
    }
}

/// Held by [`AppCommand::spawn`](crate::spawn::AppCommand::spawn) from
/// before its `fork()` until the child's `execve()` is done; see
/// [`spawning`].
#[derive(Debug)]
pub struct SpawnGuard(Option<Arc<Shared>>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closer")
    }
}

impl Drop for SpawnGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.lock().spawns -= 1;
            shared.changed.notify_one();
        }
    }
}

/// Marks a spawn in flight until the guard is dropped: meanwhile the closer
/// releases nothing, because the child may hold a copy of an fd Baton has
/// just discarded, and its close-on-exec close must not be the last one.
pub fn spawning() -> SpawnGuard {
    closer().spawning()
}

fn run(shared: &Shared) {
    loop {
        let mut state = shared.lock();
        while state.queued() == 0 || state.spawns > 0 {
            if state.shutdown && state.queued() == 0 {
                return;
            }
            state = shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let count = state.messages.pop_front().unwrap_or(1) as u64;
        state.claimed += count;
        drop(state);
        // The releases that may wait happen here, in this thread only.
        release_one(&shared.receiver);
        shared.lock().done += count;
        shared.closed.notify_all();
    }
}

/// Sends `fds` (at most 253) as one `SCM_RIGHTS` message of one byte,
/// without blocking.
fn send_fds(sender: &OwnedFd, fds: &[OwnedFd]) -> rustix::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(baton_sd::wire::SCM_MAX_FD))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let iov = [std::io::IoSlice::new(&[0])];
    rustix::net::sendmsg(sender, &iov, &mut control, SendFlags::DONTWAIT | SendFlags::NOSIGNAL).map(drop)
}

/// Takes one message off without a control buffer: the kernel releases the
/// fds it carried, in this thread, and never installs them.
fn release_one(receiver: &OwnedFd) {
    use rustix::net::{RecvAncillaryBuffer, RecvFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut control = RecvAncillaryBuffer::new(&mut []);
    // A message is always there (counted as sent); should the receive fail
    // anyway, the fd stays in the socket and is released with it.
    let _ = rustix::net::recvmsg(receiver, &mut iov, &mut control, RecvFlags::DONTWAIT);
}

/// Takes one message off with its fds, installed close-on-exec.
fn recv_fds(receiver: &OwnedFd) -> Vec<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(baton_sd::wire::SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    if rustix::net::recvmsg(receiver, &mut iov, &mut control, RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC).is_err() {
        return Vec::new();
    }
    control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .collect()
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

/// [`discard`] for many fds at once, as a handover drops them: one message
/// to the closer per 253 instead of one per fd.
pub fn discard_all(fds: impl IntoIterator<Item = ReceivedFd>) {
    closer().discard_all(fds.into_iter().map(ReceivedFd::into_owned).collect());
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
        poll(|| shared.lock().queued() == 0);
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
        poll(|| shared.lock().queued() == 0);
        let mut keep = Vec::new();
        for (fd, peer) in waiting {
            closer.discard(fd);
            keep.push(peer);
        }
        let started = Instant::now();
        closer.close_queued_without_lingering();
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
        assert_eq!(shared.lock().queued(), 0);
        // Only the busy one is left, and it lingers 2 s, not 60.
        closer.flush();
        assert!(started.elapsed() < Duration::from_secs(20), "flush took {:?}", started.elapsed());
    }

    /// A handover's worth of fds in one call: sent 253 to a message, all
    /// released by the closer thread, none inline, and the counts add up.
    #[test]
    fn many_fds_at_once_go_in_batches() {
        let closer = Closer::with_capacity(QUEUE_CAPACITY);
        let pipes: Vec<(OwnedFd, OwnedFd)> =
            (0..600).map(|_| rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()).collect();
        let (reads, writes): (Vec<OwnedFd>, Vec<OwnedFd>) = pipes.into_iter().unzip();
        let shared = closer.shared.as_ref().unwrap();
        // 600 fit the queue (1,012), in three messages of up to 253.
        closer.discard_all(writes);
        assert_eq!(shared.lock().sent, 600);
        closer.flush();
        let state = shared.lock();
        assert_eq!((state.done, state.queued()), (600, 0));
        assert!(state.messages.is_empty());
        drop(state);
        // Every write end is gone: each read end sees end-of-file.
        for r in &reads {
            let mut byte = [0u8; 1];
            assert_eq!(rustix::io::read(r, &mut byte).unwrap(), 0);
        }
    }

    #[test]
    fn nothing_is_released_while_a_spawn_is_in_flight() {
        // A child forked now would hold a copy of the fd: releasing Baton's
        // would leave the child's close-on-exec close as the last one.
        let closer = Closer::with_capacity(8);
        let shared = closer.shared.clone().unwrap();
        let (r, w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK).unwrap();
        let spawn = closer.spawning();
        closer.discard(w);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(shared.lock().done, 0, "released during a spawn");
        let mut buf = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut buf), Err(rustix::io::Errno::AGAIN), "the write end is still open");
        drop(spawn);
        closer.flush();
        assert_eq!(shared.lock().done, 1);
        assert_eq!(rustix::io::read(&r, &mut buf), Ok(0), "the write end is released after the spawn");
    }

    #[test]
    fn a_discarded_fd_is_out_of_the_fd_table_at_once() {
        // What a fork copies is the table: the fd must be gone from it when
        // discard returns, though not yet released.
        let closer = Closer::with_capacity(8);
        let (_r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let raw = w.as_raw_fd();
        let ino = rustix::fs::fstat(&w).unwrap().st_ino;
        let spawn = closer.spawning();
        closer.discard(w);
        // The number may already be another test's fd: compare the inode.
        // SAFETY: borrowed only for this fstat; nothing is closed.
        let now = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(raw) }).map(|st| st.st_ino);
        assert_ne!(now, Ok(ino), "fd {raw} is still in the table");
        drop(spawn);
        closer.flush();
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
