//! `baton`: the supervisor and its CLI.
//!
//! Exit codes: 0 success; 1 the operation failed (a restart that did not
//! take, a crash loop); 2 bad usage; 3 no baton is running at the control
//! socket; 4 the control conversation failed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use baton::control::{self, Request, Response};
use baton::listen::{self, BoundSocket, ListenSpec, SocketOptions};
use baton::notify_server::NotifyServer;
use baton::spawn::AppCommand;
use baton::supervisor::{Backoff, Config, Ended, NotifyAccess, Supervisor};
use baton_sd::{FdPoll, ListenFds, Notifier, NotifyState, StoredName};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Restart Linux services without dropping a connection.
///
/// Baton holds your service's listening sockets, starts the new generation,
/// waits for its READY=1, and only then retires the old one.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run COMMAND under supervision, holding its sockets.
    Run(RunArgs),
    /// Start a new generation and retire the current one once it is ready.
    Restart(RestartArgs),
    /// Show generations, sockets and the last failure.
    Status(StatusArgs),
    /// Stop all generations and the supervisor.
    Stop(Target),
    /// Send a notification to $NOTIFY_SOCKET (like systemd-notify).
    Notify(NotifyArgs),
}

#[derive(Debug, Args)]
struct Target {
    /// Instance name (default: the app's program name).
    #[arg(long, short = 'n', default_value = "baton")]
    name: String,
    /// Control socket path (default: derived from --name).
    #[arg(long)]
    control: Option<PathBuf>,
}

impl Target {
    fn path(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(|| control::default_path(&self.name))
    }
}

#[derive(Debug, Args)]
struct RestartArgs {
    #[command(flatten)]
    target: Target,
    /// Return once the request is accepted instead of waiting for the outcome.
    #[arg(long, conflicts_with = "wait")]
    no_block: bool,
    /// Wait for the outcome (the default).
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Socket to hold and pass on, as [NAME=]ADDR: 127.0.0.1:8080, [::]:443, 8080,
    /// udp:ADDR, unix:/path, unix:@abstract, seqpacket:/path. Repeatable.
    #[arg(long = "listen", short = 'l', value_name = "[NAME=]ADDR")]
    listen: Vec<ListenSpec>,
    /// Instance name, for the control socket and logs (default: the program's name).
    #[arg(long, short = 'n')]
    name: Option<String>,
    /// Control socket path (default: $RUNTIME_DIRECTORY/NAME.sock, /run/baton/NAME.sock as root).
    #[arg(long)]
    control: Option<PathBuf>,
    /// listen() backlog.
    #[arg(long)]
    backlog: Option<u32>,
    /// Set SO_REUSEPORT.
    #[arg(long)]
    reuse_port: bool,
    /// IPV6_V6ONLY for IPv6 sockets.
    #[arg(long)]
    v6_only: Option<bool>,
    /// Allow binding addresses not (yet) configured (IP_FREEBIND).
    #[arg(long)]
    freebind: bool,
    /// Mode of unix socket files, octal.
    #[arg(long, value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Owner uid of unix socket files.
    #[arg(long)]
    socket_uid: Option<u32>,
    /// Owner gid of unix socket files.
    #[arg(long)]
    socket_gid: Option<u32>,
    /// How long a new generation may take to send READY=1.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// Signal asking a generation to drain and exit.
    #[arg(long, default_value = "SIGTERM", value_parser = parse_signal)]
    stop_signal: rustix::process::Signal,
    /// Drain deadline after the stop signal, then SIGKILL.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stop_timeout: Duration,
    /// Who may send notifications.
    #[arg(long, value_enum, default_value = "main")]
    notify_access: Access,
    /// Watchdog interval for generations (WATCHDOG_USEC), enforced.
    #[arg(long, value_parser = parse_duration)]
    watchdog: Option<Duration>,
    /// Fd-store capacity (FDSTORE=1 from the app); 0 disables it.
    #[arg(long, default_value_t = 4096)]
    fdstore_max: usize,
    /// Shell command run after READY=1 (with BATON_PID set); the cutover happens only if it succeeds.
    #[arg(long)]
    health_cmd: Option<String>,
    /// Draining generations allowed at once; the oldest is killed beyond this.
    #[arg(long, default_value_t = 4)]
    max_draining: usize,
    /// Crash restarts allowed within --restart-interval before giving up.
    #[arg(long, default_value_t = 10)]
    restart_burst: u32,
    /// Window for --restart-burst.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    restart_interval: Duration,
    /// The app and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Access {
    Main,
    Exec,
    All,
}

