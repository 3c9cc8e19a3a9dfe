//! `baton`: the supervisor and its CLI.
//!
//! Exit codes: 0 success; 1 the operation failed (a restart that did not
//! take, a crash loop); 2 bad usage; 3 no baton is running at the control
//! socket; 4 the control conversation failed (also: a control socket this
//! user may not use, which says nothing about whether a baton runs there).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use baton::cli::{Cli, Command, MainPidArg, NotifyArgs, RunArgs, Target};
use baton::control::{self, Request, Response};
use baton::listen::{self, BoundSocket, SocketOptions};
use baton::notify_refusal::BarrierReply;
use baton::notify_server::NotifyServer;
use baton::output::OutputMode;
use baton::spawn::AppCommand;
use baton::supervisor::{Config, Ended, Supervisor};
use baton_sd::{FdPoll, ListenFds, Notifier, NotifyState, StoredName};
use clap::Parser;

fn main() -> ExitCode {
    // Started by `baton upgrade`: everything comes from the previous image's
    // state, not from the command line, which this (newer) baton may no
    // longer accept; failing to parse it must not orphan the generations.
    // SAFETY: single-threaded until a runtime is built.
    if let Some(arrival) = unsafe { baton::upgrade::take_from_env() } {
        return run_adopted(arrival);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restart(args) => client(&args.target, Request::Restart { wait: !args.no_block }, false),
        Command::Status(args) => client(&args.target, Request::Status, args.json),
        Command::Stop(target) => client(&target, Request::Stop, false),
        Command::Notify(args) => notify(args),
        Command::Upgrade(args) => {
            // Baton's working directory is not ours: send an absolute path.
            let binary = args.binary.map(|b| std::env::current_dir().map(|d| d.join(&b)).unwrap_or(b));
            client(&args.target, Request::Upgrade { binary }, false)
        }
        Command::UpgradeProbe => {
            println!("{}", baton::upgrade::probe_line());
            ExitCode::SUCCESS
        }
        Command::Units(args) => match baton::units::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("baton units: {e}");
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Signals Baton handles go to the supervisor's thread only, which
        // blocks them before `baton upgrade` re-executes: pending, they
        // survive the exec (see `baton::upgrade`).
        .on_thread_start(baton::upgrade::block_handled_signals)
        .build()
        .unwrap_or_else(|e| {
            eprintln!("baton: cannot start the async runtime: {e}");
            std::process::exit(1);
        })
}

fn client(target: &Target, request: Request, json: bool) -> ExitCode {
    let path = target.path();
    match runtime().block_on(control::call(&path, &request)) {
        // Only "nothing there" is 3: a socket we may not use (`Denied`) may
        // well have a baton behind it, so 3 would send a script off to start
        // a second one; the conversation failed at its first step, which is 4.
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
                let took = done.took_traffic_ms.map(|t| format!(", took the traffic after {t} ms")).unwrap_or_default();
                let replaced = match (done.replaced, done.probation_ms) {
                    (Some(r), Some(p)) => format!(", replacing generation {r} after {p} ms of probation"),
                    (Some(r), None) => format!(", replacing generation {r}"),
                    (None, _) => String::new(),
                };
                println!(
                    "generation {} (pid {}) ready after {} ms{took}{replaced}",
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
                println!(
                    "{} (baton pid {}), up {:.0}s, {}",
                    s.name,
                    s.pid,
                    s.uptime_s,
                    count(s.restarts, "restart", "restarts")
                );
                for sock in &s.sockets {
                    println!("  socket {}: {}", sock.name, sock.local);
                }
                for g in &s.generations {
                    let status = g.status_text.as_deref().unwrap_or("");
                    let probe = g.probe.as_ref().map(|a| format!("probe {a} ")).unwrap_or_default();
                    let proving = g.proving.as_ref().map(|p| format!("({p}) ")).unwrap_or_default();
                    let steered = if g.steered { "takes new connections " } else { "" };
                    println!(
                        "  generation {} pid {} {} up {:.0}s {proving}{steered}{probe}{status}",
                        g.generation, g.pid, g.state, g.uptime_s
                    );
                }
                println!("  fd store: {}", count(s.fdstore as u64, "entry", "entries"));
                println!(
                    "  baton {} ({}), image up {:.0}s, {}",
                    s.version,
                    s.binary.as_deref().unwrap_or("binary unknown"),
                    s.image_uptime_s,
                    count(s.upgrades, "upgrade", "upgrades")
                );
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
        Response::Upgraded(u) => {
            if !json {
                println!(
                    "upgraded: pid {}, version {} ({}), serving control requests after {} ms; {} kept",
                    u.pid,
                    u.version,
                    u.binary,
                    u.elapsed_ms,
                    count(u.generations as u64, "generation", "generations")
                );
            }
            ExitCode::SUCCESS
        }
        Response::Error { message } => {
            eprintln!("baton: {message}");
            ExitCode::from(1)
        }
    }
}

/// `n` and the noun in the right number: "1 restart", "2 restarts".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
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
        // SAFETY: F_GETFD only reads the fd's flags; on a number that is not
        // open it fails with EBADF and touches nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            let e = std::io::Error::last_os_error();
            eprintln!(
                "baton notify: --fd {fd}: not an open file descriptor of this process ({e}); \
                 open it first, e.g. `baton notify --fd 3 3<FILE`"
            );
            return ExitCode::from(2);
        }
        // SAFETY: open (checked above; `parse_fd` rules out the -1 a
        // `BorrowedFd` cannot hold) and only borrowed for the send below;
        // nothing in this single-threaded command closes it meanwhile.
        fds.push(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
    }
    if !fds.is_empty() {
        states.push(NotifyState::FdStore);
        if let Some(n) = &args.fdname {
            states.push(NotifyState::FdName(n));
        }
    }
    let sent = match args.pid {
        Some(which) => {
            let pid = match which {
                MainPidArg::Pid(p) => p,
                MainPidArg::Parent => match rustix::process::getppid() {
                    Some(p) => p.as_raw_nonzero().get() as u32,
                    None => return fail("--pid parent: the parent is outside this pid namespace; give its pid".into()),
                },
            };
            notifier.notify_main_pid(pid, &states)
        }
        None => notifier.notify_with_fds(&states, &fds),
    };
    if let Err(e) = sent {
        return fail(e.to_string());
    }
    if args.no_block {
        // Without a barrier nothing comes back, not even a refusal.
        return ExitCode::SUCCESS;
    }
    match baton::notify_refusal::barrier_with_reply(&notifier, Duration::from_secs(5)) {
        Ok(BarrierReply::Processed) => ExitCode::SUCCESS,
        Ok(BarrierReply::Refused(reason)) => fail(format!("baton refused the notification: {reason}")),
        Err(e) => fail(e),
    }
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if baton::output::stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        // Fields as BATON_<NAME> (tracing-journald upper-cases the field's
        // name after the prefix): `generation` and `pid` become
        // BATON_GENERATION= and BATON_PID=, the fields piped app lines carry,
        // so `journalctl -u app BATON_GENERATION=3` finds both.
        let journald = journald.with_syslog_identifier("baton".into()).with_field_prefix(Some("BATON".into()));
        tracing_subscriber::registry().with(filter).with(journald).init();
        return;
    }
    // Colour for a person at a terminal only: escape codes in a log file or
    // a pipe are noise. NO_COLOR (https://no-color.org) set and not empty
    // turns it off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(colour))
        .init();
}

