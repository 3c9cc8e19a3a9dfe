//! What `baton` tells the person or script driving it, from the real binary
//! with real sockets: `baton notify`'s fd checks and its refusals, control
//! clients that half-close their side, the errors for control requests too
//! long, not UTF-8 or too slow, a control socket the user may not use, the
//! `--name` default, the `--freebind` hint, log colours only on a terminal,
//! and counts in `baton status` in the right number.
//!
//! No root needed except for the permission test, which then runs the
//! client as another uid (`setpriv`); without root it takes the socket's
//! permissions away instead. Baton's control and notify sockets live in a
//! private temporary directory. Timing bounds are generous (a noisy 2-core
//! machine).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use baton::control::Response;
use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::{cargo_bin, poll_until};

fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-cli", test)
}

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

fn probe_bin() -> PathBuf {
    cargo_bin("sd-probe", "baton-sd-probe")
}

/// `baton run --control DIR/baton.sock -l http=127.0.0.1:0 ARGS -- APP...`,
/// stdout and stderr in `DIR/baton.out` and `DIR/baton.log`, `NO_COLOR`
/// removed (the colour test sets what it needs); the directory stays.
fn launch(dir: &Path, args: &[&str], app: &[&OsStr]) -> Baton {
    BatonBuilder::new(baton_bin(), dir).args(args).app(app).env_remove("NO_COLOR").keep_dir().spawn()
}

