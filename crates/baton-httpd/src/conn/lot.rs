//! Handed-over connections waiting for their next request without a task
//! each: the lot.
//!
//! A handover brings thousands of idle connections at once, and most of
//! them stay idle a while. Giving each its own task at once (a check, a
//! non-blocking flag, its state, a timer, a registration with the runtime's
//! one epoll instance, whose lock both runtime threads then fight over) was
//! about 12 µs of CPU per connection, and it was what paced a handover of
//! 10,000 (`perf`). In the lot a connection costs a slot and one
//! `epoll_ctl(ADD)` on the lot's own epoll instance, which the runtime
//! watches. The server loop keeps one lot, and a task of its own keeps a
//! second ([`TaskLot`]), so that the registrations of a handover run on two
//! threads. Only a connection that becomes readable (its client wrote, or
//! closed) leaves the lot and gets a task ([`Lot::readable`]). A drain
//! takes the rest as they are ([`Lot::take_all`]), and the idle deadline
//! closes those that waited too long.
//!
//! The lot's epoll instance is nested in the runtime's, and for a nested
//! instance the kernel makes every `epoll_ctl(ADD)` take a global mutex
//! (`epnested_mutex`) and check the paths between instances
//! (`fs/eventpoll.c`, `do_epoll_ctl`): about a sixth of the time parking
//! takes, and it serialises two lots on two threads a little (`perf`,
//! 10,000 connections). Taking the lot out of the runtime's epoll while a
//! batch is parked was tried and is far worse: adding it back checks every
//! connection in it for loops, so a handover became quadratic.
//!
//! Registrations are one-shot: a connection is reported once and then
//! disarmed. So one that left the lot (served, handed over, closed) is
//! never reported again, and it needs no `epoll_ctl(DEL)`: the kernel drops
//! its registration when the socket is finally closed (`epoll(7)`). Keys
//! carry a generation, so a stale report for a reused slot is recognised.
//!
//! Nothing here checks what the fds are: the lot only needs them pollable.
//! A connection is checked when it leaves the lot to be served (see
//! [`pushed_connection`](crate::handoff::pushed_connection)). One handed
//! over from the lot is checked by whoever serves it next.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rustix::event::epoll;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Events taken from the lot's epoll instance per `epoll_wait`.
const EVENTS: usize = 256;

/// Handed-over idle connections, each registered once with the lot's epoll
/// instance (see the [module docs](self)).
#[derive(Debug)]
pub struct Lot {
    epoll: AsyncFd<OwnedFd>,
    slots: Slots,
    /// Readable connections taken from their slots, not yielded yet.
    ready: VecDeque<OwnedFd>,
    /// `--idle-timeout`: how long a connection may wait here.
    idle: Option<Duration>,
    /// Connections in the order they arrived, hence of their deadlines.
    arrivals: VecDeque<(Instant, u64)>,
    /// `epoll_wait` failed: nothing will be reported again.
    broken: bool,
}

/// The parked fds by slot, with each slot's generation.
#[derive(Debug, Default)]
struct Slots {
    fds: Vec<Option<OwnedFd>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    len: usize,
}

impl Slots {
    /// The key the next [`insert`](Self::insert) will use.
    fn vacant(&self) -> u64 {
        match self.free.last() {
            Some(&i) => key(i, self.generations[i as usize]),
            None => key(self.fds.len() as u32, 0),
        }
    }

    /// Stores `fd` under [`vacant`](Self::vacant)'s key.
    fn insert(&mut self, fd: OwnedFd) {
        match self.free.pop() {
            Some(i) => self.fds[i as usize] = Some(fd),
            None => {
                self.fds.push(Some(fd));
                self.generations.push(0);
            }
        }
        self.len += 1;
    }

    /// Takes the fd stored under `key`, if it is still there; its slot
    /// moves to the next generation.
    fn take(&mut self, key: u64) -> Option<OwnedFd> {
        let (index, generation) = ((key >> 32) as usize, key as u32);
        if self.generations.get(index) != Some(&generation) {
            return None;
        }
        let fd = self.fds[index].take()?;
        self.release(index);
        Some(fd)
    }

