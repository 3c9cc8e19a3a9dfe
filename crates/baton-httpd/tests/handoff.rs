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
    // A pipe under a connection's name: handed over, but not adoptable.
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
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
