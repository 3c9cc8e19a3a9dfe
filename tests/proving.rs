//! Proving and steering, at the supervisor's level, with real processes
//! and real sockets under load ([`baton_testbed::load`]): a candidate gets
//! no real traffic during its quiet period, takes it all at the flip,
//! and hands it back when it fails on probation (tests/probation.rs); bad candidates (exiting
//! while proven, exiting on probation, failing their HTTP probe, never
//! accepting) are refused with the reason while the old generation serves;
//! apps without `READY=1` become ready by probe or by timer; `baton
//! upgrade` keeps the steering; `--steering off` and unix sockets share
//! the sockets; Baton's fds come back to their count.
//!
//! Every generation runs what `DIR/cmd` says at its spawn (`sh -c 'exec
//! $(cat DIR/cmd)'`), so a test chooses the next generation's program and
//! flags by rewriting that file before `baton restart`. Apps: `baton-httpd`
//! (answers with its generation), and `proving/tiny.py` (a python3 server
//! without `sd_notify` unless asked, answering with its pid). No timing
//! asserts: phases are observed in `baton status`, and the lengths chosen
//! only make the observation possible on a slow machine. No root needed.

use std::io::{Read, Write};
use std::process::Output;
use std::time::Duration;

use baton_testbed::baton::{Baton, WAIT};
use baton_testbed::expect_success as ok;
use baton_testbed::load::Mode;
use baton_testbed::poll_until;

#[path = "proving/bed.rs"]
mod bed;

use bed::*;

/// Before the flip every answer under load comes from the old generation
/// (the candidate's probes go to its own listener); once the restart has
/// answered, new connections reach the new one only. Nothing fails.
#[test]
fn the_candidate_gets_no_traffic_before_the_flip_and_all_new_connections_after() {
    // A quiet period long enough to stop a load inside it on a slow
    // machine (checked below, not assumed).
    let bed =
        Bed::start("quiet", &["--quiet-period", "8s", "--probation", "1s", "--health-http", "/probe.txt"], None, |d| {
            httpd(d, "www", "")
        });
    let before = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &before {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let restart = bed.restart_in_background();
    bed.wait_gen("generation 2 in its quiet period", 2, |g| {
        g.proving.as_deref().is_some_and(|p| p.contains("3 of 3 probes passed") && p.contains("quiet period"))
    });
    // Traffic during the quiet period, then the load ends inside it.
    for (name, l) in &before {
        assert!(l.wait_for_ok(50, WAIT), "{name} stalled in the quiet period: {:?}", l.progress());
    }
    let quiet = finish("quiet period", before);
    let s = bed.b.status();
    let (g1, g2) = (gen_of(&s, 1), gen_of(&s, 2));
    assert!(
        g2.state == "proving" && !g2.steered && g1.steered,
        "the quiet period ended before the load did (too slow a machine for this test?): {s:?}"
    );
    assert_nothing_failed(&quiet);
    let by = answered_by(&quiet);
    eprintln!("quiet period: answered by generation {by:?}");
    assert_eq!(by.get("2"), None, "the candidate answered real traffic before the flip: {by:?}");
    assert!(by.get("1").is_some_and(|n| *n >= 100), "{by:?}");

    // Across the flip and the probation, and after.
    let across = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    let out = restart.join().unwrap();
    assert!(ok(&out).contains("generation 2"), "{out:?}");
    let after = bed.load(Mode::NewConnection, 2, 100);
    assert!(after.wait_for_ok(100, WAIT), "no answers after the restart: {:?}", after.progress());
    for (name, l) in &across {
        assert!(l.wait_for_ok(20, WAIT), "{name} stalled after the restart: {:?}", l.progress());
    }
    let across = finish("across the flip", across);
    assert_nothing_failed(&across);
    eprintln!("across the flip: answered by generation {:?}", answered_by(&across));
    let after = finish("after the restart", vec![("new-connection", after)]);
    assert_nothing_failed(&after);
    let by = answered_by(&after);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["2"], "new connections after the restart: {by:?}");
}