    /// Takes every fd.
    fn take_all(&mut self) -> Vec<OwnedFd> {
        let mut all = Vec::with_capacity(self.len);
        for index in 0..self.fds.len() {
            if let Some(fd) = self.fds[index].take() {
                self.release(index);
                all.push(fd);
            }
        }
        all
    }

    fn release(&mut self, index: usize) {
        self.generations[index] = self.generations[index].wrapping_add(1);
        self.free.push(index as u32);
        self.len -= 1;
    }

    fn contains(&self, key: u64) -> bool {
        let index = (key >> 32) as usize;
        self.generations.get(index) == Some(&(key as u32)) && self.fds[index].is_some()
    }
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(index) << 32) | u64::from(generation)
}

impl Lot {
    /// An empty lot, watched by the current runtime; connections wait at
    /// most `idle` (`None`: for ever).
    pub fn new(idle: Option<Duration>) -> std::io::Result<Self> {
        let epoll = watch(epoll::create(epoll::CreateFlags::CLOEXEC)?).map_err(|(_, e)| e)?;
        Ok(Self {
            epoll,
            slots: Slots::default(),
            ready: VecDeque::new(),
            idle,
            arrivals: VecDeque::new(),
            broken: false,
        })
    }

    /// Connections waiting here (readable ones not yielded yet included).
    pub fn len(&self) -> usize {
        self.slots.len + self.ready.len()
    }

    /// Whether no connection waits here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks `fds` until each is readable; gives back those that cannot be
    /// watched (not pollable, or out of memory), for the caller to serve
    /// some other way.
    pub fn park_all(&mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Vec<(OwnedFd, std::io::Error)> {
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        let now = Instant::now();
        let mut refused = Vec::new();
        for fd in fds {
            let key = self.slots.vacant();
            match epoll::add(self.epoll.get_ref(), &fd, epoll::EventData::new_u64(key), flags) {
                Ok(()) => {
                    self.slots.insert(fd);
                    self.arrivals.push_back((now, key));
                }
                Err(e) => refused.push((fd, e.into())),
            }
        }
        // Those already readable (their request arrived with them), at
        // once: the runtime would report the lot's fd only when its I/O
        // driver next runs, which in a burst can be the burst's end. An
        // error is left to `readable`.
        let _ = collect(self.epoll.get_ref(), &mut self.slots, &mut self.ready);
        refused
    }

    /// The next connection that became readable (its client wrote or
    /// closed). Idle ones past their deadline are closed meanwhile. Never
    /// ready while the lot is empty. Cancel-safe: what was collected and
    /// not yielded stays for the next call.
    pub async fn readable(&mut self) -> OwnedFd {
        loop {
            if let Some(fd) = self.ready.pop_front() {
                return fd;
            }
            self.expire(Instant::now());
            let deadline = self.next_deadline();
            if self.broken {
                sleep_until(deadline).await;
                continue;
            }
            let Lot { epoll, slots, ready, broken, .. } = self;
            tokio::select! {
                guard = epoll.readable() => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::error!("watching handed-over idle connections failed: {e}; they wait for the drain");
                            *broken = true;
                            continue;
                        }
                    };
                    match collect(guard.get_inner(), slots, ready) {
                        Ok(found) => {
                            if found < EVENTS {
                                // Every ready one taken: wait for the next
                                // edge of the lot's fd.
                                guard.clear_ready();
                            }
                        }
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            tracing::error!("epoll_wait on handed-over idle connections failed: {e}; they wait for the drain");
                            *broken = true;
                        }
                    }
                }
                () = sleep_until(deadline) => {}
            }
        }
    }

    /// Every connection waiting here, readable or not, for a drain. Their
    /// registrations stay (one-shot; never waited on again).
    pub fn take_all(&mut self) -> Vec<OwnedFd> {
        self.arrivals.clear();
        let mut all: Vec<OwnedFd> = self.ready.drain(..).collect();
        all.append(&mut self.slots.take_all());
        all
    }

    /// Closes the connections that waited longer than the idle deadline.
    fn expire(&mut self, now: Instant) {
        let Some(idle) = self.idle else { return };
        let mut closed = 0usize;
        while let Some(&(since, key)) = self.arrivals.front() {
            if since + idle > now {
                break;
            }
            self.arrivals.pop_front();
            // Gone already if it became readable.
            if let Some(fd) = self.slots.take(key) {
                drop(fd);
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::debug!(closed, deadline = ?idle, "closing idle handed-over connections (--idle-timeout)");
        }
    }

    /// When the oldest connection still here reaches its deadline.
    fn next_deadline(&mut self) -> Option<Instant> {
        let idle = self.idle?;
        // Entries of connections that left are dropped on the way.
        while let Some(&(since, key)) = self.arrivals.front() {
            if self.slots.contains(key) {
                return Some(since + idle);
            }
            self.arrivals.pop_front();
        }
        None
    }
}

