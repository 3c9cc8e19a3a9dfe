//! Serving one connection so that, at shutdown, it can be taken back from
//! hyper intact and handed to the next generation.
//!
//! # How a connection is stopped at a request boundary
//!
//! hyper owns the socket while it serves. To take it back *between*
//! requests, without hyper writing `Connection: close` or shutting the socket
//! down, the socket is wrapped in `HandoffIo`. Once draining starts, the
//! wrapper reports end-of-stream to hyper's next read, but only when that is
//! safe:
//!
//! - no request is in flight (counted by `TrackedService`: from the
//!   handler call until the response body ended or was dropped);
//! - everything hyper wrote has been flushed (hyper goes idle only after a
//!   flush, and the wrapper checks it too);
//! - the wrapper holds no bytes of its own to deliver first.
//!
//! hyper then treats the connection as closed by the client while idle,
//! finishes without touching the socket (`poll_without_shutdown`), and
//! [`Connection::into_parts`](hyper::server::conn::http1::Connection::into_parts)
//! returns the socket and hyper's read buffer.
//!
//! # Bytes already read are never lost
//!
//! If hyper had already read part of the next request (the client pipelined
//! it), the read buffer is not empty. Such a connection is not handed over:
//! it is served again by a fresh hyper connection that first gets those
//! bytes back, and the end-of-stream trick is re-armed only after a request
//! completes — so the connection is served to completion, or until it is
//! idle with nothing buffered, and then handed over; all within the drain
//! deadline. Bytes the client sent that are still in the kernel's receive
//! queue stay there when the fd is handed over: the next generation reads
//! them.
//!
//! # A fresh connection when nothing can be handed over
//!
//! A connection accepted here that has not yet received a byte has never
//! carried a request: its client may have just connected and be about to
//! send one (the request follows `connect()` at once, but the accept can
//! win that race). When the drain can hand connections over, it is handed
//! over as it is (the next generation reads the request). When it cannot —
//! `--handoff=false`, no service manager, or the manager is gone (Baton was
//! killed: `STOPPING=1` failed) — closing it would lose that request, and
//! its client could not know it might: RFC 9112 §9.6 lets clients retry
//! only on a connection that already carried a request (an idle keep-alive
//! one, which the drain still closes at once). So such a connection gets
//! [`FIRST_REQUEST_GRACE`] to send its first byte (counted from the drain,
//! and within the drain deadline): the request is then served and the
//! connection closed at the next request boundary, as an idle one; if no
//! byte arrives it is closed. Connections handed over from an earlier
//! generation ([`Arrival::HandedOver`]) may have carried requests there, so
//! they keep the plain behaviour.
//!
//! Others do the same: hyper's HTTP/1 graceful shutdown waited for a fresh
//! connection's first request (hyperium/hyper#2730), and its proposed
//! `first_byte_read_timeout` (hyperium/hyper#3808) bounds that wait rather
//! than closing at once; nginx closes at a graceful shutdown only the
//! connections it marked idle (`c->idle`, set in `ngx_http_set_keepalive`,
//! i.e. after a request), not one still waiting for its first request.
//!
//! # Deadlines: a partial request head, an idle connection
//!
//! hyper's own `header_read_timeout` starts when hyper *begins waiting* for
//! a head, i.e. as soon as a connection goes idle, so it would also close
//! idle keep-alive connections, which are meant to stay open and be handed
//! over across restarts. Instead the wrapper notes the phase of the
//! connection and `drive` keeps one timer per connection:
//!
//! - **busy** (a request in flight, or a response not yet flushed): no
//!   deadline; the drain deadline bounds it at shutdown;
//! - **partial head** (a byte of the next request was read, its head is not
//!   complete): [`Deadlines::header`], counted from that first byte (or,
//!   for a request pipelined behind another, from the end of the previous
//!   response);
//! - **idle** (nothing of a next request yet): [`Deadlines::idle`], counted
//!   from the end of the last response or from the start of serving.
//!
//! One imprecision: bytes of a next request that arrive in the same read
//! as the end of the previous head are not noticed until hyper reads
//! again, so until then the connection counts as idle; it is still bounded
//! by the idle deadline, then the header deadline.
//!
//! When the deadline passes the connection is closed (like nginx, no `408`:
//! a client that stalls mid-head is not reading either). A request body is
//! never waited for: only `GET` and `HEAD` are served, and hyper closes a
//! connection whose body the handler did not read.
//!
//! The head is capped at [`Deadlines::max_head`] bytes with hyper's
//! `max_buf_size`, which bounds what hyper buffers of a head (hyper answers
//! `431` past it); it also caps hyper's write buffer, which only groups
//! writes (a body chunk larger than it is still written whole).
//!
//! # Cost per request
//!
//! Two atomic counter updates on a per-connection state and one `Arc` clone
//! (the guard carried by the response body), plus an atomic-waker update per
//! wake-up of the connection task; for the deadlines, a few relaxed atomic
//! stores and one clock read per poll in which a request started or ended
//! (the timer itself moves only when a deadline gets earlier). Nothing
//! shared between connections is touched per request. See the benchmark.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::service::{Handler, ResponseFuture};

