//! Handing over idle keep-alive connections between generations: how long
//! from the old generation's stop signal until the new one has adopted the
//! last of them, and until it answers the first and the last, with the
//! time spent on each hop.
//!
//! `cargo bench --bench idle_handover` (release builds; as root for the
//! systemd rows). Options: `--sizes 1000,10000,20000` (the default),
//! `--runs N` (3), `--only standalone|252|257`, `--sample N` (100: one
//! connection in N gets a request at the stop signal; 0: none, for the
//! idle handover alone). Run without `--bench` (by
//! `cargo test --benches`) it does one standalone smoke run of 200
//! connections.
//!
//! Each run: `baton-httpd` under Baton (standalone `baton run`, or the
//! supervised units `baton units` writes, in a testbed booting systemd 252
//! or 257); N keep-alive connections, each having made one request, held
//! idle by client processes (at most 5,000 each: a process may hold 20,000
//! fds here); then `baton restart` (standalone) or `systemctl reload`. The
//! moment the old generation logs its stop signal, the clients write one
//! request on every [`SAMPLE`]th connection, so that a connection among the
//! first the new generation adopts is answered at once; once the old
//! generation has exited, they write one more on every connection, and
//! every one of those must be answered by the new generation. Writing on all
//! of them at the stop signal would have the clients, on the same two
//! cores, take CPU time from the handover they measure (with 10,000
//! connections, the last one was adopted some 30 ms later). Every time is
//! `CLOCK_MONOTONIC`, shared by all processes on the machine; the servers'
//! stamps are the `mono_us=` of their debug log lines:
//!
//! - **stored** (old generation): its last `FDSTORE=1` sent;
//! - **moved** (Baton): its last push of connections to the new generation;
//! - **adopted** (new generation): the last connection adopted, watched by
//!   its runtime (the last of a batch logs it);
//! - **requests**: when the clients were told to write: once the stop
//!   signal's log line arrived, through Baton's output pipe (standalone) or
//!   through journald and `journalctl -f` (under systemd, a few hundred ms
//!   later: there the two answer columns measure mostly that delay, while
//!   the three handover columns are exact);
//! - **first** / **last answer**: the first and last response by the new
//!   generation to the requests written at the stop signal. A request that
//!   reached the old generation before it let go of its connection is
//!   answered there (counted apart); every request written after the
//!   handover must be answered by the new generation on the same TCP
//!   connection (none closed).
//!
//! Each figure is the median over the runs, in ms after the stop signal.
//! A process may hold at most `RLIMIT_NOFILE` fds (20,000 here, and the
//! hard limit cannot be raised): a size that would not fit in one
//! generation next to its own fds is lowered to what fits, and the row says
//! so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_testbed::{Bed, Flavor, cargo_bin, free_loopback_port};

/// Set (to `PORT COUNT SAMPLE`) in a child process that holds idle clients.
const CLIENTS_ENV: &str = "BATON_BENCH_IDLE_CLIENTS";
/// Connections per client process.
const PER_CLIENT: usize = 5_000;
/// One connection in this many gets its request at the stop signal
/// (`--sample N`; 0: none, the idle handover alone).
static SAMPLE: AtomicUsize = AtomicUsize::new(100);
/// Fds a generation needs besides its connections (sockets, runtime,
/// pipes), with room to spare.
const OWN_FDS: usize = 200;
/// baton-httpd's `--max-connections`: its default (¾ of the fd limit)
/// would refuse the largest size; the fd limit itself still applies.
const MAX_CONNECTIONS: &str = "65536";
const WAIT: Duration = Duration::from_secs(120);
const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n";
/// What the servers log, for the stamps.
const APP_LOG: &str = "info,baton_httpd::app=debug,baton_httpd::handoff=debug";
const BATON_LOG: &str = "info,baton::supervisor::connections=debug";

