//! Baton's runtime directory (issue 10, findings 1, 2 and 9): another local
//! user must not be able to plant the directory Baton puts its sockets in
//! (and so receive the app's connections through a notify socket of their
//! own), the directory Baton creates is 0700 with a 0600 control socket, and
//! control paths colliding with the sockets derived from them are refused.
//!
//! The attacks are played for real: as root, the test creates directories
//! owned by a stranger's uid and starts `baton run` as another uid (no
//! `$XDG_RUNTIME_DIR`, no `--control`, so Baton uses `/tmp/baton-UID`).
//! Each test uses its own uids, derived from the test process's pid, so
//! parallel tests and parallel runs never share a directory.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_testbed::{poll_until, skip_unless_root, terminate, unique_temp_dir};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(30);

/// A uid (and gid of the same number) no account uses, unique to this test
/// process and `slot`.
fn test_uid(slot: u32) -> u32 {
    400_000 + (std::process::id() % 100_000) * 16 + slot
}

/// Removes a path (file, link or tree) when dropped, also if the test fails.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `/tmp/baton-UID`, cleared now and removed at the end of the test.
fn default_dir(uid: u32) -> (PathBuf, Cleanup) {
    let dir = PathBuf::from(format!("/tmp/baton-{uid}"));
    let cleanup = Cleanup(dir.clone());
    let _ = std::fs::remove_file(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    (dir, cleanup)
}

fn mkdir(path: &Path, owner: u32, mode: u32) {
    std::fs::create_dir(path).unwrap();
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

/// `baton run --name NAME ARGS -- sleep 600` as `uid` (gid `uid`, no
/// supplementary groups), umask 022, with nothing of the test's environment
/// (no `XDG_RUNTIME_DIR`, `RUNTIME_DIRECTORY`, `NOTIFY_SOCKET`) but `env`.
fn baton_as(uid: Option<u32>, name: &str, args: &[&OsStr], env: &[(&str, &OsStr)]) -> Child {
    let program = match uid {
        Some(_) => baton_for_any_user(),
        None => Path::new(env!("CARGO_BIN_EXE_baton")),
    };
    let mut cmd = Command::new(program);
    cmd.arg("run").arg("--name").arg(name).args(args).args(["--", "/bin/sleep", "600"]);
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("BATON_LOG", "info").envs(env.iter().copied());
    cmd.current_dir("/").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(uid) = uid {
        // std drops the supplementary groups when root changes the uid.
        cmd.uid(uid).gid(uid);
    }
    // SAFETY: umask is async-signal-safe and touches no memory; it runs in
    // the child between fork and exec. A known umask: Baton's directory
    // must come out 0700 whatever the umask lets through.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn baton")
}

/// A copy of the `baton` binary that any uid may execute. The build's own
/// may sit below a directory only root can search (a checkout in a 0700
/// `mktemp -d` directory, as CI makes), and then a test's uid could not even
/// start it. One copy per test process, in `/tmp/baton-runtime-dir-bin-PID`;
/// copies of test processes that are gone are removed first.
fn baton_for_any_user() -> &'static Path {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        const PREFIX: &str = "baton-runtime-dir-bin-";
        for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
            if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = PathBuf::from(format!("/tmp/{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        mkdir(&dir, 0, 0o755);
        let copy = dir.join("baton");
        std::fs::copy(env!("CARGO_BIN_EXE_baton"), &copy).unwrap_or_else(|e| panic!("copying baton: {e}"));
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
}

/// Waits for a Baton that must refuse to start; returns its exit code and
/// stderr. If it is still running after [`WAIT`], it accepted what it should
/// have refused: stops it and fails.
fn refused(mut child: Child, what: &str) -> (i32, String) {
    let status = poll_until(what, WAIT, || child.try_wait().ok().flatten());
    let status = match status {
        Ok(s) => s,
        Err(_) => {
            terminate(&mut child, WAIT);
            let stderr = read_stderr(&mut child);
            panic!("baton started although {what}; its log:\n{stderr}");
        }
    };
    let stderr = read_stderr(&mut child);
    (status.code().unwrap_or(-1), stderr)
}

fn read_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
    }
    text
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// Finding 2 as measured: another user pre-creates `/tmp/baton-UID` 0777, so
/// that they can later swap `NAME.notify` for their own socket.
#[test]
fn a_directory_planted_by_another_user_is_refused() {
    if !skip_unless_root("a_directory_planted_by_another_user_is_refused") {
        return;
    }
    let (baton, stranger) = (test_uid(0), test_uid(1));
    let (dir, _cleanup) = default_dir(baton);
    mkdir(&dir, stranger, 0o777);

    let (code, stderr) = refused(baton_as(Some(baton), "planted", &[], &[]), "its directory belongs to a stranger");
    assert_eq!(code, 1, "{stderr}");
    let owned = format!("{} is owned by uid {stranger}, not by baton's user (uid {baton})", dir.display());
    assert!(stderr.contains(&owned), "the message names the directory, its owner and baton's uid:\n{stderr}");
    assert!(stderr.contains(&format!("rm -r {}", dir.display())) && stderr.contains("--control"), "{stderr}");
    assert!(entries(&dir).is_empty(), "no socket was created in the stranger's directory: {:?}", entries(&dir));
    assert_eq!(mode_of(&dir), 0o777, "the stranger's directory is left alone");
}

/// A symbolic link in place of `/tmp/baton-UID`, to a directory the stranger
/// controls: following it would put Baton's sockets there.
#[test]
fn a_symlink_in_place_of_the_directory_is_refused() {
    if !skip_unless_root("a_symlink_in_place_of_the_directory_is_refused") {
        return;
    }
    let (baton, stranger) = (test_uid(2), test_uid(3));
    let (dir, _cleanup) = default_dir(baton);
    let target = unique_temp_dir("baton-rundir", "symlink-target");
    let _target_cleanup = Cleanup(target.clone());
    std::os::unix::fs::chown(&target, Some(stranger), Some(stranger)).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&target, &dir).unwrap();

    let (code, stderr) = refused(baton_as(Some(baton), "linked", &[], &[]), "its directory is a symbolic link");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("{} is a symbolic link", dir.display())), "{stderr}");
    assert!(stderr.contains(&format!("rm {}", dir.display())), "the message says what to do:\n{stderr}");
    assert!(entries(&target).is_empty(), "nothing was created through the link: {:?}", entries(&target));
}