pub mod lot;
pub mod park;

pub use park::{IdleConnection, PARK_AFTER};
use park::{Slot, Socket, Unparked, park};

/// The HTTP/1.1 settings shared by `baton-httpd` and the benchmark's plain
/// hyper server: keep-alive on, no hyper header-read timeout (it would
/// also close idle keep-alive connections, which are meant to stay open
/// across restarts: [`drive`] keeps its own deadlines, see the [module
/// docs](self)), and a request head of at most `max_head` bytes
/// (at least 8 KiB, hyper's minimum; smaller values are raised to it).
pub fn http1_builder(max_head: usize) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.keep_alive(true).header_read_timeout(None).max_buf_size(max_head.max(MIN_HEAD));
    b
}

/// hyper's smallest `max_buf_size` (it panics below).
const MIN_HEAD: usize = 8 * 1024;

/// How long a fresh connection may take to send the first byte of its first
/// request once a drain without handoff has begun (see the [module
/// docs](self#a-fresh-connection-when-nothing-can-be-handed-over)).
///
/// The client that loses this race has already connected and writes its
/// request right after `connect()` returns: the gap is its own scheduling
/// delay, microseconds to milliseconds, since the request needs no further
/// round trip. One second covers a client stalled far beyond that (a
/// loaded machine), while a connection that stays silent (a browser's
/// speculative pre-connect) delays the exit by at most this much, instead
/// of by `--idle-timeout` or `--drain-timeout` (75 s and 25 s by default).
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Where a connection came from, which decides whether it can be fresh
/// (see [`FIRST_REQUEST_GRACE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Accepted by this process: until its first byte, it has never carried
    /// a request.
    Accepted,
    /// Adopted or pushed from an earlier generation: it may have carried
    /// requests there.
    HandedOver,
}

/// What the drain does with a connection once it is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// It will be handed over to the next generation.
    HandOver,
    /// It will be closed: no handoff is possible. A fresh connection first
    /// gets [`FIRST_REQUEST_GRACE`] to send its request.
    Close,
}

/// How long a connection may stay in each phase, and how large a request
/// head may be (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From the first byte of a request until its head is complete; `None`:
    /// no limit.
    pub header: Option<Duration>,
    /// Idle between requests; `None`: no limit.
    pub idle: Option<Duration>,
    /// Largest request head in bytes (hyper's read buffer).
    pub max_head: usize,
}

/// How serving a connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client closed it, or it failed; nothing to hand over.
    Closed,
    /// Draining stopped it at a request boundary with nothing buffered: it
    /// can be handed over (or closed) as is.
    Idle(IdleConnection),
    /// It was parked, and the drain took it from its slot (see [`park`](mod@park)).
    Taken,
}