fn main() {
    if let Ok(spec) = std::env::var(CLIENTS_ENV) {
        clients_process(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let arg = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
    };
    let sizes: Vec<usize> = match arg("--sizes") {
        Some(v) => v.split(',').map(|n| n.trim().parse().expect("--sizes: numbers, comma-separated")).collect(),
        None if full => vec![1_000, 10_000, 20_000],
        None => vec![200],
    };
    if let Some(v) = arg("--sample") {
        SAMPLE.store(v.parse().expect("--sample: a number (0: no request at the stop signal)"), Ordering::Relaxed);
    }
    let runs: usize = arg("--runs").map_or(if full { 3 } else { 1 }, |v| v.parse().expect("--runs: a number"));
    let only = arg("--only");
    let wanted = |what: &str| only.as_deref().is_none_or(|o| o == what);
    if cfg!(debug_assertions) {
        eprintln!("idle_handover: built without optimisations; run `cargo bench --bench idle_handover` for figures");
    }
    let limit = raise_nofile(u64::MAX) as usize;
    println!(
        "\nidle keep-alive connections handed over (ms after the old generation's stop signal; medians of {runs})"
    );
    println!("RLIMIT_NOFILE here: {limit}\n");
    println!(
        "| {:<26} | {:>6} | {:>7} | {:>7} | {:>7} | {:>8} | {:>7} | {:>7} | {:>10} | {:<24} |",
        "topology",
        "conns",
        "stored",
        "moved",
        "adopted",
        "requests",
        "first",
        "last",
        "PID 1 CPU",
        "answered new / old / closed"
    );
    println!(
        "|{:-<28}|{:->8}|{:->9}|{:->9}|{:->9}|{:->10}|{:->9}|{:->9}|{:->12}|{:-<26}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for &asked in &sizes {
        let n = asked.min(limit.saturating_sub(OWN_FDS));
        let size = if n < asked { format!("{n}*") } else { n.to_string() };
        if wanted("standalone") {
            let rows: Vec<Run> = (0..runs).map(|_| standalone(n)).collect();
            print_row("standalone `baton restart`", &size, &rows);
        }
        for (flavor, label) in [(Flavor::Host, "252"), (Flavor::Trixie, "257")] {
            if !full || !wanted(label) {
                continue;
            }
            if !rustix::process::geteuid().is_root() {
                println!("| systemd {label}: not measured (the testbed needs root) |");
                continue;
            }
            let rows: Vec<Run> = (0..runs).filter_map(|_| supervised(flavor, n)).collect();
            print_row(&format!("systemd {label} `reload`"), &size, &rows);
        }
    }
    if sizes.iter().any(|&s| s > limit.saturating_sub(OWN_FDS)) {
        println!("\n* lowered to fit one generation's RLIMIT_NOFILE ({limit}) next to its own fds");
    }
}

/// One run's stamps, µs after the stop signal.
#[derive(Debug, Default, Clone)]
struct Run {
    stored: u64,
    moved: u64,
    adopted: u64,
    requests: u64,
    first: u64,
    last: u64,
    new: usize,
    /// Requests written at the stop signal and answered by the old
    /// generation: they reached it before it handed their connection over.
    old: usize,
    closed: usize,
    /// CPU time systemd (PID 1 of the testbed) spent during the run, ms.
    pid1_ms: Option<u64>,
}

fn print_row(label: &str, size: &str, rows: &[Run]) {
    if rows.is_empty() {
        println!("| {label:<26} | {size:>6} | not measured (see above) |");
        return;
    }
    let med = |f: fn(&Run) -> u64| {
        let mut v: Vec<u64> = rows.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1000.0
    };
    let answered: Vec<String> = rows.iter().map(|r| format!("{}/{}/{}", r.new, r.old, r.closed)).collect();
    let pid1: Vec<String> = rows.iter().filter_map(|r| r.pid1_ms).map(|ms| ms.to_string()).collect();
    let pid1 = if pid1.is_empty() { "-".to_owned() } else { format!("{} ms", pid1.join("/")) };
    println!(
        "| {label:<26} | {size:>6} | {:>7.1} | {:>7.1} | {:>7.1} | {:>8.1} | {:>7.1} | {:>7.1} | {pid1:>10} | {:<24} |",
        med(|r| r.stored),
        med(|r| r.moved),
        med(|r| r.adopted),
        med(|r| r.requests),
        med(|r| r.first),
        med(|r| r.last),
        answered.join(" ")
    );
}

// ---- the servers' log -----------------------------------------------------

/// Reads a log stream on a thread: keeps the lines and, at the first stop
/// signal logged after [`LogTap::arm`], tells the clients to write.
struct LogTap {
    lines: Arc<Mutex<Vec<String>>>,
    /// The clients' stdins, until told to write.
    trigger: Arc<Mutex<Option<Vec<ChildStdin>>>>,
    /// Then, until told to write the rest.
    fired: Arc<Mutex<Vec<ChildStdin>>>,
    fired_at: Arc<Mutex<Option<u64>>>,
}

impl LogTap {
    fn spawn(stream: impl Read + Send + 'static) -> LogTap {
        let tap =
            LogTap { lines: Arc::default(), trigger: Arc::default(), fired: Arc::default(), fired_at: Arc::default() };
        let (lines, trigger, fired_at) = (Arc::clone(&tap.lines), Arc::clone(&tap.trigger), Arc::clone(&tap.fired_at));
        let fired = Arc::clone(&tap.fired);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let line = message_of(&line);
                if line.contains("stopping")
                    && line.contains("signal=")
                    && let Some(mut stdins) = trigger.lock().unwrap().take()
                {
                    for s in &mut stdins {
                        let _ = writeln!(s, "go");
                        let _ = s.flush();
                    }
                    *fired_at.lock().unwrap() = Some(baton_sd::monotonic_usec());
                    *fired.lock().unwrap() = stdins;
                }
                lines.lock().unwrap().push(line);
            }
        });
        tap
    }

    /// Hands the clients over: they are told to write at the next stop
    /// signal logged.
    fn arm(&self, clients: &mut Clients) {
        let stdins = clients.children.iter_mut().map(|c| c.stdin.take().expect("piped")).collect();
        *self.trigger.lock().unwrap() = Some(stdins);
    }

    /// Tells the clients to write on the rest of their connections.
    fn write_the_rest(&self) {
        for s in self.fired.lock().unwrap().iter_mut() {
            writeln!(s, "rest").expect("a clients process takes its orders");
            s.flush().expect("a clients process takes its orders");
        }
    }

    /// The stamps of the run (the first stop signal since `since`).
    fn stamps(&self, since: u64) -> Option<Stamps> {
        let lines = self.lines.lock().unwrap();
        let stamped = |needle: &str| -> Vec<u64> {
            lines.iter().filter(|l| l.contains(needle)).filter_map(|l| mono_us(l)).filter(|&t| t >= since).collect()
        };
        let signal = *stamped("signal=").iter().min()?;
        // Up to the next stop signal (none within a run).
        let window = |v: Vec<u64>| v.into_iter().filter(|&t| t >= signal).max();
        Some(Stamps {
            signal,
            stored: window(stamped("stored connections"))?,
            moved: window(stamped("fd(s) to generation")).unwrap_or(0),
            adopted: window(stamped("adopted pushed connections"))?,
            fired: (*self.fired_at.lock().unwrap())?,
        })
    }
}

