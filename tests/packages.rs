//! The .deb and .rpm built by `packaging/build.sh`, installed and operated
//! the way an administrator would, under a real systemd 252 (the host's),
//! 257 (Debian trixie) and 262 (Debian forky):
//!
//! - both packages build; the .rpm holds the expected files and scriptlets
//!   (`rpm -qlp`, `rpm -qp --scripts`); `lintian` finds no error in the .deb;
//! - `dpkg -i` enables and starts both sockets (baton-httpd.socket and its
//!   steering sibling baton-httpd-b.socket) and the service, Baton steers
//!   the pair, and the default document root answers (`curl`);
//! - `dpkg -i` of a rebuilt package (next revision) under loopback load
//!   fails no request: the postinst upgrades Baton in place (same MainPID)
//!   and reloads baton-httpd.service, the socket keeps its listener, and
//!   idle keep-alive connections reach the new generation (more in
//!   tests/package_upgrade.rs);
//! - `systemctl reload` (supervised: overlapped restart) and `systemctl
//!   restart` under load fail no request, nor does `systemctl restart` of
//!   the direct topology (units from `baton units --direct`, not packaged);
//! - `dpkg --purge` leaves nothing running, listening, enabled or installed;
//! - on 252, the .rpm goes through the same install / upgrade-under-load /
//!   erase cycle with Debian's `rpm` (its scriptlets run for real).
//!
//! The load: threads doing a new connection per request, and threads each
//! keeping one connection alive, all checking every response (status, body,
//! `baton-pid`). Requests are paced and every load stops by itself.
//!
//! Needs `cargo-deb`, `cargo-generate-rpm`, `rpm`, `lintian` and `curl`;
//! without them (or without root, for the testbed tests) the tests skip
//! outside CI and fail in CI (`CI=true`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_testbed::httpd;
use baton_testbed::{Bed, CmdOutput, Flavor, free_loopback_port, skip_unless_root};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);

/// How long one package operation (dpkg, rpm) may take inside a testbed.
const PACKAGE_OP: Duration = Duration::from_secs(300);

/// A load never runs longer than this, even if the test forgets to stop it.
const LOAD_MAX: Duration = Duration::from_secs(300);

/// Pause between two requests of one client: enough load to catch a drop
/// at any moment, without starving dpkg and systemd on two cores.
const PACE: Duration = Duration::from_millis(5);

const SOCKET: &str = "baton-httpd.socket";
/// Its steering sibling: the second socket of the port.
const SIBLING: &str = "baton-httpd-b.socket";
const SERVICE: &str = "baton-httpd.service";

/// The document root's page, as shipped.
const INDEX: &str = include_str!("../packaging/www/index.html");

/// The files both packages install.
const PACKAGED: &[&str] = &[
    "/usr/bin/baton",
    "/usr/bin/baton-httpd",
    "/usr/lib/systemd/system/baton-httpd-b.socket",
    "/usr/lib/systemd/system/baton-httpd.service",
    "/usr/lib/systemd/system/baton-httpd.socket",
    "/usr/share/bash-completion/completions/baton",
    "/usr/share/bash-completion/completions/baton-httpd",
    "/usr/share/baton-httpd/www/index.html",
    "/usr/share/doc/baton/README.md",
    "/usr/share/fish/vendor_completions.d/baton-httpd.fish",
    "/usr/share/fish/vendor_completions.d/baton.fish",
    "/usr/share/man/man1/baton-httpd.1.gz",
    "/usr/share/man/man1/baton-notify.1.gz",
    "/usr/share/man/man1/baton-restart.1.gz",
    "/usr/share/man/man1/baton-run.1.gz",
    "/usr/share/man/man1/baton-status.1.gz",
    "/usr/share/man/man1/baton-stop.1.gz",
    "/usr/share/man/man1/baton-units.1.gz",
    "/usr/share/man/man1/baton-upgrade.1.gz",
    "/usr/share/man/man1/baton.1.gz",
];

// ---- tools and building ----------------------------------------------------

/// Whether every `(tool, how to install it)` is on `$PATH`. Otherwise skips
/// (printing why) outside CI and panics in CI, like [`skip_unless_root`].
fn have_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
        })
        .map(|(tool, hint)| format!("`{tool}` not found ({hint})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: cannot run in CI: {reason}");
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
    false
}

