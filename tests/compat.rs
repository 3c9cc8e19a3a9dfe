//! `baton run --compat crank|einhorn`: apps written for those supervisors,
//! as their docs describe them, run unchanged under Baton.
//!
//! The apps are small Python scripts (Debian's `/usr/bin/python3`) that
//! know nothing of Baton or systemd:
//!
//! - the crank app serves HTTP on fd 3 and writes `READY=1` to the fd in
//!   `$NOTIFY_FD`, as crank's `examples/server.rb` does;
//! - the einhorn app serves on every fd of `$EINHORN_FDS`.
//!
//! Each writes, before opening anything itself, what it was given: its open
//! fds (probed with `fstat`, which opens nothing), what kind of socket each
//! one is, and its crank/einhorn variables. Needs no root.

use std::ffi::OsStr;
use std::path::PathBuf;

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::poll_until;
use baton_testbed::probe::ask;

const PYTHON: &str = "/usr/bin/python3";

/// The app: `app.py REPORT_DIR`. Reads `REPORT_DIR/mode` at start:
/// `silent` never signals readiness (for crank: writes nothing to
/// NOTIFY_FD); `child-ready` has a child process write READY=1 to
/// NOTIFY_FD instead of the app's main process. Answers every connection with `NAME PID` and closes it.
const APP: &str = r#"
import os, socket, sys, signal, selectors
report_dir = sys.argv[1]
lines = []
for fd in range(64):
    try:
        os.fstat(fd)
    except OSError:
        continue
    lines.append("fd %d %s" % (fd, os.readlink("/proc/self/fd/%d" % fd)))
for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_FD", "CRANK_NAME", "EINHORN_FDS", "EINHORN_FD_COUNT",
            "EINHORN_FD_0", "EINHORN_FD_1", "EINHORN_FD_2"]:
    if var in os.environ:
        lines.append("env %s=%s" % (var, os.environ[var]))
mode = open(os.path.join(report_dir, "mode")).read().strip()
if "EINHORN_FDS" in os.environ:
    name = "einhorn"
    listeners = [socket.socket(fileno=int(n)) for n in os.environ["EINHORN_FDS"].split()]
else:
    name = "crank"
    listeners = [socket.socket(fileno=3)]
for s in listeners:
    lines.append("listener %d %s" % (s.fileno(), s.getsockname()))
if "NOTIFY_FD" in os.environ:
    notify = socket.socket(fileno=int(os.environ["NOTIFY_FD"]))
    lines.append("notify %s %s peer=%s" % (notify.family.name, notify.type.name, notify.getpeername()))
path = os.path.join(report_dir, "report-%d" % os.getpid())
with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
os.rename(path + ".tmp", path)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
if "NOTIFY_FD" in os.environ and mode == "normal":
    notify.send(b"READY=1")
if "NOTIFY_FD" in os.environ and mode == "child-ready":
    # READY=1 written by a child of the app, not by its main process. The
    # child lives on for a while, as a worker that reports readiness does:
    # one that exits at once may be gone before Baton reads its lineage
    # (`--notify-access all` then cannot admit it, as systemd cannot).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if os.fork() == 0:
        notify.send(b"READY=1")
        import time
        time.sleep(3)
        os._exit(0)
sel = selectors.DefaultSelector()
for s in listeners:
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.sendall(("%s %d\n" % (name, os.getpid())).encode())
        conn.close()
"#;

struct App {
    dir: PathBuf,
}

impl App {
    fn new(test: &str) -> App {
        let dir = baton_testbed::unique_temp_dir("baton-compat", test);
        std::fs::write(dir.join("app.py"), APP).unwrap();
        let app = App { dir };
        app.set_mode("normal");
        app
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).unwrap();
    }

    fn baton(&self, args: &[&str]) -> BatonBuilder {
        let script = self.dir.join("app.py");
        let argv: [&OsStr; 3] = [PYTHON.as_ref(), script.as_os_str(), self.dir.as_os_str()];
        BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), self.dir.clone()).args(args).app(argv)
    }

    /// What generation `pid` reported about itself.
    fn report(&self, pid: u32) -> String {
        let path = self.dir.join(format!("report-{pid}"));
        poll_until(&format!("the app's report {}", path.display()), WAIT, || std::fs::read_to_string(&path).ok())
            .unwrap()
    }
}