struct Stamps {
    signal: u64,
    stored: u64,
    moved: u64,
    adopted: u64,
    fired: u64,
}

/// A journal entry's MESSAGE with the fields the stamps need as text (an
/// entry logged natively, by Baton or by a server whose stderr is the
/// journal, has them as fields), or the line itself when it is not JSON.
fn message_of(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { return line.to_owned() };
    let mut message = v["MESSAGE"].as_str().unwrap_or("").to_owned();
    // tracing-journald prefixes the fields of an event: `F_` by default,
    // `BATON_` for Baton's own.
    for field in ["SIGNAL", "MONO_US"] {
        let value = ["F_", "BATON_"].iter().find_map(|prefix| v[format!("{prefix}{field}")].as_str());
        if let Some(value) = value {
            message.push_str(&format!(" {}={value}", field.to_ascii_lowercase()));
        }
    }
    message
}

fn mono_us(line: &str) -> Option<u64> {
    let at = line.find("mono_us=")? + "mono_us=".len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

// ---- clients --------------------------------------------------------------

struct Clients {
    children: Vec<Child>,
    outs: Vec<BufReader<std::process::ChildStdout>>,
}

impl Clients {
    /// `n` idle connections to `port`, in processes of [`PER_CLIENT`].
    fn open(port: u16, n: usize) -> Clients {
        let mut clients = Clients { children: Vec::new(), outs: Vec::new() };
        let mut left = n;
        while left > 0 {
            let count = left.min(PER_CLIENT);
            left -= count;
            let mut child = Command::new(std::env::current_exe().expect("own path"))
                .env(CLIENTS_ENV, format!("{port} {count} {}", SAMPLE.load(Ordering::Relaxed)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("a clients process");
            clients.outs.push(BufReader::new(child.stdout.take().expect("piped")));
            clients.children.push(child);
        }
        for out in &mut clients.outs {
            let mut line = String::new();
            out.read_line(&mut line).expect("a clients process reports");
            assert_eq!(line.trim(), "open", "a clients process could not open its connections");
        }
        clients
    }

    /// Every process's result: the first and last answer by the new
    /// generation to the requests written at the stop signal; answers by
    /// the new and by the old generation (all requests); connections
    /// closed.
    fn results(mut self) -> Answers {
        let mut all = Answers { first: u64::MAX, ..Answers::default() };
        for out in &mut self.outs {
            let mut line = String::new();
            out.read_line(&mut line).expect("a clients process reports its answers");
            let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().expect("numbers")).collect();
            assert_eq!(v.len(), 5, "clients process said {line:?}");
            if v[1] > 0 {
                all.first = all.first.min(v[0]);
                all.last = all.last.max(v[1]);
            }
            all.new += v[2] as usize;
            all.old += v[3] as usize;
            all.closed += v[4] as usize;
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        all
    }
}

/// What the clients saw (see [`Clients::results`]).
#[derive(Debug, Default)]
struct Answers {
    /// The first and last answer by the new generation to a request
    /// written at the stop signal.
    first: u64,
    last: u64,
    /// Requests written after the handover (one per connection) answered
    /// by the new generation.
    new: usize,
    /// Requests written at the stop signal answered by the old generation
    /// (they reached it before it let go of their connection).
    old: usize,
    /// Requests written after the handover answered by the old generation:
    /// never, or the handover failed.
    old_after: usize,
    closed: usize,
}

/// A clients process: opens its connections (one request each, noting the
/// pid that answered), says `open`, waits for `go`, writes one request on
/// every [`SAMPLE`]th connection, waits for `rest`, then writes one more on
/// every connection (on a sampled one once its first is answered), reads
/// every answer, and says `FIRST_US LAST_US NEW OLD CLOSED` (see
/// [`Answers`]; answers from another pid than the first one's are the new
/// generation's).
fn clients_process(spec: &str) {
    let mut parts = spec.split_whitespace().map(|v| v.parse::<usize>().expect("a number"));
    let (port, n) = (parts.next().expect("port") as u16, parts.next().expect("count"));
    let sample = parts.next().expect("sample");
    raise_nofile(n as u64 + 100);
    let mut old_pid = 0;
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(REQUEST).unwrap();
        let (_, pid) = read_response(&mut s).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        old_pid = pid;
        streams.push(s);
    }
    println!("open");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("go");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let answers = rt.block_on(async move {
        // One request on `s`; the answer (when, and from which pid) and the
        // connection, unless it was closed.
        async fn ask(mut s: tokio::net::TcpStream) -> (Option<(u64, u32)>, Option<tokio::net::TcpStream>) {
            use tokio::io::AsyncWriteExt;
            if s.write_all(REQUEST).await.is_err() {
                return (None, None);
            }
            match read_response_async(&mut s).await {
                Ok(answer) => (Some(answer), Some(s)),
                Err(_) => (None, None),
            }
        }
        let streams = streams.into_iter().map(|s| {
            s.set_nonblocking(true).unwrap();
            tokio::net::TcpStream::from_std(s).unwrap()
        });
        let (sampled, rest): (Vec<_>, Vec<_>) = streams.enumerate().partition(|(i, _)| sample > 0 && i % sample == 0);
        let mut early: tokio::task::JoinSet<_> = sampled.into_iter().map(|(_, s)| ask(s)).collect();
        let order = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        });
        assert_eq!(order.await.unwrap().expect("rest").trim(), "rest");
        // After the handover, one more request on every connection, the
        // sampled ones included (once their first is answered).
        let mut after: tokio::task::JoinSet<_> = rest.into_iter().map(|(_, s)| ask(s)).collect();
        let mut all = Answers { first: u64::MAX, ..Answers::default() };
        while let Some(r) = early.join_next().await {
            match r.expect("a client task") {
                (Some((at, pid)), Some(s)) => {
                    if pid == old_pid {
                        all.old += 1;
                    } else {
                        all.first = all.first.min(at);
                        all.last = all.last.max(at);
                    }
                    after.spawn(ask(s));
                }
                _ => all.closed += 1,
            }
        }
        while let Some(r) = after.join_next().await {
            match r.expect("a client task") {
                (Some((_, pid)), _) if pid != old_pid => all.new += 1,
                (Some(_), _) => all.old_after += 1,
                (None, _) => all.closed += 1,
            }
        }
        all
    });
    let Answers { first, last, new, old, old_after, closed } = answers;
    assert_eq!(old_after, 0, "the old generation answered after the handover");
    println!("{first} {last} {new} {old} {closed}");
}