#[derive(Debug, Args)]
struct NotifyArgs {
    /// READY=1.
    #[arg(long)]
    ready: bool,
    /// RELOADING=1 with MONOTONIC_USEC.
    #[arg(long)]
    reloading: bool,
    /// STOPPING=1.
    #[arg(long)]
    stopping: bool,
    /// STATUS=TEXT.
    #[arg(long)]
    status: Option<String>,
    /// Fd to store (FDSTORE=1); repeatable.
    #[arg(long = "fd")]
    fds: Vec<i32>,
    /// FDNAME= for --fd.
    #[arg(long)]
    fdname: Option<String>,
    /// Do not wait for the manager to process the message (no BARRIER=1).
    #[arg(long)]
    no_block: bool,
    /// More assignments, KEY=VALUE.
    assignments: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 500ms, 2min)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s, min or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("{s:?} is not an octal mode like 0660"))
}

fn parse_signal(s: &str) -> Result<rustix::process::Signal, String> {
    use rustix::process::Signal;
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Ok(match name {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "KILL" => Signal::KILL,
        "WINCH" => Signal::WINCH,
        _ => return Err(format!("unsupported signal {s:?}: use TERM, INT, QUIT, HUP, USR1, USR2, WINCH or KILL")),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restart(args) => client(&args.target, Request::Restart { wait: !args.no_block }, false),
        Command::Status(args) => client(&args.target, Request::Status, args.json),
        Command::Stop(target) => client(&target, Request::Stop, false),
        Command::Notify(args) => notify(args),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| {
        eprintln!("baton: cannot start the async runtime: {e}");
        std::process::exit(1);
    })
}

fn client(target: &Target, request: Request, json: bool) -> ExitCode {
    let path = target.path();
    match runtime().block_on(control::call(&path, &request)) {
        Err(e @ control::ControlError::Connect { .. }) => {
            eprintln!("baton: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("baton: {e}");
            ExitCode::from(4)
        }
        Ok(response) => print_response(&response, json),
    }
}

fn print_response(response: &Response, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string_pretty(response).unwrap_or_default());
    }
    match response {
        Response::Restarted(done) => {
            if !json {
                let replaced = done.replaced.map(|r| format!(", replacing generation {r}")).unwrap_or_default();
                println!(
                    "generation {} (pid {}) ready after {} ms{replaced}",
                    done.generation, done.pid, done.ready_ms
                );
            }
            ExitCode::SUCCESS
        }
        Response::RestartFailed(f) => {
            eprintln!("baton: restart failed: generation {} {}", f.generation, f.reason);
            if let Some(s) = &f.status_text {
                eprintln!("  last status: {s}");
            }
            if !f.log_tail.is_empty() {
                eprintln!("  last output:");
                for line in &f.log_tail {
                    eprintln!("    {line}");
                }
            }
            match f.serving {
                Some(s) => eprintln!("  generation {s} keeps serving"),
                None => eprintln!("  no generation is serving"),
            }
            ExitCode::from(1)
        }
        Response::Accepted => {
            if !json {
                println!("restart requested");
            }
            ExitCode::SUCCESS
        }
        Response::Status(s) => {
            if !json {
                println!("{} (baton pid {}), up {:.0}s, {} restarts", s.name, s.pid, s.uptime_s, s.restarts);
                for sock in &s.sockets {
                    println!("  socket {}: {}", sock.name, sock.local);
                }
                for g in &s.generations {
                    let status = g.status_text.as_deref().unwrap_or("");
                    println!("  generation {} pid {} {} up {:.0}s {status}", g.generation, g.pid, g.state, g.uptime_s);
                }
                println!("  fd store: {} entries", s.fdstore);
                if let Some(f) = &s.last_failure {
                    println!("  last failure: {f}");
                }
            }
            ExitCode::SUCCESS
        }
        Response::Stopping => {
            if !json {
                println!("stopped");
            }
            ExitCode::SUCCESS
        }
        Response::Error { message } => {
            eprintln!("baton: {message}");
            ExitCode::from(1)
        }
    }
}

