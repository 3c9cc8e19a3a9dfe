//! Restart scenarios, written once against [`Deployment`] — "how the
//! service runs and how it is restarted" — and run under each: the mini
//! manager (no root), systemd 252 and 257 (`systemctl restart`), and later
//! `baton restart`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::{HttpConn, HttpResponse};

/// Generous: the machine is a noisy 2-core box.
pub const WAIT: Duration = Duration::from_secs(60);

/// Size of the file whose response is kept in flight: far more than the
/// loopback socket buffers hold, so the server cannot finish writing it
/// before the client reads.
pub const BIG_LEN: usize = 64 << 20;

/// How the service is run and restarted.
pub trait Deployment {
    /// For messages: which manager and version.
    fn describe(&self) -> String;
    /// Where the service listens (the manager owns the socket).
    fn port(&self) -> u16;
    /// Restarts, returning once the new generation is ready.
    fn restart(&mut self);
    /// Starts a restart and returns at once; the old generation is being
    /// stopped.
    fn begin_restart(&mut self);
    /// Waits until the service's `STATUS=` satisfies `pred`.
    fn wait_status(&mut self, what: &str, pred: &dyn Fn(&str) -> bool);
    /// Waits until a generation other than `old_pid` is ready.
    fn finish_restart(&mut self, old_pid: u32);
    /// Replaces the extra command-line arguments used from the next start on.
    fn set_extra_args(&mut self, args: &[&str]);
}

/// A root directory with the files the scenarios ask for.
pub fn make_root(dir: &Path) -> PathBuf {
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>baton</h1>\n").unwrap();
    std::fs::write(root.join("hello.txt"), "hello, world\n").unwrap();
    std::fs::write(root.join("sub/data.json"), "{\"a\":1}\n").unwrap();
    let mut big = std::fs::File::create(root.join("big.bin")).unwrap();
    // A whole number of periods, so every block starts the pattern afresh.
    let block: Vec<u8> = (0..251 * 256).map(big_byte).collect();
    let mut written = 0;
    while written < BIG_LEN {
        let n = block.len().min(BIG_LEN - written);
        big.write_all(&block[..n]).unwrap();
        written += n;
    }
    root
}

/// Byte `i` of `big.bin`: a pattern with a period (251) prime to every
/// buffer size, so a lost, repeated or shifted chunk shows.
pub fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn check_big(body: &[u8], offset: usize) {
    for (i, b) in body.iter().enumerate() {
        if *b != big_byte(offset + i) {
            panic!("big.bin corrupted at byte {}", offset + i);
        }
    }
}

fn healthz(c: &mut HttpConn, what: &str) -> HttpResponse {
    let r = c.get("/healthz").unwrap_or_else(|e| panic!("{what}: GET /healthz failed: {e}"));
    assert_eq!(r.status, 200, "{what}: {r:?}");
    r
}

fn well_known(c: &mut HttpConn) -> serde_json::Value {
    let r = c.get("/.well-known/baton").expect("GET /.well-known/baton");
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_slice(&r.body).expect("well-known JSON")
}

fn open(port: u16, n: usize) -> Vec<HttpConn> {
    (0..n).map(|i| HttpConn::connect(port).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect()
}

/// Clients holding `n` keep-alive connections across a restart keep the
/// same TCP connections, get answers from the new pid and see no error;
/// `idle_check` additionally asserts that none was closed or written to
/// while the restart ran.
pub fn keepalive_across_restart(d: &mut dyn Deployment, n: usize) {
    let what = d.describe();
    let mut conns = open(d.port(), n);
    let mut old = None;
    let mut ports = Vec::with_capacity(n);
    for c in &mut conns {
        let r = healthz(c, &what);
        old.get_or_insert((r.pid(), r.generation()));
        assert_eq!(r.pid(), old.unwrap().0, "{what}: one server before the restart");
        ports.push(c.local_port());
    }
    let (old_pid, old_gen) = old.expect("at least one connection");

    d.restart();

    let mut closed = 0;
    for c in &mut conns {
        if !c.is_quiet() {
            closed += 1;
        }
    }
    assert_eq!(closed, 0, "{what}: {closed} of {n} idle connections were closed or written to during the restart");
    let mut new = None;
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.local_port(), ports[i], "same TCP connection");
        let r = healthz(c, &format!("{what}: connection {i} after the restart"));
        let pid = *new.get_or_insert(r.pid());
        assert_ne!(r.pid(), old_pid, "{what}: connection {i} still answered by the old pid");
        assert_eq!(r.pid(), pid, "{what}: one new server");
        assert_eq!(r.generation(), old_gen + 1, "{what}: generation after one restart");
    }
    let doc = well_known(&mut conns[0]);
    assert_eq!(doc["adopted_connections"], n as u64, "{what}: {doc}");
    assert_eq!(doc["pid"], new.unwrap(), "{what}: {doc}");
    // And new connections work too.
    let mut fresh = HttpConn::connect(d.port()).expect("new connection");
    assert_eq!(healthz(&mut fresh, &what).pid(), new.unwrap());
}