/// Reads one response: its status must be 200; returns when it was read
/// and the `baton-pid` header.
fn read_response(s: &mut TcpStream) -> Result<(u64, u32), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse_response(&buf)? {
            return Ok((baton_sd::monotonic_usec(), r));
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed".into()),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn read_response_async(s: &mut tokio::net::TcpStream) -> Result<(u64, u32), String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse_response(&buf)? {
            return Ok((baton_sd::monotonic_usec(), r));
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Err("closed".into()),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The `baton-pid` of a complete 200 response in `b`, once it is complete.
fn parse_response(b: &[u8]) -> Result<Option<u32>, String> {
    let Some(head) = b.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let text = String::from_utf8_lossy(&b[..head]);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response {text:?}"));
    }
    let header = |name: &str| {
        text.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if b.len() < head + 4 + len {
        return Ok(None);
    }
    header("baton-pid").and_then(|v| v.parse().ok()).map(Some).ok_or_else(|| "no baton-pid".to_owned())
}

/// Raises the soft `RLIMIT_NOFILE` towards `want` (up to the hard limit);
/// returns the soft limit now.
fn raise_nofile(want: u64) -> u64 {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let max = lim.maximum.unwrap_or(u64::MAX);
    let cur = want.min(max);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: Some(cur), maximum: lim.maximum },
    );
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(cur)
}