fn notify(args: NotifyArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("baton notify: {msg}");
        ExitCode::from(1)
    };
    let notifier = match Notifier::from_env() {
        Ok(Some(n)) => n,
        Ok(None) => return fail("NOTIFY_SOCKET is not set: not run by systemd or baton".into()),
        Err(e) => return fail(e.to_string()),
    };
    let mono = NotifyState::monotonic_usec_now();
    let mut states = Vec::new();
    if args.reloading {
        states.extend([NotifyState::Reloading, mono]);
    }
    if args.ready {
        states.push(NotifyState::Ready);
    }
    if args.stopping {
        states.push(NotifyState::Stopping);
    }
    if let Some(s) = &args.status {
        states.push(NotifyState::Status(s));
    }
    for a in &args.assignments {
        match baton_sd::wire::parse(a.as_bytes()) {
            Ok(m) if m.invalid.is_empty() && m.fields.len() == 1 => states.extend(m.fields),
            _ => return fail(format!("{a:?} is not a valid KEY=VALUE assignment")),
        }
    }
    let mut fds = Vec::new();
    for &fd in &args.fds {
        // SAFETY: only borrowed for the send below; the fd number was given
        // by the caller, and an fd that is not open makes sendmsg fail with
        // EBADF rather than touch anything else.
        fds.push(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
    }
    if !fds.is_empty() {
        states.push(NotifyState::FdStore);
        if let Some(n) = &args.fdname {
            states.push(NotifyState::FdName(n));
        }
    }
    if let Err(e) = notifier.notify_with_fds(&states, &fds) {
        return fail(e.to_string());
    }
    if !args.no_block
        && let Err(e) = notifier.barrier(Duration::from_secs(5))
    {
        return fail(e.to_string());
    }
    ExitCode::SUCCESS
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry().with(filter).with(journald.with_syslog_identifier("baton".into())).init();
        return;
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .init();
}

/// systemd.exec(5): stderr is connected to the journal when
/// `$JOURNAL_STREAM` names its device and inode.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else { return false };
    stream.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

