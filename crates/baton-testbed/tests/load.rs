//! The load generator against real sockets: tiny misbehaving servers (one
//! per failure kind) and the real reference server `baton-httpd`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_testbed::load::{FailureKind, Load, LoadConfig, LoadError, LoadReport, Mode, Outcome};
use baton_testbed::{cargo_bin, free_loopback_port, poll_until, unique_temp_dir};

/// What a test server does with one connection.
type Handler = fn(TcpStream);

/// A server on 127.0.0.1 handling each connection on its own thread;
/// stopped (accept loop ended) on drop.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(handler: Handler) -> Server {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || handler(conn));
                }
            }
        });
        Server { addr, stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head; false at EOF or error.
fn read_request(conn: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    assert!(head.starts_with(b"GET /"), "{}", String::from_utf8_lossy(&head));
    assert!(head.windows(6).any(|w| w == b"Host: "), "no Host header");
    true
}

/// Keep-alive server answering 200 with `baton-generation: 7`.
fn ok_gen7(mut conn: TcpStream) {
    while read_request(&mut conn) {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBaton-Generation: 7\r\n\r\nok";
        if conn.write_all(r).is_err() {
            return;
        }
    }
}

/// Keep-alive server answering chunked 200s with only `baton-pid: 99`.
fn ok_chunked_pid(mut conn: TcpStream) {
    while read_request(&mut conn) {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nbaton-pid: 99\r\n\r\n\
                  5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        if conn.write_all(r).is_err() {
            return;
        }
    }
}

fn unavailable(mut conn: TcpStream) {
    while read_request(&mut conn) {
        let r = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        if conn.write_all(r).is_err() {
            return;
        }
    }
}

/// Reads the request (so the receive queue is empty and close sends a FIN,
/// not a RST) and closes without answering.
fn close_after_request(mut conn: TcpStream) {
    read_request(&mut conn);
}

/// Reads the request and resets the connection (SO_LINGER 0).
fn reset_after_request(mut conn: TcpStream) {
    read_request(&mut conn);
    rustix::net::sockopt::set_socket_linger(conn.as_fd(), Some(Duration::ZERO)).unwrap();
}

/// Reads the request and never answers (until the client gives up).
fn never_answer(mut conn: TcpStream) {
    read_request(&mut conn);
    let _ = conn.read(&mut [0u8; 1]);
}

/// Answers 3 requests, then reads a 4th and closes without answering.
fn close_on_fourth(mut conn: TcpStream) {
    for _ in 0..3 {
        if !read_request(&mut conn) {
            return;
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    }
    read_request(&mut conn);
}

/// Answers 3 requests, then closes the (now idle) connection at once, without
/// announcing it with `Connection: close`.
fn close_idle_after_third(mut conn: TcpStream) {
    for _ in 0..3 {
        if !read_request(&mut conn) {
            return;
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    }
    let _ = conn.shutdown(Shutdown::Both);
}

fn run(config: LoadConfig) -> LoadReport {
    let load = Load::start(config).unwrap();
    poll_until("the load to finish", Duration::from_secs(20), || load.is_finished().then_some(())).unwrap();
    load.stop()
}

fn config(addr: SocketAddr) -> LoadConfig {
    LoadConfig::new(addr).max_duration(Duration::from_secs(20)).request_timeout(Duration::from_secs(5))
}

/// `requests == ok + failed` and the samples agree with the counters.
fn check_consistent(r: &LoadReport) {
    assert_eq!(r.requests, r.ok + r.failed(), "{}", r.to_json());
    assert_eq!(r.samples.len() as u64 + r.samples_dropped, r.requests);
    assert_eq!(r.histogram.len(), r.ok);
    assert_eq!(r.per_generation.values().sum::<u64>(), r.ok);
    let ok_samples = r.samples.iter().filter(|s| matches!(s.outcome, Outcome::Ok { .. })).count() as u64;
    if r.samples_dropped == 0 {
        assert_eq!(ok_samples, r.ok);
    }
}

#[test]
fn successes_are_counted_per_generation_in_every_mode() {
    let server = Server::start(ok_gen7);
    for mode in [Mode::NewConnection, Mode::KeepAlive, Mode::Idle { interval: Duration::from_millis(5) }] {
        let r = run(config(server.addr).mode(mode.clone()).connections(3).max_requests(Some(60)));
        check_consistent(&r);
        assert_eq!((r.requests, r.ok, r.failed()), (60, 60, 0), "{mode:?}: {}", r.to_json());
        assert_eq!(r.per_generation.get("7"), Some(&60), "{mode:?}");
        assert_eq!(r.server_closed_connections, 0, "{mode:?}");
        assert!(r.samples.iter().all(|s| s.outcome == Outcome::Ok { generation: Some("7".into()) }));
    }
}

#[test]
fn chunked_responses_and_pid_fallback() {
    let server = Server::start(ok_chunked_pid);
    let r = run(config(server.addr).connections(2).max_requests(Some(20)));
    check_consistent(&r);
    assert_eq!((r.ok, r.failed()), (20, 0), "{}", r.to_json());
    assert_eq!(r.per_generation.get("pid:99"), Some(&20));
    assert!(r.samples.iter().all(|s| s.outcome == Outcome::Ok { generation: None }));
}

#[test]
fn non_2xx_is_bad_status() {
    let server = Server::start(unavailable);
    let r = run(config(server.addr).connections(2).max_requests(Some(10)));
    check_consistent(&r);
    assert_eq!((r.ok, r.failures_of(FailureKind::BadStatus)), (0, 10), "{}", r.to_json());
    assert_eq!(r.bad_statuses.get(&503), Some(&10));
}

#[test]
fn eof_before_response_is_server_closed() {
    let server = Server::start(close_after_request);
    for mode in [Mode::NewConnection, Mode::KeepAlive] {
        let r = run(config(server.addr).mode(mode.clone()).connections(2).max_requests(Some(10)));
        check_consistent(&r);
        assert_eq!(r.failures_of(FailureKind::ServerClosed), 10, "{mode:?}: {}", r.to_json());
        // Fresh connections only: none had served a response yet.
        assert_eq!(r.server_closed_connections, 0, "{mode:?}");
    }
}

#[test]
fn rst_is_reset() {
    let server = Server::start(reset_after_request);
    let r = run(config(server.addr).mode(Mode::NewConnection).connections(2).max_requests(Some(10)));
    check_consistent(&r);
    assert_eq!(r.failures_of(FailureKind::Reset), 10, "{}", r.to_json());
}

#[test]
fn no_answer_is_timeout() {
    let server = Server::start(never_answer);
    let timeout = Duration::from_millis(200);
    let r = run(config(server.addr).connections(2).max_requests(Some(4)).request_timeout(timeout));
    check_consistent(&r);
    assert_eq!(r.failures_of(FailureKind::Timeout), 4, "{}", r.to_json());
    assert!(r.samples.iter().all(|s| s.latency_us >= 200_000), "a timeout fired early");
}

#[test]
fn nothing_listening_is_refused_without_spinning() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let load = Load::start(config(addr).connections(2).max_duration(Duration::from_millis(300))).unwrap();
    poll_until("the load to end", Duration::from_secs(20), || load.is_finished().then_some(())).unwrap();
    let r = load.stop();
    check_consistent(&r);
    assert!(r.requests > 0);
    assert_eq!(r.failures_of(FailureKind::Refused), r.requests, "{}", r.to_json());
    // At most one attempt per worker per millisecond (plus slack for the
    // last one): the 1 ms pause is a lower bound, so this cannot flake.
    assert!(r.requests <= 2 * 300 + 2, "busy loop: {} attempts in 300 ms", r.requests);
}

#[test]
fn server_closing_after_a_request_was_sent_is_a_counted_loss() {
    let server = Server::start(close_on_fourth);
    // One connection: 3 ok, then the 4th request meets EOF, reconnect...
    let r = run(config(server.addr).connections(1).max_requests(Some(20)));
    check_consistent(&r);
    assert_eq!((r.ok, r.failures_of(FailureKind::ServerClosed)), (15, 5), "{}", r.to_json());
    assert_eq!(r.server_closed_connections, 5);
}

#[test]
fn server_closing_idle_connections_is_counted_without_failures() {
    let server = Server::start(close_idle_after_third);
    let mode = Mode::Idle { interval: Duration::from_millis(100) };
    let r = run(config(server.addr).mode(mode).connections(2).max_requests(Some(12)));
    check_consistent(&r);
    assert_eq!((r.ok, r.failed()), (12, 0), "{}", r.to_json());
    // Each connection is closed after its 3rd response; the 12 requests use
    // at least 4 connections, of which at least the first 2 were closed
    // while the load still ran.
    assert!(r.server_closed_connections >= 2, "{}", r.to_json());
}

#[test]
fn rate_is_paced() {
    let server = Server::start(ok_gen7);
    let load =
        Load::start(config(server.addr).connections(4).rate(Some(200)).max_duration(Duration::from_secs(1))).unwrap();
    poll_until("the load to end", Duration::from_secs(20), || load.is_finished().then_some(())).unwrap();
    let r = load.stop();
    check_consistent(&r);
    assert_eq!(r.failed(), 0, "{}", r.to_json());
    assert!((100..=300).contains(&r.requests), "{} requests at 200/s for 1 s", r.requests);
    // Scheduled times are spread, not bunched: the first half second holds
    // roughly half of them.
    let half = r.window(r.started, r.started + Duration::from_millis(500));
    assert!((50..=150).contains(&half.requests), "{half:?}");
}

#[test]
fn max_requests_and_max_samples_are_exact() {
    let server = Server::start(ok_gen7);
    let r = run(config(server.addr).connections(8).max_requests(Some(37)).max_samples(5));
    check_consistent(&r);
    assert_eq!((r.requests, r.ok), (37, 37));
    assert_eq!((r.samples.len(), r.samples_dropped), (5, 32));
}

#[test]
fn wait_for_ok_progress_and_stop() {
    let server = Server::start(ok_gen7);
    let load = Load::start(config(server.addr).connections(2)).unwrap();
    assert!(load.wait_for_ok(50, Duration::from_secs(10)));
    let p = load.progress();
    assert!(p.ok >= 50 && p.failed == 0, "{p:?}");
    let r = load.stop();
    check_consistent(&r);
    assert!(r.ok >= p.ok);
    assert!(r.elapsed < Duration::from_secs(20));
    let all = r.window(r.started, Instant::now());
    assert_eq!((all.requests, all.ok, all.failed), (r.requests, r.ok, 0));
    assert!(all.p50_us <= all.p99_us && all.p99_us <= all.max_us);
    let json = r.to_json();
    assert_eq!(json["ok"], r.ok);
    assert_eq!(json["per_generation"]["7"], r.ok);
    // A finished load does not make waiters sit out their timeout.
    let done = Load::start(config(server.addr).max_requests(Some(3))).unwrap();
    let t = Instant::now();
    assert!(!done.wait_for_ok(1_000_000, Duration::from_secs(30)));
    assert!(t.elapsed() < Duration::from_secs(20));
    drop(done);
}

#[test]
fn dropping_a_running_load_stops_it() {
    let server = Server::start(never_answer);
    let load = Load::start(config(server.addr).connections(4).request_timeout(Duration::from_secs(60))).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(load);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn invalid_configs_are_rejected() {
    let remote = SocketAddr::from(([10, 0, 0, 1], 80));
    let err = Load::start(LoadConfig::new(remote)).unwrap_err();
    assert!(matches!(err, LoadError::NotLoopback { addr } if addr == remote), "{err}");
    assert!(err.to_string().contains("10.0.0.1:80"), "{err}");
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    let cases = [
        LoadConfig::new(local).path("healthz"),
        LoadConfig::new(local).path("/a b"),
        LoadConfig::new(local).connections(0),
        LoadConfig::new(local).rate(Some(0)),
        LoadConfig::new(local).mode(Mode::Idle { interval: Duration::ZERO }),
        LoadConfig::new(local).request_timeout(Duration::ZERO),
    ];
    for c in cases {
        let err = Load::start(c.clone()).unwrap_err();
        assert!(!matches!(err, LoadError::NotLoopback { .. }), "{c:?}: {err}");
    }
    // IPv6 loopback is fine.
    assert!(Load::start(LoadConfig::new("[::1]:1".parse().unwrap()).max_requests(Some(0))).is_ok());
}

/// The reference server, on a free port, killed on drop.
struct Httpd(Child);

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reference_server_sees_only_successes() {
    let bin = cargo_bin("baton-httpd", "baton-httpd");
    let root = unique_temp_dir("baton-load", "httpd-root");
    std::fs::write(root.join("index.html"), "hello\n").unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let child = Command::new(bin)
        .args(["--listen", &addr.to_string(), "--root"])
        .arg(&root)
        .args(["--handoff=false", "--threads", "2"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _httpd = Httpd(child);
    poll_until("baton-httpd to listen", Duration::from_secs(20), || TcpStream::connect(addr).ok()).unwrap();
    for mode in [Mode::NewConnection, Mode::KeepAlive, Mode::Idle { interval: Duration::from_millis(10) }] {
        for path in ["/healthz", "/index.html"] {
            let r = run(config(addr).path(path).mode(mode.clone()).connections(4).max_requests(Some(100)));
            check_consistent(&r);
            assert_eq!((r.ok, r.failed()), (100, 0), "{mode:?} {path}: {}", r.to_json());
            assert!(!r.per_generation.is_empty());
            assert!(!r.per_generation.contains_key("unknown"), "{mode:?}: {:?}", r.per_generation);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
