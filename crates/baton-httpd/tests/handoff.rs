//! Connection handoff on real sockets and processes, under the mini manager
//! (`tests/common/manager.rs`: systemd's protocol and restart semantics,
//! no root needed). The same scenarios run against real systemd in
//! `tests/systemd.rs`.

mod common;

use std::process::{Command, Stdio};

use common::client::{HttpConn, raise_nofile};
use common::scenarios::{self, WAIT};
use common::{BIN, Mini, TempDir};

#[test]
fn keepalive_connections_survive_a_restart() {
    let mut d = Mini::start(&[]);
    scenarios::keepalive_across_restart(&mut d, 50);
    // The new generation removed every connection it adopted from the store;
    // what stays is the generation counter.
    assert_eq!(d.stored_connections(), 0, "{:?}", d.m.store_names());
    assert_eq!(d.m.store_names(), ["baton-httpd.generation"]);
}

#[test]
fn thousand_idle_connections_survive_a_restart() {
    assert!(raise_nofile(4096) >= 2100, "RLIMIT_NOFILE too low for 1,000 connections on both sides");
    let mut d = Mini::start(&[]);
    scenarios::keepalive_across_restart(&mut d, 1000);
    // All under the one name `conn`, in batches (the generation counter
    // took one datagram at the first start), and adopted with a single
    // FDSTOREREMOVE=1.
    let conn_datagrams = d.m.store_datagrams - 1;
    assert!(d.m.most_fds_in_one <= 253, "{}", d.m.most_fds_in_one);
    assert!(d.m.most_fds_in_one > 1, "no batching: {conn_datagrams} datagrams for 1,000 connections");
    assert!(conn_datagrams >= 4, "{conn_datagrams}");
    assert_eq!(d.m.remove_datagrams, 1);
    assert_eq!(d.stored_connections(), 0, "{:?}", d.m.store_names());
    eprintln!("1,000 connections stored in {conn_datagrams} FDSTORE=1 datagrams");
}

/// Connections stored under the per-connection names of earlier versions
/// (`conn/<pid>/<seq>`) are adopted across an upgrade and removed by name.
#[test]
fn legacy_connection_names_are_adopted() {
    let mut d = Mini::start(&[]);
    let mut conns: Vec<HttpConn> = (0..3).map(|_| HttpConn::connect(d.m.port()).unwrap()).collect();
    let old = conns.iter_mut().map(|c| c.get("/healthz").unwrap().pid()).next_back().unwrap();
    d.m.stop(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 3, "{:?}", d.m.store_names());
    // As an earlier version would have stored them.
    for (i, s) in d.m.store.iter_mut().filter(|s| s.name == "conn").enumerate() {
        s.name = format!("conn/{old}/{i}");
    }
    let removes = d.m.remove_datagrams;
    d.m.start(WAIT).unwrap();
    for c in &mut conns {
        assert_ne!(c.get("/healthz").unwrap().pid(), old);
    }
    assert_eq!(d.m.remove_datagrams - removes, 3, "one FDSTOREREMOVE=1 per legacy name");
    assert_eq!(d.stored_connections(), 0, "{:?}", d.m.store_names());
}

/// Beyond `$FDSTORE` (systemd ≥ 254) idle connections are closed, not
/// stored: the names that will be passed again (the socket, the stored
/// listener and the generation counter) count against it too.
#[test]
fn fdstore_limit_is_respected() {
    let mut d = Mini::start(&[]);
    d.m.set_env("FDSTORE", "5");
    common::scenarios::Deployment::restart(&mut d);
    let mut conns: Vec<HttpConn> = (0..6).map(|_| HttpConn::connect(d.m.port()).unwrap()).collect();
    let old = conns.iter_mut().map(|c| c.get("/healthz").unwrap().pid()).next_back().unwrap();
    d.m.stop(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 2, "{:?}", d.m.store_names());
    d.m.start(WAIT).unwrap();
    let (mut kept, mut closed) = (0, 0);
    for c in &mut conns {
        if c.closed_by_server(common::SETTLE) {
            closed += 1;
        } else {
            assert_ne!(c.get("/healthz").unwrap().pid(), old);
            kept += 1;
        }
    }
    assert_eq!((kept, closed), (2, 4));
}