/// Baton running `baton-sd-probe --serve http PROBE_ARGS`, generation 1 active.
fn start_probe(dir: &Path, args: &[&str], probe_args: &[&str]) -> Baton {
    let probe = probe_bin();
    let mut app: Vec<&OsStr> = vec![probe.as_os_str(), OsStr::new("--serve"), OsStr::new("http")];
    app.extend(probe_args.iter().map(OsStr::new));
    let b = launch(dir, args, &app);
    b.wait_active(1);
    b
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Reads one answer line from a raw control connection (whatever follows
/// it, even a reset, is ignored).
fn read_answer(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn parse_answer(text: &str) -> Response {
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no answer line ({e}): {text:?}"))
}

// ---- finding 7: `baton notify --fd` -------------------------------------------

#[test]
fn notify_with_a_negative_or_closed_fd_is_a_usage_error_not_a_panic() {
    let dir = scratch("notify-fd");
    // A manager stand-in: the fds are checked before anything is sent.
    let socket = dir.join("notify");
    let manager = UnixDatagram::bind(&socket).unwrap();
    for args in [&["--fd=-1"][..], &["--fd", "-1"], &["--fd", "-7", "--fdname", "x"]] {
        let out = Command::new(baton_bin()).arg("notify").args(args).env("NOTIFY_SOCKET", &socket).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "baton notify {args:?}: {out:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("--fd") && err.contains("is not a file descriptor number"), "{err}");
    }
    // A number that is not open in the process: named, with the fix.
    let out = Command::new(baton_bin()).args(["notify", "--fd", "917"]).env("NOTIFY_SOCKET", &socket).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("--fd 917: not an open file descriptor") && err.contains("3<FILE"), "{err}");
    // An open one still goes (no barrier: the stand-in does not answer one).
    let out = Command::new(baton_bin())
        .args(["notify", "--fd", "0", "--fdname", "x", "--no-block"])
        .env("NOTIFY_SOCKET", &socket)
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    manager.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 512];
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=x\n");
}

// ---- finding 10: half-closing control clients ---------------------------------

#[test]
fn a_waiting_restart_client_that_half_closes_still_gets_its_answer() {
    let dir = scratch("half-close");
    let b = start_probe(&dir, &[], &[]);
    // As `nc -N` or socat do at the end of their input: the request, then
    // shutdown(SHUT_WR), then wait for the answer.
    let mut s = UnixStream::connect(b.control()).unwrap();
    s.write_all(b"{\"cmd\":\"restart\",\"wait\":true}\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = read_answer(&mut s);
    match parse_answer(&answer) {
        Response::Restarted(done) => assert_eq!(done.generation, 2, "{done:?}"),
        other => panic!("{other:?}\nlog:\n{}", b.log()),
    }
    // A request ended by the end of the stream, not by a newline
    // (`printf '{"cmd":"status"}' | nc -N`), is a request too.
    let mut s = UnixStream::connect(b.control()).unwrap();
    s.write_all(b"{\"cmd\":\"status\"}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = read_answer(&mut s);
    assert!(matches!(parse_answer(&answer), Response::Status(s) if s.restarts == 1), "{answer}");
}

/// Whether Baton still holds a connection accepted on `control`: accepted
/// `AF_UNIX` sockets carry the listener's path in /proc/net/unix.
fn connections_at(control: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = control.to_string_lossy();
    // Minus the listening socket itself.
    table.lines().filter(|l| l.split_whitespace().nth(7) == Some(&*path)).count().saturating_sub(1)
}

#[test]
fn a_waiting_client_that_closes_completely_is_let_go_while_the_restart_goes_on() {
    // Guards the half-close fix: a *full* close must still end the wait
    // (the connection's slot and fd are freed at once, not when the
    // restart ends).
    let dir = scratch("full-close");
    let hang = dir.join("hang");
    let b = start_probe(&dir, &[], &["--hang-if-exists", hang.to_str().unwrap()]);
    std::fs::write(&hang, "").unwrap();
    let mut s = UnixStream::connect(b.control()).unwrap();
    s.write_all(b"{\"cmd\":\"restart\",\"wait\":true}\n").unwrap();
    poll_until("baton starting generation 2", WAIT, || {
        b.try_status()?.generations.iter().any(|g| g.generation == 2).then_some(())
    })
    .unwrap();
    // Ours, once the status polls' connections are closed too.
    poll_until("only the waiting client connected", WAIT, || (connections_at(b.control()) == 1).then_some(())).unwrap();
    drop(s);
    poll_until("baton to close the departed client's connection", WAIT, || {
        (connections_at(b.control()) == 0).then_some(())
    })
    .unwrap();
    let s = b.try_status().unwrap();
    assert!(s.restarting, "the restart goes on: {s:?}");
}

// ---- finding 11a: permission denied on the control socket ---------------------

#[test]
fn a_control_socket_the_user_may_not_use_is_not_reported_as_no_baton() {
    let dir = scratch("denied");
    let b = start_probe(&dir, &[], &[]);
    let root = rustix::process::geteuid().is_root();
    let out = if root {
        // Another user: the socket is baton's, mode 0600.
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists());
        let setpriv = setpriv.expect("setpriv not found: apt-get install util-linux");
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", baton_bin(), "status", "--control"])
            .arg(b.control())
            .output()
            .unwrap()
    } else {
        // Our own socket without write permission: connect() gets EACCES.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.control(), std::fs::Permissions::from_mode(0o000)).unwrap();
        let out = b.cli(&["status"]);
        std::fs::set_permissions(b.control(), std::fs::Permissions::from_mode(0o600)).unwrap();
        out
    };
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(!err.contains("no baton is running"), "{err}");
    assert!(err.contains("permission denied") && err.contains("as root") && err.contains("--control"), "{err}");
    // The baton is there all along.
    assert!(b.try_status().is_some());
}

// ---- finding 11b: --name's default ----------------------------------------------

#[test]
fn name_help_states_the_default_the_client_really_uses() {
    let dir = scratch("name-default");
    for cmd in ["status", "restart", "stop", "upgrade"] {
        let help = Command::new(baton_bin()).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let name =
            help.split("--name <NAME>").nth(1).and_then(|t| t.split("--control <CONTROL>").next()).unwrap_or_default();
        // Not the app's program name: the client knows no app.
        assert!(!name.contains("default: the app's program name"), "baton {cmd} --help:\n{help}");
        assert!(name.contains("[default: baton]") && name.contains("baton-httpd"), "baton {cmd} --help:\n{help}");
    }
    // What it does: `baton` unless given, whatever runs.
    let client = |args: &[&str]| Command::new(baton_bin()).args(args).env("RUNTIME_DIRECTORY", &dir).output().unwrap();
    let out = client(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains(&format!("{}", dir.join("baton.sock").display())), "{out:?}");
    let out = client(&["status", "--name", "baton-httpd"]);
    assert!(stderr(&out).contains(&format!("{}", dir.join("baton-httpd.sock").display())), "{out:?}");
}

// ---- finding 11c: the freebind hint ---------------------------------------------

#[test]
fn an_address_not_on_this_host_names_the_freebind_option() {
    let dir = scratch("freebind");
    // With this sysctl on, every address binds without IP_FREEBIND; a new
    // network namespace (root only) has it off.
    let nonlocal = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind").is_ok_and(|v| v.trim() != "0");
    let mut cmd = if nonlocal {
        assert!(rustix::process::geteuid().is_root(), "net.ipv4.ip_nonlocal_bind=1: run as root (unshare --net)");
        let mut c = Command::new("unshare");
        c.args(["--net", baton_bin()]);
        c
    } else {
        Command::new(baton_bin())
    };
    // TEST-NET-2, never configured on a test machine.
    let out = cmd
        .args(["run", "--control"])
        .arg(dir.join("baton.sock"))
        .args(["-l", "198.51.100.7:0", "--", "/bin/true"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("198.51.100.7") && err.contains("pass --freebind"), "{err}");
}

// ---- finding 11d: a refused `baton notify` --------------------------------------

/// `baton run ACCESS` over a shell script whose *child* runs `baton notify
/// --ready` (with `main`, not the main process: refused), recording its
/// exit code and stderr, then execs the probe (same pid), which is ready.
fn notify_from_a_child(test: &str, access: &str) -> (i32, String) {
    let dir = scratch(test);
    let script = r#""$0" notify --ready --status "from a child" 2>"$1/notify.err"; echo $? >"$1/notify.rc"; exec "$2" --serve http"#;
    let probe = probe_bin();
    let app = [
        OsStr::new("/bin/sh"),
        OsStr::new("-c"),
        OsStr::new(script),
        OsStr::new(baton_bin()),
        dir.as_os_str(),
        probe.as_os_str(),
    ];
    let b = launch(&dir, &["--notify-access", access], &app);
    b.wait_active(1);
    let rc = poll_until("baton notify's exit code", WAIT, || {
        std::fs::read_to_string(dir.join("notify.rc")).ok().filter(|t| t.ends_with('\n'))
    })
    .unwrap();
    let err = std::fs::read_to_string(dir.join("notify.err")).unwrap();
    (rc.trim().parse().unwrap(), err)
}

#[test]
fn a_notification_baton_refuses_makes_baton_notify_fail_with_the_fix() {
    let (rc, err) = notify_from_a_child("notify-refused", "main");
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("baton refused the notification"), "{err}");
    assert!(err.contains("not the main process") && err.contains("--notify-access all"), "{err}");
    // Admitted, it succeeds (no false refusals).
    let (rc, err) = notify_from_a_child("notify-admitted", "all");
    assert_eq!((rc, err.as_str()), (0, ""));
}

// ---- finding 11e: bad control requests get an answer ----------------------------

#[test]
fn oversized_non_utf8_and_slow_control_requests_are_answered_with_the_problem() {
    let dir = scratch("bad-requests");
    let b = start_probe(&dir, &[], &[]);
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("oversized", vec![b'a'; 5000], "longer than 4096 bytes"),
        ("not UTF-8", b"{\"cmd\":\"st\xffatus\"}\n".to_vec(), "not UTF-8"),
        // Part of a request, then silence: the deadline (5 s) answers.
        ("slow", b"{\"cmd\":".to_vec(), "no complete request within 5 s"),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(what, bytes, expect)| {
            let control = b.control().to_owned();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&control).unwrap();
                s.write_all(&bytes).unwrap();
                let answer = read_answer(&mut s);
                match parse_answer(&answer) {
                    Response::Error { message } => assert!(message.contains(expect), "{what}: {message}"),
                    other => panic!("{what}: {other:?}"),
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Baton is unharmed.
    assert!(b.try_status().is_some());
}

// ---- finding 11f: colour only on a terminal -------------------------------------

/// `baton run` that fails at once with one ERROR line (its listening
/// socket's directory does not exist), stderr wherever `stderr` says.
fn failing_run(dir: &Path, stderr: Stdio, no_color: Option<&str>) -> std::process::ExitStatus {
    let mut cmd = Command::new(baton_bin());
    cmd.args(["run", "--control"])
        .arg(dir.join("baton.sock"))
        .arg("-l")
        .arg(format!("unix:{}", dir.join("missing/app.sock").display()))
        .args(["--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    cmd.status().unwrap()
}

/// A pseudo-terminal: (master, slave) as files.
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on fds this function owns; every return is
    // checked, the name buffer is NUL-terminated by ptsname_r on success.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = std::fs::File::from_raw_fd(master);
        use std::os::fd::AsRawFd;
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()), 0);
        let name = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&name).unwrap();
        (master, slave)
    }
}

