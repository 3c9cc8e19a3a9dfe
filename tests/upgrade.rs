//! `baton upgrade`: Baton re-executes a new binary of itself in the same
//! process, with real processes and real sockets — the reference server
//! (`baton-httpd`) under load, or the scriptable probe for fault cases.
//!
//! No root needed: control and notify sockets live in a private temporary
//! directory.

use std::ffi::OsString;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton::control::{Request, Response};
use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::expect_success as ok;
use baton_testbed::httpd::healthz;
use baton_testbed::load::{Load, LoadConfig, Mode};
use baton_testbed::probe::ask;
use baton_testbed::{cargo_bin, poll_until};

/// The app a test runs under Baton.
enum App {
    /// `baton-httpd --root DIR ARGS`.
    Httpd(&'static [&'static str]),
    /// `baton-sd-probe --serve http ARGS`.
    Probe(&'static [&'static str]),
    /// The same, run from a copy at `DIR/app/probe` (tests may remove it).
    ProbeCopy(&'static [&'static str]),
}

/// `baton run --control DIR/baton.sock -l http=127.0.0.1:0 BATON_ARGS --
/// APP`, from a copy of the binary at `DIR/bin/baton` (the "package
/// upgrade" test replaces it), with generation 1 active.
fn start(test: &str, baton_args: &[&str], app: App) -> Baton {
    let dir = baton_testbed::unique_temp_dir("baton-upgrade", test);
    let binary = dir.join("bin/baton");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    copy_executable(Path::new(env!("CARGO_BIN_EXE_baton")), &binary);
    let mut cmd: Vec<OsString> = Vec::new();
    match app {
        App::Httpd(args) => {
            let www = dir.join("www");
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("index.html"), "hello\n").unwrap();
            cmd.extend([cargo_bin("baton-httpd", "baton-httpd").into(), "--root".into(), www.into()]);
            cmd.extend(args.iter().map(OsString::from));
        }
        App::Probe(args) | App::ProbeCopy(args) => {
            let probe = if matches!(app, App::ProbeCopy(_)) {
                let copy = dir.join("app/probe");
                std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
                copy_executable(&cargo_bin("sd-probe", "baton-sd-probe"), &copy);
                copy
            } else {
                cargo_bin("sd-probe", "baton-sd-probe")
            };
            cmd.extend([probe.into(), "--serve".into(), "http".into(), "--report".into(), dir.join("report").into()]);
            cmd.extend(args.iter().map(OsString::from));
        }
    }
    let b = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), dir).run_from(binary).args(baton_args).app(cmd).spawn();
    b.port();
    wait_settled(&b, 1);
    b
}

/// Waits until generation `n` is the active one and no restart runs.
fn wait_settled(b: &Baton, n: u64) {
    b.wait_status(&format!("generation {n} active"), |s| {
        s.generations.iter().any(|g| g.generation == n && g.state == "active") && !s.restarting
    });
}

/// Whether `pid` exists (a zombie counts: it is not reaped).
fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Zombie children of `parent`, from /proc.
fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                let mut f = rest.split_whitespace();
                let state = f.next()?;
                let ppid: u32 = f.next()?.parse().ok()?;
                Some(state == "Z" && ppid == parent)
            }) == Some(true)
        })
        .collect()
}

/// Executables are written by a child process, never by this one: a file
/// this (multi-threaded) test process has open for writing may be inherited
/// by a child another test forks meanwhile, and executing it then fails
/// with ETXTBSY.
fn copy_executable(from: &Path, to: &Path) {
    let st = Command::new("cp").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let st = Command::new("sh")
        .args(["-c", "printf '#!/bin/sh\\n%s\\n' \"$1\" > \"$2\" && chmod 755 \"$2\"", "sh", body])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    path
}