/// Baton's own uid owns the directory, but its group may write to it.
#[test]
fn a_group_writable_directory_is_refused() {
    if !skip_unless_root("a_group_writable_directory_is_refused") {
        return;
    }
    let baton = test_uid(4);
    let (dir, _cleanup) = default_dir(baton);
    mkdir(&dir, baton, 0o770);

    let (code, stderr) = refused(baton_as(Some(baton), "grouped", &[], &[]), "its directory is group-writable");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("{} is writable by group or others (mode 0770)", dir.display())), "{stderr}");
    assert!(stderr.contains(&format!("chmod 0700 {}", dir.display())), "the message says what to do:\n{stderr}");
    assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
    assert_eq!(mode_of(&dir), 0o770, "a refused directory is not changed");
}

/// `$XDG_RUNTIME_DIR` pointing to a directory a stranger owns and everyone
/// may write: Baton would create `baton/` in it, which the stranger could
/// rename away and replace.
#[test]
fn a_foreign_parent_directory_is_refused() {
    if !skip_unless_root("a_foreign_parent_directory_is_refused") {
        return;
    }
    let (baton, stranger) = (test_uid(5), test_uid(6));
    let xdg = unique_temp_dir("baton-rundir", "foreign-xdg");
    let _cleanup = Cleanup(xdg.clone());
    std::os::unix::fs::chown(&xdg, Some(stranger), Some(stranger)).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o777)).unwrap();

    let env = [("XDG_RUNTIME_DIR", xdg.as_os_str())];
    let (code, stderr) = refused(baton_as(Some(baton), "foreign", &[], &env), "XDG_RUNTIME_DIR is a stranger's");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("{} is owned by uid {stranger}", xdg.display())), "{stderr}");
    assert!(stderr.contains("XDG_RUNTIME_DIR"), "the message says what to do:\n{stderr}");
    assert!(entries(&xdg).is_empty(), "{:?}", entries(&xdg));
}

