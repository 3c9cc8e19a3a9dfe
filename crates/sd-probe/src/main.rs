//! `baton-sd-probe`: a tiny service built only on `baton-sd`, run by the
//! conformance tests as a real systemd (or Baton) service.
//!
//! Each start appends a block to the report file (`--report FILE`), which the
//! tests read from outside the service manager:
//!
//! ```text
//! start pid=1234
//! fd 3 name=http kind=a listening TCP socket
//! stored name=state content=hello
//! ready
//! ```
//!
//! Options (all optional, any order):
//!
//! | option | effect |
//! |---|---|
//! | `--report FILE` | where to append observations |
//! | `--serve NAME` | take the TCP listener named NAME and answer each connection with `NAME PID\n` |
//! | `--status TEXT` | send `STATUS=TEXT` with `READY=1` |
//! | `--ready-delay-ms N` | wait N ms before `READY=1` |
//! | `--extend-ms N` | while waiting, send `EXTEND_TIMEOUT_USEC` = N ms every N/2 ms |
//! | `--store NAME=TEXT` | unless a stored fd NAME was passed in, store a memfd holding TEXT |
//! | `--remove NAME` | send `FDSTOREREMOVE=1` for NAME after start |
//! | `--barrier` | send `BARRIER=1` after `READY=1` and report `barrier ok` |
//! | `--watchdog` | ping the watchdog when `WATCHDOG_USEC` asks for it |
//! | `--reload` | on SIGHUP: `RELOADING=1` + `MONOTONIC_USEC`, report `reloaded`, `READY=1` |
//! | `--hold` | keep accepted connections unanswered; on SIGTERM hand them over (`FDSTORE=1`, `FDNAME=conn`); adopt handed-over ones (LISTEN_FDS or `$BATON_HANDOFF_SOCKET`) and answer `http PID` on them |
//! | `--handoff-gate FILE` | with `--hold`: connect to `$BATON_HANDOFF_SOCKET` only once FILE exists (tests a receiver that connects late) |
//! | `--fail-if-exists FILE` | exit 3 before `READY=1` while FILE exists (fault tests) |
//! | `--hang-if-exists FILE` | never send `READY=1` while FILE exists (fault tests) |
//! | `--reply-delay-ms N` | wait N ms before answering each connection (a slow request, in flight when a signal comes) |
//! | `--ignore-sigterm` | on SIGTERM (and SIGINT) report `ignoring signal=SIGTERM` and keep serving: only SIGKILL ends it (fault tests) |
//! | `--stop-on-usr1` | on SIGUSR1 send `STOPPING=1` on its own, report `stopping-self`, then stop as on SIGTERM (fault tests) |
//! | `--abuse` | after `READY=1`, send the malformed notify datagrams described at [`send_abuse`], then `STATUS=abuse done by PID` and a barrier; report `abuse sent=N barrier=.. fds-closed=..` (fault tests) |
//! | `--abuse-only` | send that battery as an unrelated helper process (no listeners, no `READY=1`), report, exit 0 |
//! | `--timestamps` | end every report line with ` pid=PID mono_us=T` (`CLOCK_MONOTONIC`, µs; `start` is taken first thing in `main`) and report `signal-received` the moment a stop signal arrives (benchmarks) |
//!
//! On SIGTERM it sends `STOPPING=1`, stops accepting, finishes the
//! connections it accepted, reports `stopping` and exits 0.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use baton_sd::shutdown::{Drain, Shutdown};
use baton_sd::{FdKind, ListenFds, Notifier, NotifyState, StoredName, watchdog};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Default)]
struct Options {
    report: Option<String>,
    serve: Vec<String>,
    status: Option<String>,
    ready_delay: Duration,
    extend: Option<Duration>,
    store: Vec<(String, String)>,
    remove: Vec<String>,
    barrier: bool,
    watchdog: bool,
    reload: bool,
    fail_if_exists: Option<String>,
    hang_if_exists: Option<String>,
    reply_delay: Duration,
    hold: bool,
    handoff_gate: Option<String>,
    ignore_sigterm: bool,
    stop_on_usr1: bool,
    abuse: bool,
    abuse_only: bool,
    timestamps: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let ms = |v: String| v.parse().map(Duration::from_millis).map_err(|e| format!("{v:?}: {e}"));
        match flag.as_str() {
            "--report" => o.report = Some(value()?),
            "--serve" => o.serve.push(value()?),
            "--status" => o.status = Some(value()?),
            "--ready-delay-ms" => o.ready_delay = ms(value()?)?,
            "--extend-ms" => o.extend = Some(ms(value()?)?),
            "--store" => {
                let v = value()?;
                let (n, t) = v.split_once('=').ok_or("--store wants NAME=TEXT")?;
                o.store.push((n.to_owned(), t.to_owned()));
            }
            "--remove" => o.remove.push(value()?),
            "--barrier" => o.barrier = true,
            "--watchdog" => o.watchdog = true,
            "--reload" => o.reload = true,
            "--fail-if-exists" => o.fail_if_exists = Some(value()?),
            "--hang-if-exists" => o.hang_if_exists = Some(value()?),
            "--reply-delay-ms" => o.reply_delay = ms(value()?)?,
            "--hold" => o.hold = true,
            "--handoff-gate" => o.handoff_gate = Some(value()?),
            "--ignore-sigterm" => o.ignore_sigterm = true,
            "--stop-on-usr1" => o.stop_on_usr1 = true,
            "--abuse" => o.abuse = true,
            "--abuse-only" => o.abuse_only = true,
            "--timestamps" => o.timestamps = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// Appends observations to the report file, one line each, flushed at once so
/// a crash loses nothing already reported.
struct Report {
    file: Option<File>,
    /// `--timestamps`: suffix every line with the pid and `CLOCK_MONOTONIC`.
    timestamps: bool,
}

impl Report {
    /// One line from a task that does not own the report (one write(2)).
    fn append(path: Option<&str>, line: &str) {
        if let Some(p) = path
            && let Ok(mut f) = OpenOptions::new().append(true).open(p)
        {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    fn line(&mut self, line: impl AsRef<str>) {
        self.line_at(line, baton_sd::monotonic_usec());
    }

    /// A line observed at `at` (µs of `CLOCK_MONOTONIC`).
    fn line_at(&mut self, line: impl AsRef<str>, at: u64) {
        if let Some(f) = &mut self.file {
            let mut text = line.as_ref().to_owned();
            if self.timestamps {
                text.push_str(&format!(" pid={} mono_us={at}", std::process::id()));
            }
            text.push('\n');
            // One write(2) per line: several generations append to the same
            // file (O_APPEND), and a line split over two writes could be
            // interleaved with another process's line.
            // A failing report must not change the service's behaviour.
            let _ = f.write_all(text.as_bytes());
        }
    }
}

fn main() {
    // Before anything else: `--timestamps` reports it as the start time.
    let started = baton_sd::monotonic_usec();
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("baton-sd-probe: {e}");
            std::process::exit(2);
        }
    };
    let file = opts.report.as_ref().map(|p| {
        OpenOptions::new().create(true).append(true).open(p).unwrap_or_else(|e| {
            eprintln!("baton-sd-probe: cannot open report {p}: {e}");
            std::process::exit(2);
        })
    });
    let mut report = Report { file, timestamps: opts.timestamps };
    report.line_at(format!("start pid={}", std::process::id()), started);
    if opts.abuse_only {
        std::process::exit(abuse_only(&mut report));
    }
    // SAFETY: still single-threaded: the runtime is built below.
    let fds = match unsafe { ListenFds::from_env_and_unset() } {
        Ok(fds) => fds,
        Err(e) => {
            report.line(format!("error {e}"));
            eprintln!("baton-sd-probe: {e}");
            std::process::exit(1);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(run(opts, fds, report));
    std::process::exit(code);
}

async fn run(opts: Options, mut fds: ListenFds, mut report: Report) -> i32 {
    if let Some((theirs, ours)) = fds.other_pid() {
        report.line(format!("other-pid listen_pid={theirs} own_pid={ours}"));
    }
    let names: Vec<(i32, String)> = fds.names().map(|(fd, n, _)| (fd, n.to_owned())).collect();
    for (fd, name) in &names {
        // SAFETY: `fd` is one of the passed fds, still owned by `fds` and
        // open for the duration of this call.
        let kind = FdKind::of(unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) });
        let kind = kind.map_or_else(|e| format!("error {e}"), |k| k.to_string());
        report.line(format!("fd {fd} name={name} kind={kind}"));
    }
    let notifier = match Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            report.line(format!("error {e}"));
            return 1;
        }
    };
    let mut shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            report.line(format!("error signals: {e}"));
            return 1;
        }
    };
    let notify = |states: &[NotifyState<'_>]| {
        if let Some(n) = &notifier
            && let Err(e) = n.notify(states)
        {
            eprintln!("baton-sd-probe: notify: {e}");
        }
    };

    // Stored fds come back in LISTEN_FDS under their names.
    let store_names: Vec<&str> = opts.store.iter().map(|(n, _)| n.as_str()).collect();
    for (name, fd) in fds.take_matching(|n| store_names.contains(&n)) {
        let mut buf = vec![0u8; 4096];
        let len = File::from(fd).read_at(&mut buf, 0).unwrap_or(0);
        report.line(format!("stored name={name} content={}", String::from_utf8_lossy(&buf[..len])));
    }
    let received: Vec<String> = names.iter().map(|(_, n)| n.clone()).collect();
    for (name, text) in &opts.store {
        if received.contains(name) {
            continue;
        }
        match store_memfd(notifier.as_deref(), name, text) {
            Ok(()) => report.line(format!("store-sent name={name}")),
            Err(e) => report.line(format!("error store {name}: {e}")),
        }
    }
    for name in &opts.remove {
        if let Some(n) = &notifier {
            match n.remove_fds(name) {
                Ok(()) => report.line(format!("remove-sent name={name}")),
                Err(e) => report.line(format!("error remove {name}: {e}")),
            }
        }
    }

    let drain = Drain::new();
    let mut acceptors = Vec::new();
    // --hold: connections are kept unanswered and handed over on stop; the
    // generation that gets them (by LISTEN_FDS or Baton's handoff socket)
    // answers on the same TCP connection.
    let held: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    if opts.hold {
        let adopted = fds.take_matching(|n| StoredName::parse(n) == StoredName::Connection);
        if !adopted.is_empty() {
            report.line(format!("adopted {}", adopted.len()));
            for (_, fd) in adopted {
                answer_held(fd);
            }
            if let Some(n) = &notifier {
                let _ = n.remove_fds(baton_sd::fdstore::CONNECTION);
            }
        }
        let gate = opts.handoff_gate.clone();
        let report_path = opts.report.clone();
        tokio::spawn(async move {
            if let Some(gate) = gate {
                while !std::path::Path::new(&gate).exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            match baton_sd::handoff::HandoffReceiver::connect_from_env() {
                Ok(Some(mut receiver)) => {
                    while let Ok(Some(handoff)) = receiver.recv().await {
                        let count = handoff.fds.len();
                        for fd in handoff.fds {
                            answer_held(fd);
                        }
                        Report::append(
                            report_path.as_deref(),
                            &format!("received name={} count={count}", handoff.name),
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => Report::append(report_path.as_deref(), &format!("error handoff: {e}")),
            }
        });
    }
    for name in &opts.serve {
        match fds.take_tokio_tcp_listener(name.as_str()) {
            Ok(Some(listener)) => {
                let reply = format!("{name} {}\n", std::process::id());
                let drain = drain.clone();
                let delay = opts.reply_delay;
                let held = opts.hold.then(|| (Arc::clone(&held), opts.report.clone()));
                acceptors.push(tokio::spawn(async move {
                    while let Ok((mut stream, _)) = listener.accept().await {
                        if let Some((held, report)) = &held {
                            if let Ok(s) = stream.into_std() {
                                held.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                                Report::append(report.as_deref(), "held");
                            }
                            continue;
                        }
                        let reply = reply.clone();
                        let guard = drain.track();
                        tokio::spawn(async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let _ = stream.write_all(reply.as_bytes()).await;
                            drop(guard);
                        });
                    }
                }));
            }
            Ok(None) => report.line(format!("missing listener {name}")),
            Err(e) => {
                report.line(format!("error {e}"));
                eprintln!("baton-sd-probe: {e}");
                return 1;
            }
        }
    }

    // Start-up work, kept alive past TimeoutStartSec= by EXTEND_TIMEOUT_USEC.
    if !opts.ready_delay.is_zero() {
        let sleep = tokio::time::sleep(opts.ready_delay);
        tokio::pin!(sleep);
        if let Some(extend) = opts.extend {
            let mut tick = tokio::time::interval(extend / 2);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = tick.tick() => {
                        notify(&[NotifyState::ExtendTimeoutUsec(extend.as_micros() as u64)]);
                        report.line("extend-sent");
                    }
                }
            }
        } else {
            sleep.await;
        }
    }

    // Signal handlers before READY=1: once the manager sees READY, tests
    // (and admins) may signal us at once.
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            report.line(format!("error signals: {e}"));
            return 1;
        }
    };
    // Only installed when asked for: an installed handler changes what the
    // signal does to the process (SIGUSR1 would no longer kill it).
    let optional = |wanted: bool, kind: SignalKind| if wanted { signal(kind).ok() } else { None };
    let mut ignored_term = optional(opts.ignore_sigterm, SignalKind::terminate());
    let mut usr1 = optional(opts.stop_on_usr1, SignalKind::user_defined1());
    if let Some(f) = &opts.fail_if_exists
        && std::path::Path::new(f).exists()
    {
        report.line("failing before ready");
        eprintln!("baton-sd-probe: {f} exists, failing before READY=1");
        return 3;
    }
    if let Some(f) = &opts.hang_if_exists
        && std::path::Path::new(f).exists()
    {
        report.line("hanging before ready");
        // Never ready, but still stops cleanly when told to, like a real
        // app stuck in a slow start.
        let (sig, _) = shutdown.wait(notifier.as_deref()).await;
        let drained = stop_serving(&acceptors, &drain).await;
        report.line(format!("stopping signal={sig:?} notified=true drained={drained}"));
        return 0;
    }
    report.line("ready");
    let status = opts.status.clone().unwrap_or_else(|| format!("serving as pid {}", std::process::id()));
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    if opts.barrier
        && let Some(n) = &notifier
    {
        match n.barrier_async(Duration::from_secs(5)).await {
            Ok(()) => report.line("barrier ok"),
            Err(e) => report.line(format!("barrier error {e}")),
        }
    }
    if opts.abuse
        && let Some(n) = &notifier
    {
        let sent = send_abuse(n);
        let barrier = n.barrier_async(Duration::from_secs(5)).await;
        report.line(abuse_outcome(sent, barrier));
    }
    if opts.watchdog {
        match (watchdog::watchdog_timeout(), &notifier) {
            (Ok(Some(timeout)), Some(n)) => {
                watchdog::spawn_watchdog(Arc::clone(n), timeout);
                report.line(format!("watchdog usec={}", timeout.as_micros()));
            }
            (Ok(_), _) => report.line("watchdog off"),
            (Err(e), _) => report.line(format!("error {e}")),
        }
    }

    loop {
        tokio::select! {
            (sig, sent) = shutdown.wait(notifier.as_deref()), if !opts.ignore_sigterm => {
                if opts.timestamps {
                    report.line(format!("signal-received signal={sig:?}"));
                }
                let drained = stop_serving(&acceptors, &drain).await;
                if opts.hold {
                    let streams = std::mem::take(&mut *held.lock().unwrap_or_else(|e| e.into_inner()));
                    report.line(format!("handed-over {}", hand_over(notifier.as_deref(), streams).await));
                }
                report.line(format!("stopping signal={sig:?} notified={} drained={drained}", sent.is_ok()));
                return 0;
            }
            () = next_signal(&mut ignored_term) => {
                report.line("ignoring signal=SIGTERM");
            }
            () = next_signal(&mut usr1) => {
                // The app decides to stop by itself (e.g. a fatal config
                // change): tell the manager first, so it starts a
                // replacement instead of seeing a crash.
                notify(&[NotifyState::Stopping, NotifyState::Status("stopping on its own")]);
                report.line("stopping-self");
                let drained = stop_serving(&acceptors, &drain).await;
                report.line(format!("stopping signal=SIGUSR1 notified=true drained={drained}"));
                return 0;
            }
            _ = hup.recv(), if opts.reload => {
                notify(&[NotifyState::Reloading, NotifyState::monotonic_usec_now()]);
                report.line("reloaded");
                notify(&[NotifyState::Ready]);
            }
        }
    }
}