#[test]
fn upgrade_under_load_keeps_pid_generation_port_and_fds() {
    let b = start("load", &[], App::Httpd(&[]));
    let pid = b.pid();
    let gen_pid = b.generation_pid(1);
    let before = b.status();
    let fds_before = b.settled_fd_count();
    assert_eq!(before.upgrades, 0);
    assert_eq!(before.binary.as_deref(), Some(b.binary().to_str().unwrap()));

    // A package upgrade: the file Baton was started from is replaced by a
    // new inode (rename over it), so /proc/PID/exe now names a deleted file.
    let fresh = b.dir().join("bin/baton.new");
    copy_executable(Path::new(env!("CARGO_BIN_EXE_baton")), &fresh);
    std::fs::rename(&fresh, b.binary()).unwrap();
    assert!(b.exe().ends_with("(deleted)"), "{}", b.exe());

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], b.port()));
    let keepalive = Load::start(LoadConfig::new(addr).mode(Mode::KeepAlive).connections(4).rate(Some(300))).unwrap();
    let fresh_conns =
        Load::start(LoadConfig::new(addr).mode(Mode::NewConnection).connections(4).rate(Some(300))).unwrap();
    assert!(keepalive.wait_for_ok(200, WAIT) && fresh_conns.wait_for_ok(200, WAIT), "load did not get going");
    // Control clients all along: each one is answered, by the old image
    // (before the exec) or the new one (queued in the backlog meanwhile).
    let stop = Arc::new(AtomicBool::new(false));
    let control_clients = {
        let (stop, control) = (Arc::clone(&stop), b.control().to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (mut answered, mut failed, mut upgraded) = (0u64, Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                match rt.block_on(baton::control::call(&control, &Request::Status)) {
                    Ok(Response::Status(s)) => {
                        answered += 1;
                        upgraded += u64::from(s.upgrades == 1);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (answered, failed, upgraded)
        })
    };

    let asked = Instant::now();
    let out = ok(&b.cli(&["upgrade"]));
    let took = asked.elapsed();
    assert!(out.contains(&format!("upgraded: pid {pid}, version {}", env!("CARGO_PKG_VERSION"))), "{out}");
    // The new image answers control requests at once.
    let after = b.status();
    let answered = asked.elapsed();
    assert!(keepalive.wait_for_ok(200, WAIT) && fresh_conns.wait_for_ok(200, WAIT), "load stalled after the upgrade");
    let ka = keepalive.stop();
    let nc = fresh_conns.stop();
    stop.store(true, Ordering::Relaxed);
    let (statuses, failed, upgraded) = control_clients.join().unwrap();
    assert!(failed.is_empty(), "control requests failed during the upgrade: {failed:?}");
    assert!(upgraded > 0 && statuses > upgraded, "{statuses} answered, {upgraded} by the new image");
    eprintln!(
        "upgrade: CLI {} ms, status answered after {} ms; keep-alive {} ok / {} failed, new connections {} ok / {} \
         failed; {out}",
        took.as_millis(),
        answered.as_millis(),
        ka.ok,
        ka.failed(),
        nc.ok,
        nc.failed()
    );
    assert_eq!(ka.failed(), 0, "keep-alive failures: {:?} {:?}", ka.failures, ka.other_errors);
    assert_eq!(nc.failed(), 0, "new-connection failures: {:?} {:?}", nc.failures, nc.other_errors);
    assert_eq!(ka.server_closed_connections, 0, "the generation was not touched: no connection closed");

    assert_eq!(after.pid, pid);
    assert_eq!(after.upgrades, 1);
    assert_eq!(after.binary.as_deref(), Some(b.binary().to_str().unwrap()));
    assert!(after.image_uptime_s < after.uptime_s, "{after:?}");
    assert_eq!(after.sockets, before.sockets, "same listening socket");
    assert_eq!(after.generations.len(), 1);
    assert_eq!((after.generations[0].generation, after.generations[0].pid), (1, gen_pid));
    assert_eq!(after.generations[0].state, "active");
    assert!(!b.exe().ends_with("(deleted)"), "runs the new file: {}", b.exe());
    assert_eq!(healthz(b.port()).unwrap().pid, gen_pid);
    assert_eq!(b.settled_fd_count(), fds_before, "fds before/after the upgrade");

    // The adopted store, notify socket and generation tracking work: a
    // restart cuts over to generation 2 and retires generation 1.
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    poll_until("generation 1 retired", WAIT, || (b.status().generations.len() == 1 && !exists(gen_pid)).then_some(()))
        .unwrap();
    let gen2 = b.generation_pid(2);
    assert_ne!(gen2, gen_pid);
    assert_eq!(healthz(b.port()).unwrap().pid, gen2);
    assert!(zombie_children(pid).is_empty());
}

#[test]
fn unusable_binaries_are_refused_and_baton_goes_on() {
    let b = start("refused", &[], App::Httpd(&[]));
    let gen_pid = b.generation_pid(1);
    let fds_before = b.settled_fd_count();
    let not_exec = b.dir().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    let wrong =
        script(b.dir(), "wrong-version", "echo baton-upgrade-probe state-format=99 min-state-format=99 version=9.9");
    let garbage = script(b.dir(), "garbage", "echo 'usage: something else'; exit 2");
    // Passes the probe, then makes itself unexecutable: the execve() fails
    // and Baton must restore everything and go on.
    let vanishing = script(
        b.dir(),
        "vanishing",
        "chmod -x \"$0\"; echo baton-upgrade-probe state-format=1 min-state-format=1 version=0.0.0",
    );
    let cases: [(&Path, &str); 6] = [
        (Path::new("/nonexistent/baton"), "was not found"),
        (&not_exec, "cannot be executed"),
        (Path::new("/bin/true"), "printed nothing"),
        (&wrong, "reads state formats 99..=99"),
        (&garbage, "did not answer"),
        (&vanishing, "execve() of the new binary"),
    ];
    for (binary, expected) in cases {
        let out = b.cli(&["upgrade", "--binary", binary.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: {stdout}{stderr}", binary.display());
        assert!(stderr.contains(expected), "{}: expected {expected:?} in {stderr}", binary.display());
        assert!(stderr.contains("keeps running"), "{stderr}");
        let s = b.status();
        assert_eq!((s.pid, s.upgrades), (b.pid(), 0));
        assert_eq!(s.generations.len(), 1);
        assert_eq!(s.generations[0].pid, gen_pid);
        assert_eq!(healthz(b.port()).unwrap().pid, gen_pid);
    }
    assert_eq!(b.settled_fd_count(), fds_before, "a failed exec leaks nothing");
    assert!(zombie_children(b.pid()).is_empty(), "probe processes are reaped");
    // And it still upgrades fine.
    ok(&b.cli(&["upgrade"]));
    assert_eq!(b.status().upgrades, 1);
}

#[test]
fn a_hanging_binary_is_killed_at_the_probe_timeout() {
    let b = start("hang", &[], App::Httpd(&[]));
    let marker = b.dir().join("hung-pid");
    let hang = script(b.dir(), "hang", &format!("echo $$ > {}; exec sleep 300", marker.display()));
    let out = b.cli(&["upgrade", "--binary", hang.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");
    let hung: u32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
    poll_until("the hung probe killed and reaped", WAIT, || (!exists(hung)).then_some(())).unwrap();
    assert_eq!(b.status().upgrades, 0);
    assert!(healthz(b.port()).is_ok());
}

#[test]
fn a_stalled_control_client_delays_the_upgrade_by_the_grace_only() {
    let b = start("stalled", &[], App::Httpd(&[]));
    // Connected, never sends its request: its connection cannot be handed
    // over, so the old image waits for it a bounded time, then lets it go.
    let mut stalled = std::os::unix::net::UnixStream::connect(b.control()).unwrap();
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = ok(&b.cli(&["upgrade"]));
    assert!(out.contains("upgraded"), "{out}");
    let mut rest = Vec::new();
    let n = stalled.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0, "closed without an answer: {:?}", String::from_utf8_lossy(&rest));
    assert_eq!(b.status().upgrades, 1);
}

#[test]
fn upgrade_during_a_restart_is_busy_and_loses_nothing() {
    let b = start("busy", &[], App::Httpd(&["--startup-delay", "3s"]));
    let gen1 = b.generation_pid(1);
    ok(&b.cli(&["restart", "--no-block"]));
    let out = b.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("busy") && stderr.contains("restart is in progress"), "{stderr}");
    // Generation 1 serves meanwhile, and the restart goes through.
    assert_eq!(healthz(b.port()).unwrap().pid, gen1);
    wait_settled(&b, 2);
    let s = b.status();
    assert_eq!((s.upgrades, s.restarts), (0, 1));
    ok(&b.cli(&["upgrade"]));
    let s = b.status();
    assert_eq!((s.upgrades, s.restarts), (1, 1));
    assert_eq!(healthz(b.port()).unwrap().pid, b.generation_pid(2));
}

#[test]
fn two_upgrades_then_stop_exits_0_without_zombies() {
    let mut b = start("twice", &[], App::Httpd(&[]));
    let gen1 = b.generation_pid(1);
    let fds = b.settled_fd_count();
    for n in 1..=2 {
        let out = ok(&b.cli(&["upgrade", "--binary", env!("CARGO_BIN_EXE_baton")]));
        assert!(out.contains(&format!("pid {}", b.pid())), "{out}");
        let s = b.status();
        assert_eq!(s.upgrades, n);
        assert_eq!(s.binary.as_deref(), Some(env!("CARGO_BIN_EXE_baton")));
        assert_eq!(healthz(b.port()).unwrap().pid, gen1);
    }
    assert_eq!(b.settled_fd_count(), fds);
    let out = ok(&b.cli(&["stop"]));
    assert!(out.contains("stopped"), "{out}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = b.try_exit() {
            break status;
        }
        assert!(Instant::now() < deadline, "baton run did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", b.log());
    assert!(!exists(gen1) || !is_zombie(gen1), "generation 1 reaped");
    assert!(!b.control().exists(), "control socket removed");
}

#[test]
fn draining_generation_is_reaped_and_crashes_handled_after_upgrade() {
    // Generations ignore SIGTERM: generation 1 stays draining until Baton's
    // SIGKILL at the stop deadline, which the new image must keep.
    let b = start("draining", &["--stop-timeout", "4s"], App::Probe(&["--ignore-sigterm"]));
    let gen1 = b.generation_pid(1);
    ok(&b.cli(&["restart"]));
    let gen2 = b.generation_pid(2);
    let s = b.status();
    assert_eq!(s.generations.iter().find(|g| g.generation == 1).unwrap().state, "draining");

    ok(&b.cli(&["upgrade"]));
    let s = b.status();
    assert_eq!(s.upgrades, 1);
    assert_eq!(s.generations.iter().map(|g| (g.generation, g.pid)).collect::<Vec<_>>(), [(1, gen1), (2, gen2)]);
    // Killed at its deadline by the new image and reaped: not a zombie.
    poll_until("generation 1 killed and reaped", WAIT, || (!exists(gen1)).then_some(())).unwrap();
    assert_eq!(b.status().generations.len(), 1);
    assert!(b.log().contains("still running at the stop deadline"), "{}", b.log());

    // A crash after the upgrade is replaced with backoff, as before.
    rustix::process::kill_process(rustix::process::Pid::from_raw(gen2 as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    wait_settled(&b, 3);
    let s = b.status();
    assert_eq!(s.crash_restarts, 1);
    assert!(s.last_failure.as_deref().unwrap_or("").contains("generation 2 killed by SIGKILL"), "{s:?}");
    let gen3 = b.generation_pid(3);
    assert_eq!(ask(b.port()).unwrap(), format!("http {gen3}"));
    poll_until("generation 2 reaped", WAIT, || (!exists(gen2)).then_some(())).unwrap();
    assert!(zombie_children(b.pid()).is_empty());
}

/// Under a real systemd 252 (`Type=notify`): `MainPID` never changes, the
/// unit stays active (RELOADING=1 … READY=1 around the exec), the app keeps
/// serving, and systemd's view of the service is consistent afterwards
/// (a `systemctl stop` still stops everything cleanly).
#[test]
fn under_systemd_mainpid_is_unchanged() {
    use baton_testbed::{Flavor, Testbed, free_loopback_port, skip_unless_root};
    if !skip_unless_root("under_systemd_mainpid_is_unchanged") {
        return;
    }
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let baton = env!("CARGO_BIN_EXE_baton");
    let tb = Testbed::boot(Flavor::Host).unwrap_or_else(|e| panic!("boot: {e}"));
    let port = free_loopback_port();
    let unit = format!(
        "[Service]\nType=notify\nRuntimeDirectory=baton\nFileDescriptorStoreMax=64\n\
         ExecStart={baton} run -l http=127.0.0.1:{port} --name app -- {} --serve http\n",
        probe.display()
    );
    tb.install_unit("app.service", &unit).unwrap();
    tb.systemctl_checked(&["start", "app.service"]).unwrap();
    let show = |p: &str| tb.show("app.service", p).unwrap();
    let main = show("MainPID");
    assert_ne!(main, "0");
    let gen1 = ask(port).unwrap();

    let out = tb.run(&[baton, "upgrade", "--name", "app"]).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!("upgraded: pid {main}")), "{}", out.stdout);
    tb.wait_for("the unit active and running again", WAIT, &mut || {
        show("ActiveState") == "active" && show("SubState") == "running"
    })
    .unwrap();
    assert_eq!(show("MainPID"), main, "MainPID must not change");
    assert!(show("StatusText").contains("upgraded in place"), "{}", show("StatusText"));
    assert_eq!(ask(port).unwrap(), gen1, "the same generation serves");
    let status = tb.run(&[baton, "status", "--name", "app", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["upgrades"], 1, "{status}");

    // A reload-style restart and the stop still work through systemd.
    let out = tb.run(&[baton, "restart", "--name", "app"]).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_ne!(ask(port).unwrap(), gen1);
    assert_eq!(show("MainPID"), main);
    tb.systemctl_checked(&["stop", "app.service"]).unwrap();
    assert_eq!(show("ActiveState"), "inactive");
    assert_eq!(show("Result"), "success", "{}", tb.journal(Some("app.service")).unwrap_or_default());
}

/// The fd store, the notify socket (with fds) and the handoff socket work
/// after the upgrade: an entry stored before it reaches the next
/// generation, and connections held by generation 1 across the upgrade
/// are moved to generation 2 on restart and answered there.
#[test]
fn store_and_handoff_survive_the_upgrade() {
    let b = start("store", &[], App::Probe(&["--hold", "--store", "state=hello"]));
    let report = || std::fs::read_to_string(b.dir().join("report")).unwrap_or_default();
    poll_until("the memfd stored", WAIT, || (b.status().fdstore == 1).then_some(())).unwrap();
    // Held (accepted, unanswered) by generation 1 across the upgrade.
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", b.port())).unwrap()).collect();
    poll_until("generation 1 holding 3 connections", WAIT, || {
        (report().lines().filter(|l| *l == "held").count() == 3).then_some(())
    })
    .unwrap();
    let fds = b.settled_fd_count();
    ok(&b.cli(&["upgrade"]));
    let s = b.status();
    assert_eq!((s.upgrades, s.fdstore), (1, 1));
    assert_eq!(b.settled_fd_count(), fds);

    ok(&b.cli(&["restart"]));
    let gen2 = b.generation_pid(2);
    for mut c in clients {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer.trim(), format!("http {gen2}"), "{}", report());
    }
    // The probe answers the clients before it writes what it received to
    // its report: wait for the line rather than read it once.
    let text = poll_until("the probe's report of the received connections", WAIT, || {
        let text = report();
        text.contains("received name=conn count=3").then_some(text)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", report()));
    assert!(text.contains("stored name=state content=hello"), "{text}");
}

/// SIGTERM while the upgrade is under way (here: while the old image waits
/// for a stalled control client before its exec) is never lost: whichever
/// image gets it, Baton stops its generations and `baton run` exits 0.
#[test]
fn sigterm_during_an_upgrade_still_stops_baton() {
    let mut b = start("sigterm", &[], App::Httpd(&[]));
    let gen1 = b.generation_pid(1);
    let stalled = std::os::unix::net::UnixStream::connect(b.control()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let upgrade = {
        let control = b.control().to_owned();
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_baton")).arg("upgrade").arg("--control").arg(&control).output().unwrap()
        })
    };
    // Inside the old image's grace for the stalled client.
    std::thread::sleep(Duration::from_millis(400));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = b.try_exit() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM was lost: baton still runs\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", b.log());
    assert!(!exists(gen1) || !is_zombie(gen1));
    let out = upgrade.join().unwrap();
    eprintln!(
        "upgrade client: {:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(stalled);
}

/// The new image rebuilds the app's command: if the app's program is gone
/// right now, the upgrade is refused before the exec, and Baton goes on.
#[test]
fn upgrade_is_refused_while_the_apps_program_is_missing() {
    let b = start("app-missing", &[], App::ProbeCopy(&[]));
    let gen1 = b.generation_pid(1);
    let program = b.dir().join("app/probe");
    let moved = b.dir().join("app/probe.moved");
    std::fs::rename(&program, &moved).unwrap();
    let out = b.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("app's program") && stderr.contains("put it back first"), "{stderr}");
    assert_eq!(b.status().upgrades, 0);
    assert_eq!(ask(b.port()).unwrap(), format!("http {gen1}"));
    std::fs::rename(&moved, &program).unwrap();
    ok(&b.cli(&["upgrade"]));
    assert_eq!(b.status().upgrades, 1);
}

/// Where `/proc/PID/fd/FD` points.
fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// `--output inherit` across `baton upgrade`: a generation with no output
/// pipe is handed over as such (state `output: "none"`), keeps writing to
/// Baton's own stdout and stderr, and generations started by the new image
/// inherit them too (the mode is part of the state); Baton reads no pipe of
/// theirs before or after.
#[test]
fn inherited_output_survives_upgrades() {
    let b = start("inherit", &["--output", "inherit"], App::Probe(&[]));
    let baton = b.pid();
    let gen1 = b.generation_pid(1);
    let batons_own = [fd_target(baton, 1), fd_target(baton, 2)];
    assert!(batons_own[1].ends_with("baton.log"), "{batons_own:?}");
    let no_pipe_of = |pid: u32| {
        let ours: Vec<String> = std::fs::read_dir(format!("/proc/{baton}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .filter(|t| t.starts_with("pipe:") && *t != batons_own[0])
            .collect();
        assert!(!ours.contains(&fd_target(pid, 1)) && !ours.contains(&fd_target(pid, 2)), "{ours:?}");
    };
    assert_eq!([fd_target(gen1, 1), fd_target(gen1, 2)], batons_own);
    no_pipe_of(gen1);

    ok(&b.cli(&["upgrade", "--binary", env!("CARGO_BIN_EXE_baton")]));
    assert_eq!(b.generation_pid(1), gen1);
    assert_eq!(ask(b.port()).unwrap(), format!("http {gen1}"));
    assert_eq!([fd_target(gen1, 1), fd_target(gen1, 2)], batons_own, "baton's own fds survive the exec");
    no_pipe_of(gen1);

    ok(&b.cli(&["restart"]));
    wait_settled(&b, 2);
    let gen2 = b.generation_pid(2);
    assert_eq!([fd_target(gen2, 1), fd_target(gen2, 2)], batons_own, "the adopted mode applies to new generations");
    no_pipe_of(gen2);
    // And a second upgrade with the draining one gone and the new one running.
    poll_until("generation 1 retired", WAIT, || (!exists(gen1) || is_zombie(gen1)).then_some(())).unwrap();
    ok(&b.cli(&["upgrade", "--binary", env!("CARGO_BIN_EXE_baton")]));
    assert_eq!(ask(b.port()).unwrap(), format!("http {gen2}"));
    assert_eq!(b.status().upgrades, 2);
    assert_eq!([fd_target(gen2, 1), fd_target(gen2, 2)], batons_own);
    no_pipe_of(gen2);
}

/// A binary that passes the probe but cannot adopt the state (here a
/// wrapper that answers the probe like the real baton, then hands it a state
/// it refuses: not a state at all, an unknown setting, a generation in an
/// unknown state — the last fails after the sockets were taken over). The
/// new image hands control back to the old one, which answers `baton
/// upgrade` with the reason and goes on supervising the same generations.
#[test]
fn a_binary_that_cannot_adopt_hands_control_back() {
    let b = start("handback", &[], App::Httpd(&[]));
    let gen1 = b.generation_pid(1);
    let fds_before = b.settled_fd_count();
    let mode = b.dir().join("mode");
    let bad = b.dir().join("bad-state.json");
    let body = format!(
        r#"[ "$1" = upgrade-probe ] && exec {real} upgrade-probe
state=/proc/self/fd/$BATON_UPGRADE_STATE
case "$(cat {mode})" in
  garbage) echo '{{"format":1,"garbage":true}}' > {bad} ;;
  access) sed 's/"notify_access":"main"/"notify_access":"bogus"/' "$state" > {bad} ;;
  generation) sed 's/"state":"active"/"state":"bogus"/' "$state" > {bad} ;;
esac
exec {{fd}}< {bad}
BATON_UPGRADE_STATE=$fd exec {real} "$@""#,
        real = env!("CARGO_BIN_EXE_baton"),
        mode = mode.display(),
        bad = bad.display(),
    );
    let wrapper = b.dir().join("cannot-adopt");
    let st = Command::new("sh")
        .args(["-c", "printf '#!/bin/bash\\n%s\\n' \"$1\" > \"$2\" && chmod 755 \"$2\"", "sh", &body])
        .arg(&wrapper)
        .status()
        .unwrap();
    assert!(st.success());
    let cases = [
        ("garbage", "the state is malformed"),
        ("access", "unknown notify access \"bogus\""),
        ("generation", "is in state \"bogus\""),
    ];
    for (case, expected) in cases {
        std::fs::write(&mode, case).unwrap();
        let out = b.cli(&["upgrade", "--binary", wrapper.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{case}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{case}: expected {expected:?} in {stderr}");
        assert!(
            stderr.contains("went back to the binary it ran before") && stderr.contains("keeps running"),
            "{stderr}"
        );
        let s = b.status();
        assert_eq!((s.pid, s.upgrades), (b.pid(), 0), "{case}: {s:?}");
        assert_eq!(s.binary.as_deref(), Some(b.binary().to_str().unwrap()), "{case}");
        assert_eq!(s.generations.len(), 1, "{case}: {s:?}");
        assert_eq!((s.generations[0].pid, s.generations[0].state.as_str()), (gen1, "active"), "{case}");
        assert_eq!(healthz(b.port()).unwrap().pid, gen1, "{case}");
        assert_eq!(b.settled_fd_count(), fds_before, "{case}: fds before/after the way back");
    }
    // Still supervised: a restart cuts over and retires generation 1.
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
    poll_until("generation 1 retired", WAIT, || (b.status().generations.len() == 1 && !exists(gen1)).then_some(()))
        .unwrap();
    let gen2 = b.generation_pid(2);
    assert_eq!(healthz(b.port()).unwrap().pid, gen2);
    assert!(zombie_children(b.pid()).is_empty());
    // And a real upgrade still goes through.
    ok(&b.cli(&["upgrade"]));
    let s = b.status();
    assert_eq!((s.pid, s.upgrades, s.generations[0].pid), (b.pid(), 1, gen2));
}

/// A newer baton may no longer accept the old command line (a flag renamed
/// or removed): the image started by `baton upgrade` takes everything from
/// the handed-over state and never parses it, so the upgrade goes through.
#[test]
fn a_new_baton_that_rejects_the_old_command_line_still_adopts() {
    let b = start("argv", &[], App::Httpd(&[]));
    let gen1 = b.generation_pid(1);
    let real = env!("CARGO_BIN_EXE_baton");
    let wrapper = script(
        b.dir(),
        "strict-cli",
        &format!(
            "[ \"$1\" = upgrade-probe ] && exec {real} upgrade-probe\nexec {real} run --a-flag-this-baton-rejects"
        ),
    );
    let out = ok(&b.cli(&["upgrade", "--binary", wrapper.to_str().unwrap()]));
    assert!(out.contains(&format!("upgraded: pid {}", b.pid())), "{out}");
    let s = b.status();
    assert_eq!((s.upgrades, s.generations.len(), s.generations[0].pid), (1, 1, gen1), "{s:?}");
    assert_eq!(healthz(b.port()).unwrap().pid, gen1);
    let out = ok(&b.cli(&["restart"]));
    assert!(out.contains("generation 2"), "{out}");
}
