//! baton-httpd under Baton, standalone (`baton run`, no root needed):
//! `baton restart` is overlapped — the new generation is ready before the old
//! one is told to stop — so the old one's idle connections are pushed to the
//! running new one over `$BATON_HANDOFF_SOCKET` instead of waiting for a
//! next start. The scenarios are those of `tests/handoff.rs` and
//! `tests/systemd.rs`, written against [`Deployment`].

mod common;

use common::baton::BatonRun;
use common::client::{HttpConn, raise_nofile};
use common::scenarios::{self, Deployment};

#[test]
fn keepalive_connections_survive_baton_restart() {
    let mut d = BatonRun::start(&[]);
    scenarios::keepalive_across_restart(&mut d, 50);
    // Pushed connections are moved, never stored: Baton's store stays empty,
    // and a second restart hands over exactly the same 50 again.
    assert_eq!(d.status()["fdstore"], 0, "{}", d.status());
    scenarios::keepalive_across_restart(&mut d, 50);
    assert_eq!(d.status()["fdstore"], 0, "{}", d.status());
}

#[test]
fn thousand_idle_connections_survive_baton_restart() {
    assert!(raise_nofile(4096) >= 2100, "RLIMIT_NOFILE too low for 1,000 connections on both sides");
    let mut d = BatonRun::start(&[]);
    scenarios::keepalive_across_restart(&mut d, 1000);
    assert_eq!(d.status()["fdstore"], 0, "{}", d.status());
}

#[test]
fn in_flight_and_pipelined_requests_are_never_lost_under_baton() {
    let mut d = BatonRun::start(&[]);
    scenarios::in_flight_and_pipelined(&mut d);
}

#[test]
fn drain_deadline_under_baton() {
    let mut d = BatonRun::start(&[]);
    scenarios::drain_deadline(&mut d);
}

#[test]
fn without_handoff_idle_connections_are_closed_under_baton() {
    let mut d = BatonRun::start(&[]);
    scenarios::handoff_disabled(&mut d);
}

/// A client that keeps a connection busy across several restarts in a row
/// is served by each new generation in turn, on the same TCP connection.
#[test]
fn three_baton_restarts_in_a_row() {
    let mut d = BatonRun::start(&[]);
    let mut c = HttpConn::connect(d.port()).unwrap();
    let first = c.get("/healthz").unwrap();
    let port = c.local_port();
    let mut pids = vec![first.pid()];
    for _ in 0..3 {
        d.restart();
        let r = c.get("/healthz").unwrap_or_else(|e| panic!("after restart {}: {e}\n{}", pids.len(), d.log_text()));
        assert!(!pids.contains(&r.pid()), "{pids:?} {r:?}");
        pids.push(r.pid());
    }
    assert_eq!(c.local_port(), port);
    assert_eq!(c.get("/healthz").unwrap().generation(), first.generation() + 3);
}