/// Answers a handed-over connection with `http PID` and closes it.
fn answer_held(fd: std::os::fd::OwnedFd) {
    let mut stream = std::net::TcpStream::from(fd);
    let _ = std::io::Write::write_all(&mut stream, format!("http {}\n", std::process::id()).as_bytes());
}

/// Stores held connections under `conn` (253 per datagram), waits for the
/// manager to process them, and returns how many were stored.
async fn hand_over(notifier: Option<&Notifier>, streams: Vec<std::net::TcpStream>) -> usize {
    let Some(n) = notifier else { return 0 };
    let mut stored = 0;
    for batch in streams.chunks(baton_sd::wire::SCM_MAX_FD) {
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = batch.iter().map(std::os::fd::AsFd::as_fd).collect();
        if n.store_fds(baton_sd::fdstore::CONNECTION, &fds, baton_sd::FdPoll::Poll).is_ok() {
            stored += batch.len();
        }
    }
    let _ = n.barrier_async(Duration::from_secs(5)).await;
    stored
}

/// Stops accepting (dropping the listeners), then finishes what was
/// accepted: the listening socket itself stays open in the manager, so new
/// connections wait for the next generation. Returns whether everything
/// drained within 10 s.
async fn stop_serving(acceptors: &[tokio::task::JoinHandle<()>], drain: &Drain) -> bool {
    for a in acceptors {
        a.abort();
    }
    drain.wait_idle(Duration::from_secs(10)).await.is_ok()
}

