//! A connection accepted just before a drain, whose request has not arrived
//! yet, when no handoff is possible: the real baton-httpd under the mini
//! manager, real sockets.
//!
//! This is the rare `Failure::Closed` of the systemd crash scenario
//! (`tests/under_systemd.rs`, `baton_crash_killmode_control_group`): Baton
//! is SIGKILLed, systemd SIGTERMs the orphaned generation, which cannot hand
//! connections to anyone. A connection it had accepted a moment before,
//! whose client had connected but not yet written its request, used to be
//! closed as "idle at a request boundary", so the request sent right after
//! `connect()` got EOF. Such a connection never carried a request: its
//! client cannot know it might be closed (RFC 9112 §9.6 lets clients retry
//! only on connections that did), so it is now given a short grace to send
//! its first request, which is then answered.
//!
//! How "accepted" is made certain without timing: the server accepts from
//! one FIFO queue in one task, so once a request on a connection opened
//! *after* the fresh one has been answered, the fresh one was accepted.
//! How "the drain has begun" is observed: a keep-alive connection that has
//! served a request is closed by the drain (no handoff), at the same moment
//! every connection is told to drain.

mod common;

use std::time::{Duration, Instant};

use common::Mini;
use common::client::HttpConn;
use common::scenarios::WAIT;

/// Generous bound for anything the server should do within a few seconds.
const SOON: Duration = Duration::from_secs(30);

/// Answers one request on a new connection (`Connection: close`), so that
/// every connection opened before it has been accepted.
fn ensure_accepted(port: u16) {
    let mut probe = HttpConn::connect(port).unwrap();
    let r = probe.request("GET", "/hello.txt", &["Connection: close"]).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

/// A keep-alive connection that has served one request.
fn served_keepalive(port: u16) -> HttpConn {
    let mut c = HttpConn::connect(port).unwrap();
    assert_eq!(c.get("/hello.txt").unwrap().status, 200);
    c
}

/// The scenario: `fresh` accepted with nothing sent, SIGTERM, the drain
/// closes the keep-alive connection (today's behaviour for those), then
/// `fresh` sends its request and must get the answer, then be closed.
fn fresh_request_after_drain_began(mut d: Mini, before_stop: impl FnOnce(&mut Mini)) {
    let port = d.m.port();
    let mut keepalive = served_keepalive(port);
    let mut fresh = HttpConn::connect(port).unwrap();
    ensure_accepted(port);
    let pid = d.m.pid().unwrap();

    before_stop(&mut d);
    d.m.begin_stop().unwrap();
    assert!(
        keepalive.closed_by_server(SOON),
        "without handoff, an idle keep-alive connection that served a request is closed by the drain"
    );
    // The drain has begun: every connection was told at once.
    let answer = fresh.get("/hello.txt");
    let r = answer.unwrap_or_else(|e| {
        panic!("a connection accepted before the drain, whose first request came after it began, was closed: {e}")
    });
    assert_eq!((r.status, r.pid()), (200, pid), "{r:?}");
    assert_eq!(r.body_text(), "hello, world\n");
    assert!(fresh.closed_by_server(SOON), "once served, the fresh connection is closed like an idle one");
    let status = d.m.wait_stopped(WAIT).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(d.stored_connections(), 0);
}

/// `--handoff=false`: nothing is ever handed over.
#[test]
fn a_fresh_connection_is_answered_when_draining_with_handoff_off() {
    fresh_request_after_drain_began(Mini::start(&["--handoff=false"]), |_| {});
}

/// The crash scenario: the manager (Baton) died before the SIGTERM, so
/// `STOPPING=1` and every `FDSTORE=1` fail.
#[test]
fn a_fresh_connection_is_answered_when_the_manager_died() {
    fresh_request_after_drain_began(Mini::start(&[]), |d| d.m.lose_notify_socket().unwrap());
}

/// The grace is short and bounded: a fresh connection that never sends
/// anything does not hold the drain until `--idle-timeout` or
/// `--drain-timeout` (both far longer here); it is closed and the server
/// exits.
#[test]
fn a_silent_fresh_connection_is_closed_after_a_short_grace() {
    let mut d = Mini::start(&["--handoff=false", "--idle-timeout", "300s", "--drain-timeout", "300s"]);
    let port = d.m.port();
    let mut silent = HttpConn::connect(port).unwrap();
    ensure_accepted(port);
    let stopping = Instant::now();
    d.m.begin_stop().unwrap();
    assert!(silent.closed_by_server(Duration::from_secs(60)), "the silent fresh connection is closed");
    let status = d.m.wait_stopped(WAIT).unwrap();
    assert!(status.success(), "{status:?}");
    // Far below the 300 s deadlines, far above the grace (1 s).
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(60), "stopping took {took:?}");
}

/// With a handoff available nothing changes: a fresh connection is handed
/// over at once (no grace), and its request, sent after the restart, is
/// answered by the next generation.
#[test]
fn with_handoff_a_fresh_connection_is_handed_over_as_before() {
    let mut d = Mini::start(&[]);
    let port = d.m.port();
    let mut fresh = HttpConn::connect(port).unwrap();
    ensure_accepted(port);
    let old = d.m.pid().unwrap();
    d.m.restart(WAIT).unwrap();
    let new = d.m.pid().unwrap();
    assert_ne!(old, new);
    let r = fresh.get("/hello.txt").unwrap();
    assert_eq!((r.status, r.pid()), (200, new), "{r:?}");
}
