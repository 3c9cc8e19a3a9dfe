//! baton-httpd against hostile and careless clients, on real sockets
//! against the real binary under the mini manager: slow request heads
//! (slowloris), idle keep-alive connections, more connections than the
//! limit, oversized and unterminated heads (memory), running out of file
//! descriptors, redirects that would leave the host, and a drain deadline
//! that Baton's stop timeout would cut short.
//!
//! The deadlines are configured short (`--header-timeout 2s`, ...) so the
//! tests are quick; every wait is a poll with a generous deadline.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton_testbed::poll_until;
use common::client::{HttpConn, raise_nofile};
use common::{Mini, TempDir};

/// Generous bound for anything the server should do within a few seconds.
const SOON: Duration = Duration::from_secs(30);

/// Whether the server closed (or reset) `s`, checked without blocking.
/// Bytes waiting to be read count as open.
fn closed_now(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A field of `/proc/PID/status`, in kB.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// User plus system CPU time of `pid`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// 50 clients send a request head one byte at a time and never finish it.
/// With `--header-timeout 2s` every one is disconnected, while a normal
/// client is served meanwhile, and a keep-alive connection that has sent
/// nothing at all is *not* cut by that deadline (it starts at a request's
/// first byte), so it could still be handed over.
#[test]
fn slow_request_heads_are_cut_at_the_header_deadline() {
    let d = Mini::start(&["--header-timeout", "2s"]);
    let port = d.m.port();
    let mut idle = HttpConn::connect(port).unwrap();
    let opened = Instant::now();

    // Before the first write: no server deadline can start earlier.
    let first_byte = Instant::now();
    let mut slow: Vec<Option<TcpStream>> = (0..50)
        .map(|_| {
            let mut s = connect(port);
            s.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: test\r\nX-Slow: ").unwrap();
            Some(s)
        })
        .collect();
    let mut first_cut: Option<Duration> = None;
    let mut served_meanwhile = false;
    let outcome = poll_until("every slow client is disconnected", SOON, || {
        for slot in &mut slow {
            let Some(s) = slot else { continue };
            // One more header byte, as long as the server keeps the connection.
            if closed_now(s) || s.write_all(b"a").is_err() {
                first_cut.get_or_insert_with(|| first_byte.elapsed());
                *slot = None;
            }
        }
        let open = slow.iter().flatten().count();
        if open > 0 && !served_meanwhile {
            let mut c = HttpConn::connect(port).unwrap();
            let r = c.get("/hello.txt").unwrap();
            assert_eq!(r.status, 200, "a normal client while {open} slow ones are connected: {r:?}");
            served_meanwhile = true;
        }
        (open == 0).then_some(())
    });
    let open = slow.iter().flatten().count();
    assert!(outcome.is_ok(), "{open} of 50 slow clients still connected after {SOON:?}");
    let first_cut = first_cut.unwrap();
    assert!(
        first_cut >= Duration::from_millis(1900),
        "cut {first_cut:?} after the first byte, before the 2 s deadline"
    );

    assert!(opened.elapsed() > Duration::from_secs(2));
    assert!(idle.is_quiet(), "an idle connection (no byte sent) was cut by the header deadline");
    let r = idle.get("/hello.txt").unwrap();
    assert_eq!(r.status, 200, "the idle connection still serves: {r:?}");
}

/// An idle keep-alive connection is closed after `--idle-timeout`; one that
/// keeps sending requests more often than that is not.
#[test]
fn idle_keepalive_connections_are_closed_after_the_idle_timeout() {
    let d = Mini::start(&["--idle-timeout", "3s"]);
    let port = d.m.port();
    let mut idle = HttpConn::connect(port).unwrap();
    assert_eq!(idle.get("/healthz").unwrap().status, 200);
    let mut busy = HttpConn::connect(port).unwrap();
    let started = Instant::now();
    // Seven seconds (more than twice the timeout) of requests 250 ms apart
    // (pacing, not synchronisation): the count restarts at each.
    while started.elapsed() < Duration::from_secs(7) {
        let r = busy.get("/healthz").unwrap_or_else(|e| panic!("busy connection after {:?}: {e}", started.elapsed()));
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(idle.closed_by_server(SOON), "an idle connection stayed open past --idle-timeout 3s");
    assert_eq!(busy.get("/healthz").unwrap().status, 200, "the busy connection is still served");
}

/// A keep-alive connection idle longer than `PARK_AFTER` (1 s) leaves hyper
/// and waits parked for its next request: it is still served on the same
/// connection, pipelined requests included; a request head begun after
/// parking is still cut at `--header-timeout`, counted from its first byte;
/// and a parked connection is still closed at `--idle-timeout`.
#[test]
fn parked_connections_are_served_again_and_keep_their_deadlines() {
    let d = Mini::start(&["--header-timeout", "2s", "--idle-timeout", "4s"]);
    let port = d.m.port();
    let park = baton_httpd::conn::PARK_AFTER + Duration::from_millis(500);

    let mut again = HttpConn::connect(port).unwrap();
    let mut stalls = HttpConn::connect(port).unwrap();
    let mut stays_idle = HttpConn::connect(port).unwrap();
    for c in [&mut again, &mut stalls, &mut stays_idle] {
        assert_eq!(c.get("/hello.txt").unwrap().status, 200);
    }
    let last_response = Instant::now();
    std::thread::sleep(park);

    // Two requests in one write: the parked connection wakes, and hyper
    // answers both in order.
    let mut two = HttpConn::get_request("/hello.txt");
    two.extend(HttpConn::get_request("/healthz"));
    again.send(&two).unwrap();
    let first = again.read_response(false).unwrap();
    let second = again.read_response(false).unwrap();
    assert_eq!((first.status, second.status), (200, 200), "{first:?} {second:?}");
    assert_eq!(first.body_text(), "hello, world\n");
    // Parked again, served again.
    std::thread::sleep(park);
    assert_eq!(again.get("/healthz").unwrap().status, 200);

    let first_byte = Instant::now();
    stalls.send(b"GET /hello.txt HTTP/1.1\r\nHost").unwrap();
    assert!(stalls.closed_by_server(SOON), "a head begun after parking was never cut");
    let cut = first_byte.elapsed();
    assert!(cut >= Duration::from_millis(1900), "cut {cut:?} after its first byte, before the 2 s deadline");

    assert!(stays_idle.closed_by_server(SOON), "a parked connection stayed open past --idle-timeout");
    let idle = last_response.elapsed();
    assert!(idle >= Duration::from_millis(3900), "closed {idle:?} after its last response, before 4 s");
}

/// Beyond `--max-connections`, a new connection is answered 503 with
/// `Retry-After` and `Connection: close` and closed, rather than left
/// waiting; those under the limit keep being served, and once one closes a
/// new client is served again.
#[test]
fn connections_over_the_limit_get_503_and_are_closed() {
    let d = Mini::start(&["--max-connections", "8"]);
    let port = d.m.port();
    let mut admitted: Vec<HttpConn> = (0..8)
        .map(|_| {
            let mut c = HttpConn::connect(port).unwrap();
            assert_eq!(c.get("/healthz").unwrap().status, 200);
            c
        })
        .collect();
    for _ in 0..3 {
        let mut extra = HttpConn::connect(port).unwrap();
        let r = extra.get("/healthz").unwrap();
        assert_eq!(r.status, 503, "over the limit of 8: {r:?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(extra.closed_by_server(SOON), "the refused connection was left open");
    }
    for c in &mut admitted {
        assert_eq!(c.get("/hello.txt").unwrap().status, 200, "a connection under the limit");
    }
    admitted.pop().unwrap().shutdown();
    poll_until("a new client is served once a connection closed", SOON, || {
        let mut c = HttpConn::connect(port).ok()?;
        (c.get("/healthz").ok()?.status == 200).then_some(())
    })
    .unwrap();
}

/// Memory for request heads is bounded: 200 connections each holding an
/// unterminated head just under the 64 KiB cap stay connected and cost the
/// server at most ~128 KiB each; 200 more each sending a 300 KB head
/// (under hyper's default ~400 KB buffer, which today's server would hold)
/// are answered 431 instead of being buffered.
#[test]
fn request_heads_are_capped_and_memory_stays_bounded() {
    assert!(raise_nofile(4096) >= 1024, "need fds for 400 client sockets");
    let d = Mini::start(&["--header-timeout", "120s"]);
    let port = d.m.port();
    let pid = d.m.pid().unwrap();
    let mut warm = HttpConn::connect(port).unwrap();
    for _ in 0..20 {
        assert_eq!(warm.get("/hello.txt").unwrap().status, 200);
    }
    let base = proc_status_kb(pid, "VmRSS:");

    let mut near_cap = Vec::new();
    let mut head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Fill: ".to_vec();
    head.resize(60 * 1024, b'a');
    for _ in 0..200 {
        let mut s = connect(port);
        s.write_all(&head).unwrap();
        near_cap.push(s);
    }

    let mut big = b"GET / HTTP/1.1\r\nHost: test\r\nX-Fill: ".to_vec();
    big.resize(300_000, b'a');
    let mut oversized: Vec<(TcpStream, usize, Vec<u8>)> = (0..200)
        .map(|_| {
            let s = connect(port);
            s.set_nonblocking(true).unwrap();
            (s, 0, Vec::new())
        })
        .collect();
    // Write and read without blocking, round-robin, until each has its answer.
    let answered = poll_until("every oversized head is answered", Duration::from_secs(60), || {
        for (s, sent, got) in &mut oversized {
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            if *sent < big.len() {
                match s.write(&big[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => *sent = big.len(), // closed under us: read what came
                }
            }
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {}
            }
        }
        oversized.iter().all(|(_, _, got)| got.windows(4).any(|w| w == b"\r\n\r\n")).then_some(())
    });
    let unanswered = oversized.iter().filter(|(_, _, got)| got.is_empty()).count();
    assert!(answered.is_ok(), "{unanswered} of 200 clients sending a 300 KB head got no answer");
    for (_, _, got) in &oversized {
        let text = String::from_utf8_lossy(got);
        assert!(text.starts_with("HTTP/1.1 431 "), "an oversized head: {text:?}");
    }

    for s in &near_cap {
        assert!(!closed_now(s), "a head under the cap was refused");
    }
    let grown_kib = proc_status_kb(pid, "VmRSS:").saturating_sub(base);
    // 200 heads under the cap hold at most ~128 KiB of buffer each (~25 MiB);
    // twice that as the bound. Without the cap the 300 KB heads alone would
    // need 60-120 MiB more.
    let bound_kib = 200 * 256;
    assert!(grown_kib < bound_kib, "server RSS grew by {grown_kib} KiB (bound {bound_kib} KiB)");
    eprintln!("RSS {base} KiB at start, grew by {grown_kib} KiB");
    assert_eq!(warm.get("/hello.txt").unwrap().status, 200, "still serving");
}

/// At the fd limit, the server pauses accepting instead of retrying every
/// 100 ms, says so in one log line rather than ten a second, does not spin,
/// keeps serving the connections it has, and serves new ones again once
/// fds are free.
#[test]
fn running_out_of_fds_is_paced_and_logged_rarely() {
    assert!(raise_nofile(4096) >= 1024, "need fds for the client sockets");
    let dir = TempDir::new("emfile");
    let log = dir.path().join("stderr.log");
    // A connection limit far above the fd limit: the fds run out first.
    let d = Mini::start_with(&["--max-connections", "1000"], |m| {
        m.set_nofile_limit(64);
        m.set_stderr_file(&log);
    });
    let port = d.m.port();
    let pid = d.m.pid().unwrap();
    let mut keeper = HttpConn::connect(port).unwrap();
    assert_eq!(keeper.get("/healthz").unwrap().status, 200);

    // The kernel completes these in the backlog; the server runs out of
    // fds accepting them.
    let flood: Vec<TcpStream> = (0..100).map(|_| connect(port)).collect();
    poll_until("the server reports running out of fds", SOON, || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains("out of resources"))
    })
    .unwrap();
    let cpu_before = cpu_time(pid);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        let r = keeper.get("/healthz").unwrap();
        assert_eq!(r.status, 200, "an open connection while the fds are exhausted: {r:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("out of resources")).count();
    assert!(lines <= 2, "{lines} 'out of resources' log lines in about 3 s:\n{text}");
    assert!(cpu < Duration::from_millis(1500), "the server used {cpu:?} of CPU in 3 s at the fd limit");

    drop(flood);
    poll_until("a new client is served once fds are free", SOON, || {
        let mut c = HttpConn::connect(port).ok()?;
        (c.get("/healthz").ok()?.status == 200).then_some(())
    })
    .unwrap();
}

/// A directory asked for without its trailing slash redirects to a path on
/// this host: never `//dir/` (a browser reads it as `http://dir/`).
#[test]
fn directory_redirects_stay_on_this_host() {
    let d = Mini::start(&[]);
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    for (path, want) in
        [("/sub", "/sub/"), ("//sub", "/sub/"), ("///sub?q=1", "/sub/?q=1"), ("/./sub", "/sub/"), ("//./sub", "/sub/")]
    {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 301, "{path}: {r:?}");
        let location = r.header("location").unwrap_or_default();
        assert_eq!(location, want, "{path}");
        assert!(!location.starts_with("//") && !location.starts_with("/\\"), "{path} -> {location}");
    }
}

/// The drain deadline baton-httpd uses by default is shorter than the stop
/// timeout Baton gives a generation by default, with room to hand the last
/// connections over and exit: equal defaults had Baton SIGKILL a generation
/// at the very moment its own deadline passed.
#[test]
fn default_drain_deadline_is_below_batons_stop_timeout() {
    fn default_of(program: &std::path::Path, args: &[&str], flag: &str) -> Duration {
        let out = std::process::Command::new(program).args(args).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let entry = format!("{flag} <");
        let after = &help[help.find(&entry).unwrap_or_else(|| panic!("no {entry} in {program:?} help:\n{help}"))..];
        let value = after
            .split("[default: ")
            .nth(1)
            .and_then(|v| v.split(']').next())
            .unwrap_or_else(|| panic!("no default for {flag}:\n{after}"));
        baton_httpd::config::parse_duration(value).unwrap()
    }
    let baton = common::baton::baton_bin();
    let stop = default_of(&baton, &["run", "--help"], "--stop-timeout");
    let drain = default_of(std::path::Path::new(common::BIN), &["--help"], "--drain-timeout");
    assert!(
        drain + Duration::from_secs(5) <= stop,
        "baton-httpd --drain-timeout defaults to {drain:?}, Baton's --stop-timeout to {stop:?}: the drain needs \
         at least 5 s less"
    );
}

/// The header deadline and handoff together: with `--header-timeout 1s`, a
/// keep-alive connection idle for longer than that is still handed over to
/// the next generation (its deadline never started), while a client stalled
/// mid-head is cut by that deadline during the drain, so the stop ends
/// long before the 60 s drain deadline instead of waiting for it.
#[test]
fn a_stalled_head_does_not_hold_a_stop_and_idle_connections_are_still_handed_over() {
    let mut d = Mini::start(&["--header-timeout", "1s", "--drain-timeout", "60s"]);
    let port = d.m.port();
    let mut idle = HttpConn::connect(port).unwrap();
    let old_pid = idle.get("/healthz").unwrap().pid();
    let mut never_idle = HttpConn::connect(port).unwrap();
    assert_eq!(never_idle.get("/healthz").unwrap().status, 200);
    // The idle connections outlive the header deadline several times over
    // ("nothing should happen" checks, so plain waits).
    std::thread::sleep(Duration::from_secs(3));
    assert!(idle.is_quiet() && never_idle.is_quiet(), "an idle connection was cut by the header deadline");

    // Stalled mid-head. A first, complete request proves the server has
    // accepted the connection (not left it in the backlog for the next
    // generation).
    let mut stalled = HttpConn::connect(port).unwrap();
    assert_eq!(stalled.get("/healthz").unwrap().status, 200);
    stalled.send(b"GET /hello.txt HTTP/1.1\r\nHost: test\r\nX-Slow: ").unwrap();
    let stop = Instant::now();
    d.m.begin_stop().unwrap();
    let status = d.m.wait_stopped(SOON).unwrap_or_else(|e| panic!("the old generation did not stop: {e}"));
    assert!(status.success(), "{status:?}");
    assert!(stop.elapsed() < SOON, "the stop took {:?}", stop.elapsed());
    d.m.start(common::scenarios::WAIT).unwrap();
    for c in [&mut idle, &mut never_idle] {
        let r = c.get("/healthz").unwrap();
        assert_eq!(r.status, 200);
        assert_ne!(r.pid(), old_pid, "the idle connection was not handed over");
    }
    // Checked once the next generation runs: if the drain began before the
    // old generation read the partial head (a race on a loaded machine),
    // the connection was idle to it and was rightly handed over with those
    // bytes unread, and it is the next generation's header deadline that
    // cuts it. A clean CI run once found it still open after the stop.
    assert!(stalled.closed_by_server(SOON), "the stalled connection was neither cut nor closed");
}

/// Deadlines too long for the clock (a typo'd `--drain-timeout`, say) mean
/// no deadline: the server serves and stops cleanly instead of panicking
/// on an `Instant` overflow when the deadline is computed.
#[test]
fn huge_deadlines_mean_no_deadline_rather_than_a_panic() {
    let huge = "10000000000000000000s";
    let mut d = Mini::start(&["--drain-timeout", huge, "--header-timeout", huge, "--idle-timeout", huge]);
    let mut c = HttpConn::connect(d.m.port()).unwrap();
    assert_eq!(c.get("/hello.txt").unwrap().status, 200);
    let status = d.m.stop(SOON).unwrap();
    assert!(status.success(), "stopping with a huge drain deadline: {status:?}");
}