const CARGO_TOOLS: &[(&str, &str)] = &[
    ("cargo-deb", "cargo install --locked cargo-deb"),
    ("cargo-generate-rpm", "cargo install --locked cargo-generate-rpm"),
];

/// The packages of two consecutive revisions of the same version.
#[derive(Debug)]
struct Built {
    deb: [PathBuf; 2],
    rpm: [PathBuf; 2],
    versions: [String; 2],
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `packaging/build.sh --version V` for revisions 1 and 2 (once per
/// test process, shared by the tests) and returns the packages, or `None`
/// when the tools are missing and the test may skip.
fn built(test: &str) -> Option<&'static Built> {
    if !have_tools(test, CARGO_TOOLS) {
        return None;
    }
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let versions = [1, 2].map(|rev| format!("{}-{rev}", env!("CARGO_PKG_VERSION")));
        let mut debs = Vec::new();
        let mut rpms = Vec::new();
        for version in &versions {
            let t0 = Instant::now();
            let out = Command::new("bash")
                .arg(workspace_root().join("packaging/build.sh"))
                .args(["--version", version])
                .current_dir(workspace_root())
                .output()
                .map_err(|e| format!("running packaging/build.sh: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(format!(
                    "packaging/build.sh --version {version}: {}\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let field = |key: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("no `{key}` line in build.sh's output:\n{stdout}"))
            };
            // cargo-deb deletes the other versions' .deb from target/debian:
            // keep each build's packages apart.
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packages");
            std::fs::create_dir_all(&keep).map_err(|e| format!("creating {}: {e}", keep.display()))?;
            let kept = |built: PathBuf| -> Result<PathBuf, String> {
                let dest = keep.join(built.file_name().unwrap_or_default());
                std::fs::copy(&built, &dest).map_err(|e| format!("copying {}: {e}", built.display()))?;
                Ok(dest)
            };
            let (deb, rpm) = (kept(field("deb: ")?)?, kept(field("rpm: ")?)?);
            eprintln!(
                "packaging/build.sh --version {version}: {:?}; {} ({} bytes), {} ({} bytes)",
                t0.elapsed(),
                deb.display(),
                std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0),
                rpm.display(),
                std::fs::metadata(&rpm).map(|m| m.len()).unwrap_or(0),
            );
            debs.push(deb);
            rpms.push(rpm);
        }
        let two = |v: Vec<PathBuf>| -> [PathBuf; 2] { [v[0].clone(), v[1].clone()] };
        Ok(Built { deb: two(debs), rpm: two(rpms), versions })
    });
    match built {
        Ok(b) => Some(b),
        Err(e) => panic!("{test}: building the packages failed: {e}"),
    }
}

