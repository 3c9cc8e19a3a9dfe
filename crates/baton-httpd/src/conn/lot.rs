//! Handed-over connections waiting for their next request without a task
//! each: the lot.
//!
//! A handover brings thousands of idle connections at once, and most of
//! them stay idle a while. Giving each its own task at once (a check, a
//! non-blocking flag, its state, a timer, a registration with the runtime's
//! one epoll instance, whose lock both runtime threads then fight over) was
//! about 12 µs of CPU per connection, and it was what paced a handover of
//! 10,000 (`perf`). In the lot a connection costs one `epoll_ctl(ADD)` on
//! the lot's own epoll instance, made by one task (the server loop), and a
//! slot. The lot's epoll fd is what the runtime watches. Only a connection
//! that becomes readable (its client wrote, or closed) leaves the lot and
//! gets a task ([`Lot::readable`]); a drain takes the rest as they are
//! ([`Lot::take_all`]), and the idle deadline closes those that waited too
//! long.
//!
//! Registrations are one-shot: a connection is reported once and then
//! disarmed, so one that left the lot (served, handed over, closed) is
//! never reported again, and it needs no `epoll_ctl(DEL)`: the kernel drops
//! its registration when the socket is finally closed (`epoll(7)`). Keys
//! carry a generation, so a stale report for a reused slot is recognised.
//!
//! Nothing here checks what the fds are: the lot only needs them pollable.
//! A connection is checked when it leaves the lot to be served (see
//! [`pushed_connection`](crate::handoff::pushed_connection)); one handed
//! over from the lot is checked by whoever serves it next.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::epoll;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
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
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // SAFETY: the epoll fd moves into the AsyncFd, which owns it until
        // it is dropped: it is neither closed nor replaced while registered.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?;
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

    /// Parks `fd` until it is readable; gives it back if it cannot be
    /// watched (not pollable, or out of memory), for the caller to serve
    /// some other way.
    pub fn park(&mut self, fd: OwnedFd) -> Result<(), (OwnedFd, std::io::Error)> {
        let key = self.slots.vacant();
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        if let Err(e) = epoll::add(self.epoll.get_ref(), &fd, epoll::EventData::new_u64(key), flags) {
            return Err((fd, e.into()));
        }
        self.slots.insert(fd);
        self.arrivals.push_back((Instant::now(), key));
        Ok(())
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
                    let mut events = [const { MaybeUninit::<epoll::Event>::uninit() }; EVENTS];
                    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
                    match epoll::wait(guard.get_inner(), &mut events, Some(&zero)) {
                        Ok((found, _)) => {
                            if found.len() < EVENTS {
                                // Every ready one taken: wait for the next
                                // edge of the lot's fd.
                                guard.clear_ready();
                            }
                            // One-shot: each is reported once; a stale key
                            // (its slot reused) finds nothing.
                            ready.extend(found.iter().filter_map(|ev| slots.take(ev.data.u64())));
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
        for s in servers {
            lot.park(OwnedFd::from(s)).unwrap();
        }
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
        lot.park(servers.next().unwrap().into()).unwrap();
        lot.park(servers.next().unwrap().into()).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        lot.park(servers.next().unwrap().into()).unwrap();
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
        let (back, e) = lot.park(file).unwrap_err();
        assert_eq!(back.as_raw_fd(), raw);
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()), "{e}");
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