#[test]
fn in_flight_and_pipelined_requests_are_never_lost() {
    let mut d = Mini::start(&[]);
    scenarios::in_flight_and_pipelined(&mut d);
}

#[test]
fn drain_deadline_cuts_only_stuck_requests() {
    let mut d = Mini::start(&[]);
    scenarios::drain_deadline(&mut d);
}

#[test]
fn without_handoff_idle_connections_are_closed() {
    let mut d = Mini::start(&[]);
    scenarios::handoff_disabled(&mut d);
    assert_eq!(d.stored_connections(), 0);
}

#[test]
fn two_restarts_in_a_row() {
    let mut d = Mini::start(&[]);
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    let mut pids = vec![c.get("/healthz").unwrap().pid()];
    for _ in 0..2 {
        common::scenarios::Deployment::restart(&mut d);
        let r = c.get("/healthz").unwrap();
        assert!(!pids.contains(&r.pid()), "{pids:?} {r:?}");
        pids.push(r.pid());
    }
    assert_eq!(c.get("/healthz").unwrap().generation(), 3);
    assert_eq!(d.stored_connections(), 0, "{:?}", d.m.store_names());
}

#[test]
fn a_failed_start_leaves_handed_over_connections_in_the_store() {
    let mut d = Mini::start(&[]);
    let mut conns: Vec<HttpConn> = (0..5).map(|_| HttpConn::connect(d.m.port()).unwrap()).collect();
    let old = conns.iter_mut().map(|c| c.get("/healthz").unwrap().pid()).next_back().unwrap();
    d.m.stop(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 5, "{:?}", d.m.store_names());

    // A generation that fails before READY leaves them where they are...
    scenarios::Deployment::set_extra_args(&mut d, &["--fail-startup"]);
    let err = d.m.start(WAIT).unwrap_err();
    assert!(err.to_string().contains("exited before READY"), "{err}");
    assert!(d.m.status.contains("--fail-startup"), "STATUS={}", d.m.status);
    assert_eq!(d.stored_connections(), 5, "{:?}", d.m.store_names());

    // ...for the next one that starts properly.
    scenarios::Deployment::set_extra_args(&mut d, &[]);
    d.m.start(WAIT).unwrap();
    for c in &mut conns {
        let r = c.get("/healthz").unwrap();
        assert_ne!(r.pid(), old);
    }
    assert_eq!(d.stored_connections(), 0);
}

#[test]
fn entries_that_are_not_connections_are_removed_and_closed() {
    let mut d = Mini::start(&[]);
    d.m.stop(WAIT).unwrap();
    // A pipe under a connection's name (and under a legacy one): handed
    // over, but not adoptable.
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    d.m.store_fd("conn", &w).unwrap();
    d.m.store_fd("conn/1/1", &w).unwrap();
    drop(w);
    d.m.start(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 0, "{:?}", d.m.store_names());
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&c.get("/.well-known/baton").unwrap().body).unwrap();
    assert_eq!(doc["adopted_connections"], 0, "{doc}");
    // Every write end is closed now: the pipe reads EOF.
    let mut buf = [0u8; 1];
    assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 0);
}

#[test]
fn clients_that_hang_up_in_the_store_are_dropped() {
    let mut d = Mini::start(&[]);
    let mut keep = HttpConn::connect(d.m.port()).unwrap();
    let mut gone = HttpConn::connect(d.m.port()).unwrap();
    keep.get("/healthz").unwrap();
    gone.get("/healthz").unwrap();
    d.m.stop(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 2);
    // A reset (not just a FIN, which is a half-close and not a hang-up)
    // makes the stored socket report POLLHUP. The manager polls the store
    // like systemd does; the new generation then adopts only the live one.
    gone.reset();
    d.m.start(WAIT).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&keep.get("/.well-known/baton").unwrap().body).unwrap();
    assert_eq!(doc["adopted_connections"], 1, "{doc}");
}

