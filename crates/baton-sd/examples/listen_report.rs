//! A tiny service that reports what `baton-sd` makes of its environment, one
//! line per fact on stdout. baton-sd's integration tests run it as a child
//! process, with sockets placed at fds 3.. and `LISTEN_*` set, because
//! activation can only be tested in a process of its own.
//!
//! ```text
//! listen_report [--unset] COMMAND...   # ListenFds::from_env (or from_env_and_unset), then the commands
//! listen_report shutdown               # Shutdown::install, "ready", wait for SIGTERM/SIGINT, send STOPPING=1
//! listen_report watchdog               # watchdog_timeout(); if enabled, ping until killed (at most 60 s)
//! ```
//!
//! Commands, run in order after `from_env`:
//!
//! - `names`: `name FD NAME AVAILABLE` per passed fd;
//! - `cloexec FD`: `cloexec FD yes|no|closed`;
//! - `from-env`: calls `ListenFds::from_env()` again, `again ok len=N`;
//! - `env`: `env VAR VALUE` (or `<unset>`) for the three `LISTEN_*` variables;
//! - `take-fd|take-tcp|take-tcp-stream|take-udp|take-unix-listener|take-unix-stream|take-unix-datagram SEL`:
//!   `KIND SEL: ok fd=N cloexec=yes|no`, `KIND SEL: none` or `KIND SEL: err MESSAGE`
//!   (`SEL` is an index if it parses as one, a name otherwise; taken fds stay
//!   open until exit);
//! - `take-probe`: [`ListenFds::take_probe_listener`], reported like
//!   `take-tcp probe`.
//! - `take-matching PREFIX`: takes every fd whose name starts with `PREFIX`,
//!   `matching NAME fd=N cloexec=yes|no` for each;
//! - `tokio-accept SEL`: takes a tokio TCP listener inside a runtime, prints
//!   `tokio-accept SEL: listening`, accepts one connection, writes `hello\n`
//!   to it and prints `tokio-accept SEL: accepted`;
//! - `tokio-no-runtime SEL`: the same take outside any runtime.
//!
//! Before `from_env` it prints `before FD yes|no|closed` (the `FD_CLOEXEC`
//! state) for fds 3 to 8.

use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use baton_sd::wire::ListenEnv;
use baton_sd::{ListenFds, Select, watchdog};

fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    // The parent reads line by line, sometimes waiting for one: flush each.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn cloexec(fd: RawFd) -> &'static str {
    // SAFETY: only used for fcntl(F_GETFD), which reports a closed fd number
    // as EBADF and changes nothing.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    match rustix::io::fcntl_getfd(borrowed) {
        Ok(flags) if flags.contains(rustix::io::FdFlags::CLOEXEC) => "yes",
        Ok(_) => "no",
        Err(_) => "closed",
    }
}

fn select(arg: &str) -> Select<'_> {
    match arg.parse::<usize>() {
        Ok(i) => Select::Index(i),
        Err(_) => Select::Name(arg),
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        #[cfg(feature = "tokio")]
        Some("shutdown") => return rt::shutdown(),
        Some("watchdog") => return run_watchdog(),
        _ => {}
    }
    for fd in 3..=8 {
        say(format_args!("before {fd} {}", cloexec(fd)));
    }
    let unset = args.first().is_some_and(|a| a == "--unset");
    if unset {
        args.remove(0);
    }
    let result = if unset {
        // SAFETY: no other thread has been started yet.
        unsafe { ListenFds::from_env_and_unset() }
    } else {
        ListenFds::from_env()
    };
    let mut fds = match result {
        Ok(fds) => {
            say(format_args!("from_env ok len={} other_pid={:?}", fds.len(), fds.other_pid()));
            fds
        }
        Err(e) => {
            say(format_args!("from_env err {e}"));
            ListenFds::empty()
        }
    };
    // Taken sockets stay open until exit, so their fd numbers stay theirs.
    let mut keep: Vec<OwnedFd> = Vec::new();
    let mut args = args.iter().map(String::as_str);
    while let Some(cmd) = args.next() {
        match cmd {
            "names" => {
                for (fd, name, available) in fds.names() {
                    say(format_args!("name {fd} {name} {available}"));
                }
            }
            "cloexec" => {
                let fd: RawFd = args.next().and_then(|a| a.parse().ok()).expect("cloexec FD");
                say(format_args!("cloexec {fd} {}", cloexec(fd)));
            }
            "from-env" => match ListenFds::from_env() {
                Ok(again) => say(format_args!("again ok len={}", again.len())),
                Err(e) => say(format_args!("again err {e}")),
            },
            "env" => {
                for var in ListenEnv::VARS.into_iter().chain([ListenEnv::PIDFD_ID_VAR]) {
                    let value = std::env::var(var).unwrap_or_else(|_| "<unset>".into());
                    say(format_args!("env {var} {value}"));
                }
            }
            "take-probe" => report(cmd, "probe", fds.take_probe_listener().map(|o| o.map(OwnedFd::from)), &mut keep),
            "take-matching" => {
                let prefix = args.next().expect("take-matching PREFIX");
                for (name, fd) in fds.take_matching(|n| n.starts_with(prefix)) {
                    let raw = fd.as_raw_fd();
                    say(format_args!("matching {name} fd={raw} cloexec={}", cloexec(raw)));
                    keep.push(fd);
                }
            }
            #[cfg(feature = "tokio")]
            "tokio-accept" => {
                let sel = args.next().expect("tokio-accept SEL");
                rt::tokio_accept(&mut fds, sel);
            }
            #[cfg(feature = "tokio")]
            "tokio-no-runtime" => {
                let sel = args.next().expect("tokio-no-runtime SEL");
                report(cmd, sel, fds.take_tokio_tcp_listener(select(sel)).map(|o| o.map(|l| rt::fd_of(&l))), &mut keep);
            }
            kind => {
                let sel = args.next().unwrap_or_else(|| panic!("{kind} SEL"));
                let s = select(sel);
                let taken: Result<Option<OwnedFd>, _> = match kind {
                    "take-fd" => fds.take_fd(s),
                    "take-tcp" => fds.take_tcp_listener(s).map(|o| o.map(OwnedFd::from)),
                    "take-tcp-stream" => fds.take_tcp_stream(s).map(|o| o.map(OwnedFd::from)),
                    "take-udp" => fds.take_udp_socket(s).map(|o| o.map(OwnedFd::from)),
                    "take-unix-listener" => fds.take_unix_listener(s).map(|o| o.map(OwnedFd::from)),
                    "take-unix-stream" => fds.take_unix_stream(s).map(|o| o.map(OwnedFd::from)),
                    "take-unix-datagram" => fds.take_unix_datagram(s).map(|o| o.map(OwnedFd::from)),
                    other => panic!("unknown command {other}"),
                };
                report(kind, sel, taken, &mut keep);
            }
        }
    }
    drop(keep);
}