/// Waits until Baton's three sockets exist in `dir`.
fn wait_sockets(child: &mut Child, dir: &Path, name: &str) -> [PathBuf; 3] {
    let paths = ["sock", "notify", "handoff"].map(|ext| dir.join(format!("{name}.{ext}")));
    let up = poll_until("baton's three sockets", WAIT, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        paths.iter().all(|p| p.exists()).then_some(Ok(()))
    });
    match up {
        Ok(Ok(())) => paths,
        Ok(Err(status)) => panic!("baton exited ({status}):\n{}", read_stderr(child)),
        Err(e) => {
            terminate(child, WAIT);
            panic!("{e}; baton's log:\n{}", read_stderr(child));
        }
    }
}

/// `baton stop` through the control socket (as root, which passes Baton's
/// peer check), then Baton must exit on its own.
fn stop(mut child: Child, control: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = rt.block_on(baton::control::call(control, &baton::control::Request::Stop));
    assert!(matches!(answer, Ok(baton::control::Response::Stopping)), "{answer:?}");
    let exited = poll_until("baton to exit after stop", WAIT, || child.try_wait().ok().flatten());
    if exited.is_err() {
        terminate(&mut child, WAIT);
    }
    let status = exited.unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}: {}", read_stderr(&mut child));
}

/// The happy path: nothing there yet, so Baton creates `/tmp/baton-UID`
/// itself, 0700 and its own, with a 0600 control socket; the notify and
/// handoff sockets are 0666 inside it (see `baton::rundir`).
#[test]
fn the_directory_is_created_private_with_a_private_control_socket() {
    if !skip_unless_root("the_directory_is_created_private_with_a_private_control_socket") {
        return;
    }
    let baton = test_uid(7);
    let (dir, _cleanup) = default_dir(baton);
    let mut child = baton_as(Some(baton), "fresh", &[], &[]);
    let [control, notify, handoff] = wait_sockets(&mut child, &dir, "fresh");

    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (baton, 0o700), "created private, under umask 022");
    for (path, mode) in [(&control, 0o600), (&notify, 0o666), (&handoff, 0o666)] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (baton, mode), "{}", path.display());
    }
    stop(child, &control);
}

/// A directory an older Baton left at the umask's mode (0755): Baton's own,
/// so it is accepted and narrowed to 0700.
#[test]
fn an_older_batons_wide_directory_is_narrowed() {
    if !skip_unless_root("an_older_batons_wide_directory_is_narrowed") {
        return;
    }
    let baton = test_uid(8);
    let (dir, _cleanup) = default_dir(baton);
    mkdir(&dir, baton, 0o755);
    let mut child = baton_as(Some(baton), "older", &[], &[]);
    let [control, ..] = wait_sockets(&mut child, &dir, "older");
    assert_eq!(mode_of(&dir), 0o700);
    stop(child, &control);
}

