//! Idle connections out of hyper: parked, and taken by a drain without
//! waking their tasks.
//!
//! A keep-alive connection idle for [`PARK_AFTER`] leaves hyper at a request
//! boundary (the same end-of-stream trick as a drain, see the [parent
//! module](super)) and waits for its next request in its task, watched for
//! readability only, with its socket in a slot of the connection's state.
//! (A connection handed over from an earlier generation waits in the
//! [lot](super::lot) instead, without a task, and starts here only if the
//! lot cannot take it.)
//!
//! Parked is where thousands of idle connections are when a drain starts,
//! and the drain takes them straight from their slots
//! ([`DrainSignal::start`](super::DrainSignal::start)): no task is woken,
//! polled or ended, nothing is deregistered or freed while the next
//! generation waits for them (10,000 connections: waking each task to stop
//! it at a request boundary was most of the old generation's CPU time in
//! the burst, `perf`). The tasks of taken connections stay pending: if
//! the drain ends first (nothing else was open), the process exits with
//! them, and the kernel reclaims them at once, instead of thousands of
//! tasks being woken, torn down and deregistered while the next generation
//! is using the CPU for the same connections. If other connections keep
//! the drain going, the taken ones' tasks are released after
//! [`RELEASE_GAP`](crate::handoff::RELEASE_GAP) and end without touching
//! their sockets ([`DrainSignal::release_taken`](super::DrainSignal::release_taken)):
//! while this process holds a copy, the next generation closing a
//! connection without `shutdown` would not reach its client.
//!
//! The slot decides every race: the drain and the task each take the
//! socket out of it under its lock, and only the one that finds it there
//! owns the connection. A parked task that wakes (its client wrote, the
//! drain began, its idle deadline passed) first takes its socket back; if
//! the slot is empty the drain has it, and the task never reads from it.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{ConnState, PhaseTimer};

/// How long a keep-alive connection stays idle in hyper before it is
/// parked: long enough that a client reusing its connection at once (the
/// common case) never pays for leaving and re-entering hyper, short next to
/// the idle timeout, so that what stays open at a restart is almost always
/// parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// An idle connection a drain stopped, as the handoff worker sends it on:
/// possibly still registered with the runtime that served it.
///
/// Taking a socket back from the runtime costs an `epoll_ctl(DEL)` on the
/// process's one epoll instance, and at a drain thousands stop within a
/// burst while the next generation waits for them: done in the burst, that
/// was a third of the old generation's CPU time (10,000 connections,
/// `perf`). So the fd is sent as it is, and the registration and our copy
/// are released when the last holder drops it, after the burst (see
/// [`HandoffWorker`](crate::handoff::HandoffWorker)). Until then the old
/// epoll instance still reports the socket's events (edge-triggered, with
/// nobody waiting on them): a wake-up of this process's I/O driver when a
/// client writes to the next generation.
#[derive(Debug)]
pub struct IdleConnection(pub(super) Arc<Socket>);

/// A connection's socket, as registered with the runtime.
#[derive(Debug)]
pub(super) enum Socket {
    /// Served by hyper: registered for reading and writing.
    Served(TcpStream),
    /// Handed over from an earlier generation and not read since:
    /// registered for reading only (registered for writing too, an idle
    /// socket is reported writable at once: thousands arrive at once in a
    /// handover, and each would wake the runtime's I/O driver).
    Watched(tokio::io::unix::AsyncFd<std::net::TcpStream>),
    /// Not registered (pushed by Baton while draining, or in tests).
    Plain(std::net::TcpStream),
}

impl Socket {
    /// Ready once the socket has something to read (or failed, or has no
    /// registration to wait on): hyper reads it then.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Socket::Served(s) => s.poll_read_ready(cx).map(drop),
            // The guard is dropped uncleared: the readiness stays for hyper.
            Socket::Watched(w) => w.poll_read_ready(cx).map(drop),
            Socket::Plain(_) => Poll::Ready(()),
        }
    }

    /// The socket as hyper serves it.
    pub(super) fn into_served(self) -> std::io::Result<TcpStream> {
        match self {
            Socket::Served(s) => Ok(s),
            Socket::Watched(w) => TcpStream::from_std(w.into_inner()),
            Socket::Plain(s) => TcpStream::from_std(s),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Served(s) => s.as_fd(),
            Socket::Watched(w) => w.get_ref().as_fd(),
            Socket::Plain(s) => s.as_fd(),
        }
    }
}