fn report(kind: &str, sel: &str, taken: Result<Option<OwnedFd>, baton_sd::ActivationError>, keep: &mut Vec<OwnedFd>) {
    match taken {
        Ok(Some(fd)) => {
            let raw = fd.as_raw_fd();
            say(format_args!("{kind} {sel}: ok fd={raw} cloexec={}", cloexec(raw)));
            keep.push(fd);
        }
        Ok(None) => say(format_args!("{kind} {sel}: none")),
        Err(e) => say(format_args!("{kind} {sel}: err {e}")),
    }
}

fn run_watchdog() {
    let timeout = match watchdog::watchdog_timeout() {
        Ok(Some(t)) => t,
        Ok(None) => return say("watchdog none"),
        Err(e) => return say(format_args!("watchdog err {e}")),
    };
    say(format_args!("watchdog {}us", timeout.as_micros()));
    #[cfg(not(feature = "tokio"))]
    return say("watchdog err the tokio feature is off");
    #[cfg(feature = "tokio")]
    rt::ping(timeout);
}

/// The parts that need the `tokio` feature.
#[cfg(feature = "tokio")]
mod rt {
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Arc;
    use std::time::Duration;

    use baton_sd::shutdown::Shutdown;
    use baton_sd::{ListenFds, Notifier, watchdog};

    use super::{say, select};

    pub fn fd_of(sock: &impl AsFd) -> OwnedFd {
        sock.as_fd().try_clone_to_owned().expect("dup")
    }

    pub fn tokio_accept(fds: &mut ListenFds, sel: &str) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let listener = match fds.take_tokio_tcp_listener(select(sel)) {
                Ok(Some(l)) => l,
                Ok(None) => return say(format_args!("tokio-accept {sel}: none")),
                Err(e) => return say(format_args!("tokio-accept {sel}: err {e}")),
            };
            say(format_args!("tokio-accept {sel}: listening"));
            let accepted = tokio::time::timeout(Duration::from_secs(60), listener.accept()).await;
            let Ok(Ok((mut stream, _))) = accepted else {
                return say(format_args!("tokio-accept {sel}: accept failed {accepted:?}"));
            };
            use tokio::io::AsyncWriteExt as _;
            stream.write_all(b"hello\n").await.expect("write");
            say(format_args!("tokio-accept {sel}: accepted"));
        });
    }

    pub fn shutdown() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let ok = rt.block_on(async {
            let notifier = match Notifier::from_env() {
                Ok(n) => n,
                Err(e) => {
                    say(format_args!("notifier err {e}"));
                    return false;
                }
            };
            let mut shutdown = Shutdown::install().expect("install signal handlers");
            say("ready");
            let (signal, sent) = shutdown.wait(notifier.as_ref()).await;
            say(format_args!("stopped {signal:?} sent={sent:?}"));
            sent.is_ok()
        });
        std::process::exit(if ok { 0 } else { 1 });
    }

    pub fn ping(timeout: Duration) {
        let Some(notifier) = Notifier::from_env().expect("NOTIFY_SOCKET") else {
            return say("watchdog no NOTIFY_SOCKET");
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let task = watchdog::spawn_watchdog(Arc::new(notifier), timeout);
            // The parent kills us once it has seen enough pings; never outlive it by much.
            tokio::select! {
                end = task => say(format_args!("watchdog task ended {end:?}")),
                _ = tokio::time::sleep(Duration::from_secs(60)) => say("watchdog gave up"),
            }
        });
    }
}