/// `--control` in a directory of the user's choosing: a stranger's
/// directory, or a stranger's symbolic link in `/tmp` (which they could
/// re-point later), is refused; `/tmp` itself (sticky: no one else can
/// remove or rename Baton's sockets there), as in the README's quick start,
/// is accepted and left as it is.
#[test]
fn explicit_control_directories_are_checked_too() {
    if !skip_unless_root("explicit_control_directories_are_checked_too") {
        return;
    }
    let (baton, stranger) = (test_uid(9), test_uid(10));
    let theirs = unique_temp_dir("baton-rundir", "strangers-dir");
    let _theirs_cleanup = Cleanup(theirs.clone());
    std::os::unix::fs::chown(&theirs, Some(stranger), Some(stranger)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let control = theirs.join("app.sock");
    let args = [OsStr::new("--control"), control.as_os_str()];
    let (code, stderr) = refused(baton_as(Some(baton), "chosen", &args, &[]), "--control is in a stranger's directory");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--control directory {} is owned by uid {stranger}", theirs.display())),
        "{stderr}"
    );
    assert!(entries(&theirs).is_empty(), "{:?}", entries(&theirs));

    let link = PathBuf::from(format!("/tmp/baton-rundir-{}-link", std::process::id()));
    let _link_cleanup = Cleanup(link.clone());
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&theirs, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(stranger), Some(stranger)).unwrap();
    let control = link.join("app.sock");
    let args = [OsStr::new("--control"), control.as_os_str()];
    let (code, stderr) =
        refused(baton_as(Some(baton), "chosen", &args, &[]), "--control goes through a stranger's link");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("symbolic link {} on the way", link.display())), "{stderr}");
    assert!(entries(&theirs).is_empty(), "{:?}", entries(&theirs));

    let control = PathBuf::from(format!("/tmp/baton-rundir-{}-quickstart.sock", std::process::id()));
    let _cleanups = ["sock", "notify", "handoff"].map(|ext| Cleanup(control.with_extension(ext)));
    let args = [OsStr::new("--control"), control.as_os_str()];
    let mut child = baton_as(Some(baton), "quickstart", &args, &[]);
    let name = control.file_stem().unwrap().to_str().unwrap();
    let [control, ..] = wait_sockets(&mut child, Path::new("/tmp"), name);
    assert_eq!(mode_of(Path::new("/tmp")), 0o1777, "a --control directory is never changed");
    assert_eq!(mode_of(&control), 0o600);
    stop(child, &control);
}

/// Finding 9: the notify and handoff sockets are derived from the control
/// path by replacing its extension, so `--control X.handoff` made the
/// handoff socket silently replace the control socket, and `--control
/// X.notify` failed with an obscure error. Both are refused up front, as is
/// a `--listen` socket at one of Baton's own paths (the handoff bind used
/// to unlink it).
#[test]
fn control_paths_colliding_with_derived_sockets_are_refused() {
    let dir = unique_temp_dir("baton-rundir", "collisions");
    let _cleanup = Cleanup(dir.clone());
    for ext in ["handoff", "notify"] {
        let control = dir.join(format!("app.{ext}"));
        let args = [OsStr::new("--control"), control.as_os_str()];
        let (code, stderr) = refused(baton_as(None, "collide", &args, &[]), &format!("--control ends in .{ext}"));
        assert_eq!(code, 2, "a usage error:\n{stderr}");
        assert!(stderr.contains(&format!("--control {}", control.display())), "names the flag:\n{stderr}");
        assert!(stderr.contains(&format!("must not end in .{ext}")), "{stderr}");
        assert!(stderr.contains(&format!("--control {}", dir.join("app.sock").display())), "the fix:\n{stderr}");
    }
    let control = dir.join("app.sock");
    let listen = format!("unix:{}", dir.join("app.handoff").display());
    let args = [OsStr::new("--control"), control.as_os_str(), OsStr::new("--listen"), OsStr::new(&listen)];
    let (code, stderr) = refused(baton_as(None, "collide", &args, &[]), "--listen is at the handoff path");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is baton's own handoff socket"), "{stderr}");
    assert!(entries(&dir).is_empty(), "nothing was bound: {:?}", entries(&dir));
}