/// The fd numbers of a report's `fd N target` lines.
fn fds(report: &str) -> Vec<u32> {
    report.lines().filter_map(|l| l.strip_prefix("fd ")?.split(' ').next()?.parse().ok()).collect()
}

fn has_line(report: &str, line: &str) -> bool {
    report.lines().any(|l| l == line)
}

fn restart_output(b: &Baton) -> (bool, String) {
    let out = b.cli(&["restart"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_crank_app_signals_ready_on_notify_fd_and_restarts() {
    let app = App::new("crank");
    // Baton's own crank/einhorn variables (as if it ran under either)
    // describe its fds, not the app's: they must not reach the app.
    let b = app
        .baton(&["--name", "web", "--compat", "crank", "--ready-timeout", "20s"])
        .env("NOTIFY_FD", "9")
        .env("EINHORN_FDS", "7")
        .start();
    let pid1 = b.active_pid();
    assert_eq!(ask(b.port()).unwrap(), format!("crank {pid1}"));
    let report = app.report(pid1);
    // Exactly stdin/stdout/stderr, the listener and crank's socket.
    assert_eq!(fds(&report), [0, 1, 2, 3, 4], "{report}");
    for line in ["env LISTEN_FDS=1", "env LISTEN_FDNAMES=http", "env NOTIFY_FD=4", "env CRANK_NAME=web"] {
        assert!(has_line(&report, line), "{line} missing:\n{report}");
    }
    assert!(!report.contains("EINHORN"), "{report}");
    let notify = b.notify_socket();
    assert!(
        has_line(&report, &format!("notify AF_UNIX SOCK_DGRAM peer={}", notify.display())),
        "NOTIFY_FD is not a datagram socket connected to {}:\n{report}",
        notify.display()
    );

    // READY=1 on NOTIFY_FD is attributed to the new generation's main
    // process (the kernel's credentials): the restart completes.
    let (ok, text) = restart_output(&b);
    assert!(ok, "{text}");
    assert!(text.contains("generation 2") && text.contains("ready"), "{text}");
    let pid2 = b.wait_active(2);
    assert_ne!(pid1, pid2);
    poll_until("generation 1 gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    assert_eq!(ask(b.port()).unwrap(), format!("crank {pid2}"));
    assert_eq!(fds(&app.report(pid2)), [0, 1, 2, 3, 4]);
}

#[test]
fn a_crank_app_that_never_writes_ready_fails_the_restart_and_the_old_one_serves() {
    let app = App::new("crank-silent");
    let b = app.baton(&["--compat", "crank", "--ready-timeout", "2s"]).start();
    let pid1 = b.active_pid();
    app.set_mode("silent");
    let (ok, text) = restart_output(&b);
    assert!(!ok, "a restart whose app never wrote READY=1 succeeded:\n{text}");
    assert!(text.contains("no READY=1 within 2s"), "{text}");
    // The old generation serves, alone.
    let s = b.wait_status("only generation 1 left", |s| s.generations.len() == 1);
    assert_eq!(s.generations[0].pid, pid1, "{s:?}");
    assert_eq!(ask(b.port()).unwrap(), format!("crank {pid1}"));
}

/// READY=1 on NOTIFY_FD is attributed by the writer's kernel-attested
/// credentials, not by the socket it came through: written by a child of
/// the app, it is refused under the default `--notify-access main` (the
/// restart fails, the old generation serves) and accepted under `all`.
#[test]
fn crank_readiness_is_attributed_to_the_writing_process() {
    let app = App::new("crank-child");
    let b = app.baton(&["--compat", "crank", "--ready-timeout", "2s"]).start();
    let pid1 = b.active_pid();
    app.set_mode("child-ready");
    let (ok, text) = restart_output(&b);
    assert!(!ok, "READY=1 from a non-main process was accepted under --notify-access main:\n{text}\n{}", b.log());
    assert!(text.contains("no READY=1 within 2s"), "refused for another reason:\n{text}");
    let s = b.wait_status("only generation 1 left", |s| s.generations.len() == 1);
    assert_eq!(s.generations[0].pid, pid1, "{s:?}");
    let log = b.log();
    assert!(log.contains("refused: not a generation's main process"), "no trace of the refused READY=1:\n{log}");
    drop(b);

    let app = App::new("crank-child-all");
    let b = app.baton(&["--compat", "crank", "--notify-access", "all", "--ready-timeout", "20s"]).start();
    app.set_mode("child-ready");
    let (ok, text) = restart_output(&b);
    assert!(ok, "{text}");
    b.wait_active(2);
}

/// The einhorn app gets `EINHORN_FDS` for every passed socket, the probe
/// listener included (which it serves like the others, unchanged), and is
/// ready by einhorn's own rule, a timer (`--ready after:300ms`).
#[test]
fn an_einhorn_app_serves_every_socket_in_einhorn_fds() {
    let app = App::new("einhorn");
    let b = app.baton(&["--compat", "einhorn", "--probe", "--ready", "after:300ms"]).env("NOTIFY_FD", "9").start();
    let pid1 = b.active_pid();
    assert_eq!(ask(b.port()).unwrap(), format!("einhorn {pid1}"));
    let report = app.report(pid1);
    assert_eq!(fds(&report), [0, 1, 2, 3, 4], "{report}");
    for line in [
        "env EINHORN_FDS=3 4",
        "env EINHORN_FD_COUNT=2",
        "env EINHORN_FD_0=3",
        "env EINHORN_FD_1=4",
        "env LISTEN_FDNAMES=http:probe",
    ] {
        assert!(has_line(&report, line), "{line} missing:\n{report}");
    }
    assert!(!report.contains("NOTIFY_FD") && !report.contains("EINHORN_FD_2"), "{report}");
    // It serves the probe listener too: fd 4's address.
    let probe_port: u16 = report
        .lines()
        .find_map(|l| l.strip_prefix("listener 4 ('127.0.0.1', ")?.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("no probe listener at fd 4:\n{report}"));
    assert_eq!(ask(probe_port).unwrap(), format!("einhorn {pid1}"));

    let (ok, text) = restart_output(&b);
    assert!(ok, "{text}");
    let pid2 = b.wait_active(2);
    assert_eq!(fds(&app.report(pid2)), [0, 1, 2, 3, 4]);
    poll_until("generation 1 gone", WAIT, || (b.status().generations.len() == 1).then_some(())).unwrap();
    assert_eq!(ask(b.port()).unwrap(), format!("einhorn {pid2}"));
}

#[test]
fn einhorn_and_crank_together() {
    let app = App::new("both");
    let b = app.baton(&["--compat", "crank", "--compat", "einhorn"]).start();
    let pid1 = b.active_pid();
    let report = app.report(pid1);
    // The einhorn sockets are the LISTEN_FDS ones; crank's socket is after
    // them, in neither list.
    assert_eq!(fds(&report), [0, 1, 2, 3, 4], "{report}");
    for line in ["env EINHORN_FDS=3", "env EINHORN_FD_COUNT=1", "env NOTIFY_FD=4", "env LISTEN_FDS=1"] {
        assert!(has_line(&report, line), "{line} missing:\n{report}");
    }
    assert_eq!(ask(b.port()).unwrap(), format!("einhorn {pid1}"));
}

/// Where crank's socket goes with more passed fds: after all of
/// `LISTEN_FDS` (fd-store entries included), outside it; einhorn names only
/// the sockets. Nothing else of the parent's reaches the child.
#[test]
fn spawn_places_crank_after_every_listed_fd_and_leaks_nothing() {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    use baton::spawn::{AppCommand, CompatSetup, CrankSetup, GenerationSetup};

    let dir = baton_testbed::unique_temp_dir("baton-compat", "spawn");
    let out = dir.join("out");
    // `exec >FILE` replaces fd 1 for good (no saved copy above 9);
    // `[ -e ]` opens nothing.
    let script = format!(
        "exec >{}; for n in 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do [ -e /proc/$$/fd/$n ] && echo fd $n; \
         done; echo LISTEN_FDS=$LISTEN_FDS NOTIFY_FD=$NOTIFY_FD CRANK_NAME=$CRANK_NAME EINHORN_FDS=$EINHORN_FDS \
         EINHORN_FD_COUNT=$EINHORN_FD_COUNT",
        out.display()
    );
    let cmd = AppCommand::new("/bin/sh".as_ref(), &["-c".into(), script.into()]).unwrap();
    let (a, _a) = UnixDatagram::pair().unwrap();
    let (b, _b) = UnixDatagram::pair().unwrap();
    let (stored, _stored) = UnixDatagram::pair().unwrap();
    let (crank, _peer) = UnixDatagram::pair().unwrap();
    let fds = [(a.as_fd(), "http"), (b.as_fd(), "probe"), (stored.as_fd(), "kept")];
    let setup = GenerationSetup {
        fds: &fds,
        compat: CompatSetup {
            crank: Some(CrankSetup { notify: crank.as_fd(), name: "app" }),
            einhorn_sockets: Some(2),
        },
        ..Default::default()
    };
    let child = cmd.spawn(&setup).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child into a valid status pointer (no
    // other waiter in this binary).
    while unsafe { libc::waitpid(child.pid as i32, &mut status, 0) } < 0 {
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINTR));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        "fd 3\nfd 4\nfd 5\nfd 6\nLISTEN_FDS=3 NOTIFY_FD=6 CRANK_NAME=app EINHORN_FDS=3 4 EINHORN_FD_COUNT=2\n"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // More einhorn sockets than passed fds is refused, by name.
    let setup = GenerationSetup {
        fds: &fds[..1],
        compat: CompatSetup { einhorn_sockets: Some(2), ..Default::default() },
        ..Default::default()
    };
    let e = cmd.spawn(&setup).unwrap_err().to_string();
    assert!(e.contains("EINHORN_FDS") && e.contains("among the passed fds"), "{e}");
}

/// The built-in TCP probe through the real binary: an einhorn app serves
/// every socket of `EINHORN_FDS`, the probe listener included, so its probes
/// pass and make it ready (`--ready probe`); a crank app serves fd 3 only,
/// so its connections to the probe listener are never accepted (the kernel
/// still completes them: Baton holds the listener) and the restart is
/// refused with the probe's reason while the old generation serves.
#[test]
fn tcp_probes_pass_only_for_an_app_that_accepts_on_the_probe_listener() {
    let app = App::new("einhorn-tcp");
    let b = app.baton(&["--compat", "einhorn", "--health-tcp", "--ready", "probe", "--quiet-period", "200ms"]).start();
    let (ok, text) = restart_output(&b);
    assert!(ok, "{text}");
    b.wait_active(2);
    drop(b);

    let app = App::new("crank-tcp");
    let b = app
        .baton(&["--compat", "crank", "--health-tcp", "--health-timeout", "500ms", "--quiet-period", "200ms"])
        .start();
    let pid1 = b.active_pid();
    let report = app.report(pid1);
    // The probe listener is fd 4, crank's socket after it.
    assert!(has_line(&report, "env NOTIFY_FD=5") && has_line(&report, "env LISTEN_FDNAMES=http:probe"), "{report}");
    let (ok, text) = restart_output(&b);
    assert!(!ok, "a generation that never accepts its probes took over:\n{text}");
    assert!(text.contains("TCP probe: not accepted within 500ms"), "{text}");
    let s = b.wait_status("only generation 1 left", |s| s.generations.len() == 1);
    assert_eq!(s.generations[0].pid, pid1, "{s:?}");
    assert_eq!(ask(b.port()).unwrap(), format!("crank {pid1}"));
}