/// A candidate that is ready and exits during its quiet period (as
/// gunicorn's arbiter does when its workers cannot boot) is refused before
/// it got any traffic: nothing fails, the old generation serves
/// throughout, no crash restart.
#[test]
fn a_candidate_exiting_in_its_quiet_period_costs_nothing() {
    let bed = Bed::start("quiet-exit", &["--quiet-period", "10s"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let before = bed.b.status();
    bed.next(httpd(&bed.dir, "www", "--fail-after-ready 300ms"));
    let err = failed_restart(&bed.b.cli(&["restart"]));
    assert!(err.contains("generation 2 exited with status 1 during its quiet period, before it took over"), "{err}");
    assert!(err.contains("generation 1 keeps serving"), "{err}");
    bed.next(httpd(&bed.dir, "www", ""));
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name} stalled after the refusal: {:?}", l.progress());
    }
    let reports = finish("quiet-period exit", loads);
    assert_nothing_failed(&reports);
    let by = answered_by(&reports);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["1"], "answered by {by:?}");
    let s = bed.wait_gen("generation 2 gone", 1, |g| g.state == "active" && g.steered);
    assert_eq!(s.generations.len(), 1, "{s:?}");
    assert_eq!((s.restarts, s.crash_restarts), (before.restarts, before.crash_restarts));
    assert!(s.last_failure.as_deref().unwrap_or("").contains("before it took over"), "{s:?}");
}

/// `--health-http`: a candidate answering 500 on its probe, and one whose
/// root has no such path (404), are refused before any traffic: nothing
/// fails and nothing non-2xx reaches the load.
#[test]
fn a_candidate_failing_its_http_probe_is_refused_with_no_impact() {
    let bed = Bed::start("http-probe", &["--health-http", "/probe.txt"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    bed.next(tiny(&bed.dir, "--notify --status 500"));
    let err = failed_restart(&bed.b.cli(&["restart"]));
    assert!(err.contains("generation 2 probe failed during its quiet period, before it took over"), "{err}");
    assert!(err.contains("500"), "{err}");
    bed.next(httpd(&bed.dir, "www-noprobe", ""));
    let err = failed_restart(&bed.b.cli(&["restart"]));
    assert!(err.contains("generation 3 probe failed during its quiet period, before it took over"), "{err}");
    assert!(err.contains("404"), "{err}");
    bed.next(httpd(&bed.dir, "www", ""));
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name} stalled: {:?}", l.progress());
    }
    let reports = finish("http probe failures", loads);
    assert_nothing_failed(&reports);
    assert_eq!(answered_by(&reports).keys().collect::<Vec<_>>(), ["1"]);
    // The good one passes the same probe.
    assert_eq!(bed.b.restart(), 4);
}

/// Apps without `sd_notify`: `--ready probe` (the first passing probe is
/// READY) and `--ready after:500ms`; restarts under load lose nothing. An
/// app that never accepts never passes an HTTP probe: refused with the
/// reason.
#[test]
fn apps_without_ready_become_ready_by_probe_or_timer() {
    for (ready, extra) in [("probe", &["--health-http", "/", "--ready-timeout", "5s"][..]), ("after:500ms", &[][..])] {
        let args = [&["--ready", ready, "--quiet-period", "500ms", "--probation", "500ms"][..], extra].concat();
        let bed = Bed::start(&format!("ready-{}", ready.replace(':', "-")), &args, None, |d| tiny(d, ""));
        let load = bed.load(Mode::NewConnection, 4, 100);
        assert!(load.wait_for_ok(50, WAIT), "{ready}: no answers: {:?}", load.progress());
        let mut last = 0;
        for n in 2..=3 {
            assert_eq!(bed.b.restart(), n, "{ready}");
            last = bed.b.generation_pid(n);
            assert!(load.wait_for_ok(30, WAIT), "{ready}: stalled after restart {n}: {:?}", load.progress());
        }
        let reports = finish(&format!("--ready {ready}"), vec![("new-connection", load)]);
        assert_nothing_failed(&reports);
        let by = answered_by(&reports);
        assert!(by.contains_key(&format!("pid:{last}")), "generation 3 (pid {last}) answered nothing: {by:?}");

        if ready == "probe" {
            bed.next(tiny(&bed.dir, "--no-accept"));
            let err = failed_restart(&bed.b.cli(&["restart"]));
            assert!(err.contains("generation 4 no passing probe within"), "{err}");
        }
    }
}