/// The next delivery of an optional signal; never resolves without one.
async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// `--abuse-only`: the battery from a process that is not the generation's
/// main process (or not in any generation at all), then exit.
fn abuse_only(report: &mut Report) -> i32 {
    match Notifier::from_env() {
        Ok(Some(n)) => {
            let sent = send_abuse(&n);
            let barrier = n.barrier(Duration::from_secs(5));
            report.line(abuse_outcome(sent, barrier));
            0
        }
        Ok(None) => {
            report.line("error abuse: NOTIFY_SOCKET is not set");
            1
        }
        Err(e) => {
            report.line(format!("error abuse: {e}"));
            1
        }
    }
}

/// The report line after [`send_abuse`] and the barrier that follows it.
fn abuse_outcome(sent: Result<(usize, bool), String>, barrier: Result<(), baton_sd::NotifyError>) -> String {
    let barrier = match barrier {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("error({e})"),
    };
    match sent {
        Ok((n, closed)) => format!("abuse sent={n} barrier={barrier} fds-closed={closed}"),
        Err(e) => format!("error abuse: {e} barrier={barrier}"),
    }
}

/// Sends notify datagrams that a correct manager must refuse or ignore
/// without changing state, then a valid `STATUS=abuse done by PID`. Each malformed
/// datagram is sent twice, once ending in `READY=1` and once in
/// `STOPPING=1`, so a manager that wrongly acted on it would visibly change
/// the generation's state (a starting one becomes active, an active one is
/// replaced):
///
/// - longer than `NOTIFY_BUFFER_MAX` (5000 bytes with an fd, and 64 KiB);
/// - a NUL byte inside; `BARRIER=1` with other assignments;
///
/// and these, which are harmless but must not upset the manager:
///
/// - garbage (non-UTF-8, lines without `=`, empty lines), an empty datagram,
///   a 4000-byte line, invalid values of known keys (`MAINPID=0`,
///   `MAINPID=` of the parent process, `WATCHDOG=bogus`,
///   an overflowing `EXTEND_TIMEOUT_USEC`, `ERRNO=99999`, `FDNAME=a:b`);
/// - `BARRIER=1` with no fd and with two; fds without `FDSTORE=1` (3, and
///   250 in one datagram); `FDSTORE=1` without fds; `FDSTOREREMOVE=1`
///   without `FDNAME=`;
/// - a flood of 1000 one-byte datagrams.
///
/// Every fd sent is a duplicate of one pipe's write end: once the manager
/// has processed (and closed) all of them, the read end sees end-of-file,
/// which is the returned `bool` (waited for up to 5 s). Returns how many
/// datagrams were sent.
fn send_abuse(n: &Notifier) -> Result<(usize, bool), String> {
    use std::os::fd::{AsFd, BorrowedFd};
    let (read_end, write_end) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| format!("creating the pipe: {e}"))?;
    let w = write_end.as_fd();
    let mut battery: Vec<(Vec<u8>, Vec<BorrowedFd<'_>>)> = Vec::new();
    for lifecycle in ["READY=1", "STOPPING=1"] {
        let big = |len: usize| format!("STATUS={}\n{lifecycle}", "x".repeat(len)).into_bytes();
        battery.push((big(5000), vec![w]));
        battery.push((big(64 * 1024), vec![]));
        battery.push((format!("STATUS=nul\0{lifecycle}\n").into_bytes(), vec![]));
        battery.push((format!("{lifecycle}\0").repeat(2).into_bytes(), vec![]));
        battery.push((format!("BARRIER=1\n{lifecycle}").into_bytes(), vec![w]));
    }
    let mut garbage = b"\xff\xfe\x80\x01garbage\n\r\n===\n=\nREADY\nSTOPPING=yes\nREADY=0\n".to_vec();
    garbage.extend_from_slice(b"STATUS=\xc3\x28\n");
    battery.push((garbage, vec![]));
    battery.push((Vec::new(), vec![]));
    battery.push(("A".repeat(4000).into_bytes(), vec![]));
    // The parent is outside the generation's process group, except for a
    // helper forked by the main process, for which MAINPID= names the main
    // process itself: either way nothing changes.
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    battery.push((
        format!(
            "MAINPID=0\nMAINPID={parent}\nWATCHDOG=bogus\nWATCHDOG_USEC=abc\n\
             EXTEND_TIMEOUT_USEC=99999999999999999999999\nERRNO=99999\nFDNAME=a:b"
        )
        .into_bytes(),
        vec![],
    ));
    battery.push((b"BARRIER=1".to_vec(), vec![]));
    battery.push((b"BARRIER=1".to_vec(), vec![w, w]));
    battery.push((b"STATUS=fds without FDSTORE=1".to_vec(), vec![w; 3]));
    battery.push((b"FDNAME=junk".to_vec(), vec![w; 250]));
    battery.push((b"FDSTORE=1\nFDNAME=nofds".to_vec(), vec![]));
    battery.push((b"FDSTOREREMOVE=1".to_vec(), vec![]));
    for _ in 0..1000 {
        battery.push((b"x".to_vec(), vec![]));
    }
    for (i, (payload, fds)) in battery.iter().enumerate() {
        n.send_raw(payload, fds).map_err(|e| format!("datagram {i} of {}: {e}", battery.len()))?;
    }
    let done = format!("abuse done by {}", std::process::id());
    n.notify(&[NotifyState::Status(&done)]).map_err(|e| e.to_string())?;
    let sent = battery.len() + 1;
    drop(battery);
    drop(write_end);
    // End-of-file once every copy of the write end is closed.
    let ts = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
    let mut pfd = [rustix::event::PollFd::new(&read_end, rustix::event::PollFlags::IN)];
    let closed = match rustix::event::poll(&mut pfd, Some(&ts)) {
        Ok(0) | Err(_) => false,
        Ok(_) => matches!(rustix::io::read(&read_end, &mut [0u8; 1]), Ok(0)),
    };
    Ok((sent, closed))
}

fn store_memfd(notifier: Option<&Notifier>, name: &str, text: &str) -> Result<(), Box<dyn std::error::Error>> {
    let Some(n) = notifier else { return Err("no NOTIFY_SOCKET".into()) };
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.write_all_at(text.as_bytes(), 0)?;
    n.store_fds(name, &[std::os::fd::AsFd::as_fd(&file)], baton_sd::FdPoll::Poll)?;
    Ok(())
}