/// State shared by the wrapper, the service and the response bodies of one
/// connection. Everything runs on the connection's task; atomics only make
/// it `Send`.
#[derive(Debug)]
struct ConnState {
    /// Requests between the handler call and the end of their response.
    in_flight: AtomicUsize,
    /// Nothing written since the last successful flush.
    flushed: AtomicBool,
    /// Draining has started.
    draining: AtomicBool,
    /// End-of-stream may be faked: false after a restart with buffered bytes,
    /// until a request completes.
    armed: AtomicBool,
    /// End-of-stream was faked (rather than sent by the client).
    faked_eof: AtomicBool,
    /// The connection task, for [`DrainSignal::start`].
    waker: AtomicWaker,
    /// A byte of the next request was read and its head is not complete.
    head_begun: AtomicBool,
    /// Bytes were read while a request was in flight: a pipelined next
    /// request (or an unread body, after which hyper closes anyway).
    read_while_busy: AtomicBool,
    /// Bumped at every change of phase (see [`Phase`]), so that `drive`
    /// restarts its count even when a whole request fits in one poll.
    transitions: AtomicU64,
    /// Accepted here and no byte read yet: it has never carried a request.
    fresh: AtomicBool,
    /// The drain cannot hand over and [`FIRST_REQUEST_GRACE`] has not run
    /// out: a fresh connection is read rather than stopped.
    first_request_grace: AtomicBool,
    /// Idle for [`PARK_AFTER`]: hyper is to let go of it at the boundary.
    parking: AtomicBool,
    /// Where its socket waits while parked.
    slot: Slot,
}

/// What a connection is doing, for its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Busy,
    PartialHead,
    Idle,
}

impl ConnState {
    fn new(arrival: Arrival) -> Self {
        Self {
            fresh: AtomicBool::new(arrival == Arrival::Accepted),
            first_request_grace: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            flushed: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            armed: AtomicBool::new(true),
            faked_eof: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            head_begun: AtomicBool::new(false),
            read_while_busy: AtomicBool::new(false),
            transitions: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            slot: Slot::default(),
        }
    }

    fn phase(&self) -> Phase {
        if self.in_flight.load(Relaxed) > 0 || !self.flushed.load(Relaxed) {
            Phase::Busy
        } else if self.head_begun.load(Relaxed) {
            Phase::PartialHead
        } else {
            Phase::Idle
        }
    }

    fn transition(&self) {
        self.transitions.fetch_add(1, Relaxed);
    }

    /// `n` bytes were handed to hyper.
    fn bytes_read(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.fresh.store(false, Relaxed);
        if self.in_flight.load(Relaxed) > 0 {
            self.read_while_busy.store(true, Relaxed);
        } else if !self.head_begun.swap(true, Relaxed) {
            self.transition();
        }
    }

    fn may_stop_reading(&self) -> bool {
        (self.draining.load(Relaxed) || self.parking.load(Relaxed))
            && self.armed.load(Relaxed)
            && self.in_flight.load(Relaxed) == 0
            && self.flushed.load(Relaxed)
            && !self.awaiting_first_request()
    }

    /// Draining without handoff, within the grace, and nothing read yet.
    fn awaiting_first_request(&self) -> bool {
        self.draining.load(Relaxed) && self.first_request_grace.load(Relaxed) && self.fresh.load(Relaxed)
    }

    /// Draining has started, in `mode`.
    fn start_draining(&self, mode: DrainMode) {
        self.first_request_grace.store(mode == DrainMode::Close, Relaxed);
        // SeqCst: read by a parking task after it filled its slot, which
        // the drain reads after this (see `park`).
        self.draining.store(true, SeqCst);
    }

    /// Whether an idle connection may be parked: not while draining (the
    /// drain hands it over instead), nor before it carried a byte (a fresh
    /// connection keeps [`FIRST_REQUEST_GRACE`]'s rule), nor twice.
    fn may_park(&self) -> bool {
        !self.draining.load(Relaxed) && !self.fresh.load(Relaxed) && !self.parking.load(Relaxed)
    }
}

/// The socket as hyper sees it (see the [module docs](self)).
#[derive(Debug)]
struct HandoffIo {
    stream: TokioIo<TcpStream>,
    /// Bytes read by an earlier hyper connection, delivered first.
    prefix: Bytes,
    state: Arc<ConnState>,
}