impl IdleConnection {
    pub(super) fn new(socket: Socket) -> Self {
        Self(Arc::new(socket))
    }
}

impl AsFd for IdleConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<std::net::TcpStream> for IdleConnection {
    fn from(stream: std::net::TcpStream) -> Self {
        Self::new(Socket::Plain(stream))
    }
}

/// An fd passed on unchecked (pushed by Baton while draining): the next
/// generation checks it.
impl From<std::os::fd::OwnedFd> for IdleConnection {
    fn from(fd: std::os::fd::OwnedFd) -> Self {
        Self::new(Socket::Plain(std::net::TcpStream::from(fd)))
    }
}

/// The slot a parked connection's socket waits in (see the [module
/// docs](self)).
#[derive(Debug, Default)]
pub(super) struct Slot {
    socket: std::sync::Mutex<Option<Arc<Socket>>>,
    /// A drain took the socket: its task ends only once released.
    taken: AtomicBool,
    /// [`DrainSignal::release_taken`](super::DrainSignal::release_taken)
    /// released the task of the connection taken from here.
    released: AtomicBool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Socket>>> {
        // Only whole `Option`s are stored: a panic cannot leave it torn.
        self.socket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For a drain: the parked socket, if the connection is parked.
    pub(super) fn take(&self) -> Option<IdleConnection> {
        let socket = self.lock().take()?;
        self.taken.store(true, Relaxed);
        Some(IdleConnection(socket))
    }

    pub(super) fn was_taken(&self) -> bool {
        self.taken.load(Relaxed)
    }

    /// Lets the task of the connection taken from here end; `false` if
    /// none was taken.
    pub(super) fn release(&self) -> bool {
        let taken = self.was_taken();
        if taken {
            self.released.store(true, Relaxed);
        }
        taken
    }
}

/// How a parked connection's wait ended.
pub(super) enum Unparked {
    /// Something arrived to read: hyper serves it again.
    Readable(Socket),
    /// A drain began and did not find it parked (it was parking then):
    /// the drain's ordinary path hands it over.
    Drained(Socket),
    /// A drain took it from its slot.
    Taken,
    /// Its idle deadline passed.
    Expired,
}

/// Parks `socket` until its next request, a drain, or its idle deadline
/// (see the [module docs](self)).
pub(super) async fn park(socket: Socket, state: &ConnState, timer: &mut PhaseTimer) -> Unparked {
    let socket = Arc::new(socket);
    *state.slot.lock() = Some(Arc::clone(&socket));
    #[derive(Clone, Copy)]
    enum Woken {
        Readable,
        Drained,
        Expired,
    }
    let woken = std::future::poll_fn(|cx| {
        state.waker.register(cx.waker());
        if state.slot.was_taken() {
            // Not polled for readiness again: the client now talks to the
            // next generation, and each of its writes would wake this task
            // for nothing. Ends once released, or never (see
            // `DrainSignal::release_taken`).
            return if state.slot.released.load(Relaxed) { Poll::Ready(Woken::Drained) } else { Poll::Pending };
        }
        // Checked after the slot was filled: a drain that passed this
        // connection before that has set it (see `DrainSignal::start`).
        if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Poll::Ready(Woken::Drained);
        }
        if socket.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Woken::Readable);
        }
        match timer.poll_expired(state, cx, false) {
            Some(_) => Poll::Ready(Woken::Expired),
            None => Poll::Pending,
        }
    })
    .await;
    let Some(ours) = state.slot.lock().take() else {
        // The drain has it: never read from it again.
        return Unparked::Taken;
    };
    drop(ours);
    let socket = match Arc::try_unwrap(socket) {
        Ok(s) => s,
        // Nobody else clones it: the slot's copy was the only other one.
        Err(_) => {
            tracing::error!("a parked connection's socket is shared; closing it");
            return Unparked::Expired;
        }
    };
    match woken {
        Woken::Readable => Unparked::Readable(socket),
        Woken::Drained => Unparked::Drained(socket),
        Woken::Expired => Unparked::Expired,
    }
}
