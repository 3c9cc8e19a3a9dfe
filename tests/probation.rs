//! Probation and hand-back, at the supervisor's level, with real
//! processes and real sockets under load ([`baton_testbed::load`]): a
//! candidate that fails after it took the traffic (killed, its probe
//! failing, crashing at its first real request) gets the traffic taken
//! back; what was queued on its socket is rescued, handed to an old
//! generation that adopts connections or relayed to one that cannot; no
//! crash restart starts on the rejected code. The bed is tests/proving.rs's
//! (`tests/proving/bed.rs`). No timing asserts; no root needed.

use std::io::{Read, Write};

use baton_testbed::baton::WAIT;
use baton_testbed::load::Mode;
use baton_testbed::poll_until;

#[path = "proving/bed.rs"]
mod bed;

use bed::*;

/// A candidate killed on probation, after it took the traffic: the
/// traffic is handed back, the restart fails naming probation, the old
/// generation serves on, and no crash restart starts on the rejected
/// code. What it costs under load is counted and printed (what the
/// candidate had accepted and not answered dies with it; what was queued
/// on its socket is rescued).
#[test]
fn a_candidate_dying_on_probation_hands_the_traffic_back() {
    let bed =
        Bed::start("probation", &["--quiet-period", "200ms", "--probation", "30s"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let before = bed.b.status();
    let restart = bed.restart_in_background();
    let s = bed.wait_gen("generation 2 on probation", 2, |g| g.state == "probation" && g.steered);
    let pid2 = gen_of(&s, 2).pid;
    assert!(!gen_of(&s, 1).steered, "{s:?}");
    // It takes real traffic before it dies.
    let taken = loads.iter().map(|(_, l)| l.progress().ok).sum::<u64>();
    poll_until("new answers on probation", WAIT, || {
        (loads.iter().map(|(_, l)| l.progress().ok).sum::<u64>() >= taken + 50).then_some(())
    })
    .unwrap();
    kill(pid2);
    let err = failed_restart(&restart.join().unwrap());
    assert!(err.contains("generation 2 killed by SIGKILL"), "{err}");
    assert!(err.contains("on probation, after it took the traffic (handed back to the old generation)"), "{err}");

    let s = bed.wait_gen("generation 1 steered again, 2 gone", 1, |g| g.state == "active" && g.steered);
    assert_eq!(s.generations.len(), 1, "{s:?}");
    let after = bed.load(Mode::NewConnection, 2, 100);
    assert!(after.wait_for_ok(100, WAIT), "no answers after the hand-back: {:?}", after.progress());
    let reports = finish("probation death", loads);
    let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
    let by = answered_by(&reports);
    eprintln!("probation death: {failed} failed requests under load, answered by generation {by:?}");
    assert!(by.contains_key("2"), "generation 2 never got traffic on probation: {by:?}");
    let after = finish("after the hand-back", vec![("new-connection", after)]);
    assert_nothing_failed(&after);
    assert_eq!(answered_by(&after).keys().collect::<Vec<_>>(), ["1"]);
    // No crash restart on the rejected code, then or later.
    let s = bed.b.status();
    assert_eq!((s.restarts, s.crash_restarts), (before.restarts, before.crash_restarts), "{s:?}");
    assert_eq!(s.generations.iter().map(|g| g.generation).collect::<Vec<_>>(), [1], "{s:?}");
    assert!(s.last_failure.as_deref().unwrap_or("").contains("on probation"), "{s:?}");
    // And a good restart still goes through.
    assert_eq!(bed.b.restart(), 3);
}

/// A candidate whose probe starts failing on probation (its probed file
/// removed after the flip: 404) is asked to stop, not killed: the traffic
/// goes back, the keep-alive connections it served are handed back to the
/// old generation, and nothing fails under load.
#[test]
fn a_probe_failing_on_probation_hands_everything_back() {
    let bed = Bed::start(
        "probe-probation",
        &["--quiet-period", "200ms", "--probation", "30s", "--health-http", "/probe.txt"],
        None,
        |d| httpd(d, "www", ""),
    );
    let root2 = bed.dir.join("www2");
    std::fs::create_dir_all(&root2).unwrap();
    for f in ["index.html", "probe.txt"] {
        std::fs::copy(bed.dir.join("www").join(f), root2.join(f)).unwrap();
    }
    bed.next(httpd(&bed.dir, "www2", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let restart = bed.restart_in_background();
    bed.wait_gen("generation 2 on probation", 2, |g| g.state == "probation" && g.steered);
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers on probation: {:?}", l.progress());
    }
    std::fs::remove_file(root2.join("probe.txt")).unwrap();
    let err = failed_restart(&restart.join().unwrap());
    assert!(err.contains("generation 2 probe failed: GET /probe.txt answered 404"), "{err}");
    assert!(err.contains("on probation, after it took the traffic (handed back to the old generation)"), "{err}");
    let s = bed.b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    assert!(gen_of(&s, 1).steered && s.crash_restarts == 0, "{s:?}");
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers after the hand-back: {:?}", l.progress());
    }
    let reports = finish("probe failing on probation", loads);
    let by = answered_by(&reports);
    eprintln!("probe failing on probation: answered by {by:?}");
    assert_nothing_failed(&reports);
    assert!(by.contains_key("2"), "generation 2 got no traffic on probation: {by:?}");
    assert!(bed.b.log().contains("generation 2 failed; traffic handed back to generation 1"), "{}", bed.b.log_tail());
}

/// Generation 1 serving on `bed`; a candidate that is ready, passes its
/// probes and never accepts real connections (after the flip every new
/// one waits in its queue) is killed on probation with 20 requests and a
/// load queued on it: all are answered by generation 1, whose answers
/// carry `header` and count in the load as `key`.
fn rescue_from_a_killed_candidate(bed: &Bed, header: &str, key: &str) {
    bed.next(tiny(&bed.dir, "--notify --probe-only"));
    let load = bed.load(Mode::NewConnection, 2, 50);
    assert!(load.wait_for_ok(20, WAIT), "no answers: {:?}", load.progress());
    let restart = bed.restart_in_background();
    let s = bed.wait_gen("the candidate on probation", 2, |g| g.state == "probation" && g.steered);
    let mut queued: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(bed.addr()).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            c
        })
        .collect();
    let pid2 = gen_of(&s, 2).pid;
    kill(pid2);
    let err = failed_restart(&restart.join().unwrap());
    assert!(err.contains("on probation, after it took the traffic (handed back to the old generation)"), "{err}");
    for (i, c) in queued.iter_mut().enumerate() {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut out = String::new();
        let read = c.read_to_string(&mut out);
        assert!(
            read.is_ok() && out.starts_with("HTTP/1.1 200") && out.contains(header),
            "queued connection {i}: {read:?} {out:?}\n{}",
            bed.b.log_tail()
        );
    }
    assert!(load.wait_for_ok(50, WAIT), "no answers after the hand-back: {:?}", load.progress());
    let reports = finish("rescue from a killed candidate", vec![("new-connection", load)]);
    assert_nothing_failed(&reports);
    assert_eq!(answered_by(&reports).keys().collect::<Vec<_>>(), [key]);
    assert!(
        bed.b.log().contains("connection(s) queued on slot B's sockets go to generation 1"),
        "{}",
        bed.b.log_tail()
    );
}