impl Read for HandoffIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.state.bytes_read(n);
            return Poll::Ready(Ok(()));
        }
        if this.state.may_stop_reading() {
            this.state.faked_eof.store(true, Relaxed);
            return Poll::Ready(Ok(()));
        }
        // As `TokioIo::poll_read`, plus counting the bytes for the deadlines.
        // SAFETY: tokio's `ReadBuf` only writes initialised bytes into the
        // uninitialised part it is given, and reports how many.
        let n = unsafe {
            let mut tokio_buf = tokio::io::ReadBuf::uninit(buf.as_mut());
            ready!(Pin::new(this.stream.inner_mut()).poll_read(cx, &mut tokio_buf))?;
            tokio_buf.filled().len()
        };
        // SAFETY: exactly `n` bytes of the cursor were just initialised.
        unsafe { buf.advance(n) };
        this.state.bytes_read(n);
        Poll::Ready(Ok(()))
    }
}

impl Write for HandoffIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.state.flushed.store(false, Relaxed);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.state.flushed.store(false, Relaxed);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        let was_flushed = this.state.flushed.swap(true, Relaxed);
        if !was_flushed {
            // The end of a response: the idle count starts now.
            this.state.transition();
        }
        // hyper goes idle right after this flush, but does not read again if
        // its last read was pending: wake the task once so that the drain
        // check in `poll_read` runs. Only on a transition, so this cannot
        // loop.
        if !was_flushed && this.state.draining.load(Relaxed) {
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The handler, counting requests in flight.
#[derive(Debug)]
struct TrackedService {
    handler: Handler,
    state: Arc<ConnState>,
}

/// One request in flight; dropping it ends the request.
#[derive(Debug)]
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.0.armed.store(true, Relaxed);
            if self.0.read_while_busy.swap(false, Relaxed) {
                // hyper may hold the start of the next request already.
                self.0.head_begun.store(true, Relaxed);
            }
            self.0.transition();
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, req: Request<Incoming>) -> TrackedFuture {
        self.state.in_flight.fetch_add(1, Relaxed);
        // The head is complete: its deadline no longer applies.
        self.state.head_begun.store(false, Relaxed);
        self.state.read_while_busy.store(false, Relaxed);
        self.state.transition();
        let guard = RequestGuard(Arc::clone(&self.state));
        TrackedFuture { inner: self.handler.handle(req), guard: Some(guard) }
    }
}

/// The handler's future, carrying the request's guard to the response body.
#[derive(Debug)]
struct TrackedFuture {
    inner: ResponseFuture,
    guard: Option<RequestGuard>,
}

impl Future for TrackedFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.inner).poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, guard })))
    }
}

