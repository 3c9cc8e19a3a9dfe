//! Benchmark: what the handoff machinery costs per request, and how long
//! handing over many idle connections takes.
//!
//! ```sh
//! cargo bench -p baton-httpd --bench handoff
//! cargo bench -p baton-httpd --bench handoff -- --rounds 5 --seconds 5 --connections 64 --handoff 10000
//! ```
//!
//! 1. **Requests/s**: `baton-httpd` (the real binary, socket passed by a
//!    manager, drain and handoff machinery live) against a plain hyper
//!    server running the *same* [`Handler`] with the same HTTP/1 settings
//!    and the same number of runtime threads, on loopback. A load generator
//!    in this process keeps `--connections` keep-alive connections busy
//!    (one request in flight on each) for `--seconds`, after a warm-up.
//!    The servers run alternately, `--rounds` times each (default 5); the
//!    medians are compared.
//! 2. **Handoff time**: `--handoff` idle keep-alive connections, each having
//!    made one request, then a restart: SIGTERM to the old generation, the
//!    new one started by the manager once the old one exited (systemd's
//!    restart), then one request on every connection. Reported: the time
//!    from SIGTERM until every connection was answered by the new pid, with
//!    its parts. Under the mini manager (`tests/common/manager.rs`) and
//!    standalone Baton (`baton restart`: overlapped, the connections are
//!    pushed to the running new generation) always; under real systemd 252
//!    and 257 too (`systemctl restart`) when run as root.
//!
//! Only measured numbers are printed.

#[path = "../tests/common/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../tests/common/manager.rs"]
#[allow(dead_code)]
mod manager;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use baton_httpd::conn::http1_builder;
use baton_httpd::files::Files;
use baton_httpd::service::{Handler, Identity};
use client::{HttpConn, raise_nofile};
use manager::MiniManager;

const BIN: &str = env!("CARGO_BIN_EXE_baton-httpd");
/// Set (to the root) in the child that runs the plain hyper server.
const PLAIN_ENV: &str = "BATON_HTTPD_BENCH_PLAIN_ROOT";
/// Set (to `PORT CONNECTIONS`) in the child that holds the idle clients of
/// the mini manager's handoff run: the manager's store and the clients
/// together would exceed one process's fd limit.
const CLIENTS_ENV: &str = "BATON_HTTPD_BENCH_CLIENTS";
const WAIT: Duration = Duration::from_secs(120);
const THREADS: &str = "1";

struct Options {
    rounds: usize,
    seconds: u64,
    connections: usize,
    handoff: usize,
}

fn options() -> Options {
    let mut o = Options { rounds: 5, seconds: 5, connections: 64, handoff: 10_000 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), value) {
            ("--rounds", Some(v)) => o.rounds = v.max(1) as usize,
            ("--seconds", Some(v)) => o.seconds = v.max(1),
            ("--connections", Some(v)) => o.connections = v.max(1) as usize,
            ("--handoff", Some(v)) => o.handoff = v as usize,
            // `cargo bench` passes `--bench`; anything else is ignored.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn main() {
    if let Some(root) = std::env::var_os(PLAIN_ENV) {
        plain_server(Path::new(&root));
        return;
    }
    if let Ok(spec) = std::env::var(CLIENTS_ENV) {
        raise_nofile(20_000);
        clients_process(&spec);
        return;
    }
    let o = options();
    let limit = raise_nofile(4 * o.handoff as u64 + 4096);
    let dir = std::env::temp_dir().join(format!("baton-httpd-bench-{}", std::process::id()));
    let root = dir.join("www");
    std::fs::create_dir_all(&root).expect("bench root");
    std::fs::write(root.join("hello.txt"), "hello, world\n").expect("bench file");

    println!("baton-httpd benchmark ({} CPUs, RLIMIT_NOFILE {limit})", num_cpus());
    println!();
    println!(
        "requests/s, {} keep-alive connections, {} s per run, servers on {THREADS} runtime thread",
        o.connections, o.seconds
    );
    for path in ["/healthz", "/hello.txt"] {
        throughput(&root, path, &o);
    }
    println!();
    if o.handoff > 0 {
        handoff_mini(&root, o.handoff);
        handoff_baton(&root, o.handoff);
        handoff_systemd(baton_testbed::Flavor::Host, o.handoff);
        handoff_systemd(baton_testbed::Flavor::Trixie, o.handoff);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---- requests/s -----------------------------------------------------------

fn throughput(root: &Path, path: &str, o: &Options) {
    let mut baton = Vec::new();
    let mut plain = Vec::new();
    for round in 0..o.rounds {
        // Alternate which goes first, so drift on a shared machine hits both.
        if round % 2 == 0 {
            baton.push(measure_baton(root, path, o));
            plain.push(measure_plain(root, path, o));
        } else {
            plain.push(measure_plain(root, path, o));
            baton.push(measure_baton(root, path, o));
        }
    }
    let (b, p) = (median(&baton), median(&plain));
    println!(
        "  GET {path:<11} baton-httpd {b:>9.0}   plain hyper {p:>9.0}   ratio {:.3}   (medians; runs: baton {:?}, plain {:?})",
        b / p,
        baton.iter().map(|r| *r as u64).collect::<Vec<_>>(),
        plain.iter().map(|r| *r as u64).collect::<Vec<_>>(),
    );
}

fn measure_baton(root: &Path, path: &str, o: &Options) -> f64 {
    let root = root.display().to_string();
    let mut m = MiniManager::new(Path::new(BIN), &["--root", &root, "--threads", THREADS], "http").expect("manager");
    m.set_env("RUST_LOG", "warn");
    m.start(WAIT).expect("baton-httpd starts");
    let rps = load(m.port(), path, o);
    m.stop(WAIT).expect("baton-httpd stops");
    rps
}

fn measure_plain(root: &Path, path: &str, o: &Options) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(PLAIN_ENV, root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("plain server starts");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("plain server reports its port");
    let port: u16 = line.trim().parse().expect("a port number");
    let rps = load(port, path, o);
    let _ = child.kill();
    let _ = child.wait();
    rps
}

/// The plain hyper server: the same handler, no drain, no handoff.
fn plain_server(root: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS.parse().unwrap_or(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let files = Files::open(root).expect("root");
        let handler = Handler::new(
            files,
            Identity { pid: std::process::id(), generation: 1, started: SystemTime::now(), adopted: 0 },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("address").port());
        let builder = http1_builder(baton_httpd::config::DEFAULT_MAX_REQUEST_HEAD);
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), handler.clone());
            tokio::spawn(conn);
        }
    });
}