/// A response in flight when SIGTERM arrives completes (with the request
/// pipelined behind it), a partial request already read by the server is
/// completed and answered, and then all those connections are handed over.
pub fn in_flight_and_pipelined(d: &mut dyn Deployment) {
    let what = d.describe();
    let port = d.port();

    // A: a large response in flight, with a second request pipelined
    // behind it in the same write.
    let mut a = HttpConn::connect(port).unwrap();
    let mut both = HttpConn::get_request("/big.bin");
    both.extend(HttpConn::get_request("/healthz"));
    a.send(&both).unwrap();
    let head = a.read_head().unwrap();
    assert_eq!(head.status, 200, "{what}: {head:?}");
    assert_eq!(head.content_length(), Some(BIG_LEN));
    let old_pid = head.pid();
    let first = a.read_body(1 << 16).unwrap();
    check_big(&first, 0);

    // B: idle.
    let mut b = HttpConn::connect(port).unwrap();
    healthz(&mut b, &what);

    // C: one request and the start of the next in one write; the server
    // reads both when it reads the first.
    let mut c = HttpConn::connect(port).unwrap();
    let mut partial = HttpConn::get_request("/hello.txt");
    partial.extend_from_slice(b"GET /hea");
    c.send(&partial).unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "hello, world\n"), "{what}");

    d.begin_restart();
    d.wait_status("the old generation draining", &|s| s.starts_with("draining"));

    // C's second request, completed now: answered, by the old generation
    // that had read its first bytes.
    c.send(b"lthz HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200, "{what}: the request started before SIGTERM was lost: {r:?}");
    assert_eq!(r.pid(), old_pid, "{what}: the request whose bytes the old generation had read");

    // A's response is complete and correct, and the pipelined request is
    // answered after it.
    let rest = a.read_body(BIG_LEN - first.len()).unwrap_or_else(|e| panic!("{what}: big response cut: {e}"));
    check_big(&rest, first.len());
    let r = a.read_response(false).unwrap();
    assert_eq!(r.status, 200, "{what}: {r:?}");

    d.finish_restart(old_pid);

    for (name, conn) in [("in-flight", &mut a), ("idle", &mut b), ("partial", &mut c)] {
        let r = healthz(conn, &format!("{what}: {name} connection after the restart"));
        assert_ne!(r.pid(), old_pid, "{what}: {name} connection not handed over");
    }
}

/// A request still in flight at the drain deadline is cut; idle
/// connections are still handed over.
pub fn drain_deadline(d: &mut dyn Deployment) {
    let what = d.describe();
    d.set_extra_args(&["--drain-timeout", "1s"]);
    d.restart();
    let port = d.port();
    let mut stuck = HttpConn::connect(port).unwrap();
    stuck.send(&HttpConn::get_request("/big.bin")).unwrap();
    let head = stuck.read_head().unwrap();
    let old_pid = head.pid();
    let mut idle = HttpConn::connect(port).unwrap();
    healthz(&mut idle, &what);

    d.restart();

    let got = stuck.read_body(BIG_LEN);
    assert!(got.is_err(), "{what}: a response still in flight at the drain deadline should have been cut");
    let r = healthz(&mut idle, &what);
    assert_ne!(r.pid(), old_pid, "{what}");
    d.set_extra_args(&[]);
}

/// With `--handoff=false`, idle connections are closed at shutdown.
pub fn handoff_disabled(d: &mut dyn Deployment) {
    let what = d.describe();
    d.set_extra_args(&["--handoff=false"]);
    d.restart();
    let mut c = HttpConn::connect(d.port()).unwrap();
    let old_pid = healthz(&mut c, &what).pid();
    d.restart();
    assert!(c.closed_by_server(WAIT), "{what}: the idle connection should have been closed");
    let mut fresh = HttpConn::connect(d.port()).unwrap();
    assert_ne!(healthz(&mut fresh, &what).pid(), old_pid);
    d.set_extra_args(&[]);
}