/// A response body that ends its request when it ends (or is dropped).
#[derive(Debug)]
struct TrackedBody {
    inner: crate::body::Body,
    guard: Option<RequestGuard>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() {
            this.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Tells every connection that draining has started. Cheap to clone.
///
/// Each connection registers its state once (a lock per connection, not per
/// request); [`start`](Self::start) flags them all, takes the parked ones
/// and wakes the tasks of the others. Nothing is polled per request: a
/// connection only re-checks its own flag when hyper reads.
#[derive(Debug, Clone, Default)]
pub struct DrainSignal {
    inner: Arc<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    started: AtomicBool,
    /// Set before `started`: the drain cannot hand over ([`DrainMode::Close`]).
    closing: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
}

/// Removes a connection from the registry when its task ends.
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // A panic elsewhere cannot leave the map inconsistent (single
        // inserts and removes): keep using it.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DrainSignal {
    /// A signal no connection has seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: every connection, present or registering later,
    /// stops at its next request boundary — except, in [`DrainMode::Close`],
    /// a fresh one, which first gets [`FIRST_REQUEST_GRACE`] to send its
    /// request (see the [module docs](self)).
    ///
    /// Returns the parked connections (see [`park`](mod@park)), taken without waking
    /// their tasks: idle keep-alive connections, to hand over (or close)
    /// as they are. Their tasks stay pending until
    /// [`release_taken`](Self::release_taken).
    pub fn start(&self, mode: DrainMode) -> Vec<IdleConnection> {
        self.inner.closing.store(mode == DrainMode::Close, SeqCst);
        self.inner.started.store(true, SeqCst);
        let conns = self.inner.lock();
        let mut taken = Vec::with_capacity(conns.len());
        for state in conns.values() {
            // Flagged first: a task parking meanwhile sees the flag once
            // its slot is filled, or the slot is found filled here.
            state.start_draining(mode);
            match state.slot.take() {
                Some(connection) => taken.push(connection),
                None => state.waker.wake(),
            }
        }
        taken
    }

    /// Lets the tasks of the connections [`start`](Self::start) took end
    /// (without touching their sockets), and wakes them: until then they
    /// stay pending, and hold our copies of their sockets (see [`park`](mod@park)).
    pub fn release_taken(&self) {
        for state in self.inner.lock().values() {
            if state.slot.release() {
                state.waker.wake();
            }
        }
    }

    fn mode(&self) -> DrainMode {
        if self.inner.closing.load(SeqCst) { DrainMode::Close } else { DrainMode::HandOver }
    }

    fn register(&self, state: &Arc<ConnState>) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Relaxed);
        self.inner.lock().insert(id, Arc::clone(state));
        // After the insert: either `start` saw this entry, or its flag
        // (stored before it took the lock) is visible here.
        if self.inner.started.load(SeqCst) {
            state.start_draining(self.mode());
        }
        Registration { registry: Arc::clone(&self.inner), id }
    }
}

/// One connection's deadline timer (see the [module docs](self)).
///
/// The timer is moved earlier at once but later only lazily: when it fires
/// before the current deadline it is set again. Most requests make the
/// deadline later (idle again, counted from now), so they cost no timer
/// update.
struct PhaseTimer {
    deadlines: Deadlines,
    /// The transition count last seen, and when it was seen.
    seen: u64,
    since: Instant,
    /// The timer and the instant it is set to.
    sleep: Option<(Pin<Box<Sleep>>, Instant)>,
}

impl PhaseTimer {
    fn new(deadlines: Deadlines) -> Self {
        Self { deadlines, seen: 0, since: Instant::now(), sleep: None }
    }

    /// What passed, if anything did: the deadline of the phase, or (if
    /// `may_park`, idle) [`PARK_AFTER`]; otherwise the timer is set to wake
    /// the task by the earlier of the two.
    fn poll_expired(&mut self, state: &ConnState, cx: &mut Context<'_>, may_park: bool) -> Option<Expired> {
        let seen = state.transitions.load(Relaxed);
        if seen != self.seen {
            self.seen = seen;
            self.since = Instant::now();
        }
        let phase = state.phase();
        let (limit, expired) = match phase {
            Phase::Busy => (None, Expired::Deadline(phase)),
            Phase::PartialHead => (self.deadlines.header, Expired::Deadline(phase)),
            Phase::Idle if may_park && self.deadlines.idle.is_none_or(|idle| idle > PARK_AFTER) => {
                (Some(PARK_AFTER), Expired::Park)
            }
            Phase::Idle => (self.deadlines.idle, Expired::Deadline(phase)),
        };
        let limit = limit?;
        // A limit too long to add to the clock is no limit.
        let deadline = self.since.checked_add(limit)?;
        let (sleep, set_for) =
            self.sleep.get_or_insert_with(|| (Box::pin(tokio::time::sleep_until(deadline)), deadline));
        if deadline < *set_for {
            sleep.as_mut().reset(deadline);
            *set_for = deadline;
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if *set_for >= deadline {
                return Some(expired);
            }
            // Fired for an earlier deadline that no longer applies.
            sleep.as_mut().reset(deadline);
            *set_for = deadline;
        }
        None
    }
}

/// What [`PhaseTimer::poll_expired`] found passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// The deadline of this phase: the connection is closed.
    Deadline(Phase),
    /// Idle for [`PARK_AFTER`]: the connection is parked.
    Park,
}