// ---- topologies -----------------------------------------------------------

fn run_from(tap: &LogTap, port: u16, n: usize, since: u64, restart: impl FnOnce(), settled: impl FnOnce()) -> Run {
    let mut clients = Clients::open(port, n);
    tap.arm(&mut clients);
    restart();
    // The clients write when the stop signal is seen in the log: never
    // waiting for ever.
    baton_testbed::poll_until("the old generation's stop signal in the log", WAIT, || {
        tap.fired_at.lock().unwrap().map(drop)
    })
    .expect("the stop signal is logged");
    settled();
    tap.write_the_rest();
    let answers = clients.results();
    // The last lines come through Baton's output pipe.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stamps = loop {
        match tap.stamps(since) {
            Some(s) => break s,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("the servers' stamps did not appear in the log"),
        }
    };
    let after = |t: u64| t.saturating_sub(stamps.signal);
    Run {
        stored: after(stamps.stored),
        moved: after(stamps.moved),
        adopted: after(stamps.adopted),
        requests: after(stamps.fired),
        first: if answers.last > 0 { after(answers.first) } else { 0 },
        last: after(answers.last),
        new: answers.new,
        old: answers.old,
        closed: answers.closed,
        pid1_ms: None,
    }
}

/// utime + stime of `pid`, in ms (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10)
}