/// Finding 1's part for units: systemd creates `RuntimeDirectory=` (where
/// Baton's sockets go) 0755 unless told otherwise.
#[test]
fn generated_and_reference_units_make_the_runtime_directory_private() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: baton::units::UnitsArgs,
    }
    let private = |text: &str| text.lines().any(|l| l == "RuntimeDirectoryMode=0700");
    for topology in [&[][..], &["--direct"][..]] {
        for version in [252, 257] {
            let argv = ["units", "--name", "web", "--listen", "http=8080"]
                .into_iter()
                .chain(topology.iter().copied())
                .chain(["--", "/usr/bin/app"]);
            let args = <Cli as clap::Parser>::try_parse_from(argv).unwrap().args;
            let files = baton::units::generate(&args, version).unwrap();
            let service = files.iter().find(|f| f.name == "web.service").expect("a service unit");
            assert!(private(&service.contents), "{topology:?} {version}:\n{}", service.contents);
        }
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    for reference in [units.join("baton-httpd.service"), units.join("direct/baton-httpd.service")] {
        assert!(private(&std::fs::read_to_string(&reference).unwrap()), "{}", reference.display());
    }
}

/// Under a real systemd (the host's 252), a generated, fully hardened unit
/// (`DynamicUser=yes`, `UMask=0077`, `SystemCallFilter=@system-service`):
/// systemd creates `RuntimeDirectory=` 0700 for the dynamic user, Baton
/// accepts it (it is `$RUNTIME_DIRECTORY`, owned by Baton's uid), and the
/// socket modes come out exact despite the unit's umask, so the
/// `unshare(CLONE_FS)` of `bind_with_mode` passes the seccomp filter.
#[test]
fn under_systemd_the_runtime_directory_is_private() {
    use baton_testbed::{Flavor, Testbed, cargo_bin, free_loopback_port};
    if !skip_unless_root("under_systemd_the_runtime_directory_is_private") {
        return;
    }
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: baton::units::UnitsArgs,
    }
    let tb = Testbed::boot(Flavor::Host).unwrap_or_else(|e| panic!("boot: {e}"));
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    for (from, to) in
        [(Path::new(env!("CARGO_BIN_EXE_baton")), "/usr/local/bin/baton"), (&probe, "/usr/local/bin/probe")]
    {
        let dest = tb.host_path(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {} to {to}: {e}", from.display()));
    }
    let listen = format!("http=127.0.0.1:{}", free_loopback_port());
    let argv = ["units", "--name", "rundir", "--listen", &listen, "--baton", "/usr/local/bin/baton", "--"];
    let argv = argv.into_iter().chain(["/usr/local/bin/probe", "--serve", "http"]);
    let args = <Cli as clap::Parser>::try_parse_from(argv).unwrap().args;
    for f in baton::units::generate(&args, tb.systemd_version()).unwrap() {
        tb.write_file(format!("/etc/systemd/system/{}", f.name), &f.contents).unwrap();
    }
    tb.daemon_reload().unwrap();
    tb.systemctl_checked(&["start", "rundir.socket", "rundir.service"]).unwrap_or_else(|e| panic!("start: {e}"));
    let main_pid = tb.show("rundir.service", "MainPID").unwrap();
    let status = tb.run_checked(&["cat", &format!("/proc/{main_pid}/status")]).unwrap().stdout;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().next()).unwrap();
    let stat = |path: &str| tb.run_checked(&["stat", "-c", "%a %u %F", path]).unwrap().stdout.trim().to_owned();
    assert_eq!(stat("/run/rundir"), format!("700 {uid} directory"), "RuntimeDirectoryMode=0700, Baton's user");
    assert_eq!(stat("/run/rundir/rundir.sock"), format!("600 {uid} socket"));
    assert_eq!(stat("/run/rundir/rundir.notify"), format!("666 {uid} socket"), "exact despite UMask=0077");
    assert_eq!(stat("/run/rundir/rundir.handoff"), format!("666 {uid} socket"));
    tb.systemctl_checked(&["stop", "rundir.service", "rundir.socket"]).unwrap();
    assert_eq!(tb.show("rundir.service", "Result").unwrap(), "success");
}