/// Serves `stream` until the client closes it, a deadline of `deadlines`
/// passes, or — once `drain` has started — until it is idle with nothing
/// buffered ([`Outcome::Idle`]); a fresh connection ([`Arrival::Accepted`],
/// nothing read yet) in a [`DrainMode::Close`] drain waits up to
/// [`FIRST_REQUEST_GRACE`] for its first request first.
///
/// The caller bounds the drain with its deadline by dropping (aborting) the
/// future.
pub async fn drive(
    stream: TcpStream,
    handler: Handler,
    drain: DrainSignal,
    deadlines: Deadlines,
    arrival: Arrival,
) -> Outcome {
    let state = Arc::new(ConnState::new(arrival));
    let registration = drain.register(&state);
    let timer = PhaseTimer::new(deadlines);
    serve(Next::Serve(stream, Bytes::new()), handler, state, registration, deadlines, timer).await
}

/// [`drive`] for a connection handed over from an earlier generation
/// (non-blocking already) that the [lot] could not take: it starts parked
/// (see [`park`](mod@park)), watched for readability only, without hyper.
/// Watching for reading alone matters: registered for writing too, as a
/// [`TcpStream`] is, an idle socket is reported writable at once, so every
/// registration would wake the runtime's I/O driver. A drain that starts
/// meanwhile takes it from its slot; its idle deadline counts from its
/// adoption. `on_watched` is called once the runtime watches it (or could
/// not).
pub async fn drive_handed_over(
    stream: std::net::TcpStream,
    handler: Handler,
    drain: DrainSignal,
    deadlines: Deadlines,
    on_watched: impl FnOnce(),
) -> Outcome {
    let state = Arc::new(ConnState::new(Arrival::HandedOver));
    let registration = drain.register(&state);
    let timer = PhaseTimer::new(deadlines);
    // SAFETY: the stream moves into the AsyncFd, which owns it until it is
    // dropped or `into_inner` takes it back: it is neither closed nor
    // replaced while registered.
    let watched =
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(stream, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)
        {
            Ok(w) => w,
            Err(e) => {
                on_watched();
                tracing::warn!(error = %e, "cannot watch a handed-over connection; closing it");
                return Outcome::Closed;
            }
        };
    on_watched();
    serve(Next::Park(Socket::Watched(watched)), handler, state, registration, deadlines, timer).await
}

/// What [`serve`] does next with a connection.
enum Next {
    /// hyper serves it, with these bytes read by an earlier hyper
    /// connection first.
    Serve(TcpStream, Bytes),
    /// It waits parked for its next request.
    Park(Socket),
}

/// [`drive`] and [`drive_handed_over`]: hyper serves the connection, and
/// it is parked whenever it is idle for [`PARK_AFTER`].
async fn serve(
    first: Next,
    handler: Handler,
    state: Arc<ConnState>,
    _registration: Registration,
    deadlines: Deadlines,
    mut timer: PhaseTimer,
) -> Outcome {
    // Armed the first time the connection is seen awaiting its first
    // request in a drain, so counted from the drain.
    let mut grace: Option<Pin<Box<Sleep>>> = None;
    let mut next = first;
    loop {
        let (stream, prefix) = match next {
            Next::Serve(stream, prefix) => (stream, prefix),
            Next::Park(socket) => match park(socket, &state, &mut timer).await {
                Unparked::Readable(socket) => match socket.into_served() {
                    Ok(stream) => {
                        state.parking.store(false, Relaxed);
                        (stream, Bytes::new())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot serve a parked connection; closing it");
                        return Outcome::Closed;
                    }
                },
                Unparked::Drained(socket) => return Outcome::Idle(IdleConnection::new(socket)),
                Unparked::Taken => return Outcome::Taken,
                Unparked::Expired => {
                    tracing::debug!(deadline = ?deadlines.idle, "closing an idle connection (--idle-timeout)");
                    return Outcome::Closed;
                }
            },
        };
        // Boxed, and only while hyper serves: its connection state is most
        // of a connection's memory (about 1 KiB), which a parked one, and
        // each of the thousands handed over at once, does without.
        let served = Box::pin(serve_with_hyper(stream, prefix, &handler, &state, deadlines, &mut timer, &mut grace));
        match served.await {
            Served::Ended(outcome) => return outcome,
            Served::Next(then) => next = then,
        }
    }
}