/// Keeps `o.connections` connections busy for `o.seconds` after a 1 s
/// warm-up; returns responses per second.
fn load(port: u16, path: &str, o: &Options) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
        let mut tasks = Vec::new();
        for _ in 0..o.connections {
            let (count, stop, request) = (Arc::clone(&count), Arc::clone(&stop), request.clone());
            tasks.push(tokio::spawn(async move { client_loop(port, &request, &count, &stop).await }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start_count = count.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(o.seconds)).await;
        let done = count.load(Ordering::Relaxed) - start_count;
        let elapsed = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        done as f64 / elapsed.as_secs_f64()
    })
}

async fn client_loop(port: u16, request: &[u8], count: &AtomicU64, stop: &AtomicBool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(request).await.is_err() {
            return;
        }
        loop {
            if let Some(total) = response_len(&buf[..have])
                && have >= total
            {
                buf.copy_within(total..have, 0);
                have -= total;
                break;
            }
            match s.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Length of the first complete response head plus its Content-Length,
/// once the head is complete.
fn response_len(b: &[u8]) -> Option<usize> {
    let head = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&b[..head]).ok()?;
    let len = text
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Some(head + len)
}

// ---- handoff time ---------------------------------------------------------

/// What one handoff run measured.
struct HandoffRun {
    stop: Duration,
    start: Duration,
    answered: Duration,
    total: Duration,
    new_pid: usize,
    closed: usize,
}

fn open_idle(port: u16, n: usize) -> (Vec<HttpConn>, u32) {
    let mut conns = Vec::with_capacity(n);
    let mut pid = 0;
    for i in 0..n {
        let mut c = HttpConn::connect(port).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        pid = c.get("/healthz").unwrap_or_else(|e| panic!("connection {i}: {e}")).pid();
        conns.push(c);
    }
    (conns, pid)
}

/// One request on every connection (all sent first, then all read).
fn ask_all(conns: &mut [HttpConn], old_pid: u32) -> (usize, usize) {
    let req = HttpConn::get_request("/healthz");
    let mut sent = vec![false; conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        sent[i] = c.send(&req).is_ok();
    }
    let (mut new_pid, mut closed) = (0, 0);
    for (i, c) in conns.iter_mut().enumerate() {
        match sent[i].then(|| c.read_response(false)) {
            Some(Ok(r)) if r.status == 200 && r.pid() != old_pid => new_pid += 1,
            Some(Ok(r)) => panic!("unexpected answer: {r:?}"),
            _ => closed += 1,
        }
    }
    (new_pid, closed)
}

fn report(label: &str, n: usize, r: &HandoffRun) {
    println!(
        "  {label}: {n} idle connections, last one answered (or found closed) {:.0} ms after SIGTERM \
         (stop incl. storing {:.0} ms, start to READY incl. adopting {:.0} ms, answering {:.0} ms); \
         {} handed over and answered by the new pid, {} closed by the old one",
        r.total.as_secs_f64() * 1e3,
        r.stop.as_secs_f64() * 1e3,
        r.start.as_secs_f64() * 1e3,
        r.answered.as_secs_f64() * 1e3,
        r.new_pid,
        r.closed,
    );
}

/// The idle clients of [`handoff_mini`], in a child process: opens them
/// (prints `open`), waits for a line on stdin, asks on every connection and
/// prints `NEW_PID_ANSWERS CLOSED`.
fn clients_process(spec: &str) {
    let mut parts = spec.split_whitespace().map(|v| v.parse::<usize>().expect("a number"));
    let (port, n) = (parts.next().expect("port") as u16, parts.next().expect("count"));
    let (mut conns, old_pid) = open_idle(port, n);
    println!("open");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("go");
    let (new_pid, closed) = ask_all(&mut conns, old_pid);
    println!("{new_pid} {closed}");
}

fn handoff_mini(root: &Path, n: usize) {
    use std::io::Write;
    let root = root.display().to_string();
    let mut m = MiniManager::new(Path::new(BIN), &["--root", &root], "http").expect("manager");
    m.set_env("RUST_LOG", "warn");
    m.start(WAIT).expect("baton-httpd starts");
    let mut clients = Command::new(std::env::current_exe().expect("own path"))
        .env(CLIENTS_ENV, format!("{} {n}", m.port()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("clients process");
    let mut out = std::io::BufReader::new(clients.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("clients open");
    assert_eq!(line.trim(), "open", "the clients process failed");
    let t0 = Instant::now();
    m.begin_stop().expect("SIGTERM");
    m.wait_stopped(WAIT).expect("old generation stops");
    let stopped = t0.elapsed();
    m.start(WAIT).expect("new generation starts");
    let started = t0.elapsed();
    writeln!(clients.stdin.as_mut().expect("piped")).expect("go");
    line.clear();
    out.read_line(&mut line).expect("clients report");
    let mut counts = line.split_whitespace().map(|v| v.parse::<usize>().expect("a count"));
    let (new_pid, closed) = (counts.next().expect("answers"), counts.next().expect("closed"));
    let _ = clients.wait();
    let total = t0.elapsed();
    report(
        "mini manager",
        n,
        &HandoffRun { stop: stopped, start: started - stopped, answered: total - started, total, new_pid, closed },
    );
}

fn baton_status(baton: &Path, control: &Path) -> Option<serde_json::Value> {
    let out = Command::new(baton).args(["status", "--json", "--control"]).arg(control).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The pid of the only generation, once there is exactly one and it is
/// active.
fn sole_active(status: &serde_json::Value) -> Option<u64> {
    match status["generations"].as_array()?.as_slice() {
        [g] if g["state"] == "active" => g["pid"].as_u64(),
        _ => None,
    }
}

fn handoff_baton(root: &Path, n: usize) {
    let baton = match baton_testbed::try_cargo_bin("baton", "baton") {
        Ok(b) => b,
        Err(e) => {
            println!("  baton: not measured ({e})");
            return;
        }
    };
    let control = root.with_file_name("baton.sock");
    let port = baton_testbed::free_loopback_port();
    let mut child = Command::new(&baton)
        .args(["run", "-l", &format!("http=127.0.0.1:{port}"), "--control"])
        .arg(&control)
        .arg("--")
        .arg(BIN)
        .arg("--root")
        .arg(root)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("baton run");
    let started = baton_testbed::poll_until("baton's first generation", WAIT, || {
        baton_status(&baton, &control).as_ref().and_then(sole_active)
    });
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        println!("  baton: not measured ({e})");
        return;
    }
    let (mut conns, old_pid) = open_idle(port, n);
    let t0 = Instant::now();
    let out = Command::new(&baton).args(["restart", "--control"]).arg(&control).output().expect("baton restart");
    assert!(out.status.success(), "baton restart: {}", String::from_utf8_lossy(&out.stderr));
    let ready = t0.elapsed();
    baton_testbed::poll_until("the old generation to exit", WAIT, || {
        baton_status(&baton, &control).as_ref().and_then(sole_active).filter(|pid| *pid != u64::from(old_pid))
    })
    .expect("the old generation exits");
    let settled = t0.elapsed();
    let (new_pid, closed) = ask_all(&mut conns, old_pid);
    let total = t0.elapsed();
    println!(
        "  baton (standalone): {n} idle connections, last one answered (or found closed) {:.0} ms after \
         `baton restart` began (new generation ready {:.0} ms, old one drained, handed over and exited \
         {:.0} ms later, answering {:.0} ms); {new_pid} handed over and answered by the new pid, {closed} closed",
        total.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3,
        (settled - ready).as_secs_f64() * 1e3,
        (total - settled).as_secs_f64() * 1e3,
    );
    drop(conns);
    let _ = Command::new(&baton).args(["stop", "--control"]).arg(&control).output();
    let _ = child.wait();
}

fn handoff_systemd(flavor: baton_testbed::Flavor, n: usize) {
    use baton_testbed::{Testbed, free_loopback_port};
    if !rustix::process::geteuid().is_root() {
        println!("  systemd ({flavor}): not measured (needs root for the testbed)");
        return;
    }
    let tb = match Testbed::boot(flavor) {
        Ok(tb) => tb,
        Err(e) => {
            println!("  systemd ({flavor}): not measured (testbed: {e})");
            return;
        }
    };
    let root: PathBuf = tb.scratch().join("www");
    std::fs::create_dir_all(&root).expect("root");
    let port = free_loopback_port();
    tb.install_unit(
        "baton-httpd.socket",
        &format!("[Socket]\nListenStream=127.0.0.1:{port}\nFileDescriptorName=http\nBacklog=4096\n"),
    )
    .expect("socket unit");
    tb.install_unit(
        "baton-httpd.service",
        &format!(
            "[Service]\nType=notify\nExecStart={BIN} --root {}\nFileDescriptorStoreMax=16384\n\
             LimitNOFILE=65536\nTimeoutSec=300\nEnvironment=RUST_LOG=info\n",
            root.display()
        ),
    )
    .expect("service unit");
    tb.systemctl_checked(&["start", "baton-httpd.socket", "baton-httpd.service"]).expect("start");
    let (mut conns, old_pid) = open_idle(port, n);
    let t0 = Instant::now();
    if !tb.systemctl(&["restart", "baton-httpd.service"]).expect("systemctl runs").success() {
        let why: Vec<String> = tb
            .journal(None)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("systemd[1]") && (l.contains("Failed") || l.contains("failed")))
            .map(|l| format!("    {l}"))
            .collect();
        println!(
            "  systemd {}: {n} idle connections: the restart FAILED after {:.0} ms; systemd said:\n{}",
            tb.systemd_version(),
            t0.elapsed().as_secs_f64() * 1e3,
            why.join("\n")
        );
        return;
    }
    let restarted = t0.elapsed();
    let (new_pid, closed) = ask_all(&mut conns, old_pid);
    let total = t0.elapsed();
    println!(
        "  systemd {}: {n} idle connections, last one answered (or found closed) {:.0} ms after \
         `systemctl restart` began (restart job {:.0} ms, answering {:.0} ms); {new_pid} handed over and \
         answered by the new pid, {closed} closed by the old one",
        tb.systemd_version(),
        total.as_secs_f64() * 1e3,
        restarted.as_secs_f64() * 1e3,
        (total - restarted).as_secs_f64() * 1e3,
    );
    println!("    {}", journal_breakdown(&tb));
}

/// The restart's phases, from the service's own journal lines
/// (`stopping` at SIGTERM, `stopped: …` after the final BARRIER, i.e. once
/// systemd processed every FDSTORE; `serving on …` at READY).
fn journal_breakdown(tb: &baton_testbed::Testbed) -> String {
    let Ok(journal) = tb.run(&["journalctl", "--no-pager", "-b", "-u", "baton-httpd.service", "-o", "short-unix"])
    else {
        return "(no journal)".into();
    };
    let at = |needle: &str, nth: usize| -> Option<f64> {
        journal.stdout.lines().filter(|l| l.contains(needle)).nth(nth)?.split_whitespace().next()?.parse().ok()
    };
    let barrier = if journal.stdout.contains("did not confirm") {
        "all sent, BARRIER not confirmed within 10 s: systemd still busy"
    } else {
        "all stored, BARRIER confirmed"
    };
    match (at("stopping", 0), at("stopped: ", 0), at("Stopped ", 0), at("serving on", 1)) {
        (Some(sigterm), Some(stored), Some(exited), Some(ready)) => format!(
            "phases: SIGTERM to {barrier} {:.0} ms, to systemd's `Stopped` {:.0} ms, \
             to the new generation's READY {:.0} ms",
            (stored - sigterm) * 1e3,
            (exited - sigterm) * 1e3,
            (ready - sigterm) * 1e3
        ),
        _ => "(phases not found in the journal)".into(),
    }
}