fn run(args: RunArgs) -> ExitCode {
    // Before any thread exists: take and unset what our own manager passed.
    // SAFETY: single-threaded until the runtime is built below.
    let inherited = unsafe { ListenFds::from_env_and_unset() };
    init_logging();
    let mut inherited = match inherited {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let program = PathBuf::from(&args.command[0]);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| program.file_name().map_or_else(|| "baton".into(), |n| n.to_string_lossy().into_owned()));
    let command = match AppCommand::new(&args.command[0], &args.command[1..]) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let upstream = match Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };

    // What systemd (or a parent baton) kept for us: our own listeners from
    // an earlier life, the app's fd-store entries, and socket-unit sockets.
    let mut own: Vec<(String, std::os::fd::OwnedFd)> = inherited
        .take_matching(|n| matches!(StoredName::parse(n), StoredName::Listener(_)))
        .into_iter()
        .map(|(n, fd)| (n["listen/".len()..].to_owned(), fd))
        .collect();
    let stored: Vec<(String, std::os::fd::OwnedFd)> = inherited
        .take_matching(|n| n.starts_with("app/"))
        .into_iter()
        .map(|(n, fd)| (n["app/".len()..].to_owned(), fd))
        .collect();
    let mut sockets: Vec<BoundSocket> = match listen::inherit(&mut inherited) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    for (fd, n, available) in inherited.names() {
        if available {
            tracing::warn!(event = "inherited-ignored", "inherited fd {fd} '{n}' is not a socket; closing it");
        }
    }
    let opts = SocketOptions {
        backlog: args.backlog,
        reuse_port: args.reuse_port,
        v6_only: args.v6_only,
        freebind: args.freebind,
        unix_mode: args.socket_mode,
        unix_owner: (args.socket_uid.is_some() || args.socket_gid.is_some())
            .then_some((args.socket_uid, args.socket_gid)),
    };
    for spec in &args.listen {
        if let Some(i) = own.iter().position(|(n, _)| *n == spec.name) {
            let (name, fd) = own.remove(i);
            let local = listen::describe(std::os::fd::AsFd::as_fd(&fd));
            tracing::info!(event = "socket-adopted", name = %name, "took back {name} ({local}) from the fd store");
            sockets.push(BoundSocket { name, fd, local });
            continue;
        }
        match listen::bind(spec, &opts) {
            Ok(s) => {
                tracing::info!(event = "listening", name = %s.name, "listening on {} as {}", s.local, s.name);
                // Keep it in systemd's store so a restart of baton itself
                // never closes the listener.
                if let Some(up) = &upstream {
                    let stored_name = format!("listen/{}", s.name);
                    if let Err(e) = up.store_fds(&stored_name, &[std::os::fd::AsFd::as_fd(&s.fd)], FdPoll::NoPoll) {
                        tracing::warn!("cannot keep {stored_name} in systemd's fd store: {e}");
                    }
                }
                sockets.push(s);
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        }
    }
    for (name, _) in own {
        tracing::warn!(event = "inherited-ignored", "stored listener {name} is no longer configured; closing it");
    }
    for s in &sockets {
        println!("baton: {} {}", s.name, s.local);
    }
    let control_path = args.control.clone().unwrap_or_else(|| control::default_path(&name));
    let access = match args.notify_access {
        Access::Main => NotifyAccess::Main,
        Access::Exec => NotifyAccess::Exec,
        Access::All => NotifyAccess::All,
    };
    let config = Config {
        name: name.clone(),
        command,
        sockets,
        stored,
        ready_timeout: args.ready_timeout,
        stop_signal: args.stop_signal,
        stop_timeout: args.stop_timeout,
        notify_access: access,
        watchdog: args.watchdog,
        fdstore_max: args.fdstore_max,
        health_cmd: args.health_cmd.clone(),
        max_draining: args.max_draining.max(1),
        backoff: Backoff { burst: args.restart_burst, interval: args.restart_interval, ..Backoff::default() },
    };
    let result = runtime().block_on(async move {
        let (server, requests) = control::ControlServer::start(&control_path).await.map_err(|e| e.to_string())?;
        let notify_path = control_path.with_extension("notify");
        let notify = NotifyServer::bind(&notify_path).map_err(|e| format!("notify socket {}: {e}", notify_path.display()))?;
        tracing::info!(event = "started", control = %server.path().display(), "baton {name}: control socket {}", server.path().display());
        let supervisor = Supervisor::new(config, notify, upstream).map_err(|e| e.to_string())?;
        let ended = supervisor.run(requests).await.map_err(|e| e.to_string());
        server.shutdown(Duration::from_secs(2)).await;
        ended
    });
    match result {
        Ok(Ended::Stopped) => ExitCode::SUCCESS,
        Ok(Ended::CrashLoop(reason)) => {
            tracing::error!("giving up: {reason}");
            ExitCode::from(1)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