/// A [`Lot`] kept by a task of its own, so that a handover's
/// registrations are spread over two threads: the server loop parks every
/// other batch in its own lot and sends the others here. In one lot, on
/// one thread, the `epoll_ctl(ADD)`s (mostly cache misses on sockets last
/// touched by another process) paced a handover of 10,000 while the other
/// core idled.
#[derive(Debug)]
pub struct TaskLot {
    orders: mpsc::Sender<Order>,
    readable: mpsc::Receiver<OwnedFd>,
    len: Arc<AtomicUsize>,
}

/// What the server loop asks of a [`TaskLot`]'s task.
enum Order {
    /// Park these, then call this.
    Park(Vec<OwnedFd>, Box<dyn FnOnce() + Send>),
    /// Give back every connection; the task ends.
    TakeAll(oneshot::Sender<Vec<OwnedFd>>),
}

impl std::fmt::Debug for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Order::Park(fds, _) => write!(f, "Park({} fds)", fds.len()),
            Order::TakeAll(_) => f.write_str("TakeAll"),
        }
    }
}

/// Batches waiting for a [`TaskLot`]'s task (of up to 253 connections), and
/// readable connections waiting for the server loop.
const QUEUE: usize = 64;

impl TaskLot {
    /// Starts the task, on the current runtime, with a lot of its own.
    pub fn spawn(idle: Option<Duration>) -> std::io::Result<Self> {
        let lot = Lot::new(idle)?;
        let (orders, orders_rx) = mpsc::channel(QUEUE);
        let (readable_tx, readable) = mpsc::channel(QUEUE);
        let len = Arc::new(AtomicUsize::new(0));
        tokio::spawn(keep(lot, orders_rx, readable_tx, Arc::clone(&len)));
        Ok(Self { orders, readable, len })
    }

    /// Connections waiting there (including readable ones not taken yet).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed) + self.readable.len()
    }

    /// Whether no connection waits there.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `batch` to be parked, and `parked` to be called then. What
    /// the lot cannot watch comes back through [`readable`](Self::readable),
    /// to be served. Waits while the task has 64 batches to park.
    pub async fn park(&self, batch: Vec<OwnedFd>, parked: impl FnOnce() + Send + 'static) {
        // The task ends only when told to (or if it panicked, and then its
        // fds are gone with it): nothing to give back here.
        let _ = self.orders.send(Order::Park(batch, Box::new(parked))).await;
    }

    /// The next connection that became readable there; never, once the
    /// task has ended.
    pub async fn readable(&mut self) -> OwnedFd {
        match self.readable.recv().await {
            Some(fd) => fd,
            None => std::future::pending().await,
        }
    }

    /// Every connection waiting there, readable or not, for a drain; the
    /// task ends.
    pub async fn take_all(&mut self) -> Vec<OwnedFd> {
        let (reply, all) = oneshot::channel();
        let mut taken = Vec::new();
        if self.orders.send(Order::TakeAll(reply)).await.is_ok() {
            taken = all.await.unwrap_or_default();
        }
        // Readable ones the task had passed on before it was asked.
        while let Ok(fd) = self.readable.try_recv() {
            taken.push(fd);
        }
        self.len.store(0, Relaxed);
        taken
    }
}

