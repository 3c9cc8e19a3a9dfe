//! Steering with real kernel sockets ([`baton::steering`]): two
//! `SO_REUSEPORT` sockets per address, a classic-BPF program choosing the
//! one that gets new connections. Nothing here needs privilege; every
//! socket is on loopback and every count is bounded.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton::listen::{self, BoundSocket, ListenSpec, SocketOptions};
use baton::steering::{Fallback, Layout, Slot, Steering, SteeringOptions, Target};
use rustix::net::{self as rnet, AddressFamily, RecvFlags, SocketType, sockopt};

const WAIT: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn reuseport() -> SocketOptions {
    SocketOptions { reuse_port: true, ..SocketOptions::default() }
}

fn bind(spec: &str, opts: &SocketOptions) -> BoundSocket {
    listen::bind(&spec.parse::<ListenSpec>().unwrap(), opts).unwrap()
}

fn standalone() -> SteeringOptions {
    SteeringOptions { bind_siblings: true, ..SteeringOptions::default() }
}

fn local(fd: BorrowedFd<'_>) -> SocketAddr {
    SocketAddr::try_from(rnet::getsockname(fd).unwrap()).unwrap()
}

/// A steered TCP pair on 127.0.0.1 with the calibration connections
/// already taken away (and checked: one per probe, reading EOF).
fn tcp_pair() -> (BoundSocket, Steering, SocketAddr) {
    let l = bind("http=127.0.0.1:0", &reuseport());
    let (steering, unsteered) = Steering::new(std::slice::from_ref(&l), &standalone()).unwrap();
    assert_eq!(unsteered, vec![]);
    assert!(steering.is_steering());
    assert_eq!(steering.names(), vec!["http"]);
    let addr = local(l.fd.as_fd());
    // Calibration sent one connection to each socket and closed it.
    wait_until("the calibration connections", || {
        steering.queued(Slot::A).unwrap() == 1 && steering.queued(Slot::B).unwrap() == 1
    });
    for slot in [Slot::A, Slot::B] {
        let taken = steering.take_queued(slot, 10).unwrap();
        assert_eq!(taken.len(), 1);
        let mut conn = TcpStream::from(taken.into_iter().next().unwrap().1);
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(conn.read(&mut [0; 8]).unwrap(), 0, "a calibration connection reads EOF");
    }
    (l, steering, addr)
}

/// Connects `n` clients (each completes its handshake) and keeps them.
fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn flip_sends_every_new_connection_to_the_chosen_socket_at_once() {
    let (_l, steering, addr) = tcp_pair();
    assert_eq!(steering.target(), Target::All(Slot::A), "a new Steering sends everything to slot A");
    let mut clients = Vec::new();
    for (round, to) in [Slot::A, Slot::B, Slot::A, Slot::B].into_iter().enumerate() {
        steering.steer(to).unwrap();
        assert_eq!(steering.target(), Target::All(to));
        clients.extend(connect(addr, 20));
        wait_until("20 queued connections", || steering.queued(to).unwrap() == 20);
        assert_eq!(steering.queued(to.other()).unwrap(), 0, "round {round}: nothing for {}", to.other());
        // The generation on `to` would accept them from exactly this fd.
        let fd = steering.sockets_for(to)[0];
        let (queued, _) = baton::steering::listen_backlog(fd).unwrap();
        assert_eq!(queued, 20);
        assert_eq!(steering.take_queued(to, 100).unwrap().len(), 20);
    }
    assert_eq!(steering.queued(Slot::A).unwrap() + steering.queued(Slot::B).unwrap(), 0);
}