fn standalone(n: usize) -> Run {
    let baton = env!("CARGO_BIN_EXE_baton");
    let httpd = cargo_bin("baton-httpd", "baton-httpd");
    let dir = std::env::temp_dir().join(format!("baton-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let control = dir.join("baton.sock");
    let port = free_loopback_port();
    let mut child = Command::new(baton)
        .args(["run", "--fdstore-max", "32768", "-l", &format!("http=127.0.0.1:{port}"), "--control"])
        .arg(&control)
        .arg("--")
        .arg(&httpd)
        .arg("--root")
        .arg(dir.join("www"))
        .args(["--max-connections", MAX_CONNECTIONS])
        .env("BATON_LOG", BATON_LOG)
        .env("RUST_LOG", APP_LOG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("baton run");
    let tap = LogTap::spawn(child.stderr.take().expect("piped"));
    let cli = |args: &[&str]| Command::new(baton).args(args).arg("--control").arg(&control).output();
    let one_active = || {
        let out = cli(&["status", "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        match v["generations"].as_array()?.as_slice() {
            [g] if g["state"] == "active" => g["pid"].as_u64(),
            _ => None,
        }
    };
    baton_testbed::poll_until("baton's first generation", WAIT, one_active).expect("baton starts");
    let since = baton_sd::monotonic_usec();
    let run = run_from(
        &tap,
        port,
        n,
        since,
        || {
            let out = cli(&["restart"]).expect("baton restart");
            assert!(out.status.success(), "baton restart: {}", String::from_utf8_lossy(&out.stderr));
        },
        || {
            baton_testbed::poll_until("the old generation to exit", WAIT, one_active).expect("one generation left");
        },
    );
    let _ = cli(&["stop"]);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    run
}

fn supervised(flavor: Flavor, n: usize) -> Option<Run> {
    let bed = Bed::builder(flavor, "idle_handover")
        .wait(WAIT)
        .binary(env!("CARGO_BIN_EXE_baton"), "/usr/bin/baton")
        .binary(cargo_bin("baton-httpd", "baton-httpd"), "/usr/bin/baton-httpd")
        .boot()?;
    bed.generate_httpd_units(&["--fdstore-max", "32768"], &["--root", "/tmp", "--max-connections", MAX_CONNECTIONS]);
    bed.tb
        .install_dropin(
            "baton-httpd.service",
            "bench.conf",
            &format!("[Service]\nEnvironment=BATON_LOG={BATON_LOG} RUST_LOG={APP_LOG}\n"),
        )
        .expect("drop-in");
    bed.tb.daemon_reload().unwrap();
    bed.systemctl_ok(&["start", "baton-httpd.socket", "baton-httpd.service"]);
    let port = bed.port;
    let serving = || TcpStream::connect(("127.0.0.1", port)).ok();
    baton_testbed::poll_until("baton-httpd to serve", WAIT, serving).expect("serves");
    let mut journal = bed
        .tb
        .command("journalctl")
        .args(["-f", "-o", "json", "-n", "0", "-u", "baton-httpd.service"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("journalctl -f");
    let tap = LogTap::spawn(journal.stdout.take().expect("piped"));
    // journalctl is following once it printed nothing for a moment.
    std::thread::sleep(Duration::from_millis(500));
    let since = baton_sd::monotonic_usec();
    let pid1_before = cpu_ms(bed.tb.pid());
    let mut run = run_from(
        &tap,
        port,
        n,
        since,
        || bed.systemctl_ok(&["reload", "baton-httpd.service"]),
        || {
            let one = || {
                let out = bed
                    .tb
                    .run(&["/usr/bin/baton", "status", "--json", "--control", "/run/baton-httpd/baton-httpd.sock"])
                    .ok()?;
                let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
                (v["generations"].as_array()?.len() == 1).then_some(())
            };
            baton_testbed::poll_until("the old generation to exit", WAIT, one).expect("one generation left");
        },
    );
    run.pid1_ms = cpu_ms(bed.tb.pid()).zip(pid1_before).map(|(after, before)| after - before);
    let _ = journal.kill();
    let _ = journal.wait();
    Some(run)
}