#[test]
fn baton_generation_env_wins() {
    let mut d = Mini::start(&[]);
    d.m.set_env("BATON_GENERATION", "7");
    common::scenarios::Deployment::restart(&mut d);
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    assert_eq!(c.get("/healthz").unwrap().generation(), 7);
    d.m.set_env("BATON_GENERATION", "seven");
    d.m.stop(WAIT).unwrap();
    let err = d.m.start(WAIT).unwrap_err();
    assert!(d.m.status.contains("BATON_GENERATION"), "{err}; STATUS={}", d.m.status);
}

/// Without a service manager: binds `--listen`, serves, and on SIGTERM
/// closes idle connections (there is nobody to hand them to) and exits 0.
#[test]
fn standalone_with_listen() {
    let dir = TempDir::new("standalone");
    let root = scenarios::make_root(dir.path());
    let port = baton_testbed::free_loopback_port();
    let mut child = Command::new(BIN)
        .args(["--root", &root.display().to_string(), "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = baton_testbed::poll_until("the standalone server to listen", WAIT, || HttpConn::connect(port).ok())
        .unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("{e}")
        });
    let r = c.get("/healthz").unwrap();
    assert_eq!(r.pid(), child.id());
    assert_eq!(r.generation(), 1);
    // SAFETY: plain syscall on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(c.closed_by_server(WAIT));
}

