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
//! | `--fail-if-exists FILE` | exit 3 before `READY=1` while FILE exists (fault tests) |
//! | `--hang-if-exists FILE` | never send `READY=1` while FILE exists (fault tests) |
//!
//! On SIGTERM it sends `STOPPING=1`, stops accepting, finishes the
//! connections it accepted, reports `stopping` and exits 0.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use baton_sd::shutdown::{Drain, Shutdown};
use baton_sd::{FdKind, ListenFds, Notifier, NotifyState, watchdog};
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
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// Appends observations to the report file, one line each, flushed at once so
/// a crash loses nothing already reported.
struct Report(Option<File>);

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        if let Some(f) = &mut self.0 {
            // A failing report must not change the service's behaviour.
            let _ = writeln!(f, "{}", line.as_ref());
        }
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("baton-sd-probe: {e}");
            std::process::exit(2);
        }
    };
    let mut report = Report(opts.report.as_ref().map(|p| {
        OpenOptions::new().create(true).append(true).open(p).unwrap_or_else(|e| {
            eprintln!("baton-sd-probe: cannot open report {p}: {e}");
            std::process::exit(2);
        })
    }));
    report.line(format!("start pid={}", std::process::id()));
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
    for name in &opts.serve {
        match fds.take_tokio_tcp_listener(name.as_str()) {
            Ok(Some(listener)) => {
                let reply = format!("{name} {}\n", std::process::id());
                let drain = drain.clone();
                acceptors.push(tokio::spawn(async move {
                    while let Ok((mut stream, _)) = listener.accept().await {
                        let reply = reply.clone();
                        let guard = drain.track();
                        tokio::spawn(async move {
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
        std::future::pending::<()>().await;
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

    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            report.line(format!("error signals: {e}"));
            return 1;
        }
    };
    loop {
        tokio::select! {
            (sig, sent) = shutdown.wait(notifier.as_deref()) => {
                // Stop accepting (dropping the listeners), then finish what
                // was accepted: the listening socket itself stays open in the
                // manager, so new connections wait for the next generation.
                for a in &acceptors {
                    a.abort();
                }
                let drained = drain.wait_idle(Duration::from_secs(10)).await.is_ok();
                report.line(format!("stopping signal={sig:?} notified={} drained={drained}", sent.is_ok()));
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

fn store_memfd(notifier: Option<&Notifier>, name: &str, text: &str) -> Result<(), Box<dyn std::error::Error>> {
    let Some(n) = notifier else { return Err("no NOTIFY_SOCKET".into()) };
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.write_all_at(text.as_bytes(), 0)?;
    n.store_fds(name, &[std::os::fd::AsFd::as_fd(&file)], baton_sd::FdPoll::Poll)?;
    Ok(())
}