/// A [`TaskLot`]'s task: parks what it is sent, passes on what becomes
/// readable, and never waits for the server loop to take it (readable
/// connections wait in `passing`, at most all of the lot's), so an order is
/// always taken.
async fn keep(mut lot: Lot, mut orders: mpsc::Receiver<Order>, readable: mpsc::Sender<OwnedFd>, len: Arc<AtomicUsize>) {
    let mut passing: VecDeque<OwnedFd> = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            order = orders.recv() => match order {
                Some(Order::Park(batch, parked)) => {
                    for (fd, e) in lot.park_all(batch) {
                        tracing::debug!(error = %e, "a handed-over connection cannot wait in the lot; serving it");
                        passing.push_back(fd);
                    }
                    // Counted before the caller learns they are parked.
                    len.store(lot.len() + passing.len(), Relaxed);
                    parked();
                }
                Some(Order::TakeAll(reply)) => {
                    let mut all: Vec<OwnedFd> = passing.drain(..).collect();
                    all.append(&mut lot.take_all());
                    let _ = reply.send(all);
                    return;
                }
                None => return,
            },
            permit = readable.reserve(), if !passing.is_empty() => match (permit, passing.pop_front()) {
                (Ok(permit), Some(fd)) => permit.send(fd),
                _ => return,
            },
            fd = lot.readable(), if passing.is_empty() => passing.push_back(fd),
        }
        len.store(lot.len() + passing.len(), Relaxed);
    }
}

/// Takes the connections `epoll` reports readable (up to [`EVENTS`], without
/// waiting) from `slots` into `ready`; returns how many it reported.
fn collect(epoll: &OwnedFd, slots: &mut Slots, ready: &mut VecDeque<OwnedFd>) -> rustix::io::Result<usize> {
    let mut events = [const { MaybeUninit::<epoll::Event>::uninit() }; EVENTS];
    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
    let (found, _) = epoll::wait(epoll, &mut events, Some(&zero))?;
    // One-shot: each is reported once; a stale key (its slot reused) finds
    // nothing.
    ready.extend(found.iter().filter_map(|ev| slots.take(ev.data.u64())));
    Ok(found.len())
}