/// `baton status --json` names the phase, the slots and the steering:
/// during the quiet period the old generation is steered and the candidate
/// is not; on probation the other way round, on the other slot.
#[test]
fn status_json_shows_proving_slot_and_steered() {
    let bed = Bed::start("status", &["--quiet-period", "6s", "--probation", "6s", "--health-tcp"], None, |d| {
        httpd(d, "www", "")
    });
    let json = |b: &Baton| -> serde_json::Value { serde_json::from_str(&ok(&b.cli(&["status", "--json"]))).unwrap() };
    let j = json(&bed.b);
    let g1 = &j["generations"][0];
    assert_eq!(g1["steered"], true, "{j}");
    assert!(g1.get("proving").is_none(), "nothing to prove for the serving generation: {j}");
    let slot1 = g1["slot"].as_str().unwrap_or_else(|| panic!("no slot: {j}")).to_owned();
    assert!(["a", "b"].contains(&slot1.as_str()), "{j}");

    let restart = bed.restart_in_background();
    let phase = |want: &str| {
        poll_until(want, WAIT, || {
            let j = json(&bed.b);
            let g2 = j["generations"].as_array()?.iter().find(|g| g["generation"] == 2)?.clone();
            g2["proving"].as_str()?.contains(want).then_some((j, g2))
        })
        .unwrap_or_else(|e| panic!("{e}: {}", bed.b.log_tail()))
    };
    let (j, g2) = phase("quiet period");
    eprintln!("quiet period: {j}");
    assert!(g2["proving"].as_str().unwrap().contains("probes passed"), "{j}");
    assert_eq!(g2.get("steered"), None, "the candidate is not steered to in its quiet period: {j}");
    assert_eq!(j["generations"][0]["steered"], true, "{j}");
    let slot2 = g2["slot"].as_str().unwrap_or_else(|| panic!("no slot: {j}")).to_owned();
    assert_ne!(slot1, slot2, "{j}");

    let (j, g2) = phase("probation");
    eprintln!("probation: {j}");
    assert_eq!(g2["state"], "probation", "{j}");
    assert_eq!(g2["steered"], true, "{j}");
    assert_eq!(g2["slot"], slot2.as_str(), "{j}");
    let g1 = &j["generations"][0];
    assert_eq!((g1["generation"].as_u64(), g1.get("steered")), (Some(1), None), "{j}");
    assert_eq!(g1["state"], "active", "the old generation is unsignalled on probation: {j}");

    // And the text status says the same.
    let text = ok(&bed.b.cli(&["status"]));
    assert!(text.contains("probation"), "{text}");
    ok(&restart.join().unwrap());
    let j = json(&bed.b);
    let g2 = j["generations"].as_array().unwrap().iter().find(|g| g["generation"] == 2).unwrap();
    assert_eq!((g2["state"].as_str(), &g2["steered"]), (Some("active"), &serde_json::Value::Bool(true)), "{j}");
    assert!(g2.get("proving").is_none(), "{j}");
}