/// Fds reserved ahead beyond the store's maximum: two notify datagrams' fds
/// in hand, sockets, pipes, pidfds.
const FD_RESERVE_EXTRA: usize = 1024;
/// The largest fd table reserved ahead (512 KiB of kernel memory).
const FD_RESERVE_MAX: usize = 65_536;

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
    if let Err(e) = args.check() {
        tracing::error!("{e}");
        return ExitCode::from(2);
    }
    // Before the closer thread and the runtime: growing the fd table while
    // another thread runs waits for RCU each time (see
    // `baton_sd::fdtable`), and a handover brings fds a datagram at a time
    // while the store may hold up to --fdstore-max.
    if let Err(e) = baton_sd::reserve_fds(args.fdstore_max.saturating_add(FD_RESERVE_EXTRA).min(FD_RESERVE_MAX)) {
        tracing::debug!("cannot grow the fd table ahead: {e}");
    }
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
    let mut stored: Vec<(String, std::os::fd::OwnedFd)> = inherited
        .take_matching(|n| n.starts_with("app/"))
        .into_iter()
        .map(|(n, fd)| (n["app/".len()..].to_owned(), fd))
        .collect();
    // Connections an earlier Baton kept for its crash (see `baton::vault`).
    let mut inherited_vaults = Vec::new();
    for (name, kept) in inherited.take_matching(|n| n.starts_with(baton::vault::VAULT_PREFIX)) {
        match baton::vault::recover(&kept) {
            Ok(fds) => {
                tracing::info!(
                    event = "vault-recovered",
                    count = fds.len(),
                    "took back {} connection(s) from {name} in the fd store",
                    fds.len()
                );
                stored.extend(fds.into_iter().map(|fd| (baton_sd::fdstore::CONNECTION.to_owned(), fd)));
            }
            Err(e) => tracing::warn!(event = "vault-failed", "cannot read the connections in {name}: {e}"),
        }
        inherited_vaults.push(name);
    }
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
    let steer = args.steering == baton::cli::SteeringArg::Auto;
    let opts = SocketOptions {
        backlog: args.backlog,
        reuse_port: args.reuse_port,
        // Steering pairs each IP socket with a sibling in its reuseport
        // group (see `baton::steering`).
        steerable: steer,
        v6_only: args.v6_only,
        freebind: args.freebind,
        unix_mode: args.socket_mode,
        unix_owner: (args.socket_uid.is_some() || args.socket_gid.is_some())
            .then_some((args.socket_uid, args.socket_gid)),
    };
    let (control_path, notify_path, handoff_path) = match own_socket_paths(&args, &name) {
        Ok(paths) => paths,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Which listeners this Baton just bound steerable (see
    // `SteeringOptions::founded_group`).
    let mut founded_group = vec![false; sockets.len()];
    for spec in &args.listen {
        if own.iter().any(|(n, _)| *n == spec.name) {
            // All of them: a steered listener's sibling is kept under the
            // same name.
            while let Some(i) = own.iter().position(|(n, _)| *n == spec.name) {
                let (name, fd) = own.remove(i);
                let local = listen::describe(std::os::fd::AsFd::as_fd(&fd));
                tracing::info!(event = "socket-adopted", name = %name, "took back {name} ({local}) from the fd store");
                sockets.push(BoundSocket { name, fd, local });
                founded_group.push(false);
            }
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
                founded_group.push(steer && !args.reuse_port);
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
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        // For the person who just started it by hand: how to drive it.
        let target = format!("--control {}", control_path.display());
        println!("baton: restart with `baton restart {target}` (waits for the new generation's READY=1),");
        println!("baton: watch with `baton status {target}`; stop with Ctrl-C or `baton stop {target}`");
    }
    let policy = args.policy();
    if policy.probe
        && let Err(e) = baton::supervisor::probe::family_for(&sockets)
    {
        tracing::error!("{e}");
        return ExitCode::from(1);
    }
    let output = policy.output;
    tracing::info!(
        event = "output",
        mode = ?output,
        "the app's stdout and stderr: {}",
        match output {
            OutputMode::Inherit => "inherited (baton's own)",
            OutputMode::Pipe => "piped through baton",
        }
    );
    let steering = match steer_sockets(&sockets, steer, founded_group, !args.listen.is_empty(), upstream.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    // A pair adopted from the fd store is two listeners of one name: the
    // steering holds both; the generations' list is the steering's.
    let config = Config {
        name: name.clone(),
        command,
        command_line: args.command.clone(),
        sockets,
        stored,
        inherited_vaults,
        policy,
        steering,
    };
    let result = runtime().block_on(async move {
        let (server, requests) = control::ControlServer::start(&control_path).await.map_err(|e| e.to_string())?;
        let notify = NotifyServer::bind(&notify_path).map_err(|e| format!("notify socket {}: {e}", notify_path.display()))?;
        tracing::info!(event = "started", control = %server.path().display(), "baton {name}: control socket {}", server.path().display());
        let supervisor = Supervisor::new(config, notify, upstream.clone())
            .and_then(|s| s.with_handoff(&handoff_path))
            .map_err(|e| e.to_string())?
            .with_control(server);
        // Shuts the control socket down when it ends.
        let ended = supervisor.run(requests).await.map_err(|e| e.to_string());
        // systemd attributes a datagram by its sender's pid: fds forwarded to
        // its store just before we exit (connections a stopping generation
        // handed over) must be processed while we still exist.
        if let Some(up) = &upstream
            && let Err(e) = up.barrier_async(Duration::from_secs(5)).await
        {
            tracing::warn!("systemd did not confirm the last notifications: {e}");
        }
        ended
    });
    exit_code(result)
}

/// Pairs the listening sockets for steering (before any generation runs:
/// it measures which socket is which), binding siblings where Baton bound
/// the listener itself (`bind_siblings`), and keeps those siblings in
/// systemd's fd store with their listeners. Says which listeners are
/// shared, and why.
fn steer_sockets(
    sockets: &[BoundSocket],
    enabled: bool,
    founded_group: Vec<bool>,
    bind_siblings: bool,
    upstream: Option<&Notifier>,
) -> Result<Option<baton::steering::Steering>, String> {
    use baton::steering::{Steering, SteeringOptions};
    if !enabled {
        return Ok(None);
    }
    let opts = SteeringOptions { enabled, bind_siblings, founded_group, ..SteeringOptions::default() };
    let (steering, unsteered) =
        Steering::new(sockets, &opts).map_err(|e| format!("cannot set up steering of the listening sockets: {e}"))?;
    for (name, local) in steering.steered() {
        tracing::info!(event = "steered", name = %name, "{name} ({local}): new connections go only to the proven generation (steered)");
    }
    for u in &unsteered {
        tracing::info!(event = "unsteered", name = %u.name, "{} ({}) is shared by every generation: {}", u.name, u.local, u.why);
    }
    if let Some(up) = upstream {
        for (name, fd) in steering.bound_siblings() {
            let stored_name = format!("listen/{name}");
            if let Err(e) = up.store_fds(&stored_name, &[fd], FdPoll::NoPoll) {
                tracing::warn!("cannot keep the sibling of {name} in systemd's fd store: {e}");
            }
        }
    }
    Ok(Some(steering))
}

/// Baton's own sockets: the control socket (`--control` or the default,
/// made absolute: the notify socket's path goes into the app's
/// `NOTIFY_SOCKET`), and the notify and handoff sockets derived from it.
/// Refuses paths that collide with each other or with a `--listen` socket,
/// which one bind would otherwise silently replace.
fn own_socket_paths(args: &RunArgs, name: &str) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let control = args.control.clone().unwrap_or_else(|| control::default_path(name));
    let control = std::path::absolute(&control)
        .map_err(|e| format!("--control {}: cannot make the path absolute: {e}", control.display()))?;
    let (notify, handoff) = baton::rundir::derived_paths(&control)?;
    for spec in &args.listen {
        if let listen::ListenAddr::Unix { path, .. } = &spec.addr {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            for (what, own) in [("control", &control), ("notify", &notify), ("handoff", &handoff)] {
                if path == *own {
                    return Err(format!(
                        "--listen {spec}: {} is baton's own {what} socket (derived from the control socket {}); \
                         listen on another path or pass another --control",
                        own.display(),
                        control.display()
                    ));
                }
            }
        }
    }
    Ok((control, notify, handoff))
}

fn exit_code(result: Result<Ended, String>) -> ExitCode {
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

/// The rest of `baton run` in an image started by `baton upgrade`: adopt
/// the state, or, if that fails, hand control back to the previous image
/// (see `baton::upgrade::Fallback`), which answers the upgrade's client.
fn run_adopted(arrival: baton::upgrade::Arrival) -> ExitCode {
    init_logging();
    let baton::upgrade::Arrival { state, failed, mut fallback, fallback_error } = arrival;
    if let Some(e) = fallback_error {
        tracing::warn!(event = "upgrade-no-way-back", "{e}; a failed adoption cannot return to the previous image");
    }
    let handover = match state {
        Ok(h) => h,
        Err(e) => return hand_back(fallback, &format!("the new baton could not read the state: {e}")),
    };
    if let Some(f) = &mut fallback {
        f.keep_copies(&handover.fds());
    }
    let binary = handover.binary.clone();
    let upstream = handover.upstream.clone();
    let rt = runtime();
    // Adopting registers sockets with the runtime, so it runs inside it. A
    // panic in there is a failed adoption like any other.
    let adopted =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(async { Supervisor::adopt(handover) })));
    let (supervisor, requests) = match adopted {
        Ok(Ok(adopted)) => adopted,
        Ok(Err(e)) => {
            let reason = format!("{} (baton {}) could not take over: {e}", binary.display(), env!("CARGO_PKG_VERSION"));
            return hand_back(fallback, &reason);
        }
        Err(_) => {
            let reason = format!(
                "{} (baton {}) panicked taking over (see its log)",
                binary.display(),
                env!("CARGO_PKG_VERSION")
            );
            return hand_back(fallback, &reason);
        }
    };
    // Adopted: from here on this image owns everything; the previous image's
    // executable and the copies close.
    drop(fallback);
    let supervisor = match failed {
        Some(reason) => supervisor.after_failed_upgrade(reason),
        None => supervisor,
    };
    let result = rt.block_on(async move {
        let ended = supervisor.run(requests).await.map_err(|e| e.to_string());
        // As in `run`: systemd must process what we forwarded before we exit.
        if let Some(up) = upstream.as_deref().and_then(|a| Notifier::new(a).ok())
            && let Err(e) = up.barrier_async(Duration::from_secs(5)).await
        {
            tracing::warn!("systemd did not confirm the last notifications: {e}");
        }
        ended
    });
    exit_code(result)
}

/// Re-executes the previous image with its own state, telling it `reason`;
/// returns only if there is no previous image to go back to or that failed.
fn hand_back(fallback: Option<baton::upgrade::Fallback>, reason: &str) -> ExitCode {
    let Some(fallback) = fallback else {
        // Coming back from a failed upgrade already, or started by hand with
        // a state: nothing is left to try.
        tracing::error!(event = "adoption-failed", "{reason}; the generations are left unsupervised");
        return ExitCode::from(1);
    };
    tracing::error!(event = "upgrade-handback", "{reason}; handing control back to the previous baton image");
    let e = fallback.give_back(reason);
    tracing::error!(
        event = "adoption-failed",
        "cannot re-execute the previous baton image: {e}; the generations are left unsupervised"
    );
    ExitCode::from(1)
}