/// `epoll` as the runtime watches it (for readability).
fn watch(epoll: OwnedFd) -> Result<AsyncFd<OwnedFd>, (OwnedFd, std::io::Error)> {
    // SAFETY: the epoll fd moves into the AsyncFd, which owns it until it
    // is dropped: it is neither closed nor replaced while registered.
    unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }.map_err(|e| e.into_parts())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    fn pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..n)
            .map(|_| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                (client, listener.accept().unwrap().0)
            })
            .unzip()
    }

    fn peer_port(fd: &OwnedFd) -> u16 {
        let stream = TcpStream::from(fd.try_clone().unwrap());
        stream.peer_addr().unwrap().port()
    }

    #[tokio::test]
    async fn yields_the_connections_whose_clients_wrote_or_closed_and_hands_over_the_rest() {
        let (mut clients, servers) = pairs(600);
        let mut lot = Lot::new(None).unwrap();
        assert!(lot.park_all(servers.into_iter().map(OwnedFd::from)).is_empty());
        assert_eq!(lot.len(), 600);
        // Nothing to read yet: nothing yielded.
        let quiet = tokio::time::timeout(Duration::from_millis(50), lot.readable()).await;
        assert!(quiet.is_err(), "nothing was written");
        // Writes on 300 (more than one epoll_wait's worth), a close on one.
        for c in clients.iter_mut().step_by(2) {
            c.write_all(b"GET").unwrap();
        }
        clients[1].shutdown(std::net::Shutdown::Both).unwrap();
        let port = |i: usize| clients[i].local_addr().unwrap().port();
        let mut woken: Vec<u16> = (0..600).filter(|i| i % 2 == 0 || *i == 1).map(port).collect();
        let mut quiet: Vec<u16> = (0..600).filter(|i| i % 2 == 1 && *i != 1).map(port).collect();
        let mut ports = Vec::new();
        for _ in 0..woken.len() {
            let fd = tokio::time::timeout(Duration::from_secs(10), lot.readable()).await.expect("in time");
            ports.push(peer_port(&fd));
            let mut buf = [0u8; 3];
            let n = TcpStream::from(fd).read(&mut buf).unwrap();
            assert!(n == 3 && &buf == b"GET" || n == 0, "{n} {buf:?}");
        }
        ports.sort_unstable();
        woken.sort_unstable();
        assert_eq!(ports, woken);
        // Each is reported once: the rest stay quiet, and a drain takes
        // them all, the same TCP connections.
        assert_eq!(lot.len(), 299);
        let again = tokio::time::timeout(Duration::from_millis(50), lot.readable()).await;
        assert!(again.is_err(), "reported twice");
        let rest = lot.take_all();
        assert!(lot.is_empty());
        let mut rest_ports: Vec<u16> = rest.iter().map(peer_port).collect();
        rest_ports.sort_unstable();
        quiet.sort_unstable();
        assert_eq!(rest_ports, quiet);
    }

    // Paused time: the clock moves only when the runtime has nothing else
    // to do, so the deadlines are exact whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn closes_connections_idle_past_the_deadline_and_keeps_later_ones() {
        let (mut clients, servers) = pairs(3);
        let mut lot = Lot::new(Some(Duration::from_secs(10))).unwrap();
        let mut servers = servers.into_iter();
        assert!(lot.park_all(servers.next().map(OwnedFd::from)).is_empty());
        assert!(lot.park_all(servers.next().map(OwnedFd::from)).is_empty());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(lot.park_all(servers.next().map(OwnedFd::from)).is_empty());
        // The first two reach the deadline while the lot waits; their
        // clients see the connection closed.
        let waited = tokio::time::timeout(Duration::from_secs(7), lot.readable()).await;
        assert!(waited.is_err());
        assert_eq!(lot.len(), 1, "the later one stays");
        for c in &mut clients[..2] {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0, "closed");
        }
        // The third is still served when its client writes in time.
        clients[2].write_all(b"x").unwrap();
        let fd = tokio::time::timeout(Duration::from_secs(2), lot.readable()).await.expect("in time");
        assert_eq!(peer_port(&fd), clients[2].local_addr().unwrap().port());
    }

    #[tokio::test]
    async fn what_cannot_be_polled_is_given_back() {
        let mut lot = Lot::new(None).unwrap();
        let file = OwnedFd::from(std::fs::File::open("/proc/self/status").unwrap());
        let raw = file.as_raw_fd();
        let mut refused = lot.park_all([file]);
        let (back, e) = refused.pop().expect("refused");
        assert_eq!(back.as_raw_fd(), raw);
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()), "{e}");
        assert!(lot.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_lot_parks_what_it_is_sent_and_gives_everything_back_at_a_drain() {
        let (mut clients, servers) = pairs(300);
        let mut lot = TaskLot::spawn(None).unwrap();
        let (parked_tx, parked) = oneshot::channel();
        lot.park(servers.into_iter().map(OwnedFd::from).collect(), move || {
            let _ = parked_tx.send(());
        })
        .await;
        parked.await.expect("told when parked");
        assert_eq!(lot.len(), 300);
        // One written to is passed on, once.
        clients[7].write_all(b"GET").unwrap();
        let fd = tokio::time::timeout(Duration::from_secs(10), lot.readable()).await.expect("in time");
        assert_eq!(peer_port(&fd), clients[7].local_addr().unwrap().port());
        // Two more written to, not taken: the drain gets them with the
        // others, every connection but the one served.
        clients[8].write_all(b"GET").unwrap();
        clients[9].write_all(b"GET").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lot.readable.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let all = lot.take_all().await;
        let mut ports: Vec<u16> = all.iter().map(peer_port).collect();
        ports.sort_unstable();
        let mut wanted: Vec<u16> =
            (0..300).filter(|&i| i != 7).map(|i| clients[i].local_addr().unwrap().port()).collect();
        wanted.sort_unstable();
        assert_eq!(ports, wanted);
        assert!(lot.is_empty());
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_its_old_key() {
        let (_clients, servers) = pairs(2);
        let mut slots = Slots::default();
        let mut servers = servers.into_iter();
        let first = slots.vacant();
        slots.insert(servers.next().unwrap().into());
        assert!(slots.take(first).is_some());
        let second = slots.vacant();
        slots.insert(servers.next().unwrap().into());
        assert_ne!(first, second, "same slot, next generation");
        assert!(slots.take(first).is_none(), "stale key");
        assert!(slots.contains(second));
        assert_eq!(slots.take_all().len(), 1);
        assert!(!slots.contains(second));
    }
}