/// How hyper's part of [`serve`] ended.
enum Served {
    /// The connection ended this way.
    Ended(Outcome),
    /// It goes on (hyper let go of it at a request boundary).
    Next(Next),
}

/// hyper serves `stream` (`prefix` first) until the connection ends, or
/// until it lets go of it at a request boundary: to park, or to hand it
/// over in a drain.
async fn serve_with_hyper(
    stream: TcpStream,
    prefix: Bytes,
    handler: &Handler,
    state: &Arc<ConnState>,
    deadlines: Deadlines,
    timer: &mut PhaseTimer,
    grace: &mut Option<Pin<Box<Sleep>>>,
) -> Served {
    let io = HandoffIo { stream: TokioIo::new(stream), prefix, state: Arc::clone(state) };
    let service = TrackedService { handler: handler.clone(), state: Arc::clone(state) };
    let mut conn = http1_builder(deadlines.max_head).serve_connection(io, service);
    let result = poll_fn(|cx| {
        // So that `DrainSignal::start` can wake an idle connection.
        state.waker.register(cx.waker());
        if let Poll::Ready(r) = conn.poll_without_shutdown(cx) {
            return Poll::Ready(Ok(r));
        }
        if state.awaiting_first_request() {
            let sleep = grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(FIRST_REQUEST_GRACE)));
            if sleep.as_mut().poll(cx).is_ready() {
                tracing::debug!(grace = ?FIRST_REQUEST_GRACE, "closing a fresh connection: no request arrived");
                state.first_request_grace.store(false, Relaxed);
                // hyper reads again only when polled: once, so that its
                // read sees the drain (the flag is now off: no loop).
                cx.waker().wake_by_ref();
            }
        }
        // After hyper's poll: it is what moves the connection on.
        match timer.poll_expired(state, cx, state.may_park()) {
            Some(Expired::Deadline(phase)) => Poll::Ready(Err(phase)),
            Some(Expired::Park) => {
                // hyper lets go at its next read (the flag is now on,
                // and `may_park` off: no loop).
                state.parking.store(true, Relaxed);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Pending,
        }
    })
    .await;
    let result = match result {
        Ok(r) => r,
        Err(phase) => {
            // Dropping hyper's connection closes the socket.
            match phase {
                Phase::PartialHead => {
                    tracing::debug!(deadline = ?deadlines.header, "closing a connection: its request head did not arrive in time (--header-timeout)");
                }
                _ => tracing::debug!(deadline = ?deadlines.idle, "closing an idle connection (--idle-timeout)"),
            }
            return Served::Ended(Outcome::Closed);
        }
    };
    let parts = conn.into_parts();
    if !state.faked_eof.swap(false, Relaxed) {
        // The client closed the connection, sent `Connection: close`, or
        // it failed: hyper is done with it.
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return Served::Ended(Outcome::Closed);
    }
    let stream = parts.io.stream.into_inner();
    if !parts.read_buf.is_empty() {
        // hyper had read part of a request: serve on with those bytes
        // first.
        tracing::debug!(buffered = parts.read_buf.len(), "connection has a buffered partial request; serving it first");
        state.armed.store(false, Relaxed);
        state.parking.store(false, Relaxed);
        return Served::Next(Next::Serve(stream, parts.read_buf));
    }
    if let Err(e) = result {
        // Cannot happen by the rules above (no request in flight), but if
        // it does the connection state is unknown: close rather than hand
        // over.
        tracing::warn!(error = %e, "connection failed at the drain point; closing it");
        return Served::Ended(Outcome::Closed);
    }
    if state.draining.load(Relaxed) {
        return Served::Ended(Outcome::Idle(IdleConnection::new(Socket::Served(stream))));
    }
    Served::Next(Next::Park(Socket::Served(stream)))
}