/// Everything written to the terminal whose slave side is closed now.
fn drain(mut master: std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // EIO once the last slave fd is closed and the buffer is empty.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn log_lines_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let dir = scratch("colour");
    // A file: no escape codes.
    let log = dir.join("baton.log");
    let status = failing_run(&dir, std::fs::File::create(&log).unwrap().into(), None);
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("ERROR") && text.contains("does not exist"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes in a log file: {text:?}");
    // A pipe: none either.
    let out = Command::new(baton_bin())
        .args(["run", "--control"])
        .arg(dir.join("baton.sock"))
        .arg("-l")
        .arg(format!("unix:{}", dir.join("missing/app.sock").display()))
        .args(["--", "/bin/true"])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("ERROR") && !stderr(&out).contains('\x1b'), "{:?}", stderr(&out));

    // A terminal: coloured, unless NO_COLOR is set (to anything but "").
    for (no_color, coloured) in [(None, true), (Some("1"), false), (Some(""), true)] {
        let (master, slave) = pty();
        let status = failing_run(&dir, slave.into(), no_color);
        assert_eq!(status.code(), Some(1));
        let text = drain(master);
        assert!(text.contains("ERROR"), "{text:?}");
        assert_eq!(text.contains('\x1b'), coloured, "NO_COLOR={no_color:?}: {text:?}");
    }
}

// ---- finding 11g: counts in the right number ------------------------------------

#[test]
fn status_counts_are_in_the_right_number() {
    let dir = scratch("plural");
    // One fd-store entry: the probe stores a memfd.
    let b = start_probe(&dir, &[], &["--store", "state=hello"]);
    let first = String::from_utf8_lossy(&b.cli(&["status"]).stdout).into_owned();
    assert!(first.lines().next().unwrap_or_default().ends_with(", 0 restarts"), "{first}");
    assert!(first.contains("fd store: 1 entry\n") && first.contains(", 0 upgrades\n"), "{first}");
    let out = b.cli(&["restart"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&b.cli(&["status"]).stdout).into_owned();
    assert!(text.lines().next().unwrap_or_default().ends_with(", 1 restart"), "{text}");
    assert!(!text.contains("(s)"), "{text}");
}