/// The old generation does not adopt connections (`tiny.py`): what was
/// queued on the failed candidate is relayed to it through the address.
#[test]
fn what_a_failed_candidate_had_queued_is_relayed_to_an_old_generation() {
    let bed = Bed::start("relay", &["--quiet-period", "200ms", "--probation", "30s", "--health-tcp"], None, |d| {
        tiny(d, "--notify")
    });
    let pid1 = bed.b.generation_pid(1);
    rescue_from_a_killed_candidate(&bed, &format!("baton-pid: {pid1}"), &format!("pid:{pid1}"));
}

/// What was queued on a candidate's socket when it died on probation is
/// rescued: handed to the old generation (baton-httpd adopts connections)
/// and answered there, requests already sent included. Then a candidate
/// that passes its probes but dies at its first real request: what that
/// costs under load is counted and printed (the connection it accepted
/// dies with it; what was still queued is rescued).
#[test]
fn what_a_failed_candidate_had_queued_is_rescued() {
    let bed = Bed::start("rescue", &["--quiet-period", "200ms", "--probation", "30s", "--health-tcp"], None, |d| {
        httpd(d, "www", "")
    });
    rescue_from_a_killed_candidate(&bed, "baton-generation: 1", "1");

    // Passes its probes, dies at its first real request.
    bed.next(tiny(&bed.dir, "--notify --die-on-traffic"));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let err = failed_restart(&bed.b.cli(&["restart"]));
    assert!(err.contains("generation 3 exited with status 1"), "{err}");
    assert!(err.contains("on probation"), "{err}");
    bed.b.wait_status("generation 1 steered again, alone", |s| s.generations.len() == 1 && s.generations[0].steered);
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers after the hand-back: {:?}", l.progress());
    }
    let reports = finish("crash on the first real request", loads);
    let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
    eprintln!(
        "crash on the first real request after the flip: {failed} failed requests under load, answered by {:?}",
        answered_by(&reports)
    );
    assert_eq!(answered_by(&reports).keys().collect::<Vec<_>>(), ["1"], "the dying candidate answered nothing");
    assert_eq!(bed.b.status().crash_restarts, 0);
}