#[test]
fn the_two_slots_are_different_sockets_on_one_address() {
    let (l, steering, addr) = tcp_pair();
    let [a] = steering.sockets_for(Slot::A)[..] else { panic!() };
    let [b] = steering.sockets_for(Slot::B)[..] else { panic!() };
    assert_eq!(local(a), addr);
    assert_eq!(local(b), addr);
    let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
    assert_eq!(ino(a), ino(l.fd.as_fd()), "slot A is the socket Baton bound");
    assert_ne!(ino(a), ino(b), "slot B is its sibling");
    // The sibling copies the listener's backlog (somaxconn-capped here).
    let backlog = |fd| baton::steering::listen_backlog(fd).unwrap().1;
    assert_eq!(backlog(a), backlog(b));
    // Both are CLOEXEC.
    for fd in [a, b] {
        assert!(rustix::io::fcntl_getfd(fd).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
    }
}

#[test]
fn queued_counts_and_take_queued_takes_them_all() {
    let (_l, steering, addr) = tcp_pair();
    let clients = connect(addr, 7);
    wait_until("7 queued", || steering.queued(Slot::A).unwrap() == 7);
    let first = steering.take_queued(Slot::A, 3).unwrap();
    assert_eq!(first.len(), 3, "take_queued stops at its bound");
    assert_eq!(steering.queued(Slot::A).unwrap(), 4);
    let rest = steering.take_queued(Slot::A, 100).unwrap();
    assert_eq!(rest.len(), 4);
    assert_eq!(steering.queued(Slot::A).unwrap(), 0);
    assert!(steering.take_queued(Slot::A, 100).unwrap().is_empty());
    // They are the clients' connections, in their order, at listener 0.
    let peers: Vec<SocketAddr> = first
        .iter()
        .chain(&rest)
        .map(|(i, fd)| {
            assert_eq!(*i, 0);
            SocketAddr::try_from(rnet::getpeername(fd).unwrap().unwrap()).unwrap()
        })
        .collect();
    let ours: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    assert_eq!(peers, ours);
    // Taken connections are CLOEXEC and non-blocking; the listener's shared
    // file is blocking again.
    for (_, fd) in first.iter().chain(&rest) {
        assert!(rustix::fs::fcntl_getfl(fd).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
        assert!(rustix::io::fcntl_getfd(fd).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
    }
    let listener = steering.sockets_for(Slot::A)[0];
    assert!(!rustix::fs::fcntl_getfl(listener).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
    // And they work: a byte each way.
    for ((_, fd), mut client) in first.into_iter().chain(rest).zip(clients) {
        let mut conn = TcpStream::from(fd);
        conn.set_nonblocking(false).unwrap();
        client.write_all(b"x").unwrap();
        let mut b = [0];
        conn.read_exact(&mut b).unwrap();
        conn.write_all(b"y").unwrap();
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"y");
    }
}

/// One acceptor per slot, as two generations would run: it answers each
/// connection's line with its slot and the line. Stops once `stop` is set
/// and its queue is empty.
fn acceptor(fd: OwnedFd, slot: Slot, stop: Arc<AtomicBool>, served: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let listener = TcpListener::from(fd);
        loop {
            let mut pfd = [rustix::event::PollFd::new(&listener, rustix::event::PollFlags::IN)];
            let timeout = rustix::time::Timespec { tv_sec: 0, tv_nsec: 20_000_000 };
            let ready = rustix::event::poll(&mut pfd, Some(&timeout)).unwrap();
            if ready == 0 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            let (conn, _) = listener.accept().unwrap();
            served.fetch_add(1, Ordering::SeqCst);
            answer(conn, slot);
        }
    })
}

fn answer(conn: TcpStream, slot: Slot) {
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    (&conn).write_all(format!("{slot} {line}").as_bytes()).unwrap();
}

/// A burst of new connections exactly across a flip: every one is accepted
/// by one of the two "generations" (or, for any left on the old socket
/// after its acceptor stopped, by `take_queued`) and answered; none is lost,
/// and every connection begun after `steer()` returned lands on the new
/// slot.
#[test]
fn a_burst_across_the_flip_loses_nothing() {
    const CLIENTS: usize = 8;
    const EACH: usize = 60;
    let (_l, steering, addr) = tcp_pair();
    let steering = Arc::new(steering);
    let stops = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
    let served = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let acceptors: Vec<_> = [Slot::A, Slot::B]
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            let fd = steering.sockets_for(slot)[0].try_clone_to_owned().unwrap();
            acceptor(fd, slot, stops[i].clone(), served[i].clone())
        })
        .collect();
    let flipped = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    // (began after the flip, who answered)
    let results = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (flipped, answered, results) = (flipped.clone(), answered.clone(), results.clone());
            std::thread::spawn(move || {
                for n in 0..EACH {
                    let after = flipped.load(Ordering::SeqCst);
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let line = format!("{c}-{n}\n");
                    s.write_all(line.as_bytes()).unwrap();
                    let mut reply = String::new();
                    BufReader::new(&s).read_line(&mut reply).unwrap();
                    let (who, echoed) = reply.split_once(' ').unwrap();
                    assert_eq!(echoed, line);
                    results.lock().unwrap().push((after, who.to_owned()));
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    wait_until("a quarter of the burst answered", || answered.load(Ordering::SeqCst) >= CLIENTS * EACH / 4);
    steering.steer(Slot::B).unwrap();
    flipped.store(true, Ordering::SeqCst);
    // The old generation drains what its socket queued, then stops.
    wait_until("slot A's queue empty", || steering.queued(Slot::A).unwrap() == 0);
    stops[0].store(true, Ordering::SeqCst);
    acceptors.into_iter().next().unwrap().join().unwrap();
    // Anything that reached slot A since is taken and answered by "Baton".
    let mut rescued = 0;
    let rescue_until_done = |rescued: &mut usize| {
        for (_, fd) in steering.take_queued(Slot::A, 1000).unwrap() {
            let conn = TcpStream::from(fd);
            conn.set_nonblocking(false).unwrap();
            answer(conn, Slot::A);
            *rescued += 1;
        }
    };
    for c in clients {
        rescue_until_done(&mut rescued);
        c.join().unwrap();
    }
    rescue_until_done(&mut rescued);
    stops[1].store(true, Ordering::SeqCst);
    let results = results.lock().unwrap();
    assert_eq!(results.len(), CLIENTS * EACH, "every connection was answered");
    let served_a = served[0].load(Ordering::SeqCst) + rescued;
    let served_b = served[1].load(Ordering::SeqCst);
    assert_eq!(served_a + served_b, CLIENTS * EACH);
    let late_on_a = results.iter().filter(|(after, who)| *after && who == "A").count();
    assert_eq!(late_on_a, 0, "a connection begun after the flip went to the old slot");
    assert!(served_a >= CLIENTS * EACH / 4, "slot A served before the flip");
    assert!(served_b >= CLIENTS * EACH / 2, "slot B served after the flip");
    eprintln!("burst across the flip: A {served_a} (rescued {rescued}), B {served_b}, lost 0");
}

/// Handing the socket back: the candidate on slot B dies with connections
/// queued on its socket. Steering flips back to A, and Baton takes what B
/// queued, so nothing waits for a later generation: every client is
/// answered, by the old generation (here: this test) through the taken fds.
#[test]
fn hand_back_rescues_what_the_failed_slot_queued() {
    let (_l, steering, addr) = tcp_pair();
    steering.steer(Slot::B).unwrap();
    let send = |n: usize| -> Vec<TcpStream> {
        connect(addr, n)
            .into_iter()
            .map(|mut c| {
                c.write_all(b"req\n").unwrap();
                c
            })
            .collect()
    };
    // Nobody accepts on B: the candidate crashed on its first request.
    let stranded = send(10);
    wait_until("10 queued on B", || steering.queued(Slot::B).unwrap() == 10);
    steering.steer(Slot::A).unwrap();
    let later = send(5);
    wait_until("5 queued on A", || steering.queued(Slot::A).unwrap() == 5);
    let rescued = steering.take_queued(Slot::B, 100).unwrap();
    assert_eq!(rescued.len(), 10);
    assert_eq!(steering.queued(Slot::B).unwrap(), 0);
    for (_, fd) in rescued.into_iter().chain(steering.take_queued(Slot::A, 100).unwrap()) {
        let conn = TcpStream::from(fd);
        conn.set_nonblocking(false).unwrap();
        answer(conn, Slot::A);
    }
    for c in stranded.iter().chain(&later) {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut reply = String::new();
        BufReader::new(c).read_line(&mut reply).unwrap();
        assert_eq!(reply, "A req\n");
    }
}

/// Two sockets bound and listened by hand (as systemd's two `.socket`
/// units would), in `order`: the listener passed first is slot A whatever
/// its index in the group.
fn hand_made_pair(stream: bool, listen_first_second: bool) -> [BoundSocket; 2] {
    let ty = if stream { SocketType::STREAM } else { SocketType::DGRAM };
    let make = || {
        let fd = rnet::socket_with(AddressFamily::INET, ty, rnet::SocketFlags::CLOEXEC, None).unwrap();
        sockopt::set_socket_reuseport(&fd, true).unwrap();
        fd
    };
    let (first, second) = (make(), make());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // UDP joins the group at bind(), TCP at listen(): do both in the order asked.
    let (one, two) = if listen_first_second { (&second, &first) } else { (&first, &second) };
    rnet::bind(one, &any).unwrap();
    let port = local(one.as_fd()).port();
    rnet::bind(two, &SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    if stream {
        rnet::listen(one, 128).unwrap();
        rnet::listen(two, 128).unwrap();
    }
    [first, second].map(|fd| {
        let local = listen::describe(fd.as_fd());
        BoundSocket { name: "http".into(), fd, local }
    })
}

#[test]
fn calibration_finds_each_sockets_index_in_either_listen_order() {
    for reversed in [false, true] {
        for stream in [true, false] {
            let pair = hand_made_pair(stream, reversed);
            let addr = local(pair[0].fd.as_fd());
            let (steering, unsteered) = Steering::new(&pair, &SteeringOptions::default()).unwrap();
            assert_eq!(unsteered, vec![], "reversed {reversed} stream {stream}");
            assert_eq!(steering.names(), vec!["http"], "the pair is one listener");
            let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
            assert_eq!(ino(steering.sockets_for(Slot::A)[0]), ino(pair[0].fd.as_fd()));
            assert_eq!(ino(steering.sockets_for(Slot::B)[0]), ino(pair[1].fd.as_fd()));
            for to in [Slot::A, Slot::B, Slot::A] {
                steering.steer(to).unwrap();
                let receiver = &pair[to.at_for_test()];
                let other = &pair[to.other().at_for_test()];
                if stream {
                    let before = baton::steering::listen_backlog(receiver.fd.as_fd()).unwrap().0;
                    let other_before = baton::steering::listen_backlog(other.fd.as_fd()).unwrap().0;
                    let _c = connect(addr, 5);
                    wait_until("5 more queued", || {
                        baton::steering::listen_backlog(receiver.fd.as_fd()).unwrap().0 == before + 5
                    });
                    assert_eq!(baton::steering::listen_backlog(other.fd.as_fd()).unwrap().0, other_before);
                } else {
                    let senders: Vec<UdpSocket> = (0..5).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
                    for s in &senders {
                        s.send_to(b"d", addr).unwrap();
                    }
                    let mut got = 0;
                    wait_until("5 datagrams on the steered socket", || {
                        while rnet::recv(&receiver.fd, &mut [0u8; 8][..], RecvFlags::DONTWAIT).is_ok() {
                            got += 1;
                        }
                        got == 5
                    });
                    assert!(rnet::recv(&other.fd, &mut [0u8; 8][..], RecvFlags::DONTWAIT).is_err());
                }
            }
        }
    }
}

trait At {
    fn at_for_test(self) -> usize;
}
impl At for Slot {
    fn at_for_test(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

#[test]
fn a_udp_pair_steers_datagrams() {
    let l = bind("dns=udp:127.0.0.1:0", &reuseport());
    let addr = local(l.fd.as_fd());
    let (steering, unsteered) = Steering::new(std::slice::from_ref(&l), &standalone()).unwrap();
    assert_eq!(unsteered, vec![]);
    let recv_all = |slot: Slot| {
        let fd = steering.sockets_for(slot)[0];
        let mut n = 0;
        while rnet::recv(fd, &mut [0u8; 16][..], RecvFlags::DONTWAIT).is_ok() {
            n += 1;
        }
        n
    };
    // The calibration datagrams were read away again.
    assert_eq!((recv_all(Slot::A), recv_all(Slot::B)), (0, 0));
    // Many source ports, which the kernel's hash would spread over both.
    let senders: Vec<UdpSocket> = (0..40).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for to in [Slot::A, Slot::B, Slot::A] {
        steering.steer(to).unwrap();
        for s in &senders {
            s.send_to(b"q", addr).unwrap();
        }
        let mut got = 0;
        wait_until("40 datagrams", || {
            got += recv_all(to);
            got == 40
        });
        assert_eq!(recv_all(to.other()), 0);
    }
    assert_eq!(steering.queued(Slot::A).unwrap(), 0, "queued() counts TCP only");
    assert!(steering.take_queued(Slot::A, 10).unwrap().is_empty());
}

#[test]
fn a_canary_gets_its_share() {
    let (_l, steering, addr) = tcp_pair();
    steering.canary(Slot::B, 30).unwrap();
    assert_eq!(steering.target(), Target::Canary { to: Slot::B, percent: 30 });
    let n = 300;
    let _c = connect(addr, n);
    wait_until("all queued", || (steering.queued(Slot::A).unwrap() + steering.queued(Slot::B).unwrap()) as usize == n);
    let b = steering.queued(Slot::B).unwrap() as usize;
    // 30% of 300 is 90, with a standard deviation of ~8: 40..140 is ±6σ.
    assert!((40..140).contains(&b), "the canary got {b} of {n}");
    steering.take_queued(Slot::A, n).unwrap();
    steering.take_queued(Slot::B, n).unwrap();
    // 0 and 100 are plain flips.
    steering.canary(Slot::B, 100).unwrap();
    assert_eq!(steering.target(), Target::All(Slot::B));
    steering.canary(Slot::B, 0).unwrap();
    assert_eq!(steering.target(), Target::All(Slot::A));
    let _c = connect(addr, 10);
    wait_until("10 on A", || steering.queued(Slot::A).unwrap() == 10);
    assert_eq!(steering.queued(Slot::B).unwrap(), 0);
    let e = steering.canary(Slot::B, 101).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(steering.target(), Target::All(Slot::A), "a refused canary changes nothing");
}

#[test]
fn what_cannot_be_steered_is_shared_and_says_why() {
    let dir = baton_testbed::unique_temp_dir("baton-steering", "fallback");
    std::fs::create_dir_all(&dir).unwrap();
    let unix = bind(&format!("ctl=unix:{}", dir.join("s").display()), &SocketOptions::default());
    let plain = bind("plain=127.0.0.1:0", &SocketOptions::default());
    let single = bind("single=127.0.0.1:0", &reuseport());
    let steered = bind("web=127.0.0.1:0", &reuseport());
    let listeners = [unix, plain, single, steered];
    // As from systemd: no siblings bound.
    let (steering, unsteered) = Steering::new(&listeners, &SteeringOptions::default()).unwrap();
    let why: Vec<(&str, &Fallback)> = unsteered.iter().map(|u| (u.name.as_str(), &u.why)).collect();
    assert_eq!(
        why,
        vec![
            ("ctl", &Fallback::Unix),
            ("plain", &Fallback::NotReusePort),
            ("single", &Fallback::NoSibling),
            ("web", &Fallback::NoSibling)
        ]
    );
    assert!(!steering.is_steering());
    assert_eq!(steering.names(), vec!["ctl", "plain", "single", "web"]);
    let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
    let a: Vec<u64> = steering.sockets_for(Slot::A).into_iter().map(ino).collect();
    let b: Vec<u64> = steering.sockets_for(Slot::B).into_iter().map(ino).collect();
    let own: Vec<u64> = listeners.iter().map(|l| ino(l.fd.as_fd())).collect();
    assert_eq!(a, own, "shared sockets go to both slots");
    assert_eq!(b, own);
    for u in &unsteered {
        assert!(!u.why.to_string().is_empty());
        assert!(!u.local.is_empty());
    }
    assert!(Fallback::NotReusePort.to_string().contains("ReusePort=yes"));
    // Standalone: the sibling is bound where SO_REUSEPORT is set; the rest stay shared.
    let (steering, unsteered) = Steering::new(&listeners, &standalone()).unwrap();
    let names: Vec<&str> = unsteered.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, vec!["ctl", "plain"]);
    assert_eq!(steering.steered().iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec!["single", "web"]);
    // Disabled: nothing is steered and no sibling bound.
    let off = SteeringOptions { enabled: false, ..standalone() };
    let (steering, unsteered) = Steering::new(&listeners, &off).unwrap();
    assert!(!steering.is_steering());
    assert!(unsteered.iter().all(|u| u.why == Fallback::Disabled));
    assert_eq!(unsteered.len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bind_sibling_refuses_what_cannot_have_one() {
    let plain = bind("plain=127.0.0.1:0", &SocketOptions::default());
    let e = listen::bind_sibling(plain.fd.as_fd()).unwrap_err();
    assert!(e.to_string().contains("SO_REUSEPORT"), "{e}");
    let dir = baton_testbed::unique_temp_dir("baton-steering", "sibling");
    std::fs::create_dir_all(&dir).unwrap();
    let unix = bind(&format!("unix:{}", dir.join("s").display()), &SocketOptions::default());
    let e = listen::bind_sibling(unix.fd.as_fd()).unwrap_err();
    assert!(e.to_string().contains("not a TCP or UDP socket"), "{e}");
    // A dual-stack wildcard's sibling is dual-stack too.
    let dual = bind("udp:[::]:0", &reuseport());
    let sib = listen::bind_sibling(dual.fd.as_fd()).unwrap();
    assert_eq!(local(sib.as_fd()), local(dual.fd.as_fd()));
    assert!(!sockopt::ipv6_v6only(&sib).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `baton upgrade`: the new Baton takes the pairs over from the layout the
/// old one passed on, measures nothing (no calibration connection) and
/// changes no program; steering goes on from there.
#[test]
fn restore_takes_over_without_measuring() {
    let (l, steering, addr) = tcp_pair();
    steering.steer(Slot::B).unwrap();
    let text = serde_json::to_string(&steering.layout()).unwrap();
    let layout: Layout = serde_json::from_str(&text).unwrap();
    assert_eq!(layout.target, Target::All(Slot::B));
    assert_eq!(layout.pairs.len(), 1);
    let siblings = steering.bound_siblings();
    assert_eq!(siblings.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["http"]);
    let socket = |name: &str, fd: BorrowedFd<'_>| BoundSocket {
        name: name.into(),
        fd: fd.try_clone_to_owned().unwrap(),
        local: listen::describe(fd),
    };
    // What the new Baton inherits: the listener, then its sibling.
    let inherited = [socket(&l.name, l.fd.as_fd()), socket(siblings[0].0, siblings[0].1)];
    drop(siblings);
    drop(steering);
    let (restored, unsteered) = Steering::restore(&inherited, &layout).unwrap();
    assert_eq!(unsteered, vec![]);
    assert_eq!(restored.target(), Target::All(Slot::B));
    // It bound nothing itself, but the sibling is still Baton's to carry
    // to the next upgrade (the layout says so).
    let carried = restored.bound_siblings();
    assert_eq!(carried.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["http"], "the sibling is carried on");
    drop(carried);
    assert_eq!((restored.queued(Slot::A).unwrap(), restored.queued(Slot::B).unwrap()), (0, 0), "no calibration");
    let _c = connect(addr, 5);
    wait_until("5 on B, the program left as it was", || restored.queued(Slot::B).unwrap() == 5);
    assert_eq!(restored.queued(Slot::A).unwrap(), 0);
    restored.steer(Slot::A).unwrap();
    let _c = connect(addr, 5);
    wait_until("5 on A", || restored.queued(Slot::A).unwrap() == 5);
    assert_eq!(restored.queued(Slot::B).unwrap(), 5);
    // A layout without the pair: both sockets shared, said so.
    let empty = Layout { pairs: vec![], target: Target::All(Slot::A) };
    let (shared, unsteered) = Steering::restore(&inherited, &empty).unwrap();
    assert!(!shared.is_steering());
    assert_eq!(unsteered.iter().map(|u| &u.why).collect::<Vec<_>>(), [&Fallback::NotInLayout, &Fallback::NotInLayout]);
    assert_eq!(shared.names(), ["http", "http"], "both sockets reach every generation");
}

/// A pair that cannot be measured is not steered: here a third socket of
/// the same user sits at index 0 of the group, so the probe for index 0
/// reaches neither of Baton's two. Both are shared, no program is left
/// attached (the kernel's hash spreads connections again), and the reason
/// says what to look for.
#[test]
fn a_pair_that_cannot_be_measured_falls_back_with_the_reason() {
    let foreign = bind("other=127.0.0.1:0", &reuseport());
    let port = local(foreign.fd.as_fd()).port();
    let ours =
        [bind(&format!("http=127.0.0.1:{port}"), &reuseport()), bind(&format!("http=127.0.0.1:{port}"), &reuseport())];
    let opts = SteeringOptions { probe_wait: Duration::from_millis(300), ..SteeringOptions::default() };
    let (steering, unsteered) = Steering::new(&ours, &opts).unwrap();
    assert!(!steering.is_steering());
    assert_eq!(unsteered.len(), 2);
    for u in &unsteered {
        let Fallback::Calibration(reason) = &u.why else { panic!("{:?}", u.why) };
        assert!(reason.contains("reached neither socket"), "{reason}");
        assert!(u.why.to_string().contains("SO_REUSEPORT group"), "{}", u.why);
    }
    assert_eq!(steering.names(), ["http", "http"]);
    // No program: connections from many source ports reach all three sockets.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _c = connect(addr, 60);
    let q = |fd: BorrowedFd<'_>| baton::steering::listen_backlog(fd).unwrap().0;
    // 60 and the one probe for index 0, which the foreign socket took.
    let total = || q(foreign.fd.as_fd()) + q(ours[0].fd.as_fd()) + q(ours[1].fd.as_fd());
    wait_until("61 queued in all", || total() == 61);
    for s in [&foreign, &ours[0], &ours[1]] {
        assert!(q(s.fd.as_fd()) > 0, "{} got none: the program was left attached", s.local);
    }
}

// ---- under systemd ---------------------------------------------------------

/// Run by the service in [`generated_pair_under_systemd`] (`T_ROLE=systemd-pair`),
/// as a `DynamicUser=` with the sockets of the two generated `.socket` units:
/// pairs them, and steers real connections to each slot in turn; a
/// sibling of its own it cannot bind (another uid than the group's owner).
#[test]
fn systemd_pair_helper() {
    if std::env::var("T_ROLE").as_deref() != Ok("systemd-pair") {
        return;
    }
    let uid = rustix::process::getuid().as_raw();
    assert_ne!(uid, 0, "the helper runs as a DynamicUser");
    let mut fds = baton_sd::ListenFds::from_env().unwrap();
    let listeners = listen::inherit(&mut fds).unwrap();
    let described: Vec<String> = listeners.iter().map(|l| format!("{} {}", l.name, l.local)).collect();
    println!("STEER passed: {described:?}");
    assert_eq!(listeners.len(), 2);
    let (steering, unsteered) = Steering::new(&listeners, &SteeringOptions::default()).unwrap();
    assert_eq!(unsteered, vec![]);
    assert_eq!(steering.names(), vec!["http"]);
    let addr = local(listeners[0].fd.as_fd());
    wait_until("the calibration connections", || {
        steering.queued(Slot::A).unwrap() == 1 && steering.queued(Slot::B).unwrap() == 1
    });
    steering.take_queued(Slot::A, 10).unwrap();
    steering.take_queued(Slot::B, 10).unwrap();
    for to in [Slot::B, Slot::A, Slot::B] {
        steering.steer(to).unwrap();
        let _c = connect(addr, 5);
        wait_until("5 queued", || steering.queued(to).unwrap() == 5);
        assert_eq!(steering.queued(to.other()).unwrap(), 0);
        assert_eq!(steering.take_queued(to, 10).unwrap().len(), 5);
    }
    let e = listen::bind_sibling(listeners[0].fd.as_fd()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
    println!("STEER OK uid={uid}: 3 flips, 5 of 5 connections on the chosen socket each; own sibling: {e}");
}

fn generated_pair_under_systemd(flavor: baton_testbed::Flavor, test: &str) {
    let exe = std::env::current_exe().unwrap();
    let Some(bed) = baton_testbed::Bed::builder(flavor, test).binary(exe, "/usr/local/bin/baton-steering-test").boot()
    else {
        return;
    };
    assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd());
    let port = bed.port;
    let listen = format!("http=127.0.0.1:{port}");
    let args: baton::units::UnitsArgs = {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: baton::units::UnitsArgs,
        }
        let argv = ["u", "--name", "pairtest", "-l", &listen, "--steering", "auto", "--", "/bin/true"];
        <Cli as clap::Parser>::parse_from(argv).args
    };
    let files = baton::units::generate(&args, bed.tb.systemd_version()).unwrap();
    let sockets: Vec<_> = files.iter().filter(|f| f.name.ends_with(".socket")).collect();
    assert_eq!(sockets.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["pairtest.socket", "pairtest-b.socket"]);
    let service = "[Unit]\nRequires=pairtest.socket pairtest-b.socket\nAfter=pairtest.socket pairtest-b.socket\n\
                   [Service]\nType=oneshot\nDynamicUser=yes\nEnvironment=T_ROLE=systemd-pair RUST_BACKTRACE=1\n\
                   ExecStart=/usr/local/bin/baton-steering-test systemd_pair_helper --exact --nocapture --test-threads=1\n\
                   Sockets=pairtest.socket pairtest-b.socket\n";
    let mut units: Vec<(&str, &str)> = sockets.iter().map(|f| (f.name.as_str(), f.contents.as_str())).collect();
    units.push(("pairtest.service", service));
    bed.install_units(units);
    bed.systemctl_ok(&["start", "pairtest.socket", "pairtest-b.socket"]);
    for unit in ["pairtest.socket", "pairtest-b.socket"] {
        assert_eq!(bed.show(unit, "ActiveState"), "active", "{unit}");
    }
    // PID 1 holds two listeners on the port.
    let tcp = bed.run_ok(&["cat", "/proc/net/tcp"]);
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    assert_eq!(tcp.lines().filter(|l| l.contains(&needle)).count(), 2, "{tcp}");
    let out = bed.systemctl(&["start", "pairtest.service"]);
    let journal = bed.journal(Some("pairtest.service"));
    assert!(out.success(), "pairtest.service failed: {}\n{journal}", out.stderr);
    let ok = journal.lines().find(|l| l.contains("STEER OK")).unwrap_or_else(|| panic!("no STEER OK in\n{journal}"));
    eprintln!("{test}: {ok}");
    assert!(journal.contains("Address already in use"), "{journal}");
}

baton_testbed::systemd_tests! { generated_pair_under_systemd:
    generated_pair_under_systemd_252: Host,
    generated_pair_under_systemd_257: Trixie,
}