fn host_run(argv: &[&str]) -> std::process::Output {
    Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn host_ok(argv: &[&str]) -> String {
    let out = host_run(argv);
    assert!(out.status.success(), "{argv:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- static checks of the packages ----------------------------------------

#[test]
fn rpm_contents_and_scriptlets() {
    let test = "rpm_contents_and_scriptlets";
    if !have_tools(test, &[("rpm", "apt-get install rpm")]) {
        return;
    }
    let Some(b) = built(test) else { return };
    let rpm = b.rpm[0].to_str().unwrap();

    let files: BTreeSet<String> = host_ok(&["rpm", "-qlp", rpm]).lines().map(str::to_owned).collect();
    let mut expected: BTreeSet<String> = PACKAGED.iter().map(|s| s.to_string()).collect();
    // The rpm conventions: licenses apart, zsh's vendor directory, a preset.
    for f in PACKAGED.iter().filter(|f| f.contains("/zsh/vendor-completions/")) {
        expected.remove(*f);
    }
    expected.extend(
        [
            "/usr/share/zsh/site-functions/_baton",
            "/usr/share/zsh/site-functions/_baton-httpd",
            "/usr/share/licenses/baton/LICENSE-APACHE",
            "/usr/share/licenses/baton/LICENSE-MIT",
            "/usr/lib/systemd/system-preset/50-baton.preset",
        ]
        .map(str::to_owned),
    );
    assert_eq!(files, expected, "rpm -qlp {rpm}");

    let version = host_ok(&["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{LICENSE}", rpm]);
    assert_eq!(version, format!("baton {} 1 MIT OR Apache-2.0", env!("CARGO_PKG_VERSION")));
    let requires = host_ok(&["rpm", "-qp", "--requires", rpm]);
    assert!(requires.lines().any(|l| l.starts_with("libc.so.6(GLIBC_")), "{requires}");

    // The scriptlets, section by section.
    let scripts = host_ok(&["rpm", "-qp", "--scripts", rpm]);
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut current = String::new();
    for line in scripts.lines() {
        if let Some((name, _)) = line.split_once(" scriptlet") {
            current = name.to_owned();
            continue;
        }
        sections.entry(current.clone()).or_default().push_str(&format!("{line}\n"));
    }
    let names: Vec<&str> = sections.keys().map(String::as_str).collect();
    assert_eq!(names, ["postinstall", "postuninstall", "preuninstall"], "{scripts}");
    let code = |s: &str| -> Vec<String> {
        sections[s].lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
    };
    let post = code("postinstall").join("\n");
    assert!(
        post.contains("systemctl --no-reload preset baton-httpd.socket baton-httpd-b.socket baton-httpd.service"),
        "{post}"
    );
    let postun = code("postuninstall");
    assert!(postun.iter().any(|l| l.contains("systemctl try-restart baton-httpd.service")), "{postun:?}");
    // Never restart, stop or reload the socket on the upgrade path.
    for l in code("postuninstall").iter().chain(code("postinstall").iter()) {
        assert!(!(l.contains("restart") && l.contains("socket")), "restarts the socket: {l}");
        assert!(!l.contains("stop"), "stops something on install/upgrade: {l}");
    }
    assert!(postun.iter().any(|l| l.contains("rmdir")), "erase removes the package's directories: {postun:?}");
    let preun = code("preuninstall").join("\n");
    assert!(preun.contains("if [ \"$1\" -eq 0 ]"), "stops only on erase: {preun}");
    for (name, text) in &sections {
        let out = Command::new("sh").args(["-n", "-c", text]).output().unwrap_or_else(|e| panic!("sh -n: {e}"));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn deb_contents_scripts_and_lintian() {
    let test = "deb_contents_scripts_and_lintian";
    if !have_tools(test, &[("lintian", "apt-get install lintian"), ("dpkg-deb", "apt-get install dpkg")]) {
        return;
    }
    let Some(b) = built(test) else { return };
    let deb = b.deb[0].to_str().unwrap();

    let fields = host_ok(&["dpkg-deb", "--field", deb, "Package", "Version", "Depends", "Architecture"]);
    assert!(fields.contains(&format!("Version: {}", b.versions[0])), "{fields}");
    assert!(fields.contains("Depends: libc6"), "$auto dependencies: {fields}");

    let listing = host_ok(&["dpkg-deb", "--contents", deb]);
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect();
    let mut expected: BTreeSet<String> = PACKAGED.iter().map(|s| s.to_string()).collect();
    expected.extend(
        [
            "/usr/share/zsh/vendor-completions/_baton",
            "/usr/share/zsh/vendor-completions/_baton-httpd",
            "/usr/share/doc/baton/copyright",
            "/usr/share/doc/baton/changelog.Debian.gz",
        ]
        .map(str::to_owned),
    );
    assert_eq!(files, expected, "dpkg-deb --contents {deb}");

    // The maintainer scripts: valid sh, and none of them ever restarts or
    // reloads the socket.
    let control = std::env::temp_dir().join(format!("baton-packages-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&control);
    host_ok(&["dpkg-deb", "--control", deb, control.to_str().unwrap()]);
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(control.join(script)).unwrap_or_else(|e| panic!("{script}: {e}"));
        host_ok(&["sh", "-n", control.join(script).to_str().unwrap()]);
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let touches_socket =
                ["SOCKET", "SIBLING", "baton-httpd.socket", "baton-httpd-b.socket"].iter().any(|s| line.contains(s));
            assert!(
                !(touches_socket && (line.contains("restart") || line.contains("reload"))),
                "{script} restarts the socket: {line}"
            );
            assert!(!line.contains("#DEBHELPER#"), "{script}: an unexpanded debhelper token");
        }
        assert!(text.contains("/run/systemd/system"), "{script} guards systemctl for chroots");
    }
    std::fs::remove_dir_all(&control).unwrap();

    let t0 = Instant::now();
    let out = host_run(&["lintian", "--pedantic", "--display-info", deb]);
    let report = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
    eprintln!("lintian {deb} ({:?}):\n{report}{}", t0.elapsed(), String::from_utf8_lossy(&out.stderr));
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
}

// ---- HTTP load ---------------------------------------------------------------

/// One response of baton-httpd.
#[derive(Debug)]
struct Response {
    status: u16,
    pid: u32,
    close: bool,
    body: Vec<u8>,
}

/// `GET /` on `stream`; `close` asks the server to close afterwards.
fn request(stream: &mut BufReader<TcpStream>, close: bool) -> Result<Response, String> {
    let r = httpd::get(stream, "/", close)?;
    Ok(Response { status: r.status, pid: r.pid()?, close: r.closes(), body: r.body })
}

fn connect(port: u16) -> Result<BufReader<TcpStream>, String> {
    httpd::connect(port, WAIT)
}

fn check(r: &Response) -> Result<(), String> {
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    if r.body != INDEX.as_bytes() {
        return Err(format!("unexpected body ({} bytes)", r.body.len()));
    }
    Ok(())
}

/// What a load saw.
#[derive(Debug, Default)]
struct LoadReport {
    served: u64,
    failures: Vec<String>,
    /// Keep-alive connections answered by more than one process: handed
    /// over to a new generation.
    handed_over: u64,
    /// Keep-alive connections the server closed (`Connection: close`) and
    /// the client had to reopen; not failures, but no handoff either.
    closed_by_server: u64,
    /// Every `baton-pid` seen.
    pids: BTreeSet<u32>,
}

/// Client threads against 127.0.0.1:port until [`Load::finish`] (or
/// [`LOAD_MAX`]).
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, fresh: usize, keep_alive: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let t0 = Instant::now();
        let mut threads = Vec::new();
        for i in 0..fresh + keep_alive {
            let (stop, served, report) = (stop.clone(), served.clone(), report.clone());
            let keep = i >= fresh;
            threads.push(std::thread::spawn(move || {
                let fail = |what: String| {
                    report
                        .lock()
                        .unwrap()
                        .failures
                        .push(format!("{:.3}s client {i}: {what}", t0.elapsed().as_secs_f64()))
                };
                let mut conn: Option<(BufReader<TcpStream>, BTreeSet<u32>)> = None;
                while !stop.load(Ordering::Relaxed) && t0.elapsed() < LOAD_MAX {
                    if conn.is_none() {
                        match connect(port) {
                            Ok(c) => conn = Some((c, BTreeSet::new())),
                            Err(e) => {
                                fail(e);
                                std::thread::sleep(PACE);
                                continue;
                            }
                        }
                    }
                    let (stream, pids) = conn.as_mut().unwrap();
                    match request(stream, !keep).and_then(|r| check(&r).map(|()| r)) {
                        Ok(r) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            pids.insert(r.pid);
                            report.lock().unwrap().pids.insert(r.pid);
                            if !keep || r.close {
                                let (_, pids) = conn.take().unwrap();
                                let mut rep = report.lock().unwrap();
                                if keep {
                                    rep.closed_by_server += 1;
                                    rep.handed_over += u64::from(pids.len() > 1);
                                }
                            }
                        }
                        Err(e) => {
                            let (_, pids) = conn.take().unwrap();
                            fail(format!("{e} (connection served by {pids:?})"));
                        }
                    }
                    std::thread::sleep(PACE);
                }
                if let Some((_, pids)) = conn {
                    report.lock().unwrap().handed_over += u64::from(pids.len() > 1);
                }
            }));
        }
        Load { stop, served, report, threads }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests were served (the load reaches
    /// whatever serves now), at most [`WAIT`].
    fn wait_served(&self, more: u64) {
        let target = self.served() + more;
        let t0 = Instant::now();
        while self.served() < target && t0.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let mut report = std::mem::take(&mut *self.report.lock().unwrap());
        report.served = self.served.load(Ordering::Relaxed);
        report
    }
}

fn assert_no_failures(what: &str, r: &LoadReport) {
    assert!(r.served > 0, "{what}: no request served");
    assert!(
        r.failures.is_empty(),
        "{what}: {} of {} requests failed; first ones:\n{}",
        r.failures.len(),
        r.served + r.failures.len() as u64,
        r.failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One `GET /` on a new connection: the served page's pid.
fn get(port: u16) -> Result<u32, String> {
    let mut c = connect(port)?;
    let r = request(&mut c, true)?;
    check(&r)?;
    Ok(r.pid)
}

// ---- the testbed side ----------------------------------------------------------

/// What the package tests add to the shared [`Bed`].
trait PackageBed {
    /// Boots `flavor`, prepared like a freshly booted machine: the listening
    /// port moved to a free loopback one by a drop-in (as an admin would;
    /// the network namespace is the host's, so port 80 is not an option),
    /// and no Docker-style policy-rc.d that forbids starting services.
    fn boot_prepared(flavor: Flavor, name: &str) -> Option<Bed>;
    /// A package operation, with its long timeout; returns its output.
    fn package_op(&self, argv: &[&str]) -> CmdOutput;
    /// The socket unit's listener was never closed: it entered `active`
    /// once and never left.
    fn socket_epoch(&self) -> (String, String);
    fn wait_serving(&self, port: u16) -> u32;
}

impl PackageBed for Bed {
    fn boot_prepared(flavor: Flavor, name: &str) -> Option<Bed> {
        let bed = Bed::builder(flavor, name).wait(WAIT).boot()?;
        bed.run_ok(&["rm", "-f", "/usr/sbin/policy-rc.d"]);
        // Both units of the steered pair move (a pair keeps one address).
        for socket in [SOCKET, SIBLING] {
            bed.write_file(
                &format!("/etc/systemd/system/{socket}.d/port.conf"),
                &format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{}\n", bed.port),
            );
        }
        Some(bed)
    }

    fn package_op(&self, argv: &[&str]) -> CmdOutput {
        let t0 = Instant::now();
        let out = self.run_ok_with_timeout(argv, PACKAGE_OP);
        eprintln!("{}: {argv:?} took {:?}", self.name, t0.elapsed());
        out
    }

    fn socket_epoch(&self) -> (String, String) {
        let epoch = |unit| {
            [self.show(unit, "ActiveEnterTimestampMonotonic"), self.show(unit, "InactiveEnterTimestampMonotonic")]
        };
        let [a, b] = epoch(SOCKET);
        let [c, d] = epoch(SIBLING);
        (format!("{SOCKET} {a} {b}"), format!("{SIBLING} {c} {d}"))
    }

    fn wait_serving(&self, port: u16) -> u32 {
        let mut last = String::new();
        let mut pid = 0;
        self.wait_for(&format!("baton-httpd to serve on port {port}"), || match get(port) {
            Ok(p) => {
                pid = p;
                true
            }
            Err(e) => {
                last = e;
                false
            }
        });
        pid
    }
}

/// Under load: `action` (a package upgrade, a reload, a restart) fails no
/// request; returns the load's report after the new process served.
fn under_load(bed: &Bed, port: u16, what: &str, action: impl FnOnce()) -> LoadReport {
    let load = Load::start(port, 4, 4);
    load.wait_served(200);
    let t0 = Instant::now();
    action();
    let took = t0.elapsed();
    // Let every client go through the new process a few times.
    load.wait_served(400);
    let report = load.finish();
    eprintln!(
        "{} {what}: took {took:?}; {} requests served, {} failed; {} keep-alive connections handed over, \
         {} closed by the server; pids {:?}",
        bed.name,
        report.served,
        report.failures.len(),
        report.handed_over,
        report.closed_by_server,
        report.pids
    );
    assert_no_failures(&format!("{} {what}", bed.name), &report);
    report
}

/// The whole life of the .deb on one systemd.
fn deb_lifecycle(flavor: Flavor, name: &str) {
    if !skip_unless_root(name) || !have_tools(name, &[("curl", "apt-get install curl")]) {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(flavor, name) else { return };
    assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd());
    let deb1 = bed.carry(&b.deb[0]);
    let deb2 = bed.carry(&b.deb[1]);
    let port = bed.port;

    // ---- install: enabled, started, serving the default document root.
    bed.package_op(&["dpkg", "-i", &deb1]);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "enabled", "{unit}");
        assert_eq!(bed.show(unit, "ActiveState"), "active", "{unit} started by the postinst");
    }
    let main1 = bed.show(SERVICE, "MainPID");
    assert_eq!(bed.exe(&main1), "/usr/bin/baton");
    // Both sockets of the pair reached Baton, which steers them.
    let status = bed.run_ok(&[
        "/usr/bin/baton",
        "status",
        "--name",
        "baton-httpd",
        "--control",
        "/run/baton-httpd/baton-httpd.sock",
    ]);
    assert!(status.contains(" takes new connections "), "not steered: {status}");
    let url = format!("http://127.0.0.1:{port}/");
    let page = host_ok(&["curl", "--fail", "--silent", "--show-error", "--max-time", "30", &url]);
    assert_eq!(page, INDEX, "curl {url}");
    let headers = host_ok(&[
        "curl",
        "--fail",
        "--silent",
        "--show-error",
        "--max-time",
        "30",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert!(headers.to_ascii_lowercase().contains("baton-generation: 1"), "{headers}");
    for f in PACKAGED {
        bed.run_ok(&["test", "-f", f]);
    }

    // ---- upgrade to the next revision under load: Baton upgraded in place, then a reload.
    let socket_before = bed.socket_epoch();
    let httpd1 = bed.wait_serving(port);
    let report = under_load(&bed, port, "dpkg -i (upgrade)", || {
        bed.package_op(&["dpkg", "-i", &deb2]);
    });
    let status = bed.run_ok(&["dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", "baton"]);
    assert_eq!(status.trim(), format!("{} ii", b.versions[1]));
    assert_eq!(bed.socket_epoch(), socket_before, "the upgrade restarted {SOCKET}");
    let main2 = bed.show(SERVICE, "MainPID");
    assert_eq!(main2, main1, "the upgrade restarted {SERVICE} instead of `baton upgrade`");
    assert_eq!(bed.exe(&main2), "/usr/bin/baton", "the new Baton runs the new file (not a deleted one)");
    let httpd2 = bed.wait_serving(port);
    assert_ne!(httpd2, httpd1);
    assert_eq!(bed.exe(httpd2), "/usr/bin/baton-httpd");
    assert!(report.pids.contains(&httpd1) && report.pids.contains(&httpd2), "{report:?}");
    assert!(
        report.handed_over > 0,
        "no keep-alive connection was served by both the old and the new generation: {report:?}"
    );

    // ---- `systemctl reload`: an overlapped restart, Baton stays.
    let report = under_load(&bed, port, "systemctl reload (supervised)", || bed.systemctl_ok(&["reload", SERVICE]));
    assert_eq!(bed.show(SERVICE, "MainPID"), main2, "reload keeps Baton");
    let httpd3 = bed.wait_serving(port);
    assert_ne!(httpd3, httpd2);
    // Generation 2 came with the upgrade's reload.
    assert!(bed.show(SERVICE, "StatusText").starts_with("generation 3 serving"), "{}", bed.show(SERVICE, "StatusText"));
    assert!(report.pids.contains(&httpd3), "{report:?}");

    // ---- `systemctl restart` of the supervised service.
    let report = under_load(&bed, port, "systemctl restart (supervised)", || bed.systemctl_ok(&["restart", SERVICE]));
    assert_ne!(bed.show(SERVICE, "MainPID"), main2);
    assert!(report.handed_over > 0, "{report:?}");
    assert_eq!(bed.socket_epoch(), socket_before, "nothing restarted {SOCKET}");

    // ---- the direct topology, from `baton units --direct` (not packaged).
    direct_restart(&bed);

    // ---- remove (not purge): stopped and masked; installing again (with
    // the old version as `$2`, as after an upgrade) enables and starts both.
    bed.package_op(&["dpkg", "--remove", "baton"]);
    assert_stopped(&bed);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "masked", "{unit} after remove");
    }
    bed.package_op(&["dpkg", "-i", &deb2]);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "enabled", "{unit} reinstalled");
        assert_eq!(bed.show(unit, "ActiveState"), "active", "{unit} started again");
    }
    bed.wait_serving(port);

    // ---- purge: nothing left running, listening, enabled or installed.
    bed.package_op(&["dpkg", "--purge", "baton"]);
    assert_purged(&bed);
    let removed = bed.run(&["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "baton"]);
    assert!(!removed.success() || removed.stdout_trimmed().is_empty() || removed.stdout_trimmed() == "un", "{removed}");
}

/// Units generated by the packaged `baton units --direct`, run by systemd
/// directly; `systemctl restart` under load fails no request.
fn direct_restart(bed: &Bed) {
    let port = free_loopback_port();
    let listen = format!("http=127.0.0.1:{port}");
    bed.run_ok(&[
        "/usr/bin/baton",
        "units",
        "--direct",
        "--name",
        "httpd-direct",
        "--listen",
        &listen,
        "--output",
        "/etc/systemd/system",
        "--",
        "/usr/bin/baton-httpd",
        "--root",
        "/usr/share/baton-httpd/www",
    ]);
    bed.tb.daemon_reload().unwrap();
    let svc = "httpd-direct.service";
    bed.systemctl_ok(&["start", "httpd-direct.socket", svc]);
    let main1 = bed.show(svc, "MainPID");
    assert_eq!(bed.exe(&main1), "/usr/bin/baton-httpd", "direct: systemd runs baton-httpd itself");
    let socket_before = bed.show("httpd-direct.socket", "ActiveEnterTimestampMonotonic");
    let report = under_load(bed, port, "systemctl restart (direct)", || bed.systemctl_ok(&["restart", svc]));
    let main2 = bed.show(svc, "MainPID");
    assert_ne!(main2, main1);
    assert!(report.pids.contains(&main2.parse().unwrap()), "{report:?}");
    assert!(report.handed_over > 0, "{report:?}");
    assert_eq!(bed.show("httpd-direct.socket", "ActiveEnterTimestampMonotonic"), socket_before);
    bed.systemctl_ok(&["stop", svc, "httpd-direct.socket"]);
    assert_eq!(bed.show(svc, "Result"), "success");
    bed.run_ok(&["rm", "/etc/systemd/system/httpd-direct.socket", "/etc/systemd/system/httpd-direct.service"]);
    bed.tb.daemon_reload().unwrap();
}

/// No Baton or baton-httpd process runs and nothing listens on the port.
fn assert_stopped(bed: &Bed) {
    for comm in ["baton", "baton-httpd"] {
        assert_eq!(bed.pids_named(comm), Vec::<u32>::new(), "{} still running", comm);
    }
    match TcpStream::connect(("127.0.0.1", bed.port)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("port {}: expected nothing listening, got {other:?}", bed.port),
    }
}

/// After removal: no process, no listener, no unit, no enablement link,
/// no helper state; only the admin's own drop-in stays.
fn assert_purged(bed: &Bed) {
    assert_stopped(bed);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.show(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(bed.show(unit, "LoadState"), "not-found", "{unit}");
    }
    let leftovers = bed.run_ok(&[
        "find",
        "/etc/systemd/system",
        "/usr/lib/systemd",
        "/var/lib/systemd",
        "/run/systemd/system",
        "/usr/bin",
        "/usr/share",
        "/run",
        "-xdev",
        "-name",
        "*baton*",
    ]);
    // Only the admin's drop-in, and the testbed's own boot target.
    let leftovers: Vec<&str> = leftovers
        .lines()
        .filter(|l| {
            !l.starts_with("/etc/systemd/system/baton-httpd.socket.d")
                && !l.starts_with("/etc/systemd/system/baton-httpd-b.socket.d")
                && !l.contains("baton-testbed")
        })
        .collect();
    assert!(leftovers.is_empty(), "left after removal: {leftovers:?}");
}

baton_testbed::systemd_tests! { deb_lifecycle:
    deb_lifecycle_on_252: Host,
    deb_lifecycle_on_257: Trixie,
    deb_lifecycle_on_262: Forky,
}

/// The .rpm on systemd 252 with Debian's `rpm` (the trixie root has none):
/// install (preset enables, %post starts), upgrade under load (the old
/// package's %postun upgrades Baton in place and reloads), erase.
#[test]
fn rpm_lifecycle_on_252() {
    let name = "rpm_lifecycle_on_252";
    if !skip_unless_root(name) || !have_tools(name, &[("rpm", "apt-get install rpm")]) {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(Flavor::Host, name) else { return };
    let (rpm1, rpm2) = (bed.carry(&b.rpm[0]), bed.carry(&b.rpm[1]));
    let port = bed.port;
    // --nodeps: the rpm database of a Debian system knows no libc.
    bed.package_op(&["rpm", "-i", "--nodeps", &rpm1]);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "enabled", "{unit}: preset");
        assert_eq!(bed.show(unit, "ActiveState"), "active", "{unit} started by %post");
    }
    let main1 = bed.show(SERVICE, "MainPID");
    bed.wait_serving(port);

    let socket_before = bed.socket_epoch();
    let report = under_load(&bed, port, "rpm -U (upgrade)", || {
        bed.package_op(&["rpm", "-U", "--nodeps", &rpm2]);
    });
    assert_eq!(bed.run_ok(&["rpm", "-q", "--qf", "%{RELEASE}", "baton"]).trim(), "2");
    assert_eq!(bed.socket_epoch(), socket_before, "the upgrade restarted {SOCKET}");
    let main2 = bed.show(SERVICE, "MainPID");
    assert_eq!(main2, main1, "%postun restarted {SERVICE} instead of `baton upgrade`");
    assert_eq!(bed.exe(&main2), "/usr/bin/baton");
    assert!(report.handed_over > 0, "{report:?}");

    bed.package_op(&["rpm", "-e", "baton"]);
    assert_purged(&bed);
}

/// Where systemd does not run (a chroot, an image build: no
/// /run/systemd/system) the .deb installs, enabled but not started; a
/// `policy-rc.d` that forbids starting services (Docker images ship one) is
/// obeyed too; and an upgrade once starting is allowed starts both.
#[test]
fn deb_without_systemd_or_with_policy_rc_d() {
    let name = "deb_without_systemd_or_with_policy_rc_d";
    if !skip_unless_root(name) {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(Flavor::Host, name) else { return };
    let (deb1, deb2) = (bed.carry(&b.deb[0]), bed.carry(&b.deb[1]));

    // systemd hidden from dpkg and its scripts, in a private mount namespace.
    let script = format!("mount -t tmpfs none /run/systemd && dpkg -i {deb1}");
    bed.package_op(&["unshare", "--mount", "--propagation", "private", "sh", "-c", &script]);
    bed.tb.daemon_reload().unwrap();
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "enabled", "{unit}");
        assert_eq!(bed.show(unit, "ActiveState"), "inactive", "{unit} started without systemd running");
    }
    assert_stopped(&bed);
    bed.package_op(&["dpkg", "--purge", "baton"]);
    assert_purged(&bed);

    // policy-rc.d says 101: installed and enabled, nothing started.
    bed.tb.write_file("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bed.tb.host_path("/usr/sbin/policy-rc.d"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    bed.package_op(&["dpkg", "-i", &deb1]);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.run(&["systemctl", "is-enabled", unit]).stdout_trimmed(), "enabled", "{unit}");
        assert_eq!(bed.show(unit, "ActiveState"), "inactive", "{unit} started against policy-rc.d");
    }
    assert_stopped(&bed);

    // Allowed again: the upgrade starts the enabled socket and service.
    bed.run_ok(&["rm", "/usr/sbin/policy-rc.d"]);
    bed.package_op(&["dpkg", "-i", &deb2]);
    for unit in [SOCKET, SIBLING, SERVICE] {
        assert_eq!(bed.show(unit, "ActiveState"), "active", "{unit} after the upgrade");
    }
    bed.wait_serving(bed.port);
    bed.package_op(&["dpkg", "--purge", "baton"]);
    assert_purged(&bed);
}