#[test]
fn a_missing_socket_is_explained() {
    let out = Command::new(BIN)
        .args(["--root", "/"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no listening socket named \"http\"") && err.contains("--listen"), "{err}");
    let out = Command::new(BIN).args(["--root", "/nonexistent/dir", "--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--root"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Bytes a client sends while its connection waits in the store stay in
/// the kernel's receive queue; the next generation reads and answers them.
#[test]
fn requests_sent_while_in_the_store_are_answered() {
    let mut d = Mini::start(&[]);
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    let old = c.get("/healthz").unwrap().pid();
    d.m.stop(WAIT).unwrap();
    assert_eq!(d.stored_connections(), 1);
    // Two requests in one write, while no process serves the connection.
    let mut two = HttpConn::get_request("/hello.txt");
    two.extend(HttpConn::get_request("/healthz"));
    c.send(&two).unwrap();
    d.m.start(WAIT).unwrap();
    let a = c.read_response(false).unwrap();
    let b = c.read_response(false).unwrap();
    assert_eq!((a.status, a.body_text().as_str()), (200, "hello, world\n"));
    assert_eq!(b.status, 200);
    assert_ne!(a.pid(), old);
    assert_eq!(a.pid(), b.pid());
}

/// Sends `fds` under `name` on a handoff connection, as Baton pushes them.
fn push(conn: &std::os::fd::OwnedFd, name: &str, fds: &[std::os::fd::BorrowedFd<'_>]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    rustix::net::sendmsg(conn, &[std::io::IoSlice::new(name.as_bytes())], &mut control, SendFlags::NOSIGNAL)
        .expect("push");
}

/// The receiving side of Baton's push protocol on real sockets: every
/// connection pushed under `conn` is yielded (the same TCP connection),
/// anything else is closed, and after `stop` a batch already queued still
/// arrives before the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_connections_are_checked_and_yielded() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use baton_httpd::handoff::PushedConnections;
    use baton_sd::handoff::HandoffReceiver;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

    assert!(raise_nofile(4096) >= 1000, "RLIMIT_NOFILE too low");
    let dir = TempDir::new("push");
    let path = dir.path().join("handoff");
    let server = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .expect("seqpacket socket");
    rustix::net::bind(&server, &SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&server, 4).unwrap();
    let receiver = HandoffReceiver::connect(&path).expect("connect to the handoff socket");
    let conn = rustix::net::accept_with(&server, SocketFlags::CLOEXEC).expect("accept");
    let mut pushed = PushedConnections::spawn(receiver);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pair = || {
        let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        (c, listener.accept().unwrap().0)
    };
    let (mut clients, servers): (Vec<_>, Vec<_>) = (0..300).map(|_| pair()).unzip();
    let fds: Vec<_> = servers.iter().map(|s| s.as_fd()).collect();
    push(&conn, "conn", &fds[..253]);
    push(&conn, "conn", &fds[253..]);
    drop(fds);
    drop(servers);
    // A pipe among connections, and a connection under another name.
    let (pipe_r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    push(&conn, "conn", &[pipe_w.as_fd()]);
    drop(pipe_w);
    let (mut other_client, other_server) = pair();
    push(&conn, "state", &[other_server.as_fd()]);
    drop(other_server);

    let mut got = Vec::new();
    for i in 0..300 {
        let s = tokio::time::timeout(WAIT, pushed.next()).await.expect("in time").unwrap_or_else(|| panic!("#{i}"));
        got.push(s);
    }
    let mut peers: Vec<u16> = got.iter().map(|s| s.peer_addr().unwrap().port()).collect();
    let mut locals: Vec<u16> = clients.iter().map(|c| c.local_addr().unwrap().port()).collect();
    peers.sort_unstable();
    locals.sort_unstable();
    assert_eq!(peers, locals, "the same TCP connections");
    // Really the other ends: bytes go through.
    clients[7].write_all(b"ping").unwrap();
    let port = clients[7].local_addr().unwrap().port();
    let mut s = got.iter().find(|s| s.peer_addr().unwrap().port() == port).unwrap();
    let mut buf = [0u8; 4];
    s.set_nonblocking(false).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // What is not named `conn` was closed on arrival: its client sees the
    // server's FIN.
    let n = tokio::task::spawn_blocking(move || other_client.read(&mut [0u8; 1])).await.unwrap();
    assert_eq!(n.expect("EOF, not a timeout"), 0);

    // Stopping: a batch already queued still arrives, then the stream ends.
    let (last_client, last_server) = pair();
    push(&conn, "conn", &[last_server.as_fd()]);
    drop(last_server);
    pushed.stop();
    // The pipe is checked (and skipped) when its turn comes.
    let last = tokio::time::timeout(WAIT, pushed.next()).await.expect("in time").expect("the queued connection");
    assert_eq!(last.peer_addr().unwrap(), last_client.local_addr().unwrap());
    // The pipe was closed then: it reads EOF.
    let eof = tokio::task::spawn_blocking(move || rustix::io::read(&pipe_r, &mut [0u8; 1]));
    assert_eq!(tokio::time::timeout(WAIT, eof).await.expect("pipe closed in time").unwrap().unwrap(), 0);
    assert!(tokio::time::timeout(WAIT, pushed.next()).await.expect("in time").is_none());
    let report = pushed.finish().await;
    assert_eq!((report.batches, report.connections, report.rejected), (5, 301, 2), "{report:?}");
}

/// The test manager's fd placement (`plan_moves`), simulated on an fd
/// table: every source ends at its target, whatever chains and cycles the
/// overlaps form, with at most one extra step per cycle.
#[test]
fn fd_moves_handle_chains_and_cycles() {
    use std::collections::HashMap;
    fn check(sources: &[i32]) {
        let mut table: HashMap<i32, i32> = sources.iter().map(|&fd| (fd, fd)).collect();
        let moves = common::manager::plan_moves(sources);
        for &(from, to) in &moves {
            let v = *table.get(&from).unwrap_or_else(|| panic!("{sources:?}: fd {from} is not open at {moves:?}"));
            table.insert(to, v);
        }
        for (i, &s) in sources.iter().enumerate() {
            assert_eq!(table.get(&(3 + i as i32)), Some(&s), "{sources:?} → {moves:?}");
        }
        assert!(moves.len() <= sources.len() * 3 / 2 + 1, "{sources:?} → {moves:?}");
    }
    check(&[]);
    check(&[3]);
    check(&[4, 3]); // a swap: one cycle
    check(&[5, 3, 4]); // a 3-cycle
    check(&[4, 5, 6]); // a chain
    check(&[3, 10, 4, 6]); // in place, a chain, outside
    // Pseudo-random permutations of a range overlapping the targets.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for n in [10usize, 100, 1000] {
        let mut fds: Vec<i32> = (0..n as i32).map(|i| i + 3 + (n as i32) / 3).collect();
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            fds.swap(i, (x % (i as u64 + 1)) as usize);
        }
        check(&fds);
    }
}