/// Restart requests that arrive while a candidate is proven or on
/// probation are queued, not refused: each caller gets an answer, the
/// first from the candidate, the later ones from the next generation,
/// which they share. Nothing fails under load meanwhile.
#[test]
fn restarts_asked_during_proving_and_probation_are_answered_after() {
    let bed = Bed::start("queued", &["--quiet-period", "3s", "--probation", "3s"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let first = bed.restart_in_background();
    bed.wait_gen("generation 2 in its quiet period", 2, |g| g.state == "proving");
    let during_quiet = bed.restart_in_background();
    let s = bed.wait_gen("generation 2 on probation", 2, |g| g.state == "probation");
    assert!(s.generations.iter().all(|g| g.generation <= 2), "a restart was started early: {s:?}");
    let during_probation = bed.restart_in_background();
    let answer = |h: std::thread::JoinHandle<Output>| ok(&h.join().unwrap());
    let first = answer(first);
    assert!(first.starts_with("generation 2 "), "{first}");
    for (when, out) in [("quiet period", answer(during_quiet)), ("probation", answer(during_probation))] {
        assert!(out.starts_with("generation 3 "), "the restart asked during the {when}: {out}");
    }
    let s = bed.wait_gen("generation 3 active", 3, |g| g.state == "active" && g.steered);
    assert_eq!(s.restarts, 2, "{s:?}");
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers after the restarts: {:?}", l.progress());
    }
    let reports = finish("restarts queued behind proving", loads);
    assert_nothing_failed(&reports);
    assert!(answered_by(&reports).contains_key("3"));
}

/// `baton upgrade` with steering active keeps it: a restart afterwards
/// still flips to the other slot and loses nothing under load.
#[test]
fn steering_survives_baton_upgrade() {
    let bed =
        Bed::start("upgrade", &["--quiet-period", "500ms", "--probation", "500ms"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    let s = bed.b.status();
    let slot1 = gen_of(&s, 1).slot.clone().unwrap_or_else(|| panic!("not steered: {s:?}"));
    let out = ok(&bed.b.cli(&["upgrade"]));
    assert!(out.contains("upgraded"), "{out}");
    let s = bed.b.status();
    assert_eq!(s.upgrades, 1, "{s:?}");
    let g1 = gen_of(&s, 1);
    assert_eq!((g1.slot.as_deref(), g1.steered), (Some(slot1.as_str()), true), "{s:?}");
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name} stalled after the upgrade: {:?}", l.progress());
    }
    assert_eq!(bed.b.restart(), 2);
    let s = bed.b.status();
    let g2 = gen_of(&s, 2);
    assert!(g2.steered && g2.slot.is_some() && g2.slot.as_deref() != Some(slot1.as_str()), "{s:?}");
    let after = bed.load(Mode::NewConnection, 2, 100);
    assert!(after.wait_for_ok(100, WAIT), "no answers after the restart: {:?}", after.progress());
    for (name, l) in &loads {
        assert!(l.wait_for_ok(20, WAIT), "{name} stalled after the restart: {:?}", l.progress());
    }
    let reports = finish("upgrade then restart", loads);
    assert_nothing_failed(&reports);
    let after = finish("after upgrade and restart", vec![("new-connection", after)]);
    assert_nothing_failed(&after);
    assert_eq!(answered_by(&after).keys().collect::<Vec<_>>(), ["2"]);
}

/// `--steering off` (TCP, under load) and a unix socket (steering cannot
/// apply): restarts work on the shared socket, and status shows no slot
/// and nothing steered.
#[test]
fn shared_accept_without_steering_still_restarts() {
    let bed = Bed::start("steering-off", &["--steering", "off"], None, |d| httpd(d, "www", ""));
    let loads = vec![
        ("keep-alive", bed.load(Mode::KeepAlive, 4, 200)),
        ("new-connection", bed.load(Mode::NewConnection, 4, 100)),
    ];
    for (name, l) in &loads {
        assert!(l.wait_for_ok(50, WAIT), "{name}: no answers: {:?}", l.progress());
    }
    for n in 2..=3 {
        assert_eq!(bed.b.restart(), n);
        let s = bed.b.status();
        assert!(s.generations.iter().all(|g| g.slot.is_none() && !g.steered), "{s:?}");
        for (name, l) in &loads {
            assert!(l.wait_for_ok(30, WAIT), "{name} stalled after restart {n}: {:?}", l.progress());
        }
    }
    let reports = finish("--steering off", loads);
    assert_nothing_failed(&reports);
    assert!(answered_by(&reports).contains_key("3"));

    // A unix socket, steering left on auto: shared, and said so.
    let path = scratch("unix-sock").join("app.sock");
    let listen = format!("http=unix:{}", path.display());
    let bed = Bed::start("unix", &["--ready", "after:300ms"], Some(&listen), |d| tiny(d, ""));
    let ask = || -> String {
        let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
        out.lines().find_map(|l| l.strip_prefix("baton-pid: ")).unwrap().trim().to_owned()
    };
    assert_eq!(ask(), bed.b.generation_pid(1).to_string());
    for n in 2..=3 {
        assert_eq!(bed.b.restart(), n);
        let s = bed.b.status();
        assert!(s.generations.iter().all(|g| g.slot.is_none() && !g.steered), "{s:?}");
        // Whichever generation answers (both accept on one socket while the
        // old one drains), every request is answered.
        for _ in 0..20 {
            ask();
        }
    }
    bed.b.wait_status("only generation 3", |s| s.generations.len() == 1);
    assert_eq!(ask(), bed.b.generation_pid(3).to_string());
    let log = bed.b.log();
    assert!(log.contains("is shared by every generation"), "{}", bed.b.log_tail());
}

/// Restarts with steering, probe listeners and built-in probes leave
/// Baton's fd count where it was.
#[test]
fn no_fd_leak_over_20_steered_restarts() {
    let bed =
        Bed::start("fds", &["--quiet-period", "0", "--probation", "0", "--health-http", "/probe.txt"], None, |d| {
            httpd(d, "www", "")
        });
    // Warm up lazily created fds (runtime, logging).
    assert_eq!(bed.b.restart(), 2);
    bed.b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    let before = bed.b.settled_fd_count();
    for n in 3..=22 {
        assert_eq!(bed.b.restart(), n);
    }
    bed.b.wait_status("draining generations gone", |s| s.generations.len() == 1);
    let settled = poll_until("baton's fd count back to its start", Duration::from_secs(10), || {
        (bed.b.fd_count() <= before).then_some(())
    });
    let after = bed.b.fd_count();
    eprintln!("baton fds: {before} before, {after} after 20 steered restarts");
    settled.unwrap_or_else(|e| panic!("{e}: {before} before, {after} after: {:?}", bed.b.fd_targets()));
    let s = bed.b.status();
    assert_eq!(s.restarts, 21);
    assert!(gen_of(&s, 22).steered, "{s:?}");
}

/// Like systemd's two `.socket` units with `ReusePort=yes` (what `baton
/// units` writes): a pair of listeners on one port, bound before Baton
/// starts, and clients connecting before it does, so the kernel spreads
/// them over both sockets. Every one of them is answered by generation 1,
/// with no restart: none waits on the socket of the slot nothing serves.
const ACTIVATE_PY: &str = r#"
import os, socket, sys, time
port = int(os.environ["T_PORT"])
fds = []
for i in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    fds.append(os.dup2(s.detach(), 10 + i))
for i in range(2):
    os.dup2(10 + i, 3 + i)
    os.close(10 + i)
open(os.path.join(os.environ["T_DIR"], "bound"), "w").close()
while not os.path.exists(os.path.join(os.environ["T_DIR"], "go")):
    time.sleep(0.01)
os.environ.update(LISTEN_FDS="2", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http:http")
os.execv(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn connections_made_before_baton_started_are_all_answered() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (dir, builder) = Bed::prepare("activated", &[], |d| httpd(d, "www", ""));
    std::fs::write(dir.join("activate.py"), ACTIVATE_PY).unwrap();
    let python = python3();
    let b = builder
        .no_http_listener()
        .wrapped_in([python.as_str(), dir.join("activate.py").to_str().unwrap()])
        .env("T_PORT", port.to_string())
        .spawn();
    poll_until("the pair bound", WAIT, || dir.join("bound").exists().then_some(())).unwrap();
    let mut early: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            c
        })
        .collect();
    std::fs::write(dir.join("go"), "").unwrap();
    b.wait_active(1);
    let s = b.status();
    assert!(gen_of(&s, 1).steered, "the inherited pair is not steered: {s:?}\n{}", b.log_tail());
    let mut answered = 0;
    for (i, c) in early.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        match c.read_to_string(&mut out) {
            Ok(_) if out.starts_with("HTTP/1.1 200") && out.contains("baton-generation: 1") => answered += 1,
            other => eprintln!("early connection {i}: {other:?} {out:?}"),
        }
    }
    eprintln!("connections made before baton started: {answered} of 40 answered by generation 1");
    assert_eq!(answered, 40, "{}", b.log_tail());
}