/// A restart asked while the candidate is on probation waits for it; when
/// the candidate then fails, the waiting request is not lost: it starts
/// the next generation and is answered by it. `baton upgrade` meanwhile is
/// refused with the reason, and the probation goes on.
#[test]
fn a_restart_waiting_behind_a_failed_probation_gets_the_next_generation() {
    let bed = Bed::start("behind-probation", &["--quiet-period", "200ms", "--probation", "6s"], None, |d| {
        httpd(d, "www", "")
    });
    let load = bed.load(Mode::NewConnection, 4, 100);
    assert!(load.wait_for_ok(50, WAIT), "no answers: {:?}", load.progress());
    let first = bed.restart_in_background();
    let s = bed.wait_gen("generation 2 on probation", 2, |g| g.state == "probation" && g.steered);
    let waiting = bed.restart_in_background();
    // Nothing shows a waiting request; the upgrade asked below is a
    // round trip after it was sent, so it is in by the kill (were it not,
    // it would be a fresh restart, answered the same).
    let upgrade = bed.b.cli(&["upgrade"]);
    let err = String::from_utf8_lossy(&upgrade.stderr).into_owned();
    eprintln!("upgrade on probation: {:?} {err}", upgrade.status.code());
    assert!(!upgrade.status.success(), "an upgrade during probation: {upgrade:?}");
    assert!(err.contains("busy: a restart is in progress (generation 2 "), "{err}");
    assert!(gen_of(&bed.b.status(), 2).state == "probation", "the upgrade refusal ended the probation");
    kill(gen_of(&s, 2).pid);
    let err = failed_restart(&first.join().unwrap());
    assert!(err.contains("generation 2 killed by SIGKILL"), "{err}");
    let out = waiting.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.starts_with("generation 3 "), "the waiting restart: {out:?}");
    let s = bed.wait_gen("generation 3 active", 3, |g| g.state == "active" && g.steered);
    assert_eq!((s.restarts, s.crash_restarts), (1, 0), "{s:?}");
    assert!(load.wait_for_ok(50, WAIT), "no answers after: {:?}", load.progress());
    let reports = finish("restart behind a failed probation", vec![("new-connection", load)]);
    let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
    eprintln!("restart behind a failed probation: {failed} failed requests, answered by {:?}", answered_by(&reports));
    assert!(answered_by(&reports).contains_key("3"));
}

/// `WATCHDOG=trigger` on probation (at its first real request): the
/// traffic is handed back, the candidate is aborted (SIGABRT, as systemd
/// does), the restart fails naming its watchdog, no crash restart. What it
/// costs under load is counted and printed.
#[test]
fn a_watchdog_trigger_on_probation_hands_the_traffic_back() {
    let bed =
        Bed::start("watchdog", &["--quiet-period", "200ms", "--probation", "30s", "--health-http", "/"], None, |d| {
            httpd(d, "www", "")
        });
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    bed.next(tiny(&bed.dir, "--notify --trigger-on-traffic"));
    let err = failed_restart(&bed.b.cli(&["restart"]));
    assert!(err.contains("generation 2 missed its watchdog on probation"), "{err}");
    assert!(err.contains("(handed back to the old generation)"), "{err}");
    let s = bed.b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    assert!(gen_of(&s, 1).steered, "{s:?}");
    assert_eq!((s.restarts, s.crash_restarts), (0, 0), "{s:?}");
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers after the hand-back: {:?}", l.progress());
    }
    let reports = finish("watchdog trigger on probation", loads);
    let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
    eprintln!(
        "watchdog trigger on probation: {failed} failed requests under load, answered by {:?}",
        answered_by(&reports)
    );
    assert!(answered_by(&reports).contains_key("1"));
    assert!(bed.b.log().contains("generation 2 failed; traffic handed back to generation 1"), "{}", bed.b.log_tail());
}
